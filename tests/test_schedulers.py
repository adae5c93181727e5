import numpy as np
import pytest
import torch

from lightx2v_engine.schedulers import (
    DistillSampler,
    UniPCSampler,
    cfg_combine,
    distill_timesteps,
    initial_noise,
    latent_shape,
    make_generator,
    unipc_sigmas,
)


def _rand(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


# ---------------------------------------------------------------- distill timesteps

def test_distill_timesteps_lightx2v_default():
    t, s = distill_timesteps([1000, 750, 500, 250], 5.0)
    assert t.dtype == torch.float32 and t.shape == (4,)
    torch.testing.assert_close(t, torch.tensor([1000.0, 937.5, 833.3333, 625.0]), rtol=0, atol=1e-4)
    assert s == pytest.approx([1.0, 0.9375, 5 / 6, 0.625], abs=1e-7)
    assert all(isinstance(x, float) for x in s)


@pytest.mark.parametrize("steps,shift", [([1000, 750, 500, 250], 5.0), ([1000, 500], 3.0), ([999, 600, 301, 7], 8.0)])
def test_distill_timesteps_formula(steps, shift):
    t, s = distill_timesteps(steps, shift)
    for d, ti, si in zip(steps, t.tolist(), s):
        sigma = 1 - (1000 - d) / 1000  # base grid value at index 1000 - d
        ref = shift * sigma / (1 + (shift - 1) * sigma)
        assert si == pytest.approx(ref, abs=2e-7)
        assert ti == pytest.approx(1000 * ref, abs=1e-4)


@pytest.mark.parametrize("bad", [[], [1000, 1000], [250, 500], [0, -1], [1001], [1000.0, 500.0]])
def test_distill_timesteps_bad_lists(bad):
    with pytest.raises(ValueError):
        distill_timesteps(bad, 5.0)


@pytest.mark.parametrize("shift", [0.0, -1.0, float("nan")])
def test_distill_timesteps_bad_shift(shift):
    with pytest.raises(ValueError, match="shift"):
        distill_timesteps([1000, 500], shift)


# ---------------------------------------------------------------- distill updates

def test_distill_deterministic_formula():
    sm = DistillSampler.from_step_list([1000, 750, 500, 250], 5.0)
    sig = [1.0, 0.9375, 5 / 6, 0.625]
    x = _rand(16, 3, 6, 8, seed=1)
    for i in range(4):
        v = _rand(16, 3, 6, 8, seed=10 + i)
        out = sm.step(i, x, v)
        x0 = x.double() - sig[i] * v.double()
        if i < 3:
            ref = x0 + sig[i + 1] * v.double()
            # same step written as (1 - s') x0 + s' eps_hat with eps_hat = x + (1 - s) v
            eps_hat = x.double() + (1 - sig[i]) * v.double()
            alt = (1 - sig[i + 1]) * x0 + sig[i + 1] * eps_hat
            torch.testing.assert_close(alt, ref, rtol=0, atol=1e-12)
        else:
            ref = x0
        assert out.dtype == torch.float32
        torch.testing.assert_close(out.double(), ref, rtol=0, atol=2e-6)
        x = out


def test_distill_last_step_returns_x0_both_modes():
    x, v, n = _rand(4, 2, 3, seed=2), _rand(4, 2, 3, seed=3), _rand(4, 2, 3, seed=4)
    for mode in ("deterministic", "renoise"):
        sm = DistillSampler.from_step_list([1000, 750, 500, 250], 5.0, mode=mode)
        out = sm.step(3, x, v, noise=n)
        torch.testing.assert_close(out, x - 0.625 * v, rtol=0, atol=1e-6)


def test_distill_renoise_formula_and_reproducible():
    sm = DistillSampler.from_step_list([1000, 750, 500, 250], 5.0, mode="renoise")
    sig = [1.0, 0.9375, 5 / 6, 0.625]
    shape = (16, 2, 4, 6)

    def run(seed):
        g = make_generator(seed, "cpu")
        x = initial_noise(5, 32, 48, seed, "cpu", generator=g)
        noises = sm.make_renoise_noise(x.shape, g, "cpu")
        assert len(noises) == 3 and all(n.shape == shape and n.dtype == torch.float32 for n in noises)
        xs = [x]
        for i in range(4):
            v = torch.tanh(x) * 0.5 + 0.1 * i
            x = sm.step(i, x, v, noise=noises[i] if i < 3 else None)
            xs.append(x)
        return xs, noises

    xs, noises = run(7)
    xs2, noises2 = run(7)
    xs3, _ = run(8)
    for a, b in zip(xs, xs2):
        assert torch.equal(a, b)
    assert not torch.allclose(xs[-1], xs3[-1])
    # noises are distinct from each other and from the initial noise (drawn after it from the same generator)
    assert not torch.allclose(noises[0], noises[1]) and not torch.allclose(noises[0], xs[0])
    # formula check for every step
    for i in range(3):
        x, v = xs[i], torch.tanh(xs[i]) * 0.5 + 0.1 * i
        x0 = x.double() - sig[i] * v.double()
        ref = (1 - sig[i + 1]) * x0 + sig[i + 1] * noises[i].double()
        torch.testing.assert_close(xs[i + 1].double(), ref, rtol=0, atol=2e-6)


def test_distill_bf16_in_bf16_out_computed_in_fp32():
    sm = DistillSampler.from_step_list([1000, 750, 500, 250], 5.0)
    x, v = _rand(64, seed=5, dtype=torch.bfloat16), _rand(64, seed=6, dtype=torch.bfloat16)
    out = sm.step(1, x, v)
    assert out.dtype == torch.bfloat16
    ref = (x.float() - 0.9375 * v.float() + (5 / 6) * v.float()).to(torch.bfloat16)
    assert torch.equal(out, ref)


def test_distill_bad_inputs():
    with pytest.raises(ValueError, match="mode"):
        DistillSampler.from_step_list([1000, 500], 5.0, mode="sde")
    sm = DistillSampler.from_step_list([1000, 500], 5.0, mode="renoise")
    x = torch.zeros(3, 4)
    with pytest.raises(ValueError, match="noise"):
        sm.step(0, x, x)
    with pytest.raises(ValueError, match="noise shape"):
        sm.step(0, x, x, noise=torch.zeros(4, 3))
    with pytest.raises(IndexError):
        sm.step(2, x, x)
    with pytest.raises(ValueError, match="same shape"):
        sm.step(1, x, torch.zeros(3, 5))
    assert DistillSampler.from_step_list([1000, 500], 5.0).make_renoise_noise((2,), make_generator(0, "cpu")) == []


def test_renoise_noise_drawn_on_the_generators_device(monkeypatch):
    """A CPU generator with a pipeline on another device (initial_noise's device-independent advice): the
    noise is drawn on the generator's device (torch refuses a CPU generator for CUDA draws), then moved."""
    import lightx2v_engine.schedulers as sch
    real = torch.randn
    seen = []

    def randn(*a, generator=None, device=None, **k):
        seen.append(torch.device(device))
        if torch.device(device) != generator.device:
            raise RuntimeError(f"Expected a '{torch.device(device).type}' device type for generator")
        return real(*a, generator=generator, device=device, **k)

    monkeypatch.setattr(sch.torch, "randn", randn)
    sm = DistillSampler.from_step_list([1000, 750, 500, 250], 5.0, mode="renoise")
    out = sm.make_renoise_noise((2, 3), make_generator(7, "cpu"), "meta")
    monkeypatch.undo()
    assert seen == [torch.device("cpu")] * 3 and all(o.device.type == "meta" for o in out)
    ref = DistillSampler.from_step_list([1000, 750, 500, 250], 5.0, mode="renoise").make_renoise_noise(
        (2, 3), make_generator(7, "cpu"))
    assert len(ref) == 3 and not torch.equal(ref[0], ref[1])


def test_distill_timestep_tensor():
    sm = DistillSampler.from_step_list()
    t = sm.timestep_tensor("cpu")
    assert t.dtype == torch.float32 and t.shape == (4,)
    assert sm.num_steps == 4 and t[1].item() == 937.5


@pytest.mark.gpu
def test_distill_loop_cuda_graph_capture():
    """The whole 4-step loop (fake model + updates, renoise noise pre-drawn) replays identically from a graph."""
    dev = "cuda"
    sm = DistillSampler.from_step_list([1000, 750, 500, 250], 5.0, mode="renoise")
    g = make_generator(3, dev)
    x_init = initial_noise(9, 64, 96, 3, dev, generator=g)
    noises = sm.make_renoise_noise(x_init.shape, g, dev)
    ts = sm.timestep_tensor(dev)

    def loop(x):
        for i in range(sm.num_steps):
            v = torch.tanh(x) * (ts[i] / 1000)
            x = sm.step(i, x, v, noise=noises[i] if i < sm.num_steps - 1 else None)
        return x

    eager = loop(x_init.clone())
    static_x = x_init.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        loop(static_x)  # warm-up
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = loop(static_x)
    static_x.copy_(x_init)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_out, eager)


# ---------------------------------------------------------------- UniPC vs diffusers

def _diffusers_unipc(num_steps, shift):
    from diffusers import UniPCMultistepScheduler

    sch = UniPCMultistepScheduler(
        num_train_timesteps=1000, use_flow_sigmas=True, flow_shift=shift, prediction_type="flow_prediction",
        solver_order=2, solver_type="bh2", predict_x0=True, lower_order_final=True, final_sigmas_type="zero")
    # Wan's grid: linspace(sigma_max, 0, N+1)[:-1] with sigma_max = fp32(1 - 1/1000); diffusers shifts it
    sigma_max = float(np.float32(1 - 1 / 1000))
    sch.set_timesteps(sigmas=np.linspace(sigma_max, 0, num_steps + 1)[:-1])
    return sch


@pytest.mark.parametrize("num_steps,shift", [(50, 5.0), (8, 3.0), (40, 3.0), (1, 5.0), (2, 8.0)])
def test_unipc_timesteps_sigmas_vs_diffusers(num_steps, shift):
    ref = _diffusers_unipc(num_steps, shift)
    ours = UniPCSampler(num_steps, shift)
    assert ours.sigmas.dtype == torch.float32 and ours.sigmas.shape == (num_steps + 1,)
    torch.testing.assert_close(ours.sigmas, ref.sigmas.float(), rtol=0, atol=1e-6)
    assert ours.timesteps.dtype == torch.int64
    assert torch.equal(ours.timesteps, ref.timesteps)
    assert ours.sigmas[-1].item() == 0.0


def test_unipc_wan_example_timesteps():
    t = UniPCSampler(50, 5.0).timesteps.tolist()
    assert t[:3] == [999, 995, 991] and t[-2:] == [172, 92]
    s = unipc_sigmas(50, 5.0)
    # independent float64 formula
    base = np.linspace(0.999, 0, 51)[:-1]
    ref = 5 * base / (1 + 4 * base)
    np.testing.assert_allclose(s[:-1].numpy(), ref, atol=1e-6)


def _fake_v(x, t):
    # smooth, deterministic, x- and t-dependent "model"
    return torch.tanh(0.7 * x) + 0.3 * torch.sin(x + t / 300.0) - 0.5 * x + 0.01 * t / 1000


@pytest.mark.parametrize("num_steps,shift", [(10, 5.0), (8, 3.0), (3, 5.0), (1, 3.0)])
def test_unipc_full_run_vs_diffusers(num_steps, shift):
    ref = _diffusers_unipc(num_steps, shift)
    ours = UniPCSampler(num_steps, shift)
    x0 = _rand(2, 16, 3, 4, 6, seed=11)
    xr, xo = x0.clone(), x0.clone()
    for i, t in enumerate(ref.timesteps):
        xr = ref.step(_fake_v(xr, float(t)), t, xr).prev_sample
        xo = ours.step(_fake_v(xo, float(ours.timesteps[i])), i, xo)
        assert xo.dtype == torch.float32
        rel = ((xo - xr).abs().max() / xr.abs().max()).item()
        assert rel <= 1e-6, f"step {i}: relative error {rel}"
    # not trivial: the solver moved the sample
    assert (xo - x0).abs().max() > 0.1


def test_unipc_bf16_sample_dtype_and_reset():
    ours = UniPCSampler(4, 5.0)
    x = _rand(3, 5, seed=12, dtype=torch.bfloat16)
    outs = []
    for rep in range(2):
        y = x
        for i in range(4):
            y = ours.step(_fake_v(y.float(), float(ours.timesteps[i])).to(torch.bfloat16), i, y)
            assert y.dtype == torch.bfloat16
        outs.append(y)
        ours.reset()
    assert torch.equal(outs[0], outs[1])


def test_unipc_bad_inputs():
    with pytest.raises(ValueError, match="num_steps"):
        UniPCSampler(0, 5.0)
    with pytest.raises(ValueError, match="shift"):
        UniPCSampler(10, -2.0)
    u = UniPCSampler(4, 5.0)
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="in order"):
        u.step(x, 1, x)
    with pytest.raises(ValueError, match="shape"):
        u.step(torch.zeros(3, 2), 0, x)


# ---------------------------------------------------------------- CFG and noise

def test_cfg_combine():
    u, c = _rand(5, 7, seed=20), _rand(5, 7, seed=21)
    torch.testing.assert_close(cfg_combine(u, c, 5.0), u + 5.0 * (c - u))
    torch.testing.assert_close(cfg_combine(u, c, 1.0), c)
    torch.testing.assert_close(cfg_combine(u, c, 0.0), u)


def test_initial_noise_shape_and_seed():
    n = initial_noise(81, 480, 832, 42, "cpu")
    assert n.shape == (16, 21, 60, 104) and n.dtype == torch.float32
    assert latent_shape(81, 480, 832) == (16, 21, 60, 104)
    small = initial_noise(5, 32, 48, 42, "cpu")
    assert small.shape == (16, 2, 4, 6)
    assert torch.equal(small, initial_noise(5, 32, 48, 42, "cpu"))
    assert not torch.allclose(small, initial_noise(5, 32, 48, 43, "cpu"))
    # exactly torch.randn from a CPU generator seeded with the seed
    ref = torch.randn(16, 2, 4, 6, generator=torch.Generator().manual_seed(42), dtype=torch.float32)
    assert torch.equal(small, ref)
    assert abs(n.mean().item()) < 0.01 and abs(n.std().item() - 1) < 0.01
    # an explicit generator is used as given
    g = make_generator(42, "cpu")
    assert torch.equal(initial_noise(5, 32, 48, 0, "cpu", generator=g), ref)


@pytest.mark.parametrize("frames,h,w,match", [
    (80, 480, 832, "num_frames"), (0, 480, 832, "num_frames"), (81, 472, 832, "height"),
    (81, 480, 840, "width"), (81, 0, 832, "height"), (81, 480.0, 832, "height")])
def test_initial_noise_bad_sizes(frames, h, w, match):
    with pytest.raises(ValueError, match=match) as ei:
        initial_noise(frames, h, w, 0, "cpu")
    assert str({"num_frames": frames, "height": h, "width": w}[match]) in str(ei.value)


def test_bad_seed():
    with pytest.raises(ValueError, match="seed"):
        initial_noise(5, 32, 32, -1, "cpu")


@pytest.mark.parametrize("n,shift", [(60, 1.0), (120, 1.0), (50, 5.0)])
def test_unipc_sigmas_bitwise_as_wans_numpy_grid(n, shift):
    """Wan / LightX2V build the grid with np.linspace (float64), shift it, cast to fp32: torch.linspace
    differed in the last bit (1 fp32 ulp at shift 1, N 60 and 120)."""
    import numpy as np
    from lightx2v_engine.schedulers import unipc_sigmas
    s = np.linspace(float(np.float32(1 - 1 / 1000)), 0, n + 1)[:-1]
    s = shift * s / (1 + (shift - 1) * s)
    want = torch.from_numpy(np.append(s, 0.0).astype(np.float32))
    assert torch.equal(unipc_sigmas(n, shift), want)
