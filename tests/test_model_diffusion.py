"""Tests for model_diffusion.py: sizes (Table 5), adaLN-Zero init, block-causal attention, the KV-cached
rollout vs no-cache recomputation, batched replay vs per-frame replay, log-prob ratio = 1 on the first
pass, zero-noise SDE = Euler, flow-matching gradients. Tiny configs, CPU, a few seconds."""
import dataclasses
from pathlib import Path

import pytest
import torch
import yaml

import config
import model_diffusion
import sde_sampler as sde
from model_diffusion import (
    NFD,
    AEConfig,
    NFDConfig,
    actions_multi_hot,
    block_causal_mask,
    context_kv,
    fm_loss,
    load_weights,
    log_probs,
    noisy_velocity,
    reference,
    replay_mask,
    rollout,
    sample_frames,
)
from sde_sampler import SDEConfig

ROOT = Path(__file__).resolve().parents[1]
N_TOK, C = 16, 4  # tiny latent grid 4x4, 4 channels


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny models are too small to gain from threads; one thread avoids stalls on a busy CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def run_cfg(group_size: int = 2, **sde_fields) -> config.Config:
    """A run config with these sde fields and rl.group_size (what the world-model calls read)."""
    return config.Config(sde=SDEConfig(**sde_fields), rl=config.RLConfig(group_size=group_size))


def tiny_cfgs(frames: int = 5) -> tuple[NFDConfig, AEConfig]:
    cfg = NFDConfig(hidden=32, mlp=48, heads=2, layers=2, latent_channels=C, latent_h=4, latent_w=4, frames=frames)
    return cfg, AEConfig(frame_h=16, frame_w=16, width=8, mults=(1, 2), latent_channels=C)


def tiny_model(frames: int = 5, wake: bool = True, seed: int = 0) -> NFD:
    """A tiny NFD; wake=True replaces the adaLN-Zero zeros with random values so outputs depend on inputs."""
    torch.manual_seed(seed)
    model = NFD(*tiny_cfgs(frames))
    if wake:
        for p in model.parameters():
            if p.requires_grad and not p.any():
                torch.nn.init.normal_(p, std=0.3)
    return model


def clip(B: int, frames: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random uint8 frames [B, F, 16, 16, 3] and random valid action tokens [B, F, 11]."""
    g = torch.Generator().manual_seed(seed)
    video = torch.randint(0, 256, (B, frames, 16, 16, 3), dtype=torch.uint8, generator=g)
    tokens = torch.randint(8192, 8192 + 68, (B, frames, 11), generator=g)
    return video, tokens


# -----------------------------------------------------------------------------
# Sizes, config checks, init


@pytest.mark.parametrize("path, target", [("configs/nfd_310m.yaml", 310e6), ("configs/nfd_774m.yaml", 774e6)])
def test_paper_sizes_on_meta_device(path, target):
    y = yaml.safe_load((ROOT / path).read_text())
    ae = AEConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in y["ae"].items()})
    with torch.device("meta"):
        model = NFD(NFDConfig(**y["nfd"]), ae)
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)  # the DiT; the tokenizer is frozen
    assert abs(n - target) / target < 0.02, f"{path}: {n / 1e6:.1f}M parameters, Table 5 says {target / 1e6:.0f}M"
    assert (model.cfg.latent_h, model.cfg.latent_w) == (14, 24)  # 224x384 at stride 16


def test_latent_grid_mismatch_is_an_error():
    cfg, ae = tiny_cfgs()
    cfg.latent_h = 8
    with pytest.raises(ValueError, match="latent grid"):
        NFD(cfg, ae)


def test_fresh_model_outputs_zero_and_blocks_are_identity():
    model = tiny_model(wake=False)
    x = torch.randn(2, 3, N_TOK, C)
    t, act = torch.rand(2, 3), torch.rand(2, 3, 68)
    v, _ = model(x, t, act, torch.arange(3), mask=block_causal_mask(3, N_TOK))
    assert v.shape == (2, 3, N_TOK, C) and torch.equal(v, torch.zeros_like(v))
    h = torch.randn(2, 3, N_TOK, 32)
    assert torch.equal(model.blocks[0](h, torch.randn(2, 3, 32))[0], h)  # zero gates: the block is the identity


def test_actions_multi_hot_from_mineworld_tokens():
    # rows 39 and 5 of the parity fixture mineworld_tokens.json (MineWorld's own tokenizer output)
    tokens = torch.tensor([[[8257, 8235, 8249, 8206, 8258, 8196, 8199, 8192, 8198, 8258, 8259],
                            [8257, 8225, 8246, 8258, 8258, 8196, 8258, 8258, 8258, 8258, 8259]]])  # [1, 2, 11]
    hot = actions_multi_hot(tokens)  # [1, 2, 68]
    assert hot[0, 0].nonzero().squeeze(1).tolist() == [0, 4, 6, 7, 14, 43, 57, 65, 66, 67]
    assert hot[0, 1].nonzero().squeeze(1).tolist() == [4, 33, 54, 65, 66, 67]  # 7 nulls count once
    assert hot.max() == 1.0
    with pytest.raises(ValueError, match="MineWorld ids"):
        actions_multi_hot(torch.full((1, 2, 11), 100))  # an image code, not an action token


# -----------------------------------------------------------------------------
# Block-wise causal attention


def test_masks_by_hand():
    expected = torch.tensor([[1, 1, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0],
                             [1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(block_causal_mask(3, 2), expected)
    # queries: noisy frames 1, 2 (one token each); keys: [clean 0, clean 1 | noisy 1, noisy 2]
    assert torch.equal(replay_mask(2, 1), torch.tensor([[1, 0, 1, 0], [1, 1, 0, 1]], dtype=torch.bool))


def test_block_causal_attention_semantics():
    model = tiny_model()
    x = torch.randn(1, 4, N_TOK, C)
    t, act = torch.rand(1, 4), torch.rand(1, 4, 68)
    def run(x):
        return model(x, t, act, torch.arange(4), mask=block_causal_mask(4, N_TOK))[0]  # [1, 4, N, C]
    base = run(x)
    later = x.clone()
    later[:, 2] += 1.0  # change frame 2
    out = run(later)
    assert torch.allclose(out[:, :2], base[:, :2], atol=1e-6)  # earlier frames cannot see it
    assert (out[:, 2:] - base[:, 2:]).abs().amax(dim=(2, 3)).min() > 1e-3  # frame 2 and the later frame 3 do
    token = x.clone()
    token[:, 1, 0] += 1.0  # change token 0 of frame 1
    out = run(token)
    assert (out[:, 1, 1:] - base[:, 1, 1:]).abs().amax(dim=-1).min() > 1e-4  # every other token of frame 1 changes
    assert torch.allclose(out[:, 0], base[:, 0], atol=1e-6)


def test_batched_replay_equals_per_frame_replay():
    model, F_, B = tiny_model(frames=6), 6, 3
    clean, noisy = torch.randn(B, F_, N_TOK, C), torch.randn(B, F_ - 1, N_TOK, C)
    t = torch.rand(B, F_ - 1)
    act = torch.rand(B, F_, 68)
    ctx = context_kv(model, clean[:, :-1], torch.zeros(B, F_ - 1), act[:, :-1])
    v = noisy_velocity(model, ctx, noisy, t, act[:, 1:])  # [B, F-1, N, C]  one forward for all frames
    for f in range(1, F_):  # per frame, no cache: [clean 0..f-1, noisy f] with the block-causal mask
        seq = torch.cat([clean[:, :f], noisy[:, f - 1:f]], dim=1)  # [B, f+1, N, C]
        tf = torch.cat([torch.zeros(B, f), t[:, f - 1:f]], dim=1)  # [B, f+1]
        ref = model(seq, tf, act[:, :f + 1], torch.arange(f + 1), mask=block_causal_mask(f + 1, N_TOK))[0][:, -1]
        assert torch.allclose(v[:, f - 1], ref, atol=1e-5), f"frame {f}: {(v[:, f - 1] - ref).abs().max()}"


# -----------------------------------------------------------------------------
# Rollout, replay, evaluation sampler


def test_rollout_shapes_mask_and_logprob_ratio_one():
    model, B, K = tiny_model(frames=16), 4, 10
    video, tokens = clip(B, 16)
    cfg = run_cfg(steps=K)
    ro = rollout(model, video[:, 0], tokens, cfg, torch.Generator().manual_seed(1))
    assert ro.frames.shape == (B, 16, 16, 16, 3) and ro.frames.dtype == torch.uint8
    assert torch.equal(ro.frames[:, 0], model.ae.decode(model.ae.encode(video[:, 0])))  # x0 round-tripped
    assert ro.logp.shape == ro.mask.shape == (B, 15 * K) and ro.traj.shape == (B, 15, K + 1, N_TOK, C)
    assert torch.equal(ro.traj[:, :, -1], ro.latents[:, 1:])
    m = ro.mask.view(B, 15, K)
    assert (m == m[:, :1]).all() and not m[:, :, -1].any()  # same steps for every frame; never the last
    assert (m[:, 0].sum(1) == int(0.6 * (K - 1))).all()  # τ·(K−1) = 5 steps per trajectory
    lp, kl = log_probs(model, ro, cfg)
    assert kl is None  # no reference policy in this rollout
    assert ro.frame_of.tolist() == [f for f in range(1, 16) for _ in range(K)]
    sel = ro.mask.bool()
    assert torch.isfinite(ro.logp).all() and torch.equal(lp[~sel], torch.zeros_like(lp[~sel]))
    assert torch.allclose(lp[sel], ro.logp[sel], atol=1e-5)
    assert torch.allclose(torch.exp(lp[sel] - ro.logp[sel]), torch.ones(int(sel.sum())), atol=1e-5)
    lp[sel].sum().backward()
    assert model.final.weight.grad.abs().sum() > 0 and model.blocks[0].qkv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_kl_to_the_reference_is_the_closed_form_gaussian_kl(reduce):
    model, B, K = tiny_model(frames=4), 2, 4
    video, tokens = clip(B, 4, seed=7)
    cfg = run_cfg(steps=K, logprob_reduce=reduce)
    ro = rollout(model, video[:, 0], tokens, cfg, torch.Generator().manual_seed(2))
    ref = reference(model, ro, cfg)  # [B, F-1, K, N, C] π_ref's transition means
    assert ref.shape == (B, 3, K, N_TOK, C)
    _, kl = log_probs(model, dataclasses.replace(ro, ref=ref), cfg)
    assert kl.abs().max() < 1e-6  # the reference is the policy itself
    # Shift every reference mean by d: KL = d² / (2 s_k²) per latent element, the same reduction as the
    # log-prob (mean: per element; sum: times the N·C elements), on the trained steps only.
    d, s_k = 0.1, ro.g * (ro.ts[:-1] - ro.ts[1:]).sqrt()  # [K] per-step std
    _, kl = log_probs(model, dataclasses.replace(ro, ref=ref + d), cfg)
    per_elem = (d ** 2 / (2 * s_k ** 2)).repeat(3)  # [(F-1)K]
    expected = per_elem * (N_TOK * C if reduce == "sum" else 1) * ro.mask  # [B, (F-1)K]
    torch.testing.assert_close(kl, expected, rtol=1e-4, atol=1e-6)


def test_kv_cached_rollout_equals_no_cache_recomputation():
    model, B, F_, K = tiny_model(frames=5), 2, 5, 4
    video, tokens = clip(B, F_, seed=2)
    cfg = run_cfg(steps=K, logprob_reduce="sum")
    calls = []
    hook = model.register_forward_hook(lambda *_: calls.append(1))
    ro = rollout(model, video[:, 0], tokens, cfg, torch.Generator().manual_seed(3))
    hook.remove()
    assert len(calls) == 1 + (F_ - 1) * K + (F_ - 2)  # frame 0, K steps per frame, one cache pass per context frame
    act = actions_multi_hot(tokens)
    for f in range(1, F_):
        for k in range(K):  # the whole prefix recomputed from scratch, no cache
            seq = torch.cat([ro.latents[:, :f], ro.traj[:, f - 1, k][:, None]], dim=1)  # [B, f+1, N, C]
            tf = torch.cat([torch.zeros(B, f), ro.ts[k].expand(B, 1)], dim=1)  # [B, f+1]
            v = model(seq, tf, act[:, :f + 1], torch.arange(f + 1), mask=block_causal_mask(f + 1, N_TOK))[0][:, -1]
            _, mean, std = sde.sde_step(ro.traj[:, f - 1, k], v, ro.ts[k], ro.ts[k + 1], ro.g[k])
            lp = sde.log_prob(ro.traj[:, f - 1, k + 1], mean, std, "sum")  # [B]
            assert torch.allclose(lp, ro.logp[:, (f - 1) * K + k], rtol=1e-5, atol=1e-4), (f, k)


def test_preallocated_cache_rollout_equals_a_concatenated_cache(monkeypatch):
    """The rollout writes each frame's keys and values into a preallocated cache; with today's plain cache in
    its place (each clean frame's keys and values concatenated onto the earlier ones) the same generators give
    the same denoising steps, log-probs and frames, to 1e-5."""
    model, B, F_ = tiny_model(frames=5), 4, 5
    video, tokens = clip(B, F_, seed=7)
    cfg = run_cfg(steps=3)
    gens = lambda: [torch.Generator().manual_seed(s) for s in (0, 1)]  # noqa: E731  one per group of 2
    fast = rollout(model, video[:, 0], tokens, cfg, gens())

    def plain_frame(model, cache, x, act, f):
        kvs = model(x[:, None], torch.zeros(B, 1), act[:, None], torch.tensor([f]), ctx=cache or None)[1]
        cache[:] = kvs if not cache else [(torch.cat([ck, k], 2), torch.cat([cv, v], 2))
                                          for (ck, cv), (k, v) in zip(cache, kvs)]

    def plain_velocity(model, cache, x, t, act, f):
        return model(x[:, None], t.expand(B, 1), act[:, None], torch.tensor([f]), ctx=cache)[0][:, 0]

    monkeypatch.setattr(model_diffusion, "new_cache", lambda *_: [])
    monkeypatch.setattr(model_diffusion, "cache_frame", plain_frame)
    monkeypatch.setattr(model_diffusion, "cached_velocity", plain_velocity)
    plain = rollout(model, video[:, 0], tokens, cfg, gens())
    assert fast.traj.shape == (B, F_ - 1, 4, N_TOK, C) and fast.traj[:, :, -1].std() > 0.1
    torch.testing.assert_close(fast.traj, plain.traj, atol=1e-5, rtol=0)   # every denoising step
    torch.testing.assert_close(fast.logp, plain.logp, atol=1e-5, rtol=0)
    assert torch.equal(fast.frames, plain.frames)


def test_zero_noise_rollout_equals_euler_sampler():
    model, B, F_, K = tiny_model(frames=5), 2, 5, 5
    video, tokens = clip(B, F_, seed=4)
    cfg = run_cfg(steps=K, noise_level=0.0, eval_steps=K, eval_solver="euler")
    ro = rollout(model, video[:, 0], tokens, cfg, torch.Generator().manual_seed(5))
    ev = sample_frames(model, video[:, 0], tokens, cfg, torch.Generator().manual_seed(5))
    assert torch.equal(ro.frames, ev)
    other = sample_frames(model, video[:, 0], tokens, cfg, torch.Generator().manual_seed(6))
    assert not torch.equal(other, ev)  # the frames do depend on the initial noise
    dpm = sample_frames(model, video[:, 0], tokens, run_cfg(eval_steps=6), torch.Generator().manual_seed(5))
    assert dpm.shape == ev.shape and dpm.dtype == torch.uint8 and torch.equal(dpm[:, 0], ev[:, 0])


def test_window_rollout_trains_its_steps_and_replays_to_ratio_one():
    """sde.window=2 with shared x_1: every frame's mask is the first 2 steps, the replay of those steps gives the
    rollout's log-probs, and the members of a group differ only through the window's noise."""
    model, B, K = tiny_model(frames=4), 4, 5
    video, tokens = clip(B, 4, seed=6)
    cfg = run_cfg(2, steps=K, window=2, same_noise=True)
    ro = rollout(model, video[:, 0], tokens, cfg, torch.Generator().manual_seed(7))
    assert ro.mask.view(B, 3, K).tolist() == [[[1.0] * 2 + [0.0] * 3] * 3] * B
    lp, _ = log_probs(model, ro, cfg)
    sel = ro.mask.bool()
    assert torch.allclose(lp[sel], ro.logp[sel], atol=1e-5) and (ro.logp[~sel] == 0).all()
    assert torch.equal(ro.traj[0, :, 0], ro.traj[1, :, 0]) and not torch.equal(ro.traj[0, :, 1], ro.traj[1, :, 1])


def test_same_initial_noise_within_a_group():
    model, B, F_ = tiny_model(frames=3), 4, 3
    video, tokens = clip(B, F_, seed=5)
    ro = rollout(model, video[:, 0], tokens, run_cfg(2, steps=3, same_noise=True), torch.Generator().manual_seed(0))
    x1 = ro.traj[:, :, 0]  # [B, F-1, N, C]
    assert torch.equal(x1[0], x1[1]) and torch.equal(x1[2], x1[3]) and not torch.equal(x1[0], x1[2])
    assert not torch.equal(ro.traj[0, :, 1], ro.traj[1, :, 1])  # per-step noise stays independent
    with pytest.raises(ValueError, match="group"):
        rollout(model, video[:3, 0], tokens[:3], run_cfg(2, steps=3, same_noise=True))


# -----------------------------------------------------------------------------
# Training losses and checkpoints


def test_fm_loss_is_finite_and_reaches_every_parameter():
    model = tiny_model(frames=4)
    video, tokens = clip(2, 4, seed=6)
    loss = fm_loss(model, video, tokens, torch.Generator().manual_seed(0))
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {name}"
        else:
            assert name.startswith("ae.") and p.grad is None  # the tokenizer is frozen


def test_fm_loss_noise_levels_are_per_frame(monkeypatch):
    import model_diffusion as md
    seen = {}
    ctx_fn, noisy_fn = md.context_kv, md.noisy_velocity

    def spy_ctx(model, clean, t_clean, act):
        seen["t_ctx"] = t_clean
        return ctx_fn(model, clean, t_clean, act)

    def spy_noisy(model, ctx, noisy, t_noisy, act):
        seen["t"] = t_noisy
        return noisy_fn(model, ctx, noisy, t_noisy, act)

    monkeypatch.setattr(md, "context_kv", spy_ctx)
    monkeypatch.setattr(md, "noisy_velocity", spy_noisy)
    video, tokens = clip(8, 5, seed=9)
    fm_loss(tiny_model(frames=5), video, tokens, torch.Generator().manual_seed(0))
    assert seen["t"].shape == seen["t_ctx"].shape == (8, 4)
    assert seen["t"].std(dim=1).min() > 0.01  # Diffusion Forcing: independent t for every frame
    assert seen["t_ctx"].max() <= 0.1 and seen["t_ctx"].max() > 0  # context noised to t ≤ nfd.context_noise


def test_fm_loss_decreases_when_fitting_one_clip():
    model = tiny_model(frames=4, wake=False)  # adaLN-Zero init, as pretraining starts
    video, tokens = clip(2, 4, seed=8)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)

    def held_out() -> float:  # the loss at a fixed draw of t and ε
        with torch.no_grad():
            return float(fm_loss(model, video, tokens, torch.Generator().manual_seed(99)))

    before = held_out()
    for step in range(25):
        loss = fm_loss(model, video, tokens, torch.Generator().manual_seed(step))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert held_out() < 0.7 * before  # the v = ε − x0 regression is learnable (fresh noise at each step)


def test_autoencoder_shapes_loss_and_input_check():
    model = tiny_model()
    video, _ = clip(3, 1, seed=7)
    z = model.ae.encode(video[:, 0])
    assert z.shape == (3, N_TOK, C)
    out = model.ae.decode(z)
    assert out.shape == (3, 16, 16, 3) and out.dtype == torch.uint8
    model.ae.requires_grad_(True)
    loss = model.ae.loss(video[:, 0])
    loss.backward()
    assert torch.isfinite(loss) and model.ae.encoder[0].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="uint8"):
        model.ae.encode(torch.zeros(1, 32, 32, 3, dtype=torch.uint8))


def test_load_weights_round_trip_and_mismatch(tmp_path):
    model = tiny_model(seed=1)
    path = tmp_path / "nfd.pt"
    torch.save({"model": model.state_dict(), "step": 3}, path)
    fresh = tiny_model(wake=False, seed=2)
    load_weights(fresh, str(path))
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
    cfg, ae = tiny_cfgs()
    cfg.hidden, cfg.heads = 64, 4
    with pytest.raises(ValueError, match=r"does not fit this model: .*mis-shaped keys \("):
        load_weights(NFD(cfg, ae), str(path))
