"""FA3-style Gluon attention (kernels/attention_gluon.py).

Gluon kernels do not run in Triton's CPU interpreter, so on the CPU machine the kernel is compiled for
sm_90a (Triton 3.6 + its ptxas) and its SASS checked; the "gluon" backend's fallback to the Triton kernel
is tested through the interpreter. The numerical tests run under the gpu marker against fp32 references
(rule: max |kernel - fp32 ref| <= 2 x the error of PyTorch SDPA in the run dtype + 1e-3), marked `last`
because the kernel had never run on a GPU when it was written.
"""
import importlib
import importlib.util
import os
import subprocess
import sys
import warnings

import pytest
import torch

from lightx2v_engine import ops
from lightx2v_engine.kernels import attention, set_attention_impl

from dit_fixtures import assert_attn_rule, attn_gpu_case, attn_qkv, attn_ref32, eager_and_graph_replay

A = importlib.import_module("lightx2v_engine.kernels.attention")
G = importlib.import_module("lightx2v_engine.kernels.attention_gluon")
_SASS = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "sass_stats.py")

needs_gluon = pytest.mark.skipif(not G.HAVE_GLUON, reason="this Triton has no Gluon (the pinned 3.6 has)")


# ----------------------------------------------------------------------------------------------------
# CPU: sm_90a compile and SASS of the key loop
# ----------------------------------------------------------------------------------------------------

_COMPILE = r'''
import importlib.util, json, sys, torch
spec = importlib.util.spec_from_file_location("sass_stats", sys.argv[1])
S = importlib.util.module_from_spec(spec); spec.loader.exec_module(S)
G = importlib.import_module("lightx2v_engine.kernels.attention_gluon")
A8 = importlib.import_module("lightx2v_engine.kernels.attention_8bit")
jobs = [(f"{n}/{d}", G.compile_signature(n, d)) for n in G.GLUON_CONFIGS for d in (torch.bfloat16, torch.float16)]
jobs += [(f"8bit:{n}", G.compile_signature8(G.GluonAttnConfig(c.block_n, c.num_stages, p_regs=c.p_regs)))
         for n, c in A8.ATTN8_CONFIGS.items() if c.gluon]
out = {}
for label, (fn, types, consts, opts) in jobs:
    r = S.compile_sm90(fn, types, consts, opts["num_warps"], 1, gluon=True, maxnreg=opts["maxnreg"])
    bodies = [b for b in S.mma_loop_bodies(r.pop("sass")) if any("MUFU.EX2" in t for t in b)]
    out[label] = dict(r, loop=dict(S.Counter(S._opcode(t) for t in bodies[0])) if bodies else {},
                      overlapped=S.overlapped_exps(bodies[0]) if bodies else None)
print("AOT" + json.dumps(out))
'''


@needs_gluon
def test_gluon_kernel_compiles_for_sm90():
    """Every config builds for sm_90a in bf16 and fp16 (and the 8-bit kernel's): warp-specialised, no
    spills, within the H100's 227 KB of shared memory; the consumers' key loop holds the 16 bf16 wgmma per
    block (8 for q K^T, 8 for P V with P from registers) or the 4 int8 + 4 fp8 ones, the 64 exponentials
    per thread, and no mask (the ragged block is peeled); and all 64 of those exponentials are issued
    between the wait for S_j and the wait for P_{j-1} V_{j-1}, so the softmax overlaps the second MMA
    (ptxas hoists that wait above them unless _anchor_pv_wait pins it)."""
    import json
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", _COMPILE, _SASS], capture_output=True, text=True, env=env,
                         timeout=600)
    line = next((ln for ln in res.stdout.splitlines() if ln.startswith("AOT")), None)
    assert line is not None, res.stdout[-3000:] + res.stderr[-3000:]
    info = json.loads(line[3:])
    A8 = importlib.import_module("lightx2v_engine.kernels.attention_8bit")
    gluon8 = {n: c for n, c in A8.ATTN8_CONFIGS.items() if c.gluon}
    assert len(info) == 2 * len(G.GLUON_CONFIGS) + len(gluon8) and len(gluon8) >= 3
    for name, r in info.items():
        loop = r["loop"]
        assert r["ws"] and r["spill"] == 0, f"{name}: ws {r['ws']}, {r['spill']} bytes of spills"
        assert r["smem"] <= 227 * 1024, f"{name}: {r['smem']} bytes of shared memory"
        assert r["overlapped"] is not None and r["overlapped"] >= 64, \
            f"{name}: {r['overlapped']} exponentials overlap P V (the wait for it was hoisted)"
        if name.startswith("8bit:"):
            igmma = sum(n for op, n in loop.items() if op.startswith("IGMMA"))
            qgmma = sum(n for op, n in loop.items() if op.startswith("QGMMA"))
            assert igmma == 4 and qgmma == 4, f"{name}: loop {loop}"
            assert not any(op.startswith("FSEL") for op in loop), f"{name}: loop {loop}"
            # P8 through shared memory (its STS in the loop), or in registers (no STS: the fp8 bytes are
            # only packed in place, by PRMT)
            sts = sum(n for op, n in loop.items() if op.startswith("STS"))
            if gluon8[name[5:]].p_regs:
                assert sts == 0 and not any(op.startswith("SHFL") and "BFLY" not in op for op in loop), loop
                assert sum(loop.values()) < 800, f"{name}: {sum(loop.values())} instructions per warp and key block"
            else:
                assert sts > 0 and not any(op.startswith("PRMT") for op in loop), f"{name}: loop {loop}"
                assert sum(loop.values()) < 600, f"{name}: {sum(loop.values())} instructions per warp and key block"
            continue
        hgmma = sum(n for op, n in loop.items() if op.startswith("HGMMA"))
        mufu = sum(n for op, n in loop.items() if op.startswith("MUFU.EX2"))
        fsel = sum(n for op, n in loop.items() if op.startswith("FSEL"))
        assert hgmma == 16 and 64 <= mufu <= 70, f"{name}: loop {loop}"
        assert fsel == 0, f"{name}: {fsel} selects in the key loop (the mask belongs to the peeled step)"
        assert sum(loop.values()) < 500, f"{name}: {sum(loop.values())} instructions per warp and key block"


# ----------------------------------------------------------------------------------------------------
# CPU: the "gluon" backend and its fallbacks
# ----------------------------------------------------------------------------------------------------

def test_gluon_backend_falls_back_to_triton_where_unavailable():
    """Without an sm90 GPU the "gluon" backend runs the Triton kernel (here through the interpreter) and
    says so in the ops line."""
    q, k, v = attn_qkv(2, 77, 45, 3, torch.float16, "cpu")
    try:
        set_attention_impl("gluon")
        assert A.attention_impl() == ("gluon", G.DEFAULT_GLUON_CONFIG)
        out = attention(q, k, v)
        assert "unavailable" in A.gluon_status(torch.device("cpu"))
    finally:
        set_attention_impl("default")
    torch.testing.assert_close(out, A.attention_triton(q, k, v), rtol=0, atol=0)
    assert_attn_rule(out, q, k, v, atol=1e-4)


def _gluon_standing_in(monkeypatch, kernel):
    """The Gluon path taken on the CPU with `kernel` as its kernel (not switched off); returns q, k, v."""
    monkeypatch.setattr(G, "available", lambda device=None: True)
    monkeypatch.setattr(G, "gluon_ok", lambda q, k, v: True)
    monkeypatch.setattr(G, "attention_gluon", kernel)
    monkeypatch.setattr(G, "_FAILED", None)
    return attn_qkv(1, 40, 40, 2, torch.float16, "cpu")


def test_gluon_failure_switches_it_off_with_one_warning(monkeypatch):
    """A Gluon kernel that fails (e.g. does not compile on some GPU) is switched off for the process after
    one warning naming the error; the call and later ones get the Triton kernel's result."""
    calls = []

    def broken(*a, **kw):
        calls.append(1)
        raise RuntimeError("PassManager::run failed")

    q, k, v = _gluon_standing_in(monkeypatch, broken)
    try:
        set_attention_impl("gluon")
        with pytest.warns(RuntimeWarning, match="PassManager::run failed"):
            out = attention(q, k, v)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out2 = attention(q, k, v)
    finally:
        set_attention_impl("default")
    assert len(calls) == 1 and "PassManager" in A.gluon_status()
    torch.testing.assert_close(out, A.attention_triton(q, k, v), rtol=0, atol=0)
    torch.testing.assert_close(out2, out, rtol=0, atol=0)


def test_gluon_out_of_memory_is_raised_and_leaves_it_on(monkeypatch):
    """An out-of-memory error inside the Gluon call is transient, not the kernel's failure: it is raised and
    the kernel stays on (it switched Gluon off for the process, ~11% of attention speed on the H100)."""
    def oom(*a, **kw):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    q, k, v = _gluon_standing_in(monkeypatch, oom)
    try:
        set_attention_impl("gluon")
        with pytest.raises(torch.OutOfMemoryError):
            attention(q, k, v)
    finally:
        set_attention_impl("default")
    assert G.failure() is None


def test_gluon_input_checks():
    q, k, v = attn_qkv(1, 8, 8, 1, torch.float16, "cpu")
    assert not G.gluon_ok(q, k, v)  # CPU tensors
    if G.HAVE_GLUON:
        with pytest.raises(ValueError, match="head_dim 128"):
            G.attention_gluon(q, k, v)
    q64 = torch.randn(1, 8, 2, 64, dtype=torch.float16)
    assert not G.gluon_ok(q64, q64, q64)
    with pytest.raises(ValueError, match="Gluon attention config"):
        set_attention_impl(gluon_config="fa3_nope")


def test_rows_view_check():
    """The 2D TMA view [B*L, H*D] needs unit D stride, heads D apart and batches L rows apart."""
    x = torch.empty(2, 10, 3 * 256, dtype=torch.bfloat16)
    q = x[..., :256].unflatten(-1, (2, 128))  # a slice of a fused projection: row stride 768
    assert G._rows_view_ok(q)
    assert not G._rows_view_ok(torch.empty(2, 10, 2, 128, dtype=torch.bfloat16).transpose(1, 2).transpose(1, 2)[:, :5])
    assert not G._rows_view_ok(torch.empty(2, 2, 10, 128, dtype=torch.bfloat16).transpose(1, 2))


def test_env_choice_of_gluon_config(monkeypatch):
    monkeypatch.setenv("LX2V_ATTN_GLUON_CONFIG", "fa3_nopp_128x128_s2")
    assert A._env_gluon_config() == "fa3_nopp_128x128_s2"
    monkeypatch.setenv("LX2V_ATTN_GLUON_CONFIG", "fa3")
    with pytest.raises(ValueError, match="LX2V_ATTN_GLUON_CONFIG"):
        A._env_gluon_config()


# ----------------------------------------------------------------------------------------------------
# GPU (sm90): numerics at odd and real shapes, strided views, CUDA-graph replay
# ----------------------------------------------------------------------------------------------------

gpu_sm90 = pytest.mark.skipif(not G.available(), reason="needs an sm90 GPU and Gluon")


@pytest.mark.gpu
@pytest.mark.last
@gpu_sm90
@pytest.mark.parametrize("config", list(G.GLUON_CONFIGS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B, Lq, Lk, H", [(1, 77, 77, 3), (2, 77, 33, 3), (1, 300, 1000, 2), (2, 1000, 300, 2),
                                          (1, 129, 128, 1), (1, 128, 256, 2), (2, 4101, 4101, 2), (1, 333, 769, 2)])
def test_gluon_attention_odd_shapes(config, dtype, B, Lq, Lk, H):
    q, k, v = attn_qkv(B, Lq, Lk, H, dtype, "cuda")
    out = G.attention_gluon(q, k, v, config)
    assert out.shape == q.shape and out.dtype == dtype and torch.isfinite(out).all()
    assert_attn_rule(out, q, k, v, atol=1e-3)


@pytest.mark.gpu
@pytest.mark.last
@gpu_sm90
@pytest.mark.parametrize("config", list(G.GLUON_CONFIGS))
@pytest.mark.parametrize("H, Lq, Lk", [(12, 32760, 32760), (12, 32760, 512), (40, 32760, 257)])
def test_gluon_attention_real_shapes(config, H, Lq, Lk):
    q, k, v, ref32, base = attn_gpu_case(H, Lq, Lk)
    err = (G.attention_gluon(q, k, v, config).float() - ref32).abs().max().item()
    assert err <= 2 * base + 1e-3, f"{config}: err {err:.3e} > 2 x SDPA bf16 err {base:.3e} + 1e-3"


@pytest.mark.gpu
@pytest.mark.last
@gpu_sm90
def test_gluon_attention_strided_views_and_out():
    """q, k, v as head views of fused projections (row stride 3C / 2C), two batches; `out` a view too."""
    torch.manual_seed(0)
    B, L, H = 2, 300, 2
    qkv = torch.randn(B, L, 3 * H * 128, device="cuda").bfloat16()
    q = qkv[..., : H * 128].unflatten(-1, (H, 128))
    kv = torch.randn(B, 513, 2 * H * 128, device="cuda").bfloat16()
    k, v = (t.unflatten(-1, (H, 128)) for t in kv.split(H * 128, dim=-1))
    buf = torch.zeros(B, L, 2 * H * 128, device="cuda", dtype=torch.bfloat16)
    out = buf[..., H * 128:].unflatten(-1, (H, 128))
    G.attention_gluon(q, k, v, out=out)
    assert torch.count_nonzero(buf[..., : H * 128]) == 0  # nothing written outside `out`
    assert_attn_rule(out, q, k, v, atol=1e-3)


@pytest.mark.gpu
@pytest.mark.last
@gpu_sm90
@pytest.mark.parametrize("stages, p_regs", [(2, False), (3, False), (3, True)])
@pytest.mark.parametrize("B, Lq, Lk, H", [(1, 77, 77, 3), (2, 50, 200, 2), (1, 130, 257, 1), (2, 300, 128, 2),
                                          (1, 32760, 32760, 12)])
def test_gluon_attention_8bit(stages, p_regs, B, Lq, Lk, H):
    """The 8-bit Gluon kernel against exact attention, with the 8-bit rule of test_kernel_attention_8bit
    (rel. L2 <= 1.25 x that of the same quantisation done by PyTorch + 0.005); p_regs: P8 in registers on
    key-permuted v."""
    A8 = importlib.import_module("lightx2v_engine.kernels.attention_8bit")
    q, k, v = attn_qkv(B, Lq, Lk, H, torch.bfloat16, "cuda")
    out = G.attention_8bit_gluon(q, k, v, G.GluonAttnConfig(128, stages, p_regs=p_regs))
    assert G.failure() is None and torch.isfinite(out).all()
    exact = attn_ref32(q, k, v)
    rel = lambda a: ((a.float() - exact).norm() / exact.norm()).item()  # noqa: E731
    base = rel(A8.attention_8bit_ref(q, k, v)) if Lq * Lk <= 1 << 24 else 0.036  # ref: O(Lq Lk) memory
    assert rel(out) <= 1.25 * base + 0.005, f"rel. err {rel(out):.4f}, reference {base:.4f}"


@pytest.mark.gpu
@pytest.mark.last
@gpu_sm90
def test_gluon_backend_in_cuda_graph_and_dispatch():
    """The "gluon" backend through the public op: it runs the Gluon kernel (not the fallback) and replays
    inside a CUDA graph with the eager result."""
    q, k, v = attn_qkv(1, 1000, 300, 2, torch.bfloat16, "cuda")
    try:
        set_attention_impl("gluon")
        want, out = eager_and_graph_replay(lambda: attention(q, k, v))
        assert A.gluon_status(q.device) == "available", A.gluon_status(q.device)
        assert "gluon fa3" in ops.describe(q.device)
    finally:
        set_attention_impl("default")
    assert torch.equal(out, want)
    torch.testing.assert_close(want, G.attention_gluon(q, k, v), rtol=0, atol=0)
    assert_attn_rule(want, q, k, v, atol=1e-3)


def test_ops_line_names_the_gluon_fallback():
    """The ops line (logged by the pipeline, recorded by bench_e2e) says when a Gluon choice cannot run."""
    A8 = importlib.import_module("lightx2v_engine.kernels.attention_8bit")
    try:
        ops.set_backend("kernels")
        A8.set_attention_8bit_config("gluon_fa3_128x128_s2")
        set_attention_impl("gluon")
        if ops.attention_8bit_available(torch.device("cpu")):  # the interpreter (CPU machines)
            line = ops.describe(torch.device("cpu"), attn_8bit=True)
            assert "8-bit gluon_fa3_128x128_s2 (unavailable" in line, line
        line = ops.describe(torch.device("cpu"))
        assert f"self-attention gluon {G.DEFAULT_GLUON_CONFIG} (unavailable" in line, line
    finally:
        set_attention_impl("default")
        A8.set_attention_8bit_config("default")
        ops.set_backend("auto")
