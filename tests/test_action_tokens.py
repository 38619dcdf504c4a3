"""What the action tokens determine: with camera_tokens="vpt" every scored group (data.action_groups, the
7 discrete tasks and both VPT camera bins) is a function of the tokens of any action minicraft emits;
MineWorld's 21-bin camera tokens alias VPT bins (docs/conventions.md §8.2)."""

import numpy as np
import pytest
import torch

import data
import minicraft


@pytest.fixture(scope="module")
def space():
    """Every action minicraft's scripted player emits and its 9 scored groups [N, 9], binned as data.collate
    bins them (from the float64 angles)."""
    actions = [{**data.noop_action(), **a} for a in minicraft.action_space()]  # the world names pressed keys
    buttons, _ = data.actions_to_arrays(actions)  # [N, 20]
    bins = data.camera_to_bins(np.array([a["camera"] for a in actions]), **data.VPT_CAMERA)  # [N, 2]
    return actions, data.action_groups(buttons, bins)


def collisions(actions, groups, camera_tokens):
    """Token tuples shared by actions whose scored groups differ -> {tokens: set of group tuples}."""
    seen = {}
    for a, g in zip(actions, groups):
        seen.setdefault(tuple(data.action_to_tokens(a, camera_tokens=camera_tokens)), set()).add(tuple(g))
    return {t: gs for t, gs in seen.items() if len(gs) > 1}


def colliding_fraction(values, camera_tokens):
    """Share of camera angles (one axis) whose token is shared with an angle of another VPT bin."""
    slot = {"mineworld": lambda v: data.camera_to_bins(v, **data.MINEWORLD_CAMERA),
            "vpt": lambda v: data.camera_to_bins(v, **data.VPT_CAMERA)}[camera_tokens]
    token, vpt = slot(values), data.camera_to_bins(values, **data.VPT_CAMERA)  # [V] each
    return float(np.mean([len(set(vpt[token == t])) > 1 for t in token]))


def test_vpt_camera_tokens_are_injective_and_in_the_vocab():
    vocab = data.MINEWORLD_ACTION_VOCAB
    angles = data.bins_to_camera(np.arange(11), **data.VPT_CAMERA)  # the 11 VPT bin centres
    pitch_ids, yaw_ids = zip(*(data.action_to_tokens({**data.noop_action(), "camera": [c, c]}, offset=0,
                                                     camera_tokens="vpt")[1:3] for c in angles))
    assert list(pitch_ids) == [vocab[f"cam_0_{b}"] for b in range(5, 16)]  # one id per bin, in order
    assert list(yaw_ids) == [vocab[f"cam_1_{b}"] for b in range(5, 16)]
    assert pitch_ids[5] == vocab["cam_0_10"] and yaw_ids[5] == vocab["cam_1_10"]  # no motion keeps its id
    # The MineWorld bin of each VPT centre would not be injective: 0 and ±0.615 deg share bin 10.
    assert data.camera_to_bins(angles, **data.MINEWORLD_CAMERA).tolist() == [7, 8, 9, 9, 10, 10, 10, 11, 11, 12, 13]


def test_vpt_tokens_determine_every_scored_group(space):
    actions, groups = space
    assert len(actions) == 84242  # 18 key/jump runs x 10 hotbar x 4 hand x 9 pitch x 13 yaw + 2 GUI steps
    assert collisions(actions, groups, "vpt") == {}
    tokens = np.array([data.action_to_tokens(a, camera_tokens="vpt") for a in actions[::97]])  # [n, 11]
    assert tokens.min() >= 8192 and tokens.max() < 8192 + len(data.MINEWORLD_ACTION_VOCAB)


def test_mineworld_tokens_alias_vpt_camera_bins(space):
    actions, groups = space
    bad = collisions(actions, groups, "mineworld")
    assert bad and all({g[:7] for g in gs} == {next(iter(gs))[:7]} for gs in bad.values())  # camera only
    # 1.61 and 3.22 deg share MineWorld bin 11 but are VPT bins 7 and 8.
    small, large = ({**data.noop_action(), "camera": [0.0, c]} for c in minicraft.CAM_STEPS[:2])
    assert data.action_to_tokens(small) == data.action_to_tokens(large)
    assert data.action_to_tokens(small, camera_tokens="vpt") != data.action_to_tokens(large, camera_tokens="vpt")
    # Colliding camera angles per axis: ±1.61 and ±3.22 of pitch {0, ±steps} (4 of 9) and of yaw
    # {0, ±steps, ±flick ends} (4 of 13; flicks of 15 and 40 deg differ in MineWorld bins, not in VPT's).
    steps = [0.0, *minicraft.CAM_STEPS, *(-c for c in minicraft.CAM_STEPS)]
    pitch, yaw = np.array(steps), np.array(steps + [*minicraft.FLICK, *(-f for f in minicraft.FLICK)])
    assert colliding_fraction(pitch, "mineworld") == pytest.approx(4 / 9)
    assert colliding_fraction(yaw, "mineworld") == pytest.approx(4 / 13)
    assert colliding_fraction(pitch, "vpt") == colliding_fraction(yaw, "vpt") == 0.0


def test_collate_and_batches_pass_camera_tokens_through():
    rng = np.random.default_rng(0)
    actions = [{**data.noop_action(), "forward": 1, "camera": [float(p), float(y)]}
               for p, y in rng.choice([0.0, 1.61, -3.22, 5.81, 10.0], size=(16, 2))]
    clips = [(np.zeros((16, 2, 2, 3), np.uint8), actions)] * 2
    mw, vpt = data.collate(clips), data.collate(clips, camera_tokens="vpt")
    assert mw["tokens"][0, 3].tolist() == data.action_to_tokens(actions[3])  # the default is MineWorld's
    assert vpt["tokens"][0, 3].tolist() == data.action_to_tokens(actions[3], camera_tokens="vpt")
    assert not (mw["tokens"][..., 1:3] == vpt["tokens"][..., 1:3]).all()  # only the camera slots differ
    assert (mw["tokens"][..., [0, *range(3, 11)]] == vpt["tokens"][..., [0, *range(3, 11)]]).all()
    first = torch.tensor([data.MINEWORLD_ACTION_VOCAB["cam_0_0"], data.MINEWORLD_ACTION_VOCAB["cam_1_0"]])  # [2]
    assert (vpt["tokens"][..., 1:3] - 8192 - first - data.VPT_TOKEN_SHIFT == vpt["camera_bins"]).all()
    batch = next(data.batches(clips, 2, seed=0, offset=16, camera_tokens="vpt"))
    assert (batch["tokens"] == vpt["tokens"] - 8192 + 16).all()
    with pytest.raises(ValueError, match="camera_tokens must be 'mineworld' or 'vpt'"):
        data.action_to_tokens(actions[0], camera_tokens="vqt")
