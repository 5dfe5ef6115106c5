"""Understanding: chat about images with UniFlow's semantic tokens (docs/mllm.md).

UniFlow encoder tokens -> projector (LLaVA-1.5 MLP or pixel shuffle + LayerNorm + MLP) -> any `transformers` causal
LM. Imports only from `uniflow/` and libraries. Public names load lazily, so `import mllm.config` needs no torch
model code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from uniflow.lazy import lazy_exports

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


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
