"""The training loop, the optimizer's parameter groups, the schedule, exact resume."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from memlm.config import ModelConfig, TrainConfig
from memlm.errors import MemlmError
from memlm.model import Decoder
from memlm.train import build_optimizer, compute_loss, latest_checkpoint, lr_at, train
from memlm.train.loop import METRICS_FILE

MODEL = ModelConfig(n_layer=2, n_embd=64, n_head=4, block_size=64, vocab_size=320)


pytestmark = pytest.mark.usefixtures("one_thread")  # fixtures: tests/conftest.py


def _cfg(out: Path, corpus: Path, tokenizer: Path | None, **overrides) -> TrainConfig:
    base = dict(
        out_dir=str(out), corpus=str(corpus), tokenizer=str(tokenizer) if tokenizer else None, vocab_size=320,
        steps=12, micro_batch=4, seq_len=32, lr=3e-3, min_lr=3e-4, warmup_steps=3,
        eval_every=6, eval_batches=2, save_every=6, log_every=1, device="cpu", threads=1,
    )
    return TrainConfig(**{**base, **overrides})


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / METRICS_FILE).read_text().splitlines()]


def _train_losses(run: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in _metrics(run) if "loss" in m}


# ---------------------------------------------------------------------------- the loop


def test_loss_decreases_and_run_folder_is_complete(tmp_path, corpus):
    run = tmp_path / "run"
    result = train(_cfg(run, corpus, None, steps=30, eval_every=10, save_every=10), MODEL)

    losses = _train_losses(run)
    assert sorted(losses) == list(range(1, 31))
    first, last = losses[1], sum(losses[s] for s in range(26, 31)) / 5
    assert last < first - 0.5, (first, last)
    assert result.final_step == 30 and result.last_loss == losses[30]
    assert [s for s, _ in result.eval_losses] == [10, 20, 30]
    assert result.eval_losses[-1][1] < result.eval_losses[0][1]
    assert result.tokens_per_s > 0 and result.peak_bytes > 0

    for name in ("config.toml", "metrics.jsonl", "tokenizer.json"):
        assert (run / name).is_file(), name
    assert "[model]" in (run / "config.toml").read_text() and "[train]" in (run / "config.toml").read_text()
    assert latest_checkpoint(run).name == "step-000030"
    assert len(list((run / "checkpoints").iterdir())) == 2  # keep_last = 2
    record = _metrics(run)[0]
    assert {"step", "loss", "lr", "tokens_per_s", "peak_bytes"} <= record.keys()
    assert any("eval_loss" in m for m in _metrics(run))
    # Nothing pickled: checkpoints are safetensors + JSON (the token cache is raw integers).
    assert not [p for p in run.rglob("*") if p.suffix in (".pt", ".pth", ".pkl")]
    assert not [p for p in run.rglob("*.bin") if "cache" not in p.parts]


@pytest.mark.parametrize("micro_batch, grad_accum", [(4, 1), (2, 2)])
def test_resume_gives_exactly_the_same_losses(tmp_path, corpus, tokenizer_dir, micro_batch, grad_accum):
    a, b = tmp_path / "a", tmp_path / "b"
    shape = dict(micro_batch=micro_batch, grad_accum=grad_accum)
    train(_cfg(a, corpus, tokenizer_dir, **shape), MODEL)

    stopped = train(_cfg(b, corpus, tokenizer_dir, **shape), MODEL, stop_after=6)
    assert stopped.final_step == 6 and latest_checkpoint(b).name == "step-000006"
    # The resume gives no tokenizer: the run's own is used.
    resumed = train(_cfg(b, corpus, None, **shape), MODEL, resume=True)
    assert resumed.final_step == 12

    la, lb = _train_losses(a), _train_losses(b)
    assert sorted(lb) == list(range(1, 13))  # no duplicated or missing steps in the log
    for step in range(1, 13):
        assert la[step] == lb[step], step
    assert resumed.eval_losses[-1][1] == _metrics(a)[-1]["eval_loss"]


def test_existing_checkpoints_need_resume(tmp_path, corpus, tokenizer_dir):
    run = tmp_path / "run"
    train(_cfg(run, corpus, tokenizer_dir, steps=2, save_every=2), MODEL)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(MemlmError) as e:
        train(_cfg(run, corpus, tokenizer_dir, steps=2), MODEL)
    assert "already has checkpoints" in e.value.message and "--resume" in e.value.hint
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before  # nothing overwritten


def test_resume_with_another_model_config_is_refused(tmp_path, corpus, tokenizer_dir):
    run = tmp_path / "run"
    train(_cfg(run, corpus, tokenizer_dir, steps=4), MODEL, stop_after=2)
    with pytest.raises(MemlmError) as e:
        train(_cfg(run, corpus, tokenizer_dir, steps=4), dataclasses.replace(MODEL, n_layer=3), resume=True)
    assert "n_layer" in e.value.message
    with pytest.raises(MemlmError) as e:
        train(_cfg(run, corpus, tokenizer_dir, steps=4, micro_batch=2), MODEL, resume=True)
    assert "micro_batch" in e.value.message


def test_seq_len_longer_than_block_size(tmp_path, corpus, tokenizer_dir):
    with pytest.raises(MemlmError) as e:
        train(_cfg(tmp_path / "run", corpus, tokenizer_dir, seq_len=65), MODEL)
    assert "block_size" in e.value.message


def test_corpus_too_small(tmp_path, tokenizer_dir):
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("a few words only, " * 4, encoding="utf-8")
    with pytest.raises(MemlmError) as e:
        train(_cfg(tmp_path / "run", tiny, tokenizer_dir), MODEL)
    assert "too small" in e.value.message


def test_bf16_autocast_runs(tmp_path, corpus, tokenizer_dir):
    result = train(
        _cfg(tmp_path / "run", corpus, tokenizer_dir, steps=3, precision="bf16-autocast", eval_batches=1), MODEL
    )
    assert math.isfinite(result.last_loss)
    assert all(math.isfinite(loss) for loss in _train_losses(tmp_path / "run").values())


def test_activation_checkpointing_gives_the_same_losses(tmp_path, corpus, tokenizer_dir):
    plain = train(_cfg(tmp_path / "a", corpus, tokenizer_dir, steps=3), MODEL)
    ckpt = train(_cfg(tmp_path / "b", corpus, tokenizer_dir, steps=3, activation_checkpointing=1), MODEL)
    assert ckpt.last_loss == pytest.approx(plain.last_loss, abs=1e-5)


def test_several_processes_without_torchrun_fail_clearly(tmp_path, corpus, tokenizer_dir):
    with pytest.raises(MemlmError) as e:
        train(_cfg(tmp_path / "run", corpus, tokenizer_dir, nproc=2), MODEL)
    assert "torchrun" in e.value.message + (e.value.hint or "")
    assert not (tmp_path / "run" / "config.toml").exists()


def test_grad_accum_counts_tokens(tmp_path, corpus, tokenizer_dir):
    train(_cfg(tmp_path / "run", corpus, tokenizer_dir, steps=2, micro_batch=2, grad_accum=3), MODEL)
    assert [m["tokens_seen"] for m in _metrics(tmp_path / "run") if "loss" in m] == [2 * 3 * 32, 2 * 2 * 3 * 32]


def test_resume_without_checkpoint_starts_fresh(tmp_path, corpus, tokenizer_dir):
    result = train(_cfg(tmp_path / "run", corpus, tokenizer_dir, steps=2), MODEL, resume=True)
    assert result.final_step == 2


# --------------------------------------------------------- loss, accumulation, optimizer


def _batch(seed: int = 0, n: int = 8, t: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, MODEL.vocab_size, (n, t + 1), generator=g)
    return rows[:, :-1], rows[:, 1:]


def test_gradient_accumulation_matches_one_big_batch():
    cfg = TrainConfig(lr=1e-3, grad_clip=1.0)
    torch.manual_seed(0)
    # No biases: the key bias has a true gradient of zero (softmax ignores a constant shift), so
    # its gradient is rounding noise that Adam's normalisation blows up into lr-sized steps.
    big = Decoder(dataclasses.replace(MODEL, bias=False))
    small = copy.deepcopy(big)
    opt_big, opt_small = build_optimizer(big, cfg), build_optimizer(small, cfg)
    for step in range(3):
        x, y = _batch(step)
        compute_loss(big, x, y, cfg).backward()  # micro_batch 8 x accum 1
        for k in range(2):  # micro_batch 4 x accum 2 on the same rows
            (compute_loss(small, x[4 * k : 4 * k + 4], y[4 * k : 4 * k + 4], cfg) / 2).backward()
        # the accumulated gradients are the big batch's (up to float32 summation order) ...
        for (name, p), q in zip(big.named_parameters(), small.parameters()):
            scale = p.grad.abs().max().item()
            torch.testing.assert_close(p.grad, q.grad, atol=1e-5 * scale, rtol=1e-4, msg=name)
        for model, opt in ((big, opt_big), (small, opt_small)):
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
    # ... and so are the weights after three AdamW steps. Adam divides by sqrt(v): an entry whose
    # gradient is rounding noise moves by up to lr either way, so the weights are compared at a
    # fraction of one step (lr = 1e-3), not at float32 precision (which depends on the CPU's kernels).
    for (name, p), q in zip(big.named_parameters(), small.parameters()):
        torch.testing.assert_close(p, q, atol=2e-4, rtol=0, msg=name)


def test_param_groups_decay_matrices_and_embeddings_only():
    model = Decoder(MODEL)
    opt = build_optimizer(model, TrainConfig(weight_decay=0.1))
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)] for p in opt.param_groups[0]["params"]}
    no_decay = {names[id(p)] for p in opt.param_groups[1]["params"]}
    assert opt.param_groups[0]["weight_decay"] == 0.1 and opt.param_groups[1]["weight_decay"] == 0.0
    assert {"tok_emb.weight", "pos_emb.weight", "blocks.0.attn.q_proj.weight"} <= decay
    assert {"blocks.0.attn.q_proj.bias", "blocks.0.attn_norm.weight", "norm.weight", "norm.bias"} <= no_decay
    assert not decay & no_decay
    assert decay | no_decay == set(names.values())  # every parameter once (the tied head included)
    assert len(opt.param_groups[0]["params"]) + len(opt.param_groups[1]["params"]) == len(list(model.parameters()))


def test_adamw_matches_torch_adamw():
    """Our AdamW is torch's, with our groups and hyperparameters, fused on CPU (one pass, no
    temporaries). Both get the same gradients each step: Adam turns rounding noise in a
    gradient that is ~0 into lr-sized moves, so losses computed twice would not compare."""
    cfg = TrainConfig(lr=1e-2, weight_decay=0.1, beta1=0.8, beta2=0.9, eps=1e-7)
    torch.manual_seed(0)
    ours = Decoder(MODEL)
    ref = copy.deepcopy(ours)
    opt = build_optimizer(ours, cfg)
    assert opt.defaults["fused"] is True
    ref_opt = torch.optim.AdamW(  # torch's default (single-tensor) path on CPU
        [
            {"params": [p for p in ref.parameters() if p.dim() >= 2], "weight_decay": 0.1},
            {"params": [p for p in ref.parameters() if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=1e-2, betas=(0.8, 0.9), eps=1e-7,
    )
    for step in range(3):
        x, y = _batch(step)
        compute_loss(ours, x, y, cfg).backward()
        for p, q in zip(ours.parameters(), ref.parameters()):
            q.grad = p.grad.clone()
        for o in (opt, ref_opt):
            o.step()
            o.zero_grad(set_to_none=True)
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        # Scaling the gradient inside the fused step or before it may round one way or the other:
        # within 2 float32 ulps (an AVX2-only CPU differs from AVX-512 by one, here and there).
        torch.testing.assert_close(p, q, atol=1e-7, rtol=2.5e-7, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("loss_chunk", [0, 16])
def test_default_loss_is_cross_entropy_over_the_full_logits(loss_chunk):
    """fp32 without loss_chunk: the one-buffer head + loss (linear_cross_entropy) gives
    F.cross_entropy's value and gradients, ignored targets included, and the same under no_grad;
    so does the chunked loss. Both run the head over the scored rows only."""
    from memlm.train.loop import scored_rows
    from memlm.train.loss import IGNORE_INDEX

    torch.manual_seed(0)
    model = Decoder(dataclasses.replace(MODEL, bias=False))  # the head path needs a bias-free head
    x, y = _batch(3)
    y = y.clone()  # a view of the rows x is cut from
    y[0, :5] = IGNORE_INDEX
    y[2, 3:] = IGNORE_INDEX
    h, t = scored_rows(torch.randn(*y.shape, 8), y)
    assert h.shape == (int((y != IGNORE_INDEX).sum()), 8) and bool((t != IGNORE_INDEX).all())
    cfg = TrainConfig(loss_chunk=loss_chunk)
    loss = compute_loss(model, x, y, cfg)
    assert loss.grad_fn is not None
    assert loss_chunk or type(loss.grad_fn).__name__ == "_LinearCEBackward"
    (loss * 0.5).backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    ref = torch.nn.functional.cross_entropy(model(x).reshape(-1, MODEL.vocab_size), y.reshape(-1))
    (ref * 0.5).backward()
    torch.testing.assert_close(loss, ref, atol=1e-6, rtol=0)
    for name, p in model.named_parameters():
        torch.testing.assert_close(ours[name], p.grad, atol=1e-7, rtol=1e-5, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(compute_loss(model, x, y, cfg), ref, atol=1e-6, rtol=0)


def test_clip_grad_norm_matches_torch():
    from memlm.train.optim import clip_grad_norm

    torch.manual_seed(0)
    for max_norm in (0.5, 1e6):  # clipped, and left alone
        params = [torch.nn.Parameter(torch.randn(n)) for n in (7, 300, 12)]
        ref = [torch.nn.Parameter(p.detach().clone()) for p in params]
        for p, q in zip(params, ref):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        norm = clip_grad_norm(params, max_norm)
        ref_norm = torch.nn.utils.clip_grad_norm_(ref, max_norm)
        assert norm == pytest.approx(ref_norm.item(), rel=1e-6)
        for p, q in zip(params, ref):
            torch.testing.assert_close(p.grad, q.grad, atol=0, rtol=1e-6)
    assert clip_grad_norm([torch.nn.Parameter(torch.ones(3))], 1.0) == 0.0  # no gradients


@pytest.mark.parametrize("max_norm", [0.05, 1e6, 0.0])
def test_clipped_step_is_clip_then_step(max_norm):
    """The fused AdamW takes the clipping factor as its grad_scale (no pass over the gradients):
    the same weights as torch's clip_grad_norm_ followed by step(); the factor is this step's only."""
    from memlm.train.optim import clipped_step, takes_grad_scale

    torch.manual_seed(0)
    ours = Decoder(MODEL)
    ref = copy.deepcopy(ours)
    cfg = TrainConfig(lr=1e-2)
    opt, ref_opt = build_optimizer(ours, cfg), build_optimizer(ref, cfg)
    assert takes_grad_scale(opt)
    for step in range(3):
        x, y = _batch(step)
        compute_loss(ours, x, y, cfg).backward()
        for p, q in zip(ours.parameters(), ref.parameters()):
            q.grad = p.grad.clone()
        norm = clipped_step(opt, ours.parameters(), max_norm)
        assert not hasattr(opt, "grad_scale")
        if max_norm > 0:
            assert norm == pytest.approx(torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm).item(), rel=1e-5)
        else:
            assert norm is None
        ref_opt.step()
        for o in (opt, ref_opt):
            o.zero_grad(set_to_none=True)
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        # Scaling the gradient inside the fused step or before it may round one way or the other:
        # within 2 float32 ulps (an AVX2-only CPU differs from AVX-512 by one, here and there).
        torch.testing.assert_close(p, q, atol=1e-7, rtol=2.5e-7, msg=lambda m: f"{name}: {m}")


def test_sgd_optimizer():
    model = Decoder(MODEL)
    sgd = build_optimizer(model, TrainConfig(optimizer="sgd", lr=0.1))
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["momentum"] == 0.9


def test_lr_schedule():
    cfg = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, steps=110)
    assert lr_at(1, cfg) == pytest.approx(0.1)
    assert lr_at(5, cfg) == pytest.approx(0.5)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55)  # half way down the cosine: (lr + min_lr) / 2
    assert lr_at(35, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_at(110, cfg) == pytest.approx(0.1)
    assert lr_at(500, cfg) == pytest.approx(0.1)
    lrs = [lr_at(s, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # never goes back up after warmup
    no_warmup = dataclasses.replace(cfg, warmup_steps=0)
    assert lr_at(0, no_warmup) == pytest.approx(1.0)


def test_init_from_a_previous_run(tmp_path, corpus, tokenizer_dir):
    from memlm.loading import load_model
    from memlm.tokenizer import Tokenizer

    base = tmp_path / "base"
    train(_cfg(base, corpus, tokenizer_dir, steps=3), MODEL)
    source, _ = load_model(base)

    tuned = tmp_path / "tuned"
    # The model config given here is ignored: fine-tuning keeps the source model's shape.
    cfg = _cfg(tuned, corpus, None, steps=1, init_from=str(base), lr=1e-12, min_lr=1e-12, warmup_steps=0)
    train(cfg, dataclasses.replace(MODEL, n_layer=3))
    result, _ = load_model(tuned)
    assert result.config.n_layer == MODEL.n_layer
    for (name, p), q in zip(source.state_dict().items(), result.state_dict().values()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=name)
    assert Tokenizer.load(tuned).fingerprint() == Tokenizer.load(tokenizer_dir).fingerprint()
