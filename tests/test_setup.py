"""setup.py's build decision and packaging, without building: a CUDA folder without nvcc (CUDA runtime images)
or an nvcc of another CUDA major version than torch's is a pure-Python install with the reason printed (pip
install failed in BuildExtension), a failing extension build leaves a pure-Python install with a warning,
and the sdist carries the C++/CUDA sources and the tuned kernel files (it had no csrc/ at all)."""
import ast
import os
import shutil
import subprocess
import sys
import tarfile

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..")


def _setup_functions():
    """setup.py's imports and functions (not its setup() call)."""
    with open(os.path.join(ROOT, "setup.py")) as f:
        tree = ast.parse(f.read())
    body = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.Import, ast.ImportFrom))]
    ns = {}
    exec(compile(ast.Module(body=body, type_ignores=[]), "setup.py", "exec"), ns)
    return ns


def _fake_nvcc(home, release):
    os.makedirs(os.path.join(home, "bin"))
    nvcc = os.path.join(home, "bin", "nvcc")
    with open(nvcc, "w") as f:
        f.write(f"#!/bin/sh\necho 'Cuda compilation tools, release {release}, V{release}.41'\n")
    os.chmod(nvcc, 0o755)


def test_build_decision(tmp_path):
    reason = _setup_functions()["_no_build_reason"]
    assert reason(None, "/usr/local/cuda") == "torch without CUDA"
    assert "no CUDA_HOME" in reason("12.8", None)
    runtime_only = tmp_path / "runtime"
    runtime_only.mkdir()
    assert reason("12.8", str(runtime_only)) == f"nvcc not found at {runtime_only}/bin/nvcc"
    _fake_nvcc(str(tmp_path / "cu13"), "13.0")
    assert reason("12.8", str(tmp_path / "cu13")) == \
        f"{tmp_path}/cu13/bin/nvcc is CUDA 13.0, torch is built for CUDA 12.8"
    assert reason("13.0", str(tmp_path / "cu13")) is None
    assert reason("13.2", str(tmp_path / "cu13")) is None  # (a minor version apart builds)


def test_failed_extension_build_leaves_a_pure_python_install(monkeypatch, capsys):
    optional = _setup_functions()["_optional"]

    class Failing:
        extensions = ["lightx2v_engine._C"]

        def build_extensions(self):
            raise RuntimeError("nvcc fatal: unsupported gpu architecture")

    cmd = optional(Failing)()
    monkeypatch.delenv("LX2V_REQUIRE_CUDA_BUILD", raising=False)
    cmd.build_extensions()
    assert cmd.extensions == [] and "failed to build (RuntimeError: nvcc fatal" in capsys.readouterr().out
    cmd = optional(Failing)()
    monkeypatch.setenv("LX2V_REQUIRE_CUDA_BUILD", "1")
    with pytest.raises(RuntimeError, match="unsupported gpu"):
        cmd.build_extensions()


def test_sdist_carries_the_cuda_sources_and_tuned_files(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "MANIFEST.in", "README.md"):
        if os.path.exists(os.path.join(ROOT, name)):
            shutil.copy(os.path.join(ROOT, name), src / name)
    for name in ("csrc", "kernels", "lightx2v_engine"):
        shutil.copytree(os.path.join(ROOT, name), src / name, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    env = {**os.environ, "LX2V_SKIP_CUDA_BUILD": "1"}
    subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path / "dist")], cwd=src, env=env,
                   check=True, capture_output=True)
    (tarball,) = (tmp_path / "dist").iterdir()
    with tarfile.open(tarball) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    want = {os.path.relpath(os.path.join(d, f), ROOT) for d, _, fs in os.walk(os.path.join(ROOT, "csrc")) for f in fs
            if f.endswith((".cpp", ".cu", ".h"))}
    assert want and want <= names, sorted(want - names)
    assert any(n.startswith("kernels/tuned/") and n.endswith(".json") for n in names)
