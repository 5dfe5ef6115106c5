"""`uniflow chat` and `python -m eval.shapeworld_vqa` on a tiny MLLM folder: one streamed answer, an interactive
multi-turn session, and the bad inputs (checked before the model loads, one `error:` line, exit code 2)."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from app.cli import main
from mllm.model import UniFlowChat
from tests.helpers import one_error_line, save_tiny_mllm
from uniflow.data import render_sample


@pytest.fixture(scope="module")
def mllm_dir(tmp_path_factory: pytest.TempPathFactory, shared_tokenizer: Any) -> Path:
    return save_tiny_mllm(tmp_path_factory.mktemp("chat"), shared_tokenizer[1])


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("img") / "shape.png"
    render_sample(0, "heldout", 0).image.save(path)
    return path


def test_chat_prompt_streams_one_answer(mllm_dir: Path, image: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["chat", "--mllm", str(mllm_dir), "--image", str(image), "--prompt", "What shape?",
                 "--max-new-tokens", "6"])
    out = capsys.readouterr().out
    assert code == 0
    model = UniFlowChat.from_pretrained(mllm_dir)
    expected = model.chat([str(image)], "<image>\nWhat shape?", max_new_tokens=6)
    assert out.strip() == expected and expected


def test_chat_interactive_keeps_the_history(mllm_dir: Path, image: Path, capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("What shape?\n\nAnd the colour?\n/exit\n"))
    code = main(["chat", "--mllm", str(mllm_dir), "--image", str(image), "--max-new-tokens", "5", "--no-stream"])
    captured = capsys.readouterr()
    assert code == 0
    replies = re.findall(r"assistant> (.*)", captured.out)
    assert len(replies) == 2  # two questions, the empty line skipped
    model = UniFlowChat.from_pretrained(mllm_dir)
    first = model.chat([str(image)], "<image>\nWhat shape?", max_new_tokens=5)
    second = model.chat([str(image)], [{"role": "user", "content": "<image>\nWhat shape?"},
                                       {"role": "assistant", "content": first or "..."},
                                       {"role": "user", "content": "And the colour?"}], max_new_tokens=5)
    assert replies == [first, second]


@pytest.mark.parametrize("args, pattern", [
    (["--prompt", ""], r"--prompt: empty prompt"),
    (["--prompt", "   "], r"--prompt: empty prompt"),
    (["--image", "missing.png", "--prompt", "hi"], r"--image: missing.png: image file not found"),
    (["--prompt", "hi", "--max-new-tokens", "0"], r"--max-new-tokens: .*expected a value in \[1, 4097\)"),
    (["--prompt", "hi", "--temperature", "-1"], r"--temperature: .*positive"),
    (["--prompt", "hi", "--mllm", "no/such/folder"], r"--mllm: no/such/folder is not an MLLM folder"),
])
def test_chat_bad_inputs_are_one_line(mllm_dir: Path, capsys: pytest.CaptureFixture[str], args: list[str],
                                      pattern: str) -> None:
    if "--mllm" not in args:
        args = [*args, "--mllm", str(mllm_dir)]
    try:
        code = main(["chat", *args])
    except SystemExit as exc:  # argparse usage errors
        code = int(exc.code)
    one_error_line(capsys, code, pattern)


def test_chat_unreadable_image_is_one_line(mllm_dir: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    fake = tmp_path / "fake.png"
    fake.write_text("not a png")
    code = main(["chat", "--mllm", str(mllm_dir), "--image", str(fake), "--prompt", "hi"])
    one_error_line(capsys, code, r"fake.png: cannot read image")


def test_shapeworld_vqa_command_prints_per_type_accuracy(mllm_dir: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from eval.shapeworld_vqa import main as vqa_main

    out_file = tmp_path / "vqa.json"
    code = vqa_main(["--mllm", str(mllm_dir), "--num", "2", "--max-new-tokens", "3", "--plain-max-new-tokens", "3",
                     "--where", "3", "--out", str(out_file), "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0
    for word in ("shape", "colour", "count", "position", "yes/no", "all", "plain-text questions: tuned"):
        assert word in out
    result = json.loads(out_file.read_text())
    assert result["visual"]["questions"] == 10 and result["plain"]["questions"] >= 20
    assert result["device"] == ("cuda" if torch.cuda.is_available() else "cpu")  # --device auto
    assert result["plain"]["tuned_right"] == result["plain"]["base_right"]  # a stage-1 model: the LLM untouched
    from uniflow.data.shapeworld import render_sample

    objects = [len(render_sample(0, "heldout", i).objects) for i in range(3)]
    groups = result["where"]["groups"]
    assert result["where"]["questions"] == groups["all"]["total"] == sum(objects)
    assert groups["largest"]["total"] == 3
    assert sum(row["total"] for g, row in groups.items() if g.startswith("answer ")) == sum(objects)
    assert "where is ...? for every object" in out


def test_shapeworld_vqa_refuses_a_device_that_is_not_here(mllm_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from eval.shapeworld_vqa import main as vqa_main

    code = vqa_main(["--mllm", str(mllm_dir), "--num", "1", "--device", "gpu7"])
    one_error_line(capsys, code, r"--device: 'gpu7' is not a torch device")
