"""Tiny autoencoder decoder for Wan2.1 latents (TAEHV layout: `taew2_1.pth`, LightX2V's `lighttaew2_1.pth`).

LightX2V's ``use_tae`` / ``tae_path``: the DiT's latents are decoded by a ~10 MB 2D-conv decoder instead of
the 127M-parameter causal 3D VAE (much faster, lower fidelity). Decode only: I2V still encodes its image
with the Wan VAE. The file's ``encoder.*`` tensors are not used.

Decoder (widths n0..n3 = 256, 128, 64, 64; the state-dict index of each layer in brackets):
    x = 3 tanh(z / 3)                                            [0]
    x = relu(conv3x3(x: 16 -> n0))                               [1, 2]
    3 x MemBlock(n0)                                             [3-5]
    nearest x2, TGrow(n0, 1), conv3x3(n0 -> n1, no bias)         [6-8]
    3 x MemBlock(n1)                                             [9-11]
    nearest x2, TGrow(n1, 2), conv3x3(n1 -> n2, no bias)         [12-14]
    3 x MemBlock(n2)                                             [15-17]
    nearest x2, TGrow(n2, 2), conv3x3(n2 -> n3, no bias)         [18-20]
    relu, conv3x3(n3 -> 3)                                       [21, 22]
    frames = clamp(x, 0, 1) without the first 3 (4F - 3 frames from F latents)
MemBlock(n): out_t = relu(conv(relu(conv(relu(conv(cat[x_t, x_{t-1}]))))) + x_t), with x_{-1} = 0: each
block's own input one frame back. TGrow(n, s): a 1x1 conv n -> s*n whose s channel groups become s
consecutive frames (frame s*t + k = group k of frame t).

Hot path: the 1x1 TGrow conv commutes with the nearest upsample, so it runs at the low resolution (4x fewer
FLOPs), and nearest x2 + conv3x3 runs as a sub-pixel conv (vae._subpixel_weight: 2x2 taps per output
phase, no upsampled tensor). Frames stream through in chunks of latent frames (each MemBlock keeps its
last input frame), so memory is bounded by the chunk, not the video; on CUDA activations are
channels_last. The result does not depend on the chunking.

need_scaled (LightX2V's key): taew2_1 decodes the DiT's normalized latents as they are; LightX2V's
lighttaew2_1 expects raw VAE latents (z * std + mean first). Unset, it follows the file name ("lighttae").
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from lightx2v_engine.checkpoint import assign_checked, read_state_dict_file
from lightx2v_engine.vae import WAN21_LATENT_MEAN, WAN21_LATENT_STD, _subpixel_weight, _upsample2x_conv

log = logging.getLogger(__name__)

TAE_FILES = ("taew2_1.pth", "taew2_1.safetensors")  # LightX2V's default tiny_vae_name, then its safetensors
MEM_BLOCKS = ((3, 4, 5), (9, 10, 11), (15, 16, 17))
GROWS = ((7, 8, 1), (13, 14, 2), (19, 20, 2))  # (TGrow index, following conv index, time stride)
TRIM = 3  # output frames dropped at the start (2^2 - 1 for two temporal x2 stages)
CHUNK_BYTES = 1 << 30  # activation budget that sets the default chunk (latent frames per pass)


@dataclass(frozen=True)
class TAEConfig:
    widths: tuple[int, int, int, int] = (256, 128, 64, 64)
    z_dim: int = 16

    def __post_init__(self):
        if self.z_dim != len(WAN21_LATENT_MEAN):
            raise ValueError(f"TAEConfig.z_dim must be {len(WAN21_LATENT_MEAN)} (Wan2.1 latents), got {self.z_dim}")
        if len(self.widths) != 4 or min(self.widths) < 1:
            raise ValueError(f"TAEConfig.widths must be 4 positive widths, got {self.widths}")

    @classmethod
    def tiny(cls) -> "TAEConfig":
        """Same structure at widths (16, 8, 8, 8): tests and the tiny random preset."""
        return cls(widths=(16, 8, 8, 8))

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor], source: str = "state dict") -> "TAEConfig":
        """Widths from the decoder's convs 1, 8, 14, 20; the latent width from conv 1's input channels."""
        names = ("decoder.1.weight", "decoder.8.weight", "decoder.14.weight", "decoder.20.weight")
        missing = [k for k in names if k not in sd]
        if missing:
            raise KeyError(f"{source}: not a TAEHV (taew2_1) checkpoint: missing {missing}")
        z = int(sd[names[0]].shape[1])
        if z != len(WAN21_LATENT_MEAN):
            raise ValueError(f"{source}: decoder.1.weight takes {z} latent channels; a Wan2.1 tiny autoencoder "
                             f"(taew2_1 / lighttaew2_1) takes {len(WAN21_LATENT_MEAN)} (48 is Wan2.2's taew2_2, "
                             "which lightx2v-engine does not run)")
        return cls(widths=tuple(int(sd[k].shape[0]) for k in names), z_dim=z)


def _conv(cin: int, cout: int, k: int = 3, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, padding=k // 2, bias=bias)


class MemBlock(nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.conv = nn.Sequential(_conv(2 * n, n), nn.ReLU(), _conv(n, n), nn.ReLU(), _conv(n, n))

    def forward(self, x: torch.Tensor, prev: torch.Tensor | None,
                fmt: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
        """x [T, n, H, W] consecutive frames; prev [1, n, H, W] the frame before them (None: zeros)."""
        t, n = x.shape[:2]
        h = torch.empty((t, 2 * n) + x.shape[2:], dtype=x.dtype, device=x.device, memory_format=fmt)
        h[:, :n] = x
        if prev is None:
            h[:1, n:] = 0
        else:
            h[:1, n:] = prev
        h[1:, n:] = x[:-1]
        c = self.conv
        y = F.relu_(c[0](h))
        del h
        y = F.relu_(c[2](y))
        y = c[4](y)
        return F.relu_(y.add_(x))


class TGrow(nn.Module):
    def __init__(self, n: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(n, n * stride, 1, bias=False)


class TinyDecoder(nn.Module):
    """The TAEHV decoder for Wan2.1 latents; ``state_dict()`` keys are the checkpoint's ``decoder.N...``."""

    def __init__(self, cfg: TAEConfig = TAEConfig(), need_scaled: bool = False):
        super().__init__()
        self.cfg = cfg
        self.need_scaled = need_scaled
        n0, n1, n2, n3 = cfg.widths
        layers = {1: _conv(cfg.z_dim, n0)}
        for idx, n in zip(MEM_BLOCKS, (n0, n1, n2)):
            layers.update({i: MemBlock(n) for i in idx})
        for (g, c, s), (n, m) in zip(GROWS, ((n0, n1), (n1, n2), (n2, n3))):
            layers[g] = TGrow(n, s)
            layers[c] = _conv(n, m, bias=False)
        layers[22] = _conv(n3, 3)
        self.decoder = nn.Module()
        for i in sorted(layers):
            self.decoder.add_module(str(i), layers[i])
        self.memory_format = torch.contiguous_format
        self._subpixel: dict = {}

    @property
    def dtype(self) -> torch.dtype:
        return self.layer(1).weight.dtype

    @property
    def device(self) -> torch.device:
        return self.layer(1).weight.device

    def layer(self, i: int) -> nn.Module:
        return getattr(self.decoder, str(i))

    def use_channels_last(self) -> "TinyDecoder":
        """NHWC activations and conv weights (cuDNN's fast kernels); load_tae / random_tae call it on CUDA."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.data = m.weight.data.contiguous(memory_format=torch.channels_last)
        self.memory_format = torch.channels_last
        self._subpixel.clear()
        return self

    def default_chunk(self, h: int, w: int) -> int:
        """Latent frames per pass: the full-resolution [4T, n3, 8h, 8w] activation within CHUNK_BYTES (the
        last sub-pixel conv's [4T, 4 n2, 4h+1, 4w+1] output is as large: the peak is about 2.3x that)."""
        per_frame = 4 * self.cfg.widths[3] * 64 * h * w * self.dtype.itemsize
        return max(1, CHUNK_BYTES // per_frame)

    @torch.no_grad()
    def decode(self, z: torch.Tensor, tiled: bool | tuple[int, int] = False, chunk: int | None = None
               ) -> torch.Tensor:
        """z [B, 16, F, h, w] normalized latents -> video fp32 [B, 3, 4F - 3, 8h, 8w] in [-1, 1].
        `tiled` is accepted for WanVAE.decode's signature and has no effect (memory is bounded by `chunk`,
        latent frames per pass, default_chunk() when None)."""
        if z.dim() != 5 or z.shape[1] != self.cfg.z_dim:
            raise ValueError(f"TinyDecoder.decode expects latents [B, {self.cfg.z_dim}, F, h, w], got {tuple(z.shape)}")
        b, _, n, h, w = z.shape
        if min(n, h, w) < 1:
            raise ValueError(f"TinyDecoder.decode: latents {tuple(z.shape)} are empty: need F >= 1 frames and "
                             f"h, w >= 1")
        chunk = self.default_chunk(h, w) if chunk is None else int(chunk)
        if chunk < 1:
            raise ValueError(f"TinyDecoder.decode: chunk must be >= 1 latent frame, got {chunk}")
        x = z.to(device=self.device, dtype=torch.float32)
        if self.need_scaled:
            shape = (1, self.cfg.z_dim, 1, 1, 1)
            mean = torch.tensor(WAN21_LATENT_MEAN, device=x.device).view(shape)
            std = torch.tensor(WAN21_LATENT_STD, device=x.device).view(shape)
            x = x * std + mean
        x = x.to(self.dtype)
        out = torch.empty((b, 3, 4 * n - TRIM, 8 * h, 8 * w), dtype=torch.float32, device=self.device)
        for i in range(b):
            frames = x[i].transpose(0, 1)  # [F, 16, h, w]
            mem: dict[int, torch.Tensor] = {}
            done = 0  # output frames produced so far, before trimming
            for t0 in range(0, n, chunk):
                y = self._run(frames[t0:t0 + chunk].contiguous(memory_format=self.memory_format), mem)
                lo = max(TRIM - done, 0)
                if lo < y.shape[0]:
                    dst = out[i, :, done + lo - TRIM:done + y.shape[0] - TRIM]
                    dst.copy_(y[lo:].transpose(0, 1))
                done += y.shape[0]
        return out.clamp_(0.0, 1.0).mul_(2.0).sub_(1.0)

    def _run(self, x: torch.Tensor, mem: dict[int, torch.Tensor]) -> torch.Tensor:
        """T latent frames [T, 16, h, w] -> 4T frames [4T, 3, 8h, 8w] (unclamped); `mem` carries each
        MemBlock's last input frame to the next call."""
        x = torch.tanh(x / 3.0).mul_(3.0)
        x = F.relu_(self.layer(1)(x))
        for blocks, (g, c, s) in zip(MEM_BLOCKS, GROWS):
            for i in blocks:
                prev = mem.get(i)
                mem[i] = x[-1:].clone(memory_format=self.memory_format)
                x = self.layer(i)(x, prev, self.memory_format)
            x = self._grow(x, self.layer(g))
            x = _upsample2x_conv(x, self._subpixel_for(c), None, self.memory_format)
        return self.layer(22)(F.relu_(x))

    def _grow(self, x: torch.Tensor, grow: TGrow) -> torch.Tensor:
        """TGrow at the low resolution: [T, n, H, W] -> [s*T, n, H, W], frame s*t + k = channel group k
        (one copy, into the activations' memory format)."""
        y = grow.conv(x)
        s = grow.stride
        if s == 1:
            return y
        t, sn, hh, ww = y.shape
        out = torch.empty((t * s, sn // s, hh, ww), dtype=y.dtype, device=y.device, memory_format=self.memory_format)
        out.unflatten(0, (t, s)).copy_(y.unflatten(1, (s, sn // s)))
        return out

    def drop_device_caches(self) -> None:
        """Forgets the derived weights (see vae.Resample.drop_device_caches)."""
        self._subpixel.clear()

    def _subpixel_for(self, i: int) -> torch.Tensor:
        w = self.layer(i).weight
        key = (id(w), w.data_ptr(), w._version, w.dtype, w.device)  # (_version: in-place loads change it)
        cached = self._subpixel.get(i)
        if cached is None or cached[0] != key:
            cached = (key, _subpixel_weight(w).contiguous(memory_format=self.memory_format))
            self._subpixel[i] = cached
        return cached[1]


def _place(model: TinyDecoder) -> TinyDecoder:
    model.eval().requires_grad_(False)
    if model.device.type == "cuda":
        model.use_channels_last()
    return model


def load_tae(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
             need_scaled: bool | None = None) -> TinyDecoder:
    """The decoder of a TAEHV checkpoint for Wan2.1 (.pth or .safetensors; `encoder.*` tensors are skipped).
    need_scaled None: true for LightX2V's lighttae files (by name), false otherwise."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tiny autoencoder checkpoint not found: {path}")
    sd = read_state_dict_file(path)
    cfg = TAEConfig.from_state_dict(sd, str(path))
    other = sorted(k for k in sd if not k.startswith(("decoder.", "encoder.")))
    if other:
        raise KeyError(f"{path}: not a TAEHV checkpoint: unexpected keys {other[:20]} ({len(other)} total)")
    if need_scaled is None:
        need_scaled = "lighttae" in path.name.lower()
    with torch.device("meta"):
        model = TinyDecoder(cfg, need_scaled=need_scaled)
    dec = {k: v for k, v in sd.items() if k.startswith("decoder.")}
    for g, _, stride in GROWS:  # a TGrow saved with more time outputs: its last ones (as TAEHV's loader)
        key = f"decoder.{g}.conv.weight"
        want = model.layer(g).conv.weight.shape[0]
        if key in dec and dec[key].shape[0] > want and dec[key].shape[0] % want == 0:
            dec[key] = dec[key][-want:]
    dec = {k: v.to(device=device, dtype=dtype) for k, v in dec.items()}
    assign_checked(model, dec, str(path))
    log.info("tiny autoencoder %s: widths %s, %s latents", path.name, cfg.widths,
             "raw (need_scaled)" if need_scaled else "normalized")
    return _place(model)


def random_tae(cfg: TAEConfig = TAEConfig(), device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               seed: int = 0, need_scaled: bool = False) -> TinyDecoder:
    """Deterministic random weights: conv weights N(0, 1/fan_in), biases N(0, 0.02^2)."""
    model = TinyDecoder(cfg, need_scaled=need_scaled).to(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.02, generator=gen)
            else:
                p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()), generator=gen)
    return _place(model.to(dtype=dtype))
