"""Every op traces: torch.compile(fullgraph=True) of a DiT block with the ops layer in place (CPU, references)."""
import torch

from lightx2v_engine import ops
from lightx2v_engine.loading import build_dit

from dit_fixtures import TINY_I2V, TINY_T2V, inputs, rel_l2


def _block_inputs(model, cfg, seed=0):
    x, t, ctx, clip, y = inputs(cfg, text_len=16, seed=seed)
    with torch.no_grad():
        from lightx2v_engine.dit import sinusoidal_embedding
        e0 = model.time_projection(model.time_embedding(sinusoidal_embedding(t))).unflatten(1, (6, cfg.dim))
        xin = torch.cat([x, y], dim=1) if y is not None else x
        tokens = model.patch_embedding(xin).flatten(2).transpose(1, 2).float()
        text = model.text_embedding(ctx)
        img = model.img_emb(clip, torch.float32) if cfg.is_i2v else None
    mod = model.blocks[0].modulation + e0
    h = ops.modulate(tokens, mod[:, 0:1], mod[:, 1:2])
    rope = model.rope((3, 3, 5), tokens.device)
    return tokens, h, mod, text, img, rope, torch.ones(1, 1, cfg.dim)


def test_block_compiles_fullgraph():
    ops.set_backend("torch")
    try:
        for cfg in (TINY_T2V, TINY_I2V):
            torch._dynamo.reset()
            model = build_dit(cfg, None, dtype=torch.float32)
            args = _block_inputs(model, cfg)
            block = model.blocks[0]
            with torch.no_grad():  # (the block takes [x, h] as a list it empties: a fresh one a call)
                eager = block(list(args[:2]), *args[2:])
                compiled = torch.compile(block, fullgraph=True, backend="aot_eager")(list(args[:2]), *args[2:])
            for a, b in zip(eager, compiled):
                assert rel_l2(b, a) < 1e-6
    finally:
        ops.set_backend("auto")


def test_block_with_the_kernels_compiles_fullgraph():
    """The same with the Triton kernels (custom ops with fake implementations; on the CPU through the
    interpreter, fp16): the compiled graph holds lightx2v:: ops and gives the eager result."""
    from torch._dynamo.backends.registry import lookup_backend
    graphs = []

    def recording(gm, example_inputs):
        graphs.append(gm)
        return lookup_backend("aot_eager")(gm, example_inputs)
    ops.set_backend("kernels")
    try:
        torch._dynamo.reset()
        cfg = TINY_T2V
        torch.manual_seed(0)
        model = build_dit(cfg, None, dtype=torch.float16)
        x = torch.randn(1, 45, cfg.dim)
        mod = torch.randn(1, 6, cfg.dim) * 0.1
        h = ops.modulate(x, mod[:, 0:1], mod[:, 1:2], out_dtype=torch.float16)
        args = (mod, torch.randn(1, 16, cfg.dim, dtype=torch.float16), None, model.rope((3, 3, 5), x.device),
                torch.ones(1, 1, cfg.dim))
        with torch.no_grad():
            eager = model.blocks[0]([x, h], *args)
            compiled = torch.compile(model.blocks[0], fullgraph=True, backend=recording)([x, h], *args)
        targets = {str(n.target) for gm in graphs for n in gm.graph.nodes if n.op == "call_function"}
        assert any("lightx2v." in t for t in targets), sorted(targets)
        for a, b in zip(eager, compiled):
            assert a.dtype == b.dtype and rel_l2(b.float(), a.float()) < 1e-6
    finally:
        ops.set_backend("auto")
