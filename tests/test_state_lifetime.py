"""State that must not outlive its use or survive an interruption: an interrupted LoRA restore is finished
by the next switch; a pipeline holding CUDA-graph sets is freed by reference counting alone; the DiT's
per-device caches go when it is moved back to the CPU."""
import gc
import weakref

import pytest
import torch

from lightx2v_engine import lora as lora_mod
from lightx2v_engine.lora import LoraSwitch, merge_lora_, read_lora
from lightx2v_engine.pipeline import Pipeline, _to_device, offloaded

from test_cuda_graph import _FakeCuda
from test_lora_switch import TARGETS, TINY, _dit, same, snapshot, write_lora

pytestmark = pytest.mark.usefixtures("torch_ops")


def _interrupt_restore_at(monkeypatch, n):
    """The n-th weight looked up by LoraSwitch.restore raises KeyboardInterrupt (an interrupt half-way)."""
    calls = []

    def interrupted_getattr(obj, name, *default):
        calls.append(name)
        if len(calls) == n:
            raise KeyboardInterrupt
        return getattr(obj, name, *default)
    monkeypatch.setattr(lora_mod, "getattr", interrupted_getattr, raising=False)
    return calls


@pytest.mark.parametrize("retry", ["same_lora", "restore", "none"])
def test_an_interrupted_restore_is_finished_by_the_next_switch(tmp_path, monkeypatch, retry):
    """An interrupt in the middle of a restore left `current` naming the LoRA: the same LoRA again was then
    "nothing to do" on a half-restored model. Now the state is dirty (None) and a retry restores the rest."""
    dit = _dit()
    spec = write_lora(tmp_path / "a.safetensors", dit, seed=1)
    base = snapshot(dit)
    ref = _dit()
    merge_lora_(ref, read_lora(spec.path), spec.strength)
    want = snapshot(ref)
    sw = LoraSwitch(dit)
    sw.set((spec,))
    assert same(snapshot(dit), want)
    calls = _interrupt_restore_at(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        sw.set(())
    monkeypatch.undo()
    assert len(calls) == 2
    assert sw.current is None and len(sw._saved) == len(TARGETS) - 1  # the first one restored and dropped
    assert not same(snapshot(dit), base) and not same(snapshot(dit), want)  # a mix
    if retry == "same_lora":
        assert sw.set((spec,))
        assert same(snapshot(dit), want) and sw.current == (spec,)
        sw.set(())
    elif retry == "restore":
        sw.restore()
    else:
        assert sw.set(())
    assert same(snapshot(dit), base) and sw.current == () and not sw._saved  # bit-exact


def test_pipeline_request_loras_after_an_interrupted_restore(tmp_path, monkeypatch):
    """Pipeline.set_request_loras with the LoRA of before the interrupt merges it again (it returned at once)."""
    pipe = Pipeline.random("tiny", TINY, device="cpu", seed=3)
    spec = write_lora(tmp_path / "a.safetensors", pipe.dit, seed=1)
    base = snapshot(pipe.dit)
    pipe.set_request_loras([spec])
    want = snapshot(pipe.dit)
    _interrupt_restore_at(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        pipe.set_request_loras([])
    monkeypatch.undo()
    pipe.set_request_loras([spec])
    assert same(snapshot(pipe.dit), want)
    pipe.set_request_loras([])
    assert same(snapshot(pipe.dit), base)


def test_a_failed_refresh_after_an_interrupted_restore_restores_the_rest(tmp_path, monkeypatch):
    """set_request_loras' cleanup after a failed block refresh treated a dirty switch (current None) as
    "no LoRA applied" and left the half-restored weights."""
    pipe = Pipeline.random("tiny", {**TINY, "cpu_offload": True}, device="cpu", seed=3)
    spec = write_lora(tmp_path / "a.safetensors", pipe.dit, seed=1)
    base = snapshot(pipe.dit)
    pipe.set_request_loras([spec])
    _interrupt_restore_at(monkeypatch, 2)
    real_refresh = pipe.dit.block_offload.refresh
    fails = []

    def failing_refresh():  # the first refresh fails, as out of memory would
        if not fails:
            fails.append(1)
            monkeypatch.setattr(lora_mod, "getattr", getattr, raising=False)
            raise torch.OutOfMemoryError("simulated")
        return real_refresh()
    monkeypatch.setattr(pipe.dit.block_offload, "refresh", failing_refresh)
    with pytest.raises(torch.OutOfMemoryError):  # (raised in the cleanup of the interrupted switch)
        pipe.set_request_loras([])
    monkeypatch.undo()
    assert fails and pipe._lora_switch.current == () and same(snapshot(pipe.dit), base)


def test_a_pipeline_with_graph_sets_is_freed_without_the_cycle_collector(monkeypatch):
    """The graph set's velocity referred to the pipeline that holds the set (and the set to itself): a cycle,
    so `del pipe` freed the model and the graphs' memory pools only at the next collection."""
    from lightx2v_engine.schedulers import DistillSampler
    _FakeCuda(monkeypatch)
    sampler = DistillSampler.from_step_list((1000, 750, 500, 250), 5.0, "deterministic")
    gc.collect()
    gc.disable()
    try:
        pipe = Pipeline.random("tiny", TINY, device="cpu")
        pipe.use_cuda_graph = True
        ctx = torch.zeros(1, 512, pipe.model_cfg.text_dim)
        run_step = pipe._graph_runner(torch.randn(1, 16, 2, 4, 6), ctx, None, None, None, sampler, [],
                                      sampler.timestep_tensor())
        assert run_step is not None and len(pipe._graphs) == 1
        del run_step
        refs = [weakref.ref(pipe), weakref.ref(pipe.dit), weakref.ref(next(iter(pipe._graphs.values())))]
        del pipe
        assert [r() is None for r in refs] == [True, True, True]
    finally:
        gc.enable()


def _forward(dit):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 2, 4, 6, generator=g)
    ctx = torch.randn(1, 512, dit.cfg.text_dim, generator=g)
    with torch.no_grad():
        return dit(x, torch.tensor([937.5]), ctx)


def test_moving_the_dit_to_the_cpu_drops_its_device_caches():
    """The RoPE tables and ones tensors cached per (shape, device) stayed on the GPU after an offloaded DiT
    went back to the CPU. The offload's move (pipeline.offloaded, as denoise uses it) drops them now."""
    dit = _dit()
    cpu = torch.device("cpu")
    with offloaded(dit, cpu, True, stream_blocks=False):
        want = _forward(dit)
        assert dit._rope_cache and dit._ones_cache
    assert not dit._rope_cache and not dit._ones_cache
    assert torch.equal(_forward(dit), want)  # made again
    assert dit._rope_cache and dit._ones_cache
    _to_device(dit, cpu)
    assert not dit._rope_cache and not dit._ones_cache


def test_an_offloaded_pipeline_keeps_no_dit_caches_between_loops():
    pipe = Pipeline.random("tiny", {**TINY, "cpu_offload": True, "offload_granularity": "model"}, device="cpu", seed=3)
    first = pipe.generate("a cat", seed=1).latents
    assert not pipe.dit._rope_cache and not pipe.dit._ones_cache
    assert torch.equal(pipe.generate("a cat", seed=1).latents, first)
