"""Write or check the bundle's manifest (checkpoints/shapeworld/MANIFEST.json): every file's sha256 and size, the
commands that built each part (read from the Makefile's `checkpoints` recipe, so the two cannot drift apart), and
each part's held-out figures (from the evaluation files the same recipe writes).

    python tools/bundle_manifest.py            # (re)write MANIFEST.json after `make checkpoints`
    python tools/bundle_manifest.py --check    # exit 1, naming the file, when the manifest and the files differ
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "checkpoints" / "shapeworld"
MANIFEST = "MANIFEST.json"
PARTS = ("encoder", "tokenizer", "generator", "mllm")
# Which recipe line builds or measures which part: the first pattern that matches the line decides.
LINE_PARTS = (("train encoder", "encoder"), ("train tokenizer", "tokenizer"), ("latent-stats", "tokenizer"),
              ("shapeworld_tokenizer", "tokenizer"), ("generator", "generator"), ("mllm", "mllm"))
# The held-out figures of each part: (file in the bundle, keys kept; None keeps every number at the top level).
FIGURES = {
    "encoder": ("encoder/metrics.json", ("heldout_accuracy", "heldout_shape_accuracy", "heldout_colour_accuracy")),
    "tokenizer": ("eval.json", ("heldout_images", "steps", "psnr_db", "ssim", "patch_seam_ratio",
                                "cosine_to_teacher_deepest_third", "probe_class_accuracy_student",
                                "probe_class_accuracy_teacher", "flat_psnr_db", "hard_edges_psnr_db",
                                "photos_psnr_db")),
    "generator": ("generator_eval.json", None),
    "mllm": ("mllm_eval.json", None),
}


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def recipe_commands(makefile: Path = ROOT / "Makefile") -> dict[str, list[str]]:
    """The `checkpoints` recipe's commands per part, with $(PY) as `python` and $(BUNDLE) spelled out."""
    text = makefile.read_text().replace("\\\n", " ")
    match = re.search(r"^checkpoints:.*\n((?:\t.*\n?)+)", text, flags=re.M)
    if match is None:
        raise SystemExit(f"{makefile}: no `checkpoints` recipe")
    commands: dict[str, list[str]] = {p: [] for p in PARTS}
    for line in match.group(1).splitlines():
        line = " ".join(line.split()).replace("$(PY)", "python").replace("$(BUNDLE)", "checkpoints/shapeworld")
        part = next((p for pattern, p in LINE_PARTS if pattern in line), None)
        if part is not None:
            commands[part].append(line)
    return commands


def figures(bundle: Path, part: str) -> dict[str, Any]:
    name, keys = FIGURES[part]
    path = bundle / name
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    if keys is None:
        return {k: v for k, v in data.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return {k: data[k] for k in keys if k in data}


def build(bundle: Path = BUNDLE) -> dict[str, Any]:
    commands = recipe_commands()
    parts = {}
    for part in PARTS:
        folder = bundle / part
        files = sorted(p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []
        parts[part] = {
            "files": {str(p.relative_to(bundle)): {"sha256": sha256(p), "bytes": p.stat().st_size} for p in files},
            "built_by": commands[part],
            "heldout": figures(bundle, part),
        }
    evaluations = sorted(name for name, _ in FIGURES.values() if "/" not in name and (bundle / name).is_file())
    total = sum(f["bytes"] for part in parts.values() for f in part["files"].values())
    total += sum((bundle / e).stat().st_size for e in evaluations)
    return {"bundle": str(bundle.relative_to(ROOT)) if bundle.is_relative_to(ROOT) else str(bundle),
            "total_bytes": total, "evaluations": evaluations, "parts": parts}


def check(bundle: Path = BUNDLE) -> list[str]:
    """Differences between the manifest on disk and the bundle as it is: one readable line each."""
    path = bundle / MANIFEST
    if not path.is_file():
        return [f"{path}: missing (python tools/bundle_manifest.py writes it)"]
    recorded, actual = json.loads(path.read_text()), build(bundle)
    problems = []
    for part in PARTS:
        want = recorded["parts"].get(part, {}).get("files", {})
        have = actual["parts"][part]["files"]
        for name in sorted(set(want) | set(have)):
            if name not in have:
                problems.append(f"{name}: in {MANIFEST} but not in the bundle")
            elif name not in want:
                problems.append(f"{name}: in the bundle but not in {MANIFEST}")
            elif want[name]["sha256"] != have[name]["sha256"]:
                problems.append(f"{name}: sha256 {have[name]['sha256'][:12]}, {MANIFEST} says "
                                f"{want[name]['sha256'][:12]}")
        if recorded["parts"].get(part, {}).get("built_by") != actual["parts"][part]["built_by"]:
            problems.append(f"{part}: the Makefile's checkpoints recipe changed since {MANIFEST} was written")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=BUNDLE)
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args(argv)
    bundle = args.bundle.resolve()
    if args.check:
        problems = check(bundle)
        for line in problems:
            print(f"error: {line}", file=sys.stderr)
        return 1 if problems else 0
    manifest = build(bundle)
    (bundle / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"{bundle / MANIFEST}: {manifest['total_bytes'] / 1e6:.1f} MB in {len(PARTS)} parts")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
