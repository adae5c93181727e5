"""The DiT against diffusers' WanTransformer3DModel (independent reference) and the real presets' sizes."""
import pytest
import torch
from safetensors.torch import save_file

from lightx2v_engine.checkpoint import CheckpointError
from lightx2v_engine.config import PRESETS
from lightx2v_engine.dit import WanDiT, count_parameters, param_dtype
from lightx2v_engine.keymap import wan_to_diffusers
from lightx2v_engine.loading import build_dit, find_dit_checkpoint, load_dit

from dit_fixtures import TINY_I2V, TINY_T2V, diffusers_forward, diffusers_model, inputs, rel_l2, wan_state_dict


pytestmark = pytest.mark.usefixtures("torch_ops")  # the plain-PyTorch reference ops (conftest)


@pytest.mark.parametrize("cfg", [TINY_T2V, TINY_I2V], ids=["t2v", "i2v"])
@pytest.mark.parametrize("layout", ["wan", "diffusers"])
def test_matches_diffusers(cfg, layout, tmp_path):
    ref = diffusers_model(cfg)
    if layout == "wan":
        save_file(wan_state_dict(ref), str(tmp_path / "diffusion_pytorch_model.safetensors"))
    else:
        (tmp_path / "transformer").mkdir()
        save_file({k: v.contiguous() for k, v in ref.state_dict().items()},
                  str(tmp_path / "transformer" / "diffusion_pytorch_model.safetensors"))
    model = load_dit(cfg, tmp_path, dtype="fp32", distill=False)
    x, t, ctx, clip, y = inputs(cfg, f=3, h=6, w=10, text_rows=7)
    with torch.no_grad():
        ours = model(x, t, ctx, clip, y)
    theirs = diffusers_forward(ref, x, t, ctx, clip, y)
    assert ours.shape == theirs.shape == (1, 16, 3, 6, 10)
    assert ours.dtype == torch.float32
    err = rel_l2(ours, theirs)
    assert err <= 1e-4, err


def test_batch_of_two_equals_two_singles():
    ref = diffusers_model(TINY_T2V)
    model = build_dit(TINY_T2V, None, dtype=torch.float32)
    model.load_state_dict(wan_state_dict(ref))
    x, t, ctx, _, _ = inputs(TINY_T2V, batch=2, text_len=16)
    t = torch.tensor([1000.0, 625.0])
    with torch.no_grad():
        both = model(x, t, ctx)
        one = model(x[1:], t[1:], ctx[1:])
    assert rel_l2(both[1:], one) < 1e-5


@pytest.mark.parametrize("cfg", [TINY_T2V, TINY_I2V], ids=["t2v", "i2v"])
def test_trimmed_context_is_padded_to_text_len(cfg):
    """Wan's WanModel zero-pads the T5 context to text_len before text_embedding, and the zero rows still
    attend (text_embedding's biases make them non-zero keys and values): a trimmed context (Wan's own T5
    wrapper returns the prompt's rows only) gave a different velocity (rel L2 0.40 at 7 of 512 rows)."""
    ref = diffusers_model(cfg)
    model = build_dit(cfg, None, dtype=torch.float32)
    model.load_state_dict(wan_state_dict(ref))
    x, t, ctx, clip, y = inputs(cfg, text_rows=7, text_len=512)
    with torch.no_grad():
        full = model(x, t, ctx, clip, y)
        trimmed = model(x, t, ctx[:, :7], clip, y)
        expected = diffusers_forward(ref, x, t, ctx, clip, y)
    assert rel_l2(trimmed, full) < 1e-6
    assert rel_l2(trimmed, expected) < 1e-4


def test_bf16_path_close_to_fp32():
    """The bf16 run keeps the fp32 regions: its error vs fp32 stays at bf16 level."""
    ref = diffusers_model(TINY_T2V)
    sd = wan_state_dict(ref)
    m32 = build_dit(TINY_T2V, None, dtype=torch.float32)
    m32.load_state_dict(sd)
    m16 = build_dit(TINY_T2V, None, dtype=torch.bfloat16)
    m16.load_state_dict({k: v.to(param_dtype(k, torch.bfloat16)) for k, v in sd.items()})
    assert m16.time_projection[1].weight.dtype == torch.float32
    assert m16.blocks[0].modulation.dtype == torch.float32
    assert m16.blocks[0].ffn[0].weight.dtype == torch.bfloat16
    x, t, ctx, _, _ = inputs(TINY_T2V, text_len=16)
    # the fp32 regions, seen where they enter the modules (the error bound alone cannot see them: a bf16
    # residual stream and time embedding measured 5.2e-3 against 3.2e-3 here)
    seen = []
    hooks = [m16.time_embedding.register_forward_hook(lambda m, a, out: seen.append(("e", out.dtype))),
             m16.time_projection.register_forward_hook(lambda m, a, out: seen.append(("e0", out.dtype)))]
    hooks += [blk.register_forward_pre_hook(lambda m, a: seen.append(("x, mod", a[0][0].dtype, a[1].dtype)))
              for blk in m16.blocks]
    with torch.no_grad():
        a, b = m32(x, t, ctx), m16(x, t, ctx)
    for h in hooks:
        h.remove()
    assert seen == [("e", torch.float32), ("e0", torch.float32)] + [("x, mod", torch.float32, torch.float32)] * 2
    assert b.dtype == torch.float32
    assert rel_l2(b, a) < 3e-2


@pytest.mark.parametrize("name,count", [("wan2.1-t2v-1.3b", 1_418_996_800), ("wan2.1-t2v-14b", 14_288_491_584),
                                        ("wan2.1-i2v-14b-480p", 16_394_878_784),
                                        ("wan2.1-i2v-14b-720p", 16_394_878_784)])
def test_preset_parameter_counts(name, count):
    with torch.device("meta"):
        model = WanDiT(PRESETS[name])
    assert count_parameters(model) == count


def test_diffusers_key_map_is_complete_for_real_sizes():
    """Every Wan key of the real I2V preset maps to a diffusers key of the same-config diffusers model."""
    from diffusers import WanTransformer3DModel
    with torch.device("meta"):
        ours = WanDiT(PRESETS["wan2.1-i2v-14b-480p"])
        theirs = WanTransformer3DModel(num_layers=40, image_dim=1280, added_kv_proj_dim=5120, in_channels=36)
    mapped = {wan_to_diffusers(k) for k in ours.state_dict()}
    assert mapped == set(theirs.state_dict())


def _save_wan(tmp_path, cfg=TINY_T2V, name="diffusion_pytorch_model.safetensors", prefix="", sd=None):
    sd = sd if sd is not None else wan_state_dict(diffusers_model(cfg))
    save_file({prefix + k: v for k, v in sd.items()}, str(tmp_path / name))
    return sd


def _same_weights(model, sd):
    msd = model.state_dict()
    return all(torch.equal(msd[k].float(), v.float()) for k, v in sd.items())


def test_sharded_loading_with_index(tmp_path):
    import json
    sd = wan_state_dict(diffusers_model(TINY_T2V))
    keys = sorted(sd)
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "diffusion_pytorch_model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    weight_map = {}
    for fname, ks in shards.items():
        save_file({k: sd[k] for k in ks}, str(tmp_path / fname))
        weight_map.update({k: fname for k in ks})
    (tmp_path / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    model = load_dit(TINY_T2V, tmp_path, dtype="fp32")
    assert _same_weights(model, sd)


@pytest.mark.parametrize("prefix", ["model.", "diffusion_model.", "model.diffusion_model."])
def test_prefixed_keys(tmp_path, prefix):
    sd = _save_wan(tmp_path, name="ckpt.safetensors", prefix=prefix)
    model = load_dit(TINY_T2V, None, dit_original_ckpt=str(tmp_path / "ckpt.safetensors"), dtype="fp32")
    assert _same_weights(model, sd)


def test_pt_checkpoint_and_distill_locations(tmp_path):
    sd = wan_state_dict(diffusers_model(TINY_T2V))
    (tmp_path / "distill_models").mkdir()
    torch.save({"model." + k: v for k, v in sd.items()}, tmp_path / "distill_models" / "distill_model.pt")
    # a base checkpoint with other weights is present too: the distill one must win
    _save_wan(tmp_path, sd={k: v + 1 for k, v in sd.items()})
    assert find_dit_checkpoint(tmp_path)[0].name == "distill_model.pt"
    model = load_dit(TINY_T2V, tmp_path, dtype="fp32", distill=True)
    assert _same_weights(model, sd)
    base = load_dit(TINY_T2V, tmp_path, dtype="fp32", distill=False)
    assert not _same_weights(base, sd)


def test_distill_model_pt_in_the_folder_comes_before_dit_original_ckpt(tmp_path, caplog):
    """LightX2V's distill runner loads {model_path}/distill_model.pt when present, before dit_original_ckpt:
    the engine loaded dit_original_ckpt, another model than LightX2V's for the same folder and config. A
    warning names both."""
    sd = wan_state_dict(diffusers_model(TINY_T2V))
    torch.save(sd, tmp_path / "distill_model.pt")
    _save_wan(tmp_path, sd={k: v + 1 for k, v in sd.items()})
    with caplog.at_level("WARNING"):
        files = find_dit_checkpoint(tmp_path, "diffusion_pytorch_model.safetensors")
    assert [f.name for f in files] == ["distill_model.pt"] and "before dit_original_ckpt" in caplog.text
    assert find_dit_checkpoint(tmp_path, "diffusion_pytorch_model.safetensors", distill=False)[0].name == \
        "diffusion_pytorch_model.safetensors"


def test_missing_checkpoint_names_every_place(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        load_dit(TINY_T2V, tmp_path, dtype="fp32")
    msg = str(e.value)
    assert "distill_model.pt" in msg and "diffusion_pytorch_model.safetensors" in msg and "transformer" in msg
    with pytest.raises(FileNotFoundError, match="nothere.safetensors"):
        load_dit(TINY_T2V, tmp_path, dit_original_ckpt="nothere.safetensors")


def test_missing_and_mis_shaped_keys(tmp_path):
    sd = wan_state_dict(diffusers_model(TINY_T2V))
    bad = dict(sd)
    del bad["blocks.1.ffn.2.weight"]
    _save_wan(tmp_path, sd=bad, name="a.safetensors")
    with pytest.raises(CheckpointError, match=r"missing 1 key.*blocks\.1\.ffn\.2\.weight"):
        load_dit(TINY_T2V, None, dit_original_ckpt=str(tmp_path / "a.safetensors"))
    bad = dict(sd)
    bad["blocks.0.self_attn.q.weight"] = torch.zeros(64, 32)
    _save_wan(tmp_path, sd=bad, name="b.safetensors")
    with pytest.raises(CheckpointError, match=r"blocks\.0\.self_attn\.q\.weight.*\(64, 32\).*\(64, 64\)"):
        load_dit(TINY_T2V, None, dit_original_ckpt=str(tmp_path / "b.safetensors"))
    # a 1.3B-config checkpoint into the I2V tiny model: unexpected/missing keys named
    with pytest.raises(CheckpointError, match="img_emb"):
        load_dit(TINY_I2V, None, dit_original_ckpt=str(tmp_path / "b.safetensors"))


def test_corrupt_and_truncated_files(tmp_path):
    _save_wan(tmp_path, name="good.safetensors")
    data = (tmp_path / "good.safetensors").read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="trunc.safetensors.*truncated"):
        load_dit(TINY_T2V, None, dit_original_ckpt=str(tmp_path / "trunc.safetensors"))
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="junk.safetensors.*corrupt"):
        load_dit(TINY_T2V, None, dit_original_ckpt=str(tmp_path / "junk.safetensors"))
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="junk.pt"):
        load_dit(TINY_T2V, None, dit_original_ckpt=str(tmp_path / "junk.pt"))


def test_bad_input_shapes_are_named():
    model = build_dit(TINY_T2V, None, dtype=torch.float32)
    x, t, ctx, _, _ = inputs(TINY_T2V, text_len=8)
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        model(x[..., :5], t, ctx)
    with pytest.raises(ValueError, match="context must be"):
        model(x, t, ctx[..., :5])
    with pytest.raises(ValueError, match="T2V model"):
        model(x, t, ctx, torch.zeros(1, 257, 48), None)
    i2v = build_dit(TINY_I2V, None, dtype=torch.float32)
    with pytest.raises(ValueError, match="clip_fea and y are required"):
        i2v(x, t, ctx)


def _activations_alive_at_ffn2(model, x, t, ctx, clip=None, y=None) -> list[str]:
    """The [B, L, C] activations alive when the second block's ffn.2 runs (found through the garbage
    collector's view of every tensor), as 'dtype shape' strings."""
    import gc
    b, L, C = x.shape[0], x.shape[2] * x.shape[3] * x.shape[4] // 4, model.cfg.dim
    seen = []

    def hook(mod, args):
        gc.collect()
        seen.extend(f"{o.dtype} {tuple(o.shape)}" for o in gc.get_objects()
                    if type(o) is torch.Tensor and o.dim() == 3 and tuple(o.shape) == (b, L, C))

    handle = model.blocks[1].ffn[2].register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            model(x, t, ctx, clip, y)
    finally:
        handle.remove()
    return seen


def test_dead_activations_are_freed_within_a_block():
    """At the peak of a block (its FFN), only the residual stream x and the FFN's modulated input h2 are
    alive of the [B, L, C] activations: the patch tokens, the caller's pre-block x and the block's
    modulated input, self-attention output, norm3 output and cross-attention output are freed once used
    (they stayed referenced, ~8 [B, L, C] units of extra GPU memory at the 14B's shapes)."""
    from lightx2v_engine import ops
    ops.set_backend("torch")
    try:
        for cfg in (TINY_T2V, TINY_I2V):
            model = build_dit(cfg, None, dtype=torch.float32)
            x, t, ctx, clip, y = inputs(cfg, text_len=16)
            alive = _activations_alive_at_ffn2(model, x, t, ctx, clip, y)
            assert len(alive) == 2, alive  # x (fp32) and h2
    finally:
        ops.set_backend("auto")


def test_rope_tables_are_cached_for_the_recent_shapes_only():
    """A server taking many sizes keeps the RoPE tables of the ROPE_SHAPES most recently used grids (it kept
    every size's: ~0.7 GB at 2048x2048x321); a grid in use is computed once."""
    from lightx2v_engine.dit import ROPE_SHAPES
    model = build_dit(TINY_T2V, None, dtype=torch.float32)
    first = model.rope((1, 2, 2), torch.device("cpu"))
    for i in range(ROPE_SHAPES + 3):
        model.rope((1, 2, 4 + 2 * i), torch.device("cpu"))
        assert model.rope((1, 2, 4 + 2 * i), torch.device("cpu")) is model.rope((1, 2, 4 + 2 * i), torch.device("cpu"))
    assert len(model._rope_cache) == ROPE_SHAPES
    assert model.rope((1, 2, 2), torch.device("cpu")) is not first  # evicted, then made again
    assert torch.equal(model.rope((1, 2, 2), torch.device("cpu")).cos, first.cos)


def test_bad_inputs_name_the_tensor():
    """Every shape a Wan DiT cannot take is a ValueError naming the tensor: a context longer than text_len
    (Wan pads to it) or empty, a CLIP feature count other than 257 (a 514-token first-last-frame input ran as
    plain I2V), y on a T2V model (was a channel-count error), a 4-D y, t on another device."""
    i2v, t2v = build_dit(TINY_I2V, None, dtype=torch.float32), build_dit(TINY_T2V, None, dtype=torch.float32)
    x, t, ctx, clip, y = inputs(TINY_I2V)
    cases = [
        (i2v, (x, t, torch.zeros(1, 513, TINY_I2V.text_dim), clip, y), r"context has 513 rows: 1 to 512"),
        (i2v, (x, t, ctx[:, :0], clip, y), r"context has 0 rows"),
        (i2v, (x, t, ctx, clip[:, :100], y), r"clip_fea must be \[1, 257, \d+\], got \(1, 100"),
        (i2v, (x, t, ctx, torch.cat([clip, clip], 1), y), r"clip_fea must be \[1, 257"),
        (i2v, (x, t, ctx, clip, y[0]), r"y must be \[1, 20, 3, 6, 10\], got \(20, 3, 6, 10\)"),
        (t2v, (x, t, ctx, None, y), r"T2V model: clip_fea/y must not be given"),
        (t2v, (x, t.to("meta"), ctx, None, None), r"t is on meta, x on cpu"),
    ]
    for model, args, match in cases:
        with pytest.raises(ValueError, match=match):
            model(*args)
