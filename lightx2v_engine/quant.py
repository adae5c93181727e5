"""8-bit (fp8 e4m3 / int8) linear layers, as a module swap (gpt-fast style).

Format (identical to LightX2V's ``dit_quantized_ckpt``): for each quantized linear
  ``<name>.weight``       [N, K] torch.float8_e4m3fn or torch.int8
  ``<name>.weight_scale`` [N, 1] fp32, per output channel: W ~= weight * weight_scale
                          (fp8: amax/448, int8: amax/127)
  ``<name>.bias``         [N] run dtype (bf16)
Quantized modules: the 2-D linears under ``blocks.<i>.self_attn``, ``blocks.<i>.cross_attn`` and
``blocks.<i>.ffn`` (LightX2V quantizes exactly those whose key's third component is one of the three).

Forward: x [..., K] is quantized per token (per row of the flattened [M, K]) on the fly,
x ~= xq * sx with sx [M, 1], then y = (xq @ weight^T) * sx * weight_scale^T + bias, accumulated in fp32.
CUDA: the csrc kernel (or torch ops) for the quantization, then ``torch._scaled_mm`` (fp8, rowwise scales,
bias fused, fast accumulation) or ``torch._int_mm`` + a scale/bias epilogue (int8).
CPU: ``quant_linear_ref``, the same math in fp32.
"""
from __future__ import annotations

import os
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from lightx2v_engine import csrc_ops

FP8_MAX = 448.0  # largest finite float8_e4m3fn
INT8_MAX = 127.0  # symmetric int8 range [-127, 127]
AMAX_MIN = 1e-12  # per-row / per-channel amax floor; must equal kAmaxMin in csrc/quant_kernels.h

SCHEMES = ("fp8", "int8")
# LightX2V `dit_quant_scheme` names that this engine runs, mapped to the 8-bit format they store.
_SCHEME_ALIASES = {
    "fp8": "fp8", "int8": "int8",
    "fp8-sgl": "fp8", "fp8-vllm": "fp8", "fp8-torchao": "fp8", "fp8-triton": "fp8", "fp8-q8f": "fp8",
    "int8-sgl": "int8", "int8-vllm": "int8", "int8-torchao": "int8", "int8-triton": "int8", "int8-q8f": "int8",
}
_QDTYPE = {"fp8": torch.float8_e4m3fn, "int8": torch.int8}
_QMAX = {"fp8": FP8_MAX, "int8": INT8_MAX}

QUANTIZED_GROUPS = ("self_attn", "cross_attn", "ffn")


def parse_quant_scheme(name: str) -> str:
    """Maps a scheme name ("fp8", "int8" or a LightX2V name such as "fp8-sgl") to "fp8" or "int8"."""
    scheme = _SCHEME_ALIASES.get(name.strip().lower()) if isinstance(name, str) else None
    if scheme is None:
        raise ValueError(f"unsupported quantization scheme {name!r}; supported: {sorted(_SCHEME_ALIASES)}")
    return scheme


FP8_MIN_CAPABILITY = (8, 9)


def check_fp8_device(run, device: torch.device) -> None:
    """Raises before any weight is read when `run` (a RunConfig) asks for fp8 linears (dit/t5/clip_quantized
    with an fp8 scheme; weight_auto_quant too) on a CUDA GPU older than sm89: torch._scaled_mm and the Triton
    fp8 GEMM have no fp8 there, so the first step would fail after every model had loaded. int8 runs."""
    if device.type != "cuda":
        return
    cap = torch.cuda.get_device_capability(device)
    if cap >= FP8_MIN_CAPABILITY:
        return
    for part in ("dit", "t5", "clip"):
        name = getattr(run, f"{part}_quant_scheme")
        if getattr(run, f"{part}_quantized") and parse_quant_scheme(name) == "fp8":
            raise ValueError(
                f"{part}_quant_scheme {name!r}: fp8 matrix multiplies need a GPU of compute capability 8.9 or "
                f"newer (Ada, Hopper, Blackwell); {device} is {torch.cuda.get_device_name(device)} "
                f"(sm{cap[0]}{cap[1]}). Run an int8 checkpoint ({part}_quant_scheme 'int8-vllm', its int8 file) "
                f"or set {part}_quantized false")


def scheme_of_dtype(dtype: torch.dtype) -> str:
    """The scheme stored with 8-bit weights of `dtype`."""
    for scheme, qdtype in _QDTYPE.items():
        if dtype == qdtype:
            return scheme
    raise ValueError(f"quantized weights must be float8_e4m3fn or int8, got {dtype}")


def _to_qdtype(v: torch.Tensor, scheme: str) -> torch.Tensor:
    """v (fp32, already scaled) -> fp8 e4m3 (round-to-nearest-even, saturated) or int8 (round-half-even)."""
    qmax = _QMAX[scheme]
    if scheme == "fp8":
        # torch's fp32 -> e4m3fn cast maps overflow to NaN; saturate first as the CUDA cvt.satfinite does
        return v.clamp(-qmax, qmax).to(torch.float8_e4m3fn)
    return v.round().clamp(-qmax, qmax).to(torch.int8)


def quantize_weight(w: torch.Tensor, scheme: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric quantization of a linear weight.

    w [N, K] (any float dtype) -> (wq [N, K] fp8 e4m3 / int8, scale [N, 1] fp32) with
    scale = max(amax_row, 1e-12) / QMAX, wq = cvt(w / scale), QMAX = 448 (fp8) or 127 (int8).
    """
    scheme = parse_quant_scheme(scheme)
    if w.dim() != 2:
        raise ValueError(f"quantize_weight expects a 2-D [out, in] weight, got shape {tuple(w.shape)}")
    wf = w.float()
    amax = wf.abs().amax(dim=1, keepdim=True).clamp_min(AMAX_MIN)
    scale = amax / torch.full_like(amax, _QMAX[scheme])
    return _to_qdtype(wf / scale, scheme), scale


def dequantize_weight(wq: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """wq [N, K] fp8/int8, scale [N, 1] -> fp32 [N, K] = wq * scale."""
    return wq.float() * scale.float().reshape(-1, 1)


def per_token_quant_ref(x: torch.Tensor, scheme: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row dynamic quantization, the reference of the csrc kernels (bit-exact with them).

    x [M, K] -> (q [M, K] fp8 e4m3 / int8, scale [M, 1] fp32):
    amax = max(max_j |x|, 1e-12); inv = QMAX / amax; q = cvt(x * inv); scale = amax / QMAX.
    """
    scheme = parse_quant_scheme(scheme)
    xf = x.float()
    amax = xf.abs().amax(dim=-1, keepdim=True).clamp_min(AMAX_MIN)
    qmax = torch.full_like(amax, _QMAX[scheme])
    # tensor / tensor divisions: IEEE-rounded like the kernel's __fdiv_rn (scalar division may use a reciprocal)
    return _to_qdtype(xf * (qmax / amax), scheme), amax / qmax


def per_token_quant(x: torch.Tensor, scheme: str, gelu: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row dynamic quantization of x [M, K]: the csrc kernel for CUDA bf16/fp16 inputs when built,
    otherwise per_token_quant_ref (also capturable in a CUDA graph). gelu: of F.gelu(x, approximate="tanh")
    (in x's dtype), which the csrc kernel computes in the same pass."""
    scheme = parse_quant_scheme(scheme)
    if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and csrc_ops.csrc_available(x.device):
        if x.stride(-1) != 1:
            x = x.contiguous()
        if scheme == "fp8":
            return csrc_ops.per_token_quant_fp8(x, gelu=gelu)
        return csrc_ops.per_token_quant_int8(x, gelu=gelu)
    return per_token_quant_ref(F.gelu(x, approximate="tanh") if gelu else x, scheme)


def quant_linear_ref(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                     bias: torch.Tensor | None) -> torch.Tensor:
    """Reference W8A8 linear in fp32: y = (xq @ wq^T) * sx * sw^T + b, returned in x's dtype.

    x [M, K]; weight [N, K] fp8/int8; weight_scale [N, 1]; bias [N] or None; xq, sx = per_token_quant_ref(x).
    """
    xq, sx = per_token_quant_ref(x, scheme_of_dtype(weight.dtype))
    return _gemm_8bit_ref(xq, sx, weight, weight_scale, bias, x.dtype)


def _gemm_8bit_ref(xq: torch.Tensor, sx: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                   bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """(xq @ wq^T) * sx * sw^T + b in fp32, returned in out_dtype (xq [M, K] 8-bit, sx [M, 1])."""
    acc = xq.float() @ weight.float().t()
    y = acc * sx * weight_scale.float().reshape(1, -1)
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


class QuantizedInput(NamedTuple):
    """An 8-bit linear's input quantized ahead, by the kernel that produced it (ops.modulate_quant):
    q [..., K] fp8 e4m3 / int8, scale [M, 1] fp32 per row of the flattened [M, K], dtype the run dtype
    the unquantized tensor would have had (the linear's output dtype). QuantLinear and
    quant_linears_same_input take it in place of that tensor."""
    q: torch.Tensor
    scale: torch.Tensor
    dtype: torch.dtype


def takes_quantized_input(mods: list) -> str | None:
    """The scheme in which an input may be quantized ahead for all of `mods` (QuantizedInput), or None:
    every one a QuantLinear of that scheme with the same in_features and no LoRA branch (a LoRA reads the
    unquantized input), the switch set_input_quant_fusion not turned off."""
    if not _FUSE_INPUT_QUANT or not mods or not all(isinstance(m, QuantLinear) for m in mods):
        return None
    first = mods[0]
    if any(m.lora_down is not None or m.scheme != first.scheme or m.in_features != first.in_features for m in mods):
        return None
    return first.scheme


# LX2V_FUSED_INPUT_QUANT=0 or set_input_quant_fusion(False): the modulation writes its run-dtype output and each
# 8-bit linear quantizes it (two passes; what bench_e2e.py compares against)
_FUSE_INPUT_QUANT = os.environ.get("LX2V_FUSED_INPUT_QUANT", "1") != "0"


def set_input_quant_fusion(enabled: bool) -> None:
    """Whether the DiT quantizes the inputs of its 8-bit linears inside the modulation kernels (default on)."""
    global _FUSE_INPUT_QUANT
    _FUSE_INPUT_QUANT = bool(enabled)


def _int_mm_scaled(xq: torch.Tensor, sx: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                   bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    m = xq.shape[0]
    if m <= 16:  # torch._int_mm needs more than 16 rows
        xq = torch.cat([xq, xq.new_zeros(32 - m, xq.shape[1])])
    acc = torch._int_mm(xq, weight.t())[:m]
    y = torch.mul(acc, sx)  # int32 * fp32 -> fp32 in one pass
    if bias is not None:
        y = torch.addcmul(bias.float(), y, weight_scale.reshape(1, -1))
    else:
        y.mul_(weight_scale.reshape(1, -1))
    return y.to(out_dtype)


def kernel_choices() -> tuple[bool, str]:
    """The process-wide switches QuantLinear reads when it runs (a captured CUDA graph bakes them in):
    (input quantization fused into the modulation, the int8 GEMM)."""
    return _FUSE_INPUT_QUANT, _int8_gemm


_INT8_GEMMS = ("cublas", "triton")
# "triton" won at every Wan shape on an H100 (2026-11-26, M=32760): e.g. K=N=1536 0.243 vs 0.790 ms,
# K=N=5120 1.81 vs 3.57 ms, K=13824 N=5120 4.62 vs 6.82 ms (benchmarks/RESULTS.md).
_int8_gemm = "triton"


def set_int8_gemm(name: str) -> None:
    """CUDA int8 GEMM of QuantLinear: "cublas" (torch._int_mm + a 3-pass torch epilogue) or
    "triton" (kernels/fp8_gemm.py, scales and bias fused in the epilogue; default). bench_quant.py compares them."""
    global _int8_gemm
    if name not in _INT8_GEMMS:
        raise ValueError(f"int8 GEMM must be one of {_INT8_GEMMS}, got {name!r}")
    _int8_gemm = name


def quant_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                 bias: torch.Tensor | None, input_gelu: bool = False) -> torch.Tensor:
    """W8A8 linear with per-token activation and per-channel weight scales, y [M, N] in x's dtype.

    x [M, K] (bf16 on CUDA); weight [N, K] fp8 e4m3 / int8; weight_scale [N, 1] fp32; bias [N] or None.
    CUDA: fused quantization kernel + torch._scaled_mm (fp8) / torch._int_mm (int8); else quant_linear_ref.
    input_gelu: the linear of F.gelu(x, approximate="tanh"), the GELU done by the quantization kernel.
    """
    scheme = scheme_of_dtype(weight.dtype)
    n, k = weight.shape
    if not x.is_cuda or not _gemm_shape_ok(scheme, k, n):
        return quant_linear_ref(F.gelu(x, approximate="tanh") if input_gelu else x, weight, weight_scale, bias)
    xq, sx = per_token_quant(x, scheme, gelu=input_gelu)
    return _gemm_8bit(xq, sx, weight, weight_scale, bias, x.dtype)


def _gemm_shape_ok(scheme: str, k: int, *ns: int) -> bool:
    """cuBLASLt 8-bit GEMMs need K and N multiples of 16 (fp8) / 8 (int8); other shapes use the reference."""
    align = 16 if scheme == "fp8" else 8
    return k % align == 0 and all(n % align == 0 for n in ns)


def _triton_scaled_gemm(device: torch.device):
    """kernels.fp8_gemm.scaled_gemm, or None where the Triton kernels cannot be imported (no triton: the
    cuBLAS / torch paths run), the ops backend is "torch", or they cannot run on `device` (before sm80)."""
    from lightx2v_engine import ops
    if ops.get_backend() == "torch" or ops._kernels() is None or not ops.kernels_capable(device):
        return None
    from lightx2v_engine.kernels.fp8_gemm import scaled_gemm
    return scaled_gemm


def _gemm_8bit(xq: torch.Tensor, sx: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
               bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """y = (xq @ weight^T) * sx * weight_scale^T + bias on CUDA (pre-quantized activations)."""
    scheme = scheme_of_dtype(weight.dtype)
    if scheme == "int8":
        scaled_gemm = _triton_scaled_gemm(xq.device) if _int8_gemm == "triton" else None
        if scaled_gemm is not None:
            return scaled_gemm(xq, weight, sx, weight_scale, bias, None, None, out_dtype)
        return _int_mm_scaled(xq, sx, weight, weight_scale, bias, out_dtype)
    if bias is not None and bias.dtype != torch.bfloat16:
        bias = bias.to(torch.bfloat16)  # rowwise-scaled fp8 GEMMs take a bf16 bias and produce bf16
    y = torch._scaled_mm(xq, weight.t(), scale_a=sx, scale_b=weight_scale.reshape(1, -1), bias=bias,
                         out_dtype=torch.bfloat16, use_fast_accum=True)
    return y if out_dtype == torch.bfloat16 else y.to(out_dtype)


def quant_linears_same_input(x: torch.Tensor | QuantizedInput, mods: list["QuantLinear"]) -> list[torch.Tensor]:
    """[m(x) for m in mods] with x quantized once (e.g. q, k, v of self-attention: one pass over x instead of
    three). x [..., K] or a QuantizedInput; every module takes K inputs and shares its scheme; same results
    as calling each."""
    if isinstance(x, QuantizedInput):
        return [m(x) for m in mods]
    k = x.shape[-1]
    first = mods[0]
    same = all(m.in_features == k and m.scheme == first.scheme for m in mods)
    if not (x.is_cuda and same and _gemm_shape_ok(first.scheme, k, *(m.out_features for m in mods))):
        return [m(x) for m in mods]
    x2 = x.reshape(-1, k)
    xq, sx = per_token_quant(x2, first.scheme)
    return [m._add_lora(_gemm_8bit(xq, sx, m.weight, m.weight_scale, m.bias, x.dtype), x2)
            .reshape(*x.shape[:-1], m.out_features) for m in mods]


class QuantLinear(nn.Module):
    """Drop-in for nn.Linear with 8-bit weights: y = x W^T + b with W ~= weight * weight_scale.

    Buffers (LightX2V key names): weight [out, in] fp8 e4m3 / int8, weight_scale [out, 1] fp32, bias [out]
    (run dtype) or None. x [..., in] -> y [..., out] in x's dtype.
    LoRAs (add_lora) run beside the 8-bit GEMM as y += (x lora_down^T) lora_up^T, like LightX2V's
    lora_dynamic_apply: lora_down [R, in], lora_up [out, R] (the scales folded in), R the ranks of every
    LoRA added; not part of the state dict.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, scheme: str = "fp8",
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.scheme = parse_quant_scheme(scheme)
        qdtype = _QDTYPE[self.scheme]
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=qdtype, device=device))
        self.register_buffer("weight_scale", torch.empty(out_features, 1, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device) if bias else None)
        self.run_dtype = dtype  # the LoRA branches' dtype
        self.register_buffer("lora_down", None, persistent=False)
        self.register_buffer("lora_up", None, persistent=False)

    @torch.no_grad()
    def add_lora(self, up: torch.Tensor, down: torch.Tensor, scale: float) -> None:
        """Adds the branch scale * up @ down (up [out, r], down [r, in]) beside the 8-bit weight, stacked
        with earlier ones along the rank; kept in the run dtype (the bias's, else the constructor's), on the
        weight's device."""
        if up.dim() != 2 or down.dim() != 2 or up.shape[1] != down.shape[0] or \
                (up.shape[0], down.shape[1]) != (self.out_features, self.in_features):
            raise ValueError(f"QuantLinear.add_lora: up {tuple(up.shape)} @ down {tuple(down.shape)} does not give "
                             f"[{self.out_features}, {self.in_features}]")
        dtype = self.bias.dtype if self.bias is not None else self.run_dtype
        dev = self.weight.device
        up = (up.to(dev, torch.float32) * scale).to(dtype)
        down = down.to(dev, dtype)
        if self.lora_down is not None:
            up, down = torch.cat([self.lora_up, up], 1), torch.cat([self.lora_down, down], 0)
        self.lora_up, self.lora_down = up, down

    def _add_lora(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """y + the LoRA branches of x (y [M, out] fresh from the 8-bit GEMM, updated in place; x [M, in]).
        The up-projection accumulates into y in its GEMM (addmm, beta 1): no [M, out] temporary, no
        separate add pass."""
        if self.lora_down is None:
            return y
        return y.addmm_(x @ self.lora_down.to(x.dtype).t(), self.lora_up.to(x.dtype).t())

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: str) -> "QuantLinear":
        """Quantizes `linear`'s current weight (per output channel); the bias is kept in its dtype."""
        w = linear.weight.detach()
        bias = linear.bias
        q = cls(linear.in_features, linear.out_features, bias is not None, scheme, device=w.device,
                dtype=bias.dtype if bias is not None else w.dtype)
        q.weight, q.weight_scale = quantize_weight(w, q.scheme)
        if bias is not None:
            q.bias = bias.detach().clone()
        return q

    def forward(self, x: torch.Tensor | QuantizedInput, input_gelu: bool = False) -> torch.Tensor:
        """self(x); input_gelu: self(F.gelu(x, approximate="tanh")) with the GELU inside the activation
        quantization (the FFN's ffn.2: one pass over [M, K] instead of two). x may come quantized already
        (QuantizedInput, takes_quantized_input): the GEMM alone runs."""
        if isinstance(x, QuantizedInput):
            if input_gelu:
                raise ValueError("QuantLinear: input_gelu needs the unquantized input (the GELU is applied before "
                                 "the quantization), got a QuantizedInput")
            return self._forward_quantized(x)
        if x.shape[-1] != self.in_features:
            raise ValueError(f"QuantLinear: expected input [..., {self.in_features}], got {tuple(x.shape)}")
        x2 = x.reshape(-1, self.in_features)
        y = quant_linear(x2, self.weight, self.weight_scale, self.bias, input_gelu)
        if self.lora_down is not None:
            y = self._add_lora(y, F.gelu(x2, approximate="tanh") if input_gelu else x2)
        return y.reshape(*x.shape[:-1], self.out_features)

    def _forward_quantized(self, x: QuantizedInput) -> torch.Tensor:
        q, sx = x.q, x.scale
        if q.shape[-1] != self.in_features or q.dtype != self.weight.dtype:
            raise ValueError(f"QuantLinear: expected a quantized input [..., {self.in_features}] of "
                             f"{self.weight.dtype}, got {tuple(q.shape)} of {q.dtype}")
        if self.lora_down is not None:
            raise ValueError("QuantLinear: a quantized input cannot feed a LoRA branch (it reads the unquantized "
                             "input); see takes_quantized_input")
        q2 = q.reshape(-1, self.in_features)
        if q2.is_cuda and _gemm_shape_ok(self.scheme, self.in_features, self.out_features):
            y = _gemm_8bit(q2, sx, self.weight, self.weight_scale, self.bias, x.dtype)
        else:
            y = _gemm_8bit_ref(q2, sx, self.weight, self.weight_scale, self.bias, x.dtype)
        return y.reshape(*q.shape[:-1], self.out_features)

    def _apply(self, fn, recurse=True):
        # nn.Module.to(dtype) / .half() / .bfloat16() cast every floating tensor, float8 included: keep the
        # 8-bit weight and the fp32 scale in their formats and apply only the device move to them.
        kept = {"weight": self.weight, "weight_scale": self.weight_scale}
        super()._apply(fn, recurse)
        for name, orig in kept.items():
            new = self._buffers[name]
            if new is not None and new.dtype != orig.dtype:
                self._buffers[name] = orig.to(new.device)
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # Checkpoints may store the scale as [out] or in bf16 (LightX2V's loader forces fp32), and the bias
        # in another float dtype: normalise before nn.Module's loader (which keeps dtypes under assign=True).
        wkey, skey, bkey = prefix + "weight", prefix + "weight_scale", prefix + "bias"
        if wkey in state_dict and state_dict[wkey].dtype != self.weight.dtype:
            got = state_dict[wkey]
            error_msgs.append(f"{wkey}: expected {self.weight.dtype} (scheme {self.scheme}) with shape "
                              f"{tuple(self.weight.shape)}, got {got.dtype} {tuple(got.shape)}")
            state_dict = {k: v for k, v in state_dict.items() if k != wkey}
        if skey in state_dict:
            s = state_dict[skey]
            if s.dim() == 1 and s.shape[0] == self.out_features:
                s = s.reshape(-1, 1)
            state_dict[skey] = s.to(torch.float32)
        if bkey in state_dict and self.bias is not None and state_dict[bkey].dtype != self.bias.dtype:
            state_dict[bkey] = state_dict[bkey].to(self.bias.dtype)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, scheme={self.scheme}"
                + (f", lora_rank={self.lora_down.shape[0]}" if self.lora_down is not None else ""))


def concat_quant_linears(mods: list[QuantLinear]) -> QuantLinear:
    """One QuantLinear computing cat([m(x) for m in mods], -1) (e.g. q, k, v of one attention): per-output-
    channel scales concatenate exactly, and x is quantized once for all. All must share in_features/scheme."""
    first = mods[0]
    if any(m.lora_down is not None for m in mods):
        raise ValueError("concat_quant_linears: modules with LoRA branches cannot be concatenated")
    for m in mods:
        if m.in_features != first.in_features or m.scheme != first.scheme or (m.bias is None) != (first.bias is None):
            raise ValueError(f"concat_quant_linears: mismatched modules {first.extra_repr()} vs {m.extra_repr()}")
    out = QuantLinear(first.in_features, sum(m.out_features for m in mods), first.bias is not None, first.scheme,
                      device="meta", dtype=first.bias.dtype if first.bias is not None else torch.bfloat16)
    out.weight = torch.cat([m.weight for m in mods])
    out.weight_scale = torch.cat([m.weight_scale for m in mods])
    out.bias = torch.cat([m.bias for m in mods]) if first.bias is not None else None
    return out


def quant_linear_gate_residual(linear: QuantLinear, x: torch.Tensor, residual: torch.Tensor,
                               gate: torch.Tensor) -> torch.Tensor:
    """residual + gate * linear(x) (fp32 math, residual's dtype): Wan's gated residual after o / ffn.2.

    x [B, L, K]; residual [B, L, N]; gate [B, 1, N]. On CUDA with B == 1 the Triton 8-bit GEMM applies
    scales, bias, gate and residual in its epilogue (one pass over [L, N] instead of three); otherwise the
    linear's output (rounded to x's dtype) goes through the same formula in torch.
    """
    b, l, _ = x.shape
    scaled_gemm = _triton_scaled_gemm(x.device) if x.is_cuda and b == 1 else None
    if scaled_gemm is not None and residual.stride(-1) == 1 and linear.weight.shape[1] % 16 == 0 \
            and linear.lora_down is None:
        xq, sx = per_token_quant(x.reshape(l, -1), linear.scheme)
        out = scaled_gemm(xq, linear.weight, sx, linear.weight_scale, linear.bias, residual.reshape(l, -1),
                          gate.reshape(-1), residual.dtype)
        return out.reshape(residual.shape)
    return (residual.float() + gate.float() * linear(x).float()).to(residual.dtype)


def is_quantized_linear_name(name: str) -> bool:
    """True for module names LightX2V quantizes: blocks.<i>.{self_attn,cross_attn,ffn}.<...>."""
    parts = name.split(".")
    if len(parts) < 4 or parts[0] != "blocks" or not parts[1].isdigit() or parts[2] not in QUANTIZED_GROUPS:
        return False
    return not any(p == "ca" or "audio" in p for p in parts)


def _quantizable_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and m.weight.dim() == 2 and is_quantized_linear_name(name)]


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def swap_scaled_linears_(model: nn.Module, sd: dict[str, torch.Tensor], source: str) -> list[str]:
    """For every `<name>.weight_scale` of `sd` (a LightX2V quantized encoder file: the linear's `weight` in
    float8 e4m3 / int8 next to its scale [out] or [out, 1]): the nn.Linear <name> of `model` (typically on
    meta) becomes an empty QuantLinear of that format, and the scale in `sd` becomes fp32 [out, 1], ready
    for load_state_dict(assign=True). Errors name the key. Returns the swapped names."""
    names = []
    for key in sorted(k for k in sd if k.endswith(".weight_scale")):
        name = key[:-len(".weight_scale")]
        try:
            lin = model.get_submodule(name)
        except AttributeError:
            lin = None
        if not isinstance(lin, nn.Linear):
            raise ValueError(f"{source}: {key!r} scales no linear layer of {type(model).__name__}")
        w = sd.get(name + ".weight")
        if w is None:
            raise ValueError(f"{source}: {key!r} has no {name}.weight")
        try:
            scheme = scheme_of_dtype(w.dtype)
        except ValueError as e:
            raise ValueError(f"{source}: {name}.weight: {e}") from None
        scale = sd[key]
        if scale.numel() != lin.out_features:
            raise ValueError(f"{source}: {key!r} has {scale.numel()} values, expected {lin.out_features} (one per "
                             f"output channel)")
        sd[key] = scale.float().reshape(-1, 1)
        bias_dtype = lin.bias.dtype if lin.bias is not None else torch.bfloat16
        _replace(model, name, QuantLinear(lin.in_features, lin.out_features, lin.bias is not None, scheme,
                                          device="meta", dtype=bias_dtype))
        names.append(name)
    swapped = {n + ".weight" for n in names}
    unscaled = sorted(k for k, v in sd.items() if v.dtype in _QDTYPE.values() and k not in swapped)
    if unscaled:  # an 8-bit tensor loaded as a float weight would run its raw codes
        raise ValueError(f"{source}: 8-bit weight(s) without a weight_scale: {unscaled[:10]}"
                         + (" ..." if len(unscaled) > 10 else ""))
    return names


def quantize_linears_(model: nn.Module, names, scheme: str) -> nn.Module:
    """The nn.Linear modules `names` of `model` as QuantLinear holding their current weights quantized per
    output channel (what a LightX2V quantized encoder file holds)."""
    scheme = parse_quant_scheme(scheme)
    for name in names:
        lin = model.get_submodule(name)
        if isinstance(lin, nn.Linear):
            _replace(model, name, QuantLinear.from_linear(lin, scheme))
    return model


def quantize_dit_(model: nn.Module, scheme: str) -> list[str]:
    """Replaces the DiT's quantizable nn.Linear modules by QuantLinear holding their quantized current
    weights (the bf16 weights are released). Returns the swapped module names."""
    names = []
    for name, lin in _quantizable_linears(model):
        if lin.weight.is_meta:
            raise ValueError(f"quantize_dit_: {name}.weight is on the meta device; load weights first "
                             f"or use swap_to_quant_linear_ for a quantized checkpoint")
        names.append(name)
    quantize_linears_(model, names, scheme)
    return names


def swap_to_quant_linear_(model: nn.Module, scheme: str, device: torch.device | str | None = None,
                          dtype: torch.dtype | None = None) -> list[str]:
    """Replaces the DiT's quantizable nn.Linear modules by empty QuantLinear (on `device`, default the
    linear's own device, e.g. meta) ready for ``model.load_state_dict(quantized_sd, assign=True)``.
    The bias (and the LoRA branches) get `dtype`, the model's run dtype (default: the linear's dtype; a
    model built on meta is fp32). Returns the swapped module names."""
    scheme = parse_quant_scheme(scheme)
    names = []
    run_dtype = dtype
    for name, lin in _quantizable_linears(model):
        dev = device if device is not None else lin.weight.device
        dtype = run_dtype or (lin.bias.dtype if lin.bias is not None else lin.weight.dtype)
        _replace(model, name, QuantLinear(lin.in_features, lin.out_features, lin.bias is not None, scheme,
                                          device=dev, dtype=dtype))
        names.append(name)
    return names
