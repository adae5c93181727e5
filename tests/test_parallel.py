"""Multi-GPU parallelism (lightx2v_engine/parallel.py) on the CPU: torchrun with gloo, 2-4 processes.

Sequence parallel (Ulysses, and "ring" as k/v all-gather) and CFG parallel must give the single-process
result: the DiT to fp32 rounding (tests/parallel_worker.py), and the whole CLI run to the latents."""
import contextlib
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lightx2v_engine import infer
from lightx2v_engine.config import parse_run_config
from lightx2v_engine.parallel import ParallelConfig, init_parallel, parse_parallel
from lightx2v_engine.video import load_latents

HERE = Path(__file__).resolve().parent


def torchrun(n: int, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                           *args], capture_output=True, text=True, timeout=timeout, env=env)


# ---------------------------------------------------------------------------------------------- config

def test_parse_parallel_section():
    assert parse_run_config({}).parallel == ParallelConfig()
    cfg = parse_run_config({"parallel": {"seq_p_size": 4, "seq_p_attn_type": "ulysses", "cfg_p_size": 2},
                            "enable_cfg": True}).parallel
    assert (cfg.seq_p_size, cfg.cfg_p_size, cfg.world_size, cfg.enabled) == (4, 2, 8, True)
    # LightX2V's get_vae_parallel: a parallel section decodes the VAE on all ranks unless it says false
    assert cfg.vae_parallel and not parse_parallel({"seq_p_size": 2, "vae_parallel": False})[0].vae_parallel
    assert not parse_run_config({"parallel": False}).parallel.enabled
    cfg, notes = parse_parallel({"seq_p_size": 2, "vae_parallel": True, "seq_p_quant_scheme": "fp8",
                                 "seq_p_tensor_fusion": True, "seq_p_head_parallel_group_size": 4})
    assert cfg.vae_parallel and cfg.seq_p_quant_scheme == "fp8"
    assert notes == ["parallel.seq_p_tensor_fusion (q, k and v always travel in one collective)",
                     "parallel.seq_p_head_parallel_group_size (one collective for all heads)"]


@pytest.mark.parametrize("section, scheme", [
    ({"seq_p_fp8_comm": True}, "fp8"),  # LightX2V's older flag
    ({"seq_p_fp8_comm": False}, None),
    ({"seq_p_fp8_comm": None, "seq_p_fp4_comm": None}, None),
    ({"seq_p_quant_scheme": None, "seq_p_fp8_comm": False}, None),
    ({"seq_p_quant_scheme": "fp8", "seq_p_fp8_comm": True}, "fp8"),
])
def test_parallel_fp8_communication_keys(section, scheme):
    assert parse_run_config({"parallel": {"seq_p_size": 2, **section}}).parallel.seq_p_quant_scheme == scheme


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_row_packing_roundtrip(dtype):
    """pack_fp8_rows / unpack_fp8_rows (what the fp8 collectives move) against the e4m3 bound, on a permuted
    (non-contiguous) view with odd sizes, rows of very different magnitudes, and a row of zeros: every
    element within half an e4m3 step (2^-4 relative; 2^-10 of the row's scale among the subnormals)."""
    from lightx2v_engine.parallel import pack_fp8_rows, unpack_fp8_rows
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 7, 36, generator=g) * torch.logspace(-3, 3, 7)[None, None, :, None]
    x[1, 2, 3] = 0.0
    x = x.to(dtype).permute(1, 0, 2, 3)  # [3, 5, 7, 36], not contiguous
    p = pack_fp8_rows(x)
    assert p.dtype == torch.uint8 and p.shape == (3, 5, 7, 40)
    y = unpack_fp8_rows(p, torch.float32)
    xf = x.float()
    scale = xf.abs().amax(-1, keepdim=True) / 448
    assert torch.all((y - xf).abs() <= torch.maximum(xf.abs() * 2 ** -4, scale * 2 ** -10) + 1e-30)
    assert torch.equal(y[2, 1, 3], torch.zeros(36))
    assert unpack_fp8_rows(p, dtype).dtype == dtype
    xf[0, 0, 0, 0] = float("nan")  # a NaN stays visible (the run's non-finite check names it)
    assert unpack_fp8_rows(pack_fp8_rows(xf), torch.float32)[0, 0, 0].isnan().any()
    odd = torch.randn(3, 6, generator=g).to(dtype)  # a row width that is not a multiple of 4, one row at a time
    p = pack_fp8_rows(odd)
    for i in range(3):
        assert torch.allclose(unpack_fp8_rows(p[i:i + 1], torch.float32), odd[i:i + 1].float(), rtol=2 ** -4, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fp8_row_packing_on_cuda_matches_the_cpu():
    """On CUDA the rows are quantized by the csrc kernel (when built): the same bytes as the reference."""
    from lightx2v_engine.parallel import pack_fp8_rows, unpack_fp8_rows
    x = torch.randn(2, 3, 77, 5, 128, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    got = pack_fp8_rows(x.cuda())
    assert torch.equal(got.cpu(), pack_fp8_rows(x))
    assert torch.equal(unpack_fp8_rows(got, torch.bfloat16).cpu(), unpack_fp8_rows(pack_fp8_rows(x), torch.bfloat16))


def test_parallel_fp4_communication_runs_as_fp8():
    with pytest.warns(UserWarning, match=r"fp4 communication .* not implemented .* move fp8 instead"):
        assert parse_run_config({"parallel": {"seq_p_size": 2, "seq_p_fp4_comm": True}}).parallel.seq_p_quant_scheme \
            == "fp8"


@pytest.mark.parametrize("value, match", [
    ({"seq_p_szie": 2}, r"'parallel.seq_p_szie' \(did you mean 'parallel.seq_p_size'\?\)"),
    ({"seq_p_size": 0}, "'parallel.seq_p_size' = 0: expected a positive integer"),
    ({"seq_p_size": True}, "expected a positive integer"),
    ({"cfg_p_size": 4}, "cfg_p_size is 1 or 2"),
    ({"tensor_p_size": 2}, "tensor parallelism is not supported"),
    ({"seq_p_attn_type": "ulyses"}, r"expected one of \['ulysses', 'ring'\]"),
    ({"seq_p_quant_scheme": "int8"}, r"'parallel.seq_p_quant_scheme' = 'int8': expected null, \"fp8\" or \"fp4\""),
    ({"seq_p_fp8_comm": "yes"}, r"'parallel.seq_p_fp8_comm' = 'yes': expected true/false"),
    ({"seq_p_fp8_comm": True, "seq_p_fp4_comm": True}, "are both true: choose one"),
    ({"seq_p_quant_scheme": "fp4", "seq_p_fp8_comm": True}, r"= 'fp4' conflicts with 'parallel.seq_p_fp8_comm'"),
    ({"seq_p_fp8_com": True}, r"did you mean 'parallel.seq_p_fp8_comm'"),
    (True, "expected an object"),
    ([2], "expected an object"),
])
def test_bad_parallel_section_names_the_key(value, match):
    with pytest.raises(ValueError, match=match):
        parse_run_config({"parallel": value})


def test_cfg_groups_without_cfg_join_the_sequence_split():
    """LightX2V's *_ulysses configs run cfg_p_size 2 with CFG off: the groups would compute the same video.
    Here they join the sequence split where the attention allows it (the same video, sooner); where it
    does not (Ulysses, heads not a multiple of the world size), they compute the same, with a warning."""
    from lightx2v_engine.parallel import effective_parallel
    lx = ParallelConfig(seq_p_size=4, cfg_p_size=2)
    assert effective_parallel(lx, False, 40) == ParallelConfig(seq_p_size=8, cfg_p_size=1)  # 14B: 40 heads
    assert effective_parallel(lx, True, 40) == lx  # with CFG each group has its branch
    ring = ParallelConfig(seq_p_size=4, seq_p_attn_type="ring", cfg_p_size=2)
    assert effective_parallel(ring, False, 12) == ParallelConfig(seq_p_size=8, seq_p_attn_type="ring")
    with pytest.warns(UserWarning, match=r"compute the same video .* cannot join the Ulysses split \(12 heads over 8"):
        assert effective_parallel(lx, False, 12) == lx  # 1.3B: 12 heads


def test_world_size_must_match(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"seq_p_size 4 x cfg_p_size 1 = 4 processes, but the world size is 2"):
        init_parallel(ParallelConfig(seq_p_size=4), torch.device("cpu"))
    assert init_parallel(ParallelConfig(), torch.device("cpu")) is None  # one process: nothing to join


def test_cli_under_torchrun_needs_a_parallel_section(monkeypatch, capsys):
    from lightx2v_engine.infer import main
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["--random-weights", "--preset", "tiny", "--prompt", "x", "--quiet"]) == 2
    assert "started as 2 processes (torchrun) but the config has no 'parallel' section" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- DiT

@pytest.fixture(scope="module")
def dit_results(tmp_path_factory):
    """tests/parallel_worker.py at world sizes 2 and 3: {world: [per-rank {case: result}]}."""
    out = {}
    for n in (2, 3):
        path = tmp_path_factory.mktemp("par") / f"w{n}.json"
        r = torchrun(n, str(HERE / "parallel_worker.py"), str(path), "cpu")
        assert r.returncode == 0, r.stderr[-3000:]
        out[n] = json.loads(path.read_text())
    return out


@pytest.mark.parametrize("world, case, tokens", [
    (2, "ulysses_odd_len", 53), (2, "ring_three_heads", 53), (2, "ulysses_i2v", 15), (2, "ring_tiny_len", 2),
    (2, "ulysses_tiny_len", 2), (3, "ring_three_heads", 35), (3, "ulysses_three_heads", 35),
    (3, "ring_tiny_len", 2), (2, "ulysses_kernels", 23), (2, "ring_kernels", 23),
])
def test_sequence_parallel_dit_equals_one_process(dit_results, world, case, tokens):
    """Each rank's self-attention saw its shard only (ceil(L / world) rows), and every rank's output equals
    the unsharded forward. ring_tiny_len at 3 ranks: 4 tokens, the last rank holds only padding."""
    for rank, res in enumerate(dit_results[world]):
        r = res[case]
        assert "error" not in r, r
        assert r["tokens"] == tokens, (rank, r)
        assert r["rel"] < 1e-5, (rank, r)


@pytest.mark.parametrize("world, case, tokens", [(2, "ulysses_fp8", 53), (2, "ring_fp8", 53),
                                                 (3, "ring_fp8", 35), (2, "ulysses_fp8_kernels", 23)])
def test_sequence_parallel_fp8_communication(dit_results, world, case, tokens):
    """seq_p_quant_scheme "fp8": the attention's collective moves bytes (fp8 rows + their scales), and the
    output stays near the unsharded forward: fp8 e4m3 q/k/v cost about 2-3% per element, much less after
    the attention's averaging and the residual stream; the unquantized cases move no uint8."""
    for rank, res in enumerate(dit_results[world]):
        r = res[case]
        assert "error" not in r, r
        assert r["tokens"] == tokens, (rank, r)
        assert "torch.uint8" in r["moved"], (rank, r)
        assert 1e-5 < r["rel"] < 5e-3, (rank, r)  # ~6e-4 measured; zeroed q/k/v rows give 1.6e-2 to 2.8e-2
        plain = res[{"ulysses_fp8": "ulysses_odd_len", "ring_fp8": "ring_three_heads",
                     "ulysses_fp8_kernels": "ulysses_kernels"}[case]]
        assert "torch.uint8" not in plain["moved"], (rank, plain)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices (NCCL)")
def test_sequence_parallel_on_gpus_with_nccl(tmp_path):
    """The worker's cases on 2 GPUs: NCCL collectives, the Triton kernels in bf16, the VAE tiles by p2p."""
    path = tmp_path / "w.json"
    r = torchrun(2, str(HERE / "parallel_worker.py"), str(path), "cuda")
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(path.read_text())
    assert res[0]["device"] == "cuda"
    for rank, per in enumerate(res):
        for case in ("ulysses_odd_len", "ring_three_heads", "ulysses_i2v", "ring_tiny_len", "ulysses_tiny_len"):
            assert per[case]["rel"] < 1e-4, (rank, case, per[case])  # fp32 (TF32 off by default)
        for case in ("ulysses_kernels", "ring_kernels"):
            assert per[case]["rel"] < 2e-2, (rank, case, per[case])  # bf16: the shard GEMMs round differently
        for case, plain in (("ulysses_fp8", "ulysses_odd_len"), ("ring_fp8", "ring_three_heads"),
                            ("ulysses_fp8_kernels", "ulysses_kernels")):
            # fp8 rows add ~6e-4 (CPU); zeroed q/k/v rows would add 1.6e-2 or more
            assert "torch.uint8" in per[case]["moved"], (rank, case, per[case])
            assert per[case]["rel"] < per[plain]["rel"] + 5e-3, (rank, case, per[case], per[plain])
    assert res[0]["vae"]["equal"]


@pytest.mark.parametrize("world, case, heads", [(2, "ulysses_three_heads", 3), (3, "ulysses_odd_len", 2),
                                                (3, "ulysses_tiny_len", 4)])
def test_ulysses_needs_heads_divisible(dit_results, world, case, heads):
    err = dit_results[world][0][case]["error"]
    assert f"seq_p_size {world} with seq_p_attn_type 'ulysses' needs the head count ({heads})" in err
    assert "'ring'" in err


@pytest.mark.parametrize("world", [2, 3])
def test_vae_tiles_decoded_on_all_ranks(dit_results, world):
    """parallel.decode_tiled: the tiles decoded where assign_tiles puts them, blended on rank 0, equal the
    one-process tiled decode bit for bit (which differs from the untiled one: the check sees the tiling)."""
    res = [r["vae"] for r in dit_results[world]]
    assert res[0] == {"tiles": 4, "equal": True, "differs_from_untiled": True}
    assert all(r == {"tiles": 4, "none": True} for r in res[1:])


@pytest.mark.parametrize("world", [2, 3])
def test_encoders_on_rank0_only(dit_results, world):
    """Only rank 0 holds umT5 and CLIP and encodes; the others get its outputs (the video equals a
    one-process run's). A missing image fails on rank 0 and, through it, on every rank; the next video is
    then made on all ranks in step."""
    res = [r["pipeline"] for r in dit_results[world]]
    assert res[0]["t5"] and res[0]["clip"] and res[0]["frames"][0] == 5  # (I2V: the size follows the image)
    assert res[0]["error"] == "FileNotFoundError: image file not found: /nonexistent/in.png"
    for r in res[1:]:
        assert not r["t5"] and not r["clip"] and r["frames"] is None
        assert r["error"] == ("RankZeroError: rank 0 failed to encode the inputs: FileNotFoundError: image file not "
                              "found: /nonexistent/in.png")
    for r in res:
        assert r["rel_vs_one_process"] < 1e-2, r  # bf16 (sharded GEMMs round differently)


def test_assign_tiles_balances_area():
    from lightx2v_engine.parallel import assign_tiles
    assert assign_tiles([4, 4, 4, 1], 2) == [0, 1, 0, 1]
    assert assign_tiles([1, 9, 4, 4], 3) == [1, 0, 1, 2]
    assert assign_tiles([5], 4) == [0]


# ---------------------------------------------------------------------------------------------- CLI

def _cli(tmp_path, n, name, config, *extra, random=True):
    cfg = tmp_path / f"{name}.json"
    cfg.write_text(json.dumps({"target_video_length": 9, "target_height": 64, "target_width": 96, **config}))
    args = ["-m", "lightx2v_engine.infer", *(["--random-weights"] if random else []), "--device", "cpu",
            "--config_json", str(cfg), "--prompt", "a red fox",
            "--save_result_path", str(tmp_path / f"{name}.mp4"), "--save_latents", str(tmp_path / f"{name}.safetensors"),
            "--quiet", *extra]
    if n == 1:  # in this process (the torch import and the interpreter's kernel compiles are paid once)
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = infer.main(args[2:])
        r = subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())
    else:
        r = torchrun(n, *args)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [line for line in r.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, r.stdout  # rank 0 alone reports (and writes)
    return load_latents(tmp_path / f"{name}.safetensors")[0]


def test_cli_sequence_parallel_t2v(tmp_path):
    one = _cli(tmp_path, 1, "one", {})
    two = _cli(tmp_path, 2, "two", {"parallel": {"seq_p_size": 2, "seq_p_attn_type": "ulysses"}})
    assert ((two - one).norm() / one.norm()).item() < 1e-5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.json", "one.mp4", "one.safetensors", "two.json",
                                                          "two.mp4", "two.safetensors"]
    # LightX2V's fp8 communication flag reaches the collectives: near the one-process latents, not equal
    fp8 = _cli(tmp_path, 2, "fp8", {"parallel": {"seq_p_size": 2, "seq_p_fp8_comm": True}})
    assert 0 < ((fp8 - one).norm() / one.norm()).item() < 2e-2


@pytest.mark.parametrize("extra", [{}, {"cpu_offload": True}, {"unload_modules": True}],
                         ids=["resident", "block_offload", "unload_modules"])
def test_cli_model_folder_under_torchrun(t2v_folder, tmp_path, extra):
    """Pipeline.load (a model folder in the real layout) under torchrun, also with the DiT's blocks
    streamed from host memory: the latents of the one-process run."""
    folder = ("--model_path", str(t2v_folder))
    cfg = {"enable_cfg": True, **extra}
    one = _cli(tmp_path, 1, "one", cfg, *folder, random=False)
    two = _cli(tmp_path, 2, "two", {**cfg, "parallel": {"seq_p_size": 2, "cfg_p_size": 1}}, *folder, random=False)
    assert ((two - one).norm() / one.norm()).item() < 1e-5


LIGHTX2V_SCRIPT = """
import sys
from lightx2v_engine.lightx2v_api import LightX2VPipeline
pipe = LightX2VPipeline(task="t2v", model_path=sys.argv[1], model_cls="wan2.1_distill", device="cpu")
if sys.argv[3] == "parallel":
    pipe.enable_parallel(seq_p_size=2, seq_p_attn_type="ulysses")
pipe.create_generator(num_frames=9, height=64, width=96, guidance_scale=1.0)
res = pipe.generate(seed=7, prompt="a red car", negative_prompt="", save_result_path=sys.argv[2])
import os  # (one write() a line: the two ranks share stdout)
os.write(1, f"RESULT {pipe.pipeline.is_main} {res is None}\\n".encode())
"""


def test_lightx2v_api_script_under_torchrun(t2v_folder, tmp_path):
    """A LightX2V script with enable_parallel, run by torchrun: rank 0 writes the video of the one-process
    run and gets LightX2V's {"video": None}; rank 1 gets None and writes nothing."""
    from lightx2v_engine.video import read_mp4
    script = tmp_path / "script.py"
    script.write_text(LIGHTX2V_SCRIPT)
    r = subprocess.run([sys.executable, str(script), str(t2v_folder), str(tmp_path / "one.mp4"), "single"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "RESULT True False" in r.stdout, r.stderr[-3000:]
    r = torchrun(2, str(script), str(t2v_folder), str(tmp_path / "two.mp4"), "parallel")
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(line for line in r.stdout.splitlines() if line.startswith("RESULT")) == \
        ["RESULT False True", "RESULT True False"]
    assert (read_mp4(tmp_path / "one.mp4") == read_mp4(tmp_path / "two.mp4")).all()


def test_cli_vae_parallel_equals_tiled_decode(tmp_path):
    """vae_parallel: the VAE's tiles (2 x 1: latents 34 x 8, tiles of 32 rows every 24) decoded on both
    ranks give the one-process use_tiling_vae video."""
    from lightx2v_engine.video import read_mp4
    size = {"target_video_length": 5, "target_height": 272, "target_width": 64}
    _cli(tmp_path, 1, "one", {**size, "use_tiling_vae": True})
    _cli(tmp_path, 2, "two", {**size, "parallel": {"seq_p_size": 2, "vae_parallel": True}})
    a, b = read_mp4(tmp_path / "one.mp4"), read_mp4(tmp_path / "two.mp4")
    assert a.shape == (5, 272, 64, 3) and (a == b).all()


def test_cli_tiny_decoder_under_torchrun(tmp_path):
    """use_tae with vae_parallel: the tiny decoder runs on rank 0 alone (no tiles); the video is the
    one-process one."""
    from lightx2v_engine.video import read_mp4
    _cli(tmp_path, 1, "one", {"use_tae": True})
    _cli(tmp_path, 2, "two", {"use_tae": True, "parallel": {"seq_p_size": 2, "vae_parallel": True}})
    a, b = read_mp4(tmp_path / "one.mp4"), read_mp4(tmp_path / "two.mp4")
    assert a.shape == (9, 64, 96, 3) and (a == b).all()


def test_cli_unload_modules_under_torchrun(tmp_path):
    """unload_modules under torchrun: every rank builds its DiT per video (the random weights broadcast
    from rank 0 again), rank 0 its encoders; the latents of the one-process run."""
    one = _cli(tmp_path, 1, "one", {})
    two = _cli(tmp_path, 2, "two", {"unload_modules": True, "parallel": {"seq_p_size": 2}})
    assert ((two - one).norm() / one.norm()).item() < 1e-5


BUILD_FAILURE_SCRIPT = """
import gc
import os
import sys
import weakref
import torch
from lightx2v_engine.parallel import RankError
from lightx2v_engine.pipeline import Pipeline


def print(*parts):  # one write() a line: the two ranks share stdout (print's pieces interleaved: "ERRORERROR")
    os.write(1, (" ".join(map(str, parts)) + "\\n").encode())


size = {"target_video_length": 5, "target_height": 32, "target_width": 48}
pipe = Pipeline.random("tiny", {**size, "unload_modules": True, "parallel": {"seq_p_size": 2, "vae_parallel": True}},
                       device="cpu")
rank = pipe.parallel.rank
refs = []  # every model built: none may outlive the failed step (a traceback's frames would keep it)
for name, failing_rank, early in (("dit", 1, False), ("dit", 1, True), ("vae", 0, False)):  # one rank fails
    build = pipe.loaders[name]

    def failing(*args, build=build, failing_rank=failing_rank, early=early, **kw):
        if early and rank == failing_rank:  # before the random DiT's weight broadcast: the others wait in
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")  # the agreement, not in it
        model = build(*args, **kw)
        refs.append(weakref.ref(model))
        if rank == failing_rank:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return model
    failing.defers_broadcast = getattr(build, "defers_broadcast", False)
    pipe.loaders[name] = failing
    try:
        pipe.generate("a cat", seed=1)
        print("NO ERROR", name, rank)
    except RankError as e:
        gc.collect()
        print("ERROR", name, rank, e, "| freed:", pipe.dit is None and pipe.vae is None and
              all(r() is None for r in refs))
    pipe.loaders[name] = build
out = pipe.generate("a cat", seed=1)  # the ranks are still in step
print("NEXT", rank, out.frames is not None, float(out.latents.norm()))
"""


def test_build_failure_on_one_rank_is_an_error_on_all(tmp_path):
    """unload_modules under torchrun: a DiT (or, with vae_parallel, a VAE) build that fails on one rank
    alone (here an injected out-of-memory) is a RankError on every rank naming that rank and its error, the
    models are freed, and the next video is made in step."""
    script = tmp_path / "script.py"
    script.write_text(BUILD_FAILURE_SCRIPT)
    r = torchrun(2, str(script))
    assert r.returncode == 0, r.stderr[-3000:]
    lines = sorted(line for line in r.stdout.splitlines() if line.startswith(("ERROR", "NO ERROR", "NEXT")))
    assert len(lines) == 8, r.stdout
    for rank in (0, 1):
        for name, who, what, times in (("dit", 1, "DiT", 2), ("vae", 0, "VAE", 1)):
            assert lines.count(f"ERROR {name} {rank} failed to build the {what} on rank {who}: OutOfMemoryError: "
                               f"CUDA out of memory (injected) | freed: True") == times, lines
    next_lines = [line.split() for line in lines if line.startswith("NEXT")]
    assert sorted(line[2] for line in next_lines) == ["False", "True"]  # rank 0 alone gets the frames
    assert next_lines[0][3] == next_lines[1][3]  # the same latents on both ranks


def test_cli_cfg_groups_without_cfg(tmp_path):
    """cfg_p_size 2 without CFG (LightX2V's *_ulysses layout): the two ranks split the sequence instead of
    computing the same thing; the latents are the one-process run's."""
    one = _cli(tmp_path, 1, "one", {})
    cfg = tmp_path / "two.json"
    cfg.write_text(json.dumps({"target_video_length": 9, "target_height": 64, "target_width": 96,
                               "parallel": {"seq_p_size": 1, "cfg_p_size": 2}}))
    r = torchrun(2, "-m", "lightx2v_engine.infer", "--random-weights", "--device", "cpu", "--config_json", str(cfg),
                 "--prompt", "a red fox", "--save_result_path", str(tmp_path / "two.mp4"), "--save_latents",
                 str(tmp_path / "two.safetensors"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "the 2 CFG groups join the sequence split: seq_p_size 2" in r.stderr
    assert "sequence shard 0 of 2" in r.stderr
    two = load_latents(tmp_path / "two.safetensors")[0]
    assert ((two - one).norm() / one.norm()).item() < 1e-5


def test_cli_fp8_communication_without_a_sequence_split_warns(tmp_path):
    """seq_p_quant_scheme compresses the sequence split's collectives; with CFG groups only (seq_p_size 1)
    there are none, and the key would be silently ignored: a warning says so."""
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"target_video_length": 5, "target_height": 32, "target_width": 48, "enable_cfg": True,
                               "sample_guide_scale": 5.0,
                               "parallel": {"seq_p_size": 1, "cfg_p_size": 2, "seq_p_quant_scheme": "fp8"}}))
    r = torchrun(2, "-m", "lightx2v_engine.infer", "--random-weights", "--device", "cpu", "--config_json", str(cfg),
                 "--prompt", "a red fox", "--save_result_path", str(tmp_path / "v.mp4"), "--quiet")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "seq_p_quant_scheme 'fp8' has no effect without a sequence split" in r.stderr, r.stderr[-3000:]


def test_cli_cfg_and_sequence_parallel_i2v(tmp_path):
    """4 ranks: 2 CFG groups (cond / uncond) x 2 sequence shards, against CFG as one batch-2 forward (fp32:
    in bf16 the batch-1 and batch-2 GEMMs round differently)."""
    from PIL import Image
    Image.fromarray((torch.rand(64, 96, 3) * 255).to(torch.uint8).numpy()).save(tmp_path / "in.png")
    cfg = {"enable_cfg": True, "sample_guide_scale": 5.0, "dtype": "fp32"}
    extra = ("--task", "i2v", "--preset", "tiny-i2v", "--image_path", str(tmp_path / "in.png"),
             "--negative_prompt", "grey, blurry, static, overexposed")
    one = _cli(tmp_path, 1, "one", cfg, *extra)
    four = _cli(tmp_path, 4, "four", {**cfg, "parallel": {"seq_p_size": 2, "cfg_p_size": 2}}, *extra)
    assert ((four - one).norm() / one.norm()).item() < 1e-5
    no_cfg = _cli(tmp_path, 1, "nocfg", {**cfg, "enable_cfg": False}, *extra)
    assert ((no_cfg - one).norm() / one.norm()).item() > 1e-2  # CFG matters, so the comparison means something


# ---------------------------------------------------------------------------------------------- server

def _http(base, method, path, body=None):
    import urllib.request
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(base + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"} if data else {})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def _rank0_pid(torchrun_pid: int) -> int:
    """The pid of torchrun's child process with RANK=0 (Linux /proc)."""
    import glob
    for stat_path in glob.glob("/proc/[0-9]*/stat"):
        try:
            ppid = int(open(stat_path).read().rsplit(")", 1)[1].split()[1])
            env = open(stat_path[:-4] + "environ", "rb").read().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if ppid == torchrun_pid and b"RANK=0" in env:
            return int(stat_path.split("/")[2])
    raise AssertionError(f"no RANK=0 child of torchrun {torchrun_pid}")


def test_server_under_torchrun(tmp_path):
    """rank 0 serves HTTP and sends each task to rank 1; two tasks in a row; the video equals the
    single-process CLI's for the same seed."""
    import signal
    import socket
    import time
    import urllib.error
    from lightx2v_engine.video import read_mp4
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    size = {"target_video_length": 9, "target_height": 64, "target_width": 96}
    cfg = tmp_path / "par.json"
    cfg.write_text(json.dumps({**size, "parallel": {"seq_p_size": 2}}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "-m", "lightx2v_engine.server", "--random-weights", "--device", "cpu", "--config_json",
                             str(cfg), "--host",
                             "127.0.0.1", "--port", str(port), "--output_dir", str(tmp_path / "out")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        t0 = time.time()
        while True:
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            try:
                meta = _http(base, "GET", "/v1/service/metadata")
                break
            except (urllib.error.URLError, ConnectionError):
                assert time.time() - t0 < 180, "server did not come up"
                time.sleep(0.5)
        assert meta["world_size"] == 2
        for name in ("a.mp4", "b.mp4"):
            task = _http(base, "POST", "/v1/tasks/video/", {"prompt": "a red fox", "seed": 42, "save_result_path": name})
            while (info := _http(base, "GET", f"/v1/tasks/{task['task_id']}/status"))["status"] in ("pending", "processing"):
                time.sleep(0.2)
            assert info["status"] == "completed", info
        # SIGTERM to rank 0 alone (a supervisor stopping the serving process): it tells the idle rank 1 to
        # stop, and the job ends cleanly (rank 1 died in its receive, and torchrun failed, before)
        os.kill(_rank0_pid(proc.pid), signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, proc.stdout.read()[-3000:]
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # torchrun passes it to both ranks: all end, none hangs
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                raise AssertionError("the ranks did not stop within 60 s of SIGTERM")
    one = tmp_path / "one.mp4"
    r = subprocess.run([sys.executable, "-m", "lightx2v_engine.infer", "--random-weights", "--device", "cpu",
                        "--config_json",
                        str(_write(tmp_path / "one.json", size)), "--prompt", "a red fox", "--seed", "42",
                        "--save_result_path", str(one), "--quiet"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    want = read_mp4(one)
    for name in ("a.mp4", "b.mp4"):
        assert (read_mp4(tmp_path / "out" / name) == want).all()


def _write(path, obj):
    path.write_text(json.dumps(obj))
    return path


def test_bench_parallel_runs_on_cpus(tmp_path):
    """benchmarks/bench_parallel.py's code paths at the tiny preset (gloo): both timings, the ratio and the
    output's distance from the one-GPU forward."""
    r = torchrun(2, str(HERE.parent / "benchmarks" / "bench_parallel.py"), "--preset", "tiny", "--frames", "9",
                 "--height", "64", "--width", "96", "--iters", "1", "--device", "cpu", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((tmp_path / "parallel_summary.json").read_text())
    assert s["world_size"] == 2 and s["step_ms_1gpu"] > 0 and s["step_ms_seq_p2"] > 0
    assert s["speedup"] == pytest.approx(s["step_ms_1gpu"] / s["step_ms_seq_p2"])
    assert s["relerr_vs_1gpu"] < 1e-2  # bf16
    assert s["step_ms_seq_p2_fp8comm"] > 0 and s["comm_ms_fp8"] > 0
    assert s["fp8comm_speedup"] == pytest.approx(s["step_ms_seq_p2"] / s["step_ms_seq_p2_fp8comm"])
    assert 0 < s["relerr_fp8comm_vs_1gpu"] < 3e-2
    assert (tmp_path / "parallel.csv").read_text().count("\n") == 2


def test_server_task_errors_on_parallel_ranks(monkeypatch):
    """Errors every rank raises alike (bad input, NaNs, a cancel) leave the ranks in step: the task fails and
    the server goes on. Any other error may be one rank's alone: that rank exits (torchrun stops the rest)
    instead of leaving its peers waiting in a collective forever."""
    from types import SimpleNamespace
    from lightx2v_engine import server as S
    from lightx2v_engine.pipeline import NonFiniteError
    exits = []
    monkeypatch.setattr(S, "_exit_now", lambda code: exits.append(code))
    pipe = SimpleNamespace(parallel=SimpleNamespace(rank=1))
    for err in (ValueError("bad size"), NonFiniteError("NaN"), S.TaskCancelled()):
        monkeypatch.setattr(S, "_run_task", lambda *a, e=err: (_ for _ in ()).throw(e))
        with pytest.raises(type(err)):
            S._run_parallel_task(pipe, {}, lambda: False)
    assert exits == []
    monkeypatch.setattr(S, "_run_task", lambda *a: (_ for _ in ()).throw(torch.cuda.OutOfMemoryError("oom")))
    S._run_parallel_task(pipe, {}, lambda: False)
    assert exits == [1]


def test_control_messages_check_their_kind():
    """Parallel.receive refuses a message of another kind (ranks out of step: an error, not a misread);
    on_rank0 turns rank 0's reported failure into RankZeroError on the other ranks; rank 0 re-raises its
    own failure, wrapped unless every rank would raise its type anyway."""
    from lightx2v_engine.parallel import Parallel, RankZeroError
    rank1 = Parallel(ParallelConfig(seq_p_size=2), rank=1, world_size=2, device=torch.device("cpu"))
    rank1.broadcast_object = lambda obj=None: {"kind": "task", "params": {}}
    with pytest.raises(RuntimeError, match="expected a 'inputs' message from rank 0 and got 'task'"):
        rank1.receive("inputs")
    rank1.broadcast_object = lambda obj=None: None
    assert rank1.receive("task") is None  # the stop message
    rank1.broadcast_object = lambda obj=None: {"kind": "load x", "error": "OSError: disk"}
    with pytest.raises(RankZeroError, match="rank 0 failed to load x: OSError: disk"):
        rank1.on_rank0(lambda: 1 / 0, "load x")  # (fn never runs on rank 1)
    rank0 = Parallel(ParallelConfig(seq_p_size=2), rank=0, world_size=2, device=torch.device("cpu"))
    sent = []
    rank0.broadcast_object = lambda obj=None: sent.append(obj)
    assert rank0.on_rank0(lambda: 7, "load x") == 7
    with pytest.raises(RankZeroError, match="ZeroDivisionError") as e:
        rank0.on_rank0(lambda: 1 / 0, "load x")
    assert isinstance(e.value.__cause__, ZeroDivisionError)
    with pytest.raises(FileNotFoundError):
        rank0.on_rank0(lambda: open("/nonexistent/x"), "load x")
    assert [m["error"] for m in sent] == [None, "ZeroDivisionError: division by zero",
                                          "FileNotFoundError: [Errno 2] No such file or directory: '/nonexistent/x'"]
    # an interrupt stays what it is on rank 0 (the CLI's 'interrupted' exit 130/143; it was a RankZeroError,
    # a ValueError: 'error: ...', exit 2); out of memory is a RankZeroError (the ranks stay in step: the
    # multi-GPU server goes on) and an OutOfMemoryError (the CLI's exit 3); rank 1 is told either way
    from lightx2v_engine.parallel import RankZeroOutOfMemory
    for error in (KeyboardInterrupt(), SystemExit(3), torch.cuda.OutOfMemoryError("CUDA out of memory")):
        def fail(error=error):
            raise error
        with pytest.raises(type(error)) as got:
            rank0.on_rank0(fail, "load x")
        if isinstance(error, torch.cuda.OutOfMemoryError):
            assert isinstance(got.value, RankZeroOutOfMemory) and isinstance(got.value, RankZeroError)
            from lightx2v_engine import server as S
            assert isinstance(got.value, S._errors_every_rank_raises())
    assert [m["error"].split(":")[0] for m in sent[3:]] == ["KeyboardInterrupt", "SystemExit", "OutOfMemoryError"]


def test_cuda_graphs_are_off_under_parallelism():
    from lightx2v_engine import pipeline as pipeline_mod
    from lightx2v_engine.parallel import Parallel
    cuda = torch.device("cuda")
    par = Parallel(ParallelConfig(seq_p_size=2), rank=0, world_size=2, device=cuda)
    assert pipeline_mod._graphs_on(parse_run_config({}), cuda)
    assert not pipeline_mod._graphs_on(parse_run_config({}), cuda, par)


def test_broadcast_module_carries_fp8_tensors_over_gloo(tmp_path):
    """A quantized DiT's fp8 weights are broadcast as bytes (gloo has no float8 type: a deferred broadcast
    of a random fp8 DiT under unload_modules failed with "Invalid scalar type"); in a one-process gloo group
    in a subprocess."""
    import subprocess
    import sys
    script = f"""
import torch, torch.distributed as dist
from types import SimpleNamespace
from lightx2v_engine.parallel import Parallel
dist.init_process_group("gloo", init_method="file://{tmp_path}/store", rank=0, world_size=1)
m = torch.nn.Linear(4, 4)
m.register_buffer("w8", torch.randn(4, 4).to(torch.float8_e4m3fn))
want = m.w8.view(torch.uint8).clone()
Parallel.broadcast_module_(SimpleNamespace(_nccl=lambda: False, device=torch.device("cpu")), m)
assert m.w8.dtype == torch.float8_e4m3fn and torch.equal(m.w8.view(torch.uint8), want)
dist.destroy_process_group()
print("OK")
"""
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "OK" in res.stdout, res.stdout[-2000:] + res.stderr[-3000:]


def test_server_request_lora_failure_on_one_rank_is_agreed(monkeypatch):
    """Each rank reads a request's LoRA files itself: one rank failing (an unreadable file, EIO) made that rank
    exit the whole multi-GPU server (OSError is not an every-rank error) or left the others in the DiT's
    collectives. The outcome is agreed: every rank raises RankError (a ValueError) and the server goes on."""
    from types import SimpleNamespace
    from lightx2v_engine import server as S
    from lightx2v_engine.parallel import RankError
    agreed, generated, exits = [], [], []
    monkeypatch.setattr(S, "_exit_now", lambda code: exits.append(code))

    def agree(what, error):  # (as Parallel.agree with one failing peer: every rank raises)
        agreed.append(error)
        raise RankError(f"failed to {what} on rank 1: OSError: [Errno 5] Input/output error")

    def failing(specs):
        raise OSError(5, "Input/output error")
    for set_loras in (failing, lambda specs: None):  # the failing rank, then one whose read went well
        pipe = SimpleNamespace(parallel=SimpleNamespace(rank=0, agree=agree), set_request_loras=set_loras,
                               generate=lambda *a, **k: generated.append(1))
        with pytest.raises(RankError, match="apply the request's LoRAs on rank 1"):
            S._run_parallel_task(pipe, {"prompt": "a", "seed": 1, "loras": ("x.safetensors",)}, lambda: False)
    assert isinstance(agreed[0], OSError) and agreed[1] is None and generated == [] and exits == []
    assert issubclass(RankError, S._errors_every_rank_raises())


_ONE_RANK_FAILS = """
import os, sys, time, torch, torch.distributed as dist
from lightx2v_engine.parallel import ParallelConfig, init_parallel
init_parallel(ParallelConfig(seq_p_size=2), torch.device("cpu"))
if int(os.environ["RANK"]) == int(sys.argv[1]):
    raise RuntimeError("this rank failed alone")
t0 = time.time()
try:
    dist.all_reduce(torch.ones(1))  # (the survivor's next collective, with the failed rank)
    print("COLLECTIVE PASSED")
except Exception as e:
    print(f"COLLECTIVE FAILED after {time.time() - t0:.0f} s", flush=True)
    raise
"""


@pytest.mark.parametrize("failing", [0, 1])
def test_one_rank_failing_ends_the_job(tmp_path, failing):
    """A rank > 0 waited at the exit barrier for ever (monitored_barrier's timeout holds on rank 0 only)
    while rank 0 waited for it in its next collective (30 minutes): torchrun never ended the job. A rank
    that fails now tears its groups down at once, and the peer's collective fails."""
    script = tmp_path / "fails.py"
    script.write_text(_ONE_RANK_FAILS)
    t0 = time.time()
    r = torchrun(2, str(script), str(failing), timeout=240)
    took = time.time() - t0
    assert r.returncode != 0 and "this rank failed alone" in r.stderr, r.stderr[-3000:]
    assert "COLLECTIVE FAILED" in r.stdout and "COLLECTIVE PASSED" not in r.stdout, r.stdout[-2000:]
    assert took < 60, took


def test_sequence_split_rope_tables_go_with_the_dit(monkeypatch):
    """The sequence split's shard RoPE tables live on the process-wide parallel state: they stayed on the
    GPU after an offloaded DiT went back to the CPU or a per-use DiT was freed (its own caches are dropped),
    and their key ignored the head dim (two models sharing the state could get the other's tables)."""
    from dit_fixtures import TINY_T2V
    from lightx2v_engine.dit import WanDiT
    from lightx2v_engine.loading import build_dit
    from lightx2v_engine.ops import rope_tables
    from lightx2v_engine.parallel import SeqParallel
    sp = object.__new__(SeqParallel)  # (rank 0 of 2, no process group needed for the tables)
    sp.group, sp.mode, sp.quant, sp.rank, sp.size, sp._rope = None, "ring", None, 0, 2, {}
    a, b = sp.shard_rope(rope_tables((2, 3, 5), 128)), sp.shard_rope(rope_tables((2, 3, 5), 64))
    assert a.cos.shape[-1] == 64 and b.cos.shape[-1] == 32 and len(sp._rope) == 2
    dit = build_dit(TINY_T2V, None, dtype=torch.float32)
    dit.seq_parallel = sp
    dit.drop_device_caches()
    assert sp._rope == {}
    # a per-use DiT (unload_modules) is asked to drop them when freed
    from lightx2v_engine.pipeline import Pipeline
    pipe = Pipeline.random("tiny", {"target_video_length": 5, "target_height": 32, "target_width": 48,
                                    "unload_modules": True}, device="cpu")
    dropped = []
    real = WanDiT.drop_device_caches
    monkeypatch.setattr(WanDiT, "drop_device_caches", lambda self: (dropped.append(1), real(self)))
    pipe.generate("a cat", seed=1)
    assert dropped


_RANK0_DECODES = """
import os, sys, json
from lightx2v_engine.pipeline import Pipeline
size = {"target_video_length": 5, "target_height": 32, "target_width": 48}
for extra in ({"parallel": {"seq_p_size": 2, "vae_parallel": False}},
              {"use_tae": True, "parallel": {"seq_p_size": 2, "vae_parallel": False}},
              {"unload_modules": True, "parallel": {"seq_p_size": 2, "vae_parallel": False}}):
    pipe = Pipeline.random("tiny", {**size, **extra}, device="cpu")
    out = pipe.generate("a cat", seed=1)
    held = sorted(n for n in ("vae", "tae") if getattr(pipe, n) is not None or n in pipe.loaders)
    os.write(1, (json.dumps({"rank": pipe.parallel.rank, "held": held, "frames": out.frames is not None}) + "\\n").encode())
"""


def test_ranks_that_do_not_decode_build_no_vae(tmp_path):
    """With vae_parallel false, or the tiny decoder (which runs on rank 0 whatever vae_parallel says: the
    process keeps one parallel config, so false here too), rank 0 alone decodes: every other rank still built
    and held the VAE / tiny decoder (about 0.25 GB of GPU memory for Wan's VAE)."""
    script = tmp_path / "rank0.py"
    script.write_text(_RANK0_DECODES)
    r = torchrun(2, str(script), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert sorted((d["rank"], tuple(d["held"]), d["frames"]) for d in lines) == [
        (0, ("tae",), True), (0, ("vae",), True), (0, ("vae",), True), (1, (), False), (1, (), False), (1, (), False)]


def test_a_failed_cli_or_server_start_marks_the_rank_failed(tmp_path, monkeypatch, capsys):
    """The CLI's exit codes 2 and 3, and a server whose models fail to load, tell parallel.py that this rank
    failed (it then leaves without waiting for its peers at exit); a clean run does not."""
    import lightx2v_engine.parallel as par_mod
    from lightx2v_engine import server
    marks = []
    monkeypatch.setattr(par_mod, "mark_failed", lambda: marks.append(1))
    assert infer.main(["--random-weights", "--prompt", "a cat", "--quiet", "--seed", "-1"]) == 2
    assert marks == [1]
    assert server.main(["--random-weights", "--preset", "tiny", "--host", "127.0.0.1", "--port", "0",
                        "--output_dir", str(tmp_path / "out"), "--model_cls", "wan2.1_distill",
                        "--config_json", str(tmp_path / "missing.json")]) == 2
    assert marks == [1, 1]
    assert infer.main(["--random-weights", "--prompt", "a cat", "--quiet", "--num_frames", "5", "--target_shape",
                       "32", "48", "--save_result_path", str(tmp_path / "ok.mp4"), "--device", "cpu"]) == 0
    assert marks == [1, 1]
    capsys.readouterr()
