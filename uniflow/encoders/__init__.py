"""Vision encoder backends behind one interface (`VisionEncoder`).

`build_encoder(config)` picks the backend by `config.backend`. Backends are imported on first use, so building a timm
encoder never pays for importing `transformers` (and the other way round).
"""

from __future__ import annotations

from collections.abc import Callable

from uniflow.encoders.base import EncoderConfig, EncoderOutput, VisionEncoder
from uniflow.errors import ConfigError


def _build_timm(config: EncoderConfig) -> VisionEncoder:
    from uniflow.encoders.timm_vit import TimmEncoder

    return TimmEncoder(config)


def _build_hf(config: EncoderConfig) -> VisionEncoder:
    from uniflow.encoders.hf import HFEncoder

    return HFEncoder(config)


def _build_internvit(config: EncoderConfig) -> VisionEncoder:
    from uniflow.encoders.internvit import InternViTEncoder

    return InternViTEncoder(config)


ENCODER_BACKENDS: dict[str, Callable[[EncoderConfig], VisionEncoder]] = {
    "timm": _build_timm,
    "hf": _build_hf,
    "internvit": _build_internvit,
}


def register_backend(name: str, constructor: Callable[[EncoderConfig], VisionEncoder]) -> None:
    """Add (or replace) a backend, so a new ViT family needs no change to callers, only a config value."""
    ENCODER_BACKENDS[name] = constructor


def build_encoder(config: EncoderConfig) -> VisionEncoder:
    """Build the encoder adapter that `config.backend` names; raises ConfigError for an unknown backend."""
    try:
        constructor = ENCODER_BACKENDS[config.backend]
    except KeyError:
        raise ConfigError(
            f"encoder.backend: unknown backend {config.backend!r}; expected one of {sorted(ENCODER_BACKENDS)}"
        ) from None
    return constructor(config)


__all__ = ["ENCODER_BACKENDS", "EncoderConfig", "EncoderOutput", "VisionEncoder", "build_encoder", "register_backend"]
