"""The models behind `uniflow demo`: which folders serve which tab, and loading each once, lazily, thread-safely.

A tab's model loads on its first use (the tab being opened, or its first request) and stays in memory; concurrent
first requests wait for one load instead of loading twice. A missing folder makes its tab unavailable with a message
saying what is missing and how to get it; the other tabs work. A folder that fails to load keeps its one-line error,
which every later request of that tab reports (the app keeps serving the others).

Which folders: `--bundle DIR` (default: the repository's `checkpoints/shapeworld`) gives `tokenizer/`, `generator/`
and `mllm/`; `--tokenizer`, `--generator` and `--mllm` replace single parts. The generator decodes with the tokenizer
beside it (`tokenizer/` in its parent folder, the bundle layout) when there is one, else with the demo's tokenizer.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from uniflow.errors import CheckpointError, ConfigError, UniFlowError

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BUNDLE = ROOT / "checkpoints" / "shapeworld"
CONFIG_NAME = "config.json"
DTYPES = ("auto", "float32", "float16", "bfloat16")
PARTS = ("tokenizer", "generator", "mllm")


@dataclass(frozen=True)
class DemoPaths:
    """The folder of each part (None: the part was not asked for), and where each came from (for messages)."""

    tokenizer: Path | None
    generator: Path | None
    mllm: Path | None
    generator_tokenizer: Path | None
    sources: dict[str, str]


def is_checkpoint(folder: Path | None) -> bool:
    return folder is not None and (folder / CONFIG_NAME).is_file()


def resolve_paths(bundle: str | None = None, tokenizer: str | None = None, generator: str | None = None,
                  mllm: str | None = None) -> DemoPaths:
    """The folders to serve. Folders named by flag must be checkpoints (ConfigError naming the flag); the bundle's
    parts may be missing (their tabs then say so). An explicit --bundle must hold at least one part."""
    explicit = {"tokenizer": tokenizer, "generator": generator, "mllm": mllm}
    for flag, value in explicit.items():
        if value is not None and not is_checkpoint(Path(value)):
            what = "is not a folder" if not Path(value).is_dir() else f"has no {CONFIG_NAME}"
            raise ConfigError(f"--{flag}: {value} {what}; expected a {flag} checkpoint folder")
    if bundle is not None:
        root = Path(bundle)
        if not root.is_dir():
            raise ConfigError(f"--bundle: {bundle} is not a folder; expected a bundle with tokenizer/, generator/, "
                              f"mllm/")
        if not any(is_checkpoint(root / part) for part in PARTS):
            raise ConfigError(f"--bundle: {bundle} holds none of tokenizer/, generator/, mllm/ (each a folder with "
                              f"{CONFIG_NAME})")
        bundle_flag = "--bundle"
    else:
        root = DEFAULT_BUNDLE
        bundle_flag = "the bundled ShapeWorld models"
    folders: dict[str, Path] = {}
    sources: dict[str, str] = {}
    for part in PARTS:
        if explicit[part] is not None:
            folders[part] = Path(explicit[part])
            sources[part] = f"--{part} {explicit[part]}"
        else:
            folders[part] = root / part
            sources[part] = bundle_flag
    beside = folders["generator"].parent / "tokenizer"
    gen_tok = beside if is_checkpoint(beside) else folders["tokenizer"]
    return DemoPaths(folders["tokenizer"], folders["generator"], folders["mllm"], gen_tok, sources)


def resolve_dtype(name: str, device: Any) -> Any:
    """"auto": bfloat16 on a GPU (the full-size models' precision), float32 on the CPU."""
    import torch

    if name not in DTYPES:
        raise ConfigError(f"--dtype: expected one of {list(DTYPES)}, got {name!r}")
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


class LazyModel:
    """One model, loaded by `loader()` on the first `get()` and kept; `get()` is safe from many threads at once.
    `missing`: why the model cannot exist (its folder is absent) or None; `get()` then raises that message."""

    def __init__(self, name: str, loader: Callable[[], Any], missing: str | None) -> None:
        self.name = name
        self.missing = missing
        self._loader = loader
        self._lock = threading.Lock()
        self._value: Any = None
        self._error: str | None = None
        self.load_seconds: float | None = None

    @property
    def available(self) -> bool:
        return self.missing is None and self._error is None

    @property
    def reason(self) -> str | None:
        """Why this model cannot serve (its folder is missing, or it failed to load), None when it can."""
        return self.missing or self._error

    @property
    def loaded(self) -> bool:
        return self._value is not None

    def get(self) -> Any:
        if self._value is not None:
            return self._value
        if self.missing is not None:
            raise CheckpointError(self.missing)
        with self._lock:
            if self._value is None:
                if self._error is not None:
                    raise CheckpointError(self._error)
                import time

                start = time.perf_counter()
                try:
                    self._value = self._loader()
                except UniFlowError as exc:
                    self._error = f"{self.name} failed to load: {exc}"
                    raise CheckpointError(self._error) from None
                except (OSError, ValueError, RuntimeError, KeyError) as exc:
                    self._error = f"{self.name} failed to load ({type(exc).__name__}: {exc})"
                    raise CheckpointError(self._error) from None
                self.load_seconds = time.perf_counter() - start
        return self._value


class DemoModels:
    """The demo's three models: `tokenizer` (Reconstruct), `generator` (Generate: the generator and the tokenizer it
    decodes with), `mllm` (Chat). Nothing loads until a tab asks."""

    def __init__(self, paths: DemoPaths, device: Any, dtype: Any) -> None:
        self.paths = paths
        self.device = device
        self.dtype = dtype
        hints = {"tokenizer": "`make checkpoints`, or pass --tokenizer DIR",
                 "generator": "train it (docs/generator.md, `make checkpoints`), or pass --generator DIR",
                 "mllm": "train it (docs/mllm.md, `make checkpoints`), or pass --mllm DIR"}

        def missing(part: str, folder: Path | None) -> str | None:
            if is_checkpoint(folder):
                return None
            return f"no {part} model: {folder} has no {CONFIG_NAME} ({paths.sources[part]}); {hints[part]}"

        self._tokenizers: dict[Path, LazyModel] = {}
        self.tokenizer = self._tokenizer_model(paths.tokenizer, missing("tokenizer", paths.tokenizer))
        gen_missing = missing("generator", paths.generator)
        if gen_missing is None and not is_checkpoint(paths.generator_tokenizer):
            gen_missing = (f"the generator {paths.generator} needs its tokenizer: no tokenizer/ beside it and no "
                           f"--tokenizer folder")
        self.generator = LazyModel("the generator", self._load_generator, gen_missing)
        self.mllm = LazyModel("the MLLM", self._load_mllm, missing("mllm", paths.mllm))

    def _tokenizer_model(self, folder: Path | None, missing: str | None) -> LazyModel:
        """One LazyModel per tokenizer folder, so the generator and Reconstruct share one copy when they can."""
        key = folder.resolve() if folder is not None else Path("<none>")
        if key not in self._tokenizers:
            self._tokenizers[key] = LazyModel(f"the tokenizer ({folder})", lambda: self._load_tokenizer(folder),
                                              missing)
        return self._tokenizers[key]

    def _load_tokenizer(self, folder: Path | None) -> Any:
        from uniflow import UniFlowTokenizer

        assert folder is not None
        return UniFlowTokenizer.from_pretrained(folder, device=self.device, dtype=self.dtype)

    def _load_generator(self) -> tuple[Any, Any]:
        from generator.model import ARGenerator

        folder, tok_folder = self.paths.generator, self.paths.generator_tokenizer
        assert folder is not None and tok_folder is not None
        import torch

        from uniflow import UniFlowTokenizer

        model = ARGenerator.from_pretrained(folder, device=self.device, dtype=self.dtype)
        tokenizer = self._tokenizer_model(tok_folder, None).get()
        # The fingerprint rounds weights through float16, which a bfloat16 copy no longer matches: check the folder's
        # weights as stored (a float32 load on the CPU), then serve the copy in the demo's dtype.
        if self.dtype in (torch.float32, torch.float16):
            model.check_tokenizer(tokenizer, f"tokenizer {tok_folder}")
        else:
            model.check_tokenizer(UniFlowTokenizer.from_pretrained(tok_folder), f"tokenizer {tok_folder}")
        return model, tokenizer

    def _load_mllm(self) -> Any:
        import torch

        from mllm.model import UniFlowChat

        dtype = None if self.dtype == torch.float32 else self.dtype
        return UniFlowChat.from_pretrained(self.paths.mllm, device=self.device, dtype=dtype)

    def status(self) -> dict[str, str]:
        """Per part: "loaded", "not loaded yet", or why it is unavailable (for the start-up line and the tabs)."""
        out = {}
        for part, model in (("tokenizer", self.tokenizer), ("generator", self.generator), ("mllm", self.mllm)):
            out[part] = "loaded" if model.loaded else (model.reason or "not loaded yet")
        return out
