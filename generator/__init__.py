"""Class-conditional autoregressive generation on UniFlow's continuous tokens (docs/generator.md).

`ARGenerator` (the model: causal LLaMA-style transformer + per-token flow head), `generator.sample` (KV-cache
sampling, CFG, images, the ADM npz file), `generator.presets` (tiny, B, L, XL). Imports only from `uniflow/`.
Public names load lazily, so `import generator` does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from uniflow.lazy import lazy_exports

_EXPORTS = {
    "ARGenerator": "generator.model",
    "GeneratorConfig": "generator.model",
    "get_preset": "generator.presets",
    "sample_images": "generator.sample",
    "sample_latents": "generator.sample",
    "write_npz": "generator.sample",
    "tokenizer_fingerprint": "generator.fingerprint",
}

__all__ = ["ARGenerator", "GeneratorConfig", "get_preset", "sample_images", "sample_latents", "tokenizer_fingerprint",
           "write_npz"]

if TYPE_CHECKING:
    from generator.fingerprint import tokenizer_fingerprint
    from generator.model import ARGenerator, GeneratorConfig
    from generator.presets import get_preset
    from generator.sample import sample_images, sample_latents, write_npz


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
