"""The one place that imports the compiled extension ``lightx2v_engine._C`` (sources in ``csrc/``).

The extension registers its ops in the ``lightx2v_C`` namespace (``torch.ops.lightx2v_C.*``, CUDA only);
this module adds their fake (meta) implementations so that ``torch.compile`` can trace them, and records
why the extension is missing when it is (``csrc_status()``, with setup.py's record of the build,
``lightx2v_engine/_build_info.py``). A missing extension is normal for a pure-Python install (CPU torch,
``LX2V_SKIP_CUDA_BUILD=1``); on a machine with a CUDA GPU it is reported with a warning (unless the build
was skipped by ``LX2V_SKIP_CUDA_BUILD=1``), and so is an extension that exists but fails to load (ABI
mismatch, missing symbol): never silently ignored.

Ops:
  per_token_quant_fp8(x [M, K] bf16/fp16) -> (q [M, K] float8_e4m3fn, scale [M, 1] fp32)
  per_token_quant_int8(x [M, K] bf16/fp16) -> (q [M, K] int8, scale [M, 1] fp32)
  per_token_quant_{fp8,int8}_gelu(x): the same on F.gelu(x, approximate="tanh") (one pass)
with x ~= q * scale (formula in lightx2v_engine.quant.per_token_quant_ref).
"""
from __future__ import annotations

import functools
import importlib
import os
import sys
import warnings

import torch

_EXTENSION = "lightx2v_engine._C"
_OPS = ("per_token_quant_fp8", "per_token_quant_int8", "per_token_quant_fp8_gelu", "per_token_quant_int8_gelu")
# the build record's reason for an explicit LX2V_SKIP_CUDA_BUILD=1 (setup.py's SKIP_REASON): no warning
_SKIP_REASON = "LX2V_SKIP_CUDA_BUILD=1"
_STATUS: str | None = None
_AVAILABLE = False


def _fake(qdtype: torch.dtype):
    """Meta implementation of the quantization ops: (q [M, K] qdtype, scale [M, 1] fp32)."""
    def fake(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x.new_empty(x.shape, dtype=qdtype), x.new_empty((x.shape[0], 1), dtype=torch.float32)
    return fake


def _build_record() -> dict | None:
    """setup.py's record of the extension build, {"status": "built" | "skipped" | "failed", "reason": ...}
    (lightx2v_engine/_build_info.py, written at build time); None without one (a source checkout that was
    not installed, or an install by an older setup.py)."""
    try:
        record = importlib.import_module("lightx2v_engine._build_info").CSRC_BUILD
    except (ImportError, AttributeError, SyntaxError):
        return None
    return record if isinstance(record, dict) else None


def _not_built_status(record: dict | None) -> str:
    """csrc_status() for a missing extension, from the build record."""
    build = "build it with a CUDA torch and nvcc: pip install --no-build-isolation -e ."
    status, reason = (record or {}).get("status"), (record or {}).get("reason", "")
    if status == "skipped":
        return f"unavailable: {_EXTENSION} was not built: {reason} (pure-Python install; {build})"
    if status == "failed":
        return (f"unavailable: {_EXTENSION} failed to build: {reason} (pure-Python install; rebuild with "
                f"pip install -v --no-build-isolation -e . to see the compiler output)")
    if status == "built":
        return (f"unavailable: {_EXTENSION} was built ({reason}) but is missing from the package (removed, "
                f"or the package was copied without it; {build})")
    return (f"unavailable: {_EXTENSION} is not built (and no build record, lightx2v_engine/_build_info.py: a source "
            f"checkout that was not installed, or an install by an older setup.py; {build})")


def _load() -> None:
    global _STATUS, _AVAILABLE
    try:
        importlib.import_module(_EXTENSION)
    except ModuleNotFoundError as e:
        if e.name != _EXTENSION:  # the extension exists but imports something that is missing
            _STATUS = f"unavailable: {_EXTENSION} failed to import: {type(e).__name__}: {e}"
            warnings.warn(f"lightx2v_engine: {_STATUS}", RuntimeWarning, stacklevel=2)
            return
        record = _build_record()
        _STATUS = _not_built_status(record)
        explicit = record is not None and record.get("status") == "skipped" and record.get("reason") == _SKIP_REASON
        # (a pure-Python install on a CUDA machine is a failed or unintended build: say so, once per process)
        if not explicit and torch.cuda.is_available():
            warnings.warn(f"lightx2v_engine: {_STATUS}; the 8-bit quantization runs its PyTorch path (set "
                          f"LX2V_DISABLE_CSRC=1 to silence this)", RuntimeWarning, stacklevel=2)
        return
    except ImportError as e:  # built but not loadable (undefined symbol, torch/CUDA ABI mismatch)
        _STATUS = f"unavailable: {_EXTENSION} is built but failed to load: {e}"
        warnings.warn(f"lightx2v_engine: {_STATUS}", RuntimeWarning, stacklevel=2)
        return
    missing = [n for n in _OPS if not hasattr(torch.ops.lightx2v_C, n)]
    if not hasattr(sys.modules[_EXTENSION], "kernel_image_error"):
        missing.append("kernel_image_error")
    if missing:
        _STATUS = f"unavailable: {_EXTENSION} loaded but does not register {missing} (stale build?)"
        warnings.warn(f"lightx2v_engine: {_STATUS}", RuntimeWarning, stacklevel=2)
        return

    for name in _OPS:
        torch.library.register_fake(f"lightx2v_C::{name}", _fake(torch.float8_e4m3fn if "fp8" in name else torch.int8))

    _STATUS = "available"
    _AVAILABLE = True


if os.environ.get("LX2V_DISABLE_CSRC", "0") == "1":
    _STATUS = "unavailable: disabled by LX2V_DISABLE_CSRC=1"
else:
    _load()


def retry_load() -> bool:
    """Tries the extension again where it was missing when this module was imported (built since: the GPU
    check builds it while the kernel benchmarks run); True once it is available. A failed retry keeps the
    status it had (a build still writing the file must not turn "not built" into "failed to load")."""
    global _STATUS
    if _AVAILABLE or os.environ.get("LX2V_DISABLE_CSRC", "0") == "1":
        return _AVAILABLE
    before = _STATUS
    importlib.invalidate_caches()  # (the import system caches folder listings: a new .so is not seen)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _load()
    if not _AVAILABLE:
        _STATUS = before
    return _AVAILABLE


def csrc_available(device: torch.device | None = None) -> bool:
    """True when torch.ops.lightx2v_C ops are registered; given a device, when they can run there: a CUDA
    device of sm_80 or newer (the kernels use sm_80 instructions) for which the build holds a kernel image
    (setup.py builds for the GPUs it sees, else sm_80..sm_90 + PTX; an extension built elsewhere may lack
    the card: it is then skipped with a warning, and the PyTorch path runs)."""
    if not _AVAILABLE or device is None:
        return _AVAILABLE
    device = torch.device(device)
    if device.type != "cuda":
        return False
    return _capability_ok(torch.cuda.current_device() if device.index is None else device.index)


@functools.lru_cache(maxsize=None)
def _capability_ok(index: int) -> bool:
    if torch.cuda.get_device_capability(index) < (8, 0):
        return False
    error = sys.modules[_EXTENSION].kernel_image_error(index)
    if error:
        cap = "%d.%d" % torch.cuda.get_device_capability(index)
        warnings.warn(f"lightx2v_engine: {_EXTENSION} has no kernel image for cuda:{index} (compute capability "
                      f"{cap}; {error}): its quantization kernels are skipped there and the PyTorch path runs; "
                      f"rebuild with TORCH_CUDA_ARCH_LIST={cap} (pip install --no-build-isolation -e .)",
                      RuntimeWarning, stacklevel=2)
    return not error


def csrc_status() -> str:
    """"available", or "unavailable: <reason>"."""
    return _STATUS or "unavailable: not loaded"


def _check_quant_input(x: torch.Tensor, op: str) -> None:
    """The binding's checks, in Python: on the H100 machine (torch 2.11) a TORCH_CHECK failure thrown from the
    extension crashed the process (segfault) instead of raising, so bad input must never reach it."""
    if not _AVAILABLE:
        raise RuntimeError(f"{op}: lightx2v_engine._C is {csrc_status()}")
    if not x.is_cuda:
        raise ValueError(f"{op}: x must be a CUDA tensor, got device {x.device}")
    if not csrc_available(x.device):  # (no kernel image for this GPU: the launch's TORCH_CHECK would crash)
        raise RuntimeError(f"{op}: lightx2v_engine._C has no kernel for {x.device} (compute capability "
                           f"{torch.cuda.get_device_capability(x.device)}); rebuild it for this GPU")
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"{op}: x must be bfloat16 or float16, got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"{op}: x must be 2-D [M, K], got shape {tuple(x.shape)}")
    if x.shape[1] > 1 and x.stride(1) != 1:
        raise ValueError(f"{op}: x must have unit stride along K, got strides {x.stride()}")
    if x.shape[0] > 2**31 - 1:
        raise ValueError(f"{op}: at most 2^31-1 rows, got {x.shape[0]}")


def per_token_quant_fp8(x: torch.Tensor, gelu: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """CUDA kernel: x [M, K] bf16/fp16 (unit stride along K) -> (q [M, K] fp8 e4m3, scale [M, 1] fp32).
    gelu: quantize F.gelu(x, approximate="tanh") instead (computed in the same pass)."""
    name = "per_token_quant_fp8_gelu" if gelu else "per_token_quant_fp8"
    _check_quant_input(x, name)
    return getattr(torch.ops.lightx2v_C, name)(x)


def per_token_quant_int8(x: torch.Tensor, gelu: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """CUDA kernel: x [M, K] bf16/fp16 (unit stride along K) -> (q [M, K] int8, scale [M, 1] fp32).
    gelu: quantize F.gelu(x, approximate="tanh") instead (computed in the same pass)."""
    name = "per_token_quant_int8_gelu" if gelu else "per_token_quant_int8"
    _check_quant_input(x, name)
    return getattr(torch.ops.lightx2v_C, name)(x)
