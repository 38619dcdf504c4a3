"""minicraft: determinism, the clip format, and that every action group has a visible effect."""
import numpy as np
import pytest

import data
import minicraft as mc


def run(actions, seed=3, pitch=20.0, flat=False):
    """Play `actions` from the same start in one world; return (frames, the Worlds object).
    `flat` levels the terrain so that nothing blocks the player."""
    w = mc.Worlds([seed])
    w.players[0].pitch = pitch
    if flat:
        w.height[:] = 0
    w.targets()
    frames = [w.render()[0]]
    for a in actions:
        w.step([{**data.noop_action(), **a}])
        frames.append(w.render()[0])
    return np.stack(frames).astype(np.float32), w


def diff(a, b):
    return float(np.abs(a - b).mean())


def test_clips_format_and_determinism():
    got = list(mc.clips(3, seed=5))
    assert len(got) == 3
    frames, actions, gui = got[0]
    assert frames.shape == (16, 64, 64, 3) and frames.dtype == np.uint8
    assert len(actions) == 16 and gui.shape == (16,) and gui.dtype == bool
    assert all(set(a) <= set(data.NOOP_ACTION) and len(a["camera"]) == 2 for a in actions)  # keys pressed
    again = list(mc.clips(3, seed=5))
    for (f1, a1, g1), (f2, a2, g2) in zip(got, again):
        assert np.array_equal(f1, f2) and a1 == a2 and np.array_equal(g1, g2)
    other = next(mc.clips(1, seed=6))[0]
    assert diff(other.astype(np.float32), frames.astype(np.float32)) > 5
    assert next(mc.clips(1, seed=5, height=48, width=80))[0].shape == (16, 48, 80, 3)
    with pytest.raises(ValueError, match="multiple of 16"):
        mc.Worlds([0], 60, 64)


def test_movement_groups_move_the_player_as_the_keys_say():
    still, _ = run([{}] * 3)
    assert diff(still[0], still[-1]) < 2.0                    # only the clouds drift
    p0 = run([], flat=True)[1].players[0]
    yaw = np.radians(p0.yaw)
    fwd, right = np.array([np.sin(yaw), np.cos(yaw)]), np.array([np.cos(yaw), -np.sin(yaw)])
    moved = {}
    for key, a in [("forward", {"forward": 1}), ("sprint", {"forward": 1, "sprint": 1}),
                   ("sneak", {"forward": 1, "sneak": 1}), ("back", {"back": 1}),
                   ("left", {"left": 1}), ("right", {"right": 1}),
                   ("both", {"left": 1, "right": 1})]:
        frames, w = run([a] * 3, flat=True)
        moved[key] = np.array([w.players[0].x - p0.x, w.players[0].z - p0.z])
        if key != "both":
            assert diff(frames[0], frames[-1]) > 3, key       # the view changes visibly
    assert moved["forward"] @ fwd == pytest.approx(3 * mc.WALK, abs=1e-4)
    assert moved["sprint"] @ fwd == pytest.approx(3 * mc.SPRINT, abs=1e-4)
    assert moved["sneak"] @ fwd == pytest.approx(3 * mc.SNEAK, abs=1e-4)
    assert moved["back"] @ fwd == pytest.approx(-3 * mc.WALK, abs=1e-4)
    assert moved["right"] @ right == pytest.approx(3 * mc.WALK, abs=1e-4)
    assert moved["left"] @ right == pytest.approx(-3 * mc.WALK, abs=1e-4)
    assert np.allclose(moved["both"], 0)                      # a pair pressed together cancels
    _, w = run([{"forward": 1}] * 3)                          # in the real scene a tree blocks
    assert (np.array([w.players[0].x - p0.x, w.players[0].z - p0.z]) @ fwd) < 3 * mc.WALK


def test_sprint_widens_the_view_and_sneak_lowers_the_eye():
    walk, _ = run([{"forward": 1}])
    sprint, ws = run([{"forward": 1, "sprint": 1}])
    assert ws.players[0].sprinting and diff(walk[1], sprint[1]) > 1
    stand, w0 = run([{}])
    sneak, w1 = run([{"sneak": 1}])
    assert w1.eye(w1.players[0]) == pytest.approx(w0.eye(w0.players[0]) - (mc.EYE - mc.SNEAK_EYE))
    assert diff(stand[1], sneak[1]) > 3


def test_jump_is_an_arc_over_several_frames():
    frames, w = run([{"jump": 1}] + [{}] * (len(mc.JUMP_ARC) + 1))
    still, _ = run([{}] * (len(mc.JUMP_ARC) + 2))
    gaps = [diff(a, b) for a, b in zip(frames, still)]
    assert gaps[1] > 3 and gaps[3] > gaps[1]                  # up, higher at the top of the arc
    assert gaps[-1] < 2.0 and w.players[0].jump == 0          # and back on the ground


def test_attack_cracks_then_breaks_and_use_places():
    frames, w = run([{"attack": 1}] * mc.BREAK_FRAMES, pitch=20.0)
    start = mc.Worlds([3])
    start.players[0].pitch = 20.0
    start.targets()
    cell = start.aim[0][0]
    assert start.height.ravel()[cell] >= 1, "the test scene aims at a tree"
    assert w.height.ravel()[cell] == start.height.ravel()[cell] - 1   # one block mined
    assert diff(frames[0], frames[1]) > 1                     # the hand swings at once
    frames, w = run([{"use": 1}])
    assert w.height.sum() == start.height.sum() + 1           # one block placed
    assert diff(frames[0], frames[1]) > 3


def test_drop_throws_and_gui_overlays_and_camera_turns():
    drop, w = run([{"drop": 1}, {}])
    still, _ = run([{}, {}])
    assert w.players[0].thrown and diff(drop[2], still[2]) > 0.3
    gui, w = run([{"inventory": 1}, {"forward": 1}, {"inventory": 1}])
    assert w.players[0].gui == "" and diff(gui[1], gui[0]) > 30
    assert diff(gui[1], gui[2]) < 0.5                         # input is eaten while it is open
    esc, w = run([{"ESC": 1}])
    assert w.players[0].gui == "esc" and diff(esc[1], gui[1]) > 10
    for cam in ([5.81, 0.0], [0.0, 5.81], [-1.61, 0.0], [0.0, -1.61]):
        frames, w = run([{"camera": cam}])
        assert diff(frames[0], frames[1]) > 1, cam
    _, w = run([{"camera": [1.61, -3.22]}])
    assert w.players[0].pitch == pytest.approx(20 + 1.61)


def test_scripted_player_covers_every_group_without_conflicts():
    acts = [a for _, actions, _ in mc.clips(32, seed=0) for a in actions]
    n = len(acts)
    for key in ("forward", "back", "left", "right", "sprint", "sneak", "jump", "attack", "use",
                "drop", "inventory"):
        share = sum(a.get(key, 0) for a in acts) / n
        assert share > 0.003, key
    moving = [a for a in acts if a["camera"][1] != 0]
    assert 0.2 < len(moving) / n < 0.8                        # smooth moves and stillness
    for a, b in (("sprint", "sneak"), ("jump", "sneak"), ("attack", "use")):
        assert not any(x.get(a) and x.get(b) for x in acts), (a, b)
    assert not any(x.get("sprint") and not x.get("forward") for x in acts)   # sprint needs forward


def test_cli_writes_clips_that_data_reads_back(tmp_path):
    mc.main(["--sheet", str(tmp_path / "sheet.png")])
    assert (tmp_path / "sheet.png").stat().st_size > 1000
    data.main(["--out", str(tmp_path), "--clips", "4", "--seed", "1"])
    clips = list(mc.clips(4, seed=1))
    for n, (frames, actions, gui) in enumerate(clips):
        got_frames, got_actions, got_gui = data.read_clip(tmp_path / f"clip_{n}.mp4",
                                                         tmp_path / f"clip_{n}.jsonl")
        assert got_actions == [{**data.noop_action(), **a} for a in actions]   # identical after the round trip
        assert np.array_equal(got_gui, gui)
        assert got_frames.shape == frames.shape
        mse = np.mean((got_frames.astype(np.float32) - frames) ** 2)
        assert 10 * np.log10(255 ** 2 / mse) > 30             # H.264 at high quality: PSNR > 30 dB
    loaded, skips = data.load_clips(data.DataConfig(source=str(tmp_path), max_clips=None,
                                                    static_threshold=0.0))
    kept = sum(not g.any() for _, _, g in clips)              # GUI windows are filtered out
    assert len(loaded) == kept and sum(skips.counts.values()) == 4 - kept
