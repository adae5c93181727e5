"""Triton kernels for the DiT hot path (installed as ``lightx2v_engine.kernels``).

Every public function is a ``torch.library`` custom op (namespace ``lightx2v``) with a fake implementation,
so it traces under ``torch.compile(fullgraph=True)`` and launches on the current stream (CUDA-graph safe).
Importing this package raises ImportError when triton is not installed.
"""
# This folder is also importable as a top-level `kernels` when the repository root is on sys.path (a source
# checkout). Libraries probing for the Hugging Face `kernels` package (transformers' is_kernels_available()
# imports it) would then run it a second time under that name and register every torch.library op again,
# which leaves the first registration's op handles dangling: later calls crash the process. Under any other
# name the module is inert: no submodule can be found through it, and without __file__ the probes read it as
# a namespace-package shadow, not an installed package.
_OURS = __name__ == "lightx2v_engine.kernels"
if not _OURS:
    __path__ = []
    globals().pop("__file__", None)
else:
    try:
        import triton  # noqa: F401
    except ImportError as e:  # one clear reason; lightx2v_engine.ops records it and falls back to references
        raise ImportError(f"lightx2v_engine.kernels needs triton ({e})") from e


def _fix_interpreter_index() -> None:
    """triton 3.6's CPU interpreter turns scalar tensors into Python ints with int(1-element array), which
    numpy >= 2.4 refuses ("only 0-dimensional arrays ..."): every loop with a runtime bound fails. Patch
    the interpreter's tensor.__index__ to read the single element instead (TRITON_INTERPRET=1 only)."""
    import numpy as np
    try:
        int(np.zeros(1, dtype=np.int32))
        return
    except TypeError:
        pass
    from triton.runtime import interpreter
    if getattr(interpreter._patch_lang_tensor, "_lx2v_fixed", False):
        return
    original = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._lx2v_fixed = True
    interpreter._patch_lang_tensor = patched


if _OURS:
    from ._util import interpreting  # noqa: E402
    if interpreting():
        _fix_interpreter_index()

if _OURS:
    from .attention_8bit import attention_8bit, fp8_supported  # noqa: E402
    from .attention import (ATTN_IMPLS, attention, attention_impl, attention_supports,  # noqa: E402
                            self_attention, self_attention_heads, set_attention_impl)
    from .modulate import gate_residual_modulate, gate_residual_modulate_quant, modulate, modulate_quant  # noqa: E402
    from .qk_norm_rope import qk_norm_rope  # noqa: E402
    from . import attention_rope  # noqa: E402,F401  (its LX2V_SELF_ATTN_ROPE is checked at import, as every choice)
    from .rms_norm import rms_norm  # noqa: E402

__all__ = ["modulate", "gate_residual_modulate", "modulate_quant", "gate_residual_modulate_quant", "qk_norm_rope",
           "rms_norm", "attention", "self_attention",
           "self_attention_heads", "attention_impl", "set_attention_impl", "ATTN_IMPLS", "attention_8bit", "fp8_supported",
           "attention_supports"]
