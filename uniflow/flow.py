"""Rectified flow matching: one implementation for the tokenizer's pixel decoder and the generator's token head.

Convention (the official release's): noise x0 ~ N(0, I) at t = 0, data x1 at t = 1,
    x_t = t * x1 + (1 - t) * x0,   target velocity v = x1 - x0,
so one Euler step from t = 0 gives x0 + v(x0, 0, c), the conditional mean of the data.

Two options aim at that one-step output (defaults = the release's recipe, so its checkpoint decodes as before):
- prediction "data" (`as_velocity`): the network predicts x1 and v = (x1_hat - x_t) / (1 - t). One Euler step from
  t = 0 then returns x1_hat itself: cancelling the input noise is structural instead of something the velocity
  head must learn exactly (the first bundle's blotchy flat areas are that cancellation left incomplete).
- t0_prob (`sample_time`): a point mass at t = 0, the only time the one-step output depends on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from uniflow.configs import check_choice, check_number
from uniflow.errors import ConfigError

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""v(x_t, t) with t of shape (B,) in [0, 1]; the condition is bound inside the closure."""

GridVelocityFn = Callable[[int, torch.Tensor], torch.Tensor]
"""v(i, x_t): the velocity at the i-th time of the sampler's grid (`time_grid`). A network that knows it is only
evaluated on the grid can compute once what depends on the time and the condition alone (`FlowHead.on_grid`)."""

SAMPLERS = ("euler", "heun")
PREDICTIONS = ("velocity", "data")
DATA_MIN_GAP = 0.05  # 1 - t is clamped here when a data prediction becomes a velocity (t -> 1 would divide by 0)
MAX_STEPS = 1000  # beyond this an ODE solve of a straight-ish flow gains nothing and only burns time


@dataclass
class FlowConfig:
    """Training-time and sampling-time choices of the flow objective.

    logit_normal_prob: probability of drawing t from logit-normal(mean, std); otherwise uniform (release: 0.9).
    sample_steps / sampler: default number of ODE steps and integrator at inference (release: 1 Euler step).
    t0_prob: probability of training at exactly t = 0 (on top of the mixture above). The 1-step Euler output is
        x0 + v(x0, 0, c): only t = 0 matters for it, and uniform or logit-normal times put no mass there.
        0 (default) draws exactly the release's times, from the same random stream.
    """

    logit_normal_prob: float = 0.9
    logit_normal_mean: float = 0.0
    logit_normal_std: float = 1.0
    sample_steps: int = 1
    sampler: str = "euler"
    t0_prob: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.logit_normal_prob <= 1.0:
            raise ConfigError(f"flow.logit_normal_prob must be in [0, 1], got {self.logit_normal_prob}")
        check_number("t0_prob", self.t0_prob, 0.0, 1.0, hi_open=True)
        check_sampler(self.sampler, self.sample_steps)


def check_sampler(sampler: str, steps: int) -> None:
    if sampler not in SAMPLERS:
        raise ConfigError(f"unknown sampler {sampler!r}; expected one of {SAMPLERS}")
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        raise ConfigError(f"sampling steps must be an integer in [1, {MAX_STEPS}], got {steps!r}")


def sample_time(n: int, config: FlowConfig, device: torch.device | str = "cpu",
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw n training times: logit-normal with probability `logit_normal_prob`, uniform otherwise; then, when
    `t0_prob` > 0, exactly 0 with probability `t0_prob` (drawn after the rest, so the default stream is unchanged)."""
    normal = torch.randn(n, device=device, generator=generator)
    logit_normal = torch.sigmoid(config.logit_normal_mean + config.logit_normal_std * normal)
    uniform = torch.rand(n, device=device, generator=generator)
    use_ln = torch.rand(n, device=device, generator=generator) < config.logit_normal_prob
    t = torch.where(use_ln, logit_normal, uniform)
    if config.t0_prob > 0:
        t = torch.where(torch.rand(n, device=device, generator=generator) < config.t0_prob, torch.zeros_like(t), t)
    return t


def interpolate(x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = t x1 + (1 - t) x0, with t of shape (B,) broadcast over the remaining dimensions."""
    t = t.view(-1, *([1] * (x1.ndim - 1))).to(x1.dtype)
    return t * x1 + (1 - t) * x0


def velocity_target(x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    return x1 - x0


def check_prediction(prediction: str) -> None:
    check_choice("prediction", prediction, PREDICTIONS)


def as_velocity(net: VelocityFn, prediction: str = "velocity") -> VelocityFn:
    """The velocity field of a network whose output is a velocity ("velocity": the network itself) or the data
    ("data": v = (x1_hat - x_t) / max(1 - t, DATA_MIN_GAP)); the samplers integrate what this returns."""
    check_prediction(prediction)
    if prediction == "velocity":
        return net

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        gap = (1 - t).clamp_min(DATA_MIN_GAP).view(-1, *([1] * (x.ndim - 1))).to(x.dtype)
        return (net(x, t) - x) / gap

    return velocity


def as_grid_velocity(net: GridVelocityFn, times: torch.Tensor, prediction: str = "velocity") -> GridVelocityFn:
    """`as_velocity` for a network evaluated on the grid `times`: the same conversion of a data prediction."""
    check_prediction(prediction)
    if prediction == "velocity":
        return net
    gaps = (1 - times).clamp_min(DATA_MIN_GAP)

    def velocity(i: int, x: torch.Tensor) -> torch.Tensor:
        return (net(i, x) - x) / gaps[i].to(x.dtype)

    return velocity


def flow_matching_loss(velocity: VelocityFn, x1: torch.Tensor, config: FlowConfig,
                       generator: torch.Generator | None = None, weight: torch.Tensor | None = None,
                       prediction: str = "velocity") -> torch.Tensor:
    """MSE between the network's output at (x_t, t) and its target for fresh noise and times; x1 is (B, D) data.

    prediction "velocity" (the release): target x1 - x0. "data": target x1, i.e. the velocity error weighted by
    (1 - t)^2: at t = 0 (the 1-step output) the two coincide, and the near-data times, where a velocity derived from
    a data prediction divides by 1 - t -> 0, do not dominate the loss.
    weight: optional (D,) per-channel weight (e.g. more on patch-border pixels), normalised here to mean 1 so the
    loss keeps its scale; None is the plain MSE.
    """
    check_prediction(prediction)
    x0 = torch.randn(x1.shape, device=x1.device, dtype=x1.dtype, generator=generator)
    t = sample_time(x1.shape[0], config, x1.device, generator)
    pred = velocity(interpolate(x0, x1, t), t)
    target = velocity_target(x0, x1) if prediction == "velocity" else x1
    if weight is None:
        return F.mse_loss(pred.float(), target.float())
    weight = weight.to(pred.device, torch.float32)
    return ((pred.float() - target.float()).pow(2) * (weight / weight.mean())).mean()


def guided(cond: VelocityFn, uncond: VelocityFn, scale: float) -> VelocityFn:
    """Classifier-free guidance: v_u + scale * (v_c - v_u). scale = 1 is the conditional field."""

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        v_c = cond(x, t)
        if scale == 1.0:
            return v_c
        v_u = uncond(x, t)
        return v_u + scale * (v_c - v_u)

    return velocity


def time_grid(steps: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The samplers' uniform grid: steps + 1 times from 0 (noise) to 1 (data)."""
    return torch.linspace(0.0, 1.0, steps + 1, device=device)


@torch.no_grad()
def sample(velocity: VelocityFn, x0: torch.Tensor, steps: int = 1, sampler: str = "euler") -> torch.Tensor:
    """Integrate dx/dt = v(x, t) from t = 0 (noise x0) to t = 1 on a uniform grid (`integrate`)."""
    check_sampler(sampler, steps)
    times = time_grid(steps, x0.device)
    batch = x0.shape[0]
    return integrate(lambda i, x: velocity(x, times[i].expand(batch)), x0, times, sampler)


@torch.no_grad()
def integrate(velocity: GridVelocityFn, x0: torch.Tensor, times: torch.Tensor, sampler: str = "euler"
              ) -> torch.Tensor:
    """Integrate dx/dt = v(i, x) over the grid `times` (`time_grid`), v(i, .) being the velocity at times[i].

    Euler: x += dt v(x, t). Heun (2nd order): predictor-corrector, with the last step falling back to Euler-free
    averaging too since v is defined at t = 1 for this parameterisation.
    """
    check_sampler(sampler, len(times) - 1)
    x = x0
    dts = times.diff().to(x.dtype)
    for i in range(len(times) - 1):
        dt = dts[i]
        v = velocity(i, x)
        if sampler == "euler":
            x = x + dt * v
        else:
            x_pred = x + dt * v
            v_next = velocity(i + 1, x_pred)
            x = x + dt * 0.5 * (v + v_next)
    return x
