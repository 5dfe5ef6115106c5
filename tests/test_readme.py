"""Docs that run: the README's Python snippets execute as written, and every shell command the README and docs/*.md
show answers `--help` (so a renamed flag or command breaks a test, not a newcomer)."""

from __future__ import annotations

import contextlib
import io
import re
import runpy
import shlex
import sys
import warnings
from pathlib import Path

import pytest

from app.cli import main

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def blocks(path: Path, languages: tuple[str, ...]) -> list[str]:
    text = path.read_text()
    return [m.group(2) for m in re.finditer(r"```(\w*)\n(.*?)```", text, re.S) if m.group(1) in languages]


def shell_commands() -> list[tuple[str, list[str]]]:
    """(doc name, argv) of each command line in the docs' shell blocks (continuation lines joined)."""
    found = []
    for doc in DOCS:
        for block in blocks(doc, ("bash", "sh", "")):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.split("#", 1)[0].strip()
                if not line:
                    continue
                try:
                    words = shlex.split(line)
                except ValueError:
                    continue
                found.append((doc.name, words))
    return found


def help_target(words: list[str]) -> tuple[str, list[str]] | None:
    """('cli', sub-commands) for `uniflow ...`, ('module', [module, sub-commands]) for `python -m` / launchers."""
    def subcommands(rest: list[str]) -> list[str]:
        out = []
        for word in rest:
            if not re.fullmatch(r"[a-z][a-z-]*", word):
                break
            out.append(word)
        return out

    if words[0] == "uniflow":
        return "cli", subcommands(words[1:])
    if words[0] in ("python", "python3", "torchrun", "deepspeed"):
        for flag in ("-m", "--module"):
            if flag in words:
                i = words.index(flag)
                return "module", [words[i + 1], *subcommands(words[i + 2:])]
    return None


COMMANDS = [(doc, help_target(words)) for doc, words in shell_commands() if help_target(words)]


def test_docs_show_commands() -> None:
    kinds = {target[0] for _, target in COMMANDS}
    assert kinds == {"cli", "module"}, COMMANDS


@pytest.mark.parametrize("doc,target", sorted({(d, (k, tuple(a))) for d, (k, a) in COMMANDS}),
                         ids=lambda v: v if isinstance(v, str) else " ".join(v[1]))
def test_shell_command_has_help(doc: str, target: tuple[str, tuple[str, ...]]) -> None:
    kind, words = target
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as info:
        if kind == "cli":
            main([*words, "--help"])
        else:
            module, *sub = words
            argv = sys.argv
            sys.argv = [module, *sub, "--help"]
            try:
                with warnings.catch_warnings():  # the module may already be imported by an earlier test
                    warnings.filterwarnings("ignore", "'.*' found in sys.modules", RuntimeWarning)
                    runpy.run_module(module, run_name="__main__", alter_sys=False)
            finally:
                sys.argv = argv
    assert info.value.code == 0, f"{doc}: {' '.join(words)} --help exited {info.value.code}"
    assert "usage:" in out.getvalue()


def test_readme_python_snippets_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    snippets = blocks(ROOT / "README.md", ("python",))
    assert snippets
    monkeypatch.chdir(ROOT)  # the snippets use the bundled checkpoint by its relative path
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # and write only under tempfile's folder
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    before = sorted(p.name for p in ROOT.iterdir())
    for snippet in snippets:
        exec(compile(snippet, "README.md", "exec"), {"__name__": "__readme__"})
    assert sorted(p.name for p in ROOT.iterdir()) == before
    assert (next(tmp_path.iterdir()) / "tokenizer" / "model.safetensors").is_file()
