"""Configuration: one dataclass per concern, YAML files and `--section.key=value` override them.

Defaults live in code, next to the stage that uses them (`data.DataConfig`, `idm.IDMConfig`, …),
with a comment on every field. A YAML file overrides only what differs; the command line
overrides the file. Unknown keys, wrong types and values out of a field's range (each dataclass's
`__post_init__`, runtime.check_fields) are errors that name the key, raised before any work
starts. The resolved config is printed once and saved next to the checkpoints.

    python train.py configs/minicraft_ar.yaml --rl.lr=1e-5 --data.train_clips=256
"""
import dataclasses
import sys
import types
import typing
from pathlib import Path
from typing import Literal

import yaml

from data import DataConfig
from grpo import GRPOConfig
from idm import IDMConfig
from model_ar import ARConfig, VQConfig
from model_diffusion import AEConfig, NFDConfig
from runtime import POSITIVE, ConfigError, UsageError, at_least, check_fields, nonempty, within  # noqa: F401  (config.ConfigError, config.UsageError)
from sde_sampler import SDEConfig


def _check(value, tp, key: str):
    """Return `value` as type `tp` or raise ConfigError naming `key`. Ints are accepted where a
    float is expected (YAML writes 1e-5 as a string, so such strings are parsed too); lists are
    accepted for tuples; nothing else is converted."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):             # `X | None`
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _check(value, inner, key)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} items, got {value!r}")
            return tuple(_check(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else typing.Any
        out = [_check(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is Literal:                                     # a choice: checked once, with the choices named
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if tp is typing.Any:
        return value
    if tp is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r} "
                          f"({type(value).__name__})")
    return value


def build(cls, overrides: dict, prefix: str = ""):
    """An instance of dataclass `cls` with its defaults replaced by the nested dict `overrides`."""
    if not isinstance(overrides, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {overrides!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ConfigError(f"unknown key{'s' * (len(unknown) > 1)} "
                          f"{', '.join(prefix + k for k in unknown)}; "
                          f"valid keys here: {', '.join(sorted(names))}")
    kwargs = {}
    for name, value in overrides.items():
        tp, key = hints[name], prefix + name
        if dataclasses.is_dataclass(tp):
            kwargs[name] = build(tp, value, key + ".")
        else:
            kwargs[name] = _check(value, tp, key)
    try:
        return cls(**kwargs)                                  # its __post_init__ checks the ranges
    except ConfigError as e:
        raise ConfigError(prefix + str(e)) from None          # "lr=nan: ..." -> "rl.lr=nan: ..."


def _set(tree: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        node = tree.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--{dotted}: {p} is not a section")
        tree = node
    tree[leaf] = value


def parse(cls, argv: list[str] | None = None):
    """Parse `[CONFIG.yaml] [--section.key=value ...]` into (instance of `cls`, config name).
    The name is the YAML file's stem ("default" without one); it names the run's folder."""
    argv = sys.argv[1:] if argv is None else argv
    tree, name = {}, "default"
    for arg in argv:
        if arg.startswith("--"):
            key, eq, text = arg[2:].partition("=")
            if not eq:
                raise ConfigError(f"{arg}: overrides are written --section.key=value")
            try:
                value = yaml.safe_load(text)                  # 3 -> int, 1e-5 -> float, a -> str
            except yaml.YAMLError as e:
                raise ConfigError(f"{arg}: cannot parse the value: {e}") from None
            _set(tree, key, value)
        elif name != "default":
            raise ConfigError(f"{arg}: only one config file may be given (already have {name})")
        else:
            path = Path(arg)
            if not path.is_file():
                raise ConfigError(f"config file {arg} not found (the shipped ones are in configs/)")
            try:
                loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
            except UnicodeDecodeError as e:                 # a binary file, or text in another encoding
                raise ConfigError(f"{arg}: not a UTF-8 text file ({e.reason} at byte {e.start}); a config is "
                                  f"YAML text (the shipped ones are in configs/)") from None
            except yaml.YAMLError as e:
                raise ConfigError(f"{arg}: not valid YAML: {e}") from None
            if not isinstance(loaded, dict):
                raise ConfigError(f"{arg}: expected sections (a mapping), got {type(loaded).__name__}")
            flags, tree = tree, loaded
            for k, v in flatten(flags):                        # flags given before the file win too
                _set(tree, k, v)
            name = path.stem
    return build(cls, tree), name


def flatten(tree: dict, prefix: str = ""):
    """(dotted key, value) of every leaf of a nested dict: {"rl": {"lr": 1}} -> ("rl.lr", 1)."""
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from flatten(v, prefix + k + ".")
        else:
            yield prefix + k, v


def to_dict(cfg) -> dict:
    """Plain nested dict (tuples become lists) for YAML, JSON and checkpoints."""
    return _plain(dataclasses.asdict(cfg))


def _plain(x):
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def dump(cfg) -> str:
    """The resolved config as YAML text (printed once per run and saved as config.yaml)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


# ---------------------------------------------------------------------------------------------
# The sections of the entry points themselves (train.py, pretrain.py, evaluate.py). Stage-specific
# defaults live in their own files; the run-level ones are here. Each __post_init__ is a table of
# field -> the range it must lie in (runtime.check_fields), checked whenever a config is built.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class RunConfig:
    out: str = ""               # run folder; "" = out/<config name>/
    seed: int = 0               # seeds init, prompts order and every rollout (per step)
    device: Literal["auto", "cpu", "cuda"] = "auto"  # "auto" = cuda if available
    threads: int = 0            # torch CPU threads per process; 0 = torch's default
    world_model: Literal["ar", "nfd"] = "ar"  # MineWorld-style (model_ar.py) or NFD-style (model_diffusion.py)

    def __post_init__(self):
        # run.device "cuda" is checked against the machine by runtime.pick_device, when the run takes its device
        check_fields(self, {"seed": at_least(0, "numpy seeds are >= 0"), "threads": at_least(0, "0 = torch's default")})


@dataclasses.dataclass
class RLConfig:
    steps: int = 40             # GRPO iterations
    prompts: int = 4            # prompts (clips) per iteration, global (Table 6 "samples per iteration": 32)
    group_size: int = 8         # rollouts per prompt G (Tables 6-7: 24)
    lr: float = 1e-4            # peak AdamW lr, cosine decay to 10% (Table 6: 3e-5; Table 7: 1e-5)
    warmup: int = 0             # linear warmup steps
    weight_decay: float = 0.0   # AdamW weight decay
    grad_clip: float = 1.0      # max global gradient norm
    micro_batch: int = 16       # sequences per forward/backward (gradient accumulation); memory knob
    # μ: AdamW steps on each batch of rollouts (GRPO's μ, Shao et al. 2024, Alg. 1). π_old is the policy that
    # sampled, so from the second step on the ratio departs from 1 and Eq. 2's clip bounds the move (clip_frac)
    updates: int = 1
    # steps between re-anchoring π_ref (Eq. 2's KL, grpo.beta > 0) to the current policy, as long-horizon RL recipes
    # reset their reference: the KL then bounds each stretch of K steps, not the whole distance from the base; 0 = never
    ref_reset: int = 0
    # what turns advantages into a step: "grpo", Eq. 2 on the rollout's log-probs (the paper: tokens for AR, SDE
    # transitions for NFD); "nft", DiffusionNFT on the forward process of the clean samples (NFD only; grpo.nft_loss)
    objective: Literal["grpo", "nft"] = "grpo"
    reward: Literal["idm", "pixel"] = "idm"  # "idm" (Eq. 3, RLIR) or "pixel" (Eq. 6, RLVR-World: -(L1 + LPIPS))
    # per frame: "exact" (Eq. 3, all 9 groups), "group" (their mean) or "balanced" (the 7 judged groups, weighted
    # by the inverse frequency of the true label in the prompt pool: a surrogate of macro F1; idm.inverse_reward)
    granularity: Literal["exact", "group", "balanced"] = "exact"
    # "clip": one advantage per rollout from the clip's mean reward (Eq. 1-3); "frame": frame t's entries get
    # the group advantages of every reward its pixels decide, A_t + A_{t+1} (grpo.frame_credit)
    credit: Literal["clip", "frame"] = "clip"
    # "argmax": a group counts when the IDM's deterministic reading matches (Eq. 3); "soft": it scores the IDM's
    # probability of the given label, a reward that moves with the reading's confidence (idm.true_label_probs)
    reading: Literal["argmax", "soft"] = "argmax"
    reward_idm: str = "assets/minicraft/idm_reward.pt"  # IDM that scores rollouts (`idm.save` files, "a.pt,b.pt":
                                # an ensemble whose Eq. 3 terms are averaged)
    vpt_idm: str = ""           # "MODEL,WEIGHTS": OpenAI's 4x_idm.model,4x_idm.weights instead
    prompt_seed: int = 5        # minicraft seed of the RL prompts (disjoint from IDM and eval worlds)
    eval_every: int = 0         # steps between held-out evaluations; 0 = only before and after
    save_every: int = 10        # steps between checkpoints (and at the end, and on SIGTERM)
    max_bad_steps: int = 3      # consecutive non-finite steps (skipped) before the run stops

    def __post_init__(self):
        check_fields(self, {
            "steps": at_least(1), "prompts": at_least(1), "micro_batch": at_least(1), "updates": at_least(1),
            "ref_reset": at_least(0, "0 = never"),
            "group_size": at_least(2, "with one rollout per prompt every advantage of Eq. 1 is 0: nothing is learned"),
            "lr": POSITIVE, "warmup": at_least(0), "weight_decay": at_least(0), "grad_clip": POSITIVE,
            "vpt_idm": ((lambda v: v == "" or (v.count(",") == 1 and "" not in v.split(","))),
                        '"" or "MODEL,WEIGHTS" (4x_idm.model,4x_idm.weights)'),
            "prompt_seed": at_least(0, "numpy seeds are >= 0"), "eval_every": at_least(0, "0 = before and after only"),
            "save_every": at_least(1), "max_bad_steps": at_least(1)})
        if not self.vpt_idm and "" in self.reward_idm.split(","):      # the IDM (or ensemble) that gives Eq. 3
            raise ConfigError(f"reward_idm={self.reward_idm!r}: must name an idm.save file, or several separated by "
                              f"commas (or set vpt_idm)")


@dataclasses.dataclass
class PretrainConfig:
    out: str = ""               # checkpoint path; "" = assets/minicraft/<stage>.pt
    init_from: str = ""         # continue from this checkpoint of the same stage ("" = fresh init)
    steps: int = 1200           # optimizer steps
    batch_size: int = 16        # clips per step (x16 frames each)
    lr: float = 2e-3            # peak AdamW learning rate (linear warmup, cosine decay to 10%)
    warmup: int = 50            # warmup steps
    weight_decay: float = 0.01  # AdamW weight decay
    grad_clip: float = 1.0      # max gradient norm
    eval_every: int = 200       # steps between held-out evaluations
    eval_clips: int = 128       # held-out clips for those evaluations (minicraft seed eval_seed)
    eval_seed: int = 1000       # minicraft seed of the held-out clips (never trained on)
    label_noise: float = 0.0    # ar/nfd: fraction of clips trained on another clip's actions (docs/)
    roundtrip: float = 0.0      # idm: fraction of clips shown through a world-model tokenizer round trip
                                # (vq.init_from / ae.init_from), so the IDM reads generated frames as real ones

    def __post_init__(self):
        check_fields(self, {
            "steps": at_least(1), "batch_size": at_least(1), "lr": POSITIVE, "warmup": at_least(0),
            "weight_decay": at_least(0), "grad_clip": POSITIVE, "eval_every": at_least(1), "eval_clips": at_least(1),
            "eval_seed": at_least(0, "numpy seeds are >= 0"), "label_noise": within(0, 1), "roundtrip": within(0, 1)})


@dataclasses.dataclass
class EvalConfig:
    clips: int = 256  # held-out clips scored per row (MineWorld: up to 500 validation clips)
    seed: int = 1000  # minicraft seed of the held-out clips; never trained on (pretrain.py eval_seed)
    reward_idm: str = "assets/minicraft/idm_reward.pt"  # IDM that gave the RL reward (idm.save format)
    judge_idm: str = "assets/minicraft/idm_judge.pt"  # held-out IDM, never a reward: the `judge_` keys
    lpips_backbone: str = ""  # AlexNet `features` weights (.pth); "" = torch hub cache alexnet-owt-7be5be79.pth
    fvd_features: str = "idm"  # "idm" = judge IDM latent, mean over time; or a path to StyleGAN-V i3d_torchscript.pt
    batch_size: int = 16  # clips per generate / IDM call
    best_of: int = 0  # samples per held-out prompt for the best_of row (reward IDM's pick); 0 = skip that row
    videos: int = 8  # clips shown one after another in side_by_side.mp4 (0 = no video)
    fps: int = 4  # frames per second of side_by_side.mp4
    device: Literal["auto", "cpu", "cuda"] = "auto"  # "auto" = cuda if available (runtime.pick_device)

    def __post_init__(self):
        check_fields(self, {
            "clips": at_least(1), "seed": at_least(0, "numpy seeds are >= 0"),
            "reward_idm": nonempty("an idm.save file"), "judge_idm": nonempty("an idm.save file"),
            "fvd_features": nonempty('"idm" or a file path'), "batch_size": at_least(1),
            "best_of": at_least(0, "0 = no best_of row"), "videos": at_least(0, "0 = no video"), "fps": at_least(1)})


# The whole config: one section per stage, each overridden on the command line as `--section.key=value`.
SECTIONS = {"run": RunConfig, "data": DataConfig, "idm": IDMConfig, "ar": ARConfig, "vq": VQConfig,
            "nfd": NFDConfig, "ae": AEConfig, "sde": SDEConfig, "grpo": GRPOConfig, "rl": RLConfig,
            "pretrain": PretrainConfig, "eval": EvalConfig}
Config = dataclasses.make_dataclass(
    "Config", [(name, cls, dataclasses.field(default_factory=cls)) for name, cls in SECTIONS.items()])
