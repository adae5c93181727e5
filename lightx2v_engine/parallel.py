"""Multi-GPU inference: LightX2V's ``parallel`` config (sequence parallel and CFG parallel), under torchrun.

    torchrun --nproc_per_node=8 -m lightx2v_engine.infer ... --config_json wan_t2v_distill_4step_ulysses.json

``parallel: {seq_p_size: S, seq_p_attn_type: "ulysses" | "ring", cfg_p_size: C}``; the world size must be
S x C. Ranks form a [C, S] mesh (rank = c * S + s): each of the C CFG groups computes one CFG branch (cond,
uncond) and splits its tokens over its S ranks.

Sequence parallel (per DiT forward): the token sequence is zero-padded to a multiple of S and rank s keeps
rows [s * Ls, (s + 1) * Ls); the residual stream, modulation, FFN, cross-attention and head run on the shard.
Self-attention needs every key:
- "ulysses": one all-to-all trades the q/k/v token shards for head shards ([B, Ls, H, D] -> [B, S*Ls, H/S, D]),
  attention runs over the whole sequence for H/S heads, a second all-to-all trades back. Needs H % S == 0
  (1.3B: 12 heads; 14B: 40).
- "ring" (LightX2V's ring attention): here the k/v shards are all-gathered and each rank attends its queries
  to the whole sequence - the same result as ring attention, any head count, more memory (full k and v).
Padding rows never act as keys (the gathered sequence is cut back to its true length before attention), so
the result equals the single-GPU one up to the GEMMs' summation order. With ``seq_p_quant_scheme: "fp8"`` (or
LightX2V's older ``seq_p_fp8_comm: true``) the q/k/v all-to-all (ulysses) or the k/v all-gather (ring) moves
each [head_dim] row as fp8 e4m3 with its fp32 scale (amax / 448): D + 4 bytes instead of 2D (1.94x less
traffic at D = 128), at about 2-3% relative error per element; the attention output travels back in the
model's dtype. It pays where the links are slow (PCIe); over NVLink the quantization can cost more than the
traffic it saves (bench_parallel.py measures both in one run). The head runs on the shard and the
outputs are all-gathered (as LightX2V).

Collectives are torch's functional ones (``torch.ops._c10d_functional``: traceable, no host sync). The
text/image encoders load and run on global rank 0 only; their outputs and the noise are broadcast, so that
every rank runs the sampler on the same bits. Messages between steps (a server's tasks, shapes, failures)
go over a gloo control group (Parallel.send / receive / on_rank0). The VAE decodes in spatial tiles spread
over all ranks and blended on rank 0 (decode_tiled: the tiled decode's result, bit for bit): ``vae_parallel``
defaults to true in a parallel section, as in LightX2V; with ``"vae_parallel": false`` (and no
``use_tiling_vae``) rank 0 decodes whole frames alone.
"""
from __future__ import annotations

import atexit
import dataclasses
import datetime
import difflib
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

SEQ_P_ATTN_TYPES = ("ulysses", "ring")
# LightX2V's Ulysses attention types that differ only in how the all-to-all travels (what runs here instead)
ULYSSES_VARIANTS = {
    "fast_ulysses": "torch's all_to_all_single",
    "ulysses-4090": "one all_to_all_single, not its round-robin peer-to-peer rounds for PCIe GPUs",
    "ulysses-opt": "one all_to_all_single for q/k/v, not its fused pre/post stages",
}


# fp8 dtypes (broadcast as bytes: gloo has none)
_FP8 = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
             if hasattr(torch, n))


@dataclass(frozen=True)
class ParallelConfig:
    """LightX2V's ``parallel`` section. world_size = seq_p_size * cfg_p_size processes (torchrun)."""
    seq_p_size: int = 1
    seq_p_attn_type: str = "ulysses"
    cfg_p_size: int = 1
    # the VAE decodes in spatial tiles spread over all ranks (decode_tiled) unless a section says
    # "vae_parallel": false (LightX2V's get_vae_parallel; without parallelism it means nothing)
    vae_parallel: bool = True
    seq_p_quant_scheme: str | None = None  # "fp8": q/k/v (ulysses) or k/v (ring) travel as fp8 rows + scales

    @property
    def world_size(self) -> int:
        return self.seq_p_size * self.cfg_p_size

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


SEQ_P_QUANT_SCHEMES = ("fp8",)

# parallel.* keys LightX2V has that change nothing here (what runs instead, for the warning)
_PARALLEL_IGNORED = {
    "seq_p_tensor_fusion": "q, k and v always travel in one collective",
    "seq_p_head_parallel": "one collective for all heads",
    "seq_p_head_parallel_group_size": "one collective for all heads",
    "seq_p_a2a_backend": "torch's all_to_all_single",
    "seq_p_prepost_backend": "torch",
}


# the keys of LightX2V's "parallel" section that this engine reads
PARALLEL_KEYS = ("seq_p_size", "seq_p_attn_type", "cfg_p_size", "tensor_p_size", "vae_parallel", "seq_p_quant_scheme",
                 "seq_p_fp8_comm", "seq_p_fp4_comm")


def parse_parallel(value: Any, source: str = "config", warn: bool = True) -> tuple[ParallelConfig, list[str]]:
    """The ``parallel`` value (an object, or false/null/{} for none) -> (ParallelConfig, notes on keys that
    are accepted but not acted on). Errors name the key and the value."""
    if value is None or value is False or value == {}:
        return ParallelConfig(), []
    if value is True:
        raise ValueError(f"{source}: config key 'parallel' = true: expected an object such as "
                         f"{{\"seq_p_size\": 4, \"seq_p_attn_type\": \"ulysses\", \"cfg_p_size\": 2}}")
    if not isinstance(value, dict):
        raise ValueError(f"{source}: config key 'parallel' = {value!r}: expected an object")
    vals, notes = {}, []
    legacy = None  # the scheme LightX2V's older seq_p_fp8_comm / seq_p_fp4_comm flags ask for
    for key, v in value.items():
        name = f"parallel.{key}"
        if key in ("seq_p_size", "cfg_p_size", "tensor_p_size"):
            from lightx2v_engine.config import _as  # (config imports this module)
            try:
                v = _as(name, v, int)  # (4.0 as the top-level integer keys take it)
            except ValueError:
                v = 0
            if v < 1:
                raise ValueError(f"{source}: config key {name!r} = {value[key]!r}: expected a positive integer")
            if key == "tensor_p_size":
                if v != 1:
                    raise ValueError(f"{source}: config key {name!r} = {v}: tensor parallelism is not supported "
                                     f"by lightx2v-engine; use seq_p_size (Ulysses) instead")
                continue
            if key == "cfg_p_size" and v > 2:
                raise ValueError(f"{source}: config key {name!r} = {v}: CFG has two branches (cond, uncond), so "
                                 f"cfg_p_size is 1 or 2")
            vals[key] = v
        elif key == "vae_parallel":
            if not isinstance(v, bool):
                raise ValueError(f"{source}: config key {name!r} = {v!r}: expected true/false")
            vals[key] = v
        elif key == "seq_p_attn_type":
            if v in ULYSSES_VARIANTS:  # LightX2V's Ulysses with another all-to-all transport: the same computation
                if v != "fast_ulysses":
                    notes.append(f"{name} {v!r} (runs as 'ulysses': {ULYSSES_VARIANTS[v]})")
                v = "ulysses"
            if v not in SEQ_P_ATTN_TYPES:
                raise ValueError(f"{source}: config key {name!r} = {v!r}: expected one of {list(SEQ_P_ATTN_TYPES)} "
                                 f"(or LightX2V's Ulysses variants {list(ULYSSES_VARIANTS)}, run as 'ulysses')")
            vals[key] = v
        elif key in ("seq_p_fp8_comm", "seq_p_fp4_comm"):
            if v is None:
                continue
            if not isinstance(v, bool):
                raise ValueError(f"{source}: config key {name!r} = {v!r}: expected true/false")
            if v:
                if legacy is not None:
                    raise ValueError(f"{source}: config keys 'parallel.seq_p_fp8_comm' and 'parallel.seq_p_fp4_comm' "
                                     f"are both true: choose one (or set parallel.seq_p_quant_scheme)")
                legacy = key[6:9]
        elif key == "seq_p_quant_scheme":
            if v is not None and v not in ("fp8", "fp4"):
                raise ValueError(f"{source}: config key {name!r} = {v!r}: expected null, \"fp8\" or \"fp4\"")
            vals[key] = v
        elif key in _PARALLEL_IGNORED:
            notes.append(f"{name} ({_PARALLEL_IGNORED[key]})")
        else:
            close = difflib.get_close_matches(key, PARALLEL_KEYS + tuple(_PARALLEL_IGNORED), n=1)
            if close:
                raise ValueError(f"{source}: unknown config key {name!r} (did you mean 'parallel.{close[0]}'?)")
            notes.append(name)
    scheme = vals.get("seq_p_quant_scheme")
    if legacy is not None:
        if scheme is not None and scheme != legacy:
            raise ValueError(f"{source}: config key 'parallel.seq_p_quant_scheme' = {scheme!r} conflicts with "
                             f"'parallel.seq_p_{legacy}_comm' = true: keep one of them")
        scheme = legacy
    if scheme == "fp4":
        from lightx2v_engine.config import warn_user
        if warn:
            warn_user(f"{source}: parallel fp4 communication (seq_p_quant_scheme / seq_p_fp4_comm) is not implemented "
                      f"in lightx2v-engine; the sequence-parallel collectives move fp8 instead")
        scheme = "fp8"
    vals["seq_p_quant_scheme"] = scheme
    return ParallelConfig(**vals), notes


def effective_parallel(pcfg: ParallelConfig, enable_cfg: bool, num_heads: int) -> ParallelConfig:
    """The mesh to run: without CFG the CFG groups have no branch of their own, so they join the sequence
    split (seq_p_size * cfg_p_size ranks per sequence: the same video, sooner) where the attention type
    allows it (Ulysses: the head count a multiple of the world size); otherwise they compute the same
    thing, as in LightX2V (LightX2V's *_ulysses configs: cfg_p_size 2 with enable_cfg false)."""
    if pcfg.cfg_p_size == 1 or enable_cfg:
        return pcfg
    world = pcfg.world_size
    if pcfg.seq_p_attn_type == "ulysses" and num_heads % world:
        from lightx2v_engine.config import warn_user
        warn_user(f"parallel.cfg_p_size {pcfg.cfg_p_size} without CFG (enable_cfg false): the CFG groups compute "
                  f"the same video (as in LightX2V); they cannot join the Ulysses split ({num_heads} heads over "
                  f"{world} ranks): use seq_p_attn_type 'ring' or a seq_p_size that divides {num_heads}")
        return pcfg
    log.info("parallel: no CFG, so the %d CFG groups join the sequence split: seq_p_size %d", pcfg.cfg_p_size,
             world)
    return dataclasses.replace(pcfg, seq_p_size=world, cfg_p_size=1)


# ----------------------------------------------------------------------------------------------------
# Collectives (functional: traceable, no host synchronisation)
# ----------------------------------------------------------------------------------------------------

def _c10d():
    return torch.ops._c10d_functional


def all_to_all(t: torch.Tensor, group) -> torch.Tensor:
    """Equal split along dim 0: chunk j of `t` goes to rank j; returns the chunks received, in rank order."""
    n = dist.get_world_size(group)
    split = [t.shape[0] // n] * n
    out = _c10d().all_to_all_single(t.contiguous(), split, split, group.group_name)
    return _c10d().wait_tensor(out)


def all_gather(t: torch.Tensor, group) -> torch.Tensor:
    """[N, ...] on each rank -> [size * N, ...], rank order."""
    out = _c10d().all_gather_into_tensor(t.contiguous(), dist.get_world_size(group), group.group_name)
    return _c10d().wait_tensor(out)


def pack_fp8_rows(x: torch.Tensor) -> torch.Tensor:
    """x [..., D] float -> uint8 [..., D + 4]: each row's fp8 e4m3 values q = cvt(x * 448 / amax), then the
    4 bytes of its fp32 scale s = amax / 448 (amax = max(max |row|, 1e-12); quant.per_token_quant: the csrc
    kernel on CUDA). x ~= q * s; a row of zeros comes back as zeros."""
    from lightx2v_engine.quant import per_token_quant
    d = x.shape[-1]
    q, s = per_token_quant(x.reshape(-1, d), "fp8")
    return torch.cat([q.view(torch.uint8), s.view(torch.uint8)], dim=1).view(*x.shape[:-1], d + 4)


def unpack_fp8_rows(p: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """pack_fp8_rows' bytes [..., D + 4] -> [..., D] in `dtype` (q * s, computed in `dtype`)."""
    d = p.shape[-1] - 4
    q = p[..., :d].view(torch.float8_e4m3fn)
    s = p[..., d:].clone(memory_format=torch.contiguous_format).view(torch.float32)  # (4-byte aligned)
    return q.to(dtype).mul_(s.to(dtype))  # (no fp32 copy of the whole buffer: the rounding is fp8's anyway)


# ----------------------------------------------------------------------------------------------------
# Sequence parallel
# ----------------------------------------------------------------------------------------------------

class SeqParallel:
    """This rank's share of one sequence-parallel group: rows [rank * Ls, (rank + 1) * Ls) of the sequence
    zero-padded to size * Ls. Set as ``WanDiT.seq_parallel``."""

    def __init__(self, group, mode: str = "ulysses", quant: str | None = None):
        if mode not in SEQ_P_ATTN_TYPES:
            raise ValueError(f"seq_p_attn_type must be one of {list(SEQ_P_ATTN_TYPES)}, got {mode!r}")
        if quant is not None and quant not in SEQ_P_QUANT_SCHEMES:
            raise ValueError(f"seq_p_quant_scheme must be None or one of {list(SEQ_P_QUANT_SCHEMES)}, got {quant!r}")
        self.group, self.mode, self.quant = group, mode, quant
        self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)
        self._rope: dict[tuple, Any] = {}

    def shard_len(self, seq_len: int) -> int:
        return -(-seq_len // self.size)

    def check_heads(self, num_heads: int) -> None:
        if self.mode == "ulysses" and num_heads % self.size:
            raise ValueError(f"parallel.seq_p_size {self.size} with seq_p_attn_type 'ulysses' needs the head count "
                             f"({num_heads}) to be a multiple of it; use a seq_p_size that divides {num_heads}, or "
                             f"seq_p_attn_type 'ring' (any head count)")

    def shard(self, x: torch.Tensor, pad_value: float = 0.0) -> torch.Tensor:
        """x [B, L, ...] -> this rank's rows [B, Ls, ...] of x padded with `pad_value` to size * Ls rows."""
        ls = self.shard_len(x.shape[1])
        part = x[:, self.rank * ls:(self.rank + 1) * ls]
        if part.shape[1] < ls:
            part = torch.cat([part, part.new_full((x.shape[0], ls - part.shape[1]) + tuple(x.shape[2:]), pad_value)],
                             dim=1)
        return part.contiguous()

    def shard_rope(self, rope):
        """The RoPE tables of this rank's rows (padding rows: angle 0, cos 1 and sin 0). Cached per (grid,
        device), for the dit.ROPE_SHAPES most recently used (CUDA graphs are off under parallelism)."""
        from lightx2v_engine.dit import ROPE_SHAPES
        from lightx2v_engine.ops import Rope
        key = (rope.grid, str(rope.cos.device), rope.cos.shape[-1])  # (the head dim too: one group, any model)
        r = self._rope.pop(key, None)
        if r is None:
            r = Rope(cos=self.shard(rope.cos[None], 1.0)[0], sin=self.shard(rope.sin[None])[0],
                     grid=rope.grid, seq_len=rope.cos.shape[0])
        self._rope[key] = r
        while len(self._rope) > ROPE_SHAPES:
            del self._rope[next(iter(self._rope))]
        return r

    def drop_caches(self) -> None:
        """Forgets the shard RoPE tables (WanDiT.drop_device_caches: the DiT going back to the CPU or freed;
        they lived on the process-wide state, on the GPU, past the DiT)."""
        self._rope.clear()

    def gather(self, x: torch.Tensor, seq_len: int) -> torch.Tensor:
        """x [B, Ls, ...] from every rank -> [B, seq_len, ...]."""
        g = all_gather(x.transpose(0, 1), self.group)  # [size * Ls, B, ...]
        return g[:seq_len].transpose(0, 1).contiguous()

    def _move(self, collective: Callable, t: torch.Tensor) -> torch.Tensor:
        """collective(t, group) (all_gather / all_to_all); with quant "fp8" it moves pack_fp8_rows' bytes."""
        if not self.quant:
            return collective(t, self.group)
        return unpack_fp8_rows(collective(pack_fp8_rows(t.contiguous()), self.group), t.dtype)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_len: int,
                  attn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Self-attention over the whole sequence for this rank's queries.

        q, k, v [B, Ls, H, D] (RoPE applied); seq_len the true length L; attn(q, k, v) -> o on [B, L, H', D]
        inputs. Returns [B, Ls, H, D]. With quant "fp8" the q/k/v (k/v) collective moves pack_fp8_rows' bytes."""
        B, ls, H, D = q.shape
        n = self.size
        if self.mode == "ring":  # every rank gathers all keys and values
            kv = self._move(all_gather, torch.stack([k, v]).transpose(0, 2))  # [Ls, B, 2, H, D] -> [n*Ls, ...]
            kv = kv[:seq_len].permute(2, 1, 0, 3, 4).contiguous()  # [2, B, L, H, D]
            return attn(q, kv[0], kv[1])
        self.check_heads(H)
        hs = H // n
        # [3, B, Ls, n, H/n, D] -> [n, 3, B, Ls, H/n, D]: chunk j (heads of rank j) goes to rank j
        send = torch.stack([q, k, v]).view(3, B, ls, n, hs, D).permute(3, 0, 1, 2, 4, 5)
        recv = self._move(all_to_all, send)  # [n (token shard), 3, B, Ls, H/n, D]
        full = recv.permute(1, 2, 0, 3, 4, 5).reshape(3, B, n * ls, hs, D)[:, :, :seq_len]
        o = attn(full[0], full[1], full[2])  # [B, L, H/n, D]
        if o.shape[1] < n * ls:
            o = torch.cat([o, o.new_zeros((B, n * ls - o.shape[1], hs, D))], dim=1)
        # [B, n, Ls, H/n, D] -> [n (token shard), B, Ls, H/n, D]: token shard j goes back to rank j
        back = all_to_all(o.reshape(B, n, ls, hs, D).transpose(0, 1), self.group)  # [n (head shard), B, Ls, H/n, D]
        return back.permute(1, 2, 0, 3, 4).reshape(B, ls, H, D)


# ----------------------------------------------------------------------------------------------------
# Process groups
# ----------------------------------------------------------------------------------------------------

@dataclass
class Parallel:
    """This process's place in the [cfg_p_size, seq_p_size] mesh."""
    config: ParallelConfig
    rank: int
    world_size: int
    device: torch.device
    seq: SeqParallel | None = None
    cfg_group: Any = None       # the 2 ranks holding the same tokens of the two CFG branches
    cfg_rank: int = 0           # 0: the conditional branch, 1: the unconditional one
    control: Any = None         # all ranks over gloo with no practical timeout: messages between tasks

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def broadcast_(self, t: torch.Tensor | None) -> torch.Tensor | None:
        """In place, from global rank 0 (inputs every rank must agree on; contiguous)."""
        if t is not None:
            if not t.is_contiguous():
                raise ValueError("broadcast_ needs a contiguous tensor")
            dist.broadcast(t, src=0)
        return t

    def broadcast_module_(self, module: torch.nn.Module) -> None:
        """Global rank 0's parameters and buffers, in place on every rank (through the device under NCCL).
        fp8 tensors (a quantized DiT) travel as their bytes: gloo has no float8 type."""
        for t in list(module.parameters()) + list(module.buffers()):
            data = t.data.view(torch.uint8) if t.dtype in _FP8 else t.data
            if self._nccl() and t.device != self.device:
                tmp = data.to(self.device)
                dist.broadcast(tmp, src=0)
                data.copy_(tmp)
            else:
                dist.broadcast(data, src=0)

    def broadcast_flag(self, flag: bool) -> bool:
        """Global rank 0's `flag`, on every rank (e.g. a cancellation between steps)."""
        t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=self.device if self._nccl() else "cpu")
        dist.broadcast(t, src=0)
        return bool(t.item())

    def broadcast_object(self, obj: Any = None) -> Any:
        """Global rank 0's picklable `obj`, on every rank, over the gloo control group: a rank may wait in
        it for hours (a server between requests) without a collective timeout or a spinning GPU kernel."""
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def send(self, kind: str, **fields: Any) -> None:
        """Rank 0: a control message {kind, fields} to every rank (see receive)."""
        self.broadcast_object({"kind": kind, **fields})

    def receive(self, kind: str) -> dict | None:
        """Ranks > 0: rank 0's next control message, which must be of `kind` (or None: stop). A message of
        another kind means the ranks fell out of step: an error, not a misread."""
        msg = self.broadcast_object(None)
        if msg is not None and msg.get("kind") != kind:
            raise RuntimeError(f"parallel: rank {self.rank} expected a {kind!r} message from rank 0 and got "
                               f"{msg.get('kind')!r}: the ranks are out of step")
        return msg

    def on_rank0(self, fn: Callable[[], Any], what: str) -> Any:
        """fn() on rank 0 alone, its outcome agreed by all: rank 0 returns fn()'s value; the others return
        None, or raise RankZeroError naming rank 0's failure. On rank 0 a failure is re-raised: as it is for a
        ValueError / FileNotFoundError (which every rank raises alike) and an interrupt (Ctrl-C, SystemExit);
        out of memory as RankZeroOutOfMemory (a RankZeroError the ranks agree on, and an OutOfMemoryError
        for the CLI's exit code); wrapped in RankZeroError otherwise."""
        if not self.is_main:
            msg = self.receive(what)
            if msg["error"] is not None:
                raise RankZeroError(f"rank 0 failed to {what}: {msg['error']}")
            return None
        try:
            value = fn()
        except BaseException as e:
            self.send(what, error=f"{type(e).__name__}: {e}")
            if isinstance(e, (ValueError, FileNotFoundError)) or not isinstance(e, Exception):
                raise
            cls = RankZeroOutOfMemory if isinstance(e, torch.OutOfMemoryError) else RankZeroError
            raise cls(f"rank 0 failed to {what}: {type(e).__name__}: {e}") from e
        self.send(what, error=None)
        return value

    def agree(self, what: str, error: BaseException | None) -> None:
        """Every rank's outcome of a step all ranks ran (e.g. building the DiT), agreed by all: returns when
        none failed; otherwise every rank raises RankError naming the ranks that failed and why (on a rank
        that failed, chained to its own exception). Over the gloo control group."""
        errors = [None] * self.world_size
        dist.all_gather_object(errors, None if error is None else f"{type(error).__name__}: {error}",
                               group=self.control)
        by_message: dict[str, list[int]] = {}
        for r, e in enumerate(errors):
            if e is not None:
                by_message.setdefault(e, []).append(r)
        if by_message:
            where = ["every rank" if len(ranks) == self.world_size else
                     ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(map(str, ranks))
                     for ranks in by_message.values()]
            raise RankError(f"failed to {what} on " + "; ".join(f"{w}: {m}" for w, m in zip(where, by_message))) \
                from error

    def cfg_gather(self, v: torch.Tensor) -> torch.Tensor:
        """v [B, ...] of this rank's CFG branch -> [2B, ...]: cond rows first, then uncond."""
        return all_gather(v, self.cfg_group)

    def _nccl(self) -> bool:
        return dist.get_backend() == "nccl"


class RankZeroError(ValueError):
    """A step run on rank 0 alone failed; every rank raises it at the same point (the ranks stay in step)."""


class RankZeroOutOfMemory(RankZeroError, torch.OutOfMemoryError):
    """Rank 0 ran out of memory in a step run on rank 0 alone: every rank raises (a RankZeroError elsewhere),
    so the ranks stay in step; an OutOfMemoryError too (the CLI's out-of-memory exit code)."""


class RankError(ValueError):
    """A step every rank ran failed on some of them (Parallel.agree); every rank raises it at the same point
    (the ranks stay in step)."""


_STATE: Parallel | None = None


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank_from_env() -> int:
    """torchrun's global rank of this process (0 outside a multi-process torchrun)."""
    return int(os.environ.get("RANK", "0")) if world_size_from_env() > 1 else 0


def rank_prefix() -> str:
    """"[rank R] " under torchrun with several processes, else "" (log and message lines)."""
    return f"[rank {rank_from_env()}] " if world_size_from_env() > 1 else ""


def check_world(pcfg: ParallelConfig) -> int:
    """The world size (torchrun's), which must be pcfg's: else an error saying how to launch."""
    world = dist.get_world_size() if dist.is_initialized() else world_size_from_env()
    if world != pcfg.world_size:
        raise ValueError(f"parallel: seq_p_size {pcfg.seq_p_size} x cfg_p_size {pcfg.cfg_p_size} = {pcfg.world_size} "
                         f"processes, but the world size is {world}: launch with torchrun "
                         f"--nproc_per_node={pcfg.world_size} (or change the config's parallel section)")
    return world


def init_parallel(pcfg: ParallelConfig, device: torch.device) -> Parallel | None:
    """Joins the torchrun process group and builds the mesh; None when pcfg asks for one process. The CUDA
    device becomes cuda:LOCAL_RANK. Called once per process (later calls with the same config reuse it)."""
    global _STATE
    if not pcfg.enabled:
        return None
    if _STATE is not None:
        if _STATE.config != pcfg:
            raise ValueError(f"parallel: this process already runs {_STATE.config}, cannot switch to {pcfg}")
        return _STATE
    world = check_world(pcfg)
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise ValueError(f"parallel: LOCAL_RANK {local} but only {torch.cuda.device_count()} CUDA devices")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=30),
                                **({"device_id": device} if device.type == "cuda" else {}))
    rank = dist.get_rank()
    S, C = pcfg.seq_p_size, pcfg.cfg_p_size
    if S == 1 and pcfg.seq_p_quant_scheme:  # (it compresses the sequence split's collectives: there are none)
        from lightx2v_engine.config import warn_user
        warn_user(f"parallel: seq_p_quant_scheme {pcfg.seq_p_quant_scheme!r} has no effect without a sequence split "
                  f"(seq_p_size 1: the {C} processes split the CFG branches only)")
    c, s = divmod(rank, S)
    state = Parallel(pcfg, rank, world, device, cfg_rank=c)
    state.control = dist.new_group(backend="gloo", timeout=datetime.timedelta(days=3650))
    for cc in range(C):  # every rank creates every group, in the same order
        g = dist.new_group([cc * S + j for j in range(S)]) if S > 1 else None
        if cc == c and g is not None:
            state.seq = SeqParallel(g, pcfg.seq_p_attn_type, pcfg.seq_p_quant_scheme)
    for ss in range(S):
        g = dist.new_group([cc * S + ss for cc in range(C)]) if C > 1 else None
        if ss == s:
            state.cfg_group = g
    if created:
        atexit.register(_shutdown)  # (a gloo group left alive at exit aborts the process)
        previous_hook = sys.excepthook

        def failed_hook(*exc_info):  # an uncaught error: this rank leaves without the exit barrier
            mark_failed()
            previous_hook(*exc_info)
        sys.excepthook = failed_hook
    log.info("parallel: rank %d of %d (cfg branch %d, sequence shard %d of %d, %s%s) on %s", rank, world, c, s, S,
             pcfg.seq_p_attn_type, f", {pcfg.seq_p_quant_scheme} collectives" if pcfg.seq_p_quant_scheme else "",
             device)
    _STATE = state
    return state


EXIT_BARRIER_S = 60  # seconds a rank waits at exit for its peers
_FAILED = False


def mark_failed() -> None:
    """This rank ends with an error (the CLI's exit codes 2 and 3; an uncaught exception): at exit it tears its
    groups down without waiting for its peers, so that one still in a collective with it fails at once."""
    global _FAILED
    if dist.is_available() and dist.is_initialized():
        _FAILED = True


def _barrier_within(group, seconds: float) -> bool:
    """A barrier on `group` that returns within `seconds` on every rank: True when every rank arrived.
    (monitored_barrier's timeout holds on rank 0 only: a rank > 0 whose rank 0 never came - failed, or
    waiting in a collective with a failed peer - waited for ever, and torchrun never ended the job.)"""
    import threading
    arrived = []

    def wait():
        try:
            dist.monitored_barrier(group=group, timeout=datetime.timedelta(seconds=seconds))
            arrived.append(True)
        except Exception as e:  # noqa: BLE001 - a peer gone at exit
            log.warning("parallel: exit barrier failed (%s: %s)", type(e).__name__, e)
    t = threading.Thread(target=wait, name="lx2v-exit-barrier", daemon=True)
    t.start()
    t.join(seconds + 5)
    return bool(arrived) or not t.is_alive()


def _shutdown() -> None:
    """At exit: every rank reaches this point (a gloo barrier on the control group, at most EXIT_BARRIER_S on
    every rank) before any tears the groups down; one rank destroying its gloo groups while a peer still ran
    aborted a CPU run once under load ("terminate called without an active exception", not reproduced). A
    rank that failed (mark_failed) tears down at once: a peer waiting for it in a collective then fails
    instead of waiting out the group's 30-minute timeout. A barrier still waiting at its limit ends the
    process (exit code 1): destroying the groups under it could block as well."""
    global _STATE
    state, _STATE = _STATE, None
    if not dist.is_initialized():
        return
    if state is not None and state.control is not None and state.world_size > 1 and not _FAILED:
        if not _barrier_within(state.control, EXIT_BARRIER_S):
            log.warning("parallel: a peer did not reach the exit barrier within %d s; exiting without tearing "
                        "the process groups down", EXIT_BARRIER_S)
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except (OSError, ValueError):
                    pass
            os._exit(1)
    dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------
# VAE decode over all ranks
# ----------------------------------------------------------------------------------------------------

def assign_tiles(sizes: list[int], world: int) -> list[int]:
    """Owner rank of each tile: largest first to the least loaded rank (ties: lowest rank). Deterministic,
    so every rank computes the same assignment."""
    load = [0] * world
    owner = [0] * len(sizes)
    for k in sorted(range(len(sizes)), key=lambda k: (-sizes[k], k)):
        r = min(range(world), key=lambda r: (load[r], r))
        owner[k] = r
        load[r] += sizes[k]
    return owner


def decode_tiled(vae, z: torch.Tensor, tiled, par: Parallel) -> torch.Tensor | None:
    """vae.decode(z, tiled) with its tiles decoded on all ranks: each rank decodes the tiles it owns
    (assign_tiles), sends them to rank 0, which blends them as the one-process tiled decode does. Returns
    the video on rank 0, None elsewhere. Every rank calls it with the same z."""
    tiles = vae.decode_tiles(z, tiled)
    if tiles is None:  # no larger than one tile: rank 0 decodes it whole
        return vae.decode(z) if par.is_main else None
    owner = assign_tiles([t.shape[-2] * t.shape[-1] for t in tiles], par.world_size)
    mine = {k: vae.decode_tile(t) for k, t in enumerate(tiles) if owner[k] == par.rank}
    if not par.is_main:
        for k in sorted(mine):  # in tile order: rank 0 receives in tile order
            dist.send(mine.pop(k).contiguous(), dst=0)
        return None

    def result(k: int, zt: torch.Tensor) -> torch.Tensor:
        if owner[k] == 0:
            return mine.pop(k)
        b, _, n, h, w = zt.shape
        buf = torch.empty((b, 3, 1 + 4 * (n - 1), 8 * h, 8 * w), dtype=torch.float32, device=zt.device)
        dist.recv(buf, src=owner[k])
        return buf
    return vae.decode(z, tiled, tile_results=result)
