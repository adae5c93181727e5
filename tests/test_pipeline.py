"""End to end on a tiny model folder in the real layout, through the CLI."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from lightx2v_engine.image import i2v_latent_size
from lightx2v_engine.infer import main
from lightx2v_engine.video import load_latents, read_mp4


pytestmark = pytest.mark.usefixtures("torch_ops")  # the plain-PyTorch reference ops (conftest)


def write_config(path, **keys):
    base = {"infer_steps": 4, "denoising_step_list": [1000, 750, 500, 250], "sample_shift": 5, "enable_cfg": False,
            "target_video_length": 9, "target_height": 64, "target_width": 96}
    base.update(keys)
    path.write_text(json.dumps(base))
    return str(path)


def cli(folder, tmp_path, *extra, task="t2v", model_cls="wan2.1_distill", config=None, out="out.mp4",
        prompt="a small dog running on the beach"):
    args = ["--model_cls", model_cls, "--task", task, "--model_path", str(folder),
            "--config_json", config or write_config(tmp_path / "cfg.json"), "--save_result_path", str(tmp_path / out),
            "--quiet"]
    if prompt is not None:
        args += ["--prompt", prompt]
    return main(args + list(extra))


def test_t2v_end_to_end_and_determinism(t2v_folder, tmp_path):
    assert cli(t2v_folder, tmp_path, "--save_latents", str(tmp_path / "a.safetensors"), "--seed", "7") == 0
    video = read_mp4(tmp_path / "out.mp4")
    assert video.shape == (9, 64, 96, 3)
    assert video.std() > 1.0  # not constant
    assert np.abs(np.diff(video.astype(np.float32), axis=0)).mean() > 0.1  # frames differ
    lat, meta = load_latents(tmp_path / "a.safetensors")
    assert lat.shape == (16, 3, 8, 12) and meta["seed"] == 7
    assert cli(t2v_folder, tmp_path, "--save_latents", str(tmp_path / "b.safetensors"), "--seed", "7", out="o2.mp4") == 0
    assert torch.equal(lat, load_latents(tmp_path / "b.safetensors")[0])
    assert cli(t2v_folder, tmp_path, "--save_latents", str(tmp_path / "c.safetensors"), "--seed", "8", out="o3.mp4") == 0
    assert not torch.allclose(lat, load_latents(tmp_path / "c.safetensors")[0])
    # the longest latents name check_output_file accepts is written: the latents went through a second
    # temporary file beside the first, 52 bytes longer, and failed (ENAMETOOLONG) after the run
    from lightx2v_engine.video import _max_name
    name = "l" * (_max_name("x.safetensors") - len(".safetensors")) + ".safetensors"
    assert cli(t2v_folder, tmp_path, "--save_latents", str(tmp_path / name), "--seed", "7", out="o4.mp4") == 0
    assert torch.equal(lat, load_latents(tmp_path / name)[0]) and load_latents(tmp_path / name)[1]["seed"] == 7
    assert sorted(p.name for p in tmp_path.iterdir() if ".tmp" in p.name) == []


def test_lora_from_config_changes_output(t2v_folder, tmp_path):
    g = torch.Generator().manual_seed(0)
    lora = {}
    for name, (o, i) in {"blocks.0.self_attn.q": (256, 256), "blocks.1.ffn.0": (512, 256)}.items():
        lora[f"diffusion_model.{name}.lora_up.weight"] = torch.randn(o, 8, generator=g) * 0.3
        lora[f"diffusion_model.{name}.lora_down.weight"] = torch.randn(8, i, generator=g) * 0.3
    save_file(lora, str(tmp_path / "lora.safetensors"))
    cfg = write_config(tmp_path / "lora.json", lora_configs=[{"path": str(tmp_path / "lora.safetensors"), "strength": 1.0}])
    assert cli(t2v_folder, tmp_path, "--save_latents", str(tmp_path / "l.safetensors"), config=cfg) == 0
    assert cli(t2v_folder, tmp_path, "--save_latents", str(tmp_path / "n.safetensors"), out="n.mp4") == 0
    a, b = load_latents(tmp_path / "l.safetensors")[0], load_latents(tmp_path / "n.safetensors")[0]
    assert (a - b).abs().max() > 1e-3


def test_baseline_sampler_with_cfg(t2v_folder, tmp_path):
    cfg = tmp_path / "base.json"
    cfg.write_text(json.dumps({"infer_steps": 3, "sample_shift": 5, "enable_cfg": True, "sample_guide_scale": 5.0,
                               "target_video_length": 5, "target_height": 32, "target_width": 48}))
    assert cli(t2v_folder, tmp_path, model_cls="wan2.1", config=str(cfg)) == 0
    assert read_mp4(tmp_path / "out.mp4").shape == (5, 32, 48, 3)


def test_i2v_end_to_end(i2v_folder, tmp_path):
    img = (np.random.default_rng(0).random((80, 120, 3)) * 255).astype(np.uint8)
    Image.fromarray(img).save(tmp_path / "in.png")
    assert cli(i2v_folder, tmp_path, "--image_path", str(tmp_path / "in.png"), task="i2v") == 0
    lh, lw = i2v_latent_size(80, 120, 64, 96)
    video = read_mp4(tmp_path / "out.mp4")
    assert video.shape == (9, lh * 8, lw * 8, 3)
    assert video.std() > 1.0


@pytest.mark.parametrize("case", ["missing_vae", "bad_image", "bad_size", "empty_prompt", "no_prompt", "task_mismatch",
                                  "missing_dit", "missing_tokenizer", "missing_t5"])
def test_bad_inputs_fail_cleanly(case, t2v_folder, i2v_folder, tmp_path, capsys, monkeypatch):
    import shutil
    folder = tmp_path / "model"
    src = i2v_folder if case == "bad_image" else t2v_folder
    shutil.copytree(src, folder)
    extra, task, prompt, config = [], "t2v", "a cat", None
    if case == "missing_vae":
        (folder / "Wan2.1_VAE.pth").unlink()
    elif case == "missing_dit":
        (folder / "diffusion_pytorch_model.safetensors").unlink()
    elif case in ("missing_tokenizer", "missing_t5"):  # found missing before the DiT is read (it was after the
        # DiT and umT5: minutes at 14B)
        (folder / ("google/umt5-xxl/tokenizer.json" if case == "missing_tokenizer"
                   else "models_t5_umt5-xxl-enc-bf16.pth")).unlink()
        from lightx2v_engine import pipeline as pipeline_mod

        def no_dit(*a, **k):
            raise AssertionError("the DiT was read first")
        monkeypatch.setattr(pipeline_mod, "load_dit", no_dit)
    elif case == "bad_image":
        (tmp_path / "bad.png").write_bytes(b"not an image")
        extra, task = ["--image_path", str(tmp_path / "bad.png")], "i2v"
    elif case == "bad_size":
        extra = ["--target_shape", "65", "96"]
    elif case == "empty_prompt":
        prompt = "   "
    elif case == "no_prompt":
        prompt = None
    elif case == "task_mismatch":
        task = "i2v"
    rc = cli(folder, tmp_path, *extra, task=task, prompt=prompt, config=config)
    err = capsys.readouterr().err
    assert rc == 2
    line = [l for l in err.splitlines() if l.startswith("error: ")]
    assert line, err
    expect = {"missing_vae": "Wan2.1_VAE.pth", "bad_image": "bad.png", "bad_size": "target_height",
              "empty_prompt": "prompt", "no_prompt": "prompt", "task_mismatch": "task",
              "missing_dit": "diffusion_pytorch_model", "missing_tokenizer": "tokenizer.json",
              "missing_t5": "models_t5_umt5-xxl-enc-bf16.pth"}[case]
    assert expect in line[0]
    assert not (tmp_path / "out.mp4").exists()
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".mp4" or ".tmp" in p.name]


@pytest.mark.parametrize("args, match", [
    (["--device", "bogus"], "device 'bogus': not a torch device"),
    (["--device", "mps"], "runs on 'cuda' or 'cpu'"),
    (["--last_frame_path", "b.png"], "--last_frame_path .* is not supported"),
    (["--task", "i2v", "--image_path", "a.png,b.png"], "several comma-separated images are not supported"),
    (["--save_result_path", "."], "--save_result_path '.' is a directory"),
    (["--save_latents", "."], "--save_latents '.' is a directory"),
    (["--save_result_path", "taken/out.mp4"], r"--save_result_path 'taken/out.mp4': .*taken is a file, not a folder"),
    (["--task", "i2v", "--image_path", "nope.png"], "image file not found: nope.png"),
    (["--task", "i2v", "--image_path", "taken"], "cannot read image file taken"),
    (["--task", "i2v", "--image_path", ""], "--image_path is required"),  # ("" is LightX2V's default: none)
    (["--task", "i2v", "--image_path", "tall.png"], r"image aspect ratio 400x8 .* too extreme"),
    (["--seed", "-1"], r"--seed -1: must be an integer in \[0, 2\^64\)"),
    (["--save_result_path", ""], "--save_result_path '' is a directory"),
    (["--save_latents", ""], "--save_latents '' is a directory"),
    (["--save_result_path", "out.gif"], r"--save_result_path 'out.gif': the video is H.264 in one of \.mp4"),
    # (found after the whole run before, naming a hidden temporary file; root passes os.access everywhere)
    (["--save_result_path", "/proc/x.mp4"],
     r"--save_result_path '/proc/x.mp4': (the folder /proc is not writable|cannot write in the folder /proc)"),
    (["--save_result_path", "o.mp4", "--save_latents", "l.pt"], r"--save_latents 'l.pt': .* give a \.safetensors"),
    (["--save_result_path", "o.mp4", "--config_json", "."], r"config file \. is a folder: give the JSON file"),
    # (one inside the other: the second written failed after the run, and the first was left behind)
    (["--save_result_path", "lat.safetensors/v.mp4", "--save_latents", "lat.safetensors"], "one lies inside the other"),
    (["--save_result_path", "out.mp4", "--save_latents", "out.mp4/l.safetensors"], "one lies inside the other"),
])
def test_cli_argument_errors_before_loading(tmp_path, monkeypatch, capsys, args, match):
    """Argument errors are one 'error:' line and exit 2, found before any model loads or any file is written."""
    import re
    monkeypatch.chdir(tmp_path)
    (tmp_path / "taken").write_bytes(b"not an image")
    from PIL import Image
    Image.new("RGB", (8, 400)).save(tmp_path / "tall.png")
    import lightx2v_engine.infer as infer
    loads, real = [], infer.load_pipeline
    monkeypatch.setattr(infer, "load_pipeline", lambda *a: loads.append(a) or real(*a))
    rc = main(["--random-weights", "--prompt", "a cat", "--quiet", *args])
    err = capsys.readouterr().err
    assert rc == 2 and re.search(match, err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken", "tall.png"]
    if "--device" not in args:  # (the device is checked where the models are made)
        assert loads == []


def test_cli_output_through_a_dangling_link_and_host_memory_errors(tmp_path, monkeypatch, capsys):
    """An output folder that is a symbolic link to nothing passed the check and failed after the run
    (mkdir: File exists); running out of host memory was a traceback and exit 1 (torch's CPU allocator
    raises a RuntimeError): one line and exit 3, as out of GPU memory."""
    import lightx2v_engine.infer as infer
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dl").symlink_to(tmp_path / "nowhere")
    monkeypatch.setattr(infer, "load_pipeline", lambda *a: pytest.fail("loaded before the output check"))
    for flag, path in (("--save_result_path", "dl/x.mp4"), ("--save_latents", "dl/l.safetensors")):
        args = ["--save_result_path", "o.mp4", flag, path] if flag == "--save_latents" else [flag, path]
        assert main(["--random-weights", "--prompt", "a cat", "--quiet", *args]) == 2
        err = capsys.readouterr().err
        assert f"error: {flag} '{path}': {tmp_path / 'dl'} is a symbolic link to nothing" in err, err
    def oom(args):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:121] data. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 7680000000000 bytes. Error code 12 (Cannot allocate memory)")
    monkeypatch.setattr(infer, "run", oom)
    assert main(["--random-weights", "--prompt", "a cat"]) == 3
    err = capsys.readouterr().err
    assert err.startswith("error: out of host memory ([enforce fail") and err.count("\n") == 1, err
    monkeypatch.setattr(infer, "run", lambda args: (_ for _ in ()).throw(MemoryError()))
    assert main(["--random-weights", "--prompt", "a cat"]) == 3
    assert capsys.readouterr().err == "error: out of host memory (MemoryError)\n"
    monkeypatch.setattr(infer, "run", lambda args: (_ for _ in ()).throw(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):  # (other errors keep their traceback)
        main(["--random-weights", "--prompt", "a cat"])


def test_cli_random_weights_mistakes_are_named(tmp_path, capsys):
    """--random-weights with --model_path made a random video without a word (the weights ignored); --task
    i2v with the t2v tiny preset says which preset fits."""
    out = str(tmp_path / "v.mp4")
    for args, message in ((["--model_path", str(tmp_path)], "--random-weights builds a model with random weights: "
                                                            "drop --model_path"),
                          (["--task", "i2v", "--preset", "tiny", "--image_path", __file__],
                           "--task i2v does not fit preset 'tiny' (t2v) (use --preset tiny-i2v)")):
        if "--image_path" in args:
            from PIL import Image
            Image.new("RGB", (64, 64)).save(tmp_path / "a.png")
            args[-1] = str(tmp_path / "a.png")
        assert main(["--random-weights", "--prompt", "a cat", "--quiet", "--save_result_path", out, *args]) == 2
        assert message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix != ".png") == []


def test_cli_interrupted_ends_cleanly(tmp_path):
    """SIGTERM (kill, docker stop) mid-run: exit 128 + 15, one "interrupted" line instead of a traceback,
    and no file left (the CLI had no SIGTERM handler: the temporary files stayed; Ctrl-C printed a
    30-line traceback)."""
    import signal
    import subprocess
    import sys
    import time
    proc = subprocess.Popen([sys.executable, "-m", "lightx2v_engine.infer", "--random-weights", "--prompt", "a cat",
                             "--num_frames", "41", "--target_shape", "192", "320", "--save_result_path",
                             str(tmp_path / "v.mp4"), "--save_latents", str(tmp_path / "v.safetensors")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    err, t0 = "", time.time()
    while "ops: " not in err and time.time() - t0 < 120:  # (the pipeline is built: the run has begun)
        line = proc.stderr.readline()
        if not line:
            break
        err += line
    proc.send_signal(signal.SIGTERM)
    out, rest = proc.communicate(timeout=120)
    err += rest
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "interrupted (SIGTERM)" in err and "Traceback" not in err, err[-2000:]
    assert list(tmp_path.iterdir()) == []


def test_fractional_fps_is_the_videos_rate(tmp_path):
    """"fps": 23.976 (LightX2V takes any number) is the written video's frame rate (24000/1001 ~ 2997/125)."""
    import subprocess
    import imageio_ffmpeg
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"fps": 23.976, "target_video_length": 5, "target_height": 32, "target_width": 48}))
    assert main(["--random-weights", "--prompt", "a cat", "--config_json", str(cfg), "--quiet",
                 "--save_result_path", str(tmp_path / "f.mp4")]) == 0
    probe = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-i", str(tmp_path / "f.mp4")], capture_output=True,
                           text=True).stderr
    assert "23.98 fps" in probe, probe[-800:]


def test_cli_newer_lightx2v_size_flags(tmp_path, capsys):
    """Newer LightX2V spells --target_shape H W as --size H W, and the frame count --num_frames."""
    rc = main(["--random-weights", "--preset", "tiny", "--prompt", "a red car", "--size", "32", "48",
               "--num_frames", "5", "--save_result_path", str(tmp_path / "r.mp4"), "--quiet"])
    assert rc == 0
    assert read_mp4(tmp_path / "r.mp4").shape == (5, 32, 48, 3)
    assert main(["--random-weights", "--prompt", "a cat", "--quiet", "--target_shape", "64", "96", "--size", "32",
                 "48"]) == 2
    assert "--target_shape [64, 96] and --size [32, 48] disagree" in capsys.readouterr().err


def test_cli_cuda_device_without_cuda(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["--random-weights", "--prompt", "a cat", "--quiet", "--device", "cuda"]) == 2
    assert "device 'cuda': CUDA is not available here" in capsys.readouterr().err


def test_random_weights_tiny_preset(tmp_path):
    rc = main(["--random-weights", "--preset", "tiny", "--prompt", "a red car", "--save_result_path",
               str(tmp_path / "r.mp4"), "--quiet"])
    assert rc == 0
    assert read_mp4(tmp_path / "r.mp4").shape == (9, 64, 96, 3)


def test_non_finite_values_are_errors_naming_where():
    """NaN produced at run time is an error naming where: a denoising step (the DiT), or the VAE decode of
    finite latents (which the uint8 conversion would otherwise write as black pixels)."""
    from lightx2v_engine.pipeline import NonFiniteError, Pipeline
    size = {"target_video_length": 5, "target_height": 32, "target_width": 48}
    pipe = Pipeline.random("tiny", size, device="cpu")
    with torch.no_grad():
        next(pipe.vae.decoder.parameters()).fill_(float("nan"))
    with pytest.raises(NonFiniteError, match=r"the VAE decode produced \d+ NaN/Inf values"):
        pipe.generate("a cat", seed=1)
    pipe = Pipeline.random("tiny", size, device="cpu")
    with torch.no_grad():
        pipe.dit.head.head.weight.fill_(float("nan"))
    with pytest.raises(NonFiniteError, match="step 1"):
        pipe.generate("a cat", seed=1)
    # the encoders: named where they produce it, not blamed on the DiT's first step
    pipe = Pipeline.random("tiny", size, device="cpu")
    with torch.no_grad():
        pipe.t5.token_embedding.weight.fill_(float("inf"))
    with pytest.raises(NonFiniteError, match=r"the text encoder \(umT5\) produced \d+ NaN/Inf"):
        pipe.generate("a cat", seed=1)
    pipe = Pipeline.random("tiny-i2v", size, device="cpu")
    with torch.no_grad():
        next(pipe.clip.parameters()).fill_(float("nan"))
    with pytest.raises(NonFiniteError, match=r"the image encoder \(CLIP\) produced \d+ NaN/Inf"):
        pipe.generate("a cat", image=torch.zeros(3, 32, 48), seed=1)
    pipe = Pipeline.random("tiny-i2v", size, device="cpu")
    with torch.no_grad():
        next(pipe.vae.encoder.parameters()).fill_(float("nan"))
    with pytest.raises(NonFiniteError, match=r"the VAE encoder \(the image's latents\) produced \d+ NaN/Inf"):
        pipe.generate("a cat", image=torch.zeros(3, 32, 48), seed=1)


def test_renoise_draws_from_the_initial_noise_generator():
    """distill_update "renoise": the fresh noise of each update comes from the generator that drew the initial
    noise, after it (LightX2V / Self-Forcing), in generate() and in denoise() called with the same seed."""
    from lightx2v_engine.pipeline import Pipeline
    from lightx2v_engine.schedulers import DistillSampler, initial_noise, make_generator
    size = {"target_video_length": 5, "target_height": 32, "target_width": 48, "distill_update": "renoise"}
    pipe = Pipeline.random("tiny", size, device="cpu")
    got = pipe.generate("a cat", seed=5).latents
    ctx = pipe.encode_text(["a cat"])
    assert torch.equal(pipe.denoise(initial_noise(5, 32, 48, 5, "cpu"), ctx, seed=5), got)
    # by hand: the sampler's update with noise drawn after the initial noise from one generator
    g = make_generator(5, "cpu")
    x = initial_noise(5, 32, 48, 0, "cpu", generator=g)[None]
    sampler = DistillSampler.from_step_list([1000, 750, 500, 250], 5.0, "renoise")
    noises = sampler.make_renoise_noise(x.shape, g, "cpu")
    ts = sampler.timestep_tensor("cpu")
    with torch.no_grad():
        for i in range(4):
            x = sampler.step(i, x, pipe.dit(x, ts[i:i + 1], ctx), noises[i] if i < 3 else None)
    torch.testing.assert_close(x[0], got, rtol=0, atol=0)


def test_text_len_sets_the_context_rows():
    """The DiT sees text_len context rows (zero-padded), as LightX2V pads to its config's text_len (512: Wan)."""
    from lightx2v_engine.pipeline import Pipeline
    size = {"target_video_length": 5, "target_height": 32, "target_width": 48}
    assert Pipeline.random("tiny", size, device="cpu").encode_text(["a cat"]).shape[1] == 512
    short = Pipeline.random("tiny", {**size, "text_len": 64}, device="cpu")
    ctx = short.encode_text(["a cat", "a dog"])
    assert ctx.shape[:2] == (2, 64) and ctx[:, 10:].abs().sum() == 0
    # and the DiT attends those 64 rows (the DiT's own zero-padding of a shorter context to 512 rows, Wan's,
    # must not undo the config's): other latents than text_len 512's, for a prompt shorter than both
    full = Pipeline.random("tiny", size, device="cpu")
    assert short.dit.context_rows == 64 and full.dit.context_rows == 512
    assert not torch.equal(short.generate("a cat", seed=1).latents, full.generate("a cat", seed=1).latents)


def test_random_pipeline_seed_draws_every_model():
    """Pipeline.random(seed=...) drew umT5, the VAE and CLIP from the seed but the DiT from seed 0 always."""
    from lightx2v_engine.pipeline import Pipeline
    a, b, a2 = (Pipeline.random("tiny", device="cpu", seed=s) for s in (0, 7, 0))
    for name in ("dit", "t5", "vae"):
        wa, wb, wa2 = (next(getattr(p, name).parameters()) for p in (a, b, a2))
        assert not torch.equal(wa, wb) and torch.equal(wa, wa2), name


def test_random_pipeline_honours_dit_quantized_and_lora_configs(tmp_path):
    """Pipeline.random (--random-weights) with dit_quantized quantises its random DiT (8-bit linears), and
    with lora_configs merges them: the same latents as the same LoRA set per request (it was ignored)."""
    from safetensors.torch import save_file
    from lightx2v_engine.config import LoraSpec
    from lightx2v_engine.pipeline import Pipeline
    from lightx2v_engine.quant import QuantLinear
    size = {"target_height": 32, "target_width": 48, "target_video_length": 5}
    q = Pipeline.random("tiny", {**size, "dit_quantized": True, "dit_quant_scheme": "int8-triton"}, device="cpu")
    assert sum(isinstance(m, QuantLinear) for m in q.dit.modules()) > 0
    g = torch.Generator().manual_seed(0)
    lora = {}
    for name, (out, inp) in (("blocks.0.self_attn.q", (256, 256)), ("blocks.1.ffn.0", (512, 256))):
        lora[f"diffusion_model.{name}.lora_up.weight"] = torch.randn(out, 4, generator=g) * 0.5
        lora[f"diffusion_model.{name}.lora_down.weight"] = torch.randn(4, inp, generator=g) * 0.5
    save_file(lora, str(tmp_path / "style.safetensors"))
    plain = Pipeline.random("tiny", size, device="cpu")
    base = plain.generate("a cat", seed=1).latents
    plain.set_request_loras([LoraSpec(str(tmp_path / "style.safetensors"), 1.0)])
    want = plain.generate("a cat", seed=1).latents
    assert (want - base).abs().max().item() > 1e-2
    with_lora = Pipeline.random("tiny", {**size, "lora_configs": [{"path": str(tmp_path / "style.safetensors")}]},
                                device="cpu")
    assert torch.equal(with_lora.generate("a cat", seed=1).latents, want)
    # built per use (unload_modules), a quantized random DiT checks request LoRAs against its 8-bit
    # skeleton: a full-weight diff for an 8-bit weight is refused at the call (it was accepted, then broke
    # every generate)
    from lightx2v_engine.lora import LoraKeyError
    w = plain.dit.state_dict()["blocks.0.self_attn.q.weight"]
    save_file({"diffusion_model.blocks.0.self_attn.q.diff": torch.randn_like(w.float()) * 0.01},
              str(tmp_path / "diff.safetensors"))
    per_use = Pipeline.random("tiny", {**size, "dit_quantized": True, "dit_quant_scheme": "int8-triton",
                                       "unload_modules": True}, device="cpu")
    with pytest.raises(LoraKeyError, match="8-bit weight"):
        per_use.set_request_loras([LoraSpec(str(tmp_path / "diff.safetensors"), 1.0)])
    assert per_use.generate("a cat", seed=1).latents.shape == base.shape


def test_generate_sizes_zero_and_whole_floats():
    """generate(): 0 frames / height / width is an error naming the key (it fell back to the config's size),
    and a whole-number float size is that integer (it failed with a message saying 64.0 is no multiple of 16)."""
    from lightx2v_engine.pipeline import Pipeline
    pipe = Pipeline.random("tiny", {"target_height": 32, "target_width": 48, "target_video_length": 5}, device="cpu")
    for kw, key in (({"height": 0}, "target_height"), ({"width": 0}, "target_width"),
                    ({"num_frames": 0}, "target_video_length")):
        with pytest.raises(ValueError, match=f"{key}' = 0"):
            pipe.generate("a cat", seed=1, **kw)
    assert tuple(pipe.generate("a cat", seed=1, height=64.0).frames.shape) == (5, 64, 48, 3)


def test_pipeline_methods_run_with_their_device_current(monkeypatch):
    """Triton launches, CUDA-graph capture and side streams use the current CUDA device, not their tensors':
    every public stage runs under torch.cuda.device(pipeline.device) (a pipeline on cuda:1 ran its kernels
    on GPU 0). CPU check through a recording stand-in for torch.cuda.device; the gpu twin below runs it."""
    from lightx2v_engine.pipeline import Pipeline
    stages = ("set_request_loras", "encode_text", "encode_image", "denoise", "decode", "generate")
    assert all(getattr(getattr(Pipeline, n), "on_own_device", False) for n in stages)
    entered = []

    class Current:
        def __init__(self, dev):
            self.dev = dev

        def __enter__(self):
            entered.append(self.dev)

        def __exit__(self, *exc):
            return False
    monkeypatch.setattr(torch.cuda, "device", Current)
    pipe = Pipeline.random("tiny", {"target_video_length": 5, "target_height": 32, "target_width": 48}, device="cpu")
    pipe.set_request_loras([])
    assert entered == []  # (a CPU pipeline: no device switch)
    pipe.device = torch.device("cuda", 1)
    pipe.set_request_loras([])
    assert entered == [torch.device("cuda", 1)]


@pytest.mark.gpu
def test_pipeline_on_a_second_gpu_matches_the_first():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    from lightx2v_engine.pipeline import Pipeline
    size = {"target_video_length": 5, "target_height": 32, "target_width": 48}
    torch.cuda.set_device(0)
    a = Pipeline.random("tiny", size, device="cuda:0").generate("a cat", seed=1).latents
    b = Pipeline.random("tiny", size, device="cuda:1").generate("a cat", seed=1).latents
    assert torch.cuda.current_device() == 0 and b.device == torch.device("cuda", 1)
    torch.testing.assert_close(a.cpu(), b.cpu(), rtol=0, atol=0)


def test_unipc_with_cfg_matches_diffusers_driving_the_same_dit():
    """model_cls wan2.1 (UniPC, CFG) against diffusers' UniPCMultistepScheduler (flow sigmas, bh2, order 2,
    Wan's shifted grid) driving the same DiT with two separate passes, v_u + g (v_c - v_u), fp32. A reversed
    CFG or a UniPC without its corrector passed every test before (review)."""
    import numpy as np
    from diffusers import UniPCMultistepScheduler
    from lightx2v_engine.config import parse_run_config
    from lightx2v_engine.pipeline import Pipeline
    from lightx2v_engine.schedulers import latent_shape
    n, shift, g = 12, 3.0, 5.0
    size = {"target_video_length": 9, "target_height": 32, "target_width": 48}
    run = parse_run_config({**size, "infer_steps": n, "sample_shift": shift, "enable_cfg": True,
                            "sample_guide_scale": g, "dtype": "fp32"}, model_cls="wan2.1", warn=False)
    pipe = Pipeline.random("tiny", run, device="cpu")
    with torch.no_grad():
        got = pipe.generate("a cat", negative_prompt="blurry", seed=3).latents
        ctx = pipe.encode_text(["a cat", "blurry"])
        sch = UniPCMultistepScheduler(num_train_timesteps=1000, use_flow_sigmas=True, flow_shift=shift,
                                      prediction_type="flow_prediction", solver_order=2, solver_type="bh2",
                                      predict_x0=True, lower_order_final=True, final_sigmas_type="zero")
        sch.set_timesteps(sigmas=np.linspace(float(np.float32(1 - 1 / 1000)), 0, n + 1)[:-1])
        x = torch.randn(latent_shape(9, 32, 48), generator=torch.Generator().manual_seed(3))[None]
        for t in sch.timesteps:
            ts = t.reshape(1)
            v_c, v_u = pipe.dit(x, ts, ctx[:1]), pipe.dit(x, ts, ctx[1:])
            x = sch.step(v_u + g * (v_c - v_u), t, x).prev_sample
    assert (got - x[0]).abs().max().item() < 1e-4 * max(1.0, x.abs().max().item())
    assert (got - pipe.generate("a cat", negative_prompt="a dog", seed=3).latents).abs().max() > 1e-2


def test_cfg_direction_and_guidance_one():
    """Guidance 0 is the unconditional prediction alone: the video of the negative prompt without CFG (a
    swapped combine gives the positive prompt's). Guidance 1 under enable_cfg is warned about (the
    unconditional pass does nothing), and denoise() under CFG without a negative context is an error (it ran
    unguided)."""
    from lightx2v_engine.pipeline import Pipeline
    size = {"target_video_length": 5, "target_height": 32, "target_width": 48, "dtype": "fp32"}
    guided = Pipeline.random("tiny", {**size, "enable_cfg": True, "sample_guide_scale": 0.0}, device="cpu")
    plain = Pipeline.random("tiny", size, device="cpu")
    a = guided.generate("a cat", negative_prompt="a dog", seed=5).latents
    b = plain.generate("a dog", seed=5).latents
    c = plain.generate("a cat", seed=5).latents
    assert (a - b).abs().max().item() < 1e-5 < (a - c).abs().max().item()
    with pytest.warns(UserWarning, match="sample_guide_scale 1: the unconditional pass is computed and has no effect"):
        Pipeline.random("tiny", {**size, "enable_cfg": True, "sample_guide_scale": 1.0}, device="cpu")
    ctx = guided.encode_text(["a cat"])
    with pytest.raises(ValueError, match="enable_cfg is on, so neg_context"):
        guided.denoise(torch.zeros(16, 2, 4, 6), ctx)


def test_seeds_cover_torchs_range():
    """torch.Generator takes any unsigned 64-bit seed (LightX2V passes --seed to it); 2^63..2^64-1 were refused."""
    from lightx2v_engine.config import parse_run_config
    from lightx2v_engine.schedulers import make_generator
    top = 2 ** 64 - 1
    assert torch.equal(torch.randn(3, generator=make_generator(top, "cpu")),
                       torch.randn(3, generator=torch.Generator().manual_seed(top)))
    assert parse_run_config({"seed": top}).seed == top
    for bad in (2 ** 64, -1):
        with pytest.raises(ValueError, match=r"\[0, 2\^64\)"):
            make_generator(bad, "cpu")
        with pytest.raises(ValueError, match=r"'seed'.*\[0, 2\^64\)"):
            parse_run_config({"seed": bad})


def test_tiny_presets_default_to_a_tiny_video(tmp_path):
    """Pipeline.random("tiny") (README's no-weights snippet) made an 81 x 480 x 832 video (minutes on a CPU),
    and so did the CLI's tiny preset once a config was given: the tiny size now fills what the config
    leaves unset, under either spelling; real presets keep the config's defaults."""
    import json
    from lightx2v_engine.config import TINY_SIZE
    from lightx2v_engine.infer import run_config_from_args, build_parser
    from lightx2v_engine.pipeline import Pipeline
    sizes = lambda run: (run.target_video_length, run.target_height, run.target_width)  # noqa: E731
    want = tuple(TINY_SIZE[k] for k in ("target_video_length", "target_height", "target_width"))
    assert sizes(Pipeline.random("tiny", device="cpu", with_encoders=False).run_cfg) == want
    assert sizes(Pipeline.random("tiny", {"num_frames": 5}, device="cpu", with_encoders=False).run_cfg) == (5, 64, 96)
    assert sizes(Pipeline.random("tiny", {"size": [32, 48]}, device="cpu", with_encoders=False).run_cfg) == (9, 32, 48)
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"feature_caching": "NoCaching"}))
    args = build_parser().parse_args(["--random-weights", "--preset", "tiny", "--prompt", "x", "--config_json", str(cfg),
                                      "--save_result_path", str(tmp_path / "v.mp4")])
    assert sizes(run_config_from_args(args)) == want
    args = build_parser().parse_args(["--random-weights", "--preset", "tiny", "--prompt", "x", "--config_json", str(cfg),
                                      "--num_frames", "13", "--save_result_path", str(tmp_path / "v.mp4")])
    assert sizes(run_config_from_args(args)) == (13, 64, 96)


def test_clip_features_reach_the_dit_in_clip_s_dtype():
    """The image MLP starts with an fp32 LayerNorm (as Wan's, whose fp16 CLIP output goes straight in): the
    features are not rounded to the run dtype (bf16) on the way (2^-9 relative, for nothing)."""
    from lightx2v_engine.pipeline import Pipeline
    pipe = Pipeline.random("tiny-i2v", {"dtype": "bf16", "target_video_length": 5, "target_height": 32,
                                        "target_width": 48}, device="cpu")
    seen = []
    hook = pipe.dit.img_emb.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    try:
        pipe.generate("a cat", image=torch.rand(3, 32, 48) * 2 - 1, seed=1)
    finally:
        hook.remove()
    assert seen and set(seen) == {next(pipe.clip.parameters()).dtype} == {torch.float32}, seen


def test_cli_ranks_above_0_do_not_check_what_they_never_write(t2v_folder, tmp_path, monkeypatch, capsys):
    """Under torchrun only rank 0 writes the video: the other ranks skip the output-path and ffmpeg checks (one
    failing on a node alone stopped that rank before the rendezvous, leaving the others waiting); rank 0
    still checks before loading."""
    from lightx2v_engine import infer

    class Loaded(Exception):
        pass

    def load(*a, **k):
        raise Loaded()
    monkeypatch.setattr(infer, "load_pipeline", load)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("IMAGEIO_FFMPEG_EXE", str(tmp_path / "no-ffmpeg"))
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(Loaded):  # past the checks
        cli(t2v_folder, tmp_path, config=write_config(tmp_path / "c.json", parallel={"seq_p_size": 2}))
    monkeypatch.setenv("RANK", "0")
    assert cli(t2v_folder, tmp_path, config=write_config(tmp_path / "c.json", parallel={"seq_p_size": 2})) == 2
    assert "no-ffmpeg" in capsys.readouterr().err


def test_cli_non_finite_values_are_one_error_line(monkeypatch, capsys, tmp_path):
    """NonFiniteError is a RuntimeError: the host-memory clause (RuntimeError) caught it first and re-raised
    it, so NaN at run time ended the CLI in a traceback (exit 1, the rank not marked failed), not one
    "error: ..." line and exit code 2."""
    from lightx2v_engine.dit import WanDiT
    monkeypatch.setattr(WanDiT, "forward", lambda self, x, *a, **k: torch.full_like(x, float("nan")))
    rc = main(["--random-weights", "--preset", "tiny", "--prompt", "a cat", "--quiet", "--num_frames", "5",
               "--target_shape", "32", "48", "--save_result_path", str(tmp_path / "unused.mp4")])
    assert rc == 2
    assert "error: non-finite values (NaN/Inf) in the latents after denoising step 1" in capsys.readouterr().err


def test_cli_out_of_memory_exit_code_also_for_rank0_only_steps(monkeypatch, capsys):
    """Rank 0's out of memory in a step it runs alone is a RankZeroOutOfMemory (a ValueError for the other
    ranks' agreement): the CLI still ends it with the out-of-memory exit code 3, not a user error's 2."""
    from lightx2v_engine import infer
    from lightx2v_engine.parallel import RankZeroOutOfMemory

    def run(args):
        raise RankZeroOutOfMemory("rank 0 failed to encode the inputs: OutOfMemoryError: CUDA out of memory")
    monkeypatch.setattr(infer, "run", run)
    assert main(["--random-weights", "--preset", "tiny", "--prompt", "x", "--save_result_path", "o.mp4"]) == 3
    assert "out of GPU memory" in capsys.readouterr().err


def test_i2v_image_is_checked_before_the_text_encoder_runs():
    """A missing image file, or one whose aspect ratio the target area cannot take, failed only after umT5
    had encoded the prompts (with unload_modules: after building umT5 from its 11 GB file)."""
    from PIL import Image
    from lightx2v_engine.pipeline import Pipeline
    size = {"target_video_length": 5, "target_height": 32, "target_width": 48, "unload_modules": True}
    pipe = Pipeline.random("tiny-i2v", size, device="cpu")
    built = []
    for name, build in list(pipe.loaders.items()):
        pipe.loaders[name] = lambda name=name, build=build, **k: (built.append(name), build(**k))[1]
    with pytest.raises(FileNotFoundError, match="image file not found"):
        pipe.generate("a cat", image="/nonexistent/cat.png", seed=1)
    with pytest.raises(ValueError, match="too extreme"):
        pipe.generate("a cat", image=Image.fromarray(np.zeros((300, 10, 3), np.uint8)), seed=1)
    assert built == []


def test_i2v_takes_an_empty_prompt_t2v_does_not():
    """As LightX2V (its CLI, API and server default the prompt to ""), image-to-video runs without a prompt
    (the image alone); text-to-video still refuses an empty one. An empty prompt is encoded, not skipped:
    it differs from a real one."""
    from lightx2v_engine.pipeline import Pipeline
    size = {"target_video_length": 5, "target_height": 32, "target_width": 48}
    pipe = Pipeline.random("tiny-i2v", size, device="cpu")
    img = torch.rand(3, 32, 48) * 2 - 1
    empty = pipe.generate("", image=img, seed=1).latents
    assert torch.equal(empty, pipe.generate(None, image=img, seed=1).latents)
    assert not torch.equal(empty, pipe.generate("a cat", image=img, seed=1).latents)
    with pytest.raises(ValueError, match="prompt must be a string"):
        pipe.generate(5, image=img, seed=1)
    with pytest.raises(ValueError, match="text-to-video needs a text prompt"):
        Pipeline.random("tiny", size, device="cpu").generate("  ", seed=1)


def test_building_and_running_a_pipeline_does_not_import_dynamo():
    """The models are built on `meta`; there a division by a Python number (the DiT's modulation init) or
    nn.Embedding's normal_ init (T5) goes through torch._refs, whose first use imports torch._dynamo: ~2 s
    of every process start (each CLI run, each torchrun rank) for nothing the engine uses."""
    import subprocess
    import sys
    script = ("import sys, torch\nfrom lightx2v_engine.pipeline import Pipeline\n"
              "p = Pipeline.random('tiny-i2v', {'target_video_length': 5, 'target_height': 32, 'target_width': 48},"
              " device='cpu')\np.generate('a cat', image=torch.rand(3, 40, 56) * 2 - 1, seed=1)\n"
              "print('DYNAMO', 'torch._dynamo' in sys.modules)\n")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert "DYNAMO False" in res.stdout, res.stdout + res.stderr[-3000:]


def test_api_inputs_named_as_the_cli_does():
    """Pipeline.random(None) was an AttributeError; generate(image="") on an I2V pipeline looked for the file
    "." (the CLI's --image_path "" is no image)."""
    from lightx2v_engine.pipeline import Pipeline
    with pytest.raises(ValueError, match="unknown model preset None"):
        Pipeline.random(None)
    pipe = Pipeline.random("tiny-i2v", {"target_video_length": 5, "target_height": 32, "target_width": 48},
                           device="cpu")
    with pytest.raises(ValueError, match=r"task i2v needs an image"):
        pipe.generate("a cat", image="")
