"""benchmarks/gpu_check.sh on the CPU machine: the shell logic around the GPU work (stages, the Gluon smoke
test's switch, the summary table) runs; every benchmark reports that it needs a GPU."""
import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(tmp_path, python, stages="kernels,summary", **extra_env):
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRITON_INTERPRET", "LX2V_ATTN_GLUON_OFF", "LX2V_ATTN", "LX2V_TUNED") and not k.startswith("GPU_CHECK_")}
    env.update(OUT=str(tmp_path / "out"), PYTHON=python, **extra_env)
    return subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--stages", stages],
                          capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)


def test_gpu_check_cpu_stages(tmp_path):
    res = _run(tmp_path, sys.executable)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "gluon smoke: not applicable" in res.stdout
    assert "switched off" not in res.stdout
    assert "needs a CUDA GPU" in res.stdout  # bench_kernels on a CPU machine
    assert (tmp_path / "out" / "summary.json").is_file()
    assert "step_ms_1.3b_bf16" in res.stdout  # the summary table, printed last


def _fake_python(tmp_path, cases: str, fake_c: bool = False):
    """A python3 stand-in: the given `case` arms for the benchmarks, the real interpreter for the rest;
    fake_c: `-c` one-liners (the environment line: torch and triton imported, seconds on a loaded 2-core
    machine, out of a budget of a few seconds) print a stand-in line."""
    if fake_c:
        cases += "\n  -c) echo 'fake python -c';;"
    fake = tmp_path / "python"
    fake.write_text(f"#!/usr/bin/env bash\ncase \"$1\" in\n{cases}\n  *) exec {sys.executable} \"$@\";;\nesac\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    return str(fake)


def test_gpu_check_skips_stages_the_time_budget_has_no_room_for(tmp_path):
    """With 45 s of budget, 20 kept for the summary, no stage has its 30 s: all are skipped, the unverified
    Gluon kernel is switched off, and the summary still comes last and names the skipped stages."""
    res = _run(tmp_path, sys.executable, stages="kernels,e2e,summary", GPU_CHECK_BUDGET="45")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for stage in ("gluon_smoke", "bench_kernels", "bench_e2e"):
        assert f"{stage}: skipped" in res.stdout
    assert "smoke test exit code 125" in res.stdout
    assert "needs a CUDA GPU" not in res.stdout  # no benchmark ran
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert "skipped" in summary["absent"]["<stage bench_kernels>"]
    assert res.stdout.rstrip().splitlines()[-1].startswith("  <")  # the table's absent-stage lines, last


def test_gpu_check_cuts_a_stage_at_the_time_left(tmp_path):
    """A benchmark that overruns is cut at the time left in the budget (not at its own 300 s cap), what it
    wrote stays, the stage after it is skipped with its reason (no time left), and the summary still runs."""
    fake = _fake_python(tmp_path, "  benchmarks/gluon_smoke.py) echo 'gluon smoke: ok'; exit 0;;\n"
                                  "  benchmarks/bench_kernels.py) echo measuring; exec sleep 60;;\n"
                                  "  benchmarks/bench_e2e.py) echo e2e-ran; exit 0;;", fake_c=True)
    t0 = time.time()
    res = _run(tmp_path, fake, stages="kernels,e2e,summary", GPU_CHECK_BUDGET="32", GPU_CHECK_MIN_STAGE="1")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert time.time() - t0 < 55  # (the budget and the cut's 10 s grace; not the 60 s sleep, nor 300 s)
    assert "bench_kernels: cut at" in res.stdout
    assert "measuring" in (tmp_path / "out" / "bench_kernels.log").read_text()
    assert "<stage bench_kernels>" in res.stdout
    assert "switched off" not in res.stdout
    assert "bench_e2e: skipped" in res.stdout and "e2e-ran" not in res.stdout and "<stage bench_e2e>" in res.stdout


def test_gpu_check_switches_gluon_off_when_its_smoke_test_fails(tmp_path):
    """A failing (or hung: exit code 124) smoke test exports LX2V_ATTN_GLUON_OFF=1 for the later stages."""
    fake = _fake_python(tmp_path, "  benchmarks/gluon_smoke.py) echo 'gluon smoke: WRONG'; exit 1;;\n"
                                  "  benchmarks/bench_kernels.py) echo \"LX2V_ATTN_GLUON_OFF=${LX2V_ATTN_GLUON_OFF:-unset}\"; "
                                  "exit 0;;")
    res = _run(tmp_path, fake)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "Gluon attention switched off for this run (smoke test exit code 1" in res.stdout
    assert "LX2V_ATTN_GLUON_OFF=1" in res.stdout


def _kernels_then_e2e(tmp_path, summary: dict, kernels_rc: int):
    """gpu_check's kernels and e2e stages with stand-ins: bench_kernels writes `summary` and exits with
    kernels_rc, bench_e2e prints the LX2V_TUNED it got."""
    out = tmp_path / "out"
    fake = _fake_python(tmp_path, "  benchmarks/gluon_smoke.py) echo 'gluon smoke: ok'; exit 0;;\n"
                                  f"  benchmarks/bench_kernels.py) echo '{json.dumps(summary)}' > {out}/kernels_summary.json;"
                                  f" exit {kernels_rc};;\n"
                                  "  benchmarks/bench_e2e.py) echo \"e2e LX2V_TUNED=${LX2V_TUNED:-unset}\"; exit 0;;")
    return _run(tmp_path, fake, stages="kernels,e2e,summary")


def test_gpu_check_hands_the_measured_winners_to_e2e_as_a_tuned_file(tmp_path):
    """After bench_kernels, the fastest correct kernels become $OUT/tuned/<device>.json and the end-to-end
    stage runs with LX2V_TUNED pointing there."""
    summary = {"gpu": "NVIDIA H100 80GB HBM3", "date": "d", "commit": "c", "torch": "t", "triton": "3.6.0",
               "attn_best_impl": "gluon:fa3_128x128_s2", "attn_best_triton_config": "ws_128x128_w4_s2",
               "attn_cross_best_impl": "sdpa_cudnn", "qk_norm_rope_row_bw_frac": 0.5,
               "qk_norm_rope_packed_bw_frac": 0.85}
    out = tmp_path / "out"
    res = _kernels_then_e2e(tmp_path, summary, 0)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    tuned = out / "tuned" / "NVIDIA_H100_80GB_HBM3.json"
    assert f"e2e LX2V_TUNED={out}/tuned" in res.stdout
    data = json.loads(tuned.read_text())
    assert data["choices"] == {"LX2V_ATTN": "gluon", "LX2V_ATTN_GLUON_CONFIG": "fa3_128x128_s2",
                               "LX2V_ATTN_CONFIG": "ws_128x128_w4_s2", "LX2V_CROSS_ATTN": "sdpa_cudnn",
                               "LX2V_QK_ROPE": "packed"}
    assert f"tuned defaults of this run: {tuned}" in res.stdout  # named in the summary table
    assert json.loads((out / "summary.json").read_text())["tuned"] == {str(tuned): data["choices"]}


def test_a_cut_kernels_stage_writes_no_tuned_file(tmp_path):
    """bench_kernels cut by its timeout (exit 124) after writing a summary without the configs it times last
    (Gluon): no tuned file, so the package's defaults stay (the cut run's choice would override them)."""
    summary = {"gpu": "NVIDIA H100 80GB HBM3", "attn_best_impl": "triton:ws_128x128_w4_s2",
               "attn_best_triton_config": "ws_128x128_w4_s2"}
    out = tmp_path / "out"
    res = _kernels_then_e2e(tmp_path, summary, 124)
    assert "e2e LX2V_TUNED=unset" in res.stdout and not (out / "tuned").exists(), res.stdout[-3000:]
    assert "no tuned file from this run (bench_kernels exit code 124)" in res.stdout


def test_stages_run_in_the_order_that_keeps_the_required_figures(tmp_path):
    """kernels, then bench_quant (its three required figures were lost to the budget when it ran last), then
    e2e, then the gpu tests, whatever order --stages names them in."""
    fake = _fake_python(tmp_path, "  benchmarks/gluon_smoke.py) echo 'gluon smoke: ok'; exit 0;;\n"
                                  "  benchmarks/bench_kernels.py) echo RAN-kernels; exit 0;;\n"
                                  "  benchmarks/bench_quant.py) echo RAN-quant; exit 0;;\n"
                                  "  benchmarks/bench_e2e.py) echo RAN-e2e; exit 0;;\n"
                                  "  -m) echo RAN-tests; exit 0;;")
    res = _run(tmp_path, fake, stages="tests,e2e,quant,kernels")
    ran = [line for line in res.stdout.splitlines() if line.startswith("RAN-")]
    assert ran == ["RAN-kernels", "RAN-quant", "RAN-e2e", "RAN-tests"], res.stdout[-3000:]


def test_gpu_check_ignores_a_kernels_summary_of_an_earlier_run(tmp_path):
    """A kernels_summary.json already in $OUT when the run starts (kernels stage not run, or it wrote
    nothing) is not turned into tuned defaults."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "kernels_summary.json").write_text(json.dumps({"gpu": "NVIDIA H100 80GB HBM3", "attn_best_impl": "sdpa_cudnn",
                                                          "attn_best_triton_config": "ws_128x128_w4_s2"}))
    old = time.time() - 3600
    os.utime(out / "kernels_summary.json", (old, old))
    fake = _fake_python(tmp_path, "  benchmarks/gluon_smoke.py) echo 'gluon smoke: ok'; exit 0;;\n"
                                  "  benchmarks/bench_kernels.py) exit 0;;\n"
                                  "  benchmarks/bench_e2e.py) echo \"e2e LX2V_TUNED=${LX2V_TUNED:-unset}\"; exit 0;;")
    res = _run(tmp_path, fake, stages="kernels,e2e,summary")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "e2e LX2V_TUNED=unset" in res.stdout and not (out / "tuned").exists()


def test_gpu_check_packs_its_outputs_for_a_small_transfer(tmp_path):
    """GPU_CHECK_PACK=1: every output in one archive, and beside it, flat, the files a reader needs first
    (at most 7: the device tool brings back 8), the tuned file included."""
    import tarfile
    fake = _fake_python(tmp_path, '  benchmarks/bench_kernels.py) mkdir -p "$OUT/deep/er"; echo x >"$OUT/deep/er/f.csv";'
                                  ' echo k >"$OUT/kernels.csv";;')
    out = tmp_path / "out"
    out.mkdir()
    (out / "tuned").mkdir()
    (out / "tuned" / "NVIDIA_H200.json").write_text('{"device": "NVIDIA H200"}')
    res = _run(tmp_path, fake, GPU_CHECK_PACK="1")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    left = sorted(p.name for p in out.iterdir())
    assert left == ["all.tar.gz", "stages_cut.txt", "summary.json", "summary_table.txt", "tuned_NVIDIA_H200.json"], left
    assert all(p.is_file() for p in out.iterdir())
    with tarfile.open(out / "all.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"./deep/er/f.csv", "./kernels.csv", "./summary.json", "./tuned/NVIDIA_H200.json"} <= names
    assert "step_ms_1.3b_bf16" in (out / "summary_table.txt").read_text()
    table = (out / "summary_table.txt").read_text().rstrip().splitlines()
    assert res.stdout.rstrip().splitlines()[-len(table):] == table  # the table is printed last, after "packed:"


def test_gpu_check_waits_for_the_extension_build_within_the_budget_only(tmp_path):
    """The extension build (background) is waited for only by stages that use it, and no longer than the
    budget's time left (the wait, up to 300 s, was outside the budget); a build no stage needs is stopped."""
    fake = _fake_python(tmp_path, "  -m) exit 0;;\n  setup.py) exec sleep 120;;\n"
                                  "  benchmarks/bench_quant.py) echo quant-ran; exit 0;;\n"
                                  "  benchmarks/bench_e2e.py) echo compile-ran; exit 0;;")
    t0 = time.time()
    res = _run(tmp_path, fake, stages="install,compile,summary", GPU_CHECK_BUDGET="200", GPU_CHECK_MIN_STAGE="1")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "compile-ran" in res.stdout and "extension build stopped: no stage of this run needed it" in res.stdout
    assert time.time() - t0 < 60
    t0 = time.time()
    res = _run(tmp_path, fake, stages="install,quant,summary", GPU_CHECK_BUDGET="24", GPU_CHECK_MIN_STAGE="1")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "extension build: stopped after" in res.stdout and time.time() - t0 < 60


def test_gpu_check_compile_stage_feeds_the_compiled_diffusers_figure(tmp_path):
    """The optional "compile" stage runs bench_e2e with --diffusers-compile into $OUT/compile/; the summary
    takes diffusers_step_ms_1.3b_compiled from there, while the main run's figures keep precedence."""
    fake = _fake_python(tmp_path, """  benchmarks/bench_e2e.py)
    shift; out=""; args="$*"
    while [ $# -gt 0 ]; do [ "$1" = --out ] && out=$2; shift; done
    mkdir -p "$out"
    case "$args" in
      *--diffusers-compile*) echo '{"env": {}, "figures": {"diffusers_step_ms_1.3b_compiled": 500.0, "diffusers_step_ms_1.3b_eager": 1.0}, "absent": {}}' >"$out/e2e_summary.json";;
      *) echo '{"env": {"gpu": "fake"}, "figures": {"diffusers_step_ms_1.3b_eager": 620.0}, "absent": {}}' >"$out/e2e_summary.json";;
    esac;;""")
    res = _run(tmp_path, fake, stages="e2e,compile,summary")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["figures"]["diffusers_step_ms_1.3b_compiled"] == 500.0
    assert summary["figures"]["diffusers_step_ms_1.3b_eager"] == 620.0
    assert "diffusers_step_ms_1.3b_compiled" not in summary["absent"]
    assert "diffusers torch.compile baseline" in res.stdout


def test_gpu_check_runs_the_gpu_tests_in_worker_processes_when_xdist_is_there(tmp_path):
    """The tests stage: with pytest-xdist importable, GPU_TEST_WORKERS processes (default 4) share the GPU,
    handed tests in run order (--dist load, so `last`-marked ones stay last); GPU_TEST_WORKERS=0, or no
    xdist, one process. Per-test times go to $OUT/gpu_test_times.txt either way."""
    for workers, xdist, expect in (("3", True, "-n 3 --dist load"), ("0", True, None), ("2", False, None)):
        fake = _fake_python(tmp_path, f"""  -c) case "$2" in *xdist*) exit {0 if xdist else 1};; *) echo fake-env; exit 0;; esac;;
  -m) echo "ARGS $* TIMES=$LX2V_TEST_TIMES" >"$OUT/pytest_args.txt";;""")
        out = tmp_path / "out"
        res = _run(tmp_path, fake, stages="tests", GPU_TEST_WORKERS=workers)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        args = (out / "pytest_args.txt").read_text()
        assert args.startswith("ARGS -m pytest -q -m gpu") and args.rstrip().endswith(f"TIMES={out.resolve()}/gpu_test_times.txt")
        if expect:
            assert expect in args and f"gpu tests: {expect}" in res.stdout
        else:
            assert " -n " not in args and "gpu tests: one process" in res.stdout


def test_summaries_of_an_earlier_run_are_not_this_runs_figures(tmp_path):
    """Summaries an earlier run left in $OUT (a crashed benchmark writes none) were merged as this run's
    figures, under this run's name: now summarize.py --since (gpu_check passes its start) names them stale
    and lists their producers absent; the optional compile stage's old file and old tuned files likewise."""
    out = tmp_path / "out"
    (out / "compile").mkdir(parents=True)
    (out / "tuned").mkdir()
    old_files = {"kernels_summary.json": {"gpu": "OLD", "modulate_bw_frac": 0.11},
                 "quant_summary.json": {"figures": {"gemm_fp8_ratio_vs_scaled_mm_min": 7.7}},
                 "e2e_summary.json": {"env": {"gpu": "OLD"}, "figures": {"step_ms_1.3b_bf16": 111.0}, "absent": {}},
                 "compile/e2e_summary.json": {"figures": {"diffusers_step_ms_1.3b_compiled": 42.0}},
                 "tuned/OLD.json": {"device": "OLD", "choices": {"LX2V_QK_ROPE": "chunk"}}}
    t_old = time.time() - 2 * 86400
    for name, data in old_files.items():
        (out / name).write_text(json.dumps(data))
        os.utime(out / name, (t_old, t_old))
    fake = _fake_python(tmp_path, "  benchmarks/gluon_smoke.py) echo 'gluon smoke: ok'; exit 0;;\n"
                                  "  benchmarks/bench_kernels.py) exit 1;;\n  benchmarks/bench_quant.py) exit 1;;\n"
                                  "  benchmarks/bench_e2e.py) exit 1;;")
    res = _run(tmp_path, fake, stages="kernels,quant,e2e,summary")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["figures"] == {} and s["tuned"] == {}, s["figures"]
    for producer in ("bench_kernels.py", "bench_quant.py", "bench_e2e.py", "bench_e2e.py --diffusers-compile"):
        assert "from an earlier run" in s["absent"][f"<{producer}>"], s["absent"]
    assert "OLD" not in (out / "summary_table.txt").read_text()
    # without --since (merging the outputs of several calls by hand) they are read
    summarize = _load_summarize()
    assert summarize.merge(out)["figures"]["step_ms_1.3b_bf16"] == 111.0


def _load_summarize():
    import importlib.util
    spec = importlib.util.spec_from_file_location("summarize", ROOT / "benchmarks" / "summarize.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_summary_table_says_when_a_step_figure_is_eager_or_a_variant_was_rejected(tmp_path):
    """A failed CUDA-graph capture leaves the eager time in step_ms_*; an 8-bit variant rejected for its
    error is not the 8-bit figure: the table says both."""
    summarize = _load_summarize()
    (tmp_path / "e2e_summary.json").write_text(json.dumps({"env": {}, "absent": {}, "figures": {
        "step_ms_1.3b_bf16": 500.0, "graph_capture_error_bf16_1.3b": "RuntimeError: capture failed",
        "step_8bit_rejected_1.3b": {"8bit_attn8": "rel. L2 vs the reference path 0.5 (limit 0.02)"}}}))
    table = summarize.table(summarize.merge(tmp_path))
    assert "graph_capture_error_bf16_1.3b: RuntimeError: capture failed" in table
    assert "step_8bit_rejected_1.3b: {'8bit_attn8'" in table


def test_a_stage_killed_after_its_cut_is_reported_cut(tmp_path):
    """A benchmark still running 10 s after the cut's TERM is killed: timeout returns 137, which was not
    counted as a cut (stages_cut.txt and the summary named nothing)."""
    fake = _fake_python(tmp_path, "  benchmarks/gluon_smoke.py) echo 'gluon smoke: ok'; exit 0;;\n"
                                  "  benchmarks/bench_kernels.py) trap '' TERM; echo measuring; sleep 60; exit 0;;",
                        fake_c=True)
    res = _run(tmp_path, fake, stages="kernels,summary", GPU_CHECK_BUDGET="32", GPU_CHECK_MIN_STAGE="1")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "bench_kernels: cut at" in (tmp_path / "out" / "stages_cut.txt").read_text(), res.stdout[-3000:]
    assert "<stage bench_kernels>" in res.stdout


def test_the_profile_stage_waits_for_the_extension_build(tmp_path):
    """profile times the fp8 linears' quantization, the extension's kernel: it ran beside the build, with
    the fallback (and then the build was stopped as "no stage of this run needed it")."""
    fake = _fake_python(tmp_path, "  setup.py) sleep 3; echo built; exit 0;;\n"
                                  "  -m) exit 0;;\n"
                                  "  benchmarks/gluon_smoke.py) echo 'gluon smoke: ok'; exit 0;;\n"
                                  "  benchmarks/profile_step.py) echo PROFILED; exit 0;;\n"
                                  "  -c) echo 'env'; exit 0;;")
    res = _run(tmp_path, fake, stages="install,profile", GPU_CHECK_BUDGET="120")
    out = res.stdout
    assert "extension build exit code: 0" in out and "no stage of this run needed it" not in out, out[-3000:]
    assert out.index("extension build exit code") < out.index("PROFILED")
    assert "gluon smoke: ok" in out


def test_summary_reasons_come_from_the_right_run(tmp_path):
    """The compile run's "skipped in this invocation (--skip vae)" reasons were copied onto required figures
    the main run lost to its cut; the fused quantization's speedup against the two passes' PyTorch
    reference (the extension not built yet) is not the required figure, and says why it is absent."""
    summarize = _load_summarize()
    out = tmp_path / "out"
    (out / "compile").mkdir(parents=True)
    (out / "e2e_summary.json").write_text(json.dumps({"env": {"gpu": "H200"}, "figures": {"step_ms_1.3b_bf16": 1.0},
                                                      "absent": {}}))
    (out / "compile" / "e2e_summary.json").write_text(json.dumps({
        "figures": {"diffusers_step_ms_1.3b_compiled": 42.0},
        "absent": {"vae_decode_ms": "skipped in this invocation (--skip vae)",
                   "diffusers_step_ms_14b_compiled": "not in --presets"}}))
    (out / "kernels_summary.json").write_text(json.dumps({
        "gpu": "H200", "modulate_quant_speedup_vs_two_pass": None, "modulate_quant_speedup_vs_two_pass_torch_ref": 2.9,
        "two_pass_per_token_quant": "PyTorch reference; csrc unavailable: not built"}))
    s = summarize.merge(out)
    assert "--skip vae" not in s["absent"]["vae_decode_ms"], s["absent"]["vae_decode_ms"]
    assert s["absent"]["diffusers_step_ms_14b_compiled"] == "not in --presets"
    assert s["figures"]["diffusers_step_ms_1.3b_compiled"] == 42.0
    why = s["absent"]["modulate_quant_speedup_vs_two_pass"]
    assert "PyTorch reference" in why and "_torch_ref" in why, why
