"""Helpers shared by the kernel modules: validated choices (setters, environment variables, and the
per-GPU tuned defaults of ``kernels/tuned/``) and whether Triton runs in its CPU interpreter.

A choice (attention backend, launch config, q/k norm+RoPE variant, ...) resolves, at every call, as
  the setter's or the environment variable's value (read once at import)
  > the ``choices`` of the tuned file of the tensor's GPU, ``kernels/tuned/<device name>.json``
  > the module's built-in default.
A tuned file holds the winners of one ``benchmarks/gpu_check.sh`` run on that card (written by
``benchmarks/summarize.py --write-tuned``). ``LX2V_TUNED=0`` ignores tuned files; ``LX2V_TUNED=<folder>``
puts that folder's file first (choices it lacks still come from the package's). LX2V_TUNED is read at
every call; the explicit variables once, at import.
"""
from __future__ import annotations

import functools
import json
import os
import re
from pathlib import Path

import torch

TUNED_DIR = Path(__file__).with_name("tuned")
# what a tuned file may choose (each value is checked against its module's choices where it is read)
TUNED_KEYS = ("LX2V_ATTN", "LX2V_ATTN_CONFIG", "LX2V_ATTN_GLUON_CONFIG", "LX2V_CROSS_ATTN",
              "LX2V_ATTN8_CONFIG", "LX2V_QK_ROPE", "LX2V_SELF_ATTN_ROPE")
_TUNED_FIELDS = ("device", "choices", "measured", "evidence")


class ChoiceError(ValueError):
    """An invalid kernel choice (a mistyped LX2V_* variable or setter value): the user's error, which
    lightx2v_engine.ops raises instead of counting the kernels as unavailable."""


def check_choice(what: str, value, choices):
    """`value` when it is one of `choices`, else a ChoiceError naming `what` and the choices."""
    if value not in choices:
        raise ChoiceError(f"{what} must be one of {list(choices)}, got {value!r}")
    return value


def env_choice(var: str, choices, default: str | None, where: str) -> str | None:
    """The environment variable `var` (`default` when unset or empty), checked against `choices`."""
    value = os.environ.get(var) or default
    return value if value is None else check_choice(f"{where}: {var}", value, choices)


def interpreting() -> bool:
    """TRITON_INTERPRET set to a value Triton 3.6 reads as true (1, true, on, yes; any case): kernels run on the
    CPU through Triton's interpreter. (Read in Python: triton.knobs' C++ getenv breaks torch.compile's
    tracing.)"""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def tuned_file_name(device_name: str) -> str:
    """"NVIDIA H100 80GB HBM3" -> "NVIDIA_H100_80GB_HBM3.json" (runs of other characters become one "_")."""
    return re.sub(r"[^A-Za-z0-9]+", "_", device_name).strip("_") + ".json"


def tuned_dirs() -> tuple[Path, ...]:
    """The folders of tuned files, first match per choice wins: (kernels/tuned/,) by default;
    (<folder>, kernels/tuned/) for LX2V_TUNED=<folder> (a partial file there still takes the rest from the
    package's); () for LX2V_TUNED=0."""
    value = os.environ.get("LX2V_TUNED", "")
    if value == "0":
        return ()
    if value and value != "1":
        return (Path(value), TUNED_DIR)
    return (TUNED_DIR,)


def read_tuned(path: str, device_name: str | None = None) -> dict[str, str]:
    """The checked "choices" of the tuned file `path`: a JSON object with only the fields "device",
    "choices", "measured", "evidence", whose "device" is `device_name` (when given) and whose "choices"
    maps names of TUNED_KEYS to strings. A ValueError names the file and what is wrong."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"tuned defaults {path}: not a readable JSON file ({e}); fix or delete it, or set "
                         f"LX2V_TUNED=0") from e
    if not isinstance(data, dict):
        raise ValueError(f"tuned defaults {path}: expected a JSON object, got {type(data).__name__}")
    unknown = [k for k in data if k not in _TUNED_FIELDS]
    if unknown:
        raise ValueError(f"tuned defaults {path}: unknown field(s) {unknown}; expected {list(_TUNED_FIELDS)}")
    if device_name is not None and data.get("device") != device_name:
        raise ValueError(f"tuned defaults {path}: written for device {data.get('device')!r}, read for "
                         f"{device_name!r} (a file copied under the wrong name?)")
    choices = data.get("choices", {})
    if not isinstance(choices, dict):
        raise ValueError(f"tuned defaults {path}: \"choices\" must be an object, got {type(choices).__name__}")
    for key, value in choices.items():
        if key not in TUNED_KEYS:
            raise ValueError(f"tuned defaults {path}: unknown choice {key!r}; known: {list(TUNED_KEYS)}")
        if not isinstance(value, str):
            raise ValueError(f"tuned defaults {path}: choice {key} must be a string, got {value!r}")
    return dict(choices)


_DEVICE_NAMES: dict[int, str] = {}


def device_name(device: torch.device) -> str:
    """torch.cuda.get_device_name of a CUDA device (cached per index)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _DEVICE_NAMES:
        _DEVICE_NAMES[index] = torch.cuda.get_device_name(index)
    return _DEVICE_NAMES[index]


@functools.lru_cache(maxsize=None)
def _tuned_for(folder: str, name: str) -> tuple[Path | None, dict[str, str]]:
    """(file, its checked choices) of the GPU `name` in `folder`, (None, {}) without a file; cached, so a
    kernel call costs no file-system access (clear_tuned_cache() after writing a file in-process)."""
    path = Path(folder) / tuned_file_name(name)
    return (path, read_tuned(str(path), name)) if path.is_file() else (None, {})


def clear_tuned_cache() -> None:
    _tuned_for.cache_clear()


def _tuned(device: torch.device | None) -> list[tuple[Path, dict[str, str]]]:
    """(file, choices) of every tuned file for `device` (None: the current CUDA device, if any), in priority
    order ([] off CUDA)."""
    if device is None:
        device = current_device()
    if device is None or device.type != "cuda":
        return []
    return _tuned_named(tuned_device_name(device_name(device)))


def _tuned_named(name: str) -> list[tuple[Path, dict[str, str]]]:
    found = (_tuned_for(str(folder), name) for folder in tuned_dirs())
    return [(path, choices) for path, choices in found if path is not None]


# GPUs whose tuned files stand in for others of the same architecture without one of their own (the
# kernels' choices depend on the SM and its shared memory, which these share): pattern -> tuned GPU name
_STAND_INS = ((r"\bH200\b", ("NVIDIA H200", "NVIDIA H100 80GB HBM3")),
              (r"\b(GH200|H100|H800|H20)\b", ("NVIDIA H100 80GB HBM3", "NVIDIA H200")))


def tuned_device_name(name: str) -> str:
    """The GPU name whose tuned files apply to `name`: its own when a file exists; else a MIG slice's whole
    GPU ("NVIDIA H100 80GB HBM3 MIG 1g.10gb"); else a GPU of the same architecture (H100 PCIe / NVL, H800,
    H20, GH200 -> the H100 SXM's file, else the H200's; H200 NVL -> the H200's, else the H100's); else
    `name` (built-in defaults)."""
    if _tuned_named(name):
        return name
    whole = re.sub(r"\s+MIG\s.*$", "", name)
    if whole != name and _tuned_named(whole):
        return whole
    for pattern, stand_ins in _STAND_INS:
        if re.search(pattern, whole):
            return next((g for g in stand_ins if _tuned_named(g)), name)
    return name


def tuned_path(device: torch.device | None) -> Path | None:
    """The first tuned file that applies to `device` (a CUDA device with a file in tuned_dirs()), else None."""
    files = _tuned(device)
    return files[0][0] if files else None


def tuned_choice(var: str, device: torch.device | None, choices, where: str) -> str | None:
    """The value the tuned files of `device` give `var` (the first that has it; checked against `choices`),
    None without one."""
    for path, tuned in _tuned(device):
        if var in tuned:
            return check_choice(f"{where}: {var} of tuned defaults {path}", tuned[var], choices)
    return None


def choose(override: str | None, var: str, device: torch.device | None, choices, default: str | None,
           where: str) -> str | None:
    """override (a setter's or the environment's value) > the tuned file of `device` > default."""
    if override is not None:
        return override
    value = tuned_choice(var, device, choices, where)
    return default if value is None else value


def tuned_status(device: torch.device | None) -> str:
    """Where the defaults on `device` come from, in a few words (for ops.describe)."""
    if device is None or device.type != "cuda":
        return "built-in defaults"
    folders = tuned_dirs()
    if not folders:
        return "built-in defaults (LX2V_TUNED=0)"
    files = [p if p.parent == TUNED_DIR else f"{p.name} in {p.parent}" for p, _ in _tuned(device)]
    missing = [f for f in folders if not f.is_dir()]
    note = f" (LX2V_TUNED folder {missing[0]} does not exist)" if missing else ""
    if not files:
        return f"built-in defaults (no tuned file for {device_name(device)}){note}"
    name = device_name(device)
    stand_in = tuned_device_name(name)
    note = (f" (for {name}: none of its own, {stand_in}'s)" if stand_in != name else "") + note
    return "tuned defaults " + " over ".join(str(f.name) if isinstance(f, Path) else f for f in files) + note


def current_device() -> torch.device | None:
    """The current CUDA device, or None without CUDA (the device of choices asked without a tensor)."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
