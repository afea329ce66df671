"""Memory-lean MONAI residual blocks: the same parameters and maths, fewer tensors kept for backward.

MONAI's ``UnetResBlock`` (``conv-IN-LReLU-conv-IN``, a ``1x1 conv-IN`` shortcut when the width or
stride changes, add, ``LReLU``) keeps every conv output *and* every activation for the backward pass:
five full-size maps for a same-width block, plus the concatenated copy of the skip in an
``UnetrUpBlock``. The lean forward keeps only what the convolutions' weight gradients need (their
inputs) and the block's output:

- each ``InstanceNorm (+ residual) + LeakyReLU`` saves its *output* and per-channel ``1/std``; the
  backward recovers the normalised values by inverting the leaky ReLU (slope > 0), so the conv output
  in front of the norm is not kept (the in-place activated batch-norm idea of Rota Bulo et al., 2018,
  for instance norm without affine parameters, MONAI's ``"instance"``);
- an ``UnetrUpBlock`` convolves the upsampled map and the skip with the two halves of each weight,
  ``conv(cat(a, s), W) == conv(a, W_a) + conv(s, W_s)``, so the 2x-wide concatenation is never built
  and the skip (already held by the encoder) is not copied;
- without autograd (inference) the norms and activations run in place, the maps are read
  channels-last (oneDNN then convolves them where they lie; channels-first it copies each input
  first), and :meth:`LeanUnetrUpBlock.forward_popping` frees the upsampled map and the skip as soon
  as both convolutions that read them have run.

Blocks are switched by class (:func:`set_block_impl`), as ``torch.nn.utils.parametrize`` does: the
module keeps its parameters and state-dict keys, so weights load either way. Blocks the lean maths
does not cover (another norm, affine instance norm, a ReLU, dropout, conv bias) stay MONAI's.

Examples:
    >>> from monai.networks.blocks import UnetrUpBlock
    >>> up = UnetrUpBlock(3, 16, 8, kernel_size=3, upsample_kernel_size=2, norm_name="instance", res_block=True)
    >>> set_block_impl(up, "lean")
    2
    >>> up(torch.randn(1, 16, 4, 4, 4), torch.randn(1, 8, 8, 8, 8)).shape
    torch.Size([1, 8, 8, 8, 8])
"""
from __future__ import annotations

import torch
from monai.networks.blocks.dynunet_block import UnetResBlock
from monai.networks.blocks.unetr_block import UnetrUpBlock
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

BLOCK_IMPLS = ("lean", "monai")


def _check_spatial(x: Tensor) -> None:
    if x[0, 0].numel() <= 1:  # F.instance_norm's own rule (statistics need more than one voxel)
        raise ValueError(f"Expected more than 1 spatial element when training, got input size {tuple(x.shape)}")


def _instance_norm(x: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """``x [B, C, *S]`` -> (normalised ``[B, C, *S]`` (new tensor), ``1/std [B*C]`` float32+)."""
    b, c = x.shape[:2]
    y, _, rstd = torch.ops.aten.native_batch_norm(x.reshape(1, b * c, -1), None, None, None, None, True, 0.0, eps)
    return y.view(x.shape), rstd


def _norm_backward_(g: Tensor, xhat: Tensor, rstd: Tensor) -> Tensor:
    """Instance-norm input gradient ``rstd * (g - mean g - xhat * mean(g * xhat))`` per (sample,
    channel), written into ``xhat`` (``[B, C, *S]``, contiguous) and returned."""
    b, c = g.shape[:2]
    gv, xv = g.reshape(b * c, -1), xhat.view(b * c, -1)
    acc = torch.promote_types(g.dtype, torch.float32)
    n = gv.shape[1]
    m1 = gv.sum(1, dtype=acc) / n
    if g.dtype in (torch.float32, torch.float64):
        m2 = torch.bmm(gv.unsqueeze(1), xv.unsqueeze(2)).view(-1) / n
    else:  # half precision: accumulate the dot in float32
        m2 = (gv * xv).sum(1, dtype=acc) / n
    r = rstd.to(acc)
    xv.mul_(m2.to(xv.dtype)[:, None]).add_(m1.to(xv.dtype)[:, None]).neg_().add_(gv).mul_(r.to(xv.dtype)[:, None])
    return xhat


class _InstanceNormAct(torch.autograd.Function):
    """``y = act(instance_norm(x) + r)`` (``r`` optional, ``act`` leaky ReLU or identity), saving
    ``y``, ``r`` and ``1/std`` only."""

    @staticmethod
    def forward(ctx, x: Tensor, r: Tensor | None, eps: float, slope: float | None) -> Tensor:
        _check_spatial(x)
        y, rstd = _instance_norm(x, eps)
        if r is not None:
            y.add_(r)
        if slope is not None:
            torch.nn.functional.leaky_relu_(y, slope)
        ctx.slope, ctx.has_r = slope, r is not None
        ctx.save_for_backward(y, rstd, *((r,) if r is not None else ()))
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, g: Tensor):
        y, rstd, *rest = ctx.saved_tensors
        s = ctx.slope
        if s is not None:
            g = torch.ops.aten.leaky_relu_backward(g, y, s, True)
            xhat = torch.ops.aten.leaky_relu_backward(y, y, 1.0 / s, True)  # inverse of the activation
        else:
            xhat = y.clone(memory_format=torch.contiguous_format)
        if ctx.has_r:
            xhat.sub_(rest[0])
        gx = _norm_backward_(g.contiguous(), xhat, rstd)
        return gx, (g if ctx.has_r else None), None, None


def _norm_act_(x: Tensor, r: Tensor | None, eps: float, slope: float | None) -> Tensor:
    """No-autograd twin of :class:`_InstanceNormAct`, in place on ``x`` (a fresh conv output, any
    memory format)."""
    _check_spatial(x)
    var, mean = torch.var_mean(x, dim=tuple(range(2, x.dim())), correction=0, keepdim=True)
    x.sub_(mean).mul_(torch.rsqrt(var + eps))
    if r is not None:
        x.add_(r)
    return torch.nn.functional.leaky_relu_(x, slope) if slope is not None else x


def norm_act(x: Tensor, r: Tensor | None, eps: float, slope: float | None) -> Tensor:
    """``leaky_relu(instance_norm(x) + r, slope)`` (``r``, ``slope`` optional), ``[B, C, *S]``,
    memory-lean under autograd and in place without it."""
    if torch.is_grad_enabled() and (x.requires_grad or (r is not None and r.requires_grad)):
        return _InstanceNormAct.apply(x, r, eps, slope)
    return _norm_act_(x, r, eps, slope)


def _conv_part(layer: nn.Module, x: Tensor, offset: int) -> Tensor:
    """MONAI ``Convolution`` ``layer`` applied to ``x``, read as input channels ``offset`` onwards of
    a concatenation (the matching slice of the weight; no bias, :func:`unsupported_reason`)."""
    conv = layer.conv
    return conv._conv_forward(x, conv.weight[:, offset:offset + x.shape[1]], None)


def _conv(layer: nn.Module, a: Tensor, skip: Tensor | None) -> Tensor:
    """MONAI ``Convolution`` ``layer`` on ``cat(a, skip)`` without building the concatenation."""
    if skip is None:
        return layer.conv(a)
    return _conv_part(layer, a, 0).add_(_conv_part(layer, skip, a.shape[1]))


def unsupported_reason(block: nn.Module) -> str | None:
    """Why ``block`` (a MONAI ``UnetResBlock``) cannot run the lean maths, or ``None`` if it can."""
    if not isinstance(block, UnetResBlock):
        return f"{type(block).__name__} is not a MONAI UnetResBlock"
    norms = [block.norm1, block.norm2] + ([block.norm3] if hasattr(block, "norm3") else [])
    for n in norms:
        if not isinstance(n, nn.modules.instancenorm._InstanceNorm) or n.affine or n.track_running_stats:
            return f"norm {n!r} is not an instance norm without affine parameters or running statistics"
    act = block.lrelu
    if not isinstance(act, nn.LeakyReLU) or not act.negative_slope > 0:
        return f"activation {act!r} is not a leaky ReLU with a positive slope (not invertible)"
    for name in ("conv1", "conv2", "conv3"):
        layer = getattr(block, name, None)
        if layer is None:
            continue
        conv = getattr(layer, "conv", None)
        if not isinstance(conv, nn.modules.conv._ConvNd) or conv.bias is not None or len(getattr(layer, "adn", ())):
            return f"{name} is not a bias-free convolution without dropout"
    if block.norm1.eps != block.norm2.eps:
        return "the norms use different eps"
    return None


_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


def _infer_block(block: UnetResBlock, maps: list[Tensor]) -> Tensor:
    """No-autograd forward of a lean block on ``cat(maps, dim=1)`` (``[B, C_i, *S]`` each).

    Consumes ``maps`` (the list is emptied): each map is dropped as soon as both convolutions that read
    it have run, so when the list holds the only references an up-block never has the upsampled map,
    the skip and all of its outputs alive at once. Maps are taken channels-last, where oneDNN's
    convolutions read their input in place (channels-first, each one copies its input first)."""
    eps, slope = block.norm1.eps, block.lrelu.negative_slope
    fmt = _CHANNELS_LAST.get(maps[0].dim())
    has3 = hasattr(block, "conv3")
    out = res = None
    off = 0
    for i in range(len(maps)):
        m, maps[i] = maps[i], None
        if fmt is not None:
            m = m.contiguous(memory_format=fmt)
        part = _conv_part(block.conv1, m, off)
        out = part if out is None else out.add_(part)
        del part
        if has3:
            part = _conv_part(block.conv3, m, off)
            res = part if res is None else res.add_(part)
            del part
        else:
            res = m
        off += m.shape[1]
        del m
    maps.clear()
    out = block.conv2(_norm_act_(out, None, eps, slope))
    if has3:
        res = _norm_act_(res, None, eps, None)
    return _norm_act_(out, res, eps, slope)


class LeanUnetResBlock(UnetResBlock):
    """MONAI ``UnetResBlock`` with the lean forward; ``[B, C_in, *S]`` (+ optional ``skip
    [B, C_skip, *S]``, read as concatenated after the input) -> ``[B, C_out, *S']``
    (channels-last in inference)."""

    def forward(self, inp: Tensor, skip: Tensor | None = None) -> Tensor:
        if not torch.is_grad_enabled():
            return _infer_block(self, [inp] if skip is None else [inp, skip])
        eps, slope = self.norm1.eps, self.lrelu.negative_slope
        out = norm_act(_conv(self.conv1, inp, skip), None, eps, slope)
        out = self.conv2(out)
        residual = norm_act(_conv(self.conv3, inp, skip), None, eps, None) if hasattr(self, "conv3") else inp
        return norm_act(out, residual, eps, slope)


class LeanUnetrUpBlock(UnetrUpBlock):
    """MONAI ``UnetrUpBlock`` (transposed conv, then the residual block on ``cat(up, skip)``) whose
    block reads the two parts without concatenating them."""

    def forward(self, inp: Tensor, skip: Tensor) -> Tensor:
        return self.conv_block(self.transp_conv(inp), skip)

    def forward_popping(self, inp: Tensor, skips: list[Tensor]) -> Tensor:
        """``forward(inp, skips.pop())``; in inference the popped skip and the upsampled map are
        freed inside the block as soon as they are read (a module call would keep its arguments
        alive to the end)."""
        if torch.is_grad_enabled():
            return self(inp, skips.pop())
        maps = [self.transp_conv(inp), skips.pop()]
        return _infer_block(self.conv_block, maps)


def set_block_impl(module: nn.Module, impl: str, *, op: str = "set_block_impl") -> int:
    """Switch every MONAI ``UnetResBlock``/``UnetrUpBlock`` inside ``module`` to ``impl``
    (``"lean"`` or ``"monai"``) in place; returns how many blocks now run ``impl``. Blocks the lean
    maths does not cover (see :func:`unsupported_reason`) stay MONAI's and are not counted; subclasses
    of MONAI's blocks are left alone (their forward may differ). ``op`` names the caller in errors."""
    if impl not in BLOCK_IMPLS:
        raise ValueError(f"{op}: block_impl must be one of {list(BLOCK_IMPLS)}, got {impl!r}")
    lean = impl == "lean"
    n = 0
    for m in module.modules():
        if type(m) in (UnetResBlock, LeanUnetResBlock) and (not lean or unsupported_reason(m) is None):
            m.__class__ = LeanUnetResBlock if lean else UnetResBlock
            n += 1
        elif type(m) in (UnetrUpBlock, LeanUnetrUpBlock) and type(m.conv_block) in (UnetResBlock, LeanUnetResBlock):
            if not lean or unsupported_reason(m.conv_block) is None:
                m.__class__ = LeanUnetrUpBlock if lean else UnetrUpBlock
                n += 1
    return n
