"""Which tokenizer a generator's latents belong to: a hash of the tokenizer's config and weights.

A generator models one tokenizer's latent space; decoding its samples with another tokenizer (another training run,
another preset, the same weights retrained) gives garbage without any error. So every generator records the
fingerprint of the tokenizer it was trained on, and sampling refuses a tokenizer with another one.

The hash covers the config (canonical JSON, `model_kind` included) and every state-dict tensor (name, shape, and the
values rounded to float16), in sorted order. Rounding to float16 makes the fingerprint the same whether a folder is
stored or loaded in fp32 or fp16 (shipped folders are fp16), while any real change of the weights changes it. The
latent statistics are not part of it: the generator keeps the statistics it was trained with in its own config.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from uniflow.decoder import DecoderConfig

if TYPE_CHECKING:
    from uniflow.tokenizer import UniFlowTokenizer

FINGERPRINT_CHARS = 16  # characters shown in messages; the stored value is the full sha256


@torch.no_grad()
def state_fingerprint(config: dict[str, Any], state: Mapping[str, torch.Tensor]) -> str:
    """sha256 (hex) of a config mapping (canonical JSON) and a state dict (names, shapes, float16-rounded values)."""
    digest = hashlib.sha256()
    digest.update(json.dumps(config, sort_keys=True).encode())
    for name in sorted(state):
        tensor = state[name].detach().cpu()
        if tensor.is_floating_point():
            tensor = tensor.to(torch.float16)
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer: UniFlowTokenizer) -> str:
    """The fingerprint of a tokenizer (see the module docstring). `encoder.pretrained` (where the initial weights came
    from, not what they are) and the decoder's post-filter settings (`DecoderConfig.POST_FILTER`: they change how a
    decoded image is cleaned up, not the latent space) are left out of the config."""
    config = tokenizer.config.to_dict()
    config.get("encoder", {}).pop("pretrained", None)
    for key in DecoderConfig.POST_FILTER:
        config.get("decoder", {}).pop(key, None)
    return state_fingerprint(config, tokenizer.state_dict())


def short(fingerprint: str | None) -> str:
    return "none" if fingerprint is None else fingerprint[:FINGERPRINT_CHARS]
