"""Tiny DiT fixtures shared by tests: diffusers reference models with random weights and their Wan-layout
state dicts."""
from __future__ import annotations

import torch

from lightx2v_engine.config import ModelConfig
from lightx2v_engine.keymap import diffusers_to_wan

TINY_T2V = ModelConfig("custom", "t2v", dim=64, ffn_dim=96, num_heads=2, num_layers=2, in_dim=16, text_dim=32)
TINY_I2V = ModelConfig("custom", "i2v", dim=64, ffn_dim=96, num_heads=2, num_layers=2, in_dim=36, text_dim=32,
                       image_dim=48)


def diffusers_model(cfg: ModelConfig, seed: int = 0):
    """A diffusers WanTransformer3DModel of `cfg`'s shape with every parameter random (norms included)."""
    from diffusers import WanTransformer3DModel
    kw = dict(patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
              in_channels=cfg.in_dim, out_channels=cfg.out_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
              ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
              eps=cfg.eps)
    if cfg.is_i2v:
        kw.update(image_dim=cfg.image_dim, added_kv_proj_dim=cfg.dim)
    torch.manual_seed(seed)
    model = WanTransformer3DModel(**kw).float().eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif p.dim() >= 2 and "scale_shift_table" not in name:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) * fan_in ** -0.5)
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model


def wan_state_dict(diff_model) -> dict[str, torch.Tensor]:
    return {diffusers_to_wan(k): v.detach().clone().contiguous() for k, v in diff_model.state_dict().items()}


def inputs(cfg: ModelConfig, f: int = 3, h: int = 6, w: int = 10, text_rows: int = 7, text_len: int = 512,
           seed: int = 0, batch: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 16, f, h, w, generator=g)
    t = torch.tensor([937.5] * batch)
    ctx = torch.zeros(batch, text_len, cfg.text_dim)
    ctx[:, :text_rows] = torch.randn(batch, text_rows, cfg.text_dim, generator=g)
    clip = y = None
    if cfg.is_i2v:
        clip = torch.randn(batch, 257, cfg.image_dim, generator=g)
        y = torch.randn(batch, 20, f, h, w, generator=g)
    return x, t, ctx, clip, y


def diffusers_forward(model, x, t, ctx, clip, y):
    hs = torch.cat([x, y], dim=1) if y is not None else x
    with torch.no_grad():
        return model(hidden_states=hs, timestep=t, encoder_hidden_states=ctx, encoder_hidden_states_image=clip,
                     return_dict=False)[0]


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def eager_and_graph_replay(fn):
    """(fn() run eagerly, which also warms up, and the output of fn captured in a CUDA graph and replayed)."""
    want = fn()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn()
    g.replay()
    torch.cuda.synchronize()
    return want, out


def self_attn_inputs(B, grid, H, dtype, device):
    """Random self-attention inputs at head_dim 128: q, k, v [B, L, H*128] (L = prod(grid)), norm weights
    wq, wk [C] in [0.5, 1.5), and the RoPE tables of `grid` (ops.Rope)."""
    from lightx2v_engine.ops import rope_tables
    torch.manual_seed(0)
    L, C = grid[0] * grid[1] * grid[2], H * 128
    q, k, v = (torch.randn(B, L, C, device=device).to(dtype) for _ in range(3))
    wq, wk = torch.rand(C, device=device) + 0.5, torch.rand(C, device=device) + 0.5
    return q, k, v, wq, wk, rope_tables(grid, 128, device=device)


def attn_ref32(q, k, v):
    """fp32 SDPA one head at a time (bounded memory at L = 32760 even on SDPA's math path)."""
    from lightx2v_engine.ops import attention_ref
    return torch.cat([attention_ref(q[:, :, h:h + 1].float(), k[:, :, h:h + 1].float(), v[:, :, h:h + 1].float())
                      for h in range(q.shape[2])], dim=2)


def assert_attn_rule(out, q, k, v, atol=1e-4):
    """The attention kernels' rule: max |out - fp32 ref| <= 2 x max |PyTorch SDPA in q's dtype - fp32 ref|
    + atol."""
    from lightx2v_engine.ops import attention_ref
    ref32 = attn_ref32(q, k, v)
    base = (attention_ref(q, k, v).float() - ref32).abs().max().item()
    err = (out.float() - ref32).abs().max().item()
    assert err <= 2 * base + atol, f"kernel err {err:.3e} > 2 x SDPA {q.dtype} err {base:.3e} + {atol}"


def attn_qkv(B, Lq, Lk, H, dtype, device, seed=0):
    """Random q [B, Lq, H, 128], k, v [B, Lk, H, 128] (k scaled by 1.5 for a peakier softmax)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    mk = lambda L: torch.randn(B, L, H, 128, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    return mk(Lq), mk(Lk) * 1.5, mk(Lk)


_GPU_CASES: dict = {}


def attn_gpu_case(H, Lq, Lk):
    """(q, k, v, fp32 reference, SDPA's bf16 error) of attn_qkv(1, Lq, Lk, H) on CUDA in bf16, computed once
    per shape for all the kernels a test module compares (one shape's tensors kept alive at a time)."""
    if (H, Lq, Lk) not in _GPU_CASES:
        from lightx2v_engine.ops import attention_ref
        _GPU_CASES.clear()
        q, k, v = attn_qkv(1, Lq, Lk, H, torch.bfloat16, "cuda")
        ref32 = attn_ref32(q, k, v)
        _GPU_CASES[(H, Lq, Lk)] = (q, k, v, ref32, (attention_ref(q, k, v).float() - ref32).abs().max().item())
    return _GPU_CASES[(H, Lq, Lk)]
