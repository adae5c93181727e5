"""Microbenchmark of the 8-bit linears at the Wan2.1 shapes (M = 32760 tokens, 480p 81 frames).

Per (K, N): bf16 F.linear; QuantLinear fp8 (activation quantization + torch._scaled_mm rowwise);
torch._scaled_mm rowwise alone (GEMM only, pre-quantized operands); QuantLinear int8 (quantization +
torch._int_mm + epilogue, or the Triton GEMM); the per-token quantization alone (csrc kernel and the
torch-ops fallback).
The quantization kernel's bandwidth (bytes read + written) is reported as a fraction of a device-to-device
copy measured in the same run. Optional Triton fp8 GEMM rows when lightx2v_engine.kernels.fp8_gemm exists.

Appends its rows to <out>/quant.csv and writes <out>/quant_summary.json (out: --out, else $OUT, else benchmarks/out).
Summary ratios are speedups (time of the baseline / time of ours; > 1 means ours is faster).
Without CUDA it prints that it needs a GPU and exits 0. ``--dry-run`` runs every code path once on the CPU
at tiny shapes (Triton through the interpreter; timings meaningless) to check the script itself.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the sibling csv_history, also when imported
from csv_history import append_csv, run_env  # noqa: E402

try:
    import lightx2v_engine  # noqa: F401  (installed, e.g. pip install -e .)
except ImportError:  # (run from a checkout without the install: the engine from the source tree)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

M = 32760
_DEV = "cuda"
SHAPES = [(1536, 1536), (1536, 8960), (8960, 1536), (5120, 5120), (5120, 13824), (13824, 5120)]


MAX_RELERR = 2e-2  # a kernel's rel. L2 vs the library's output (the same fp8 inputs) before its ratio counts


_DRY_RUN = False


def _bench_ms(fn) -> tuple[float, float, float]:
    """(median, p20, p80) milliseconds, CUDA-event timed by triton.testing.do_bench."""
    if _DRY_RUN:
        t0 = time.perf_counter()
        fn()
        ms = (time.perf_counter() - t0) * 1e3
        return ms, ms, ms
    from triton.testing import do_bench
    med, p20, p80 = do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
    return med, p20, p80


def _copy_bandwidth(numel_bytes: int) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write)."""
    a = torch.empty(numel_bytes, dtype=torch.uint8, device=_DEV)
    b = torch.empty_like(a)
    med, _, _ = _bench_ms(lambda: b.copy_(a))
    del a, b
    return 2 * numel_bytes / (med * 1e-3)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "out"))
    p.add_argument("--m", type=int, default=M)
    p.add_argument("--shapes", default="all", help="'all' or a list like 1536x1536,5120x13824 (KxN)")
    p.add_argument("--dry-run", action="store_true", help="CPU smoke run of the script at tiny shapes")
    args = p.parse_args(argv)
    global _DRY_RUN, _DEV
    if args.dry_run:
        _DRY_RUN, _DEV = True, "cpu"
        os.environ.setdefault("TRITON_INTERPRET", "1")
        args.m, args.shapes = 40, "64x48,96x32"
    elif not torch.cuda.is_available():
        print("bench_quant: needs a CUDA GPU (torch.cuda.is_available() is False); nothing measured")
        return 0

    from lightx2v_engine import csrc_ops, quant
    try:
        from lightx2v_engine.kernels import fp8_gemm
    except ImportError as e:
        print(f"bench_quant: no Triton fp8 GEMM ({e}); its rows are skipped")
        fp8_gemm = None

    shapes = SHAPES if args.shapes == "all" else [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    m = args.m
    gpu = torch.cuda.get_device_name() if _DEV == "cuda" else "cpu (dry run)"
    print(f"bench_quant on {gpu}, torch {torch.__version__}, csrc {csrc_ops.csrc_status()}")
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(0)
    copy_bw = _copy_bandwidth(m * 8192 * 2 if not _DRY_RUN else 1 << 20)
    print(f"device-to-device copy: {copy_bw / 1e12:.3f} TB/s")

    rows: list[dict] = []
    env = run_env(gpu)
    checks_failed: list[str] = []
    errors: list[str] = []  # rows that raised (recorded; the run goes on)

    def agrees(what: str, got: torch.Tensor, want: torch.Tensor) -> bool:
        """A kernel's output against the library's (rel. L2 < MAX_RELERR) before its time becomes a ratio."""
        rel = ((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-30)).item()
        if not rel < MAX_RELERR:  # (NaN fails too)
            checks_failed.append(f"{what}: rel. L2 {rel:.3g} vs the library's output (limit {MAX_RELERR})")
            print(f"bench_quant: {checks_failed[-1]}; its ratio is left out")
            return False
        return True

    def record(op, k, n, ms, flops=None, nbytes=None):
        med, p20, p80 = ms
        row = {"gpu": gpu, "torch": torch.__version__, "op": op, "M": m, "K": k, "N": n,
               "ms": round(med, 5), "ms_p20": round(p20, 5), "ms_p80": round(p80, 5),
               "tflops": round(flops / (med * 1e-3) / 1e12, 1) if flops else "",
               "gbps": round(nbytes / (med * 1e-3) / 1e9, 1) if nbytes else "",
               "bw_frac_of_copy": round(nbytes / (med * 1e-3) / copy_bw, 3) if nbytes else "",
               "triton": env["triton"], "commit": env["commit"], "date": env["date"]}
        rows.append(row)
        print(f"{op:28s} K={k:6d} N={n:6d} {med:8.4f} ms  {row['tflops'] or '':>7} TF  {row['gbps'] or '':>7} GB/s")
        return med

    quant_bw: dict[int, float] = {}
    fp8_ratio, gemm_ratio, gate_ratio, gelu_ratio, lora_cost = [], [], [], [], []
    written = 0

    def write_summary() -> dict:
        summary = _summary(gpu, env, m, copy_bw, checks_failed, quant_bw, fp8_ratio, gemm_ratio, gate_ratio,
                           gelu_ratio, lora_cost)
        summary["quant_errors"] = errors
        summary["shapes_done"] = f"{len(fp8_ratio)} of {len(shapes)}"
        tmp = os.path.join(args.out, ".quant_summary.json.tmp")  # (whole or not at all: a cut run left half)
        with open(tmp, "w") as f:
            json.dump(summary, f, indent=2)
        os.replace(tmp, os.path.join(args.out, "quant_summary.json"))
        return summary

    def guarded(what: str, fn) -> bool:
        """fn() with its error recorded (quant_errors) instead of ending the run: the other rows and shapes
        are still measured. True when it ran through."""
        try:
            fn()
            return True
        except Exception as e:  # noqa: BLE001 - one kernel's failure must not cost the other figures
            errors.append(f"{what}: {type(e).__name__}: {e}"[:400])
            print(f"bench_quant: {errors[-1]}")
            traceback.print_exc()
            return False

    for k, n in shapes:
        x = torch.randn(m, k, device=_DEV, dtype=torch.bfloat16)
        lin = torch.nn.Linear(k, n, device=_DEV, dtype=torch.bfloat16)
        w, b = lin.weight.detach(), lin.bias.detach()
        flops = 2.0 * m * k * n
        ctx: dict = {}

        def fp8_rows():
            t_bf16 = record("bf16_linear", k, n, _bench_ms(lambda: F.linear(x, w, b)), flops)
            q8 = quant.QuantLinear.from_linear(lin, "fp8")
            t_q8 = record("qlinear_fp8", k, n, _bench_ms(lambda: q8(x)), flops)
            xq, sx = quant.per_token_quant(x, "fp8")
            wt, sw = q8.weight.t(), q8.weight_scale.reshape(1, -1)
            ctx.update(xq=xq, sx=sx, wt=wt, sw=sw)
            ctx["t_mm"] = record("scaled_mm_rowwise_gemm_only", k, n, _bench_ms(lambda: torch._scaled_mm(
                xq, wt, scale_a=sx, scale_b=sw, bias=b, out_dtype=torch.bfloat16, use_fast_accum=True)), flops)
            fp8_ratio.append(t_bf16 / t_q8)
            # a rank-32 LoRA beside the 8-bit linear (quantized DiT + lora_configs): its cost over the linear
            q8.add_lora(torch.randn(n, 32, device=_DEV) * 0.01, torch.randn(32, k, device=_DEV) * 0.01, 1.0)
            t_lora = record("qlinear_fp8_lora_r32", k, n, _bench_ms(lambda: q8(x)), flops)
            lora_cost.append(t_lora / t_q8 - 1.0)

        def csrc_rows():
            qbytes = m * k * 2 + m * k + m * 4
            if _DEV == "cuda" and csrc_ops.csrc_available(torch.device(_DEV)):  # (asks about this card)
                t = record("per_token_quant_fp8_csrc", k, 0, _bench_ms(lambda: csrc_ops.per_token_quant_fp8(x)),
                           nbytes=qbytes)
                quant_bw[k] = qbytes / (t * 1e-3) / copy_bw
                record("per_token_quant_int8_csrc", k, 0, _bench_ms(lambda: csrc_ops.per_token_quant_int8(x)),
                       nbytes=qbytes)
                if k > n:  # ffn.2's input: GELU fused into the quantization vs F.gelu then the kernel
                    t_gf = record("gelu_quant_fp8_csrc_fused", k, 0, _bench_ms(
                        lambda: csrc_ops.per_token_quant_fp8(x, gelu=True)), nbytes=qbytes)
                    t_gu = record("gelu_then_quant_fp8_csrc", k, 0, _bench_ms(
                        lambda: csrc_ops.per_token_quant_fp8(F.gelu(x, approximate="tanh"))), nbytes=qbytes)
                    gelu_ratio.append(t_gu / t_gf)
            record("per_token_quant_fp8_torch", k, 0, _bench_ms(lambda: quant.per_token_quant_ref(x, "fp8")),
                   nbytes=qbytes)

        def triton_fp8_rows():
            xq, sx, wt, sw, t_mm = ctx["xq"], ctx["sx"], ctx["wt"], ctx["sw"], ctx["t_mm"]
            t_tr = record("triton_fp8_gemm", k, n, _bench_ms(lambda: fp8_gemm.fp8_gemm(xq, wt.t(), sx, sw, b)),
                          flops)
            if agrees(f"triton_fp8_gemm K={k} N={n}", fp8_gemm.fp8_gemm(xq, wt.t(), sx, sw, b), torch._scaled_mm(
                    xq, wt, scale_a=sx, scale_b=sw, bias=b, out_dtype=torch.bfloat16, use_fast_accum=True)):
                gemm_ratio.append(t_mm / t_tr)
            if k > n or k == n:  # output projections (o, ffn.2) are followed by x += gate * y
                res = torch.randn(m, n, device=_DEV, dtype=torch.float32)
                gate = torch.randn(1, n, device=_DEV, dtype=torch.float32)

                def unfused():
                    y = torch._scaled_mm(xq, wt, scale_a=sx, scale_b=sw, bias=b, out_dtype=torch.bfloat16,
                                         use_fast_accum=True)
                    return torch.addcmul(res, gate, y)  # one fused torch kernel: res + gate * y

                t_un = record("scaled_mm_then_gate_residual", k, n, _bench_ms(unfused), flops)
                t_fu = record("triton_fp8_gemm_gate_residual", k, n, _bench_ms(
                    lambda: fp8_gemm.fp8_gemm(xq, wt.t(), sx, sw, b, residual=res, gate=gate)), flops)
                if agrees(f"triton_fp8_gemm_gate_residual K={k} N={n}",
                          fp8_gemm.fp8_gemm(xq, wt.t(), sx, sw, b, residual=res.clone(), gate=gate), unfused()):
                    gate_ratio.append(t_un / t_fu)

        def int8_rows():
            qi = quant.QuantLinear.from_linear(lin, "int8")
            xi, sxi = quant.per_token_quant(x, "int8")
            record("int_mm_gemm_only", k, n, _bench_ms(lambda: torch._int_mm(xi, qi.weight.t())), flops)
            if fp8_gemm is not None:
                record("triton_int8_gemm", k, n, _bench_ms(
                    lambda: fp8_gemm.fp8_gemm(xi, qi.weight, sxi, qi.weight_scale, b)), flops)
            # the QuantLinear on each int8 GEMM path (the default, "triton", was timed twice and cuBLAS's never)
            prev = quant._int8_gemm
            for gemm in ("cublas", "triton") if fp8_gemm is not None else ("cublas",):
                quant.set_int8_gemm(gemm)
                try:
                    record(f"qlinear_int8_{gemm}", k, n, _bench_ms(lambda: qi(x)), flops)
                finally:
                    quant.set_int8_gemm(prev)

        with torch.no_grad():  # (the required figures' rows first; the int8 ones, optional, last)
            fp8_ok = guarded(f"fp8 linear rows K={k} N={n}", fp8_rows)
            if k not in quant_bw:
                guarded(f"per-token quantization rows K={k}", csrc_rows)
            if fp8_gemm is not None:
                if fp8_ok:
                    guarded(f"Triton fp8 GEMM rows K={k} N={n}", triton_fp8_rows)
                else:
                    errors.append(f"Triton fp8 GEMM rows K={k} N={n}: not run (the fp8 linear rows failed)")
            guarded(f"int8 rows K={k} N={n}", int8_rows)
        del x, lin, w, b, ctx
        if _DEV == "cuda":
            torch.cuda.empty_cache()
        # outputs after every shape: a run cut by its time limit keeps what it measured
        if rows[written:]:
            append_csv(os.path.join(args.out, "quant.csv"), list(rows[0]), rows[written:])
        written = len(rows)
        summary = write_summary()
    print(json.dumps(summary, indent=2))
    return 0


def _summary(gpu, env, m, copy_bw, checks_failed, quant_bw, fp8_ratio, gemm_ratio, gate_ratio, gelu_ratio,
             lora_cost) -> dict:
    from lightx2v_engine import csrc_ops
    summary = {
        "gpu": gpu,
        "torch": torch.__version__,
        "triton": env["triton"], "commit": env["commit"], "date": env["date"],
        # kernels whose output disagreed with the library's: their ratios are left out of the figures
        "quant_checks_failed": checks_failed,
        "M": m,
        "copy_bandwidth_tbps": round(copy_bw / 1e12, 3),
        "csrc_status": csrc_ops.csrc_status(),
        # min over K of (csrc fp8 quant bytes/s) / (copy bytes/s); None when the extension is not built
        "csrc_memory_bound_bw_frac": round(min(quant_bw.values()), 3) if quant_bw else None,
        "csrc_bw_frac_by_K": {str(k): round(v, 3) for k, v in quant_bw.items()},
        # min over shapes of t(bf16 F.linear) / t(QuantLinear fp8 incl. quantization)
        "qlinear_fp8_ratio_vs_bf16_min": round(min(fp8_ratio), 3) if fp8_ratio else None,
        # max over shapes of t(QuantLinear fp8 + rank-32 LoRA branch) / t(QuantLinear fp8) - 1
        "qlinear_lora_r32_overhead_max": round(max(lora_cost), 3) if lora_cost else None,
    }
    if gemm_ratio:
        summary["gemm_fp8_ratio_vs_scaled_mm_min"] = round(min(gemm_ratio), 3)  # t(_scaled_mm) / t(Triton)
    if gelu_ratio:  # t(F.gelu + csrc quant) / t(csrc quant with GELU), min over the ffn.2 inputs
        summary["gelu_quant_fused_ratio_min"] = round(min(gelu_ratio), 3)
    if gate_ratio:
        # t(_scaled_mm + torch residual op) / t(Triton fused epilogue), min over the output projections
        summary["gemm_fp8_gate_residual_ratio"] = round(min(gate_ratio), 3)
    return summary


if __name__ == "__main__":
    sys.exit(main())
