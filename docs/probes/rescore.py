"""Re-score world models on more (or other) held-out clips than a run's own table: `recon` (the tokenizer's bound),
the base and each weights file, every row with the same sampling noise (run.seed), so two rows differ only by
their weights.

    python docs/probes/rescore.py RUN/config.yaml --eval.clips=192 --eval.seed=2000 RUN/ckpt.pt [more.pt ...]
    python docs/probes/rescore.py configs/laptop_ar.yaml --run.seed=1 --eval.clips=192 /tmp/ar_sup.pt

A weights file is a train.py checkpoint (its "model" entry) or a pretrain.py one (loaded as the world model's
init_from). Prints one JSON line per row: judge and reward-IDM macro F1, PSNR, brightness.
"""
import dataclasses
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import config  # noqa: E401,E402
import data
import evaluate
import runtime
import train

args = sys.argv[1:]
overrides = [a for a in args if a.startswith("--") or a.endswith(".yaml")]
weights = [a for a in args if a not in overrides]
cfg = config.parse(config.Config, overrides)[0]
torch.set_num_threads(cfg.run.threads)
held, _ = data.load_clips(dataclasses.replace(cfg.data, seed=cfg.eval.seed, max_clips=cfg.eval.clips))
scorers = evaluate.load_scorers(cfg.eval)
KEYS = ("judge_f1_macro", "f1_macro", "psnr", "brightness", "idm_agreement")
for name in ["recon", "base", *weights]:
    state = runtime.read_checkpoint(name, "weights") if name not in ("recon", "base") else {}
    run_cfg = cfg
    if state and "model" not in state:                # a pretrain.py checkpoint: the model's init_from
        section = "ar" if cfg.run.world_model == "ar" else "nfd"
        run_cfg = dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), init_from=name)})
    api, model = train.world_model(run_cfg)
    if "model" in state:
        model.load_state_dict(state["model"])
    row = evaluate.world_model_rows(api, model, held, run_cfg, (name,), "cpu", None, scorers)[name]
    print(json.dumps({"row": name, "seed": cfg.run.seed, "clips": len(held),
                      **{k: round(row[k], 4) for k in KEYS if row.get(k) is not None}}), flush=True)
