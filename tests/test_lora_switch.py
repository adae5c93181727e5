"""Per-request LoRAs (lora.LoraSwitch, Pipeline.set_request_loras): each set restores the model as loaded
exactly, then merges; failures leave the model as loaded; offloaded blocks and 8-bit branches follow."""
import pytest
import torch
from safetensors.torch import save_file

from lightx2v_engine import lora as lora_mod
from lightx2v_engine.config import LoraSpec, get_preset
from lightx2v_engine.loading import build_dit
from lightx2v_engine.lora import LoraKeyError, LoraSwitch, merge_lora_, read_lora
from lightx2v_engine.pipeline import Pipeline
from lightx2v_engine.quant import QuantLinear, quantize_dit_

pytestmark = pytest.mark.usefixtures("torch_ops")

TARGETS = ["blocks.0.self_attn.q", "blocks.1.ffn.0", "blocks.1.cross_attn.o", "text_embedding.2", "head.head"]
TINY = {"target_video_length": 5, "target_height": 32, "target_width": 48}


def write_lora(path, model, targets=TARGETS, seed=0, rank=4, extra=None):
    g = torch.Generator().manual_seed(seed)
    sd = model.state_dict()
    lora = {}
    for t in targets:
        o, i = sd[t + ".weight"].shape
        lora[f"diffusion_model.{t}.lora_up.weight"] = torch.randn(o, rank, generator=g) * 0.2
        lora[f"diffusion_model.{t}.lora_down.weight"] = torch.randn(rank, i, generator=g) * 0.2
    lora.update(extra or {})
    save_file(lora, str(path))
    return LoraSpec(str(path), 1.0)


def snapshot(model):
    """Every tensor the model computes with, the LoRA branches of 8-bit linears included."""
    out = {k: v.clone() for k, v in model.state_dict().items()}
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear) and m.lora_down is not None:
            out[name + ".lora_down"], out[name + ".lora_up"] = m.lora_down.clone(), m.lora_up.clone()
    return out


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _dit(dtype=torch.bfloat16):
    torch.manual_seed(0)
    return build_dit(get_preset("tiny"), None, dtype=dtype, device="cpu")


@pytest.mark.parametrize("quantized", [False, True], ids=["bf16", "int8"])
def test_switching_restores_the_loaded_model_exactly(tmp_path, quantized):
    dit = _dit()
    if quantized:
        quantize_dit_(dit, "int8-vllm")
    a = write_lora(tmp_path / "a.safetensors", dit, seed=1)
    b = LoraSpec(write_lora(tmp_path / "b.safetensors", dit, seed=2, targets=TARGETS[:2]).path, 0.5)
    base = snapshot(dit)
    # what each set must equal: the loaded model with that LoRA merged once
    want = {}
    for spec in (a, b):
        ref = _dit()
        if quantized:
            quantize_dit_(ref, "int8-vllm")
        merge_lora_(ref, read_lora(spec.path), spec.strength)
        want[spec] = snapshot(ref)
    sw = LoraSwitch(dit)
    for spec in (a, b, a, None, b, b):
        sw.set(() if spec is None else (spec,))
        assert same(snapshot(dit), base if spec is None else want[spec]), spec
    assert sw.touched_quantized == quantized
    sw.set(())
    assert same(snapshot(dit), base)  # bitwise: no drift after five switches


def test_the_same_loras_again_cost_nothing(tmp_path, monkeypatch):
    dit = _dit()
    spec = write_lora(tmp_path / "a.safetensors", dit)
    sw = LoraSwitch(dit)
    calls = []
    real = lora_mod.merge_lora_
    monkeypatch.setattr(lora_mod, "merge_lora_", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    assert sw.set((spec,)) and len(calls) == 1
    assert not sw.set((spec,)) and len(calls) == 1
    assert sw.set((LoraSpec(spec.path, 0.7),)) and len(calls) == 2  # another strength is another set


def test_a_failing_lora_leaves_the_model_as_loaded(tmp_path):
    dit = _dit()
    good = write_lora(tmp_path / "good.safetensors", dit)
    bad = write_lora(tmp_path / "bad.safetensors", dit, seed=3,
                     extra={"diffusion_model.blocks.0.nonsense.lora_up.weight": torch.zeros(4, 4),
                            "diffusion_model.blocks.0.nonsense.lora_down.weight": torch.zeros(4, 4)})
    base = snapshot(dit)
    sw = LoraSwitch(dit)
    sw.set((good,))
    with pytest.raises(LoraKeyError, match="blocks.0.nonsense"):
        sw.set((good, bad))  # good merges first, then bad fails: both are taken off
    assert same(snapshot(dit), base) and sw.current == ()
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        sw.set((LoraSpec(str(tmp_path / "missing.safetensors"), 1.0),))
    assert same(snapshot(dit), base)
    sw.set((good,))  # and it still works afterwards
    assert not same(snapshot(dit), base)


@pytest.mark.parametrize("offload", [False, True], ids=["resident", "block_offload"])
def test_pipeline_request_loras_equal_config_loras(tmp_path, offload):
    """A request LoRA gives the video of the same LoRA given in the config; none gives the base video
    again; with block offload the prefetched blocks reload the changed host weights."""
    extra = {"cpu_offload": True} if offload else {}
    pipe = Pipeline.random("tiny", {**TINY, **extra}, device="cpu", seed=3)
    spec = write_lora(tmp_path / "a.safetensors", pipe.dit, targets=["blocks.0.self_attn.q", "blocks.1.ffn.2"])
    base = pipe.generate("a cat", seed=1).latents
    ref = Pipeline.random("tiny", TINY, device="cpu", seed=3)
    merge_lora_(ref.dit, read_lora(spec.path), 1.0)
    want = ref.generate("a cat", seed=1).latents
    pipe.set_request_loras([spec])
    assert torch.equal(pipe.generate("a cat", seed=1).latents, want)
    pipe.set_request_loras([])
    assert torch.equal(pipe.generate("a cat", seed=1).latents, base)
    pipe.set_request_loras([spec])
    assert torch.equal(pipe.generate("a cat", seed=1).latents, want)


@pytest.mark.parametrize("config_lora", [False, True], ids=["no_config_lora", "config_lora"])
def test_request_loras_on_an_8bit_dit_with_block_offload(tmp_path, config_lora):
    """An 8-bit linear takes a request LoRA as new branch tensors, outside its block's packed buffer: the
    block is re-packed (and the slots grow) so that the branch travels with it; taking it off puts the
    earlier branches (a config LoRA's) back. Each state equals the same DiT resident."""
    def dit():
        m = _dit(torch.float32)
        quantize_dit_(m, "int8-vllm")
        return m
    offloaded, resident = dit(), dit()
    cfg_spec = write_lora(tmp_path / "cfg.safetensors", offloaded, targets=["blocks.1.ffn.0"], seed=4)
    req = write_lora(tmp_path / "req.safetensors", offloaded, seed=5, rank=8)
    if config_lora:
        for m in (offloaded, resident):
            merge_lora_(m, read_lora(cfg_spec.path), 1.0)
    from lightx2v_engine.offload import attach_block_offload
    off = attach_block_offload(offloaded, "cpu")
    slot_size = off.slots[0].numel()
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(1, 16, 3, 8, 12, generator=g), torch.tensor([700.0])
    ctx = torch.randn(1, 512, offloaded.cfg.text_dim, generator=g)
    sw_off, sw_res = LoraSwitch(offloaded), LoraSwitch(resident)
    for specs in ((req,), (), (req,)):
        sw_off.set(specs)
        off.refresh()
        sw_res.set(specs)
        torch.testing.assert_close(offloaded(x, t, ctx), resident(x, t, ctx), rtol=0, atol=0)
        if specs:
            assert off.slots[0].numel() > slot_size  # the branches made the blocks bigger
            assert offloaded.blocks[0].self_attn.q.lora_down.shape[0] == 8 + 0  # q has no config branch
        else:  # and the slots shrink back when they go
            assert off.slots[0].numel() == slot_size == max(p.nbytes for p in off.packs)
    assert all(p.is_current() for p in off.packs)


@pytest.mark.gpu
@pytest.mark.last
def test_request_loras_with_block_offload_on_cuda(tmp_path):
    """On CUDA the merge arithmetic of an offloaded DiT runs on the GPU (compute_device), the host weights
    change, the blocks reload: the result equals the resident pipeline with the same request LoRA."""
    pipes = [Pipeline.random("tiny", {**TINY, **extra}, device="cuda", seed=3) for extra in ({}, {"cpu_offload": True})]
    spec = write_lora(tmp_path / "a.safetensors", pipes[0].dit, targets=["blocks.0.self_attn.q", "blocks.1.ffn.2"])
    out = []
    for p in pipes:
        p.generate("a cat", seed=1)  # the offloaded one has block 0 prefetched when the LoRA arrives
        p.set_request_loras([spec])
        out.append(p.generate("a cat", seed=1).latents)
    torch.testing.assert_close(out[1], out[0], rtol=1e-6, atol=1e-6)


def int8_offload_case(t2v_folder, tmp_path):
    """(config, request LoRA): the tiny folder's DiT as a LightX2V int8 checkpoint with block offload and a
    config LoRA on blocks.0.self_attn.q, and a request LoRA on that linear and blocks.1.ffn.0."""
    from lightx2v_engine.loading import load_dit
    dit = load_dit(get_preset("tiny"), t2v_folder, dtype="bf16")
    quantize_dit_(dit, "int8-vllm")
    qpath = tmp_path / "q.safetensors"
    save_file({k: v.contiguous() for k, v in dit.state_dict().items()}, str(qpath))
    cfg_lora = write_lora(tmp_path / "cfg.safetensors", dit, targets=["blocks.0.self_attn.q"], seed=6)
    req = write_lora(tmp_path / "req.safetensors", dit, targets=["blocks.0.self_attn.q", "blocks.1.ffn.0"], seed=7)
    cfg = {**TINY, "dit_quantized": True, "dit_quantized_ckpt": str(qpath), "dit_quant_scheme": "int8-vllm",
           "cpu_offload": True, "lora_configs": [{"path": cfg_lora.path, "strength": 1.0}]}
    return cfg, req


def test_pipeline_request_lora_on_an_8bit_offloaded_dit_repacks_and_keeps_no_old_packs(t2v_folder, tmp_path):
    """Pipeline.set_request_loras re-packs the offloaded blocks whose 8-bit branches changed (on a GPU a
    branch left outside the pack would stay on the CPU); the switch keeps copies of the earlier branches,
    not views that would keep replaced packs (host memory) alive."""
    cfg, req = int8_offload_case(t2v_folder, tmp_path)
    pipe = Pipeline.load(t2v_folder, cfg, device="cpu")
    pipe.set_request_loras([req])
    off = pipe.dit.block_offload
    assert all(p.is_current() for p in off.packs)
    for entry in pipe._lora_switch._saved.values():
        for t in entry[2:] if entry[0] == "branch" else ():
            if t is not None:  # owns its storage (no view of a block's packed buffer)
                assert t.untyped_storage().nbytes() == t.numel() * t.element_size()
    pipe.set_request_loras([])
    assert all(p.is_current() for p in off.packs)


def test_merge_arithmetic_runs_on_compute_device():
    """compute_device routes the merge arithmetic (the GPU for an offloaded DiT's host weights): on the
    meta device the result cannot be copied back, which shows where it ran."""
    dit = _dit()
    lora = {"diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.ones(256, 2),
            "diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.ones(2, 256)}
    before = dit.blocks[0].self_attn.q.weight.clone()
    with pytest.raises((NotImplementedError, RuntimeError)):
        merge_lora_(dit, lora, 1.0, compute_device="meta")
    assert torch.equal(dit.blocks[0].self_attn.q.weight, before)
    merge_lora_(dit, lora, 1.0, compute_device="cpu")
    assert not torch.equal(dit.blocks[0].self_attn.q.weight, before)


def test_kept_copies_reuse_their_buffers_across_switches(tmp_path):
    """The host copies of changed weights live in buffers kept per weight: switching back and forth
    allocates (and on CUDA page-locks) nothing new, and the restore stays exact."""
    dit = _dit()
    a = write_lora(tmp_path / "a.safetensors", dit, seed=1)
    b = write_lora(tmp_path / "b.safetensors", dit, seed=2, targets=TARGETS[:3])
    base = snapshot(dit)
    sw = LoraSwitch(dit)
    sw.set((a,))
    bufs = dict(sw._host)
    assert set(bufs) == {t + ".weight" for t in TARGETS}
    for specs in ((b,), (a,), ()):
        sw.set(specs)
        assert all(sw._host[k] is v for k, v in bufs.items())
    assert same(snapshot(dit), base)


def test_bias_diffs_on_an_offloaded_8bit_dit_come_off_after_a_repack(t2v_folder, tmp_path):
    """A LoRA's diff_b on a QuantLinear bias (a buffer, replaced by the re-pack of its offloaded block) is
    taken off again: the restore writes the module's tensor of the moment, not the one saved before the
    re-pack (which left the live bias drifting by one diff per switch)."""
    from lightx2v_engine.loading import load_dit
    dit = load_dit(get_preset("tiny"), t2v_folder, dtype="bf16")
    quantize_dit_(dit, "int8-vllm")
    qpath = tmp_path / "q.safetensors"
    save_file({k: v.contiguous() for k, v in dit.state_dict().items()}, str(qpath))
    lora_path = tmp_path / "b.safetensors"
    g = torch.Generator().manual_seed(0)
    save_file({"diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.randn(256, 2, generator=g),
               "diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.randn(2, 256, generator=g),
               "diffusion_model.blocks.0.self_attn.q.diff_b": torch.ones(256)}, str(lora_path))
    cfg = {**TINY, "dit_quantized": True, "dit_quantized_ckpt": str(qpath), "dit_quant_scheme": "int8-vllm",
           "cpu_offload": True}
    pipe = Pipeline.load(t2v_folder, cfg, device="cpu")
    q = pipe.dit.blocks[0].self_attn.q
    loaded = q.bias.clone()
    for _ in range(3):
        pipe.set_request_loras([LoraSpec(str(lora_path), 1.0)])
        torch.testing.assert_close(q.bias.float(), loaded.float() + 1, rtol=0, atol=1e-2)
        pipe.set_request_loras([])
        assert torch.equal(q.bias, loaded)


def test_weights_changed_between_sets_are_copied_again(tmp_path):
    """A switch from one LoRA to another reuses the copies it just restored from; across set() calls the
    copies are taken again, so a weight changed in between (e.g. new weights loaded) is what comes back."""
    dit = _dit()
    a = write_lora(tmp_path / "a.safetensors", dit, seed=1)
    sw = LoraSwitch(dit)
    sw.set((a,))
    sw.set(())
    w = dit.blocks[0].self_attn.q.weight
    with torch.no_grad():
        w.add_(1.0)
    changed = w.clone()
    sw.set((a,))
    sw.set(())
    assert torch.equal(w, changed)


def test_weight_auto_quant_request_loras_are_branches_whether_resident_or_built_per_use(t2v_folder, tmp_path):
    """weight_auto_quant: the config's LoRAs merge before the quantization; a request LoRA runs as low-rank
    branches beside the 8-bit linears - on the resident DiT and on one built per use (unload_modules) alike
    (that one merged it before quantizing, and checked a .diff against the wrong model). Pipeline.random
    with dit_quantized follows the same order as Pipeline.load."""
    cfg = {**TINY, "dit_quantized": True, "dit_quant_scheme": "int8-vllm", "weight_auto_quant": True}
    spec = write_lora(tmp_path / "req.safetensors", _dit(torch.float32), seed=5)
    latents = []
    for extra in ({}, {"unload_modules": True}):
        pipe = Pipeline.load(t2v_folder, {**cfg, **extra}, device="cpu")
        pipe.set_request_loras([spec])
        latents.append(pipe.generate("a cat", seed=3).latents)
    torch.testing.assert_close(latents[1], latents[0], rtol=0, atol=0)
    diff = tmp_path / "diff.safetensors"
    save_file({"diffusion_model.blocks.0.self_attn.q.diff": torch.zeros(256, 256)}, str(diff))
    with pytest.raises(LoraKeyError, match="list the LoRA in the config's lora_configs"):
        pipe.set_request_loras([LoraSpec(str(diff), 1.0)])
    rnd = Pipeline.random("tiny", {**TINY, "dit_quantized": True, "dit_quant_scheme": "int8-vllm",
                                   "lora_configs": [{"path": spec.path, "strength": 1.0}]}, device="cpu", seed=0)
    quant = [m for m in rnd.dit.modules() if isinstance(m, QuantLinear)]
    assert quant and all(m.lora_down is None for m in quant)  # merged, then 8-bit
