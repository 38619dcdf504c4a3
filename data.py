"""Clips in, tensors out: the data side of RLIR (paper §5.1).

Reads clips in MineWorld's validation layout (clip_<N>.mp4 + clip_<N>.jsonl, env-format actions) and
raw VPT contractor recordings (640x360 mp4 + contractor jsonl), converts contractor actions exactly as
VPT / MineWorld do, quantizes cameras (VPT 11 bins, MineWorld 21 bins), tokenizes actions into
MineWorld's 11 tokens, builds the 7 + 2 evaluation groups of Table 3, drops GUI and static windows,
and collates clips into a batch of tensors. Every conversion is checked bit for bit against outputs
of the original code (the parity fixtures read by tests/test_data.py; not shipped with the repository). It also
writes the embedded world's clips (minicraft.py) to files in that layout:

    python data.py --out OUT --clips 64 --seed 1                  # 64 clips, clip_<n>.mp4 + .jsonl

Facts used: docs/formats.md §1.5, §1.7, §1.8, §2.4, §2.6; the clip convention: docs/conventions.md §1.1, §1.2.
"""

import argparse
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal

import av
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import minicraft
import runtime
from runtime import ConfigError, UsageError, at_least, check_fields, cli, nonempty


@dataclass
class DataConfig:
    # "minicraft" (the embedded world) or a path: a VPT index JSON, a MineWorld clip_<N> folder,
    # or a folder of contractor <name>.mp4 + <name>.jsonl pairs
    source: str = "minicraft"
    height: int = 64  # model frame height in pixels (paper scale: 224)
    width: int = 64  # model frame width in pixels (paper scale: 384)
    clip_len: int = 16  # frames per clip: 1 context + 15 generated (paper §5.1)
    stride: int = 16  # window stride in frames when cutting long recordings into clips
    static_threshold: float = 1.0  # static window: every consecutive-frame mean |diff| below this (uint8 levels)
    drop_gui: bool = True  # drop windows with any GUI frame (paper §5.1: the IDM cannot read GUI frames)
    truncate_camera: bool = True  # contractor camera truncated toward 0 to whole degrees, as VPT (docs/formats.md §2.6)
    mineworld_conflicts: bool = True  # clear conflicting key pairs as MineWorld's converter does (docs/formats.md §1.7)
    max_clips: int | None = 1000  # stop after this many clips (paper: ~1000 training samples suffice); None = all
    seed: int = 0  # seed of the embedded world's clip generator
    # Camera slots of the action tokens (`action_to_tokens`): "mineworld" = MineWorld's 21-bin quantizer, needed
    # for real MineWorld checkpoints (it merges some VPT bins, e.g. 1.61 and 3.22 deg); "vpt" = one token per
    # VPT 11-bin class, so every scored camera bin is a function of the tokens (docs/conventions.md §8.2)
    camera_tokens: Literal["mineworld", "vpt"] = "mineworld"

    def __post_init__(self):
        check_fields(self, {
            "source": nonempty('"minicraft" or a path'), "height": at_least(1),
            "width": at_least(1), "clip_len": at_least(2, "a context frame and at least one to predict"),
            "stride": at_least(1), "static_threshold": at_least(0), "max_clips": at_least(1),
            "seed": at_least(0, "numpy seeds are >= 0")})
        if self.source == "minicraft":                         # the embedded world: endless, rendered at this size
            if self.max_clips is None:
                raise ConfigError("max_clips=None: must be set when source is 'minicraft' (the world is endless)")
            for side in ("height", "width"):                   # minicraft.Worlds renders sides in multiples of 16
                if getattr(self, side) % 16:
                    raise ConfigError(f"{side}={getattr(self, side)}: must be a multiple of 16 when source is "
                                      f"'minicraft' (the sides the embedded world renders)")


# ----------------------------------------------------------------------------------------------
# Frames: bilinear resize with cv2.INTER_LINEAR semantics (docs/formats.md §2.2, step 1)

def resize_frames(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize uint8 [..., H, W, 3] frames to [..., height, width, 3] like cv2.resize(INTER_LINEAR).

    Half-pixel centres (align_corners=False) and no antialiasing, as cv2 does even when shrinking.
    cv2 works in 11-bit fixed point, so results can differ from it by 1 level. Identity if sizes match.
    """
    if frames.shape[-3:-1] == (height, width):
        return frames
    lead, (h, w, c) = frames.shape[:-3], frames.shape[-3:]
    flat = frames.reshape(-1, h, w, c)  # [N, H, W, 3]
    out = np.empty((flat.shape[0], height, width, c), dtype=np.uint8)  # [N, h, w, 3]
    for i in range(0, flat.shape[0], 64):  # chunks bound the float32 copy of long recordings
        x = torch.from_numpy(flat[i:i + 64]).permute(0, 3, 1, 2).float()  # [n, 3, H, W]
        # Source x = (dst + 0.5) * in / out - 0.5, clamped at the borders: cv2's INTER_LINEAR mapping.
        y = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False,
                          antialias=False)  # [n, 3, h, w]
        out[i:i + 64] = y.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()  # [n, h, w, 3]
    return out.reshape(*lead, height, width, c)


# ----------------------------------------------------------------------------------------------
# Actions: env format (VPT/MineRL keys), the IDM's 20 buttons, contractor-jsonl conversion

# The env-format no-op in VPT's key order (docs/formats.md §1.7); camera = [pitch, yaw] in degrees, + pitch = look down.
NOOP_ACTION = {
    "ESC": 0, "back": 0, "drop": 0, "forward": 0,
    **{f"hotbar.{k}": 0 for k in range(1, 10)},
    "inventory": 0, "jump": 0, "left": 0, "right": 0, "sneak": 0, "sprint": 0, "swapHands": 0,
    "camera": [0.0, 0.0], "attack": 0, "use": 0, "pickItem": 0,
}
BUTTON_KEYS = tuple(k for k in NOOP_ACTION if k != "camera")  # the 22 binary keys (0 = up, 1 = pressed)

# The IDM's 20 buttons in VPT's Buttons.ALL order (docs/formats.md §2.4): no ESC, swapHands or pickItem.
VPT_BUTTONS = ("attack", "back", "forward", "jump", "left", "right", "sneak", "sprint", "use", "drop",
               "inventory", *(f"hotbar.{k}" for k in range(1, 10)))

# Contractor key names -> env keys (docs/formats.md §2.6); keys not listed are ignored.
KEYBOARD_BUTTON_MAPPING = {
    "key.keyboard.escape": "ESC", "key.keyboard.s": "back", "key.keyboard.q": "drop",
    "key.keyboard.w": "forward", **{f"key.keyboard.{k}": f"hotbar.{k}" for k in range(1, 10)},
    "key.keyboard.e": "inventory", "key.keyboard.space": "jump", "key.keyboard.a": "left",
    "key.keyboard.d": "right", "key.keyboard.left.shift": "sneak",
    "key.keyboard.left.control": "sprint", "key.keyboard.f": "swapHands",
}
MOUSE_BUTTON_MAPPING = {0: "attack", 1: "use", 2: "pickItem"}
CAMERA_SCALER = 360.0 / 2400.0  # degrees per mouse count (0.15)

# MineWorld's conflict clearing, checked in this order; both keys of a pressed pair are released (docs/formats.md §1.7).
MINEWORLD_CONFLICTS = (("forward", "back"), ("left", "right"), ("jump", "sneak"), ("sprint", "sneak"),
                       ("attack", "use"))


def noop_action() -> dict:
    """A fresh env-format no-op (its own camera list)."""
    return {**NOOP_ACTION, "camera": [0.0, 0.0]}  # key order kept, so jsonl lines match VPT's


def contractor_to_env(line: dict, mineworld: bool = False, truncate_camera: bool = True) -> tuple[dict, bool]:
    """One contractor jsonl line -> (env action, is_null), as VPT's json_action_to_env_action (docs/formats.md §2.6).

    camera = [dy, dx] * 0.15 deg. VPT stores it in an int64 array, so by default it is truncated toward
    zero to whole degrees (1.5 -> 1, -0.99 -> 0); keep that for bit-exact agreement with VPT/MineWorld,
    set truncate_camera=False for the true angle. The camera is not clipped. is_null is True when no
    mapped key, mouse button (0/1/2) or mouse motion is present (a non-zero dx/dy counts even when the
    truncated camera is 0). mineworld=True adds MineWorld's conflict clearing (pairs in
    MINEWORLD_CONFLICTS) and marks inventory/ESC steps as null (docs/formats.md §1.7).
    """
    action, is_null = noop_action(), True  # null until a mapped key, mouse button or motion shows up
    # Keys held on this tick; unmapped keys (t, tab, left.alt, ...) are ignored.
    for key in line["keyboard"]["keys"]:
        if key in KEYBOARD_BUTTON_MAPPING:
            action[KEYBOARD_BUTTON_MAPPING[key]] = 1
            is_null = False
    mouse = line["mouse"]  # dx, dy: raw mouse counts since the previous tick
    camera = [mouse["dy"] * CAMERA_SCALER, mouse["dx"] * CAMERA_SCALER]  # [pitch, yaw] degrees
    if truncate_camera:
        camera = [float(int(v)) for v in camera]  # int() truncates toward zero, like the int64 store
    action["camera"] = [float(v) + 0.0 for v in camera]  # + 0.0 turns -0.0 into 0.0
    # Motion counts even when truncation left the camera at [0, 0]. VPT's |camera| > 180 reset runs only
    # when dx = dy = 0, so it never changes anything and is omitted (docs/formats.md §2.6).
    if mouse["dx"] != 0 or mouse["dy"] != 0:
        is_null = False
    # Mouse buttons held: 0 = left (attack), 1 = right (use), 2 = middle (pickItem).
    for button, key in MOUSE_BUTTON_MAPPING.items():
        if button in mouse["buttons"]:
            action[key] = 1
            is_null = False
    if mineworld:
        # Checked in order, so space+shift clears jump+sneak and sprint survives a later sprint+sneak check.
        for a, b in MINEWORLD_CONFLICTS:
            if action[a] and action[b]:
                action[a] = action[b] = 0
        # GUI keys make the step null; the null flag ignores the clearing above (w+s stays non-null).
        if action["inventory"] or action["ESC"]:
            is_null = True
    return action, is_null


def contractor_actions(lines: list[dict], mineworld: bool = False,
                       truncate_camera: bool = True) -> tuple[list[dict], np.ndarray]:
    """All lines of one recording -> (env actions, is_null bool [N]) with VPT data_loader.py's rules.

    1. Attack stuck: if line 0 has newButtons == [0], mouse button 0 is dropped until a later line has
       0 in newButtons (the recorder started with attack held).
    2. A change of the 0-based `hotbar` field (e.g. scroll wheel) presses hotbar.{field+1}, in addition
       to any keys. is_null is decided before this step, as in VPT.
    Null actions are kept here (the world model needs every frame); `vpt_dataloader_actions` drops them.
    """
    actions, is_null = [], []
    stuck, last_hotbar = False, 0
    for i, line in enumerate(lines):
        # Rule 1: attack pressed exactly at the first tick is a recorder artifact, held until re-pressed.
        if i == 0:
            stuck = line["mouse"]["newButtons"] == [0]
        elif stuck and 0 in line["mouse"]["newButtons"]:
            stuck = False
        if stuck:
            line = {**line, "mouse": {**line["mouse"], "buttons": [b for b in line["mouse"]["buttons"] if b != 0]}}
        action, null = contractor_to_env(line, mineworld, truncate_camera)
        # Rule 2: the selected slot changed (keys or scroll wheel); the first line compares with slot 0.
        if line["hotbar"] != last_hotbar:
            action[f"hotbar.{line['hotbar'] + 1}"] = 1
        last_hotbar = line["hotbar"]
        actions.append(action)
        is_null.append(null)
    return actions, np.array(is_null, dtype=bool)


def vpt_dataloader_actions(lines: list[dict]) -> list[tuple[int, dict]]:
    """VPT's BC data loader path: (line index, action) for the non-null lines only."""
    actions, is_null = contractor_actions(lines)
    return [(i, a) for i, (a, null) in enumerate(zip(actions, is_null)) if not null]


# ----------------------------------------------------------------------------------------------
# Camera quantizers: mu-law, then uniform bins (docs/formats.md §2.4 for VPT, §1.5 for MineWorld)

VPT_CAMERA = dict(maxval=10, binsize=2, mu=10)  # 11 bins, bin 5 = no motion (the IDM's camera head)
MINEWORLD_CAMERA = dict(maxval=90, binsize=9, mu=11.4887)  # 21 bins, bin 10 = no motion (action tokens)


def camera_to_bins(deg, maxval: float = 10, binsize: float = 2, mu: float = 10) -> np.ndarray:
    """Degrees -> int64 bins: clip to ±maxval, mu-law encode, round((x + maxval) / binsize).

    The operation order is VPT's CameraQuantizer's, so boundary cases round identically; np.round is
    half-to-even.
    """
    # Mu-law spends the bins on small motions: with VPT's settings ±0.15 deg already leaves bin 5,
    # and everything beyond ±10 deg is bin 0 or 10.
    x = np.clip(np.asarray(deg, dtype=np.float64), -maxval, maxval) / maxval  # in [-1, 1]
    x = np.sign(x) * (np.log(1.0 + mu * np.abs(x)) / np.log(1.0 + mu)) * maxval  # mu-law, in degrees
    return np.round((x + maxval) / binsize).astype(np.int64)  # half to even, like VPT


def bins_to_camera(bins, maxval: float = 10, binsize: float = 2, mu: float = 10) -> np.ndarray:
    """Bins -> degrees (float64): the inverse mu-law of each bin's centre."""
    x = (np.asarray(bins) * binsize - maxval) / maxval  # bin centre on the mu-law scale, in [-1, 1]
    return np.sign(x) * (1.0 / mu) * ((1.0 + mu) ** np.abs(x) - 1.0) * maxval


# ----------------------------------------------------------------------------------------------
# MineWorld action tokens: 11 per action (docs/formats.md §1.5)

# Raw ids 0..67 in MineWorld's Buttons.ALL order; the model adds `offset` (8192, after the VQ codes).
MINEWORLD_ACTION_VOCAB = {
    name: i for i, name in enumerate(
        ["use", "attack", "forward", "back", "left", "right", "jump", "sneak", "sprint", "drop", "swapHands",
         "pickItem", "inventory", "ESC", *(f"hotbar.{k}" for k in range(1, 10)),
         *(f"cam_0_{b}" for b in range(21)), *(f"cam_1_{b}" for b in range(21)),
         "<act_bos>", "<null_act>", "<act_eos>"])
}
# Token slots 4..9: one of the pair (null when both or neither pressed); jump alone is slot 8.
MINEWORLD_PAIR_SLOTS = (("forward", "back"), ("left", "right"), ("sprint", "sneak"), ("use", "attack"),
                        ("jump", None), ("drop", "pickItem"))
# camera_tokens="vpt": VPT bin b (0..10) takes the id of MineWorld bin b + 5 (5..15). Injective and
# order-keeping, and no motion (VPT 5) keeps MineWorld's no-motion id (10). The id of the MineWorld bin of
# each VPT bin centre is not injective: 0 and ±0.615 deg share bin 10, ±1.609 and ±3.215 deg share 9 / 11.
VPT_TOKEN_SHIFT = 5


def action_to_tokens(action: dict, offset: int = 8192, camera_tokens: str = "mineworld") -> list[int]:
    """Env action -> 11 MineWorld token ids: [bos, pitch, yaw, hotbar, fwd|back, left|right,
    sprint|sneak, use|attack, jump, drop|pickItem, eos]. swapHands, inventory and ESC are never emitted.
    camera_tokens (DataConfig.camera_tokens) picks the camera quantizer of slots 1, 2: "mineworld" (21 bins)
    or "vpt" (the IDM's 11 bins, on the ids of MineWorld bins 5..15); the ids stay in MineWorld's 68."""
    v = MINEWORLD_ACTION_VOCAB
    null = v["<null_act>"]
    if camera_tokens == "mineworld":
        pitch, yaw = camera_to_bins(action["camera"], **MINEWORLD_CAMERA)  # slot 1 = camera[0], slot 2 = camera[1]
    elif camera_tokens == "vpt":
        pitch, yaw = camera_to_bins(action["camera"], **VPT_CAMERA) + VPT_TOKEN_SHIFT  # MineWorld bins 5..15
    else:
        raise ValueError(f"data.camera_tokens must be 'mineworld' or 'vpt', got {camera_tokens!r}")
    hotbar = next((v[f"hotbar.{k}"] for k in range(1, 10) if action[f"hotbar.{k}"]), null)  # lowest pressed
    tokens = [v["<act_bos>"], v[f"cam_0_{pitch}"], v[f"cam_1_{yaw}"], hotbar]  # slots 0..3
    # Slots 4..9. No conflict clearing happens here beyond the per-slot rule: jump+sneak both survive,
    # since they sit in different slots (MineWorld's env-format path, fixture env_actions.jsonl).
    for a, b in MINEWORLD_PAIR_SLOTS:
        pressed_a, pressed_b = bool(action[a]), bool(b and action[b])
        tokens.append(v[a] if pressed_a and not pressed_b else v[b] if pressed_b and not pressed_a else null)
    tokens.append(v["<act_eos>"])  # slot 10
    return [t + offset for t in tokens]  # ids 8192..8259 with the default offset (docs/formats.md §1.5)


# ----------------------------------------------------------------------------------------------
# Arrays and the 9 evaluation groups (paper App. A.1 Table 3; MineWorld metrics/IDM, docs/formats.md §1.8)

GROUP_NAMES = ("forward_back", "left_right", "sprint_sneak", "use", "attack", "jump", "drop",
               "camera_pitch", "camera_yaw")
N_DISCRETE_GROUPS = 7  # groups 0..6 are scored with P/R/F1; 7, 8 are VPT camera bins (0..10)
# 3-way pairs in MineWorld's metric order (first, second): label 1 = first only, 2 = second only,
# 0 = neither or both. So forward_back: 1 = back, 2 = forward; left_right: 1 = left, 2 = right;
# sprint_sneak: 1 = sneak, 2 = sprint.
GROUP_PAIRS = (("back", "forward"), ("left", "right"), ("sneak", "sprint"))
GROUP_BINARY = ("use", "attack", "jump", "drop")


def actions_to_arrays(actions: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Env actions -> (buttons int64 [T, 20] in VPT_BUTTONS order, camera float32 [T, 2] [pitch, yaw] deg)."""
    buttons = np.array([[int(bool(a[k])) for k in VPT_BUTTONS] for a in actions], dtype=np.int64)  # [T, 20]
    camera = np.array([a["camera"] for a in actions], dtype=np.float32).reshape(-1, 2)  # [T, 2]
    return buttons.reshape(-1, len(VPT_BUTTONS)), camera


def action_groups(buttons, camera_bins):
    """Buttons [..., 20] (VPT_BUTTONS order, 0/1) and VPT camera bins [..., 2] -> int64 groups [..., 9].

    Works on numpy arrays and torch tensors alike (the IDM reward calls it on batched tensors).
    """
    col = {name: i for i, name in enumerate(VPT_BUTTONS)}
    # Only comparisons, bool &, ~ and integer arithmetic, which numpy and torch spell the same way.
    pressed = buttons > 0  # [..., 20] bool
    groups = []
    for first, second in GROUP_PAIRS:
        a, b = pressed[..., col[first]], pressed[..., col[second]]  # [...]
        groups.append(1 * (a & ~b) + 2 * (b & ~a))  # 0 neither/both, 1 first only, 2 second only
    groups += [1 * pressed[..., col[name]] for name in GROUP_BINARY]  # use, attack, jump, drop: 0/1
    groups += [camera_bins[..., 0], camera_bins[..., 1]]  # pitch, yaw bins
    if isinstance(buttons, torch.Tensor):
        return torch.stack([g.long() for g in groups], dim=-1)  # [..., 9]
    return np.stack(groups, axis=-1).astype(np.int64)  # [..., 9]


def label_weights(clips: list[tuple]) -> torch.Tensor:
    """Inverse label frequencies of the 7 judged groups over frames 1..T-1 of `clips` -> float [7, 11]:
    frames / (count + 1), so a rare label weighs as much as a common one in the class-balanced reward
    (rl.granularity "balanced"); a label never seen counts as seen once."""
    groups = np.concatenate([action_groups(actions_to_arrays(clip[1])[0], camera_to_bins(
        np.array([a["camera"] for a in clip[1]], dtype=np.float64), **VPT_CAMERA))[1:] for clip in clips])  # [N, 9]
    counts = np.stack([np.bincount(groups[:, g], minlength=11) for g in range(N_DISCRETE_GROUPS)])  # [7, 11]
    return torch.from_numpy(len(groups) / (counts + 1.0)).float()


def gui_from_actions(actions: list[dict]) -> np.ndarray:
    """Fallback GUI flag when a file has no isGuiOpen: inventory or ESC pressed. bool [T]."""
    return np.array([bool(a["inventory"] or a["ESC"]) for a in actions], dtype=bool)


# ----------------------------------------------------------------------------------------------
# Clip I/O in MineWorld's validation layout (docs/formats.md §1.7): clip_<N>.mp4 + clip_<N>.jsonl
#
# Clip convention (docs/conventions.md §1.1, §1.2). A clip is frames x_0..x_{T-1} and jsonl lines a_0..a_{T-1} where a_t
# is the action that produced frame x_t from x_{t-1}: line 0 precedes the clip and is never scored
# (rewards and metrics use t = 1..T-1). This is how MineWorld's validation files are stored.
# VPT contractor recordings store line i with frame i: the input pressed while frame i was shown,
# which leads to frame i+1. We convert by shifting the recording's actions right by one: a_t = line
# t-1, with a no-op at t = 0 of the recording (see `read_contractor_recording`). The GUI flag
# `isGuiOpen` of line i describes frame i and is not shifted.

class ClipError(UsageError, ValueError):
    """A file that cannot give a clip; `reason` names the SkipReport count it goes to."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def write_video(path: str | Path, frames, fps: int, crf: int = 10) -> None:
    """H.264 mp4 of uint8 RGB frames [T, H, W, 3] (H, W even). CRF 10 is visually lossless; what
    remains is mostly yuv420p's half-resolution colour, which MineWorld's clips and players use."""
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps, options={"crf": str(crf)})
        stream.width, stream.height, stream.pix_fmt = frames[0].shape[1], frames[0].shape[0], "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
        container.mux(stream.encode())  # flush the encoder


def write_clip(dir: str | Path, index: int, frames: np.ndarray, actions: list[dict],
               gui: np.ndarray | None = None, fps: int = 20) -> tuple[Path, Path]:
    """Write clip_<index>.mp4 (H.264, yuv420p, CRF 10) and clip_<index>.jsonl; returns both paths."""
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    t, h, w, _ = frames.shape  # [T, H, W, 3]
    if len(actions) != t or (gui is not None and len(gui) != t):
        raise ValueError(f"write_clip: {t} frames but {len(actions)} actions"
                         f"{'' if gui is None else f' and {len(gui)} GUI flags'}; give one per frame.")
    if h % 2 or w % 2:
        raise ValueError(f"write_clip: frame size {h}x{w} must be even for yuv420p; resize first.")
    mp4, jsonl = dir / f"clip_{index}.mp4", dir / f"clip_{index}.jsonl"
    write_video(mp4, frames, fps)
    # One env-format dict per line, keys in NOOP_ACTION order, buttons 0/1, camera [pitch, yaw] floats.
    with open(jsonl, "w") as f:
        for i, action in enumerate(actions):
            line = {k: (int(action.get(k, 0)) if k != "camera" else [float(c) for c in action["camera"]])
                    for k in NOOP_ACTION}
            if gui is not None:
                line["isGuiOpen"] = bool(gui[i])
            f.write(json.dumps(line) + "\n")
    return mp4, jsonl


def read_video(path: str | Path, height: int | None = None, width: int | None = None) -> np.ndarray:
    """Decode every frame of a video to RGB uint8 [T, H, W, 3], resized (cv2 INTER_LINEAR) if asked."""
    chunks, chunk = [], []
    try:
        with av.open(str(path)) as container:
            for frame in container.decode(video=0):
                chunk.append(frame.to_ndarray(format="rgb24"))  # [H, W, 3]
                if len(chunk) == 64:  # resize in chunks so full-size frames are never all in memory
                    chunks.append(_resize_chunk(chunk, height, width))
                    chunk = []
    except (av.error.FFmpegError, OSError, IndexError) as e:  # IndexError: no video stream
        raise ClipError("unreadable_mp4", f"{path}: cannot decode the video ({e})") from None
    if chunk:
        chunks.append(_resize_chunk(chunk, height, width))
    if not chunks:
        raise ClipError("unreadable_mp4", f"{path}: the video has no decodable frames")
    return np.concatenate(chunks)


def _resize_chunk(chunk: list[np.ndarray], height: int | None, width: int | None) -> np.ndarray:
    frames = np.stack(chunk)  # [n, H, W, 3]
    return frames if height is None else resize_frames(frames, height, width)


def read_jsonl(path: str | Path) -> list[dict]:
    """Every line of a jsonl file as a dict; a bad line raises ClipError naming file and line number."""
    lines = []
    with open(path) as f:
        for n, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                line = json.loads(text)
            except json.JSONDecodeError as e:
                raise ClipError("bad_jsonl", f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(line, dict):
                raise ClipError("bad_jsonl", f"{path}:{n}: expected a JSON object, got {type(line).__name__}")
            lines.append(line)
    return lines


def env_action_from_line(line: dict) -> dict:
    """An env-format jsonl line -> an env action with every NOOP_ACTION key (extra keys dropped)."""
    if "camera" not in line or "mouse" in line:
        raise ValueError("not an env-format action line (no 'camera', or a contractor 'mouse' field); "
                         "contractor recordings are read with read_contractor_recording")
    # Missing keys are 0 (not pressed); extra keys such as isGuiOpen or a note are not actions.
    action = {k: int(line.get(k, 0)) for k in BUTTON_KEYS}
    camera = [float(c) for c in line["camera"]]
    if len(camera) != 2:
        raise ValueError(f"camera must be [pitch, yaw], got {line['camera']}")
    return {**noop_action(), **action, "camera": camera}


def read_clip(mp4_path: str | Path, jsonl_path: str | Path, height: int | None = None,
              width: int | None = None) -> tuple[np.ndarray, list[dict], np.ndarray | None]:
    """Read one MineWorld-layout clip -> (frames uint8 [T, H, W, 3], env actions, gui bool [T] or None).

    gui is the jsonl's isGuiOpen when every line has it, else None. Frames are resized if height/width
    are given. Raises ClipError on an unreadable video, bad lines or a frame/line count mismatch.
    """
    lines = read_jsonl(jsonl_path)  # cheap checks first: a bad jsonl never costs a video decode
    try:
        actions = [env_action_from_line(line) for line in lines]
    except (ValueError, TypeError) as e:
        raise ClipError("bad_jsonl", f"{jsonl_path}: {e}") from None
    gui = (np.array([bool(line["isGuiOpen"]) for line in lines], dtype=bool)
           if lines and all("isGuiOpen" in line for line in lines) else None)
    frames = read_video(mp4_path, height, width)  # [T, H, W, 3]
    if len(frames) != len(actions):
        raise ClipError("length_mismatch",
                        f"{mp4_path}: {len(frames)} frames but {len(actions)} jsonl lines in {jsonl_path}")
    return frames, actions, gui


# ----------------------------------------------------------------------------------------------
# Filtering and windowing (paper §5.1: drop GUI interactions and static scenes)

@dataclass
class SkipReport:
    """What was dropped and why: counts per reason, and (file, reason) for files that failed."""
    counts: Counter = field(default_factory=Counter)
    files: list = field(default_factory=list)

    def add(self, reason: str, path: str | Path | None = None, detail: str = "") -> None:
        # Reasons: unreadable_mp4, bad_jsonl, length_mismatch, too_short, missing_jsonl, empty_folder
        # (files, named) and gui, static (windows, counted only).
        self.counts[reason] += 1
        if path is not None:
            self.files.append((str(path), f"{reason}: {detail}" if detail else reason))

    def __str__(self) -> str:
        # Printable by the caller; the first 20 failed files are named.
        lines = [f"skipped: {dict(self.counts)}" if self.counts else "skipped: nothing"]
        lines += [f"  {path}: {why}" for path, why in self.files[:20]]
        if len(self.files) > 20:
            lines.append(f"  ... and {len(self.files) - 20} more files")
        return "\n".join(lines)


def frame_motion(frames: np.ndarray) -> np.ndarray:
    """Mean absolute difference between consecutive frames, in uint8 levels: float64 [T-1]."""
    out = []
    for i in range(0, len(frames) - 1, 256):  # chunks bound the int16 copy of long recordings
        j = min(i + 256, len(frames) - 1)
        a, b = frames[i:j].astype(np.int16), frames[i + 1:j + 1].astype(np.int16)  # [n, H, W, 3] each
        out.append(np.abs(b - a).mean(axis=(1, 2, 3)))  # [n]
    return np.concatenate(out) if out else np.zeros(0)  # [T-1]


def window_clips(frames: np.ndarray, actions: list[dict], gui: np.ndarray | None, cfg: DataConfig,
                 skips: SkipReport) -> Iterator[tuple[np.ndarray, list[dict], np.ndarray]]:
    """Cut a recording (already in the clip convention) into clip_len windows every cfg.stride frames,
    dropping GUI windows (any frame with the GUI open) and static windows (every consecutive-frame
    motion below cfg.static_threshold). Drops are counted in `skips` under "gui" and "static"."""
    gui = gui_from_actions(actions) if gui is None else np.asarray(gui, dtype=bool)  # [N]
    motion = frame_motion(frames)  # [N-1], motion[t] between frames t and t+1
    for s in range(0, len(frames) - cfg.clip_len + 1, cfg.stride):  # frames after the last window are unused
        e = s + cfg.clip_len
        # GUI frames show menus the IDM was not trained to read (the inventory screen, paused game).
        if cfg.drop_gui and gui[s:e].any():
            skips.add("gui")
        # Static: nothing moves anywhere in the window, so every action is equally (un)recoverable.
        elif motion[s:e - 1].max() < cfg.static_threshold:
            skips.add("static")
        else:
            yield frames[s:e], actions[s:e], gui[s:e]


# ----------------------------------------------------------------------------------------------
# Readers: MineWorld folders, VPT contractor recordings, the embedded world

def _clip_number(path: Path) -> int:
    return int(re.fullmatch(r"clip_(\d+)", path.stem).group(1))


def read_mineworld_folder(folder: str | Path, cfg: DataConfig,
                          skips: SkipReport) -> Iterator[tuple[np.ndarray, list[dict], np.ndarray]]:
    """clip_<N>.mp4 + clip_<N>.jsonl in integer order of N (docs/formats.md §1.7) -> filtered clips.

    Unreadable videos, bad jsonl, length mismatches and clips shorter than clip_len are skipped and
    counted in `skips`; a longer clip is windowed like a recording.
    """
    folder = Path(folder)
    # Integer order: clip_10 after clip_2, as MineWorld's loader sorts them.
    mp4s = sorted((p for p in folder.glob("clip_*.mp4") if re.fullmatch(r"clip_\d+", p.stem)), key=_clip_number)
    if not mp4s:
        skips.add("empty_folder", folder, "no clip_<N>.mp4 files")
    for mp4 in mp4s:
        clip = _read_or_skip(lambda: read_clip(mp4, mp4.with_suffix(".jsonl"), cfg.height, cfg.width), mp4, cfg, skips)
        if clip is not None:
            yield from window_clips(*clip, cfg, skips)


def read_contractor_recording(mp4_path: str | Path, jsonl_path: str | Path, cfg: DataConfig
                              ) -> tuple[np.ndarray, list[dict], np.ndarray]:
    """One VPT recording (640x360 mp4, one contractor line per frame, docs/formats.md §2.6) in the clip convention.

    Actions use VPT's data-loader rules (attack stuck, hotbar field) but keep null steps, so frames stay
    contiguous. They are shifted by one (a_t = line t-1, a_0 = no-op; see the clip-convention block).
    gui = isGuiOpen per frame when present, else inventory/ESC in the line of that frame.
    """
    lines = read_jsonl(jsonl_path)
    try:
        line_actions, _ = contractor_actions(lines, cfg.mineworld_conflicts, cfg.truncate_camera)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ClipError("bad_jsonl", f"{jsonl_path}: not a contractor jsonl (missing or bad field {e})") from None
    # isGuiOpen is recorded per tick; without it, fall back to the GUI keys of that line.
    gui = np.array([bool(line.get("isGuiOpen", a["inventory"] or a["ESC"])) for line, a in zip(lines, line_actions)])
    # Frames are resized while decoding (640x360 -> cfg size), so a recording never sits in memory at 640x360.
    frames = read_video(mp4_path, cfg.height, cfg.width)  # [N, H, W, 3]
    if len(frames) != len(lines):
        raise ClipError("length_mismatch",
                        f"{mp4_path}: {len(frames)} frames but {len(lines)} jsonl lines in {jsonl_path}")
    actions = [noop_action()] + line_actions[:-1]  # a_t = line t-1
    return frames, actions, gui


def _read_or_skip(read, mp4: Path, cfg: DataConfig, skips: SkipReport):
    """Run a clip reader; on bad input count the reason, name the file and return None."""
    jsonl = mp4.with_suffix(".jsonl")
    # Every failure below is per file: counted, named, and the next file is read.
    if not jsonl.exists():
        skips.add("missing_jsonl", mp4, f"no {jsonl.name} next to it")
        return None
    try:
        frames, actions, gui = read()
    except ClipError as e:
        skips.add(e.reason, mp4, str(e))
        return None
    if len(frames) < cfg.clip_len:
        skips.add("too_short", mp4, f"{len(frames)} frames < clip_len {cfg.clip_len}")
        return None
    return frames, actions, gui


def read_contractor(source: str | Path, cfg: DataConfig,
                    skips: SkipReport) -> Iterator[tuple[np.ndarray, list[dict], np.ndarray]]:
    """VPT contractor data -> filtered clips. `source` is an index JSON {"basedir", "relpaths"} (files
    <basedir>/<relpath>.mp4 and .jsonl; a relative basedir is taken from the index's folder) or a
    folder of <name>.mp4 + <name>.jsonl pairs."""
    source = Path(source)
    if source.suffix == ".json":
        # A bad index is a configuration error, not a bad clip: fail fast (docs/conventions.md §7.2).
        try:
            index = json.loads(source.read_text())
            basedir = source.parent / index["basedir"]  # an absolute basedir replaces source.parent
            mp4s = [basedir / f"{rel}.mp4" for rel in index["relpaths"]]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{source}: not a VPT index; expected JSON {{\"basedir\": ..., \"relpaths\": [...]}} "
                             f"({type(e).__name__}: {e})") from None
    else:
        mp4s = sorted(source.glob("*.mp4"))
    if not mp4s:
        skips.add("empty_folder", source, "no .mp4 recordings")
    for mp4 in mp4s:
        recording = _read_or_skip(lambda: read_contractor_recording(mp4, mp4.with_suffix(".jsonl"), cfg),
                                  mp4, cfg, skips)
        if recording is not None:
            yield from window_clips(*recording, cfg, skips)


def minicraft_clips(cfg: DataConfig, n: int | None, skips: SkipReport,
                    max_dropped_in_a_row: int = 1000) -> Iterator[tuple[np.ndarray, list[dict], np.ndarray]]:
    """Clips of the embedded world (minicraft.py), with the same GUI/static filtering; n=None is endless.

    Raises RuntimeError if `max_dropped_in_a_row` generated clips in a row are all filtered out.
    """
    dropped = 0  # generated clips in a row with no surviving window: guards an endless loop
    for frames, actions, gui in minicraft.clips(None, cfg.seed, cfg.height, cfg.width, cfg.clip_len):
        actions = [{**noop_action(), **a} for a in actions]  # the world names only the pressed keys
        kept = list(window_clips(frames, actions, gui, cfg, skips))
        dropped = 0 if kept else dropped + 1
        if dropped >= max_dropped_in_a_row:
            raise RuntimeError(f"minicraft (seed {cfg.seed}): {dropped} clips in a row were filtered out "
                               f"({dict(skips.counts)}); lower data.static_threshold or check minicraft.")
        for clip in kept:
            yield clip
            if n is not None:
                n -= 1
                if n <= 0:
                    return


def load_clips(cfg: DataConfig) -> tuple[list[tuple[np.ndarray, list[dict], np.ndarray]], SkipReport]:
    """All clips of cfg.source (at most cfg.max_clips) and the report of what was skipped.

    Raises UsageError naming the source and the skip counts when no clip survives.
    """
    skips = SkipReport()
    if cfg.source == "minicraft":                             # max_clips is set (DataConfig)
        clips = minicraft_clips(cfg, cfg.max_clips, skips)
    else:
        source = Path(cfg.source)
        if not source.exists():
            raise FileNotFoundError(f"data.source {source} does not exist; give 'minicraft', a VPT index "
                                    f"JSON, or a folder of clips")
        # MineWorld layout if the folder holds clip_<N>.mp4 files, else contractor recordings.
        is_mineworld = source.is_dir() and any(re.fullmatch(r"clip_\d+", p.stem) for p in source.glob("clip_*.mp4"))
        clips = read_mineworld_folder(source, cfg, skips) if is_mineworld else read_contractor(source, cfg, skips)
    out = []
    for clip in tqdm(clips, total=cfg.max_clips, desc=f"clips ({cfg.source}, seed {cfg.seed})", unit="clip",
                     leave=False):
        out.append(clip)
        if cfg.max_clips is not None and len(out) >= cfg.max_clips:
            break
    if not out:
        raise UsageError(f"no usable {cfg.clip_len}-frame clips in {cfg.source} ({skips}); check the files, "
                         f"or relax data.static_threshold / data.drop_gui")
    return out, skips


# ----------------------------------------------------------------------------------------------
# Batches

def collate(clips: list[tuple], offset: int = 8192, camera_tokens: str = "mineworld") -> dict[str, torch.Tensor]:
    """(frames [T, H, W, 3], actions[, gui]) clips -> batch dict of tensors.

    frames uint8 [B, T, H, W, 3]; buttons int64 [B, T, 20] (VPT_BUTTONS); camera float32 [B, T, 2]
    ([pitch, yaw] deg); camera_bins int64 [B, T, 2] (VPT 11 bins); groups int64 [B, T, 9] (GROUP_NAMES);
    tokens int64 [B, T, 11] (MineWorld action tokens; `offset` = the world model's image codebook size,
    8192 for MineWorld; `camera_tokens` = DataConfig.camera_tokens, see `action_to_tokens`).
    """
    # Row t of every field belongs to frame t: action t produced frame t, row 0 precedes the clip
    # (the clip-convention block above). Models condition on and score rows 1..T-1.
    frames = np.stack([clip[0] for clip in clips])  # [B, T, H, W, 3]
    arrays = [actions_to_arrays(clip[1]) for clip in clips]
    buttons = np.stack([b for b, _ in arrays])  # [B, T, 20]
    camera = np.stack([c for _, c in arrays])  # [B, T, 2]
    # Bin from the float64 angles, as VPT and MineWorld do: a float32 round trip could cross a bin edge.
    camera64 = np.array([[a["camera"] for a in clip[1]] for clip in clips], dtype=np.float64)  # [B, T, 2]
    camera_bins = camera_to_bins(camera64, **VPT_CAMERA)  # [B, T, 2], binned before the float32 cast
    tokens = np.array([[action_to_tokens(a, offset, camera_tokens) for a in clip[1]] for clip in clips],
                      dtype=np.int64)  # [B, T, 11]
    return {
        "frames": torch.from_numpy(frames),
        "buttons": torch.from_numpy(buttons),
        "camera": torch.from_numpy(camera),
        "camera_bins": torch.from_numpy(camera_bins),
        "groups": torch.from_numpy(action_groups(buttons, camera_bins)),
        "tokens": torch.from_numpy(tokens),
    }


def batches(clips: list[tuple], batch_size: int, seed: int, start_step: int = 0, rank: int = 0,
            world_size: int = 1, offset: int = 8192, camera_tokens: str = "mineworld"
            ) -> Iterator[dict[str, torch.Tensor]]:
    """Endless shuffled batches of `collate`d clips, resumable from any step.

    batch_size is the global batch; rank r of world_size gets every world_size-th clip of it. Epoch e
    visits each clip at most once, in the order of a permutation seeded by (seed, e); the last
    incomplete batch of an epoch is dropped. Step s is a pure function of (seed, s), so resuming at
    start_step = the checkpoint's step continues exactly.
    """
    if batch_size % world_size:
        raise ValueError(f"batch size {batch_size} must be divisible by the number of ranks {world_size}")
    per_epoch = len(clips) // batch_size
    if per_epoch == 0:
        raise ValueError(f"{len(clips)} clips are fewer than one batch of {batch_size}; "
                         f"add data or lower the batch size")
    step = start_step
    # Rebuilding the permutation each step keeps the iterator stateless; it costs microseconds.
    while True:
        epoch, i = divmod(step, per_epoch)
        order = np.random.default_rng([seed, epoch]).permutation(len(clips))  # [N]
        chosen = order[i * batch_size:(i + 1) * batch_size][rank::world_size]  # [batch_size / world_size]
        yield collate([clips[j] for j in chosen], offset, camera_tokens)
        step += 1


# ----------------------------------------------------------------------------------------------
# Command line: the embedded world's clips as files

def main(argv: list[str]) -> None:
    """Write `--clips` clips of minicraft.clips (seeded by `--seed`, unfiltered: readers drop GUI and static
    windows) to `--out` as clip_<n>.mp4 + clip_<n>.jsonl, which read_mineworld_folder reads back."""
    ap = minicraft.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for clip_<n>.mp4 + clip_<n>.jsonl")
    ap.add_argument("--clips", type=int, default=64, help="number of 16-frame clips")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--height", type=int, default=64)
    ap.add_argument("--width", type=int, default=64)
    args = ap.parse_args(argv)
    minicraft.check_flags(ap, args)                            # before the first frame is rendered
    runtime.output_folder(args.out, "--out")
    clips = minicraft.clips(args.clips, args.seed, args.height, args.width)
    for n, (frames, actions, gui) in enumerate(tqdm(clips, total=args.clips, desc="clips")):
        write_clip(args.out, n, frames, actions, gui)  # frames [16, H, W, 3]; keys not pressed are written as 0


if __name__ == "__main__":
    cli(main)
