"""Knowledge distillation: the loss by hand, frozen teacher, and a short run that moves the student."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from memlm.compress import save_compressed
from memlm.config import ModelConfig, TrainConfig
from memlm.data import default_split
from memlm.errors import MemlmError
from memlm.loading import load_model
from memlm.model import Decoder
from memlm.tokenizer import train_bpe
from memlm.train.distill import Teacher, distill, distillation_loss, mean_kl

SMALL = dict(block_size=32, n_layer=1, n_head=2, n_kv_heads=1, n_embd=32, ffn_hidden=64, norm="rmsnorm",
             positions="rope", mlp="swiglu", bias=False)


pytestmark = pytest.mark.usefixtures("one_thread")  # fixtures: tests/conftest.py


@pytest.fixture(scope="module")
def tok():
    return train_bpe([default_split()[0][:30_000]], vocab_size=280)


def model(vocab: int, seed: int = 0, **changes) -> Decoder:
    torch.manual_seed(seed)
    return Decoder(ModelConfig(vocab_size=vocab, **{**SMALL, **changes}))


def test_loss_matches_hand_computation():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g) * 3
    y = torch.randint(0, 11, (2, 5), generator=g)
    T, alpha = 2.5, 0.3
    # by hand: sum_v p_t (log p_t - log p_s) at temperature T, averaged over the 10 tokens
    p_t = torch.softmax(t / T, -1)
    kl = (p_t * (torch.log(p_t) - torch.log_softmax(s / T, -1))).sum(-1).mean()
    ce = -torch.log_softmax(s, -1).gather(-1, y[..., None]).mean()
    expected = alpha * T * T * kl + (1 - alpha) * ce
    torch.testing.assert_close(distillation_loss(s, t, y, T, alpha), expected)
    # and against F.kl_div on log-softmax, the textbook form
    soft = F.kl_div(F.log_softmax(s / T, -1).reshape(-1, 11), F.softmax(t / T, -1).reshape(-1, 11), reduction="batchmean")
    torch.testing.assert_close(distillation_loss(s, t, y, T, 1.0), T * T * soft)
    assert float(distillation_loss(t, t, y, T, 1.0)) == pytest.approx(0.0, abs=1e-6)


def test_gradients_flow_only_to_the_student():
    teacher, student = Teacher(model(64, seed=1)), model(64, seed=2)
    x = torch.randint(0, 64, (2, 16))
    loss = teacher.loss(student, x, torch.roll(x, -1, 1))
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in teacher.model.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())


def test_vocabularies_must_match():
    with pytest.raises(MemlmError, match="one vocabulary"):
        distillation_loss(torch.zeros(4, 10), torch.zeros(4, 12), torch.zeros(4, dtype=torch.long))
    with pytest.raises(MemlmError, match="temperature"):
        Teacher(model(16), temperature=0)


def test_short_distill_run_lowers_the_kl(tmp_path, tok):
    # A teacher with sharp, structured predictions: a random model with a scaled-up final norm.
    teacher = model(tok.vocab_size, seed=3, n_embd=64, ffn_hidden=128, n_head=4, n_kv_heads=2)
    with torch.no_grad():
        teacher.norm.weight.mul_(8.0)
    save_compressed(teacher, tok, tmp_path / "teacher")  # an fp32 folder memlm.load reads
    corpus = tmp_path / "text.txt"
    corpus.write_text(default_split()[0][:30_000])

    cfg = TrainConfig(out_dir=str(tmp_path / "student"), corpus=str(corpus), steps=40, micro_batch=4, seq_len=32,
                      lr=3e-3, warmup_steps=2, eval_every=0, save_every=0, log_every=10, eval_batches=2, seed=7)
    student_cfg = ModelConfig(vocab_size=1, **SMALL)  # the vocabulary comes from the teacher's tokenizer
    result = distill(str(tmp_path / "teacher"), cfg, student_cfg, temperature=1.0, alpha=0.9)
    assert result.final_step == 40

    teacher_back, _ = load_model(tmp_path / "teacher")
    student, student_tok = load_model(tmp_path / "student")
    assert student_tok.fingerprint() == tok.fingerprint() and student.config.vocab_size == tok.vocab_size
    fresh = model(tok.vocab_size, seed=7)  # what the run started from (train seeds with cfg.seed)
    ids = torch.tensor(tok.encode(default_split()[1][:6000]))
    batches = [ids[i:i + 32][None] for i in range(0, 32 * 8, 32)]
    before, after = mean_kl(teacher_back, fresh, batches), mean_kl(teacher_back, student, batches)
    assert after < 0.7 * before, (before, after)
    assert (tmp_path / "student" / "distill.json").is_file()


def test_distill_cli_needs_a_student(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NO_COLOR": "1", "COLUMNS": "200"}
    proc = subprocess.run([sys.executable, "-m", "memlm", "distill", "--teacher", "smollm2-135m-instruct"],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "error: no student model given" in proc.stderr and "Traceback" not in proc.stderr
