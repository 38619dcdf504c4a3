"""Every entry point turns a mistake the user must fix into one line on stderr and exit status 2, with no
traceback (runtime.cli); a bug keeps its traceback. Each command fails before any heavy work and writes nothing;
`--help` prints the command's usage."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bench
import compare
import config
import data
import evaluate
import minicraft
import pretrain
import runtime
import train

ROOT = Path(__file__).resolve().parents[1]
FEW = ["--data.max_clips=4", "--eval.clips=4", "--run.threads=1"]  # little data to make before the model loads


def write(tmp: Path, name: str, text: str) -> str:
    (tmp / name).write_text(text)
    return str(tmp / name)


def truncated(tmp: Path) -> str:
    blob = (ROOT / "assets/minicraft/ar_base.pt").read_bytes()
    (tmp / "half.pt").write_bytes(blob[:len(blob) // 2])
    return str(tmp / "half.pt")


# (script, argv given tmp_path, what the line must name)
CASES = {
    "missing_config": ("train.py", lambda t: ["configs/nope.yaml"], ["configs/nope.yaml"]),
    "unknown_yaml_key": ("train.py", lambda t: [write(t, "typo.yaml", "rl:\n  nope: 1\n")], ["rl.nope"]),
    "unknown_flag": ("train.py", lambda t: ["--rl.nope=1"], ["rl.nope"]),
    "malformed_yaml": ("train.py", lambda t: [write(t, "broken.yaml", "rl: [1, 2\n")], ["broken.yaml", "YAML"]),
    "wrong_type": ("train.py", lambda t: ["--rl.steps=abc"], ["rl.steps", "'abc'"]),
    "other_paradigm": ("train.py", lambda t: ["configs/minicraft_ar.yaml", *FEW,
                                              "--ar.init_from=assets/minicraft/nfd_base.pt"],
                       ["nfd_base.pt", "ar.init_from", "config it was trained with"]),
    "truncated_checkpoint": ("train.py", lambda t: ["configs/minicraft_ar.yaml", *FEW,
                                                    f"--ar.init_from={truncated(t)}"],
                             ["half.pt", "cannot read the checkpoint", "ar.init_from"]),
    "missing_data_folder": ("train.py", lambda t: ["--data.source=/nonexistent/clips"], ["/nonexistent/clips"]),
    "pretrain_missing_config": ("pretrain.py", lambda t: ["idm", "configs/nope.yaml"], ["configs/nope.yaml"]),
    "evaluate_missing_data": ("evaluate.py", lambda t: ["--out", str(t / "eval"), "--data", "/nonexistent/clips"],
                              ["/nonexistent/clips"]),
    "compare_unknown_variant": ("compare.py", lambda t: ["--variants=rlir,bogus"], ["bogus"]),
    "bench_wrong_type": ("bench.py", lambda t: ["--rl.group_size=many"], ["rl.group_size"]),
    "minicraft_unwritable_sheet": ("minicraft.py", lambda t: ["--sheet", "/nonexistent/sheet.png"],
                                   ["/nonexistent/sheet.png"]),
}


@pytest.mark.parametrize("case", CASES)
def test_a_mistake_is_one_line_and_exit_status_2(case, tmp_path):
    script, argv, names = CASES[case]
    argv = argv(tmp_path) + ([f"--run.out={tmp_path / 'run'}"] if script == "train.py" else [])
    r = subprocess.run([sys.executable, script, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120)
    # stderr also carries the progress bars of the work done before the mistake was found (data, models)
    lines = [t for t in r.stderr.replace("\r", "\n").splitlines() if t.strip() and "it/s" not in t
             and "clip/s" not in t and not t.lstrip().startswith(("clips (", "eval "))]
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    line = lines[0]
    assert line.startswith(f"{script}: error: ") and all(n in line for n in names), line


@pytest.mark.parametrize("error", [RuntimeError("a bug"), ValueError("a bug"), KeyError("a bug")])
def test_a_bug_keeps_its_traceback(error, monkeypatch):
    def main(argv):
        raise error

    monkeypatch.setattr(sys, "argv", ["tool.py"])
    with pytest.raises(type(error), match="a bug"):
        runtime.cli(main)


def test_a_usage_error_is_printed_on_one_line(monkeypatch, capsys):
    def main(argv):
        assert argv == ["--x=1"]
        raise config.UsageError("x.pt does not fit:\n  missing keys (1)")

    monkeypatch.setattr(sys, "argv", ["tool.py", "--x=1"])
    with pytest.raises(SystemExit) as e:
        runtime.cli(main)
    assert e.value.code == 2
    assert capsys.readouterr().err == "tool.py: error: x.pt does not fit: missing keys (1)\n"


# ---------------------------------------------------------------------------------------------
# The same, in this process: every value is checked before any work (config dataclasses' __post_init__,
# runtime.pick_device, each entry point's own flags), so these calls return in milliseconds.
# ---------------------------------------------------------------------------------------------
T = ["--rl.steps=1", "--rl.prompts=1", "--rl.group_size=2", "--eval.clips=2", "--eval.videos=0"]


def latin1(tmp: Path) -> str:
    (tmp / "latin1.yaml").write_bytes("rl:\n  steps: 1  # réglé\n".encode("latin-1"))
    return str(tmp / "latin1.yaml")


def binary(tmp: Path) -> str:
    (tmp / "blob.yaml").write_bytes(bytes(range(256)))
    return str(tmp / "blob.yaml")


def a_file(tmp: Path) -> str:
    (tmp / "a_file").write_text("not a folder\n")
    return str(tmp / "a_file")


def a_folder(tmp: Path) -> str:
    (tmp / "a_folder").mkdir()
    return str(tmp / "a_folder")


# (module, argv given tmp_path, what the line must name)
IN_PROCESS = {
    **{f"train_{flag}": (train, lambda t, flag=flag: [*T, f"--{flag}"], [flag]) for flag in [
        "run.seed=-5", "run.threads=-1", "run.device=cuda", "grpo.eps=-1", "sde.steps=0", "eval.batch_size=0",
        "eval.best_of=-2", "eval.videos=-1", "eval.clips=0", "rl.lr=nan", "rl.lr=-1", "rl.save_every=0",
        "rl.grad_clip=-1", "rl.group_size=1", "rl.lr=inf", "data.height=63", "ar.top_p=0"]},
    "train_latin1_config": (train, lambda t: [latin1(t), *T], ["latin1.yaml", "UTF-8"]),
    "train_binary_config": (train, lambda t: [binary(t), *T], ["blob.yaml"]),
    "train_nft_on_ar": (train, lambda t: ["configs/laptop_ar.yaml", *T, "--rl.objective=nft"],
                        ["rl.objective=nft", "run.world_model=nfd"]),
    "train_nft_beta": (train, lambda t: [*T, "--grpo.nft_beta=0"], ["grpo.nft_beta=0"]),
    "compare_seeds": (compare, lambda t: ["--seeds=a"], ["--seeds=a"]),
    "compare_jobs": (compare, lambda t: ["--jobs=0"], ["--jobs=0"]),
    "compare_bad_override": (compare, lambda t: ["configs/laptop_ar.yaml", "--seeds=0", "--rl.lr=nan"],
                             ["rl.lr=nan"]),
    "compare_bad_config": (compare, lambda t: [write(t, "typo.yaml", "rl:\n  stepz: 1\n"), "--seeds=0"],
                           ["rl.stepz"]),
    "compare_out_is_a_file": (compare, lambda t: [f"--out={a_file(t)}"], ["--out", "a_file"]),
    "bench_group_size": (bench, lambda t: ["configs/laptop_ar.yaml", "--rl.group_size=0"], ["rl.group_size=0"]),
    "clips_height": (data, lambda t: ["--out", str(t / "D"), "--clips", "1", "--height", "63"], ["--height=63", "16"]),
    "clips_out_is_a_file": (data, lambda t: ["--out", a_file(t), "--clips", "1"], ["--out", "a_file"]),
    "clips_count": (data, lambda t: ["--out", str(t / "D"), "--clips", "0"], ["--clips=0"]),
    "clips_seed": (data, lambda t: ["--out", str(t / "D"), "--seed", "-1"], ["--seed=-1"]),
    "clips_not_a_number": (data, lambda t: ["--out", str(t / "D"), "--clips", "x"], ["--clips", "'x'"]),
    "clips_no_out": (data, lambda t: ["--clips", "1"], ["--out"]),
    "minicraft_height": (minicraft, lambda t: ["--bench", "--clips", "1", "--height", "63"], ["--height=63", "16"]),
    "minicraft_nothing_to_do": (minicraft, lambda t: ["--clips", "1"], ["nothing to do"]),
    "pretrain_batch_size": (pretrain, lambda t: ["idm", "configs/laptop_idm_judge.yaml", "--pretrain.batch_size=0"],
                            ["pretrain.batch_size=0"]),
    "pretrain_out_is_a_folder": (pretrain, lambda t: ["idm", f"--pretrain.out={a_folder(t)}"],
                                 ["pretrain.out", "a_folder"]),
    "pretrain_missing_init": (pretrain, lambda t: ["idm", f"--pretrain.init_from={t / 'nope.pt'}"],
                              ["pretrain.init_from", "nope.pt"]),
    "evaluate_out_is_a_file": (evaluate, lambda t: ["--out", a_file(t)], ["--out", "a_file"]),
    "evaluate_missing_generated": (evaluate, lambda t: ["--out", str(t / "E"), "--generated", str(t / "gen")],
                                   ["--generated", "gen"]),
    "evaluate_eval_field": (evaluate, lambda t: ["--out", str(t / "E"), "--eval.fps=0"], ["eval.fps=0"]),
    "evaluate_cuda": (evaluate, lambda t: ["--out", str(t / "E"), "--eval.device=cuda"], ["eval.device=cuda"]),
}


def run_cli(module, argv: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    """`python <module>.py ARGV` in this process: runtime.cli(module.main); returns (exit status, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", [f"{module.__name__}.py", *argv])
    with pytest.raises(SystemExit) as e:
        runtime.cli(module.main)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def files(tmp: Path) -> set:
    return {p.relative_to(tmp) for p in tmp.rglob("*")}


@pytest.mark.parametrize("case", IN_PROCESS)
def test_a_bad_value_is_one_line_before_any_work(case, tmp_path, monkeypatch, capsys):
    module, argv, names = IN_PROCESS[case]
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)    # run.device=cuda names a missing device
    # where a train.py run or a comparison would write (first: a case's own flag wins)
    out_flag = {train: [f"--run.out={tmp_path / 'run'}"], compare: [f"--out={tmp_path / 'cmp'}"]}.get(module, [])
    argv = [*out_flag, *argv(tmp_path)]
    before = files(tmp_path)
    code, out, err = run_cli(module, argv, monkeypatch, capsys)
    script = module.__name__ + ".py"
    assert code == 2 and "Traceback" not in err and out == "", (code, out, err)
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith(f"{script}: error: ") and all(n in err for n in names), err
    assert files(tmp_path) == before                          # nothing written: no run folder, no clip, no log


def test_a_failed_compare_run_prints_its_cause_and_does_not_hold_the_folder(tmp_path, monkeypatch, capsys):
    """A run that train.py refuses (here its evaluation reads another IDM than the reward's, train.check_run): the
    line carries train.py's own one-line error, and the folder keeps no command.txt, so the corrected command
    runs there instead of being refused as another command's run."""
    monkeypatch.chdir(ROOT)
    other = write(tmp_path, "other.pt", "")
    code, _, err = run_cli(compare, ["configs/laptop_ar.yaml", "--seeds=0", "--variants=pixel", "--rl.steps=1",
                                     f"--out={tmp_path / 'cmp'}", f"--eval.reward_idm={other}"], monkeypatch, capsys)
    lines = [t for t in err.replace("\r", "\n").splitlines() if t.strip() and "it/s" not in t]   # minus the bar
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("compare.py: error: ") and "train.py: error: eval.reward_idm=" in lines[0], lines
    run = tmp_path / "cmp" / "laptop_ar" / "pixel" / "seed0"
    assert (run / "train.txt").exists() and not (run / "command.txt").exists()


@pytest.mark.parametrize("module", [train, compare, bench, pretrain, minicraft, evaluate, data])
def test_help_prints_the_usage(module, monkeypatch, capsys):
    """-h / --help anywhere on the line prints the entry module's docstring and exits 0, before any work."""
    for flag in ("--help", "-h"):
        code, out, err = run_cli(module, ["configs/nope.yaml", flag], monkeypatch, capsys)
        assert code == 0 and out == module.__doc__.strip() + "\n" and err == ""


def test_help_of_a_script_is_its_docstring():
    """Run as a script, the entry module is __main__: its docstring is still the one printed."""
    r = subprocess.run([sys.executable, "minicraft.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and r.stdout == minicraft.__doc__.strip() + "\n", r.stderr


@pytest.mark.parametrize("module", ["config", "minicraft"])
def test_importing_a_stage_imports_no_entry_point(module):
    """config.py holds EvalConfig itself and minicraft.py imports nothing of ours but runtime: neither pulls in a
    command (no import cycle is held open by an import inside a function)."""
    entry = ("train", "evaluate", "compare", "bench", "pretrain")
    r = subprocess.run([sys.executable, "-c", f"import {module}, sys; print([m for m in {entry} if m in sys.modules])"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout == "[]\n", r.stderr


def test_ctrl_c_outside_the_training_loop_is_one_line(monkeypatch, capsys):
    """Ctrl-C while a command loads or evaluates: exit 130 and one line, no KeyboardInterrupt traceback."""
    def interrupted(argv):
        raise KeyboardInterrupt
    monkeypatch.setattr(sys, "argv", ["train.py"])
    with pytest.raises(SystemExit) as e:
        runtime.cli(interrupted)
    err = capsys.readouterr().err
    assert e.value.code == 130 and err.strip() == "train.py: interrupted" and "Traceback" not in err
