"""NFD: judge F1 of the GRPO rollouts' sampler (the SDE of sde.steps steps) beside the evaluation's (DPM-Solver++
over sde.eval_steps) and an Euler ODE of sde.steps steps, on the same held-out clips and initial noise.

    python docs/probes/samplers.py configs/laptop_nfd.yaml --run.threads=1 --eval.clips=96 --eval.seed=2000

Prints one JSON line per sampler: judge and reward-IDM macro F1, PSNR, brightness.
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
import train

cfg = config.parse(config.Config, sys.argv[1:])[0]
torch.set_num_threads(cfg.run.threads)
held, _ = data.load_clips(dataclasses.replace(cfg.data, seed=cfg.eval.seed, max_clips=cfg.eval.clips))
scorers = evaluate.load_scorers(cfg.eval)
api, model = train.world_model(cfg)
model.eval()
tokens = {"offset": model.action_offset, "camera_tokens": cfg.data.camera_tokens}


def noise():                                                   # every sampler starts from the same x_1
    return torch.Generator().manual_seed(cfg.run.seed)


def ode(steps: int, solver: str):
    c = dataclasses.replace(cfg, sde=dataclasses.replace(cfg.sde, eval_steps=steps, eval_solver=solver))
    return lambda x0, batch: api.sample_frames(model, x0, batch["tokens"], c, noise())


samplers = {f"ode_dpm2m_{cfg.sde.eval_steps}": ode(cfg.sde.eval_steps, "dpm2m"),
            f"sde_{cfg.sde.steps}": lambda x0, batch: api.rollout(model, x0, batch["tokens"], cfg, noise()).frames,
            f"ode_euler_{cfg.sde.steps}": ode(cfg.sde.steps, "euler")}
for name, sample in samplers.items():
    with torch.no_grad():
        row = evaluate.evaluate(sample, held, cfg.eval, name, scorers, None, tokens)
    print(json.dumps({"row": name, **{k: round(row[k], 4) for k in ("judge_f1_macro", "f1_macro", "psnr", "brightness")
                                      if row.get(k) is not None}}), flush=True)
