"""8-bit linears (lightx2v_engine.quant) and the csrc quantization kernels (lightx2v_engine._C).

CPU tests check the references against independent computations (an exhaustive nearest-fp8 search, fp32
nn.Linear); GPU tests check the CUDA paths against those references.
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lightx2v_engine import csrc_ops, quant

SCHEMES = ["fp8", "int8"]


# ----------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------

def _fp8_table() -> torch.Tensor:
    """All finite float8_e4m3fn values (codes 0..255 minus the two NaNs), sorted, as float64."""
    v = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).double()
    return torch.unique(v[~v.isnan()])


def _round_fp8_exhaustive(v: torch.Tensor) -> torch.Tensor:
    """Independent RNE-with-saturation to e4m3: nearest table value; on a tie, the even (mantissa LSB 0) one."""
    table = _fp8_table()
    vd = v.double().clamp(-448, 448).reshape(-1, 1)
    d = (vd - table.reshape(1, -1)).abs()
    best = d.min(dim=1, keepdim=True).values
    cand = d == best
    codes = table.to(torch.float8_e4m3fn).view(torch.uint8).int()
    even = (codes & 1) == 0
    # two candidates only on exact ties; prefer the even code there
    pick = torch.where(cand.sum(1, keepdim=True) > 1, cand & even.reshape(1, -1), cand)
    return table[pick.int().argmax(dim=1)].reshape(v.shape)


def _rows_with_spread(m: int, k: int, dtype=torch.bfloat16, seed: int = 0) -> torch.Tensor:
    """Gaussian rows whose magnitudes span 4 decades, plus one all-zero row."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * 10 ** (torch.rand(m, 1, generator=g) * 4 - 2)
    x[m // 2] = 0
    return x.to(dtype)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


class _Attn(nn.Module):
    def __init__(self, c: int, image: bool = False):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(c, c) for _ in range(4))
        self.norm_q = nn.RMSNorm(c, eps=1e-6)
        self.norm_k = nn.RMSNorm(c, eps=1e-6)
        if image:
            self.k_img, self.v_img = nn.Linear(c, c), nn.Linear(c, c)


class _Block(nn.Module):
    def __init__(self, c: int, ffn: int):
        super().__init__()
        self.modulation = nn.Parameter(torch.randn(1, 6, c) / c ** 0.5)
        self.norm3 = nn.LayerNorm(c)
        self.self_attn = _Attn(c)
        self.cross_attn = _Attn(c, image=True)
        self.ffn = nn.Sequential(nn.Linear(c, ffn), nn.GELU(approximate="tanh"), nn.Linear(ffn, c))

    def forward(self, x, ctx):
        n = self.norm3(x)
        s = self.self_attn
        a = F.scaled_dot_product_attention(s.norm_q(s.q(n)), s.norm_k(s.k(n)), s.v(n))
        x = x + self.self_attn.o(a)
        c = self.cross_attn
        x = x + c.o(F.scaled_dot_product_attention(c.q(x), c.k(ctx), c.v(ctx))
                    + F.scaled_dot_product_attention(c.q(x), c.k_img(ctx), c.v_img(ctx)))
        return x + self.ffn(x)


class _TinyDiT(nn.Module):
    """Stand-in with Wan's module names: blocks.N.{self_attn,cross_attn,ffn} plus unquantized linears."""

    def __init__(self, c: int = 64, ffn: int = 96, depth: int = 2):
        super().__init__()
        self.text_embedding = nn.Sequential(nn.Linear(32, c), nn.GELU(approximate="tanh"), nn.Linear(c, c))
        self.blocks = nn.ModuleList(_Block(c, ffn) for _ in range(depth))
        self.head = nn.Module()
        self.head.head = nn.Linear(c, 16)

    def forward(self, x, text):
        ctx = self.text_embedding(text)
        for b in self.blocks:
            x = b(x, ctx)
        return self.head.head(x)


def _expected_quantized_names(depth: int = 2) -> set:
    names = set()
    for i in range(depth):
        names |= {f"blocks.{i}.self_attn.{p}" for p in "qkvo"}
        names |= {f"blocks.{i}.cross_attn.{p}" for p in ("q", "k", "v", "o", "k_img", "v_img")}
        names |= {f"blocks.{i}.ffn.0", f"blocks.{i}.ffn.2"}
    return names


# ----------------------------------------------------------------------------------------------------
# schemes
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,expected", [
    ("fp8", "fp8"), ("int8", "int8"), ("fp8-sgl", "fp8"), ("fp8-vllm", "fp8"), ("fp8-torchao", "fp8"),
    ("fp8-triton", "fp8"), ("fp8-q8f", "fp8"), ("int8-sgl", "int8"), ("int8-vllm", "int8"),
    ("int8-torchao", "int8"), ("int8-triton", "int8"), ("int8-q8f", "int8"),
])
def test_parse_quant_scheme(name, expected):
    assert quant.parse_quant_scheme(name) == expected


@pytest.mark.parametrize("bad", ["nvfp4", "fp8-b128-deepgemm", "Default", "", "int4-g128-marlin"])
def test_parse_quant_scheme_rejects(bad):
    with pytest.raises(ValueError) as e:
        quant.parse_quant_scheme(bad)
    assert repr(bad) in str(e.value) and "fp8-sgl" in str(e.value) and "int8-q8f" in str(e.value)
    with pytest.raises(ValueError):
        quant.quantize_weight(torch.randn(4, 8), bad)


# ----------------------------------------------------------------------------------------------------
# weight and activation quantization references
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantize_weight_error_bound(scheme):
    w = _rows_with_spread(37, 91, torch.float32, seed=1)
    wq, scale = quant.quantize_weight(w, scheme)
    assert wq.dtype == {"fp8": torch.float8_e4m3fn, "int8": torch.int8}[scheme]
    assert scale.shape == (37, 1) and scale.dtype == torch.float32
    qmax = 448.0 if scheme == "fp8" else 127.0
    amax = w.abs().amax(1, keepdim=True).clamp_min(1e-12).double()
    torch.testing.assert_close(scale.double(), amax / qmax, rtol=1e-7, atol=0)
    err = (quant.dequantize_weight(wq, scale).double() - w.double()).abs()
    if scheme == "fp8":
        # half an e4m3 ulp: 2^-4 relative for normals, 2^-10 * scale absolute in the subnormal range
        bound = torch.maximum(w.double().abs() * 2.0 ** -4, scale.double() * 2.0 ** -10)
    else:
        bound = scale.double() / 2
    assert (err <= bound * (1 + 1e-6) + 1e-30).all(), (err / bound).max()
    # the largest element of each nonzero row maps to +-QMAX exactly
    top = wq.float().abs().amax(1)
    nonzero = w.abs().amax(1) > 0
    assert torch.equal(top[nonzero], torch.full_like(top[nonzero], qmax))
    assert (wq.float()[~nonzero] == 0).all()


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_per_token_quant_ref_independent(scheme, dtype):
    x = _rows_with_spread(19, 72, dtype, seed=2)
    q, s = quant.per_token_quant_ref(x, scheme)
    assert q.shape == x.shape and s.shape == (19, 1) and s.dtype == torch.float32
    qmax = 448.0 if scheme == "fp8" else 127.0
    amax = x.float().abs().amax(1, keepdim=True).clamp_min(1e-12)
    torch.testing.assert_close(s.double(), amax.double() / qmax, rtol=1e-7, atol=0)
    v = x.double() * (qmax / amax.double())
    if scheme == "fp8":
        expected = _round_fp8_exhaustive(v)
    else:
        expected = torch.round(v).clamp(-127, 127)  # round half to even
    # the reference scales by an fp32 reciprocal: a value within 1 fp32 ulp of a rounding boundary may
    # round the other way, so allow at most one neighbouring code on a tiny fraction of elements
    diff = q.double() != expected
    assert diff.double().mean() < 2e-3, diff.sum()
    gap = (q.double() - expected).abs()
    one_code = expected.abs() * 2.0 ** -3 + 2.0 ** -9 if scheme == "fp8" else torch.ones_like(gap)
    assert (gap <= one_code).all()
    assert not q.float().isnan().any()
    assert (q.float()[9] == 0).all()  # the zero row


def test_fp8_cast_saturates_and_rounds_to_even():
    v = torch.tensor([448.0, 460.0, 1e6, -1e6, 0.0, 1.0625, 1.1875, 2.0 ** -9, 2.0 ** -10, 2.0 ** -11])
    q = quant._to_qdtype(v, "fp8").float()
    # 1.0625 is halfway between 1.0 and 1.125 -> 1.0 (even); 1.1875 between 1.125 and 1.25 -> 1.25 (even);
    # 2^-9 is the smallest subnormal; 2^-10 is halfway between 0 and 2^-9 -> 0; 2^-11 -> 0
    expected = torch.tensor([448.0, 448.0, 448.0, -448.0, 0.0, 1.0, 1.25, 2.0 ** -9, 0.0, 0.0])
    assert torch.equal(q, expected)
    assert torch.equal(q, _round_fp8_exhaustive(v).float())


# ----------------------------------------------------------------------------------------------------
# QuantLinear on the CPU reference path
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("scheme,bound", [("fp8", 0.05), ("int8", 0.015)])
@pytest.mark.parametrize("k,n", [(96, 80), (200, 48)])
def test_quant_linear_vs_fp32_linear(scheme, bound, k, n):
    torch.manual_seed(0)
    lin = nn.Linear(k, n)
    x = torch.randn(2, 37, k).to(torch.bfloat16)
    ref = F.linear(x.float(), lin.weight, lin.bias)
    q = quant.QuantLinear.from_linear(lin, scheme)
    y = q(x)
    assert y.shape == (2, 37, n) and y.dtype == torch.bfloat16
    err = _rel(y, ref)
    assert err < bound, err
    # the same bound catches wrong scales (one row in three off by 25%)
    q.weight_scale[::3] *= 1.25
    assert _rel(q(x), ref) > 2 * bound


@pytest.mark.parametrize("scheme", SCHEMES)
def test_quant_linear_ref_matches_float64_dequantized_math(scheme):
    torch.manual_seed(1)
    x = torch.randn(23, 40).to(torch.bfloat16)
    wq, ws = quant.quantize_weight(torch.randn(24, 40), scheme)
    bias = torch.randn(24).to(torch.bfloat16)
    y = quant.quant_linear_ref(x, wq, ws, bias)
    xq, xs = quant.per_token_quant_ref(x, scheme)
    expected = (xq.double() * xs.double()) @ (wq.double() * ws.double()).t() + bias.double()
    torch.testing.assert_close(y.double(), expected.to(torch.bfloat16).double(), rtol=2 ** -7, atol=1e-5)


@pytest.mark.parametrize("m", [3, 16, 17, 40])
def test_int_mm_epilogue_matches_reference(m):
    """The int8 GEMM + epilogue used on CUDA (torch._int_mm also runs on the CPU), incl. the M <= 16 padding."""
    torch.manual_seed(2)
    x = torch.randn(m, 64).to(torch.bfloat16)
    wq, ws = quant.quantize_weight(torch.randn(48, 64), "int8")
    bias = torch.randn(48).to(torch.bfloat16)
    xq, xs = quant.per_token_quant_ref(x, "int8")
    y = quant._int_mm_scaled(xq, xs, wq, ws, bias, torch.bfloat16)
    assert y.shape == (m, 48)
    torch.testing.assert_close(y, quant.quant_linear_ref(x, wq, ws, bias), rtol=0, atol=0)


def test_quant_linear_rejects_wrong_width():
    q = quant.QuantLinear.from_linear(nn.Linear(16, 8), "fp8")
    with pytest.raises(ValueError, match=r"\[\.\.\., 16\]"):
        q(torch.randn(3, 15))


# ----------------------------------------------------------------------------------------------------
# module swap and LightX2V checkpoint loading
# ----------------------------------------------------------------------------------------------------

def test_is_quantized_linear_name():
    assert quant.is_quantized_linear_name("blocks.0.self_attn.q")
    assert quant.is_quantized_linear_name("blocks.39.ffn.2")
    assert quant.is_quantized_linear_name("blocks.3.cross_attn.k_img")
    for name in ("head.head", "text_embedding.0", "blocks.0.modulation", "blocks.0.self_attn",
                 "blocks.x.ffn.0", "blocks.0.audio_ffn.0", "model.blocks.0.ffn.0"):
        assert not quant.is_quantized_linear_name(name), name


@pytest.mark.parametrize("scheme,bound", [("fp8", 0.06), ("int8", 0.02)])
def test_quantize_dit_swaps_exactly_the_lightx2v_linears(scheme, bound):
    torch.manual_seed(3)
    model = _TinyDiT()
    x, text = torch.randn(1, 20, 64), torch.randn(1, 12, 32)
    with torch.no_grad():
        ref = model(x, text)
        names = quant.quantize_dit_(model, scheme)
        assert set(names) == _expected_quantized_names()
        for name, m in model.named_modules():
            assert isinstance(m, quant.QuantLinear) == (name in names), name
        assert isinstance(model.head.head, nn.Linear) and isinstance(model.text_embedding[0], nn.Linear)
        qdtype = {"fp8": torch.float8_e4m3fn, "int8": torch.int8}[scheme]
        for name in names:
            m = model.get_submodule(name)
            assert m.weight.dtype == qdtype and m.weight_scale.shape == (m.out_features, 1), name
            assert [k for k, _ in m.named_parameters()] == [], name  # the float weights are gone
        y = model(x, text)
    assert _rel(y, ref) < bound


def _lightx2v_quantized_state_dict(model: nn.Module, scheme: str) -> dict:
    """What LightX2V's converter writes: quantized linears -> weight (fp8/int8) + weight_scale [out, 1]
    (here in bf16, the converter's source dtype), everything else bf16."""
    sd = {}
    for k, v in model.state_dict().items():
        module = k.rsplit(".", 1)[0]
        if k.endswith(".weight") and v.dim() == 2 and quant.is_quantized_linear_name(module):
            wq, s = quant.quantize_weight(v, scheme)
            sd[k], sd[k + "_scale"] = wq, s.to(torch.bfloat16)
        else:
            sd[k] = v.to(torch.bfloat16)
    return sd


@pytest.mark.parametrize("scheme_name", ["fp8-sgl", "int8-vllm"])
def test_swap_and_load_lightx2v_quantized_checkpoint(scheme_name):
    torch.manual_seed(4)
    src = _TinyDiT()
    sd = _lightx2v_quantized_state_dict(src, quant.parse_quant_scheme(scheme_name))
    assert sd["blocks.0.self_attn.q.weight_scale"].shape == (64, 1)
    with torch.device("meta"):
        model = _TinyDiT().to(torch.bfloat16)
    names = quant.swap_to_quant_linear_(model, scheme_name)
    assert set(names) == _expected_quantized_names()
    assert model.blocks[0].self_attn.q.weight.is_meta
    model.load_state_dict(sd, strict=True, assign=True)
    q = model.blocks[1].ffn[2]
    assert isinstance(q, quant.QuantLinear) and q.weight.dtype == sd["blocks.1.ffn.2.weight"].dtype
    assert q.weight_scale.dtype == torch.float32 and q.weight_scale.shape == (64, 1)
    assert torch.equal(q.weight_scale, sd["blocks.1.ffn.2.weight_scale"].float())
    assert q.bias.dtype == torch.bfloat16
    assert not any(t.is_meta for t in model.state_dict().values())
    # the loaded model computes what a bf16 copy of the source, quantized in place, computes
    x, text = torch.randn(1, 20, 64).to(torch.bfloat16), torch.randn(1, 12, 32).to(torch.bfloat16)
    with torch.no_grad():
        y = model(x, text)
        ref = src.to(torch.bfloat16)
        ref_y = ref(x, text)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    assert _rel(y, ref_y) < 0.08


def test_load_rejects_unquantized_weight_into_quant_linear():
    torch.manual_seed(5)
    src = _TinyDiT()
    sd = {k: v.to(torch.bfloat16) for k, v in src.state_dict().items()}
    model = _TinyDiT()
    quant.swap_to_quant_linear_(model, "fp8", device="cpu")
    with pytest.raises(RuntimeError, match=r"blocks\.0\.self_attn\.q\.weight: expected torch\.float8_e4m3fn"):
        model.load_state_dict(sd, strict=False, assign=True)


def test_quantize_dit_rejects_meta_weights():
    with torch.device("meta"):
        model = _TinyDiT()
    with pytest.raises(ValueError, match="meta"):
        quant.quantize_dit_(model, "fp8")


def _fake_extension(monkeypatch, errors: dict):
    """A built extension (as far as csrc_ops can tell) whose kernel-image query returns errors[device]."""
    import sys
    import types
    ext = types.ModuleType(csrc_ops._EXTENSION)
    ext.kernel_image_error = lambda index: errors.get(index, "")
    monkeypatch.setitem(sys.modules, csrc_ops._EXTENSION, ext)
    monkeypatch.setattr(csrc_ops, "_AVAILABLE", True)


def test_csrc_available_needs_sm80(monkeypatch):
    """A built extension serves sm_80+ devices only; elsewhere the reference path runs (no launch that
    could fail for want of a kernel image)."""
    _fake_extension(monkeypatch, {})
    caps = {0: (7, 5), 1: (9, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: caps[i])
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    csrc_ops._capability_ok.cache_clear()
    try:
        assert csrc_ops.csrc_available() and not csrc_ops.csrc_available("cpu")
        assert not csrc_ops.csrc_available("cuda:0") and csrc_ops.csrc_available("cuda:1")
        assert csrc_ops.csrc_available("cuda")  # (the current device)
    finally:
        csrc_ops._capability_ok.cache_clear()


def test_csrc_available_needs_a_kernel_image_for_the_card(monkeypatch):
    """An extension built for other cards (a 9.0-only build on an sm_80 GPU) is skipped on the card it has no
    kernel image for, with a warning naming the card and the rebuild, instead of failing at every launch."""
    _fake_extension(monkeypatch, {0: "cudaErrorNoKernelImageForDevice: no kernel image is available"})
    caps = {0: (8, 0), 1: (9, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: caps[i])
    csrc_ops._capability_ok.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match=r"no kernel image for cuda:0 \(compute capability 8\.0.*"
                                                r"TORCH_CUDA_ARCH_LIST=8\.0"):
            assert not csrc_ops.csrc_available("cuda:0")
        assert csrc_ops.csrc_available("cuda:1")
        assert not csrc_ops.csrc_available("cuda:0")  # asked once per device
    finally:
        csrc_ops._capability_ok.cache_clear()


def test_csrc_status_is_explained():
    status = csrc_ops.csrc_status()
    assert status == "available" or status.startswith("unavailable: ")
    if not csrc_ops.csrc_available():
        with pytest.raises(RuntimeError, match="lightx2v_engine._C"):
            csrc_ops.per_token_quant_fp8(torch.randn(2, 8))


# ----------------------------------------------------------------------------------------------------
# GPU: csrc kernels, cuBLASLt 8-bit GEMMs, CUDA graphs
# ----------------------------------------------------------------------------------------------------

def _assert_quant_equal(q, s, q_ref, s_ref, scheme):
    assert q.dtype == q_ref.dtype and q.shape == q_ref.shape and s.shape == s_ref.shape
    torch.testing.assert_close(s, s_ref, rtol=0, atol=0)
    a, b = q.float(), q_ref.float()
    mism = a != b
    # the kernel and the reference perform the same IEEE operations: they must agree bit for bit
    assert mism.sum().item() == 0, (scheme, mism.nonzero()[:8].tolist(), a[mism][:8].tolist(), b[mism][:8].tolist())


def _quant_case(case: str, m: int, k: int, dtype) -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(m * 7 + k)
    width = {"contiguous": k, "row_strided": 2 * k, "misaligned": k + 1}[case]
    x = torch.randn(m, width, device="cuda", generator=g)
    x = x * 10 ** (torch.rand(m, 1, device="cuda", generator=g) * 4 - 2)
    if m > 2:
        x[m // 2] = 0
    x = x.to(dtype)
    if case == "row_strided":  # a column slice of a wider tensor: 16-byte aligned rows, row stride 2K
        return x[:, :k]
    if case == "misaligned":  # rows start 2 bytes off a 16-byte boundary -> scalar kernel
        return x[:, 1:]
    return x


@pytest.mark.gpu
def test_csrc_has_a_kernel_image_for_this_gpu():
    """The real query of the built extension (cudaFuncGetAttributes): a build on this machine covers its GPU,
    and asking does not disturb the current device or leave an error behind."""
    import sys
    assert csrc_ops.csrc_available(), csrc_ops.csrc_status()
    dev = torch.cuda.current_device()
    assert sys.modules[csrc_ops._EXTENSION].kernel_image_error(dev) == ""
    assert torch.cuda.current_device() == dev
    csrc_ops._capability_ok.cache_clear()
    assert csrc_ops.csrc_available(torch.device("cuda", dev))
    torch.ones(1, device="cuda").add_(1)  # (no sticky error)
    torch.cuda.synchronize()


@pytest.mark.gpu
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,k,case", [
    (32760, 1536, "contiguous"), (257, 5120, "contiguous"), (33, 8960, "contiguous"), (7, 13824, "contiguous"),
    (5, 512, "contiguous"), (3, 4096, "contiguous"), (9, 16384, "contiguous"),  # warp / block configs
    (2, 72000, "contiguous"), (3, 40000, "contiguous"),  # > 32768 columns -> scalar kernel
    (11, 40, "contiguous"), (6, 1001, "contiguous"),  # K % 8 != 0 -> scalar kernel
    (17, 1536, "row_strided"), (17, 1536, "misaligned"), (1, 1536, "contiguous"), (0, 1536, "contiguous"),
])
def test_csrc_per_token_quant_matches_reference(scheme, dtype, m, k, case):
    assert csrc_ops.csrc_available(), csrc_ops.csrc_status()
    x = _quant_case(case, m, k, dtype)
    op = csrc_ops.per_token_quant_fp8 if scheme == "fp8" else csrc_ops.per_token_quant_int8
    q, s = op(x)
    q_ref, s_ref = quant.per_token_quant_ref(x, scheme)
    _assert_quant_equal(q, s, q_ref, s_ref, scheme)


@pytest.mark.gpu
@pytest.mark.last
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,k,case", [(32760, 8960, "contiguous"), (257, 13824, "contiguous"),
                                      (2, 72000, "contiguous"), (6, 1001, "contiguous"), (17, 1536, "misaligned")])
def test_csrc_per_token_quant_gelu(scheme, dtype, m, k, case):
    """GELU(tanh) fused into the quantization: vs F.gelu in the input dtype, then the reference quantization.
    torch's GELU kernel may round differently in the last bit (FMA contraction), so up to 0.1% of the
    values may differ by one quantization step, and the scales by one GELU rounding."""
    assert csrc_ops.csrc_available(), csrc_ops.csrc_status()
    x = _quant_case(case, m, k, dtype)
    op = csrc_ops.per_token_quant_fp8 if scheme == "fp8" else csrc_ops.per_token_quant_int8
    q, s = op(x, gelu=True)
    q_ref, s_ref = quant.per_token_quant_ref(F.gelu(x, approximate="tanh"), scheme)
    assert q.dtype == q_ref.dtype and q.shape == q_ref.shape and s.shape == s_ref.shape
    torch.testing.assert_close(s, s_ref, rtol=2 * torch.finfo(dtype).eps, atol=0)
    a, b = q.float() * s, q_ref.float() * s_ref
    mism = a != b
    assert mism.float().mean().item() <= 1e-3, mism.float().mean().item()
    step = (s * (0.125 * 448 if scheme == "fp8" else 1.0)).expand_as(a)  # at most one e4m3/int8 step
    assert ((a - b).abs() <= step + 1e-12).all()


@pytest.mark.gpu
@pytest.mark.parametrize("scheme", SCHEMES)
def test_csrc_op_registration_and_fake(scheme):
    assert csrc_ops.csrc_available(), csrc_ops.csrc_status()
    x = torch.randn(37, 1536, device="cuda", dtype=torch.bfloat16)
    for suffix in ("", "_gelu"):
        op = getattr(torch.ops.lightx2v_C, f"per_token_quant_{scheme}{suffix}")
        torch.library.opcheck(op, (x,), test_utils=("test_faketensor",))
    # bad input is rejected in Python before the binding (a TORCH_CHECK thrown from the extension
    # segfaulted on the H100 machine, torch 2.11): see csrc_ops._check_quant_input
    wrapper = csrc_ops.per_token_quant_fp8 if scheme == "fp8" else csrc_ops.per_token_quant_int8
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        wrapper(x.float())
    with pytest.raises(ValueError, match="2-D"):
        wrapper(x.reshape(37, 2, 768))
    with pytest.raises(ValueError, match="unit stride"):
        wrapper(x.t())
    with pytest.raises(ValueError, match="2\\^31-1 rows"):
        wrapper(x[:1, :8].expand(2**31, 8))


@pytest.mark.gpu
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("k", [1536, 5120, 1001])  # warp mode, block mode, scalar kernel
@pytest.mark.parametrize("gelu", [False, True])
def test_csrc_per_token_quant_propagates_nan(scheme, k, gelu):
    """A NaN in a row makes that row's scale NaN, as torch.amax does in the reference (a max that drops
    NaN would give a finite scale, and int8 would turn the NaN into 0: the run-time NaN check would miss
    it); the other rows are untouched."""
    assert csrc_ops.csrc_available(), csrc_ops.csrc_status()
    x = _quant_case("contiguous", 9, k, torch.bfloat16)
    x[3, k // 2] = float("nan")
    op = csrc_ops.per_token_quant_fp8 if scheme == "fp8" else csrc_ops.per_token_quant_int8
    q, s = op(x, gelu=gelu)
    assert torch.isnan(s[3]).all() and torch.isfinite(s[torch.arange(9) != 3]).all()
    if scheme == "fp8":
        assert torch.isnan(q[3].float()).all()
    keep = torch.arange(9, device="cuda") != 3
    q_ref, s_ref = quant.per_token_quant_ref(F.gelu(x, approximate="tanh") if gelu else x, scheme)
    if not gelu:
        _assert_quant_equal(q[keep], s[keep], q_ref[keep], s_ref[keep], scheme)


def test_set_int8_gemm_rejects_unknown():
    with pytest.raises(ValueError, match="cublas"):
        quant.set_int8_gemm("cutlass")


@pytest.fixture
def int8_gemm():
    """Selects QuantLinear's CUDA int8 GEMM for one test, restoring the default afterwards."""
    yield quant.set_int8_gemm
    quant.set_int8_gemm("triton")  # back to the default


@pytest.mark.gpu
@pytest.mark.parametrize("scheme,gemm", [("fp8", "cublas"), ("int8", "cublas"), ("int8", "triton")])
def test_quant_linear_cuda_matches_reference(scheme, gemm, int8_gemm):
    int8_gemm(gemm)
    torch.manual_seed(6)
    m, k, n = 32760, 1536, 1536
    lin = nn.Linear(k, n, device="cuda")
    x = torch.randn(1, m, k, device="cuda").to(torch.bfloat16)
    q = quant.QuantLinear.from_linear(lin, scheme)
    y = q(x)
    assert y.shape == (1, m, n) and y.dtype == torch.bfloat16
    ref = quant.quant_linear_ref(x[0], q.weight, q.weight_scale, q.bias)
    # same quantized operands: only accumulation order / fast accumulation and the bf16 output differ
    err = _rel(y[0], ref)
    assert err < 1e-2, err
    full = F.linear(x[0].float(), lin.weight, lin.bias)
    assert _rel(y[0], full) < (0.05 if scheme == "fp8" else 0.015)


@pytest.mark.gpu
@pytest.mark.parametrize("scheme,gemm", [("fp8", "cublas"), ("int8", "cublas"), ("int8", "triton")])
def test_quant_linear_cuda_graph_capture(scheme, gemm, int8_gemm):
    int8_gemm(gemm)
    torch.manual_seed(7)
    q = quant.QuantLinear.from_linear(nn.Linear(1536, 8960, device="cuda"), scheme)
    static_x = torch.randn(2, 300, 1536, device="cuda").to(torch.bfloat16)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            q(static_x)  # warm-up (cuBLASLt workspace, autotuning) outside the capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = q(static_x)
    new_x = torch.randn_like(static_x, dtype=torch.float32).to(torch.bfloat16)
    static_x.copy_(new_x)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_y, q(new_x))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_quant_linear_traces_fullgraph_cpu(scheme):
    torch._dynamo.reset()
    q = quant.QuantLinear.from_linear(nn.Linear(64, 48), scheme)
    x = torch.randn(2, 9, 64).to(torch.bfloat16)
    compiled = torch.compile(q, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(x), q(x))


@pytest.mark.gpu
@pytest.mark.parametrize("scheme,gemm", [("fp8", "cublas"), ("int8", "cublas"), ("int8", "triton")])
def test_quant_linear_traces_fullgraph_cuda(scheme, gemm, int8_gemm):
    """Dynamo/AOT tracing through the csrc op's fake implementation and the 8-bit GEMMs."""
    int8_gemm(gemm)
    torch._dynamo.reset()
    q = quant.QuantLinear.from_linear(nn.Linear(1536, 512, device="cuda"), scheme)
    x = torch.randn(1, 333, 1536, device="cuda").to(torch.bfloat16)
    compiled = torch.compile(q, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(x), q(x))


def test_bench_quant_dry_run(tmp_path, monkeypatch):
    """The benchmark script runs every code path (CPU, tiny shapes) and writes its csv and summary."""
    import importlib.util
    import json
    import pathlib
    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "bench_quant.py"
    spec = importlib.util.spec_from_file_location("bench_quant", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    if torch.cuda.is_available():
        pytest.skip("dry run is the CPU smoke path")
    from lightx2v_engine import quant
    before = quant._int8_gemm
    assert bench.main(["--dry-run", "--out", str(tmp_path)]) == 0
    assert quant._int8_gemm == before  # (the script restores the int8 GEMM it switched)
    summary = json.loads((tmp_path / "quant_summary.json").read_text())
    assert summary["qlinear_fp8_ratio_vs_bf16_min"] > 0 and summary["shapes_done"] == "2 of 2"
    rows = (tmp_path / "quant.csv").read_text().splitlines()
    assert rows[0].startswith("gpu,torch,op,M,K,N,ms") and any(",qlinear_fp8," in r for r in rows)
    assert any(",qlinear_fp8_lora_r32," in r for r in rows) and "qlinear_lora_r32_overhead_max" in summary
    # the QuantLinear on each int8 GEMM path, once per shape (the default path was timed twice, cuBLAS's never)
    ops_ = [r.split(",")[2] for r in rows[1:]]
    assert ops_.count("qlinear_int8_cublas") == ops_.count("qlinear_int8_triton") == 2, ops_
    # the GEMM ratios count only after the kernels' outputs agree with _scaled_mm's; rows and summary name
    # the code and the date
    assert summary["quant_checks_failed"] == [] and summary["gemm_fp8_ratio_vs_scaled_mm_min"] > 0
    assert summary["commit"] and summary["date"] and summary["triton"]
    assert ",triton,commit,date" in rows[0]
    # a GEMM kernel that computes garbage: named, and its ratio left out (it was reported as a speed-up)
    import importlib as _il
    fg = _il.import_module("lightx2v_engine.kernels.fp8_gemm")
    real = fg.fp8_gemm
    fg.fp8_gemm = lambda *a, **kw: torch.zeros_like(real(*a, **kw))
    try:
        assert bench.main(["--dry-run", "--out", str(tmp_path / "bad")]) == 0
    finally:
        fg.fp8_gemm = real
    bad = json.loads((tmp_path / "bad" / "quant_summary.json").read_text())
    assert any("triton_fp8_gemm K=" in c for c in bad["quant_checks_failed"])
    assert "gemm_fp8_ratio_vs_scaled_mm_min" not in bad and "gemm_fp8_gate_residual_ratio" not in bad
    # ... and summarize names that as the reason (it said 'not produced in this run')
    spec = importlib.util.spec_from_file_location("summarize", path.parent / "summarize.py")
    summarize = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(summarize)
    absent = summarize.merge(tmp_path / "bad")["absent"]
    assert absent["gemm_fp8_ratio_vs_scaled_mm_min"].startswith("bench_quant: triton_fp8_gemm K=")
    # an int8 kernel that raises (optional rows, now after the required fp8 ones): recorded, every fp8 figure
    # still measured, the run goes on to the next shape (a raise ended the script)
    real_int8 = quant.QuantLinear.from_linear

    def from_linear(cls, lin, scheme):
        if scheme == "int8":
            raise RuntimeError("simulated int8 failure")
        return real_int8(lin, scheme)
    monkeypatch.setattr(quant.QuantLinear, "from_linear", classmethod(from_linear))
    assert bench.main(["--dry-run", "--out", str(tmp_path / "int8")]) == 0
    monkeypatch.undo()
    got = json.loads((tmp_path / "int8" / "quant_summary.json").read_text())
    assert len(got["quant_errors"]) == 2 and all("simulated int8 failure" in e for e in got["quant_errors"])
    assert got["gemm_fp8_ratio_vs_scaled_mm_min"] > 0 and got["gemm_fp8_gate_residual_ratio"] > 0
    assert "quant_error: int8 rows K=64 N=48" in summarize.table(summarize.merge(tmp_path / "int8"))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_concat_quant_linears_equals_separate(scheme):
    torch.manual_seed(8)
    mods = [quant.QuantLinear.from_linear(nn.Linear(64, n), scheme) for n in (32, 32, 48)]
    fused = quant.concat_quant_linears(mods)
    assert fused.out_features == 112 and fused.weight_scale.shape == (112, 1) and not fused.weight.is_meta
    x = torch.randn(2, 7, 64).to(torch.bfloat16)
    assert torch.equal(fused(x), torch.cat([m(x) for m in mods], dim=-1))
    with pytest.raises(ValueError, match="mismatched"):
        quant.concat_quant_linears([mods[0], quant.QuantLinear.from_linear(nn.Linear(32, 8), scheme)])


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("res_dtype", [torch.float32, torch.bfloat16])
def test_quant_linear_gate_residual_cpu(scheme, res_dtype):
    torch.manual_seed(9)
    q = quant.QuantLinear.from_linear(nn.Linear(64, 48), scheme)
    x = torch.randn(1, 11, 64).to(torch.bfloat16)
    res, gate = torch.randn(1, 11, 48).to(res_dtype), torch.randn(1, 1, 48)
    out = quant.quant_linear_gate_residual(q, x, res, gate)
    expected = (res.double() + gate.double() * q(x).double()).to(res_dtype)
    assert out.dtype == res_dtype
    torch.testing.assert_close(out, expected, rtol=0 if res_dtype == torch.float32 else 2 ** -7, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("scheme", SCHEMES)
def test_quant_linear_gate_residual_cuda_fused(scheme):
    torch.manual_seed(10)
    q = quant.QuantLinear.from_linear(nn.Linear(1536, 1536, device="cuda"), scheme)
    x = torch.randn(1, 3000, 1536, device="cuda").to(torch.bfloat16)
    res, gate = torch.randn(1, 3000, 1536, device="cuda"), torch.randn(1, 1, 1536, device="cuda")
    out = quant.quant_linear_gate_residual(q, x, res, gate)
    expected = res + gate * quant.quant_linear_ref(x[0], q.weight, q.weight_scale, q.bias).float()
    assert out.dtype == torch.float32
    assert _rel(out - res, expected - res) < 1e-2


def test_module_dtype_casts_keep_the_8bit_format():
    torch.manual_seed(11)
    model = _TinyDiT()
    quant.quantize_dit_(model, "fp8")
    ref = model.blocks[0].ffn[0]
    w, s = ref.weight.clone(), ref.weight_scale.clone()
    model.to(torch.bfloat16)
    q = model.blocks[0].ffn[0]
    assert q.weight.dtype == torch.float8_e4m3fn and torch.equal(q.weight.view(torch.uint8), w.view(torch.uint8))
    assert q.weight_scale.dtype == torch.float32 and torch.equal(q.weight_scale, s)
    assert q.bias.dtype == torch.bfloat16 and model.head.head.weight.dtype == torch.bfloat16
    model.half()
    assert q.weight.dtype == torch.float8_e4m3fn and q.bias.dtype == torch.float16
    with torch.device("meta"):
        meta = _TinyDiT()
    quant.swap_to_quant_linear_(meta, "int8")
    meta.to(torch.bfloat16)
    assert meta.blocks[1].self_attn.o.weight.dtype == torch.int8 and meta.blocks[1].self_attn.o.weight.is_meta
    assert meta.blocks[1].self_attn.o.weight_scale.dtype == torch.float32


@pytest.mark.parametrize("scheme", SCHEMES)
def test_quant_linear_input_gelu_cpu(scheme):
    """QuantLinear(x, input_gelu=True) == QuantLinear(F.gelu(x, approximate="tanh")) (the DiT's ffn.2)."""
    torch.manual_seed(0)
    lin = quant.QuantLinear.from_linear(torch.nn.Linear(64, 48), scheme)
    x = torch.randn(3, 5, 64)
    assert torch.equal(lin(x, input_gelu=True), lin(F.gelu(x, approximate="tanh")))
    assert not torch.equal(lin(x, input_gelu=True), lin(x))


@pytest.mark.gpu
@pytest.mark.last
@pytest.mark.parametrize("scheme", SCHEMES)
def test_quant_linear_input_gelu_cuda(scheme):
    torch.manual_seed(0)
    lin = quant.QuantLinear.from_linear(torch.nn.Linear(8960, 1536).cuda().bfloat16(), scheme)
    x = torch.randn(1, 4096, 8960, device="cuda", dtype=torch.bfloat16)
    got = lin(x, input_gelu=True).float()
    want = lin(F.gelu(x, approximate="tanh")).float()
    assert ((got - want).norm() / want.norm()).item() < 2e-3


@pytest.mark.parametrize("scheme", SCHEMES)
def test_quant_linears_same_input_cpu(scheme):
    """Against the float linears (not the function's own per-module fallback): each output within the 8-bit
    error, and one per module."""
    torch.manual_seed(0)
    lins = [torch.nn.Linear(64, n) for n in (64, 64, 32)]
    mods = [quant.QuantLinear.from_linear(lin, scheme) for lin in lins]
    x = torch.randn(2, 7, 64)
    out = quant.quant_linears_same_input(x, mods)
    assert len(out) == len(mods)
    with torch.no_grad():
        for got, lin in zip(out, lins):
            want = lin(x)
            assert got.shape == want.shape
            assert ((got - want).norm() / want.norm()).item() < 0.05


@pytest.mark.gpu
@pytest.mark.last
@pytest.mark.parametrize("scheme", SCHEMES)
def test_quant_linears_same_input_cuda(scheme):
    """x quantized once for q, k, v: bit-identical to three separate QuantLinear calls."""
    torch.manual_seed(0)
    mods = [quant.QuantLinear.from_linear(torch.nn.Linear(1536, 1536).cuda().bfloat16(), scheme) for _ in range(3)]
    x = torch.randn(1, 4096, 1536, device="cuda", dtype=torch.bfloat16)
    out = quant.quant_linears_same_input(x, mods)
    assert len(out) == len(mods)
    for got, m in zip(out, mods):
        assert torch.equal(got, m(x))
