"""Checkpoint files as users have them: quantized DiT in the model folder, LoRA files beside the DiT, legacy
torch pickles, corrupt safetensors headers, integer tensors where float weights belong."""
import json
import logging
import struct

import pytest
import torch
from safetensors.torch import save_file

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
    # the LoRA file beside it still applies when named
    with caplog.at_level(logging.INFO, logger="lightx2v_engine.loading"):
        load_quantized_dit(CFG, folder, None, "fp8-sgl", dtype="fp32",
                           lora_specs=[LoraSpec("style_lora.safetensors")])
    assert "style_lora.safetensors" in caplog.text
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


def test_integer_tensors_where_float_weights_belong(tmp_path):
    """int8 linear weights without their weight_scale keys, an int64 modulation: an error naming the file,
    key and dtype (and, for 8-bit weights, what a quantized checkpoint needs) before anything loads."""
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
