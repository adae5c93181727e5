"""First contact of the Gluon attention kernel with a GPU, in its own process under a short timeout.

gpu_check.sh runs this before the benchmarks: every config at a small odd shape and at the 1.3B self-
attention shape, against an fp32 reference (rule: error <= 2 x SDPA bf16's + 1e-3). Exit 0 when all pass;
exit 1 (and gpu_check sets LX2V_ATTN_GLUON_OFF=1, so benchmarks and tests leave the kernel alone) on an
error; a hang is cut by the caller's timeout.

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


def main() -> int:
    G = importlib.import_module("lightx2v_engine.kernels.attention_gluon")
    from lightx2v_engine.ops import attention_ref
    if not G.available():
        print(f"gluon smoke: not applicable (HAVE_GLUON={G.HAVE_GLUON}, cuda={torch.cuda.is_available()}, "
              f"off={G.switched_off()})")
        return 0
    ok = True
    for B, Lq, Lk, H in [(2, 300, 1000, 2), (1, 32760, 32760, 12)]:
        g = torch.Generator(device="cpu").manual_seed(0)
        q, k, v = (torch.randn(B, n, H, 128, generator=g).to("cuda", torch.bfloat16) for n in (Lq, Lk, Lk))
        ref32 = torch.cat([attention_ref(q[:, :, h:h + 1].float(), k[:, :, h:h + 1].float(),
                                         v[:, :, h:h + 1].float()) for h in range(H)], dim=2)
        base = (attention_ref(q, k, v).float() - ref32).abs().max().item()
        for name in G.GLUON_CONFIGS:
            t0 = time.time()
            try:
                out = G.attention_gluon(q, k, v, name)
                torch.cuda.synchronize()
                err = (out.float() - ref32).abs().max().item()
            except Exception as e:  # noqa: BLE001 - report and fail
                print(f"gluon smoke: {name} B{B} Lq{Lq} Lk{Lk} H{H}: {type(e).__name__}: {str(e)[:300]}")
                ok = False
                continue
            good = err <= 2 * base + 1e-3
            ok &= good
            print(f"gluon smoke: {name} B{B} Lq{Lq} Lk{Lk} H{H}: err {err:.3e} (SDPA bf16 {base:.3e}) "
                  f"{'ok' if good else 'WRONG'} ({time.time() - t0:.1f} s incl. compile)")
        # the 8-bit kernel: rel. L2 vs exact attention within the 8-bit tests' bound (< 6%)
        t0 = time.time()
        try:
            out = G.attention_8bit_gluon(q, k, v)
            torch.cuda.synchronize()
            rel = ((out.float() - ref32).norm() / ref32.norm()).item()
        except Exception as e:  # noqa: BLE001
            print(f"gluon smoke: 8-bit B{B} Lq{Lq} Lk{Lk} H{H}: {type(e).__name__}: {str(e)[:300]}")
            ok = False
        else:
            good = rel < 0.06
            ok &= good
            print(f"gluon smoke: 8-bit B{B} Lq{Lq} Lk{Lk} H{H}: rel. L2 {rel:.4f} {'ok' if good else 'WRONG'} "
                  f"({time.time() - t0:.1f} s incl. compile)")
        del q, k, v, ref32
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
