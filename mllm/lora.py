"""LoRA through `peft`: wrapping the LLM, and LoRA folders that record their base.

A LoRA folder is peft's own layout (`adapter_config.json`, `adapter_model.safetensors`, loadable by
`peft.PeftModel.from_pretrained` too) plus `uniflow_base.json`: the base LLM's source, architecture and an embedding
probe (`mllm.llm.base_record`). Loading refuses a folder whose base is not the model it is applied to, instead of
silently adding one model's deltas to another.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mllm.config import LoraConfig
from mllm.llm import check_base
from uniflow.configs import read_json
from uniflow.errors import CheckpointError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
BASE_RECORD = "uniflow_base.json"
ADAPTER_NAME = "default"


def require_peft() -> Any:
    try:
        import peft
    except ImportError:
        raise CheckpointError("LoRA needs the `peft` package; install it with `pip install peft`") from None
    return peft


def _peft_config(config: LoraConfig) -> Any:
    peft = require_peft()
    return peft.LoraConfig(r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout,
                           target_modules=list(config.target_modules), bias="none", task_type="CAUSAL_LM")


def _zero_lora_b(model: nn.Module) -> None:
    """LoRA's B matrices start at zero, so the wrapped model starts as the base. Built under ZeRO-3's zero.Init,
    peft's own initialisation of partitioned parameters is skipped (train/engine.py), so it is redone here, gathered
    (a collective: every rank builds the model)."""
    params = [p for n, p in model.named_parameters() if ".lora_B." in n]
    if not params or not hasattr(params[0], "ds_id"):
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=0), torch.no_grad():
        for p in params:
            p.zero_()


def wrap_lora(llm: nn.Module, config: LoraConfig) -> nn.Module:
    """The LLM with LoRA adapters on `config.target_modules` (only they train); a clear error when none of the
    names exists in this LLM."""
    names = {n.rsplit(".", 1)[-1] for n, _ in llm.named_modules()}
    missing = [t for t in config.target_modules if t not in names]
    if len(missing) == len(config.target_modules):
        raise CheckpointError(f"lora.target_modules {list(config.target_modules)}: none of them is a module of this "
                              f"LLM ({type(llm).__name__})")
    model = require_peft().get_peft_model(llm, _peft_config(config))
    _zero_lora_b(model)
    return model


def lora_state(state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """The LoRA tensors of a state dict (keys under `prefix`, e.g. "llm."), in peft's file layout (adapter name
    removed: `...q_proj.lora_A.weight`)."""
    out = {}
    for key, value in state.items():
        if key.startswith(prefix) and (".lora_A." in key or ".lora_B." in key):
            out[key[len(prefix):].replace(f".{ADAPTER_NAME}.", ".")] = value
    return out


def save_lora(folder: Path, tensors: dict[str, torch.Tensor], config: LoraConfig, base: dict[str, Any],
              dtype: torch.dtype | None = None) -> None:
    """Write a LoRA folder (peft's layout + the base record) into `folder` (the caller makes it atomic)."""
    from safetensors.torch import save_file

    from uniflow.checkpoint import check_finite

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous()
               for k, v in tensors.items()}
    check_finite(tensors, f"{folder}: LoRA weights")
    _peft_config(config).save_pretrained(str(folder))
    save_file(tensors, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (folder / BASE_RECORD).write_text(json.dumps(base, indent=1) + "\n")


def load_lora(model: nn.Module, folder: Path, base: dict[str, Any]) -> None:
    """Load a LoRA folder into a peft-wrapped LLM whose base is described by `base`; refuses another base's LoRA
    (CheckpointError naming the folder), and any key or shape mismatch."""
    from peft import set_peft_model_state_dict

    from uniflow.checkpoint import read_safetensors

    record_path = folder / BASE_RECORD
    if not record_path.is_file():
        raise CheckpointError(f"{folder}: not a LoRA folder of this project (no {BASE_RECORD} naming its base)")
    check_base(read_json(record_path, CheckpointError), base, f"the LoRA in {folder}")
    tensors = read_safetensors(folder / ADAPTER_WEIGHTS)
    own = lora_state(dict(model.named_parameters()), "")
    own = {k.removeprefix("base_model.model."): v for k, v in own.items()}
    files = {k.removeprefix("base_model.model."): v for k, v in tensors.items()}
    missing, unexpected = sorted(set(own) - set(files)), sorted(set(files) - set(own))
    shapes = [k for k in set(own) & set(files) if tuple(own[k].shape) != tuple(files[k].shape)]
    if missing or unexpected or shapes:
        raise CheckpointError(f"{folder / ADAPTER_WEIGHTS}: does not match the model's LoRA layers (missing "
                              f"{missing[:3]}, unexpected {unexpected[:3]}, mis-shaped {sorted(shapes)[:3]}); was it "
                              f"written with other lora settings?")
    result = set_peft_model_state_dict(model, tensors, adapter_name=ADAPTER_NAME)
    unexpected_keys = getattr(result, "unexpected_keys", [])
    if unexpected_keys:
        raise CheckpointError(f"{folder / ADAPTER_WEIGHTS}: peft did not place {unexpected_keys[:3]}")
