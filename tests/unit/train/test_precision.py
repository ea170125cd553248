"""hardware.precision: ``auto`` picks bf16 only where the device computes it natively."""

from __future__ import annotations

import io

import pytest
import torch
from rich.console import Console

from apex_cli.train import loop

CPU = torch.device("cpu")


@pytest.mark.parametrize(("native", "expected"), [(True, "bf16"), (False, "fp32")])
def test_auto_follows_native_bf16(monkeypatch, native, expected) -> None:
    monkeypatch.setattr(loop, "native_bf16", lambda device: native)
    assert loop.resolve_precision("auto", CPU) == expected


def test_explicit_choices_are_kept_and_emulated_bf16_warns(monkeypatch) -> None:
    monkeypatch.setattr(loop, "native_bf16", lambda device: False)
    out = io.StringIO()
    console = Console(file=out, width=200)
    assert loop.resolve_precision("fp32", CPU, console) == "fp32"
    assert out.getvalue() == ""
    assert loop.resolve_precision("bf16", CPU, console) == "bf16"
    assert "no native bf16" in out.getvalue() and "hardware.precision=auto" in out.getvalue()


def test_native_bf16_answers_a_bool_on_this_cpu() -> None:
    assert isinstance(loop.native_bf16(CPU), bool)
