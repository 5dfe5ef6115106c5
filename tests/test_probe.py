"""`eval.shapeworld_probe`: linear probes on frozen encoder tokens (class, per-patch shape and colour)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from eval.shapeworld_probe import ProbeFeatures, fit_probe, main, probe_report, shapeworld_features
from uniflow.configs import to_dict
from uniflow.data.shapeworld import COLOURS, NUM_CLASSES, SHAPES, ShapeWorldDataset
from uniflow.encoders import EncoderConfig, build_encoder

CONFIG = EncoderConfig(backend="timm", arch="vit_tiny_patch16_224",
                       kwargs={"embed_dim": 32, "depth": 2, "num_heads": 2}, image_size=32, patch_size=8)


def _planted(n: int, seed: int) -> ProbeFeatures:
    """Tokens that carry class, shape and colour linearly (one-hot blocks plus noise): every probe must read them."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % NUM_CLASSES
    shapes = torch.randint(0, len(SHAPES) + 1, (n, 16), generator=g)
    colours = torch.randint(0, len(COLOURS) + 1, (n, 16), generator=g)
    tokens = 0.1 * torch.randn(n, 16, 64, generator=g)
    tokens[:, :, :7] += torch.nn.functional.one_hot(shapes, 7)
    tokens[:, :, 7:14] += torch.nn.functional.one_hot(colours, 7)
    tokens[:, :, 14:50] += torch.nn.functional.one_hot(labels, NUM_CLASSES)[:, None, :].float()
    return ProbeFeatures(tokens, labels, shapes, colours)


def test_probes_read_planted_features_exactly_and_deterministically() -> None:
    fit, test = _planted(400, 0), _planted(100, 1)
    result = probe_report((fit, test), steps=50)
    for key in ("class_accuracy", "shape_accuracy", "colour_accuracy", "shape_accuracy_all_patches"):
        assert result[key] == 1.0, key
    assert result["passes"] == {"class_accuracy": True, "shape_accuracy": True, "colour_accuracy": True}
    assert result["covered_patches"] == int((test.patch_shape != len(SHAPES)).sum())
    assert probe_report((fit, test), steps=50) == result  # fixed seed, full batch: the same figures every time


def test_fit_probe_standardises_and_is_seeded() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 5, generator=g) * torch.tensor([1000.0, 1, 1, 1, 1e-3])  # wildly different scales
    y = (x[:, 4] > 0).long()  # only the tiny-scale feature decides
    probe = fit_probe(x, y, 2, steps=50)
    assert (probe(x).argmax(-1) == y).float().mean() > 0.98
    again = fit_probe(x, y, 2, steps=50)
    assert torch.equal(probe(x), again(x))


def test_features_follow_the_dataset_and_the_encoder() -> None:
    torch.manual_seed(0)
    encoder = build_encoder(CONFIG)
    feats = shapeworld_features(encoder, "heldout", 6, batch_size=4)
    assert feats.tokens.shape == (6, 16, 32) and feats.patch_shape.shape == feats.patch_colour.shape == (6, 16)
    dataset = ShapeWorldDataset("heldout", 6, image_size=32, patch_size=8)
    assert feats.labels.tolist() == [dataset[i]["label"] for i in range(6)]
    assert torch.equal(feats.patch_colour[5], dataset[5]["patch_colour"])
    with torch.no_grad():
        expected = encoder(encoder.normalize(dataset[2]["image"][None])).last[0]
    torch.testing.assert_close(feats.tokens[2], expected)


def _export(folder: Path) -> Path:
    torch.manual_seed(0)
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in build_encoder(CONFIG).model.state_dict().items()},
              str(folder / "encoder.safetensors"))
    (folder / "encoder_config.json").write_text(json.dumps(to_dict(CONFIG)))
    return folder / "encoder.safetensors"


def test_command_prints_the_table_and_writes_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    weights = _export(tmp_path / "enc")
    out = tmp_path / "probe.json"
    assert main(["--encoder", str(weights), "--train", "30", "--heldout", "10", "--steps", "5", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| main-object class (36-way, mean-pooled) |" in printed and ">= 90%" in printed
    result = json.loads(out.read_text())
    assert result["encoder"] == str(weights) and result["train_images"] == 30 and result["heldout_images"] == 10
    assert all(0.0 <= result[k] <= 1.0 for k in ("class_accuracy", "shape_accuracy", "colour_accuracy"))
    # the folder works as well as the file, and the figures do not depend on which was named
    assert main(["--encoder", str(weights.parent), "--train", "30", "--heldout", "10", "--steps", "5",
                 "--out", str(tmp_path / "again.json")]) == 0
    again = json.loads((tmp_path / "again.json").read_text())
    assert {k: v for k, v in again.items() if k != "encoder"} == {k: v for k, v in result.items() if k != "encoder"}


def test_command_probes_a_tokenizers_encoder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.helpers import tiny_tokenizer_config
    from uniflow import UniFlowTokenizer

    torch.manual_seed(0)
    folder = UniFlowTokenizer(tiny_tokenizer_config()).save_pretrained(tmp_path / "tok")
    assert main(["--tokenizer", str(folder), "--train", "20", "--heldout", "8", "--steps", "3",
                 "--out", str(tmp_path / "p.json")]) == 0
    result = json.loads((tmp_path / "p.json").read_text())
    assert result["encoder"] == str(folder) and result["heldout_patches"] == 8 * 16


def test_command_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    weights = _export(tmp_path / "enc")
    (tmp_path / "enc" / "encoder_config.json").unlink()
    assert main(["--encoder", str(weights)]) == 2
    assert capsys.readouterr().err.strip() == (f"error: --encoder: no encoder_config.json next to {weights} "
                                              "(expected an export of `uniflow train encoder`)")
    assert main(["--encoder", str(tmp_path / "missing.safetensors")]) == 2
    assert "missing.safetensors not found" in capsys.readouterr().err
    assert main(["--encoder", str(weights), "--train", "0"]) == 2
    assert "--train: expected a value in [1, inf), got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--encoder", str(weights), "--tokenizer", "x"])  # one source only
