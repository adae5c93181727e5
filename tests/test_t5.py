"""umT5 encoder + tokenizer against transformers' UMT5EncoderModel (random tiny weights, CPU fp32), and bf16
against a literal restatement of Wan's encoder in Wan's rounding order."""
import math
import os

import pytest
import torch
import torch.nn.functional as F

from lightx2v_engine.t5 import (T5Config, T5Encoder, clean_text, encode_text, load_t5, load_tokenizer,
                                make_tiny_tokenizer, random_t5, relative_position_bucket)

VOCAB = 200


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def hf_to_wan(sd: dict) -> dict:
    """transformers UMT5EncoderModel keys -> Wan's models_t5_umt5-xxl-enc keys."""
    out = {"token_embedding.weight": sd["shared.weight"], "norm.weight": sd["encoder.final_layer_norm.weight"]}
    n = 0
    while f"encoder.block.{n}.layer.0.layer_norm.weight" in sd:
        p = f"encoder.block.{n}.layer."
        out[f"blocks.{n}.norm1.weight"] = sd[p + "0.layer_norm.weight"]
        for w in "qkvo":
            out[f"blocks.{n}.attn.{w}.weight"] = sd[p + f"0.SelfAttention.{w}.weight"]
        out[f"blocks.{n}.pos_embedding.embedding.weight"] = sd[p + "0.SelfAttention.relative_attention_bias.weight"]
        out[f"blocks.{n}.norm2.weight"] = sd[p + "1.layer_norm.weight"]
        out[f"blocks.{n}.ffn.gate.0.weight"] = sd[p + "1.DenseReluDense.wi_0.weight"]
        out[f"blocks.{n}.ffn.fc1.weight"] = sd[p + "1.DenseReluDense.wi_1.weight"]
        out[f"blocks.{n}.ffn.fc2.weight"] = sd[p + "1.DenseReluDense.wo.weight"]
        n += 1
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


@pytest.fixture(scope="module")
def hf_model():
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(0)
    # dim_attn (2 x 24 = 48) != dim (64) to catch transposed projections.
    cfg = UMT5Config(vocab_size=VOCAB, d_model=64, d_kv=24, d_ff=96, num_layers=2, num_heads=2,
                     relative_attention_num_buckets=32, relative_attention_max_distance=128,
                     feed_forward_proj="gated-gelu", dropout_rate=0.0, layer_norm_epsilon=1e-6)
    model = UMT5EncoderModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:  # non-trivial norm weights so a wrong norm mapping shows
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif "relative_attention_bias" in name:
                p.copy_(torch.randn_like(p))  # large enough to matter against the unscaled scores
    return model


@pytest.fixture(scope="module")
def wan_file(hf_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("t5") / "models_t5_tiny.pth"
    torch.save(hf_to_wan(hf_model.state_dict()), path)
    return str(path)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    make_tiny_tokenizer(str(d), VOCAB)
    return str(d)


def test_config_from_state_dict(wan_file):
    model = load_t5(wan_file, dtype=torch.float32)
    assert model.cfg == T5Config(vocab=VOCAB, dim=64, dim_attn=48, dim_ffn=96, num_heads=2, num_layers=2)
    assert set(model.state_dict()) == set(torch.load(wan_file, weights_only=True))


def test_bucket_matches_transformers(hf_model):
    rel = torch.arange(-300, 301)[None, :]
    ref = hf_model.encoder.block[0].layer[0].SelfAttention._relative_position_bucket(rel)
    assert torch.equal(relative_position_bucket(rel, 32, 128), ref)


def test_encoder_matches_transformers(hf_model, wan_file, tok_dir):
    model = load_t5(wan_file, dtype=torch.float32)
    tok = load_tokenizer(tok_dir)
    long_prompt = " ".join(["a red cat walking on the street at night"] * 15)  # 135 words: beyond max_dist
    prompts = ["a dog", long_prompt, "the   small  bird &amp; the fish"]
    text_len = 160
    ids, mask = tok(prompts, text_len)
    lens = mask.sum(1).tolist()
    assert lens[0] == 3 and lens[1] == 136 and lens[2] == 7
    ours = encode_text(model, tok, prompts, text_len=text_len)
    assert ours.shape == (3, text_len, 64) and ours.dtype == torch.float32
    with torch.no_grad():
        ref = hf_model(input_ids=ids, attention_mask=mask).last_hidden_state
    for i, n in enumerate(lens):
        err = rel_l2(ours[i, :n], ref[i, :n])
        assert err <= 1e-5, f"prompt {i}: rel L2 {err:.2e}"
        assert torch.count_nonzero(ours[i, n:]) == 0
    # Each prompt alone (no padding beyond its own length) gives the same valid rows: masking is right.
    for i, n in enumerate(lens):
        with torch.no_grad():
            alone = model(ids[i:i + 1, :n], mask[i:i + 1, :n])[0]
        assert rel_l2(ours[i, :n], alone) <= 1e-5


def test_bf16_close_to_fp32(wan_file, tok_dir):
    tok = load_tokenizer(tok_dir)
    prompts = ["a dog running in the snow", "the sky"]
    ref = encode_text(load_t5(wan_file, dtype=torch.float32), tok, prompts, text_len=16)
    out = encode_text(load_t5(wan_file, dtype=torch.bfloat16), tok, prompts, text_len=16)
    assert out.dtype == torch.bfloat16
    assert rel_l2(out.float(), ref) < 3e-2


def wan_t5_reference(sd: dict, ids: torch.Tensor, mask: torch.Tensor, num_heads: int, bucket, eps: float = 1e-6
                     ) -> torch.Tensor:
    """Wan's wan/modules/t5.py T5Encoder forward, op by op in the tensors' dtype, on a Wan-layout state dict:
    RMSNorm x * rsqrt(mean(x.float()^2) + eps), cast to the weight's dtype, times the weight; scores
    einsum(q, k) + (zeros + position bias, dtype-min at padded keys), softmax in fp32 cast back; Wan's GELU
    0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))). `bucket(rel_pos)`: the relative-position bucket."""
    def norm(x, w):
        x = x * torch.rsqrt(x.float().pow(2).mean(dim=-1, keepdim=True) + eps)
        return w * x.type_as(w)

    def gelu(x):
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))

    b, n = ids.shape
    x = F.embedding(ids, sd["token_embedding.weight"])
    rel = bucket(torch.arange(n)[None, :] - torch.arange(n)[:, None])
    for i in range(len({k.split(".")[1] for k in sd if k.startswith("blocks.")})):
        w = {k[len(f"blocks.{i}."):-len(".weight")]: v for k, v in sd.items() if k.startswith(f"blocks.{i}.")}
        h = norm(x, w["norm1"])
        q, k, v = (F.linear(h, w[f"attn.{c}"]).view(b, n, num_heads, -1) for c in "qkv")
        bias = x.new_zeros(b, num_heads, n, n) + F.embedding(rel, w["pos_embedding.embedding"]).permute(2, 0, 1)
        bias = bias.masked_fill(mask.view(b, 1, 1, n) == 0, torch.finfo(x.dtype).min)
        attn = torch.einsum("binc,bjnc->bnij", q, k) + bias
        attn = F.softmax(attn.float(), dim=-1).type_as(attn)
        x = x + F.linear(torch.einsum("bnij,bjnc->binc", attn, v).reshape(b, n, -1), w["attn.o"])
        h = norm(x, w["norm2"])
        x = x + F.linear(F.linear(h, w["ffn.fc1"]) * gelu(F.linear(h, w["ffn.gate.0"])), w["ffn.fc2"])
    return norm(x, sd["norm.weight"])


def test_bf16_matches_wan_order_reference(hf_model, wan_file, tok_dir):
    """bf16 against Wan's encoder restated in bf16 (wan_t5_reference): the same rounding order gives the
    same numbers (measured rel L2 0). A bf16 RMSNorm variance gives ~1e-2, nn.GELU("tanh") (fp32 inside,
    one rounding) instead of Wan's formula ~6e-3; the bf16 model is ~1e-2 from fp32, so only a bf16 reference
    can see these."""
    model = load_t5(wan_file, dtype=torch.bfloat16)
    sd = {k: v.to(torch.bfloat16) for k, v in torch.load(wan_file, weights_only=True).items()}
    tok = load_tokenizer(tok_dir)
    ids, mask = tok(["a dog running in the snow at night with a red car", "the sky", "a small bird " * 6], 24)
    bucket = hf_model.encoder.block[0].layer[0].SelfAttention._relative_position_bucket
    with torch.no_grad():
        got = model(ids, mask) * mask[..., None]
        want = wan_t5_reference(sd, ids, mask, 2, bucket) * mask[..., None]
    assert got.dtype == want.dtype == torch.bfloat16
    err = rel_l2(got, want)
    assert err <= 2e-3, err


def test_bf16_softmax_and_norm_variance_run_in_fp32(wan_file):
    """Wan's fp32 regions in a bf16 forward, by the dtypes reaching softmax and mean (the RMSNorm variance):
    PyTorch's bf16 softmax accumulates in fp32 and rounds once, so a softmax on bf16 scores gives the same
    outputs here, and only its input dtype shows it."""
    from torch.overrides import TorchFunctionMode

    class Record(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.seen: list[tuple[str, torch.dtype]] = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            name = getattr(func, "__name__", "")
            if name in ("softmax", "mean"):
                self.seen.append((name, args[0].dtype))
            return func(*args, **(kwargs or {}))

    model = load_t5(wan_file, dtype=torch.bfloat16)
    ids = torch.tensor([[5, 9, 17, 1, 0], [7, 1, 0, 0, 0]])
    with torch.no_grad(), Record() as rec:
        out = model(ids, (ids != 0).long())
    assert out.dtype == torch.bfloat16
    layers = model.cfg.num_layers
    assert [d for f, d in rec.seen if f == "softmax"] == [torch.float32] * layers, rec.seen
    assert [d for f, d in rec.seen if f == "mean"] == [torch.float32] * (2 * layers + 1), rec.seen


def test_tokenizer(tok_dir):
    tok = load_tokenizer(tok_dir)
    assert tok.eos_id == 1 and tok.pad_id == 0
    assert tok.post_processor_appends_eos  # ours bypasses it and still appends exactly one </s>
    ids, mask = tok(["A Dog", "cat"], text_len=8)
    words = tok.tokenizer.get_vocab()
    assert ids[0].tolist() == [words["a"], words["dog"], 1, 0, 0, 0, 0, 0]
    assert mask[0].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]
    assert ids[1].tolist() == [words["cat"], 1] + [0] * 6
    assert (ids == 1).sum().item() == 2  # exactly one </s> per prompt
    assert tok.tokenizer.decode(ids[0, :2].tolist()) == "a dog"
    # Truncation keeps </s> last.
    ids, mask = tok(["a b c d e f g h i j"], text_len=5)
    assert ids.shape == (1, 5) and ids[0, -1].item() == 1 and mask.sum().item() == 5
    assert (ids == 1).sum().item() == 1
    # Empty prompt: just </s>.
    ids, mask = tok([""], text_len=4)
    assert ids[0].tolist() == [1, 0, 0, 0] and mask[0].tolist() == [1, 0, 0, 0]
    # Unknown words map to <unk>.
    ids, _ = tok(["zebra"], text_len=3)
    assert ids[0].tolist() == [2, 1, 0]


def test_unreadable_tokenizer_names_the_file(tmp_path):
    """A Git LFS pointer (a clone without git-lfs) or a broken tokenizer.json: a ValueError naming the file
    (the tokenizers library's bare Exception named none and ended the CLI with a traceback)."""
    path = tmp_path / "google" / "umt5-xxl" / "tokenizer.json"
    path.parent.mkdir(parents=True)
    path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 16837417\n")
    with pytest.raises(ValueError, match=r"tokenizer\.json.*Git LFS pointer"):
        load_tokenizer(str(tmp_path))
    path.write_text('{"version": "1.0", "trunc')
    with pytest.raises(ValueError, match=r"umt5-xxl/tokenizer\.json: not a readable tokenizer\.json"):
        load_tokenizer(str(tmp_path))


def test_tokenizer_matches_transformers(tok_dir):
    """Same ids/mask as transformers' T5TokenizerFast (what Wan's AutoTokenizer gives) on cleaned text."""
    from transformers import T5TokenizerFast

    path = os.path.join(tok_dir, "google", "umt5-xxl", "tokenizer.json")
    hf = T5TokenizerFast(tokenizer_file=path)
    tok = load_tokenizer(tok_dir)
    prompts = ["a dog", "a b c d e f g h i j k", "", "the  cat &amp;amp; dog\n", "zebra dog " * 3]
    for text_len in (1, 2, 6, 12):
        ids, mask = tok(prompts, text_len)
        ref = hf([clean_text(p) for p in prompts], padding="max_length", truncation=True, max_length=text_len,
                 add_special_tokens=True, return_tensors="pt")
        assert torch.equal(ids, ref.input_ids), text_len
        assert torch.equal(mask, ref.attention_mask), text_len


def test_clean_text():
    assert clean_text("  a &amp;amp; b \n\t c  ") == "a & b c"
    # ftfy.fix_text, as Wan (a dependency): curly quotes, ligatures and mojibake come out as Wan's tokens see them
    assert clean_text("A \u201ccinematic\u201d shot of a cat\u2019s \ufb01sh") == 'A "cinematic" shot of a cat\'s fish'
    assert clean_text("caf\u00c3\u00a9 at night") == "caf\u00e9 at night"


def test_bad_prompts(wan_file, tok_dir):
    model, tok = load_t5(wan_file, dtype=torch.float32), load_tokenizer(tok_dir)
    for bad in ([], "a string", ["ok", 3], None):
        with pytest.raises(ValueError):
            encode_text(model, tok, bad, text_len=8)


def test_tokenizer_larger_than_checkpoint_vocab(wan_file, tmp_path):
    """A tokenizer whose ids run past the encoder's vocabulary: a ValueError naming both sizes (not the bare
    IndexError of the embedding lookup)."""
    make_tiny_tokenizer(str(tmp_path), VOCAB + 100)
    tok, model = load_tokenizer(str(tmp_path)), load_t5(wan_file, dtype=torch.float32)
    word = f"tok{VOCAB + 50 - tok.tokenizer.token_to_id('tok0')}"
    assert tok.tokenizer.token_to_id(word) == VOCAB + 50
    assert encode_text(model, tok, ["a dog"], text_len=8).shape == (1, 8, 64)  # ids in range: fine
    with pytest.raises(ValueError, match=rf"tokenizer .*tokenizer\.json \(vocab size {VOCAB + 100}\) gave token id "
                                         rf"{VOCAB + 50}, but the umT5 checkpoint's vocab is {VOCAB}"):
        encode_text(model, tok, [f"a {word} dog"], text_len=8)


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_t5(str(tmp_path / "nope.pth"))
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(str(tmp_path))


def test_bad_checkpoints(wan_file, tmp_path):
    sd = torch.load(wan_file, weights_only=True)
    broken = dict(sd)
    del broken["blocks.1.ffn.fc2.weight"]
    broken["blocks.1.extra.weight"] = torch.zeros(1)
    path = tmp_path / "broken.pth"
    torch.save(broken, path)
    with pytest.raises(ValueError, match=r"broken\.pth.*blocks\.1\.ffn\.fc2\.weight.*blocks\.1\.extra\.weight"):
        load_t5(str(path))
    wrong = dict(sd)
    wrong["blocks.1.attn.k.weight"] = torch.zeros(48, 32)
    torch.save(wrong, path)
    with pytest.raises(ValueError, match=r"blocks\.1\.attn\.k\.weight.*\(48, 32\).*\(48, 64\)"):
        load_t5(str(path))
    torch.save({"model": sd}, path)
    with pytest.raises(ValueError, match="broken.pth"):
        load_t5(str(path))


def test_random_t5():
    cfg = T5Config.tiny()
    a = random_t5(cfg, "cpu", torch.float32, seed=1)
    b = random_t5(cfg, "cpu", torch.float32, seed=1)
    assert isinstance(a, T5Encoder) and a.token_embedding.weight.dtype == torch.float32
    for (k, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), k
    ids = torch.randint(0, cfg.vocab, (2, 12))
    with torch.no_grad():
        out = a(ids, torch.ones_like(ids))
    assert torch.isfinite(out).all() and 0.3 < out.std().item() < 3.0
    assert random_t5(cfg, "cpu", torch.bfloat16).blocks[0].attn.q.weight.dtype == torch.bfloat16


def test_tiny_preset_matches_tiny_tokenizer(tmp_path):
    cfg = T5Config.tiny()
    make_tiny_tokenizer(str(tmp_path), cfg.vocab)
    tok = load_tokenizer(str(tmp_path))
    assert tok.vocab_size == cfg.vocab
    assert os.path.isfile(tmp_path / "google" / "umt5-xxl" / "tokenizer.json")
    out = encode_text(random_t5(cfg, "cpu", torch.float32), tok, ["a cat"], text_len=10)
    assert out.shape == (1, 10, cfg.dim) and torch.count_nonzero(out[0, 3:]) == 0


# ------------------------------------------------------------------ LightX2V's quantized umT5 (t5_quantized)

def _quantized_file(wan_file, scheme, tmp_path, scale_format="[out,1] fp32"):
    """A LightX2V-format quantized umT5 file from the test checkpoint, and the dequantized weights."""
    from lightx2v_engine.quant import dequantize_weight, quantize_weight
    from lightx2v_engine.t5 import QUANT_LINEARS
    sd = torch.load(wan_file)
    deq = dict(sd)
    for k in list(sd):
        if any(k.endswith(f".{n}.weight") for n in QUANT_LINEARS):
            wq, scale = quantize_weight(sd[k].float(), scheme)
            deq[k] = dequantize_weight(wq, scale)
            sd[k] = wq
            sd[k + "_scale"] = scale.reshape(-1).bfloat16() if scale_format == "[out] bf16" else scale
    path = tmp_path / f"models_t5_umt5-xxl-enc-{scheme}.pth"
    torch.save(sd, path)
    return path, deq


@pytest.mark.parametrize("scheme, tol", [("int8", 0.02), ("fp8", 0.07)])  # measured 0.012 / 0.043
def test_quantized_t5_file_loads_as_8bit_linears(hf_model, wan_file, tok_dir, tmp_path, scheme, tol):
    """The 8-bit linears run as QuantLinear; the output is transformers' UMT5 with the dequantized weights
    up to the activations' per-token quantization (and equals quantize_t5_ of the same weights exactly)."""
    from transformers import UMT5EncoderModel
    from lightx2v_engine.quant import QuantLinear
    from lightx2v_engine.t5 import QUANT_LINEARS, quantize_t5_
    path, deq = _quantized_file(wan_file, scheme, tmp_path, "[out] bf16" if scheme == "fp8" else "[out,1] fp32")
    model = load_t5(str(path), dtype=torch.float32)
    assert all(isinstance(model.blocks[i].get_submodule(n), QuantLinear) for i in range(2) for n in QUANT_LINEARS)
    assert model.blocks[0].attn.q.weight.dtype == (torch.int8 if scheme == "int8" else torch.float8_e4m3fn)
    ref = UMT5EncoderModel(hf_model.config).eval()
    ref.load_state_dict(hf_model.state_dict())
    with torch.no_grad():  # the dequantized weights, under transformers' names (the map hf_to_wan inverts)
        for n in range(2):
            p = ref.encoder.block[n].layer
            for w in "qkvo":
                getattr(p[0].SelfAttention, w).weight.copy_(deq[f"blocks.{n}.attn.{w}.weight"])
            p[1].DenseReluDense.wi_0.weight.copy_(deq[f"blocks.{n}.ffn.gate.0.weight"])
            p[1].DenseReluDense.wi_1.weight.copy_(deq[f"blocks.{n}.ffn.fc1.weight"])
            p[1].DenseReluDense.wo.weight.copy_(deq[f"blocks.{n}.ffn.fc2.weight"])
    tok = load_tokenizer(tok_dir)
    ids, mask = tok(["a red car on a street", "two cats"], 16)
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask).last_hidden_state * mask[..., None]
        got = model(ids, mask) * mask[..., None]
    assert rel_l2(got, want) < tol, rel_l2(got, want)
    if scheme == "int8":  # fp32 [out, 1] scales as stored: the same model as quantizing the weights here
        same = quantize_t5_(load_t5(wan_file, dtype=torch.float32), scheme)
        with torch.no_grad():
            torch.testing.assert_close(same(ids, mask), model(ids, mask), rtol=0, atol=0)


def test_quantized_t5_file_errors_name_the_key(wan_file, tmp_path):
    path, _ = _quantized_file(wan_file, "int8", tmp_path)
    sd = torch.load(path)
    bad = dict(sd, **{"blocks.0.norm1.weight_scale": torch.ones(64)})
    torch.save(bad, tmp_path / "bad1.pth")
    with pytest.raises(ValueError, match="blocks.0.norm1.weight_scale.*scales no linear"):
        load_t5(str(tmp_path / "bad1.pth"))
    unscaled = {k: v for k, v in sd.items() if k != "blocks.1.ffn.fc2.weight_scale"}
    torch.save(unscaled, tmp_path / "bad0.pth")  # its 8-bit codes would otherwise run unscaled as a float weight
    with pytest.raises(ValueError, match=r"8-bit weight\(s\) without a weight_scale: \['blocks.1.ffn.fc2.weight'\]"):
        load_t5(str(tmp_path / "bad0.pth"))
    bad = dict(sd, **{"blocks.1.attn.k.weight_scale": torch.ones(5, 1)})
    torch.save(bad, tmp_path / "bad2.pth")
    with pytest.raises(ValueError, match=r"blocks.1.attn.k.weight_scale.*5 values, expected 48"):
        load_t5(str(tmp_path / "bad2.pth"))


def test_random_pipeline_with_t5_quantized_runs_8bit_linears():
    from lightx2v_engine.pipeline import Pipeline
    from lightx2v_engine.quant import QuantLinear
    pipe = Pipeline.random("tiny", {"t5_quantized": True, "t5_quant_scheme": "fp8-sgl", "target_video_length": 5,
                                    "target_height": 32, "target_width": 48}, device="cpu", with_encoders=True)
    assert isinstance(pipe.t5.blocks[1].ffn.fc2, QuantLinear) and pipe.t5.blocks[1].ffn.fc2.scheme == "fp8"
    ctx = pipe.encode_text(["a cat"])
    assert ctx.shape == (1, 512, 64) and torch.isfinite(ctx).all()


@pytest.mark.gpu
@pytest.mark.last
def test_quantized_t5_on_cuda_matches_cpu(wan_file, tok_dir, tmp_path):
    """The 8-bit GEMM path of the quantized umT5 on CUDA (bf16 activations) against the CPU reference path."""
    path, _ = _quantized_file(wan_file, "fp8", tmp_path)
    tok = load_tokenizer(tok_dir)
    ids, mask = tok(["a red car on a street", "two cats"], 16)
    cpu = load_t5(str(path), dtype=torch.float32)
    gpu = load_t5(str(path), device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        want = cpu(ids, mask) * mask[..., None]
        got = (gpu(ids.cuda(), mask.cuda()) * mask.cuda()[..., None]).float().cpu()
    assert rel_l2(got, want) < 0.05, rel_l2(got, want)
