"""Fused q/k RMSNorm (over the full width C) + 3D RoPE on interleaved pairs, one pass per token row.

Reads q and k once, writes them once, already split into heads: [B, L, C] -> [B, L, H, D] (the output is
contiguous, i.e. the same memory as [B, L, C]; the attention kernel reads it through its strides).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from lightx2v_engine.ops import Rope, qk_norm_rope_ref as _qk_norm_rope_ref_rope

from ._util import check_choice, choose, env_choice, interpreting

__all__ = ["qk_norm_rope", "qk_norm_rope_ref", "set_qk_rope_impl", "qk_rope_impl", "QK_ROPE_IMPLS"]


def qk_norm_rope_ref(q: torch.Tensor, k: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor, num_heads: int, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference with this module's signature (tables instead of a Rope): see ops.qk_norm_rope_ref."""
    return _qk_norm_rope_ref_rope(q, k, wq, wk, Rope(cos=cos, sin=sin, grid=(0, 0, 0)), num_heads, eps)


@triton.jit
def _rms_rope_row(X, W, COS, SIN, OUT, x_off, o_off, l, C, stride_cl, eps,
                  HEAD_D: tl.constexpr, BLOCK_C: tl.constexpr):
    # Each element also loads its pair partner (index ^ 1; same cache lines, so no extra DRAM traffic):
    # out[2i] = n[2i] cos - n[2i+1] sin, out[2i+1] = n[2i+1] cos + n[2i] sin, all elementwise and coalesced.
    cols = tl.arange(0, BLOCK_C)
    mask = cols < C
    partner = cols ^ 1
    x = tl.load(X + x_off + cols, mask=mask, other=0.0)
    xp = tl.load(X + x_off + partner, mask=mask, other=0.0)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / C + eps)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    wp = tl.load(W + partner, mask=mask, other=0.0).to(tl.float32)
    # Wan's RMSNorm rounds twice to the run dtype: after the normalisation and after the weight
    n = ((xf * rstd).to(x.dtype).to(tl.float32) * w).to(x.dtype).to(tl.float32)
    n_p = ((xp.to(tl.float32) * rstd).to(x.dtype).to(tl.float32) * wp).to(x.dtype).to(tl.float32)
    j = (cols % HEAD_D) // 2  # pair index inside the head
    c = tl.load(COS + l * stride_cl + j, mask=mask, other=1.0)
    s = tl.load(SIN + l * stride_cl + j, mask=mask, other=0.0)
    s = tl.where((cols & 1) == 0, -s, s)
    out = n * c + n_p * s
    tl.store(OUT + o_off + cols, out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _qk_norm_rope_kernel(Q, K, WQ, WK, COS, SIN, QO, KO, L, C,
                         stride_qb, stride_ql, stride_kb, stride_kl, stride_cl, eps,
                         HEAD_D: tl.constexpr, BLOCK_C: tl.constexpr):
    """One token: q, k -> rope(rms(q) * wq), rope(rms(k) * wk); outputs contiguous [B, L, C]."""
    row = tl.program_id(0)
    b = (row // L).to(tl.int64)
    l = (row % L).to(tl.int64)
    o_off = row.to(tl.int64) * C
    _rms_rope_row(Q, WQ, COS, SIN, QO, b * stride_qb + l * stride_ql, o_off, l, C, stride_cl, eps, HEAD_D, BLOCK_C)
    _rms_rope_row(K, WK, COS, SIN, KO, b * stride_kb + l * stride_kl, o_off, l, C, stride_cl, eps, HEAD_D, BLOCK_C)


@triton.jit
def _rms_rope_tile_kernel(X, W, COS, SIN, O, R, L, C, stride_b, stride_l, stride_cl, eps,
                          HEAD_D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """BLOCK_R token rows of one tensor per program: the weight is loaded once per tile, and the pairs are
    split from the loaded tile (no second, partner load)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    b = (rows // L).to(tl.int64)
    l = (rows % L).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < C
    mask = rmask[:, None] & cmask[None, :]
    x = tl.load(X + (b * stride_b + l * stride_l)[:, None] + cols[None, :], mask=mask, other=0.0)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=1) / C + eps)
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    # Wan's RMSNorm rounds twice to the run dtype: after the normalisation and after the weight
    n = ((xf * rstd[:, None]).to(x.dtype).to(tl.float32) * w[None, :]).to(x.dtype).to(tl.float32)
    re, im = tl.split(tl.reshape(n, (BLOCK_R, BLOCK_C // 2, 2)))
    pairs = tl.arange(0, BLOCK_C // 2)
    j = pairs % (HEAD_D // 2)
    pmask = rmask[:, None] & (pairs < C // 2)[None, :]
    c = tl.load(COS + l[:, None] * stride_cl + j[None, :], mask=pmask, other=1.0)
    s = tl.load(SIN + l[:, None] * stride_cl + j[None, :], mask=pmask, other=0.0)
    out = tl.reshape(tl.join(re * c - im * s, re * s + im * c), (BLOCK_R, BLOCK_C))
    tl.store(O + rows.to(tl.int64)[:, None] * C + cols[None, :], out.to(O.dtype.element_ty), mask=mask)


@triton.jit
def _row_tile(X, O, R, L, width, stride_b, stride_l, BLOCK_R: tl.constexpr):
    """Program program_id(0)'s BLOCK_R token rows of x [B, L, .] (strides stride_b, stride_l) and of the
    contiguous output (`width` elements a row): (row mask, token index l, x row pointers, out row pointers)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    b = (rows // L).to(tl.int64)
    l = (rows % L).to(tl.int64)
    return rows < R, l, X + (b * stride_b + l * stride_l)[:, None], O + rows.to(tl.int64)[:, None] * width


@triton.jit
def _rms_rope_chunk_kernel(X, W, COS, SIN, O, R, L, C, stride_b, stride_l, stride_cl, eps,
                           HEAD_D: tl.constexpr, BLOCK_R: tl.constexpr, CHUNK: tl.constexpr,
                           N_CHUNKS: tl.constexpr):
    """BLOCK_R token rows per program, the width in N_CHUNKS exact chunks of CHUNK columns (C = N_CHUNKS *
    CHUNK, CHUNK a multiple of HEAD_D): no power-of-two padding (C = 5120 pads to 8192 in "tile"), every
    load a contiguous vector. Pass 1 sums squares; pass 2 re-reads each chunk (L1/L2) to normalise and
    rotate."""
    rmask, l, x_row, o_row = _row_tile(X, O, R, L, C, stride_b, stride_l, BLOCK_R)
    cols = tl.arange(0, CHUNK)
    ss = tl.zeros([BLOCK_R, CHUNK], tl.float32)
    for i in tl.static_range(N_CHUNKS):
        x = tl.load(x_row + i * CHUNK + cols[None, :], mask=rmask[:, None], other=0.0).to(tl.float32)
        ss += x * x
    rstd = 1.0 / tl.sqrt(tl.sum(ss, axis=1) / C + eps)
    j = tl.arange(0, CHUNK // 2) % (HEAD_D // 2)  # pair index inside the head (CHUNK covers whole heads)
    c = tl.load(COS + l[:, None] * stride_cl + j[None, :], mask=rmask[:, None], other=1.0)
    s = tl.load(SIN + l[:, None] * stride_cl + j[None, :], mask=rmask[:, None], other=0.0)
    for i in tl.static_range(N_CHUNKS):
        x = tl.load(x_row + i * CHUNK + cols[None, :], mask=rmask[:, None], other=0.0)
        w = tl.load(W + i * CHUNK + cols).to(tl.float32)
        # Wan's RMSNorm rounds twice to the run dtype: after the normalisation and after the weight
        n = ((x.to(tl.float32) * rstd[:, None]).to(x.dtype).to(tl.float32) * w[None, :]).to(x.dtype).to(tl.float32)
        re, im = tl.split(tl.reshape(n, (BLOCK_R, CHUNK // 2, 2)))
        out = tl.reshape(tl.join(re * c - im * s, re * s + im * c), (BLOCK_R, CHUNK))
        tl.store(o_row + i * CHUNK + cols[None, :], out.to(O.dtype.element_ty), mask=rmask[:, None])


@triton.jit
def _unpack_pair(xi, IS_BF16: tl.constexpr):
    """int32 holding an (x[2i], x[2i+1]) pair of 16-bit values (little-endian: x[2i] in the low half) ->
    (re, im) in fp32. bf16 by bit shifts; fp16 by conversion."""
    if IS_BF16:
        return (xi << 16).to(tl.float32, bitcast=True), (xi & -65536).to(tl.float32, bitcast=True)
    return ((xi & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32),
            (xi >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32))


@triton.jit
def _round_run(f, IS_BF16: tl.constexpr):
    """f rounded to the run dtype (round to nearest even), kept in fp32: what .to(dtype).to(fp32) does."""
    if IS_BF16:
        u = f.to(tl.int32, bitcast=True)
        r = ((u + 0x7FFF + ((u >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)
        return tl.where(f != f, f, r)
    return f.to(tl.float16).to(tl.float32)


@triton.jit
def _run_bits(f, IS_BF16: tl.constexpr):
    """f -> the run dtype's 16 bits (round to nearest even) in the low half of an int32."""
    if IS_BF16:
        u = f.to(tl.int32, bitcast=True)
        return tl.where(f != f, 0x7FC0, ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) & 0xFFFF)
    return f.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF


@triton.jit
def _rms_rope_packed_kernel(X, W2, COS, SIN, O, R, L, C2, stride_b, stride_l, stride_cl, eps,
                            HEAD_D: tl.constexpr, BLOCK_R: tl.constexpr, CHUNK2: tl.constexpr,
                            N_CHUNKS: tl.constexpr, IS_BF16: tl.constexpr):
    """BLOCK_R token rows per program on int32 views of x and of the output: each word is one rotation
    pair, so every tensor of the tile is [BLOCK_R, CHUNK2] pairs in one layout (16-byte loads and stores,
    no shuffles; splitting pairs from a [.., 2] view made the compiler convert layouts through shared
    memory and store 2 bytes at a time). C2 = C / 2 pairs a row in N_CHUNKS chunks of CHUNK2 (a multiple
    of HEAD_D / 2, so a chunk holds whole heads). W2 [2, C2]: the weights of the even and of the odd
    elements. Pass 1 sums squares; pass 2 re-reads each chunk (L1/L2) to normalise and rotate."""
    rmask, l, x_row, o_row = _row_tile(X, O, R, L, C2, stride_b, stride_l, BLOCK_R)
    p = tl.arange(0, CHUNK2)
    ss = tl.zeros([BLOCK_R, CHUNK2], tl.float32)
    for i in tl.static_range(N_CHUNKS):
        re, im = _unpack_pair(tl.load(x_row + i * CHUNK2 + p[None, :], mask=rmask[:, None], other=0), IS_BF16)
        ss += re * re + im * im
    rstd = 1.0 / tl.sqrt(tl.sum(ss, axis=1) / (2 * C2) + eps)
    j = p % (HEAD_D // 2)  # pair index inside the head
    c = tl.load(COS + l[:, None] * stride_cl + j[None, :], mask=rmask[:, None], other=1.0)
    s = tl.load(SIN + l[:, None] * stride_cl + j[None, :], mask=rmask[:, None], other=0.0)
    w_off = l[:, None] * 0 + p[None, :]  # the weights at the tile's full shape: the tile's layout
    for i in tl.static_range(N_CHUNKS):
        re, im = _unpack_pair(tl.load(x_row + i * CHUNK2 + p[None, :], mask=rmask[:, None], other=0), IS_BF16)
        w_re = tl.load(W2 + i * CHUNK2 + w_off)
        w_im = tl.load(W2 + C2 + i * CHUNK2 + w_off)
        # Wan's RMSNorm rounds twice to the run dtype: after the normalisation and after the weight
        re = _round_run(_round_run(re * rstd[:, None], IS_BF16) * w_re, IS_BF16)
        im = _round_run(_round_run(im * rstd[:, None], IS_BF16) * w_im, IS_BF16)
        out = (_run_bits(re * s + im * c, IS_BF16) << 16) | _run_bits(re * c - im * s, IS_BF16)
        tl.store(o_row + i * CHUNK2 + p[None, :], out, mask=rmask[:, None])


@triton.jit
def _cvt_run(f, IS_BF16: tl.constexpr):
    """f rounded to the run dtype by the hardware conversion (round to nearest even on a GPU), in fp32."""
    if IS_BF16:
        return f.to(tl.bfloat16).to(tl.float32)
    return f.to(tl.float16).to(tl.float32)


@triton.jit
def _cvt_bits(f, IS_BF16: tl.constexpr):
    """f -> the run dtype's 16 bits (hardware conversion) in the low half of an int32."""
    if IS_BF16:
        return f.to(tl.bfloat16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    return f.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF


@triton.jit
def _pack_bf16x2(lo, hi, CVT2: tl.constexpr):
    """Two fp32 tensors -> int32 words holding (bf16(lo) | bf16(hi) << 16), round to nearest even: one packed
    conversion per word by PTX (CVT2 1: cvt.rn.bf16x2.f32, F2FP.BF16.F32.PACK_AB in the SASS, against two
    F2F.BF16.F32 for the two halves converted apart), or the same bits by two conversions (2: the
    interpreter, which runs no PTX)."""
    if CVT2 == 1:
        # cvt d, a, b puts a's conversion in the upper half of d and b's in the lower
        return tl.inline_asm_elementwise("cvt.rn.bf16x2.f32 $0, $2, $1;", "=r,f,f", [lo, hi], dtype=tl.int32,
                                         is_pure=True, pack=1)
    return (_cvt_bits(hi, True) << 16) | _cvt_bits(lo, True)


@triton.jit
def _heads_offsets(H0: tl.constexpr, NH: tl.constexpr, H: tl.constexpr, HALF_D: tl.constexpr):
    """Pair offsets [NH, HALF_D] of heads [H0, H0 + NH) within a row, and the mask [NH, 1] of heads < H."""
    h = H0 + tl.arange(0, NH)
    return h[:, None] * HALF_D + tl.arange(0, HALF_D)[None, :], (h < H)[:, None]


@triton.jit
def _heads_part(x_row, ok, H0: tl.constexpr, NH: tl.constexpr, H: tl.constexpr, HALF_D: tl.constexpr):
    """Heads [H0, H0 + NH) of one token row as int32 pair words [NH, HALF_D] (heads >= H and rows past
    the end masked): (words, pair offsets [NH, HALF_D], mask)."""
    off, hmask = _heads_offsets(H0, NH, H, HALF_D)
    mask = hmask & ok
    return tl.load(x_row + off, mask=mask, other=0), off, mask


@triton.jit
def _heads_weights(W2, C2, H0: tl.constexpr, NH: tl.constexpr, H: tl.constexpr, HALF_D: tl.constexpr):
    """The weights of the even and of the odd elements of heads [H0, H0 + NH), [NH, HALF_D] fp32 each."""
    off, hmask = _heads_offsets(H0, NH, H, HALF_D)
    return tl.load(W2 + off, mask=hmask, other=0.0), tl.load(W2 + C2 + off, mask=hmask, other=0.0)


@triton.jit
def _heads_weight_pairs(W64, H0: tl.constexpr, NH: tl.constexpr, H: tl.constexpr, HALF_D: tl.constexpr):
    """As _heads_weights, from the [C] fp32 weights read as int64 words (w[2i] in the low half): no
    de-interleaved copy of them per call."""
    off, hmask = _heads_offsets(H0, NH, H, HALF_D)
    wd = tl.load(W64 + off, mask=hmask, other=0)
    return wd.to(tl.int32).to(tl.float32, bitcast=True), (wd >> 32).to(tl.int32).to(tl.float32, bitcast=True)


@triton.jit
def _heads_store(o_row, xi, off, mask, rstd, w_re, w_im, c, s, IS_BF16: tl.constexpr, CVT2: tl.constexpr):
    """Normalises, weights and rotates the words xi of _heads_part and stores them (same layout). CVT2 (bf16
    only; see _pack_bf16x2): each rounding converts a word's two halves in one packed conversion."""
    re, im = _unpack_pair(xi, IS_BF16)
    c = c[None, :]
    s = s[None, :]
    # Wan's RMSNorm rounds twice to the run dtype: after the normalisation and after the weight
    if CVT2 > 0:
        re, im = _unpack_pair(_pack_bf16x2(re * rstd, im * rstd, CVT2), True)
        re, im = _unpack_pair(_pack_bf16x2(re * w_re, im * w_im, CVT2), True)
        out = _pack_bf16x2(re * c - im * s, re * s + im * c, CVT2)
    else:
        re = _cvt_run(_cvt_run(re * rstd, IS_BF16) * w_re, IS_BF16)
        im = _cvt_run(_cvt_run(im * rstd, IS_BF16) * w_im, IS_BF16)
        out = (_cvt_bits(re * s + im * c, IS_BF16) << 16) | _cvt_bits(re * c - im * s, IS_BF16)
    tl.store(o_row + off, out, mask=mask)


@triton.jit
def _onepass_row(X, COS, SIN, O, row, ok, L, C2, stride_b, stride_l, stride_cl, eps, wa_re, wa_im, wb_re, wb_im,
                 H: tl.constexpr, HALF_D: tl.constexpr, NH_A: tl.constexpr, NH_B: tl.constexpr,
                 IS_BF16: tl.constexpr, CVT2: tl.constexpr):
    """One token row (masked off where `ok` is false): loaded once, sum of squares, then normalised, weighted,
    rotated and stored from registers."""
    b = (row // L).to(tl.int64)
    l = (row % L).to(tl.int64)
    x_row = X + b * stride_b + l * stride_l
    o_row = O + row.to(tl.int64) * C2
    xa, off_a, m_a = _heads_part(x_row, ok, 0, NH_A, H, HALF_D)
    re, im = _unpack_pair(xa, IS_BF16)
    ss = tl.sum(tl.sum(re * re + im * im, axis=1), axis=0)
    if NH_B > 0:
        xb, off_b, m_b = _heads_part(x_row, ok, NH_A, NH_B, H, HALF_D)
        re_b, im_b = _unpack_pair(xb, IS_BF16)
        ss += tl.sum(tl.sum(re_b * re_b + im_b * im_b, axis=1), axis=0)
    rstd = 1.0 / tl.sqrt(ss / (2 * C2) + eps)
    j = tl.arange(0, HALF_D)
    c = tl.load(COS + l * stride_cl + j, mask=ok, other=1.0)
    s = tl.load(SIN + l * stride_cl + j, mask=ok, other=0.0)
    _heads_store(o_row, xa, off_a, m_a, rstd, wa_re, wa_im, c, s, IS_BF16, CVT2)
    if NH_B > 0:
        _heads_store(o_row, xb, off_b, m_b, rstd, wb_re, wb_im, c, s, IS_BF16, CVT2)


@triton.jit
def _onepass_rows(X, W, COS, SIN, O, R, L, C2, stride_b, stride_l, stride_cl, eps,
                  H: tl.constexpr, HALF_D: tl.constexpr, NH_A: tl.constexpr, NH_B: tl.constexpr,
                  ROWS: tl.constexpr, IS_BF16: tl.constexpr, STAGES: tl.constexpr, PAIRS: tl.constexpr,
                  CVT2: tl.constexpr):
    """Program program_id(0)'s ROWS token rows of one tensor. W: the de-interleaved [2, C/2] weights, or
    (PAIRS) the [C] weights as int64 pair words."""
    if PAIRS:
        wa_re, wa_im = _heads_weight_pairs(W, 0, NH_A, H, HALF_D)
    else:
        wa_re, wa_im = _heads_weights(W, C2, 0, NH_A, H, HALF_D)
    wb_re, wb_im = wa_re, wa_im
    if NH_B > 0:
        if PAIRS:
            wb_re, wb_im = _heads_weight_pairs(W, NH_A, NH_B, H, HALF_D)
        else:
            wb_re, wb_im = _heads_weights(W, C2, NH_A, NH_B, H, HALF_D)
    if STAGES > 0:
        for it in tl.range(0, ROWS, num_stages=STAGES):
            row = tl.program_id(0) * ROWS + it
            _onepass_row(X, COS, SIN, O, row, row < R, L, C2, stride_b, stride_l, stride_cl, eps,
                         wa_re, wa_im, wb_re, wb_im, H, HALF_D, NH_A, NH_B, IS_BF16, CVT2)
    else:
        for i in tl.static_range(ROWS):
            row = tl.program_id(0) * ROWS + i
            _onepass_row(X, COS, SIN, O, row, row < R, L, C2, stride_b, stride_l, stride_cl, eps,
                         wa_re, wa_im, wb_re, wb_im, H, HALF_D, NH_A, NH_B, IS_BF16, CVT2)


@triton.jit
def _rms_rope_onepass_kernel(X, W2, COS, SIN, O, R, L, C2, stride_b, stride_l, stride_cl, eps,
                             H: tl.constexpr, HALF_D: tl.constexpr, NH_A: tl.constexpr, NH_B: tl.constexpr,
                             ROWS: tl.constexpr, IS_BF16: tl.constexpr, STAGES: tl.constexpr,
                             CVT2: tl.constexpr):
    """Token rows, each read from memory once and kept in registers between the sum of squares and the
    rotation (the "chunk" and "packed" variants read every row twice). int32 views as in "packed" (a word
    per rotation pair); a row is [heads, HALF_D] pairs in two power-of-two parts of NH_A and NH_B heads
    (40 = 32 + 8, 12 = 8 + 4: no padded lanes; other head counts pad part A), so that the weights (loaded
    once per program) and the token's cos/sin [HALF_D] share the row's register layout: no layout
    conversion. Hardware conversions round. ROWS consecutive rows per program: unrolled (STAGES 0), or in a
    loop software-pipelined over STAGES (the next row's loads issued by cp.async while this one is
    computed)."""
    _onepass_rows(X, W2, COS, SIN, O, R, L, C2, stride_b, stride_l, stride_cl, eps,
                  H, HALF_D, NH_A, NH_B, ROWS, IS_BF16, STAGES, False, CVT2)


@triton.jit
def _rms_rope_onepass_qk_kernel(Q, K, WQ, WK, COS, SIN, QO, KO, R, L, C2, stride_qb, stride_ql, stride_kb,
                                stride_kl, stride_cl, eps,
                                H: tl.constexpr, HALF_D: tl.constexpr, NH_A: tl.constexpr, NH_B: tl.constexpr,
                                ROWS: tl.constexpr, IS_BF16: tl.constexpr, STAGES: tl.constexpr,
                                CVT2: tl.constexpr):
    """_rms_rope_onepass_kernel for q (program_id(1) 0) and k (1) in one launch (one tail instead of two),
    the weights read as int64 pair words from the [C] parameters (no de-interleaved copies per call)."""
    if tl.program_id(1) == 0:
        _onepass_rows(Q, WQ, COS, SIN, QO, R, L, C2, stride_qb, stride_ql, stride_cl, eps,
                      H, HALF_D, NH_A, NH_B, ROWS, IS_BF16, STAGES, True, CVT2)
    else:
        _onepass_rows(K, WK, COS, SIN, KO, R, L, C2, stride_kb, stride_kl, stride_cl, eps,
                      H, HALF_D, NH_A, NH_B, ROWS, IS_BF16, STAGES, True, CVT2)


def _head_parts(H: int) -> tuple[int, int]:
    """H heads as NH_A + NH_B, both powers of two (NH_B may be 0): 40 -> (32, 8), 12 -> (8, 4), 16 -> (16, 0);
    a count with more than two bits set pads part A: 7 -> (8, 0)."""
    a = 1 << (H.bit_length() - 1)
    b = H - a
    if b & (b - 1) == 0:
        return a, b
    return triton.next_power_of_2(H), 0


# the "onepass" variants: (token rows per program, int32 words of a row per thread, pipeline stages, q and k
# in one launch with the weights read in place); the warps follow from the width (C 5120: 4 warps at 16
# words, 8 at 8; C 1536: 1 and 2). Their sm_90a SASS has no layout conversion and issues ~2,500-3,600 warp
# instructions per 5120-wide row, about half the time the row's 20 KB of traffic take at the H100's
# bandwidth. On the H100 (2026-11-27) at C 1536 / 5120: r1 0.817 / 0.747 of copy bandwidth, r2 0.825 /
# 0.711, r4 0.744 / 0.731, r1_t8 0.734 / 0.658, r2_t8 0.772 / 0.688. Not measured yet (QK_ROPE_UNMEASURED):
# - "onepass_loop<N>_*": N rows per program in a loop the compiler software-pipelines (STAGES 2 or 3: the
#   next row's loads issued by cp.async, LDGSTS in the SASS, while this row is computed), the weights read
#   once per N rows (the unrolled ones re-read 20 KB of them from L2 per 1-4 rows at C 5120); many short
#   programs rather than persistent ones, so that the hardware balances them;
# - "*_qk1": q and k in one launch (one tail instead of two), the weights read in place as int64 pair words
#   instead of the two [2, C/2] de-interleaved copies (two allocations and copy kernels) per call;
# - "*_t4": 16 warps a 5120-wide row, as the modulate kernel that reaches 0.96 of copy bandwidth on the
#   H100 (its 8192-wide padded row over 16 warps; its 20 KB of shift/scale re-read from L2 per row did not
#   stop it), against 4 warps and ~4 resident programs per SM (16 warps) for onepass_r1 at ~115 registers.
# - "*_cvt2" (bf16; fp16 runs as without it): each of the three roundings of a pair word (after the
#   normalisation, after the weight, the output) by one packed conversion (F2FP.BF16.F32.PACK_AB), where the
#   others convert each half apart (F2F.BF16.F32, 120 of onepass_r1's 712 instructions a thread at C 5120,
#   on the conversion unit: ~16 results/clk/SM, by NVIDIA's throughput table, i.e. ~960 of the ~1,600 cycles
#   a 5120-wide row's traffic takes per SM at copy bandwidth); same bits.
ONEPASS_CONFIGS = {"onepass_r1": (1, 16, 0, False, False), "onepass_r2": (2, 16, 0, False, False),
                   "onepass_r4": (4, 16, 0, False, False),
                   "onepass_r1_t8": (1, 8, 0, False, False), "onepass_r2_t8": (2, 8, 0, False, False),
                   "onepass_loop8_s2": (8, 16, 2, False, False), "onepass_loop8_t8_s2": (8, 8, 2, False, False),
                   "onepass_loop16_t8_s3": (16, 8, 3, False, False), "onepass_r1_t4": (1, 4, 0, False, False),
                   "onepass_loop4_t4_s2": (4, 4, 2, False, False),
                   "onepass_r1_qk1": (1, 16, 0, True, False), "onepass_loop8_t8_s2_qk1": (8, 8, 2, True, False),
                   "onepass_r1_cvt2": (1, 16, 0, False, True), "onepass_r2_cvt2": (2, 16, 0, False, True),
                   "onepass_r1_t4_cvt2": (1, 4, 0, False, True),
                   "onepass_loop8_t8_s2_cvt2": (8, 8, 2, False, True),
                   "onepass_r1_qk1_cvt2": (1, 16, 0, True, True), "onepass_r1_t4_qk1_cvt2": (1, 4, 0, True, True)}


def _onepass_warps(words: int, per_thread: int) -> int:
    """Warps for a row of `words` int32 words at about `per_thread` words a thread (a power of two, 1-16)."""
    return max(1, min(16, 1 << (max(1, words // (per_thread * 32)).bit_length() - 1)))


def _launch_onepass(q, k, wq, wk, cos, sin, num_heads, eps, qo, ko, config: tuple) -> bool:
    """The "onepass" variants; False where int32 views are impossible, the half head is not a power of two
    or a row would not fit in registers, so that the caller runs another variant."""
    B, L, C = q.shape
    half_d = C // num_heads // 2
    if q.dtype not in (torch.bfloat16, torch.float16) or k.dtype != q.dtype or half_d & (half_d - 1):
        return False
    nh_a, nh_b = _head_parts(num_heads)
    words = (nh_a + nh_b) * half_d  # int32 words of a row
    if words > 16384:
        return False
    try:
        views = [(x.view(torch.int32), o.view(torch.int32)) for x, o in ((q, qo), (k, ko))]
    except RuntimeError:
        return False
    rows, per_thread, stages, one_launch, cvt2 = config
    warps = _onepass_warps(words, per_thread)
    is_bf16 = q.dtype == torch.bfloat16
    # the packed conversion is PTX: the interpreter runs the same bits converted apart
    cvt2 = (2 if interpreting() else 1) if cvt2 and is_bf16 else 0
    meta = dict(H=num_heads, HALF_D=half_d, NH_A=nh_a, NH_B=nh_b, ROWS=rows, IS_BF16=is_bf16,
                STAGES=stages, CVT2=cvt2, num_warps=warps, num_stages=max(1, stages))
    grid = triton.cdiv(B * L, rows)
    w64 = None
    if one_launch and wq.dtype == wk.dtype == torch.float32:  # (other weight dtypes: the two launches)
        try:  # the weights as int64 pair words, in place (an odd storage offset cannot be viewed so)
            w64 = [w.view(torch.int64) for w in (wq, wk)]
        except RuntimeError:
            pass
        if w64 is not None:
            (qi, qoi), (ki, koi) = views
            _rms_rope_onepass_qk_kernel[(grid, 2)](
                qi, ki, w64[0], w64[1], cos, sin, qoi, koi, B * L, L, C // 2, qi.stride(0), qi.stride(1),
                ki.stride(0), ki.stride(1), cos.stride(0), eps, **meta)
            return True
    for (xi, oi), w in zip(views, (wq, wk)):
        w2 = w.view(-1, 2).t().contiguous()  # [2, C/2]: the weights of the even and of the odd elements
        _rms_rope_onepass_kernel[(grid,)](
            xi, w2, cos, sin, oi, B * L, L, C // 2, xi.stride(0), xi.stride(1), cos.stride(0), eps, **meta)
    return True


def _launch_packed(q, k, wq, wk, cos, sin, num_heads, eps, qo, ko) -> bool:
    """The "packed" variant; False where int32 views are impossible (odd strides or offsets, 32-bit
    inputs) or no chunk fits, so that the caller runs another variant."""
    B, L, C = q.shape
    head_d = C // num_heads
    chunk = _chunk_size(C // 2, head_d // 2, largest=256)  # in pairs
    if chunk is None or q.dtype not in (torch.bfloat16, torch.float16) or k.dtype != q.dtype:
        return False
    try:
        views = [(x.view(torch.int32), o.view(torch.int32)) for x, o in ((q, qo), (k, ko))]
    except RuntimeError:
        return False
    block_r = 4
    for (xi, oi), w in zip(views, (wq, wk)):
        w2 = w.view(-1, 2).t().contiguous()  # [2, C/2]: the weights of the even and of the odd elements
        _rms_rope_packed_kernel[(triton.cdiv(B * L, block_r),)](
            xi, w2, cos, sin, oi, B * L, L, C // 2, xi.stride(0), xi.stride(1), cos.stride(0), eps,
            HEAD_D=head_d, BLOCK_R=block_r, CHUNK2=chunk, N_CHUNKS=C // 2 // chunk,
            IS_BF16=q.dtype == torch.bfloat16, num_warps=max(1, min(8, block_r * chunk // 128)))
    return True


def _chunk_size(C: int, head_d: int, largest: int = 512) -> int | None:
    """The largest power-of-two chunk <= `largest` columns that divides C and holds whole heads (None:
    none)."""
    chunk = largest
    while chunk >= 1:
        if C % chunk == 0 and chunk % head_d == 0:
            return chunk
        chunk //= 2
    return None


# "row" (one token per program, q then k; measured 0.27-0.50 of copy bandwidth on an H100: partner
# loads and the cos/sin gathers are scalar, C = 5120 pads to 8192), "tile" (BLOCK_R tokens per program,
# pairs split in registers), "chunk" (as tile, without the padding: C in exact chunks) or "packed" (as
# chunk, on int32 views: a word per rotation pair). In sm_90a SASS "tile" loads x 2 bytes at a time, "tile"
# and "chunk" store 2 bytes at a time after shared-memory layout conversions, "packed" moves 16 bytes per
# instruction with no conversion. On an H200 (2026-11-27) at C 1536 / 5120: chunk 0.794 / 0.679 of copy
# bandwidth, packed 0.601 / 0.656, tile 0.531 / 0.412, row 0.352 / 0.196. "onepass_r<N>" (N token rows per
# program) reads each row once and keeps it in registers (chunk and packed read it twice), in int32 words
# like packed but rounding by hardware conversion (packed's integer rounding costs ~4x the ALU work).
# "chunk" and "packed" fall back to "tile", "onepass" to "chunk", where their chunking or int32 views
# do not fit.
QK_ROPE_IMPLS = ("row", "tile", "chunk", "packed", *ONEPASS_CONFIGS)
# never run on a GPU yet: bench_kernels times them after the attention figures
QK_ROPE_UNMEASURED = ("onepass_loop8_s2", "onepass_loop8_t8_s2", "onepass_loop16_t8_s3", "onepass_r1_t4",
                      "onepass_loop4_t4_s2", "onepass_r1_qk1", "onepass_loop8_t8_s2_qk1", "onepass_r1_cvt2",
                      "onepass_r2_cvt2", "onepass_r1_t4_cvt2", "onepass_loop8_t8_s2_cvt2", "onepass_r1_qk1_cvt2",
                      "onepass_r1_t4_qk1_cvt2")


# the explicit choice (LX2V_QK_ROPE, read once; set_qk_rope_impl); None: the GPU's tuned file
# (kernels/tuned/), else "chunk" (the fastest of the four measured on an H200)
_QK_IMPL = env_choice("LX2V_QK_ROPE", QK_ROPE_IMPLS, None, "kernels/qk_norm_rope.py")


def set_qk_rope_impl(impl: str) -> None:
    """Selects the kernel variant (one of QK_ROPE_IMPLS; "default" drops the choice) at run time."""
    global _QK_IMPL
    _QK_IMPL = None if impl == "default" else check_choice("qk norm+rope impl", impl, QK_ROPE_IMPLS)


def qk_rope_impl(device: torch.device | None = None) -> str:
    """The variant used on `device` (default: the current CUDA device, if any)."""
    return choose(_QK_IMPL, "LX2V_QK_ROPE", device, QK_ROPE_IMPLS, "chunk", "kernels/qk_norm_rope.py")


def _check(q, k, wq, wk, cos, sin, num_heads):
    where = "kernels/qk_norm_rope.py"
    if q.dim() != 3 or k.shape != q.shape:
        raise ValueError(f"{where}: q, k must both be [B, L, C], got {list(q.shape)} and {list(k.shape)}")
    B, L, C = q.shape
    if C % num_heads or (C // num_heads) % 2:
        raise ValueError(f"{where}: C={C} must split into {num_heads} heads of even size")
    D = C // num_heads
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError(f"{where}: q, k need unit stride on C, got {q.stride()} / {k.stride()}")
    for name, w in (("wq", wq), ("wk", wk)):
        if w.shape != (C,) or w.stride(0) != 1:
            raise ValueError(f"{where}: {name} must be a contiguous [{C}], got {list(w.shape)}")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.shape != (L, D // 2) or t.dtype != torch.float32 or t.stride(1) != 1:
            raise ValueError(f"{where}: {name} must be fp32 [L, D/2] = [{L}, {D // 2}] with unit last stride, "
                             f"got {t.dtype} {list(t.shape)}")
    if cos.stride() != sin.stride():
        raise ValueError(f"{where}: cos and sin must have the same strides, got {cos.stride()} / {sin.stride()}")


def launch_qk_norm_rope(q, k, wq, wk, cos, sin, num_heads, eps, qo, ko, impl: str | None = None):
    """Writes the normalised, rotated q/k into the contiguous [B, L, C] buffers qo/ko (no allocation)."""
    B, L, C = q.shape
    block = triton.next_power_of_2(C)
    impl = check_choice("qk norm+rope impl", impl, QK_ROPE_IMPLS) if impl else qk_rope_impl(q.device)
    head_d = C // num_heads
    if impl == "packed" and _launch_packed(q, k, wq, wk, cos, sin, num_heads, eps, qo, ko):
        return
    if impl in ONEPASS_CONFIGS and _launch_onepass(q, k, wq, wk, cos, sin, num_heads, eps, qo, ko,
                                                ONEPASS_CONFIGS[impl]):
        return
    chunk = _chunk_size(C, head_d) if impl == "chunk" or impl in ONEPASS_CONFIGS else None
    if chunk is not None:
        block_r = 4
        for x, w, o in ((q, wq, qo), (k, wk, ko)):
            _rms_rope_chunk_kernel[(triton.cdiv(B * L, block_r),)](
                x, w, cos, sin, o, B * L, L, C, x.stride(0), x.stride(1), cos.stride(0), eps,
                HEAD_D=head_d, BLOCK_R=block_r, CHUNK=chunk, N_CHUNKS=C // chunk,
                num_warps=max(1, min(8, block_r * chunk // 256)))
        return
    if impl != "row":
        block_r = max(1, min(8, 8192 // block))
        for x, w, o in ((q, wq, qo), (k, wk, ko)):
            _rms_rope_tile_kernel[(triton.cdiv(B * L, block_r),)](
                x, w, cos, sin, o, B * L, L, C, x.stride(0), x.stride(1), cos.stride(0), eps,
                HEAD_D=C // num_heads, BLOCK_R=block_r, BLOCK_C=block,
                num_warps=max(1, min(16, block_r * block // 1024)))
        return
    _qk_norm_rope_kernel[(B * L,)](
        q, k, wq, wk, cos, sin, qo, ko, L, C,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0), eps,
        HEAD_D=C // num_heads, BLOCK_C=block, num_warps=max(1, min(16, block // 512)))


@torch.library.custom_op("lightx2v::qk_norm_rope", mutates_args=())
def _qk_norm_rope_op(q: torch.Tensor, k: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor, num_heads: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    B, L, C = q.shape
    qo = torch.empty((B, L, num_heads, C // num_heads), dtype=q.dtype, device=q.device)
    ko = torch.empty((B, L, num_heads, C // num_heads), dtype=k.dtype, device=k.device)
    if q.numel():
        launch_qk_norm_rope(q, k, wq, wk, cos, sin, num_heads, eps, qo, ko)
    return qo, ko


@_qk_norm_rope_op.register_fake
def _(q, k, wq, wk, cos, sin, num_heads, eps):
    B, L, C = q.shape
    shape = (B, L, num_heads, C // num_heads)
    return q.new_empty(shape), k.new_empty(shape)


def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor, num_heads: int, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """q' = rope(rms(q) * wq), k' = rope(rms(k) * wk), RMS over the full width C.

    q, k [B, L, C] (run dtype, unit stride on C); wq, wk [C] fp32; cos, sin [L, D/2] fp32 per-token tables
    (ops.rope_tables). Pair i of each head, (x[2i], x[2i+1]), is rotated by angle i. Returns contiguous
    [B, L, H, D] tensors in the input dtype.
    """
    _check(q, k, wq, wk, cos, sin, num_heads)
    return _qk_norm_rope_op(q, k, wq, wk, cos, sin, int(num_heads), float(eps))
