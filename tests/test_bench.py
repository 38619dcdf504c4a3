"""bench.py runs end to end on tiny models and reports every figure the README quotes."""
import pytest
import torch

import bench
from test_train import assets, tiny_cfg  # noqa: F401  (the module-scoped tiny models)

TINY = ["--run.threads=1", "--rl.group_size=2", "--ar.hidden=32", "--ar.intermediate=64",
        "--ar.heads=2", "--ar.kv_heads=1", "--ar.layers=1", "--ar.frames=3", "--vq.channels=8",
        "--nfd.hidden=32", "--nfd.mlp=64", "--nfd.heads=2", "--nfd.layers=1", "--nfd.frames=3",
        "--sde.steps=3"]


def test_bench_reports_every_figure(capsys):
    res = bench.main(TINY)
    for key in ("minicraft_frames_per_s", "ar_kv_cache_speedup", "ar_batched_group_speedup",
                "nfd_batched_replay_speedup", "grpo_update_mfu", "peak_rss_mb"):
        assert res[key] > 0, key
    assert 0 < res["grpo_update_mfu"] < 1
    assert "| ar_kv_cache_speedup |" in capsys.readouterr().out


def test_gradient_noise_is_one_for_equal_batches_and_lower_for_independent_ones(assets):  # noqa: F811
    """bench.py --gradient-noise: the same seed twice is the same batch (cosine 1); other seeds are not."""
    cfg = tiny_cfg(assets, extra=["--rl.reward=pixel"])       # every group has a reward spread
    same = bench.gradient_cosines(cfg, seeds=(0, 0))
    assert same["grad_cos_clip_mean"] == pytest.approx(1.0, abs=1e-5)
    assert same["grad_cos_frame_mean"] == pytest.approx(1.0, abs=1e-5)
    assert same["reward_std_within_group"] > 0                # the pixel reward differs in every group
    assert same["noise_scale_clip"] == 0.0                    # no spread between equal batches
    other = bench.gradient_cosines(cfg, seeds=(0, 1))
    assert -1 <= other["grad_cos_clip_mean"] < 0.99 and -1 <= other["grad_cos_frame_mean"] < 0.99


def test_noise_scale_recovers_a_known_signal_to_noise_ratio():
    """Batch means of n samples of μ + N(0, σ²I) in D dims: the noise scale is Dσ² / |μ|² = 400."""
    gen, D, n, k = torch.Generator().manual_seed(0), 2000, 50, 40
    mu = torch.full((D,), 0.05)                               # |μ|² = 5
    grads = [mu + torch.randn(n, D, generator=gen).mean(0) for _ in range(k)]   # σ = 1: tr(Σ) = 2000
    assert bench.noise_scale(grads, n) == pytest.approx(400, rel=0.15)
