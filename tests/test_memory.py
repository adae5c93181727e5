"""Host memory while loading: a 1.3B-shaped bf16 checkpoint (6 of its 30 blocks: the same tensors, fewer of
them) grows the RSS by at most its file size + 384 MiB (one copy of the weights, not two)."""
import json
import struct
import subprocess
import sys
import textwrap
from dataclasses import replace

import torch

from lightx2v_engine.config import PRESETS
from lightx2v_engine.dit import WanDiT


def write_random_safetensors(path, shapes: dict[str, tuple], dtype=torch.bfloat16, seed=0):
    """Streams a safetensors file tensor by tensor (never holding the whole checkpoint in memory)."""
    header, offset = {}, 0
    itemsize = torch.empty((), dtype=dtype).element_size()
    for k, shape in shapes.items():
        n = itemsize
        for s in shape:
            n *= s
        header[k] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    g = torch.Generator().manual_seed(seed)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for k, shape in shapes.items():
            t = torch.randn(shape, generator=g, dtype=torch.float32).to(dtype)
            f.write(t.view(-1).view(torch.uint8).numpy().tobytes())
    return offset + 8 + len(raw)


def test_loading_peak_rss_1p3b(tmp_path):
    cfg = replace(PRESETS["wan2.1-t2v-1.3b"], num_layers=6)
    with torch.device("meta"):
        model = WanDiT(cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    size = write_random_safetensors(path, shapes)
    assert size > 6e8
    code = textwrap.dedent(f"""
        import torch, json
        from lightx2v_engine.checkpoint import current_rss_bytes
        from dataclasses import replace
        from lightx2v_engine.config import PRESETS
        from lightx2v_engine.loading import load_dit
        before = current_rss_bytes()
        m = load_dit(replace(PRESETS["wan2.1-t2v-1.3b"], num_layers=6), {str(tmp_path)!r}, dtype="bf16")
        peak = int([l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0].split()[1]) * 1024
        w = m.blocks[5].ffn[2].weight
        print(json.dumps({{"before": before, "peak": peak, "dtype": str(w.dtype), "std": w.float().std().item()}}))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["dtype"] == "torch.bfloat16"
    assert 0.9 < res["std"] < 1.1  # the random weights really were read
    grown = res["peak"] - res["before"]
    assert grown <= size + 384 * 2 ** 20, ((grown - size) / 2 ** 20, res)  # ~160 MiB measured; a copy: +580
