"""LightX2V's Python API (``from lightx2v import LightX2VPipeline``, lightx2v.md §5) over this engine's
Pipeline, for scripts written against LightX2V:

    pipe = LightX2VPipeline(task="t2v", model_path="/models/Wan2.1-T2V-1.3B", model_cls="wan2.1_distill")
    pipe.enable_quantize(dit_quantized=True, dit_quantized_ckpt="...fp8...safetensors", quant_scheme="fp8-sgl")
    pipe.enable_lora([{"path": "style.safetensors", "strength": 1.0}])
    pipe.create_generator(attn_mode="sage_attn2", infer_steps=4, num_frames=81, height=480, width=832,
                          guidance_scale=1.0)
    pipe.generate(seed=42, prompt="...", negative_prompt="", save_result_path="out.mp4")

The enable_* calls collect LightX2V config keys; create_generator validates them once (the config
parser's errors and warnings) and loads the models; generate runs one video. What the engine does not
support raises a clear error here (Wan2.2 checkpoints, tensor parallelism); keys it accepts without
acting on (caching, compile) warn as they do in a JSON config.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

_TASKS = ("t2v", "i2v")


class LightX2VPipeline:
    """LightX2V's pipeline object: construct, enable_* (optional), create_generator, then generate."""

    def __init__(self, task: str = "t2v", model_path: str | None = None, model_cls: str = "wan2.1_distill",
                 support_tasks=(), sf_model_path: str | None = None,
                 dit_original_ckpt: str | None = None, low_noise_original_ckpt: str | None = None,
                 high_noise_original_ckpt: str | None = None, transformer_model_name: str | None = None,
                 device: str | torch.device | None = None):
        if model_path is None or (isinstance(model_path, str) and not model_path.strip()):
            # ("" is LightX2V's default: here it would have loaded whatever model the current directory holds)
            raise ValueError(f"LightX2VPipeline: model_path is required (the Wan2.1 model folder), got {model_path!r}")
        if task not in _TASKS:
            raise ValueError(f"LightX2VPipeline: task {task!r} is not supported here; choose one of {list(_TASKS)}")
        other = [t for t in (support_tasks or ()) if t not in _TASKS]
        if other:  # (LightX2V's multi-task models; a Wan2.1 model here runs the one task it was made for)
            raise ValueError(f"LightX2VPipeline: support_tasks {other} are not supported here (Wan2.1 t2v / i2v)")
        for name, value in (("low_noise_original_ckpt", low_noise_original_ckpt),
                            ("high_noise_original_ckpt", high_noise_original_ckpt), ("sf_model_path", sf_model_path),
                            ("transformer_model_name", transformer_model_name)):
            if value is not None:
                raise ValueError(f"LightX2VPipeline: {name} (Wan2.2 / Self-Forcing model layouts) is not supported "
                                 f"by this engine (Wan2.1 only)")
        from lightx2v_engine.config import check_model_cls
        check_model_cls(model_cls, "LightX2VPipeline: ")
        self.task, self.model_path, self.model_cls, self.device = task, model_path, model_cls, device
        self.config: dict[str, Any] = {}
        if dit_original_ckpt is not None:
            self.config["dit_original_ckpt"] = dit_original_ckpt
        self.pipeline = None  # set by create_generator
        self._dynamic_lora = False  # enable_lora(..., lora_dynamic_apply=True): switch_lora works

    # ------------------------------------------------------------------ options (before create_generator)
    def _set(self, **keys: Any) -> None:
        if self.pipeline is not None:
            raise RuntimeError("LightX2VPipeline: call enable_* before create_generator (as in LightX2V)")
        self.config.update({k: v for k, v in keys.items() if v is not None})

    def enable_quantize(self, dit_quantized: bool = False, text_encoder_quantized: bool = False,
                        image_encoder_quantized: bool = False, dit_quantized_ckpt: str | None = None,
                        low_noise_quantized_ckpt: str | None = None, high_noise_quantized_ckpt: str | None = None,
                        text_encoder_quantized_ckpt: str | None = None, image_encoder_quantized_ckpt: str | None = None,
                        quant_scheme: str = "fp8-sgl", text_encoder_quant_scheme: str | None = None,
                        skip_fp8_block_index=None) -> None:
        """LightX2V's arguments; skip_fp8_block_index is its LTX-2 setting (ignored for Wan there and here)."""
        if low_noise_quantized_ckpt or high_noise_quantized_ckpt:
            raise ValueError("LightX2VPipeline.enable_quantize: low/high_noise_quantized_ckpt are Wan2.2 keys; "
                             "this engine runs Wan2.1 (use dit_quantized_ckpt)")
        self._set(dit_quantized=dit_quantized, dit_quant_scheme=quant_scheme if dit_quantized else None,
                  dit_quantized_ckpt=dit_quantized_ckpt)
        if text_encoder_quantized:
            self._set(t5_quantized=True, t5_quantized_ckpt=text_encoder_quantized_ckpt or None,
                      t5_quant_scheme=text_encoder_quant_scheme or quant_scheme)
        if image_encoder_quantized:
            self._set(clip_quantized=True, clip_quantized_ckpt=image_encoder_quantized_ckpt or None,
                      clip_quant_scheme=quant_scheme)

    def enable_offload(self, cpu_offload: bool = False, offload_granularity: str = "block",
                       text_encoder_offload: bool = False, image_encoder_offload: bool = False,
                       vae_offload: bool = False) -> None:
        # (CLIP: LightX2V sets a misspelled key, so its CLIP offload follows cpu_offload; here too, and
        # image_encoder_offload=True offloads it as asked)
        self._set(cpu_offload=cpu_offload, offload_granularity=offload_granularity,
                  t5_cpu_offload=text_encoder_offload, clip_cpu_offload=image_encoder_offload or None,
                  vae_cpu_offload=vae_offload)

    def enable_lora(self, lora_configs: list[dict], lora_dynamic_apply: bool = False) -> None:
        """lora_configs: [{"path": ..., "strength": ...}, ...] (paths absolute or relative to model_path).
        lora_dynamic_apply: they can be replaced later by switch_lora (otherwise merged for good)."""
        self._set(lora_configs=list(lora_configs), lora_dynamic_apply=lora_dynamic_apply or None)

    def enable_lightvae(self, use_lightvae: bool = False, use_tae: bool = False, vae_path: str | None = None,
                        tae_path: str | None = None) -> None:
        """use_lightvae: the pruned Wan VAE at vae_path decodes (and I2V-encodes); use_tae: the tiny decoder at
        tae_path decodes (raw latents for LightX2V's lighttae files, as LightX2V's need_scaled)."""
        # (false flags are not set: a config_json given to create_generator may still turn them on)
        self._set(use_lightvae=use_lightvae or None, use_tae=use_tae or None, vae_path=vae_path, tae_path=tae_path)
        if use_tae and tae_path is not None and "lighttae" in str(tae_path):
            self._set(need_scaled=True)

    def enable_cache(self, cache_method: str = "Tea", coefficients=(), teacache_thresh: float = 0.15,
                     use_ret_steps: bool = False, magcache_calibration: bool = False, magcache_K: int = 6,
                     magcache_thresh: float = 0.24, magcache_retention_ratio: float = 0.2, magcache_ratios=()) -> None:
        """LightX2V's feature caching: its keys go to the config, whose parser warns that every step is computed
        here (exact, no caching) and refuses a MagCache calibration run."""
        if cache_method == "Mag":
            self._set(feature_caching=cache_method, magcache_calibration=magcache_calibration or None,
                      magcache_K=magcache_K, magcache_thresh=magcache_thresh,
                      magcache_retention_ratio=magcache_retention_ratio, magcache_ratios=list(magcache_ratios) or None)
        else:
            self._set(feature_caching=cache_method, coefficients=list(coefficients) or None,
                      teacache_thresh=teacache_thresh, use_ret_steps=use_ret_steps)

    def enable_compile(self) -> None:
        self._set(use_compile=True)

    def enable_parallel(self, cfg_p_size: int = 1, seq_p_size: int = 1, seq_p_attn_type: str = "ulysses",
                        seq_p_quant_scheme: str | None = None) -> None:
        """Multi-GPU under torchrun (world size = cfg_p_size * seq_p_size): see lightx2v_engine/parallel.py.
        Every rank runs the same script; only rank 0 writes the video. seq_p_quant_scheme "fp8": the
        sequence-parallel collectives move fp8 rows with their scales."""
        self._set(parallel={"cfg_p_size": cfg_p_size, "seq_p_size": seq_p_size, "seq_p_attn_type": seq_p_attn_type,
                            **({"seq_p_quant_scheme": seq_p_quant_scheme} if seq_p_quant_scheme else {})})

    # ------------------------------------------------------------------ build and run
    def create_generator(self, attn_mode: str = "flash_attn2", infer_steps: int = 50, num_frames: int = 81,
                         height: int = 480, width: int = 832, guidance_scale: float = 5.0, sample_shift: float = 5.0,
                         fps: float = 16, aspect_ratio: str = "16:9", boundary: float = 0.900,
                         boundary_step_index: int = 2, denoising_step_list=(1000, 750, 500, 250),
                         config_json: str | None = None, rope_type: str = "torch", resize_mode=None,
                         audio_fps: int = 24000, double_precision_rope: bool = True, norm_modulate_backend: str = "torch",
                         rmsnorm_type: str = "torch", modulate_with_rmsnorm_type: str = "torch",
                         distilled_sigma_values=None) -> None:
        """Validates the collected keys and loads the models. With config_json, that file's keys (the
        arguments are then ignored, as in LightX2V); else the arguments. guidance_scale 1 turns CFG off.
        The distill model classes take their step count from denoising_step_list (LightX2V's distill
        scheduler ignores infer_steps). rope_type is ignored (every RoPE implementation computes the same);
        aspect_ratio, boundary and boundary_step_index are Wan2.2 settings; resize_mode other than None is
        an error (I2V resizes as Wan does). denoising_step_list None: infer_steps steps (config.distill_step_list).
        The kernel-backend choices (rmsnorm_type, norm_modulate_backend, ...) and audio_fps are ignored (this
        engine picks its kernels; no audio); RoPE angles are computed in float64 (double_precision_rope False
        warns); distilled_sigma_values (LTX-2) is an error."""
        if distilled_sigma_values is not None:
            raise ValueError("LightX2VPipeline.create_generator: distilled_sigma_values is LightX2V's LTX-2 setting; "
                             "Wan2.1's distill sampler takes denoising_step_list")
        if double_precision_rope is False:
            from lightx2v_engine.config import warn_user
            warn_user("LightX2VPipeline.create_generator: double_precision_rope=False is ignored: the RoPE angles are "
                      "computed in float64 (as Wan)")
        if resize_mode is not None:
            raise ValueError(f"LightX2VPipeline.create_generator: resize_mode {resize_mode!r} is not supported "
                             f"(I2V resizes to the target area as Wan does)")
        from lightx2v_engine.pipeline import Pipeline
        if self.pipeline is not None:
            raise RuntimeError("LightX2VPipeline.create_generator: already created")
        from lightx2v_engine.config import _as, _read_json_object, parse_run_config
        source = "LightX2VPipeline settings"
        if config_json is not None:
            keys = _read_json_object(Path(config_json), "config_json")
            source = f"{config_json} (+ enable_* settings)"
        else:
            steps = None if denoising_step_list is None else list(denoising_step_list)
            distill = self.model_cls != "wan2.1"
            keys = {"infer_steps": len(steps) if distill and steps is not None else infer_steps,
                    "target_video_length": num_frames,
                    "target_height": height, "target_width": width, "sample_guide_scale": guidance_scale,
                    "sample_shift": sample_shift, "enable_cfg": guidance_scale != 1, "fps": fps,
                    "self_attn_1_type": attn_mode, "cross_attn_1_type": attn_mode, "cross_attn_2_type": attn_mode}
            if distill and steps is not None:
                keys["denoising_step_list"] = steps
        # a config_json is applied after the enable_* calls, as in LightX2V (its keys win; a parallel section
        # merges key by key); create_generator's own arguments set other keys than enable_* do
        config = {**self.config, **keys}
        if isinstance(keys.get("parallel"), dict) and isinstance(self.config.get("parallel"), dict):
            config["parallel"] = {**self.config["parallel"], **keys["parallel"]}
        dynamic = []
        dynamic_apply = config.pop("lora_dynamic_apply", None)  # (also from config_json)
        self._dynamic_lora = dynamic_apply is not None and _as("lora_dynamic_apply", dynamic_apply, bool)
        if self._dynamic_lora:  # switchable LoRAs: applied after loading, see switch_lora
            loras = config.pop("lora_configs", None) or []
            if not isinstance(loras, (list, tuple)):
                raise ValueError(f"lora_configs: expected a list of {{path, strength}}, got {loras!r}")
            dynamic = [self._lora_spec(c) for c in loras]
        run = parse_run_config(config, model_cls=self.model_cls, source=source)  # (its messages name the file)
        from lightx2v_engine.infer import _parallel_if_torchrun
        _parallel_if_torchrun(run)  # (N torchrun processes without a parallel section: N identical videos)
        self.pipeline = Pipeline.load(self.model_path, run, task=self.task, model_cls=self.model_cls,
                                      device=self.device)
        if dynamic:
            self.pipeline.set_request_loras(dynamic)

    def _lora_spec(self, item):
        """A {"path", "strength"} entry as a LoraSpec (a relative path: as given, then under model_path)."""
        from lightx2v_engine.config import LoraSpec, _as
        from lightx2v_engine.lora import resolve_spec
        if not isinstance(item, dict) or not isinstance(item.get("path"), str) \
                or set(item) - {"path", "strength", "name"}:
            raise ValueError(f"LightX2VPipeline: a LoRA entry must be {{'path': ..., 'strength': ...}}, got {item!r}")
        strength = _as("lora strength", item.get("strength", 1.0), float)  # (no bool, text or NaN)
        return resolve_spec(LoraSpec(item["path"], strength), [self.model_path])

    def switch_lora(self, lora_path: str, strength: float = 1.0) -> None:
        """Replaces the switchable LoRA (LightX2V: needs enable_lora(..., lora_dynamic_apply=True)); "" removes
        it. The model as loaded comes back exactly in between (Pipeline.set_request_loras)."""
        if self.pipeline is None:
            raise RuntimeError("LightX2VPipeline.switch_lora: call create_generator first")
        if not self._dynamic_lora:
            raise RuntimeError("LightX2VPipeline.switch_lora: LoRA dynamic apply is not enabled; call "
                               "enable_lora(lora_configs, lora_dynamic_apply=True) before create_generator "
                               "(as LightX2V requires)")
        self.pipeline.set_request_loras([] if lora_path == "" else [self._lora_spec({"path": lora_path,
                                                                                      "strength": strength})])

    @torch.no_grad()
    def generate(self, seed: int = 42, prompt: str = "", negative_prompt: str = "", save_result_path: str | None = None,
                 image_path: str | None = None, last_frame_path: str | None = None, audio_path: str | None = None,
                 src_ref_images=None, src_video=None, src_mask=None, return_result_tensor: bool = False,
                 target_shape=(), task: str | None = None, images=None, video_path=None, image_strength=None,
                 image_frame_idx=None, sr_ratio: float = 2.0) -> dict | None:
        """One video, as LightX2V's runners return it: with return_result_tensor {"video": float32 [T, H, W, 3]
        in [0, 1]} (the 8-bit frames / 255) and nothing written; else the video saved to save_result_path (H.264
        in .mp4/.m4v, .mov or .mkv by its extension, checked before the run; None: not saved) and
        {"video": None}. target_shape [H, W] overrides the generator's size. Defaults as LightX2V's newer API (seed 42, empty negative prompt; image_path "" is none). A rank > 0 of a multi-GPU
        run returns None (rank 0 has the video). task, when given, must be the pipeline's (a Wan2.1 model runs
        one task); images / video_path / image_strength / image_frame_idx (LightX2V's other models) are errors,
        sr_ratio (its super-resolution task) is ignored."""
        if self.pipeline is None:
            raise RuntimeError("LightX2VPipeline.generate: call create_generator first")
        if task is not None and task != self.task:
            raise ValueError(f"LightX2VPipeline.generate: task {task!r}: this pipeline was created for "
                             f"{self.task!r} (a Wan2.1 model runs the task it was made for)")
        for name, value in (("last_frame_path", last_frame_path), ("audio_path", audio_path),
                            ("src_ref_images", src_ref_images), ("src_video", src_video), ("src_mask", src_mask),
                            ("images", images), ("video_path", video_path), ("image_strength", image_strength),
                            ("image_frame_idx", image_frame_idx)):
            if value:
                raise ValueError(f"LightX2VPipeline.generate: {name} (LightX2V's FLF2V / audio / VACE / other "
                                 f"models' inputs) is not supported by this engine (Wan2.1 t2v / i2v)")
        if target_shape is not None and not (hasattr(target_shape, "__len__") and not isinstance(target_shape, str)
                                             and len(target_shape) in (0, 2)):
            raise ValueError(f"LightX2VPipeline.generate: target_shape must be [height, width], got {target_shape!r}")
        if target_shape is not None and len(target_shape):  # (a list, tuple or array of integers)
            from lightx2v_engine.config import _as
            target_shape = [_as("target_shape", v, int) for v in list(target_shape)]
        save = save_result_path is not None and not return_result_tensor
        if not save and not return_result_tensor and getattr(self.pipeline, "is_main", True):
            from lightx2v_engine.config import warn_user
            warn_user("LightX2VPipeline.generate: no save_result_path and no return_result_tensor: the video is "
                      "generated and not kept (LightX2V's default writes lightx2v_gen_result.png)")
        if save and getattr(self.pipeline, "is_main", True):  # (checked before the run; ranks > 0 write nothing)
            from lightx2v_engine.video import check_video_file
            check_video_file(save_result_path, "LightX2VPipeline.generate: save_result_path")
        h, w = (target_shape[0], target_shape[1]) if target_shape else (None, None)
        out = self.pipeline.generate(prompt, negative_prompt=negative_prompt, image=image_path or None, seed=seed,
                                     height=h, width=w)
        if out.frames is None:  # a rank > 0 of a multi-GPU run: rank 0 writes the video
            return None
        if return_result_tensor:
            return {"video": out.frames.float() / 255.0}
        if save:
            out.save(save_result_path)
        return {"video": None}


__all__ = ["LightX2VPipeline"]
