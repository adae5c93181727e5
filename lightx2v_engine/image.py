"""I2V input: image loading, Wan2.1's area-preserving target size, resize, and the conditioning mask.

Facts (Wan2.1 `wan/image2video.py`, LightX2V `WanRunner.run_vae_encoder` with resize_mode None):
- The image is read as RGB and mapped to [-1, 1] ((u8 / 255 - 0.5) / 0.5). As there, an alpha channel is
  dropped (not composited) and EXIF orientation is not applied (a phone photo stored sideways stays sideways).
- With max_area = target_h * target_w and a = h / w of the image:
  lat_h = round(sqrt(max_area * a) // 8 // 2 * 2), lat_w = round(sqrt(max_area / a) // 8 // 2 * 2).
- The [-1, 1] float image is resized to (lat_h * 8, lat_w * 8) with torch bicubic interpolation
  (align_corners=False, no antialias, on the CPU in fp32), NOT cropped and NOT clamped: the area rule keeps the
  aspect ratio up to the rounding to multiples of 16 px, which the resize absorbs by a slight stretch.
- CLIP gets the original (un-resized) image; only the VAE input uses this resized one.
"""
from __future__ import annotations

import io
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

VAE_STRIDE = (4, 8, 8)
PATCH_HW = 2

ImageInput = str | os.PathLike | Image.Image | torch.Tensor | bytes


def check_pil_mode(img: Image.Image) -> None:
    """ValueError for the PIL modes _pil_to_tensor does not take (32-bit float)."""
    if img.mode == "F":
        raise ValueError("32-bit float images (PIL mode F) are not supported: save the image as 8- or 16-bit")


def _pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB as Wan (`Image.open(...).convert("RGB")`; alpha dropped, EXIF orientation not applied), except
    16-bit grey (PIL modes I;16*; mode I read from a PNG or a PGM of maxval > 255, which Pillow scales to 16
    bits; another mode I image when it holds values above 255), which convert("RGB") clips to white: scaled
    to 8 bits (v / 257, rounded) first. 32-bit float images are an error."""
    check_pil_mode(img)
    if img.mode.startswith("I;16") or img.mode == "I":
        a = np.asarray(img).astype(np.float64)
        # (the file's bit depth where known: a dark 16-bit PGM, all values <= 255, was taken as 8-bit)
        if img.mode.startswith("I;16") or img.format in ("PNG", "PPM") or a.max(initial=0) > 255:
            a = a / 257
        img = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")
    arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return _uint8_chw_to_float(torch.from_numpy(arr.copy()).permute(2, 0, 1))


def _uint8_chw_to_float(x: torch.Tensor) -> torch.Tensor:
    # same op order as torchvision to_tensor + sub_(0.5).div_(0.5)
    return x.contiguous().to(torch.float32).div(255).sub_(0.5).div_(0.5)


def load_image(img: ImageInput) -> torch.Tensor:
    """Image path / encoded image bytes (PNG, JPEG, ...) / PIL image / tensor -> float32 [3, H, W] in [-1, 1].

    Tensors: [3, H, W] (or [1, 3, H, W]) uint8 in [0, 255] or float in [-1, 1] (not torchvision's [0, 1]:
    such a tensor is taken as [-1, 1], a washed-out image; map it with x * 2 - 1). Missing file ->
    FileNotFoundError, unreadable file -> ValueError, both naming the path.
    """
    if isinstance(img, (str, os.PathLike)):
        path = Path(img)
        if not path.is_file():
            raise FileNotFoundError(f"image file not found: {path}")
        try:  # (PIL's decompression-bomb limit applies)
            with Image.open(path) as im:
                im.load()
                return _pil_to_tensor(im)
        except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as e:
            raise ValueError(f"cannot read image file {path}: {e}") from e
    if isinstance(img, (bytes, bytearray)):
        try:  # (PIL's decompression-bomb limit applies)
            with Image.open(io.BytesIO(img)) as im:
                im.load()
                return _pil_to_tensor(im)
        except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as e:
            raise ValueError(f"cannot read the image data ({len(img)} bytes): {e}") from e
    if isinstance(img, Image.Image):
        return _pil_to_tensor(img)
    if isinstance(img, torch.Tensor):
        x = img.detach()
        if x.dim() == 4 and x.shape[0] == 1:
            x = x[0]
        if x.dim() != 3 or x.shape[0] != 3 or x.numel() == 0:
            raise ValueError(f"image tensor must be [3, H, W] (or [1, 3, H, W]) with H, W >= 1, got shape "
                             f"{tuple(img.shape)}")
        if x.device.type == "meta":
            raise ValueError("image tensor is on the meta device: it holds no values")
        if x.dtype == torch.uint8:
            return _uint8_chw_to_float(x)
        if not x.is_floating_point():
            raise ValueError(f"image tensor must be uint8 or float in [-1, 1], got dtype {x.dtype}")
        x = x.to(torch.float32)
        lo, hi = x.min().item(), x.max().item()
        if not (math.isfinite(lo) and math.isfinite(hi)) or lo < -1.0 - 1e-3 or hi > 1.0 + 1e-3:
            raise ValueError(f"float image tensor must be in [-1, 1], got range [{lo:.4g}, {hi:.4g}]")
        return x
    raise TypeError(f"image must be a path, encoded image bytes, PIL.Image or torch.Tensor, got "
                    f"{type(img).__name__}")


def i2v_latent_size(img_h: int, img_w: int, target_h: int, target_w: int) -> tuple[int, int]:
    """Wan2.1 I2V latent size (lat_h, lat_w): the image's aspect ratio at area target_h * target_w.

    lat_h = round(sqrt(A * h/w) // 8 // 2 * 2), lat_w = round(sqrt(A / (h/w)) // 8 // 2 * 2), A = target_h*target_w
    (float64 maths, floor divisions, like Wan). Both are even (patch 2); pixels are lat * 8.
    """
    for name, v in (("img_h", img_h), ("img_w", img_w), ("target_h", target_h), ("target_w", target_w)):
        if not (isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0):
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    aspect = img_h / img_w
    max_area = target_h * target_w
    lat_h = round(math.sqrt(max_area * aspect) // VAE_STRIDE[1] // PATCH_HW * PATCH_HW)
    lat_w = round(math.sqrt(max_area / aspect) // VAE_STRIDE[2] // PATCH_HW * PATCH_HW)
    if lat_h <= 0 or lat_w <= 0:
        raise ValueError(
            f"image aspect ratio {img_h}x{img_w} (H x W) is too extreme for target area {target_h}x{target_w}: "
            f"latent size would be {lat_h}x{lat_w}")
    return lat_h, lat_w


def prepare_i2v_image(img: ImageInput, target_h: int, target_w: int) -> torch.Tensor:
    """Loads the image and resizes it (bicubic, no crop, no clamp) to [3, lat_h*8, lat_w*8], fp32 CPU, ~[-1, 1]."""
    x = load_image(img).cpu()
    lat_h, lat_w = i2v_latent_size(x.shape[1], x.shape[2], target_h, target_w)
    size = (lat_h * VAE_STRIDE[1], lat_w * VAE_STRIDE[2])
    return F.interpolate(x[None], size=size, mode="bicubic")[0]


def i2v_mask(
    num_latent_frames: int,
    lat_h: int,
    lat_w: int,
    num_frames: int,
    last_frame: bool = False,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """I2V conditioning mask [4, F_lat, lat_h, lat_w].

    Pixel mask m[t] = 1 for t = 0 (and t = T-1 if last_frame, FLF2V), else 0; frame 0 is repeated 4x, giving
    T + 3 = 4 * F_lat entries, viewed as [F_lat, 4] and transposed to 4 channels. I2V: latent frame 0 is all 1,
    the rest 0. FLF2V additionally sets channel 3 of the last latent frame.
    """
    if not (isinstance(num_frames, int) and num_frames >= 1 and (num_frames - 1) % VAE_STRIDE[0] == 0):
        raise ValueError(f"num_frames must be 4k+1, got {num_frames!r}")
    expected = (num_frames - 1) // VAE_STRIDE[0] + 1
    if num_latent_frames != expected:
        raise ValueError(f"num_latent_frames must be (num_frames-1)/4+1 = {expected} for {num_frames} frames, "
                         f"got {num_latent_frames!r}")
    for name, v in (("lat_h", lat_h), ("lat_w", lat_w)):
        if not (isinstance(v, int) and v > 0):
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    pix = torch.zeros(num_frames + VAE_STRIDE[0] - 1, dtype=dtype)
    pix[: VAE_STRIDE[0]] = 1  # frame 0, repeated 4x
    if last_frame:
        pix[-1] = 1
    chan = pix.view(num_latent_frames, VAE_STRIDE[0]).t()  # [4, F_lat]
    return chan[:, :, None, None].expand(VAE_STRIDE[0], num_latent_frames, lat_h, lat_w).contiguous().to(device)
