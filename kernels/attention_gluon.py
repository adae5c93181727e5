"""FA3-style non-causal attention forward for Hopper, written in Gluon (explicit warp specialisation).

o = softmax(q k^T / sqrt(D)) v for head_dim 128, bf16/fp16 in, fp32 accumulation, exp2-domain online
softmax (log2(e) folded into the scale). Reference: ``lightx2v_engine.ops.attention_ref``.

Why a second kernel: Triton's automatic warp specialisation (``kernels/attention.py``) measured 582 TFLOP/s
on an H100 (59% of the tensor cores' peak). In its SASS a consumer warp issues its softmax and its MMAs
in one stream, so the tensor cores idle while the exponentials run. This kernel writes the FlashAttention-3
schedule out by hand:

* one CTA per (128 query rows, batch x head); three partitions (``gl.warp_specialize``):
  a 1-warp TMA producer and two 4-warp consumer warpgroups of 64 rows each;
* the producer streams K and V blocks of ``BLOCK_N`` keys through ``STAGES``-deep shared-memory rings
  (ready/empty mbarrier pairs; K and V have separate rings so q k^T can start before V lands);
* ping-pong: the two consumers take turns issuing their MMAs (two mbarriers pass the turn), so one
  warpgroup's tensor-core work overlaps the other's softmax;
* intra-warpgroup overlap: in iteration j a consumer issues S_j = q K_j^T and O += P_{j-1} V_{j-1}
  together, waits only for S_j, runs the softmax of S_j while P_{j-1} V_{j-1} is still running, then waits
  for it and rescales O (ptxas would hoist that second wait above the softmax, the overlap lost: the wait
  is pinned after it by a predicated copy, ``_anchor_pv_wait``);
* P goes to the second MMA from registers (the accumulator layout of the first MMA is the A-operand layout
  of the second), V from shared memory; only the ragged last key block is masked, in a step peeled out of
  the loop (in the loop body the branch was if-converted into 64 selects per block).

The 8-bit kernel (``attention_8bit_gluon``; ``ATTN8_CONFIGS["gluon_*"]`` in kernels/attention_8bit.py) runs
the same schedule on ``quantize_qkv``'s int8 q/k and transposed e4m3 v with that module's arithmetic;
its P8 goes through shared memory. (An fp8 A operand in registers costs no shuffle when v's keys are
stored in the order in which the accumulator fragment holds them, 32 keys at a time: (h, m1, c1, c0, m0)
-> (h, c1, c0, m1, m0), which convert_layout(assert_trivial=True) accepts; but the registers of that
operand, of P_j and of the running P.V block exceed the consumer's 240 once the softmax overlaps P.V (it
spilled), and Triton 3.6's warpgroup_mma_wait cannot keep 8-bit registers alive: "Unexpected bitwidth in
WGMMAWaitGroupOp: 8".)

q [B, Lq, H, D], k/v [B, Lk, H, D] are read through 2D TMA descriptors over [B*L, H*D] (so each tensor
needs unit stride on D, stride D between heads and whole rows between batches: any [B, L, C] projection
viewed as heads qualifies). Rows past a batch's end are read from the next batch (or as zeros past the
tensor) and masked (keys) or not stored (queries).

Needs sm90 (TMA, wgmma) and Triton with Gluon (3.6 here); ``available()`` says whether it can run.
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

try:  # Gluon is experimental: absent or different in other Triton versions
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                                  warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    HAVE_GLUON = True
except ImportError:  # pragma: no cover - depends on the installed Triton
    HAVE_GLUON = False

__all__ = ["attention_gluon", "attention_8bit_gluon", "attention_8bit_gluon_quantized", "available", "gluon_ok",
           "compile_signature", "compile_signature8", "GLUON_CONFIGS", "GluonAttnConfig", "DEFAULT_GLUON_CONFIG",
           "HAVE_GLUON"]

LOG2E = 1.4426950408889634
# 8-bit kernel constants (kernels/attention_8bit.py's): p = 2^(x + 8) in (0, 256], inside e4m3's range;
# int32 s + MAGIC_I has the bits of the float MAGIC_F + s = 1.5 * 2^23 + s (exact for |s| < 2^22)
P_SHIFT = tl.constexpr(8.0)
MAGIC_I = tl.constexpr(0x4B400000)
MAGIC_F = tl.constexpr(12582912.0)
# 12 warps (4 + 4 + the producer's warpgroup) x 168 = the 64K-register file; setmaxnreg then moves them:
# 240 to each consumer warpgroup, 24 to the producer's
MAXNREG = 168


@dataclass(frozen=True)
class GluonAttnConfig:
    """Launch parameters: keys per block, depth of the K/V rings, ping-pong of the two consumer
    warpgroups, registers per consumer thread (the producer warp gets 24)."""
    block_n: int
    stages: int
    pingpong: bool = True
    consumer_regs: int = 240
    block_m: int = 128  # two consumer warpgroups of 64 rows (wgmma M = 64 per warpgroup)
    p_regs: bool = False  # 8-bit kernel: P8 as a register operand of P.V (vt quantised with key_perm)


# smem: q 32 KB + K and V 2 x stages x block_n x 256 B + 16 KB epilogue scratch; 128x128 with 2 stages
# is 176 KB (3 stages would be 240 KB, over the 227 KB an H100 block can have)
GLUON_CONFIGS: dict[str, GluonAttnConfig] = {
    "fa3_128x128_s2": GluonAttnConfig(128, 2),
    # the same without ping-pong (both warpgroups issue their MMAs whenever ready): measures what the
    # explicit alternation is worth
    "fa3_nopp_128x128_s2": GluonAttnConfig(128, 2, pingpong=False),
}
DEFAULT_GLUON_CONFIG = "fa3_128x128_s2"


def switched_off() -> bool:
    """LX2V_ATTN_GLUON_OFF=1 (benchmarks/gpu_check.sh sets it when the kernel's smoke test fails or hangs)."""
    return os.environ.get("LX2V_ATTN_GLUON_OFF", "0") == "1"


def available(device: torch.device | None = None) -> bool:
    """Whether attention_gluon can run here: Gluon importable, an sm90 GPU (TMA + wgmma), not switched off
    by LX2V_ATTN_GLUON_OFF=1."""
    if not HAVE_GLUON or switched_off() or not torch.cuda.is_available():
        return False
    device = device or torch.device("cuda")
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9


_FAILED: str | None = None  # the first failure of a Gluon kernel in this process: they stay off after it


def failure() -> str | None:
    """Why the Gluon kernels were switched off in this process (None: they were not)."""
    return _FAILED


def record_failure(e: BaseException, where: str) -> None:
    """Switches the Gluon kernels off for the rest of the process with one warning naming the error; the
    callers then run their Triton kernels."""
    global _FAILED
    _FAILED = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    warnings.warn(f"{where}: the Gluon attention kernel failed ({_FAILED}); using the Triton kernel for the "
                  f"rest of this process", RuntimeWarning, stacklevel=3)


def _rows_view_ok(t: torch.Tensor) -> bool:
    """[B, L, H, D] readable as a 2D [B*L, H*D] TMA tensor: unit D stride, heads D apart, batches L rows
    apart, 16-byte aligned base and row stride."""
    B, L, H, D = t.shape
    esz = t.element_size()
    return (t.stride(3) == 1 and t.stride(2) == D and (B == 1 or t.stride(0) == L * t.stride(1))
            and t.data_ptr() % 16 == 0 and (t.stride(1) * esz) % 16 == 0 and t.stride(1) >= H * D)


def gluon_ok(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether this kernel takes these inputs (dtype, head_dim 128, non-empty, layout for TMA after at most
    a .contiguous())."""
    return (q.dtype in (torch.bfloat16, torch.float16) and k.dtype == q.dtype and v.dtype == q.dtype
            and q.shape[-1] == 128 and q.shape[1] > 0 and k.shape[1] > 0 and q.is_cuda)


if HAVE_GLUON:

    @gluon.jit
    def _producer(q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs, q_ready, k_ready, k_empty, v_ready, v_empty,
                  row_q, row_k, col, row_v, n_blocks):
        """1 warp: q once (both halves), then K_j and V_j into ring slot j % STAGES when it is free. V is
        [BLOCK_N keys, D] at (row_k + j BLOCK_N, col), or for the 8-bit kernel (e4m3 v, stored transposed)
        [D, BLOCK_N keys] at (row_v, j BLOCK_N)."""
        HALF: gl.constexpr = q_desc.block_type.shape[0]
        BLOCK_N: gl.constexpr = k_desc.block_type.shape[0]
        STAGES: gl.constexpr = k_bufs.type.shape[0]
        V_T: gl.constexpr = v_desc.dtype == gl.float8e4nv
        mbarrier.expect(q_ready, 2 * q_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [row_q, col], q_ready, q_bufs.index(0))
        tma.async_copy_global_to_shared(q_desc, [row_q + HALF, col], q_ready, q_bufs.index(1))
        for j in range(n_blocks):
            s = j % STAGES
            ph = (j // STAGES) & 1
            # a fresh mbarrier counts as having completed the phase of parity 1: the first pass is free
            mbarrier.wait(k_empty.index(s), ph ^ 1)
            mbarrier.expect(k_ready.index(s), k_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(k_desc, [row_k + j * BLOCK_N, col], k_ready.index(s), k_bufs.index(s))
            mbarrier.wait(v_empty.index(s), ph ^ 1)
            mbarrier.expect(v_ready.index(s), v_desc.block_type.nbytes)
            if V_T:
                tma.async_copy_global_to_shared(v_desc, [row_v, j * BLOCK_N], v_ready.index(s), v_bufs.index(s))
            else:
                tma.async_copy_global_to_shared(v_desc, [row_k + j * BLOCK_N, col], v_ready.index(s),
                                                v_bufs.index(s))

    @gluon.jit
    def _barriers(STAGES: gl.constexpr, PINGPONG: gl.constexpr):
        """The kernel's mbarriers, initialised: q_ready; k_ready, k_empty, v_ready, v_empty per ring slot;
        turn (ping-pong: one per consumer warpgroup, else a single unused one). ready: one arrival (the
        producer's expect) plus the bytes; empty: both consumer warpgroups; turn: the other warpgroup."""
        N_TURN: gl.constexpr = 1 + PINGPONG
        q_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        turn = gl.allocate_shared_memory(gl.int64, [N_TURN, 1], mbarrier.MBarrierLayout())
        mbarrier.init(q_ready, count=1)
        for i in gl.static_range(STAGES):
            mbarrier.init(k_ready.index(i), count=1)
            mbarrier.init(v_ready.index(i), count=1)
            mbarrier.init(k_empty.index(i), count=2)
            mbarrier.init(v_empty.index(i), count=2)
        for i in gl.static_range(N_TURN):
            mbarrier.init(turn.index(i), count=1)
        return q_ready, k_ready, k_empty, v_ready, v_empty, turn

    @gluon.jit
    def _store_rows(o, o_base, row0, Lq, stride_ol):
        """o [HALF, D] fp32 -> rows row0.. (< Lq) of o_base with 16-byte stores (8 columns a thread)."""
        HALF: gl.constexpr = o.type.shape[0]
        HEAD_D: gl.constexpr = o.type.shape[1]
        st_layout: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [4, 1], [1, 0])
        o = gl.convert_layout(o.to(o_base.dtype.element_ty), st_layout)
        rows = row0 + gl.arange(0, HALF, layout=gl.SliceLayout(1, st_layout))
        cols = gl.arange(0, HEAD_D, layout=gl.SliceLayout(0, st_layout))
        # int64 row offsets: Lq x the row stride passes 2^31 beyond ~419k tokens for a contiguous out at
        # C 5120 (~140k for a slice of a [B, L, 3C] buffer)
        gl.store(o_base + gl.expand_dims(rows.to(gl.int64), 1) * stride_ol + gl.expand_dims(cols, 0), o,
                 mask=gl.expand_dims(rows < Lq, 1))

    @gluon.jit
    def _take_turn(turn, t, WG: gl.constexpr):
        """Waits until it is this warpgroup's turn t to issue MMAs (no-op without ping-pong: one barrier).
        Warpgroup 0 waits parity (t & 1) ^ 1 (a fresh barrier has completed parity 1, so it starts),
        warpgroup 1 parity t & 1."""
        if turn.type.shape[0] == 2:
            mbarrier.wait(turn.index(WG), (t & 1) ^ (1 - WG))

    @gluon.jit
    def _pass_turn(turn, WG: gl.constexpr):
        """Hands the tensor cores to the other warpgroup (no-op without ping-pong)."""
        if turn.type.shape[0] == 2:
            mbarrier.arrive(turn.index(1 - WG), count=1)

    @gluon.jit
    def _mask_keys(s, j, Lk):
        """Scores of keys >= Lk (in key block j) set to -inf."""
        BLOCK_N: gl.constexpr = s.type.shape[1]
        s_layout: gl.constexpr = s.type.layout
        cols = j * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        return gl.where(gl.expand_dims(cols < Lk, 0), s, float("-inf"))

    @gluon.jit
    def _anchor_pv_wait(l_i):
        """Returns l_i after a `wgmma.wait_group 0` predicated on l_i != 0 (unordered compare), placed where
        the wait for P_{j-1} V_{j-1} belongs, after the softmax of S_j. The predicate holds in every thread
        (the wait is .aligned): the row max contributes 2^0 (2^8 in the 8-bit kernel) to l_i, and a NaN row
        compares unordered-not-equal too.

        ptxas treats the wait as free and schedules it as early as it can: in the plain PTX order it lands
        right after the wait for S_j, before the first exponential, and the softmax no longer overlaps the
        second MMA (sm_90a SASS, ptxas 12.8 and 13.0). A predicate computed from the row sums gives the wait
        a data dependence on the whole softmax; the unconditional wait that follows (warpgroup_mma_wait,
        which also keeps the MMA's registers alive) cannot be scheduled above it, so both stay here.
        benchmarks/sass_stats.py counts the exponentials between the two waits ("ovl")."""
        return gl.inline_asm_elementwise(
            "{ .reg .pred p; setp.neu.f32 p, $1, 0f00000000; @p wgmma.wait_group.sync.aligned 0; mov.b32 $0, $1; }",
            "=r,r", [l_i], dtype=gl.float32, is_pure=False, pack=1)

    @gluon.jit
    def _step(q_smem, k_bufs, v_bufs, k_ready, k_empty, v_ready, v_empty, turn, j, Lk, qk_scale,
              s, p, m_i, l_i, acc, WG: gl.constexpr, MASK: gl.constexpr):
        """Turn j >= 1: issue S_j = q K_j^T and O += P_{j-1} V_{j-1}, softmax of S_j while the second MMA
        runs, then rescale O. Returns (S_j, P_j, m, l, O)."""
        STAGES: gl.constexpr = k_bufs.type.shape[0]
        o_layout: gl.constexpr = acc.type.layout
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        st = j % STAGES
        pst = (j - 1) % STAGES
        p_op = gl.convert_layout(p.to(q_smem.dtype), p_layout)
        mbarrier.wait(k_ready.index(st), (j // STAGES) & 1)
        _take_turn(turn, j, WG)
        s = warpgroup_mma(q_smem, k_bufs.index(st).permute((1, 0)), s, use_acc=False, is_async=True)
        mbarrier.wait(v_ready.index(pst), ((j - 1) // STAGES) & 1)
        acc = warpgroup_mma(p_op, v_bufs.index(pst), acc, is_async=True)
        _pass_turn(turn, WG)
        # S_j is the older group: one outstanding group left means S_j is done, P_{j-1} V_{j-1} may run
        s = warpgroup_mma_wait(num_outstanding=1, deps=(s, ))
        mbarrier.arrive(k_empty.index(st), count=1)
        if MASK:
            s = _mask_keys(s, j, Lk)
        m_new = gl.maximum(m_i, gl.max(s, axis=1) * qk_scale)
        alpha = gl.exp2(m_i - m_new)
        p = gl.exp2(s * qk_scale - gl.expand_dims(m_new, 1))
        l_i = l_i * alpha + gl.sum(p, axis=1)
        l_i = _anchor_pv_wait(l_i)
        # p_op's registers are read by the running MMA: keep them alive until it is done
        acc, p_op = warpgroup_mma_wait(num_outstanding=0, deps=(acc, p_op))
        mbarrier.arrive(v_empty.index(pst), count=1)
        acc = acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_layout)), 1)
        return s, p, m_new, l_i, acc

    @gluon.jit
    def _consumer(q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs, q_ready, k_ready, k_empty, v_ready, v_empty,
                  turn, row_q, row_k, col, n_blocks, o_ptr, stride_ob, stride_ol, stride_oh, b, h, Lq, Lk,
                  qk_scale, WG: gl.constexpr):
        """4 warps: rows [WG*HALF, WG*HALF + HALF) of the CTA's query block, over all key blocks.

        Turn t (0: S_0; j: S_j with P_{j-1} V_{j-1}; n_blocks: the last P V) waits on turn[WG] and passes
        the turn on through turn[1 - WG]; warpgroup 0 starts (parity 1 of a fresh barrier is complete).
        Only a ragged last key block is masked: the loop runs the full blocks, the masked step is peeled."""
        dtype: gl.constexpr = q_desc.dtype
        HALF: gl.constexpr = q_desc.block_type.shape[0]
        HEAD_D: gl.constexpr = q_desc.block_type.shape[1]
        BLOCK_N: gl.constexpr = k_desc.block_type.shape[0]
        STAGES: gl.constexpr = k_bufs.type.shape[0]
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, BLOCK_N, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, HEAD_D, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        q_smem = q_bufs.index(WG)
        n_full = Lk // BLOCK_N

        mbarrier.wait(q_ready, 0)
        # turn 0: S_0 = q K_0^T
        mbarrier.wait(k_ready.index(0), 0)
        _take_turn(turn, 0, WG)
        s = warpgroup_mma(q_smem, k_bufs.index(0).permute((1, 0)),
                          gl.zeros([HALF, BLOCK_N], gl.float32, s_layout), use_acc=False, is_async=True)
        _pass_turn(turn, WG)
        s = warpgroup_mma_wait(num_outstanding=0, deps=(s, ))
        mbarrier.arrive(k_empty.index(0), count=1)
        if n_full == 0:
            s = _mask_keys(s, 0, Lk)
        m_i = gl.max(s, axis=1) * qk_scale
        p = gl.exp2(s * qk_scale - gl.expand_dims(m_i, 1))
        l_i = gl.sum(p, axis=1)
        acc = gl.zeros([HALF, HEAD_D], gl.float32, o_layout)

        for j in range(1, n_full):
            s, p, m_i, l_i, acc = _step(q_smem, k_bufs, v_bufs, k_ready, k_empty, v_ready, v_empty, turn, j, Lk, qk_scale, s, p, m_i, l_i, acc, WG, False)
        if n_full >= 1 and n_full < n_blocks:
            s, p, m_i, l_i, acc = _step(q_smem, k_bufs, v_bufs, k_ready, k_empty, v_ready, v_empty, turn, n_full, Lk, qk_scale, s, p, m_i, l_i, acc, WG, True)

        # turn n_blocks: O += P_last V_last
        last = n_blocks - 1
        p_op = gl.convert_layout(p.to(dtype), p_layout)
        mbarrier.wait(v_ready.index(last % STAGES), (last // STAGES) & 1)
        _take_turn(turn, n_blocks, WG)
        acc = warpgroup_mma(p_op, v_bufs.index(last % STAGES), acc, is_async=True)
        _pass_turn(turn, WG)
        acc, p_op = warpgroup_mma_wait(num_outstanding=0, deps=(acc, p_op))
        mbarrier.arrive(v_empty.index(last % STAGES), count=1)

        o = acc / gl.expand_dims(gl.convert_layout(l_i, gl.SliceLayout(1, o_layout)), 1)
        o_base = o_ptr + b.to(gl.int64) * stride_ob + h.to(gl.int64) * stride_oh  # int64: B*Lq*H*D may pass 2^31
        _store_rows(o, o_base, row_q - b * Lq + WG * HALF, Lq, stride_ol)

    # One entry point per warpgroup: warp_specialize passes partitions runtime values only (a constexpr in the
    # argument tuple arrives as a tensor), so the warpgroup index is bound here.
    @gluon.jit
    def _consumer_0(q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs, q_ready, k_ready, k_empty, v_ready, v_empty,
                    turn, row_q, row_k, col, n_blocks, o_ptr, stride_ob, stride_ol, stride_oh, b, h, Lq, Lk,
                    qk_scale):
        _consumer(q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs, q_ready, k_ready, k_empty, v_ready, v_empty,
                  turn, row_q, row_k, col, n_blocks, o_ptr, stride_ob, stride_ol, stride_oh, b, h, Lq, Lk,
                  qk_scale, 0)

    @gluon.jit
    def _consumer_1(q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs, q_ready, k_ready, k_empty, v_ready, v_empty,
                    turn, row_q, row_k, col, n_blocks, o_ptr, stride_ob, stride_ol, stride_oh, b, h, Lq, Lk,
                    qk_scale):
        _consumer(q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs, q_ready, k_ready, k_empty, v_ready, v_empty,
                  turn, row_q, row_k, col, n_blocks, o_ptr, stride_ob, stride_ol, stride_oh, b, h, Lq, Lk,
                  qk_scale, 1)

    @gluon.jit
    def _attn_fwd_gluon(q_desc, k_desc, v_desc, o_ptr, stride_ob, stride_ol, stride_oh, H, Lq, Lk, qk_scale,
                        BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                        CONSUMER_REGS: gl.constexpr, PINGPONG: gl.constexpr):
        HALF: gl.constexpr = BLOCK_M // 2
        HEAD_D: gl.constexpr = q_desc.block_type.shape[1]
        dtype: gl.constexpr = q_desc.dtype
        pid_m = gl.program_id(0)
        bh = gl.program_id(1)
        b = bh // H
        h = bh % H
        row_q = b * Lq + pid_m * BLOCK_M
        row_k = b * Lk
        col = h * HEAD_D
        n_blocks = gl.cdiv(Lk, BLOCK_N)

        q_bufs = gl.allocate_shared_memory(dtype, [2, HALF, HEAD_D], q_desc.layout)
        k_bufs = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_D], k_desc.layout)
        v_bufs = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_D], v_desc.layout)
        q_ready, k_ready, k_empty, v_ready, v_empty, turn = _barriers(STAGES, PINGPONG)

        common = (q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs, q_ready, k_ready, k_empty, v_ready, v_empty,
                  turn, row_q, row_k, col, n_blocks, o_ptr, stride_ob, stride_ol, stride_oh, b, h, Lq, Lk,
                  qk_scale)
        gl.warp_specialize([
            (_consumer_0, common),
            (_consumer_1, common),
            (_producer, (q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs, q_ready, k_ready, k_empty, v_ready,
                         v_empty, row_q, row_k, col, 0, n_blocks)),
        ], [4, 1], [CONSUMER_REGS, 24])


    # ------------------------------------------------------------------------------------------------
    # 8-bit: INT8 q k^T, FP8 e4m3 P.V on quantize_qkv's output (kernels/attention_8bit.py's arithmetic)
    # ------------------------------------------------------------------------------------------------

    @gluon.jit
    def _store_p8(p_smem, p):
        """P (fp32, in (0, 256]) as e4m3 into the warpgroup's buffer, visible to the next wgmma: generic-
        proxy stores, a proxy fence, then all four warps synchronised."""
        p_smem.store(p.to(gl.float8e4nv))
        fence_async_shared()
        gl.thread_barrier()

    @gluon.jit
    def _p8_operand(p, o_layout: gl.constexpr):
        """P (fp32 [64, BLOCK_N], the S accumulator's layout) as the fp8 A operand of P.V, in registers: its
        columns reordered within each 32 keys (k' = 32a + 16b + 4t + 2c + e takes key 32a + 16b + 8c + 2t + e,
        attention_8bit.key_perm32, the order in which quantize_qkv(key_perm=True) wrote vt) so that each
        thread already holds its operand bytes: the layout conversion moves no data (asserted)."""
        ROWS: gl.constexpr = p.type.shape[0]
        COLS: gl.constexpr = p.type.shape[1]
        p8 = gl.reshape(gl.permute(gl.reshape(p.to(gl.float8e4nv), [ROWS, COLS // 32, 2, 2, 4, 2]),
                                   [0, 1, 2, 4, 3, 5]), [ROWS, COLS])
        a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=4)
        return gl.convert_layout(p8, a_layout, assert_trivial=True)

    @gluon.jit
    def _step8(q_smem, k_bufs, v_bufs, p_smem, k_ready, k_empty, v_ready, v_empty, turn, j, Lk, ks_ptr, qs_row,
               s, pv, m_i, l_i, acc, alpha_prev, p_op, WG: gl.constexpr, MASK: gl.constexpr,
               P_REGS: gl.constexpr):
        """Turn j >= 1: issue S_j = q8 k8_j^T (int32, on top of the 1.5*2^23 bit pattern, so that its bits
        are the fp32 1.5*2^23 + S_j) and PV_{j-1} = P8_{j-1} V8_{j-1} into a fresh fp32 block; the softmax of
        S_j runs while PV_{j-1} does; then acc = acc * alpha_{j-1} + PV_{j-1} (one FFMA per element; fp8
        wgmma accumulates imprecisely, so each block's sum is added in fp32). P8 goes through this
        warpgroup's shared buffer p_smem (written once PV_{j-1}, its reader, is done): in registers its
        accumulator layout would need ~240 byte shuffles per thread and block to become an fp8 A operand.
        P_REGS: P8 stays in registers instead (p_op, _p8_operand: no shuffles, no shared-memory round trip,
        no warpgroup barrier), on vt quantised with key_perm. Returns the new state."""
        STAGES: gl.constexpr = k_bufs.type.shape[0]
        BLOCK_N: gl.constexpr = k_bufs.type.shape[1]
        s_layout: gl.constexpr = s.type.layout
        st = j % STAGES
        pst = (j - 1) % STAGES
        mbarrier.wait(k_ready.index(st), (j // STAGES) & 1)
        _take_turn(turn, j, WG)
        s = warpgroup_mma(q_smem, k_bufs.index(st).permute((1, 0)),
                          gl.full([s.type.shape[0], BLOCK_N], MAGIC_I, gl.int32, s_layout), is_async=True)
        mbarrier.wait(v_ready.index(pst), ((j - 1) // STAGES) & 1)
        if P_REGS:
            pv = warpgroup_mma(p_op, v_bufs.index(pst).permute((1, 0)), pv, use_acc=False, is_async=True)
        else:
            pv = warpgroup_mma(p_smem, v_bufs.index(pst).permute((1, 0)), pv, use_acc=False, is_async=True)
        _pass_turn(turn, WG)
        s = warpgroup_mma_wait(num_outstanding=1, deps=(s, ))
        mbarrier.arrive(k_empty.index(st), count=1)
        sb = s.to(gl.float32, bitcast=True)
        if MASK:
            sb = _mask_keys(sb, j, Lk)
        sc = qs_row * gl.load(ks_ptr + j)  # [HALF]: this block's score scale (log2 units)
        m_new = gl.maximum(m_i, (gl.max(sb, axis=1) - MAGIC_F) * sc)
        p = gl.exp2(sb * gl.expand_dims(sc, 1) - gl.expand_dims(m_new - P_SHIFT + MAGIC_F * sc, 1))
        alpha = gl.exp2(m_i - m_new)
        l_i = l_i * alpha + gl.sum(p, axis=1)
        l_i = _anchor_pv_wait(l_i)
        o_layout: gl.constexpr = acc.type.layout
        if P_REGS:
            # (p_op cannot be a dep: the wait's lowering takes no 8-bit values; ptxas keeps a wgmma's A registers
            # until its wait_group, or serialises the wgmmas with a warning, which the SASS test looks for)
            pv = warpgroup_mma_wait(num_outstanding=0, deps=(pv, ))
            mbarrier.arrive(v_empty.index(pst), count=1)
            p_op = _p8_operand(p, o_layout)
        else:
            pv = warpgroup_mma_wait(num_outstanding=0, deps=(pv, ))
            mbarrier.arrive(v_empty.index(pst), count=1)
            _store_p8(p_smem, p)
        acc = acc * gl.expand_dims(gl.convert_layout(alpha_prev, gl.SliceLayout(1, o_layout)), 1) + pv
        return s, pv, m_new, l_i, acc, alpha, p_op

    @gluon.jit
    def _consumer8(q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs, p_bufs, q_ready, k_ready, k_empty, v_ready,
                   v_empty, turn, row_q, row_k, col, row_v, n_blocks, o_ptr, stride_ob, stride_ol, stride_oh, b, h, Lq,
                   Lk, qs_ptr, ks_ptr, vs_ptr, WG: gl.constexpr, P_REGS: gl.constexpr):
        """The 8-bit consumer: the bf16 consumer's schedule (turns, peeled masked block) with the 8-bit
        arithmetic; o = acc / l * scale_v + mean_v. P_REGS: see _step8."""
        HALF: gl.constexpr = q_desc.block_type.shape[0]
        HEAD_D: gl.constexpr = q_desc.block_type.shape[1]
        BLOCK_N: gl.constexpr = k_desc.block_type.shape[0]
        STAGES: gl.constexpr = k_bufs.type.shape[0]
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, BLOCK_N, 32])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, HEAD_D, 32])
        q_smem = q_bufs.index(WG)
        p_smem = p_bufs.index(WG)
        n_full = Lk // BLOCK_N
        rows = (row_q - b * Lq + WG * HALF) + gl.arange(0, HALF, layout=gl.SliceLayout(1, s_layout))
        qs_row = gl.load(qs_ptr + rows, mask=rows < Lq, other=1.0)  # per-row q scale, log2(e)/sqrt(D) in

        mbarrier.wait(q_ready, 0)
        mbarrier.wait(k_ready.index(0), 0)
        _take_turn(turn, 0, WG)
        s = warpgroup_mma(q_smem, k_bufs.index(0).permute((1, 0)),
                          gl.full([HALF, BLOCK_N], MAGIC_I, gl.int32, s_layout), is_async=True)
        _pass_turn(turn, WG)
        s = warpgroup_mma_wait(num_outstanding=0, deps=(s, ))
        mbarrier.arrive(k_empty.index(0), count=1)
        sb = s.to(gl.float32, bitcast=True)
        if n_full == 0:
            sb = _mask_keys(sb, 0, Lk)
        sc = qs_row * gl.load(ks_ptr)
        m_i = (gl.max(sb, axis=1) - MAGIC_F) * sc
        p = gl.exp2(sb * gl.expand_dims(sc, 1) - gl.expand_dims(m_i - P_SHIFT + MAGIC_F * sc, 1))
        l_i = gl.sum(p, axis=1)
        if P_REGS:
            p_op = _p8_operand(p, o_layout)
        else:
            _store_p8(p_smem, p)
            p_op = 0  # (unused)
        acc = gl.zeros([HALF, HEAD_D], gl.float32, o_layout)
        pv = gl.zeros([HALF, HEAD_D], gl.float32, o_layout)
        alpha = gl.full([HALF], 1.0, gl.float32, gl.SliceLayout(1, s_layout))

        for j in range(1, n_full):
            s, pv, m_i, l_i, acc, alpha, p_op = _step8(q_smem, k_bufs, v_bufs, p_smem, k_ready, k_empty, v_ready,
                                                       v_empty, turn, j, Lk, ks_ptr, qs_row, s, pv, m_i, l_i, acc,
                                                       alpha, p_op, WG, False, P_REGS)
        if n_full >= 1 and n_full < n_blocks:
            s, pv, m_i, l_i, acc, alpha, p_op = _step8(q_smem, k_bufs, v_bufs, p_smem, k_ready, k_empty, v_ready,
                                                       v_empty, turn, n_full, Lk, ks_ptr, qs_row, s, pv, m_i, l_i,
                                                       acc, alpha, p_op, WG, True, P_REGS)

        last = n_blocks - 1
        mbarrier.wait(v_ready.index(last % STAGES), (last // STAGES) & 1)
        _take_turn(turn, n_blocks, WG)
        if P_REGS:
            pv = warpgroup_mma(p_op, v_bufs.index(last % STAGES).permute((1, 0)), pv, use_acc=False, is_async=True)
        else:
            pv = warpgroup_mma(p_smem, v_bufs.index(last % STAGES).permute((1, 0)), pv, use_acc=False,
                               is_async=True)
        _pass_turn(turn, WG)
        pv = warpgroup_mma_wait(num_outstanding=0, deps=(pv, ))
        mbarrier.arrive(v_empty.index(last % STAGES), count=1)
        acc = acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_layout)), 1) + pv

        cols_o = gl.arange(0, HEAD_D, layout=gl.SliceLayout(0, o_layout))
        vscale = gl.load(vs_ptr + cols_o)
        vmean = gl.load(vs_ptr + HEAD_D + cols_o)
        inv_l = gl.convert_layout(1.0 / l_i, gl.SliceLayout(1, o_layout))
        o = acc * gl.expand_dims(inv_l, 1) * gl.expand_dims(vscale, 0) + gl.expand_dims(vmean, 0)
        o_base = o_ptr + b.to(gl.int64) * stride_ob + h.to(gl.int64) * stride_oh  # int64: B*Lq*H*D may pass 2^31
        _store_rows(o, o_base, row_q - b * Lq + WG * HALF, Lq, stride_ol)

    @gluon.jit
    def _consumer8_0(q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs, p_bufs, q_ready, k_ready, k_empty, v_ready,
                     v_empty, turn, row_q, row_k, col, row_v, n_blocks, o_ptr, stride_ob, stride_ol, stride_oh, b, h, Lq,
                     Lk, qs_ptr, ks_ptr, vs_ptr):
        _consumer8(q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs, p_bufs, q_ready, k_ready, k_empty, v_ready,
                   v_empty, turn, row_q, row_k, col, row_v, n_blocks, o_ptr, stride_ob, stride_ol, stride_oh, b, h, Lq,
                   Lk, qs_ptr, ks_ptr, vs_ptr, 0, False)

    @gluon.jit
    def _consumer8_1(q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs, p_bufs, q_ready, k_ready, k_empty, v_ready,
                     v_empty, turn, row_q, row_k, col, row_v, n_blocks, o_ptr, stride_ob, stride_ol, stride_oh, b, h, Lq,
                     Lk, qs_ptr, ks_ptr, vs_ptr):
        _consumer8(q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs, p_bufs, q_ready, k_ready, k_empty, v_ready,
                   v_empty, turn, row_q, row_k, col, row_v, n_blocks, o_ptr, stride_ob, stride_ol, stride_oh, b, h, Lq,
                   Lk, qs_ptr, ks_ptr, vs_ptr, 1, False)

    @gluon.jit
    def _consumer8p_0(q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs, p_bufs, q_ready, k_ready, k_empty, v_ready,
                      v_empty, turn, row_q, row_k, col, row_v, n_blocks, o_ptr, stride_ob, stride_ol, stride_oh, b, h,
                      Lq, Lk, qs_ptr, ks_ptr, vs_ptr):
        """_consumer8_0 with P in registers (a partition's arguments cannot carry a constexpr)."""
        _consumer8(q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs, p_bufs, q_ready, k_ready, k_empty, v_ready,
                   v_empty, turn, row_q, row_k, col, row_v, n_blocks, o_ptr, stride_ob, stride_ol, stride_oh, b, h, Lq,
                   Lk, qs_ptr, ks_ptr, vs_ptr, 0, True)

    @gluon.jit
    def _consumer8p_1(q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs, p_bufs, q_ready, k_ready, k_empty, v_ready,
                      v_empty, turn, row_q, row_k, col, row_v, n_blocks, o_ptr, stride_ob, stride_ol, stride_oh, b, h,
                      Lq, Lk, qs_ptr, ks_ptr, vs_ptr):
        _consumer8(q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs, p_bufs, q_ready, k_ready, k_empty, v_ready,
                   v_empty, turn, row_q, row_k, col, row_v, n_blocks, o_ptr, stride_ob, stride_ol, stride_oh, b, h, Lq,
                   Lk, qs_ptr, ks_ptr, vs_ptr, 1, True)

    @gluon.jit
    def _attn8_fwd_gluon(q_desc, k_desc, v_desc, o_ptr, qs_ptr, ks_ptr, vs_ptr, stride_ob, stride_ol, stride_oh,
                         H, Lq, Lk, n_blk, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                         CONSUMER_REGS: gl.constexpr, PINGPONG: gl.constexpr, P_REGS: gl.constexpr):
        """One CTA per (128 query rows, batch x head) on quantize_qkv's q8 [B*Lq, H*D], k8 [B*Lk, H*D] and
        vt [B*H*D, Lk_pad] (2D TMA views; P_REGS: quantised with key_perm), scales qs [B, H, Lq], ks [B, H,
        n_blk], vs [B, H, 2, D]."""
        HALF: gl.constexpr = BLOCK_M // 2
        HEAD_D: gl.constexpr = q_desc.block_type.shape[1]
        pid_m = gl.program_id(0)
        bh = gl.program_id(1)
        b = bh // H
        h = bh % H
        row_q = b * Lq + pid_m * BLOCK_M
        row_k = b * Lk
        col = h * HEAD_D
        row_v = bh * HEAD_D
        n_blocks = gl.cdiv(Lk, BLOCK_N)

        q_bufs = gl.allocate_shared_memory(q_desc.dtype, [2, HALF, HEAD_D], q_desc.layout)
        k_bufs = gl.allocate_shared_memory(k_desc.dtype, [STAGES, BLOCK_N, HEAD_D], k_desc.layout)
        v_bufs = gl.allocate_shared_memory(v_desc.dtype, [STAGES, HEAD_D, BLOCK_N], v_desc.layout)
        p_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([HALF, BLOCK_N], gl.float8e4nv)
        p_bufs = gl.allocate_shared_memory(gl.float8e4nv, [2, HALF, BLOCK_N], p_layout)
        q_ready, k_ready, k_empty, v_ready, v_empty, turn = _barriers(STAGES, PINGPONG)

        common = (q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs, p_bufs, q_ready, k_ready, k_empty, v_ready,
                  v_empty, turn, row_q, row_k, col, row_v, n_blocks, o_ptr, stride_ob, stride_ol, stride_oh, b, h, Lq, Lk,
                  qs_ptr + bh * Lq, ks_ptr + bh * n_blk, vs_ptr + bh * 2 * HEAD_D)
        produce = (q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs, q_ready, k_ready, k_empty, v_ready, v_empty, row_q,
                   row_k, col, row_v, n_blocks)
        if P_REGS:  # (the partitions are chosen here: their arguments cannot carry a constexpr)
            gl.warp_specialize([(_consumer8p_0, common), (_consumer8p_1, common), (_producer, produce)], [4, 1],
                               [CONSUMER_REGS, 24])
        else:
            gl.warp_specialize([(_consumer8_0, common), (_consumer8_1, common), (_producer, produce)], [4, 1],
                               [CONSUMER_REGS, 24])


def _descriptor_2d(t: torch.Tensor, shape: list, stride0: int, block: list, gl_dtype):
    return TensorDescriptor(t, shape, [stride0, 1], block, gl.NVMMASharedLayout.get_default_for(block, gl_dtype))


def _descriptor(t: torch.Tensor, rows: int):
    """[B, L, H, D] fp16/bf16 as the 2D TMA view [B*L, H*D] (row stride t.stride(1)), blocks [rows, D]."""
    B, L, H, D = t.shape
    return _descriptor_2d(t, [B * L, H * D], t.stride(1), [rows, D],
                          gl.bfloat16 if t.dtype == torch.bfloat16 else gl.float16)


def _descriptors8(q8, k8, vt, block_n: int):
    """2D TMA views: q8 [B*Lq, H*D] and k8 [B*Lk, H*D] (int8, contiguous from quantize_qkv), vt
    [B*H*D, Lk_pad] (e4m3)."""
    B, Lq, H, D = q8.shape
    Lk = k8.shape[1]
    return (_descriptor_2d(q8, [B * Lq, H * D], H * D, [64, D], gl.int8),
            _descriptor_2d(k8, [B * Lk, H * D], H * D, [block_n, D], gl.int8),
            _descriptor_2d(vt, [B * H * D, vt.shape[-1]], vt.shape[-1], [D, block_n], gl.float8e4nv))


def _config(config: str | GluonAttnConfig | None) -> GluonAttnConfig:
    """A config name (None: the default) or a GluonAttnConfig."""
    return config if isinstance(config, GluonAttnConfig) else GLUON_CONFIGS[config or DEFAULT_GLUON_CONFIG]


def _constexprs(cfg: GluonAttnConfig) -> dict:
    """Both kernels' compile-time arguments for `cfg`."""
    return dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, STAGES=cfg.stages, CONSUMER_REGS=cfg.consumer_regs,
                PINGPONG=cfg.pingpong)


def _constexprs8(cfg: GluonAttnConfig) -> dict:
    """The 8-bit kernel's compile-time arguments."""
    return dict(_constexprs(cfg), P_REGS=cfg.p_regs)


_OPTIONS = dict(num_warps=4, maxnreg=MAXNREG)


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if not HAVE_GLUON:
        raise RuntimeError("kernels/attention_gluon.py: this Triton has no Gluon (triton.experimental.gluon)")
    if not gluon_ok(q, k, v):
        raise ValueError(f"kernels/attention_gluon.py: needs CUDA fp16/bf16 q, k, v with head_dim 128 and "
                         f"non-empty L; got {q.dtype} {list(q.shape)}, {list(k.shape)} on {q.device}")


def compile_signature(config: str | GluonAttnConfig, dtype: torch.dtype = torch.bfloat16) -> tuple:
    """(kernel, argument types, constexprs, options) to compile the kernel for a target without a GPU
    (benchmarks/sass_stats.py and the CPU compile test): descriptor types come from host descriptors
    over a small CPU tensor."""
    from triton.runtime.jit import mangle_type
    cfg = _config(config)
    t = torch.empty(1, 64, 2, 128, dtype=dtype)
    ptr = "*bf16" if dtype == torch.bfloat16 else "*fp16"
    types = dict(q_desc=mangle_type(_descriptor(t, cfg.block_m // 2)), k_desc=mangle_type(_descriptor(t, cfg.block_n)),
                 v_desc=mangle_type(_descriptor(t, cfg.block_n)), o_ptr=ptr, qk_scale="fp32")
    return _attn_fwd_gluon, types, _constexprs(cfg), dict(_OPTIONS)


def compile_signature8(config: str | GluonAttnConfig, out_dtype: torch.dtype = torch.bfloat16) -> tuple:
    """compile_signature for the 8-bit kernel."""
    from triton.runtime.jit import mangle_type
    cfg = _config(config)
    q8 = torch.empty(1, 64, 2, 128, dtype=torch.int8)
    vt = torch.empty(1, 2, 128, 128, dtype=torch.float8_e4m3fn)
    qd, kd, vd = _descriptors8(q8, q8, vt, cfg.block_n)
    types = dict(q_desc=mangle_type(qd), k_desc=mangle_type(kd), v_desc=mangle_type(vd),
                 o_ptr="*bf16" if out_dtype == torch.bfloat16 else "*fp16", qs_ptr="*fp32", ks_ptr="*fp32",
                 vs_ptr="*fp32")
    return _attn8_fwd_gluon, types, _constexprs8(cfg), dict(_OPTIONS)


def attention_8bit_gluon_quantized(quantized: tuple, Lk: int, out: torch.Tensor,
                                   config: str | GluonAttnConfig | None = None) -> torch.Tensor:
    """The 8-bit Gluon kernel on kernels/attention_8bit.quantize_qkv's output (quantised with block_n =
    the config's block_n, FP8 v, key_perm = the config's p_regs) into out [B, Lq, H, D] (unit last stride). Same arithmetic as
    attention_8bit.attention_8bit_quantized, except that the keys past Lk are masked instead of
    corrected for."""
    if not HAVE_GLUON:
        raise RuntimeError("kernels/attention_gluon.py: this Triton has no Gluon (triton.experimental.gluon)")
    cfg = _config(config)
    q8, qs, k8, ks, vt, vs = quantized
    B, Lq, H, D = q8.shape
    n_blk = ks.shape[-1]
    if vs is None or vt.dtype != torch.float8_e4m3fn or vt.shape[-1] != n_blk * cfg.block_n or D != 128:
        raise ValueError(f"kernels/attention_gluon.py: the 8-bit kernel needs quantize_qkv(..., block_n="
                         f"{cfg.block_n}, quant_v=True) output at head_dim 128; got v {vt.dtype} "
                         f"{list(vt.shape)}, {n_blk} key blocks, D {D}")
    if not (q8.is_contiguous() and k8.is_contiguous() and vt.is_contiguous()) or out.stride(3) != 1:
        raise ValueError("kernels/attention_gluon.py: q8, k8, vt must be contiguous and out needs a unit "
                         "last stride")
    qd, kd, vd = _descriptors8(q8, k8, vt, cfg.block_n)
    _attn8_fwd_gluon[(triton.cdiv(Lq, cfg.block_m), B * H)](
        qd, kd, vd, out, qs, ks, vs, out.stride(0), out.stride(1), out.stride(2), H, Lq, Lk, n_blk,
        **_constexprs8(cfg), **_OPTIONS)
    return out


def attention_8bit_gluon(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         config: str | GluonAttnConfig | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Quantises q, k, v (kernels/attention_8bit.quantize_qkv) and runs the 8-bit Gluon kernel. q [B, Lq,
    H, D], k/v [B, Lk, H, D], head_dim 128, fp16/bf16 on an sm90 GPU; returns [B, Lq, H, D]."""
    from .attention_8bit import quantize_qkv
    cfg = _config(config)
    _check_inputs(q, k, v)
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    return attention_8bit_gluon_quantized(quantize_qkv(q, k, v, cfg.block_n, key_perm=cfg.p_regs), k.shape[1], out,
                                          cfg)


def attention_gluon(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: str | GluonAttnConfig | None = None,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """Launches the Gluon kernel (config name or GluonAttnConfig) into `out` (contiguous [B, Lq, H, D] when
    None). q [B, Lq, H, D], k/v [B, Lk, H, D]; head_dim 128, fp16/bf16, sm90. Not a custom op: the ops in
    kernels/attention.py call it."""
    cfg = _config(config)
    _check_inputs(q, k, v)
    q, k, v = (t if _rows_view_ok(t) else t.contiguous() for t in (q, k, v))
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    if out is None:
        out = torch.empty((B, Lq, H, D), dtype=q.dtype, device=q.device)
    if out.stride(3) != 1:
        raise ValueError("kernels/attention_gluon.py: out needs a unit last stride")
    grid = (triton.cdiv(Lq, cfg.block_m), B * H)
    _attn_fwd_gluon[grid](
        _descriptor(q, cfg.block_m // 2), _descriptor(k, cfg.block_n), _descriptor(v, cfg.block_n),
        out, out.stride(0), out.stride(1), out.stride(2), H, Lq, Lk, LOG2E / math.sqrt(D),
        **_constexprs(cfg), **_OPTIONS)
    return out
