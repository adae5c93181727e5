"""Self-attention with the q/k RMSNorm + 3D RoPE inside the attention kernel (kernels/attention_rope.py).

Rule (as the other kernels): max |kernel - fp32 reference| <= 2 x max |PyTorch in the run dtype - fp32
reference| + small atol. The reference is independent of the kernel's formulation: RMSNorm, RoPE on
interleaved pairs through complex numbers, then SDPA (kernels.attention.self_attention_ref). On the CPU the
interpreter runs fp16 (its bf16 tl.dot is wrong).
"""
import pytest
import torch

from lightx2v_engine import ops
from lightx2v_engine.kernels.attention import self_attention, self_attention_ref
from lightx2v_engine.kernels.attention_rope import (ROPE_PLACEMENTS, RopeAttnConfig, attention_rope_prologue,
                                                    rope_placement, row_rstd, row_rstd_ref, set_rope_placement)
from lightx2v_engine.ops import rope_tables

DEV = "cuda" if torch.cuda.is_available() else "cpu"
LOW = torch.bfloat16 if DEV == "cuda" else torch.float16
EPS = 1e-6


def _inputs(B, grid, H, dtype=LOW, device=DEV, seed=0, D=128):
    g = torch.Generator().manual_seed(seed)
    L = grid[0] * grid[1] * grid[2]
    C = H * D
    q = (torch.randn(B, L, C, generator=g) * 2).to(device, dtype)
    k = (torch.randn(B, L, C, generator=g) + 0.3).to(device, dtype)
    v = torch.randn(B, L, C, generator=g).to(device, dtype)
    wq = (torch.rand(C, generator=g) + 0.5).to(device)
    wk = (torch.rand(C, generator=g) + 0.5).to(device)
    rope = rope_tables(grid, D, device=device)
    return q, k, v, wq, wk, rope.cos, rope.sin


def _check_rule(got, q, k, v, wq, wk, cos, sin, H, atol=1e-3):
    ref32 = self_attention_ref(q.float(), k.float(), v.float(), wq, wk, cos, sin, H, EPS)
    low = self_attention_ref(q, k, v, wq, wk, cos, sin, H, EPS)
    err = (got.float() - ref32).abs().max().item()
    base = (low.float() - ref32).abs().max().item()
    assert err <= 2 * base + atol, f"err {err:.3e} vs torch {q.dtype} err {base:.3e}"
    return err, base


def test_row_rstd_matches_reference():
    x = torch.randn(2, 37, 384).to(LOW).to(DEV) * 3
    torch.testing.assert_close(row_rstd(x, EPS), row_rstd_ref(x, EPS), rtol=1e-5, atol=1e-6)
    strided = torch.randn(1, 11, 3 * 256).to(LOW).to(DEV)[..., 256:512]  # a column slice of a fused projection
    torch.testing.assert_close(row_rstd(strided, EPS), row_rstd_ref(strided, EPS), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("B,grid,H,cfg", [
    (1, (3, 5, 7), 3, RopeAttnConfig(32, 16, 4, 1)),   # L = 105: full key blocks and a ragged one
    (2, (1, 7, 11), 2, RopeAttnConfig(64, 64, 4, 1)),  # L = 77 < one block of keys: only the ragged block
    (1, (2, 4, 8), 1, RopeAttnConfig(32, 32, 4, 1)),   # L = 64: whole blocks, no ragged block
])
def test_prologue_kernel_rule(B, grid, H, cfg):
    q, k, v, wq, wk, cos, sin = _inputs(B, grid, H)
    out = attention_rope_prologue(q, k, v, wq, wk, cos, sin, H, EPS, config=cfg)
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
    _check_rule(out, q, k, v, wq, wk, cos, sin, H)


def test_prologue_is_not_the_unrotated_attention():
    """The rule test could pass by luck only if RoPE did not matter: it does here."""
    q, k, v, wq, wk, cos, sin = _inputs(1, (3, 5, 7), 2)
    out = attention_rope_prologue(q, k, v, wq, wk, cos, sin, 2, EPS, config=RopeAttnConfig(32, 16, 4, 1))
    no_rope = self_attention_ref(q.float(), k.float(), v.float(), wq, wk, torch.ones_like(cos),
                                 torch.zeros_like(sin), 2, EPS)
    assert (out.float() - no_rope).abs().max().item() > 0.05


def test_strided_projections_and_out_buffer():
    """q, k, v as column slices of one [B, L, 3C] projection (row stride 3C), written into a given buffer."""
    B, grid, H = 1, (3, 3, 5), 2
    L, C = 45, 256
    qkv = (torch.randn(B, L, 3 * C) * 1.5).to(LOW).to(DEV)
    q, k, v = qkv.split(C, dim=-1)
    _, _, _, wq, wk, cos, sin = _inputs(B, grid, H)
    out = torch.empty(B, L, C, dtype=LOW, device=DEV)
    got = attention_rope_prologue(q, k, v, wq, wk, cos, sin, H, EPS, config=RopeAttnConfig(32, 16, 4, 1), out=out)
    assert got.data_ptr() == out.data_ptr()
    _check_rule(out, q, k, v, wq, wk, cos, sin, H)


def test_bad_inputs_named():
    q, k, v, wq, wk, cos, sin = _inputs(1, (1, 2, 3), 1)
    with pytest.raises(ValueError, match="v must be"):
        attention_rope_prologue(q, k, v[:, :3], wq, wk, cos, sin, 1)
    with pytest.raises(ValueError, match="fp16 or bf16"):
        attention_rope_prologue(q.float(), k.float(), v.float(), wq, wk, cos, sin, 1)
    with pytest.raises(ValueError, match="cos must be fp32"):
        attention_rope_prologue(q, k, v, wq, wk, cos[:-1], sin[:-1], 1)


def test_placement_choice(monkeypatch):
    assert rope_placement() == "pass" and ROPE_PLACEMENTS == ("pass", "prologue")
    with pytest.raises(ValueError, match="must be one of"):
        set_rope_placement("epilogue")
    set_rope_placement("prologue")
    try:
        assert rope_placement() == "prologue"
    finally:
        set_rope_placement("default")
    assert rope_placement() == "pass"


def test_self_attention_op_runs_the_prologue_kernel(monkeypatch):
    """Under the "prologue" placement the self_attention op returns the prologue kernel's output (same
    config), and ops.describe says so."""
    import lightx2v_engine.kernels.attention_rope as AR
    q, k, v, wq, wk, cos, sin = _inputs(1, (3, 5, 7), 2)
    calls = []
    real = AR.attention_rope_prologue

    def spy(*a, **kw):
        calls.append(1)
        return real(*a, **kw, config=RopeAttnConfig(32, 16, 4, 1))
    monkeypatch.setattr(AR, "attention_rope_prologue", spy)
    set_rope_placement("prologue")
    try:
        got = self_attention(q, k, v, wq, wk, cos, sin, 2, EPS)
        assert calls == [1]
        torch.testing.assert_close(got, real(q, k, v, wq, wk, cos, sin, 2, EPS, config=RopeAttnConfig(32, 16, 4, 1)),
                                   rtol=0, atol=0)
        ops.set_backend("kernels")
        assert "norm+RoPE in the kernel" in ops.describe(torch.device(DEV))
    finally:
        ops.set_backend("auto")
        set_rope_placement("default")
    self_attention(q, k, v, wq, wk, cos, sin, 2, EPS)  # "pass": the prologue kernel is not called
    assert calls == [1]
    # head dims the prologue kernel does not take (16) run the pass path under "prologue" too (they
    # raised), and a head dim no attention kernel takes (48; 256: no config fits sm90's shared memory) is a
    # ValueError naming it
    for H, D in ((2, 16),):
        q, k, v, wq, wk, cos, sin = _inputs(1, (1, 2, 3), H, D=D)
        want = self_attention(q, k, v, wq, wk, cos, sin, H, EPS)
        set_rope_placement("prologue")
        try:
            torch.testing.assert_close(self_attention(q, k, v, wq, wk, cos, sin, H, EPS), want, rtol=0, atol=0)
        finally:
            set_rope_placement("default")
    assert calls == [1]
    for H, D in ((2, 48), (1, 256)):
        q, k, v, wq, wk, cos, sin = _inputs(1, (1, 2, 3), H, D=D)
        with pytest.raises(ValueError, match=f"head dim of a power of two in \\[16, 128\\], got .* D = {D}"):
            self_attention(q, k, v, wq, wk, cos, sin, H, EPS)


@pytest.mark.gpu
@pytest.mark.last
@pytest.mark.parametrize("H,L", [(12, 4096), (40, 2000)])
def test_prologue_kernel_on_gpu_default_config(H, L):
    """The default config (what the op runs) in bf16 at 1.3B / 14B head counts, under the rule."""
    g = torch.Generator().manual_seed(1)
    C = H * 128
    q, k, v = (torch.randn(1, L, C, generator=g).to("cuda", torch.bfloat16) for _ in range(3))
    wq, wk = (torch.rand(C, generator=g) + 0.5).cuda(), (torch.rand(C, generator=g) + 0.5).cuda()
    rope = rope_tables((L // 40, 5, 8) if L % 40 == 0 else (1, 1, L), 128, device="cuda")
    _check_rule(attention_rope_prologue(q, k, v, wq, wk, rope.cos, rope.sin, H, EPS), q, k, v, wq, wk,
                rope.cos, rope.sin, H)
