"""Helpers shared by the kernel modules: validated choices (environment variables and setters) and whether
Triton runs in its CPU interpreter."""
from __future__ import annotations

import os


def check_choice(what: str, value, choices):
    """`value` when it is one of `choices`, else a ValueError naming `what` and the choices."""
    if value not in choices:
        raise ValueError(f"{what} must be one of {list(choices)}, got {value!r}")
    return value


def env_choice(var: str, choices, default: str | None, where: str) -> str | None:
    """The environment variable `var` (`default` when unset or empty), checked against `choices`."""
    value = os.environ.get(var) or default
    return value if value is None else check_choice(f"{where}: {var}", value, choices)


def interpreting() -> bool:
    """TRITON_INTERPRET=1: kernels run on the CPU through Triton's interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
