"""Throughput and efficiency of the pieces RLIR spends its time in, as one table (or --json).

    python bench.py                        # embedded configs on this machine (CPU: a few minutes)
    python bench.py --json > bench.json    # the same numbers as JSON
    python bench.py --ar.hidden=1024 ...   # any Config override; paper scale wants a GPU

Every figure is measured in this run: rollout frames/s of both world models, the KV-cache speedup
of autoregressive sampling over recomputing the whole prefix per token, one batched group of G
rollouts over G sequential ones, the batched block-causal replay of the diffusion model over a loop
over frames, the achieved FLOP/s of a GRPO update against this machine's measured matmul peak (MFU),
and peak memory. Models are randomly initialised: speed does not depend on the weights.
"""
import json
import resource
import sys
import time

import torch

import config
import minicraft
import model_ar
import model_diffusion
from config import Config


def timed(fn, repeat: int = 1) -> float:
    """Best wall time of `repeat` calls, in seconds (after one warm-up call)."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def matmul_peak(n: int = 1024) -> float:
    """FLOP/s of a float32 n x n matmul on this machine, the denominator of MFU."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n ** 3 / timed(lambda: a @ b, repeat=5)


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
        ctx = model_diffusion.context_kv(model, ro.latents[:, :f], torch.zeros(B, f), act[:, :f])
        x = ro.traj[:, f - 1:f, k]                           # [B, 1, N, C]
        v, _ = model(x, ro.ts[k].expand(B, 1), act[:, f:f + 1], torch.tensor([f]), ctx=ctx)
        out.append(v)
    return torch.cat(out, 1)                                 # [B, F-1, N, C]


def main(argv: list[str]) -> dict:
    as_json = "--json" in argv
    cfg, _ = config.parse(Config, [a for a in argv if a != "--json"])
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    torch.manual_seed(0)
    res, G = {}, cfg.rl.group_size
    res["minicraft_frames_per_s"] = minicraft.bench(128)

    # Autoregressive world model: rollout speed, KV cache vs recompute, batched group vs sequential.
    ar = model_ar.WorldModel(cfg.ar, cfg.vq).eval()
    x0 = torch.randint(0, 256, (G, *cfg.vq.frame_hw, 3), dtype=torch.uint8)
    tokens = torch.full((G, cfg.ar.frames, 11), cfg.ar.n_codes + 66)      # <null_act> everywhere
    gen = torch.Generator().manual_seed(0)
    t_group = timed(lambda: model_ar.rollout(ar, x0, tokens, generator=gen))
    res["ar_rollout_frames_per_s"] = G * (cfg.ar.frames - 1) / t_group
    t_seq = timed(lambda: [model_ar.rollout(ar, x0[i:i + 1], tokens[i:i + 1], generator=gen)
                           for i in range(G)])
    res["ar_batched_group_speedup"] = t_seq / t_group
    short = min(4, cfg.ar.frames)                             # recompute is O(L^2): 4 frames
    small = model_ar.WorldModel(config.build(type(cfg.ar), {**vars(cfg.ar), "frames": short}),
                                cfg.vq).eval()
    with torch.no_grad():
        t_cache = timed(lambda: model_ar.rollout(small, x0[:1], tokens[:1, :short], generator=gen))
        t_full = timed(lambda: ar_full_recompute(small, x0[:1], tokens[:1, :short], short))
    res["ar_kv_cache_speedup"] = t_full / t_cache

    # GRPO update on the AR model: forward + backward of the replayed log-probs, FLOPs ~ 6 N L.
    ro = model_ar.rollout(ar, x0, tokens, generator=gen)
    n_params = sum(p.numel() for p in ar.transformer.parameters())

    def update():
        ar.zero_grad(set_to_none=True)
        (model_ar.log_probs(ar, ro) * ro.mask).sum().backward()

    t_upd = timed(update)
    flops = 6 * n_params * ro.tokens.numel()
    peak = matmul_peak()
    res.update(grpo_update_tokens_per_s=ro.tokens.numel() / t_upd, grpo_update_flops=flops / t_upd,
               matmul_peak_flops=peak, grpo_update_mfu=flops / t_upd / peak)

    # Diffusion world model: rollout speed and batched block-causal replay vs a loop over frames.
    nfd = model_diffusion.NFD(cfg.nfd, cfg.ae).eval()
    nfd_tokens = torch.full((G, cfg.nfd.frames, 11), 8192 + 66)
    t_nfd = timed(lambda: model_diffusion.rollout(nfd, x0, nfd_tokens, cfg.sde, gen, G))
    res["nfd_rollout_frames_per_s"] = G * (cfg.nfd.frames - 1) / t_nfd
    ro = model_diffusion.rollout(nfd, x0, nfd_tokens, cfg.sde, gen, G)
    n = ro.traj.shape[1]
    act = model_diffusion.actions_multi_hot(ro.actions)
    with torch.no_grad():
        def batched():
            ctx = model_diffusion.context_kv(nfd, ro.latents[:, :n], torch.zeros(G, n), act[:, :n])
            return model_diffusion.noisy_velocity(nfd, ctx, ro.traj[:, :, 0], ro.ts[0].expand(G, n),
                                                  act[:, 1:])
        assert torch.allclose(batched(), nfd_per_frame_replay(nfd, ro, 0), atol=1e-4)
        res["nfd_batched_replay_speedup"] = (timed(lambda: nfd_per_frame_replay(nfd, ro, 0))
                                             / timed(batched))
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    res["threads"] = torch.get_num_threads()
    if as_json:
        print(json.dumps(res, indent=1))
    else:
        print("| measure | value |\n|---|---|")
        for k, v in res.items():
            print(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |")
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
