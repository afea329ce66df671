"""The toy model: input projection, a diagonal linear recurrence (a minimal SSM), output projection."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mz_kernels._validate import check_choice, check_positive_int, check_tensor
from mz_pipelines.runtime.precision import float32_forward

MODES = ("conv", "loop")


class DiagonalRecurrence(nn.Module):
    """``h_t = a * h_{t-1} + x_t`` per channel with a learned decay ``a = sigmoid(logit)`` in (0, 1).

    ``mode='loop'`` runs the recurrence step by step (the reference, O(L) sequential steps);
    ``mode='conv'`` applies it as one causal kernel ``K[t, s] = a^(t-s)`` (O(L^2) work, one einsum).
    Both compute in float32, also under autocast (see :func:`float32_forward`).

    Args:
        width: channels ``D``.
        mode: ``'conv'`` or ``'loop'``.
    """

    def __init__(self, width: int, *, mode: str = "conv") -> None:
        super().__init__()
        check_positive_int("DiagonalRecurrence", "width", width)
        check_choice("DiagonalRecurrence", "mode", mode, MODES)
        self.mode = mode
        self.decay_logit = nn.Parameter(torch.linspace(0.0, 2.0, width))
        self.decay_logit._no_weight_decay = True  # type: ignore[attr-defined]

    @float32_forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``[B, L, D]`` -> states ``[B, L, D]`` (float32)."""
        width = self.decay_logit.numel()
        check_tensor("DiagonalRecurrence", "x", x, dims="B L D", shape=(None, None, width), contiguous=False)
        log_a = F.logsigmoid(self.decay_logit.float())  # [D], log of the decay
        if self.mode == "loop":
            a, h, out = log_a.exp(), x.new_zeros(x.shape[0], x.shape[2]), []
            for t in range(x.shape[1]):
                h = a * h + x[:, t]
                out.append(h)
            return torch.stack(out, dim=1)
        pos = torch.arange(x.shape[1], device=x.device)
        lag = (pos[:, None] - pos[None, :]).float()  # [L, L], t - s
        kernel = torch.exp(lag.clamp(min=0)[..., None] * log_a) * (lag >= 0)[..., None]  # [L, L, D]
        return torch.einsum("tsd,bsd->btd", kernel, x)


class ToySSM(nn.Module):
    """``[B, L, C]`` -> ``[B, L, 1]``: Linear(C, D) -> DiagonalRecurrence(D) -> Linear(D, 1).

    Examples:
        >>> ToySSM(3, 8)(torch.randn(2, 17, 3)).shape
        torch.Size([2, 17, 1])
    """

    def __init__(self, channels: int, width: int, *, mode: str = "conv") -> None:
        super().__init__()
        check_positive_int("ToySSM", "channels", channels)
        self.channels = channels
        self.inp = nn.Linear(channels, width)
        self.mixer = DiagonalRecurrence(width, mode=mode)
        self.out = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_tensor("ToySSM", "x", x, dims="B L C", shape=(None, None, self.channels), contiguous=False)
        return self.out(self.mixer(self.inp(x)))
