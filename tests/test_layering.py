"""The house rules of docs/architecture.md, checked on every import of every .py file (function-level ones too).

uniflow/ is the ground floor: it imports none of the packages built on it. generator/ and mllm/ stand side by side
and never import each other. train/ never imports eval/ or app/. Nothing outside tests/ imports tests/.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("uniflow", "generator", "mllm", "train", "eval", "app", "bench", "tools", "tests")
FORBIDDEN = {
    "uniflow": {"generator", "mllm", "train", "eval", "app", "bench", "tools", "tests"},
    "generator": {"mllm", "tests"},
    "mllm": {"generator", "tests"},
    "train": {"eval", "app", "tests"},
    "eval": {"tests"},
    "app": {"tests"},
    "bench": {"tests"},
    "tools": {"tests"},
}


def _python_files() -> list[Path]:
    files = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if not any(part.startswith(".") or part == "__pycache__" for part in path.relative_to(ROOT).parts):
                files.append(path)
    return files


def imported_packages(path: Path) -> list[tuple[int, str]]:
    """(line, top-level package) of every absolute import in the file; relative imports stay in their package."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module.split(".")[0]))
    return found


def layer_violations() -> list[str]:
    bad = []
    for path in _python_files():
        rel = path.relative_to(ROOT)
        forbidden = FORBIDDEN.get(rel.parts[0], set())
        bad += [f"{rel}:{line} imports {pkg}" for line, pkg in imported_packages(path) if pkg in forbidden]
    return bad


def test_walker_sees_function_level_imports(tmp_path):
    sample = tmp_path / "m.py"
    sample.write_text("import os\n\ndef f():\n    from train.engine import x\n    import eval.metrics\n")
    assert imported_packages(sample) == [(1, "os"), (4, "train"), (5, "eval")]


def test_the_tree_has_files_of_every_layer():
    tops = {p.relative_to(ROOT).parts[0] for p in _python_files()}
    assert {"uniflow", "train", "app", "tests"} <= tops


def test_no_import_goes_up_or_sideways():
    violations = layer_violations()
    assert not violations, "layering broken (see docs/architecture.md):\n" + "\n".join(violations)
