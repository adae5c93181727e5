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
    # an `out` of dense channel rows whose pixels run in another order than x's: not one offset for both
    xc = torch.randn(1, 4, 2, 3, 8, device=DEVICE).contiguous(memory_format=CL)
    other = torch.empty(1, 8, 3, 2, 4, device=DEVICE).permute(0, 4, 3, 2, 1)  # [1, 4, 2, 3, 8], W slowest
    assert vae_norm.pixel_rows(other) is not None and not vae_norm.supports(xc, other)
    assert vae_norm.supports(xc, torch.empty_like(xc))


def test_nan_pixels_stay_nan():
    """A pixel with a NaN channel comes out NaN (as F.normalize's), not huge values from a max() that drops
    the NaN (Triton's default on a GPU; the interpreter propagates it either way)."""
    x = torch.randn(1, 8, 1, 2, 2, device=DEVICE).contiguous(memory_format=CL)
    x[0, 3, 0, 1, 1] = float("nan")
    y = vae_norm.rms_norm_act(x, torch.ones(8, 1, 1, 1, device=DEVICE), False)
    assert y[0, :, 0, 1, 1].isnan().all() and torch.isfinite(y[0, :, 0, 0]).all()


_AOT_SCRIPT = r'''
import json, os, re, subprocess, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from lightx2v_engine.kernels import vae_norm as V
PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
out = {}
for dt in ("bf16", "fp32"):
    for c in (8, 96, 192, 384):
        block_c, block_p = V._blocks(c, 1 << 20)
        for silu in (False, True):
            fn = V._rms_norm_act_kernel
            consts = dict(SILU=silu, BLOCK_P=block_p, BLOCK_C=block_c)
            types = dict(X="*" + dt, G="*" + dt, Y="*" + dt, scale="fp32", eps="fp32")
            sig = {n: "constexpr" if n in consts else types.get(n, "i32") for n in fn.arg_names}
            attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if sig[n].startswith("*")}
            k = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                               options=dict(num_warps=V.NUM_WARPS))
            with tempfile.TemporaryDirectory() as d:
                open(os.path.join(d, "k.ptx"), "w").write(k.asm["ptx"])
                err = subprocess.run([PTXAS, "-v", "--gpu-name=sm_90a", os.path.join(d, "k.ptx"), "-o",
                                      os.path.join(d, "k.cubin")], capture_output=True, text=True).stderr
            out[f"{dt}/C={c}/silu={silu}"] = sum(int(x) for x in re.findall(r"(\d+) bytes spill stores", err))
print("AOT" + json.dumps(out))
'''


def test_kernel_compiles_for_sm90_without_spills():
    """Builds the kernel for sm_90a (Triton's bundled ptxas, no GPU needed) at the VAE's channel counts."""
    import json
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    line = next((ln for ln in res.stdout.splitlines() if ln.startswith("AOT")), None)
    assert line is not None, res.stdout[-3000:] + res.stderr[-3000:]
    spills = json.loads(line[3:])
    assert len(spills) == 16 and not any(spills.values()), spills


@pytest.mark.parametrize("shape", [(0, 8, 2, 3, 4), (1, 8, 0, 3, 4)])
def test_empty_batch_or_frames(shape):
    """B = 0 indexed x[0, 0] (IndexError); no pixels: an empty result as the reference's."""
    x = torch.randn(shape, device=DEVICE).contiguous(memory_format=CL)
    y = vae_norm.rms_norm_act(x, torch.ones(8, 1, 1, 1, device=DEVICE), True)
    assert y.shape == x.shape and y.numel() == 0
