"""Flow ODE → marginal-preserving SDE for GRPO on flow-matching world models (paper §4.3),
per-transition Gaussian log-probs, timestep selection τ, and deterministic evaluation samplers.

Conventions (docs/conventions.md §2.1, §3.2):
  - t = 1 is noise, t = 0 is data: x_t = (1 − t)·x0 + t·ε, and the network predicts v ≈ ε − x0.
  - The grid runs 1 = t_0 > t_1 > … > t_K = 0. Step k goes t_k → t_{k+1} with h_k = t_k − t_{k+1} > 0,
    so the ODE time increment dt = t_{k+1} − t_k = −h_k is NEGATIVE: Euler is x ← x + dt·v = x − h·v.
  - Per-step log-probs are reduced over the latent elements ("mean" by default, as Flow-GRPO and
    DanceGRPO do). The ratio is then exp(mean of per-element log-ratios), which stays very close to 1,
    so a GRPO clip of 0.2 (paper Table 7) rarely binds; upstream pairs "mean" with clip 1e-4. With
    "sum" the log-ratio is D times larger (D = latent size) and 0.2 is the LLM-style clip. Watch
    clip_frac (grpo.policy_loss) to see which regime a run is in.
All functions are pure (tensors in, tensors out); the world model supplies v_fn(x, t) -> v.
"""
import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch

from runtime import POSITIVE, ConfigError, at_least, check_fields, within


@dataclass
class SDEConfig:
    steps: int = 10  # K rollout denoising steps (paper Table 7 "Sampling steps")
    shift: float = 1.0  # time shift s: t ← s·t / (1 + (s − 1)·t); 1 = uniform grid, >1 spends more steps near noise
    # g(t): "flow" = a·sqrt(t/(1 − t̃)) (Flow-GRPO) | "dance" = constant η (DanceGRPO)
    schedule: Literal["flow", "dance"] = "flow"
    noise_level: float = 0.75  # the a (flow) or η (dance) above; paper Table 7 ε_t = 0.75; 0 = deterministic ODE
    # over latent elements: "mean" (upstream; implies clip ~1e-4, 0.2 rarely binds)
    #                       | "sum" (ratio moves D× more in log space; the LLM-style clip 0.2 fits)
    logprob_reduce: Literal["mean", "sum"] = "mean"
    tau: float = 0.6  # timestep selection τ: fraction of the K − 1 non-final steps trained per trajectory (Table 7)
    # > 0: the SDE's noise on the first `window` steps only, ODE steps after, and exactly those steps trained (τ
    # unused): every difference within a group then comes from noise the loss credits (Flow-GRPO-Fast's few SDE
    # steps, early, where a frame's layout is decided); 0 = noise on every step (the paper)
    window: int = 0
    same_noise: bool = False  # all G rollouts of a group start from one x_1 (DanceGRPO; docs/conventions.md §3.5)
    eval_steps: int = 18  # deterministic evaluation steps (paper §5.1: DPM-Solver++, 18 steps)
    eval_solver: Literal["dpm2m", "euler"] = "dpm2m"  # evaluation sampler: "dpm2m" (DPM-Solver++ 2M) | "euler"

    def __post_init__(self):
        check_fields(self, {
            "steps": at_least(1), "shift": POSITIVE, "noise_level": at_least(0, "0 = the deterministic ODE"),
            "tau": within(0, 1), "window": at_least(0, "0 = noise on every step"), "eval_steps": at_least(1)})
        if self.window >= self.steps:                          # select_steps: the step into t = 0 is never stochastic
            raise ConfigError(f"window={self.window}: must be < steps={self.steps} (the last step is never stochastic)")


VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # v_fn(x [B, ...], t 0-d) -> v [B, ...]


# -----------------------------------------------------------------------------
# Time grid and diffusion coefficient g_k (docs/conventions.md §3.1)


def timesteps(K: int, shift: float = 1.0) -> torch.Tensor:
    """The grid 1 = t_0 > … > t_K = 0 as float32 [K+1], uniform in s then shifted (docs/conventions.md §3.1)."""
    if K < 1:
        raise ValueError(f"need at least one step, got K={K}")
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    s = torch.linspace(1.0, 0.0, K + 1, dtype=torch.float64)  # [K+1]
    t = shift * s / (1.0 + (shift - 1.0) * s)  # [K+1]  SD3 / DanceGRPO time shift, keeps 1 → 1, 0 → 0
    return t.float()


def diffusion_coeff(ts: torch.Tensor, cfg: SDEConfig) -> torch.Tensor:
    """g_k for the K steps of grid ts [K+1] -> [K] float32 (docs/conventions.md §3.1)."""
    t = ts[:-1].double()  # [K]  start time of each step
    if cfg.schedule == "flow":
        # g = a·sqrt(t / (1 − t̃)), t̃ = t except t̃_0 = t_1 when t_0 = 1 (avoids 1/0; Flow-GRPO's sigma_max)
        t_tilde = torch.where(t == 1.0, ts[1].double(), t)  # [K]
        g = cfg.noise_level * torch.sqrt(t / (1.0 - t_tilde))  # [K]
    elif cfg.schedule == "dance":
        g = torch.full_like(t, cfg.noise_level)  # [K]  g = η
    else:
        raise ValueError(f"sde.schedule={cfg.schedule!r} is not 'flow' or 'dance'; fix the config")
    if cfg.window:
        g[cfg.window:] = 0.0  # [K]  ODE steps after the window
    return g.float()


def _bcast(a: float | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A python float, 0-d tensor or tensor over x's leading batch dims, as fp32 broadcastable to x."""
    a = torch.as_tensor(a, dtype=torch.float32, device=x.device)
    if a.ndim > x.ndim or a.shape != x.shape[:a.ndim]:
        raise ValueError(f"time/coefficient of shape {tuple(a.shape)} does not match the leading dims "
                         f"of x {tuple(x.shape)}; pass a float or a tensor over x's batch dims")
    return a.reshape(a.shape + (1,) * (x.ndim - a.ndim))


# -----------------------------------------------------------------------------
# One SDE transition and its Gaussian log-density (docs/conventions.md §3.1–§3.3)


def sde_step(x: torch.Tensor, v: torch.Tensor, t: float | torch.Tensor, t_next: float | torch.Tensor,
             g: float | torch.Tensor, noise: torch.Tensor | None = None,
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x_t → x_{t_next} by Euler–Maruyama on the marginal-preserving reverse SDE (docs/conventions.md §3.1):

      dx = [v + g²/(2t)·(x + (1 − t)·v)] dt + g dw̄,   dt = −h < 0.

    x, v: [B, ...] (any dtype; math in float32, bf16 overflows in the mean). noise: z like x, or None
    to draw z ~ N(0, I) from `generator`. Returns float32 (x_next, mean, std), std broadcastable to x.
    With g = 0 this is exactly the Euler ODE step x + (t_next − t)·v.
    """
    x, v = x.float(), v.float()  # [B, ...]
    t, t_next, g = _bcast(t, x), _bcast(t_next, x), _bcast(g, x)
    h = t - t_next  # h_k > 0
    eps_hat = x + (1.0 - t) * v  # [B, ...]  ε̂ = x + (1 − t)·v (docs/conventions.md §2.1)
    mean = x - h * (v + g ** 2 / (2.0 * t) * eps_hat)  # [B, ...]  μ_θ, docs/conventions.md §3.1
    std = g * torch.sqrt(h)  # s_k = g_k·sqrt(h_k)
    if noise is None:
        noise = torch.randn(x.shape, generator=generator, device=x.device)  # [B, ...]
    x_next = mean + std * noise.float()  # [B, ...]
    return x_next, mean, std


def _reduce(e: torch.Tensor, reduce: str, batch_dims: int) -> torch.Tensor:
    """Mean or sum of per-element values over every dim after the first `batch_dims` dims."""
    if batch_dims < 0 or batch_dims >= e.ndim:
        raise ValueError(f"batch_dims={batch_dims} must leave at least one latent dim of {tuple(e.shape)}")
    dims = tuple(range(batch_dims, e.ndim))
    if reduce == "mean":
        return e.mean(dim=dims)
    if reduce == "sum":
        return e.sum(dim=dims)
    raise ValueError(f"logprob_reduce={reduce!r} is not 'mean' or 'sum'; fix the config")


def log_prob(x_next: torch.Tensor, mean: torch.Tensor, std: float | torch.Tensor, reduce: str = "mean",
             batch_dims: int = 1) -> torch.Tensor:
    """log N(x_next; mean, std²) per element in float32, reduced over the latent dims (docs/conventions.md §3.2).

    The leading `batch_dims` dims are kept (e.g. 1 for [B, C, H, W] -> [B]; 2 for [B, F, C, H, W]
    -> [B, F]); all trailing dims are the latent and are averaged ("mean") or summed ("sum").
    x_next is the stored rollout sample (a constant); mean is recomputed under θ when training.
    std must be > 0 (a step with g = 0 is deterministic and has no density).
    """
    x_next, mean = x_next.detach().float(), mean.float()  # [B, ...]
    std = torch.as_tensor(std, dtype=torch.float32, device=mean.device)
    elem = -((x_next - mean) ** 2) / (2.0 * std ** 2) - torch.log(std) - 0.5 * math.log(2.0 * math.pi)  # [B, ...]
    return _reduce(elem, reduce, batch_dims)


def kl_to_ref(mean: torch.Tensor, mean_ref: torch.Tensor, std: float | torch.Tensor, reduce: str = "mean",
              batch_dims: int = 1) -> torch.Tensor:
    """KL(N(mean, std²) ‖ N(mean_ref, std²)) = (μ − μ_ref)² / (2 std²) per element, reduced like
    log_prob (docs/conventions.md §3.3); equals (h/2)·(g(1−t)/(2t) + 1/g)²·(v − v_ref)² for two sde_step means."""
    std = torch.as_tensor(std, dtype=torch.float32, device=mean.device)
    elem = (mean.float() - mean_ref.detach().float()) ** 2 / (2.0 * std ** 2)  # [B, ...]
    return _reduce(elem, reduce, batch_dims)


# -----------------------------------------------------------------------------
# Timestep selection τ (docs/conventions.md §3.4)


def select_steps(n: int, K: int, tau: float, generator: torch.Generator | None = None,
                 window: int = 0) -> torch.Tensor:
    """DanceGRPO's τ: per trajectory, a uniformly random subset of int(τ·(K − 1)) of the K − 1
    non-final steps (the last step, into t = 0, is never trained); with a `window` (SDEConfig.window)
    exactly its steps, for every trajectory. Returns bool [n, K] on the generator's device (CPU without
    one); the generator is drawn from either way, so what follows in a rollout draws the same noise."""
    if not 0.0 <= tau <= 1.0:
        raise ValueError(f"tau={tau} must be in [0, 1]")
    if K < 1:
        raise ValueError(f"need at least one step, got K={K}")
    if not 0 <= window < K:
        raise ValueError(f"sde.window={window} must be in [0, K-1 = {K - 1}]: the last step is never stochastic")
    n_sel = int(tau * (K - 1))  # K = 10, τ = 0.6 -> 5 of 9
    dev = generator.device if generator is not None else None
    order = torch.rand(n, K - 1, generator=generator, device=dev).argsort(dim=1)  # [n, K-1]  randperm per row
    mask = torch.zeros(n, K, dtype=torch.bool, device=dev)  # [n, K]
    if window:
        mask[:, :window] = True  # [n, K]  the stochastic steps
        return mask
    mask.scatter_(1, order[:, :n_sel], True)  # [n, K]  column K-1 stays False
    return mask


# -----------------------------------------------------------------------------
# Samplers: deterministic for evaluation, stochastic for rollouts


def euler_sample(v_fn: VelocityFn, x1: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
    """Euler ODE from x1 (t = 1) along ts [K+1] to t = 0; x ← x + dt·v with dt < 0. Returns fp32 x0."""
    x = x1.float()  # [B, ...]
    for k in range(ts.shape[0] - 1):
        x = x + (ts[k + 1] - ts[k]) * v_fn(x, ts[k]).float()  # [B, ...]
    return x


def _lam(t: float) -> float:
    """λ_t = log(α_t/σ_t) = log((1 − t)/t), the half-log-SNR; −∞ at t = 1 (noise), +∞ at t = 0."""
    if t >= 1.0:
        return -math.inf
    if t <= 0.0:
        return math.inf
    return math.log((1.0 - t) / t)


def dpm_solver_2m(v_fn: VelocityFn, x1: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
    """DPM-Solver++(2M) for rectified flow (docs/conventions.md §3.6), the paper's evaluation sampler (§5.1).

    α_t = 1 − t, σ_t = t, λ_t = log(α_t/σ_t), data prediction D = x − t·v. With these,
    −α_{k+1}(e^{−h_k} − 1) = 1 − t_{k+1}/t_k, so every update reads x ← (t'/t)·x + (1 − t'/t)·D̃.
    First step first-order (D̃ = D; at t_0 = 1, λ = −∞ so r = ∞ on step 1 too); final step into
    t = 0 returns D. Returns fp32 x0.
    """
    t_list = ts.double().tolist()
    x = x1.float()  # [B, ...]
    d_prev = None
    for k in range(len(t_list) - 1):
        t, t_next = t_list[k], t_list[k + 1]
        d = x - t * v_fn(x, ts[k]).float()  # [B, ...]  D_k = x̂0
        if t_next == 0.0:
            return d  # λ = +∞: the step lands on the data prediction
        h = _lam(t_next) - _lam(t)  # h_k > 0
        h_prev = _lam(t) - _lam(t_list[k - 1]) if k > 0 else math.inf  # ∞ when t_{k−1} = 1 (λ = −∞)
        if d_prev is None or math.isinf(h_prev):
            d_tilde = d  # first order (= Euler for rectified flow)
        else:
            r = h_prev / h
            d_tilde = (1.0 + 1.0 / (2.0 * r)) * d - (1.0 / (2.0 * r)) * d_prev  # [B, ...]  2M correction
        x = (t_next / t) * x + (1.0 - t_next / t) * d_tilde  # [B, ...]
        d_prev = d
    return x


def ode_sample(v_fn: VelocityFn, x1: torch.Tensor, cfg: SDEConfig) -> torch.Tensor:
    """Evaluation sampling (paper §5.1): cfg.eval_solver over cfg.eval_steps on the shifted grid."""
    ts = timesteps(cfg.eval_steps, cfg.shift)  # [eval_steps+1]
    if cfg.eval_solver == "dpm2m":
        return dpm_solver_2m(v_fn, x1, ts)
    if cfg.eval_solver == "euler":
        return euler_sample(v_fn, x1, ts)
    raise ValueError(f"sde.eval_solver={cfg.eval_solver!r} is not 'dpm2m' or 'euler'; fix the config")


def per_group(draw: Callable, n: int, generator) -> torch.Tensor:
    """draw(rows, generator) -> [rows, ...] for a batch of n rows. `generator` is one torch.Generator (or
    None) for the whole batch, or a list of them, one per run of n / len(list) consecutive rows: train.py
    passes one per GRPO group, seeded by (run seed, step, global prompt index), so a group samples the
    same whatever the number of ranks."""
    if not isinstance(generator, (list, tuple)):
        return draw(n, generator)
    rows = n // len(generator)
    if rows * len(generator) != n:
        raise ValueError(f"{n} rows cannot be split evenly over {len(generator)} generators (one per group)")
    return torch.cat([draw(rows, g) for g in generator])  # [n, ...]


def randn(shape: tuple[int, ...], generator=None, device=None) -> torch.Tensor:
    """N(0, I) draws [n, ...] from one generator or one per group of rows (per_group)."""
    return per_group(lambda b, g: torch.randn((b, *shape[1:]), generator=g, device=device), shape[0], generator)


def initial_noise(n: int, group_size: int, shape: tuple[int, ...], same_noise: bool,
                  generator=None, device=None) -> torch.Tensor:
    """x_1 ~ N(0, I) for n rollouts in consecutive groups of group_size -> [n, *shape]. With
    same_noise every member of a group starts from the same x_1 (docs/conventions.md §3.5); the per-step SDE noise
    stays independent, so group members still differ. `generator`: one, or one per group (per_group)."""
    if group_size < 1 or n % group_size != 0:
        raise ValueError(f"{n} rollouts cannot be split into groups of {group_size}")
    if not same_noise:
        return randn((n, *shape), generator, device)  # [n, ...]
    z = per_group(lambda b, g: torch.randn((b // group_size, *shape), generator=g, device=device),
                  n, generator)  # [n_groups, ...]
    return z.repeat_interleave(group_size, dim=0)  # [n, ...]


def sample_sde(v_fn: VelocityFn, x1: torch.Tensor, ts: torch.Tensor, g: torch.Tensor,
               generator=None, reduce: str = "mean",
               batch_dims: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Roll out the SDE of sde_step along ts [K+1] with coefficients g [K] (a GRPO rollout; the NFD world
    model passes its KV-cached velocity of one frame as v_fn).

    Returns (x0 [B, ...], trajectory [K+1, B, ...] with trajectory[0] = x1, means [K, B, ...],
    stds [K], log_probs [batch..., K]) all float32, where batch... are the first `batch_dims` dims
    of x1 (as in log_prob); log_probs[..., k] is the log-density of trajectory[k] → trajectory[k+1]
    (0 where g_k = 0: a deterministic step has none). Noise comes from `generator` (one, or one per group
    of rows: per_group), so a fixed seed replays the rollout.
    """
    K = ts.shape[0] - 1
    if g.shape != (K,):
        raise ValueError(f"g must be [K] = [{K}] (diffusion_coeff(ts, cfg)), got {tuple(g.shape)}")
    x = x1.float()  # [B, ...]
    traj, means, stds, lps = [x], [], [], []
    noisy = (g > 0).tolist()  # [K] read once: a test of g[k] inside the loop would sync a GPU every step
    for k in range(K):
        v = v_fn(x, ts[k])  # [B, ...]
        x, mean, std = sde_step(x, v, ts[k], ts[k + 1], g[k], noise=randn(x.shape, generator, x.device))
        traj.append(x)
        means.append(mean)
        stds.append(std.reshape(()))
        # a deterministic step (g_k = 0) has no density: 0, as for any step the loss does not train
        lps.append(log_prob(x, mean, std, reduce, batch_dims) if noisy[k] else x.new_zeros(x.shape[:batch_dims]))
    return x, torch.stack(traj), torch.stack(means), torch.stack(stds), torch.stack(lps, dim=-1)
