"""Microbenchmark of the DiT hot-path Triton kernels at the Wan2.1 shapes (480p 81 frames: L = 32760).

Memory-bound ops (modulate, gate_residual_modulate, qk_norm_rope and its tile/chunk/packed variants, cross-attention's
rms_norm; C = 1536 and 5120; the VAE decoder's fused RMSNorm + SiLU at two decoder shapes) against their
eager PyTorch references: GB/s (bytes read + written) and the fraction of a device-to-device copy measured
in the same run. Attention (12 and 40 heads x 128 at L = 32760; cross-attention Lk = 512): every Triton config
of kernels/attention.py ATTN_CONFIGS, SDPA flash (FA2) and SDPA cuDNN, in TFLOP/s (4 Lq Lk D H) with the
ratio to cuDNN; each checked against an fp32 SDPA reference (max abs error, and the 2x-of-SDPA rule); the
Gluon configs (kernels/attention_gluon.py GLUON_CONFIGS, sm90) last of all. 8-bit attention
(kernels/attention_8bit.py ATTN8_CONFIGS, the Gluon ones included where they can run; self-attention
shapes): with and without the q/k/v quantisation, TOPS, ratio to cuDNN bf16, rel. L2 error vs fp32.

Appends its rows to <out>/kernels.csv and writes <out>/kernels_summary.json (out: --out, else $OUT, else
benchmarks/out).
Summary: modulate_bw_frac / qk_norm_rope_bw_frac / rms_norm_bw_frac / vae_norm_bw_frac (the lowest fraction
of copy bandwidth over the shapes), attn_bf16_ratio_vs_cudnn (our best correct kernel's TFLOP/s, Triton or Gluon, / cuDNN's, 12 heads,
L = 32760; > 1: faster), attn_bf16_best_ours, attn_best_impl, attn_best_triton_config, attn_triton_tflops,
attn_gluon_best_config, attn_gluon_tflops, attn_gluon_ratio_vs_cudnn, attn_gluon_ratio_vs_triton,
attn_cudnn_tflops, attn_8bit_ratio_vs_cudnn and
attn_8bit_relerr (fastest config under 6% error, quantisation included), attn_8bit_best_config.
Without CUDA it prints that it needs a GPU and exits 0; --dry-run runs the whole code path on tiny CPU
shapes through the Triton interpreter (wall-clock timing, numbers meaningless).
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import re
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the sibling csv_history, also when imported
from csv_history import append_csv, run_env  # noqa: E402

try:
    import lightx2v_engine  # noqa: F401  (installed, e.g. pip install -e .)
except ImportError:  # (run from a checkout without the install: the engine from the source tree)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

L = 32760
L720 = 75600
HEAD_D = 128
# a memory-bound kernel "faster" than this fraction of the device copy skipped work: counted as wrong
MAX_BW_FRAC = 1.05
# attention's bound on the max abs error vs fp32 where no SDPA backend ran to give the usual 2x rule
ATTN_ABS_MAX_ERR = 2e-2
# the 8-bit configs --quick times (sass_stats.py: the f16x2 and warp-specialised polynomial loops are longer)
QUICK_ATTN8 = ("ws_128x128_w4_s2", "ws_128x128_w4_s3", "ws_128x128_w4_s3_i2f", "ws_128x128_w4_s2_pv16",
               "tma_128x128_w8_s3_poly", "gluon_fa3_128x128_s2", "gluon_fa3_128x128_s3", "gluon_fa3_128x128_s3_preg")
CSV_FIELDS = ["op", "shape", "impl", "ms", "tflops_or_gbps", "unit", "ratio", "ratio_kind", "max_err", "ok",
              "gpu", "torch", "triton", "commit", "date", "note"]


# ----------------------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------------------

def _bench_ms(fn, rep_ms: int = 100) -> float:
    """Median milliseconds (CUDA events through triton.testing.do_bench; wall clock on the CPU)."""
    if torch.cuda.is_available():
        from triton.testing import do_bench
        return float(do_bench(fn, warmup=25, rep=rep_ms, return_mode="median"))
    t0 = time.perf_counter()  # (the CPU dry run: one call through the interpreter, which compiles nothing)
    fn()
    return (time.perf_counter() - t0) * 1e3


def _copy_gbps(nbytes: int, device: str) -> float:
    """Device-to-device copy bandwidth, GB/s of bytes read + written."""
    a = torch.empty(nbytes, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    ms = _bench_ms(lambda: b.copy_(a))
    return 2 * nbytes / (ms * 1e-3) / 1e9


# ----------------------------------------------------------------------------------------------------
# memory-bound ops
# ----------------------------------------------------------------------------------------------------

def _mod_views(B: int, C: int, device: str):
    modulation = torch.randn(1, 6, C, device=device) / C ** 0.5
    return (modulation + torch.randn(B, 6, C, device=device)).chunk(6, dim=1)


def _memory_op_rows(op: str, shape: str, fn, ref_fn, ref32_fn, nbytes: int, device: str,
                    copy_gbps: float) -> list[dict]:
    """A memory-bound kernel `fn` and its eager reference `ref_fn` (outputs a tensor or a tuple): the
    kernel's error vs `ref32_fn`'s fp32 result under the rule, both timings, GB/s and the fraction of the
    copy bandwidth; one "triton" and one "torch_eager" row."""
    # kernel vs fp32 <= 2 x (eager run dtype vs fp32) + one bf16 ulp of the largest value: the eager
    # reference rounds only its output, so a kernel whose FMAs flip one rounding sits at exactly 2x.
    # The CPU interpreter truncates fp32 -> bf16 (the GPU rounds to nearest), hence 4 x there.
    factor = 2.0 if device == "cuda" else 4.0
    tup = lambda t: t if isinstance(t, tuple) else (t,)  # noqa: E731
    fn, checked = fn if isinstance(fn, tuple) else (fn, fn)  # (timed, checked: e.g. its outputs NaN first)
    got, lowp, ref32 = tup(checked()), tup(ref_fn()), tup(ref32_fn())
    errs = [(a.float() - b.float()).abs().max().item() for a, b in zip(got, ref32)]
    # (Python's max keeps its first argument against a NaN: an output left NaN, e.g. k, must fail the row)
    err = max(errs) if all(math.isfinite(e) for e in errs) else float("nan")
    base = max((a.float() - b.float()).abs().max().item() for a, b in zip(lowp, ref32))
    ulp = max(b.float().abs().max().item() for b in ref32) * 2.0 ** -8
    ok = err <= factor * base + ulp
    del got, lowp, ref32
    ms_k = _bench_ms(fn)
    ms_r = _bench_ms(ref_fn)
    gbps = nbytes / (ms_k * 1e-3) / 1e9
    return [dict(op=op, shape=shape, impl="triton", ms=ms_k, tflops_or_gbps=gbps, unit="GB/s",
                 ratio=gbps / copy_gbps, ratio_kind="frac_of_copy_bw", max_err=err, ok=ok,
                 note=f"speedup vs eager {ms_r / ms_k:.2f}x"),
            dict(op=op, shape=shape, impl="torch_eager", ms=ms_r, tflops_or_gbps=nbytes / (ms_r * 1e-3) / 1e9,
                 unit="GB/s", ratio=nbytes / (ms_r * 1e-3) / 1e9 / copy_gbps, ratio_kind="frac_of_copy_bw",
                 max_err=base, ok=True, note="reference")]


def _guarded_rows(op: str, shape: str, *args) -> list[dict]:
    """_memory_op_rows, or one failed "triton" row naming the error (a variant that fails to compile or
    launch costs its own figure, not the section's)."""
    try:
        return _memory_op_rows(op, shape, *args)
    except Exception as e:  # noqa: BLE001 - recorded as a failed row
        return [_failed_row(op, shape, e)]


def _failed_row(op: str, shape: str, e: BaseException) -> dict:
    """The "triton" row of a memory-bound op that failed, naming the error (also printed)."""
    print(f"bench_kernels: {op} {shape} failed: {type(e).__name__}: {e}")
    return dict(op=op, shape=shape, impl="triton", ms=float("nan"), tflops_or_gbps=float("nan"), unit="GB/s",
                ratio=float("nan"), ratio_kind="frac_of_copy_bw", max_err=float("nan"), ok=False,
                note=f"failed: {type(e).__name__}: {e}"[:300])


def bench_memory_ops(Ls: list[int], Cs: list[int], device: str, copy_gbps: float,
                     qk_variants=None, qk_only: bool = False) -> list[dict]:
    """The memory-bound ops at every (L, C); `qk_variants` (default: all of QK_ROPE_IMPLS) the q/k
    norm+RoPE variants timed; `qk_only`: those alone."""
    from lightx2v_engine.kernels import gate_residual_modulate, modulate, rms_norm
    from lightx2v_engine.ops import gate_residual_modulate_ref, modulate_ref, rms_norm_ref
    from lightx2v_engine.kernels.qk_norm_rope import QK_ROPE_IMPLS, launch_qk_norm_rope, qk_norm_rope_ref

    rows = []
    for Lx in Ls:
        for C in Cs:
            H = C // HEAD_D
            shape = f"B1 L{Lx} C{C}"
            shift, scale, gate, *_ = _mod_views(1, C, device)
            x = torch.randn(1, Lx, C, device=device)  # the DiT keeps the residual stream in fp32
            y = torch.randn(1, Lx, C, device=device, dtype=torch.bfloat16)
            bf = torch.bfloat16
            f32 = torch.float32
            cases = {
                # op: (kernel, eager reference in the run dtype, fp32 reference, bytes read + written)
                "modulate": (lambda: modulate(x, shift, scale, 1e-6, bf),
                             lambda: modulate_ref(x, shift, scale, 1e-6, bf),
                             lambda: modulate_ref(x, shift, scale, 1e-6, f32),
                             Lx * C * (4 + 2)),
                "gate_residual_modulate": (lambda: gate_residual_modulate(x, y, gate, shift, scale, 1e-6, bf),
                                           lambda: gate_residual_modulate_ref(x, y, gate, shift, scale, 1e-6, bf),
                                           lambda: gate_residual_modulate_ref(x, y, gate, shift, scale, 1e-6, f32),
                                           Lx * C * (4 + 2 + 4 + 2)),
            }
            q = torch.randn(1, Lx, C, device=device, dtype=bf)
            k = torch.randn(1, Lx, C, device=device, dtype=bf)
            wq, wk = torch.rand(C, device=device) + 0.5, torch.rand(C, device=device) + 0.5
            ang = torch.rand(Lx, HEAD_D // 2, device=device) * 6.3
            cos, sin = ang.cos(), ang.sin()
            qo, ko = torch.empty_like(q), torch.empty_like(k)
            # every variant named explicitly (the op's default may come from a tuned file); "row" is
            # "qk_norm_rope" in the CSV history
            for variant in (QK_ROPE_IMPLS if qk_variants is None else qk_variants):
                def qk_variant(q=q, k=k, wq=wq, wk=wk, cos=cos, sin=sin, qo=qo, ko=ko, H=H, variant=variant):
                    launch_qk_norm_rope(q, k, wq, wk, cos, sin, H, 1e-6, qo, ko, impl=variant)
                    return qo.unflatten(-1, (H, -1)), ko.unflatten(-1, (H, -1))

                def qk_checked(qk_variant=qk_variant, qo=qo, ko=ko):
                    """The checked call: the shared outputs are NaN first, so that a variant that writes
                    nothing (or part) fails instead of passing on the previous variant's results."""
                    qo.fill_(float("nan"))
                    ko.fill_(float("nan"))
                    return qk_variant()
                cases["qk_norm_rope" + ("" if variant == "row" else f"_{variant}")] = (
                    (qk_variant, qk_checked),
                    lambda q=q, k=k, wq=wq, wk=wk, cos=cos, sin=sin, H=H: qk_norm_rope_ref(q, k, wq, wk, cos, sin, H, 1e-6),
                    lambda q=q, k=k, wq=wq, wk=wk, cos=cos, sin=sin, H=H: qk_norm_rope_ref(q.float(), k.float(), wq, wk,
                                                                                          cos, sin, H, 1e-6),
                    4 * Lx * C * 2 + 2 * Lx * HEAD_D // 2 * 4)
            # cross-attention's q/k RMSNorm (no RoPE) over the full width
            cases["rms_norm"] = (lambda: rms_norm(q, wq, 1e-6), lambda: rms_norm_ref(q, wq, 1e-6),
                                 lambda: rms_norm_ref(q.float(), wq, 1e-6), 2 * Lx * C * 2)
            for op, (fn, ref_fn, ref32_fn, nbytes) in cases.items():
                if not qk_only or op.startswith("qk_norm_rope"):
                    rows += _guarded_rows(op, shape, fn, ref_fn, ref32_fn, nbytes, device, copy_gbps)
            del x, y, q, k
    return rows


def _fused_quant_rows(op: str, shape: str, fused, two_pass, nbytes: int, copy_gbps: float) -> list[dict]:
    """A modulation kernel that quantizes its output for an 8-bit linear (`fused`, returning (.., q, scale))
    against the two passes it replaces (`two_pass`: our modulate kernel, then quant.per_token_quant):
    ok when q and the scales are the same bits; one "triton" row (GB/s of its own traffic, fraction of the
    copy bandwidth) and one "two_pass" row."""
    def bits(t):
        return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t
    a, b = fused(), two_pass()
    (qa, sa), (qb, sb) = a[-2:], b[-2:]
    ok = torch.equal(bits(qa.reshape(qb.shape)), bits(qb)) and torch.equal(sa, sb) and bool(torch.isfinite(sa).all())
    err = (qa.reshape(qb.shape).float() * sa - qb.float() * sb).abs().max().item()
    del a, b, qa, qb, sa, sb
    ms_f, ms_t = _bench_ms(fused), _bench_ms(two_pass)
    gbps = nbytes / (ms_f * 1e-3) / 1e9
    return [dict(op=op, shape=shape, impl="triton", ms=ms_f, tflops_or_gbps=gbps, unit="GB/s",
                 ratio=gbps / copy_gbps, ratio_kind="frac_of_copy_bw", max_err=err, ok=ok,
                 note=f"speedup vs modulate + per_token_quant {ms_t / ms_f:.2f}x"),
            dict(op=op, shape=shape, impl="two_pass", ms=ms_t, tflops_or_gbps=float("nan"), unit="GB/s",
                 ratio=ms_t / ms_f, ratio_kind="two_pass_over_fused", max_err=0.0, ok=True,
                 note="modulate kernel, then quant.per_token_quant (" + _per_token_quant_impl() + ")")]


def _per_token_quant_impl() -> str:
    """Which per_token_quant the two-pass baseline ran (the csrc kernel, or its PyTorch reference where the
    extension is not loaded: gpu_check.sh builds it while the kernels are timed)."""
    from lightx2v_engine.csrc_ops import csrc_status
    status = csrc_status()
    return "the csrc kernel" if status == "available" else f"PyTorch reference; csrc {status}"


def bench_fused_quant(Ls: list[int], Cs: list[int], device: str, copy_gbps: float, scheme: str = "fp8") -> list[dict]:
    """modulate_quant / gate_residual_modulate_quant (the 8-bit DiT's linear inputs quantized inside the
    modulation) at every (L, C), against modulate + per_token_quant."""
    from lightx2v_engine.kernels import gate_residual_modulate, gate_residual_modulate_quant, modulate, modulate_quant
    from lightx2v_engine.quant import per_token_quant
    rows = []
    bf = torch.bfloat16
    for Lx in Ls:
        for C in Cs:
            shape = f"B1 L{Lx} C{C}"
            shift, scale, gate, *_ = _mod_views(1, C, device)
            x = torch.randn(1, Lx, C, device=device)
            y = torch.randn(1, Lx, C, device=device, dtype=bf)
            cases = {
                # bytes: x fp32 read, q written (1 byte), the scale; + y read and x' written
                f"modulate_quant_{scheme}": (
                    lambda: modulate_quant(x, shift, scale, 1e-6, bf, scheme),
                    lambda: per_token_quant(modulate(x, shift, scale, 1e-6, bf).view(-1, C), scheme),
                    Lx * C * (4 + 1) + 4 * Lx),
                f"gate_residual_modulate_quant_{scheme}": (
                    lambda: gate_residual_modulate_quant(x, y, gate, shift, scale, 1e-6, bf, scheme),
                    lambda: per_token_quant(gate_residual_modulate(x, y, gate, shift, scale, 1e-6, bf)[1].view(-1, C),
                                            scheme),
                    Lx * C * (4 + 2 + 4 + 1) + 4 * Lx),
            }
            for op, (fused, two_pass, nbytes) in cases.items():
                try:
                    rows += _fused_quant_rows(op, shape, fused, two_pass, nbytes, copy_gbps)
                except Exception as e:  # noqa: BLE001 - recorded as a failed row
                    rows.append(_failed_row(op, shape, e))
            del x, y
    return rows


def bench_vae_norm(shapes: list[tuple[int, int, int, int]], device: str, copy_gbps: float) -> list[dict]:
    """The VAE decoder's fused channel RMSNorm + SiLU (kernels/vae_norm.py) on channels_last_3d
    [1, C, T, H, W] activations against the eager reference (lightx2v_engine.vae.rms_norm_act_ref), bf16."""
    from lightx2v_engine.kernels.vae_norm import rms_norm_act
    from lightx2v_engine.vae import rms_norm_act_ref
    rows = []
    for C, T, Hh, W in shapes:
        x = torch.randn(1, C, T, Hh, W, device=device, dtype=torch.bfloat16).to(
            memory_format=torch.channels_last_3d)
        gamma = (torch.rand(C, 1, 1, 1, device=device) + 0.5).to(torch.bfloat16)
        rows += _guarded_rows("vae_rms_norm_silu", f"B1 C{C} T{T} H{Hh} W{W}",
                                lambda: rms_norm_act(x, gamma, True), lambda: rms_norm_act_ref(x, gamma, True),
                                lambda: rms_norm_act_ref(x.float(), gamma.float(), True), 2 * x.numel() * 2,
                                device, copy_gbps)
        del x
    return rows


# ----------------------------------------------------------------------------------------------------
# attention
# ----------------------------------------------------------------------------------------------------

def attention_ref32(q, k, v):
    """fp32 SDPA reference one head at a time (bounded memory even if SDPA falls back to the math path)."""
    from lightx2v_engine.ops import attention_ref
    return torch.cat([attention_ref(q[:, :, h:h + 1].float(), k[:, :, h:h + 1].float(), v[:, :, h:h + 1].float())
                      for h in range(q.shape[2])], dim=2)


def _sdpa_available(impl: str, device: str) -> bool:
    return device == "cuda" or impl == "sdpa_flash"


def _attn_case(H: int, Lq: int, Lk: int, device: str, dtype):
    """(shape label, q, k, v [1, L, H, 128] random, FLOPs, fp32 reference output)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(1, n, H, HEAD_D, generator=g).to(device=device, dtype=dtype) for n in (Lq, Lk, Lk))
    return f"B1 H{H} D{HEAD_D} Lq{Lq} Lk{Lk}", q, k, v, 4.0 * Lq * Lk * HEAD_D * H, attention_ref32(q, k, v)


def bench_attention(shapes: list[tuple[int, int, int]], configs: list[str], device: str, dtype,
                    cudnn_ms: dict | None = None, gluon_configs: list[str] = ()) -> list[dict]:
    """Triton configs (and Gluon configs, kernels/attention_gluon.py) at each shape against SDPA flash and
    cuDNN. With `cudnn_ms` (shape -> cuDNN ms of an earlier call) SDPA only supplies the error baseline of
    the 2x rule: it is not timed again, and the ratios use the earlier cuDNN time."""
    from lightx2v_engine.kernels.attention import (ATTN_CONFIGS, _sdpa, attention_triton, mean_pad_ok,
                                                   pad_keys_with_mean)
    from lightx2v_engine.kernels.attention_gluon import attention_gluon

    rows = []
    for H, Lq, Lk in shapes:
        shape, q, k, v, flops, ref32 = _attn_case(H, Lq, Lk, device, dtype)
        impls = {f"triton:{c}": (lambda c=c: attention_triton(q, k, v, c)) for c in configs}
        impls.update({f"gluon:{c}": (lambda c=c: attention_gluon(q, k, v, c)) for c in gluon_configs})
        # mean-padded configs run as self-attention does: K padded to whole blocks with its mean, a pass
        # timed with the kernel (padded() below), as the DiT runs it after the norm+RoPE pass
        kp = None
        for c in configs:
            cfg = ATTN_CONFIGS[c]
            if cfg.mean_pad and Lq == Lk and mean_pad_ok(cfg, Lk, torch.device(device)):
                if kp is None:
                    kp = torch.empty((1, -(-Lk // cfg.block_n) * cfg.block_n, H, HEAD_D), dtype=dtype, device=device)
                    kp[:, :Lk] = k
                    pad_keys_with_mean(kp, Lk)
                def padded(c=c, kp=kp):  # (the padding pass is timed with the kernel: the DiT runs both)
                    pad_keys_with_mean(kp, Lk)
                    return attention_triton(q, kp, v, c, k_mean_padded=True)
                impls[f"triton:{c}"] = padded
        sdpa = [sd for sd in ("sdpa_flash", "sdpa_cudnn") if _sdpa_available(sd, device)]
        for sd in sdpa:
            impls[sd] = (lambda sd=sd: _sdpa(q, k, v, sd))
        errs, results = {}, {}
        for name, fn in impls.items():
            try:
                # the caching allocator hands the next output the block just freed: NaN there, so that a
                # kernel that writes nothing (or part) fails instead of passing on the previous one's output
                torch.full_like(q, float("nan"))
                err = (fn().float() - ref32).abs().max().item()
                ms = _bench_ms(fn, rep_ms=200) if (cudnn_ms is None or name not in sdpa) else None
            except Exception as e:  # a config that does not compile on this GPU is reported, not fatal
                rows.append(dict(op="attention", shape=shape, impl=name, ms=float("nan"),
                                 tflops_or_gbps=float("nan"), unit="TFLOP/s", ratio=float("nan"),
                                 ratio_kind="vs_cudnn", max_err=float("nan"), ok=False,
                                 note=f"failed: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"))
                continue
            errs[name] = err
            if ms is not None:
                results[name] = ms
        base_err = min([errs[s] for s in sdpa if s in errs] or [float("inf")])
        base_ms = results.get("sdpa_cudnn") if cudnn_ms is None else cudnn_ms.get(shape)
        for name, ms in results.items():
            # (no SDPA error to compare with: an absolute bound on the max error vs fp32, not a free pass)
            ok = errs[name] <= (2 * base_err + 1e-3 if math.isfinite(base_err) else ATTN_ABS_MAX_ERR)
            rows.append(dict(op="attention", shape=shape, impl=name, ms=ms, tflops_or_gbps=flops / (ms * 1e-3) / 1e12,
                             unit="TFLOP/s", ratio=(base_ms / ms) if base_ms else float("nan"),
                             ratio_kind="vs_cudnn", max_err=errs[name], ok=ok,
                             note=f"sdpa err {base_err:.2e}"))
        del q, k, v, ref32, kp
    return rows


def bench_attention_8bit(shapes: list[tuple[int, int, int]], configs: list[str], device: str, dtype,
                         cudnn_ms: dict) -> list[dict]:
    """Every 8-bit config (quantisation + kernel, and the kernel alone) at the self-attention shapes; error
    as rel. L2 vs fp32 attention (ok: < 0.06 and finite); ratio to cuDNN bf16 from the same run."""
    from lightx2v_engine.kernels.attention_8bit import (ATTN8_CONFIGS, attention_8bit_quantized,
                                                        attention_8bit_triton, fp8_supported, quantize_for)
    from lightx2v_engine.kernels.attention_8bit import _resolve as _resolve8
    G = importlib.import_module("lightx2v_engine.kernels.attention_gluon")
    rows = []
    if not fp8_supported(torch.device(device)):
        return rows
    for H, Lq, Lk in shapes:
        shape, q, k, v, flops, ref32 = _attn_case(H, Lq, Lk, device, dtype)
        base = cudnn_ms.get(shape)
        for c in configs:
            cfg = ATTN8_CONFIGS[c]
            if cfg.gluon and not G.available():  # it would time the Triton fallback under the Gluon name
                continue
            out = torch.full_like(q, float("nan"))  # (a config that writes nothing must not pass on old data)
            try:
                quant = quantize_for(q, k, v, cfg)
                res = attention_8bit_triton(q, k, v, c, out=out).float()
                if cfg.gluon and G.failure():  # it failed and fell back to the Triton kernel
                    raise RuntimeError(G.failure())
                err = ((res - ref32).norm() / ref32.norm()).item()
                del res
                ms_all = _bench_ms(lambda: attention_8bit_triton(q, k, v, c, out=out), rep_ms=200)
                ms_kernel = _bench_ms(lambda: attention_8bit_quantized(quant, Lk, out, c), rep_ms=200)
            except Exception as e:  # a config that does not compile on this GPU is reported, not fatal
                rows.append(dict(op="attention_8bit", shape=shape, impl=f"triton8:{c}", ms=float("nan"),
                                 tflops_or_gbps=float("nan"), unit="TOPS", ratio=float("nan"), ratio_kind="vs_cudnn",
                                 max_err=float("nan"), ok=False,
                                 note=f"failed: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"))
                continue
            ok = math.isfinite(err) and err < 0.06
            ran = _resolve8(cfg, torch.device(device))  # what launched (e.g. ws_ configs without WS on a GPU)
            ran_as = "" if ran == cfg else (f"; ran as num_warps {ran.num_warps}, warp_specialize "
                                            f"{ran.warp_specialize}")
            for impl, ms in ((f"triton8:{c}", ms_all), (f"triton8_kernel_only:{c}", ms_kernel)):
                rows.append(dict(op="attention_8bit", shape=shape, impl=impl, ms=ms,
                                 tflops_or_gbps=flops / (ms * 1e-3) / 1e12, unit="TOPS",
                                 ratio=(base / ms) if base else float("nan"), ratio_kind="vs_cudnn", max_err=err,
                                 ok=ok, note="err = rel. L2 vs fp32" + ("" if "only" not in impl else "; q/k/v pre-quantised")
                                 + ran_as))
            del quant
        del q, k, v, ref32
    return rows


# ----------------------------------------------------------------------------------------------------
# summary / output
# ----------------------------------------------------------------------------------------------------

ROPE_ATTN_CONFIGS = ((128, 64, 8, 2), (128, 128, 8, 2), (64, 64, 4, 2), (128, 64, 4, 3))  # the first: the default


def bench_self_attn_rope(shapes: list[tuple[int, int, int]], device: str, dtype, configs=ROPE_ATTN_CONFIGS,
                         attn_config: str | None = None, qk_impl: str | None = None) -> list[dict]:
    """Self-attention with q/k RMSNorm + RoPE, [B, L, C] projections in, two placements of the norm+RoPE,
    both through the self_attention op as the DiT calls it: "pass" (one norm+RoPE pass writing rotated q/k,
    then the Triton attention; with `qk_impl` and `attn_config`, the variant and config this run measured
    fastest, i.e. what its tuned file would run) against "prologue" (kernels/attention_rope.py, the default
    tile config; the other `configs` through the kernel's launcher). ratio = pass ms / this ms."""
    from lightx2v_engine.kernels.attention import _self_attention_op, self_attention_ref, set_attention_impl
    from lightx2v_engine.kernels.attention_rope import RopeAttnConfig, attention_rope_prologue, set_rope_placement
    from lightx2v_engine.kernels.qk_norm_rope import qk_rope_impl, set_qk_rope_impl

    default = RopeAttnConfig()
    set_attention_impl(impl="triton", config=attn_config or "default")
    set_qk_rope_impl(qk_impl or "default")
    baseline = f"pass: q/k norm+RoPE {qk_rope_impl(torch.device(device))}, attention triton " \
               f"{attn_config or 'default config'}"
    rows = []
    try:
        for H, Lq, _ in shapes:
            C = H * HEAD_D
            g = torch.Generator(device="cpu").manual_seed(0)
            q, k, v = (torch.randn(1, Lq, C, generator=g).to(device=device, dtype=dtype) for _ in range(3))
            wq = (1.0 + 0.1 * torch.randn(C, generator=g)).to(device)
            wk = (1.0 + 0.1 * torch.randn(C, generator=g)).to(device)
            ang = torch.rand(Lq, HEAD_D // 2, generator=g) * 6.0
            cos, sin = ang.cos().to(device), ang.sin().to(device)
            ref32 = self_attention_ref(q.float(), k.float(), v.float(), wq, wk, cos, sin, H)
            shape = f"B1 H{H} D{HEAD_D} L{Lq}"
            flops = 4.0 * Lq * Lq * C
            op = lambda: _self_attention_op(q, k, v, wq, wk, cos, sin, H, 1e-6)  # noqa: E731
            impls = {"pass": ("pass", op), f"prologue:{default.name}": ("prologue", op)}
            for bm, bn, w, st in configs:
                cfg = RopeAttnConfig(bm, bn, w, st)
                if cfg != default:
                    impls[f"prologue:{cfg.name}"] = ("pass", lambda cfg=cfg: attention_rope_prologue(
                        q, k, v, wq, wk, cos, sin, H, config=cfg))
            errs, ms = {}, {}
            for name, (placement, fn) in impls.items():
                set_rope_placement(placement)
                try:
                    errs[name] = (fn().float() - ref32).abs().max().item()
                    ms[name] = _bench_ms(fn, rep_ms=200)
                except Exception as e:  # a config that does not compile here is reported, not fatal
                    rows.append(dict(op="self_attn_rope", shape=shape, impl=name, ms=float("nan"),
                                     tflops_or_gbps=float("nan"), unit="TFLOP/s", ratio=float("nan"),
                                     ratio_kind="vs_pass", max_err=float("nan"), ok=False,
                                     note=f"failed: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"))
            base_err, base_ms = errs.get("pass", float("inf")), ms.get("pass")
            bound = 2 * base_err + 1e-3 if math.isfinite(base_err) else ATTN_ABS_MAX_ERR
            for name, t in ms.items():
                rows.append(dict(op="self_attn_rope", shape=shape, impl=name, ms=t,
                                 tflops_or_gbps=flops / (t * 1e-3) / 1e12, unit="TFLOP/s",
                                 ratio=(base_ms / t) if base_ms else float("nan"), ratio_kind="vs_pass",
                                 max_err=errs[name], ok=errs[name] <= bound,
                                 note=baseline if name == "pass" else "norm+RoPE in the attention kernel"))
            del q, k, v, ref32
    finally:
        set_rope_placement("default")
        set_attention_impl(impl="default", config="default")
        set_qk_rope_impl("default")
    return rows


def _min_frac(rows: list[dict], op: str) -> float | None:
    """The op's worst fraction of copy bandwidth; None if it failed or was wrong at any shape (it must not
    become a tuned default on the strength of the shapes it got right), or claims more than MAX_BW_FRAC of
    the copy's bandwidth at any (a kernel that skipped its work)."""
    kern = [r for r in rows if r["op"] == op and r["impl"] == "triton"]
    ok = kern and all(r["ok"] and r["ratio"] <= MAX_BW_FRAC for r in kern)
    return min(r["ratio"] for r in kern) if ok else None


def qk_variant_fracs(rows: list[dict]) -> dict[str, float | None]:
    """{q/k norm+RoPE variant: _min_frac} for the variants in rows ("row" is op "qk_norm_rope", the others
    "qk_norm_rope_<variant>")."""
    ops = dict.fromkeys(r["op"] for r in rows if r["op"].startswith("qk_norm_rope"))
    return {"row" if op == "qk_norm_rope" else op[len("qk_norm_rope_"):]: _min_frac(rows, op) for op in ops}


def summarize(rows: list[dict], main_shape: str) -> dict:
    """The summary keys from the rows (None where a number is missing)."""
    def min_frac(op):
        return _min_frac(rows, op)

    qk_fracs = qk_variant_fracs(rows)
    fused_ok = {(r["op"], r["shape"]) for r in rows if r["impl"] == "triton" and r["op"].endswith("_fp8")
                and r["op"].startswith(("modulate_quant", "gate_residual_modulate_quant")) and r["ok"]}
    two_pass = [(r["ratio"], "the csrc kernel" in r.get("note", "")) for r in rows if r["impl"] == "two_pass"
                and (r["op"], r["shape"]) in fused_ok and r["ratio"] == r["ratio"]]

    attn = [r for r in rows if r["op"] == "attention" and r["shape"] == main_shape and r["ok"]
            and not math.isnan(r["ms"])]
    tri = [r for r in attn if r["impl"].startswith("triton:")]
    best_tri = min(tri, key=lambda r: r["ms"]) if tri else None
    glu = [r for r in attn if r["impl"].startswith("gluon:")]
    best_glu = min(glu, key=lambda r: r["ms"]) if glu else None
    best_ours = min([r for r in (best_tri, best_glu) if r], key=lambda r: r["ms"], default=None)
    cudnn = next((r for r in attn if r["impl"] == "sdpa_cudnn"), None)
    best = min(attn, key=lambda r: r["ms"]) if attn else None
    cross_shape = main_shape.rsplit("Lk", 1)[0] + "Lk512"
    cross = [r for r in rows if r["op"] == "attention" and r["shape"] == cross_shape and r["ok"]
             and not math.isnan(r["ms"])]
    a8 = [r for r in rows if r["op"] == "attention_8bit" and r["shape"] == main_shape and r["ok"]
          and r["impl"].startswith("triton8:")]
    best8 = min(a8, key=lambda r: r["ms"]) if a8 else None
    a8k = [r for r in rows if r["op"] == "attention_8bit" and r["shape"] == main_shape and r["ok"]
           and r["impl"].startswith("triton8_kernel_only:")]
    best8k = min(a8k, key=lambda r: r["ms"]) if a8k else None
    rope_shape = re.sub(r" Lq(\d+) Lk\d+$", r" L\1", main_shape)  # "B1 H12 D128 L32760"
    rope = [r for r in rows if r["op"] == "self_attn_rope" and r["shape"] == rope_shape and r["ok"]
            and r["impl"].startswith("prologue:") and not math.isnan(r["ms"])]
    from lightx2v_engine.kernels.attention_rope import RopeAttnConfig
    rope_default = next((r for r in rope if r["impl"] == f"prologue:{RopeAttnConfig().name}"), None)
    rope_pass = next((r for r in rows if r["op"] == "self_attn_rope" and r["shape"] == rope_shape
                      and r["impl"] == "pass"), None)
    rope_best = min(rope, key=lambda r: r["ms"]) if rope else None
    return {
        # norm+RoPE inside the attention kernel vs the pass + attention (ratio > 1: the kernel is faster);
        # the default tile config is what the self_attention op runs under LX2V_SELF_ATTN_ROPE=prologue
        "self_attn_rope_prologue_ratio": rope_default["ratio"] if rope_default else None,
        "self_attn_rope_prologue_best": (f"{rope_best['impl'].split(':', 1)[1]} {rope_best['ratio']:.3f}x"
                                         if rope_best else None),
        "self_attn_rope_baseline": rope_pass["note"] if rope_pass else None,
        "modulate_bw_frac": min_frac("modulate"),
        "gate_residual_modulate_bw_frac": min_frac("gate_residual_modulate"),
        # the 8-bit path's modulation with its output quantized in the same pass, and what that saves
        "modulate_quant_bw_frac": min((f for f in (min_frac("modulate_quant_fp8"),
                                                   min_frac("gate_residual_modulate_quant_fp8")) if f is not None),
                                      default=None),
        # against the engine's two passes (per_token_quant's csrc kernel), from shapes whose fused output
        # agreed; against its PyTorch reference (the extension not built yet) under its own name
        "modulate_quant_speedup_vs_two_pass": min((r for r, csrc in two_pass if csrc), default=None),
        "modulate_quant_speedup_vs_two_pass_torch_ref": min((r for r, csrc in two_pass if not csrc), default=None),
        "rms_norm_bw_frac": min_frac("rms_norm"),
        "vae_norm_bw_frac": min_frac("vae_rms_norm_silu"),
        # the best of the kernel variants (each at its worst shape); "row" is "qk_norm_rope" in the CSV
        "qk_norm_rope_bw_frac": max((f for f in qk_fracs.values() if f is not None), default=None),
        **{f"qk_norm_rope_{v}_bw_frac": f for v, f in qk_fracs.items()},
        # our best kernel (Triton or Gluon) against cuDNN
        "attn_bf16_ratio_vs_cudnn": (cudnn["ms"] / best_ours["ms"]) if (best_ours and cudnn) else None,
        "attn_bf16_best_ours": best_ours["impl"] if best_ours else None,
        "attn_best_impl": best["impl"] if best else None,
        "attn_best_triton_config": best_tri["impl"].split(":", 1)[1] if best_tri else None,
        "attn_triton_tflops": best_tri["tflops_or_gbps"] if best_tri else None,
        "attn_cudnn_tflops": cudnn["tflops_or_gbps"] if cudnn else None,
        "attn_gluon_best_config": best_glu["impl"].split(":", 1)[1] if best_glu else None,
        "attn_gluon_tflops": best_glu["tflops_or_gbps"] if best_glu else None,
        "attn_gluon_ratio_vs_cudnn": (cudnn["ms"] / best_glu["ms"]) if (best_glu and cudnn) else None,
        "attn_gluon_ratio_vs_triton": (best_tri["ms"] / best_glu["ms"]) if (best_glu and best_tri) else None,
        "attn_main_shape": main_shape,
        # the fastest correct implementation at the cross-attention shape (Lk = 512), for LX2V_CROSS_ATTN
        "attn_cross_best_impl": (min(cross, key=lambda r: r["ms"])["impl"] if cross else None),
        # 8-bit: quantisation of q, k, v included (what the DiT pays); kernel_only: pre-quantised inputs
        "attn_8bit_ratio_vs_cudnn": (cudnn["ms"] / best8["ms"]) if (best8 and cudnn) else None,
        "attn_8bit_relerr": best8["max_err"] if best8 else None,
        "attn_8bit_best_config": best8["impl"].split(":", 1)[1] if best8 else None,
        "attn_8bit_tops": best8["tflops_or_gbps"] if best8 else None,
        "attn_8bit_kernel_only_ratio_vs_cudnn": (cudnn["ms"] / best8k["ms"]) if (best8k and cudnn) else None,
        "attn_8bit_kernel_only_best_config": best8k["impl"].split(":", 1)[1] if best8k else None,
    }


def _env_info(device: str) -> dict:
    return run_env(torch.cuda.get_device_name() if device == "cuda" else "cpu (dry run)")


def write_outputs(new_rows: list[dict], summary: dict, env: dict, out_dir: str) -> tuple[str, str]:
    """Appends new_rows to <out_dir>/kernels.csv (a history across runs) and rewrites the summary JSON."""
    os.makedirs(out_dir, exist_ok=True)
    csv_path = os.path.join(out_dir, "kernels.csv")
    append_csv(csv_path, CSV_FIELDS, [{k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in {**env, **r}.items()}
                                      for r in new_rows])
    json_path = os.path.join(out_dir, "kernels_summary.json")
    tmp = os.path.join(out_dir, ".kernels_summary.json.tmp")  # (whole or not at all: a cut stage left half)
    with open(tmp, "w") as f:
        json.dump({**summary, **env}, f, indent=2)
    os.replace(tmp, json_path)
    return csv_path, json_path


def print_table(rows: list[dict], copy_gbps: float) -> None:
    print(f"device-to-device copy: {copy_gbps:.0f} GB/s")
    print(f"{'op':<24}{'shape':<34}{'impl':<32}{'ms':>9}{'value':>10} {'unit':<8}{'ratio':>7} {'err':>9} ok")
    for r in rows:
        print(f"{r['op']:<24}{r['shape']:<34}{r['impl']:<32}{r['ms']:>9.3f}{r['tflops_or_gbps']:>10.1f} "
              f"{r['unit']:<8}{r['ratio']:>7.3f} {r['max_err']:>9.2e} {'y' if r['ok'] else 'N'}  {r.get('note', '')}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "out"))
    p.add_argument("--quick", action="store_true", help="fewer shapes (no 40-head self-attention, no 720p)")
    p.add_argument("--hd720", action="store_true",
                   help="also the 720p token count L = 75600 (memory-bound ops, self- and cross-attention)")
    p.add_argument("--configs", default="all", help="'all' or a comma list of ATTN_CONFIGS names")
    p.add_argument("--configs8", default="auto",
                   help="'auto' (QUICK_ATTN8 with --quick, else all), 'all', '' (none) or a comma list of ATTN8_CONFIGS names")
    p.add_argument("--gluon", default="auto",
                   help="'auto' (every GLUON_CONFIGS entry where the kernel is available: sm90, not "
                        "LX2V_ATTN_GLUON_OFF=1), '' (none) or a comma list of Gluon attention configs")
    p.add_argument("--dry-run", action="store_true", help="tiny CPU shapes through the Triton interpreter")
    args = p.parse_args(argv)

    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        device, dtype = "cpu", torch.float16  # the interpreter's bf16 tl.dot is not usable
        Ls, Cs = [13], [256]  # (13 rows: every row-tiled kernel ends on a partial tile)
        vae_shapes = [(16, 2, 6, 10)]
        attn_shapes = [(2, 80, 80), (2, 80, 33)]
    elif not torch.cuda.is_available():
        print("bench_kernels: needs a CUDA GPU (torch.cuda.is_available() is False); nothing measured. "
              "--dry-run exercises the code path on the CPU.")
        return 0
    else:
        device, dtype = "cuda", torch.bfloat16
        Ls = [L] + ([L720] if args.hd720 and not args.quick else [])
        Cs = [1536, 5120]
        # two of the VAE decoder's norms at 480p (4 frames of a causal chunk): 384 channels at 120x208 and 96
        # at the full 480x832
        vae_shapes = [(384, 4, 120, 208), (96, 4, 480, 832)]
        attn_shapes = [(12, L, L), (12, L, 512)] + ([] if args.quick else [(40, L, L)])
        if args.hd720 and not args.quick:  # 720x1280, 81 frames: 21 x 45 x 80 = 75600 tokens
            attn_shapes += [(12, L720, L720), (40, L720, L720), (40, L720, 512)]

    from lightx2v_engine.kernels.attention import ATTN_CONFIGS, DEFAULT_ATTN_CONFIG
    from lightx2v_engine.kernels.attention_8bit import ATTN8_CONFIGS
    G = importlib.import_module("lightx2v_engine.kernels.attention_gluon")
    if args.gluon == "auto":
        gluon_configs = list(G.GLUON_CONFIGS) if (device == "cuda" and G.available()) else []
    else:
        gluon_configs = [c for c in args.gluon.split(",") if c]
    unknown_g = [c for c in gluon_configs if c not in G.GLUON_CONFIGS]
    if unknown_g:
        p.error(f"unknown --gluon {unknown_g}; choose from {list(G.GLUON_CONFIGS)}")
    configs = list(ATTN_CONFIGS) if args.configs == "all" else args.configs.split(",")
    unknown = [c for c in configs if c not in ATTN_CONFIGS]
    if unknown:
        p.error(f"unknown --configs {unknown}; choose from {list(ATTN_CONFIGS)}")
    # the mean-pad configs have never run on a GPU: they are timed after everything else
    if args.configs8 == "auto":
        configs8 = list(QUICK_ATTN8) if args.quick else list(ATTN8_CONFIGS)
    else:
        configs8 = list(ATTN8_CONFIGS) if args.configs8 == "all" else [c for c in args.configs8.split(",") if c]
    unknown8 = [c for c in configs8 if c not in ATTN8_CONFIGS]
    if unknown8:
        p.error(f"unknown --configs8 {unknown8}; choose from {list(ATTN8_CONFIGS)}")

    t0 = time.time()
    env = _env_info(device)
    H, Lq, Lk = attn_shapes[0]
    main_shape = f"B1 H{H} D{HEAD_D} Lq{Lq} Lk{Lk}"
    copy_gbps = _copy_gbps((1 << 30) if device == "cuda" else (1 << 22), device)

    written = 0

    def save(rows):
        """Outputs after every section, so that a stage killed by its timeout keeps what it measured."""
        nonlocal written
        summary = summarize(rows, main_shape)
        summary["copy_gbps"] = copy_gbps
        summary["two_pass_per_token_quant"] = _per_token_quant_impl()  # (not "csrc": e2e's, after the build)
        paths = write_outputs(rows[written:], summary, env, args.out)
        written = len(rows)
        return summary, paths

    # q/k variants never run on a GPU (QK_ROPE_UNMEASURED) after the attention figures: an illegal memory
    # access there would poison the CUDA context for everything after it
    from lightx2v_engine.kernels.qk_norm_rope import QK_ROPE_IMPLS, QK_ROPE_UNMEASURED
    rows = bench_memory_ops(Ls, Cs, device, copy_gbps,
                            qk_variants=[v for v in QK_ROPE_IMPLS if v not in QK_ROPE_UNMEASURED])
    save(rows)
    rows += bench_vae_norm(vae_shapes, device, copy_gbps)
    save(rows)
    rows += bench_attention(attn_shapes, [c for c in configs if not ATTN_CONFIGS[c].mean_pad], device, dtype)
    save(rows)
    if device == "cuda":
        # L = 32768 = 256 x 128: no ragged key block, so no mask in the warp-specialised loop; against the
        # 32760 row this is the cost of the mask
        rows += bench_attention([(12, 32768, 32768)], [DEFAULT_ATTN_CONFIG], device, dtype)
        save(rows)
    cudnn_ms = {r["shape"]: r["ms"] for r in rows if r["op"] == "attention" and r["impl"] == "sdpa_cudnn"}
    from lightx2v_engine.kernels.attention_8bit import ATTN8_UNMEASURED
    rows += bench_attention_8bit([s for s in attn_shapes if s[1] == s[2]],
                                 [c for c in configs8 if c not in ATTN8_UNMEASURED], device, dtype, cudnn_ms)
    save(rows)
    mean_pad = [c for c in configs if ATTN_CONFIGS[c].mean_pad]
    if mean_pad:  # self-attention shapes only (the padding is a self-attention feature)
        rows += bench_attention([s for s in attn_shapes if s[1] == s[2]], mean_pad, device, dtype, cudnn_ms)
        save(rows)
    # the Gluon kernel last of all (written without a GPU; gpu_check switches it off when its smoke test fails)
    if gluon_configs:
        rows += bench_attention(attn_shapes, [], device, dtype, cudnn_ms, gluon_configs=gluon_configs)
        save(rows)
    if QK_ROPE_UNMEASURED:
        rows += bench_memory_ops(Ls, Cs, device, copy_gbps, qk_variants=list(QK_ROPE_UNMEASURED), qk_only=True)
        save(rows)
    # the modulation with its output quantized for the 8-bit linears (added 2026-11-27 without a GPU), against
    # the two passes with the engine's per_token_quant: the extension gpu_check builds meanwhile, when ready
    from lightx2v_engine import csrc_ops
    csrc_ops.retry_load()
    rows += bench_fused_quant(Ls, Cs, device, copy_gbps, "fp8") + bench_fused_quant(Ls, Cs, device, copy_gbps, "int8")
    save(rows)
    # the norm+RoPE-in-attention option after the figures the issues' targets need (never run on a GPU),
    # against the pass path with this run's fastest Triton config and q/k variant (what its tuned file runs)
    picked = summarize(rows, main_shape)
    fracs = {v: f for v, f in qk_variant_fracs(rows).items() if f is not None}
    rows += bench_self_attn_rope([s for s in attn_shapes if s[1] == s[2]], device, dtype,
                                 ROPE_ATTN_CONFIGS[:2] if args.quick else ROPE_ATTN_CONFIGS,
                                 attn_config=picked.get("attn_best_triton_config"),
                                 qk_impl=max(fracs, key=fracs.get) if fracs else None)
    save(rows)
    # 8-bit attention configs never run on a GPU, last of all (ATTN8_UNMEASURED)
    rows += bench_attention_8bit([s for s in attn_shapes if s[1] == s[2]],
                                 [c for c in configs8 if c in ATTN8_UNMEASURED], device, dtype, cudnn_ms)
    summary, (csv_path, json_path) = save(rows)
    print_table(rows, copy_gbps)
    print(json.dumps(summary, indent=2))
    print(f"wrote {csv_path} and {json_path} in {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
