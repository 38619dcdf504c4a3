"""MineWorld-style autoregressive world model (paper §4.2; docs/formats.md §1).

A Llama transformer (RMSNorm, RoPE, grouped-query attention, SwiGLU) reads one flat token sequence per
clip. Each frame contributes its VQ image tokens in raster order, followed by the 11 tokens of the action
that produces the next frame (Eq. 4; docs/formats.md §1.5):

    img_0  act(a_1)  img_1  act(a_2)  ...  img_14  act(a_15)  img_15

Parameter names follow HF `LlamaForCausalLM` and MineWorld's `LlamaLVM` (`transformer.*` and
`tokenizer.model.*`), so a released MineWorld checkpoint loads without renaming. RLIR uses four calls:
    rollout(model, x0, action_tokens, ...) -> Rollout    batched KV-cache sampling, old log-probs, loss mask
    log_probs(model, rollout) -> [B, L]                  one differentiable forward, same softmax as the rollout
    sample_frames(model, x0, action_tokens) -> frames    evaluation sampling (MineWorld: T=1, top-p 0.8)
    lm_loss(model, frames, action_tokens) -> scalar      next-token pretraining loss on the image tokens
"""
import dataclasses
import json
import math
import os
import warnings
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from runtime import (POSITIVE, SIZES, ConfigError, UsageError, at_least, check_fields, load_strict, nonempty,
                     read_checkpoint)

ACTION_VOCAB = 68  # ids n_codes..n_codes+67: 65 keys/camera bins, bos, null, eos (docs/formats.md §1.5)
NUCLEUS = (lambda p: 0 < p <= 1), "in (0, 1] (1 = the full distribution)"  # the rule of a top-p mass
MINEWORLD_HINT = ("MineWorld's weights are on the ModelScope mirror modelscope.cn/models/AI-ModelScope/mineworld "
                  "(the HF repo is offline, mineworld issue #18)")


# ----------------------------------------------------------------------------------------------------------
# Configuration


@dataclass
class ARConfig:
    vocab_size: int = 582  # embedding/lm_head rows: n_codes + 68 action ids + 2 unused (MineWorld: 8262)
    n_codes: int = 512  # image codebook size = id of the first action token (MineWorld: 8192); = vq.codebook_size
    hidden: int = 256  # model width H (MineWorld: 1024 / 2048 / 2048)
    intermediate: int = 768  # SwiGLU width I (MineWorld: 4096 / 4096 / 8192)
    heads: int = 4  # query heads; head_dim = hidden / heads (MineWorld: 64)
    kv_heads: int = 2  # key/value heads of grouped-query attention; divides heads (MineWorld: 4)
    layers: int = 4  # transformer blocks (MineWorld: 20)
    rope_theta: float = 1e4  # RoPE base θ
    rms_eps: float = 1e-5  # RMSNorm epsilon
    frames: int = 16  # frames per clip: 1 given + 15 generated
    image_tokens: int = 64  # VQ tokens per frame = grid rows × cols (toy 8×8; MineWorld 14×24 = 336)
    action_tokens: int = 11  # tokens per action (docs/formats.md §1.5)
    temperature: float = 1.0  # softmax temperature of training rollouts (> 0)
    top_p: float = 1.0  # nucleus mass of training rollouts, in (0, 1]; 1.0 = sample the full distribution
    eval_temperature: float = 1.0  # temperature for evaluation (MineWorld's eval setting: 1.0)
    eval_top_p: float = 0.8  # nucleus mass for evaluation (MineWorld's eval setting: 0.8)
    init_from: str = "scratch"  # "scratch", or a checkpoint: MineWorld .ckpt ({"state_dict": ...}) or raw .bin

    def __post_init__(self):
        check_fields(self, {
            "n_codes": at_least(1), "hidden": at_least(1), "intermediate": at_least(1), "heads": at_least(1),
            "kv_heads": at_least(1), "layers": at_least(1), "rope_theta": POSITIVE, "rms_eps": POSITIVE,
            "frames": at_least(2, "the given frame and at least one generated"), "image_tokens": at_least(1),
            "action_tokens": ((lambda a: a == 11), "11 (MineWorld's tokens per action, data.action_to_tokens)"),
            "temperature": POSITIVE, "top_p": NUCLEUS, "eval_temperature": POSITIVE, "eval_top_p": NUCLEUS,
            "init_from": nonempty('"scratch" or a checkpoint path')})
        if self.hidden % (2 * self.heads):                   # RoPE rotates pairs of each head's channels
            raise ConfigError(f"heads={self.heads}: hidden={self.hidden} must split into heads of an even width")
        if self.heads % self.kv_heads:
            raise ConfigError(f"kv_heads={self.kv_heads}: must divide heads={self.heads} (grouped-query attention)")
        if self.vocab_size < self.n_codes + ACTION_VOCAB:
            raise ConfigError(f"vocab_size={self.vocab_size}: must be >= n_codes + {ACTION_VOCAB} action ids "
                              f"= {self.n_codes + ACTION_VOCAB}")

    @property
    def frame_len(self) -> int:  # tokens per frame unit, image + action (MineWorld: 347)
        return self.image_tokens + self.action_tokens

    @property
    def max_pos(self) -> int:  # RoPE table length, frames × frame_len (MineWorld 16f: 5552), as MineWorld's config
        return self.frames * self.frame_len

    @property
    def seq_len(self) -> int:  # L: the clip sequence; no action follows the last frame
        return self.frames * self.image_tokens + (self.frames - 1) * self.action_tokens


def power_of_2(s: int) -> bool:  # a tokenizer stride: 2, 4, 8, ...
    return s >= 2 and s & (s - 1) == 0


@dataclass
class VQConfig:
    frame_hw: tuple[int, int] = (64, 64)  # frame height, width in pixels (MineWorld: 224, 384)
    stride: int = 8  # pixels per latent cell along each side, a power of 2 (MineWorld: 16)
    stride_w: int = 0  # pixels per latent cell across when it differs from stride (16: an 8×4 grid); 0 = stride
    codebook_size: int = 512  # number of codes K (MineWorld: 8192); must equal ar.n_codes
    code_dim: int = 64  # width D of a code vector (MineWorld: 64)
    channels: int = 64  # conv width of the toy encoder and decoder
    beta: float = 0.25  # commitment weight β of the VQ-VAE loss (van den Oord et al. 2017, Eq. 3)
    init_from: str = "scratch"  # "scratch", or tokenizer weights with keys model.* (ours, or MineWorld's vae.ckpt)
    diffusers_config: str | None = None  # MineWorld's checkpoints/vae/config.json: use diffusers' VQModel instead
    # The quantizer. "vq": a learned codebook, MineWorld's layout (what real checkpoints load; docs/formats.md §1.4);
    # "fsq": finite scalar quantization (Mentzer et al. 2023), a fixed grid of codes, so no codebook to collapse.
    kind: Literal["vq", "fsq"] = "vq"
    # FSQ levels per channel: the latent has len(levels) channels, channel i takes levels[i] values; prod(levels)
    # is the number of codes and must equal codebook_size when kind is fsq (the paper's Table 1 picks e.g. 8, 5, 5, 5
    # for 1000 codes; 8, 8, 4 gives the laptop scale's 256). Unused with kind vq.
    levels: tuple[int, ...] = (8, 8, 8)

    def __post_init__(self):
        check_fields(self, {
            "frame_hw": SIZES, "stride": (power_of_2, "a power of 2, >= 2"),
            "stride_w": ((lambda s: s == 0 or power_of_2(s)), "0 (= stride) or a power of 2, >= 2"),
            "codebook_size": at_least(1), "code_dim": at_least(1), "channels": at_least(1), "beta": at_least(0),
            "init_from": nonempty('"scratch" or a checkpoint path'),
            "diffusers_config": nonempty("the path of MineWorld's vae/config.json"),
            "levels": ((lambda v: len(v) > 0 and all(n >= 2 for n in v)), "one or more levels, each >= 2")})
        if any(side % s for side, s in zip(self.frame_hw, self.strides)):
            raise ConfigError(f"frame_hw={self.frame_hw}: height and width must be multiples of the strides "
                              f"{self.strides} (vq.stride, vq.stride_w)")
        if self.kind == "fsq" and math.prod(self.levels) != self.codebook_size:
            raise ConfigError(f"levels={self.levels}: with kind fsq their product {math.prod(self.levels)} is the "
                              f"number of codes and must equal codebook_size={self.codebook_size}")
        if self.kind == "fsq" and self.diffusers_config is not None:
            raise ConfigError(f"diffusers_config={self.diffusers_config!r}: MineWorld's VQModel is a kind vq "
                              f"tokenizer; with kind fsq leave diffusers_config unset")

    @property
    def strides(self) -> tuple[int, int]:  # pixels per latent cell down, across
        return self.stride, self.stride_w or self.stride

    @property
    def grid(self) -> tuple[int, int]:  # latent rows, cols (toy: 8×8; MineWorld: 14×24)
        return self.frame_hw[0] // self.strides[0], self.frame_hw[1] // self.strides[1]


# ----------------------------------------------------------------------------------------------------------
# Sequence layout (docs/formats.md §1.5). Clip convention: action_tokens[:, t] holds the tokens of a_t, the action that
# turns x_{t-1} into x_t, so row 0 is unused (frame 0 is given) and row t+1 follows image t.


def build_sequence(image_ids: torch.Tensor, action_tokens: torch.Tensor) -> torch.Tensor:
    """Interleave [B, F, N] image ids and [B, F, 11] action ids into the clip sequence [B, L]."""
    body = torch.cat([image_ids[:, :-1], action_tokens[:, 1:]], dim=2)  # [B, F-1, N+11]: img_t then act(a_{t+1})
    return torch.cat([body.flatten(1), image_ids[:, -1]], dim=1)  # [B, L]


def generated_positions(cfg: ARConfig, device=None) -> torch.Tensor:
    """Bool [L]: True on the image tokens of frames 1..F-1, the only tokens the model generates (§4.2)."""
    f, n, a = cfg.frames, cfg.image_tokens, cfg.action_tokens
    is_image = torch.cat([torch.ones(f, n, dtype=torch.bool), torch.zeros(f, a, dtype=torch.bool)], 1)  # [F, N+11]
    is_image = is_image.flatten()[:cfg.seq_len].to(device)  # [L]
    is_image[:cfg.frame_len] = False  # frame 0 and act(a_1) are given
    return is_image


# ----------------------------------------------------------------------------------------------------------
# Llama transformer (docs/formats.md §1.3). Module tree and names = HF LlamaForCausalLM: model.embed_tokens,
# model.layers.{i}.{self_attn,mlp,input_layernorm,post_attention_layernorm}, model.norm, lm_head.


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in fp32, cast back, then scale: the order HF and MineWorld use
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_tables(head_dim: int, max_pos: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [max_pos, head_dim] of rotary embeddings over the full head dim (HF default rope)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)  # [d/2]
    angles = torch.arange(max_pos).float()[:, None] * inv_freq[None]  # [P, d/2]
    angles = torch.cat([angles, angles], dim=-1)  # [P, d]: the two halves share frequencies
    return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin  # x [B, h, T, d], cos/sin [T, d]


class Attention(nn.Module):
    def __init__(self, cfg: ARConfig):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.heads, cfg.kv_heads, cfg.hidden // cfg.heads
        self.q_proj = nn.Linear(cfg.hidden, cfg.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden, cfg.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden, cfg.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.heads * self.head_dim, cfg.hidden, bias=False)

    def forward(self, x, cos, sin, start: int, cache: tuple[torch.Tensor, torch.Tensor] | None):
        # view/transpose rather than einops here: this runs once per layer and sampled token
        b, t, d = x.shape[0], x.shape[1], self.head_dim
        q = self.q_proj(x).view(b, t, self.heads, d).transpose(1, 2)  # [B, h, T, d]
        k = self.k_proj(x).view(b, t, self.kv_heads, d).transpose(1, 2)  # [B, kv, T, d]
        v = self.v_proj(x).view(b, t, self.kv_heads, d).transpose(1, 2)  # [B, kv, T, d]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is None:  # whole sequence at once: plain causal attention
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # [B, h, T, d]
        else:  # write this chunk into the preallocated cache, attend to everything up to it
            end = start + t
            cache[0][:, :, start:end], cache[1][:, :, start:end] = k, v
            k, v = cache[0][:, :, :end], cache[1][:, :, :end]  # [B, kv, end, d]
            if t == 1:  # one query sees every cached key: the heads sharing a kv head are its queries
                y = F.scaled_dot_product_attention(q.reshape(b, self.kv_heads, -1, d), k, v)  # [B, kv, h/kv, d]
            else:  # query at absolute position start+i sees keys 0..start+i
                pos = torch.arange(end, device=x.device)  # [end]
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=pos[None, :] <= pos[start:, None],
                                                   enable_gqa=True)  # [B, h, T, d]
        # query head i uses kv head i // (heads / kv_heads): HF's repeat_kv / repeat_interleave, and enable_gqa
        return self.o_proj(y.reshape(b, self.heads, t, d).transpose(1, 2).reshape(b, t, -1))  # [B, T, H]


class MLP(nn.Module):
    def __init__(self, cfg: ARConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden, cfg.intermediate, bias=False)
        self.up_proj = nn.Linear(cfg.hidden, cfg.intermediate, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate, cfg.hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class Block(nn.Module):
    def __init__(self, cfg: ARConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden, cfg.rms_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden, cfg.rms_eps)

    def forward(self, x, cos, sin, start, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, start, cache)  # pre-norm residual
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """HF `LlamaModel` minus its forward: a container that gives the `model.*` key names."""

    def __init__(self, cfg: ARConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.norm = RMSNorm(cfg.hidden, cfg.rms_eps)


class Transformer(nn.Module):
    """HF / MineWorld `LlamaForCausalLM`: untied lm_head, no biases, RoPE tables for max_pos positions."""

    def __init__(self, cfg: ARConfig):
        super().__init__()
        if cfg.hidden % cfg.heads or cfg.heads % cfg.kv_heads:
            raise ValueError(f"ar.hidden ({cfg.hidden}) must be divisible by ar.heads ({cfg.heads}) and ar.heads by "
                             f"ar.kv_heads ({cfg.kv_heads}); change one of them")
        self.cfg = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden, cfg.vocab_size, bias=False)
        cos, sin = rope_tables(cfg.hidden // cfg.heads, cfg.max_pos, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)  # [P, d], not in the state dict (as MineWorld)
        self.register_buffer("rope_sin", sin, persistent=False)
        for m in self.modules():  # HF's init: N(0, 0.02) for every matrix, ones for the norms
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)

    def forward(self, ids: torch.Tensor, start: int = 0, cache: list | None = None) -> torch.Tensor:
        """Logits [B, T, V] of ids [B, T] at positions start..start+T-1; with `cache`, keys/values are kept."""
        t = ids.shape[1]
        if start + t > self.cfg.max_pos:
            raise ValueError(f"sequence reaches position {start + t} but ar.max_pos is {self.cfg.max_pos} "
                             f"(= frames × (image_tokens + action_tokens)); raise ar.frames")
        x = self.model.embed_tokens(ids)  # [B, T, H]
        cos, sin = self.rope_cos[start:start + t].to(x.dtype), self.rope_sin[start:start + t].to(x.dtype)  # [T, d]
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, start, None if cache is None else cache[i])
        return self.lm_head(self.model.norm(x))  # [B, T, V]


def new_cache(transformer: Transformer, batch: int, length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Preallocated per-layer (k, v) buffers [B, kv_heads, length, head_dim], in the model's dtype and device."""
    cfg, w = transformer.cfg, transformer.lm_head.weight
    shape = (batch, cfg.kv_heads, length, cfg.hidden // cfg.heads)
    return [(w.new_zeros(shape), w.new_zeros(shape)) for _ in range(cfg.layers)]


# ----------------------------------------------------------------------------------------------------------
# VQ tokenizer (docs/formats.md §1.4). The toy VQ-VAE has the same submodule names as diffusers' VQModel (encoder,
# quant_conv, quantize.embedding, post_quant_conv, decoder), so one encode/decode path serves both. With vq.kind fsq
# the toy model's `quantize` is FSQ below instead of a codebook; everything around it stays the same.


class Codebook(nn.Module):
    """Named like diffusers' VectorQuantizer so that its key reads `quantize.embedding.weight`."""

    def __init__(self, size: int, dim: int):
        super().__init__()
        self.embedding = nn.Embedding(size, dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / size, 1.0 / size)  # VQ-VAE / diffusers init


class FSQ(nn.Module):
    """Finite scalar quantization (Mentzer et al. 2023, "Finite Scalar Quantization: VQ-VAE Made Simple", §3):
    each of d = len(levels) channels is bounded and rounded to one of levels[i] integers; a code is the tuple of
    the d integers, so the codebook is the fixed grid of prod(levels) tuples. Nothing is learned (no codebook or
    commitment loss, no code falls out of use) and nothing is saved: a checkpoint holds the convs around it."""

    def __init__(self, levels: tuple[int, ...]):
        super().__init__()
        levels_t = torch.tensor(levels)  # [d]
        # a code id is the mixed-radix number whose digit i is channel i's level, channel 0 the least significant
        # (the paper's App. A.1): basis = 1, L_0, L_0·L_1, ...
        basis = torch.cumprod(F.pad(levels_t[:-1], (1, 0), value=1), 0)  # [d]
        self.register_buffer("levels", levels_t, persistent=False)
        self.register_buffer("basis", basis, persistent=False)

    def bound(self, z: torch.Tensor) -> torch.Tensor:
        """The bound f(z) of §3, per channel [..., d] -> [..., d]: about ⌊L/2⌋·tanh(z), scaled so that rounding
        leaves exactly L integers, −(L−1)/2..(L−1)/2 for odd L and, shifted down by half a step, −L/2..L/2−1 for
        even L; the shift inside the tanh keeps f(0) = 0. The paper's listing (App. A.1) writes (1 − ε) and
        tan(offset / half_l); atanh makes f(0) = 0 exactly, and (1 + ε) keeps its argument below 1 when L = 2.
        ε widens the range by 0.1 %, short of the next rounding edge."""
        levels = self.levels.to(z.dtype)  # [d]
        half_l = (levels - 1) * (1 + 1e-3) / 2  # [d]
        offset = (1 - levels % 2) / 2  # [d]: 0.5 for even L, 0 for odd
        return torch.tanh(z + torch.atanh(offset / half_l)) * half_l - offset  # [..., d]

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z [B, d, h, w] -> (ẑ [B, d, h, w] in [−1, 1] with a straight-through gradient, ids [B, h, w])."""
        # fp32: under bf16 autocast a value near a rounding edge could land on the wrong integer
        bounded = self.bound(rearrange(z, "b d h w -> b h w d").float())  # [B, h, w, d]
        zhat = bounded + (bounded.round() - bounded).detach()  # [B, h, w, d]: round_ste (§3), backward = f'(z)
        # renormalised by ⌊L/2⌋ as in App. A.1, so every channel spans about [−1, 1] whatever its L
        zhat = zhat / (self.levels // 2)  # [B, h, w, d]
        return rearrange(zhat, "b h w d -> b d h w").to(z.dtype), self.codes_to_ids(zhat.detach())

    def codes_to_ids(self, zhat: torch.Tensor) -> torch.Tensor:
        """Normalised codes [..., d] -> ids [...] in [0, prod(levels)): digit i = ẑ_i·⌊L_i/2⌋ + ⌊L_i/2⌋ in [0, L_i)."""
        digits = (zhat * (self.levels // 2)).round().long() + self.levels // 2  # [..., d]
        return (digits * self.basis).sum(-1)  # [...]

    def ids_to_codes(self, ids: torch.Tensor) -> torch.Tensor:
        """Ids [...] -> normalised codes [..., d], the inverse of codes_to_ids: digit i = ⌊id / basis_i⌋ mod L_i."""
        digits = ids[..., None] // self.basis % self.levels  # [..., d]
        return (digits - self.levels // 2) / (self.levels // 2)  # [..., d]


class VQVAE(nn.Module):
    """Small conv VQ-VAE: log2(stride) stride-2 convs down, as many transposed convs up (with stride_w > stride the
    extra ones halve the width only, for a grid with fewer columns than rows). With kind fsq the 1×1
    quant_conv projects the code_dim encoder output down to the d = len(levels) FSQ channels and post_quant_conv
    back up (FSQ §3: a few channels, each with a few levels, in place of one wide codebook vector)."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        n_h, n_w = (s.bit_length() - 1 for s in cfg.strides)  # halvings of height, width
        c = cfg.channels
        # layer i halves the height while i < n_h and the width while i < n_w (kernel 4, stride 2), else keeps it (3, 1)
        shape = [((4 if i < n_h else 3, 4 if i < n_w else 3), (2 if i < n_h else 1, 2 if i < n_w else 1))
                 for i in range(max(n_h, n_w))]  # (kernel, stride) per layer
        down = [m for i, (k, st) in enumerate(shape) for m in (nn.Conv2d(3 if i == 0 else c, c, k, st, 1), nn.SiLU())]
        up = [m for k, st in shape[::-1] for m in (nn.ConvTranspose2d(c, c, k, st, 1), nn.SiLU())]
        d = len(cfg.levels) if cfg.kind == "fsq" else cfg.code_dim  # width of what is quantized
        self.encoder = nn.Sequential(*down, nn.Conv2d(c, cfg.code_dim, 3, 1, 1))
        self.quant_conv = nn.Conv2d(cfg.code_dim, d, 1)
        self.quantize = FSQ(cfg.levels) if cfg.kind == "fsq" else Codebook(cfg.codebook_size, cfg.code_dim)
        self.post_quant_conv = nn.Conv2d(d, cfg.code_dim, 1)
        self.decoder = nn.Sequential(nn.Conv2d(cfg.code_dim, c, 3, 1, 1), nn.SiLU(), *up, nn.Conv2d(c, 3, 3, 1, 1))


def nearest_codes(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Ids [B, h, w] of the code nearest (L2) to each latent vector of z [B, D, h, w]; codebook [K, D]."""
    b, _, h, w = z.shape
    zf = rearrange(z, "b d h w -> (b h w) d")  # [B·h·w, D]
    dist = zf.pow(2).sum(1, keepdim=True) - 2 * zf @ codebook.t() + codebook.pow(2).sum(1)  # [B·h·w, K]
    return dist.argmin(1).view(b, h, w)


def quantize(z: torch.Tensor, codebook: torch.Tensor):
    """VQ-VAE bottleneck. Returns z_q with a straight-through gradient (forward = codes, backward = identity
    to z), ids [B, h, w], the codebook loss ||sg[z] − e||² and the commitment loss ||z − sg[e]||²."""
    ids = nearest_codes(z, codebook)
    zq = rearrange(codebook[ids], "b h w d -> b d h w")  # [B, D, h, w]
    codebook_loss = F.mse_loss(zq, z.detach())
    commit_loss = F.mse_loss(z, zq.detach())
    return z + (zq - z).detach(), ids, codebook_loss, commit_loss


def code_usage(ids: torch.Tensor, n_codes: int) -> dict:
    """How much of a codebook of n_codes the ids (any shape) use: the number of codes seen, their share of
    n_codes, and the perplexity exp(H) of the code histogram (the effective number of equally used codes,
    = codes_used when all are used equally). A collapsing VQ codebook shows as a small share."""
    counts = torch.bincount(ids.flatten(), minlength=n_codes).float()  # [K]
    p = counts[counts > 0] / counts.sum()  # [used]: 0·log 0 = 0
    used = int((counts > 0).sum())
    return {"codes_used": used, "codes_share": round(used / n_codes, 4),
            "codes_perplexity": round(float(torch.exp(-(p * p.log()).sum())), 2)}


class Tokenizer(nn.Module):
    """MineWorld's `vae.VAE` wrapper: frames uint8 ↔ ids; `.model` is the toy VQVAE or a diffusers VQModel.
    The quantizer is a codebook (kind vq: nearest code) or FSQ (kind fsq: a fixed grid); the rest is shared."""

    def __init__(self, cfg: VQConfig, model: nn.Module | None = None):
        super().__init__()
        self.cfg = cfg
        self.model = model if model is not None else VQVAE(cfg)

    def latents(self, frames: torch.Tensor) -> torch.Tensor:
        """Pre-quantisation latents [B, D, h, w] of frames uint8 [B, H, W, 3] (kind fsq: D = len(levels))."""
        if frames.dtype != torch.uint8 or tuple(frames.shape[1:]) != (*self.cfg.frame_hw, 3):
            raise ValueError(f"tokenizer expects uint8 frames [B, {self.cfg.frame_hw[0]}, {self.cfg.frame_hw[1]}, 3], "
                             f"got {frames.dtype} {tuple(frames.shape)}; resize or set vq.frame_hw")
        dtype = self.model.quant_conv.weight.dtype  # the weights' dtype (toy model and diffusers' VQModel alike)
        x = rearrange(frames, "b h w c -> b c h w").to(dtype) / 255.0 * 2 - 1  # [B, 3, H, W]: /255, Normalize(0.5, 0.5)
        return self.model.quant_conv(self.model.encoder(x))

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """Frames uint8 [B, H, W, 3] -> ids [B, h·w], row-major (token = row·w + col)."""
        z = self.latents(frames)  # [B, D, h, w]
        if self.cfg.kind == "fsq":
            return self.model.quantize(z)[1].flatten(1)
        return nearest_codes(z, self.model.quantize.embedding.weight).flatten(1)

    def decode_latents(self, zq: torch.Tensor) -> torch.Tensor:
        return self.model.decoder(self.model.post_quant_conv(zq))  # [B, 3, H, W] in about [-1, 1]

    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """Ids [B, h·w] -> frames uint8 [B, H, W, 3]: clamp to [-1, 1], then (x+1)/2·255 cast (truncated)."""
        h, w = self.cfg.grid
        if self.cfg.kind == "fsq":  # the grid point of each id, in the dtype the convs run in
            codes = self.model.quantize.ids_to_codes(ids).to(self.model.post_quant_conv.weight.dtype)  # [B, h·w, D]
        else:
            codes = self.model.quantize.embedding.weight[ids]  # [B, h·w, D]
        zq = rearrange(codes, "b (h w) d -> b d h w", h=h, w=w)  # [B, D, h, w]
        x = self.decode_latents(zq).float().clamp(-1, 1)  # [B, 3, H, W]
        return rearrange(((x + 1) / 2 * 255).to(torch.uint8), "b c h w -> b h w c")  # [B, H, W, 3]

    @torch.no_grad()
    def roundtrip(self, frames: torch.Tensor) -> torch.Tensor:
        """Frames uint8 [..., H, W, 3] encoded and decoded again: the tokenizer's view of them, same shape."""
        return self.decode(self.encode(frames.flatten(0, -4))).view(frames.shape)

    def loss(self, frames: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """VQ-VAE pretraining loss: MSE reconstruction (in [-1, 1]) + codebook + β·commitment. With kind fsq
        the reconstruction is the whole loss (FSQ §3: a fixed grid has no codebook to move, nothing to commit to)."""
        target = rearrange(frames, "b h w c -> b c h w").float() / 255.0 * 2 - 1  # [B, 3, H, W]
        z = self.latents(frames)  # [B, D, h, w]
        if self.cfg.kind == "fsq":
            zq, ids = self.model.quantize(z)  # [B, d, h, w], [B, h, w]
            codebook_loss = commit_loss = zq.new_zeros(())
        else:
            zq, ids, codebook_loss, commit_loss = quantize(z, self.model.quantize.embedding.weight)
        recon = F.mse_loss(self.decode_latents(zq), target)
        usage = code_usage(ids, self.cfg.codebook_size)  # of this batch
        loss = recon + codebook_loss + self.cfg.beta * commit_loss
        stats = dict(recon=recon.item(), codebook=codebook_loss.item(), commit=commit_loss.item(),
                     perplexity=usage["codes_perplexity"], used_codes=usage["codes_used"])
        return loss, stats


def load_mineworld_vae(config_json: str, ckpt: str) -> nn.Module:
    """MineWorld's tokenizer: diffusers `VQModel.from_config(config.json)` with weights from vae.ckpt
    ({"state_dict": ...} or raw, keys `model.*`; or .safetensors). diffusers is an optional extra."""
    for path in (config_json, ckpt):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"MineWorld VAE file not found: {path}. Put checkpoints/vae/config.json and "
                                    f"checkpoints/vae/vae.ckpt there; {MINEWORLD_HINT}")
    try:
        from diffusers import VQModel
    except ImportError as e:
        raise ImportError("loading MineWorld's VQ tokenizer needs the optional extra `diffusers` "
                          "(MineWorld pins 0.32.2): pip install diffusers==0.32.2") from e
    with open(config_json) as f:
        vae = VQModel.from_config(json.load(f))
    if ckpt.endswith(".safetensors"):
        from safetensors.torch import load_file
        sd = load_file(ckpt)
    else:
        sd = read_state_dict(ckpt, "vq.init_from")
    if any(k.startswith("model.") for k in sd):  # keys of MineWorld's wrapper; anything else (e.g. a loss) is dropped
        sd = {k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")}
    load_weights(vae, sd, ckpt)
    return vae


# ----------------------------------------------------------------------------------------------------------
# World model and checkpoints (docs/formats.md §1.3)


class WorldModel(nn.Module):
    """MineWorld's `LlamaLVM`: `.transformer` (Llama) and `.tokenizer` (frozen VQ; only the transformer trains)."""

    def __init__(self, ar: ARConfig, vq: VQConfig, tokenizer_model: nn.Module | None = None):
        super().__init__()
        h, w = vq.grid
        problems = []
        if ar.n_codes != vq.codebook_size:
            problems.append(f"ar.n_codes ({ar.n_codes}) != vq.codebook_size ({vq.codebook_size})")
        if ar.image_tokens != h * w:
            problems.append(f"ar.image_tokens ({ar.image_tokens}) != vq grid {h}×{w} = {h * w}")
        if ar.vocab_size < ar.n_codes + ACTION_VOCAB:
            problems.append(f"ar.vocab_size ({ar.vocab_size}) < ar.n_codes + {ACTION_VOCAB} action ids")
        if problems:
            raise ValueError("inconsistent world-model config: " + "; ".join(problems) + ". Fix the YAML.")
        self.cfg = ar
        self.transformer = Transformer(ar)
        self.tokenizer = Tokenizer(vq, tokenizer_model).requires_grad_(False)
        self.action_offset = ar.n_codes  # action token ids start after the image codes (MineWorld: 8192)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Full causal forward, logits [B, T, V]."""
        return self.transformer(tokens)


def read_state_dict(path: str, key: str = "ar.init_from") -> dict:
    """A `.bin` is a raw state dict; anything else is a dict holding "state_dict" (Lightning style) or raw.
    `key` is the config key that named the file, for the error messages."""

    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}. Check {key}; {MINEWORLD_HINT}")
    obj = read_checkpoint(path, key)
    if not isinstance(obj, dict):
        raise UsageError(f"{path} holds a {type(obj).__name__}, not a state dict; point {key} at a checkpoint")
    if path.endswith(".bin") or "state_dict" not in obj:
        return obj
    return obj["state_dict"]


def load_weights(module: nn.Module, sd: dict, source: str) -> None:
    """Strict load (runtime.load_strict): the missing, unexpected and mis-shaped keys are named (the first 5 of
    each); dtypes are cast to the module's."""
    load_strict(module, sd, f"checkpoint {source}",
                "use the ar/vq config it was trained with (hidden, layers, heads, vocab, codebook, vq.kind, levels)")


def load_checkpoint(model: WorldModel, path: str, key: str = "ar.init_from") -> None:
    """Load a MineWorld / rlir checkpoint: keys `transformer.*` and `tokenizer.model.*`; other keys are ignored."""

    sd = read_state_dict(path, key)
    ours = {k: v for k, v in sd.items() if k.startswith(("transformer.", "tokenizer."))}
    if not ours:  # e.g. an NFD checkpoint ({"model": ...}): say so rather than list every key the model lacks
        raise ConfigError(f"{path} holds no transformer.* / tokenizer.* weights (its keys: {sorted(sd)[:5]}), "
                          f"so it is not an AR world model; point {key} at one, or use the config it was "
                          f"trained with")
    if len(ours) < len(sd):
        warnings.warn(f"{path}: ignoring {len(sd) - len(ours)} keys outside transformer.* / tokenizer.*")
    load_weights(model, ours, path)


def load_tokenizer(vq: VQConfig) -> Tokenizer:
    """The toy tokenizer alone (no world model), with the weights of vq.init_from, in eval mode."""
    tok = Tokenizer(vq)
    load_weights(tok, read_state_dict(vq.init_from, "vq.init_from"), vq.init_from)
    return tok.eval()


def build_world_model(ar: ARConfig, vq: VQConfig) -> WorldModel:
    """Model from config: MineWorld's diffusers VQ if vq.diffusers_config, else the toy VQ (vq.init_from
    weights if given); then the whole model from ar.init_from, which overrides the tokenizer if it holds one."""
    vae = load_mineworld_vae(vq.diffusers_config, vq.init_from) if vq.diffusers_config else None
    model = WorldModel(ar, vq, vae)
    if vae is None and vq.init_from != "scratch":
        sd = read_state_dict(vq.init_from, "vq.init_from")
        sd = {k.removeprefix("model."): v for k, v in sd.items()}  # our tokenizer files
        load_weights(model.tokenizer.model, sd, vq.init_from)
    if ar.init_from != "scratch":
        load_checkpoint(model, ar.init_from)
    return model


# ----------------------------------------------------------------------------------------------------------
# Sampling (docs/formats.md §1.6), rollout, log-probs, pretraining loss


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """gpt-fast / MineWorld nucleus: drop tokens whose cumulative mass *before* them (sorted descending)
    exceeds top_p, renormalise. probs [..., K] -> [..., K]."""
    if top_p >= 1.0:
        return probs
    sorted_p, order = probs.sort(dim=-1, descending=True)  # [..., K]
    drop = sorted_p.cumsum(-1) - sorted_p > top_p  # the top token is always kept
    kept = torch.zeros_like(probs).scatter(-1, order, sorted_p.masked_fill(drop, 0.0))  # [..., K], original order
    return kept / kept.sum(-1, keepdim=True)


def image_log_probs(logits: torch.Tensor, ids: torch.Tensor, n_codes: int, temperature: float) -> torch.Tensor:
    """log softmax(logits[..., :n_codes] / T) at ids: the full image-vocabulary, temperature-scaled distribution
    (no top-p), so it is defined and differentiable for every image token. logits [..., V], ids [...]."""
    logp = (logits[..., :n_codes].float() / temperature).log_softmax(-1)  # [..., K]
    return logp.gather(-1, ids.clamp(max=n_codes - 1).unsqueeze(-1)).squeeze(-1)  # [...]


def exponential_noise(shape: tuple[int, ...], generator, device) -> torch.Tensor:
    """Exp(1) draws of `shape` [B, ...]. `generator` is one torch.Generator (or None) for the whole batch, or a
    list of them, one per run of B / len(list) consecutive rows: train.py passes one per GRPO group, seeded by
    (run seed, step, global prompt index), so a group samples the same whatever the number of ranks."""
    if not isinstance(generator, (list, tuple)):
        return torch.empty(shape, device=device).exponential_(1.0, generator=generator)  # [B, ...]
    rows = shape[0] // len(generator)
    if rows * len(generator) != shape[0]:
        raise ValueError(f"{shape[0]} rows cannot be split evenly over {len(generator)} generators (one per group)")
    race = torch.empty(shape, device=device)  # [B, ...], filled group by group in place (no concatenation)
    for i, g in enumerate(generator):
        race[i * rows:(i + 1) * rows].exponential_(1.0, generator=g)
    return race


def sample_image_token(logits: torch.Tensor, n_codes: int, temperature: float, top_p: float,
                       generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one image token per row of logits [B, V] from the top-p distribution (exponential race,
    argmax p / Exp(1), as gpt-fast). `generator`: see exponential_noise. Returns ids [B] and their log-prob
    under the untruncated softmax [B]."""
    logp = (logits[:, :n_codes].float() / temperature).log_softmax(-1)  # [B, K]: actions can never be drawn
    probs = top_p_filter(logp.exp(), top_p)  # [B, K]
    race = exponential_noise(probs.shape, generator, probs.device)  # [B, K]
    ids = (probs / race).argmax(-1)  # [B]
    return ids, logp.gather(-1, ids[:, None])[:, 0]


@dataclass
class Rollout:
    """One batch of sampled clips. `logp` is taken under the temperature-scaled softmax over the full image
    vocabulary, not under the top-p-truncated one: GRPO's ratio π_θ/π_old (Eq. 2) must compare one family of
    distributions, and log_probs recomputes π_θ as a smooth function of θ for every token. The truncated
    distribution depends on θ through a discrete nucleus (no gradient) and gives log 0 = −inf to a sampled token
    that falls outside π_θ's nucleus after an update. With top_p < 1 the sampling distribution is then not π_old
    itself; the ratio treats it as on-policy, as verl and TRL do."""

    tokens: torch.Tensor  # [B, L] long: the whole clip sequence, given and generated
    logp: torch.Tensor  # [B, L] float, detached: log π_old(token | prefix) at sampling time; 0 where mask is 0
    mask: torch.Tensor  # [B, L] float: 1 on generated image tokens only (frame 0 and actions masked, §4.2)
    frames: torch.Tensor  # [B, F, H, W, 3] uint8: x0's tokenizer round trip, then the F-1 decoded generated frames
    temperature: float  # softmax temperature the log-probs are taken under (log_probs replays it)
    frame_of: torch.Tensor  # [L] long: the frame each entry belongs to (frame t's image tokens, then act(a_{t+1}))
    ref: torch.Tensor | None = None  # [B, L] float: log π_ref(token | prefix) (reference), for the KL of Eq. 2


def check_actions(cfg: ARConfig, action_tokens: torch.Tensor, batch: int) -> None:
    shape = (batch, cfg.frames, cfg.action_tokens)
    if tuple(action_tokens.shape) != shape:
        raise ValueError(f"action_tokens must be {list(shape)} (row t = tokens of a_t, row 0 unused), "
                         f"got {list(action_tokens.shape)}")
    used = action_tokens[:, 1:]
    if used.min() < cfg.n_codes or used.max() >= cfg.n_codes + ACTION_VOCAB:
        raise ValueError(f"action token ids must lie in [{cfg.n_codes}, {cfg.n_codes + ACTION_VOCAB}); build them "
                         f"with data.action_to_tokens(action, offset={cfg.n_codes})")


def build(cfg) -> WorldModel:
    """The run's world model from `cfg` (config.Config): build_world_model(cfg.ar, cfg.vq)."""
    return build_world_model(cfg.ar, cfg.vq)


def roundtrip(model: WorldModel, frames: torch.Tensor) -> torch.Tensor:
    """Frames uint8 [B, F, H, W, 3] through the VQ tokenizer (encode, decode): what a perfect world model can show."""
    return model.tokenizer.roundtrip(frames)


@torch.no_grad()
def generate(model: WorldModel, x0: torch.Tensor, action_tokens: torch.Tensor, temperature: float, top_p: float,
             generator: torch.Generator | list[torch.Generator] | None = None) -> Rollout:
    """Generate frames 1..F-1 from x0 uint8 [B, H, W, 3] and action_tokens [B, F, 11], the whole batch at once
    (G rollouts of a prompt are just G rows). Prefill img_0 + act(a_1), then decode one image token per call
    from a preallocated KV cache; after a frame's last token, that token and the next action go in together
    (MineWorld's naive_generate). Deterministic given `generator` (on the model's device; a list = one per group of
    rows, see exponential_noise)."""
    cfg, n, a = model.cfg, model.cfg.image_tokens, model.cfg.action_tokens
    if temperature <= 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature > 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    b, device = x0.shape[0], model.transformer.lm_head.weight.device
    check_actions(cfg, action_tokens, b)
    action_tokens = action_tokens.to(device)
    tokens = torch.zeros(b, cfg.seq_len, dtype=torch.long, device=device)  # [B, L]
    logp = torch.zeros(b, cfg.seq_len, device=device)  # [B, L]
    tokens[:, :n] = model.tokenizer.encode(x0.to(device))  # img_0
    tokens[:, n:cfg.frame_len] = action_tokens[:, 1]  # act(a_1)
    cache = new_cache(model.transformer, b, cfg.seq_len)
    logits = model.transformer(tokens[:, :cfg.frame_len], 0, cache)[:, -1]  # [B, V]: prefill
    pos = cfg.frame_len  # next position to fill
    for t in range(1, cfg.frames):
        for j in range(n):
            tokens[:, pos], logp[:, pos] = sample_image_token(logits, cfg.n_codes, temperature, top_p, generator)
            if t == cfg.frames - 1 and j == n - 1:
                break
            step = 1 if j < n - 1 else 1 + a  # the last token of frame t goes in with act(a_{t+1})
            if step > 1:
                tokens[:, pos + 1:pos + step] = action_tokens[:, t + 1]
            logits = model.transformer(tokens[:, pos:pos + step], pos, cache)[:, -1]  # [B, V]
            pos += step
    mask = generated_positions(cfg, device).float().expand(b, -1).clone()  # [B, L]
    return finish_rollout(model, tokens, logp, mask, temperature)


def finish_rollout(model: WorldModel, tokens: torch.Tensor, logp: torch.Tensor, mask: torch.Tensor,
                   temperature: float) -> Rollout:
    """The Rollout of a filled clip sequence tokens [B, L]: every frame's image tokens decoded, frame 0 too, so
    every frame the IDM reads shows the tokenizer's view (docs/conventions.md §8.4), and the frame of each entry."""
    cfg, n = model.cfg, model.cfg.image_tokens
    gen = generated_positions(cfg, tokens.device)  # [L]
    ids = torch.cat([tokens[:, :n], tokens[:, gen]], dim=1)  # [B, F·N]: img_0, then the generated images
    ids = rearrange(ids, "b (f n) -> b f n", n=n)  # [B, F, N]
    frames = torch.stack([model.tokenizer.decode(ids[:, t]) for t in range(cfg.frames)], dim=1)  # [B, F, H, W, 3]
    frame_of = torch.arange(cfg.seq_len, device=tokens.device) // cfg.frame_len  # [L]
    return Rollout(tokens=tokens, logp=logp, mask=mask, frames=frames, temperature=temperature, frame_of=frame_of)


def rollout(model: WorldModel, x0: torch.Tensor, action_tokens: torch.Tensor, cfg,
            generator: torch.Generator | list[torch.Generator] | None = None) -> Rollout:
    """GRPO sampling (§4.2) at the training temperature and nucleus (cfg.ar.temperature, cfg.ar.top_p): per
    image token log-probs, action tokens masked. `cfg` is the run's config.Config; see `generate`."""
    return generate(model, x0, action_tokens, cfg.ar.temperature, cfg.ar.top_p, generator)


def log_probs(model: nn.Module, rollout: Rollout, cfg=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Differentiable log π_θ(token | prefix) [B, L] from one full forward over the rollout's sequence, under
    the rollout's softmax (temperature-scaled, full image vocabulary), 0 where mask is 0; and, if rollout.ref
    holds π_ref's log-probs, the k3 estimate of KL[π_θ‖π_ref] per token (k3, Eq. 2). On the first on-policy
    pass the log-probs equal rollout.logp (KV cache vs. recompute)."""
    m = model.cfg
    end = int(rollout.mask.any(0).nonzero().max()) + 1  # causal: nothing after the last trained token matters
    gen = generated_positions(m, rollout.tokens.device)[:end]  # [end]
    logits = model(rollout.tokens[:, :end - 1])  # [B, end-1, V]: position i predicts token i+1
    lp = image_log_probs(logits[:, gen[1:]], rollout.tokens[:, :end][:, gen], m.n_codes, rollout.temperature)
    out = logits.new_zeros(rollout.tokens.shape, dtype=torch.float32)  # [B, L]
    out[:, gen.nonzero().squeeze(1)] = lp  # [B, G]
    return out, None if rollout.ref is None else k3(out, rollout.ref, rollout.mask)


def k3(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The AR world model's per-token KL[π_θ‖π_ref] for Eq. 2's β term, by the k3 estimator (Schulman 2020):
    e^δ − δ − 1 with δ = log π_ref − log π_θ per entry [N, L]; ≥ 0, 0 where mask is 0, differentiable in logp.
    (The diffusion model's KL is the closed-form Gaussian one, sde_sampler.kl_to_ref.)"""
    delta = torch.where(mask > 0, ref_logp.detach().float() - logp.float(), 0.0)  # [N, L]
    return torch.exp(delta) - delta - 1.0  # [N, L]


@torch.no_grad()
def reference(model: WorldModel, rollout: Rollout, cfg=None) -> torch.Tensor:
    """What the KL of log_probs needs from the frozen reference policy: its log-probs [B, L]."""
    return log_probs(model, dataclasses.replace(rollout, ref=None))[0]


def sample_frames(model: WorldModel, x0: torch.Tensor, action_tokens: torch.Tensor, cfg,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Evaluation sampling at cfg.ar.eval_temperature / cfg.ar.eval_top_p (MineWorld: 1.0, 0.8) ->
    frames uint8 [B, F, H, W, 3]."""
    return generate(model, x0, action_tokens, cfg.ar.eval_temperature, cfg.ar.eval_top_p, generator).frames


def lm_loss(model: nn.Module, frames: torch.Tensor, action_tokens: torch.Tensor) -> torch.Tensor:
    """Pretraining loss: mean next-token cross-entropy over the image tokens of frames 1..F-1 (the tokens the
    world model generates; frame 0 is always given), under the image-vocabulary softmax that sampling uses.
    frames uint8 [B, F, H, W, 3], action_tokens [B, F, 11]."""
    cfg, (b, f) = model.cfg, frames.shape[:2]
    check_actions(cfg, action_tokens, b)
    with torch.no_grad():
        ids = model.tokenizer.encode(frames.flatten(0, 1)).view(b, f, -1)  # [B, F, N]
    tokens = build_sequence(ids, action_tokens.to(ids.device))  # [B, L]
    gen = generated_positions(cfg, tokens.device)  # [L]
    logits = model(tokens[:, :-1])  # [B, L-1, V]
    return -image_log_probs(logits[:, gen[1:]], tokens[:, gen], cfg.n_codes, 1.0).mean()
