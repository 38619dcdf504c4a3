"""Pretraining of what RLIR starts from: the IDMs (reward and judge), the tokenizer, the base model.

RLIR post-trains a *pretrained* world model and scores it with a *trained* IDM (paper §4.1, §5.1).
For real Minecraft those are MineWorld's checkpoints and OpenAI's VPT IDM; for the embedded world
this script makes small ones, and `assets/minicraft/` ships them. One stage per run:

    python pretrain.py idm configs/pretrain_idm_reward.yaml     # reward IDM (docs/2026-11-22-embedded-idms.md)
    python pretrain.py idm configs/pretrain_idm_judge.yaml      # judge IDM: other worlds, other init
    python pretrain.py vq  configs/minicraft_ar.yaml            # VQ tokenizer of the AR world model
    python pretrain.py ar  configs/minicraft_ar.yaml            # AR base model (MLE, next token)
    python pretrain.py ae  configs/minicraft_nfd.yaml           # frame autoencoder of the NFD model
    python pretrain.py nfd configs/minicraft_nfd.yaml           # NFD base model (flow matching)
    python pretrain.py idm --pretrain.steps=50 --pretrain.out=/tmp/idm.pt   # a quick smoke run
    torchrun --standalone --nproc_per_node=8 pretrain.py nfd configs/nfd_310m.yaml --data.source=DIR \
        --ae.init_from=ae.pt --pretrain.out=nfd_310m.pt                # paper scale, 1 node, 8 GPUs

On GPU (run.device auto) the forward and backward run under bf16 autocast; with torchrun each rank
takes its share of the global batch (pretrain.batch_size) and gradients are averaged over ranks.
World-model checkpoints are stored in fp16 (small files; loaders cast to the model's dtype).

The reward IDM scores rollouts during RL; the judge IDM is trained the same way on disjoint worlds
(another seed) and only ever evaluates, so reward hacking of the reward IDM shows up as a gap between
the two (docs/conventions.md §8.1).
"""
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import config
import data
import evaluate
import idm as idm_lib
import model_ar
import model_diffusion
import runtime
from config import Config, DataConfig


def clips_and_held_out(cfg: Config, offset: int = 8192) -> tuple[list, dict, list]:
    """Training clips (data section), and held-out clips from other worlds, collated and as a list;
    action tokens start at `offset` (the AR model's codebook size; 8192 elsewhere)."""
    t0 = time.time()
    clips, skips = data.load_clips(cfg.data)
    pc = cfg.pretrain
    held_cfg = DataConfig(**{**vars(cfg.data), "seed": pc.eval_seed, "max_clips": pc.eval_clips})
    held = data.load_clips(held_cfg)[0]
    print(f"data: {len(clips)} train clips (seed {cfg.data.seed}), {pc.eval_clips} held-out "
          f"(seed {pc.eval_seed}) in {time.time() - t0:.0f}s; skipped: {dict(skips.counts)}")
    return clips, data.collate(held, offset, cfg.data.camera_tokens), held


def action_following(api, model, held: list, cfg: Config, device: torch.device) -> dict:
    """Judge-IDM macro F1 and PSNR of clips the world model (`api`: model_ar or model_diffusion) samples
    from held-out prompts, with train.py's evaluation, so the numbers mean what RLIR's before/after rows
    mean: the base model's distance to the recon row is the headroom RLIR works with, and the figure that
    says where to stop (docs/2026-11-22-base-world-models.md)."""
    row = evaluate.world_model_rows(api, model, held, cfg, ("pretrain",), device)["pretrain"]
    return {"judge_f1": round(row["judge_f1_macro"], 4), "judge_cam_err": round(row["judge_camera_bin_error"], 3),
            "psnr": round(row["psnr"], 2)}


def half(module: torch.nn.Module) -> dict:
    """State dict with floating tensors in fp16, on CPU: what the world-model checkpoints store."""
    return {k: v.detach().cpu().half() if v.is_floating_point() else v.cpu()
            for k, v in module.state_dict().items()}


def noisy_labels(tokens: torch.Tensor, p: float, gen: torch.Generator) -> torch.Tensor:
    """Label noise: a fraction p of the batch's clips get the actions of another clip of the batch
    (the selected rows swap their actions in a cycle), like gameplay logs whose labels the video does
    not show: a way to make a base model that follows the given actions less well (docs/2026-11-22-label-noise.md
    on why that did not make RLIR's job easier)."""
    swap = (torch.rand(len(tokens), generator=gen) < p).nonzero().flatten()   # [S] rows to relabel
    tokens = tokens.clone()                                   # [B, T, 11] action tokens
    tokens[swap] = tokens[swap.roll(1)]
    return tokens


def with_label_noise(batches, cfg: Config):
    """The world-model stages' batch stream with pretrain.label_noise applied (its own generator, so
    the batches and the model's noise are those of a clean run)."""
    gen = torch.Generator().manual_seed(cfg.run.seed * 1000 + 1 + runtime.rank_world()[0])
    for batch in batches:
        yield {**batch, "tokens": noisy_labels(batch["tokens"], cfg.pretrain.label_noise, gen)}


def checkpoint_path(name: str, cfg: Config) -> Path:
    """Where stage `name` writes its checkpoint: pretrain.out, or assets/minicraft/<stage>.pt."""
    return Path(cfg.pretrain.out or f"assets/minicraft/{name}.pt")


def fit(name: str, cfg: Config, module: torch.nn.Module, loss_fn, evaluate, save, device: torch.device) -> None:
    """The loop every stage shares: AdamW on the trainable parameters of `module` with warmup + cosine,
    gradient clipping, a JSONL log next to the checkpoint, a held-out evaluation every `eval_every` steps.
    Resumable: each evaluation also writes <out>.resume.pt (weights, optimizer, step; atomic), which a rerun
    of the same command continues from (the data stream restarts its epoch); the finished stage writes
    `save(out)` once, at the end, and removes the resume file, so an existing <out> means a finished stage."""
    pc = cfg.pretrain
    rank, world = runtime.rank_world()
    out = checkpoint_path(name, cfg)
    resume, log_path = out.with_suffix(".resume.pt"), out.with_suffix(".log.jsonl")
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=pc.lr, weight_decay=pc.weight_decay)
    start = 0
    if resume.exists():                                       # the same format as train.py's ckpt.pt
        start = runtime.load_checkpoint(runtime.read_checkpoint(str(resume), "the stage's resume file"),
                                        str(resume), module, opt, None)
    print(f"{name}: {sum(p.numel() for p in params) / 1e6:.2f}M trainable parameters on {device}, {world} rank(s), "
          f"steps {start + 1}..{pc.steps}; checkpoint, log and resolved config at {out.with_suffix('')}.*")
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda")
    t0 = time.time()
    log = None
    if rank == 0:
        out.parent.mkdir(parents=True, exist_ok=True)
        runtime.trim_log(log_path, start)                     # a killed run may have logged past its resume point
        log = open(log_path, "a")
        out.with_suffix(".config.yaml").write_text(config.dump(cfg))    # the resolved config, beside the log
    for step in (bar := tqdm(range(start, pc.steps), desc=name, disable=rank > 0)):
        for g in opt.param_groups:
            g["lr"] = pc.lr * runtime.lr_factor(step, pc.steps, pc.warmup)
        with autocast:
            loss = loss_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        runtime.average_gradients(params)                     # a no-op on one process
        torch.nn.utils.clip_grad_norm_(params, pc.grad_clip)
        opt.step()
        if rank > 0:
            continue
        row = {"step": step + 1, "loss": round(loss.item(), 4), "lr": opt.param_groups[0]["lr"],
               "seconds": round(time.time() - t0, 1)}
        if (step + 1) % pc.eval_every == 0 or step + 1 == pc.steps:
            row.update(evaluate())
            runtime.save_checkpoint(resume, module, opt, None, step + 1, config.to_dict(cfg))
            bar.write(json.dumps(row))
        bar.set_postfix(loss=row["loss"])
        log.write(json.dumps(row) + "\n")
        log.flush()
    if rank == 0:
        log.close()
        save(out)
        resume.unlink(missing_ok=True)
        print(f"saved {out} after {time.time() - t0:.0f}s of training")


# ---------------------------------------------------------------------------------------------
# IDM: supervised, the labels are the actions that made the frames (VPT §3.1).
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def idm_accuracy(model: idm_lib.IDM, batch: dict, chunk: int = 32) -> dict:
    """Per-group accuracy of the IDM's argmax on frames 1..15 (frame 0's action precedes the clip)."""
    model.eval()
    preds = []
    for i in range(0, len(batch["frames"]), chunk):
        b, c = idm_lib.predict(model, batch["frames"][i:i + chunk])
        preds.append(data.action_groups(b, c))
    pred, true = torch.cat(preds)[:, 1:], batch["groups"][:, 1:]   # [N, 15, 9]
    acc = (pred == true).float().mean((0, 1))                 # [9]
    out = {f"acc_{n}": round(float(a), 4) for n, a in zip(data.GROUP_NAMES, acc)}
    out["acc_exact"] = round(float((pred == true).all(-1).float().mean()), 4)  # Eq. 3 on GT
    return out


def tokenizer_roundtrips(cfg: Config, device: torch.device) -> list:
    """The world models' tokenizer round trips that this config names (vq.init_from: the AR world model's VQ,
    ae.init_from: the NFD world model's autoencoder), each frames uint8 [..., H, W, 3] -> the same shape."""
    trips = []
    if cfg.vq.init_from != "scratch" and not cfg.vq.diffusers_config:
        tok = model_ar.load_tokenizer(cfg.vq).to(device).requires_grad_(False)
        trips.append(tok.roundtrip)
    if cfg.ae.init_from:
        ae = model_diffusion.FrameAE(cfg.ae)
        model_diffusion.load_weights(ae, cfg.ae.init_from)
        ae.to(device).requires_grad_(False).eval()
        trips.append(ae.roundtrip)
    return trips


def train_idm(cfg: Config, device: torch.device) -> None:
    clips, held, _ = clips_and_held_out(cfg)
    init, p_trip = cfg.pretrain.init_from, cfg.pretrain.roundtrip
    model = (idm_lib.load(init, "pretrain.init_from") if init else idm_lib.IDM.from_config(cfg.idm)).to(device)
    batches = data.batches(clips, cfg.pretrain.batch_size, cfg.run.seed, 0, *runtime.rank_world())
    trips = tokenizer_roundtrips(cfg, device) if p_trip > 0 else []
    if p_trip > 0 and not trips:
        raise config.UsageError("pretrain.roundtrip > 0 needs a tokenizer to round-trip through: set vq.init_from "
                                "and/or ae.init_from")
    gen = torch.Generator().manual_seed(cfg.run.seed * 1000 + 2 + runtime.rank_world()[0])

    @torch.no_grad()
    def augment(frames: torch.Tensor) -> torch.Tensor:
        """A fraction pretrain.roundtrip of the clips through one of the tokenizers (each equally likely): the
        IDM learns to read the world models' view of a frame as it reads the frame (docs/conventions.md §8.4)."""
        pick = torch.rand(len(frames), generator=gen) < p_trip  # [B]
        which = torch.randint(len(trips), (len(frames),), generator=gen)  # [B]
        frames = frames.clone()
        for i, trip in enumerate(trips):
            rows = (pick & (which == i)).nonzero().flatten().to(frames.device)
            if len(rows):
                frames[rows] = trip(frames[rows])  # [b, T, H, W, 3]
        return frames

    def loss_fn(step):
        batch = {k: v.to(device) for k, v in next(batches).items()}
        frames = augment(batch["frames"]) if trips else batch["frames"]   # [B, T, H, W, 3]
        model.train()
        mask = torch.ones(frames.shape[:2], device=device)   # [B, T]
        mask[:, 0] = 0                                        # a_0 happened before the clip
        return idm_lib.idm_loss(model(frames), batch["buttons"], batch["camera_bins"], mask)

    def evaluate():                                           # on raw frames, and on round trips if trained so
        acc = idm_accuracy(model, held)
        for i, trip in enumerate(trips):
            frames = torch.cat([trip(f.to(device)).cpu() for f in held["frames"].split(16)])  # [N, T, H, W, 3]
            trip_acc = idm_accuracy(model, {**held, "frames": frames})
            acc[f"roundtrip{i}_acc_exact"] = trip_acc["acc_exact"]
        return acc

    fit("idm", cfg, model, loss_fn, evaluate, lambda out: idm_lib.save(model, str(out)), device)


# ---------------------------------------------------------------------------------------------
# VQ tokenizer and AR base model (MineWorld §4.2: VQ-VAE codes, then next-token prediction).
# ---------------------------------------------------------------------------------------------
def frame_batches(clips: list, cfg: Config, device: torch.device):
    """Tokenizers see single frames: each call draws this rank's share of batch_size x clip_len
    random frames (each rank its own stream)."""
    frames = torch.from_numpy(np.stack([c[0] for c in clips])).flatten(0, 1)  # [N*16, H, W, 3]
    rank, world = runtime.rank_world()
    gen = torch.Generator().manual_seed(cfg.run.seed * 1000 + rank)
    n = cfg.pretrain.batch_size * cfg.data.clip_len // world
    return lambda: frames[torch.randint(len(frames), (n,), generator=gen)].to(device)  # [n, H, W, 3]


def train_vq(cfg: Config, device: torch.device) -> None:
    clips, held, _ = clips_and_held_out(cfg)
    tok = model_ar.Tokenizer(cfg.vq)
    if cfg.pretrain.init_from:
        sd = model_ar.read_state_dict(cfg.pretrain.init_from, "pretrain.init_from")
        model_ar.load_weights(tok, sd, cfg.pretrain.init_from)
    tok.to(device)
    sample = frame_batches(clips, cfg, device)

    def loss_fn(step):
        tok.train()
        return tok.loss(sample())[0]                          # reconstruction (+ codebook + commitment: vq)

    @torch.no_grad()
    def evaluate():
        tok.eval()
        x = held["frames"][:, 1:].flatten(0, 1).to(device)   # [N*15, H, W, 3]
        ids = tok.encode(x)                                   # [N*15, h, w] code ids
        mse = ((tok.decode(ids).float() - x.float()) ** 2).mean()
        # codes_used, codes_share (of vq.codebook_size) and codes_perplexity (exp of the histogram's entropy,
        # the effective number of codes): a collapsing codebook shows here, an FSQ grid that is not filled too
        return {"psnr": round(float(10 * torch.log10(255 ** 2 / mse)), 2),
                **model_ar.code_usage(ids, cfg.vq.codebook_size)}

    fit("vq", cfg, tok, loss_fn, evaluate,
        lambda out: runtime.save_atomic({"state_dict": half(tok)}, out), device)


def train_ar(cfg: Config, device: torch.device) -> None:
    if cfg.vq.init_from == "scratch" and not cfg.vq.diffusers_config:
        raise config.UsageError("pretrain ar: set vq.init_from to a trained tokenizer (python pretrain.py vq ...)")
    clips, held, held_clips = clips_and_held_out(cfg, cfg.ar.n_codes)
    # A fresh transformer (a config's ar.init_from names what RL starts from, not what this trains);
    # --pretrain.init_from continues a run, as in every stage.
    model = model_ar.build_world_model(dataclasses.replace(cfg.ar, init_from="scratch"), cfg.vq)
    if cfg.pretrain.init_from:
        model_ar.load_checkpoint(model, cfg.pretrain.init_from, "pretrain.init_from")
    model.to(device)
    batches = with_label_noise(data.batches(clips, cfg.pretrain.batch_size, cfg.run.seed, 0, *runtime.rank_world(),
                                            offset=cfg.ar.n_codes, camera_tokens=cfg.data.camera_tokens), cfg)

    def loss_fn(step):                                        # next-token cross-entropy on image
        batch = next(batches)                                 # tokens; actions are given, not learned
        model.train()
        return model_ar.lm_loss(model, batch["frames"].to(device), batch["tokens"].to(device))

    @torch.no_grad()
    def evaluate():
        model.eval()
        loss = model_ar.lm_loss(model, held["frames"][:32].to(device), held["tokens"][:32].to(device))
        # Sampled clips, not the loss, say how well actions are followed.
        return {"held_out_loss": round(float(loss), 4),
                **action_following(model_ar, model, held_clips, cfg, device)}

    fit("ar", cfg, model, loss_fn, evaluate,
        lambda out: runtime.save_atomic({"state_dict": half(model)}, out), device)


# ---------------------------------------------------------------------------------------------
# Frame autoencoder and NFD base model (§4.3: continuous per-frame latents, flow matching with
# diffusion forcing). NFD's weights are not public: this is how a user makes a base model, here
# or at paper scale with torchrun on VPT data.
# ---------------------------------------------------------------------------------------------
def train_ae(cfg: Config, device: torch.device) -> None:
    clips, held, _ = clips_and_held_out(cfg)
    ae = model_diffusion.FrameAE(cfg.ae)
    if cfg.pretrain.init_from:
        model_diffusion.load_weights(ae, cfg.pretrain.init_from, "pretrain.init_from")
    ae.to(device)
    sample = frame_batches(clips, cfg, device)

    def loss_fn(step):
        ae.train()
        return ae.loss(sample())                              # reconstruction + latent regulariser

    @torch.no_grad()
    def evaluate():
        ae.eval()
        x = held["frames"][:, 1:].flatten(0, 1).to(device)   # [N*15, H, W, 3]
        mse = ((ae.decode(ae.encode(x)).float() - x.float()) ** 2).mean()
        return {"psnr": round(float(10 * torch.log10(255 ** 2 / mse)), 2)}

    fit("ae", cfg, ae, loss_fn, evaluate,
        lambda out: runtime.save_atomic({"model": half(ae)}, out), device)


def train_nfd(cfg: Config, device: torch.device) -> None:
    if not cfg.ae.init_from:
        raise config.UsageError("pretrain nfd: set ae.init_from to a trained frame autoencoder "
                                "(python pretrain.py ae ...)")
    model = model_diffusion.NFD(cfg.nfd, cfg.ae)
    model_diffusion.load_weights(model.ae, cfg.ae.init_from)
    clips, held, held_clips = clips_and_held_out(cfg)
    if cfg.pretrain.init_from:
        model_diffusion.load_weights(model, cfg.pretrain.init_from, "pretrain.init_from")
    model.to(device)
    batches = with_label_noise(data.batches(clips, cfg.pretrain.batch_size, cfg.run.seed, 0, *runtime.rank_world(),
                                            camera_tokens=cfg.data.camera_tokens), cfg)
    gen = torch.Generator(device).manual_seed(cfg.run.seed * 1000 + runtime.rank_world()[0])

    def loss_fn(step):                                        # flow matching, an independent noise
        batch = next(batches)                                 # level per frame (diffusion forcing)
        model.train()
        return model_diffusion.fm_loss(model, batch["frames"].to(device), batch["tokens"].to(device), gen)

    @torch.no_grad()
    def evaluate():
        model.eval()
        loss = model_diffusion.fm_loss(model, held["frames"][:32].to(device), held["tokens"][:32].to(device),
                                       torch.Generator(device).manual_seed(0))
        return {"held_out_loss": round(float(loss), 4),
                **action_following(model_diffusion, model, held_clips, cfg, device)}

    fit("nfd", cfg, model, loss_fn, evaluate,
        lambda out: runtime.save_atomic({"model": half(model)}, out), device)


STAGES = {"idm": train_idm, "vq": train_vq, "ar": train_ar, "ae": train_ae, "nfd": train_nfd}


def main(argv: list[str]) -> None:
    if not argv or argv[0] not in STAGES:
        raise config.UsageError(f"usage: python pretrain.py {{{'|'.join(STAGES)}}} [CONFIG.yaml] [--section.key=value]")
    cfg, _ = config.parse(Config, argv[1:])
    # The files the stage reads and writes, checked before the data is made and the model trained.
    out, init = checkpoint_path(argv[0], cfg), cfg.pretrain.init_from
    if out.is_dir():
        raise config.UsageError(f"pretrain.out={out}: is a folder; give the path of the checkpoint file to write")
    runtime.output_folder(out.parent, "pretrain.out")
    if init and not Path(init).is_file():
        raise FileNotFoundError(f"pretrain.init_from: no checkpoint at {init}; point it at an existing file")
    device, _, _ = runtime.setup(cfg.run)                     # torchrun sets RANK; nccl on GPU, gloo on CPU
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(cfg.run.seed)                           # same init on every rank
    STAGES[argv[0]](cfg, device)
    runtime.teardown()


if __name__ == "__main__":
    runtime.cli(main)
