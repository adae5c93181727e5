"""Where one DiT step's GPU time goes: torch.profiler over one forward at real shapes, CUDA time by kernel.

    python benchmarks/profile_step.py [--preset wan2.1-t2v-1.3b] [--8bit] [--attn8] [--top 25]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

try:
    import lightx2v_engine  # noqa: F401  (installed, e.g. pip install -e .)
except ImportError:  # (a bare checkout, e.g. gpu_check.sh without its install stage)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="wan2.1-t2v-1.3b")
    p.add_argument("--8bit", dest="eight", action="store_true", help="fp8 linears")
    p.add_argument("--attn8", action="store_true", help="and 8-bit self-attention (implies --8bit)")
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_step: needs a CUDA GPU")
        return 0
    from lightx2v_engine.config import PRESETS
    from lightx2v_engine.loading import build_dit
    cfg = PRESETS[args.preset]
    model = build_dit(cfg, None, dtype=torch.bfloat16, device="cuda")
    if args.eight or args.attn8:
        from lightx2v_engine.quant import quantize_dit_
        quantize_dit_(model, "fp8")
    if args.attn8:
        model.set_attention_8bit(True)
    x = torch.randn(1, 16, 21, 60, 104, device="cuda")
    ctx = torch.randn(1, 512, cfg.text_dim, device="cuda", dtype=torch.bfloat16)
    t = torch.tensor([937.5], device="cuda")
    with torch.no_grad():
        for _ in range(2):
            model(x, t, ctx)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            model(x, t, ctx)
            torch.cuda.synchronize()
    events = prof.key_averages()
    total = sum(e.device_time_total for e in events if e.device_time_total > 0 and not e.key.startswith("aten::"))
    rows = sorted((e for e in events if e.device_time_total > 0 and not e.key.startswith("aten::")),
                  key=lambda e: -e.device_time_total)[: args.top]
    from lightx2v_engine import ops
    print(f"{args.preset} one step, CUDA kernel time {total / 1e3:.1f} ms; {ops.describe(x.device, attn_8bit=args.attn8)}")
    for e in rows:
        print(f"  {e.device_time_total / 1e3:9.2f} ms {100 * e.device_time_total / total:5.1f}%  x{e.count:<4} {e.key[:90]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
