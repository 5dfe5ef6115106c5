"""Understanding: chat about images with UniFlow's semantic tokens (docs/mllm.md).

UniFlow encoder tokens -> projector (LLaVA-1.5 MLP or pixel shuffle + LayerNorm + MLP) -> any `transformers` causal
LM. Imports only from `uniflow/` and libraries. Public names load lazily, so `import mllm.config` needs no torch
model code.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "MLLMConfig": "mllm.config",
    "UniFlowChat": "mllm.model",
    "ChatFormat": "mllm.prompting",
    "IMAGE_PLACEHOLDER": "mllm.prompting",
}

__all__ = ["IMAGE_PLACEHOLDER", "ChatFormat", "MLLMConfig", "UniFlowChat"]

if TYPE_CHECKING:
    from mllm.config import MLLMConfig
    from mllm.model import UniFlowChat
    from mllm.prompting import IMAGE_PLACEHOLDER, ChatFormat


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mllm' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
