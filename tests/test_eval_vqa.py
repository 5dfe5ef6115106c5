"""`uniflow eval vqa` through lmms-eval, offline, on a tiny MLLM built here (a real tiny Llama + a tokenizer the test
trains): the ShapeWorld VQA task end to end (report JSON, Markdown row), its scores against the project's own exact
match on known answers, the lmms-eval model adapter (registry, log-likelihoods), and the bad inputs (one `error:`
line, exit code 2, before any model loads)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from app.cli import main
from mllm.data import exact_match, shapeworld_questions
from mllm.model import UniFlowChat
from tests.helpers import one_error_line, save_tiny_mllm


@pytest.fixture(scope="module")
def mllm_dir(tmp_path_factory: pytest.TempPathFactory, shared_tokenizer: Any) -> Path:
    return save_tiny_mllm(tmp_path_factory.mktemp("vqa"), shared_tokenizer[1])


@pytest.fixture(scope="module")
def model(mllm_dir: Path) -> UniFlowChat:
    return UniFlowChat.from_pretrained(mllm_dir)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("UNIFLOW_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "cache"


def _report(out: Path) -> dict[str, Any]:
    files = sorted(out.glob("vqa-*.json"))
    assert len(files) == 1, files
    return json.loads(files[0].read_text())


@pytest.mark.slow
def test_shapeworld_end_to_end_offline(mllm_dir: Path, model: UniFlowChat, cache: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "reports"
    code = main(["eval", "vqa", "--mllm", str(mllm_dir), "--bench", "shapeworld", "--limit", "8", "--batch-size", "3",
                 "--out", str(out), "--no-progress"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = _report(out)
    r, s = report["results"], report["settings"]
    assert r["questions"] == 8
    assert set(r["per_type"]) == {"shape", "colour", "count", "position", "yes/no"}
    for row in r["per_type"].values():
        assert 0.0 <= row["exact"] <= 1.0 and row["total"] >= 1
    assert 0.0 <= r["metrics"]["exact"] <= 1.0
    assert s["task"] == "shapeworld_vqa" and s["limit"] == 8 and s["batch_size"] == 3 and s["decoding"] == "greedy"
    assert s["lmms_eval"] == "0.7.3" and s["generation_kwargs"]["max_new_tokens"] == 16
    assert s["data"]["shapeworld"]["num_images"] == 200 and len(s["data"]["sha256"]) == 64
    assert (cache / "vqa-data").is_dir()  # the dataset was written under $UNIFLOW_CACHE
    # The replies lmms-eval scored are the model's own greedy answers to the same questions, and their scores the
    # project's exact match.
    questions = shapeworld_questions("heldout", 2, 0)[:8]
    expected = model.generate([([q["image"]], "<image>\n" + q["question"]) for q in questions], max_new_tokens=16)
    samples = report["samples"]
    assert [x["question"] for x in samples] == [q["question"] for q in questions]
    assert [x["reply"] for x in samples] == expected
    assert [x["exact"] for x in samples] == [float(exact_match(a, q["answer"])) for a, q in zip(expected, questions)]
    table = (out / "vqa.md").read_text()
    assert table.count("| shapeworld | shapeworld_vqa |") == 1
    assert main(["eval", "report", "--out", str(out), "--no-plots"]) == 0
    assert "## vqa" in capsys.readouterr().out


@pytest.mark.slow
def test_scores_equal_the_projects_exact_match_on_known_answers(mllm_dir: Path, model: UniFlowChat, tmp_path: Path,
                                                                cache: Path) -> None:
    """A --data folder whose answers are, for some questions, the model's own replies (re-cased, punctuated): the
    lmms-eval score per type must be exactly the project's exact-match count on them."""
    from datasets import load_from_disk

    from eval.vqa import evaluate_vqa, write_shapeworld_dataset

    src = write_shapeworld_dataset(tmp_path / "sw", num_images=2, seed=0)
    ds = load_from_disk(str(src))["test"]
    replies = model.generate([([d["image"]], "<image>\n" + d["question"]) for d in ds], max_new_tokens=16)
    right = [i % 3 != 1 for i in range(len(ds))]  # two thirds answered "right" by construction
    answers = [(rep.upper() + "." if ok else d["answer"]) for rep, ok, d in zip(replies, right, ds)]
    expected = [exact_match(rep, a) for rep, a in zip(replies, answers)]
    assert any(expected) and not all(expected)
    data = tmp_path / "known"
    from datasets import DatasetDict

    DatasetDict({"test": ds.remove_columns("answer").add_column("answer", answers)}).save_to_disk(str(data))
    report = evaluate_vqa(mllm_dir, "shapeworld", data=data, batch_size=4, progress=False, model=model)
    per_type: dict[str, list[bool]] = {}
    for d, ok in zip(ds, expected):
        per_type.setdefault(d["type"], []).append(ok)
    assert report["results"]["questions"] == len(ds) == 10
    assert report["results"]["metrics"]["exact"] == pytest.approx(sum(expected) / len(expected), abs=1e-12)
    for t, oks in per_type.items():
        row = report["results"]["per_type"][t]
        assert (row["correct"], row["total"]) == (sum(oks), len(oks))
        assert row["exact"] == pytest.approx(sum(oks) / len(oks), abs=1e-12)
    assert report["settings"]["data"]["path"] == str(data)
    # And on the shipped questions: the same numbers as the project's own command (eval/shapeworld_vqa.py).
    from eval.shapeworld_vqa import visual_accuracy

    ours = visual_accuracy(model, 2, batch_size=4, max_new_tokens=16, progress=False)
    theirs = evaluate_vqa(mllm_dir, "shapeworld", limit=10, batch_size=3, progress=False, model=model)["results"]
    assert theirs["metrics"]["exact"] == pytest.approx(ours["exact"], abs=1e-12)
    assert {t: (r["correct"], r["total"]) for t, r in theirs["per_type"].items()} == \
        {t: (r["correct"], r["total"]) for t, r in ours["per_type"].items()}


def test_the_model_is_an_lmms_eval_model(mllm_dir: Path) -> None:
    from lmms_eval.models import get_model

    from eval.lmms_model import UniFlowLMMS, register
    from uniflow.errors import ConfigError

    register()
    cls = get_model("uniflow")
    assert cls is UniFlowLMMS
    lm = cls.create_from_arg_string(f"pretrained={mllm_dir},batch_size=2", {"batch_size": None, "device": None})
    assert lm.batch_size == 2 and isinstance(lm.model, UniFlowChat)
    with pytest.raises(ConfigError, match="unknown option"):
        cls.create_from_arg_string(f"pretrained={mllm_dir},temprature=0")


def test_loglikelihood_is_batch_invariant_and_greedy_aware(model: UniFlowChat) -> None:
    from lmms_eval.api.instance import Instance

    from eval.lmms_model import UniFlowLMMS

    questions = shapeworld_questions("heldout", 1, 0)
    docs = [{"image": q["image"]} for q in questions]
    lm = UniFlowLMMS(model=model, batch_size=1, progress=False)
    lm.task_dict = {"t": {"test": docs}}

    def visual(doc: dict[str, Any]) -> list[Any]:
        return [doc["image"]]

    def first_step(q: dict[str, Any]) -> torch.Tensor:  # log-probabilities of the reply's first token
        encoded, pixels = model.encode_prompt([q["image"]], "<image>\n" + q["question"])
        with torch.no_grad(), model._autocast():
            embeds = model.embed(torch.tensor([encoded.ids]), pixels)
            return torch.log_softmax(model.causal_lm(inputs_embeds=embeds).logits[0, -1].float(), -1)

    # A question whose greedy first token is a whole piece of text (byte-level BPE also has partial-character tokens)
    def whole(lp: torch.Tensor) -> bool:
        top = int(lp.argmax())
        return model.tokenizer.encode(model.tokenizer.decode([top]), add_special_tokens=False) == [top]

    k, logp = next((i, lp) for i, lp in enumerate(first_step(q) for q in questions) if whole(lp))
    greedy_text = model.tokenizer.decode([int(logp.argmax())])
    conts = [" yes", "a longer continuation of several tokens", " no", " red"]
    conts.insert(k, greedy_text)
    requests = [Instance("loglikelihood", (q["question"], c, visual, i, "t", "test"), idx=0,
                         metadata={"task": "t", "doc_id": i, "repeats": 1})
                for i, (q, c) in enumerate(zip(questions, conts))]
    one = lm.loglikelihood(requests)
    lm.batch_size = 4
    batched = lm.loglikelihood(requests)
    for (a, ga), (b, gb) in zip(one, batched):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb
    assert one[k][0] == pytest.approx(float(logp.max()), abs=1e-4) and one[k][1] is True
    assert all(v <= 0 for v, _ in one) and not one[conts.index("a longer continuation of several tokens")][1]


def test_prompt_helpers() -> None:
    from eval.lmms_model import cut_at_stops, with_placeholders
    from uniflow.errors import ConfigError

    assert with_placeholders("What?", 2, "t") == "<image><image>\nWhat?"
    assert with_placeholders("<image> What?", 1, "t") == "<image> What?"
    with pytest.raises(ConfigError, match="1 <image> placeholder"):
        with_placeholders("<image> What?", 2, "t")
    assert cut_at_stops("red.\n\nMore", ["\n\n"]) == "red." and cut_at_stops("red", []) == "red"


@pytest.mark.parametrize("args, pattern", [
    (["--bench", "nope"], r"--bench: unknown benchmark 'nope'; expected one of shapeworld, pope, .*mmvet"),
    (["--bench", "pope", "--data", "missing/folder"], r"--data: missing/folder not found; expected a folder written "
                                                      r"by `datasets` save_to_disk"),
    (["--bench", "shapeworld", "--mllm", "no/such/mllm"], r"--mllm: no/such/mllm is not an MLLM folder"),
    (["--bench", "mmvet"], r"--bench mmvet: scored by a GPT judge .*set OPENAI_API_KEY"),
    (["--bench", "pope", "--num-images", "3"], r"--num-images and --data-seed .* --bench shapeworld without --data"),
    (["--bench", "shapeworld", "--limit", "0"], r"--limit: .*expected"),
])
def test_bad_inputs(args: list[str], pattern: str, mllm_dir: Path, tmp_path: Path, cache: Path,
                    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("API_TYPE", raising=False)
    if "--mllm" not in args:
        args = ["--mllm", str(mllm_dir), *args]
    try:
        code = main(["eval", "vqa", *args, "--out", str(tmp_path / "out")])
    except SystemExit as exc:  # argparse usage errors
        code = int(exc.code)
    one_error_line(capsys, code, pattern)
    assert not (tmp_path / "out").exists()


def test_data_folder_layout_and_split(mllm_dir: Path, tmp_path: Path, cache: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    from datasets import Dataset, DatasetDict

    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "data.json").write_text("[]")
    code = main(["eval", "vqa", "--mllm", str(mllm_dir), "--bench", "shapeworld", "--data", str(plain)])
    one_error_line(capsys, code, r"--data: .*plain has no dataset_dict.json; expected a folder written by `datasets`")
    wrong = tmp_path / "wrong_split"
    DatasetDict({"train": Dataset.from_dict({"question": ["q"], "answer": ["a"]})}).save_to_disk(str(wrong))
    capsys.readouterr()
    code = main(["eval", "vqa", "--mllm", str(mllm_dir), "--bench", "shapeworld", "--data", str(wrong),
                 "--out", str(tmp_path / "out")])
    one_error_line(capsys, code, r"--data: .*wrong_split has split\(s\) \['train'\], the shapeworld_vqa task reads "
                                 r"'test'")


@pytest.mark.slow
def test_named_benchmark_reads_a_local_copy(mllm_dir: Path, tmp_path: Path, cache: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """--data points lmms-eval's own POPE task (its prompts, its scorer) at a local folder in POPE's layout, offline:
    here ShapeWorld's yes/no questions."""
    from datasets import Dataset, DatasetDict, Features, Image, Value

    rows = [q for q in shapeworld_questions("heldout", 12, 0) if q["type"] == "yes/no"][:6]
    features = Features({"question_id": Value("string"), "question": Value("string"), "answer": Value("string"),
                         "image": Image(), "category": Value("string")})
    data = tmp_path / "pope"
    DatasetDict({"test": Dataset.from_dict({"question_id": [str(i) for i in range(len(rows))],
                                            "question": [q["question"] for q in rows],
                                            "answer": [q["answer"] for q in rows],
                                            "image": [q["image"] for q in rows],
                                            "category": ["shapeworld"] * len(rows)}, features=features)
                 }).save_to_disk(str(data))
    out = tmp_path / "reports"
    code = main(["eval", "vqa", "--mllm", str(mllm_dir), "--bench", "pope", "--data", str(data), "--out", str(out),
                 "--batch-size", "6", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    report = _report(out)
    metrics = report["results"]["metrics"]
    assert report["results"]["questions"] == 6 and report["settings"]["task"] == "pope"
    assert {"pope_accuracy", "pope_precision", "pope_recall", "pope_f1_score", "pope_yes_ratio"} <= set(metrics)
    assert 0.0 <= metrics["pope_accuracy"] <= 1.0
    assert report["settings"]["data"]["path"] == str(data) and report["settings"]["data"]["split"] == "test"


def test_a_copy_of_another_benchmark_is_refused(mllm_dir: Path, tmp_path: Path, cache: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    from datasets import Dataset, DatasetDict

    from eval.vqa import write_shapeworld_dataset

    sw = write_shapeworld_dataset(tmp_path / "sw", num_images=1)
    code = main(["eval", "vqa", "--mllm", str(mllm_dir), "--bench", "pope", "--data", str(sw),
                 "--out", str(tmp_path / "out")])
    one_error_line(capsys, code, r"--data: the documents in .*sw do not fit the pope task \(AssertionError; "
                                 r"columns: question_id, index, type, question, answer, image\); is it a copy of "
                                 r"another benchmark's dataset\?")  # POPE's scorer asserts yes/no answers
    other = tmp_path / "other"
    DatasetDict({"test": Dataset.from_dict({"question": ["q"], "answer": ["a"], "image": [None]})}).save_to_disk(
        str(other))
    capsys.readouterr()
    code = main(["eval", "vqa", "--mllm", str(mllm_dir), "--bench", "shapeworld", "--data", str(other),
                 "--out", str(tmp_path / "out")])
    one_error_line(capsys, code, r"do not fit the shapeworld_vqa task")
    assert not (tmp_path / "out").exists()


def test_shapeworld_data_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from datasets import load_from_disk

    from eval.vqa import main as vqa_main

    dest = tmp_path / "sw"
    assert vqa_main(["shapeworld-data", str(dest), "--num-images", "2", "--seed", "3"]) == 0
    test = load_from_disk(str(dest))["test"]
    questions = shapeworld_questions("heldout", 2, 3)
    assert test["question"] == [q["question"] for q in questions] and test["answer"] == [q["answer"] for q in questions]
    assert json.loads((dest / "uniflow_vqa.json").read_text())["seed"] == 3
    capsys.readouterr()
    code = vqa_main(["shapeworld-data", str(dest)])
    one_error_line(capsys, code, r"sw: exists and is not empty; give a new folder")
