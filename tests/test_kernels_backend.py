"""Backend choice for the kernels: torch on CPU, Triton on CUDA, clear errors otherwise."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kernels
from kernels.backend import interpreter_enabled, resolve_backend, triton_available


def test_cpu_tensors_use_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AFD_KERNEL_BACKEND", raising=False)
    x = torch.zeros(2, 3)
    assert kernels.resolve_backend(None, x) == "torch"
    assert resolve_backend(None) == "torch"
    assert resolve_backend("torch", x) == "torch"


def test_bad_backend_name_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AFD_KERNEL_BACKEND", raising=False)
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("cuda", torch.zeros(1))
    monkeypatch.setenv("AFD_KERNEL_BACKEND", "tritonn")
    with pytest.raises(ValueError, match="tritonn"):
        resolve_backend(None, torch.zeros(1))


def test_env_overrides_default_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AFD_KERNEL_BACKEND", "torch")
    assert resolve_backend(None, torch.zeros(1)) == "torch"
    assert resolve_backend("torch", torch.zeros(1)) == "torch"


@pytest.mark.skipif(not triton_available() or interpreter_enabled(),
                    reason="needs triton importable and TRITON_INTERPRET unset")
def test_triton_on_cpu_without_interpreter_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AFD_KERNEL_BACKEND", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        resolve_backend("triton", torch.zeros(1))


def test_public_ops_route_to_torch_on_cpu() -> None:
    x = torch.randn(3, 8)
    out, summed = kernels.rms_norm(x, torch.ones(8), 1e-6, torch.zeros(3, 8))
    assert torch.equal(summed, x) and out.shape == x.shape


def test_import_does_not_load_triton_kernels() -> None:
    # TRITON_INTERPRET is read when a @triton.jit function is defined, so ``import kernels``
    # must not define any: the *_triton modules load on first use. Checked in a fresh process
    # because this one may have loaded them already.
    root = Path(__file__).resolve().parents[1]
    code = ("import sys, kernels; "
            "bad = [m for m in sys.modules if m.startswith('kernels.') and m.endswith('triton')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True, timeout=120)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_use_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AFD_KERNEL_BACKEND", raising=False)
    x = torch.zeros(2, 3, device="cuda")
    assert resolve_backend(None, x) == ("triton" if triton_available() else "torch")
    assert resolve_backend(None, x, torch.zeros(1)) == "torch"  # mixed devices: no Triton
