"""Shared fixtures: tiny reward/judge IDMs and a tiny AR world model saved to files, and the configs and
command lines that point train.py at them (module functions, imported by the tests that build runs)."""
import json

import pytest
import torch

import config
import idm as idm_lib
import model_ar


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    """A folder with reward.pt and judge.pt (tiny IDMs) and ar.pt (a tiny AR world model, random weights)."""
    d = tmp_path_factory.mktemp("assets")
    torch.manual_seed(0)
    small = idm_lib.IDMConfig(hidsize=32, attention_heads=2)
    for name in ("reward", "judge"):
        idm_lib.save(idm_lib.IDM.from_config(small), str(d / f"{name}.pt"))
    cfg = tiny_cfg(d, init=False)
    model = model_ar.build_world_model(cfg.ar, cfg.vq)
    torch.save({"state_dict": model.state_dict()}, d / "ar.pt")
    return d


def tiny_cfg(d, init=True, extra=()) -> config.Config:
    """The run config of the tiny AR world model in folder d (2 prompts x G 2, 2 steps, 2 held-out clips)."""
    args = [f"--rl.reward_idm={d}/reward.pt", f"--eval.reward_idm={d}/reward.pt",
            f"--eval.judge_idm={d}/judge.pt", "--ar.hidden=32", "--ar.intermediate=64",
            "--ar.heads=2", "--ar.kv_heads=1", "--ar.layers=1", "--ar.n_codes=16",
            "--ar.vocab_size=86", "--vq.codebook_size=16", "--vq.channels=8", "--vq.code_dim=8",
            "--data.max_clips=4", "--eval.clips=2", "--eval.videos=0", "--rl.prompts=2",
            "--rl.group_size=2", "--rl.micro_batch=2", "--rl.steps=2", "--rl.lr=1e-2",
            "--run.threads=1", *extra]
    if init:
        args.append(f"--ar.init_from={d}/ar.pt")
    return config.parse(config.Config, args)[0]


def tiny_args(d, out, steps) -> list[str]:
    """train.py's command line for tiny_cfg(d), writing to `out`, for `steps` steps."""
    return [*[f"--{k}" for k in flat(config.to_dict(tiny_cfg(d)))], f"--run.out={out}", f"--rl.steps={steps}"]


def flat(tree, prefix=""):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from flat(v, prefix + k + ".")
        elif v is not None:
            yield f"{prefix}{k}={json.dumps(v)}"


def tiny_nfd_args(out, steps) -> list[str]:
    """train.py's command line for a tiny NFD world model from random weights (seeded by run.seed) on the
    embedded world, 2 prompts x G 2 anchored by a KL, the pixel reward, writing to `out`, for `steps` steps."""
    return ["configs/minicraft_nfd.yaml", "--nfd.init_from=scratch", "--ae.init_from=", "--nfd.hidden=32",
            "--nfd.mlp=48", "--nfd.heads=2", "--nfd.layers=1", "--nfd.frames=16", "--sde.steps=3",
            "--sde.eval_steps=2", "--rl.prompts=2", "--rl.group_size=2", "--rl.micro_batch=4", f"--rl.steps={steps}",
            "--rl.lr=1e-2", "--rl.reward=pixel", "--grpo.beta=0.1", "--data.max_clips=2", "--eval.clips=2",
            "--eval.videos=0", "--run.threads=1", f"--run.out={out}"]
