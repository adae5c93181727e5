"""Triton kernels for the DiT hot path (installed as ``lightx2v_engine.kernels``)."""
