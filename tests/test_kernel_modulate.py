"""Fused LayerNorm-modulate kernels (kernels/modulate.py) vs fp32 references.

Rule: max |kernel - fp32 ref| <= FACTOR * max |PyTorch low-precision - fp32 ref| + atol. The CPU interpreter
casts fp32 -> bf16 by truncation (not round-to-nearest as the GPU does), so bf16 outputs on CPU get
FACTOR 3; everything else, and all GPU runs, use 2.
"""
import pytest
import torch
import torch.nn.functional as F

from lightx2v_engine.kernels import gate_residual_modulate, modulate
from lightx2v_engine.ops import gate_residual_modulate_ref, modulate_ref

EPS = 1e-6


def _factor(dtype, device):
    return 3.0 if (dtype == torch.bfloat16 and device == "cpu") else 2.0


def _assert_rule(out, ref32, lowp, factor, atol=1e-3):
    err = (out.float() - ref32).abs().max().item()
    base = (lowp.float() - ref32).abs().max().item()
    assert err <= factor * base + atol, f"kernel err {err:.3e} > {factor} x torch low-precision err {base:.3e} + {atol}"


def _mod_views(B, C, device):
    # exactly as the model makes them: (modulation + e0).chunk(6, dim=1) of a [B, 6, C] fp32 tensor
    modulation = torch.randn(1, 6, C, device=device) / C ** 0.5
    e0 = torch.randn(B, 6, C, device=device)
    return (modulation + e0).chunk(6, dim=1)


def _lowp_modulate(x, shift, scale, dtype):
    xl = x.to(dtype)
    return F.layer_norm(xl, (x.shape[-1],), eps=EPS) * (1 + scale.to(dtype)) + shift.to(dtype)


def _run_modulate(B, L, C, x_dtype, out_dtype, device):
    torch.manual_seed(0)
    shift, scale, gate, *_ = _mod_views(B, C, device)
    assert shift.stride() == (6 * C, C, 1)
    x = (torch.randn(B, L, C, device=device) * 2 + 0.5).to(x_dtype)
    out = modulate(x, shift, scale, EPS, out_dtype)
    assert out.shape == (B, L, C) and out.dtype == out_dtype
    ref32 = modulate_ref(x.float(), shift, scale, EPS, torch.float32)
    lowp = _lowp_modulate(x, shift, scale, torch.bfloat16 if out_dtype == torch.float32 else out_dtype)
    _assert_rule(out, ref32, lowp, _factor(out_dtype, device))
    if out_dtype == torch.float32:  # fp32 math throughout: equal to the reference up to fp32 rounding
        torch.testing.assert_close(out, ref32, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("B, L, C", [(1, 77, 384), (2, 33, 320)])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_modulate(B, L, C, x_dtype, out_dtype):
    _run_modulate(B, L, C, x_dtype, out_dtype, "cpu")


def _run_gate_residual(B, L, C, x_dtype, out_dtype, device):
    torch.manual_seed(1)
    shift, scale, gate, shift2, scale2, gate2 = _mod_views(B, C, device)
    x = (torch.randn(B, L, C, device=device) * 3).to(x_dtype)
    y = torch.randn(B, L, C, device=device).to(torch.bfloat16)
    x0, y0 = x.clone(), y.clone()
    x_new, out = gate_residual_modulate(x, y, gate, shift2, scale2, EPS, out_dtype)
    assert torch.equal(x, x0) and torch.equal(y, y0), "inputs were mutated"
    assert x_new.dtype == x_dtype and out.dtype == out_dtype
    # the residual: x + gate * y in fp32, one rounding to x's dtype
    x_ref = gate_residual_modulate_ref(x, y, gate, shift2, scale2, EPS)[0]
    x_lowp = (x.to(torch.bfloat16) + y * gate.to(torch.bfloat16)).float()
    _assert_rule(x_new, (x.float() + y.float() * gate), x_lowp, _factor(x_dtype, device), atol=1e-6)
    if x_dtype == torch.float32:
        torch.testing.assert_close(x_new, x_ref, atol=1e-5, rtol=1e-6)
    # the modulation reads the stored x'
    ref32 = modulate_ref(x_new.float(), shift2, scale2, EPS, torch.float32)
    lowp = _lowp_modulate(x_new, shift2, scale2, torch.bfloat16 if out_dtype == torch.float32 else out_dtype)
    _assert_rule(out, ref32, lowp, _factor(out_dtype, device))


@pytest.mark.parametrize("B, L, C", [(1, 77, 384), (2, 19, 320)])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_gate_residual_modulate(B, L, C, x_dtype, out_dtype):
    _run_gate_residual(B, L, C, x_dtype, out_dtype, "cpu")


def test_bad_shapes_raise():
    x = torch.randn(1, 5, 64)
    shift = torch.randn(1, 1, 32)
    with pytest.raises(ValueError, match="shift must be"):
        modulate(x, shift, shift)
    with pytest.raises(ValueError, match="unit stride"):
        modulate(x.transpose(1, 2), torch.randn(1, 1, 5), torch.randn(1, 1, 5))


def test_opcheck_and_compile():
    torch.manual_seed(0)
    shift, scale, gate, *_ = _mod_views(1, 64, "cpu")
    x = torch.randn(1, 9, 64)
    y = torch.randn(1, 9, 64).bfloat16()
    torch.library.opcheck(torch.ops.lightx2v.modulate.default, (x, shift, scale, EPS, torch.bfloat16),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.lightx2v.gate_residual_modulate.default,
                          (x, y, gate, shift, scale, EPS, torch.bfloat16), test_utils=("test_schema", "test_faketensor"))

    def block(x, y, mod):
        sh, sc, g, sh2, sc2, _ = mod.chunk(6, dim=1)
        h = modulate(x, sh, sc, EPS, torch.bfloat16)
        return gate_residual_modulate(x, h * 0.5 + y, g, sh2, sc2, EPS, torch.bfloat16)

    mod = torch.randn(1, 6, 64)
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    got = compiled(x, y, mod)
    want = block(x, y, mod)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.gpu
@pytest.mark.parametrize("C", [1536, 5120])
def test_modulate_gpu_real_shapes(C):
    _run_modulate(1, 32760, C, torch.float32, torch.bfloat16, "cuda")
    _run_modulate(1, 32760, C, torch.bfloat16, torch.bfloat16, "cuda")
    _run_gate_residual(1, 32760, C, torch.float32, torch.bfloat16, "cuda")


def test_import_without_triton_is_a_clean_importerror():
    import subprocess
    import sys
    code = ("import sys; sys.modules['triton'] = None\n"
            "try:\n    import lightx2v_engine.kernels\nexcept ImportError as e:\n    print('IMPORTERROR', e)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "IMPORTERROR lightx2v_engine.kernels needs triton" in res.stdout, res.stdout + res.stderr
