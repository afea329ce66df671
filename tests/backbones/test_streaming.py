"""Streaming inference of the Mamba mixer (``stream_chunk``): pieces with carried conv/SSM states give
the whole-sequence result, for raster and raster+reversed scans, and whole models (Vim, the 1D encoder)."""
from __future__ import annotations

import pytest
import torch

from mz_backbones import create_backbone
from mz_backbones.layers.mixer import MambaMixer
from mz_backbones.layers.scans import Bidirectional, Cross2D, Unidirectional


def _mixer(scan, **kw) -> MambaMixer:
    torch.manual_seed(0)
    m = MambaMixer(8, scan, d_state=4, **kw).eval()
    with torch.no_grad():  # non-trivial D and biases
        m.ssm.D.uniform_(-1, 1)
        m.conv_bias.uniform_(-1, 1)
    return m


@pytest.mark.parametrize("L,chunk", [(23, 5), (64, 16), (17, 16)], ids=["L23-c5", "L64-c16", "L17-c16"])
@pytest.mark.parametrize(
    "scan,kw",
    [
        (Bidirectional, {}),
        (Bidirectional, {"merge": "sum", "gate": False}),
        (Bidirectional, {"share_params": True}),
        (Unidirectional, {}),
    ],
    ids=["bi-mean-gated", "bi-sum-nogate", "bi-shared", "uni"],
)
def test_streaming_equals_whole_sequence(scan, kw, L: int, chunk: int) -> None:
    m = _mixer(scan(), **kw)
    x = torch.randn(2, L, 8, generator=torch.Generator().manual_seed(L))
    with torch.no_grad():
        m.stream_chunk = 0
        whole = m(x, (L,))
        m.stream_chunk = chunk
        assert m._streams(x)
        pieces = m(x, (L,))
    torch.testing.assert_close(pieces, whole, rtol=1e-5, atol=1e-5)


def test_streaming_is_inference_only_and_needs_raster_directions() -> None:
    m = _mixer(Bidirectional(), stream_chunk=4)
    x = torch.randn(1, 12, 8)
    assert not m._streams(x)  # autograd on: the whole-sequence path (gradients flow as usual)
    y = m(x, (12,))
    assert y.requires_grad
    with torch.no_grad():
        assert m._streams(x)
        assert not m._streams(x[:, :4])  # not longer than one piece
    cross = MambaMixer(8, Cross2D(), d_state=4, stream_chunk=4).eval()
    with torch.no_grad():
        assert not cross._streams(torch.randn(1, 12, 8))  # column-major directions cannot stream
    with pytest.raises(ValueError, match="stream_chunk must be an int >= 0"):
        MambaMixer(8, Bidirectional(), stream_chunk=-1)


@pytest.mark.parametrize("name,shape", [("vim_test", (1, 3, 64, 48)), ("bimamba_seq_test", None)], ids=["vim", "bimamba_seq"])
def test_streaming_whole_model(name: str, shape) -> None:
    torch.manual_seed(0)
    model = create_backbone(name).eval()
    if shape is None:
        shape = (2, model.in_chans, 96)
    x = torch.randn(*shape)
    mixers = [m for m in model.modules() if isinstance(m, MambaMixer)]
    assert mixers
    with torch.inference_mode():
        for m in mixers:
            m.stream_chunk = 0
        whole = model.forward_features(x)
        for m in mixers:
            m.stream_chunk = 7
        pieces = model.forward_features(x)
    torch.testing.assert_close(pieces, whole, rtol=1e-4, atol=1e-4)


class _FwdRevRev(Bidirectional):
    """Three directions (raster, reversed, reversed again with its own parameters): exercises the
    accumulation of several reversed directions and the mean over K=3."""

    num_dirs = 3
    stream_dirs = ("fwd", "rev", "rev")

    def scan(self, x, grid):
        self._check(grid, x)
        return torch.stack([x, x.flip(1), x.flip(1)], dim=2)

    def merge(self, y, grid):
        return y[:, :, 0] + y[:, :, 1].flip(1) + y[:, :, 2].flip(1)


@pytest.mark.parametrize(
    "scan,kw",
    [(Bidirectional, {}), (Bidirectional, {"merge": "sum", "gate": False, "bias": True}), (Unidirectional, {}), (_FwdRevRev, {})],
    ids=["bi", "bi-sum-nogate-bias", "uni", "fwd-rev-rev"],
)
@pytest.mark.parametrize("chunk", [0, 6], ids=["whole", "pieces"])
def test_add_into_equals_forward_plus_input(scan, kw, chunk: int) -> None:
    m = _mixer(scan(), stream_chunk=chunk, **kw)
    x = torch.randn(2, 23, 8, generator=torch.Generator().manual_seed(3))
    norm = torch.nn.RMSNorm(8)
    with torch.no_grad():
        m.stream_chunk = 0
        expected = x + m(norm(x), (23,))
        m.stream_chunk = chunk
        assert m._streams(x) == (chunk > 0)
        assert torch.allclose(m(x, (23,), pre=norm), expected - x, rtol=1e-5, atol=1e-5)
        stream = x.clone()
        got = m.add_into(stream, (23,), pre=norm)
    assert got is stream  # in place
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_in_place_layer_loop_matches_autograd_loop() -> None:
    """The inference loop (blocks add into the stream, mixers stream) gives the taps and the features
    of the autograd loop (new tensors at every add, whole sequences)."""
    torch.manual_seed(0)
    model = create_backbone("vim_test").eval()
    for m in model.modules():
        if isinstance(m, MambaMixer):
            m.stream_chunk = 5
    x = torch.randn(1, 3, 48, 64)
    ref_feats = model.forward_features(x)  # parameters require grad: the autograd path
    ref_stages = model.forward_stages(x)
    assert ref_feats.requires_grad
    with torch.inference_mode():
        feats = model.forward_features(x)
        stages = model.forward_stages(x)
    torch.testing.assert_close(feats, ref_feats.detach(), rtol=1e-4, atol=1e-4)
    for a, b in zip(stages, ref_stages, strict=True):
        torch.testing.assert_close(a, b.detach(), rtol=1e-4, atol=1e-4)
