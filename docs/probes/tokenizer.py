"""What an AR tokenizer keeps of the action: the `recon` row (held-out ground truth through the tokenizer's round
trip, read by the reward and judge IDMs: what a perfect world model scores) and how many of its codes the
held-out frames use (model_ar.code_usage). Only the tokenizer is built, not the world model, so any grid or
codebook size can be measured before an AR base exists for it.

    python docs/probes/tokenizer.py configs/laptop_ar.yaml --eval.clips=192 --eval.seed=2000
    python docs/probes/tokenizer.py configs/laptop_ar.yaml --vq.kind=fsq --vq.levels=[8,8,4] \
        --vq.init_from=fsq_4x4.pt --eval.clips=192 --eval.seed=2000

Prints one JSON line: the tokenizer's grid and codes, code usage, judge and reward-IDM macro F1, PSNR.
"""
import dataclasses
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import config  # noqa: E402
import data  # noqa: E402
import evaluate  # noqa: E402
import model_ar  # noqa: E402

cfg = config.parse(config.Config, sys.argv[1:])[0]
torch.set_num_threads(cfg.run.threads)
held, _ = data.load_clips(dataclasses.replace(cfg.data, seed=cfg.eval.seed, max_clips=cfg.eval.clips))
tok = model_ar.load_tokenizer(cfg.vq)
with torch.no_grad():
    frames = data.collate(held)["frames"]                                  # [N, 16, H, W, 3]
    ids = torch.cat([tok.encode(f) for f in frames.flatten(0, 1).split(256)])   # [N*16, h, w]
row = evaluate.evaluate_recon(tok.roundtrip, held, cfg.eval, evaluate.load_scorers(cfg.eval))
print(json.dumps({"kind": cfg.vq.kind, "grid": list(cfg.vq.grid), "codes": cfg.vq.codebook_size,
                  **model_ar.code_usage(ids, cfg.vq.codebook_size),
                  **{k: row[k] for k in ("judge_f1_macro", "f1_macro", "psnr")}}))
