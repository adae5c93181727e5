"""Per-GPU tuned defaults (kernels/_util.py, kernels/tuned/): the file format is checked and errors name the
file; choices resolve as explicit (setter / environment) > the GPU's tuned file > built-in default, per
device; cross-attention follows an explicit self-attention backend. A CUDA device is faked by name (the
files are chosen by torch.cuda.get_device_name, which needs no kernel launch)."""
import importlib
import json
import os
import subprocess
import sys

import pytest
import torch

from lightx2v_engine.kernels import _util

A = importlib.import_module("lightx2v_engine.kernels.attention")
A8 = importlib.import_module("lightx2v_engine.kernels.attention_8bit")
QK = importlib.import_module("lightx2v_engine.kernels.qk_norm_rope")
G = importlib.import_module("lightx2v_engine.kernels.attention_gluon")
AR = importlib.import_module("lightx2v_engine.kernels.attention_rope")

CUDA0, CUDA1 = torch.device("cuda", 0), torch.device("cuda", 1)
NAMES = {0: "NVIDIA H100 80GB HBM3", 1: "NVIDIA GeForce RTX 4090"}


@pytest.fixture
def fake_gpus(monkeypatch, tmp_path):
    """Two fake CUDA devices (an H100 and a 4090), tuned files read from tmp_path, no explicit choices."""
    monkeypatch.setattr(_util, "device_name", lambda d: NAMES[d.index])
    monkeypatch.setenv("LX2V_TUNED", str(tmp_path))
    (tmp_path / "package").mkdir()
    monkeypatch.setattr(_util, "TUNED_DIR", tmp_path / "package")  # the shipped files stay out of it
    _util.clear_tuned_cache()
    saved = (A._IMPL, A._CONFIG, A._GLUON_CONFIG, A._CROSS_IMPL, A8._CONFIG, QK._QK_IMPL, AR._PLACEMENT)
    A.set_attention_impl("default", "default", "default", "default")
    A8.set_attention_8bit_config("default")
    QK.set_qk_rope_impl("default")
    AR.set_rope_placement("default")
    yield tmp_path
    A._IMPL, A._CONFIG, A._GLUON_CONFIG, A._CROSS_IMPL, A8._CONFIG, QK._QK_IMPL, AR._PLACEMENT = saved
    _util.clear_tuned_cache()


def _write(folder, device, choices, **extra):
    path = folder / _util.tuned_file_name(device)
    path.write_text(json.dumps({"device": device, "choices": choices, **extra}))
    return path


def test_file_names():
    assert _util.tuned_file_name("NVIDIA H100 80GB HBM3") == "NVIDIA_H100_80GB_HBM3.json"
    assert _util.tuned_file_name("NVIDIA H100 PCIe") == "NVIDIA_H100_PCIe.json"
    assert _util.tuned_file_name(" NVIDIA  GeForce RTX-4090 ") == "NVIDIA_GeForce_RTX_4090.json"


def test_choices_resolve_per_device(fake_gpus):
    _write(fake_gpus, NAMES[0], {"LX2V_ATTN": "gluon", "LX2V_ATTN_GLUON_CONFIG": "fa3_nopp_128x128_s2",
                                 "LX2V_ATTN_CONFIG": "tma_256x64_w8_s3", "LX2V_CROSS_ATTN": "sdpa_cudnn",
                                 "LX2V_ATTN8_CONFIG": "gluon_fa3_128x128_s2", "LX2V_QK_ROPE": "packed"})
    # the H100 takes its file; the 4090 (no file) and the CPU keep the built-in defaults
    assert A.attention_impl(CUDA0) == ("gluon", "fa3_nopp_128x128_s2")
    assert A._config(CUDA0) == "tma_256x64_w8_s3"
    assert A.cross_attention_impl(CUDA0) == "sdpa_cudnn"
    assert A8.attention_8bit_config(CUDA0) == "gluon_fa3_128x128_s2"
    assert QK.qk_rope_impl(CUDA0) == "packed"
    for dev in (CUDA1, torch.device("cpu")):
        assert A.attention_impl(dev) == ("triton", A.DEFAULT_ATTN_CONFIG)
        assert A.cross_attention_impl(dev) == "triton"
        assert A8.attention_8bit_config(dev) == A8.DEFAULT_ATTN8_CONFIG
        assert QK.qk_rope_impl(dev) == "chunk"
    assert _util.tuned_status(CUDA0) == f"tuned defaults NVIDIA_H100_80GB_HBM3.json in {fake_gpus}"
    assert _util.tuned_status(CUDA1) == "built-in defaults (no tuned file for NVIDIA GeForce RTX 4090)"


def test_tuned_rope_placement_follows_the_triton_backend(fake_gpus):
    """A tuned "prologue" (norm+RoPE in the Triton attention kernel) applies while self-attention runs the
    Triton backend; an explicit other backend (or a tuned one) runs the pass; an explicit placement wins."""
    _write(fake_gpus, NAMES[0], {"LX2V_SELF_ATTN_ROPE": "prologue"})
    assert AR.rope_placement(CUDA0) == "prologue" and AR.rope_placement(CUDA1) == "pass"
    A.set_attention_impl("sdpa_cudnn")
    assert AR.rope_placement(CUDA0) == "pass"
    AR.set_rope_placement("prologue")
    assert AR.rope_placement(CUDA0) == "prologue"
    AR.set_rope_placement("default")
    A.set_attention_impl("default")
    A.set_attention_impl(config="ptr_256x64_w8_s3")  # an explicit Triton config is the kernel to run (the
    assert AR.rope_placement(CUDA0) == "pass"          # prologue kernel ran instead, the config ignored)
    A.set_attention_impl(config="default")
    _write(fake_gpus, NAMES[0], {"LX2V_SELF_ATTN_ROPE": "prologue", "LX2V_ATTN": "gluon"})
    _util.clear_tuned_cache()
    assert AR.rope_placement(CUDA0) == "pass"


def test_explicit_choices_win_and_default_hands_back(fake_gpus):
    _write(fake_gpus, NAMES[0], {"LX2V_ATTN": "gluon", "LX2V_CROSS_ATTN": "sdpa_cudnn", "LX2V_QK_ROPE": "packed",
                                 "LX2V_ATTN8_CONFIG": "gluon_fa3_128x128_s2"})
    A.set_attention_impl("sdpa_flash")
    # an explicit self-attention backend moves cross-attention with it (the tuned cross choice was made
    # against the tuned self choice)
    assert A.attention_impl(CUDA0)[0] == "sdpa_flash" and A.cross_attention_impl(CUDA0) == "sdpa_flash"
    A.set_attention_impl(cross_impl="triton")
    assert A.cross_attention_impl(CUDA0) == "triton"
    A.set_attention_impl("default", cross_impl="same")  # "same": explicitly self-attention's backend
    assert A.attention_impl(CUDA0)[0] == "gluon" and A.cross_attention_impl(CUDA0) == "gluon"
    A.set_attention_impl(cross_impl="default")
    assert A.cross_attention_impl(CUDA0) == "sdpa_cudnn"
    QK.set_qk_rope_impl("tile")
    A8.set_attention_8bit_config("tma_128x128_w8_s3")
    assert QK.qk_rope_impl(CUDA0) == "tile" and A8.attention_8bit_config(CUDA0) == "tma_128x128_w8_s3"
    QK.set_qk_rope_impl("default")
    A8.set_attention_8bit_config("default")
    assert QK.qk_rope_impl(CUDA0) == "packed" and A8.attention_8bit_config(CUDA0) == "gluon_fa3_128x128_s2"


def test_environment_variables_are_explicit(fake_gpus):
    """LX2V_QK_ROPE / LX2V_ATTN8_CONFIG / LX2V_ATTN set in the environment beat the tuned file; they are
    read at import, so a fresh process checks them (a module reload would register the ops twice)."""
    _write(fake_gpus, NAMES[0], {"LX2V_QK_ROPE": "packed", "LX2V_ATTN8_CONFIG": "gluon_fa3_128x128_s2",
                                 "LX2V_ATTN": "gluon", "LX2V_CROSS_ATTN": "sdpa_cudnn"})
    code = ("import importlib, torch\n"
            "from lightx2v_engine.kernels import _util\n"
            f"_util.device_name = lambda d: {NAMES[0]!r}\n"
            "d = torch.device('cuda', 0)\n"
            "A = importlib.import_module('lightx2v_engine.kernels.attention')\n"
            "A8 = importlib.import_module('lightx2v_engine.kernels.attention_8bit')\n"
            "QK = importlib.import_module('lightx2v_engine.kernels.qk_norm_rope')\n"
            "print(QK.qk_rope_impl(d), A8.attention_8bit_config(d), A.attention_impl(d)[0], A.cross_attention_impl(d))\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LX2V_")}
    env.update(LX2V_TUNED=str(fake_gpus), LX2V_QK_ROPE="chunk", LX2V_ATTN8_CONFIG="tma_128x128_w8_s3",
               LX2V_ATTN="sdpa_flash")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split() == ["chunk", "tma_128x128_w8_s3", "sdpa_flash", "sdpa_flash"]
    env.pop("LX2V_QK_ROPE"), env.pop("LX2V_ATTN")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split() == ["packed", "tma_128x128_w8_s3", "gluon", "sdpa_cudnn"]


def test_a_tuned_folder_goes_first_and_the_package_fills_in(fake_gpus, monkeypatch):
    """LX2V_TUNED=<folder>: its file's choices first, the package's file for the rest (a gpu_check run
    cut before the attention benchmarks writes a partial file); unset: the package's alone."""
    _write(fake_gpus / "package", NAMES[0], {"LX2V_ATTN": "sdpa_cudnn", "LX2V_QK_ROPE": "packed"})
    _write(fake_gpus, NAMES[0], {"LX2V_ATTN": "gluon"})
    assert A.attention_impl(CUDA0)[0] == "gluon" and QK.qk_rope_impl(CUDA0) == "packed"
    assert _util.tuned_status(CUDA0) == (f"tuned defaults NVIDIA_H100_80GB_HBM3.json in {fake_gpus} over "
                                         "NVIDIA_H100_80GB_HBM3.json")
    monkeypatch.delenv("LX2V_TUNED")
    assert A.attention_impl(CUDA0)[0] == "sdpa_cudnn" and QK.qk_rope_impl(CUDA0) == "packed"
    monkeypatch.setenv("LX2V_TUNED", str(fake_gpus / "nowhere"))
    assert A.attention_impl(CUDA0)[0] == "sdpa_cudnn"
    assert "LX2V_TUNED folder" in _util.tuned_status(CUDA0) and "does not exist" in _util.tuned_status(CUDA0)


def test_an_explicit_config_selects_its_backend(fake_gpus):
    """LX2V_ATTN_CONFIG / set_attention_impl(config=...) without a backend runs the Triton kernel with that
    config even where the tuned file picks another backend (and cross-attention follows it)."""
    _write(fake_gpus, NAMES[0], {"LX2V_ATTN": "sdpa_cudnn", "LX2V_CROSS_ATTN": "sdpa_flash"})
    A.set_attention_impl(config="tma_256x64_w8_s3")
    assert A.attention_impl(CUDA0) == ("triton", "tma_256x64_w8_s3") and A.cross_attention_impl(CUDA0) == "triton"
    A.set_attention_impl(config="default", gluon_config="fa3_nopp_128x128_s2")
    assert A.attention_impl(CUDA0) == ("gluon", "fa3_nopp_128x128_s2")
    A.set_attention_impl(gluon_config="default")
    assert A.attention_impl(CUDA0)[0] == "sdpa_cudnn" and A.cross_attention_impl(CUDA0) == "sdpa_flash"


def test_the_ops_choose_by_their_tensors_device(monkeypatch):
    """The custom ops resolve the backend for the tensor's device: a tuned choice handed to the CPU device
    (faked) reaches the op body; a tuned SDPA backend that fails falls back to the Triton kernel with one
    warning, an explicit one raises."""
    from lightx2v_engine.kernels import attention
    from lightx2v_engine.ops import attention_ref
    seen = []
    monkeypatch.setattr(_util, "_tuned", lambda d: [(_util.TUNED_DIR / "x.json", {"LX2V_ATTN": "sdpa_flash"})]
                        if d is not None and d.type == "cpu" else [])
    real_sdpa = A._sdpa

    def spy(q, k, v, impl):
        seen.append(impl)
        return real_sdpa(q, k, v, impl)
    monkeypatch.setattr(A, "_sdpa", spy)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 24, 2, 128, generator=g).half() for _ in range(3))
    out = attention(q, k, v)
    assert seen == ["sdpa_flash"]
    torch.testing.assert_close(out, attention_ref(q, k, v).contiguous(), rtol=0, atol=0)

    def broken(q, k, v, impl):
        raise RuntimeError("No available kernel")
    monkeypatch.setattr(A, "_sdpa", broken)
    monkeypatch.setattr(A, "_SDPA_FAILED", {})
    with pytest.warns(RuntimeWarning, match="sdpa_flash .*failed .*Triton kernel runs instead"):
        out = attention(q, k, v)
    torch.testing.assert_close(out.float(), attention_ref(q, k, v).float(), rtol=2e-2, atol=2e-2)
    try:
        A.set_attention_impl("sdpa_flash")
        with pytest.raises(RuntimeError, match="No available kernel"):
            attention(q, k, v)
    finally:
        A.set_attention_impl("default")


def test_device_names_are_cached_per_index(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: calls.append(i) or NAMES[i])
    monkeypatch.setattr(_util, "_DEVICE_NAMES", {})
    assert _util.device_name(torch.device("cuda")) == NAMES[1]
    assert _util.device_name(CUDA1) == NAMES[1] and _util.device_name(CUDA0) == NAMES[0]
    assert calls == [1, 0]


def test_tuned_folders(monkeypatch):
    monkeypatch.delenv("LX2V_TUNED", raising=False)
    assert _util.tuned_dirs() == (_util.TUNED_DIR,) and _util.TUNED_DIR.name == "tuned"
    monkeypatch.setenv("LX2V_TUNED", "/x")
    assert _util.tuned_dirs() == (_util.Path("/x"), _util.TUNED_DIR)
    monkeypatch.setenv("LX2V_TUNED", "0")
    assert _util.tuned_dirs() == ()


def test_tuned_files_can_be_switched_off(fake_gpus, monkeypatch):
    _write(fake_gpus, NAMES[0], {"LX2V_QK_ROPE": "packed"})
    assert QK.qk_rope_impl(CUDA0) == "packed"
    monkeypatch.setenv("LX2V_TUNED", "0")
    assert QK.qk_rope_impl(CUDA0) == "chunk"
    assert _util.tuned_status(CUDA0) == "built-in defaults (LX2V_TUNED=0)"


@pytest.mark.parametrize("content, match", [
    ("{not json", "not a readable JSON file"),
    ("[1, 2]", "expected a JSON object"),
    (json.dumps({"device": NAMES[0], "choices": {}, "note": "x"}), r"unknown field\(s\) \['note'\]"),
    (json.dumps({"device": NAMES[0], "choices": {"LX2V_ATN": "triton"}}), "unknown choice 'LX2V_ATN'"),
    (json.dumps({"device": NAMES[0], "choices": {"LX2V_ATTN": 1}}), "must be a string"),
    (json.dumps({"device": NAMES[0], "choices": ["LX2V_ATTN"]}), "must be an object"),
    (json.dumps({"device": "NVIDIA H200", "choices": {}}), "written for device 'NVIDIA H200'"),
])
def test_bad_files_are_named(fake_gpus, content, match):
    path = fake_gpus / _util.tuned_file_name(NAMES[0])
    path.write_text(content)
    with pytest.raises(ValueError, match=match) as e:
        A.attention_impl(CUDA0)
    assert str(path) in str(e.value)


def test_a_value_outside_the_choices_is_named(fake_gpus):
    path = _write(fake_gpus, NAMES[0], {"LX2V_ATTN_CONFIG": "ws_128x64_w4_s3"})  # a removed config
    with pytest.raises(ValueError, match="LX2V_ATTN_CONFIG of tuned defaults .*must be one of") as e:
        A.attention_impl(CUDA0)
    assert str(path) in str(e.value)


def test_shipped_files_are_valid():
    """Every file in kernels/tuned/ is readable, named for its device, and chooses existing options."""
    files = sorted(_util.TUNED_DIR.glob("*.json"))
    assert files, "kernels/tuned/ has no file"
    choices = {"LX2V_ATTN": A.ATTN_IMPLS, "LX2V_ATTN_CONFIG": A.ATTN_CONFIGS,
               "LX2V_ATTN_GLUON_CONFIG": G.GLUON_CONFIGS, "LX2V_CROSS_ATTN": A.ATTN_IMPLS,
               "LX2V_ATTN8_CONFIG": A8.ATTN8_CONFIGS, "LX2V_QK_ROPE": QK.QK_ROPE_IMPLS,
               "LX2V_SELF_ATTN_ROPE": AR.ROPE_PLACEMENTS}
    assert set(choices) == set(_util.TUNED_KEYS)
    for path in files:
        device = json.loads(path.read_text())["device"]
        assert path.name == _util.tuned_file_name(device)
        for key, value in _util.read_tuned(str(path), device).items():
            assert value in choices[key], (path, key, value)


def test_gpus_without_a_file_take_their_architectures(fake_gpus, monkeypatch):
    """Tuned files were matched by the exact GPU name: an H100 PCIe / NVL, a MIG slice, an H800 got the built-in
    defaults (Triton instead of Gluon, ~11% slower attention). A MIG slice takes its whole GPU's file, an sm90
    GPU without one the H100 SXM's (H200s the H200's); a GPU of another family keeps the built-in defaults."""
    names = {**NAMES, 2: "NVIDIA H100 PCIe", 3: "NVIDIA H100 80GB HBM3 MIG 1g.10gb", 4: "NVIDIA H800",
             5: "NVIDIA H200 NVL", 6: "NVIDIA A100-SXM4-80GB"}
    monkeypatch.setattr(_util, "device_name", lambda d: names[d.index])
    _write(fake_gpus, NAMES[0], {"LX2V_ATTN": "gluon", "LX2V_QK_ROPE": "packed"})
    for i in (2, 3, 4, 5):
        dev = torch.device("cuda", i)
        assert A.attention_impl(dev)[0] == "gluon" and QK.qk_rope_impl(dev) == "packed", names[i]
        assert _util.tuned_status(dev).endswith(f"(for {names[i]}: none of its own, {NAMES[0]}'s)")
    _write(fake_gpus, "NVIDIA H200", {"LX2V_QK_ROPE": "chunk"})
    _util.clear_tuned_cache()
    assert QK.qk_rope_impl(torch.device("cuda", 5)) == "chunk"  # (an H200 NVL: the H200's file)
    assert A.attention_impl(torch.device("cuda", 6)) == ("triton", A.DEFAULT_ATTN_CONFIG)
    assert A.attention_impl(CUDA1) == ("triton", A.DEFAULT_ATTN_CONFIG)
