"""Host memory while loading: a 1.3B-shaped bf16 checkpoint peaks at <= 1.3x its file size in RSS."""
import json
import struct
import subprocess
import sys
import textwrap

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
    with torch.device("meta"):
        model = WanDiT(PRESETS["wan2.1-t2v-1.3b"])
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    size = write_random_safetensors(path, shapes)
    assert size > 2.8e9
    code = textwrap.dedent(f"""
        import torch, json
        from lightx2v_engine.checkpoint import current_rss_bytes
        from lightx2v_engine.config import PRESETS
        from lightx2v_engine.loading import load_dit
        before = current_rss_bytes()
        m = load_dit(PRESETS["wan2.1-t2v-1.3b"], {str(tmp_path)!r}, dtype="bf16")
        peak = int([l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0].split()[1]) * 1024
        w = m.blocks[29].ffn[2].weight
        print(json.dumps({{"before": before, "peak": peak, "dtype": str(w.dtype), "std": w.float().std().item()}}))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["dtype"] == "torch.bfloat16"
    assert 0.9 < res["std"] < 1.1  # the random weights really were read
    grown = res["peak"] - res["before"]
    assert grown <= 1.3 * size, (grown / size, res)
