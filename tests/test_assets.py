"""The shipped embedded IDMs still meet the bar the README states (the GT row on 256 held-out clips)."""
import dataclasses

import data
import evaluate


def test_shipped_idms_read_ground_truth_clips():
    cfg = evaluate.EvalConfig(device="cpu", videos=0)
    clips, _ = data.load_clips(dataclasses.replace(data.DataConfig(), seed=cfg.seed, max_clips=cfg.clips))
    row = evaluate.evaluate_gt(clips, cfg)
    for prefix in ("", "judge_"):
        assert row[prefix + "f1_macro"] >= 0.90, (prefix, row[prefix + "f1_macro"])
        assert row[prefix + "camera_acc_pitch"] >= 0.90 and row[prefix + "camera_acc_yaw"] >= 0.90
    assert abs(row["f1_macro"] - 0.9009) < 1e-3               # the README's figure, deterministic
