"""ops.linear_gelu_tanh: the FFN's first linear with GELU(tanh) in cuBLASLt's epilogue, guarded by a probe."""
import pytest
import torch
import torch.nn.functional as F

from lightx2v_engine import ops


@pytest.fixture(autouse=True)
def _fresh_probe():
    ops._GELU_PROBE.clear()
    yield
    ops._GELU_PROBE.clear()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind, want", [("tanh", True), ("erf", False), ("raise", False), ("wrong", False)])
def test_probe_accepts_only_the_tanh_gelu(monkeypatch, kind, want, dtype):
    """Also in bf16, where the two GELUs agree to the output's precision except in the negative tail."""
    def fake(bias, x, wt, use_gelu=False):
        y = torch.addmm(bias.float(), x.float(), wt.float())
        if kind == "raise":
            raise RuntimeError("no epilogue")
        if kind == "wrong":
            return y.to(x.dtype)
        return F.gelu(y, approximate="tanh" if kind == "tanh" else "none").to(x.dtype)

    monkeypatch.setattr(torch, "_addmm_activation", fake)
    assert ops.gelu_epilogue_ok(torch.device("cpu"), dtype) is want


def test_reference_backend_never_fuses(monkeypatch):
    """set_backend("torch") is the plain PyTorch path the benchmarks time as the baseline: no epilogue."""
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    ops._GELU_PROBE[(torch.device("cuda", 0), torch.bfloat16)] = True
    assert ops.gelu_epilogue_used(torch.device("cuda"), torch.bfloat16)  # "cuda" is keyed as cuda:0
    try:
        ops.set_backend("torch")
        assert not ops.gelu_epilogue_used(torch.device("cuda"), torch.bfloat16)
    finally:
        ops.set_backend("auto")


def test_no_probe_inside_a_capture(monkeypatch):
    """An unprobed device inside a CUDA-graph capture gets the two-op path: the probe (copies, .item())
    is never run there."""
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    monkeypatch.setattr(ops, "_probe_gelu_epilogue", lambda *a: pytest.fail("probed during a capture"))
    assert not ops.gelu_epilogue_used(torch.device("cuda", 0), torch.bfloat16)
    assert not ops._GELU_PROBE


def test_switch_and_env():
    import os
    import subprocess
    import sys
    assert ops._GELU_EPILOGUE
    try:
        ops.set_gelu_epilogue(False)
        assert not ops.gelu_epilogue_used(torch.device("cuda"), torch.bfloat16)  # off before any probe
    finally:
        ops.set_gelu_epilogue(True)
    env = dict(os.environ, LX2V_GELU_EPILOGUE="0")
    res = subprocess.run([sys.executable, "-c", "from lightx2v_engine import ops; print(ops._GELU_EPILOGUE)"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.stdout.strip() == "False", res.stdout + res.stderr


def test_cpu_path_is_linear_then_gelu():
    """The CPU's epilogue is the erf GELU, which the probe tells apart in the negative tail even in bf16;
    only CUDA fuses anyway: the CPU result is exactly linear then the tanh GELU."""
    assert not ops.gelu_epilogue_ok(torch.device("cpu"), torch.bfloat16)
    x, w, b = (torch.randn(*s).bfloat16() for s in ((2, 7, 32), (48, 32), (48,)))
    assert torch.equal(ops.linear_gelu_tanh(x, w, b), F.gelu(F.linear(x, w, b), approximate="tanh"))


@pytest.mark.gpu
@pytest.mark.last
def test_cuda_epilogue_matches_tanh_gelu():
    assert ops.gelu_epilogue_ok(torch.device("cuda", torch.cuda.current_device()), torch.bfloat16)
    x = torch.randn(1, 32760, 1536, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(8960, 1536, device="cuda", dtype=torch.bfloat16) / 40
    b = torch.randn(8960, device="cuda", dtype=torch.bfloat16)
    got = ops.linear_gelu_tanh(x, w, b).float()
    ref32 = F.gelu(F.linear(x.float(), w.float(), b.float()), approximate="tanh")
    base = (F.gelu(F.linear(x, w, b), approximate="tanh").float() - ref32).abs().max().item()
    assert (got - ref32).abs().max().item() <= 2 * base + 1e-3


def test_describe_names_the_op_choices():
    assert ops.describe(torch.device("cpu")) == "ops: PyTorch references on cpu"
    try:
        ops.set_backend("kernels")
        line = ops.describe(torch.device("cpu"), attn_8bit=True)
    finally:
        ops.set_backend("auto")
    assert line.startswith("ops: Triton kernels; self-attention 8-bit ws_128x128_w4_s2, cross-attention triton")
    assert "q/k norm+RoPE chunk" in line and line.endswith("FFN GELU epilogue off; built-in defaults")
