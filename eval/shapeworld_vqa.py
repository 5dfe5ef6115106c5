"""The ShapeWorld MLLM's two checks, in one command:

1. Held-out visual questions: every question (shape, colour, count, position, yes/no) of the first `--num` held-out
   ShapeWorld images, asked alone with its image, answered greedily, scored by exact match after normalisation
   (case, punctuation, number words: `mllm.data.normalize_answer`). Targets: >= 90% overall, >= 80% per type.
2. Language kept: the plain-text questions of `eval/data/plain_questions.json` (short known answers), asked with no
   image to the tuned model and to its base LLM (the same model with the LoRA switched off); a reply is right when an
   accepted answer appears in it as whole words. Target: tuned >= base - 1.

With `--where N`, a diagnosis of position besides: "where is the <colour> <shape>?" for every object of the first N
held-out images (the visual questions above ask about one object per image), broken down by the number of objects,
largest object or not, and the right answer (center, top left, ...).

    python -m eval.shapeworld_vqa --mllm checkpoints/shapeworld/mllm [--num 200] [--where 300] [--out result.json]

`--device auto` (the default) answers on the GPU when there is one.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

PLAIN_QUESTIONS = Path(__file__).resolve().parent / "data" / "plain_questions.json"
OVERALL_TARGET, TYPE_TARGET = 0.90, 0.80


def answered(model: Any, items: list[dict[str, Any]], batch_size: int, max_new_tokens: int, desc: str,
             progress: bool = True) -> Iterator[tuple[dict[str, Any], str]]:
    """(item, greedy reply) for items {"image", "question", ...}, each asked alone with its image, in batches."""
    from tqdm import tqdm

    with tqdm(total=len(items), desc=desc, unit="q", file=sys.stderr, disable=not progress) as bar:
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            replies = model.generate([([it["image"]], "<image>\n" + it["question"]) for it in chunk],
                                     max_new_tokens=max_new_tokens)
            yield from zip(chunk, replies)
            bar.update(len(chunk))


def visual_accuracy(model: Any, num_images: int, batch_size: int, max_new_tokens: int, seed: int = 0,
                    progress: bool = True) -> dict[str, Any]:
    """Per-type and overall exact-match accuracy on held-out ShapeWorld questions (batched greedy answers)."""
    from mllm.data import exact_match, shapeworld_questions

    questions = shapeworld_questions("heldout", num_images, seed)
    per_type: dict[str, list[int]] = {}
    wrong: list[dict[str, str]] = []
    for q, a in answered(model, questions, batch_size, max_new_tokens, "questions", progress):
        ok = exact_match(a, q["answer"])
        per_type.setdefault(q["type"], [0, 0])
        per_type[q["type"]][0] += int(ok)
        per_type[q["type"]][1] += 1
        if not ok and len(wrong) < 20:
            wrong.append({"index": q["index"], "question": q["question"], "answer": q["answer"], "reply": a})
    correct = sum(c for c, _ in per_type.values())
    total = sum(n for _, n in per_type.values())
    return {"questions": total, "exact": correct / max(total, 1),
            "per_type": {t: {"correct": c, "total": n, "exact": c / max(n, 1)}
                         for t, (c, n) in sorted(per_type.items())},
            "examples_wrong": wrong}


def where_accuracy(model: Any, num_images: int, batch_size: int, max_new_tokens: int, seed: int = 0,
                   progress: bool = True) -> dict[str, Any]:
    """Exact match of "where is ...?" for every object of the first `num_images` held-out images, grouped by the
    number of objects in the image, by whether the object is the largest, and by the right answer."""
    from mllm.data import exact_match
    from uniflow.data.shapeworld import render_sample, where_question

    items = []
    for index in range(num_images):
        sample = render_sample(seed, "heldout", index)
        for k, o in enumerate(sample.objects):
            items.append({"image": sample.image, "question": where_question(o), "answer": o.position,
                          "groups": (f"{len(sample.objects)} object(s)", "largest" if k == 0 else "not largest",
                                     f"answer {o.position}")})
    groups: dict[str, list[int]] = {}
    for it, reply in answered(model, items, batch_size, max_new_tokens, "where", progress):
        ok = int(exact_match(reply, it["answer"]))
        for g in ("all", *it["groups"]):
            groups.setdefault(g, [0, 0])
            groups[g][0] += ok
            groups[g][1] += 1
    return {"questions": len(items),
            "groups": {g: {"correct": c, "total": n, "exact": c / max(n, 1)} for g, (c, n) in groups.items()}}


def plain_accuracy(model: Any, path: Path, max_new_tokens: int) -> dict[str, Any]:
    """Right answers of the tuned model and of its base (LoRA off) on the plain-text questions."""
    from mllm.data import contains_answer

    items = json.loads(Path(path).read_text())
    prompts = [(None, item["question"]) for item in items]
    tuned = model.generate(prompts, max_new_tokens=max_new_tokens)
    if model.config.llm_tuning == "lora":
        with model.llm.disable_adapter():
            base = model.generate(prompts, max_new_tokens=max_new_tokens)
    else:  # a stage-1 model leaves the LLM untouched: its base answers are its own
        base = tuned
    rows = [{"question": it["question"], "answers": it["answers"], "tuned": t, "base": b,
             "tuned_right": contains_answer(t, it["answers"]), "base_right": contains_answer(b, it["answers"])}
            for it, t, b in zip(items, tuned, base)]
    return {"questions": len(rows), "tuned_right": sum(r["tuned_right"] for r in rows),
            "base_right": sum(r["base_right"] for r in rows), "rows": rows}


def print_report(visual: dict[str, Any] | None, plain: dict[str, Any] | None,
                 where: dict[str, Any] | None = None) -> bool:
    """The tables; returns whether every target is met (the `--where` diagnosis has no target)."""
    ok = True
    if visual is not None:
        print(f"{'type':<10} {'correct':>8} {'total':>6} {'exact':>7}")
        for t, row in visual["per_type"].items():
            print(f"{t:<10} {row['correct']:>8} {row['total']:>6} {100 * row['exact']:>6.1f}%")
        print(f"{'all':<10} {round(visual['exact'] * visual['questions']):>8} {visual['questions']:>6} "
              f"{100 * visual['exact']:>6.1f}%")
        met = visual["exact"] >= OVERALL_TARGET and all(r["exact"] >= TYPE_TARGET for r in visual["per_type"].values())
        print(f"targets (>= {OVERALL_TARGET:.0%} overall, >= {TYPE_TARGET:.0%} per type): "
              f"{'met' if met else 'NOT met'}")
        ok &= met
    if plain is not None:
        met = plain["tuned_right"] >= plain["base_right"] - 1
        print(f"plain-text questions: tuned {plain['tuned_right']}/{plain['questions']} right, base "
              f"{plain['base_right']}/{plain['questions']} (target: tuned >= base - 1: {'met' if met else 'NOT met'})")
        ok &= met
    if where is not None:
        print(f"where is ...? for every object ({where['questions']} questions):")
        for g, row in sorted(where["groups"].items(), key=lambda kv: (kv[0] != "all", kv[0])):
            print(f"  {g:<20} {row['correct']:>5} / {row['total']:<5} {100 * row['exact']:>6.1f}%")
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.shapeworld_vqa", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mllm", default="checkpoints/shapeworld/mllm", help="MLLM folder")
    parser.add_argument("--num", type=int, default=200, help="held-out images (5 questions each; 0: none)")
    parser.add_argument("--where", type=int, default=0,
                        help="also ask where every object is, on this many held-out images (0: skip)")
    parser.add_argument("--batch-size", type=int, default=16, help="questions answered together")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--plain", default=str(PLAIN_QUESTIONS), help="plain-text questions (JSON list)")
    parser.add_argument("--no-plain", action="store_true", help="skip the plain-text language check")
    parser.add_argument("--plain-max-new-tokens", type=int, default=48)
    parser.add_argument("--device", default="auto", help="auto (the GPU when there is one), cpu, cuda or cuda:N")
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    def run(args: argparse.Namespace) -> int:
        from mllm.model import UniFlowChat
        from uniflow.checkpoint import check_output_dir
        from uniflow.configs import check_int
        from uniflow.devices import resolve_device
        from uniflow.errors import ConfigError

        check_int("--num", args.num, 0)
        check_int("--where", args.where, 0)
        check_int("--batch-size", args.batch_size, 1, 1025)
        check_int("--max-new-tokens", args.max_new_tokens, 1, 4097)
        check_int("--plain-max-new-tokens", args.plain_max_new_tokens, 1, 4097)
        if not args.no_plain and not Path(args.plain).is_file():
            raise ConfigError(f"--plain: {args.plain} not found")
        if args.out is not None:
            check_output_dir(Path(args.out).parent or Path("."), "--out")
        device = resolve_device(args.device)
        t0 = time.perf_counter()
        model = UniFlowChat.from_pretrained(args.mllm, device=device)
        visual = visual_accuracy(model, args.num, args.batch_size, args.max_new_tokens,
                                 progress=not args.no_progress) if args.num else None
        plain = None if args.no_plain else plain_accuracy(model, Path(args.plain), args.plain_max_new_tokens)
        where = where_accuracy(model, args.where, args.batch_size, args.max_new_tokens,
                               progress=not args.no_progress) if args.where else None
        ok = print_report(visual, plain, where)
        if args.out:
            from uniflow.fileio import atomic_write_text

            result = {"mllm": str(args.mllm), "device": str(device), "visual": visual, "plain": plain, "where": where,
                      "targets_met": ok, "seconds": round(time.perf_counter() - t0, 1)}
            atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
        return 0

    from uniflow.errors import run_command

    return run_command(run, args)


if __name__ == "__main__":
    sys.exit(main())
