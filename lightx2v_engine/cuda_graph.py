"""CUDA-graph replay of the distill loop.

For one shape key (latent shape, context shape, CFG, I2V inputs, sampler, dtype) every denoising step
(DiT forward + scheduler update, written into one static latent buffer) is captured once into its own
graph; the graphs share one memory pool and are replayed in order. Everything per-shape (RoPE tables,
the ones tensor, Triton autotuning, cuBLAS workspaces) is prepared by one eager warm-up step on a side
stream before capture. Replay allocates nothing and does no host synchronisation.
"""
from __future__ import annotations

from typing import Callable

import torch


class DistillGraphs:
    def __init__(self, velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], sampler,
                 x: torch.Tensor, context: torch.Tensor, neg_context: torch.Tensor | None,
                 clip_fea: torch.Tensor | None, y: torch.Tensor | None, renoise: list[torch.Tensor],
                 timesteps: torch.Tensor):
        """velocity(x, t) -> v reads the conditioning from `static_conds()`; x [1, 16, F, h, w]."""
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

    def static_conds(self):
        return self.context, self.neg_context, self.clip_fea, self.y

    def _body(self, i: int) -> None:
        v = self.velocity(self.x, self.ts[i:i + 1])
        noise = self.renoise[i] if i < len(self.renoise) else None
        self.x.copy_(self.sampler.step(i, self.x, v, noise))

    def capture(self) -> None:
        x0 = self.x.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._body(0)  # warm-up: per-shape plans, autotuning, workspaces
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        stream = torch.cuda.current_stream()
        pool = None
        try:
            for i in range(self.sampler.num_steps):
                g = torch.cuda.CUDAGraph()
                cause = None
                try:
                    with torch.cuda.graph(g, pool=pool):
                        try:
                            self._body(i)
                        except Exception as e:  # kept: ending the broken capture raises an error of its own
                            cause = e
                            raise
                except Exception as e:
                    first = cause or e
                    raise RuntimeError(f"CUDA-graph capture of denoising step {i + 1} failed: "
                                       f"{type(first).__name__}: {first}") from first
                pool = g.pool()
                self.graphs.append(g)
        finally:
            torch.cuda.set_stream(stream)  # a capture that failed to end leaves its stream current
        self.x.copy_(x0)

    def set_inputs(self, x, context, neg_context, clip_fea, y, renoise) -> None:
        """Copies this call's inputs into the static buffers (shapes are those of the key)."""
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
