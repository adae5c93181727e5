"""Fused q/k RMSNorm + 3D RoPE kernel (kernels/qk_norm_rope.py) vs fp32 references.

Rule: max |kernel - fp32 ref| <= FACTOR * max |PyTorch run-dtype ref - fp32 ref| + atol, FACTOR 2. The CPU
interpreter casts fp32 -> bf16 by truncation instead of round-to-nearest, and Wan's norm+RoPE rounds three
times (norm, weight, output), each losing up to a full ulp instead of half: bf16 on CPU gets FACTOR 4
(fp16 casts are exact in the interpreter and keep FACTOR 2).
"""
import importlib
import re

import pytest
import torch

from lightx2v_engine.kernels import qk_norm_rope
from lightx2v_engine.kernels.qk_norm_rope import qk_norm_rope_ref
from lightx2v_engine.ops import rope_tables

QK = importlib.import_module("lightx2v_engine.kernels.qk_norm_rope")  # the module, not the function

EPS = 1e-6


def _rope_complex(x, cos, sin):
    """Independent RoPE: interleaved pairs as complex numbers times e^{i angle}. x [B, L, H, D] fp32."""
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)).contiguous())
    rot = torch.complex(cos, sin)[None, :, None, :]
    return torch.view_as_real(xc * rot).flatten(-2)


def _inputs(B, grid, H, dtype, device, fused_qkv=False):
    torch.manual_seed(0)
    L = grid[0] * grid[1] * grid[2]
    C = H * 128
    if fused_qkv:  # q, k as column slices of one [B, L, 3C] projection: row stride 3C
        qkv = (torch.randn(B, L, 3 * C, device=device) * 2).to(dtype)
        q, k, _ = qkv.split(C, dim=-1)
    else:
        q = (torch.randn(B, L, C, device=device) * 2).to(dtype)
        k = (torch.randn(B, L, C, device=device) + 0.3).to(dtype)
    wq = torch.rand(C, device=device) + 0.5
    wk = torch.rand(C, device=device) + 0.5
    rope = rope_tables(grid, 128, device=device)
    return q, k, wq, wk, rope.cos, rope.sin


def _run(B, grid, H, dtype, device, fused_qkv=False):
    q, k, wq, wk, cos, sin = _inputs(B, grid, H, dtype, device, fused_qkv)
    qh, kh = qk_norm_rope(q, k, wq, wk, cos, sin, H, EPS)
    L, C = q.shape[1], q.shape[2]
    assert qh.shape == (B, L, H, C // H) and qh.dtype == dtype and qh.is_contiguous()
    factor = 4.0 if (dtype == torch.bfloat16 and device == "cpu") else 2.0
    q32, k32 = qk_norm_rope_ref(q.float(), k.float(), wq, wk, cos, sin, H, EPS)
    ql, kl = qk_norm_rope_ref(q, k, wq, wk, cos, sin, H, EPS)
    for got, ref32, lowp in ((qh, q32, ql), (kh, k32, kl)):
        err = (got.float() - ref32).abs().max().item()
        base = (lowp.float() - ref32).abs().max().item()
        assert err <= factor * base + 1e-3, f"err {err:.3e} vs torch {dtype} err {base:.3e}"
    return q, k, wq, wk, cos, sin, qh, kh


@pytest.mark.parametrize("B", [1, 2])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_qk_norm_rope(B, dtype):
    _run(B, (3, 5, 7), 3, dtype, "cpu")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_qk_norm_rope_strided_views(dtype):
    _run(2, (2, 3, 4), 2, dtype, "cpu", fused_qkv=True)


def test_qk_norm_rope_fp32_matches_independent_rope():
    """fp32 end to end: RMSNorm then complex-number RoPE on the (f, h, w) tables, to fp32 rounding."""
    q, k, wq, wk, cos, sin = _inputs(1, (3, 5, 7), 3, torch.float32, "cpu")
    qh, kh = qk_norm_rope(q, k, wq, wk, cos, sin, 3, EPS)
    for x, w, got in ((q, wq, qh), (k, wk, kh)):
        n = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * w
        want = _rope_complex(n.unflatten(-1, (3, 128)), cos, sin)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


def test_bad_tables_raise():
    q, k, wq, wk, cos, sin = _inputs(1, (1, 2, 3), 1, torch.bfloat16, "cpu")
    with pytest.raises(ValueError, match="cos must be fp32"):
        qk_norm_rope(q, k, wq, wk, cos[:, :32], sin, 1)
    with pytest.raises(ValueError, match="heads"):
        qk_norm_rope(q, k, wq, wk, cos, sin, 3)


def test_opcheck_and_compile():
    q, k, wq, wk, cos, sin = _inputs(1, (1, 2, 3), 2, torch.bfloat16, "cpu")
    torch.library.opcheck(torch.ops.lightx2v.qk_norm_rope.default, (q, k, wq, wk, cos, sin, 2, EPS),
                          test_utils=("test_schema", "test_faketensor"))
    f = torch.compile(lambda *a: qk_norm_rope(*a, 2, EPS), backend="aot_eager", fullgraph=True)
    got = f(q, k, wq, wk, cos, sin)
    want = qk_norm_rope(q, k, wq, wk, cos, sin, 2, EPS)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.gpu
@pytest.mark.parametrize("H", [12, 40])
def test_qk_norm_rope_gpu_real_shapes(H):
    _run(1, (21, 30, 52), H, torch.bfloat16, "cuda")


@pytest.mark.parametrize("impl", ["tile", "chunk", "packed", "onepass_r2", "onepass_r1_t8", "onepass_loop8_s2",
                                  "onepass_r1_qk1"])
@pytest.mark.parametrize("B, fused_qkv", [(1, False), (2, True)])
def test_qk_norm_rope_tile_variant(B, fused_qkv, impl):
    """The "tile", "chunk", "packed" and "onepass" kernel variants (several tokens per program, pairs split
    in registers; chunk: C = 384 in three exact 128-column chunks; packed: int32 words of pairs; onepass:
    a row in registers, 3 heads = 2 + 1 in two parts, B * L = 15 or 30 rows: the last program of
    onepass_r2 and of onepass_loop8_s2, a pipelined loop over 8 rows, has rows past the end) under the same
    rule."""
    import importlib
    mod = importlib.import_module("lightx2v_engine.kernels.qk_norm_rope")  # the module, not the function
    device = "cuda" if torch.cuda.is_available() else "cpu"
    mod.set_qk_rope_impl(impl)
    try:
        q, k, wq, wk, cos, sin, qh, kh = _run(B, (1, 3, 5), 3, torch.float16, device, fused_qkv)
    finally:
        mod.set_qk_rope_impl("default")
    mod.set_qk_rope_impl("row")
    try:
        qr, kr = qk_norm_rope(q, k, wq, wk, cos, sin, 3, EPS)
    finally:
        mod.set_qk_rope_impl("default")
    # both variants compute the same thing, up to a rounding flip from the summation order (one fp16 ulp)
    assert (qh.float() - qr.float()).abs().max().item() <= 2 ** -10 * qr.float().abs().max().item()
    with pytest.raises(ValueError, match="row"):
        mod.set_qk_rope_impl("warp")


def test_chunk_sizes():
    import importlib
    mod = importlib.import_module("lightx2v_engine.kernels.qk_norm_rope")
    assert mod._chunk_size(1536, 128) == 512 and mod._chunk_size(5120, 128) == 512
    assert mod._chunk_size(384, 128) == 128 and mod._chunk_size(96, 32) == 32
    assert mod._chunk_size(6, 6) is None  # "chunk" falls back to "tile" there
    # "packed" counts pairs: 1.3B and 14B rows in 256-pair chunks of whole 64-pair heads
    assert mod._chunk_size(768, 64, largest=256) == 256 and mod._chunk_size(2560, 64, largest=256) == 256


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_packed_variant_is_pytorchs_rounding_and_falls_back(dtype):
    """"packed" rounds to nearest even by bit arithmetic, as PyTorch does (the interpreter's casts
    truncate, hence the 4x rule for the others): its result is PyTorch's run-dtype result up to a one-ulp
    flip. Inputs that cannot be viewed as int32 words (odd offset) run the "tile" kernel instead."""
    import importlib
    mod = importlib.import_module("lightx2v_engine.kernels.qk_norm_rope")
    q, k, wq, wk, cos, sin = _inputs(1, (3, 5, 7), 3, dtype, "cpu")
    ql, kl = qk_norm_rope_ref(q, k, wq, wk, cos, sin, 3, EPS)
    wide = torch.cat([torch.zeros(1, q.shape[1], 1, dtype=dtype), q], dim=-1)
    odd = wide[..., 1:]  # storage offset 1: no int32 view
    mod.set_qk_rope_impl("packed")
    try:
        qp, kp = qk_norm_rope(q, k, wq, wk, cos, sin, 3, EPS)
        qo, _ = qk_norm_rope(odd, k, wq, wk, cos, sin, 3, EPS)
    finally:
        mod.set_qk_rope_impl("default")
    ulp = 2 ** -7 if dtype == torch.bfloat16 else 2 ** -10
    for got, want in ((qp, ql), (kp, kl)):
        diff = (got.float() - want.float()).abs() > ulp * want.float().abs().clamp_min(1e-3)
        assert diff.float().mean().item() < 1e-3, diff.float().mean().item()
    assert (qo.float() - ql.float()).abs().max().item() <= 4 * (ql.float() - qk_norm_rope_ref(
        q.float(), k.float(), wq, wk, cos, sin, 3, EPS)[0]).abs().max().item() + 1e-3


_SASS_PRELUDE = r"""
import importlib, re, sys
from collections import Counter
spec = importlib.util.spec_from_file_location("sass_stats", sys.argv[1])
S = importlib.util.module_from_spec(spec); spec.loader.exec_module(S)
Q = importlib.import_module("lightx2v_engine.kernels.qk_norm_rope")
types = dict(X="*i32", W2="*fp32", COS="*fp32", SIN="*fp32", O="*i32", eps="fp32")
def report(tag, r):
    ops = Counter(re.findall(r"\b((?:LDG|STG|LDS|STS|LDSM|STSM|LDGSTS|F2F)[.\w]*)", r["sass"]))
    print("SASS", tag, r["spill"], " ".join(f"{k}={v}" for k, v in sorted(ops.items())))
"""


def _sass_reports(body: str, n: int) -> list[tuple[str, str, str, dict]]:
    """Runs _SASS_PRELUDE + body (which compiles kernels for sm_90a and calls report("<C> <tag>", result))
    in a process without the interpreter; returns n (C, tag, spill bytes, {instruction: count})."""
    import os
    import subprocess
    import sys
    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "sass_stats.py")
    env = {kk: vv for kk, vv in os.environ.items() if kk != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", _SASS_PRELUDE + body, path], capture_output=True, text=True, env=env,
                         timeout=300)
    lines = [ln.split() for ln in res.stdout.splitlines() if ln.startswith("SASS")]
    assert len(lines) == n, res.stdout[-2000:] + res.stderr[-2000:]
    return [(C, tag, spill, dict(o.split("=") for o in ops)) for _, C, tag, spill, *ops in lines]


def test_packed_variant_sass_moves_16_bytes_per_instruction():
    """sm_90a SASS of "packed" at the 1.3B and 14B widths, bf16 and fp16: every global load and store is
    128-bit and no shared-memory layout conversion remains (only the row reduction's STS/LDS)."""
    body = """
for C in (1536, 5120):
    for bf in (True, False):
        chunk = Q._chunk_size(C // 2, 64, largest=256)
        consts = dict(HEAD_D=128, BLOCK_R=4, CHUNK2=chunk, N_CHUNKS=C // 2 // chunk, IS_BF16=bf)
        report(f"{C} {bf}", S.compile_sm90(Q._rms_rope_packed_kernel, types, consts,
                                           max(1, min(8, 4 * chunk // 128)), 1, div16=("C2",)))
"""
    for C, bf, spill, ops in _sass_reports(body, 4):
        assert spill == "0", (C, bf, spill)
        glob = {k: v for k, v in ops.items() if k.startswith(("LDG", "STG"))}
        assert set(glob) == {"LDG.E.128", "STG.E.128"}, (C, bf, ops)
        assert not any(k.startswith(("LDSM", "STSM", "LDS.", "STS.")) for k in ops), (C, bf, ops)
        assert re.fullmatch(r"\d", ops.get("STS", "0")), (C, bf, ops)


def _onepass_sass(names: tuple[str, ...]) -> list[tuple[str, str, str, dict]]:
    """_sass_reports of the bf16 onepass kernel at C 1536 and 5120 for each variant in names."""
    body = f"""
for C in (1536, 5120):
    a, b = Q._head_parts(C // 128)
    for name in {names!r}:
        rows, t, st, _, cvt2 = Q.ONEPASS_CONFIGS[name]
        warps = Q._onepass_warps((a + b) * 64, t)
        consts = dict(H=C // 128, HALF_D=64, NH_A=a, NH_B=b, ROWS=rows, IS_BF16=True, STAGES=st, CVT2=int(cvt2))
        report(f"{{C}} {{name}}", S.compile_sm90(Q._rms_rope_onepass_kernel, types, consts, warps, max(1, st),
                                               div16=("C2",)))
"""
    return _sass_reports(body, 2 * len(names))


def _words_per_thread(C: int, name: str) -> int:
    """int32 words of a C-wide row that one thread of the onepass variant `name` handles."""
    a, b = QK._head_parts(C // 128)
    return (a + b) * 64 // (QK._onepass_warps((a + b) * 64, QK.ONEPASS_CONFIGS[name][1]) * 32)


def test_onepass_sass_has_no_layout_conversion_and_pipelines_its_loop():
    """sm_90a SASS of "onepass" at the 1.3B and 14B widths: no spills, no shared-memory layout conversion
    (the weights and cos/sin share the row's layout; STS/LDS only for the row reduction), 128-bit stores;
    the loop variants load the next row by cp.async (LDGSTS)."""
    for C, name, spill, ops in _onepass_sass(("onepass_r1", "onepass_loop8_t8_s2")):
        assert spill == "0", (C, name, spill)
        assert not any(k.startswith(("LDSM", "STSM")) for k in ops), (C, name, ops)
        assert "STG.E.128" in ops and not any(k.startswith("STS.") for k in ops), (C, name, ops)
        assert int(ops.get("STS", "0")) <= 4, (C, name, ops)  # the two-level row reduction's scratch
        assert ("loop" in name) == any(k.startswith("LDGSTS") for k in ops), (C, name, ops)


def test_onepass_cvt2_rounds_each_pair_in_one_packed_conversion():
    """"*_cvt2": in bf16 the same bits as the variant without it (on the CPU its packed conversion is
    emulated: the interpreter runs no PTX), fp16 unchanged; in the sm_90a SASS at both widths each rounding
    of a pair word is one F2FP.BF16.F32.PACK_AB (3 a word) and no F2F.BF16.F32 is left (the PTX's operand
    order is checked by the GPU tests, which compare the outputs with the reference)."""
    for dtype in (torch.bfloat16, torch.float16):
        q, k, wq, wk, cos, sin = _inputs(1, (1, 3, 5), 3, dtype, "cpu", True)
        outs = []
        for name in ("onepass_r1", "onepass_r1_cvt2", "onepass_loop8_t8_s2_cvt2", "onepass_r1_qk1_cvt2"):
            qo, ko = torch.empty_like(q), torch.empty_like(k)
            assert QK._launch_onepass(q, k, wq, wk, cos, sin, 3, EPS, qo, ko, QK.ONEPASS_CONFIGS[name])
            outs.append(torch.cat([qo, ko]))
        assert all(torch.equal(outs[0], o) for o in outs[1:]), dtype
    QK.set_qk_rope_impl("onepass_r2_cvt2")
    try:
        _run(1, (1, 3, 5), 3, torch.bfloat16, "cpu")
    finally:
        QK.set_qk_rope_impl("default")
    got = {(C, name): ops for C, name, spill, ops in _onepass_sass(("onepass_r1", "onepass_r1_cvt2"))}
    for C in ("1536", "5120"):
        plain, cvt2 = got[(C, "onepass_r1")], got[(C, "onepass_r1_cvt2")]
        words = _words_per_thread(int(C), "onepass_r1_cvt2")
        assert int(plain.get("F2F.BF16.F32", 0)) >= 6 * words and "F2FP.BF16.F32.PACK_AB" not in plain, plain
        assert int(cvt2.get("F2FP.BF16.F32.PACK_AB", 0)) == 3 * words and "F2F.BF16.F32" not in cvt2, cvt2


def test_onepass_head_parts_and_fallback():
    """Head counts split into two power-of-two parts (padding part A where that is impossible); the variant
    launches where it applies, and falls back where a half head is not a power of two (D = 96: 48 pairs;
    "chunk" does not apply there either, so "tile" runs)."""
    assert QK._head_parts(40) == (32, 8) and QK._head_parts(12) == (8, 4) and QK._head_parts(16) == (16, 0)
    assert QK._head_parts(3) == (2, 1) and QK._head_parts(1) == (1, 0) and QK._head_parts(7) == (8, 0)
    q, k, wq, wk, cos, sin = _inputs(1, (1, 2, 3), 3, torch.float16, "cpu")
    qo, ko = torch.empty_like(q), torch.empty_like(k)
    assert QK._launch_onepass(q, k, wq, wk, cos, sin, 3, EPS, qo, ko, QK.ONEPASS_CONFIGS["onepass_r1"])
    want = qk_norm_rope_ref(q, k, wq, wk, cos, sin, 3, EPS)
    for g, r in zip((qo, ko), want):  # PyTorch's fp16 result up to a rounding flip (summation order)
        assert (g.view_as(r).float() - r.float()).abs().max().item() <= 2 ** -10 * r.float().abs().max().item()
    torch.manual_seed(0)
    q, k = torch.randn(2, 1, 5, 7 * 96).to(torch.float16).unbind(0)
    w = torch.rand(7 * 96) + 0.5
    ang = torch.rand(5, 48) * 6
    qo, ko = torch.empty_like(q), torch.empty_like(k)
    assert not QK._launch_onepass(q, k, w, w, ang.cos(), ang.sin(), 7, EPS, qo, ko, (1, 16, 0, False, False))
    QK.set_qk_rope_impl("onepass_r1")
    try:
        got = qk_norm_rope(q, k, w, w, ang.cos(), ang.sin(), 7, EPS)
    finally:
        QK.set_qk_rope_impl("default")
    want = qk_norm_rope_ref(q, k, w, w, ang.cos(), ang.sin(), 7, EPS)
    for g, r in zip(got, want):
        assert (g.float() - r.float()).abs().max().item() <= 2 ** -9 * r.float().abs().max().item()
    # "_qk1" reads the weights in place as int64 words; weights at an odd storage offset cannot be viewed
    # so, and the two-launch path runs with the same config
    q, k, wq, wk, cos, sin = _inputs(1, (1, 2, 3), 3, torch.float16, "cpu")
    want = qk_norm_rope_ref(q, k, wq, wk, cos, sin, 3, EPS)
    for wq_, wk_ in ((wq, wk), (torch.cat([wq[:1], wq])[1:], torch.cat([wk[:1], wk])[1:])):
        qo, ko = torch.empty_like(q), torch.empty_like(k)
        assert QK._launch_onepass(q, k, wq_, wk_, cos, sin, 3, EPS, qo, ko, QK.ONEPASS_CONFIGS["onepass_r1_qk1"])
        for g, r in zip((qo, ko), want):
            assert (g.view_as(r).float() - r.float()).abs().max().item() <= 2 ** -10 * r.float().abs().max().item()
    # weights in another dtype (bf16) would be misread as int64 pairs of fp32: the two launches run
    wb, kb = wq.to(torch.bfloat16), wk.to(torch.bfloat16)
    outs = []
    for name in ("onepass_r1", "onepass_r1_qk1"):
        qo, ko = torch.empty_like(q), torch.empty_like(k)
        assert QK._launch_onepass(q, k, wb, kb, cos, sin, 3, EPS, qo, ko, QK.ONEPASS_CONFIGS[name])
        outs.append((qo, ko))
    assert all(torch.equal(a, b) for a, b in zip(*outs))
    with pytest.raises(ValueError, match="onepass_r1"):  # an explicit variant name is checked
        QK.launch_qk_norm_rope(q, k, w, w, ang.cos(), ang.sin(), 7, EPS, qo, ko, impl="onepass_r3")


@pytest.mark.parametrize("H", [7, 5])
def test_onepass_padded_and_split_heads(H):
    """onepass at 7 heads (part A padded to 8, its eighth head masked) and 5 heads (4 + 1), fp16."""
    QK.set_qk_rope_impl("onepass_r4")
    try:
        _run(1, (1, 3, 5), H, torch.float16, "cpu")
    finally:
        QK.set_qk_rope_impl("default")


@pytest.mark.gpu
@pytest.mark.last
@pytest.mark.parametrize("impl", list(QK.ONEPASS_CONFIGS))
@pytest.mark.parametrize("H", [5, 7])
def test_onepass_variants_gpu_odd_shapes(H, impl):
    """On the GPU: two batches of q/k as column slices of a fused qkv projection, 105 tokens (the last
    program of every multi-row variant has rows past the end), 5 heads (4 + 1) and 7 (part A padded)."""
    mod = importlib.import_module("lightx2v_engine.kernels.qk_norm_rope")
    mod.set_qk_rope_impl(impl)
    try:
        _run(2, (3, 5, 7), H, torch.bfloat16, "cuda", fused_qkv=True)
    finally:
        mod.set_qk_rope_impl("default")


@pytest.mark.gpu
@pytest.mark.last
@pytest.mark.parametrize("impl", ["tile", "chunk", "packed", *QK.ONEPASS_CONFIGS])
@pytest.mark.parametrize("H", [12, 40])
def test_qk_norm_rope_variants_gpu_real_shapes(H, impl):
    import importlib
    mod = importlib.import_module("lightx2v_engine.kernels.qk_norm_rope")
    mod.set_qk_rope_impl(impl)
    try:
        _run(1, (21, 30, 52), H, torch.bfloat16, "cuda")
    finally:
        mod.set_qk_rope_impl("default")
