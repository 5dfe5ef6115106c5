"""Document functions of the ShapeWorld VQA lmms-eval task (shapeworld_vqa.yaml): the image, the question, and the
exact-match score overall and under the question's type (`exact_<type>`, "yes/no" as `exact_yes_no`)."""

from __future__ import annotations

from typing import Any


def doc_to_visual(doc: dict[str, Any]) -> list[Any]:
    return [doc["image"].convert("RGB")]


def doc_to_text(doc: dict[str, Any], lmms_eval_specific_kwargs: dict[str, Any] | None = None) -> str:
    return doc["question"]


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    from eval.vqa import type_metric
    from mllm.data import exact_match

    score = float(exact_match(results[0], doc["answer"]))
    return {"exact": score, type_metric(doc["type"]): score}
