"""minicraft: the embedded world. A procedural first-person block world rendered in numpy.

Real Minecraft data (VPT contractor videos, MineWorld's validation clips) cannot be downloaded
everywhere, so rlir ships this small world. It is driven by the same env-format actions as VPT /
MineRL (forward, back, left, right, jump, sneak, sprint, attack, use, drop, inventory, ESC,
hotbar.1-9, camera=[pitch, yaw] degrees), and data.py records its clips in MineWorld's validation
layout, so every later stage (IDM, world models, GRPO) runs unchanged on it and on the real data.
There is no learning here, and nothing of the data side: an action is a dict holding the camera and a 1
for each key pressed; a key that is absent is up (data.py fills in the full env-format dict).

    python data.py --out OUT --clips 64 --seed 1                  # 64 clips, clip_<n>.mp4 + .jsonl
    python minicraft.py --sheet assets/minicraft_actions.png      # contact sheet: one row per action
    python minicraft.py --bench --clips 512                       # frames/s on one core

Rendering is a heightmap ray caster: one 2D ray per screen column walks the grid of block columns
(DDA), and every pixel of that column takes the first column whose top it passes under. Pitch is a
vertical shear of the view (as in Doom/Build engines), so each screen column keeps one horizontal
direction and the per-pixel work is a handful of gathers. That keeps a 64x64 frame well under a
millisecond on one core.
"""
import argparse
import itertools
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

import runtime

# ---------------------------------------------------------------------------------------------
# Constants of the world. They are chosen for visibility at 64x64 pixels, not to copy Minecraft's
# numbers: every evaluation group must leave a mark an IDM can read from small frames.
# ---------------------------------------------------------------------------------------------
MAP = 128                 # the map is a MAP x MAP torus of block columns (a power of 2: wrap = &)
VIEW_STEPS = 20           # grid cells each column ray visits (about 11-20 blocks of view)
FOG = (6.0, 11.0)         # fog starts / is total at these distances (blocks), hiding the far clip
FOV = 70.0                # horizontal field of view in degrees
SPRINT_FOV = 1.12         # sprinting widens the view a little (Minecraft: up to x1.15)
EYE, SNEAK_EYE = 1.62, 1.15     # eye height above the feet, standing / sneaking (blocks)
WALK, SPRINT, SNEAK = 0.30, 0.48, 0.13   # blocks per frame
JUMP_ARC = (0.45, 0.80, 1.00, 1.08, 1.00, 0.80, 0.45, 0.0)  # feet offset on each frame of a jump
REACH = 4.5               # blocks: attack and use act on the targeted block within reach
BREAK_FRAMES = 4          # frames of attack on one block to break it (cracks grow meanwhile)
TEX = 8                   # texels per block face side

# Block kinds. A column is a stack of `height` blocks; its kind picks the textures.
AIR, GRASS, DIRT, STONE, SAND, TREE, PLANKS, COBBLE, BRICK = range(9)
HOTBAR = (PLANKS, COBBLE, BRICK, STONE, DIRT, SAND, PLANKS, COBBLE, BRICK)  # block held per slot

# ---------------------------------------------------------------------------------------------
# Textures: one 8x8 RGB image per face kind, made procedurally from a fixed seed.
# ---------------------------------------------------------------------------------------------
def _textures() -> np.ndarray:
    """[n, 8, 8, 3] float32 in [0, 255]; index with the *_TEX constants below."""
    rng = np.random.default_rng(12345)

    def speckle(base, amp):                                  # noisy flat colour
        n = rng.uniform(-amp, amp, (TEX, TEX, 1))
        return np.clip(np.array(base, np.float32) + n * np.array(base) / 100, 0, 255)

    grass_top = speckle((95, 159, 53), 25)
    dirt = speckle((134, 96, 67), 25)
    grass_side = dirt.copy()
    grass_side[:2] = grass_top[:2]                           # green fringe on the top rows
    grass_side[2, rng.random(TEX) < 0.5] = grass_top[2, 0]
    stone = speckle((125, 125, 125), 20)
    sand = speckle((219, 207, 163), 10)
    log = speckle((104, 83, 50), 15)
    log[:, ::3] *= 0.75                                      # bark stripes
    log_top = speckle((158, 128, 80), 10)
    log_top[2:6, 2:6] *= 0.8                                 # rings
    leaves = speckle((58, 120, 40), 45)
    leaves[rng.random((TEX, TEX)) < 0.2] *= 0.55             # holes between leaves
    planks = speckle((170, 135, 80), 10)
    planks[[1, 5]] *= 0.7                                    # board seams
    planks[2:5, 3] *= 0.8
    planks[6:8, 6] *= 0.8
    cobble = speckle((110, 110, 110), 35)
    cobble[[0, 3, 6], :] *= 0.6                              # mortar
    brick = speckle((150, 70, 55), 10)
    brick[[3, 7], :] = 190
    brick[:3, 4] = 190
    brick[4:7, 0] = 190
    return np.stack([grass_top, grass_side, dirt, stone, sand, log, log_top, leaves, planks,
                     cobble, brick]).astype(np.float32)


(GRASS_TOP_T, GRASS_SIDE_T, DIRT_T, STONE_T, SAND_T, LOG_T, LOG_TOP_T, LEAVES_T, PLANKS_T,
 COBBLE_T, BRICK_T) = range(11)
TEXTURES = _textures()
HORIZON = np.array([180.0, 210.0, 235.0])                  # fog colour, the sky at the horizon
N_FOG, N_SKY = 16, 64     # fog levels; sky gradient levels (elevation -0.6..1.4 rad)


def _palette() -> np.ndarray:
    """Every colour a frame can hold, so that a frame is one gather: uint8 [n, 3]. Ground
    entries are indexed ((texture * 64 + texel) * 9 + face * 3 + mark) * N_FOG + fog, with face
    top / x-facing / z-facing shading and mark none / crack / outline; after them come N_SKY
    sky gradient levels, the sun and a cloud."""
    face = np.array([1.0, 0.78, 0.62])[None, :, None, None, None]
    mark = np.array([1.0, 0.35, 0.15])[None, None, :, None, None]
    fog = np.linspace(0, 1, N_FOG)[None, None, None, :, None]
    ground = TEXTURES.reshape(-1, 1, 1, 1, 3) * face * mark * (1 - fog) + fog * HORIZON
    elev = np.arange(N_SKY)[:, None] / (N_SKY / 2) - 0.6
    sky = np.concatenate([180 - 80 * elev, 210 - 60 * elev, 235 + 20 * elev], 1)
    return np.clip(np.concatenate([ground.reshape(-1, 3), sky, [[255, 250, 190], [245, 245, 245]]]),
                   0, 255).astype(np.uint8)


PALETTE = _palette()
SKY = len(PALETTE) - N_SKY - 2                               # palette index of the sky levels,
SUN, CLOUD = SKY + N_SKY, SKY + N_SKY + 1                    # the sun and a cloud
# Per kind: texture of the top face, of the upper side levels, of the lower side levels, and how
# many levels count as "upper" (grass shows its green fringe on the top level, trees show leaves
# on their top two levels above a trunk).
TOP_T = np.array([0, GRASS_TOP_T, DIRT_T, STONE_T, SAND_T, LEAVES_T, PLANKS_T, COBBLE_T, BRICK_T])
UPPER_T = np.array([0, GRASS_SIDE_T, DIRT_T, STONE_T, SAND_T, LEAVES_T, PLANKS_T, COBBLE_T,
                    BRICK_T])
LOWER_T = np.array([0, DIRT_T, DIRT_T, STONE_T, SAND_T, LOG_T, PLANKS_T, COBBLE_T, BRICK_T])
N_UPPER = np.array([0, 1, 0, 0, 0, 2, 0, 0, 0], np.float32)
# Crack overlays for the attack animation: stage s darkens a growing random set of texels.
CRACKS = np.random.default_rng(7).random((TEX, TEX))[None] < np.linspace(
    0.0, 0.6, BREAK_FRAMES + 1)[:, None, None]                 # [stages, 8, 8] bool


# ---------------------------------------------------------------------------------------------
# The map: heights and kinds of MAP x MAP block columns, from smooth value noise.
# ---------------------------------------------------------------------------------------------
def _value_noise(rng: np.random.Generator, cells: int) -> np.ndarray:
    """Smooth periodic noise in [0, 1] on the MAP x MAP torus, features ~MAP/cells wide."""
    g = rng.random((cells, cells))
    u = np.arange(MAP) * cells / MAP
    i0 = u.astype(int)
    f = u - i0
    f = f * f * (3 - 2 * f)                                  # smoothstep between lattice points
    i1 = (i0 + 1) % cells
    rows = g[i0] * (1 - f)[:, None] + g[i1] * f[:, None]     # [MAP, cells]
    return rows[:, i0] * (1 - f) + rows[:, i1] * f           # [MAP, MAP]


def make_map(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Returns (height float32 [MAP, MAP] in whole blocks, kind int [MAP, MAP])."""
    n = 0.65 * _value_noise(rng, 8) + 0.35 * _value_noise(rng, 24)
    height = np.clip(np.floor((n - 0.35) * 7), 0, 3).astype(np.float32)  # mostly 0-1, hills to 3
    kind = np.full((MAP, MAP), GRASS)
    patches = _value_noise(rng, 16)
    kind[(height == 0) & (patches < 0.35)] = SAND              # sandy lowlands
    kind[height >= 3] = STONE                                 # bare hilltops
    kind[(patches > 0.72) & (height < 3)] = DIRT
    kind[(rng.random((MAP, MAP)) < 0.004) & (height < 3)] = COBBLE  # scattered boulders
    height[kind == COBBLE] += 1
    trees = (rng.random((MAP, MAP)) < 0.035) & (kind == GRASS)
    kind[trees] = TREE
    height[trees] += 4                                        # 2 levels of trunk, 2 of leaves
    return height, kind


# ---------------------------------------------------------------------------------------------
# Player state and the effect of one action (one frame).
# ---------------------------------------------------------------------------------------------
@dataclass
class Player:
    x: float                      # position on the map, in blocks (x east, z north)
    z: float
    feet: float                   # feet height (blocks); follows the ground under the player
    yaw: float = 0.0              # degrees, 0 looks along +z, positive turns right
    pitch: float = 0.0            # degrees, positive looks down (VPT's camera[0] convention)
    jump: int = 0                 # frame index into JUMP_ARC, 0 = on the ground
    sneaking: bool = False
    sprinting: bool = False
    walked: float = 0.0           # distance of pressed movement, drives the view bobbing
    swing: str = ""               # hand animation: "attack", "use", "drop" or ""
    swing_t: int = 0              # frames into the hand animation
    slot: int = 0                 # hotbar slot 0..8 (the held block is HOTBAR[slot])
    crack: int = 0                # attack progress on `target`
    target: int = -1              # cell being mined (z * MAP + x), -1 = none
    gui: str = ""                 # "" (none), "inventory" or "esc": a GUI overlay is open
    thrown: list = field(default_factory=list)  # [age, slot] of items flying after a drop


class Worlds:
    """A batch of B seeded worlds, one player in each. `step(actions)` applies one env-format
    action per world, `render()` draws all B views at once: rendering is vectorised over the
    batch because at 64x64 pixels numpy's per-call overhead, not arithmetic, sets the speed."""

    def __init__(self, seeds: list, height: int = 64, width: int = 64):
        if height % 16 or width % 16:
            raise ValueError(f"frame size {height}x{width}: each side must be a multiple of 16")
        self.B, self.H, self.W = len(seeds), height, width
        rngs = [np.random.default_rng(s) for s in seeds]
        maps = [make_map(r) for r in rngs]
        # C order matters: flat views of these arrays are edited in place (mining, building).
        self.height = np.ascontiguousarray(np.stack([m[0] for m in maps]))  # [B, MAP, MAP]
        self.kind = np.ascontiguousarray(np.stack([m[1] for m in maps]))    # [B, MAP, MAP]
        self.players = []
        for b, r in enumerate(rngs):
            x, z = r.uniform(0, MAP, 2)
            while self.height[b, int(z), int(x)] > 1:        # spawn on open ground
                x, z = r.uniform(0, MAP, 2)
            self.players.append(Player(x=x, z=z, feet=float(self.height[b, int(z), int(x)]),
                                       yaw=float(r.uniform(0, 360))))
        self.clouds = np.stack([r.random(64) < 0.35 for r in rngs])   # [B, 64] around the horizon
        self.sun_yaw = np.array([r.uniform(0, 360) for r in rngs])    # [B] degrees
        self.aim = [()] * self.B      # per world: the block under the crosshair (see `targets`)
        self.t = 0

    def eye(self, p: Player) -> float:
        return p.feet + (SNEAK_EYE if p.sneaking else EYE)

    # -- one frame of game logic --------------------------------------------------------------
    def step(self, actions: list[dict]) -> None:
        self.t += 1
        live = [self._move(b, a) for b, a in enumerate(actions)]
        self.targets()                                        # what each player now looks at
        for b, a in enumerate(actions):
            if live[b]:
                self._hands(b, a)
        self.targets()                                        # blocks may have changed

    def _move(self, b: int, a: dict) -> bool:
        """GUI, hotbar, camera, walking and jumping. Returns False while a GUI eats the input."""
        p = self.players[b]
        p.thrown = [[age + 1, s] for age, s in p.thrown if age < 6]
        if a.get("inventory"):                                # E toggles the inventory
            p.gui = "" if p.gui else "inventory"
        elif a.get("ESC"):                                    # ESC closes a GUI or opens the menu
            p.gui = "" if p.gui else "esc"
        if p.gui:
            p.swing, p.swing_t, p.crack, p.target = "", 0, 0, -1
            return False
        for i in range(1, 10):                                # hotbar keys pick the held block
            if a.get(f"hotbar.{i}"):
                p.slot = i - 1
                break
        pitch, yaw = a.get("camera", (0.0, 0.0))
        p.pitch = float(np.clip(p.pitch + pitch, -80.0, 80.0))
        p.yaw = (p.yaw + yaw) % 360.0

        # Movement relative to yaw; both keys of a pair cancel, as in the game.
        fwd = a.get("forward", 0) - a.get("back", 0)
        side = a.get("right", 0) - a.get("left", 0)
        p.sneaking = bool(a.get("sneak"))
        p.sprinting = bool(a.get("sprint")) and fwd > 0 and not p.sneaking
        speed = SNEAK if p.sneaking else SPRINT if p.sprinting else WALK
        height = self.height[b]
        if fwd or side:
            norm = speed / math.hypot(fwd, side)
            s, c = math.sin(math.radians(p.yaw)), math.cos(math.radians(p.yaw))
            dx, dz = (fwd * s + side * c) * norm, (fwd * c - side * s) * norm
            if height[int(p.z) % MAP, int(p.x + dx) % MAP] <= p.feet + 1:  # step up <= 1 block,
                p.x = (p.x + dx) % MAP                        # axis by axis: slide along walls
            if height[int(p.z + dz) % MAP, int(p.x) % MAP] <= p.feet + 1:
                p.z = (p.z + dz) % MAP
            p.walked += speed
        if p.jump:                                            # mid-air: follow the arc
            p.jump = (p.jump + 1) % (len(JUMP_ARC) + 1)
        elif a.get("jump"):
            p.jump = 1
        ground = float(height[int(p.z) % MAP, int(p.x) % MAP])
        p.feet = ground + (JUMP_ARC[p.jump - 1] if p.jump else 0.0)
        return True

    def _hands(self, b: int, a: dict) -> None:
        """Attack mines the targeted block, use places the held block, drop throws it."""
        p, aim = self.players[b], self.aim[b]
        hflat, kflat = self.height[b].ravel(), self.kind[b].ravel()   # views: edits change the map
        if a.get("attack"):
            self._swing(p, "attack")
            if aim and hflat[aim[0]] > 0:
                p.crack = p.crack + 1 if aim[0] == p.target else 1
                p.target = aim[0]
                if p.crack >= BREAK_FRAMES:                   # broken: the column loses a block
                    hflat[aim[0]] -= 1
                    p.crack, p.target = 0, -1
                return
        elif a.get("use"):
            self._swing(p, "use")
            if aim and p.swing_t % 4 == 1:                    # a block now and every 4 frames
                c = aim[1] if aim[2] else aim[0]              # side hit: the cell before it
                if c != int(p.z) % MAP * MAP + int(p.x) % MAP and hflat[c] < 6:
                    hflat[c] += 1
                    kflat[c] = HOTBAR[p.slot]
        elif a.get("drop"):
            self._swing(p, "drop")
            p.thrown.append([0, p.slot])
        else:
            p.swing, p.swing_t = "", 0
        p.crack, p.target = 0, -1

    @staticmethod
    def _swing(p: Player, kind: str) -> None:
        p.swing_t = p.swing_t + 1 if p.swing == kind else 1
        p.swing = kind

    # -- rendering ----------------------------------------------------------------------------
    def _view(self):
        """Per world: screen-column offsets xs [B, W] (tan of the horizontal angle), the focal
        length f [B] in pixels and the tilt [B], so that pixel row j has slope
        c - j / f with c = (H/2 - 0.5) / f + tilt (ray height gained per block of forward
        distance; decreasing down the screen)."""
        ps, H, W = self.players, self.H, self.W
        fov = np.radians([FOV * (SPRINT_FOV if p.sprinting else 1.0) for p in ps])
        f = (W / 2 / np.tan(fov / 2)).astype(np.float32)      # [B]
        xs = (np.arange(W, dtype=np.float32) + 0.5 - W / 2) / f[:, None]   # [B, W]
        tilt = np.array([0.015 * math.sin(p.walked * 2.2)     # view bobbing while walking
                         - math.tan(math.radians(p.pitch)) for p in ps], np.float32)
        return xs, f, (H / 2 - 0.5) / f + tilt

    def _cast(self, xs: np.ndarray, f: np.ndarray, c: np.ndarray, H: int, prev=False):
        """Cast one horizontal ray per screen column (offsets xs [B, W]) through the grid and
        find, for each of H pixel rows (slope c - row / f, decreasing), the first block column
        the ray passes under. Returns per pixel [B, H, W]: hit (else sky), view distance t,
        side face hit, x-facing side (else z-facing), the slopes [B, H, 1], the flat index of
        the hit cell (index = (b*MAP + z)*MAP + x) and, if `prev`, of the cell crossed before it.
        Everything is float32 with floor(), never float64 `%`: that is 50x slower in numpy."""
        ps, B, W, S = self.players, len(xs), xs.shape[1], VIEW_STEPS
        f32 = np.float32
        px = np.array([p.x for p in ps], f32)[:, None, None]  # [B, 1, 1]
        pz = np.array([p.z for p in ps], f32)[:, None, None]
        eye = np.array([self.eye(p) for p in ps], f32)[:, None, None]
        yaw = np.radians([p.yaw for p in ps]).astype(f32)[:, None, None]
        dx = np.sin(yaw) + xs[..., None] * np.cos(yaw)        # [B, W, 1] direction per unit of
        dz = np.cos(yaw) - xs[..., None] * np.sin(yaw)        # [B, W, 1] forward distance
        dx, dz = np.where(dx == 0, f32(1e-6), dx), np.where(dz == 0, f32(1e-6), dz)
        # DDA without a loop: all crossings of x- and z-grid lines, merged by distance.
        n = np.arange(S + 1, dtype=f32)
        tx = (np.floor(px) + (dx > 0) - px) / dx + n / np.abs(dx)        # [B, W, S+1]
        tz = (np.floor(pz) + (dz > 0) - pz) / dz + n / np.abs(dz)
        far = np.sort(np.concatenate([tx, tz], -1), -1)[..., :S]   # [B, W, S] exit of cell k
        near = np.concatenate([np.zeros((B, W, 1), f32), far[..., :-1]], -1)  # entry distance
        mid = (near + far) / 2
        cx = np.floor(px + mid * dx).astype(np.int64) & (MAP - 1)          # [B, W, S] cells
        cell = (np.arange(B)[:, None, None] * MAP * MAP
                + (np.floor(pz + mid * dz).astype(np.int64) & (MAP - 1)) * MAP + cx)
        xcross = np.concatenate([np.zeros((B, W, 1), bool), cx[..., 1:] != cx[..., :-1]], -1)
        h = self.height.ravel().take(cell)                    # [B, W, S] column heights
        # A ray of slope s passes under the top of column k iff s < S_k (its height at the near
        # or far end is below h); the first hit is the first k whose running max of S_k exceeds
        # s. Row j has slope c - j/f, so it is under column k iff j >= rows_k = floor((c -
        # run_k) f) + 1; the first hit of a pixel is the number of k whose rows_k lie below it.
        with np.errstate(divide="ignore"):
            s_k = np.maximum(np.where(near > 0, (h - eye) / near, -np.inf), (h - eye) / far)
        run = np.maximum.accumulate(s_k, -1)                  # [B, W, S] nondecreasing in k
        rows = np.clip(np.floor((c[:, None, None] - run) * f[:, None, None]) + 1, 0, H)
        idx = ((np.arange(B)[:, None, None] * (H + 1) + rows.astype(np.int64)) * W
               + np.arange(W)[None, :, None])
        count = np.bincount(idx.ravel(), minlength=B * (H + 1) * W).reshape(B, H + 1, W)
        k = S - np.cumsum(count, 1)[:, :-1]                   # [B, H, W] first hit; S = sky
        hit = k < S
        at = ((np.arange(B)[:, None, None] * W + np.arange(W)) * S
              + np.minimum(k, S - 1))                         # [B, H, W] flat index into [B, W, S]
        hk, nk = h.ravel().take(at), near.ravel().take(at)
        sl = (c[:, None] - np.arange(H, dtype=f32) / f[:, None])[..., None]   # [B, H, 1]
        side = (nk * sl + eye < hk) & hit                     # entered the column below its top
        with np.errstate(divide="ignore", invalid="ignore"):
            t = np.where(side, nk, (eye - hk) / -sl)
        t = np.where(hit, t, f32(np.inf))                     # [B, H, W] view distance
        xface = side & xcross.ravel().take(at)
        if not prev:
            return hit, t, side, xface, sl, cell.ravel().take(at)
        first = (np.arange(B)[:, None, None] * W + np.arange(W)) * S
        before = cell.ravel().take(np.maximum(at - 1, first))
        return hit, t, side, xface, sl, cell.ravel().take(at), before

    def targets(self) -> None:
        """Update `aim`: per world the block under the crosshair within reach, as (flat cell
        index within the world, index of the cell before it, side face hit), or ()."""
        tilt = -np.tan(np.radians([p.pitch for p in self.players])).astype(np.float32)
        hit, t, side, _, _, cell, prev = self._cast(
            np.zeros((self.B, 1), np.float32), np.ones(self.B, np.float32), tilt, 1, prev=True)
        self.aim = [(int(cell[b, 0, 0]) - b * MAP * MAP, int(prev[b, 0, 0]) - b * MAP * MAP,
                     bool(side[b, 0, 0])) if hit[b, 0, 0] and t[b, 0, 0] <= REACH else ()
                    for b in range(self.B)]

    def render(self) -> np.ndarray:
        """The current views as uint8 [B, H, W, 3] RGB."""
        B, H, W, ps = self.B, self.H, self.W, self.players
        f32 = np.float32
        xs, f, c = self._view()
        hit, t, side, xface, sl, cell = self._cast(xs, f, c, H)

        # Where the ray meets the block: side faces are textured by (along-face, height), tops
        # by (x, z). Faces facing x and z get different shading so edges read clearly.
        yaw = np.radians([p.yaw for p in ps]).astype(f32)[:, None, None]
        tt = np.where(hit, t, f32(0))
        hx = np.array([p.x for p in ps], f32)[:, None, None] + tt * (
            np.sin(yaw) + xs[:, None] * np.cos(yaw))          # [B, H, W] hit point
        hz = np.array([p.z for p in ps], f32)[:, None, None] + tt * (
            np.cos(yaw) - xs[:, None] * np.sin(yaw))
        hy = np.array([self.eye(p) for p in ps], f32)[:, None, None] + tt * sl
        u = np.where(xface, hz, hx)
        u -= np.floor(u)
        v = np.where(side, np.ceil(hy) - hy, hz - np.floor(hz))
        hc = self.height.ravel().take(cell)
        kd = self.kind.ravel().take(cell)
        upper = np.floor(hy - f32(1e-4)) >= hc - N_UPPER.take(kd)
        tex = np.where(side, np.where(upper, UPPER_T.take(kd), LOWER_T.take(kd)), TOP_T.take(kd))
        tyx = (np.minimum((v * TEX).astype(np.int64), TEX - 1) * TEX
               + np.minimum((u * TEX).astype(np.int64), TEX - 1))   # [B, H, W] texel on the face
        off = np.arange(B) * MAP * MAP
        mined = np.array([p.target for p in ps]) + off        # cracks on the block being mined
        stage = np.array([p.crack for p in ps])[:, None, None]
        cracked = ((cell == mined[:, None, None]) & (stage > 0)
                   & CRACKS.reshape(-1).take(stage * TEX * TEX + tyx))
        aim = np.array([a[0] if a else -1 for a in self.aim]) + off   # outline the aimed block
        edge = (np.minimum(u, 1 - u) < 0.07) | (np.minimum(v, 1 - v) < 0.07)
        outline = (cell == aim[:, None, None]) & edge
        face = np.where(side, np.where(xface, 1, 2), 0)       # top / x-facing / z-facing
        mark = np.where(outline, 2, cracked.astype(np.int64))  # none / crack / outline
        fog = np.clip((t - FOG[0]) * ((N_FOG - 1) / (FOG[1] - FOG[0])), 0, N_FOG - 1)
        ground = ((tex * TEX * TEX + tyx) * 9 + face * 3 + mark) * N_FOG + fog.astype(np.int64)

        # Sky: a gradient by elevation, the sun, and a band of clouds that turns with the view.
        elev = np.arctan(sl[..., 0])                          # [B, H] elevation of each row
        azim = np.array([p.yaw for p in ps])[:, None] + np.degrees(np.arctan(xs))   # [B, W]
        sun = ((np.abs(elev - 0.5) < 0.1)[:, :, None]
               & (np.abs((azim - self.sun_yaw[:, None] + 180) % 360 - 180) < 6)[:, None])
        band = ((azim + self.t * 0.3) % 360 / 360 * 64).astype(np.int64) % 64   # [B, W]
        cloud = (((elev > 0.12) & (elev < 0.3))[:, :, None]
                 & self.clouds.ravel().take(np.arange(B)[:, None] * 64 + band)[:, None])
        sky = np.where(sun, SUN, np.where(cloud, CLOUD, SKY + np.clip(
            (elev + 0.6) * (N_SKY / 2.0), 0, N_SKY - 1).astype(np.int64)[:, :, None]))
        img = PALETTE.take(np.where(hit, ground, sky), 0)     # [B, H, W, 3] uint8

        for b, p in enumerate(ps):                            # the hand, GUI and crosshair
            self._hand(img[b], p)
            if p.gui:
                self._gui(img[b], p.gui)
            else:                                             # crosshair: inverted plus sign
                cy, cx = H // 2, W // 2
                img[b, cy - 1:cy + 2, cx] = 255 - img[b, cy - 1:cy + 2, cx]
                img[b, cy, [cx - 1, cx + 1]] = 255 - img[b, cy, [cx - 1, cx + 1]]
        return img

    def _hand(self, img: np.ndarray, p: Player) -> None:
        """Arm and held block at the bottom right of one view [H, W, 3], animated by attack /
        use / drop swings, walking bob and sneaking; thrown items fly off and fall."""
        H, W = img.shape[:2]
        s = H / 64                                            # sprites are laid out for 64 px
        ox, oy = 0.0, 2.5 * math.sin(p.walked * 2.2) * s + (3 * s if p.sneaking else 0.0)
        size = 11 * s
        if p.swing == "attack":                               # an arc up and to the left
            ph = (p.swing_t - 1) % 4
            ox, oy = ox - (8, 14, 9, 4)[ph] * s, oy - (8, 4, -1, -3)[ph] * s
        elif p.swing == "use":                                # pushed forward and enlarged
            ox, oy, size = ox - 6 * s, oy - 8 * s, size * 1.35
        elif p.swing == "drop":                               # a dip: the hand lets go
            oy += 10 * s
        if p.jump == 1:                                       # take-off: the body lifts, the arm
            ox, oy = ox + 5 * s, oy + 6 * s                   # lags down and out for one frame
        x0, y0 = int(W * 0.70 + ox), int(H * 0.70 + oy)
        img[max(y0 + int(size * 0.6), 0):, max(x0 + int(size * 0.5), 0):
            min(x0 + int(size * 1.3), W)] = (205, 150, 115)  # the arm (skin)
        self._sprite(img, TEXTURES[UPPER_T[HOTBAR[p.slot]]], x0, y0, int(size))
        for age, slot in p.thrown:
            self._sprite(img, TEXTURES[UPPER_T[HOTBAR[slot]]], int(W * 0.62 - age * 4 * s),
                         int(H * 0.62 - age * 5 * s + age * age * 1.2 * s),
                         max(int((7 - age) * s), 2))

    @staticmethod
    def _sprite(img: np.ndarray, tex: np.ndarray, x0: int, y0: int, size: int) -> None:
        """Draw texture `tex` [8, 8, 3] scaled to a size x size square at (x0, y0), clipped."""
        H, W = img.shape[:2]
        i = np.arange(size) * TEX // size                     # nearest texel per pixel
        ya, yb, xa, xb = max(y0, 0), min(y0 + size, H), max(x0, 0), min(x0 + size, W)
        if yb > ya and xb > xa:
            img[ya:yb, xa:xb] = tex[i[ya - y0:yb - y0]][:, i[xa - x0:xb - x0]]

    @staticmethod
    def _gui(img: np.ndarray, kind: str) -> None:
        """Inventory: a grey panel of slots; ESC: the pause menu's darkened screen and buttons."""
        H, W = img.shape[:2]
        np.multiply(img, 0.35, out=img, casting="unsafe")
        if kind == "inventory":
            y0, y1, x0, x1 = H // 5, H * 4 // 5, W // 8, W * 7 // 8
            img[y0:y1, x0:x1] = 198
            for r in range(4):
                for c in range(9):
                    y, x = y0 + 6 + r * (y1 - y0 - 8) // 4, x0 + 3 + c * (x1 - x0 - 4) // 9
                    img[y:y + 4, x:x + 4] = 139
        else:
            for y in (H // 3, H // 2):
                img[y:y + H // 10, W // 5:W * 4 // 5] = 170


# ---------------------------------------------------------------------------------------------
# A scripted player that plays like a person: keys held for runs of frames, smooth camera moves
# with occasional flicks, attack bursts at blocks, idle stretches, now and then a GUI.
# ---------------------------------------------------------------------------------------------
# Camera moves use the centres of VPT's 11 mu-law bins (degrees), so the label of a move is never
# a hair's breadth from a bin edge; flicks go past VPT's +-10 degree range.
CAM_STEPS = (1.61, 3.22, 5.81, 10.0)
FLICK = (15.0, 40.0)              # |yaw| of a flick, degrees (uniform in this range)
# Runs of held movement keys and their probabilities; hand actions (held for a run of frames).
MOVES = ("", "forward", "forward", "forward+sprint", "forward+sneak", "back", "left", "right", "forward+left",
         "forward+right", "sneak")
MOVE_P = (.22, .2, .06, .16, .06, .07, .06, .06, .04, .04, .03)
HANDS = ("", "attack", "use", "drop")


class Scripted:
    """Draws one env-format action per frame from a few independent, persistent processes."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng
        self.move = ("", 0)             # (key combination, frames left)
        self.cam = (0.0, 0.0, 0)        # (pitch step, yaw step, frames left)
        self.hand = ("", 0)             # (attack | use | drop | idle, frames left)
        self.gui = 0                    # frames left with the GUI open

    def __call__(self, p: Player, aim: tuple) -> dict:
        """The next action for the player `p`, who is looking at block `aim` (or at nothing)."""
        r, a = self.rng, {"camera": [0.0, 0.0]}            # nothing pressed yet, the view still
        if self.gui:                                          # a GUI is open: wait, then close
            self.gui -= 1
            if self.gui == 0:
                a["inventory" if p.gui == "inventory" else "ESC"] = 1
            return a
        if r.random() < 0.006:                                # rarely: open inventory or menu
            self.gui = int(r.integers(2, 6))
            a["inventory" if r.random() < 0.7 else "ESC"] = 1
            return a
        if r.random() < 0.01:
            a[f"hotbar.{r.integers(1, 10)}"] = 1

        keys, left = self.move
        if left == 0:                                         # a new run of held movement keys
            keys = r.choice(MOVES, p=MOVE_P)
            left = int(r.geometric(1 / 10))
        self.move = (keys, left - 1)
        for key in keys.split("+") if keys else ():
            a[key] = 1
        if p.jump == 0 and not a.get("sneak") and r.random() < 0.06:
            a["jump"] = 1                                     # taps, only when on the ground

        pitch, yaw, left = self.cam
        if left == 0:                                         # a new smooth move (or stillness)
            pitch, yaw, left = 0.0, 0.0, int(r.geometric(1 / 5))
            if r.random() < 0.55:
                step = CAM_STEPS[r.choice(4, p=[.3, .35, .25, .1])] * r.choice([-1, 1])
                if r.random() < 0.3:
                    pitch = step if abs(p.pitch + step * left) < 45 else -step
                else:
                    yaw = step
            if r.random() < 0.04:                             # a flick: one big jump of the view
                yaw, left = float(r.choice([-1, 1]) * r.uniform(*FLICK)), 1
        self.cam = (pitch, yaw, left - 1)
        if abs(p.pitch) > 40:                                 # drift back towards the horizon
            pitch = -math.copysign(CAM_STEPS[1], p.pitch)
        a["camera"] = [pitch, yaw]

        act, left = self.hand
        if left == 0:
            act = r.choice(HANDS, p=[.8, .12, .05, .03])
            left = int(r.integers(3, 10)) if act == "attack" else int(r.integers(1, 4))
            if act == "attack" and aim:                       # at a block: mine it through
                left = BREAK_FRAMES + int(r.integers(0, 3))
        self.hand = (act, left - 1)
        if act:
            a[act] = 1
        return a


def action_space() -> list[dict]:
    """Every env action `Scripted` emits, as a finite list (for tests of what the action tokens determine).

    A superset on the camera: any pitch in {0, ±CAM_STEPS} with any yaw in {0, ±CAM_STEPS, ±FLICK} (the
    player turns one axis at a time, but the drift back to the horizon adds a pitch to any yaw). A flick's
    yaw is continuous: the ends of FLICK stand for the range, which is exact for bin questions, since the
    camera quantizers are monotone (a range whose ends share a bin lies in it). GUI steps press inventory
    or ESC alone; while a GUI is open the player sends no-ops.
    """
    steps = [0.0, *CAM_STEPS, *(-c for c in CAM_STEPS)]
    pitches, yaws = steps, steps + [*FLICK, *(-f for f in FLICK)]
    out = [{"inventory": 1, "camera": [0.0, 0.0]}, {"ESC": 1, "camera": [0.0, 0.0]}]
    # dict.fromkeys: MOVES repeats "forward" for its weight. hotbar 0 = no hotbar key.
    for keys, jump, hotbar, hand, pitch, yaw in itertools.product(dict.fromkeys(MOVES), (0, 1), range(10), HANDS,
                                                                  pitches, yaws):
        if jump and "sneak" in keys:  # jumps are taps on the ground, never while sneaking
            continue
        a = {}
        for key in [*keys.split("+"), hand, f"hotbar.{hotbar}" if hotbar else ""]:
            if key:
                a[key] = 1
        a["jump"], a["camera"] = jump, [pitch, yaw]
        out.append(a)
    return out


def clips(n: int | None, seed: int, height: int = 64, width: int = 64, clip_len: int = 16,
          per_world: int = 8, batch: int = 32):
    """Yield `n` clips (forever if None) as (frames uint8 [clip_len, H, W, 3], actions, gui bool
    [clip_len]). actions[t] is the action (keys pressed, camera) that produced frames[t]
    (MineWorld's validation convention); actions[0] came before the clip. Clips come from continuous play,
    `per_world` consecutive clips in each freshly generated world; `batch` worlds are played
    side by side. Deterministic in (n, seed)."""
    done, w0 = 0, 0
    while n is None or done < n:
        nw = batch if n is None else min(batch, -(-(n - done) // per_world))
        ids = range(w0, w0 + nw)
        worlds = Worlds([seed * 1_000_003 + w for w in ids], height, width)
        players = [Scripted(np.random.default_rng([seed, w])) for w in ids]
        for _ in range(8):                                    # warm up the players' processes
            worlds.step([pl(p, aim) for pl, p, aim in zip(players, worlds.players, worlds.aim)])
        for _ in range(per_world):
            frames = np.empty((nw, clip_len, height, width, 3), np.uint8)
            actions, gui = [[] for _ in ids], np.zeros((nw, clip_len), bool)
            for t in range(clip_len):
                acts = [pl(p, aim) for pl, p, aim in zip(players, worlds.players, worlds.aim)]
                worlds.step(acts)
                frames[:, t] = worlds.render()
                for b in range(nw):
                    actions[b].append(acts[b])
                    gui[b, t] = bool(worlds.players[b].gui)
            for b in range(nw):
                if n is not None and done >= n:
                    return
                yield frames[b], actions[b], gui[b]
                done += 1
        w0 += nw


def contact_sheet(path: str, height: int = 64, width: int = 64, seed: int = 3) -> None:
    """Write a PNG with one row per action group: the frame before, and 3 frames while the action
    is held from the same state, so each group's effect can be seen side by side."""
    rows = [("forward", {"forward": 1}), ("sprint", {"forward": 1, "sprint": 1}),
            ("back", {"back": 1}), ("left", {"left": 1}), ("sneak", {"sneak": 1}),
            ("jump", {"jump": 1}), ("attack", {"attack": 1}), ("use", {"use": 1}),
            ("drop", {"drop": 1}), ("pitch +5.81", {"camera": [5.81, 0.0]}),
            ("yaw +5.81", {"camera": [0.0, 5.81]}), ("inventory", {"inventory": 1})]
    worlds = Worlds([seed] * len(rows), height, width)        # the same world in every row
    for p in worlds.players:
        p.pitch = 20.0                                        # look a little down, at blocks
    worlds.targets()
    frames = [worlds.render()]
    for i in range(3):
        acts = []
        for name, keys in rows:
            a = {}
            if i == 0 or name not in ("jump", "inventory"):   # taps: press once, then watch
                a.update(keys)
            acts.append(a)
        worlds.step(acts)
        frames.append(worlds.render())
    sheet = np.concatenate(np.concatenate(frames, 2), 0)      # rows of [before, 3 after]
    Image.fromarray(sheet).resize(
        (4 * width * 2, len(rows) * height * 2), Image.NEAREST).save(path)
    print(f"wrote {path}: rows = " + ", ".join(n for n, _ in rows))


def bench(n: int = 256, seed: int = 0, height: int = 64, width: int = 64) -> float:
    """Frames per second of `clips` in CPU time of this process (numpy runs on one core)."""
    t = time.process_time()
    frames = sum(len(f) for f, _, _ in clips(n, seed, height, width))
    return frames / (time.process_time() - t)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are UsageErrors: runtime.cli prints them as one line, like every command's."""

    def error(self, message: str):
        raise runtime.UsageError(message)


def check_flags(ap: ArgumentParser, args) -> None:
    """The world's flags (--height, --width, --clips, --seed), checked before the first frame is rendered."""
    side = (lambda v: v >= 16 and v % 16 == 0), "a positive multiple of 16 (the frame sides Worlds renders)"
    for flag, value, (ok, what) in (("--height", args.height, side), ("--width", args.width, side),
                                    ("--clips", args.clips, runtime.at_least(1)),
                                    ("--seed", args.seed, runtime.at_least(0, "numpy seeds are >= 0"))):
        if not ok(value):
            ap.error(f"{flag}={value}: must be {what}")


def main(argv: list[str] | None = None) -> None:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--clips", type=int, default=64, help="number of 16-frame clips to time")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--height", type=int, default=64)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--sheet", help="write a contact sheet PNG of each action's effect")
    ap.add_argument("--bench", action="store_true", help="print frames/s of `clips` (one core)")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    if not (args.sheet or args.bench):
        ap.error("nothing to do: give --sheet PNG and/or --bench (clip files: python data.py --out DIR)")
    check_flags(ap, args)
    if args.sheet and not Path(args.sheet).parent.is_dir():
        ap.error(f"--sheet {args.sheet}: the folder {Path(args.sheet).parent} does not exist")
    if args.bench:
        print(f"{bench(args.clips, args.seed, args.height, args.width):.0f} frames/s "
              f"({args.height}x{args.width}, game logic and scripted player included, one core)")
    if args.sheet:
        contact_sheet(args.sheet, args.height, args.width)


if __name__ == "__main__":
    runtime.cli(main)
