"""lightx2v-engine: fast 4-step Wan2.1 video generation."""

__version__ = "0.1.0"

# ``kernels/`` sits at the repository root and is installed as ``lightx2v_engine.kernels``; when the package
# is used from a source checkout without installation, find it there too.
import os as _os

_root_kernels = _os.path.join(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))), "kernels")
if _os.path.isfile(_os.path.join(_root_kernels, "__init__.py")) and not _os.path.isdir(
        _os.path.join(__path__[0], "kernels")):
    __path__.append(_os.path.dirname(_root_kernels))


def __getattr__(name):
    # ``from lightx2v_engine import Pipeline`` without making ``import lightx2v_engine`` import torch
    # (PEP 562: resolved on first access only)
    if name == "Pipeline":
        from lightx2v_engine.pipeline import Pipeline
        return Pipeline
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Pipeline", "__version__"]
