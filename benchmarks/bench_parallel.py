"""Multi-GPU scaling: one DiT step with sequence parallelism against the same DiT on one GPU, same run.

    torchrun --nproc_per_node=N benchmarks/bench_parallel.py [--preset 1.3b|14b] [--mode ulysses|ring] [--720p]

Random bf16 weights (broadcast from rank 0), 480p 81 frames by default. Measured, medians of CUDA-event
timings (perf_counter on the CPU), inputs prepared outside the timed region:
- `step_ms_1gpu`: the unsharded forward on rank 0 alone (the others wait at a barrier);
- `step_ms_seq_p<N>`: the forward with the tokens split over the N ranks (all ranks; rank 0's time);
- `speedup` = 1gpu / seq_p, `efficiency` = speedup / N, and the relative L2 distance of the two outputs;
- `comm_gbps`: the bus bandwidth of one layer's collective at the step's size ((N-1)/N x bytes / time): the
  q/k/v all-to-all (ulysses) or the k/v all-gather (ring);
- the same with seq_p_quant_scheme "fp8" (the collective moves fp8 rows + scales): `step_ms_seq_p<N>_fp8comm`,
  `fp8comm_speedup` (bf16 collectives / fp8 ones, whole step), `relerr_fp8comm_vs_1gpu`, and `comm_ms_fp8`
  (one layer's packing, collective and unpacking).
Rank 0 prints a table and writes parallel_summary.json (+ a row in parallel.csv) into --out ($OUT or
benchmarks/out). `--preset tiny --frames 9 --height 64 --width 96` runs on CPUs with gloo (the tests).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_e2e import dit_inputs, env_info, rel_l2, timer  # noqa: E402
from csv_history import append_csv  # noqa: E402

from lightx2v_engine.config import PRESETS  # noqa: E402
from lightx2v_engine.loading import build_dit  # noqa: E402
from lightx2v_engine.parallel import (ParallelConfig, SeqParallel, all_gather, all_to_all, init_parallel,  # noqa: E402
                                      pack_fp8_rows, unpack_fp8_rows)

PRESET_NAMES = {"1.3b": "wan2.1-t2v-1.3b", "14b": "wan2.1-t2v-14b", "tiny": "tiny"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="1.3b", choices=sorted(PRESET_NAMES))
    p.add_argument("--mode", default="ulysses", choices=["ulysses", "ring"])
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--720p", dest="p720", action="store_true", help="720x1280")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--device", default=None, help="cuda (one GPU per rank, NCCL; the default when there is a GPU) "
                   "or cpu (gloo)")
    p.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "benchmarks" / "out"))
    args = p.parse_args(argv)
    if args.p720:
        args.height, args.width = 720, 1280
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world < 2:
        raise SystemExit("bench_parallel.py: run it under torchrun with --nproc_per_node >= 2")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    par = init_parallel(ParallelConfig(seq_p_size=world, seq_p_attn_type=args.mode), device)
    device = par.device
    cfg = PRESETS[PRESET_NAMES[args.preset]]
    par.seq.check_heads(cfg.num_heads)
    dt = torch.bfloat16
    torch.manual_seed(0)
    model = build_dit(cfg, None, dtype=dt, device=device)
    par.broadcast_module_(model)
    x, ctx, clip, y = dit_inputs(cfg, args.frames, args.height, args.width, device, dt)
    for tensor in (x, ctx, clip, y):
        par.broadcast_(tensor)
    t = torch.tensor([937.5], device=device)
    run = timer(device, args.iters)
    summary = {"preset": args.preset, "mode": args.mode, "world_size": world,
               "shape": f"{args.frames}x{args.height}x{args.width}", **env_info(device)}

    with torch.no_grad():
        ref = None
        if par.is_main:  # the one-GPU baseline, in this run
            summary["step_ms_1gpu"] = run(lambda: model(x, t, ctx, clip, y), warmup=1)
            ref = model(x, t, ctx, clip, y)
        dist.barrier()
        model.seq_parallel = par.seq
        summary[f"step_ms_seq_p{world}"] = ms = run(lambda: model(x, t, ctx, clip, y), warmup=1)
        out = model(x, t, ctx, clip, y)
        model.seq_parallel = SeqParallel(par.seq.group, args.mode, "fp8")
        summary[f"step_ms_seq_p{world}_fp8comm"] = ms8 = run(lambda: model(x, t, ctx, clip, y), warmup=1)
        out8 = model(x, t, ctx, clip, y)
        model.seq_parallel = par.seq
        # one layer's collective at this step's size: the q/k/v all-to-all [world, 3, 1, Ls, H/world, D], or
        # the k/v all-gather of [Ls, 1, 2, H, D] per rank; bus bytes = (world-1)/world of the full buffer
        L = ((args.frames - 1) // 4 + 1) * (args.height // 16) * (args.width // 16)
        ls = -(-L // world)
        if args.mode == "ulysses":
            buf = torch.randn(world, 3, 1, ls, cfg.num_heads // world, cfg.head_dim, device=device).to(dt)
            collective = all_to_all
            nbytes = buf.numel() * buf.element_size()
        else:
            buf = torch.randn(ls, 1, 2, cfg.num_heads, cfg.head_dim, device=device).to(dt)
            collective = all_gather
            nbytes = buf.numel() * buf.element_size() * world
        comm_ms = run(lambda: collective(buf, par.seq.group), warmup=1)
        comm_ms_fp8 = run(lambda: unpack_fp8_rows(collective(pack_fp8_rows(buf), par.seq.group), dt), warmup=1)
    if par.is_main:
        base = summary["step_ms_1gpu"]
        summary.update(speedup=base / ms, efficiency=base / ms / world, relerr_vs_1gpu=rel_l2(out, ref),
                       comm_ms=comm_ms, comm_gbps=nbytes * (world - 1) / world / (comm_ms * 1e-3) / 1e9,
                       fp8comm_speedup=ms / ms8, relerr_fp8comm_vs_1gpu=rel_l2(out8, ref), comm_ms_fp8=comm_ms_fp8)
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "parallel_summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        append_csv(os.path.join(args.out, "parallel.csv"), list(summary), [summary])
        print(f"{'figure':<24} value   ({summary['gpu']}, {args.preset}, {summary['shape']}, {args.mode})")
        for k in ("step_ms_1gpu", f"step_ms_seq_p{world}", "speedup", "efficiency", "relerr_vs_1gpu",
                  "comm_ms", "comm_gbps", f"step_ms_seq_p{world}_fp8comm", "fp8comm_speedup",
                  "relerr_fp8comm_vs_1gpu", "comm_ms_fp8"):
            print(f"{k:<24} {summary[k]:.4g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
