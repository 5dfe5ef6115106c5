"""Hub-style loading: local folders load as they are; a hub id offline is one CheckpointError naming it."""

import huggingface_hub.constants
import pytest

from tests.helpers import tiny_tokenizer_config
from uniflow import UniFlowTokenizer, load_encoder
from uniflow.errors import CheckpointError, ConfigError
from uniflow.hub import REPO_ID, resolve_folder


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """Never reach the network, whatever the environment says."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return UniFlowTokenizer(tiny_tokenizer_config()).save_pretrained(tmp_path_factory.mktemp("hub") / "org")


def test_local_folder_wins_even_when_it_looks_like_a_repo_id(folder, monkeypatch):
    monkeypatch.chdir(folder.parent.parent)
    relative = f"{folder.parent.name}/{folder.name}"  # "hub0/org": also a valid repo id
    assert REPO_ID.match(relative)
    assert resolve_folder(relative) == folder.relative_to(folder.parent.parent)
    model = UniFlowTokenizer.from_pretrained(relative)
    assert isinstance(model, UniFlowTokenizer)
    assert load_encoder(relative).width == 48


@pytest.mark.parametrize("load", [UniFlowTokenizer.from_pretrained, load_encoder])
def test_offline_hub_id_is_one_line_error(load):
    with pytest.raises(CheckpointError) as info:
        load("uniflow-test-org/no-such-tokenizer", revision="v1")
    message = str(info.value)
    assert "uniflow-test-org/no-such-tokenizer" in message and "not a local" in message and "offline" in message
    assert "\n" not in message


def test_missing_path_and_revision_on_local_folder(folder, tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        UniFlowTokenizer.from_pretrained(tmp_path / "a" / "b" / "c")
    with pytest.raises(ConfigError, match="revision"):
        UniFlowTokenizer.from_pretrained(folder, revision="main")


def test_push_to_hub_offline_is_one_line_error():
    model = UniFlowTokenizer(tiny_tokenizer_config())
    with pytest.raises(CheckpointError, match="uniflow-test-org/tok: cannot upload"):
        model.push_to_hub("uniflow-test-org/tok")
    with pytest.raises(ConfigError, match="repo_id"):
        model.push_to_hub("not a repo id")
