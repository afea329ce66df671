"""The selective-SSM core shared by every mixer: K scan directions folded into one scan call.

Input: the already-scanned sequences ``x [B, L, K, C]`` (direction k in slot k). Each direction has
its own ``x_proj`` / ``dt_proj`` / ``A_log`` / ``D`` / ``dt_bias`` (VMamba, Vim, SegMamba), or all
directions share one set (PlainMamba, nnMamba) with ``share_params=True``. The K directions become
the K groups of a single :func:`mz_kernels.selective_scan` call on ``[B, L, K*C]``.

The SSM always runs in float32, also under autocast (the fp16/bf16 NaN reports of the anchors).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from mz_kernels import selective_scan


def dt_rank_for(d_model: int, dt_rank: int | str) -> int:
    """Mamba's ``dt_rank="auto"`` rule: ceil(d_model / 16)."""
    if dt_rank == "auto":
        return math.ceil(d_model / 16)
    if isinstance(dt_rank, bool) or not isinstance(dt_rank, int) or dt_rank < 1:
        raise ValueError(f"dt_rank must be 'auto' or a positive int, got {dt_rank!r}")
    return dt_rank


class SelectiveSSM(nn.Module):
    """Mamba-1 S6 over K directions.

    Args:
        d_inner: channels C per direction.
        d_state: state size N.
        num_dirs: K.
        dt_rank: rank of the dt projection (``"auto"``: ceil(dt_rank_base / 16)).
        dt_rank_base: the model width used by the ``"auto"`` rule (default ``d_inner``).
        share_params: one set of projections/A/D for all directions.
        dt_min, dt_max, dt_init_floor: Mamba's dt initialisation range.
        backend: kernel backend passed to :func:`selective_scan`.
    """

    def __init__(
        self,
        d_inner: int,
        d_state: int = 16,
        num_dirs: int = 1,
        *,
        dt_rank: int | str = "auto",
        dt_rank_base: int | None = None,
        share_params: bool = False,
        dt_min: float = 1e-3,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        backend: str = "auto",
    ):
        super().__init__()
        for name, v in (("d_inner", d_inner), ("d_state", d_state), ("num_dirs", num_dirs)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"SelectiveSSM: {name} must be a positive int, got {v!r}")
        self.d_inner, self.d_state, self.num_dirs = d_inner, d_state, num_dirs
        self.dt_rank = dt_rank_for(dt_rank_base or d_inner, dt_rank)
        self.share_params = share_params
        self.backend = backend
        kp = 1 if share_params else num_dirs
        R, N, C = self.dt_rank, d_state, d_inner
        self.x_proj_weight = nn.Parameter(torch.empty(kp, R + 2 * N, C))
        self.dt_proj_weight = nn.Parameter(torch.empty(kp, C, R))
        self.dt_bias = nn.Parameter(torch.empty(kp, C))
        self.A_log = nn.Parameter(torch.empty(kp, C, N))
        self.D = nn.Parameter(torch.ones(kp, C))
        self._init(dt_min, dt_max, dt_init_floor)

    @torch.no_grad()
    def _init(self, dt_min: float, dt_max: float, floor: float) -> None:
        kp, C, R = self.dt_proj_weight.shape
        nn.init.uniform_(self.x_proj_weight, -(C**-0.5), C**-0.5)
        nn.init.uniform_(self.dt_proj_weight, -(R**-0.5), R**-0.5)
        dt = torch.exp(torch.rand(kp, C) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=floor)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        self.A_log.copy_(torch.log(torch.arange(1, self.d_state + 1, dtype=torch.float32)).expand_as(self.A_log))
        self.D.fill_(1.0)

    def _per_dir(self, p: Tensor) -> Tensor:
        return p.expand(self.num_dirs, *p.shape[1:]) if self.share_params else p

    def forward(self, x: Tensor, extra_B: Tensor | None = None, z: Tensor | None = None) -> Tensor:
        """Run the scan.

        Args:
            x: ``[B, L, K, C]`` scanned, activated inputs.
            extra_B: optional additive term for B, broadcastable to ``[B, L, K, N]`` (PlainMamba's
                direction-aware ``direction_Bs``).
            z: optional gate ``[B, L, K, C]`` fused into the scan (``y * silu(z)``).

        Returns:
            ``y [B, L, K, C]`` in x's dtype.
        """
        Bsz, L, K, C = x.shape
        if K != self.num_dirs or C != self.d_inner:
            raise ValueError(f"SelectiveSSM: x must be [B, L, K={self.num_dirs}, C={self.d_inner}], got {tuple(x.shape)}")
        with torch.autocast(device_type=x.device.type, enabled=False):
            xf = x.float().contiguous()
            x_dbl = torch.einsum("blkc,kec->blke", xf, self._per_dir(self.x_proj_weight).float())
            dt, Bm, Cm = x_dbl.split([self.dt_rank, self.d_state, self.d_state], dim=-1)
            dt = torch.einsum("blkr,kcr->blkc", dt, self._per_dir(self.dt_proj_weight).float())
            if extra_B is not None:
                Bm = Bm + extra_B.float()
            A = -torch.exp(self._per_dir(self.A_log).float()).reshape(K * C, self.d_state)
            y, _ = selective_scan(
                xf.reshape(Bsz, L, K * C),
                dt.reshape(Bsz, L, K * C).contiguous(),
                A.contiguous(),
                Bm.contiguous(),
                Cm.contiguous(),
                D=self._per_dir(self.D).float().reshape(K * C).contiguous(),
                z=None if z is None else z.float().reshape(Bsz, L, K * C).contiguous(),
                delta_bias=self._per_dir(self.dt_bias).float().reshape(K * C).contiguous(),
                delta_softplus=True,
                backend=self.backend,
            )
        return y.reshape(Bsz, L, K, C).to(x.dtype)

    def forward_dir(
        self, x: Tensor, k: int, initial_state: Tensor | None = None, z: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Direction ``k`` alone on one piece of its sequence, carrying the state between pieces.

        Args:
            x: ``[B, T, C]`` scanned, activated inputs of direction ``k`` (positions in scan order).
            k: direction index (its parameters; all share one set with ``share_params``).
            initial_state: ``[B, C, N]`` float32 state before the piece (``None``: zeros).
            z: optional gate ``[B, T, C]`` fused into the scan (``y * silu(z)``).

        Returns:
            ``(y [B, T, C] in x's dtype, state [B, C, N] float32 after the piece)``. Running the
            pieces of a sequence in order reproduces :meth:`forward`'s direction ``k``.
        """
        if not 0 <= k < self.num_dirs or x.shape[-1] != self.d_inner:
            raise ValueError(f"SelectiveSSM.forward_dir: need k in [0, {self.num_dirs}) and x [B, T, {self.d_inner}], got k={k}, {tuple(x.shape)}")
        kk = 0 if self.share_params else k
        with torch.autocast(device_type=x.device.type, enabled=False):
            xf = x.float().contiguous()
            x_dbl = xf @ self.x_proj_weight[kk].float().t()
            dt, Bm, Cm = x_dbl.split([self.dt_rank, self.d_state, self.d_state], dim=-1)
            y, state = selective_scan(
                xf,
                (dt @ self.dt_proj_weight[kk].float().t()).contiguous(),
                -torch.exp(self.A_log[kk].float()),
                Bm.unsqueeze(2).contiguous(),
                Cm.unsqueeze(2).contiguous(),
                D=self.D[kk].float().contiguous(),
                z=None if z is None else z.float().contiguous(),
                delta_bias=self.dt_bias[kk].float().contiguous(),
                delta_softplus=True,
                initial_state=initial_state,
                output_final_state=True,
                backend=self.backend,
            )
        return y.to(x.dtype), state

    def flops(self, batch: int, length: int) -> int:
        """Analytic FLOPs of the scan itself (generic counters miss it): ~9 per state element plus the
        projections, following the VMamba/Vim convention (exp, 2 mul-add for h, mul-add for y)."""
        K, C, N, R = self.num_dirs, self.d_inner, self.d_state, self.dt_rank
        scan = 9 * batch * length * K * C * N
        proj = 2 * batch * length * K * C * (R + 2 * N) + 2 * batch * length * K * C * R
        return scan + proj
