"""Self-attention with the q/k RMSNorm and the 3D RoPE applied in the attention kernel (no normed q/k tensors).

The default self-attention path (kernels/attention.py) runs one fused norm+RoPE pass over q and k, which
reads them and writes rotated copies that the attention then reads. Here a stats pass reads q and k once
and writes only each token's 1/rms (RMS spans all heads, so a head's tile cannot compute it alone); the
attention kernel reads the raw projections [B, L, C] and, per tile,

    n = round(round(x * rstd) * w)                      (Wan's RMSNorm, rounded to the run dtype twice)
    (re, im) = (n[2i] cos - n[2i+1] sin, n[2i+1] cos + n[2i] sin),  rounded to the run dtype

for the query block once (prologue) and for every key block it visits. The scores are
q.k = re_q . re_k + im_q . im_k: two K = D/2 dots on the split halves (the dot product does not care that
the pairs are de-interleaved, as long as q and k are split alike). v and the output stay in [B, L, C].

Trade: the stats pass reads q and k as the norm+RoPE pass does but writes no rotated copies (a net
saving of 2 x L x C x 2 bytes per layer), and the key blocks' norm and rotation are redone once per query
block instead of once per key: L / BLOCK_M times the elementwise work of the pass, on the CUDA cores the
softmax already keeps busy. Which wins is measured (`bench_kernels.py`, section "self_attn_rope"); the
choice is LX2V_SELF_ATTN_ROPE ("pass" | "prologue"), default "pass". A tuned file's "prologue" applies
only while self-attention runs the Triton backend (an explicit other backend wins); an explicit
"prologue" always applies. Head dims 32, 64, 128 (two K = D/2 dots need D/2 >= 16; 256 exceeds sm90's
shared memory at the default tiles).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._util import check_choice, choose, env_choice
from .attention import LOG2E, _softmax_step

__all__ = ["attention_rope_prologue", "rope_placement", "set_rope_placement", "ROPE_PLACEMENTS",
           "row_rstd", "RopeAttnConfig"]

ROPE_PLACEMENTS = ("pass", "prologue")
_WHERE = "kernels/attention_rope.py"
_PLACEMENT = env_choice("LX2V_SELF_ATTN_ROPE", ROPE_PLACEMENTS, None, _WHERE)


def set_rope_placement(placement: str) -> None:
    """"pass" (a norm+RoPE pass, then attention) or "prologue" (this kernel); "default" drops the choice."""
    global _PLACEMENT
    _PLACEMENT = None if placement == "default" else check_choice("self-attention RoPE placement", placement,
                                                                 ROPE_PLACEMENTS)


def rope_placement(device: torch.device | None = None) -> str:
    """The placement used on `device`: the explicit choice, else the GPU's tuned file (only while
    self-attention's backend is the Triton kernel with no explicit config), else "pass"."""
    if _PLACEMENT is not None:
        return _PLACEMENT
    from .attention import _CONFIG, _impl
    if _impl(device) != "triton" or _CONFIG is not None:  # (an explicit Triton config is the one to run)
        return "pass"
    return choose(None, "LX2V_SELF_ATTN_ROPE", device, ROPE_PLACEMENTS, "pass", _WHERE)


@dataclass(frozen=True)
class RopeAttnConfig:
    block_m: int = 128
    block_n: int = 64
    num_warps: int = 8
    num_stages: int = 2

    @property
    def name(self) -> str:
        return f"{self.block_m}x{self.block_n}_w{self.num_warps}_s{self.num_stages}"


# ----------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------

@triton.jit
def _row_rstd_kernel(X, R, L, C, stride_b, stride_l, eps, BLOCK_C: tl.constexpr):
    """One token row of [B, L, C]: R[row] = 1 / sqrt(mean(x^2) + eps) in fp32."""
    row = tl.program_id(0)
    b = (row // L).to(tl.int64)
    l = (row % L).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    x = tl.load(X + b * stride_b + l * stride_l + cols, mask=cols < C, other=0.0).to(tl.float32)
    tl.store(R + row, 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / C + eps))


@triton.jit
def _normed_rotated(X, R, W, COS, SIN, rows, row_ok, stride_l, stride_cl, h,
                    HEAD_D: tl.constexpr, BLOCK: tl.constexpr):
    """Head h of tokens `rows` of one sequence: (re, im) [BLOCK, D/2] in the run dtype."""
    d = tl.arange(0, HEAD_D)
    j = tl.arange(0, HEAD_D // 2)
    rows = rows.to(tl.int64)  # L x row stride may pass 2^31 (fused [B, L, 3C] projections, long videos)
    x = tl.load(X + rows[:, None] * stride_l + h * HEAD_D + d[None, :], mask=row_ok[:, None], other=0.0)
    r = tl.load(R + rows, mask=row_ok, other=0.0)
    w = tl.load(W + h * HEAD_D + d).to(tl.float32)
    n = ((x.to(tl.float32) * r[:, None]).to(x.dtype).to(tl.float32) * w[None, :]).to(x.dtype).to(tl.float32)
    ne, no = tl.split(tl.reshape(n, (BLOCK, HEAD_D // 2, 2)))
    c = tl.load(COS + rows[:, None] * stride_cl + j[None, :], mask=row_ok[:, None], other=1.0)
    s = tl.load(SIN + rows[:, None] * stride_cl + j[None, :], mask=row_ok[:, None], other=0.0)
    return (ne * c - no * s).to(x.dtype), (no * c + ne * s).to(x.dtype)


@triton.jit
def _attn_rope_kernel(Q, K, V, O, RQ, RK, WQ, WK, COS, SIN,
                      stride_qb, stride_ql, stride_kb, stride_kl, stride_vb, stride_vl, stride_ob, stride_ol,
                      stride_cl, H, L, n_full, qk_scale,
                      HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_N: tl.constexpr):
    """One (query block, batch*head) of softmax(rope(rms(q)) rope(rms(k))^T / sqrt(D)) v over L tokens."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    q_base = Q + b * stride_qb
    k_base = K + b * stride_kb
    v_base = V + b * stride_vb + h * HEAD_D
    rq = RQ + b * L
    rk = RK + b * L
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_D)
    q_re, q_im = _normed_rotated(q_base, rq, WQ, COS, SIN, offs_m, offs_m < L, stride_ql, stride_cl, h,
                                 HEAD_D, BLOCK_M)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_D], tl.float32)
    all_rows = offs_n < BLOCK_N
    for start_n in tl.range(0, n_full, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        rows = start_n + offs_n
        k_re, k_im = _normed_rotated(k_base, rk, WK, COS, SIN, rows, all_rows, stride_kl, stride_cl, h,
                                     HEAD_D, BLOCK_N)
        v = tl.load(v_base + rows.to(tl.int64)[:, None] * stride_vl + offs_d[None, :])
        qk = tl.dot(q_im, k_im.T, tl.dot(q_re, k_re.T))
        m_i, l_i, acc = _softmax_step(qk, v, m_i, l_i, acc, qk_scale)
    if not EVEN_N:  # the ragged last key block: missing keys score -inf, their v rows are zero
        rows = n_full + offs_n
        ok = rows < L
        k_re, k_im = _normed_rotated(k_base, rk, WK, COS, SIN, rows, ok, stride_kl, stride_cl, h, HEAD_D, BLOCK_N)
        v = tl.load(v_base + rows.to(tl.int64)[:, None] * stride_vl + offs_d[None, :], mask=ok[:, None], other=0.0)
        qk = tl.where(ok[None, :], tl.dot(q_im, k_im.T, tl.dot(q_re, k_re.T)), float("-inf"))
        m_i, l_i, acc = _softmax_step(qk, v, m_i, l_i, acc, qk_scale)
    out = (acc / l_i[:, None]).to(O.dtype.element_ty)
    o_ptr = O + b * stride_ob + offs_m.to(tl.int64)[:, None] * stride_ol + h * HEAD_D + offs_d[None, :]
    tl.store(o_ptr, out, mask=offs_m[:, None] < L)


# ----------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------

def row_rstd(x: torch.Tensor, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [B, L, C] (unit stride on C) -> fp32 [B, L] of 1 / sqrt(mean(x^2 over C) + eps)."""
    B, L, C = x.shape
    if out is None:
        out = torch.empty((B, L), dtype=torch.float32, device=x.device)
    elif out.shape != (B, L) or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"{_WHERE}: out must be a contiguous fp32 [{B}, {L}], got {out.dtype} {list(out.shape)}")
    if x.stride(-1) != 1:
        raise ValueError(f"{_WHERE}: x needs unit stride on C, got strides {x.stride()}")
    if B * L:
        block = triton.next_power_of_2(C)
        _row_rstd_kernel[(B * L,)](x, out, L, C, x.stride(0), x.stride(1), eps, BLOCK_C=block,
                                   num_warps=max(1, min(16, block // 512)))
    return out


def row_rstd_ref(x: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.rsqrt(x.float().pow(2).mean(-1) + eps)


def attention_rope_prologue(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor,
                            cos: torch.Tensor, sin: torch.Tensor, num_heads: int, eps: float = 1e-6,
                            config: RopeAttnConfig | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(rope(rms(q) wq) rope(rms(k) wk)^T / sqrt(D)) v with the norm and RoPE inside the attention.

    q, k, v [B, L, C] (run dtype fp16/bf16, unit stride on C); wq, wk [C] fp32; cos, sin [L, D/2] fp32.
    Returns `out` (allocated contiguous [B, L, C] when None). Not a custom op: the self_attention op of
    kernels/attention.py calls it under rope_placement() == "prologue"; tests and benchmarks call it."""
    from .qk_norm_rope import _check
    _check(q, k, wq, wk, cos, sin, num_heads)
    if v.shape != q.shape or v.stride(-1) != 1:
        raise ValueError(f"{_WHERE}: v must be [B, L, C] = {list(q.shape)} with unit last stride, got "
                         f"{list(v.shape)} strides {v.stride()}")
    if q.dtype not in (torch.float16, torch.bfloat16) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"{_WHERE}: q, k, v must all be fp16 or bf16, got {q.dtype}, {k.dtype}, {v.dtype}")
    B, L, C = q.shape
    H, D = num_heads, C // num_heads
    if D not in (32, 64, 128):
        raise ValueError(f"{_WHERE}: head dim D must be 32, 64 or 128, got {D}")
    cfg = config or RopeAttnConfig()
    if out is None:
        out = torch.empty((B, L, C), dtype=q.dtype, device=q.device)
    elif out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1 or out.device != q.device:
        raise ValueError(f"{_WHERE}: out must be {q.dtype} [B, L, C] = {list(q.shape)} with unit last stride on "
                         f"{q.device}, got {out.dtype} {list(out.shape)} strides {out.stride()} on {out.device}")
    if out.numel() == 0:
        return out
    rq, rk = row_rstd(q, eps), row_rstd(k, eps)
    n_full = (L // cfg.block_n) * cfg.block_n
    grid = (triton.cdiv(L, cfg.block_m), B * H)
    _attn_rope_kernel[grid](
        q, k, v, out, rq, rk, wq, wk, cos, sin,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        cos.stride(0), H, L, n_full, LOG2E / math.sqrt(D),
        HEAD_D=D, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, EVEN_N=L % cfg.block_n == 0,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out
