"""The DiT's hot ops, behind one small layer.

Every function here has a plain-PyTorch reference implementation (``*_ref``). On CUDA tensors the fast
kernels of ``lightx2v_engine.kernels`` are used when importable and the GPU is sm80 or newer (Triton's
NVIDIA minimum; older GPUs run the references); ``set_backend("torch")`` forces the references everywhere
(the "plain PyTorch reference path" of the benchmarks). The model file only calls the functions below, so
kernels plug in here without touching it.

Linears are nn.Linear modules in the model; the 8-bit path swaps them for quant.QuantLinear (a module
swap, gpt-fast style), so they need no entry here.

Shapes (batch-first, heads split last): x [B, L, C]; q/k/v [B, L, H, D]; modulation slices [B, 1, C]
(strided views of the [B, 6, C] modulation, never copied); RoPE tables cos/sin [L, D/2] fp32.
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

_BACKEND = "auto"
_BACKENDS = ("auto", "torch", "kernels")


def set_backend(name: str) -> None:
    """Selects the op implementations.

    "auto": kernels on CUDA tensors when importable, references elsewhere (default);
    "torch": references everywhere (the plain-PyTorch path);
    "kernels": kernels on every device (CPU through TRITON_INTERPRET=1; for tests).
    """
    global _BACKEND
    if name not in _BACKENDS:
        raise ValueError(f"ops backend must be one of {_BACKENDS}, got {name!r}")
    _BACKEND = name


def get_backend() -> str:
    return _BACKEND


@functools.lru_cache(maxsize=1)
def _kernels():
    """Imports the Triton kernels once; returns None (with the reason kept) when unavailable."""
    try:
        from lightx2v_engine import kernels
        return kernels
    except Exception as e:  # recorded, not hidden: see kernel_status()
        if type(e).__name__ == "ChoiceError":  # a mistyped LX2V_* choice: an error, not a silent slow path
            raise
        _kernels.reason = f"{type(e).__name__}: {e}"
        return None


# Triton's NVIDIA backend, and the kernels' bf16 MMAs and asynchronous copies, need compute capability 8.0+
# (A100 and newer): on older GPUs (V100, T4) the "auto" backend runs the references.
KERNEL_MIN_CAPABILITY = (8, 0)
_CAPABILITY: dict[int, tuple[int, int]] = {}


def _cuda_capability(device: torch.device) -> tuple[int, int] | None:
    """torch.cuda.get_device_capability of a CUDA device, cached per index (no driver call per op); None
    under torch.compile for a device not queried before (a pipeline queries its device when it is built)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    cap = _CAPABILITY.get(index)
    if cap is None and not torch.compiler.is_compiling():
        cap = _CAPABILITY[index] = tuple(torch.cuda.get_device_capability(index))
    return cap


def kernels_capable(device: torch.device) -> bool:
    """Whether the Triton kernels can run on `device`: a CUDA GPU of KERNEL_MIN_CAPABILITY or newer (any
    other device: True; there the backend decides, e.g. the interpreter under set_backend("kernels")).
    Traced by torch.compile as a dict lookup (True for a device never queried eagerly)."""
    if not isinstance(device, torch.device):
        device = torch.device(device)
    if device.type != "cuda":
        return True
    cap = _cuda_capability(device)
    return cap is None or cap >= KERNEL_MIN_CAPABILITY


def kernel_status() -> str:
    k = _kernels()
    return "available" if k is not None else f"unavailable ({getattr(_kernels, 'reason', '?')})"


def describe(device: torch.device, attn_8bit: bool = False, seq_parallel: bool = False,
             dtype: torch.dtype | None = None, head_dim: int | None = None) -> str:
    """One line naming what the hot ops run on `device`: references, or the kernels and their choices
    (seq_parallel: the DiT's tokens are split over GPUs, so norm+RoPE is always its own pass; dtype and
    head_dim, where given: a model the attention kernels do not take runs the reference attention)."""
    if _BACKEND == "torch" or (_BACKEND == "auto" and device.type != "cuda"):
        return f"ops: PyTorch references on {device}"
    k = _kernels()  # (first: a mistyped LX2V_* kernel choice raises on any GPU)
    if _BACKEND == "auto" and not kernels_capable(device):
        return (f"ops: PyTorch references on {device} (compute capability %d.%d: the Triton kernels need "
                f"%d.%d or newer)" % (_cuda_capability(device) + KERNEL_MIN_CAPABILITY))
    if k is None:
        return f"ops: PyTorch references (kernels {kernel_status()})"
    import importlib
    attn = importlib.import_module("lightx2v_engine.kernels.attention")
    qk = importlib.import_module("lightx2v_engine.kernels.qk_norm_rope")
    a8 = importlib.import_module("lightx2v_engine.kernels.attention_8bit")
    ar = importlib.import_module("lightx2v_engine.kernels.attention_rope")
    util = importlib.import_module("lightx2v_engine.kernels._util")
    impl, config = attn.attention_impl(device)
    a8_config = a8.attention_8bit_config(device)
    d, dt = head_dim or 128, dtype or torch.bfloat16
    wanted8 = attn_8bit and attention_8bit_available(device)
    eight = wanted8 and k.attention_supports(dt, d, True)
    exact = (impl + (f" {config}" if impl in ("triton", "gluon") else "")
             + (f" ({attn.gluon_status(device)})" if impl == "gluon" else ""))
    if not k.attention_supports(dt, d):
        self_attn = f"PyTorch reference ({dt}, head dim {d}: no attention kernel)"
    elif eight:
        self_attn = f"8-bit {a8_config}" + (f" ({attn.gluon_status(device)})" if a8.ATTN8_CONFIGS[a8_config].gluon
                                            else "")
    elif not seq_parallel and ar.rope_placement(device) == "prologue" and k.attention_supports(dt, d, True):
        self_attn = "triton with q/k norm+RoPE in the kernel (attention_rope)"
    else:
        self_attn = exact + (" (no 8-bit kernel for this model)" if wanted8 else "")
    cross = attn.cross_attention_impl(device) if k.attention_supports(dt, d) else "PyTorch reference"
    return (f"ops: Triton kernels; self-attention {self_attn}, cross-attention {cross}, "
            f"q/k norm+RoPE {qk.qk_rope_impl(device)}, FFN GELU epilogue "
            f"{'on' if gelu_epilogue_used(device, torch.bfloat16) else 'off'}; {util.tuned_status(device)}")


def _fast(t: torch.Tensor, name: str):
    """The kernel module when the kernel `name` exists and either the backend is "kernels", or it is "auto"
    and `t` is on a CUDA GPU the kernels run on (kernels_capable)."""
    if _BACKEND == "torch" or (_BACKEND == "auto" and not (t.is_cuda and kernels_capable(t.device))):
        return None
    k = _kernels()
    if k is None:
        if _BACKEND == "kernels":
            raise RuntimeError(f"ops backend 'kernels' requested but kernels are {kernel_status()}")
        return None
    return k if hasattr(k, name) else None


# ----------------------------------------------------------------------------------------------------
# adaLN modulation
# ----------------------------------------------------------------------------------------------------

def modulate_ref(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6,
                 out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """y = LayerNorm(x; no affine, eps) * (1 + scale) + shift, computed in fp32.

    x [B, L, C] (fp32 residual or bf16); shift, scale [B, 1, C] fp32 (views); returns [B, L, C] out_dtype.
    """
    out_dtype = out_dtype or x.dtype
    xf = x.float()
    y = F.layer_norm(xf, (xf.shape[-1],), eps=eps) * (1 + scale.float()) + shift.float()
    return y.to(out_dtype)


def _kernel_layout(x: torch.Tensor, *vecs):
    """(x, *vecs) in the layout the modulation kernels take, as the references take them: x (and y) with
    unit stride on C (a copy otherwise), [1, 1, C] vectors of a batch of B expanded (views) to [B, 1, C]."""
    x = x if x.stride(-1) == 1 else x.contiguous()
    b = x.shape[0] if x.dim() == 3 else None
    out = []
    for v in vecs:
        if (v is not None and v.dim() == 3 and v.shape[0] == 1 and b not in (None, 1)
                and v.shape[1:] == (1, x.shape[2])):
            v = v.expand(b, 1, x.shape[2])
        elif v is not None and v.dim() == 3 and v.shape == x.shape and v.stride(-1) != 1:  # (y)
            v = v.contiguous()
        out.append(v)
    return (x, *out)


def modulate(x, shift, scale, eps: float = 1e-6, out_dtype=None):
    k = _fast(x, "modulate")
    if k is not None:
        x, shift, scale = _kernel_layout(x, shift, scale)
        return k.modulate(x, shift, scale, eps, out_dtype or x.dtype)
    return modulate_ref(x, shift, scale, eps, out_dtype)


def gate_residual_modulate_ref(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor,
                               scale: torch.Tensor, eps: float = 1e-6, out_dtype: torch.dtype | None = None):
    """x' = x + gate * y (in x's dtype, fp32 math); returns (x', modulate(x', shift, scale)).

    x [B, L, C] residual; y [B, L, C] branch output (bf16); gate/shift/scale [B, 1, C] fp32 views.
    """
    x_new = (x.float() + y.float() * gate.float()).to(x.dtype)
    return x_new, modulate_ref(x_new, shift, scale, eps, out_dtype or y.dtype)


def gate_residual_modulate(x, y, gate, shift, scale, eps: float = 1e-6, out_dtype=None):
    k = _fast(x, "gate_residual_modulate")
    if k is not None:
        x, y, gate, shift, scale = _kernel_layout(x, y, gate, shift, scale)
        return k.gate_residual_modulate(x, y, gate, shift, scale, eps, out_dtype or y.dtype)
    return gate_residual_modulate_ref(x, y, gate, shift, scale, eps, out_dtype)


def modulate_quant_ref(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
                       round_dtype: torch.dtype, scheme: str) -> tuple[torch.Tensor, torch.Tensor]:
    """modulate_ref(..., out_dtype=round_dtype) quantized per token (quant.per_token_quant of its [B*L, C]
    rows, bit-exact with per_token_quant_ref): returns (q [B, L, C] fp8 e4m3 / int8, scale [B*L, 1] fp32)."""
    return _quant_rows(modulate_ref(x, shift, scale, eps, round_dtype), scheme)


def _quant_rows(h: torch.Tensor, scheme: str) -> tuple[torch.Tensor, torch.Tensor]:
    """h [B, L, C] -> (q [B, L, C], scale [B*L, 1]): quant.per_token_quant of its rows (the csrc kernel on
    CUDA, bit-exact with per_token_quant_ref)."""
    from lightx2v_engine.quant import per_token_quant
    q, s = per_token_quant(h.reshape(-1, h.shape[-1]), scheme)
    return q.view(h.shape), s


def modulate_quant(x, shift, scale, eps: float, round_dtype: torch.dtype, scheme: str):
    """The input of an 8-bit linear straight from the modulation: see modulate_quant_ref."""
    k = _fast(x, "modulate_quant")
    if k is not None:
        x, shift, scale = _kernel_layout(x, shift, scale)
        return k.modulate_quant(x, shift, scale, eps, round_dtype, scheme)
    return modulate_quant_ref(x, shift, scale, eps, round_dtype, scheme)


def gate_residual_modulate_quant_ref(x, y, gate, shift, scale, eps: float, round_dtype: torch.dtype, scheme: str):
    """(x', q, scale): gate_residual_modulate_ref's x', and its modulation quantized per token."""
    x_new, h = gate_residual_modulate_ref(x, y, gate, shift, scale, eps, round_dtype)
    return (x_new, *_quant_rows(h, scheme))


def gate_residual_modulate_quant(x, y, gate, shift, scale, eps: float, round_dtype: torch.dtype, scheme: str):
    k = _fast(x, "gate_residual_modulate_quant")
    if k is not None:
        x, y, gate, shift, scale = _kernel_layout(x, y, gate, shift, scale)
        return k.gate_residual_modulate_quant(x, y, gate, shift, scale, eps, round_dtype, scheme)
    return gate_residual_modulate_quant_ref(x, y, gate, shift, scale, eps, round_dtype, scheme)


# ----------------------------------------------------------------------------------------------------
# Linear + GELU(tanh)
# ----------------------------------------------------------------------------------------------------

# The FFN's first linear with bias + GELU in cuBLASLt's epilogue (LX2V_GELU_EPILOGUE=0 or
# set_gelu_epilogue(False): two ops instead).
_GELU_EPILOGUE = os.environ.get("LX2V_GELU_EPILOGUE", "1") != "0"


def set_gelu_epilogue(enabled: bool) -> None:
    """Turns the fused linear + GELU(tanh) of linear_gelu_tanh on or off (where the probe allows it)."""
    global _GELU_EPILOGUE
    _GELU_EPILOGUE = bool(enabled)


def gelu_epilogue_used(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether linear_gelu_tanh fuses on `device` in `dtype`: switched on, the kernels' backend (the plain
    PyTorch reference path, set_backend("torch"), never fuses), CUDA, and the probe passes. Inside a CUDA-
    graph capture an unprobed (device, dtype) is not probed (the probe copies and reads back): False."""
    if not (_GELU_EPILOGUE and _BACKEND != "torch" and torch.device(device).type == "cuda"):
        return False
    key = (_device_key(device), dtype)
    if key not in _GELU_PROBE and torch.cuda.is_current_stream_capturing():
        return False
    return gelu_epilogue_ok(*key)


def _device_key(device) -> torch.device:
    """`device` with its index filled in ("cuda" -> "cuda:<current>"), one cache entry per physical device."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


_GELU_PROBE: dict[tuple[torch.device, torch.dtype], bool] = {}


def gelu_epilogue_ok(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch._addmm_activation(use_gelu=True) (cuBLASLt's GELU_BIAS epilogue on CUDA) computes
    GELU(tanh)(x W^T + b) on `device`, probed once per (device, dtype):
    - on random data, within 4 units of `dtype`'s precision, |err| / (1 + |y|);
    - in the negative tail (pre-activations -4..-2.5, where the erf GELU is systematically below the tanh
      one, by up to 4e-4), closer on average to the tanh GELU than to the erf GELU: the CPU's epilogue is
      the erf GELU (False there), which the first test cannot tell apart in bf16.
    """
    key = (_device_key(device), dtype)
    if key not in _GELU_PROBE:
        _GELU_PROBE[key] = _probe_gelu_epilogue(*key)
    return _GELU_PROBE[key]


def _probe_gelu_epilogue(device: torch.device, dtype: torch.dtype) -> bool:
    g = torch.Generator(device="cpu").manual_seed(0)
    x, w = (torch.randn(n, 256, generator=g).to(device, dtype) / 8 for n in (64, 192))
    b = torch.randn(192, generator=g).to(device, dtype)
    tail_b = torch.linspace(-4.0, -2.5, 192).to(device, dtype)
    xt = x / 4096  # the tail's pre-activations are the bias, almost exactly
    try:
        fused = torch._addmm_activation(b, x, w.t(), use_gelu=True).float()
        tail = torch._addmm_activation(tail_b, xt, w.t(), use_gelu=True).float()
    except (RuntimeError, NotImplementedError):
        return False
    ref = F.gelu(F.linear(x.float(), w.float(), b.float()), approximate="tanh")
    err = ((fused - ref).abs() / (1 + ref.abs())).max().item()
    z = F.linear(xt.float(), w.float(), tail_b.float())
    off_tanh = (tail - F.gelu(z, approximate="tanh")).mean().abs().item()
    off_erf = (tail - F.gelu(z)).mean().abs().item()
    return err <= 4 * torch.finfo(dtype).eps and off_tanh < off_erf


def linear_gelu_tanh(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """GELU(tanh)(x W^T + b), x [..., K] -> [..., N]. On CUDA one cuBLASLt GEMM with the bias and GELU in
    its epilogue (no separate pass over the [M, N] output) where gelu_epilogue_ok; else two ops."""
    if (bias is not None and x.dtype in (torch.bfloat16, torch.float16) and weight.dtype == x.dtype
            and bias.dtype == x.dtype and not torch.compiler.is_compiling() and gelu_epilogue_used(x.device, x.dtype)):
        y = torch._addmm_activation(bias, x.reshape(-1, x.shape[-1]), weight.t(), use_gelu=True)
        return y.reshape(*x.shape[:-1], weight.shape[0])
    return F.gelu(F.linear(x, weight, bias), approximate="tanh")


# ----------------------------------------------------------------------------------------------------
# RMSNorm, RoPE, attention
# ----------------------------------------------------------------------------------------------------

def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Wan's RMSNorm: (x.float() * rsqrt(mean(x^2) + eps)).to(x.dtype) * weight, returned in x's dtype.

    x [..., C]; weight [C] (fp32).
    """
    xf = x.float()
    n = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return (n.float() * weight.float()).to(x.dtype)


def rms_norm(x, weight, eps: float = 1e-6):
    k = _fast(x, "rms_norm")
    if k is not None:
        return k.rms_norm(x if x.stride(-1) == 1 else x.contiguous(), weight.contiguous(), eps)
    return rms_norm_ref(x, weight, eps)


@dataclass(frozen=True)
class Rope:
    """3D RoPE tables for one latent grid: cos/sin [L, D/2] fp32, one angle per interleaved pair.

    grid = (F, Hp, Wp) patch grid; L = F * Hp * Wp, tokens in (f, h, w) row-major order. Under sequence
    parallel (parallel.SeqParallel.shard_rope) the tables hold one rank's rows and seq_len is the whole L.
    """
    cos: torch.Tensor
    sin: torch.Tensor
    grid: tuple[int, int, int]
    seq_len: int | None = None


def rope_frequencies(head_dim: int = 128, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-axis inverse frequencies (float64): f gets d - 4*(d//6) dims, h and w get 2*(d//6) each.

    For d = 128: 22 pairs rotated by f * theta^(-2j/44), 21 by h * theta^(-2j/42), 21 by w * theta^(-2j/42).
    """
    d_h = 2 * (head_dim // 6)
    d_f = head_dim - 2 * d_h

    def inv(dim):
        return 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)

    return inv(d_f), inv(d_h), inv(d_h)


def rope_tables(grid: tuple[int, int, int], head_dim: int = 128, device=None, theta: float = 10000.0) -> Rope:
    """Builds the RoPE tables for `grid` (computed in float64, stored fp32). Done once per shape."""
    f, h, w = grid
    inv_f, inv_h, inv_w = rope_frequencies(head_dim, theta)
    af = torch.outer(torch.arange(f, dtype=torch.float64), inv_f)  # [F, 22]
    ah = torch.outer(torch.arange(h, dtype=torch.float64), inv_h)  # [Hp, 21]
    aw = torch.outer(torch.arange(w, dtype=torch.float64), inv_w)  # [Wp, 21]
    ang = torch.cat([
        af[:, None, None, :].expand(f, h, w, -1),
        ah[None, :, None, :].expand(f, h, w, -1),
        aw[None, None, :, :].expand(f, h, w, -1),
    ], dim=-1).reshape(f * h * w, head_dim // 2)
    return Rope(cos=ang.cos().float().to(device), sin=ang.sin().float().to(device), grid=(f, h, w))


def apply_rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates interleaved pairs (x[2i], x[2i+1]) by the angle of pair i, in fp32.

    x [B, L, H, D]; cos/sin [L, D/2] fp32; returns [B, L, H, D] in x's dtype.
    """
    xf = x.float().unflatten(-1, (-1, 2))
    re, im = xf[..., 0], xf[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    out = torch.stack([re * c - im * s, re * s + im * c], dim=-1).flatten(-2)
    return out.to(x.dtype)


def qk_norm_rope_ref(q: torch.Tensor, k: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor, rope: Rope,
                     num_heads: int, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm q and k over the full width C with their weights, split heads, apply 3D RoPE.

    q, k [B, L, C] (run dtype); wq, wk [C] fp32; returns q, k [B, L, H, C/H] in the run dtype.
    """
    qn = rms_norm_ref(q, wq, eps).unflatten(-1, (num_heads, -1))
    kn = rms_norm_ref(k, wk, eps).unflatten(-1, (num_heads, -1))
    return apply_rope_ref(qn, rope.cos, rope.sin), apply_rope_ref(kn, rope.cos, rope.sin)


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Non-causal softmax(q k^T / sqrt(D)) v through SDPA. q [B, Lq, H, D]; k, v [B, Lk, H, D]."""
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       scale=1.0 / math.sqrt(q.shape[-1]))
    return o.transpose(1, 2)


def attention_8bit_available(device: torch.device) -> bool:
    """Whether self_attention(..., attn_8bit=True) runs the 8-bit kernel on `device` (else it is exact)."""
    k = _kernels() if _BACKEND != "torch" else None
    if k is None or (_BACKEND == "auto" and not (device.type == "cuda" and kernels_capable(device))):
        return False
    return k.fp8_supported(device)


def self_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor,
                   rope: Rope, num_heads: int, eps: float = 1e-6, attn_8bit: bool = False, seq_parallel=None
                   ) -> torch.Tensor:
    """softmax(rope(rms(q)) rope(rms(k))^T / sqrt(D)) v.

    q, k, v [B, L, C] projections (run dtype); returns [B, L, C]. A kernel may fuse the RoPE into the
    attention prologue; the reference runs qk_norm_rope then SDPA. attn_8bit asks for the approximate
    INT8/FP8 kernel; where attention_8bit_available() is false the exact path runs instead.
    seq_parallel (parallel.SeqParallel): q, k, v hold this rank's token shard and `rope` its rows; the
    attention spans the whole sequence (rope.seq_len tokens) through the group's collectives.
    """
    D = q.shape[-1] // num_heads
    kern = _fast(q, "self_attention")
    # (the attention kernels take fp16/bf16 and their head dims; an fp32 model or 48-wide heads: the reference)
    ok = kern is not None and kern.attention_supports(q.dtype, D)
    eight = ok and attn_8bit and attention_8bit_available(q.device) and kern.attention_supports(q.dtype, D, True)
    if ok and seq_parallel is None:
        return kern.self_attention(q, k, v, wq, wk, rope.cos, rope.sin, num_heads, eps, attn_8bit=eight)
    kern = _fast(q, "qk_norm_rope")
    if kern is not None:
        qh, kh = kern.qk_norm_rope(q, k, wq, wk, rope.cos, rope.sin, num_heads, eps)
    else:
        qh, kh = qk_norm_rope_ref(q, k, wq, wk, rope, num_heads, eps)
    vh = v.unflatten(-1, (num_heads, -1))
    if seq_parallel is None:
        return attention(qh, kh, vh).flatten(-2)
    # the shard's rows are normed and rotated; the group's attention (Ulysses all-to-all or k/v all-gather)
    # runs our attention op (or the 8-bit one) over the whole sequence
    if eight:
        attn = _kernels().attention_8bit
    else:  # self-attention's kernel choice (kernels.attention_impl), not cross-attention's
        kern = _fast(q, "self_attention_heads")
        attn = kern.self_attention_heads if kern is not None and ok else attention
    seq_len = rope.seq_len if rope.seq_len is not None else rope.cos.shape[0]
    return seq_parallel.attention(qh, kh, vh, seq_len, attn).flatten(-2)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Non-causal attention, q [B, Lq, H, D], k/v [B, Lk, H, D] -> [B, Lq, H, D]."""
    kern = _fast(q, "attention")
    if kern is not None and kern.attention_supports(q.dtype, q.shape[-1]):
        return kern.attention(q, k, v)
    return attention_ref(q, k, v)
