"""1D orders: reversal (optionally per-row, for packed variable-length batches)."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._checks import _as_tensor


def flip(x: Tensor, lengths: Tensor | Sequence[int] | None = None) -> Tensor:
    """Reverse tokens along L; the op is its own inverse and its own adjoint.

    Args:
        x: tokens [B, L, C].
        lengths: optional [B] valid lengths; row ``b`` then reverses only its first ``lengths[b]``
            tokens and leaves the padding after them in place (right-padded varlen batches).

    Returns:
        [B, L, C], a new tensor.

    Examples:
        >>> x = torch.arange(5.0).view(1, 5, 1)
        >>> flip(x, lengths=torch.tensor([3])).flatten().tolist()
        [2.0, 1.0, 0.0, 3.0, 4.0]
    """
    x = _as_tensor("flip", "x", x, "B, L, C")
    if lengths is None:
        return x.flip(1)
    B, L, C = x.shape
    if not isinstance(lengths, Tensor):
        lengths = torch.as_tensor(lengths)
    if lengths.dim() != 1 or lengths.shape[0] != B or lengths.dtype.is_floating_point or lengths.dtype.is_complex:
        raise ValueError(
            f"flip: lengths must be an integer tensor of shape [B] = [{B}], "
            f"got {str(lengths.dtype).replace('torch.', '')} with shape {tuple(lengths.shape)}"
        )
    n = lengths.to(device=x.device, dtype=torch.long)
    if not torch.compiler.is_compiling():  # value check syncs; skipped inside a compiled graph
        lo, hi = int(n.min()), int(n.max())
        if lo < 0 or hi > L:
            raise ValueError(f"flip: lengths must lie in [0, L] = [0, {L}], got values in [{lo}, {hi}]")
    i = torch.arange(L, device=x.device)
    n = n[:, None]
    src = torch.where(i < n, n - 1 - i, i)  # [B, L]
    return torch.gather(x, 1, src[:, :, None].expand(B, L, C))
