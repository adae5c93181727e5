"""8-bit GEMM with rowwise scales and a fused epilogue (Triton).

  out = [residual +] [gate *] ((a @ b^T) * scale_a * scale_b^T [+ bias])     (all epilogue math in fp32)

a [M, K] and b [N, K] are float8_e4m3fn (fp32 accumulation, Hopper fast accumulation) or int8 (int32
accumulation), both K-contiguous (b is a linear's [out, in] weight); scale_a [M, 1] (per token) and
scale_b [N, 1] or [1, N] (per output channel) fp32; bias [N]; residual [M, N]; gate [N] or [1, N]
(one batch element: the DiT's gate [1, 1, C] flattened). The gated-residual form fuses Wan's
``x = x + gate * o(attn)`` / ``x = x + gate * ffn.2(h)`` into the GEMM, saving one pass over [M, N].
Reference: ``scaled_gemm_ref``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._util import interpreting

__all__ = ["fp8_gemm", "scaled_gemm", "scaled_gemm_ref"]


def scaled_gemm_ref(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor,
                    bias: torch.Tensor | None = None, residual: torch.Tensor | None = None,
                    gate: torch.Tensor | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The formula above with an fp32 matmul of the 8-bit values (their products are exact in fp32).
    Output dtype: out_dtype, else residual's dtype, else bf16."""
    y = (a.float() @ b.float().t()) * scale_a.float().reshape(-1, 1) * scale_b.float().reshape(1, -1)
    if bias is not None:
        y = y + bias.float()
    if gate is not None:
        y = y * gate.float().reshape(1, -1)
    if residual is not None:
        y = residual.float() + y
    return y.to(out_dtype or (residual.dtype if residual is not None else torch.bfloat16))


@triton.jit
def _scaled_gemm_kernel(A, B, OUT, SA, SB, BIAS, RES, GATE,
                        M, N, K, stride_am, stride_bn, stride_om, stride_rm,
                        HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, HAS_GATE: tl.constexpr,
                        IS_INT8: tl.constexpr, EVEN_K: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """One [BLOCK_M, BLOCK_N] output tile; tiles are visited in groups of GROUP_M row-tiles for L2 reuse of b."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * num_pid_n)
    first_m = group * GROUP_M
    group_size = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_pid_n)) % group_size
    pid_n = (pid % (GROUP_M * num_pid_n)) // group_size

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # out-of-range rows/cols re-read valid ones (wrapped) instead of masking every load; stores are masked
    rm = (offs_m % M).to(tl.int64)
    rn = (offs_n % N).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = A + rm[:, None] * stride_am + offs_k[None, :]
    b_ptrs = B + rn[None, :] * stride_bn + offs_k[:, None]  # [BLOCK_K, BLOCK_N] view of the K-major b

    if IS_INT8:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_left = K - k * BLOCK_K
            if IS_INT8:
                a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0)
                b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0)
            else:
                a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
                b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        if IS_INT8:
            acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        else:
            acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K

    sa = tl.load(SA + rm)
    sb = tl.load(SB + rn)
    y = acc.to(tl.float32) * sa[:, None] * sb[None, :]
    if HAS_BIAS:
        y += tl.load(BIAS + rn).to(tl.float32)[None, :]
    if HAS_GATE:
        y *= tl.load(GATE + rn).to(tl.float32)[None, :]
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if HAS_RES:
        y += tl.load(RES + rm[:, None] * stride_rm + rn[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + rm[:, None] * stride_om + rn[None, :], y.to(OUT.dtype.element_ty), mask=mask)


# Hopper (sm_90) 8-bit tiles: 128-256 x 128-256 outputs, 64-128 deep K steps, 3-4 smem stages (<= 192 KB)
_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 128, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 256, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=4),
]
_scaled_gemm_tuned = triton.autotune(configs=_CONFIGS, key=["M", "N", "K", "HAS_RES", "IS_INT8"])(_scaled_gemm_kernel)

# small fixed tiles for the CPU interpreter (tests)
_INTERPRET_CFG = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "GROUP_M": 2}


def fp8_gemm(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor,
             bias: torch.Tensor | None = None, residual: torch.Tensor | None = None,
             gate: torch.Tensor | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """out [M, N] = [residual +] [gate *] ((a @ b^T) * scale_a * scale_b^T [+ bias]); shapes in the module doc.

    out_dtype defaults to residual's dtype, else bf16. a, b must be float8_e4m3fn or int8 (same dtype).
    """
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"kernels/fp8_gemm.py: need a [M, K] and b [N, K], got {list(a.shape)} and {list(b.shape)}")
    if a.dtype != b.dtype or a.dtype not in (torch.float8_e4m3fn, torch.int8):
        raise ValueError(f"kernels/fp8_gemm.py: a and b must both be float8_e4m3fn or int8, got {a.dtype}, {b.dtype}")
    M, K = a.shape
    N = b.shape[0]
    if a.stride(1) != 1 or b.stride(1) != 1:
        raise ValueError(f"kernels/fp8_gemm.py: a and b must be K-contiguous, got strides {a.stride()}, {b.stride()}")
    if scale_a.numel() != M or scale_b.numel() != N:
        raise ValueError(f"kernels/fp8_gemm.py: scale_a must have M={M} and scale_b N={N} elements, got "
                         f"{list(scale_a.shape)} and {list(scale_b.shape)}")
    for name, t in (("bias", bias), ("gate", gate)):
        if t is not None and t.numel() != N:
            raise ValueError(f"kernels/fp8_gemm.py: {name} must have N={N} elements, got {list(t.shape)}")
    if residual is not None and (residual.shape != (M, N) or residual.stride(1) != 1):
        raise ValueError(f"kernels/fp8_gemm.py: residual must be [M, N] = [{M}, {N}] with unit column stride, "
                         f"got {list(residual.shape)} strides {residual.stride()}")
    out_dtype = out_dtype or (residual.dtype if residual is not None else torch.bfloat16)
    out = torch.empty(M, N, device=a.device, dtype=out_dtype)
    if M == 0 or N == 0:
        return out
    sa = scale_a.reshape(M).float().contiguous()
    sb = scale_b.reshape(N).float().contiguous()
    bias_t = bias.reshape(N).contiguous() if bias is not None else sa
    gate_t = gate.reshape(N).contiguous() if gate is not None else sa
    res_t = residual if residual is not None else out
    args = (a, b, out, sa, sb, bias_t, res_t, gate_t, M, N, K, a.stride(0), b.stride(0), out.stride(0),
            res_t.stride(0))
    flags = dict(HAS_BIAS=bias is not None, HAS_RES=residual is not None, HAS_GATE=gate is not None,
                 IS_INT8=a.dtype == torch.int8)
    if interpreting() or not a.is_cuda:
        cfg = _INTERPRET_CFG
        grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
        _scaled_gemm_kernel[grid](*args, **flags, EVEN_K=K % cfg["BLOCK_K"] == 0, **cfg)
    else:
        # EVEN_K must hold for every candidate BLOCK_K (64 and 128)
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
        _scaled_gemm_tuned[grid](*args, **flags, EVEN_K=K % 128 == 0)
    return out


@torch.library.custom_op("lightx2v::scaled_gemm", mutates_args=())
def scaled_gemm(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor,
                bias: torch.Tensor | None, residual: torch.Tensor | None, gate: torch.Tensor | None,
                out_dtype: torch.dtype) -> torch.Tensor:
    """fp8_gemm as an opaque torch op (torch.ops.lightx2v.scaled_gemm) for torch.compile / CUDA graphs."""
    return fp8_gemm(a, b, scale_a, scale_b, bias, residual, gate, out_dtype)


@scaled_gemm.register_fake
def _scaled_gemm_fake(a, b, scale_a, scale_b, bias, residual, gate, out_dtype):
    return a.new_empty((a.shape[0], b.shape[0]), dtype=out_dtype)
