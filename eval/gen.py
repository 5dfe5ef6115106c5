"""Generation quality (`uniflow eval gen`): FID, sFID, IS, precision and recall of a sample batch against a
reference batch, both in the ADM formats (`eval.npz`), computed as the ADM evaluator does (`eval.metrics_gen`).

Reference statistics: with `ref_stats="auto"` the reference's precomputed `mu`/`sigma` (and `mu_s`/`sigma_s`) are
used when present, as ADM does (they come from the TensorFlow graph; this project's features come from its
TorchScript port, so the pairing adds a small offset); `"images"` recomputes them from the reference images with the
same network as the samples. Precision and recall always use the reference images' features.

`--generator DIR --per-class K` samples the batch first (`sample_with_generator`, through
`generator.sample.write_npz`), then evaluates it the same way; the report records the generator's settings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from eval.inception import FeatureExtractor, InceptionNetwork, unavailable_is_reason
from eval.metrics_gen import (
    IS_SPLIT,
    MIN_FID_SAMPLES,
    PR_K,
    Stats,
    feature_stats,
    frechet_distance,
    inception_score,
    precision_recall,
    small_set_note,
)
from eval.npz import IMAGES_KEY, STATS_KEYS, check_images, file_sha256, iter_images, npz_keys, read_stats
from uniflow.errors import ConfigError, ImageInputError

REF_STATS = ("auto", "images")
MIN_SAMPLES = max(MIN_FID_SAMPLES, PR_K + 1)  # precision/recall need k + 1 points per set


def tokenizer_folder(generator_dir: str | Path, tokenizer: str | Path | None, flag: str = "--tokenizer") -> Path:
    """The tokenizer a generator decodes with: `tokenizer` when given, else `tokenizer/` beside the generator folder
    (the bundle layout, as `uniflow generate` picks it)."""
    if tokenizer is not None:
        return Path(tokenizer)
    beside = Path(generator_dir).parent / "tokenizer"
    if (beside / "config.json").is_file():
        return beside
    raise ConfigError(f"{flag}: required (no tokenizer/ folder beside {generator_dir}); give the tokenizer the "
                      f"generator was trained with")


def check_generator(generator_dir: str | Path, per_class: int, cfg: float | None,
                    tokenizer: str | Path | None = None) -> tuple[Any, dict[str, Any], Path]:
    """Everything `sample_with_generator` needs, checked before anything loads: the generator's config, the
    sampling options (its defaults filled in), enough samples for the metrics, the tokenizer folder."""
    from generator.model import GeneratorConfig
    from generator.sample import resolve_options
    from uniflow import checkpoint
    from uniflow.errors import CheckpointError

    folder = Path(generator_dir)
    try:
        config = GeneratorConfig.from_dict(checkpoint.read_config(folder), str(folder / checkpoint.CONFIG_NAME))
    except CheckpointError as exc:
        raise CheckpointError(f"--generator: {exc}") from None
    try:
        opts = resolve_options(config, cfg=cfg)
    except ConfigError as exc:
        raise ConfigError(f"--cfg: {str(exc).removeprefix('cfg: ')}") from None
    total = config.num_classes * per_class
    if total < MIN_SAMPLES:
        raise ConfigError(f"--per-class: {per_class} x {config.num_classes} class(es) = {total} sample(s); the "
                          f"metrics need at least {MIN_SAMPLES}")
    tok_dir = tokenizer_folder(folder, tokenizer)
    if not (tok_dir / "config.json").is_file():
        raise ConfigError(f"--tokenizer: {tok_dir} is not a tokenizer folder (no config.json)")
    return config, opts, tok_dir


def sample_with_generator(generator_dir: str | Path, per_class: int, out_dir: Path, cfg: float | None,
                          seed: int | None, batch_size: int, device: str, tokenizer: str | Path | None = None,
                          progress: bool = True) -> tuple[Path, dict[str, Any]]:
    """The one-shot path (`uniflow eval gen --generator DIR --per-class K`): sample K images of every class with
    `generator.sample.write_npz` (the ADM sample batch, resumable after an interruption) into `out_dir`, and return
    the file with the settings the report records (fingerprints, CFG, schedule, steps, temperature, seed).

    The file is named after the generator's fingerprint, K, the CFG scale and the seed; when it exists already (an
    earlier run with the same settings, which gives the same images: sample j uses seed + j) it is reused."""
    import sys

    from tqdm import tqdm

    from generator.fingerprint import state_fingerprint, tokenizer_fingerprint
    from generator.model import ARGenerator
    from generator.sample import parts_dir, write_npz
    from uniflow import UniFlowTokenizer
    from uniflow.errors import CheckpointError

    folder = Path(generator_dir)
    seed = 0 if seed is None else seed
    config, opts, tok_dir = check_generator(folder, per_class, cfg, tokenizer)
    total = config.num_classes * per_class
    model = ARGenerator.from_pretrained(folder, device=device)
    try:
        tok = UniFlowTokenizer.from_pretrained(tok_dir, device=device)
    except (CheckpointError, ConfigError) as exc:
        raise type(exc)(f"--tokenizer: {exc}") from None
    model.check_tokenizer(tok, f"--tokenizer {tok_dir}")
    fingerprint = state_fingerprint(config.to_dict(), model.state_dict())
    out = Path(out_dir) / f"samples-{fingerprint[:12]}-k{per_class}-cfg{opts['cfg']:g}-seed{seed}.npz"
    reused = out.is_file()
    if reused:
        print(f"reusing {out} (same generator, --per-class, --cfg and --seed; delete it to sample again)",
              file=sys.stderr)
    else:
        with tqdm(total=total, desc="generate", unit="img", file=sys.stderr, disable=not progress) as bar:
            try:
                write_npz(model, tok, out, range(config.num_classes), per_class, batch_size=batch_size, seed=seed,
                          progress=bar.update, **opts)
            except KeyboardInterrupt:
                print(f"interrupted: the finished batches are kept in {parts_dir(out)}; run the same command "
                      f"again to resume", file=sys.stderr)
                raise
    settings = {"generator": {"path": str(folder.resolve()), "fingerprint": fingerprint,
                              "tokenizer": str(tok_dir.resolve()), "tokenizer_fingerprint": tokenizer_fingerprint(tok)},
                **opts, "seed": seed, "seeds": f"sample j uses seed {seed} + j", "per_class": per_class,
                "classes": config.num_classes, "samples_reused": reused}
    return out, settings


def check_reference(ref: Path) -> None:
    """The reference file alone (images or statistics), before a generator samples anything."""
    ref_keys = set(npz_keys(ref, "--ref"))
    if IMAGES_KEY in ref_keys or not any(m in ref_keys and s in ref_keys for m, s in STATS_KEYS.values()):
        info = check_images(ref, "--ref")
        if info.count < MIN_SAMPLES:
            raise ImageInputError(f"--ref: {ref} holds {info.count} image(s); at least {MIN_SAMPLES} are needed "
                                  f"(precision/recall with k = {PR_K})")


def check_inputs(samples: Path, ref: Path) -> dict[str, Any]:
    """Validate both files before any compute: sample images, reference images and/or statistics, equal sizes,
    enough images. Returns what was found."""
    s_info = check_images(samples, "--samples")
    ref_keys = set(npz_keys(ref, "--ref"))
    stats_present = {kind for kind, (m, s) in STATS_KEYS.items() if m in ref_keys and s in ref_keys}
    r_info = None
    if IMAGES_KEY in ref_keys or not stats_present:
        r_info = check_images(ref, "--ref")
    if r_info is not None and (s_info.height, s_info.width) != (r_info.height, r_info.width):
        raise ImageInputError(f"images of mismatched sizes: --samples {samples} holds {s_info.size} images, --ref "
                              f"{ref} holds {r_info.size}; compare samples with a reference batch of their own "
                              f"resolution (ADM: VIRTUAL_imagenet<size>_labeled.npz)")
    if s_info.count < MIN_SAMPLES:
        raise ImageInputError(f"--samples: {samples} holds {s_info.count} image(s); FID needs at least "
                              f"{MIN_FID_SAMPLES} and precision/recall (k = {PR_K}) at least {MIN_SAMPLES}: give at "
                              f"least {MIN_SAMPLES} images")
    if r_info is not None and r_info.count < MIN_SAMPLES:
        raise ImageInputError(f"--ref: {ref} holds {r_info.count} image(s); at least {MIN_SAMPLES} are needed "
                              f"(precision/recall with k = {PR_K})")
    return {"samples": s_info, "ref": r_info, "stats_present": stats_present}


def evaluate_gen(samples: str | Path, ref: str | Path, network: InceptionNetwork, ref_stats: str = "auto",
                 batch_size: int = 32, cache: Path | None = None, progress: bool = True, device: str = "cpu",
                 extra_settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every metric of the ADM evaluator for one sample batch; returns the report (settings and results)."""
    samples, ref = Path(samples), Path(ref)
    if ref_stats not in REF_STATS:
        raise ConfigError(f"--ref-stats: expected one of {', '.join(REF_STATS)}, got {ref_stats!r}")
    found = check_inputs(samples, ref)
    s_info, r_info = found["samples"], found["ref"]
    if r_info is None and ref_stats == "images":
        raise ImageInputError(f"--ref-stats images: {ref} has no {IMAGES_KEY!r} images, only statistics")
    extractor = FeatureExtractor(network, batch_size, cache, progress)
    s_sha, r_sha = file_sha256(samples), file_sha256(ref)
    s_feats = extractor.extract(iter_images(samples, batch_size, "--samples"), s_info.count,
                                key=f"file-{s_sha}", desc="samples")
    r_feats = None
    if r_info is not None:
        r_feats = extractor.extract(iter_images(ref, batch_size, "--ref"), r_info.count, key=f"file-{r_sha}",
                                    desc="reference")
    precomputed = read_stats(ref, "--ref") if ref_stats == "auto" else {}
    results: dict[str, Any] = {}
    sources: dict[str, str] = {}
    notes: list[str] = []
    for kind, metric in (("pool", "fid"), ("spatial", "sfid")):
        s_stats = feature_stats(getattr(s_feats, kind), f"--samples {kind} features")
        if kind in precomputed:
            mu, sigma = precomputed[kind]
            r_stats, sources[metric] = Stats(mu, sigma), f"precomputed in the reference ({'/'.join(STATS_KEYS[kind])})"
        elif r_feats is None:
            results[metric] = None
            sources[metric] = f"unavailable: the reference holds neither images nor {'/'.join(STATS_KEYS[kind])}"
            continue
        else:
            r_stats, sources[metric] = feature_stats(getattr(r_feats, kind), f"--ref {kind} features"), \
                "computed from the reference images"
        if r_stats.mu.shape != s_stats.mu.shape:
            raise ImageInputError(f"--ref: {ref}: statistics {STATS_KEYS[kind][0]} have {r_stats.mu.shape[0]} "
                                  f"dimensions, the network gives {s_stats.mu.shape[0]}")
        results[metric] = frechet_distance(s_stats, r_stats)
    if s_feats.logits is not None:
        results["inception_score"] = inception_score(s_feats.logits)
    else:
        results["inception_score"] = None
        results["inception_score_unavailable"] = unavailable_is_reason(network)
    if r_feats is not None:
        results["precision"], results["recall"] = precision_recall(r_feats.pool, s_feats.pool, device=device)
    else:
        results["precision"] = results["recall"] = None
        notes.append("precision/recall unavailable: the reference holds statistics only, no images")
    for what, count in (("samples", s_info.count), ("reference", r_info.count if r_info else None)):
        note = small_set_note(count, s_feats.pool.shape[1]) if count else None
        if note:
            notes.append(f"{what}: {note}")
    settings = {
        "samples": {"path": str(samples.resolve()), "sha256": s_sha, "images": s_info.count, "size": s_info.size},
        "ref": {"path": str(ref.resolve()), "sha256": r_sha, "images": r_info.count if r_info else None,
                "size": r_info.size if r_info else None, "precomputed_stats": sorted(found["stats_present"])},
        "ref_stats": ref_stats,
        "statistics_source": sources,
        "inception": network.info(),
        "inception_score": f"ADM: softmax of pool @ output.weight (no bias), splits of {IS_SPLIT}",
        "precision_recall": f"k-NN manifolds, k = {PR_K}, squared Euclidean distances in float64 (ADM: float16)",
        "batch_size": batch_size,
        "feature_cache_hits": extractor.hits,
        **(extra_settings or {}),
    }
    return {"kind": "gen", "settings": settings, "results": results, "notes": notes}


def summary_table(report: dict[str, Any]) -> str:
    r = report["results"]

    def fmt(value: float | None, spec: str) -> str:
        return format(value, spec) if value is not None else "-".rjust(int(spec.split(".")[0]))

    lines = [f"{'FID':>9}  {'sFID':>9}  {'IS':>8}  {'precision':>9}  {'recall':>6}",
             f"{fmt(r['fid'], '9.3f')}  {fmt(r['sfid'], '9.3f')}  {fmt(r['inception_score'], '8.2f'):>8}  "
             f"{fmt(r['precision'], '9.4f'):>9}  {fmt(r['recall'], '6.4f'):>6}"]
    if r.get("inception_score_unavailable"):
        lines.append(f"IS {r['inception_score_unavailable']}")
    return "\n".join(lines)
