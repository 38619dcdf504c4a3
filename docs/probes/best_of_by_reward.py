"""Best-of-G on held-out prompts: how much judge macro F1 the reward IDM's pick of G samples buys, per reward form.

    python docs/probes/best_of_by_reward.py configs/laptop_ar.yaml assets/laptop/idm_reward.pt
    python docs/probes/best_of_by_reward.py configs/laptop_nfd.yaml a.pt,b.pt,c.pt   # an ensemble: rewards averaged

G = 8 evaluation samples (train.py's sample_frames) of each of P held-out clips (eval.seed); each reward form
scores every sample over frames 1..15 and picks one per prompt; the judge IDM's macro F1 over the P picks is
printed beside that of one sample (the mean over the G) and of the judge's own pick (its share of the 7 groups).
"""
import dataclasses
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import config  # noqa: E401,E402
import data
import evaluate
import idm as idm_lib
import train

cfg = config.parse(config.Config, [sys.argv[1], "--run.threads=1"])[0]
P, G = 48, 8
torch.set_num_threads(1)
api, model = train.world_model(cfg)
judge = idm_lib.load(cfg.eval.judge_idm, "eval.judge_idm")
members = [idm_lib.load(p, "reward IDM") for p in sys.argv[2].split(",")]
held, _ = data.load_clips(dataclasses.replace(cfg.data, seed=cfg.eval.seed, max_clips=P))
batch = data.collate(held, model.action_offset, cfg.data.camera_tokens)
true = batch["groups"]                                                  # [P, 16, 9]


def read(net, frames):
    with torch.no_grad():
        return idm_lib.predict_groups(net, frames)                      # [G, 16, 9]


judged, read_by_members = [], []
for i in range(P):
    with torch.no_grad():
        frames = api.sample_frames(model, batch["frames"][i:i + 1, 0].expand(G, -1, -1, -1),
                                   batch["tokens"][i:i + 1].expand(G, -1, -1), cfg, torch.Generator().manual_seed(i))
    judged.append(read(judge, frames))
    read_by_members.append(torch.stack([read(m, frames) for m in members]))
judged = torch.stack(judged)                                            # [P, G, 16, 9]
hits = (torch.stack(read_by_members) == true[:, None, None])[..., 1:, :]  # [P, E, G, 15, 9]
freq = [torch.bincount(true[:, 1:, g].flatten(), minlength=11).float() / true[:, 1:, g].numel() for g in range(9)]
weight = torch.stack([1 / freq[g][true[:, 1:, g]] for g in range(9)], -1)[:, None, None]  # [P, 1, 1, 15, 9]
forms = {"exact (Eq. 3)": hits.all(-1).float().mean(-1),
         "group (9 groups)": hits.float().mean((-1, -2)),
         "group (7 judged groups)": hits[..., :7].float().mean((-1, -2)),
         "class-balanced (7 groups)": ((hits[..., :7] * weight[..., :7]).sum(-1) / weight[..., :7].sum(-1)).mean(-1)}


def judge_f1(pick):                                                     # pick [P] -> the judge's macro F1
    chosen = judged[torch.arange(P), pick][:, 1:].numpy()
    return evaluate.action_following(chosen, true[:, 1:].numpy())["f1_macro"]


print(f"one sample: {np.mean([judge_f1(torch.full((P,), g)) for g in range(G)]):.4f}")
for name, score in forms.items():                                       # score [P, E, G]
    print(f"best of {G} by {name}: {judge_f1(score.mean(1).argmax(1)):.4f}"
          + (f" (members {[round(judge_f1(score[:, e].argmax(1)), 4) for e in range(len(members))]})"
             if len(members) > 1 else ""))
own = (judged == true[:, None])[:, :, 1:, :7].float().mean((-1, -2))    # [P, G]
print(f"best of {G} by the judge itself: {judge_f1(own.argmax(1)):.4f}")
