"""Wan2.1 VAE against diffusers' AutoencoderKLWan (independent implementation) with random tiny weights."""
import copy
import functools
import re

import pytest
import torch
import torch.nn.functional as F

from lightx2v_engine.vae import (WAN21_LATENT_MEAN, WAN21_LATENT_STD, VAEConfig, WanVAE, _expected_shapes,
                                 _subpixel_weight, _tile_setting, _upsample2x_conv, load_vae, norm_kernel_status,
                                 random_vae, rms_norm_act_ref, set_norm_kernel)

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKLWan  # noqa: E402

BASE_DIM = 16


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _wan_key(k: str) -> str:
    """diffusers AutoencoderKLWan key -> Wan2.1_VAE.pth key (num_res_blocks 2: 3 resnets + 1 upsampler per stage)."""
    k = re.sub(r"^(encoder|decoder)\.conv_in\.", r"\1.conv1.", k)
    k = re.sub(r"^(encoder|decoder)\.norm_out\.", r"\1.head.0.", k)
    k = re.sub(r"^(encoder|decoder)\.conv_out\.", r"\1.head.2.", k)
    k = re.sub(r"^quant_conv\.", "conv1.", k)
    k = re.sub(r"^post_quant_conv\.", "conv2.", k)
    k = k.replace("mid_block.resnets.0.", "middle.0.").replace("mid_block.attentions.0.", "middle.1.")
    k = k.replace("mid_block.resnets.1.", "middle.2.")
    k = re.sub(r"^encoder\.down_blocks\.(\d+)\.", r"encoder.downsamples.\1.", k)
    k = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.",
               lambda m: f"decoder.upsamples.{4 * int(m[1]) + int(m[2])}.", k)
    k = re.sub(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"decoder.upsamples.{4 * int(m[1]) + 3}.", k)
    for a, b in (("norm1.", "residual.0."), ("conv1.", "residual.2."), ("norm2.", "residual.3."),
                 ("conv2.", "residual.6."), ("conv_shortcut.", "shortcut.")):
        k = re.sub(rf"^((?:encoder|decoder)\.(?:downsamples|upsamples|middle)\.\d+\.){re.escape(a)}", rf"\g<1>{b}", k)
    return k


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(diffusers model, our model loaded from a Wan-layout .pth, path) sharing random weights."""
    torch.manual_seed(0)
    ref = AutoencoderKLWan(base_dim=BASE_DIM, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                           temperal_downsample=[False, True, True]).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # every tensor random (gammas and biases too), so each one matters
        for name, p in ref.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
    sd = {_wan_key(k): v.clone() for k, v in ref.state_dict().items()}
    path = tmp_path_factory.mktemp("vae") / "Wan2.1_VAE_tiny.pth"
    torch.save(sd, path)
    return ref, load_vae(path), path


@functools.lru_cache(maxsize=1)
def _diffusers_wan21_config():
    """diffusers' full-size AutoencoderKLWan config (built on the meta device): Wan2.1's latents_mean/std."""
    with torch.device("meta"):
        return AutoencoderKLWan().config


def _mean_std():
    """The reference latent normalisation [1, 16, 1, 1, 1] x 2, from diffusers' config (not the engine's)."""
    cfg = _diffusers_wan21_config()
    return (torch.tensor(cfg.latents_mean).view(1, 16, 1, 1, 1), torch.tensor(cfg.latents_std).view(1, 16, 1, 1, 1))


def test_latent_mean_std_match_diffusers():
    cfg = _diffusers_wan21_config()
    assert WAN21_LATENT_MEAN == tuple(cfg.latents_mean)
    assert WAN21_LATENT_STD == tuple(cfg.latents_std)


def test_config_from_checkpoint(pair):
    _, ours, _ = pair
    assert ours.cfg == VAEConfig(dim=BASE_DIM, z_dim=16)
    assert ours.dtype == torch.float32


def test_encode_matches_diffusers(pair):
    ref, ours, _ = pair
    x = torch.rand(1, 3, 9, 32, 48, generator=torch.Generator().manual_seed(2)) * 2 - 1
    mean, std = _mean_std()
    with torch.no_grad():
        want = (ref.encode(x).latent_dist.mean - mean) / std
    got = ours.encode(x)
    assert got.shape == (1, 16, 3, 4, 6) and got.dtype == torch.float32
    assert _rel(got, want) <= 1e-4, _rel(got, want)


def test_decode_matches_diffusers(pair):
    ref, ours, _ = pair
    z = torch.randn(1, 16, 3, 4, 6, generator=torch.Generator().manual_seed(3))
    mean, std = _mean_std()
    with torch.no_grad():
        want = ref.decode(z * std + mean).sample
    got = ours.decode(z)
    assert got.shape == (1, 3, 9, 32, 48) and got.dtype == torch.float32
    assert got.abs().max() <= 1.0
    assert (want.abs() < 1).float().mean() > 0.5  # the comparison is not all clamp
    assert _rel(got, want) <= 1e-4, _rel(got, want)


@pytest.fixture
def tiled_ref(pair):
    """diffusers' model with tiling on at (64, 48) pixels (tile, stride), restored afterwards."""
    ref = pair[0]
    ref.enable_tiling(tile_sample_min_height=64, tile_sample_min_width=64, tile_sample_stride_height=48,
                      tile_sample_stride_width=48)
    yield ref
    ref.disable_tiling()


def test_tiled_decode_matches_diffusers_tiling(pair, tiled_ref):
    """use_tiling_vae: tiles of 64 px every 48 px over a 104 x 136 video (ragged edge tiles in both
    directions), blended as diffusers' AutoencoderKLWan.tiled_decode; the untiled decode differs (each tile
    sees only its neighbourhood), so the match is the tiling's, not the plain decode's."""
    _, ours, _ = pair
    z = torch.randn(1, 16, 2, 13, 17, generator=torch.Generator().manual_seed(4))
    mean, std = _mean_std()
    with torch.no_grad():
        want = tiled_ref.decode(z * std + mean).sample
    got = ours.decode(z, tiled=(64, 48))
    assert got.shape == want.shape == (1, 3, 5, 104, 136)
    assert _rel(got, want) <= 1e-4, _rel(got, want)
    assert _rel(ours.decode(z), want) > 1e-3  # tiling changes the result: the test sees it
    # larger than a tile in one direction only: tiled in that direction (diffusers' rule: either side)
    tall = z[..., :13, :6]
    with torch.no_grad():
        want_tall = tiled_ref.decode(tall * std + mean).sample
    assert _rel(ours.decode(tall, tiled=(64, 48)), want_tall) <= 1e-4
    assert _rel(ours.decode(tall), want_tall) > 1e-3
    # a video no larger than one tile decodes untiled
    small = z[..., :8, :8]
    torch.testing.assert_close(ours.decode(small, tiled=(64, 48)), ours.decode(small), rtol=0, atol=0)


def test_tiled_encode_matches_diffusers_tiling(pair, tiled_ref):
    _, ours, _ = pair
    x = torch.rand(1, 3, 5, 104, 136, generator=torch.Generator().manual_seed(5)) * 2 - 1
    mean, std = _mean_std()
    with torch.no_grad():
        want = (tiled_ref.encode(x).latent_dist.mean - mean) / std
    got = ours.encode(x, tiled=(64, 48))
    assert got.shape == want.shape == (1, 16, 2, 13, 17)
    assert _rel(got, want) <= 1e-4, _rel(got, want)
    assert _rel(ours.encode(x), want) > 1e-3
    wide = x[..., :48, :]  # larger than a tile in width only
    with torch.no_grad():
        want_wide = (tiled_ref.encode(wide).latent_dist.mean - mean) / std
    assert _rel(ours.encode(wide, tiled=(64, 48)), want_wide) <= 1e-4
    assert _rel(ours.encode(wide), want_wide) > 1e-3


def test_tiling_setting_is_checked(pair):
    _, ours, _ = pair
    z, x = torch.zeros(1, 16, 1, 4, 4), torch.zeros(1, 3, 1, 16, 16)
    for bad in ((64, 0), (64, 80), (60, 48), "yes", 1, 0, (64,), (64, 48, 16), (64.0, 48), (True, True)):
        msg = rf"VAE tiling: tiled must be True, False or a \(tile, stride\) pair.*got {re.escape(repr(bad))}$"
        with pytest.raises(ValueError, match=msg):
            ours.decode(z, tiled=bad)
        with pytest.raises(ValueError, match=msg):
            ours.encode(x, tiled=bad)
    assert _tile_setting([64, 48]) == _tile_setting((64, 48)) == (64, 48)
    assert _tile_setting(True) == (256, 192) and _tile_setting(False) is None and _tile_setting(None) is None


def test_single_frame_and_batch(pair):
    """T=1 (image) encode/decode and batch 2 against diffusers (first-chunk paths, batch strides)."""
    ref, ours, _ = pair
    x = torch.rand(2, 3, 5, 16, 24, generator=torch.Generator().manual_seed(4)) * 2 - 1
    mean, std = _mean_std()
    with torch.no_grad():
        want = (ref.encode(x).latent_dist.mean - mean) / std
        img_want = (ref.encode(x[:1, :, :1]).latent_dist.mean - mean) / std
        dec_want = ref.decode(want * std + mean).sample
        img_dec_want = ref.decode(img_want * std + mean).sample
    assert _rel(ours.encode(x), want) <= 1e-4
    assert _rel(ours.encode(x[:1, :, :1]), img_want) <= 1e-4
    assert _rel(ours.decode(want), dec_want) <= 1e-4
    img = ours.decode(img_want)
    assert img.shape == (1, 3, 1, 16, 24) and _rel(img, img_dec_want) <= 1e-4


def test_channels_last_with_norm_kernel_matches_diffusers(pair, monkeypatch):
    """The CUDA layout path on the CPU: channels_last_3d activations/weights and the Triton RMSNorm+SiLU
    kernel (interpreter) writing into the strided scratch tails."""
    ref, _, path = pair
    assert norm_kernel_status() == "available"
    ours = load_vae(path).use_channels_last()
    assert ours.encoder.conv1.weight.is_contiguous(memory_format=torch.channels_last_3d)
    mean, std = _mean_std()
    x = torch.rand(1, 3, 5, 16, 24, generator=torch.Generator().manual_seed(8)) * 2 - 1
    z = torch.randn(1, 16, 2, 2, 3, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        enc_want = (ref.encode(x).latent_dist.mean - mean) / std
        dec_want = ref.decode(z * std + mean).sample
    from lightx2v_engine.kernels import vae_norm
    calls = []
    launch = vae_norm.rms_norm_act
    monkeypatch.setattr(vae_norm, "rms_norm_act", lambda *a, **k: calls.append(1) or launch(*a, **k))
    set_norm_kernel("kernel")
    try:
        enc, dec = ours.encode(x), ours.decode(z)
    finally:
        set_norm_kernel("auto")
    assert _rel(enc, enc_want) <= 1e-4, _rel(enc, enc_want)
    assert _rel(dec, dec_want) <= 1e-4, _rel(dec, dec_want)
    assert len(calls) == 2 * 22 + 2 * 30  # every norm (22 encoder, 30 decoder) of both chunks ran the kernel


def test_bf16_close_to_fp32(pair):
    _, ours, path = pair
    ours16 = load_vae(path, dtype=torch.bfloat16)
    assert ours16.dtype == torch.bfloat16
    z = torch.randn(1, 16, 2, 4, 6, generator=torch.Generator().manual_seed(5))
    got = ours16.decode(z)
    assert got.dtype == torch.float32
    assert _rel(got, ours.decode(z)) <= 3e-2
    x = torch.rand(1, 3, 5, 32, 48, generator=torch.Generator().manual_seed(6)) * 2 - 1
    assert _rel(ours16.encode(x), ours.encode(x)) <= 3e-2


def test_bf16_encode_matches_wan_order_reference(pair, monkeypatch):
    """bf16 encode against diffusers' model in bf16 with Wan's RMS_norm, F.normalize(x) * sqrt(C), computed
    in fp32 and rounded once, then * gamma (the engine's fp32 norm region). Any two bf16 rounding orders (the
    engine's x * (sqrt(C) / ||x||) against x / ||x|| * sqrt(C), its linear against diffusers' 1x1 conv in the
    attention) drift apart through the encoder: measured 3.2e-3 rel L2; the norm in bf16 (F.normalize on bf16
    x) gives 7.0e-3, invisible against fp32 (bf16 itself is ~1e-2 from it). Decode is not compared: its
    sub-pixel conv sums pairs of the upsampler's weights in bf16 (~1.2e-2 from diffusers' bf16 decode)."""
    ref, _, path = pair
    ours16 = load_vae(path, dtype=torch.bfloat16)
    ref16 = copy.deepcopy(ref).to(torch.bfloat16)

    def wan_norm(self, x):
        return (F.normalize(x.float(), dim=1) * self.scale).to(x.dtype) * self.gamma + self.bias

    monkeypatch.setattr(type(ref16.encoder.norm_out), "forward", wan_norm)
    x = torch.rand(1, 3, 5, 32, 48, generator=torch.Generator().manual_seed(6)) * 2 - 1
    mean, std = _mean_std()
    with torch.no_grad():
        want = (ref16.encode(x.bfloat16()).latent_dist.mean.float() - mean) / std
    err = _rel(ours16.encode(x), want)
    assert err <= 4.5e-3, err


def test_rms_norm_act_ref_matches_definition():
    x = torch.randn(2, 24, 3, 5, 7, dtype=torch.float64)
    gamma = torch.randn(24, 1, 1, 1, dtype=torch.float64)
    want = torch.nn.functional.silu(torch.nn.functional.normalize(x, dim=1) * 24 ** 0.5 * gamma)
    out = torch.empty(2, 24, 5, 5, 7, dtype=torch.float64)[:, :, 2:]  # strided destination (scratch tail)
    got = rms_norm_act_ref(x, gamma, True, out=out)
    assert got.data_ptr() == out.data_ptr()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last_3d])
def test_subpixel_upsample_conv_matches_interpolate_then_conv(fmt):
    g = torch.Generator().manual_seed(12)
    x = torch.randn(2, 6, 3, 3, 5, generator=g, dtype=torch.float64).contiguous(memory_format=fmt)
    w, b = torch.randn(4, 6, 3, 3, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64)
    frames = x.permute(0, 2, 1, 3, 4).reshape(6, 6, 3, 5)
    up = torch.nn.functional.interpolate(frames, scale_factor=2.0, mode="nearest-exact")
    want = torch.nn.functional.conv2d(up, w, b, padding=1).view(2, 3, 4, 6, 10).permute(0, 2, 1, 3, 4)
    got = _upsample2x_conv(x, _subpixel_weight(w).unsqueeze(2), b, fmt)
    assert got.is_contiguous(memory_format=fmt)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_full_size_layout_matches_wan_checkpoint():
    """194 tensors, 126.9M parameters, and diffusers' full-size keys map onto ours with equal shapes."""
    shapes = _expected_shapes(VAEConfig.wan21())
    assert len(shapes) == 194
    assert abs(sum(s.numel() for s in shapes.values()) - 126.9e6) < 0.1e6
    with torch.device("meta"):
        ref = AutoencoderKLWan()
    ref_shapes = {_wan_key(k): v.shape for k, v in ref.state_dict().items()}
    assert ref_shapes == shapes
    assert shapes["encoder.downsamples.5.time_conv.weight"] == (192, 192, 3, 1, 1)
    assert shapes["decoder.upsamples.3.time_conv.weight"] == (768, 384, 3, 1, 1)
    assert shapes["decoder.upsamples.11.resample.1.weight"] == (96, 192, 3, 3)


def test_frame_count_must_be_1_plus_4k(pair):
    _, ours, _ = pair
    with pytest.raises(ValueError, match="T=8"):
        ours.encode(torch.zeros(1, 3, 8, 16, 16))
    with pytest.raises(ValueError, match="multiples of 8"):
        ours.encode(torch.zeros(1, 3, 5, 20, 16))


def test_missing_keys_named(pair, tmp_path):
    _, ours, _ = pair
    sd = dict(ours.state_dict())
    del sd["decoder.upsamples.7.time_conv.weight"]
    sd["decoder.extra.weight"] = torch.zeros(1)
    bad = tmp_path / "bad.pth"
    torch.save(sd, bad)
    with pytest.raises(KeyError, match=r"decoder\.upsamples\.7\.time_conv\.weight") as e:
        load_vae(bad)
    assert "decoder.extra.weight" in str(e.value) and "bad.pth" in str(e.value)
    sd = dict(ours.state_dict())
    sd["encoder.head.0.gamma"] = torch.ones(5, 1, 1, 1)
    torch.save(sd, bad)
    with pytest.raises(ValueError, match=r"encoder\.head\.0\.gamma has shape \(5, 1, 1, 1\)"):
        load_vae(bad)


def test_wan22_vae_file_named(tmp_path):
    """A Wan2.2 VAE (z_dim 48, 12 patchified input channels) is refused naming the file, not as a bare
    VAEConfig error; another latent width is named as not a Wan2.1 VAE."""
    path = tmp_path / "Wan2.2_VAE.pth"
    torch.save({"encoder.conv1.weight": torch.zeros(160, 12, 3, 3, 3), "conv2.weight": torch.zeros(48, 48, 1, 1, 1)},
               path)
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: conv2\.weight \(48, 48, 1, 1, 1\) gives z_dim "
                                         r"48, expected 16 \(Wan2\.1 VAE\): this looks like a Wan2\.2 VAE"):
        load_vae(path)
    torch.save({"encoder.conv1.weight": torch.zeros(8, 3, 3, 3, 3), "conv2.weight": torch.zeros(4, 4, 1, 1, 1)}, path)
    with pytest.raises(ValueError, match=r"gives z_dim 4, expected 16 \(Wan2\.1 VAE\); not a Wan2\.1 VAE"):
        load_vae(path)


def test_decode_of_empty_latents_named(pair):
    _, ours, _ = pair
    for shape in ((1, 16, 0, 4, 4), (1, 16, 1, 0, 4), (1, 16, 2, 4, 0)):
        msg = rf"WanVAE\.decode: latents {re.escape(str(shape))} are empty: need F >= 1 frames and h, w >= 1"
        with pytest.raises(ValueError, match=msg):
            ours.decode(torch.zeros(shape))
        with pytest.raises(ValueError, match=msg):
            ours.decode(torch.zeros(shape), tiled=(64, 48))
    with pytest.raises(ValueError, match=r"WanVAE\.decode_tiles: latents \(1, 16, 0, 9, 9\) are empty"):
        ours.decode_tiles(torch.zeros(1, 16, 0, 9, 9), (64, 48))
    with pytest.raises(ValueError, match="positive multiples of 8"):
        ours.encode(torch.zeros(1, 3, 1, 0, 16))


def test_encode_rejects_integer_video(pair):
    _, ours, _ = pair
    for dtype in (torch.uint8, torch.int64):
        video = torch.zeros(1, 3, 1, 16, 16, dtype=dtype)
        with pytest.raises(ValueError, match=rf"floating-point video in \[-1, 1\], got dtype {dtype}"):
            ours.encode(video)


def test_missing_file_names_path(tmp_path):
    p = tmp_path / "nowhere" / "Wan2.1_VAE.pth"
    with pytest.raises(FileNotFoundError, match=re.escape(str(p))):
        load_vae(p)
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "Wan2.1_VAE.pth"))):
        load_vae(tmp_path)  # a model directory without the VAE file


def test_random_vae_deterministic_and_sane():
    cfg = VAEConfig.tiny()
    a, b = random_vae(cfg, seed=3), random_vae(cfg, seed=3)
    assert isinstance(a, WanVAE) and a.cfg.dim == 8
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    assert not torch.equal(random_vae(cfg, seed=4).conv2.weight, a.conv2.weight)
    z = torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(7))
    video = a.decode(z)
    assert video.shape == (1, 3, 5, 32, 32) and torch.isfinite(video).all()
    assert video.std() > 0.05 and (video.abs() < 1).float().mean() > 0.2
    latents = a.encode(video)
    assert latents.shape == (1, 16, 2, 4, 4) and torch.isfinite(latents).all()
    bf = random_vae(cfg, dtype=torch.bfloat16, seed=3)
    assert bf.dtype == torch.bfloat16 and _rel(bf.decode(z), video) < 5e-2


@pytest.mark.gpu
def test_cuda_matches_cpu(pair):
    """CUDA path (channels_last_3d, Triton norm) vs the CPU fp32 model: fp32 without TF32 tight, bf16 loose."""
    _, ours, path = pair
    x = torch.rand(1, 3, 9, 32, 48, generator=torch.Generator().manual_seed(10)) * 2 - 1
    z = torch.randn(1, 16, 3, 4, 6, generator=torch.Generator().manual_seed(11))
    enc_want, dec_want = ours.encode(x), ours.decode(z)
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        gpu = load_vae(path, device="cuda")
        assert gpu.memory_format == torch.channels_last_3d
        assert _rel(gpu.encode(x.cuda()).cpu(), enc_want) <= 1e-4
        assert _rel(gpu.decode(z.cuda()).cpu(), dec_want) <= 1e-4
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    gpu16 = load_vae(path, device="cuda", dtype=torch.bfloat16)
    assert _rel(gpu16.encode(x.cuda()).cpu(), enc_want) <= 3e-2
    dec = gpu16.decode(z.cuda())
    assert dec.dtype == torch.float32 and _rel(dec.cpu(), dec_want) <= 3e-2


@pytest.mark.gpu
def test_cuda_full_size_decode_fits_24gb():
    """81 frames at 480x832 (21 latents) with random full-size weights in bf16: peak well under 24 GB."""
    vae = random_vae(VAEConfig.wan21(), device="cuda", dtype=torch.bfloat16)
    z = torch.randn(1, 16, 21, 60, 104, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    video = vae.decode(z)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**30
    assert video.shape == (1, 3, 81, 480, 832) and torch.isfinite(video).all()
    assert peak < 12, f"decode peak {peak:.1f} GiB"


def test_use_tiling_vae_reaches_encode_and_decode(monkeypatch):
    """The config key tiles the I2V image encode and the decode (LightX2V's use_tiling_vae)."""
    import numpy as np
    from PIL import Image
    from lightx2v_engine.pipeline import Pipeline
    seen = []
    for name in ("encode", "decode"):
        real = getattr(WanVAE, name)
        monkeypatch.setattr(WanVAE, name, lambda self, x, tiled=False, _r=real, _n=name:
                            (seen.append((_n, tiled)), _r(self, x, tiled=tiled))[1])
    tiny = {"target_video_length": 5, "target_height": 32, "target_width": 48}
    img = Image.fromarray((np.random.default_rng(0).random((40, 60, 3)) * 255).astype(np.uint8))
    for flag in (True, False):
        seen.clear()
        Pipeline.random("tiny-i2v", {**tiny, "use_tiling_vae": flag}, device="cpu").generate("a cat", image=img, seed=1)
        assert seen == [("encode", flag), ("decode", flag)]


def test_lightvae_width_matches_diffusers(tmp_path):
    """LightX2V's lightvaew2_1 is the Wan VAE with every width a quarter (base 24): read from the file and
    checked against diffusers' AutoencoderKLWan(base_dim=24), encode and decode."""
    torch.manual_seed(5)
    ref = AutoencoderKLWan(base_dim=24, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                           temperal_downsample=[False, True, True]).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if not name.endswith("gamma"):
                p.copy_(torch.randn(p.shape) / (p[0].numel() ** 0.5 if p.dim() > 1 else 20.0))
    from safetensors.torch import save_file
    path = tmp_path / "lightvaew2_1.safetensors"
    save_file({_wan_key(k): v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    ours = load_vae(path)
    assert ours.cfg == VAEConfig(dim=24)
    mean, std = _mean_std()
    z = torch.randn(1, 16, 2, 3, 4)
    x = torch.rand(1, 3, 5, 24, 32) * 2 - 1
    with torch.no_grad():
        want_dec = ref.decode(z * std + mean).sample
        want_enc = (ref.encode(x).latent_dist.mean - mean) / std
    assert _rel(ours.decode(z), want_dec) <= 1e-4
    assert _rel(ours.encode(x), want_enc) <= 1e-4


def test_rms_norm_act_out_in_another_pixel_order_runs_the_reference():
    """An `out` of channels-last rows whose pixels run in another order than x's: the kernel cannot write it
    (one offset for both), so the reference runs (it raised before), into that buffer."""
    from lightx2v_engine import vae as V
    x = torch.randn(1, 4, 2, 3, 3).contiguous(memory_format=torch.channels_last_3d)
    g = torch.randn(4, 1, 1, 1)
    out = torch.empty(1, 2, 3, 3, 4).permute(0, 4, 1, 3, 2)  # [1, 4, 2, 3, 3], W slower than H
    V.set_norm_kernel("kernel")
    try:
        if V._norm_kernel() is None:
            pytest.skip(f"the VAE norm kernel is {V.norm_kernel_status()}")
        got = V.rms_norm_act(x, g, True, out)
    finally:
        V.set_norm_kernel("auto")
    assert got.data_ptr() == out.data_ptr()
    torch.testing.assert_close(got, V.rms_norm_act_ref(x, g, True), rtol=1e-6, atol=1e-6)
