"""bf16 autocast only where the hardware computes bf16: emulated bf16 on a CPU without bf16 units is many times
slower than fp32, so a config's bf16 falls back to fp32 there, with a warning that says why."""

from __future__ import annotations

import warnings

import pytest
import torch

import uniflow.precision as precision


@pytest.mark.parametrize("flags, fast", [(set(), False), ({"avx2", "fma"}, False), ({"avx512_bf16"}, True),
                                          ({"amx_bf16", "avx512f"}, True)])
def test_bf16_autocast_only_where_the_cpu_has_bf16_units(monkeypatch: pytest.MonkeyPatch, flags: set[str],
                                                         fast: bool) -> None:
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset(flags))
    assert precision.bf16_is_fast("cpu") is fast
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert precision.bf16_autocast_enabled(True, torch.device("cpu"), "model.autocast") is fast
        assert precision.bf16_autocast_enabled(False, "cpu") is False
    messages = [str(w.message) for w in caught]
    if fast:
        assert messages == []
    else:
        assert len(messages) == 1
        assert "model.autocast: bf16 requested, but this cpu has no bf16 units" in messages[0]
        assert "running in fp32" in messages[0]


def test_cpu_flags_are_read_from_the_kernel() -> None:
    flags = precision.cpu_flags()
    assert isinstance(flags, frozenset)
    try:
        with open("/proc/cpuinfo") as f:
            listed = any(line.startswith("flags") for line in f)
    except OSError:
        listed = False
    assert bool(flags) == listed
