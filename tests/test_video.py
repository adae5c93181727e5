import os

import numpy as np
import pytest
import torch

from lightx2v_engine.video import load_latents, read_mp4, save_latents, save_mp4, video_to_uint8


def _smooth_video(t=9, h=64, w=96):
    """A smooth moving gradient, uint8 [T, H, W, 3], not constant in any axis."""
    tt = np.linspace(0, 1, t)[:, None, None]
    yy = np.linspace(0, 1, h)[None, :, None]
    xx = np.linspace(0, 1, w)[None, None, :]
    r = 0.6 * xx + 0.4 * tt + 0 * yy
    g = 0.8 * yy + 0.2 * np.sin(np.pi * tt) + 0 * xx
    b = (1 - xx) * (0.3 + 0.5 * tt) + 0.2 * yy
    return (np.stack([r, g, b], -1) * 255).round().clip(0, 255).astype(np.uint8)


def _files(d):
    return sorted(os.listdir(d))


# ---------------------------------------------------------------- conversion

def test_video_to_uint8_values_and_layout():
    v = torch.tensor([-1.5, -1.0, -0.5, 0.0, 0.002, 0.5, 1.0, 2.0]).view(1, 1, 1, 8).expand(3, 2, 1, 8).clone()
    v[1] *= -1
    out = video_to_uint8(v)
    assert out.shape == (2, 1, 8, 3) and out.dtype == torch.uint8
    # round((x + 1) / 2 * 255) with clamping: -0.5 -> 63.75 -> 64, 0 -> 127.5 -> 128 (half to even),
    # 0.002 -> 127.755 -> 128, 0.5 -> 191.25 -> 191
    assert out[0, 0, :, 0].tolist() == [0, 0, 64, 128, 128, 191, 255, 255]
    assert out[1, 0, :, 1].tolist() == [255, 255, 191, 128, 127, 64, 0, 0]
    # layout: [3, T, H, W] -> [T, H, W, 3]
    x = torch.rand(3, 4, 5, 6, generator=torch.Generator().manual_seed(0)) * 2 - 1
    u = video_to_uint8(x[None])
    assert u.shape == (4, 5, 6, 3)
    ref = ((x.permute(1, 2, 3, 0).double() + 1) / 2 * 255).round().clamp(0, 255)
    assert torch.equal(u, ref.to(torch.uint8))
    ub = video_to_uint8(x.to(torch.bfloat16))
    assert ub.shape == u.shape and ub.dtype == torch.uint8
    assert (ub.int() - u.int()).abs().max() <= 1  # bf16 input rounding only


def test_video_to_uint8_bad():
    with pytest.raises(ValueError, match="shape"):
        video_to_uint8(torch.zeros(4, 2, 8, 8))
    with pytest.raises(ValueError, match="batch size 1"):
        video_to_uint8(torch.zeros(2, 3, 2, 8, 8))
    with pytest.raises(ValueError, match="float"):
        video_to_uint8(torch.zeros(3, 2, 8, 8, dtype=torch.uint8))
    nan = torch.zeros(3, 2, 8, 8)
    nan[1, 0, 2, :3] = float("nan")  # (written as black pixels before)
    with pytest.raises(ValueError, match="video has 3 NaN values"):
        video_to_uint8(nan)


# ---------------------------------------------------------------- mp4 round trip

@pytest.mark.parametrize("as_torch", [False, True])
def test_mp4_round_trip(tmp_path, as_torch):
    frames = _smooth_video()
    path = tmp_path / "sub" / "dir" / "out.mp4"  # parent dirs are created
    src = torch.from_numpy(frames) if as_torch else frames
    assert save_mp4(src, path, fps=16) == path
    assert path.is_file() and path.stat().st_size > 0
    assert _files(path.parent) == ["out.mp4"]  # no temp files left behind
    back = read_mp4(path)
    assert back.shape == frames.shape and back.dtype == np.uint8
    diff = np.abs(back.astype(np.int16) - frames.astype(np.int16))
    assert diff.mean() < 3.0, diff.mean()
    assert np.percentile(diff, 99) <= 12
    assert back.std() > 20  # not a constant video
    # frames differ over time in the decoded video too
    assert np.abs(back[-1].astype(int) - back[0].astype(int)).mean() > 10


def test_mp4_iterable_and_crf(tmp_path):
    frames = _smooth_video(t=5, h=32, w=48)
    p1, p2 = tmp_path / "a.mp4", tmp_path / "b.mp4"
    save_mp4((torch.from_numpy(f) for f in frames), p1, fps=24, crf=0)
    save_mp4(frames, p2, fps=24, crf=40)
    e1 = np.abs(read_mp4(p1).astype(int) - frames).mean()
    e2 = np.abs(read_mp4(p2).astype(int) - frames).mean()
    assert e1 < e2  # crf 0 is (near) lossless up to the yuv420p chroma subsampling
    assert read_mp4(p1).shape == frames.shape


def test_mp4_replaces_existing_file(tmp_path):
    path = tmp_path / "v.mp4"
    path.write_bytes(b"old")
    save_mp4(_smooth_video(t=1, h=16, w=16), path)
    assert read_mp4(path).shape == (1, 16, 16, 3)


# ---------------------------------------------------------------- atomicity and errors

@pytest.mark.parametrize("bad,match", [
    (np.zeros((3, 16, 16, 3), dtype=np.float32), "uint8"),
    (np.zeros((16, 16, 3), dtype=np.uint8), "shape"),
    (np.zeros((3, 16, 16, 4), dtype=np.uint8), "shape"),
    (np.zeros((0, 16, 16, 3), dtype=np.uint8), "at least one"),
    (np.zeros((3, 15, 16, 3), dtype=np.uint8), "even"),
    (np.zeros((3, 16, 17, 3), dtype=np.uint8), "even"),
    ([], "at least one"),
])
def test_mp4_bad_frames_leave_no_file(tmp_path, bad, match):
    path = tmp_path / "x.mp4"
    with pytest.raises(ValueError, match=match):
        save_mp4(bad, path)
    assert _files(tmp_path) == []


def test_mp4_odd_size_error_names_size(tmp_path):
    with pytest.raises(ValueError, match="15x16"):
        save_mp4(np.zeros((2, 15, 16, 3), dtype=np.uint8), tmp_path / "o.mp4")


def test_mp4_exception_midway_leaves_no_file(tmp_path):
    frames = _smooth_video(t=6, h=32, w=32)

    def gen():
        yield frames[0]
        yield frames[1]
        raise RuntimeError("decoder crashed")

    path = tmp_path / "mid.mp4"
    with pytest.raises(RuntimeError, match="decoder crashed"):
        save_mp4(gen(), path)
    assert _files(tmp_path) == []
    # a frame of the wrong size mid-way
    with pytest.raises(ValueError, match="frame 2"):
        save_mp4([frames[0], frames[1], frames[2, :16]], path)
    assert _files(tmp_path) == []
    # an existing file is left untouched by a failing write
    path.write_bytes(b"previous")
    with pytest.raises(RuntimeError):
        save_mp4(gen(), path)
    assert path.read_bytes() == b"previous"
    assert _files(tmp_path) == ["mid.mp4"]


_EXIT_WHILE_WRITING = """
import os, sys, numpy as np
from lightx2v_engine import server, video
def children():  # this process's ffmpeg (its child, found in /proc)
    for d in os.listdir("/proc"):
        try:
            if d.isdigit() and open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1] == str(os.getpid()):
                yield d
        except OSError:
            pass
def frames():
    for i in range(40):
        if i == 3:  # ffmpeg is running, the temporary file exists: the server's forced stop (os._exit)
            print(*children(), flush=True)
            server._exit_now(0)
        yield np.full((16, 16, 3), i, np.uint8)
video.save_mp4(frames(), sys.argv[1])
"""


def test_a_forced_exit_while_writing_leaves_no_temporary_file_or_ffmpeg(tmp_path):
    """The server's forced stop (os._exit, when the running task does not stop within 5 s) skipped
    atomic_path's clean-up: a task writing its video left its .tmp.mp4 file, and ffmpeg ran on."""
    import subprocess
    import sys
    import time
    out = tmp_path / "v.mp4"
    res = subprocess.run([sys.executable, "-c", _EXIT_WHILE_WRITING, str(out)], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    (pid,) = map(int, res.stdout.split())
    time.sleep(0.5)  # (an orphan that ran on would be writing now)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    try:
        os.kill(pid, 0)
        alive = open(f"/proc/{pid}/stat").read().split()[2] != "Z"
    except (ProcessLookupError, FileNotFoundError):
        alive = False
    assert not alive, f"ffmpeg {pid} still runs"


def test_mp4_bad_params(tmp_path):
    f = _smooth_video(t=1, h=16, w=16)
    with pytest.raises(ValueError, match="crf"):
        save_mp4(f, tmp_path / "a.mp4", crf=60)
    with pytest.raises(ValueError, match="fps"):
        save_mp4(f, tmp_path / "a.mp4", fps=0)
    for bad in (dict(fps=True), dict(fps=float("inf")), dict(crf=True), dict(crf=18.0)):
        with pytest.raises(ValueError, match="fps" if "fps" in bad else "crf"):
            save_mp4(f, tmp_path / "a.mp4", **bad)
    assert _files(tmp_path) == []


def test_mp4_numpy_scalars(tmp_path):
    """fps / crf as numpy scalars (read from arrays, configs) are numbers like any other (were refused with
    'fps must be > 0, got np.int64(16)')."""
    path = save_mp4(_smooth_video(t=2, h=16, w=16), tmp_path / "a.mp4", fps=np.int64(8), crf=np.int64(20))
    assert len(read_mp4(path)) == 2
    save_mp4(_smooth_video(t=2, h=16, w=16), tmp_path / "b.mp4", fps=np.float32(12.5))


def test_ffmpeg_failure_leaves_no_file(tmp_path):
    # an invalid x264 preset makes ffmpeg itself fail: an OSError (the CLI's one-line errors) with its message
    from lightx2v_engine.video import VideoWriteError
    with pytest.raises(VideoWriteError, match="ffmpeg failed"):
        save_mp4(_smooth_video(t=2, h=16, w=16), tmp_path / "f.mp4", preset="no-such-preset")
    assert issubclass(VideoWriteError, OSError)
    assert _files(tmp_path) == []


@pytest.mark.parametrize("ext, brand", [(".mov", b"qt  "), (".mkv", b"\x1aE\xdf\xa3"), (".M4V", b"ftyp")])
def test_container_follows_the_extension(tmp_path, ext, brand):
    """.mov is a QuickTime file, .mkv Matroska, .m4v (any case) an mp4; each holds the .mp4's video stream
    (decoded: the same frames)."""
    frames = _smooth_video(t=3, h=16, w=32)
    path = save_mp4(frames, tmp_path / f"v{ext}")
    head = path.read_bytes()[:12]
    assert (head[:4] == brand) if ext == ".mkv" else (head[4:8] == b"ftyp" and (brand == b"ftyp" or head[8:12] == brand)), head
    assert np.array_equal(read_mp4(path), read_mp4(save_mp4(frames, tmp_path / "ref.mp4")))


@pytest.mark.parametrize("name", ["v.gif", "v.webm", "video"])
def test_other_extensions_are_an_error_before_encoding(tmp_path, name):
    from lightx2v_engine.video import check_video_file
    with pytest.raises(ValueError, match=r"\.mp4, \.m4v, \.mov, \.mkv"):
        check_video_file(tmp_path / name, "--save_result_path")
    with pytest.raises(ValueError, match="extension" if "." in name else "no extension"):
        save_mp4(_smooth_video(t=1, h=16, w=16), tmp_path / name)
    assert _files(tmp_path) == []


def test_missing_ffmpeg_is_found_before_a_run(tmp_path, monkeypatch):
    from lightx2v_engine.video import VideoWriteError, check_video_file
    check_video_file(tmp_path / "ok.mp4", "--save_result_path")
    monkeypatch.setenv("IMAGEIO_FFMPEG_EXE", str(tmp_path / "no-ffmpeg"))
    with pytest.raises(VideoWriteError, match="no-ffmpeg.*does not exist"):
        check_video_file(tmp_path / "ok.mp4", "--save_result_path")


def test_ffmpeg_by_bare_name_is_looked_up_on_path(tmp_path, monkeypatch):
    """IMAGEIO_FFMPEG_EXE=ffmpeg (and imageio-ffmpeg without a binary of its own) give a bare name that
    Popen finds on PATH: the pre-run check looks there too (it refused a working ffmpeg)."""
    import imageio_ffmpeg
    from lightx2v_engine.video import VideoWriteError, check_video_file
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    os.symlink(imageio_ffmpeg.get_ffmpeg_exe(), bin_dir / "my-ffmpeg")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.setenv("IMAGEIO_FFMPEG_EXE", "my-ffmpeg")
    check_video_file(tmp_path / "ok.mp4", "--save_result_path")
    assert len(read_mp4(save_mp4(_smooth_video(t=2, h=16, w=16), tmp_path / "ok.mp4"))) == 2
    monkeypatch.setenv("IMAGEIO_FFMPEG_EXE", "no-such-ffmpeg")
    with pytest.raises(VideoWriteError, match="no-such-ffmpeg.*does not exist"):
        check_video_file(tmp_path / "ok.mp4", "--save_result_path")


def test_ffmpeg_starts_with_signals_deliverable():
    """The interrupt guard around ffmpeg's start must not reach ffmpeg: a signal mask is inherited through
    exec (ffmpeg ignored SIGTERM and SIGINT for its whole life, a process-group stop left it running); a
    SIGTERM arriving during the start is delivered after it, to the handler set before."""
    import signal
    import subprocess
    from lightx2v_engine.video import _signals_held
    seen = []
    old = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    proc = None
    try:
        with _signals_held():
            proc = subprocess.Popen(["sleep", "30"])
            with open(f"/proc/{proc.pid}/status") as f:
                blocked = [int(line.split()[1], 16) for line in f if line.startswith("SigBlk:")]
            os.kill(os.getpid(), signal.SIGTERM)  # during the start: held back until the block ends
            assert seen == []
        assert seen == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, old)
        if proc is not None:
            proc.terminate()  # (a child with SIGTERM blocked would not end here)
            assert proc.wait(timeout=10) == -signal.SIGTERM
    assert blocked and blocked[0] & ((1 << (signal.SIGTERM - 1)) | (1 << (signal.SIGINT - 1))) == 0, hex(blocked[0])


def test_both_signals_held_during_the_start_are_delivered():
    """Ctrl-C and SIGTERM both arriving during ffmpeg's start: each reaches its handler afterwards (the first
    handler's KeyboardInterrupt lost the second signal)."""
    import signal
    from lightx2v_engine.video import _signals_held
    seen = []

    def on_term(signum, frame):
        seen.append(signum)
    old = signal.signal(signal.SIGTERM, on_term)
    old_int = signal.signal(signal.SIGINT, signal.default_int_handler)  # (whatever an earlier test left)
    try:
        with pytest.raises(KeyboardInterrupt):
            with _signals_held():
                os.kill(os.getpid(), signal.SIGINT)
                os.kill(os.getpid(), signal.SIGTERM)
        assert seen == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, old)
        signal.signal(signal.SIGINT, old_int)


def test_read_mp4_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.mp4"):
        read_mp4(tmp_path / "missing.mp4")


# ---------------------------------------------------------------- latents

def test_latents_round_trip(tmp_path):
    lat = torch.randn(16, 3, 4, 6, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    meta = {"seed": 42, "prompt": "a cat", "timesteps": [1000.0, 937.5], "shift": 5.0}
    path = tmp_path / "d" / "lat.safetensors"
    save_latents(lat, path, meta)
    back, m = load_latents(path)
    assert back.dtype == torch.bfloat16 and torch.equal(back, lat)
    assert m == meta
    assert _files(path.parent) == ["lat.safetensors"]


def test_latents_failures_leave_no_file(tmp_path):
    path = tmp_path / "lat.safetensors"
    with pytest.raises(TypeError):
        save_latents(torch.zeros(2), path, {"bad": object()})  # not JSON-serialisable
    with pytest.raises(TypeError):
        save_latents(np.zeros(2), path)
    assert _files(tmp_path) == []
    with pytest.raises(FileNotFoundError, match="lat.safetensors"):
        load_latents(path)


def test_check_output_file_names_what_cannot_be_written(tmp_path):
    """check_output_file (the CLI's and the server's check before a run): a folder, a path through a file, a
    read-only folder and an over-long name are ValueErrors naming the flag; new folders are fine."""
    import os
    from lightx2v_engine.video import check_output_file
    (tmp_path / "file").write_bytes(b"x")
    check_output_file(tmp_path / "new" / "sub" / "v.mp4", "--out")
    with pytest.raises(ValueError, match="--out .* is a directory"):
        check_output_file(tmp_path, "--out")
    with pytest.raises(ValueError, match=r"--out .*: .*file is a file, not a folder"):
        check_output_file(tmp_path / "file" / "deeper" / "v.mp4", "--out")
    with pytest.raises(ValueError, match="not a usable path"):
        check_output_file(tmp_path / ("a" * 5000), "--out")
    # a name the file system takes but the temporary file beside it would not (255 bytes at most)
    with pytest.raises(ValueError, match="the file name has 240 bytes; at most 235"):
        check_output_file(tmp_path / ("b" * 236 + ".mp4"), "--out")
    check_output_file(tmp_path / ("b" * 231 + ".mp4"), "--out")  # (the .safetensors budget refused it before)
    fd = os.open(tmp_path / ("." + "b" * 231 + ".mp4.12345678.tmp.mp4"), os.O_CREAT | os.O_WRONLY)
    os.close(fd)  # (atomic_path's temporary name for it fits)
    save_latents_ok = tmp_path / ("c" * 215 + ".safetensors")  # 227 bytes: its temporary name fits
    check_output_file(save_latents_ok, "--out")
    fd = os.open(tmp_path / ("." + save_latents_ok.name + ".12345678.tmp.safetensors"), os.O_CREAT | os.O_WRONLY)
    os.close(fd)
    ro = tmp_path / "ro"
    ro.mkdir()
    from lightx2v_engine import video
    real = os.access  # (a permission check root would pass: the folder is reported read-only instead)
    video.os.access = lambda p, mode: False if os.fspath(p) == os.fspath(ro) else real(p, mode)
    try:
        with pytest.raises(ValueError, match="ro is not writable"):
            check_output_file(ro / "new" / "v.mp4", "--out")
    finally:
        video.os.access = real


def test_saved_files_get_the_umask_permissions_without_touching_the_umask(tmp_path, monkeypatch):
    """The final file gets 0o666 & ~umask, read without setting the umask (which would, for a moment, apply
    to files that other threads create)."""
    import os
    from lightx2v_engine import video
    old = os.umask(0o027)
    try:
        calls = []
        real = os.umask
        monkeypatch.setattr(video.os, "umask", lambda m: calls.append(m) or real(m))
        save_mp4(_smooth_video(t=1, h=16, w=16), tmp_path / "v.mp4")
        if os.path.exists("/proc/self/status"):
            assert calls == []
    finally:
        os.umask(old)
    assert (tmp_path / "v.mp4").stat().st_mode & 0o777 == 0o640


def test_output_without_frames_says_why(tmp_path):
    """Ranks > 0 of a multi-GPU run get Output.frames None: save() says so (was an AttributeError on None)."""
    from lightx2v_engine.pipeline import Output, Timings
    out = Output(frames=None, latents=torch.zeros(16, 1, 2, 2), timings=Timings())
    with pytest.raises(RuntimeError, match="rank 0"):
        out.save(tmp_path / "a.mp4")
    assert _files(tmp_path) == []
