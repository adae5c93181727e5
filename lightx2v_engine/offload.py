"""DiT block offload: LightX2V's ``cpu_offload`` with ``offload_granularity`` "block" (and "phase").

The blocks' weights live in host memory (page-locked when a CUDA device runs them), one packed byte buffer
per block. Two device slots, each the size of the largest block, take turns: while block i computes from one
slot, a side stream copies block i + 1 into the other (double buffering, as LightX2V's block offload); the
last block prefetches block 0 for the next forward. Only the non-block parameters (patch/text/time
embeddings, head: about 0.5 GB at 14B) stay resident, so the DiT's device weights are those plus two
blocks (14B bf16: about 2 GB instead of 28 GB).

Ordering, per slot s (events on the device's streams, no host synchronisation):
    copy into s  waits for  "freed[s]": the compute that last read s has finished
    compute from s  waits for  "loaded[s]": the copy into s has finished
While a block is not computing, its parameters are views of its host buffer (``state_dict()`` and LoRA
code see host tensors); for its forward they are rebound to views of its slot. Contract, as for the
encoder offload: weights are not changed while offloaded (a later change of the host tensors reaches the
device, but a block already prefetched keeps the old copy until it is loaded again).
"""
from __future__ import annotations

import contextlib
import logging
import weakref
from dataclasses import dataclass

import torch
import torch.nn as nn

log = logging.getLogger(__name__)

ALIGN = 256  # bytes: every tensor of a packed block starts at a multiple (TMA and vector loads need >= 16)
NUM_SLOTS = 2


@dataclass(frozen=True)
class _Entry:
    """One parameter or buffer of a block: where it lives in the block's packed buffer."""
    module: nn.Module
    name: str
    is_param: bool
    offset: int
    nbytes: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _view(buf: torch.Tensor, e: _Entry) -> torch.Tensor:
    """The tensor of entry `e` inside the byte buffer `buf` (host pack or device slot)."""
    return buf[e.offset:e.offset + e.nbytes].view(e.dtype).as_strided(e.shape, e.stride)


def _dense_stride(t: torch.Tensor) -> tuple[int, ...]:
    """t's strides when its elements fill numel consecutive slots in some dimension order (row-major,
    channels_last(_3d), ...: the layout is kept), else row-major strides."""
    expected = 1
    for d in sorted(range(t.dim()), key=t.stride):
        if t.shape[d] != 1 and t.stride(d) != expected:
            return torch.empty(t.shape, device="meta").stride()
        expected *= t.shape[d]
    return t.stride()


def _bind(entries: list[_Entry], buf: torch.Tensor) -> None:
    """Points every parameter/buffer of `entries` at its view of `buf` (Parameters stay the same objects)."""
    for e in entries:
        t = _view(buf, e)
        if e.is_param:
            e.module._parameters[e.name].data = t
        else:
            e.module._buffers[e.name] = t


class _Pack:
    """The parameters and buffers of `modules` (a block's: ``block.modules()``) in one host byte buffer, a
    single copy moving them all; the modules' tensors become views of it."""

    def __init__(self, modules, pin: bool, where: tuple[nn.Module, str] | None = None,
                 device: torch.device | None = None):
        """where: (the block, its name in the model), for error messages only; device: the CUDA device the
        pack is copied to (the one synchronized before its page-locking ends)."""
        entries, off = [], 0
        for m in modules:
            for store, is_param in ((m._parameters, True), (m._buffers, False)):
                for name, t in store.items():
                    if t is None:
                        continue
                    if t.device.type == "meta":
                        path = type(m).__name__
                        if where is not None:
                            path = next((f"{where[1]}.{n}".rstrip(".") for n, mm in where[0].named_modules()
                                         if mm is m), path)
                        raise ValueError(f"block offload: {path}.{name} {tuple(t.shape)} has no data (meta "
                                         f"tensor): load the weights before offloading")
                    nbytes = t.numel() * t.element_size()
                    entries.append(_Entry(m, name, is_param, off, nbytes, tuple(t.shape), _dense_stride(t),
                                          t.dtype))
                    off = _align(off + nbytes)
        self.entries, self.nbytes = entries, off
        self.host = _host_buffer(off, pin, self, device)
        for e in entries:
            _view(self.host, e).copy_(_tensor(e).detach())
        _bind(entries, self.host)  # the block's own tensors (wherever they were) are released here

    def is_current(self) -> bool:
        """Whether the modules still hold exactly the tensors packed here (an 8-bit linear that got new LoRA
        branch tensors, or had them put back, no longer does)."""
        base = self.host.data_ptr()
        for e in self.entries:
            t = _tensor(e)
            if t is None or t.data_ptr() != base + e.offset or tuple(t.shape) != e.shape or t.dtype != e.dtype:
                return False
        packed = {(id(e.module), e.name) for e in self.entries}
        modules = {id(e.module): e.module for e in self.entries}.values()
        return not any(t is not None and (id(m), name) not in packed
                       for m in modules for name, t in (*m._parameters.items(), *m._buffers.items()))


def _tensor(e: _Entry) -> torch.Tensor | None:
    return e.module._parameters.get(e.name) if e.is_param else e.module._buffers.get(e.name)


PAGE = 4096
_PIN_WARNED = False


_LOCKED: dict[int, int] = {}  # start address -> byte length of each host range page-locked by _page_lock


def is_page_locked(t: torch.Tensor) -> bool:
    """Whether t's host memory is page-locked: torch's pinned memory, or a range this module registered
    (cudaHostRegister; torch 2.11's is_pinned() reports such memory as not pinned, although copies from it
    run by DMA: 54.6 GB/s host-to-device on an H200, 2026-11-27)."""
    if t.device.type != "cpu" or not t.numel():
        return False
    ptr = t.data_ptr()  # the bytes t spans: its last element's offset (strided views too), plus one element
    end = ptr + (sum((size - 1) * stride for size, stride in zip(t.shape, t.stride())) + 1) * t.element_size()
    return any(start <= ptr and end <= start + n for start, n in tuple(_LOCKED.items())) or t.is_pinned()


def _host_buffer(nbytes: int, pin: bool, owner, device: torch.device | None = None) -> torch.Tensor:
    """A host byte buffer of `nbytes`; with `pin`, page-aligned, a whole number of pages long and
    page-locked in place until `owner` is garbage (a registration must not share a page with another).
    `device`: the CUDA device whose copies use the buffer (synchronized before the unlock; None: the
    current device)."""
    if not pin or not nbytes:
        return torch.empty(nbytes, dtype=torch.uint8)
    span = -(-nbytes // PAGE) * PAGE
    raw = torch.empty(span + PAGE, dtype=torch.uint8)
    start = -raw.data_ptr() % PAGE
    buf = raw[start:start + span]
    if _page_lock(buf):
        index = device.index if device is not None and device.type == "cuda" else None
        weakref.finalize(owner, _page_unlock, buf, index)
    return buf[:nbytes]


def _cuda_code(err) -> int:
    """The integer of a torch.cuda.cudart() return value (an enum, or a tuple starting with one)."""
    if isinstance(err, tuple):
        err = err[0]
    return int(getattr(err, "value", err))


CUDA_HOST_REGISTER_PORTABLE = 1  # page-locked for every CUDA context, not only the current device's


def _page_lock(buf: torch.Tensor) -> bool:
    """Page-locks a host buffer in place (cudaHostRegister), for asynchronous copies at full PCIe speed.
    Not torch's pin_memory: its caching host allocator rounds every allocation up to a power of two (a
    702 MB 14B block would take 1 GiB). Where locking fails (e.g. a locked-memory limit), pageable memory
    (copies slower, no longer overlapping compute), with one warning per process."""
    global _PIN_WARNED
    try:
        code = _cuda_code(torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), buf.numel(),
                                                               CUDA_HOST_REGISTER_PORTABLE))
    except Exception as e:  # noqa: BLE001 - no CUDA runtime: the same fallback
        code, why = -1, f"{type(e).__name__}: {e}"
    else:
        why = f"cudaHostRegister returned error {code}"
    if code == 0:
        _LOCKED[buf.data_ptr()] = buf.numel()
        return True
    if not _PIN_WARNED:
        _PIN_WARNED = True
        log.warning("offload: page-locking host memory failed (%s); pageable buffers are used, and copies to "
                    "the GPU are slower and no longer overlap compute", why)
    return False


def _page_unlock(buf: torch.Tensor, index: int | None = None) -> None:
    """Ends a page-locking once no copy queued on device `index` (None: the current one) still uses the
    buffer. Only that device: synchronizing every visible one created a CUDA context (~0.5 GB) on each GPU
    the process never used (every torchrun rank on every card)."""
    _LOCKED.pop(buf.data_ptr(), None)
    try:
        if torch.cuda.is_initialized():
            torch.cuda.synchronize(torch.cuda.current_device() if index is None else index)
    except Exception:  # noqa: BLE001 - a sticky CUDA error: unregister anyway (the memory is freed next)
        pass
    try:
        torch.cuda.cudart().cudaHostUnregister(buf.data_ptr())
    except Exception:  # noqa: BLE001 - at interpreter exit the CUDA runtime may be gone
        pass


class CudaRuntime:
    """Copies on a side stream of `device`; events order them against the compute stream."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device)

    def copy(self, dst: torch.Tensor, src: torch.Tensor, after) -> torch.cuda.Event:
        """dst <- src on the side stream once event `after` (or nothing) has happened; returns its done event."""
        with torch.cuda.stream(self.stream):
            if after is not None:
                self.stream.wait_event(after)
            dst.copy_(src, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(self.stream)
        return ev

    def wait(self, event) -> None:
        """The compute (current) stream waits for `event`."""
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)

    def mark(self) -> torch.cuda.Event:
        """An event after the work queued on the compute stream so far."""
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(self.device))
        return ev

    def synchronize(self) -> None:
        """Waits for every copy queued on the side stream (before host or slot memory goes away)."""
        self.stream.synchronize()

    def adopt(self, slot: torch.Tensor) -> None:
        """Tells the caching allocator that `slot` is used on the side stream too: once freed, it is reused
        only after the side stream's work queued by then."""
        slot.record_stream(self.stream)


class SyncRuntime:
    """CPU devices: every copy is done when it returns, so there is nothing to wait for."""

    def copy(self, dst: torch.Tensor, src: torch.Tensor, after) -> None:
        dst.copy_(src)

    def wait(self, event) -> None:
        pass

    def mark(self) -> None:
        return None

    def synchronize(self) -> None:
        pass

    def adopt(self, slot: torch.Tensor) -> None:
        pass


class BlockOffload:
    """Streams the blocks of a ModuleList through NUM_SLOTS device slots; see the module docstring.

    Use: ``for block in offload.blocks(): x = block(x, ...)`` - each block is yielded with its weights on
    the device and rebound to its host buffer when the loop moves on (also on an exception)."""

    def __init__(self, blocks: nn.ModuleList, device: torch.device | str, *, pin: bool | None = None,
                 runtime=None):
        device = torch.device(device)
        self.pin = (device.type == "cuda") if pin is None else pin
        self.module_list = blocks
        self.device = device
        self.runtime = runtime if runtime is not None else (
            CudaRuntime(device) if device.type == "cuda" else SyncRuntime())
        self.packs = [_Pack(b.modules(), self.pin, (b, f"blocks.{i}"), device) for i, b in enumerate(blocks)]
        release_freed_host_memory()  # (the loader's tensors the packs replaced)
        self.slots: list[torch.Tensor] = []
        self._stale = False  # a refresh has not finished (it failed): the next forward refreshes first
        self._make_slots()
        # queued side-stream copies finish before the packs (and their page-locking) go
        weakref.finalize(self, self.runtime.synchronize)

    def _make_slots(self) -> None:
        size = max((p.nbytes for p in self.packs), default=0)
        self.slots = []  # the old slots go first (refresh synchronized): no peak of old plus new
        self.slots = [torch.empty(size, dtype=torch.uint8, device=self.device) for _ in range(NUM_SLOTS)]
        for slot in self.slots:
            self.runtime.adopt(slot)
        self.holds: list[int | None] = [None] * NUM_SLOTS  # block index whose copy was issued into each slot
        self.loaded: list = [None] * NUM_SLOTS             # event: that copy has finished
        # event: the last compute reading the slot has finished (at first: the work queued before the slot
        # was allocated, which may still use its recycled memory)
        self.freed: list = [self.runtime.mark()] * NUM_SLOTS

    @property
    def host_bytes(self) -> int:
        return sum(p.nbytes for p in self.packs)

    @property
    def device_bytes(self) -> int:
        return sum(s.numel() for s in self.slots)

    def _load(self, i: int, slot: int) -> None:
        pack = self.packs[i]
        self.loaded[slot] = self.runtime.copy(self.slots[slot][:pack.nbytes], pack.host, self.freed[slot])
        self.holds[slot] = i

    def blocks(self):
        """Yields the blocks in order, each bound to a device slot holding its weights."""
        if self._stale:  # (a refresh that failed - out of memory for the new slots - is retried here)
            self.refresh()
        n = len(self.packs)
        prev = None  # the slot of the previous block
        for i, block in enumerate(self.module_list):
            if i in self.holds:
                slot = self.holds.index(i)
            else:  # not prefetched (first forward): the slot the previous block did not use
                slot = 0 if prev is None else (prev + 1) % NUM_SLOTS
                self._load(i, slot)
            self.runtime.wait(self.loaded[slot])
            nxt, other = (i + 1) % n, (slot + 1) % NUM_SLOTS
            if n > 1 and self.holds[other] != nxt:  # prefetch behind this block's compute
                self._load(nxt, other)
            pack = self.packs[i]
            _bind(pack.entries, self.slots[slot])
            try:
                yield block
            finally:
                try:
                    self.freed[slot] = self.runtime.mark()  # after this block's kernels (also a failed forward's)
                finally:
                    _bind(pack.entries, pack.host)  # (the block back on its host pack even if that fails)
            prev = slot

    def drop_prefetch(self) -> None:
        """Forgets what the slots hold (the next forward copies every block again): after the host weights
        were changed in place."""
        self.holds = [None] * NUM_SLOTS

    def refresh(self) -> None:
        """After the blocks' weights changed between forwards (a LoRA switch): re-packs the blocks whose
        tensors were replaced or added (an 8-bit linear's LoRA branches), resizes the slots to the largest
        block (grown by a LoRA's branches, shrunk back when they go), and forgets the prefetched copies
        (in-place changes of host weights are read at the next copy)."""
        self._stale = True  # (until it completes: a failure part-way leaves no slots or an old pack)
        self.runtime.synchronize()  # no copy may still read a pack that goes, or write a slot that goes
        for i, block in enumerate(self.module_list):
            if not self.packs[i].is_current():
                self.packs[i] = _Pack(block.modules(), self.pin, (block, f"blocks.{i}"), self.device)
        if not self.slots or max((p.nbytes for p in self.packs), default=0) != self.slots[0].numel():
            self._make_slots()
        self.drop_prefetch()
        self._stale = False


def release_freed_host_memory() -> None:
    """Returns the C heap's free memory to the OS (glibc malloc_trim): packing a loaded model frees the
    loader's tensors, which glibc keeps in its heap (measured on the CPU: 1.3B bf16 resident memory 1.85x
    its file after block offload, 1.06x after the trim). No-op where there is no glibc."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def page_lock_module_(module: nn.Module, device: torch.device | None = None) -> list[_Pack]:
    """Moves the CPU weights of an offloaded `module` (encoders, VAE, a DiT moved whole) into page-locked
    packed buffers, in place, so that each move to the GPU copies by DMA at full PCIe speed (pageable
    memory: about half). A `blocks` ModuleList packs block by block (host memory grows by one block at a
    time while packing). Returns the packs (they keep the page-locking alive; it ends with them; the module
    holds them too, and a second call returns them instead of packing again). `device`: where the module
    is moved to (the device synchronized before the page-locking ends)."""
    if "_lx2v_page_locked" in module.__dict__:
        return module.__dict__["_lx2v_page_locked"]
    blocks = getattr(module, "blocks", None)
    groups = [list(b.modules()) for b in blocks] if isinstance(blocks, nn.ModuleList) else []
    in_blocks = {id(m) for g in groups for m in g}
    groups.append([m for m in module.modules() if id(m) not in in_blocks])
    packs = []
    for g in groups:
        off_cpu = [t for m in g for t in (*m._parameters.values(), *m._buffers.values())
                   if t is not None and t.device.type != "cpu"]
        if off_cpu:
            where = {id(t): n for n, t in (*module.named_parameters(remove_duplicate=False),
                                           *module.named_buffers(remove_duplicate=False))}
            named = [f"{where.get(id(t), '?')} ({t.device})" for t in off_cpu[:3]]
            raise ValueError(f"page_lock_module_: {type(module).__name__} has {len(off_cpu)} tensor(s) off the CPU, "
                             f"e.g. {', '.join(named)}: page-locking needs the model in host memory")
        packs.append(_Pack(g, pin=True, device=device))
        packs[-1].entries = ()  # (not re-bound later; kept, they made module -> packs -> module a cycle that
        # held a CLIP's 1.3 GB of page-locked memory until the cyclic garbage collector ran)
    module.__dict__["_lx2v_page_locked"] = packs
    release_freed_host_memory()
    return packs


@contextlib.contextmanager
def blocks_detached(module: nn.Module):
    """`module` without its `blocks` child for the duration (so that .to() leaves the blocks alone)."""
    blocks = module._modules.pop("blocks")
    try:
        yield module
    finally:
        module._modules["blocks"] = blocks


def attach_block_offload(dit: nn.Module, device: torch.device | str, **kwargs) -> BlockOffload:
    """Moves everything of `dit` but its blocks to `device` and streams the blocks from host memory
    (``dit.block_offload``, read by the DiT's forward). The blocks may start on any device."""
    device = torch.device(device)
    with blocks_detached(dit):
        dit.to(device)
    blocks = dit.blocks
    offload = BlockOffload(blocks, device, **kwargs)
    dit.block_offload = offload
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the blocks' former device tensors, if they were loaded there
    log.info("DiT block offload: %d blocks, %.2f GiB in host memory, %d device slots of %.2f GiB",
             len(blocks), offload.host_bytes / 2**30, NUM_SLOTS, offload.device_bytes / NUM_SLOTS / 2**30)
    return offload
