"""Samplers for Wan2.1 flow matching: the 4-step distill sampler, the UniPC baseline, CFG and initial noise.

Flow convention (Wan2.1): x_t = (1 - sigma) * x0 + sigma * eps, the DiT predicts v = eps - x0, t = 1000 * sigma.
Shift: sigma' = s * sigma / (1 + (s - 1) * sigma).

Latents are [C=16, F, Hl, Wl] (no batch dimension, like LightX2V); every function here is shape-agnostic.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

LATENT_CHANNELS = 16
VAE_STRIDE = (4, 8, 8)
NUM_TRAIN_TIMESTEPS = 1000
DISTILL_MODES = ("deterministic", "renoise")


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """sigma' = s * sigma / (1 + (s - 1) * sigma), in the dtype of `sigmas`."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def _check_shift(shift: float) -> None:
    if not (isinstance(shift, (int, float)) and math.isfinite(shift) and shift > 0):
        raise ValueError(f"shift must be a finite number > 0, got {shift!r}")


# ----------------------------------------------------------------------------------------------------------------
# Step-distill sampler (LightX2V WanStepDistillScheduler / Self-Forcing)
# ----------------------------------------------------------------------------------------------------------------

def distill_timesteps(
    denoising_step_list: list[int] | tuple[int, ...],
    shift: float,
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
) -> tuple[torch.Tensor, list[float]]:
    """Timesteps and sigmas of the step-distilled model.

    Base grid sigma_k = linspace(1, 0, N+1)[:-1] in fp32 (k = 0..N-1), shifted, then index N - d_i is picked.
    Returns (timesteps fp32 [len(list)] = N * sigma' (floats, not rounded), sigmas as Python floats (the exact
    fp32 values)). [1000, 750, 500, 250] with shift 5 -> t = [1000, 937.5, 833.3333, 625].
    """
    _check_shift(shift)
    steps = list(denoising_step_list)
    if not steps:
        raise ValueError("denoising_step_list must not be empty")
    for d in steps:
        if not (isinstance(d, int) and not isinstance(d, bool) and 1 <= d <= num_train_timesteps):
            raise ValueError(
                f"denoising_step_list entries must be integers in [1, {num_train_timesteps}], got {d!r} in {steps}")
    if any(a <= b for a, b in zip(steps, steps[1:])):
        raise ValueError(f"denoising_step_list must be strictly decreasing, got {steps}")
    grid = torch.linspace(1.0, 0.0, num_train_timesteps + 1, dtype=torch.float32)[:-1]
    grid = shift_sigmas(grid, float(shift))
    index = torch.tensor([num_train_timesteps - d for d in steps], dtype=torch.long)
    sigmas = grid[index]
    timesteps = sigmas * num_train_timesteps
    return timesteps, [float(s) for s in sigmas]


@dataclass(frozen=True)
class DistillSampler:
    """Few-step sampler of the step-distilled Wan2.1 model.

    Per step i with sigma_i (all maths in fp32, sigmas are Python floats baked into the ops, so the whole loop
    is pure tensor ops without host syncs and can be captured in a CUDA graph):
        x0 = x - sigma_i * v
        last step:             return x0
        mode "deterministic":  x_next = x0 + sigma_{i+1} * v     (LightX2V's default since 2025-11)
        mode "renoise":        x_next = (1 - sigma_{i+1}) * x0 + sigma_{i+1} * noise_i  (Self-Forcing's update;
                               noise pre-drawn with `make_renoise_noise`, so the loop itself does no RNG)
    """

    timesteps: tuple[float, ...]
    sigmas: tuple[float, ...]
    mode: str = "deterministic"

    def __post_init__(self) -> None:
        if self.mode not in DISTILL_MODES:
            raise ValueError(f"distill sampler mode must be one of {DISTILL_MODES}, got {self.mode!r}")
        if len(self.timesteps) != len(self.sigmas) or not self.sigmas:
            raise ValueError(
                f"timesteps and sigmas must be non-empty and of equal length, got {len(self.timesteps)} and "
                f"{len(self.sigmas)}")

    @classmethod
    def from_step_list(
        cls,
        denoising_step_list: list[int] | tuple[int, ...] = (1000, 750, 500, 250),
        shift: float = 5.0,
        mode: str = "deterministic",
    ) -> "DistillSampler":
        timesteps, sigmas = distill_timesteps(denoising_step_list, shift)
        return cls(tuple(float(t) for t in timesteps), tuple(sigmas), mode)

    @property
    def num_steps(self) -> int:
        return len(self.sigmas)

    def timestep_tensor(self, device: torch.device | str | None = None) -> torch.Tensor:
        """fp32 [num_steps] timesteps for the DiT (allocate once, index per step)."""
        return torch.tensor(self.timesteps, dtype=torch.float32, device=device)

    def make_renoise_noise(
        self,
        shape: tuple[int, ...] | torch.Size,
        generator: torch.Generator,
        device: torch.device | str | None = None,
    ) -> list[torch.Tensor]:
        """fp32 noise for steps 0..num_steps-2 of mode "renoise", drawn in step order from `generator`.

        LightX2V's renoise-era scheduler (2025) drew it from the generator that made the initial noise, after
        it; pass that generator here (see `make_generator` / `initial_noise(generator=...)`). (Self-Forcing and
        another LightX2V version draw with torch.randn_like from the global CUDA RNG, seeded with the same seed:
        probably the initial noise's own stream restarted, not this one; unverified.) Drawn on the generator's
        device (a CPU generator gives device-independent noise, as in `initial_noise`), then moved to `device`
        (default: the generator's). Returns [] in deterministic mode.
        """
        if self.mode != "renoise":
            return []
        if device is None:
            device = generator.device
        return [torch.randn(tuple(shape), generator=generator, device=generator.device, dtype=torch.float32).to(device)
                for _ in range(self.num_steps - 1)]

    def step(self, i: int, x: torch.Tensor, v: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """x_i [..] and the flow prediction v [..] -> x_{i+1} (or x0 at the last step), in x.dtype."""
        n = self.num_steps
        if not 0 <= i < n:
            raise IndexError(f"step index {i} out of range for a {n}-step sampler")
        if x.shape != v.shape:
            raise ValueError(f"x and v must have the same shape, got {tuple(x.shape)} and {tuple(v.shape)}")
        xf = x.float()
        vf = v.float()
        x0 = xf - self.sigmas[i] * vf
        if i == n - 1:
            return x0.to(x.dtype)
        s_next = self.sigmas[i + 1]
        if self.mode == "deterministic":
            out = x0 + s_next * vf
        else:
            if noise is None:
                raise ValueError(f"renoise mode needs noise for step {i} (see make_renoise_noise)")
            if noise.shape != x.shape:
                raise ValueError(f"noise shape {tuple(noise.shape)} != latent shape {tuple(x.shape)}")
            out = (1.0 - s_next) * x0 + s_next * noise.float()
        return out.to(x.dtype)


# ----------------------------------------------------------------------------------------------------------------
# UniPC baseline (Wan2.1 FlowUniPCMultistepScheduler; order 2, bh2, x0-prediction, lower-order final steps)
# ----------------------------------------------------------------------------------------------------------------

def _linspace64(start: float, num_steps: int) -> torch.Tensor:
    """np.linspace(start, 0, num_steps + 1)[:-1] in float64, as Wan and LightX2V compute it (torch.linspace
    differs in the last bit for some elements: 1 fp32 ulp of sigma at shift 1, N = 60)."""
    import numpy as np
    return torch.from_numpy(np.linspace(start, 0.0, num_steps + 1)[:-1].copy())


def unipc_sigmas(num_steps: int, shift: float, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """Wan2.1 UniPC sigmas: linspace(sigma_max, 0, N+1)[:-1] (float64), shifted, then a final 0; fp32 [N+1].

    sigma_max = 1 - 1/1000 as Wan computes it (a fp32 value, ~0.99900001).
    """
    if not (isinstance(num_steps, int) and not isinstance(num_steps, bool) and num_steps >= 1):
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")
    _check_shift(shift)
    sigma_max = float(torch.tensor(1.0 - 1.0 / num_train_timesteps, dtype=torch.float32))
    s = _linspace64(sigma_max, num_steps)
    s = shift_sigmas(s, float(shift))
    return torch.cat([s, s.new_zeros(1)]).to(torch.float32)


class UniPCSampler:
    """UniPC multistep (UniP predictor + UniC corrector), order 2, B(h) = expm1(-h) ("bh2"), x0-prediction.

    Matches diffusers' UniPCMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction",
    solver_order=2, solver_type="bh2", predict_x0=True, lower_order_final=True, final_sigmas_type="zero") on the
    Wan sigma grid. With alpha = 1 - sigma, lambda = log(alpha) - log(sigma), h = lambda_t - lambda_s:
        x0_i   = x_i - sigma_i * v_i
        UniC   (i > 0): x_i <- (sigma_i/sigma_{i-1}) x_{i-1} + alpha_i (1 - e^{-h}) m_{i-1}
                                - alpha_i B(h) (rho_0 D_prev + rho_last (x0_i - m_{i-1}))
        UniP   : x_{i+1} = (sigma_{i+1}/sigma_i) x_i + alpha_{i+1} (1 - e^{-h}) x0_i - alpha_{i+1} B(h) 0.5 D1
    where D = (m_older - m_newer) / r and r the lambda-step ratio. Order 1 at step 0 (warm-up) and at the last
    step (lower_order_final). All per-step scalars are precomputed in fp32 like diffusers; tensor maths in fp32,
    the result in the sample's dtype. Stateful: call `step` once per index, in order (`reset()` to restart).
    """

    def __init__(self, num_steps: int, shift: float, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> None:
        self.num_steps = num_steps
        self.shift = float(shift)
        self.sigmas = unipc_sigmas(num_steps, shift, num_train_timesteps)  # fp32 [N+1]
        # int64 truncation of N * sigma' (computed in float64 before the fp32 cast, as Wan does)
        s64 = shift_sigmas(_linspace64(float(torch.tensor(1.0 - 1.0 / num_train_timesteps, dtype=torch.float32)),
                                       num_steps), self.shift)
        self.timesteps = (s64 * num_train_timesteps).to(torch.int64)
        self._coef = self._precompute()
        self.reset()

    def reset(self) -> None:
        self._m: list[torch.Tensor] = []       # x0 predictions, newest last (at most 2)
        self._last_sample: torch.Tensor | None = None
        self._next_index = 0

    def order(self, i: int) -> int:
        """Predictor order at step i: warm-up 1 at i=0, 1 at the last step (lower_order_final), else 2."""
        return min(2, self.num_steps - i, i + 1)

    def _precompute(self) -> list[dict[str, float]]:
        sig = self.sigmas  # fp32, like diffusers' scalar maths
        alpha = 1.0 - sig
        lam = torch.log(alpha) - torch.log(sig)  # +inf at sigma = 0
        coef = []
        for i in range(self.num_steps):
            c: dict[str, float] = {}
            # predictor i -> i+1
            h = lam[i + 1] - lam[i]
            e = torch.expm1(-h)  # = B(h) for bh2; -1 when sigma_{i+1} = 0
            c["p_x"] = float(sig[i + 1] / sig[i])
            c["p_m"] = float(-(alpha[i + 1] * e))
            if self.order(i) == 2:
                r = (lam[i - 1] - lam[i]) / h
                c["p_r"] = float(r)
                c["p_d"] = float(alpha[i + 1] * e * 0.5)
            # corrector at step i (from i-1), order = predictor order of step i-1
            if i > 0:
                h = lam[i] - lam[i - 1]
                hh = -h
                e = torch.expm1(hh)
                c["c_x"] = float(sig[i] / sig[i - 1])
                c["c_m"] = float(-(alpha[i] * e))
                c["c_b"] = float(alpha[i] * e)
                if self.order(i - 1) == 1:
                    c["c_rho_t"] = 0.5
                else:
                    r = (lam[i - 2] - lam[i - 1]) / h
                    g1 = e / hh - 1  # UniPC b-vector recursion: g_k = g_{k-1} / hh - 1/k!
                    b0 = g1 / e
                    g2 = g1 / hh - 0.5
                    b1 = g2 * 2 / e
                    # solve [[1, 1], [r, 1]] @ [rho0, rho1] = [b0, b1]
                    rho0 = (b0 - b1) / (1 - r)
                    c["c_r"] = float(r)
                    c["c_rho_0"] = float(rho0)
                    c["c_rho_t"] = float(b0 - rho0)
            coef.append(c)
        return coef

    def step(self, model_output_v: torch.Tensor, timestep_index: int, sample: torch.Tensor) -> torch.Tensor:
        """One UniPC step: v at sigma_i and x_i -> x_{i+1} (x0 after the last step), in sample.dtype."""
        i = timestep_index
        if i != self._next_index:
            raise ValueError(f"UniPC steps must be taken in order: expected index {self._next_index}, got {i}"
                             " (call reset() to restart)")
        if model_output_v.shape != sample.shape:
            raise ValueError(f"model output shape {tuple(model_output_v.shape)} != sample shape "
                             f"{tuple(sample.shape)}")
        c = self._coef[i]
        x = sample.float()
        m0 = x - float(self.sigmas[i]) * model_output_v.float()
        if i > 0:  # UniC: correct x_i with the fresh x0 prediction
            mp = self._m[-1]
            corr = c["c_rho_t"] * (m0 - mp)
            if "c_rho_0" in c:
                corr = corr + c["c_rho_0"] * ((self._m[-2] - mp) / c["c_r"])
            x = c["c_x"] * self._last_sample + c["c_m"] * mp - c["c_b"] * corr
        self._m = (self._m + [m0])[-2:]
        self._last_sample = x
        out = c["p_x"] * x + c["p_m"] * m0
        if "p_r" in c:
            out = out - c["p_d"] * ((self._m[-2] - m0) / c["p_r"])
        self._next_index = i + 1
        return out.to(sample.dtype)


# ----------------------------------------------------------------------------------------------------------------
# CFG and initial noise
# ----------------------------------------------------------------------------------------------------------------

def cfg_combine(v_uncond: torch.Tensor, v_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: v_u + scale * (v_c - v_u)."""
    return v_uncond + scale * (v_cond - v_uncond)


def latent_shape(num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
    """[16, (T-1)/4 + 1, H/8, W/8]; T must be 4k+1, H and W multiples of 16 (VAE stride 8 x patch 2)."""
    if not (isinstance(num_frames, int) and num_frames >= 1 and (num_frames - 1) % VAE_STRIDE[0] == 0):
        raise ValueError(f"num_frames must be 4k+1 (1, 5, ..., 81), got {num_frames!r}")
    for name, v in (("height", height), ("width", width)):
        if not (isinstance(v, int) and v > 0 and v % 16 == 0):
            raise ValueError(f"{name} must be a positive multiple of 16, got {v!r}")
    return (LATENT_CHANNELS, (num_frames - 1) // VAE_STRIDE[0] + 1, height // VAE_STRIDE[1], width // VAE_STRIDE[2])


MAX_SEED = 2 ** 64  # (exclusive: torch.Generator.manual_seed takes any unsigned 64-bit value)


def check_seed(seed) -> int:
    """seed as an int (numpy's integers too), or a ValueError naming it unless an integer in [0, 2^64)."""
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool) or not 0 <= seed < MAX_SEED:
        raise ValueError(f"seed must be an integer in [0, 2^64), got {seed!r}")
    return int(seed)


def make_generator(seed: int, device: torch.device | str) -> torch.Generator:
    """A torch.Generator on `device` seeded with `seed`."""
    return torch.Generator(device=torch.device(device)).manual_seed(check_seed(seed))


def initial_noise(
    num_frames: int,
    height: int,
    width: int,
    seed: int,
    device: torch.device | str,
    generator_device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """fp32 standard normal latent noise [16, (T-1)/4+1, H/8, W/8] on `device`.

    Drawn from a torch.Generator seeded by `seed` on `generator_device` (default: `device`), like LightX2V's
    seeded CUDA generator. CPU and CUDA generators give DIFFERENT noise for the same seed; pass
    generator_device="cpu" for device-independent noise. If `generator` is given it is used instead (and `seed`
    is ignored): e.g. one generator for the initial noise and then the renoise noise, as LightX2V does.
    """
    shape = latent_shape(num_frames, height, width)
    if generator is None:
        generator = make_generator(seed, generator_device if generator_device is not None else device)
    noise = torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32)
    return noise.to(device)
