"""umT5-XXL text encoder (Wan2.1's `models_t5_umt5-xxl-enc-bf16.pth`) and its tokenizer.

The module tree mirrors Wan's checkpoint, so ``T5Encoder.state_dict()`` keys are the file's keys:
``token_embedding.weight``, ``blocks.N.{norm1, attn.{q,k,v,o}, pos_embedding.embedding, norm2,
ffn.{gate.0, fc1, fc2}}.weight``, ``norm.weight``.

Per block (pre-norm, no biases, no dropout):
    x = x + o(softmax(q kᵀ + bias_pos + mask) v)      unscaled scores, softmax in fp32
    x = x + fc2(fc1(h) * gelu_tanh(gate(h)))           h = rmsnorm(x)
with a per-layer bidirectional relative-position bias (32 buckets, max distance 128).
Runs in the weights' dtype (bf16 on CUDA, bf16/fp32 on CPU) with no autocast, like Wan, in Wan's rounding
order: RMSNorm variance in fp32 (cast to the weight's dtype before the multiply), softmax in fp32, gelu_tanh
as Wan's formula op by op in the activations' dtype.
"""
from __future__ import annotations

import html
import json
import math
import os
import warnings
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from lightx2v_engine.checkpoint import assign_checked, read_state_dict_file

__all__ = [
    "T5Config", "T5Encoder", "UMT5Tokenizer", "load_t5", "random_t5", "quantize_t5_", "load_tokenizer", "encode_text",
    "make_tiny_tokenizer", "clean_text", "relative_position_bucket", "TOKENIZER_SUBDIR",
]

TOKENIZER_SUBDIR = os.path.join("google", "umt5-xxl")


@dataclass(frozen=True)
class T5Config:
    vocab: int = 256384
    dim: int = 4096
    dim_attn: int = 4096
    dim_ffn: int = 10240
    num_heads: int = 64
    num_layers: int = 24
    num_buckets: int = 32
    max_dist: int = 128
    eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.dim_attn // self.num_heads

    @staticmethod
    def umt5_xxl() -> "T5Config":
        return T5Config()

    @staticmethod
    def tiny() -> "T5Config":
        return T5Config(vocab=256, dim=64, dim_attn=64, dim_ffn=96, num_heads=2, num_layers=2)

    @staticmethod
    def from_state_dict(sd: dict[str, torch.Tensor], source: str = "state dict") -> "T5Config":
        """Reads every size from tensor shapes (num_heads from pos_embedding [num_buckets, heads])."""
        needed = ["token_embedding.weight", "blocks.0.attn.q.weight", "blocks.0.ffn.fc1.weight",
                  "blocks.0.pos_embedding.embedding.weight"]
        missing = [k for k in needed if k not in sd]
        if missing:
            raise ValueError(f"{source}: not a Wan umT5 encoder checkpoint, missing keys {missing}")
        vocab, dim = sd["token_embedding.weight"].shape
        dim_attn = sd["blocks.0.attn.q.weight"].shape[0]
        dim_ffn = sd["blocks.0.ffn.fc1.weight"].shape[0]
        num_buckets, num_heads = sd["blocks.0.pos_embedding.embedding.weight"].shape
        layers = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
        num_layers = max(layers) + 1
        if dim_attn % num_heads:
            raise ValueError(f"{source}: dim_attn {dim_attn} not divisible by num_heads {num_heads}")
        return T5Config(vocab=vocab, dim=dim, dim_attn=dim_attn, dim_ffn=dim_ffn, num_heads=num_heads,
                        num_layers=num_layers, num_buckets=num_buckets)


# ----------------------------------------------------------------------------------------------- model

class T5RMSNorm(nn.Module):
    """y = w * (x / sqrt(mean(x²) + eps)); the variance in fp32, cast to w's dtype before the multiply."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x * torch.rsqrt(x.float().pow(2).mean(dim=-1, keepdim=True) + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            y = y.to(self.weight.dtype)
        return self.weight * y


def relative_position_bucket(rel_pos: torch.Tensor, num_buckets: int = 32, max_dist: int = 128) -> torch.Tensor:
    """Bidirectional T5 bucket of rel_pos = key_pos - query_pos.

    Half the buckets per direction (keys after the query get the upper half); within a half, distances
    < n/4 get their own bucket, larger ones are log-spaced up to max_dist and clamped to the last bucket.
    """
    half = num_buckets // 2
    buckets = (rel_pos > 0).long() * half
    dist = rel_pos.abs()
    max_exact = half // 2
    # dist=0 gives log(0) = -inf here; torch.where picks the exact branch for it.
    large = max_exact + (torch.log(dist.float() / max_exact) / math.log(max_dist / max_exact)
                         * (half - max_exact)).long()
    large = large.clamp(max=half - 1)
    return buckets + torch.where(dist < max_exact, dist, large)


class _Embedding(nn.Embedding):
    """nn.Embedding whose init skips meta tensors (the models are built on meta, then assigned): torch's
    normal_ on meta goes through torch._refs, whose first use imports torch._dynamo (~2 s a process)."""

    def reset_parameters(self) -> None:
        if not self.weight.is_meta:
            super().reset_parameters()


class T5RelativeEmbedding(nn.Module):
    """Learned per-head bias for each relative-position bucket: embedding [num_buckets, H]."""

    def __init__(self, num_buckets: int, num_heads: int):
        super().__init__()
        self.embedding = _Embedding(num_buckets, num_heads)

    def forward(self, buckets: torch.Tensor) -> torch.Tensor:
        """buckets [Lq, Lk] (long) -> bias [1, H, Lq, Lk]."""
        return self.embedding(buckets).permute(2, 0, 1).unsqueeze(0)


class T5Attention(nn.Module):
    def __init__(self, dim: int, dim_attn: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim_attn, bias=False)
        self.k = nn.Linear(dim, dim_attn, bias=False)
        self.v = nn.Linear(dim, dim_attn, bias=False)
        self.o = nn.Linear(dim_attn, dim, bias=False)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """x [B, L, C], bias [B or 1, H, L, L] (position bias with dtype-min at padded keys) -> [B, L, C]."""
        B, L, _ = x.shape
        H = self.num_heads
        q = self.q(x).view(B, L, H, -1).transpose(1, 2)
        k = self.k(x).view(B, L, H, -1).transpose(1, 2)
        v = self.v(x).view(B, L, H, -1).transpose(1, 2)
        # T5 scores are unscaled (the 1/sqrt(D) is folded into the q init).
        scores = torch.matmul(q, k.transpose(-1, -2)) + bias
        attn = F.softmax(scores.float(), dim=-1).to(scores.dtype)
        out = torch.matmul(attn, v).transpose(1, 2).reshape(B, L, -1)
        return self.o(out)


class T5GELU(nn.Module):
    """Wan's gelu_tanh: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), op by op in x's dtype.

    (nn.GELU("tanh") computes it in fp32 and rounds once: in bf16 that moved the 2-layer test encoder's output
    0.6% rel L2 away from Wan's order; in fp32 the two agree to ~1e-7.)
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class T5FeedForward(nn.Module):
    """fc2(fc1(x) * gelu_tanh(gate(x)))."""

    def __init__(self, dim: int, dim_ffn: int):
        super().__init__()
        self.gate = nn.Sequential(nn.Linear(dim, dim_ffn, bias=False), T5GELU())
        self.fc1 = nn.Linear(dim, dim_ffn, bias=False)
        self.fc2 = nn.Linear(dim_ffn, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x) * self.gate(x))


def _fp16_clamp(x: torch.Tensor) -> torch.Tensor:
    # fp16 residuals of umT5 can overflow; Wan clamps them (a no-op for bf16/fp32).
    if x.dtype == torch.float16:
        big = torch.finfo(torch.float16).max - 1000
        x = x.clamp(-big, big)
    return x


class T5Block(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.norm1 = T5RMSNorm(cfg.dim, cfg.eps)
        self.attn = T5Attention(cfg.dim, cfg.dim_attn, cfg.num_heads)
        self.norm2 = T5RMSNorm(cfg.dim, cfg.eps)
        self.ffn = T5FeedForward(cfg.dim, cfg.dim_ffn)
        self.pos_embedding = T5RelativeEmbedding(cfg.num_buckets, cfg.num_heads)

    def forward(self, x: torch.Tensor, buckets: torch.Tensor, key_pad: torch.Tensor | None) -> torch.Tensor:
        """x [B, L, C]; buckets [L, L]; key_pad [B, 1, 1, L] bool (True = padded key) or None."""
        bias = self.pos_embedding(buckets).to(x.dtype)
        if key_pad is not None:
            bias = bias.masked_fill(key_pad, torch.finfo(x.dtype).min)
        x = _fp16_clamp(x + self.attn(self.norm1(x), bias))
        return _fp16_clamp(x + self.ffn(self.norm2(x)))


class T5Encoder(nn.Module):
    """umT5 encoder: ids [B, L] (+ mask [B, L], 1 = token) -> hidden states [B, L, dim]."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.cfg = cfg
        self.token_embedding = _Embedding(cfg.vocab, cfg.dim)
        self.blocks = nn.ModuleList([T5Block(cfg) for _ in range(cfg.num_layers)])
        self.norm = T5RMSNorm(cfg.dim, cfg.eps)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if ids.ndim != 2:
            raise ValueError(f"T5Encoder: ids must be [B, L], got shape {tuple(ids.shape)}")
        B, L = ids.shape
        pos = torch.arange(L, device=ids.device)
        buckets = relative_position_bucket(pos[None, :] - pos[:, None], self.cfg.num_buckets, self.cfg.max_dist)
        key_pad = None
        if mask is not None:
            if mask.shape != ids.shape:
                raise ValueError(f"T5Encoder: mask shape {tuple(mask.shape)} != ids shape {tuple(ids.shape)}")
            key_pad = (mask == 0).view(B, 1, 1, L)
        x = self.token_embedding(ids)
        for block in self.blocks:
            x = block(x, buckets, key_pad)
        return self.norm(x)


# ------------------------------------------------------------------------------------- loading / init

# The linears of a block that LightX2V's quantized umT5 files hold as 8-bit `weight` + `weight_scale`.
QUANT_LINEARS = ("attn.q", "attn.k", "attn.v", "attn.o", "ffn.gate.0", "ffn.fc1", "ffn.fc2")


def load_t5(path: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16) -> T5Encoder:
    """Loads Wan's umT5 encoder file (.pth, or .safetensors) into a T5Encoder on `device` in `dtype`.

    Sizes come from the tensor shapes, so the real umT5-XXL file and tiny test files load the same way.
    A LightX2V quantized file (``models_t5_umt5-xxl-enc-{fp8,int8}.pth``: a linear's `weight` in float8
    e4m3 / int8 next to its `weight_scale` [out] or [out, 1]) loads those linears as QuantLinear (8-bit
    GEMMs with per-token activation scales on CUDA); everything else stays in `dtype`.
    Raises FileNotFoundError (missing file) or ValueError (wrong keys/shapes, naming the file).
    """
    from lightx2v_engine.quant import swap_scaled_linears_
    sd = read_state_dict_file(path)
    cfg = T5Config.from_state_dict(sd, source=str(path))
    with torch.device("meta"):
        model = T5Encoder(cfg)
    swap_scaled_linears_(model, sd, str(path))
    assign_checked(model, sd, str(path))
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


@torch.no_grad()
def quantize_t5_(model: T5Encoder, scheme: str) -> T5Encoder:
    """The block linears (QUANT_LINEARS) as QuantLinear holding their current weights quantized per output
    channel: what a LightX2V quantized file holds (used for random-weight pipelines with t5_quantized)."""
    from lightx2v_engine.quant import quantize_linears_
    return quantize_linears_(model, [f"blocks.{i}.{n}" for i in range(len(model.blocks)) for n in QUANT_LINEARS],
                             scheme)


@torch.no_grad()
def random_t5(cfg: T5Config, device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16,
              seed: int = 0, random_device: str | torch.device | None = None) -> T5Encoder:
    """T5Encoder with seeded random weights (Wan's init scales), allocated on `device`; the numbers are drawn
    on `random_device` (default `device`) one parameter at a time (CPU and CUDA generators differ: a model
    kept in host memory draws where it runs, to be the resident one's twin without the whole of it there)."""
    with torch.device("meta"):
        model = T5Encoder(cfg).to(dtype)
    model = model.to_empty(device=device)
    rdev = torch.device(random_device if random_device is not None else device)
    gen = torch.Generator(device=rdev).manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith(("norm1.weight", "norm2.weight")) or name == "norm.weight":
            p.fill_(1.0)
            continue
        if name == "token_embedding.weight":
            std = 1.0
        elif name.endswith("attn.q.weight"):
            std = (cfg.dim * cfg.head_dim) ** -0.5  # folds in the missing 1/sqrt(D) of the scores
        elif name.endswith("attn.o.weight"):
            std = cfg.dim_attn ** -0.5
        elif name.endswith("ffn.fc2.weight"):
            std = cfg.dim_ffn ** -0.5
        elif name.endswith("pos_embedding.embedding.weight"):
            std = (2 * cfg.num_buckets * cfg.num_heads) ** -0.5
        else:  # k, v, fc1, gate.0
            std = cfg.dim ** -0.5
        if rdev == p.device:
            p.normal_(0.0, std, generator=gen)
        else:
            p.copy_(torch.empty(p.shape, dtype=p.dtype, device=rdev).normal_(0.0, std, generator=gen))
    return model.eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------- tokenizer

def clean_text(text: str) -> str:
    """Wan's cleaning: ftfy.fix_text, html-unescape twice, collapse whitespace. (ftfy is a dependency; an
    install without it warns once and skips that part: prompts with curly quotes or mojibake then tokenize
    differently from Wan's.)"""
    try:
        import ftfy
    except ImportError:  # (the default warning filter shows it once)
        ftfy = None
        warnings.warn("ftfy is not installed: prompts are cleaned without ftfy.fix_text, unlike Wan's "
                      "(pip install ftfy)", stacklevel=2)
    if ftfy is not None:
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


class UMT5Tokenizer:
    """Wraps a `tokenizers.Tokenizer`: cleaned text + exactly one `</s>`, truncated/padded to text_len.

    The text is encoded without the tokenizer's post-processor and `</s>` is appended here, so it is
    present exactly once whether or not tokenizer.json's post-processor would append it (umT5's does:
    `$A </s>`, which gives the same ids). Truncation keeps `</s>` last, as HF's T5 tokenizer does.
    """

    def __init__(self, tokenizer, source: str = "tokenizer"):
        self.tokenizer = tokenizer
        self.source = source
        self.eos_id = tokenizer.token_to_id("</s>")
        if self.eos_id is None:
            raise ValueError(f"{source}: tokenizer has no '</s>' token")
        pad = tokenizer.token_to_id("<pad>")
        self.pad_id = 0 if pad is None else pad
        tokenizer.no_padding()
        tokenizer.no_truncation()
        with_special = tokenizer.encode("a", add_special_tokens=True).ids
        without = tokenizer.encode("a", add_special_tokens=False).ids
        # Informational: whether tokenizer.json's own post-processor appends `</s>`.
        self.post_processor_appends_eos = with_special == without + [self.eos_id]

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def __call__(self, prompts: list[str], text_len: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
        """prompts -> (ids [B, text_len] long, mask [B, text_len] long; 1 = token incl. `</s>`)."""
        if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)) or len(prompts) == 0:
            raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r}")
        bad = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
        if bad:
            raise ValueError(f"prompts must be strings; entries {bad} are {[type(prompts[i]).__name__ for i in bad]}")
        if text_len < 1:
            raise ValueError(f"text_len must be >= 1, got {text_len}")
        encs = self.tokenizer.encode_batch([clean_text(p) for p in prompts], add_special_tokens=False)
        ids = torch.full((len(prompts), text_len), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), text_len), dtype=torch.long)
        for i, enc in enumerate(encs):
            row = enc.ids[: text_len - 1] + [self.eos_id]
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, : len(row)] = 1
        return ids, mask


def load_tokenizer(model_path: str) -> UMT5Tokenizer:
    """Reads `{model_path}/google/umt5-xxl/tokenizer.json` with the `tokenizers` library."""
    from tokenizers import Tokenizer

    path = os.path.join(os.fspath(model_path), TOKENIZER_SUBDIR, "tokenizer.json")
    if not os.path.isfile(path):
        spiece = os.path.join(os.fspath(model_path), TOKENIZER_SUBDIR, "spiece.model")
        hint = (f"; {spiece} alone is not read (the sentencepiece model needs the sentencepiece package): put "
                f"google/umt5-xxl's tokenizer.json beside it (from the Hugging Face repo google/umt5-xxl)"
                if os.path.isfile(spiece) else "")
        raise FileNotFoundError(f"umT5 tokenizer not found: {path} (expected google/umt5-xxl's tokenizer.json"
                                f" inside the model folder){hint}")
    try:
        tok = Tokenizer.from_file(path)
    except Exception as e:  # (the tokenizers library raises a bare Exception naming no file)
        with open(path, "rb") as f:
            head = f.read(64)
        hint = (": it is a Git LFS pointer, not the file (git lfs pull, or download it from google/umt5-xxl)"
                if head.startswith(b"version https://git-lfs") else " (download it again from google/umt5-xxl)")
        raise ValueError(f"umT5 tokenizer {path}: not a readable tokenizer.json ({e}){hint}") from None
    return UMT5Tokenizer(tok, source=path)


_TINY_WORDS = (
    "a an the of and in on at to with is are was cat dog bird fish man woman child car boat tree house river "
    "mountain sky sun moon city street red blue green white black small big old young running walking "
    "flying swimming sitting standing video scene camera slowly quickly beautiful light dark night day "
    "water fire snow rain cinematic close up shot"
).split()


def make_tiny_tokenizer(path_dir: str, vocab_size: int = 256) -> str:
    """Writes a tiny WordLevel tokenizer.json to `path_dir/google/umt5-xxl/`; returns the file path.

    ids: <pad> 0, </s> 1, <unk> 2, then lower-cased English words, then `tok{i}` fillers up to
    vocab_size. Whitespace pre-tokenizer; a TemplateProcessing post-processor appends `</s>` like umT5's.
    """
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel

    if vocab_size < 4:
        raise ValueError(f"vocab_size must be >= 4, got {vocab_size}")
    words = ["<pad>", "</s>", "<unk>"] + list(_TINY_WORDS)
    words += [f"tok{i}" for i in range(max(0, vocab_size - len(words)))]
    vocab = {w: i for i, w in enumerate(words[:vocab_size])}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<pad>", "</s>", "<unk>"])
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    out_dir = os.path.join(os.fspath(path_dir), TOKENIZER_SUBDIR)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "tokenizer.json")
    tok.save(path)
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w") as f:
        json.dump({"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}, f)
    return path


# ---------------------------------------------------------------------------------------------- encode

@torch.no_grad()
def encode_text(model: T5Encoder, tokenizer: UMT5Tokenizer, prompts: list[str], text_len: int = 512,
                device: str | torch.device | None = None) -> torch.Tensor:
    """prompts -> context [B, text_len, dim] in the model's dtype, on `device` (default: the model's).

    Rows past each prompt's length (its `</s>` included) are zero: Wan's trim-then-zero-pad to text_len.
    The encoder runs only on the first max(lengths) positions: padded keys are masked and the position
    bias is relative, so the valid rows equal those of a full text_len run (up to rounding) at a
    fraction of the cost (a typical prompt is < 100 of the 512 tokens).
    """
    ids, mask = tokenizer(prompts, text_len)
    vocab = model.token_embedding.num_embeddings  # ids index its rows: check them (else a bare IndexError)
    if int(ids.max()) >= vocab:
        raise ValueError(f"tokenizer {getattr(tokenizer, 'source', '?')} (vocab size "
                         f"{getattr(tokenizer, 'vocab_size', '?')}) gave token id {int(ids.max())}, but the umT5 "
                         f"checkpoint's vocab is {vocab} (token_embedding rows): tokenizer and encoder do not match")
    model_device = model.token_embedding.weight.device
    n = int(mask.sum(dim=1).max())
    ids, mask = ids[:, :n].to(model_device), mask[:, :n].to(model_device)
    out = model(ids, mask).masked_fill(mask[..., None] == 0, 0.0)
    out = F.pad(out, (0, 0, 0, text_len - n))
    return out if device is None else out.to(device)
