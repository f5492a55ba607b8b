"""adadiff.device_check: a GPU this machine cannot use is refused in one line that says why."""

from __future__ import annotations

import pytest
import torch

from adadiff import device_check
from adadiff.device_check import check_device
from adadiff.errors import BackendUnavailableError


def test_a_cpu_only_torch_is_named_as_one_whatever_its_version_says(monkeypatch):
    # PyPI's torch for Windows and macOS is CPU-only with no +cpu in its version
    monkeypatch.setattr(device_check.metadata, "version", lambda name: "2.13.0")
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(BackendUnavailableError, match=r"torch 2\.13\.0 is a CPU-only build"):
        check_device("torch", "cuda")
    # a CUDA build that sees no GPU is a driver or visibility matter
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    with pytest.raises(BackendUnavailableError, match=r"sees 0 CUDA device.*the driver"):
        check_device("torch", "cuda:0")
    check_device("torch", "cpu")
