"""Merges the benchmarks' *_summary.json files in OUT into one summary.json of named figures, lists each
required figure that is absent with its reason, and prints a short table (the last thing gpu_check.sh prints).

    python benchmarks/summarize.py OUT_DIR
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

REQUIRED = [
    "step_ms_1.3b_bf16", "step_ms_1.3b_8bit", "step_ms_14b_bf16", "step_ms_14b_8bit",
    "diffusers_step_ms_1.3b_eager", "diffusers_step_ms_1.3b_compiled", "vae_decode_ms",
    "vae_decode_ratio_vs_diffusers", "modulate_bw_frac", "qk_norm_rope_bw_frac", "attn_bf16_ratio_vs_cudnn",
    "attn_8bit_ratio_vs_cudnn", "attn_8bit_relerr", "gemm_fp8_ratio_vs_scaled_mm_min",
    "gemm_fp8_gate_residual_ratio", "csrc_memory_bound_bw_frac", "distill_speedup_vs_50step_cfg",
]
# Shown under the required figures when a run produced them: which kernels won, and by how much.
ALSO = [
    "attn_bf16_best_ours", "attn_triton_tflops", "attn_gluon_best_config", "attn_gluon_tflops",
    "attn_gluon_ratio_vs_triton", "attn_cudnn_tflops", "attn_cross_best_impl", "attn_8bit_best_config",
    "qk_norm_rope_row_bw_frac", "qk_norm_rope_tile_bw_frac", "qk_norm_rope_chunk_bw_frac",
    "qk_norm_rope_packed_bw_frac", "rms_norm_bw_frac",
    "vae_norm_bw_frac",
    "step_8bit_variant_1.3b", "step_8bit_variant_14b", "ops", "ops_attn8",
]
# Figures with no producer yet, and why (none at present).
NOT_IMPLEMENTED: dict[str, str] = {}
# Where a stage's failure shows up: summary files expected from each benchmark.
SOURCES = {"kernels_summary.json": "bench_kernels.py", "quant_summary.json": "bench_quant.py",
           "e2e_summary.json": "bench_e2e.py"}
# gpu_check.sh's record of the stages its time budget cut ("name: cut at N s") or skipped
CUT_FILE = "stages_cut.txt"


def merge(out: Path) -> dict:
    figures: dict = {}
    absent: dict = {}
    env: dict = {}
    cut_path = out / CUT_FILE
    for line in (cut_path.read_text().splitlines() if cut_path.is_file() else []):
        stage, _, why = line.partition(": ")
        if why:  # figures of a cut stage may still be there (the benchmarks save after every section)
            absent[f"<stage {stage}>"] = f"{why} (gpu_check's time budget, GPU_CHECK_BUDGET)"
    for name, producer in SOURCES.items():
        path = out / name
        if not path.is_file():
            absent[f"<{producer}>"] = (f"{name} missing: {producer} did not run or did not finish "
                                       f"(see its log in {out})")
            continue
        data = json.loads(path.read_text())
        if "figures" in data:
            figures.update(data["figures"])
            absent.update(data.get("absent", {}))
            env.update(data.get("env", {}))
        else:
            for k, v in data.items():
                (env if k in ("gpu", "torch", "triton", "cuda", "commit", "date", "git_commit") else figures)[k] = v
    for k in REQUIRED:
        if figures.get(k) is None and k not in absent:
            absent[k] = NOT_IMPLEMENTED.get(k, "not produced in this run (see the logs)")
    for k in list(absent):
        if figures.get(k) is not None:
            del absent[k]
    return {"env": env, "figures": figures, "absent": absent}


def table(summary: dict) -> str:
    lines = [f"summary ({summary['env'].get('gpu', '?')}, {summary['env'].get('date', '?')}, "
             f"commit {summary['env'].get('commit', summary['env'].get('git_commit', '?'))})"]
    for k in REQUIRED:
        v = summary["figures"].get(k)
        lines.append(f"  {k:<36} " + (f"{v:.4g}" if isinstance(v, (int, float)) else f"absent: {summary['absent'].get(k)}"))
    also = [k for k in ALSO if summary["figures"].get(k) is not None]
    if also:
        lines.append("  also:")
    for k in also:
        v = summary["figures"][k]
        lines.append(f"  {k:<36} " + (f"{v:.4g}" if isinstance(v, float) else str(v)))
    extra = [k for k in summary["absent"] if k.startswith("<")]
    lines += [f"  {k}: {summary['absent'][k]}" for k in extra]
    return "\n".join(lines)


def pick_attention(kernels_summary: Path) -> str:
    """Shell exports selecting the fastest correct attention of a bench_kernels run: self-attention's
    backend (a Triton config, the Gluon kernel with its config, or an SDPA backend), cross-attention's
    backend named explicitly (it would otherwise follow self-attention's), the 8-bit config and the
    fastest q/k norm+RoPE variant."""
    s = json.loads(kernels_summary.read_text())
    best, cfg = s.get("attn_best_impl") or "", s.get("attn_best_triton_config")
    exports = []
    self_impl = "triton"
    if best.startswith("sdpa_"):
        self_impl = best
        exports.append(f"LX2V_ATTN={best}")
    elif best.startswith("gluon:"):
        self_impl = "gluon"
        exports.append(f"LX2V_ATTN=gluon LX2V_ATTN_GLUON_CONFIG={best.split(':', 1)[1]}")
    elif best and cfg:
        exports.append("LX2V_ATTN=triton")
    if cfg and best:  # the Triton config also serves the Gluon backend's fallback shapes
        exports.append(f"LX2V_ATTN_CONFIG={cfg}")
    cross = s.get("attn_cross_best_impl") or ""
    cross_impl = cross.split(":", 1)[0]
    if cross_impl == "gluon" and self_impl != "gluon":
        exports.append(f"LX2V_ATTN_GLUON_CONFIG={cross.split(':', 1)[1]}")
    if cross_impl and cross_impl != self_impl:  # cross-attention would otherwise follow self-attention's
        exports.append(f"LX2V_CROSS_ATTN={cross_impl}")
    if s.get("attn_8bit_best_config"):
        exports.append(f"LX2V_ATTN8_CONFIG={s['attn_8bit_best_config']}")
    fracs = {v: s.get(f"qk_norm_rope_{v}_bw_frac") for v in ("row", "tile", "chunk", "packed")}
    fracs = {v: f for v, f in fracs.items() if f is not None}
    if len(fracs) > 1:
        exports.append(f"LX2V_QK_ROPE={max(fracs, key=fracs.get)}")
    return f"export {' '.join(exports)}" if exports else ""


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--pick-attention":
        print(pick_attention(Path(argv[1])))
        return 0
    out = Path(argv[0] if argv else "benchmarks/out")
    summary = merge(out)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(table(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
