"""benchmarks/sass_stats.py on the CPU machine: sm_90a SASS of the attention loops (Triton's ptxas/cuobjdump)."""
import importlib.util
import json
import os
import subprocess
import sys

_PATH = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "sass_stats.py")


def test_sass_stats_loop_counts(tmp_path):
    out = tmp_path / "rows.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, _PATH, "--configs", "ws_128x128_w4_s2,ws_mp_128x128_w4_s2",
                          "--json", str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    rows = {r["config"]: r for r in json.loads(out.read_text())}
    assert set(rows) == {"bf16:ws_128x128_w4_s2", "bf16:ws_128x128_w4_s2/L%128=0", "bf16:ws_mp_128x128_w4_s2",
                         "bf16:ws_mp_128x128_w4_s2/L%128=0", "8bit:ws_128x128_w4_s2"}
    for r in rows.values():
        assert r["ws"] and r["spill"] == 0 and r["loop"]["MUFU.EX2"] >= 64
    masked, even = rows["bf16:ws_128x128_w4_s2"]["loop"], rows["bf16:ws_128x128_w4_s2/L%128=0"]["loop"]
    mean_pad = rows["bf16:ws_mp_128x128_w4_s2"]["loop"]
    assert masked["HGMMA"] > 0 and rows["8bit:ws_128x128_w4_s2"]["loop"]["IGMMA"] > 0
    assert rows["8bit:ws_128x128_w4_s2"]["loop"]["QGMMA"] > 0
    # the mean-padded loop is the unmasked one: no per-score mask instructions
    assert mean_pad["instructions"] <= even["instructions"] + 8 < masked["instructions"] - 64


def test_mma_loop_parser():
    spec = importlib.util.spec_from_file_location("sass_stats", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    sass = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   MUFU.EX2 R2, R3 ;
        /*0020*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], RZ ;
        /*0030*/               @P0 BRA 0x10 ;
        /*0040*/                   FFMA R2, R3, R4, R5 ;
        /*0050*/              @!P1 BRA 0x40 ;
    """
    loops = mod.mma_loops(sass)
    assert len(loops) == 1 and loops[0]["MUFU.EX2"] == 1 and loops[0]["BRA"] == 1
    assert mod.summarize_loop(loops[0])["HGMMA"] == 1


def test_overlapped_exps_counts_exponentials_between_the_two_waits():
    """Exponentials between `wait_group 1` and the next `wait_group 0` overlap the second MMA; a wait 0
    hoisted right after the wait 1 leaves none; a loop without the pair of waits gives None."""
    spec = importlib.util.spec_from_file_location("sass_stats", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    pinned = ["HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], RZ", "WARPGROUP.DEPBAR.LE gsb0, 0x1",
              "MUFU.EX2 R2, R3", "@P0 MUFU.EX2 R4, R5", "WARPGROUP.DEPBAR.LE gsb0, 0x0", "MUFU.EX2 R6, R7"]
    hoisted = ["HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], RZ", "WARPGROUP.DEPBAR.LE gsb0, 0x1",
               "WARPGROUP.DEPBAR.LE gsb0, 0x0", "MUFU.EX2 R2, R3", "MUFU.EX2 R4, R5"]
    assert mod.overlapped_exps(pinned) == 2
    assert mod.overlapped_exps(hoisted) == 0
    assert mod.overlapped_exps(["HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], RZ", "MUFU.EX2 R2, R3"]) is None
