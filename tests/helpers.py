"""Tiny configurations shared by the tests (importable as `tests.helpers`)."""

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from uniflow.decoder import DecoderConfig
from uniflow.encoders import EncoderConfig
from uniflow.tokenizer import TokenizerConfig, UniFlowTokenizer


def tiny_tokenizer_config(width: int = 48, depth: int = 2, image_size: int = 32, patch: int = 8,
                          global_depth: int = 1, head_width: int = 64, head_depth: int = 2) -> TokenizerConfig:
    return TokenizerConfig(
        encoder=EncoderConfig(backend="timm", arch="vit_tiny_patch16_224",
                              kwargs={"embed_dim": width, "depth": depth, "num_heads": 2},
                              image_size=image_size, patch_size=patch),
        decoder=DecoderConfig(latent_channels=16, global_depth=global_depth, global_heads=2,
                              head_width=head_width, head_depth=head_depth),
    )


@dataclass
class Ctx:
    """What a bad-input case gets: its own folder, the shared tiny tokenizer (and its folder), monkeypatch, capsys."""

    tmp: Path
    tok: UniFlowTokenizer
    tok_dir: Path
    monkeypatch: pytest.MonkeyPatch
    capsys: pytest.CaptureFixture[str]


# ------------------------------------------------------------------------------------------- two-process launches
ROOT = Path(__file__).resolve().parents[1]
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
               "TORCHELASTIC_RUN_ID", "GROUP_RANK", "ROLE_RANK")


def launch_env(**extra: str) -> dict[str, str]:
    """This interpreter's environment minus any launcher variables (a run in this process may have set some)."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env.update({"DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), **extra})
    return env


def torchrun_failure(out: str, err: str) -> str:
    """The lines that explain a failed job (each rank's traceback), not pages of warnings."""
    keep = [line for line in (out + err).splitlines()
            if line.startswith("[rank") or "Error" in line or "error" in line or "Traceback" in line]
    return "\n".join(keep[-80:]) + "\n--- stderr tail ---\n" + err[-3000:]


def torchrun(script: Path, config: dict[str, Any], *extra: str, timeout: int = 150,
             env: dict[str, str] | None = None) -> None:
    """`script CONFIG_JSON [extra...]` on 2 local processes under torchrun; an AssertionError with each rank's
    traceback when it fails or runs past `timeout`."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), json.dumps(config), *extra]
    # Own process group, so a hung job is killed with its workers rather than leaving them behind.
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env or launch_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"torchrun timed out after {timeout} s:\n{err[-6000:]}") from None
    assert proc.returncode == 0, torchrun_failure(out, err)


# ------------------------------------------------------------------------------------------- a tiny model bundle
def build_tiny_bundle(root: Path, parts: tuple[str, ...] = ("generator", "mllm")) -> Path:
    """A bundle folder laid out like checkpoints/shapeworld, with tiny random models (a few seconds on a CPU):
    tokenizer/ (32 px, patch 8, 16 latent channels, latent statistics), generator/ (5 classes named a-e, a 4x4 grid,
    every weight random, recorded as trained on that tokenizer) and mllm/ (a tiny Llama-3-template LLM and a
    pixel-shuffle projector over that tokenizer's encoder). `parts`: which of generator/ and mllm/ to write beside
    the tokenizer (which the other two refer to)."""
    from tests.test_generator import randomized, tiny_config, tokenizer_with_stats

    root = Path(root)
    tok_dir = root / "tokenizer"
    tokenizer_with_stats(0).save_pretrained(tok_dir)
    if "generator" in parts:
        model = randomized(tiny_config(grid=(4, 4)))
        model.attach_tokenizer(UniFlowTokenizer.from_pretrained(tok_dir))
        model.config.flow.sample_steps = 2
        model.save_pretrained(root / "generator")
    if "mllm" in parts:
        save_tiny_mllm(root, tok_dir)
    return root


def save_tiny_mllm(root: Path, tokenizer_dir: Path) -> Path:
    """root/mllm: a tiny random Llama-3-template LLM (in root/llm) behind a pixel-shuffle projector over the encoder
    of `tokenizer_dir`; the same weights every time."""
    import torch

    from mllm.config import LLMConfig, MLLMConfig, ProjectorConfig, VisionConfig
    from mllm.model import UniFlowChat
    from mllm.tiny import build_llm_folder

    llm = build_llm_folder(Path(root) / "llm", "llama", "llama3", seed=4)
    config = MLLMConfig(vision=VisionConfig(tokenizer=str(tokenizer_dir)),
                        projector=ProjectorConfig(type="pixel_shuffle"), llm=LLMConfig(path=str(llm)))
    torch.manual_seed(0)
    return UniFlowChat.from_config(config).save_pretrained(Path(root) / "mllm")


def one_error_line(capsys: Any, code: int, pattern: str) -> None:
    """A command failed the way every user error must: exit code 2, one `error: ...` line matching `pattern`, no
    traceback."""
    import re

    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert re.search(pattern, lines[0]), lines[0]
