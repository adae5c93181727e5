"""Tiny autoencoder (TAEHV taew2_1 layout) against a literal whole-video formulation written here.

The reference follows the published TAEHV decoder layer by layer in its own order (nearest upsample, then the
TGrow 1x1 conv at the high resolution, then a plain 3x3 conv; MemBlocks on the whole video with the input
shifted by one frame; the first 3 frames trimmed), on a state dict in the checkpoint's key layout. The engine
runs it reordered (TGrow before the upsample, sub-pixel convs) and streamed in chunks of frames.
"""
import functools
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from lightx2v_engine.tae import TAEConfig, TinyDecoder, load_tae, random_tae


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


class _Mem(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(2 * n, n, 3, padding=1), nn.ReLU(), nn.Conv2d(n, n, 3, padding=1),
                                  nn.ReLU(), nn.Conv2d(n, n, 3, padding=1))

    def forward(self, x):  # x [T, n, H, W]: the past of frame t is frame t-1 of this block's input, zeros at t=0
        past = torch.cat([torch.zeros_like(x[:1]), x[:-1]])
        return F.relu(self.conv(torch.cat([x, past], 1)) + x)


class _Grow(nn.Module):
    def __init__(self, n, stride):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(n, n * stride, 1, bias=False)

    def forward(self, x):
        t, c, h, w = x.shape
        return self.conv(x).reshape(-1, c, h, w)


class _Clamp(nn.Module):
    def forward(self, x):
        return torch.tanh(x / 3) * 3


def reference_decoder(widths):
    n = widths
    return nn.Sequential(
        _Clamp(), nn.Conv2d(16, n[0], 3, padding=1), nn.ReLU(), _Mem(n[0]), _Mem(n[0]), _Mem(n[0]),
        nn.Upsample(scale_factor=2), _Grow(n[0], 1), nn.Conv2d(n[0], n[1], 3, padding=1, bias=False),
        _Mem(n[1]), _Mem(n[1]), _Mem(n[1]),
        nn.Upsample(scale_factor=2), _Grow(n[1], 2), nn.Conv2d(n[1], n[2], 3, padding=1, bias=False),
        _Mem(n[2]), _Mem(n[2]), _Mem(n[2]),
        nn.Upsample(scale_factor=2), _Grow(n[2], 2), nn.Conv2d(n[2], n[3], 3, padding=1, bias=False),
        nn.ReLU(), nn.Conv2d(n[3], 3, 3, padding=1))


@functools.lru_cache(maxsize=1)
def _wan21_mean_std():
    """Wan2.1's latent mean/std [1, 16, 1, 1, 1] x 2 as diffusers' AutoencoderKLWan config holds them (the
    reference's own copy, not the engine's constants)."""
    diffusers = pytest.importorskip("diffusers")
    with torch.device("meta"):
        cfg = diffusers.AutoencoderKLWan().config
    return torch.tensor(cfg.latents_mean).view(1, 16, 1, 1, 1), torch.tensor(cfg.latents_std).view(1, 16, 1, 1, 1)


def reference_decode(dec, z, raw=False):
    """z [1, 16, F, h, w] -> [1, 3, 4F-3, 8h, 8w] in [-1, 1] (TAEHV decode_video, then x2 - 1); raw: the
    decoder takes raw latents (a lighttae file, need_scaled), so z is unnormalized first: z * std + mean."""
    if raw:
        mean, std = _wan21_mean_std()
        z = z * std + mean
    frames = dec(z[0].transpose(0, 1))  # [4F, 3, 8h, 8w]
    return (frames.clamp(0, 1)[3:].transpose(0, 1) * 2 - 1)[None]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(reference decoder, path of a taew2_1.safetensors with its weights plus encoder tensors)."""
    torch.manual_seed(0)
    widths = (16, 8, 8, 8)
    ref = reference_decoder(widths).eval()
    with torch.no_grad():
        ref[22].bias += 0.5  # outputs around mid-grey: few clamped pixels, so errors show
    sd = {f"decoder.{k}": v.contiguous() for k, v in ref.state_dict().items()}
    sd["encoder.0.weight"] = torch.randn(64, 3, 3, 3)  # present in real files, not used
    path = tmp_path_factory.mktemp("tae") / "taew2_1.safetensors"
    save_file(sd, str(path))
    return ref, path


def test_matches_reference_whole_video(checkpoint):
    ref, path = checkpoint
    tae = load_tae(path)
    assert tae.cfg == TAEConfig(widths=(16, 8, 8, 8)) and not tae.need_scaled
    z = torch.randn(1, 16, 4, 3, 5)
    out = tae.decode(z)
    want = reference_decode(ref, z)
    assert out.shape == (1, 3, 13, 24, 40) and out.dtype == torch.float32
    assert _rel(out, want) < 1e-5
    assert ((out > -1) & (out < 1)).float().mean() > 0.5  # the comparison sees unclamped pixels
    for chunk in (1, 2, 3, 4):  # streamed: each MemBlock carries its last input frame across chunks
        assert _rel(tae.decode(z, chunk=chunk), want) < 1e-5


def test_single_latent_frame_and_batch(checkpoint):
    ref, path = checkpoint
    tae = load_tae(path)
    z = torch.randn(2, 16, 1, 2, 3)
    out = tae.decode(z)
    assert out.shape == (2, 3, 1, 16, 24)
    for b in range(2):
        assert _rel(out[b:b + 1], reference_decode(ref, z[b:b + 1])) < 1e-5


def test_causal_prefix(checkpoint):
    """The first k latents decode to the first 4k-3 frames of the whole video's decode."""
    _, path = checkpoint
    tae = load_tae(path)
    z = torch.randn(1, 16, 5, 2, 2)
    full = tae.decode(z)
    assert _rel(tae.decode(z[:, :, :2]), full[:, :, :5]) < 1e-5


def test_need_scaled_follows_key_then_file_name(checkpoint, tmp_path):
    ref, path = checkpoint
    z = torch.randn(1, 16, 2, 2, 3)
    light = tmp_path / "lighttaew2_1.safetensors"
    light.write_bytes(path.read_bytes())
    tae = load_tae(light)
    assert tae.need_scaled
    assert _rel(tae.decode(z), reference_decode(ref, z, raw=True)) < 1e-5
    assert not load_tae(light, need_scaled=False).need_scaled
    assert load_tae(path, need_scaled=True).need_scaled
    assert _rel(load_tae(path).decode(z), reference_decode(ref, z, raw=True)) > 1e-2


def test_bf16_close_to_fp32(checkpoint):
    _, path = checkpoint
    z = torch.randn(1, 16, 3, 3, 4)
    a = load_tae(path).decode(z)
    b = load_tae(path, dtype=torch.bfloat16).decode(z)
    assert b.dtype == torch.float32 and _rel(b, a) < 3e-2


def test_full_size_layout():
    """taew2_1's decoder: widths 256/128/64/64, 64 tensors, TGrow weights [n*s, n, 1, 1], no bias on 8/14/20."""
    with torch.device("meta"):
        m = TinyDecoder()
    sd = m.state_dict()
    assert len(sd) == 64
    assert sd["decoder.1.weight"].shape == (256, 16, 3, 3)
    assert sd["decoder.3.conv.0.weight"].shape == (256, 512, 3, 3)
    assert sd["decoder.7.conv.weight"].shape == (256, 256, 1, 1)
    assert sd["decoder.13.conv.weight"].shape == (256, 128, 1, 1)
    assert sd["decoder.19.conv.weight"].shape == (128, 64, 1, 1)
    assert sd["decoder.22.weight"].shape == (3, 64, 3, 3)
    assert not any(k in sd for k in ("decoder.8.bias", "decoder.14.bias", "decoder.20.bias"))
    ref = reference_decoder((256, 128, 64, 64)).state_dict()
    assert {f"decoder.{k}": v.shape for k, v in ref.items()} == {k: v.shape for k, v in sd.items()}


def test_bad_checkpoints_named(checkpoint, tmp_path):
    ref, path = checkpoint
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_tae(tmp_path / "nope.pth")
    sd = {f"decoder.{k}": v.contiguous() for k, v in ref.state_dict().items()}
    wan22 = dict(sd, **{"decoder.1.weight": torch.randn(16, 48, 3, 3)})
    save_file(wan22, str(tmp_path / "taew2_2.safetensors"))
    with pytest.raises(ValueError, match="48 is Wan2.2"):
        load_tae(tmp_path / "taew2_2.safetensors")
    missing = {k: v for k, v in sd.items() if k != "decoder.10.conv.2.bias"}
    save_file(missing, str(tmp_path / "m.safetensors"))
    with pytest.raises(ValueError, match="decoder.10.conv.2.bias"):
        load_tae(tmp_path / "m.safetensors")
    save_file(dict(sd, extra=torch.zeros(1)), str(tmp_path / "x.safetensors"))
    with pytest.raises(KeyError, match="extra"):
        load_tae(tmp_path / "x.safetensors")
    save_file({"model.weight": torch.zeros(1)}, str(tmp_path / "y.safetensors"))
    with pytest.raises(KeyError, match="not a TAEHV"):
        load_tae(tmp_path / "y.safetensors")
    with pytest.raises(ValueError, match="expects latents"):
        load_tae(path).decode(torch.zeros(1, 4, 2, 2, 2))


def test_random_tae_deterministic():
    a = random_tae(TAEConfig.tiny(), seed=3)
    b = random_tae(TAEConfig.tiny(), seed=3)
    z = torch.randn(1, 16, 2, 2, 2)
    assert torch.equal(a.decode(z), b.decode(z))
    assert not torch.equal(a.decode(z), random_tae(TAEConfig.tiny(), seed=4).decode(z))


@pytest.mark.gpu
def test_cuda_matches_cpu(checkpoint):
    ref, path = checkpoint
    z = torch.randn(1, 16, 5, 6, 10)
    want = reference_decode(ref, z)
    for dtype, tol in ((torch.float32, 1e-3), (torch.bfloat16, 3e-2)):
        tae = load_tae(path, device="cuda", dtype=dtype)
        assert tae.memory_format == torch.channels_last
        for chunk in (None, 2):
            assert _rel(tae.decode(z.cuda(), chunk=chunk).cpu(), want) < tol


# ---------------------------------------------------------------- in the pipeline (LightX2V's keys)

def _folder_with(src, dst, **files):
    import shutil
    shutil.copytree(src, dst)
    for name, source in files.items():
        (dst / name).write_bytes(source.read_bytes())
    return dst


_RUN = {"target_video_length": 9, "target_height": 32, "target_width": 48}


@pytest.mark.usefixtures("torch_ops")
def test_t2v_with_use_tae_decodes_with_the_tiny_decoder(checkpoint, t2v_folder, tmp_path):
    from lightx2v_engine.pipeline import VAE_FILE, Pipeline
    from lightx2v_engine.video import video_to_uint8
    ref, path = checkpoint
    folder = _folder_with(t2v_folder, tmp_path / "m", **{"taew2_1.safetensors": path})
    (folder / VAE_FILE).unlink()  # T2V with the tiny decoder loads no Wan VAE
    pipe = Pipeline.load(folder, {**_RUN, "use_tae": True}, device="cpu")
    assert pipe.vae is None and pipe.tae is not None and not pipe.tae.need_scaled
    out = pipe.generate("a red fox", seed=3)
    assert out.frames.shape == (9, 32, 48, 3)
    want = video_to_uint8(reference_decode(ref, out.latents[None].float()))
    assert (out.frames.int() - want.int()).abs().max() <= 1
    # the same latents through the Wan VAE give another video
    plain = Pipeline.load(t2v_folder, _RUN, device="cpu")
    assert torch.equal(plain.generate("a red fox", seed=3).latents, out.latents)
    assert not torch.equal(plain.decode(out.latents), out.frames)


@pytest.mark.usefixtures("torch_ops")
def test_tae_path_and_need_scaled_keys(checkpoint, t2v_folder, tmp_path):
    from lightx2v_engine.pipeline import Pipeline
    from lightx2v_engine.video import video_to_uint8
    ref, path = checkpoint
    light = tmp_path / "elsewhere" / "lighttaew2_1.pth"
    light.parent.mkdir()
    torch.save(load_tae(path).state_dict(), light)
    pipe = Pipeline.load(t2v_folder, {**_RUN, "use_tae": True, "tae_path": str(light)}, device="cpu")
    assert pipe.tae.need_scaled  # a lighttae file: raw latents, as LightX2V's enable_lightvae sets
    z = torch.randn(16, 3, 4, 6)
    assert torch.equal(pipe.decode(z), video_to_uint8(pipe.tae.decode(z[None])))
    assert (pipe.decode(z).int() - video_to_uint8(reference_decode(ref, z[None], raw=True)).int()).abs().max() <= 1
    off = Pipeline.load(t2v_folder, {**_RUN, "use_tae": True, "tae_path": str(light), "need_scaled": False},
                        device="cpu")
    assert not off.tae.need_scaled
    with pytest.raises(FileNotFoundError, match=r"none of \['taew2_1.pth', 'taew2_1.safetensors'\] found.*tae_path"):
        Pipeline.load(t2v_folder, {**_RUN, "use_tae": True}, device="cpu")
    with pytest.raises(FileNotFoundError, match="'tae_path' = 'nope.pth'"):
        Pipeline.load(t2v_folder, {**_RUN, "use_tae": True, "tae_path": "nope.pth"}, device="cpu")


@pytest.mark.usefixtures("torch_ops")
def test_i2v_with_use_tae_encodes_with_the_wan_vae(checkpoint, i2v_folder, tmp_path):
    from PIL import Image

    from lightx2v_engine.pipeline import Pipeline
    _, path = checkpoint
    folder = _folder_with(i2v_folder, tmp_path / "m", **{"taew2_1.safetensors": path})
    pipe = Pipeline.load(folder, {**_RUN, "use_tae": True}, device="cpu", task="i2v")
    assert pipe.vae is not None and pipe.tae is not None
    image = Image.fromarray((torch.rand(40, 56, 3) * 255).to(torch.uint8).numpy())
    out = pipe.generate("a red fox", image=image, seed=1)
    assert out.frames.shape[0] == 9


@pytest.mark.usefixtures("torch_ops")
def test_use_lightvae_loads_the_pruned_vae(t2v_folder, tmp_path):
    from lightx2v_engine.pipeline import Pipeline
    from lightx2v_engine.vae import VAEConfig
    from lightx2v_engine.vae import random_vae as random_wan_vae
    folder = tmp_path / "m"
    _folder_with(t2v_folder, folder)
    light = random_wan_vae(VAEConfig(dim=4), seed=2)
    torch.save(light.state_dict(), folder / "lightvaew2_1.pth")
    pipe = Pipeline.load(folder, {**_RUN, "use_lightvae": True}, device="cpu")
    assert pipe.vae.cfg.dim == 4 and pipe.tae is None
    z = torch.randn(16, 2, 4, 6)
    assert torch.equal(pipe.decode(z), Pipeline.load(folder, {**_RUN, "vae_path": "lightvaew2_1.pth"},
                                                     device="cpu").decode(z))
    # vae_path wins over the default name; a full-width file under use_lightvae runs, with a warning
    assert Pipeline.load(folder, {**_RUN, "use_lightvae": True, "vae_path": "Wan2.1_VAE.pth"},
                         device="cpu").vae.cfg.dim == 8
    from lightx2v_engine.config import parse_run_config
    from lightx2v_engine.pipeline import _check_light_vae
    from lightx2v_engine.vae import WanVAE
    with torch.device("meta"):
        full = WanVAE(VAEConfig.wan21())
    with pytest.warns(UserWarning, match="use_lightvae: Wan2.1_VAE.pth is a full-width Wan VAE"):
        _check_light_vae(parse_run_config({"use_lightvae": True}), full, Path("Wan2.1_VAE.pth"))
    (folder / "lightvaew2_1.pth").unlink()
    with pytest.raises(FileNotFoundError, match=r"none of \['lightvaew2_1.pth', 'lightvaew2_1.safetensors'\]"):
        Pipeline.load(folder, {**_RUN, "use_lightvae": True}, device="cpu")


def test_random_weights_with_light_autoencoders():
    from lightx2v_engine.pipeline import Pipeline
    pipe = Pipeline.random("tiny", {**_RUN, "use_tae": True}, device="cpu")
    assert pipe.vae is None and pipe.tae.cfg == TAEConfig.tiny()
    assert pipe.generate("a red fox").frames.shape == (9, 32, 48, 3)
    assert Pipeline.random("tiny", {**_RUN, "use_lightvae": True}, device="cpu").vae.cfg.dim == 2


@pytest.mark.usefixtures("torch_ops")
def test_lightx2v_api_enable_lightvae(checkpoint, t2v_folder, tmp_path):
    """LightX2VPipeline.enable_lightvae(use_tae=True, tae_path=<lighttae file>) sets need_scaled, as LightX2V."""
    from lightx2v_engine.lightx2v_api import LightX2VPipeline
    from lightx2v_engine.pipeline import Pipeline
    _, path = checkpoint
    light = tmp_path / "lighttaew2_1.safetensors"
    light.write_bytes(path.read_bytes())
    api = LightX2VPipeline(task="t2v", model_path=str(t2v_folder), model_cls="wan2.1_distill", device="cpu")
    api.enable_lightvae(use_tae=True, tae_path=str(light))
    api.create_generator(num_frames=9, height=32, width=48, guidance_scale=1.0)
    assert api.pipeline.tae.need_scaled and api.pipeline.vae is None
    frames = api.generate(seed=4, prompt="a red fox", negative_prompt="", return_result_tensor=True)["video"]
    ref = Pipeline.load(t2v_folder, {**_RUN, "use_tae": True, "tae_path": str(light)}, device="cpu")
    assert torch.equal(frames, ref.generate("a red fox", seed=4).frames.float() / 255)


def test_tgrow_saved_with_more_time_outputs_keeps_the_last(checkpoint, tmp_path):
    """A TGrow weight with more rows than the decoder's (a file saved for a longer time stride, e.g.
    LightX2V's lighttaew2_1 layer 7) loads its last rows, as TAEHV's own loader does."""
    ref, path = checkpoint
    sd = {f"decoder.{k}": v.contiguous() for k, v in ref.state_dict().items()}
    w7 = sd["decoder.7.conv.weight"]  # [16, 16, 1, 1] (stride 1)
    sd["decoder.7.conv.weight"] = torch.cat([torch.randn_like(w7), w7])
    save_file(sd, str(tmp_path / "lighttaew2_1.safetensors"))
    tae = load_tae(tmp_path / "lighttaew2_1.safetensors", need_scaled=False)
    z = torch.randn(1, 16, 2, 2, 3)
    assert _rel(tae.decode(z), reference_decode(ref, z)) < 1e-5
    sd["decoder.7.conv.weight"] = torch.randn(24, 16, 1, 1)  # not a multiple: an error naming it
    save_file(sd, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="decoder.7.conv.weight"):
        load_tae(tmp_path / "bad.safetensors")


def test_weights_changed_in_place_reach_the_subpixel_convs(checkpoint):
    _, path = checkpoint
    a, b = load_tae(path), random_tae(TAEConfig.tiny(), seed=9)
    z = torch.randn(1, 16, 2, 2, 3)
    a.decode(z)  # caches the sub-pixel weights
    a.load_state_dict(b.state_dict())  # copies into the same storage
    assert torch.equal(a.decode(z), b.decode(z))


def test_channels_last_path_on_cpu(checkpoint):
    """The CUDA layout (NHWC activations and weights) run on the CPU: the same video."""
    ref, path = checkpoint
    tae = load_tae(path).use_channels_last()
    z = torch.randn(1, 16, 3, 3, 4)
    for chunk in (None, 1):
        assert _rel(tae.decode(z, chunk=chunk), reference_decode(ref, z)) < 1e-5


def test_tiny_decoder_is_not_spread_over_ranks():
    """Multi-GPU with vae_parallel: the tiny decoder runs on rank 0 alone (no tiles to share)."""
    from types import SimpleNamespace

    from lightx2v_engine.pipeline import Pipeline
    par = SimpleNamespace(config=SimpleNamespace(vae_parallel=True))
    plain = Pipeline.random("tiny", _RUN, device="cpu")
    plain.parallel = par
    assert plain._decode_everywhere()
    tae = Pipeline.random("tiny", {**_RUN, "use_tae": True}, device="cpu")
    tae.parallel = par
    assert not tae._decode_everywhere()


def test_tae_keys_without_use_tae_warn():
    from lightx2v_engine.config import parse_run_config
    with pytest.warns(UserWarning, match="tae_path, need_scaled have no effect without use_tae"):
        parse_run_config({"tae_path": "taew2_1.pth", "need_scaled": True})


def test_tiling_with_the_tiny_decoder_is_said_not_to_apply():
    from lightx2v_engine.config import parse_run_config
    with pytest.warns(UserWarning, match="use_tiling_vae does not apply to the tiny decoder"):
        parse_run_config({"use_tae": True, "use_tiling_vae": True})


@pytest.mark.parametrize("shape", [(1, 16, 0, 2, 2), (1, 16, 2, 0, 4), (1, 16, 2, 4, 0)])
def test_empty_latents_are_named(shape):
    """No frames, or a latent height/width of 0: a ValueError naming the shape (a ZeroDivisionError in the
    chunk size for h or w 0), as WanVAE.decode says."""
    with pytest.raises(ValueError, match=r"latents \(1, 16, \d, \d, \d\) are empty"):
        random_tae(TAEConfig.tiny()).decode(torch.zeros(shape))
