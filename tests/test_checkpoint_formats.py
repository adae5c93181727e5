"""Checkpoint files as users have them: quantized DiT in the model folder, LoRA, VAE and tiny-decoder files
beside the DiT, legacy torch pickles, corrupt safetensors headers and shard indexes, integer tensors where
float weights belong, files that do not fit (refused before any tensor is read)."""
import json
import logging
import re
import struct

import pytest
import torch
from safetensors.torch import save_file

import lightx2v_engine.checkpoint as checkpoint_mod
import lightx2v_engine.loading as loading_mod
from lightx2v_engine.checkpoint import CheckpointError, read_safetensors_header
from lightx2v_engine.config import LoraSpec
from lightx2v_engine.loading import build_dit, find_dit_checkpoint, load_dit, load_quantized_dit
from lightx2v_engine.lora import read_lora
from lightx2v_engine.quant import QuantLinear, quantize_dit_

from dit_fixtures import TINY_T2V

CFG = TINY_T2V


def _state_dict(seed: int = 0, dtype=torch.float32) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {k: v.contiguous() for k, v in build_dit(CFG, None, dtype=dtype).state_dict().items()}


def _lora(sd: dict[str, torch.Tensor], key: str = "blocks.0.self_attn.o") -> dict[str, torch.Tensor]:
    o, i = sd[key + ".weight"].shape
    g = torch.Generator().manual_seed(1)
    return {f"diffusion_model.{key}.lora_up.weight": torch.randn(o, 4, generator=g),
            f"diffusion_model.{key}.lora_down.weight": torch.randn(4, i, generator=g),
            f"diffusion_model.{key}.alpha": torch.tensor(4.0)}


def _same(model, sd) -> bool:
    msd = model.state_dict()
    return set(msd) == set(sd) and all(torch.equal(msd[k].float(), sd[k].float()) for k in sd)


def test_dit_quantized_without_ckpt_loads_the_model_folder(tmp_path, caplog):
    """dit_quantized true, dit_quantized_ckpt unset: the model folder's *.safetensors (LightX2V), LoRA files
    skipped; the quantized-format checks still apply; an empty folder names itself and the key."""
    ref = build_dit(CFG, None, dtype=torch.float32)
    ref.load_state_dict(_state_dict())
    quantize_dit_(ref, "fp8")
    qsd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    folder = tmp_path / "m"
    folder.mkdir()
    save_file(qsd, str(folder / "wan_fp8.safetensors"))
    save_file(_lora(_state_dict()), str(folder / "style_lora.safetensors"))
    for ckpt in (None, ""):
        model = load_quantized_dit(CFG, folder, ckpt, "fp8-sgl", dtype="fp32")
        assert isinstance(model.blocks[0].self_attn.q, QuantLinear)
        assert model.blocks[0].self_attn.q.weight.dtype == torch.float8_e4m3fn
        assert _same(model, qsd)
    # the LoRA file beside it still applies when named: a branch beside the 8-bit o, up @ down * alpha / rank
    lora = _lora(_state_dict())
    o = load_quantized_dit(CFG, folder, None, "fp8-sgl", dtype="fp32",
                           lora_specs=[LoraSpec("style_lora.safetensors")]).blocks[0].self_attn.o
    pre = "diffusion_model.blocks.0.self_attn.o"
    want = lora[f"{pre}.lora_up.weight"] @ lora[f"{pre}.lora_down.weight"] * (lora[f"{pre}.alpha"] / 4)
    assert o.lora_down is not None
    torch.testing.assert_close(o.lora_up.float() @ o.lora_down.float(), want, rtol=1e-5, atol=1e-5)
    assert model.blocks[0].self_attn.o.lora_down is None
    # a bf16 folder is refused as not quantized, as a named bf16 file is
    bf16 = tmp_path / "bf16"
    bf16.mkdir()
    save_file(_state_dict(), str(bf16 / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(CheckpointError, match="not a quantized checkpoint"):
        load_quantized_dit(CFG, bf16, None, "fp8-sgl")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=rf"dit_quantized_ckpt.*{empty}"):
        load_quantized_dit(CFG, empty, None, "fp8-sgl")


def test_lora_file_in_the_model_folder_is_not_part_of_the_dit(tmp_path, caplog):
    """Folder glob fallback: files holding only LoRA keys are skipped (logged) and still load as LoRAs; a
    folder of LoRA files only has no DiT checkpoint (an error naming it)."""
    sd = _state_dict(dtype=torch.bfloat16)
    folder = tmp_path / "m"
    folder.mkdir()
    save_file(sd, str(folder / "wan2.1_t2v_lightx2v_4step.safetensors"))
    save_file(_lora(sd), str(folder / "style_lora.safetensors"))
    save_file({"diffusion_model.blocks.0.modulation.diff": torch.zeros(1, 6, CFG.dim),
               "diffusion_model.blocks.0.norm3.diff_b": torch.zeros(CFG.dim)}, str(folder / "diff_lora.safetensors"))
    with caplog.at_level(logging.INFO, logger="lightx2v_engine.loading"):
        files = find_dit_checkpoint(folder)
    assert [f.name for f in files] == ["wan2.1_t2v_lightx2v_4step.safetensors"]
    assert "style_lora.safetensors" in caplog.text and "diff_lora.safetensors" in caplog.text
    plain = load_dit(CFG, folder, dtype="bf16")
    assert _same(plain, sd)
    merged = load_dit(CFG, folder, dtype="bf16", lora_specs=[LoraSpec("style_lora.safetensors")])
    assert not torch.equal(merged.blocks[0].self_attn.o.weight, plain.blocks[0].self_attn.o.weight)
    (folder / "wan2.1_t2v_lightx2v_4step.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=rf"no DiT checkpoint found in {folder}.*style_lora"):
        find_dit_checkpoint(folder)


def test_legacy_torch_pickles_load_for_the_dit_and_loras(tmp_path):
    """torch.save(_use_new_zipfile_serialization=False) files cannot be mmap'd: they load eagerly."""
    sd = _state_dict(dtype=torch.bfloat16)
    torch.save(sd, tmp_path / "distill_model.pt", _use_new_zipfile_serialization=False)
    assert _same(load_dit(CFG, tmp_path, dtype="bf16"), sd)
    lora = _lora(sd)
    torch.save(lora, tmp_path / "lora.pth", _use_new_zipfile_serialization=False)
    got = read_lora(tmp_path / "lora.pth")
    assert set(got) == set(lora) and all(torch.equal(got[k], lora[k]) for k in lora)


def _raw_safetensors(path, header, data: int = 64):
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + b"\0" * data)
    return path


@pytest.mark.parametrize("header, match", [
    ([1, 2], "JSON list"),
    ({"w": {"dtype": "F32", "shape": [4]}}, "'w'.*data_offsets"),
    ({"w": "oops"}, "'w'.*'oops'"),
    ({"__metadata__": {"a": "b"}, "w": {"dtype": "F32", "shape": [4], "data_offsets": [0]}}, "'w'.*data_offsets"),
    ({"w": {"dtype": "F32", "shape": "4", "data_offsets": [0, 16]}}, "'w'.*shape"),
    ({"w": {"dtype": "F32", "shape": [4.0], "data_offsets": [0, 16]}}, "'w'.*shape"),
    ({"w": {"dtype": ["F32"], "shape": [4], "data_offsets": [0, 16]}}, "'w'.*dtype"),
    ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 1000]}}, "'w'.*1000"),
    # a huge shape on a few bytes: refused from the header (not an out-of-memory error allocating it)
    ({"w": {"dtype": "F32", "shape": [1 << 20, 1 << 20], "data_offsets": [0, 16]}}, "'w' has 16 bytes.*needs"),
], ids=["list", "no_offsets", "string_entry", "one_offset", "str_shape", "float_dim", "list_dtype", "past_end",
        "huge_shape"])
def test_corrupt_safetensors_header_names_file_and_key(tmp_path, header, match):
    path = _raw_safetensors(tmp_path / "bad.safetensors", header)
    with pytest.raises(CheckpointError, match=rf"bad\.safetensors.*{match}"):
        read_safetensors_header(path)


def _refuse_reading(monkeypatch):
    """Makes reading any tensor's data (loading's load_state_dict, checkpoint's safetensors reader) fail."""
    def read(*a, **k):
        raise AssertionError("tensor data read before the checkpoint was checked")
    monkeypatch.setattr(loading_mod, "load_state_dict", read)
    monkeypatch.setattr(checkpoint_mod, "iter_safetensors", read)


def test_integer_tensors_where_float_weights_belong(tmp_path, monkeypatch):
    """int8 linear weights without their weight_scale keys, an int64 modulation: an error naming the file,
    key and dtype (and, for 8-bit weights, what a quantized checkpoint needs) before anything loads."""
    _refuse_reading(monkeypatch)
    sd = _state_dict()
    key = "blocks.0.self_attn.q.weight"
    save_file({**sd, key: sd[key].clamp(-1, 1).mul(127).round().to(torch.int8)}, str(tmp_path / "i8.safetensors"))
    with pytest.raises(CheckpointError, match=rf"i8\.safetensors: tensor '{key}' is torch\.int8.*weight_scale.*"
                                              r'"dit_quantized": true with a "dit_quant_scheme"'):
        build_dit(CFG, [tmp_path / "i8.safetensors"], dtype=torch.bfloat16)
    save_file({**sd, "head.modulation": torch.zeros_like(sd["head.modulation"], dtype=torch.int64)},
              str(tmp_path / "i64.safetensors"))
    with pytest.raises(CheckpointError, match=r"i64\.safetensors: tensor 'head\.modulation' is torch\.int64"):
        build_dit(CFG, [tmp_path / "i64.safetensors"], dtype=torch.bfloat16)


def test_a_file_that_does_not_fit_is_refused_before_any_tensor_is_read(tmp_path, monkeypatch):
    """Names, shapes and dtypes come from the headers (mmap'd metadata for zip .pth): a wrong file fails
    with its error before a tensor is read (not out of memory reading a 14B file for a 1.3B config, or the
    bf16 Wan shards of the model folder for dit_quantized without dit_quantized_ckpt)."""
    import dataclasses
    sd = _state_dict()
    wider = {k: v.contiguous() for k, v in build_dit(dataclasses.replace(CFG, dim=96, ffn_dim=128), None,
                                                     dtype=torch.float32).state_dict().items()}
    deeper = {k: v.contiguous() for k, v in build_dit(dataclasses.replace(CFG, num_layers=3), None,
                                                      dtype=torch.float32).state_dict().items()}
    save_file(wider, str(tmp_path / "wider.safetensors"))
    torch.save(wider, tmp_path / "wider.pth")
    save_file(deeper, str(tmp_path / "deeper.safetensors"))
    bf16 = tmp_path / "wan"
    bf16.mkdir()
    keys = sorted(sd)
    save_file({k: sd[k] for k in keys[:20]}, str(bf16 / "diffusion_pytorch_model-00001-of-00002.safetensors"))
    save_file({k: sd[k] for k in keys[20:]}, str(bf16 / "diffusion_pytorch_model-00002-of-00002.safetensors"))
    ref = build_dit(CFG, None, dtype=torch.float32)
    ref.load_state_dict(sd)
    quantize_dit_(ref, "int8")
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "int8.safetensors"))
    _refuse_reading(monkeypatch)
    for name in ("wider.safetensors", "wider.pth"):
        with pytest.raises(CheckpointError, match=rf"{name}: tensor '\S+' has shape \(\d+, \d+.*expects"):
            build_dit(CFG, [tmp_path / name], dtype=torch.bfloat16)
    with pytest.raises(CheckpointError, match=r"deeper\.safetensors: checkpoint does not fit .*unexpected \d+ "
                                              r"key\(s\) \['blocks\.2\."):
        build_dit(CFG, [tmp_path / "deeper.safetensors"], dtype=torch.bfloat16)
    with pytest.raises(CheckpointError, match=r"00001-of-00002\.safetensors: not a quantized checkpoint"):
        load_quantized_dit(CFG, bf16, None, "fp8-sgl")
    with pytest.raises(CheckpointError, match=r"int8\.safetensors: tensor '\S+' is torch\.int8, the fp8-sgl scheme"):
        load_quantized_dit(CFG, None, str(tmp_path / "int8.safetensors"), "fp8-sgl")
    with pytest.raises(CheckpointError, match=r"key 'blocks\.0\.\S+' appears twice \(in \S+00001-of-00002\."
                                              r"safetensors and \S+deeper\.safetensors\)"):
        build_dit(CFG, [*sorted(bf16.glob("*.safetensors")), tmp_path / "deeper.safetensors"])


def test_vae_and_tiny_decoder_files_in_the_model_folder_are_not_dit_shards(tmp_path, caplog):
    """The DiT under a LightX2V name (no diffusion_pytorch_model.safetensors): the folder's lightvaew2_1 /
    taew2_1 .safetensors, which the pipeline looks for there, hold no DiT keys: skipped (logged), for the
    bf16 and the quantized (dit_quantized_ckpt unset) DiT alike."""
    from safetensors.torch import load_file
    from lightx2v_engine import tae as tae_mod
    from lightx2v_engine.config import model_config_from_json
    from lightx2v_engine.tiny import make_tiny_model_folder
    folder = make_tiny_model_folder(tmp_path / "m")
    cfg = model_config_from_json(folder / "config.json")
    dit = folder / "wan2.1_t2v_lightx2v_4step.safetensors"
    (folder / "diffusion_pytorch_model.safetensors").rename(dit)
    vae = torch.load(folder / "Wan2.1_VAE.pth", weights_only=True)
    save_file({k: v.contiguous() for k, v in vae.items()}, str(folder / "lightvaew2_1.safetensors"))
    tae = tae_mod.random_tae(tae_mod.TAEConfig((8, 8, 8, 8))).state_dict()
    save_file({k: v.contiguous() for k, v in tae.items()}, str(folder / "taew2_1.safetensors"))
    with caplog.at_level(logging.INFO, logger="lightx2v_engine.loading"):
        assert find_dit_checkpoint(folder) == [dit]
    assert re.search(r"skipping \['lightvaew2_1\.safetensors', 'taew2_1\.safetensors'\] \(no DiT keys", caplog.text)
    assert _same(load_dit(cfg, folder), load_file(str(dit)))
    from lightx2v_engine.pipeline import Pipeline  # (the pipeline that looks for lightvaew2_1 there)
    pipe = Pipeline.load(folder, {"target_video_length": 5, "target_height": 32, "target_width": 48,
                                  "use_lightvae": True}, device="cpu")
    assert _same(pipe.dit, load_file(str(dit)))
    ref = build_dit(cfg, None, dtype=torch.float32)
    ref.load_state_dict({k: v.float() for k, v in load_file(str(dit)).items()})
    quantize_dit_(ref, "fp8")
    dit.unlink()
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(folder / "wan_fp8.safetensors"))
    assert _same(load_quantized_dit(cfg, folder, None, "fp8-sgl", dtype="fp32"), ref.state_dict())
    (folder / "wan_fp8.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no DiT \*\.safetensors file.*lightvaew2_1\.safetensors"):
        load_quantized_dit(cfg, folder, None, "fp8-sgl")


@pytest.mark.parametrize("index, match", [
    ({"weight_map": ["a.safetensors"]}, r"'weight_map' is a JSON list, expected an object mapping tensor names"),
    ({"weight_map": {"w": 3}}, r"'weight_map' is an object with 'w': '3', expected"),
    ({"metadata": {}}, r"an object without 'weight_map'"),
    (["weight_map"], r"a JSON list, expected an object with a 'weight_map'"),
    ({"weight_map": {}}, r"'weight_map' is empty"),
], ids=["list_map", "int_shard", "no_map", "list_index", "empty_map"])
def test_corrupt_shard_index_names_the_index(tmp_path, index, match):
    (tmp_path / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"index\.json: corrupt shard index: {match}"):
        find_dit_checkpoint(tmp_path, distill=False)


def test_unsupported_format_and_unknown_diffusers_name_name_their_file(tmp_path):
    """A .gguf is an unsupported format (not a torch unpickling error); an unknown diffusers name is
    reported in the shard that holds it."""
    from dit_fixtures import diffusers_model
    gguf = tmp_path / "wan.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 60)
    with pytest.raises(CheckpointError, match=r"wan\.gguf: unsupported checkpoint format '\.gguf' \(expected "
                                              r"\.safetensors, \.pt, \.pth, \.bin or \.ckpt\)"):
        load_dit(CFG, None, dit_original_ckpt=str(gguf))
    dsd = {k: v.detach().contiguous() for k, v in diffusers_model(CFG).state_dict().items()}
    keys = sorted(dsd)
    save_file({k: dsd[k] for k in keys[:10]}, str(tmp_path / "part1.safetensors"))
    save_file({**{k: dsd[k] for k in keys[10:]}, "blocks.0.attn2.norm_added_q.weight": torch.ones(CFG.dim)},
              str(tmp_path / "part2.safetensors"))
    with pytest.raises(CheckpointError, match=r"part2\.safetensors: no Wan name for diffusers key "
                                              r"'blocks\.0\.attn2\.norm_added_q\.weight'"):
        build_dit(CFG, [tmp_path / "part1.safetensors", tmp_path / "part2.safetensors"], dtype=torch.float32)


def test_self_forcing_checkpoint_with_generator_and_ema_logs_its_choice(tmp_path, caplog):
    """{'generator': ..., 'generator_ema': ...} (Self-Forcing's released files): the EMA weights load, as
    LightX2V's sf_model reads them ('generator' loaded before: other weights than LightX2V's), logged."""
    sd, ema = _state_dict(0, torch.bfloat16), _state_dict(1, torch.bfloat16)
    torch.save({"generator": {"model." + k: v for k, v in sd.items()},
                "generator_ema": {"model." + k: v for k, v in ema.items()}, "step": 100}, tmp_path / "sf.pt")
    with caplog.at_level(logging.INFO, logger="lightx2v_engine.checkpoint"):
        model = load_dit(CFG, None, dit_original_ckpt=str(tmp_path / "sf.pt"))
    assert _same(model, ema)
    assert re.search(r"sf\.pt: holds 'generator' and 'generator_ema' weights; loading 'generator_ema'", caplog.text)
    assert len([r for r in caplog.records if "generator_ema" in r.getMessage()]) == 1  # (not once per pass)


@pytest.mark.parametrize("wrap", [
    lambda sd: {"module": sd, "epoch": 3},  # DeepSpeed
    lambda sd: {"module": {"state_dict": sd}},
    lambda sd: {"state_dict": {"model": sd}, "optimizer": {}},
], ids=["module", "module_state_dict", "state_dict_model"])
def test_torch_file_containers_unwrap_at_any_depth(tmp_path, wrap):
    """DeepSpeed's {'module': sd} and nested containers unwrap (were read as holding no tensors: every key
    'missing', in an error naming no file)."""
    sd = _state_dict(0, torch.bfloat16)
    torch.save(wrap(sd), tmp_path / "w.pt")
    assert _same(load_dit(CFG, None, dit_original_ckpt=str(tmp_path / "w.pt")), sd)


def test_torch_file_without_tensors_names_the_file(tmp_path):
    torch.save({"weights": {"a": 1}, "epoch": 3}, tmp_path / "w.pt")
    with pytest.raises(CheckpointError, match=r"w\.pt: holds no tensors \(keys \['weights', 'epoch'\]"):
        load_dit(CFG, None, dit_original_ckpt=str(tmp_path / "w.pt"))


def test_empty_safetensors_error_names_the_file(tmp_path):
    save_file({}, str(tmp_path / "empty.safetensors"))
    with pytest.raises(CheckpointError, match=r"empty\.safetensors: checkpoint does not fit"):
        build_dit(CFG, [tmp_path / "empty.safetensors"], dtype=torch.float32)


def test_folder_with_two_shard_indexes_is_an_error(tmp_path):
    """Two *.safetensors.index.json in a checkpoint folder: which to load is the user's call (the first by
    name was taken silently)."""
    from lightx2v_engine.checkpoint import resolve_files
    for name in ("a.safetensors.index.json", "b.safetensors.index.json"):
        (tmp_path / name).write_text(json.dumps({"weight_map": {"x": "s.safetensors"}}))
    with pytest.raises(CheckpointError, match=r"several shard indexes \['a\.safetensors\.index\.json', "
                                              r"'b\.safetensors\.index\.json'\]"):
        resolve_files(tmp_path)


def test_torch_file_holding_itself_does_not_unwrap_for_ever(tmp_path):
    d = {}
    d["model"] = d
    torch.save(d, tmp_path / "loop.pt")
    with pytest.raises(CheckpointError, match=r"loop\.pt: holds no tensors"):
        load_dit(CFG, None, dit_original_ckpt=str(tmp_path / "loop.pt"))


@pytest.mark.parametrize("header, data, match", [
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
      "b": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, 16, r"'b' starts at byte 0.*overlaps"),
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, 24, r"'a' starts at byte 8.*expected 0.*gap"),
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, 20, r"end at byte 16.*which has 20"),
], ids=["overlap", "gap", "trailing"])
def test_tensors_must_tile_the_data_section(tmp_path, header, data, match):
    """Two tensors on the same bytes loaded as two equal weights, and gaps or trailing bytes passed the
    engine's check (then a LoRA's safe_open failed with a message naming no file); the safetensors format
    requires the tensors to cover the data section exactly."""
    path = _raw_safetensors(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(CheckpointError, match=rf"bad\.safetensors: corrupt safetensors .*{match}"):
        read_safetensors_header(path)


def test_checkpoint_folders_of_other_layouts(tmp_path, caplog):
    """A folder named by dit_original_ckpt holding a LoRA file beside the DiT took the LoRA's keys for the
    DiT's (the model folder's lookup skips them); a folder of .bin shards with their index was not found; a
    Wan umT5 .safetensors in the model folder was taken for a DiT shard (its blocks.N.attn keys)."""
    sd = _state_dict()
    folder = tmp_path / "ckpts"
    folder.mkdir()
    save_file(sd, str(folder / "wan.safetensors"))
    save_file(_lora(sd), str(folder / "style_lora.safetensors"))
    assert _same(load_dit(CFG, None, dit_original_ckpt=str(folder), dtype="fp32"), sd)
    bins = tmp_path / "bins"
    bins.mkdir()
    keys = sorted(sd)
    shards = {"m-1.bin": keys[: len(keys) // 2], "m-2.bin": keys[len(keys) // 2:]}
    for name, part in shards.items():
        torch.save({k: sd[k] for k in part}, bins / name)
    (bins / "diffusion_pytorch_model.bin.index.json").write_text(
        json.dumps({"weight_map": {k: name for name, part in shards.items() for k in part}}))
    assert _same(load_dit(CFG, None, dit_original_ckpt=str(bins), dtype="fp32"), sd)
    model = tmp_path / "model"
    model.mkdir()
    save_file(sd, str(model / "wan2.1_t2v_lightx2v_4step.safetensors"))
    save_file({"token_embedding.weight": torch.zeros(8, 4), "blocks.0.attn.q.weight": torch.zeros(4, 4),
               "blocks.0.ffn.fc1.weight": torch.zeros(4, 4), "blocks.0.norm2.weight": torch.zeros(4)},
              str(model / "models_t5_umt5-xxl-enc-bf16.safetensors"))
    with caplog.at_level(logging.INFO, logger="lightx2v_engine.loading"):
        assert [f.name for f in find_dit_checkpoint(model)] == ["wan2.1_t2v_lightx2v_4step.safetensors"]
    assert "models_t5_umt5-xxl-enc-bf16.safetensors" in caplog.text


def test_newer_comfyui_scaled_fp8_files_are_named(tmp_path):
    """ComfyUI's newer scaled-fp8 files ('*.comfy_quant' beside one-number '*.weight_scale' keys) were taken
    for LightX2V quantized files: the advice to set dit_quantized led to another error."""
    sd = _state_dict()
    comfy = {}
    for k, v in sd.items():
        if ".blocks." in f".{k}" and k.endswith(".weight") and v.dim() == 2:
            comfy["model.diffusion_model." + k] = v.to(torch.float8_e4m3fn)
            comfy["model.diffusion_model." + k[:-len(".weight")] + ".weight_scale"] = torch.tensor(1.0)
            comfy["model.diffusion_model." + k[:-len(".weight")] + ".comfy_quant"] = torch.tensor([1], dtype=torch.uint8)
        else:
            comfy["model.diffusion_model." + k] = v
    save_file(comfy, str(tmp_path / "wan_fp8_scaled.safetensors"))
    for load in (lambda: load_dit(CFG, None, dit_original_ckpt=str(tmp_path / "wan_fp8_scaled.safetensors")),
                 lambda: load_quantized_dit(CFG, None, str(tmp_path / "wan_fp8_scaled.safetensors"), "fp8-sgl")):
        with pytest.raises(CheckpointError, match=r"wan_fp8_scaled\.safetensors: a ComfyUI scaled-fp8 checkpoint"):
            load()
