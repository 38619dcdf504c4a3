"""grpo.py against hand-worked numbers: Eq. 1 advantages, Eq. 2 clipped surrogate, k3 KL,
the three aggregations, on-policy gradient, the health statistics, and DiffusionNFT's loss."""
import math
import statistics
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import config  # noqa: E402
from grpo import GRPOConfig, frame_credit, group_advantages, nft_loss, policy_loss  # noqa: E402
from model_ar import k3  # noqa: E402  (the AR world model's per-token KL, which Eq. 2's β weighs)

# Three groups of G = 4: mixed, all equal (zero std), one success.
REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 0.0, 0.0, 0.0, 1.0])


def _loss(log_ratio, adv, mask=None, **cfg):
    """policy_loss with old_logp = 0 so that logp is the log-ratio; returns (loss, stats, grad)."""
    logp = torch.tensor(log_ratio, dtype=torch.float32, requires_grad=True)
    mask = torch.ones_like(logp) if mask is None else torch.tensor(mask, dtype=torch.float32)
    loss, stats = policy_loss(logp, torch.zeros_like(logp), torch.tensor(adv), mask, GRPOConfig(**cfg))
    loss.backward()
    return loss, stats, logp.grad


# -----------------------------------------------------------------------------
# Eq. 1


def test_group_advantages_hand_z_score():
    adv, stats = group_advantages(REWARDS, 4, GRPOConfig())
    a = 0.5 / (0.5 + 1e-4)  # group 1: mean 0.5, population std 0.5
    sd3 = math.sqrt(0.1875)  # group 3: mean 0.25, population std sqrt(0.75/4)
    expected = [a, -a, -a, a, 0, 0, 0, 0] + [-0.25 / (sd3 + 1e-4)] * 3 + [0.75 / (sd3 + 1e-4)]
    torch.testing.assert_close(adv, torch.tensor(expected), rtol=0, atol=1e-6)
    assert stats["zero_std_groups"] == 1.0
    assert stats["zero_std_frac"] == pytest.approx(1 / 3)
    assert stats["n_groups"] == 3.0
    assert stats["reward_mean"] == pytest.approx(5 / 12)
    assert stats["reward_std"] == pytest.approx(statistics.pstdev(REWARDS.tolist()), rel=1e-6)


def test_group_advantages_batch_and_none_scaling():
    centred = torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0, -0.25, -0.25, -0.25, 0.75])
    adv, _ = group_advantages(REWARDS, 4, GRPOConfig(scale="none"))
    torch.testing.assert_close(adv, centred, rtol=0, atol=1e-7)  # Dr. GRPO: mean-centred only
    adv, _ = group_advantages(REWARDS, 4, GRPOConfig(scale="batch"))
    batch_sd = statistics.pstdev(REWARDS.tolist())  # group mean, batch std (TRL "batch")
    torch.testing.assert_close(adv, centred / (batch_sd + 1e-4), rtol=1e-6, atol=1e-6)


def test_zero_std_group_with_inexact_float_mean_gives_exact_zero():
    # In float32 the mean of seven 0.1s is 1 ulp off, so std = 7e-9, not 0; with adv_eps = 0 a naive
    # z-score would hand out advantages of ±1 to a group that carries no signal.
    rewards = torch.tensor([0.1] * 7 + [0.7] * 7)
    for adv_eps in (1e-4, 0.0):
        adv, stats = group_advantages(rewards, 7, GRPOConfig(adv_eps=adv_eps))
        assert torch.equal(adv, torch.zeros(14))
        assert stats["zero_std_groups"] == 2.0 and stats["zero_std_frac"] == 1.0


def test_advantage_clip():
    rewards = torch.zeros(30)
    rewards[0] = 1.0  # p = 1/30: Â = (29/30) / sqrt(p(1 − p)) ≈ 5.38 before the clip
    raw = (29 / 30) / (math.sqrt(29) / 30 + 1e-4)
    adv, _ = group_advantages(rewards, 30, GRPOConfig(adv_clip=None))
    assert adv[0].item() == pytest.approx(raw, rel=1e-5) and raw > 5.0
    adv, _ = group_advantages(rewards, 30, GRPOConfig(adv_clip=5.0))
    assert adv[0].item() == 5.0


def test_group_advantages_rejects_bad_input():
    with pytest.raises(ValueError, match="groups of 5"):
        group_advantages(REWARDS, 5, GRPOConfig())
    with pytest.raises(ValueError, match="not finite"):
        group_advantages(torch.tensor([1.0, float("nan")]), 2, GRPOConfig())
    with pytest.raises(config.ConfigError, match="grpo.scale: 'std' is not one of 'group', 'batch', 'none'"):
        config.build(config.Config, {"grpo": {"scale": "std"}})   # choices are checked when the config is read


def test_frame_credit_gives_each_frame_the_rewards_its_pixels_decide():
    adv = torch.tensor([[1.0, -2.0, 4.0]])  # A_1, A_2, A_3 of one rollout
    frame_of = torch.tensor([0, 0, 1, 1, 2, 3])  # two entries per frame; frame 0 is the given one
    # frame 1: A_1 + A_2 = -1; frame 2: A_2 + A_3 = 2; frame 3: A_3 + 0 = 4; frame 0: 0
    assert frame_credit(adv, frame_of).tolist() == [[0.0, 0.0, -1.0, -1.0, 2.0, 4.0]]


# -----------------------------------------------------------------------------
# Eq. 2


@pytest.mark.parametrize("ratio, adv, loss, clipped", [
    (1.1, 1.0, -1.1, False),  # inside the trust region
    (1.5, 1.0, -1.2, True),  # Â > 0: ratio capped at 1 + ε
    (0.5, 1.0, -0.5, False),  # Â > 0, ratio below 1 − ε: pessimistic branch is unclipped
    (1.5, -1.0, 1.5, False),  # Â < 0, ratio above 1 + ε: unclipped
    (0.5, -1.0, 0.8, True),  # Â < 0: ratio floored at 1 − ε
    (0.9, -2.0, 1.8, False),
])
def test_clipped_surrogate_hand_values(ratio, adv, loss, clipped):
    got, _, grad = _loss([[math.log(ratio)]], [adv])
    assert got.item() == pytest.approx(loss, rel=1e-6)
    # d(−ρÂ)/d logp = −ρÂ when unclipped; a clipped entry has no gradient.
    assert grad.item() == pytest.approx(0.0 if clipped else -ratio * adv, abs=1e-6)


def test_eps_high_clip_higher():
    assert _loss([[math.log(1.25)]], [1.0])[0].item() == pytest.approx(-1.2, rel=1e-6)
    assert _loss([[math.log(1.25)]], [1.0], eps_high=0.28)[0].item() == pytest.approx(-1.25, rel=1e-6)
    assert _loss([[math.log(1.5)]], [1.0], eps_high=0.28)[0].item() == pytest.approx(-1.28, rel=1e-6)
    assert _loss([[math.log(0.5)]], [-1.0], eps_high=0.28)[0].item() == pytest.approx(0.8, rel=1e-6)


@pytest.mark.parametrize("aggregation, expected", [
    ("grpo", (-3.2 / 3 + 2.2) / 2),  # per-row means −1.0667 and 2.2, then mean over 2 rows
    ("token", (-3.2 + 2.2) / 4),  # 4 unmasked tokens
    ("dr_grpo", (-3.2 + 2.2) / (2 * 4)),  # N · L_max = 8
])
def test_aggregations_on_ragged_mask(aggregation, expected):
    l11 = math.log(1.1)
    log_ratio = [[l11, l11, 0.0, float("nan")], [l11, -float("inf"), 50.0, float("nan")]]  # junk where masked
    mask = [[1, 1, 1, 0], [1, 0, 0, 0]]
    loss, stats, grad = _loss(log_ratio, [1.0, -2.0], mask, aggregation=aggregation)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert torch.isfinite(grad).all() and (grad[torch.tensor(mask) == 0] == 0).all()
    assert stats["n_tokens"] == 4.0


def test_k3_kl_value_and_stat():
    logp = torch.zeros(1, 2, requires_grad=True)
    ref = torch.tensor([[0.5, -0.3]])  # δ = ref − logp
    want = [math.exp(0.5) - 0.5 - 1, math.exp(-0.3) + 0.3 - 1]  # 0.148721, 0.040818
    cfg = GRPOConfig(beta=0.1, aggregation="token")
    loss, stats = policy_loss(logp, logp.detach().clone(), torch.zeros(1), torch.ones(1, 2), cfg,
                              kl=k3(logp, ref, torch.ones(1, 2)))
    assert loss.item() == pytest.approx(0.1 * sum(want) / 2, rel=1e-6)  # Â = 0: only β·k3 remains
    assert stats["kl_ref"] == pytest.approx(sum(want) / 2, rel=1e-6)
    loss.backward()  # d k3/d logp = 1 − e^δ, times β / 2 tokens
    expected = [0.1 * (1 - math.exp(0.5)) / 2, 0.1 * (1 - math.exp(-0.3)) / 2]
    torch.testing.assert_close(logp.grad, torch.tensor([expected]))
    with pytest.raises(ValueError, match="needs kl"):
        policy_loss(logp, logp.detach(), torch.zeros(1), torch.ones(1, 2), cfg)


def test_first_on_policy_pass_ratio_one_and_gradient():
    torch.manual_seed(0)
    old = torch.randn(3, 5) - 2.0
    logp = old.clone().requires_grad_(True)
    adv = torch.tensor([1.5, -0.5, 0.0])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [0, 1, 1, 1, 0]], dtype=torch.float32)
    loss, stats = policy_loss(logp, old, adv, mask, GRPOConfig())
    loss.backward()
    assert stats["ratio_mean"] == 1.0 and stats["clip_frac"] == 0.0 and stats["approx_kl"] == 0.0
    # Eq. 2 at ρ = 1: ∇loss = −(1/N) Σ_i Â_i (1/|o_i|) Σ_t ∇logp_{i,t}
    expected = -adv[:, None] * mask / mask.sum(dim=1, keepdim=True) / 3  # [N, L]
    torch.testing.assert_close(logp.grad, expected, rtol=1e-6, atol=1e-7)
    assert loss.item() == pytest.approx(-(1.5 - 0.5 + 0.0) / 3, rel=1e-6)


def test_clip_fraction_approx_kl_and_ratio_per_column():
    log_ratio = [[0.1, -0.3, 0.0], [0.25, 0.0, 9.0]]  # the 9.0 is masked out
    mask = [[1, 1, 0], [1, 1, 0]]
    _, stats, _ = _loss(log_ratio, [1.0, 1.0], mask)
    # ratios 1.105, 0.741 (< 0.8), 1.284 (> 1.2), 1.0 -> 2 of 4 outside [0.8, 1.2]
    assert stats["clip_frac"] == 0.5
    assert stats["approx_kl"] == pytest.approx(0.5 * (0.01 + 0.09 + 0.0625 + 0.0) / 4, rel=1e-5)
    ratios = [math.exp(0.1), math.exp(-0.3), math.exp(0.25), 1.0]
    assert stats["ratio_mean"] == pytest.approx(sum(ratios) / 4, rel=1e-6)
    col = stats["ratio_mean_per_col"]
    assert col[0] == pytest.approx((ratios[0] + ratios[2]) / 2, rel=1e-6)
    assert col[1] == pytest.approx((ratios[1] + 1.0) / 2, rel=1e-6)
    assert math.isnan(col[2])  # a column no row trains (e.g. the final denoising step)


def test_all_masked_row_and_all_masked_batch_give_no_nan():
    logp = torch.tensor([[-1.0, -2.0], [float("nan"), -float("inf")]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    for aggregation in ("grpo", "token", "dr_grpo"):
        loss, stats = policy_loss(logp, torch.tensor([[-1.0, -2.0], [0.0, 0.0]]), torch.tensor([1.0, 3.0]),
                                  mask, GRPOConfig(aggregation=aggregation, beta=0.1),
                                  kl=k3(logp, torch.zeros(2, 2), mask))
        loss.backward()
        assert math.isfinite(loss.item()) and torch.isfinite(logp.grad).all()
        assert all(math.isfinite(v) for k, v in stats.items() if k != "ratio_mean_per_col")
        logp.grad = None
    loss, stats = policy_loss(logp, torch.zeros(2, 2), torch.ones(2), torch.zeros(2, 2), GRPOConfig())
    assert loss.item() == 0.0 and stats["clip_frac"] == 0.0 and stats["n_tokens"] == 0.0


# -----------------------------------------------------------------------------
# Per-frame credit (train.py rl.credit "frame"): rewards [N, T], advantages [N, L]


def test_per_frame_rewards_are_normalised_frame_by_frame():
    # Two groups of G = 2, three frames. Group 1: frame 0 splits (±1), frames 1 and 2 tie (0).
    # Group 2: frames 0 and 1 split, frame 2 ties. 3 of the 6 (group, frame) pairs have zero std.
    r = torch.tensor([[1.0, 0.0, 0.5], [0.0, 0.0, 0.5], [1.0, 1.0, 0.5], [0.0, 0.0, 0.5]])
    adv, stats = group_advantages(r, 2, GRPOConfig(adv_eps=0.0))
    expected = torch.tensor([[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [-1.0, -1.0, 0.0]])
    torch.testing.assert_close(adv, expected, rtol=0, atol=1e-6)
    assert stats["zero_std_groups"] == 3 and stats["zero_std_frac"] == 0.5
    assert stats["reward_mean"] == pytest.approx(r.mean().item())
    for t in range(3):                                  # each frame is a 1-D problem of its own
        torch.testing.assert_close(adv[:, t], group_advantages(r[:, t], 2, GRPOConfig(adv_eps=0.0))[0])


def test_per_entry_advantages():
    # One sequence, two entries with advantages 2 and −1 at ratio 1: loss = −(2 − 1)/2 and each
    # entry's gradient is −Â_t / |o|. A constant [N, L] advantage is the same as the [N] one.
    loss, _, grad = _loss([[0.0, 0.0]], [[2.0, -1.0]])
    assert loss.item() == pytest.approx(-0.5)
    torch.testing.assert_close(grad, torch.tensor([[-1.0, 0.5]]))
    per_seq = _loss([[0.1, -0.4], [0.3, 0.0]], [1.5, -2.0])
    per_entry = _loss([[0.1, -0.4], [0.3, 0.0]], [[1.5, 1.5], [-2.0, -2.0]])
    assert per_seq[0].item() == per_entry[0].item()
    torch.testing.assert_close(per_seq[2], per_entry[2], rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"\[N, L\]"):
        _loss([[0.0, 0.0]], [[1.0, 1.0, 1.0]])


# -----------------------------------------------------------------------------
# DiffusionNFT (nft_loss)


@pytest.mark.parametrize("nft_beta", [1.0, 0.3])
def test_nft_gradient_at_theta_old_is_advantage_weighted_flow_matching(nft_beta):
    """At θ = θ_old the negative-aware loss has the gradient of mean(A·‖v − target‖²) whatever β, so a constant
    reward (every A = 0) leaves the model where it is; with a KL to the reference its gradient adds."""
    gen = torch.Generator().manual_seed(0)
    v_old, target, v_ref = (torch.randn(4, 3, 5, 2, generator=gen) for _ in range(3))
    adv = torch.tensor([[1.5, -0.5, 0.0], [-2.0, 0.7, 0.1], [0.0, 0.0, 0.0], [3.0, -3.0, 0.4]])
    cfg = GRPOConfig(nft_beta=nft_beta)
    v = v_old.clone().requires_grad_()
    loss, stats = nft_loss(v, v_old, target, adv, cfg)
    loss.backward()
    w = v_old.clone().requires_grad_()
    (adv[..., None, None] * (w - target).pow(2)).mean().backward()
    torch.testing.assert_close(v.grad, w.grad)
    assert stats["nft_shift"] == 0.0
    v.grad = None
    nft_loss(v, v_old, target, torch.zeros(4), cfg)[0].backward()
    assert v.grad.abs().max() < 1e-6                                   # a constant reward moves nothing
    v.grad = None
    kl_cfg = GRPOConfig(nft_beta=nft_beta, beta=0.5)
    loss, stats = nft_loss(v, v_old, target, torch.zeros(4), kl_cfg, v_ref)
    loss.backward()
    torch.testing.assert_close(v.grad, 0.5 * 2 * (v_old - v_ref) / v.numel())
    assert stats["kl_ref"] == pytest.approx(float((v_old - v_ref).pow(2).mean()))
    with pytest.raises(ValueError, match="grpo.beta=0.5 > 0 needs the reference"):
        nft_loss(v, v_old, target, adv, kl_cfg)


def test_nft_moves_a_toy_models_samples_toward_the_one_the_reward_prefers():
    """A toy flow model whose velocity is a free vector θ: one Euler step from x_1 ~ N(0, I) gives the sample
    x_1 − θ, centred halfway between a and b at the start. The reward prefers a (1 when a sample is nearer a
    than b); Eq. 1's group advantages and DiffusionNFT on the forward process of the policy's own samples (fresh
    t and ε, θ_old = θ at each step) carry the samples to a's side."""
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 0.0])
    theta = torch.zeros(2, requires_grad=True)
    opt = torch.optim.SGD([theta], lr=0.05)
    gen = torch.Generator().manual_seed(0)
    for _ in range(100):
        with torch.no_grad():
            x0 = torch.randn(8, 2, generator=gen) - theta                    # G = 8 samples of the policy
        reward = ((x0 - a).norm(dim=1) < (x0 - b).norm(dim=1)).float()       # [8]
        adv, _ = group_advantages(reward, 8, GRPOConfig())
        eps = torch.randn(8, 1, 2, generator=gen)
        v = theta.expand(8, 1, 2)[..., None]                                 # [8, 1, 2, 1]: ignores x_t and t
        loss, _ = nft_loss(v, v.detach(), (eps - x0[:, None])[..., None], adv, GRPOConfig())
        opt.zero_grad()
        loss.backward()
        opt.step()
    samples = torch.randn(1000, 2, generator=gen) - theta.detach()
    near_a = ((samples - a).norm(dim=1) < (samples - b).norm(dim=1)).float().mean()
    assert near_a > 0.95, (near_a, theta.tolist())                          # from 0.5 at the start
