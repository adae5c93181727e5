"""ops.linear_gelu_tanh: the FFN's first linear with GELU(tanh) in cuBLASLt's epilogue, guarded by a probe."""
import pytest
import torch
import torch.nn.functional as F

from lightx2v_engine import ops


@pytest.fixture(autouse=True)
def _fresh_probe():
    ops.gelu_epilogue_ok.cache_clear()
    yield
    ops.gelu_epilogue_ok.cache_clear()


@pytest.mark.parametrize("kind, want", [("tanh", True), ("erf", False), ("raise", False), ("wrong", False)])
def test_probe_accepts_only_the_tanh_gelu(monkeypatch, kind, want):
    def fake(bias, x, wt, use_gelu=False):
        y = torch.addmm(bias, x, wt)
        if kind == "raise":
            raise RuntimeError("no epilogue")
        if kind == "wrong":
            return y
        return F.gelu(y, approximate="tanh" if kind == "tanh" else "none")

    monkeypatch.setattr(torch, "_addmm_activation", fake)
    assert ops.gelu_epilogue_ok(torch.device("cpu"), torch.float32) is want


def test_probe_off_switch(monkeypatch):
    monkeypatch.setenv("LX2V_GELU_EPILOGUE", "0")
    monkeypatch.setattr(torch, "_addmm_activation", lambda b, x, wt, use_gelu=False: F.gelu(torch.addmm(b, x, wt),
                                                                                            approximate="tanh"))
    assert not ops.gelu_epilogue_ok(torch.device("cpu"), torch.float32)


def test_cpu_path_is_linear_then_gelu():
    x, w, b = torch.randn(2, 7, 32), torch.randn(48, 32), torch.randn(48)
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
    assert line.startswith("ops: Triton kernels; self-attention 8-bit ws_128x128_w4_s3, cross-attention triton")
    assert "q/k norm+RoPE row" in line and line.endswith("FFN GELU epilogue off")
