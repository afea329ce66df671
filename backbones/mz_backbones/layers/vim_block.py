"""Vim's residual block and the layer loop shared by the plain (non-hierarchical) Mamba models
(Vim, LocalVim, VideoMamba), with ShuffleMamba's layer-wise token shuffle.

Vim's block is "Add -> Norm -> Mixer": the model keeps a residual stream (in float32, Vim's
``residual_in_fp32``); block ``i`` first adds the previous block's (drop-path'ed) output to the
stream, then returns ``mixer(norm(stream))``. The loop lives in :func:`run_prenorm_layers`.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from .common import DropPath
from .mixer import MambaMixer


class VimBlock(nn.Module):
    """``norm`` (RMSNorm) then a token mixer; the residual add is done by :func:`run_prenorm_layers`.

    Args:
        dim: token width.
        mixer: a module called as ``mixer(tokens [B, L, dim], grid) -> [B, L, dim]``.
        drop_path: stochastic-depth rate applied to this block's output when it joins the stream.
        norm_eps: RMSNorm epsilon.
    """

    def __init__(self, dim: int, mixer: nn.Module, *, drop_path: float = 0.0, norm_eps: float = 1e-5):
        super().__init__()
        self.norm = nn.RMSNorm(dim, eps=norm_eps)
        self.mixer = mixer
        self.drop_path = DropPath(drop_path)

    def forward(self, stream: Tensor, grid: Sequence[int]) -> Tensor:
        """``stream [B, L, dim]`` (the residual stream) -> mixer output ``[B, L, dim]``."""
        stream = stream.to(self.norm.weight.dtype)
        if isinstance(self.mixer, MambaMixer):  # normalises piece by piece when it streams
            return self.mixer(stream, grid, pre=self.norm)
        return self.mixer(self.norm(stream), grid)

    @torch.no_grad()
    def add_into(self, stream: Tensor, grid: Sequence[int]) -> Tensor:
        """``stream += forward(stream)`` in place, without autograd (drop path must be inactive);
        a streaming Mamba mixer adds each piece as soon as it is done (no output buffer)."""
        if self.drop_path.training and self.drop_path.p > 0:
            raise RuntimeError("VimBlock.add_into: drop path is active (training); use forward")
        if isinstance(self.mixer, MambaMixer) and stream.dtype == self.norm.weight.dtype:
            return self.mixer.add_into(stream, grid, pre=self.norm)
        return stream.add_(self.forward(stream, grid))


def shuffle_probs(depth: int, max_prob: float) -> list[float]:
    """ShuffleMamba's layer-wise schedule: probability rising linearly from 0 (first layer) to
    ``max_prob`` (last layer)."""
    if not 0.0 <= max_prob <= 1.0:
        raise ValueError(f"shuffle_prob must be in [0, 1], got {max_prob!r}")
    if depth == 1:
        return [max_prob]
    return [max_prob * i / (depth - 1) for i in range(depth)]


def call_shuffled(block: Callable[..., Tensor], stream: Tensor, perm: Tensor, *args: object) -> Tensor:
    """``block`` applied to the tokens reordered by ``perm`` (one permutation for the whole batch),
    with the output put back in the original order: ``P^-1 block(P stream)``.

    Args:
        block: ``block(stream [B, L, C], *args) -> [B, L, C']``.
        stream: ``[B, L, C]``.
        perm: ``[L]`` a permutation of ``range(L)``.
    """
    return block(stream[:, perm], *args)[:, torch.argsort(perm)]


def run_prenorm_layers(
    blocks: Sequence[VimBlock],
    x: Tensor,
    grid: Sequence[int],
    *,
    run_block: Callable[..., Tensor],
    taps: Sequence[int] = (),
    shuffle: Sequence[float] | None = None,
    residual_in_fp32: bool = True,
    consume_input: bool = False,
) -> tuple[list[Tensor], Tensor]:
    """Run Vim's "Add -> Norm -> Mixer" stack.

    Args:
        blocks: the blocks, in order.
        x: embedded tokens ``[B, L, C]``.
        grid: the token grid passed to every mixer.
        run_block: how to call a block (the backbone's gradient-checkpointing wrapper).
        taps: block indices after which the stream ``residual + output`` is recorded.
        shuffle: per-block probability of running the block on randomly permuted tokens
            (ShuffleMamba; pass ``None`` outside training).
        residual_in_fp32: keep the residual stream in float32.
        consume_input: without autograd, the stream may be updated in ``x`` itself (the caller does
            not use ``x`` afterwards), which saves one ``[B, L, C]`` buffer.

    Returns:
        ``(taps [B, L, C] each, final stream [B, L, C])`` where the final stream includes the last
        block's (drop-path'ed) output and is not normalised.
    """
    wanted = set(taps)
    outs: list[Tensor] = []
    # Without autograd the stream is updated in place once this function owns it (``x`` when
    # ``consume_input``, else after the first add): blocks add their output into it directly
    # (``VimBlock.add_into``: a streaming mixer adds piece by piece, so no block output of size
    # [B, L, C] is ever built), and otherwise the previous block's output is dropped before the next
    # block runs. At long sequences (Vim at 1248^2) these [B, L, C] copies are a large part of the
    # peak memory.
    in_place = not torch.is_grad_enabled()
    residual, owned = x, consume_input and x.dtype == torch.float32
    if residual_in_fp32 and residual.dtype != torch.float32:
        residual, owned = residual.float(), True
    hidden: Tensor | None = None  # the previous block's output, not yet added to the stream
    prev: VimBlock | None = None
    for i, blk in enumerate(blocks):
        if hidden is not None:
            assert prev is not None
            if in_place and owned:
                residual.add_(prev.drop_path(hidden))
            else:
                residual, owned = residual + prev.drop_path(hidden), True
            hidden = None
        p = 0.0 if shuffle is None else shuffle[i]
        if p > 0.0 and torch.rand(()).item() < p:
            perm = torch.randperm(residual.shape[1], device=residual.device)
            hidden = run_block(call_shuffled, blk, residual, perm, grid)
        elif in_place and owned and not (blk.training and blk.drop_path.p > 0):
            blk.add_into(residual, grid)
        else:
            hidden = run_block(blk, residual, grid)
        if i in wanted:
            outs.append(residual.clone() if hidden is None else residual + hidden)
        prev = blk
    if hidden is None:
        return outs, residual
    assert prev is not None
    if in_place and owned:
        return outs, residual.add_(prev.drop_path(hidden))
    return outs, residual + prev.drop_path(hidden)
