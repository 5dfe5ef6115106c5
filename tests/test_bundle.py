"""The shipped bundle (checkpoints/shapeworld): its manifest matches its files, and it stays small."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

from tests.helpers import ROOT

spec = importlib.util.spec_from_file_location("bundle_manifest", ROOT / "tools" / "bundle_manifest.py")
bundle_manifest = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bundle_manifest)

MAX_BUNDLE_BYTES = 30_000_000  # issue 13: the whole bundle in the repository


def test_the_committed_manifest_matches_the_bundle() -> None:
    assert bundle_manifest.check() == []
    manifest = json.loads((bundle_manifest.BUNDLE / bundle_manifest.MANIFEST).read_text())
    for part in bundle_manifest.PARTS:
        assert manifest["parts"][part]["files"], f"{part}: no files in the bundle"
        assert manifest["parts"][part]["built_by"], f"{part}: no command in the Makefile's checkpoints recipe"
    on_disk = sum(p.stat().st_size for p in bundle_manifest.BUNDLE.rglob("*") if p.is_file())
    assert on_disk <= MAX_BUNDLE_BYTES, f"bundle is {on_disk / 1e6:.1f} MB"


def test_the_check_names_a_changed_missing_or_extra_file(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    for part in bundle_manifest.PARTS:
        (bundle / part).mkdir(parents=True)
        (bundle / part / "weights.bin").write_bytes(part.encode())
    assert bundle_manifest.main(["--bundle", str(bundle)]) == 0
    assert bundle_manifest.check(bundle) == []
    (bundle / "tokenizer" / "weights.bin").write_bytes(b"retrained")
    (bundle / "generator" / "weights.bin").unlink()
    shutil.copy(bundle / "mllm" / "weights.bin", bundle / "mllm" / "extra.bin")
    problems = bundle_manifest.check(bundle)
    assert any(p.startswith("tokenizer/weights.bin: sha256") for p in problems), problems
    assert any(p.startswith("generator/weights.bin: in MANIFEST.json but not") for p in problems), problems
    assert any(p.startswith("mllm/extra.bin: in the bundle but not") for p in problems), problems
    assert bundle_manifest.main(["--bundle", str(bundle), "--check"]) == 1


STAGED = ROOT / "checkpoints" / "shapeworld_v3"


def test_the_staged_v3_parts_fit_together() -> None:
    """The staged next bundle: its generator accepts its tokenizer (the deblocking setting written after training is
    no part of the fingerprint), the tokenizer decodes with the chosen filter, its MLLM's projector was trained on
    this tokenizer's encoder (the sibling folder its config names) and not on the shipped one, and it stays within the
    bundle's size."""
    from generator.model import ARGenerator
    from mllm.config import MLLMConfig
    from mllm.llm import same_probe
    from mllm.model import build_vision, encoder_probe
    from uniflow import UniFlowTokenizer

    tokenizer = UniFlowTokenizer.from_pretrained(STAGED / "tokenizer")
    assert (tokenizer.config.decoder.deblock, tokenizer.config.decoder.deblock_reach) == (0.3, 2)
    ARGenerator.from_pretrained(STAGED / "generator").check_tokenizer(tokenizer)
    data = json.loads((STAGED / "mllm" / "config.json").read_text())
    assert data["vision"]["tokenizer"] == "../tokenizer"
    config = MLLMConfig.from_dict({k: v for k, v in data.items() if k not in ("base", "encoder_probe", "metrics")})
    for folder, same in ((STAGED / "mllm", True), (ROOT / "checkpoints" / "shapeworld" / "mllm", False)):
        encoder = build_vision(config, meta=False, load_weights=True, folder=folder)
        assert same_probe(data["encoder_probe"], encoder_probe(encoder)) is same, folder
    on_disk = sum(p.stat().st_size for p in STAGED.rglob("*") if p.is_file())
    assert on_disk <= MAX_BUNDLE_BYTES, f"staged bundle is {on_disk / 1e6:.1f} MB"
