"""Every entry point turns a mistake the user must fix into one line on stderr and exit status 2, with no
traceback (runtime.cli); a bug keeps its traceback. Each command fails before any heavy work."""
import subprocess
import sys
from pathlib import Path

import pytest

import config
import runtime

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
