"""Which implementation runs an op: Triton on CUDA, torch elsewhere, or what the caller forces."""

from __future__ import annotations

import functools
import os

import torch

BACKENDS = ("torch", "triton")


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # pragma: no cover - depends on the platform
        return False
    return True


def interpreter_enabled() -> bool:
    """Whether TRITON_INTERPRET is set now. Triton reads it when each @triton.jit function is
    defined; the ``*_triton`` modules use ``triton_utils.INTERPRETING``, read when they load."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(backend: str | None, *tensors: torch.Tensor) -> str:
    """Return "torch" or "triton" for an op whose inputs are ``tensors``.

    ``None`` means: Triton when the tensors live on CUDA and Triton imports, else torch.
    The environment variable ``AFD_KERNEL_BACKEND`` overrides the default (not an explicit choice).
    """
    if backend is None:
        backend = os.environ.get("AFD_KERNEL_BACKEND") or None
    if backend is None:
        on_cuda = bool(tensors) and all(t.is_cuda for t in tensors)
        return "triton" if on_cuda and triton_available() else "torch"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    if backend == "triton" and not triton_available():
        raise RuntimeError(
            "backend='triton' requested but triton is not importable; pip install triton"
        )
    if backend == "triton" and tensors and not all(t.is_cuda for t in tensors):
        if not interpreter_enabled():
            raise RuntimeError(
                "backend='triton' on CPU tensors needs the Triton interpreter: set "
                "TRITON_INTERPRET=1 before importing triton, or use backend='torch'"
            )
    return backend
