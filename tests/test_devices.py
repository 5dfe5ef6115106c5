"""`--device` flags: one reading for every command, one-line errors naming the flag and the value."""

from __future__ import annotations

import pytest
import torch

from uniflow.devices import resolve_device
from uniflow.errors import ConfigError


def test_auto_picks_the_gpu_only_when_there_is_one() -> None:
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("name, words", [("gpu7", ["--device", "gpu7", "cuda:N"]),
                                         ("meta", ["--device", "meta", "expected auto"]),
                                         ("cuda:99", ["--device", "cuda:99"])])
def test_a_device_that_is_not_here_is_a_one_line_error_naming_the_flag(name: str, words: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        resolve_device(name)
    message = str(info.value)
    assert "\n" not in message and all(w in message for w in words), message


def test_the_error_names_the_flag_it_was_given() -> None:
    with pytest.raises(ConfigError, match="^--eval-device: "):
        resolve_device("gpu", flag="--eval-device")
