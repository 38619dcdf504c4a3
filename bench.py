"""Throughput and efficiency of the pieces RLIR spends its time in, as one table (or --json).

    python bench.py                        # embedded configs on this machine (CPU: a few minutes)
    python bench.py --json > bench.json    # the same numbers as JSON
    python bench.py configs/nfd_310m.yaml --run.device=cuda   # paper scale, random weights, one GPU
    python bench.py configs/minicraft_ar.yaml --gradient-noise    # GRPO signal at the shipped base
    python bench.py configs/laptop_ar.yaml --step   # one GRPO step as train.py runs it, phase by phase

Every figure is measured in this run: rollout frames/s of both world models, the KV-cache speedup
of autoregressive sampling over recomputing the whole prefix per token, one batched group of G
rollouts over G sequential ones, the batched block-causal replay of the diffusion model over a loop
over frames, the achieved FLOP/s of a GRPO update against this machine's measured matmul peak (MFU),
and peak memory (process RSS; on a GPU also the peak of allocated GPU memory). Models are randomly
initialised (no init_from is read), so paper-scale configs run wherever a GPU is: speed does not
depend on the weights. The device is run.device ("auto": CUDA when present); updates run in fp32,
as train.py's do, and MFU is against a fp32 matmul measured on the same device.

--gradient-noise measures instead how much signal one GRPO step carries at the config's shipped
base model: the cosine between the policy gradients (Eq. 2 at ratio 1) of independent rollout
batches of rl.prompts × rl.group_size, for one advantage per clip and one per frame (rl.credit).
Near 0 means a step's gradient is mostly noise. noise_scale_* is the gradient noise scale (McCandlish
et al. 2018): the rollouts per step at which one step's signal equals its noise. Beside them, what that
signal points at: the within-group correlation of the reward with the judge IDM's score of the same
rollouts (the part of Eq. 1's advantage the judge agrees with) and the judge's gain when the reward picks
one rollout per group (best-of-G).

--step times the step users run, with train.py's own functions on the config's own models (init_from is read):
rollout and reward (train.collect, its reward timed apart), reference replay (train.replay of the frozen π_ref, as
collect runs it when β > 0) and update (train.advantages, then rl.updates × train.update: replay forward, backward,
AdamW). Each phase is reported in seconds, as its share of the step and as achieved FLOP/s against the matmul peak
measured in the same run; FLOPs are counted by torch.utils.flop_counter over one extra step (matmuls, convolutions
and attention, the tokenizer's decoder and the IDMs included). Each figure is the median of 3 steps of
rl.prompts × rl.group_size rollouts after one warm-up step (docs/2026-12-04-rollout-speed.md §1).
"""
import dataclasses
import json
import resource
import statistics
import time

import torch
import torch.utils.flop_counter as flop_counter
from tqdm import tqdm

import config
import data
import idm as idm_lib
import minicraft
import model_ar
import model_diffusion
import runtime
import train
from config import Config


def sync() -> None:
    """Wait for queued GPU work, so that a timer measures it (no-op on CPU)."""
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timed(fn, repeat: int = 1) -> float:
    """Best wall time of `repeat` calls, in seconds (after one warm-up call)."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t)
    return best


def matmul_peak(device: torch.device) -> float:
    """FLOP/s of a float32 n x n matmul on `device` (n = 1024 on CPU, 8192 on GPU), the MFU denominator."""
    n = 8192 if device.type == "cuda" else 1024
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    return 2 * n ** 3 / timed(lambda: a @ b, repeat=5)


def update_mfu(n_params: int, tokens: int, seconds: float, peak_flops: float) -> float:
    """Model FLOPs utilisation of a training update: 6·N FLOPs per token (2·N forward, 4·N backward; Kaplan
    et al. 2020) for `tokens` tokens in `seconds`, as a fraction of `peak_flops` (FLOP/s)."""
    return 6 * n_params * tokens / seconds / peak_flops


def ar_full_recompute(model, x0, tokens, frames: int) -> None:
    """Reference sampler without a KV cache: every new token re-runs the whole prefix."""
    cfg, n = model.cfg, model.cfg.image_tokens
    seq = [model.tokenizer.encode(x0), tokens[:, 1]]         # img_0, act(a_1)
    for t in range(1, frames):
        for _ in range(n):
            logits = model.transformer(torch.cat(seq, 1))[:, -1, :cfg.n_codes]
            seq.append(logits.argmax(-1, keepdim=True))
        if t < frames - 1:
            seq.append(tokens[:, t + 1])


def nfd_per_frame_replay(model, ro, k: int) -> torch.Tensor:
    """Reference replay of step k: one forward per generated frame over its own clean context."""
    act = model_diffusion.actions_multi_hot(ro.actions)      # [B, F, A]
    B, n = ro.traj.shape[:2]
    out = []
    for f in range(1, n + 1):
        ctx = model_diffusion.context_kv(model, ro.latents[:, :f], ro.ts.new_zeros(B, f), act[:, :f])
        x = ro.traj[:, f - 1:f, k]                           # [B, 1, N, C]
        v, _ = model(x, ro.ts[k].expand(B, 1), act[:, f:f + 1], torch.tensor([f], device=x.device), ctx=ctx)
        out.append(v)
    return torch.cat(out, 1)                                 # [B, F-1, N, C]


def noise_scale(grads: list[torch.Tensor], n: int) -> float:
    """Gradient noise scale tr(Σ) / |E g|² (McCandlish et al. 2018, App. A) from gradients of
    independent batches of n samples each: the batch size at which one step's noise equals its
    signal. g_i · g_j (i ≠ j) estimates |E g|² without bias, and |g_i|² − |E g|² estimates tr(Σ) / n.
    inf when the estimated signal is not positive (none measured)."""
    k = len(grads)
    signal = sum(float(grads[i] @ grads[j]) for i in range(k) for j in range(i + 1, k)) / (k * (k - 1) / 2)
    noise = n * (sum(float(g @ g) for g in grads) / k - signal)
    return noise / signal if signal > 0 else float("inf")


def judge_scores(judge, frames: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """The judge IDM's share of the 7 judged groups it reads right, per rollout [B], over frames 1..15."""
    with torch.no_grad():
        pred = idm_lib.predict_groups(judge, frames)                      # [B, 16, 9]
    return (pred == groups.to(pred.device))[:, 1:, :7].float().mean((1, 2))   # [B]


def gradient_cosines(cfg: Config, seeds: tuple = (0, 1, 2, 3)) -> dict:
    """Pairwise cosines of GRPO gradients of one batch per seed (its own prompts and rollout noise;
    equal seeds give equal batches) at the config's base model, for rl.credit "clip" and "frame";
    and how much the clip reward varies within a group (what GRPO learns from) and between groups.
    Each batch goes through train.py's own stages: collect, then the backward of update (ratio 1). At the base
    model θ = π_ref, where Eq. 2's KL term has zero gradient, so it is left out (grpo.beta = 0)."""
    cfg = dataclasses.replace(cfg, grpo=dataclasses.replace(cfg.grpo, beta=0.0))
    device = runtime.pick_device(cfg.run.device)
    api, model = train.world_model(cfg)
    model.to(device)
    prompts, _ = data.load_clips(dataclasses.replace(cfg.data, seed=cfg.rl.prompt_seed))
    reward = train.reward_fn(cfg, device, prompts)
    params = [p for p in model.parameters() if p.requires_grad]
    judge = idm_lib.load(cfg.eval.judge_idm, "eval.judge_idm").to(device)
    G, grads = cfg.rl.group_size, {"clip": [], "frame": []}
    within, between, rewards, judged = [], [], [], []
    for b in tqdm(seeds, desc=f"gradient noise, batches of {cfg.rl.prompts * G}"):
        batch = next(data.batches(prompts, cfg.rl.prompts, cfg.run.seed + b, 0, 0, 1, model.action_offset,
                                   cfg.data.camera_tokens))
        batch = {k: v.repeat_interleave(G, 0).to(device) for k, v in batch.items()}
        gens = train.group_generators(cfg.run.seed + 100 * b, 0, cfg.rl.prompts, 0, 1, device)
        ro, r = train.collect(api, model, None, batch, reward, cfg, gens, 1)   # rollout, Eq. 3
        groups = r.mean(1).view(-1, G)                                      # [P, G] clip rewards
        rewards.append(groups)
        judged.append(judge_scores(judge, ro.frames, batch["groups"]).view(-1, G))   # [P, G]
        within.append(float(groups.std(1).mean()))
        between.append(float(groups.mean(1).std()) if len(groups) > 1 else float("nan"))
        model.train()
        for credit in grads:
            as_credit = dataclasses.replace(cfg, rl=dataclasses.replace(cfg.rl, credit=credit))
            adv, _ = train.advantages(r, ro, as_credit, 0, 1)                # Eq. 1
            model.zero_grad(set_to_none=True)
            train.backward(model, api, ro, adv, [], as_credit)              # Eq. 2 at ratio 1
            grads[credit].append(torch.cat([p.grad.flatten() for p in params]))
    res, n = {}, cfg.rl.prompts * G
    for credit, gs in grads.items():
        cos = [float(torch.nn.functional.cosine_similarity(gs[i], gs[j], 0))
               for i in range(len(gs)) for j in range(i + 1, len(gs))]
        res.update({f"grad_cos_{credit}_mean": sum(cos) / len(cos), f"grad_cos_{credit}_max": max(cos),
                    f"noise_scale_{credit}": noise_scale(gs, n)})
    r, j = torch.cat(rewards), torch.cat(judged)                          # [P * batches, G]
    rc, jc = r - r.mean(1, keepdim=True), j - j.mean(1, keepdim=True)      # what Eq. 1 keeps of each
    spread = float(rc.norm() * jc.norm())                                 # 0: no spread, no correlation
    res["reward_judge_corr_within_group"] = float((rc * jc).sum()) / spread if spread > 0 else float("nan")
    res["judge_best_of_group_gain"] = float(j.gather(1, r.argmax(1, keepdim=True)).mean() - j.mean())
    res["reward_std_within_group"] = sum(within) / len(within)
    res["reward_std_between_groups"] = sum(between) / len(between)
    res["rollouts_per_batch"] = n
    return res


# ---------------------------------------------------------------------------------------------
# --step: one GRPO iteration of train.py (§5.1), phase by phase.
# ---------------------------------------------------------------------------------------------
PHASES = ("rollout", "reward", "reference", "update")


def cpu_attention_flops(q, k, v, *_, **__) -> int:
    """FLOPs of the CPU flash-attention kernel, which torch.utils.flop_counter leaves uncounted: its formula for
    the other attention kernels, 4·b·h·s_q·s_k·d, with q [b, h, s_q, d] and k, v [b, kv, s_k, d] (kv ≤ h)."""
    return flop_counter.sdpa_flop_count(q, (q[0], q[1], *k[2:]), (q[0], q[1], *v[2:]))


def cpu_attention_backward_flops(grad, q, k, v, *_, **__) -> int:
    """The same kernel's backward: the counter's formula for the others (scores recomputed, four products)."""
    return flop_counter.sdpa_backward_flop_count(grad, q, k, v)


def count_flops() -> flop_counter.FlopCounterMode:
    """A FLOP counter of matmuls, convolutions and attention, the CPU attention kernels included."""
    aten = torch.ops.aten
    return flop_counter.FlopCounterMode(display=False, custom_mapping={
        aten._scaled_dot_product_flash_attention_for_cpu: cpu_attention_flops,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: cpu_attention_backward_flops})


def step_phases(cfg: Config, steps: int = 3) -> dict:
    """Seconds (median of `steps` steps after one warm-up step), share of the step and achieved FLOP/s (against
    matmul_peak, FLOPs counted over one more step) of each phase of train.py's GRPO iteration, and the step's
    rollouts per second. The phases are train.py's functions: collect (its reward timed apart), replay of π_ref
    as collect runs it when β > 0, advantages and rl.updates × update."""
    device = runtime.pick_device(cfg.run.device)
    torch.manual_seed(cfg.run.seed)
    api, model = train.world_model(cfg)
    model.to(device)
    ref = train.world_model(cfg)[1].to(device).eval() if cfg.grpo.beta > 0 else None
    prompts, _ = data.load_clips(dataclasses.replace(cfg.data, seed=cfg.rl.prompt_seed))
    scorer = train.reward_fn(cfg, device, prompts)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.rl.lr, weight_decay=cfg.rl.weight_decay)
    batches = data.batches(prompts, cfg.rl.prompts, cfg.run.seed, 0, 0, 1, model.action_offset,
                           cfg.data.camera_tokens)
    seconds, flops, counter = {}, {}, []                      # per phase of the current step; [FlopCounterMode]

    def timed_phase(name: str, fn):
        """fn, adding its wall time to seconds[name] and the FLOPs it runs (when counting) to flops[name]."""
        def run(*args):
            sync()
            t, f = time.perf_counter(), counter[0].get_total_flops() if counter else 0
            out = fn(*args)
            sync()
            seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - t
            flops[name] = flops.get(name, 0) + (counter[0].get_total_flops() - f if counter else 0)
            return out
        return run

    def learn(ro, r):                                         # the update phase: Eq. 1, then Eq. 2's AdamW steps
        adv, _ = train.advantages(r, ro, cfg, 0, 1)
        old = []
        for _ in range(cfg.rl.updates):
            train.update(model, api, opt, params, ro, r, adv, old, cfg, device)

    def one_step(step: int) -> tuple[dict, dict]:
        seconds.clear(), flops.clear()
        batch = {k: v.repeat_interleave(cfg.rl.group_size, 0).to(device) for k, v in next(batches).items()}
        gens = train.group_generators(cfg.run.seed, step, cfg.rl.prompts, 0, 1, device)
        ro, r = timed_phase("collect", train.collect)(api, model, None, batch, timed_phase("reward", scorer), cfg,
                                                      gens, 1)
        if ref is not None:                                   # what collect runs when β > 0
            ro = dataclasses.replace(ro, ref=timed_phase("reference", train.replay)(api.reference, ref, ro, cfg))
        timed_phase("update", learn)(ro, r)
        return by_phase(seconds), by_phase(flops)

    def by_phase(d: dict) -> dict:                           # the rollout is collect without its reward
        return {"rollout": d["collect"] - d["reward"], "reward": d["reward"], "reference": d.get("reference", 0),
                "update": d["update"]}

    one_step(0)                                               # warm-up: allocator, kernels, caches
    with count_flops() as mode:
        counter.append(mode)
        step_flops = one_step(1)[1]
    counter.clear()
    times = [one_step(2 + i)[0] for i in tqdm(range(steps), desc=f"{cfg.run.world_model} GRPO steps")]
    med = {p: statistics.median(t[p] for t in times) for p in PHASES}
    total, peak = sum(med.values()), matmul_peak(device)
    res = {"world_model": cfg.run.world_model, "rollouts_per_step": cfg.rl.prompts * cfg.rl.group_size}
    for p in PHASES:
        res.update({f"{p}_s": med[p], f"{p}_share": med[p] / total,
                    f"{p}_flops_per_s": step_flops[p] / med[p] if med[p] else 0.0,
                    f"{p}_of_peak": step_flops[p] / med[p] / peak if med[p] else 0.0})
    res.update(step_s=total, rollouts_per_s=res["rollouts_per_step"] / total, matmul_peak_flops=peak,
               steps=steps, threads=torch.get_num_threads())
    return res


def main(argv: list[str]) -> dict:
    as_json, noise, step = ("--json" in argv, "--gradient-noise" in argv, "--step" in argv)
    cfg, _ = config.parse(Config, [a for a in argv if a not in ("--json", "--gradient-noise", "--step")])
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    if noise:
        return report(gradient_cosines(cfg), as_json)
    if step:
        return report(step_phases(cfg), as_json)
    torch.manual_seed(0)
    device = runtime.pick_device(cfg.run.device)
    res, G = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}, cfg.rl.group_size
    res["minicraft_frames_per_s"] = minicraft.bench(128)

    # Autoregressive world model: rollout speed, KV cache vs recompute, batched group vs sequential.
    ar = model_ar.WorldModel(cfg.ar, cfg.vq).to(device).eval()
    x0 = torch.randint(0, 256, (G, *cfg.vq.frame_hw, 3), dtype=torch.uint8, device=device)
    null = data.MINEWORLD_ACTION_VOCAB["<null_act>"]
    tokens = torch.full((G, cfg.ar.frames, 11), ar.action_offset + null, device=device)   # <null_act> everywhere
    gen = torch.Generator(device=device).manual_seed(0)
    t_group = timed(lambda: model_ar.rollout(ar, x0, tokens, cfg, gen))
    res["ar_rollout_frames_per_s"] = G * (cfg.ar.frames - 1) / t_group
    t_seq = timed(lambda: [model_ar.rollout(ar, x0[i:i + 1], tokens[i:i + 1], cfg, gen) for i in range(G)])
    res["ar_batched_group_speedup"] = t_seq / t_group
    short = min(4, cfg.ar.frames)                             # recompute is O(L^2): 4 frames
    small = model_ar.WorldModel(config.build(type(cfg.ar), {**vars(cfg.ar), "frames": short}),
                                cfg.vq).to(device).eval()
    with torch.no_grad():
        t_cache = timed(lambda: model_ar.rollout(small, x0[:1], tokens[:1, :short], cfg, gen))
        t_full = timed(lambda: ar_full_recompute(small, x0[:1], tokens[:1, :short], short))
    res["ar_kv_cache_speedup"] = t_full / t_cache

    # GRPO update on the AR model: forward + backward of the replayed log-probs of one micro-batch
    # (rl.micro_batch rollouts, as train.py does), FLOPs ~ 6 N L.
    ro = train.slice_rollout(model_ar.rollout(ar, x0, tokens, cfg, gen), 0, cfg.rl.micro_batch)
    n_params = sum(p.numel() for p in ar.transformer.parameters())

    def update():
        ar.zero_grad(set_to_none=True)
        (model_ar.log_probs(ar, ro, cfg)[0] * ro.mask).sum().backward()

    t_upd = timed(update)
    peak = matmul_peak(device)
    res.update(grpo_update_tokens_per_s=ro.tokens.numel() / t_upd, matmul_peak_flops=peak,
               grpo_update_mfu=update_mfu(n_params, ro.tokens.numel(), t_upd, peak))

    # Diffusion world model: rollout speed and batched block-causal replay vs a loop over frames.
    nfd = model_diffusion.NFD(cfg.nfd, cfg.ae).to(device).eval()
    nfd_tokens = torch.full((G, cfg.nfd.frames, 11), nfd.action_offset + null, device=device)
    t_nfd = timed(lambda: model_diffusion.rollout(nfd, x0, nfd_tokens, cfg, gen))
    res["nfd_rollout_frames_per_s"] = G * (cfg.nfd.frames - 1) / t_nfd
    ro = model_diffusion.rollout(nfd, x0, nfd_tokens, cfg, gen)
    n = ro.traj.shape[1]
    act = model_diffusion.actions_multi_hot(ro.actions)
    with torch.no_grad():
        def batched():
            ctx = model_diffusion.context_kv(nfd, ro.latents[:, :n], ro.ts.new_zeros(G, n), act[:, :n])
            return model_diffusion.noisy_velocity(nfd, ctx, ro.traj[:, :, 0], ro.ts[0].expand(G, n),
                                                  act[:, 1:])
        assert torch.allclose(batched(), nfd_per_frame_replay(nfd, ro, 0), atol=1e-4)
        res["nfd_batched_replay_speedup"] = (timed(lambda: nfd_per_frame_replay(nfd, ro, 0))
                                             / timed(batched))
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device.type == "cuda":
        res["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
    res["threads"] = torch.get_num_threads()
    return report(res, as_json)


def report(res: dict, as_json: bool) -> dict:
    if as_json:
        print(json.dumps(res, indent=1))
    else:
        print("| measure | value |\n|---|---|")
        for k, v in res.items():
            print(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |")
    return res


if __name__ == "__main__":
    runtime.cli(main)
