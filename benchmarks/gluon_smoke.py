"""First contact of the Gluon attention kernels with a GPU, in its own process under a short timeout.

gpu_check.sh runs this before the benchmarks. The cases go from the simplest schedule to the full one, so
that the log localises a bug: the config without ping-pong before the one with it; one key block
(prologue and tail only), a ragged single block, two blocks (one loop turn), a ragged last block (the
peeled masked step), ring wrap-around and several CTAs, two batches, then the 1.3B self-attention shape;
the 8-bit kernel last; then a NaN in one query row (the kernels' wait for P V is predicated on the row
sums and is warpgroup-aligned: the kernel must still finish, that row be NaN and every other row right).
Each case is announced before it runs (a hang shows as the last "start" line).
Rule: error <= 2 x SDPA bf16's + 1e-3 (8-bit: rel. L2 < 6%). Exit 0 when all pass, 1 on any failure;
gpu_check then sets LX2V_ATTN_GLUON_OFF=1 (also on a hang, cut by its timeout), so benchmarks and tests
leave the kernels alone.

    python benchmarks/gluon_smoke.py
"""
from __future__ import annotations

import importlib
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
try:
    import lightx2v_engine  # noqa: F401
except ImportError:
    sys.path.insert(0, str(ROOT))

# (B, Lq, Lk, H), simplest schedule first
CASES = [(1, 64, 128, 1), (1, 64, 100, 1), (1, 64, 256, 1), (1, 64, 300, 1), (1, 200, 1000, 1),
         (2, 300, 1000, 2), (1, 32760, 32760, 12)]


def _inputs(B, Lq, Lk, H):
    from bench_kernels import attention_ref32  # this folder is on sys.path when run as a script
    from lightx2v_engine.ops import attention_ref
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(B, n, H, 128, generator=g).to("cuda", torch.bfloat16) for n in (Lq, Lk, Lk))
    ref32 = attention_ref32(q, k, v)
    base = (attention_ref(q, k, v).float() - ref32).abs().max().item()
    return q, k, v, ref32, base


def _case(label: str, fn, check) -> bool:
    print(f"gluon smoke: start {label}", flush=True)
    t0 = time.time()
    try:
        out = fn()
        torch.cuda.synchronize()
        good, what = check(out)
    except Exception as e:  # noqa: BLE001 - report and fail
        print(f"gluon smoke: {label}: {type(e).__name__}: {str(e)[:300]}", flush=True)
        return False
    print(f"gluon smoke: {label}: {what} {'ok' if good else 'WRONG'} ({time.time() - t0:.1f} s incl. compile)",
          flush=True)
    return good


def main() -> int:
    G = importlib.import_module("lightx2v_engine.kernels.attention_gluon")
    if not G.available():
        print(f"gluon smoke: not applicable (HAVE_GLUON={G.HAVE_GLUON}, cuda={torch.cuda.is_available()}, "
              f"off={G.switched_off()})")
        return 0
    configs = sorted(G.GLUON_CONFIGS, key=lambda c: G.GLUON_CONFIGS[c].pingpong)  # no ping-pong first
    ok = True
    for B, Lq, Lk, H in CASES:
        q, k, v, ref32, base = _inputs(B, Lq, Lk, H)

        def exact(out):
            err = (out.float() - ref32).abs().max().item()
            return err <= 2 * base + 1e-3, f"err {err:.3e} (SDPA bf16 {base:.3e})"

        for name in configs:
            ok &= _case(f"{name} B{B} Lq{Lq} Lk{Lk} H{H}", lambda: G.attention_gluon(q, k, v, name), exact)
    for B, Lq, Lk, H in CASES:  # the 8-bit kernel (default config) after every bf16 case
        q, k, v, ref32, _ = _inputs(B, Lq, Lk, H)

        def rel(out):
            r = ((out.float() - ref32).norm() / ref32.norm()).item()
            return r < 0.06, f"rel. L2 {r:.4f}"

        ok &= _case(f"8-bit B{B} Lq{Lq} Lk{Lk} H{H}", lambda: G.attention_8bit_gluon(q, k, v), rel)
    q, k, v, ref32, base = _inputs(1, 200, 300, 2)
    q[0, 5, 0, 0] = float("nan")
    keep = torch.ones(200, 2, dtype=torch.bool, device="cuda")
    keep[5, 0] = False

    def nan_row(tol, relative=False):
        """That row NaN, the others finite and within tol: max abs error (bf16) or rel. L2 (8-bit)."""
        def check(out):
            o, r = out.float()[0][keep], ref32[0][keep]
            err = ((o - r).norm() / r.norm()).item() if relative else (o - r).abs().max().item()
            nan = bool(torch.isnan(out.float()[0, 5, 0]).all())
            good = nan and bool(torch.isfinite(o).all()) and err <= tol
            return good, f"NaN row {'NaN' if nan else 'not NaN'}, other rows err {err:.3e}"
        return check

    for name in configs:
        ok &= _case(f"{name} NaN query row", lambda: G.attention_gluon(q, k, v, name), nan_row(2 * base + 1e-3))
    ok &= _case("8-bit NaN query row", lambda: G.attention_8bit_gluon(q, k, v), nan_row(0.06, relative=True))
    print(f"gluon smoke: {'all ok' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
