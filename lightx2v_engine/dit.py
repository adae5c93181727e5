"""Wan2.1 DiT (T2V and I2V), wan21.md §1.

Module and parameter names are Wan's checkpoint keys, so ``state_dict()`` is the original layout.
Precision follows the official code: the residual stream, time embedding/projection, modulation adds,
gated residual adds, norms and the head are fp32; linears, attention, patch and text embeddings run in
the run dtype (bf16 by default). Hot ops go through ``lightx2v_engine.ops``.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from lightx2v_engine import ops
from lightx2v_engine.config import ModelConfig
from lightx2v_engine.quant import QuantizedInput, QuantLinear, quant_linears_same_input, takes_quantized_input

# Parameters that stay fp32 whatever the run dtype (the official fp32 regions, plus every norm).
FP32_PREFIXES = ("time_embedding.", "time_projection.", "head.")
FP32_SUBSTRINGS = ("modulation", "norm_q", "norm_k", "norm3", "img_emb.proj.0.", "img_emb.proj.4.")


ROPE_SHAPES = 4  # patch grids whose RoPE tables WanDiT keeps cached


def param_dtype(key: str, run_dtype: torch.dtype) -> torch.dtype:
    """The storage dtype of parameter `key` when the model runs in `run_dtype`."""
    if key.startswith(FP32_PREFIXES) or any(s in key for s in FP32_SUBSTRINGS):
        return torch.float32
    return run_dtype


def sinusoidal_embedding(t: torch.Tensor, dim: int = 256) -> torch.Tensor:
    """[cos, sin] of t * 10000^(-i/(dim/2)), i < dim/2, computed in float64. t [B] -> [B, dim] fp32."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    ang = t.to(torch.float64)[:, None] * freqs[None, :]
    return torch.cat([torch.cos(ang), torch.sin(ang)], dim=1).float()


def modulate_into(mods: list[nn.Module], x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
                  dtype: torch.dtype, y: torch.Tensor | None = None, gate: torch.Tensor | None = None):
    """The modulated input of the linears `mods`: ops.modulate(x, ...) (y None) or ops.gate_residual_modulate
    (x, y, gate, ...), in `dtype`; when `mods` are 8-bit linears that take it (quant.takes_quantized_input),
    quantized per token in the same kernel (a QuantizedInput: the run-dtype tensor is never written).
    Returns h (y None) or (x', h)."""
    scheme = takes_quantized_input(mods)
    if y is None:
        if scheme is None:
            return ops.modulate(x, shift, scale, eps, out_dtype=dtype)
        return QuantizedInput(*ops.modulate_quant(x, shift, scale, eps, dtype, scheme), dtype)
    if scheme is None:
        return ops.gate_residual_modulate(x, y, gate, shift, scale, eps, out_dtype=dtype)
    x, q, qs = ops.gate_residual_modulate_quant(x, y, gate, shift, scale, eps, dtype, scheme)
    return x, QuantizedInput(q, qs, dtype)


class RMSNorm(nn.Module):
    """Wan's RMSNorm over the full width: weight only, eps 1e-6."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads, self.eps = num_heads, eps
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = RMSNorm(dim, eps), RMSNorm(dim, eps)
        self.attn_8bit = False  # INT8 q k^T / FP8 P.V kernel (set by WanDiT.set_attention_8bit)

    def forward(self, h: torch.Tensor | QuantizedInput, rope: ops.Rope, seq_parallel=None) -> torch.Tensor:
        """h [B, L, C] modulated input (run dtype, or quantized for 8-bit q/k/v) -> [B, L, C] (a token shard
        under seq_parallel)."""
        if isinstance(self.q, QuantLinear) and isinstance(self.k, QuantLinear) and isinstance(self.v, QuantLinear):
            q, k, v = quant_linears_same_input(h, [self.q, self.k, self.v])  # h quantized once
        else:
            q, k, v = self.q(h), self.k(h), self.v(h)
        a = ops.self_attention(q, k, v, self.norm_q.weight, self.norm_k.weight, rope, self.num_heads, self.eps,
                               attn_8bit=self.attn_8bit, seq_parallel=seq_parallel)
        return self.o(a)


class CrossAttention(nn.Module):
    """Ungated cross-attention to the text context; I2V adds an image-token attention sharing q."""

    def __init__(self, dim: int, num_heads: int, eps: float, i2v: bool):
        super().__init__()
        self.num_heads, self.eps = num_heads, eps
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = RMSNorm(dim, eps), RMSNorm(dim, eps)
        if i2v:
            self.k_img, self.v_img = nn.Linear(dim, dim), nn.Linear(dim, dim)
            self.norm_k_img = RMSNorm(dim, eps)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        return t.unflatten(-1, (self.num_heads, -1))

    def forward(self, h: torch.Tensor | QuantizedInput, text: torch.Tensor, img: torch.Tensor | None) -> torch.Tensor:
        """h [B, L, C] (or quantized for an 8-bit q); text [B, Lt, C]; img [B, Li, C] or None -> [B, L, C]."""
        q = self._heads(self.norm_q(self.q(h)))
        out = ops.attention(q, self._heads(self.norm_k(self.k(text))), self._heads(self.v(text)))
        if img is not None:
            out = out + ops.attention(q, self._heads(self.norm_k_img(self.k_img(img))), self._heads(self.v_img(img)))
        return self.o(out.flatten(-2))


class WanBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.dim
        self.eps = cfg.eps
        self.modulation = nn.Parameter(torch.randn(1, 6, d).mul_(d ** -0.5))  # (on meta, "/" imports torch._dynamo)
        self.self_attn = SelfAttention(d, cfg.num_heads, cfg.eps)
        self.norm3 = nn.LayerNorm(d, eps=cfg.eps, elementwise_affine=True)
        self.cross_attn = CrossAttention(d, cfg.num_heads, cfg.eps, cfg.is_i2v)
        self.ffn = nn.Sequential(nn.Linear(d, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, d))

    def forward(self, xh: list, mod: torch.Tensor, text: torch.Tensor, img: torch.Tensor | None, rope: ops.Rope,
                ones: torch.Tensor, seq_parallel=None):
        """One block, with the last gated residual add left to the caller for fusion.

        xh = [x, h], which the block empties (it owns them from here, so that each is freed once used: an
        argument would stay referenced by the caller and nn.Module.__call__ for the whole block, ~3 [B, L, C]
        units of activation memory): x [B, L, C] fp32 residual; h = modulate(x, shift1, scale1) [B, L, C] run
        dtype (computed by the caller with modulate_into, fused with the previous block's last residual add;
        quantized for 8-bit q/k/v); mod [B, 6, C] fp32 = modulation + e0.
        Returns (x, y, gate2): the caller applies x + gate2 * y. seq_parallel (parallel.SeqParallel): x and
        h hold this rank's token shard and `rope` its rows; only the self-attention talks to the group.
        """
        x, h = xh
        xh.clear()
        _, _, gate1, shift2, scale2, gate2 = mod.chunk(6, dim=1)
        # norm3 (affine LayerNorm) is modulate with scale = weight - 1 and shift = bias, so the self-attention
        # residual add and norm3 are one fused pass: x += gate1 * sa; n3 = LN(x) * weight + bias
        b = x.shape[0]
        n3_scale = (self.norm3.weight.float() - 1.0).view(1, 1, -1).expand(b, 1, -1)
        n3_shift = self.norm3.bias.float().view(1, 1, -1).expand(b, 1, -1)
        fc1, act, fc2 = self.ffn
        dt = h.dtype
        sa = self.self_attn(h, rope, seq_parallel)
        del h
        x, n3 = modulate_into([self.cross_attn.q], x, n3_shift, n3_scale, self.eps, dt, sa, gate1)
        del sa
        ca = self.cross_attn(n3, text, img)
        del n3
        x, h2 = modulate_into([fc1], x, shift2, scale2, self.eps, dt, ca, ones)
        del ca
        if type(fc1) is nn.Linear:  # bias + GELU in the GEMM's epilogue on CUDA
            return x, fc2(ops.linear_gelu_tanh(h2, fc1.weight, fc1.bias)), gate2
        if isinstance(fc2, QuantLinear):  # 8-bit: GELU inside ffn.2's activation quantization
            return x, fc2(fc1(h2), input_gelu=True), gate2
        return x, fc2(act(fc1(h2))), gate2


class MLPProj(nn.Module):
    """img_emb: LN(1280, eps 1e-5), Linear, GELU(erf), Linear(1280 -> C), LN(C, eps 1e-5)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.proj = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, in_dim), nn.GELU(),
                                  nn.Linear(in_dim, out_dim), nn.LayerNorm(out_dim))

    def forward(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        ln0, fc1, act, fc2, ln4 = self.proj
        h = F.layer_norm(x.float(), ln0.normalized_shape, ln0.weight.float(), ln0.bias.float(), ln0.eps)
        h = fc2(act(fc1(h.to(dtype))))
        h = F.layer_norm(h.float(), ln4.normalized_shape, ln4.weight.float(), ln4.bias.float(), ln4.eps)
        return h.to(dtype)


class Head(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.eps = cfg.eps
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim).mul_(cfg.dim ** -0.5))
        self.head = nn.Linear(cfg.dim, cfg.out_dim * math.prod(cfg.patch_size))


class WanDiT(nn.Module):
    """The Wan2.1 diffusion transformer; forward(x, t, context[, clip_fea, y]) -> velocity."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_dim, d, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, d), nn.GELU(approximate="tanh"), nn.Linear(d, d))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        self.blocks = nn.ModuleList(WanBlock(cfg) for _ in range(cfg.num_layers))
        self.head = Head(cfg)
        if cfg.is_i2v:
            self.img_emb = MLPProj(cfg.image_dim, d)
        # rows a shorter context is zero-padded to: Wan's text_len (the pipeline sets a config's text_len, as
        # LightX2V's DiT sees the text_len rows its encoder padded to)
        self.context_rows = cfg.text_len
        self._rope_cache: dict[tuple, ops.Rope] = {}
        self._ones_cache: dict[tuple, torch.Tensor] = {}
        # offload.BlockOffload when the blocks stream from host memory (cpu_offload), else None
        self.block_offload = None
        # parallel.SeqParallel when the tokens are split over a torchrun group (parallel.seq_p_size > 1)
        self.seq_parallel = None

    @property
    def run_dtype(self) -> torch.dtype:
        return self.text_embedding[0].weight.dtype

    def set_attention_8bit(self, enabled: bool) -> None:
        """Self-attention through the INT8 q k^T / FP8 P.V kernel (LightX2V's "sage_attn2"); cross-attention
        stays exact (512/769 keys: a few percent of the step). Exact wherever the kernel cannot run."""
        for blk in self.blocks:
            blk.self_attn.attn_8bit = bool(enabled)

    def grid(self, x_shape) -> tuple[int, int, int]:
        """The patch grid (F, H/2, W/2) of latents [B, C, F, H, W]."""
        pt, ph, pw = self.cfg.patch_size
        return x_shape[-3] // pt, x_shape[-2] // ph, x_shape[-1] // pw

    def rope(self, grid: tuple[int, int, int], device: torch.device) -> ops.Rope:
        """RoPE tables for a patch grid, computed once per (grid, device) and kept for the ROPE_SHAPES most
        recently used (a server taking many sizes would otherwise keep every size's tables: 17 MB at 480p,
        ~0.7 GB at 2048x2048x321). A captured CUDA graph holds its own shape's tables (Pipeline)."""
        key = (grid, str(device))
        r = self._rope_cache.pop(key, None)
        if r is None:
            r = ops.rope_tables(grid, self.cfg.head_dim, device=device)
        self._rope_cache[key] = r  # (last: the dict is in least-recently-used order)
        while len(self._rope_cache) > ROPE_SHAPES:
            del self._rope_cache[next(iter(self._rope_cache))]
        return r

    def _ones(self, batch: int, device: torch.device) -> torch.Tensor:
        key = (batch, str(device))
        if key not in self._ones_cache:
            self._ones_cache[key] = torch.ones(batch, 1, self.cfg.dim, device=device)
        return self._ones_cache[key]

    def drop_device_caches(self) -> None:
        """Forgets the cached RoPE tables and ones tensors (pipeline._to_device calls it when an offloaded
        DiT goes back to the CPU: they would stay on the GPU). The next forward makes them again."""
        self._rope_cache.clear()
        self._ones_cache.clear()
        if self.seq_parallel is not None:  # (its shard tables, on the process-wide parallel state)
            self.seq_parallel.drop_caches()

    def check_inputs(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                     clip_fea: torch.Tensor | None, y: torch.Tensor | None) -> None:
        """Shape checks with errors that name the tensor, its shape and the expected one (host-side only)."""
        cfg = self.cfg
        if x.dim() != 5:
            raise ValueError(f"x must be [B, C, F, H, W], got shape {tuple(x.shape)}")
        b, c, f, h, w = x.shape
        if cfg.is_i2v and (clip_fea is None or y is None):
            raise ValueError(f"{cfg.name} is an I2V model: clip_fea and y are required")
        if not cfg.is_i2v and (clip_fea is not None or y is not None):
            raise ValueError(f"{cfg.name} is a T2V model: clip_fea/y must not be given")
        if y is not None and (y.dim() != 5 or y.shape[0] != b or y.shape[2:] != x.shape[2:]):
            raise ValueError(f"y must be [{b}, {cfg.in_dim - c}, {f}, {h}, {w}], got {tuple(y.shape)}")
        c_total = c + (y.shape[1] if y is not None else 0)
        if c_total != cfg.in_dim:
            raise ValueError(f"input channels (x {c} + y {c_total - c}) = {c_total}, model {cfg.name} expects {cfg.in_dim}")
        pt, ph, pw = cfg.patch_size
        if f % pt or h % ph or w % pw:
            raise ValueError(f"latent size F={f} H={h} W={w} is not divisible by the patch size {cfg.patch_size}")
        if t.shape != (b,):
            raise ValueError(f"t must have shape [{b}], got {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"t is on {t.device}, x on {x.device}: they must be on one device")
        if context.dim() != 3 or context.shape[0] != b or context.shape[2] != cfg.text_dim:
            raise ValueError(f"context must be [{b}, Lt, {cfg.text_dim}], got {tuple(context.shape)}")
        text_rows = max(cfg.text_len, 512)  # (Wan pads every context to text_len rows, 512 in its configs)
        if not 1 <= context.shape[1] <= text_rows:
            raise ValueError(f"context has {context.shape[1]} rows: 1 to {text_rows} (text_len) expected, "
                             f"zero rows after the prompt's")
        if cfg.is_i2v and (clip_fea.dim() != 3 or clip_fea.shape[0] != b or clip_fea.shape[1] != cfg.image_tokens
                           or clip_fea.shape[2] != cfg.image_dim):
            raise ValueError(f"clip_fea must be [{b}, {cfg.image_tokens}, {cfg.image_dim}], got {tuple(clip_fea.shape)}")

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                clip_fea: torch.Tensor | None = None, y: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, 16, F, H, W] latents; t [B] timesteps (float); context [B, Lt, text_dim] T5 features
        (zero rows beyond the prompt; fewer than context_rows (text_len, 512) rows are zero-padded to it, as in
        Wan); I2V: clip_fea [B, 257, 1280], y [B, 20, F, H, W].
        Returns the flow velocity [B, 16, F, H, W] fp32."""
        self.check_inputs(x, t, context, clip_fea, y)
        cfg, dt = self.cfg, self.run_dtype
        if y is not None:
            x = torch.cat([x, y.to(x.dtype)], dim=1)
        b = x.shape[0]
        grid = self.grid(x.shape)
        tokens = self.patch_embedding(x.to(dt)).flatten(2).transpose(1, 2)  # [B, L, C]
        # the fp32 residual stream [B, L, C], row-major, in one copy (.float() keeps the transposed strides
        # and needs a second; .to(memory_format=...) returns the view itself for an fp32 run)
        x = torch.empty(tokens.shape, dtype=torch.float32, device=tokens.device).copy_(tokens)
        del tokens

        e = self.time_embedding(sinusoidal_embedding(t, cfg.freq_dim))          # [B, C] fp32
        e0 = self.time_projection(e).unflatten(1, (6, cfg.dim))                 # [B, 6, C] fp32
        if context.shape[1] < self.context_rows:  # Wan zero-pads a trimmed context to text_len rows: the zero
            context = F.pad(context, (0, 0, 0, self.context_rows - context.shape[1]))  # rows still attend (biases)
        text = self.text_embedding(context.to(dt))                              # [B, text_len, C]
        img = self.img_emb(clip_fea, dt) if cfg.is_i2v else None
        rope = self.rope(grid, x.device)
        ones = self._ones(b, x.device)
        sp = self.seq_parallel
        if sp is not None:  # this rank's rows of the token sequence from here to the head
            x, rope = sp.shard(x), sp.shard_rope(rope)

        y_prev = gate_prev = None
        for block in (self.blocks if self.block_offload is None else self.block_offload.blocks()):
            mod = block.modulation.float() + e0
            shift1, scale1 = mod[:, 0:1], mod[:, 1:2]
            qkv = [block.self_attn.q, block.self_attn.k, block.self_attn.v]
            if y_prev is None:
                xh = [x, modulate_into(qkv, x, shift1, scale1, cfg.eps, dt)]
            else:
                xh = list(modulate_into(qkv, x, shift1, scale1, cfg.eps, dt, y_prev, gate_prev))
            x = y_prev = gate_prev = None  # (the block owns x and h now: freed inside it once used)
            x, y_prev, gate_prev = block(xh, mod, text, img, rope, ones, sp)

        hm = self.head.modulation.float() + e[:, None, :]
        shift, scale = hm[:, 0:1], hm[:, 1:2]
        x, hmod = ops.gate_residual_modulate(x, y_prev, gate_prev, shift, scale, cfg.eps, out_dtype=torch.float32)
        out = F.linear(hmod, self.head.head.weight.float(), self.head.head.bias.float())  # [B, L, 64] fp32
        if sp is not None:
            out = sp.gather(out, math.prod(grid))
        return self.unpatchify(out, grid)

    def unpatchify(self, out: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """[B, L, pt*ph*pw*c] with (pt, ph, pw, c) order, c fastest -> [B, c, F*pt, H*ph, W*pw]."""
        b = out.shape[0]
        f, h, w = grid
        pt, ph, pw = self.cfg.patch_size
        c = self.cfg.out_dim
        out = out.view(b, f, h, w, pt, ph, pw, c).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return out.reshape(b, c, f * pt, h * ph, w * pw)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
