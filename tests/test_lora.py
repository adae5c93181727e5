"""LoRA merge: against an independently computed expectation and against diffusers' own LoRA loading."""
import pytest
import torch
from safetensors.torch import save_file

from lightx2v_engine.config import LoraSpec
from lightx2v_engine.loading import build_dit, load_dit
from lightx2v_engine.lora import LoraKeyError, merge_lora_

from dit_fixtures import TINY_I2V, TINY_T2V, diffusers_forward, diffusers_model, inputs, rel_l2, wan_state_dict

RANK = 4


pytestmark = pytest.mark.usefixtures("torch_ops")  # the plain-PyTorch reference ops (conftest)


def make_lora(sd, targets, seed=0, alpha=8.0, prefix="diffusion_model.", style=("lora_up", "lora_down")):
    g = torch.Generator().manual_seed(seed)
    lora = {}
    for t in targets:
        out_f, in_f = sd[t + ".weight"].shape
        up, down = style
        lora[f"{prefix}{t}.{up}.weight"] = torch.randn(out_f, RANK, generator=g) * 0.1
        lora[f"{prefix}{t}.{down}.weight"] = torch.randn(RANK, in_f, generator=g) * 0.1
        if alpha is not None:
            lora[f"{prefix}{t}.alpha"] = torch.tensor(alpha)
    return lora


LINEARS = ["blocks.0.self_attn.q", "blocks.1.cross_attn.o", "blocks.0.ffn.0", "blocks.1.ffn.2", "text_embedding.2",
           "time_projection.1", "head.head"]


def expected_after(sd, loras_with_strength):
    """Independent arithmetic on the plain state dict, in float64."""
    out = {k: v.double().clone() for k, v in sd.items()}
    for lora, s in loras_with_strength:
        for k, v in lora.items():
            k = k.removeprefix("diffusion_model.")
            for up_s, down_s in ((".lora_up.weight", ".lora_down.weight"), (".lora_B.weight", ".lora_A.weight")):
                if k.endswith(up_s):
                    base = k[: -len(up_s)]
                    down = lora["diffusion_model." + base + down_s].double()
                    a = lora.get("diffusion_model." + base + ".alpha")
                    scale = (a.item() / down.shape[0]) if a is not None else 1.0
                    out[base + ".weight"] += s * scale * v.double() @ down
            if k.endswith(".diff_b"):
                out[k[: -len(".diff_b")] + ".bias"] += s * v.double()
            elif k.endswith(".diff_m"):
                out[k[: -len(".diff_m")] + ".modulation"] += s * v.double()
            elif k.endswith(".diff"):
                out[k[: -len(".diff")] + ".weight"] += s * v.double()
    return out


def test_merge_matches_expectation_several_loras(tmp_path):
    sd = wan_state_dict(diffusers_model(TINY_T2V))
    save_file(sd, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    l1 = make_lora(sd, LINEARS, seed=1, alpha=8.0)
    l1["diffusion_model.blocks.0.self_attn.q.diff_b"] = torch.randn(64) * 0.1
    l1["diffusion_model.blocks.1.diff_m"] = torch.randn(1, 6, 64) * 0.1
    l1["diffusion_model.blocks.0.norm3.diff"] = torch.randn(64) * 0.1
    l2 = make_lora(sd, LINEARS[:3], seed=2, alpha=None, style=("lora_B", "lora_A"))
    save_file(l1, str(tmp_path / "l1.safetensors"))
    save_file(l2, str(tmp_path / "l2.safetensors"))
    model = load_dit(TINY_T2V, tmp_path, dtype="fp32",
                     lora_specs=[LoraSpec(str(tmp_path / "l1.safetensors"), 0.7), LoraSpec("l2.safetensors", -1.3)])
    exp = expected_after(sd, [(l1, 0.7), (l2, -1.3)])
    got = model.state_dict()
    changed = 0
    for k, v in exp.items():
        assert torch.allclose(got[k].double(), v, atol=1e-6, rtol=1e-6), k
        changed += not torch.equal(sd[k], got[k])
    assert changed == len(LINEARS) + 3


def test_merge_in_bf16_is_done_in_fp32_then_cast():
    sd = wan_state_dict(diffusers_model(TINY_T2V))
    model = build_dit(TINY_T2V, None, dtype=torch.bfloat16)
    model.load_state_dict({k: v.to(p.dtype) for (k, v), p in zip(sd.items(), [model.state_dict()[k] for k in sd])})
    before = model.blocks[0].ffn[0].weight.detach().clone()
    lora = make_lora(sd, ["blocks.0.ffn.0"], alpha=4.0)
    merge_lora_(model, lora, strength=1.0)
    up, down = lora["diffusion_model.blocks.0.ffn.0.lora_up.weight"], lora["diffusion_model.blocks.0.ffn.0.lora_down.weight"]
    exp = (before.float() + (4.0 / RANK) * up @ down).to(torch.bfloat16)
    assert model.blocks[0].ffn[0].weight.dtype == torch.bfloat16
    assert torch.equal(model.blocks[0].ffn[0].weight, exp)


def test_unmatched_keys_error_lists_them_and_changes_nothing():
    sd = wan_state_dict(diffusers_model(TINY_T2V))
    model = build_dit(TINY_T2V, None, dtype=torch.float32)
    model.load_state_dict(sd)
    lora = make_lora(sd, ["blocks.0.self_attn.q"])
    lora["diffusion_model.blocks.7.self_attn.q.lora_up.weight"] = torch.zeros(64, RANK)
    lora["diffusion_model.blocks.7.self_attn.q.lora_down.weight"] = torch.zeros(RANK, 64)
    lora["diffusion_model.something.diff"] = torch.zeros(3)
    with pytest.raises(LoraKeyError) as e:
        merge_lora_(model, lora, source="my_lora.safetensors")
    assert "blocks.7.self_attn.q.lora_up.weight" in str(e.value) and "something.diff" in str(e.value)
    assert "my_lora.safetensors" in str(e.value)
    assert torch.equal(model.blocks[0].self_attn.q.weight, sd["blocks.0.self_attn.q.weight"])
    with pytest.warns(UserWarning, match="match no model weight"):
        n = merge_lora_(model, lora, strict=False)
    assert n == 1


def test_shape_mismatch_is_named():
    model = build_dit(TINY_T2V, None, dtype=torch.float32)
    lora = {"blocks.0.ffn.0.lora_up.weight": torch.zeros(64, RANK), "blocks.0.ffn.0.lora_down.weight": torch.zeros(RANK, 64)}
    with pytest.raises(LoraKeyError, match=r"blocks\.0\.ffn\.0\.weight.*\(96, 64\)"):
        merge_lora_(model, lora)


def test_missing_lora_file_names_places(tmp_path):
    sd = wan_state_dict(diffusers_model(TINY_T2V))
    save_file(sd, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_dit(TINY_T2V, tmp_path, lora_specs=[LoraSpec("nope.safetensors", 1.0)])


@pytest.mark.parametrize("cfg", [TINY_T2V, TINY_I2V], ids=["t2v", "i2v"])
def test_against_diffusers_lora_loading(cfg):
    """diffusers converts a LightX2V-format LoRA (diffusion_model.* lora_down/up + alpha, diff_b) itself and runs
    it through PEFT; our merged model must produce the same output."""
    pytest.importorskip("peft", reason="peft is a test extra")
    from diffusers.loaders import WanLoraLoaderMixin
    ref = diffusers_model(cfg)
    sd = wan_state_dict(ref)
    targets = ["blocks.0.self_attn.q", "blocks.0.self_attn.v", "blocks.1.cross_attn.k", "blocks.0.ffn.0", "blocks.1.ffn.2"]
    if cfg.is_i2v:
        targets += ["blocks.0.cross_attn.k_img", "blocks.1.cross_attn.v_img"]
    lora = make_lora(sd, targets, seed=3, alpha=2.0)
    lora["diffusion_model.blocks.1.self_attn.o.diff_b"] = torch.randn(64) * 0.1

    ours = build_dit(cfg, None, dtype=torch.float32)
    ours.load_state_dict(sd)
    merge_lora_(ours, {k: v.clone() for k, v in lora.items()})

    converted = WanLoraLoaderMixin.lora_state_dict({k: v.clone() for k, v in lora.items()})
    if isinstance(converted, tuple):
        converted = converted[0]
    WanLoraLoaderMixin.load_lora_into_transformer(converted, transformer=ref)
    x, t, ctx, clip, y = inputs(cfg, text_len=512)  # diffusers' I2V attention assumes 512 text rows
    with torch.no_grad():
        a = ours(x, t, ctx, clip, y)
    b = diffusers_forward(ref, x, t, ctx, clip, y)
    base = build_dit(cfg, None, dtype=torch.float32)
    base.load_state_dict(sd)
    with torch.no_grad():
        c = base(x, t, ctx, clip, y)
    assert rel_l2(c, b) > 1e-3  # the LoRA does change the output
    assert rel_l2(a, b) <= 1e-4


@pytest.mark.parametrize("style", [("lora_B.default", "lora_A.default"), ("lora_B", "lora_A"),
                                   ("lora_linear_layer.up", "lora_linear_layer.down")])
def test_other_lora_key_styles_merge(style):
    """PEFT's adapter-named keys, bare lora_B/lora_A tensors and diffusers' LoRACompatibleLinear names merge
    like kohya's lora_up/lora_down."""
    sd = wan_state_dict(diffusers_model(TINY_T2V))
    ref = make_lora(sd, LINEARS[:3], seed=5)
    want = build_dit(TINY_T2V, None, dtype=torch.float32)
    want.load_state_dict(sd)
    merge_lora_(want, ref, 0.7)
    up, down = style
    bare = up == "lora_B"
    other = {}
    for k, v in ref.items():
        k = k.replace(".lora_up.weight", f".{up}" + ("" if bare else ".weight"))
        other[k.replace(".lora_down.weight", f".{down}" + ("" if bare else ".weight"))] = v
    got = build_dit(TINY_T2V, None, dtype=torch.float32)
    got.load_state_dict(sd)
    assert merge_lora_(got, other, 0.7) == 3
    for k, v in want.state_dict().items():
        torch.testing.assert_close(got.state_dict()[k], v, rtol=0, atol=0)


def test_attention_processor_lora_names_merge():
    """diffusers' old attention-processor LoRA names: '<attn>.processor.to_q_lora.up.weight', and
    '.to_out_lora' for the output projection (diffusers' to_out.0), also without '.processor'."""
    sd = wan_state_dict(diffusers_model(TINY_T2V))
    g = torch.Generator().manual_seed(2)
    shape = sd["blocks.0.self_attn.q.weight"].shape
    pairs = {name: (torch.randn(shape[0], 2, generator=g), torch.randn(2, shape[1], generator=g))
             for name in ("attn1.processor.to_q", "attn1.processor.to_out", "attn2.to_k")}
    lora = {}
    for name, (up, down) in pairs.items():
        lora[f"transformer.blocks.0.{name}_lora.up.weight"] = up
        lora[f"transformer.blocks.0.{name}_lora.down.weight"] = down
    model = build_dit(TINY_T2V, None, dtype=torch.float32)
    model.load_state_dict(sd)
    assert merge_lora_(model, lora, 1.0) == 3
    for name, target in (("attn1.processor.to_q", "self_attn.q"), ("attn1.processor.to_out", "self_attn.o"),
                         ("attn2.to_k", "cross_attn.k")):
        up, down = pairs[name]
        torch.testing.assert_close(model.get_submodule(f"blocks.0.{target}").weight,
                                   sd[f"blocks.0.{target}.weight"] + up @ down)


def test_unmatched_keys_error_says_how_to_skip_them():
    sd = wan_state_dict(diffusers_model(TINY_T2V))
    model = build_dit(TINY_T2V, None, dtype=torch.float32)
    model.load_state_dict(sd)
    text_encoder = {"text_encoder.x.lora_up.weight": torch.zeros(2, 2), "text_encoder.x.lora_down.weight": torch.zeros(2, 2)}
    with pytest.raises(LoraKeyError, match='"lora_strict": false'):
        merge_lora_(model, {**make_lora(sd, ["blocks.0.ffn.0"]), **text_encoder}, 1.0)
    # a LoRA of which nothing matches changes nothing: an error even when lenient
    for strict in (True, False):
        with pytest.raises(LoraKeyError, match=r"x.safetensors: none of its 2 LoRA keys matches a weight of the model"):
            merge_lora_(model, text_encoder, 1.0, source="x.safetensors", strict=strict)


def _merged(model, sd, lora, **kw):
    """{name: tensor that changed} after merging `lora` into a fresh copy of sd."""
    model.load_state_dict(sd)
    merge_lora_(model, lora, **kw)
    return {k: v for k, v in model.state_dict().items() if not torch.equal(v, sd[k])}


def test_alpha_zero_reads_as_unset():
    """alpha 0 means "not set" (LightX2V's `if alpha:`, kohya): scale 1, not a LoRA that does nothing."""
    sd = wan_state_dict(diffusers_model(TINY_T2V))
    model = build_dit(TINY_T2V, None, dtype=torch.float32)
    lora = make_lora(sd, ["blocks.0.ffn.0"], alpha=0.0)
    changed = _merged(model, sd, lora)
    up, down = lora["diffusion_model.blocks.0.ffn.0.lora_up.weight"], lora["diffusion_model.blocks.0.ffn.0.lora_down.weight"]
    torch.testing.assert_close(changed["blocks.0.ffn.0.weight"], sd["blocks.0.ffn.0.weight"] + up @ down)


def test_kohya_musubi_names_merge_like_wan_names():
    """musubi-tuner / kohya files name modules lora_unet_<dotted name with underscores>: the same merge as the
    Wan-named LoRA (self_attn, cross_attn's k_img, ffn and the embeddings, whose names hold underscores)."""
    sd = wan_state_dict(diffusers_model(TINY_I2V))
    model = build_dit(TINY_I2V, None, dtype=torch.float32)
    targets = ["blocks.0.self_attn.q", "blocks.1.cross_attn.k_img", "blocks.0.ffn.2", "time_projection.1",
               "img_emb.proj.1"]
    wan = make_lora(sd, targets, seed=3)
    kohya = {k.replace("diffusion_model.", "").replace(t, "lora_unet_" + t.replace(".", "_")): v
             for k, v in wan.items() for t in targets if k.startswith("diffusion_model." + t + ".")}
    assert len(kohya) == len(wan) and all(k.startswith("lora_unet_") for k in kohya)
    want = _merged(model, sd, wan)
    got = _merged(model, sd, kohya)
    assert sorted(got) == sorted(want) == sorted(t + ".weight" for t in targets)
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_diff_forms_of_converted_files():
    """The diff spellings of converted LoRA files: PEFT's lora_B.bias (diffusers' conversion of .diff_b, scaled
    by the pair's alpha / rank as PEFT applies it), a .diff on a parameter named in full (ComfyUI's
    'modulation.diff', diffusers' 'scale_shift_table.diff')."""
    sd = wan_state_dict(diffusers_model(TINY_T2V))
    model = build_dit(TINY_T2V, None, dtype=torch.float32)
    g = torch.Generator().manual_seed(4)
    db = torch.randn(64, generator=g)
    mod = torch.randn(1, 6, 64, generator=g)
    head = torch.randn(1, 2, 64, generator=g)
    peft = {"transformer.blocks.0.attn1.to_q.lora_A.weight": torch.randn(RANK, 64, generator=g),
            "transformer.blocks.0.attn1.to_q.lora_B.weight": torch.randn(64, RANK, generator=g),
            "transformer.blocks.0.attn1.to_q.lora_B.bias": db,
            "transformer.blocks.0.attn1.to_q.alpha": torch.tensor(2.0)}
    changed = _merged(model, sd, {**peft, "diffusion_model.blocks.1.modulation.diff": mod,
                                  "diffusion_model.head.modulation.diff": head}, strength=0.5)
    torch.testing.assert_close(changed["blocks.0.self_attn.q.bias"], sd["blocks.0.self_attn.q.bias"] + 0.5 * 0.5 * db)
    torch.testing.assert_close(changed["blocks.1.modulation"], sd["blocks.1.modulation"] + 0.5 * mod)
    torch.testing.assert_close(changed["head.modulation"], sd["head.modulation"] + 0.5 * head)
    changed = _merged(model, sd, {"transformer.blocks.1.scale_shift_table.diff": mod[0],  # [6, 64]: leading 1 dropped
                                  "transformer.blocks.0.attn1.to_q.lora_B.bias": db})  # no pair: scale 1
    torch.testing.assert_close(changed["blocks.1.modulation"], sd["blocks.1.modulation"] + mod)
    torch.testing.assert_close(changed["blocks.0.self_attn.q.bias"], sd["blocks.0.self_attn.q.bias"] + db)


def test_transposed_diff_and_lone_up_matrix_are_named():
    sd = wan_state_dict(diffusers_model(TINY_T2V))
    model = build_dit(TINY_T2V, None, dtype=torch.float32)
    model.load_state_dict(sd)
    w = sd["blocks.0.ffn.0.weight"]  # [96, 64]
    with pytest.raises(LoraKeyError, match=r"blocks.0.ffn.0.diff: diff of shape \(64, 96\) for 'blocks.0.ffn.0.weight' of shape \(96, 64\)"):
        merge_lora_(model, {"blocks.0.ffn.0.diff": torch.zeros(w.shape[1], w.shape[0])})
    lone = {**make_lora(sd, ["blocks.0.ffn.2"]), "blocks.1.ffn.2.lora_up.weight": torch.zeros(64, RANK)}
    with pytest.raises(LoraKeyError, match=r"blocks.1.ffn.2.lora_down.weight \(missing\)"):
        merge_lora_(model, lone)
    with pytest.warns(UserWarning, match=r"blocks.1.ffn.2.lora_up.weight"):  # lenient: skipped, the rest merges
        assert merge_lora_(model, lone, strict=False) == 1


def test_malformed_alpha_and_colliding_keys_are_named():
    """An alpha that is not one number, and two keys equal once their prefixes are stripped, are errors
    naming the file and the keys (not a bare torch error at merge time)."""
    from lightx2v_engine.config import get_preset
    from lightx2v_engine.loading import build_dit
    from lightx2v_engine.lora import LoraKeyError, merge_lora_
    dit = build_dit(get_preset("tiny"), None, dtype=torch.float32)
    pair = {"diffusion_model.blocks.0.ffn.0.lora_up.weight": torch.zeros(512, 4),
            "diffusion_model.blocks.0.ffn.0.lora_down.weight": torch.zeros(4, 256)}
    with pytest.raises(LoraKeyError, match=r"my_lora\.safetensors: blocks\.0\.ffn\.0\.alpha must hold one number.*"
                                           r"shape \(2,\)"):
        merge_lora_(dit, {**pair, "diffusion_model.blocks.0.ffn.0.alpha": torch.tensor([4.0, 4.0])},
                    source="my_lora.safetensors")
    clash = {**pair, "model.blocks.0.ffn.0.lora_down.weight": torch.zeros(4, 256)}
    with pytest.raises(LoraKeyError, match=r"my_lora\.safetensors: 1 key\(s\) collide.*"
                                           r"'diffusion_model\.blocks\.0\.ffn\.0\.lora_down\.weight' and "
                                           r"'model\.blocks\.0\.ffn\.0\.lora_down\.weight'"):
        merge_lora_(dit, clash, source="my_lora.safetensors")



def test_a_stray_alpha_is_ignored_and_one_weight_under_two_layouts_is_an_error():
    """An alpha without its pair is ignored (LightX2V drops every .alpha key from its unused-key check: pruned
    or converted files keep them); the same weight reached by two key layouts (Wan's ffn.0 and diffusers'
    ffn.net.0.proj) was merged twice."""
    from lightx2v_engine.config import get_preset
    dit = build_dit(get_preset("tiny"), None, dtype=torch.float32)
    before = dit.blocks[0].ffn[0].weight.clone()
    g = torch.Generator().manual_seed(0)
    pair = {"diffusion_model.blocks.0.ffn.0.lora_up.weight": torch.randn(512, 4, generator=g),
            "diffusion_model.blocks.0.ffn.0.lora_down.weight": torch.randn(4, 256, generator=g)}
    assert merge_lora_(dit, {**pair, "diffusion_model.blocks.0.norm3.alpha": torch.tensor(4.0)}) == 1
    torch.testing.assert_close(dit.blocks[0].ffn[0].weight, before + pair[next(iter(pair))] @ list(pair.values())[1])
    twice = {**pair, "transformer.blocks.0.ffn.net.0.proj.lora_up.weight": torch.randn(512, 4, generator=g),
             "transformer.blocks.0.ffn.net.0.proj.lora_down.weight": torch.randn(4, 256, generator=g)}
    snapshot = dit.blocks[0].ffn[0].weight.clone()
    with pytest.raises(LoraKeyError, match=r"both update 'blocks\.0\.ffn\.0\.weight'.*merged twice"):
        merge_lora_(dit, twice, source="two_layouts.safetensors")
    assert torch.equal(dit.blocks[0].ffn[0].weight, snapshot)


@pytest.mark.parametrize("peft_kw", [{}, {"use_rslora": True}, {"alpha_pattern": {"to_q": 2}, "rank_pattern": {"to_q": 2}}],
                         ids=["alpha", "rslora", "patterns"])
def test_diffusers_saved_lora_keeps_its_alpha(tmp_path, peft_kw):
    """A LoRA saved by diffusers' save_lora_weights keeps lora_alpha / r in the safetensors header (no
    .alpha keys): it merged at scale 1 (~75% of the LoRA's effect lost at alpha 16, r 4). Reference: the
    trained diffusers model itself, and diffusers reloading the file."""
    pytest.importorskip("peft", reason="peft is a test extra")
    from diffusers import WanPipeline
    from peft import LoraConfig, get_peft_model_state_dict
    from lightx2v_engine.lora import read_lora
    train = diffusers_model(TINY_T2V)
    sd = wan_state_dict(train)
    cfg = LoraConfig(r=4, lora_alpha=16, target_modules=["to_q", "to_k", "to_v", "to_out.0"], **peft_kw)
    train.add_adapter(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in train.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    WanPipeline.save_lora_weights(tmp_path, transformer_lora_layers=get_peft_model_state_dict(train),
                                  transformer_lora_adapter_metadata=cfg.to_dict())
    f = tmp_path / "pytorch_lora_weights.safetensors"
    x, t, ctx, clip, y = inputs(TINY_T2V)
    want = diffusers_forward(train, x, t, ctx, clip, y)
    ours = build_dit(TINY_T2V, None, dtype=torch.float32)
    ours.load_state_dict(sd)
    assert merge_lora_(ours, read_lora(f), 1.0, source=str(f)) == 16  # 4 linears x 2 attentions x 2 blocks
    base = build_dit(TINY_T2V, None, dtype=torch.float32)
    base.load_state_dict(sd)
    with torch.no_grad():
        a, c = ours(x, t, ctx), base(x, t, ctx)
    assert rel_l2(c, want) > 1e-2  # the LoRA matters
    assert rel_l2(a, want) <= 1e-4


def test_peft_adapter_config_beside_the_file_and_dora(tmp_path):
    """PEFT's save_pretrained layout (adapter_model.safetensors + adapter_config.json) scales by its config;
    a DoRA adapter is refused by name (its magnitude vectors would be silently wrong)."""
    import json
    from lightx2v_engine.lora import read_lora
    sd = wan_state_dict(diffusers_model(TINY_T2V))
    lora = make_lora(sd, ["blocks.0.ffn.0"], alpha=None, prefix="base_model.model.", style=("lora_B", "lora_A"))
    save_file(lora, str(tmp_path / "adapter_model.safetensors"))
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": RANK, "lora_alpha": 2 * RANK}))
    model = build_dit(TINY_T2V, None, dtype=torch.float32)
    model.load_state_dict(sd)
    merge_lora_(model, read_lora(tmp_path / "adapter_model.safetensors"))
    up, down = lora["base_model.model.blocks.0.ffn.0.lora_B.weight"], lora["base_model.model.blocks.0.ffn.0.lora_A.weight"]
    want = sd["blocks.0.ffn.0.weight"].double() + 2.0 * up.double() @ down.double()  # lora_alpha / r = 2
    torch.testing.assert_close(model.state_dict()["blocks.0.ffn.0.weight"].double(), want)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": RANK, "lora_alpha": RANK, "use_dora": True}))
    with pytest.raises(LoraKeyError, match="adapter_model.safetensors: a DoRA adapter"):
        read_lora(tmp_path / "adapter_model.safetensors")


def test_conv_pair_on_patch_embedding_merges():
    """kohya's pair on the Conv3d patch_embedding (up [out, r, 1, 1, 1], down [r, in, 1, 2, 2]) merges as
    up.flatten(1) @ down.flatten(1) reshaped to the kernel (it was a shape error even when lenient)."""
    sd = wan_state_dict(diffusers_model(TINY_T2V))
    w = sd["patch_embedding.weight"]
    g = torch.Generator().manual_seed(1)
    up = torch.randn(w.shape[0], RANK, 1, 1, 1, generator=g)
    down = torch.randn(RANK, *w.shape[1:], generator=g)
    model = build_dit(TINY_T2V, None, dtype=torch.float32)
    model.load_state_dict(sd)
    merge_lora_(model, {"patch_embedding.lora_up.weight": up, "patch_embedding.lora_down.weight": down,
                        "patch_embedding.alpha": torch.tensor(2.0)}, strength=0.5)
    want = w.double() + 0.5 * (2.0 / RANK) * torch.einsum("or,rithw->oithw", up[..., 0, 0, 0].double(), down.double())
    torch.testing.assert_close(model.state_dict()["patch_embedding.weight"].double(), want)


def test_bad_tensors_skip_when_lenient_and_are_all_named_when_strict(tmp_path):
    """lora_strict false skips tensors that cannot apply (a shape mismatch, rank 0) with a warning and merges
    the rest, as LightX2V does; strict names every one with its LoRA key. A LoRA of which nothing applies is
    an error either way (with a model-size hint); an empty file too; rank 0 was a bare ZeroDivisionError."""
    from lightx2v_engine.checkpoint import CheckpointError
    from lightx2v_engine.lora import read_lora
    sd = wan_state_dict(diffusers_model(TINY_T2V))
    good = make_lora(sd, ["blocks.0.ffn.0"])
    bad = {"blocks.1.ffn.0.lora_up.weight": torch.zeros(64, RANK), "blocks.1.ffn.0.lora_down.weight": torch.zeros(RANK, 64),
           "blocks.0.ffn.2.lora_up.weight": torch.zeros(64, 0), "blocks.0.ffn.2.lora_down.weight": torch.zeros(0, 96)}
    model = build_dit(TINY_T2V, None, dtype=torch.float32)
    model.load_state_dict(sd)
    with pytest.raises(LoraKeyError, match=r"2 LoRA tensor\(s\) cannot apply.*blocks.0.ffn.2.lora_up.weight: .*\(rank 0\)"
                                           r".*blocks.1.ffn.0.lora_up.weight: up \(64, 4\)"):
        merge_lora_(model, {**good, **bad})
    assert torch.equal(model.state_dict()["blocks.0.ffn.0.weight"], sd["blocks.0.ffn.0.weight"])
    with pytest.warns(UserWarning, match="cannot apply.* - skipped"):
        assert merge_lora_(model, {**good, **bad}, strict=False) == 1
    want = expected_after(sd, [(good, 1.0)])["blocks.0.ffn.0.weight"]
    torch.testing.assert_close(model.state_dict()["blocks.0.ffn.0.weight"].double(), want)
    big = {"blocks.0.ffn.0.lora_up.weight": torch.zeros(192, RANK), "blocks.0.ffn.0.lora_down.weight": torch.zeros(RANK, 128),
           "blocks.0.ffn.2.lora_up.weight": torch.zeros(128, RANK), "blocks.0.ffn.2.lora_down.weight": torch.zeros(RANK, 192)}
    with pytest.raises(LoraKeyError, match=r"none applies: a LoRA for another model .*\[128, 192\]; this model's dim is 64"):
        merge_lora_(model, big, strict=False)
    save_file({}, str(tmp_path / "empty.safetensors"))
    with pytest.raises(CheckpointError, match="empty.safetensors: the LoRA file holds no tensors"):
        read_lora(tmp_path / "empty.safetensors")


def test_wan_fun_names_torch_alphas_and_dora_scales(tmp_path):
    """Wan-Fun's kohya names ("lora_unet__blocks_0_...", two underscores) matched nothing; a torch LoRA's
    alpha saved as a Python number was dropped (scale 1 instead of alpha / rank); a kohya DoRA's
    '.dora_scale' keys only warned under lora_strict false, and the pairs merged as a plain LoRA."""
    from lightx2v_engine.lora import read_lora
    sd = wan_state_dict(diffusers_model(TINY_T2V))
    model = build_dit(TINY_T2V, None, dtype=torch.float32)
    wan = make_lora(sd, ["blocks.0.cross_attn.k"], seed=5)
    fun = {k.replace("diffusion_model.blocks.0.cross_attn.k", "lora_unet__blocks_0_cross_attn_k"): v
           for k, v in wan.items()}
    assert _merged(model, sd, fun).keys() == _merged(model, sd, wan).keys() == {"blocks.0.cross_attn.k.weight"}
    assert torch.equal(_merged(model, sd, fun)["blocks.0.cross_attn.k.weight"],
                       _merged(model, sd, wan)["blocks.0.cross_attn.k.weight"])
    torch.save({k: (v.item() if k.endswith(".alpha") else v) for k, v in wan.items()}, tmp_path / "l.pt")
    read = read_lora(tmp_path / "l.pt")
    assert read["diffusion_model.blocks.0.cross_attn.k.alpha"].item() == 8.0
    assert torch.equal(_merged(model, sd, read)["blocks.0.cross_attn.k.weight"],
                       _merged(model, sd, wan)["blocks.0.cross_attn.k.weight"])
    dora = {**wan, "diffusion_model.blocks.0.cross_attn.k.dora_scale": torch.ones(1, sd["blocks.0.cross_attn.k.weight"].shape[1])}
    model.load_state_dict(sd)
    for strict in (True, False):
        with pytest.raises(LoraKeyError, match=r"a DoRA adapter \(1 '\.dora_scale' keys"):
            merge_lora_(model, dora, strict=strict)
