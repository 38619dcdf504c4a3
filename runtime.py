"""What every entry point shares and no stage owns: errors a user must fix and the one line they print, the
range checks of the config fields, output folders checked before any work, checkpoint files read safely and
written atomically, the device, torchrun, the learning-rate schedule.

One code path for CPU and 1..N GPUs (DESIGN.md "Conventions"): torchrun sets RANK, WORLD_SIZE and
LOCAL_RANK; gloo on CPU, nccl on GPU; rank 0 prints, saves and evaluates.
"""
import contextlib
import dataclasses
import json
import math
import os
import re
import sys
from pathlib import Path

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
    (as argparse does); anything else is a bug and keeps its traceback."""
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


def trim_log(path: Path, step: int) -> None:
    """On resume, keep log rows 1..step: a killed run may have logged steps past its checkpoint,
    and its last line may be torn."""
    rows = []
    for line in path.read_text().splitlines() if path.exists() else ():
        with contextlib.suppress(json.JSONDecodeError, KeyError, TypeError):
            if json.loads(line)["step"] <= step:
                rows.append(line + "\n")
    path.write_text("".join(rows))
