"""bench.py's arithmetic: the gradient noise scale and MFU on hand-worked numbers, and the gradient cosines
of --gradient-noise on tiny models."""
import pytest
import torch

import bench
import data
from conftest import tiny_args, tiny_cfg


def test_noise_scale_by_hand():
    # g1 = (2, 1), g2 = (1, 2), g3 = (2, 2), batches of n = 4.
    # |E g|² ≈ mean of g_i·g_j over i < j = (4 + 6 + 6) / 3 = 16/3
    # tr(Σ) / n ≈ mean |g_i|² − 16/3 = (5 + 5 + 8) / 3 − 16/3 = 2/3, so tr(Σ) = 4 · 2/3 = 8/3
    # noise scale = tr(Σ) / |E g|² = (8/3) / (16/3) = 0.5
    grads = [torch.tensor([2.0, 1.0]), torch.tensor([1.0, 2.0]), torch.tensor([2.0, 2.0])]
    assert bench.noise_scale(grads, 4) == pytest.approx(0.5, abs=1e-6)
    # Four batches in 3 dims, n = 10: g1 = (1, 0, 0), g2 = (1, 1, 0), g3 = (1, 0, 1), g4 = (1, 1, 1).
    # pair dots: g1·g2 = g1·g3 = g1·g4 = 1, g2·g3 = 1, g2·g4 = g3·g4 = 2: |E g|² ≈ 8/6 = 4/3
    # mean |g_i|² = (1 + 2 + 2 + 3) / 4 = 2: tr(Σ) ≈ 10 · (2 − 4/3) = 20/3; noise scale = (20/3) / (4/3) = 5
    grads = [torch.tensor(g) for g in ([1.0, 0, 0], [1.0, 1, 0], [1.0, 0, 1], [1.0, 1, 1])]
    assert bench.noise_scale(grads, 10) == pytest.approx(5.0, abs=1e-6)


def test_noise_scale_is_inf_without_signal():
    # opposite gradients: g1·g2 = −1 < 0; orthogonal ones: g1·g2 = 0. Neither estimates a positive |E g|².
    assert bench.noise_scale([torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 0.0])], 8) == float("inf")
    assert bench.noise_scale([torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])], 8) == float("inf")


def test_update_mfu_by_hand():
    # 1M parameters, 2048 tokens: 6 · 1e6 · 2048 = 1.2288e10 FLOPs; in 0.5 s that is 2.4576e10 FLOP/s,
    # against a 1e11 FLOP/s peak: 0.24576.
    assert bench.update_mfu(1_000_000, 2048, 0.5, 1e11) == pytest.approx(0.24576, rel=1e-12)


def test_gradient_noise_is_one_for_equal_batches_and_lower_for_independent_ones(assets):  # noqa: F811
    """bench.py --gradient-noise: the same seed twice is the same batch (cosine 1); other seeds are not."""
    cfg = tiny_cfg(assets, extra=["--rl.reward=pixel", "--grpo.beta=0.2"])   # every group has a reward spread;
    # β > 0 as in the shipped configs: the KL's gradient is 0 at the base, so the cosines need no reference
    same = bench.gradient_cosines(cfg, seeds=(0, 0))
    assert same["grad_cos_clip_mean"] == pytest.approx(1.0, abs=1e-5)
    assert same["grad_cos_frame_mean"] == pytest.approx(1.0, abs=1e-5)
    assert same["reward_std_within_group"] > 0                # the pixel reward differs in every group
    assert same["noise_scale_clip"] == 0.0                    # no spread between equal batches
    other = bench.gradient_cosines(cfg, seeds=(0, 1))
    assert -1 <= other["grad_cos_clip_mean"] < 0.99 and -1 <= other["grad_cos_frame_mean"] < 0.99


def test_judge_scores_count_the_seven_judged_groups(assets, monkeypatch):  # noqa: F811
    """The judge's share of the 7 judged groups read right, by hand: one wrong group (forward pressed where it was
    not) in one frame of clip 0 costs 1/(7·15) over the whole clip."""
    batch = data.collate(data.load_clips(tiny_cfg(assets).data)[0][:2], 16)
    buttons = batch["buttons"].clone()
    forward, back = data.VPT_BUTTONS.index("forward"), data.VPT_BUTTONS.index("back")
    buttons[0, 3, forward], buttons[0, 3, back] = 1 - buttons[0, 3, forward], 0   # frame 3: fwd/back read wrong
    assert not torch.equal(data.action_groups(buttons, batch["camera_bins"])[0, 3], batch["groups"][0, 3])
    monkeypatch.setattr(bench.idm_lib, "predict", lambda judge, frames: (buttons, batch["camera_bins"]))
    whole = bench.judge_scores(None, batch["frames"], batch["groups"])
    torch.testing.assert_close(whole, torch.tensor([1 - 1 / 105, 1.0]))


def test_noise_scale_recovers_a_known_signal_to_noise_ratio():
    """Batch means of n samples of μ + N(0, σ²I) in D dims: the noise scale is Dσ² / |μ|² = 400."""
    gen, D, n, k = torch.Generator().manual_seed(0), 2000, 50, 40
    mu = torch.full((D,), 0.05)                               # |μ|² = 5
    grads = [mu + torch.randn(n, D, generator=gen).mean(0) for _ in range(k)]   # σ = 1: tr(Σ) = 2000
    assert bench.noise_scale(grads, n) == pytest.approx(400, rel=0.15)


def test_bench_runs_end_to_end_and_its_batched_nfd_replay_equals_the_loop_over_frames():
    """bench.main on tiny random models: every figure is reported, and the batched block-causal replay it
    times gives the velocities of the per-frame loop it is compared with (bench asserts this itself)."""
    tiny = ["configs/minicraft_nfd.yaml", "--nfd.hidden=32", "--nfd.mlp=48", "--nfd.heads=2", "--nfd.layers=1",
            "--ar.hidden=32", "--ar.intermediate=64", "--ar.heads=2", "--ar.kv_heads=1", "--ar.layers=1",
            "--rl.group_size=2", "--rl.micro_batch=2", "--sde.steps=2", "--run.threads=1", "--json"]
    res = bench.main(tiny)
    assert {"ar_rollout_frames_per_s", "ar_kv_cache_speedup", "grpo_update_mfu", "nfd_rollout_frames_per_s",
            "nfd_batched_replay_speedup", "peak_rss_mb"} <= set(res)
    assert 0 < res["grpo_update_mfu"] and res["threads"] == 1


@pytest.mark.parametrize("beta", [0.1, 0.0])
def test_step_times_the_four_phases_of_train_py(assets, tmp_path, beta):  # noqa: F811
    """bench.py --step on the tiny AR run: every phase is timed and counted, the shares make up the step, and
    rollouts per second is the step's rollouts over its seconds. Without a KL (β = 0) there is no reference."""
    argv = [*tiny_args(assets, tmp_path / "run", 2), f"--grpo.beta={beta}", "--step", "--json"]
    res = bench.main(argv)
    assert res["world_model"] == "ar" and res["rollouts_per_step"] == 4 and res["steps"] == 3
    phases = ("rollout", "reward", "update") + (("reference",) if beta else ())
    for p in phases:
        assert res[f"{p}_s"] > 0 and 0 < res[f"{p}_share"] < 1
        assert res[f"{p}_flops_per_s"] > 0
        assert res[f"{p}_of_peak"] == pytest.approx(res[f"{p}_flops_per_s"] / res["matmul_peak_flops"])
    if not beta:
        assert res["reference_s"] == res["reference_share"] == res["reference_flops_per_s"] == 0
    assert sum(res[f"{p}_share"] for p in bench.PHASES) == pytest.approx(1.0, abs=1e-9)
    assert sum(res[f"{p}_s"] for p in bench.PHASES) == pytest.approx(res["step_s"])
    assert res["rollouts_per_s"] == pytest.approx(4 / res["step_s"])
