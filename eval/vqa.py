"""Understanding benchmarks through lmms-eval (`uniflow eval vqa`): the MLLM is registered as an lmms-eval model
(`eval/lmms_model.py`) and the benchmark's lmms-eval task runs as it is, with the task's own official scorer. Nothing
is scored here again; the ShapeWorld VQA task (`eval/lmms_tasks/shapeworld_vqa/`) is the project's own benchmark,
defined on a local `datasets` folder of held-out ShapeWorld questions, and scored by the project's exact match.

`--data DIR` points any benchmark at a local copy of its dataset, saved with `datasets` (`save_to_disk`): the task
then reads it with `load_from_disk` (lmms-eval's offline mode), with the same scoring. Without it, a hub benchmark is
downloaded by `datasets`, which needs the network.

    python -m eval.vqa shapeworld-data DIR [--num-images 200] [--seed 0]   # write the ShapeWorld VQA dataset
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from uniflow.errors import ConfigError

TASKS_DIR = Path(__file__).resolve().parent / "lmms_tasks"
SHAPEWORLD_TASK = "shapeworld_vqa"
SHAPEWORLD_META = "uniflow_vqa.json"
SHAPEWORLD_DEFAULT_IMAGES = 200  # 5 questions each: the held-out set of eval/shapeworld_vqa.py
DATA_LAYOUT = ("a folder written by `datasets` save_to_disk: dataset_dict.json and one folder per split "
               "(e.g. `datasets.load_dataset(NAME).save_to_disk(DIR)` on a machine with network)")
TASK_PREFIX = "task:"


@dataclass(frozen=True)
class Benchmark:
    """A named benchmark: its lmms-eval task, and what scores it (None: the task's rules, offline; otherwise the
    judge it calls, which needs an API key)."""

    task: str
    what: str
    judge: str | None = None


BENCHMARKS: dict[str, Benchmark] = {
    "shapeworld": Benchmark(SHAPEWORLD_TASK, "held-out ShapeWorld questions (local, offline), exact match per type"),
    "pope": Benchmark("pope", "POPE object hallucination (accuracy, F1)"),
    "gqa": Benchmark("gqa", "GQA testdev-balanced (exact match)"),
    "textvqa": Benchmark("textvqa_val", "TextVQA val (VQA accuracy)"),
    "vqav2": Benchmark("vqav2_val", "VQAv2 val (VQA accuracy)"),
    "mme": Benchmark("mme", "MME perception and cognition scores"),
    "mmbench": Benchmark("mmbench_en_dev", "MMBench-EN dev", "GPT extracts the option when the reply is not one"),
    "mmbench_static": Benchmark("mmbench_en_dev_static", "MMBench-EN dev, option extracted by rules only"),
    "seedbench": Benchmark("seedbench", "SEED-Bench (image and video accuracy)"),
    "scienceqa": Benchmark("scienceqa_img", "ScienceQA-IMG (exact match)"),
    "mmmu": Benchmark("mmmu_val", "MMMU val (accuracy)"),
    "ai2d": Benchmark("ai2d", "AI2D diagrams (exact match)"),
    "chartqa": Benchmark("chartqa", "ChartQA (relaxed accuracy)"),
    "mmstar": Benchmark("mmstar", "MMStar (accuracy)"),
    "mmvet": Benchmark("mmvet", "MM-Vet", "GPT-4 grades every answer"),
    "llava_bench": Benchmark("llava_in_the_wild", "LLaVA-Bench (in the wild)", "GPT-4 rates every answer against "
                             "a reference answer"),
}


def type_metric(question_type: str) -> str:
    """The ShapeWorld task's metric of a question type: "shape" -> "exact_shape", "yes/no" -> "exact_yes_no"."""
    return "exact_" + "".join(c if c.isalnum() else "_" for c in question_type)


def benchmarks_help() -> str:
    """The table `uniflow eval vqa --help` prints."""
    lines = ["benchmarks (--bench NAME -> lmms-eval task):"]
    for name, b in BENCHMARKS.items():
        judge = f"  [GPT judge: {b.judge}; needs OPENAI_API_KEY]" if b.judge else ""
        lines.append(f"  {name:<15} {b.task:<22} {b.what}{judge}")
    lines.append(f"  {TASK_PREFIX}NAME{'':<10} any other lmms-eval task by its name (its own scorer; judge tasks "
                 f"need their API key)")
    return "\n".join(lines)


def resolve_bench(name: str) -> tuple[str, Benchmark | None]:
    """(lmms-eval task name, the named benchmark or None for `task:NAME`); an unknown name is a one-line error."""
    if name in BENCHMARKS:
        return BENCHMARKS[name].task, BENCHMARKS[name]
    if name.startswith(TASK_PREFIX) and name[len(TASK_PREFIX):].strip():
        return name[len(TASK_PREFIX):].strip(), None
    raise ConfigError(f"--bench: unknown benchmark {name!r}; expected one of {', '.join(BENCHMARKS)} or "
                      f"{TASK_PREFIX}<lmms-eval task name>")


def check_judge(bench: str, benchmark: Benchmark | None) -> None:
    """A judge benchmark without its API key fails now, not after answering every question."""
    if benchmark is None or benchmark.judge is None:
        return
    api = os.environ.get("API_TYPE", "openai")
    key = "AZURE_API_KEY" if api == "azure" else "OPENAI_API_KEY"
    if not os.environ.get(key, "").strip():
        raise ConfigError(f"--bench {bench}: scored by a GPT judge ({benchmark.judge}); set {key} (and MODEL_VERSION "
                          f"for the judge model, API_TYPE=azure for Azure), or pick a benchmark without a judge")


def check_data_folder(data: str | Path, flag: str = "--data") -> Path:
    """A `datasets` save_to_disk folder (a DatasetDict: dataset_dict.json), else a one-line error naming the layout."""
    path = Path(data).expanduser()
    if not path.exists():
        raise ConfigError(f"{flag}: {path} not found; expected {DATA_LAYOUT}")
    if not path.is_dir():
        raise ConfigError(f"{flag}: {path} is a file; expected {DATA_LAYOUT}")
    if not (path / "dataset_dict.json").is_file():
        raise ConfigError(f"{flag}: {path} has no dataset_dict.json; expected {DATA_LAYOUT}")
    return path


def data_splits(path: Path) -> list[str]:
    try:
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
    except (OSError, json.JSONDecodeError, AttributeError):
        raise ConfigError(f"--data: {path / 'dataset_dict.json'} is not a readable datasets index") from None
    return [str(s) for s in splits]


# ------------------------------------------------------------------------------------------------- ShapeWorld data
def shapeworld_data_dir(num_images: int, seed: int) -> Path:
    """Where `uniflow eval vqa --bench shapeworld` keeps the dataset it writes when no --data is given:
    $UNIFLOW_CACHE/vqa-data/... (default ~/.cache/uniflow/vqa-data/...)."""
    base = os.environ.get("UNIFLOW_CACHE", "").strip()
    root = Path(base).expanduser() if base else Path.home() / ".cache" / "uniflow"
    return root / "vqa-data" / f"shapeworld-heldout-seed{seed}-{num_images}img"


def write_shapeworld_dataset(dest: str | Path, num_images: int = SHAPEWORLD_DEFAULT_IMAGES, seed: int = 0) -> Path:
    """The ShapeWorld VQA dataset: every question of the first `num_images` held-out images (the questions of
    `mllm.data.shapeworld_questions`, which eval/shapeworld_vqa.py asks), as a DatasetDict with a `test` split
    (image, question, answer, type, index, question_id) saved with `datasets`, and its settings in
    uniflow_vqa.json. Written atomically; an existing folder that is not this dataset is refused."""
    import datasets
    from datasets import Dataset, DatasetDict, Features, Image, Value

    from mllm.data import shapeworld_questions
    from uniflow.errors import OutputError
    from uniflow.fileio import atomic_write_dir

    dest = Path(dest)
    if dest.exists() and any(dest.iterdir()):
        raise OutputError(f"{dest}: exists and is not empty; give a new folder")
    questions = shapeworld_questions("heldout", num_images, seed)
    features = Features({"question_id": Value("int64"), "index": Value("int64"), "type": Value("string"),
                         "question": Value("string"), "answer": Value("string"), "image": Image()})
    columns: dict[str, list[Any]] = {k: [] for k in features}
    for i, q in enumerate(questions):
        columns["question_id"].append(i)
        for key in ("index", "type", "question", "answer", "image"):
            columns[key].append(q[key])
    meta = {"bench": "shapeworld", "task": SHAPEWORLD_TASK, "split": "heldout", "seed": seed, "num_images": num_images,
            "questions": len(questions), "generator": "mllm.data.shapeworld_questions"}

    def write(tmp: Path) -> None:
        DatasetDict({"test": Dataset.from_dict(columns, features=features)}).save_to_disk(str(tmp))
        (tmp / SHAPEWORLD_META).write_text(json.dumps(meta, indent=1) + "\n")

    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()  # a second of work: no bar
    try:
        return atomic_write_dir(dest, write)
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


def shapeworld_dataset(num_images: int, seed: int) -> Path:
    """The cached ShapeWorld VQA dataset for these settings, written on first use."""
    path = shapeworld_data_dir(num_images, seed)
    if not (path / SHAPEWORLD_META).is_file():
        if path.exists() and any(path.iterdir()):  # a half-written or foreign folder: never reused
            raise ConfigError(f"{path}: not a complete ShapeWorld VQA dataset; remove it and run again")
        write_shapeworld_dataset(path, num_images, seed)
    return path


def folder_fingerprint(path: Path) -> str:
    """SHA-256 over the folder's files (relative names and contents): which copy of a dataset was scored."""
    digest = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(f.relative_to(path)).encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------------- running
def _offline() -> None:
    """Local data: nothing may reach a hub (lmms-eval's loaders and `datasets` honour these)."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(var, "1")


def _skip_filelock_patch() -> None:
    """lmms-eval 0.7.3's `simple_evaluate` first patches filelock's internals (`filelock._api`, against a lock
    deadlock between ranks on a shared file system); filelock 4 has no such module and the call fails. With filelock 4
    installed the patch is marked done (its own guard), which one process needs no more than before."""
    try:
        import filelock._api  # noqa: F401
    except ImportError:
        import lmms_eval.evaluator as evaluator

        evaluator._enable_reentrant_filelocks._patched = True


def _number(value: Any) -> Any:
    try:
        import numpy as np

        if isinstance(value, np.generic):
            return value.item()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(value, dict):
        return {str(k): _number(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_number(v) for v in value]
    return value if isinstance(value, (int, float, str, bool)) or value is None else str(value)


def task_metrics(entry: dict[str, Any]) -> dict[str, Any]:
    """lmms-eval's result entry ({"metric,filter": value, "metric_stderr,filter": ...}) -> {metric: value}."""
    out = {}
    for key, value in entry.items():
        if "," not in key:
            continue
        metric, _, filt = key.partition(",")
        if "_stderr" in metric:  # stderr variants (bootstrap, CLT, clustered): the report keeps the scores
            continue
        out[metric if filt == "none" else f"{metric},{filt}"] = _number(value)
    return out


def load_task(spec: dict[str, Any], manager: Any, bench: str, benchmark: Benchmark | None) -> list[Any]:
    """The task built (its dataset loaded) before the model loads, so that a dataset that cannot be had (no network,
    a foreign --data folder) is one error line naming the way out. Returns what `simple_evaluate` takes: the built
    task, or the spec again for a group (lmms-eval builds groups itself)."""
    from lmms_eval.api.task import Task
    from lmms_eval.tasks import get_task_dict

    from uniflow.errors import UniFlowError

    try:
        built = get_task_dict([dict(spec)], manager)
    except UniFlowError:
        raise
    except Exception as exc:  # datasets' and the hub's errors: offline, not found, unreadable, missing columns
        where = f"the folder {spec['dataset_path']}" if "dataset_path" in spec else "the hub (needs network)"
        raise ConfigError(f"--bench {bench}: lmms-eval could not load the {spec['task']} task's dataset from {where} "
                          f"({_describe(exc, 300)}); without network, give --data DIR, a local copy saved with "
                          f"datasets") from exc
    if len(built) == 1 and all(isinstance(k, str) and isinstance(v, Task) for k, v in built.items()):
        if "dataset_path" in spec:
            probe_documents(next(iter(built.values())), spec, scored_here=benchmark is not None and not benchmark.judge)
        return list(built.values())
    return [spec]


def probe_documents(task: Any, spec: dict[str, Any], scored_here: bool) -> None:
    """The task's own document functions on the first document of a --data folder, before the model loads: a copy of
    another benchmark (other columns) is one error line, not a traceback after every answer. Scoring is tried too
    (on an empty reply) when no judge is involved."""
    where = f"--data: the documents in {spec['dataset_path']}"
    docs = task.test_docs() if task.has_test_docs() else None
    if docs is None or len(docs) == 0:
        raise ConfigError(f"{where}: none in the split the {spec['task']} task reads")
    doc = docs[0]
    try:
        task.doc_to_text(doc)
        task.doc_to_visual(doc)
        task.doc_to_target(doc)
        if scored_here:  # lmms-eval retries process_results (for judges); a probe needs one try
            process = getattr(type(task).process_results, "__wrapped__", None)
            process(task, doc, [""]) if process is not None else task.process_results(doc, [""])
    except Exception as exc:
        raise ConfigError(f"{where} do not fit the {spec['task']} task ({_describe(exc, 200)}; columns: "
                          f"{', '.join(docs.column_names)}); is it a copy of another benchmark's dataset?") from exc


def _describe(exc: BaseException, limit: int) -> str:
    """`Type: message` of an error, through lmms-eval's retry wrapper (tenacity's RetryError) to the real one."""
    from uniflow.errors import one_line

    last = getattr(exc, "last_attempt", None)
    if last is not None and last.exception() is not None:
        exc = last.exception()
    text = one_line(str(exc))[:limit]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def mllm_record(folder: Path, model: Any) -> dict[str, Any]:
    from uniflow.checkpoint import CONFIG_NAME

    config = folder / CONFIG_NAME
    return {"path": str(folder), "config_sha256": hashlib.sha256(config.read_bytes()).hexdigest()
            if config.is_file() else None, "llm": str(model.config.llm.path), "llm_tuning": model.config.llm_tuning,
            "projector": model.config.projector.type, "tokens_per_image": model.tokens_per_image,
            "image_size": model.image_size}


def evaluate_vqa(mllm: str | Path, bench: str, data: str | Path | None = None, limit: int | None = None,
                 batch_size: int = 8, device: str = "cpu", num_images: int = SHAPEWORLD_DEFAULT_IMAGES,
                 seed: int = 0, progress: bool = True, model: Any = None) -> dict[str, Any]:
    """Run one benchmark's lmms-eval task on the MLLM folder and return the report (kind "vqa"): the exact
    settings (MLLM, task, data folder and its fingerprint, limit, batch, generation settings, lmms-eval version) and
    the task's metrics; for ShapeWorld the per-type exact match and every question's reply."""
    from importlib.metadata import version

    task, benchmark = resolve_bench(bench)
    check_judge(bench, benchmark)
    data_path = None
    if data is not None:
        data_path = check_data_folder(data)
    elif task == SHAPEWORLD_TASK:
        data_path = shapeworld_dataset(num_images, seed)
    if data_path is not None:
        _offline()

    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    from eval.lmms_model import UniFlowLMMS, register

    register()
    _skip_filelock_patch()
    manager = TaskManager("WARNING", include_path=str(TASKS_DIR), include_defaults=task != SHAPEWORLD_TASK)
    if task not in manager.all_tasks:
        raise ConfigError(f"--bench {bench}: lmms-eval {version('lmms_eval')} has no task {task!r}")
    spec: dict[str, Any] = {"task": task}
    if data_path is not None:
        spec.update(dataset_path=str(data_path), dataset_kwargs={"load_from_disk": True})
        try:
            split = manager._get_config(task).get("test_split")  # the split the task reads
        except Exception:  # a group or a python task: lmms-eval reports a missing split itself
            split = None
        if split and split not in data_splits(data_path):
            raise ConfigError(f"--data: {data_path} has split(s) {data_splits(data_path)}, the {task} task reads "
                              f"{split!r}; save the benchmark's dataset with that split")
    tasks_arg = load_task(spec, manager, bench, benchmark)
    if model is None:
        from mllm.model import UniFlowChat

        model = UniFlowChat.from_pretrained(mllm, device=device)
    lm = UniFlowLMMS(pretrained=str(mllm), batch_size=batch_size, model=model, progress=progress)
    t0 = time.perf_counter()
    out = simple_evaluate(model=lm, tasks=tasks_arg, limit=limit, batch_size=batch_size, task_manager=manager,
                          log_samples=True, bootstrap_iters=0, verbosity="WARNING", process_docs_parallel=1,
                          device=device)
    seconds = time.perf_counter() - t0
    if out is None:
        raise ConfigError("lmms-eval returned no results (not the main process?)")
    tasks = {name: task_metrics(entry) for name, entry in out["results"].items()}
    n_samples = out.get("n-samples", {}).get(task, {})
    config = out.get("configs", {}).get(task, {})
    samples = out.get("samples", {}).get(task, [])
    questions = int(n_samples.get("effective") or len(samples) or 0)
    results: dict[str, Any] = {"questions": questions, "metrics": tasks.get(task, {}), "seconds": round(seconds, 2),
                               "seconds_per_question": round(seconds / questions, 4) if questions else None}
    if len(tasks) > 1:  # a group: every sub-task's metrics
        results["tasks"] = tasks
    report: dict[str, Any] = {"kind": "vqa", "results": results}
    data_record: dict[str, Any] = {"source": "hub (datasets)" if data_path is None else "folder",
                                   "path": None if data_path is None else str(data_path),
                                   "split": config.get("test_split"), "documents": n_samples.get("original")}
    if data_path is not None:
        data_record["sha256"] = folder_fingerprint(data_path)
        meta = data_path / SHAPEWORLD_META
        if meta.is_file():
            data_record["shapeworld"] = json.loads(meta.read_text())
    if task == SHAPEWORLD_TASK:
        rows = []
        for s in samples:
            doc = s.get("doc", {})
            reply = s.get("filtered_resps", [""])[0]
            rows.append({"question_id": doc.get("question_id"), "index": doc.get("index"), "type": doc.get("type"),
                         "question": doc.get("question"), "answer": doc.get("answer"),
                         "reply": reply if isinstance(reply, str) else str(reply), "exact": s.get("exact")})
        rows.sort(key=lambda r: (r["question_id"] is None, r["question_id"]))
        per_type: dict[str, dict[str, Any]] = {}
        for r in rows:
            t = per_type.setdefault(r["type"], {"correct": 0, "total": 0})
            t["correct"] += int(r["exact"] or 0)
            t["total"] += 1
        results["per_type"] = {k: {**v, "exact": results["metrics"].get(type_metric(k))}
                               for k, v in sorted(per_type.items())}
        report["samples"] = rows
    report["settings"] = {
        "mllm": mllm_record(Path(mllm), model), "bench": bench, "task": task,
        "judge": benchmark.judge if benchmark else "per the lmms-eval task",
        "scorer": f"lmms-eval task {task}" + (" (mllm.data.exact_match)" if task == SHAPEWORLD_TASK else ""),
        "data": data_record, "limit": limit, "batch_size": batch_size, "device": str(device),
        "decoding": "greedy", "generation_kwargs": _number(config.get("generation_kwargs")),
        "lmms_eval": version("lmms_eval"), "datasets": version("datasets"), "transformers": version("transformers"),
    }
    return report


def summary_table(report: dict[str, Any]) -> str:
    """The metrics as a small table for the terminal."""
    r = report["results"]
    lines = [f"{report['settings']['bench']} ({report['settings']['task']}): {r['questions']} questions, "
             f"{r['seconds']:.1f} s"]
    for name, value in r["metrics"].items():
        lines.append(f"  {name:<24} {value:.4f}" if isinstance(value, float) else f"  {name:<24} {value}")
    for t, row in r.get("per_type", {}).items():
        lines.append(f"  type {t:<19} {row['correct']}/{row['total']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.vqa", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("shapeworld-data", help="write the ShapeWorld VQA dataset (datasets save_to_disk)")
    p.add_argument("out", help="a new folder")
    p.add_argument("--num-images", type=int, default=SHAPEWORLD_DEFAULT_IMAGES, help="held-out images (5 questions "
                   "each)")
    p.add_argument("--seed", type=int, default=0, help="ShapeWorld seed")
    args = parser.parse_args(argv)

    def run(args: argparse.Namespace) -> int:
        from uniflow.configs import check_int

        check_int("--num-images", args.num_images, 1)
        check_int("--seed", args.seed, 0)
        path = write_shapeworld_dataset(args.out, args.num_images, args.seed)
        print(f"written: {path} ({5 * args.num_images} questions)")
        return 0

    from uniflow.errors import run_command

    return run_command(run, args)


if __name__ == "__main__":
    sys.exit(main())
