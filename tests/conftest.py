import os

# Under pytest-xdist (README's `pytest -n auto`) each worker process gets its share of the CPUs for torch's
# and OpenMP's threads (inherited by the CLI and torchrun subprocesses the tests start): two workers of two
# threads each on CI's 2 cores ran the suite in 527-566 s, of one thread each in 479 s. Set before torch
# loads, which reads it; an OMP_NUM_THREADS already set decides.
def _usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS",
                          str(max(1, _usable_cpus() // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))

import torch  # noqa: E402

# Triton kernels run on the CPU through the interpreter when no GPU is present. Must be set before
# triton is imported anywhere.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped cleanly without one)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds on the CPU")
    config.addinivalue_line("markers", "last(order=1): run after every other test (higher orders later)")


def pytest_collection_modifyitems(config, items):
    # tests marked `last` run after all others: code never yet run on a GPU, whose hang or illegal memory
    # access (which poisons the CUDA context) must not cost the results of the proven tests
    # (`last(2)` after `last`: the mean-pad kernel's barriers are the likeliest to hang)
    def rank(item):
        mark = item.get_closest_marker("last")
        return 0 if mark is None else (mark.args[0] if mark.args else 1)
    items.sort(key=rank)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


MAX_AUTO_WORKERS = 4


@pytest.hookimpl(optionalhook=True)  # an xdist hook: a run without xdist knows no such hook
def pytest_xdist_auto_num_workers(config):
    """`pytest -n auto` (README's test command): one worker per CPU this process may run on, at most
    MAX_AUTO_WORKERS; with a CUDA device, 0 (no workers: the tests run in this process, the `last`-marked
    ones last, and real-shape GPU tests do not share a card's memory; benchmarks/gpu_check.sh asks for its
    workers by number). xdist's own count asks psutil for *physical* cores, 1 on a 2-vCPU machine that
    exposes one hyperthreaded core, and on a large machine every worker holds a torch and the torchrun tests
    start up to 4 processes each. PYTEST_XDIST_AUTO_NUM_WORKERS still decides when set."""
    env = os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS")
    if env:
        return int(env)
    if torch.cuda.is_available():
        return 0
    return max(1, min(_usable_cpus(), MAX_AUTO_WORKERS))


def pytest_runtest_logreport(report):
    # LX2V_TEST_TIMES=<file>: one line per test as it finishes (seconds, outcome, id), so that a run cut by
    # a time budget (gpu_check.sh) still says which tests ran and which were slow
    # (under pytest-xdist the controller writes: it receives every worker's reports)
    path = os.environ.get("LX2V_TEST_TIMES")
    if path and "PYTEST_XDIST_WORKER" not in os.environ and (report.when == "call" or report.outcome != "passed"):
        with open(path, "a") as f:
            f.write(f"{report.duration:8.2f} {report.when:<8} {report.outcome:<7} {report.nodeid}\n")


@pytest.fixture
def torch_ops():
    """Runs a test with the plain-PyTorch reference ops (ops backend "torch"), restoring "auto"."""
    from lightx2v_engine import ops
    ops.set_backend("torch")
    yield
    ops.set_backend("auto")


@pytest.fixture(autouse=True)
def _built_in_kernel_defaults(monkeypatch):
    """Tests run on the built-in kernel choices: a tuned file of this GPU (kernels/tuned/) would otherwise
    make a test that names one kernel time or check another. tests/test_tuned.py sets its own."""
    monkeypatch.setenv("LX2V_TUNED", "0")


@pytest.fixture(scope="module")
def t2v_folder(tmp_path_factory):
    """A tiny T2V model folder in the real layout (lightx2v_engine.tiny), one per test module."""
    from lightx2v_engine.tiny import make_tiny_model_folder
    return make_tiny_model_folder(tmp_path_factory.mktemp("tiny_t2v"), "t2v")


@pytest.fixture(scope="module")
def i2v_folder(tmp_path_factory):
    from lightx2v_engine.tiny import make_tiny_model_folder
    return make_tiny_model_folder(tmp_path_factory.mktemp("tiny_i2v"), "i2v")
