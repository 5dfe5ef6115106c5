import json

from eval.compare_runs import main, psnr_curve, summary


def write_run(folder, rows, batch_size=8):
    folder.mkdir()
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 9, "ki')
    (folder / "config.yaml").write_text(f"kind: tokenizer\nbatch_size: {batch_size}\n")


def test_table_reads_ema_curve_and_last_losses(tmp_path, capsys):
    a = [{"step": 10, "kind": "train", "flow": 1.0, "distill": 0.5, "alpha_1": 0.2, "alpha_2": 0.4,
          "images_per_s": 4.0},
         {"step": 10, "kind": "eval", "heldout_psnr": 20.0, "heldout_psnr_ema": 21.5},
         {"step": 20, "kind": "train", "flow": 0.25, "distill": 0.125, "alpha_1": 0.1, "alpha_2": 0.3,
          "images_per_s": 16.0},
         {"step": 20, "kind": "eval", "heldout_psnr": 25.0}]
    write_run(tmp_path / "a", a)
    assert psnr_curve(a) == {10: 21.5, 20: 25.0}
    s = summary(a, batch_size=8)
    assert s["flow"] == 0.25 and abs(s["mean_alpha"] - 0.2) < 1e-12 and s["s_per_step"] == 8 / 10.0

    write_run(tmp_path / "b", [{"step": 10, "kind": "eval", "heldout_psnr": 18.25}])
    assert main([f"base={tmp_path / 'a'}", str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    assert "| step | base PSNR (dB) | b PSNR (dB) |" in out
    assert "| 10 | 21.50 | 18.25 |" in out and "| 20 | 25.00 |  |" in out
    assert "| base | 20 | 0.2500 | 0.12500 | 0.20000 | 0.80 |" in out


def test_missing_run_is_a_clear_error(tmp_path, capsys):
    assert main([str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "nowhere" in err and "metrics.jsonl" in err
