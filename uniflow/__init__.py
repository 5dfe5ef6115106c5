"""UniFlow: a unified pixel flow tokenizer (Yue et al., 2025)."""

from uniflow.decoder import DecoderConfig
from uniflow.distill import DistillConfig
from uniflow.encoders import EncoderConfig
from uniflow.errors import CheckpointError, ConfigError, ImageInputError, UniFlowError
from uniflow.flow import FlowConfig
from uniflow.tokenizer import Encoded, TokenizerConfig, TokenizerLoss, UniFlowTokenizer

__all__ = [
    "CheckpointError", "ConfigError", "DecoderConfig", "DistillConfig", "Encoded", "EncoderConfig", "FlowConfig",
    "ImageInputError", "TokenizerConfig", "TokenizerLoss", "UniFlowError", "UniFlowTokenizer",
]
