"""compare.py: argument split, and a whole (tiny) comparison: runs, table, curves and resume."""
import json

import numpy as np
import pytest
from PIL import Image

import compare
import config
from conftest import tiny_cfg


def test_arguments_split_into_configs_options_and_train_overrides():
    opts = compare.parse(["a.yaml", "--seeds=3,4", "--jobs=2", "--rl.steps=5", "b.yaml", "--variants=pixel"])
    assert opts["configs"] == ["a.yaml", "b.yaml"] and opts["seeds"] == [3, 4] and opts["jobs"] == 2
    assert opts["train"] == ["--rl.steps=5"] and opts["variants"] == ["pixel"] and opts["only"] == {}
    opts = compare.parse(["a.yaml", "b.yaml", "--rl.steps=5", "--b.rl.steps=2", "--b.eval.clips=8"])
    assert opts["train"] == ["--rl.steps=5"] and opts["only"] == {"b": ["--rl.steps=2", "--eval.clips=8"]}
    assert compare.parse([])["configs"] == compare.CONFIGS and compare.parse([])["seeds"] == [0, 1, 2]
    with pytest.raises(config.UsageError, match="unknown"):
        compare.parse(["--variants=rlir,l2"])
    with pytest.raises(config.UsageError, match="cannot use"):
        compare.parse(["--rl.steps"])


def test_tiny_comparison_writes_table_curves_and_resumes(assets, tmp_path):  # noqa: F811
    cfg_file = tmp_path / "tiny.yaml"
    cfg_file.write_text(config.dump(tiny_cfg(assets)))
    argv = [str(cfg_file), "--seeds=0,1", "--variants=pixel", "--jobs=2", f"--out={tmp_path / 'cmp'}",
            "--rl.steps=3", "--tiny.rl.steps=1", "--eval.best_of=2"]   # the config's own override wins
    compare.main(argv)
    runs = tmp_path / "cmp" / "tiny"
    results = {s: json.loads((runs / "pixel" / f"seed{s}" / "results.json").read_text()) for s in (0, 1)}
    assert len((runs / "pixel" / "seed0" / "log.jsonl").read_text().splitlines()) == 1
    summary = json.loads((tmp_path / "cmp" / "compare.json").read_text())["tiny"]
    # base = the "before" rows of the first variant's seeds; a variant's row = its "after" rows.
    assert summary["base"]["judge_f1_macro"] == [results[s]["before"]["judge_f1_macro"] for s in (0, 1)]
    assert summary["pixel"]["psnr"] == [results[s]["after"]["psnr"] for s in (0, 1)]
    md = (tmp_path / "cmp" / "compare.md").read_text()
    base_row = next(line for line in md.splitlines() if line.startswith("| base |"))
    f1 = summary["base"]["judge_f1_macro"]
    assert f"{np.mean(f1):.3f} ± {np.std(f1):.3f}" in base_row
    assert [line.split("|")[1].strip() for line in md.splitlines() if line.startswith("| ")][1:] == \
        ["gt", "recon", "base", "best_of", "pixel"]
    assert summary["best_of"]["judge_f1_macro"] == [results[s]["best_of"]["judge_f1_macro"] for s in (0, 1)]
    assert "Pixel reward: L1" in md
    with Image.open(tmp_path / "cmp" / "reward_curves.png") as im:
        assert im.size[1] > 100                               # one panel: tiny · pixel
    stamp = (runs / "pixel" / "seed0" / "results.json").stat().st_mtime_ns
    compare.main(argv)                                        # finished runs are reused, not rerun
    assert (runs / "pixel" / "seed0" / "results.json").stat().st_mtime_ns == stamp
    with pytest.raises(config.UsageError, match="holds a run of"):   # other settings never reuse these runs
        compare.main([*argv[:-1], "--tiny.rl.steps=2"])
