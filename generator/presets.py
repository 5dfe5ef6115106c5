"""Named generator configurations: `tiny` for ShapeWorld, and `B` / `L` / `XL` for ImageNet.

B, L and XL are LlamaGen's GPT-B / GPT-L / GPT-XL transformers (Sun et al. 2024: width 768 / 1024 / 1280, depth
12 / 24 / 36, heads 12 / 16 / 20, SwiGLU at 2/3 * 4 * width rounded up to 256), the usual AR generator sizes. Their
published totals, 111M / 343M / 775M, include a 16384-entry codebook embedding and output layer (2 * 16384 * width
parameters); continuous tokens replace those with a 64 -> width input projection and the flow head, so our
transformers have those totals minus the codebook tables (85.8M / 309.4M / 732.8M; `tests/test_generator.py` checks
the counts on the meta device). The flow head is sized for decoding speed: one token costs a transformer step plus
`sample_steps` (8 Euler) head evaluations, and the goal is to decode at least as fast per token as a LLaMA of the
same size with LlamaGen's 16384-entry output layer (bench/generator.py). A 256-wide, 3-block head (1.5M parameters
per evaluation at B) keeps 8 evaluations within that output layer's cost; MAR's heads are 1024-1536 wide with 100
DDPM steps, and its ablation loses little with narrower ones for its 16-d tokens. The ImageNet grid is 16 x 16: the
official UniFlow tokenizer (patch 14) at 224 px.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

from generator.model import GeneratorConfig
from uniflow.errors import ConfigError

IMAGENET_CLASSES = 1000
LLAMAGEN_CODEBOOK = 16384  # the codebook size behind LlamaGen's published parameter counts
PUBLISHED_TOTALS = {"B": 111e6, "L": 343e6, "XL": 775e6}


def tiny() -> GeneratorConfig:
    """ShapeWorld: 36 classes, the `tiny` tokenizer's 8 x 8 grid of 64-d tokens; sized to train in under an hour on
    a 2-core CPU (see train/configs/generator_tiny.yaml). At this size the head (1.35M parameters, run once per
    noise draw) costs as much as the 3.2M-parameter transformer (run once), so 2 noise draws per token, not MAR's 4:
    measured side by side, 4 draws cost about 1.4x the step time of 2."""
    return GeneratorConfig(num_classes=36, grid=(8, 8), token_channels=64, width=256, depth=4, heads=4,
                           ffn_multiple_of=64, head_width=256, head_depth=3, noise_draws=2, cfg_scale=2.0)


def _imagenet(width: int, depth: int, heads: int) -> GeneratorConfig:
    return GeneratorConfig(num_classes=IMAGENET_CLASSES, grid=(16, 16), token_channels=64, width=width, depth=depth,
                           heads=heads, head_width=256, head_depth=3, noise_draws=4, cfg_scale=3.0,
                           cfg_schedule="linear")


def gpt_b() -> GeneratorConfig:
    return _imagenet(768, 12, 12)


def gpt_l() -> GeneratorConfig:
    return _imagenet(1024, 24, 16)


def gpt_xl() -> GeneratorConfig:
    return _imagenet(1280, 36, 20)


PRESETS: dict[str, Callable[[], GeneratorConfig]] = {"tiny": tiny, "B": gpt_b, "L": gpt_l, "XL": gpt_xl}


def get_preset(name: str) -> GeneratorConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown generator preset {name!r}; available: {sorted(PRESETS)}")
    return copy.deepcopy(PRESETS[name]())
