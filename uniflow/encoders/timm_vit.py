"""Any timm ViT as a UniFlow encoder.

The model is built with `dynamic_img_size=True`, so its absolute position embedding is resampled (bicubic) for any
input size divisible by the patch size. Hidden states come from timm's own `forward_intermediates` (one pass, no hooks,
works with gradient checkpointing): the output of each requested block, prefix tokens (CLS and registers) dropped;
`stop_early` skips the blocks past the deepest requested one.

Last layer: the raw output of the last block, before the model's final norm. Every backend makes the same choice,
so a layer index means the same thing for timm, `transformers` and InternViT. Because nothing reads them, the final
norm and the classifier head are pruned after loading weights: every parameter left gets a gradient (DDP and
DeepSpeed need no `find_unused_parameters`).

Normalisation: `config.mean/std`, else the timm model's `pretrained_cfg` mean/std (0.5/0.5 for the augreg ViTs),
else ImageNet's.
"""

from __future__ import annotations

from collections.abc import Sequence

import timm
import torch

from uniflow.checkpoint import load_state_strict, read_safetensors
from uniflow.encoders.base import IMAGENET_MEAN, IMAGENET_STD, EncoderConfig, VisionEncoder
from uniflow.errors import ConfigError


class TimmEncoder(VisionEncoder):
    """timm ViT adapter: `self.model` is the (pruned) timm model, so state-dict keys are `model.<timm name>`."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        try:
            model = timm.create_model(
                config.arch,
                pretrained=False,
                img_size=config.image_size,
                patch_size=config.patch_size,
                num_classes=0,
                dynamic_img_size=True,
                **config.kwargs,
            )
        except (RuntimeError, TypeError, ValueError) as exc:
            raise ConfigError(f"encoder: cannot build timm model {config.arch!r} with {config.kwargs}: {exc}") from exc
        for needed in ("forward_intermediates", "prune_intermediate_layers", "blocks", "patch_embed"):
            if not hasattr(model, needed):
                raise ConfigError(f"encoder.arch: timm model {config.arch!r} is not a ViT with `{needed}`")

        if config.pretrained:
            self._load_pretrained(model, config.pretrained)
        # Drop what is never used (final norm, pooling, head); see the module docstring.
        model.prune_intermediate_layers(len(model.blocks), prune_norm=True, prune_head=True)
        self.model = model

        patch = model.patch_embed.patch_size
        patch = patch if isinstance(patch, int) else patch[0]
        self.patch_size = int(patch)
        self.width = int(model.embed_dim)
        self.num_layers = len(model.blocks)
        self.image_size = config.image_size
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 0))
        cfg = getattr(model, "pretrained_cfg", None) or {}
        mean = config.mean or cfg.get("mean") or IMAGENET_MEAN
        std = config.std or cfg.get("std") or IMAGENET_STD
        self._register_norm(tuple(mean), tuple(std))

    @staticmethod
    def _load_pretrained(model: torch.nn.Module, path: str) -> None:
        """Strictly load a safetensors checkpoint of this timm model.

        Both a full timm checkpoint (with final norm and classifier) and one saved from an already pruned model load:
        the keys of the parts this adapter prunes are set aside, every other key must match.
        """
        state = read_safetensors(path)
        classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or "head"
        prunable = ("norm.", "fc_norm.", "attn_pool.", "head_drop.", f"{classifier}.")
        own = model.state_dict()
        state = {k: v for k, v in state.items() if k in own or not k.startswith(prunable)}
        for key in own:
            if key.startswith(prunable) and key not in state:
                state[key] = own[key]  # pruned right after: its value is irrelevant
        load_state_strict(model, state, path)

    def encode_normalized(self, pixel_values: torch.Tensor, layers: Sequence[int]) -> list[torch.Tensor]:
        """Patch tokens of the requested blocks, via timm's `forward_intermediates` (stopping after the deepest)."""
        unique = sorted(set(layers))
        hidden = self.model.forward_intermediates(
            pixel_values, indices=unique, norm=False, stop_early=True, output_fmt="NLC", intermediates_only=True
        )
        by_index = dict(zip(unique, hidden))
        return [by_index[i] for i in layers]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.model.set_grad_checkpointing(enable)
