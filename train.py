"""RLIR: GRPO post-training of a video world model with the inverse reward (paper §4, Eq. 1-3).

One iteration (DESIGN.md): take P prompts (a context frame x0 and actions a1..a15), roll each out G
times with the world model, let the reward IDM read the actions back from every generated clip
(Eq. 3), turn rewards into group-relative advantages (Eq. 1), recompute log-probs under the current
weights with the action tokens masked (§4.2), and step AdamW on the clipped surrogate (Eq. 2).

    python train.py                                              # embedded world, NFD, CPU (laptop_nfd.yaml)
    make train                                                   # the same, creating .venv first if needed
    python train.py configs/laptop_ar.yaml                       # embedded world, AR, CPU
    python train.py configs/laptop_ar.yaml --rl.reward=pixel     # the RLVR-World baseline (Eq. 6)
    python train.py configs/mineworld_700m.yaml --data.source=DIR --rl.vpt_idm=4x_idm.model,4x_idm.weights
    torchrun --standalone --nproc_per_node=8 train.py configs/mineworld_700m.yaml ...   # 1 node, 8 GPUs

The run folder (`out/<config name>/` unless --run.out) gets config.yaml, log.jsonl (one line per
step), ckpt.pt (atomic; a rerun resumes from it), results.json (rows gt, recon, before, [best_of,] after,
and gap: the share of the before-to-recon gap closed) and side_by_side.mp4 (eval.videos held-out clips,
rows GT | before | after).

Robustness (DESIGN.md "Conventions"): the same code runs on 1 CPU process or N torchrun ranks, with a
fixed global batch (rl.prompts × rl.group_size) and noise that depends on (seed, step, prompt) only, so
N ranks train what 1 process would; a SIGKILL at any moment leaves the last checkpoint loadable,
SIGTERM saves one and exits 0; a non-finite step changes nothing and is logged with its reason.
"""
import contextlib
import dataclasses
import hashlib
import json
import random
import signal
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
import runtime
from config import Config, UsageError

# ---------------------------------------------------------------------------------------------
# The world model: model_ar.py or model_diffusion.py, behind the same calls (DESIGN.md):
#   build(cfg), rollout(model, x0, tokens, cfg, generators) -> Rollout, log_probs(model, ro, cfg)
#   -> (log-probs [B, L], KL to π_ref [B, L] or None), reference(ref, ro, cfg), sample_frames(...),
#   branch(model, frames, tokens, t, cfg, generators) -> a Rollout sampling frame t alone (rl.groups "frame"),
#   roundtrip(model, frames); a Rollout carries frames, logp, mask and frame_of (the frame of each
#   entry), and model.action_offset is where its action token ids start.
# ---------------------------------------------------------------------------------------------


def world_model(cfg: Config):
    """(the world model's module, the model built from cfg): the one place the paradigm is chosen."""
    api = {"ar": model_ar, "nfd": model_diffusion}[cfg.run.world_model]
    return api, api.build(cfg)


def slice_rollout(ro, i: int, j: int):
    """Rows i..j of a rollout. Per-sample fields are at least 2-D and batch-first; 1-D ones (the
    diffusion time grid and coefficients, frame_of) are shared by all rows."""
    return dataclasses.replace(ro, **{f.name: getattr(ro, f.name)[i:j] for f in dataclasses.fields(ro)
                                      if torch.is_tensor(getattr(ro, f.name))
                                      and getattr(ro, f.name).ndim >= 2})


@torch.no_grad()
def replay(fn, model, ro, cfg: Config) -> torch.Tensor:
    """fn(model, rows, cfg) over the rollout without gradient, rl.micro_batch rows per forward: π_ref's side of
    the KL (api.reference), or log π_θ of the stored samples (api.log_probs; the update's own forward)."""
    mb = cfg.rl.micro_batch
    parts = [fn(model, slice_rollout(ro, i, i + mb), cfg) for i in range(0, len(ro.mask), mb)]
    return torch.cat([p[0] if isinstance(p, tuple) else p for p in parts])


# ---------------------------------------------------------------------------------------------
# Rewards: the inverse reward (Eq. 3) or RLVR-World's pixel reward (Eq. 6).
# ---------------------------------------------------------------------------------------------
def load_reward_idms(cfg: Config, device) -> list[idm_lib.IDM]:
    """The reward IDM: OpenAI's (rl.vpt_idm) or an idm.save file; rl.reward_idm may list several files,
    comma-separated, for an ensemble whose rewards are averaged."""
    if cfg.rl.vpt_idm:
        model_path, _, weights_path = cfg.rl.vpt_idm.partition(",")
        return [idm_lib.load_vpt(model_path, weights_path).to(device)]
    return [idm_lib.load(path, "rl.reward_idm").to(device) for path in cfg.rl.reward_idm.split(",")]


def reward_fn(cfg: Config, device, clips: list):
    """reward(frames uint8 [B, 16, H, W, 3], batch) -> the reward of every generated frame [B, 15]; a clip's
    reward is their mean. batch holds the given actions' groups and the ground-truth frames (only the pixel
    reward looks at those); `clips` are the prompts, whose label frequencies rl.granularity "balanced" weighs by."""
    if cfg.rl.reward == "idm":
        reward_idms = load_reward_idms(cfg, device)
        label_weights = data.label_weights(clips) if cfg.rl.granularity == "balanced" else None

        @torch.no_grad()
        def inverse(frames, batch):
            terms = []
            for net in reward_idms:
                out, true = net(frames), batch["groups"]
                pred = data.action_groups(*idm_lib.decode(out))    # [B, 16, 9]
                probs = idm_lib.true_label_probs(out, true) if cfg.rl.reading == "soft" else None  # [B, 16, 9]
                terms.append(idm_lib.inverse_reward(pred, true.to(pred.device), cfg.rl.granularity, True,
                                                    label_weights, probs))  # [B, 15], Eq. 3's terms
            return torch.stack(terms).mean(0)                      # [B, 15], the ensemble's mean
        return inverse
    lpips_fn = evaluate.load_lpips(cfg.eval.lpips_backbone)[0]

    @torch.no_grad()
    def pixel(frames, batch):                                      # Eq. 6, per frame
        x = frames[:, 1:].float() / 255                            # [B, 15, H, W, 3]
        y = batch["frames"][:, 1:].to(x.device).float() / 255
        loss = (x - y).abs().mean((2, 3, 4))                       # [B, 15] L1
        if lpips_fn is not None:
            lp = evaluate.lpips_distance(lpips_fn.to(x.device), x.flatten(0, 1), y.flatten(0, 1))
            loss = loss + lp.view(loss.shape)                      # + LPIPS where a backbone is given
        return -loss
    return pixel


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
    runtime.save_atomic(state, path)


def load_checkpoint(path: Path, model, opt, sched) -> int:
    fix = f"rerun with the config it was saved with ({path.parent / 'config.yaml'}) or a new --run.out"
    state = runtime.read_checkpoint(str(path), "the run's ckpt.pt")   # torn, foreign or malicious: one line
    missing = [k for k in ("model", "optimizer", "scheduler", "step", "rng") if k not in state]
    if missing:
        raise UsageError(f"{path} lacks {missing}: not a train.py checkpoint; delete it or {fix}")
    own = model.state_dict()
    absent = sorted(set(own) - set(state["model"]))
    extra = sorted(set(state["model"]) - set(own))
    shapes = [f"{k} {list(v.shape)} != {list(own[k].shape)}" for k, v in state["model"].items()
              if k in own and v.shape != own[k].shape]
    if absent or extra or shapes:
        raise UsageError(f"{path} does not fit this model: missing keys {absent}, unexpected keys {extra}, "
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


# ---------------------------------------------------------------------------------------------
# One GRPO iteration in two stages (§4): collect experience, then update the policy on it.
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Experience:
    ro: object                   # the world model's Rollout; ro.ref holds π_ref's replay when β > 0
    rewards: torch.Tensor        # [P * G, 15] per-frame rewards of the global batch (Eq. 3 or 6); frame groups: t, t+1
    adv: torch.Tensor | None     # [P/world * G] per clip or [P/world * G, L] per entry; None if a reward is not finite
    stats: dict                  # group statistics of Eq. 1 (reward mean/std, zero-std groups, ...)


def advantages(r: torch.Tensor, ro, cfg: Config, rank: int, world: int) -> tuple[torch.Tensor, dict]:
    """Eq. 1 on the global batch's per-frame rewards r [P * G, 15], then this rank's rows: one advantage per
    clip from its mean reward (rl.credit "clip", the paper), or per log-prob entry (rl.credit "frame"); under
    rl.objective "best_of", 1 for the best clip of each group and 0 for the others."""
    G, best_of = cfg.rl.group_size, cfg.rl.objective == "best_of"
    per_frame = cfg.rl.credit == "frame" and cfg.rl.groups == "clip" and not best_of
    adv, stats = grpo.group_advantages(r if per_frame else r.mean(1), G, cfg.grpo)  # [P*G(, 15)]
    if best_of:
        adv = grpo.best_of_advantages(r.mean(1), G)            # [P*G]  1 for each group's pick
    adv = local_rows(adv, rank, world, G)                      # [P/world * G(, 15)]
    return (grpo.frame_credit(adv, ro.frame_of) if per_frame else adv), stats


def branch_frame(cfg: Config, step: int) -> int | None:
    """The frame 1..F-1 whose samples form the groups of `step` under rl.groups "frame" (a pure function of
    (seed, step), the same on every rank), or None for whole-clip groups."""
    if cfg.rl.groups == "clip":
        return None
    return int(np.random.default_rng([cfg.run.seed, step, 1]).integers(1, cfg.data.clip_len))


def scored_terms(r: torch.Tensor, frame: int | None) -> torch.Tensor:
    """Of per-frame terms r [B, 15] (frames 1..15), those a step's groups are scored on: all of them, or with
    frame groups at t (rl.groups "frame") the terms at t and t+1 (one at t = 15), which frame t's pixels decide."""
    return r if frame is None else r[:, frame - 1:frame + 1]


def collect(api, model, ref, batch: dict, reward, cfg: Config, generators, rank: int, world: int,
            frame: int | None = None) -> Experience:
    """Roll out G clips per prompt (batch rows are groups of G), score every frame (Eq. 3 or 6), form the
    advantages (Eq. 1) and, if β > 0, replay the rollouts under the frozen reference π_ref. With
    `frame` t (rl.groups "frame"), the G samples differ in frame t alone (api.branch) and their reward is the mean
    of the rewards at t and t+1, the frames whose actions the IDM reads from frame t's pixels."""
    model.eval()
    if frame is None:
        ro = api.rollout(model, batch["frames"][:, 0], batch["tokens"], cfg, generators)
    else:
        ro = api.branch(model, batch["frames"], batch["tokens"], frame, cfg, generators)
    r = scored_terms(reward(ro.frames, batch).float(), frame)  # [P/world * G, 15|2|1]
    r = gather_rewards(r, world, cfg.rl.group_size)            # [P * G, 15|2|1]
    if ref is not None:
        ro = dataclasses.replace(ro, ref=replay(api.reference, ref, ro, cfg))
    adv, stats = advantages(r, ro, cfg, rank, world) if torch.isfinite(r).all() else (None, {})  # r is global
    return Experience(ro, r, adv, stats)


def backward(train_model, api, exp: Experience, cfg: Config) -> tuple[list, list]:
    """Backward of Eq. 2 over the rollout in micro-batches of rl.micro_batch rows, each weighted so the
    gradients add up to the whole batch's (for "token" aggregation: over the tokens of every rank). Under
    DDP the gradients are all-reduced once, with the last micro-batch. Returns the micro-batches' losses
    and (weight, health statistics) pairs."""
    ro, n, mb = exp.ro, len(exp.ro.mask), cfg.rl.micro_batch
    ddp = isinstance(train_model, torch.nn.parallel.DistributedDataParallel)
    world = runtime.rank_world()[1]
    total = across_ranks([float(ro.mask.sum())], "sum", ro.mask.device)[0] / world   # tokens per rank
    losses, stats = [], []
    for i in range(0, n, mb):
        part = slice_rollout(ro, i, i + mb)
        sync = not ddp or i + mb >= n                          # all-reduce gradients once, at the end
        with contextlib.nullcontext() if sync else train_model.no_sync():
            lp, kl = api.log_probs(train_model, part, cfg)
            # Eq. 2. One pass per batch: π_old is π_θ before this step, so its log-probs are lp's values (TRL's
            # choice; the sampler's own ro.logp agree to ~1e-5 in fp32, a replay would only cost a forward)
            loss, st = grpo.policy_loss(lp, lp.detach(), exp.adv[i:i + mb], part.mask, cfg.grpo, kl)
            weight = part.mask.sum() / total if cfg.grpo.aggregation == "token" else len(lp) / n
            (loss * weight).backward()                         # a NaN reaches every rank's gradient
        losses.append(loss.detach())
        stats.append((float(weight), st))
    return losses, stats


def update(train_model, api, opt, params: list, exp: Experience, cfg: Config, device) -> tuple[dict, str | None]:
    """One AdamW step on Eq. 2 unless something is not finite (reward, advantage, log-prob, loss or gradient
    norm, on any rank): then nothing changes, neither the weights nor AdamW's moments. Returns the log row's
    entries and the reason for a skip (None if the step was taken)."""
    why = first_nonfinite({"reward": exp.rewards, "advantage": exp.adv, "log-prob": exp.ro.logp,
                           "reference": exp.ro.ref}, device)  # the same verdict on every rank (DDP lockstep)
    train_model.train()
    opt.zero_grad(set_to_none=True)
    if why is None:
        losses, stats = backward(train_model, api, exp, cfg)
        why = first_nonfinite({"loss": torch.stack(losses)}, device)
    if why is None:                                            # gradients are all-reduced by now,
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.rl.grad_clip)     # so the norm is global
        why = None if torch.isfinite(norm) else "gradient"
    if why is not None:
        opt.zero_grad(set_to_none=True)
        return {"skipped": f"non-finite {why}"}, why
    opt.step()
    keys = [k for k in ("loss", "clip_frac", "approx_kl", "ratio_mean", "kl_ref") if stats[0][1].get(k) is not None]
    local = [sum(w * float(s[k]) for w, s in stats) / sum(w for w, _ in stats) for k in keys]
    world = runtime.rank_world()[1]
    return {**{k: v / world for k, v in zip(keys, across_ranks(local, "sum", device))}, "grad_norm": float(norm)}, None


# ---------------------------------------------------------------------------------------------
# Evaluation: the paper's protocol on held-out clips (evaluate.py), reward and judge IDMs.
# ---------------------------------------------------------------------------------------------
def evaluate_before(api, model, held, cfg: Config, device, scorers, out: Path, best_by) -> None:
    """Rows gt, recon (the tokenizer's bound), before and, if eval.best_of, best_of (the pick of eval.best_of base
    samples by `best_by`, the inverse reward) into results.json; the before videos kept for the side-by-side video."""
    videos, names = [], ("recon", "before") + (("best_of",) if cfg.eval.best_of else ())
    results = {"gt": evaluate.evaluate_gt(held, cfg.eval, scorers),
               **evaluate.world_model_rows(api, model, held, cfg, names, device, best_by, scorers, videos)}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    torch.save(torch.cat(videos) if videos else torch.empty(0), out / "videos_before.pt")
    tqdm.write(evaluate.markdown_table(list(results.values())))


def evaluate_after(api, model, held, cfg: Config, device, scorers, out: Path) -> None:
    """Row after into results.json, the table printed, side_by_side.mp4 (GT | before | after, clip by clip)."""
    results, videos = json.loads((out / "results.json").read_text()), []
    results.pop("gap", None)                                   # a rerun after a finished run recomputes it
    results.update(evaluate.world_model_rows(api, model, held, cfg, ("after",), device, None, scorers, videos))
    gap = evaluate.gap_closed(results)
    (out / "results.json").write_text(json.dumps({**results, "gap": gap}, indent=1))
    print(evaluate.markdown_table(list(results.values())))
    print(evaluate.gap_line(gap))
    if videos:
        gt = data.collate(held[:cfg.eval.videos])["frames"]     # [n, 16, H, W, 3]
        before = torch.load(out / "videos_before.pt", weights_only=True)
        evaluate.write_side_by_side(out / "side_by_side.mp4", [gt, before, torch.cat(videos)], cfg.eval.fps)


def check_run(cfg: Config, world: int) -> None:
    """Checked before any work: each GRPO group lives on one rank (its advantages then need no communication), the
    sizes are positive, and the evaluation's reward-IDM column reads with an IDM that gives the reward."""
    rl = cfg.rl
    if not rl.vpt_idm and cfg.eval.reward_idm not in rl.reward_idm.split(","):
        raise UsageError(f"eval.reward_idm={cfg.eval.reward_idm} is not the IDM that gives the reward "
                         f"(rl.reward_idm={rl.reward_idm}): set both to the same file, or list it in the ensemble")
    if world > rl.prompts or rl.prompts % world:
        raise UsageError(f"rl.prompts={rl.prompts} prompts per step cannot be split over {world} ranks: each GRPO "
                         f"group lives on one rank, so launch a divisor of rl.prompts ranks or change rl.prompts")
    if min(rl.group_size, rl.micro_batch, rl.max_bad_steps, rl.steps) < 1:
        raise UsageError(f"rl.group_size={rl.group_size}, rl.micro_batch={rl.micro_batch}, rl.steps={rl.steps} and "
                         f"rl.max_bad_steps={rl.max_bad_steps} must all be >= 1")


# ---------------------------------------------------------------------------------------------
# The loop.
# ---------------------------------------------------------------------------------------------
DEFAULT_CONFIG = Path(__file__).with_name("configs") / "laptop_nfd.yaml"


def main(argv: list[str]) -> None:
    if all(a.startswith("--") for a in argv):                 # no YAML: the embedded NFD default
        argv = [str(DEFAULT_CONFIG), *argv]
    cfg, name = config.parse(Config, argv)
    rl, G = cfg.rl, cfg.rl.group_size
    device, rank, world = runtime.setup(cfg.run)
    check_run(cfg, world)
    out = Path(cfg.run.out or f"out/{name}")
    say = tqdm.write if rank == 0 else (lambda *a, **k: None)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(config.dump(cfg))
    say(f"{name}: {cfg.run.world_model} world model on {device} x {world}, {rl.steps} GRPO steps of {rl.prompts} "
        f"prompts x G {G}, reward {rl.reward}; run folder {out} (resolved config in config.yaml)")
    torch.manual_seed(cfg.run.seed)

    # Data: RL prompts from their own worlds; held-out clips for evaluation from others.
    prompts, skips = data.load_clips(dataclasses.replace(cfg.data, seed=rl.prompt_seed))
    held, _ = data.load_clips(dataclasses.replace(cfg.data, seed=cfg.eval.seed, max_clips=cfg.eval.clips))
    say(f"{len(prompts)} prompt clips, {len(held)} held-out clips" + (f"; skipped {dict(skips.counts)}"
                                                                       if skips.counts else ""))
    # Models: the policy, its frozen reference (only if β > 0), the reward.
    api, model = world_model(cfg)
    model.to(device)
    ref = world_model(cfg)[1].to(device).eval() if cfg.grpo.beta > 0 else None
    reward = reward_fn(cfg, device, prompts)
    scorers = evaluate.load_scorers(cfg.eval) if rank == 0 else None   # metric networks, loaded once
    train_model = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=rl.lr, weight_decay=rl.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: runtime.lr_factor(s, rl.steps, rl.warmup))
    ckpt, start = out / "ckpt.pt", 0
    if ckpt.exists():
        start = load_checkpoint(ckpt, model, opt, sched)
        say(f"resumed from {ckpt} at step {start}")
        if rank == 0:
            runtime.trim_log(out / "log.jsonl", start)
    stop = {"sigterm": False}                                  # pre-emption: save, then exit 0
    previous_handler = signal.signal(signal.SIGTERM, lambda *_: stop.update(sigterm=True))
    if rank == 0 and start == 0:
        # the best_of row's pick: the run's reward when it is the inverse one, else one built like it (Eq. 3)
        best_by = None if not cfg.eval.best_of else reward if rl.reward == "idm" else reward_fn(
            dataclasses.replace(cfg, rl=dataclasses.replace(rl, reward="idm")), device, prompts)
        evaluate_before(api, model, held, cfg, device, scorers, out, best_by)

    batches = data.batches(prompts, rl.prompts, cfg.run.seed, start, rank, world, model.action_offset,
                           cfg.data.camera_tokens)
    bad, log = 0, open(out / "log.jsonl", "a") if rank == 0 else None
    for step in (bar := tqdm(range(start, rl.steps), desc="rlir", disable=rank > 0)):
        t0 = time.time()
        batch = {k: v.repeat_interleave(G, 0).to(device) for k, v in next(batches).items()}  # groups of G
        gens = group_generators(cfg.run.seed, step, rl.prompts, rank, world, device)  # one per group
        exp = collect(api, model, ref, batch, reward, cfg, gens, rank, world, branch_frame(cfg, step))
        row, why = update(train_model, api, opt, params, exp, cfg, device)
        bad = bad + 1 if why else 0
        if why:
            say(f"step {step + 1}: skipped the update (non-finite {why}), {bad} in a row")
        sched.step()                                           # the LR stays a function of the step
        row = {"step": step + 1, **exp.stats, **row, "lr": sched.get_last_lr()[0],
               "seconds": round(time.time() - t0, 2)}
        sigterm = across_ranks([float(stop["sigterm"])], "max", device)[0] > 0
        if rank == 0:
            log.write(json.dumps(row) + "\n")
            log.flush()
            bar.set_postfix(reward=round(row.get("reward_mean", float("nan")), 3))
            done = step + 1 == rl.steps
            if rl.eval_every and (step + 1) % rl.eval_every == 0 and not done:
                name = f"step {step + 1}"
                rows = evaluate.world_model_rows(api, model, held, cfg, (name,), device, None, scorers)
                bar.write(json.dumps(rows[name]))
            if (step + 1) % rl.save_every == 0 or done or sigterm:
                save_checkpoint(ckpt, model, opt, sched, step + 1, cfg)
        if bad >= rl.max_bad_steps:
            signal.signal(signal.SIGTERM, previous_handler)
            raise UsageError(f"stopping at step {step + 1}: {bad} consecutive skipped steps (last: non-finite {why}; "
                             f"rl.max_bad_steps={rl.max_bad_steps}); fix the cause and rerun to resume from {ckpt}")
        if sigterm:
            say(f"SIGTERM: saved {ckpt} at step {step + 1}; rerun the same command to resume")
            break
    else:
        if rank == 0:
            evaluate_after(api, model, held, cfg, device, scorers, out)
    if log is not None:
        log.close()
    # Every rank prints this line (not only rank 0): equal hashes show the replicas stayed identical.
    print(f"rank {rank}/{world}: weights sha256 {fingerprint(model)}", flush=True)
    signal.signal(signal.SIGTERM, previous_handler)
    runtime.teardown()


if __name__ == "__main__":
    runtime.cli(main)
