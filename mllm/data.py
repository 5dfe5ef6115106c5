"""Conversation data for the MLLM: LLaVA JSON files and ShapeWorld rendered on demand, tokenized with exact label
masks (`mllm.prompting`), collated into right-padded batches; and the answer normalisation of exact-match scoring.

LLaVA JSON: a list of records {"image": path (or a list of paths, or absent for text-only), "conversations":
[{"from": "human"|"gpt", "value": ...}]}; image paths are relative to `image_folder` (default: the JSON file's
folder). `uniflow data shapes` writes ShapeWorld in this format.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from mllm.prompting import IGNORE_INDEX, ChatFormat, llava_messages, truncate
from uniflow.configs import check_choice, check_number
from uniflow.errors import ConfigError, ImageInputError

CAPTION_PROMPT = "Describe the image."
SHAPEWORLD_TASKS = ("caption", "qa")


@dataclass
class Prepared:
    """What a conversation needs to become a training sample: its chat format, the LLM positions per image, the
    image side and the length limit."""

    format: ChatFormat
    tokens_per_image: int
    image_size: int
    max_length: int

    def sample(self, images: list[torch.Tensor], messages: list[dict[str, str]], source: str) -> dict[str, Any]:
        encoded = self.format.encode(messages, [self.tokens_per_image] * len(images), source=source)
        encoded = truncate(encoded, self.max_length, source)
        pixels = torch.stack(images) if images else torch.zeros(0, 3, self.image_size, self.image_size)
        return {"input_ids": encoded.ids, "labels": encoded.labels, "pixel_values": pixels}


def collate(items: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad token ids (pad_id) and labels (IGNORE_INDEX) to the longest sample, with an attention mask; images
    of every sample concatenated in order (`num_images` per sample), [0, 1] RGB (`UniFlowChat.forward` applies the
    encoder's normalisation)."""
    longest = max(len(x["input_ids"]) for x in items)
    ids = torch.full((len(items), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(items), longest), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(items), longest), dtype=torch.long)
    for i, x in enumerate(items):
        n = len(x["input_ids"])
        ids[i, :n] = torch.tensor(x["input_ids"], dtype=torch.long)
        labels[i, :n] = torch.tensor(x["labels"], dtype=torch.long)
        mask[i, :n] = 1
    pixels = torch.cat([x["pixel_values"] for x in items])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "pixel_values": pixels,
            "num_images": torch.tensor([x["pixel_values"].shape[0] for x in items])}


# ---------------------------------------------------------------------------------------------------------- LLaVA
def read_llava_json(path: str | Path) -> list[dict[str, Any]]:
    """The records of a LLaVA JSON file (a list), checked for shape; errors name the file and the record."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: LLaVA JSON file not found")
    try:
        records = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(records, list):
        raise ConfigError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
    for i, r in enumerate(records):
        if not isinstance(r, dict) or "conversations" not in r:
            raise ConfigError(f"{path}: record {i}: expected an object with 'conversations'")
        image = r.get("image")
        if image is not None and not isinstance(image, (str, list)):
            raise ConfigError(f"{path}: record {i}: 'image' must be a path or a list of paths")
    return records


class LlavaDataset(Dataset):
    """A LLaVA JSON file: each item is tokenized (and its images loaded) when read, so workers share the work."""

    def __init__(self, path: str | Path, prepared: Prepared, image_folder: str | Path | None = None,
                 limit: int | None = None) -> None:
        self.path = Path(path)
        self.records = read_llava_json(self.path)[:limit]
        self.folder = Path(image_folder) if image_folder is not None else self.path.parent
        self.prepared = prepared

    def __len__(self) -> int:
        return len(self.records)

    def conversation(self, index: int) -> tuple[list[Path], list[dict[str, str]]]:
        record = self.records[index]
        source = f"{self.path}: record {index}"
        image = record.get("image")
        paths = [] if image is None else [image] if isinstance(image, str) else list(image)
        return [self.folder / p for p in paths], llava_messages(record["conversations"], source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        from uniflow.images import open_image, preprocess

        paths, messages = self.conversation(index)
        size = self.prepared.image_size
        images = []
        for p in paths:
            try:
                images.append(preprocess(open_image(p, size=size), size, str(p)))
            except ImageInputError as exc:
                raise ImageInputError(f"{self.path}: record {index}: {exc}") from None
        return self.prepared.sample(images, messages, f"{self.path}: record {index}")


# ------------------------------------------------------------------------------------------------------ ShapeWorld
MAX_SHAPEWORLD_TURNS = 7  # five questions per image, plus "where" for each of up to two more objects


def shapeworld_questions_of(sample: Any, every_position: bool = False) -> list[tuple[str, str]]:
    """(question, answer) pairs about one ShapeWorld sample: its five questions (shape, colour, count, position,
    yes/no) and, with `every_position`, "where is ..." for each object the position question did not ask about.
    Objects have distinct (colour, shape) pairs, so each such question has one answer."""
    from uniflow.data.shapeworld import where_question

    pairs = [(q["question"], q["answer"]) for q in sample.qa]
    if every_position:
        asked = {q["question"] for q in sample.qa}
        for o in sample.objects:
            question = where_question(o)
            if question not in asked:
                pairs.append((question, o.position))
    return pairs


def shapeworld_messages(sample: Any, task: str, rng: np.random.Generator, max_turns: int = 5,
                        min_turns: int = 1, every_position: bool = False) -> list[dict[str, str]]:
    """A conversation about one ShapeWorld sample. caption: "Describe the image." -> the caption. qa: `min_turns`
    to `max_turns` of its questions (`shapeworld_questions_of`) in a random order, one per turn; the first user turn
    carries the image. Batches are padded to their longest conversation, so asking every question
    (min_turns = max_turns = MAX_SHAPEWORLD_TURNS) costs little more per step than a random number of them."""
    if task == "caption":
        turns = [(CAPTION_PROMPT, sample.caption)]
    else:
        pool = shapeworld_questions_of(sample, every_position)
        low, high = min(min_turns, len(pool)), min(max_turns, len(pool))
        k = int(rng.integers(low, high + 1))
        turns = [pool[i] for i in rng.permutation(len(pool))[:k]]
    messages = []
    for i, (question, answer) in enumerate(turns):
        messages.append({"role": "user", "content": ("<image>\n" if i == 0 else "") + question})
        messages.append({"role": "assistant", "content": answer})
    return messages


class ShapeWorldChat(Dataset):
    """ShapeWorld conversations rendered on demand (nothing on disk): sample `index` of `split`, its image and a
    caption or QA conversation (`shapeworld_messages`), deterministic in (seed, split, index)."""

    def __init__(self, prepared: Prepared, split: str = "train", num_samples: int = 50_000, task: str = "qa",
                 seed: int = 0, max_turns: int = 5, min_turns: int = 1, every_position: bool = False) -> None:
        check_choice("task", task, SHAPEWORLD_TASKS)
        check_number("max_turns", max_turns, 1, MAX_SHAPEWORLD_TURNS)
        check_number("min_turns", min_turns, 1, max_turns)
        self.prepared, self.split, self.num_samples = prepared, split, num_samples
        self.task, self.seed, self.max_turns = task, seed, max_turns
        self.min_turns, self.every_position = min_turns, every_position

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict[str, Any]:
        from uniflow.data.shapeworld import render_sample
        from uniflow.images import preprocess

        sample = render_sample(self.seed, self.split, int(index))
        rng = np.random.default_rng([self.seed, 7, int(index)])
        messages = shapeworld_messages(sample, self.task, rng, self.max_turns, self.min_turns, self.every_position)
        image = preprocess(sample.image, self.prepared.image_size)
        return self.prepared.sample([image], messages, f"ShapeWorld {self.split} {index}")


class MixedConversations(Dataset):
    """`main` with a share `ratio` of its items replaced by text-only conversations drawn from `text` (LLaVA's
    recipe mixes language-only instructions into stage 2 so that tuning on short visual answers does not wear away
    the LLM's general answers). Which items are replaced, and by what, is fixed by (seed, index)."""

    def __init__(self, main: Dataset, text: Dataset, ratio: float, seed: int = 0) -> None:
        check_number("text_ratio", ratio, 0.0, 1.0)
        if len(text) == 0:
            raise ConfigError("text_path: the text-only conversation file holds no records")
        self.main, self.text, self.ratio, self.seed = main, text, ratio, seed

    def __len__(self) -> int:
        return len(self.main)

    def __getitem__(self, index: int) -> dict[str, Any]:
        rng = np.random.default_rng([self.seed, 11, int(index)])
        if rng.random() < self.ratio:
            return self.text[int(rng.integers(len(self.text)))]
        return self.main[index]


def shapeworld_questions(split: str, num_images: int, seed: int = 0, start: int = 0) -> list[dict[str, Any]]:
    """Single-turn held-out questions: for each image, each of its questions as {"index", "type", "question",
    "answer", "image" (PIL)}; what the exact-match evaluation asks."""
    from uniflow.data.shapeworld import render_sample

    out = []
    for index in range(start, start + num_images):
        sample = render_sample(seed, split, index)
        for q in sample.qa:
            out.append({"index": index, "type": q["type"], "question": q["question"], "answer": q["answer"],
                        "image": sample.image})
    return out


# ------------------------------------------------------------------------------------------------------ scoring
NUMBER_WORDS = {"zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
                "seven": "7", "eight": "8", "nine": "9", "ten": "10", "eleven": "11", "twelve": "12"}


def normalize_answer(text: str) -> str:
    """Lower case, punctuation removed, number words as digits, whitespace collapsed: "Three." -> "3",
    "Top-left!" -> "top left"."""
    text = re.sub(r"[^\w\s]", " ", text.lower())
    words = [NUMBER_WORDS.get(w, w) for w in text.split()]
    return " ".join(words)


def exact_match(prediction: str, answer: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(answer)


def contains_answer(prediction: str, answers: list[str]) -> bool:
    """Whether any accepted answer appears as whole words in the normalised prediction (for free-form replies)."""
    padded = f" {normalize_answer(prediction)} "
    return any(f" {normalize_answer(a)} " in padded for a in answers)
