"""Video output: decoded video -> uint8 frames -> H.264 video, .mp4/.m4v, .mov or .mkv by extension (atomic),
plus latent dumps.

Every writer here is atomic: it writes a temp file in the target directory and `os.replace`s it into place,
so `path` either holds a complete file or is untouched (on failure the temp file is removed). The container
follows the file's extension (VIDEO_CONTAINERS: .mp4/.m4v, .mov, .mkv; any other is an error, not an mp4
under another name).
"""
from __future__ import annotations

import json
import math
import numbers
import os
import shutil
import signal
import subprocess
import tempfile
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch

Frames = np.ndarray | torch.Tensor


def video_to_uint8(video: torch.Tensor) -> torch.Tensor:
    """[3, T, H, W] or [1, 3, T, H, W] float in [-1, 1] -> uint8 [T, H, W, 3] (on the input's device).

    round(clamp((x + 1) / 2, 0, 1) * 255), computed in fp32.
    """
    if not isinstance(video, torch.Tensor):
        raise TypeError(f"video must be a torch.Tensor, got {type(video).__name__}")
    if video.dim() == 5:
        if video.shape[0] != 1:
            raise ValueError(f"batched video must have batch size 1, got shape {tuple(video.shape)}")
        video = video[0]
    if video.dim() != 4 or video.shape[0] != 3:
        raise ValueError(f"video must be [3, T, H, W] or [1, 3, T, H, W], got shape {tuple(video.shape)}")
    if not video.is_floating_point():
        raise ValueError(f"video must be a float tensor in [-1, 1], got dtype {video.dtype}")
    nans = int(torch.isnan(video).sum())  # (clamp and the uint8 cast would write them as black pixels)
    if nans:
        raise ValueError(f"video has {nans} NaN values (of {video.numel()})")
    x = video.to(torch.float32, copy=True).add_(1.0).mul_(0.5).clamp_(0.0, 1.0).mul_(255.0).round_()  # one fp32 copy
    return x.to(torch.uint8).permute(1, 2, 3, 0).contiguous()


def _to_numpy_frame(f: Frames) -> np.ndarray:
    if isinstance(f, torch.Tensor):
        f = f.detach().cpu().numpy()
    return np.asarray(f)


def _check_frame(f: np.ndarray, hw: tuple[int, int] | None, what: str) -> None:
    if f.dtype != np.uint8:
        raise ValueError(f"{what} must be uint8 (use video_to_uint8), got dtype {f.dtype}")
    if f.ndim != 3 or f.shape[2] != 3:
        raise ValueError(f"{what} must be [H, W, 3] RGB, got shape {f.shape}")
    if hw is not None and f.shape[:2] != hw:
        raise ValueError(f"{what} has size {f.shape[:2]}, expected {hw} like the first frame")


def _frame_stream(frames: Frames | Iterable[Frames]) -> tuple[tuple[int, int], Iterator[np.ndarray]]:
    """Validates the first frame (or the whole array) eagerly; returns (H, W) and an iterator of frames."""
    if isinstance(frames, (np.ndarray, torch.Tensor)):
        arr = _to_numpy_frame(frames)
        if arr.ndim != 4 or arr.shape[-1] != 3:
            raise ValueError(f"frames must be uint8 [T, H, W, 3], got shape {arr.shape}")
        if arr.dtype != np.uint8:
            raise ValueError(f"frames must be uint8 [T, H, W, 3] (use video_to_uint8), got dtype {arr.dtype}")
        if arr.shape[0] == 0:
            raise ValueError("frames must contain at least one frame, got T = 0")
        it: Iterator[np.ndarray] = iter(arr)
    else:
        it = (_to_numpy_frame(f) for f in frames)
    try:
        first = next(it)
    except StopIteration:
        raise ValueError("frames must contain at least one frame, got none") from None
    _check_frame(first, None, "frame 0")
    h, w = first.shape[:2]
    if h % 2 or w % 2:
        raise ValueError(f"H.264 yuv420p needs even frame height and width, got {h}x{w} (H x W)")

    def chain() -> Iterator[np.ndarray]:
        yield first
        for i, f in enumerate(it, start=1):
            _check_frame(f, (h, w), f"frame {i}")
            yield f

    return (h, w), chain()


# a file name's bytes (ext4 and most others: 255) less what atomic_path's temporary name adds (".", ".",
# 8 random characters, ".tmp": 14, and the name's own suffix again), with 2 to spare
def _max_name(name: str) -> int:
    return 255 - 16 - len(os.fsencode(Path(name).suffix))


# extension -> ffmpeg muxer; every one takes H.264 yuv420p
VIDEO_CONTAINERS = {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".mkv": "matroska"}


class VideoWriteError(OSError):
    """ffmpeg could not write the video (its own message included)."""


def video_container(path: str | os.PathLike, what: str = "video path") -> str:
    """The ffmpeg muxer for `path`'s extension; ValueError naming the accepted extensions otherwise."""
    ext = Path(path).suffix.lower()
    if ext not in VIDEO_CONTAINERS:
        raise ValueError(f"{what} {str(path)!r}: the video is H.264 in one of {', '.join(VIDEO_CONTAINERS)}; "
                         f"got {('extension ' + repr(ext)) if ext else 'no extension'}")
    return VIDEO_CONTAINERS[ext]


def check_video_file(path: str | os.PathLike, what: str) -> None:
    """check_output_file, plus a video container the extension names and an ffmpeg that exists (checked
    before a run: a bad path or a missing encoder must not cost the generated video)."""
    check_output_file(path, what)
    video_container(path, what)
    check_ffmpeg(what)


def check_ffmpeg(what: str) -> None:
    """VideoWriteError naming `what` when the ffmpeg that writes videos does not exist or cannot run."""
    exe = _ffmpeg_exe()
    if not os.path.dirname(exe):  # a bare name (IMAGEIO_FFMPEG_EXE=ffmpeg, imageio-ffmpeg's fallback): on PATH
        exe = shutil.which(exe) or exe
    if not (os.path.isfile(exe) and os.access(exe, os.X_OK)):
        raise VideoWriteError(f"{what}: the ffmpeg executable {exe!r} does not exist or is not executable "
                              f"(IMAGEIO_FFMPEG_EXE, or the imageio-ffmpeg package's binary)")


def check_output_file(path: str | os.PathLike, what: str) -> None:
    """ValueError naming `what` when no file can be written at `path`: it is a folder, a component of its
    folder is a file, or the nearest existing folder is not writable (checked before a run, not after it)."""
    p = Path(path)
    try:
        if p.is_dir():
            raise ValueError(f"{what} {str(path)!r} is a directory: give a file name")
        folder = p.absolute().parent
        while not folder.exists() and folder != folder.parent:  # (a path through a file does not exist either)
            if os.path.lexists(folder):  # a link to nothing (or a loop of links): mkdir would fail on it
                raise ValueError(f"{what} {str(path)!r}: {folder} is a symbolic link to nothing "
                                 f"(-> {os.readlink(folder)!r})")
            folder = folder.parent
    except OSError as e:  # too long a name
        raise ValueError(f"{what} {str(path)[:200]!r}: not a usable path ({e.strerror})") from None
    if not folder.is_dir():
        raise ValueError(f"{what} {str(path)!r}: {folder} is a file, not a folder")
    if len(os.fsencode(p.name)) > _max_name(p.name):  # (the temporary file beside it has a longer name)
        raise ValueError(f"{what} {str(path)[:200]!r}: the file name has {len(os.fsencode(p.name))} bytes; at most "
                         f"{_max_name(p.name)} (the file system's 255, less the temporary file's additions)")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {str(path)!r}: the folder {folder} is not writable")
    try:  # (os.access says yes to root everywhere, also on a read-only or special file system: /proc)
        fd, probe = tempfile.mkstemp(prefix=".lx2v-write-probe.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ValueError(f"{what} {str(path)!r}: cannot write in the folder {folder} ({e.strerror})") from None


def _process_umask() -> int:
    """The process's umask, read without changing it where Linux tells it (/proc/self/status): setting it
    to read it would, for that moment, apply to files other threads create."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    umask = os.umask(0)
    os.umask(umask)
    return umask


# the temporary files of the atomic_path blocks under way, and the ffmpeg processes writing videos (any thread):
# a process that ends with os._exit (the server's forced stop) skips their clean-up, and
# remove_temporary_files() does it instead
_LIVE_TEMPORARY: set[Path] = set()
_LIVE_FFMPEG: set[subprocess.Popen] = set()


def remove_temporary_files() -> None:
    """Kills the ffmpeg processes still writing videos and deletes the temporary files of the atomic_path
    blocks still under way (before an os._exit)."""
    for proc in list(_LIVE_FFMPEG):
        try:
            proc.kill()
            proc.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            pass
    for p in list(_LIVE_TEMPORARY):
        try:
            p.unlink(missing_ok=True)
        except OSError:
            pass


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str) -> Iterator[Path]:
    """Yields a temp path next to `path`; on success moves it to `path`, on any failure deletes it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = None
    try:  # (the temp file's creation too: an interrupt right after it must not leave it behind)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
        tmp_path = Path(tmp)
        _LIVE_TEMPORARY.add(tmp_path)
        os.close(fd)
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_process_umask())  # mkstemp creates 0600; give the final file normal permissions
        os.replace(tmp_path, path)
    except BaseException:
        if tmp_path is not None:
            tmp_path.unlink(missing_ok=True)
        raise
    finally:
        _LIVE_TEMPORARY.discard(tmp_path)


@contextmanager
def _signals_held():
    """SIGINT and SIGTERM deferred to the end of the block in the main thread: Python-level handlers note
    them, the old handlers come back and the noted signals are raised again after it. (Not the signal
    mask: a child inherits a blocked mask through exec - ffmpeg ignored SIGTERM and SIGINT for its whole
    life - while caught signals are reset to their defaults there.) Elsewhere nothing changes: Python runs
    signal handlers in the main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    noted: list[int] = []
    old = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(sig)
        if handler is None or handler == signal.SIG_IGN:  # not set from Python / ignored: left as it is
            continue
        old[sig] = handler
        signal.signal(sig, lambda signum, frame: noted.append(signum))
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        first = None
        for signum in dict.fromkeys(noted):  # each one delivered, also after one raised (Ctrl-C + SIGTERM)
            try:
                signal.raise_signal(signum)
            except BaseException as e:  # noqa: BLE001 - re-raised below, after the others
                first = first or e
        if first is not None:
            raise first


def _ffmpeg_exe() -> str:
    import imageio_ffmpeg

    try:
        return imageio_ffmpeg.get_ffmpeg_exe()
    except RuntimeError as e:  # no binary found
        raise VideoWriteError(f"no ffmpeg executable: {e}") from None


def save_mp4(
    frames: Frames | Iterable[Frames],
    path: str | os.PathLike,
    fps: float = 16,
    crf: int = 18,
    preset: str = "medium",
) -> Path:
    """Encodes uint8 RGB frames [T, H, W, 3] (numpy/torch, or an iterable of [H, W, 3]) as H.264 yuv420p in
    the container `path`'s extension names (VIDEO_CONTAINERS; .mp4 usually).

    crf: x264 constant rate factor (0 lossless .. 51 worst; 18 ~ visually lossless). H and W must be even.
    Atomic: nothing is created at `path` unless the whole encode succeeds. Parent directories are created.
    Returns the path. An ffmpeg failure is a VideoWriteError (an OSError) with ffmpeg's message.
    """
    if isinstance(crf, bool) or not (isinstance(crf, numbers.Integral) and 0 <= crf <= 51):
        raise ValueError(f"crf must be an integer in [0, 51], got {crf!r}")
    if isinstance(fps, bool) or not (isinstance(fps, numbers.Real) and math.isfinite(fps) and fps > 0):
        raise ValueError(f"fps must be a finite number > 0, got {fps!r}")
    crf, fps = int(crf), (fps if isinstance(fps, (int, Fraction)) else float(fps))
    muxer = video_container(path)
    (h, w), stream = _frame_stream(frames)
    fps_arg = str(Fraction(fps).limit_denominator(100000))
    with atomic_path(path, Path(path).suffix) as tmp, tempfile.TemporaryFile() as err:
        cmd = [
            _ffmpeg_exe(), "-nostdin", "-y", "-loglevel", "error",
            "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}", "-r", fps_arg, "-i", "pipe:0",
            "-an", "-c:v", "libx264", "-preset", preset, "-crf", str(crf), "-pix_fmt", "yuv420p",
            *(["-movflags", "+faststart"] if muxer != "matroska" else []), "-f", muxer, str(tmp),
        ]
        proc = None
        try:
            with _signals_held():  # (an interrupt inside Popen would orphan ffmpeg, which then writes tmp)
                proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=err)
                _LIVE_FFMPEG.add(proc)
            for f in stream:
                proc.stdin.write(np.ascontiguousarray(f).tobytes())
            proc.stdin.close()
            rc = proc.wait()
        except BrokenPipeError:
            rc = proc.wait()
            rc = rc if rc != 0 else -1
        except BaseException:
            if proc is not None:
                proc.kill()
                proc.wait()
            raise
        finally:
            _LIVE_FFMPEG.discard(proc)
            if proc is not None and proc.stdin and not proc.stdin.closed:
                try:
                    proc.stdin.close()
                except BrokenPipeError:
                    pass
        if rc != 0:
            err.seek(0)
            msg = err.read().decode(errors="replace").strip()
            raise VideoWriteError(f"ffmpeg failed writing {path} (exit code {rc}): {msg}")
    return Path(path)


def read_mp4(path: str | os.PathLike) -> np.ndarray:
    """Decodes a video file to uint8 RGB frames [T, H, W, 3] (numpy)."""
    import imageio_ffmpeg

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"video file not found: {path}")
    reader = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24")
    try:
        meta = next(reader)
        w, h = meta["size"]
        frames = [np.frombuffer(b, dtype=np.uint8).reshape(h, w, 3) for b in reader]
    finally:
        reader.close()  # ends the ffmpeg process and closes its pipes
    if not frames:
        raise ValueError(f"no frames decoded from {path}")
    return np.stack(frames)


def save_latents(latents: torch.Tensor, path: str | os.PathLike, metadata: dict[str, Any] | None = None,
                 *, atomic: bool = True) -> Path:
    """Saves a latent tensor to a safetensors file (key "latents"), atomically (atomic=False: written at
    `path` itself, for a caller's own temporary file).

    `metadata` values are stored JSON-encoded (anything json.dumps accepts) and restored by `load_latents`.
    """
    from safetensors.torch import save_file

    if not isinstance(latents, torch.Tensor):
        raise TypeError(f"latents must be a torch.Tensor, got {type(latents).__name__}")
    meta = {}
    for k, v in (metadata or {}).items():
        if not isinstance(k, str):
            raise ValueError(f"metadata keys must be str, got {k!r}")
        meta[k] = json.dumps(v)
    tensors = {"latents": latents.detach().contiguous().cpu()}
    if not atomic:
        save_file(tensors, str(path), metadata=meta)
        return Path(path)
    with atomic_path(path, ".safetensors") as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return Path(path)


def load_latents(path: str | os.PathLike) -> tuple[torch.Tensor, dict[str, Any]]:
    """Loads (latents, metadata) written by `save_latents`."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"latents file not found: {path}")
    with safe_open(str(path), framework="pt") as f:
        if "latents" not in f.keys():
            raise ValueError(f"{path} has no 'latents' tensor (keys: {list(f.keys())})")
        latents = f.get_tensor("latents")
        raw = f.metadata() or {}
    meta: dict[str, Any] = {}
    for k, v in raw.items():
        try:
            meta[k] = json.loads(v)
        except json.JSONDecodeError:
            meta[k] = v
    return latents, meta
