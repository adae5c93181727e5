"""CUDA-graph replay of the distill loop.

For one shape key (latent shape, context shape, CFG, I2V inputs, sampler, dtype) every denoising step
(DiT forward + scheduler update, written into one static latent buffer) is captured once into its own
graph; the graphs share one memory pool and are replayed in order. Everything per-shape (RoPE tables,
the ones tensor, Triton autotuning, cuBLAS workspaces) is prepared by one eager warm-up step before
capture. Warm-up and capture run on a stream of the latents' device (torch.cuda.graph's default capture
stream belongs to whichever device was current at the process's first capture). Replay allocates nothing
and does no host synchronisation.
"""
from __future__ import annotations

from typing import Callable

import torch


class CaptureError(RuntimeError):
    """A denoising step could not be captured (its cause chained; ended_cleanly: whether the capture itself
    was ended without an error of its own)."""
    ended_cleanly = False


def _clear_frames(error: BaseException) -> None:
    """Drops the local variables of the frames in `error`'s traceback and its causes' (a captured step's
    tensors and graphs would live as long as the error, or a log record holding it)."""
    import traceback
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        traceback.clear_frames(error.__traceback__)
        error = error.__cause__ or error.__context__


class DistillGraphs:
    def __init__(self, velocity: Callable[..., torch.Tensor], sampler,
                 x: torch.Tensor, context: torch.Tensor, neg_context: torch.Tensor | None,
                 clip_fea: torch.Tensor | None, y: torch.Tensor | None, renoise: list[torch.Tensor],
                 timesteps: torch.Tensor):
        """velocity(x, t, context, neg_context, clip_fea, y) -> v, called with `static_conds()` (so that it
        need not refer to this object: the set and its memory pool are freed by reference counting, not
        left to the cycle collector). x [1, 16, F, h, w]."""
        if not x.is_cuda:
            raise RuntimeError("CUDA graphs need CUDA tensors")
        self.velocity = velocity
        self.sampler = sampler
        clone = lambda t: None if t is None else t.clone()  # noqa: E731
        self.x = x.clone()
        self.context, self.neg_context = context.clone(), clone(neg_context)
        self.clip_fea, self.y = clone(clip_fea), clone(y)
        self.renoise = [n.clone() for n in renoise]
        self.ts = timesteps.clone()
        self.graphs: list[torch.cuda.CUDAGraph] = []
        # warm-up and capture on a stream of x's device: torch.cuda.graph's own capture stream is made once
        # per process, on the device current then (a pipeline on cuda:1 after one on cuda:0 captured on GPU 0)
        self.stream = torch.cuda.Stream(device=x.device)
        self.warmed_up = False

    def static_conds(self):
        return self.context, self.neg_context, self.clip_fea, self.y

    def _body(self, i: int) -> None:
        v = self.velocity(self.x, self.ts[i:i + 1], *self.static_conds())
        noise = self.renoise[i] if i < len(self.renoise) else None
        self.x.copy_(self.sampler.step(i, self.x, v, noise))

    def warm_up(self) -> None:
        """One eager step on the capture stream (x is restored after it): per-shape plans, autotuning,
        workspaces. Its errors are the model's, not the graphs'."""
        x0 = self.x.clone()
        main = torch.cuda.current_stream(self.x.device)
        self.stream.wait_stream(main)
        with torch.cuda.stream(self.stream):
            self._body(0)
        main.wait_stream(self.stream)
        torch.cuda.synchronize(self.x.device)
        self.x.copy_(x0)
        self.warmed_up = True

    def capture(self) -> None:
        """One graph per step (warm_up first, when not run yet). Raises CaptureError naming the step (the
        cause chained); a warm-up error as it is."""
        if not self.warmed_up:
            self.warm_up()
        x0 = self.x.clone()
        main = torch.cuda.current_stream(self.x.device)
        pool = None
        error = None
        try:
            for i in range(self.sampler.num_steps):
                g = torch.cuda.CUDAGraph()
                cause = None
                try:
                    with torch.cuda.graph(g, pool=pool, stream=self.stream):
                        try:
                            self._body(i)
                        except Exception as e:  # kept: ending the broken capture raises an error of its own
                            cause = e
                            raise
                except Exception as e:
                    first = cause or e
                    error = CaptureError(f"CUDA-graph capture of denoising step {i + 1} failed: "
                                         f"{type(first).__name__}: {first}")
                    error.__cause__ = first
                    # the capture ended cleanly (only the step's own error came out): else ending it failed
                    # too, and PyTorch may keep that graph's pool and a capture-underway mark in its allocator
                    error.ended_cleanly = cause is not None and e is cause
                    g = cause = first = None  # (the error must keep no graph of this frame alive: the
                    break                     #  failed set and its memory pool are freed at once)
                pool = g.pool()
                self.graphs.append(g)
        finally:
            torch.cuda.set_stream(main)  # a capture that failed to end leaves its stream current
        if error is not None:
            self.graphs.clear()
            _clear_frames(error)
            raise error
        self.x.copy_(x0)

    def set_inputs(self, x, context, neg_context, clip_fea, y, renoise) -> None:
        """Copies this call's inputs into the static buffers (shapes are those of the key). Buffers made
        under torch.inference_mode are inference tensors: written in that mode whatever the caller's."""
        with torch.inference_mode(self.x.is_inference()):
            self._set_inputs(x, context, neg_context, clip_fea, y, renoise)

    def _set_inputs(self, x, context, neg_context, clip_fea, y, renoise) -> None:
        self.x.copy_(x)
        self.context.copy_(context)
        for dst, src in ((self.neg_context, neg_context), (self.clip_fea, clip_fea), (self.y, y)):
            if dst is not None:
                dst.copy_(src)
        for dst, src in zip(self.renoise, renoise):
            dst.copy_(src)

    def run_step(self, i: int) -> torch.Tensor:
        """Replays step i; returns the static latent buffer (valid until the next replay)."""
        self.graphs[i].replay()
        return self.x
