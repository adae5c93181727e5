"""LoRA merge at load time (LightX2V's offline merge, lightx2v.md §2).

W += strength * (alpha / rank) * (up @ down)   for lora_up/lora_down, lora_B/lora_A (PEFT) and the other
                                                pairs of _PAIRS (rank = down.shape[0]; alpha = rank when
                                                absent or 0, as LightX2V and kohya read it)
An 8-bit weight (QuantLinear of a quantized DiT) keeps the low-rank pair as a branch beside its GEMM
instead (LightX2V's lora_dynamic_apply); a full-weight ``.diff`` cannot apply to it (an error).
``.diff`` adds to ``.weight`` (or to the parameter it names: ``blocks.0.modulation.diff``), ``.diff_b`` to
``.bias``, ``.diff_m`` to ``.modulation`` (times strength); PEFT's ``lora_B.bias`` (diffusers' conversion of
``.diff_b``) to ``.bias`` (times strength and the pair's alpha / rank, as PEFT applies it). Keys may carry
``diffusion_model.``, ``model.``, ``unet.`` or ``transformer.`` prefixes; diffusers-named targets are mapped
to Wan's names; kohya / musubi-tuner names (``lora_unet_blocks_0_self_attn_q``) to the Wan module whose
dotted name they spell. A diff must have its parameter's shape (leading 1s aside); a convolution's pair
(patch_embedding) merges as up.flatten(1) @ down.flatten(1) (as ComfyUI; LightX2V skips non-2-D pairs). PEFT files without ``.alpha`` keys take their
scale from the LoraConfig saved with them (read_lora). The merge is computed in fp32 and cast back to the
weight's dtype. Unmatched keys and tensors that cannot apply are an error, or skipped with a warning under
``lora_strict`` false (LightX2V skips them); a LoRA of which nothing matches or applies is an error either
way (it would change nothing).
"""
from __future__ import annotations

import errno
import logging
import os
import stat
import warnings
from pathlib import Path

import torch

from lightx2v_engine.checkpoint import CheckpointError, candidate_paths, iter_checkpoint
from lightx2v_engine.keymap import diffusers_to_wan

log = logging.getLogger(__name__)

LORA_PREFIXES = ("diffusion_model.", "model.", "unet.", "transformer.", "base_model.model.")
# (up, down) suffixes: kohya, PEFT (also with its adapter name "default"), LightX2V's own, diffusers'
# attention-processor and LoRACompatibleLinear names
_PAIRS = ((".lora_up.weight", ".lora_down.weight"), (".lora_B.weight", ".lora_A.weight"),
          (".lora_B.default.weight", ".lora_A.default.weight"), (".lora_B", ".lora_A"),
          (".lora.up.weight", ".lora.down.weight"), ("_lora.up.weight", "_lora.down.weight"),
          (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight"))
_DIFFS = ((".diff_b", ".bias"), (".diff_m", ".modulation"), (".diff", ".weight"), (".lora_B.bias", ".bias"),
          (".lora_B.default.bias", ".bias"))
KOHYA_PREFIX = "lora_unet_"


def is_lora_key(key: str) -> bool:
    """Whether a tensor name is a LoRA file's (a pair's up/down, a diff, an alpha), not a model weight's."""
    return (key.endswith(".alpha") or key.startswith(KOHYA_PREFIX)
            or any(key.endswith(s) for pair in _PAIRS for s in pair) or any(key.endswith(d) for d, _ in _DIFFS))


class LoraKeyError(ValueError):
    """LoRA keys that match no weight of the model."""


def _strip(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in LORA_PREFIXES:
            if key.startswith(p):
                key, changed = key[len(p):], True
    return key


def _target(base: str, suffix: str, params: dict, kohya: dict | None = None) -> str | None:
    """The model parameter name for a LoRA module `base` + `suffix`, trying Wan then diffusers names
    (diffusers' attention-processor LoRAs name '<attn>.processor.to_q' / '.to_out': '<attn>.to_q' /
    '.to_out.0'); `kohya` maps underscored module names (without 'lora_unet_') to dotted ones."""
    if base.startswith(KOHYA_PREFIX) and kohya is not None:  # (Wan-Fun's spell it "lora_unet__blocks_0_...")
        module = kohya.get(base[len(KOHYA_PREFIX):].lstrip("_"))
        return module + suffix if module is not None and module + suffix in params else None
    if ".processor." in base:
        base = base.replace(".processor.", ".")
        base = base + ".0" if base.endswith(".to_out") else base
    name = base + suffix
    if name in params:
        return name
    try:
        wan = diffusers_to_wan(base + suffix)
    except KeyError:
        return None
    return wan if wan in params else None


def _lora_scale(alpha, rank: int) -> float:
    """alpha / rank; 1 without alpha or with alpha 0 (LightX2V and kohya read 0 as "not set")."""
    if alpha is None or float(alpha) == 0:
        return 1.0
    return float(alpha) / rank


def _same_shape(a: tuple, b: tuple) -> bool:
    """Shapes equal once leading 1s are dropped ([1, 6, dim] modulation vs a [6, dim] diff)."""
    def trim(s):
        s = list(s)
        while s and s[0] == 1:
            s.pop(0)
        return s
    return trim(a) == trim(b)


def _pair_2d(up: torch.Tensor, down: torch.Tensor, shape: tuple, conv_ok: bool):
    """(up [out, r], down [r, in...] flattened) when up @ down gives a weight of `shape`, else None.
    A convolution's pair (kohya's, on patch_embedding: up [out, r, 1, 1, 1], down [r, in, kt, kh, kw])
    flattens to that (conv_ok; its product is reshaped to the kernel). Rank 0 is no pair."""
    if up.dim() < 2 or down.dim() < 2 or up.shape[1] != down.shape[0] or down.shape[0] == 0:
        return None
    if up.dim() == 2 and down.dim() == 2:
        return (up, down) if (up.shape[0], down.shape[1]) == shape else None
    if not conv_ok or any(d != 1 for d in up.shape[2:]) or len(shape) < 3 or up.shape[0] != shape[0] \
            or tuple(down.shape[1:]) != shape[1:]:
        return None
    return up.flatten(1), down.flatten(1)


def _model_dim(params: dict) -> int | str:
    w = params.get("head.head.weight") if "head.head.weight" in params else params.get("text_embedding.0.weight")
    return int(w.shape[-1]) if w is not None and w.dim() == 2 else "?"


def read_lora(path: str | Path) -> dict[str, torch.Tensor]:
    """A LoRA file's tensors. The PEFT LoraConfig it was saved with (diffusers' save_lora_weights: the
    safetensors header's lora_adapter_metadata; PEFT's save_pretrained: adapter_config.json beside an
    adapter_model file) gives each pair without an ``.alpha`` key its scale, as diffusers loads it:
    lora_alpha (or its alpha_pattern entry) / rank, / sqrt(rank) under use_rslora. An empty file is an
    error (it would change nothing)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"LoRA file not found: {p}")
    lora = {k: t for k, t, _ in iter_checkpoint([p])}
    if not lora:
        raise CheckpointError(f"{p}: the LoRA file holds no tensors")
    cfg = _peft_config(p)
    if cfg is not None:
        _peft_alphas_(lora, cfg, str(p))
    return lora


def _peft_config(path: Path) -> dict | None:
    """The PEFT LoraConfig fields a LoRA file was saved with, or None."""
    import json
    if path.name.startswith("adapter_model") and (path.parent / "adapter_config.json").is_file():
        try:
            cfg = json.loads((path.parent / "adapter_config.json").read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path.parent / 'adapter_config.json'}: unreadable PEFT config ({e})") from None
        return cfg if isinstance(cfg, dict) else None
    if path.suffix != ".safetensors":
        return None
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        raw = (f.metadata() or {}).get("lora_adapter_metadata")
    if raw is None:
        return None
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: corrupt lora_adapter_metadata in the safetensors header ({e})") from None
    if not isinstance(meta, dict):
        return None
    # diffusers prefixes each field with its component ("transformer."); a file for the DiT has that one
    comp = {k[len("transformer."):]: v for k, v in meta.items() if k.startswith("transformer.")}
    return comp or meta


def _peft_alphas_(lora: dict[str, torch.Tensor], cfg: dict, source: str) -> None:
    """Adds `<module>.alpha` = scale * rank for each PEFT pair without one (so _lora_scale gives scale)."""
    import re
    if cfg.get("use_dora"):
        raise LoraKeyError(f"{source}: a DoRA adapter (use_dora in its PEFT config): DoRA's magnitude "
                           "re-normalisation is not supported, only plain LoRA")
    alpha, patterns = cfg.get("lora_alpha"), cfg.get("alpha_pattern") or {}
    if alpha is None and not patterns:
        return
    for key in list(lora):
        for up_sfx, down_sfx in _PAIRS:
            if key.endswith(down_sfx) and ".lora_A" in down_sfx:
                base = key[: -len(down_sfx)]
                if base + ".alpha" in lora:
                    break
                module = _strip(base)
                a = next((v for pat, v in patterns.items() if re.fullmatch(rf"(.*\.)?({pat})", module)), alpha)
                rank = lora[key].shape[0]
                if a is None or rank == 0:
                    break
                scale = float(a) / (rank ** 0.5 if cfg.get("use_rslora") else rank)
                lora[base + ".alpha"] = torch.tensor(scale * rank, dtype=torch.float64)
                break


def plan_lora(lora: dict[str, torch.Tensor], params: dict[str, torch.Tensor], source: str = "lora"):
    """Pairs LoRA tensors with model parameters. Returns (updates, unmatched keys), where each update is
    (param name, kind, tensors, LoRA key): kind "lowrank" with (up, down, alpha or None), or "diff" with
    (delta, scale).
    Unmatched keys are reported with their prefixes stripped."""
    stripped = {_strip(k): v for k, v in lora.items()}
    if len(stripped) != len(lora):
        groups: dict[str, list[str]] = {}
        for k in lora:
            groups.setdefault(_strip(k), []).append(k)
        clashes = [g for g in groups.values() if len(g) > 1]
        raise LoraKeyError(f"{source}: {len(clashes)} key(s) collide once their prefixes {LORA_PREFIXES} are "
                           f"stripped, e.g. {' and '.join(map(repr, clashes[0]))}")
    lora = stripped
    dora = sorted(k for k in lora if k.endswith(".dora_scale"))
    if dora:  # (an error even where unmatched keys only warn: the pairs alone would merge a different model)
        raise LoraKeyError(f"{source}: a DoRA adapter ({len(dora)} '.dora_scale' keys, e.g. {dora[0]!r}): DoRA's "
                           "magnitude re-normalisation is not supported, only plain LoRA")
    for k, v in lora.items():  # an alpha is one number (read with float() at merge time)
        if k.endswith(".alpha") and v.numel() != 1:
            raise LoraKeyError(f"{source}: {k} must hold one number (the LoRA alpha), got shape {tuple(v.shape)}")
    kohya = None
    if any(k.startswith(KOHYA_PREFIX) for k in lora):
        modules = {name.rpartition(".")[0] for name in params}
        kohya = {m.replace(".", "_"): m for m in modules}
    used: set[str] = set()
    updates = []
    unmatched = []
    for key in sorted(lora):
        for up_sfx, down_sfx in _PAIRS:
            if key.endswith(up_sfx):
                base = key[: -len(up_sfx)]
                down_key = base + down_sfx
                alpha_key = base + ".alpha"
                group = [key, down_key] + ([alpha_key] if alpha_key in lora else [])
                target = _target(base, ".weight", params, kohya)
                if down_key not in lora:  # an up matrix alone: unmatched (an error unless lenient)
                    unmatched.extend([key, down_key + " (missing)"])
                elif target is None:
                    unmatched.extend(group)
                else:
                    updates.append((target, "lowrank", (lora[key], lora[down_key], lora.get(alpha_key)), key))
                used.update(group)
                break
        else:
            for diff_sfx, param_sfx in _DIFFS:
                if key.endswith(diff_sfx):
                    base = key[: -len(diff_sfx)]
                    target = _target(base, param_sfx, params, kohya)
                    if target is None and diff_sfx == ".diff":  # a diff of a parameter named in full
                        target = _target(base, "", params, kohya)
                    scale = 1.0
                    if diff_sfx.startswith(".lora_B"):  # PEFT scales lora_B's bias like the pair
                        down_key = base + diff_sfx.replace("lora_B", "lora_A").replace(".bias", ".weight")
                        scale = _lora_scale(lora.get(base + ".alpha"), lora[down_key].shape[0]) \
                            if down_key in lora else 1.0
                    if target is None:
                        unmatched.append(key)
                    else:
                        updates.append((target, "diff", (lora[key], scale), key))
                    used.add(key)
                    break
    # orphan down keys, unknown suffixes (an alpha without its pair is ignored, as LightX2V does: files pruned
    # or converted keep them)
    unmatched.extend(k for k in lora if k not in used and not k.endswith(".alpha"))
    seen: dict[tuple[str, str], str] = {}
    for target, kind, _, key in updates:  # one weight reached under two key layouts would be merged twice
        other = seen.setdefault((target, kind), key)
        if other != key:
            raise LoraKeyError(f"{source}: LoRA keys {other!r} and {key!r} both update {target!r} (the same weight "
                               f"under two key layouts): it would be merged twice")
    return updates, sorted(set(unmatched))


@torch.no_grad()
def merge_lora_(model: torch.nn.Module, lora: dict[str, torch.Tensor], strength: float = 1.0,
                source: str = "lora", strict: bool = True, before_write=None,
                compute_device: torch.device | str | None = None, check_only: bool = False) -> int:
    """Merges one LoRA into the model's weights in place. Returns the number of merged tensors.
    check_only: every check (keys, shapes, 8-bit diffs), no change (the model may live on `meta`).

    Unmatched LoRA keys, and tensors that cannot apply (shape, rank 0, a full-weight diff on an 8-bit weight),
    raise LoraKeyError naming them (strict) or warn and are skipped. Shapes are checked before any
    weight is touched, so a failing LoRA leaves the model unchanged. `before_write(name, target)` is called
    before each change: target is the parameter about to change, or the QuantLinear about to get a branch.
    `compute_device`: where the fp32 merge arithmetic runs (default: each weight's device; a CUDA device
    for weights kept in host memory by offload, one weight at a time).
    """
    from lightx2v_engine.quant import QuantLinear
    params = dict(model.named_parameters())
    quantized = {}  # 8-bit weight name -> its QuantLinear; its bias (a buffer) takes diffs like a parameter
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            quantized[f"{name}.weight"] = m
            params[f"{name}.weight"] = m.weight
            if m.bias is not None:
                params[f"{name}.bias"] = m.bias
    updates, unmatched = plan_lora(lora, params, source)
    if lora and not updates:
        raise LoraKeyError(f"{source}: none of its {len(lora)} LoRA keys matches a weight of the model (e.g. "
                           f"{sorted(lora)[:5]}): not a LoRA for this Wan DiT, or in a key layout lightx2v-engine "
                           f"does not read")
    if unmatched:
        msg = f"{source}: {len(unmatched)} LoRA key(s) match no model weight: {unmatched[:20]}" + (
            " ..." if len(unmatched) > 20 else "")
        if strict:
            raise LoraKeyError(msg + ' (set "lora_strict": false in the config to skip them with a warning, as '
                                     "LightX2V does silently)")
        warnings.warn(msg, stacklevel=2)
    deltas, bad = [], []  # bad: (LoRA key, why) of updates that cannot apply
    for target, kind, ts, key in updates:
        w = params[target]
        if kind == "lowrank":
            up, down, alpha = ts
            pair = _pair_2d(up, down, tuple(w.shape), conv_ok=target not in quantized)
            if pair is None:
                bad.append((key, f"up {tuple(up.shape)} @ down {tuple(down.shape)} does not give {target!r}'s shape "
                                 f"{tuple(w.shape)}" + (" (rank 0)" if 0 in (up.numel(), down.numel()) else "")))
                continue
            deltas.append((target, w, kind, pair, strength * _lora_scale(alpha, pair[1].shape[0])))
        else:
            d, scale = ts
            if target in quantized:
                bad.append((key, f"a full-weight diff for {target!r}, an 8-bit weight of the quantized DiT, cannot "
                                 f"be applied (it merges only into bf16 weights: with weight_auto_quant, list the "
                                 f"LoRA in the config's lora_configs, merged before quantizing; else use the bf16 "
                                 f"checkpoint: dit_quantized false)"))
            elif not _same_shape(tuple(d.shape), tuple(w.shape)):
                bad.append((key, f"diff of shape {tuple(d.shape)} for {target!r} of shape {tuple(w.shape)}"))
            else:
                deltas.append((target, w, kind, (d,), strength * scale))
    if bad:
        msg = f"{source}: {len(bad)} LoRA tensor(s) cannot apply to the model: " + "; ".join(
            f"{k}: {why}" for k, why in bad[:5]) + (" ..." if len(bad) > 5 else "")
        if len(bad) > 1 and not deltas:
            dims = sorted({int(t[0].shape[0] if kind == "lowrank" else t[0].shape[-1])
                           for _, kind, t, _ in updates if t[0].dim() >= 1})
            msg += (f" - none applies: a LoRA for another model (its tensors' sizes include {dims[:6]}; this "
                    f"model's dim is {_model_dim(params)}; Wan2.1 1.3B has 1536, 14B 5120)?")
        if strict or not deltas:
            raise LoraKeyError(msg + ("" if not deltas else
                                      ' (set "lora_strict": false in the config to skip them with a warning)'))
        warnings.warn(msg + " - skipped", stacklevel=2)
    if check_only:
        return len(deltas)
    for target, w, kind, ts, s in deltas:
        dev = torch.device(compute_device) if compute_device is not None else w.device
        if before_write is not None:
            before_write(target, quantized.get(target, w))
        if target in quantized:  # low-rank (a diff was refused above)
            quantized[target].add_lora(ts[0], ts[1], s)
        elif kind == "lowrank":
            up, down = (t.to(dev, torch.float32) for t in ts)
            w.copy_((w.to(dev, torch.float32) + s * (up @ down).reshape(w.shape)).to(w.dtype))
        else:
            w.copy_((w.to(dev, torch.float32) + s * ts[0].to(dev, torch.float32).reshape(w.shape)).to(w.dtype))
    log.info("%s: merged %d tensors (strength %g)", source, len(deltas), strength)
    return len(deltas)


def apply_loras_(model: torch.nn.Module, specs, strict: bool = True, search_dirs=(),
                 compute_device: torch.device | str | None = None, before_write=None) -> int:
    """Merges every LoRA of `specs` (LoraSpec list) in order (merge_lora_'s options). Returns the total
    number of merged tensors."""
    total = 0
    for spec in specs:
        path = _find(spec.path, search_dirs)
        total += merge_lora_(model, read_lora(path), spec.strength, source=str(path), strict=strict,
                             compute_device=compute_device, before_write=before_write)
    return total


class LoraSwitch:
    """LoRAs that change from one generation to the next (the server's per-request ``lora_name``), on top
    of the model as loaded (its config LoRAs included).

    ``set(specs)`` first restores what the previous set changed - exactly: weights from copies kept in host
    memory when first changed, an 8-bit linear's branches by putting its earlier ones back - then merges
    `specs` in order. The same specs again, their files unchanged, cost a stat each (a LoRA file
    overwritten since its merge is merged again). A failing LoRA (missing file, unmatched keys,
    wrong shapes) leaves the model as loaded and raises; an interrupted restore leaves ``current`` None,
    and the next ``set()`` restores the rest first. Host memory: one copy of every weight a LoRA has
    changed (a full-model LoRA on 14B bf16: about 27 GB), kept for later switches; for GPU weights it is
    page-locked, so saving and restoring are DMA copies ordered on the current stream (no host sync), and
    a switch from one LoRA to another copies nothing back (the copies are the weights just restored).
    Weights are looked up by name at restore time: an offloaded block re-packed in between keeps working."""

    def __init__(self, model: torch.nn.Module, strict: bool = True, search_dirs=(),
                 compute_device: torch.device | str | None = None):
        self.model, self.strict, self.search_dirs = model, strict, list(search_dirs)
        self.compute_device = compute_device  # where the merge arithmetic runs (merge_lora_)
        # the request LoRAs merged now: () for the model as loaded, None after an interrupted restore (the
        # weights a mix of loaded and merged; the next set() restores the rest first)
        self.current: tuple | None = ()
        # what set() compares: resolve_specs' key of `current` (() for none, None while `current` is None)
        self._key: tuple | None = ()
        # name -> ("tensor", module, attribute, host copy) | ("branch", QuantLinear, down, up)
        self._saved: dict[str, tuple] = {}
        self._host: dict[str, tuple] = {}  # name -> (owner of the page-locking, buffer), reused by later switches
        self._fresh: set[str] = set()  # names whose buffer equals the weight right now (restored in this set())
        self.touched_quantized = False  # the last set() replaced branch tensors of 8-bit linears

    @property
    def host_bytes(self) -> int:
        return sum(buf.numel() * buf.element_size() for _, buf in self._host.values())

    def _host_copy(self, name: str, w: torch.Tensor) -> torch.Tensor:
        """w's values in host memory, in this switch's buffer for `name` (page-locked for a GPU weight)."""
        held = self._host.get(name)
        if held is None or held[1].shape != w.shape or held[1].dtype != w.dtype:
            from lightx2v_engine.offload import _host_buffer
            owner = _BufferOwner()  # dropping the entry unlocks and frees the buffer
            raw = _host_buffer(w.numel() * w.element_size(), w.is_cuda, owner, w.device)
            held = self._host[name] = (owner, raw.view(w.dtype).view(w.shape))
            self._fresh.discard(name)
        if name in self._fresh:  # restored from this very buffer in this set(): nothing to copy
            return held[1]
        return held[1].copy_(w.detach(), non_blocking=w.is_cuda)  # (before the merge writes w: same stream)

    def _save(self, name: str, target) -> None:
        if name in self._saved:
            return
        if isinstance(target, torch.Tensor):
            module_name, _, attr = name.rpartition(".")
            module = self.model.get_submodule(module_name)
            self._saved[name] = ("tensor", module, attr, self._host_copy(name, target))
        else:  # copies: the branches may be views of an offloaded block's packed buffer, re-packed later
            clone = lambda t: None if t is None else t.clone()  # noqa: E731
            self._saved[name] = ("branch", target, clone(target.lora_down), clone(target.lora_up))
            self.touched_quantized = True

    @torch.no_grad()
    def restore(self) -> None:
        """The model as loaded (no request LoRA). Interrupted part-way (KeyboardInterrupt, an error), it
        leaves `current` None, the weights a mix, and `_saved` the entries not yet restored: the next
        restore() or set() restores those."""
        self.current = self._key = None
        while self._saved:
            name, entry = next(iter(self._saved.items()))
            if entry[0] == "tensor":  # the module's tensor now (a re-packed block has new buffer objects)
                w = getattr(entry[1], entry[2])
                w.copy_(entry[3], non_blocking=w.is_cuda)
                self._fresh.add(name)
            else:
                entry[1].lora_down, entry[1].lora_up = entry[2], entry[3]
            del self._saved[name]  # (after its restore: an interrupted one is done again, which is harmless)
        self.current = self._key = ()

    def set(self, specs) -> bool:
        """Makes `specs` (LoraSpec sequence) the request LoRAs. Returns whether the weights changed.
        Each LoRA is known by its file's absolute path (symbolic links followed, relative paths found as
        apply_loras_ finds them), its strength and its file's identity from one stat taken before it is
        read (resolve_specs): the same LoRAs again cost that stat each, and a file overwritten since it was
        merged (or a link pointed elsewhere) is read and merged again."""
        specs = tuple(specs)
        try:
            resolved, key = resolve_specs(specs, self.search_dirs)
        except BaseException:  # (a missing file) as a LoRA that fails to merge: the model as loaded
            try:
                self._take_off()
            finally:
                self._fresh.clear()
            raise
        if key == self._key:  # (touched_quantized still says what the last switch did)
            return False
        self._take_off()
        try:
            apply_loras_(self.model, resolved, self.strict, self.search_dirs, self.compute_device,
                         before_write=self._save)
        except BaseException:
            self.restore()
            raise
        finally:  # a buffer is known to equal its weight only between this set()'s restore and merge
            self._fresh.clear()
        self.current, self._key = specs, key
        return True

    def _take_off(self) -> None:
        """set()'s restore of what the previous set merged."""
        # the previous set's branches go back (restore) or new ones come (_save): either replaces tensors
        # (branches an interrupted restore put back were counted by the set() it interrupted)
        self.touched_quantized = any(e[0] == "branch" for e in self._saved.values())
        self._fresh.clear()
        self.restore()


class _BufferOwner:
    """Holds the page-locking of one kept host buffer (released when this object goes)."""


def resolve_spec(spec, search_dirs=()):
    """spec (config.LoraSpec) with its file's absolute path (as given, then under each of search_dirs): each
    later read finds it whatever the working directory is by then."""
    return resolve_specs((spec,), search_dirs)[0][0]


def resolve_specs(specs, search_dirs=()) -> tuple[tuple, tuple]:
    """(specs with their files' absolute paths (resolve_spec; symbolic links followed), their identity): one
    (absolute path, strength, (st_dev, st_ino, st_size, st_mtime_ns)) per spec, from one stat of its file
    taken now, before any read of it. Equal identities: the same files, not written since (a file replaced
    or overwritten gets a new inode, size or modification time; one rewritten in place to the same size
    within the file system's timestamp granularity is not told apart). LoraSwitch.set and
    Pipeline.set_request_loras compare them to skip work, both paths alike."""
    from lightx2v_engine.config import LoraSpec
    resolved, key = [], []
    for spec in specs:
        path, st = _find_stat(spec.path, search_dirs)
        full = str(path.resolve())
        resolved.append(LoraSpec(full, spec.strength))
        key.append((full, spec.strength, (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)))
    return tuple(resolved), tuple(key)


def _find(path: str, search_dirs) -> Path:
    return _find_stat(path, search_dirs)[0]


def _find_stat(path: str, search_dirs) -> tuple[Path, os.stat_result]:
    """(the first candidate path that is a file, its stat). The errors Path.is_file takes for "no file" skip a
    candidate; others (permission denied) are raised."""
    tried = candidate_paths(path, search_dirs)
    for cand in tried:
        try:
            st = cand.stat()
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.ENOTDIR, errno.EBADF, errno.ELOOP):
                raise
            continue
        except ValueError:  # (an embedded NUL)
            continue
        if stat.S_ISREG(st.st_mode):
            return cand, st
    raise FileNotFoundError(f"LoRA file not found: {path} (searched {[str(t) for t in tried]})")


__all__ = ["merge_lora_", "apply_loras_", "read_lora", "plan_lora", "LoraSwitch", "resolve_specs", "LoraKeyError",
           "CheckpointError"]
