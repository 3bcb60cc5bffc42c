"""--precision: explicit choices are obeyed, auto follows the hardware, nonsense is refused."""

from __future__ import annotations

import pytest
import torch

from trainer import distributed


def test_explicit_precisions_are_obeyed() -> None:
    cpu = torch.device("cpu")
    assert distributed.use_bf16("bf16", cpu) is True
    assert distributed.use_bf16("fp32", cpu) is False


def test_auto_on_cpu_follows_native_bf16_support(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    assert distributed.use_bf16("auto", cpu) is False
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    assert distributed.use_bf16("auto", cpu) is True


def test_auto_is_fp32_on_other_devices() -> None:
    assert distributed.use_bf16("auto", torch.device("mps")) is False


def test_unknown_precision_is_refused() -> None:
    with pytest.raises(ValueError, match="precision"):
        distributed.use_bf16("fp8", torch.device("cpu"))
