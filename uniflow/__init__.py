"""UniFlow: a unified pixel flow tokenizer (Yue et al., 2025). See docs/architecture.md for the map of the code."""

from uniflow.decoder import DecoderConfig
from uniflow.distill import DistillConfig
from uniflow.encoders import EncoderConfig, VisionEncoder
from uniflow.errors import CheckpointError, ConfigError, ImageInputError, UniFlowError
from uniflow.flow import FlowConfig
from uniflow.latent_stats import LatentStats, compute_latent_stats
from uniflow.tokenizer import Encoded, TokenizerConfig, TokenizerLoss, UniFlowTokenizer, load_encoder

__all__ = [
    "CheckpointError", "ConfigError", "DecoderConfig", "DistillConfig", "Encoded", "EncoderConfig", "FlowConfig",
    "ImageInputError", "LatentStats", "TokenizerConfig", "TokenizerLoss", "UniFlowError", "UniFlowTokenizer",
    "VisionEncoder", "compute_latent_stats", "load_encoder",
]
