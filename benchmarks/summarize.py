"""Merges the benchmarks' *_summary.json files in OUT into one summary.json of named figures, lists each
required figure that is absent with its reason, and prints a short table (the last thing gpu_check.sh prints).

    python benchmarks/summarize.py OUT_DIR [--since EPOCH_SECONDS]
        (--since: files in OUT_DIR older than that, from an earlier run, are ignored and named as such;
        gpu_check.sh passes its start time)
    python benchmarks/summarize.py --write-tuned OUT_DIR/kernels_summary.json FOLDER
        (the measured winners as the GPU's tuned-defaults file, FOLDER/<device name>.json)
"""
from __future__ import annotations

import importlib.util
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
    "qk_norm_rope_*_bw_frac", "rms_norm_bw_frac", "self_attn_rope_prologue_ratio",
    "self_attn_rope_prologue_best", "self_attn_rope_baseline",
    "vae_norm_bw_frac", "qlinear_lora_r32_overhead_max", "modulate_quant_bw_frac",
    "modulate_quant_speedup_vs_two_pass", "input_quant_fusion_speedup_1.3b", "input_quant_fusion_speedup_14b",
    "step_8bit_variant_1.3b", "step_8bit_variant_14b", "offload_step_ratio_vs_resident_1.3b",
    "offload_block_copy_vs_compute_1.3b", "offload_peak_gib_1.3b", "offload_step_ratio_vs_resident_14b",
    "lora_switch_first_ms_1.3b", "lora_switch_other_ms_1.3b", "lora_switch_host_gib_1.3b",
    "video_s_1.3b_bf16", "video_s_1.3b_8bit", "video_s_1.3b_8bit_tae", "video_s_14b_8bit", "video_s_14b_8bit_tae",
    "vae_decode_tiled_ms", "vae_decode_tiled_peak_gib", "vae_peak_gib", "lightvae_decode_ms",
    "lightvae_speedup_vs_vae", "tae_decode_ms", "tae_speedup_vs_vae", "tae_peak_gib", "ops", "ops_attn8", "csrc",
]
# Figures with no producer yet, and why (none at present).
NOT_IMPLEMENTED: dict[str, str] = {}
# Where a stage's failure shows up: summary files expected from each benchmark.
SOURCES = {"kernels_summary.json": "bench_kernels.py", "quant_summary.json": "bench_quant.py",
           "e2e_summary.json": "bench_e2e.py"}
# Summaries of optional stages (gpu_check.sh's "compile": diffusers' torch.compile baseline in its own
# bench_e2e run): merged where present, their figures never replacing the main ones, no note where absent.
OPTIONAL_SOURCES = {"compile/e2e_summary.json": "bench_e2e.py --diffusers-compile"}
# gpu_check.sh's record of the stages its time budget cut ("name: cut at N s") or skipped
CUT_FILE = "stages_cut.txt"


def _stale(path: Path, since: float | None) -> str | None:
    """Why `path` is not this run's (written before `since`), else None."""
    if since is None or path.stat().st_mtime >= since:
        return None
    import datetime
    when = datetime.datetime.fromtimestamp(path.stat().st_mtime, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"{path.name} is from an earlier run (written {when}), ignored"


def merge(out: Path, since: float | None = None) -> dict:
    """The summary of the run in `out`; with `since`, files written before it (an earlier run's, left in the
    folder) are not merged: their producers are named absent, so that no old figure passes as this run's."""
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
        stale = _stale(path, since)
        if stale:
            absent[f"<{producer}>"] = f"{stale}: {producer} did not write it in this run (see its log in {out})"
            continue
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:  # (a stage killed mid-write, before atomic writes)
            absent[f"<{producer}>"] = f"{name} unreadable ({e}): {producer} was cut while writing it"
            continue
        if "figures" in data:
            figures.update(data["figures"])
            absent.update(data.get("absent", {}))
            env.update(data.get("env", {}))
        else:
            for k, v in data.items():
                (env if k in ("gpu", "torch", "triton", "cuda", "commit", "date", "git_commit") else figures)[k] = v
    for name, producer in OPTIONAL_SOURCES.items():
        path = out / name
        if not path.is_file():
            continue
        stale = _stale(path, since)
        if stale:
            absent[f"<{producer}>"] = stale
        else:
            data = json.loads(path.read_text())
            for k, v in data.get("env", {}).items():  # (a run of the optional stage alone names its card)
                env.setdefault(k, v)
            for k, v in data.get("figures", {}).items():
                if figures.get(k) is None:
                    figures[k] = v
            for k, v in data.get("absent", {}).items():  # (its own figures' reasons only: the compile run
                if k.startswith("diffusers_"):             # skips the rest, which the main run may have lost)
                    absent.setdefault(k, v)
    # bench_quant's ratios left out because the kernel's output disagreed with the library's, or its rows
    # raised: the reason for those figures
    failed = [str(x) for x in (figures.get("quant_checks_failed") or []) + (figures.get("quant_errors") or [])]
    for k, prefixes in (("gemm_fp8_ratio_vs_scaled_mm_min", ("triton_fp8_gemm K=", "Triton fp8 GEMM rows")),
                        ("gemm_fp8_gate_residual_ratio", ("triton_fp8_gemm_gate_residual K=", "Triton fp8 GEMM rows")),
                        ("csrc_memory_bound_bw_frac", ("per-token quantization rows",))):
        why = [x for x in failed if x.startswith(prefixes)]
        if figures.get(k) is None and why and k not in absent:
            absent[k] = "bench_quant: " + "; ".join(why)[:400]
    if figures.get("modulate_quant_speedup_vs_two_pass") is None \
            and figures.get("modulate_quant_speedup_vs_two_pass_torch_ref") is not None:
        absent.setdefault("modulate_quant_speedup_vs_two_pass", (
            "the two passes' per_token_quant ran its PyTorch reference, not the engine's csrc kernel "
            f"({figures.get('two_pass_per_token_quant')}): see modulate_quant_speedup_vs_two_pass_torch_ref"))
    for k in REQUIRED:
        if figures.get(k) is None and k not in absent:
            absent[k] = NOT_IMPLEMENTED.get(k, "not produced in this run (see the logs)")
    for k in list(absent):
        if figures.get(k) is not None:
            del absent[k]
    tuned = {str(p): json.loads(p.read_text()).get("choices", {}) for p in sorted((out / "tuned").glob("*.json"))
             if not _stale(p, since)}
    return {"env": env, "figures": figures, "absent": absent, "tuned": tuned}


def table(summary: dict) -> str:
    lines = [f"summary ({summary['env'].get('gpu', '?')}, {summary['env'].get('date', '?')}, "
             f"commit {summary['env'].get('commit', summary['env'].get('git_commit', '?'))})"]
    for k in REQUIRED:
        v = summary["figures"].get(k)
        lines.append(f"  {k:<36} " + (f"{v:.4g}" if isinstance(v, (int, float)) else f"absent: {summary['absent'].get(k)}"))
    # "qk_norm_rope_*_bw_frac" stands for every variant's key the run produced, in the run's order
    variants = _qk_keys(summary["figures"])
    also = [x for k in ALSO for x in (variants if k == "qk_norm_rope_*_bw_frac" else [k])
            if summary["figures"].get(x) is not None]
    if also:
        lines.append("  also:")
    for k in also:
        v = summary["figures"][k]
        lines.append(f"  {k:<36} " + (f"{v:.4g}" if isinstance(v, float) else str(v)))
    # a failed CUDA-graph capture: the step figures above are then the eager times
    for k in sorted(x for x in summary["figures"] if x.startswith(("graph_capture_error_", "step_8bit_rejected_"))):
        lines.append(f"  {k}: {summary['figures'][k]} (the step figure is then the eager time / the other variant)")
    # a benchmark section or row group that raised (the run went on without its figures)
    for k in sorted(x for x in summary["figures"] if x.startswith("section_error_")):
        lines.append(f"  {k}: {summary['figures'][k]}")
    for e in summary["figures"].get("quant_errors") or []:
        lines.append(f"  quant_error: {e}")
    for path, choices in summary.get("tuned", {}).items():  # before the absent stages, which come last
        lines.append(f"  tuned defaults of this run: {path} {choices} (copy into kernels/tuned/ to adopt)")
    extra = [k for k in summary["absent"] if k.startswith("<")]
    lines += [f"  {k}: {summary['absent'][k]}" for k in extra]
    return "\n".join(lines)


PROLOGUE_MARGIN = 1.02  # self_attn_rope_prologue_ratio needed to pick LX2V_SELF_ATTN_ROPE=prologue


def pick_choices(s: dict) -> dict[str, str]:
    """The kernel choices a bench_kernels summary `s` measured as fastest and correct, as the environment
    variables / tuned-file keys of kernels/_util.py: self-attention's backend (a Triton config, the Gluon
    kernel with its config, or an SDPA backend), cross-attention's backend where it differs (it would
    otherwise follow self-attention's), the 8-bit config, the fastest q/k norm+RoPE variant, and the norm+RoPE
    inside the attention kernel where it beats the pass (and self-attention's choice is Triton's)."""
    best, cfg = s.get("attn_best_impl") or "", s.get("attn_best_triton_config")
    choices: dict[str, str] = {}
    self_impl = "triton"
    if best.startswith("sdpa_"):
        self_impl = choices["LX2V_ATTN"] = best
    elif best.startswith("gluon:"):
        self_impl = choices["LX2V_ATTN"] = "gluon"
        choices["LX2V_ATTN_GLUON_CONFIG"] = best.split(":", 1)[1]
    elif best and cfg:
        choices["LX2V_ATTN"] = "triton"
    if cfg and best:  # the Triton config also serves the Gluon backend's fallback shapes
        choices["LX2V_ATTN_CONFIG"] = cfg
    cross = s.get("attn_cross_best_impl") or ""
    cross_impl, _, cross_cfg = cross.partition(":")
    if cross_impl == "gluon" and self_impl != "gluon":
        choices["LX2V_ATTN_GLUON_CONFIG"] = cross_cfg
    # a backend's config is shared by self- and cross-attention: cross-attention takes the measured winner's
    # backend only where the file runs it with the winner's config (else it would run a config never timed
    # at 512 keys, and follows self-attention's choice instead)
    key = {"triton": "LX2V_ATTN_CONFIG", "gluon": "LX2V_ATTN_GLUON_CONFIG"}.get(cross_impl)
    if cross_impl and cross_impl != self_impl and (key is None or choices.get(key) == cross_cfg):
        choices["LX2V_CROSS_ATTN"] = cross_impl
    if s.get("attn_8bit_best_config"):
        choices["LX2V_ATTN8_CONFIG"] = s["attn_8bit_best_config"]
    fracs = _qk_fracs(s)
    if len(fracs) > 1:
        choices["LX2V_QK_ROPE"] = max(fracs, key=fracs.get)
    # norm+RoPE inside the attention kernel only where it beats the pass + attention by a margin
    if (s.get("self_attn_rope_prologue_ratio") or 0.0) >= PROLOGUE_MARGIN and best.startswith("triton:"):
        choices["LX2V_SELF_ATTN_ROPE"] = "prologue"
    return choices


def _qk_keys(s: dict) -> list[str]:
    """The qk_norm_rope_<variant>_bw_frac keys of a summary (not the best-of figure qk_norm_rope_bw_frac)."""
    return [k for k in s if k.startswith("qk_norm_rope_") and k.endswith("_bw_frac") and k != "qk_norm_rope_bw_frac"]


def _qk_fracs(s: dict) -> dict[str, float]:
    """{q/k norm+RoPE variant: fraction of copy bandwidth} from the qk_norm_rope_<variant>_bw_frac keys."""
    return {k[len("qk_norm_rope_"):-len("_bw_frac")]: s[k] for k in _qk_keys(s) if s[k] is not None}


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _evidence(s: dict, choices: dict[str, str]) -> dict[str, str]:
    """One line of figures per choice, from the same summary."""
    def figs(*keys):
        return ", ".join(f"{k} {_fmt(s[k])}" for k in keys if s.get(k) is not None)
    attn = (f"fastest correct at {s.get('attn_main_shape')}: {s.get('attn_best_impl')}; "
            + figs("attn_triton_tflops", "attn_gluon_best_config", "attn_gluon_tflops", "attn_cudnn_tflops",
                   "attn_bf16_ratio_vs_cudnn"))
    lines = {"LX2V_ATTN": attn, "LX2V_ATTN_CONFIG": attn, "LX2V_ATTN_GLUON_CONFIG": attn,
             "LX2V_CROSS_ATTN": f"fastest correct at 512 keys: {s.get('attn_cross_best_impl')}",
             "LX2V_ATTN8_CONFIG": figs("attn_8bit_tops", "attn_8bit_relerr", "attn_8bit_ratio_vs_cudnn"),
             "LX2V_QK_ROPE": "fraction of copy bandwidth (worst shape): " + figs(
                 *(f"qk_norm_rope_{v}_bw_frac" for v in _qk_fracs(s))),
             "LX2V_SELF_ATTN_ROPE": "pass ms / prologue ms: " + figs("self_attn_rope_prologue_ratio",
                                                                     "self_attn_rope_prologue_best",
                                                                     "self_attn_rope_baseline")}
    return {k: lines[k] for k in choices}


def _kernels_util():
    """kernels/_util.py of this checkout, loaded by path (no triton, no install needed)."""
    spec = importlib.util.spec_from_file_location("_lx2v_kernels_util", Path(__file__).parents[1] / "kernels" / "_util.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def write_tuned(kernels_summary: Path, folder: Path) -> Path:
    """Writes the tuned-defaults file of the GPU of a bench_kernels run, <folder>/<device name>.json (the
    format kernels/_util.py reads; copy it into kernels/tuned/ to make it the card's default)."""
    s = json.loads(kernels_summary.read_text())
    gpu = s.get("gpu") or ""
    if not gpu or gpu.startswith("cpu"):
        raise ValueError(f"{kernels_summary}: no GPU run (gpu = {gpu!r}); tuned defaults are per GPU")
    choices = pick_choices(s)
    if not choices:
        raise ValueError(f"{kernels_summary}: no kernel choice was measured (bench_kernels cut early?); no "
                         f"tuned file written")
    data = {"device": gpu, "choices": choices,
            "measured": {k: s.get(k) for k in ("date", "commit", "torch", "triton")}
            | {"command": "bash benchmarks/gpu_check.sh (bench_kernels.py --quick)"},
            "evidence": _evidence(s, choices)}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / _kernels_util().tuned_file_name(gpu)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--write-tuned":
        try:
            path = write_tuned(Path(argv[1]), Path(argv[2]))
        except ValueError as e:
            print(f"summarize.py --write-tuned: {e}")
            return 1
        print(f"tuned defaults for this GPU: {path}: {json.loads(path.read_text())['choices']}")
        return 0
    since = None
    if "--since" in argv:
        i = argv.index("--since")
        since = float(argv[i + 1])
        argv = argv[:i] + argv[i + 2:]
    out = Path(argv[0] if argv else "benchmarks/out")
    summary = merge(out, since)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(table(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
