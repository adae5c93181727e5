"""CLIP vision tower against transformers' CLIPVisionModel (random tiny weights, CPU fp32)."""
import dataclasses
import math

import pytest
import torch

from lightx2v_engine.clip import (CLIPConfig, CLIPVisionTower, clip_preprocess, encode_image, load_clip,
                                  random_clip)


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def hf_to_wan(sd: dict, dim: int) -> dict:
    """transformers CLIPVisionModel keys -> Wan/open-clip `visual.*` keys (fused qkv = cat(q, k, v))."""
    sd = {k.removeprefix("vision_model."): v for k, v in sd.items()}
    out = {
        "visual.patch_embedding.weight": sd["embeddings.patch_embedding.weight"],
        "visual.cls_embedding": sd["embeddings.class_embedding"].view(1, 1, dim),
        "visual.pos_embedding": sd["embeddings.position_embedding.weight"].unsqueeze(0),
        "visual.pre_norm.weight": sd["pre_layrnorm.weight"],
        "visual.pre_norm.bias": sd["pre_layrnorm.bias"],
        "visual.post_norm.weight": sd["post_layernorm.weight"],
        "visual.post_norm.bias": sd["post_layernorm.bias"],
    }
    n = 0
    while f"encoder.layers.{n}.layer_norm1.weight" in sd:
        p, q = f"encoder.layers.{n}.", f"visual.transformer.{n}."
        for t in ("weight", "bias"):
            out[q + f"norm1.{t}"] = sd[p + f"layer_norm1.{t}"]
            out[q + f"norm2.{t}"] = sd[p + f"layer_norm2.{t}"]
            out[q + f"attn.to_qkv.{t}"] = torch.cat([sd[p + f"self_attn.{w}_proj.{t}"] for w in "qkv"])
            out[q + f"attn.proj.{t}"] = sd[p + f"self_attn.out_proj.{t}"]
            out[q + f"mlp.0.{t}"] = sd[p + f"mlp.fc1.{t}"]
            out[q + f"mlp.2.{t}"] = sd[p + f"mlp.fc2.{t}"]
        n += 1
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def make_hf(image_size: int, dim: int = 160, heads: int = 2, layers: int = 3, seed: int = 0):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    cfg = CLIPVisionConfig(hidden_size=dim, intermediate_size=4 * dim, num_hidden_layers=layers,
                           num_attention_heads=heads, image_size=image_size, patch_size=14, hidden_act="gelu",
                           layer_norm_eps=1e-5, attention_dropout=0.0)
    model = CLIPVisionModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():  # non-trivial norms/biases so wrong mappings show
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return model


def save_wan(model, dim, path, extra=True):
    sd = hf_to_wan(model.state_dict(), dim)
    if extra:  # parts of the real file that must be ignored
        sd["visual.head"] = torch.randn(dim, 32)
        sd["textual.token_embedding.weight"] = torch.randn(10, 8)
        sd["log_scale"] = torch.tensor(2.0)
    torch.save(sd, path)
    return sd


@pytest.mark.parametrize("image_size,head_dim", [(28, 80), (224, 80)])
def test_matches_transformers_penultimate(tmp_path, image_size, head_dim):
    hf = make_hf(image_size)
    path = tmp_path / "clip.pth"
    save_wan(hf, 160, path)
    model = load_clip(str(path), dtype=torch.float32, head_dim=head_dim)
    assert model.cfg == CLIPConfig(image_size=image_size, patch_size=14, dim=160, mlp_dim=640, num_heads=2,
                                   num_layers=3)
    assert len(model.transformer) == 2  # 3 in the file, the last one unused
    torch.manual_seed(1)
    pixels = torch.randn(2, 3, image_size, image_size)
    ours = encode_image(model, pixels)
    with torch.no_grad():
        ref = hf(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
    tokens = (image_size // 14) ** 2 + 1
    assert ours.shape == (2, tokens, 160) and ours.dtype == torch.float32
    err = rel_l2(ours, ref)
    assert err <= 1e-5, f"rel L2 {err:.2e}"


def test_state_dict_keys(tmp_path):
    hf = make_hf(28)
    path = tmp_path / "clip.pth"
    sd = save_wan(hf, 160, path)
    model = load_clip(str(path), dtype=torch.float32)
    used = {k.removeprefix("visual.") for k in sd if k.startswith("visual.") and "transformer.2." not in k
            and not k.startswith(("visual.post_norm", "visual.head"))}
    assert set(model.state_dict()) == used
    # A bare (already stripped, visual-only) state dict loads the same. (A new file: fp32 CPU weights stay
    # mmap-backed views of the first one.)
    bare = tmp_path / "bare.pth"
    torch.save({k.removeprefix("visual."): v for k, v in sd.items() if k.startswith("visual.")}, bare)
    assert torch.equal(load_clip(str(bare), dtype=torch.float32).pos_embedding, model.pos_embedding)


def bicubic_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """[n_out, n_in] cubic-convolution (A = -0.75) resampling, half-pixel centres, edge-clamped taps."""
    A = -0.75

    def k(t):
        t = abs(t)
        if t <= 1:
            return (A + 2) * t ** 3 - (A + 3) * t ** 2 + 1
        if t < 2:
            return A * t ** 3 - 5 * A * t ** 2 + 8 * A * t - 4 * A
        return 0.0

    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        src = (i + 0.5) * n_in / n_out - 0.5
        x0 = math.floor(src)
        for j in range(x0 - 1, x0 + 3):
            m[i, min(max(j, 0), n_in - 1)] += k(src - j)
    return m


def test_preprocess_independent():
    torch.manual_seed(0)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073], dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711], dtype=torch.float64).view(1, 3, 1, 1)
    # Upscale and downscale (no antialias, like F.interpolate's default in Wan).
    for h, w in ((90, 160), (480, 832)):
        img = torch.rand(1, 3, h, w, dtype=torch.float64) * 2 - 1
        ref = (bicubic_matrix(h, 224) @ img @ bicubic_matrix(w, 224).T * 0.5 + 0.5 - mean) / std
        out64 = clip_preprocess(img, size=224)
        assert out64.shape == (1, 3, 224, 224) and out64.dtype == torch.float64
        assert rel_l2(out64, ref) <= 1e-10  # exact formula (a = -0.5 instead of -0.75 gives ~1e-2)
        out32 = clip_preprocess(img.float())
        assert out32.dtype == torch.float32 and rel_l2(out32, ref) <= 1e-4


def test_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing_clip.pth"):
        load_clip(str(tmp_path / "missing_clip.pth"))
    hf = make_hf(28)
    sd = hf_to_wan(hf.state_dict(), 160)
    path = tmp_path / "bad.pth"
    broken = dict(sd)
    del broken["visual.transformer.1.attn.proj.bias"]
    broken["visual.transformer.0.attn.extra"] = torch.zeros(1)
    torch.save(broken, path)
    with pytest.raises(ValueError, match=r"bad\.pth.*transformer\.1\.attn\.proj\.bias.*transformer\.0\.attn\.extra"):
        load_clip(str(path), dtype=torch.float32)
    wrong = dict(sd)
    wrong["visual.transformer.1.mlp.0.weight"] = torch.zeros(640, 100)
    torch.save(wrong, path)
    with pytest.raises(ValueError, match=r"transformer\.1\.mlp\.0\.weight.*\(640, 100\).*\(640, 160\)"):
        load_clip(str(path), dtype=torch.float32)
    torch.save({"visual.foo": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="bad.pth.*missing keys"):
        load_clip(str(path))
    good = tmp_path / "good.pth"
    torch.save(sd, good)
    model = load_clip(str(good), dtype=torch.float32)
    with pytest.raises(ValueError, match=r"\[B, 3, 28, 28\]"):
        encode_image(model, torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError):
        clip_preprocess(torch.zeros(3, 32, 32))


def test_random_clip():
    cfg = CLIPConfig.tiny()
    a = random_clip(cfg, "cpu", torch.float32, seed=3)
    b = random_clip(cfg, "cpu", torch.float32, seed=3)
    assert isinstance(a, CLIPVisionTower)
    for (k, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), k
    img = clip_preprocess(torch.rand(2, 3, 40, 60) * 2 - 1, size=cfg.image_size)
    out = encode_image(a, img)
    assert out.shape == (2, cfg.num_tokens, cfg.dim) and torch.isfinite(out).all()
    assert 0.3 < out.std().item() < 3.0
    assert random_clip(cfg, "cpu", torch.bfloat16).transformer[0].mlp[0].weight.dtype == torch.bfloat16
    assert CLIPConfig.vit_h14().num_tokens == 257 and CLIPConfig.vit_h14().use_blocks == 31
    # a ViT-H file pruned to the 31 blocks Wan runs runs them all (not 30)
    assert dataclasses.replace(CLIPConfig.vit_h14(), num_layers=31).use_blocks == 31


def test_bf16_close_to_fp32(tmp_path):
    hf = make_hf(28)
    path = tmp_path / "clip.pth"
    save_wan(hf, 160, path)
    pixels = torch.randn(1, 3, 28, 28)
    ref = encode_image(load_clip(str(path), dtype=torch.float32), pixels)
    out = encode_image(load_clip(str(path), dtype=torch.bfloat16), pixels)
    assert out.dtype == torch.bfloat16 and rel_l2(out.float(), ref) < 3e-2


@pytest.mark.parametrize("scheme, tol", [("int8", 0.015), ("fp8", 0.04)])  # measured 0.0075 / 0.019
def test_quantized_clip_file_loads_as_8bit_linears(tmp_path, scheme, tol):
    """LightX2V's quantized CLIP (clip_quantized): the block linears stored as 8-bit weight + weight_scale
    run as QuantLinear; the output is transformers' CLIP with the dequantized weights, up to the
    activations' per-token quantization. The last (unused) block's scales are ignored like its weights."""
    from lightx2v_engine.clip import QUANT_LINEARS
    from lightx2v_engine.quant import QuantLinear, dequantize_weight, quantize_weight
    hf = make_hf(28)
    sd = save_wan(hf, 160, tmp_path / "clip.pth")
    deq = {}
    for k in list(sd):
        if k.startswith("visual.transformer.") and any(k.endswith(f".{n}.weight") for n in QUANT_LINEARS):
            wq, scale = quantize_weight(sd[k].float(), scheme)
            deq[k] = dequantize_weight(wq, scale)
            sd[k], sd[k + "_scale"] = wq, scale.reshape(-1)
    torch.save(sd, tmp_path / f"clip-{scheme}.pth")
    model = load_clip(str(tmp_path / f"clip-{scheme}.pth"), dtype=torch.float32)
    assert all(isinstance(model.transformer[i].get_submodule(n), QuantLinear) for i in range(2) for n in QUANT_LINEARS)
    with torch.no_grad():  # the dequantized weights into transformers' model (q, k, v are to_qkv's thirds)
        for n, layer in enumerate(getattr(hf, "vision_model", hf).encoder.layers):
            q = f"visual.transformer.{n}."
            if q + "attn.to_qkv.weight" not in deq:
                continue
            for w, part in zip("qkv", deq[q + "attn.to_qkv.weight"].chunk(3)):
                getattr(layer.self_attn, f"{w}_proj").weight.copy_(part)
            layer.self_attn.out_proj.weight.copy_(deq[q + "attn.proj.weight"])
            layer.mlp.fc1.weight.copy_(deq[q + "mlp.0.weight"])
            layer.mlp.fc2.weight.copy_(deq[q + "mlp.2.weight"])
    torch.manual_seed(1)
    pixels = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        ref = hf(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
    err = rel_l2(encode_image(model, pixels), ref)
    assert err < tol, err


def test_random_i2v_pipeline_with_clip_quantized():
    from lightx2v_engine.pipeline import Pipeline
    from lightx2v_engine.quant import QuantLinear
    pipe = Pipeline.random("tiny-i2v", {"clip_quantized": True, "clip_quant_scheme": "int8-q8f",
                                        "target_video_length": 5, "target_height": 32, "target_width": 48},
                           device="cpu")
    assert isinstance(pipe.clip.transformer[0].mlp[2], QuantLinear)
    import numpy as np
    from PIL import Image
    img = Image.fromarray((np.random.default_rng(0).random((40, 60, 3)) * 255).astype(np.uint8))
    clip_fea, y, _ = pipe.encode_image(img, 5, 32, 48)
    assert torch.isfinite(clip_fea).all()


@pytest.mark.gpu
@pytest.mark.last
@pytest.mark.parametrize("scheme", ["int8", "fp8"])
def test_quantized_clip_on_cuda_fp16_matches_cpu(tmp_path, scheme):
    """CLIP runs in fp16 on CUDA: its 8-bit GEMMs (fp8: a bf16 result cast to fp16) against the CPU path."""
    from lightx2v_engine.clip import QUANT_LINEARS
    from lightx2v_engine.quant import quantize_weight
    sd = save_wan(make_hf(28), 160, tmp_path / "clip.pth")
    for k in list(sd):
        if k.startswith("visual.transformer.") and any(k.endswith(f".{n}.weight") for n in QUANT_LINEARS):
            sd[k], sd[k + "_scale"] = quantize_weight(sd[k].float(), scheme)
    torch.save(sd, tmp_path / "q.pth")
    torch.manual_seed(1)
    pixels = torch.randn(2, 3, 28, 28)
    want = encode_image(load_clip(str(tmp_path / "q.pth"), dtype=torch.float32), pixels)
    got = encode_image(load_clip(str(tmp_path / "q.pth"), device="cuda", dtype=torch.float16), pixels.cuda())
    assert got.dtype == torch.float16 and rel_l2(got.float().cpu(), want) < 0.05
