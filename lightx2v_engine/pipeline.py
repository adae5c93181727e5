"""The T2V/I2V pipeline: one function each for encode -> denoise -> decode, and a small Python API.

    from lightx2v_engine import Pipeline   # or: from lightx2v_engine.pipeline import Pipeline
    pipe = Pipeline.load("Wan2.1-T2V-14B", "configs/distill/wan21/wan_t2v_distill_model_4step_cfg.json")
    out = pipe.generate("a cat surfing a wave", seed=42)
    out.save("cat.mp4")

Model folders as users download them hold config.json, the DiT weights, ``models_t5_umt5-xxl-enc-bf16.pth``,
``Wan2.1_VAE.pth``, ``google/umt5-xxl/tokenizer.json`` and for I2V
``models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth``. ``Pipeline.random(preset)`` builds the same
graph with random weights (benchmarks; the ``tiny`` preset runs on a CPU in seconds).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import logging
import os
import tempfile
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from lightx2v_engine import clip as clip_mod
from lightx2v_engine import ops
from lightx2v_engine import quant
from lightx2v_engine import t5 as t5_mod
from lightx2v_engine import tae as tae_mod
from lightx2v_engine import vae as vae_mod
from lightx2v_engine.checkpoint import candidate_paths
from lightx2v_engine.config import (TINY_SIZE, ModelConfig, RunConfig, check_model_cls, check_run_config, get_preset,
                                    load_run_config, model_config_from_json, parse_run_config, warn_user,
                                    with_defaults)
from lightx2v_engine.cuda_graph import _clear_frames
from lightx2v_engine.dit import WanDiT
from lightx2v_engine.image import i2v_latent_size, i2v_mask, load_image, prepare_i2v_image
from lightx2v_engine.loading import DTYPES, build_dit, load_dit
from lightx2v_engine.offload import attach_block_offload, blocks_detached, page_lock_module_
from lightx2v_engine.parallel import (Parallel, RankError, check_world, decode_tiled, effective_parallel,
                                      init_parallel)
from lightx2v_engine.schedulers import DistillSampler, UniPCSampler, cfg_combine, check_seed, make_generator, initial_noise
from lightx2v_engine.video import save_latents, save_mp4, video_to_uint8

log = logging.getLogger(__name__)

T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
VAE_FILE = "Wan2.1_VAE.pth"
LIGHTVAE_FILES = ("lightvaew2_1.pth", "lightvaew2_1.safetensors")  # LightX2V's pruned VAE (use_lightvae)
CLIP_FILE = "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
# LightX2V's quantized encoder files: named in the error when only they are there (t5/clip_quantized load
# them; see _encoder_file).
T5_QUANTIZED_FILES = ("models_t5_umt5-xxl-enc-fp8.pth", "models_t5_umt5-xxl-enc-int8.pth")
CLIP_QUANTIZED_GLOBS = ("*clip*fp8*.pth", "*clip*int8*.pth")
# captured graph sets kept per Pipeline (one per shape/sampler/ops key, each with its own memory pool): a
# server taking many sizes would otherwise grow GPU memory with every new one
MAX_GRAPH_SHAPES = 2
# shape keys remembered as too big for graphs (Pipeline._graph_skip): the oldest are forgotten beyond this (a
# server taking arbitrary sizes would otherwise grow the set with each one; a forgotten shape is tried again)
MAX_GRAPH_SKIP = 64
# Wan's default negative prompt (shared_config.sample_neg_prompt; its I2V scripts prefix "镜头晃动，"): not a
# default here (LightX2V encodes the negative prompt given, "" when none); pass it as negative_prompt for Wan's.
WAN_NEGATIVE_PROMPT = ("色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
                       "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
                       "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走")


class NonFiniteError(RuntimeError):
    """NaN/Inf produced at run time."""


# the folder, then LightX2V's subfolders (utils.find_torch_model_path: its selective downloads keep a
# component's files in one of them)
SEARCH_SUBDIRS = ("", "original", "distill_models", "fp8", "int8", "distill_fp8", "distill_int8")


def find_file(name: str, model_path: Path, subdirs=SEARCH_SUBDIRS) -> Path:
    """`name` in the model folder (or its usual subfolders); FileNotFoundError naming every place searched."""
    tried = []
    for sub in subdirs:
        p = model_path / sub / name if sub else model_path / name
        tried.append(str(p))
        if p.is_file():
            return p
    raise FileNotFoundError(f"{name} not found; searched: {tried}")


def find_weights(key: str, override: str | None, default_name: str | tuple[str, ...], model_path: Path,
                 quantized_globs: tuple[str, ...] = ()) -> Path:
    """The file for one component: config key `key`'s path when given (as given, then under the model
    folder), else `default_name` (or the first of several names found) in the model folder. A missing file
    is an error naming the key or the places searched; a missing default next to a LightX2V quantized
    variant names the keys that load it."""
    if override is not None:
        cands = candidate_paths(override, [model_path])
        for c in cands:
            if c.is_file():
                return c
        raise FileNotFoundError(f"config key {key!r} = {override!r}: file not found; searched: "
                                f"{[str(c) for c in cands]}")
    try:
        if isinstance(default_name, tuple):
            return _find_first(default_name, model_path, key)
        return find_file(default_name, model_path)
    except FileNotFoundError as e:
        quantized = sorted({p.name for sub in SEARCH_SUBDIRS for g in quantized_globs
                            for p in (model_path / sub).glob(g) if p.is_file()})
        if quantized:
            raise FileNotFoundError(
                f"{e}; the folder holds the quantized {', '.join(quantized)}: set {key.split('_')[0]}_quantized "
                f"true with {key.split('_')[0]}_quant_scheme ('fp8-...' or 'int8-...') to run it") from None
        raise


def _find_first(names: tuple[str, ...], model_path: Path, key: str) -> Path:
    errors = []
    for name in names:
        try:
            return find_file(name, model_path)
        except FileNotFoundError as e:
            errors.append(str(e))
    raise FileNotFoundError(f"none of {list(names)} found (set config key {key!r} to name the file); "
                            + "; ".join(errors))


def _to_device(module: torch.nn.Module, device: torch.device) -> None:
    """Moves `module`'s parameters and buffers to `device` for an offloaded use. The CPU tensors are kept
    while it is away, and the move back re-attaches them: weights do not change in use, so no device-to-host
    copy is made (for umT5, 11 GB per prompt saved). Parameters come back as the same objects. Contract:
    weights are not changed while on the device (a change made there would be undone on the way back)."""
    for m in module.modules():
        kept = m.__dict__.setdefault("_lx2v_cpu_copies", {})
        if device.type == "cpu" and hasattr(m, "drop_device_caches"):  # (tensors derived from the weights)
            m.drop_device_caches()
        if device.type == "cpu":  # entries whose tensor went away or came back by another route are stale
            for name in list(kept):
                t = m._parameters[name] if name in m._parameters else m._buffers.get(name)
                if t is None or t.device.type == "cpu":
                    del kept[name]
        for store in (m._parameters, m._buffers):
            for name, t in list(store.items()):
                if t is None or t.device == device:
                    continue
                if device.type == "cpu" and name in kept:
                    obj, data = kept.pop(name)
                    if isinstance(obj, torch.nn.Parameter):
                        obj.data = data
                    store[name] = obj
                    continue
                if t.device.type == "cpu":
                    kept[name] = (t, t.data)
                new = t.detach().to(device, non_blocking=device.type == "cuda")  # (stream-ordered H2D)
                if not isinstance(t, torch.nn.Parameter):
                    store[name] = new
                elif torch._has_compatible_shallow_copy_type(t, new):
                    t.data = new  # (what nn.Module.to does: the Parameter object stays)
                else:
                    store[name] = torch.nn.Parameter(new, requires_grad=t.requires_grad)


@contextlib.contextmanager
def offloaded(module: torch.nn.Module | None, device: torch.device, enabled: bool, *, stream_blocks: bool = True):
    """With `enabled` (t5/clip/vae_cpu_offload), `module` is moved to `device` for the block and back to the
    CPU after it (LightX2V's encoder/VAE offload); otherwise it stays where it is. A module with a `blocks`
    ModuleList (umT5's 24; CLIP, 1.3 GB, and the VAE move whole) streams them: each block moves in for its
    forward and out after it, so the encoder's peak on the device is its embeddings plus one block
    (umT5-XXL: about 2.5 of 11 GB in bf16), not the whole model next to the resident DiT; `stream_blocks`
    False moves it whole (the DiT's offload_granularity "model")."""
    if module is None or not enabled:
        yield module
        return
    cpu = torch.device("cpu")
    blocks = getattr(module, "blocks", None)
    if not stream_blocks or not isinstance(blocks, torch.nn.ModuleList):
        try:  # (the move too: a move that fails part-way, e.g. out of memory, leaves nothing on the device)
            _to_device(module, device)
            yield module
        finally:
            _to_device(module, cpu)
        return

    def block_in(m, args):  # hooks return None: their arguments and outputs pass unchanged
        _to_device(m, device)

    def block_out(m, args, out):
        _to_device(m, cpu)

    hooks = []
    try:
        with blocks_detached(module):
            _to_device(module, device)
        hooks = [h for b in blocks for h in (b.register_forward_pre_hook(block_in),
                                             b.register_forward_hook(block_out))]
        yield module
    finally:  # also after a failed move (e.g. out of memory): no hook stays, nothing stays on the device
        for h in hooks:
            h.remove()
        _to_device(module, cpu)  # the rest, and a block left on the device by an exception


@dataclass
class Timings:
    """Wall times in ms (GPU work synchronised at each boundary)."""
    items: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def measure(self, name: str, device: torch.device):
        _sync(device)
        t0 = time.perf_counter()
        yield
        _sync(device)
        self.items[name] = self.items.get(name, 0.0) + (time.perf_counter() - t0) * 1e3

    def table(self, peak_gpu_bytes: int | None = None) -> str:
        w = max(len(k) for k in self.items) if self.items else 8
        lines = [f"{'stage':<{w}}  {'ms':>10}"]
        lines += [f"{k:<{w}}  {v:>10.1f}" for k, v in self.items.items()]
        steps = [v for k, v in self.items.items() if k.startswith("step ")]
        if steps:
            lines.append(f"{'denoise total':<{w}}  {sum(steps):>10.1f}")
        if peak_gpu_bytes is not None:
            lines.append(f"peak GPU memory: {peak_gpu_bytes / 2**30:.2f} GiB")
        return "\n".join(lines)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Output:
    frames: torch.Tensor | None   # uint8 [T, H, W, 3]; None on the ranks > 0 of a multi-GPU run
    latents: torch.Tensor         # fp32 [16, F, H/8, W/8], the final denoised latents
    timings: Timings
    fps: float = 16.0
    peak_gpu_bytes: int | None = None

    def save(self, path: str | Path) -> Path:
        if self.frames is None:
            raise RuntimeError("this Output has no frames: on a multi-GPU run only rank 0 decodes the video "
                               "(save it there: Parallel.rank == 0), or save_latents() on any rank")
        return save_mp4(self.frames.cpu().numpy(), path, fps=self.fps)

    def save_latents(self, path: str | Path, **metadata: Any) -> Path:
        return save_latents(self.latents.cpu(), path, metadata)


def _on_own_device(method):
    """Runs a Pipeline method with the pipeline's CUDA device current: Triton launches, CUDA-graph capture
    and their side streams use the current device, not their tensors' (a pipeline on cuda:1 ran its
    kernels on GPU 0)."""
    @functools.wraps(method)
    def run(self, *args, **kwargs):
        if self.device.type != "cuda":
            return method(self, *args, **kwargs)
        with torch.cuda.device(self.device):
            return method(self, *args, **kwargs)
    run.on_own_device = True
    return run


@dataclass
class Pipeline:
    """The loaded models and run settings of one Wan2.1 model: generate(), or its stages. Not thread-safe:
    one call at a time per Pipeline (the server runs every task, its LoRA switch included, on its queue's
    single worker thread)."""
    model_cfg: ModelConfig
    run_cfg: RunConfig
    dit: WanDiT | None  # None between uses with unload_modules / lazy_load (built per denoising loop)
    t5: torch.nn.Module
    tokenizer: Any
    vae: torch.nn.Module | None  # the Wan VAE (or LightX2V's pruned one); None for T2V decoded by `tae`
    clip: torch.nn.Module | None
    device: torch.device
    load_ms: float = 0.0
    use_cuda_graph: bool = False
    _graphs: dict = field(default_factory=dict, repr=False)
    # shape keys whose capture ran out of memory (also after the retry without the cached sets), oldest
    # first (a dict as an ordered set, MAX_GRAPH_SKIP at most)
    _graph_skip: dict = field(default_factory=dict, repr=False)
    _lora_switch: Any = field(default=None, repr=False)  # lora.LoraSwitch once set_request_loras is used
    parallel: Parallel | None = None  # under torchrun with a `parallel` config section
    tae: tae_mod.TinyDecoder | None = None  # use_tae: decodes instead of the VAE
    # unload_modules / lazy_load: builders of the models loaded for each use and freed after it (dit, t5,
    # clip, vae, tae; the attribute of that name stays None between uses)
    loaders: dict[str, Callable[[], torch.nn.Module]] = field(default_factory=dict, repr=False)
    _request_loras: tuple = field(default=(), repr=False)  # set_request_loras' specs, for a DiT built per use
    _request_lora_key: tuple = field(default=(), repr=False)  # their files' identity (lora.resolve_specs)
    # the server's LoRAs for a task without lora_name (lora_dynamic_apply's config LoRAs; server.dynamic_loras)
    default_request_loras: tuple = field(default=(), repr=False)
    dit_meta: Callable[[], WanDiT] | None = field(default=None, repr=False)  # the DiT's structure on `meta`
    # where a relative request LoRA path is also looked for, after the working directory (the model folder,
    # as for the config's LoRAs)
    lora_search_dirs: tuple = ()

    def __post_init__(self):
        if self.device.type == "cuda":  # offloaded weights move by DMA from page-locked host memory
            run = self.run_cfg
            for module, moved in ((self.t5, run.t5_cpu_offload), (self.clip, run.clip_cpu_offload),
                                  (self.vae, run.vae_cpu_offload), (self.dit, _dit_moves_whole(run))):
                if module is not None and moved:
                    page_lock_module_(module, self.device)  # (the module holds its packs: locked while it lives)
        if self.dit is not None:
            self._setup_dit(self.dit)
        elif self.parallel is not None and self.parallel.seq is not None:  # (a DiT built per use: check now)
            self.parallel.seq.check_heads(self.model_cfg.num_heads)
        if self.device.type == "cuda" and not ops.kernels_capable(self.device):
            log.warning("%s is compute capability %d.%d: the Triton kernels need %d.%d or newer, so every op runs "
                        "its PyTorch reference (slower)", self.device,
                        *torch.cuda.get_device_capability(self.device), *ops.KERNEL_MIN_CAPABILITY)
        if self.run_cfg.attn_8bit and not ops.attention_8bit_available(self.device):
            log.warning("self_attn_1_type %r: the 8-bit attention kernel needs a CUDA GPU of sm89 or newer "
                        "with triton; exact attention runs on %s", self.run_cfg.self_attn_1_type, self.device)
        log.info("%s", ops.describe(self.device, self.run_cfg.attn_8bit,
                                    seq_parallel=self.parallel is not None and self.parallel.seq is not None,
                                    dtype=DTYPES[self.run_cfg.dtype], head_dim=self.model_cfg.head_dim))

    def _setup_dit(self, dit: WanDiT) -> None:
        """What every DiT of this pipeline runs with: 8-bit attention as configured, the context rows of the
        config's text_len, the sequence split."""
        dit.set_attention_8bit(self.run_cfg.attn_8bit)
        dit.context_rows = self.run_cfg.text_len
        if self.parallel is not None:
            _attach_parallel(dit, self.parallel)

    @property
    def is_main(self) -> bool:
        """True except on the ranks > 0 of a multi-GPU run (which return no frames)."""
        return self.parallel is None or self.parallel.is_main

    @property
    def task(self) -> str:
        return "i2v" if self.model_cfg.is_i2v else "t2v"

    # ------------------------------------------------------------------ construction
    @classmethod
    def load(cls, model_path: str | Path, config: str | Path | dict | RunConfig | None = None, *,
             task: str = "t2v", model_cls: str = "wan2.1_distill", device: str | torch.device | None = None,
             preset: str | None = None) -> "Pipeline":
        """A pipeline from a Wan model folder and a LightX2V config (path, dict of its keys, or RunConfig)."""
        t0 = time.perf_counter()
        run = _run_config(config, model_cls)
        mp = Path(model_path)
        if not mp.is_dir():
            raise FileNotFoundError(f"model folder not found: {mp}")
        cfg_json = mp / "config.json"
        if not cfg_json.is_file() and (mp / "transformer" / "config.json").is_file():
            cfg_json = mp / "transformer" / "config.json"
        mcfg = model_config_from_json(cfg_json, preset)
        _check_task(task, mcfg, run)
        par = _init_parallel(run, mcfg, device)
        dev = par.device if par is not None else _device(device)
        quant.check_fp8_device(run, dev)  # (before any file is read)
        cpu = torch.device("cpu")
        dit_dev = cpu if run.cpu_offload else dev  # an offloaded DiT is loaded into host memory ...
        lora_dev = dev if run.cpu_offload else None  # ... and its LoRAs merge on the run device

        def load_dit_(request_loras=()):  # (request LoRAs merge after the config's, before the placement)
            run_l = (dataclasses.replace(run, lora_configs=tuple(run.lora_configs) + tuple(request_loras))
                     if request_loras else run)
            if run.dit_quantized and not run.weight_auto_quant:
                dit = _load_quantized_dit(mcfg, mp, run_l, dit_dev, lora_dev)
            else:
                # weight_auto_quant: quantized here, the config's LoRAs merged before; request LoRAs (a DiT built
                # per use) then run as low-rank branches, as on the resident DiT (set_request_loras)
                dit = load_dit(mcfg, mp, dit_original_ckpt=run.dit_original_ckpt, distill=model_cls != "wan2.1",
                               dtype=run.dtype, device=dit_dev,
                               lora_specs=run.lora_configs if run.dit_quantized else run_l.lora_configs,
                               lora_strict=run.lora_strict, lora_compute_device=lora_dev)
                if run.dit_quantized:
                    quant.quantize_dit_(dit, run.dit_quant_scheme)
                    log.info("DiT quantized at load (weight_auto_quant, %s)", run.dit_quant_scheme)
                    if request_loras:
                        from lightx2v_engine.lora import apply_loras_
                        apply_loras_(dit, request_loras, strict=run.lora_strict, compute_device=lora_dev)
            _place_dit(dit, run, dev)
            return dit
        # the files are found now, read when built
        builders: dict[str, Callable[[], torch.nn.Module]] = {"dit": load_dit_}
        if run.use_tae:
            tae_path = find_weights("tae_path", run.tae_path, tae_mod.TAE_FILES, mp)
            log.info("tiny decoder weights: %s", tae_path)
            builders["tae"] = lambda: tae_mod.load_tae(tae_path, device=dev, dtype=_vae_dtype(run, dev),
                                                       need_scaled=run.need_scaled)
        if mcfg.is_i2v or not run.use_tae:  # (T2V decoded by the tiny decoder needs no VAE)
            vae_path = find_weights("vae_path", run.vae_path, LIGHTVAE_FILES if run.use_lightvae else VAE_FILE, mp)
            log.info("VAE weights: %s", vae_path)

            def load_vae():
                vae = _place_vae(vae_mod.load_vae(vae_path, device=cpu if run.vae_cpu_offload else dev,
                                                  dtype=_vae_dtype(run, dev)), dev)
                _check_light_vae(run, vae, vae_path)
                return vae
            builders["vae"] = load_vae
        _rank0_decodes_alone(builders, run, par)

        def encoder_files():  # found, and the tokenizer read, before the DiT: a missing one fails in seconds
            t5_path = _encoder_file(run, mp, "t5")
            return t5_path, t5_mod.load_tokenizer(str(mp)), _encoder_file(run, mp, "clip") if mcfg.is_i2v else None
        t5_path, tok, clip_path = _encoders_on_rank0(par, encoder_files, "find the text/image encoders")
        models, loaders = _build_or_defer(builders, _per_use(run))

        def encoders():  # (on rank 0 only under multi-GPU: its failure reaches every rank)
            log.info("umT5 weights: %s", t5_path)
            # offloaded weights are kept on the CPU in the dtype they run in on `dev`
            enc = {"t5": lambda: _check_encoder_linears(
                t5_mod.load_t5(str(t5_path), device=cpu if run.t5_cpu_offload else dev, dtype=_t5_dtype(dev)),
                run, "t5", t5_path, dev)}
            if mcfg.is_i2v:
                log.info("CLIP weights: %s", clip_path)
                enc["clip"] = lambda: _check_encoder_linears(
                    clip_mod.load_clip(str(clip_path), device=cpu if run.clip_cpu_offload else dev,
                                       dtype=_clip_dtype(dev)), run, "clip", clip_path, dev)
            built, deferred = _build_or_defer(enc, _per_use(run))
            loaders.update(deferred)
            return built.get("t5"), tok, built.get("clip")
        t5, tok, clip = _encoders_on_rank0(par, encoders)
        return cls(mcfg, run, models.get("dit"), t5, tok, models.get("vae"), clip, dev,
                   (time.perf_counter() - t0) * 1e3, use_cuda_graph=_graphs_on(run, dev, par), parallel=par,
                   tae=models.get("tae"), loaders=loaders, lora_search_dirs=(mp,),
                   dit_meta=lambda: _dit_meta(mcfg, run.dit_quant_scheme if run.dit_quantized else None))

    @classmethod
    def random(cls, preset: str = "tiny", config: str | Path | dict | RunConfig | None = None, *,
               device: str | torch.device | None = None, seed: int = 0, with_encoders: bool = True) -> "Pipeline":
        """The same graph with random weights: `preset` names the DiT ("tiny", "tiny-i2v", "wan2.1-t2v-1.3b",
        ...); the tiny presets pair with tiny T5/VAE/CLIP, the real ones with real-size encoders."""
        t0 = time.perf_counter()
        mcfg = get_preset(preset)  # (first: an unknown or non-string preset is named)
        run = _run_config(config, "wan2.1_distill", TINY_SIZE if preset.startswith("tiny") else None)
        _check_task("i2v" if mcfg.is_i2v else "t2v", mcfg, run)
        par = _init_parallel(run, mcfg, device)
        dev = par.device if par is not None else _device(device)
        quant.check_fp8_device(run, dev)  # (before any file is read)
        tiny = preset.startswith("tiny")

        def random_dit(request_loras=(), broadcast=True):  # (seeded random weights: the same DiT each time)
            dit = build_dit(mcfg, None, dtype=DTYPES[run.dtype], device=torch.device("cpu") if run.cpu_offload else dev,
                            random_device=dev, seed=seed)  # (drawn where it runs: offloaded or not, the same weights)
            if par is not None and broadcast:  # one set of random weights for every rank
                par.broadcast_module_(dit)
            from lightx2v_engine.lora import apply_loras_
            lora_dev = dev if run.cpu_offload else None
            # as Pipeline.load's weight_auto_quant: the config's LoRAs merge into the bf16 weights, which are then
            # quantised in place (no checkpoint to read); request LoRAs come after (8-bit: low-rank branches)
            if run.lora_configs:
                apply_loras_(dit, run.lora_configs, strict=run.lora_strict, compute_device=lora_dev)
            if run.dit_quantized:
                from lightx2v_engine.quant import quantize_dit_
                quantize_dit_(dit, run.dit_quant_scheme)
            if request_loras:
                apply_loras_(dit, request_loras, strict=run.lora_strict, compute_device=lora_dev)
            _place_dit(dit, run, dev)
            return dit
        t5 = tok = clip = None
        random_dit.defers_broadcast = True  # (Pipeline._use: after the ranks agree on the builds)
        builders: dict[str, Callable[[], torch.nn.Module]] = {"dit": random_dit}
        if with_encoders:
            cpu = torch.device("cpu")
            t5cfg = t5_mod.T5Config.tiny() if tiny else t5_mod.T5Config.umt5_xxl()
            if t5cfg.dim != mcfg.text_dim:
                raise ValueError(f"preset {preset}: text_dim {mcfg.text_dim} != T5 width {t5cfg.dim}")
            ccfg = clip_mod.CLIPConfig.tiny() if tiny else clip_mod.CLIPConfig.vit_h14()
            if mcfg.is_i2v and ccfg.dim != mcfg.image_dim:
                raise ValueError(f"preset {preset}: image_dim {mcfg.image_dim} != CLIP width {ccfg.dim}")
            if run.use_tae:
                builders["tae"] = lambda: tae_mod.random_tae(
                    tae_mod.TAEConfig.tiny() if tiny else tae_mod.TAEConfig(), device=dev, dtype=_vae_dtype(run, dev),
                    seed=seed, need_scaled=bool(run.need_scaled))
            if mcfg.is_i2v or not run.use_tae:
                vcfg = vae_mod.VAEConfig.tiny() if tiny else vae_mod.VAEConfig.wan21()
                if run.use_lightvae:  # LightX2V's lightvaew2_1: every width a quarter (96 -> 24)
                    vcfg = vae_mod.VAEConfig(dim=max(1, vcfg.dim // 4))
                builders["vae"] = lambda: _place_vae(vae_mod.random_vae(  # (drawn where it runs, as the DiT)
                    vcfg, device=dev, dtype=_vae_dtype(run, dev), seed=seed).to(cpu if run.vae_cpu_offload else dev), dev)

            def random_t5():
                t5 = t5_mod.random_t5(t5cfg, device=cpu if run.t5_cpu_offload else dev, dtype=_t5_dtype(dev),
                                      seed=seed, random_device=dev)  # (umT5-XXL: 10.6 GiB, never whole on dev)
                if run.t5_quantized:
                    t5_mod.quantize_t5_(t5, run.t5_quant_scheme)
                return t5

            def random_clip():
                clip = clip_mod.random_clip(ccfg, device=dev, dtype=_clip_dtype(dev), seed=seed)
                if run.clip_cpu_offload:
                    clip = clip.to(cpu)
                if run.clip_quantized:
                    clip_mod.quantize_clip_(clip, run.clip_quant_scheme)
                return clip
        _rank0_decodes_alone(builders, run, par)
        models, loaders = _build_or_defer(builders, _per_use(run))
        if with_encoders:
            def encoders():
                enc = {"t5": random_t5, **({"clip": random_clip} if mcfg.is_i2v else {})}
                built, deferred = _build_or_defer(enc, _per_use(run))
                loaders.update(deferred)
                with tempfile.TemporaryDirectory(prefix="lx2v_tok_") as tok_dir:  # read into memory, then removed
                    t5_mod.make_tiny_tokenizer(tok_dir, vocab_size=min(t5cfg.vocab, 256))
                    return built.get("t5"), t5_mod.load_tokenizer(tok_dir), built.get("clip")
            t5, tok, clip = _encoders_on_rank0(par, encoders)
        return cls(mcfg, run, models.get("dit"), t5, tok, models.get("vae"), clip, dev,
                   (time.perf_counter() - t0) * 1e3, use_cuda_graph=_graphs_on(run, dev, par), parallel=par,
                   tae=models.get("tae"), loaders=loaders,
                   dit_meta=lambda: _dit_meta(mcfg, run.dit_quant_scheme if run.dit_quantized else None))

    def _checked_request_loras(self, specs: tuple) -> tuple[tuple, tuple]:
        """(specs with their files resolved, their identity: lora.resolve_specs, as the resident DiT's
        LoraSwitch), each read and checked against the DiT's structure (on meta)."""
        from lightx2v_engine.lora import merge_lora_, read_lora, resolve_specs
        # (absolute: each DiT built reads them again, whatever the working directory is by then)
        resolved, key = resolve_specs(specs, self.lora_search_dirs)
        if key == self._request_lora_key:  # the same files, unchanged (the server's next request): checked before
            return resolved, key
        skeleton = self.dit_meta()
        for spec in resolved:
            merge_lora_(skeleton, read_lora(spec.path), spec.strength, source=spec.path,
                        strict=self.run_cfg.lora_strict, check_only=True)
        return resolved, key

    @property
    def _run_dtype(self) -> torch.dtype:
        """The DiT's run dtype (also while a DiT built per use is not there)."""
        return self.dit.run_dtype if self.dit is not None else DTYPES[self.run_cfg.dtype]

    def _available(self, name: str) -> bool:
        """Whether the model `name` (t5, clip, vae, tae) is loaded, or loaded on use (unload_modules)."""
        return getattr(self, name) is not None or name in self.loaders

    @contextlib.contextmanager
    def _use(self, name: str, everywhere: bool = False):
        """With unload_modules: the model `name` is built (from its file) into its attribute for the block
        and freed after it, as LightX2V's unload_modules; otherwise the resident model is used. The block
        reads the attribute (self.t5, ...) and keeps no other reference, so the memory is free at exit.
        everywhere (multi-GPU, the model built on every rank): the ranks agree on the builds' outcome first,
        so that one rank's failure (out of memory, an unreadable file) is an error on all of them
        (parallel.RankError) instead of leaving the others waiting in the model's first collective."""
        build = self.loaders.get(name)
        if build is None or getattr(self, name) is not None:
            yield
            return
        t0 = time.perf_counter()
        agree = everywhere and self.parallel is not None
        # a builder with a collective inside (the random DiT's broadcast) runs it after the agreement instead:
        # a rank failing before it would leave the others waiting in it
        defer = agree and name == "dit" and getattr(build, "defers_broadcast", False)
        try:
            error = None
            try:
                if name == "dit":  # with set_request_loras' LoRAs merged in
                    self.dit = build(self._request_loras, **({"broadcast": False} if defer else {}))
                    self._setup_dit(self.dit)
                else:
                    setattr(self, name, build())
            except BaseException as e:  # noqa: BLE001 (reported to every rank, then raised)
                setattr(self, name, None)
                _clear_frames(e)  # (the builder's frames would keep the half-built model alive with the error)
                if not agree:
                    raise
                error = e
            if agree:
                try:
                    self.parallel.agree(f"build the {dict(dit='DiT', vae='VAE').get(name, name)}", error)
                except RankError:
                    if error is not None and not isinstance(error, Exception):  # (Ctrl-C, exit: as they were)
                        raise error from None
                    raise
                if defer:
                    self.parallel.broadcast_module_(self.dit)
            log.info("unload_modules: %s loaded in %.0f ms", name, (time.perf_counter() - t0) * 1e3)
            try:
                yield
            except BaseException as e:
                # the error's traceback holds the failed forward's frames (self = this model): kept by a
                # notebook or a caller, it would keep the model alive past the finally below, and a retry would
                # build a second one (28 GB at 14B)
                _clear_frames(e)
                raise
        finally:
            # (caches kept outside the model: the sequence split's RoPE tables; no local holds the model, which
            # a traceback's frames would keep alive)
            if hasattr(getattr(self, name), "drop_device_caches"):
                getattr(self, name).drop_device_caches()
            setattr(self, name, None)
            _release_memory(self.device)

    def _dit_offloaded(self) -> bool:
        """Whether the DiT's weights move during a forward or between loops, or the DiT is built per loop
        (unload_modules): no CUDA graphs then."""
        return self.run_cfg.cpu_offload or "dit" in self.loaders

    @_on_own_device
    def set_request_loras(self, specs=()) -> None:
        """LoRAs for the following generations, on top of the model as loaded (config LoRAs included):
        `specs` a sequence of config.LoraSpec (absolute paths, or relative to the working directory, else to the
        model folder of Pipeline.load, as the config's LoRAs), ()
        for none. What the previous call merged is restored exactly first (lora.LoraSwitch; the same specs
        again, their files unchanged, cost a stat each: a file overwritten since counts as a new LoRA; paths
        resolve alike with or without unload_modules: lora.resolve_specs). A failing LoRA raises and leaves
        the model as loaded. Offloaded blocks reload from the changed host weights; captured CUDA graphs are
        dropped where 8-bit branch tensors were replaced (bf16 merges write the weights in place, which a
        replay reads). With a DiT built per use (unload_modules), each LoRA is read and checked against the
        DiT's structure now (a failing one raises, and the model as loaded runs next) and merged into every
        DiT built, after the config's."""
        from lightx2v_engine.lora import LoraSwitch
        specs = tuple(specs)
        if "dit" in self.loaders:
            try:
                self._request_loras, self._request_lora_key = self._checked_request_loras(specs)
            except BaseException:  # as LoraSwitch: after a failure, the model as loaded
                self._request_loras = self._request_lora_key = ()
                raise
            return
        if self._lora_switch is None:
            if not specs:
                return
            # an offloaded DiT's weights are on the CPU: the merge arithmetic runs on the run device
            self._lora_switch = LoraSwitch(self.dit, strict=self.run_cfg.lora_strict, search_dirs=self.lora_search_dirs,
                                           compute_device=self.device if self._dit_offloaded() else None)
        changed = True
        try:
            changed = self._lora_switch.set(specs)  # (False: the same LoRAs, their files unchanged)
        finally:  # also after a failure (changed stays True): the weights went back to the model as loaded
            if changed:
                try:
                    if self.dit.block_offload is not None:  # re-packs blocks whose branch tensors changed
                        self.dit.block_offload.refresh()
                except BaseException:
                    # (out of memory for the re-packed blocks' slots) the LoRAs go too: this call failed, and the
                    # model as loaded runs next (the offload retries its refresh at the next forward); the same
                    # specs again are then a new switch, not "nothing to do" (current None: a restore was
                    # interrupted, the weights a mix: restored too)
                    if self._lora_switch.current != ():
                        try:
                            self._lora_switch.set(())
                        except Exception:  # noqa: BLE001 (the first error is the one to report)
                            log.exception("restoring the model as loaded after a failed LoRA switch")
                    raise
                finally:
                    if self._lora_switch.touched_quantized and self._graphs:
                        self._graphs.clear()
                        _release_graph_memory()

    # ------------------------------------------------------------------ stages
    @_on_own_device
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """prompts -> [B, text_len(512), text_dim] in the DiT's run dtype, zero rows past each prompt (an
        empty string encodes as its end-of-text token alone: an empty negative prompt)."""
        for p in prompts:
            if not isinstance(p, str):
                raise ValueError(f"prompts must be strings, got {type(p).__name__}")
        if not self._available("t5"):
            raise RuntimeError(_NO_ENCODER.format("text"))
        with self._use("t5"), offloaded(self.t5, self.device, self.run_cfg.t5_cpu_offload):
            ctx = t5_mod.encode_text(self.t5, self.tokenizer, prompts, text_len=self.run_cfg.text_len)
        n = self.run_cfg.text_len  # the DiT sees text_len rows (zero-padded): 512 as Wan, else as LightX2V
        if ctx.shape[1] < n:
            ctx = torch.nn.functional.pad(ctx, (0, 0, 0, n - ctx.shape[1]))
        return ctx.to(self.device, self._run_dtype)

    @_on_own_device
    def encode_image(self, image, num_frames: int, height: int, width: int):
        """I2V conditioning: (clip_fea [1, 257, 1280], y [1, 20, F, lat_h, lat_w], (lat_h, lat_w))."""
        if not self._available("clip"):
            raise RuntimeError(_NO_ENCODER.format("image"))
        img = load_image(image)
        resized = prepare_i2v_image(img, height, width)          # [3, lat_h*8, lat_w*8]
        lat_h, lat_w = resized.shape[1] // 8, resized.shape[2] // 8
        with self._use("clip"), offloaded(self.clip, self.device, self.run_cfg.clip_cpu_offload):
            cdev = self.clip.patch_embedding.weight.device
            pixels = clip_mod.clip_preprocess(img[None].to(cdev), size=self.clip.cfg.image_size)
            clip_fea = clip_mod.encode_image(self.clip, pixels.to(self.clip.patch_embedding.weight.dtype))
        video = torch.zeros(1, 3, num_frames, lat_h * 8, lat_w * 8, device=self.device)
        video[:, :, 0] = resized.to(self.device)
        with self._use("vae"), offloaded(self.vae, self.device, self.run_cfg.vae_cpu_offload):
            z = self.vae.encode(video, tiled=self.run_cfg.use_tiling_vae)  # [1, 16, F, lat_h, lat_w] fp32
        mask = i2v_mask(z.shape[2], lat_h, lat_w, num_frames, device=self.device)
        y = torch.cat([mask[None].to(z.dtype), z], dim=1)
        # (in CLIP's own dtype: the DiT's image MLP starts with an fp32 LayerNorm, as Wan's, no bf16 rounding first)
        return clip_fea.to(self.device), y, (lat_h, lat_w)

    @_on_own_device
    def denoise(self, noise: torch.Tensor, context: torch.Tensor, *, neg_context: torch.Tensor | None = None,
                clip_fea=None, y=None, seed: int = 42, timings: Timings | None = None,
                progress: Callable[[int, int], None] | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """noise [16, F, h, w] fp32 -> final latents [16, F, h, w] fp32, with the configured sampler.

        The "renoise" update's fresh noise is drawn, as in LightX2V, from the generator that drew `noise`,
        after it: `generator` when given (generate() passes its own), else one seeded with `seed` and run past
        the initial noise (so that noise = initial_noise(..., seed) gives generate()'s result). The latents
        stay fp32 between steps (the engine keeps the residual stream in fp32, as LightX2V's
        sensitive_layer_dtype fp32 mode; its default rounds them to bf16 between steps)."""
        if self.run_cfg.enable_cfg and neg_context is None:  # (it ran unguided without a word)
            raise ValueError("denoise: enable_cfg is on, so neg_context (the encoded negative prompt) is needed; "
                             "encode one with encode_text, or run with enable_cfg false")
        timings = timings or Timings()
        with contextlib.ExitStack() as stack:
            if self.dit is None and "dit" in self.loaders:  # unload_modules: the DiT built for this loop
                with timings.measure("dit load", self.device):
                    stack.enter_context(self._use("dit", everywhere=True))
            stack.enter_context(offloaded(self.dit, self.device, _dit_moves_whole(self.run_cfg), stream_blocks=False))
            try:
                return self._denoise(noise, context, neg_context, clip_fea, y, seed, timings, progress, generator)
            except BaseException as e:  # the failed step's activations (GBs at 14B) live in the error's frames:
                _clear_frames(e)  # kept (a notebook's last error), they would hold them through a retry
                raise

    def _denoise(self, noise, context, neg_context, clip_fea, y, seed, timings, progress,
                 generator=None) -> torch.Tensor:
        run = self.run_cfg
        x = noise[None].to(self.device)
        timings = timings or Timings()
        if run.sampler == "distill":
            sampler = DistillSampler.from_step_list(run.denoising_step_list, run.sample_shift, run.distill_update)
            if sampler.mode == "renoise" and generator is None:  # the seed's generator, past the initial noise
                generator = make_generator(seed, self.device)
                torch.randn(noise.shape, generator=generator, device=generator.device, dtype=torch.float32)
            renoise = sampler.make_renoise_noise(x.shape, generator, self.device) if generator is not None else []
            if self.parallel is not None:
                for r in renoise or ():
                    self.parallel.broadcast_(r)
            ts = sampler.timestep_tensor(self.device)
            guided = run.enable_cfg and neg_context is not None
            runner = self._graph_runner(x, context, neg_context if guided else None, clip_fea, y, sampler, renoise, ts,
                                        timings) if (self.use_cuda_graph and self.device.type == "cuda"
                                                 and not self._dit_offloaded()) else None  # (_graphs_on)
            for i in range(sampler.num_steps):
                with timings.measure(f"step {i + 1}", self.device):
                    if runner is not None:
                        x = runner(i)
                    else:
                        v = self._velocity(x, ts[i:i + 1], context, neg_context if guided else None, clip_fea, y)
                        x = sampler.step(i, x, v, renoise[i] if renoise and i < len(renoise) else None)
                    _check_finite(x, i + 1)
                if progress:
                    progress(i + 1, sampler.num_steps)
        else:
            sampler = UniPCSampler(run.infer_steps, run.sample_shift)
            ts = sampler.timesteps.to(self.device, torch.float32)
            for i in range(run.infer_steps):
                with timings.measure(f"step {i + 1}", self.device):
                    v = self._velocity(x, ts[i:i + 1], context, neg_context if run.enable_cfg else None, clip_fea, y)
                    x = sampler.step(v, i, x)
                    _check_finite(x, i + 1)
                if progress:
                    progress(i + 1, run.infer_steps)
        return x[0].float().clone()  # x may be a CUDA graph's static buffer

    def _velocity(self, x, t, context, neg_context, clip_fea, y) -> torch.Tensor:
        """v = DiT(x, t, ctx), or with CFG v_u + g (v_c - v_u) from one batch-2 forward (under CFG parallel,
        each CFG group runs one branch and the two velocities are all-gathered)."""
        if neg_context is None:
            return self.dit(x, t, context, clip_fea, y)
        par = self.parallel
        if par is not None and par.cfg_group is not None:
            v = par.cfg_gather(self.dit(x, t, neg_context if par.cfg_rank else context, clip_fea, y))
            return cfg_combine(v[1:], v[:1], self.run_cfg.sample_guide_scale)
        b2 = lambda a: None if a is None else torch.cat([a, a], dim=0)  # noqa: E731
        v = self.dit(b2(x), t.expand(2), torch.cat([context, neg_context], dim=0), b2(clip_fea), b2(y))
        return cfg_combine(v[1:], v[:1], self.run_cfg.sample_guide_scale)

    def _graph_key(self, x, context, neg_context, clip_fea, y, sampler) -> tuple:
        """Everything a replay bakes in: shapes, the inputs' dtypes (the static buffers take the first call's:
        a later call's would be cast into them), sampler, run dtype, the CFG scale, the model object and the
        ops it runs (backend, kernels and their configs, 8-bit attention, the 8-bit linears' switches)."""
        dtypes = tuple(None if t is None else t.dtype for t in (x, context, neg_context, clip_fea, y))
        return (tuple(x.shape), tuple(context.shape), neg_context is not None, clip_fea is not None, dtypes,
                sampler, self.dit.run_dtype, self.run_cfg.sample_guide_scale if neg_context is not None else None,
                id(self.dit), ops.describe(x.device, attn_8bit=self.dit.blocks[0].self_attn.attn_8bit),
                quant.kernel_choices())

    def _graph_runner(self, x, context, neg_context, clip_fea, y, sampler, renoise, ts, timings=None):
        """The cached graphs of this shape key, their inputs set (a first call captures them: the warm-up and
        capture time is timings' "graph capture"); None runs this call eagerly: the warm-up step or a capture
        that ended cleanly ran out of memory (this shape stays eager; when other shapes' sets were cached,
        after they were dropped and the capture tried once more without them - except for a capture beside
        a set that itself evicted others: shapes that do not fit together would re-capture at every
        alternation), the warm-up failed otherwise (the model's error, met again eagerly), or the capture
        failed otherwise - ending it included (graphs are off from then on)."""
        key = self._graph_key(x, context, neg_context, clip_fea, y, sampler)
        if key in self._graph_skip:
            return None
        graphs = self._graphs.pop(key, None)
        if graphs is None:
            while len(self._graphs) >= MAX_GRAPH_SHAPES:  # the least recently used shape gives its pool back
                del self._graphs[next(iter(self._graphs))]
                _release_graph_memory()
            args = (x, context, neg_context, clip_fea, y, sampler, renoise, ts, timings)
            graphs, failure = self._capture_graphs(*args)
            evicted = False
            if failure is not None and failure[3] and self._graphs and not (
                    failure[2] and any(g.evicted_others for g in self._graphs.values())):
                # out of memory while other shapes' sets hold their pools: those go (their shapes capture again
                # when next used), and this shape is tried once more before it is given up. Not when the
                # warm-up step fitted and a cached set got its graphs by evicting others: the two do not fit
                # together, and evicting in turn would capture again at each alternation (this one stays eager)
                log.warning("%s%s; dropping the %d cached CUDA-graph set(s) of other shapes and trying again",
                            "" if failure[2] else "CUDA-graph warm-up step: ", failure[1], len(self._graphs))
                self._graphs.clear()
                _release_graph_memory()
                graphs, failure = self._capture_graphs(*args)
                evicted = True
            if failure is not None:
                name, msg, capturing, oom = failure
                if oom:  # (in the warm-up step, or a capture that ended cleanly): this shape stays eager
                    self._graph_skip[key] = None
                    while len(self._graph_skip) > MAX_GRAPH_SKIP:  # the oldest is forgotten (tried again if met)
                        del self._graph_skip[next(iter(self._graph_skip))]
                    log.warning("%s%s; this shape runs eagerly (not enough GPU memory for its graphs)",
                                "" if capturing else "CUDA-graph warm-up step: ", msg)
                elif not capturing:  # the warm-up (an eager step) failed: the eager run meets it again
                    log.warning("CUDA-graph warm-up step failed (%s); running this call eagerly", name)
                else:
                    log.error("CUDA graph capture failed (%s); running eagerly from now on", msg)
                    self.use_cuda_graph = False
                    self._graphs.clear()  # every cached set too: graphs are off from now on
                try:  # give the failed set's memory back before the eager run
                    _release_graph_memory()
                except RuntimeError:
                    pass
                return None
            graphs.evicted_others = evicted  # (captured only once the other sets were dropped)
            key = self._graph_key(x, context, neg_context, clip_fea, y, sampler)  # (a kernel failing in the
            # warm-up turns itself off, which changes the ops the key names)
        self._graphs[key] = graphs  # (re)inserted last: the dict is in least-recently-used order
        graphs.set_inputs(x, context, neg_context, clip_fea, y, renoise)
        return graphs.run_step

    def _capture_graphs(self, x, context, neg_context, clip_fea, y, sampler, renoise, ts, timings):
        """(a new graph set, warmed up and captured, None), or (None, (the error's type name, its message,
        whether the capture (not the warm-up step) failed, whether out of memory - in the warm-up step or in a
        capture that ended cleanly)). The failed set is unreferenced by then (its pool freed at the next
        _release_graph_memory)."""
        from lightx2v_engine.cuda_graph import CaptureError, DistillGraphs
        graphs = failure = None
        try:
            with (timings or Timings()).measure("graph capture", self.device):
                # (the velocity holds the pipeline weakly: the set, kept on the pipeline, forms no cycle)
                graphs = DistillGraphs(functools.partial(_graph_velocity, weakref.ref(self)), sampler,
                                       x, context, neg_context, clip_fea, y, renoise, ts)
                graphs.warm_up()
                graphs.capture()
            # the RoPE tables the replays read: held by the graphs, whatever the DiT's cache keeps; the
            # model too (its id is in the key: no other model may take that id while the graphs live)
            graphs.keepalive = self.dit.rope(self.dit.grid(x.shape), x.device)
            graphs.dit = self.dit
        except Exception as e:
            graphs = None
            capturing = isinstance(e, CaptureError)
            oom = (isinstance(e.__cause__, torch.OutOfMemoryError) and e.ended_cleanly if capturing
                   else isinstance(e, torch.OutOfMemoryError))
            failure = (type(e).__name__, str(e), capturing, oom)
            if log.isEnabledFor(logging.DEBUG):
                log.debug("CUDA graph capture failed", exc_info=True)
            _clear_frames(e)  # (the failed set and its pool are then freed at once, not by a later GC)
            del e
        return graphs, failure

    @_on_own_device
    def decode(self, latents: torch.Tensor) -> torch.Tensor | None:
        """latents [16, F, h, w] -> uint8 frames [T, H, W, 3]. Multi-GPU: called on every rank when the
        tiles spread over the ranks (_decode_everywhere), then the frames come back on rank 0 (else None).
        With use_tae the tiny decoder decodes (on the device, no tiling: it streams frames in chunks)."""
        if self._available("tae"):
            with self._use("tae"):
                return _frames(self.tae.decode(latents[None].to(self.device)), "tiny decoder")
        if not self._available("vae"):
            raise RuntimeError("this pipeline has no VAE: built with with_encoders=False")
        with self._use("vae", everywhere=self._decode_everywhere()), \
                offloaded(self.vae, self.device, self.run_cfg.vae_cpu_offload):
            z = latents[None].to(self.device)
            if self._decode_everywhere():
                video = decode_tiled(self.vae, z, True, self.parallel)
                return None if video is None else _frames(video, "VAE decode")
            video = self.vae.decode(z, tiled=self.run_cfg.use_tiling_vae)
        return _frames(video, "VAE decode")

    def _decode_everywhere(self) -> bool:
        """Multi-GPU with vae_parallel or use_tiling_vae: the VAE's tiles are decoded on all ranks."""
        return _decodes_everywhere(self.run_cfg, self.parallel)

    def _encode(self, prompt, negative_prompt, image, t_frames, h, w, timings):
        """-> (context [1, 512, C], neg_context or None (without CFG), clip_fea, y (I2V, else None), (h, w) of
        the video: I2V's follow the image)."""
        if self.task == "i2v":  # the image read and its size checked first: not after umT5 has run (and,
            # with unload_modules, been built from its 11 GB file)
            image = load_image(image)
            i2v_latent_size(image.shape[1], image.shape[2], h, w)
        with timings.measure("text encode", self.device):
            prompts = [prompt]
            if self.run_cfg.enable_cfg:
                # None: the default; "" is an empty negative prompt, as in LightX2V
                prompts.append(negative_prompt if negative_prompt is not None else self.default_negative_prompt())
            ctx = self.encode_text(prompts)
            _check_encoder(ctx, "text encoder (umT5)")
            context, neg_context = ctx[:1], (ctx[1:] if self.run_cfg.enable_cfg else None)
        clip_fea = y = None
        if self.task == "i2v":
            with timings.measure("image encode", self.device):
                clip_fea, y, (lh, lw) = self.encode_image(image, t_frames, h, w)
                _check_encoder(clip_fea, "image encoder (CLIP)")
                _check_encoder(y, "VAE encoder (the image's latents)")
            h, w = lh * 8, lw * 8
        return context, neg_context, clip_fea, y, (h, w)

    def default_negative_prompt(self) -> str:
        """The negative prompt under CFG when none is given: the config's sample_neg_prompt, else none ("",
        what LightX2V's Wan runner encodes without --negative_prompt; WAN_NEGATIVE_PROMPT is Wan's own)."""
        return self.run_cfg.sample_neg_prompt if self.run_cfg.sample_neg_prompt is not None else ""

    # ------------------------------------------------------------------ one call
    @torch.no_grad()
    @_on_own_device
    def generate(self, prompt: str, *, negative_prompt: str | None = None, image=None, seed: int | None = None,
                 num_frames: int | None = None, height: int | None = None, width: int | None = None,
                 progress: Callable[[int, int], None] | None = None) -> Output:
        """prompt (+ image for I2V) -> Output(frames, latents, timings). Sizes default to the config's;
        negative_prompt (under CFG) to default_negative_prompt() when None ("" is an empty one)."""
        run = self.run_cfg
        seed = check_seed(run.seed if seed is None else seed)  # (before the encoders run)
        # (None: the config's; 0 or a bad value is an error naming it, as in the config; 64.0 is 64)
        sizes = parse_run_config({"target_video_length": run.target_video_length if num_frames is None else num_frames,
                                  "target_height": run.target_height if height is None else height,
                                  "target_width": run.target_width if width is None else width},
                                 warn=False, source="generate()")
        t_frames, h, w = sizes.target_video_length, sizes.target_height, sizes.target_width
        prompt = "" if prompt is None else prompt
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
        if not prompt.strip() and self.task == "t2v":  # (I2V animates the image: LightX2V's default prompt "")
            raise ValueError("prompt is empty: text-to-video needs a text prompt (image-to-video takes an empty "
                             "one, as LightX2V)")
        if isinstance(image, (str, os.PathLike)) and not os.fspath(image):
            image = None  # ("" is no image, as the CLI's --image_path "")
        if self.task == "i2v" and image is None:
            raise ValueError("task i2v needs an image (--image_path)")
        if self.task == "t2v" and image is not None:
            raise ValueError("task t2v takes no image; load an I2V model for image-to-video")
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        timings = Timings()
        timings.items["load"] = self.load_ms
        def encode():
            return self._encode(prompt, negative_prompt, image, t_frames, h, w, timings)
        # multi-GPU: global rank 0 alone has the encoders; its results reach every rank
        context, neg_context, clip_fea, y, (h, w) = \
            encode() if self.parallel is None else _share_from_rank0(self.parallel, encode, self.device)
        generator = make_generator(seed, self.device)  # the initial noise, then the renoise update's (LightX2V)
        noise = initial_noise(t_frames, h, w, seed, self.device, generator=generator)
        if self.parallel is not None:  # every rank starts from rank 0's noise, bit for bit
            self.parallel.broadcast_(noise)
        latents = self.denoise(noise, context, neg_context=neg_context, clip_fea=clip_fea, y=y, seed=seed,
                               timings=timings, progress=progress, generator=generator)
        frames = None  # multi-GPU: the frames come back on global rank 0
        if self.is_main or self._decode_everywhere():
            with timings.measure("decode", self.device):
                frames = self.decode(latents)
        peak = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None
        return Output(frames=frames, latents=latents, timings=timings, fps=run.fps, peak_gpu_bytes=peak)


_NO_ENCODER = ("this pipeline has no {} encoder: built with with_encoders=False, or a rank > 0 of a multi-GPU run "
               "(global rank 0 encodes and broadcasts)")


def _init_parallel(run: RunConfig, mcfg: ModelConfig, device) -> Parallel | None:
    """Joins the torchrun group for run.parallel (None without one); without CFG the CFG groups join the
    sequence split (parallel.effective_parallel)."""
    if not run.parallel.enabled:
        return None
    check_world(run.parallel)  # (its error names the config's sizes)
    return init_parallel(effective_parallel(run.parallel, run.enable_cfg, mcfg.num_heads), _device(device))


def _dit_meta(mcfg: ModelConfig, quant_scheme: str | None) -> WanDiT:
    """The DiT's structure without weights (on `meta`): what request LoRAs are checked against."""
    with torch.device("meta"):
        model = WanDiT(mcfg)
    if quant_scheme is not None:
        from lightx2v_engine.quant import swap_to_quant_linear_
        swap_to_quant_linear_(model, quant_scheme)
    return model


def _per_use(run: RunConfig) -> bool:
    """Every model built per use: LightX2V's unload_modules, and its lazy_load (which implies it)."""
    return run.unload_modules or run.lazy_load


def _decodes_everywhere(run: RunConfig, par: Parallel | None) -> bool:
    """Multi-GPU with vae_parallel or use_tiling_vae, and no tiny decoder (which runs on rank 0): the VAE's
    tiles are decoded on all ranks."""
    return par is not None and not run.use_tae and (par.config.vae_parallel or run.use_tiling_vae)


def _rank0_decodes_alone(builders: dict, run: RunConfig, par: Parallel | None) -> None:
    """Drops the VAE and tiny decoder from a rank > 0's builders where rank 0 alone decodes (and encodes I2V
    images): each rank held a VAE it never used (about 0.25 GB of GPU memory for Wan's)."""
    if par is not None and not par.is_main and not _decodes_everywhere(run, par):
        for name in ("vae", "tae"):
            builders.pop(name, None)


def _build_or_defer(builders: dict[str, Callable[[], torch.nn.Module]], unload: bool
                    ) -> tuple[dict[str, torch.nn.Module], dict[str, Callable[[], torch.nn.Module]]]:
    """(models built now, builders kept for Pipeline._use): with unload_modules every model is built for
    each use instead (LightX2V's unload_modules / lazy_load). Each is still built once here and
    freed, one at a time: a missing, corrupt or mismatched file fails the load, not a video after its
    denoising loop."""
    if not unload:
        return {name: build() for name, build in builders.items()}, {}
    for build in builders.values():
        model = build()
        device = next(model.parameters()).device
        del model
        _release_memory(device)
    return {}, dict(builders)


def _release_memory(device: torch.device | None) -> None:
    """Frees what dropped references left: cycles now, and on CUDA the allocator's cached blocks."""
    gc.collect()
    if device is not None and device.type == "cuda":
        torch.cuda.empty_cache()


def _encoders_on_rank0(par: Parallel | None, load: Callable[[], tuple],
                       what: str = "load the text/image encoders") -> tuple:
    """load() -> (t5, tokenizer, clip) or another triple; under multi-GPU parallelism on global rank 0 only
    (the others get Nones, or rank 0's failure as an error: no rank waits for a rank 0 that gave up)."""
    if par is None:
        return load()
    return par.on_rank0(load, what) or (None, None, None)


def _share_from_rank0(par: Parallel, encode: Callable[[], tuple], device: torch.device) -> tuple:
    """encode() -> (tensor or None, ..., picklable extra) on global rank 0; every rank returns rank 0's
    values: their shapes and dtypes go over the control group, then the tensors. A failure of encode() on
    rank 0 reaches every rank as an error naming it (parallel.Parallel.on_rank0: none is left waiting)."""
    def run():
        *tensors, extra = encode()
        return [None if t is None else t.contiguous() for t in tensors], extra
    out = par.on_rank0(run, "encode the inputs")
    if par.is_main:
        tensors, extra = out
        par.send("inputs", specs=[None if t is None else (tuple(t.shape), t.dtype) for t in tensors], extra=extra)
    else:
        head = par.receive("inputs")
        tensors = [None if sp is None else torch.empty(sp[0], dtype=sp[1], device=device) for sp in head["specs"]]
        extra = head["extra"]
    for t in tensors:
        par.broadcast_(t)
    return (*tensors, extra)


def _attach_parallel(dit: WanDiT, par: Parallel) -> None:
    """Sequence parallel: the DiT splits its tokens over the rank's group (checks the head count)."""
    if par.seq is not None:
        par.seq.check_heads(dit.cfg.num_heads)
    dit.seq_parallel = par.seq


def _frames(video: torch.Tensor, what: str) -> torch.Tensor:
    """A decoded video -> uint8 frames; NaN/Inf in it (which the conversion would turn into black pixels)
    are a NonFiniteError naming the decoder (one host sync, after the decode)."""
    if not torch.isfinite(video).all():
        bad = (~torch.isfinite(video)).sum().item()
        raise NonFiniteError(f"the {what} produced {bad} NaN/Inf values out of finite latents (try vae_dtype "
                             f"fp32, or use_tiling_vae)")
    return video_to_uint8(video)


def _check_encoder(x: torch.Tensor, what: str) -> None:
    """NaN/Inf out of an encoder: a NonFiniteError naming it (not blamed on the denoising steps later)."""
    if not torch.isfinite(x).all():
        raise NonFiniteError(f"the {what} produced {(~torch.isfinite(x)).sum().item()} NaN/Inf values (check its "
                             f"weights file)")


def _check_finite(x: torch.Tensor, step: int) -> None:
    """One host sync per step, between graph replays (never inside one): it names the step that produced
    NaN/Inf and keeps the progress bar truthful; a reduction over [16, F, h, w] costs microseconds."""
    if not torch.isfinite(x).all():
        raise NonFiniteError(f"non-finite values (NaN/Inf) in the latents after denoising step {step}")


def _run_config(config, model_cls: str, defaults: dict | None = None) -> RunConfig:
    """config (RunConfig, dict of LightX2V keys, JSON path or None) as a RunConfig; `defaults` fill the keys
    a dict or file does not set (the tiny presets' size)."""
    if isinstance(config, RunConfig):
        check_model_cls(model_cls)
        return check_run_config(config, model_cls=model_cls)
    if isinstance(config, dict):
        return parse_run_config(with_defaults(config, defaults or {}), model_cls=model_cls)
    return load_run_config(config, model_cls=model_cls, defaults=defaults)


def _device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device {device!r}: not a torch device ({e}); use 'cuda', 'cuda:N' or 'cpu'") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ValueError(f"device {device!r}: CUDA is not available here (torch {torch.__version__}, "
                             f"{'a CPU-only build' if torch.version.cuda is None else 'no visible GPU'}); use 'cpu'")
        if dev.index is not None and dev.index >= n:
            raise ValueError(f"device {device!r}: only {n} CUDA device(s) visible")
    elif dev.type != "cpu":
        raise ValueError(f"device {device!r}: lightx2v-engine runs on 'cuda' or 'cpu'")
    return dev


def _check_light_vae(run: RunConfig, vae: vae_mod.WanVAE, path: Path) -> None:
    """The VAE's width comes from its file; say so when use_lightvae names a full-width one."""
    if run.use_lightvae and vae.cfg.dim >= vae_mod.VAEConfig.wan21().dim:
        warn_user(f"use_lightvae: {path} is a full-width Wan VAE (base width {vae.cfg.dim}); it runs as such")


def _vae_dtype(run: RunConfig, dev: torch.device) -> torch.dtype:
    return torch.bfloat16 if (dev.type == "cuda" and run.vae_dtype == "bf16") else torch.float32


def _t5_dtype(dev: torch.device) -> torch.dtype:
    return torch.bfloat16 if dev.type == "cuda" else torch.float32


def _clip_dtype(dev: torch.device) -> torch.dtype:
    return torch.float16 if dev.type == "cuda" else torch.float32


def _place_vae(vae: torch.nn.Module, dev: torch.device) -> torch.nn.Module:
    """The VAE's CUDA conv layout (channels_last_3d) also for weights kept on the CPU for offload: the move
    to the GPU keeps the layout."""
    if dev.type == "cuda" and vae.memory_format != torch.channels_last_3d:
        vae.use_channels_last()
    return vae


def _encoder_file(run: RunConfig, mp: Path, enc: str) -> Path:
    """The umT5 (`enc` "t5") or CLIP ("clip") file: with <enc>_quantized, <enc>_quantized_ckpt or LightX2V's
    file name for <enc>_quant_scheme (also in a folder named after the scheme, LightX2V's older layout);
    where that file is missing but the unquantized one is there, the unquantized one (with a warning:
    LightX2V's 4090 configs set both flags). Otherwise <enc>_original_ckpt or the folder's default file."""
    default, quantized_globs = (T5_FILE, T5_QUANTIZED_FILES) if enc == "t5" else (CLIP_FILE, CLIP_QUANTIZED_GLOBS)
    original = getattr(run, f"{enc}_original_ckpt")
    if getattr(run, f"{enc}_quantized"):
        from lightx2v_engine.quant import parse_quant_scheme
        scheme = parse_quant_scheme(getattr(run, f"{enc}_quant_scheme"))
        names = ([f"models_t5_umt5-xxl-enc-{scheme}.pth"] if enc == "t5" else
                 [f"models_clip_open-clip-xlm-roberta-large-vit-huge-14-{scheme}.pth", f"clip-{scheme}.pth"])
        ckpt = getattr(run, f"{enc}_quantized_ckpt")
        if ckpt is not None:  # named explicitly: it must be there
            return find_weights(f"{enc}_quantized_ckpt", ckpt, names[0], mp)
        errors = []
        for name in names:
            try:  # (LightX2V's layouts also keep them in folders named after the scheme)
                return find_file(name, mp, tuple(dict.fromkeys(SEARCH_SUBDIRS + (scheme, f"distill_{scheme}"))))
            except FileNotFoundError as e:
                errors.append(str(e))
        try:
            fallback = find_weights(f"{enc}_original_ckpt", original, default, mp)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{enc}_quantized: " + "; ".join(errors) + f"; and the unquantized file: {e}") \
                from None
        warn_user(f"{enc}_quantized: {'; '.join(errors)}; the unquantized {fallback} runs instead")
        return fallback
    return find_weights(f"{enc}_original_ckpt", original, default, mp, quantized_globs)


def _check_encoder_linears(model: torch.nn.Module, run: RunConfig, enc: str, path: Path, dev: torch.device):
    """`model` (the umT5 or CLIP just loaded from `path`) when its 8-bit linears, if any, can run as configured:
    raises ValueError naming the file when <enc>_quantized's scheme disagrees with the file's 8-bit dtype
    (as the DiT's loader does), or when they are fp8 and `dev` is a GPU before sm89 (no fp8 GEMM there)."""
    schemes = sorted({m.scheme for m in model.modules() if isinstance(m, quant.QuantLinear)})
    if not schemes:
        return model
    key = f"{enc}_quant_scheme"
    if getattr(run, f"{enc}_quantized"):
        want = quant.parse_quant_scheme(getattr(run, key))
        if schemes != [want]:
            raise ValueError(f"{path}: its 8-bit linears are {' and '.join(schemes)}, but {key} is "
                             f"{getattr(run, key)!r} ({want}); set {key} to the file's scheme (e.g. "
                             f"'{schemes[0]}-q8f') or name the {want} file in {enc}_quantized_ckpt")
    else:
        log.info("%s: its linears are 8-bit (%s) and run so (%s_quantized is false)", path, ", ".join(schemes), enc)
    if "fp8" in schemes and dev.type == "cuda" and torch.cuda.get_device_capability(dev) < quant.FP8_MIN_CAPABILITY:
        cap = torch.cuda.get_device_capability(dev)
        raise ValueError(f"{path}: its linears are fp8, and fp8 matrix multiplies need a GPU of compute capability "
                         f"8.9 or newer; {dev} is {torch.cuda.get_device_name(dev)} (sm{cap[0]}{cap[1]}). Run the "
                         f"int8 or the bf16 {enc} file")
    return model


def _graph_velocity(pipe_ref, x, t, context, neg_context, clip_fea, y) -> torch.Tensor:
    """A captured step's velocity (DistillGraphs'): Pipeline._velocity of the pipeline that
    `pipe_ref` (a weak reference) names. The graph set lives on that pipeline, so the pipeline outlives
    every warm-up and capture that calls this."""
    return pipe_ref()._velocity(x, t, context, neg_context, clip_fea, y)


def _dit_moves_whole(run: RunConfig) -> bool:
    """cpu_offload with offload_granularity "model": the DiT moves to the device for each denoising loop."""
    return run.cpu_offload and run.offload_granularity == "model"


def _place_dit(dit: WanDiT, run: RunConfig, dev: torch.device) -> None:
    """cpu_offload: blocks stream from host memory ("block"/"phase"), or the DiT stays on the CPU between
    denoising loops ("model"); otherwise it is already on `dev`."""
    if run.cpu_offload and not _dit_moves_whole(run):
        attach_block_offload(dit, dev)


def _graphs_on(run: RunConfig, dev: torch.device, par: Parallel | None = None) -> bool:
    """CUDA graphs on a CUDA device unless turned off, or the DiT is offloaded: a replay would read the
    weights from the addresses of its capture, which offload reuses for other blocks or moves; or under
    multi-GPU parallelism: their replay of NCCL collectives is not verified yet."""
    if run.use_cuda_graph and dev.type == "cuda" and run.cpu_offload:
        log.info("CUDA graphs are off: the DiT is offloaded (cpu_offload, offload_granularity %r)",
                 run.offload_granularity)
        return False
    if run.use_cuda_graph and dev.type == "cuda" and _per_use(run):
        log.info("CUDA graphs are off: the DiT is built for each video (unload_modules / lazy_load)")
        return False
    if run.use_cuda_graph and dev.type == "cuda" and par is not None:
        log.info("CUDA graphs are off under multi-GPU parallelism (their replay of NCCL collectives is not "
                 "verified yet)")
        return False
    return run.use_cuda_graph and dev.type == "cuda"


def _release_graph_memory() -> None:
    """Frees the memory pools of dropped graph sets (a set holds no cycle; the collection catches one that a
    caller's frames or a kept traceback still reach), then the caching allocator gives the blocks back."""
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def _check_task(task: str, mcfg: ModelConfig, run: RunConfig) -> None:
    if task not in ("t2v", "i2v"):
        raise ValueError(f"task must be 't2v' or 'i2v', got {task!r}")
    if (task == "i2v") != mcfg.is_i2v:
        raise ValueError(f"task {task!r} does not fit the model in the folder ({mcfg.name}, model_type "
                         f"{mcfg.model_type!r})")
    if mcfg.is_i2v and not run.use_image_encoder:
        raise ValueError("config key 'use_image_encoder' = False: LightX2V then drops the CLIP image branch of the "
                         "I2V model (image cross-attention), which lightx2v-engine does not support: Wan2.1's I2V "
                         "models run with it (remove the key or set it to true)")


def _load_quantized_dit(mcfg: ModelConfig, mp: Path, run: RunConfig, dev: torch.device,
                        lora_dev: torch.device | None = None) -> WanDiT:
    """A LightX2V quantized checkpoint (dit_quantized_ckpt): the linears of the blocks become QuantLinear."""
    from lightx2v_engine.loading import load_quantized_dit
    return load_quantized_dit(mcfg, mp, run.dit_quantized_ckpt, run.dit_quant_scheme, dtype=run.dtype, device=dev,
                              lora_specs=run.lora_configs, lora_strict=run.lora_strict,
                              lora_compute_device=lora_dev)
