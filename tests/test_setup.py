"""setup.py's build decision and packaging, without building the extension: a CUDA folder without nvcc (CUDA
runtime images) or an nvcc of another CUDA major version than torch's is a pure-Python install with the reason
reported (pip install failed in BuildExtension), a failing extension build leaves a pure-Python install with a
warning, the outcome is recorded in lightx2v_engine/_build_info.py for csrc_ops, TORCH_CUDA_ARCH_LIST entries
older than sm_80 are dropped (one failed the whole build), the sdist carries the C++/CUDA sources and the tuned
kernel files (it had no csrc/ at all), and the wheel the tuned files and the build record."""
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import warnings
import zipfile

import pytest
import torch

ROOT = os.path.join(os.path.dirname(__file__), "..")


def _setup():
    """setup.py as a module: its functions, not its setup() call (run only as __main__)."""
    spec = importlib.util.spec_from_file_location("lx2v_setup", os.path.join(ROOT, "setup.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _source_copy(tmp_path):
    """The files setup.py packages, copied (a build does not write into the checkout)."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "MANIFEST.in", "README.md", "pyproject.toml"):
        if os.path.exists(os.path.join(ROOT, name)):
            shutil.copy(os.path.join(ROOT, name), src / name)
    for name in ("csrc", "kernels", "lightx2v_engine"):
        shutil.copytree(os.path.join(ROOT, name), src / name,
                        ignore=shutil.ignore_patterns("__pycache__", "*.so", "_build_info.py"))
    return src


def _fake_nvcc(home, release):
    os.makedirs(os.path.join(home, "bin"))
    nvcc = os.path.join(home, "bin", "nvcc")
    with open(nvcc, "w") as f:
        f.write(f"#!/bin/sh\necho 'Cuda compilation tools, release {release}, V{release}.41'\n")
    os.chmod(nvcc, 0o755)


def test_build_decision(tmp_path):
    reason = _setup()._no_build_reason
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


def test_failed_extension_build_leaves_a_pure_python_install(monkeypatch):
    optional = _setup()._optional

    class Failing:
        extensions = ["lightx2v_engine._C"]

        def build_extensions(self):
            raise RuntimeError("nvcc fatal: unsupported gpu architecture")

    cmd = optional(Failing)()
    monkeypatch.delenv("LX2V_REQUIRE_CUDA_BUILD", raising=False)
    # a warning, not a print: a recent pip shows a build backend's warnings without -v, and hides its output
    with pytest.warns(UserWarning, match=r"failed to build \(RuntimeError: nvcc fatal"):
        cmd.build_extensions()
    assert cmd.extensions == []
    assert cmd.csrc_build == ("failed", "RuntimeError: nvcc fatal: unsupported gpu architecture")
    cmd = optional(Failing)()
    monkeypatch.setenv("LX2V_REQUIRE_CUDA_BUILD", "1")
    with pytest.raises(RuntimeError, match="unsupported gpu"):
        cmd.build_extensions()


def test_arch_list_keeps_sm80_and_newer():
    setup_py = _setup()
    keep = setup_py._filter_arch_list
    assert keep("8.0;8.6;8.9;9.0+PTX") == ("8.0;8.6;8.9;9.0+PTX", [])
    assert keep("5.2 6.0;6.1 7.0;7.5 8.0;8.6+PTX") == ("8.0;8.6+PTX", ["5.2", "6.0", "6.1", "7.0", "7.5"])
    assert keep("7.5+PTX;9.0a;10.0a+PTX;12.0") == ("9.0a;10.0a+PTX;12.0", ["7.5+PTX"])
    assert keep("7.0;7.5+PTX;8.0;8.6") == ("8.0;8.6+PTX", ["7.0", "7.5+PTX"])  # (newer GPUs still JIT the PTX)
    assert keep("7.5+PTX;9.0a") == ("9.0a", ["7.5+PTX"])  # (no PTX of an arch-specific 9.0a)
    assert keep("Turing;Volta+Tegra;Ampere;Hopper") == ("Ampere;Hopper", ["Turing", "Volta+Tegra"])
    assert keep("6.0;;8.x ") == ("8.x", ["6.0"])  # (an unreadable entry is torch's to refuse)
    choose = setup_py._choose_arch_list
    default = lambda: "8.0;8.6;8.9;9.0+PTX"  # noqa: E731
    assert choose(None, default) == ("8.0;8.6;8.9;9.0+PTX", None)
    assert choose("native", default) == ("8.0;8.6;8.9;9.0+PTX", None)
    assert choose("8.9", default) == ("8.9", None)
    arch, note = choose("7.0;7.5;8.0;8.6", default)
    assert arch == "8.0;8.6" and "dropped 7.0;7.5" in note and "building for 8.0;8.6" in note
    arch, note = choose("6.1 7.0+PTX", default)
    assert arch == "8.0;8.6;8.9;9.0+PTX" and "dropped 6.1;7.0+PTX" in note and "no entry left" in note


def test_build_record_explains_a_missing_extension(tmp_path, monkeypatch):
    """setup.py writes _build_info.py; csrc_ops's status names a failed build and its error, and warns on a CUDA
    machine unless the build was skipped by LX2V_SKIP_CUDA_BUILD=1."""
    setup_py = _setup()
    setup_py._write_build_info(str(tmp_path), "failed", "RuntimeError: Error compiling objects for extension")
    spec = importlib.util.spec_from_file_location("build_info", tmp_path / "_build_info.py")
    info = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(info)
    assert info.CSRC_BUILD == {"status": "failed", "reason": "RuntimeError: Error compiling objects for extension"}

    torch = pytest.importorskip("torch")
    from lightx2v_engine import csrc_ops
    assert csrc_ops._SKIP_REASON == setup_py.SKIP_REASON
    monkeypatch.setattr(csrc_ops, "_STATUS", csrc_ops._STATUS)
    monkeypatch.setattr(csrc_ops, "_AVAILABLE", csrc_ops._AVAILABLE)
    monkeypatch.setitem(sys.modules, csrc_ops._EXTENSION, None)  # (import: ModuleNotFoundError, as when not built)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for record, status, warns in [
        (info.CSRC_BUILD, "failed to build: RuntimeError: Error compiling objects", True),
        ({"status": "skipped", "reason": "nvcc not found at /usr/local/cuda/bin/nvcc"}, "was not built: nvcc not found", True),
        ({"status": "skipped", "reason": setup_py.SKIP_REASON}, "was not built: LX2V_SKIP_CUDA_BUILD=1", False),
        ({"status": "built", "reason": "TORCH_CUDA_ARCH_LIST=9.0"}, "was built (TORCH_CUDA_ARCH_LIST=9.0) but is missing", True),
        (None, "is not built (and no build record", True),
    ]:
        monkeypatch.setattr(csrc_ops, "_build_record", lambda record=record: record)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            csrc_ops._load()
        assert csrc_ops.csrc_status().startswith("unavailable: ") and status in csrc_ops.csrc_status()
        assert [str(w.message) for w in caught if w.category is RuntimeWarning] == \
            ([f"lightx2v_engine: {csrc_ops.csrc_status()}; the 8-bit quantization runs its PyTorch path (set "
              "LX2V_DISABLE_CSRC=1 to silence this)"] if warns else [])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        csrc_ops._load()
    assert not [w for w in caught if w.category is RuntimeWarning]  # (no GPU: a pure-Python install is normal)


def test_sdist_carries_the_cuda_sources_and_tuned_files(tmp_path):
    src = _source_copy(tmp_path)
    (src / "lightx2v_engine" / "_build_info.py").write_text("CSRC_BUILD = {}\n")  # (an editable build's record)
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
    assert "lightx2v_engine/_build_info.py" not in names  # (generated at build time)


def test_wheel_carries_the_tuned_files_and_the_build_record(tmp_path):
    """A pure-Python wheel (LX2V_SKIP_CUDA_BUILD=1, the pip path): the tuned kernel files of the
    lightx2v_engine.kernels.tuned package and a build record that says the build was skipped, and why."""
    src = _source_copy(tmp_path)
    env = {**os.environ, "LX2V_SKIP_CUDA_BUILD": "1"}
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", ".", "-w", str(tmp_path / "whl"), "--no-deps",
                          "--no-build-isolation", "--no-index", "-q"], cwd=src, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    (wheel,) = (tmp_path / "whl").iterdir()
    with zipfile.ZipFile(wheel) as whl:
        names = set(whl.namelist())
        record = whl.read("lightx2v_engine/_build_info.py").decode()
    tuned = sorted(os.listdir(os.path.join(ROOT, "kernels", "tuned")))
    assert tuned and {f"lightx2v_engine/kernels/tuned/{n}" for n in tuned if n.endswith(".json")} <= names
    ns = {}
    exec(record, ns)
    assert ns["CSRC_BUILD"] == {"status": "skipped", "reason": "LX2V_SKIP_CUDA_BUILD=1"}
    assert not (src / "lightx2v_engine" / "_build_info.py").exists()  # (a regular build: the source stays clean)


def test_ci_runs_readme_test_command():
    """.ci/run's last line is README's test command, word for word (CI must run exactly that)."""
    readme = open(os.path.join(ROOT, "README.md")).read()
    block = readme.split("Run the tests", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0].strip()
    command = block.split(" && ", 1)[1]
    lines = [x for x in open(os.path.join(ROOT, ".ci", "run")).read().splitlines() if x.strip()]
    assert lines[-1] == command, (lines[-1], command)


def test_auto_worker_count_is_the_usable_cpus_up_to_four_none_with_cuda(pytestconfig, monkeypatch):
    """`-n auto` asks tests/conftest.py: one worker per CPU in this process's affinity mask, capped at 4
    (xdist's own answer is psutil's physical cores), none with a CUDA device; PYTEST_XDIST_AUTO_NUM_WORKERS
    still decides."""
    if not pytestconfig.pluginmanager.hasplugin("xdist"):  # a test extra, active under README's command
        pytest.skip("pytest-xdist is not active in this run")
    monkeypatch.delenv("PYTEST_XDIST_AUTO_NUM_WORKERS", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # (also where this runs on a GPU machine)
    for cpus, expect in ((1, 1), (2, 2), (3, 3), (64, 4)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=cpus: set(range(n)))
        assert pytestconfig.hook.pytest_xdist_auto_num_workers(config=pytestconfig) == expect
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a CUDA machine: in this process
    assert pytestconfig.hook.pytest_xdist_auto_num_workers(config=pytestconfig) == 0
    monkeypatch.setenv("PYTEST_XDIST_AUTO_NUM_WORKERS", "3")
    assert pytestconfig.hook.pytest_xdist_auto_num_workers(config=pytestconfig) == 3


def test_cuda_home_where_torch_would_guess_one_without_headers(tmp_path):
    """Without CUDA_HOME, torch takes nvcc's parent folder's parent: /usr/local for /usr/local/bin/nvcc, a link
    or a script running /usr/local/cuda-13.0/bin/nvcc (this project's dev machine: the build failed on
    cuda_runtime_api.h). setup.py then builds with the link's target folder, else /usr/local/cuda."""
    setup_mod = _setup()

    def toolkit(home):
        (home / "bin").mkdir(parents=True)
        (home / "include").mkdir()
        (home / "bin" / "nvcc").write_text("#!/bin/sh\n")
        (home / "include" / "cuda_runtime_api.h").write_text("")
        return home
    real = toolkit(tmp_path / "cuda-13.0")
    default = toolkit(tmp_path / "cuda")
    (tmp_path / "local" / "bin").mkdir(parents=True)
    link = tmp_path / "local" / "bin" / "nvcc"
    link.symlink_to(real / "bin" / "nvcc")
    fix = lambda env, nvcc: setup_mod._cuda_home_fix(env, lambda name: nvcc, str(default))  # noqa: E731
    assert fix({}, str(link)) == str(real)
    link.unlink()
    link.write_text("#!/bin/sh\nexec cuda-13.0/bin/nvcc \"$@\"\n")  # a wrapper script: the default folder
    assert fix({}, str(link)) == str(default)
    assert fix({"CUDA_HOME": "/somewhere"}, str(link)) is None and fix({"CUDA_PATH": "/x"}, str(link)) is None
    assert fix({}, None) is None
    assert fix({}, str(real / "bin" / "nvcc")) is None  # torch's guess has the headers
    (tmp_path / "local" / "include").mkdir()  # a /usr-like layout: headers beside the nvcc's folder
    (tmp_path / "local" / "include" / "cuda_runtime_api.h").write_text("")
    assert fix({}, str(link)) is None
