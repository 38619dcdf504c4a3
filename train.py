"""RLIR: GRPO post-training of a video world model with the inverse reward (paper §4, Eq. 1-3).

One iteration: take P prompts (a context frame x0 and actions a1..a15), roll each out G times with the world
model, let the reward IDM read the actions back from every generated clip (Eq. 3), turn rewards into
group-relative advantages (Eq. 1), recompute log-probs under the current weights with the action tokens masked
(§4.2), and step AdamW on the clipped surrogate (Eq. 2). For NFD, --rl.objective=nft trains DiffusionNFT instead.

    python train.py                                              # embedded world, NFD, CPU (laptop_nfd.yaml)
    make train                                                   # the same, creating .venv first if needed
    python train.py configs/laptop_ar.yaml                       # embedded world, AR, CPU
    python train.py configs/laptop_ar.yaml --rl.reward=pixel     # the RLVR-World baseline (Eq. 6)
    python train.py configs/mineworld_700m.yaml --data.source=DIR --rl.vpt_idm=4x_idm.model,4x_idm.weights
    torchrun --standalone --nproc_per_node=8 train.py configs/nfd_310m.yaml ...   # 1 node, 8 GPUs (or CPU ranks)

The run folder (`out/<config name>/` unless --run.out) gets config.yaml, log.jsonl (one line per step),
ckpt.pt (atomic; a rerun of the same command resumes from it), results.json (rows gt, recon, before,
[best_of,] after, and gap: the share of the before-to-recon gap closed) and side_by_side.mp4 (eval.videos
held-out clips, rows GT | before | after).

The folder is a record that cannot be corrupted (docs/conventions.md §6, §7): nothing is written to it before the
config is checked and the checkpoint loaded; one run at a time holds it; a resume continues the log without
duplicate steps and refuses a config that changes what the checkpoint means; SIGTERM and Ctrl-C save and exit
0; a SIGKILL at any moment leaves the last checkpoint loadable; a non-finite step changes nothing and is logged.
N torchrun ranks train what 1 process trains: the global batch is fixed, each group's noise a function of
(seed, step, prompt).
"""
import contextlib
import dataclasses
import json
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
import pixel_reward
import runtime
from config import Config, UsageError


# ---------------------------------------------------------------------------------------------
# The world model: model_ar.py or model_diffusion.py behind the same calls (docs/conventions.md §5.2):
# build(cfg), rollout(model, x0, tokens, cfg, generators) -> Rollout, log_probs(model, ro, cfg) -> (log-probs
# [B, L], KL to π_ref [B, L] or None), reference(ref, ro, cfg), sample_frames(...), roundtrip(model, frames).
# A Rollout carries frames, logp, mask and frame_of (the frame of each entry); model.action_offset is where the
# action token ids start.
# ---------------------------------------------------------------------------------------------
def world_model(cfg: Config):
    """(the world model's module, the model built from cfg): the one place the paradigm is chosen."""
    api = {"ar": model_ar, "nfd": model_diffusion}[cfg.run.world_model]
    return api, api.build(cfg)


def slice_rollout(ro, i: int, j: int):
    """Rows i..j of a rollout. Per-sample fields are at least 2-D and batch-first; 1-D ones (the
    diffusion time grid and coefficients, frame_of) are shared by all rows."""
    rows = {f.name: getattr(ro, f.name) for f in dataclasses.fields(ro)}
    return dataclasses.replace(ro, **{k: v[i:j] for k, v in rows.items() if torch.is_tensor(v) and v.ndim >= 2})


@torch.no_grad()
def replay(fn, model, ro, cfg: Config) -> torch.Tensor:
    """fn(model, rows, cfg) over the rollout, rl.micro_batch rows per forward, no gradient: api.reference, say."""
    mb = cfg.rl.micro_batch
    parts = [fn(model, slice_rollout(ro, i, i + mb), cfg) for i in range(0, len(ro.mask), mb)]
    return torch.cat([p[0] if isinstance(p, tuple) else p for p in parts])


# ---------------------------------------------------------------------------------------------
# The reward seam: reward(frames uint8 [B, 16, H, W, 3], batch) -> one reward per generated frame [B, 15]
# (a clip's reward is their mean). The inverse reward (Eq. 3, idm.inverse_reward) or, as the baseline,
# RLVR-World's pixel reward (Eq. 6, pixel_reward.py).
# ---------------------------------------------------------------------------------------------
def reward_fn(cfg: Config, device, clips: list):
    """The run's reward function; `clips` are the prompts, whose label frequencies rl.granularity "balanced"
    weighs by (data.label_weights)."""
    if cfg.rl.reward == "pixel":
        lpips_fn = pixel_reward.load_lpips(cfg.eval.lpips_backbone)[0]
        return lambda frames, batch: pixel_reward.pixel_reward(frames, batch["frames"], lpips_fn)
    idms = [net.to(device) for net in idm_lib.load_reward_idms(cfg.rl.reward_idm, cfg.rl.vpt_idm)]
    weights = data.label_weights(clips) if cfg.rl.granularity == "balanced" else None
    return lambda frames, batch: idm_lib.inverse_reward(idms, frames, batch["groups"], cfg.rl.granularity,
                                                        cfg.rl.reading, weights)


# ---------------------------------------------------------------------------------------------
# Distributed: each GRPO group lives on one rank. Rank r holds prompts r, r + world, ... of the global batch
# (data.batches), all G rollouts of each, so Eq. 1 needs no communication; rewards are still gathered so that
# every rank logs, checks and normalises over the whole global batch. Gradients are averaged by hand
# (runtime.average_gradients), so the world model's calls always see the plain module.
# ---------------------------------------------------------------------------------------------
def group_generators(seed: int, step: int, prompts: int, rank: int, world: int, device) -> list:
    """One generator per group on this rank, seeded by (run seed, step, global prompt index): every
    group draws the same noise whatever the world size, and a resumed run what an unbroken one did."""
    return [torch.Generator(device=device).manual_seed(int(np.random.SeedSequence([seed, step, p])
                                                           .generate_state(1)[0]))
            for p in range(rank, prompts, world)]


def gather_rewards(r: torch.Tensor, world: int, group_size: int) -> torch.Tensor:
    """This rank's rewards [P/world * G, 15] -> the global batch's [P * G, 15], in prompt order 0..P-1."""
    if world == 1:
        return r
    parts = [torch.empty_like(r) for _ in range(world)]
    dist.all_gather(parts, r)
    return torch.stack(parts).view(world, -1, group_size, r.shape[1]).transpose(0, 1).reshape(-1, r.shape[1])


def local_rows(x: torch.Tensor, rank: int, world: int, group_size: int) -> torch.Tensor:
    """The inverse of gather_rewards: this rank's rows [P/world * G, *] of a global [P * G, *]."""
    rest = x.shape[1:]
    return x.view(-1, world, group_size, *rest)[:, rank].reshape(-1, *rest)


# ---------------------------------------------------------------------------------------------
# One GRPO iteration (§4): rollout and inverse reward, group advantages (Eq. 1), clipped policy loss (Eq. 2).
# ---------------------------------------------------------------------------------------------
def collect(api, model, ref, batch: dict, reward, cfg: Config, generators, world: int):
    """Roll out G clips per prompt (batch rows are groups of G) and score every generated frame (Eq. 3 or 6);
    if β > 0, replay the rollouts under the frozen reference π_ref. -> (Rollout, rewards of the global batch
    [P * G, 15])."""
    model.eval()
    ro = api.rollout(model, batch["frames"][:, 0], batch["tokens"], cfg, generators)
    r = gather_rewards(reward(ro.frames, batch).float(), world, cfg.rl.group_size)     # [P * G, 15]
    if ref is not None:
        ro = dataclasses.replace(ro, ref=replay(api.reference, ref, ro, cfg))
    return ro, r


def advantages(r: torch.Tensor, ro, cfg: Config, rank: int, world: int) -> tuple[torch.Tensor | None, dict]:
    """The advantage seam, Eq. 1 on the global batch's per-frame rewards r [P * G, 15], then this rank's rows.
    rl.credit "clip" (the paper): one advantage per rollout from its clip reward, [P/world * G]. "frame": Eq. 1
    on each frame's reward, and frame t's entries earn A_t + A_{t+1}, the rewards its pixels decide
    (grpo.frame_credit), [P/world * G, L]. (None, {}) when a reward is not finite: the step is skipped."""
    if not torch.isfinite(r).all():
        return None, {}
    per_frame = cfg.rl.credit == "frame"
    adv, stats = grpo.group_advantages(r if per_frame else r.mean(1), cfg.rl.group_size, cfg.grpo)
    adv = local_rows(adv, rank, world, cfg.rl.group_size)           # [P/world * G(, 15)]
    return (grpo.frame_credit(adv, ro.frame_of) if per_frame else adv), stats


def objective(model, api, part, adv: torch.Tensor, old: torch.Tensor | None, cfg: Config):
    """The objective seam, on one micro-batch: Eq. 2 on its log-probs (rl.objective "grpo", the paper), or
    DiffusionNFT on the forward process of its clean samples ("nft", NFD). `old` is what the batch's first pass
    recorded, θ_old's log-probs or velocities (None on that pass: θ is θ_old). -> (loss, stats, old)."""
    if cfg.rl.objective == "nft":                                     # adv [b], or [b, (F-1)K] for credit "frame"
        v, target = model_diffusion.nft_velocity(model, part)        # [b, F-1, N, C] each
        old = v.detach() if old is None else old
        a = adv if adv.ndim == 1 else adv.view(len(adv), v.shape[1], -1)[:, :, 0]   # [b] or one per frame [b, F-1]
        return (*grpo.nft_loss(v, old, target, a, cfg.grpo, part.ref), old)
    lp, kl = api.log_probs(model, part, cfg)                         # [b, L] each
    old = lp.detach() if old is None else old
    return (*grpo.policy_loss(lp, old, adv, part.mask, cfg.grpo, kl), old)                   # Eq. 2


def backward(model, api, ro, adv: torch.Tensor, old: list, cfg: Config) -> list[tuple[float, dict]]:
    """Backward of Eq. 2 over the rollout in micro-batches of rl.micro_batch rows, each weighted so the
    gradients add up to the whole batch's (for "token" aggregation: over the tokens of every rank). π_old is the
    policy that sampled the batch: the first of its rl.updates passes records its own log-probs (or velocities) into
    `old`, one tensor per micro-batch (the sampler's ro.logp agree to ~1e-5 in fp32, and a replay would cost a
    forward), so its ratio is exactly 1; later passes compare with them and Eq. 2's clip bounds how far they move.
    Returns each micro-batch's (weight, health statistics)."""
    n, mb, world = len(ro.mask), cfg.rl.micro_batch, runtime.rank_world()[1]
    total = runtime.across_ranks([float(ro.mask.sum())], "sum", ro.mask.device)[0] / world   # tokens per rank
    stats = []
    for i in range(0, n, mb):
        part = slice_rollout(ro, i, i + mb)
        first = len(old) == i // mb                                   # the first pass: π_old = π_θ now
        loss, st, now = objective(model, api, part, adv[i:i + mb], None if first else old[i // mb], cfg)
        if first:
            old.append(now)
        weight = grpo.micro_batch_share(part.mask, n, total, cfg.grpo)
        (loss * weight).backward()                                    # a NaN reaches this rank's gradient
        stats.append((float(weight), {**st, "loss": float(loss.detach())}))
    return stats


def update(model, api, opt, params: list, ro, r: torch.Tensor, adv, old: list, cfg: Config,
           device) -> tuple[dict, str | None]:
    """One AdamW step on Eq. 2 (π_old's log-probs in `old`, see backward) unless something is not finite (reward,
    advantage, log-prob, loss or gradient norm, on any rank): then nothing changes, neither the weights nor
    AdamW's moments. Returns the log row's entries and the reason for a skip (None if the step was taken)."""
    checked = {"reward": r, "advantage": adv, "log-prob": ro.logp, "reference": ro.ref}
    why = runtime.first_nonfinite(checked, device)      # the same verdict on every rank (they step in lockstep)
    model.train()
    opt.zero_grad(set_to_none=True)
    if why is None:
        stats = backward(model, api, ro, adv, old, cfg)
        why = runtime.first_nonfinite({"loss": torch.tensor([s["loss"] for _, s in stats])}, device)
    if why is None:
        runtime.average_gradients(params)                             # the global batch's gradient
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.rl.grad_clip)
        why = None if torch.isfinite(norm) else "gradient"
    if why is not None:
        opt.zero_grad(set_to_none=True)
        return {"skipped": f"non-finite {why}"}, why
    opt.step()
    keys = [k for k in ("loss", "clip_frac", "approx_kl", "ratio_mean", "kl_ref", "nft_shift") if k in stats[0][1]]
    local = [sum(w * float(s[k]) for w, s in stats) / sum(w for w, _ in stats) for k in keys]
    world = runtime.rank_world()[1]
    means = [v / world for v in runtime.across_ranks(local, "sum", device)]     # over the global batch
    return {**dict(zip(keys, means)), "grad_norm": float(norm)}, None


# ---------------------------------------------------------------------------------------------
# Evaluation: the paper's protocol on held-out clips (evaluate.py), reward and judge IDMs.
# ---------------------------------------------------------------------------------------------
def evaluate_before(api, model, held, cfg: Config, device, scorers, out: Path, best_by) -> None:
    """Rows gt, recon (the tokenizer's bound), before and, if eval.best_of, best_of (the pick of eval.best_of base
    samples by `best_by`, the inverse reward) into results.json; the before videos kept for the side-by-side video."""
    videos, names = [], ("recon", "before") + (("best_of",) if cfg.eval.best_of else ())
    results = {"gt": evaluate.evaluate_gt(held, cfg.eval, scorers),
               **evaluate.world_model_rows(api, model, held, cfg, names, device, best_by, scorers, videos)}
    torch.save(torch.cat(videos) if videos else torch.empty(0), out / "videos_before.pt")
    (out / "results.json").write_text(json.dumps(results, indent=1))  # last: it marks the rows as complete
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


# ---------------------------------------------------------------------------------------------
# The run folder (docs/conventions.md §6, §7).
# ---------------------------------------------------------------------------------------------
# Fields a resume may change: where and how fast it runs, how often it saves and reports, and how long it runs
# (the cosine schedule is a function of (step, rl.steps), so the remaining steps follow the new length). Any
# other difference changes what the checkpoint means (the learning rate, the reward, the sizes): refused.
RESUMABLE = {"run.out", "run.threads", "run.device", "rl.steps", "rl.save_every", "rl.eval_every",
             "rl.max_bad_steps", "rl.micro_batch"}


def check_run(cfg: Config, world: int, out: Path) -> None:
    """Checked before any work: each GRPO group lives on one rank (its advantages then need no communication),
    the evaluation's reward-IDM column reads with an IDM that gives the reward, and the run folder is a folder."""
    rl = cfg.rl
    if not rl.vpt_idm and cfg.eval.reward_idm not in rl.reward_idm.split(","):
        raise UsageError(f"eval.reward_idm={cfg.eval.reward_idm} is not the IDM that gives the reward "
                         f"(rl.reward_idm={rl.reward_idm}): set both to the same file, or list it in the ensemble")
    if rl.objective == "nft" and (cfg.run.world_model, cfg.grpo.aggregation) != ("nfd", "grpo"):
        raise UsageError(f"rl.objective=nft (a velocity loss, one mean per clip) needs run.world_model=nfd and "
                         f"grpo.aggregation=grpo, got {cfg.run.world_model} and {cfg.grpo.aggregation}")
    if world > rl.prompts or rl.prompts % world:
        raise UsageError(f"rl.prompts={rl.prompts} prompts per step cannot be split over {world} ranks: each GRPO "
                         f"group lives on one rank, so launch a divisor of rl.prompts ranks or change rl.prompts")
    for p in (out, *out.parents):
        if p.exists() and not p.is_dir():
            raise UsageError(f"run.out={out}: {p} is a file, not a folder; choose another --run.out")


def resume(ckpt: Path, out: Path, model, ref, opt, sched, cfg: Config) -> int:
    """The step to continue from: 0 for a new run, else the checkpoint's, after loading it. A checkpoint whose
    config differs from this one beyond RESUMABLE is refused, naming the fields, before anything changes."""
    if not ckpt.exists():
        return 0
    state = runtime.read_checkpoint(str(ckpt), "the run's ckpt.pt")
    runtime.check_checkpoint(state, str(ckpt))
    # fields the checkpoint's version lacked read as their defaults; fields since removed are not compared
    saved = {**dict(config.flatten(config.to_dict(Config()))), **dict(config.flatten(state["config"]))}
    now = dict(config.flatten(config.to_dict(cfg)))
    changed = [f"{k}={saved[k]!r} (now {v!r})" for k, v in now.items() if k not in RESUMABLE and saved[k] != v]
    if changed:
        raise UsageError(f"{ckpt} was saved with {', '.join(changed)}: resuming would mix two runs; rerun with the "
                         f"config it was saved with ({out / 'config.yaml'}) or choose another --run.out")
    if not (out / "results.json").exists():
        raise UsageError(f"{out / 'results.json'} is missing, so the run's before row is lost; "
                         f"start again with another --run.out")
    return runtime.load_checkpoint(state, str(ckpt), model, opt, sched, ref)


# ---------------------------------------------------------------------------------------------
# The loop.
# ---------------------------------------------------------------------------------------------
DEFAULT_CONFIG = Path(__file__).with_name("configs") / "laptop_nfd.yaml"


def main(argv: list[str]) -> None:
    if all(a.startswith("--") for a in argv):                 # no YAML: the embedded NFD default
        argv = [str(DEFAULT_CONFIG), *argv]
    cfg, name = config.parse(Config, argv)
    device, rank, world = runtime.setup(cfg.run)
    out = Path(cfg.run.out or f"out/{name}")
    check_run(cfg, world, out)
    with contextlib.ExitStack() as stack:                      # the folder's lock and the signal handlers
        model = run(cfg, name, out, device, rank, world, stack)
    # Every rank prints this line (not only rank 0): equal hashes show the replicas stayed identical.
    print(f"rank {rank}/{world}: weights sha256 {runtime.fingerprint(model)}", flush=True)
    runtime.teardown()


def run(cfg: Config, name: str, out: Path, device, rank: int, world: int, stack: contextlib.ExitStack):
    """Evaluate the base, train rl.steps GRPO iterations (or what a checkpoint left), evaluate the result;
    -> the trained model."""
    rl, G = cfg.rl, cfg.rl.group_size
    locked = rank == 0 and out.is_dir()                        # before reading a checkpoint another run writes
    if locked:
        runtime.hold(out, stack)
    say = tqdm.write if rank == 0 else (lambda *a, **k: None)
    torch.manual_seed(cfg.run.seed)

    # Data: RL prompts from their own worlds; held-out clips for evaluation from others.
    prompts, skips = data.load_clips(dataclasses.replace(cfg.data, seed=rl.prompt_seed))
    held, _ = data.load_clips(dataclasses.replace(cfg.data, seed=cfg.eval.seed, max_clips=cfg.eval.clips))
    # Models: the policy, its frozen reference (only if β > 0), the reward, the optimizer; then the checkpoint.
    api, model = world_model(cfg)
    model.to(device)
    ref = world_model(cfg)[1].to(device).eval() if cfg.grpo.beta > 0 else None
    reward = reward_fn(cfg, device, prompts)
    scorers = evaluate.load_scorers(cfg.eval) if rank == 0 else None   # metric networks, loaded once
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=rl.lr, weight_decay=rl.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: runtime.lr_factor(s, rl.steps, rl.warmup))
    ckpt = out / "ckpt.pt"
    start = resume(ckpt, out, model, ref, opt, sched, cfg)
    if rank == 0:                                              # only now does the run write to its folder
        if not locked:
            runtime.hold(out, stack)
        (out / "config.yaml").write_text(config.dump(cfg))
        runtime.trim_log(out / "log.jsonl", start)             # drop rows a killed run logged past its checkpoint
    say(f"{name}: {cfg.run.world_model} world model on {device} x {world}, {rl.steps} GRPO steps of {rl.prompts} "
        f"prompts x G {G}, reward {rl.reward}; run folder {out}" + (f", resumed at step {start}" if start else ""))
    say(f"{len(prompts)} prompt clips, {len(held)} held-out clips" + (f"; skipped {dict(skips.counts)}"
                                                                       if skips.counts else ""))
    if rank == 0 and start == 0:
        # the best_of row's pick: the run's reward when it is the inverse one, else one built like it (Eq. 3)
        best_by = None if not cfg.eval.best_of else reward if rl.reward == "idm" else reward_fn(
            dataclasses.replace(cfg, rl=dataclasses.replace(rl, reward="idm")), device, prompts)
        evaluate_before(api, model, held, cfg, device, scorers, out, best_by)

    stop = []                                                  # SIGTERM (pre-emption) or Ctrl-C: save, exit 0
    for s in (signal.SIGTERM, signal.SIGINT):
        stack.callback(signal.signal, s, signal.signal(s, lambda n, _: stop.append(signal.Signals(n).name)))
    batches = data.batches(prompts, rl.prompts, cfg.run.seed, start, rank, world, model.action_offset,
                           cfg.data.camera_tokens)
    log = stack.enter_context(open(out / "log.jsonl", "a")) if rank == 0 else None
    bad = 0
    for step in (bar := tqdm(range(start, rl.steps), desc="rlir", disable=rank > 0)):
        t0 = time.time()
        batch = {k: v.repeat_interleave(G, 0).to(device) for k, v in next(batches).items()}  # groups of G
        if ref is not None and rl.ref_reset and step and step % rl.ref_reset == 0:
            ref.load_state_dict(model.state_dict())            # re-anchor Eq. 2's π_ref to the current policy
        gens = group_generators(cfg.run.seed, step, rl.prompts, rank, world, device)          # one per group
        ro, r = collect(api, model, ref, batch, reward, cfg, gens, world)                    # rollout, Eq. 3
        adv, stats = advantages(r, ro, cfg, rank, world)                                      # Eq. 1
        old = []                                               # log π_old, recorded by the first update
        for _ in range(rl.updates):                            # μ AdamW steps on Eq. 2, one batch of rollouts
            row, why = update(model, api, opt, params, ro, r, adv, old, cfg, device)
            if why:
                break
        sched.step()                                           # the LR stays a function of the step
        bad = bad + 1 if why else 0
        if why:
            say(f"step {step + 1}: skipped the update (non-finite {why}), {bad} in a row")
        row = {"step": step + 1, **stats, **row, "lr": sched.get_last_lr()[0], "seconds": round(time.time() - t0, 2)}
        stopping = runtime.across_ranks([float(bool(stop))], "max", device)[0] > 0
        if rank == 0:
            log.write(json.dumps(row) + "\n")
            log.flush()
            bar.set_postfix(reward=round(row.get("reward_mean", float("nan")), 3))
            done = step + 1 == rl.steps
            if rl.eval_every and (step + 1) % rl.eval_every == 0 and not done:
                rows = evaluate.world_model_rows(api, model, held, cfg, (f"step {step + 1}",), device, None, scorers)
                bar.write(json.dumps(rows[f"step {step + 1}"]))
            if (step + 1) % rl.save_every == 0 or done or stopping:
                runtime.save_checkpoint(ckpt, model, opt, sched, step + 1, config.to_dict(cfg),
                                        ref if rl.ref_reset else None)
        if bad >= rl.max_bad_steps:
            raise UsageError(f"stopping at step {step + 1}: {bad} consecutive skipped steps (last: non-finite {why}; "
                             f"rl.max_bad_steps={rl.max_bad_steps}); fix the cause and rerun to resume from {ckpt}")
        if stopping:
            say(f"{(stop or ['stop'])[0]}: saved {ckpt} at step {step + 1}; rerun the same command to resume")
            return model
    if rank == 0:
        evaluate_after(api, model, held, cfg, device, scorers, out)
    return model

if __name__ == "__main__":
    runtime.cli(main)
