"""8-bit flash attention (SageAttention-2 style): INT8 q k^T, FP8 e4m3 P.V, fp32 online softmax.

Quantisation (``quantize_qkv``, one pass per tensor; the reference ``quantize_qkv_ref`` is beside it):
- q: int8 per (token, head), scale_q = amax|q_row| / 127, with log2(e)/sqrt(D) folded into the scale (a
  per-row scale costs nothing in the kernel: it multiplies the per-row softmax constant);
- k: smoothed, k - mean_L(k) per (batch, head, channel) (q.mean is a per-query constant that softmax
  drops), then int8 per (BLOCK_N keys, head), scale_k = amax / 127;
- v: smoothed too (v - mean_L(v) per channel; softmax rows sum to 1, so the mean is added back to o), fp8
  e4m3 per (batch, head, channel), scale_v = amax / 448, stored transposed as [B, H, D, Lk_pad]
  (Lk_pad = Lk rounded up to BLOCK_N, zero-filled) so the P.V operand is K-major, as Hopper's fp8 wgmma
  requires.

Kernel, per key block j (scores in log2 units):
  s  = q8 k8^T                         int32, |s| <= 127^2 D < 2^22
  sb = bits(s + 0x4B400000)              = 1.5*2^23 + s exactly: int32 -> fp32 without I2F (a conversion
                                        runs at the MUFU rate, 16/clk/SM on sm90); the add becomes the
                                        MMA accumulator's initial value
  x  = sb * sc - (m - 8 + 1.5*2^23 sc)     one FFMA (sc = scale_q scale_k, m the running row max)
  p  = 2^x in (0, 256]                   256 = 2^8 keeps small probabilities normal in e4m3
  acc = acc * 2^(m_old - m) + fp8(p) v8   the P.V block is summed in a fresh fp32 register and added
                                        with one FFMA (fp8 wgmma accumulates imprecisely on sm90)
  o  = acc / l * scale_v + mean_v
Padded keys (the ragged last block) are not masked: their k rows are zero, so their score is exactly 0
and their v columns are zero; the kernel removes their n_pad * 2^(8 - m) from l at the end. Smoothing
guarantees the largest real score is >= the mean score (~0), so this subtraction cannot cancel.

EXP modes: 0 = ``exp2`` in fp32 (MUFU); 1 = ``ex2.approx.f16x2`` (inline PTX, GPU only; on sm90 it is
two MUFU.EX2.F16, no packed throughput); 2 = its f16 rounding emulated with exp2 (what the interpreter
runs); 3 = half the columns by a degree-3 polynomial on the FMA pipe (FlashAttention-4's split; not with
warp specialisation); 4 = all by the polynomial. ``pv_fp8=False`` configs keep v unquantised and do P.V
in bf16 (SageAttention-1 style: half the error).

Accuracy on Gaussian test data (interpreter): 3.4-3.6% relative L2 vs exact attention with FP8 P.V, 1.8%
with bf16 P.V (performance.md measured 3.9% for a similar scheme on a GPU); hence opt-in
(``self_attn_1_type: "sage_attn2"``). benchmarks/sass_stats.py shows each config's instruction mix.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import attention_gluon as _gluon
from ._util import check_choice, choose, env_choice, interpreting

__all__ = ["Attn8Config", "ATTN8_CONFIGS", "DEFAULT_ATTN8_CONFIG", "attention_8bit", "attention_8bit_triton",
           "attention_8bit_quantized",
           "attention_8bit_ref", "quantize_qkv", "quantize_qkv_ref", "fp8_supported", "set_attention_8bit_config",
           "attention_8bit_config"]

LOG2E = 1.4426950408889634
P_SHIFT = 8.0          # p = 2^(x + P_SHIFT) <= 256 < 448 (e4m3 max)
MAGIC_I = 0x4B400000   # float bits of 1.5 * 2^23
MAGIC_F = 12582912.0


@dataclass(frozen=True)
class Attn8Config:
    """One launch configuration of the 8-bit kernel (block_n is also the K quantisation block)."""
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    warp_specialize: bool = False
    exp_mode: int = 0       # 0 exp2 (MUFU), 1 ex2.approx.f16x2 (2 in the interpreter), 3 half / 4 all polynomial
    magic_cvt: bool = True  # int32 -> fp32 by the magic-number add instead of I2F
    pv_fp8: bool = True     # FP8 P.V; False: P.V in the input dtype with v unquantised (SageAttention-1)
    gluon: bool = False     # the FA3-style Gluon kernel (kernels/attention_gluon.py; sm90, head_dim 128) with
    #                         block_n and num_stages from here; elsewhere DEFAULT_ATTN8_CONFIG's Triton kernel
    p_regs: bool = False    # (gluon) P8 in registers as P.V's A operand; v quantised with key_perm (key_perm32)


# Candidates for benchmarks/bench_kernels.py (measured on the H100 and H200: kernels/tuned/*.json evidence;
# the Gluon ones win there, the Triton ws_ ones run plain on GPUs: WS_BROKEN_ON_GPU). The smem budget at 128x128: q 16 KB + (k 16 KB + v 16 KB) per
# stage.
ATTN8_CONFIGS: dict[str, Attn8Config] = {
    "ws_128x128_w4_s2": Attn8Config(128, 128, 4, 2, warp_specialize=True),
    "ws_128x128_w4_s3": Attn8Config(128, 128, 4, 3, warp_specialize=True),
    "ws_128x128_w4_s3_i2f": Attn8Config(128, 128, 4, 3, warp_specialize=True, magic_cvt=False),
    "ws_128x128_w4_s3_poly": Attn8Config(128, 128, 4, 3, warp_specialize=True, exp_mode=4),
    # INT8 q k^T only (SageAttention-1 style): P.V in bf16 on the unquantised v, ~4x smaller error
    "ws_128x128_w4_s2_pv16": Attn8Config(128, 128, 4, 2, warp_specialize=True, pv_fp8=False),
    "tma_128x128_w8_s3": Attn8Config(128, 128, 8, 3),
    "tma_128x128_w8_s3_f16x2": Attn8Config(128, 128, 8, 3, exp_mode=1),  # sm90 SASS: 2 MUFU.EX2.F16 per pair
    "tma_128x128_w8_s3_poly": Attn8Config(128, 128, 8, 3, exp_mode=3),
    # the same arithmetic in the explicitly warp-specialised Gluon kernel (ping-pong consumers, the ragged
    # key block masked in a peeled step, P8 through shared memory, the softmax overlapping P.V): sm_90a
    # SASS 571 instructions per warp and key block against 584; written without a GPU
    "gluon_fa3_128x128_s2": Attn8Config(128, 128, 4, 2, gluon=True),
    "gluon_fa3_128x128_s3": Attn8Config(128, 128, 4, 3, gluon=True),
    # P8 stays in registers as P.V's A operand (no shared-memory round trip, fence or warpgroup barrier per
    # block): vt's keys are stored in the accumulator's register order (key_perm32), so the layout change
    # moves no data between threads. sm_90a SASS of the key loop: 748 instructions per warp and block
    # against 576 (no STS/BAR for P, but 112 PRMT byte moves). Never run on a GPU.
    "gluon_fa3_128x128_s3_preg": Attn8Config(128, 128, 4, 3, gluon=True, p_regs=True),
}
# never run on a GPU: benchmarks/bench_kernels.py times them after every other figure (a crash there, e.g. an
# illegal memory access that poisons the CUDA context, costs nothing else)
ATTN8_UNMEASURED = ("gluon_fa3_128x128_s3_preg",)
# the 2-stage ring of the measured bf16 default (ws_128x128_w4_s2, 582 TFLOP/s); a 3-stage warp-specialised
# bf16 sibling (BLOCK_N 64) returned NaN on an H100 for reasons never found, so s3 waits for a GPU run
DEFAULT_ATTN8_CONFIG = "ws_128x128_w4_s2"


# the explicit choice (LX2V_ATTN8_CONFIG, read once; set_attention_8bit_config); None: the GPU's tuned file
# (kernels/tuned/), else DEFAULT_ATTN8_CONFIG
_CONFIG = env_choice("LX2V_ATTN8_CONFIG", ATTN8_CONFIGS, None, "kernels/attention_8bit.py")


def set_attention_8bit_config(name: str) -> None:
    """Selects the 8-bit kernel's launch config (a key of ATTN8_CONFIGS; "default" drops the choice)."""
    global _CONFIG
    _CONFIG = None if name == "default" else check_choice("8-bit attention config", name, ATTN8_CONFIGS)


def attention_8bit_config(device: torch.device | None = None) -> str:
    """The config name the 8-bit kernel uses on `device` (default: the current CUDA device, if any)."""
    return choose(_CONFIG, "LX2V_ATTN8_CONFIG", device, ATTN8_CONFIGS, DEFAULT_ATTN8_CONFIG,
                  "kernels/attention_8bit.py")


def _tma_available(device: torch.device) -> bool:
    """sm90+ (TMA descriptors, warp specialisation); the interpreter emulates both."""
    if device.type == "cpu":
        return interpreting()
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (9, 0)


# Triton 3.6's warp specialisation of this kernel's key loop is WRONG on a GPU beyond one key block: rel.
# err 2.1-2.8 against exact attention for every "ws_" config at L = 129 ... 32,760 (H200, torch 2.11,
# 2026-11-27), while the same configs without it measure 0.035-0.038 (4 or 8 warps), as the interpreter
# does (it has no warp specialisation). Until a Triton that gets it right, "ws_" configs run without it.
WS_BROKEN_ON_GPU = True


def _resolve(cfg: Attn8Config, device: torch.device) -> Attn8Config:
    """Without TMA (sm89) a warp-specialised config runs plain with 8 warps (4 warps spill on a 128x128
    tile there); on a GPU it runs plain in any case (WS_BROKEN_ON_GPU), also with 8 warps (sm_90a, ptxas:
    255 registers and 828 bytes of spills at 4 warps, 240 registers and none at 8)."""
    if cfg.warp_specialize and not _tma_available(device):
        return dataclasses.replace(cfg, warp_specialize=False, num_warps=8)
    if cfg.warp_specialize and WS_BROKEN_ON_GPU and device.type == "cuda":  # (4 warps spill on sm90 without it)
        return dataclasses.replace(cfg, warp_specialize=False, num_warps=8)
    return cfg


def fp8_supported(device: torch.device) -> bool:
    """fp8 tl.dot needs sm89+ (the CPU interpreter emulates it)."""
    if device.type == "cpu":
        return interpreting()
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


# ----------------------------------------------------------------------------------------------------
# Quantisation: PyTorch reference and Triton kernels
# ----------------------------------------------------------------------------------------------------

def _round_int8(y: torch.Tensor) -> torch.Tensor:
    """Round half away from zero, then int8 (what the kernel's +-0.5 and truncation do)."""
    return torch.where(y >= 0, y + 0.5, y - 0.5).to(torch.int8)


def key_perm32(n: int, device=None) -> torch.Tensor:
    """The key order of vt under key_perm (n a multiple of 32): column k' holds key perm[k'], where within
    each 16 keys k' = 4t + 2c + e holds key 8c + 2t + e. It is the order in which a wgmma accumulator's
    registers hold a row of P (thread t of a quad: columns 2t, 2t + 1, 8 + 2t, 9 + 2t of each 16), read as an
    fp8 A operand (thread t: k = 4t .. 4t + 3): P V summed in this order needs no register shuffles."""
    k = torch.arange(n, device=device)
    t, c, e = (k >> 2) & 3, (k >> 1) & 1, k & 1
    return (k & ~15) | (c << 3) | (t << 1) | e


def quantize_qkv_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_n: int, key_perm: bool = False):
    """Reference quantisation. q [B, Lq, H, D], k/v [B, Lk, H, D] (any float dtype).

    Returns q8 [B, Lq, H, D] int8, qs [B, H, Lq] fp32 (log2(e)/sqrt(D) folded in), k8 [B, Lk, H, D] int8,
    ks [B, H, ceil(Lk/block_n)] fp32, vt [B, H, D, Lk_pad] e4m3 of v - mean_L(v), vs [B, H, 2, D] fp32 (the
    channel scale, then the channel mean). key_perm: vt's keys in key_perm32 order (the Gluon kernel with P
    in registers).
    """
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    nblk = triton.cdiv(Lk, block_n)
    qf = q.float()
    amax_q = qf.abs().amax(-1).clamp_min(1e-8)                            # [B, Lq, H]
    q8 = _round_int8(qf * (127.0 / amax_q)[..., None])
    qs = (amax_q / 127.0 * (LOG2E / math.sqrt(D))).permute(0, 2, 1).contiguous()
    kf = k.float() - k.float().mean(1, keepdim=True)
    pad = nblk * block_n - Lk
    kb = torch.nn.functional.pad(kf, (0, 0, 0, 0, 0, pad)).unflatten(1, (nblk, block_n))  # [B, nblk, BN, H, D]
    amax_k = kb.abs().amax(dim=(2, 4)).clamp_min(1e-8)                    # [B, nblk, H]
    k8 = _round_int8(kb * (127.0 / amax_k)[:, :, None, :, None]).flatten(1, 2)[:, :Lk]
    ks = (amax_k / 127.0).permute(0, 2, 1).contiguous()
    vf = v.float()
    mean_v = vf.mean(1)                                                   # [B, H, D]
    vc = vf - mean_v[:, None]
    amax_v = vc.abs().amax(1).clamp_min(1e-8)                             # [B, H, D]
    v8 = (vc * (448.0 / amax_v)[:, None]).to(torch.float8_e4m3fn)
    vt = torch.zeros(B, H, D, nblk * block_n, dtype=torch.float8_e4m3fn, device=v.device)
    vt[..., :Lk] = v8.permute(0, 2, 3, 1)
    if key_perm:
        vt = vt[..., key_perm32(vt.shape[-1], vt.device)].contiguous()
    vs = torch.stack([amax_v / 448.0, mean_v], dim=2).contiguous()        # [B, H, 2, D]: scale, mean
    return q8.contiguous(), qs, k8.contiguous(), ks, vt, vs


@triton.jit
def _max_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _quant_rows_kernel(X, MEAN, Y, S, stride_xb, stride_xl, stride_xh, H, L, n_blk, factor,
                       HEAD_D: tl.constexpr, BLOCK: tl.constexpr, PER_ROW: tl.constexpr, HAS_MEAN: tl.constexpr,
                       INTERP: tl.constexpr):
    """One (BLOCK rows, batch*head) tile of x [B, L, H, D] -> y int8 [B, L, H, D] (contiguous) and scales
    S: per row [B, H, L] (PER_ROW) or per block [B, H, n_blk], times `factor`. MEAN [B, H, D] fp32."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rows = pid * BLOCK + tl.arange(0, BLOCK)
    rmask = rows < L
    offs_d = tl.arange(0, HEAD_D)
    x = tl.load(X + b * stride_xb + h * stride_xh + rows.to(tl.int64)[:, None] * stride_xl + offs_d[None, :],
                mask=rmask[:, None], other=0.0).to(tl.float32)
    if HAS_MEAN:
        mean = tl.load(MEAN + bh.to(tl.int64) * HEAD_D + offs_d)
        x = tl.where(rmask[:, None], x - mean[None, :], 0.0)
    # NaN-propagating maxima (tl.max lowers to max.f32, which drops NaN, and the int8 cast turns NaN into
    # 0: a NaN in q or k would vanish); with them a NaN row gets a NaN scale and a NaN output, as in PyTorch.
    # The interpreter's tl.max drops NaN too (np.nanmax), and its tl.reduce with a Python combine is slow: there
    # a NaN count marks the row (or block).
    if PER_ROW:
        if INTERP:
            amax = _max_nan(tl.max(tl.abs(x), 1), 1e-8)
            amax = tl.where(tl.sum(tl.where(x != x, 1, 0), 1) > 0, float("nan"), amax)
        else:
            amax = _max_nan(tl.reduce(tl.abs(x), 1, _max_nan), 1e-8)
        y = x * (127.0 / amax)[:, None]
        tl.store(S + bh.to(tl.int64) * L + rows, amax / 127.0 * factor, mask=rmask)
    else:
        if INTERP:
            amax = _max_nan(tl.max(tl.abs(x)), 1e-8)
            amax = tl.where(tl.sum(tl.where(x != x, 1, 0)) > 0, float("nan"), amax)
        else:
            amax = _max_nan(tl.reduce(tl.abs(x), None, _max_nan), 1e-8)
        y = x * (127.0 / amax)
        tl.store(S + bh.to(tl.int64) * n_blk + pid, amax / 127.0 * factor)
    y8 = tl.where(y >= 0, y + 0.5, y - 0.5).to(tl.int8)
    y_off = ((b * L + rows.to(tl.int64)) * H + h) * HEAD_D
    tl.store(Y + y_off[:, None] + offs_d[None, :], y8, mask=rmask[:, None])


@triton.jit
def _quant_v_kernel(V, VS, VT, stride_vb, stride_vl, stride_vh, H, L, L_pad,
                    HEAD_D: tl.constexpr, BLOCK: tl.constexpr, INTERP: tl.constexpr, KEY_PERM: tl.constexpr):
    """v [B, L, H, D] -> vt [B, H, D, L_pad] e4m3 = (v - mean) * 448 / amax_channel (zero past L); VS
    [B, H, 2, D] holds amax / 448 and the mean. KEY_PERM: key r stored in column key_perm32^-1(r)."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rows = pid * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_D)
    x = tl.load(V + b * stride_vb + h * stride_vh + rows.to(tl.int64)[:, None] * stride_vl + offs_d[None, :],
                mask=(rows < L)[:, None], other=0.0).to(tl.float32)
    vs = tl.load(VS + bh.to(tl.int64) * 2 * HEAD_D + offs_d)
    mean = tl.load(VS + bh.to(tl.int64) * 2 * HEAD_D + HEAD_D + offs_d)
    x = tl.where((rows < L)[:, None], x - mean[None, :], 0.0)
    y = _to_e4m3(x * (1.0 / vs)[None, :], INTERP)
    base = VT + bh.to(tl.int64) * HEAD_D * L_pad
    cols = rows
    if KEY_PERM:  # within 16 keys: key 8c + 2t + e -> column 4t + 2c + e
        cols = (rows & -16) | (((rows >> 1) & 3) << 2) | (((rows >> 3) & 1) << 1) | (rows & 1)
    tl.store(base + offs_d[:, None] * L_pad + cols[None, :], tl.trans(y), mask=(rows < L_pad)[None, :])


def quantize_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_n: int, quant_v: bool = True,
                 key_perm: bool = False):
    """Triton quantisation with quantize_qkv_ref's contract (three launches plus two PyTorch reductions).
    quant_v=False leaves v as it is: (q8, qs, k8, ks, v, None). key_perm: vt's keys in key_perm32 order."""
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    nblk = triton.cdiv(Lk, block_n)
    dev = q.device
    q8 = torch.empty((B, Lq, H, D), dtype=torch.int8, device=dev)
    qs = torch.empty((B, H, Lq), dtype=torch.float32, device=dev)
    k8 = torch.empty((B, Lk, H, D), dtype=torch.int8, device=dev)
    ks = torch.empty((B, H, nblk), dtype=torch.float32, device=dev)
    mean = torch.mean(k, dim=1, dtype=torch.float32).contiguous()                       # [B, H, D]
    rows = 64
    _quant_rows_kernel[(triton.cdiv(Lq, rows), B * H)](
        q, mean, q8, qs, q.stride(0), q.stride(1), q.stride(2), H, Lq, 0, LOG2E / math.sqrt(D),
        HEAD_D=D, BLOCK=rows, PER_ROW=True, HAS_MEAN=False, INTERP=interpreting(), num_warps=4)
    _quant_rows_kernel[(nblk, B * H)](
        k, mean, k8, ks, k.stride(0), k.stride(1), k.stride(2), H, Lk, nblk, 1.0,
        HEAD_D=D, BLOCK=block_n, PER_ROW=False, HAS_MEAN=True, INTERP=interpreting(), num_warps=8)
    if not quant_v:
        return q8, qs, k8, ks, v, None
    vt = torch.empty((B, H, D, nblk * block_n), dtype=torch.float8_e4m3fn, device=dev)
    vmin, vmax = torch.aminmax(v, dim=1)
    vmean = torch.mean(v, dim=1, dtype=torch.float32)
    amax = torch.maximum(vmax.float() - vmean, vmean - vmin.float()).clamp_min(1e-8)  # of v - mean
    vs = torch.stack([amax / 448.0, vmean], dim=2).contiguous()                      # [B, H, 2, D]
    _quant_v_kernel[(nblk, B * H)](
        v, vs, vt, v.stride(0), v.stride(1), v.stride(2), H, Lk, nblk * block_n,
        HEAD_D=D, BLOCK=block_n, INTERP=interpreting(), KEY_PERM=key_perm, num_warps=8)
    return q8, qs, k8, ks, vt, vs


# ----------------------------------------------------------------------------------------------------
# Reference attention (PyTorch, same quantisation)
# ----------------------------------------------------------------------------------------------------

def attention_8bit_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_n: int = 128,
                       pv_fp8: bool = True) -> torch.Tensor:
    """The 8-bit computation in PyTorch: quantize_qkv_ref, exact int scores, softmax with P rounded to
    e4m3 as 256 * 2^(x - rowmax) (the kernel rounds against its running max instead), fp32 P.V.
    pv_fp8=False: P rounded to v's dtype instead and v unquantised.

    q [B, Lq, H, D], k/v [B, Lk, H, D] -> [B, Lq, H, D] in q's dtype. Memory O(Lq Lk) per head.
    """
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    q8, qs, k8, ks, vt, vs = quantize_qkv_ref(q, k, v, block_n)
    ks_tok = ks.repeat_interleave(block_n, dim=-1)[..., :Lk]                  # [B, H, Lk]
    out = torch.empty(B, Lq, H, D, dtype=torch.float32, device=q.device)
    for h in range(H):
        s = torch.einsum("bqd,bkd->bqk", q8[:, :, h].double(), k8[:, :, h].double())  # exact integers
        x = s * qs[:, h, :, None].double() * ks_tok[:, h, None, :].double()
        x = x - x.amax(-1, keepdim=True)
        p = torch.exp2(x + P_SHIFT).float()
        l = p.sum(-1, keepdim=True)
        if pv_fp8:
            p8 = p.to(torch.float8_e4m3fn).float()
            v8 = vt[:, h, :, :Lk].float()                                      # [B, D, Lk]
            out[:, :, h] = torch.einsum("bqk,bdk->bqd", p8, v8) / l * vs[:, h, None, 0] + vs[:, h, None, 1]
        else:
            out[:, :, h] = torch.einsum("bqk,bkd->bqd", p.to(v.dtype).float(), v[:, :, h].float()) / l
    return out.to(q.dtype)


# ----------------------------------------------------------------------------------------------------
# Attention kernel
# ----------------------------------------------------------------------------------------------------

@triton.jit
def _to_e4m3(x, INTERP: tl.constexpr):
    """x (|x| <= 448) -> float8e4nv, round to nearest even. The GPU converts with cvt.rn.satfinite; triton
    3.6's interpreter drops the carry when rounding crosses a power of two (125.8 -> 64 instead of 128), so
    there x is first rounded onto the e4m3 grid (ties to even, by the 1.5 * 2^23 trick: the interpreter
    does not contract it into an FMA), which makes its conversion exact. The magnitude is rounded and the
    sign put back from the sign bit, so that a negative value rounding to zero gives -0 as cvt.rn (and
    torch's conversion) do; the interpreter's own conversion drops the sign of a zero, so that bit is set
    by hand. kernels/modulate.py uses it too."""
    if INTERP:
        xf = x.to(tl.float32)
        ax = tl.abs(xf)
        e = tl.maximum(tl.floor(tl.math.log2(tl.maximum(ax, 1e-30))), -6.0)
        step = tl.math.exp2(e - 3.0)
        r = ((ax / step + 12582912.0) - 12582912.0) * step
        neg = xf.to(tl.int32, bitcast=True) < 0
        y = tl.where(neg, -r, r).to(tl.float8e4nv)
        # (the interpreter's conversion drops the sign of zero: set the bit)
        y8 = tl.where(neg & (r == 0.0), 128, y.to(tl.uint8, bitcast=True).to(tl.int32))
        return y8.to(tl.uint8).to(tl.float8e4nv, bitcast=True)
    return x.to(tl.float8e4nv)


@triton.jit
def _exp2_poly(x):
    """2^x on the FMA/ALU pipes (no MUFU), for x <= 127: 2^round(x) * poly(f), f = x - round(x) in
    [-0.5, 0.5], rounding by the 1.5 * 2^23 magic add; degree-3 fit, relative error 2e-4 (fp8 P keeps 2^-4).
    Inputs below -125 are clamped (2^-125 is 0 for the fp8 P): at round(x) = -127 the exponent add would
    borrow into the sign bit of poly(f) < 1 and give NaN."""
    x = tl.maximum(x, -125.0)
    xr = x + 12582912.0
    f = x - (xr - 12582912.0)
    p = ((0.05543072 * f + 0.24337878) * f + 0.69324304) * f + 0.99980638
    return (p.to(tl.int32, bitcast=True) + (xr.to(tl.int32, bitcast=True) << 23)).to(tl.float32, bitcast=True)


@triton.jit
def _exp2(x, EXP_MODE: tl.constexpr):
    """2^x: fp32 MUFU (0), packed f16x2 MUFU via PTX (1), f16 rounding emulated (2), half of the columns
    on MUFU and half by polynomial on the FMA pipe (3; FlashAttention-4's split, for 2-D tiles; triton 3.6's
    sm90 warp specialisation rejects its reshape/split), or all by polynomial (4)."""
    if EXP_MODE == 4:
        return _exp2_poly(x)
    elif EXP_MODE == 3:
        a, b = tl.split(tl.reshape(x, (x.shape[0], x.shape[1] // 2, 2)))
        return tl.reshape(tl.join(tl.math.exp2(a), _exp2_poly(b)), (x.shape[0], x.shape[1]))
    elif EXP_MODE == 1:
        return tl.inline_asm_elementwise("ex2.approx.f16x2 $0, $1;", "=r,r", [x.to(tl.float16)],
                                         dtype=tl.float16, is_pure=True, pack=2)
    elif EXP_MODE == 2:
        return tl.math.exp2(x.to(tl.float16).to(tl.float32)).to(tl.float16)
    else:
        return tl.math.exp2(x)


@triton.jit
def _attn8_fwd_kernel(Q8, K8, VT, QS, KS, VS, O,
                      stride_qb, stride_ql, stride_qh, stride_kb, stride_kl, stride_kh,
                      stride_vb, stride_vl, stride_vh,
                      stride_ob, stride_ol, stride_oh, H, Lq, Lk, Lk_pad, n_blk,
                      HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      USE_TMA: tl.constexpr, WARP_SPEC: tl.constexpr, EXP_MODE: tl.constexpr,
                      MAGIC_CVT: tl.constexpr, INTERP: tl.constexpr, PV_FP8: tl.constexpr):
    """One (query block, batch*head): see the module docstring for the arithmetic.

    PV_FP8: VT is the e4m3 [B, H, D, Lk_pad] of quantize_qkv with scales VS. Else VT is the unquantised v
    [B, Lk, H, D] (strides stride_v*; bf16/fp16) and P.V runs in that dtype (VS unused)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    bh = pid_bh.to(tl.int64)
    q_base = Q8 + b * stride_qb + h * stride_qh
    k_base = K8 + b * stride_kb + h * stride_kh
    if PV_FP8:
        vt_base = VT + bh * HEAD_D * Lk_pad
    else:
        vt_base = VT + b * stride_vb + h * stride_vh
    o_base = O + b * stride_ob + h * stride_oh
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_D)

    if USE_TMA:
        desc_q = tl.make_tensor_descriptor(q_base, shape=[Lq, HEAD_D], strides=[stride_ql, 1],
                                           block_shape=[BLOCK_M, HEAD_D])
        desc_k = tl.make_tensor_descriptor(k_base, shape=[Lk, HEAD_D], strides=[stride_kl, 1],
                                           block_shape=[BLOCK_N, HEAD_D])
        if PV_FP8:
            desc_v = tl.make_tensor_descriptor(vt_base, shape=[HEAD_D, Lk_pad], strides=[Lk_pad, 1],
                                               block_shape=[HEAD_D, BLOCK_N])
        else:  # rows past Lk read as zeros
            desc_v = tl.make_tensor_descriptor(vt_base, shape=[Lk, HEAD_D], strides=[stride_vl, 1],
                                               block_shape=[BLOCK_N, HEAD_D])
        q = desc_q.load([start_m, 0])
    else:
        q = tl.load(q_base + offs_m[:, None] * stride_ql + offs_d[None, :], mask=offs_m[:, None] < Lq, other=0)
    qs = tl.load(QS + bh * Lq + offs_m, mask=offs_m < Lq, other=1.0)  # [BM], log2(e)/sqrt(D) folded in

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_D], tl.float32)
    for j in tl.range(0, n_blk, warp_specialize=WARP_SPEC):
        start_n = j * BLOCK_N
        if USE_TMA:
            k = desc_k.load([start_n, 0])
            if PV_FP8:
                vt = desc_v.load([0, start_n])
            else:
                vt = desc_v.load([start_n, 0])
        else:
            # q8, k8 are quantize_qkv's contiguous buffers: the launcher checks that their offsets fit int32;
            # v (unquantised, any row stride, e.g. a fused projection's slice) and out take int64 offsets
            k = tl.load(k_base + (start_n + offs_n)[:, None] * stride_kl + offs_d[None, :],
                        mask=(start_n + offs_n)[:, None] < Lk, other=0)
            if PV_FP8:
                vt = tl.load(vt_base + offs_d[:, None] * Lk_pad + (start_n + offs_n)[None, :])
            else:
                vt = tl.load(vt_base + (start_n + offs_n).to(tl.int64)[:, None] * stride_vl + offs_d[None, :],
                             mask=(start_n + offs_n)[:, None] < Lk, other=0.0)
        sc = qs * tl.load(KS + bh * n_blk + j)  # [BM] score scale of this block
        # qs is carried through the loop (+ 0 * l_i, kept: NaN semantics): triton 3.6's sm90 warp
        # specialisation fails ("NVGPUWarpSpecialization" pass) on a [BM] tensor captured from outside the loop
        qs = qs + 0.0 * l_i
        s = tl.dot(q, k.T)  # int32
        if MAGIC_CVT:
            # sb = 1.5 * 2^23 + s exactly (triton folds the add into the MMA accumulator's initial value);
            # the offset is removed inside the FFMA's constant, whose rounding (<= 0.75 * sc, under one
            # integer score step) is far below the int8 quantisation noise while sc = qs * ks is small:
            # amax_q * amax_k * log2(e) / sqrt(D) / 127^2, ~1e-3 for the DiT's normed q, k. Raw inputs with
            # |q|, |k| in the hundreds (sc >~ 0.5) push p past fp8's 448 and the result drifts (0.23 rel. err.
            # at sc ~2 in the interpreter, where the i2f configs keep the reference's 0.019); removing the
            # offset exactly, (sb - 1.5 * 2^23) * sc, costs one FADD a score: untimed, not done
            sb = (s + 0x4B400000).to(tl.float32, bitcast=True)
            m_new = tl.maximum(m_i, (tl.max(sb, 1) - 12582912.0) * sc)
            p = _exp2(sb * sc[:, None] - (m_new - 8.0 + 12582912.0 * sc)[:, None], EXP_MODE)  # (0, 256]
        else:
            sf = s.to(tl.float32)
            m_new = tl.maximum(m_i, tl.max(sf, 1) * sc)
            p = _exp2(sf * sc[:, None] - (m_new - 8.0)[:, None], EXP_MODE)  # (0, 256]
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p.to(tl.float32), 1)
        if PV_FP8:
            pv = tl.dot(_to_e4m3(p, INTERP), vt.T)  # fresh fp32 block sum (two-level accumulation)
        else:
            pv = tl.dot(p.to(vt.dtype), vt)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    # padded keys scored exactly 0 with zero v: remove their share of l (same exponential as the loop)
    n_pad = n_blk * BLOCK_N - Lk
    l_i = l_i - n_pad * _exp2(8.0 - m_i, 0 if EXP_MODE == 3 else EXP_MODE).to(tl.float32)  # [BM]: no split
    if PV_FP8:  # v was quantised smoothed: o = P (v - mean) / l * scale + mean
        vs = tl.load(VS + bh * 2 * HEAD_D + offs_d)
        v_mean = tl.load(VS + bh * 2 * HEAD_D + HEAD_D + offs_d)
        out = (acc * (1.0 / l_i)[:, None] * vs[None, :] + v_mean[None, :]).to(O.dtype.element_ty)
    else:
        out = (acc * (1.0 / l_i)[:, None]).to(O.dtype.element_ty)
    if USE_TMA:
        desc_o = tl.make_tensor_descriptor(o_base, shape=[Lq, HEAD_D], strides=[stride_ol, 1],
                                           block_shape=[BLOCK_M, HEAD_D])
        desc_o.store([start_m, 0], out)
    else:
        tl.store(o_base + offs_m.to(tl.int64)[:, None] * stride_ol + offs_d[None, :], out, mask=offs_m[:, None] < Lq)


def _tma_alloc(size: int, alignment: int, stream) -> torch.Tensor:
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _check_qkv(q, k, v):
    where = "kernels/attention_8bit.py"
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"{where}: q, k, v must be [B, L, H, D], got {list(q.shape)}, {list(k.shape)}, "
                         f"{list(v.shape)}")
    B, Lq, H, D = q.shape
    if k.shape[0] != B or k.shape[2:] != (H, D) or v.shape != k.shape:
        raise ValueError(f"{where}: k, v must be [B={B}, Lk, H={H}, D={D}] and equal, got {list(k.shape)}, "
                         f"{list(v.shape)}")
    if D not in (32, 64, 128):
        raise ValueError(f"{where}: head dim D must be 32, 64 or 128, got {D}")
    if q.dtype not in (torch.float16, torch.bfloat16) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"{where}: q, k, v must all be fp16 or bf16, got {q.dtype}, {k.dtype}, {v.dtype}")
    if any(t.stride(-1) != 1 for t in (q, k, v)):
        raise ValueError(f"{where}: q, k, v need a unit stride on D")


def attention_8bit_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          config: str | Attn8Config | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Quantises q, k, v and runs the 8-bit kernel with `config` (name or Attn8Config; default the
    module's) into `out` (contiguous [B, Lq, H, D], allocated when None). Not a custom op."""
    if not isinstance(config, Attn8Config):
        config = ATTN8_CONFIGS[config or attention_8bit_config(q.device)]
    cfg = _resolve(config, q.device)
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    if out is None:
        out = torch.empty((B, Lq, H, D), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    if Lk == 0:
        return out.zero_()
    return attention_8bit_quantized(quantize_for(q, k, v, cfg), Lk, out, cfg)


def quantize_for(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: str | Attn8Config) -> tuple:
    """quantize_qkv as `config`'s kernel reads it (its block_n; v quantised for FP8 P.V; keys in key_perm32
    order for P in registers)."""
    cfg = config if isinstance(config, Attn8Config) else ATTN8_CONFIGS[config]
    return quantize_qkv(q, k, v, cfg.block_n, quant_v=cfg.pv_fp8, key_perm=cfg.p_regs)


def unpermute_keys(vt: torch.Tensor) -> torch.Tensor:
    """vt [..., Lk_pad] quantised with key_perm -> the keys in their order (a copy)."""
    out = torch.empty_like(vt)
    out[..., key_perm32(vt.shape[-1], vt.device)] = vt
    return out


def attention_8bit_quantized(quantized: tuple, Lk: int, out: torch.Tensor, config: str | Attn8Config) -> torch.Tensor:
    """The kernel alone on quantize_qkv's output (its block_n must be the config's) into out [B, Lq, H, D]."""
    cfg = config if isinstance(config, Attn8Config) else ATTN8_CONFIGS[config]
    q8, qs, k8, ks, vt, vs = quantized
    B, Lq, H, D = q8.shape
    n_blk = ks.shape[-1]
    if cfg.gluon:
        if (_gluon.failure() is None and _gluon.available(q8.device) and D == 128 and vs is not None
                and q8.is_contiguous() and k8.is_contiguous()):
            try:
                return _gluon.attention_8bit_gluon_quantized(quantized, Lk, out, _gluon.GluonAttnConfig(
                    cfg.block_n, cfg.num_stages, p_regs=cfg.p_regs))
            except torch.OutOfMemoryError:  # (transient: not the kernel's fault, it stays on)
                raise
            except Exception as e:  # noqa: BLE001 - any other failure: warn once and use the Triton kernel
                _gluon.record_failure(e, "kernels/attention_8bit.py")
        if cfg.p_regs:  # the Triton kernel reads the keys in their order
            vt = unpermute_keys(vt)
            quantized = (q8, qs, k8, ks, vt, vs)
        cfg = dataclasses.replace(ATTN8_CONFIGS[DEFAULT_ATTN8_CONFIG], block_n=cfg.block_n)
    if (vs is None) == cfg.pv_fp8:
        raise ValueError(f"kernels/attention_8bit.py: config pv_fp8={cfg.pv_fp8} but v was "
                         f"{'not ' if vs is None else ''}quantised")
    if k8.shape[1] != Lk or n_blk != triton.cdiv(Lk, cfg.block_n):
        raise ValueError(f"kernels/attention_8bit.py: quantised k has {k8.shape[1]} keys in {n_blk} blocks; the "
                         f"call says Lk={Lk} and the config block_n={cfg.block_n} ({triton.cdiv(Lk, cfg.block_n)} "
                         f"blocks): quantise with the config's block_n")
    if cfg.pv_fp8 and vt.shape[-1] != n_blk * cfg.block_n:
        raise ValueError(f"kernels/attention_8bit.py: quantised with block_n {vt.shape[-1] // n_blk}, "
                         f"config has {cfg.block_n}")
    for name, t in (("q", q8), ("k", k8)):  # the kernel's int32 row offsets into them
        if t.shape[1] * t.stride(1) >= 2 ** 31:
            raise ValueError(f"kernels/attention_8bit.py: {t.shape[1]} tokens x {t.stride(1)} elements a row of the "
                             f"quantised {name} pass 2^31: too long for the Triton 8-bit kernel (the bf16 attention "
                             f"takes it: attn_8bit off)")
    interp = interpreting()
    cfg = _resolve(cfg, q8.device)
    use_tma = _tma_available(q8.device) and (q8.is_cuda or cfg.warp_specialize)
    def tma_aligned(t):
        return not (t.data_ptr() % 16 or any((t.stride(i) * t.element_size()) % 16 for i in range(t.dim() - 1)))
    if use_tma and not cfg.pv_fp8 and not tma_aligned(vt):  # the caller's v (e.g. a view at an odd offset):
        vt = vt.clone(memory_format=torch.contiguous_format)  # a fresh copy is aligned (the kernel reads it once)
    if use_tma:  # device-side descriptors: Triton 3.6 checks no alignment at run time
        for name, t in (("q8", q8), ("k8", k8), ("v", vt), ("out", out)):
            if not tma_aligned(t):
                raise ValueError(f"kernels/attention_8bit.py: {name} for TMA needs a 16-byte aligned base and "
                                 f"16-byte multiples as strides (but the last), got strides {t.stride()}")
    if use_tma and q8.is_cuda:
        triton.set_allocator(_tma_alloc)
    exp_mode = 2 if (interp and cfg.exp_mode == 1) else cfg.exp_mode
    _attn8_fwd_kernel[(triton.cdiv(Lq, cfg.block_m), B * H)](
        q8, k8, vt, qs, ks, vs if vs is not None else qs, out,
        q8.stride(0), q8.stride(1), q8.stride(2), k8.stride(0), k8.stride(1), k8.stride(2),
        vt.stride(0), vt.stride(1), vt.stride(2),
        out.stride(0), out.stride(1), out.stride(2), H, Lq, Lk, n_blk * cfg.block_n, n_blk,
        HEAD_D=D, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, USE_TMA=use_tma,
        WARP_SPEC=cfg.warp_specialize and use_tma, EXP_MODE=exp_mode, MAGIC_CVT=cfg.magic_cvt, INTERP=interp,
        PV_FP8=cfg.pv_fp8,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out


@torch.library.custom_op("lightx2v::attention_8bit", mutates_args=())
def _attention_8bit_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return attention_8bit_triton(q, k, v)


@_attention_8bit_op.register_fake
def _(q, k, v):
    return q.new_empty(q.shape)


def attention_8bit(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Non-causal softmax(q k^T / sqrt(D)) v with INT8 q k^T and FP8 P.V (approximate: ~3% rel. L2).

    q [B, Lq, H, D], k/v [B, Lk, H, D] fp16/bf16 with unit stride on D; returns a contiguous [B, Lq, H, D]
    in q's dtype. Needs sm89+ on CUDA (fp8 MMA), or the CPU interpreter.
    """
    _check_qkv(q, k, v)
    if not fp8_supported(q.device):
        raise RuntimeError(f"kernels/attention_8bit.py: 8-bit attention needs an sm89+ GPU (fp8 MMA) or "
                           f"TRITON_INTERPRET=1, got device {q.device}")
    return _attention_8bit_op(q, k, v)
