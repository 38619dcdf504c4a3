"""What every entry point shares and no stage owns: errors a user must fix and the one line they print, the
range checks of the config fields, output folders checked before any work, checkpoint files read safely and
written atomically, the device, torchrun, the learning-rate schedule.

One code path for CPU and 1..N GPUs (docs/conventions.md §7.1): torchrun sets RANK, WORLD_SIZE and
LOCAL_RANK; gloo on CPU, nccl on GPU; rank 0 prints, saves and evaluates.
"""
import contextlib
import hashlib
import dataclasses
import fcntl
import json
import math
import os
import random
import re
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist


class UsageError(Exception):
    """An input the user must fix: bad config, missing/unreadable/truncated file, mismatched checkpoint; the
    message names the culprit and what to do. `cli` prints it as one line, without a traceback."""


class ConfigError(UsageError, ValueError):
    """A config file or override that does not fit the dataclasses, or a checkpoint that does not fit the
    configured model; the message names the key or the file."""


# The OSError subclasses a user's path causes (a missing file, a folder where a file goes or the reverse, an existing
# file in the way, no permission): like a UsageError, they are the user's to fix and print as one line.
PATH_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, FileExistsError, PermissionError)


def cli(main) -> None:
    """Run `main(sys.argv[1:])` as a command. `-h` or `--help` anywhere prints the entry module's docstring (its
    usage) and exits 0, before any work. An error the user must fix is one line on stderr and exit status 2
    (as argparse does); Ctrl-C is one line and exit status 130; anything else is a bug and keeps its traceback.
    (train.py's GRPO loop catches Ctrl-C itself: it saves a checkpoint and exits 0.)"""
    argv = sys.argv[1:]
    if "-h" in argv or "--help" in argv:
        print((sys.modules[main.__module__].__doc__ or "").strip())
        sys.exit(0)
    try:
        main(argv)
    except (UsageError, *PATH_ERRORS) as e:
        message = " ".join(str(e).split())                    # YAML and key-list messages span lines
        print(f"{Path(sys.argv[0]).name}: error: {message}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:                                 # Ctrl-C outside a loop that saves on it
        print(f"\n{Path(sys.argv[0]).name}: interrupted", file=sys.stderr)
        sys.exit(130)


# ---------------------------------------------------------------------------------------------
# Range checks of the config dataclasses. Each dataclass's __post_init__ calls check_fields with a table
# {field: (test, what the value must be)}; the conditions below are the common entries of those tables.
# ---------------------------------------------------------------------------------------------


def at_least(n: int, why: str = "") -> tuple:
    """The condition value >= n (a count, a size, a seed), with an optional reason for the message."""
    return (lambda v: v >= n), f">= {n}" + (f" ({why})" if why else "")


def within(lo: float, hi: float) -> tuple:
    """The condition lo <= value <= hi (a probability, a fraction)."""
    return (lambda v: lo <= v <= hi), f"in [{lo}, {hi}]"


def nonempty(what: str) -> tuple:
    """The condition that a text field (a path, a name) is not blank; `what` says what it must name."""
    return (lambda v: v.strip() != ""), what


POSITIVE = (lambda v: v > 0), "> 0"                             # a learning rate, a temperature, a norm bound
SIZES = (lambda v: len(v) > 0 and all(x >= 1 for x in v)), "sizes >= 1"   # a tuple of sizes (pixels, channels)


def check_fields(cfg, rules: dict) -> None:
    """Check the fields of config dataclass `cfg` before any work: every float field must be finite (a NaN passes
    no comparison, so no rule below would catch it, and it would reach the optimizer), and each field in `rules`
    ({name: (test, what)}) must pass its test. A None value is a field's documented "off" and skips its rule.
    Raises ConfigError "name=value: must be what"; config.build puts the section in front ("rl.lr=nan: must be
    a finite number > 0")."""
    for f in dataclasses.fields(cfg):
        value, (test, what) = getattr(cfg, f.name), rules.get(f.name, (None, ""))
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{f.name}={value}: must be a finite number {what}".rstrip())
        if test is not None and value is not None and not test(value):
            raise ConfigError(f"{f.name}={value!r}: must be {what}")


def read_checkpoint(path: str, key: str):
    """torch.load(path) onto the CPU with weights_only=True (tensors and plain containers: no code runs). A missing
    file is a FileNotFoundError and an unreadable one a UsageError, both naming the file and the config `key`."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{key}: no checkpoint at {path}; point {key} at an existing file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a damaged file raises any of RuntimeError, EOFError, KeyError, UnpicklingError, OSError
        found = re.search(r"WeightsUnpickler error:\s*(.+)", str(e))    # weights_only buries the cause in advice
        lines = (found.group(1) if found else str(e)).strip().splitlines()
        detail = type(e).__name__ + (f": {lines[0].split('. ')[0]}" if lines else "")
        raise UsageError(f"{path}: cannot read the checkpoint (truncated, not a torch file, or not loadable with "
                         f"weights_only=True: {detail}); re-create it or point {key} at another file") from None


def _few(keys: list) -> str:
    """"(n): [the first 5]": a key list short enough for a one-line error."""
    return f"({len(keys)}): {keys[:5]}" + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")


def load_strict(module: torch.nn.Module, state_dict: dict, source: str, fix: str, assign: bool = False) -> None:
    """module.load_state_dict(state_dict), but only when both hold the same keys with the same shapes. Otherwise
    a ConfigError (a UsageError: one line from `cli`) "{source} does not fit this model: missing keys (n): [...];
    unexpected keys (n): [...]; mis-shaped keys (n): [key: file (..) vs model (..)]; {fix}", naming the first 5
    keys of each non-empty list. `fix` says what to do, e.g. which config the file was saved with.
    dtypes are cast to the module's; assign=True hands the module the file's tensors instead (a module built
    on the meta device, which has no storage to copy into)."""
    own = module.state_dict()  # names and shapes; meta tensors are enough
    missing = sorted(k for k in own if k not in state_dict)
    unexpected = sorted(k for k in state_dict if k not in own)
    # A non-tensor under a model key (a foreign file) is reported by its type rather than failing on .shape.
    shapes = sorted(f"{k}: file {tuple(v.shape) if torch.is_tensor(v) else type(v).__name__} vs model "
                    f"{tuple(own[k].shape)}" for k, v in state_dict.items()
                    if k in own and not (torch.is_tensor(v) and v.shape == own[k].shape))
    problems = [f"{what} keys {_few(keys)}" for what, keys in
                (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shapes)) if keys]
    if problems:
        raise ConfigError(f"{source} does not fit this model: {'; '.join(problems)}; {fix}")
    module.load_state_dict(state_dict, assign=assign)


def pick_device(device: str, key: str = "run.device") -> torch.device:
    """The device of config field `key` ("auto", "cpu" or "cuda"): "auto" means CUDA when present; under torchrun
    each process takes GPU LOCAL_RANK. "cuda" on a machine without CUDA is a UsageError naming `key`."""
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"{key}=cuda: this machine has no CUDA device (torch.cuda.is_available() is False); "
                         f"use {key}=auto or cpu")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if use_cuda else "cpu")


def output_folder(path: str | Path, key: str) -> Path:
    """`path`, the output folder of the command-line flag or config field `key`, checked before any work: it is an
    existing folder, or one that mkdir can make (its nearest existing ancestor is a writable folder, no file is in
    the way). Raises a UsageError naming `key` and the file in the way."""
    path = Path(path)
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                raise UsageError(f"{key}={path}: {p} is a file, not a folder; give a folder path")
            if not os.access(p, os.W_OK | os.X_OK):
                raise UsageError(f"{key}={path}: cannot write into {p} (permission denied)")
            break
    return path


def setup(run) -> tuple[torch.device, int, int]:
    """Device, rank and world size of this process (run: config.RunConfig); joins the process group when
    launched by torchrun and sets the CPU threads (run.threads, 0 = torch's default)."""
    device = pick_device(run.device)
    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if run.threads:
        torch.set_num_threads(run.threads)
    return device, *rank_world()


def rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def lr_factor(step: int, steps: int, warmup: int) -> float:
    """Linear warmup over `warmup` steps, then cosine decay to 10 % at `steps` (the multiplier of the peak lr)."""
    if step < warmup:
        return (step + 1) / warmup
    p = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p))


def save_atomic(obj, path: str | Path) -> None:
    """torch.save through a temp file, fsync and rename: a kill at any moment leaves the old file or the new
    one, never a torn one. The rename itself is made durable by an fsync of the folder."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def hold(out: Path, stack: contextlib.ExitStack) -> None:
    """Create the run folder and lock it until `stack` closes: a second run on the same folder stops with one
    line instead of interleaving its log and checkpoints with this one's."""
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out, os.O_RDONLY)                             # a folder can hold an advisory lock, too
    stack.callback(os.close, fd)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise UsageError(f"another run is using {out}; wait for it to end or choose another --run.out") from None


def trim_log(path: Path, step: int) -> None:
    """On resume, keep log rows 1..step: a killed run may have logged steps past its checkpoint,
    and its last line may be torn."""
    rows = []
    for line in path.read_text().splitlines() if path.exists() else ():
        with contextlib.suppress(json.JSONDecodeError, KeyError, TypeError):
            if json.loads(line)["step"] <= step:
                rows.append(line + "\n")
    path.write_text("".join(rows))


# ---------------------------------------------------------------------------------------------
# Data parallelism and checkpoints, shared by train.py and pretrain.py.
# ---------------------------------------------------------------------------------------------
def average_gradients(params: list) -> None:
    """Data parallelism by hand (DDP's all-reduce without its hooks, so the world model's calls see the plain
    module and any loss works): one flat all-reduce of every gradient, divided by the number of ranks. A
    parameter the loss did not use gets a zero gradient, so every rank reduces tensors of the same size."""
    world = rank_world()[1]
    if world == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    flat = torch.cat([g.flatten() for g in grads])            # [n_params]
    dist.all_reduce(flat)
    flat /= world
    for g, part in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(part.view_as(g))


def across_ranks(values: list[float], op: str, device) -> list[float]:
    """Element-wise "min", "max" or "sum" of `values` over ranks, so every rank takes the same
    decision (a rank that skipped a backward alone would hang the gradient all-reduce)."""
    if not dist.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)    # [len(values)]
    dist.all_reduce(t, {"min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX, "sum": dist.ReduceOp.SUM}[op])
    return t.tolist()


def first_nonfinite(named: dict, device) -> str | None:
    """Name of the first tensor in `named` with a NaN/inf on any rank (None entries pass), or None."""
    ok = across_ranks([float(v is None or bool(torch.isfinite(v).all())) for v in named.values()],
                      "min", device)
    return next((name for name, flag in zip(named, ok) if not flag), None)


def fingerprint(model) -> str:
    """sha256 of the weights' bytes: equal on every rank iff the replicas stayed identical."""
    h = hashlib.sha256()
    for key, v in sorted(model.state_dict().items()):
        h.update(key.encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def rng_state() -> dict:
    """Every RNG state as tensors and plain types (loadable with weights_only=True)."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, words, py_gauss = random.getstate()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": torch.from_numpy(keys.astype(np.int64)), "numpy_pos": [pos, has_gauss, gauss],
            "python": list(words), "python_gauss": py_gauss}


def set_rng_state(rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available() and rng["cuda"]:
        torch.cuda.set_rng_state_all(rng["cuda"])
    np.random.set_state(("MT19937", rng["numpy"].numpy().astype(np.uint32), *rng["numpy_pos"]))
    random.setstate((3, tuple(rng["python"]), rng["python_gauss"]))


def save_checkpoint(path: str | Path, model, opt, sched, step: int, cfg: dict, ref=None) -> None:
    """Everything a resume needs, as a plain dict written atomically: weights, optimizer, scheduler (None when
    the caller sets the lr itself), step, the resolved config (config.to_dict), every RNG state and, when it is
    no longer the base, the reference model's weights (`ref`). The data position is `step`: the batches and the
    rollout noise are pure functions of (seed, step)."""
    save_atomic({"model": model.state_dict(), "optimizer": opt.state_dict(),
                 "scheduler": sched.state_dict() if sched is not None else {}, "step": step, "config": cfg,
                 "rng": rng_state(), **({"ref": ref.state_dict()} if ref is not None else {})}, path)


def check_checkpoint(state, path: str) -> None:
    """A save_checkpoint dict, or one line naming what it lacks."""
    missing = [k for k in ("model", "optimizer", "scheduler", "step", "rng", "config") if k not in state]
    if missing:
        raise UsageError(f"{path} lacks {missing}: not a checkpoint of this program; delete it or point to another")


def load_checkpoint(state: dict, path: str, model, opt, sched, ref=None) -> int:
    """Restore a save_checkpoint dict (read with read_checkpoint) into model (strictly: load_strict), optimizer,
    scheduler, the RNGs and, if it holds one, `ref`; -> the step it was saved at."""
    check_checkpoint(state, path)
    load_strict(model, state["model"], path, "delete it or rerun with the config it was saved with")
    if ref is not None and "ref" in state:
        load_strict(ref, state["ref"], path, "delete it or rerun with the config it was saved with")
    opt.load_state_dict(state["optimizer"])
    if sched is not None:
        sched.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return state["step"]
