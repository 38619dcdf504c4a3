"""Tests for idm.py: parity with VPT's reference IDM (its outputs for a small random IDM), the real 4x_idm size,
safe loading, the loss, the inverse reward (Eq. 3) and the small-IDM save/load round trip."""
import copy
import os
import pickle

import numpy as np
import pytest
import torch

import config
import data
import idm

FIX = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "fixtures", "vpt_idm_small")
MODEL, WEIGHTS = os.path.join(FIX, "idm.model"), os.path.join(FIX, "idm.weights")


@pytest.fixture(scope="module")
def vpt():
    return idm.load_vpt(MODEL, WEIGHTS)


@pytest.fixture(scope="module")
def fixture_io():
    return np.load(os.path.join(FIX, "inputs.npz"))["frames"], dict(np.load(os.path.join(FIX, "expected.npz")))


@pytest.fixture(scope="module")
def per_clip(vpt, fixture_io):
    """The reference ran predict_actions once per clip (batch of 1); so do we. Outputs stacked on axis 0."""
    frames, _ = fixture_io
    with torch.no_grad():
        outs = [vpt(frames[i:i + 1], intermediates=True) for i in range(len(frames))]
    return {k: torch.cat([o[k] for o in outs]).numpy() for k in outs[0]}


def test_fixture_logprobs_and_argmax(per_clip, fixture_io):
    _, exp = fixture_io
    np.testing.assert_allclose(per_clip["buttons"], exp["buttons_logprobs"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(per_clip["camera"], exp["camera_logprobs"], atol=1e-5, rtol=0)
    np.testing.assert_array_equal(per_clip["buttons"].argmax(-1), exp["buttons_argmax"])
    np.testing.assert_array_equal(per_clip["camera"].argmax(-1), exp["camera_bins"])


@pytest.mark.parametrize("ours, ref", [
    ("buttons_logits", "buttons_logits_raw"), ("camera_logits", "camera_logits_raw"), ("latent", "pi_latent"),
    ("block1", "block1_out"), ("block0", "block0_out"), ("img_process", "img_process_out"),
    ("impala", "impala_out")])
def test_fixture_intermediates(per_clip, fixture_io, ours, ref):
    # Float32 noise through the conv stack and LayerNorms reaches ~2e-5 on values up to ~7 here; the
    # fixture was published with a suggested 1e-4. The known wrong variants (raw-x residual, 1/sqrt scale) are
    # off by 1e-2..1.
    np.testing.assert_allclose(per_clip[ours], fixture_io[1][ref], atol=1e-4, rtol=0)


def test_fixture_conv3d(per_clip, fixture_io):
    _, exp = fixture_io
    c3d = per_clip["conv3d"]  # [B, T, H, W, C]
    np.testing.assert_allclose(c3d.mean(axis=(2, 3)), exp["conv3d_out_chan_mean"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(c3d[:, :, :8, :8], exp["conv3d_out_crop8"], atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def batched(vpt, fixture_io):
    with torch.no_grad():
        return vpt(torch.from_numpy(fixture_io[0]))


def test_batched_equals_per_clip_and_attention_is_bidirectional(vpt, fixture_io, per_clip, batched):
    frames, out = fixture_io[0], batched
    # Clips do not interact (empty memory): a batch of 2 gives the per-clip numbers up to float noise.
    np.testing.assert_allclose(out["buttons"].numpy(), per_clip["buttons"], atol=2e-5, rtol=0)
    np.testing.assert_array_equal(out["camera"].argmax(-1).numpy(), per_clip["camera"].argmax(-1))
    # No mask: changing the last frame changes the prediction for frame 0 (conv3d alone reaches only t+2),
    # and leaves the other clip alone.
    changed = frames.copy()
    changed[0, -1] = 255 - changed[0, -1]
    with torch.no_grad():
        out2 = vpt(changed)
    assert (out2["latent"][0, 0] - out["latent"][0, 0]).abs().max() > 1e-3
    torch.testing.assert_close(out2["latent"][1], out["latent"][1], atol=1e-5, rtol=0)


def test_predict_loss_and_reward_on_fixture(vpt, fixture_io, batched):
    frames, exp = fixture_io
    buttons, cam = idm.predict(vpt, frames)
    assert buttons.dtype == cam.dtype == torch.int64
    np.testing.assert_array_equal(buttons.numpy(), exp["env_buttons"])
    np.testing.assert_array_equal(cam.numpy(), exp["camera_bins"])
    # idm_loss of the argmax action = -(VPT's summed log-prob of the argmax action), averaged over frames.
    out = batched
    loss = idm.idm_loss(out, buttons, cam)
    assert loss.item() == pytest.approx(-exp["log_prob_of_argmax"].mean(), abs=1e-4)
    mask = torch.zeros(2, 16)
    mask[1, 3:7] = 1
    masked = idm.idm_loss(out, buttons, cam, mask)
    assert masked.item() == pytest.approx(-exp["log_prob_of_argmax"][1, 3:7].mean(), abs=1e-4)
    # The IDM's own decoded actions, as groups, give reward 1; a reference with every attack flipped gives 0.
    pred = data.action_groups(buttons, cam)  # [B, T, 9]
    flipped = buttons.clone()
    flipped[..., idm.BUTTONS.index("attack")] ^= 1
    other = data.action_groups(flipped, cam)  # [B, T, 9]
    torch.testing.assert_close(idm.frame_scores(pred[:, 1:] == pred[:, 1:], pred), torch.ones(2, 15))
    torch.testing.assert_close(idm.frame_scores(pred[:, 1:] == other[:, 1:], other), torch.zeros(2, 15))
    torch.testing.assert_close(idm.frame_scores(pred[:, 1:] == other[:, 1:], other, "group"),
                               torch.full((2, 15), 8 / 9))


def test_true_label_probs_are_the_groups_label_probabilities(batched):
    """The soft reading: per group, the probabilities of its labels sum to 1; hand values on one frame; the
    argmax reading's label is the likelier one of each binary group."""
    for g, labels in enumerate([3, 3, 3, 2, 2, 2, 2, 11, 11]):    # 3-way pairs, binary groups, camera bins
        true = [torch.zeros(2, 16, 9, dtype=torch.int64).index_fill_(2, torch.tensor([g]), k) for k in range(labels)]
        total = sum(idm.true_label_probs(batched, t)[..., g] for t in true)  # [2, 16]
        torch.testing.assert_close(total, torch.ones(2, 16))
    p = torch.zeros(1, 1, 20)
    p[..., idm.BUTTONS.index("back")], p[..., idm.BUTTONS.index("forward")] = 0.2, 0.7
    out = {"buttons": torch.stack([1 - p, p], -1).log(), "camera": torch.full((1, 1, 2, 11), 1 / 11).log()}
    probs = [idm.true_label_probs(out, torch.tensor([[[label] + [0] * 8]]))[0, 0, 0].item() for label in range(3)]
    assert probs == pytest.approx([0.8 * 0.3 + 0.2 * 0.7, 0.2 * 0.3, 0.7 * 0.8])   # neither/both, back, forward
    read = data.action_groups(*idm.decode(batched))  # [2, 16, 9]
    assert (idm.true_label_probs(batched, read)[..., 3:7] >= 0.5).all()


def test_state_dict_keys_match_vpt(vpt):
    ref = torch.load(WEIGHTS, weights_only=True)
    ours = vpt.state_dict()
    assert len(ours) == 100 and ours.keys() == ref.keys()
    assert all(ours[k].shape == ref[k].shape for k in ref)
    assert ours["net.recurrent_layer.blocks.0.r.orc_block.b_nd"].shape == (10, 0)
    assert not vpt.training


def _real_4x_kwargs():
    """The 4x_idm.model net args (docs/formats.md §2.1)."""
    kwargs, _ = idm.read_model_file(MODEL)
    kwargs = copy.deepcopy(kwargs)
    kwargs.update(attention_heads=32, attention_memory_size=128, hidsize=4096, img_shape=[128, 128, 128],
                  impala_width=16, timesteps=128)
    kwargs["conv3d_params"]["outchan"] = 128
    return kwargs


def test_real_4x_idm_size_on_meta():
    with torch.device("meta"):
        model = idm.IDM(_real_4x_kwargs(), 4.0)
    sd = model.state_dict()
    assert len(sd) == 100
    assert sum(v.numel() for k, v in sd.items() if k.startswith("net.")) == 482_076_032
    assert sum(v.numel() for v in sd.values()) == 482_330_046
    assert sd["net.img_process.cnn.dense.layer.weight"].shape == (256, 131072)
    assert sd["net.recurrent_layer.blocks.1.r.orc_block.r_layer.weight"].shape == (320, 4096)
    assert sd["net.img_process.cnn.stacks.0.firstconv.layer.weight"].shape == (256, 128, 3, 3)


def test_resize_fixture_through_input_path():
    rc = np.load(os.path.join(FIX, "resize_check.npz"))
    src, dst = rc["src"], rc["dst"]  # [2, 360, 640, 3], [2, 128, 128, 3]
    x = idm.to_net_input(src[None], (128, 128))  # [1, 2, 128, 128, 3]
    np.testing.assert_array_equal(x[0].numpy(), data.resize_frames(src, 128, 128))  # the shared resizer
    diff = np.abs(x[0].numpy().astype(int) - dst.astype(int))  # vs cv2: its 11-bit fixed point gives +-1
    assert x.dtype == torch.uint8 and diff.max() <= 1 and diff.mean() < 0.15
    # (H, W) order: a 32x48 net gets 32 rows and 48 columns.
    assert idm.to_net_input(src[None], (32, 48)).shape == (1, 2, 32, 48, 3)
    with pytest.raises(ValueError, match="uint8"):
        idm.to_net_input(src[None].astype(np.float32), (128, 128))


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_model_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    spec = {"model": {"args": {"net": {"args": _Payload(marker)}, "pi_head_opts": {"temperature": 4}}}}
    bad = tmp_path / "bad.model"
    bad.write_bytes(pickle.dumps(spec))
    with pytest.raises(config.UsageError, match=r"refusing to load global '\w+\.system'"):
        idm.load_vpt(str(bad), WEIGHTS)
    assert not marker.exists()
    pickle.loads(bad.read_bytes())  # the payload is live: a plain unpickler runs it
    assert marker.exists()


def test_plain_model_file_reads(tmp_path):
    kwargs, temperature = idm.read_model_file(MODEL)
    assert temperature == 4.0 and isinstance(temperature, float) and kwargs["hidsize"] == 64


def test_bad_weights_list_the_keys(tmp_path):
    sd = torch.load(WEIGHTS, weights_only=True)
    missing = dict(sd)
    del missing["net.final_ln.bias"]
    torch.save(missing, tmp_path / "missing.weights")
    with pytest.raises(ValueError, match=r"missing keys \(1\).*net\.final_ln\.bias"):
        idm.load_vpt(MODEL, str(tmp_path / "missing.weights"))
    shaped = dict(sd)
    shaped["pi_head.camera.linear_layer.bias"] = torch.zeros(21)
    torch.save(shaped, tmp_path / "shaped.weights")
    with pytest.raises(ValueError, match=r"mis-shaped keys \(1\).*pi_head\.camera\.linear_layer\.bias: file \(21,\)"):
        idm.load_vpt(MODEL, str(tmp_path / "shaped.weights"))


def test_missing_files_say_where_to_get_them(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"4x_idm\.model.*VPT") as e:
        idm.load_vpt(str(tmp_path / "nope.model"), WEIGHTS)
    assert str(tmp_path / "nope.model") in str(e.value)


def test_unsupported_net_args_are_named():
    kwargs, _ = idm.read_model_file(MODEL)
    for key, value, msg in [("attention_mask_style", "clipped_causal", "attention_mask_style"),
                            ("attention_memory_size", 32, "attention_memory_size"),
                            ("img_shape", [128, 128, 8], "img_shape")]:
        with pytest.raises(ValueError, match=msg):
            idm.IDM({**kwargs, key: value}, 4.0)


def test_inverse_reward_hand_worked(monkeypatch):
    """Eq. 3's per-frame terms (frame_scores) by hand, then inverse_reward end to end with stand-in IDMs whose
    argmax reading and label probabilities are fixed: the ensemble averages the members' terms."""
    true = torch.zeros(2, 4, 9, dtype=torch.int64)
    pred = torch.zeros(2, 4, 9, dtype=torch.int64)
    pred[:, 0] = 7  # frame 0 is the context frame: never scored
    pred[0, 2, 4] = 1  # clip 0, frame 2: 1 of 9 groups wrong
    pred[0, 3, :3] = 2  # clip 0, frame 3: 3 of 9 groups wrong
    match = pred[:, 1:] == true[:, 1:]  # [2, 3, 9]
    torch.testing.assert_close(idm.frame_scores(match, true), torch.tensor([[1, 0, 0], [1, 1, 1.0]]))
    torch.testing.assert_close(idm.frame_scores(match, true, "group"), torch.tensor([[1, 8 / 9, 6 / 9], [1, 1, 1]]))
    # balanced: the 7 judged groups, each match weighted by its true label's weight; camera (groups 7, 8) unscored
    weights = torch.ones(7, 11)
    weights[4, 0] = 4.0  # group 4's label 0 (the true one everywhere) weighs 4: frame 2 of clip 0 keeps 6 of 10
    balanced = idm.frame_scores(match, true, "balanced", weights)
    torch.testing.assert_close(balanced, torch.tensor([[1, 6 / 10, 7 / 10], [1, 1, 1]]))  # frame 3: 3 of 10 lost
    # a soft reading: the IDM's probabilities of the given labels stand for the matches
    probs = torch.full((2, 3, 9), 0.5)
    probs[1] = 1.0
    torch.testing.assert_close(idm.frame_scores(probs, true).mean(1), torch.tensor([0.5 ** 9, 1.0]))
    torch.testing.assert_close(idm.frame_scores(probs, true, "group").mean(1), torch.tensor([0.5, 1.0]))
    torch.testing.assert_close(idm.frame_scores(probs, true, "balanced", weights).mean(1), torch.tensor([0.5, 1.0]))
    with pytest.raises(ValueError, match="label_weights"):
        idm.frame_scores(match, true, "balanced")
    with pytest.raises(ValueError, match="granularity"):
        idm.frame_scores(match, true, granularity="frame")
    with pytest.raises(ValueError, match="need match"):
        idm.frame_scores(match, true[:, :3])
    # inverse_reward: each IDM's reading of the frames, scored as above, averaged over the ensemble
    monkeypatch.setattr(idm, "decode", lambda out: out["decoded"])
    monkeypatch.setattr(data, "action_groups", lambda groups, _: groups)
    monkeypatch.setattr(idm, "true_label_probs", lambda out, _: out["probs"])
    soft = torch.cat([torch.full((2, 1, 9), 0.9), probs], 1)  # [2, 4, 9]; frame 0 unscored
    nets = [lambda f, p=p: {"decoded": (p, None), "probs": soft} for p in (pred, true)]
    frames = torch.zeros(2, 4, 8, 8, 3, dtype=torch.uint8)
    torch.testing.assert_close(idm.inverse_reward(nets, frames, true),
                               (idm.frame_scores(match, true) + 1) / 2)   # the second IDM reads every frame right
    torch.testing.assert_close(idm.inverse_reward(nets[:1], frames, true, "group", "soft"),
                               idm.frame_scores(probs, true, "group"))


def test_label_weights_are_inverse_label_counts_of_the_judged_groups():
    """data.label_weights: frames 1..T-1 of every clip, frames / (count + 1) per (group, label)."""
    still, jump = data.noop_action(), {**data.noop_action(), "jump": 1}
    clips = [(None, [still, jump, still, still]), (None, [jump, still, jump, still])]   # frames 1..3 scored
    w = data.label_weights(clips)                               # 6 frames; jump pressed in 2
    assert w.shape == (7, 11)
    jump_group = data.GROUP_NAMES.index("jump")
    assert w[jump_group, 1] == pytest.approx(6 / 3) and w[jump_group, 0] == pytest.approx(6 / 5)
    assert w[0, 0] == pytest.approx(6 / 7) and w[0, 1] == pytest.approx(6 / 1)   # forward never pressed


def test_small_idm_default_shapes_and_round_trip(tmp_path):
    cfg = idm.IDMConfig(hidsize=32, timesteps=8)
    torch.manual_seed(0)
    model = idm.IDM.from_config(cfg).eval()
    frames = torch.randint(0, 256, (1, 8, 64, 64, 3), dtype=torch.uint8)
    with torch.no_grad():
        out = model(frames)
    assert out["buttons"].shape == (1, 8, 20, 2) and out["camera"].shape == (1, 8, 2, 11)
    assert out["latent"].shape == (1, 8, 32)
    torch.testing.assert_close(out["camera"].exp().sum(-1), torch.ones(1, 8, 2))
    path = str(tmp_path / "idm.pt")
    idm.save(model, path)
    ckpt = torch.load(path, weights_only=True)
    assert set(ckpt) == {"kwargs", "temperature", "state_dict"} and ckpt["temperature"] == idm.IDMConfig().temperature
    loaded = idm.load(path)
    assert not loaded.training
    with torch.no_grad():
        again = loaded(frames)
    for k in ("buttons", "camera", "latent"):
        torch.testing.assert_close(again[k], out[k], atol=0, rtol=0)


def test_idm_loss_uniform_value_and_gradients():
    """Zero pi head -> uniform log-probs -> NLL = 20 ln 2 + 2 ln 11 per frame. Its gradient reaches every
    parameter on the forward path and none of the ones VPT computes and discards (lastlayer, r_layer)."""
    torch.manual_seed(0)
    model = idm.IDM.from_config(idm.IDMConfig(img_size=(32, 32), hidsize=32, timesteps=4))
    frames = torch.randint(0, 256, (1, 4, 32, 32, 3), dtype=torch.uint8)
    buttons, cams = torch.randint(0, 2, (1, 4, 20)), torch.randint(0, 11, (1, 4, 2))
    with torch.no_grad():
        for p in model.pi_head.parameters():
            p.zero_()
    loss = idm.idm_loss(model(frames), buttons, cams)
    assert loss.item() == pytest.approx(20 * np.log(2) + 2 * np.log(11), abs=1e-5)
    for p in model.pi_head.parameters():  # let the gradient through the head
        p.data.normal_(0, 0.1)
    idm.idm_loss(model(frames), buttons, cams).backward()
    dead = sorted(k for k, p in model.named_parameters() if p.numel() and (p.grad is None or not p.grad.any()))
    assert dead == [f"net.{k}" for k in ("lastlayer.layer.weight", "lastlayer.norm.bias", "lastlayer.norm.weight")] + [
        f"net.recurrent_layer.blocks.{i}.r.orc_block.r_layer.{w}" for i in (0, 1) for w in ("bias", "weight")]


def test_inverse_reward_reads_clips_in_cpu_chunks_as_in_one_batch(monkeypatch):
    """On a CPU the IDMs read CPU_CLIPS clips at a time (cache locality); 9 clips (chunks of 4, 4, 1) score as one
    batch of 9 does, to float rounding, for both readings."""
    torch.manual_seed(0)
    nets = [idm.IDM.from_config(idm.IDMConfig(hidsize=32, attention_heads=2, timesteps=8)).eval() for _ in range(2)]
    g = torch.Generator().manual_seed(1)
    frames = torch.randint(0, 256, (9, 8, 64, 64, 3), dtype=torch.uint8, generator=g)
    sizes = torch.tensor([3, 3, 3, 2, 2, 2, 2, 11, 11])      # labels per group (data.action_groups)
    true = (torch.rand(9, 8, 9, generator=g) * sizes).long()  # [9, 8, 9]
    weights = torch.rand(7, 11, generator=g) + 0.5
    chunked = [idm.inverse_reward(nets, frames, true, "balanced", r, weights) for r in ("soft", "argmax")]
    monkeypatch.setattr(idm, "CPU_CLIPS", 9)
    whole = [idm.inverse_reward(nets, frames, true, "balanced", r, weights) for r in ("soft", "argmax")]
    assert idm.CPU_CLIPS == 9 and chunked[0].shape == (9, 7)
    assert chunked[0].std() > 0.01                            # the soft reward differs between clips
    for a, b in zip(chunked, whole):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
