"""`transformers` vision towers (SigLIP, SigLIP2, CLIP, DINOv2, DINOv2 with registers) as UniFlow encoders.

`config.arch` is the `transformers` model_type. Without `pretrained` the model is built from its config class
(`AutoConfig.for_model(arch, image_size=..., patch_size=..., **config.kwargs)`); with it, `pretrained` is a local folder
written by `save_pretrained`, holding either the vision model itself or a dual model (e.g. a full `SiglipModel`) whose
`vision_config` has that model_type; only the vision tower is loaded. Remote code is never trusted.

`patch_size`, `width` and `num_layers` are read back from the built model's config (with a pretrained folder, the
folder is the truth, not the preset's defaults; `kwargs` override `config.image_size/patch_size` when building from a
config). `image_size` stays `config.image_size`: the size callers resize to, whatever the position embedding's native
grid is.

Hidden states are `output_hidden_states=True`'s, minus the embedding output, computed only up to the deepest requested
layer (the blocks past it are left out of the module list for that call); CLS (CLIP, DINOv2) and register tokens
(DINOv2 with registers) are dropped; SigLIP has neither. Non-native sizes work: CLIP and SigLIP get
`interpolate_pos_encoding=True`, DINOv2 always interpolates, and SigLIP2 takes its native patch-sequence input, which
this adapter builds from the image (patches flattened as (row, col, channel), as its image processor does), with
`spatial_shapes` set to the grid so its position embedding is resized to it.

Last layer: the raw output of the last block, before the model's final norm (`post_layernorm` / `layernorm`), as in
every backend. Modules nothing reads are dropped after loading (final norms, SigLIP's attention-pooling head) and
DINOv2's `mask_token` (used only for masked image modelling) is frozen, so every trainable parameter gets a gradient.

Normalisation: `config.mean/std`, else `image_mean/std` from the pretrained folder's `preprocessor_config.json`, else
the family's: SigLIP/SigLIP2 0.5/0.5, CLIP OpenAI's CLIP mean/std, DINOv2 ImageNet's.
"""

from __future__ import annotations

import contextlib
import inspect
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig

from uniflow.encoders.base import IMAGENET_MEAN, IMAGENET_STD, EncoderConfig, VisionEncoder
from uniflow.errors import CheckpointError, ConfigError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class _Family:
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    has_cls: bool
    patch_sequence_input: bool = False  # SigLIP2: pixel_values are (B, N, p*p*3) patches plus spatial_shapes


FAMILIES: dict[str, _Family] = {
    "siglip_vision_model": _Family(HALF, HALF, has_cls=False),
    "siglip2_vision_model": _Family(HALF, HALF, has_cls=False, patch_sequence_input=True),
    "clip_vision_model": _Family(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, has_cls=True),
    "dinov2": _Family(IMAGENET_MEAN, IMAGENET_STD, has_cls=True),
    "dinov2_with_registers": _Family(IMAGENET_MEAN, IMAGENET_STD, has_cls=True),
}

# Parts of the HF models that produce nothing this adapter returns.
_FINAL_NORMS = ("post_layernorm", "layernorm")


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence `transformers`' load report: this adapter checks the loading info itself and raises on real problems."""
    previous = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(previous)


def _int_size(value: Any) -> int:
    return int(value[0]) if isinstance(value, (list, tuple)) else int(value)


class HFEncoder(VisionEncoder):
    """`transformers` vision-model adapter: `self.model` is the HF model, so state-dict keys are `model.<HF name>`."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        if config.arch not in FAMILIES:
            raise ConfigError(
                f"encoder.arch: {config.arch!r} is not a supported transformers vision model_type for the 'hf' "
                f"backend; expected one of {sorted(FAMILIES)}"
            )
        family = FAMILIES[config.arch]
        self.arch = config.arch
        if config.pretrained:
            model, hf_config = self._from_folder(config)
        else:
            model, hf_config = self._from_config(config)
        self._strip_unused(model)
        self.model = model
        self._blocks_at = self._find_blocks(model)  # (path of the module holding the blocks, attribute name)
        self._patch_sequence_input = family.patch_sequence_input
        self._interpolate_kw = "interpolate_pos_encoding" in inspect.signature(model.forward).parameters

        self.patch_size = _int_size(hf_config.patch_size)
        self.width = int(hf_config.hidden_size)
        self.num_layers = int(hf_config.num_hidden_layers)
        self.image_size = config.image_size  # the size callers resize to; the position embedding adapts to it
        self.num_prefix_tokens = int(family.has_cls) + int(getattr(hf_config, "num_register_tokens", 0) or 0)

        mean, std = family.mean, family.std
        if config.pretrained:
            mean, std = self._folder_norm(Path(config.pretrained), mean, std)
        self._register_norm(tuple(config.mean or mean), tuple(config.std or std))

    @staticmethod
    def _from_config(config: EncoderConfig) -> tuple[nn.Module, PretrainedConfig]:
        if config.arch == "siglip2_vision_model":  # SigLIP2 sizes its position embedding by patch count
            sizes: dict[str, Any] = {"num_patches": (config.image_size // config.patch_size) ** 2}
        else:
            sizes = {"image_size": config.image_size}
        try:
            hf_config = AutoConfig.for_model(config.arch, **{"patch_size": config.patch_size, **sizes, **config.kwargs})
            model = AutoModel.from_config(hf_config)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"encoder: cannot build {config.arch!r} with {config.kwargs}: {exc}") from exc
        return model, model.config

    @staticmethod
    def _from_folder(config: EncoderConfig) -> tuple[nn.Module, PretrainedConfig]:
        folder = Path(config.pretrained or "")
        if not (folder / "config.json").is_file():
            raise CheckpointError(f"{folder}: the 'hf' backend expects a save_pretrained folder (with config.json)")
        hf_config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
        if hf_config.model_type != config.arch:
            vision = getattr(hf_config, "vision_config", None)
            if getattr(vision, "model_type", None) != config.arch:
                raise ConfigError(
                    f"{folder}: holds a {hf_config.model_type!r} model, not a {config.arch!r} vision model "
                    f"(encoder.arch) nor a model with such a vision_config"
                )
            hf_config = vision
        model_class = transformers.MODEL_MAPPING[type(hf_config)]
        with _quiet_transformers():
            model, info = model_class.from_pretrained(
                folder, config=hf_config, trust_remote_code=False, output_loading_info=True
            )
        # Weights of the parts stripped afterwards may be absent; anything else missing would be random.
        missing = sorted(
            k for k in info.get("missing_keys", ())
            if not any(part in k.split(".") for part in (*_FINAL_NORMS, "head", "mask_token"))
        )
        if missing or info.get("mismatched_keys"):
            raise CheckpointError(
                f"{folder}: weights do not match {model_class.__name__}; missing keys: {missing}; "
                f"mismatched keys: {sorted(info.get('mismatched_keys', ()))}"
            )
        return model.float(), hf_config

    @staticmethod
    def _folder_norm(
        folder: Path, mean: tuple[float, ...], std: tuple[float, ...]
    ) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """The folder's own preprocessing mean/std, when it ships a preprocessor_config.json."""
        path = folder / "preprocessor_config.json"
        if path.is_file():
            data = json.loads(path.read_text())
            mean = tuple(data.get("image_mean", mean))
            std = tuple(data.get("image_std", std))
        return mean, std

    @staticmethod
    def _find_blocks(model: nn.Module) -> tuple[str, str]:
        """Where the transformer blocks are: the encoder's path and attribute (`layers`, or DINOv2's `layer`)."""
        for path in ("encoder", "vision_model.encoder"):
            for name in ("layers", "layer"):
                try:
                    if isinstance(model.get_submodule(f"{path}.{name}"), nn.ModuleList):
                        return path, name
                except AttributeError:
                    continue
        raise ConfigError(f"encoder.arch: cannot find the transformer blocks of {type(model).__name__}")

    @staticmethod
    def _strip_unused(model: nn.Module) -> None:
        """Replace the final norms and pooling head by nothing; freeze DINOv2's mask token (module docstring)."""
        owners = [model]
        inner = getattr(model, "vision_model", None)  # older transformers wrap the tower one level deeper
        if isinstance(inner, nn.Module):
            owners.append(inner)
        for owner in owners:
            for name in _FINAL_NORMS:
                if isinstance(getattr(owner, name, None), nn.LayerNorm):
                    setattr(owner, name, nn.Identity())
            if getattr(owner, "use_head", False):
                owner.use_head = False
                del owner.head
        for name, param in model.named_parameters():
            if name.split(".")[-1] == "mask_token":
                param.requires_grad_(False)

    @contextlib.contextmanager
    def _first_blocks(self, depth: int) -> Iterator[None]:
        """Within the block the model holds only its first `depth` transformer blocks, so it computes no more."""
        path, name = self._blocks_at
        owner = self.model.get_submodule(path)
        full = getattr(owner, name)
        if depth == len(full):
            yield
            return
        setattr(owner, name, full[:depth])
        try:
            yield
        finally:
            setattr(owner, name, full)

    def encode_normalized(self, pixel_values: torch.Tensor, layers: Sequence[int]) -> list[torch.Tensor]:
        """Patch tokens of the requested layers from one forward pass (`output_hidden_states=True`) through the
        blocks up to the deepest requested one."""
        gh, gw = self.grid_for(pixel_values.shape[-2], pixel_values.shape[-1])
        depth = max(layers) + 1
        with self._first_blocks(depth):
            if self._patch_sequence_input:
                b, c, p = pixel_values.shape[0], pixel_values.shape[1], self.patch_size
                patches = pixel_values.reshape(b, c, gh, p, gw, p).permute(0, 2, 4, 3, 5, 1)
                out = self.model(
                    pixel_values=patches.reshape(b, gh * gw, p * p * c),
                    pixel_attention_mask=torch.ones(b, gh * gw, dtype=torch.long, device=pixel_values.device),
                    spatial_shapes=torch.tensor([[gh, gw]] * b, dtype=torch.long, device=pixel_values.device),
                    output_hidden_states=True,
                )
            else:
                kwargs = {"interpolate_pos_encoding": True} if self._interpolate_kw else {}
                out = self.model(pixel_values=pixel_values, output_hidden_states=True, **kwargs)
        hidden = out.hidden_states[-depth:]
        tokens = [hidden[i][:, self.num_prefix_tokens :] for i in layers]
        if tokens[-1].shape[1] != gh * gw:
            raise RuntimeError(
                f"{self.arch}: got {tokens[-1].shape[1]} patch tokens for a {gh}x{gw} grid; prefix-token count is wrong"
            )
        return tokens

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        # `activation_checkpointing_*` replaces `gradient_checkpointing_*` in recent transformers (deprecated in v5).
        if hasattr(self.model, "activation_checkpointing_enable"):
            if enable:
                self.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                self.model.activation_checkpointing_disable()
        elif enable:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            self.model.gradient_checkpointing_disable()
