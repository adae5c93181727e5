"""Key names: prefix stripping and the one declarative map between Wan's and diffusers' DiT layouts."""
from __future__ import annotations

import re

# Prefixes training/conversion tools put in front of Wan's keys.
DIT_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.")

# Wan (original) <-> diffusers WanTransformer3DModel, wan21.md §2. "{N}" is a block index.
WAN_TO_DIFFUSERS = [
    ("time_embedding.0.", "condition_embedder.time_embedder.linear_1."),
    ("time_embedding.2.", "condition_embedder.time_embedder.linear_2."),
    ("time_projection.1.", "condition_embedder.time_proj."),
    ("text_embedding.0.", "condition_embedder.text_embedder.linear_1."),
    ("text_embedding.2.", "condition_embedder.text_embedder.linear_2."),
    ("img_emb.proj.0.", "condition_embedder.image_embedder.norm1."),
    ("img_emb.proj.1.", "condition_embedder.image_embedder.ff.net.0.proj."),
    ("img_emb.proj.3.", "condition_embedder.image_embedder.ff.net.2."),
    ("img_emb.proj.4.", "condition_embedder.image_embedder.norm2."),
    ("img_emb.emb_pos", "condition_embedder.image_embedder.pos_embed"),
    ("blocks.{N}.self_attn.q.", "blocks.{N}.attn1.to_q."),
    ("blocks.{N}.self_attn.k.", "blocks.{N}.attn1.to_k."),
    ("blocks.{N}.self_attn.v.", "blocks.{N}.attn1.to_v."),
    ("blocks.{N}.self_attn.o.", "blocks.{N}.attn1.to_out.0."),
    ("blocks.{N}.self_attn.norm_q.", "blocks.{N}.attn1.norm_q."),
    ("blocks.{N}.self_attn.norm_k.", "blocks.{N}.attn1.norm_k."),
    ("blocks.{N}.cross_attn.q.", "blocks.{N}.attn2.to_q."),
    ("blocks.{N}.cross_attn.k.", "blocks.{N}.attn2.to_k."),
    ("blocks.{N}.cross_attn.v.", "blocks.{N}.attn2.to_v."),
    ("blocks.{N}.cross_attn.o.", "blocks.{N}.attn2.to_out.0."),
    ("blocks.{N}.cross_attn.norm_q.", "blocks.{N}.attn2.norm_q."),
    ("blocks.{N}.cross_attn.norm_k.", "blocks.{N}.attn2.norm_k."),
    ("blocks.{N}.cross_attn.k_img.", "blocks.{N}.attn2.add_k_proj."),
    ("blocks.{N}.cross_attn.v_img.", "blocks.{N}.attn2.add_v_proj."),
    ("blocks.{N}.cross_attn.norm_k_img.", "blocks.{N}.attn2.norm_added_k."),
    ("blocks.{N}.norm3.", "blocks.{N}.norm2."),
    ("blocks.{N}.modulation", "blocks.{N}.scale_shift_table"),
    ("blocks.{N}.ffn.0.", "blocks.{N}.ffn.net.0.proj."),
    ("blocks.{N}.ffn.2.", "blocks.{N}.ffn.net.2."),
    ("head.head.", "proj_out."),
    ("head.modulation", "scale_shift_table"),
    ("patch_embedding.", "patch_embedding."),
]


def _compile(pairs, src_idx):
    rules = []
    for pair in pairs:
        src, dst = pair[src_idx], pair[1 - src_idx]
        pattern = "^" + re.escape(src).replace(re.escape("{N}"), r"(\d+)")
        rules.append((re.compile(pattern), dst))
    return rules


_TO_DIFFUSERS = _compile(WAN_TO_DIFFUSERS, 0)
_FROM_DIFFUSERS = _compile(WAN_TO_DIFFUSERS, 1)


def _apply(rules, key: str) -> str | None:
    for pattern, dst in rules:
        m = pattern.match(key)
        if m:
            head = dst.replace("{N}", m.group(1)) if m.groups() else dst
            return head + key[m.end():]
    return None


def wan_to_diffusers(key: str) -> str:
    out = _apply(_TO_DIFFUSERS, key)
    if out is None:
        raise KeyError(f"no diffusers name for Wan key {key!r}")
    return out


def diffusers_to_wan(key: str) -> str:
    out = _apply(_FROM_DIFFUSERS, key)
    if out is None:
        raise KeyError(f"no Wan name for diffusers key {key!r}")
    return out


def strip_prefix(key: str, prefixes=DIT_PREFIXES) -> str:
    for p in prefixes:
        if key.startswith(p):
            return key[len(p):]
    return key


def is_diffusers_layout(keys) -> bool:
    """True when the keys look like diffusers' WanTransformer3DModel (condition_embedder / scale_shift_table)."""
    return any(k.startswith(("condition_embedder.", "scale_shift_table", "proj_out.")) or ".attn1." in k for k in keys)
