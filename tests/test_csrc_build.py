"""csrc/quant_kernels.cu (torch-free) compiled for sm_90a by nvcc on the CPU machine: it builds with the
flags setup.py uses (taken from setup.py's _compile_args, for the installed torch), no instantiation spills,
and the fused GELU keeps the precise tanhf (no MUFU.TANH: a --use_fast_math build would not match F.gelu)."""
import importlib.util
import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..")


def _compile_args() -> dict[str, list[str]]:
    """setup.py's extra_compile_args for the installed torch (setup.py imported: its setup() does not run)."""
    torch = pytest.importorskip("torch")
    spec = importlib.util.spec_from_file_location("lx2v_setup", os.path.join(ROOT, "setup.py"))
    setup_py = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(setup_py)
    return setup_py._compile_args(torch.__version__)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc on PATH (the CUDA toolkit)")
def test_quant_kernels_build_for_sm90_without_spills_or_fast_tanh(tmp_path):
    with open(os.path.join(ROOT, "setup.py")) as f:
        assert "--use_fast_math" not in f.read()
    flags = _compile_args()["nvcc"]
    assert any(f.startswith("-std=") for f in flags), flags
    obj = tmp_path / "quant_kernels.o"
    res = subprocess.run(["nvcc", *flags, "-gencode=arch=compute_90a,code=sm_90a", "-c",
                          os.path.join(ROOT, "csrc", "quant_kernels.cu"), "-o", str(obj), "-Xptxas", "-v"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill stores", res.stderr)]
    assert spills and max(spills) == 0, f"{sum(1 for n in spills if n)} kernels spill"
    triton = pytest.importorskip("triton")
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    sass = subprocess.run([cuobjdump, "-sass", str(obj)], capture_output=True, text=True, timeout=300).stdout
    assert "per_token_quant_vec_kernel" in sass
    assert "MUFU.TANH" not in sass


def test_bindings_compile_against_torch_headers(tmp_path):
    """csrc/bindings.cpp (the torch boundary: op registrations and the kernel-image query) is valid C++ (setup.py's
    C++ flags) against this torch's headers: g++ -fsyntax-only, with the one header a CPU wheel lacks stubbed."""
    gxx = shutil.which("g++")
    torch = pytest.importorskip("torch")
    inc = os.path.join(os.path.dirname(torch.__file__), "include")
    cuda_inc = [d for d in ("/usr/local/cuda/include", os.path.join(os.environ.get("CUDA_HOME", "/nonexistent"), "include"))
                if os.path.exists(os.path.join(d, "cuda_runtime.h"))]
    if gxx is None or not cuda_inc or not os.path.exists(os.path.join(inc, "c10", "cuda", "CUDAGuard.h")):
        pytest.skip("needs g++, the CUDA headers and torch's c10/cuda headers")
    stub = tmp_path / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    if not os.path.exists(os.path.join(inc, "c10", "cuda", "impl", "cuda_cmake_macros.h")):
        (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")
    import sysconfig
    res = subprocess.run([gxx, *_compile_args()["cxx"], "-fsyntax-only", f"-I{tmp_path}", f"-I{sysconfig.get_paths()['include']}",
                          f"-I{inc}", f"-I{os.path.join(inc, 'torch', 'csrc', 'api', 'include')}", f"-I{cuda_inc[0]}",
                          os.path.join(ROOT, "csrc", "bindings.cpp")], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]


def test_retry_load_finds_a_module_built_after_import(tmp_path, monkeypatch):
    """bench_kernels imports the engine while gpu_check builds the extension: the two-pass baseline of the
    fused quantization ran the PyTorch fallback for the whole run. retry_load() looks again (the import
    system's folder cache invalidated); a module that does not load keeps the status it had."""
    import sys
    from lightx2v_engine import csrc_ops
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(csrc_ops, "_EXTENSION", "lx2v_late_ext")
    monkeypatch.setattr(csrc_ops, "_STATUS", "unavailable: not built yet")
    monkeypatch.setattr(csrc_ops, "_AVAILABLE", False)
    import importlib
    with pytest.raises(ImportError):
        importlib.import_module("lx2v_late_ext")
    assert csrc_ops.retry_load() is False and csrc_ops.csrc_status() == "unavailable: not built yet"
    (tmp_path / "lx2v_late_ext.py").write_text("seen = True\n")  # (built now, but registers no op)
    try:
        assert csrc_ops.retry_load() is False
        assert "lx2v_late_ext" in sys.modules  # found despite the cached listing of tmp_path
        assert csrc_ops.csrc_status() == "unavailable: not built yet"
    finally:
        sys.modules.pop("lx2v_late_ext", None)
