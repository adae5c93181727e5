import io
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from lightx2v_engine.image import i2v_latent_size, i2v_mask, load_image, prepare_i2v_image


def _gradient_rgb(h, w):
    y = np.linspace(0, 255, h)[:, None]
    x = np.linspace(0, 255, w)[None, :]
    return np.stack([np.broadcast_to(x, (h, w)), np.broadcast_to(y, (h, w)), (x + y) / 2], -1).round().astype(np.uint8)


# ---------------------------------------------------------------- size rule

@pytest.mark.parametrize("img_hw,target,expected", [
    # hand-computed: A = 480*832 = 399360; lat = floor(floor(sqrt(A*a)/8)/2)*2
    ((512, 512), (480, 832), (78, 78)),      # sqrt(399360) = 631.95 -> 78 -> 39 -> 78
    ((720, 1280), (480, 832), (58, 104)),    # sqrt(224640) = 473.96 -> 59 -> 29 -> 58; sqrt(709973.3) = 842.6 -> 104
    ((832, 480), (480, 832), (104, 60)),     # sqrt(692224) = 832 -> 104; sqrt(230400) = 480 -> 60
    ((1000, 750), (480, 832), (90, 68)),     # sqrt(532480) = 729.7 -> 91 -> 90; sqrt(299520) = 547.3 -> 68
    ((720, 1280), (720, 1280), (90, 160)),   # 0.5625 exact: sqrt(518400) = 720 -> 90; sqrt(1638400) = 1280 -> 160
    # Wan quirk: 399360 * (480/832) = 230399.99999999997 in float64 -> sqrt just below 480 -> 58, not 60
    ((480, 832), (480, 832), (58, 104)),
])
def test_i2v_latent_size(img_hw, target, expected):
    assert i2v_latent_size(*img_hw, *target) == expected
    lat_h, lat_w = expected
    assert lat_h % 2 == 0 and lat_w % 2 == 0


def test_i2v_latent_size_matches_wan_numpy_expression():
    # the public Wan2.1 expression written with numpy, for many aspect ratios
    for h in range(200, 2200, 97):
        for w in range(200, 2200, 131):
            for th, tw in ((480, 832), (720, 1280)):
                a, area = h / w, th * tw
                ref = (round(np.sqrt(area * a) // 8 // 2 * 2), round(np.sqrt(area / a) // 8 // 2 * 2))
                assert i2v_latent_size(h, w, th, tw) == ref


@pytest.mark.parametrize("args", [(0, 10, 480, 832), (10, 10, -480, 832), (10.5, 10, 480, 832), (1, 100000, 480, 832)])
def test_i2v_latent_size_bad(args):
    with pytest.raises(ValueError):
        i2v_latent_size(*args)


# ---------------------------------------------------------------- loading and resize

def test_load_image_file_pil_tensor(tmp_path):
    rgb = _gradient_rgb(30, 40)
    p = tmp_path / "img.png"
    Image.fromarray(rgb).save(p)
    x = load_image(p)
    assert x.shape == (3, 30, 40) and x.dtype == torch.float32
    ref = torch.from_numpy(rgb).permute(2, 0, 1).double() / 255 * 2 - 1
    torch.testing.assert_close(x.double(), ref, rtol=0, atol=1e-6)
    assert x.min() == -1 and x.max() == 1
    torch.testing.assert_close(load_image(str(p)), x)
    # RGBA / grayscale PIL images become RGB
    torch.testing.assert_close(load_image(Image.fromarray(rgb).convert("RGBA")), x)
    g = load_image(Image.fromarray(rgb[..., 0]))
    assert g.shape == (3, 30, 40) and torch.equal(g[0], g[1])
    # tensors: uint8 CHW and float [-1, 1]
    torch.testing.assert_close(load_image(torch.from_numpy(rgb).permute(2, 0, 1)), x)
    torch.testing.assert_close(load_image(x[None] * 0.5), x * 0.5)
    # an empty or meta tensor: a ValueError naming it (a reduction's RuntimeError before)
    for bad, match in ((torch.zeros(3, 0, 48), r"with H, W >= 1, got shape \(3, 0, 48\)"),
                       (torch.zeros(3, 8, 8, device="meta"), "meta device")):
        with pytest.raises(ValueError, match=match):
            load_image(bad)


def test_load_image_16bit_grey_is_scaled_not_clipped(tmp_path):
    """A 16-bit grey PNG (PIL mode I;16; I when held as 32-bit ints) was clipped to white by convert("RGB"):
    now v / 257 rounded, the 8-bit image it stands for."""
    g16 = (np.arange(30 * 40, dtype=np.float64).reshape(30, 40) / (30 * 40 - 1) * 65535).astype(np.uint16)
    p = tmp_path / "g16.png"
    Image.fromarray(g16).save(p)
    with Image.open(p) as im:
        assert im.mode.startswith("I;16")  # (what Pillow opens a 16-bit grey PNG as)
    g8 = np.rint(g16 / 257).astype(np.uint8)
    ref = load_image(Image.fromarray(g8))
    torch.testing.assert_close(load_image(p), ref, rtol=0, atol=0)
    assert abs(load_image(Image.fromarray(np.full((4, 4), 32768, np.uint16))).mean().item()) < 0.01
    torch.testing.assert_close(load_image(Image.fromarray(g16.astype(np.int32), "I")), ref, rtol=0, atol=0)
    small = np.full((4, 4), 200, np.int32)  # mode I holding 8-bit values: taken as they are
    torch.testing.assert_close(load_image(Image.fromarray(small, "I")), load_image(Image.fromarray(small.astype(np.uint8))))
    with pytest.raises(ValueError, match="mode F"):
        load_image(Image.fromarray(np.zeros((4, 4), np.float32), "F"))
    # a dark 16-bit PGM (maxval 65535, opened as mode I, every value <= 255): 16-bit by its file, not taken
    # as 8-bit values (up to 257 times too bright, and the whole image jumping when one pixel passed 255)
    dark = np.array([[100, 255, 0, 7]], dtype=np.uint16)
    pgm = b"P5 4 1 65535\n" + dark.astype(">u2").tobytes()
    with Image.open(io.BytesIO(pgm)) as im:
        assert im.mode == "I" and im.format == "PPM"
    expected = load_image(Image.fromarray(np.rint(dark / 257).astype(np.uint8)))
    torch.testing.assert_close(load_image(pgm), expected, rtol=0, atol=0)


def test_load_image_errors(tmp_path):
    missing = tmp_path / "nope.png"
    with pytest.raises(FileNotFoundError, match="nope.png"):
        load_image(missing)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"this is not an image")
    with pytest.raises(ValueError, match="bad.jpg"):
        load_image(bad)
    with pytest.raises(FileNotFoundError):
        load_image(tmp_path)  # a directory is not an image file
    # a decompression bomb (a PNG header claiming 20000 x 20000 pixels) from a file, as from bytes
    import struct
    import zlib
    ihdr = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)
    chunk = lambda kind, data: (struct.pack(">I", len(data)) + kind + data
                                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    bomb = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")
    (tmp_path / "bomb.png").write_bytes(bomb)
    with pytest.raises(ValueError, match="bomb.png.*decompression bomb"):
        load_image(tmp_path / "bomb.png")
    with pytest.raises(ValueError, match="decompression bomb"):
        load_image(bomb)
    with pytest.raises(ValueError, match="range"):
        load_image(torch.full((3, 4, 4), 255.0))
    with pytest.raises(ValueError, match="shape"):
        load_image(torch.zeros(4, 4, 3))
    with pytest.raises(ValueError, match="dtype"):
        load_image(torch.zeros(3, 4, 4, dtype=torch.int32))
    with pytest.raises(TypeError):
        load_image(np.zeros((3, 4, 4)))


def test_prepare_i2v_image_bicubic_no_crop():
    rgb = _gradient_rgb(720, 1280)
    out = prepare_i2v_image(Image.fromarray(rgb), 480, 832)
    assert out.shape == (3, 464, 832) and out.dtype == torch.float32
    # independent reference: Wan's own steps (to_tensor -> [-1, 1] -> F.interpolate bicubic on the whole image)
    x = torch.from_numpy(rgb).permute(2, 0, 1).float().div(255).sub(0.5).div(0.5)
    ref = F.interpolate(x[None], size=(464, 832), mode="bicubic")[0]
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    # no crop: the corners of the gradient are preserved (red = x ramp, green = y ramp)
    assert out[0, :, 0].max() < -0.99 and out[0, :, -1].min() > 0.99
    assert out[1, 0, :].max() < -0.99 and out[1, -1, :].min() > 0.99


def test_prepare_i2v_image_portrait_size(tmp_path):
    p = tmp_path / "p.jpg"
    Image.fromarray(_gradient_rgb(1000, 750)).save(p)
    out = prepare_i2v_image(p, 480, 832)
    assert out.shape == (3, 90 * 8, 68 * 8)


# ---------------------------------------------------------------- mask

def _wan_mask(num_frames, lat_h, lat_w, last=False):
    """The reference construction (wan21.md §5): pixel mask, frame 0 repeated 4x, view, transpose."""
    msk = torch.ones(1, num_frames, lat_h, lat_w)
    if last:
        msk[:, 1:-1] = 0
    else:
        msk[:, 1:] = 0
    msk = torch.concat([torch.repeat_interleave(msk[:, 0:1], repeats=4, dim=1), msk[:, 1:]], dim=1)
    msk = msk.view(1, msk.shape[1] // 4, 4, lat_h, lat_w)
    return msk.transpose(1, 2)[0]


@pytest.mark.parametrize("num_frames", [1, 5, 21, 81])
def test_i2v_mask_layout(num_frames):
    f_lat = (num_frames - 1) // 4 + 1
    m = i2v_mask(f_lat, 6, 10, num_frames)
    assert m.shape == (4, f_lat, 6, 10) and m.dtype == torch.float32
    assert torch.all(m[:, 0] == 1)
    assert torch.all(m[:, 1:] == 0)
    assert torch.equal(m, _wan_mask(num_frames, 6, 10))


def test_i2v_mask_last_frame_flf2v():
    m = i2v_mask(21, 4, 6, 81, last_frame=True)
    assert torch.equal(m, _wan_mask(81, 4, 6, last=True))
    assert torch.all(m[:, 0] == 1) and torch.all(m[:3, -1] == 0) and torch.all(m[3, -1] == 1)
    assert torch.all(m[:, 1:-1] == 0)


def test_i2v_mask_dtype_device():
    m = i2v_mask(2, 2, 2, 5, dtype=torch.bfloat16, device="cpu")
    assert m.dtype == torch.bfloat16 and m.is_contiguous()


@pytest.mark.parametrize("args,match", [((21, 4, 4, 80), "num_frames"), ((20, 4, 4, 81), "num_latent_frames"),
                                        ((21, 0, 4, 81), "lat_h"), ((21, 4, 3.0, 81), "lat_w")])
def test_i2v_mask_bad(args, match):
    with pytest.raises(ValueError, match=match):
        i2v_mask(*args)
