"""Fused adaLN modulation: LayerNorm(x) * (1 + scale) + shift, and its gated-residual variant.

Both are one read of each input row and one write of each output row (memory-bound); the modulation
vectors shift/scale/gate are [B, 1, C] strided views of the [B, 6, C] modulation tensor and are read
through their strides, never copied.

The ``*_quant`` variants feed an 8-bit linear directly: the modulated row, rounded to the run dtype, is
quantized per token in the same pass (amax = max(max |y|, 1e-12), q = cvt(y * (QMAX / amax)),
scale = amax / QMAX: quant.per_token_quant's arithmetic, bit for bit), so the [L, C] run-dtype tensor
is neither written nor read back (4 -> 1 byte written per element, and no second pass).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from ._util import interpreting
from .attention_8bit import _to_e4m3
from lightx2v_engine.ops import (gate_residual_modulate_quant_ref, gate_residual_modulate_ref, modulate_quant_ref,
                                 modulate_ref)

__all__ = ["modulate", "gate_residual_modulate", "modulate_quant", "gate_residual_modulate_quant", "modulate_ref",
           "gate_residual_modulate_ref", "modulate_quant_ref", "gate_residual_modulate_quant_ref"]

# QUANT constexpr: 0 = write the modulated row in OUT's dtype; 1 = fp8 e4m3 + per-row scale; 2 = int8
_QUANT = {None: 0, "fp8": 1, "int8": 2}
# ROUND constexpr: the dtype the quantized path rounds the row to first (the run dtype of the unfused path)
_ROUND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


@triton.jit
def _modulate_kernel(X, Y, GATE, SHIFT, SCALE, XOUT, OUT, QS,
                     L, C, stride_xb, stride_xl, stride_yb, stride_yl,
                     stride_gb, stride_gc, stride_shb, stride_shc, stride_scb, stride_scc,
                     stride_xob, stride_xol, stride_ob, stride_ol, eps,
                     HAS_RESIDUAL: tl.constexpr, BLOCK_C: tl.constexpr, QUANT: tl.constexpr = 0,
                     ROUND: tl.constexpr = 0, INTERP: tl.constexpr = False):
    """One token row: [x' = x + gate * y;] out = LN(x') * (1 + scale) + shift (fp32 math). QUANT: out
    rounded to ROUND's dtype, then quantized per row into OUT (8-bit) and QS[row] (fp32 scale)."""
    row = tl.program_id(0)
    b = (row // L).to(tl.int64)
    l = (row % L).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    mask = cols < C
    x = tl.load(X + b * stride_xb + l * stride_xl + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        y = tl.load(Y + b * stride_yb + l * stride_yl + cols, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(GATE + b * stride_gb + cols * stride_gc, mask=mask, other=0.0).to(tl.float32)
        x = (x.to(tl.float32) + y * g).to(XOUT.dtype.element_ty)
        # x' is stored in x's dtype and the norm reads the stored (rounded) value, as the reference does
        tl.store(XOUT + b * stride_xob + l * stride_xol + cols, x, mask=mask)
    xf = x.to(tl.float32)
    mean = tl.sum(xf, axis=0) / C
    xc = tl.where(mask, xf - mean, 0.0)
    var = tl.sum(xc * xc, axis=0) / C
    rstd = 1.0 / tl.sqrt(var + eps)
    sh = tl.load(SHIFT + b * stride_shb + cols * stride_shc, mask=mask, other=0.0).to(tl.float32)
    sc = tl.load(SCALE + b * stride_scb + cols * stride_scc, mask=mask, other=0.0).to(tl.float32)
    out = xc * rstd * (1.0 + sc) + sh
    if QUANT == 0:
        tl.store(OUT + b * stride_ob + l * stride_ol + cols, out.to(OUT.dtype.element_ty), mask=mask)
    else:
        if ROUND == 1:
            out = out.to(tl.bfloat16).to(tl.float32)
        elif ROUND == 2:
            out = out.to(tl.float16).to(tl.float32)
        QMAX: tl.constexpr = 448.0 if QUANT == 1 else 127.0
        a = tl.where(mask, tl.abs(out), 0.0)
        amax = tl.maximum(tl.max(a, axis=0), 1e-12)
        # a NaN anywhere in the row makes its scale NaN (the csrc kernel's NaN-propagating max)
        has_nan = tl.max(tl.where(mask & (out != out), 1, 0), axis=0)
        amax = tl.where(has_nan > 0, float("nan"), amax)
        inv = tl.div_rn(tl.full([1], QMAX, tl.float32), amax)
        v = out * inv
        # clamps that keep NaN (tl.maximum/minimum lower to max.f32/min.f32, which drop it): a NaN row's codes
        # are the csrc kernel's, e4m3 NaN (cvt.satfinite keeps NaN) and int8 0 (cvt.rni of NaN is 0)
        if QUANT == 1:
            v = tl.maximum(v, -QMAX, propagate_nan=tl.PropagateNan.ALL)
            q = _to_e4m3(tl.minimum(v, QMAX, propagate_nan=tl.PropagateNan.ALL), INTERP)
        else:
            # round half to even like __float2int_rn, of the fp32-rounded product: on the GPU with cvt.rni
            # (libdevice rint); the 1.5 * 2^23 trick would be contracted with the product into one FMA there
            # (one rounding of the exact product: a different code at near-ties), so only the interpreter,
            # which does not contract (and has no libdevice), uses it
            if INTERP:
                v = (v + 12582912.0) - 12582912.0
            else:
                v = libdevice.rint(v)
            # NaN -> 0 before the clamps (after them the check was folded away on the GPU: max.f32 returned
            # -127 for NaN, and the compiler knew the result could not be NaN)
            v = tl.where(v != v, 0.0, v)
            q = tl.minimum(tl.maximum(v, -QMAX), QMAX).to(tl.int8)
        tl.store(OUT + b * stride_ob + l * stride_ol + cols, q, mask=mask)
        sx = tl.div_rn(amax, tl.full([1], QMAX, tl.float32))
        tl.store(QS + row + tl.arange(0, 1), sx)


def _check_vec(name: str, t: torch.Tensor, x: torch.Tensor) -> None:
    B, _, C = x.shape
    if t.dim() != 3 or t.shape[0] != B or t.shape[1] != 1 or t.shape[2] != C:
        raise ValueError(f"kernels/modulate.py: {name} must be [B, 1, C] = [{B}, 1, {C}], got {list(t.shape)}")
    if t.device != x.device:
        raise ValueError(f"kernels/modulate.py: {name} is on {t.device}, x on {x.device}")


def _check_x(name: str, x: torch.Tensor) -> None:
    if x.dim() != 3:
        raise ValueError(f"kernels/modulate.py: {name} must be [B, L, C], got {list(x.shape)}")
    if x.stride(-1) != 1:
        raise ValueError(f"kernels/modulate.py: {name} must have unit stride on C, got strides {x.stride()}")


def _check_inputs(x, shift, scale, y=None, gate=None) -> None:
    """x [B, L, C] (unit stride on C); shift/scale (and gate) [B, 1, C] views; y (if given) x's shape."""
    _check_x("x", x)
    if y is not None:
        _check_x("y", y)
        if y.shape != x.shape:
            raise ValueError(f"kernels/modulate.py: y must have x's shape {list(x.shape)}, got {list(y.shape)}")
        _check_vec("gate", gate, x)
    _check_vec("shift", shift, x)
    _check_vec("scale", scale, x)


def _launch_cfg(C: int) -> tuple[int, int]:
    block = triton.next_power_of_2(C)
    # ~8-16 elements per thread keeps the row in registers without spilling
    warps = max(1, min(16, block // 512))
    return block, warps


def _launch(x, y, gate, shift, scale, x_out, out, eps, has_residual, qs=None, scheme=None,
            round_dtype=torch.float32):
    B, L, C = x.shape
    block, warps = _launch_cfg(C)
    yy = y if has_residual else x
    gg = gate if has_residual else shift
    xo = x_out if has_residual else out
    _modulate_kernel[(B * L,)](
        x, yy, gg, shift, scale, xo, out, qs if qs is not None else out,
        L, C, x.stride(0), x.stride(1), yy.stride(0), yy.stride(1),
        gg.stride(0), gg.stride(2), shift.stride(0), shift.stride(2), scale.stride(0), scale.stride(2),
        xo.stride(0), xo.stride(1), out.stride(0), out.stride(1), eps,
        HAS_RESIDUAL=has_residual, BLOCK_C=block, QUANT=_QUANT[scheme], ROUND=_ROUND[round_dtype],
        INTERP=interpreting(), num_warps=warps)


@torch.library.custom_op("lightx2v::modulate", mutates_args=())
def _modulate_op(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
                 out_dtype: torch.dtype) -> torch.Tensor:
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    if x.numel():
        _launch(x, None, None, shift, scale, None, out, eps, False)
    return out


@_modulate_op.register_fake
def _(x, shift, scale, eps, out_dtype):
    return x.new_empty(x.shape, dtype=out_dtype)


@torch.library.custom_op("lightx2v::gate_residual_modulate", mutates_args=())
def _gate_residual_modulate_op(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor,
                               scale: torch.Tensor, eps: float,
                               out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    x_new = torch.empty_like(x, memory_format=torch.contiguous_format)
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    if x.numel():
        _launch(x, y, gate, shift, scale, x_new, out, eps, True)
    return x_new, out


@_gate_residual_modulate_op.register_fake
def _(x, y, gate, shift, scale, eps, out_dtype):
    return torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(x.shape, dtype=out_dtype)


_QDTYPES = {"fp8": torch.float8_e4m3fn, "int8": torch.int8}


def _check_quant(scheme: str, round_dtype: torch.dtype) -> None:
    if scheme not in _QDTYPES:
        raise ValueError(f"kernels/modulate.py: scheme must be 'fp8' or 'int8', got {scheme!r}")
    if round_dtype not in _ROUND:
        raise ValueError(f"kernels/modulate.py: round_dtype must be one of {list(_ROUND)}, got {round_dtype}")


@torch.library.custom_op("lightx2v::modulate_quant", mutates_args=())
def _modulate_quant_op(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
                       round_dtype: torch.dtype, scheme: str) -> tuple[torch.Tensor, torch.Tensor]:
    B, L, C = x.shape
    q = torch.empty(x.shape, dtype=_QDTYPES[scheme], device=x.device)
    qs = torch.empty(B * L, 1, dtype=torch.float32, device=x.device)
    if x.numel():
        _launch(x, None, None, shift, scale, None, q, eps, False, qs, scheme, round_dtype)
    return q, qs


@_modulate_quant_op.register_fake
def _(x, shift, scale, eps, round_dtype, scheme):
    return x.new_empty(x.shape, dtype=_QDTYPES[scheme]), x.new_empty(x.shape[0] * x.shape[1], 1, dtype=torch.float32)


@torch.library.custom_op("lightx2v::gate_residual_modulate_quant", mutates_args=())
def _gate_residual_modulate_quant_op(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor,
                                     scale: torch.Tensor, eps: float, round_dtype: torch.dtype,
                                     scheme: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, L, C = x.shape
    x_new = torch.empty_like(x, memory_format=torch.contiguous_format)
    q = torch.empty(x.shape, dtype=_QDTYPES[scheme], device=x.device)
    qs = torch.empty(B * L, 1, dtype=torch.float32, device=x.device)
    if x.numel():
        _launch(x, y, gate, shift, scale, x_new, q, eps, True, qs, scheme, round_dtype)
    return x_new, q, qs


@_gate_residual_modulate_quant_op.register_fake
def _(x, y, gate, shift, scale, eps, round_dtype, scheme):
    return (torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(x.shape, dtype=_QDTYPES[scheme]),
            x.new_empty(x.shape[0] * x.shape[1], 1, dtype=torch.float32))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6,
             out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """y = LayerNorm(x; no affine, eps) * (1 + scale) + shift in fp32 math.

    x [B, L, C] fp32/bf16 with unit stride on C; shift, scale [B, 1, C] (any strides, e.g. chunk(6) views);
    returns a new [B, L, C] tensor in out_dtype (default x.dtype).
    """
    _check_inputs(x, shift, scale)
    return _modulate_op(x, shift, scale, float(eps), out_dtype or x.dtype)


def gate_residual_modulate(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor,
                           scale: torch.Tensor, eps: float = 1e-6,
                           out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x' = x + gate * y (fp32 math, stored in x's dtype); returns (x', modulate(x', shift, scale)).

    x [B, L, C] residual; y [B, L, C] branch output; gate/shift/scale [B, 1, C] views. One pass, new tensors.
    """
    _check_inputs(x, shift, scale, y, gate)
    return _gate_residual_modulate_op(x, y, gate, shift, scale, float(eps), out_dtype or y.dtype)


def modulate_quant(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float, round_dtype: torch.dtype,
                   scheme: str) -> tuple[torch.Tensor, torch.Tensor]:
    """modulate(x, shift, scale, eps, round_dtype) quantized per token in the same pass: returns
    (q [B, L, C] fp8 e4m3 / int8, scale [B*L, 1] fp32), equal to quant.per_token_quant of the modulated
    [B*L, C] rows (ops.modulate_quant_ref)."""
    _check_inputs(x, shift, scale)
    _check_quant(scheme, round_dtype)
    return _modulate_quant_op(x, shift, scale, float(eps), round_dtype, scheme)


def gate_residual_modulate_quant(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor,
                                 scale: torch.Tensor, eps: float, round_dtype: torch.dtype,
                                 scheme: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """gate_residual_modulate with the modulated rows quantized per token: returns (x', q, scale) as
    (gate_residual_modulate's x', then modulate_quant's pair)."""
    _check_inputs(x, shift, scale, y, gate)
    _check_quant(scheme, round_dtype)
    return _gate_residual_modulate_quant_op(x, y, gate, shift, scale, float(eps), round_dtype, scheme)
