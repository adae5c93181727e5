"""LightX2V's Python API (lightx2v_engine.lightx2v_api.LightX2VPipeline) on a tiny model folder: the same
video as the engine's own Pipeline with the same keys; LightX2V's call order and unsupported options give
clear errors."""
import pytest
import torch

from lightx2v_engine.lightx2v_api import LightX2VPipeline
from lightx2v_engine.pipeline import Pipeline
from lightx2v_engine.tiny import make_tiny_model_folder
from lightx2v_engine.video import read_mp4

pytestmark = pytest.mark.usefixtures("torch_ops")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tiny_model_folder(tmp_path_factory.mktemp("tiny_api"), "t2v")


def test_same_video_as_the_engine_pipeline(folder, tmp_path):
    pipe = LightX2VPipeline(task="t2v", model_path=str(folder), model_cls="wan2.1_distill", device="cpu")
    pipe.create_generator(attn_mode="sage_attn2", infer_steps=50, num_frames=9, height=64, width=96,
                          guidance_scale=1.0, sample_shift=5.0, fps=16)
    assert pipe.pipeline.run_cfg.infer_steps == 4 and pipe.pipeline.run_cfg.enable_cfg is False
    assert pipe.pipeline.run_cfg.attn_8bit  # sage_attn2 -> the 8-bit kernel where it runs
    # return_result_tensor: LightX2V's {"video": float [T, H, W, 3] in [0, 1]}, and no file written
    res = pipe.generate(seed=7, prompt="a red car", negative_prompt="", save_result_path=str(tmp_path / "a.mp4"),
                        return_result_tensor=True)
    assert list(res) == ["video"] and res["video"].dtype == torch.float32 and not (tmp_path / "a.mp4").exists()
    ref = Pipeline.load(folder, {"target_video_length": 9, "target_height": 64, "target_width": 96,
                                 "self_attn_1_type": "sage_attn2"}, device="cpu")
    torch.testing.assert_close(res["video"], ref.generate("a red car", seed=7).frames.float() / 255, rtol=0, atol=0)
    assert pipe.generate(seed=7, prompt="a red car", negative_prompt="", save_result_path=str(tmp_path / "b.mp4"),
                         target_shape=[32, 48], image_path="") == {"video": None}  # ("" is no image)
    assert read_mp4(tmp_path / "b.mp4").shape == (9, 32, 48, 3)


def test_config_json_is_applied_after_enable_calls(folder, tmp_path, monkeypatch):
    """As in LightX2V, create_generator applies a config_json after the enable_* calls: its keys win (also
    over enable_*'s default arguments), and a parallel section merges key by key (the JSON's fp8 flag and
    sizes, enable_parallel's attention type where the JSON has none)."""
    import json
    import lightx2v_engine.config as config_mod
    seen = []

    def fake_parse(config, **kw):
        seen.append(config)
        raise RuntimeError("stop")
    monkeypatch.setattr(config_mod, "parse_run_config", fake_parse)
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"parallel": {"seq_p_size": 4, "seq_p_fp8_comm": True, "cfg_p_size": 2},
                               "cpu_offload": True, "dit_quantized": True, "dit_quant_scheme": "fp8-q8f"}))
    pipe = LightX2VPipeline(task="t2v", model_path=str(folder), model_cls="wan2.1_distill", device="cpu")
    pipe.enable_parallel(seq_p_size=2, seq_p_attn_type="ring")
    pipe.enable_offload(text_encoder_offload=True)  # (cpu_offload False by default)
    pipe.enable_quantize(text_encoder_quantized=True, text_encoder_quant_scheme="fp8-q8f")
    with pytest.raises(RuntimeError, match="stop"):
        pipe.create_generator(config_json=str(cfg))
    assert seen[0]["parallel"] == {"seq_p_size": 4, "seq_p_fp8_comm": True, "cfg_p_size": 2,
                                   "seq_p_attn_type": "ring"}
    assert seen[0]["cpu_offload"] is True and seen[0]["dit_quantized"] is True
    assert seen[0]["t5_quantized"] is True and seen[0]["t5_cpu_offload"] is True


@pytest.mark.parametrize("model_cls", ["wan2.2_moe_distill", "Wan2.1", "wan2.1_mean_flow_distill"])
def test_unsupported_model_classes_are_errors(folder, model_cls):
    with pytest.raises(ValueError, match=rf"model_cls '{model_cls}' is not supported .*'wan2.1', 'wan2.1_distill'"):
        LightX2VPipeline(task="t2v", model_path=str(folder), model_cls=model_cls)
    from lightx2v_engine.pipeline import Pipeline
    with pytest.raises(ValueError, match=rf"model_cls '{model_cls}' is not supported"):
        Pipeline.load(str(folder), {}, model_cls=model_cls, device="cpu")


def test_call_order_and_unsupported_options(folder, tmp_path):
    with pytest.raises(ValueError, match="low_noise_original_ckpt .*not supported"):
        LightX2VPipeline(task="i2v", model_path=str(folder), model_cls="wan2.2_moe", low_noise_original_ckpt="x")
    with pytest.raises(ValueError, match="task 'flf2v' is not supported"):
        LightX2VPipeline(task="flf2v", model_path=str(folder), model_cls="wan2.1")
    pipe = LightX2VPipeline(task="t2v", model_path=str(folder), model_cls="wan2.1_distill", device="cpu")
    par = LightX2VPipeline(task="t2v", model_path=str(folder), model_cls="wan2.1_distill", device="cpu")
    par.enable_parallel(seq_p_size=4, cfg_p_size=2, seq_p_quant_scheme="fp8")  # world 8: checked at create_generator
    assert par.config["parallel"] == {"cfg_p_size": 2, "seq_p_size": 4, "seq_p_attn_type": "ulysses",
                                      "seq_p_quant_scheme": "fp8"}
    with pytest.raises(ValueError, match="world size is 1"):
        par.create_generator(num_frames=9, height=64, width=96, guidance_scale=1.0)
    with pytest.raises(RuntimeError, match="create_generator first"):
        pipe.generate(seed=1, prompt="x", negative_prompt="", save_result_path=str(tmp_path / "x.mp4"))
    pipe.enable_lora([{"path": "missing_lora.safetensors", "strength": 1.0}])
    with pytest.raises(FileNotFoundError, match="missing_lora.safetensors"):
        pipe.create_generator(num_frames=9, height=64, width=96, guidance_scale=1.0)
    bad = tmp_path / "bad.json"
    bad.write_text("{'infer_steps': 4}")
    for path, err, match in ((bad, ValueError, "bad.json: not valid JSON"),
                             (tmp_path / "none.json", FileNotFoundError, "config_json not found: .*none.json")):
        with pytest.raises(err, match=match):
            LightX2VPipeline(task="t2v", model_path=str(folder), model_cls="wan2.1_distill",
                             device="cpu").create_generator(config_json=str(path))
    pipe = LightX2VPipeline(task="t2v", model_path=str(folder), model_cls="wan2.1_distill", device="cpu")
    pipe.create_generator(num_frames=5, height=32, width=48, guidance_scale=1.0)
    with pytest.raises(RuntimeError, match="before create_generator"):
        pipe.enable_quantize(dit_quantized=True)
    (tmp_path / "f").write_bytes(b"x")
    with pytest.raises(ValueError, match="save_result_path .*f is a file, not a folder"):
        pipe.generate(seed=1, prompt="x", negative_prompt="", save_result_path=str(tmp_path / "f" / "x.mp4"))
    for shape in ([48], "48x64", [1, 2, 3], 480):
        with pytest.raises(ValueError, match="target_shape must be \\[height, width\\]"):
            pipe.generate(seed=1, prompt="x", negative_prompt="", target_shape=shape)
    with pytest.raises(ValueError, match="audio_path .*not supported"):
        pipe.generate(seed=1, prompt="x", negative_prompt="", save_result_path=str(tmp_path / "x.mp4"), audio_path="a.wav")


def test_keyword_construction_and_empty_negative_prompt(folder, tmp_path):
    """LightX2VPipeline(model_path=..., model_cls=..., task=...) as lightx2v.md writes it; under CFG an empty
    negative prompt is used as given (LightX2V; also the engine's default), Wan's own only when passed."""
    from lightx2v_engine.pipeline import WAN_NEGATIVE_PROMPT
    pipe = LightX2VPipeline(model_path=str(folder), model_cls="wan2.1_distill", device="cpu")  # task t2v
    pipe.create_generator(num_frames=5, height=32, width=48, guidance_scale=5.0)
    assert pipe.pipeline.run_cfg.enable_cfg
    empty = pipe.generate(seed=2, prompt="x", negative_prompt="", return_result_tensor=True)["video"]
    default = pipe.pipeline.generate("x", seed=2, negative_prompt=None).frames.float() / 255
    wan = pipe.generate(seed=2, prompt="x", negative_prompt=WAN_NEGATIVE_PROMPT, return_result_tensor=True)["video"]
    assert torch.equal(default, empty) and not torch.equal(empty, wan)
    with pytest.raises(ValueError, match="resize_mode"):
        LightX2VPipeline(model_path=str(folder), device="cpu").create_generator(resize_mode="adaptive")


def test_switch_lora_with_dynamic_apply(folder, tmp_path):
    """enable_lora(..., lora_dynamic_apply=True) then switch_lora, as LightX2V: each state gives the video of
    the engine with that LoRA in its config; "" gives the base video; without dynamic apply: an error."""
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(0)
    paths = []
    for i, target in enumerate(("blocks.0.self_attn.q", "blocks.1.ffn.2")):
        o, k = (256, 256) if "self_attn" in target else (256, 512)
        lora = {f"diffusion_model.{target}.lora_up.weight": torch.randn(o, 4, generator=g) * 0.3,
                f"diffusion_model.{target}.lora_down.weight": torch.randn(4, k, generator=g) * 0.3}
        paths.append(tmp_path / f"l{i}.safetensors")
        save_file(lora, str(paths[-1]))
    size = {"target_video_length": 5, "target_height": 32, "target_width": 48}

    def ref(loras):
        return Pipeline.load(folder, {**size, "lora_configs": loras}, device="cpu").generate("a cat", seed=3).latents

    pipe = LightX2VPipeline(task="t2v", model_path=str(folder), device="cpu")
    pipe.enable_lora([{"path": str(paths[0]), "strength": 1.0}], lora_dynamic_apply=True)
    pipe.create_generator(num_frames=5, height=32, width=48, guidance_scale=1.0)

    def run():
        return pipe.pipeline.generate("a cat", seed=3).latents
    torch.testing.assert_close(run(), ref([{"path": str(paths[0]), "strength": 1.0}]), rtol=0, atol=0)
    pipe.switch_lora(str(paths[1]), 0.5)  # replaces the first one
    torch.testing.assert_close(run(), ref([{"path": str(paths[1]), "strength": 0.5}]), rtol=0, atol=0)
    pipe.switch_lora("")
    torch.testing.assert_close(run(), ref([]), rtol=0, atol=0)
    with pytest.raises(ValueError, match="lora strength.*expected a finite number"):
        pipe.switch_lora(str(paths[1]), True)
    # a relative path found nowhere names both places it was looked for (the model folder was left out)
    with pytest.raises(FileNotFoundError, match=rf"LoRA file not found: missing.safetensors \(searched .*{folder.name}"):
        pipe.switch_lora("missing.safetensors")
    # dynamic apply from a config_json too, and a LoRA path relative to the model folder
    import json
    import shutil
    shutil.copy(paths[0], folder / "rel_lora.safetensors")
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({**size, "infer_steps": 4, "denoising_step_list": [1000, 750, 500, 250],
                               "lora_dynamic_apply": True,
                               "lora_configs": [{"path": "rel_lora.safetensors", "strength": 1.0}]}))
    from_json = LightX2VPipeline(task="t2v", model_path=str(folder), device="cpu")
    from_json.create_generator(config_json=str(cfg))
    torch.testing.assert_close(from_json.pipeline.generate("a cat", seed=3).latents,
                               ref([{"path": str(paths[0]), "strength": 1.0}]), rtol=0, atol=0)
    from_json.switch_lora("")
    torch.testing.assert_close(from_json.pipeline.generate("a cat", seed=3).latents, ref([]), rtol=0, atol=0)
    merged = LightX2VPipeline(task="t2v", model_path=str(folder), device="cpu")
    merged.enable_lora([{"path": str(paths[0]), "strength": 1.0}])
    merged.create_generator(num_frames=5, height=32, width=48, guidance_scale=1.0)
    with pytest.raises(RuntimeError, match="lora_dynamic_apply=True"):
        merged.switch_lora(str(paths[1]))


def test_lightx2v_signatures_and_their_checks(folder, tmp_path, monkeypatch):
    """LightX2V's other keyword arguments are accepted where they do not matter for Wan2.1 and named errors
    where they ask for something else; an empty model_path is an error, not the current directory; a
    config_json's problems name the file; N torchrun processes without a parallel section are refused."""
    import json
    with pytest.raises(ValueError, match="model_path is required"):
        LightX2VPipeline(task="t2v", model_path="", model_cls="wan2.1_distill")
    with pytest.raises(ValueError, match=r"support_tasks \['flf2v'\]"):
        LightX2VPipeline(task="t2v", model_path=str(folder), support_tasks=["t2v", "flf2v"])
    pipe = LightX2VPipeline(task="t2v", model_path=str(folder), model_cls="wan2.1_distill", support_tasks=["t2v"],
                            device="cpu")
    pipe.enable_quantize(skip_fp8_block_index=[0, 43])
    pipe.enable_offload(cpu_offload=True)  # (CLIP's offload follows cpu_offload, as LightX2V's misspelled key)
    assert "clip_cpu_offload" not in pipe.config and pipe.config["cpu_offload"] is True
    pipe.config.clear()
    with pytest.raises(ValueError, match="distilled_sigma_values"):
        pipe.create_generator(distilled_sigma_values=[1.0, 0.5, 0.0])
    bad = tmp_path / "typo.json"
    bad.write_text(json.dumps({"infer_step": 4}))
    with pytest.raises(ValueError, match=r"typo\.json.*'infer_step'"):
        pipe.create_generator(config_json=str(bad))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match="started as 2 processes"):
        pipe.create_generator(num_frames=5, height=32, width=48, guidance_scale=1.0)
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.delenv("RANK")
    mag = LightX2VPipeline(task="t2v", model_path=str(folder), device="cpu")
    mag.enable_cache(cache_method="Mag", magcache_calibration=True)
    with pytest.raises(ValueError, match="magcache_calibration"):
        mag.create_generator(num_frames=5, height=32, width=48, guidance_scale=1.0)
    pipe.create_generator(num_frames=5, height=32, width=48, guidance_scale=1.0, denoising_step_list=None,
                          infer_steps=2, audio_fps=24000, double_precision_rope=True, norm_modulate_backend="triton",
                          rmsnorm_type="torch", modulate_with_rmsnorm_type="torch")
    assert pipe.pipeline.run_cfg.denoising_step_list == (1000, 500)
    with pytest.raises(ValueError, match="task 'i2v': this pipeline was created for 't2v'"):
        pipe.generate(seed=1, prompt="x", task="i2v", return_result_tensor=True)
    with pytest.raises(ValueError, match="video_path .*not supported"):
        pipe.generate(seed=1, prompt="x", video_path="v.mp4", return_result_tensor=True)
    with pytest.warns(UserWarning, match="not kept") as caught:
        assert pipe.generate(seed=1, prompt="x", task="t2v", sr_ratio=2.0) == {"video": None}
    assert [w.filename for w in caught if "not kept" in str(w.message)] == [__file__]  # (not torch's no_grad)


def test_a_bad_seed_is_refused_before_the_encoders_run(folder, monkeypatch):
    pipe = Pipeline.load(folder, {"target_video_length": 5, "target_height": 32, "target_width": 48}, device="cpu")
    monkeypatch.setattr(pipe, "_encode", lambda *a, **k: pytest.fail("encoders ran before the seed check"))
    for seed in (-1, 2 ** 64, 1.5, "42"):
        with pytest.raises(ValueError, match="seed must be an integer"):
            pipe.generate("x", seed=seed)


def test_numpy_arguments_and_a_mistyped_dynamic_apply(folder, tmp_path):
    """A numpy guidance scale made enable_cfg np.True_, refused under a key the caller never passed; numpy
    sizes, seed and target_shape were refused as non-integers (LightX2V takes them). And a config_json's
    "lora_dynamic_apply": "true" was popped before validation: dynamic apply silently off."""
    import json
    import numpy as np
    pipe = LightX2VPipeline(task="t2v", model_path=str(folder), model_cls="wan2.1_distill", device="cpu")
    pipe.create_generator(num_frames=np.int64(5), height=np.int64(32), width=np.float64(48.0),
                          guidance_scale=np.linspace(1, 5, 3)[1], denoising_step_list=np.array([1000, 500]))
    run = pipe.pipeline.run_cfg
    assert (run.enable_cfg, run.sample_guide_scale, run.target_video_length, run.denoising_step_list) == (
        True, 3.0, 5, (1000, 500))
    got = pipe.generate(seed=np.int64(3), prompt="x", target_shape=np.array([32, 48]), return_result_tensor=True)
    ref = pipe.generate(seed=3, prompt="x", target_shape=[32, 48], return_result_tensor=True)
    torch.testing.assert_close(got["video"], ref["video"], rtol=0, atol=0)
    cfg = tmp_path / "dyn.json"
    cfg.write_text(json.dumps({"lora_dynamic_apply": "true", "target_video_length": 5, "target_height": 32,
                               "target_width": 48}))
    bad = LightX2VPipeline(task="t2v", model_path=str(folder), model_cls="wan2.1_distill", device="cpu")
    with pytest.raises(ValueError, match="'lora_dynamic_apply' = 'true': expected true/false"):
        bad.create_generator(config_json=str(cfg))
