"""train.py end to end on a tiny world model: the GRPO invariants and exact resume."""
import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
import torchvision

import config
import data
import grpo
import idm as idm_lib
import model_diffusion
import pixel_reward
import runtime
import train
from conftest import tiny_args, tiny_cfg, tiny_nfd_args


def test_first_pass_ratio_is_one_and_every_parameter_moves(assets):
    cfg = tiny_cfg(assets)
    api, model = train.world_model(cfg)
    clips = data.load_clips(cfg.data)[0]
    batch = {k: v.repeat_interleave(2, 0) for k, v in data.collate(clips[:2], 16).items()}
    ro = api.rollout(model, batch["frames"][:, 0], batch["tokens"], cfg, torch.Generator().manual_seed(0))
    old = train.replay(api.log_probs, model, ro, cfg)
    assert torch.allclose(old, ro.logp, atol=1e-5)            # the cache and the replay agree
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    lp, _ = api.log_probs(model, ro, cfg)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    loss, st = grpo.policy_loss(lp, old, adv, ro.mask, cfg.grpo)
    assert st["ratio_mean"] == pytest.approx(1.0, abs=1e-6) and st["clip_frac"] == 0
    loss.backward()
    torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2).step()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p, before[n]), f"{n} did not change"
    assert not any(p.requires_grad for p in model.tokenizer.parameters())   # the VQ is frozen


@pytest.mark.parametrize("aggregation", ["grpo", "token"])
def test_micro_batches_add_up_to_the_whole_batch_gradient(assets, aggregation):
    """rl.micro_batch is a memory knob only: 1 row per backward gives the gradient of all 4 at once."""
    cfg = tiny_cfg(assets, extra=[f"--grpo.aggregation={aggregation}"])
    api, model = train.world_model(cfg)
    clips = data.load_clips(cfg.data)[0]
    batch = {k: v.repeat_interleave(2, 0) for k, v in data.collate(clips[:2], 16).items()}
    ro = api.rollout(model, batch["frames"][:, 0], batch["tokens"], cfg, torch.Generator().manual_seed(0))
    adv, grads = torch.tensor([1.0, -1.0, 0.5, -0.5]), []
    for mb in (4, 1):
        model.zero_grad(set_to_none=True)
        per = dataclasses.replace(cfg, rl=dataclasses.replace(cfg.rl, micro_batch=mb))
        train.backward(model, api, ro, adv, [], per)
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad]))
    assert grads[0].norm() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-7)


def test_pixel_reward_is_minus_l1_plus_lpips_per_frame(assets, tmp_path):
    """Eq. 6 with an LPIPS network (random AlexNet weights: no download): -(L1 + LPIPS) per frame."""
    torch.save(torchvision.models.alexnet().state_dict(), tmp_path / "alexnet.pt")
    lp, why = pixel_reward.load_lpips(str(tmp_path / "alexnet.pt"))
    assert lp is not None, why
    cfg = tiny_cfg(assets, extra=["--rl.reward=pixel"])
    gen = torch.Generator().manual_seed(0)
    frames, gt = (torch.randint(0, 256, (2, 16, 64, 64, 3), dtype=torch.uint8, generator=gen) for _ in range(2))
    cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, lpips_backbone=str(tmp_path / "alexnet.pt")))
    r = train.reward_fn(cfg, "cpu", [])(frames, {"frames": gt})              # [2, 15]
    x, y = frames[:, 1:].float() / 255, gt[:, 1:].float() / 255
    want = (x - y).abs().mean((2, 3, 4)) + pixel_reward.lpips_distance(lp, x.flatten(0, 1), y.flatten(0, 1)).view(2, 15)
    torch.testing.assert_close(r, -want)
    assert (r < -(x - y).abs().mean((2, 3, 4))).all()                        # LPIPS adds a positive term


def test_run_writes_config_log_checkpoint_and_results(assets, tmp_path):
    """The run folder holds what the README promises; exact resume, SIGKILL/SIGTERM and DDP are in
    test_robustness.py. The pixel reward (Eq. 6) gives every group a spread, so weights must move."""
    out = tmp_path / "run"
    train.main([*tiny_args(assets, out, steps=2), "--rl.reward=pixel", "--eval.videos=2"])
    cfg = config.parse(config.Config, [str(out / "config.yaml")])[0]
    assert cfg.rl.reward == "pixel"
    video = data.read_video(out / "side_by_side.mp4", 3 * 64 + 4, 64)   # rows GT | before | after
    assert video.shape == (2 * 16, 3 * 64 + 4, 64, 3)
    held = data.load_clips(dataclasses.replace(cfg.data, seed=cfg.eval.seed, max_clips=cfg.eval.clips))[0]
    gt = data.collate(held)["frames"][0].numpy()              # [16, 64, 64, 3]
    assert np.abs(video[:16, :64].astype(int) - gt).mean() < 8   # row 1 is the first GT clip (mp4 loss)
    rows = json.loads((out / "results.json").read_text())
    assert set(rows) == {"gt", "recon", "before", "after", "gap"} and "judge_f1_macro" in rows["after"]
    assert rows["gap"]["judge_f1_gain"] == rows["after"]["judge_f1_macro"] - rows["before"]["judge_f1_macro"]
    assert rows["gt"]["psnr"] is None and rows["after"]["psnr"] > 0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2]
    for key in ("reward_mean", "reward_std", "zero_std_frac", "clip_frac", "approx_kl", "loss", "lr",
                "seconds"):
        assert all(key in r for r in log), key
    assert log[0]["zero_std_frac"] < 1 and log[0]["grad_norm"] > 0
    init = torch.load(assets / "ar.pt", weights_only=True)["state_dict"]
    final = torch.load(out / "ckpt.pt", weights_only=True)["model"]
    assert any(not torch.equal(final[k], init[k]) for k in final if k.startswith("transformer."))


@pytest.mark.slow
def test_the_loop_climbs_an_easy_reward_on_the_shipped_model(tmp_path, monkeypatch):
    """Rollout -> reward -> advantages -> replay -> update, end to end on the shipped AR base model,
    raises a reward the model can easily change: the mean brightness of the generated frames, on the
    held-out clips. A sign error, or an advantage given to the wrong rollout anywhere in the loop,
    fails this; that the inverse reward barely moves judge F1 in 15 minutes is a matter of signal
    (docs/2026-11-22-what-limits-the-gain.md), not of plumbing. ~4 minutes on 2 cores."""
    brightness = lambda frames, batch: frames[:, 1:].float().mean((2, 3, 4)) / 255  # noqa: E731
    monkeypatch.setattr(train, "reward_fn", lambda *_: brightness)
    out = tmp_path / "run"
    train.main(["configs/minicraft_ar.yaml", "--rl.steps=8", "--rl.lr=1e-4", "--eval.clips=8",
                "--eval.videos=0", f"--run.out={out}"])
    rows = json.loads((out / "results.json").read_text())
    assert rows["after"]["brightness"] > rows["before"]["brightness"] + 0.02


def test_no_config_file_means_the_embedded_nfd_default(monkeypatch):
    """`python train.py` (no YAML, maybe overrides) runs configs/laptop_nfd.yaml on the shipped assets."""
    seen = []

    def stop(cls, argv):
        seen.append(argv)
        raise SystemExit
    monkeypatch.setattr(config, "parse", stop)
    for argv in ([], ["--rl.steps=3"], ["configs/minicraft_ar.yaml"]):
        with pytest.raises(SystemExit):
            train.main(argv)
    assert seen == [[str(train.DEFAULT_CONFIG)], [str(train.DEFAULT_CONFIG), "--rl.steps=3"],
                    ["configs/minicraft_ar.yaml"]]
    monkeypatch.undo()
    cfg, name = config.parse(config.Config, [str(train.DEFAULT_CONFIG)])
    api, model = train.world_model(cfg)                       # the shipped AE and NFD base load strictly
    assert name == "laptop_nfd" and api is model_diffusion
    shipped = torch.load(cfg.nfd.init_from, weights_only=True)["model"]
    assert all(torch.equal(v, shipped[k].float()) for k, v in model.state_dict().items() if k in shipped)


def test_frame_credit_reaches_every_generated_entry_of_both_paradigms(assets, tmp_path):
    """rl.credit=frame: frame t's generated entries carry A_t + A_{t+1} (grpo.frame_credit), read through
    the rollout's frame_of, for the AR layout (a block of tokens per frame) and the NFD one (K steps)."""
    cfg = tiny_cfg(assets, extra=["--rl.credit=frame"])
    api, model = train.world_model(cfg)
    batch = data.collate(data.load_clips(cfg.data)[0][:2], 16)
    ro = api.rollout(model, batch["frames"][:, 0], batch["tokens"], cfg, torch.Generator().manual_seed(0))
    r = torch.zeros(2, 15)
    r[0, 6] = 1.0                                              # rollout 0 of the group is better at frame 7
    adv, _ = train.advantages(r, ro, cfg, 0, 1)                # [2, L]; A_7 = ±1 (z-score), others 0
    gen = ro.mask[0] > 0
    frame = ro.frame_of[gen]                                   # [generated entries]
    want = ((frame == 6) | (frame == 7)).float()               # frames 6 and 7 decide r_7
    assert torch.allclose(adv[0, gen], want, atol=1e-3) and torch.allclose(adv[1, gen], -want, atol=1e-3)
    # End to end: one frame-credit step trains, and logs the clip-level reward mean.
    out = tmp_path / "frame"
    train.main([*tiny_args(assets, out, steps=1), "--rl.reward=pixel", "--rl.credit=frame"])
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert log[0]["grad_norm"] > 0 and log[0]["reward_mean"] < 0
    with pytest.raises(config.ConfigError, match="rl.credit: 'token' is not one of 'clip', 'frame'"):
        train.main([*tiny_args(assets, tmp_path / "bad", steps=1), "--rl.credit=token"])


def test_an_ensemble_reward_is_the_mean_of_its_members(assets):
    """rl.reward_idm="a.pt,b.pt": every frame's reward is the mean of the members' Eq. 3 terms (for the group
    count and for the class-balanced one, whose label weights come from the prompt clips)."""
    clips = data.load_clips(tiny_cfg(assets).data)[0]
    batch = data.collate(clips[:2], 16)
    frames = torch.randint(0, 256, batch["frames"].shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    for granularity in ("group", "balanced"):
        def reward(paths):
            cfg = tiny_cfg(assets, extra=[f"--rl.reward_idm={paths}", f"--rl.granularity={granularity}"])
            return train.reward_fn(cfg, "cpu", clips)
        a, b = (reward(f"{assets}/{n}.pt")(frames, batch) for n in ("reward", "judge"))
        both = reward(f"{assets}/reward.pt,{assets}/judge.pt")(frames, batch)
        assert both.shape == (2, 15) and not torch.equal(a, b)
        torch.testing.assert_close(both, (a + b) / 2)


def test_a_soft_reading_scores_the_idms_probability_of_the_given_labels(assets):
    """rl.reading=soft: a frame's group reward is the mean over groups of the reward IDM's probability of the
    given label (idm.true_label_probs), not the share of its argmax's matches."""
    clips = data.load_clips(tiny_cfg(assets).data)[0]
    batch = data.collate(clips[:2], 16)
    frames = torch.randint(0, 256, batch["frames"].shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    soft, hard = (train.reward_fn(tiny_cfg(assets, extra=["--rl.granularity=group", f"--rl.reading={r}"]), "cpu",
                                  clips)(frames, batch) for r in ("soft", "argmax"))
    net = idm_lib.load(tiny_cfg(assets).rl.reward_idm, "reward IDM")
    with torch.no_grad():
        want = idm_lib.true_label_probs(net(frames), batch["groups"])[:, 1:].mean(-1)   # [2, 15]
    torch.testing.assert_close(soft, want)
    assert not torch.equal(soft, hard) and 0 < soft.min() and soft.max() < 1


def test_nfd_run_end_to_end_with_a_kl_anchor(tmp_path):
    """The default paradigm through train.main on a tiny NFD model from random weights: rollout, reward,
    replay of π_old and π_ref, the KL-anchored update, evaluation rows; the KL to the reference is logged
    (0 on the first step: the policy is the reference) and the weights move."""
    out = tmp_path / "nfd"
    train.main(tiny_nfd_args(out, steps=2))
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and all(r["grad_norm"] > 0 for r in log)
    assert log[0]["kl_ref"] < 1e-8 < log[1]["kl_ref"]         # anchored to the start, then moving away
    assert set(json.loads((out / "results.json").read_text())) == {"gt", "recon", "before", "after", "gap"}


def test_several_updates_per_batch_move_off_policy_and_the_clip_bounds_them(assets, tmp_path):
    """rl.updates=μ: μ AdamW steps on each batch against π_old, the policy that sampled it. The first has ratio 1
    and nothing clipped; later ones depart from 1 and Eq. 2's clip acts (clip_frac > 0, logged). The clipped
    entries carry no gradient: at a step where every ratio lies outside the trust region on the side its
    advantage pushes, the update's gradient is 0."""
    cfg = tiny_cfg(assets, extra=["--rl.updates=3"])
    api, model = train.world_model(cfg)
    batch = {k: v.repeat_interleave(2, 0) for k, v in data.collate(data.load_clips(cfg.data)[0][:2], 16).items()}
    ro = api.rollout(model, batch["frames"][:, 0], batch["tokens"], cfg, torch.Generator().manual_seed(0))
    r, adv, old = torch.zeros(4, 15), torch.tensor([1.0, -1.0, 1.0, -1.0]), []
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.rl.lr, weight_decay=0)
    rows = [train.update(model, api, opt, params, ro, r, adv, old, cfg, "cpu")[0] for _ in range(3)]
    assert rows[0]["clip_frac"] == 0 and rows[0]["ratio_mean"] == pytest.approx(1.0, abs=1e-6)
    assert rows[2]["clip_frac"] > 0 and rows[2]["ratio_mean"] != pytest.approx(1.0, abs=1e-3)
    assert torch.allclose(torch.cat(old), ro.logp, atol=1e-5)  # π_old is the sampler's policy
    # push every ratio far past the clip on the side of its advantage: the clipped surrogate is flat there
    lp = train.replay(api.log_probs, model, ro, cfg)
    far = list((lp - 10 * adv[:, None] * ro.mask).split(cfg.rl.micro_batch))   # π_old: ratios e^{±10}, past 1 ± 0.2
    model.zero_grad(set_to_none=True)
    train.backward(model, api, ro, adv, far, cfg)
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in params)
    # end to end: the log shows the last update's clip fraction
    out = tmp_path / "mu"
    train.main([*tiny_args(assets, out, steps=2), "--rl.reward=pixel", "--rl.updates=3"])
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert all(row["clip_frac"] > 0 for row in log)


def test_a_reference_reset_re_anchors_the_kl_and_a_resume_restores_the_reset_reference(tmp_path, monkeypatch):
    """rl.ref_reset=K copies the policy into π_ref before every K-th step: at that step's first pass the policy is
    the reference, so the logged KL is 0, and between resets it grows again. The checkpoint holds the reset π_ref,
    so a run resumed between two resets (step 3 of 4, reset at 2) ends where the unbroken run ends."""
    saved = {}
    save = runtime.save_checkpoint

    def keep_step_3(path, model, opt, sched, step, cfg, ref=None):     # a copy of the checkpoint written at step 3
        save(path, model, opt, sched, step, cfg, ref)
        if step == 3:
            saved["ckpt"] = path.read_bytes()
    monkeypatch.setattr(runtime, "save_checkpoint", keep_step_3)
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    extra = ["--rl.ref_reset=2", "--rl.save_every=1"]
    train.main([*tiny_nfd_args(whole, steps=4), *extra])
    kl = [json.loads(line)["kl_ref"] for line in (whole / "log.jsonl").read_text().splitlines()]
    assert kl[0] < 1e-8 and kl[2] < 1e-8 and kl[1] > 1e-6 and kl[3] > 1e-6    # 0 right after each (re)set
    state = torch.load(whole / "ckpt.pt", weights_only=True)
    assert any(not torch.equal(state["ref"][k], state["model"][k]) for k in state["model"])
    # the run as if killed after step 3: its folder, the step-3 checkpoint, then the same command
    shutil.copytree(whole, broken)
    (broken / "ckpt.pt").write_bytes(saved["ckpt"])
    train.main([*tiny_nfd_args(broken, steps=4), *extra])
    a, b = (torch.load(d / "ckpt.pt", weights_only=True)["model"] for d in (whole, broken))
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(line) for line in (broken / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[3]["kl_ref"] == pytest.approx(kl[3], rel=1e-6)


def test_diffusion_nft_leaves_the_model_at_a_constant_reward_and_trains_end_to_end(tmp_path):
    """rl.objective=nft on a tiny NFD: at θ = θ_old a batch whose rewards are all equal (every advantage 0) leaves
    every weight where it is; through train.main the weights move, the first pass has θ = θ_old (nft_shift 0 on a
    single update), later passes leave it (nft_shift > 0), and the velocity-space KL to π_ref is logged."""
    cfg = config.parse(config.Config, [*tiny_nfd_args(tmp_path / "x", steps=1), "--rl.objective=nft"])[0]
    api, model = train.world_model(cfg)
    clips = data.load_clips(cfg.data)[0][:2]
    batch = {k: v.repeat_interleave(2, 0) for k, v in data.collate(clips, model.action_offset).items()}
    gens = [torch.Generator().manual_seed(s) for s in (0, 1)]
    ro = api.rollout(model, batch["frames"][:, 0], batch["tokens"], cfg, gens)
    ro = dataclasses.replace(ro, ref=train.replay(api.reference, model, ro, cfg))       # [4, 15, N, C]
    assert ro.ref.shape == ro.latents[:, 1:].shape
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0)
    adv, _ = train.advantages(torch.ones(4, 15), ro, cfg, 0, 1)
    row, why = train.update(model, api, opt, params, ro, torch.ones(4, 15), adv, [], cfg, "cpu")
    assert why is None and row["nft_shift"] == 0 and row["kl_ref"] < 1e-12
    assert all(torch.equal(p, q) for p, q in zip(params, before))
    out = tmp_path / "nft"
    train.main([*tiny_nfd_args(out, steps=2), "--rl.objective=nft", "--rl.updates=2"])
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert all(r["nft_shift"] > 0 and r["grad_norm"] > 0 and "kl_ref" in r for r in log)
    assert set(json.loads((out / "results.json").read_text())) == {"gt", "recon", "before", "after", "gap"}
