"""LightX2V quantized DiT checkpoints (dit_quantized / dit_quantized_ckpt / dit_quant_scheme)."""
import pytest
import torch
from safetensors.torch import save_file

from lightx2v_engine.checkpoint import CheckpointError
from lightx2v_engine.loading import build_dit, load_quantized_dit
from lightx2v_engine.quant import QuantLinear, quantize_dit_

from dit_fixtures import TINY_I2V, TINY_T2V, diffusers_model, inputs, rel_l2, wan_state_dict


pytestmark = pytest.mark.usefixtures("torch_ops")  # the plain-PyTorch reference ops (conftest)


@pytest.mark.parametrize("cfg", [TINY_T2V, TINY_I2V], ids=["t2v", "i2v"])
@pytest.mark.parametrize("scheme", ["fp8-sgl", "int8-vllm"])
def test_quantized_checkpoint_round_trip(cfg, scheme, tmp_path):
    sd = wan_state_dict(diffusers_model(cfg))
    ref = build_dit(cfg, None, dtype=torch.float32)
    ref.load_state_dict(sd)
    quantize_dit_(ref, scheme)
    qsd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    # LightX2V may write the scales in bf16 (its loader forces fp32): here one [out] scale in bf16
    odd = "blocks.1.ffn.2.weight_scale"
    qsd[odd] = qsd[odd].reshape(-1).to(torch.bfloat16)
    ref.blocks[1].ffn[2].weight_scale.copy_(qsd[odd].float().reshape(-1, 1))
    save_file({"model." + k: v for k, v in qsd.items()}, str(tmp_path / "q.safetensors"))
    model = load_quantized_dit(cfg, tmp_path, "q.safetensors", scheme, dtype="fp32")
    n_quant = sum(isinstance(m, QuantLinear) for m in model.modules())
    assert n_quant == cfg.num_layers * (4 + 4 + 2 + (2 if cfg.is_i2v else 0))
    assert model.blocks[0].ffn[0].weight.dtype in (torch.float8_e4m3fn, torch.int8)
    assert model.blocks[0].ffn[0].weight_scale.dtype == torch.float32
    x, t, ctx, clip, y = inputs(cfg, text_len=512 if cfg.is_i2v else 16)
    full = build_dit(cfg, None, dtype=torch.float32)
    full.load_state_dict(sd)
    with torch.no_grad():
        a, b, c = model(x, t, ctx, clip, y), ref(x, t, ctx, clip, y), full(x, t, ctx, clip, y)
    assert rel_l2(a, b) < 1e-6  # the same quantized weights
    assert rel_l2(a, c) < 0.1   # close to the unquantized model


def test_quantized_checkpoint_errors(tmp_path):
    sd = wan_state_dict(diffusers_model(TINY_T2V))
    save_file(sd, str(tmp_path / "bf16.safetensors"))
    with pytest.raises(CheckpointError, match=r"bf16.safetensors: not a quantized checkpoint"):
        load_quantized_dit(TINY_T2V, None, str(tmp_path / "bf16.safetensors"), "fp8-sgl")
    ref = build_dit(TINY_T2V, None, dtype=torch.float32)
    ref.load_state_dict(sd)
    quantize_dit_(ref, "int8")
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "int8.safetensors"))
    with pytest.raises(CheckpointError, match=r"blocks\.0\.\w+\.\w+\.weight.*torch.int8, the fp8-sgl scheme needs"):
        load_quantized_dit(TINY_T2V, None, str(tmp_path / "int8.safetensors"), "fp8-sgl")
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_quantized_dit(TINY_T2V, tmp_path, "nope.safetensors", "fp8-sgl")
    with pytest.raises(ValueError, match="nvfp4"):
        load_quantized_dit(TINY_T2V, tmp_path, "bf16.safetensors", "nvfp4")
