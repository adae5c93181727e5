"""CLIP ViT-H/14 image encoder for Wan2.1 I2V (`models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth`).

Only the file's `visual.*` tensors are used. Our `CLIPVisionTower.state_dict()` keys are those keys
with the `visual.` prefix removed: `patch_embedding.weight` (conv, no bias), `cls_embedding` [1,1,C],
`pos_embedding` [1,1+P,C], `pre_norm.{weight,bias}`, `transformer.N.{norm1, attn.to_qkv, attn.proj,
norm2, mlp.0, mlp.2}.{weight,bias}`.

    x = pre_norm(cat(cls, patchify(img)) + pos)
    x = x + proj(softmax(q kᵀ / sqrt(D)) v)   (q, k, v from the fused to_qkv of norm1(x))
    x = x + mlp.2(gelu_erf(mlp.0(norm2(x))))
Wan runs only the first num_layers - 1 blocks (31 of 32) and no post-norm: output [B, 257, 1280].
LayerNorms are computed in fp32 (eps 1e-5); the residual stream is kept in fp32 (Wan keeps it in fp16: this
is a little more accurate, about 1e-3 relative apart) and every matmul runs in the weights' dtype (fp16 on
CUDA).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from lightx2v_engine.checkpoint import assign_checked, read_state_dict_file

__all__ = ["CLIPConfig", "CLIPVisionTower", "load_clip", "random_clip", "clip_preprocess", "encode_image",
           "CLIP_MEAN", "CLIP_STD"]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class CLIPConfig:
    image_size: int = 224
    patch_size: int = 14
    dim: int = 1280
    mlp_dim: int = 5120
    num_heads: int = 16
    num_layers: int = 32  # blocks in the checkpoint; the first num_layers - 1 are run
    eps: float = 1e-5

    @property
    def use_blocks(self) -> int:
        """Wan runs all but the last block (31 of ViT-H/14's 32); a ViT-H file pruned to those 31 runs them all."""
        if self.dim == 1280 and self.num_layers == 31:
            return 31
        return self.num_layers - 1

    @property
    def num_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1

    @staticmethod
    def vit_h14() -> "CLIPConfig":
        return CLIPConfig()

    @staticmethod
    def tiny() -> "CLIPConfig":
        return CLIPConfig(image_size=28, patch_size=14, dim=160, mlp_dim=640, num_heads=2, num_layers=3)

    @staticmethod
    def from_state_dict(sd: dict[str, torch.Tensor], head_dim: int = 80, source: str = "state dict") -> "CLIPConfig":
        """Sizes from tensor shapes of a `visual.`-stripped state dict; num_heads = dim // head_dim
        (not recoverable from shapes; ViT-H/14 has 16 heads of 80).

        num_layers is the count of blocks present (a file without its unused last block gives one less).
        """
        needed = ["patch_embedding.weight", "pos_embedding", "transformer.0.mlp.0.weight"]
        missing = [k for k in needed if k not in sd]
        if missing:
            raise ValueError(f"{source}: not a CLIP vision checkpoint, missing keys {missing}")
        dim, _, patch, _ = sd["patch_embedding.weight"].shape
        num_pos = sd["pos_embedding"].shape[1]
        grid = math.isqrt(num_pos - 1)
        if grid * grid != num_pos - 1:
            raise ValueError(f"{source}: pos_embedding has {num_pos} rows, expected 1 + a square number")
        if dim % head_dim:
            raise ValueError(f"{source}: width {dim} not divisible by head_dim {head_dim}")
        layers = {int(m.group(1)) for k in sd if (m := re.match(r"transformer\.(\d+)\.", k))}
        return CLIPConfig(image_size=grid * patch, patch_size=patch, dim=dim,
                          mlp_dim=sd["transformer.0.mlp.0.weight"].shape[0], num_heads=dim // head_dim,
                          num_layers=max(layers) + 1)


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32; returns fp32 (the residual stream's dtype)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps)


class CLIPAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.to_qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, L, C] (weight dtype) -> [B, L, C]; fused qkv laid out as [3, H, D] along the output dim."""
        B, L, C = x.shape
        q, k, v = self.to_qkv(x).view(B, L, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(D)
        return self.proj(out.transpose(1, 2).reshape(B, L, C))


class CLIPBlock(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.norm1 = FP32LayerNorm(cfg.dim, eps=cfg.eps)
        self.attn = CLIPAttention(cfg.dim, cfg.num_heads)
        self.norm2 = FP32LayerNorm(cfg.dim, eps=cfg.eps)
        # erf GELU (open-clip ViT-H/14 with activation='gelu'); indices 0 and 2 match the checkpoint.
        self.mlp = nn.Sequential(nn.Linear(cfg.dim, cfg.mlp_dim), nn.GELU(), nn.Linear(cfg.mlp_dim, cfg.dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, L, C] fp32 residual stream."""
        dt = self.attn.proj.bias.dtype  # the run dtype (also with 8-bit weights: QuantLinear)
        x = x + self.attn(self.norm1(x).to(dt)).float()
        return x + self.mlp(self.norm2(x).to(dt)).float()


class CLIPVisionTower(nn.Module):
    """Preprocessed images [B, 3, S, S] -> tokens [B, 1 + (S/p)², C] after cfg.use_blocks blocks (no post-norm)."""

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.cfg = cfg
        p = cfg.patch_size
        self.patch_embedding = nn.Conv2d(3, cfg.dim, kernel_size=p, stride=p, bias=False)
        self.cls_embedding = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.pos_embedding = nn.Parameter(torch.zeros(1, cfg.num_tokens, cfg.dim))
        self.pre_norm = FP32LayerNorm(cfg.dim, eps=cfg.eps)
        self.transformer = nn.Sequential(*[CLIPBlock(cfg) for _ in range(cfg.use_blocks)])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        S = self.cfg.image_size
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, S, S):
            raise ValueError(f"CLIP expects preprocessed images [B, 3, {S}, {S}] (see clip_preprocess), "
                             f"got {tuple(images.shape)}")
        dt = self.patch_embedding.weight.dtype
        x = self.patch_embedding(images.to(dt)).flatten(2).transpose(1, 2)  # [B, P, C]
        x = torch.cat([self.cls_embedding.expand(x.shape[0], -1, -1).to(dt), x], dim=1)
        x = self.pre_norm(x.float() + self.pos_embedding.float())
        x = self.transformer(x)
        return x.to(dt)


def _visual_state_dict(sd: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """The `visual.*` tensors with the prefix stripped; a file with no `visual.` keys is taken as bare."""
    if any(k.startswith("visual.") for k in sd):
        return {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}
    return dict(sd)


def _drop_unused(sd: dict[str, torch.Tensor], cfg: CLIPConfig) -> dict[str, torch.Tensor]:
    """Removes the tensors Wan never uses: the last block, post_norm and the projection head."""
    out = {}
    for k, v in sd.items():
        m = re.match(r"transformer\.(\d+)\.", k)
        if (m and int(m.group(1)) >= cfg.use_blocks) or k.startswith("post_norm.") or k == "head" \
                or k.startswith("head."):
            continue
        out[k] = v
    return out


def load_clip(path: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float16,
              head_dim: int = 80) -> CLIPVisionTower:
    """Loads the vision tower from Wan's CLIP file (text tower, head, post_norm and last block ignored).

    Raises FileNotFoundError (missing file) or ValueError (wrong keys/shapes, naming the file).
    On CPU prefer dtype float32 (or bfloat16): fp16 matmuls are slow or unsupported there.
    """
    from lightx2v_engine.quant import swap_scaled_linears_
    sd = _visual_state_dict(read_state_dict_file(path), str(path))
    cfg = CLIPConfig.from_state_dict(sd, head_dim=head_dim, source=str(path))
    with torch.device("meta"):
        model = CLIPVisionTower(cfg)
    sd = _drop_unused(sd, cfg)
    swap_scaled_linears_(model, sd, str(path))  # LightX2V's quantized CLIP: 8-bit linears as QuantLinear
    assign_checked(model, sd, str(path))
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


# The linears of a block that LightX2V's quantized CLIP files hold as 8-bit `weight` + `weight_scale`.
QUANT_LINEARS = ("attn.to_qkv", "attn.proj", "mlp.0", "mlp.2")


def quantize_clip_(model: CLIPVisionTower, scheme: str) -> CLIPVisionTower:
    """The block linears as QuantLinear holding their current weights quantized per output channel (random
    pipelines with clip_quantized)."""
    from lightx2v_engine.quant import quantize_linears_
    return quantize_linears_(model, [f"transformer.{i}.{n}" for i in range(len(model.transformer))
                                     for n in QUANT_LINEARS], scheme)


@torch.no_grad()
def random_clip(cfg: CLIPConfig, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float16,
                seed: int = 0) -> CLIPVisionTower:
    """CLIPVisionTower with seeded random weights (open-clip-like scales), allocated on `device` directly."""
    with torch.device("meta"):
        model = CLIPVisionTower(cfg).to(dtype)
    model = model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in model.named_parameters():
        if "norm" in name:
            p.fill_(1.0 if name.endswith("weight") else 0.0)
        elif name.endswith("bias"):
            p.zero_()
        elif name == "patch_embedding.weight":
            p.normal_(0.0, (3 * cfg.patch_size ** 2) ** -0.5, generator=gen)
        elif name in ("cls_embedding", "pos_embedding"):
            p.normal_(0.0, cfg.dim ** -0.5, generator=gen)
        else:  # linear weights [out, in]; residual-branch outputs scaled down by sqrt(2 * blocks)
            std = p.shape[1] ** -0.5
            if name.endswith(("attn.proj.weight", "mlp.2.weight")):
                std /= math.sqrt(2 * max(cfg.use_blocks, 1))
            p.normal_(0.0, std, generator=gen)
    return model.eval().requires_grad_(False)


def clip_preprocess(images: torch.Tensor, size: int = 224) -> torch.Tensor:
    """images [B, 3, H, W] in [-1, 1] -> [B, 3, size, size] fp32 (fp64 stays fp64): bicubic resize
    (no crop, no antialias), x*0.5+0.5, then (x - CLIP_MEAN) / CLIP_STD per channel."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"clip_preprocess expects images [B, 3, H, W], got {tuple(images.shape)}")
    x = images if images.dtype == torch.float64 else images.float()
    x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
    x = x * 0.5 + 0.5
    mean = torch.tensor(CLIP_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def encode_image(model: CLIPVisionTower, images: torch.Tensor) -> torch.Tensor:
    """Preprocessed images [B, 3, S, S] (output of clip_preprocess) -> CLIP tokens [B, 257, 1280] in the
    model's dtype, on the model's device."""
    return model(images.to(model.patch_embedding.weight.device))
