"""bench.py runs end to end on tiny models and reports every figure the README quotes."""
import bench

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
