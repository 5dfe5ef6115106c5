"""UniFlow: a unified pixel flow tokenizer (Yue et al., 2025). See docs/architecture.md for the map of the code.

The public names load lazily (PEP 562), so `import uniflow.errors` or `uniflow.configs` (what the command line needs
for `--help` and argument checks) does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from uniflow.lazy import lazy_exports

_EXPORTS = {
    "DecoderConfig": "uniflow.decoder",
    "DistillConfig": "uniflow.distill",
    "EncoderConfig": "uniflow.encoders",
    "VisionEncoder": "uniflow.encoders",
    "CheckpointError": "uniflow.errors",
    "ConfigError": "uniflow.errors",
    "ImageInputError": "uniflow.errors",
    "UniFlowError": "uniflow.errors",
    "FlowConfig": "uniflow.flow",
    "LatentStats": "uniflow.latent_stats",
    "compute_latent_stats": "uniflow.latent_stats",
    "Encoded": "uniflow.tokenizer",
    "TokenizerConfig": "uniflow.tokenizer",
    "TokenizerLoss": "uniflow.tokenizer",
    "UniFlowTokenizer": "uniflow.tokenizer",
    "load_encoder": "uniflow.tokenizer",
}

__all__ = [
    "CheckpointError", "ConfigError", "DecoderConfig", "DistillConfig", "Encoded", "EncoderConfig", "FlowConfig",
    "ImageInputError", "LatentStats", "TokenizerConfig", "TokenizerLoss", "UniFlowError", "UniFlowTokenizer",
    "VisionEncoder", "compute_latent_stats", "load_encoder",
]

if TYPE_CHECKING:
    from uniflow.decoder import DecoderConfig
    from uniflow.distill import DistillConfig
    from uniflow.encoders import EncoderConfig, VisionEncoder
    from uniflow.errors import CheckpointError, ConfigError, ImageInputError, UniFlowError
    from uniflow.flow import FlowConfig
    from uniflow.latent_stats import LatentStats, compute_latent_stats
    from uniflow.tokenizer import Encoded, TokenizerConfig, TokenizerLoss, UniFlowTokenizer, load_encoder


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
