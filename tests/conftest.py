"""Every test runs offline and seeded."""

import os
import random

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def shared_tokenizer(tmp_path_factory: pytest.TempPathFactory):
    """A tiny random tokenizer saved once per session: (model, folder). Tests must not modify either."""
    from tests.helpers import tiny_tokenizer_config
    from uniflow import UniFlowTokenizer

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("shared") / "tok"
    UniFlowTokenizer(tiny_tokenizer_config()).save_pretrained(folder)
    return UniFlowTokenizer.from_pretrained(folder), folder


@pytest.fixture
def ctx(tmp_path, shared_tokenizer, monkeypatch: pytest.MonkeyPatch, capsys):
    """The context of one bad-input case (tests/test_bad_inputs*.py)."""
    from tests.helpers import Ctx

    monkeypatch.delenv("UNIFLOW_MAX_PIXELS", raising=False)
    return Ctx(tmp_path, shared_tokenizer[0], shared_tokenizer[1], monkeypatch, capsys)
