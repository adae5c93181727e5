"""A complete tiny model folder in the real Wan2.1 layout, with random weights (tests and demos).

    python -m lightx2v_engine.tiny OUT_DIR [--task t2v|i2v]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from lightx2v_engine import clip as clip_mod
from lightx2v_engine import t5 as t5_mod
from lightx2v_engine import vae as vae_mod
from lightx2v_engine.config import get_preset
from lightx2v_engine.loading import build_dit
from lightx2v_engine.pipeline import CLIP_FILE, T5_FILE, VAE_FILE


def make_tiny_model_folder(path: str | Path, task: str = "t2v", seed: int = 0) -> Path:
    """Writes config.json, diffusion_pytorch_model.safetensors, the umT5 .pth, Wan2.1_VAE.pth, the tokenizer
    (google/umt5-xxl/tokenizer.json) and for I2V the CLIP .pth (visual.* keys), all tiny and random."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = get_preset("tiny-i2v" if task == "i2v" else "tiny")
    (path / "config.json").write_text(json.dumps({
        "_class_name": "WanModel", "dim": cfg.dim, "eps": cfg.eps, "ffn_dim": cfg.ffn_dim, "freq_dim": cfg.freq_dim,
        "in_dim": cfg.in_dim, "model_type": cfg.model_type, "num_heads": cfg.num_heads, "num_layers": cfg.num_layers,
        "out_dim": cfg.out_dim, "text_len": 512, "text_dim": cfg.text_dim}, indent=2))
    torch.manual_seed(seed)
    dit = build_dit(cfg, None, dtype=torch.bfloat16)
    save_file({k: v.contiguous() for k, v in dit.state_dict().items()}, str(path / "diffusion_pytorch_model.safetensors"))
    torch.save(t5_mod.random_t5(t5_mod.T5Config.tiny(), dtype=torch.bfloat16, seed=seed).state_dict(), path / T5_FILE)
    t5_mod.make_tiny_tokenizer(str(path))
    torch.save(vae_mod.random_vae(vae_mod.VAEConfig.tiny(), seed=seed).state_dict(), path / VAE_FILE)
    if task == "i2v":
        visual = clip_mod.random_clip(clip_mod.CLIPConfig.tiny(), dtype=torch.float16, seed=seed).state_dict()
        torch.save({"visual." + k: v for k, v in visual.items()}, path / CLIP_FILE)
    return path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m lightx2v_engine.tiny",
                                description="write a tiny random Wan2.1 model folder")
    p.add_argument("out")
    p.add_argument("--task", default="t2v", choices=["t2v", "i2v"])
    a = p.parse_args(argv)
    print(make_tiny_model_folder(a.out, a.task))


if __name__ == "__main__":
    main()
