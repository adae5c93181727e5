"""Wan's RMSNorm over the last dim in one pass: y = ((x * rsqrt(mean(x^2) + eps)).to(dtype) * w).to(dtype).

Used for the cross-attention q/k norms (the self-attention ones are fused with RoPE in qk_norm_rope.py).
Reference: lightx2v_engine.ops.rms_norm_ref.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from lightx2v_engine.ops import rms_norm_ref

__all__ = ["rms_norm", "rms_norm_ref"]


@triton.jit
def _rms_norm_kernel(X, W, OUT, R, C, stride_xr, eps, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    rmask = rows < R
    mask = rmask[:, None] & (cols < C)[None, :]
    x = tl.load(X + rows.to(tl.int64)[:, None] * stride_xr + cols[None, :], mask=mask, other=0.0)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=1) / C + eps)
    w = tl.load(W + cols, mask=cols < C, other=0.0).to(tl.float32)
    # Wan rounds to the input dtype after the normalisation, then multiplies by the fp32 weight
    n = (xf * rstd[:, None]).to(x.dtype).to(tl.float32) * w[None, :]
    tl.store(OUT + rows.to(tl.int64)[:, None] * C + cols[None, :], n.to(OUT.dtype.element_ty), mask=mask)


def _launch_cfg(C: int) -> tuple[int, int, int]:
    block_c = triton.next_power_of_2(C)
    block_r = max(1, min(8, 4096 // block_c))  # a few rows per program for short rows
    warps = max(1, min(8, block_r * block_c // 1024))
    return block_r, block_c, warps


@torch.library.custom_op("lightx2v::rms_norm", mutates_args=())
def _rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    C = x.shape[-1]
    if x.numel() == 0:  # (reshape(-1, 0) is ambiguous)
        return torch.empty(x.shape, dtype=x.dtype, device=x.device)
    x2 = x.reshape(-1, C)
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    if x2.numel():
        block_r, block_c, warps = _launch_cfg(C)
        rows = x2.shape[0]
        _rms_norm_kernel[(triton.cdiv(rows, block_r),)](x2, weight, out, rows, C, x2.stride(0), eps,
                                                        BLOCK_R=block_r, BLOCK_C=block_c, num_warps=warps)
    return out.view(x.shape)


@_rms_norm_op.register_fake
def _(x, weight, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x [..., C] (unit stride on C) -> same shape and dtype; weight [C] fp32."""
    C = x.shape[-1]
    if x.stride(-1) != 1:
        raise ValueError(f"kernels/rms_norm.py: x must have unit stride on C, got strides {x.stride()}")
    if weight.shape != (C,) or weight.stride(0) != 1:
        raise ValueError(f"kernels/rms_norm.py: weight must be a contiguous [{C}], got {list(weight.shape)}")
    return _rms_norm_op(x, weight, eps)
