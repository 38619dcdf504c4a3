"""Per action group: how much of the judge's F1 on that group the reward IDM's pick of G samples buys.

    python docs/probes/group_headroom.py configs/laptop_ar.yaml [WEIGHTS]    # WEIGHTS: a policy's state dict

G = 8 evaluation samples (train.py's sample_frames) of each of P held-out clips (eval.seed). For each of the 7
judged groups g, the reward (the mean hit of rl.reward_idm's members on g, frames 1..15, class-balanced) picks
one sample per prompt; printed: the judge's F1 on g for one sample (mean over the G), for the reward's pick, for
the judge's own pick on g (its optimistic ceiling), and the within-prompt correlation of reward and judge hits;
then the same two for a soft reward, the members' probability of the true label (idm.true_label_probs).
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
P, G = 64, 8
torch.set_num_threads(1)
api, model = train.world_model(cfg)
if len(sys.argv) > 2:
    model.load_state_dict(torch.load(sys.argv[2], weights_only=True))
judge = idm_lib.load(cfg.eval.judge_idm, "eval.judge_idm")
members = [idm_lib.load(p, "reward IDM") for p in cfg.rl.reward_idm.split(",")]
held, _ = data.load_clips(dataclasses.replace(cfg.data, seed=cfg.eval.seed, max_clips=P))
batch = data.collate(held, model.action_offset, cfg.data.camera_tokens)
true = batch["groups"][:, 1:]                                           # [P, 15, 9]

judged, rewarded, soft = [], [], []
for i in range(P):
    with torch.no_grad():
        frames = api.sample_frames(model, batch["frames"][i:i + 1, 0].expand(G, -1, -1, -1),
                                   batch["tokens"][i:i + 1].expand(G, -1, -1), cfg, torch.Generator().manual_seed(i))
        judged.append(idm_lib.predict_groups(judge, frames)[:, 1:])     # [G, 15, 9]
        outs = [m(frames) for m in members]                             # one forward per member
        rewarded.append(torch.stack([data.action_groups(*idm_lib.decode(o))[:, 1:] for o in outs]))  # [E, G, 15, 9]
        soft.append(torch.stack([idm_lib.true_label_probs(o, batch["groups"][i:i + 1].expand(G, -1, -1))[:, 1:]
                                 for o in outs]).mean(0))               # [G, 15, 9]
judged, rewarded = torch.stack(judged), torch.stack(rewarded)           # [P, G, 15, 9], [P, E, G, 15, 9]
soft = torch.stack(soft)                                                # [P, G, 15, 9]
judge_hit = (judged == true[:, None]).float()                           # [P, G, 15, 9]
reward_hit = (rewarded == true[:, None, None]).float().mean(1)          # [P, G, 15, 9]: the members' mean
freq = [torch.bincount(true[..., g].flatten(), minlength=11).float() / true[..., g].numel() for g in range(9)]
weight = torch.stack([1 / freq[g][true[..., g]] for g in range(9)], -1)[:, None]  # [P, 1, 15, 9]


def f1(picks: torch.Tensor, g: int) -> float:                          # picks [P] -> judge F1 on group g
    chosen = judged[torch.arange(P), picks][..., g].numpy()             # [P, 15]
    return evaluate.classification_scores(true[..., g].flatten().numpy(), chosen.flatten())["f1_macro"]


def corr(a: torch.Tensor, b: torch.Tensor) -> float:                  # within-prompt correlation of [P, G, 15]
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return float((a * b).sum() / ((a * a).sum() * (b * b).sum()).sqrt().clamp_min(1e-9))


print(f"{cfg.run.world_model}, {P} prompts x G {G}; judge F1 per group: one sample | reward's pick | judge's pick"
      " | within-prompt corr(reward hit, judge hit) | soft reward's pick | corr(soft reward, judge hit)")
for g in range(data.N_DISCRETE_GROUPS):
    one = np.mean([f1(torch.full((P,), k), g) for k in range(G)])
    pick = {name: f1((x[..., g] * weight[..., g]).sum(-1).argmax(1), g)
            for name, x in (("hard", reward_hit), ("judge", judge_hit), ("soft", soft))}
    print(f"{data.GROUP_NAMES[g]:>13}: {one:.3f} | {pick['hard']:.3f} | {pick['judge']:.3f} | "
          f"{corr(reward_hit[..., g], judge_hit[..., g]):+.3f} | {pick['soft']:.3f} | "
          f"{corr(soft[..., g], judge_hit[..., g]):+.3f}")
