"""DiT block offload (lightx2v_engine/offload.py) and the pipeline's cpu_offload / offload_granularity.

The copy/compute ordering is checked on the CPU with a runtime that records what a CUDA device would be
asked to do (copies on a side stream, event waits, event marks) and a checker that replays the record."""
import dataclasses

import pytest
import torch

from lightx2v_engine import offload as offload_mod
from lightx2v_engine import pipeline as pipeline_mod
from lightx2v_engine.config import get_preset, parse_run_config
from lightx2v_engine.loading import build_dit
from lightx2v_engine.offload import BlockOffload, SyncRuntime, attach_block_offload, is_page_locked
from lightx2v_engine.pipeline import Pipeline
from lightx2v_engine.quant import quantize_dit_

TINY = {"target_video_length": 5, "target_height": 32, "target_width": 48}


def _dit(layers: int = 2, seed: int = 0, dtype=torch.float32):
    torch.manual_seed(seed)
    return build_dit(dataclasses.replace(get_preset("tiny"), num_layers=layers), None, dtype=dtype, device="cpu")


def _inputs(cfg, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 16, 3, 8, 12, generator=g), torch.tensor([700.0]),
            torch.randn(1, 512, cfg.text_dim, generator=g))


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


class Recorder(SyncRuntime):
    """Does each copy at once (CPU), and records it as a CUDA device would see it: ("copy", slot, block,
    event waited on, event recorded), ("wait", event), ("mark", event); blocks log ("compute", block,
    slot) from a forward pre-hook."""

    def __init__(self):
        self.log, self.n, self.off = [], 0, None

    def _slot(self, t):
        return next(s for s, buf in enumerate(self.off.slots)
                    if buf.data_ptr() <= t.data_ptr() < buf.data_ptr() + max(buf.numel(), 1))

    def copy(self, dst, src, after):
        dst.copy_(src)
        self.n += 1
        block = next(i for i, p in enumerate(self.off.packs) if p.host.data_ptr() == src.data_ptr())
        self.log.append(("copy", self._slot(dst), block, after, ("loaded", self.n)))
        return ("loaded", self.n)

    def wait(self, event):
        self.log.append(("wait", event))

    def mark(self):
        self.n += 1
        self.log.append(("mark", ("done", self.n)))
        return ("done", self.n)

    def synchronize(self):
        self.log.append(("sync",))

    def adopt(self, slot):
        self.log.append(("alloc",))

    def hook(self, model):
        for i, b in enumerate(model.blocks):
            b.register_forward_pre_hook(
                lambda m, a, i=i: self.log.append(("compute", i, self._slot(m.modulation))))


def check_ordering(log):
    """Replays a Recorder log: every compute reads a slot that holds its block, after waiting for that
    copy; every copy into a slot waits for the end of the last compute that read the slot. Returns the
    log positions of the copies and computes, for the overlap check."""
    holds, copy_event, last_done, waited = {}, {}, {}, set()
    pending_compute = None  # (slot) of a compute not yet followed by its mark
    initial = None  # the mark made when the slots were allocated: the first copy into each waits for it
    computed = False
    for entry in log:
        kind = entry[0]
        if kind == "copy":
            _, slot, block, after, ev = entry
            assert pending_compute != slot, f"copy into slot {slot} while a block computes from it: {entry}"
            need = last_done.get(slot, initial)
            assert after == need, f"copy into slot {slot} waits for {after}, must wait for {need} (end of the " \
                                  f"last compute reading it, or the slot's allocation)"
            holds[slot], copy_event[slot] = block, ev
        elif kind == "wait":
            waited.add(entry[1])
        elif kind == "compute":
            _, block, slot = entry
            assert pending_compute is None, "two computes without a mark between them"
            assert holds.get(slot) == block, f"block {block} computes from slot {slot}, which holds {holds.get(slot)}"
            assert copy_event[slot] in waited, f"block {block} computes before waiting for its copy"
            pending_compute, computed = slot, True
        elif kind == "sync":  # every queued copy has finished: nothing is in flight
            pass
        elif kind == "alloc":  # new slots (at construction, or grown by refresh): nothing held yet
            holds.clear()
            last_done.clear()
            computed = False
        elif kind == "mark":
            if not computed and not holds:
                initial = entry[1]
            if pending_compute is not None:
                last_done[pending_compute] = entry[1]
                pending_compute = None
    assert pending_compute is None


# ------------------------------------------------------------------------------ 1. same output, same state

@pytest.mark.usefixtures("torch_ops")
@pytest.mark.parametrize("layers", [1, 2, 3])
def test_block_offload_gives_the_resident_output_and_keeps_the_weights(layers):
    dit = _dit(layers)
    x, t, ctx = _inputs(dit.cfg)
    want = dit(x, t, ctx)
    before = _state(dit)
    params = {n: id(p) for n, p in dit.named_parameters()}
    off = attach_block_offload(dit, "cpu")
    assert dit.block_offload is off and off.device_bytes == 2 * max(p.nbytes for p in off.packs)
    for _ in range(3):  # the first forward loads every block, later ones start from the prefetched block 0
        torch.testing.assert_close(dit(x, t, ctx), want, rtol=0, atol=0)
    after = dit.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert {n: id(p) for n, p in dit.named_parameters()} == params  # the same Parameter objects
    for i, pack in enumerate(off.packs):  # between forwards every block tensor is a view of its host pack
        lo, hi = pack.host.data_ptr(), pack.host.data_ptr() + pack.nbytes
        for name, p in dit.blocks[i].named_parameters():
            assert lo <= p.data_ptr() < hi and (p.data_ptr() - lo) % offload_mod.ALIGN == 0, name


@pytest.mark.usefixtures("torch_ops")
def test_block_offload_of_an_8bit_dit_with_lora_branches():
    """QuantLinear's buffers (8-bit weight, fp32 scale, bias) and its non-persistent LoRA branches all
    travel with their block."""
    dit = _dit(2, dtype=torch.float32)
    quantize_dit_(dit, "int8-vllm")
    g = torch.Generator().manual_seed(3)
    lin = dit.blocks[1].self_attn.q
    lin.add_lora(torch.randn(lin.out_features, 4, generator=g), torch.randn(4, lin.in_features, generator=g), 0.1)
    x, t, ctx = _inputs(dit.cfg)
    want = dit(x, t, ctx)
    attach_block_offload(dit, "cpu")
    assert dit.blocks[1].self_attn.q.lora_down is not None
    torch.testing.assert_close(dit(x, t, ctx), want, rtol=0, atol=0)
    torch.testing.assert_close(dit(x, t, ctx), want, rtol=0, atol=0)


# ------------------------------------------------------------------------------ 2. copy/compute ordering

@pytest.mark.usefixtures("torch_ops")
@pytest.mark.parametrize("layers", [2, 3, 5])
def test_copies_and_computes_are_ordered_and_overlap(layers):
    dit = _dit(layers)
    x, t, ctx = _inputs(dit.cfg)
    rec = Recorder()
    rec.off = attach_block_offload(dit, "cpu", runtime=rec)
    rec.hook(dit)
    for _ in range(3):
        dit(x, t, ctx)
    check_ordering(rec.log)
    copies = [e for e in rec.log if e[0] == "copy"]
    computes = [e for e in rec.log if e[0] == "compute"]
    assert [c[1] for c in computes] == list(range(layers)) * 3
    # the first copy into a slot waits for the work queued when the slot was allocated (its memory may be
    # recycled from tensors of kernels still queued), later ones for the last compute reading the slot
    assert [e[0] for e in rec.log[:3]] == ["alloc", "alloc", "mark"] and all(c[3] is not None for c in copies)
    # every forward after the first: each block's copy was issued before the previous block computed
    # (it overlaps that compute); block 0's came from the end of the previous forward
    pos = {id(e): k for k, e in enumerate(rec.log)}
    for fwd in (1, 2):
        for i in range(layers):
            c = computes[fwd * layers + i]
            prev_compute = computes[fwd * layers + i - 1]
            copy = [e for e in copies if e[2] == i and pos[id(e)] < pos[id(c)]][-1]
            assert pos[id(copy)] < pos[id(prev_compute)], f"forward {fwd}: block {i} was not prefetched"
    # each block once per forward, plus block 0's prefetch at the end of the first; two blocks fit the slots
    assert len(copies) == (3 * layers + 1 if layers > 2 else layers)


def test_the_checker_catches_a_copy_that_does_not_wait_for_the_compute():
    """The ordering checker fails on the hazard it exists for (a mutation of the protocol)."""
    log = [("copy", 0, 0, None, ("loaded", 1)), ("wait", ("loaded", 1)), ("compute", 0, 0), ("mark", ("done", 2)),
           ("copy", 0, 2, None, ("loaded", 3))]  # slot 0 overwritten without waiting for done 2
    with pytest.raises(AssertionError, match="must wait for"):
        check_ordering(log)
    with pytest.raises(AssertionError, match="before waiting for its copy"):
        check_ordering([("copy", 0, 0, None, ("loaded", 1)), ("compute", 0, 0)])


@pytest.mark.usefixtures("torch_ops")
def test_a_failing_block_leaves_the_weights_on_the_host_and_the_next_forward_right():
    dit = _dit(3)
    x, t, ctx = _inputs(dit.cfg)
    want = dit(x, t, ctx)
    rec = Recorder()
    rec.off = off = attach_block_offload(dit, "cpu", runtime=rec)
    rec.hook(dit)  # before the failing hook: the failed block's compute is on record
    calls = []

    def boom(m, a):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("out of memory (simulated)")
    h = dit.blocks[1].register_forward_pre_hook(boom)
    with pytest.raises(RuntimeError, match="simulated"):
        dit(x, t, ctx)
    for i, pack in enumerate(off.packs):
        p = dit.blocks[i].modulation
        assert pack.host.data_ptr() <= p.data_ptr() < pack.host.data_ptr() + pack.nbytes
    assert rec.log[-1][0] == "mark"  # the failed block's slot is marked free only after its queued work
    torch.testing.assert_close(dit(x, t, ctx), want, rtol=0, atol=0)
    h.remove()
    dit(x, t, ctx)
    check_ordering(rec.log)


class FakeCudart:
    """torch.cuda.cudart() stand-in: records page-lock calls, answers `code`."""

    def __init__(self, code=0):
        self.code, self.registered, self.unregistered = code, [], []

    def cudaHostRegister(self, ptr, nbytes, flags):
        self.registered.append((ptr, nbytes, flags))
        return self.code

    def cudaHostUnregister(self, ptr):
        self.unregistered.append(ptr)
        return 0


def test_host_buffers_are_page_locked_in_place_and_unlocked_with_their_pack(monkeypatch):
    """cudaHostRegister on each packed buffer, at its exact size (not torch's pinned allocator, which rounds
    up to a power of two), and cudaHostUnregister when the offload goes away."""
    import gc
    fake = FakeCudart()
    monkeypatch.setattr(offload_mod, "_PIN_WARNED", False)
    monkeypatch.setattr(offload_mod.torch.cuda, "cudart", lambda: fake)
    off = BlockOffload(_dit(3).blocks, "cpu", pin=True)
    page = offload_mod.PAGE
    # page-aligned, whole pages (two registrations never share a page), portable across devices
    assert fake.registered == [(p.host.data_ptr(), -(-p.nbytes // page) * page, 1) for p in off.packs]
    assert all(p.host.data_ptr() % page == 0 for p in off.packs)
    ptrs = [p.host.data_ptr() for p in off.packs]
    del off
    gc.collect()
    assert sorted(fake.unregistered) == sorted(ptrs)


@pytest.mark.parametrize("failure", ["error code", "no CUDA runtime"])
def test_page_lock_failure_falls_back_to_pageable_memory_with_one_warning(failure, monkeypatch, caplog):
    fake = FakeCudart(code=2)  # cudaErrorMemoryAllocation
    monkeypatch.setattr(offload_mod, "_PIN_WARNED", False)
    if failure == "error code":
        monkeypatch.setattr(offload_mod.torch.cuda, "cudart", lambda: fake)
    else:
        monkeypatch.setattr(offload_mod.torch.cuda, "cudart", lambda: (_ for _ in ()).throw(RuntimeError("no CUDA")))
    dit = _dit(3)
    x, t, ctx = _inputs(dit.cfg)
    with torch.no_grad():
        want = dit(x, t, ctx)
    with caplog.at_level("WARNING", logger="lightx2v_engine.offload"):
        attach_block_offload(dit, "cpu", pin=True)
    warned = [r.message for r in caplog.records if "page-locking host memory failed" in r.message]
    assert len(warned) == 1 and ("error 2" in warned[0] if failure == "error code" else "no CUDA" in warned[0])
    assert len(fake.registered) == (3 if failure == "error code" else 0)  # each pack tries, one warning
    with torch.no_grad():
        torch.testing.assert_close(dit(x, t, ctx), want, rtol=0, atol=0)


# ------------------------------------------------------------------------------ 3. the pipeline's keys

@pytest.mark.usefixtures("torch_ops")
@pytest.mark.parametrize("granularity", ["block", "model"])
def test_pipeline_cpu_offload_gives_the_same_video(granularity, monkeypatch):
    base = Pipeline.random("tiny", TINY, device="cpu", seed=3)
    want = base.generate("a cat", seed=1)
    pipe = Pipeline.random("tiny", {**TINY, "cpu_offload": True, "offload_granularity": granularity},
                           device="cpu", seed=3)
    assert (pipe.dit.block_offload is not None) == (granularity == "block")
    moves = []
    real = pipeline_mod._to_device
    monkeypatch.setattr(pipeline_mod, "_to_device", lambda m, d: (moves.append(type(m).__name__), real(m, d)))
    got = pipe.generate("a cat", seed=1)
    assert torch.equal(got.latents, want.latents) and torch.equal(got.frames, want.frames)
    # "model": the whole DiT moves in for the denoising loop and out after it (no block streaming)
    assert moves.count("WanDiT") == (2 if granularity == "model" else 0) and "WanBlock" not in moves


def test_cuda_graphs_are_off_while_the_dit_is_offloaded():
    cuda = torch.device("cuda")
    run = parse_run_config({"cpu_offload": True})
    assert not pipeline_mod._graphs_on(run, cuda)
    assert pipeline_mod._graphs_on(parse_run_config({}), cuda)
    assert not pipeline_mod._graphs_on(parse_run_config({"use_cuda_graph": False}), cuda)
    assert not pipeline_mod._graphs_on(parse_run_config({}), torch.device("cpu"))


@pytest.mark.usefixtures("torch_ops")
def test_quantized_checkpoint_with_block_offload(t2v_folder, tmp_path):
    """The quantized loader places an offloaded DiT in host memory too; its output is the resident one."""
    from safetensors.torch import save_file
    from lightx2v_engine.loading import load_dit
    dit = load_dit(get_preset("tiny"), t2v_folder, dtype="bf16")
    quantize_dit_(dit, "int8-vllm")
    qpath = tmp_path / "q.safetensors"
    save_file({k: v.contiguous() for k, v in dit.state_dict().items()}, str(qpath))
    cfg = {**TINY, "dit_quantized": True, "dit_quantized_ckpt": str(qpath), "dit_quant_scheme": "int8-vllm"}
    want = Pipeline.load(t2v_folder, cfg, device="cpu").generate("a cat", seed=2).latents
    pipe = Pipeline.load(t2v_folder, {**cfg, "cpu_offload": True}, device="cpu")
    assert pipe.dit.block_offload is not None
    assert torch.equal(pipe.generate("a cat", seed=2).latents, want)


# ------------------------------------------------------------------------------ 4. on a GPU

@pytest.mark.gpu
@pytest.mark.last  # never run on a GPU yet: after the proven tests (conftest)
@pytest.mark.parametrize("granularity", ["block", "model"])
def test_block_offload_on_cuda_matches_the_resident_dit(granularity):
    base = Pipeline.random("tiny", TINY, device="cuda", seed=3)
    want = base.generate("a cat", seed=1)
    pipe = Pipeline.random("tiny", {**TINY, "cpu_offload": True, "offload_granularity": granularity},
                           device="cuda", seed=3)
    assert not pipe.use_cuda_graph
    got = pipe.generate("a cat", seed=1)
    torch.testing.assert_close(got.latents, want.latents, rtol=1e-6, atol=1e-6)
    blk = pipe.dit.blocks[0].self_attn.q.weight
    assert blk.device.type == "cpu"
    if granularity == "block":
        assert is_page_locked(blk) and pipe.dit.text_embedding[0].weight.is_cuda
        assert pipe.dit.block_offload.slots[0].is_cuda


# ------------------------------------------------------------------------------ 5. page-locked offload weights

@pytest.mark.usefixtures("torch_ops")
def test_page_lock_module_packs_blocks_and_rest_in_place(monkeypatch):
    """Encoders (and a DiT moved whole) keep their CPU weights in page-locked packs: one per block and
    one for the rest, registered at their exact size; values, Parameter objects and the output unchanged."""
    from lightx2v_engine import t5 as t5_mod
    from lightx2v_engine.offload import page_lock_module_
    fake = FakeCudart()
    monkeypatch.setattr(offload_mod, "_PIN_WARNED", False)
    monkeypatch.setattr(offload_mod.torch.cuda, "cudart", lambda: fake)
    model = t5_mod.random_t5(t5_mod.T5Config.tiny(), dtype=torch.float32, seed=0)
    ids = torch.randint(0, 100, (1, 7))
    want, before = model(ids), _state(model)
    params = [id(p) for p in model.parameters()]
    packs = page_lock_module_(model)
    assert len(packs) == len(model.blocks) + 1
    assert fake.registered == [(p.host.data_ptr(), -(-p.nbytes // offload_mod.PAGE) * offload_mod.PAGE, 1)
                               for p in packs]
    assert page_lock_module_(model) is packs and len(fake.registered) == len(packs)  # not packed twice
    torch.testing.assert_close(model(ids), want, rtol=0, atol=0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert [id(p) for p in model.parameters()] == params
    blk = model.blocks[1]
    lo = packs[1].host.data_ptr()
    assert all(lo <= p.data_ptr() < lo + packs[1].nbytes for p in blk.parameters())


def test_page_locked_packs_keep_the_memory_layout(monkeypatch):
    """The VAE's conv weights are channels_last_3d on CUDA: packing keeps their strides."""
    from lightx2v_engine.offload import page_lock_module_
    monkeypatch.setattr(offload_mod, "_PIN_WARNED", False)
    monkeypatch.setattr(offload_mod.torch.cuda, "cudart", lambda: FakeCudart())
    conv = torch.nn.Conv3d(3, 8, 3).to(memory_format=torch.channels_last_3d)
    lin = torch.nn.Linear(4, 5)
    model = torch.nn.Sequential(conv, lin)
    w = conv.weight.detach().clone()
    strides = conv.weight.stride()
    page_lock_module_(model)
    assert conv.weight.stride() == strides and conv.weight.is_contiguous(memory_format=torch.channels_last_3d)
    assert torch.equal(conv.weight, w) and lin.weight.is_contiguous()
    odd = torch.nn.Linear(6, 4)
    odd.weight.data = torch.randn(8, 6)[::2]  # not dense: packed row-major
    ref = odd.weight.detach().clone()
    page_lock_module_(odd)
    assert odd.weight.is_contiguous() and torch.equal(odd.weight, ref)


@pytest.mark.gpu
@pytest.mark.last
def test_offloaded_encoders_and_vae_are_page_locked_on_cuda():
    cfg = {**TINY, "t5_cpu_offload": True, "vae_cpu_offload": True}
    base = Pipeline.random("tiny", TINY, device="cuda", seed=3)
    pipe = Pipeline.random("tiny", cfg, device="cuda", seed=3)
    assert is_page_locked(next(pipe.t5.blocks[0].parameters()))
    assert is_page_locked(next(pipe.vae.parameters()))
    got, want = pipe.generate("a cat", seed=1), base.generate("a cat", seed=1)
    torch.testing.assert_close(got.latents, want.latents, rtol=1e-6, atol=1e-6)
    assert next(pipe.t5.parameters()).device.type == "cpu"


def _real_width_dit(num_layers: int):
    """A 1.3B-wide bf16 DiT of `num_layers` blocks on CUDA (about 90 MB a block) and a small input for it:
    (dit, x, t, ctx)."""
    cfg = dataclasses.replace(get_preset("wan2.1-t2v-1.3b"), num_layers=num_layers)
    torch.manual_seed(0)
    dit = build_dit(cfg, None, dtype=torch.bfloat16, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(1, 16, 3, 16, 24, generator=g, device="cuda")
    ctx = torch.randn(1, 512, cfg.text_dim, generator=g, device="cuda").to(torch.bfloat16)
    return dit, x, torch.tensor([700.0], device="cuda"), ctx


@pytest.mark.gpu
@pytest.mark.last
def test_block_offload_on_cuda_with_real_width_blocks_is_exact():
    """1.3B-wide blocks (about 90 MB each, copies of milliseconds) over a small latent, so that the copies
    outlast the compute: a missing event wait would let a copy overwrite a slot still being read. Several
    forwards in a row, against the same model resident, bitwise."""
    dit, x, t, ctx = _real_width_dit(5)
    with torch.no_grad():
        want = [dit(x, t * (k + 1) / 4, ctx) for k in range(3)]
        off = attach_block_offload(dit, "cuda")
        assert is_page_locked(off.packs[0].host) and off.device_bytes == 2 * max(p.nbytes for p in off.packs)
        got = [dit(x, t * (k + 1) / 4, ctx) for k in range(3)]
    torch.cuda.synchronize()
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.last
def test_block_offload_on_cuda_with_slow_compute_is_exact():
    """The other order: each block's compute made much longer than its copy (a GPU sleep before it), so that
    the prefetch of block i+1 into the slot block i-1 used would overwrite it while still being read if the
    copy did not wait for that compute's "freed" event. Against the resident model, bitwise."""
    dit, x, t, ctx = _real_width_dit(4)
    with torch.no_grad():
        want = [dit(x, t * (k + 1) / 4, ctx) for k in range(2)]
        attach_block_offload(dit, "cuda")
        hooks = [b.register_forward_pre_hook(lambda m, a: torch.cuda._sleep(50_000_000)) for b in dit.blocks]
        got = [dit(x, t * (k + 1) / 4, ctx) for k in range(2)]  # (about 25 ms of sleep per block)
        for h in hooks:
            h.remove()
    torch.cuda.synchronize()
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@pytest.mark.usefixtures("torch_ops")
def test_refresh_waits_for_queued_copies_before_repacking():
    """refresh() (after a LoRA switch) synchronizes the copy stream before a pack or slot can go: block 0's
    prefetch from the end of the last forward may still be reading its old pack."""
    dit = _dit(3)
    quantize_dit_(dit, "int8-vllm")
    x, t, ctx = _inputs(dit.cfg)
    rec = Recorder()
    rec.off = off = attach_block_offload(dit, "cpu", runtime=rec)
    rec.hook(dit)
    dit(x, t, ctx)
    old = off.packs[0]
    lin = dit.blocks[0].self_attn.q
    lin.add_lora(torch.ones(lin.out_features, 2), torch.ones(2, lin.in_features), 0.01)
    n = len(rec.log)
    off.refresh()
    assert rec.log[n:n + 1] == [("sync",)] and off.packs[0] is not old and off.packs[1] is not None
    dit(x, t, ctx)  # the grown slots, the re-packed block
    check_ordering(rec.log)


# ------------------------------------------------------------------------------------- unload_modules

@pytest.mark.usefixtures("torch_ops")
@pytest.mark.parametrize("task,extra", [("t2v", {}), ("i2v", {}), ("t2v", {"use_tae": True})],
                         ids=["t2v", "i2v", "t2v_tae"])
def test_unload_modules_loads_each_model_for_its_use(task, extra, t2v_folder, i2v_folder, tmp_path, monkeypatch):
    """LightX2V's unload_modules: the DiT, the encoders and the VAE are read from their files for each use
    and freed at its end (None between uses, no reference left when the memory is released); each is read
    once at load to check it; the video is the resident pipeline's."""
    import gc
    import weakref

    from PIL import Image

    from lightx2v_engine import clip as clip_mod
    from lightx2v_engine import tae as tae_mod
    from lightx2v_engine import t5 as t5_mod
    from lightx2v_engine import vae as vae_mod
    folder = t2v_folder if task == "t2v" else i2v_folder
    if extra.get("use_tae"):
        import shutil
        folder = tmp_path / "m"
        shutil.copytree(t2v_folder, folder)
        torch.save(tae_mod.random_tae(tae_mod.TAEConfig.tiny(), seed=1).state_dict(), folder / "taew2_1.pth")
    cfg = {**TINY, **extra}
    image = Image.fromarray((torch.rand(40, 56, 3, generator=torch.Generator().manual_seed(2)) * 255)
                            .to(torch.uint8).numpy()) if task == "i2v" else None
    want = Pipeline.load(folder, cfg, device="cpu", task=task).generate("a red fox", image=image, seed=3).frames
    loads, alive = [], []
    for mod, name in ((t5_mod, "load_t5"), (vae_mod, "load_vae"), (tae_mod, "load_tae"), (clip_mod, "load_clip"),
                      (pipeline_mod, "load_dit")):
        def counted(*a, _real=getattr(mod, name), _name=name, **kw):
            model = _real(*a, **kw)
            loads.append(_name)
            alive.append(weakref.ref(model))
            return model
        monkeypatch.setattr(mod, name, counted)
    real_collect = gc.collect

    def collect(*a):  # _use releases the memory: by then no reference to the model may be left
        n = real_collect(*a)
        assert all(r() is None for r in alive), "a model outlived its use"
        return n
    monkeypatch.setattr(gc, "collect", collect)
    pipe = Pipeline.load(folder, {**cfg, "unload_modules": True}, device="cpu", task=task)
    decoder = "load_tae" if extra.get("use_tae") else "load_vae"
    models = {"t5": "load_t5", "clip": "load_clip", "vae": "load_vae", "tae": "load_tae", "dit": "load_dit"}
    assert sorted(loads) == sorted(models[n] for n in pipe.loaders)  # each read once, to check it
    assert set(pipe.loaders) == {"dit", "t5", decoder[5:]} | ({"clip", "vae"} if task == "i2v" else set())
    assert pipe.dit is None and pipe.t5 is None and pipe.vae is None and pipe.clip is None and pipe.tae is None
    assert not pipe.use_cuda_graph
    for _ in range(2):
        loads.clear()
        got = pipe.generate("a red fox", image=image, seed=3).frames
        assert torch.equal(got, want)
        assert pipe.dit is None and pipe.t5 is None and pipe.vae is None and pipe.clip is None and pipe.tae is None
        assert loads == ["load_t5"] + (["load_clip", "load_vae"] if task == "i2v" else []) + ["load_dit", decoder]


def test_unload_modules_checks_files_at_load_and_recovers_from_failures(t2v_folder, tmp_path, monkeypatch):
    import shutil

    from lightx2v_engine import t5 as t5_mod
    folder = tmp_path / "m"
    shutil.copytree(t2v_folder, folder)
    (folder / pipeline_mod.VAE_FILE).write_bytes(b"not a checkpoint")
    with pytest.raises(Exception, match="Wan2.1_VAE.pth"):  # at load, not after a video's denoising loop
        Pipeline.load(folder, {**TINY, "unload_modules": True}, device="cpu")
    (folder / pipeline_mod.VAE_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="Wan2.1_VAE.pth not found"):
        Pipeline.load(folder, {**TINY, "unload_modules": True}, device="cpu")
    pipe = Pipeline.load(t2v_folder, {**TINY, "unload_modules": True}, device="cpu")
    want = pipe.generate("a cat", seed=1).frames
    real = t5_mod.encode_text
    monkeypatch.setattr(t5_mod, "encode_text", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):  # a failed use frees its model too
        pipe.generate("a cat", seed=1)
    assert pipe.t5 is None
    monkeypatch.setattr(t5_mod, "encode_text", real)
    assert torch.equal(pipe.generate("a cat", seed=1).frames, want)


def test_unload_modules_with_random_weights():
    pipe = Pipeline.random("tiny", {**TINY, "unload_modules": True}, device="cpu")
    assert pipe.t5 is None and pipe.vae is None and pipe.dit is None
    a = pipe.generate("a cat", seed=1).frames
    assert torch.equal(a, pipe.generate("a cat", seed=1).frames)  # the same random DiT each time
    assert torch.equal(a, Pipeline.random("tiny", TINY, device="cpu").generate("a cat", seed=1).frames)
    assert parse_run_config({"unload_modules": True}).unload_modules
    bare = Pipeline.random("tiny", {**TINY, "unload_modules": True}, device="cpu", with_encoders=False)
    assert set(bare.loaders) == {"dit"}
    with pytest.raises(RuntimeError, match="no text encoder"):
        bare.encode_text(["a cat"])
    with pytest.raises(RuntimeError, match="no VAE"):
        bare.decode(torch.zeros(16, 1, 2, 2))


def test_lazy_load_loads_every_model_per_use_and_says_what_it_does_not_do():
    with pytest.warns(UserWarning, match="lazy_load loads every model per use.*not streamed from disk"):
        cfg = parse_run_config({**TINY, "lazy_load": True})
    pipe = Pipeline.random("tiny", cfg, device="cpu")
    assert pipe.t5 is None and set(pipe.loaders) == {"dit", "t5", "vae"}
    assert pipe.generate("a cat", seed=1).frames.shape == (5, 32, 48, 3)


@pytest.mark.usefixtures("torch_ops")
@pytest.mark.parametrize("extra", [{}, {"cpu_offload": True}], ids=["resident", "block_offload"])
def test_request_loras_reach_a_dit_built_per_use(extra, tmp_path):
    """set_request_loras with unload_modules: each DiT built for a video gets the LoRAs merged on top; the
    latents are those of the resident pipeline with the same request LoRA; none gives the base again; a
    missing file fails at the call."""
    from lightx2v_engine.config import LoraSpec
    from test_lora_switch import write_lora
    resident = Pipeline.random("tiny", {**TINY, **extra}, device="cpu")
    spec = write_lora(tmp_path / "a.safetensors", resident.dit, targets=["blocks.0.self_attn.q", "blocks.1.ffn.2"])
    base = resident.generate("a cat", seed=1).latents
    resident.set_request_loras([spec])
    want = resident.generate("a cat", seed=1).latents
    assert not torch.equal(want, base)
    pipe = Pipeline.random("tiny", {**TINY, **extra, "unload_modules": True}, device="cpu")
    pipe.set_request_loras([spec])
    torch.testing.assert_close(pipe.generate("a cat", seed=1).latents, want, rtol=0, atol=1e-5)
    pipe.set_request_loras([])
    assert torch.equal(pipe.generate("a cat", seed=1).latents, base)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        pipe.set_request_loras([LoraSpec(str(tmp_path / "missing.safetensors"), 1.0)])


def test_a_failing_request_lora_fails_at_the_call_with_a_dit_built_per_use(tmp_path):
    """With unload_modules the request LoRAs are read and checked against the DiT's structure when set
    (not at the next video): unmatched keys, wrong shapes; after a failure the model as loaded runs (as
    LoraSwitch leaves it)."""
    from lightx2v_engine.lora import LoraKeyError
    from test_lora_switch import write_lora
    pipe = Pipeline.random("tiny", {**TINY, "unload_modules": True}, device="cpu")
    skeleton = pipe.dit_meta()
    assert skeleton.blocks[0].self_attn.q.weight.device.type == "meta"
    good = write_lora(tmp_path / "good.safetensors", skeleton, targets=["blocks.0.self_attn.q"])
    pipe.set_request_loras([good])
    bad = write_lora(tmp_path / "bad.safetensors", skeleton, targets=["blocks.0.self_attn.q"], seed=2,
                     extra={"diffusion_model.blocks.0.nonsense.lora_up.weight": torch.zeros(4, 4),
                            "diffusion_model.blocks.0.nonsense.lora_down.weight": torch.zeros(4, 4)})
    with pytest.raises(LoraKeyError, match="blocks.0.nonsense"):
        pipe.set_request_loras([bad])
    wrong = tmp_path / "wrong.safetensors"
    from safetensors.torch import save_file
    save_file({"diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.zeros(7, 4),
               "diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.zeros(4, 5)}, str(wrong))
    pipe.set_request_loras([good])
    assert [s.path for s in pipe._request_loras] == [str((tmp_path / "good.safetensors").resolve())]
    with pytest.raises(LoraKeyError, match="does not give .* shape"):
        pipe.set_request_loras([type(good)(str(wrong), 1.0)])
    assert pipe._request_loras == ()
    base = Pipeline.random("tiny", TINY, device="cpu").generate("a cat", seed=1).latents
    assert torch.equal(pipe.generate("a cat", seed=1).latents, base)


def test_relative_request_lora_paths_are_resolved_when_set(tmp_path, monkeypatch):
    """A DiT built per use reads the request LoRAs again: a relative path means the file it named when set."""
    from lightx2v_engine.config import LoraSpec
    from test_lora_switch import write_lora
    pipe = Pipeline.random("tiny", {**TINY, "unload_modules": True}, device="cpu")
    (tmp_path / "a").mkdir()
    write_lora(tmp_path / "a" / "x.safetensors", pipe.dit_meta(), targets=["blocks.0.self_attn.q"])
    monkeypatch.chdir(tmp_path / "a")
    pipe.set_request_loras([LoraSpec("x.safetensors", 1.0)])
    monkeypatch.chdir(tmp_path)  # x.safetensors is not here
    assert pipe.generate("a cat", seed=1).frames.shape == (5, 32, 48, 3)


def test_no_cuda_graphs_for_a_dit_built_per_use():
    from lightx2v_engine.pipeline import _graphs_on
    assert _graphs_on(parse_run_config({}), torch.device("cuda"))
    assert not _graphs_on(parse_run_config({"unload_modules": True}), torch.device("cuda"))
    pipe = Pipeline.random("tiny", {**TINY, "unload_modules": True}, device="cpu")
    assert pipe._dit_offloaded()  # what keeps a later use_cuda_graph = True from capturing a DiT freed after


@pytest.mark.usefixtures("torch_ops")
def test_request_lora_on_an_8bit_dit_built_per_use(t2v_folder, tmp_path):
    """An 8-bit DiT with block offload, a config LoRA and a request LoRA (low-rank branches beside the
    8-bit linears): built per use, the latents of the resident pipeline with the same LoRAs."""
    from test_lora_switch import int8_offload_case
    cfg, req = int8_offload_case(t2v_folder, tmp_path)
    resident = Pipeline.load(t2v_folder, cfg, device="cpu")
    resident.set_request_loras([req])
    want = resident.generate("a cat", seed=1).latents
    pipe = Pipeline.load(t2v_folder, {**cfg, "unload_modules": True}, device="cpu")
    pipe.set_request_loras([req])
    out = pipe.generate("a cat", seed=1)
    assert torch.equal(out.latents, want)
    assert out.timings.items["dit load"] > 0


def test_the_same_request_loras_again_are_not_read_again(tmp_path, monkeypatch):
    from lightx2v_engine import lora as lora_mod
    from test_lora_switch import write_lora
    pipe = Pipeline.random("tiny", {**TINY, "unload_modules": True}, device="cpu")
    spec = write_lora(tmp_path / "a.safetensors", pipe.dit_meta(), targets=["blocks.0.self_attn.q"])
    reads = []
    real = lora_mod.read_lora
    monkeypatch.setattr(lora_mod, "read_lora", lambda p: (reads.append(p), real(p))[1])
    pipe.set_request_loras([spec])
    pipe.set_request_loras([spec])  # the server's next request with the same lora_name
    assert len(reads) == 1
    pipe.set_request_loras([type(spec)(spec.path, 0.5)])  # another strength is another set
    assert len(reads) == 2


@pytest.mark.usefixtures("torch_ops")
def test_a_run_config_built_in_python_with_a_list_of_loras_loads(t2v_folder):
    """RunConfig(lora_configs=[...]) (a list, not the parsed tuple) loads as before, resident and per use."""
    from lightx2v_engine.config import RunConfig
    for unload in (False, True):
        run = RunConfig(target_video_length=5, target_height=32, target_width=48, lora_configs=[],
                        unload_modules=unload)
        assert Pipeline.load(t2v_folder, run, device="cpu").generate("a cat", seed=1).frames.shape == (5, 32, 48, 3)


def test_is_page_locked_knows_registered_ranges(monkeypatch):
    """Memory page-locked in place (cudaHostRegister) reads as not pinned in torch 2.11's is_pinned(); the
    module's own registry answers for it: a view inside a registered range is locked, one reaching past it
    or elsewhere is not."""
    from lightx2v_engine import offload
    buf = torch.empty(4096, dtype=torch.uint8)
    other = torch.empty(64, dtype=torch.uint8)
    monkeypatch.setattr(offload, "_LOCKED", {buf.data_ptr(): 1024})
    assert is_page_locked(buf[:1024]) and is_page_locked(buf[100:200])
    assert not is_page_locked(buf[1000:1100]) and not is_page_locked(other)
    assert is_page_locked(buf[:1024:2]) and not is_page_locked(buf[:2048:2])  # strided views: their true span
    assert not is_page_locked(torch.empty(0, dtype=torch.uint8))


def test_offload_errors_name_the_tensor():
    """A meta (unloaded) tensor in a block, and a tensor off the CPU for page-locking, are named by their
    path in the model (at 14B one of ~1000 tensors called "weight")."""
    from lightx2v_engine.config import get_preset
    from lightx2v_engine.loading import build_dit
    from lightx2v_engine.offload import attach_block_offload, page_lock_module_
    dit = build_dit(get_preset("tiny"), None, dtype=torch.float32)
    dit.blocks[1].cross_attn.v.weight = torch.nn.Parameter(torch.empty(256, 256, device="meta"))
    with pytest.raises(ValueError, match=r"blocks\.1\.cross_attn\.v\.weight \(256, 256\) has no data"):
        attach_block_offload(dit, "cpu")
    dit = build_dit(get_preset("tiny"), None, dtype=torch.float32)
    dit.blocks[0].norm3.bias = torch.nn.Parameter(torch.empty(256, device="meta"))  # stands in for a CUDA tensor
    with pytest.raises(ValueError, match=r"1 tensor\(s\) off the CPU, e\.g\. blocks\.0\.norm3\.bias \(meta\)"):
        page_lock_module_(dit)


def test_page_unlock_synchronizes_only_the_device_the_buffer_served(monkeypatch):
    """Unlocking synchronized every visible GPU (torch.cuda.synchronize(d) for all d), creating a CUDA context
    on each card the process never used (every torchrun rank on every GPU); now the pack's own device, or the
    current one. A CLIP's page-locked packs were also held in a reference cycle (module -> packs -> entries
    -> module): unlocked only when the cyclic garbage collector ran; now at once when the module goes."""
    import gc
    import weakref
    from lightx2v_engine import clip as clip_mod
    from lightx2v_engine.offload import page_lock_module_
    fake = FakeCudart()
    synced = []
    monkeypatch.setattr(offload_mod, "_PIN_WARNED", False)
    monkeypatch.setattr(offload_mod.torch.cuda, "cudart", lambda: fake)
    monkeypatch.setattr(offload_mod.torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(offload_mod.torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(offload_mod.torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(offload_mod.torch.cuda, "synchronize", lambda d=None: synced.append(d))
    packs = [offload_mod._Pack(b.modules(), True, device=torch.device("cuda", 2)) for b in _dit(2).blocks]
    del packs
    gc.collect()
    assert len(fake.unregistered) == 2 and set(synced) == {2}
    synced.clear()
    clip = clip_mod.random_clip(clip_mod.CLIPConfig.tiny(), device="cpu", dtype=torch.float32, seed=0)
    assert any(True for _ in clip.named_parameters(recurse=False))  # (top-level tensors: the cycle's case)
    packs = page_lock_module_(clip)
    n = len(packs)
    alive = weakref.ref(clip)
    gc.disable()
    try:
        del clip, packs
        assert alive() is None and len(fake.unregistered) == 2 + n
    finally:
        gc.enable()
    assert set(synced) == {0}  # (no device given: the current one)


def test_a_failed_whole_module_move_leaves_nothing_on_the_device(monkeypatch):
    """offloaded(..., stream_blocks=False) (CLIP, the VAE, a DiT moved whole) moved the module before its
    try: a move failing part-way (out of memory) left the moved tensors on the device. "meta" stands in for
    the GPU; the second tensor's move fails."""
    from lightx2v_engine import t5 as t5_mod
    model = t5_mod.random_t5(t5_mod.T5Config.tiny(), dtype=torch.float32, seed=0)
    before = _state(model)
    real_to, moved = torch.Tensor.to, [0]

    def to(self, *args, **kwargs):
        if args and isinstance(args[0], torch.device) and args[0].type == "meta":
            moved[0] += 1
            if moved[0] == 2:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_to(self, *args, **kwargs)
    monkeypatch.setattr(torch.Tensor, "to", to)
    for stream in (False, True):
        moved[0] = 0
        with pytest.raises(torch.OutOfMemoryError):
            with pipeline_mod.offloaded(model, torch.device("meta"), True, stream_blocks=stream):
                pass
        assert {p.device.type for p in model.parameters()} == {"cpu"}, stream
    monkeypatch.undo()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_failed_refresh_is_retried_and_its_lora_switch_undone(tmp_path, monkeypatch):
    """Out of memory for the re-sized slots of a LoRA switch (8-bit branches grow the blocks): the call
    fails with the model as loaded, the offload keeps no half state (the next forward refreshes first; it
    indexed an empty slot list for good), and the same LoRA again is a new switch that works."""
    from safetensors.torch import save_file
    from lightx2v_engine.config import LoraSpec
    pipe = Pipeline.random("tiny", {**TINY, "cpu_offload": True, "dit_quantized": True,
                                    "dit_quant_scheme": "int8-vllm"}, device="cpu", seed=3)
    x = torch.randn(1, 16, 2, 4, 6, generator=torch.Generator().manual_seed(0))
    ctx = torch.randn(1, 512, pipe.dit.cfg.text_dim, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([700.0])
    base = pipe.dit(x, t, ctx)
    w = pipe.dit.blocks[0].self_attn.q
    g = torch.Generator().manual_seed(2)
    save_file({"diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.randn(w.out_features, 4, generator=g),
               "diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.randn(4, w.in_features, generator=g)},
              str(tmp_path / "l.safetensors"))
    spec = (LoraSpec(str(tmp_path / "l.safetensors"), 1.0),)
    real_empty = torch.empty

    def failing_empty(*a, **k):
        if k.get("dtype") is torch.uint8 and "device" in k:
            raise torch.OutOfMemoryError("simulated out of memory for the slots")
        return real_empty(*a, **k)
    monkeypatch.setattr(offload_mod.torch, "empty", failing_empty)
    with pytest.raises(torch.OutOfMemoryError, match="simulated"):
        pipe.set_request_loras(spec)
    monkeypatch.setattr(offload_mod.torch, "empty", real_empty)
    assert pipe._lora_switch.current == () and w.lora_down is None
    torch.testing.assert_close(pipe.dit(x, t, ctx), base, rtol=0, atol=0)  # (refreshed first)
    pipe.set_request_loras(spec)
    with_lora = pipe.dit(x, t, ctx)
    assert not torch.equal(with_lora, base)
    pipe.set_request_loras(())
    torch.testing.assert_close(pipe.dit(x, t, ctx), base, rtol=0, atol=0)


def test_a_kept_error_does_not_keep_a_dit_built_per_use(monkeypatch):
    """unload_modules: the failed forward's frames in a kept traceback (a notebook's last error) held the DiT
    built for that call, so a retry built a second one beside it."""
    import gc
    import weakref
    from lightx2v_engine import dit as dit_mod
    pipe = Pipeline.random("tiny", {**TINY, "unload_modules": True}, device="cpu", seed=3)
    refs = []
    orig_init, orig_fwd = dit_mod.WanDiT.__init__, dit_mod.WanBlock.forward

    def init(self, *a, **k):
        orig_init(self, *a, **k)
        refs.append(weakref.ref(self))

    def fwd(self, *a, **k):
        raise torch.OutOfMemoryError("simulated")
    monkeypatch.setattr(dit_mod.WanDiT, "__init__", init)
    monkeypatch.setattr(dit_mod.WanBlock, "forward", fwd)
    with pytest.raises(torch.OutOfMemoryError) as kept:
        pipe.generate("a cat", seed=1)
    gc.collect()
    assert len(refs) == 1 and refs[0]() is None, "the DiT outlived its failed call"
    monkeypatch.setattr(dit_mod.WanBlock, "forward", orig_fwd)
    assert pipe.generate("a cat", seed=1).frames is not None
    del kept


def test_a_kept_error_of_a_failed_build_or_step_holds_no_model_or_activations(monkeypatch):
    """The frames of a kept error (a notebook's last traceback) held (1) with unload_modules, a DiT whose
    build failed after it was made (out of memory placing it, a request LoRA file gone): a retry built a
    second one beside it; (2) on a resident DiT, the failed step's activations (GBs at 14B)."""
    import gc
    import weakref
    from lightx2v_engine import dit as dit_mod, pipeline as pipeline_mod
    pipe = Pipeline.random("tiny", {**TINY, "unload_modules": True}, device="cpu", seed=3)
    refs = []
    orig_init = dit_mod.WanDiT.__init__

    def init(self, *a, **k):
        orig_init(self, *a, **k)
        refs.append(weakref.ref(self))

    def place(*a, **k):
        raise torch.OutOfMemoryError("simulated: out of memory placing the DiT")
    monkeypatch.setattr(dit_mod.WanDiT, "__init__", init)
    with monkeypatch.context() as m:
        m.setattr(pipeline_mod, "_place_dit", place)
        with pytest.raises(torch.OutOfMemoryError) as kept:
            pipe.generate("a cat", seed=1)
    gc.collect()
    assert len(refs) == 1 and refs[0]() is None, "the DiT of the failed build outlived it"
    assert pipe.generate("a cat", seed=1).frames is not None
    del kept
    # (2) an activation made inside a block, then the block fails
    pipe = Pipeline.random("tiny", TINY, device="cpu", seed=3)
    made = []

    def fwd(self, xh, *a, **k):
        activation = torch.empty(1 << 16)
        made.append(weakref.ref(activation))
        raise torch.OutOfMemoryError("simulated: out of memory in a block")
    monkeypatch.setattr(dit_mod.WanBlock, "forward", fwd)
    with pytest.raises(torch.OutOfMemoryError) as kept:
        pipe.generate("a cat", seed=1)
    gc.collect()
    assert len(made) == 1 and made[0]() is None, "the failed step's activation outlived it"
    del kept
