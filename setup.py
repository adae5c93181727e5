"""Build script.

The C++/CUDA extension ``lightx2v_engine._C`` (sources in ``csrc/``) is built only when the installed
torch has CUDA and an ``nvcc`` of torch's CUDA major version is found (``$CUDA_HOME/bin/nvcc``; without
CUDA_HOME, torch's guess from the nvcc on PATH, or where that has no CUDA headers the nvcc link's target
folder or /usr/local/cuda); a build
that fails anyway leaves a pure-Python install with a warning (``LX2V_REQUIRE_CUDA_BUILD=1`` makes it an
error instead); ``LX2V_SKIP_CUDA_BUILD=1`` forces a pure-Python install. The outcome (built, skipped or
failed, and why) is written to the generated ``lightx2v_engine/_build_info.py``, which ``csrc_ops`` reads
to explain a missing extension.
Honours ``TORCH_CUDA_ARCH_LIST`` (default: the architectures of the GPUs visible at build time, else
``8.0;8.6;8.9;9.0``; its entries older than 8.0 are dropped: the kernels need sm_80 or newer), ``MAX_JOBS``
and ``NVCC_THREADS``.
Torch is imported from the installing environment, so build with ``pip install --no-build-isolation``.
Importing this file (tests) defines its functions without running setup().
"""
import glob
import os
import re
import shutil
import subprocess
import sys
import warnings

from setuptools import setup
from setuptools.command.build_py import build_py

PACKAGE = "lightx2v_engine"
# the build record's reason for an explicit LX2V_SKIP_CUDA_BUILD=1 (csrc_ops does not warn about it)
SKIP_REASON = "LX2V_SKIP_CUDA_BUILD=1"
DEFAULT_ARCHS = "8.0;8.6;8.9;9.0"
# torch's named architectures (torch.utils.cpp_extension) that are all older than sm_80
_OLD_NAMED_ARCHES = ("Kepler+Tesla", "Kepler", "Maxwell+Tegra", "Maxwell", "Pascal", "Volta+Tegra", "Volta", "Turing")


def _default_arch_list(torch) -> str:
    """The visible GPUs' compute capabilities (an sm_89 card gets an sm_89 build: a 9.0-only build has no
    kernel image for it and every launch would fail), else the sm_80..sm_90 family."""
    try:
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    except (RuntimeError, AssertionError):
        caps = []
    caps = [c for c in caps if c >= (8, 0)]
    # "+PTX" on the newest: a newer GPU (sm_100, sm_120) JIT-compiles the kernels instead of finding no image
    return (";".join(f"{a}.{b}" for a, b in caps) if caps else DEFAULT_ARCHS) + "+PTX"


def _filter_arch_list(arch_list: str) -> tuple[str, list[str]]:
    """TORCH_CUDA_ARCH_LIST without its entries older than 8.0 (the kernels use sm_80 instructions: one such
    entry fails the whole build): (the kept entries joined by ";", the dropped entries). Entries as torch
    reads them, separated by ";" or spaces: "8.6", "9.0a", "9.0+PTX", names ("Turing", "Hopper"); an entry
    this cannot read is kept (torch's error names it). A dropped entry's "+PTX" (PTX that newer GPUs JIT-compile)
    moves to the last kept entry when none has one and that one is a plain "X.Y"."""
    kept, dropped = [], []
    for entry in arch_list.replace(" ", ";").split(";"):
        if not entry:
            continue
        found = re.fullmatch(r"(\d+)\.(\d+)[a-z]?(\+PTX)?", entry)
        old = (int(found.group(1)), int(found.group(2))) < (8, 0) if found else entry in _OLD_NAMED_ARCHES
        (dropped if old else kept).append(entry)
    if (any(d.endswith("+PTX") for d in dropped) and kept and not any(k.endswith("+PTX") for k in kept)
            and re.fullmatch(r"\d+\.\d+", kept[-1])):
        kept[-1] += "+PTX"
    return ";".join(kept), dropped


def _choose_arch_list(requested: str | None, default) -> tuple[str, str | None]:
    """(TORCH_CUDA_ARCH_LIST to build with, a warning or None): the requested list without its entries older
    than 8.0; default() when none is requested ("" or "native"), or none of its entries is left."""
    if not requested or requested.strip() in ("", "native"):
        return default(), None
    kept, dropped = _filter_arch_list(requested)
    if not dropped:
        return requested, None
    warning = f"TORCH_CUDA_ARCH_LIST={requested!r}: dropped {';'.join(dropped)} (the kernels need sm_80 or newer)"
    if kept:
        return kept, f"{warning}, building for {kept}"
    fallback = default()
    return fallback, f"{warning}; no entry left, building for {fallback}"


def _compile_args(torch_version: str) -> dict[str, list[str]]:
    """The extension's extra_compile_args for this torch version (tests/test_csrc_build.py compiles with
    them too, so that the two cannot drift)."""
    found = re.match(r"(\d+)\.(\d+)", torch_version)
    major_minor = (int(found.group(1)), int(found.group(2))) if found else (0, 0)
    # torch >= 2.12 needs C++20 for code including ATen headers
    std = "-std=c++20" if major_minor >= (2, 12) else "-std=c++17"
    nvcc = ["-O3", std, "--expt-relaxed-constexpr", "-lineinfo", f"--threads={os.environ.get('NVCC_THREADS', '4')}"]
    return {"cxx": ["-O3", std], "nvcc": nvcc}


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


def _cuda_home_fix(env=os.environ, which=shutil.which, default="/usr/local/cuda") -> str | None:
    """The CUDA folder to build with where torch would guess one without the CUDA headers, else None.
    Without CUDA_HOME or CUDA_PATH, torch takes the parent of the folder of the nvcc on PATH: /usr/local for a
    /usr/local/bin/nvcc that links to (or is a script running) /usr/local/cuda-13.0/bin/nvcc, and the build
    then failed on cuda_runtime_api.h. Then: the link's target folder, else `default`, the first holding
    bin/nvcc and include/cuda_runtime_api.h (the nvcc version check follows as for any CUDA_HOME)."""
    if env.get("CUDA_HOME") or env.get("CUDA_PATH"):
        return None
    nvcc = which("nvcc")
    if nvcc is None:
        return None

    def toolkit(home):
        return (os.path.isfile(os.path.join(home, "include", "cuda_runtime_api.h"))
                and os.path.isfile(os.path.join(home, "bin", "nvcc")))
    guess = os.path.dirname(os.path.dirname(os.path.abspath(nvcc)))
    if os.path.isfile(os.path.join(guess, "include", "cuda_runtime_api.h")):
        return None
    for home in (os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), default):
        if home != guess and toolkit(home):
            return home
    return None


def _report(message: str, warn: bool = True) -> None:
    """A build message pip shows: a warning (a recent pip, 26.3 checked, prints a build backend's warnings without
    -v; a print is hidden there) or, for an expected outcome (warn=False), a note on stderr."""
    if warn:
        warnings.warn(f"{PACKAGE}: {message}", stacklevel=2)
    else:
        print(f"{PACKAGE}: {message}", file=sys.stderr)


def _write_build_info(package_dir: str, status: str, reason: str) -> None:
    """Writes <package_dir>/_build_info.py, the record of the extension build that csrc_ops reads:
    CSRC_BUILD = {"status": "built" | "skipped" | "failed", "reason": ...}."""
    os.makedirs(package_dir, exist_ok=True)
    with open(os.path.join(package_dir, "_build_info.py"), "w") as f:
        f.write('"""Written by setup.py at build time (not in git): the outcome of the C++/CUDA extension build, '
                'read by\nlightx2v_engine.csrc_ops to explain a missing extension."""\n'
                f"CSRC_BUILD = {dict(status=status, reason=reason)!r}\n")


def _build_info_dirs(cmd) -> list[str]:
    """Where a build command writes _build_info.py: its build folder, and the source package too for an
    editable or in-place build (the package is imported from there)."""
    dirs = [os.path.join(cmd.build_lib, PACKAGE)]
    if getattr(cmd, "editable_mode", False) or getattr(cmd, "inplace", False):
        dirs.append(cmd.get_finalized_command("build_py").get_package_dir(PACKAGE))
    return dirs


def _recording_build_py(status: str, reason: str, messages: list):
    """build_py that reports the build decision's messages and writes the build record (status, reason):
    "skipped", or a "failed" placeholder that the extension build overwrites (a stale record from an
    earlier build must not be installed)."""
    class RecordingBuildPy(build_py):
        def run(self):
            super().run()
            while messages:
                _report(*messages.pop(0))
            for d in _build_info_dirs(self):
                _write_build_info(d, status, reason)
    return RecordingBuildPy


def _optional(build_ext_cls, messages: list | None = None):
    """build_ext_cls whose failure leaves a pure-Python install (a warning naming the error), unless
    LX2V_REQUIRE_CUDA_BUILD=1; it records the outcome in _build_info.py ("built" / "failed")."""
    class OptionalBuild(build_ext_cls):
        csrc_build = ("failed", "the extension build did not run")

        def build_extensions(self):
            while messages:
                _report(*messages.pop(0))
            try:
                super().build_extensions()
            except Exception as e:  # noqa: BLE001 (any compiler / toolchain failure)
                if os.environ.get("LX2V_REQUIRE_CUDA_BUILD", "0") == "1":
                    raise
                error = f"{type(e).__name__}: {e}"
                _report(f"the CUDA extension failed to build ({error}); pure-Python install (Triton kernels and "
                        "PyTorch paths only). Set LX2V_REQUIRE_CUDA_BUILD=1 to make this an error, pip -v shows "
                        "the compiler output.")
                self.extensions = []
                self.csrc_build = ("failed", error[:2000])
            else:
                self.csrc_build = ("built", f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', '')}")

        def run(self):
            super().run()
            for d in _build_info_dirs(self):
                _write_build_info(d, *self.csrc_build)
    return OptionalBuild


def _cuda_extensions() -> tuple[list, dict]:
    """(ext_modules, cmdclass): the CUDA extension when it can be built, else none; either way a build_py
    that writes the build record and reports why the extension is not built."""
    messages = []  # (message, warn): reported once, by the first build command that runs

    def skipped(reason: str, warn: bool = True):
        messages.append((f"{reason}, pure-Python install", warn))
        return [], {"build_py": _recording_build_py("skipped", reason, messages)}

    if os.environ.get("LX2V_SKIP_CUDA_BUILD", "0") == "1":
        return skipped(SKIP_REASON, warn=False)
    home = _cuda_home_fix()
    if home is not None:  # (before torch.utils.cpp_extension reads it at import)
        os.environ["CUDA_HOME"] = home
        messages.append((f"CUDA_HOME unset and the folder of the nvcc on PATH has no CUDA headers: building "
                         f"with CUDA_HOME={home}", False))
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError as e:  # no torch in the build environment (build isolation)
        return skipped(f"torch not importable at build time ({e}; install with pip install --no-build-isolation)")
    reason = _no_build_reason(torch.version.cuda, CUDA_HOME)
    if reason is not None:
        return skipped(reason, warn=torch.version.cuda is not None)  # (CPU torch: the expected outcome)
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/*.cu"))
    if not sources:
        return skipped("no C++/CUDA sources in csrc/")
    arch_list, warning = _choose_arch_list(os.environ.get("TORCH_CUDA_ARCH_LIST"), lambda: _default_arch_list(torch))
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
    if warning:
        messages.append((warning, True))
    ext = CUDAExtension(name=f"{PACKAGE}._C", sources=sources, extra_compile_args=_compile_args(torch.__version__))
    return [ext], {"build_py": _recording_build_py("failed", "the extension build did not run", messages),
                   "build_ext": _optional(BuildExtension.with_options(use_ninja=True), messages)}


if __name__ == "__main__":  # (setuptools and pip run setup.py as __main__)
    ext_modules, cmdclass = _cuda_extensions()
    setup(
        name="lightx2v-engine",
        version="0.1.0",
        description="Fast 4-step Wan2.1 video generation (LightX2V-compatible) with custom Triton/CUDA kernels",
        python_requires=">=3.10",
        packages=[PACKAGE, f"{PACKAGE}.kernels", f"{PACKAGE}.kernels.tuned"],
        package_dir={PACKAGE: PACKAGE, f"{PACKAGE}.kernels": "kernels", f"{PACKAGE}.kernels.tuned": "kernels/tuned"},
        include_package_data=True,
        # per-GPU tuned kernel choices (kernels/_util.py), written by benchmarks/summarize.py --write-tuned
        package_data={f"{PACKAGE}.kernels.tuned": ["*.json"]},
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
            "test": ["pytest>=8", "diffusers==0.42.1", "transformers==5.23.0", "peft==0.21.2",
                     "pytest-xdist==3.8.0"],
        },
        entry_points={"console_scripts": ["lightx2v-infer=lightx2v_engine.infer:main"]},
        ext_modules=ext_modules,
        cmdclass=cmdclass,
    )
