import json

from safetensors.torch import save_file

from eval.shapeworld_tokenizer import evaluate, main
from tests.helpers import tiny_tokenizer_config
from uniflow import UniFlowTokenizer


def write_bundle(folder, seed):
    import torch

    torch.manual_seed(seed)
    tokenizer = UniFlowTokenizer.from_config(tiny_tokenizer_config(image_size=32, depth=3))
    tokenizer.save_pretrained(folder / "tokenizer")
    (folder / "encoder").mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tokenizer.encoder.model.state_dict().items()},
              str(folder / "encoder" / "encoder.safetensors"))


def test_student_equal_to_teacher_scores_perfect_agreement(tmp_path):
    write_bundle(tmp_path / "bundle", seed=0)
    result = evaluate(tmp_path / "bundle", heldout=6, probe_train=12, batch_size=4)
    assert abs(result["cosine_to_teacher_deepest_third"] - 1.0) < 1e-5
    assert result["probe_gap_points"] == 0.0
    for key in ("class", "shape", "colour"):  # eval.shapeworld_probe's three probes, the same for equal encoders
        assert result[f"probe_{key}_accuracy_student"] == result[f"probe_{key}_accuracy_teacher"] is not None
    assert result["deepest_third_layers"] == [3]
    assert 0 < result["psnr_db"] < 40 and -1 <= result["ssim"] <= 1 and result["patch_seam_ratio"] > 0


def test_tokenizer_override_is_measured_against_the_bundles_teacher(tmp_path, capsys):
    write_bundle(tmp_path / "bundle", seed=0)
    write_bundle(tmp_path / "other", seed=1)
    out = tmp_path / "eval.json"
    assert main(["--bundle", str(tmp_path / "bundle"), "--tokenizer", str(tmp_path / "other" / "tokenizer"),
                 "--heldout", "6", "--probe-train", "12", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["tokenizer"].endswith("other/tokenizer")
    assert result["cosine_to_teacher_deepest_third"] < 0.99  # a differently initialised encoder is not the teacher
    assert "| psnr_db |" in capsys.readouterr().out


def test_missing_parts_are_clear_errors(tmp_path, capsys):
    write_bundle(tmp_path / "bundle", seed=0)
    assert main(["--bundle", str(tmp_path / "bundle"), "--tokenizer", str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err
    assert main(["--bundle", str(tmp_path / "bundle"), "--teacher", str(tmp_path / "no.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no.safetensors" in err


def test_generalisation_figures_and_grid(tmp_path, capsys):
    from PIL import Image

    write_bundle(tmp_path / "bundle", seed=0)
    grid, out = tmp_path / "figs" / "grid.png", tmp_path / "eval.json"
    (tmp_path / "figs").mkdir()
    assert main(["--bundle", str(tmp_path / "bundle"), "--heldout", "8", "--probe-train", "0", "--batch-size", "8",
                 "--grid", str(grid), "--grid-parts", str(tmp_path / "parts"), "--zoom", "3",
                 "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["probe_gap_points"] is None and result["probe_accuracy_student"] is None  # --probe-train 0
    for part in ("synthetic", "flat", "hard_edges", "photos"):
        assert 0 < result[f"{part}_psnr_db"] <= 100 and result[f"{part}_patch_seam_ratio"] > 0
    assert result["synthetic_images"] == result["flat_images"] + result["hard_edges_images"]
    printed = capsys.readouterr().out
    assert "| synthetic_psnr_db |" in printed and "| photos_psnr_db |" in printed
    # 2 rows (originals, reconstructions) of 8 ShapeWorld + 8 synthetic + 8 photos, 32 px each, 2-px gutters
    assert Image.open(grid).size == (24 * 34 + 2, 2 * 32 + 3 * 2)
    # one 2x8 picture per part, every pixel enlarged 3x: the picture is 3x larger
    for part in ("shapeworld", "synthetic", "photos"):
        assert Image.open(tmp_path / "parts" / f"{part}.png").size == (8 * (96 + 2) + 2, 2 * 96 + 3 * 2)


def test_grid_and_probe_options_are_checked_before_compute(tmp_path, capsys):
    write_bundle(tmp_path / "bundle", seed=0)
    assert main(["--bundle", str(tmp_path / "bundle"), "--grid", str(tmp_path / "grid.jpg")]) == 2
    assert "--grid" in capsys.readouterr().err
    assert main(["--bundle", str(tmp_path / "bundle"), "--grid", str(tmp_path / "g.png"),
                 "--no-generalisation"]) == 2
    assert "--no-generalisation" in capsys.readouterr().err
    assert main(["--bundle", str(tmp_path / "bundle"), "--zoom", "0"]) == 2
    assert "--zoom" in capsys.readouterr().err
    assert main(["--bundle", str(tmp_path / "bundle"), "--probe-train", "-1"]) == 2
    assert "--probe-train" in capsys.readouterr().err
    assert not (tmp_path / "g.png").exists()


def test_deblock_option_replaces_the_tokenizers_threshold(tmp_path, capsys):
    write_bundle(tmp_path / "bundle", seed=0)
    common = ["--bundle", str(tmp_path / "bundle"), "--heldout", "4", "--probe-train", "0", "--batch-size", "4",
              "--no-generalisation"]
    results = {}
    for name, extra in [("plain", []), ("off", ["--deblock", "0"]), ("on", ["--deblock", "0.5"])]:
        assert main([*common, *extra, "--out", str(tmp_path / f"{name}.json")]) == 0
        results[name] = json.loads((tmp_path / f"{name}.json").read_text())
    assert results["plain"]["deblock"] == results["off"]["deblock"] == 0.0 and results["on"]["deblock"] == 0.5
    assert results["plain"]["psnr_db"] == results["off"]["psnr_db"] != results["on"]["psnr_db"]
    assert "deblocking threshold 0.5" in capsys.readouterr().out
    assert main([*common, "--deblock", "1.5"]) == 2
    assert "--deblock" in capsys.readouterr().err
