"""Task "tokenizer": adapt a pretrained encoder into the UniFlow tokenizer (self-distillation + pixel flow decoder).

The model section is a preset name (required) plus TokenizerConfig overrides; `model.encoder.pretrained` names the
encoder weights (e.g. the export of the "encoder" task). The frozen teacher starts as a copy of that encoder, held by
the training module (not the tokenizer) and excluded from the optimizer. Evaluation reports held-out PSNR and the
patch seam ratio (pooled over the images) of 1-step (the config's default) reconstructions and writes a grid PNG
(`eval.grid_images` held-out images on top, reconstructions below).
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
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
from uniflow.checkpoint import load_state_strict
from uniflow.configs import check_number
from uniflow.distill import FrozenTeacher
from uniflow.encoders import build_encoder
from uniflow.errors import ConfigError
from uniflow.fileio import atomic_write_file
from uniflow.metrics import patch_border_mask, psnr
from uniflow.tokenizer import MODEL_KIND, TokenizerConfig, UniFlowTokenizer

EVAL_SEED = 1234  # decoder noise of the periodic evaluation: fixed, and independent of the training RNG


@dataclass
class TokenizerEvalConfig:
    """The tokenizer's `eval` section. grid_images: held-out images in each reconstruction grid
    (<run_dir>/samples/recon_stepN.png); 0: no grid."""

    grid_images: int = 8

    def __post_init__(self) -> None:
        check_number("grid_images", self.grid_images, 0, None)


class TokenizerTrainModule(nn.Module):
    """The tokenizer plus, when distilling, its frozen teacher (a second encoder holding the initial encoder weights).
    DeepSpeed's forward runs both the loss and the evaluation reconstructions. The teacher lives here, not in the
    tokenizer: inference folders never hold it, and it is excluded from the optimizer and from training checkpoints
    (it is frozen)."""

    def __init__(self, tokenizer: UniFlowTokenizer, teacher: FrozenTeacher | None) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.teacher = teacher

    def forward(self, batch: dict[str, Any], mode: str = "loss", steps: int | None = None, seed: int = EVAL_SEED
                ) -> Any:
        device, dtype = module_device_dtype(self.tokenizer)
        images = batch["image"].to(device)
        with autocast_for(dtype, device):
            if mode == "reconstruct":
                return self.tokenizer.reconstruct(images, steps=steps, seed=seed).float()
            pixels = self.tokenizer.encoder.normalize(images)
            teacher_states = self.teacher(pixels) if self.teacher is not None else None
            out = self.tokenizer.loss(pixels, teacher_states)
        metrics = {"loss": out.loss.detach().float(), "flow": out.flow.float(), "distill": out.distill.float()}
        for i, (a, w) in enumerate(zip(out.alpha.float(), out.weights.float()), start=1):
            metrics[f"alpha_{i}"] = a.detach()
            metrics[f"w_{i}"] = w.detach()
        return {"loss": out.loss, "metrics": metrics}


def _preset(name: str) -> dict[str, Any]:
    from uniflow.presets import get_preset

    return get_preset(name).to_dict()


def _is_partitioned(module: nn.Module) -> bool:
    return any(hasattr(p, "ds_id") for p in module.parameters())


def save_grid(originals: torch.Tensor, recons: torch.Tensor, path: Path) -> None:
    """Two rows: originals above reconstructions, 2-px white gutters."""
    n, _, h, w = originals.shape
    gap = 2
    canvas = torch.ones(3, 2 * h + 3 * gap, n * (w + gap) + gap)
    for i in range(n):
        x = gap + i * (w + gap)
        canvas[:, gap:gap + h, x:x + w] = originals[i]
        canvas[:, 2 * gap + h:2 * gap + 2 * h, x:x + w] = recons[i]
    arr = (canvas.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    atomic_write_file(path, lambda tmp: Image.fromarray(arr).save(tmp, format="PNG"))


class TokenizerTask(ImageTask):
    kind = "tokenizer"
    default_export_ema = True
    eval_config = TokenizerEvalConfig
    export_kind = MODEL_KIND
    eval_options: TokenizerEvalConfig

    def __init__(self, config: Any, dry_run: bool = False) -> None:
        super().__init__(config, dry_run)
        from uniflow.presets import PRESETS

        merged, source = model_section(config, _preset, sorted(PRESETS))
        merged.pop("model_kind", None)
        self.tokenizer_config = TokenizerConfig.from_dict(merged, source)
        if config.gradient_checkpointing:
            self.tokenizer_config.decoder.gradient_checkpointing = True
        enc = self.tokenizer_config.encoder
        pretrained = enc.pretrained
        if dry_run:
            self.tokenizer_config.encoder.pretrained = None
        elif pretrained is not None and not Path(pretrained).exists():
            raise ConfigError(f"{source}.encoder.pretrained: {pretrained} not found (train the encoder first: "
                              f"`uniflow train encoder --config train/configs/encoder_tiny.yaml`)")
        elif pretrained is None:
            warnings.warn(f"{source}.encoder.pretrained is not set: the encoder (and the distillation teacher) "
                          "start from random weights", stacklevel=2)
        self.check_patch_size(enc.patch_size)

    @property
    def distill(self) -> bool:
        return self.tokenizer_config.distill_weight > 0

    def build_model(self) -> nn.Module:
        """Random init; the teacher is a second encoder build holding the student's initial weights (under ZeRO-3
        the engine overwrites both from rank 0's reference build, where this copy is real)."""
        config = dataclasses.replace(self.tokenizer_config,
                                     encoder=dataclasses.replace(self.tokenizer_config.encoder, pretrained=None))
        tokenizer = UniFlowTokenizer(config)
        if self.config.gradient_checkpointing:
            tokenizer.encoder.set_grad_checkpointing(True)
        teacher = None
        if self.distill:
            encoder = build_encoder(config.encoder)
            if not _is_partitioned(encoder):
                encoder.load_state_dict(tokenizer.encoder.state_dict())
            teacher = FrozenTeacher(encoder, copy_encoder=False)
        return TokenizerTrainModule(tokenizer, teacher)

    def initial_state(self) -> dict[str, torch.Tensor] | None:
        """The pretrained encoder's weights, for the student and (when distilling) the teacher."""
        prefixes = ["tokenizer.encoder."] + (["teacher.encoder."] if self.distill else [])
        return encoder_state(self.tokenizer_config.encoder, prefixes)

    def export_key(self, name: str) -> bool:
        return name.startswith("tokenizer.")

    @torch.no_grad()
    def evaluate(self, ctx: EvalContext) -> dict[str, float]:
        out: dict[str, float] = {}
        for suffix, scope in ctx.weight_scopes():
            with scope():
                value, grid = self._psnr(ctx)
            out[f"heldout_psnr{suffix}"], out[f"heldout_seam_ratio{suffix}"] = value
            if ctx.dist.is_main and grid is not None and self.eval_options.grid_images > 0:
                save_grid(*grid, ctx.run_dir / "samples" / f"recon_step{ctx.step:07d}{suffix}.png")
        return out

    def _psnr(self, ctx: EvalContext) -> tuple[tuple[float, float], tuple[torch.Tensor, torch.Tensor] | None]:
        """(mean PSNR, seam ratio) over the held-out images, and the first batch's (originals, reconstructions).
        The seam ratio pools squared errors over every image (border sum / count over interior sum / count), as
        `uniflow.metrics.patch_seam_ratio` does for one batch."""
        patch = self.tokenizer_config.encoder.patch_size
        total = torch.zeros(6, dtype=torch.float64)  # psnr sum, images, border sse, border px, inner sse, inner px
        grid = None
        for batch, weight in heldout_batches(ctx.heldout, self.data.heldout_samples, ctx.batch_size, ctx.dist,
                                             ctx.collate):
            recon = ctx.forward(batch, mode="reconstruct").float().cpu()
            scores = psnr(recon, batch["image"]).double().clamp(max=100.0)
            w = weight.double()
            err = (recon.double() - batch["image"].double()).pow(2).mean(1)  # (B, H, W)
            border = patch_border_mask(err.shape[-2], err.shape[-1], patch)
            total += torch.stack([(scores * w).sum(), w.sum(),
                                  (err[:, border].sum(1) * w).sum(), w.sum() * border.sum(),
                                  (err[:, ~border].sum(1) * w).sum(), w.sum() * (~border).sum()])
            if grid is None:
                k = min(self.eval_options.grid_images, recon.shape[0])
                grid = (batch["image"][:k], recon[:k])
        total = all_reduce_sum(total.to(ctx.dist.device)).cpu()
        seam = (total[2] / total[3].clamp_min(1)) / (total[4] / total[5].clamp_min(1)).clamp_min(1e-20)
        return (float(total[0] / total[1].clamp_min(1)), float(seam)), grid

    def export(self, state_dict: dict[str, torch.Tensor], out_dir: Path, dtype: torch.dtype | None,
               metrics: dict[str, float]) -> Path:
        prefix = "tokenizer."
        weights = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        model = UniFlowTokenizer.from_config(self.tokenizer_config, load_pretrained_encoder=False)
        load_state_strict(model, weights, f"training state of {self.config.run_dir}")
        return model.save_pretrained(out_dir, dtype=dtype, overwrite=True)
