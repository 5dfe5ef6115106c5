"""Task "encoder": pretrain the tiny ViT on ShapeWorld labels, so the tokenizer has a *pretrained* encoder to adapt.

Model: the encoder of a tokenizer preset (`model.preset`, required) + mean-pooled last-layer tokens -> LayerNorm ->
Linear to the classes, trained with cross-entropy. On ShapeWorld two dense heads (LayerNorm -> Linear on every
last-layer patch token) also predict what each patch shows: its shape and its colour, the background as one more
class, against the exact area fractions the renderer knows (`uniflow.data.shapeworld.patch_areas`). The class
objective alone sits on a colour plateau (the main object's colour is enough for a sixth of the classes, and the
bundled teacher's 18% is about chance once the colour is known); the dense targets are what teach the tokens shape.
Export writes `encoder.safetensors` in exactly the key layout that `EncoderConfig.pretrained` loads (the backend
model's own state dict), every head as `classifier.safetensors`, the encoder config and the held-out metrics.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass
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
from uniflow.configs import check_number, from_dict, to_dict
from uniflow.encoders import EncoderConfig, build_encoder
from uniflow.errors import ConfigError, OutputError
from uniflow.fileio import atomic_write_dir

ENCODER_WEIGHTS = "encoder.safetensors"
CLASSIFIER_WEIGHTS = "classifier.safetensors"
ENCODER_CONFIG = "encoder_config.json"
EVAL_METRICS = "metrics.json"


@dataclass
class EncoderLossConfig:
    """`model.loss`: weights of the objectives. classify: the main-object class on mean-pooled tokens; shape / colour:
    the per-patch heads (null: 1.0 on ShapeWorld, whose renderer gives the targets, and 0 on other data, which has
    none). Defaults from the calibration in docs/results.md: equal weights break the colour plateau."""

    classify: float = 1.0
    shape: float | None = None
    colour: float | None = None

    def __post_init__(self) -> None:
        for name in ("classify", "shape", "colour"):
            value = getattr(self, name)
            if value is not None:
                check_number(name, value, 0.0)

    def resolved(self, dense_data: bool, where: str) -> tuple[float, float, float]:
        """(classify, shape, colour) with the nulls filled in; dense weights on data without dense targets refused."""
        auto = 1.0 if dense_data else 0.0
        weights = (self.classify, auto if self.shape is None else self.shape,
                   auto if self.colour is None else self.colour)
        if not dense_data and (weights[1] or weights[2]):
            raise ConfigError(f"{where}: shape/colour weights need per-patch targets, which only data.source "
                              f"'shapeworld' has; set them to 0")
        if not any(weights):
            raise ConfigError(f"{where}: every loss weight is 0; nothing would be trained")
        return weights


class EncoderClassifier(nn.Module):
    """A VisionEncoder with a linear classification head on its mean-pooled last-layer patch tokens and, when `dense`,
    two linear per-token heads (shape and colour of what each patch shows, background the last class).

    loss_weights: (classify, shape, colour) weights of the training loss."""

    def __init__(self, config: EncoderConfig, num_classes: int, gradient_checkpointing: bool = False,
                 dense: bool = False, loss_weights: tuple[float, float, float] = (1.0, 0.0, 0.0)) -> None:
        super().__init__()
        from uniflow.data.shapeworld import COLOURS, SHAPES

        self.encoder = build_encoder(config)
        if gradient_checkpointing:
            self.encoder.set_grad_checkpointing(True)
        self.loss_weights = tuple(float(w) for w in loss_weights)
        width = self.encoder.width
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)
        heads = [self.head]
        self.dense = dense
        if dense:
            self.dense_norm = nn.LayerNorm(width)
            self.shape_head = nn.Linear(width, len(SHAPES) + 1)
            self.colour_head = nn.Linear(width, len(COLOURS) + 1)
            heads += [self.shape_head, self.colour_head]
        for head in heads:
            nn.init.zeros_(head.bias)
            nn.init.normal_(head.weight, std=0.02)

    def outputs(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """{"logits": (B, classes)} and, when dense, {"shape_logits", "colour_logits": (B, tokens, classes + 1)}."""
        tokens = self.encoder(self.encoder.normalize(images)).last
        out = {"logits": self.head(self.norm(tokens.mean(dim=1)))}
        if self.dense:
            normed = self.dense_norm(tokens)
            out["shape_logits"] = self.shape_head(normed)
            out["colour_logits"] = self.colour_head(normed)
        return out

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.outputs(images)["logits"]

    def forward(self, batch: dict[str, Any], mode: str = "loss") -> Any:
        device, dtype = module_device_dtype(self)
        images = batch["image"].to(device)
        with autocast_for(dtype, device):
            out = {k: v.float() for k, v in self.outputs(images).items()}
        if mode == "logits":
            return out["logits"]
        if mode == "outputs":
            return out
        labels = batch["label"].to(device)
        w_class, w_shape, w_colour = self.loss_weights
        class_loss = F.cross_entropy(out["logits"], labels)
        loss = w_class * class_loss
        metrics = {"class_loss": class_loss.detach(),
                   "accuracy": (out["logits"].argmax(-1) == labels).float().mean().detach()}
        if self.dense:
            for name, weight in (("shape", w_shape), ("colour", w_colour)):
                logits = out[f"{name}_logits"]
                target = batch[f"patch_{name}_area"].to(device)
                dense_loss = -(target * F.log_softmax(logits, dim=-1)).sum(-1).mean()  # soft cross-entropy
                loss = loss + weight * dense_loss
                metrics[f"{name}_loss"] = dense_loss.detach()
                hard = batch[f"patch_{name}"].to(device)
                covered = hard != logits.shape[-1] - 1
                hits = (logits.argmax(-1) == hard) & covered
                metrics[f"{name}_accuracy"] = (hits.sum() / covered.sum().clamp_min(1)).detach()
        metrics["loss"] = loss.detach()
        return {"loss": loss, "metrics": metrics}


def _preset_encoder(name: str) -> dict[str, Any]:
    from uniflow.presets import get_preset

    return {"encoder": to_dict(get_preset(name).encoder)}


class EncoderTask(ImageTask):
    kind = "encoder"

    def __init__(self, config: Any, dry_run: bool = False) -> None:
        super().__init__(config, dry_run)
        from uniflow.presets import PRESETS

        section = dict(config.model)
        unknown = sorted(set(section) - {"preset", "encoder", "num_classes", "loss"})
        if unknown:
            raise ConfigError(f"{config.source}: model: unknown field(s) {unknown}; expected some of "
                              f"['encoder', 'loss', 'num_classes', 'preset']")
        num_classes = section.pop("num_classes", None)
        losses = from_dict(EncoderLossConfig, section.pop("loss", None) or {}, f"{config.source}: model.loss")
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
        self.check_labelled_data()
        self.check_patch_size(self.encoder_config.patch_size)
        self.loss_weights = losses.resolved(self.data.source == "shapeworld", f"{config.source}: model.loss")
        self.dense = bool(self.loss_weights[1] or self.loss_weights[2])

    def build_model(self) -> nn.Module:
        config = dataclasses.replace(self.encoder_config, pretrained=None)
        return EncoderClassifier(config, self.num_classes, self.config.gradient_checkpointing, self.dense,
                                 self.loss_weights)

    def build_datasets(self) -> tuple[Any, Any]:
        train, heldout = super().build_datasets()
        if self.dense:  # ShapeWorld (checked in __init__): the same splits with per-patch targets
            patch = self.encoder_config.patch_size
            train = train.with_patch_labels(patch)
            heldout = heldout.with_patch_labels(patch) if heldout is not None else None
        return train, heldout

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
        """Held-out main-object accuracy and, with the dense heads, per-patch shape and colour accuracy on the
        patches an object covers (`uniflow.data.shapeworld.patch_labels`), the figures the probe bars refer to."""
        counts = torch.zeros(6)  # class hits, images, shape hits, colour hits, covered patches (x2 slots)
        for batch, weight in heldout_batches(ctx.heldout, self.data.heldout_samples, ctx.batch_size, ctx.dist,
                                             ctx.collate):
            out = {k: v.float().cpu() for k, v in ctx.forward(batch, mode="outputs").items()}
            hit = (out["logits"].argmax(-1) == batch["label"]).float()
            counts[:2] += torch.stack([(hit * weight).sum(), weight.sum()])
            if self.dense:
                for slot, name in ((2, "shape"), (3, "colour")):
                    labels = batch[f"patch_{name}"]
                    covered = (labels != out[f"{name}_logits"].shape[-1] - 1).float() * weight[:, None]
                    counts[slot] += ((out[f"{name}_logits"].argmax(-1) == labels).float() * covered).sum()
                    counts[slot + 2] += covered.sum()
        total = all_reduce_sum(counts.to(ctx.dist.device)).cpu()
        metrics = {"heldout_accuracy": float(total[0] / total[1].clamp_min(1))}
        if self.dense:
            metrics["heldout_shape_accuracy"] = float(total[2] / total[4].clamp_min(1))
            metrics["heldout_colour_accuracy"] = float(total[3] / total[5].clamp_min(1))
        return metrics

    def export(self, state_dict: dict[str, torch.Tensor], out_dir: Path, dtype: torch.dtype | None,
               metrics: dict[str, float]) -> Path:
        prefix = "encoder.model."
        encoder = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        head = {k: v for k, v in state_dict.items()
                if k.startswith(("norm.", "head.", "dense_norm.", "shape_head.", "colour_head."))}

        def cast(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
                    for k, v in tensors.items()}

        encoder_config = dataclasses.replace(self.encoder_config, pretrained=None)

        def write(tmp: Path) -> None:
            save_file(cast(encoder), str(tmp / ENCODER_WEIGHTS), metadata={"format": "pt"})
            save_file(cast(head), str(tmp / CLASSIFIER_WEIGHTS), metadata={"format": "pt"})
            (tmp / ENCODER_CONFIG).write_text(json.dumps(to_dict(encoder_config), indent=2) + "\n")
            (tmp / EVAL_METRICS).write_text(json.dumps({"num_classes": self.num_classes,
                                                        "loss_weights": list(self.loss_weights), **metrics},
                                                       indent=2) + "\n")

        return atomic_write_dir(out_dir, write)
