"""GRPO as pure functions: group-normalised advantages (paper Eq. 1) and the masked clipped
surrogate with an optional KL to a reference policy (paper Eq. 2), plus health statistics.

No I/O, no model, no global state: tensors in, tensors and plain-float stats out. One loss serves
both world models (docs/conventions.md §5.2):
  - autoregressive: logp is [N, L] per generated token; the mask drops prompt and action tokens (§4.2);
  - diffusion: logp is [N, L] per (frame, denoising step) transition; the mask keeps the selected
    steps τ (§4.3, sde_sampler.select_steps).
Formulas and conventions: docs/conventions.md §4.1-§4.4.
"""
from dataclasses import dataclass
from typing import Literal

import torch

from runtime import POSITIVE, at_least, check_fields, within


@dataclass
class GRPOConfig:
    eps: float = 0.2  # lower clip ε of Eq. 2: ratio clipped at 1 − eps (paper Tables 6/7 "Clip Ratio" 0.2)
    eps_high: float | None = None  # upper clip: ratio clipped at 1 + eps_high; None = eps (DAPO clip-higher: 0.28)
    beta: float = 0.0  # weight of the KL to π_ref (AR: k3); 0 = no reference model (paper Table 8 tries 1e-4)
    adv_eps: float = 1e-4  # added to the std in Eq. 1 (the paper has none); 1e-4 as in TRL, Flow-GRPO
    # advantage scaling: "group" std (Eq. 1) | "batch" std | "none" (Dr. GRPO, mean-centred only)
    scale: Literal["group", "batch", "none"] = "group"
    adv_clip: float | None = 5.0  # clamp advantages to [−adv_clip, adv_clip] (Flow-GRPO/DanceGRPO); None = off
    # "grpo": per-sequence mean then mean (Eq. 2) | "token": DAPO | "dr_grpo": sum / (N·L)
    aggregation: Literal["grpo", "token", "dr_grpo"] = "grpo"
    # DiffusionNFT's β (rl.objective "nft", nft_loss): how far the implicit positive and negative policies sit from
    # θ_old along the current one; 1 = the positive policy is θ itself (its paper's default)
    nft_beta: float = 1.0

    def __post_init__(self):
        # the choice-valued fields (Literal) are checked by config.py when the config is read
        check_fields(self, {
            "eps": within(0, 1), "eps_high": at_least(0), "beta": at_least(0), "adv_eps": at_least(0),
            "adv_clip": POSITIVE, "nft_beta": POSITIVE})


# -----------------------------------------------------------------------------
# Eq. 1: group-relative advantages


def group_advantages(rewards: torch.Tensor, group_size: int, cfg: GRPOConfig) -> tuple[torch.Tensor, dict]:
    """Â_i = (R_i − mean_group) / (std + adv_eps), groups = consecutive blocks of `group_size`.

    rewards: [N] with N = n_groups · group_size (train.py repeats each prompt G times in a row), or
    [N, T] for one reward per frame (train.py's rl.credit "frame"): each frame t is then normalised
    within its group on its own, as if it were a separate group sharing the prompt and the action a_t.
    Returns (adv, same shape as rewards, float32, stats) where stats holds plain floats: n_groups,
    zero_std_groups and zero_std_frac (counting (group, frame) pairs for [N, T]), reward_mean,
    reward_std, adv_abs_mean.
    """
    if rewards.ndim not in (1, 2):
        raise ValueError(f"rewards must be [N] or [N, T], got shape {tuple(rewards.shape)}")
    n = rewards.shape[0]
    if group_size < 1 or n == 0 or n % group_size != 0:
        raise ValueError(f"{n} rewards cannot be split into groups of {group_size}; "
                         f"the batch must hold whole groups (N = n_groups · G)")
    if not torch.isfinite(rewards).all():
        raise ValueError(f"{int((~torch.isfinite(rewards)).sum())} of {n} rewards are not finite; "
                         f"skip this step and check the reward model")
    r = rewards.detach().float().view(-1, group_size, *rewards.shape[1:])  # [n_groups, G] or [n_groups, G, T]
    centred = r - r.mean(dim=1, keepdim=True)  # [n_groups, G(, T)]
    # A group whose rewards are all equal carries no signal (docs/conventions.md §4.1; TRL frac_reward_zero_std).
    # Test max == min, not std == 0: the float mean of equal values can be 1 ulp off (so centred ≠ 0)
    # while torch's std is exactly 0, which with adv_eps = 0 would give 0/0.
    zero_std = r.amax(dim=1) == r.amin(dim=1)  # [n_groups(, T)]

    # Population std (ddof = 0), our choice where Eq. 1 just says "std": it is defined for G = 1
    # and makes each group's advantages an exact z-score. TRL/verl/DanceGRPO use the unbiased std,
    # which only rescales Â by sqrt((G−1)/G) (0.98 at G = 24), i.e. a slightly smaller step size.
    if cfg.scale == "group":
        adv = centred / (r.std(dim=1, correction=0, keepdim=True) + cfg.adv_eps)  # [n_groups, G(, T)]
    elif cfg.scale == "batch":
        adv = centred / (r.std(correction=0) + cfg.adv_eps)  # [n_groups, G(, T)], TRL scale_rewards="batch"
    else:
        adv = centred  # [n_groups, G(, T)], Dr. GRPO (docs/conventions.md §4.1)
    adv = torch.where(zero_std.unsqueeze(1), 0.0, adv)  # [n_groups, G(, T)]  exactly 0 for zero-std groups
    if cfg.adv_clip is not None:
        adv = adv.clamp(-cfg.adv_clip, cfg.adv_clip)  # A_max = 5 (docs/conventions.md §4.1)
    adv = adv.reshape(rewards.shape)  # [N] or [N, T]

    stats = {
        "n_groups": float(r.shape[0]),
        "zero_std_groups": float(zero_std.sum()),
        "zero_std_frac": float(zero_std.float().mean()),
        "reward_mean": float(r.mean()),
        "reward_std": float(r.std(correction=0)),
        "adv_abs_mean": float(adv.abs().mean()),
    }
    return adv, stats


def frame_credit(adv: torch.Tensor, frame_of: torch.Tensor) -> torch.Tensor:
    """Per-frame advantages [N, T] (frames 1..T) -> one per log-prob entry [N, L] (train.py's rl.credit
    "frame"): the entries of frame t earn every reward its pixels decide, A_t + A_{t+1}. The IDM reads frame
    t when it predicts a_t and a_{t+1} (its first layer is a conv over frames t−2..t+2, and replacing frame t
    changes the prediction at t and at t+1, rarely at t−1), so A_t alone misses half the credit.
    frame_of [L] is the frame of each entry (0 = the given frame, whose entries are masked: advantage 0)."""
    nxt = torch.nn.functional.pad(adv[:, 1:], (0, 1))  # [N, T]  A_{t+1}, 0 after the last frame
    per_frame = torch.nn.functional.pad(adv + nxt, (1, 0))  # [N, T+1]  frame 0 gets 0
    return per_frame[:, frame_of]  # [N, L]


# -----------------------------------------------------------------------------
# Eq. 2: masked clipped surrogate + β·KL to the reference


def _masked_mean(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Mean of x over entries where m = 1; 0 when the mask is empty (no NaN)."""
    return (x * m).sum() / m.sum().clamp(min=1.0)


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
                cfg: GRPOConfig, kl: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Masked clipped GRPO loss (negated Eq. 2, so lower is better) and its health statistics.

    logp      [N, L] log-probs under the current policy θ (differentiable)
    old_logp  [N, L] log-probs recorded at rollout (θ_old; treated as constants)
    adv       [N]    one advantage per sequence, broadcast over its L entries, or [N, L], one per entry
    mask      [N, L] 1/True where the entry is trained; a row may be all zero
    kl        [N, L] per-entry KL to the frozen reference, differentiable (the world model's log_probs: k3 per
              token for AR, the closed-form Gaussian KL per latent element for NFD); in the loss when
              cfg.beta > 0, logged if given
    Returns (loss 0-d tensor, stats of plain floats; ratio_mean_per_col is a tuple of L floats).
    """
    if logp.ndim != 2 or old_logp.shape != logp.shape or mask.shape != logp.shape:
        raise ValueError(f"logp, old_logp and mask must all be [N, L]; got {tuple(logp.shape)}, "
                         f"{tuple(old_logp.shape)}, {tuple(mask.shape)}")
    if adv.shape not in (logp.shape[:1], logp.shape):
        raise ValueError(f"adv must be [N] = [{logp.shape[0]}] or [N, L] = {list(logp.shape)}, "
                         f"got {tuple(adv.shape)}")
    use_kl = cfg.beta > 0
    if use_kl and kl is None:
        raise ValueError(f"grpo.beta={cfg.beta} > 0 needs kl; pass the KL to the reference policy "
                         f"or set grpo.beta=0")
    if kl is not None and kl.shape != logp.shape:
        raise ValueError(f"kl must be [N, L] = {tuple(logp.shape)}, got {tuple(kl.shape)}")
    eps_low = cfg.eps
    eps_high = cfg.eps if cfg.eps_high is None else cfg.eps_high

    m = mask.to(torch.float32)  # [N, L]
    keep = m > 0  # [N, L]
    # Masked entries may hold anything (padding, -inf); zero them before exp so no NaN leaks into
    # the loss or its gradient.
    log_ratio = torch.where(keep, logp.float() - old_logp.detach().float(), 0.0)  # [N, L]
    ratio = torch.exp(log_ratio)  # [N, L]  ρ_{i,t}
    a = adv.detach().float()  # [N, L], or [N] -> [N, 1]: Â_{i,t} = Â_i (Eq. 2)
    a = a[:, None] if a.ndim == 1 else a

    # Eq. 2, negated: −min(ρ·Â, clip(ρ, 1−ε_low, 1+ε_high)·Â)  (docs/conventions.md §4.2)
    surrogate = torch.minimum(ratio * a, ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * a)  # [N, L]
    per_token = -surrogate  # [N, L]
    if use_kl:
        per_token = per_token + cfg.beta * torch.where(keep, kl.float(), 0.0)  # [N, L]  ℓ = ℓ^pg + β·KL

    # Aggregation (docs/conventions.md §4.3); an all-masked row contributes 0 and divides by 1, not 0.
    n_seq, max_len = logp.shape
    if cfg.aggregation == "grpo":
        per_seq = (per_token * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)  # [N]  (1/|o_i|) Σ_t
        loss = per_seq.mean()  # (1/G) Σ_i
    elif cfg.aggregation == "token":
        loss = (per_token * m).sum() / m.sum().clamp(min=1.0)  # DAPO: Σ_{i,t} / Σ_i |o_i|
    else:
        loss = (per_token * m).sum() / (n_seq * max_len)  # Dr. GRPO: Σ_{i,t} / (N · L_max)

    # Health statistics (docs/conventions.md §4.4), all detached. clip_frac counts ratios outside the trust region.
    with torch.no_grad():
        clipped = ((ratio < 1.0 - eps_low) | (ratio > 1.0 + eps_high)).float()  # [N, L]
        col_count = m.sum(dim=0)  # [L]
        ratio_col = (ratio * m).sum(dim=0) / col_count.clamp(min=1.0)  # [L]
        ratio_col = torch.where(col_count > 0, ratio_col, float("nan"))  # [L], NaN = column never trained
        stats = {
            "loss": float(loss),
            "clip_frac": float(_masked_mean(clipped, m)),
            "approx_kl": float(_masked_mean(0.5 * log_ratio ** 2, m)),  # ½·mean (logp − old)²
            "ratio_mean": float(_masked_mean(ratio, m)),
            "ratio_mean_per_col": tuple(ratio_col.tolist()),
            "n_tokens": float(m.sum()),
        }
        if kl is not None:
            stats["kl_ref"] = float(_masked_mean(kl.float(), m))  # logged whenever kl is given
    return loss, stats


def micro_batch_share(mask: torch.Tensor, rows: int, tokens: float, cfg: GRPOConfig) -> float:
    """The weight of a micro-batch's loss (its rows' mask [b, L] of a batch of `rows` rows and `tokens` trained
    entries) in the whole batch's, so that the micro-batches' gradients add up to the batch's: its share of the
    rows for "grpo" and "dr_grpo" (means over rows), of the trained entries for "token" (a mean over entries)."""
    return float(mask.sum()) / tokens if cfg.aggregation == "token" else len(mask) / rows


# -----------------------------------------------------------------------------
# DiffusionNFT (Zheng et al. 2025, "Online Diffusion Reinforcement with Forward Process", §3): the same
# advantages, trained on the forward process of the policy's own clean samples instead of SDE log-probs


def nft_loss(v: torch.Tensor, v_old: torch.Tensor, target: torch.Tensor, adv: torch.Tensor, cfg: GRPOConfig,
             v_ref: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """DiffusionNFT's negative-aware flow-matching loss and its statistics.

    v       [N, T, ...] the current policy's velocity at x_t = (1 − t)·x0 + t·ε, one noised draw per generated
            frame x0 (differentiable)
    v_old   [N, T, ...] θ_old's (the sampler's) velocity at the same x_t (constants)
    target  [N, T, ...] the flow-matching target ε − x0
    adv     [N] or [N, T] Eq. 1's advantages, clamped to ±cfg.adv_clip = Z
    v_ref   [N, T, ...] the frozen reference's velocity at the same x_t; in the loss when cfg.beta > 0

    The optimality probability r = ½ + ½·A/Z ∈ [0, 1] mixes an implicit positive policy v⁺ = (1 − β)·v_old + β·v
    and an implicit negative one v⁻ = (1 + β)·v_old − β·v (β = cfg.nft_beta): ℓ = (Z/β)·[r‖v⁺ − target‖² +
    (1 − r)‖v⁻ − target‖²], mean over elements, frames and rows. At θ = θ_old its gradient is exactly that of
    A·‖v − target‖²: plain flow matching on the samples the reward prefers, its negative on those it does not,
    and nothing at all when every advantage is 0. Unlike Eq. 2 nothing here needs a likelihood, so any sampler
    may produce the samples. Returns (loss 0-d tensor, stats of plain floats)."""
    if v.shape != v_old.shape or v.shape != target.shape or v.ndim < 3:
        raise ValueError(f"v, v_old and target must all be [N, T, ...]; got {tuple(v.shape)}, "
                         f"{tuple(v_old.shape)}, {tuple(target.shape)}")
    if adv.shape not in (v.shape[:1], v.shape[:2]):
        raise ValueError(f"adv must be [N] = [{v.shape[0]}] or [N, T] = {list(v.shape[:2])}, got {tuple(adv.shape)}")
    if cfg.adv_clip is None:
        raise ValueError("DiffusionNFT scales advantages by grpo.adv_clip (Z in r = 1/2 + A/2Z); set it, e.g. 5")
    if cfg.beta > 0 and v_ref is None:
        raise ValueError(f"grpo.beta={cfg.beta} > 0 needs the reference's velocities v_ref, or set grpo.beta=0")
    z, b = cfg.adv_clip, cfg.nft_beta
    a = adv.detach().float()
    r = 0.5 + 0.5 * (a[:, None] if a.ndim == 1 else a).clamp(-z, z) / z  # [N, T] or [N, 1]
    old = v_old.detach().float()
    pos = (1 - b) * old + b * v.float()  # [N, T, ...]  v⁺
    neg = (1 + b) * old - b * v.float()  # [N, T, ...]  v⁻
    dims = tuple(range(2, v.ndim))
    per_frame = r * (pos - target).pow(2).mean(dims) + (1 - r) * (neg - target).pow(2).mean(dims)  # [N, T]
    loss = z / b * per_frame.mean()
    stats = {"nft_shift": float((v.detach().float() - old).pow(2).mean())}  # how far θ has left θ_old
    if v_ref is not None:
        kl = (v.float() - v_ref.float()).pow(2).mean()  # velocity-space distance to π_ref, Flow-GRPO's KL up to a scale
        stats["kl_ref"] = float(kl.detach())
        if cfg.beta > 0:
            loss = loss + cfg.beta * kl
    stats["loss"] = float(loss.detach())
    return loss, stats
