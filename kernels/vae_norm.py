"""Fused channel RMSNorm (+SiLU) of the Wan VAE over channels_last_3d activations.

y = act(x / max(||x||_C, 1e-12) * sqrt(C) * gamma), act = SiLU or identity: one read of x, one write of y
(PyTorch needs a reduction plus three elementwise passes). With channels_last_3d each pixel's C channels
are contiguous, so a [B, C, T, H, W] tensor is B blocks of P = T*H*W rows of C, and `out` may be a
strided view such as the tail of a causal conv's scratch buffer (its own batch stride).
Reference: `lightx2v_engine.vae.rms_norm_act_ref`.

Plain launcher, not a torch.library op: the VAE runs eagerly and writes into preallocated views.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

NORM_EPS = 1e-12


@triton.jit
def _rms_norm_act_kernel(X, G, Y, P, C, stride_xb, stride_yb, scale, eps,
                         SILU: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """BLOCK_P pixel rows of batch program_id(1): fp32 sum of squares over C, scale, gamma, SiLU."""
    b = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    cols = tl.arange(0, BLOCK_C)
    mask = (rows[:, None] < P) & (cols[None, :] < C)
    offs = rows[:, None] * C + cols[None, :]
    x = tl.load(X + b * stride_xb + offs, mask=mask, other=0.0).to(tl.float32)
    norm = tl.sqrt(tl.sum(x * x, axis=1))
    r = scale / tl.maximum(norm, eps, propagate_nan=tl.PropagateNan.ALL)  # (a NaN pixel stays NaN, as F.normalize)
    g = tl.load(G + cols, mask=cols < C, other=0.0).to(tl.float32)
    y = x * r[:, None] * g[None, :]
    if SILU:
        y = y * tl.sigmoid(y)
    tl.store(Y + b * stride_yb + offs, y.to(Y.dtype.element_ty), mask=mask)


def pixel_rows(t: torch.Tensor) -> int | None:
    """Batch stride of `t` [B, C, *spatial] when each batch is P contiguous rows of C channels, else None."""
    c = t.shape[1]
    expected = c
    for size, stride in sorted(zip(t.shape[2:], t.stride()[2:]), key=lambda s: s[1]):
        if size != 1 and stride != expected:
            return None
        expected *= size
    if c != 1 and t.stride(1) != 1:
        return None
    return t.stride(0)


def _spatial_order(t: torch.Tensor) -> list[int]:
    """The spatial dims of `t` (size > 1) from the fastest-varying to the slowest."""
    return [d for d, _ in sorted(((d, t.stride(d)) for d in range(2, t.dim()) if t.shape[d] != 1),
                                 key=lambda ds: ds[1])]


def supports(x: torch.Tensor, out: torch.Tensor | None) -> bool:
    """x (and out) dense rows of C channels, out's pixels in x's order (the kernel reads and writes one offset)."""
    return (x.dim() >= 3 and pixel_rows(x) is not None
            and (out is None or (out.shape == x.shape and pixel_rows(out) is not None
                                 and _spatial_order(out) == _spatial_order(x))))


def rms_norm_act(x: torch.Tensor, gamma: torch.Tensor, silu: bool, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [B, C, T, H, W] channels_last (any dtype), gamma [C, 1, ...] -> y in `out` (or a new tensor like x)."""
    if out is None:
        out = torch.empty_like(x)  # keeps channels_last
    if not supports(x, out):
        raise ValueError(f"kernels/vae_norm.py: x {list(x.shape)} strides {x.stride()} / out strides "
                         f"{out.stride() if out is not None else None} are not channels-last pixel rows")
    if gamma.numel() != x.shape[1]:
        raise ValueError(f"kernels/vae_norm.py: gamma has {gamma.numel()} values, x has {x.shape[1]} channels")
    b, c = x.shape[:2]
    p = math.prod(x.shape[2:])
    if out.numel() == 0:
        return out
    block_c, block_p = _blocks(c, p)
    grid = (triton.cdiv(p, block_p), b)
    _rms_norm_act_kernel[grid](x, gamma.reshape(c).contiguous(), out, p, c, pixel_rows(x), pixel_rows(out),
                               math.sqrt(c), NORM_EPS, SILU=silu, BLOCK_P=block_p, BLOCK_C=block_c,
                               num_warps=NUM_WARPS)
    return out


NUM_WARPS = 4


def _blocks(c: int, p: int) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_P): a whole pixel row of channels, ~4096 elements (32 per thread) per program."""
    block_c = triton.next_power_of_2(c)
    return block_c, max(1, min(triton.next_power_of_2(p), 4096 // block_c))
