"""sde_sampler.py: grid and g_k values, the SDE step by hand and against Euler, log-density and KL
against torch.distributions / Monte Carlo, τ selection, DPM-Solver++ accuracy and marginal
preservation on a Gaussian toy whose velocity field is analytic."""
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from grpo import GRPOConfig, policy_loss  # noqa: E402
from sde_sampler import (  # noqa: E402
    SDEConfig,
    diffusion_coeff,
    dpm_solver_2m,
    euler_sample,
    initial_noise,
    kl_to_ref,
    log_prob,
    ode_sample,
    sample_sde,
    sde_step,
    select_steps,
    timesteps,
)

# Toy data x0 ~ N(M, S²) per element. Then x_t ~ N((1−t)M, V_t), V_t = (1−t)²S² + t², and the exact
# velocity E[ε − x0 | x_t] is affine in x. The ODE maps x1 = ξ to x_t = (1−t)M + sqrt(V_t)·ξ.
M, S = 2.0, 0.5


def gauss_v(x, t):
    a = 1.0 - t
    var = a * a * S * S + t * t  # V_t
    return (t - a * S * S) / var * (x - a * M) - M


def linear_v(x, t):
    return 0.3 * x - 1.0 + t  # an arbitrary smooth field for exactness checks


# -----------------------------------------------------------------------------
# grid and coefficients


def test_timesteps_uniform_and_shifted():
    torch.testing.assert_close(timesteps(4), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    ts = timesteps(10, shift=3.0)
    assert ts[0].item() == 1.0 and ts[-1].item() == 0.0 and ts.shape == (11,)
    assert (ts[1:] < ts[:-1]).all()  # strictly decreasing 1 -> 0
    assert ts[5].item() == pytest.approx(0.75)  # s = 0.5: 3·0.5 / (1 + 2·0.5)
    assert (timesteps(10, 3.0)[1:-1] > timesteps(10)[1:-1]).all()  # shift > 1 stays nearer noise
    with pytest.raises(ValueError):
        timesteps(0)


def test_diffusion_coeff_flow_and_dance():
    ts = timesteps(10)
    g = diffusion_coeff(ts, SDEConfig(schedule="flow", noise_level=0.75))
    assert g.shape == (10,)
    assert g[0].item() == pytest.approx(0.75 * math.sqrt(1.0 / (1.0 - 0.9)))  # t̃_0 = t_1 = 0.9
    assert g[5].item() == pytest.approx(0.75)  # t = 0.5: sqrt(0.5 / 0.5) = 1
    assert g[9].item() == pytest.approx(0.75 * math.sqrt(0.1 / 0.9))
    torch.testing.assert_close(diffusion_coeff(ts, SDEConfig(schedule="dance", noise_level=0.3)),
                               torch.full((10,), 0.3))


# -----------------------------------------------------------------------------
# the step


def test_sde_step_hand_values():
    x, v = torch.tensor([[1.0]]), torch.tensor([[0.5]])
    x_next, mean, std = sde_step(x, v, 0.5, 0.25, 1.0, noise=torch.ones(1, 1))
    # ε̂ = 1 + 0.5·0.5 = 1.25; μ = 1 − 0.25·(0.5 + 1/(2·0.5)·1.25) = 0.5625; std = sqrt(0.25)
    assert mean.item() == pytest.approx(0.5625) and std.item() == pytest.approx(0.5)
    assert x_next.item() == pytest.approx(1.0625)


def test_zero_noise_sde_equals_euler_exactly():
    torch.manual_seed(0)
    x, v = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    t, t_next = torch.tensor(0.7), torch.tensor(0.55)  # fp32, as the grid from timesteps()
    x_next, mean, _ = sde_step(x, v, t, t_next, 0.0, noise=torch.randn(3, 2, 4, 4))
    assert torch.equal(x_next, mean) and torch.equal(x_next, x + (t_next - t) * v)  # dt = −h < 0
    ts = timesteps(10, shift=3.0)
    x1 = torch.randn(5, 3, 8)
    x0, traj, _, _, _ = sample_sde(linear_v, x1, ts, torch.zeros(10))
    assert torch.equal(x0, euler_sample(linear_v, x1, ts)) and torch.equal(traj[0], x1)


def test_per_sample_times_match_scalar_calls():
    torch.manual_seed(1)
    x, v, z = torch.randn(2, 3, 5), torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    t, t_next, g = torch.tensor([0.9, 0.4]), torch.tensor([0.8, 0.3]), torch.tensor([0.75, 0.2])
    batched = sde_step(x, v, t, t_next, g, noise=z)[0]
    for b in range(2):
        single = sde_step(x[b:b + 1], v[b:b + 1], t[b].item(), t_next[b].item(), g[b].item(), noise=z[b:b + 1])[0]
        torch.testing.assert_close(batched[b:b + 1], single)
    with pytest.raises(ValueError, match="leading dims"):
        sde_step(x, v, torch.tensor([0.9, 0.4, 0.1]), 0.3, 0.5)


# -----------------------------------------------------------------------------
# densities


@pytest.mark.parametrize("reduce, batch_dims", [("mean", 1), ("sum", 1), ("mean", 2)])
def test_log_prob_matches_torch_normal(reduce, batch_dims):
    torch.manual_seed(2)
    mean, x = torch.randn(4, 3, 6, 6), torch.randn(4, 3, 6, 6)
    std = torch.tensor(0.37)
    ref = torch.distributions.Normal(mean, std).log_prob(x)  # [4, 3, 6, 6]
    dims = tuple(range(batch_dims, 4))
    expected = ref.mean(dim=dims) if reduce == "mean" else ref.sum(dim=dims)
    got = log_prob(x, mean, std, reduce, batch_dims)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_kl_closed_form_matches_monte_carlo():
    gen = torch.Generator().manual_seed(3)
    mean, mean_ref, std = torch.tensor([[0.3, -0.2, 1.0]]), torch.tensor([[0.0, 0.1, 0.4]]), 0.5
    kl = kl_to_ref(mean, mean_ref, std, "mean")  # [1]; exact (0.09 + 0.09 + 0.36) / (2·0.25) / 3 = 0.36
    assert kl.item() == pytest.approx(0.36, rel=1e-6)
    x = mean + std * torch.randn(200_000, 3, generator=gen)  # samples of N(mean, std²)
    log_ratio = log_prob(x, mean, std, "mean") - log_prob(x, mean_ref, std, "mean")  # [200000]
    se = log_ratio.std().item() / math.sqrt(x.shape[0])  # ≈ 0.0016
    assert abs(log_ratio.mean().item() - kl.item()) < 5 * se  # MC estimate within 5 standard errors


def test_kl_equals_velocity_form_of_ref_7g():
    torch.manual_seed(4)
    x, v, v_ref = torch.randn(2, 16), torch.randn(2, 16), torch.randn(2, 16)
    t, t_next, g = 0.6, 0.45, 0.9
    _, mu, std = sde_step(x, v, t, t_next, g, noise=torch.zeros(2, 16))
    _, mu_ref, _ = sde_step(x, v_ref, t, t_next, g, noise=torch.zeros(2, 16))
    h = t - t_next
    expected = (h / 2) * (g * (1 - t) / (2 * t) + 1 / g) ** 2 * ((v - v_ref) ** 2).sum(dim=1)  # [2]
    torch.testing.assert_close(kl_to_ref(mu, mu_ref, std, "sum"), expected, rtol=1e-5, atol=1e-6)


def test_recorded_log_probs_replay_to_ratio_one():
    gen = torch.Generator().manual_seed(5)
    ts = timesteps(6)
    g = diffusion_coeff(ts, SDEConfig())
    x0, traj, means, stds, lps = sample_sde(linear_v, torch.randn(3, 4, 4, generator=gen), ts, g, generator=gen)
    assert traj.shape == (7, 3, 4, 4) and means.shape == (6, 3, 4, 4) and lps.shape == (3, 6)
    assert torch.equal(traj[-1], x0)
    torch.testing.assert_close(stds, g * torch.sqrt(ts[:-1] - ts[1:]))
    for k in range(6):  # recompute μ from the stored state, as training does
        _, mu, std = sde_step(traj[k], linear_v(traj[k], ts[k]), ts[k], ts[k + 1], g[k])
        assert torch.equal(log_prob(traj[k + 1], mu, std), lps[:, k])


def test_mean_reduction_keeps_ratio_near_one_so_clip_0p2_rarely_binds():
    # The SDEConfig.logprob_reduce comment, in numbers: perturb v by 0.05·N(0, 1) per element (a
    # policy update) on a 4×16×16 latent and replay 24 rollouts of K = 10 steps, τ = 0.6.
    gen = torch.Generator().manual_seed(9)
    ts = timesteps(10)
    g = diffusion_coeff(ts, SDEConfig())
    dv = 0.05 * torch.randn(4, 16, 16, generator=gen)
    _, traj, _, stds, _ = sample_sde(linear_v, torch.randn(24, 4, 16, 16, generator=gen), ts, g, generator=gen)
    mask = select_steps(24, 10, 0.6, generator=gen)

    def replay(shift_v, reduce):  # [24, 10] log-probs of the stored transitions under v + shift_v
        lps = []
        for k in range(10):
            mean = sde_step(traj[k], linear_v(traj[k], ts[k]) + shift_v, ts[k], ts[k + 1], g[k])[1]
            lps.append(log_prob(traj[k + 1], mean, stds[k], reduce))
        return torch.stack(lps, dim=-1)

    clip = {r: policy_loss(replay(dv, r), replay(0.0, r), torch.ones(24), mask, GRPOConfig(eps=0.2))[1]["clip_frac"]
            for r in ("mean", "sum")}
    assert clip["mean"] == 0.0  # measured: max |log-ratio| 5e-3
    assert clip["sum"] > 0.5  # measured: 0.76; log-ratios up to ~5


# -----------------------------------------------------------------------------
# τ selection


def test_select_steps_count_last_step_and_randomness():
    gen = torch.Generator().manual_seed(6)
    sel = select_steps(64, 10, 0.6, generator=gen)
    assert sel.dtype == torch.bool and sel.shape == (64, 10)
    assert (sel.sum(dim=1) == 5).all()  # ⌊0.6·9⌋ = 5 of the 9 non-final steps
    assert not sel[:, -1].any()  # the step into t = 0 is never trained
    assert len({tuple(r) for r in sel.tolist()}) > 1  # rows differ
    assert sel[:, :-1].float().mean(dim=0).min() > 0.3  # every non-final step gets picked (expect 5/9)
    assert (select_steps(4, 10, 1.0).sum(dim=1) == 9).all()
    assert not select_steps(4, 10, 0.0).any()


def test_window_keeps_the_noise_and_the_training_on_its_first_steps():
    """sde.window=2: g_k as without a window on steps 0-1 and 0 after, exactly those steps trained, and the path
    after the window the Euler ODE from x_{t_2}, with log-prob 0 on those deterministic steps."""
    ts = timesteps(6)
    g = diffusion_coeff(ts, SDEConfig(steps=6, window=2))
    torch.testing.assert_close(g[:2], diffusion_coeff(ts, SDEConfig(steps=6))[:2])
    assert (g[2:] == 0).all()
    mask = select_steps(3, 6, 0.6, torch.Generator().manual_seed(0), window=2)  # [3, 6]
    assert mask.tolist() == [[True] * 2 + [False] * 4] * 3
    x1 = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    x, traj, _, _, lps = sample_sde(linear_v, x1, ts, g, torch.Generator().manual_seed(2))
    assert (lps[:, 2:] == 0).all() and torch.isfinite(lps).all() and (lps[:, :2] != 0).all()
    torch.testing.assert_close(x, euler_sample(linear_v, traj[2], ts[2:]))
    other = sample_sde(linear_v, x1, ts, g, torch.Generator().manual_seed(3))[1]
    assert not torch.equal(other[1], traj[1])                 # the window's steps are stochastic
    with pytest.raises(ValueError, match="window"):
        select_steps(1, 6, 0.6, window=6)


# -----------------------------------------------------------------------------
# samplers on the Gaussian toy


@pytest.mark.parametrize("K", [10, 18])
def test_dpm_solver_2m_beats_euler(K):
    x1 = torch.linspace(-3.0, 3.0, 61)[:, None]  # [61, 1]
    exact = M + S * x1  # the ODE's endpoint
    ts = timesteps(K)
    err_euler = (euler_sample(gauss_v, x1, ts) - exact).abs().max().item()
    err_dpm = (dpm_solver_2m(gauss_v, x1, ts) - exact).abs().max().item()
    # measured: K = 10: 0.26 vs 0.0095; K = 18: 0.15 vs 0.019
    assert err_dpm < 0.2 * err_euler
    assert err_dpm < 0.03


def test_ode_sample_dispatches_on_config():
    x1 = torch.linspace(-3.0, 3.0, 13)[:, None]
    cfg = SDEConfig(eval_steps=18, shift=2.0)
    assert torch.equal(ode_sample(gauss_v, x1, cfg), dpm_solver_2m(gauss_v, x1, timesteps(18, 2.0)))
    cfg.eval_solver = "euler"
    assert torch.equal(ode_sample(gauss_v, x1, cfg), euler_sample(gauss_v, x1, timesteps(18, 2.0)))
    cfg.eval_solver = "heun"
    with pytest.raises(ValueError, match="eval_solver"):
        ode_sample(gauss_v, x1, cfg)


def test_initial_noise_shared_within_groups_only():
    gen = torch.Generator().manual_seed(8)
    x1 = initial_noise(6, 3, (2, 4), same_noise=True, generator=gen)
    assert x1.shape == (6, 2, 4)
    assert torch.equal(x1[0], x1[1]) and torch.equal(x1[0], x1[2]) and torch.equal(x1[3], x1[5])
    assert not torch.equal(x1[0], x1[3])
    x1 = initial_noise(6, 3, (2, 4), same_noise=False, generator=gen)
    assert not torch.equal(x1[0], x1[1])
    with pytest.raises(ValueError, match="groups of 4"):
        initial_noise(6, 4, (2,), same_noise=True)


def test_point_mass_is_exact_for_both_solvers():
    # S = 0 makes v = x1 − M constant along each path: both solvers are exact (up to rounding).
    def v_fn(x, t):  # x_t = (1 − t)M + t·ξ  ->  v = ξ − M
        return (x - (1.0 - t) * M) / t - M
    x1 = torch.linspace(-2.0, 2.0, 9)[:, None]
    ts = timesteps(7, shift=2.0)
    torch.testing.assert_close(euler_sample(v_fn, x1, ts), torch.full_like(x1, M), atol=1e-5, rtol=0)
    torch.testing.assert_close(dpm_solver_2m(v_fn, x1, ts), torch.full_like(x1, M), atol=1e-5, rtol=0)


@pytest.mark.parametrize("schedule", ["flow", "dance"])
def test_sde_preserves_gaussian_marginal(schedule):
    gen = torch.Generator().manual_seed(7)
    ts = timesteps(100)
    g = diffusion_coeff(ts, SDEConfig(schedule=schedule, noise_level=0.75))
    x1 = torch.randn(20_000, 4, generator=gen)  # 80 000 scalar samples: s.e. 0.0018 (mean), 0.0013 (std)
    x0, traj, _, _, _ = sample_sde(gauss_v, x1, ts, g, generator=gen)
    # measured |error| <= 0.003 for both; the Euler–Maruyama bias at K = 100 is about 0.003 in std
    assert x0.mean().item() == pytest.approx(M, abs=0.01)
    assert x0.std().item() == pytest.approx(S, abs=0.01)
    mid = traj[50]  # t = 0.5: N(0.5·M, 0.25·S² + 0.25)
    assert mid.mean().item() == pytest.approx(0.5 * M, abs=0.015)
    assert mid.std().item() == pytest.approx(math.sqrt(0.25 * S * S + 0.25), abs=0.015)
