"""Non-causal flash attention forward (Hopper-oriented Triton) and the fused self-attention op.

o = softmax(q k^T / sqrt(D)) v, online softmax over key blocks in the exp2 domain (log2(e) folded into the
scale), fp32 accumulation. q [B, Lq, H, D], k/v [B, Lk, H, D] read through their strides (views of
[B, L, C] projections are fine). The ragged last key block (Lk % BLOCK_N keys) is done first with a mask,
so the steady-state loop is mask-free; the warp-specialised configs (sm90: a TMA producer warp plus two
consumer warpgroups, Triton's automatic partitioning) instead mask inside their single loop, because the
partitioner accepts no other dot before or after it.

Implementation policy: env var ``LX2V_ATTN`` in ``ATTN_IMPLS`` picks the backend of
``attention``/``self_attention`` ("triton" default; "gluon", the FA3-style kernel of
``kernels/attention_gluon.py`` on sm90 with head_dim 128, this Triton kernel elsewhere; or PyTorch SDPA
with cuDNN / FA2 kernels); ``LX2V_ATTN_CONFIG`` picks one of ``ATTN_CONFIGS`` for the Triton kernel,
``LX2V_ATTN_GLUON_CONFIG`` one of ``GLUON_CONFIGS`` and ``LX2V_CROSS_ATTN`` the generic op's backend.
``set_attention_impl`` changes them at run time. What is not chosen explicitly comes from the tuned file of
the tensor's GPU (``kernels/tuned/``, see ``kernels/_util.py``), else from the built-in defaults; the ops
are opaque to torch.compile, so the choice is made at every call.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from lightx2v_engine.ops import attention_ref

from ._util import check_choice, choose, env_choice, interpreting, tuned_choice, tuned_path
from . import attention_gluon as _gluon
from .attention_8bit import attention_8bit_triton, fp8_supported
from .qk_norm_rope import launch_qk_norm_rope, qk_norm_rope_ref, _check as _check_qk

__all__ = ["attention", "self_attention", "attention_ref", "self_attention_ref", "attention_triton",
           "ATTN_IMPLS", "ATTN_CONFIGS", "AttnConfig", "attention_impl", "set_attention_impl", "cross_attention_impl",
           "gluon_status"]

LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class AttnConfig:
    """One launch configuration of the Triton attention kernel."""
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    tma: bool  # on-device TMA descriptors (tl.make_tensor_descriptor), sm90+
    warp_specialize: bool = False  # Triton's automatic warp specialisation of the key loop (TMA only)
    pipe_qk: bool = False  # software-pipelined q k^T (next block's scores issued before this softmax)
    mean_pad: bool = False  # self-attention pads K with its mean: no mask in the WS loop (see _attn_fwd_kernel)


# Candidate configs for the GPU benchmark (benchmarks/bench_kernels.py times each). "ptr_256x64_w8_s3" is
# the plain FA2-style config that measured 467 TFLOP/s at 12 heads, L=32760 on an H100.
ATTN_CONFIGS: dict[str, AttnConfig] = {
    "ptr_256x64_w8_s3": AttnConfig(256, 64, 8, 3, tma=False),
    "tma_256x64_w8_s3": AttnConfig(256, 64, 8, 3, tma=True),
    "tma_128x128_w8_s2": AttnConfig(128, 128, 8, 2, tma=True),
    "tma_pipe_128x128_w8_s2": AttnConfig(128, 128, 8, 2, tma=True, pipe_qk=True),
    # sm90 warp specialisation: a TMA producer plus two 4-warp consumer warpgroups of BLOCK_M/2 rows each
    # (Triton only specialises 4-warp loops on sm90; 128x128 with 3 stages would need 263 KB of smem)
    # Measured on an H100 (2026-11-26): 582 TFLOP/s at 12 heads, L=32760, 1.075x cuDNN SDPA in the same run.
    "ws_128x128_w4_s2": AttnConfig(128, 128, 4, 2, tma=True, warp_specialize=True),
    # the same, with the keys of self-attention padded to whole blocks by their mean so that the loop has
    # no mask (sm90 SASS: 453 instead of 580 instructions per warp and key block); H200 2026-11-27: 11.46 ms
    # vs 11.18 for ws_128x128 at L=32760 (kernels/tuned/*.json evidence)
    "ws_mp_128x128_w4_s2": AttnConfig(128, 128, 4, 2, tma=True, warp_specialize=True, mean_pad=True),
    # Removed: "ws_128x64_w4_s3" (128x64, 3 stages, warp-specialised) compiled but returned NaN at
    # L=32760 on the H100 while right in the interpreter at small shapes (not investigated).
}
DEFAULT_ATTN_CONFIG = "ws_128x128_w4_s2"
ATTN_IMPLS = ("triton", "gluon", "sdpa_cudnn", "sdpa_flash")


_WHERE = "kernels/attention.py"


# Explicit choices (environment variables, read once; set_attention_impl): None leaves the choice to the
# tuned file of the tensor's GPU (kernels/tuned/, see kernels/_util.py), else to the built-in default.
def _env_impl() -> str | None:
    return env_choice("LX2V_ATTN", ATTN_IMPLS, None, _WHERE)


def _env_config() -> str | None:
    return env_choice("LX2V_ATTN_CONFIG", ATTN_CONFIGS, None, _WHERE)


def _env_gluon_config() -> str | None:
    return env_choice("LX2V_ATTN_GLUON_CONFIG", _gluon.GLUON_CONFIGS, None, _WHERE)


def _env_cross_impl() -> str | None:
    return env_choice("LX2V_CROSS_ATTN", ("same",) + ATTN_IMPLS, None, _WHERE)


_IMPL = _env_impl()
_CONFIG = _env_config()
_GLUON_CONFIG = _env_gluon_config()
# backend of the generic `attention` op (the DiT's cross-attention, 257-769 keys) when it differs from
# self-attention's: cuDNN measured 0.194 ms against our 0.307 ms at Lk = 512 on an H100 (before the mask-free
# loop); None: the tuned file's choice when self-attention's backend is not explicit, else the same as it
_CROSS_IMPL = _env_cross_impl()


def set_attention_impl(impl: str | None = None, config: str | None = None, cross_impl: str | None = None,
                       gluon_config: str | None = None) -> None:
    """Sets the attention backend (one of ATTN_IMPLS), the Triton config name (a key of ATTN_CONFIGS), the
    Gluon config name (a key of attention_gluon.GLUON_CONFIGS) and/or the backend of the generic
    `attention` op (cross-attention; "same" follows self-attention's backend). "default" drops an explicit
    choice: the GPU's tuned file (kernels/tuned/), else the built-in default, decides again."""
    global _IMPL, _CONFIG, _CROSS_IMPL, _GLUON_CONFIG
    if impl is not None:
        _IMPL = None if impl == "default" else check_choice("attention impl", impl, ATTN_IMPLS)
    if config is not None:
        _CONFIG = None if config == "default" else check_choice("attention config", config, ATTN_CONFIGS)
    if gluon_config is not None:
        _GLUON_CONFIG = (None if gluon_config == "default"
                         else check_choice("Gluon attention config", gluon_config, _gluon.GLUON_CONFIGS))
    if cross_impl is not None:
        cross_impl = check_choice("cross-attention impl", cross_impl, ("same", "default") + ATTN_IMPLS)
        _CROSS_IMPL = None if cross_impl == "default" else cross_impl


def _impl(device: torch.device | None) -> str:
    """An explicit backend; else the backend of an explicit config (a Triton config selects "triton", a
    Gluon config "gluon"); else the tuned file's; else "triton"."""
    if _IMPL is None and _CONFIG is not None:
        return "triton"
    if _IMPL is None and _GLUON_CONFIG is not None:
        return "gluon"
    return choose(_IMPL, "LX2V_ATTN", device, ATTN_IMPLS, "triton", _WHERE)


def _explicit() -> bool:
    """Whether self-attention's backend was chosen explicitly (directly or through a config)."""
    return _IMPL is not None or _CONFIG is not None or _GLUON_CONFIG is not None


def _config(device: torch.device | None) -> str:
    return choose(_CONFIG, "LX2V_ATTN_CONFIG", device, ATTN_CONFIGS, DEFAULT_ATTN_CONFIG, _WHERE)


def _gluon_config(device: torch.device | None) -> str:
    return choose(_GLUON_CONFIG, "LX2V_ATTN_GLUON_CONFIG", device, _gluon.GLUON_CONFIGS,
                  _gluon.DEFAULT_GLUON_CONFIG, _WHERE)


def _cross_impl(device: torch.device | None) -> str:
    """An explicit cross-attention backend ("same": self-attention's); else, while self-attention's backend
    is not explicit either, the tuned file's; else self-attention's backend (an explicit LX2V_ATTN, or
    config, moves both)."""
    if _CROSS_IMPL is not None:
        return _impl(device) if _CROSS_IMPL == "same" else _CROSS_IMPL
    tuned = None if _explicit() else tuned_choice("LX2V_CROSS_ATTN", device, ATTN_IMPLS, _WHERE)
    return tuned or _impl(device)


def attention_impl(device: torch.device | None = None) -> tuple[str, str]:
    """The (backend, config name) self-attention uses on `device` (default: the current CUDA device, if
    any): the Triton config, or the Gluon config when the backend is "gluon"."""
    impl = _impl(device)
    return impl, (_gluon_config(device) if impl == "gluon" else _config(device))


def gluon_status(device: torch.device | None = None) -> str:
    """Why the "gluon" backend runs or falls back to the Triton kernel, in a few words."""
    if _gluon.failure():
        return f"off after a failure: {_gluon.failure()}"
    if not _gluon.HAVE_GLUON:
        return "unavailable: this Triton has no Gluon"
    if _gluon.switched_off():
        return "off: LX2V_ATTN_GLUON_OFF=1"
    if not _gluon.available(device):
        return "unavailable: needs an sm90 GPU"
    return "available"


def cross_attention_impl(device: torch.device | None = None) -> str:
    """The backend of the generic `attention` op (cross-attention) on `device` (default: as attention_impl)."""
    return _cross_impl(device)


# ----------------------------------------------------------------------------------------------------
# Kernel
# ----------------------------------------------------------------------------------------------------

@triton.jit
def _load_tile(desc, base, row, stride_row, offs_r, offs_d, USE_TMA: tl.constexpr):
    """Rows [row, row + len(offs_r)) of a [L, D] operand (full tile: no mask). Row offsets in int64 here and
    in every pointer load and store of the kernel: L x row stride passes 2^31 beyond ~419k tokens for the
    DiT's [B, L, C] projections at C = 5120, and beyond ~140k for a caller's slices of a fused [B, L, 3C]
    projection (the TMA descriptors take 64-bit strides)."""
    if USE_TMA:
        return desc.load([row, 0])
    else:
        return tl.load(base + (row + offs_r).to(tl.int64)[:, None] * stride_row + offs_d[None, :])


@triton.jit
def _softmax_step(qk, v, m_i, l_i, acc, qk_scale):
    """Online-softmax update with one key block: qk [BM, BN] raw scores, v [BN, D]."""
    m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    p = tl.math.exp2(qk * qk_scale - m_ij[:, None])  # one FMA per score: log2(e)/sqrt(D) folded in
    alpha = tl.math.exp2(m_i - m_ij)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc)
    return m_ij, l_i, acc


@triton.jit
def _attn_fwd_kernel(Q, K, V, O, C_SCRATCH,
                     stride_qb, stride_ql, stride_qh, stride_kb, stride_kl, stride_kh,
                     stride_vb, stride_vl, stride_vh, stride_ob, stride_ol, stride_oh,
                     H, Lq, Lk, n_full, qk_scale, Lk_pad,
                     HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     USE_TMA: tl.constexpr, WARP_SPEC: tl.constexpr, PIPE_QK: tl.constexpr,
                     EVEN_N: tl.constexpr, MEAN_PAD: tl.constexpr):
    """One (query block, batch*head): o = softmax(q k^T * scale) v, scale = log2(e)/sqrt(D) on exp2.

    n_full = Lk rounded down to BLOCK_N (keys handled by the unmasked loop). PIPE_QK issues the q k^T of
    block j+1 before the softmax of block j (FA3's intra-warpgroup overlap, written as software pipelining).
    MEAN_PAD (warp-specialised only): K holds Lk_pad = Lk rounded up to BLOCK_N rows, rows >= Lk equal to
    the mean of the real keys, and V reads as zeros there. The loop then needs no mask: a padded key adds
    2^(q.mean * scale - m) to l and nothing to acc, removed after the loop. Its score is the mean score,
    never above the row max, so the subtraction loses at most n_pad * 2^-24 of l.
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    q_base = Q + b * stride_qb + h * stride_qh
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    o_base = O + b * stride_ob + h * stride_oh
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_D)

    if USE_TMA:
        # per-(b, h) 2D descriptors: rows past Lq / Lk read as zeros and are not written
        desc_q = tl.make_tensor_descriptor(q_base, shape=[Lq, HEAD_D], strides=[stride_ql, 1],
                                           block_shape=[BLOCK_M, HEAD_D])
        desc_k = tl.make_tensor_descriptor(k_base, shape=[Lk_pad if MEAN_PAD else Lk, HEAD_D], strides=[stride_kl, 1],
                                           block_shape=[BLOCK_N, HEAD_D])
        desc_v = tl.make_tensor_descriptor(v_base, shape=[Lk, HEAD_D], strides=[stride_vl, 1],
                                           block_shape=[BLOCK_N, HEAD_D])
        desc_o = tl.make_tensor_descriptor(o_base, shape=[Lq, HEAD_D], strides=[stride_ol, 1],
                                           block_shape=[BLOCK_M, HEAD_D])
        q = desc_q.load([start_m, 0])
    else:
        desc_k = k_base  # unused placeholders for _load_tile
        desc_v = v_base
        q = tl.load(q_base + offs_m.to(tl.int64)[:, None] * stride_ql + offs_d[None, :], mask=offs_m[:, None] < Lq,
                    other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_D], tl.float32)
    if MEAN_PAD:
        # the padded keys' score q . mean(k) * scale (row Lk of K holds the mean), parked in global scratch
        # [B*H, Lq] and read back after the loop: triton 3.6's sm90 warp specialisation fails when a [BM]
        # tensor computed before the loop, or a [BM, D] load after it, is used after it
        mean = tl.load(k_base + tl.cast(Lk, tl.int64) * stride_kl + offs_d).to(tl.float32)  # (Lk == 1: a constexpr)
        q_rows = tl.load(q_base + offs_m.to(tl.int64)[:, None] * stride_ql + offs_d[None, :],
                         mask=offs_m[:, None] < Lq, other=0.0)
        c_pad = tl.sum(q_rows.to(tl.float32) * mean[None, :], 1) * qk_scale
        tl.store(C_SCRATCH + pid_bh.to(tl.int64) * Lq + offs_m, c_pad, mask=offs_m < Lq)
        tl.debug_barrier()

    # ragged last key block (Lk % BLOCK_N keys) first: missing keys score -inf, their v rows are zero.
    # (Triton's sm90 warp specialisation accepts no dot before or after its loop: WARP_SPEC masks in the loop.)
    if not EVEN_N and not WARP_SPEC:
        kv_mask = (n_full + offs_n) < Lk
        if USE_TMA:
            k = desc_k.load([n_full, 0])
            v = desc_v.load([n_full, 0])
        else:
            rows_n = (n_full + offs_n).to(tl.int64)
            k = tl.load(k_base + rows_n[:, None] * stride_kl + offs_d[None, :], mask=kv_mask[:, None], other=0.0)
            v = tl.load(v_base + rows_n[:, None] * stride_vl + offs_d[None, :], mask=kv_mask[:, None], other=0.0)
        qk = tl.where(kv_mask[None, :], tl.dot(q, k.T), float("-inf"))
        m_i, l_i, acc = _softmax_step(qk, v, m_i, l_i, acc, qk_scale)

    # full key blocks: no masks in the steady-state loop
    if PIPE_QK:
        if n_full > 0:
            k = _load_tile(desc_k, k_base, 0, stride_kl, offs_n, offs_d, USE_TMA)
            qk = tl.dot(q, k.T)
            for start_n in tl.range(BLOCK_N, n_full, BLOCK_N):
                start_n = tl.multiple_of(start_n, BLOCK_N)
                k = _load_tile(desc_k, k_base, start_n, stride_kl, offs_n, offs_d, USE_TMA)
                v = _load_tile(desc_v, v_base, start_n - BLOCK_N, stride_vl, offs_n, offs_d, USE_TMA)
                qk_next = tl.dot(q, k.T)
                m_i, l_i, acc = _softmax_step(qk, v, m_i, l_i, acc, qk_scale)
                qk = qk_next
            v = _load_tile(desc_v, v_base, n_full - BLOCK_N, stride_vl, offs_n, offs_d, USE_TMA)
            m_i, l_i, acc = _softmax_step(qk, v, m_i, l_i, acc, qk_scale)
    elif WARP_SPEC:
        # all blocks in one loop (TMA reads rows past Lk as zeros); a [BLOCK_N] -inf bias masks them
        for start_n in tl.range(0, Lk, BLOCK_N, warp_specialize=True):
            start_n = tl.multiple_of(start_n, BLOCK_N)
            k = desc_k.load([start_n, 0])
            v = desc_v.load([start_n, 0])
            if EVEN_N or MEAN_PAD:  # no mask (on sm90 it costs 127 of 580 instructions per key block)
                m_i, l_i, acc = _softmax_step(tl.dot(q, k.T), v, m_i, l_i, acc, qk_scale)
            else:
                bias = tl.where(start_n + offs_n < Lk, 0.0, float("-inf"))
                m_i, l_i, acc = _softmax_step(tl.dot(q, k.T) + bias[None, :], v, m_i, l_i, acc, qk_scale)
    else:
        for start_n in tl.range(0, n_full, BLOCK_N):
            start_n = tl.multiple_of(start_n, BLOCK_N)
            k = _load_tile(desc_k, k_base, start_n, stride_kl, offs_n, offs_d, USE_TMA)
            v = _load_tile(desc_v, v_base, start_n, stride_vl, offs_n, offs_d, USE_TMA)
            m_i, l_i, acc = _softmax_step(tl.dot(q, k.T), v, m_i, l_i, acc, qk_scale)

    if MEAN_PAD:  # remove the padded keys' share of l; their score was parked in the scratch before the loop
        tl.debug_barrier()
        c_pad = tl.load(C_SCRATCH + pid_bh.to(tl.int64) * Lq + offs_m, mask=offs_m < Lq, other=0.0)
        l_i = l_i - (Lk_pad - Lk) * tl.math.exp2(c_pad - m_i)
    out = (acc / l_i[:, None]).to(O.dtype.element_ty)
    if USE_TMA:
        desc_o.store([start_m, 0], out)
    else:
        tl.store(o_base + offs_m.to(tl.int64)[:, None] * stride_ol + offs_d[None, :], out, mask=offs_m[:, None] < Lq)


def _tma_alloc(size: int, alignment: int, stream) -> torch.Tensor:
    # global scratch for on-device TMA descriptors, from the caching allocator (CUDA-graph safe)
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _resolve(cfg: AttnConfig, device: torch.device) -> AttnConfig:
    """Before sm90 (A100, L40S, RTX 4090: no warp specialisation, no TMA) a warp-specialised config runs its
    tile plainly with 8 warps and pointer loads: at 4 warps the 128x128 tile spills (ptxas: 23,796 bytes
    of spill stores on sm_80, ~2,700 on sm_89; 8 warps: none, 96 KB of shared memory, within sm_86/89's 99
    KB). Unmeasured on those GPUs. The same on a GPU whose blocks get less shared memory than the
    warp-specialised tiles take (about 165-197 KB: sm_120, RTX 5090 / RTX PRO 6000 Blackwell, has 99 KB; the
    launch failed there)."""
    if device.type != "cuda":
        return cfg
    return _plain_before_sm90(cfg, torch.cuda.get_device_capability(device), _smem_per_block(device))


# shared memory the warp-specialised 128x128 tiles need (Triton AOT: 197,024 B on sm_90, 164,036 B on sm_120)
WS_SMEM_BYTES = 200 * 1024


def _smem_per_block(device: torch.device) -> int | None:
    """The most shared memory one block may opt into on `device` (None where torch does not say)."""
    try:
        return getattr(torch.cuda.get_device_properties(device), "shared_memory_per_block_optin", None)
    except (RuntimeError, AssertionError, AttributeError):
        return None


def _plain_before_sm90(cfg: AttnConfig, capability: tuple[int, int] | None, smem: int | None = None) -> AttnConfig:
    small = capability is not None and capability < (9, 0) or smem is not None and smem < WS_SMEM_BYTES
    if cfg.warp_specialize and small:
        return dataclasses.replace(cfg, warp_specialize=False, num_warps=8, tma=False)
    return cfg


def _tma_ok(*ts: torch.Tensor) -> bool:
    """TMA needs 16-byte aligned bases and 16-byte multiples for every non-unit stride."""
    for t in ts:
        esz = t.element_size()
        if t.data_ptr() % 16 or any((s * esz) % 16 for s in t.stride()[:-1]):
            return False
    return True


# head dims the kernels take: at 256 every config needs 384-448 KB of shared memory (sm90 has 227 KB)
HEAD_DIMS = (16, 32, 64, 128)


def attention_supports(dtype: torch.dtype, head_dim: int, attn_8bit: bool = False) -> bool:
    """Whether the attention kernels take this run dtype and head dim (fp16/bf16; D a power of two in
    [16, 128], the 8-bit kernel and the RoPE prologue 32, 64 or 128): ops falls back to the reference
    where not (an fp32 model, 48- or 256-wide heads: no config's tiles fit sm90's shared memory at 256)."""
    return dtype in (torch.float16, torch.bfloat16) and head_dim in ((32, 64, 128) if attn_8bit else
                                                                    HEAD_DIMS)


def _check_qkv(q, k, v):
    where = "kernels/attention.py"
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"{where}: q, k, v must be [B, L, H, D], got {list(q.shape)}, {list(k.shape)}, "
                         f"{list(v.shape)}")
    B, Lq, H, D = q.shape
    if k.shape[0] != B or k.shape[2:] != (H, D) or v.shape != k.shape:
        raise ValueError(f"{where}: k, v must be [B={B}, Lk, H={H}, D={D}] and equal, got {list(k.shape)}, "
                         f"{list(v.shape)}")
    if D not in HEAD_DIMS:
        raise ValueError(f"{where}: head dim D must be a power of two in [16, 128], got {D}")
    if q.dtype not in (torch.float16, torch.bfloat16) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"{where}: q, k, v must all be fp16 or bf16, got {q.dtype}, {k.dtype}, {v.dtype}")


def mean_pad_ok(cfg: AttnConfig, Lk: int, device: torch.device) -> bool:
    """Whether attention_triton(..., k_mean_padded=True) helps: a warp-specialised config (TMA: sm90 or the
    interpreter) and a ragged last key block."""
    tma = device.type == "cuda" and _resolve(cfg, device).warp_specialize or \
        (device.type == "cpu" and interpreting())
    return cfg.warp_specialize and tma and Lk % cfg.block_n != 0 and Lk > 1


def pad_keys_with_mean(k_pad: torch.Tensor, Lk: int) -> None:
    """k_pad [B, Lk_pad, H, D] holding the keys in rows < Lk: writes their mean (fp32 sum, rounded to
    k_pad's dtype) into rows >= Lk, in place."""
    k_pad[:, Lk:] = torch.mean(k_pad[:, :Lk], dim=1, keepdim=True, dtype=torch.float32).to(k_pad.dtype)


def attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: str | AttnConfig | None = None,
                     out: torch.Tensor | None = None, k_mean_padded: bool = False) -> torch.Tensor:
    """Launches the Triton kernel with `config` (name or AttnConfig; default the module's) into `out`
    (allocated contiguous [B, Lq, H, D] when None). Not a custom op: benchmarks and tests call it.

    k_mean_padded: k is [B, Lk_pad, H, D] with Lk_pad = v's Lk rounded up to the config's block_n and rows
    >= Lk filled by pad_keys_with_mean (then the warp-specialised loop runs without a mask; needs
    mean_pad_ok)."""
    cfg = ATTN_CONFIGS[config or _config(q.device)] if not isinstance(config, AttnConfig) else config
    cfg = _resolve(cfg, q.device)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    B, Lq, H, D = q.shape
    Lk = v.shape[1]
    Lk_pad = k.shape[1]
    if k_mean_padded and (Lk_pad != triton.cdiv(Lk, cfg.block_n) * cfg.block_n or not mean_pad_ok(cfg, Lk, q.device)):
        raise ValueError(f"kernels/attention.py: k_mean_padded needs a warp-specialised config, a ragged Lk "
                         f"and k with {triton.cdiv(Lk, cfg.block_n) * cfg.block_n} rows; got config {cfg}, "
                         f"Lk {Lk}, k rows {Lk_pad}")
    if out is None:
        out = torch.empty((B, Lq, H, D), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    if Lk == 0:
        return out.zero_()
    # the CPU interpreter also runs the TMA path (descriptor loads with zero padding), for tests
    use_tma = cfg.tma and _tma_ok(q, k, v, out) and (q.is_cuda or interpreting())
    if use_tma and q.is_cuda:
        triton.set_allocator(_tma_alloc)
    mean_pad = k_mean_padded and cfg.warp_specialize and use_tma
    # the padded keys' scores [B*H, Lq] fp32 (mean_pad); otherwise an unused placeholder: no allocation
    scratch = torch.empty(B * H * Lq, dtype=torch.float32, device=q.device) if mean_pad else out
    grid = (triton.cdiv(Lq, cfg.block_m), B * H)
    _attn_fwd_kernel[grid](
        q, k, v, out, scratch,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        H, Lq, Lk, (Lk // cfg.block_n) * cfg.block_n, LOG2E / math.sqrt(D), Lk_pad,
        HEAD_D=D, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, USE_TMA=use_tma,
        WARP_SPEC=cfg.warp_specialize and use_tma, PIPE_QK=cfg.pipe_qk, EVEN_N=Lk % cfg.block_n == 0,
        MEAN_PAD=mean_pad, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out


def _sdpa(q, k, v, impl: str) -> torch.Tensor:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backend = SDPBackend.CUDNN_ATTENTION if impl == "sdpa_cudnn" else SDPBackend.FLASH_ATTENTION
    with sdpa_kernel([backend]):
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           scale=1.0 / math.sqrt(q.shape[-1]))
    return o.transpose(1, 2).contiguous()


def _attention_gluon_or_triton(q, k, v) -> torch.Tensor:
    """The Gluon kernel where it applies (sm90, head_dim 128, not switched off), else the Triton kernel.
    A failure of the Gluon kernel (e.g. a compile error on this GPU) switches it off for the process with
    one warning; the Triton kernel then computes this call and the following ones."""
    if _gluon.failure() is None and _gluon.gluon_ok(q, k, v) and _gluon.available(q.device):
        config = _gluon_config(q.device)  # (a bad tuned choice is the user's error: raised, not a kernel failure)
        try:
            return _gluon.attention_gluon(q, k, v, config)
        except torch.OutOfMemoryError:  # (transient: not the kernel's fault, it stays on)
            raise
        except Exception as e:  # noqa: BLE001 - any other failure: warn once and use the proven kernel
            _gluon.record_failure(e, "kernels/attention.py")
    return attention_triton(q, k, v)


_SDPA_FAILED: dict[str, str] = {}


def _attention_any(q, k, v, impl: str, explicit: bool = True) -> torch.Tensor:
    """`impl` on q, k, v. An SDPA backend that fails (e.g. cuDNN attention missing from this torch build)
    raises when it was chosen explicitly; a tuned choice instead warns once and the Triton kernel runs."""
    if impl == "triton":
        return attention_triton(q, k, v)
    if impl == "gluon":
        return _attention_gluon_or_triton(q, k, v)
    if explicit or impl not in _SDPA_FAILED:
        try:
            return _sdpa(q, k, v, impl)
        except RuntimeError as e:
            if explicit:
                raise
            _SDPA_FAILED[impl] = f"{type(e).__name__}: {str(e)[:300]}"
            warnings.warn(f"kernels/attention.py: {impl} (chosen by the tuned defaults of "
                          f"{tuned_path(q.device)}) failed ({_SDPA_FAILED[impl]}); the Triton kernel runs instead",
                          RuntimeWarning, stacklevel=2)
    return attention_triton(q, k, v)


@torch.library.custom_op("lightx2v::attention", mutates_args=())
def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return _attention_any(q, k, v, _cross_impl(q.device), explicit=_CROSS_IMPL is not None or _explicit())


@_attention_op.register_fake
def _(q, k, v):
    return q.new_empty(q.shape)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Non-causal softmax(q k^T / sqrt(D)) v.

    q [B, Lq, H, D], k/v [B, Lk, H, D] (fp16/bf16, any strides with a unit last stride); returns a
    contiguous [B, Lq, H, D] in q's dtype. Backend: cross_attention_impl(q.device).
    """
    _check_qkv(q, k, v)
    return _attention_op(q, k, v)


@torch.library.custom_op("lightx2v::self_attention_heads", mutates_args=())
def _self_attention_heads_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return _attention_any(q, k, v, _impl(q.device), explicit=_explicit())


@_self_attention_heads_op.register_fake
def _(q, k, v):
    return q.new_empty(q.shape)


def self_attention_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """attention() with self-attention's backend and config (attention_impl) instead of cross-attention's:
    for q/k already normed and rotated, e.g. the whole-sequence attention of a sequence-parallel rank.

    q [B, Lq, H, D], k/v [B, Lk, H, D] (fp16/bf16, unit last stride) -> contiguous [B, Lq, H, D].
    """
    _check_qkv(q, k, v)
    return _self_attention_heads_op(q, k, v)


# ----------------------------------------------------------------------------------------------------
# Self-attention: q/k RMSNorm + RoPE + attention
# ----------------------------------------------------------------------------------------------------

def self_attention_ref(q, k, v, wq, wk, cos, sin, num_heads: int, eps: float = 1e-6) -> torch.Tensor:
    """Reference: qk_norm_rope_ref then attention_ref; q, k, v [B, L, C] -> [B, L, C]."""
    qh, kh = qk_norm_rope_ref(q, k, wq, wk, cos, sin, num_heads, eps)
    return attention_ref(qh, kh, v.unflatten(-1, (num_heads, -1))).flatten(-2)


@torch.library.custom_op("lightx2v::self_attention", mutates_args=())
def _self_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor,
                       cos: torch.Tensor, sin: torch.Tensor, num_heads: int, eps: float,
                       attn_8bit: bool = False) -> torch.Tensor:
    B, L, C = q.shape
    H, D = num_heads, C // num_heads
    if not attn_8bit and attention_supports(q.dtype, D, attn_8bit=True):  # (the prologue's D: 32, 64, 128)
        from .attention_rope import attention_rope_prologue, rope_placement
        if rope_placement(q.device) == "prologue":  # norm + RoPE inside the attention kernel
            return attention_rope_prologue(q, k, v, wq, wk, cos, sin, H, eps)
    qh = torch.empty((B, L, H, D), dtype=q.dtype, device=q.device)
    vh = v.unflatten(-1, (H, -1))
    impl, cfg = _impl(q.device), ATTN_CONFIGS[_config(q.device)]
    if not attn_8bit and impl == "triton" and cfg.mean_pad and L and mean_pad_ok(cfg, L, q.device):
        # keys padded to a whole block with their mean: the warp-specialised loop runs without a mask
        kp = torch.empty((B, triton.cdiv(L, cfg.block_n) * cfg.block_n, H, D), dtype=k.dtype, device=k.device)
        for b in range(B):  # the norm kernels write contiguous [L, C] outputs
            launch_qk_norm_rope(q[b:b + 1], k[b:b + 1], wq, wk, cos, sin, H, eps, qh[b:b + 1], kp[b:b + 1, :L])
        pad_keys_with_mean(kp, L)
        return attention_triton(qh, kp, vh, cfg, k_mean_padded=True).flatten(-2)
    kh = torch.empty((B, L, H, D), dtype=k.dtype, device=k.device)
    if q.numel():
        launch_qk_norm_rope(q, k, wq, wk, cos, sin, num_heads, eps, qh, kh)
    if attn_8bit:
        return attention_8bit_triton(qh, kh, vh).flatten(-2)
    return _attention_any(qh, kh, vh, impl, explicit=_explicit()).flatten(-2)


@_self_attention_op.register_fake
def _(q, k, v, wq, wk, cos, sin, num_heads, eps, attn_8bit=False):
    return q.new_empty(q.shape)


def self_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor,
                   cos: torch.Tensor, sin: torch.Tensor, num_heads: int, eps: float = 1e-6,
                   attn_8bit: bool = False) -> torch.Tensor:
    """softmax(rope(rms(q) wq) rope(rms(k) wk)^T / sqrt(D)) v with heads split from C.

    q, k, v [B, L, C] projections (run dtype, unit stride on C); wq, wk [C] fp32; cos, sin [L, D/2] fp32.
    Returns a contiguous [B, L, C]. One norm+RoPE pass writing [B, L, H, D] that the attention reads; or,
    with kernels.attention_rope.rope_placement() "prologue", the norm and RoPE inside the attention kernel
    (a stats pass writes each token's 1/rms: RMS spans all heads).
    attn_8bit: INT8 q k^T / FP8 P.V (kernels/attention_8bit.py; approximate, needs sm89+).
    """
    _check_qk(q, k, wq, wk, cos, sin, num_heads)
    if v.shape != q.shape or v.stride(-1) != 1:
        raise ValueError(f"kernels/attention.py: v must be [B, L, C] = {list(q.shape)} with unit last stride, "
                         f"got {list(v.shape)} strides {v.stride()}")
    D = q.shape[-1] // num_heads
    if not attention_supports(q.dtype, D, attn_8bit) or v.dtype != q.dtype or k.dtype != q.dtype:
        raise ValueError(f"kernels/attention.py: self_attention{' (8-bit)' if attn_8bit else ''} takes fp16/bf16 q, "
                         f"k, v and a head dim of {'32, 64 or 128' if attn_8bit else 'a power of two in [16, 128]'}, "
                         f"got {q.dtype}/{k.dtype}/{v.dtype} and D = {D}")
    if attn_8bit and not fp8_supported(q.device):
        raise RuntimeError(f"kernels/attention.py: 8-bit self-attention needs an sm89+ GPU (fp8 MMA) or "
                           f"TRITON_INTERPRET=1, got device {q.device}")
    return _self_attention_op(q, k, v, wq, wk, cos, sin, int(num_heads), float(eps), bool(attn_8bit))
