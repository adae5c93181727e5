"""LightX2V quantized DiT checkpoints (dit_quantized / dit_quantized_ckpt / dit_quant_scheme)."""
import pytest
import torch
from safetensors.torch import save_file

from lightx2v_engine.checkpoint import CheckpointError
from lightx2v_engine.loading import build_dit, load_quantized_dit
from lightx2v_engine.quant import QuantLinear, quantize_dit_

from dit_fixtures import TINY_I2V, TINY_T2V, diffusers_model, inputs, rel_l2, wan_state_dict


pytestmark = pytest.mark.usefixtures("torch_ops")  # the plain-PyTorch reference ops (conftest)


@pytest.mark.parametrize("cfg", [TINY_T2V, TINY_I2V], ids=["t2v", "i2v"])
@pytest.mark.parametrize("scheme", ["fp8-sgl", "int8-vllm"])
def test_quantized_checkpoint_round_trip(cfg, scheme, tmp_path):
    sd = wan_state_dict(diffusers_model(cfg))
    ref = build_dit(cfg, None, dtype=torch.float32)
    ref.load_state_dict(sd)
    quantize_dit_(ref, scheme)
    qsd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    # LightX2V may write the scales in bf16 (its loader forces fp32): here one [out] scale in bf16
    odd = "blocks.1.ffn.2.weight_scale"
    qsd[odd] = qsd[odd].reshape(-1).to(torch.bfloat16)
    ref.blocks[1].ffn[2].weight_scale.copy_(qsd[odd].float().reshape(-1, 1))
    save_file({"model." + k: v for k, v in qsd.items()}, str(tmp_path / "q.safetensors"))
    model = load_quantized_dit(cfg, tmp_path, "q.safetensors", scheme, dtype="fp32")
    n_quant = sum(isinstance(m, QuantLinear) for m in model.modules())
    assert n_quant == cfg.num_layers * (4 + 4 + 2 + (2 if cfg.is_i2v else 0))
    assert model.blocks[0].ffn[0].weight.dtype in (torch.float8_e4m3fn, torch.int8)
    assert model.blocks[0].ffn[0].weight_scale.dtype == torch.float32
    x, t, ctx, clip, y = inputs(cfg, text_len=512 if cfg.is_i2v else 16)
    full = build_dit(cfg, None, dtype=torch.float32)
    full.load_state_dict(sd)
    with torch.no_grad():
        a, b, c = model(x, t, ctx, clip, y), ref(x, t, ctx, clip, y), full(x, t, ctx, clip, y)
    assert rel_l2(a, b) < 1e-6  # the same quantized weights
    assert rel_l2(a, c) < 0.1   # close to the unquantized model
    # loaded to run in bf16: the 8-bit linears' biases (and LoRA branches) in bf16 too, not the fp32 of the
    # meta skeleton (twice the memory, and a cast per forward)
    bf = load_quantized_dit(cfg, tmp_path, "q.safetensors", scheme, dtype="bf16")
    lin = bf.blocks[0].self_attn.q
    assert lin.bias.dtype == torch.bfloat16 and lin.run_dtype == torch.bfloat16
    lin.add_lora(torch.randn(lin.out_features, 2), torch.randn(2, lin.in_features), 1.0)
    assert lin.lora_up.dtype == lin.lora_down.dtype == torch.bfloat16


def test_quantized_checkpoint_errors(tmp_path):
    sd = wan_state_dict(diffusers_model(TINY_T2V))
    save_file(sd, str(tmp_path / "bf16.safetensors"))
    with pytest.raises(CheckpointError, match=r"bf16.safetensors: not a quantized checkpoint"):
        load_quantized_dit(TINY_T2V, None, str(tmp_path / "bf16.safetensors"), "fp8-sgl")
    ref = build_dit(TINY_T2V, None, dtype=torch.float32)
    ref.load_state_dict(sd)
    quantize_dit_(ref, "int8")
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "int8.safetensors"))
    with pytest.raises(CheckpointError, match=r"blocks\.0\.\w+\.\w+\.weight.*torch.int8, the fp8-sgl scheme needs"):
        load_quantized_dit(TINY_T2V, None, str(tmp_path / "int8.safetensors"), "fp8-sgl")
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_quantized_dit(TINY_T2V, tmp_path, "nope.safetensors", "fp8-sgl")
    with pytest.raises(ValueError, match="nvfp4"):
        load_quantized_dit(TINY_T2V, tmp_path, "bf16.safetensors", "nvfp4")


def _quantized_file(cfg, sd, scheme, path):
    ref = build_dit(cfg, None, dtype=torch.float32)
    ref.load_state_dict(sd)
    quantize_dit_(ref, scheme)
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))


def test_comfyui_scaled_fp8_file_is_named_as_such(tmp_path):
    """LightX2V's converter --comfyui_mode writes per-tensor '*.scale_weight' and a 'scaled_fp8' marker; the
    file sits beside the LightX2V-format one. As dit_quantized_ckpt it was 'not a quantized checkpoint', and
    the advice (dit_original_ckpt) then failed on unexpected keys: both now say what the file is."""
    from lightx2v_engine.loading import load_dit
    sd = wan_state_dict(diffusers_model(TINY_T2V))
    comfy = {}
    for k, v in sd.items():
        if k.startswith("blocks.") and k.endswith(".weight") and v.dim() == 2 and ".norm" not in k:
            scale = v.float().abs().amax().clamp(min=1e-8) / 448
            comfy[k] = (v.float() / scale).to(torch.float8_e4m3fn)
            comfy[k.replace(".weight", ".scale_weight")] = scale.reshape(1)
        else:
            comfy[k] = v
    comfy["scaled_fp8"] = torch.zeros(2, dtype=torch.float8_e4m3fn)
    save_file(comfy, str(tmp_path / "wan_comfyui_fp8.safetensors"))
    with pytest.raises(CheckpointError, match=r"wan_comfyui_fp8\.safetensors: a ComfyUI scaled-fp8 checkpoint"):
        load_quantized_dit(TINY_T2V, None, str(tmp_path / "wan_comfyui_fp8.safetensors"), "fp8-sgl")
    with pytest.raises(CheckpointError, match=r"ComfyUI scaled-fp8 .*scaled_fp8_e4m3_lightx2v"):
        load_dit(TINY_T2V, None, dit_original_ckpt=str(tmp_path / "wan_comfyui_fp8.safetensors"))


def test_folder_with_a_bf16_and_a_quantized_dit_names_both(tmp_path):
    """LightX2V's model repositories hold the bf16 and the scaled-fp8 DiT side by side: without dit_quantized
    the folder's files all load; the error names which is which (it said to load both as quantized)."""
    from lightx2v_engine.loading import load_dit
    sd = wan_state_dict(diffusers_model(TINY_T2V))
    save_file(sd, str(tmp_path / "wan_4step.safetensors"))
    _quantized_file(TINY_T2V, sd, "fp8", tmp_path / "wan_scaled_fp8_e4m3_lightx2v_4step.safetensors")
    with pytest.raises(CheckpointError, match=r"two DiT checkpoints in one place: quantized \S*scaled_fp8\S* \("
                                              r"float8_e4m3fn weights.* and unquantized \S*wan_4step\.safetensors"):
        load_dit(TINY_T2V, tmp_path, distill=False)


def test_quantized_checkpoint_split_per_block_is_one_checkpoint(tmp_path):
    """LightX2V's converter may split a quantized DiT into block files and a non_block file (no scales):
    loaded as unquantized, that is one quantized checkpoint (what to set), not 'two DiT checkpoints'."""
    from lightx2v_engine.loading import load_dit
    sd = wan_state_dict(diffusers_model(TINY_T2V))
    _quantized_file(TINY_T2V, sd, "fp8", tmp_path / "all.safetensors")
    from safetensors.torch import load_file
    q = load_file(str(tmp_path / "all.safetensors"))
    (tmp_path / "all.safetensors").unlink()
    save_file({k: v for k, v in q.items() if k.startswith("blocks.")}, str(tmp_path / "block_0.safetensors"))
    save_file({k: v for k, v in q.items() if not k.startswith("blocks.")}, str(tmp_path / "non_block.safetensors"))
    with pytest.raises(CheckpointError, match=r"a quantized checkpoint \(float8_e4m3fn weights") as e:
        load_dit(TINY_T2V, tmp_path, distill=False)
    assert "two DiT checkpoints" not in str(e.value)


def test_quantized_checkpoint_given_as_original_names_the_keys_to_set(tmp_path):
    """LightX2V's own I2V config points dit_original_ckpt at an int8 file: the error says what to set."""
    from lightx2v_engine.loading import load_dit
    sd = wan_state_dict(diffusers_model(TINY_T2V))
    _quantized_file(TINY_T2V, sd, "int8", tmp_path / "int8.safetensors")
    with pytest.raises(CheckpointError, match=r'int8 weights .*set "dit_quantized": true, "dit_quantized_ckpt".*int8-sgl'):
        load_dit(TINY_T2V, tmp_path, dit_original_ckpt=str(tmp_path / "int8.safetensors"), dtype="fp32")
    # an fp8 file (also as .pth) is named as fp8: told from the headers, before any tensor is cast
    _quantized_file(TINY_T2V, sd, "fp8", tmp_path / "fp8.safetensors")
    from safetensors.torch import load_file
    torch.save(load_file(str(tmp_path / "fp8.safetensors")), tmp_path / "fp8.pth")
    for name in ("fp8.safetensors", "fp8.pth"):
        with pytest.raises(CheckpointError, match=rf'{name}: a quantized checkpoint \(float8_e4m3fn weights .*"fp8-sgl"'):
            load_dit(TINY_T2V, tmp_path, dit_original_ckpt=str(tmp_path / name), dtype="bf16")


def test_fp8_weights_without_their_scales(tmp_path):
    """fp8 weights whose every row (all-zero ones aside) reaches 448 are per-row scaled: without their
    weight_scale keys they are refused (naming file, key and the missing scale key), not loaded 100x too
    large; a plain fp8 cast of real weights (no row saturates) loads as its values; .safetensors and .pth."""
    from safetensors.torch import load_file
    from lightx2v_engine.loading import load_dit
    sd = wan_state_dict(diffusers_model(TINY_T2V))
    _quantized_file(TINY_T2V, sd, "fp8", tmp_path / "q.safetensors")
    scaled = {k: v for k, v in load_file(str(tmp_path / "q.safetensors")).items() if not k.endswith("_scale")}
    for v in scaled.values():  # (an all-zero row quantizes to zeros whatever its scale)
        if v.dtype == torch.float8_e4m3fn:
            v[1] = 0
    save_file({"model." + k: v for k, v in scaled.items()}, str(tmp_path / "noscale.safetensors"))
    torch.save(scaled, tmp_path / "noscale.pth")
    for name in ("noscale.safetensors", "noscale.pth"):
        with pytest.raises(CheckpointError, match=rf"{name}: tensor '(blocks\.\d+\.\w+\.\w+\.weight)' is "
                                                  r"float8_e4m3fn with every non-zero row's \|max\| at 448.*"
                                                  r"\(no '\1_scale'\).*\"fp8-sgl\""):
            load_dit(TINY_T2V, None, dit_original_ckpt=str(tmp_path / name), dtype="bf16")
    plain = {k: v.to(torch.float8_e4m3fn) if v.dim() == 2 else v for k, v in sd.items()}
    save_file(plain, str(tmp_path / "plain.safetensors"))
    torch.save(plain, tmp_path / "plain.pth")
    for name in ("plain.safetensors", "plain.pth"):
        model = load_dit(TINY_T2V, None, dit_original_ckpt=str(tmp_path / name), dtype="fp32")
        got = model.state_dict()
        assert all(torch.equal(got[k], plain[k].float()) for k in plain)


@pytest.mark.parametrize("scheme", ["fp8-sgl", "int8-vllm"])
def test_lora_on_a_quantized_dit_runs_beside_the_8bit_linears(scheme, tmp_path):
    """lora_configs with dit_quantized: the low-rank pairs of the 8-bit linears become branches (LightX2V's
    lora_dynamic_apply), the rest merges. The result moves to the bf16-merged model: its distance there is
    the quantization's, not the LoRA's; a strength-0 LoRA changes nothing; a full-weight diff on an 8-bit
    weight is refused before anything changes."""
    from safetensors.torch import save_file as save
    from lightx2v_engine.config import LoraSpec
    from lightx2v_engine.lora import LoraKeyError, merge_lora_
    cfg = TINY_T2V
    sd = wan_state_dict(diffusers_model(cfg))
    _quantized_file(cfg, sd, scheme, tmp_path / "q.safetensors")
    g = torch.Generator().manual_seed(3)
    # q (self-attention's shared-input path), cross o, ffn.0, ffn.2 (GELU fused into its quantization),
    # and a non-quantized linear (head): merged
    targets = ["blocks.0.self_attn.q", "blocks.1.self_attn.v", "blocks.1.cross_attn.o", "blocks.0.ffn.0",
               "blocks.1.ffn.2", "head.head"]
    lora = {}
    for t in targets:
        out_f, in_f = sd[t + ".weight"].shape
        lora[f"diffusion_model.{t}.lora_B.weight"] = torch.randn(out_f, 4, generator=g) * 0.3
        lora[f"diffusion_model.{t}.lora_A.weight"] = torch.randn(4, in_f, generator=g) * 0.3
        lora[f"diffusion_model.{t}.alpha"] = torch.tensor(2.0)
    save(lora, str(tmp_path / "l.safetensors"))
    x, t, ctx, clip, y = inputs(cfg, text_len=16)

    plain = load_quantized_dit(cfg, tmp_path, "q.safetensors", scheme, dtype="fp32")
    with_lora = load_quantized_dit(cfg, tmp_path, "q.safetensors", scheme, dtype="fp32",
                                   lora_specs=[LoraSpec(str(tmp_path / "l.safetensors"), 0.8)])
    zero = load_quantized_dit(cfg, tmp_path, "q.safetensors", scheme, dtype="fp32",
                              lora_specs=[LoraSpec("l.safetensors", 0.0)])  # found in the model folder
    assert with_lora.blocks[1].ffn[2].lora_down.shape == (4, cfg.ffn_dim)
    assert "lora_down" not in with_lora.state_dict() and "blocks.0.ffn.0.lora_up" not in with_lora.state_dict()
    merged = build_dit(cfg, None, dtype=torch.float32)
    merged.load_state_dict(sd)
    merge_lora_(merged, lora, 0.8)
    unmerged = build_dit(cfg, None, dtype=torch.float32)
    unmerged.load_state_dict(sd)
    with torch.no_grad():
        a, b0, z = with_lora(x, t, ctx), plain(x, t, ctx), zero(x, t, ctx)
        m, u = merged(x, t, ctx), unmerged(x, t, ctx)
    quant_err = rel_l2(b0, u)  # what 8-bit weights and activations cost without a LoRA
    assert rel_l2(m, u) > 20 * quant_err  # the LoRA matters
    assert rel_l2(a, m) < 2 * quant_err  # and is applied
    torch.testing.assert_close(z, b0, rtol=0, atol=0)
    # a full-weight diff on an 8-bit weight: refused, nothing changed (the head's pair would have merged)
    before = {k: v.clone() for k, v in with_lora.state_dict().items()}
    bad = dict(lora)
    bad["diffusion_model.blocks.0.ffn.0.diff"] = torch.zeros_like(sd["blocks.0.ffn.0.weight"])
    with pytest.raises(LoraKeyError, match=r"full-weight diff for 'blocks\.0\.ffn\.0\.weight', an 8-bit weight"):
        merge_lora_(with_lora, bad, 1.0)
    after = with_lora.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert with_lora.blocks[1].ffn[2].lora_down.shape[0] == 4


def test_quant_linear_lora_branch_formula():
    """QuantLinear.add_lora: y = the 8-bit linear + sum_i s_i (x down_i^T) up_i^T, also through
    quant_linears_same_input and input_gelu; stacked LoRAs concatenate along the rank."""
    import torch.nn as nn
    import torch.nn.functional as F
    from lightx2v_engine.quant import quant_linears_same_input
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(64, 48)
    q = QuantLinear.from_linear(lin, "fp8")
    x = torch.randn(2, 5, 64, generator=g)
    base = q(x).double()
    ups = [torch.randn(48, r, generator=g) for r in (4, 2)]
    downs = [torch.randn(r, 64, generator=g) for r in (4, 2)]
    for u, d, s in zip(ups, downs, (0.5, -1.5)):
        q.add_lora(u, d, s)
    want = base + sum(s * (x.double() @ d.double().t()) @ u.double().t() for u, d, s in zip(ups, downs, (0.5, -1.5)))
    torch.testing.assert_close(q(x).double(), want, rtol=1e-5, atol=1e-4)
    (got,) = quant_linears_same_input(x, [q])
    torch.testing.assert_close(got, q(x), rtol=0, atol=0)
    xg = F.gelu(x, approximate="tanh")
    torch.testing.assert_close(q(x, input_gelu=True), q(xg), rtol=1e-6, atol=1e-5)
    with pytest.raises(ValueError, match=r"up \(48, 3\) @ down \(4, 64\)"):
        q.add_lora(torch.zeros(48, 3), torch.zeros(4, 64), 1.0)
    # without a bias the branch keeps the run dtype (fp32 here), not bf16
    nb = QuantLinear.from_linear(nn.Linear(64, 48, bias=False), "fp8")
    nb.add_lora(ups[0], downs[0], 0.5)
    assert nb.lora_up.dtype == torch.float32 and nb.lora_down.dtype == torch.float32


def test_cli_quantized_dit_with_lora(tmp_path, capsys):
    """Through the CLI: dit_quantized + lora_configs applies the LoRA (the latents change), and a LoRA file
    that does not exist is an error naming it (it was silently skipped)."""
    import json
    from safetensors.torch import load_file
    from lightx2v_engine.infer import main
    from lightx2v_engine.tiny import make_tiny_model_folder
    from lightx2v_engine.video import load_latents
    from lightx2v_engine.config import model_config_from_json
    folder = make_tiny_model_folder(tmp_path / "m", "t2v")
    cfg = model_config_from_json(folder / "config.json")
    sd = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    _quantized_file(cfg, {k: v.float() for k, v in sd.items()}, "fp8", folder / "q8.safetensors")
    g = torch.Generator().manual_seed(0)
    lora = {}
    for name in ("blocks.0.self_attn.o", "blocks.1.ffn.2"):
        out_f, in_f = sd[name + ".weight"].shape
        lora[f"diffusion_model.{name}.lora_up.weight"] = torch.randn(out_f, 4, generator=g)
        lora[f"diffusion_model.{name}.lora_down.weight"] = torch.randn(4, in_f, generator=g)
    save_file(lora, str(folder / "style.safetensors"))

    def run(loras, name):
        conf = {"infer_steps": 4, "denoising_step_list": [1000, 750, 500, 250], "target_video_length": 5,
                "target_height": 32, "target_width": 48, "dit_quantized": True, "dit_quantized_ckpt": "q8.safetensors",
                "dit_quant_scheme": "fp8-sgl", "lora_configs": loras}
        (tmp_path / f"{name}.json").write_text(json.dumps(conf))
        return main(["--model_cls", "wan2.1_distill", "--task", "t2v", "--model_path", str(folder), "--config_json",
                     str(tmp_path / f"{name}.json"), "--prompt", "a cat", "--seed", "1", "--save_result_path",
                     str(tmp_path / f"{name}.mp4"), "--save_latents", str(tmp_path / f"{name}.safetensors"), "--quiet"])

    assert run([], "plain") == 0
    assert run([{"path": "style.safetensors", "strength": 1.0}], "lora") == 0
    a, b = load_latents(tmp_path / "plain.safetensors")[0], load_latents(tmp_path / "lora.safetensors")[0]
    assert (a - b).norm() > 1e-3 * a.norm()
    capsys.readouterr()
    assert run([{"path": "missing.safetensors", "strength": 1.0}], "missing") == 2
    assert "missing.safetensors" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.parametrize("scheme", ["fp8", "int8"])
def test_quant_linear_lora_branch_cuda(scheme):
    """The CUDA path (fused activation quantization + 8-bit GEMM, shared-input q/k/v, GELU inside ffn.2's
    quantization) adds the branch: against the 8-bit linear alone plus the branch in fp32."""
    import torch.nn as nn
    import torch.nn.functional as F
    from lightx2v_engine.quant import quant_linears_same_input
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(256, 128).cuda().bfloat16()
    q = QuantLinear.from_linear(lin, scheme)
    x = torch.randn(3, 40, 256, generator=g).cuda().bfloat16()
    base, base_gelu = q(x).float(), q(x, input_gelu=True).float()
    up, down = torch.randn(128, 8, generator=g) * 0.2, torch.randn(8, 256, generator=g) * 0.2
    q.add_lora(up, down, 0.5)
    assert q.lora_down.is_cuda and q.lora_down.dtype == torch.bfloat16

    def branch(t):
        return 0.5 * (t.float() @ down.cuda().t()) @ up.cuda().t()
    tol = dict(rtol=2e-2, atol=5e-2)
    torch.testing.assert_close(q(x).float(), base + branch(x), **tol)
    torch.testing.assert_close(quant_linears_same_input(x, [q, q])[1].float(), base + branch(x), **tol)
    torch.testing.assert_close(q(x, input_gelu=True).float(),
                               base_gelu + branch(F.gelu(x, approximate="tanh")), **tol)


@pytest.mark.parametrize("spelling", ["top_level", "mm_config"])
def test_weight_auto_quant_quantizes_the_bf16_checkpoint_at_load(t2v_folder, spelling):
    """LightX2V's weight_auto_quant (top level, or older configs' mm_config {mm_type, weight_auto_quant}):
    the unquantized checkpoint is read and quantized per output channel at load, the model the converter's
    file would give (older configs' mm_config was ignored: the DiT ran bf16 at twice the memory)."""
    from lightx2v_engine.config import get_preset
    from lightx2v_engine.loading import load_dit
    from lightx2v_engine.pipeline import Pipeline
    size = {"target_video_length": 5, "target_height": 32, "target_width": 48}
    cfg = ({"dit_quantized": True, "dit_quant_scheme": "int8-vllm", "weight_auto_quant": True}
           if spelling == "top_level" else
           {"mm_config": {"mm_type": "W-int8-channel-sym-A-int8-channel-sym-dynamic-Vllm", "weight_auto_quant": True}})
    pipe = Pipeline.load(t2v_folder, {**size, **cfg}, device="cpu")
    lin = pipe.dit.blocks[0].ffn[0]
    assert isinstance(lin, QuantLinear) and lin.weight.dtype == torch.int8
    ref = load_dit(get_preset("tiny"), t2v_folder, dtype="bf16")
    quantize_dit_(ref, "int8-vllm")
    assert torch.equal(lin.weight, ref.blocks[0].ffn[0].weight)
    assert torch.equal(lin.weight_scale, ref.blocks[0].ffn[0].weight_scale)
    plain = Pipeline.load(t2v_folder, size, device="cpu")
    a, b = pipe.generate("a cat", seed=1).latents, plain.generate("a cat", seed=1).latents
    assert 0 < rel_l2(a, b) < 0.1


def _gpu_of(monkeypatch, cap):
    """torch.cuda's capability and name queries as a GPU of compute capability `cap` answers them."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cap)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: f"a sm{cap[0]}{cap[1]} GPU")


def test_fp8_on_a_gpu_before_sm89_is_refused_before_loading(monkeypatch):
    """fp8 linears (torch._scaled_mm, the Triton fp8 GEMM) need sm89+: on an A100 a quantized fp8 DiT or
    encoder failed in its first matrix multiply, after every model had loaded. Now the config key is named
    with the GPU and the int8 alternative; int8, bf16, the CPU and sm89+ pass."""
    from lightx2v_engine.config import parse_run_config
    from lightx2v_engine.quant import check_fp8_device
    cuda = torch.device("cuda", 0)
    fp8_dit = parse_run_config({"dit_quantized": True, "dit_quant_scheme": "fp8-sgl"}, warn=False)
    _gpu_of(monkeypatch, (8, 0))
    with pytest.raises(ValueError, match=r"dit_quant_scheme 'fp8-sgl': fp8 .* 8\.9 .*sm80.*'int8-vllm'"):
        check_fp8_device(fp8_dit, cuda)
    t5 = parse_run_config({"t5_quantized": True, "t5_quant_scheme": "fp8"}, warn=False)
    with pytest.raises(ValueError, match=r"t5_quant_scheme 'fp8'.*t5_quantized false"):
        check_fp8_device(t5, cuda)
    auto = parse_run_config({"dit_quantized": True, "dit_quant_scheme": "fp8-vllm", "weight_auto_quant": True},
                            warn=False)
    with pytest.raises(ValueError, match="dit_quant_scheme"):
        check_fp8_device(auto, cuda)
    for run in (parse_run_config({"dit_quantized": True, "dit_quant_scheme": "int8-vllm",
                                  "clip_quantized": True, "clip_quant_scheme": "int8"}, warn=False),
                parse_run_config({}, warn=False)):
        check_fp8_device(run, cuda)
    check_fp8_device(fp8_dit, torch.device("cpu"))
    for cap in ((8, 9), (9, 0), (12, 0)):
        _gpu_of(monkeypatch, cap)
        check_fp8_device(fp8_dit, cuda)


@pytest.mark.parametrize("how", ["load", "random"])
def test_pipeline_checks_fp8_support_before_reading_weights(how, t2v_folder, monkeypatch):
    """Pipeline.load / Pipeline.random (and through them the CLI, the LightX2V API and the server) run the
    check once the device is known, before any weight file is read or model built."""
    from lightx2v_engine import pipeline as pipeline_mod
    monkeypatch.setattr(pipeline_mod, "_device", lambda device: torch.device("cuda", 0))
    _gpu_of(monkeypatch, (8, 6))

    def no_weights(*a, **k):
        raise AssertionError("a weight file was read or a model built")
    monkeypatch.setattr(pipeline_mod, "load_dit", no_weights)
    monkeypatch.setattr(pipeline_mod, "build_dit", no_weights)
    cfg = {"dit_quantized": True, "dit_quant_scheme": "fp8-sgl", "weight_auto_quant": True}
    with pytest.raises(ValueError, match=r"sm86"):
        if how == "load":
            pipeline_mod.Pipeline.load(t2v_folder, cfg)
        else:
            pipeline_mod.Pipeline.random("tiny", cfg)
