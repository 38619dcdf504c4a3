"""The evaluation protocol of the paper (§5.1, Appendix A.1): one context frame x0 and 15 actions go in,
a 16-frame video comes out, and the video is scored for action following and visual quality.

Action following is MineWorld's metric code (docs/formats.md §1.8):
an IDM reads the video, its frame-t prediction is compared with a_t for t = 1..15, labels are pooled over
all frames of all clips per task, sklearn-style precision / recall / F1 (macro and micro) are computed per
task and averaged over the 7 discrete tasks of Table 3; the camera is compared in VPT's 11 bins. It is
reported twice: with the reward IDM (what RL optimised) and with a held-out judge IDM (`judge_` keys), so
reward hacking shows as a gap. Visual quality: PSNR, SSIM, LPIPS and FVD of frames 1..15 against the
ground truth, and the mean brightness (§6.1: pixel rewards darken frames). The GT row scores the ground
truth clips themselves: the IDM's upper bound (paper Table 1). The recon row scores their tokenizer round
trips (what a perfect world model reaches), the best_of row the reward IDM's pick of N samples per prompt.

    python evaluate.py --data minicraft --out runs/eval                       # the GT row
    python evaluate.py --data DIR --out OUT --generated GEN_A --generated GEN_B  # + a row per folder

OUT gets eval_config.yaml (the resolved config), eval_metrics.json (the rows) and eval_side_by_side.mp4; none of
them is a file train.py writes, so OUT may be a training run's folder.
"""
import dataclasses
import json
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from scipy import linalg
from tqdm import tqdm

import config
import data
import idm as idm_lib
import runtime
from data import DataConfig
from pixel_reward import load_lpips, lpips_distance  # LPIPS, shared with the pixel reward (Eq. 6)
from runtime import ConfigError, UsageError

# ----------------------------------------------------------------------------------------------
# Action following (paper App. A.1 Table 3; MineWorld metrics/IDM, docs/formats.md §1.8)

def classification_scores(y_true: np.ndarray, y_pred: np.ndarray) -> dict:
    """sklearn's precision_recall_fscore_support(average="macro" / "micro", zero_division=0) in numpy.

    Labels are those present in y_true or y_pred (sklearn's default). Per label c: tp = #(pred c, true c),
    fp = #(pred c, true not c), fn = #(true c, pred not c); P = tp / (tp + fp), R = tp / (tp + fn),
    F1 = 2 tp / (2 tp + fp + fn), each 0 when its denominator is 0. Macro: the unweighted mean over
    labels. Micro: the same formulas on tp, fp, fn summed over labels (for single-label data every
    micro score equals the accuracy).
    """
    y_true, y_pred = np.asarray(y_true).ravel(), np.asarray(y_pred).ravel()  # [N] each
    if y_true.shape != y_pred.shape or y_true.size == 0:
        raise ValueError(f"classification_scores: need equally long, non-empty label arrays; got "
                         f"{y_true.shape} and {y_pred.shape}")
    labels = np.union1d(y_true, y_pred)  # [L], sorted
    t = y_true[:, None] == labels[None, :]  # [N, L] one-hot truth
    p = y_pred[:, None] == labels[None, :]  # [N, L] one-hot prediction
    tp = (t & p).sum(0).astype(np.float64)  # [L]
    fp = (~t & p).sum(0).astype(np.float64)  # [L]
    fn = (t & ~p).sum(0).astype(np.float64)  # [L]

    def ratio(num, den):  # zero_division=0
        return np.divide(num, den, out=np.zeros_like(num), where=den > 0)

    out = {}
    for average, (tp_, fp_, fn_) in (("macro", (tp, fp, fn)), ("micro", (tp.sum(), fp.sum(), fn.sum()))):
        tp_, fp_, fn_ = (np.atleast_1d(v) for v in (tp_, fp_, fn_))
        out[f"precision_{average}"] = float(ratio(tp_, tp_ + fp_).mean())
        out[f"recall_{average}"] = float(ratio(tp_, tp_ + fn_).mean())
        out[f"f1_{average}"] = float(ratio(2 * tp_, 2 * tp_ + fp_ + fn_).mean())
    return out


def action_following(pred_groups: np.ndarray, true_groups: np.ndarray) -> dict:
    """IDM-predicted vs given action groups (`data.action_groups`, [N, T, 9], frames 1..15 only) -> metrics.

    P/R/F1 per discrete task pooled over every frame of every clip, then the mean over the 7 tasks
    (MineWorld's metric_mean_on_task). The 3-way tasks use action_groups' labels: 0 = neither or both
    keys pressed ("null"), 1 = first key only, 2 = second key only. Camera: bin accuracy and mean
    absolute bin difference per axis in VPT's 11 bins; camera_bin_error is the mean over both axes
    (MineWorld's camera_loss).
    """
    if pred_groups.shape != true_groups.shape or pred_groups.shape[-1] != len(data.GROUP_NAMES):
        raise ValueError(f"action_following: need pred and true groups of one shape [..., 9]; got "
                         f"{pred_groups.shape} and {true_groups.shape}")
    pred = pred_groups.reshape(-1, len(data.GROUP_NAMES))  # [N*T, 9]
    true = true_groups.reshape(-1, len(data.GROUP_NAMES))  # [N*T, 9]
    per_task = [classification_scores(true[:, g], pred[:, g]) for g in range(data.N_DISCRETE_GROUPS)]
    out = {k: float(np.mean([s[k] for s in per_task])) for k in per_task[0]}  # mean over the 7 tasks
    out.update({f"f1_macro_{data.GROUP_NAMES[g]}": s["f1_macro"] for g, s in enumerate(per_task)})
    cam_pred, cam_true = pred[:, data.N_DISCRETE_GROUPS:], true[:, data.N_DISCRETE_GROUPS:]  # [N*T, 2] bins
    err = np.abs(cam_pred - cam_true).mean(0)  # [2] mean |bin difference| per axis
    acc = (cam_pred == cam_true).mean(0)  # [2]
    out.update(camera_bin_error=float(err.mean()), camera_error_pitch=float(err[0]),
               camera_error_yaw=float(err[1]), camera_acc_pitch=float(acc[0]), camera_acc_yaw=float(acc[1]))
    return out


@torch.no_grad()
def idm_read(model: idm_lib.IDM, frames: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
    """Run the IDM once on all 16 frames of each clip (§5.1, as idm.inverse_reward does) ->
    (action groups int64 [B, T, 9] of its argmax, latent float [B, T, D])."""
    out = model(frames)
    groups = data.action_groups(*idm_lib.decode(out))  # [B, T, 9]
    return groups.cpu().numpy(), out["latent"].float().cpu()


# ----------------------------------------------------------------------------------------------
# Visual quality: PSNR, SSIM, LPIPS on frames 1..15 in [0, 1] (docs/formats.md §1.8)

def psnr(gen: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """PSNR in dB per frame, on values in [0, 1]: 10 log10(1 / MSE). Frames [..., H, W, 3] -> [...].
    The MSE is floored at 1e-10, so identical frames give 100 dB instead of infinity."""
    mse = ((gen.double() - gt.double()) ** 2).mean(dim=(-3, -2, -1))  # [...]
    return 10.0 * torch.log10(1.0 / mse.clamp_min(1e-10))


def _gaussian_1d(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2  # [size]
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    return g / g.sum()  # [size]; the 2-D window is its outer product


def ssim(gen: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """SSIM (Wang et al. 2004) per frame on values in [0, 1]: 11x11 Gaussian window with sigma 1.5,
    K1 = 0.01, K2 = 0.03, data range 1, 'valid' windows only (no padding), the SSIM map averaged over
    pixels and then over the 3 channels. Frames [N, H, W, 3] -> [N]. float32 (12x faster than float64 on
    CPU) on channel-centred values, which keeps the variance round-off far below C2."""
    if gen.shape[-3] < 11 or gen.shape[-2] < 11:
        raise ValueError(f"ssim: frames must be at least 11x11 pixels, got {tuple(gen.shape[-3:-1])}")
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    x = gen.float().permute(0, 3, 1, 2)  # [N, 3, H, W]
    y = gt.float().permute(0, 3, 1, 2)  # [N, 3, H, W]
    # (Co)variances do not change when a constant is subtracted; centring each channel first keeps the
    # E[x^2] - E[x]^2 cancellation small in float32. The means get the constant back below.
    ox, oy = x.mean(dim=(2, 3), keepdim=True), y.mean(dim=(2, 3), keepdim=True)  # [N, 3, 1, 1]
    x, y = x - ox, y - oy
    # The five local Gaussian means in one separable depthwise conv: x, y, x^2, y^2, xy per channel.
    z = torch.cat([x, y, x * x, y * y, x * y], dim=1)  # [N, 15, H, W]
    g = _gaussian_1d().to(z)  # [11]
    z = F.conv2d(z, g.view(1, 1, 11, 1).expand(15, 1, 11, 1), groups=15)  # [N, 15, H-10, W]
    z = F.conv2d(z, g.view(1, 1, 1, 11).expand(15, 1, 1, 11), groups=15)  # [N, 15, H-10, W-10]
    mx, my, sxx, syy, sxy = z.chunk(5, dim=1)  # [N, 3, h, w] each, of the centred images
    vx, vy, cxy = sxx - mx ** 2, syy - my ** 2, sxy - mx * my  # local variances and covariance
    mx, my = mx + ox, my + oy  # local means of the images themselves
    smap = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))  # [N, 3, h, w]
    return smap.double().mean(dim=(1, 2, 3))  # [N]


# ----------------------------------------------------------------------------------------------
# FVD: Fréchet distance between Gaussians fitted to video features (Unterthiner et al. 2018)

def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)). sqrtm of a product of (near-)singular covariances
    can pick up an imaginary part from round-off or return non-finite values: a small ridge (1e-6 I) is
    then added to both covariances, and the real part is kept. Returns nan if nothing finite comes out."""
    diff = mu1 - mu2  # [D]
    with warnings.catch_warnings():  # "matrix is singular": expected with few samples; checked below
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1 @ sigma2)  # [D, D], possibly complex
        if not np.isfinite(covmean).all():
            ridge = np.eye(len(mu1)) * 1e-6
            covmean = linalg.sqrtm((sigma1 + ridge) @ (sigma2 + ridge))
    covmean = np.real(covmean)  # the imaginary part is numerical noise for PSD inputs
    value = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))
    return value if math.isfinite(value) else float("nan")


def fvd_from_features(gen: np.ndarray, gt: np.ndarray) -> float:
    """Fréchet distance between feature sets [N, D] (Gaussians with the sample mean and covariance)."""
    if len(gen) < 2 or len(gt) < 2:
        return float("nan")  # a covariance needs two samples
    gen, gt = gen.astype(np.float64), gt.astype(np.float64)
    cov_gen, cov_gt = np.atleast_2d(np.cov(gen, rowvar=False)), np.atleast_2d(np.cov(gt, rowvar=False))  # [D, D]
    return frechet_distance(gen.mean(0), cov_gen, gt.mean(0), cov_gt)


I3D_PREFIXES = tuple(range(10, 16))  # MineWorld: the mean FVD over prefixes of 10..15 frames (docs/formats.md §1.8)


def i3d_preprocess(frames: torch.Tensor) -> torch.Tensor:
    """StyleGAN-V / MineWorld preprocessing: uint8 [B, T, H, W, 3] -> float [B, 3, T, 224, 224] in [-1, 1].
    The short side is scaled to 224 (bilinear), then the centre 224x224 is cropped."""
    B, T, H, W, _ = frames.shape
    x = frames.float().div(255).permute(0, 1, 4, 2, 3).reshape(B * T, 3, H, W)  # [B*T, 3, H, W] in [0, 1]
    s = 224 / min(H, W)
    h, w = max(224, math.ceil(H * s)), max(224, math.ceil(W * s))  # StyleGAN-V rounds the long side up
    x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)  # [B*T, 3, h, w]
    top, left = (h - 224) // 2, (w - 224) // 2
    x = x[:, :, top:top + 224, left:left + 224]  # [B*T, 3, 224, 224]
    return (x * 2 - 1).reshape(B, T, 3, 224, 224).permute(0, 2, 1, 3, 4)  # [B, 3, T, 224, 224]


@torch.no_grad()
def i3d_features(i3d: torch.jit.ScriptModule, frames: torch.Tensor, device: str) -> np.ndarray:
    """I3D features of frames 1..15 for every prefix length in I3D_PREFIXES: uint8 [B, 16, H, W, 3] ->
    float [len(I3D_PREFIXES), B, D] (D = 400 logits for StyleGAN-V's detector)."""
    x = i3d_preprocess(frames[:, 1:]).to(device)  # [B, 3, 15, 224, 224]
    feats = [i3d(x[:, :, :n].contiguous(), rescale=False, resize=False, return_features=True)
             for n in I3D_PREFIXES]  # each [B, D]
    return torch.stack(feats).float().cpu().numpy()  # [P, B, D]


# ----------------------------------------------------------------------------------------------
# Scoring a set of videos

@dataclass
class Scorers:
    """The networks the metrics need, loaded once and shared by all rows."""
    reward_idm: idm_lib.IDM
    judge_idm: idm_lib.IDM
    lpips: torch.nn.Module | None  # None = unavailable, reason in lpips_note
    lpips_note: str
    i3d: torch.jit.ScriptModule | None  # None = FVD on the judge IDM latent
    device: str


def load_scorers(cfg: config.EvalConfig) -> Scorers:
    """Load both IDMs, LPIPS and (if fvd_features is a path) the I3D TorchScript; fail fast on a missing
    IDM or I3D file (a missing AlexNet only makes LPIPS unavailable, with the reason)."""
    device = str(runtime.pick_device(cfg.device, "eval.device"))

    reward = idm_lib.load(cfg.reward_idm, "eval.reward_idm").to(device)
    judge = idm_lib.load(cfg.judge_idm, "eval.judge_idm").to(device)
    lp, note = load_lpips(cfg.lpips_backbone)
    i3d = None
    if cfg.fvd_features != "idm":
        if not os.path.isfile(cfg.fvd_features):
            raise FileNotFoundError(f"eval.fvd_features: no I3D TorchScript at {cfg.fvd_features}; give the path "
                                    f"of StyleGAN-V's i3d_torchscript.pt, or 'idm' for the judge IDM latent")
        try:
            i3d = torch.jit.load(cfg.fvd_features, map_location=device).eval()
        except RuntimeError as e:  # truncated, or not a TorchScript archive
            raise UsageError(f"eval.fvd_features: cannot read {cfg.fvd_features} as TorchScript "
                             f"({str(e).strip().splitlines()[0]}); give StyleGAN-V's i3d_torchscript.pt "
                             f"or 'idm'") from None
    return Scorers(reward, judge, lp.to(device) if lp is not None else None, note, i3d, device)


def fvd_name(cfg: config.EvalConfig) -> str:
    """What the FVD column was computed on; "fvd_idm" is not comparable with published FVDs."""
    return "fvd_idm" if cfg.fvd_features == "idm" else "i3d"


def _score(name: str, clips: list, cfg: config.EvalConfig, videos: Callable[[dict, int], torch.Tensor],
           visual: bool, scorers: Scorers | None, videos_out: list | None, tokens: dict | None = None) -> dict:
    """Score the videos `videos(batch, index of its first clip)` gives for every batch of clips, with a
    progress bar. visual=False is the GT row. `tokens`: data.collate's keywords for batch["tokens"] (the
    world model's action-token offset and camera quantizer; MineWorld's by default). `seconds` is the
    row's wall time, generation included."""
    s = scorers or load_scorers(cfg)
    t0 = time.time()
    true, pred_r, pred_j, bright = [], [], [], []
    sums = {"psnr": 0.0, "ssim": 0.0, "lpips": 0.0}  # sums over scored frames
    feats_gen, feats_gt = [], []  # FVD features: [B, D] (idm) or [P, B, D] (i3d) per batch
    n_frames = 0
    kept = 0  # clips already copied into videos_out
    for i in tqdm(range(0, len(clips), cfg.batch_size), desc=f"eval {name}", unit="batch", leave=False):
        batch = data.collate(clips[i:i + cfg.batch_size], **(tokens or {}))
        gt = batch["frames"]  # [B, 16, H, W, 3] uint8
        gen = videos(batch, i).cpu()  # [B, 16, H, W, 3] uint8; a GPU rollout comes back to the host
        if gen.shape != gt.shape or gen.dtype != torch.uint8:
            raise ValueError(f"{name}: generated videos must be uint8 {tuple(gt.shape)} (frame 0 = x0 or its "
                             f"tokenizer round trip); got {gen.dtype} {tuple(gen.shape)}")
        true.append(batch["groups"][:, 1:].numpy())  # [B, 15, 9]; a_t for t = 1..15
        groups_r, _ = idm_read(s.reward_idm, gen)
        groups_j, latent = idm_read(s.judge_idm, gen)  # latent [B, 16, D]
        pred_r.append(groups_r[:, 1:])  # [B, 15, 9]; the frame-t prediction vs a_t
        pred_j.append(groups_j[:, 1:])
        g, x = gen[:, 1:].float() / 255, gt[:, 1:].float() / 255  # [B, 15, H, W, 3] scored frames in [0, 1]
        bright.append(g.mean(dim=(1, 2, 3, 4)).numpy())  # [B]
        if visual:
            flat_g, flat_x = g.flatten(0, 1), x.flatten(0, 1)  # [B*15, H, W, 3]
            n_frames += len(flat_g)
            sums["psnr"] += float(psnr(flat_g, flat_x).sum())
            sums["ssim"] += float(ssim(flat_g, flat_x).sum())
            if s.lpips is not None:
                sums["lpips"] += float(lpips_distance(s.lpips, flat_g.to(s.device), flat_x.to(s.device)).sum())
            if s.i3d is not None:
                feats_gen.append(i3d_features(s.i3d, gen, s.device))  # [P, B, D]
                feats_gt.append(i3d_features(s.i3d, gt, s.device))
            else:
                _, latent_gt = idm_read(s.judge_idm, gt)
                feats_gen.append(latent[:, 1:].mean(1).numpy())  # [B, D]; frames 1..15 mean-pooled
                feats_gt.append(latent_gt[:, 1:].mean(1).numpy())
        if videos_out is not None and kept < cfg.videos:
            videos_out.append(gen[:cfg.videos - kept].clone())
            kept += len(videos_out[-1])
    seconds = time.time() - t0
    true_a = np.concatenate(true)  # [N, 15, 9]
    row = {"name": name}
    pred_r, pred_j = np.concatenate(pred_r), np.concatenate(pred_j)  # [N, 15, 9] each
    for prefix, pred in (("", pred_r), ("judge_", pred_j)):
        row.update({prefix + k: v for k, v in action_following(pred, true_a).items()})
    # How often the reward and judge IDMs read the same 7 discrete groups off a frame: GRPO can only amplify
    # the part of the reward the judge also sees (docs/conventions.md §8.1)
    g = data.N_DISCRETE_GROUPS
    row["idm_agreement"] = float((pred_r[..., :g] == pred_j[..., :g]).all(-1).mean())
    # Judge F1 along the clip, frames 1-5, 6-10, 11-15: a fall means errors compound over the rollout
    # (drift that only training on the model's own rollouts sees); a flat profile means they do not.
    for a in (1, 6, 11):
        row[f"judge_f1_macro_frames_{a}_{a + 4}"] = action_following(pred_j[:, a - 1:a + 4],
                                                                      true_a[:, a - 1:a + 4])["f1_macro"]
    notes = []
    row.update(psnr=None, ssim=None, lpips=None, fvd=None, fvd_features=fvd_name(cfg))
    if visual:
        row.update(psnr=sums["psnr"] / n_frames, ssim=sums["ssim"] / n_frames)
        if s.lpips is None:
            notes.append(s.lpips_note)
        else:
            row["lpips"] = sums["lpips"] / n_frames
        if s.i3d is not None:
            gen_f, gt_f = np.concatenate(feats_gen, axis=1), np.concatenate(feats_gt, axis=1)  # [P, N, D]
            fvd = float(np.mean([fvd_from_features(a, b) for a, b in zip(gen_f, gt_f)]))  # mean over prefixes
        else:
            fvd = fvd_from_features(np.concatenate(feats_gen), np.concatenate(feats_gt))
        if math.isfinite(fvd):
            row["fvd"] = fvd
        else:
            notes.append(f"fvd unavailable: not finite with {len(clips)} clips (needs >= 2, better >> feature dim)")
    else:
        notes.append("gt row: visual metrics compare with itself and are not applicable")
    row.update(brightness=float(np.concatenate(bright).mean()), clips=len(clips), seconds=round(seconds, 3),
               clips_per_s=round(len(clips) / max(seconds, 1e-9), 3), notes="; ".join(notes))
    return row


def evaluate(generate: Callable[[torch.Tensor, dict], torch.Tensor], clips: list, cfg: config.EvalConfig, name: str,
             scorers: Scorers | None = None, videos_out: list | None = None, tokens: dict | None = None) -> dict:
    """Score a world model. `generate(x0 uint8 [B, H, W, 3], batch from data.collate) -> uint8
    [B, 16, H, W, 3]` rolls out actions a_1..a_15 (batch["buttons"/"camera"/"tokens"][:, 1:]) from x0 and
    returns frame 0 (x0, or x0 through the world model's tokenizer) and the 15 generated frames. Returns one
    metrics row (see `main`). If
    `videos_out` is a list, the first cfg.videos generated clips are appended to it (side-by-side video).
    `tokens`: how batch["tokens"] is made (data.collate's offset and camera_tokens)."""
    return _score(name, clips, cfg, lambda batch, _: generate(batch["frames"][:, 0], batch), True, scorers, videos_out,
                  tokens)


def evaluate_gt(clips: list, cfg: config.EvalConfig, scorers: Scorers | None = None) -> dict:
    """The GT row: action following of the IDMs on the ground-truth clips (their upper bound, paper
    Table 1); visual metrics are None."""
    return _score("gt", clips, cfg, lambda batch, _: batch["frames"], False, scorers, None)


def evaluate_recon(roundtrip: Callable[[torch.Tensor], torch.Tensor], clips: list, cfg: config.EvalConfig,
                   scorers: Scorers | None = None) -> dict:
    """The recon row: the ground-truth clips through the world model's tokenizer round trip, scored like a
    generated row against the raw GT. `roundtrip(frames uint8 [B, 16, H, W, 3]) -> uint8 same shape` (VQ
    encode/decode for AR, AE encode/decode for NFD) sees every frame, x0 included, as every frame the IDM
    reads has been through the tokenizer. What a perfect world model scores: the reachable bound
    (docs/conventions.md §8.5)."""
    return evaluate(lambda x0, batch: roundtrip(batch["frames"]), clips, cfg, "recon", scorers)


def evaluate_best_of(sample: Callable[[torch.Tensor, dict, int], torch.Tensor], clips: list, cfg: config.EvalConfig,
                     reward_fn: Callable[[torch.Tensor, dict], torch.Tensor], name: str | None = None,
                     scorers: Scorers | None = None, tokens: dict | None = None) -> dict:
    """The best-of-N row: per held-out clip, cfg.best_of samples `sample(x0, batch, i)` (i = 0..N-1, so the
    caller controls the noise; returns uint8 [B, 16, H, W, 3] like `evaluate`'s generate), the one with the
    highest `reward_fn(video, batch) -> [B]` (the reward IDM's clip reward, Eq. 3) kept, ties to the first,
    and the kept clips scored as a row (judge IDM etc.). Shows how much judge F1 the reward's pick buys
    (docs/conventions.md §8.1). Named best_of_<N> unless `name` is given; `seconds` includes all N samples and
    rewards."""
    if cfg.best_of < 1:
        raise ValueError(f"eval.best_of must be >= 1 for a best_of row, got {cfg.best_of} (0 = skip the row)")
    name = name or f"best_of_{cfg.best_of}"

    def pick(batch, _):
        x0 = batch["frames"][:, 0]  # [B, H, W, 3]
        best, best_reward = None, None
        for i in range(cfg.best_of):
            video = sample(x0, batch, i)  # [B, 16, H, W, 3] uint8, on the sampler's device
            reward = torch.as_tensor(reward_fn(video, batch)).float().cpu()  # [B]
            if reward.shape != (len(x0),):
                raise ValueError(f"{name}: reward_fn must return one reward per clip [{len(x0)}], "
                                 f"got {tuple(reward.shape)}")
            video = video.cpu()
            if best is None:
                best, best_reward = video, reward
            else:
                better = reward > best_reward  # [B]; strict, so a tie keeps the earlier sample
                best = torch.where(better[:, None, None, None, None], video, best)  # [B, 16, H, W, 3]
                best_reward = torch.maximum(best_reward, reward)
        return best

    return _score(name, clips, cfg, pick, True, scorers, None, tokens)


def world_model_rows(api, model, clips: list, cfg, names: tuple[str, ...], device, reward=None,
                     scorers: Scorers | None = None, videos_out: list | None = None) -> dict:
    """Rows of a world model (`api`: model_ar or model_diffusion; cfg: the run's config.Config) on held-out
    clips, by name: a generated row (any name but those below; the first cfg.eval.videos clips go to
    `videos_out`), "recon" (the tokenizer round trip of GT) and "best_of" (cfg.eval.best_of samples, the
    one `reward(frames, batch) -> [B, 15]` rates best kept; train.reward_fn). Every row samples with noise
    seeded by run.seed, so rows of one model differ only by what they measure. -> {row name: row}."""
    model.eval()
    tokens = {"offset": model.action_offset, "camera_tokens": cfg.data.camera_tokens}

    def sample(x0, batch, i=0):  # the evaluation sampler; sample i of best-of draws its own noise
        gen = torch.Generator(device=device).manual_seed(cfg.run.seed + 1000 * i)
        return api.sample_frames(model, x0.to(device), batch["tokens"].to(device), cfg, gen)

    rows = {}
    for name in names:
        if name == "recon":
            rows[name] = evaluate_recon(lambda frames: api.roundtrip(model, frames.to(device)), clips, cfg.eval,
                                        scorers)
        elif name == "best_of":
            rows[name] = evaluate_best_of(sample, clips, cfg.eval, lambda v, batch: reward(v, batch).mean(1),
                                          scorers=scorers, tokens=tokens)
        else:
            rows[name] = evaluate(sample, clips, cfg.eval, name, scorers, videos_out, tokens)
    return rows


def read_generated(gen_dir: str | Path, n: int, height: int, width: int) -> list[np.ndarray]:
    """clip_0.mp4 .. clip_<n-1>.mp4 of a folder -> frames uint8 [15 or 16, height, width, 3] each."""
    gen_dir = Path(gen_dir)
    missing = [f"clip_{i}.mp4" for i in range(n) if not (gen_dir / f"clip_{i}.mp4").is_file()]
    if missing:
        raise FileNotFoundError(f"{gen_dir}: {len(missing)} of the {n} videos are missing (first: {missing[0]}); "
                                f"clip_<i>.mp4 must exist for every ground-truth clip i, or lower --eval.clips")
    videos = []
    for i in range(n):
        frames = data.read_video(gen_dir / f"clip_{i}.mp4", height, width)  # [T, H, W, 3]
        if len(frames) not in (15, 16):
            raise ValueError(f"{gen_dir / f'clip_{i}.mp4'}: {len(frames)} frames; expected 15 (generated "
                             f"frames only, as MineWorld writes them) or 16 (with the context frame)")
        videos.append(frames)
    return videos


def evaluate_folder(gen_dir: str | Path, clips: list, cfg: config.EvalConfig, name: str,
                    scorers: Scorers | None = None, videos_out: list | None = None) -> dict:
    """Score a folder of generated clip_<i>.mp4, the i-th matched with the i-th ground-truth clip. A
    15-frame video holds frames 1..15 (MineWorld's inference.py writes only those) and gets x0 in front;
    videos are resized (INTER_LINEAR) to the ground-truth size."""
    h, w = clips[0][0].shape[1:3]
    videos = read_generated(gen_dir, len(clips), h, w)

    def from_folder(batch, i):
        out = []
        for v, x in zip(videos[i:i + len(batch["frames"])], batch["frames"]):
            out.append(torch.from_numpy(v) if len(v) == 16 else torch.cat([x[:1], torch.from_numpy(v)]))
        return torch.stack(out)  # [B, 16, H, W, 3]

    return _score(name, clips, cfg, from_folder, True, scorers, videos_out)


# ----------------------------------------------------------------------------------------------
# Output: Markdown table, metrics.json, side_by_side.mp4

TABLE = (("name", "name"), ("F1", "f1_macro"), ("P", "precision_macro"), ("R", "recall_macro"),
         ("F1 micro", "f1_micro"), ("cam err", "camera_bin_error"), ("judge F1", "judge_f1_macro"),
         ("judge cam err", "judge_camera_bin_error"), ("agree", "idm_agreement"), ("PSNR", "psnr"),
         ("SSIM", "ssim"), ("LPIPS", "lpips"),
         ("FVD", "fvd"), ("bright", "brightness"), ("clips/s", "clips_per_s"))


def markdown_table(rows: list[dict]) -> str:
    """One Markdown row per evaluated model; None prints as n/a. The FVD header names its features."""
    head = [h if key != "fvd" else f"FVD ({rows[0]['fvd_features']})" for h, key in TABLE]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [("n/a" if row[key] is None else f"{row[key]:.4g}" if isinstance(row[key], float) else str(row[key]))
                 for _, key in TABLE]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def gap_closed(results: dict) -> dict:
    """What RLIR bought, from the rows gt, recon, before, after: the change of judge F1 (the held-out IDM),
    the share of the before-to-recon gap it closes (recon: the tokenizer's bound, what a perfect world model
    scores), the change of the reward IDM's F1 beside it (a reward gain the judge does not share is reward
    hacking) and of PSNR (visual quality)."""
    before, after, bound = results["before"], results["after"], results["recon"]["judge_f1_macro"]
    gain = after["judge_f1_macro"] - before["judge_f1_macro"]
    gap = bound - before["judge_f1_macro"]
    return {"judge_f1_gain": gain, "gap_to_recon": gap, "gap_closed": gain / gap if gap > 0 else float("nan"),
            "reward_f1_gain": after["f1_macro"] - before["f1_macro"], "psnr_change": after["psnr"] - before["psnr"]}


def gap_line(g: dict) -> str:
    """gap_closed's figures as one sentence for the terminal."""
    return (f"judge F1 {g['judge_f1_gain']:+.3f}: {g['gap_closed']:.0%} of the {g['gap_to_recon']:.3f} gap to recon "
            f"closed; reward-IDM F1 {g['reward_f1_gain']:+.3f}; PSNR {g['psnr_change']:+.2f} dB")


def write_side_by_side(path: str | Path, rows: list[torch.Tensor], fps: int) -> None:
    """Rows of videos uint8 [N, 16, H, W, 3] (GT first, then each model) -> one mp4: for each clip, the
    rows stacked top to bottom with a 2-pixel white gap, clips one after another."""
    n = min(len(r) for r in rows)
    gap = torch.full((2, rows[0].shape[3], 3), 255, dtype=torch.uint8)  # [2, W, 3]
    frames = []
    for c in range(n):
        for t in range(rows[0].shape[1]):
            parts = [p for r in rows for p in (r[c, t], gap)][:-1]
            frames.append(torch.cat(parts).numpy())  # [rows*H + 2*(rows-1), W, 3]
    data.write_video(path, frames, fps, crf=18)


def _pull_flags(argv: list[str]) -> tuple[list[str], dict]:
    """Take --data, --out and --generated (each `--flag VALUE` or `--flag=VALUE`; --generated may repeat)
    out of argv; the rest goes to config.parse."""
    flags, rest, i = {"data": None, "out": None, "generated": []}, [], 0
    while i < len(argv):
        key, eq, value = argv[i].removeprefix("--").partition("=")
        if argv[i].startswith("--") and key in flags:
            if not eq:
                if i + 1 >= len(argv):
                    raise ConfigError(f"--{key} needs a value")
                value, i = argv[i + 1], i + 1
            if key == "generated":
                flags[key].append(value)
            else:
                flags[key] = value
        else:
            rest.append(argv[i])
        i += 1
    return rest, flags


def main(argv: list[str]) -> list[dict]:
    rest, flags = _pull_flags(argv)
    cfg, _ = config.parse(config.Config, rest)
    if flags["out"] is None:
        raise UsageError("--out is required; usage: python evaluate.py [CONFIG.yaml] --data DIR_OR_minicraft "
                         "--out OUT [--generated DIR ...] [--eval.key=value ...]")
    ec = cfg.eval
    out = runtime.output_folder(flags["out"], "--out")
    for gen_dir in flags["generated"]:                        # checked now, not after the GT row is scored
        if not Path(gen_dir).is_dir():
            raise UsageError(f"--generated {gen_dir}: no such folder; give a folder of generated clip_<n>.mp4")
    # The held-out clips: minicraft worlds of eval.seed (never trained on), or a clip folder.
    source = flags["data"] or cfg.data.source
    seed = ec.seed if source == "minicraft" else cfg.data.seed
    dc = config.build(DataConfig, {**vars(cfg.data), "source": source, "seed": seed, "max_clips": ec.clips}, "data.")
    scorers = load_scorers(ec)                                # eval.device, the IDM files: checked first
    clips, skips = data.load_clips(dc)                        # a missing source fails here, before out/ is made
    out.mkdir(parents=True, exist_ok=True)
    # Its own file names (eval_*): pointed at a train.py run folder, it adds to the record, never overwrites it.
    (out / "eval_config.yaml").write_text(config.dump(dataclasses.replace(cfg, data=dc)))   # the resolved config
    print(f"{len(clips)} clips from {source}; {skips}")
    rows = [evaluate_gt(clips, ec, scorers)]
    videos = [data.collate(clips[:ec.videos])["frames"]] if ec.videos else []  # [V, 16, H, W, 3] GT row
    for gen_dir in flags["generated"]:
        kept = []
        rows.append(evaluate_folder(gen_dir, clips, ec, Path(gen_dir).name, scorers, kept))
        if ec.videos:
            videos.append(torch.cat(kept))
    print(markdown_table(rows))
    for row in rows:
        if row["notes"]:
            print(f"{row['name']}: {row['notes']}")
    (out / "eval_metrics.json").write_text(json.dumps(rows, indent=2))
    if videos:
        write_side_by_side(out / "eval_side_by_side.mp4", videos, ec.fps)
    print(f"wrote {out / 'eval_metrics.json'}" + (f" and {out / 'eval_side_by_side.mp4'}" if videos else ""))
    return rows


if __name__ == "__main__":
    runtime.cli(main)
