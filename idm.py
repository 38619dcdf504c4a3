"""The inverse dynamics model (IDM) and the inverse reward of RLIR (paper §3.1, §4.1, Eq. 3).

The IDM is VPT's `InverseActionNet` + `pi_head` (Baker et al. 2022), rebuilt as one readable module with
VPT's parameter names, so the released `4x_idm.model` / `4x_idm.weights` load into it unchanged
(`load_vpt`). The same class at small width is the embedded IDM trained on our toy world (`IDMConfig`,
`idm_loss`, `save` / `load`). Every quirk of the released forward pass is kept and marked below; the
numbers are checked against outputs of VPT's own code (tests/test_idm.py; the facts: docs/formats.md §2).

Clip convention (docs/conventions.md §1.1): frames x0..x15 and actions a1..a15, a_t turns x_{t-1} into x_t. The IDM
sees all 16 frames at once and its prediction for frame t is compared with a_t, for t = 1..15.
"""
import copy
import os
import pickle
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

import data
from runtime import POSITIVE, SIZES, ConfigError, UsageError, at_least, check_fields, load_strict, read_checkpoint

# VPT's `Buttons.ALL`: the order of the 20 binary button heads (docs/formats.md §2.4).
BUTTONS = ("attack", "back", "forward", "jump", "left", "right", "sneak", "sprint", "use", "drop",
           "inventory", *(f"hotbar.{i}" for i in range(1, 10)))
N_CAMERA_BINS = 11  # VPT mu-law camera bins per axis (max 10 deg, binsize 2, mu 10); bin 5 = no move
CNN_OUTSIZE = 256  # ImpalaCNN dense width, hard-coded in VPT's MinecraftPolicy
N_BASIS = 10  # rows of the relative-attention table b_nd, hard-coded in VPT's SelfAttentionLayer


@dataclass
class IDMConfig:
    img_size: tuple[int, int] = (64, 64)  # (H, W) pixels the frames are squashed to; the toy world is 64x64
    conv3d_outchan: int = 8  # channels of the temporal conv3d (VPT 4x IDM: 128)
    conv3d_kernel_t: int = 5  # temporal kernel of the conv3d in frames, odd; zero padding kernel_t // 2
    impala_chans: tuple[int, int, int] = (8, 16, 32)  # ImpalaCNN stage channels (VPT default: 16, 32, 32);
    # narrow first stages keep the 64x64 stage cheap enough to train on 2 CPU cores
    impala_width: int = 1  # multiplier on impala_chans (VPT 4x IDM: 16)
    hidsize: int = 128  # transformer width (VPT 4x IDM: 4096)
    attention_heads: int = 4  # attention heads; must divide hidsize (VPT 4x IDM: 32)
    n_blocks: int = 2  # residual transformer blocks (VPT 4x IDM: 2)
    pointwise_ratio: int = 4  # MLP hidden width = pointwise_ratio * hidsize
    timesteps: int = 16  # frames per IDM call during training; also the (empty) attention memory size
    temperature: float = 1.0  # logits are divided by this before log_softmax (VPT: 4.0; 1.0 trains
    # far faster: at 4.0 a small IDM needs 4x larger logits and sat at the label priors for 200 steps)

    def __post_init__(self):
        check_fields(self, {
            "img_size": SIZES, "conv3d_outchan": at_least(1),
            "conv3d_kernel_t": ((lambda k: k >= 1 and k % 2 == 1), "odd and >= 1 (the conv is centred on frame t)"),
            "impala_chans": SIZES, "impala_width": at_least(1), "hidsize": at_least(1),
            "attention_heads": at_least(1), "n_blocks": at_least(1), "pointwise_ratio": at_least(1),
            "timesteps": at_least(1), "temperature": POSITIVE})
        if self.hidsize % self.attention_heads:
            raise ConfigError(f"attention_heads={self.attention_heads}: must divide hidsize={self.hidsize}")


def vpt_kwargs(cfg: IDMConfig) -> tuple[dict, float]:
    """Turn an IDMConfig into VPT's `net.args` dict and the pi-head temperature, so the embedded IDM and
    the released one take the same code path."""
    h, w = cfg.img_size
    k = cfg.conv3d_kernel_t  # odd (IDMConfig): the conv is centred on frame t
    net_args = {
        "attention_heads": cfg.attention_heads,
        "attention_mask_style": "none",
        "attention_memory_size": cfg.timesteps,  # memory - timesteps = 0: no K/V carried between calls
        "conv3d_params": {"inchan": 3, "outchan": cfg.conv3d_outchan, "kernel_size": [k, 1, 1],
                          "padding": [k // 2, 0, 0]},
        "hidsize": cfg.hidsize,
        "img_shape": [h, w, cfg.conv3d_outchan],
        "impala_kwargs": {"post_pool_groups": 1},
        "impala_chans": list(cfg.impala_chans),
        "impala_width": cfg.impala_width,
        "init_norm_kwargs": {"batch_norm": False, "group_norm_groups": 1},
        "n_recurrence_layers": cfg.n_blocks,
        "only_img_input": True,
        "pointwise_ratio": cfg.pointwise_ratio,
        "pointwise_use_activation": False,
        "recurrence_is_residual": True,
        "recurrence_type": "transformer",
        "single_output": True,
        "timesteps": cfg.timesteps,
        "use_pointwise_layer": True,
        "use_pre_lstm_ln": False,
    }
    return net_args, float(cfg.temperature)


# ----------------------------------------------------------------------------------------------------
# Reading VPT's `.model` file: a pickle that must hold only plain containers (docs/conventions.md §6).

class _PlainUnpickler(pickle.Unpickler):
    """Unpickler that refuses every global lookup. Without `find_class` no callable can reach the stack,
    so REDUCE / BUILD / NEWOBJ / INST / OBJ / EXT* have nothing to call: only dict, list, tuple, set,
    str, bytes, numbers, bools and None can come out."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(
            f"refusing to load global '{module}.{name}' from a .model file: only plain containers "
            "(dict, list, tuple, set, str, numbers, bool, None) are allowed. The file is not a VPT "
            "IDM .model file or has been tampered with; get 4x_idm.model from OpenAI's VPT release.")

    def persistent_load(self, pid):
        raise pickle.UnpicklingError(f"refusing persistent id {pid!r} in a .model file (plain containers only)")


def read_model_file(path: str) -> tuple[dict, float]:
    """Read a VPT `.model` pickle -> (net kwargs, temperature). The loader reads only
    ["model"]["args"]["net"]["args"] and ["model"]["args"]["pi_head_opts"]["temperature"] (docs/formats.md §2.1)."""

    try:
        with open(path, "rb") as f:
            spec = _PlainUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, ValueError) as e:  # a refused global, or a damaged pickle
        raise UsageError(f"{path}: cannot read the VPT .model file ({type(e).__name__}: {e})") from None
    try:
        args = spec["model"]["args"]
        net_args, temperature = args["net"]["args"], args["pi_head_opts"]["temperature"]
    except (KeyError, TypeError) as e:
        raise ConfigError(f"{path} is not a VPT IDM .model file: missing {e} under "
                          "['model']['args']['net']['args'] / ['pi_head_opts']['temperature']") from None
    return net_args, float(temperature)  # stored as the int 4; VPT casts it to 4.0


# The net args this module implements (the released IDM's values); anything else is refused by name.
_REQUIRED = {"recurrence_type": "transformer", "attention_mask_style": "none", "use_pointwise_layer": True,
             "use_pre_lstm_ln": False, "only_img_input": True}
_KNOWN = {"attention_heads", "attention_memory_size", "conv3d_params", "hidsize", "img_shape", "impala_kwargs",
          "impala_width", "impala_chans", "init_norm_kwargs", "n_recurrence_layers", "pointwise_ratio",
          "pointwise_use_activation", "recurrence_is_residual", "single_output", "timesteps", *_REQUIRED}


def _check_net_args(a: dict) -> None:
    """Fail fast, naming the key, on net args this module does not implement (VPT's code has other branches:
    LSTMs, masks, memory, batch norm; the released IDM uses none of them)."""
    # impala_chans has a VPT default; recurrence_is_residual only matters for LSTMs and single_output only
    # for a value head, which the IDM does not have: all three may be absent.
    need = _KNOWN - {"impala_chans", "recurrence_is_residual", "single_output"}
    missing = sorted(need - a.keys())
    if missing:
        raise ValueError(f"IDM net args lack {missing}; expected every key of VPT's 4x_idm.model net args")
    unknown = sorted(a.keys() - _KNOWN)
    if unknown:  # VPT's constructor swallows unknown kwargs (**unused_kwargs); we do too, but say so
        warnings.warn(f"IDM net args: ignoring keys VPT's InverseActionNet would also ignore: {unknown}")
    for key, want in _REQUIRED.items():
        if a[key] != want:
            raise ValueError(f"IDM net args: {key}={a[key]!r} is not supported (only {want!r}, as in VPT's IDM)")
    if a["attention_memory_size"] != a["timesteps"]:
        raise ValueError(f"IDM net args: attention_memory_size ({a['attention_memory_size']}) != timesteps "
                         f"({a['timesteps']}); only the released IDM's empty memory is implemented")
    norm = a["init_norm_kwargs"]
    if norm.get("batch_norm", False) or not isinstance(norm.get("group_norm_groups"), int):
        raise ValueError(f"IDM net args: init_norm_kwargs={norm!r}; only batch_norm=False with an int "
                         "group_norm_groups (GroupNorm before every conv) is implemented")
    if set(a["impala_kwargs"]) - {"post_pool_groups"}:
        raise ValueError(f"IDM net args: impala_kwargs={a['impala_kwargs']!r}; only post_pool_groups is implemented")
    if a["conv3d_params"]["outchan"] != a["img_shape"][2]:
        raise ValueError(f"IDM net args: img_shape[2]={a['img_shape'][2]} must equal conv3d outchan "
                         f"{a['conv3d_params']['outchan']} (ImpalaCNN reads the conv3d output)")
    if a["hidsize"] % a["attention_heads"]:
        raise ValueError(f"IDM net args: hidsize {a['hidsize']} is not divisible by attention_heads "
                         f"{a['attention_heads']}")


# ----------------------------------------------------------------------------------------------------
# Layers. Module nesting mirrors VPT's so that state-dict keys match `4x_idm.weights` (docs/formats.md §2.3).

class FanInLayer(nn.Module):
    """VPT's FanInInitReLULayer: norm -> conv/linear -> ReLU. The norm comes *before* the layer, and the
    layer has a bias only when there is no norm (docs/formats.md §2.2, step 4)."""

    def __init__(self, layer: nn.Module, norm: nn.Module | None = None, relu: bool = True):
        super().__init__()
        self.norm, self.layer, self.relu = norm, layer, relu

    def forward(self, x):
        if self.norm is not None:
            x = self.norm(x)
        x = self.layer(x)
        return F.relu(x) if self.relu else x


def _conv(cin: int, cout: int, groups: int) -> FanInLayer:  # GroupNorm -> conv3x3 (no bias) -> ReLU
    return FanInLayer(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.GroupNorm(groups, cin))


def _dense(din: int, dout: int, relu: bool = True) -> FanInLayer:  # LayerNorm -> Linear (no bias) -> ReLU
    return FanInLayer(nn.Linear(din, dout, bias=False), nn.LayerNorm(din), relu)


class CnnDownStack(nn.Module):
    """One ImpalaCNN stage (docs/formats.md §2.2, step 4): firstconv, maxpool 3/2 pad 1, GroupNorm `n`,
    2 residual blocks."""

    def __init__(self, cin: int, cout: int, groups: int, post_pool_groups: int | None):
        super().__init__()
        self.firstconv = _conv(cin, cout, groups)
        self.n = nn.GroupNorm(post_pool_groups, cout) if post_pool_groups else None
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"conv0": _conv(cout, cout, groups), "conv1": _conv(cout, cout, groups)}) for _ in range(2))

    def forward(self, x):  # [N, Cin, H, W]
        x = self.firstconv(x)  # [N, C, H, W]
        x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)  # [N, C, ceil(H/2), ceil(W/2)]
        if self.n is not None:
            x = self.n(x)  # post_pool_groups: GroupNorm after the pool
        for block in self.blocks:
            x = x + block["conv1"](block["conv0"](x))  # residual around two norm->conv->relu
        return x


class ImpalaCNN(nn.Module):
    """3 down-stacks, flatten in (C, H, W) order, LayerNorm -> Linear(no bias) -> ReLU to 256
    (docs/formats.md §2.2, step 4)."""

    def __init__(self, img_shape: list, chans: tuple, groups: int, post_pool_groups: int | None):
        super().__init__()
        h, w, c = img_shape
        stacks = []
        for cout in chans:
            stacks.append(CnnDownStack(c, cout, groups, post_pool_groups))
            c, h, w = cout, (h + 1) // 2, (w + 1) // 2  # maxpool(3, 2, pad 1) halves, rounding up
        self.stacks = nn.ModuleList(stacks)
        self.dense = _dense(c * h * w, CNN_OUTSIZE)

    def forward(self, x):  # [N, C, H, W]
        for stack in self.stacks:
            x = stack(x)  # [N, C', H', W']
        return self.dense(x.flatten(1))  # [N, 256]


class SelfAttention(nn.Module):
    """VPT's `SelfAttentionLayer` (xf.py) as run by the IDM: no mask, empty memory, muP scale 1/head_dim,
    and the residual added to its *input*, which is already pre_r_ln(x) (docs/formats.md §2.2, step 6)."""

    def __init__(self, hidsize: int, heads: int, maxlen: int):
        super().__init__()
        self.heads = heads
        self.q_layer = nn.Linear(hidsize, hidsize)  # q has a bias, k and v do not
        self.k_layer = nn.Linear(hidsize, hidsize, bias=False)
        self.v_layer = nn.Linear(hidsize, hidsize, bias=False)
        self.proj_layer = nn.Linear(hidsize, hidsize)
        # Relative-position attention: r_layer maps x to N_BASIS coefficients per head and b_nd holds one
        # column per remembered past key. maxlen = attention_memory_size - timesteps = 0, so b_nd is [10, 0],
        # there are no remembered keys to score, and the term is identically zero. Both are kept only so the
        # state-dict keys match; forward() skips them because they cannot change the output.
        self.r_layer = nn.Linear(hidsize, N_BASIS * heads)
        self.b_nd = nn.Parameter(torch.zeros(N_BASIS, maxlen))  # [10, 0]

    def forward(self, x):  # [B, T, D], already LayerNormed
        hd = x.shape[-1] // self.heads
        q = rearrange(self.q_layer(x), "b t (h d) -> b t h d", h=self.heads)  # [B, T, H, hd]
        k = rearrange(self.k_layer(x), "b t (h d) -> b t h d", h=self.heads)  # [B, T, H, hd]
        v = rearrange(self.v_layer(x), "b t (h d) -> b t h d", h=self.heads)  # [B, T, H, hd]
        logits = torch.einsum("bthd,bshd->bhts", q.float(), k.float()) / hd  # [B, H, T, T]; muP: 1/hd, not 1/sqrt
        w = logits.softmax(dim=-1).to(v.dtype)  # [B, H, T, T]; no mask: every frame sees the whole call
        a = rearrange(torch.einsum("bhts,bshd->bthd", w, v), "b t h d -> b t (h d)")  # [B, T, D]
        return x + self.proj_layer(a)  # [B, T, D]; residual from the normalised input


class ResidualBlock(nn.Module):
    """VPT's ResidualRecurrentBlock, transformer type: xl = pre_r_ln(x); y = xl + attn(xl);
    out = y + mlp1(mlp0(y)). The raw x is not added back (only the LSTM branch of VPT does that)."""

    def __init__(self, hidsize: int, heads: int, maxlen: int, ratio: int, mlp_relu: bool):
        super().__init__()
        self.pre_r_ln = nn.LayerNorm(hidsize)
        self.r = nn.ModuleDict({"orc_block": SelfAttention(hidsize, heads, maxlen)})  # VPT's MaskedAttention shell
        self.mlp0 = _dense(hidsize, hidsize * ratio)  # LayerNorm -> Linear(no bias) -> ReLU
        self.mlp1 = FanInLayer(nn.Linear(hidsize * ratio, hidsize), relu=mlp_relu)  # Linear with bias

    def forward(self, x):  # [B, T, D]
        x = self.r["orc_block"](self.pre_r_ln(x))  # [B, T, D]
        return x + self.mlp1(self.mlp0(x))  # [B, T, D]


class InverseActionNet(nn.Module):
    """VPT's `InverseActionNet` parameters (the `net.*` keys); the forward pass is written out in IDM.forward."""

    def __init__(self, a: dict):
        super().__init__()
        c3 = a["conv3d_params"]
        # The conv3d is the first layer, so VPT gives it no input norm (and therefore a bias).
        self.conv3d_layer = FanInLayer(nn.Conv3d(c3["inchan"], c3["outchan"], tuple(c3["kernel_size"]),
                                                 padding=tuple(c3["padding"])))
        chans = tuple(int(a["impala_width"] * c) for c in a.get("impala_chans", (16, 32, 32)))
        groups = a["init_norm_kwargs"]["group_norm_groups"]
        hid = a["hidsize"]
        self.img_process = nn.ModuleDict({
            "cnn": ImpalaCNN(a["img_shape"], chans, groups, a["impala_kwargs"].get("post_pool_groups")),
            "linear": _dense(CNN_OUTSIZE, hid),  # LayerNorm(256) -> Linear(256 -> hid, no bias) -> ReLU
        })
        maxlen = a["attention_memory_size"] - a["timesteps"]  # = 0 (checked)
        blocks = [ResidualBlock(hid, a["attention_heads"], maxlen, a["pointwise_ratio"],
                                a["pointwise_use_activation"]) for _ in range(a["n_recurrence_layers"])]
        self.recurrent_layer = nn.ModuleDict({"blocks": nn.ModuleList(blocks)})
        self.lastlayer = _dense(hid, hid)  # computed by VPT and then discarded: never used here
        self.final_ln = nn.LayerNorm(hid)


# ----------------------------------------------------------------------------------------------------
# The IDM.

def to_net_input(frames, size: tuple[int, int]) -> torch.Tensor:
    """uint8 RGB [B, T, H, W, 3] (numpy or torch) -> uint8 torch [B, T, h, w, 3], squashed to size = (h, w)
    with `data.resize_frames` (cv2 INTER_LINEAR-like, aspect not kept; docs/formats.md §2.2, step 1).
    Same size: unchanged."""
    if isinstance(frames, np.ndarray):
        frames = torch.from_numpy(frames)
    if frames.dtype != torch.uint8 or frames.ndim != 5 or frames.shape[-1] != 3:
        raise ValueError(f"IDM input must be uint8 RGB frames [B, T, H, W, 3]; got {frames.dtype} "
                         f"{tuple(frames.shape)}. Convert with (x * 255).round().clamp(0, 255).to(torch.uint8).")
    B, _, H, W, _ = frames.shape
    h, w = size
    if (H, W) == (h, w):  # cv2.resize to the same size is an exact identity (docs/formats.md §2.2, step 1)
        return frames
    # The resizer is numpy; frames coming from a GPU rollout make one round trip through host memory.
    small = data.resize_frames(rearrange(frames, "b t h w c -> (b t) h w c").cpu().numpy(), h, w)  # [B*T, h, w, 3]
    return rearrange(torch.from_numpy(np.ascontiguousarray(small)), "(b t) h w c -> b t h w c", b=B).to(frames.device)


class IDM(nn.Module):
    """VPT's InverseActionPolicy: `net` (InverseActionNet) + `pi_head` (20 binary button heads, 2 camera
    heads of 11 bins). Built from VPT's net-args dict; `kwargs` and `temperature` are kept for `save`."""

    def __init__(self, kwargs: dict, temperature: float):
        super().__init__()
        _check_net_args(kwargs)
        self.kwargs, self.temperature = copy.deepcopy(kwargs), float(temperature)  # plain types, for save()
        self.img_size = (kwargs["img_shape"][0], kwargs["img_shape"][1])  # (H, W) the net expects
        self.net = InverseActionNet(kwargs)
        hid = kwargs["hidsize"]
        self.pi_head = nn.ModuleDict({
            "buttons": nn.ModuleDict({"linear_layer": nn.Linear(hid, len(BUTTONS) * 2)}),
            "camera": nn.ModuleDict({"linear_layer": nn.Linear(hid, 2 * N_CAMERA_BINS)}),
        })

    @classmethod
    def from_config(cls, cfg: IDMConfig) -> "IDM":
        return cls(*vpt_kwargs(cfg))

    def forward(self, frames, intermediates: bool = False) -> dict:
        """uint8 RGB frames [B, T, H, W, 3] -> {"buttons": [B, T, 20, 2], "camera": [B, T, 2, 11] tempered
        log-probs, "latent": [B, T, hidsize]}; with intermediates=True also every stage's output."""
        net = self.net
        x = to_net_input(frames, self.img_size).to(self.pi_head["buttons"]["linear_layer"].weight.device)
        out = {}
        # 1-2. ImgPreprocessing: float, /255, no mean/std.
        x = x.float() / 255.0  # [B, T, H, W, 3]
        B, T = x.shape[:2]
        # 3. Temporal conv3d (5, 1, 1), zero-padded at the clip ends, + ReLU: frame t sees t-2..t+2.
        x = net.conv3d_layer(rearrange(x, "b t h w c -> b c t h w"))  # [B, C, T, H, W]
        x = rearrange(x, "b c t h w -> b t h w c")  # [B, T, H, W, C]
        out["conv3d"] = x
        # 4. ImpalaCNN per frame.
        # One NHWC copy viewed as NCHW (channels-last memory): conv kernels choose their path by memory layout,
        # and another layout need not round the same as the outputs recorded so far.
        x = rearrange(x, "b t h w c -> (b t) h w c").permute(0, 3, 1, 2)  # [B*T, C, H, W], NHWC in memory
        x = net.img_process["cnn"](x)  # [B*T, 256]
        out["impala"] = rearrange(x, "(b t) d -> b t d", b=B)  # [B, T, 256]
        # 5. ImgObsProcess.linear.
        x = rearrange(net.img_process["linear"](x), "(b t) d -> b t d", b=B)  # [B, T, D]
        out["img_process"] = x
        # 6. Residual transformer blocks, bidirectional over the T frames of this call, no memory.
        for i, block in enumerate(net.recurrent_layer["blocks"]):
            x = block(x)  # [B, T, D]
            out[f"block{i}"] = x
        # 7. ReLU then final_ln. VPT also runs `lastlayer(x)` here and overwrites the result: skipped.
        latent = net.final_ln(F.relu(x))  # [B, T, D]
        # 8. pi head: Linear -> reshape -> / temperature -> log_softmax in fp32.
        b_logits = self.pi_head["buttons"]["linear_layer"](latent).view(B, T, len(BUTTONS), 2)  # [B, T, 20, 2]
        c_logits = self.pi_head["camera"]["linear_layer"](latent).view(B, T, 2, N_CAMERA_BINS)  # [B, T, 2, 11]
        result = {
            "buttons": F.log_softmax(b_logits.float() / self.temperature, dim=-1),  # [B, T, 20, 2]
            "camera": F.log_softmax(c_logits.float() / self.temperature, dim=-1),  # [B, T, 2, 11]
            "latent": latent,  # [B, T, D]; pi-head input, also used as a video feature
        }
        if intermediates:
            result.update(out, buttons_logits=b_logits, camera_logits=c_logits)
        return result


def decode(out: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic decoding (VPT `deterministic=True`) of a forward's output: argmax of each head.
    Returns buttons int64 [B, T, 20] (order BUTTONS) and camera bins int64 [B, T, 2] ([pitch, yaw], 0..10)."""
    return out["buttons"].argmax(-1), out["camera"].argmax(-1)


@torch.no_grad()
def predict(idm: IDM, frames) -> tuple[torch.Tensor, torch.Tensor]:
    """`decode` of the IDM's forward on frames."""
    return decode(idm(frames))


def predict_groups(idm: IDM, frames) -> torch.Tensor:
    """The 9 evaluation groups of the IDM's deterministic reading (`predict`, `data.action_groups`): int64 [B, T, 9],
    what Eq. 3 compares with the given actions' groups."""
    return data.action_groups(*predict(idm, frames))


def true_label_probs(out: dict, true_groups: torch.Tensor) -> torch.Tensor:
    """The IDM's probability of each given group label (its forward's log-probs `out`, true groups [B, T, 9]) ->
    float [B, T, 9]: what a match of its argmax (`predict_groups`) becomes when the reading is kept soft. The
    buttons are independent Bernoullis, so a pair (first, second) reads label 0 (neither or both) with
    (1 − p1)(1 − p2) + p1 p2, label 1 with p1 (1 − p2), label 2 with p2 (1 − p1); a binary group with p or 1 − p;
    a camera axis with its bin's softmax probability."""
    col = {name: i for i, name in enumerate(data.VPT_BUTTONS)}
    pressed = out["buttons"][..., 1].exp()  # [B, T, 20]  P(button pressed)
    probs = []
    for first, second in data.GROUP_PAIRS:
        a, b = pressed[..., col[first]], pressed[..., col[second]]  # [B, T]
        probs.append(torch.stack([(1 - a) * (1 - b) + a * b, a * (1 - b), b * (1 - a)], -1))  # [B, T, 3]
    probs += [torch.stack([1 - pressed[..., col[n]], pressed[..., col[n]]], -1) for n in data.GROUP_BINARY]
    labels = true_groups.to(pressed.device)
    per_group = [p.gather(-1, labels[..., g:g + 1])[..., 0] for g, p in enumerate(probs)]  # 7 x [B, T]
    camera = out["camera"].exp().gather(-1, labels[..., 7:, None])[..., 0]  # [B, T, 2]
    return torch.cat([torch.stack(per_group, -1), camera], -1)  # [B, T, 9]


def idm_loss(out: dict, buttons: torch.Tensor, camera_bins: torch.Tensor, mask: torch.Tensor | None = None):
    """Negative log-likelihood of the labelled action (§3.1): per frame, the sum over the 20 button heads
    and the 2 camera heads of -log p (the tempered log-probs, as VPT's policy log_prob sums its 22
    sub-actions), then the mean over frames (over frames with mask = 1 if mask [B, T] is given)."""
    if buttons.shape != out["buttons"].shape[:-1] or camera_bins.shape != out["camera"].shape[:-1]:
        raise ValueError(f"idm_loss: labels buttons {tuple(buttons.shape)} / camera_bins {tuple(camera_bins.shape)}"
                         f" do not match the IDM output [B, T, 20] / [B, T, 2]")
    nll = -out["buttons"].gather(-1, buttons.long().unsqueeze(-1)).squeeze(-1).sum(-1)  # [B, T]
    nll = nll - out["camera"].gather(-1, camera_bins.long().unsqueeze(-1)).squeeze(-1).sum(-1)  # [B, T]
    if mask is None:
        return nll.mean()
    m = mask.to(nll.dtype)  # [B, T]
    return (nll * m).sum() / m.sum().clamp_min(1.0)


# ----------------------------------------------------------------------------------------------------
# The inverse reward (Eq. 3).

def frame_scores(match: torch.Tensor, true_groups: torch.Tensor, granularity: str = "exact",
                 label_weights: torch.Tensor | None = None) -> torch.Tensor:
    """The terms of Eq. 3's sum, one per generated frame: match [B, T-1, 9] says for frames 1..T-1 how each of
    the 9 evaluation groups (`data.action_groups`: fwd/back, left/right, sprint/sneak, use, attack, jump, drop,
    pitch bin, yaw bin) was read: 1/0 for a match of the IDM's argmax, or the IDM's probability of the given
    label (a soft reading, true_label_probs). granularity "exact": all 9 groups at once, 1[â_t == a_t] (the
    paper; the product of the 9 probabilities when soft); "group": the mean over the 9 (denser); "balanced": the
    7 judged groups, each weighted by label_weights[group, true label] ([7, 11], data.label_weights: the
    inverse frequency of that label), a per-frame surrogate of the macro F1 the evaluation reports.
    true_groups [B, T, 9] are the given actions' groups over frames 0..T-1. -> float [B, T-1]."""
    if match.ndim != 3 or match.shape[-1] != 9 or true_groups.shape[1] != match.shape[1] + 1:
        raise ValueError(f"frame_scores: need match [B, T-1, 9] and true groups [B, T, 9]; got "
                         f"{tuple(match.shape)} and {tuple(true_groups.shape)}")
    match = match.float()                                      # [B, T-1, 9]
    if granularity == "exact":
        return match.prod(dim=-1)                              # [B, T-1]
    if granularity == "group":
        return match.mean(dim=-1)                              # [B, T-1]
    if granularity != "balanced":
        raise ValueError(f"frame_scores: granularity must be 'exact' (Eq. 3), 'group' or 'balanced'; "
                         f"got {granularity!r}")
    if label_weights is None:
        raise ValueError("frame_scores: granularity 'balanced' needs label_weights (data.label_weights)")
    true = true_groups[:, 1:, :7].to(match.device)             # [B, T-1, 7]
    w = label_weights.to(match.device)[torch.arange(7, device=match.device), true]   # [B, T-1, 7]
    return (match[..., :7] * w).sum(-1) / w.sum(-1)            # [B, T-1]


# On a CPU the reward IDMs read this many clips at a time: their activations (64 frames) then stay in the
# cache, and a step's 32 clips are read ~1.6x faster than in one batch (docs/2026-12-04-rollout-speed.md).
CPU_CLIPS = 4


@torch.no_grad()
def inverse_reward(idms: list, frames: torch.Tensor, true_groups: torch.Tensor, granularity: str = "exact",
                   reading: str = "argmax", label_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 3, the inverse reward: R = 1/n sum_{t=1..n} 1[â_t == a_t], returned as its per-frame terms [B, T-1]
    (their mean over frames is R; train.py's rl.credit "frame" uses them one by one). Each reward IDM reads the
    actions back from all T frames of frames uint8 [B, T, H, W, 3] (the context frame included, §5.1: inference
    length 16); its frame-t reading is compared with a_t, the action that produced frame t, as MineWorld's
    evaluation pairs them. reading "argmax" counts a group when the IDM's deterministic reading matches (the
    paper); "soft" scores the IDM's probability of the given label, which moves with the reading's confidence.
    Several IDMs (an ensemble) average their terms. See frame_scores for granularity and label_weights."""
    if reading not in ("argmax", "soft"):
        raise ValueError(f"inverse_reward: reading must be 'argmax' or 'soft', got {reading!r}")
    if frames.device.type == "cpu" and len(frames) > CPU_CLIPS:  # rows are scored independently
        return torch.cat([inverse_reward(idms, frames[i:i + CPU_CLIPS], true_groups[i:i + CPU_CLIPS], granularity,
                                         reading, label_weights) for i in range(0, len(frames), CPU_CLIPS)])
    terms = []
    for net in idms:
        out, true = net(frames), true_groups.to(frames.device)    # true [B, T, 9]
        if reading == "soft":
            match = true_label_probs(out, true)[:, 1:]           # [B, T-1, 9]  P(given label)
        else:
            match = data.action_groups(*decode(out))[:, 1:] == true[:, 1:]   # [B, T-1, 9]  argmax matches
        terms.append(frame_scores(match, true, granularity, label_weights))  # [B, T-1]
    return torch.stack(terms).mean(0)                          # [B, T-1]


# ----------------------------------------------------------------------------------------------------
# Loading and saving.

def _load_weights(idm: IDM, state_dict: dict, source: str) -> IDM:
    """Load a state dict into an IDM built on the meta device, strictly (runtime.load_strict): missing or
    mis-shaped keys raise, listing them. Extra keys are ignored with a warning (VPT itself loads with
    strict=False)."""

    want = idm.state_dict()  # meta tensors: names and shapes only
    # VPT copies into an fp32 model; a non-tensor is left for load_strict to name as mis-shaped.
    weights = {k: v.to(torch.float32) if torch.is_tensor(v) else v for k, v in state_dict.items() if k in want}
    load_strict(idm, weights, source, "check that the .model / kwargs file and the weights file belong together",
                assign=True)  # assign: the meta-device model takes the loaded tensors
    extra = sorted(state_dict.keys() - want.keys())
    if extra:
        warnings.warn(f"{source}: ignoring {len(extra)} keys the IDM does not have: {extra}")
    return idm.eval()


def _require_file(path: str, what: str) -> None:
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{what} not found at {os.path.abspath(path)}. Download 4x_idm.model and 4x_idm.weights from "
            "OpenAI's VPT release (github.com/openai/Video-Pre-Training, 'Inverse Dynamics Model' section) "
            "and pass their paths as rl.vpt_idm=MODEL,WEIGHTS.")


def load_vpt(model_path: str, weights_path: str) -> IDM:
    """Released VPT IDM: `4x_idm.model` (architecture) + `4x_idm.weights` (state dict, 100 keys) -> IDM in
    eval mode, fp32, on CPU. Built on the meta device so the 482M parameters are allocated once."""
    _require_file(model_path, "VPT IDM .model file")
    _require_file(weights_path, "VPT IDM .weights file")
    kwargs, temperature = read_model_file(model_path)
    with torch.device("meta"):
        idm = IDM(kwargs, temperature)

    state_dict = read_checkpoint(weights_path, "rl.vpt_idm")
    return _load_weights(idm, state_dict, weights_path)


def save(idm: IDM, path: str) -> None:
    """Write a small IDM as a plain dict {"kwargs", "temperature", "state_dict"} (atomic: temp file + rename)."""
    ckpt = {"kwargs": idm.kwargs, "temperature": idm.temperature,
            "state_dict": {k: v.detach().cpu() for k, v in idm.state_dict().items()}}
    tmp = f"{path}.tmp"
    torch.save(ckpt, tmp)
    os.replace(tmp, path)


def load(path: str, key: str = "rl.reward_idm") -> IDM:
    """Read an IDM written by `save` (torch.load with weights_only=True) -> IDM in eval mode on CPU. `key` is the
    config key that named the file, for the error messages."""

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{key}: IDM checkpoint not found at {os.path.abspath(path)}; train one with "
                                "pretrain.py or use the shipped assets/minicraft IDMs.")
    ckpt = read_checkpoint(path, key)  # plain dict: no code runs on load
    if not isinstance(ckpt, dict) or not {"kwargs", "temperature", "state_dict"} <= ckpt.keys():
        raise UsageError(f"{path} is not an IDM checkpoint (a dict of kwargs, temperature, state_dict written "
                         f"by idm.save); point {key} at one, e.g. assets/minicraft/idm_reward.pt")
    with torch.device("meta"):
        idm = IDM(ckpt["kwargs"], ckpt["temperature"])
    return _load_weights(idm, ckpt["state_dict"], path)


def load_reward_idms(reward_idm: str, vpt_idm: str = "") -> list[IDM]:
    """The IDMs that give the inverse reward (train.py's rl.reward_idm, rl.vpt_idm): OpenAI's ("MODEL,WEIGHTS",
    load_vpt), else the idm.save files of `reward_idm`, comma-separated for an ensemble whose Eq. 3 terms are
    averaged (inverse_reward)."""
    if vpt_idm:
        model_path, _, weights_path = vpt_idm.partition(",")
        return [load_vpt(model_path, weights_path)]
    return [load(path, "rl.reward_idm") for path in reward_idm.split(",")]
