"""RLIR: GRPO post-training of a video world model with the inverse reward (paper §4, Eq. 1-3).

One iteration (DESIGN.md): take P prompts (a context frame x0 and actions a1..a15), roll each out G
times with the world model, let the reward IDM read the actions back from every generated clip
(Eq. 3), turn rewards into group-relative advantages (Eq. 1), recompute log-probs under the current
weights with the action tokens masked (§4.2), and step AdamW on the clipped surrogate (Eq. 2).

    python train.py                                              # embedded world, NFD, CPU (minicraft_nfd.yaml)
    python train.py configs/minicraft_ar.yaml                    # embedded world, AR, CPU
    python train.py configs/minicraft_ar.yaml --rl.reward=pixel  # the RLVR-World baseline (Eq. 6)
    python train.py configs/mineworld_700m.yaml --data.source=DIR --rl.vpt_idm=4x_idm.model,4x_idm.weights
    torchrun --standalone --nproc_per_node=8 train.py configs/mineworld_700m.yaml ...   # 1 node, 8 GPUs

The run folder (`out/<config name>/` unless --run.out) gets config.yaml, log.jsonl (one line per
step), ckpt.pt (atomic; a rerun resumes from it), results.json (rows gt, before, after) and
side_by_side.mp4 (eval.videos held-out clips, rows GT | before | after).

Robustness (DESIGN.md "Conventions"): the same code runs on 1 CPU process or N torchrun ranks, with a
fixed global batch (rl.prompts × rl.group_size) and noise that depends on (seed, step, prompt) only, so
N ranks train what 1 process would; a SIGKILL at any moment leaves the last checkpoint loadable,
SIGTERM saves one and exits 0; a non-finite step changes nothing and is logged with its reason.
"""
import contextlib
import dataclasses
import hashlib
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
import model_diffusion
from config import Config

# ---------------------------------------------------------------------------------------------
# The world model behind four calls (DESIGN.md: both world models expose the same ones).
# ---------------------------------------------------------------------------------------------


def build_world_model(cfg: Config):
    if cfg.run.world_model == "ar":
        return model_ar.build_world_model(cfg.ar, cfg.vq)
    if cfg.run.world_model == "nfd":
        if cfg.nfd.init_from is None:
            sys.exit("nfd.init_from is not set: RLIR post-trains a pretrained NFD base model. Make one with "
                     "`python pretrain.py nfd CONFIG` (NFD weights are not public) and point nfd.init_from "
                     "at it, or pass --nfd.init_from=scratch to run from random weights (smoke tests, "
                     "benchmarks).")
        model = model_diffusion.NFD(cfg.nfd, cfg.ae)
        if cfg.ae.init_from:
            model_diffusion.load_weights(model.ae, cfg.ae.init_from)
        if cfg.nfd.init_from != "scratch":
            model_diffusion.load_weights(model, cfg.nfd.init_from)
        return model
    raise ValueError(f"run.world_model={cfg.run.world_model!r}: expected 'ar' or 'nfd'")


def pick_device(run) -> torch.device:
    """run.device "auto" means CUDA when present; under torchrun each process takes GPU LOCAL_RANK."""
    use_cuda = run.device == "cuda" or (run.device == "auto" and torch.cuda.is_available())
    return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if use_cuda else "cpu")


def action_offset(cfg: Config) -> int:
    """Action token ids start after the image codes (MineWorld: 8192; NFD reads them minus 8192)."""
    return cfg.ar.n_codes if cfg.run.world_model == "ar" else 8192


def rollout(model, x0, tokens, cfg: Config, generator):
    """Sample clips for training: frames, old log-probs and the loss mask, plus what replay needs.
    AR: per image token (§4.2). NFD: per (frame, denoising step) of the SDE (§4.3)."""
    if cfg.run.world_model == "ar":
        return model_ar.rollout(model, x0, tokens, cfg.ar.temperature, cfg.ar.top_p, generator)
    return model_diffusion.rollout(model, x0, tokens, cfg.sde, generator, cfg.rl.group_size)


def log_probs(model, ro, cfg: Config) -> torch.Tensor:
    """Differentiable log-probs of the rollout's choices under the current weights, [B, L]."""
    if cfg.run.world_model == "ar":
        return model_ar.log_probs(model, ro)
    return model_diffusion.log_probs(model, ro, cfg.sde)


@torch.no_grad()
def replay_log_probs(model, ro, cfg: Config) -> torch.Tensor:
    """log_probs of the whole rollout without gradient, rl.micro_batch rows per forward, [B, L]: π_old
    (the same forward as the update, so the first ratio is exactly 1) and the reference policy."""
    mb = cfg.rl.micro_batch
    return torch.cat([log_probs(model, slice_rollout(ro, i, i + mb), cfg) for i in range(0, len(ro.mask), mb)])


def per_entry(adv: torch.Tensor, ro, cfg: Config) -> torch.Tensor:
    """Per-frame advantages [B, F-1] (frames 1..F-1) -> one per log-prob entry [B, L] (rl.credit "frame").
    AR: entry j belongs to frame j // frame_len (its image tokens, then the next action's; frame 0 is the
    prompt). NFD: entry (f-1)·K + k is step k of frame f."""
    cols = torch.arange(ro.mask.shape[1], device=adv.device)  # [L]
    frame = cols // cfg.ar.frame_len if cfg.run.world_model == "ar" else cols // len(ro.g) + 1  # [L]
    return torch.nn.functional.pad(adv, (1, 0))[:, frame]  # [B, L]; frame 0's entries are masked anyway


def sample(model, x0, tokens, cfg: Config, generator=None) -> torch.Tensor:
    """Evaluation sampling (MineWorld: top-p 0.8; NFD: DPM-Solver++ 18 steps), [B, 16, H, W, 3]."""
    if cfg.run.world_model == "ar":
        return model_ar.sample_frames(model, x0, tokens, generator=generator)
    return model_diffusion.sample_frames(model, x0, tokens, cfg.sde, generator)


def slice_rollout(ro, i: int, j: int):
    """Rows i..j of a rollout. Per-sample fields are at least 2-D and batch-first; 1-D ones (the
    diffusion time grid and coefficients) are shared by all rows."""
    return dataclasses.replace(ro, **{f.name: getattr(ro, f.name)[i:j] for f in dataclasses.fields(ro)
                                      if torch.is_tensor(getattr(ro, f.name))
                                      and getattr(ro, f.name).ndim >= 2})


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
    """The reward of every generated frame, [B, 15]; a clip's reward is their mean. frames uint8
    [B, 16, H, W, 3]; batch holds the given actions' groups and the ground-truth frames (only the
    pixel reward looks at those)."""
    if cfg.rl.reward == "idm":
        buttons, cam = idm_lib.predict(reward_idm, frames)     # [B, 16, 20], [B, 16, 2]
        pred = data.action_groups(buttons, cam)                # [B, 16, 9]
        return idm_lib.inverse_reward(pred, batch["groups"].to(pred.device), cfg.rl.granularity,
                                      per_frame=True)          # [B, 15], Eq. 3's terms
    if cfg.rl.reward == "pixel":                               # Eq. 6, per frame
        x = frames[:, 1:].float() / 255                        # [B, 15, H, W, 3]
        y = batch["frames"][:, 1:].to(x.device).float() / 255
        loss = (x - y).abs().mean((2, 3, 4))                   # [B, 15] L1
        if lpips_fn is not None:
            loss = loss + evaluate.lpips_distance(lpips_fn, x.flatten(0, 1), y.flatten(0, 1)).view(loss.shape)
        return -loss
    raise ValueError(f"rl.reward={cfg.rl.reward!r}: expected 'idm' (Eq. 3) or 'pixel' (Eq. 6)")


# ---------------------------------------------------------------------------------------------
# Distributed: each GRPO group lives on one rank. Rank r holds prompts r, r + world, ... of the
# global batch (data.batches), all G rollouts of each, so Eq. 1 needs no communication; rewards
# are still gathered so that every rank logs, checks and normalises over the whole global batch.
# ---------------------------------------------------------------------------------------------
def group_generators(seed: int, step: int, prompts: int, rank: int, world: int, device) -> list:
    """One generator per group on this rank, seeded by (run seed, step, global prompt index): every
    group draws the same noise whatever the world size, and a resumed run what an unbroken one did."""
    return [torch.Generator(device=device).manual_seed(int(np.random.SeedSequence([seed, step, p])
                                                           .generate_state(1)[0]))
            for p in range(rank, prompts, world)]


def gather_rewards(r: torch.Tensor, world: int, group_size: int) -> torch.Tensor:
    """This rank's rewards [P/world * G, *] -> the global batch's [P * G, *], in prompt order 0..P-1."""
    if world == 1:
        return r
    parts = [torch.empty_like(r) for _ in range(world)]
    dist.all_gather(parts, r)
    rest = r.shape[1:]                                         # () per clip, (15,) per frame
    return torch.stack(parts).view(world, -1, group_size, *rest).transpose(0, 1).reshape(-1, *rest)


def local_rows(x: torch.Tensor, rank: int, world: int, group_size: int) -> torch.Tensor:
    """The inverse of gather_rewards: this rank's rows [P/world * G, *] of a global [P * G, *]."""
    rest = x.shape[1:]
    return x.view(-1, world, group_size, *rest)[:, rank].reshape(-1, *rest)


def across_ranks(values: list[float], op: str, device) -> list[float]:
    """Element-wise "min", "max" or "sum" of `values` over ranks, so every rank takes the same
    decision (a rank that skipped a backward alone would hang DDP's all-reduce)."""
    if not dist.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)    # [len(values)]
    dist.all_reduce(t, {"min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX, "sum": dist.ReduceOp.SUM}[op])
    return t.tolist()


def first_nonfinite(named: dict, device) -> str | None:
    """Name of the first tensor in `named` with a NaN/inf on any rank (None entries pass), or None."""
    ok = across_ranks([float(v is None or bool(torch.isfinite(v).all())) for v in named.values()],
                      "min", device)
    return next((name for name, flag in zip(named, ok) if not flag), None)


def fingerprint(model) -> str:
    """sha256 of the weights' bytes: equal on every rank iff DDP kept the replicas identical."""
    h = hashlib.sha256()
    for key, v in sorted(model.state_dict().items()):
        h.update(key.encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


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
    """The data position is `step`: data.batches and the rollout noise are pure functions of
    (seed, step), so model, optimizer, scheduler, step and RNG states are all a resume needs."""
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(),
             "scheduler": sched.state_dict(), "step": step, "config": config.to_dict(cfg),
             "rng": rng_state()}
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:                                 # temp file, fsync, rename: a kill at
        torch.save(state, f)                                   # any moment leaves the old or new file
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)                 # make the rename itself durable
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_checkpoint(path: Path, model, opt, sched) -> int:
    fix = f"rerun with the config it was saved with ({path.parent / 'config.yaml'}) or a new --run.out"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:                                     # torn, foreign or malicious file
        sys.exit(f"{path} is not a loadable checkpoint ({type(e).__name__}: {str(e).splitlines()[0]}); "
                 f"delete it to start over, or {fix}")
    missing = [k for k in ("model", "optimizer", "scheduler", "step", "rng") if k not in state]
    if missing:
        sys.exit(f"{path} lacks {missing}: not a train.py checkpoint; delete it or {fix}")
    own = model.state_dict()
    absent = sorted(set(own) - set(state["model"]))
    extra = sorted(set(state["model"]) - set(own))
    shapes = [f"{k} {list(v.shape)} != {list(own[k].shape)}" for k, v in state["model"].items()
              if k in own and v.shape != own[k].shape]
    if absent or extra or shapes:
        sys.exit(f"{path} does not fit this model: missing keys {absent}, unexpected keys {extra}, "
                 f"mis-shaped {shapes}; {fix}")
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


def trim_log(path: Path, step: int) -> None:
    """On resume, keep log rows 1..step: a killed run may have logged steps past its checkpoint,
    and its last line may be torn."""
    rows = []
    for line in path.read_text().splitlines() if path.exists() else ():
        with contextlib.suppress(json.JSONDecodeError, KeyError, TypeError):
            if json.loads(line)["step"] <= step:
                rows.append(line + "\n")
    path.write_text("".join(rows))


def accumulate_gradients(train_model, ro, old, adv, ref_lp, cfg: Config, total: float) -> tuple[list, list]:
    """Backward of Eq. 2 over the rollout in micro-batches of rl.micro_batch rows, each weighted so
    the gradients add up to the whole batch's (`total`: the tokens per rank, for "token"
    aggregation). Under DDP the gradients are all-reduced once, with the last micro-batch. Returns
    the micro-batches' losses and (weight, health statistics) pairs."""
    n, mb = len(ro.mask), cfg.rl.micro_batch
    ddp = isinstance(train_model, torch.nn.parallel.DistributedDataParallel)
    losses, stats = [], []
    for i in range(0, n, mb):
        part = slice_rollout(ro, i, i + mb)
        sync = not ddp or i + mb >= n                          # all-reduce gradients once, at the end
        with contextlib.nullcontext() if sync else train_model.no_sync():
            lp = log_probs(train_model, part, cfg)
            loss, st = grpo.policy_loss(lp, old[i:i + mb], adv[i:i + mb], part.mask, cfg.grpo,
                                        None if ref_lp is None else ref_lp[i:i + mb])   # Eq. 2
            weight = part.mask.sum() / total if cfg.grpo.aggregation == "token" else len(lp) / n
            (loss * weight).backward()                         # a NaN reaches every rank's gradient
        losses.append(loss.detach())
        stats.append((float(weight), st))
    return losses, stats


# ---------------------------------------------------------------------------------------------
# Evaluation: the paper's protocol on held-out clips (evaluate.py), reward and judge IDMs.
# ---------------------------------------------------------------------------------------------
def run_eval(model, clips, cfg: Config, name: str, device, videos: list | None = None,
             scorers: evaluate.Scorers | None = None) -> dict:
    """One row of evaluate.py's table; `videos` (a list) receives the first eval.videos clips;
    `scorers` (evaluate.load_scorers) are loaded here when not given."""
    model.eval()
    offset = action_offset(cfg)

    def generate(x0, batch):
        gen = torch.Generator(device=device).manual_seed(cfg.run.seed)   # same noise every eval
        return sample(model, x0.to(device), batch["tokens"].to(device) - 8192 + offset, cfg, gen)

    return evaluate.evaluate(generate, clips, cfg.eval, name, scorers, videos)


# ---------------------------------------------------------------------------------------------
# The loop.
# ---------------------------------------------------------------------------------------------
DEFAULT_CONFIG = Path(__file__).with_name("configs") / "minicraft_nfd.yaml"


def main(argv: list[str]) -> None:
    if all(a.startswith("--") for a in argv):                 # no YAML: the embedded NFD default
        argv = [str(DEFAULT_CONFIG), *argv]
    cfg, name = config.parse(Config, argv)
    # One code path for CPU and 1..N GPUs: torchrun sets RANK; gloo on CPU, nccl on GPU.
    ddp = "RANK" in os.environ
    rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 1)
    device = pick_device(cfg.run)
    use_cuda = device.type == "cuda"
    rl = cfg.rl
    if world > rl.prompts:                                     # checked before any work
        sys.exit(f"{world} ranks but only rl.prompts={rl.prompts} prompts per step: each GRPO group "
                 f"lives on one rank, so launch at most {rl.prompts} ranks or raise rl.prompts")
    if rl.prompts % world:
        sys.exit(f"rl.prompts={rl.prompts} must be a multiple of the {world} ranks: each group "
                 f"lives on one rank (its advantages then need no communication)")
    if rl.credit not in ("clip", "frame"):
        sys.exit(f"rl.credit={rl.credit!r}: expected 'clip' (Eq. 1-3) or 'frame' (per-frame advantages)")
    if rl.group_size < 1 or rl.micro_batch < 1 or rl.max_bad_steps < 1:
        sys.exit(f"rl.group_size={rl.group_size}, rl.micro_batch={rl.micro_batch} and "
                 f"rl.max_bad_steps={rl.max_bad_steps} must all be >= 1")
    if ddp:
        dist.init_process_group("nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(device)
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
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
    lpips_fn = lpips_fn.to(device) if lpips_fn is not None else None
    scorers = evaluate.load_scorers(cfg.eval) if rank == 0 else None   # metric networks, loaded once
    train_model = torch.nn.parallel.DistributedDataParallel(model) if ddp else model
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=rl.lr, weight_decay=rl.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, rl.warmup))
                                              * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / rl.steps))))
    ckpt, start = out / "ckpt.pt", 0
    if ckpt.exists():
        start = load_checkpoint(ckpt, model, opt, sched)
        log0(f"resumed from {ckpt} at step {start}")
        if rank == 0:
            trim_log(out / "log.jsonl", start)
    stop = {"sigterm": False}                                  # pre-emption: save, then exit 0
    previous_handler = signal.signal(signal.SIGTERM, lambda *_: stop.update(sigterm=True))

    results = {}
    if rank == 0 and start == 0:
        results["gt"] = evaluate.evaluate_gt(held, cfg.eval, scorers)
        videos = []                                            # kept for the side-by-side video
        results["before"] = run_eval(model, held, cfg, "before", device, videos, scorers)
        (out / "results.json").write_text(json.dumps(results, indent=1))
        torch.save(torch.cat(videos) if videos else torch.empty(0), out / "videos_before.pt")
        print(evaluate.markdown_table([results["gt"], results["before"]]))
    batches = data.batches(prompts, rl.prompts, cfg.run.seed, start, rank, world, action_offset(cfg))
    G, bad = rl.group_size, 0
    log = open(out / "log.jsonl", "a") if rank == 0 else None
    for step in (bar := tqdm(range(start, rl.steps), desc="rlir", disable=rank > 0)):
        t0 = time.time()
        batch = {k: v.repeat_interleave(G, 0) for k, v in next(batches).items()}  # groups of G
        model.eval()
        gens = group_generators(cfg.run.seed, step, rl.prompts, rank, world, device)  # one per group
        ro = rollout(model, batch["frames"][:, 0].to(device), batch["tokens"].to(device), cfg, gens)
        r = rewards(ro.frames, batch, cfg, reward_idm, lpips_fn)   # [P/world*G, 15] per frame
        r = gather_rewards(r.mean(1) if rl.credit == "clip" else r, world, G)  # [P*G] Eq. 3/6, or [P*G, 15]
        old = replay_log_probs(model, ro, cfg)                 # π_old, [P/world * G, L]
        ref_lp = replay_log_probs(ref, ro, cfg) if ref is not None else None
        row, adv = {"step": step + 1}, None
        if torch.isfinite(r).all():                            # r is global: every rank agrees
            adv_all, st = grpo.group_advantages(r.float(), G, cfg.grpo)      # Eq. 1, [P*G(, 15)]
            adv = local_rows(adv_all, rank, world, G)          # [P/world * G(, 15)]
            adv = per_entry(adv, ro, cfg) if rl.credit == "frame" else adv  # [P/world * G(, L)]
            row.update(st)
        # Non-finite guard: every rank reaches the same verdict before any backward (DDP lockstep).
        why = first_nonfinite({"reward": r, "advantage": adv,
                               "log-prob": old, "reference log-prob": ref_lp}, device)
        model.train()
        opt.zero_grad(set_to_none=True)
        total = across_ranks([float(ro.mask.sum())], "sum", device)[0] / world   # tokens per rank
        if why is None:
            losses, stats = accumulate_gradients(train_model, ro, old, adv, ref_lp, cfg, total)  # Eq. 2
            why = first_nonfinite({"loss": torch.stack(losses)}, device)
        if why is None:                                        # gradients are all-reduced by now,
            norm = torch.nn.utils.clip_grad_norm_(params, rl.grad_clip)      # so the norm is global
            why = None if torch.isfinite(norm) else "gradient"
        if why is None:
            opt.step()
            bad = 0
            keys = [k for k in ("loss", "clip_frac", "approx_kl", "ratio_mean", "kl_ref")
                    if stats[0][1].get(k) is not None]
            local = [sum(w * float(s[k]) for w, s in stats) / sum(w for w, _ in stats) for k in keys]
            row.update({k: v / world for k, v in zip(keys, across_ranks(local, "sum", device))})
            row["grad_norm"] = float(norm)
        else:                                                  # a skipped step changes nothing:
            opt.zero_grad(set_to_none=True)                    # weights and AdamW moments untouched
            bad += 1
            row["skipped"] = f"non-finite {why}"
            log0(f"step {step + 1}: skipped the update (non-finite {why}), {bad} in a row")
        sched.step()                                           # the LR stays a function of the step
        row.update(lr=sched.get_last_lr()[0], seconds=round(time.time() - t0, 2))
        sigterm = across_ranks([float(stop["sigterm"])], "max", device)[0] > 0
        if rank == 0:
            log.write(json.dumps(row) + "\n")
            log.flush()
            bar.set_postfix(reward=round(row.get("reward_mean", float("nan")), 3))
            done = step + 1 == rl.steps
            if rl.eval_every and (step + 1) % rl.eval_every == 0 and not done:
                bar.write(json.dumps(run_eval(model, held, cfg, f"step {step + 1}", device, None, scorers)))
            if (step + 1) % rl.save_every == 0 or done or sigterm:
                save_checkpoint(ckpt, model, opt, sched, step + 1, cfg)
        if bad >= rl.max_bad_steps:
            signal.signal(signal.SIGTERM, previous_handler)
            sys.exit(f"stopping at step {step + 1}: {bad} consecutive skipped steps (last: non-finite "
                     f"{why}; rl.max_bad_steps={rl.max_bad_steps}); fix the cause and rerun to resume from {ckpt}")
        if sigterm:
            log0(f"SIGTERM: saved {ckpt} at step {step + 1}; rerun the same command to resume")
            break
    else:
        if rank == 0:
            results = json.loads((out / "results.json").read_text())   # gt, before
            videos = []
            results["after"] = run_eval(model, held, cfg, "after", device, videos, scorers)
            (out / "results.json").write_text(json.dumps(results, indent=1))
            print(evaluate.markdown_table(list(results.values())))
            if videos:                                         # GT | before | after, clip by clip
                gt = data.collate(held[:cfg.eval.videos])["frames"]          # [n, 16, H, W, 3]
                before = torch.load(out / "videos_before.pt", weights_only=True)
                evaluate.write_side_by_side(out / "side_by_side.mp4", [gt, before, torch.cat(videos)],
                                            cfg.eval.fps)
    if log is not None:
        log.close()
    # Every rank prints this line (not only rank 0): equal hashes show the replicas stayed identical.
    print(f"rank {rank}/{world}: weights sha256 {fingerprint(model)}", flush=True)
    signal.signal(signal.SIGTERM, previous_handler)
    if ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
