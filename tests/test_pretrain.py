"""pretrain.py: every stage runs, logs, and writes a checkpoint that the next stage and train.py load."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import config
import idm as idm_lib
import model_ar
import model_diffusion
import pretrain

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--data.max_clips=4", "--pretrain.steps=2", "--pretrain.batch_size=1",
        "--pretrain.eval_every=2", "--pretrain.eval_clips=2", "--run.threads=1"]


def run(stage, tmp_path, *extra):
    out = tmp_path / f"{stage}.pt"
    pretrain.main([stage, *TINY, f"--pretrain.out={out}", *extra])
    log = [json.loads(line) for line in out.with_suffix(".log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and all(r["loss"] == r["loss"] for r in log)
    return out, log[-1]


def test_idm_stage(tmp_path):
    out, last = run("idm", tmp_path, "--idm.hidsize=32", "--idm.attention_heads=2")
    assert 0 <= last["acc_exact"] <= 1 and "acc_camera_yaw" in last
    first = idm_lib.load(str(out))
    assert first.kwargs["hidsize"] == 32
    (tmp_path / "more").mkdir()
    more, _ = run("idm", tmp_path / "more", f"--pretrain.init_from={out}")   # continue training
    again = idm_lib.load(str(more))
    assert again.kwargs["hidsize"] == 32                      # the file's architecture, not the config's
    assert any(not torch.equal(a, b) for a, b in zip(first.state_dict().values(),
                                                     again.state_dict().values()))


@pytest.mark.parametrize("quantizer", [[], ["--vq.kind=fsq", "--vq.levels=[4, 4]"]], ids=["vq", "fsq"])
def test_ar_stages(tmp_path, quantizer):
    vq_args = ["--vq.channels=8", "--vq.code_dim=8", "--vq.codebook_size=16", *quantizer]
    vq, last = run("vq", tmp_path, *vq_args)
    assert last["psnr"] > 0 and last["codes_share"] == round(last["codes_used"] / 16, 4)
    assert 1 <= last["codes_perplexity"] <= last["codes_used"] + 1e-6   # the code usage of the held-out frames
    ar_args = [*vq_args, f"--vq.init_from={vq}", "--ar.n_codes=16", "--ar.vocab_size=86",
               "--ar.hidden=32", "--ar.intermediate=64", "--ar.heads=2", "--ar.kv_heads=1",
               "--ar.layers=1"]
    ar, last = run("ar", tmp_path, *ar_args, "--ar.init_from=/absent/ar_base.pt")  # RL's start: not read
    cfg = config.parse(config.Config, [*ar_args, f"--ar.init_from={ar}"])[0]
    model = model_ar.build_world_model(cfg.ar, cfg.vq)        # the base model train.py starts from
    saved = torch.load(ar, weights_only=True)["state_dict"]
    assert torch.equal(model.state_dict()["transformer.lm_head.weight"], saved["transformer.lm_head.weight"])
    with pytest.raises(config.UsageError, match="vq.init_from"):
        pretrain.main(["ar", *TINY])


def test_nfd_stages(tmp_path):
    small = ["--ae.width=8", "--nfd.hidden=32", "--nfd.mlp=64", "--nfd.heads=2", "--nfd.layers=1"]
    ae, last = run("ae", tmp_path, *small)
    assert last["psnr"] > 0
    nfd, last = run("nfd", tmp_path, *small, f"--ae.init_from={ae}")
    assert last["held_out_loss"] > 0
    cfg = config.parse(config.Config, small)[0]
    model = model_diffusion.NFD(cfg.nfd, cfg.ae)
    model_diffusion.load_weights(model, str(nfd))             # loads strictly, tokenizer included
    with pytest.raises(config.UsageError, match="ae.init_from"):
        pretrain.main(["nfd", *TINY])


def test_noisy_labels_swap_whole_clips_at_the_given_rate():
    tokens = torch.arange(1000).view(1000, 1, 1).expand(1000, 15, 11)   # clip i's actions are all i
    assert torch.equal(pretrain.noisy_labels(tokens, 0.0, torch.Generator().manual_seed(0)), tokens)
    noisy = pretrain.noisy_labels(tokens, 0.3, torch.Generator().manual_seed(0))
    moved = (noisy[:, 0, 0] != torch.arange(1000))            # clips that now carry another clip's actions
    assert 0.26 < moved.float().mean() < 0.34                 # p = 0.3 of 1,000 clips, within 3 sigma
    assert torch.equal(noisy[:, :1, :1].expand(-1, 15, 11), noisy)   # whole clips, never mixed
    assert torch.equal(noisy[:, 0, 0].sort().values, torch.arange(1000))   # a permutation: labels kept
    assert torch.equal(tokens[:, 0, 0], torch.arange(1000))   # the batch itself is not modified


def test_torchrun_two_ranks_average_gradients_like_one_process(tmp_path):
    """Data parallelism by hand: 2 gloo ranks holding one clip each end with the weights that 1 process
    trains on both clips (the mean of per-rank mean losses is the global mean: equal shares), and not
    with those of one clip alone (what a missing all-reduce would give)."""
    args = [*TINY, "--pretrain.batch_size=2", "--idm.hidsize=32", "--idm.attention_heads=2"]
    one, two, alone = tmp_path / "one.pt", tmp_path / "two.pt", tmp_path / "alone.pt"
    pretrain.main(["idm", *args, f"--pretrain.out={one}"])
    pretrain.main(["idm", *args, "--pretrain.batch_size=1", f"--pretrain.out={alone}"])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "pretrain.py", "idm", *args, f"--pretrain.out={two}"]
    run = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "2 rank(s)" in run.stdout

    def differing(x, y):                                      # fraction of weights apart by > 1e-6
        x, y = idm_lib.load(str(x)).state_dict(), idm_lib.load(str(y)).state_dict()
        return float(torch.cat([((x[k] - y[k]).abs() > 1e-6).flatten() for k in x]).float().mean())
    # AdamW's first steps are ~lr * sign(gradient): round-off flips the sign of a few near-zero
    # gradients (measured: 0.01 % of weights), while one clip's gradient moves nearly all (95 %).
    assert differing(one, two) < 1e-3
    assert differing(one, alone) > 0.5


def test_an_interrupted_stage_resumes_from_its_last_evaluation(tmp_path, monkeypatch):
    """A stage killed after step 3 of 4 (evaluations every 2 steps) leaves no <out>, only <out>.resume.pt at
    step 2; the same command then runs steps 3..4, logs each step once, writes <out> and drops the resume file."""
    out = tmp_path / "idm.pt"
    argv = ["idm", *TINY, "--pretrain.steps=4", "--idm.hidsize=32", "--idm.attention_heads=2", f"--pretrain.out={out}"]
    real, calls = idm_lib.idm_loss, []

    def dies_at_step_4(*a, **k):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt                           # a kill in the middle of step 4
        return real(*a, **k)

    monkeypatch.setattr(idm_lib, "idm_loss", dies_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        pretrain.main(argv)
    resume = out.with_suffix(".resume.pt")
    assert not out.exists() and torch.load(resume, weights_only=True)["step"] == 2
    monkeypatch.setattr(idm_lib, "idm_loss", real)
    pretrain.main(argv)
    log = [json.loads(line) for line in out.with_suffix(".log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and out.exists() and not resume.exists()


def test_idm_trains_on_tokenizer_round_trips_and_reports_them(tmp_path):
    """pretrain.roundtrip: the IDM sees clips through the named tokenizer and is scored on its round trips."""
    vq_args = ["--vq.channels=8", "--vq.code_dim=8", "--vq.codebook_size=16"]
    vq, _ = run("vq", tmp_path, *vq_args)
    (tmp_path / "idm").mkdir()
    _, last = run("idm", tmp_path / "idm", "--idm.hidsize=32", "--idm.attention_heads=2", *vq_args,
                  f"--vq.init_from={vq}", "--pretrain.roundtrip=0.5")
    assert 0 <= last["roundtrip0_acc_exact"] <= 1 and 0 <= last["acc_exact"] <= 1
    with pytest.raises(config.UsageError, match="needs a tokenizer"):
        pretrain.main(["idm", *TINY, "--pretrain.roundtrip=0.5", f"--pretrain.out={tmp_path / 'x.pt'}"])
