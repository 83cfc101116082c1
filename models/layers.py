"""Small building blocks shared by every model: RMSNorm, the dense SwiGLU MLP, rotary tables."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from models.config import RopeConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype: torch.dtype,
                 device: torch.device | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device), requires_grad=False)
        self.eps = eps

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual); without residual: (norm(x), x)."""
        return kernels.rms_norm(x, self.weight, self.eps, residual)

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.rms_norm(x, self.weight, self.eps)[0]


def linear(in_features: int, out_features: int, dtype: torch.dtype, device=None,
           bias: bool = False) -> nn.Linear:
    layer = nn.Linear(in_features, out_features, bias=bias, dtype=dtype, device=device)
    layer.requires_grad_(False)
    return layer


def embedding(vocab: int, hidden: int, dtype: torch.dtype, device=None) -> nn.Embedding:
    """An ``nn.Embedding`` left uninitialized: the loader (or the dummy init) fills every
    parameter. Its default ``normal_`` init would, on the meta device (``load_weights``' name
    table), import ``torch._dynamo``: 1-2 s of CPU in every process that loads a model (every
    rank, at each start)."""
    layer = nn.Embedding(vocab, hidden, _weight=torch.empty(vocab, hidden, dtype=dtype,
                                                            device=device))
    layer.requires_grad_(False)
    return layer


class DenseMLP(nn.Module):
    """SwiGLU MLP with HF names (gate_proj, up_proj, down_proj): dense layers and shared experts."""

    def __init__(self, hidden: int, intermediate: int, dtype: torch.dtype, device=None):
        super().__init__()
        self.gate_proj = linear(hidden, intermediate, dtype, device)
        self.up_proj = linear(hidden, intermediate, dtype, device)
        self.down_proj = linear(intermediate, hidden, dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Rotary:
    """cos/sin for the positions of one forward, computed on the fly from inv_freq."""

    def __init__(self, rope: RopeConfig, device: torch.device):
        inv_freq, self.scale = rope.inv_freq_and_scale()
        self.inv_freq = inv_freq.to(device)

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[:, None].float() * self.inv_freq[None, :]  # [T, dim/2]
        return freqs.cos() * self.scale, freqs.sin() * self.scale
