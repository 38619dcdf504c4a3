"""Tests for evaluate.py: sklearn-semantics P/R/F1 on hand-worked cases, camera bins, PSNR/SSIM/LPIPS,
the Fréchet distance in closed form, the I3D path with a scripted stand-in, the GT row, folders, the CLI;
and for pixel_reward.py, which holds LPIPS and the pixel reward (Eq. 6) built on it."""

import json

import numpy as np
import pytest
import torch

import config
import data
import evaluate as ev
import idm as idm_lib
import pixel_reward

# ---------------------------------------------------------------------------------------------
# Action following

def test_scores_hand_worked_three_labels():
    # label 0: tp 1 fp 1 fn 1 -> P 1/2 R 1/2 F1 1/2; label 1: tp 2 fp 1 fn 0 -> 2/3, 1, 4/5;
    # label 2: tp 0 fp 0 fn 1 -> P 0 (zero_division), R 0, F1 0. Micro: tp 3, fp 2, fn 2 -> 3/5 each.
    s = ev.classification_scores(np.array([0, 0, 1, 1, 2]), np.array([0, 1, 1, 1, 0]))
    assert s["precision_macro"] == pytest.approx(7 / 18)
    assert s["recall_macro"] == pytest.approx(1 / 2)
    assert s["f1_macro"] == pytest.approx(13 / 30)
    for k in ("precision_micro", "recall_micro", "f1_micro"):
        assert s[k] == pytest.approx(3 / 5)


def test_scores_label_only_in_predictions_counts_with_zero_division():
    # labels {0, 1}: label 1 never true -> its recall has den 0 -> 0, its precision 0/1 = 0.
    # label 0: tp 2 fp 0 fn 1 -> P 1, R 2/3, F1 4/5.
    s = ev.classification_scores(np.array([0, 0, 0]), np.array([0, 1, 0]))
    assert s["precision_macro"] == pytest.approx(1 / 2)
    assert s["recall_macro"] == pytest.approx(1 / 3)
    assert s["f1_macro"] == pytest.approx(2 / 5)
    assert s["f1_micro"] == pytest.approx(2 / 3)
    # A label absent from both arrays is not a label: all-zero data is a perfect single-label task.
    assert ev.classification_scores(np.zeros(4, int), np.zeros(4, int))["f1_macro"] == 1.0


def test_micro_scores_equal_accuracy_on_random_labels():
    rng = np.random.default_rng(0)
    t, p = rng.integers(0, 3, 200), rng.integers(0, 3, 200)
    s = ev.classification_scores(t, p)
    for k in ("precision_micro", "recall_micro", "f1_micro"):
        assert s[k] == pytest.approx((t == p).mean())


def _groups(pairs, camera_bins):
    """4 frames of buttons from lists of pressed keys -> data.action_groups [4, 9]."""
    buttons = np.zeros((len(pairs), 20), dtype=np.int64)
    for i, keys in enumerate(pairs):
        for k in keys:
            buttons[i, data.VPT_BUTTONS.index(k)] = 1
    return data.action_groups(buttons, np.array(camera_bins))


def test_action_following_both_pressed_is_null_and_camera_bins():
    # forward_back truth: [both -> 0, back -> 1, forward -> 2, none -> 0]; predicted [0, 1, 1, 0].
    # label 0: P = R = F1 = 1; label 1: tp 1 fp 1 -> P 1/2, R 1, F1 2/3; label 2: all 0.
    true = _groups([("forward", "back"), ("back",), ("forward",), ()], [[5, 5], [5, 5], [0, 10], [6, 4]])
    pred = _groups([(), ("back",), ("back",), ()], [[5, 5], [6, 5], [0, 0], [6, 4]])
    assert true[:, 0].tolist() == [0, 1, 2, 0]
    m = ev.action_following(pred[None], true[None])
    assert m["f1_macro_forward_back"] == pytest.approx(5 / 9)
    # The 6 other tasks are all-null in both, so perfect; the row is the mean over the 7 tasks.
    assert m["f1_macro"] == pytest.approx((5 / 9 + 6) / 7)
    assert m["precision_macro"] == pytest.approx((1.5 / 3 + 6) / 7)
    assert m["f1_micro"] == pytest.approx((3 / 4 + 6) / 7)
    # Camera: pitch |diff| [0, 1, 0, 0], yaw |diff| [0, 0, 10, 0].
    assert m["camera_acc_pitch"] == m["camera_acc_yaw"] == pytest.approx(0.75)
    assert m["camera_error_pitch"] == pytest.approx(0.25)
    assert m["camera_error_yaw"] == pytest.approx(2.5)
    assert m["camera_bin_error"] == pytest.approx(1.375)


# ---------------------------------------------------------------------------------------------
# Visual quality

def test_psnr_of_known_noise():
    gt = torch.full((3, 16, 16, 3), 0.5, dtype=torch.float64)
    noise = torch.where(torch.rand(3, 16, 16, 3, generator=torch.Generator().manual_seed(0)) < 0.5, 0.1, -0.1)
    assert ev.psnr(gt + noise, gt).tolist() == pytest.approx([20.0] * 3)  # MSE 0.01 -> 20 dB
    assert ev.psnr(gt, gt).tolist() == pytest.approx([100.0] * 3)  # identical: floored MSE, finite


def test_ssim_identical_different_and_constant_closed_form():
    x = torch.rand(2, 24, 20, 3, generator=torch.Generator().manual_seed(0))
    assert ev.ssim(x, x).tolist() == pytest.approx([1.0, 1.0], abs=1e-12)
    assert (ev.ssim(x, (x + 0.2 * torch.rand_like(x)).clamp(0, 1)) < 0.99).all()
    # Constant images a, b: zero variances, so SSIM = (2ab + C1) / (a^2 + b^2 + C1).
    a, b, c1 = 0.3, 0.6, 0.01 ** 2
    s = ev.ssim(torch.full((1, 16, 16, 3), a), torch.full((1, 16, 16, 3), b))
    assert float(s) == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-6)


@pytest.fixture(scope="module")
def alexnet_features(tmp_path_factory):
    import torchvision

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("alex") / "features.pth"
    torch.save(torchvision.models.alexnet().features.state_dict(), path)
    return str(path)


def test_lpips_from_test_made_weights(alexnet_features, tmp_path):
    model, note = pixel_reward.load_lpips(alexnet_features)
    assert model is not None and note == ""
    x = torch.rand(2, 64, 64, 3, generator=torch.Generator().manual_seed(1))
    y = torch.rand(2, 64, 64, 3, generator=torch.Generator().manual_seed(2))
    assert pixel_reward.lpips_distance(model, x, x).abs().max() < 1e-6
    assert (pixel_reward.lpips_distance(model, x, y) > 0).all()
    # The weights really came from the file: a full torchvision state dict ("features." prefix) works too
    # and gives the same distances.
    full = {f"features.{k}": v for k, v in torch.load(alexnet_features, weights_only=True).items()}
    torch.save(full, tmp_path / "full.pth")
    model2, _ = pixel_reward.load_lpips(str(tmp_path / "full.pth"))
    assert torch.allclose(pixel_reward.lpips_distance(model2, x, y), pixel_reward.lpips_distance(model, x, y))


def test_lpips_missing_weights_is_unavailable_with_the_reason(tmp_path):
    missing = tmp_path / "nope.pth"
    model, note = pixel_reward.load_lpips(str(missing))
    assert model is None and "lpips unavailable" in note and str(missing) in note


def test_pixel_reward_without_lpips_is_minus_l1_per_frame():
    """Eq. 6 with no LPIPS network: 0 on identical clips, else -L1 of each frame 1..15, worked by hand."""
    gt = torch.zeros(2, 16, 1, 1, 3, dtype=torch.uint8)  # [2, 16, 1, 1, 3]: black one-pixel frames
    assert torch.equal(pixel_reward.pixel_reward(gt, gt, None), torch.zeros(2, 15))
    frames = gt.clone()
    frames[0, 0] = 255  # frame 0 is the given context: never scored
    frames[0, 1, 0, 0, 0] = 255  # frame 1: red off by 1 of 3 channels -> L1 = 1/3
    frames[0, 2, 0, 0, 2] = 51  # frame 2: blue off by 51/255 = 0.2 -> L1 = 0.2/3
    want = torch.zeros(2, 15)  # clip 1 stays identical to the ground truth
    want[0, 0], want[0, 1] = -1 / 3, -0.2 / 3
    torch.testing.assert_close(pixel_reward.pixel_reward(frames, gt, None), want)


# ---------------------------------------------------------------------------------------------
# FVD

def test_frechet_distance_closed_form():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(5, 5))
    s1 = a @ a.T + np.eye(5)  # SPD, not diagonal
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    # S2 = c^2 S1 commutes with S1: (S1 S2)^(1/2) = c S1, so FD = |mu1 - mu2|^2 + (1 - c)^2 tr S1.
    c = 1.7
    expect = ((mu1 - mu2) ** 2).sum() + (1 - c) ** 2 * np.trace(s1)
    assert ev.frechet_distance(mu1, s1, mu2, c * c * s1) == pytest.approx(expect, rel=1e-8)
    # Diagonal covariances: sum (sqrt(s1) - sqrt(s2))^2.
    d1, d2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.0])
    assert ev.frechet_distance(np.zeros(3), np.diag(d1), np.zeros(3), np.diag(d2)) == pytest.approx(
        ((np.sqrt(d1) - np.sqrt(d2)) ** 2).sum(), abs=1e-6)
    # From samples: identical sets are 0; one sample has no covariance -> nan.
    f = rng.normal(size=(50, 4))
    assert ev.fvd_from_features(f, f) == pytest.approx(0.0, abs=1e-6)
    assert np.isnan(ev.fvd_from_features(f[:1], f))


class I3DStandIn(torch.nn.Module):
    """Features that expose what the detector was given: [mean, min, max, C, T, H, W, the 3 flags]."""

    def forward(self, x: torch.Tensor, rescale: bool = True, resize: bool = True,
                return_features: bool = False) -> torch.Tensor:
        B = x.shape[0]
        stats = torch.stack([x.mean(dim=(1, 2, 3, 4)), x.amin(dim=(1, 2, 3, 4)), x.amax(dim=(1, 2, 3, 4))], 1)
        meta = torch.tensor([float(x.shape[1]), float(x.shape[2]), float(x.shape[3]), float(x.shape[4]),
                             float(rescale), float(resize), float(return_features)])
        return torch.cat([stats, meta.expand(B, 7)], 1)


@pytest.fixture(scope="module")
def i3d_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("i3d") / "i3d_torchscript.pt"
    torch.jit.save(torch.jit.script(I3DStandIn()), str(path))
    return str(path)


def test_i3d_path_preprocessing_and_prefixes(i3d_path):
    i3d = torch.jit.load(i3d_path)
    frames = torch.zeros(2, 16, 64, 96, 3, dtype=torch.uint8)
    frames[:, 1:, :, :8] = 255  # a white band on the left of frames 1..15: cropped away (96 -> 336, crop 56..280)
    frames[1, 1:, 20:44, 40:56] = 255  # a white patch in the centre of clip 1
    f = ev.i3d_features(i3d, frames, "cpu")  # [6, 2, 10]
    assert f.shape == (6, 2, 10)
    assert f[:, :, 4].tolist() == [[n, n] for n in range(10, 16)]  # prefix lengths 10..15 of frames 1..15
    assert (f[:, :, 3] == 3).all() and (f[:, :, 5:7] == 224).all()  # [B, 3, T, 224, 224]
    assert (f[:, :, 7:] == [0, 0, 1]).all()  # rescale=False, resize=False, return_features=True
    assert (f[:, 0, 2] == -1).all()  # clip 0: the left band is outside the centre crop, all -1
    assert (f[:, 1, 2] == pytest.approx(1.0)) and (f[:, :, 1] == -1).all()  # clip 1: [-1, 1] range


# ---------------------------------------------------------------------------------------------
# Rows: GT, a world model, a folder; the CLI

@pytest.fixture(scope="module")
def clips():
    return data.load_clips(data.DataConfig(seed=1000, max_clips=6))[0]


@pytest.fixture(scope="module")
def idms(tmp_path_factory):
    d = tmp_path_factory.mktemp("idm")
    torch.manual_seed(0)
    idm_lib.save(idm_lib.IDM.from_config(idm_lib.IDMConfig()), str(d / "reward.pt"))
    torch.manual_seed(1)
    idm_lib.save(idm_lib.IDM.from_config(idm_lib.IDMConfig()), str(d / "judge.pt"))
    return str(d / "reward.pt"), str(d / "judge.pt")


def _cfg(idms, **kw):
    kw = {"batch_size": 4, "lpips_backbone": "/nonexistent/alexnet.pth", **kw}
    return config.EvalConfig(reward_idm=idms[0], judge_idm=idms[1], device="cpu", **kw)


KEYS = ("f1_macro", "precision_macro", "recall_macro", "f1_micro", "camera_bin_error", "camera_acc_pitch",
        "camera_acc_yaw")


def test_gt_row_keys_and_ranges(clips, idms):
    row = ev.evaluate_gt(clips, _cfg(idms))
    for k in KEYS:
        for key in (k, "judge_" + k):
            assert key in row and 0 <= row[key] <= (10 if "error" in k else 1), key
    assert row["psnr"] is row["ssim"] is row["lpips"] is row["fvd"] is None
    assert row["name"] == "gt" and row["clips"] == 6 and row["clips_per_s"] > 0
    gt = torch.from_numpy(np.stack([c[0] for c in clips]))[:, 1:].float() / 255
    assert row["brightness"] == pytest.approx(float(gt.mean()), rel=1e-5)


def test_identity_model_matches_gt_row_and_has_perfect_visuals(clips, idms):
    cfg = _cfg(idms)
    gt = ev.evaluate_gt(clips, cfg)
    row = ev.evaluate(lambda x0, batch: batch["frames"].clone(), clips, cfg, "copy")
    for k in KEYS:
        assert row[k] == gt[k] and row["judge_" + k] == gt["judge_" + k]
    assert row["psnr"] == pytest.approx(100.0) and row["ssim"] == pytest.approx(1.0)
    assert row["fvd"] == pytest.approx(0.0, abs=1e-4) and row["fvd_features"] == "fvd_idm"
    assert row["lpips"] is None and "lpips unavailable" in row["notes"]
    # Black frames after x0: brightness 0, PSNR far lower, the judge latent moves away (FVD > 0).
    black = ev.evaluate(lambda x0, b: torch.cat([b["frames"][:, :1], torch.zeros_like(b["frames"][:, 1:])], 1),
                        clips, cfg, "black")
    assert black["brightness"] == 0.0 and black["psnr"] < 20 and black["fvd"] > 1e-3


class BrightIsForward(torch.nn.Module):
    """A fake IDM: 'forward' iff the frame is bright; every other button up, camera bin 5."""

    def forward(self, frames):
        B, T = frames.shape[:2]
        on = frames.float().mean(dim=(2, 3, 4)) > 127  # [B, T]
        buttons = torch.zeros(B, T, 20, 2)
        buttons[..., 1] = -1.0  # argmax 0: not pressed
        buttons[..., data.VPT_BUTTONS.index("forward"), 1] = torch.where(on, 1.0, -1.0)
        camera = torch.zeros(B, T, 2, 11)
        camera[..., 5] = 1.0
        return {"buttons": buttons, "camera": camera, "latent": frames.float().mean(dim=(2, 3, 4))[..., None]}


def test_frame_t_is_scored_against_a_t(idms):
    # Hand-made clips: a_t has forward on a random pattern. A model that makes frame t bright iff a_t
    # is forward is perfect under the fake IDM; shifting by one frame is not.
    rng = np.random.default_rng(0)
    hand = []
    for _ in range(3):
        acts = [{**data.noop_action(), "forward": int(f)} for f in rng.integers(0, 2, 16)]
        hand.append((np.zeros((16, 16, 16, 3), np.uint8), acts))
    fake = BrightIsForward()
    scorers = ev.Scorers(fake, fake, None, "lpips unavailable: test", None, "cpu")
    cfg = _cfg(idms, batch_size=2)

    def model(shift):
        def generate(x0, batch):
            fwd = batch["buttons"][:, :, data.VPT_BUTTONS.index("forward")]  # [B, 16]
            fwd = torch.roll(fwd, shift, dims=1)
            return (fwd[:, :, None, None, None] * 255).to(torch.uint8).expand(-1, -1, 16, 16, 3).clone()
        return generate

    good = ev.evaluate(model(0), hand, cfg, "good", scorers)
    assert good["f1_macro"] == 1.0 and good["camera_bin_error"] == 0.0 and good["camera_acc_yaw"] == 1.0
    assert [good[f"judge_f1_macro_frames_{a}_{a + 4}"] for a in (1, 6, 11)] == [1.0, 1.0, 1.0]

    def drifting(x0, batch):  # right on frames 0..5, then every frame dark: forward_back fails from frame 6
        video = model(0)(x0, batch)
        video[:, 6:] = 0
        return video
    drift = ev.evaluate(drifting, hand, cfg, "drift", scorers)
    assert drift["judge_f1_macro_frames_1_5"] == 1.0
    assert drift["judge_f1_macro_frames_6_10"] < 1.0 and drift["judge_f1_macro_frames_11_15"] < 1.0
    # Off by one frame, forward_back is about chance on random presses (the 6 other tasks stay perfect).
    assert ev.evaluate(model(1), hand, cfg, "shifted", scorers)["f1_macro_forward_back"] < 0.8


def _bright_clips(n=3, seed=0):
    """Hand-made clips whose frame t is white iff a_t presses forward: BrightIsForward reads them perfectly."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        fwd = rng.integers(0, 2, 16)  # [16]
        frames = np.repeat(fwd * 255, 16 * 16 * 3).astype(np.uint8).reshape(16, 16, 16, 3)  # [16, 16, 16, 3]
        out.append((frames, [{**data.noop_action(), "forward": int(f)} for f in fwd]))
    return out


def test_recon_row_is_the_gt_row_through_the_round_trip(idms):
    hand = _bright_clips()
    fake = BrightIsForward()
    scorers = ev.Scorers(fake, fake, None, "lpips unavailable: test", None, "cpu")
    cfg = _cfg(idms, batch_size=2)
    gt = ev.evaluate_gt(hand, cfg, scorers)
    seen = []

    def identity(frames):
        seen.append(frames.clone())  # [B, 16, H, W, 3]: every frame, x0 included
        return frames.clone()
    recon = ev.evaluate_recon(identity, hand, cfg, scorers)
    assert recon["name"] == "recon" and torch.equal(torch.cat(seen), torch.from_numpy(np.stack([c[0] for c in hand])))
    for k in KEYS:
        assert recon[k] == gt[k] and recon["judge_" + k] == gt["judge_" + k]
    assert gt["f1_macro"] == 1.0 and recon["psnr"] == pytest.approx(100.0) and recon["ssim"] == pytest.approx(1.0)
    # A lossy round trip that halves the brightness: white frames read as not forward, and PSNR vs the raw GT
    # is 10 log10(1 / (128 / 255)^2) dB on white frames, 100 dB (the floor) on black ones.
    lossy = ev.evaluate_recon(lambda frames: frames // 2, hand, cfg, scorers)
    assert lossy["f1_macro_forward_back"] < 0.5 and lossy["judge_f1_macro"] < gt["judge_f1_macro"]
    white = sum(int(a["forward"]) for c in hand for a in c[1][1:])  # white frames among the 45 scored
    assert 0 < white < 45
    assert lossy["psnr"] == pytest.approx((white * 20 * np.log10(255 / 128) + (45 - white) * 100) / 45)


def test_best_of_keeps_the_reward_argmax_and_the_first_on_ties(idms):
    clips, cfg = _bright_clips(4), _cfg(idms, best_of=5, batch_size=2)
    fake = BrightIsForward()
    scorers = ev.Scorers(fake, fake, None, "lpips unavailable: test", None, "cpu")
    gt = ev.evaluate_gt(clips, cfg, scorers)
    calls = []

    def sample(x0, batch, i):  # sample 3 is the ground truth, the others are noise seeded by (batch, i)
        calls.append(i)
        if i == 3:
            return batch["frames"].clone()
        g = torch.Generator().manual_seed(int(batch["frames"].sum()) * 10 + i)
        video = torch.randint(0, 256, batch["frames"].shape, generator=g, dtype=torch.uint8)  # [B, 16, H, W, 3]
        video[:, 0] = x0
        return video

    def is_gt(video, batch):  # [B]: 1 for a clip equal to the ground truth
        return (video == batch["frames"]).flatten(1).all(1).float()

    best = ev.evaluate_best_of(sample, clips, cfg, is_gt, scorers=scorers)
    assert best["name"] == "best_of_5" and calls == [0, 1, 2, 3, 4] * 2  # 4 clips in batches of 2
    for k in KEYS:
        assert best["judge_" + k] == gt["judge_" + k] and best[k] == gt[k]
    assert gt["judge_f1_macro"] == 1.0 and best["psnr"] == pytest.approx(100.0)
    # A constant reward is a tie everywhere: sample 0 is kept, the row equals sample 0's own row.
    first = ev.evaluate(lambda x0, b: sample(x0, b, 0), clips, cfg, "first", scorers)
    tie = ev.evaluate_best_of(sample, clips, cfg, lambda video, batch: torch.ones(len(video)), "tie", scorers)
    assert tie["name"] == "tie" and tie["psnr"] == first["psnr"] < 20
    for k in KEYS:
        assert tie["judge_" + k] == first["judge_" + k]
    assert first["judge_f1_macro_forward_back"] < 0.5  # noise (mean ~127.5 > 127) reads as forward throughout
    with pytest.raises(ValueError, match="best_of must be >= 1"):
        ev.evaluate_best_of(sample, clips, _cfg(idms, best_of=0), is_gt, scorers=scorers)


def test_i3d_fvd_in_a_row(clips, idms, i3d_path):
    cfg = _cfg(idms, fvd_features=i3d_path)
    same = ev.evaluate(lambda x0, b: b["frames"].clone(), clips, cfg, "copy")
    assert same["fvd_features"] == "i3d" and same["fvd"] == pytest.approx(0.0, abs=1e-6)
    dark = ev.evaluate(lambda x0, b: b["frames"] // 2, clips, cfg, "dark")
    assert dark["fvd"] > 0.01
    with pytest.raises(FileNotFoundError, match="i3d_torchscript"):
        ev.load_scorers(_cfg(idms, fvd_features="/nonexistent/i3d.pt"))


def _write_generated(folder, clips, frames_of):
    for i, (frames, actions, _) in enumerate(clips):
        f = frames_of(frames)
        data.write_clip(folder, i, f, actions[len(actions) - len(f):])


def test_evaluate_folder_15_and_16_frames(clips, idms, tmp_path):
    cfg = _cfg(idms)
    _write_generated(tmp_path / "g15", clips, lambda f: f[1:])  # MineWorld: only the 15 generated frames
    _write_generated(tmp_path / "g16", clips, lambda f: f)
    r15 = ev.evaluate_folder(tmp_path / "g15", clips, cfg, "g15")
    r16 = ev.evaluate_folder(tmp_path / "g16", clips, cfg, "g16")
    for r in (r15, r16):
        assert r["psnr"] > 28 and r["ssim"] > 0.9  # H.264 CRF 10, yuv420p, of the GT itself
    assert r15["psnr"] == pytest.approx(r16["psnr"], abs=1.0)
    (tmp_path / "g15" / "clip_5.mp4").unlink()
    with pytest.raises(FileNotFoundError, match="clip_5.mp4"):
        ev.evaluate_folder(tmp_path / "g15", clips, cfg, "g15")


def test_cli_writes_metrics_and_side_by_side_beside_a_training_run(clips, idms, alexnet_features, tmp_path):
    """evaluate.py --out may point at a train.py run folder: its eval_* files never overwrite the run's."""
    gen = tmp_path / "gen"
    _write_generated(gen, clips[:4], lambda f: f[1:])
    out = tmp_path / "out"
    out.mkdir()
    run = {name: name.encode() for name in ("config.yaml", "side_by_side.mp4", "results.json", "log.jsonl")}
    for name, blob in run.items():
        (out / name).write_bytes(blob)
    rows = ev.main(["--data", "minicraft", "--out", str(out), "--generated", str(gen), "--eval.clips=4",
                    f"--eval.reward_idm={idms[0]}", f"--eval.judge_idm={idms[1]}", "--eval.videos=2",
                    "--eval.batch_size=4", "--eval.device=cpu", f"--eval.lpips_backbone={alexnet_features}"])
    assert all((out / name).read_bytes() == blob for name, blob in run.items())
    assert config.parse(config.Config, [str(out / "eval_config.yaml")])[0].eval.clips == 4
    saved = json.loads((out / "eval_metrics.json").read_text())
    assert [r["name"] for r in saved] == ["gt", "gen"] and saved == json.loads(json.dumps(rows))
    want = {"name", "psnr", "ssim", "lpips", "fvd", "fvd_features", "brightness", "clips", "seconds",
            "clips_per_s", "notes", *KEYS, *("judge_" + k for k in KEYS)}
    assert want <= saved[0].keys()
    assert saved[1]["psnr"] > 28 and 0 <= saved[1]["lpips"] < 0.05 and saved[0]["lpips"] is None
    video = data.read_video(out / "eval_side_by_side.mp4")
    assert video.shape == (2 * 16, 2 * 64 + 2, 64, 3)  # 2 clips x 16 frames; GT over model, 2-px gap


def test_gap_closed_by_hand():
    """before 0.70, recon 0.86, after 0.78: +0.08 of a 0.16 gap = 50 %; reward IDM +0.10; PSNR -0.2 dB."""
    row = lambda judge, reward, psnr: {"judge_f1_macro": judge, "f1_macro": reward, "psnr": psnr}  # noqa: E731
    g = ev.gap_closed({"recon": row(0.86, 0.9, 25.0), "before": row(0.70, 0.72, 15.0),
                             "after": row(0.78, 0.82, 14.8)})
    assert g["gap_closed"] == pytest.approx(0.5) and g["judge_f1_gain"] == pytest.approx(0.08)
    assert g["reward_f1_gain"] == pytest.approx(0.10) and g["psnr_change"] == pytest.approx(-0.2)
    assert ev.gap_line(g) == ("judge F1 +0.080: 50% of the 0.160 gap to recon closed; reward-IDM F1 +0.100; "
                                    "PSNR -0.20 dB")


def test_idm_agreement_is_one_for_the_same_idm_and_counts_frames(clips, idms):
    """idm_agreement: the share of scored frames where both IDMs read the same 7 discrete groups; one IDM as
    both reward and judge agrees with itself on every frame, two different random IDMs on fewer."""
    same = ev.evaluate_gt(clips, _cfg((idms[0], idms[0])))
    assert same["idm_agreement"] == 1.0
    row = ev.evaluate_gt(clips, _cfg(idms))
    assert 0 <= row["idm_agreement"] < 1
