"""kernels/rms_norm.py against its reference (CPU via TRITON_INTERPRET=1; real shapes on GPU)."""
import pytest
import torch

from lightx2v_engine.kernels.rms_norm import rms_norm
from lightx2v_engine.ops import rms_norm_ref


def _check(x, w, eps=1e-6, factor=2.0, atol=1e-6):
    out = rms_norm(x, w, eps)
    assert out.shape == x.shape and out.dtype == x.dtype
    ref32 = rms_norm_ref(x.double(), w.double(), eps).float()   # exact reference
    low = rms_norm_ref(x, w, eps).float()                        # PyTorch in the low precision
    err = (out.float() - ref32).abs().max().item()
    base = (low - ref32).abs().max().item()
    assert err <= factor * base + atol, (err, base)


# the interpreter rounds fp32 -> bf16 by truncation (not to nearest): looser factor for bf16 on CPU
@pytest.mark.parametrize("dtype,factor", [(torch.float32, 2.0), (torch.float16, 2.0), (torch.bfloat16, 3.0)])
@pytest.mark.parametrize("shape", [(1, 77, 384), (2, 5, 96), (3, 1000), (7, 130)])
def test_rms_norm_matches_reference(dtype, factor, shape):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g) * 3).to(dtype)
    w = 1 + 0.3 * torch.randn(shape[-1], generator=g)
    if torch.cuda.is_available():
        x, w, factor = x.cuda(), w.cuda(), 2.0
    _check(x, w, factor=factor)


DEV = "cuda" if torch.cuda.is_available() else "cpu"


def test_rms_norm_strided_rows_and_errors():
    x = torch.randn(2, 9, 64, dtype=torch.float16, device=DEV)[:, ::2]  # rows not evenly viewable: reshape copies
    w = torch.ones(64, device=DEV)
    _check(x, w)
    with pytest.raises(ValueError, match="unit stride"):
        rms_norm(torch.randn(64, 8, device=DEV).t(), torch.ones(64, device=DEV))
    with pytest.raises(ValueError, match="weight"):
        rms_norm(torch.randn(4, 8, device=DEV), torch.ones(9, device=DEV))


def test_rms_norm_traces():
    f = torch.compile(lambda x, w: rms_norm(x, w) * 2, fullgraph=True, backend="aot_eager")
    x, w = torch.randn(3, 40, dtype=torch.float16, device=DEV), torch.rand(40, device=DEV)
    assert torch.equal(f(x, w), rms_norm(x, w) * 2)


@pytest.mark.gpu
@pytest.mark.parametrize("C", [1536, 5120])
def test_rms_norm_gpu_real_shape(C):
    x = torch.randn(1, 32760, C, device="cuda", dtype=torch.bfloat16) * 2
    w = 1 + 0.1 * torch.randn(C, device="cuda")
    _check(x, w)


@pytest.mark.parametrize("shape", [(2, 5, 0), (0, 64), (2, 0, 64)])
def test_rms_norm_empty(shape):
    """No rows or no channels: an empty result of x's shape (C = 0 failed in reshape(-1, 0))."""
    out = rms_norm(torch.randn(shape, device=DEV).half(), torch.ones(shape[-1], device=DEV))
    assert out.shape == shape and out.dtype == torch.float16
