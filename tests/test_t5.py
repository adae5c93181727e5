"""umT5 encoder + tokenizer against transformers' UMT5EncoderModel (random tiny weights, CPU fp32)."""
import os

import pytest
import torch

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


def test_bad_prompts(wan_file, tok_dir):
    model, tok = load_t5(wan_file, dtype=torch.float32), load_tokenizer(tok_dir)
    for bad in ([], "a string", ["ok", 3], None):
        with pytest.raises(ValueError):
            encode_text(model, tok, bad, text_len=8)


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
