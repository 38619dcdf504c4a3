"""The RLVR-World baseline reward: each generated frame is scored against its ground-truth frame in pixels,
r_t = -(L1(x_hat_t, x_t) + LPIPS(x_hat_t, x_t)) for t = 1..15 (Wu et al. 2025, "RLVR-World: Training World
Models with Reinforcement Learning"; Eq. 6 in the README and docs/). RLIR's inverse reward (Eq. 3, idm.py) is
compared against it: `--rl.reward=pixel` in train.py, the `pixel` variant of compare.py.

LPIPS (Zhang et al. 2018) is both a term of this reward and a visual-quality metric of the evaluation
(evaluate.py), so the network is loaded and applied here and both import it. Nothing is downloaded: the
AlexNet trunk comes from a local file, and without one the reward is L1 alone (the reason is returned).
"""
import os
import warnings

import torch

from runtime import read_checkpoint

# ----------------------------------------------------------------------------------------------
# LPIPS: AlexNet features with the lpips package's v0.1 linear heads, from local weights only

def alexnet_cache_path() -> str:
    """Where torchvision keeps the ImageNet AlexNet weights (honours $TORCH_HOME)."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", "alexnet-owt-7be5be79.pth")


def load_lpips(backbone: str) -> tuple[torch.nn.Module | None, str]:
    """LPIPS (Zhang et al. 2018; AlexNet trunk, v0.1 linear heads shipped inside the `lpips` package) ->
    (module, "") or (None, the reason it is unavailable). Nothing is downloaded: the trunk is built
    random (pnet_rand=True) and then gets the AlexNet `features` weights from `backbone` (a
    torchvision alexnet state dict, with or without the `features.` prefix; "" = the torch hub cache)."""
    path = backbone or alexnet_cache_path()
    try:
        import lpips
    except ImportError:
        return None, "lpips unavailable: the `lpips` package is not installed (pip install -r requirements.txt)"
    if not os.path.isfile(path):
        return None, (f"lpips unavailable: no AlexNet weights at {path}; put torchvision's "
                      f"alexnet-owt-7be5be79.pth there or pass --eval.lpips_backbone=PATH")

    state = read_checkpoint(path, "eval.lpips_backbone")  # a damaged file is an error, not a missing metric
    state = state if isinstance(state, dict) else {}
    features = {k.removeprefix("features."): v for k, v in state.items() if not k.startswith("classifier.")}
    with warnings.catch_warnings():  # torchvision's note on the deprecated `pretrained=False` argument
        warnings.simplefilter("ignore")
        model = lpips.LPIPS(net="alex", pretrained=True, pnet_rand=True, spatial=True, verbose=False)
    # lpips splits AlexNet's `features` into net.slice1..5 but keeps torchvision's layer indices:
    # net.slice2.3.weight is features.3.weight.
    want = model.net.state_dict()
    missing = [k for k in want if k.split(".", 1)[1] not in features]
    if missing:
        return None, (f"lpips unavailable: {path} is not an AlexNet `features` state dict (missing "
                      f"{[k.split('.', 1)[1] for k in missing]})")
    model.net.load_state_dict({k: features[k.split(".", 1)[1]] for k in want})
    return model.eval(), ""


@torch.no_grad()
def lpips_distance(model: torch.nn.Module, gen: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """LPIPS per frame, frames [N, H, W, 3] in [0, 1] -> [N]: the spatial=True distance map (each layer's
    map upsampled to the frame size) averaged over pixels, as MineWorld's video-metrics library does."""
    x = gen.float().permute(0, 3, 1, 2) * 2 - 1  # [N, 3, H, W] in [-1, 1], as lpips expects
    y = gt.float().permute(0, 3, 1, 2) * 2 - 1  # [N, 3, H, W]
    return model(x, y).mean(dim=(1, 2, 3))  # [N, 1, H, W] map -> [N]


# ----------------------------------------------------------------------------------------------
# The reward

@torch.no_grad()
def pixel_reward(frames: torch.Tensor, gt: torch.Tensor, lpips_fn: torch.nn.Module | None) -> torch.Tensor:
    """Eq. 6 per generated frame: frames and gt uint8 [B, 16, H, W, 3] -> -(L1 + LPIPS) float [B, 15] for
    frames 1..15 (frame 0 is the given context frame, never scored). L1 is the mean absolute difference of
    the [0, 1] pixel values; LPIPS is added where `lpips_fn` (from `load_lpips`) is given, else L1 alone.
    A clip's reward is the mean of its frames' rewards (train.py)."""
    x = frames[:, 1:].float() / 255  # [B, 15, H, W, 3] in [0, 1]
    y = gt[:, 1:].to(x.device).float() / 255  # [B, 15, H, W, 3]
    loss = (x - y).abs().mean((2, 3, 4))  # [B, 15] L1 per frame
    if lpips_fn is not None:
        # LPIPS takes frames, not clips: fold time into the batch and back.
        lp = lpips_distance(lpips_fn.to(x.device), x.flatten(0, 1), y.flatten(0, 1))  # [B * 15]
        loss = loss + lp.view(loss.shape)  # [B, 15]
    return -loss  # higher is better: 0 for a perfect frame
