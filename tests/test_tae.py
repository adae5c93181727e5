"""Tiny autoencoder (TAEHV taew2_1 layout) against a literal whole-video formulation written here.

The reference follows the published TAEHV decoder layer by layer in its own order (nearest upsample, then the
TGrow 1x1 conv at the high resolution, then a plain 3x3 conv; MemBlocks on the whole video with the input
shifted by one frame; the first 3 frames trimmed), on a state dict in the checkpoint's key layout. The engine
runs it reordered (TGrow before the upsample, sub-pixel convs) and streamed in chunks of frames.
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from lightx2v_engine.tae import TAEConfig, TinyDecoder, load_tae, random_tae
from lightx2v_engine.vae import WAN21_LATENT_MEAN, WAN21_LATENT_STD


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


def reference_decode(dec, z, raw=False):
    """z [1, 16, F, h, w] -> [1, 3, 4F-3, 8h, 8w] in [-1, 1] (TAEHV decode_video, then x2 - 1)."""
    if raw:
        z = z * torch.tensor(WAN21_LATENT_STD).view(1, 16, 1, 1, 1) + torch.tensor(WAN21_LATENT_MEAN).view(1, 16, 1, 1, 1)
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
