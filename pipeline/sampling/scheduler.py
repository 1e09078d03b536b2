"""The flow-matching noise schedule and the two solvers MagiHuman samples with: multistep UniPC (order 2, bh2,
predicting x0 = x − σ·v, corrector after the first step, first-order final step) and the distilled model's
"predict x0, re-noise at the next σ" step.

The arithmetic is the official scheduler's, operation for operation in float32 (0-dim σ tensors and all),
so trajectories reproduce it bit for bit on the same device.
"""

from dataclasses import dataclass

import numpy as np
import torch

TRAIN_STEPS = 1000
# sigma_max of the training grid 1 - linspace(1, 1/1000, 1000)[::-1], as the float32 value it is stored in.
SIGMA_MAX = float(np.float32(1 - 1 / TRAIN_STEPS))
DEFAULT_SHIFT = 5.0


@dataclass(frozen=True)
class Schedule:
    """``timesteps`` [N] int64 (for the guidance switch and logs) and ``sigmas`` [N+1] float32, last 0."""

    timesteps: torch.Tensor
    sigmas: torch.Tensor

    @property
    def steps(self) -> int:
        return len(self.timesteps)


def flow_schedule(steps: int, shift: float = DEFAULT_SHIFT) -> Schedule:
    """σ_i = linspace(σ_max, 0, N+1)[:-1], shifted once by σ → shift·σ / (1 + (shift − 1)·σ); timesteps are
    trunc(1000·σ_i); a final σ of 0 is appended."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if shift <= 0:
        raise ValueError(f"shift must be positive, got {shift}")
    sigmas = np.linspace(SIGMA_MAX, 0.0, steps + 1)[:-1]
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    timesteps = torch.from_numpy(sigmas * TRAIN_STEPS).to(torch.int64)
    return Schedule(timesteps, torch.from_numpy(np.append(sigmas, 0.0).astype(np.float32)))


def _lambda(sigma: torch.Tensor) -> torch.Tensor:
    """log-SNR of the flow path x = (1 − σ)·x0 + σ·ε: log(1 − σ) − log(σ)."""
    return torch.log(1 - sigma) - torch.log(sigma)


def _phi(h: torch.Tensor, order: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For hh = −h: h·φ1 = expm1(hh), which is also B(h) of the bh2 variant, and the right-hand side b of
    the corrector's linear system."""
    hh = -h
    h_phi_1 = torch.expm1(hh)
    h_phi_k, factorial, b = h_phi_1 / hh - 1, 1, []
    for i in range(1, order + 1):
        b.append(h_phi_k * factorial / h_phi_1)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return h_phi_1, torch.tensor(b)


class UniPC:
    """One multistep UniPC solver over one latent (video and audio each get their own history)."""

    ORDER = 2

    def __init__(self, schedule: Schedule):
        self.sigmas = schedule.sigmas
        self.steps = schedule.steps
        self.x0s: list[torch.Tensor] = []  # x0 predictions of the last ORDER steps, newest last
        self.last_sample: torch.Tensor | None = None
        self.order = 0  # order of the last predictor step (the next corrector uses it)

    def step(self, velocity: torch.Tensor, i: int, x: torch.Tensor) -> torch.Tensor:
        """Step ``i`` (0-based): correct ``x`` with the new x0, then predict the sample at σ_{i+1}."""
        x0 = x - self.sigmas[i] * velocity
        if i > 0:
            x = self._correct(x0, x, i)
        self.x0s = (self.x0s + [x0])[-self.ORDER :]
        self.order = min(self.ORDER, self.steps - i, len(self.x0s))  # warm-up and lower-order final step
        self.last_sample = x
        return self._predict(x, i)

    def _predict(self, x: torch.Tensor, i: int) -> torch.Tensor:
        sigma_t, sigma_s0 = self.sigmas[i + 1], self.sigmas[i]
        alpha_t = 1 - sigma_t
        lambda_s0 = _lambda(sigma_s0)
        h = _lambda(sigma_t) - lambda_s0
        h_phi_1 = torch.expm1(-h)  # = B(h)
        m0 = self.x0s[-1]
        x_t = sigma_t / sigma_s0 * x - alpha_t * h_phi_1 * m0
        if self.order == 2:  # order 2 uses the fixed weight 1/2 on the one difference term
            rk = (_lambda(self.sigmas[i - 1]) - lambda_s0) / h
            d1 = (self.x0s[-2] - m0) / rk
            x_t = x_t - alpha_t * h_phi_1 * (0.5 * d1)
        return x_t

    def _correct(self, x0: torch.Tensor, x: torch.Tensor, i: int) -> torch.Tensor:
        """UniC: refine the sample just predicted (from ``last_sample`` at σ_{i−1}) with its own x0."""
        sigma_t, sigma_s0 = self.sigmas[i], self.sigmas[i - 1]
        alpha_t = 1 - sigma_t
        lambda_s0 = _lambda(sigma_s0)
        h = _lambda(sigma_t) - lambda_s0
        h_phi_1, b = _phi(h, self.order)
        m0 = self.x0s[-1]
        x_t = sigma_t / sigma_s0 * self.last_sample - alpha_t * h_phi_1 * m0
        if self.order == 1:
            return x_t - alpha_t * h_phi_1 * (0.5 * (x0 - m0))
        rk = (_lambda(self.sigmas[i - 2]) - lambda_s0) / h
        rhos = torch.linalg.solve(torch.stack([torch.ones(2), torch.stack([rk, torch.tensor(1.0)])]), b)
        d1 = (self.x0s[-2] - m0) / rk
        return x_t - alpha_t * h_phi_1 * (rhos[0] * d1 + rhos[-1] * (x0 - m0))


class Renoise:
    """The distilled sampler's step: x0 = x − σ_i·v, then x_{i+1} = σ_{i+1}·ε + (1 − σ_{i+1})·x0 with fresh
    noise ε from ``generator``; σ_N = 0, so the last step returns x0."""

    def __init__(self, schedule: Schedule, generator: torch.Generator):
        self.sigmas = schedule.sigmas
        self.generator = generator

    def step(self, velocity: torch.Tensor, i: int, x: torch.Tensor) -> torch.Tensor:
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        noise = torch.randn(x.shape, generator=self.generator, device=x.device, dtype=x.dtype)
        x0 = x - sigma * velocity
        return sigma_next * noise + (1 - sigma_next) * x0
