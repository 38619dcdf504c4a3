"""Config parsing: defaults, YAML and CLI overrides, and the errors that name the key."""
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import config
from config import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@dataclass
class Inner:
    lr: float = 3e-5          # learning rate
    steps: int = 10           # optimizer steps
    size: tuple[int, int] = (64, 64)
    name: str = "a"
    init: str | None = None
    flag: bool = False


@dataclass
class Top:
    rl: Inner = field(default_factory=Inner)
    seed: int = 0


def write(tmp_path, text):
    p = tmp_path / "exp.yaml"
    p.write_text(text)
    return str(p)


def test_defaults_yaml_and_cli_overrides(tmp_path):
    path = write(tmp_path, "rl:\n  lr: 1e-4\n  steps: 5\n  size: [32, 48]\nseed: 3\n")
    cfg, name = config.parse(Top, [path, "--rl.steps=7", "--rl.init=ckpt.pt", "--rl.flag=true"])
    assert name == "exp"
    assert cfg.rl.lr == 1e-4 and isinstance(cfg.rl.lr, float)   # YAML's "1e-4" string
    assert cfg.rl.steps == 7 and cfg.rl.size == (32, 48) and cfg.seed == 3
    assert cfg.rl.init == "ckpt.pt" and cfg.rl.flag is True
    assert cfg.rl.name == "a"                                   # untouched default
    assert config.parse(Top, [])[0] == Top() and config.parse(Top, [])[1] == "default"
    # ints are fine where floats are expected; the dump round-trips through YAML
    cfg, _ = config.parse(Top, ["--rl.lr=1"])
    assert cfg.rl.lr == 1.0 and isinstance(cfg.rl.lr, float)
    assert config.build(Top, config.to_dict(cfg)) == cfg


@pytest.mark.parametrize("args, needle", [
    (["--rl.lrr=1"], "unknown key rl.lrr"),
    (["--sede=1"], "unknown key sede"),
    (["--rl.steps=1.5"], "rl.steps: expected int"),
    (["--rl.steps=true"], "rl.steps: expected int"),
    (["--rl.flag=1"], "rl.flag: expected bool"),
    (["--rl.size=[1, 2, 3]"], "rl.size: expected 2 items"),
    (["--rl.size=[1, x]"], "rl.size[1]: expected int"),
    (["--rl=3"], "rl: expected a mapping"),
    (["--rl.steps"], "--section.key=value"),
    (["missing.yaml"], "config file missing.yaml not found"),
])
def test_errors_name_the_key(args, needle):
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        config.parse(Top, args)


def test_bad_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        config.parse(Top, [write(tmp_path, "rl: [unclosed\n")])
    with pytest.raises(ConfigError, match="expected sections"):
        config.parse(Top, [write(tmp_path, "- 1\n- 2\n")])
    with pytest.raises(ConfigError, match="unknown key rl.bogus"):
        config.parse(Top, [write(tmp_path, "rl:\n  bogus: 1\n")])


def test_config_name_is_the_yaml_stem(tmp_path):
    """The name train.py puts the run folder under (out/<name>/): the file's stem, whatever its folder and
    wherever the overrides stand; "default" without a file."""
    path = tmp_path / "runs" / "ar.lr3e-5.yaml"
    path.parent.mkdir()
    path.write_text("seed: 1\n")
    assert config.parse(Top, [str(path)])[1] == "ar.lr3e-5"              # only the last suffix is dropped
    assert config.parse(Top, ["--seed=2", str(path), "--rl.steps=3"])[1] == "ar.lr3e-5"
    assert config.parse(Top, ["--seed=2"])[1] == "default"


SHIPPED = {"mineworld_300m": "ar", "mineworld_700m": "ar", "mineworld_1200m": "ar", "minicraft_ar": "ar",
           "minicraft_nfd": "nfd", "nfd_310m": "nfd", "nfd_774m": "nfd",
           "pretrain_idm_judge": "ar", "pretrain_idm_reward": "ar",  # IDM pretraining ignores run.world_model
           "laptop_ar": "ar", "laptop_nfd": "nfd", "laptop_idm_judge": "ar", "laptop_idm_reward": "ar"}


def test_shipped_configs_are_the_listed_ones():
    assert sorted(p.stem for p in CONFIGS.glob("*.yaml")) == sorted(SHIPPED)


@pytest.mark.parametrize("stem, world_model", sorted(SHIPPED.items()))
def test_every_shipped_config_parses(stem, world_model):
    """Each shipped config names its run folder out/<stem>/ (no run.out) and picks the intended paradigm."""
    cfg, name = config.parse(config.Config, [str(CONFIGS / f"{stem}.yaml")])
    assert name == stem and cfg.run.out == "" and cfg.run.world_model == world_model
