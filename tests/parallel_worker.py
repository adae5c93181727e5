"""One rank of tests/test_parallel.py's DiT checks (run by torchrun, gloo on the CPU; also on GPUs with NCCL).

    torchrun --standalone --nproc_per_node=N tests/parallel_worker.py OUT_JSON cpu|cuda

Each case builds a small fp32 DiT with the same seed on every rank, runs it on one process' worth of input
with and without sequence parallelism, and rank 0 writes {case: {"rel": relative L2 error, "tokens": the
self-attention input rows seen on this rank, "error": message}} to OUT_JSON.
"""
from __future__ import annotations

import json
import os
import sys

import torch

# "cuda": one GPU per rank (NCCL); "cpu": gloo, the Triton kernels in the interpreter (chosen before triton
# is imported)
USE_CUDA = sys.argv[2] == "cuda"
if not USE_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from lightx2v_engine import ops, parallel  # noqa: E402
from lightx2v_engine.config import ModelConfig
from lightx2v_engine.loading import build_dit  # noqa: E402
from lightx2v_engine.parallel import ParallelConfig, SeqParallel, decode_tiled, init_parallel  # noqa: E402
from lightx2v_engine.vae import VAEConfig, random_vae  # noqa: E402

# (name, heads, head_dim, mode, latent grid (F, H, W) before the 1x2x2 patching, i2v, ops backend)
# fp32 with the PyTorch ops; "kernels": the Triton kernels in fp16 (bf16 on a GPU), head_dim 128 as they need
CASES = [
    ("ulysses_odd_len", 2, 32, "ulysses", (3, 10, 14), False, "torch"),    # 105 tokens: the last shard is padded
    ("ring_three_heads", 3, 32, "ring", (3, 10, 14), False, "torch"),
    ("ulysses_i2v", 2, 32, "ulysses", (2, 6, 10), True, "torch"),
    ("ulysses_three_heads", 3, 32, "ulysses", (3, 10, 14), False, "torch"),  # an error unless 3 % world == 0
    ("ring_tiny_len", 2, 32, "ring", (1, 4, 4), False, "torch"),           # 4 tokens: with 3 ranks the last has none
    ("ulysses_tiny_len", 4, 32, "ulysses", (1, 4, 4), False, "torch"),
    ("ulysses_kernels", 2, 128, "ulysses", (3, 6, 10), False, "kernels"),  # 45 tokens
    ("ring_kernels", 2, 128, "ring", (3, 6, 10), False, "kernels"),
    # seq_p_quant_scheme "fp8": the collectives move fp8 rows with their scales
    ("ulysses_fp8", 2, 32, "ulysses", (3, 10, 14), False, "torch", "fp8"),
    ("ring_fp8", 2, 32, "ring", (3, 10, 14), False, "torch", "fp8"),
    ("ulysses_fp8_kernels", 2, 128, "ulysses", (3, 6, 10), False, "kernels", "fp8"),
]


def run_case(heads: int, head_dim: int, mode: str, grid: tuple[int, int, int], i2v: bool, backend: str,
             quant: str | None, device: torch.device) -> dict:
    cfg = ModelConfig("custom", "i2v" if i2v else "t2v", heads * head_dim, 96, heads, 2, in_dim=36 if i2v else 16,
                      text_dim=48, image_dim=40)
    dtype = torch.float32 if backend == "torch" else (torch.bfloat16 if device.type == "cuda" else torch.float16)
    torch.manual_seed(0)
    dit = build_dit(cfg, None, dtype=dtype, device=device)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, *grid, generator=g).to(device)
    t = torch.tensor([700.0], device=device)
    ctx = torch.randn(1, 12, 48, generator=g).to(device)
    clip_fea = torch.randn(1, 257, 40, generator=g).to(device) if i2v else None
    y = torch.randn(1, 20, *grid, generator=g).to(device) if i2v else None
    rows, moved = [], set()
    dit.blocks[0].self_attn.o.register_forward_hook(lambda m, a, o: rows.append(a[0].shape[1]))
    ops.set_backend(backend)
    try:
        with torch.no_grad():
            ref = dit(x, t, ctx, clip_fea, y)
            sp = SeqParallel(torch.distributed.group.WORLD, mode, quant)
            sp.check_heads(heads)
            dit.seq_parallel = sp
            collective = parallel.all_gather if mode == "ring" else parallel.all_to_all
            name = collective.__name__

            def spy(t, group):  # the dtype the attention's collective moves
                moved.add(str(t.dtype))
                return collective(t, group)
            setattr(parallel, name, spy)
            try:
                out = dit(x, t, ctx, clip_fea, y)
            finally:
                setattr(parallel, name, collective)
    finally:
        ops.set_backend("auto")
    return {"rel": ((out - ref).norm() / ref.norm()).item(), "tokens": rows[-1], "shape": list(out.shape),
            "moved": sorted(moved)}


def vae_case(par, device) -> dict:
    """decode_tiled over all ranks against the one-process tiled decode (bit for bit), 2 x 2 tiles of
    unequal sizes (latents 1 x 34 x 30 -> 1 x 272 x 240 pixels; tile 32, stride 24 latents)."""
    vae = random_vae(VAEConfig.tiny(), device=device, seed=3)
    z = torch.randn(1, 16, 1, 34, 30, generator=torch.Generator().manual_seed(2)).to(device)
    tiles = vae.decode_tiles(z, True)
    got = decode_tiled(vae, z, True, par)
    if not par.is_main:
        return {"tiles": len(tiles), "none": got is None}
    want = vae.decode(z, tiled=True)
    return {"tiles": len(tiles), "equal": bool(torch.equal(got, want)),
            "differs_from_untiled": bool((vae.decode(z) - want).abs().max() > 1e-4)}


def pipeline_case(world: int, device: torch.device) -> dict:
    """A tiny I2V pipeline: the encoders live on rank 0 only; rank 0's failure to read the image reaches
    every rank as an error (none waits forever), and the next video is made in step on all ranks."""
    from lightx2v_engine.pipeline import Pipeline
    size = {"target_video_length": 5, "target_height": 32, "target_width": 48}
    image = torch.rand(3, 40, 56, generator=torch.Generator().manual_seed(5)) * 2 - 1
    torch.manual_seed(0)
    pipe = Pipeline.random("tiny-i2v", {**size, "parallel": {"seq_p_size": world, "seq_p_attn_type":
                                                             "ulysses" if world == 2 else "ring"}}, device=device)
    try:
        pipe.generate("a cat", image="/nonexistent/in.png", seed=1)
        error = None
    except (ValueError, FileNotFoundError) as e:
        error = f"{type(e).__name__}: {e}"
    out = pipe.generate("a cat", image=image, seed=1)
    torch.manual_seed(0)  # the same random weights, on this rank alone
    one = Pipeline.random("tiny-i2v", size, device=device).generate("a cat", image=image, seed=1).latents
    return {"t5": pipe.t5 is not None, "clip": pipe.clip is not None, "error": error,
            "frames": None if out.frames is None else list(out.frames.shape),
            "rel_vs_one_process": ((out.latents - one).norm() / one.norm()).item()}


def main() -> None:
    out_path = sys.argv[1]
    world = int(os.environ["WORLD_SIZE"])
    device = torch.device("cuda" if USE_CUDA else "cpu")
    # (the DiT cases make their own SeqParallel; the pipeline case uses this one: the tiny model has 2 heads)
    par = init_parallel(ParallelConfig(seq_p_size=world, seq_p_attn_type="ulysses" if world == 2 else "ring"), device)
    results = {}
    for name, *case in CASES:
        if case[5] == "kernels" and world != 2:  # (the interpreter's kernels: checked at 2 ranks)
            continue
        try:
            results[name] = run_case(*case, *([None] if len(case) == 6 else []), par.device)
        except ValueError as e:
            results[name] = {"error": str(e)}
    results["vae"] = vae_case(par, par.device)
    results["device"] = par.device.type
    results["pipeline"] = pipeline_case(world, par.device)
    gathered = [None] * world
    torch.distributed.all_gather_object(gathered, results)
    if par.is_main:
        with open(out_path, "w") as f:
            json.dump(gathered, f)


if __name__ == "__main__":
    main()
