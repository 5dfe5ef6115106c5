import math

import pytest
import torch

from uniflow import flow
from uniflow.errors import ConfigError
from uniflow.flow_head import FlowHead


def test_interpolation_and_target_convention():
    x0, x1 = torch.randn(4, 6), torch.randn(4, 6)
    assert torch.equal(flow.interpolate(x0, x1, torch.zeros(4)), x0)  # noise at t = 0
    assert torch.equal(flow.interpolate(x0, x1, torch.ones(4)), x1)  # data at t = 1
    t = torch.tensor([0.25, 0.5, 0.75, 0.1])
    assert torch.allclose(flow.interpolate(x0, x1, t), t[:, None] * x1 + (1 - t[:, None]) * x0)
    assert torch.allclose(flow.velocity_target(x0, x1), x1 - x0)
    # moving along the target velocity from x_t for the remaining time lands on the data
    xt = flow.interpolate(x0, x1, t)
    assert torch.allclose(xt + (1 - t[:, None]) * flow.velocity_target(x0, x1), x1, atol=1e-6)


def test_one_euler_step_is_noise_plus_velocity_at_zero():
    head = FlowHead(channels=12, cond_dim=8, width=16, depth=2)
    for p in head.parameters():  # leave the zero init so the head is not trivially zero
        torch.nn.init.normal_(p, std=0.2)
    cond = torch.randn(5, 8)
    x0 = torch.randn(5, 12)
    out = flow.sample(lambda x, t: head(x, t, cond), x0, steps=1, sampler="euler")
    expected = x0 + head(x0, torch.zeros(5), cond)
    assert torch.allclose(out, expected, atol=1e-6)


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_integrates_known_linear_field(sampler):
    # dx/dt = A x has the exact solution x(1) = expm(A) x(0)
    a = torch.tensor([[0.0, -1.0], [1.0, -0.2]], dtype=torch.float64)
    x0 = torch.randn(3, 2, dtype=torch.float64)
    exact = x0 @ torch.linalg.matrix_exp(a).T
    steps = 200
    out = flow.sample(lambda x, t: x @ a.T, x0, steps=steps, sampler=sampler)
    err = (out - exact).abs().max().item()
    if sampler == "heun":
        assert err < 1e-4
    else:
        assert err < 5e-3 and err > 1e-6  # first order: visibly less exact than Heun


def test_heun_is_exact_on_time_dependent_linear_field():
    x0 = torch.randn(4, 3, dtype=torch.float64)
    # dx/dt = 2t gives x(1) = x0 + 1; Heun (trapezoid) integrates it exactly at any step count
    out = flow.sample(lambda x, t: (2 * t)[:, None].expand_as(x), x0, steps=3, sampler="heun")
    assert torch.allclose(out, x0 + 1, atol=1e-12)


def test_time_sampling_mixture():
    cfg = flow.FlowConfig(logit_normal_prob=1.0)
    t = flow.sample_time(20000, cfg, generator=torch.Generator().manual_seed(0))
    assert t.min() > 0 and t.max() < 1
    logits = torch.log(t / (1 - t))
    assert abs(logits.mean().item()) < 0.05 and abs(logits.std().item() - 1) < 0.05
    u = flow.sample_time(20000, flow.FlowConfig(logit_normal_prob=0.0), generator=torch.Generator().manual_seed(0))
    assert abs(u.mean().item() - 0.5) < 0.01 and abs(u.var().item() - 1 / 12) < 0.005
    # the default mixture sits between the two: fraction in the tails (t < 0.05) tells them apart
    m = flow.sample_time(20000, flow.FlowConfig(), generator=torch.Generator().manual_seed(0))
    tail_ln, tail_u, tail_m = [(x < 0.05).float().mean().item() for x in (t, u, m)]
    assert tail_ln < tail_m < tail_u
    assert math.isclose(tail_m, 0.9 * tail_ln + 0.1 * tail_u, abs_tol=0.01)


def test_cfg_combines_fields():
    cond = lambda x, t: torch.ones_like(x)
    uncond = lambda x, t: torch.zeros_like(x)
    v = flow.guided(cond, uncond, 3.0)(torch.zeros(2, 2), torch.zeros(2))
    assert torch.equal(v, torch.full((2, 2), 3.0))
    out = flow.sample(flow.guided(cond, uncond, 1.5), torch.zeros(2, 2), steps=4)
    assert torch.allclose(out, torch.full((2, 2), 1.5))


def test_flow_loss_matches_target_for_perfect_field():
    x1 = torch.randn(64, 5)
    gen = torch.Generator().manual_seed(1)
    # with the same generator the loss draws x0 then t; an oracle velocity needs x0, so recompute it
    x0 = torch.randn(x1.shape, generator=torch.Generator().manual_seed(1))
    loss = flow.flow_matching_loss(lambda x, t: x1 - x0, x1, flow.FlowConfig(), generator=gen)
    assert loss.item() < 1e-10
    assert flow.flow_matching_loss(lambda x, t: torch.zeros_like(x), x1, flow.FlowConfig()).item() > 0.5


def test_bad_sampler_settings():
    with pytest.raises(ConfigError, match="unknown sampler"):
        flow.sample(lambda x, t: x, torch.zeros(1, 1), sampler="rk4")
    for steps in (0, -1, True, 1.5, flow.MAX_STEPS + 1):
        with pytest.raises(ConfigError, match=r"integer in \[1, 1000\]"):
            flow.sample(lambda x, t: x, torch.zeros(1, 1), steps=steps)
    with pytest.raises(ConfigError, match="unknown sampler ''"):
        flow.check_sampler("", 1)
    with pytest.raises(ConfigError):
        flow.FlowConfig(logit_normal_prob=2.0)


def test_flow_head_zero_init_and_condition_through_adaln_only():
    head = FlowHead(channels=12, cond_dim=8, width=16, depth=3)
    x, t, c = torch.randn(4, 12), torch.rand(4), torch.randn(4, 8)
    assert torch.equal(head(x, t, c), torch.zeros(4, 12))  # zero-init output and modulation
    # the condition reaches the residual stream only through the adaLN layers
    for block in head.blocks:
        assert block.ada.weight.abs().sum() == 0
    assert head.final.linear.weight.abs().sum() == 0


def test_shared_time_is_embedded_once_with_the_same_result():
    head = FlowHead(channels=6, cond_dim=4, width=8, depth=2)
    for p in head.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x, c = torch.randn(5, 6), torch.randn(5, 4)
    shared = torch.tensor(0.3).expand(5)
    assert shared.stride(0) == 0
    assert torch.allclose(head(x, shared, c), head(x, torch.full((5,), 0.3), c), atol=1e-6)


@pytest.mark.parametrize("prediction", ["velocity", "data"])
@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_the_head_on_a_time_grid_is_the_head(prediction: str, sampler: str) -> None:
    """`FlowHead.on_grid` (the condition terms of every grid time computed once) gives the head's output at each grid
    time, and integrating it (`flow.integrate`, `flow.as_grid_velocity`) gives what `flow.sample` gives."""
    head = FlowHead(channels=6, cond_dim=4, width=8, depth=2)
    for p in head.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x, c = torch.randn(5, 6), torch.randn(5, 4)
    times = flow.time_grid(4)
    assert torch.equal(times, torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]))
    on_grid = head.on_grid(c, times)
    outputs = [on_grid(i, x) for i in range(len(times))]
    for i, out in enumerate(outputs):
        torch.testing.assert_close(out, head(x, times[i].expand(5), c), atol=1e-5, rtol=1e-5)
    assert (outputs[0] - outputs[-1]).abs().max() > 1e-2  # the time reaches the output
    grid = flow.integrate(flow.as_grid_velocity(on_grid, times, prediction), x, times, sampler)
    plain = flow.sample(flow.as_velocity(lambda x, t: head(x, t, c), prediction), x, 4, sampler)
    torch.testing.assert_close(grid, plain, atol=1e-5, rtol=1e-5)


def test_default_time_stream_is_the_releases():
    """t0_prob = 0 draws no extra random numbers: same times, same stream after them, as before the option."""
    cfg = flow.FlowConfig()
    gen, ref = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    t = flow.sample_time(1000, cfg, generator=gen)
    normal = torch.randn(1000, generator=ref)
    uniform = torch.rand(1000, generator=ref)
    use_ln = torch.rand(1000, generator=ref) < cfg.logit_normal_prob
    assert torch.equal(t, torch.where(use_ln, torch.sigmoid(normal), uniform))
    assert torch.equal(torch.rand(4, generator=gen), torch.rand(4, generator=ref))


def test_t0_prob_is_a_point_mass_at_zero():
    cfg = flow.FlowConfig(logit_normal_prob=0.0, t0_prob=0.25)
    t = flow.sample_time(20000, cfg, generator=torch.Generator().manual_seed(0))
    zero = (t == 0).float().mean().item()
    assert abs(zero - 0.25) < 0.015
    rest = t[t > 0]
    assert abs(rest.mean().item() - 0.5) < 0.01  # the rest is still the configured (uniform) distribution
    for bad in (-0.1, 1.0, float("nan")):
        with pytest.raises(ConfigError, match="t0_prob"):
            flow.FlowConfig(t0_prob=bad)


def test_data_prediction_one_euler_step_returns_the_prediction():
    head = FlowHead(channels=12, cond_dim=8, width=16, depth=2)
    for p in head.parameters():
        torch.nn.init.normal_(p, std=0.2)
    cond, x0 = torch.randn(5, 8), torch.randn(5, 12)
    net = lambda x, t: head(x, t, cond)  # noqa: E731
    out = flow.sample(flow.as_velocity(net, "data"), x0, steps=1)
    assert torch.allclose(out, net(x0, torch.zeros(5)), atol=1e-5)  # no input noise left to cancel
    assert flow.as_velocity(net, "velocity") is net  # the release's parameterisation is untouched
    # v = (x1_hat - x_t) / (1 - t), with 1 - t clamped so t = 1 (Heun's last evaluation) stays finite
    t = torch.tensor([0.0, 0.5, 1.0, 0.99, 0.2])
    v = flow.as_velocity(net, "data")(x0, t)
    gap = (1 - t).clamp_min(flow.DATA_MIN_GAP)[:, None]
    assert torch.allclose(v, (net(x0, t) - x0) / gap) and torch.isfinite(v).all()
    assert torch.isfinite(flow.sample(flow.as_velocity(net, "data"), x0, steps=4, sampler="heun")).all()
    with pytest.raises(ConfigError, match="prediction"):
        flow.as_velocity(net, "epsilon")


def test_data_prediction_loss_and_loss_weights():
    x1 = torch.randn(64, 5)
    oracle = flow.flow_matching_loss(lambda x, t: x1, x1, flow.FlowConfig(), prediction="data")
    assert oracle.item() < 1e-12  # the target of a data prediction is the data itself
    # a constant weight is normalised away; a non-constant one moves the loss toward the weighted channels
    net = lambda x, t: torch.zeros_like(x)  # noqa: E731
    plain = flow.flow_matching_loss(net, x1, flow.FlowConfig(), generator=torch.Generator().manual_seed(0))
    const = flow.flow_matching_loss(net, x1, flow.FlowConfig(), generator=torch.Generator().manual_seed(0),
                                    weight=torch.full((5,), 7.0))
    assert torch.allclose(plain, const)
    x1_skewed = torch.cat([torch.zeros(64, 4), 10 * torch.ones(64, 1)], dim=1)
    losses = [flow.flow_matching_loss(lambda x, t: x1_skewed, x1_skewed, flow.FlowConfig(), prediction="data",
                                      weight=torch.tensor(w)) for w in ([1.0, 1, 1, 1, 1], [1.0, 1, 1, 1, 5])]
    assert losses[0].item() < 1e-12 and losses[1].item() < 1e-12  # a perfect prediction stays at 0
