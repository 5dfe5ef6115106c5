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
