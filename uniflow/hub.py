"""Where a checkpoint folder comes from: a local path, or a Hugging Face Hub repository fetched on demand.

Every `from_pretrained` of the project (tokenizer, encoder alone, and the model kinds built on them) resolves its
argument here, so the rules are the same everywhere:
- an existing local path is used as it is (the hub is never contacted);
- otherwise an argument of the form `org/name` is a hub repository id, downloaded (or found in the local hub cache)
  with `huggingface_hub.snapshot_download`, at `revision` (a branch, tag or commit) if given;
- anything else, and a hub id that cannot be fetched (offline, `HF_HUB_OFFLINE=1`, unknown repository), is one
  CheckpointError naming the argument and saying it is not a local folder either.
`push_folder` uploads a written checkpoint folder with `huggingface_hub.upload_folder`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from uniflow.errors import CheckpointError, ConfigError

# A hub repository id: `org/name` (letters, digits, `-`, `_`, `.`), not starting with `.` or `/` (a relative path).
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
CHECKPOINT_PATTERNS = ("*.json", "*.safetensors")


def _hub_errors() -> tuple[type[BaseException], ...]:
    from huggingface_hub.errors import HfHubHTTPError

    return (OSError, ValueError, HfHubHTTPError)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def resolve_folder(name_or_path: str | Path, revision: str | None = None,
                   allow_patterns: Sequence[str] | None = CHECKPOINT_PATTERNS, what: str = "checkpoint") -> Path:
    """A local folder for `name_or_path`: the path itself when it exists, else a hub repository's snapshot.

    allow_patterns: which files of the repository to download (default: configs and safetensors weights only).
    revision: only meaningful for a hub id; given with an existing local path it is a ConfigError, not ignored.
    """
    path = Path(name_or_path).expanduser()
    if path.exists():
        if revision is not None:
            raise ConfigError(f"revision={revision!r}: only valid with a hub repository id, but {path} is a local path")
        return path
    repo_id = str(name_or_path)
    if not REPO_ID.match(repo_id):
        raise CheckpointError(f"{repo_id}: {what} folder not found (nor a hub repository id of the form org/name)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.constants import is_offline_mode

    try:
        local = snapshot_download(repo_id, revision=revision,
                                  allow_patterns=list(allow_patterns) if allow_patterns is not None else None)
    except _hub_errors() as exc:
        reason = ("offline (HF_HUB_OFFLINE is set) and not in the local hub cache" if is_offline_mode()
                  else _first_line(exc))
        at = f" at revision {revision!r}" if revision else ""
        raise CheckpointError(f"{repo_id}: not a local {what} folder, and the hub repository{at} could not be "
                              f"downloaded: {reason}") from None
    return Path(local)


def push_folder(folder: str | Path, repo_id: str, private: bool | None = None, token: str | None = None,
                revision: str | None = None, commit_message: str | None = None) -> str:
    """Upload a checkpoint folder to the hub repository `repo_id` (created if missing); returns the commit URL."""
    if not REPO_ID.match(str(repo_id)):
        raise ConfigError(f"repo_id: expected a hub repository id of the form org/name, got {repo_id!r}")
    from huggingface_hub import create_repo, upload_folder

    try:
        create_repo(repo_id, private=private, token=token, exist_ok=True)
        info = upload_folder(repo_id=repo_id, folder_path=str(folder), token=token, revision=revision,
                             commit_message=commit_message or f"Upload {Path(folder).name}")
    except _hub_errors() as exc:
        raise CheckpointError(f"{repo_id}: cannot upload {folder} to the hub: {_first_line(exc)}") from None
    return str(info)
