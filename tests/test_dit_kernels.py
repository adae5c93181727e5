"""The tiny DiT with the Triton kernels on equals the reference path within the kernel rule:
error vs an fp32 reference <= 2x the error of the PyTorch path in the same low precision (+ small atol).
On CPU the kernels run under TRITON_INTERPRET=1 in fp16 (the interpreter's bf16 tl.dot is wrong)."""
import pytest
import torch

from lightx2v_engine import ops
from lightx2v_engine.config import ModelConfig
from lightx2v_engine.dit import param_dtype
from lightx2v_engine.loading import build_dit

from dit_fixtures import inputs, rel_l2

# head_dim 128 as the real models (the attention kernel is built for it)
T2V = ModelConfig("custom", "t2v", dim=256, ffn_dim=384, num_heads=2, num_layers=2, in_dim=16, text_dim=32)
I2V = ModelConfig("custom", "i2v", dim=256, ffn_dim=384, num_heads=2, num_layers=2, in_dim=36, text_dim=32,
                  image_dim=48)


def _run(cfg, sd, dtype, backend, device, args):
    model = build_dit(cfg, None, dtype=dtype, device=device)
    model.load_state_dict({k: v.to(param_dtype(k, dtype)) for k, v in sd.items()})
    ops.set_backend(backend)
    try:
        with torch.no_grad():
            return model(*[a.to(device) if a is not None else None for a in args]).float().cpu()
    finally:
        ops.set_backend("auto")


@pytest.mark.parametrize("cfg", [T2V, I2V], ids=["t2v", "i2v"])
def test_tiny_dit_kernels_vs_reference(cfg):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    low = torch.bfloat16 if device == "cuda" else torch.float16
    sd = build_dit(cfg, None, dtype=torch.float32).state_dict()  # random weights (no diffusers needed)
    args = inputs(cfg, f=3, h=6, w=10, text_len=512 if cfg.is_i2v else 24)
    ref32 = _run(cfg, sd, torch.float32, "torch", device, args)
    torch_low = _run(cfg, sd, low, "torch", device, args)
    kern_low = _run(cfg, sd, low, "kernels", device, args)
    base, err = rel_l2(torch_low, ref32), rel_l2(kern_low, ref32)
    assert base < 5e-2  # the low-precision path itself is sane
    assert not torch.equal(kern_low, torch_low)  # the kernels really ran
    assert err <= 2 * base + 1e-3, (err, base)


def test_fp32_and_48_wide_heads_run_the_reference_attention():
    """Models the attention kernels cannot take: an fp32 run dtype (the config's "dtype": "fp32") and heads of
    48 (a head dim no kernel has). Through the kernel dispatch their attention falls back to the reference
    (the other kernels still run): the output equals the reference backend's to fp32 rounding (the kernels
    backend raised for fp32 and for 48-wide heads before)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for cfg in (ModelConfig("custom", "t2v", dim=64, ffn_dim=96, num_heads=2, num_layers=1, in_dim=16, text_dim=32),
                ModelConfig("custom", "t2v", dim=96, ffn_dim=96, num_heads=2, num_layers=1, in_dim=16, text_dim=32)):
        sd = build_dit(cfg, None, dtype=torch.float32).state_dict()
        args = inputs(cfg, f=1, h=4, w=4, text_len=8)
        ref = _run(cfg, sd, torch.float32, "torch", device, args)
        got = _run(cfg, sd, torch.float32, "kernels", device, args)
        assert rel_l2(got, ref) < 1e-5, cfg.dim
    from lightx2v_engine.kernels import attention_supports
    assert attention_supports(torch.bfloat16, 128) and attention_supports(torch.float16, 16, False)
    assert not attention_supports(torch.float32, 128) and not attention_supports(torch.bfloat16, 48)
    assert not attention_supports(torch.bfloat16, 256)  # (no config's tiles fit sm90's shared memory)
    assert attention_supports(torch.bfloat16, 64, True) and not attention_supports(torch.bfloat16, 16, True)
    ops.set_backend("kernels")  # (the one line the pipeline logs says so)
    try:
        cpu = torch.device("cpu")
        assert "self-attention PyTorch reference (torch.float32, head dim 128" in ops.describe(cpu, dtype=torch.float32)
        line = ops.describe(cpu, dtype=torch.bfloat16, head_dim=48)
        assert "PyTorch reference (torch.bfloat16, head dim 48" in line and "cross-attention PyTorch reference" in line
        assert "PyTorch reference (torch.bfloat16, head dim 256" in ops.describe(cpu, dtype=torch.bfloat16, head_dim=256)
        assert "self-attention PyTorch reference" not in ops.describe(cpu, dtype=torch.bfloat16, head_dim=128)
        line = ops.describe(cpu, attn_8bit=True, dtype=torch.float16, head_dim=16)
        assert "no 8-bit kernel for this model" in line, line
    finally:
        ops.set_backend("auto")


def test_tiny_dit_with_rope_in_the_attention_kernel():
    """LX2V_SELF_ATTN_ROPE=prologue (kernels/attention_rope.py) inside the DiT: the same rule against the
    fp32 reference, and a different computation from the norm+RoPE pass path."""
    from lightx2v_engine.kernels.attention_rope import set_rope_placement
    cfg = T2V
    device = "cuda" if torch.cuda.is_available() else "cpu"
    low = torch.bfloat16 if device == "cuda" else torch.float16
    sd = build_dit(cfg, None, dtype=torch.float32).state_dict()
    args = inputs(cfg, f=3, h=6, w=10, text_len=24)
    ref32 = _run(cfg, sd, torch.float32, "torch", device, args)
    torch_low = _run(cfg, sd, low, "torch", device, args)
    passed = _run(cfg, sd, low, "kernels", device, args)
    set_rope_placement("prologue")
    try:
        prologue = _run(cfg, sd, low, "kernels", device, args)
    finally:
        set_rope_placement("default")
    base, err = rel_l2(torch_low, ref32), rel_l2(prologue, ref32)
    assert not torch.equal(prologue, passed)
    assert err <= 2 * base + 1e-3, (err, base)


@pytest.mark.last
def test_tiny_dit_8bit_self_attention():
    """set_attention_8bit(True): the INT8/FP8 self-attention runs inside the DiT (kernels backend) and the
    output stays close to the fp32 reference; the block outputs differ from the exact-attention run."""
    cfg = T2V
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 MMA needs sm89+")
    low = torch.bfloat16 if device == "cuda" else torch.float16
    sd = build_dit(cfg, None, dtype=torch.float32).state_dict()
    args = inputs(cfg, f=3, h=6, w=10, text_len=24)
    ref32 = _run(cfg, sd, torch.float32, "torch", device, args)
    exact_low = _run(cfg, sd, low, "kernels", device, args)
    model = build_dit(cfg, None, dtype=low, device=device)
    model.load_state_dict({k: v.to(param_dtype(k, low)) for k, v in sd.items()})
    model.set_attention_8bit(True)
    assert all(b.self_attn.attn_8bit for b in model.blocks)
    ops.set_backend("kernels")
    try:
        with torch.no_grad():
            out8 = model(*[a.to(device) if a is not None else None for a in args]).float().cpu()
    finally:
        ops.set_backend("auto")
    assert not torch.equal(out8, exact_low)
    # the 8-bit attention adds ~6e-4 (CPU fp16) to the exact run's error; a zeroed attention adds ~1.6e-2
    base, err = rel_l2(exact_low, ref32), rel_l2(out8, ref32)
    assert err < base + 5e-3, (err, base)


@pytest.mark.parametrize("backend", ["torch", "kernels"])
@pytest.mark.parametrize("scheme", ["fp8", "int8"])
def test_tiny_dit_8bit_inputs_quantized_in_the_modulation(backend, scheme):
    """A DiT with 8-bit linears quantizes the inputs of q/k/v, cross-attention q and ffn.0 inside the
    modulation kernels (ops.modulate_quant / gate_residual_modulate_quant): the output equals the two-pass
    path's (set_input_quant_fusion(False)) to the bit, on the references and on the kernels (interpreter on
    CPU); a LoRA on one of those linears sends its site back to the two-pass path."""
    from lightx2v_engine import quant
    cfg = T2V
    device = "cuda" if torch.cuda.is_available() else "cpu"
    low = torch.bfloat16 if device == "cuda" else torch.float16
    torch.manual_seed(0)
    model = build_dit(cfg, None, dtype=low, device=device)
    quant.quantize_dit_(model, scheme)
    args = [a.to(device) if a is not None else None for a in inputs(cfg, f=1, h=4, w=6, text_len=16)]
    calls = []
    fused = {name: getattr(ops, name) for name in ("modulate_quant", "gate_residual_modulate_quant")}

    def counting(name):
        def f(*a, **kw):
            calls.append(name)
            return fused[name](*a, **kw)
        return f

    def run(fuse):
        quant.set_input_quant_fusion(fuse)
        ops.set_backend(backend)
        try:
            with torch.no_grad():
                return model(*args).float().cpu()
        finally:
            ops.set_backend("auto")
            quant.set_input_quant_fusion(True)

    with pytest.MonkeyPatch.context() as mp:
        for name in fused:
            mp.setattr(ops, name, counting(name))
        two_pass = run(False)
        assert calls == []
        one_pass = run(True)
        # per block: q/k/v's input (modulate_quant in block 0, fused with the residual add after), norm3 -> cross q,
        # and ffn.0's input
        assert calls.count("modulate_quant") == 1 and len(calls) == 3 * cfg.num_layers, calls
        assert torch.equal(one_pass, two_pass)
        assert torch.isfinite(one_pass).all()
        calls.clear()
        q = model.blocks[0].cross_attn.q
        q.add_lora(torch.randn(q.out_features, 4, device=device), torch.randn(4, q.in_features, device=device), 0.1)
        with_lora = run(True)
        assert len(calls) == 3 * cfg.num_layers - 1, calls
        assert torch.equal(with_lora, run(False))
        assert not torch.equal(with_lora, one_pass)
    # a quantized input cannot take the GELU that ffn.2's quantization applies
    fc2 = model.blocks[0].ffn[2]
    qi = quant.QuantizedInput(*quant.per_token_quant_ref(torch.randn(3, fc2.in_features), scheme), low)
    with pytest.raises(ValueError, match="input_gelu needs the unquantized input"):
        fc2(qi, input_gelu=True)
