"""train.py under stress: rank-invariant rollouts, torchrun with 2 CPU ranks vs 1 process, SIGKILL and
SIGTERM mid-run, the non-finite guard, and bad launches. Reuses test_train's tiny world model.

Bad input tested elsewhere (not repeated here): malformed YAML, unknown keys, wrong types, missing
config files (test_config.py); corrupt or truncated mp4/jsonl and short clips (test_data.py); a
malicious pickle and checkpoint key errors of model files (test_idm.py, test_model_ar.py); rewards
that do not split into groups (test_grpo.py).
"""
import dataclasses
import fcntl
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_model_diffusion import clip, tiny_model

import config
import data
import model_ar
import model_diffusion
import runtime
import sde_sampler
import train
from conftest import tiny_args, tiny_cfg

ROOT = Path(__file__).resolve().parents[1]
STEPS = 3
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def args(assets, out, *extra):
    """The tiny 2-prompt × G=2 run of test_train, STEPS steps, a checkpoint every step. The pixel reward
    (Eq. 6, L1 only): the random tiny IDM scores every rollout of a group alike (zero advantages, zero
    gradients, nothing to compare), while L1 differs between rollouts. The loop is the same."""
    return [*tiny_args(assets, out, steps=STEPS), "--rl.save_every=1", "--rl.reward=pixel", *extra]


def weights(out: Path) -> dict:
    return torch.load(out / "ckpt.pt", weights_only=True)["model"]


def log_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def launch(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    end = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, f"the run ended early:\n{proc.stdout.read()}"
        assert time.time() < end, "timed out waiting for the run"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def reference(assets, tmp_path_factory):
    """One uninterrupted 1-process run: the baseline every other run must reproduce."""
    out = tmp_path_factory.mktemp("reference")
    train.main(args(assets, out))
    return out


# -----------------------------------------------------------------------------
# Rank-invariant rollouts: the noise of a group depends on (seed, step, global prompt index) only.


def test_ar_rollout_of_a_group_does_not_depend_on_the_rank_layout(assets):
    cfg = tiny_cfg(assets)
    api, model = train.world_model(cfg)
    clips = data.load_clips(cfg.data)[0]
    batch = {k: v.repeat_interleave(2, 0) for k, v in data.collate(clips[:4], 16).items()}  # 4 prompts × G=2
    x0, tok = batch["frames"][:, 0], batch["tokens"]
    whole = api.rollout(model, x0, tok, cfg, train.group_generators(7, 3, 4, 0, 1, "cpu"))
    for rank in (0, 1):                                       # rank r of 2 holds prompts r and r + 2
        rows = torch.tensor([2 * p + j for p in (rank, rank + 2) for j in range(2)])
        part = api.rollout(model, x0[rows], tok[rows], cfg, train.group_generators(7, 3, 4, rank, 2, "cpu"))
        assert torch.equal(part.tokens, whole.tokens[rows]) and torch.equal(part.frames, whole.frames[rows])
        assert torch.allclose(part.logp, whole.logp[rows], atol=1e-6)
    # The same prompt under another step or prompt index draws other noise (the seeds really differ).
    same = x0[:1].repeat(2, 1, 1, 1), tok[:1].repeat(2, 1, 1)
    a = api.rollout(model, *same, cfg, train.group_generators(7, 3, 2, 0, 2, "cpu")).tokens
    b = api.rollout(model, *same, cfg, train.group_generators(7, 3, 2, 1, 2, "cpu")).tokens
    c = api.rollout(model, *same, cfg, train.group_generators(7, 4, 2, 0, 2, "cpu")).tokens
    assert not torch.equal(a, b) and not torch.equal(a, c)


def test_nfd_rollout_of_a_group_does_not_depend_on_the_rank_layout():
    model = tiny_model(frames=3)
    video, tok = clip(4, 3)                                   # 2 prompts × G=2
    cfg = config.Config(sde=sde_sampler.SDEConfig(steps=4, tau=0.5, same_noise=True), rl=config.RLConfig(group_size=2))
    gens = lambda ps: [torch.Generator().manual_seed(100 + p) for p in ps]   # noqa: E731
    whole = model_diffusion.rollout(model, video[:, 0], tok, cfg, gens([0, 1]))
    for p in (0, 1):
        part = model_diffusion.rollout(model, video[2 * p:2 * p + 2, 0], tok[2 * p:2 * p + 2], cfg, gens([p]))
        assert torch.equal(part.mask, whole.mask[2 * p:2 * p + 2])
        assert torch.allclose(part.traj, whole.traj[2 * p:2 * p + 2], atol=1e-5)
    assert not torch.equal(whole.traj[0, :, 0], whole.traj[2, :, 0])  # groups start from other noise
    assert torch.equal(whole.traj[0, :, 0], whole.traj[1, :, 0])       # members share x_1 (docs/conventions.md §3.5)


def test_generators_must_split_the_batch_into_whole_groups():
    with pytest.raises(ValueError, match="5 rows cannot be split evenly over 2 generators"):
        model_ar.exponential_noise((5, 8), [torch.Generator(), torch.Generator()], "cpu")
    with pytest.raises(ValueError, match="5 rows cannot be split evenly over 2 generators"):
        sde_sampler.randn((5, 3), [torch.Generator(), torch.Generator()])


# -----------------------------------------------------------------------------
# torchrun: 2 CPU ranks (gloo) train what 1 process trains, and stay identical to each other.


def test_torchrun_two_ranks_match_one_process(assets, reference, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "train.py", *args(assets, out)]
    run = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    prints = dict(re.findall(r"rank (\d)/2: weights sha256 (\w+)", run.stdout))
    assert set(prints) == {"0", "1"} and prints["0"] == prints["1"], prints   # replicas identical
    _, model = train.world_model(tiny_cfg(assets))
    model.load_state_dict(weights(out))
    assert runtime.fingerprint(model) == prints["0"]            # the printed hash is of the saved weights
    a, b, init = weights(reference), weights(out), torch.load(assets / "ar.pt", weights_only=True)["state_dict"]
    assert any(not torch.equal(b[k], init[k]) for k in b)     # it trained
    assert all(row["grad_norm"] > 0 for row in log_rows(reference))
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6), k
    for r1, r2 in zip(log_rows(reference), log_rows(out), strict=True):   # global stats on both
        for key in ("reward_mean", "reward_std", "loss", "grad_norm"):
            assert r2[key] == pytest.approx(r1[key], rel=1e-4, abs=1e-6), (r1["step"], key)


@pytest.mark.parametrize("yaml", ["configs/laptop_ar.yaml", "configs/laptop_nfd.yaml"])
def test_torchrun_two_ranks_train_the_shipped_laptop_configs_like_one_process(yaml, tmp_path):
    """Both shipped world models under torchrun, on their shipped weights and reward IDMs (a short run: 2 steps of
    2 prompts x G 4, 2 held-out clips): the replay sees the plain module and the gradients are averaged by hand, so
    the 2 replicas stay identical and end where 1 process does. One process samples the 8 rollouts as one batch and
    each rank as a batch of 4, so their logits differ by matmul rounding (~1e-6); among AR's 7,680 sampled tokens
    per step seed 0 meets a near-tie that this flips, seed 1 none (the rollouts are then equal token for token)."""
    short = ["--rl.steps=2", "--rl.prompts=2", "--rl.group_size=4", "--rl.micro_batch=8", "--data.max_clips=8",
             "--eval.clips=2", "--eval.videos=0", "--run.threads=1", "--run.seed=1"]
    one, two = tmp_path / "one", tmp_path / "two"
    train.main([yaml, *short, f"--run.out={one}"])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", yaml,
           *short, f"--run.out={two}"]
    run = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    prints = dict(re.findall(r"rank (\d)/2: weights sha256 (\w+)", run.stdout))
    assert set(prints) == {"0", "1"} and prints["0"] == prints["1"], prints   # replicas identical
    a, b = weights(one), weights(two)
    assert all(r["grad_norm"] > 0 for r in log_rows(one))
    # AdamW divides each coordinate by its own gradient scale, so the all-reduce's rounding of near-zero gradients
    # (e.g. NFD's zero-initialised adaLN weights) can move a weight by ~1e-6 at these learning rates.
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=2e-5), k
    for r1, r2 in zip(log_rows(one), log_rows(two), strict=True):   # global statistics on both
        assert r2["reward_mean"] == pytest.approx(r1["reward_mean"], rel=1e-4, abs=1e-6)


# -----------------------------------------------------------------------------
# Pre-emption: SIGKILL at any moment leaves a loadable checkpoint; SIGTERM saves and exits 0.


def test_sigkill_at_a_random_moment_then_resume_reproduces_the_unbroken_run(assets, reference, tmp_path):
    out = tmp_path / "killed"
    proc = launch([sys.executable, "train.py", *args(assets, out)])
    wait_for(lambda: (out / "ckpt.pt").exists(), proc)
    delay = random.uniform(0.0, 1.0)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    state = torch.load(out / "ckpt.pt", weights_only=True)    # the last checkpoint loads
    assert 1 <= state["step"] <= STEPS, delay
    train.main(args(assets, out))                             # resume to the end
    a, b = weights(reference), weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a), f"not bitwise equal after a kill at +{delay:.2f} s"
    rows = log_rows(out)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1)), delay   # no duplicates, no torn line
    assert rows[-1]["loss"] == log_rows(reference)[-1]["loss"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_or_ctrl_c_saves_exits_zero_and_the_rerun_continues(assets, reference, tmp_path, sig):
    out = tmp_path / "preempted"
    proc = launch([sys.executable, "train.py", *args(assets, out, "--rl.save_every=100")])
    wait_for(lambda: (out / "log.jsonl").exists() and (out / "log.jsonl").read_text().count("\n") >= 1, proc)
    proc.send_signal(sig)
    stdout, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "Traceback" not in stdout, stdout[-3000:]
    saved = re.search(rf"{sig.name}: saved \S+ at step (\d+); rerun the same command to resume", stdout)
    assert saved, stdout[-3000:]
    step = int(saved.group(1))
    assert 1 <= step < STEPS and torch.load(out / "ckpt.pt", weights_only=True)["step"] == step
    train.main(args(assets, out, "--rl.save_every=100"))
    assert [r["step"] for r in log_rows(out)] == list(range(1, STEPS + 1))
    a, b = weights(reference), weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


# -----------------------------------------------------------------------------
# Non-finite guard: the step is skipped with its reason, weights and AdamW state stay bitwise.


@pytest.fixture(scope="module")
def one_step(assets, tmp_path_factory):
    """A run stopped after step 1 (its checkpoint), to continue under injected faults."""
    out = tmp_path_factory.mktemp("one_step")
    train.main(args(assets, out, "--rl.steps=1"))
    return out


def nan_from(real, from_call: int, calls: list):
    """`real` returning NaN (the first element of a tuple result) from its `from_call`-th call on."""
    def fake(*a, **k):
        calls.append(1)
        result = real(*a, **k)
        if len(calls) < from_call:
            return result
        if isinstance(result, tuple):                         # (log-probs, kl) or (loss, stats)
            return result[0] * float("nan"), *result[1:]
        return result * float("nan")
    return fake


def inject(monkeypatch, what: str, from_call: int = 1) -> None:
    """Make the reward, the rollout's log-probs or the loss NaN from the `from_call`-th call on."""
    calls = []
    if what == "reward":                                      # the reward function train.reward_fn builds
        real_fn = train.reward_fn
        monkeypatch.setattr(train, "reward_fn", lambda *a, **k: nan_from(real_fn(*a, **k), from_call, calls))
    elif what == "log-prob":                                  # what the sampler recorded
        real_rollout = model_ar.rollout

        def rollout(*a, **k):
            ro = real_rollout(*a, **k)
            calls.append(1)
            return ro if len(calls) < from_call else dataclasses.replace(ro, logp=ro.logp * float("nan"))
        monkeypatch.setattr(model_ar, "rollout", rollout)
    else:
        monkeypatch.setattr(train.grpo, "policy_loss", nan_from(train.grpo.policy_loss, from_call, calls))


@pytest.mark.parametrize("what", ["reward", "log-prob", "loss"])
def test_a_non_finite_step_changes_nothing_and_says_why(assets, one_step, tmp_path, monkeypatch, capsys, what):
    out = tmp_path / "run"
    shutil.copytree(one_step, out)
    before = torch.load(out / "ckpt.pt", weights_only=True)
    inject(monkeypatch, what)
    train.main(args(assets, out, "--rl.steps=2"))
    after = torch.load(out / "ckpt.pt", weights_only=True)
    assert after["step"] == 2
    assert all(torch.equal(before["model"][k], after["model"][k]) for k in before["model"])
    opt_a, opt_b = before["optimizer"]["state"], after["optimizer"]["state"]
    assert opt_a.keys() == opt_b.keys() and all(torch.equal(opt_a[i][k], opt_b[i][k])
                                                for i in opt_a for k in opt_a[i])
    assert log_rows(out)[-1]["skipped"] == f"non-finite {what}"
    assert f"step 2: skipped the update (non-finite {what}), 1 in a row" in capsys.readouterr().out


def test_consecutive_non_finite_steps_stop_the_run(assets, one_step, tmp_path, monkeypatch):
    out = tmp_path / "run"
    shutil.copytree(one_step, out)
    inject(monkeypatch, "reward")
    with pytest.raises(config.UsageError, match=r"stopping at step 3: 2 consecutive skipped steps \(last: non-finite "
                                         r"reward; rl.max_bad_steps=2\)"):
        train.main(args(assets, out, "--rl.steps=10", "--rl.max_bad_steps=2"))
    assert [r.get("skipped") for r in log_rows(out)] == [None, "non-finite reward", "non-finite reward"]


def test_a_good_step_resets_the_count_of_bad_ones(assets, one_step, tmp_path, monkeypatch):
    out = tmp_path / "run"
    shutil.copytree(one_step, out)
    real_fn, calls = train.reward_fn, []

    def every_other(*a, **k):                                 # NaN at steps 2 and 4, fine at 3
        reward = real_fn(*a, **k)

        def flaky(frames, batch):
            calls.append(1)
            return reward(frames, batch) * (float("nan") if len(calls) % 2 else 1.0)
        return flaky

    monkeypatch.setattr(train, "reward_fn", every_other)
    train.main(args(assets, out, "--rl.steps=4", "--rl.max_bad_steps=2"))   # never 2 in a row: no stop
    assert [r.get("skipped") is None for r in log_rows(out)] == [True, False, True, False]


# -----------------------------------------------------------------------------
# Bad launches and bad checkpoints fail before any work, in one line that says what to do.


@pytest.mark.parametrize("world, prompts", [(4, 2), (3, 4)])
def test_rank_count_that_does_not_fit_the_prompts(assets, tmp_path, monkeypatch, world, prompts):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setattr(train.runtime, "setup", lambda run: (torch.device("cpu"), 0, world))   # no process group
    with pytest.raises(config.UsageError, match=f"rl.prompts={prompts} prompts per step cannot be split over "
                                                f"{world} ranks"):
        train.main(args(assets, tmp_path / "run", f"--rl.prompts={prompts}"))
    assert not (tmp_path / "run").exists()                    # before any work


def test_an_evaluation_reward_idm_that_gives_no_reward_is_rejected(assets, tmp_path):
    """The reward-IDM column must read with the reward's own IDM (or one member of its ensemble)."""
    with pytest.raises(config.UsageError, match="is not the IDM that gives the reward"):
        train.main(args(assets, tmp_path / "run", f"--eval.reward_idm={assets}/judge.pt"))
    assert not (tmp_path / "run").exists()
    ensemble = f"--rl.reward_idm={assets}/judge.pt,{assets}/reward.pt"
    train.main(args(assets, tmp_path / "ok", ensemble, "--rl.reward=idm", "--rl.steps=1"))   # a member: accepted
    assert (tmp_path / "ok" / "results.json").exists()


@pytest.mark.parametrize("key", ["rl.group_size", "rl.micro_batch", "rl.max_bad_steps", "rl.steps"])
def test_non_positive_sizes_are_rejected(assets, tmp_path, key):
    with pytest.raises(config.UsageError, match=re.escape(f"{key}=0: must be >= ")):   # config.RLConfig
        train.main(args(assets, tmp_path / "run", f"--{key}=0"))
    assert not (tmp_path / "run").exists()


class Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


@pytest.mark.parametrize("damage, message", [
    ("truncate", "cannot read the checkpoint"),
    ("pickle", "cannot read the checkpoint"),
    ("drop_key", "missing keys (1): ['transformer.lm_head.weight']"),
    ("reshape", "mis-shaped keys (1): ['transformer.lm_head.weight: file (1, 1) vs model ("),
    ("not_train", "lacks ['optimizer', 'scheduler', 'step', 'rng', 'config']"),
])
def test_a_damaged_checkpoint_fails_with_a_message(assets, one_step, tmp_path, monkeypatch, damage, message):
    out = tmp_path / "run"
    shutil.copytree(one_step, out)
    ckpt = out / "ckpt.pt"
    state = torch.load(ckpt, weights_only=True)
    if damage == "truncate":
        ckpt.write_bytes(ckpt.read_bytes()[:1000])
    elif damage == "pickle":
        monkeypatch.chdir(tmp_path)
        torch.save({"model": Payload()}, ckpt)
    elif damage == "not_train":
        torch.save({"model": state["model"]}, ckpt)
    else:
        if damage == "drop_key":
            del state["model"]["transformer.lm_head.weight"]
        else:
            state["model"]["transformer.lm_head.weight"] = torch.zeros(1, 1)
        torch.save(state, ckpt)
    with pytest.raises(config.UsageError, match=re.escape(message)) as e:
        train.main(args(assets, out))
    assert str(ckpt) in str(e.value)
    assert not (tmp_path / "pwned").exists()


# -----------------------------------------------------------------------------
# The run folder is a record: one run at a time, nothing written before the checks, no mixed configs.


def test_a_rerun_after_a_kill_before_the_first_checkpoint_logs_each_step_once(assets, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "log.jsonl").write_text('{"step": 1}\n{"step": 2}\n{"step": 3')   # a killed run's rows, a torn line
    train.main(args(assets, out, "--rl.steps=2"))
    assert [r["step"] for r in log_rows(out)] == [1, 2] and "reward_mean" in log_rows(out)[0]


def test_a_second_run_on_a_folder_in_use_is_refused(assets, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    held = os.open(out, os.O_RDONLY)                          # what a running train.py holds
    try:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(config.UsageError, match="another run is using"):
            train.main(args(assets, out))
    finally:
        os.close(held)
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("change, named", [
    ("--rl.lr=0.001", "rl.lr=0.01 (now 0.001)"),
    ("--grpo.beta=0.5", "grpo.beta=0.0 (now 0.5)"),
    ("--rl.reward=idm", "rl.reward='pixel' (now 'idm')"),
])
def test_a_resume_that_changes_what_the_checkpoint_means_is_refused_and_writes_nothing(
        assets, one_step, tmp_path, change, named):
    out = tmp_path / "run"
    shutil.copytree(one_step, out)
    files = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(config.UsageError, match=re.escape(named)) as e:
        train.main(args(assets, out, change))
    assert str(out / "config.yaml") in str(e.value)           # the file it says to rerun with is intact
    assert {p.name: p.read_bytes() for p in out.iterdir()} == files


def test_a_resume_may_change_how_often_it_saves_and_how_long_it_runs(assets, one_step, tmp_path):
    """... and resumes a checkpoint of an earlier version: a field it lacks reads as its default, a field since
    removed is not compared."""
    out = tmp_path / "run"
    shutil.copytree(one_step, out)
    state = torch.load(out / "ckpt.pt", weights_only=True)
    del state["config"]["rl"]["updates"]
    state["config"]["rl"]["groups"] = "clip"
    torch.save(state, out / "ckpt.pt")
    train.main(args(assets, out, "--rl.steps=2", "--rl.save_every=5", "--run.threads=2"))
    assert [r["step"] for r in log_rows(out)] == [1, 2]


def test_a_checkpoint_without_its_before_row_is_refused(assets, one_step, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(one_step, out)
    (out / "results.json").unlink()
    with pytest.raises(config.UsageError, match="results.json is missing"):
        train.main(args(assets, out, "--rl.steps=2"))


def test_a_run_folder_that_is_a_file_is_refused(assets, tmp_path):
    (tmp_path / "file").write_text("x")
    for out in (tmp_path / "file", tmp_path / "file" / "sub"):
        with pytest.raises(config.UsageError, match=f"{tmp_path / 'file'} is a file, not a folder"):
            train.main(args(assets, out))
    assert (tmp_path / "file").read_text() == "x"
