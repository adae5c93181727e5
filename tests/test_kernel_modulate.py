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


def _bits(q):
    return q.view(torch.uint8) if q.dtype == torch.float8_e4m3fn else q


def _run_quant(B, L, C, x_dtype, round_dtype, scheme, device, nan_row=None):
    """modulate_quant / gate_residual_modulate_quant against the two-pass path they replace (our modulate
    kernel, then the quantization: quant.per_token_quant, the csrc kernel on CUDA, its bit-exact reference
    on CPU): equal to the bit; and dequantized, against fp32 within the quantization's own error."""
    from lightx2v_engine.kernels import gate_residual_modulate_quant, modulate_quant
    from lightx2v_engine.quant import per_token_quant
    torch.manual_seed(2)
    shift, scale, gate, shift2, scale2, _ = _mod_views(B, C, device)
    x = (torch.randn(B, L, C, device=device) * 2 + 0.5).to(x_dtype)
    y = torch.randn(B, L, C, device=device).to(round_dtype if round_dtype != torch.float32 else torch.bfloat16)
    if nan_row is not None:
        x.view(-1, C)[nan_row, C // 3] = float("nan")
    q, qs = modulate_quant(x, shift, scale, EPS, round_dtype, scheme)
    assert q.shape == (B, L, C) and qs.shape == (B * L, 1) and qs.dtype == torch.float32
    h = modulate(x, shift, scale, EPS, round_dtype)
    q2, qs2 = per_token_quant(h.reshape(-1, C), scheme)
    x_new, qg, qgs = gate_residual_modulate_quant(x, y, gate, shift2, scale2, EPS, round_dtype, scheme)
    x_new2, hg = gate_residual_modulate(x, y, gate, shift2, scale2, EPS, round_dtype)
    qg2, qgs2 = per_token_quant(hg.reshape(-1, C), scheme)
    torch.testing.assert_close(x_new, x_new2, rtol=0, atol=0, equal_nan=True)
    for got, gots, want, wants in ((q, qs, q2, qs2), (qg, qgs, qg2, qgs2)):
        if nan_row is None:
            assert torch.equal(_bits(got.view(-1, C)), _bits(want)), "not the two-pass quantization's bits"
            assert torch.equal(gots, wants)
        else:  # the NaN row's scale is NaN (the GEMM's output row NaN, caught by the NaN checks); the rest exact
            keep = torch.arange(B * L, device=device) != nan_row
            if device == "cuda":  # against the csrc kernel: the NaN row's codes too (e4m3 NaN, int8 0)
                from lightx2v_engine import csrc_ops
                if csrc_ops.csrc_available(torch.device(device)):
                    keep = torch.ones_like(keep)
            assert torch.isnan(gots[nan_row]).all() and torch.isnan(wants[nan_row]).all()
            assert torch.equal(_bits(got.view(-1, C)[keep]), _bits(want[keep]))
            assert torch.equal(gots[keep], wants[keep])
    if nan_row is None:  # dequantized vs fp32: the file's rule against the same quantization done by torch
        ref32 = modulate_ref(x.float(), shift, scale, EPS, torch.float32).reshape(-1, C)
        from lightx2v_engine.quant import per_token_quant_ref
        tq, ts = per_token_quant_ref(modulate_ref(x.float(), shift, scale, EPS, round_dtype).reshape(-1, C), scheme)
        base = (tq.float() * ts - ref32).abs().max().item()
        err = (q.view(-1, C).float() * qs - ref32).abs().max().item()
        assert err <= _factor(round_dtype, device) * base + 1e-6, f"dequantized error {err:.3e} vs torch's {base:.3e}"


@pytest.mark.parametrize("B, L, C, x_dtype, round_dtype", [(1, 77, 384, torch.float32, torch.bfloat16),
                                                          (2, 19, 320, torch.bfloat16, torch.bfloat16),
                                                          (1, 23, 200, torch.float32, torch.float16)])
@pytest.mark.parametrize("scheme", ["fp8", "int8"])
def test_modulate_quant_equals_modulate_then_quant(B, L, C, x_dtype, round_dtype, scheme):
    _run_quant(B, L, C, x_dtype, round_dtype, scheme, "cpu")


@pytest.mark.parametrize("scheme", ["fp8", "int8"])
def test_modulate_quant_nan_row(scheme):
    _run_quant(1, 9, 64, torch.float32, torch.bfloat16, scheme, "cpu", nan_row=4)


def test_modulate_quant_checks_and_opcheck():
    from lightx2v_engine.kernels import modulate_quant
    torch.manual_seed(0)
    shift, scale, gate, *_ = _mod_views(1, 64, "cpu")
    x = torch.randn(1, 9, 64)
    with pytest.raises(ValueError, match="scheme must be 'fp8' or 'int8', got 'fp4'"):
        modulate_quant(x, shift, scale, EPS, torch.bfloat16, "fp4")
    with pytest.raises(ValueError, match="round_dtype"):
        modulate_quant(x, shift, scale, EPS, torch.int8, "fp8")
    with pytest.raises(ValueError, match="shift must be"):
        modulate_quant(x, shift[..., :32], scale, EPS, torch.bfloat16, "fp8")
    y = torch.randn(1, 9, 64).bfloat16()
    for scheme in ("fp8", "int8"):
        torch.library.opcheck(torch.ops.lightx2v.modulate_quant.default, (x, shift, scale, EPS, torch.bfloat16, scheme),
                              test_utils=("test_schema", "test_faketensor"))
        torch.library.opcheck(torch.ops.lightx2v.gate_residual_modulate_quant.default,
                              (x, y, gate, shift, scale, EPS, torch.bfloat16, scheme),
                              test_utils=("test_schema", "test_faketensor"))


@pytest.mark.gpu
@pytest.mark.parametrize("C", [1536, 5120])
@pytest.mark.parametrize("scheme", ["fp8", "int8"])
def test_modulate_quant_gpu_real_shapes(C, scheme):
    """On the GPU the two-pass reference is our modulate kernel + the csrc quantization (when built)."""
    _run_quant(1, 32760, C, torch.float32, torch.bfloat16, scheme, "cuda")
    _run_quant(1, 1001, C, torch.float32, torch.bfloat16, scheme, "cuda", nan_row=500)


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


_AOT_SCRIPT = r'''
import json, os, re, subprocess, tempfile
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import importlib
M = importlib.import_module("lightx2v_engine.kernels.modulate")
PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
out = {}
for c in (1536, 5120):
    block, warps = M._launch_cfg(c)
    for scheme in ("fp8", "int8"):
        for res in (False, True):
            fn = M._modulate_kernel
            consts = dict(HAS_RESIDUAL=res, BLOCK_C=block, QUANT=M._QUANT[scheme], ROUND=1, INTERP=False)
            types = dict(X="*fp32", Y="*bf16", GATE="*fp32", SHIFT="*fp32", SCALE="*fp32", XOUT="*fp32",
                         OUT="*fp8e4nv" if scheme == "fp8" else "*i8", QS="*fp32", eps="fp32")
            sig = {n: "constexpr" if n in consts else types.get(n, "i32") for n in fn.arg_names}
            k = triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 32),
                               options=dict(num_warps=warps))
            ptx = k.asm["ptx"]
            with tempfile.TemporaryDirectory() as d:
                open(os.path.join(d, "k.ptx"), "w").write(ptx)
                err = subprocess.run([PTXAS, "-v", "--gpu-name=sm_90a", os.path.join(d, "k.ptx"), "-o",
                                      os.path.join(d, "k.cubin")], capture_output=True, text=True).stderr
            out[f"C={c}/{scheme}/res={res}"] = dict(
                spills=sum(int(x) for x in re.findall(r"(\d+) bytes spill stores", err)),
                e4m3_rn_satfinite=len(re.findall(r"cvt\.rn\.satfinite\.e4m3x2\.f32", ptx)),
                div_rn=len(re.findall(r"div\.rn\.f32", ptx)),
                rni=len(re.findall(r"cvt\.rni\.f32\.f32", ptx)),
                magic_fma=len(re.findall(r"fma\.rn\.f32[^;]*0f4B400000", ptx)),
                nan_clamps=len(re.findall(r"(?:max|min)\.NaN\.f32", ptx)),
                rni_nan_tested=sum(1 for r in re.findall(r"cvt\.rni\.f32\.f32\s+(%r\d+)", ptx) if re.search(
                    r"setp\.(?:num|nan)\.f32\s+%p\d+,\s*" + r + r",\s*" + r + r"\s*;", ptx)))
print("AOT" + json.dumps(out))
'''


def test_modulate_quant_compiles_for_sm90():
    """The quantizing variants build for sm_90a (Triton's bundled ptxas, no GPU needed) at the 1.3B and 14B
    widths without spills; fp8 rounds with cvt.rn.satfinite (the csrc kernel's conversion) behind NaN-keeping
    clamps, int8 with cvt.rni of the rounded product (__float2int_rn of __fmul_rn: ptxas would contract the
    1.5 * 2^23 rounding trick into an FMA with the product, one rounding instead of two), and both divide
    with div.rn (__fdiv_rn): what the bitwise GPU test relies on."""
    import json
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    line = next((ln for ln in res.stdout.splitlines() if ln.startswith("AOT")), None)
    assert line is not None, res.stdout[-3000:] + res.stderr[-3000:]
    got = json.loads(line[3:])
    assert len(got) == 8, got
    for name, v in got.items():
        assert v["spills"] == 0 and v["div_rn"] >= 2 and v["magic_fma"] == 0, (name, v)
        assert (v["e4m3_rn_satfinite"] > 0) == ("fp8" in name), (name, v)
        # int8: the product rounded to fp32, then to an integer (cvt.rni), never one FMA rounding both
        assert (v["rni"] > 0) == ("int8" in name), (name, v)
        assert "int8" in name or v["nan_clamps"] > 0, (name, v)  # fp8: a NaN stays NaN through the clamps
        # int8: each rounded value is tested for NaN (-> code 0, as the csrc kernel) before the clamps: tested
        # after them, the test was folded away (max.f32 returns -127 for NaN)
        assert "fp8" in name or v["rni_nan_tested"] == v["rni"], (name, v)


def test_ops_take_what_the_references_take():
    """The ops layer on the kernels (backend "kernels", here the interpreter; "auto" on a GPU) takes what the
    references take: [1, 1, C] vectors shared by a batch of B and an x (or y) without unit stride on C
    raised ValueError in the kernel wrappers, while the same call on the CPU worked."""
    from lightx2v_engine import ops
    torch.manual_seed(0)
    B, L, C = 2, 5, 64
    x = torch.randn(B, C, L).transpose(1, 2)            # [B, L, C], stride 1 on L
    y = torch.randn(B, C, L).transpose(1, 2)
    mod = torch.randn(1, 6, C)                          # one modulation row for the batch
    shift, scale, gate = mod[:, 0:1], mod[:, 1:2], mod[:, 2:3]
    w = torch.rand(2 * C)[::2].add_(0.5)                # a strided weight
    assert w.stride() == (2,)
    calls = {
        "modulate": lambda: ops.modulate(x, shift, scale, EPS, torch.float32),
        "gate_residual_modulate": lambda: ops.gate_residual_modulate(x, y, gate, shift, scale, EPS, torch.float32),
        "modulate_quant": lambda: ops.modulate_quant(x, shift, scale, EPS, torch.float32, "int8"),
        "gate_residual_modulate_quant": lambda: ops.gate_residual_modulate_quant(x, y, gate, shift, scale, EPS,
                                                                               torch.float32, "int8"),
        "rms_norm": lambda: ops.rms_norm(x.half(), w, EPS),
    }
    try:
        for name, call in calls.items():
            ops.set_backend("torch")
            ref = call()
            ops.set_backend("kernels")
            out = call()
            ref, out = (ref, out) if isinstance(ref, tuple) else ((ref,), (out,))
            for r, o in zip(ref, out):
                if o.dtype == torch.int8:  # (codes at a rounding tie may differ by one)
                    assert (o.int() - r.int()).abs().max() <= 1, name
                else:
                    torch.testing.assert_close(o.float(), r.float(), rtol=2e-3, atol=2e-3, msg=name)
    finally:
        ops.set_backend("auto")
