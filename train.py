"""RLIR: GRPO post-training of a video world model with the inverse reward (paper §4, Eq. 1-3).

One iteration (DESIGN.md): take P prompts (a context frame x0 and actions a1..a15), roll each out G
times with the world model, let the reward IDM read the actions back from every generated clip
(Eq. 3), turn rewards into group-relative advantages (Eq. 1), recompute log-probs under the current
weights with the action tokens masked (§4.2), and step AdamW on the clipped surrogate (Eq. 2).

    python train.py configs/minicraft_ar.yaml                    # embedded world, CPU
    python train.py configs/minicraft_ar.yaml --rl.reward=pixel  # the RLVR-World baseline (Eq. 6)
    python train.py configs/mineworld_700m.yaml --data.source=DIR --rl.vpt_idm=4x_idm.model,4x_idm.weights
    torchrun --standalone --nproc_per_node=8 train.py configs/mineworld_700m.yaml ...   # 1 node, 8 GPUs

The run folder (`out/<config name>/` unless --run.out) gets config.yaml, log.jsonl (one line per
step), ckpt.pt (atomic; a rerun resumes from it) and results.json (rows gt, before, after).
"""
import dataclasses
import json
import math
import os
import random
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import config
import data
import evaluate
import grpo
import idm as idm_lib
import model_ar
from config import Config

# ---------------------------------------------------------------------------------------------
# The world model behind four calls (DESIGN.md: both world models expose the same ones).
# ---------------------------------------------------------------------------------------------


def build_world_model(cfg: Config):
    if cfg.run.world_model == "ar":
        return model_ar.build_world_model(cfg.ar, cfg.vq)
    raise ValueError(f"run.world_model={cfg.run.world_model!r}: expected 'ar'")


def action_offset(cfg: Config) -> int:
    """Action token ids start after the image codes (MineWorld: 8192)."""
    return cfg.ar.n_codes


def rollout(model, x0, tokens, cfg: Config, generator):
    """Sample clips for training: frames, old log-probs and the loss mask (model_ar.Rollout)."""
    return model_ar.rollout(model, x0, tokens, cfg.ar.temperature, cfg.ar.top_p, generator)


def log_probs(model, ro, cfg: Config) -> torch.Tensor:
    """Differentiable log-probs of the rollout's choices under the current weights, [B, L]."""
    return model_ar.log_probs(model, ro)


def sample(model, x0, tokens, cfg: Config, generator=None) -> torch.Tensor:
    """Evaluation sampling (MineWorld: top-p 0.8), uint8 frames [B, 16, H, W, 3]."""
    return model_ar.sample_frames(model, x0, tokens, generator=generator)


def slice_rollout(ro, i: int, j: int):
    """Rows i..j of a rollout (every tensor field is batch-first)."""
    return dataclasses.replace(ro, **{f.name: getattr(ro, f.name)[i:j] for f in dataclasses.fields(ro)
                                      if torch.is_tensor(getattr(ro, f.name))})


# ---------------------------------------------------------------------------------------------
# Rewards: the inverse reward (Eq. 3) or RLVR-World's pixel reward (Eq. 6).
# ---------------------------------------------------------------------------------------------
def load_reward_idm(cfg: Config, device) -> idm_lib.IDM:
    if cfg.rl.vpt_idm:
        model_path, _, weights_path = cfg.rl.vpt_idm.partition(",")
        return idm_lib.load_vpt(model_path, weights_path).to(device)
    return idm_lib.load(cfg.rl.reward_idm).to(device)


@torch.no_grad()
def rewards(frames: torch.Tensor, batch: dict, cfg: Config, reward_idm, lpips_fn) -> torch.Tensor:
    """One scalar per generated clip, [B]. frames uint8 [B, 16, H, W, 3]; batch holds the given
    actions' groups and the ground-truth frames (only the pixel reward looks at those)."""
    if cfg.rl.reward == "idm":
        buttons, cam = idm_lib.predict(reward_idm, frames)     # [B, 16, 20], [B, 16, 2]
        pred = data.action_groups(buttons, cam)                # [B, 16, 9]
        return idm_lib.inverse_reward(pred, batch["groups"].to(pred.device), cfg.rl.granularity)
    if cfg.rl.reward == "pixel":                               # Eq. 6, averaged over frames
        x = frames[:, 1:].float() / 255                        # [B, 15, H, W, 3]
        y = batch["frames"][:, 1:].to(x.device).float() / 255
        loss = (x - y).abs().mean((2, 3, 4))                   # [B, 15] L1
        if lpips_fn is not None:
            loss = loss + lpips_fn(x.flatten(0, 1), y.flatten(0, 1)).view(loss.shape)
        return -loss.mean(1)
    raise ValueError(f"rl.reward={cfg.rl.reward!r}: expected 'idm' (Eq. 3) or 'pixel' (Eq. 6)")


# ---------------------------------------------------------------------------------------------
# Checkpoints: plain dicts, written atomically, holding everything needed to resume exactly.
# ---------------------------------------------------------------------------------------------
def rng_state() -> dict:
    """Every RNG state as tensors and plain types (loadable with weights_only=True)."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, words, py_gauss = random.getstate()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": torch.from_numpy(keys.astype(np.int64)), "numpy_pos": [pos, has_gauss, gauss],
            "python": list(words), "python_gauss": py_gauss}


def save_checkpoint(path: Path, model, opt, sched, step: int, cfg: Config) -> None:
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(),
             "scheduler": sched.state_dict(), "step": step, "config": config.to_dict(cfg),
             "rng": rng_state()}
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:                                 # temp file, fsync, rename: a kill at
        torch.save(state, f)                                   # any moment leaves the old or new file
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: Path, model, opt, sched) -> int:
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    rng = state["rng"]
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available() and rng["cuda"]:
        torch.cuda.set_rng_state_all(rng["cuda"])
    np.random.set_state(("MT19937", rng["numpy"].numpy().astype(np.uint32), *rng["numpy_pos"]))
    random.setstate((3, tuple(rng["python"]), rng["python_gauss"]))
    return state["step"]


# ---------------------------------------------------------------------------------------------
# Evaluation: the paper's protocol on held-out clips (evaluate.py), reward and judge IDMs.
# ---------------------------------------------------------------------------------------------
def run_eval(model, clips, cfg: Config, name: str, device) -> dict:
    model.eval()
    offset = action_offset(cfg)

    def generate(x0, batch):
        gen = torch.Generator(device=device).manual_seed(cfg.run.seed)   # same noise every eval
        return sample(model, x0.to(device), batch["tokens"].to(device) - 8192 + offset, cfg, gen)

    return evaluate.evaluate(generate, clips, cfg.eval, name)


# ---------------------------------------------------------------------------------------------
# The loop.
# ---------------------------------------------------------------------------------------------
def main(argv: list[str]) -> None:
    cfg, name = config.parse(Config, argv)
    # One code path for CPU and 1..N GPUs: torchrun sets RANK; gloo on CPU, nccl on GPU.
    ddp = "RANK" in os.environ
    rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 1)
    use_cuda = cfg.run.device == "cuda" or (cfg.run.device == "auto" and torch.cuda.is_available())
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if use_cuda else "cpu")
    if ddp:
        dist.init_process_group("nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(device)
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    rl = cfg.rl
    if rl.prompts % world:
        sys.exit(f"rl.prompts={rl.prompts} must be a multiple of the {world} ranks: each group "
                 f"lives on one rank (its advantages then need no communication)")
    out = Path(cfg.run.out or f"out/{name}")
    log0 = print if rank == 0 else (lambda *a, **k: None)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(config.dump(cfg))
        log0(config.dump(cfg))
    torch.manual_seed(cfg.run.seed)

    # Data: RL prompts from their own worlds; held-out clips for evaluation from others.
    prompts, skips = data.load_clips(dataclasses.replace(cfg.data, seed=rl.prompt_seed))
    held, _ = data.load_clips(dataclasses.replace(cfg.data, seed=cfg.eval.seed,
                                                  max_clips=cfg.eval.clips))
    log0(f"{len(prompts)} prompt clips, {len(held)} held-out clips; skipped {dict(skips.counts)}")

    # Models: the policy, its frozen reference (only if β > 0), the reward IDM.
    model = build_world_model(cfg).to(device)
    ref = build_world_model(cfg).to(device).eval() if cfg.grpo.beta > 0 else None
    reward_idm = load_reward_idm(cfg, device) if rl.reward == "idm" else None
    lpips_fn = evaluate.load_lpips(cfg.eval.lpips_backbone)[0] if rl.reward == "pixel" else None
    train_model = torch.nn.parallel.DistributedDataParallel(model) if ddp else model
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=rl.lr, weight_decay=rl.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, rl.warmup))
                                              * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / rl.steps))))
    ckpt, start = out / "ckpt.pt", 0
    if ckpt.exists():
        start = load_checkpoint(ckpt, model, opt, sched)
        log0(f"resumed from {ckpt} at step {start}")
    stop = {"sigterm": False}                                  # pre-emption: save, then exit
    signal.signal(signal.SIGTERM, lambda *_: stop.update(sigterm=True))

    results = {}
    if rank == 0 and start == 0:
        results["gt"] = evaluate.evaluate_gt(held, cfg.eval)
        results["before"] = run_eval(model, held, cfg, "before", device)
        (out / "results.json").write_text(json.dumps(results, indent=1))
        print(evaluate.markdown_table([results["gt"], results["before"]]))
    batches = data.batches(prompts, rl.prompts, cfg.run.seed, start, rank, world, action_offset(cfg))
    G, bad = rl.group_size, 0
    log = open(out / "log.jsonl", "a") if rank == 0 else None
    for step in (bar := tqdm(range(start, rl.steps), desc="rlir", disable=rank > 0)):
        t0 = time.time()
        batch = {k: v.repeat_interleave(G, 0) for k, v in next(batches).items()}  # groups of G
        model.eval()
        gen = torch.Generator(device=device).manual_seed(cfg.run.seed * 100_003 + step * world + rank)
        ro = rollout(model, batch["frames"][:, 0].to(device), batch["tokens"].to(device), cfg, gen)
        r = rewards(ro.frames, batch, cfg, reward_idm, lpips_fn)            # [P*G]  (Eq. 3 / 6)
        n, mb = len(r), rl.micro_batch
        with torch.no_grad():                                  # π_old: the same forward as below,
            old = torch.cat([log_probs(model, slice_rollout(ro, i, i + mb), cfg)   # so the first
                             for i in range(0, n, mb)])        # ratio is exactly 1
            ref_lp = (torch.cat([log_probs(ref, slice_rollout(ro, i, i + mb), cfg)
                                 for i in range(0, n, mb)]) if ref is not None else None)
        row = {"step": step + 1}
        if torch.isfinite(r).all():
            adv, st = grpo.group_advantages(r.float(), G, cfg.grpo)          # Eq. 1
            row.update(st)
        model.train()
        opt.zero_grad(set_to_none=True)
        total = ro.mask.sum() if cfg.grpo.aggregation == "token" else n
        stats, finite = [], torch.isfinite(r).all() and torch.isfinite(old).all()
        for i in range(0, n, mb) if finite else ():
            part = slice_rollout(ro, i, i + mb)
            lp = log_probs(train_model, part, cfg)
            loss, st = grpo.policy_loss(lp, old[i:i + mb], adv[i:i + mb], part.mask, cfg.grpo,
                                        None if ref_lp is None else ref_lp[i:i + mb])   # Eq. 2
            weight = part.mask.sum() / total if cfg.grpo.aggregation == "token" else len(lp) / n
            if not torch.isfinite(loss):
                finite = False
                break
            (loss * weight).backward()
            stats.append((float(weight), st))
        if finite:                                             # a non-finite step changes nothing
            norm = torch.nn.utils.clip_grad_norm_(params, rl.grad_clip)
            finite = bool(torch.isfinite(norm))
        if finite:
            opt.step()
            bad = 0
            for key in ("loss", "clip_frac", "approx_kl", "ratio_mean", "kl_ref"):
                vals = [(w, s[key]) for w, s in stats if s.get(key) is not None]
                row[key] = sum(w * float(v) for w, v in vals) / max(sum(w for w, _ in vals), 1e-12)
            row["grad_norm"] = float(norm)
        else:
            opt.zero_grad(set_to_none=True)
            bad += 1
            row["skipped"] = "non-finite reward, log-prob, loss or gradient"
            log0(f"step {step + 1}: skipped the update ({row['skipped']}), {bad} in a row")
            if bad >= rl.max_bad_steps:
                sys.exit(f"stopping: {bad} consecutive non-finite steps (rl.max_bad_steps)")
        sched.step()
        row.update(lr=sched.get_last_lr()[0], seconds=round(time.time() - t0, 2))
        if rank == 0:
            log.write(json.dumps(row) + "\n")
            log.flush()
            bar.set_postfix(reward=round(row.get("reward_mean", float("nan")), 3))
            done = step + 1 == rl.steps
            if rl.eval_every and (step + 1) % rl.eval_every == 0 and not done:
                bar.write(json.dumps(run_eval(model, held, cfg, f"step {step + 1}", device)))
            if (step + 1) % rl.save_every == 0 or done or stop["sigterm"]:
                save_checkpoint(ckpt, model, opt, sched, step + 1, cfg)
        if stop["sigterm"]:
            log0(f"SIGTERM: saved {ckpt} at step {step + 1}; rerun the same command to resume")
            break
    else:
        if rank == 0:
            results = json.loads((out / "results.json").read_text())   # gt, before
            results["after"] = run_eval(model, held, cfg, "after", device)
            (out / "results.json").write_text(json.dumps(results, indent=1))
            print(evaluate.markdown_table(list(results.values())))
    if ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
