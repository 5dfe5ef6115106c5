"""The one registry of model kinds: name -> Task class (or its "module:Class" path, imported on first use) + help.

The train CLI (`uniflow train KIND`, `python -m train KIND`) is built from it, so a new model kind only registers its
task here (or calls `register_task` at run time, as the test suite's toy kind does). Light on purpose: importing it
costs nothing, so `uniflow --help` stays instant.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from uniflow.errors import ConfigError


@dataclass
class Kind:
    task: Any  # a Task subclass, or "module:Class"
    help: str


KINDS: dict[str, Kind] = {
    "encoder": Kind("train.encoder_task:EncoderTask",
                    "pretrain the tiny ViT encoder on ShapeWorld labels (the teacher the tokenizer adapts)"),
    "tokenizer": Kind("train.tokenizer_task:TokenizerTask",
                      "train the UniFlow tokenizer (self-distillation + pixel flow decoder)"),
    "mllm": Kind("train.mllm_task:MLLMTask",
                 "train the multimodal model: UniFlow encoder tokens -> projector -> LLM (stage 1 projector, stage 2 "
                 "LoRA or full)"),
    "generator": Kind("train.generator_task:GeneratorTask",
                      "train the class-conditional AR generator (causal transformer + flow head) on a frozen "
                      "tokenizer's latents"),
}


def register_task(name: str, task: Any, help: str) -> None:
    """Add (or replace) a model kind: a Task subclass or its "module:Class" path, and one line for `--help`."""
    KINDS[name] = Kind(task, help)


def kind_help() -> dict[str, str]:
    return {name: entry.help for name, entry in KINDS.items()}


def get_task(name: str) -> Any:
    """The Task class of a model kind; ConfigError naming the kind and the available ones."""
    if name not in KINDS:
        raise ConfigError(f"kind: unknown model kind {name!r}; available: {sorted(KINDS)}")
    entry = KINDS[name]
    if isinstance(entry.task, str):
        import importlib

        module, _, cls = entry.task.partition(":")
        entry.task = getattr(importlib.import_module(module), cls)
    return entry.task
