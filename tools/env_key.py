"""Print a short hash of the project's dependency lists: the cache key of the reusable test environment."""

import hashlib
import json
from pathlib import Path

import tomllib

project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
deps = [project["dependencies"], project.get("optional-dependencies", {}), "torch==2.14.1 torchvision==0.29.1"]
print(hashlib.sha256(json.dumps(deps, sort_keys=True).encode()).hexdigest()[:12])
