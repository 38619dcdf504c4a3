"""A pathwise inverse reward hacks the reward IDM: ascend the reward IDM's probability of the given actions with
respect to one frame's NFD latent, through the frozen decoder, and watch the judge IDM.

    python docs/probes/latent_ascent.py configs/laptop_nfd.yaml

For 32 prompt clips and frames t = 3, 8, 12: frame t is sampled by train.py's frame-level branch (the other
frames are the ground truth through the autoencoder), then its latent takes 40 Adam steps (lr 0.03) on the reward
IDM's mean probability of the 9 given groups at frames t and t+1. Printed: both IDMs' share of the 9 groups read
right and the share of frames with all 7 judged groups right, at t and t+1.
"""
import dataclasses
import sys
from pathlib import Path

import torch
from einops import rearrange

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import config, data, idm as idm_lib, train  # noqa: E401,E402

# independent initial noise per clip (sde.same_noise shares it within a GRPO group; here each clip is alone)
cfg = config.parse(config.Config, [sys.argv[1], "--run.threads=2", "--sde.same_noise=false"])[0]
torch.set_num_threads(2)
api, model = train.world_model(cfg)
judge, reward = idm_lib.load(cfg.eval.judge_idm, "judge"), idm_lib.load(cfg.rl.reward_idm, "reward")
for p in [*model.parameters(), *judge.parameters(), *reward.parameters()]:
    p.requires_grad_(False)
to_net_input = idm_lib.to_net_input                                    # let float frames (with a gradient) in
idm_lib.to_net_input = lambda f, size: f if f.dtype != torch.uint8 else to_net_input(f, size)
clips, _ = data.load_clips(dataclasses.replace(cfg.data, seed=cfg.rl.prompt_seed, max_clips=32))
batch = data.collate(clips, model.action_offset, cfg.data.camera_tokens)
B, col = len(clips), {n: i for i, n in enumerate(data.VPT_BUTTONS)}


def given_action_prob(out, groups):                                     # [B, 16]: mean p(given group) of 9
    p = out["buttons"].exp()[..., 1]                                    # [B, 16, 20] p(pressed)
    probs = []
    for a, b in data.GROUP_PAIRS:
        pa, pb = p[..., col[a]], p[..., col[b]]
        probs.append(torch.stack([1 - pa * (1 - pb) - pb * (1 - pa), pa * (1 - pb), pb * (1 - pa)], -1))
    probs += [torch.stack([1 - p[..., col[n]], p[..., col[n]]], -1) for n in data.GROUP_BINARY]
    probs += [out["camera"].exp()[..., 0, :], out["camera"].exp()[..., 1, :]]
    return torch.stack([q.gather(-1, groups[..., i:i + 1])[..., 0] for i, q in enumerate(probs)], -1).mean(-1)


def reads(net, frames, t):
    with torch.no_grad():
        hit = idm_lib.predict_groups(net, frames)[:, t:t + 2] == batch["groups"][:, t:t + 2]
    return round(float(hit.float().mean()), 3), round(float(hit[..., :7].all(-1).float().mean()), 3)


latents = model.ae.encode(batch["frames"].flatten(0, 1)).float().view(B, 16, model.n_tok, -1)  # [B, 16, N, C]
for t in (3, 8, 12):
    ro = api.branch(model, batch["frames"], batch["tokens"], t, cfg, torch.Generator().manual_seed(t))
    lat = latents.clone()
    lat[:, t] = ro.latents[:, t]
    z = lat[:, t].clone().requires_grad_(True)
    opt = torch.optim.Adam([z], lr=0.03)
    for it in range(41):
        if it % 20 == 0:
            with torch.no_grad():
                now = torch.cat([lat[:, :t], z[:, None].detach(), lat[:, t + 1:]], 1)
                shown = model.ae.decode(now.flatten(0, 1)).view(batch["frames"].shape)
            print(f"t {t} step {it}: reward IDM {reads(reward, shown, t)}, judge {reads(judge, shown, t)}", flush=True)
        now = torch.cat([lat[:, :t], z[:, None], lat[:, t + 1:]], 1)    # [B, 16, N, C]
        x = model.ae.decoder(model.ae._latent_grid(now.flatten(0, 1)))
        frames = rearrange((x.clamp(-1, 1) + 1) * 127.5, "(b f) c h w -> b f h w c", b=B)  # float, differentiable
        loss = -given_action_prob(reward(frames), batch["groups"])[:, t:t + 2].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
