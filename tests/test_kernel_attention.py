"""Flash-attention kernel (kernels/attention.py) vs fp32 references.

Rule: max |kernel - fp32 ref| <= 2 * max |PyTorch SDPA in the run dtype - fp32 ref| + atol. On the CPU
interpreter the inputs are fp16: its tl.dot on bf16 operands is not usable (the GPU runs bf16, tested
under the gpu marker).
"""
import os
import subprocess
import sys

import pytest
import torch

from lightx2v_engine import ops
from lightx2v_engine.kernels import attention, self_attention, set_attention_impl
from lightx2v_engine.kernels.attention import ATTN_CONFIGS, attention_impl, attention_triton, self_attention_ref
from lightx2v_engine.kernels.qk_norm_rope import qk_norm_rope_ref
from lightx2v_engine.ops import attention_ref

from dit_fixtures import (assert_attn_rule, attn_gpu_case, attn_qkv, attn_ref32, eager_and_graph_replay,
                          self_attn_inputs)


@pytest.mark.parametrize("config", list(ATTN_CONFIGS))
@pytest.mark.parametrize("B, Lq, Lk", [(1, 77, 77), (2, 77, 33), (1, 50, 320), (1, 70, 256)])  # 256: EVEN_N, no mask
def test_attention_configs(config, B, Lq, Lk):
    q, k, v = attn_qkv(B, Lq, Lk, 3, torch.float16, "cpu")
    out = attention_triton(q, k, v, config)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert_attn_rule(out, q, k, v)


@pytest.mark.parametrize("config", ["ptr_256x64_w8_s3", "tma_pipe_128x128_w8_s2", "ws_128x128_w4_s2"])
def test_attention_strided_views_cross(config):
    """q from unflatten of a fused [B, L, 3C] projection (row stride 3C); cross-attention k/v, Lk = 257."""
    torch.manual_seed(0)
    B, L, H = 1, 100, 2
    qkv = torch.randn(B, L, 3 * H * 128).half()
    q = qkv[..., : H * 128].unflatten(-1, (H, 128))
    kv = torch.randn(B, 257, 2 * H * 128).half()
    k, v = (t.unflatten(-1, (H, 128)) for t in kv.split(H * 128, dim=-1))
    assert not q.is_contiguous() and not k.is_contiguous()
    out = attention_triton(q, k, v, config)
    assert_attn_rule(out, q, k, v)


def test_attention_public_op_and_policy():
    q, k, v = attn_qkv(1, 40, 19, 2, torch.float16, "cpu")
    assert attention_impl()[0] == "triton"
    assert_attn_rule(attention(q, k, v), q, k, v)
    try:
        set_attention_impl("sdpa_flash")  # PyTorch's flash kernel exists on CPU too
        assert_attn_rule(attention(q, k, v), q, k, v)
    finally:
        set_attention_impl("default")
    # cross-attention (the generic op) on its own backend; self-attention unaffected
    from lightx2v_engine.kernels.attention import cross_attention_impl
    try:
        set_attention_impl(cross_impl="sdpa_flash")
        assert cross_attention_impl() == "sdpa_flash" and attention_impl()[0] == "triton"
        torch.testing.assert_close(attention(q, k, v), attention_ref(q, k, v).contiguous(), rtol=0, atol=0)
    finally:
        set_attention_impl(cross_impl="default")
    assert cross_attention_impl() == "triton"
    with pytest.raises(ValueError, match="cross-attention impl must be"):
        set_attention_impl(cross_impl="cudnn")
    with pytest.raises(ValueError, match="attention impl must be one of"):
        set_attention_impl("cudnn")
    with pytest.raises(ValueError, match="config must be one of"):
        set_attention_impl(config="nope")


def test_self_attention_heads_follows_self_attention_backend():
    """self_attention_heads (sequence parallel's whole-sequence attention) runs self-attention's backend,
    not cross-attention's: with cross-attention on SDPA it still runs the Triton kernel (odd lengths)."""
    from lightx2v_engine.kernels import self_attention_heads
    q, k, v = attn_qkv(1, 45, 45, 3, torch.float16, "cpu")
    try:
        set_attention_impl(cross_impl="sdpa_flash")
        got = self_attention_heads(q, k[:, :37], v[:, :37])  # a sliced view, as after the all-to-all
        assert torch.equal(got, attention_triton(q, k[:, :37], v[:, :37]))
        assert not torch.equal(got, attention(q, k[:, :37], v[:, :37]))
        set_attention_impl("sdpa_flash", cross_impl="default")
        assert torch.equal(self_attention_heads(q, k, v), attention(q, k, v))  # "default": self's backend
    finally:
        set_attention_impl("default", cross_impl="default")
    assert_attn_rule(self_attention_heads(q, k, v), q, k, v)
    torch.library.opcheck(torch.ops.lightx2v.self_attention_heads.default, (q, k, v),
                          test_utils=("test_schema", "test_faketensor"))


def test_env_policy(monkeypatch):
    import importlib
    mod = importlib.import_module("lightx2v_engine.kernels.attention")  # the module (the package exports the function)
    monkeypatch.setenv("LX2V_ATTN", "sdpa_cudnn")
    monkeypatch.setenv("LX2V_ATTN_CONFIG", "ws_128x128_w4_s2")
    assert mod._env_impl() == "sdpa_cudnn" and mod._env_config() == "ws_128x128_w4_s2"
    monkeypatch.setenv("LX2V_ATTN", "flash3")
    with pytest.raises(ValueError, match="LX2V_ATTN must be one of"):
        mod._env_impl()
    monkeypatch.setenv("LX2V_CROSS_ATTN", "sdpa_cudnn")
    assert mod._env_cross_impl() == "sdpa_cudnn"
    monkeypatch.setenv("LX2V_CROSS_ATTN", "cudnn")
    with pytest.raises(ValueError, match="LX2V_CROSS_ATTN must be one of"):
        mod._env_cross_impl()


def test_attention_bad_inputs_raise():
    q, k, v = attn_qkv(1, 8, 8, 1, torch.float16, "cpu")
    with pytest.raises(ValueError, match="fp16 or bf16"):
        attention(q.float(), k.float(), v.float())
    with pytest.raises(ValueError, match="must be"):
        attention(q, k[:, :, :, :64], v)




def test_self_attention():
    q, k, v, wq, wk, rope = self_attn_inputs(2, (3, 5, 7), 3, torch.float16, "cpu")
    out = self_attention(q, k, v, wq, wk, rope.cos, rope.sin, 3, 1e-6)
    assert out.shape == q.shape and out.is_contiguous()
    ref32 = self_attention_ref(q.float(), k.float(), v.float(), wq, wk, rope.cos, rope.sin, 3)
    base = (self_attention_ref(q, k, v, wq, wk, rope.cos, rope.sin, 3).float() - ref32).abs().max().item()
    err = (out.float() - ref32).abs().max().item()
    assert err <= 2 * base + 1e-4, (err, base)


def test_ops_dispatch_to_kernels():
    """lightx2v_engine.ops with backend "kernels" runs these kernels and matches its references."""
    q, k, v, wq, wk, rope = self_attn_inputs(1, (2, 3, 5), 2, torch.float16, "cpu")
    want = ops.self_attention(q, k, v, wq, wk, rope, 2)  # backend "auto" on CPU: references
    try:
        ops.set_backend("kernels")
        got = ops.self_attention(q, k, v, wq, wk, rope, 2)
    finally:
        ops.set_backend("auto")
    torch.testing.assert_close(got, want, atol=2e-3, rtol=0)


def test_opcheck_and_compile():
    q, k, v = attn_qkv(1, 20, 9, 2, torch.float16, "cpu")
    torch.library.opcheck(torch.ops.lightx2v.attention.default, (q, k, v),
                          test_utils=("test_schema", "test_faketensor"))
    qs, ks, vs, wq, wk, rope = self_attn_inputs(1, (1, 2, 3), 2, torch.float16, "cpu")
    torch.library.opcheck(torch.ops.lightx2v.self_attention.default, (qs, ks, vs, wq, wk, rope.cos, rope.sin, 2, 1e-6),
                          test_utils=("test_schema", "test_faketensor"))

    def f(q, k, v, qs, ks, vs):
        return attention(q, k, v) * 2, self_attention(qs, ks, vs, wq, wk, rope.cos, rope.sin, 2)

    got = torch.compile(f, backend="aot_eager", fullgraph=True)(q, k, v, qs, ks, vs)
    want = f(q, k, v, qs, ks, vs)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


# ----------------------------------------------------------------------------------------------------
# GPU: real shapes, bf16
# ----------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("config", list(ATTN_CONFIGS))
@pytest.mark.parametrize("H, Lq, Lk", [(12, 32760, 32760), (12, 32760, 512), (40, 32760, 257)])
def test_attention_gpu_real_shapes(config, H, Lq, Lk):
    q, k, v, ref32, base = attn_gpu_case(H, Lq, Lk)
    err = (attention_triton(q, k, v, config).float() - ref32).abs().max().item()
    assert err <= 2 * base + 1e-3, f"{config}: err {err:.3e} > 2 x SDPA bf16 err {base:.3e} + 1e-3"


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["triton", "sdpa_cudnn", "sdpa_flash"])
def test_self_attention_gpu_real_shape(impl):
    q, k, v, wq, wk, rope = self_attn_inputs(1, (21, 30, 52), 12, torch.bfloat16, "cuda")
    try:
        set_attention_impl(impl)
        out = self_attention(q, k, v, wq, wk, rope.cos, rope.sin, 12)
    finally:
        set_attention_impl("default")
    qh, kh = qk_norm_rope_ref(q.float(), k.float(), wq, wk, rope.cos, rope.sin, 12)
    ref32 = attn_ref32(qh, kh, v.float().unflatten(-1, (12, 128))).flatten(-2)
    base = (self_attention_ref(q, k, v, wq, wk, rope.cos, rope.sin, 12).float() - ref32).abs().max().item()
    assert (out.float() - ref32).abs().max().item() <= 2 * base + 1e-3


@pytest.mark.gpu
@pytest.mark.last
def test_cross_attention_cudnn_in_cuda_graph():
    """LX2V_CROSS_ATTN=sdpa_cudnn must replay inside the DiT's CUDA graphs."""
    q, k, v = attn_qkv(1, 1000, 512, 2, torch.bfloat16, "cuda")
    try:
        set_attention_impl(cross_impl="sdpa_cudnn")
        want, out = eager_and_graph_replay(lambda: attention(q, k, v))
    finally:
        set_attention_impl(cross_impl="default")
    assert torch.equal(out, want)


@pytest.mark.gpu
@pytest.mark.parametrize("config", ["ptr_256x64_w8_s3", "tma_128x128_w8_s2"])
def test_attention_cuda_graph_capture(config):
    q, k, v = attn_qkv(1, 1000, 300, 2, torch.bfloat16, "cuda")
    try:
        set_attention_impl(config=config)
        want, out = eager_and_graph_replay(lambda: attention(q, k, v))  # the eager call compiles first
    finally:
        set_attention_impl(config="default")
    assert torch.equal(out, want)


# ----------------------------------------------------------------------------------------------------
# sm90 ahead-of-time compile (no GPU needed): every kernel config must build for an H100
# ----------------------------------------------------------------------------------------------------

_AOT_SCRIPT = r'''
import dataclasses, json, os, re, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import importlib
A = importlib.import_module("lightx2v_engine.kernels.attention")
M = importlib.import_module("lightx2v_engine.kernels.modulate")
R = importlib.import_module("lightx2v_engine.kernels.qk_norm_rope")
PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def build(fn, types, consts, num_warps, num_stages, arch=90):
    sig = {n: ("constexpr" if n in consts else types[n] if n in types else "i32") for n in fn.arg_names}
    # what the launcher specialises for the real shapes: 16-byte aligned pointers, strides multiple of 16
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
             if sig[n].startswith("*") or n.startswith("stride") or n in ("n_full", "Lk_pad")}
    k = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", arch, 32),
                       options=dict(num_warps=num_warps, num_stages=num_stages))
    with tempfile.TemporaryDirectory() as d:
        open(os.path.join(d, "k.ptx"), "w").write(k.asm["ptx"])
        err = subprocess.run([PTXAS, "-v", f"--gpu-name=sm_{arch}{'a' if arch == 90 else ''}", os.path.join(d, "k.ptx"), "-o",
                              os.path.join(d, "k.cubin")], capture_output=True, text=True).stderr
    spill = sum(int(x) for x in re.findall(r"(\d+) bytes spill stores", err))
    return dict(smem=k.metadata.shared, spill=spill, ws="ttg.warp_specialize(" in k.asm["ttgir"])


out = {}
bf = dict(Q="*bf16", K="*bf16", V="*bf16", O="*bf16", C_SCRATCH="*fp32", qk_scale="fp32")
for name, c in A.ATTN_CONFIGS.items():
    ws = c.warp_specialize and c.tma
    for even, mean_pad in ((False, False), (True, False)) + (((False, True),) if ws else ()):
        consts = dict(HEAD_D=128, BLOCK_M=c.block_m, BLOCK_N=c.block_n, USE_TMA=c.tma,
                      WARP_SPEC=ws, PIPE_QK=c.pipe_qk, EVEN_N=even, MEAN_PAD=mean_pad)
        out[f"{name}/even={even}/mean_pad={mean_pad}"] = build(A._attn_fwd_kernel, bf, consts, c.num_warps,
                                                               c.num_stages)
# sizes of 1: Triton makes an int argument equal to 1 a constexpr (the interpreter does not): Lk.to() on it
# failed to compile (the mean-padded loop, L == 1)
for name in ("ws_mp_128x128_w4_s2",):
    c = A.ATTN_CONFIGS[name]
    ws = c.warp_specialize and c.tma
    consts = dict(HEAD_D=128, BLOCK_M=c.block_m, BLOCK_N=c.block_n, USE_TMA=c.tma, WARP_SPEC=ws, PIPE_QK=c.pipe_qk,
                  EVEN_N=False, MEAN_PAD=ws, Lk=1, Lq=1, H=1)
    out[f"size1_{name}"] = build(A._attn_fwd_kernel, bf, consts, c.num_warps, c.num_stages)
# before sm90 a warp-specialised config runs as A._resolve makes it (8 warps, pointer loads)
for arch in (80, 89):
    c = A._plain_before_sm90(A.ATTN_CONFIGS[A.DEFAULT_ATTN_CONFIG], divmod(arch, 10))
    consts = dict(HEAD_D=128, BLOCK_M=c.block_m, BLOCK_N=c.block_n, USE_TMA=c.tma, WARP_SPEC=c.warp_specialize,
                  PIPE_QK=c.pipe_qk, EVEN_N=False, MEAN_PAD=False)
    out[f"pre90_sm{arch}_default"] = build(A._attn_fwd_kernel, bf, consts, c.num_warps, c.num_stages, arch=arch)
mt = dict(X="*fp32", Y="*bf16", GATE="*fp32", SHIFT="*fp32", SCALE="*fp32", XOUT="*fp32", OUT="*bf16", QS="*fp32",
          eps="fp32")
for C in (1536, 5120):
    block, warps = M._launch_cfg(C)
    for res in (False, True):
        out[f"modulate/C={C}/res={res}"] = build(M._modulate_kernel, mt, dict(HAS_RESIDUAL=res, BLOCK_C=block, QUANT=0,
                                                                    ROUND=0, INTERP=False), warps, 3)
    rt = dict(Q="*bf16", K="*bf16", WQ="*fp32", WK="*fp32", COS="*fp32", SIN="*fp32", QO="*bf16", KO="*bf16", eps="fp32")
    out[f"qk_norm_rope/C={C}"] = build(R._qk_norm_rope_kernel, rt, dict(HEAD_D=128, BLOCK_C=block),
                                       max(1, min(16, block // 512)), 3)
    tt = dict(X="*bf16", W="*fp32", COS="*fp32", SIN="*fp32", O="*bf16", eps="fp32")
    block_r = max(1, min(8, 8192 // block))
    out[f"qk_norm_rope_tile/C={C}"] = build(R._rms_rope_tile_kernel, tt, dict(HEAD_D=128, BLOCK_R=block_r, BLOCK_C=block),
                                            max(1, min(16, block_r * block // 1024)), 3)
    chunk = R._chunk_size(C, 128)
    out[f"qk_norm_rope_chunk/C={C}"] = build(R._rms_rope_chunk_kernel, tt, dict(HEAD_D=128, BLOCK_R=4, CHUNK=chunk,
                                             N_CHUNKS=C // chunk), max(1, min(8, 4 * chunk // 256)), 3)
    chunk2 = R._chunk_size(C // 2, 64, largest=256)
    out[f"qk_norm_rope_packed/C={C}"] = build(R._rms_rope_packed_kernel, dict(X="*i32", W2="*fp32", COS="*fp32",
                                              SIN="*fp32", O="*i32", eps="fp32"),
                                              dict(HEAD_D=128, BLOCK_R=4, CHUNK2=chunk2, N_CHUNKS=C // 2 // chunk2,
                                                   IS_BF16=True), max(1, min(8, 4 * chunk2 // 128)), 3)
    N = importlib.import_module("lightx2v_engine.kernels.rms_norm")
    br, bc, w = N._launch_cfg(C)
    out[f"rms_norm/C={C}"] = build(N._rms_norm_kernel, dict(X="*bf16", W="*fp32", OUT="*bf16", eps="fp32"),
                                   dict(BLOCK_R=br, BLOCK_C=bc), w, 3)
A8 = importlib.import_module("lightx2v_engine.kernels.attention_8bit")
t8 = dict(Q8="*i8", K8="*i8", VT="*fp8e4nv", QS="*fp32", KS="*fp32", VS="*fp32", O="*bf16")
for name, c in A8.ATTN8_CONFIGS.items():
    if c.gluon:  # the Gluon kernel (tests/test_kernel_attention_gluon.py compiles it)
        continue
    consts = dict(HEAD_D=128, BLOCK_M=c.block_m, BLOCK_N=c.block_n, USE_TMA=True, WARP_SPEC=c.warp_specialize,
                  EXP_MODE=c.exp_mode, MAGIC_CVT=c.magic_cvt, INTERP=False, PV_FP8=c.pv_fp8)
    out[f"attn8_{name}"] = build(A8._attn8_fwd_kernel, dict(t8, Lk_pad="i32", VT="*fp8e4nv" if c.pv_fp8 else "*bf16"),
                                 consts, c.num_warps, c.num_stages)
for name in (A8.DEFAULT_ATTN8_CONFIG,):  # sm89 (Ada: fp8 MMA, no TMA): the default's pointer path
    c = A8.ATTN8_CONFIGS[name]
    c = dataclasses.replace(c, warp_specialize=False, num_warps=8) if c.warp_specialize else c  # A8._resolve on sm89
    consts = dict(HEAD_D=128, BLOCK_M=c.block_m, BLOCK_N=c.block_n, USE_TMA=False, WARP_SPEC=False,
                  EXP_MODE=c.exp_mode, MAGIC_CVT=c.magic_cvt, INTERP=False, PV_FP8=c.pv_fp8)
    out[f"attn8_sm89_{name}"] = build(A8._attn8_fwd_kernel, dict(t8, Lk_pad="i32", VT="*fp8e4nv" if c.pv_fp8 else "*bf16"),
                                      consts, c.num_warps, c.num_stages, arch=89)
for per_row in (False, True):
    out[f"attn8_quant_rows/per_row={per_row}"] = build(
        A8._quant_rows_kernel, dict(X="*bf16", MEAN="*fp32", Y="*i8", S="*fp32", factor="fp32"),
        dict(HEAD_D=128, BLOCK=64 if per_row else 128, PER_ROW=per_row, HAS_MEAN=not per_row, INTERP=False),
        4 if per_row else 8, 3)
out["attn8_quant_v"] = build(A8._quant_v_kernel, dict(V="*bf16", VS="*fp32", VT="*fp8e4nv"),
                             dict(HEAD_D=128, BLOCK=128, INTERP=False), 8, 3)
AR = importlib.import_module("lightx2v_engine.kernels.attention_rope")
ra = dict(Q="*bf16", K="*bf16", V="*bf16", O="*bf16", RQ="*fp32", RK="*fp32", WQ="*fp32", WK="*fp32", COS="*fp32",
          SIN="*fp32", qk_scale="fp32")
for bm, bn, w, st in ((128, 64, 8, 2),):  # the default tile (the others are benchmark options, built there)
    for even in (False, True):
        out[f"attn_rope_{bm}x{bn}_w{w}_s{st}/even={even}"] = build(
            AR._attn_rope_kernel, ra, dict(HEAD_D=128, BLOCK_M=bm, BLOCK_N=bn, EVEN_N=even), w, st)
for C in (1536, 5120):
    block = triton.next_power_of_2(C)
    out[f"attn_rope_rstd/C={C}"] = build(AR._row_rstd_kernel, dict(X="*bf16", R="*fp32", eps="fp32"),
                                         dict(BLOCK_C=block), max(1, min(16, block // 512)), 3)
print("AOT" + json.dumps(out))
'''


def test_kernels_compile_for_sm90():
    """Compiles every attention config (both EVEN_N variants), the 8-bit attention configs (sm_89: the
    default) and quantisers, the default norm+RoPE-in-attention tile, and the norm kernels for sm_90a with Triton's
    bundled ptxas: they must build, fit the H100's 227 KB of shared memory, and the warp-specialised configs
    must really be specialised. Runs in a subprocess without TRITON_INTERPRET."""
    import json
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    line = next((ln for ln in res.stdout.splitlines() if ln.startswith("AOT")), None)
    assert line is not None, res.stdout[-3000:] + res.stderr[-3000:]
    info = json.loads(line[3:])
    for name, r in info.items():
        assert r["smem"] <= 227 * 1024, f"{name}: {r['smem']} bytes of shared memory > 227 KB"
        if name.startswith(("ws_", "attn8_ws_")):
            assert r["ws"], f"{name}: the key loop was not warp-specialised"
        if name.startswith(("ws_", "tma_", "modulate", "qk_norm", "rms_norm", "attn8_", "attn_rope_128x64_w8_s2",
                            "attn_rope_rstd")):  # (the other norm+RoPE-in-attention tiles are benchmark options)
            assert r["spill"] == 0, f"{name}: {r['spill']} bytes of register spills"
    assert any(name.startswith("attn_rope_128x64_w8_s2") for name in info)
    assert "size1_ws_mp_128x128_w4_s2" in info
    for arch in (80, 89):  # (sm_86/89 give a block 99 KB of shared memory)
        r = info[f"pre90_sm{arch}_default"]
        assert r["spill"] == 0 and r["smem"] <= 99 * 1024 and not r["ws"], (arch, r)


# ----------------------------------------------------------------------------------------------------
# keys padded with their mean (the unmasked warp-specialised loop)
# ----------------------------------------------------------------------------------------------------

def _mean_padded(k, block_n=128):
    from lightx2v_engine.kernels.attention import pad_keys_with_mean
    B, L, H, D = k.shape
    kp = torch.empty(B, -(-L // block_n) * block_n, H, D, dtype=k.dtype)
    kp[:, :L] = k
    pad_keys_with_mean(kp, L)
    return kp


@pytest.mark.parametrize("B, Lq, Lk", [(1, 77, 77), (2, 77, 33), (1, 50, 320), (2, 130, 257)])
def test_attention_mean_padded_keys(B, Lq, Lk):
    q, k, v = attn_qkv(B, Lq, Lk, 3, torch.float16, "cpu")
    kp = _mean_padded(k)
    assert torch.equal(kp[:, :Lk], k) and kp.shape[1] % 128 == 0
    out = attention_triton(q, kp, v, "ws_mp_128x128_w4_s2", k_mean_padded=True)
    assert_attn_rule(out, q, k, v)
    # without the correction of l the result would be off by the padded keys' share: the test can fail
    plain = attention_triton(q, kp[:, :Lk], v, "ws_mp_128x128_w4_s2")  # masked loop
    torch.testing.assert_close(out.float(), plain.float(), atol=2e-3, rtol=0)


def test_attention_mean_padded_keys_all_scores_far_below_zero():
    """Every real score far below 0 (q anti-aligned with a large common key component): padding with zeros
    would dominate the row sum and cancel; the mean's score is the mean score, so nothing cancels."""
    torch.manual_seed(0)
    B, Lq, Lk, H = 1, 64, 150, 2
    u = torch.nn.functional.normalize(torch.randn(H, 128), dim=-1)
    q = (torch.randn(B, Lq, H, 128) * 0.1 + 30 * u).half()
    k = (torch.randn(B, Lk, H, 128) - 20 * u).half()  # scores ~ -600 / sqrt(128) ~ -53
    v = torch.randn(B, Lk, H, 128).half()
    s = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) / 128 ** 0.5
    assert s.max() < -30
    out = attention_triton(q, _mean_padded(k), v, "ws_mp_128x128_w4_s2", k_mean_padded=True)
    assert_attn_rule(out, q, k, v)


def test_self_attention_mean_pad_config():
    q, k, v, wq, wk, rope = self_attn_inputs(2, (3, 5, 7), 3, torch.float16, "cpu")  # L = 105
    try:
        set_attention_impl(config="ws_mp_128x128_w4_s2")
        out = self_attention(q, k, v, wq, wk, rope.cos, rope.sin, 3, 1e-6)
    finally:
        set_attention_impl(config="default")
    ref32 = self_attention_ref(q.float(), k.float(), v.float(), wq, wk, rope.cos, rope.sin, 3)
    base = (self_attention_ref(q, k, v, wq, wk, rope.cos, rope.sin, 3).float() - ref32).abs().max().item()
    assert (out.float() - ref32).abs().max().item() <= 2 * base + 1e-4


def test_mean_padded_bad_call_raises():
    q, k, v = attn_qkv(1, 10, 77, 1, torch.float16, "cpu")
    with pytest.raises(ValueError, match="k_mean_padded needs"):
        attention_triton(q, k, v, "ws_mp_128x128_w4_s2", k_mean_padded=True)  # k not padded
    with pytest.raises(ValueError, match="k_mean_padded needs"):
        attention_triton(q, _mean_padded(k), v, "ptr_256x64_w8_s3", k_mean_padded=True)  # not warp-specialised


@pytest.mark.gpu
@pytest.mark.last(2)
@pytest.mark.parametrize("H, L", [(12, 32760), (40, 4099)])
def test_attention_mean_padded_gpu(H, L):
    q, k, v, ref32, base = attn_gpu_case(H, L, L)
    from lightx2v_engine.kernels.attention import pad_keys_with_mean
    kp = torch.empty(1, -(-L // 128) * 128, H, 128, dtype=k.dtype, device="cuda")
    kp[:, :L] = k
    pad_keys_with_mean(kp, L)
    err = (attention_triton(q, kp, v, "ws_mp_128x128_w4_s2", k_mean_padded=True).float() - ref32).abs().max().item()
    assert err <= 2 * base + 1e-3, f"err {err:.3e} > 2 x SDPA bf16 err {base:.3e} + 1e-3"


@pytest.mark.gpu
@pytest.mark.last(2)
def test_self_attention_mean_pad_gpu_graph():
    q, k, v, wq, wk, rope = self_attn_inputs(1, (21, 30, 52), 12, torch.bfloat16, "cuda")
    try:
        set_attention_impl(config="ws_mp_128x128_w4_s2")
        want, out = eager_and_graph_replay(lambda: self_attention(q, k, v, wq, wk, rope.cos, rope.sin, 12))
    finally:
        set_attention_impl(config="default")
    assert torch.equal(out, want)
    qh, kh = qk_norm_rope_ref(q.float(), k.float(), wq, wk, rope.cos, rope.sin, 12)
    ref32 = attn_ref32(qh, kh, v.float().unflatten(-1, (12, 128))).flatten(-2)
    base = (self_attention_ref(q, k, v, wq, wk, rope.cos, rope.sin, 12).float() - ref32).abs().max().item()
    assert (out.float() - ref32).abs().max().item() <= 2 * base + 1e-3


_LONG_ROWS_SCRIPT = r"""
import sys, torch
from lightx2v_engine.kernels.attention import attention_triton
from lightx2v_engine.kernels.attention_8bit import attention_8bit_triton
dev = sys.argv[1]
torch.manual_seed(0)
B, L, H, D = 1, 3, 1, 16
stride_l = 2 ** 30  # row 2 of q and of v starts at element 2^31: past int32 offsets
base_q = torch.empty(stride_l * (L - 1) + H * D, dtype=torch.float16, device=dev)  # virtual: 3 rows touched
base_v = torch.empty(stride_l * (L - 1) + H * D, dtype=torch.float16, device=dev)
q = base_q.as_strided((B, L, H, D), (0, stride_l, D, 1))
v = base_v.as_strided((B, L, H, D), (0, stride_l, D, 1))
q.copy_(torch.randn(B, L, H, D, device=dev).half())
v.copy_(torch.randn(B, L, H, D, device=dev).half())
k = torch.randn(B, L, H, D, device=dev).half()
ref = torch.nn.functional.scaled_dot_product_attention(
    q.float().transpose(1, 2), k.float().transpose(1, 2), v.float().transpose(1, 2)).transpose(1, 2)
for cfg in ("ptr_256x64_w8_s3", "tma_128x128_w8_s2"):
    print("ERR", cfg, (attention_triton(q, k, v, cfg).float() - ref).abs().max().item())
import dataclasses
from lightx2v_engine.kernels.attention_8bit import ATTN8_CONFIGS
for ws in (True, False):  # the TMA path (where available), then the pointer path
    cfg8 = dataclasses.replace(ATTN8_CONFIGS["ws_128x128_w4_s2_pv16"], warp_specialize=ws)
    print("ERR8", (attention_8bit_triton(q, k, v, cfg8).float() - ref).abs().max().item())
# the quantised q, k are contiguous buffers read with int32 offsets: past 2^31 the launcher refuses
from lightx2v_engine.kernels.attention_8bit import attention_8bit_quantized, quantize_qkv
qz = list(quantize_qkv(q.contiguous(), k, v, cfg8.block_n, quant_v=False))
qz[0] = torch.empty(stride_l * 2 + 16, dtype=torch.int8, device=dev).as_strided((1, 3, 1, 16), (0, stride_l, 16, 1))
try:
    attention_8bit_quantized(tuple(qz), L, torch.empty(B, L, H, D, dtype=torch.float16, device=dev), cfg8)
    print("REFUSED no")
except ValueError as e:
    print("REFUSED", "2^31" in str(e))
"""


def test_attention_rows_past_int32_offsets(tmp_path):
    """q and v as views whose rows lie 2^30 elements apart (a fused projection's slices at > 140k tokens
    reach such offsets): the kernels' pointer arithmetic must not wrap (it read out of bounds and crashed
    before). In a subprocess, so that a regression fails the test instead of killing the run; the tensors
    are mostly untouched virtual memory."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    env = dict(os.environ, TRITON_INTERPRET="0" if dev == "cuda" else "1")
    res = subprocess.run([sys.executable, "-c", _LONG_ROWS_SCRIPT, dev], capture_output=True, text=True,
                         env=env, timeout=600)
    assert res.returncode == 0, f"rc {res.returncode}: {res.stdout[-1000:]} {res.stderr[-3000:]}"
    errs = {ln.split()[1]: float(ln.split()[2]) for ln in res.stdout.splitlines() if ln.startswith("ERR ")}
    assert set(errs) == {"ptr_256x64_w8_s3", "tma_128x128_w8_s2"} and max(errs.values()) < 5e-3, res.stdout
    err8 = [float(ln.split()[1]) for ln in res.stdout.splitlines() if ln.startswith("ERR8")]
    assert len(err8) == 2 and max(err8) < 0.1, res.stdout
    assert "REFUSED True" in res.stdout, res.stdout


def test_warp_specialised_default_runs_plain_before_sm90(monkeypatch):
    """The default ws 128x128 tile at 4 warps spills before sm90 (no warp specialisation there): A100 / L40S /
    RTX 4090 run it with 8 warps and pointer loads (the AOT test above compiles that for sm_80 and sm_89)."""
    import importlib
    A = importlib.import_module("lightx2v_engine.kernels.attention")  # (the package re-exports a function of that name)
    cfg = ATTN_CONFIGS["ws_128x128_w4_s2"]
    for cap, plain in (((8, 0), True), ((8, 9), True), ((9, 0), False), ((10, 0), False)):
        monkeypatch.setattr(A.torch.cuda, "get_device_capability", lambda device=None, cap=cap: cap)
        got = A._resolve(cfg, torch.device("cuda", 0))
        assert (got.warp_specialize, got.num_warps, got.tma) == ((False, 8, False) if plain else (True, 4, True))
    assert A._resolve(cfg, torch.device("cpu")) is cfg
    assert A._resolve(ATTN_CONFIGS["ptr_256x64_w8_s3"], torch.device("cpu")) is ATTN_CONFIGS["ptr_256x64_w8_s3"]
    # sm_120 (RTX 5090 / RTX PRO 6000 Blackwell): 99 KB of shared memory a block, the ws tiles need ~165 KB
    from types import SimpleNamespace
    for cap, smem, plain in (((12, 0), 101376, True), ((9, 0), 232448, False), ((10, 0), 232448, False)):
        monkeypatch.setattr(A.torch.cuda, "get_device_capability", lambda device=None, cap=cap: cap)
        monkeypatch.setattr(A.torch.cuda, "get_device_properties",
                            lambda device=None, smem=smem: SimpleNamespace(shared_memory_per_block_optin=smem))
        got = A._resolve(cfg, torch.device("cuda", 0))
        assert got.warp_specialize is not plain
        assert A.mean_pad_ok(ATTN_CONFIGS["ws_mp_128x128_w4_s2"], 130, torch.device("cuda", 0)) is not plain
