"""Building the DiT: on the `meta` device, then weights assigned from a checkpoint (or random init).

Checkpoint sources, in the order searched (lightx2v.md §2):
  1. ``dit_original_ckpt`` (a file or folder; relative paths also tried under the model folder);
  2. distilled checkpoints: ``{model_path}/distill_models/distill_model.{safetensors,pt}``,
     ``{model_path}/distill_model.{safetensors,pt}`` (only for the distill model class);
  3. the Wan model folder: ``diffusion_pytorch_model.safetensors``, shards with their index, else every
     ``*.safetensors`` that holds DiT keys (LoRA files and files with no DiT key, such as the pipeline's
     ``lightvaew2_1`` / ``taew2_1``, are skipped, logged);
  4. the diffusers layout: ``{model_path}/transformer/`` with diffusers names.
Keys may carry ``model.``, ``diffusion_model.`` or ``model.diffusion_model.`` prefixes.
Whether a checkpoint fits (names, shapes, dtypes, the quantization scheme) is checked from the files' headers
before any tensor is read: a wrong file fails fast, not out of memory.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from lightx2v_engine.checkpoint import (CheckpointError, candidate_paths, key_mismatch, load_state_dict,
                                        resolve_files, safetensors_keys, tensor_meta)
from lightx2v_engine.config import ModelConfig
from lightx2v_engine.dit import WanDiT, param_dtype
from lightx2v_engine.keymap import WAN_TO_DIFFUSERS, diffusers_to_wan, is_diffusers_layout, strip_prefix

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def find_dit_checkpoint(model_path: str | Path | None, dit_original_ckpt: str | None = None,
                        distill: bool = True) -> list[Path]:
    """The checkpoint files of the DiT, or FileNotFoundError naming every place searched. Distill models, as
    LightX2V's distill runner: {model_path}/distill_model.pt first (before dit_original_ckpt); then
    dit_original_ckpt; then (older LightX2V layouts, no longer searched by LightX2V, which loads the folder's
    weights there) distill_models/distill_model.{safetensors,pt} and distill_model.safetensors; then the
    folder's DiT weights."""
    tried: list[str] = []
    mp = Path(model_path) if model_path is not None else None

    def attempt(p: Path) -> list[Path] | None:
        tried.append(str(p))
        if p.exists():
            return resolve_dit_files(p)
        return None

    if distill and mp is not None and (mp / "distill_model.pt").is_file():
        # LightX2V's distill runner (WanDistillModel._load_ckpt) loads {model_path}/distill_model.pt when it is
        # there, before anything else: dit_original_ckpt too
        if dit_original_ckpt:
            log.warning("%s is there: LightX2V's distill runner loads it before dit_original_ckpt (%s), and so "
                        "does this engine; remove or rename it to load dit_original_ckpt", mp / "distill_model.pt",
                        dit_original_ckpt)
        return resolve_dit_files(mp / "distill_model.pt")
    if dit_original_ckpt:
        for cand in candidate_paths(dit_original_ckpt, [mp]):
            found = attempt(cand)
            if found:
                return found
        raise FileNotFoundError(f"dit_original_ckpt not found; searched: {tried}")
    if mp is None:
        raise FileNotFoundError("no model_path and no dit_original_ckpt given")
    if distill:
        for cand in (mp / "distill_models" / "distill_model.safetensors", mp / "distill_models" / "distill_model.pt",
                     mp / "distill_model.safetensors", mp / "distill_model.pt"):
            found = attempt(cand)
            if found:
                return found
    index = mp / "diffusion_pytorch_model.safetensors.index.json"
    for cand in (index, mp / "diffusion_pytorch_model.safetensors"):
        found = attempt(cand)
        if found:
            return found
    tried.append(str(mp / "*.safetensors"))
    files, skipped = folder_safetensors(mp)
    if files:
        return files
    found = attempt(mp / "transformer")
    if found:
        return found
    raise FileNotFoundError(f"no DiT checkpoint found in {mp}; searched: {tried}"
                            + (f" (skipped LoRA / non-DiT files: {[p.name for p in skipped]})" if skipped else ""))


# The DiT's top-level names, Wan's and diffusers' ("blocks", "head", "condition_embedder", ...).
DIT_TOP_NAMES = frozenset(name.split(".")[0] for pair in WAN_TO_DIFFUSERS for name in pair)


# a block's parts that only the DiT has (Wan's and diffusers' names): umT5's blocks also hold "ffn" and "norm2"
_DIT_BLOCK_PARTS = frozenset({"self_attn", "cross_attn", "modulation", "norm3", "attn1", "attn2", "scale_shift_table"})


def holds_dit_keys(keys) -> bool:
    """Whether any key (its DiT prefix stripped) is the DiT's: under one of its top-level names other than
    "blocks", or under a block part only the DiT has (a Wan umT5 .safetensors has blocks.N.attn/ffn too)."""
    for k in keys:
        parts = strip_prefix(k).split(".")
        if parts[0] in DIT_TOP_NAMES - {"blocks"} or (parts[0] == "blocks" and len(parts) > 2
                                                       and parts[2] in _DIT_BLOCK_PARTS):
            return True
    return False


def resolve_dit_files(path: Path) -> list[Path]:
    """checkpoint.resolve_files for a DiT checkpoint: a folder without a shard index gives its .safetensors
    files less LoRA and non-DiT files (as the model folder's, folder_safetensors), else resolve_files'."""
    if path.is_dir() and not any(path.glob("*.index.json")):
        files, _ = folder_safetensors(path)
        if files:
            return files
    return resolve_files(path)


def folder_safetensors(folder: Path) -> tuple[list[Path], list[Path]]:
    """(DiT files, skipped files): the folder's `*.safetensors` (non-recursive, sorted) less, told from their
    headers and logged, LoRA files (lora_configs may name them relative to the model folder) and files holding
    no DiT key (the VAE / tiny decoder the pipeline finds in the folder: lightvaew2_1, taew2_1)."""
    from lightx2v_engine.lora import is_lora_key
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    lora, other = [], []
    for f in files:
        keys = safetensors_keys(f)
        if keys and all(is_lora_key(k) for k in keys):
            lora.append(f)
        elif not holds_dit_keys(keys):
            other.append(f)
    if lora:
        log.info("%s: skipping LoRA file(s) %s (not part of the DiT)", folder, [f.name for f in lora])
    if other:
        log.info("%s: skipping %s (no DiT keys, e.g. the VAE or tiny decoder; not part of the DiT)", folder,
                 [f.name for f in other])
    return [f for f in files if f not in lora and f not in other], sorted(lora + other)


def normalize_keys(keys: list[str]):
    """Returns a rename function: strips the DiT prefixes and maps diffusers names to Wan's."""
    stripped = [strip_prefix(k) for k in keys]
    if is_diffusers_layout(stripped):
        return lambda k: diffusers_to_wan(strip_prefix(k))
    return strip_prefix


def _row_scaled_fp8(t: torch.Tensor) -> bool:
    """Whether a 2-D float8_e4m3fn tensor looks per-row scaled: every row's |max| is 448, the fp8 maximum
    (all-zero rows aside; a plain cast of real weights saturates no row). From the bits: e4m3fn is
    sign-magnitude, |x| = 448 is 0x7E (0x7F is NaN)."""
    if t.dim() != 2 or t.numel() == 0:
        return False
    rowmax = (t.view(torch.uint8) & 0x7F).amax(dim=1)
    return bool((rowmax == 0x7E).any()) and bool(((rowmax == 0x7E) | (rowmax == 0)).all())


def _check_fits(cfg: ModelConfig, files: list[Path], expected: dict, qkeys: set[str], quant_scheme: str | None,
                dtype: torch.dtype):
    """Every check that names, shapes and dtypes allow, from the files' headers (no tensor data read):
    CheckpointError naming file, key and what was expected. Returns the key renaming (normalize_keys)."""
    meta = tensor_meta(files)
    scales = [k for k, *_ in meta if k.endswith(".weight_scale")]
    # ComfyUI's scaled-fp8 files: '*.scale_weight' (older), or '*.comfy_quant' beside one-number
    # '*.weight_scale' keys (newer; LightX2V's have one scale per output channel)
    comfy = [k for k, shape, *_ in meta if k.endswith((".scale_weight", ".comfy_quant")) or k == "scaled_fp8"
             or (k.endswith(".weight_scale") and math.prod(shape) == 1)]
    if comfy:
        raise CheckpointError(
            f"{', '.join(map(str, files))}: a ComfyUI scaled-fp8 checkpoint (one scale per tensor, "
            f"e.g. {comfy[0]!r}), which lightx2v-engine does not load: use LightX2V's "
            f"per-channel fp8 file (the '*_scaled_fp8_e4m3_lightx2v_*.safetensors' beside it in LightX2V's model "
            f"repositories, or tools/convert/converter.py without --comfyui_mode) as dit_quantized_ckpt, or the "
            f"bf16 checkpoint as dit_original_ckpt")
    if not qkeys and scales:  # (before the 8-bit tensors are read and cast to the run dtype)
        eight = sorted({str(dt).removeprefix("torch.") for *_, dt, _ in meta
                        if dt in (torch.int8, torch.float8_e4m3fn)})
        quantized = sorted({p for k, *_, p in meta if k.endswith(".weight_scale")})
        # files without scales that hold block linears: another DiT (not the non-block part of a checkpoint
        # split per block, as LightX2V's converter writes it)
        plain = sorted({p for k, _, dt, p in meta if p not in quantized and ".blocks." in f".{strip_prefix(k)}"
                        and k.endswith(".weight") and dt not in (torch.int8, torch.float8_e4m3fn)})
        if plain:  # a folder holding a bf16 DiT and a quantized one
            raise CheckpointError(
                f"{', '.join(map(str, files))}: two DiT checkpoints in one place: quantized "
                f"{', '.join(map(str, quantized))} ({', '.join(eight) or '8-bit'} weights with '*.weight_scale' "
                f"keys) and unquantized {', '.join(map(str, plain))}: set dit_original_ckpt to the unquantized "
                f"one, or \"dit_quantized\": true, \"dit_quantized_ckpt\" to the quantized one and "
                f"\"dit_quant_scheme\" (e.g. \"{'int8' if 'int8' in eight else 'fp8'}-sgl\")")
        raise CheckpointError(
            f"{', '.join(map(str, files))}: a quantized checkpoint ({', '.join(eight) or '8-bit'} weights with "
            f"'*.weight_scale' keys, e.g. {scales[0]!r}) loaded as unquantized weights: "
            f"set \"dit_quantized\": true, \"dit_quantized_ckpt\" to this file and \"dit_quant_scheme\" "
            f"(e.g. \"{'int8' if 'int8' in eight else 'fp8'}-sgl\") in the config, or point dit_original_ckpt at "
            f"the bf16 checkpoint")
    if qkeys and not scales:
        raise CheckpointError(f"{files[0]}: not a quantized checkpoint (no '*.weight_scale' keys); use "
                              "dit_original_ckpt for unquantized weights, or point dit_quantized_ckpt at a "
                              f"{quant_scheme} file")
    rename = normalize_keys([k for k, *_ in meta])
    info: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    origin: dict[str, Path] = {}
    for key, shape, dt, path in meta:
        try:
            name = rename(key)
        except KeyError as e:
            raise CheckpointError(f"{path}: {e.args[0]}") from None
        if name in info:
            raise CheckpointError(f"key {name!r} appears twice (in {origin[name]} and {path})")
        info[name], origin[name] = (shape, dt), path
    missing, unexpected = key_mismatch(expected, info)
    if missing or unexpected:
        where = ", ".join(sorted({str(p) for p in origin.values()}) or map(str, files))
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s) {missing[:12]}{' ...' if len(missing) > 12 else ''}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} key(s) {unexpected[:12]}{' ...' if len(unexpected) > 12 else ''}")
        raise CheckpointError(f"{where}: checkpoint does not fit {cfg.name} (dim {cfg.dim}, {cfg.num_layers} layers, "
                              f"{cfg.model_type}): " + "; ".join(parts))
    for k, v in expected.items():
        shape, dt = info[k]
        scale = k in qkeys and k.endswith("_scale")
        if (k not in qkeys or scale) and v.is_floating_point() and not dt.is_floating_point:
            msg = (f"{origin[k]}: tensor {k!r} is {dt}, {cfg.name} expects a floating-point "
                   f"tensor ({v.dtype if scale else param_dtype(k, dtype)})")
            if dt == torch.int8 and k.endswith(".weight") and not qkeys:
                msg += (f": an 8-bit quantized weight whose 'weight_scale' keys are missing (no {k + '_scale'!r}); "
                        "a quantized checkpoint needs them, and \"dit_quantized\": true with a \"dit_quant_scheme\" "
                        "(e.g. \"int8-sgl\") in the config")
            raise CheckpointError(msg)
        if k in qkeys and not scale and dt != v.dtype:
            raise CheckpointError(f"{origin[k]}: tensor {k!r} is {dt}, the {quant_scheme} scheme needs {v.dtype}")
        if shape != tuple(v.shape) and not (scale and math.prod(shape) == v.numel()):
            raise CheckpointError(f"{origin[k]}: tensor {k!r} has shape {shape}, {cfg.name} expects "
                                  f"{tuple(v.shape)}")
    return rename


def build_dit(cfg: ModelConfig, files: list[Path] | None = None, *, dtype: torch.dtype = torch.bfloat16,
              device: torch.device | str = "cpu", quant_scheme: str | None = None, random_device=None,
              seed: int = 0) -> WanDiT:
    """Builds the DiT on `meta` and assigns the checkpoint's tensors (or random weights when files is None).

    Weights are stored in `dtype` except the fp32 regions (dit.param_dtype); random ones are drawn from `seed`.
    With `quant_scheme`, the blocks' linears are QuantLinear and the checkpoint is a LightX2V quantized one
    (8-bit `weight` + fp32 `weight_scale`). Missing, unexpected, mis-shaped or mis-typed keys raise
    CheckpointError naming them before any tensor is read; fp8 weights that are per-row scaled but lack their
    scale, as they are read; nothing partially loaded is returned.
    """
    with torch.device("meta"):
        model = WanDiT(cfg)
    qkeys: set[str] = set()
    if quant_scheme is not None:
        from lightx2v_engine.quant import swap_to_quant_linear_
        for name in swap_to_quant_linear_(model, quant_scheme, dtype=dtype):  # (biases in the run dtype)
            qkeys |= {name + ".weight", name + ".weight_scale"}
    expected = {k: v for k, v in model.state_dict().items()}

    def dtype_of(k: str, t: torch.Tensor):
        if k in qkeys:
            return torch.float32 if k.endswith("_scale") else None
        return param_dtype(k, dtype)

    if files is None:
        if qkeys:
            raise ValueError("random weights with quant_scheme: build in bf16, then quant.quantize_dit_")
        sd = random_state_dict(model, dtype, device, seed=seed, random_device=random_device)
    else:
        rename = _check_fits(cfg, files, expected, qkeys, quant_scheme, dtype)

        def check(k: str, t: torch.Tensor, path: Path):
            if k not in qkeys and t.dtype == torch.float8_e4m3fn and _row_scaled_fp8(t):
                raise CheckpointError(
                    f"{path}: tensor {k!r} is float8_e4m3fn with every non-zero row's |max| at 448, the fp8 maximum: a "
                    f"per-row scaled quantized weight whose scale is missing (no {k + '_scale'!r}); read as is, its "
                    "values are off by that scale. A quantized checkpoint needs its 'weight_scale' keys, and "
                    "\"dit_quantized\": true with a \"dit_quant_scheme\" (e.g. \"fp8-sgl\") in the config")

        sd, _ = load_state_dict(files, rename=rename, dtype_of=dtype_of, device=device, check=check)
        for k in qkeys:  # (scales of [out] or [1, out] to the layers' [out, 1]; the sizes were checked)
            if k.endswith("_scale"):
                sd[k] = sd[k].reshape(expected[k].shape)
    model.load_state_dict(sd, assign=True, strict=True)
    return model.eval().requires_grad_(False)


def random_state_dict(model: WanDiT, dtype: torch.dtype, device, seed: int = 0,
                      random_device=None) -> dict[str, torch.Tensor]:
    """Random weights of realistic scale for the model's own keys (for benchmarks and the tiny preset):
    Linear/Conv weights ~ U(+-1/sqrt(fan_in)) like nn.Linear's init, biases small, norms 1, modulation
    ~ N(0, 1/dim). Drawn on `random_device` (default `device`; CPU and CUDA generators draw different
    numbers: a DiT kept in host memory for offload draws on the GPU it runs on, to be the same model as the
    resident one), one tensor at a time, stored on `device`."""
    rdev = torch.device(random_device if random_device is not None else device)
    g = torch.Generator(device=rdev).manual_seed(seed)
    sd = {}
    for k, p in model.state_dict().items():
        dt = param_dtype(k, dtype)
        t = torch.empty(p.shape, dtype=torch.float32, device=rdev)
        if "norm" in k and k.endswith(".weight") or k.endswith("proj.0.weight") or k.endswith("proj.4.weight"):
            t.fill_(1.0)
        elif k.endswith(".bias"):
            t.uniform_(-0.02, 0.02, generator=g) if "norm" not in k else t.zero_()
        elif k.endswith("modulation"):
            t.normal_(0.0, p.shape[-1] ** -0.5, generator=g)
        else:
            fan_in = p[0].numel() if p.dim() > 1 else p.numel()
            bound = fan_in ** -0.5
            t.uniform_(-bound, bound, generator=g)
        sd[k] = t.to(device=device, dtype=dt)
    return sd


def load_dit(cfg: ModelConfig, model_path: str | Path | None, *, dit_original_ckpt: str | None = None,
             distill: bool = True, dtype: str | torch.dtype = "bf16", device="cpu",
             lora_specs=(), lora_strict: bool = True, lora_compute_device=None) -> WanDiT:
    """Finds the checkpoint, builds the DiT and merges the LoRAs (in order, fp32 math, cast back; the math on
    `lora_compute_device` when given, e.g. the GPU for a DiT loaded into host memory for offload)."""
    from lightx2v_engine.lora import apply_loras_
    dt = DTYPES[dtype] if isinstance(dtype, str) else dtype
    files = find_dit_checkpoint(model_path, dit_original_ckpt, distill)
    log.info("DiT weights: %s", ", ".join(map(str, files)))
    model = build_dit(cfg, files, dtype=dt, device=device)
    if lora_specs:
        apply_loras_(model, lora_specs, strict=lora_strict, search_dirs=[model_path] if model_path else [],
                     compute_device=lora_compute_device)
    return model


def load_quantized_dit(cfg: ModelConfig, model_path: str | Path | None, ckpt: str | None, scheme: str, *,
                       dtype: str | torch.dtype = "bf16", device="cpu", lora_specs=(),
                       lora_strict: bool = True, lora_compute_device=None) -> WanDiT:
    """A LightX2V quantized checkpoint (``dit_quantized_ckpt``: file or folder; unset: the model folder's
    ``*.safetensors``, LoRA files skipped, as LightX2V does): blocks' linears 8-bit.
    LoRAs on 8-bit linears run as low-rank branches beside them (LightX2V's lora_dynamic_apply); the rest
    of the model merges them as load_dit does."""
    from lightx2v_engine.lora import apply_loras_
    dt = DTYPES[dtype] if isinstance(dtype, str) else dtype
    if ckpt:
        tried = candidate_paths(ckpt, [model_path])
        found = [cand for cand in tried if cand.exists()]
        if not found:
            raise FileNotFoundError(f"dit_quantized_ckpt not found; searched: {[str(t) for t in tried]}")
        files = resolve_dit_files(found[0])
        log.info("DiT weights (dit_quantized_ckpt, %s): %s", scheme, ", ".join(map(str, files)))
    else:
        files, skipped = folder_safetensors(Path(model_path)) if model_path is not None else ([], [])
        if not files:
            raise FileNotFoundError(
                f"dit_quantized is true and dit_quantized_ckpt is not set, but the model folder {model_path} holds "
                f"no DiT *.safetensors file" + (f" (only LoRA / non-DiT files {[p.name for p in skipped]})"
                                                if skipped else "")
                + ": set dit_quantized_ckpt to the quantized checkpoint")
        log.info("DiT weights (dit_quantized_ckpt not set: the model folder's): %s", ", ".join(map(str, files)))
    model = build_dit(cfg, files, dtype=dt, device=device, quant_scheme=scheme)
    if lora_specs:
        apply_loras_(model, lora_specs, strict=lora_strict, search_dirs=[model_path] if model_path else [],
                     compute_device=lora_compute_device)
    return model
