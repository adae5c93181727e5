"""LightX2V JSON configs: shipped files parse, keys map, bad values are named."""
import json
import re
import warnings
from pathlib import Path

import pytest

from lightx2v_engine.config import (PRESETS, LoraSpec, RunConfig, check_run_config, get_preset, load_run_config,
                                    model_config_from_json, parse_run_config)
from lightx2v_engine.parallel import ParallelConfig

CONFIGS = sorted((Path(__file__).parent.parent / "configs").rglob("*.json"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_parse(path):
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        cfg = load_run_config(path, model_cls="wan2.1" if "baseline" in path.name else "wan2.1_distill")
    assert isinstance(cfg, RunConfig)
    for w in rec:  # the only warnings a shipped config may give: keys accepted but not acted on
        assert cfg.ignored_keys and all(k in str(w.message) for k in cfg.ignored_keys), str(w.message)
    assert cfg.offload_granularity in ("block", "model")
    if "distill" in path.relative_to(Path(__file__).parent.parent / "configs").parts:  # (not the checkout's path)
        assert cfg.sampler == "distill" and cfg.infer_steps == 4
        assert cfg.denoising_step_list == (1000, 750, 500, 250)
        assert cfg.latent_shape() == (16, 21, 60, 104)


def test_mapped_and_ignored_keys_warn_once_naming_them():
    raw = {"infer_steps": 4, "denoising_step_list": [1000, 750, 500, 250], "sample_shift": 5,
           "self_attn_1_type": "flash_attn3", "cpu_offload": False, "offload_ratio": 0.8,
           "lora_configs": [{"path": "a.safetensors", "strength": 0.5}], "seed": 7, "t5_cpu_offload": True}
    with pytest.warns(UserWarning) as rec:
        cfg = parse_run_config(raw)
    assert len(rec) == 1
    msg = str(rec[0].message)
    assert "offload_ratio" in msg and "cpu_offload" not in msg  # cpu_offload false: nothing to say
    assert "self_attn_1_type" not in msg and cfg.self_attn_1_type == "flash_attn3" and not cfg.attn_8bit
    assert cfg.lora_configs == (LoraSpec("a.safetensors", 0.5),)
    assert cfg.seed == 7 and cfg.t5_cpu_offload


@pytest.mark.parametrize("raw,key", [
    ({"target_height": 470}, "target_height"),
    ({"target_width": 833}, "target_width"),
    ({"target_video_length": 80}, "target_video_length"),
    ({"denoising_step_list": [1000, 750, 750, 250]}, "denoising_step_list"),
    ({"denoising_step_list": [250, 500, 750, 1000]}, "denoising_step_list"),
    ({"denoising_step_list": [1001, 750, 500, 250]}, "denoising_step_list"),
    ({"denoising_step_list": [1000, 750, 500, 0]}, "denoising_step_list"),
    ({"sample_shift": -1}, "sample_shift"),
    ({"enable_cfg": "yes"}, "enable_cfg"),
    ({"seed": 1.5}, "seed"),
    ({"lora_configs": [{"strength": 1.0}]}, "lora_configs[0]"),
    ({"dit_quantized": True}, "dit_quant_scheme"),
    ({"sampler": "euler"}, "sampler"),
    ({"seed": -3}, "seed"),
    ({"seed": 2 ** 64}, "seed"),
    ({"dit_quantized": True, "dit_quant_scheme": "fp8-bogus"}, "dit_quant_scheme"),
])
def test_bad_values_name_key_and_value(raw, key):
    with pytest.raises(ValueError) as e:
        parse_run_config(raw)
    assert repr(key) in str(e.value) or key in str(e.value)


def test_lightx2v_values_that_ask_for_what_runs():
    """An empty sample_neg_prompt is an empty negative prompt; feature_caching "NoCaching" is what runs (no
    warning). Under the distill sampler, as LightX2V's distill scheduler: infer_steps without a step list
    makes newer LightX2V's list (ComfyUI's "simple" timesteps; 4 gives the default list); with a list of
    another length the list runs, with a warning naming both."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = parse_run_config({"sample_neg_prompt": "", "feature_caching": "NoCaching"})
        assert parse_run_config({"infer_steps": 4}).denoising_step_list == (1000, 750, 500, 250)
        eight = parse_run_config({"infer_steps": 8})
        three = parse_run_config({"infer_steps": 3})
    assert cfg.sample_neg_prompt == ""
    assert eight.infer_steps == 8 and eight.denoising_step_list == (1000, 875, 750, 625, 500, 375, 250, 125)
    assert three.denoising_step_list == (1000, 667, 334)
    with pytest.warns(UserWarning, match=r"infer_steps=5 does not match the 4 steps of denoising_step_list "
                                         r"\[1000, 750, 500, 250\]: the list runs"):
        five = parse_run_config({"infer_steps": 5, "denoising_step_list": [1000, 750, 500, 250]})
    assert five.infer_steps == 4
    with pytest.raises(ValueError, match="infer_steps"):
        parse_run_config({"infer_steps": 0})
    with pytest.raises(ValueError, match=r"model_cls 'wan2.2_moe' is not supported"):
        parse_run_config({}, model_cls="wan2.2_moe")


def test_unknown_key_is_an_error_with_suggestion():
    with pytest.raises(ValueError, match=r"'target_heigth' \(did you mean 'target_height'\?\)"):
        parse_run_config({"target_heigth": 480})
    # a known place rather than the nearest spelling: clip_offload was 'cpu_offload' (the whole DiT), a top-level
    # cfg_p_size 'cfg_scale' (accepted and ignored: a typo turned into a silent no-op)
    for key, hint in (("clip_offload", "did you mean 'clip_cpu_offload'?"),
                      ("cfg_p_size", 'a key of the "parallel" section'), ("seq_p_size", 'a key of the "parallel"'),
                      ("lora_strength", 'LoRAs go in "lora_configs"'), ("image_path", "a command-line flag (--image_path)"),
                      ("sample_guide_scal", "did you mean 'sample_guide_scale'?"),
                      ("use_compil", "did you mean 'use_compile'?")):
        with pytest.raises(ValueError, match=f"'{key}' \\({re.escape(hint)}"):
            parse_run_config({key: 1})


def test_sampler_choice_follows_model_cls():
    assert parse_run_config({}, model_cls="wan2.1_distill").sampler == "distill"
    # enable_cfg defaults to false, as LightX2V's get_default_config: the same file computes the same thing
    with pytest.warns(UserWarning, match="no enable_cfg: classifier-free guidance is off"):
        base = parse_run_config({}, model_cls="wan2.1")
    assert base.sampler == "unipc" and base.infer_steps == 50 and not base.enable_cfg
    assert parse_run_config({"enable_cfg": True}, model_cls="wan2.1").enable_cfg
    # as LightX2V: wan2.1 runs UniPC and ignores a step list (with a warning) unless scheduler_type says
    # WanStepDistillScheduler
    with pytest.warns(UserWarning, match="model_cls wan2.1 runs the UniPC sampler for infer_steps=4"):
        cfg = parse_run_config({"denoising_step_list": [1000, 750, 500, 250], "infer_steps": 4}, model_cls="wan2.1")
    assert cfg.sampler == "unipc" and cfg.infer_steps == 4
    cfg = parse_run_config({"denoising_step_list": [1000, 500], "scheduler_type": "WanStepDistillScheduler"},
                           model_cls="wan2.1")
    assert cfg.sampler == "distill" and cfg.infer_steps == 2 and cfg.denoising_step_list == (1000, 500)
    assert parse_run_config({"scheduler_type": "WanScheduler"}, model_cls="wan2.1").sampler == "unipc"
    # the distill classes always run the step list (LightX2V's WanDistillRunner)
    assert parse_run_config({"scheduler_type": "WanScheduler"}, model_cls="wan2.1_distill").sampler == "distill"
    assert parse_run_config({"sampler": "distill"}, model_cls="wan2.1").sampler == "distill"  # ours wins
    with pytest.raises(ValueError, match="scheduler_type.*'UniPC'.*expected one of"):
        parse_run_config({"scheduler_type": "UniPC"}, model_cls="wan2.1")


def test_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_run_config(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        load_run_config(tmp_path / "bad.json")


def test_model_config_json_identifies_presets(tmp_path):
    wan = {"_class_name": "WanModel", "dim": 5120, "eps": 1e-06, "ffn_dim": 13824, "freq_dim": 256, "in_dim": 36,
           "model_type": "i2v", "num_heads": 40, "num_layers": 40, "out_dim": 16, "text_len": 512}
    (tmp_path / "config.json").write_text(json.dumps(wan))
    assert model_config_from_json(tmp_path / "config.json", "wan2.1-i2v-14b-720p").name == "wan2.1-i2v-14b-720p"
    assert model_config_from_json(tmp_path / "config.json").name.startswith("wan2.1-i2v-14b")
    diff = {"num_attention_heads": 12, "attention_head_dim": 128, "ffn_dim": 8960, "num_layers": 30, "in_channels": 16}
    (tmp_path / "d.json").write_text(json.dumps(diff))
    assert model_config_from_json(tmp_path / "d.json") == PRESETS["wan2.1-t2v-1.3b"]
    odd = dict(wan, num_layers=3)
    (tmp_path / "o.json").write_text(json.dumps(odd))
    assert model_config_from_json(tmp_path / "o.json").num_layers == 3
    (tmp_path / "m.json").write_text(json.dumps({"dim": 4}))
    with pytest.raises(ValueError, match="missing keys"):
        model_config_from_json(tmp_path / "m.json")
    (tmp_path / "l.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="l.json: expected a JSON object"):
        model_config_from_json(tmp_path / "l.json")
    with pytest.raises(FileNotFoundError, match="model config not found"):
        model_config_from_json(tmp_path / "none.json")
    with pytest.raises(ValueError, match="unknown model preset"):
        get_preset("wan2.2")


def test_attention_types():
    cfg = parse_run_config({"self_attn_1_type": "sage_attn2", "cross_attn_1_type": "sage_attn2",
                            "cross_attn_2_type": "sage_attn2"})
    assert cfg.attn_8bit and cfg.cross_attn_1_type == "sage_attn2"
    assert not parse_run_config({"self_attn_1_type": "torch_sdpa"}).attn_8bit
    assert not parse_run_config({}).attn_8bit
    with pytest.warns(UserWarning, match="dense exact attention runs for self_attn_1_type=radial_attn"):
        assert not parse_run_config({"self_attn_1_type": "radial_attn"}).attn_8bit
    with pytest.raises(ValueError, match="'self_attn_1_type' = 'sage_atn2'.*did you mean 'sage_attn2'"):
        parse_run_config({"self_attn_1_type": "sage_atn2"})
    with pytest.raises(ValueError, match="'cross_attn_2_type' = 3: expected a string"):
        parse_run_config({"cross_attn_2_type": 3})


def test_lightx2v_offload_keys():
    """LightX2V's wan_t2v.json carries t5_offload_granularity; newer configs an offload_plan object whose
    offload_granularity wins over the top-level key."""
    with pytest.warns(UserWarning, match="t5_offload_granularity .t5_cpu_offload always streams"):
        cfg = parse_run_config({"t5_cpu_offload": True, "t5_offload_granularity": "block"})
    assert cfg.t5_cpu_offload and "t5_offload_granularity" in cfg.ignored_keys
    with pytest.raises(ValueError, match="'t5_offload_granularity' = 'blok': expected 'model' or 'block'"):
        parse_run_config({"t5_offload_granularity": "blok"})
    cfg = parse_run_config({"cpu_offload": True, "offload_granularity": "block",
                            "offload_plan": {"offload_granularity": "model"}})
    assert cfg.offload_granularity == "model"
    with pytest.warns(UserWarning, match=r"offload_plan.resident_blocks \(an offloaded DiT streams all"):
        parse_run_config({"offload_plan": {"offload_granularity": "block", "resident_blocks": {"blocks": 4}}})
    with pytest.raises(ValueError, match=r"'offload_plan'.*unknown keys \['granularity'\]"):
        parse_run_config({"offload_plan": {"granularity": "block"}})
    with pytest.raises(ValueError, match="'offload_plan' = 'block': expected an object"):
        parse_run_config({"offload_plan": "block"})
    with pytest.raises(ValueError, match="'offload_plan.offload_granularity' = 'rows'"):
        parse_run_config({"offload_plan": {"offload_granularity": "rows"}})
    # LightX2V's get_offload_plan: a plan without a granularity means "block", whatever the top-level key
    # says (it kept the top-level "model"); its model-specific use_block_slab and a top-level
    # use_event_offload / t5_lazy_load are LightX2V keys (they were "unknown key" errors)
    with pytest.warns(UserWarning, match=r"offload_granularity 'model' is overridden by offload_plan "
                                         r"\(granularity 'block', its default\)"):
        cfg = parse_run_config({"cpu_offload": True, "offload_granularity": "model",
                                "offload_plan": {"resident_blocks": {}}})
    assert cfg.offload_granularity == "block"
    with pytest.warns(UserWarning, match="offload_plan.use_block_slab.*offload_use_block_slab.*t5_lazy_load.*"
                                         "use_event_offload"):
        cfg = parse_run_config({"cpu_offload": True, "offload_plan": {"use_block_slab": True},
                                "use_event_offload": True, "t5_lazy_load": True, "offload_use_block_slab": True})
    assert cfg.offload_granularity == "block"


def test_frame_count_error_names_the_nearest_valid_counts():
    with pytest.raises(ValueError, match=r"'target_video_length' = 80: frame count must be 4k\+1.*nearest: 77 or 81"):
        parse_run_config({"target_video_length": 80})
    with pytest.raises(ValueError, match=r"LightX2V makes 81 for T2V silently, 85 for I2V with a warning"):
        parse_run_config({"target_video_length": 84})  # (LightX2V's I2V rounding: T // 4 * 4 + 1)
    with pytest.raises(ValueError, match="nearest: 1 or 5"):
        parse_run_config({"target_video_length": 2})


def test_newer_lightx2v_schema():
    """Newer LightX2V configs: num_frames and size [H, W] for the video size, and the step-distilled models run
    under model_cls wan2.1 with distill_method "dmd2" (the distill sampler, not UniPC)."""
    raw = {"num_frames": 81, "size": [480, 832], "distill_method": "dmd2", "infer_steps": 4,
           "denoising_step_list": [1000, 750, 500, 250], "sample_shift": 5, "enable_cfg": False}
    cfg = parse_run_config(raw, model_cls="wan2.1")
    assert (cfg.sampler, cfg.target_video_length, cfg.target_height, cfg.target_width) == ("distill", 81, 480, 832)
    assert parse_run_config(raw, model_cls="wan2.1_distill").sampler == "distill"
    with pytest.raises(ValueError, match="'distill_method' = 'mean_flow'.*mean-flow distillation is not implemented"):
        parse_run_config({**raw, "distill_method": "mean_flow"}, model_cls="wan2.1")
    with pytest.raises(ValueError, match="'num_frames' = 21: disagrees with target_video_length = 81"):
        parse_run_config({"num_frames": 21, "target_video_length": 81})
    with pytest.raises(ValueError, match=r"'size' = \[480\]: expected \[height, width\]"):
        parse_run_config({"size": [480]})
    with pytest.raises(ValueError, match="'target_height' = 100: must be a positive multiple of 16"):
        parse_run_config({"size": [100, 832]})


def test_overrides_replace_the_other_spelling(tmp_path):
    from lightx2v_engine.config import load_run_config
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"num_frames": 81, "size": [480, 832]}))
    cfg = load_run_config(path, {"target_height": 64, "target_width": 96, "target_video_length": 9})
    assert (cfg.target_video_length, cfg.target_height, cfg.target_width) == (9, 64, 96)
    path.write_text(json.dumps({"target_video_length": 81, "target_height": 480, "target_width": 832}))
    cfg = load_run_config(path, {"size": [64, 96], "num_frames": 9})
    assert (cfg.target_video_length, cfg.target_height, cfg.target_width) == (9, 64, 96)


def test_lightx2v_settings_of_absent_features_are_accepted_or_named():
    """Sparse-attention and feature-caching settings, changing_resolution_steps, host-memory knobs and
    sub_servers are accepted (one warning names them); features this engine lacks are errors saying so."""
    with pytest.warns(UserWarning) as rec:
        cfg = parse_run_config({"self_attn_1_type": "sla_attn", "sla_attn_setting": {"topk": 0.1},
                                "feature_caching": "Mag", "magcache_K": 2, "magcache_calibration": False,
                                "changing_resolution_steps": [2], "shared_cpu_weights": True,
                                "sub_servers": {"dit": ["http://x"]}})
    text = " ".join(str(w.message) for w in rec)
    assert "sla_attn_setting (sparse attention is not implemented" in text and "magcache_K (no feature caching)" in text
    assert "sub_servers (every model runs in this process)" in text and "self_attn_1_type=sla_attn" in text
    assert cfg.self_attn_1_type == "sla_attn"
    with pytest.raises(ValueError, match="'magcache_calibration' = True: a MagCache calibration run"):
        parse_run_config({"magcache_calibration": True})
    for key, value, match in (("disagg_mode", "encoder", "disaggregated serving"),
                              ("video_frame_interpolation", {"algo": "rife"}, "frame interpolation"),
                              ("num_frame_per_block", 3, "CausVid"), ("ar_config", {}, "self-forcing"),
                              ("ltx2_vae_ckpt", "x", "LTX-2")):
        with pytest.raises(ValueError, match=f"'{key}' = .*{match}"):
            parse_run_config({key: value})


def test_fast_ulysses_runs_as_ulysses():
    cfg = parse_run_config({"parallel": {"seq_p_size": 2, "seq_p_attn_type": "fast_ulysses"}})
    assert cfg.parallel.seq_p_attn_type == "ulysses"


@pytest.mark.parametrize("name", ["ulysses-4090", "ulysses-opt"])
def test_lightx2v_ulysses_transports_run_as_ulysses(name):
    """LightX2V's ulysses-4090 (round-robin peer-to-peer rounds, its parallel docs' RTX 4090 setting) and
    ulysses-opt are Ulysses over another transport: they run as 'ulysses', with a note (were errors)."""
    with pytest.warns(UserWarning, match=rf"parallel\.seq_p_attn_type '{name}' \(runs as 'ulysses'"):
        cfg = parse_run_config({"parallel": {"seq_p_size": 2, "seq_p_attn_type": name}})
    assert cfg.parallel.seq_p_attn_type == "ulysses"
    with pytest.raises(ValueError, match=r"'ulysses_sparse_l2': expected one of \['ulysses', 'ring'\] \(or "
                                         r"LightX2V's Ulysses variants"):
        parse_run_config({"parallel": {"seq_p_size": 2, "seq_p_attn_type": "ulysses_sparse_l2"}})


def test_older_mm_config_maps_onto_the_quantization_keys():
    """Older LightX2V configs turn quantization on with mm_config.mm_type (was 'accepted, not acted on': the
    DiT loaded bf16); a mm_type without an 8-bit per-channel scheme here is an error naming it."""
    from lightx2v_engine.config import parse_run_config
    run = parse_run_config({"mm_config": {"mm_type": "W-fp8-channel-sym-A-fp8-channel-sym-dynamic-Vllm",
                                          "weight_auto_quant": True}})
    assert (run.dit_quantized, run.dit_quant_scheme, run.weight_auto_quant) == (True, "fp8-vllm", True)
    run = parse_run_config({"mm_config": {"mm_type": "W-int8-channel-sym-A-int8-channel-sym-dynamic-Sgl-ActVllm"}})
    assert (run.dit_quantized, run.dit_quant_scheme, run.weight_auto_quant) == (True, "int8-sgl", False)
    run = parse_run_config({"mm_config": {"mm_type": "Default"}, "dit_quantized": True, "dit_quant_scheme": "fp8-sgl"})
    assert (run.dit_quantized, run.dit_quant_scheme) == (True, "fp8-sgl")
    with pytest.raises(ValueError, match=r"'mm_config\.mm_type' = 'W-fp8-block128.*per-channel 8-bit"):
        parse_run_config({"mm_config": {"mm_type": "W-fp8-block128-sym-A-fp8-channel-group128-sym-dynamic-Deepgemm"}})
    # a top-level key (or an override: CLI, server, enable_quantize) that says otherwise wins, with a warning;
    # "fp8" and mm_type's fp8-vllm are the same format (no warning)
    with pytest.warns(UserWarning, match=r"dit_quant_scheme 'int8-sgl' is used over mm_config's 'fp8-vllm'"):
        run = parse_run_config({"mm_config": {"mm_type": "W-fp8-channel-sym-A-fp8-channel-sym-dynamic-Vllm"},
                                "dit_quant_scheme": "int8-sgl"})
    assert (run.dit_quantized, run.dit_quant_scheme) == (True, "int8-sgl")
    with pytest.warns(UserWarning, match=r"dit_quantized False is used over mm_config's True"):
        run = parse_run_config({"mm_config": {"mm_type": "W-fp8-channel-sym-A-fp8-channel-sym-dynamic-Vllm"},
                                "dit_quantized": False})
    assert not run.dit_quantized
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run = parse_run_config({"mm_config": {"mm_type": "W-fp8-channel-sym-A-fp8-channel-sym-dynamic-Vllm"},
                                "dit_quant_scheme": "fp8"})
    assert run.dit_quant_scheme == "fp8"
    with pytest.raises(ValueError, match=r"'mm_config' = 'fp8'"):
        parse_run_config({"mm_config": "fp8"})


def test_quantization_keys_without_dit_quantized_warn():
    """dit_quantized_ckpt or weight_auto_quant without dit_quantized: the DiT loads unquantized, said once."""
    from lightx2v_engine.config import parse_run_config
    with pytest.warns(UserWarning, match=r"dit_quantized_ckpt, weight_auto_quant set but dit_quantized is not true"):
        parse_run_config({"dit_quantized_ckpt": "/x/fp8.safetensors", "weight_auto_quant": True})
    with pytest.warns(UserWarning, match=r"weight_auto_quant quantizes .*dit_quantized_ckpt \(/x/fp8\.safetensors\) is not read"):
        parse_run_config({"dit_quantized": True, "dit_quant_scheme": "fp8-sgl", "weight_auto_quant": True,
                          "dit_quantized_ckpt": "/x/fp8.safetensors"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        parse_run_config({"dit_quantized": False, "dit_quant_scheme": "Default"})  # (LightX2V's plain spelling)


def test_configs_of_other_wan_versions_and_modes_are_refused_by_name():
    """Config sweep of LightX2V's stored files: a self-forcing sf_config ran as plain Wan2.1 with a warning;
    Wan2.2's TI2V / MoE values (vae_stride, patch_size, latent channels, the MoE boundary, two guidance scales)
    were ignored or misnamed; older configs' parallel_attn_type got a look-alike-key hint. Wan2.1's own
    values of those keys change nothing and pass silently."""
    from lightx2v_engine.config import parse_run_config
    for raw, match in [({"sf_config": {"sf_type": "dmd"}}, "self-forcing"),
                       ({"vae_stride": [4, 16, 16]}, "Wan2.2's"), ({"num_channels_latents": 48}, "Wan2.2's"),
                       ({"boundary": 0.875}, "MoE boundary"), ({"sample_guide_scale": [3.5, 3.5]}, "Wan2.2 MoE"),
                       ({"parallel_attn_type": "ulysses"}, "write it as the parallel section")]:
        with pytest.raises(ValueError, match=match):
            parse_run_config(raw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        parse_run_config({"vae_stride": [4, 8, 8], "patch_size": [1, 2, 2], "num_channels_latents": 16,
                          "boundary": None})


# every RunConfig field set to a valid value other than its default (a new field must be added here)
NON_DEFAULT = dict(
    infer_steps=3, denoising_step_list=(1000, 667, 333), sample_shift=3.0, enable_cfg=True, sample_guide_scale=4.0,
    target_video_length=17, target_height=320, target_width=576, text_len=256, seed=7, fps=24.0,
    lora_configs=(LoraSpec("a.safetensors", 0.5),), dit_original_ckpt="d.safetensors", dit_quantized=True,
    dit_quantized_ckpt="q.safetensors", dit_quant_scheme="int8-vllm", weight_auto_quant=True, cpu_offload=True,
    offload_granularity="model", t5_cpu_offload=False, clip_cpu_offload=False, vae_cpu_offload=False,
    unload_modules=True, lazy_load=True, t5_quantized=True, t5_quant_scheme="int8-q8f", t5_quantized_ckpt="t.pth",
    clip_quantized=True, clip_quant_scheme="fp8-sgl", clip_quantized_ckpt="c.pth", t5_original_ckpt="t5.pth",
    clip_original_ckpt="clip.pth", vae_path="v.pth", use_lightvae=True, use_tae=True, tae_path="tae.pth",
    need_scaled=True, sample_neg_prompt="blurry", use_image_encoder=False, self_attn_1_type="sage_attn2",
    cross_attn_1_type="torch_sdpa", cross_attn_2_type="flash_attn2", sampler="distill", distill_update="renoise",
    dtype="fp32", use_cuda_graph=False, vae_dtype="fp32", use_tiling_vae=True, lora_strict=False,
    lora_dynamic_apply=True,
    parallel=ParallelConfig(seq_p_size=2, seq_p_attn_type="ring", cfg_p_size=2, vae_parallel=False,
                            seq_p_quant_scheme="fp8"))


def test_a_run_config_made_in_python_is_checked_as_its_keys():
    """Pipeline.load / Pipeline.random took a RunConfig made in Python unchecked (a frozen dataclass checks
    nothing): RunConfig(enable_cfg="false") ran CFG, sampler="unpic" the distill sampler. check_run_config
    parses every field as a key: a valid config comes back equal (every field tried), a bad one is named."""
    import dataclasses
    from lightx2v_engine.pipeline import _run_config
    assert {f.name for f in dataclasses.fields(RunConfig)} - set(NON_DEFAULT) == {"ignored_keys"}
    for run in (RunConfig(), RunConfig(**NON_DEFAULT), RunConfig(sampler="unipc", infer_steps=8),
                RunConfig(lora_configs=[LoraSpec(Path("x.safetensors"))], vae_path=Path("v.pth"))):
        got = _run_config(run, "wan2.1_distill")
        assert got == dataclasses.replace(run, lora_configs=tuple(LoraSpec(str(s.path), s.strength)
                                                                  for s in run.lora_configs),
                                          vae_path=run.vae_path and str(run.vae_path))
    for bad, key in (({"enable_cfg": "false"}, "enable_cfg"), ({"sampler": "unpic"}, "sampler"),
                     ({"target_height": 470}, "target_height"), ({"dit_quantized": True}, "dit_quant_scheme"),
                     ({"lora_configs": ("a.safetensors",)}, r"lora_configs\[0\]")):
        with pytest.raises(ValueError, match=key):
            _run_config(RunConfig(**bad), "wan2.1_distill")
    with pytest.raises(ValueError, match="model_cls"):
        check_run_config(RunConfig(), model_cls="wan2.2")


def test_numpy_numbers_are_taken_as_json_numbers():
    """A value from numpy (np.int64 from a loop, np.float64 from np.linspace, np.True_ from a comparison) was
    refused as "expected an integer" / "expected true/false"; LightX2V's Python API takes them."""
    np = pytest.importorskip("numpy")
    run = parse_run_config({"target_video_length": np.int64(17), "target_height": np.int32(320),
                            "target_width": np.float64(576.0), "sample_guide_scale": np.float32(4.5),
                            "enable_cfg": np.float64(4.5) != 1, "denoising_step_list": list(np.array([1000, 500])),
                            "parallel": {"seq_p_size": np.int64(2), "cfg_p_size": 2.0}})
    assert (run.target_video_length, run.target_height, run.target_width, run.sample_guide_scale, run.enable_cfg,
            run.denoising_step_list, run.parallel.seq_p_size, run.parallel.cfg_p_size) == (
        17, 320, 576, 4.5, True, (1000, 500), 2, 2)
    assert type(run.target_height) is int and type(run.enable_cfg) is bool
    for raw, key in (({"target_height": np.float64(320.5)}, "target_height"), ({"enable_cfg": np.int64(1)}, "enable_cfg"),
                     ({"infer_steps": np.True_}, "infer_steps"), ({"parallel": {"seq_p_size": 2.5}}, "seq_p_size")):
        with pytest.raises(ValueError, match=key):
            parse_run_config(raw)


def test_shipped_configs_say_what_they_run():
    """configs/tiny/tiny_baseline.json (README: the 8-step CFG baseline) ran the distill sampler without
    --model_cls (8 steps is not above infer.py's "base model config" threshold); LightX2V's 4090 files set
    dit/t5/clip_quant_scheme with their *_quantized flags (the T2V copy lacked CLIP's)."""
    root = Path(__file__).parent.parent / "configs"
    base = load_run_config(root / "tiny" / "tiny_baseline.json")
    assert (base.sampler, base.infer_steps, base.enable_cfg) == ("unipc", 8, True)
    for task in ("t2v", "i2v"):
        raw = json.loads((root / "distill" / f"wan_{task}_distill_4step_cfg_4090.json").read_text())
        for part in ("dit", "t5", "clip"):
            assert raw[f"{part}_quantized"] is True and raw[f"{part}_quant_scheme"] == "fp8-q8f", (task, part)


def test_fps_the_video_writer_takes():
    """fps 1e-6 (rounded to a 0 frame rate) or 1e12 passed the config and failed in ffmpeg after the run."""
    for fps in (1e-6, 0.005, 1e12, 0):
        with pytest.raises(ValueError, match=r"'fps' = .*frame rate must lie in \[0.01, 1000.0\]"):
            parse_run_config({"fps": fps})
    assert parse_run_config({"fps": 0.01}).fps == 0.01 and parse_run_config({"fps": 1000}).fps == 1000.0
