"""Configs: frozen dataclasses, parsed once at the edge.

- ``ModelConfig``: the DiT's hyper-parameters (named presets, or a model folder's ``config.json``).
- ``RunConfig``: a LightX2V JSON config (same keys), validated; keys we implement are mapped, keys we
  accept but do not act on give one warning naming them, anything else is an error.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import numbers
import os
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightx2v_engine.parallel import PARALLEL_KEYS, ParallelConfig
from lightx2v_engine.schedulers import MAX_SEED


# ----------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelConfig:
    """Wan2.1 DiT hyper-parameters (wan21.md §1)."""
    name: str
    model_type: str  # "t2v" or "i2v"
    dim: int
    ffn_dim: int
    num_heads: int
    num_layers: int
    in_dim: int = 16
    out_dim: int = 16
    text_dim: int = 4096
    text_len: int = 512
    freq_dim: int = 256
    image_dim: int = 1280       # CLIP width (I2V)
    image_tokens: int = 257     # CLIP tokens prepended to the text context (I2V)
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def is_i2v(self) -> bool:
        return self.model_type == "i2v"

    def __post_init__(self):
        if self.model_type not in ("t2v", "i2v"):
            raise ValueError(f"model_type must be 't2v' or 'i2v', got {self.model_type!r}")
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not a multiple of num_heads {self.num_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for RoPE")
        expected_in = 36 if self.is_i2v else 16
        if self.in_dim != expected_in and self.name != "custom":
            raise ValueError(f"{self.name}: in_dim {self.in_dim} does not fit model_type "
                             f"{self.model_type!r} (expected {expected_in})")


PRESETS: dict[str, ModelConfig] = {
    "wan2.1-t2v-1.3b": ModelConfig("wan2.1-t2v-1.3b", "t2v", 1536, 8960, 12, 30),
    "wan2.1-t2v-14b": ModelConfig("wan2.1-t2v-14b", "t2v", 5120, 13824, 40, 40),
    "wan2.1-i2v-14b-480p": ModelConfig("wan2.1-i2v-14b-480p", "i2v", 5120, 13824, 40, 40, in_dim=36),
    "wan2.1-i2v-14b-720p": ModelConfig("wan2.1-i2v-14b-720p", "i2v", 5120, 13824, 40, 40, in_dim=36),
    # Tiny graphs with the same structure, for tests and CPU demos (pair with the tiny T5/CLIP/VAE).
    "tiny": ModelConfig("tiny", "t2v", 256, 512, 2, 2, text_dim=64, image_dim=160),
    "tiny-i2v": ModelConfig("tiny-i2v", "i2v", 256, 512, 2, 2, in_dim=36, text_dim=64, image_dim=160,
                            image_tokens=5),  # (the tiny CLIP: 28 px in 14 px patches, + the class token)
}


def get_preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except (KeyError, TypeError):  # (TypeError: an unhashable name)
        raise ValueError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}") from None


def _read_json_object(path: Path, what: str) -> dict[str, Any]:
    """The JSON object in `path`; FileNotFoundError or ValueError naming the file (`what` says which)."""
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise ValueError(f"{what} {path} is a folder: give the JSON file") from None
    except (UnicodeDecodeError, PermissionError) as e:
        raise ValueError(f"{what} {path}: cannot be read as text ({e})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return raw


def model_config_from_json(path: str | Path, preset_hint: str | None = None) -> ModelConfig:
    """Reads a model folder's ``config.json`` (Wan's keys, or diffusers' transformer keys) and returns the
    matching ModelConfig: a known preset when the numbers match one, else a custom config."""
    path = Path(path)
    raw = _read_json_object(path, "model config")
    if "num_attention_heads" in raw:  # diffusers WanTransformer3DModel config
        heads = int(raw["num_attention_heads"])
        vals = dict(dim=heads * int(raw.get("attention_head_dim", 128)), ffn_dim=int(raw["ffn_dim"]),
                    num_heads=heads, num_layers=int(raw["num_layers"]), in_dim=int(raw.get("in_channels", 16)),
                    out_dim=int(raw.get("out_channels", 16)), text_dim=int(raw.get("text_dim", 4096)),
                    freq_dim=int(raw.get("freq_dim", 256)), eps=float(raw.get("eps", 1e-6)),
                    image_dim=int(raw.get("image_dim") or 1280))
        vals["model_type"] = "i2v" if raw.get("image_dim") else "t2v"
    else:
        missing = [k for k in ("dim", "ffn_dim", "num_heads", "num_layers") if k not in raw]
        if missing:
            raise ValueError(f"{path}: missing keys {missing} (expected Wan's config.json keys)")
        vals = dict(dim=int(raw["dim"]), ffn_dim=int(raw["ffn_dim"]), num_heads=int(raw["num_heads"]),
                    num_layers=int(raw["num_layers"]), in_dim=int(raw.get("in_dim", 16)),
                    out_dim=int(raw.get("out_dim", 16)), text_dim=int(raw.get("text_dim", 4096)),
                    freq_dim=int(raw.get("freq_dim", 256)), eps=float(raw.get("eps", 1e-6)),
                    text_len=int(raw.get("text_len", 512)))
        mt = raw.get("model_type", "i2v" if vals["in_dim"] == 36 else "t2v")
        if mt == "flf2v":
            raise ValueError(f"{path}: model_type 'flf2v' is not supported (t2v and i2v are)")
        vals["model_type"] = mt
    candidates = [p for p in PRESETS.values()
                  if all(getattr(p, k) == v for k, v in vals.items() if k in ("dim", "ffn_dim", "num_heads",
                                                                             "num_layers", "in_dim", "model_type"))]
    if candidates:
        if preset_hint and any(c.name == preset_hint for c in candidates):
            base = PRESETS[preset_hint]
        else:
            base = candidates[0]
        return dataclasses.replace(base, **{k: v for k, v in vals.items() if k in ("text_dim", "eps", "freq_dim")})
    return ModelConfig(name="custom", **vals)


# ----------------------------------------------------------------------------------------------------
# Run (LightX2V JSON)
# ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LoraSpec:
    path: str
    strength: float = 1.0


@dataclass(frozen=True)
class RunConfig:
    """One run's settings, from LightX2V's JSON keys (plus a few of ours, marked)."""
    infer_steps: int = 4
    denoising_step_list: tuple[int, ...] | None = (1000, 750, 500, 250)
    sample_shift: float = 5.0
    enable_cfg: bool = False
    sample_guide_scale: float = 5.0
    target_video_length: int = 81
    target_height: int = 480
    target_width: int = 832
    text_len: int = 512
    seed: int = 42
    fps: float = 16.0                   # frame rate of the written video (LightX2V: 16; 23.976 and the like too)
    lora_configs: tuple[LoraSpec, ...] = ()
    dit_original_ckpt: str | None = None
    dit_quantized: bool = False
    dit_quantized_ckpt: str | None = None
    dit_quant_scheme: str | None = None
    # LightX2V's weight_auto_quant: with dit_quantized, the unquantized DiT checkpoint (dit_original_ckpt or
    # the model folder's) is read and its blocks' linears quantized per output channel at load (LoRAs merge
    # before), instead of reading a quantized checkpoint
    weight_auto_quant: bool = False
    # Offload. cpu_offload: the DiT's weights stay in host memory; offload_granularity "block" (LightX2V's
    # default; "phase" runs as "block") streams its blocks through two device slots, "model" moves the
    # whole DiT in for the denoising loop and out after it. CUDA graphs are off while the DiT is offloaded.
    # t5/clip/vae_cpu_offload: that model's weights stay on the CPU between uses and move to the run device
    # for each use; each defaults to cpu_offload (as LightX2V; None: that default, also for a RunConfig
    # made in Python).
    cpu_offload: bool = False
    offload_granularity: str = "block"
    t5_cpu_offload: bool | None = None
    clip_cpu_offload: bool | None = None
    vae_cpu_offload: bool | None = None
    # unload_modules: the DiT, the text/image encoders and the VAE (or tiny decoder) are loaded from their
    # files for each use and freed after it (LightX2V's key: only the model in use holds memory, every
    # model is loaded for every video)
    unload_modules: bool = False
    # lazy_load: LightX2V streams the offloaded DiT's blocks from disk and, as under unload_modules, loads
    # every model per use. Here it does the latter; each DiT built is read whole.
    lazy_load: bool = False
    # LightX2V's 8-bit encoders: t5_quantized loads t5_quantized_ckpt, else models_t5_umt5-xxl-enc-{fp8,int8}.pth
    # (by t5_quant_scheme); clip_quantized likewise (models_clip_open-clip-xlm-roberta-large-vit-huge-14-{..}.pth
    # or clip-{..}.pth); their linears run as QuantLinear. Without that file the unquantized one runs (a warning).
    t5_quantized: bool = False
    t5_quant_scheme: str | None = None
    t5_quantized_ckpt: str | None = None
    clip_quantized: bool = False
    clip_quant_scheme: str | None = None
    clip_quantized_ckpt: str | None = None
    # Paths instead of the model folder's default files (absolute, or relative to the model folder).
    t5_original_ckpt: str | None = None
    clip_original_ckpt: str | None = None
    vae_path: str | None = None
    # Light autoencoders (LightX2V's keys). use_lightvae: the Wan VAE with 75% of its channels pruned
    # (lightvaew2_1, base width 24) decodes and I2V-encodes; vae_path names it (default lightvaew2_1.pth or
    # .safetensors in the model folder). use_tae: the TAEHV tiny decoder (tae.py) at tae_path (default
    # taew2_1.pth or .safetensors) decodes; I2V still encodes with the (light) Wan VAE, T2V loads none.
    # need_scaled: the tiny decoder takes raw VAE latents (LightX2V's lighttaew2_1); unset, true when the
    # file name contains "lighttae".
    use_lightvae: bool = False
    use_tae: bool = False
    tae_path: str | None = None
    need_scaled: bool | None = None
    sample_neg_prompt: str | None = None   # negative prompt under CFG when none is given (default: none, "")
    # LightX2V's: false drops the image branch of an I2V model (no CLIP, no image cross-attention); not
    # supported here: an I2V pipeline refuses it (Wan2.1's I2V models are trained with it); T2V ignores it
    use_image_encoder: bool = True
    self_attn_1_type: str = "flash_attn3"   # a name from ATTN_TYPES: sage_* -> the 8-bit kernel, else exact
    cross_attn_1_type: str = "flash_attn3"  # cross-attention is always exact (512/769 keys)
    cross_attn_2_type: str = "flash_attn3"
    # ours
    sampler: str = "distill"            # "distill" (4-step) or "unipc" (the many-step baseline)
    distill_update: str = "deterministic"  # "deterministic" (LightX2V) or "renoise" (Self-Forcing)
    dtype: str = "bf16"                 # "bf16" or "fp32"
    use_cuda_graph: bool = True
    vae_dtype: str = "bf16"             # VAE decode precision on CUDA
    use_tiling_vae: bool = False        # LightX2V's: VAE encode/decode in overlapping 256-pixel tiles (less memory)
    lora_strict: bool = True            # unmatched LoRA keys are an error (False: a warning)
    # LightX2V's: the config's LoRAs can be switched off or replaced later. The HTTP server then runs them as
    # the default per-request LoRAs (a request's lora_name replaces them, as LightX2V's server; a request
    # without one gets them back); elsewhere they merge at load as without it (LoRAs on 8-bit linears are
    # low-rank branches either way)
    lora_dynamic_apply: bool = False
    # LightX2V's multi-GPU section (parallel.py): sequence parallel (Ulysses, or k/v all-gather for "ring")
    # and CFG parallel, seq_p_size * cfg_p_size processes started by torchrun
    parallel: ParallelConfig = ParallelConfig()
    ignored_keys: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self):
        for key in ("t5_cpu_offload", "clip_cpu_offload", "vae_cpu_offload"):
            if getattr(self, key) is None:
                object.__setattr__(self, key, bool(self.cpu_offload))

    @property
    def attn_8bit(self) -> bool:
        """Self-attention through the INT8 q k^T / FP8 P.V kernel (LightX2V's SageAttention-2 names)."""
        return self.self_attn_1_type in ATTN_8BIT

    @property
    def num_latent_frames(self) -> int:
        return (self.target_video_length - 1) // 4 + 1

    def latent_shape(self) -> tuple[int, int, int, int]:
        return (16, self.num_latent_frames, self.target_height // 8, self.target_width // 8)


# LightX2V's attention names. Exact kernels all run our exact attention; the SageAttention names run the
# 8-bit kernel (sage_attn3 is FP4 on Blackwell in LightX2V: the nearest here is 8-bit); the sparse and
# radial ones are accepted and run dense exact attention (a warning says so).
ATTN_EXACT = ("flash_attn2", "flash_attn3", "flash_attn4", "torch_sdpa", "flex_attn")
ATTN_8BIT = ("sage_attn2", "sage_attn2_k_int8_v_fp8", "sage_attn3")
ATTN_DENSE_FALLBACK = ("spas_flash_attn4", "spas_sage_attn2", "spas_sage_attn3", "radial_attn", "nbhd_attn", "sla_attn",
                       "ssta_attn_hyflex",
                       "nbhd_attn_flashinfer", "svg_attn", "svg2_attn", "sparge_attn", "sol_attn", "draft_attn",
                       "dynamic_sparse_attn", "general_sparse_attn", "rainfusion_attn")
ATTN_TYPES = ATTN_EXACT + ATTN_8BIT + ATTN_DENSE_FALLBACK

# Keys mapped onto RunConfig fields (LightX2V name -> field). Same name unless noted.
_MAPPED = {f.name for f in dataclasses.fields(RunConfig)} - {"ignored_keys"}

# Keys LightX2V configs carry that this engine accepts but does not act on (one warning names them).
_ACCEPTED_IGNORED = {
    "attention_type", "attn_type",
    "offload_ratio", "num_disk_workers",
    "seq_parallel", "cfg_parallel", "feature_caching", "teacache_thresh", "use_ret_steps",
    "use_stream_vae",
    "cfg_scale", "rope_type", "modulate_type", "rms_norm_type",
    "layer_norm_type", "use_compile", "compile_shapes", "model_cls", "task",
    "return_result_tensor", "sample_solver",
    "use_prompt_enhancer", "clean_cuda_cache", "rotary_chunk",
    "rotary_chunk_size", "audio_sr", "changing_resolution",
    "resolution_rate", "enable_cfg_parallel", "infer_dtype", "sensitive_layer_dtype", "cpu_offload_activations",
    "lora_merge_force_fp32", "coefficients", "max_area", "do_mm_calib",
    "use_bfloat16", "warmup", "t5_offload_granularity", "changing_resolution_steps",
    # host-memory layout and device knobs that do not change the computation
    "shared_cpu_weights", "shared_cpu_weight_scope", "shared_cpu_weight_backend", "shared_cpu_weight_strict_numa",
    "shared_cpu_weight_register_chunk_mb", "cpu_offload_layout", "scheduler_coefficient_device", "t5_rms_norm_type",
    "sub_servers", "use_event_offload", "t5_lazy_load", "offload_use_block_slab", "load_from_rank0",
}
# sparse-attention settings (dense exact attention runs; the attention names warn) and feature-caching
# parameters (no feature caching here): accepted, each group with its note
_SPARSE_SETTINGS = {"draft_attn_sparsity_ratio", "nbhd_attn_setting", "sla_attn_setting", "general_sparse_attn_setting",
                    "rainfusion_attn_setting", "sol_attn_setting", "sparge", "sparge_ckpt", "sparge_attn_setting",
                    "spas_sage_attn2_setting", "spas_sage_attn3_setting", "spas_flash_attn4_setting",
                    "svg_sample_mse_max_row", "svg_num_sampled_rows", "svg_context_length", "svg_sparsity"}
_CACHING_PARAMS = {"residual_diff_threshold", "downsample_factor", "magcache_K", "magcache_thresh",
                   "magcache_retention_ratio", "magcache_ratios", "teacache_cache_target", "teacache_log_cache_stats",
                   "coefficients", "teacache_thresh", "use_ret_steps"}
_ACCEPTED_IGNORED |= _SPARSE_SETTINGS | _CACHING_PARAMS
# What the engine does instead, for ignored keys where that is worth saying (appended in the warning).
_IGNORED_NOTES = {
    "lora_merge_force_fp32": "LoRA merges always run in fp32 here",
    "use_bfloat16": "the DiT's precision is the 'dtype' key, bf16 by default",
    "warmup": "CUDA graphs are captured on the first call per shape",
    "t5_offload_granularity": "t5_cpu_offload always streams the umT5 block by block",
    "offload_plan.resident_blocks": "an offloaded DiT streams all of its blocks",
    "offload_plan.use_event_offload": "the block stream is ordered by CUDA events anyway",
    "use_event_offload": "the block stream is ordered by CUDA events anyway",
    "offload_plan.use_block_slab": "each offloaded block is one page-locked host buffer anyway",
    "offload_use_block_slab": "each offloaded block is one page-locked host buffer anyway",
    "t5_lazy_load": "umT5's weights stay in host memory (t5_cpu_offload streams them block by block; lazy_load "
                    "builds every model per use)",
    "shared_cpu_weights": "each process keeps its own host copy of offloaded weights (under torchrun with "
                          "cpu_offload: one per rank, not one per host)",
    **{k: "sparse attention is not implemented: dense exact attention runs" for k in _SPARSE_SETTINGS},
    **{k: "no feature caching" for k in _CACHING_PARAMS},
    "changing_resolution_steps": "the whole run is at the target resolution",
    "sub_servers": "every model runs in this process",
    "load_from_rank0": "under torchrun each rank reads the DiT and VAE files itself (the same weights as a "
                       "broadcast from rank 0); the text/image encoders load on rank 0 only",
    "offload_ratio": "an offloaded DiT streams all of its blocks",
    "seq_parallel": "derived from parallel.seq_p_size",
    "cfg_parallel": "derived from parallel.cfg_p_size",
}

# Keys whose true value asks for something this engine cannot do: an error, not a warning.
# (key -> what is supported instead); false is accepted.
_UNSUPPORTED_IF_TRUE = {
    "magcache_calibration": "a MagCache calibration run measures feature-caching ratios; lightx2v-engine has no "
                            "feature caching, so there is nothing to calibrate (set it to false)",
    "dummy_model": "LightX2V's dummy_model builds models without reading their files; here that is "
                   "--random-weights with --preset (Pipeline.random); set it to false",
    "enable_dynamic_cfg": "dynamic CFG adds a guidance embedding (guidance_embedding.linear_1/2) to the DiT, which "
                          "lightx2v-engine does not implement; set it to false (cfg_scale then has no effect), or "
                          "use enable_cfg with sample_guide_scale for classifier-free guidance",
}

# Wan2.2 (TI2V, MoE) settings: only Wan2.1's values (which change nothing) are accepted, silently.
_w22 = "is Wan2.2's (TI2V / MoE), which lightx2v-engine does not support: Wan2.1 has "
_WAN21_ONLY = {
    "vae_stride": (([4, 8, 8], (4, 8, 8)), _w22 + "[4, 8, 8]"),
    "patch_size": (([1, 2, 2], (1, 2, 2)), _w22 + "[1, 2, 2]"),
    "num_channels_latents": ((16,), _w22 + "16"),
    "boundary": ((), "the MoE boundary " + _w22 + "one DiT"),
    "boundary_step_index": ((), "the MoE boundary " + _w22 + "one DiT"),
}

# Keys whose value asks for something else than what this engine does: key -> (the values accepted, why).
_ONLY_VALUES = {
    "use_31_block": ((True, None), "Wan2.1's image tokens are the CLIP tower's 31st block output (LightX2V's "
                                   "default); use_31_block false (all 32 blocks) is not supported"),
    "resize_mode": ((None,), "I2V images are resized by Wan2.1's area rule (LightX2V's resize_mode null); other "
                             "resize modes are not supported"),
}

# Keys of LightX2V features this engine does not have, with what to say (an error whatever the value,
# instead of an "unknown key" hint pointing at a look-alike key).
_cv = "CausVid (autoregressive Wan, LightX2V's causvid model classes) is not supported"
_sf = "self-forcing autoregressive Wan (model_cls wan2.1_sf) is not supported"
_lt = "the LTX-2 upsampler bridge (changing_resolution with an LTX-2 upsampler) is not supported"
_UNSUPPORTED_FEATURES = {
    "disagg_mode": "disaggregated serving (encoder, transformer and decoder on separate nodes) is not supported: "
                   "one process runs the whole pipeline",
    "disagg_config": "disaggregated serving is not supported: one process runs the whole pipeline",
    "video_frame_interpolation": "frame interpolation (RIFE) is not implemented: the video has the sampled frames",
    "num_frame_per_block": _cv, "num_blocks": _cv, "frame_seq_length": _cv,
    "ar_config": _sf, "causal_rope_type": _sf, "sf_config": _sf,
    # older LightX2V's sequence-parallel switches (all torchrun ranks): the parallel section says it now
    "parallel_attn_type": "older LightX2V's sequence parallelism: write it as the parallel section, e.g. "
                          "\"parallel\": {\"seq_p_size\": <torchrun's process count>, \"seq_p_attn_type\": "
                          "\"ulysses\"} (or \"ring\")",
    "parallel_vae": "older LightX2V's parallel VAE: the parallel section's vae_parallel (true by default)",
    "ltx2_cpu_offload": _lt, "ltx2_vae_ckpt": _lt, "ltx2_upsampler_ckpt": _lt,
}

# offload_plan keys LightX2V's runners read and this engine does not act on (each one's note below)
_PLAN_KEYS_IGNORED = ("resident_blocks", "use_event_offload", "use_block_slab")

# LightX2V's model classes this engine runs (the CLI's --model_cls choices)
MODEL_CLASSES = ("wan2.1", "wan2.1_distill")


def check_model_cls(model_cls: str, who: str = "") -> None:
    """A ValueError naming `model_cls` unless this engine runs it."""
    if model_cls not in MODEL_CLASSES:
        raise ValueError(f"{who}model_cls {model_cls!r} is not supported by lightx2v-engine; choose one of "
                         f"{list(MODEL_CLASSES)} (Wan2.1 T2V/I2V; wan2.1_distill runs the step-distilled 4-step "
                         f"models)")

# Other LightX2V spellings of RunConfig fields: alias -> the fields it spells. Newer configs' video size
# (they also run the step-distilled models under model_cls wan2.1 with distill_method "dmd2"); older
# runners' tiny-decoder keys (use_tiny_vae / tiny_vae_path, the gradio app's tiny_vae).
_NEW_SPELLINGS = {"num_frames": ("target_video_length",), "size": ("target_height", "target_width"),
                  "use_tiny_vae": ("use_tae",), "tiny_vae": ("use_tae",), "tiny_vae_path": ("tae_path",)}
# Keys read by parse_run_config itself besides the RunConfig fields
_READ_TOO = ("scheduler_type", "offload_plan", "distill_method", "mm_config", *_NEW_SPELLINGS)


def _new_schema_keys(vals: dict[str, Any]) -> None:
    """Maps _NEW_SPELLINGS onto their fields in place; both spellings with different values are an error."""
    for alias, keys in _NEW_SPELLINGS.items():
        v = vals.pop(alias, None)
        if v is None:
            continue
        if len(keys) == 1:
            parts = [(alias, keys[0], v)]
        elif not isinstance(v, (list, tuple)) or len(v) != len(keys):
            raise _err(alias, v, "expected [height, width]")
        else:
            parts = [(f"{alias}[{i}]", key, x) for i, (key, x) in enumerate(zip(keys, v))]
        for name, key, x in parts:
            if vals.get(key) is not None and vals[key] != x:
                raise _err(name, x, f"disagrees with {key} = {vals[key]!r} (the same setting, two spellings)")
            vals[key] = x


# LightX2V's Wan schedulers: "WanScheduler" is UniPC, "WanStepDistillScheduler" the 4-step distill sampler
# (the one "wan2.1_distill" always runs); only read under model_cls "wan2.1".
SCHEDULER_TYPES = ("WanScheduler", "WanStepDistillScheduler")

_CHOICES = {
    "sampler": ("distill", "unipc"),
    "distill_update": ("deterministic", "renoise"),
    "dtype": ("bf16", "fp32"),
    "vae_dtype": ("bf16", "fp32"),
    "offload_granularity": ("block", "phase", "model"),
}


def _err(key: str, value: Any, why: str) -> ValueError:
    return ValueError(f"config key {key!r} = {value!r}: {why}")


def distill_step_list(n: int) -> tuple[int, ...]:
    """The distill sampler's timesteps for n steps when a config gives no denoising_step_list (newer
    LightX2V's rule): 1000 - i for i in range(0, 1000, 1000 // n), first n. n = 4 gives the default
    (1000, 750, 500, 250); equal to ComfyUI's "simple" schedule only where n divides 1000 (n = 6: 834, 668, ...
    here, 834, 667, ... there)."""
    if n > 1000:
        raise _err("infer_steps", n, "at most 1000 distill steps")
    return tuple(1000 - i for i in range(0, 1000, 1000 // n))[:n]


def _as(key: str, value: Any, typ: type):
    """`value` as `typ` (bool, int, float, str): JSON's values, and numpy's scalars from Python callers
    (np.True_, np.int64, np.float64; a whole float counts as an integer); never a bool as a number."""
    if typ is bool:
        if not isinstance(value, (bool, _np_bool())):
            raise _err(key, value, "expected true/false")
        return bool(value)
    number = isinstance(value, numbers.Real) and not isinstance(value, (bool, _np_bool()))
    if typ is int:
        if not (number and (isinstance(value, numbers.Integral) or float(value).is_integer())):
            raise _err(key, value, "expected an integer")
        return int(value)
    if typ is float:
        if not number or not math.isfinite(value):
            raise _err(key, value, "expected a finite number")
        return float(value)
    if typ is str:
        if not isinstance(value, str):
            raise _err(key, value, "expected a string")
        return value
    raise TypeError(typ)


def _np_bool() -> type:
    """numpy's bool scalar type (np.bool_), or bool where numpy is not installed."""
    np = sys.modules.get("numpy")
    return np.bool_ if np is not None else bool


_TYPES = {
    "infer_steps": int, "sample_shift": float, "enable_cfg": bool, "sample_guide_scale": float,
    "target_video_length": int, "target_height": int, "target_width": int, "text_len": int, "seed": int,
    "fps": float, "dit_quantized": bool, "cpu_offload": bool, "t5_cpu_offload": bool, "clip_cpu_offload": bool,
    "vae_cpu_offload": bool, "sampler": str, "distill_update": str, "dtype": str, "use_cuda_graph": bool,
    "vae_dtype": str, "lora_strict": bool, "lora_dynamic_apply": bool, "offload_granularity": str, "use_tiling_vae": bool,
    "t5_quantized": bool, "clip_quantized": bool, "use_lightvae": bool, "use_tae": bool, "need_scaled": bool,
    "unload_modules": bool, "lazy_load": bool, "weight_auto_quant": bool, "use_image_encoder": bool,
}


# unknown keys with a known place: a key of the parallel section at the top level, a CLI flag or request
# field in a config, offload spellings whose nearest key by letters is the wrong one
_PLACES = {
    **{k: f"a key of the \"parallel\" section: {{\"parallel\": {{\"{k}\": ...}}}}" for k in PARALLEL_KEYS},
    **{f"{m}_offload": f"did you mean '{m}_cpu_offload'?" for m in ("t5", "clip", "vae")},
    **{k: "LoRAs go in \"lora_configs\": [{\"path\": ..., \"strength\": ...}]"
       for k in ("lora_path", "lora_strength", "lora_name", "lora_dir", "loras")},
    **{k: f"a command-line flag (--{k}) or request field, not a config key"
       for k in ("prompt", "negative_prompt", "image_path", "last_frame_path", "save_result_path", "model_path",
                 "config_json", "target_shape", "prompt_enhancer")},
}


def _unknown_key_hint(key: str) -> str:
    """`key` quoted, with where it belongs or the nearest key: the keys acted on first (a nearest key that is
    accepted and ignored would turn a typo into a silent no-op), then the others."""
    if key in _PLACES:
        return f"{key!r} ({_PLACES[key]})"
    others = _ACCEPTED_IGNORED | set(_UNSUPPORTED_IF_TRUE) | set(_READ_TOO) | set(_ONLY_VALUES)
    close = (difflib.get_close_matches(key, sorted(_MAPPED | set(_READ_TOO)), n=1)
             or difflib.get_close_matches(key, sorted(others), n=1))
    return f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else "")


def parse_run_config(raw: dict[str, Any], *, model_cls: str | None = None, source: str = "config",
                     warn: bool = True) -> RunConfig:
    """Validates a LightX2V-style dict and returns a RunConfig.

    `model_cls` ("wan2.1" or "wan2.1_distill") picks the sampler when the config's ``sampler`` does not,
    as LightX2V: "wan2.1" runs the UniPC sampler (``infer_steps``, default 50; a ``denoising_step_list`` is
    ignored with a warning) unless ``scheduler_type`` is "WanStepDistillScheduler"; the distill model
    classes run the step list.
    """
    if not isinstance(raw, dict):
        raise ValueError(f"{source}: expected a JSON object, got {type(raw).__name__}")
    if model_cls is not None:
        check_model_cls(model_cls)
    vals: dict[str, Any] = {}
    ignored, unknown = [], []
    for key, value in raw.items():
        if key in _UNSUPPORTED_FEATURES:
            raise _err(key, value, _UNSUPPORTED_FEATURES[key])
        if key in _WAN21_ONLY:  # (Wan2.2's TI2V / MoE settings: Wan2.1's values only, which change nothing)
            ok, why = _WAN21_ONLY[key]
            if value is not None and value not in ok:
                raise _err(key, value, why)
            continue
        if key == "sample_guide_scale" and isinstance(value, (list, tuple)):
            raise _err(key, value, "two guidance scales are Wan2.2 MoE's (its high- and low-noise experts): "
                                   "Wan2.1 takes one number; Wan2.2 is not supported by lightx2v-engine")
        if key in _ONLY_VALUES:
            ok, why = _ONLY_VALUES[key]
            if not any(value is v for v in ok):
                raise _err(key, value, why)
        elif key in _UNSUPPORTED_IF_TRUE:
            if value is not None and _as(key, value, bool):
                raise _err(key, value, _UNSUPPORTED_IF_TRUE[key])
        elif key in _MAPPED or key in _READ_TOO:
            vals[key] = value
        elif key in _ACCEPTED_IGNORED:
            if not (key == "feature_caching" and value in (None, "NoCaching")):  # (what runs anyway)
                ignored.append(key)
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"{source}: unknown config key(s): {', '.join(_unknown_key_hint(k) for k in unknown)}")

    if raw.get("t5_offload_granularity") not in (None, "model", "block"):
        raise _err("t5_offload_granularity", raw["t5_offload_granularity"], "expected 'model' or 'block'")
    _new_schema_keys(vals)
    _mm_config(vals, ignored, source, warn)
    plan = vals.pop("offload_plan", None)
    if plan is not None:  # newer LightX2V: {offload_granularity, resident_blocks, use_event_offload}; it wins
        if not isinstance(plan, dict):
            raise _err("offload_plan", plan, "expected an object with offload_granularity (resident_blocks, "
                                             "use_event_offload)")
        # LightX2V's get_offload_plan: the plan wins wholly, its granularity "block" when it has none; its
        # other keys are read by its runners only (accepted with a warning; another key is a typo: an error)
        extra = set(plan) - {"offload_granularity", *_PLAN_KEYS_IGNORED}
        if extra:
            raise _err("offload_plan", plan, f"unknown keys {sorted(extra)} (it takes offload_granularity, "
                                             f"{', '.join(_PLAN_KEYS_IGNORED)})")
        g = plan.get("offload_granularity", "block")
        if g not in _CHOICES["offload_granularity"]:
            raise _err("offload_plan.offload_granularity", g, f"expected one of {list(_CHOICES['offload_granularity'])}")
        top = vals.get("offload_granularity")
        if top is not None and top != g and warn:
            warn_user(f"{source}: offload_granularity {top!r} is overridden by offload_plan (granularity {g!r}"
                      f"{'' if 'offload_granularity' in plan else ', its default'}), as in LightX2V")
        vals["offload_granularity"] = g
        ignored += [f"offload_plan.{k}" for k in sorted(set(plan) - {"offload_granularity"}) if plan.get(k)]

    out: dict[str, Any] = {}
    for key, typ in _TYPES.items():
        if key in vals and vals[key] is not None:
            out[key] = _as(key, vals[key], typ)
    for key in ("dit_original_ckpt", "dit_quantized_ckpt", "dit_quant_scheme", "t5_original_ckpt",
                "t5_quant_scheme", "t5_quantized_ckpt", "clip_quant_scheme", "clip_quantized_ckpt",
                "clip_original_ckpt", "vae_path", "tae_path", "sample_neg_prompt"):
        if vals.get(key) is not None:
            out[key] = _as(key, vals[key], str)
            if not out[key].strip() and key != "sample_neg_prompt":  # ("" is an empty negative prompt)
                raise _err(key, out[key], "must not be empty")
    for key in ("t5_cpu_offload", "clip_cpu_offload", "vae_cpu_offload"):  # LightX2V: default to cpu_offload
        out.setdefault(key, out.get("cpu_offload", False))
    dense = []
    for key in ("self_attn_1_type", "cross_attn_1_type", "cross_attn_2_type"):
        if vals.get(key) is not None:
            name = _as(key, vals[key], str)
            if name not in ATTN_TYPES:
                close = difflib.get_close_matches(name, ATTN_TYPES, n=1)
                raise _err(key, name, f"unknown attention type (did you mean {close[0]!r}?)" if close
                           else f"unknown attention type; known: {list(ATTN_TYPES)}")
            if name in ATTN_DENSE_FALLBACK:
                dense.append(f"{key}={name}")
            out[key] = name
    for key, choices in _CHOICES.items():
        if key in out and out[key] not in choices:
            raise _err(key, out[key], f"expected one of {list(choices)}")

    steps_given = "denoising_step_list" in vals
    if steps_given and vals["denoising_step_list"] is not None:
        lst = vals["denoising_step_list"]
        if not isinstance(lst, (list, tuple)) or not lst:
            raise _err("denoising_step_list", lst, "expected a non-empty list of integers")
        steps = tuple(_as("denoising_step_list", s, int) for s in lst)
        if any(not 0 < s <= 1000 for s in steps):
            raise _err("denoising_step_list", list(lst), "every step must lie in (0, 1000]")
        if any(a <= b for a, b in zip(steps, steps[1:])):
            raise _err("denoising_step_list", list(lst), "steps must be strictly decreasing")
        out["denoising_step_list"] = steps
    elif steps_given:
        out["denoising_step_list"] = None

    scheduler_type = vals.get("scheduler_type")
    if scheduler_type is not None:
        scheduler_type = _as("scheduler_type", scheduler_type, str)
        if scheduler_type not in SCHEDULER_TYPES:
            raise _err("scheduler_type", scheduler_type, f"expected one of {list(SCHEDULER_TYPES)}")
    distill_method = vals.get("distill_method")
    if distill_method is not None and distill_method != "dmd2":
        raise _err("distill_method", distill_method, "lightx2v-engine runs the DMD step-distilled Wan2.1 models "
                                                     "(\"dmd2\"); mean-flow distillation is not implemented")
    if "sampler" not in out:
        if model_cls == "wan2.1" and scheduler_type != "WanStepDistillScheduler" and distill_method is None:
            out["sampler"] = "unipc"
            if steps_given and vals["denoising_step_list"] is not None and warn:
                warn_user(f"{source}: model_cls wan2.1 runs the UniPC sampler for infer_steps="
                          f"{out.get('infer_steps', 50)}; denoising_step_list is used by wan2.1_distill, or with "
                          f"scheduler_type 'WanStepDistillScheduler' (as LightX2V)")
        else:
            out["sampler"] = "distill"
    if out["sampler"] == "distill":
        lst = out.get("denoising_step_list")
        if lst is None and "denoising_step_list" in out:
            raise _err("denoising_step_list", None, "the distill sampler needs a step list")
        if lst is None:  # (as one LightX2V variant: the step list from infer_steps, ComfyUI's "simple" timesteps;
            # upstream LightX2V requires the list)
            n = out.get("infer_steps", len(RunConfig.denoising_step_list))
            if n < 1:
                raise _err("infer_steps", n, "must be >= 1")
            lst = out["denoising_step_list"] = distill_step_list(n)
        elif out.get("infer_steps", len(lst)) != len(lst) and warn:
            # (LightX2V's distill scheduler runs the list and overrides infer_steps, with a warning)
            warn_user(f"{source}: infer_steps={out['infer_steps']} does not match the {len(lst)} steps of "
                      f"denoising_step_list {list(lst)}: the list runs (as in LightX2V); for a "
                      f"{out['infer_steps']}-step UniPC run use model_cls wan2.1")
        out["infer_steps"] = len(lst)
    else:
        out.setdefault("infer_steps", 50)
        if "enable_cfg" not in out and warn:
            # LightX2V's default (set_config.get_default_config): the same file runs the same computation here
            warn_user(f"{source}: no enable_cfg: classifier-free guidance is off (LightX2V's default); Wan's "
                      f"{out['infer_steps']}-step UniPC sampler is normally run with \"enable_cfg\": true and a "
                      f"sample_guide_scale of 5-6")

    if out.get("infer_steps", 1) < 1:
        raise _err("infer_steps", out["infer_steps"], "must be >= 1")
    if out.get("enable_cfg") and out.get("sample_guide_scale", RunConfig.sample_guide_scale) == 1.0 and warn:
        warn_user(f"{source}: enable_cfg with sample_guide_scale 1: the unconditional pass is computed and has no "
                  f"effect (v_u + 1 * (v_c - v_u) = v_c), as in LightX2V; set enable_cfg false to halve the DiT work")
    if out.get("sample_shift", 1.0) <= 0:
        raise _err("sample_shift", out["sample_shift"], "must be > 0")
    for key in ("target_height", "target_width"):
        if key in out and (out[key] <= 0 or out[key] % 16):
            raise _err(key, out[key], "must be a positive multiple of 16")
    if "target_video_length" in out:
        t = out["target_video_length"]
        if t < 1 or (t - 1) % 4:
            near = " or ".join(str(v) for v in sorted({max(1, (t - 1) // 4 * 4 + 1), max(1, (t + 2) // 4 * 4 + 1)}))
            raise _err("target_video_length", t, f"frame count must be 4k+1 (1, 5, ..., 81): the VAE maps 4k+1 "
                                                 f"frames to k+1 latents; nearest: {near}"
                                                 + (f" (LightX2V makes {(t - 1) // 4 * 4 + 1} for T2V silently, "
                                                    f"{t // 4 * 4 + 1} for I2V with a warning)" if t > 1 else ""))
    if "text_len" in out and not 1 <= out["text_len"] <= 512:
        raise _err("text_len", out["text_len"], "must lie in [1, 512]")
    if "fps" in out and not MIN_FPS <= out["fps"] <= MAX_FPS:  # (ffmpeg failed after the run on 1e-6 or 1e12)
        raise _err("fps", out["fps"], f"the written video's frame rate must lie in [{MIN_FPS}, {MAX_FPS}]")
    if out.get("dit_quantized") and out.get("dit_quant_scheme") is None:
        raise _err("dit_quant_scheme", None, "required when dit_quantized is true")
    if warn and not out.get("dit_quantized"):
        unread = (["dit_quantized_ckpt"] if out.get("dit_quantized_ckpt") else []) + (
            ["weight_auto_quant"] if out.get("weight_auto_quant") else [])
        if unread:  # (as in LightX2V: they are read with dit_quantized only)
            warn_user(f"{source}: {', '.join(unread)} set but dit_quantized is not true: the DiT loads unquantized "
                      f"(set \"dit_quantized\": true to use them)")
    for enc, name in (("t5", "umT5"), ("clip", "CLIP")):
        if warn and out.get(f"{enc}_quantized_ckpt") and not out.get(f"{enc}_quantized"):
            warn_user(f"{source}: {enc}_quantized_ckpt set but {enc}_quantized is not true: the unquantized {name} "
                      f"loads (set \"{enc}_quantized\": true with {enc}_quant_scheme to use it)")
    if warn and out.get("dit_quantized") and out.get("weight_auto_quant") and out.get("dit_quantized_ckpt"):
        warn_user(f"{source}: weight_auto_quant quantizes the unquantized DiT checkpoint at load: "
                  f"dit_quantized_ckpt ({out['dit_quantized_ckpt']}) is not read")
    if out.get("dit_quantized"):
        from lightx2v_engine.quant import parse_quant_scheme
        try:
            parse_quant_scheme(out["dit_quant_scheme"])
        except ValueError as e:
            raise _err("dit_quant_scheme", out["dit_quant_scheme"], str(e)) from None
    if "seed" in out and not 0 <= out["seed"] < MAX_SEED:
        raise _err("seed", out["seed"], "must be an integer in [0, 2^64)")
    for enc in ("t5", "clip"):
        if out.get(f"{enc}_quantized"):
            key = f"{enc}_quant_scheme"
            if out.get(key) is None:
                raise _err(key, None, f"required when {enc}_quantized is true (e.g. 'fp8-sgl', 'int8-vllm')")
            from lightx2v_engine.quant import parse_quant_scheme
            try:
                parse_quant_scheme(out[key])
            except ValueError as e:
                raise _err(key, out[key], str(e)) from None

    if "parallel" in vals:
        from lightx2v_engine.parallel import parse_parallel
        out["parallel"], notes = parse_parallel(vals["parallel"], source, warn)
        if notes and warn:
            warn_user(f"{source}: accepted but not acted on by lightx2v-engine: {', '.join(notes)}")

    if "lora_configs" in vals and vals["lora_configs"] is not None:
        loras = vals["lora_configs"]
        if not isinstance(loras, (list, tuple)):
            raise _err("lora_configs", loras, "expected a list of {path, strength}")
        specs = []
        for i, item in enumerate(loras):
            if not isinstance(item, dict) or "path" not in item:
                raise _err(f"lora_configs[{i}]", item, "expected an object with 'path' (and 'strength')")
            extra = set(item) - {"path", "strength", "name"}
            if extra:
                raise _err(f"lora_configs[{i}]", item, f"unknown keys {sorted(extra)}")
            specs.append(LoraSpec(_as(f"lora_configs[{i}].path", item["path"], str),
                                  _as(f"lora_configs[{i}].strength", item.get("strength", 1.0), float)))
        out["lora_configs"] = tuple(specs)

    if dense and warn:
        warn_user(f"{source}: sparse attention is not implemented; dense exact attention runs for "
                  f"{', '.join(dense)}")
    if out.get("cpu_offload") and out.get("offload_granularity") == "phase" and warn:
        warn_user(f"{source}: offload_granularity 'phase' runs as 'block' in lightx2v-engine (whole blocks stream "
                  f"through two device slots; phase granularity would save about one block of device memory)")
    if out.get("lazy_load") and warn:
        warn_user(f"{source}: lazy_load loads every model per use (as unload_modules); the DiT's "
                  f"blocks are not streamed from disk: each DiT built is read whole (into host memory with cpu_offload)")
    if out.get("use_tae") and out.get("use_tiling_vae") and warn:
        warn_user(f"{source}: use_tiling_vae does not apply to the tiny decoder (use_tae), which streams frames "
                  f"in chunks; it still tiles I2V's image encode")
    unused = [k for k in ("tae_path", "need_scaled") if out.get(k) is not None]
    if unused and not out.get("use_tae") and warn:
        warn_user(f"{source}: {', '.join(unused)} have no effect without use_tae (the Wan VAE decodes)")
    if ignored and warn:
        names = [k + (f" ({_IGNORED_NOTES[k]})" if k in _IGNORED_NOTES else "") for k in sorted(ignored)]
        warn_user(f"{source}: accepted but not acted on by lightx2v-engine: {', '.join(names)}")
    return RunConfig(**out, ignored_keys=tuple(sorted(ignored)))


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
# decorator wrappers between an engine function and its caller (torch.no_grad's): skipped as the engine's own
_DECORATOR_FILES = (os.path.join("torch", "utils", "_contextlib.py"),)


# older LightX2V's mm_config.mm_type names of the per-channel 8-bit schemes:
# W-{fp8|int8}-channel-sym-A-{same}-channel-sym-dynamic-{Vllm|Sgl|Q8F|Torchao}[-Act{...}]
_MM_TYPE = re.compile(r"W-(fp8|int8)-channel-sym-A-\1-channel-sym-dynamic-(Vllm|Sgl|Q8F|Torchao|Triton)(-Act\w+)?")


def _mm_config(vals: dict[str, Any], ignored: list[str], source: str = "config", warn: bool = True) -> None:
    """Older LightX2V's ``mm_config: {mm_type, weight_auto_quant}`` onto dit_quantized / dit_quant_scheme /
    weight_auto_quant in place; a top-level key (or an override: the CLI's, the server's, enable_quantize)
    that says otherwise wins, with a warning."""
    mm = vals.pop("mm_config", None)
    if mm is None or mm == {}:
        return
    if not isinstance(mm, dict):
        raise _err("mm_config", mm, "expected an object such as {\"mm_type\": "
                                    "\"W-fp8-channel-sym-A-fp8-channel-sym-dynamic-Vllm\", \"weight_auto_quant\": true}")
    mm_type = mm.get("mm_type", "Default")
    implied: dict[str, Any] = {}
    if mm_type in (None, "Default"):
        implied["dit_quantized"] = False
    else:
        m = _MM_TYPE.fullmatch(mm_type) if isinstance(mm_type, str) else None
        if m is None:
            raise _err("mm_config.mm_type", mm_type, "lightx2v-engine runs the per-channel 8-bit schemes "
                       "(W-fp8-channel-sym-A-fp8-channel-sym-dynamic-Vllm / -Sgl / -Q8F / -Torchao, the int8 ones "
                       "alike) or \"Default\"; newer configs say dit_quantized + dit_quant_scheme")
        implied.update(dit_quantized=True, dit_quant_scheme=f"{m.group(1)}-{m.group(2).lower()}")
    if "weight_auto_quant" in mm:
        implied["weight_auto_quant"] = mm["weight_auto_quant"]
    from lightx2v_engine.quant import parse_quant_scheme
    for key, value in implied.items():
        if vals.get(key) is None:
            vals[key] = value
            continue
        same = vals[key] == value
        if key == "dit_quant_scheme" and not same:  # ("fp8" and mm_type's "fp8-vllm": the same format)
            try:
                same = parse_quant_scheme(vals[key]) == parse_quant_scheme(value)
            except ValueError:
                pass
        if not same and not (key == "dit_quantized" and value is False) and warn:  # the newer top-level key
            warn_user(f"{source}: {key} {vals[key]!r} is used over mm_config's {value!r} (mm_config {mm})")  # wins
    ignored += [f"mm_config.{k}" for k in sorted(set(mm) - {"mm_type", "weight_auto_quant"})]


def warn_user(message: str, category: type[Warning] = UserWarning) -> None:
    """warnings.warn attributed to the first caller outside this package (the user's script, test or the
    CLI's entry point), not to the engine's own frames that parse the config."""
    level, frame = 1, sys._getframe(0)
    while frame is not None and (os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE_DIR)
                                 or frame.f_code.co_filename.endswith(_DECORATOR_FILES)):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


# the frame rates a written video may have (ffmpeg takes these in .mp4, .mov and .mkv; 1e-6 rounded to 0)
MIN_FPS, MAX_FPS = 0.01, 1000.0

# The tiny presets' video size where a config does not give one (a tiny model at Wan's 81 x 480 x 832 is
# minutes of CPU time for a random-weights smoke test)
TINY_SIZE = {"target_video_length": 9, "target_height": 64, "target_width": 96}


def with_defaults(raw: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """raw plus each key of `defaults` that raw sets under no spelling (num_frames / size count)."""
    given = set(raw) | {k for alias, keys in _NEW_SPELLINGS.items() if alias in raw for k in keys}
    return {**{k: v for k, v in defaults.items() if k not in given}, **raw}


def check_run_config(run: RunConfig, *, model_cls: str | None = None) -> RunConfig:
    """A RunConfig made in Python, validated as its keys would be from a file (a frozen dataclass does not
    check its fields: RunConfig(enable_cfg="false") ran CFG, sampler="unpic" the distill sampler): every
    field goes through parse_run_config as a key. Returns the parsed config (equal to `run` when consistent;
    e.g. infer_steps follows a distill step list, as from a file)."""
    raw: dict[str, Any] = {}
    for f in dataclasses.fields(run):
        if f.name == "ignored_keys":
            continue
        value = getattr(run, f.name)
        if f.name == "lora_configs" and isinstance(value, (list, tuple)):
            value = [{"path": os.fspath(s.path) if isinstance(s.path, os.PathLike) else s.path,
                      "strength": s.strength} if isinstance(s, LoraSpec) else s for s in value]
        elif f.name == "parallel" and isinstance(value, ParallelConfig):
            value = dataclasses.asdict(value)
        elif isinstance(value, tuple):
            value = list(value)
        elif isinstance(value, os.PathLike):  # (a pathlib.Path for a file key)
            value = os.fspath(value)
        raw[f.name] = value
    checked = parse_run_config(raw, model_cls=model_cls, source="RunConfig", warn=False)
    return dataclasses.replace(checked, ignored_keys=run.ignored_keys)


def load_run_config(path: str | Path | None, overrides: dict[str, Any] | None = None, *,
                    model_cls: str | None = None, defaults: dict[str, Any] | None = None) -> RunConfig:
    """Reads a LightX2V JSON config file (or none), applies `overrides` (same keys), validates once;
    `defaults` fill keys neither sets (with_defaults)."""
    raw: dict[str, Any] = {}
    source = "config"
    if path is not None:
        path = Path(path)
        source = str(path)
        raw = _read_json_object(path, "config file")
    overrides = overrides or {}
    for alias, keys in _NEW_SPELLINGS.items():
        if any(k in overrides for k in keys):  # an override of one spelling replaces the file's other one
            raw.pop(alias, None)
        if alias in overrides:
            for k in keys:
                raw.pop(k, None)
    raw = with_defaults({**raw, **overrides}, defaults or {})
    return parse_run_config(raw, model_cls=model_cls, source=source)
