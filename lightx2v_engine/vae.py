"""Wan2.1 VAE: causal 3D conv autoencoder, stride 4x8x8, 16 latent channels (`Wan2.1_VAE.pth`).

Our module's ``state_dict()`` keys are Wan's own (``encoder.downsamples.N.residual.2.weight`` ...), so the
official checkpoint loads without renaming.

Streaming. Every causal conv sees the whole video as one stream with 2 zero frames in front; the video is
processed in chunks (encode: 1, 4, 4, ... pixel frames -> 1 latent each; decode: 1 latent -> 1, then 4
frames) and each conv keeps its last 2 input frames (the feature cache) between chunks. Exceptions, as in
Wan: the temporal downsampler (`time_conv`, k=3, stride 2, no padding) passes the first chunk through and
later sees [last frame of the previous chunk, chunk]; the temporal upsampler's `time_conv` (C -> 2C,
causal, its cache starting from zeros) is skipped on the first chunk, otherwise its two output halves
become frames 2t and 2t+1.

Hot path (performance.md: ~70% of a plain decode is memory-bound glue). A k=3 causal conv does no
concatenation or padding pass: a scratch buffer [B, C, 2+T, H, W] gets the 2 cached frames copied in and
the fused RMSNorm+SiLU of the input written straight into its tail; the conv runs with only spatial
padding (cuDNN pads internally); the last 2 frames are copied out as the new cache. Nearest x2 + Conv2d k3
runs as a sub-pixel conv (2x2 taps per output phase on the low-res input: 2.25x fewer FLOPs, no 4x
upsampled tensor) whose 4 phases are then scattered into place; 2D convs run as (1,k,k) Conv3d on the 5D
tensor (no per-frame permutes). On CUDA, activations and Conv3d weights are channels_last_3d and
RMSNorm+SiLU is one Triton pass (`kernels/vae_norm.py`); decoded chunks are clamped into a preallocated
fp32 output. Live-tensor peak for 81x480x832 (meta-device count, without allocator slack or cuDNN
workspace): decode 3.4 GiB bf16 / 6.5 GiB fp32, encode 2.7 / 5.1 GiB, plus weights 0.24 / 0.47 GiB.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from lightx2v_engine.checkpoint import key_mismatch, read_state_dict_file
from lightx2v_engine.ops import kernels_capable

WAN21_LATENT_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                     0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
WAN21_LATENT_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)
NORM_EPS = 1e-12  # F.normalize's eps: x / max(||x||, eps)


@dataclass(frozen=True)
class VAEConfig:
    dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temperal_downsample: tuple[bool, ...] = (False, True, True)

    def __post_init__(self):
        if self.z_dim != len(WAN21_LATENT_MEAN):
            raise ValueError(f"VAEConfig.z_dim must be {len(WAN21_LATENT_MEAN)} (the Wan2.1 latent mean/std), "
                             f"got {self.z_dim}")
        if len(self.temperal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(f"VAEConfig: temperal_downsample needs len(dim_mult) - 1 = {len(self.dim_mult) - 1} "
                             f"entries, got {len(self.temperal_downsample)}")

    @classmethod
    def wan21(cls) -> "VAEConfig":
        return cls()

    @classmethod
    def tiny(cls, dim: int = 8) -> "VAEConfig":
        """Same structure (strides 4x8x8, z 16) with base width `dim`: for tests and random-weight runs."""
        return cls(dim=dim)

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor], source: str = "state dict") -> "VAEConfig":
        """Base width from encoder.conv1.weight [dim, 3, 3, 3, 3], z_dim from conv2.weight [z, z, 1, 1, 1]."""
        for key in ("encoder.conv1.weight", "conv2.weight"):
            if key not in sd:
                raise KeyError(f"{source}: missing key {key!r}; not a Wan2.1 VAE checkpoint?")
        z_dim = int(sd["conv2.weight"].shape[0])
        if z_dim != len(WAN21_LATENT_MEAN):
            hint = (": this looks like a Wan2.2 VAE (Wan2.2_VAE.pth, 48 latent channels); only the Wan2.1 VAE "
                    "(Wan2.1_VAE.pth) is supported" if z_dim == 48 else "; not a Wan2.1 VAE checkpoint?")
            raise ValueError(f"{source}: conv2.weight {tuple(sd['conv2.weight'].shape)} gives z_dim {z_dim}, "
                             f"expected {len(WAN21_LATENT_MEAN)} (Wan2.1 VAE){hint}")
        return cls(dim=int(sd["encoder.conv1.weight"].shape[0]), z_dim=z_dim)


# ---------------------------------------------------------------------------------------------------------
# RMSNorm (+SiLU) over channels


def rms_norm_act_ref(x: torch.Tensor, gamma: torch.Tensor, silu: bool, out: torch.Tensor | None = None
                     ) -> torch.Tensor:
    """y = act(x / max(||x||_2 over dim 1, 1e-12) * sqrt(C) * gamma), act = SiLU or identity; x [B, C, ...].

    Norm and scale in fp32; three elementwise passes, written into `out` (any strides) when given.
    """
    c = x.shape[1]
    r = torch.linalg.vector_norm(x, dim=1, keepdim=True, dtype=torch.promote_types(x.dtype, torch.float32))
    r = r.clamp_min_(NORM_EPS).reciprocal_().mul_(math.sqrt(c))
    if out is None:
        out = torch.empty_like(x)
    torch.mul(x, r, out=out)
    out.mul_(gamma.reshape((c,) + (1,) * (x.dim() - 2)))
    if silu:
        F.silu(out, inplace=True)
    return out


@functools.lru_cache(maxsize=1)
def _norm_kernel():
    """The Triton RMSNorm+SiLU module (kernels/vae_norm.py), or None (reason kept in `_norm_kernel.reason`)."""
    try:
        from lightx2v_engine.kernels import vae_norm
        return vae_norm
    except Exception as e:  # recorded, not hidden: see norm_kernel_status()
        if type(e).__name__ == "ChoiceError":  # a mistyped LX2V_* kernel choice: an error (as in ops)
            raise
        _norm_kernel.reason = f"{type(e).__name__}: {e}"
        return None


_USE_KERNEL = "auto"


def set_norm_kernel(mode: str) -> None:
    """"auto": Triton RMSNorm+SiLU on CUDA tensors (default); "torch": the reference everywhere;
    "kernel": the kernel on every device (CPU via TRITON_INTERPRET=1; for tests)."""
    global _USE_KERNEL
    if mode not in ("auto", "torch", "kernel"):
        raise ValueError(f"set_norm_kernel: mode must be 'auto', 'torch' or 'kernel', got {mode!r}")
    _USE_KERNEL = mode


def norm_kernel_status() -> str:
    k = _norm_kernel()
    return "available" if k is not None else f"unavailable ({getattr(_norm_kernel, 'reason', '?')})"


def rms_norm_act(x: torch.Tensor, gamma: torch.Tensor, silu: bool, out: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """rms_norm_act_ref, as one Triton pass on CUDA (sm80+) when x and out are channels-last pixel rows."""
    if _USE_KERNEL == "kernel" or (_USE_KERNEL == "auto" and x.is_cuda and kernels_capable(x.device)):
        k = _norm_kernel()
        if k is not None and x.dim() == 5 and (out is None or k.supports(out, None)):
            if not k.supports(x, None):  # one copy + one fused pass still beats the 4-pass reference
                x = x.contiguous(memory_format=torch.channels_last_3d)
            if k.supports(x, out):  # (out's pixels in x's order: else the reference, which takes any strides)
                return k.rms_norm_act(x, gamma, silu, out)
    return rms_norm_act_ref(x, gamma, silu, out)


# ---------------------------------------------------------------------------------------------------------
# Modules (parameter names follow wan/modules/vae.py)


class CausalConv3d(nn.Conv3d):
    """Conv3d with `pad_t` frames of past context (zeros or the cache) and 'same' spatial padding.

    Called through `_causal_conv` (streaming) or directly on a full clip with zero time padding.
    """

    def __init__(self, cin: int, cout: int, kernel: int | tuple[int, int, int],
                 stride: int | tuple[int, int, int] = 1, pad_t: int | None = None):
        super().__init__(cin, cout, kernel, stride=stride, padding=0)
        kt, kh, kw = self.kernel_size
        self.pad_t = kt - 1 if pad_t is None else pad_t
        self.pad_hw = (kh // 2, kw // 2)


class RMSNorm(nn.Module):
    """x / ||x||_C * sqrt(C) * gamma; gamma [C, 1, 1, 1] (video) or [C, 1, 1] (images, in attention)."""

    def __init__(self, dim: int, images: bool = False):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones((dim, 1, 1) if images else (dim, 1, 1, 1)))


class _Stream:
    """State of one encode/decode call: whether this is the first chunk, and every causal conv's cache (its
    last `pad_t` input frames). Scratch buffers are plain allocations: the caching allocator recycles them."""

    def __init__(self, memory_format: torch.memory_format):
        self.fmt = memory_format
        self.first = True
        self.cache: dict[nn.Module, torch.Tensor] = {}


def _causal_conv(conv: CausalConv3d, x: torch.Tensor, st: _Stream, norm: RMSNorm | None = None) -> torch.Tensor:
    """conv([cache | act(x)]), act = SiLU(RMSNorm(x)) when `norm` is given; updates the cache. x [B, C, T, H, W]."""
    p = conv.pad_t
    if p == 0:
        if norm is not None:
            x = rms_norm_act(x, norm.gamma, True)
        return F.conv3d(x, conv.weight, conv.bias, conv.stride, (0,) + conv.pad_hw)
    b, c, t, h, w = x.shape
    buf = torch.empty((b, c, p + t, h, w), dtype=x.dtype, device=x.device, memory_format=st.fmt)
    prev = st.cache.get(conv)
    if prev is None:
        buf[:, :, :p].zero_()
    else:
        buf[:, :, :p].copy_(prev)
    if norm is None:
        buf[:, :, p:].copy_(x)
    else:
        rms_norm_act(x, norm.gamma, True, out=buf[:, :, p:])
    y = F.conv3d(buf, conv.weight, conv.bias, conv.stride, (0,) + conv.pad_hw)
    if prev is None:
        st.cache[conv] = buf[:, :, -p:].clone(memory_format=st.fmt)
    else:
        prev.copy_(buf[:, :, -p:])
    return y


class ResidualBlock(nn.Module):
    """x -> conv(SiLU(RMS(conv(SiLU(RMS(x)))))) + shortcut(x); 3x3x3 causal convs, 1x1x1 shortcut if C changes."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.residual = nn.Sequential(RMSNorm(cin), nn.SiLU(), CausalConv3d(cin, cout, 3),
                                      RMSNorm(cout), nn.SiLU(), nn.Identity(), CausalConv3d(cout, cout, 3))
        self.shortcut = CausalConv3d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, st: _Stream) -> torch.Tensor:
        r = self.residual
        h = x if isinstance(self.shortcut, nn.Identity) else _causal_conv(self.shortcut, x, st)
        y = _causal_conv(r[2], x, st, norm=r[0])
        y = _causal_conv(r[6], y, st, norm=r[3])
        return y.add_(h)


class AttentionBlock(nn.Module):
    """Per-frame single-head self-attention over the H*W positions (head dim C), residual."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor, st: _Stream) -> torch.Tensor:
        b, c, t, h, w = x.shape
        y = rms_norm_act(x, self.norm.gamma, False)
        y = y.permute(0, 2, 3, 4, 1).reshape(b * t, 1, h * w, c)  # free for channels_last_3d
        qkv = F.linear(y, self.to_qkv.weight.view(3 * c, c), self.to_qkv.bias)
        q, k, v = qkv.chunk(3, dim=-1)
        o = F.scaled_dot_product_attention(q, k, v)
        o = F.linear(o, self.proj.weight.view(c, c), self.proj.bias)
        return torch.add(x, o.view(b, t, h, w, c).permute(0, 4, 1, 2, 3))


class Resample(nn.Module):
    """Spatial x2 down/up-sampling (Conv2d as `resample.1`), optionally with the temporal `time_conv`.

    downsample: zero pad right/bottom by 1, Conv2d k3 s2 (C -> C); 3d: then time_conv k=(3,1,1) stride 2.
    upsample: 3d: time_conv (C -> 2C, causal) interleaved into 2T frames; nearest x2; Conv2d k3 (C -> C/2).
    """

    def __init__(self, dim: int, mode: str):
        super().__init__()
        self.mode = mode
        if mode.startswith("up"):
            self.resample = nn.Sequential(nn.Identity(), nn.Conv2d(dim, dim // 2, 3, padding=1))
            if mode == "upsample3d":
                self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1))
        elif mode.startswith("down"):
            self.resample = nn.Sequential(nn.Identity(), nn.Conv2d(dim, dim, 3, stride=2))
            if mode == "downsample3d":
                self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1), pad_t=0)
        else:
            raise ValueError(f"Resample mode must be up/downsample2d/3d, got {mode!r}")

    def _subpixel_weight(self, fmt: torch.memory_format) -> torch.Tensor:
        """`_subpixel_weight` of resample.1 as a [4*O, I, 1, 2, 2] Conv3d weight, cached per weight version."""
        w = self.resample[1].weight
        key = (id(w), w.data_ptr(), w._version, w.dtype, w.device, fmt)
        cached = getattr(self, "_subpixel", None)
        if cached is None or cached[0] != key:
            cached = (key, _subpixel_weight(w).unsqueeze(2).contiguous(memory_format=fmt))
            self._subpixel = cached
        return cached[1]

    def drop_device_caches(self) -> None:
        """Forgets the derived weight (pipeline._to_device calls it when an offloaded VAE goes back to the CPU:
        it would stay on the GPU, 5 MB at Wan's size)."""
        self._subpixel = None

    def forward(self, x: torch.Tensor, st: _Stream) -> torch.Tensor:
        conv = self.resample[1]
        if self.mode.startswith("up"):
            if self.mode == "upsample3d" and not st.first:
                x = _interleave_frames(_causal_conv(self.time_conv, x, st), st.fmt)
            return _upsample2x_conv(x, self._subpixel_weight(st.fmt), conv.bias, st.fmt)
        w5 = conv.weight.unsqueeze(2)  # Conv2d weight as a (1,3,3) Conv3d: runs on the 5D tensor per frame
        x = F.conv3d(F.pad(x, (0, 1, 0, 1)), w5, conv.bias, stride=(1, 2, 2))
        if self.mode == "downsample3d":
            prev = st.cache.get(self.time_conv)
            st.cache[self.time_conv] = x[:, :, -1:].clone(memory_format=st.fmt)
            if not st.first:
                x = F.conv3d(torch.cat([prev, x], dim=2), self.time_conv.weight, self.time_conv.bias,
                             stride=(2, 1, 1))
        return x


def _interleave_frames(y: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:
    """time_conv output [B, 2C, T, H, W] -> [B, C, 2T, H, W]; frame 2t+s = channels s*C..(s+1)*C of frame t."""
    b, c2, t, h, w = y.shape
    c = c2 // 2
    out = torch.empty((b, c, 2 * t, h, w), dtype=y.dtype, device=y.device, memory_format=fmt)
    out.view(b, c, t, 2, h, w).copy_(y.view(b, 2, c, t, h, w).permute(0, 2, 3, 1, 4, 5))
    return out


def _subpixel_weight(w: torch.Tensor) -> torch.Tensor:
    """Conv2d k3 weight [O, I, 3, 3] that follows a nearest x2 upsample -> [4*O, I, 2, 2] weight acting on the
    low-res input, one output block per phase (a, b) of the 2x2 output pixel, block index 2a + b.

    Output row 2h+a reads upsampled rows 2h+a-1..2h+a+1 = input rows (h-1, h, h) for a=0, (h, h, h+1) for a=1:
    taps (0 | 1+2) on input rows (h-1, h) and (0+1 | 2) on rows (h, h+1); columns likewise. Summed in fp32.
    """
    wf = w.to(torch.promote_types(w.dtype, torch.float32))

    def fold(v: torch.Tensor, dim: int, a: int) -> torch.Tensor:
        k0, k1, k2 = v.unbind(dim)
        return torch.stack((k0, k1 + k2) if a == 0 else (k0 + k1, k2), dim)

    return torch.cat([fold(fold(wf, 2, a), 3, b) for a in (0, 1) for b in (0, 1)]).to(w.dtype)


def _upsample2x_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, fmt: torch.memory_format
                     ) -> torch.Tensor:
    """Conv2d_k3_pad1(nearest_x2(x)) per frame, x [B, C, T, H, W] -> [B, O, T, 2H, 2W] (or frames as the
    batch, x [N, C, H, W] -> [N, O, 2H, 2W]), as a sub-pixel conv (weight = `_subpixel_weight(...)`,
    [4*O, C, 1, 2, 2] for 5D x, [4*O, C, 2, 2] for 4D; bias [O] or None): a conv with 2x2 taps and 4*O
    outputs on x padded by 1 (2.25x fewer FLOPs, no 4x upsampled input), then the phases are scattered:
    out[.., 2h+a, 2w+b] = y[(2a+b)*O + o, .., h+a, w+b]."""
    b, _, *frames, h, w = x.shape
    o = weight.shape[0] // 4
    bias4 = None if bias is None else bias.repeat(4)
    y = F.conv3d(x, weight, bias4, padding=(0, 1, 1)) if x.dim() == 5 else F.conv2d(x, weight, bias4, padding=1)
    out = torch.empty((b, o, *frames, 2 * h, 2 * w), dtype=x.dtype, device=x.device, memory_format=fmt)
    phases = out.view(b, o, *frames, h, 2, w, 2)
    for a in (0, 1):
        for c in (0, 1):
            k = 2 * a + c
            phases[..., a, :, c].copy_(y[:, k * o:(k + 1) * o, ..., a:a + h, c:c + w])
    return out


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        dims = [cfg.dim * m for m in (1,) + tuple(cfg.dim_mult)]
        self.conv1 = CausalConv3d(3, dims[0], 3)
        layers: list[nn.Module] = []
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResidualBlock(cin, cout))
                cin = cout
            if i != len(cfg.dim_mult) - 1:
                layers.append(Resample(cout, "downsample3d" if cfg.temperal_downsample[i] else "downsample2d"))
        self.downsamples = nn.ModuleList(layers)
        c = dims[-1]
        self.middle = nn.ModuleList([ResidualBlock(c, c), AttentionBlock(c), ResidualBlock(c, c)])
        self.head = nn.Sequential(RMSNorm(c), nn.SiLU(), CausalConv3d(c, cfg.z_dim * 2, 3))

    def forward(self, x: torch.Tensor, st: _Stream) -> torch.Tensor:
        """One chunk [B, 3, T, H, W] (T = 1 first, then 4) -> [B, 2z, 1, H/8, W/8]."""
        x = _causal_conv(self.conv1, x, st)
        for layer in self.downsamples:
            x = layer(x, st)
        for layer in self.middle:
            x = layer(x, st)
        return _causal_conv(self.head[2], x, st, norm=self.head[0])


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        mult = tuple(cfg.dim_mult)
        dims = [cfg.dim * m for m in (mult[-1],) + mult[::-1]]
        temperal_upsample = tuple(cfg.temperal_downsample)[::-1]
        self.conv1 = CausalConv3d(cfg.z_dim, dims[0], 3)
        c = dims[0]
        self.middle = nn.ModuleList([ResidualBlock(c, c), AttentionBlock(c), ResidualBlock(c, c)])
        layers: list[nn.Module] = []
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                cin = cin // 2  # the previous upsampler halved the channels
            for _ in range(cfg.num_res_blocks + 1):
                layers.append(ResidualBlock(cin, cout))
                cin = cout
            if i != len(mult) - 1:
                layers.append(Resample(cout, "upsample3d" if temperal_upsample[i] else "upsample2d"))
        self.upsamples = nn.ModuleList(layers)
        self.head = nn.Sequential(RMSNorm(dims[-1]), nn.SiLU(), CausalConv3d(dims[-1], 3, 3))

    def forward(self, x: torch.Tensor, st: _Stream) -> torch.Tensor:
        """One latent [B, z, 1, h, w] -> [B, 3, 1 (first) or 4, 8h, 8w] (unclamped)."""
        x = _causal_conv(self.conv1, x, st)
        for layer in self.middle:
            x = layer(x, st)
        for layer in self.upsamples:
            x = layer(x, st)
        return _causal_conv(self.head[2], x, st, norm=self.head[0])


class WanVAE(nn.Module):
    """Wan2.1 VAE. encode: video [B, 3, 1+4k, H, W] in [-1, 1] -> normalized latents [B, 16, 1+k, H/8, W/8];
    decode: the reverse, clamped to [-1, 1]. Both return fp32; the convs run in the parameters' dtype."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.conv1 = CausalConv3d(cfg.z_dim * 2, cfg.z_dim * 2, 1)
        self.conv2 = CausalConv3d(cfg.z_dim, cfg.z_dim, 1)
        self.decoder = Decoder(cfg)
        self.memory_format = torch.contiguous_format  # of activations; see use_channels_last()

    @property
    def dtype(self) -> torch.dtype:
        return self.conv2.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.conv2.weight.device

    def _mean_std(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, self.cfg.z_dim, 1, 1, 1)
        mean = torch.tensor(WAN21_LATENT_MEAN, dtype=torch.float32, device=device).view(shape)
        std = torch.tensor(WAN21_LATENT_STD, dtype=torch.float32, device=device).view(shape)
        return mean, std

    def use_channels_last(self) -> "WanVAE":
        """Activations and every Conv3d weight in channels_last_3d (NDHWC: cuDNN's fast conv kernels, and
        the layout the fused norm kernel reads). load_vae / random_vae call this on CUDA."""
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                m.weight.data = m.weight.data.contiguous(memory_format=torch.channels_last_3d)
            elif isinstance(m, Resample):  # its Conv2d runs as a (1,3,3) Conv3d on NDHWC activations
                m.resample[1].weight.data = m.resample[1].weight.data.contiguous(memory_format=torch.channels_last)
        self.memory_format = torch.channels_last_3d
        return self

    @torch.no_grad()
    def encode(self, video: torch.Tensor, tiled: bool | tuple[int, int] = False) -> torch.Tensor:
        """video [B, 3, T, H, W] in [-1, 1], T = 1+4k, H, W multiples of 8 -> z = (mu - mean) / std,
        fp32 [B, 16, 1+k, H/8, W/8]. Pixel chunks 1, 4, 4, ... give one latent each. `tiled` (True:
        TILE_PIXELS, or (tile, stride) in pixels): overlapping spatial tiles, encoded one at a time and
        blended (see _tiled), when the video is larger than a tile."""
        if video.dim() != 5 or video.shape[1] != 3:
            raise ValueError(f"WanVAE.encode expects video [B, 3, T, H, W], got {tuple(video.shape)}")
        if not video.is_floating_point():
            raise ValueError(f"WanVAE.encode expects a floating-point video in [-1, 1], got dtype {video.dtype} "
                             f"(uint8 pixels p: p / 127.5 - 1)")
        b, _, t, h, w = video.shape
        if t % 4 != 1:
            raise ValueError(f"WanVAE.encode: frame count T={t} must be 1 + 4k (e.g. 81)")
        if h % 8 or w % 8 or h == 0 or w == 0:
            raise ValueError(f"WanVAE.encode: height {h} and width {w} must be positive multiples of 8")
        tile = _tile_setting(tiled)
        if tile is not None and (h > tile[0] or w > tile[0]):
            out = torch.empty((b, self.cfg.z_dim, (t - 1) // 4 + 1, h // 8, w // 8), dtype=torch.float32,
                              device=self.device)
            return _tiled(lambda k, vt: self._encode_full(vt), video, tile[0], tile[1], (1, 8), out)
        return self._encode_full(video)

    def _encode_full(self, video: torch.Tensor) -> torch.Tensor:
        b, _, t, h, w = video.shape
        n = (t - 1) // 4 + 1
        z = self.cfg.z_dim
        out = torch.empty((b, z, n, h // 8, w // 8), dtype=torch.float32, device=self.device)
        mean, std = self._mean_std(self.device)
        st = _Stream(self.memory_format)
        for i in range(n):
            st.first = i == 0
            chunk = video[:, :, :1] if i == 0 else video[:, :, 1 + 4 * (i - 1):1 + 4 * i]
            chunk = chunk.to(device=self.device, dtype=self.dtype).contiguous(memory_format=st.fmt)
            x = self.encoder(chunk, st)
            mu = F.conv3d(x, self.conv1.weight[:z], self.conv1.bias[:z])  # only mu of (mu, logvar)
            torch.div(mu.float().sub_(mean), std, out=out[:, :, i:i + 1])
        return out

    @torch.no_grad()
    def decode(self, z: torch.Tensor, tiled: bool | tuple[int, int] = False, tile_results=None) -> torch.Tensor:
        """z [B, 16, F, h, w] (normalized latents) -> video fp32 [B, 3, 1+4(F-1), 8h, 8w] in [-1, 1].
        Latents go through the decoder one at a time (1, then 4 frames each) into a preallocated output.
        `tiled` (True: TILE_PIXELS, or (tile, stride) in pixels): overlapping spatial tiles, decoded one at a
        time and blended (see _tiled), when the video is larger than a tile: LightX2V's use_tiling_vae, for
        GPUs short of memory (activation memory of one tile instead of the frame; about 1.5-2x the work).
        tile_results(k, zt) -> the decoded tile k (of decode_tiles(); unclamped fp32) instead of decoding it
        here: multi-GPU decode (parallel.decode_tiled) hands in tiles decoded by other ranks."""
        self._check_latents(z, "decode")
        b, _, n, h, w = z.shape
        tile = _latent_tiling(z, tiled)
        if tile is not None:
            out = torch.empty((b, 3, 1 + 4 * (n - 1), 8 * h, 8 * w), dtype=torch.float32, device=self.device)
            fn = tile_results or (lambda k, zt: self.decode_tile(zt))
            return _tiled(fn, z, tile[0], tile[1], (8, 1), out).clamp_(-1.0, 1.0)
        return self._decode_full(z)

    def _check_latents(self, z: torch.Tensor, what: str) -> None:
        """z must be [B, z_dim, F, h, w] with F, h, w >= 1 (an empty latent has nothing to decode)."""
        if z.dim() != 5 or z.shape[1] != self.cfg.z_dim:
            raise ValueError(f"WanVAE.{what} expects latents [B, {self.cfg.z_dim}, F, h, w], got {tuple(z.shape)}")
        if min(z.shape[2:]) < 1:
            raise ValueError(f"WanVAE.{what}: latents {tuple(z.shape)} are empty: need F >= 1 frames and h, w >= 1")

    def decode_tiles(self, z: torch.Tensor, tiled: bool | tuple[int, int] = True) -> list[torch.Tensor] | None:
        """The latent tiles decode(z, tiled) decodes, in its order (views of z); None when it would not tile."""
        self._check_latents(z, "decode_tiles")
        tile = _latent_tiling(z, tiled)
        if tile is None:
            return None
        t, s = tile
        return [z[..., i:i + t, j:j + t] for i in range(0, z.shape[-2], s) for j in range(0, z.shape[-1], s)]

    @torch.no_grad()
    def decode_tile(self, zt: torch.Tensor) -> torch.Tensor:
        """One tile of decode_tiles() -> its unclamped fp32 pixels [B, 3, 1+4(F-1), 8h, 8w]."""
        return self._decode_full(zt, clamp=False)

    def _decode_full(self, z: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        b, _, n, h, w = z.shape
        mean, std = self._mean_std(self.device)
        x = z.to(device=self.device, dtype=torch.float32) * std + mean
        x = F.conv3d(x.to(self.dtype), self.conv2.weight, self.conv2.bias)
        st = _Stream(self.memory_format)
        x = x.contiguous(memory_format=st.fmt)
        out = torch.empty((b, 3, 1 + 4 * (n - 1), 8 * h, 8 * w), dtype=torch.float32, device=self.device)
        t0 = 0
        for i in range(n):
            st.first = i == 0
            y = self.decoder(x[:, :, i:i + 1], st)
            t1 = t0 + y.shape[2]
            out[:, :, t0:t1].copy_(y.clamp_(-1.0, 1.0) if clamp else y)
            t0 = t1
            del y
        return out


# ---------------------------------------------------------------------------------------------------------
# Spatial tiling (use_tiling_vae)

# (tile, stride) in pixels: diffusers' AutoencoderKLWan defaults (tiles of 256 x 256 pixels, 64 overlapping)
TILE_PIXELS = (256, 192)


def _tile_setting(tiled: bool | tuple[int, int] | None) -> tuple[int, int] | None:
    """`tiled` -> (tile, stride) in pixels, or None (no tiling): False / None -> None, True -> TILE_PIXELS,
    a (tile, stride) pair of ints (tuple or list) -> itself, checked: multiples of 8, 0 < stride <= tile."""
    if tiled is False or tiled is None:
        return None
    if tiled is True:
        return TILE_PIXELS
    pair = tuple(tiled) if isinstance(tiled, (tuple, list)) else None
    if not (pair is not None and len(pair) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in pair)
            and 0 < pair[1] <= pair[0] and pair[0] % 8 == 0 and pair[1] % 8 == 0):
        raise ValueError(f"VAE tiling: tiled must be True, False or a (tile, stride) pair of pixel counts, "
                         f"multiples of 8 with 0 < stride <= tile (e.g. {TILE_PIXELS}); got {tiled!r}")
    return pair


def _latent_tiling(z: torch.Tensor, tiled: bool | tuple[int, int]) -> tuple[int, int] | None:
    """decode's (tile, stride) in latents for z [..., h, w], or None when it decodes z whole (no tiling
    asked, or the video no larger than one tile)."""
    tile = _tile_setting(tiled)
    h, w = z.shape[-2:]
    if tile is None or not (8 * h > tile[0] or 8 * w > tile[0]):
        return None
    return tile[0] // 8, tile[1] // 8


def _blend(a: torch.Tensor, b: torch.Tensor, extent: int, dim: int) -> None:
    """b's first `extent` rows (dim -2) or columns (dim -1) fade in from a's last ones, in place: weights
    y / extent for b and 1 - y / extent for a (each rounded from float64, as diffusers' blend_v / blend_h)."""
    e = min(a.shape[dim], b.shape[dim], extent)
    if e <= 0:
        return
    w64 = torch.arange(e, dtype=torch.float64, device=b.device) / e
    shape = (e, 1) if dim == -2 else (e,)
    wb, wa = w64.to(b.dtype).view(shape), (1 - w64).to(b.dtype).view(shape)
    head = b.narrow(dim, 0, e)
    head.copy_(a.narrow(dim, a.shape[dim] - e, e) * wa + head * wb)


def _tail(t: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    """A copy of t's last n (at most all) entries along dim: what a later blend reads of t."""
    k = min(n, t.shape[dim])
    return t.narrow(dim, t.shape[dim] - k, k).clone()


def _tiled(fn, x: torch.Tensor, tile: int, stride: int, scale: tuple[int, int], out: torch.Tensor) -> torch.Tensor:
    """out <- fn over overlapping spatial tiles of x [..., H, W] (`tile` and `stride` in x's units; fn(k, tile)
    maps tile k (row-major order) to out's units, `scale` = (num, den) out per x unit), blended as diffusers' AutoencoderKLWan
    tiles: row by row, each result's top rows fade in from the (already blended) result above and its
    left columns from the one to its left, over (tile - stride) * scale; its first stride * scale rows and
    columns are kept. Held between tiles: the overlapping last rows of one row of results (and the last
    columns of the previous result), not the results themselves."""
    num, den = scale
    blend, keep = (tile - stride) * num // den, stride * num // den
    oh_all, ow_all = out.shape[-2:]
    above: list[torch.Tensor] | None = None  # last `blend` rows of each result of the row above
    k = 0
    for i in range(0, x.shape[-2], stride):
        below: list[torch.Tensor] = []
        left = None  # last `blend` columns of the previous result in this row
        for c, j in enumerate(range(0, x.shape[-1], stride)):
            r = fn(k, x[..., i:i + tile, j:j + tile])
            k += 1
            if above is not None:
                _blend(above[c], r, blend, -2)
            if left is not None:
                _blend(left, r, blend, -1)
            oi, oj = i * num // den, j * num // den
            hk, wk = min(keep, r.shape[-2], oh_all - oi), min(keep, r.shape[-1], ow_all - oj)
            out[..., oi:oi + hk, oj:oj + wk] = r[..., :hk, :wk]
            left = _tail(r, blend, -1)
            below.append(_tail(r, blend, -2))
            del r
        above = below
    return out


# ---------------------------------------------------------------------------------------------------------
# Construction


def _expected_shapes(cfg: VAEConfig) -> dict[str, torch.Size]:
    with torch.device("meta"):
        return {k: v.shape for k, v in WanVAE(cfg).state_dict().items()}


def load_vae(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> WanVAE:
    """Loads `Wan2.1_VAE.pth` (or a .safetensors with the same keys; a directory means its Wan2.1_VAE.pth):
    meta build, mmap load, key and shape validation, assign-load in `dtype` on `device` (channels_last_3d
    conv weights on CUDA)."""
    path = Path(path)
    if path.is_dir():
        path = path / "Wan2.1_VAE.pth"
    if not path.is_file():
        raise FileNotFoundError(f"VAE checkpoint not found: {path}")
    sd = read_state_dict_file(path)
    cfg = VAEConfig.from_state_dict(sd, str(path))
    expected = _expected_shapes(cfg)
    missing, unexpected = key_mismatch(expected, sd)
    if missing or unexpected:
        raise KeyError(f"{path}: not a Wan2.1 VAE state dict (dim {cfg.dim}, z_dim {cfg.z_dim}): "
                       f"{len(missing)} missing keys {missing[:20]}, {len(unexpected)} unexpected keys "
                       f"{unexpected[:20]}")
    for k, shape in expected.items():
        if sd[k].shape != shape:
            raise ValueError(f"{path}: {k} has shape {tuple(sd[k].shape)}, expected {tuple(shape)}")
    with torch.device("meta"):
        model = WanVAE(cfg)
    model.load_state_dict({k: sd[k].to(device=device, dtype=dtype) for k in expected}, assign=True, strict=True)
    model.eval()
    if model.device.type == "cuda":
        model.use_channels_last()
    return model


def random_vae(cfg: VAEConfig, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               seed: int = 0) -> WanVAE:
    """Deterministic random weights built on `device`: conv weights N(0, 1/fan_in), biases N(0, 0.02^2),
    RMSNorm gammas 1 (activations stay O(1) through the residual stacks)."""
    with torch.device("meta"):
        model = WanVAE(cfg)
    model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.02, generator=gen)
            else:
                p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()), generator=gen)
    model.to(dtype=dtype).eval()
    if model.device.type == "cuda":
        model.use_channels_last()
    return model
