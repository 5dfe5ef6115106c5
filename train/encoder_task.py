"""Task "encoder": pretrain the tiny ViT on ShapeWorld labels, so the tokenizer has a *pretrained* encoder to adapt.

Model: the encoder of a tokenizer preset (`model.preset`, required) + mean-pooled last-layer tokens -> LayerNorm ->
Linear to the classes, trained with cross-entropy. Export writes `encoder.safetensors` in exactly the key layout that
`EncoderConfig.pretrained` loads (the backend model's own state dict), the head as `classifier.safetensors`, the
encoder config and the held-out accuracy.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from train.distributed import all_reduce_sum
from train.tasks import (
    EvalContext,
    ImageTask,
    autocast_for,
    encoder_state,
    heldout_batches,
    model_section,
    module_device_dtype,
)
from uniflow.configs import from_dict, to_dict
from uniflow.encoders import EncoderConfig, build_encoder
from uniflow.errors import ConfigError, OutputError
from uniflow.fileio import atomic_write_dir

ENCODER_WEIGHTS = "encoder.safetensors"
CLASSIFIER_WEIGHTS = "classifier.safetensors"
ENCODER_CONFIG = "encoder_config.json"
EVAL_METRICS = "metrics.json"


class EncoderClassifier(nn.Module):
    """A VisionEncoder with a linear classification head on its mean-pooled last-layer patch tokens."""

    def __init__(self, config: EncoderConfig, num_classes: int, gradient_checkpointing: bool = False) -> None:
        super().__init__()
        self.encoder = build_encoder(config)
        if gradient_checkpointing:
            self.encoder.set_grad_checkpointing(True)
        self.norm = nn.LayerNorm(self.encoder.width)
        self.head = nn.Linear(self.encoder.width, num_classes)
        nn.init.zeros_(self.head.bias)
        nn.init.normal_(self.head.weight, std=0.02)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.encoder(self.encoder.normalize(images)).last
        return self.head(self.norm(tokens.mean(dim=1)))

    def forward(self, batch: dict[str, Any], mode: str = "loss") -> Any:
        device, dtype = module_device_dtype(self)
        images = batch["image"].to(device)
        with autocast_for(dtype, device):
            logits = self.logits(images).float()
        if mode == "logits":
            return logits
        labels = batch["label"].to(device)
        loss = F.cross_entropy(logits, labels)
        accuracy = (logits.argmax(-1) == labels).float().mean()
        return {"loss": loss, "metrics": {"loss": loss.detach(), "accuracy": accuracy.detach()}}


def _preset_encoder(name: str) -> dict[str, Any]:
    from uniflow.presets import get_preset

    return {"encoder": to_dict(get_preset(name).encoder)}


class EncoderTask(ImageTask):
    kind = "encoder"

    def __init__(self, config: Any, dry_run: bool = False) -> None:
        super().__init__(config, dry_run)
        from uniflow.presets import PRESETS

        section = dict(config.model)
        unknown = sorted(set(section) - {"preset", "encoder", "num_classes"})
        if unknown:
            raise ConfigError(f"{config.source}: model: unknown field(s) {unknown}; expected some of "
                              f"['encoder', 'num_classes', 'preset']")
        num_classes = section.pop("num_classes", None)
        merged, source = model_section(dataclasses.replace(config, model=section), _preset_encoder, sorted(PRESETS))
        self.encoder_config = from_dict(EncoderConfig, merged.get("encoder", {}), f"{source}.encoder")
        if num_classes is None:
            from uniflow.data.shapeworld import NUM_CLASSES

            num_classes = NUM_CLASSES
            if self.data.source != "shapeworld":
                warnings.warn("model.num_classes is not set: using ShapeWorld's class count", stacklevel=2)
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ConfigError(f"{source}.num_classes: expected an integer >= 1, got {num_classes!r}")
        self.num_classes = num_classes
        self.check_patch_size(self.encoder_config.patch_size)

    def build_model(self) -> nn.Module:
        config = dataclasses.replace(self.encoder_config, pretrained=None)
        return EncoderClassifier(config, self.num_classes, self.config.gradient_checkpointing)

    def initial_state(self) -> dict[str, torch.Tensor] | None:
        return encoder_state(self.encoder_config, ["encoder."])

    def check_export_dir(self, dest: Path) -> None:
        """The export is an encoder folder (no config.json): an existing one is replaced, anything else refused."""
        from uniflow.checkpoint import check_output_dir

        check_output_dir(dest, "export.dir")
        if dest.is_dir() and any(not p.name.startswith(".") for p in dest.iterdir()) \
                and not (dest / ENCODER_CONFIG).is_file():
            raise OutputError(f"export.dir: {dest} is not empty and is not an encoder export (no {ENCODER_CONFIG}); "
                              "choose a new or empty folder")

    @torch.no_grad()
    def evaluate(self, ctx: EvalContext) -> dict[str, float]:
        correct = torch.zeros(2)
        for batch, weight in heldout_batches(ctx.heldout, self.data.heldout_samples, ctx.batch_size, ctx.dist,
                                             ctx.collate):
            logits = ctx.forward(batch, mode="logits").float().cpu()
            hit = (logits.argmax(-1) == batch["label"]).float()
            correct += torch.stack([(hit * weight).sum(), weight.sum()])
        total = all_reduce_sum(correct.to(ctx.dist.device)).cpu()
        return {"heldout_accuracy": float(total[0] / total[1].clamp_min(1))}

    def export(self, state_dict: dict[str, torch.Tensor], out_dir: Path, dtype: torch.dtype | None,
               metrics: dict[str, float]) -> Path:
        prefix = "encoder.model."
        encoder = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        head = {k: v for k, v in state_dict.items() if k.startswith(("norm.", "head."))}

        def cast(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
                    for k, v in tensors.items()}

        encoder_config = dataclasses.replace(self.encoder_config, pretrained=None)

        def write(tmp: Path) -> None:
            save_file(cast(encoder), str(tmp / ENCODER_WEIGHTS), metadata={"format": "pt"})
            save_file(cast(head), str(tmp / CLASSIFIER_WEIGHTS), metadata={"format": "pt"})
            (tmp / ENCODER_CONFIG).write_text(json.dumps(to_dict(encoder_config), indent=2) + "\n")
            (tmp / EVAL_METRICS).write_text(json.dumps({"num_classes": self.num_classes, **metrics}, indent=2) + "\n")

        return atomic_write_dir(out_dir, write)
