"""Triton 8-bit GEMM with rowwise scales and fused epilogue (kernels/fp8_gemm.py) vs its fp32 reference.

The quantized operands are exact inputs, so the kernel and the reference differ only by fp32 summation order
(fp32 outputs: rtol 1e-5) and by the final rounding (bf16 outputs: at most one bf16 ulp; the CPU interpreter
rounds fp32 -> bf16 by truncation).
"""
import pytest
import torch

from lightx2v_engine import quant
from lightx2v_engine.kernels.fp8_gemm import fp8_gemm, scaled_gemm_ref

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _operands(m, n, k, scheme, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(torch.bfloat16)
    w = torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g)
    a, sa = quant.per_token_quant_ref(x, scheme)
    b, sb = quant.quantize_weight(w, scheme)
    bias = torch.randn(n, generator=g).to(torch.bfloat16)
    res = torch.randn(m, n, generator=g)
    gate = torch.randn(1, n, generator=g)
    return [t.to(DEV) for t in (a, sa, b, sb, bias, res, gate)]


def _assert_close(out, ref):
    assert out.dtype == ref.dtype and out.shape == ref.shape
    if out.dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)
    else:  # one bf16 ulp: 2^-7 relative
        err = (out.float() - ref.float()).abs()
        bound = ref.float().abs() * 2.0 ** -7 + 1e-3
        assert (err <= bound).all(), (err / bound).max()


@pytest.mark.parametrize("scheme", ["fp8", "int8"])
@pytest.mark.parametrize("m,n,k", [(37, 40, 72), (5, 48, 160), (64, 80, 96), (1, 16, 32)])
@pytest.mark.parametrize("epilogue", ["none", "bias", "gate_residual_f32", "gate_residual_bf16", "residual_only"])
def test_fp8_gemm_matches_reference(scheme, m, n, k, epilogue):
    a, sa, b, sb, bias, res, gate = _operands(m, n, k, scheme, seed=m + n + k)
    kw = {"none": {}, "bias": dict(bias=bias),
          "gate_residual_f32": dict(bias=bias, residual=res, gate=gate),
          "gate_residual_bf16": dict(bias=bias, residual=res.to(torch.bfloat16), gate=gate),
          "residual_only": dict(residual=res)}[epilogue]
    out = fp8_gemm(a, b, sa, sb.t(), **kw)  # scale_b given as [1, N]
    ref = scaled_gemm_ref(a, b, sa, sb, **kw)
    _assert_close(out, ref)
    if "residual" in kw:  # the epilogue really adds the residual (a wrong one fails the same check)
        with pytest.raises(AssertionError):
            _assert_close(out, scaled_gemm_ref(a, b, sa, sb, **{**kw, "residual": kw["residual"] * 0}))


def test_fp8_gemm_reference_is_the_linear():
    """scaled_gemm_ref of quantized operands approximates the float linear (it is not a tautology)."""
    torch.manual_seed(0)
    x, w, bias = torch.randn(33, 96), torch.randn(40, 96), torch.randn(40)
    a, sa = quant.per_token_quant_ref(x, "fp8")
    b, sb = quant.quantize_weight(w, "fp8")
    y = scaled_gemm_ref(a, b, sa, sb, bias=bias, out_dtype=torch.float32)
    ref = x @ w.t() + bias
    assert ((y - ref).norm() / ref.norm()).item() < 0.05


def test_fp8_gemm_rejects_bad_inputs():
    a, sa, b, sb, bias, res, gate = _operands(8, 16, 32, "fp8")
    with pytest.raises(ValueError, match=r"\[M, K\] and b \[N, K\]"):
        fp8_gemm(a, b[:, :16], sa, sb)
    with pytest.raises(ValueError, match="float8_e4m3fn or int8"):
        fp8_gemm(a.float(), b, sa, sb)
    with pytest.raises(ValueError, match="scale_b N=16"):
        fp8_gemm(a, b, sa, sb[:8])
    with pytest.raises(ValueError, match=r"residual must be \[M, N\]"):
        fp8_gemm(a, b, sa, sb, residual=res.t())


@pytest.mark.gpu
@pytest.mark.parametrize("scheme", ["fp8", "int8"])
@pytest.mark.parametrize("k,n", [(1536, 1536), (8960, 1536)])
def test_fp8_gemm_cuda_wan_shapes(scheme, k, n):
    m = 4099
    a, sa, b, sb, bias, res, gate = _operands(m, n, k, scheme)
    out = fp8_gemm(a, b, sa, sb, bias=bias, residual=res, gate=gate)
    ref = scaled_gemm_ref(a, b, sa, sb, bias=bias, residual=res, gate=gate)
    # Hopper fp8 fast accumulation is not plain fp32 summation: relative L2 error bound instead
    rel = ((out - ref).norm() / (ref - res).norm()).item()
    assert rel < 5e-3, rel
    plain = fp8_gemm(a, b, sa, sb, bias=bias)
    if scheme == "fp8":
        lib = torch._scaled_mm(a, b.t(), scale_a=sa, scale_b=sb.t(), bias=bias, out_dtype=torch.bfloat16,
                               use_fast_accum=True)
        assert ((plain.float() - lib.float()).norm() / lib.float().norm()).item() < 5e-3


def test_scaled_gemm_custom_op():
    """torch.ops.lightx2v.scaled_gemm: schema and fake (meta) implementation agree with the real op."""
    from lightx2v_engine.kernels.fp8_gemm import scaled_gemm
    a, sa, b, sb, bias, res, gate = _operands(19, 32, 64, "fp8")
    torch.library.opcheck(scaled_gemm, (a, b, sa, sb, bias, res, gate, torch.float32),
                          test_utils=("test_faketensor",))
    out = torch.ops.lightx2v.scaled_gemm(a, b, sa, sb, None, None, None, torch.bfloat16)
    _assert_close(out, scaled_gemm_ref(a, b, sa, sb))
