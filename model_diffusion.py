"""NFD-style next-frame diffusion world model (paper §4.3, App. A.2 Table 5) and its frame tokenizer.

NFD's code and weights are not public (docs/formats.md §3); this is a
reconstruction from what RLIR and NFD state:
  - a small continuous autoencoder turns each frame into a grid of N latent tokens with C channels;
  - DiT blocks (Peebles & Xie 2023) with adaLN-Zero conditioning on (timestep embedding + action
    embedding), one conditioning vector per frame; the action is a multi-hot over MineWorld's 68
    action ids mapped by one linear layer (App. A.2: "a linear layer to map the actions into action
    vectors");
  - block-wise causal attention: bidirectional inside a frame, causal across frames (App. A.2);
  - flow matching with independent noise levels per frame (Diffusion Forcing) and slightly noised
    context frames (docs/conventions.md §2.2).

Flow time (docs/conventions.md §2.1): t = 1 is noise, t = 0 is data, x_t = (1 − t)·x0 + t·ε, the network predicts
v ≈ ε − x0; sampling runs 1 = t_0 > … > t_K = 0, so dt < 0. The GRPO policy is the SDE of
sde_sampler.py applied per frame (§4.3, Eq. 5); log-probs are per (frame, step) transition, reduced
over the latent elements with sde.logprob_reduce ("mean" by default; see sde_sampler.py on clip ranges).

Clip layout: frames x_0..x_{F−1}, action tokens a_0..a_{F−1} ([B, F, 11], data.collate's "tokens");
a_f is the action that turns x_{f−1} into x_f and conditions frame f. a_0 (whatever data.collate puts at
index 0) conditions the given frame x_0, the same way in training, rollout and replay.

Public API:
  NFDConfig, AEConfig, FrameAE, NFD, load_weights, actions_multi_hot,
  fm_loss(model, frames, action_tokens) -> scalar                      (pretraining)
  rollout(model, x0, action_tokens, sde_cfg, generator, group_size) -> Rollout   (GRPO sampling)
  log_probs(model, rollout, sde_cfg) -> [B, (F−1)·K]                   (GRPO replay, differentiable)
  sample_frames(model, x0, action_tokens, sde_cfg, generator) -> uint8 [B, F, H, W, 3]   (evaluation)
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

import sde_sampler as sde
from runtime import (SIZES, ConfigError, UsageError, at_least, check_fields, load_strict, nonempty, read_checkpoint,
                     within)

ACTION_OFFSET = 8192  # MineWorld action token = raw action id + 8192 (docs/formats.md §1.5)
N_ACTION_IDS = 68  # raw ids 0..67: 23 buttons/hotbar keys, 2×21 camera bins, <act_bos>, <null_act>, <act_eos>


@dataclass
class NFDConfig:
    hidden: int = 256  # transformer width D (Table 5: 1024 for 310M, 1536 for 774M)
    mlp: int = 683  # SwiGLU hidden size (Table 5: 2730 / 4096; ≈ 8/3·D)
    heads: int = 4  # attention heads; hidden must be divisible by heads (Table 5: 16 / 24)
    layers: int = 4  # DiT blocks (Table 5: 16 / 18)
    latent_channels: int = 8  # C per latent token; must equal ae.latent_channels
    latent_h: int = 8  # latent rows per frame = ae.frame_h / ae stride (64 / 8 embedded; 224 / 16 paper)
    latent_w: int = 8  # latent columns per frame = ae.frame_w / ae stride (64 / 8 embedded; 384 / 16 paper)
    frames: int = 16  # longest clip in frames, context frame included (paper §5.1: 16)
    action_dim: int = N_ACTION_IDS  # multi-hot size over raw MineWorld action ids (token − 8192)
    context_noise: float = 0.1  # training: clean context frames are noised to t ~ U(0, context_noise); 0 = off
    init_from: str | None = None  # checkpoint whose "model" entry is an NFD state dict (load_weights); None = random

    def __post_init__(self):
        check_fields(self, {
            "hidden": at_least(1), "mlp": at_least(1), "heads": at_least(1), "layers": at_least(1),
            "latent_channels": at_least(1), "latent_h": at_least(1), "latent_w": at_least(1),
            "frames": at_least(2, "the given frame and at least one generated"),
            "action_dim": ((lambda a: a == N_ACTION_IDS), f"{N_ACTION_IDS} (MineWorld's raw action ids)"),
            "context_noise": within(0, 1), "init_from": nonempty('"scratch" or a checkpoint path')})
        if self.hidden % self.heads:
            raise ConfigError(f"heads={self.heads}: must divide hidden={self.hidden}")


@dataclass
class AEConfig:
    frame_h: int = 64  # frame height in pixels (embedded minicraft: 64; paper: 224)
    frame_w: int = 64  # frame width in pixels (embedded minicraft: 64; paper: 384)
    width: int = 32  # conv channels at full resolution; a multiple of 8 (GroupNorm groups)
    mults: tuple[int, ...] = (1, 2, 4)  # channel multiplier per stride-2 stage; stride = 2 ** len(mults)
    latent_channels: int = 8  # C of each latent token
    latent_noise: float = 0.1  # pretraining: std of Gaussian noise on latents before decoding (robust decoder)
    scale_weight: float = 0.1  # pretraining: weight of the latent-scale regulariser mean_c (E[z_c²] − 1)²
    init_from: str | None = None  # checkpoint with a FrameAE state dict: load_weights(model.ae, path); None = random

    def __post_init__(self):
        check_fields(self, {
            "frame_h": at_least(1), "frame_w": at_least(1),
            "width": ((lambda w: w >= 8 and w % 8 == 0), "a multiple of 8 (GroupNorm's 8 groups)"), "mults": SIZES,
            "latent_channels": at_least(1), "latent_noise": at_least(0), "scale_weight": at_least(0),
            "init_from": nonempty("a checkpoint path")})
        stride = 2 ** len(self.mults)                          # each stage halves the frame (FrameAE)
        for side in ("frame_h", "frame_w"):
            if getattr(self, side) % stride:
                raise ConfigError(f"{side}={getattr(self, side)}: must be a multiple of the stride {stride} "
                                  f"(2 ** len(mults))")


# -----------------------------------------------------------------------------
# Frame tokenizer: a small continuous conv autoencoder (App. A.2 "image-level tokenizer")
#
# NFD's tokenizer is not public. Ours is deterministic (no VAE posterior): its loss is L1 + L2
# reconstruction plus a latent-scale regulariser that pulls every channel's second moment to 1, so
# latents are ~unit scale for flow matching (x_1 = ε ~ N(0, I) then has the data's scale). The
# decoder is trained on slightly noised latents so that small generation errors decode cleanly.


class ResBlock(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(8, ch), nn.Conv2d(ch, ch, 3, padding=1)
        self.norm2, self.conv2 = nn.GroupNorm(8, ch), nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # [B, ch, h, w]
        return x + self.conv2(F.silu(self.norm2(h)))  # [B, ch, h, w]


class FrameAE(nn.Module):
    """uint8 frames [B, H, W, 3] <-> latents [B, N, C], N = (H/s)·(W/s) tokens in row-major order."""

    def __init__(self, cfg: AEConfig):
        super().__init__()
        self.cfg = cfg
        self.stride = 2 ** len(cfg.mults)
        if cfg.width % 8 or cfg.frame_h % self.stride or cfg.frame_w % self.stride:
            raise ValueError(f"ae: width={cfg.width} must be a multiple of 8 and frame {cfg.frame_h}x{cfg.frame_w} "
                             f"divisible by the stride {self.stride} (= 2**len(mults)); fix the ae config")
        self.grid = (cfg.frame_h // self.stride, cfg.frame_w // self.stride)  # (h, w) latent grid
        chans = [cfg.width * m for m in cfg.mults]
        enc: list[nn.Module] = [nn.Conv2d(3, chans[0], 3, padding=1)]
        c_in = chans[0]
        for c in chans:  # each stage halves H and W
            enc += [nn.Conv2d(c_in, c, 4, stride=2, padding=1), ResBlock(c)]
            c_in = c
        enc += [nn.GroupNorm(8, c_in), nn.SiLU(), nn.Conv2d(c_in, cfg.latent_channels, 1)]
        self.encoder = nn.Sequential(*enc)
        dec: list[nn.Module] = [nn.Conv2d(cfg.latent_channels, c_in, 3, padding=1)]
        for c in reversed(chans):  # each stage doubles H and W
            dec += [ResBlock(c_in), nn.Upsample(scale_factor=2.0, mode="nearest"), nn.Conv2d(c_in, c, 3, padding=1)]
            c_in = c
        dec += [nn.GroupNorm(8, c_in), nn.SiLU(), nn.Conv2d(c_in, 3, 3, padding=1)]
        self.decoder = nn.Sequential(*dec)

    def _pixels(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 [B, H, W, 3] -> float [B, 3, H, W] in [−1, 1], with a clear error on wrong input."""
        want = (self.cfg.frame_h, self.cfg.frame_w, 3)
        if frames.dtype != torch.uint8 or frames.ndim != 4 or tuple(frames.shape[1:]) != want:
            raise ValueError(f"frames must be uint8 [B, {want[0]}, {want[1]}, 3] (ae.frame_h, ae.frame_w); "
                             f"got {frames.dtype} {tuple(frames.shape)}: resize the clips or fix the ae config")
        return rearrange(frames, "b h w c -> b c h w").float() / 127.5 - 1.0  # [B, 3, H, W]

    def _latent_grid(self, latents: torch.Tensor) -> torch.Tensor:
        """[B, N, C] -> [B, C, h, w]."""
        h, w = self.grid
        return rearrange(latents, "b (h w) c -> b c h w", h=h, w=w)  # [B, C, h, w]

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        z = self.encoder(self._pixels(frames))  # [B, C, h, w]
        return rearrange(z, "b c h w -> b (h w) c")  # [B, N, C]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        x = self.decoder(self._latent_grid(latents.float()))  # [B, 3, H, W]
        x = ((x.clamp(-1.0, 1.0) + 1.0) * 127.5).round()  # [B, 3, H, W] in [0, 255]
        return rearrange(x.to(torch.uint8), "b c h w -> b h w c")  # [B, H, W, 3]

    @torch.no_grad()
    def roundtrip(self, frames: torch.Tensor) -> torch.Tensor:
        """Frames uint8 [..., H, W, 3] encoded and decoded again: the tokenizer's view of them, same shape."""
        return self.decode(self.encode(frames.flatten(0, -4))).view(frames.shape)

    def loss(self, frames: torch.Tensor) -> torch.Tensor:
        """Pretraining loss: L1 + L2 reconstruction of noised latents + latent-scale regulariser."""
        x = self._pixels(frames)  # [B, 3, H, W]
        z = self.encoder(x)  # [B, C, h, w]
        rec = self.decoder(z + self.cfg.latent_noise * torch.randn_like(z))  # [B, 3, H, W]
        scale = (z.pow(2).mean(dim=(0, 2, 3)) - 1.0).pow(2).mean()  # second moment of each channel -> 1
        return (rec - x).abs().mean() + (rec - x).pow(2).mean() + self.cfg.scale_weight * scale


# -----------------------------------------------------------------------------
# DiT with adaLN-Zero and block-wise causal attention (§4.3, App. A.2)


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of 1000·t (DiT's integer-timestep scale): t [...] -> [..., dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = 1000.0 * t.float()[..., None] * freqs  # [..., half]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # [..., dim]


def sincos(pos: torch.Tensor, dim: int) -> torch.Tensor:
    """Fixed 1-D sin/cos position features: pos [L] -> [L, dim]."""
    omega = 1.0 / 10000.0 ** (torch.arange(dim // 2, dtype=torch.float32) / (dim // 2))  # [dim/2]
    args = pos.float()[:, None] * omega  # [L, dim/2]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)  # [L, dim]


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1.0 + scale) + shift  # [B, F, N, D]


def block_causal_mask(n_frames: int, n_tok: int, device=None) -> torch.Tensor:
    """Bool [n_frames·N, n_frames·N], True = may attend: every token sees all tokens of its own frame
    (bidirectional) and of earlier frames (causal across frames), App. A.2."""
    f = torch.arange(n_frames, device=device).repeat_interleave(n_tok)  # [L]  frame of each token
    return f[:, None] >= f[None, :]  # [L, L]


def replay_mask(n_noisy: int, n_tok: int, device=None) -> torch.Tensor:
    """Bool [n·N, 2·n·N] for queries = noisy frames 1..n over keys [clean frames 0..n−1 | noisy 1..n]:
    noisy frame f sees clean frames 0..f−1 and itself, never another noisy frame (docs/conventions.md §5.2)."""
    q = torch.arange(n_noisy, device=device).repeat_interleave(n_tok)  # [L]  query p is frame p + 1
    return torch.cat([q[:, None] >= q[None, :], q[:, None] == q[None, :]], dim=1)  # [L, 2L]


class Block(nn.Module):
    """Pre-norm DiT block: adaLN-Zero (6 modulations from the frame's conditioning), attention, SwiGLU."""

    def __init__(self, cfg: NFDConfig):
        super().__init__()
        D = cfg.hidden
        self.heads = cfg.heads
        self.norm1 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(D, 3 * D)
        self.proj = nn.Linear(D, D)
        self.norm2 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.gate = nn.Linear(D, cfg.mlp, bias=False)  # SwiGLU: down(silu(gate(x)) * up(x))
        self.up = nn.Linear(D, cfg.mlp, bias=False)
        self.down = nn.Linear(cfg.mlp, D, bias=False)
        self.ada = nn.Linear(D, 6 * D)  # shift/scale/gate for attention and for the MLP (zero-initialised)

    def forward(self, x, c, ctx=None, mask=None, at=None):
        """x [B, F, N, D] tokens of the frames in this call; c [B, F, D] SiLU(conditioning);
        ctx: (k, v) [B, heads, L_ctx, D/heads] cached keys/values of earlier clean frames, or None;
        mask: bool [F·N, L_ctx + F·N] or None (= attend to everything). With `at`, ctx is instead a
        preallocated cache (new_cache): this call's keys/values are written at positions at..at+FN and the
        queries attend to positions 0..at+FN of it, the same keys as the concatenation, without copying them.
        Returns (x [B, F, N, D], (k, v) of this call's tokens for the cache)."""
        sh1, sc1, g1, sh2, sc2, g2 = self.ada(c).unsqueeze(2).chunk(6, dim=-1)  # 6 × [B, F, 1, D]
        h = modulate(self.norm1(x), sh1, sc1)  # [B, F, N, D]
        q, k, v = rearrange(self.qkv(h), "b f n (qkv h d) -> qkv b h (f n) d", qkv=3, h=self.heads)  # [B, H, FN, d]
        kv = (k, v)
        if at is not None:
            end = at + k.shape[2]
            ctx[0][:, :, at:end], ctx[1][:, :, at:end] = k, v
            k, v = ctx[0][:, :, :end], ctx[1][:, :, :end]  # [B, H, end, d]
        elif ctx is not None:
            k, v = torch.cat([ctx[0], k], dim=2), torch.cat([ctx[1], v], dim=2)  # [B, H, L_ctx + FN, d]
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [B, H, FN, d]
        x = x + g1 * self.proj(rearrange(a, "b h (f n) d -> b f n (h d)", f=x.shape[1]))  # [B, F, N, D]
        h = modulate(self.norm2(x), sh2, sc2)  # [B, F, N, D]
        x = x + g2 * self.down(F.silu(self.gate(h)) * self.up(h))  # [B, F, N, D]
        return x, kv


class NFD(nn.Module):
    """Velocity network v_θ(x_t, t, a, context) over per-frame latents, plus the (frozen) tokenizer `ae`.

    The tokenizer is pretrained first (pretrain.py) and is frozen here (requires_grad False), so
    `[p for p in model.parameters() if p.requires_grad]` is exactly the world model's parameters.
    """

    def __init__(self, cfg: NFDConfig, ae_cfg: AEConfig):
        super().__init__()
        if cfg.hidden % cfg.heads or cfg.hidden % 4:
            raise ValueError(f"nfd.hidden={cfg.hidden} must be divisible by nfd.heads={cfg.heads} and by 4")
        stride = 2 ** len(ae_cfg.mults)
        grid = (ae_cfg.frame_h // stride, ae_cfg.frame_w // stride)
        if (cfg.latent_h, cfg.latent_w) != grid or cfg.latent_channels != ae_cfg.latent_channels:
            raise ValueError(f"nfd latent grid {cfg.latent_h}x{cfg.latent_w}x{cfg.latent_channels} does not match the "
                             f"tokenizer's {grid[0]}x{grid[1]}x{ae_cfg.latent_channels} (frame / 2**len(ae.mults), "
                             f"ae.latent_channels); set nfd.latent_h/latent_w/latent_channels to match")
        self.cfg = cfg
        self.action_offset = ACTION_OFFSET  # the action tokens it reads are MineWorld's (raw id + 8192)
        D, C = cfg.hidden, cfg.latent_channels
        self.n_tok = cfg.latent_h * cfg.latent_w
        self.ae = FrameAE(ae_cfg).requires_grad_(False)
        self.x_embed = nn.Linear(C, D)  # per-token patch embedding (patch size 1 on the latent grid)
        self.t_embed = nn.Sequential(nn.Linear(256, D), nn.SiLU(), nn.Linear(D, D))
        self.a_embed = nn.Linear(cfg.action_dim, D)  # App. A.2: "a linear layer to map the actions into action vectors"
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.final_norm = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Linear(D, 2 * D)  # shift/scale of the output layer (zero-initialised)
        self.final = nn.Linear(D, C)  # zero-initialised: a fresh model predicts v = 0
        rows, cols = torch.meshgrid(torch.arange(cfg.latent_h), torch.arange(cfg.latent_w), indexing="ij")
        pos_space = torch.cat([sincos(rows.flatten(), D // 2), sincos(cols.flatten(), D // 2)], dim=1)  # [N, D]
        self.register_buffer("pos_space", pos_space, persistent=False)
        self.register_buffer("pos_frame", sincos(torch.arange(cfg.frames), D), persistent=False)  # [frames, D]
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """All init in one place (DiT): Xavier linears, N(0, 0.02) embeddings, adaLN-Zero modulations
        and the output layer at zero, so every block starts as the identity and v = 0."""
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear) and not name.startswith("ae."):  # the tokenizer keeps its own init
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.t_embed[0].weight, std=0.02)
        nn.init.normal_(self.t_embed[2].weight, std=0.02)
        nn.init.normal_(self.a_embed.weight, std=0.02)
        for blk in self.blocks:
            nn.init.zeros_(blk.ada.weight)
            nn.init.zeros_(blk.ada.bias)
        for m in (self.final_ada, self.final):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, x, t, act, frame_idx, ctx=None, mask=None, at=None):
        """x [B, F, N, C] latents of F frames at flow times t [B, F], actions act [B, F, A] (multi-hot),
        frame positions frame_idx [F] (long); ctx: per-layer cached (k, v) of earlier clean frames or None;
        mask: bool [F·N, L_ctx + F·N] or None; at: ctx is a preallocated cache written from there (Block).
        Returns (v [B, F, N, C] fp32, per-layer (k, v) of x)."""
        h = self.x_embed(x) + self.pos_space + self.pos_frame[frame_idx][:, None]  # [B, F, N, D]
        c = F.silu(self.t_embed(timestep_embedding(t)) + self.a_embed(act))  # [B, F, D]  per-frame condition
        kvs = []
        for i, blk in enumerate(self.blocks):
            h, kv = blk(h, c, None if ctx is None else ctx[i], mask, at)  # [B, F, N, D]
            kvs.append(kv)
        shift, scale = self.final_ada(c).unsqueeze(2).chunk(2, dim=-1)  # 2 × [B, F, 1, D]
        return self.final(modulate(self.final_norm(h), shift, scale)).float(), kvs  # [B, F, N, C]


def load_weights(model: nn.Module, path: str, key: str | None = None) -> None:
    """Load a checkpoint (a plain dict with a "model" state dict, or a bare state dict) into `model`,
    failing with the missing / unexpected / mis-shaped keys named. `key` is the config key that named the
    file, for the error messages (default: ae.init_from for a FrameAE, else nfd.init_from)."""

    key = key or ("ae.init_from" if isinstance(model, FrameAE) else "nfd.init_from")
    ckpt = read_checkpoint(path, key)
    sd = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(sd, dict):
        raise ConfigError(f"{path} holds no state dict (expected a dict with a 'model' entry); point {key} "
                          f"at an NFD/AE checkpoint")
    load_strict(model, sd, path, "use the nfd/ae config it was trained with")


def actions_multi_hot(action_tokens: torch.Tensor, dim: int = N_ACTION_IDS) -> torch.Tensor:
    """MineWorld action tokens [B, F, 11] (ids 8192..8259) -> multi-hot float32 [B, F, dim] over raw ids
    (App. A.2: camera bins + 7 exclusive classes, each a token; the linear a_embed maps it to D)."""
    raw = action_tokens.long() - ACTION_OFFSET  # [B, F, 11]
    if action_tokens.ndim != 3 or raw.numel() and (raw.min() < 0 or raw.max() >= dim):
        raise ValueError(f"action tokens must be [B, F, 11] MineWorld ids in [{ACTION_OFFSET}, {ACTION_OFFSET + dim}) "
                         f"(data.action_to_tokens); got shape {tuple(action_tokens.shape)}")
    hot = torch.zeros(*raw.shape[:2], dim, device=raw.device)  # [B, F, dim]
    return hot.scatter_(2, raw, 1.0)  # [B, F, dim]


def _check_clip(model: NFD, n_frames: int) -> None:
    if not 2 <= n_frames <= model.cfg.frames:
        raise ValueError(f"a clip needs 2..{model.cfg.frames} frames (nfd.frames), got {n_frames}")


# -----------------------------------------------------------------------------
# Batched forward over [clean context frames 0..F−2 | noisy frames 1..F−1] (training and replay)


def context_kv(model: NFD, clean: torch.Tensor, t_clean: torch.Tensor, act: torch.Tensor) -> list:
    """Per-layer (k, v) of clean frames 0..n−1 (clean [B, n, N, C], t_clean [B, n], act [B, n, A]) in one
    block-causal forward: clean frame j attends to clean frames ≤ j, exactly as the rollout's cache."""
    n = clean.shape[1]
    mask = block_causal_mask(n, model.n_tok, clean.device)  # [nN, nN]
    return model(clean, t_clean, act, torch.arange(n, device=clean.device), mask=mask)[1]


def noisy_velocity(model: NFD, ctx: list, noisy: torch.Tensor, t_noisy: torch.Tensor, act: torch.Tensor):
    """v for noisy frames 1..n (noisy [B, n, N, C] at t_noisy [B, n], act [B, n, A] = a_1..a_n) given the
    context cache of clean frames 0..n−1, all frames in one forward with replay_mask. -> [B, n, N, C]."""
    n = noisy.shape[1]
    mask = replay_mask(n, model.n_tok, noisy.device)  # [nN, 2nN]
    return model(noisy, t_noisy, act, torch.arange(1, n + 1, device=noisy.device), ctx=ctx, mask=mask)[0]


def fm_loss(model: NFD, frames: torch.Tensor, action_tokens: torch.Tensor,
            generator: torch.Generator | None = None) -> torch.Tensor:
    """Flow-matching loss with Diffusion Forcing noise (docs/conventions.md §2.2) on a clip.

    frames uint8 [B, F, H, W, 3], action_tokens [B, F, 11]. Every target frame f = 1..F−1 gets its own
    t_f ~ U(0, 1); its context is the clip's own frames 0..f−1, noised to t ~ U(0, nfd.context_noise)
    (NFD/DF context noise against error accumulation). The sequence is [context 0..F−2 | noisy 1..F−1]
    with the replay mask, so training sees exactly the attention pattern of rollout and replay.
    Loss: mean over frames, tokens and channels of (v_θ − (ε − x0))². Returns a scalar.
    """
    B, n_f = frames.shape[:2]
    _check_clip(model, n_f)
    with torch.no_grad():
        x0 = model.ae.encode(frames.flatten(0, 1)).view(B, n_f, model.n_tok, -1)  # [B, F, N, C]
    act = actions_multi_hot(action_tokens)  # [B, F, A]
    dev, n = x0.device, n_f - 1
    t_ctx = model.cfg.context_noise * torch.rand(B, n, device=dev, generator=generator)  # [B, F-1]
    t_tgt = torch.rand(B, n, device=dev, generator=generator)  # [B, F-1]  independent per frame (DF)
    eps_ctx = torch.randn(x0[:, :n].shape, device=dev, generator=generator)  # [B, F-1, N, C]
    eps = torch.randn(x0[:, 1:].shape, device=dev, generator=generator)  # [B, F-1, N, C]
    ctx_in = (1 - t_ctx[..., None, None]) * x0[:, :n] + t_ctx[..., None, None] * eps_ctx  # [B, F-1, N, C]
    x_t = (1 - t_tgt[..., None, None]) * x0[:, 1:] + t_tgt[..., None, None] * eps  # [B, F-1, N, C]
    ctx = context_kv(model, ctx_in, t_ctx, act[:, :n])
    v = noisy_velocity(model, ctx, x_t, t_tgt, act[:, 1:])  # [B, F-1, N, C]
    return (v - (eps - x0[:, 1:])).pow(2).mean()


# -----------------------------------------------------------------------------
# GRPO rollout with a KV cache over clean context frames (§4.3, Eq. 5; docs/conventions.md §3.1–§3.5)


@dataclass
class Rollout:
    frames: torch.Tensor  # uint8 [B, F, H, W, 3]: x0's tokenizer round trip, then the F−1 generated frames
    logp: torch.Tensor  # float32 [B, (F−1)·K]: log-prob of transition (f, k) at index (f−1)·K + k, detached
    mask: torch.Tensor  # float32 [B, (F−1)·K]: 1 on the trained steps τ of each trajectory (never step K−1)
    latents: torch.Tensor  # float32 [B, F, N, C]: encoded x0 and the clean generated latents (the replay context)
    traj: torch.Tensor  # float32 [B, F−1, K+1, N, C]: x_{t_0}..x_{t_K} of each generated frame
    ts: torch.Tensor  # float32 [K+1]: the time grid 1 = t_0 > … > t_K = 0
    g: torch.Tensor  # float32 [K]: diffusion coefficients g_k of the SDE
    actions: torch.Tensor  # int64 [B, F, 11]: the action tokens the rollout was conditioned on
    frame_of: torch.Tensor  # int64 [(F−1)·K]: the frame each log-prob entry belongs to (credit, train.py)
    fwd_t: torch.Tensor  # float32 [B, F−1]: a forward-process time per generated frame (rl.objective "nft")
    fwd_eps: torch.Tensor  # float32 [B, F−1, N, C]: its noise ε, so x_t = (1 − t)·x0 + t·ε (nft_velocity)
    ref: torch.Tensor | None = None  # float32 [B, F−1, K, N, C]: π_ref's transition means (reference), for the KL;
    # with rl.objective "nft" its velocities [B, F−1, N, C] at the forward-process draws instead


def build(cfg) -> NFD:
    """The run's world model from `cfg` (config.Config): the DiT from nfd.init_from and its frozen tokenizer
    from ae.init_from. RLIR post-trains a pretrained base, so nfd.init_from must be set ("scratch" = random)."""
    if cfg.nfd.init_from is None:
        raise UsageError("nfd.init_from is not set: RLIR post-trains a pretrained NFD base model. Make one with "
                         "`python pretrain.py nfd CONFIG` (NFD weights are not public) and point nfd.init_from at "
                         "it, or pass --nfd.init_from=scratch for random weights (smoke tests, benchmarks)")
    model = NFD(cfg.nfd, cfg.ae)
    if cfg.ae.init_from:
        load_weights(model.ae, cfg.ae.init_from)
    if cfg.nfd.init_from != "scratch":
        load_weights(model, cfg.nfd.init_from)
    return model


def roundtrip(model: NFD, frames: torch.Tensor) -> torch.Tensor:
    """Frames uint8 [B, F, H, W, 3] through the tokenizer (encode, decode): what a perfect world model can show."""
    return model.ae.roundtrip(frames)  # [B, F, H, W, 3]


def new_cache(model: NFD, batch: int, n_frames: int, device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer (k, v) buffers [B, heads, F·N, d] of a rollout: frame f's keys and values live at positions
    f·N..(f+1)·N, written once per call (Block's `at`) instead of concatenated onto a growing cache."""
    shape = (batch, model.cfg.heads, n_frames * model.n_tok, model.cfg.hidden // model.cfg.heads)
    return [(torch.zeros(shape, device=device), torch.zeros(shape, device=device)) for _ in model.blocks]


def cache_frame(model: NFD, cache: list, x: torch.Tensor, act: torch.Tensor, f: int) -> None:
    """Write clean frame f (x [B, N, C], act [B, A]) into its slot of the cache: one forward at t = 0 attending
    to frames 0..f, so its keys and values equal that frame's row of context_kv."""
    B, dev = x.shape[0], x.device
    model(x[:, None], torch.zeros(B, 1, device=dev), act[:, None], torch.tensor([f], device=dev), ctx=cache,
          at=f * model.n_tok)


def cached_velocity(model: NFD, cache: list, x: torch.Tensor, t: torch.Tensor, act: torch.Tensor, f: int):
    """v for noisy frame f (x [B, N, C] at 0-d time t, act [B, A]) given the cache of clean frames 0..f−1. Its own
    keys and values take frame f's slot until cache_frame writes the clean frame there. No mask: the frame's
    queries may see every cached key and all of their own frame. -> [B, N, C]."""
    B, dev = x.shape[0], x.device
    return model(x[:, None], t.expand(B, 1), act[:, None], torch.tensor([f], device=dev), ctx=cache,
                 at=f * model.n_tok)[0][:, 0]


def generate(model: NFD, x0: torch.Tensor, action_tokens: torch.Tensor, solve) -> tuple[torch.Tensor, list]:
    """Frames 1..F−1 one after another, each by `solve(v_fn, f) -> (x0 latent [B, N, C], extra)` given v_fn,
    the velocity of frame f attending to the cached keys/values of clean frames 0..f−1 (computed once per
    frame and reused by every solver step; no mask: every query may see every cached key and its own frame).
    Returns (latents [B, F, N, C] with x0's encoding first, the F−1 extras)."""
    _check_clip(model, action_tokens.shape[1])
    act = actions_multi_hot(action_tokens)  # [B, F, A]
    lat = [model.ae.encode(x0).float()]  # F × [B, N, C]
    cache = new_cache(model, len(x0), action_tokens.shape[1], x0.device)
    cache_frame(model, cache, lat[0], act[:, 0], 0)
    extras = []
    for f in range(1, action_tokens.shape[1]):
        x, extra = solve(lambda x, t: cached_velocity(model, cache, x, t, act[:, f], f), f)  # [B, N, C]
        lat.append(x)
        extras.append(extra)
        if f < action_tokens.shape[1] - 1:  # the clean frame becomes context for the frames after it
            cache_frame(model, cache, x, act[:, f], f)
    return torch.stack(lat, dim=1), extras  # [B, F, N, C]


def decode_clip(model: NFD, latents: torch.Tensor) -> torch.Tensor:
    """Latents of frames 0..F−1 [B, F, N, C] -> the clip uint8 [B, F, H, W, 3]. Frame 0 is x0's encoding
    decoded again: every frame the IDM reads shows the tokenizer's view, the context frame included
    (docs/conventions.md §8.4). One frame index at a time: B frames' activations stay in a CPU's cache, which
    decodes 512 frames ~1.4x faster than one batch of all of them (docs/2026-12-04-rollout-speed.md)."""
    return torch.stack([model.ae.decode(latents[:, f]) for f in range(latents.shape[1])], dim=1)  # [B, F, H, W, 3]


def sde_draws(cfg, B: int, shape: tuple, generator, dev):
    """What a GRPO rollout of B rows draws before its first step: the time grid ts [K+1] and coefficients g [K]
    (cfg.sde), the initial noise [B, *shape] (shared within a group of cfg.rl.group_size if sde.same_noise),
    then the trained steps τ, bool [B, K]; `generator` is one, or one per group (sde_sampler.per_group)."""
    s = cfg.sde
    ts = sde.timesteps(s.steps, s.shift).to(dev)  # [K+1]
    group = cfg.rl.group_size if s.same_noise else 1
    z1 = sde.initial_noise(B, group, tuple(shape), s.same_noise, generator, dev)  # [B, *shape]
    sel = sde.per_group(lambda b, gen: sde.select_steps(b, s.steps, s.tau, gen, s.window), B,
                        generator).to(dev)  # bool [B, K]
    return ts, sde.diffusion_coeff(ts, s), z1, sel


@torch.no_grad()
def rollout(model: NFD, x0: torch.Tensor, action_tokens: torch.Tensor, cfg,
            generator: torch.Generator | list[torch.Generator] | None = None) -> Rollout:
    """GRPO sampling: frames 1..F−1 from x0 uint8 [B, H, W, 3] and action_tokens [B, F, 11], each frame by
    sde_sampler.sample_sde with cfg.sde.steps steps (Eq. 5) of the KV-cached velocity. Random draws from
    `generator` (one, or one per GRPO group of cfg.rl.group_size rows: sde_sampler.per_group), in this order:
    the initial noise of all frames, the step selection τ, then each frame's per-step noise (so sample_frames
    with the same generator starts from the same x_1). With sde.noise_level = 0 the steps are Euler ODE steps
    (log-probs 0: no density), which only the g = 0 consistency check uses; sde.window keeps the noise on the
    first steps alone."""
    s, (B, n_f), dev = cfg.sde, action_tokens.shape[:2], x0.device
    ts, g, z1, sel = sde_draws(cfg, B, (n_f - 1, model.n_tok, model.cfg.latent_channels), generator, dev)

    def solve(v_fn, f):  # -> (x0 latent [B, N, C], (trajectory [K+1, B, N, C], log-probs [B, K]))
        x, traj, _, _, lps = sde.sample_sde(v_fn, z1[:, f - 1], ts, g, generator, s.logprob_reduce)
        return x, (traj, lps)

    latents, extras = generate(model, x0, action_tokens, solve)  # [B, F, N, C]
    # DiffusionNFT's draws come last, so the samples are the same whichever objective trains on them
    fwd_t = sde.per_group(lambda b, gen: torch.rand(b, n_f - 1, generator=gen, device=dev), B, generator)  # [B, F-1]
    fwd_eps = sde.randn(latents[:, 1:].shape, generator, dev)  # [B, F-1, N, C]
    traj = rearrange(torch.stack([t for t, _ in extras]), "f k b n c -> b f k n c")  # [B, F-1, K+1, N, C]
    logp = torch.stack([lp for _, lp in extras], dim=1).reshape(B, -1)  # [B, (F-1)K]
    mask = sel[:, None, :].expand(B, n_f - 1, s.steps).reshape(B, -1).float()  # [B, (F-1)K], same steps every frame
    return Rollout(frames=decode_clip(model, latents), logp=logp, mask=mask, latents=latents, traj=traj,
                   ts=ts, g=g, actions=action_tokens.long(), fwd_t=fwd_t, fwd_eps=fwd_eps,
                   frame_of=torch.arange((n_f - 1) * s.steps, device=dev) // s.steps + 1)


def transition_means(model: NFD, ro: Rollout):
    """μ_θ of the stored transitions, step index by step index: yields (k, rows idx [b] that train step k in
    some frame, μ [b, F−1, N, C], std s_k). The clean context (ro.latents 0..F−2, t = 0) runs once,
    block-causally, and its per-layer keys/values are shared by every step; each step is then one batched
    forward of the noisy frames 1..F−1 at t_k over [context | noisy] with replay_mask. Looping over step
    indices (at most K−1 forwards, each over ≈τ of the batch) rather than gathering all (sample, step)
    pairs into one batch is the same work, but peak memory stays at one step's activations."""
    B, n_f = ro.actions.shape[:2]
    n, K = n_f - 1, ro.ts.shape[0] - 1
    act = actions_multi_hot(ro.actions)  # [B, F, A]
    rows_per_k = (ro.mask.view(B, n, K) > 0).any(dim=1)  # [B, K]  samples that train step k in some frame
    ctx = context_kv(model, ro.latents[:, :n], torch.zeros(B, n, device=ro.latents.device), act[:, :n])
    for k in range(K):
        idx = rows_per_k[:, k].nonzero().squeeze(1)  # [b]
        if idx.numel():
            x_k = ro.traj[idx, :, k]  # [b, F-1, N, C]
            v = noisy_velocity(model, [(ck[idx], cv[idx]) for ck, cv in ctx], x_k, ro.ts[k].expand(idx.numel(), n),
                               act[idx, 1:])  # [b, F-1, N, C]
            _, mean, std = sde.sde_step(x_k, v, ro.ts[k], ro.ts[k + 1], ro.g[k], noise=torch.zeros_like(x_k))
            yield k, idx, mean, std


def log_probs(model: NFD, ro: Rollout, cfg) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Differentiable log π_θ of the stored transitions [B, (F−1)·K], 0 where ro.mask is 0, reduced over the
    latent elements with cfg.sde.logprob_reduce; and, if ro.ref holds π_ref's means, the closed-form KL of
    each transition to π_ref with the same reduction, (μ_θ − μ_ref)² / (2 s_k²) per element
    (docs/conventions.md §3.3), so grpo.beta weighs a per-element KL as it weighs AR's per-token one. Replay
    sees the same context, times and states as the rollout, so on the first pass it returns ro.logp
    (fp32: to ~1e-5, ratio 1)."""
    B, n, K = ro.traj.shape[0], ro.traj.shape[1], ro.ts.shape[0] - 1
    red, zero = cfg.sde.logprob_reduce, ro.latents.new_zeros(B, n)  # [B, F-1]
    lp, kl = [zero] * K, [zero] * K  # K × [B, F-1]; steps no row trains stay 0
    for k, idx, mean, std in transition_means(model, ro):
        lp[k] = zero.index_copy(0, idx, sde.log_prob(ro.traj[idx, :, k + 1], mean, std, red, batch_dims=2))
        if ro.ref is not None:
            kl[k] = zero.index_copy(0, idx, sde.kl_to_ref(mean, ro.ref[idx, :, k], std, red, batch_dims=2))
    mask = ro.mask.view(B, n, K)  # [B, F-1, K]
    per_entry = [(torch.stack(x, dim=2) * mask).reshape(B, -1) for x in (lp, kl)]  # 2 × [B, (F-1)K]
    return per_entry[0], None if ro.ref is None else per_entry[1]


def nft_velocity(model: NFD, ro: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
    """DiffusionNFT's forward process on the rollout's own clean samples (rl.objective "nft", grpo.nft_loss):
    generated frame f noised to x_t = (1 − t)·x0 + t·ε with the rollout's fwd_t, fwd_eps, its velocity given
    the clean frames 0..f−1 as the rollout saw them (one block-causal forward for the whole clip, as in
    training). -> (v_θ [B, F−1, N, C], differentiable; the flow-matching target ε − x0 [B, F−1, N, C])."""
    B, n = ro.fwd_t.shape
    act = actions_multi_hot(ro.actions)  # [B, F, A]
    x0, t = ro.latents[:, 1:], ro.fwd_t[..., None, None]  # [B, F-1, N, C], [B, F-1, 1, 1]
    x_t = (1 - t) * x0 + t * ro.fwd_eps  # [B, F-1, N, C]
    ctx = context_kv(model, ro.latents[:, :n], torch.zeros(B, n, device=x0.device), act[:, :n])
    return noisy_velocity(model, ctx, x_t, ro.fwd_t, act[:, 1:]), ro.fwd_eps - x0


@torch.no_grad()
def reference(model: NFD, ro: Rollout, cfg) -> torch.Tensor:
    """What the KL of the objective needs from the frozen reference policy: its transition means
    [B, F−1, K, N, C] (0 at steps no frame of the row trains), or with rl.objective "nft" its velocities at the
    forward-process draws [B, F−1, N, C]."""
    if cfg.rl.objective == "nft":
        return nft_velocity(model, ro)[0]
    out = ro.traj.new_zeros(ro.traj.shape[0], ro.traj.shape[1], ro.ts.shape[0] - 1, *ro.traj.shape[3:])
    for k, idx, mean, _ in transition_means(model, ro):
        out[idx, :, k] = mean
    return out


# -----------------------------------------------------------------------------
# Deterministic evaluation sampler (paper §5.1: DPM-Solver++, 18 steps)


@torch.no_grad()
def sample_frames(model: NFD, x0: torch.Tensor, action_tokens: torch.Tensor, cfg,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Frames uint8 [B, F, H, W, 3] from x0 [B, H, W, 3] and action_tokens [B, F, 11]: each frame solved by
    sde_sampler.ode_sample (cfg.sde.eval_solver over cfg.sde.eval_steps on the shifted grid) with the same
    KV cache over clean context as rollout. The initial noise is drawn like rollout's (no sharing)."""
    B, n_f = action_tokens.shape[:2]
    z1 = sde.randn((B, n_f - 1, model.n_tok, model.cfg.latent_channels), generator, x0.device)  # [B, F-1, N, C]
    latents, _ = generate(model, x0, action_tokens, lambda v_fn, f: (sde.ode_sample(v_fn, z1[:, f - 1], cfg.sde), None))
    return decode_clip(model, latents)  # [B, F, H, W, 3]
