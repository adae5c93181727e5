"""CUDA-graph replay equals the eager loop (GPU), and the benchmark scripts' CPU paths work."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from lightx2v_engine.pipeline import Pipeline


@pytest.mark.gpu
@pytest.mark.parametrize("preset", ["tiny", "tiny-i2v"])
def test_graph_replay_equals_eager(preset):
    pipe = Pipeline.random(preset, {"target_video_length": 9, "target_height": 64, "target_width": 96}, device="cuda")
    image = torch.rand(3, 64, 96) * 2 - 1 if preset == "tiny-i2v" else None
    pipe.use_cuda_graph = False
    eager = pipe.generate("a cat", image=image, seed=3)
    pipe.use_cuda_graph = True
    graphed = pipe.generate("a cat", image=image, seed=3)
    assert pipe._graphs, "no graph was captured"
    # each graph set holds the RoPE tables its replays read (the DiT's cache may drop them)
    assert all(g.keepalive.cos.shape[0] == 3 * 4 * 6 for g in pipe._graphs.values())
    assert graphed.timings.items["graph capture"] > 0 and "graph capture" not in eager.timings.items
    # replay with every input new (prompt, image, seed): equal to the eager run of them, so that no input
    # buffer of the capture (context, clip features, image latents, noise) is left stale
    image2 = torch.rand(3, 64, 96) * 2 - 1 if preset == "tiny-i2v" else None
    again = pipe.generate("a red fox in the snow", image=image2, seed=4)
    assert "graph capture" not in again.timings.items  # (the cached graphs)
    err = ((graphed.latents - eager.latents).norm() / eager.latents.norm()).item()
    assert err <= 1e-6, err
    pipe.use_cuda_graph = False
    eager2 = pipe.generate("a red fox in the snow", image=image2, seed=4)
    err2 = ((again.latents - eager2.latents).norm() / eager2.latents.norm()).item()
    assert err2 <= 1e-6 and not torch.equal(eager2.latents, eager.latents), err2


@pytest.mark.gpu
@pytest.mark.parametrize("preset", ["tiny", "tiny-i2v"])
def test_graph_replay_with_cfg_equals_eager(preset):
    """The guided loop under replay: the batch-2 context (prompt, negative prompt), the expanded timestep and
    the guidance scale baked into the captured step. A new scale captures anew (it is in the key)."""
    import dataclasses
    size = {"target_video_length": 5, "target_height": 32, "target_width": 48, "enable_cfg": True,
            "sample_guide_scale": 5.0}
    pipe = Pipeline.random(preset, size, device="cuda")
    image = torch.rand(3, 32, 48) * 2 - 1 if preset == "tiny-i2v" else None
    results = {}
    for scale in (5.0, 2.0):
        pipe.run_cfg = dataclasses.replace(pipe.run_cfg, sample_guide_scale=scale)
        for graphs in (False, True):
            pipe.use_cuda_graph = graphs
            results[scale, graphs] = pipe.generate("a dog", negative_prompt="blurry", image=image, seed=5).latents
    assert len(pipe._graphs) == 2
    for scale in (5.0, 2.0):
        eager, graphed = results[scale, False], results[scale, True]
        assert ((graphed - eager).norm() / eager.norm()).item() <= 1e-6, scale
    assert not torch.equal(results[5.0, False], results[2.0, False])


@pytest.mark.gpu
def test_graph_replay_renoise_mode():
    cfg = {"target_video_length": 5, "target_height": 32, "target_width": 48, "distill_update": "renoise"}
    pipe = Pipeline.random("tiny", cfg, device="cuda")
    pipe.use_cuda_graph = False
    eager = pipe.generate("a dog", seed=5)
    pipe.use_cuda_graph = True
    graphed = pipe.generate("a dog", seed=5)
    assert ((graphed.latents - eager.latents).norm() / eager.latents.norm()).item() <= 1e-6


@pytest.mark.gpu
def test_failed_capture_says_why_and_runs_eagerly(caplog):
    """A forward that synchronises during capture (illegal there): the error names the step and the cause,
    the current stream is the default one again, the run finishes eagerly with the eager result."""
    cfg = {"target_video_length": 5, "target_height": 32, "target_width": 48}
    pipe = Pipeline.random("tiny", cfg, device="cuda")
    pipe.use_cuda_graph = False
    eager = pipe.generate("a dog", seed=5)
    forward = pipe.dit.forward

    def syncing(*a, **k):
        if torch.cuda.is_current_stream_capturing():
            torch.cuda.synchronize()
        return forward(*a, **k)

    pipe.dit.forward = syncing
    pipe.use_cuda_graph = True
    with caplog.at_level("ERROR"):
        out = pipe.generate("a dog", seed=5)
    assert "CUDA graph capture failed" in caplog.text and "denoising step 1" in caplog.text
    assert not pipe.use_cuda_graph and not pipe._graphs
    assert torch.cuda.current_stream() == torch.cuda.default_stream()
    assert torch.equal(out.latents, eager.latents)


@pytest.mark.gpu
def test_graphs_are_cached_per_op_choice():
    """Switching the ops backend after a capture captures anew instead of replaying the other ops."""
    from lightx2v_engine import ops
    cfg = {"target_video_length": 5, "target_height": 32, "target_width": 48}
    pipe = Pipeline.random("tiny", cfg, device="cuda")
    pipe.generate("a dog", seed=5)
    try:
        ops.set_backend("torch")
        pipe.generate("a dog", seed=5)
    finally:
        ops.set_backend("auto")
    assert len(pipe._graphs) == 2


@pytest.mark.gpu
def test_graph_sets_are_bounded_least_recently_used():
    """A pipeline asked for many sizes (the HTTP server) keeps MAX_GRAPH_SHAPES graph sets, dropping the
    least recently used one, and a dropped shape captures again with the same result."""
    from lightx2v_engine import pipeline as pipeline_mod
    pipe = Pipeline.random("tiny", {"target_video_length": 5, "target_height": 32, "target_width": 48}, device="cuda")
    first = pipe.generate("a dog", seed=5, height=32, width=48).latents
    pipe.generate("a dog", seed=5, height=48, width=32)
    pipe.generate("a dog", seed=5, height=32, width=48)  # used again: now the most recent
    pipe.generate("a dog", seed=5, height=64, width=32)  # evicts 48x32, not 32x48
    assert len(pipe._graphs) == pipeline_mod.MAX_GRAPH_SHAPES == 2
    assert [k[0][-2:] for k in pipe._graphs] == [(4, 6), (8, 4)]
    assert pipe.use_cuda_graph
    assert torch.equal(pipe.generate("a dog", seed=5, height=32, width=48).latents, first)


def _load(name):
    spec = importlib.util.spec_from_file_location(name, Path(__file__).parent.parent / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_e2e_dry_run_and_summary(tmp_path):
    bench_e2e, summarize = _load("bench_e2e"), _load("summarize")
    assert bench_e2e.main(["--dry-run", "--out", str(tmp_path)]) == 0
    e2e = json.loads((tmp_path / "e2e_summary.json").read_text())
    for k in ("step_ms_tiny_bf16", "step_ms_tiny_8bit", "vae_decode_ms", "distill_speedup_vs_50step_cfg",
              "text_encode_ms", "step_ms_tiny_reference", "lightvae_decode_ms", "tae_decode_ms",
              "tae_speedup_vs_vae", "video_s_tiny_bf16", "video_s_tiny_8bit_tae"):
        assert e2e["figures"][k] > 0, k
    f = e2e["figures"]
    assert f["video_s_tiny_bf16"] == pytest.approx((f["text_encode_ms"] + 4 * f["step_ms_tiny_bf16"]
                                                    + f["vae_decode_ms"]) / 1e3)
    assert e2e["figures"]["engine_vs_reference_relerr_tiny"] < 1e-2
    assert e2e["figures"]["vae_decode_tiled_ms"] > 0 and 0 < e2e["figures"]["vae_tiled_vs_untiled_relerr"] < 1
    assert e2e["figures"]["offload_relerr_tiny"] == 0  # the streamed blocks compute what the resident ones do
    # the 8-bit inputs quantized in the modulation: the same output as the two passes, both timed
    assert e2e["figures"]["input_quant_fusion_bitwise_tiny"] is True
    assert e2e["figures"]["input_quant_fusion_speedup_tiny"] > 0
    f = e2e["figures"]
    assert f["lora_switch_first_ms_tiny"] > 0 and f["lora_switch_host_gib_tiny"] > 0
    assert f["lora_switch_same_ms_tiny"] >= 0 and f["lora_switch_other_ms_tiny"] > 0  # (timed, not compared)
    for k in ("offload_step_ms_tiny", "offload_h2d_gbps_tiny", "offload_step_ratio_vs_resident_tiny"):
        assert e2e["figures"][k] > 0, k
    assert e2e["figures"]["vae_decode_relerr_vs_diffusers"] < 1e-4
    assert e2e["figures"]["ops"].startswith("ops: ")  # what ran, recorded beside the times
    assert summarize.main([str(tmp_path)]) == 0
    assert "ops: " in summarize.table(json.loads((tmp_path / "summary.json").read_text()))  # shown under "also"
    s = json.loads((tmp_path / "summary.json").read_text())
    for k in summarize.REQUIRED:  # every required figure is present or absent with a reason
        assert s["figures"].get(k) is not None or s["absent"].get(k), k
    assert "<bench_kernels.py>" in s["absent"]  # its summary file is missing in this run


def test_bench_e2e_8bit_figure_needs_agreement_with_the_reference():
    """step_ms_<tag>_8bit is the faster 8-bit variant whose output agrees with the reference path (a wrong
    8-bit attention must not become the published figure), the rejected ones named with their error."""
    pick = _load("bench_e2e").pick_8bit
    s = {"step_ms_x_8bit_linears": 10.0, "engine_8bit_vs_reference_relerr_x": 7e-3,
         "step_ms_x_8bit_attn8": 8.0, "engine_8bit_attn8_vs_reference_relerr_x": 7.7e-3}
    pick(s, "x")
    assert s["step_ms_x_8bit"] == 8.0 and s["step_8bit_variant_x"] == "8bit_attn8"
    s["engine_8bit_attn8_vs_reference_relerr_x"] = 0.9
    pick(s, "x")
    assert s["step_ms_x_8bit"] == 10.0 and s["step_8bit_variant_x"] == "8bit_linears"
    assert "rel. L2 vs the reference path 0.9" in s["step_8bit_rejected_x"]["8bit_attn8"]
    s["engine_8bit_vs_reference_relerr_x"] = float("nan")
    pick(s, "x")
    assert "step_ms_x_8bit" not in s and "step_8bit_variant_x" not in s
    assert set(s["step_8bit_rejected_x"]) == {"8bit_linears", "8bit_attn8"}


def test_evicted_graph_sets_are_freed(monkeypatch):
    """An evicted graph set refers to itself through its velocity closure: without the cycle collector its
    memory pool would stay alive past eviction. Checked on the CPU with a stand-in for DistillGraphs."""
    import gc
    import weakref
    from lightx2v_engine import cuda_graph, pipeline as pipeline_mod
    from lightx2v_engine.schedulers import DistillSampler
    alive = []

    class StubGraphs:
        def __init__(self, velocity, sampler, x, *rest):
            self.velocity, self.pool = velocity, torch.empty(1)
            alive.append(weakref.ref(self))

        def warm_up(self):
            pass

        def capture(self):
            pass

        def set_inputs(self, *args):
            pass

        def run_step(self, i):
            return None

    monkeypatch.setattr(cuda_graph, "DistillGraphs", StubGraphs)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    pipe = Pipeline.random("tiny", {"target_video_length": 5, "target_height": 32, "target_width": 48}, device="cpu")
    sampler = DistillSampler.from_step_list((1000, 750, 500, 250), 5.0, "deterministic")
    ctx = torch.zeros(1, 512, pipe.model_cfg.text_dim)
    gc.disable()  # only the eviction's own collection may free the set
    try:
        for h in (4, 6, 8):
            pipe._graph_runner(torch.zeros(1, 16, 2, h, 6), ctx, None, None, None, sampler, [], torch.zeros(4))
        assert len(pipe._graphs) == pipeline_mod.MAX_GRAPH_SHAPES
        assert alive[0]() is None and alive[1]() is not None and alive[2]() is not None
    finally:
        gc.enable()


class _FakeCuda:
    """torch.cuda's stream/graph primitives as CPU stand-ins (a captured body runs eagerly), so that the
    capture and fallback logic of DistillGraphs and Pipeline._graph_runner runs on the CPU."""

    def __init__(self, monkeypatch):
        import contextlib
        import gc
        import weakref
        from lightx2v_engine import cuda_graph, pipeline as pipeline_mod
        self.graphs, self.streams, self.graph_kwargs, self.released = [], [], [], []
        fake = self

        class Stream:
            def __init__(self, device=None):
                self.device = device
                fake.streams.append(self)

            def wait_stream(self, other):
                pass

        class Graph:
            def __init__(self):
                fake.graphs.append(weakref.ref(self))

            def pool(self):
                return ("pool", id(self))

            def replay(self):
                pass

        fake.end_error = None  # raised when a capture ends after its body raised (an invalidated capture)

        @contextlib.contextmanager
        def graph(g, pool=None, stream=None, **kwargs):
            fake.graph_kwargs.append(dict(pool=pool, stream=stream))
            try:
                yield
            except Exception:
                if fake.end_error is not None:
                    raise fake.end_error
                raise

        for name, value in dict(Stream=Stream, CUDAGraph=Graph, graph=graph,
                                stream=lambda s: contextlib.nullcontext(), current_stream=lambda *a: Stream(),
                                set_stream=lambda s: None, synchronize=lambda *a: None,
                                empty_cache=lambda: None).items():
            monkeypatch.setattr(torch.cuda, name, value)
        init = cuda_graph.DistillGraphs.__init__

        def cpu_init(self, *args):  # (only the CUDA-tensor check is bypassed)
            torch.Tensor.is_cuda = property(lambda t: True)
            try:
                init(self, *args)
            finally:
                del torch.Tensor.is_cuda
        monkeypatch.setattr(cuda_graph.DistillGraphs, "__init__", cpu_init)

        def release():  # which fake graphs are still alive once the collector has run
            gc.collect()
            fake.released.append([r() is not None for r in fake.graphs])
        monkeypatch.setattr(pipeline_mod, "_release_graph_memory", release)


def _graph_case(monkeypatch):
    """A tiny CPU pipeline with graphs on; plan["at"] = n makes velocity call n (counted in `calls`: 1 is a
    new shape's warm-up step, 2.. the capture of step 1..) raise plan["error"]. -> fake, pipe, call, calls, plan"""
    from lightx2v_engine.schedulers import DistillSampler
    fake = _FakeCuda(monkeypatch)
    pipe = Pipeline.random("tiny", {"target_video_length": 5, "target_height": 32, "target_width": 48}, device="cpu")
    pipe.use_cuda_graph = True
    calls, plan = [], {"at": None, "error": None}
    velocity = pipe._velocity

    def counted(*a, **k):
        calls.append(1)
        if len(calls) == plan["at"]:
            raise plan["error"]
        return velocity(*a, **k)
    monkeypatch.setattr(pipe, "_velocity", counted)
    sampler = DistillSampler.from_step_list((1000, 750, 500, 250), 5.0, "deterministic")
    ctx = torch.zeros(1, 512, pipe.model_cfg.text_dim)

    def call(h=4):
        calls.clear()
        return pipe._graph_runner(torch.randn(1, 16, 2, h, 6), ctx, None, None, None, sampler, [],
                                  sampler.timestep_tensor())
    return fake, pipe, call, calls, plan


def test_capture_failure_turns_graphs_off(monkeypatch, caplog):
    """Any other capture failure (an op illegal in capture): graphs off, every cached set dropped, freed."""
    fake, pipe, call, calls, plan = _graph_case(monkeypatch)
    assert call(h=6) is not None
    plan.update(at=2, error=RuntimeError("operation not permitted when stream is capturing"))
    with caplog.at_level("ERROR"):
        assert call(h=4) is None
    assert "CUDA graph capture failed" in caplog.text and "denoising step 1" in caplog.text
    assert not pipe.use_cuda_graph and not pipe._graphs and not any(fake.released[-1]), fake.released


def test_warm_up_failure_is_not_a_graph_failure(monkeypatch, caplog):
    """The warm-up step is an eager step: its error (bad input, out of memory) is the model's, met again by
    the eager run of this call; graphs stay on and the next call captures."""
    fake, pipe, call, calls, plan = _graph_case(monkeypatch)
    plan.update(at=1, error=ValueError("something the eager step says too"))
    with caplog.at_level("WARNING"):
        assert call() is None
    assert "warm-up step failed" in caplog.text
    assert pipe.use_cuda_graph and not pipe._graph_skip
    plan.update(at=None)
    assert call() is not None and len(pipe._graphs) == 1


def test_capture_runs_on_a_stream_of_the_tensors_device(monkeypatch):
    """torch.cuda.graph's own capture stream is made once per process on the device current then: a
    pipeline on cuda:1 after one on cuda:0 captured on GPU 0. Warm-up and capture use a stream of x's device."""
    fake, pipe, call, calls, plan = _graph_case(monkeypatch)
    assert call() is not None
    graphs = next(iter(pipe._graphs.values()))
    assert graphs.stream.device == torch.device("cpu")  # x's device (here the CPU stand-in)
    assert len(fake.graph_kwargs) == 4 and all(k["stream"] is graphs.stream for k in fake.graph_kwargs)


def test_graph_key_follows_the_8bit_linear_switches(monkeypatch):
    """set_int8_gemm / set_input_quant_fusion change the kernels a captured step runs: a new capture."""
    from lightx2v_engine import quant
    fake, pipe, call, calls, plan = _graph_case(monkeypatch)
    call()
    monkeypatch.setattr(quant, "_int8_gemm", "cublas" if quant.kernel_choices()[1] == "triton" else "triton")
    call()
    monkeypatch.setattr(quant, "_FUSE_INPUT_QUANT", not quant.kernel_choices()[0])
    call()
    assert len(pipe._graphs) == 2 and len({k[-1] for k in pipe._graphs}) == 2  # (MAX_GRAPH_SHAPES: 2 kept)


def test_graphs_on_a_cpu_pipeline_run_eagerly():
    """use_cuda_graph set by hand on a CPU pipeline: the loop tried a capture, and the failed warm-up's
    clean-up (torch.cuda.synchronize) raised "Torch not compiled with CUDA enabled". Now it runs eagerly."""
    size = {"target_video_length": 5, "target_height": 32, "target_width": 48}
    pipe = Pipeline.random("tiny", size, device="cpu")
    eager = pipe.generate("a dog", seed=5).latents
    pipe.use_cuda_graph = True
    assert torch.equal(pipe.generate("a dog", seed=5).latents, eager) and not pipe._graphs


def test_graph_key_follows_the_inputs_dtypes(monkeypatch):
    """The static buffers take the first call's dtypes: a later call with the same shapes in another dtype
    (fp32 noise after bf16 noise, fp32 CLIP features after fp16) was copied - rounded - into them and
    replayed, where the eager run computes in its own dtypes. Each dtype set is its own capture."""
    from lightx2v_engine.schedulers import DistillSampler
    fake, pipe, call, calls, plan = _graph_case(monkeypatch)
    sampler = DistillSampler.from_step_list((1000, 750, 500, 250), 5.0, "deterministic")
    ctx = torch.zeros(1, 512, pipe.model_cfg.text_dim)
    for dtype in (torch.bfloat16, torch.float32, torch.bfloat16):
        x = torch.randn(1, 16, 2, 4, 6).to(dtype)
        assert pipe._graph_runner(x, ctx, None, None, None, sampler, [], sampler.timestep_tensor()) is not None
    assert len(pipe._graphs) == 2
    assert {k[4][0] for k in pipe._graphs} == {torch.bfloat16, torch.float32}


def test_graph_key_is_taken_after_the_warm_up(monkeypatch):
    """A kernel failing in the warm-up turns itself off, which changes the ops the key names: the set is
    stored under the key after it (it was stored under the stale one, never found, and captured again)."""
    from lightx2v_engine import ops
    fake, pipe, call, calls, plan = _graph_case(monkeypatch)
    state = ["gluon available"]
    monkeypatch.setattr(ops, "describe", lambda *a, **k: state[0])
    velocity = pipe._velocity

    def turning_off(*a, **k):
        state[0] = "gluon off after a failure"
        return velocity(*a, **k)
    monkeypatch.setattr(pipe, "_velocity", turning_off)
    call()
    assert call() is not None and calls == [] and len(pipe._graphs) == 1  # found: no second capture


def test_graph_inputs_made_under_inference_mode(monkeypatch):
    """A first call under torch.inference_mode makes the static buffers inference tensors: a later call
    outside it wrote into them and failed ('Inplace update to inference tensor outside InferenceMode')."""
    fake, pipe, call, calls, plan = _graph_case(monkeypatch)
    with torch.inference_mode():
        assert call() is not None
    assert call() is not None
    with torch.no_grad():
        assert call() is not None


def test_graphs_hold_their_model(monkeypatch):
    """id(dit) is in the key: the set holds the model so that no other model can take that id."""
    fake, pipe, call, calls, plan = _graph_case(monkeypatch)
    call()
    assert next(iter(pipe._graphs.values())).dit is pipe.dit


def test_capture_alone_warms_up_first(monkeypatch):
    """capture() without warm_up() (bench_e2e calls it so) runs the warm-up step first: first-time work
    (Triton compilation, autotuning) inside a capture fails it."""
    from lightx2v_engine.cuda_graph import DistillGraphs
    from lightx2v_engine.schedulers import DistillSampler
    _FakeCuda(monkeypatch)
    sampler = DistillSampler.from_step_list((1000, 750, 500, 250), 5.0, "deterministic")
    seen = []

    def velocity(x, t, *conds):
        seen.append(1)
        return torch.zeros_like(x)
    g = DistillGraphs(velocity, sampler, torch.randn(1, 16, 1, 2, 2), torch.zeros(1, 4, 8), None, None, None, [],
                      sampler.timestep_tensor())
    g.capture()
    assert g.warmed_up and len(seen) == 1 + 4 and len(g.graphs) == 4


def test_bench_e2e_keeps_going_past_a_failing_section(tmp_path, monkeypatch):
    """One error (the 8-bit pass's first GPU run of a kernel; a section's) cost every end-to-end figure: the
    summary was written after whole sections only, and nothing caught. Now the bf16 figures stand, the
    error is recorded and named as the absent figures' reason, and the later sections run."""
    bench_e2e = _load("bench_e2e")
    from lightx2v_engine import quant

    def broken(*a, **k):
        raise RuntimeError("simulated 8-bit failure")
    monkeypatch.setattr(quant, "quantize_dit_", broken)
    monkeypatch.setattr(bench_e2e, "bench_text", broken)
    assert bench_e2e.main(["--dry-run", "--out", str(tmp_path), "--skip", "distill"]) == 0
    e2e = json.loads((tmp_path / "e2e_summary.json").read_text())
    f = e2e["figures"]
    assert f["step_ms_tiny_bf16"] > 0 and f["step_ms_tiny_reference"] > 0  # measured before the failure
    assert "simulated 8-bit failure" in f["section_error_dit_8bit_tiny"]
    assert "step_ms_tiny_8bit" not in f and "simulated 8-bit failure" in e2e["absent"]["step_ms_tiny_8bit"]
    assert "simulated" in f["section_error_text"] and f["vae_decode_ms"] > 0  # a later section still ran
    assert not list(tmp_path.glob(".*.tmp"))  # (written whole, then moved into place)


def test_summarize_names_a_half_written_summary(tmp_path):
    """A stage killed while writing its summary (before the writes were atomic) made summarize raise: no
    table at all. Now that producer is named absent and the table is printed."""
    summarize = _load("summarize")
    (tmp_path / "e2e_summary.json").write_text('{"env": {"gpu": "H100"}, "figures": {"step_ms_1.3b_bf16": 46')
    s = summarize.merge(tmp_path)
    assert "unreadable" in s["absent"]["<bench_e2e.py>"] and "cut while writing" in s["absent"]["<bench_e2e.py>"]
    assert "step_ms_1.3b_bf16" in summarize.table(s)


def test_out_of_memory_in_the_warm_up_keeps_the_shape_eager(monkeypatch, caplog):
    """An out-of-memory warm-up step (an eager step) is remembered for its shape like a capture's: it was
    tried again, a failing partial step, on every call."""
    fake, pipe, call, calls, plan = _graph_case(monkeypatch)
    plan.update(at=1, error=torch.OutOfMemoryError("CUDA out of memory (simulated)"))
    with caplog.at_level("WARNING"):
        assert call() is None
    assert "warm-up step" in caplog.text and pipe.use_cuda_graph and len(pipe._graph_skip) == 1
    assert call() is None and calls == []


def test_out_of_memory_whose_capture_failed_to_end_turns_graphs_off(monkeypatch, caplog):
    """Out of memory inside a capture that then failed to end (an invalidated capture: PyTorch may keep that
    graph's pool and a capture-underway mark in its allocator): a graph failure, not a shape to skip."""
    fake, pipe, call, calls, plan = _graph_case(monkeypatch)
    fake.end_error = RuntimeError("CUDA error: operation failed due to a previous error during capture")
    plan.update(at=3, error=torch.OutOfMemoryError("CUDA out of memory (simulated)"))
    with caplog.at_level("ERROR"):
        assert call() is None
    assert not pipe.use_cuda_graph and not pipe._graph_skip and "denoising step 2" in caplog.text


def test_bench_e2e_cut_keeps_what_it_measured(tmp_path, monkeypatch):
    """gpu_check's timeout cuts a stage with SIGTERM: bench_e2e saved its summary at section ends only, and
    its CSV rows and whole-video figures only at the very end, so a cut lost the section under way (the 14B
    bf16 step during its 8-bit part) and every row. Now a cut saves all that was measured, and each
    section's rows are appended as it ends."""
    import csv
    import os
    import signal
    bench_e2e = _load("bench_e2e")
    before = signal.getsignal(signal.SIGTERM)

    def cut(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)
    monkeypatch.setattr(bench_e2e, "_bench_dit_8bit", cut)  # (mid-section: after the bf16 figures)
    with pytest.raises(SystemExit) as e:
        bench_e2e.main(["--dry-run", "--out", str(tmp_path / "a")])
    assert e.value.code == 128 + signal.SIGTERM and signal.getsignal(signal.SIGTERM) is before
    f = json.loads((tmp_path / "a" / "e2e_summary.json").read_text())["figures"]
    assert f["step_ms_tiny_bf16"] > 0 and f["step_ms_tiny_reference"] > 0
    monkeypatch.undo()
    monkeypatch.setattr(bench_e2e, "bench_distill_speedup", cut)  # (after the DiT, text and VAE sections)
    with pytest.raises(SystemExit):
        bench_e2e.main(["--dry-run", "--out", str(tmp_path / "b")])
    f = json.loads((tmp_path / "b" / "e2e_summary.json").read_text())["figures"]
    assert f["video_s_tiny_bf16"] > 0 and "distill_speedup_vs_50step_cfg" not in f
    with open(tmp_path / "b" / "e2e.csv", newline="") as fh:
        impls = [r["impl"] for r in csv.DictReader(fh) if r["what"] == "dit_step_tiny"]
    assert "bf16_eager" in impls and "reference_eager" in impls
