"""The kernels folder imported under another name (top-level `kernels`, as transformers' probe for the
Hugging Face `kernels` package does when the repository root is on sys.path) must stay inert: running it
again would register every torch.library op a second time and leave the first handles dangling (a crash
seen after `from diffusers import AutoencoderKLWan` in the same process)."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_SCRIPT = r'''
import importlib, importlib.util, sys
sys.path.insert(0, ROOT)
import torch
import lightx2v_engine.kernels as real
from lightx2v_engine.kernels import self_attention
from lightx2v_engine.ops import rope_tables
top = importlib.import_module("kernels")
assert top is not real and not hasattr(top, "__file__") and top.__path__ == [], top
assert importlib.util.find_spec("kernels.attention") is None
assert not any(m.startswith("kernels.") for m in sys.modules)
try:
    from transformers.utils.import_utils import is_kernels_available
    assert not is_kernels_available()
except ImportError:
    pass
from diffusers import AutoencoderKLWan  # noqa: F401  (what triggered the crash)
q, k, v = (torch.randn(1, 30, 256).half() for _ in range(3))
r = rope_tables((2, 3, 5), 128)
for _ in range(3):
    out = self_attention(q, k, v, torch.ones(256), torch.ones(256), r.cos, r.sin, 2)
print("OK", tuple(out.shape))
'''.replace("ROOT", repr(ROOT))


def test_top_level_kernels_import_is_inert():
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0 and "OK (1, 30, 256)" in res.stdout, res.stdout[-2000:] + res.stderr[-3000:]


@pytest.mark.parametrize("var,value,module", [("LX2V_QK_ROPE", "onepass_r3", "qk_norm_rope"),
                                               ("LX2V_SELF_ATTN_ROPE", "prolog", "attention_rope")])
def test_a_mistyped_kernel_choice_is_an_error_not_a_silent_slow_path(var, value, module):
    """LX2V_QK_ROPE=onepass_r3 (no such variant) made the whole kernel package "unavailable", so every op on
    CUDA ran the slow reference and only ops.describe() said why; now asking for the kernels (the pipeline
    logs ops.describe(device) when it is built) raises the message naming the variable and its choices."""
    env = dict(os.environ, TRITON_INTERPRET="1", **{var: value})  # (LX2V_SELF_ATTN_ROPE was read at the first
    # self-attention call only: never for 8-bit runs or other head dims)
    script = ("import torch\nfrom lightx2v_engine import ops, vae\n"
              "for f in (ops.kernel_status, lambda: ops.describe(torch.device('cuda')), vae.norm_kernel_status):\n"
              "    try:\n        f()\n    except ValueError as e:\n        print('RAISED', e)\n")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    raised = [ln for ln in res.stdout.splitlines() if ln.startswith("RAISED")]
    assert len(raised) == 3, res.stdout + res.stderr[-2000:]
    assert all(f"kernels/{module}.py: {var} must be one of" in ln and f"got '{value}'" in ln for ln in raised), raised


def test_8bit_gemm_without_triton_uses_the_cublas_path(monkeypatch):
    """quant's int8 GEMM and gated-residual epilogue imported kernels.fp8_gemm unguarded on CUDA: without
    triton an 8-bit DiT failed with ImportError, and the ops backend "torch" did not turn them off."""
    import torch
    from lightx2v_engine import ops, quant
    from lightx2v_engine.kernels.fp8_gemm import scaled_gemm
    assert quant._triton_scaled_gemm(torch.device("cpu")) is scaled_gemm
    monkeypatch.setattr(ops, "_kernels", lambda: None)  # (what ops sees when triton cannot be imported)
    assert quant._triton_scaled_gemm(torch.device("cpu")) is None
    monkeypatch.undo()
    prev = ops.get_backend()
    ops.set_backend("torch")
    try:
        assert quant._triton_scaled_gemm(torch.device("cpu")) is None
    finally:
        ops.set_backend(prev)


@pytest.mark.parametrize("value", ["1", "true", "On", "yes", "0", "false", ""])
def test_interpreting_reads_triton_interpret_as_triton_does(value, monkeypatch):
    """Only "1" counted: TRITON_INTERPRET=true ran the interpreter without the engine's interpreter fixes."""
    from triton import knobs
    from lightx2v_engine.kernels._util import interpreting
    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert interpreting() == bool(knobs.runtime.interpret)


@pytest.mark.parametrize("cap, capable", [((7, 5), False), ((7, 0), False), ((8, 0), True), ((9, 0), True)])
def test_kernels_not_run_before_sm80(cap, capable, monkeypatch):
    """Triton's NVIDIA backend needs sm80+: on a V100 / T4 the "auto" backend ran the Triton kernels (every op
    of the first step failed to compile there) instead of the references. Every dispatch point is checked
    with torch.cuda's capability query stood in for: ops._fast, the describe() line, 8-bit attention, the
    int8 GEMM, and the VAE's RMSNorm kernel (through a stand-in CUDA tensor)."""
    import types
    import torch
    from lightx2v_engine import ops, quant, vae
    monkeypatch.setattr(ops, "_CAPABILITY", {})
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: cap)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    cuda = torch.device("cuda", 0)
    assert ops.kernels_capable(cuda) is capable
    assert ops.kernels_capable(torch.device("cpu"))
    fake = types.SimpleNamespace(is_cuda=True, device=cuda)
    assert (ops._fast(fake, "modulate") is not None) is capable
    assert (ops._fast(fake, "rms_norm") is not None) is capable
    assert (quant._triton_scaled_gemm(cuda) is not None) is capable
    if not capable:
        line = ops.describe(cuda)
        assert line == f"ops: PyTorch references on cuda:0 (compute capability {cap[0]}.{cap[1]}: the Triton " \
                       f"kernels need 8.0 or newer)"
        assert not ops.attention_8bit_available(cuda)
        # the VAE's fused RMSNorm+SiLU: the reference runs for a CUDA tensor on such a GPU
        monkeypatch.setattr(vae, "_norm_kernel", lambda: pytest.fail("the VAE norm kernel was asked for"))
        x = torch.randn(1, 4, 2, 3, 3)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
            mp.setattr(torch.Tensor, "device", property(lambda self: cuda))
            got = vae.rms_norm_act(x, torch.ones(4, 1, 1, 1), True)
        torch.testing.assert_close(got, vae.rms_norm_act_ref(x, torch.ones(4, 1, 1, 1), True))
    # under torch.compile the check is a lookup of the eager query (no graph break; True where none was made)
    compiled = torch.compile(lambda x: x + 1 if ops.kernels_capable(cuda) else x - 1, backend="eager",
                             fullgraph=True)
    assert compiled(torch.zeros(1)).item() == (1 if capable else -1)
    torch._dynamo.reset()
    monkeypatch.setattr(ops, "_CAPABILITY", {})
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: pytest.fail("queried in a trace"))
    assert compiled(torch.zeros(1)).item() == 1
    torch._dynamo.reset()
    # "kernels" (the tests' backend) still forces them
    prev = ops.get_backend()
    ops.set_backend("kernels")
    try:
        assert ops._fast(fake, "modulate") is not None
    finally:
        ops.set_backend(prev)
