"""benchmarks/bench_kernels.py: the CPU-safe paths (no-GPU exit, --dry-run through the interpreter, summary)."""
import csv
import importlib.util
import json
import math
import os

import pytest
import torch

QK = importlib.import_module("lightx2v_engine.kernels.qk_norm_rope")  # the module, not the function

_PATH = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "bench_kernels.py")


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_kernels", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU exit")
def test_without_gpu_exits_zero(bench, tmp_path, capsys):
    assert bench.main(["--out", str(tmp_path)]) == 0
    assert "needs a CUDA GPU" in capsys.readouterr().out
    assert not os.listdir(tmp_path)


def test_dry_run_writes_csv_and_summary(bench, tmp_path, monkeypatch):
    calls = []

    def timed(fn, rep_ms=100):  # the check runs each kernel already: a distinct positive time per call
        calls.append(fn)
        return float(len(calls))
    monkeypatch.setattr(bench, "_bench_ms", timed)
    assert bench.main(["--dry-run", "--out", str(tmp_path), "--configs", "ptr_256x64_w8_s3,ws_128x128_w4_s2",
                       "--configs8", "ws_128x128_w4_s3,tma_128x128_w8_s3,ws_128x128_w4_s2_pv16"]) == 0
    with open(tmp_path / "kernels.csv") as f:
        rows = list(csv.DictReader(f))
    ops = {r["op"] for r in rows}
    qk_variants = [v for v in QK.QK_ROPE_IMPLS if v != "row"]
    assert {"tile", "chunk", "packed", "onepass_r1", "onepass_r2_t8"} <= set(qk_variants)
    assert ops == {"modulate", "gate_residual_modulate", "qk_norm_rope", *(f"qk_norm_rope_{v}" for v in qk_variants),
                   "rms_norm", "vae_rms_norm_silu", "attention", "attention_8bit", "self_attn_rope",
                   "modulate_quant_fp8", "gate_residual_modulate_quant_fp8", "modulate_quant_int8",
                   "gate_residual_modulate_quant_int8"}
    assert all(r["ok"] == "True" for r in rows), [r for r in rows if r["ok"] != "True"]
    impls = {r["impl"] for r in rows if r["op"] == "attention"}
    assert impls == {"triton:ptr_256x64_w8_s3", "triton:ws_128x128_w4_s2", "sdpa_flash"}
    impls8 = {r["impl"] for r in rows if r["op"] == "attention_8bit"}
    assert impls8 == {f"{k}:{c}" for k in ("triton8", "triton8_kernel_only")
                      for c in ("ws_128x128_w4_s3", "tma_128x128_w8_s3", "ws_128x128_w4_s2_pv16")}
    assert {r["shape"] for r in rows if r["op"] == "attention_8bit"} == {"B1 H2 D128 Lq80 Lk80"}  # self-attention only
    rope = {r["impl"] for r in rows if r["op"] == "self_attn_rope"}
    assert rope == {"pass"} | {f"prologue:{m}x{n}_w{w}_s{s}" for m, n, w, s in bench.ROPE_ATTN_CONFIGS}
    summary = json.loads((tmp_path / "kernels_summary.json").read_text())
    assert summary["self_attn_rope_prologue_ratio"] > 0 and summary["self_attn_rope_prologue_best"]
    # the pass it is timed against runs this run's fastest Triton config and q/k variant
    assert summary["self_attn_rope_baseline"].startswith("pass: q/k norm+RoPE ")
    assert summary["attn_best_triton_config"] in summary["self_attn_rope_baseline"]
    assert summary["rms_norm_bw_frac"] is not None and summary["vae_norm_bw_frac"] is not None
    # the fused quantization: the same bits as the two passes (ok), both timed
    # (no extension on the CPU: the two passes quantize with its PyTorch reference, a figure of its own name)
    assert summary["modulate_quant_bw_frac"] is not None and summary["modulate_quant_speedup_vs_two_pass"] is None
    assert summary["modulate_quant_speedup_vs_two_pass_torch_ref"] > 0
    assert summary["two_pass_per_token_quant"].startswith("PyTorch reference; csrc unavailable")
    assert {r["impl"] for r in rows if r["op"] == "modulate_quant_fp8"} == {"triton", "two_pass"}
    assert summary["qk_norm_rope_bw_frac"] == max(summary[f"qk_norm_rope_{v}_bw_frac"] for v in QK.QK_ROPE_IMPLS)
    for key in ("modulate_bw_frac", "qk_norm_rope_bw_frac", "attn_bf16_ratio_vs_cudnn", "attn_best_impl",
                "attn_triton_tflops", "attn_cudnn_tflops", "gpu", "torch", "triton", "commit", "date"):
        assert key in summary
    assert summary["attn_cudnn_tflops"] is None  # no cuDNN on the CPU
    assert summary["attn_best_triton_config"] in ("ptr_256x64_w8_s3", "ws_128x128_w4_s2")
    assert summary["attn_8bit_best_config"] in ("ws_128x128_w4_s3", "tma_128x128_w8_s3", "ws_128x128_w4_s2_pv16")
    assert 0.01 < summary["attn_8bit_relerr"] < 0.06
    assert summary["attn_8bit_ratio_vs_cudnn"] is None  # no cuDNN on the CPU


def test_quick_8bit_configs_exist(bench):
    from lightx2v_engine.kernels.attention_8bit import ATTN8_CONFIGS
    assert set(bench.QUICK_ATTN8) <= set(ATTN8_CONFIGS)


def test_unknown_config_is_an_error(bench, tmp_path):
    with pytest.raises(SystemExit):
        bench.main(["--dry-run", "--out", str(tmp_path), "--configs", "nope"])
    with pytest.raises(SystemExit):
        bench.main(["--dry-run", "--out", str(tmp_path), "--configs", "ws_128x128_w4_s2", "--configs8", "nope"])


def test_summary_on_fake_timings(bench):
    shape = "B1 H12 D128 Lq32760 Lk32760"

    def row(op, impl, ms, value, ratio, ok=True, shape=shape):
        return dict(op=op, shape=shape, impl=impl, ms=ms, tflops_or_gbps=value, ratio=ratio, ok=ok)

    rows = [
        row("modulate", "triton", 0.1, 2500.0, 0.85, shape="B1 L32760 C1536"),
        row("modulate", "triton", 0.3, 2400.0, 0.80, shape="B1 L32760 C5120"),
        row("modulate", "torch_eager", 1.0, 300.0, 0.1, shape="B1 L32760 C5120"),
        row("qk_norm_rope", "triton", 0.2, 2000.0, 0.7, shape="B1 L32760 C1536"),
        # right and fast at one width, wrong at the other: no figure (it must not become a tuned default)
        row("qk_norm_rope_onepass_r1", "triton", 0.1, 2900.0, 0.95, shape="B1 L32760 C1536"),
        row("qk_norm_rope_onepass_r1", "triton", 0.4, 2000.0, 0.75, ok=False, shape="B1 L32760 C5120"),
        row("attention", "triton:a", 12.0, 550.0, 11.0 / 12.0),
        row("attention", "triton:b", 10.0, 660.0, 1.1),
        row("attention", "triton:c", 9.0, 733.0, 1.2, ok=False),  # fast but wrong: never chosen
        row("attention", "triton:d", math.nan, math.nan, math.nan, ok=False),  # failed to compile
        row("attention", "sdpa_cudnn", 11.0, 600.0, 1.0),
        row("attention", "sdpa_flash", 18.0, 360.0, 0.6),
        row("attention", "triton:e", 1.0, 1.0, 1.0, shape="B1 H12 D128 Lq32760 Lk512"),  # other shape
        dict(row("attention_8bit", "triton8:x", 8.0, 800.0, 11 / 8.0), max_err=0.03),
        dict(row("attention_8bit", "triton8_kernel_only:x", 7.0, 900.0, 11 / 7.0), max_err=0.03),
        dict(row("attention_8bit", "triton8:y", 6.0, 900.0, 11 / 6.0, ok=False), max_err=0.3),  # too inaccurate
        dict(row("attention_8bit", "triton8:z", 9.0, 700.0, 11 / 9.0), max_err=0.02),
    ]
    s = bench.summarize(rows, shape)
    assert s["modulate_bw_frac"] == 0.80 and s["qk_norm_rope_bw_frac"] == 0.7
    assert s["qk_norm_rope_onepass_r1_bw_frac"] is None
    assert s["attn_best_triton_config"] == "b" and s["attn_best_impl"] == "triton:b"
    assert s["attn_bf16_ratio_vs_cudnn"] == pytest.approx(1.1)
    assert s["attn_triton_tflops"] == 660.0 and s["attn_cudnn_tflops"] == 600.0
    assert s["attn_cross_best_impl"] == "triton:e"
    assert s["attn_8bit_best_config"] == "x" and s["attn_8bit_relerr"] == 0.03
    assert s["attn_8bit_ratio_vs_cudnn"] == pytest.approx(11 / 8.0)
    assert s["attn_8bit_kernel_only_ratio_vs_cudnn"] == pytest.approx(11 / 7.0)


def test_a_failing_memory_op_costs_its_own_row_only(bench):
    """A kernel that raises (compile or launch error) becomes one failed row; the section goes on."""
    def boom():
        raise RuntimeError("triton compile error")
    x = torch.randn(4)
    rows = bench._guarded_rows("qk_norm_rope_x", "B1 L4 C4", boom, lambda: x, lambda: x, 32, "cpu", 1.0)
    assert len(rows) == 1 and rows[0]["ok"] is False and "triton compile error" in rows[0]["note"]
    assert math.isnan(rows[0]["ms"])
    good = bench._guarded_rows("modulate", "B1 L4 C4", lambda: x, lambda: x, lambda: x, 32, "cpu", 1.0)
    assert [r["impl"] for r in good] == ["triton", "torch_eager"] and good[0]["ok"]


def test_a_variant_that_writes_nothing_or_skips_work_is_wrong(bench, monkeypatch):
    """The q/k variants share their output buffers: a variant that launches nothing was checked against the
    previous variant's results, passed, and won at 34x the copy bandwidth. The checked call now fills the
    outputs with NaN first, and a fraction of the copy bandwidth above MAX_BW_FRAC is a failure."""
    real = QK.launch_qk_norm_rope

    def lazy(*a, impl=None, **kw):
        if impl == "tile":  # "tile" writes q only (k stays NaN)
            q, k, wq, wk, cos, sin, H, eps, qo, ko = a
            tmp = torch.empty_like(ko)
            real(q, k, wq, wk, cos, sin, H, eps, qo, tmp, impl="row")
        elif impl != "chunk":  # "chunk" does nothing
            real(*a, impl=impl, **kw)
    monkeypatch.setattr(QK, "launch_qk_norm_rope", lazy)
    rows = bench.bench_memory_ops([16], [256], "cpu", 1e9, qk_variants=["row", "chunk", "tile"], qk_only=True)
    ok = {r["op"]: r["ok"] for r in rows if r["impl"] == "triton"}
    assert ok == {"qk_norm_rope": True, "qk_norm_rope_chunk": False, "qk_norm_rope_tile": False}, rows
    fracs = bench.qk_variant_fracs(rows)
    assert fracs["chunk"] is None and fracs["row"] is not None
    fast = [dict(op="modulate", shape="s", impl="triton", ratio=33.9, ok=True)]
    assert bench._min_frac(fast, "modulate") is None
    assert bench._min_frac([dict(fast[0], ratio=0.95)], "modulate") == 0.95


def test_attention_without_an_sdpa_baseline_is_held_to_an_absolute_bound(bench, monkeypatch):
    """Where no SDPA backend runs, the error rule had an infinite baseline and passed anything: a kernel
    returning zeros was reported correct and written into the tuned file."""
    A = importlib.import_module("lightx2v_engine.kernels.attention")
    monkeypatch.setattr(bench, "_sdpa_available", lambda sd, device: False)
    monkeypatch.setattr(A, "attention_triton", lambda q, k, v, c, **kw: torch.zeros_like(q))
    rows = bench.bench_attention([(1, 20, 20)], ["ptr_256x64_w8_s3"], "cpu", torch.float16)
    assert rows and all(not r["ok"] for r in rows if r["op"] == "attention"), rows


def _summarize_module():
    spec = importlib.util.spec_from_file_location("summarize", os.path.join(os.path.dirname(_PATH), "summarize.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_pick_choices_names_8bit_config_and_fastest_qk_variant():
    mod = _summarize_module()
    s = {"attn_best_impl": "triton:ws", "attn_best_triton_config": "ws",
         "attn_8bit_best_config": "tma_128x128_w8_s3", "qk_norm_rope_row_bw_frac": 0.3,
         "qk_norm_rope_tile_bw_frac": 0.7, "qk_norm_rope_chunk_bw_frac": 0.5, "qk_norm_rope_packed_bw_frac": 0.9,
         "attn_cross_best_impl": "sdpa_cudnn"}
    assert mod.pick_choices(s) == {"LX2V_ATTN": "triton", "LX2V_ATTN_CONFIG": "ws", "LX2V_CROSS_ATTN": "sdpa_cudnn",
                                   "LX2V_ATTN8_CONFIG": "tma_128x128_w8_s3", "LX2V_QK_ROPE": "packed"}
    assert mod.pick_choices({}) == {}  # nothing measured: nothing chosen
    # norm+RoPE in the attention kernel: chosen only past the margin, and only under Triton self-attention
    assert mod.pick_choices({**s, "self_attn_rope_prologue_ratio": 1.05})["LX2V_SELF_ATTN_ROPE"] == "prologue"
    assert "LX2V_SELF_ATTN_ROPE" not in mod.pick_choices({**s, "self_attn_rope_prologue_ratio": 1.01})
    assert mod.pick_choices({"self_attn_rope_prologue_ratio": 1.5}) == {}  # no attention measured
    assert "LX2V_SELF_ATTN_ROPE" not in mod.pick_choices({**s, "attn_best_impl": "sdpa_cudnn",
                                                          "self_attn_rope_prologue_ratio": 1.5})


def test_write_tuned_round_trips_through_the_engine_reader(tmp_path):
    """The file summarize.py writes is what kernels/_util.py reads, under the GPU's file name; a CPU dry
    run writes none."""
    from lightx2v_engine.kernels import _util
    mod = _summarize_module()
    s = {"gpu": "NVIDIA H200", "date": "2026-11-27T00:00:00Z", "commit": "abc", "torch": "2.11", "triton": "3.6.0",
         "attn_best_impl": "sdpa_cudnn", "attn_best_triton_config": "ws_128x128_w4_s2",
         "attn_main_shape": "B1 H12 D128 Lq32760 Lk32760", "attn_cudnn_tflops": 600.0,
         "attn_8bit_best_config": "ws_128x128_w4_s2", "attn_8bit_tops": 900.0, "attn_8bit_relerr": 0.02}
    (tmp_path / "k.json").write_text(json.dumps(s))
    path = mod.write_tuned(tmp_path / "k.json", tmp_path / "tuned")
    assert path == tmp_path / "tuned" / _util.tuned_file_name("NVIDIA H200")
    assert _util.read_tuned(str(path), "NVIDIA H200") == {
        "LX2V_ATTN": "sdpa_cudnn", "LX2V_ATTN_CONFIG": "ws_128x128_w4_s2", "LX2V_ATTN8_CONFIG": "ws_128x128_w4_s2"}
    data = json.loads(path.read_text())
    assert data["measured"]["commit"] == "abc" and "attn_cudnn_tflops 600" in data["evidence"]["LX2V_ATTN"]
    assert "attn_8bit_relerr 0.02" in data["evidence"]["LX2V_ATTN8_CONFIG"]
    (tmp_path / "cpu.json").write_text(json.dumps({"gpu": "cpu (dry run)"}))
    with pytest.raises(ValueError, match="no GPU run"):
        mod.write_tuned(tmp_path / "cpu.json", tmp_path / "tuned")
    (tmp_path / "empty.json").write_text(json.dumps({"gpu": "NVIDIA H200", "modulate_bw_frac": 0.9}))
    assert mod.main(["--write-tuned", str(tmp_path / "empty.json"), str(tmp_path / "t2")]) == 1
    assert not (tmp_path / "t2").exists()  # nothing measured: no file (the package's then applies)


def test_summary_and_pick_with_gluon(bench):
    """A faster correct Gluon config becomes our best kernel and the e2e backend; a wrong one never does;
    cross-attention is then named explicitly (it would follow self-attention's backend)."""
    shape, cross = "B1 H12 D128 Lq32760 Lk32760", "B1 H12 D128 Lq32760 Lk512"

    def row(impl, ms, ok=True, shape=shape):
        return dict(op="attention", shape=shape, impl=impl, ms=ms, tflops_or_gbps=6600.0 / ms, ratio=11.0 / ms, ok=ok)

    rows = [row("triton:b", 10.0), row("sdpa_cudnn", 11.0), row("gluon:fa3", 9.0), row("gluon:fast", 5.0, ok=False),
            row("triton:b", 0.30, shape=cross), row("sdpa_cudnn", 0.20, shape=cross), row("gluon:fa3", 0.25, shape=cross)]
    s = bench.summarize(rows, shape)
    assert s["attn_best_impl"] == "gluon:fa3" and s["attn_bf16_best_ours"] == "gluon:fa3"
    assert s["attn_bf16_ratio_vs_cudnn"] == pytest.approx(11 / 9) and s["attn_gluon_best_config"] == "fa3"
    assert s["attn_gluon_ratio_vs_triton"] == pytest.approx(10 / 9) and s["attn_best_triton_config"] == "b"
    assert s["attn_cross_best_impl"] == "sdpa_cudnn"
    mod = _summarize_module()
    assert mod.pick_choices(s) == {"LX2V_ATTN": "gluon", "LX2V_ATTN_GLUON_CONFIG": "fa3", "LX2V_ATTN_CONFIG": "b",
                                   "LX2V_CROSS_ATTN": "sdpa_cudnn"}
    # Triton wins self-attention, Gluon cross-attention
    assert mod.pick_choices({"attn_best_impl": "triton:b", "attn_best_triton_config": "b",
                             "attn_cross_best_impl": "gluon:fa3"}) == {
        "LX2V_ATTN": "triton", "LX2V_ATTN_CONFIG": "b", "LX2V_ATTN_GLUON_CONFIG": "fa3", "LX2V_CROSS_ATTN": "gluon"}
    # a Triton cross-attention winner whose config is not the one the file sets for the backend: the file
    # would run a config never timed at 512 keys, so cross-attention follows self-attention's choice
    assert mod.pick_choices({"attn_best_impl": "sdpa_cudnn", "attn_best_triton_config": "ws_mp",
                             "attn_cross_best_impl": "triton:ptr"}) == {"LX2V_ATTN": "sdpa_cudnn",
                                                                        "LX2V_ATTN_CONFIG": "ws_mp"}
    assert mod.pick_choices({"attn_best_impl": "sdpa_cudnn", "attn_best_triton_config": "ptr",
                             "attn_cross_best_impl": "triton:ptr"})["LX2V_CROSS_ATTN"] == "triton"


def test_csv_files_are_histories(bench, tmp_path, monkeypatch):
    """kernels.csv (like quant.csv and e2e.csv) gains each run's rows; a file with another column set is
    moved aside rather than mixed."""
    monkeypatch.syspath_prepend(os.path.dirname(_PATH))
    from csv_history import append_csv
    row = dict(op="modulate", shape="L8", impl="triton", ms=0.5, ok=True)
    bench.write_outputs([row], {}, dict(gpu="g", commit="c1"), str(tmp_path))
    bench.write_outputs([dict(row, impl="torch_eager")], {}, dict(gpu="g", commit="c2"), str(tmp_path))
    with open(tmp_path / "kernels.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["impl"], r["commit"]) for r in rows] == [("triton", "c1"), ("torch_eager", "c2")]
    path = str(tmp_path / "h.csv")
    append_csv(path, ["a", "b"], [dict(a=1, b=2)])
    append_csv(path, ["a", "b", "c"], [dict(a=3, b=4, c=5)])
    with open(path) as f:
        assert list(csv.DictReader(f)) == [dict(a="3", b="4", c="5")]
    moved = [n for n in os.listdir(tmp_path) if n.startswith("h.") and n != "h.csv"]
    assert len(moved) == 1
    with open(tmp_path / moved[0]) as f:
        assert list(csv.DictReader(f)) == [dict(a="1", b="2")]
