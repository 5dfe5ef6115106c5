"""Sampling from an `ARGenerator`, apart from the model (LlamaGen keeps its sampling loop apart the same way).

- **Prefill + static KV cache**: the class position is prefilled, then one position per token; keys and values live
  in a cache allocated once (`generator.model.KVCache`), so no step allocates. Eager steps attend over a view of
  its filled positions; compiled ones over all of it under a mask, so their shapes never change (one graph).
  `use_cache=False` recomputes the whole prefix for every token instead (the reference the tests and the benchmark
  compare against).
- **Classifier-free guidance** as one batched pass: the conditional rows and the null-class rows run together through
  the transformer and the head, and the velocity is v_u + s (v_c - v_u) (`uniflow.flow.guided`'s rule). The scale s
  is constant or grows linearly with the tokens already generated, 1 + (s - 1) i / N (MAR's schedule). s = 1 runs
  no unconditional rows at all: it is the conditional model exactly.
- **Temperature** scales the head's initial noise (x0 ~ N(0, T^2)); **steps / sampler**: the head's ODE
  (`uniflow.flow.sample`, Euler or Heun).
- **Per-sample seeds**: sample b draws all its noise, for every token, from its own generator seeded with
  seeds[b] (and its decoder noise from the same seed), so a sample does not depend on what else is in its batch.
- `compile=True` runs the decoding step and the head through `torch.compile`.

`sample_images` decodes with the tokenizer (denormalising with the statistics the generator was trained with);
`write_npz` writes the ADM evaluator's sample file, resumably.
"""

from __future__ import annotations

import json
import math
import shutil
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from generator.fingerprint import state_fingerprint, tokenizer_fingerprint
from generator.model import CFG_SCHEDULES, ARGenerator, GeneratorConfig
from uniflow import flow
from uniflow.configs import check_choice, check_int, check_number
from uniflow.errors import ConfigError, OutputError
from uniflow.fileio import atomic_write_file, atomic_write_text

SEED_BOUND = 2**63


def resolve_options(config: GeneratorConfig, cfg: float | None = None, cfg_schedule: str | None = None,
                    temperature: float | None = None, steps: int | None = None, sampler: str | None = None
                    ) -> dict[str, Any]:
    """The sampling options with the checkpoint's defaults filled in, each range-checked (ConfigError naming it)."""
    c = config
    out = {"cfg": c.cfg_scale if cfg is None else cfg,
           "cfg_schedule": c.cfg_schedule if cfg_schedule is None else cfg_schedule,
           "temperature": c.temperature if temperature is None else temperature,
           "steps": c.flow.sample_steps if steps is None else steps,
           "sampler": c.flow.sampler if sampler is None else sampler}
    check_number("cfg", out["cfg"], 0.0, None)
    check_choice("cfg_schedule", out["cfg_schedule"], CFG_SCHEDULES)
    check_number("temperature", out["temperature"], 0.0, None, lo_open=True)
    flow.check_sampler(out["sampler"], out["steps"])
    return out


def seeds_for(seeds: int | Sequence[int] | None, batch: int) -> list[int]:
    """One seed per sample: an int s gives s, s + 1, ...; a sequence is taken as is; None draws them from torch's
    global generator."""
    if seeds is None:
        return torch.randint(0, 2**62, (batch,)).tolist()
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        seeds = [seeds + i for i in range(batch)]
    seeds = list(seeds)
    if len(seeds) != batch:
        raise ConfigError(f"seeds: {len(seeds)} seeds for {batch} samples")
    for s in seeds:
        check_int("seed", s, 0, SEED_BOUND)
    return seeds


def initial_noise(seeds: Sequence[int], tokens: int, channels: int) -> torch.Tensor:
    """(B, N, C) float32 on the CPU: sample b's head noise for every token, from its own generator."""
    return torch.stack([torch.randn(tokens, channels, generator=torch.Generator().manual_seed(s)) for s in seeds])


def cfg_at(scale: float, schedule: str, generated: int, total: int) -> float:
    """The guidance scale for the next token when `generated` of `total` tokens exist."""
    if schedule == "constant":
        return scale
    return 1.0 + (scale - 1.0) * generated / total


def _compiled(model: ARGenerator) -> tuple[Callable[..., Any], Callable[..., Any]]:
    cache = model.__dict__.setdefault("_compiled_fns", {})
    if "step" not in cache:
        cache["step"] = torch.compile(model.step, dynamic=False)
        cache["head"] = torch.compile(model.head.token_path, dynamic=False)
    return cache["step"], cache["head"]


@torch.no_grad()
def sample_latents(model: ARGenerator, labels: Sequence[int] | torch.Tensor, seeds: int | Sequence[int] | None = None,
                   cfg: float | None = None, cfg_schedule: str | None = None, temperature: float | None = None,
                   steps: int | None = None, sampler: str | None = None, use_cache: bool = True,
                   compile: bool = False) -> torch.Tensor:
    """Normalised latents (B, N, C) (float32, CPU) for class ids `labels` (the null id `num_classes` samples the
    unconditional model). Options default to the checkpoint's (`resolve_options`)."""
    c = model.config
    opts = resolve_options(c, cfg, cfg_schedule, temperature, steps, sampler)
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1).cpu()
    if labels.numel() == 0:
        raise ConfigError("labels: no samples requested")
    bad = labels[(labels < 0) | (labels > c.num_classes)]
    if bad.numel():
        raise ConfigError(f"class id {int(bad[0])}: out of range; expected [0, {c.num_classes})")
    batch, n, channels = labels.numel(), c.num_tokens, c.token_channels
    noise = initial_noise(seeds_for(seeds, batch), n, channels) * opts["temperature"]
    device, dtype = model.device, model.dtype
    guided = opts["cfg"] != 1.0
    rows = torch.cat([labels, torch.full_like(labels, model.null_class)]) if guided else labels
    rows = rows.to(device)
    step_fn, head_fn = _compiled(model) if compile else (model.step, model.head.token_path)
    times = flow.time_grid(opts["steps"], device)
    out = torch.zeros(batch, n, channels, device=device, dtype=dtype)
    cache = model.new_cache(rows.numel()) if use_cache else None
    if cache is not None:
        hidden = model.hidden_states(model.inputs(rows, None), cache)[:, -1]
    for i in range(n):
        if cache is None:
            prefix = out[:, :i]
            hidden = model.hidden_states(model.inputs(rows, torch.cat([prefix, prefix]) if guided else prefix))[:, -1]
        scale = cfg_at(opts["cfg"], opts["cfg_schedule"], i, n)
        token = _sample_token(model, head_fn, hidden, times, noise[:, i].to(device, dtype), scale, guided,
                              opts["sampler"])
        out[:, i] = token
        if cache is not None and i + 1 < n:
            x = model.input_proj(token)
            x = torch.cat([x, x]) if guided else x
            filled = None if compile else i + 2  # eager: attend over the filled cache positions only
            hidden = step_fn(x[:, None], torch.tensor(i + 1, device=device), cache, filled)
    return out.float().cpu()


def _sample_token(model: ARGenerator, token_path: Callable[..., Any], hidden: torch.Tensor, times: torch.Tensor,
                  x0: torch.Tensor, scale: float, guided: bool, sampler: str) -> torch.Tensor:
    """Integrate the head's flow over the grid `times` for one token of every sample. The head's condition terms
    are computed once for the whole grid (`FlowHead.grid_modulations`); with `guided`, hidden holds the conditional
    rows then the unconditional ones, and both run in one head pass per ODE evaluation."""
    terms = model.head.grid_modulations(hidden, times)
    net = flow.as_grid_velocity(lambda i, x: token_path(x, terms[i]), times, model.config.prediction)
    if not guided:
        return flow.integrate(net, x0, times, sampler)

    def velocity(i: int, x: torch.Tensor) -> torch.Tensor:
        v_c, v_u = net(i, torch.cat([x, x])).chunk(2)
        return v_u + scale * (v_c - v_u)

    return flow.integrate(velocity, x0, times, sampler)


@torch.no_grad()
def sample_images(model: ARGenerator, tokenizer: Any, labels: Sequence[int] | torch.Tensor,
                  seeds: int | Sequence[int] | None = None, decode_steps: int | None = None,
                  decode_sampler: str | None = None, check_tokenizer: bool = True, **options: Any) -> torch.Tensor:
    """Images (B, 3, H, W) in [0, 1] (float32, CPU): sample latents, denormalise them with the generator's
    statistics and decode each sample with the tokenizer (decoder noise from the sample's seed). `options`: those
    of `sample_latents`. The tokenizer is checked against the generator's record (`ARGenerator.check_tokenizer`)
    unless `check_tokenizer=False` (callers that checked it once already)."""
    if check_tokenizer:
        model.check_tokenizer(tokenizer)
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    seed_list = seeds_for(seeds, labels.numel())
    latents = sample_latents(model, labels, seed_list, **options)
    latents = model.latent_stats().denormalize(latents)
    images = [tokenizer.decode(latents[b:b + 1], grid=tuple(model.config.grid), steps=decode_steps,
                               sampler=decode_sampler, seed=seed_list[b]).float().cpu()
              for b in range(labels.numel())]
    return torch.cat(images)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [0, 1] -> uint8 (B, H, W, 3), as the ADM evaluator reads samples."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def image_grid(images: torch.Tensor, columns: int, gap: int = 2) -> Image.Image:
    """Images (B, 3, H, W) in [0, 1] laid out `columns` per row with white gutters."""
    arr = to_uint8(images)
    b, h, w, _ = arr.shape
    rows = math.ceil(b / columns)
    canvas = np.full((rows * (h + gap) + gap, columns * (w + gap) + gap, 3), 255, dtype=np.uint8)
    for i in range(b):
        r, c = divmod(i, columns)
        canvas[gap + r * (h + gap):gap + r * (h + gap) + h, gap + c * (w + gap):gap + c * (w + gap) + w] = arr[i]
    return Image.fromarray(canvas)


# ------------------------------------------------------------------------------------------------ the ADM sample file
PARTS_SUFFIX = ".parts"
MANIFEST = "manifest.json"


def parts_dir(out: Path) -> Path:
    """Where an `--npz` run keeps its finished batches until the file is complete: a hidden folder beside it."""
    return out.parent / f".{out.name}{PARTS_SUFFIX}"


def npz_plan(classes: Sequence[int], per_class: int) -> tuple[np.ndarray, np.ndarray]:
    """(labels, sample indices) of every sample: `per_class` samples of each class in turn; sample j's seed is
    `seed + j`, so any batch can be produced alone, in any order, and gives the same images."""
    check_int("per_class", per_class, 1, None)
    labels = np.repeat(np.asarray(list(classes), dtype=np.int64), per_class)
    return labels, np.arange(labels.size, dtype=np.int64)


def write_npz(model: ARGenerator, tokenizer: Any, out: str | Path, classes: Sequence[int], per_class: int,
              batch_size: int = 16, seed: int = 0, overwrite: bool = False,
              progress: Callable[[int], Any] | None = None, decode_steps: int | None = None,
              decode_sampler: str | None = None, **options: Any) -> Path:
    """Write `out` (.npz) in the ADM evaluator's format: `arr_0` uint8 (N, H, W, 3), `arr_1` int64 labels (N,).

    Resumable: each finished batch is stored in a hidden folder beside `out` (`.<name>.parts/`, with a manifest of
    the settings); a rerun with the same settings skips the batches that exist, so an interrupted run ends with
    exactly the samples an uninterrupted one writes (no duplicates, none missing). Other settings over an existing
    folder are refused. The images are assembled on disk (memory-mapped), then zipped into `out` atomically.
    progress(n) is called with the number of samples each batch adds (skipped batches included).
    """
    out = Path(out)
    check_int("batch_size", batch_size, 1, None)
    check_int("seed", seed, 0, SEED_BOUND)
    if out.exists() and not overwrite:
        raise OutputError(f"--npz: {out} already exists; pass --overwrite to replace it")
    labels, index = npz_plan(model.class_ids(list(classes)), per_class)
    opts = resolve_options(model.config, **{k: options.get(k) for k in ("cfg", "cfg_schedule", "temperature", "steps",
                                                                  "sampler")})
    settings = {"generator": state_fingerprint(model.config.to_dict(), model.state_dict()),
                "tokenizer": tokenizer_fingerprint(tokenizer), "labels_sha": _labels_key(labels),
                "count": int(labels.size), "batch_size": batch_size, "seed": seed, "decode_steps": decode_steps,
                "decode_sampler": decode_sampler, **opts}
    parts = parts_dir(out)
    manifest = parts / MANIFEST
    if parts.is_dir() and manifest.is_file():
        try:
            previous = json.loads(manifest.read_text())
        except (OSError, json.JSONDecodeError):
            previous = None
        if previous != settings:
            raise OutputError(f"--npz: {parts} holds an interrupted run with other settings (generator, tokenizer, "
                              f"classes, count, seed, batch size or sampling options); rerun with the same options "
                              f"to resume it, or remove that folder")
    else:
        parts.mkdir(parents=True, exist_ok=True)
        atomic_write_text(manifest, json.dumps(settings, indent=2))
    model.check_tokenizer(tokenizer, "--tokenizer")
    chunks = math.ceil(labels.size / batch_size)
    for k in range(chunks):
        path = parts / f"chunk_{k:06d}.npz"
        lo, hi = k * batch_size, min((k + 1) * batch_size, labels.size)
        if not path.is_file():
            images = sample_images(model, tokenizer, labels[lo:hi], [seed + int(j) for j in index[lo:hi]],
                                   decode_steps=decode_steps, decode_sampler=decode_sampler, check_tokenizer=False,
                                   compile=bool(options.get("compile", False)), **opts)
            arr, lab = to_uint8(images), labels[lo:hi]
            atomic_write_file(path, lambda tmp, arr=arr, lab=lab: _save_npz(tmp, arr_0=arr, arr_1=lab))
        if progress is not None:
            progress(hi - lo)
    _assemble(parts, chunks, labels, out)
    shutil.rmtree(parts, ignore_errors=True)
    return out


def _labels_key(labels: np.ndarray) -> str:
    import hashlib

    return hashlib.sha256(labels.tobytes()).hexdigest()


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    with open(path, "wb") as fh:  # a file object: np.savez would append ".npz" to a name without it
        np.savez(fh, **arrays)


def _assemble(parts: Path, chunks: int, labels: np.ndarray, out: Path) -> None:
    """Concatenate the batches in order into `arr_0.npy` (memory-mapped) and `arr_1.npy`, check that every sample
    is there exactly once with its label, and zip them (stored, as np.savez does) into `out` atomically."""
    arr0 = None
    pos = 0
    for k in range(chunks):
        with np.load(parts / f"chunk_{k:06d}.npz") as data:
            images, lab = data["arr_0"], data["arr_1"]
        if not np.array_equal(lab, labels[pos:pos + len(lab)]):
            raise OutputError(f"{parts / f'chunk_{k:06d}.npz'}: labels do not match the plan; remove {parts}")
        if arr0 is None:
            arr0 = np.lib.format.open_memmap(parts / "arr_0.npy", mode="w+", dtype=np.uint8,
                                             shape=(labels.size, *images.shape[1:]))
        arr0[pos:pos + len(images)] = images
        pos += len(images)
    if pos != labels.size or arr0 is None:
        raise OutputError(f"{parts}: {pos} samples assembled, expected {labels.size}; remove the folder and rerun")
    arr0.flush()
    del arr0
    np.save(parts / "arr_1.npy", labels)

    def write(tmp: Path) -> None:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            zf.write(parts / "arr_0.npy", "arr_0.npy")
            zf.write(parts / "arr_1.npy", "arr_1.npy")

    atomic_write_file(out, write)
