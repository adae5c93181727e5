"""8-bit attention (kernels/attention_8bit.py): quantisers vs their PyTorch reference, the kernel vs the
same 8-bit computation in PyTorch and vs exact fp32 attention.

Rule (the 8-bit analogue of the 2x rule): rel. L2 error of the kernel vs exact fp32 attention <=
1.25 x that of attention_8bit_ref (the same quantisation done by PyTorch) + 0.005. The kernel rounds P
against its running row max, the reference against the final one, so the two differ by ~1%.
CPU inputs are fp16 (the interpreter's bf16 tl.dot is unusable); the GPU tests run bf16 at real shapes.
"""
import pytest
import torch
import triton
import triton.language as tl

from lightx2v_engine import ops
from lightx2v_engine.kernels import attention_8bit, self_attention
from lightx2v_engine.kernels.attention import self_attention_ref
from lightx2v_engine.kernels._util import interpreting
from lightx2v_engine.kernels.attention_8bit import (ATTN8_CONFIGS, DEFAULT_ATTN8_CONFIG, _to_e4m3, attention_8bit_ref,
                                                    attention_8bit_triton, quantize_qkv, quantize_qkv_ref)
from lightx2v_engine.ops import attention_ref

from dit_fixtures import eager_and_graph_replay, self_attn_inputs


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _exact(q, k, v):
    return torch.cat([attention_ref(q[:, :, h:h + 1].float(), k[:, :, h:h + 1].float(), v[:, :, h:h + 1].float())
                      for h in range(q.shape[2])], dim=2)


def _qkv(B, Lq, Lk, H, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    mk = lambda L: torch.randn(B, L, H, 128, generator=g)  # noqa: E731
    # k with a per-channel offset: what smoothing removes (Wan's k has such channel biases)
    k = mk(Lk) * 1.5 + torch.randn(1, 1, H, 128, generator=g)
    return mk(Lq).to(device, dtype), k.to(device, dtype), mk(Lk).to(device, dtype)


def _assert_rule(out, q, k, v, block_n=128, pv_fp8=True):
    ex = _exact(q, k, v)
    base = _rel(attention_8bit_ref(q, k, v, block_n, pv_fp8), ex)
    err = _rel(out, ex)
    assert err <= 1.25 * base + 0.005, f"8-bit kernel rel. err {err:.4f} > 1.25 x reference {base:.4f} + 0.005"
    assert err < 0.06, f"8-bit attention rel. err {err:.4f} vs exact"


@pytest.mark.parametrize("B, Lq, Lk, H", [(1, 77, 77, 3), (2, 50, 200, 2), (1, 130, 257, 1), (1, 33, 128, 1),
                                          (1, 9, 1, 2)])
def test_quantize_matches_reference(B, Lq, Lk, H):
    q, k, v = _qkv(B, Lq, Lk, H, torch.float16, "cpu")
    got = quantize_qkv(q, k, v, 128)
    want = quantize_qkv_ref(q, k, v, 128)
    names = ("q8", "qs", "k8", "ks", "vt", "vs")
    for name, a, b in zip(names, got, want):
        assert a.shape == b.shape and a.dtype == b.dtype, (name, a.shape, b.shape, a.dtype, b.dtype)
    q8, qs, k8, ks, vt, vs = got
    assert (q8.int() - want[0].int()).abs().max() <= 1 and (k8.int() - want[2].int()).abs().max() <= 1
    torch.testing.assert_close(qs, want[1], rtol=1e-6, atol=0)
    torch.testing.assert_close(ks, want[3], rtol=1e-6, atol=0)
    torch.testing.assert_close(vs, want[5], rtol=1e-6, atol=0)
    # e4m3 values: equal up to one step (2^-3 relative) where a value sits on a rounding tie
    torch.testing.assert_close(vt.float(), want[4].float(), rtol=0.126, atol=2 ** -9)
    assert (vt.float() != want[4].float()).float().mean() < 0.01
    assert (vt.float()[..., Lk:] == 0).all(), "padding past Lk must be zero"
    assert q8.abs().amax(-1).min() >= 126, "every q row uses the int8 range"


@pytest.mark.parametrize("config", list(ATTN8_CONFIGS))
@pytest.mark.parametrize("B, Lq, Lk, H", [(1, 77, 77, 3), (2, 50, 200, 2), (1, 130, 257, 1)])
def test_attention_8bit_configs(config, B, Lq, Lk, H):
    q, k, v = _qkv(B, Lq, Lk, H, torch.float16, "cpu")
    out = attention_8bit_triton(q, k, v, config)
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
    cfg = ATTN8_CONFIGS[config]
    _assert_rule(out, q, k, v, cfg.block_n, cfg.pv_fp8)


def test_pv16_is_more_accurate():
    """INT8 q k^T with P.V in the input dtype: the error is the q/k quantisation's alone."""
    q, k, v = _qkv(1, 130, 257, 2, torch.float16, "cpu")
    ex = _exact(q, k, v)
    e16 = _rel(attention_8bit_triton(q, k, v, "ws_128x128_w4_s2_pv16"), ex)
    e8 = _rel(attention_8bit_triton(q, k, v, "ws_128x128_w4_s2"), ex)
    assert e16 < 0.5 * e8, (e16, e8)
    q8, qs, k8, ks, vv, vs = quantize_qkv(q, k, v, 128, quant_v=False)
    assert vv is v and vs is None
    with pytest.raises(ValueError, match="pv_fp8=True but v was not quantised"):
        from lightx2v_engine.kernels.attention_8bit import attention_8bit_quantized
        attention_8bit_quantized((q8, qs, k8, ks, vv, vs), 257, torch.empty_like(q), "ws_128x128_w4_s2")


@pytest.mark.parametrize("Lk", [1, 5, 128, 129])
def test_ragged_and_tiny_key_counts(Lk):
    """Padded keys are removed from the row sum, not masked: a wrong correction shows as a scale error."""
    q, k, v = _qkv(1, 40, Lk, 2, torch.float16, "cpu", seed=Lk)
    v = v + 1.0  # a mean offset makes a wrong normaliser visible
    out = attention_8bit(q, k, v)
    _assert_rule(out, q, k, v)


def test_strided_views():
    """q/k/v as head views of fused [B, L, 3C] projections (row stride 3C)."""
    torch.manual_seed(0)
    B, L, H = 1, 100, 2
    qkv = torch.randn(B, L, 3 * H * 128).half()
    q, k, v = (t.unflatten(-1, (H, 128)) for t in qkv.split(H * 128, dim=-1))
    assert not q.is_contiguous()
    _assert_rule(attention_8bit(q, k, v), q, k, v)


def test_bad_inputs_raise():
    q, k, v = _qkv(1, 8, 8, 1, torch.float16, "cpu")
    with pytest.raises(ValueError, match="fp16 or bf16"):
        attention_8bit(q.float(), k.float(), v.float())
    with pytest.raises(ValueError, match="head dim D must be 32, 64 or 128"):
        attention_8bit(q[..., :96], k[..., :96], v[..., :96])
    with pytest.raises(ValueError, match="must be"):
        attention_8bit(q, k[:, :, :, :64], v)




@pytest.mark.parametrize("config", ["ws_128x128_w4_s3_poly", "tma_128x128_w8_s3_poly", "ws_128x128_w4_s2"])
def test_huge_logit_spread_stays_finite(config):
    """A row whose best key scores ~100 nats above the rest (x = s - m + 8 below -127 in log2 units): the
    polynomial exp2 must give ~0 there, not NaN (2^round(x) borrowing into the sign bit)."""
    q, k, v = _qkv(1, 16, 40, 1, torch.float16, "cpu", seed=3)
    q[0, 0] = 3.0
    k[0, 0] = 3.0
    k[0, 1:] = -0.05 * k[0, 1:]
    out = attention_8bit_triton(q, k, v, config)
    assert torch.isfinite(out).all(), f"{config}: {torch.isnan(out).sum().item()} NaN outputs"
    ex = _exact(q, k, v)
    assert (out[0, 0].float() - ex[0, 0]).abs().max().item() < 0.1


def test_quantised_block_count_must_match_the_config():
    from lightx2v_engine.kernels.attention_8bit import attention_8bit_quantized
    q, k, v = _qkv(1, 40, 200, 1, torch.float16, "cpu")
    quant = quantize_qkv(q, k, v, 64, quant_v=False)  # 4 blocks of 64; the config's block_n is 128 (2 blocks)
    with pytest.raises(ValueError, match="quantise with the config's block_n"):
        attention_8bit_quantized(quant, 200, torch.empty_like(q), "ws_128x128_w4_s2_pv16")
    with pytest.raises(ValueError, match="Lk=150"):
        attention_8bit_quantized(quantize_qkv(q, k, v, 128), 150, torch.empty_like(q), "ws_128x128_w4_s2")


def test_quantisation_maxima_propagate_nan_on_sm90():
    """On the GPU tl.max is max.f32, which drops NaN (and the int8 cast makes NaN 0): the q/k scale
    reductions must be NaN-propagating (max.NaN.f32 in the sm_90a PTX), so a NaN input gives NaN out. The
    interpreter propagates NaN either way, hence the check on the compiled kernel."""
    import os
    import subprocess
    import sys
    code = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import importlib
fn = importlib.import_module("lightx2v_engine.kernels.attention_8bit")._quant_rows_kernel
for per_row in (True, False):
    consts = dict(HEAD_D=128, BLOCK=64, PER_ROW=per_row, HAS_MEAN=not per_row, INTERP=False)
    types = dict(X="*fp16", MEAN="*fp32", Y="*i8", S="*fp32", factor="fp32")
    sig = {n: ("constexpr" if n in consts else types.get(n, "i32")) for n in fn.arg_names}
    k = triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4))
    ptx = k.asm["ptx"]
    print("PTX", per_row, ptx.count("max.NaN.f32"), ptx.count("max.f32"))
"""
    env = {kk: vv for kk, vv in os.environ.items() if kk != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    lines = [ln.split() for ln in res.stdout.splitlines() if ln.startswith("PTX")]
    assert len(lines) == 2, res.stdout[-2000:] + res.stderr[-2000:]
    for _, per_row, nan_max, plain_max in lines:
        assert int(nan_max) > 0 and int(plain_max) == 0, (per_row, nan_max, plain_max)


def test_quantisation_nan_in_the_interpreter():
    """The interpreter's tl.max is np.nanmax (it drops NaN, as max.f32 does on the GPU): a NaN in q or k gave
    finite scales and finite outputs on the CPU, so no CPU test could see NaN propagation. A NaN row of q
    (a NaN key block of k) now gets a NaN scale, as quantize_qkv_ref."""
    q, k, v = _qkv(1, 20, 70, 2, torch.float16, "cpu", seed=1)
    q[0, 3, 1, 5] = float("nan")
    k[0, 40, 0, 2] = float("nan")
    _, qs, _, ks, *_ = quantize_qkv(q, k, v, 64)
    _, qs_ref, _, ks_ref, *_ = quantize_qkv_ref(q, k, v, 64)
    assert torch.equal(torch.isnan(qs), torch.isnan(qs_ref)) and torch.isnan(qs).sum() == 1
    assert torch.isnan(ks).any() and torch.equal(torch.isnan(ks), torch.isnan(ks_ref))
    out = attention_8bit_triton(q, k, v, DEFAULT_ATTN8_CONFIG)
    assert torch.isnan(out).any()


def test_unaligned_v_is_taken_by_the_bf16_pv_config():
    """The configs that read v unquantised through TMA raised ValueError for a v view at an odd offset (the
    fp8 ones quantise v into their own buffer); it is copied aligned now, with the result of an aligned v."""
    q, k, v = _qkv(1, 9, 9, 1, torch.float16, "cpu", seed=2)
    flat = torch.empty(v.numel() + 1, dtype=v.dtype)
    flat[1:] = v.flatten()
    v_odd = flat[1:].view(v.shape)
    assert v_odd.data_ptr() % 16
    for config in ("ws_128x128_w4_s2_pv16", "ws_128x128_w4_s2"):
        torch.testing.assert_close(attention_8bit_triton(q, k, v_odd, config), attention_8bit_triton(q, k, v, config),
                                   rtol=0, atol=0)


def test_self_attention_8bit_and_ops_dispatch():
    q, k, v, wq, wk, rope = self_attn_inputs(2, (3, 5, 7), 3, torch.float16, "cpu")
    out = self_attention(q, k, v, wq, wk, rope.cos, rope.sin, 3, 1e-6, attn_8bit=True)
    ref32 = self_attention_ref(q.float(), k.float(), v.float(), wq, wk, rope.cos, rope.sin, 3)
    assert out.shape == q.shape and _rel(out, ref32) < 0.06
    exact = self_attention(q, k, v, wq, wk, rope.cos, rope.sin, 3, 1e-6)
    assert not torch.equal(out, exact), "attn_8bit=True must run the 8-bit kernel"
    try:
        ops.set_backend("kernels")
        assert ops.attention_8bit_available(q.device)
        got = ops.self_attention(q, k, v, wq, wk, rope, 3, attn_8bit=True)
    finally:
        ops.set_backend("auto")
    assert torch.equal(got, out)
    # backend "auto" on a CPU tensor: the reference path, which is exact whatever attn_8bit says
    assert not ops.attention_8bit_available(q.device)
    torch.testing.assert_close(ops.self_attention(q, k, v, wq, wk, rope, 3, attn_8bit=True),
                               ops.self_attention(q, k, v, wq, wk, rope, 3), rtol=0, atol=0)


def test_opcheck_and_compile():
    q, k, v = _qkv(1, 20, 9, 2, torch.float16, "cpu")
    torch.library.opcheck(torch.ops.lightx2v.attention_8bit.default, (q, k, v),
                          test_utils=("test_schema", "test_faketensor"))
    qs, ks, vs, wq, wk, rope = self_attn_inputs(1, (1, 2, 3), 2, torch.float16, "cpu")
    torch.library.opcheck(torch.ops.lightx2v.self_attention.default,
                          (qs, ks, vs, wq, wk, rope.cos, rope.sin, 2, 1e-6, True),
                          test_utils=("test_schema", "test_faketensor"))

    def f(q, k, v, qs, ks, vs):
        return attention_8bit(q, k, v) * 2, self_attention(qs, ks, vs, wq, wk, rope.cos, rope.sin, 2, attn_8bit=True)

    got = torch.compile(f, backend="aot_eager", fullgraph=True)(q, k, v, qs, ks, vs)
    want = f(q, k, v, qs, ks, vs)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


# ----------------------------------------------------------------------------------------------------
# GPU: real shapes, bf16
# ----------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.last
@pytest.mark.parametrize("config, H, L", [(c, 12, 32760) for c in ATTN8_CONFIGS] + [(DEFAULT_ATTN8_CONFIG, 40, 4099)])
def test_attention_8bit_gpu_real_shapes(config, H, L):
    if not torch.cuda.get_device_capability() >= (8, 9):
        pytest.skip("fp8 MMA needs sm89+")
    q, k, v = _qkv(1, L, L, H, torch.bfloat16, "cuda")
    out = attention_8bit_triton(q, k, v, config)
    ex = _exact(q, k, v)
    assert _rel(out, ex) < 0.06, f"{config}: rel. err {_rel(out, ex):.4f} vs exact"
    # the PyTorch reference materialises [Lq, Lk] float64 scores: compare on head 0 and 2048 queries (q is
    # quantised per row, so the reference's rows do not depend on the other queries)
    n = 2048
    cfg = ATTN8_CONFIGS[config]
    base = _rel(attention_8bit_ref(q[:, :n, :1], k[:, :, :1], v[:, :, :1], cfg.block_n, cfg.pv_fp8), ex[:, :n, :1])
    err = _rel(out[:, :n, :1], ex[:, :n, :1])
    assert err <= 1.25 * base + 0.005, f"{config}: rel. err {err:.4f} (reference {base:.4f})"


@pytest.mark.gpu
@pytest.mark.last
def test_attention_8bit_cuda_graph_capture():
    if not torch.cuda.get_device_capability() >= (8, 9):
        pytest.skip("fp8 MMA needs sm89+")
    q, k, v = _qkv(1, 1000, 300, 2, torch.bfloat16, "cuda")
    want, out = eager_and_graph_replay(lambda: attention_8bit(q, k, v))
    assert torch.equal(out, want)


def test_v_smoothing_keeps_the_error_of_offset_values():
    """v is quantised as v - mean_L(v): a large per-channel offset of v (Wan's v has biases) must not grow
    the absolute error, which an unsmoothed fp8 v would multiply by the offset's size."""
    q, k, v = _qkv(1, 130, 257, 2, torch.float16, "cpu")
    offset = torch.randn(1, 1, 2, 128, generator=torch.Generator().manual_seed(5)) * 8
    errs = []
    for vv in (v, (v.float() + offset).half()):
        errs.append((attention_8bit(q, k, vv).float() - _exact(q, k, vv)).norm().item())
    assert errs[1] <= 1.5 * errs[0], errs


def test_key_permuted_v_matches_the_register_order_of_p():
    """quantize_qkv(key_perm=True) stores v's keys in key_perm32 order (as the reference does); the Gluon
    kernel reorders P's columns by the same reshape/permute before P.V, so the sum over keys is unchanged;
    unpermute_keys undoes it (the Triton fallback of a p_regs config)."""
    from lightx2v_engine.kernels.attention_8bit import key_perm32, quantize_for, quantize_qkv_ref, unpermute_keys
    q, k, v = _qkv(2, 50, 200, 2, torch.float16, "cpu")
    plain = quantize_qkv(q, k, v, 128)
    perm = quantize_qkv(q, k, v, 128, key_perm=True)
    idx = key_perm32(plain[4].shape[-1])
    assert sorted(idx.tolist()) == list(range(256)) and not torch.equal(idx, torch.arange(256))
    assert torch.equal(perm[4].view(torch.uint8), plain[4][..., idx].view(torch.uint8))
    assert torch.equal(unpermute_keys(perm[4]).view(torch.uint8), plain[4].view(torch.uint8))
    for a, b in zip(perm[:4] + perm[5:], plain[:4] + plain[5:]):
        assert torch.equal(a, b)
    ref = quantize_qkv_ref(q, k, v, 128, key_perm=True)
    assert torch.equal(ref[4].view(torch.uint8), quantize_qkv_ref(q, k, v, 128)[4][..., idx].view(torch.uint8))
    assert torch.equal(quantize_for(q, k, v, "gluon_fa3_128x128_s3_preg")[4].view(torch.uint8),
                       perm[4].view(torch.uint8))
    # the kernel's reordering of P (attention_gluon._p8_operand), in PyTorch: P'[:, k'] = P[:, idx[k']]
    p = torch.randn(64, 256, dtype=torch.float64)
    p_perm = p.reshape(64, 8, 2, 2, 4, 2).permute(0, 1, 2, 4, 3, 5).reshape(64, 256)
    assert torch.equal(p_perm, p[:, idx])
    vt = torch.randn(128, 256, dtype=torch.float64)
    torch.testing.assert_close(p_perm @ vt[:, idx].T, p @ vt.T, rtol=1e-12, atol=1e-12)


@triton.jit
def _e4m3_kernel(X, Y, n, BLOCK: tl.constexpr, INTERP: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(X + offs, mask=offs < n, other=0.0)
    tl.store(Y + offs, _to_e4m3(x, INTERP), mask=offs < n)


def _e4m3_cases() -> torch.Tensor:
    """Every finite e4m3 value, the midpoints between neighbours (ties), points just off them, +-0, values
    that round to zero from either side, and the saturation edge: the inputs of _to_e4m3 (|x| <= 448)."""
    grid = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    grid = grid[torch.isfinite(grid)].unique()                      # sorted, -448 .. 448 (one zero)
    mids = (grid[1:] + grid[:-1]) / 2
    tiny = torch.tensor([2.0 ** -11, 2.0 ** -10, 3 * 2.0 ** -11, 1e-30, 1e-6, 2.0 ** -9 * 0.75])
    return torch.cat([grid, mids, mids * (1 + 2 ** -20), mids * (1 - 2 ** -20), tiny, -tiny,
                      torch.tensor([0.0, -0.0, 447.9, -447.9, 440.0, 464.0 * (1 - 2 ** -20)])]).clamp(-448, 448)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_e4m3_conversion_matches_torch_to_the_bit(device):
    """The kernels' shared fp32 -> e4m3 conversion (attention_8bit._to_e4m3; the modulation's fused quant
    uses it too) gives torch's bits: round to nearest even, -0 for negatives that round to zero (the
    interpreter's emulation once dropped that sign, so the fused quant differed from the two-pass one)."""
    x = _e4m3_cases().to(device)
    y = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=device)
    _e4m3_kernel[(triton.cdiv(x.numel(), 256),)](x, y, x.numel(), BLOCK=256, INTERP=interpreting())
    want = x.to(torch.float8_e4m3fn)
    bad = (y.view(torch.uint8) != want.view(torch.uint8)).nonzero().flatten()
    assert bad.numel() == 0, [(x[i].item(), y[i].view(torch.uint8).item(), want[i].view(torch.uint8).item())
                              for i in bad[:8]]
