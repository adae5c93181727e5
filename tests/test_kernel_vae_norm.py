"""Fused VAE RMSNorm+SiLU kernel against the PyTorch reference (CPU through TRITON_INTERPRET=1)."""
import pytest
import torch

from lightx2v_engine.vae import rms_norm_act_ref

vae_norm = pytest.importorskip("lightx2v_engine.kernels.vae_norm")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CL = torch.channels_last_3d


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b).abs().max().item()


@pytest.mark.parametrize("shape", [(1, 24, 3, 5, 7), (2, 96, 2, 3, 5), (2, 5, 1, 4, 3), (1, 384, 1, 6, 10)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("silu", [True, False])
def test_rms_norm_act_matches_reference(shape, dtype, silu):
    g = torch.Generator().manual_seed(sum(shape))
    b, c, t, h, w = shape
    x = (torch.randn(shape, generator=g) * 3).to(DEVICE, dtype).contiguous(memory_format=CL)
    gamma = (1 + 0.3 * torch.randn(c, 1, 1, 1, generator=g)).to(DEVICE, dtype)
    exact = rms_norm_act_ref(x.double(), gamma.double(), silu)
    # destination: the tail of a causal conv's scratch buffer (batch stride (2+T)*H*W*C)
    buf = torch.full((b, c, 2 + t, h, w), float("nan"), device=DEVICE, dtype=dtype).contiguous(memory_format=CL)
    got = vae_norm.rms_norm_act(x, gamma, silu, out=buf[:, :, 2:])
    assert got.data_ptr() == buf[:, :, 2:].data_ptr()
    assert torch.isnan(buf[:, :, :2].float()).all()  # untouched head
    lowp = rms_norm_act_ref(x, gamma, silu)  # PyTorch in the same dtype
    assert _err(got, exact) <= 2 * _err(lowp, exact) + (1e-5 if dtype == torch.float32 else 1e-2)
    fresh = vae_norm.rms_norm_act(x, gamma, silu)
    assert fresh.is_contiguous(memory_format=CL) and torch.equal(fresh, got)


def test_zero_pixels_stay_zero():
    x = torch.zeros(1, 8, 1, 2, 2, device=DEVICE).contiguous(memory_format=CL)
    y = vae_norm.rms_norm_act(x, torch.ones(8, 1, 1, 1, device=DEVICE), True)
    assert torch.equal(y, torch.zeros_like(y))  # eps 1e-12 as F.normalize: no NaN


def test_layout_checks():
    x = torch.randn(1, 8, 2, 3, 4, device=DEVICE)
    assert not vae_norm.supports(x, None)  # NCDHW: channels are not contiguous
    assert vae_norm.supports(x.contiguous(memory_format=CL), None)
    with pytest.raises(ValueError, match="channels-last"):
        vae_norm.rms_norm_act(x, torch.ones(8, device=DEVICE), True)
    with pytest.raises(ValueError, match="gamma has 4 values"):
        vae_norm.rms_norm_act(x.contiguous(memory_format=CL), torch.ones(4, device=DEVICE), True)
