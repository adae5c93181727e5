"""LightX2V drop-in details: offload keys, quantized-encoder errors, CLI flags, extra config keys, path overrides,
warnings that point at the caller, the package-level Pipeline export."""
import json
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from lightx2v_engine import pipeline as pipeline_mod
from lightx2v_engine.config import load_run_config, parse_run_config
from lightx2v_engine.infer import build_parser, main
from lightx2v_engine.pipeline import CLIP_FILE, T5_FILE, VAE_FILE, WAN_NEGATIVE_PROMPT, Pipeline

TINY = {"target_video_length": 5, "target_height": 32, "target_width": 48}


def quiet_parse(raw, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return parse_run_config(raw, **kw)


# ------------------------------------------------------------------------------------------------ 1. offload

@pytest.mark.parametrize("raw,expect", [
    ({}, (False, False, False)),
    ({"cpu_offload": False}, (False, False, False)),
    ({"cpu_offload": True}, (True, True, True)),
    ({"cpu_offload": True, "t5_cpu_offload": False, "vae_cpu_offload": False}, (False, True, False)),
    ({"cpu_offload": False, "vae_cpu_offload": True}, (False, False, True)),
])
def test_encoder_offload_defaults_to_cpu_offload(raw, expect):
    cfg = quiet_parse(raw)
    assert (cfg.t5_cpu_offload, cfg.clip_cpu_offload, cfg.vae_cpu_offload) == expect
    assert cfg.cpu_offload == raw.get("cpu_offload", False)


def test_cpu_offload_is_acted_on_without_warning_and_phase_is_named():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = parse_run_config({"cpu_offload": True, "t5_cpu_offload": False})
    assert cfg.offload_granularity == "block" and not cfg.t5_cpu_offload and cfg.vae_cpu_offload
    with pytest.warns(UserWarning, match="'phase' runs as 'block'"):
        parse_run_config({"cpu_offload": True, "offload_granularity": "phase"})
    with pytest.raises(ValueError, match="offload_granularity.*'layer'.*expected one of"):
        parse_run_config({"cpu_offload": True, "offload_granularity": "layer"})


def _record_moves(monkeypatch):
    moves = []
    real = pipeline_mod._to_device
    monkeypatch.setattr(pipeline_mod, "_to_device", lambda m, d: (moves.append((type(m).__name__, d.type)), real(m, d)))
    return moves


@pytest.mark.usefixtures("torch_ops")
def test_vae_offload_moves_the_vae_around_decode_only(monkeypatch):
    pipe = Pipeline.random("tiny", {**TINY, "vae_cpu_offload": True}, device="cpu")
    moves = _record_moves(monkeypatch)
    seen = []
    real_decode = type(pipe.vae).decode
    monkeypatch.setattr(type(pipe.vae), "decode", lambda self, z, **kw: (seen.append(list(moves)), real_decode(self, z, **kw))[1])
    out = pipe.generate("a cat", seed=1)
    assert out.frames.shape == (5, 32, 48, 3)
    # to the run device before decode, back to the CPU after it; the T5 stays put
    assert seen == [[("WanVAE", "cpu")]]
    assert moves == [("WanVAE", "cpu"), ("WanVAE", "cpu")]
    base = Pipeline.random("tiny", TINY, device="cpu")
    moves.clear()
    assert torch.equal(base.generate("a cat", seed=1).frames, out.frames)
    assert moves == []


def test_a_run_config_made_in_python_offloads_the_encoders_with_cpu_offload():
    """RunConfig(cpu_offload=True) made in Python: t5/clip/vae offload follow it, as parsed from a config."""
    from lightx2v_engine.config import RunConfig
    for made in (RunConfig(cpu_offload=True), parse_run_config({"cpu_offload": True})):
        assert made.t5_cpu_offload and made.clip_cpu_offload and made.vae_cpu_offload
    assert RunConfig(cpu_offload=True, vae_cpu_offload=False).vae_cpu_offload is False
    assert RunConfig().t5_cpu_offload is False


def test_offloaded_vae_and_tae_drop_their_derived_weights_on_the_way_back():
    """The sub-pixel upsampling weights derived from the VAE's / tiny decoder's convs are cached beside them:
    moved back to the CPU (vae_cpu_offload), the cache went with nothing and stayed on the GPU."""
    from lightx2v_engine.tae import random_tae
    from lightx2v_engine.vae import Resample
    pipe = Pipeline.random("tiny", TINY, device="cpu")
    pipe.decode(torch.randn(16, 2, 4, 6))
    resamples = [m for m in pipe.vae.modules() if isinstance(m, Resample) and m.mode.startswith("up")]
    assert resamples and all(getattr(m, "_subpixel", None) is not None for m in resamples)
    pipeline_mod._to_device(pipe.vae, torch.device("cpu"))
    assert all(m._subpixel is None for m in resamples)
    tae = random_tae()
    tae._subpixel[0] = ("key", torch.zeros(1))
    pipeline_mod._to_device(tae, torch.device("cpu"))
    assert tae._subpixel == {}


@pytest.mark.usefixtures("torch_ops")
def test_cpu_offload_moves_t5_clip_and_vae_for_each_use(monkeypatch, i2v_folder, tmp_path):
    pipe = Pipeline.load(i2v_folder, {**TINY, "cpu_offload": True}, task="i2v", device="cpu")
    assert pipe.dit.block_offload is not None  # the DiT's blocks stream (their own tests: test_offload.py)
    moves = _record_moves(monkeypatch)
    img = Image.fromarray((np.random.default_rng(0).random((40, 60, 3)) * 255).astype(np.uint8))
    pipe.generate("a cat", image=img, seed=1)
    names = [n for n, _ in moves if not n.endswith("Block")]
    assert names == ["T5Encoder", "T5Encoder", "CLIPVisionTower", "CLIPVisionTower", "WanVAE", "WanVAE",
                     "WanVAE", "WanVAE"]  # text, image, VAE encode, VAE decode: each there and back
    # the encoders' blocks stream: each moves in for its forward and out after it, one at a time
    t5_moves = moves[1:1 + 2 * len(pipe.t5.blocks)]
    assert t5_moves == [("T5Block", "cpu")] * (2 * len(pipe.t5.blocks))


@pytest.mark.usefixtures("torch_ops")
def test_encoder_blocks_stream_one_at_a_time(monkeypatch):
    """offloaded(): the module's non-block weights move once, each block in before its forward and out
    after it (at most one block on the device), the output unchanged, hooks removed afterwards."""
    from lightx2v_engine import t5 as t5_mod
    model = t5_mod.random_t5(t5_mod.T5Config.tiny(), dtype=torch.float32, seed=0)
    ids = torch.randint(0, 100, (1, 7))
    want = model(ids)
    where = {}
    log = []

    def fake_move(m, d):  # records where each module would be (the weights stay on the CPU)
        log.append((type(m).__name__, d.type))
        where[id(m)] = d.type
        if type(m).__name__ == "T5Encoder":  # the rest: embedding and final norm
            assert "blocks" not in m._modules or d.type == "cpu"
    monkeypatch.setattr(pipeline_mod, "_to_device", fake_move)
    on_device = []

    def count(m, a):  # registered after offloaded()'s own pre-hook, so it runs after the block moved in
        on_device.append((where.get(id(m)), sum(where.get(id(x)) == "cuda" for x in model.blocks)))
    with pipeline_mod.offloaded(model, torch.device("cuda"), True):
        extra = [b.register_forward_pre_hook(count) for b in model.blocks]
        got = model(ids)
    for h in extra:
        h.remove()
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert on_device == [("cuda", 1)] * len(model.blocks)  # each block in place when it runs, alone
    assert log[0] == ("T5Encoder", "cuda") and log[-1] == ("T5Encoder", "cpu")
    assert log[1:-1] == [("T5Block", "cuda"), ("T5Block", "cpu")] * len(model.blocks)
    assert all(not b._forward_pre_hooks and not b._forward_hooks for b in model.blocks)  # hooks removed


@pytest.mark.gpu
@pytest.mark.usefixtures("torch_ops")
def test_vae_offload_on_cuda_keeps_weights_on_the_cpu_between_uses(monkeypatch):
    pipe = Pipeline.random("tiny", {**TINY, "vae_cpu_offload": True, "t5_cpu_offload": True}, device="cuda")
    assert pipe.vae.device.type == "cpu" and next(pipe.t5.parameters()).device.type == "cpu"
    assert pipe.dit.patch_embedding.weight.device.type == "cuda"
    during = []
    real_decode = type(pipe.vae).decode
    monkeypatch.setattr(type(pipe.vae), "decode",
                        lambda self, z, **kw: (during.append(self.device.type), real_decode(self, z, **kw))[1])
    out = pipe.generate("a cat", seed=1)
    assert during == ["cuda"] and pipe.vae.device.type == "cpu"
    assert next(pipe.t5.parameters()).device.type == "cpu"
    ref = Pipeline.random("tiny", TINY, device="cuda")
    ref.vae.load_state_dict(pipe.vae.state_dict())
    assert (ref.decode(out.latents).float() - out.frames.float()).abs().max() <= 1


# ------------------------------------------------------------------------------------- 2. quantized encoders

@pytest.mark.parametrize("enc", ["t5", "clip"])
def test_quantized_encoder_keys(enc):
    cfg = quiet_parse({f"{enc}_quantized": True, f"{enc}_quant_scheme": "fp8-q8f", f"{enc}_quantized_ckpt": "q/fp8.pth"})
    assert (getattr(cfg, f"{enc}_quantized"), getattr(cfg, f"{enc}_quant_scheme"),
            getattr(cfg, f"{enc}_quantized_ckpt")) == (True, "fp8-q8f", "q/fp8.pth")
    assert not cfg.ignored_keys  # acted on, no warning
    with pytest.raises(ValueError, match=f"{enc}_quant_scheme.*required when {enc}_quantized"):
        quiet_parse({f"{enc}_quantized": True})
    with pytest.raises(ValueError, match=f"{enc}_quant_scheme.*'fp4'.*unsupported"):
        quiet_parse({f"{enc}_quantized": True, f"{enc}_quant_scheme": "fp4"})


def _int8_t5(t2v_folder, tmp_path):
    """(a copy of the tiny model folder, its umT5 state dict with the block linears quantized to int8 as
    LightX2V's files hold them)."""
    from lightx2v_engine.quant import quantize_weight
    from lightx2v_engine.t5 import QUANT_LINEARS
    folder = tmp_path / "model"
    shutil.copytree(t2v_folder, folder)
    sd = torch.load(folder / T5_FILE)
    for k in list(sd):
        if any(k.endswith(f".{n}.weight") for n in QUANT_LINEARS):
            sd[k], sd[k + "_scale"] = quantize_weight(sd[k].float(), "int8")
    return folder, sd


@pytest.mark.usefixtures("torch_ops")
def test_t5_quantized_file_runs_and_bf16_fallback(t2v_folder, tmp_path):
    """t5_quantized picks models_t5_umt5-xxl-enc-{fp8,int8}.pth (also in a folder named after the scheme,
    LightX2V's older layout) and runs it as 8-bit linears; where only the bf16 file is there, it runs with
    a warning; an explicit t5_quantized_ckpt that is missing is an error naming it."""
    from lightx2v_engine.quant import QuantLinear
    folder, sd = _int8_t5(t2v_folder, tmp_path)
    (folder / "int8").mkdir()
    torch.save(sd, folder / "int8" / "models_t5_umt5-xxl-enc-int8.pth")
    cfg = {**TINY, "t5_quantized": True, "t5_quant_scheme": "int8-q8f"}
    pipe = Pipeline.load(folder, cfg, device="cpu")
    assert isinstance(pipe.t5.blocks[0].attn.q, QuantLinear)
    out = pipe.generate("a cat", seed=1)
    base = Pipeline.load(folder, TINY, device="cpu")
    assert not isinstance(base.t5.blocks[0].attn.q, QuantLinear)
    assert out.latents.shape == base.generate("a cat", seed=1).latents.shape
    (folder / "int8" / "models_t5_umt5-xxl-enc-int8.pth").rename(folder / "distill_int8.pth")
    (folder / "distill_int8").mkdir()
    (folder / "distill_int8.pth").rename(folder / "distill_int8" / "models_t5_umt5-xxl-enc-int8.pth")
    assert isinstance(Pipeline.load(folder, cfg, device="cpu").t5.blocks[0].attn.q, QuantLinear)  # distill_int8/
    (folder / "distill_int8" / "models_t5_umt5-xxl-enc-int8.pth").unlink()
    with pytest.warns(UserWarning, match="t5_quantized: models_t5_umt5-xxl-enc-int8.pth not found.*unquantized"):
        pipe = Pipeline.load(folder, cfg, device="cpu")
    assert not isinstance(pipe.t5.blocks[0].attn.q, QuantLinear)
    with pytest.raises(FileNotFoundError, match="'t5_quantized_ckpt' = 'nope.pth'"):
        Pipeline.load(folder, {**cfg, "t5_quantized_ckpt": "nope.pth"}, device="cpu")


@pytest.mark.usefixtures("torch_ops")
def test_quantized_encoder_file_must_match_its_scheme(t2v_folder, tmp_path, monkeypatch):
    """An int8 umT5 file named by t5_quantized_ckpt under t5_quant_scheme fp8 ran as int8 without a word (the
    DiT's loader refuses such a file); and an fp8 encoder file on a GPU before sm89 failed at the first
    prompt's encoding. Both are errors naming the file, raised when the encoder loads."""
    from lightx2v_engine import pipeline as P
    from lightx2v_engine.quant import quantize_weight
    from lightx2v_engine.t5 import load_t5
    folder, sd = _int8_t5(t2v_folder, tmp_path)
    torch.save(sd, folder / "t5-int8.pth")
    cfg = {**TINY, "t5_quantized": True, "t5_quant_scheme": "fp8-q8f", "t5_quantized_ckpt": "t5-int8.pth"}
    with pytest.raises(ValueError, match=r"t5-int8.pth: its 8-bit linears are int8, but t5_quant_scheme is "
                                         r"'fp8-q8f' \(fp8\); set t5_quant_scheme"):
        Pipeline.load(folder, cfg, device="cpu")
    Pipeline.load(folder, {**cfg, "t5_quant_scheme": "int8-q8f"}, device="cpu")  # the file's scheme: runs
    # an fp8 file on an A100 (capability stood in for; the check needs no CUDA tensor)
    for k in list(sd):
        if k.endswith("_scale"):
            w = sd[k[:-len("_scale")]]
            sd[k[:-len("_scale")]], sd[k] = quantize_weight(w.float() * sd[k].float().reshape(-1, 1), "fp8")
    torch.save(sd, folder / "t5-fp8.pth")
    model = load_t5(str(folder / "t5-fp8.pth"))
    run = quiet_parse({"t5_quantized": True, "t5_quant_scheme": "fp8-q8f"})
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(ValueError, match=r"t5-fp8.pth: its linears are fp8.*8.9 or newer; cuda:0 is NVIDIA A100"):
        P._check_encoder_linears(model, run, "t5", folder / "t5-fp8.pth", torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert P._check_encoder_linears(model, run, "t5", folder / "t5-fp8.pth", torch.device("cuda", 0)) is model


def test_light_autoencoder_keys_are_honoured():
    """use_lightvae/use_tae/tae_path/need_scaled are read (tests/test_tae.py runs them), not warned about."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "accepted and ignored" warning
        cfg = parse_run_config({"use_lightvae": True, "vae_path": "lightx2v/Autoencoders/lightvaew2_1.pth",
                                "use_tae": True, "tae_path": "lighttaew2_1.pth", "need_scaled": True})
    assert (cfg.use_lightvae, cfg.use_tae, cfg.need_scaled) == (True, True, True)
    assert (cfg.vae_path, cfg.tae_path) == ("lightx2v/Autoencoders/lightvaew2_1.pth", "lighttaew2_1.pth")
    assert quiet_parse({}).need_scaled is None
    with pytest.raises(ValueError, match="'need_scaled' = 'yes': expected true/false"):
        quiet_parse({"need_scaled": "yes"})


@pytest.mark.usefixtures("torch_ops")
def test_missing_bf16_t5_next_to_a_quantized_one_says_so(t2v_folder, tmp_path, capsys):
    folder = tmp_path / "model"
    shutil.copytree(t2v_folder, folder)
    (folder / T5_FILE).rename(folder / "models_t5_umt5-xxl-enc-fp8.pth")
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps(TINY))
    rc = main(["--model_path", str(folder), "--config_json", str(cfg), "--prompt", "a cat", "--quiet",
               "--save_result_path", str(tmp_path / "o.mp4")])
    err = capsys.readouterr().err
    assert rc == 2
    assert T5_FILE in err and "models_t5_umt5-xxl-enc-fp8.pth" in err and "set t5_quantized true" in err


# ----------------------------------------------------------------------------------------------- 3. CLI flags

def test_cli_accepts_lightx2v_flags():
    args = build_parser().parse_args(["--warmup", "--return_result_tensor", "--prompt", "x"])
    assert args.warmup and args.return_result_tensor
    help_text = build_parser().format_help()
    assert "--warmup" in help_text and "--return_result_tensor" in help_text and "--use_prompt_enhancer" in help_text


def test_cli_warmup_and_return_result_tensor_run(tmp_path):
    rc = main(["--random-weights", "--preset", "tiny", "--prompt", "a red car", "--quiet", "--warmup",
               "--return_result_tensor", "--save_result_path", str(tmp_path / "r.mp4")])
    assert rc == 0 and (tmp_path / "r.mp4").is_file()


def test_cli_prompt_enhancer_is_not_supported(tmp_path, capsys):
    rc = main(["--random-weights", "--preset", "tiny", "--prompt", "a red car", "--quiet", "--use_prompt_enhancer",
               "--save_result_path", str(tmp_path / "r.mp4")])
    err = capsys.readouterr().err
    assert rc == 2 and "error: --use_prompt_enhancer is not supported" in err
    assert "unrecognized" not in err and not (tmp_path / "r.mp4").exists()


# ------------------------------------------------------------------------------------------ 4. config keys

@pytest.mark.parametrize("key,value", [("load_from_rank0", True),
                                       ("lora_merge_force_fp32", False), ("coefficients", [[1.0, 2.0]]),
                                       ("max_area", True), ("do_mm_calib", False), ("use_bfloat16", True),
                                       ("warmup", False)])
def test_lightx2v_keys_accepted_with_warning(key, value):
    with pytest.warns(UserWarning, match=f"accepted but not acted on.*{key}") as rec:
        cfg = parse_run_config({key: value})
    assert cfg.ignored_keys == (key,)
    if key == "lora_merge_force_fp32":
        assert "LoRA merges always run in fp32" in str(rec[0].message)


@pytest.mark.parametrize("raw", [{"use_31_block": True}, {"use_31_block": None}, {"resize_mode": None},
                                 {"use_image_encoder": True}, {"dummy_model": False}])
def test_lightx2v_keys_at_what_runs_are_silent(raw, recwarn):
    """use_31_block true (LightX2V's default) and resize_mode null are what this engine runs: no warning."""
    assert parse_run_config(raw).ignored_keys == ()
    assert not [w for w in recwarn if "accepted but not acted on" in str(w.message)]


@pytest.mark.parametrize("raw,match", [({"use_31_block": False}, "'use_31_block' = False: .*32 blocks.* not supported"),
                                       ({"resize_mode": "adaptive"}, "'resize_mode' = 'adaptive': .*area rule"),
                                       ({"resize_mode": 0}, "'resize_mode' = 0")])
def test_lightx2v_keys_asking_for_something_else_are_errors(raw, match):
    """LightX2V runs all 32 CLIP blocks under use_31_block false and bucket resizes under a resize_mode:
    another video than this engine's, so an error instead of a warning."""
    with pytest.raises(ValueError, match=match):
        parse_run_config(raw)


@pytest.mark.parametrize("alias,field", [("use_tiny_vae", "use_tae"), ("tiny_vae", "use_tae")])
def test_older_tiny_vae_keys_spell_use_tae(alias, field):
    """Older LightX2V runners read use_tiny_vae / tiny_vae_path (the gradio app tiny_vae); they were 'unknown
    key, did you mean use_tiling_vae?' - a hint that turns on tiled decoding instead of the tiny decoder."""
    cfg = parse_run_config({alias: True, "tiny_vae_path": "/w/taew2_1.pth"})
    assert cfg.use_tae is True and cfg.tae_path == "/w/taew2_1.pth" and not cfg.use_tiling_vae
    with pytest.raises(ValueError, match=f"'{alias}' = False: disagrees with use_tae = True"):
        parse_run_config({alias: False, "use_tae": True})


def _record_prompts(monkeypatch, pipe):
    seen = []
    real = pipe.encode_text
    monkeypatch.setattr(pipe, "encode_text", lambda prompts: (seen.append(list(prompts)), real(prompts))[1])
    return seen


@pytest.mark.usefixtures("torch_ops")
def test_sample_neg_prompt_is_the_default_negative_prompt(monkeypatch):
    cfg = {**TINY, "enable_cfg": True}
    pipe = Pipeline.random("tiny", {**cfg, "sample_neg_prompt": "blurry, static"}, device="cpu")
    seen = _record_prompts(monkeypatch, pipe)
    pipe.generate("a cat", seed=1)
    pipe.generate("a cat", negative_prompt="ugly", seed=1)
    assert seen == [["a cat", "blurry, static"], ["a cat", "ugly"]]
    plain = Pipeline.random("tiny", cfg, device="cpu")  # without the key: none, as LightX2V's Wan runner
    seen = _record_prompts(monkeypatch, plain)
    plain.generate("a cat", seed=1)
    plain.generate("a cat", negative_prompt=WAN_NEGATIVE_PROMPT, seed=1)
    assert seen == [["a cat", ""], ["a cat", WAN_NEGATIVE_PROMPT]]
    empty = Pipeline.random("tiny", {**cfg, "sample_neg_prompt": ""}, device="cpu")  # an empty negative prompt
    seen = _record_prompts(monkeypatch, empty)
    empty.generate("a cat", seed=1)
    assert seen == [["a cat", ""]]


@pytest.mark.usefixtures("torch_ops")
def test_path_overrides(i2v_folder, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(i2v_folder, folder)
    (folder / "enc").mkdir()
    (folder / T5_FILE).rename(folder / "enc" / "t5.pth")
    (folder / CLIP_FILE).rename(tmp_path / "clip.pth")          # absolute path outside the folder
    (folder / VAE_FILE).rename(folder / "my_vae.pth")
    keys = {**TINY, "t5_original_ckpt": "enc/t5.pth", "clip_original_ckpt": str(tmp_path / "clip.pth"),
            "vae_path": "my_vae.pth"}
    pipe = Pipeline.load(folder, keys, task="i2v", device="cpu")
    ref = Pipeline.load(i2v_folder, TINY, task="i2v", device="cpu")
    for a, b in ((pipe.t5, ref.t5), (pipe.clip, ref.clip), (pipe.vae, ref.vae)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    for key, value in (("t5_original_ckpt", "nope.pth"), ("clip_original_ckpt", "/no/clip.pth"),
                       ("vae_path", "enc")):
        with pytest.raises(FileNotFoundError, match=rf"config key '{key}' = '{value}': file not found"):
            Pipeline.load(folder, {**keys, key: value}, task="i2v", device="cpu")


# ---------------------------------------------------------------------------------------------- 5. dynamic CFG

def test_dynamic_cfg_is_rejected_but_false_is_accepted():
    with pytest.raises(ValueError, match="'enable_dynamic_cfg' = True: dynamic CFG adds a guidance embedding"):
        parse_run_config({"enable_dynamic_cfg": True, "cfg_scale": 4.0})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        parse_run_config({"enable_dynamic_cfg": False})
    with pytest.raises(ValueError, match="expected true/false"):
        parse_run_config({"enable_dynamic_cfg": "yes"})


# --------------------------------------------------------------------------------- 6. warnings point at us

def test_config_warnings_point_at_the_caller(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"offload_granularity": "phase", "self_attn_1_type": "radial_attn",
                                "cpu_offload": True, "offload_ratio": 0.8}))
    for call in (lambda: load_run_config(path), lambda: parse_run_config(json.loads(path.read_text())),
                 lambda: Pipeline.random("tiny", json.loads(path.read_text()), device="cpu", with_encoders=False)):
        with pytest.warns(UserWarning) as rec:
            call()
        assert len(rec) == 3
        assert {r.filename for r in rec} == {__file__}, [r.filename for r in rec]


# ----------------------------------------------------------------------------------------- 7. package export

def test_pipeline_exported_lazily():
    import lightx2v_engine
    assert lightx2v_engine.Pipeline is Pipeline
    code = ("import sys, lightx2v_engine; assert 'torch' not in sys.modules, 'import pulled torch'; "
            "from lightx2v_engine import Pipeline; assert Pipeline.__module__ == 'lightx2v_engine.pipeline'")
    subprocess.run([sys.executable, "-c", code], check=True)
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        lightx2v_engine.Nope


def test_offload_cleans_up_after_a_failed_move(monkeypatch):
    """Out of memory while moving the encoder's non-block weights: no hook is left on the blocks and the
    module ends on the CPU (the error propagates)."""
    from lightx2v_engine import t5 as t5_mod
    model = t5_mod.random_t5(t5_mod.T5Config.tiny(), dtype=torch.float32, seed=0)
    moves = []

    def failing_move(m, d):
        moves.append(d.type)
        if d.type == "cuda":
            raise torch.cuda.OutOfMemoryError("no room")
    monkeypatch.setattr(pipeline_mod, "_to_device", failing_move)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        with pipeline_mod.offloaded(model, torch.device("cuda"), True):
            pass
    assert moves == ["cuda", "cpu"] and "blocks" in model._modules
    assert all(not b._forward_pre_hooks and not b._forward_hooks for b in model.blocks)


def test_offload_moves_back_without_copying(monkeypatch):
    """Back on the CPU, an offloaded module gets its own CPU tensors again (same storage, same values): no
    device-to-host copy. Checked with the meta device, where a copy back would have no values at all."""
    from lightx2v_engine import t5 as t5_mod, vae as vae_mod
    for model in (t5_mod.random_t5(t5_mod.T5Config.tiny(), dtype=torch.float32, seed=0),
                  vae_mod.random_vae(vae_mod.VAEConfig.tiny(), seed=0)):
        state = {k: (v.data_ptr(), v.clone()) for k, v in model.state_dict().items()}
        params = {k: p for k, p in model.named_parameters()}
        with pipeline_mod.offloaded(model, torch.device("meta"), True):
            moved = [k for k, v in model.state_dict().items() if v.is_meta]
            assert moved and ("token_embedding.weight" in moved or not hasattr(model, "blocks"))
        for k, v in model.state_dict().items():
            assert v.device.type == "cpu" and v.data_ptr() == state[k][0], k
            assert torch.equal(v, state[k][1]), k
        assert all(p is params[k] for k, p in model.named_parameters())  # the same Parameter objects


@pytest.mark.usefixtures("torch_ops")
def test_clip_quantized_file_runs(i2v_folder, tmp_path):
    """clip_quantized picks LightX2V's models_clip_open-clip-xlm-roberta-large-vit-huge-14-{fp8,int8}.pth
    (or the older clip-{fp8,int8}.pth) and runs its 8-bit linears; the fp16 file runs with a warning where
    neither is there."""
    from lightx2v_engine.clip import QUANT_LINEARS
    from lightx2v_engine.quant import QuantLinear, quantize_weight
    folder = tmp_path / "model"
    shutil.copytree(i2v_folder, folder)
    sd = torch.load(folder / CLIP_FILE)
    for k in list(sd):
        if k.startswith("visual.transformer.") and any(k.endswith(f".{n}.weight") for n in QUANT_LINEARS):
            sd[k], sd[k + "_scale"] = quantize_weight(sd[k].float(), "fp8")
    img = Image.fromarray((np.random.default_rng(0).random((40, 60, 3)) * 255).astype(np.uint8))
    cfg = {**TINY, "clip_quantized": True, "clip_quant_scheme": "fp8-sgl"}
    for name in ("models_clip_open-clip-xlm-roberta-large-vit-huge-14-fp8.pth", "clip-fp8.pth"):
        torch.save(sd, folder / name)
        pipe = Pipeline.load(folder, cfg, task="i2v", device="cpu")
        assert isinstance(pipe.clip.transformer[0].attn.to_qkv, QuantLinear), name
        assert pipe.generate("a cat", image=img, seed=1).frames.shape[0] == 5
        (folder / name).unlink()
    with pytest.warns(UserWarning, match="clip_quantized: .*not found.*unquantized"):
        pipe = Pipeline.load(folder, cfg, task="i2v", device="cpu")
    assert not isinstance(pipe.clip.transformer[0].attn.to_qkv, QuantLinear)


def test_cli_model_cls_required_for_a_base_config_and_save_video_path(tmp_path, capsys):
    """A base model's config (infer_steps, CFG, no step list) without --model_cls is an error (it ran as a
    50-step distill sampler; LightX2V requires the flag); a distill or size-only config defaults to distill;
    older LightX2V's --save_video_path names the output."""
    from lightx2v_engine.infer import run_config_from_args
    base = tmp_path / "wan_t2v.json"
    base.write_text(json.dumps({"infer_steps": 50, "enable_cfg": True, "sample_guide_scale": 6, "sample_shift": 8}))
    args = build_parser().parse_args(["--random-weights", "--prompt", "x", "--config_json", str(base)])
    with pytest.raises(ValueError, match="--model_cls is required with .*wan_t2v.json"):
        run_config_from_args(args)
    args = build_parser().parse_args(["--random-weights", "--prompt", "x", "--config_json", str(base),
                                      "--model_cls", "wan2.1"])
    assert run_config_from_args(args).sampler == "unipc"
    sizes = tmp_path / "sizes.json"
    sizes.write_text(json.dumps(TINY))
    args = build_parser().parse_args(["--random-weights", "--prompt", "x", "--config_json", str(sizes)])
    assert run_config_from_args(args).sampler == "distill" and args.model_cls == "wan2.1_distill"
    rc = main(["--random-weights", "--preset", "tiny", "--prompt", "a red car", "--quiet",
               "--save_video_path", str(tmp_path / "old.mp4")])
    assert rc == 0 and (tmp_path / "old.mp4").is_file()


@pytest.mark.parametrize("flags,expected", [
    (["--num_frames", "10"], "--num_frames 10: frame count must be 4k+1"),
    (["--target_shape", "65", "96"], "--target_shape height 65: must be a positive multiple of 16"),
    (["--size", "64", "97"], "--size width 97: must be a positive multiple of 16"),
])
def test_cli_size_errors_name_the_flag(tmp_path, capsys, flags, expected):
    """A bad value given with a flag is reported under that flag (it named the config key the flag sets), before
    any model is built."""
    rc = main(["--random-weights", "--preset", "tiny", "--prompt", "a red car", "--quiet",
               "--save_result_path", str(tmp_path / "o.mp4"), *flags])
    err = capsys.readouterr().err
    assert rc == 2 and f"error: {expected}" in err, err


def test_cli_i2v_runs_without_a_prompt(tmp_path, capsys):
    """LightX2V's --prompt defaults to "": an I2V run from the image alone works; T2V still needs a prompt."""
    from PIL import Image
    Image.new("RGB", (48, 32), (200, 30, 30)).save(tmp_path / "red.png")
    rc = main(["--random-weights", "--preset", "tiny-i2v", "--task", "i2v", "--image_path", str(tmp_path / "red.png"),
               "--quiet", "--num_frames", "5", "--save_result_path", str(tmp_path / "o.mp4")])
    assert rc == 0 and (tmp_path / "o.mp4").is_file(), capsys.readouterr().err
    rc = main(["--random-weights", "--preset", "tiny", "--quiet", "--save_result_path", str(tmp_path / "t.mp4")])
    assert rc == 2 and "--prompt is required for --task t2v" in capsys.readouterr().err


def test_use_image_encoder_false_is_refused_for_i2v_only():
    """LightX2V's use_image_encoder false drops an I2V model's image branch (CLIP, image cross-attention): another
    video, so an I2V pipeline refuses it; a T2V pipeline has no such branch (Wan2.2-style configs set it)."""
    from lightx2v_engine.pipeline import Pipeline
    size = {"target_video_length": 5, "target_height": 32, "target_width": 48, "use_image_encoder": False}
    with pytest.raises(ValueError, match="'use_image_encoder' = False: .*CLIP image branch"):
        Pipeline.random("tiny-i2v", size, device="cpu")
    assert Pipeline.random("tiny", size, device="cpu").run_cfg.use_image_encoder is False
    with pytest.raises(ValueError, match="'dummy_model' = True: .*--random-weights"):
        parse_run_config({"dummy_model": True})


def test_encoder_quantized_ckpt_without_the_flag_warns():
    with pytest.warns(UserWarning, match="clip_quantized_ckpt set but clip_quantized is not true: the unquantized CLIP"):
        parse_run_config({"clip_quantized_ckpt": "clip-int8.pth"})


def test_files_in_lightx2v_subfolders_are_found(tmp_path):
    """LightX2V's find_torch_model_path also looks in fp8/, int8/, distill_fp8/, distill_int8/ (selective
    downloads keep a component there): the VAE and the encoders are found there too."""
    from lightx2v_engine.pipeline import find_file
    for sub in ("fp8", "int8", "distill_fp8", "distill_int8"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / f"{sub}.pth").write_bytes(b"x")
        assert find_file(f"{sub}.pth", tmp_path) == tmp_path / sub / f"{sub}.pth"
    (tmp_path / "Wan2.1_VAE.pth").write_bytes(b"x")  # the folder itself first
    (tmp_path / "fp8" / "Wan2.1_VAE.pth").write_bytes(b"x")
    assert find_file("Wan2.1_VAE.pth", tmp_path) == tmp_path / "Wan2.1_VAE.pth"
