"""Tests for model_ar.py: HF parity, paper-scale sizes, KV cache, log-probs, sampling, checkpoints, VQ, FSQ."""
import argparse
import dataclasses
import math
import sys
from pathlib import Path

import pytest
import torch
import yaml
from einops import rearrange

import config
import model_ar
from model_ar import (
    ACTION_VOCAB,
    FSQ,
    ARConfig,
    Rollout,
    Tokenizer,
    Transformer,
    VQConfig,
    WorldModel,
    build_sequence,
    build_world_model,
    code_usage,
    generate,
    generated_positions,
    lm_loss,
    load_mineworld_vae,
    log_probs,
    new_cache,
    quantize,
    reference,
    rollout,
    sample_frames,
    sample_image_token,
    top_p_filter,
)
from runtime import ConfigError

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def tiny_configs(**ar_overrides) -> tuple[ARConfig, VQConfig]:
    """3 frames of 16×16 pixels, stride 8 -> 2×2 = 4 image tokens per frame, 16 codes."""
    ar = dict(vocab_size=16 + 70, n_codes=16, hidden=32, intermediate=64, heads=4, kv_heads=2, layers=2,
              frames=3, image_tokens=4)
    ar.update(ar_overrides)
    return ARConfig(**ar), VQConfig(frame_hw=(16, 16), stride=8, codebook_size=16, code_dim=8, channels=8)


def tiny_model(seed: int = 0, **ar_overrides) -> WorldModel:
    """Random weights large enough that logits are O(1) and attention is far from uniform."""
    torch.manual_seed(seed)
    model = WorldModel(*tiny_configs(**ar_overrides))
    with torch.no_grad():
        for p in model.transformer.parameters():
            p.normal_(0.0, 0.5)
    return model


def prompt(cfg: ARConfig, batch: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randint(0, 256, (batch, 16, 16, 3), dtype=torch.uint8, generator=g)
    shape = (batch, cfg.frames, cfg.action_tokens)
    actions = torch.randint(cfg.n_codes, cfg.n_codes + ACTION_VOCAB, shape, generator=g)
    return x0, actions


# ---------------------------------------------------------------------------------------------------------
# Architecture


def test_logits_match_hf_llama():
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.LlamaConfig(vocab_size=86, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                      num_key_value_heads=2, num_hidden_layers=2, max_position_embeddings=48,
                                      rope_theta=1e4, rms_norm_eps=1e-5, tie_word_embeddings=False,
                                      attention_bias=False, mlp_bias=False)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.5)  # norms too, so a mis-ordered RMSNorm scale would show
    ours = Transformer(tiny_configs(frames=3, image_tokens=5)[0])  # max_pos = 3 × 16 = 48
    assert set(ours.state_dict()) == set(hf.state_dict())  # HF / MineWorld key names, no extras
    ours.load_state_dict(hf.state_dict())
    ids = torch.randint(0, 86, (2, 40))
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours(ids)
    assert expected.abs().max() > 1.0  # the comparison is not between near-zero numbers
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name, millions", [("mineworld_300m", 321.0), ("mineworld_700m", 726.0),
                                            ("mineworld_1200m", 1229.3)])
def test_paper_scale_parameter_counts(name, millions):
    sections = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    ar = ARConfig(**{**sections["ar"], "init_from": "scratch"})
    vq = VQConfig(**{**sections["vq"], "frame_hw": tuple(sections["vq"]["frame_hw"]), "diffusers_config": None})
    assert (ar.max_pos, ar.seq_len, ar.frame_len) == (5552, 5541, 347)
    with torch.device("meta"):
        model = WorldModel(ar, vq)  # also checks n_codes = codebook, 14×24 = 336 tokens, vocab ≥ 8192 + 68
    n = sum(p.numel() for p in model.transformer.parameters())
    assert abs(n / 1e6 - millions) < 0.05, n
    assert model.transformer.model.layers[0].self_attn.k_proj.weight.shape == (256, ar.hidden)  # 4 kv heads × 64


def test_default_toy_config_is_consistent_and_bad_configs_are_named():
    model = WorldModel(ARConfig(), VQConfig())  # 64×64 frames, stride 8 -> 64 tokens, 512 codes, vocab 582
    assert model.cfg.seq_len == 16 * 64 + 15 * 11 and model.tokenizer.cfg.grid == (8, 8)
    assert sum(p.requires_grad for p in model.tokenizer.parameters()) == 0  # the tokenizer is frozen
    with pytest.raises(ValueError, match=r"ar.image_tokens \(64\) != vq grid 4×4 = 16"):
        WorldModel(ARConfig(), VQConfig(stride=16))
    with pytest.raises(ValueError, match=r"ar.n_codes \(512\) != vq.codebook_size \(256\)"):
        WorldModel(ARConfig(), VQConfig(codebook_size=256))


def test_sequence_layout_and_mask_positions():
    cfg = tiny_configs()[0]  # 3 frames, 4 image tokens, 11 action tokens
    image = torch.arange(12).view(1, 3, 4)  # image ids 0..11, frame t holds 4t..4t+3
    actions = 100 + torch.arange(33).view(1, 3, 11)  # row t = tokens of a_t; row 0 must not appear
    seq = build_sequence(image, actions)[0].tolist()
    assert seq == [0, 1, 2, 3, *range(111, 122), 4, 5, 6, 7, *range(122, 133), 8, 9, 10, 11]
    assert len(seq) == cfg.seq_len == 34
    gen = generated_positions(cfg)
    assert gen.nonzero().flatten().tolist() == [15, 16, 17, 18, 30, 31, 32, 33]


# ---------------------------------------------------------------------------------------------------------
# Rollout, KV cache, log-probs


def test_kv_cache_logits_equal_full_recompute_along_a_rollout():
    model = tiny_model()
    cfg = model.cfg
    x0, actions = prompt(cfg, batch=3)
    tokens = generate(model, x0, actions, 1.0, 1.0, torch.Generator().manual_seed(0)).tokens
    with torch.no_grad():
        full = model.transformer(tokens)  # [B, L, V]
        cache = new_cache(model.transformer, 3, cfg.seq_len)
        # the rollout's schedule: prefill img_0 + act(a_1); single tokens; last image token + next action together
        chunks, pos = [cfg.frame_len], cfg.frame_len
        for t in range(1, cfg.frames):
            for j in range(cfg.image_tokens):
                step = cfg.frame_len - cfg.image_tokens + 1 if j == cfg.image_tokens - 1 else 1
                step = min(step, cfg.seq_len - pos)
                chunks.append(step)
                pos += step
        assert sum(chunks) == cfg.seq_len and max(chunks[1:]) == 12
        cached, start = [], 0
        for step in chunks:
            cached.append(model.transformer(tokens[:, start:start + step], start, cache))
            start += step
    cached = torch.cat(cached, dim=1)  # [B, L, V]
    assert full.std() > 0.5
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("heads, kv_heads", [(4, 2), (4, 4), (4, 1)])
def test_rollout_logits_equal_full_recompute_at_every_sampled_token(monkeypatch, heads, kv_heads):
    """The cached decode step (one query whose heads, grouped by kv head, attend to the cache) gives at every
    sampled token the logits of the whole prefix recomputed without a cache, to 1e-4; and the rollout draws the
    tokens a plain sampler draws from those logits with the same per-group generators."""
    model = tiny_model(heads=heads, kv_heads=kv_heads, frames=4)
    cfg = model.cfg
    x0, actions = prompt(cfg, batch=4)
    seen, draw = [], model_ar.sample_image_token

    def recording(logits, *args):
        seen.append(logits.clone())
        return draw(logits, *args)

    monkeypatch.setattr(model_ar, "sample_image_token", recording)
    ro = generate(model, x0, actions, 1.0, 0.9, [torch.Generator().manual_seed(s) for s in (0, 1)])
    pos = generated_positions(cfg).nonzero().squeeze(1)  # [G]: the sampled positions, in order
    assert len(seen) == len(pos) == (cfg.frames - 1) * cfg.image_tokens
    gens = [torch.Generator().manual_seed(s) for s in (0, 1)]
    with torch.no_grad():
        for i, p in enumerate(pos.tolist()):
            full = model.transformer(ro.tokens[:, :p])[:, -1]  # [B, V]: no cache, the whole prefix
            torch.testing.assert_close(seen[i], full, atol=1e-4, rtol=0)
            ids, lp = draw(full, cfg.n_codes, 1.0, 0.9, gens)
            assert torch.equal(ids, ro.tokens[:, p])
            torch.testing.assert_close(lp, ro.logp[:, p], atol=1e-4, rtol=0)
    assert torch.stack(seen).std() > 0.5 and len(ro.tokens[:, pos].unique()) > 4   # far from uniform, varied


def test_exponential_noise_per_group_is_each_groups_own_stream():
    """One generator per group of rows: rows 2i..2i+1 are exactly what generator i alone draws for them."""
    race = model_ar.exponential_noise((6, 5), [torch.Generator().manual_seed(s) for s in (0, 1, 2)], "cpu")
    for i, s in enumerate((0, 1, 2)):
        alone = torch.empty(2, 5).exponential_(1.0, generator=torch.Generator().manual_seed(s))
        assert torch.equal(race[2 * i:2 * i + 2], alone)
    assert not torch.equal(race[:2], race[2:4])


def test_log_probs_equal_rollout_logp_on_first_pass():
    model = tiny_model()
    x0, actions = prompt(model.cfg, batch=4)
    ro = generate(model, x0, actions, 0.7, 0.9, torch.Generator().manual_seed(3))
    lp = log_probs(model, ro)[0]
    assert lp.shape == ro.logp.shape == ro.tokens.shape
    assert not ro.logp.requires_grad and lp.requires_grad
    assert (ro.logp[ro.mask.bool()] < 0).all()  # real log-probs where generated, 0 elsewhere
    torch.testing.assert_close(lp, ro.logp, atol=1e-5, rtol=0)
    # under a different temperature the same tokens get different log-probs: log_probs replays rollout.temperature
    other = dataclasses.replace(ro, temperature=1.3)
    assert (log_probs(model, other)[0] - ro.logp).abs().max() > 1e-2
    # each frame's image tokens are one block of frame_len positions; frame_of names it
    n = model.cfg.image_tokens
    assert ro.frame_of[ro.mask[0].bool()].tolist() == [t for t in range(1, model.cfg.frames) for _ in range(n)]
    # the KL to a reference: k3 of the log-probs, exactly 0 when the reference is the policy itself
    ref = reference(model, ro)
    torch.testing.assert_close(ref, ro.logp, atol=1e-5, rtol=0)
    _, kl = log_probs(model, dataclasses.replace(ro, ref=ref))
    assert kl.abs().max() < 1e-4
    _, kl = log_probs(model, dataclasses.replace(ro, ref=ref - 0.5 * ro.mask))  # δ = −0.5 on every token
    torch.testing.assert_close(kl, (math.exp(-0.5) + 0.5 - 1) * ro.mask, atol=1e-4, rtol=0)
    lp.sum().backward()
    assert model.transformer.lm_head.weight.grad.abs().sum() > 0


def test_actions_never_sampled_and_mask_is_generated_image_tokens():
    model = tiny_model()
    cfg = model.cfg
    with torch.no_grad():  # image logits all 0, action logits large: actions dominate the full vocabulary
        model.transformer.lm_head.weight[:cfg.n_codes] = 0.0
        model.transformer.lm_head.weight[cfg.n_codes:] *= 20.0
    x0, actions = prompt(cfg, batch=4)
    ro = generate(model, x0, actions, 1.0, 1.0, torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model(ro.tokens).argmax(-1) >= cfg.n_codes).float().mean() > 0.9  # the test is not vacuous
    gen = ro.mask.bool()
    assert gen.sum(1).tolist() == [(cfg.frames - 1) * cfg.image_tokens] * 4
    assert (ro.tokens[gen] < cfg.n_codes).all()
    assert torch.equal(ro.tokens, build_sequence(_image_ids(ro, cfg), actions))  # actions injected unchanged
    assert (ro.logp[~gen] == 0).all()
    assert ro.frames.shape == (4, cfg.frames, 16, 16, 3) and ro.frames.dtype == torch.uint8
    assert torch.equal(ro.frames[:, 0], model.tokenizer.decode(model.tokenizer.encode(x0)))  # x0 round-tripped
    assert torch.equal(ro.frames[:, 1], model.tokenizer.decode(ro.tokens[:, 15:19]))
    assert torch.equal(ro.tokens[:, :4], model.tokenizer.encode(x0))


def _image_ids(ro: Rollout, cfg: ARConfig) -> torch.Tensor:
    """Image ids [B, F, N] read back out of a rollout sequence (frame 0 from the front, the rest from the mask)."""
    b = ro.tokens.shape[0]
    rest = ro.tokens[:, generated_positions(cfg)].view(b, cfg.frames - 1, cfg.image_tokens)
    return torch.cat([ro.tokens[:, None, :cfg.image_tokens], rest], dim=1)


@pytest.mark.slow
def test_full_length_default_rollout_log_probs_match():
    torch.manual_seed(0)
    model = WorldModel(ARConfig(), VQConfig())
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8, generator=g)
    actions = torch.randint(512, 512 + ACTION_VOCAB, (2, 16, 11), generator=g)
    ro = generate(model, x0, actions, 1.0, 0.8, g)
    assert ro.frames.shape == (2, 16, 64, 64, 3) and ro.mask.sum() == 2 * 15 * 64
    torch.testing.assert_close(log_probs(model, ro)[0], ro.logp, atol=1e-5, rtol=0)


def test_rollout_is_deterministic_given_a_generator():
    model = tiny_model()
    x0, actions = prompt(model.cfg, batch=2)
    a = generate(model, x0, actions, 1.0, 1.0, torch.Generator().manual_seed(5))
    b = generate(model, x0, actions, 1.0, 1.0, torch.Generator().manual_seed(5))
    c = generate(model, x0, actions, 1.0, 1.0, torch.Generator().manual_seed(6))
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.logp, b.logp)
    assert not torch.equal(a.tokens, c.tokens)
    frames = sample_frames(model, x0, actions, config.Config(), torch.Generator().manual_seed(5))  # T=1, top-p 0.8
    assert frames.shape == a.frames.shape


def test_rollout_rejects_bad_action_tokens():
    model = tiny_model()
    x0, actions = prompt(model.cfg, batch=2)
    with pytest.raises(ValueError, match=r"action_to_tokens\(action, offset=16\)"):
        rollout(model, x0, actions - 16, config.Config())
    with pytest.raises(ValueError, match=r"\[2, 3, 11\]"):
        rollout(model, x0, actions[:, :2], config.Config())


def test_lm_loss_is_mean_negative_log_prob_of_generated_image_tokens():
    model = tiny_model()
    cfg = model.cfg
    g = torch.Generator().manual_seed(2)
    frames = torch.randint(0, 256, (2, cfg.frames, 16, 16, 3), dtype=torch.uint8, generator=g)
    _, actions = prompt(cfg, batch=2)
    ids = model.tokenizer.encode(frames.flatten(0, 1)).view(2, cfg.frames, -1)
    tokens = build_sequence(ids, actions)
    mask = generated_positions(cfg).float().expand(2, -1)
    lp, _ = log_probs(model, Rollout(tokens, torch.zeros_like(mask), mask, frames, 1.0, torch.zeros(0)))
    loss = lm_loss(model, frames, actions)
    torch.testing.assert_close(loss, -lp.sum() / mask.sum())
    assert loss.item() > 0


# ---------------------------------------------------------------------------------------------------------
# Sampling


def test_top_p_masks_by_mass_before_each_token():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    # sorted 0.5, 0.3, 0.15, 0.05; mass before each 0, 0.5, 0.8, 0.95
    torch.testing.assert_close(top_p_filter(probs, 0.7), torch.tensor([[0.0, 0.625, 0.0, 0.375]]))
    torch.testing.assert_close(top_p_filter(probs, 0.85), torch.tensor([[0.0, 0.5, 0.15, 0.3]]) / 0.95)
    torch.testing.assert_close(top_p_filter(probs, 0.1), torch.tensor([[0.0, 1.0, 0.0, 0.0]]))
    assert torch.equal(top_p_filter(probs, 1.0), probs)


def test_sampling_frequencies_follow_the_top_p_distribution():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    logits = torch.cat([probs.log(), torch.full((3,), 50.0)])  # 3 huge "action" logits past n_codes = 4
    n = 20000
    ids, logp = sample_image_token(logits.expand(n, -1), 4, 1.0, 0.7, torch.Generator().manual_seed(0))
    freq = torch.bincount(ids, minlength=4).float() / n
    assert freq[0] == 0 and freq[2] == 0  # outside the nucleus
    assert abs(freq[1] - 0.625) < 0.015 and abs(freq[3] - 0.375) < 0.015  # ±3 sd
    # the log-prob is under the full (untruncated) distribution, not the renormalised nucleus
    torch.testing.assert_close(logp[ids == 1], torch.full_like(logp[ids == 1], 0.5).log())


# ---------------------------------------------------------------------------------------------------------
# Checkpoints


def test_mineworld_layout_checkpoint_loads_and_reproduces_logits(tmp_path):
    model = tiny_model(seed=7)
    sd = model.state_dict()
    assert any(k.startswith("tokenizer.model.quantize.embedding") for k in sd)
    assert "transformer.model.layers.1.self_attn.k_proj.weight" in sd and "transformer.lm_head.weight" in sd
    torch.save({"state_dict": sd, "epoch": 3}, tmp_path / "300M_16f.ckpt")
    torch.save(sd, tmp_path / "raw.bin")
    x0, actions = prompt(model.cfg, batch=2)
    expected = model(generate(model, x0, actions, 1.0, 1.0, torch.Generator().manual_seed(0)).tokens)
    for name in ("300M_16f.ckpt", "raw.bin"):
        ar, vq = tiny_configs(init_from=str(tmp_path / name))
        loaded = build_world_model(ar, vq)
        tokens = generate(loaded, x0, actions, 1.0, 1.0, torch.Generator().manual_seed(0)).tokens
        torch.testing.assert_close(loaded(tokens), expected, atol=0, rtol=0)


def test_checkpoint_with_missing_or_misshaped_key_is_rejected_by_name(tmp_path):
    sd = tiny_model().state_dict()
    del sd["transformer.model.layers.1.mlp.up_proj.weight"]
    sd["transformer.model.norm.weight"] = torch.ones(33)
    sd["transformer.model.layers.2.mlp.up_proj.weight"] = torch.ones(64, 32)  # a layer the config does not have
    torch.save({"state_dict": sd}, tmp_path / "bad.ckpt")
    ar, vq = tiny_configs(init_from=str(tmp_path / "bad.ckpt"))
    with pytest.raises(ValueError) as err:
        build_world_model(ar, vq)
    msg = str(err.value)
    assert "missing keys (1): ['transformer.model.layers.1.mlp.up_proj.weight']" in msg
    assert "transformer.model.norm.weight: file (33,) vs model (32,)" in msg
    assert "unexpected keys (1): ['transformer.model.layers.2.mlp.up_proj.weight']" in msg
    with pytest.raises(FileNotFoundError, match="nowhere.ckpt"):
        build_world_model(*tiny_configs(init_from=str(tmp_path / "nowhere.ckpt")))
    torch.save({"state_dict": sd, "args": argparse.Namespace(lr=1.0)}, tmp_path / "pickled.ckpt")
    with pytest.raises(config.UsageError, match="pickled.ckpt: cannot read .*weights_only=True"):
        build_world_model(*tiny_configs(init_from=str(tmp_path / "pickled.ckpt")))


# ---------------------------------------------------------------------------------------------------------
# VQ tokenizer


def test_vq_encode_decode_shapes_and_nearest_code():
    model = tiny_model()
    frames = torch.randint(0, 256, (5, 16, 16, 3), dtype=torch.uint8)
    ids = model.tokenizer.encode(frames)
    assert ids.shape == (5, 4) and ids.dtype == torch.long and 0 <= ids.min() and ids.max() < 16
    z = model.tokenizer.latents(frames).permute(0, 2, 3, 1).reshape(5, 4, -1)  # row-major [B, h·w, D]
    brute = torch.cdist(z, model.tokenizer.model.quantize.embedding.weight[None]).argmin(-1)
    assert torch.equal(ids, brute)
    out = model.tokenizer.decode(ids)
    assert out.shape == (5, 16, 16, 3) and out.dtype == torch.uint8
    with pytest.raises(ValueError, match=r"uint8 frames \[B, 16, 16, 3\]"):
        model.tokenizer.encode(frames.float())


def test_vq_straight_through_gradient_and_loss():
    codebook = torch.tensor([[0.0, 0.0], [1.0, 1.0], [-2.0, 3.0]])
    z = torch.tensor([[0.9, -1.5], [1.2, 2.5]]).view(1, 2, 1, 2).requires_grad_()  # [B, D, h, w], 2 vectors
    zq, ids, codebook_loss, commit_loss = quantize(z, codebook)
    assert ids.flatten().tolist() == [1, 2]  # (0.9, 1.2) -> (1, 1); (-1.5, 2.5) -> (-2, 3)
    torch.testing.assert_close(zq.detach(), torch.tensor([[1.0, -2.0], [1.0, 3.0]]).view(1, 2, 1, 2))
    weights = torch.randn_like(z)
    (zq * weights).sum().backward()
    assert torch.equal(z.grad, weights)  # backward passes straight through the quantizer
    torch.testing.assert_close(commit_loss, torch.tensor((0.01 + 0.04 + 0.25 + 0.25) / 4))
    torch.testing.assert_close(codebook_loss, commit_loss)
    # full loss: the encoder learns (through the straight-through path) and the codebook learns
    tok = tiny_model().tokenizer.requires_grad_(True)
    loss, stats = tok.loss(torch.randint(0, 256, (4, 16, 16, 3), dtype=torch.uint8))
    loss.backward()
    assert tok.model.encoder[0].weight.grad.abs().sum() > 0 and tok.model.quantize.embedding.weight.grad.abs().sum() > 0
    assert set(stats) == {"recon", "codebook", "commit", "perplexity", "used_codes"} and 1 <= stats["used_codes"] <= 16


def test_mineworld_vae_errors_say_what_to_do(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"config.json.*ModelScope"):
        load_mineworld_vae(str(tmp_path / "config.json"), str(tmp_path / "vae.ckpt"))
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "vae.ckpt").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "diffusers", None)  # behave as if diffusers were not installed
    with pytest.raises(ImportError, match=r"pip install diffusers==0.32.2"):
        load_mineworld_vae(str(tmp_path / "config.json"), str(tmp_path / "vae.ckpt"))


# ---------------------------------------------------------------------------------------------------------
# FSQ tokenizer (vq.kind fsq)


def fsq_config(**overrides) -> VQConfig:
    """The tiny tokenizer of tiny_configs with FSQ levels (4, 3): 2 channels, 12 codes, 2×2 tokens per frame."""
    return VQConfig(**{**dict(frame_hw=(16, 16), stride=8, codebook_size=12, code_dim=8, channels=8, kind="fsq",
                              levels=(4, 3)), **overrides})


def test_fsq_tokenizer_shapes_dtypes_and_a_world_model_on_top():
    torch.manual_seed(0)
    tok = Tokenizer(fsq_config())
    frames = torch.randint(0, 256, (5, 16, 16, 3), dtype=torch.uint8)
    ids = tok.encode(frames)
    assert ids.shape == (5, 4) and ids.dtype == torch.long and 0 <= ids.min() and ids.max() < 12
    out = tok.decode(ids)
    assert out.shape == (5, 16, 16, 3) and out.dtype == torch.uint8
    assert torch.equal(tok.roundtrip(frames[None]), out[None])
    # only the convs are weights: the quantizer has no parameters and saves nothing; quant_conv projects to 2 channels
    sd = tok.state_dict()
    assert not any(k.startswith("model.quantize") for k in sd) and sd["model.quant_conv.weight"].shape == (2, 8, 1, 1)
    # the AR world model runs on it unchanged: 12 image codes, then the action ids
    ar, _ = tiny_configs(n_codes=12)
    model = WorldModel(ar, fsq_config())
    x0, actions = prompt(ar, batch=2)
    ro = generate(model, x0, actions, 1.0, 1.0, torch.Generator().manual_seed(0))
    assert ro.frames.shape == (2, 3, 16, 16, 3) and (ro.tokens[ro.mask.bool()] < 12).all()


def test_a_non_square_grid_halves_the_width_more_and_keeps_the_square_layout():
    torch.manual_seed(0)
    tok = Tokenizer(fsq_config(frame_hw=(32, 32), stride=8, stride_w=16))  # 4 rows × 2 cols of tokens
    frames = torch.randint(0, 256, (3, 32, 32, 3), dtype=torch.uint8)
    assert tok.cfg.grid == (4, 2) and tok.latents(frames).shape == (3, 2, 4, 2)
    ids = tok.encode(frames)
    assert ids.shape == (3, 8) and 0 <= ids.min() and ids.max() < 12
    assert tok.decode(ids).shape == (3, 32, 32, 3)
    # stride_w = stride (or 0) is the square tokenizer: the same weights, so every shipped checkpoint loads
    square = {k: v.shape for k, v in Tokenizer(fsq_config(frame_hw=(32, 32))).state_dict().items()}
    assert square == {k: v.shape for k, v in Tokenizer(fsq_config(frame_hw=(32, 32), stride_w=8)).state_dict().items()}
    assert {k: v.shape for k, v in tok.state_dict().items()} != square  # one more conv each way
    with pytest.raises(ConfigError, match=r"frame_hw=\(32, 48\): .*strides \(8, 32\)"):
        fsq_config(frame_hw=(32, 48), stride_w=32)
    with pytest.raises(ConfigError, match=r"stride_w=12: must be 0 \(= stride\) or a power of 2"):
        fsq_config(stride_w=12)


def test_fsq_ids_and_per_channel_levels_are_a_bijection():
    levels = (2, 3, 4, 5, 8)  # even and odd, and the smallest level
    fsq, k, d = FSQ(levels), math.prod(levels), len(levels)
    ids = torch.arange(k)
    codes = fsq.ids_to_codes(ids)  # [K, d] normalised grid points
    assert codes.unique(dim=0).shape == (k, d) and codes.abs().max() <= 1  # K distinct points
    assert torch.equal(fsq.codes_to_ids(codes), ids)
    # the bound leaves exactly L_i integers per channel: a dense sweep of z reaches each of them, no more
    sweep = torch.linspace(-12, 12, 24001)  # [S]
    rounded = fsq.bound(sweep[:, None].expand(-1, d)).round()  # [S, d]
    assert [len(rounded[:, i].unique()) for i in range(d)] == list(levels)
    # at the quantizer: a latent in the middle of each code's cell quantizes to that code and id
    ints = codes * (torch.tensor(levels) // 2)  # [K, d]: the integer level of each channel
    z = torch.stack([torch.stack([sweep[rounded[:, i] == v].median() for v in ints[:, i]]) for i in range(d)], 1)
    zhat, got = fsq(rearrange(z, "k d -> 1 d k 1"))
    assert torch.equal(got.flatten(), ids)
    torch.testing.assert_close(rearrange(zhat, "1 d k 1 -> k d"), codes.float(), atol=1e-6, rtol=0)


def test_fsq_rounding_passes_the_bounds_gradient_straight_through():
    fsq = FSQ((5, 4))
    z = (1.5 * torch.randn(2, 2, 3, 3, generator=torch.Generator().manual_seed(0))).requires_grad_()
    zhat, _ = fsq(z)
    half = torch.tensor([2.0, 2.0]).view(1, 2, 1, 1)  # ⌊L/2⌋ per channel
    grid = (zhat * half).detach()  # the integer levels, up to float rounding
    torch.testing.assert_close(grid, grid.round(), atol=1e-6, rtol=0)  # the forward values are the grid
    weights = torch.randn_like(z)
    (zhat * weights).sum().backward()
    # expected: the bound's own derivative, as if there were no rounding (round_ste)
    plain = z.detach().requires_grad_()
    bounded = rearrange(fsq.bound(rearrange(plain, "b d h w -> b h w d")), "b h w d -> b d h w")
    (bounded / half * weights).sum().backward()
    torch.testing.assert_close(z.grad, plain.grad)
    assert (z.grad != 0).all() and not torch.allclose(z.grad, weights / half)  # f' in (0, 1], not the identity


def test_fsq_tokenizer_trains_one_pretrain_step():
    torch.manual_seed(0)
    tok = Tokenizer(fsq_config())
    opt = torch.optim.AdamW(tok.parameters(), lr=1e-3)
    before = tok.model.encoder[0].weight.detach().clone()
    loss, stats = tok.loss(torch.randint(0, 256, (4, 16, 16, 3), dtype=torch.uint8))
    assert torch.isfinite(loss) and loss.item() == pytest.approx(stats["recon"])  # no codebook, no commitment
    assert stats["codebook"] == stats["commit"] == 0 and 1 <= stats["used_codes"] <= 12
    loss.backward()
    assert tok.model.encoder[0].weight.grad.abs().sum() > 0  # through the rounding, down to the first conv
    opt.step()
    assert not torch.equal(tok.model.encoder[0].weight, before)


def test_code_usage_by_hand():
    assert code_usage(torch.tensor([[0, 2], [2, 0]]), 4) == {"codes_used": 2, "codes_share": 0.5,
                                                              "codes_perplexity": 2.0}
    assert code_usage(torch.arange(4), 4)["codes_perplexity"] == 4.0
    assert code_usage(torch.zeros(9, dtype=torch.long), 4) == {"codes_used": 1, "codes_share": 0.25,
                                                                "codes_perplexity": 1.0}


def test_fsq_config_errors_name_the_fields():
    with pytest.raises(ConfigError, match=r"levels=\(8, 8, 4\): .*product 256 .*codebook_size=512"):
        VQConfig(kind="fsq", levels=(8, 8, 4))
    with pytest.raises(ConfigError, match=r"levels=\(8, 1\): must be one or more levels, each >= 2"):
        VQConfig(levels=(8, 1))
    with pytest.raises(ConfigError, match=r"diffusers_config='vae/config.json'.*kind fsq"):
        VQConfig(kind="fsq", diffusers_config="vae/config.json")
    VQConfig(levels=(8, 8, 4))  # kind vq: the levels are unused, only range-checked
    cfg, _ = config.parse(config.Config, ["--vq.kind=fsq", "--vq.levels=[8, 8, 4]", "--vq.codebook_size=256"])
    assert cfg.vq.levels == (8, 8, 4) and cfg.vq.kind == "fsq"
    with pytest.raises(ConfigError, match=r"vq.kind: 'lfq' is not one of 'vq', 'fsq'"):
        config.parse(config.Config, ["--vq.kind=lfq"])
    with pytest.raises(ConfigError, match=r"vq.levels=\(8, 8\): with kind fsq"):
        config.parse(config.Config, ["--vq.kind=fsq", "--vq.levels=[8, 8]"])
