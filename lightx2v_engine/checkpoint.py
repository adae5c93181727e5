"""Reading checkpoint files: safetensors (single or sharded with an index), and torch ``.pt``/``.pth``.

Safetensors are read with plain file reads straight into each tensor's final buffer (no mmap, no second
copy), converting dtype one tensor at a time, so host memory peaks near the size of what is kept.
Corrupt or truncated files give an error naming the file and what is wrong.
"""
from __future__ import annotations

import json
import logging
import math
import os
import struct
import zipfile
from pathlib import Path
from typing import Callable, Iterator

import torch

log = logging.getLogger(__name__)

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")  # the checkpoint formats read (torch files: the rest)


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt, or does not fit the model."""


def check_format(path: Path) -> None:
    """CheckpointError naming the file and the supported formats unless its suffix is one of them."""
    if path.suffix not in SUFFIXES:
        raise CheckpointError(f"{path}: unsupported checkpoint format {path.suffix!r} "
                              f"(expected {', '.join(SUFFIXES[:-1])} or {SUFFIXES[-1]})")


def read_safetensors_header(path: Path) -> tuple[dict, int]:
    """Returns (header without __metadata__, data start offset). Raises CheckpointError if corrupt."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: corrupt safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8 or n > 100_000_000:
            raise CheckpointError(f"{path}: corrupt safetensors file (header length {n} exceeds file size {size})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (a JSON {type(header).__name__}, expected an "
                              "object of tensor entries)")
    header.pop("__metadata__", None)
    start = 8 + n
    for key, info in header.items():
        if not isinstance(info, dict):
            raise CheckpointError(f"{path}: corrupt safetensors header: entry {key!r} is {str(info)[:100]!r}, "
                                  "expected an object with 'dtype', 'shape' and 'data_offsets'")
        lacking = [f for f in ("dtype", "shape", "data_offsets") if f not in info]
        if lacking:
            raise CheckpointError(f"{path}: corrupt safetensors header: tensor {key!r} has no {lacking}")
        shape, offsets = info["shape"], info["data_offsets"]
        if not isinstance(shape, list) or not all(_is_uint(d) for d in shape):
            raise CheckpointError(f"{path}: corrupt safetensors header: tensor {key!r} has shape {shape!r}, "
                                  "expected a list of non-negative ints")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_uint(o) for o in offsets):
            raise CheckpointError(f"{path}: corrupt safetensors header: tensor {key!r} has data_offsets "
                                  f"{offsets!r}, expected [begin, end] (two non-negative ints)")
        b, e = offsets
        if not isinstance(info["dtype"], str) or info["dtype"] not in _ST_DTYPES:
            raise CheckpointError(f"{path}: tensor {key!r} has unsupported dtype {info['dtype']}")
        if e > size - start or b > e:
            raise CheckpointError(f"{path}: truncated or corrupt file: tensor {key!r} needs bytes {b}..{e} of the "
                                  f"data section, which has {size - start}")
        nbytes = math.prod(shape) * _ST_DTYPES[info["dtype"]].itemsize  # (before any tensor of that shape exists)
        if nbytes != e - b:
            raise CheckpointError(f"{path}: corrupt safetensors header: tensor {key!r} has {e - b} bytes, shape "
                                  f"{shape} {info['dtype']} needs {nbytes}")
    # the tensors tile the data section, as the format requires: two tensors on the same bytes loaded as one
    pos = 0
    for b, e, key in sorted((i["data_offsets"][0], i["data_offsets"][1], k) for k, i in header.items()):
        if b != pos:
            raise CheckpointError(f"{path}: corrupt safetensors header: tensor {key!r} starts at byte {b} of the "
                                  f"data section, expected {pos} ("
                                  + ("it overlaps the tensor before it)" if b < pos else "a gap before it)"))
        pos = e
    if pos != size - start:
        raise CheckpointError(f"{path}: corrupt safetensors file: its tensors end at byte {pos} of the data "
                              f"section, which has {size - start} (bytes no tensor holds)")
    return header, start


def _is_uint(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def iter_safetensors(path: Path, keys: set[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields (key, CPU tensor) in file order, each read directly into a freshly allocated tensor."""
    header, start = read_safetensors_header(path)
    items = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
    with open(path, "rb", buffering=0) as f:
        for key, info in items:
            if keys is not None and key not in keys:
                continue
            b, e = info["data_offsets"]
            dtype, shape = _ST_DTYPES[info["dtype"]], info["shape"]
            t = torch.empty(shape, dtype=dtype)  # (its size was checked against the header's offsets)
            nbytes = t.numel() * t.element_size()
            f.seek(start + b)
            buf = memoryview(t.view(-1).view(torch.uint8).numpy()) if nbytes else memoryview(b"")
            got = 0
            while got < nbytes:
                n = f.readinto(buf[got:])
                if not n:
                    raise CheckpointError(f"{path}: truncated file while reading {key!r}")
                got += n
            yield key, t


def safetensors_keys(path: Path) -> list[str]:
    return list(read_safetensors_header(path)[0])


# containers training code saves a state dict in (unwrapped, outermost first, as often as they nest):
# plain torch / Lightning, DeepSpeed, a model wrapper, self-forcing training (its EMA weights first, as
# LightX2V's sf_model reads: generator_ema, else the whole file)
TORCH_WRAPPERS = ("state_dict", "module", "model", "generator_ema", "generator")


def iter_torch_file(path: Path, log_wrapper: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields (key, tensor) of a torch-saved state dict (weights only; mmap'd when in the zip format, legacy
    pickles load eagerly and each tensor is let go once yielded). A dict without tensors of its own is
    unwrapped through TORCH_WRAPPERS; of 'generator_ema' and 'generator' the EMA weights (logged)."""
    try:
        obj = torch.load(path, map_location="cpu", mmap=zipfile.is_zipfile(path), weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read torch checkpoint ({type(e).__name__}: {e})") from None
    seen = set()  # (a dict that holds itself must not unwrap for ever)
    while isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()) \
            and id(obj) not in seen:
        seen.add(id(obj))
        wrapper = next((w for w in TORCH_WRAPPERS if isinstance(obj.get(w), dict)), None)
        if wrapper is None:
            break
        if log_wrapper and wrapper == "generator_ema" and isinstance(obj.get("generator"), dict):
            log.info("%s: holds 'generator' and 'generator_ema' weights; loading 'generator_ema' (as LightX2V)",
                     path)
        obj = obj[wrapper]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a state dict, got {type(obj).__name__}")
    # a LoRA's alpha saved as a Python number (kohya's torch files) is one too, not dropped
    alphas = {k: torch.tensor(float(v)) for k, v in obj.items() if isinstance(k, str) and k.endswith(".alpha")
              and isinstance(v, (int, float)) and not isinstance(v, bool)}
    obj.update(alphas)
    keys = [k for k, v in obj.items() if isinstance(v, torch.Tensor)]
    if not keys:
        shown = [str(k)[:40] for k in list(obj)[:8]]
        raise CheckpointError(f"{path}: holds no tensors (keys {shown}{' ...' if len(obj) > 8 else ''}; "
                              f"unwrapped containers: {list(TORCH_WRAPPERS)})")
    for k in keys:
        yield k, obj.pop(k)


def candidate_paths(path: str | os.PathLike, bases=()) -> list[Path]:
    """Where a path given in a config or argument may be: as given, then (relative paths only) under each
    of `bases` (the model folder; None entries skipped), in that order."""
    p = Path(path)
    return [p] + ([] if p.is_absolute() else [Path(b) / p for b in bases if b is not None])


def resolve_files(path: Path) -> list[Path]:
    """A checkpoint given as a file, a folder of shards (with an index) or a folder of .safetensors files."""
    if path.is_file():
        if path.name.endswith(".index.json"):
            return _index_shards(path)
        return [path]
    if path.is_dir():
        # (a repository may hold both .safetensors and .bin shards: the former's index first)
        indexes = sorted(path.glob("*.safetensors.index.json")) or sorted(path.glob("*.index.json"))
        if len(indexes) > 1:
            raise CheckpointError(f"{path}: several shard indexes {[p.name for p in indexes]}: give the one to "
                                  f"load (its path)")
        if indexes:
            return _index_shards(indexes[0])
        files = sorted(path.glob("*.safetensors"))
        if files:
            return files
        files = sorted(f for suffix in SUFFIXES[1:] for f in path.glob(f"*{suffix}"))
        if files:
            return files
        raise FileNotFoundError(f"{path}: folder holds no {'/'.join(SUFFIXES)} checkpoint files")
    raise FileNotFoundError(f"checkpoint not found: {path}")


def _index_shards(index: Path) -> list[Path]:
    try:
        data = json.loads(index.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{index}: corrupt shard index ({e})") from None
    if not isinstance(data, dict) or "weight_map" not in data:
        got = f"a JSON {type(data).__name__}" if not isinstance(data, dict) else "an object without 'weight_map'"
        raise CheckpointError(f"{index}: corrupt shard index: {got}, expected an object with a 'weight_map'")
    weight_map = data["weight_map"]
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        got = (f"a JSON {type(weight_map).__name__}" if not isinstance(weight_map, dict) else
               "an object with " + next(f"{k!r}: {str(v)[:60]!r}" for k, v in weight_map.items()
                                        if not isinstance(v, str)))
        raise CheckpointError(f"{index}: corrupt shard index: 'weight_map' is {got}, expected an object mapping "
                              "tensor names to shard file names")
    if not weight_map:
        raise CheckpointError(f"{index}: corrupt shard index: 'weight_map' is empty (names no shard file)")
    shards = sorted({index.parent / name for name in weight_map.values()})
    missing = [str(s) for s in shards if not s.is_file()]
    if missing:
        raise FileNotFoundError(f"{index}: shard files missing: {missing}")
    return shards


def iter_checkpoint(files: list[Path]) -> Iterator[tuple[str, torch.Tensor, Path]]:
    for path in files:
        check_format(path)
        if path.suffix == ".safetensors":
            for k, t in iter_safetensors(path):
                yield k, t, path
        else:
            for k, t in iter_torch_file(path):
                yield k, t, path


def tensor_meta(files: list[Path]) -> list[tuple[str, tuple[int, ...], torch.dtype, Path]]:
    """(key, shape, dtype, file) of every tensor, without reading tensor data: safetensors headers, torch zip
    files mmap'd (legacy pickles load eagerly). Every file's format is checked before any is opened."""
    for path in files:
        check_format(path)
    out = []
    for path in files:
        if path.suffix == ".safetensors":
            out += [(k, tuple(i["shape"]), _ST_DTYPES[i["dtype"]], path)
                    for k, i in read_safetensors_header(path)[0].items()]
        else:
            out += [(k, tuple(t.shape), t.dtype, path) for k, t in iter_torch_file(path, log_wrapper=False)]
    return out


def load_state_dict(files: list[Path], rename: Callable[[str], str] = lambda k: k,
                    dtype_of: Callable[[str, torch.Tensor], torch.dtype | None] = lambda k, t: None,
                    device: torch.device | str = "cpu",
                    check: Callable[[str, torch.Tensor, Path], None] | None = None,
                    ) -> tuple[dict[str, torch.Tensor], dict[str, Path]]:
    """Reads every tensor, renames its key, checks it as read (`check(new_key, tensor, file)`, on the file's
    dtype, may raise), casts it to dtype_of(new_key) (None keeps it) and moves it to `device`, one tensor at
    a time. Returns (state dict, key -> source file). Duplicate keys are an error."""
    sd: dict[str, torch.Tensor] = {}
    origin: dict[str, Path] = {}
    for key, t, path in iter_checkpoint(files):
        name = rename(key)
        if name in sd:
            raise CheckpointError(f"key {name!r} appears twice (in {origin[name]} and {path})")
        if check is not None:
            check(name, t, path)
        dt = dtype_of(name, t)
        if dt is not None and t.is_floating_point() and t.dtype != dt:
            t = t.to(dt)
        sd[name] = t.to(device) if str(device) != "cpu" else t
        origin[name] = path
    return sd, origin


def read_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A plain {name: tensor} state dict from a .safetensors or torch file (wrapped dicts are refused)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            sd = load_file(path, device="cpu")
        else:  # mmap needs the zip serialization format; legacy pickles load eagerly
            sd = torch.load(path, mmap=zipfile.is_zipfile(path), weights_only=True, map_location="cpu")
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(f"{path}: cannot read checkpoint ({type(e).__name__}: {first[:300]})") from e
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path}: expected a plain state dict {{name: tensor}}, got {type(sd).__name__}"
                         " (nested or wrapped checkpoints are not accepted)")
    return sd


def key_mismatch(expected, sd) -> tuple[list[str], list[str]]:
    """(missing, unexpected): the sorted keys of `expected` absent from `sd`, and of `sd` absent from it."""
    return sorted(set(expected) - set(sd)), sorted(set(sd) - set(expected))


def assign_checked(model: torch.nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
    """Strict key + shape check (clear ValueError), then load_state_dict(assign=True)."""
    expected = model.state_dict()
    missing, unexpected = key_mismatch(expected, sd)
    if missing or unexpected:
        raise ValueError(f"{source}: state dict does not match the model; missing keys {missing[:20]}"
                         f"{' ...' if len(missing) > 20 else ''} ({len(missing)} total), unexpected keys "
                         f"{unexpected[:20]}{' ...' if len(unexpected) > 20 else ''} ({len(unexpected)} total)")
    for k, t in expected.items():
        if tuple(sd[k].shape) != tuple(t.shape):
            raise ValueError(f"{source}: key {k!r} has shape {tuple(sd[k].shape)}, expected {tuple(t.shape)}")
    model.load_state_dict(sd, strict=True, assign=True)


def current_rss_bytes() -> int:
    """Resident set size of this process (Linux), for memory tests and logs."""
    with open(f"/proc/{os.getpid()}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0
