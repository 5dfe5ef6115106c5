"""Tiny configurations shared by the tests (importable as `tests.helpers`)."""

from dataclasses import dataclass
from pathlib import Path

import pytest

from uniflow.decoder import DecoderConfig
from uniflow.encoders import EncoderConfig
from uniflow.tokenizer import TokenizerConfig, UniFlowTokenizer


def tiny_tokenizer_config(width: int = 48, depth: int = 2, image_size: int = 32, patch: int = 8,
                          global_depth: int = 1, head_width: int = 64, head_depth: int = 2) -> TokenizerConfig:
    return TokenizerConfig(
        encoder=EncoderConfig(backend="timm", arch="vit_tiny_patch16_224",
                              kwargs={"embed_dim": width, "depth": depth, "num_heads": 2},
                              image_size=image_size, patch_size=patch),
        decoder=DecoderConfig(latent_channels=16, global_depth=global_depth, global_heads=2,
                              head_width=head_width, head_depth=head_depth),
    )


@dataclass
class Ctx:
    """What a bad-input case gets: its own folder, the shared tiny tokenizer (and its folder), monkeypatch, capsys."""

    tmp: Path
    tok: UniFlowTokenizer
    tok_dir: Path
    monkeypatch: pytest.MonkeyPatch
    capsys: pytest.CaptureFixture[str]
