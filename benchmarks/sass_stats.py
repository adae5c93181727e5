"""Static view of the attention kernels' inner loops on sm_90a, from the compiler's output (no GPU needed).

Compiles each attention config (bf16 kernels/attention.py and 8-bit kernels/attention_8bit.py) with
Triton for an H100, assembles it with Triton's bundled ptxas, disassembles with its cuobjdump, finds the
innermost loops that issue tensor-core MMAs (the consumer warps' key loop) and counts their instructions
by opcode: what one warp issues per key block. Prints registers, shared memory, spills, whether the
loop was warp-specialised and "ovl": the exponentials issued between the loop's wait for S_j
(`wait_group 1`) and its wait for P_{j-1} V_{j-1} (`wait_group 0`), i.e. the softmax work that overlaps
the second MMA inside a warpgroup ("-": the loop has no such pair of waits).

    python benchmarks/sass_stats.py [--configs NAME,...] [--json FILE]

Reading: per 128-key block a consumer warp owns 64 rows x 128 keys = 64 scores per thread. MUFU.EX2 runs
at 16/clk/SM (an instruction per warp takes 8 issue-cycles of its SM sub-partition), FP32 FMA/ADD/MUL at
128/clk/SM, and each sub-partition issues one instruction per clock; the MMAs of one block take 2048
clk/SM in bf16 and 1024 in 8-bit.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
try:
    import lightx2v_engine  # noqa: F401
except ImportError:
    sys.path.insert(0, str(ROOT))

OPS = ("MUFU.EX2", "FFMA", "FADD", "FMUL", "FMNMX", "F2FP", "I2FP", "PRMT", "MOV", "SHFL", "HGMMA", "IGMMA",
       "QGMMA")


def _tools():
    import triton
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    return bin_dir / "ptxas", bin_dir / "cuobjdump"


def compile_sm90(fn, types: dict, consts: dict, num_warps: int, num_stages: int, gluon: bool = False,
                 maxnreg: int | None = None, div16: tuple[str, ...] = ()) -> dict:
    """Triton (or Gluon) -> PTX -> cubin (sm_90a) -> SASS text; returns registers, smem, spills, ws flag
    and the SASS. Pointers, stride* arguments and the integer arguments named in div16 are taken as
    multiples of 16, as the launcher's specialisation finds them at the real shapes."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    sig = {n: ("constexpr" if n in consts else types.get(n, "i32")) for n in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
             if sig[n].startswith("*") or n.startswith("stride") or n in ("n_full", "Lk_pad") + tuple(div16)}
    options = dict(num_warps=num_warps, num_stages=num_stages)
    if maxnreg:
        options["maxnreg"] = maxnreg
    if gluon:
        from triton.experimental.gluon._runtime import GluonASTSource
        src = GluonASTSource(fn, sig, consts, attrs)
    else:
        src = ASTSource(fn, sig, consts, attrs)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    ptxas, cuobjdump = _tools()
    with tempfile.TemporaryDirectory() as d:
        ptx, cubin = os.path.join(d, "k.ptx"), os.path.join(d, "k.cubin")
        Path(ptx).write_text(k.asm["ptx"])
        log = subprocess.run([str(ptxas), "-v", "--gpu-name=sm_90a", ptx, "-o", cubin], capture_output=True,
                             text=True, check=True).stderr
        sass = subprocess.run([str(cuobjdump), "-sass", cubin], capture_output=True, text=True, check=True).stdout
    regs = [int(x) for x in re.findall(r"Used (\d+) registers", log)]
    return dict(regs=max(regs) if regs else None, smem=k.metadata.shared,
                spill=sum(int(x) for x in re.findall(r"(\d+) bytes spill stores", log)),
                ws="ttg.warp_specialize(" in k.asm["ttgir"], sass=sass)


def mma_loop_bodies(sass: str) -> list[list[str]]:
    """The instructions (predicates kept) of every backward-branch loop whose body issues a GMMA, shortest
    (the innermost) first."""
    ins = []
    for line in sass.splitlines():
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if m:
            ins.append((int(m.group(1), 16), m.group(2).strip()))
    index = {a: i for i, (a, _) in enumerate(ins)}
    loops = []
    for i, (addr, text) in enumerate(ins):
        m = re.search(r"BRA\s.*?0x([0-9a-f]+)", text)
        if not m or int(m.group(1), 16) >= addr or int(m.group(1), 16) not in index:
            continue
        body = [t for _, t in ins[index[int(m.group(1), 16)]:i + 1]]
        if any("GMMA" in t for t in body):
            loops.append(body)
    return sorted(loops, key=len)


def _opcode(ins: str) -> str:
    return re.sub(r"^@!?U?P\w+\s+", "", ins).split()[0]


def mma_loops(sass: str) -> list[Counter]:
    """Opcode counts of every innermost backward-branch loop whose body issues a GMMA, shortest first."""
    return [Counter(_opcode(t) for t in body) for body in mma_loop_bodies(sass)]


def overlapped_exps(body: list[str]) -> int | None:
    """MUFU.EX2 issued between a loop's `wait_group 1` (S_j done) and its next `wait_group 0` (P V done):
    the exponentials that run while P_{j-1} V_{j-1} is still on the tensor cores. None when the loop has
    no such pair of waits."""
    start = next((i for i, t in enumerate(body) if "WARPGROUP.DEPBAR.LE gsb0, 0x1" in t), None)
    if start is None:
        return None
    end = next((i for i in range(start, len(body)) if "WARPGROUP.DEPBAR.LE gsb0, 0x0" in body[i]), len(body))
    return sum(1 for t in body[start:end] if _opcode(t).startswith("MUFU.EX2"))


def summarize_loop(c: Counter) -> dict:
    row = {"instructions": sum(c.values())}
    for op in OPS:
        row[op] = sum(n for name, n in c.items() if name == op or name.startswith(op + "."))
    return row


def cases(names: list[str] | None):
    """(label, fn, types, consts, warps, stages, extra compile_sm90 kwargs) for every bf16, 8-bit and Gluon
    attention config."""
    import importlib
    A = importlib.import_module("lightx2v_engine.kernels.attention")  # the modules (the package exports functions)
    A8 = importlib.import_module("lightx2v_engine.kernels.attention_8bit")
    AG = importlib.import_module("lightx2v_engine.kernels.attention_gluon")
    bf = dict(Q="*bf16", K="*bf16", V="*bf16", O="*bf16", C_SCRATCH="*fp32", qk_scale="fp32")
    for name, c in A.ATTN_CONFIGS.items():
        for even in (False, True):
            label = f"bf16:{name}{'/L%128=0' if even else ''}"
            if names and name not in names:
                continue
            ws = c.warp_specialize and c.tma
            consts = dict(HEAD_D=128, BLOCK_M=c.block_m, BLOCK_N=c.block_n, USE_TMA=c.tma, WARP_SPEC=ws,
                          PIPE_QK=c.pipe_qk, EVEN_N=even, MEAN_PAD=c.mean_pad and ws and not even)
            yield label, A._attn_fwd_kernel, bf, consts, c.num_warps, c.num_stages, {}
    for name, c in A8.ATTN8_CONFIGS.items():
        if names and name not in names or c.gluon:
            continue
        t8 = dict(Q8="*i8", K8="*i8", VT="*fp8e4nv" if c.pv_fp8 else "*bf16", QS="*fp32", KS="*fp32",
                  VS="*fp32", O="*bf16")
        consts = dict(HEAD_D=128, BLOCK_M=c.block_m, BLOCK_N=c.block_n, USE_TMA=True, WARP_SPEC=c.warp_specialize,
                      EXP_MODE=c.exp_mode, MAGIC_CVT=c.magic_cvt, INTERP=False, PV_FP8=c.pv_fp8)
        yield f"8bit:{name}", A8._attn8_fwd_kernel, t8, consts, c.num_warps, c.num_stages, {}
    if AG.HAVE_GLUON:
        for name in AG.GLUON_CONFIGS:
            if names and name not in names:
                continue
            fn, types, consts, opts = AG.compile_signature(name)
            yield (f"gluon:{name}", fn, types, consts, opts["num_warps"], 1,
                   dict(gluon=True, maxnreg=opts["maxnreg"]))
        for name, c in A8.ATTN8_CONFIGS.items():
            if not c.gluon or (names and name not in names):
                continue
            fn, types, consts, opts = AG.compile_signature8(AG.GluonAttnConfig(c.block_n, c.num_stages))
            yield (f"8bit:{name}", fn, types, consts, opts["num_warps"], 1,
                   dict(gluon=True, maxnreg=opts["maxnreg"]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default="", help="comma list of config names (default: all)")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    args = p.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)
    names = [n for n in args.configs.split(",") if n] or None
    rows = []
    print(f"{'kernel:config':<44}{'regs':>5}{'smem KB':>8}{'spill':>6} ws  loop  ovl "
          + " ".join(f"{op.split('.')[0]:>6}" for op in OPS))
    for label, fn, types, consts, warps, stages, extra in cases(names):
        try:
            r = compile_sm90(fn, types, consts, warps, stages, **extra)
        except Exception as e:  # a config the compiler rejects is reported, not fatal
            print(f"{label:<44} failed: {type(e).__name__}: {str(e).splitlines()[-1][:100] if str(e) else ''}")
            rows.append(dict(config=label, error=f"{type(e).__name__}"))
            continue
        bodies = [b for b in mma_loop_bodies(r.pop("sass")) if any("MUFU.EX2" in t for t in b)]
        loop = summarize_loop(Counter(_opcode(t) for t in bodies[0])) if bodies else {}
        ovl = overlapped_exps(bodies[0]) if bodies else None
        rows.append(dict(config=label, **r, loop=loop, overlapped_exps=ovl))
        print(f"{label:<44}{r['regs'] or 0:>5}{r['smem'] / 1024:>8.0f}{r['spill']:>6} {'y' if r['ws'] else 'n'} "
              f"{loop.get('instructions', 0):>5} {'-' if ovl is None else ovl:>4} "
              + " ".join(f"{loop.get(op, 0):>6}" for op in OPS))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
