"""Build script.

The C++/CUDA extension ``lightx2v_engine._C`` (sources in ``csrc/``) is built only when the installed
torch has CUDA and an ``nvcc`` of torch's CUDA major version is found (``$CUDA_HOME/bin/nvcc``); a build
that fails anyway leaves a pure-Python install with a warning (``LX2V_REQUIRE_CUDA_BUILD=1`` makes it an
error instead); ``LX2V_SKIP_CUDA_BUILD=1`` forces a pure-Python install.
Honours ``TORCH_CUDA_ARCH_LIST`` (default: the architectures of the GPUs visible at build time, else
``8.0;8.6;8.9;9.0``: the kernels need sm_80 or newer), ``MAX_JOBS`` and ``NVCC_THREADS``.
Torch is imported from the installing environment, so build with ``pip install --no-build-isolation``.
"""
import glob
import os
import re
import subprocess

from setuptools import setup


def _default_arch_list(torch) -> str:
    """The visible GPUs' compute capabilities (an sm_89 card gets an sm_89 build: a 9.0-only build has no
    kernel image for it and every launch would fail), else the sm_80..sm_90 family."""
    try:
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    except (RuntimeError, AssertionError):
        caps = []
    caps = [c for c in caps if c >= (8, 0)]
    # "+PTX" on the newest: a newer GPU (sm_100, sm_120) JIT-compiles the kernels instead of finding no image
    return (";".join(f"{a}.{b}" for a, b in caps) if caps else "8.0;8.6;8.9;9.0") + "+PTX"


def _no_build_reason(torch_cuda: str | None, cuda_home: str | None) -> str | None:
    """Why the extension cannot be built here (None: it can): torch without CUDA, no nvcc under CUDA_HOME
    (torch's CUDA_HOME is /usr/local/cuda when that folder exists, nvcc or not: CUDA runtime images), or an
    nvcc of another CUDA major version than torch's (torch's build refuses it)."""
    if torch_cuda is None:
        return "torch without CUDA"
    if cuda_home is None:
        return "nvcc not found (no CUDA_HOME)"
    nvcc = os.path.join(cuda_home, "bin", "nvcc")
    if not os.path.isfile(nvcc):
        return f"nvcc not found at {nvcc}"
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return f"{nvcc} --version failed ({e})"
    found = re.search(r"release (\d+)\.(\d+)", out)
    if found is None:
        return f"{nvcc} --version names no CUDA release"
    if found.group(1) != torch_cuda.split(".")[0]:
        return f"{nvcc} is CUDA {found.group(1)}.{found.group(2)}, torch is built for CUDA {torch_cuda}"
    return None


def _optional(build_ext_cls):
    """build_ext_cls whose failure leaves a pure-Python install (a warning naming the error), unless
    LX2V_REQUIRE_CUDA_BUILD=1."""
    class OptionalBuild(build_ext_cls):
        def build_extensions(self):
            try:
                super().build_extensions()
            except Exception as e:  # noqa: BLE001 (any compiler / toolchain failure)
                if os.environ.get("LX2V_REQUIRE_CUDA_BUILD", "0") == "1":
                    raise
                print(f"lightx2v_engine: WARNING: the CUDA extension failed to build ({type(e).__name__}: {e}); "
                      "pure-Python install (Triton kernels and PyTorch paths only). Set LX2V_REQUIRE_CUDA_BUILD=1 "
                      "to make this an error.")
                self.extensions = []
    return OptionalBuild


def _cuda_extensions():
    """Returns ([ext], cmdclass) when the CUDA extension can be built, else ([], {}) with a printed reason."""
    if os.environ.get("LX2V_SKIP_CUDA_BUILD", "0") == "1":
        print("lightx2v_engine: LX2V_SKIP_CUDA_BUILD=1, pure-Python install")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError as e:  # no torch in the build environment (build isolation)
        print(f"lightx2v_engine: torch not importable at build time ({e}), pure-Python install")
        return [], {}
    reason = _no_build_reason(torch.version.cuda, CUDA_HOME)
    if reason is not None:
        print(f"lightx2v_engine: {reason}, pure-Python install")
        return [], {}
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/*.cu"))
    if not sources:
        return [], {}
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", _default_arch_list(torch))
    # torch >= 2.12 needs C++20 for code including ATen headers
    major_minor = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2])
    std = "-std=c++20" if major_minor >= (2, 12) else "-std=c++17"
    nvcc_flags = ["-O3", std, "--expt-relaxed-constexpr", "-lineinfo",
                  f"--threads={os.environ.get('NVCC_THREADS', '4')}"]
    ext = CUDAExtension(
        name="lightx2v_engine._C",
        sources=sources,
        extra_compile_args={"cxx": ["-O3", std], "nvcc": nvcc_flags},
    )
    return [ext], {"build_ext": _optional(BuildExtension.with_options(use_ninja=True))}


ext_modules, cmdclass = _cuda_extensions()

setup(
    name="lightx2v-engine",
    version="0.1.0",
    description="Fast 4-step Wan2.1 video generation (LightX2V-compatible) with custom Triton/CUDA kernels",
    python_requires=">=3.10",
    packages=["lightx2v_engine", "lightx2v_engine.kernels"],
    package_dir={"lightx2v_engine": "lightx2v_engine", "lightx2v_engine.kernels": "kernels"},
    include_package_data=True,
    # per-GPU tuned kernel choices (kernels/_util.py), written by benchmarks/summarize.py --write-tuned
    package_data={"lightx2v_engine.kernels": ["tuned/*.json"]},
    install_requires=[
        "torch>=2.4",
        "triton==3.6.0; platform_system=='Linux' and platform_machine=='x86_64'",
        "safetensors>=0.4",
        "numpy",
        "tokenizers>=0.15",
        "pybind11",
        "ninja",
        "imageio>=2.30",
        "imageio-ffmpeg>=0.5",
        "pillow",
        "tqdm",
        "ftfy",  # Wan's prompt cleaning (curly quotes, mojibake, ...): the same token ids as Wan and LightX2V
    ],
    extras_require={
        "test": ["pytest>=8", "diffusers==0.42.1", "transformers==5.23.0", "peft==0.21.2"],
    },
    entry_points={"console_scripts": ["lightx2v-infer=lightx2v_engine.infer:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
