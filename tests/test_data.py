"""Tests for data.py: exact parity with the VPT/MineWorld fixtures, clip I/O, filtering, bad input."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import data
from runtime import UsageError

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
if not FIXTURES.exists():
    FIXTURES = Path("/work/shared/fixtures")
ACTIONS = FIXTURES / "actions"


def _jsonl(path):
    return [json.loads(line) for line in open(path)]


def _env_only(row):
    """A fixture row without its bookkeeping fields (camera_dtype, is_null, line_index)."""
    return {k: v for k, v in row.items() if k not in ("camera_dtype", "is_null", "line_index", "note")}


@pytest.fixture(scope="module")
def contractor_lines():
    return _jsonl(ACTIONS / "contractor.jsonl")


# ---------------------------------------------------------------------------------------------
# Fixture parity (exact)

@pytest.mark.parametrize("name, mineworld", [("contractor_env.jsonl", False),
                                             ("contractor_env_mineworld.jsonl", True)])
def test_contractor_to_env_matches_reference(contractor_lines, name, mineworld):
    expected = _jsonl(ACTIONS / name)
    assert len(expected) == len(contractor_lines) == 43
    for i, (line, row) in enumerate(zip(contractor_lines, expected)):
        action, is_null = data.contractor_to_env(line, mineworld=mineworld)
        assert list(action) == list(_env_only(row)), f"line {i}: key order"
        assert action == _env_only(row), f"line {i}"
        assert is_null == row["is_null"], f"line {i}"


def test_contractor_camera_truncation_switch(contractor_lines):
    # line 4: dx = 10 -> 1.5 deg, truncated to 1 by default; line 27: dx, dy = -3.3, 1.7 counts
    assert data.contractor_to_env(contractor_lines[4])[0]["camera"] == [0.0, 1.0]
    exact, _ = data.contractor_to_env(contractor_lines[4], truncate_camera=False)
    assert exact["camera"] == [0.0, 10 * 0.15]
    mouse = contractor_lines[27]["mouse"]
    exact, _ = data.contractor_to_env(contractor_lines[27], truncate_camera=False)
    assert exact["camera"] == [mouse["dy"] * 0.15, mouse["dx"] * 0.15]


def test_vpt_dataloader_matches_reference(contractor_lines):
    expected = _jsonl(ACTIONS / "contractor_env_dataloader.jsonl")
    got = data.vpt_dataloader_actions(contractor_lines)
    assert [i for i, _ in got] == [row["line_index"] for row in expected]
    assert len(got) == 38
    for (i, action), row in zip(got, expected):
        assert action == _env_only(row), f"line {i}"


def test_contractor_actions_keeps_null_steps(contractor_lines):
    actions, is_null = data.contractor_actions(contractor_lines)
    assert len(actions) == 43
    assert np.flatnonzero(is_null).tolist() == [0, 2, 22, 26, 38]
    assert actions[0]["attack"] == 0 and actions[3]["attack"] == 1  # stuck until re-pressed on line 3
    assert actions[36]["hotbar.1"] == 1  # hotbar field 3 -> 0 presses hotbar.1


@pytest.mark.parametrize("name, quantizer", [("vpt_camera_bins.json", data.VPT_CAMERA),
                                             ("mineworld_camera_bins.json", data.MINEWORLD_CAMERA)])
def test_camera_quantizers_match_reference(name, quantizer):
    ref = json.load(open(ACTIONS / name))
    assert {k: ref["kwargs"][k] for k in ("camera_binsize", "camera_maxval", "camera_mu")} == {
        "camera_binsize": quantizer["binsize"], "camera_maxval": quantizer["maxval"], "camera_mu": quantizer["mu"]}
    degs = np.array([c["deg"] for c in ref["cases"]])
    bins = data.camera_to_bins(degs, **quantizer)
    assert bins.dtype == np.int64
    assert bins.tolist() == [c["bin"] for c in ref["cases"]]
    assert data.bins_to_camera(bins, **quantizer).tolist() == [c["decoded_deg"] for c in ref["cases"]]
    assert data.bins_to_camera(np.arange(ref["n_bins"]), **quantizer).tolist() == ref["bin_centers_deg"]


def test_mineworld_vocab_matches_reference():
    ref = json.load(open(ACTIONS / "mineworld_action_vocab.json"))
    assert list(data.MINEWORLD_ACTION_VOCAB) == list(ref)
    assert {k: v + 8192 for k, v in data.MINEWORLD_ACTION_VOCAB.items()} == ref


def test_mineworld_tokens_env_path():
    actions = _jsonl(ACTIONS / "env_actions.jsonl")
    expected = json.load(open(ACTIONS / "mineworld_tokens.json"))
    assert len(actions) == len(expected) == 42
    for i, (action, tokens) in enumerate(zip(actions, expected)):
        assert data.action_to_tokens(action) == tokens, f"case {i}: {action['note']}"


def test_mineworld_tokens_contractor_path(contractor_lines):
    expected = json.load(open(ACTIONS / "contractor_mineworld_tokens.json"))
    got = [data.action_to_tokens(data.contractor_to_env(line, mineworld=True)[0]) for line in contractor_lines]
    assert got == expected
    # offset only shifts ids
    assert data.action_to_tokens(data.noop_action(), offset=0) == [t - 8192 for t in expected[2]]


def test_resize_matches_cv2_fixture():
    ref = np.load(FIXTURES / "vpt_idm_small" / "resize_check.npz")
    out = data.resize_frames(ref["src"], 128, 128)  # [2, 128, 128, 3]
    assert out.shape == ref["dst"].shape and out.dtype == np.uint8
    diff = np.abs(out.astype(int) - ref["dst"].astype(int))
    assert diff.max() <= 1  # cv2 is 11-bit fixed point; measured max 1, mean 0.085
    assert diff.mean() < 0.2
    frames = ref["dst"][None]  # [1, 2, 128, 128, 3]: leading dims and identity
    assert data.resize_frames(frames, 128, 128) is frames
    assert data.resize_frames(frames, 64, 32).shape == (1, 2, 64, 32, 3)


def test_resize_hand_worked():
    # 1x4 -> 1x2: cv2 half-pixel centres sample x = 0.5 and 2.5, i.e. means of pairs, no antialias
    row = np.array([0, 100, 200, 250], dtype=np.uint8)[None, :, None].repeat(3, axis=2)  # [1, 4, 3]
    assert data.resize_frames(row, 1, 2)[0, :, 0].tolist() == [50, 225]


# ---------------------------------------------------------------------------------------------
# Arrays and groups

def _action(**pressed):
    return {**data.noop_action(), **pressed}


def test_actions_to_arrays_and_groups_hand_worked():
    actions = [
        _action(),
        _action(forward=1, left=1, sprint=1, camera=[-0.2, 3.0]),
        _action(forward=1, back=1, right=1, sneak=1, use=1, attack=1, jump=1, drop=1, camera=[12.0, -1.0]),
        _action(back=1, left=1, right=1, sneak=1, sprint=1, pickItem=1, camera=[0.7, -5.0]),
    ]
    buttons, camera = data.actions_to_arrays(actions)
    assert buttons.shape == (4, 20) and buttons.dtype == np.int64
    assert camera.dtype == np.float32 and np.array_equal(camera, np.float32([[0, 0], [-0.2, 3], [12, -1], [0.7, -5]]))
    assert buttons[1].tolist() == [0, 0, 1, 0, 1, 0, 0, 1] + [0] * 12
    bins = data.camera_to_bins(camera.astype(np.float64), **data.VPT_CAMERA)
    # by hand, bin = round((10 + sign(d) * 10 * ln(1 + |d|) / ln 11) / 2) for |d| <= 10:
    # -0.2 -> 4.62 -> 5; 3 -> 7.89 -> 8; 12 -> clipped to 10 -> 10; -1 -> 3.55 -> 4; 0.7 -> 6.11 -> 6;
    # -5 -> 1.26 -> 1
    assert bins.tolist() == [[5, 5], [5, 8], [10, 4], [6, 1]]
    groups = data.action_groups(buttons, bins)
    # columns: fwd/back (1 back, 2 fwd), left/right, sprint/sneak (1 sneak, 2 sprint),
    # use, attack, jump, drop, pitch bin, yaw bin; a pressed pair (row 2 fwd+back) is 0
    assert groups.tolist() == [
        [0, 0, 0, 0, 0, 0, 0, 5, 5],
        [2, 1, 2, 0, 0, 0, 0, 5, 8],
        [0, 2, 1, 1, 1, 1, 1, 10, 4],
        [1, 0, 0, 0, 0, 0, 0, 6, 1],
    ]
    assert groups.dtype == np.int64
    assert len(data.GROUP_NAMES) == 9 and data.N_DISCRETE_GROUPS == 7


def test_action_groups_torch_matches_numpy():
    rng = np.random.default_rng(0)
    buttons = rng.integers(0, 2, size=(3, 5, 20))  # [B, T, 20]
    bins = rng.integers(0, 11, size=(3, 5, 2))  # [B, T, 2]
    ref = data.action_groups(buttons, bins)
    got = data.action_groups(torch.from_numpy(buttons), torch.from_numpy(bins))
    assert isinstance(got, torch.Tensor) and got.dtype == torch.int64 and got.shape == (3, 5, 9)
    assert np.array_equal(got.numpy(), ref)
    assert set(np.unique(ref[..., :3])) <= {0, 1, 2} and set(np.unique(ref[..., 3:7])) <= {0, 1}


# ---------------------------------------------------------------------------------------------
# Clip I/O

def _moving_frames(t=16, h=32, w=48, seed=0):
    """Smooth gradient background with a moving bright square: compresses well, every frame differs."""
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 // w, y * 255 // h, (x + y) * 255 // (h + w)], axis=-1).astype(np.uint8)
    frames = np.repeat(base[None], t, axis=0)  # [T, H, W, 3]
    for i in range(t):
        frames[i, 8:16, (2 * i) % (w - 8):(2 * i) % (w - 8) + 8] = 250
    return frames


def _random_actions(t, seed=0, gui_keys=False):
    """Random env actions; inventory/ESC (the GUI fallback flag) only if gui_keys."""
    rng = np.random.default_rng(seed)
    actions = []
    for _ in range(t):
        a = data.noop_action()
        for k in data.BUTTON_KEYS:
            a[k] = int(rng.random() < 0.2 and (gui_keys or k not in ("inventory", "ESC")))
        a["camera"] = [float(rng.normal() * 3), float(np.round(rng.normal() * 3, 2))]
        actions.append(a)
    return actions


def test_write_read_round_trip(tmp_path):
    frames, actions = _moving_frames(), _random_actions(16, gui_keys=True)
    gui = np.arange(16) % 5 == 0
    mp4, jsonl = data.write_clip(tmp_path, 7, frames, actions, gui=gui)
    assert mp4.name == "clip_7.mp4" and jsonl.name == "clip_7.jsonl"
    got_frames, got_actions, got_gui = data.read_clip(mp4, jsonl)
    assert got_actions == actions
    assert np.array_equal(got_gui, gui)
    assert got_frames.shape == frames.shape and got_frames.dtype == np.uint8
    err = np.abs(got_frames.astype(int) - frames.astype(int)).mean()
    # yuv420p alone (chroma subsampling of these saturated edges) costs ~2.0 levels; H.264 must add little
    av = pytest.importorskip("av")
    yuv_only = np.mean([np.abs(av.VideoFrame.from_ndarray(f, format="rgb24").reformat(format="yuv420p")
                               .to_ndarray(format="rgb24").astype(int) - f) for f in frames])
    assert err < yuv_only + 0.3, (err, yuv_only)
    psnr = 10 * np.log10(255**2 / np.mean((got_frames.astype(float) - frames) ** 2))
    assert psnr > 30, psnr
    # without gui: no isGuiOpen key, read back as None; resize on read
    data.write_clip(tmp_path, 8, frames, actions)
    assert "isGuiOpen" not in json.loads(open(tmp_path / "clip_8.jsonl").readline())
    small, _, no_gui = data.read_clip(tmp_path / "clip_8.mp4", tmp_path / "clip_8.jsonl", 16, 24)
    assert small.shape == (16, 16, 24, 3) and no_gui is None


def test_write_clip_rejects_odd_size_and_count_mismatch(tmp_path):
    with pytest.raises(ValueError, match="even"):
        data.write_clip(tmp_path, 0, np.zeros((16, 15, 16, 3), np.uint8), _random_actions(16))
    with pytest.raises(ValueError, match="16 frames but 3 actions"):
        data.write_clip(tmp_path, 0, np.zeros((16, 16, 16, 3), np.uint8), _random_actions(3))


# ---------------------------------------------------------------------------------------------
# Windowing and filtering

def test_window_gui_and_static_filtering():
    cfg = data.DataConfig(clip_len=16, stride=8, static_threshold=1.0)
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, size=(48, 8, 8, 3), dtype=np.uint8)  # [48, 8, 8, 3], moving everywhere
    frames[24:48] = frames[24]  # frames 24..47 are identical: windows starting at 24 and 32 are static
    actions = [data.noop_action() for _ in range(48)]
    gui = np.zeros(48, bool)
    gui[3] = True  # window 0 has a GUI frame
    skips = data.SkipReport()
    kept = list(data.window_clips(frames, actions, gui, cfg, skips))
    # windows start at 0, 8, 16, 24, 32: 0 -> gui, 8 and 16 kept (16 has motion 16..24), 24 and 32 static
    assert len(kept) == 2
    assert np.array_equal(kept[0][0], frames[8:24]) and np.array_equal(kept[1][0], frames[16:32])
    assert skips.counts == {"gui": 1, "static": 2}
    # fallback GUI flag: inventory/ESC pressed when there is no isGuiOpen
    actions[20]["ESC"] = 1
    skips = data.SkipReport()
    kept = list(data.window_clips(frames, actions, None, cfg, skips))
    assert len(kept) == 1 and skips.counts == {"gui": 2, "static": 2}  # windows 8 and 16 hold frame 20


def test_static_threshold_is_per_pair_maximum():
    cfg = data.DataConfig(clip_len=4, stride=4, static_threshold=2.0)
    frames = np.zeros((4, 2, 2, 3), np.uint8)
    frames[2:] = 3  # one jump of 3 levels between frames 1 and 2
    assert data.frame_motion(frames).tolist() == [0.0, 3.0, 0.0]
    skips = data.SkipReport()
    assert len(list(data.window_clips(frames, [data.noop_action()] * 4, None, cfg, skips))) == 1
    frames[2:] = 1  # the largest change is 1 level < 2: static
    assert len(list(data.window_clips(frames, [data.noop_action()] * 4, None, cfg, skips))) == 0
    assert skips.counts == {"static": 1}


# ---------------------------------------------------------------------------------------------
# Readers and bad input

def _cfg(source, **kw):
    return data.DataConfig(source=str(source), height=16, width=16, clip_len=16, stride=16,
                           static_threshold=0.5, max_clips=None, **kw)


def test_mineworld_folder_bad_inputs_are_skipped_and_counted(tmp_path):
    frames, actions = _moving_frames(), _random_actions(16)
    for n in (0, 10, 2):  # good clips; read in integer order 0, 2, 10
        data.write_clip(tmp_path, n, np.roll(frames, n, axis=2), actions)
    (tmp_path / "clip_3.mp4").write_bytes(b"this is not an mp4" * 50)  # garbage video
    (tmp_path / "clip_3.jsonl").write_text("".join(json.dumps(a) + "\n" for a in actions))
    data.write_clip(tmp_path, 4, frames, actions)
    good = (tmp_path / "clip_4.mp4").read_bytes()
    (tmp_path / "clip_4.mp4").write_bytes(good[: len(good) // 2])  # truncated video
    data.write_clip(tmp_path, 5, frames, actions)
    with open(tmp_path / "clip_5.jsonl", "a") as f:
        f.write("{not json\n")  # bad jsonl line
    data.write_clip(tmp_path, 6, frames, actions)
    with open(tmp_path / "clip_6.jsonl", "a") as f:
        f.write(json.dumps(actions[0]) + "\n")  # 17 lines for 16 frames
    data.write_clip(tmp_path, 7, frames[:10], actions[:10])  # too short
    data.write_clip(tmp_path, 8, frames, actions)
    (tmp_path / "clip_8.jsonl").unlink()  # video without actions

    clips, skips = data.load_clips(_cfg(tmp_path))  # reads on after every bad file
    assert len(clips) == 3
    assert [c[0][0].tolist() for c in clips] == [
        data.read_clip(tmp_path / f"clip_{n}.mp4", tmp_path / f"clip_{n}.jsonl", 16, 16)[0][0].tolist()
        for n in (0, 2, 10)]
    assert clips[0][1] == actions
    assert skips.counts == {"unreadable_mp4": 2, "bad_jsonl": 1, "length_mismatch": 1, "too_short": 1,
                            "missing_jsonl": 1}
    named = dict(skips.files)
    assert named[str(tmp_path / "clip_5.mp4")].startswith("bad_jsonl") and ":17:" in named[str(tmp_path / "clip_5.mp4")]
    assert "17 jsonl lines" in named[str(tmp_path / "clip_6.mp4")]
    assert "clip_7.mp4" in str(skips) and "too_short" in str(skips)


def test_nothing_survives_raises_with_path_and_counts(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UsageError, match="empty_folder") as err:
        data.load_clips(_cfg(empty))
    assert str(empty) in str(err.value)
    bad = tmp_path / "bad"
    data.write_clip(bad, 0, _moving_frames(t=8), _random_actions(8))
    data.write_clip(bad, 1, np.zeros((16, 16, 16, 3), np.uint8), _random_actions(16))  # static
    with pytest.raises(UsageError) as err:
        data.load_clips(_cfg(bad))
    message = str(err.value)
    assert str(bad) in message and "'too_short': 1" in message and "'static': 1" in message
    assert "clip_0.mp4" in message
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.load_clips(_cfg(tmp_path / "nowhere"))


def _write_recording(folder, name, lines, frames):
    """A contractor recording: <name>.mp4 + <name>.jsonl (raw contractor lines)."""
    folder.mkdir(parents=True, exist_ok=True)
    mp4, jsonl = data.write_clip(folder, 0, frames, [data.noop_action()] * len(frames))
    mp4.rename(folder / f"{name}.mp4")
    jsonl.unlink()
    (folder / f"{name}.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


def test_contractor_reader_shift_gui_and_index(tmp_path, contractor_lines):
    rng = np.random.default_rng(1)
    frames = rng.integers(0, 256, size=(43, 36, 64, 3), dtype=np.uint8)  # [43, 36, 64, 3], 43 lines
    _write_recording(tmp_path / "data" / "v7", "rec-a", contractor_lines, frames)
    index = tmp_path / "index.json"
    index.write_text(json.dumps({"basedir": "data", "relpaths": ["v7/rec-a"]}))
    cfg = _cfg(index, mineworld_conflicts=False)
    cfg.stride = 8

    got_frames, got_actions, gui = data.read_contractor_recording(
        tmp_path / "data" / "v7" / "rec-a.mp4", tmp_path / "data" / "v7" / "rec-a.jsonl", cfg)
    line_actions, _ = data.contractor_actions(contractor_lines)
    assert got_actions[0] == data.noop_action() and got_actions[1:] == line_actions[:-1]  # a_t = line t-1
    assert np.flatnonzero(gui).tolist() == [17, 18, 19, 32]  # isGuiOpen, not shifted
    assert got_frames.shape == (43, 16, 16, 3)

    clips, skips = data.load_clips(cfg)
    # windows start at 0, 8, 16, 24; 8 and 16 hold frames 17..19, 24 holds frame 32
    assert len(clips) == 1 and skips.counts == {"gui": 3}
    assert clips[0][1] == got_actions[:16]
    # the same recording as a plain folder of pairs, with MineWorld's conflict clearing
    clips, _ = data.load_clips(_cfg(tmp_path / "data" / "v7", mineworld_conflicts=True))
    mw_actions, _ = data.contractor_actions(contractor_lines, mineworld=True)
    assert clips[0][1] == [data.noop_action()] + mw_actions[:15]


def test_contractor_reader_counts_length_mismatch(tmp_path, contractor_lines):
    frames = np.random.default_rng(2).integers(0, 256, size=(40, 16, 16, 3), dtype=np.uint8)
    _write_recording(tmp_path, "rec", contractor_lines, frames)  # 40 frames, 43 lines
    with pytest.raises(UsageError, match="length_mismatch"):
        data.load_clips(_cfg(tmp_path))


# ---------------------------------------------------------------------------------------------
# The embedded world and batches

def test_minicraft_wrapper_filters_with_fake_world(monkeypatch):
    def clips(n, seed, height=64, width=64, clip_len=16):
        rng = np.random.default_rng(seed)
        i = 0
        while n is None or i < n:
            frames = rng.integers(0, 256, size=(clip_len, height, width, 3), dtype=np.uint8)
            if i % 3 == 1:
                frames[:] = frames[0]  # static
            gui = np.zeros(clip_len, bool)
            gui[5] = i % 3 == 2
            yield frames, [data.noop_action() for _ in range(clip_len)], gui
            i += 1

    monkeypatch.setattr(data.minicraft, "clips", clips)
    cfg = data.DataConfig(height=16, width=16, max_clips=4)    # sides the embedded world renders
    got, skips = data.load_clips(cfg)
    assert len(got) == 4 and skips.counts == {"static": 3, "gui": 3}
    assert all(not c[2].any() for c in got)
    monkeypatch.setattr(data.minicraft, "clips", lambda n, seed, h, w, t: (
        (np.zeros((t, h, w, 3), np.uint8), [data.noop_action()] * t, np.zeros(t, bool)) for _ in iter(int, 1)))
    with pytest.raises(RuntimeError, match="in a row"):
        next(data.minicraft_clips(cfg, None, data.SkipReport(), max_dropped_in_a_row=5))


def test_minicraft_real_world_gives_clips():
    cfg = data.DataConfig(height=32, width=32, max_clips=3, seed=0)
    clips, _ = data.load_clips(cfg)
    again, _ = data.load_clips(cfg)
    assert len(clips) == 3 and clips[0][0].shape == (16, 32, 32, 3)
    assert all(np.array_equal(a[0], b[0]) and a[1] == b[1] for a, b in zip(clips, again))  # deterministic


def test_collate_shapes_and_values():
    frames = np.stack([_moving_frames(t=16, h=8, w=16), _moving_frames(t=16, h=8, w=16)[::-1]])
    actions = [_random_actions(16, seed=1), _random_actions(16, seed=2)]
    # clips with and without the gui element collate alike
    batch = data.collate([(frames[0], actions[0]), (frames[1], actions[1], np.zeros(16, bool))])
    assert batch["frames"].dtype == torch.uint8 and batch["frames"].shape == (2, 16, 8, 16, 3)
    specs = {"buttons": (torch.int64, 20), "camera": (torch.float32, 2), "camera_bins": (torch.int64, 2),
             "groups": (torch.int64, 9), "tokens": (torch.int64, 11)}
    for key, (dtype, width) in specs.items():
        assert batch[key].dtype == dtype and batch[key].shape == (2, 16, width), key
    assert batch["tokens"][1, 3].tolist() == data.action_to_tokens(actions[1][3])
    cam = np.array([a["camera"] for a in actions[0]])
    assert batch["camera_bins"][0].numpy().tolist() == data.camera_to_bins(cam, **data.VPT_CAMERA).tolist()
    assert torch.equal(batch["groups"], data.action_groups(batch["buttons"], batch["camera_bins"]))
    assert batch["buttons"][0, :, 0].tolist() == [a["attack"] for a in actions[0]]


def test_batches_shuffle_resume_and_rank_split():
    clips = [(np.full((2, 2, 2, 3), i, np.uint8), [data.noop_action()] * 2) for i in range(10)]

    def ids(it, n):
        return [b["frames"][:, 0, 0, 0, 0].tolist() for _, b in zip(range(n), it)]

    run = ids(data.batches(clips, 4, seed=3), 6)
    assert [len(b) for b in run] == [4] * 6
    assert len(set(run[0] + run[1])) == 8  # one epoch (2 batches of 4 from 10 clips) repeats no clip
    assert run[2:4] != run[0:2]  # a new permutation each epoch
    assert ids(data.batches(clips, 4, seed=3, start_step=3), 3) == run[3:6]  # exact resume
    parts = [ids(data.batches(clips, 4, seed=3, rank=r, world_size=2), 2) for r in (0, 1)]
    assert [sorted(a + b) for a, b in zip(*parts)] == [sorted(b) for b in run[:2]]
    with pytest.raises(ValueError, match="fewer than one batch"):
        next(data.batches(clips, 16, seed=0))


def test_contractor_bad_index_and_env_format_jsonl(tmp_path):
    index = tmp_path / "index.json"
    index.write_text(json.dumps({"relpaths": ["a"]}))  # no basedir
    with pytest.raises(ValueError, match="not a VPT index"):
        data.load_clips(_cfg(index))
    # an env-format jsonl (MineWorld style) next to a recording is not contractor data: skipped, named
    frames = np.random.default_rng(3).integers(0, 256, size=(16, 16, 16, 3), dtype=np.uint8)
    _write_recording(tmp_path / "rec", "r", _random_actions(16), frames)
    with pytest.raises(UsageError, match="'bad_jsonl': 1") as err:
        data.load_clips(_cfg(tmp_path / "rec"))
    assert "r.jsonl: not a contractor jsonl" in str(err.value)
