"""The reward comparison (paper Table 2 / Figure 5): base vs RLIR vs the RLVR-World pixel reward.

For each config and seed, train.py runs once per reward variant with the same iterations and seeds:
  rlir        the inverse reward, Eq. 3 (a frame scores 1 when all 9 action groups match)
  rlir_group  the per-group inverse reward (a frame scores the fraction of groups that match)
  rlir_balanced  the 7 judged groups, each match weighted by the inverse frequency of its true label (read as the
                 config reads: laptop_ar.yaml scores the IDM's probability of each label, rl.reading "soft")
  pixel       RLVR-World's −(L1 + LPIPS), Eq. 6 (L1 only when no LPIPS backbone is at hand)
The gt, recon, base (and, with --eval.best_of=N, best_of: the reward IDM's pick of N) rows are the runs'
shared "before" evaluation. Every row is averaged over the seeds (mean ± std) into OUT/compare.md (and .json);
OUT/reward_curves.png plots each run's training reward per step.

    python compare.py --eval.best_of=8                          # both laptop configs, seeds 0,1,2
    python compare.py configs/laptop_ar.yaml --seeds=0 --rl.steps=4 --eval.clips=16   # a smoke run
    python compare.py --jobs=2 --rl.steps=6 --laptop_nfd.rl.steps=4      # 2 runs at a time; NFD: 4 steps

Arguments ending in .yaml are configs; --seeds, --jobs, --out and --variants are this script's; any
other --section.key=value goes to every train.py run, and --<config name>.section.key=value to the
runs of that config only. Finished runs (results.json with an "after"
row) are reused and unfinished ones resume from their checkpoint, so an interrupted comparison goes
on where it stopped; a run folder made by a different command is an error, not silently reused.
"""
import concurrent.futures
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

import config
import pixel_reward
import runtime

VARIANTS = {                                                  # train.py flags of each reward variant
    "rlir": ["--rl.reward=idm", "--rl.granularity=exact", "--rl.reading=argmax"],      # Eq. 3
    "rlir_group": ["--rl.reward=idm", "--rl.granularity=group", "--rl.reading=argmax"],
    "rlir_balanced": ["--rl.reward=idm", "--rl.granularity=balanced"],   # 7 judged groups, inverse label frequency
    "pixel": ["--rl.reward=pixel"],                             # Eq. 6
}
COLUMNS = {                                                   # results.json key -> table header
    "judge_f1_macro": "judge F1", "f1_macro": "reward-IDM F1", "judge_precision_macro": "judge P",
    "judge_recall_macro": "judge R",
    "judge_camera_bin_error": "camera err", "psnr": "PSNR", "ssim": "SSIM", "lpips": "LPIPS",
    "fvd": "FVD", "brightness": "brightness",
}
CONFIGS = ["configs/laptop_ar.yaml", "configs/laptop_nfd.yaml"]


def parse(argv: list[str]) -> dict:
    """Split argv into configs, this script's options and the overrides passed on to train.py."""
    opts = {"configs": [], "seeds": "0,1,2", "jobs": "1", "out": "out/compare",
            "variants": ",".join(VARIANTS), "train": [], "only": {}}
    for a in argv:
        key, _, value = a.removeprefix("--").partition("=")
        if a.endswith(".yaml") and not a.startswith("--"):
            opts["configs"].append(a)
        elif a.startswith("--") and key in ("seeds", "jobs", "out", "variants"):
            opts[key] = value
        elif a.startswith("--") and "=" in a:
            opts["train"].append(a)
        else:
            raise config.UsageError(f"cannot use {a!r}; see the usage at the top of {__file__}")
    unknown = set(opts["variants"].split(",")) - set(VARIANTS)
    if unknown:
        raise config.UsageError(f"--variants: unknown {sorted(unknown)}; choose from {list(VARIANTS)}")
    opts["configs"] = opts["configs"] or CONFIGS
    stems = {Path(c).stem for c in opts["configs"]}
    for a in list(opts["train"]):                             # --<config name>.x.y=v: that config only
        stem, _, rest = a[2:].partition(".")
        if stem in stems:
            opts["train"].remove(a)
            opts["only"].setdefault(stem, []).append("--" + rest)
    if not all(s.isdigit() for s in opts["seeds"].split(",")):
        raise config.UsageError(f"--seeds={opts['seeds']}: expected seeds >= 0 separated by commas, e.g. 0,1,2")
    if not opts["jobs"].isdigit() or int(opts["jobs"]) < 1:
        raise config.UsageError(f"--jobs={opts['jobs']}: expected a number of parallel runs >= 1")
    runtime.output_folder(opts["out"], "--out")
    opts["seeds"] = [int(s) for s in opts["seeds"].split(",")]
    opts["variants"] = opts["variants"].split(",")
    opts["jobs"] = int(opts["jobs"])
    return opts


def command(cfg: str, variant: str, seed: int, opts: dict) -> tuple[Path, list[str]]:
    """The run folder OUT/<config>/<variant>/seed<k>/ of one train.py run and the run's train.py arguments."""
    out = Path(opts["out"]) / Path(cfg).stem / variant / f"seed{seed}"
    return out, [cfg, *opts["train"], *opts["only"].get(Path(cfg).stem, []), *VARIANTS[variant],
                 f"--run.seed={seed}", f"--run.out={out}"]


def run_one(cfg: str, variant: str, seed: int, opts: dict) -> Path:
    """One train.py run in its folder (`command`), its console output in train.txt. A run that fails before its
    first checkpoint leaves no command.txt behind, so the corrected command may use the folder."""
    out, args = command(cfg, variant, seed, opts)
    done, recorded = out / "results.json", out / "command.txt"
    if recorded.exists() and recorded.read_text() != " ".join(args):
        raise config.UsageError(f"{out} holds a run of `train.py {recorded.read_text()}`, not of "
                                f"`train.py {' '.join(args)}`; delete it or pass another --out")
    if done.exists() and "after" in json.loads(done.read_text()):
        return out
    out.mkdir(parents=True, exist_ok=True)
    recorded.write_text(" ".join(args))
    threads = max(1, (os.cpu_count() or 1) // opts["jobs"])   # share the cores between parallel runs
    cmd = [sys.executable, str(Path(__file__).with_name("train.py")), f"--run.threads={threads}", *args]
    with open(out / "train.txt", "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc:
        if not (out / "ckpt.pt").exists():                     # nothing to resume: the folder binds no command
            recorded.unlink()
        text = (out / "train.txt").read_text(errors="replace").replace("\r", "\n")   # progress bars end in \r
        lines = [t for t in text.splitlines() if t.strip()]
        # train.py's one-line error (runtime.cli), else the last line (a traceback's exception)
        cause = next((t for t in reversed(lines) if ": error: " in t), lines[-1] if lines else "no output")
        raise config.UsageError(f"the run in {out} failed (exit {rc}): {cause.strip()}; its output is in "
                                f"{out / 'train.txt'}")
    return out


def mean_std(values: list) -> str:
    v = [x for x in values if x is not None]
    if not v:
        return "–"
    return f"{np.mean(v):.3f} ± {np.std(v):.3f}" if len(v) > 1 else f"{v[0]:.3f}"


def table(cfg: str, runs: dict, opts: dict) -> tuple[str, dict]:
    """Markdown rows gt, recon, base, best_of (eval.best_of: the reward IDM's pick, no training) and one per
    variant, each metric as mean ± std over the seeds (gt once: it does not depend on the seed)."""
    first = [json.loads((d / "results.json").read_text()) for d in runs[opts["variants"][0]]]
    rows = {"gt": [first[0]["gt"]], **{("base" if k == "before" else k): [r[k] for r in first]
                                       for k in first[0] if k not in ("gt", "after", "gap")}}
    for v in opts["variants"]:
        rows[v] = [json.loads((d / "results.json").read_text())["after"] for d in runs[v]]
    cols = [k for k in COLUMNS if any(r.get(k) is not None for rs in rows.values() for r in rs)]
    names = {**COLUMNS, "fvd": rows["base"][0].get("fvd_features") or "FVD"}   # fvd_idm on minicraft
    lines = [f"| {Path(cfg).stem} | " + " | ".join(names[k] for k in cols) + " |",
             "|---" * (len(cols) + 1) + "|"]
    for name, rs in rows.items():
        lines.append(f"| {name} | " + " | ".join(mean_std([r.get(k) for r in rs]) for k in cols) + " |")
    summary = {name: {k: [r.get(k) for r in rs] for k in cols} for name, rs in rows.items()}
    return "\n".join(lines), summary


def plot(runs_by_cfg: dict, opts: dict, path: Path) -> None:
    """Training reward per step, a panel per (config, variant): thin lines the seeds, thick their mean."""
    import matplotlib
    import matplotlib.ticker
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    nr, nc = len(runs_by_cfg), len(opts["variants"])
    fig, axes = plt.subplots(nr, nc, figsize=(4 * nc, 3 * nr), squeeze=False)
    for i, (cfg, runs) in enumerate(runs_by_cfg.items()):
        for j, v in enumerate(opts["variants"]):
            ax, curves = axes[i][j], []
            for d in runs[v]:
                log = [json.loads(line) for line in (d / "log.jsonl").read_text().splitlines()]
                curves.append([row.get("reward_mean", np.nan) for row in log])
                ax.plot(range(1, len(curves[-1]) + 1), curves[-1], lw=0.8, alpha=0.5)
            n = min(map(len, curves))
            ax.plot(range(1, n + 1), np.nanmean([c[:n] for c in curves], 0), lw=2.5, color="k", label="mean")
            ax.set_title(f"{Path(cfg).stem} · {v}")
            ax.set_xlabel("GRPO step")
            ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
            ax.set_ylabel("reward (Eq. 6, pixel)" if v == "pixel" else "reward (Eq. 3, IDM)")
            ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str]) -> None:
    opts = parse(argv)
    jobs = [(c, v, s) for c in opts["configs"] for s in opts["seeds"] for v in opts["variants"]]
    for job in jobs:                          # each run's config, read as train.py reads it, before any run starts
        config.parse(config.Config, command(*job, opts)[1])
    with concurrent.futures.ThreadPoolExecutor(opts["jobs"]) as pool:   # threads only wait on subprocesses
        dirs = list(tqdm(pool.map(lambda j: run_one(*j, opts), jobs), total=len(jobs), desc="runs"))
    runs_by_cfg = {c: {v: [d for (c2, v2, _), d in zip(jobs, dirs) if (c2, v2) == (c, v)]
                       for v in opts["variants"]} for c in opts["configs"]}
    out = Path(opts["out"])
    md, summary = [], {}
    for c, runs in runs_by_cfg.items():
        text, summary[Path(c).stem] = table(c, runs, opts)
        md.append(text)
    cfg, _ = config.parse(config.Config, [opts["configs"][0], *opts["train"]])
    lpips_fn, why = pixel_reward.load_lpips(cfg.eval.lpips_backbone)   # what train.py's pixel reward used
    only = "".join(f"; {stem} only: {' '.join(o)}" for stem, o in opts["only"].items())
    note = (f"{len(opts['seeds'])} seeds ({','.join(map(str, opts['seeds']))}); train.py overrides: "
            f"{' '.join(opts['train']) or 'none'}{only}. Metrics on held-out clips (mean ± std over seeds). "
            f"Pixel reward: {'L1 + LPIPS' if lpips_fn is not None else f'L1 only ({why})'}.")
    (out / "compare.md").write_text(note + "\n\n" + "\n\n".join(md) + "\n")
    (out / "compare.json").write_text(json.dumps(summary, indent=1))
    plot(runs_by_cfg, opts, out / "reward_curves.png")
    print(note + "\n\n" + "\n\n".join(md))
    print(f"wrote {out / 'compare.md'}, {out / 'compare.json'} and {out / 'reward_curves.png'}")


if __name__ == "__main__":
    runtime.cli(main)
