"""Pretraining of the pieces RLIR starts from: the IDMs (reward and judge), tokenizers, base models.

RLIR post-trains a *pretrained* world model and scores it with a *trained* IDM (paper §4.1, §5.1).
For real Minecraft those are MineWorld's checkpoints and OpenAI's VPT IDM; for the embedded world
this script makes small ones and `assets/minicraft/` ships them. One stage per run:

    python pretrain.py idm configs/pretrain_idm_reward.yaml     # reward IDM  (~15 min, 2 CPU cores)
    python pretrain.py idm configs/pretrain_idm_judge.yaml      # judge IDM: other seed, other worlds
    python pretrain.py idm --train.steps=50 --train.out=/tmp/idm.pt   # a quick smoke run

The reward IDM scores rollouts during RL; the judge IDM is trained the same way on disjoint worlds
(a different seed) and only ever evaluates, so reward hacking of the reward IDM shows up as a gap
between the two (DESIGN.md, "Go beyond").
"""
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import config
import data
import idm as idm_lib
from data import DataConfig
from idm import IDMConfig


@dataclass
class TrainConfig:
    out: str = ""                 # checkpoint path; "" = assets/minicraft/<stage>.pt
    steps: int = 1200             # optimizer steps
    batch_size: int = 16          # clips per step (x16 frames each)
    lr: float = 2e-3              # peak AdamW learning rate (linear warmup, cosine decay to 10%)
    warmup: int = 50              # warmup steps
    weight_decay: float = 0.01    # AdamW weight decay
    grad_clip: float = 1.0        # max gradient norm
    eval_every: int = 200         # steps between held-out evaluations
    eval_clips: int = 128         # held-out clips for those evaluations (seed eval_seed)
    eval_seed: int = 1000         # minicraft seed of the held-out clips (never trained on)
    threads: int = 0              # torch CPU threads; 0 = torch's default
    seed: int = 0                 # torch seed (init, shuffling)


@dataclass
class Config:
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(max_clips=4000))
    idm: IDMConfig = field(default_factory=IDMConfig)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay from lr to lr / 10."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    p = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


@torch.no_grad()
def idm_accuracy(model: idm_lib.IDM, batch: dict, chunk: int = 32) -> dict:
    """Per-group accuracy of the IDM's argmax on frames 1..15 (frame 0's action precedes the clip)."""
    preds = []
    for i in range(0, len(batch["frames"]), chunk):
        b, c = idm_lib.predict(model, batch["frames"][i:i + chunk])
        preds.append(data.action_groups(b, c))
    pred = torch.cat(preds)[:, 1:]                            # [N, 15, 9]
    true = batch["groups"][:, 1:]                             # [N, 15, 9]
    acc = (pred == true).float().mean((0, 1))                 # [9]
    out = {f"acc_{n}": round(float(a), 4) for n, a in zip(data.GROUP_NAMES, acc)}
    out["acc_exact"] = round(float((pred == true).all(-1).float().mean()), 4)  # Eq. 3 on GT clips
    return out


def train_idm(cfg: Config) -> None:
    """Supervised IDM training on minicraft clips: the labels are the actions that made the frames."""
    tc = cfg.train
    out = Path(tc.out or "assets/minicraft/idm.pt")
    torch.manual_seed(tc.seed)
    t0 = time.time()
    clips, skips = data.load_clips(cfg.data)
    held = data.collate(data.load_clips(
        DataConfig(**{**vars(cfg.data), "seed": tc.eval_seed, "max_clips": tc.eval_clips}))[0])
    print(f"data: {len(clips)} train clips (seed {cfg.data.seed}), {tc.eval_clips} held-out "
          f"(seed {tc.eval_seed}) in {time.time() - t0:.0f}s; skipped: {dict(skips.counts)}")
    model = idm_lib.IDM.from_config(cfg.idm)
    print(f"IDM: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    log = open(out.with_suffix(".log.jsonl"), "w")
    batches = data.batches(clips, tc.batch_size, tc.seed)
    t0 = time.time()
    for step in (bar := tqdm(range(tc.steps), desc="idm")):
        batch = next(batches)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, tc)
        model.train()
        pred = model(batch["frames"])
        mask = torch.ones(batch["frames"].shape[:2])          # [B, T]
        mask[:, 0] = 0                                        # a_0 happened before the clip
        loss = idm_lib.idm_loss(pred, batch["buttons"], batch["camera_bins"], mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        row = {"step": step + 1, "loss": round(loss.item(), 4), "lr": lr_at(step, tc),
               "seconds": round(time.time() - t0, 1)}
        if (step + 1) % tc.eval_every == 0 or step + 1 == tc.steps:
            model.eval()
            row.update(idm_accuracy(model, held))
            idm_lib.save(model, str(out))
            bar.write(json.dumps(row))
        bar.set_postfix(loss=row["loss"])
        log.write(json.dumps(row) + "\n")
        log.flush()
    print(f"saved {out} after {time.time() - t0:.0f}s of training")


STAGES = {"idm": train_idm}


def main(argv: list[str]) -> None:
    if not argv or argv[0] not in STAGES:
        sys.exit(f"usage: python pretrain.py {{{'|'.join(STAGES)}}} [CONFIG.yaml] [--section.key=value]")
    cfg, _ = config.parse(Config, argv[1:])
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    print(config.dump(cfg))
    Path(cfg.train.out or "assets/minicraft").parent.mkdir(parents=True, exist_ok=True)
    STAGES[argv[0]](cfg)


if __name__ == "__main__":
    main(sys.argv[1:])
