"""benchmarks/gpu_check.sh on the CPU machine: the shell logic around the GPU work (stages, the Gluon smoke
test's switch, the summary table) runs; every benchmark reports that it needs a GPU."""
import os
import stat
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(tmp_path, python, stages="kernels,summary"):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "LX2V_ATTN_GLUON_OFF", "LX2V_ATTN")}
    env.update(OUT=str(tmp_path / "out"), PYTHON=python)
    return subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--stages", stages],
                          capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)


def test_gpu_check_cpu_stages(tmp_path):
    res = _run(tmp_path, sys.executable)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "gluon smoke: not applicable" in res.stdout
    assert "switched off" not in res.stdout
    assert "needs a CUDA GPU" in res.stdout  # bench_kernels on a CPU machine
    assert (tmp_path / "out" / "summary.json").is_file()
    assert "step_ms_1.3b_bf16" in res.stdout  # the summary table, printed last


def test_gpu_check_switches_gluon_off_when_its_smoke_test_fails(tmp_path):
    """A failing (or hung: exit code 124) smoke test exports LX2V_ATTN_GLUON_OFF=1 for the later stages."""
    fake = tmp_path / "python"
    fake.write_text("#!/usr/bin/env bash\n"
                    "case \"$1\" in\n"
                    "  benchmarks/gluon_smoke.py) echo 'gluon smoke: WRONG'; exit 1;;\n"
                    "  benchmarks/bench_kernels.py) echo \"LX2V_ATTN_GLUON_OFF=${LX2V_ATTN_GLUON_OFF:-unset}\"; exit 0;;\n"
                    f"  *) exec {sys.executable} \"$@\";;\n"
                    "esac\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    res = _run(tmp_path, str(fake))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "Gluon attention switched off for this run (smoke test exit code 1" in res.stdout
    assert "LX2V_ATTN_GLUON_OFF=1" in res.stdout
