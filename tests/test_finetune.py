"""memlm finetune on the training loop: data with loss on the answers, LoRA / QLoRA / full runs,
exact resume, the adapter files, merging, and bad input (one line, exit 2, nothing written)."""

from __future__ import annotations

import inspect
import json
import sys
import textwrap

import pytest
import torch

from memlm.config import TrainConfig, preset
from memlm.data_instruct import (
    IGNORE_INDEX,
    default_instruct_records,
    encode_conversation,
    read_records,
)
from memlm.errors import MemlmError
from memlm.finetune import FinetuneConfig, finetune, merge_adapter
from memlm.interop.hf import save_hf
from memlm.model import Decoder
from memlm.tokenizer import train_bpe

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
QA = [("What is the capital of France?", "Paris is the capital of France."),
      ("What colour is the sky?", "The sky is blue on a clear day."),
      ("How many legs has a cat?", "A cat has four legs."),
      ("What do bees make?", "Bees make honey from nectar.")]


def _chat_tokenizer(template: str | None = CHATML):
    text = " ".join(q + " " + a for q, a in QA) * 20 + " user assistant system"
    tok = train_bpe([text], vocab_size=400, special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>"))
    tok.chat_template = template
    tok.eos_id = tok.token_to_id("<|im_end|>")
    return tok


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny Llama-flavour 'pretrained' chat model as a Hugging Face folder (loads into int4 too)."""
    folder = tmp_path_factory.mktemp("base") / "hf"
    tok = _chat_tokenizer()
    torch.manual_seed(0)
    model = Decoder(preset("tiny", vocab_size=tok.vocab_size, n_layer=2, n_embd=64, n_head=4, n_kv_heads=2,
                           ffn_hidden=128, block_size=128))
    with torch.no_grad():  # a wide (tied) token table: the frozen head can then express sharp predictions
        model.tok_emb.weight.normal_(0, 1.0)
    save_hf(model, folder, tok)
    return folder


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in QA * 5]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cfg(out, steps=8, **kw) -> TrainConfig:
    return TrainConfig(out_dir=str(out), steps=steps, micro_batch=4, seq_len=64, lr=kw.pop("lr", 5e-3), warmup_steps=1,
                       eval_every=steps, save_every=kw.pop("save_every", steps), log_every=1, seed=3, **kw)


def test_a_conversation_is_rendered_with_the_loss_on_the_answers_only():
    tok = _chat_tokenizer()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": QA[0][0]},
                {"role": "assistant", "content": QA[0][1]}, {"role": "user", "content": QA[1][0]},
                {"role": "assistant", "content": QA[1][1]}]
    ex = encode_conversation(messages, tok, 1000)
    assert tok.decode(ex.ids) == tok.apply_chat_template(messages, add_generation_prompt=False)
    learned = tok.decode([t for t, lab in zip(ex.ids, ex.labels) if lab != IGNORE_INDEX])
    assert learned == f"{QA[0][1]}<|im_end|>\n{QA[1][1]}<|im_end|>\n"  # each answer and its end
    assert all(lab in (t, IGNORE_INDEX) for t, lab in zip(ex.ids, ex.labels))


def test_the_embedded_instruction_set_answers_from_pythons_own_documentation():
    from pydoc_data.topics import topics

    train, held = default_instruct_records("train"), default_instruct_records("eval")
    qa = {r["messages"][0]["content"]: r["messages"][1]["content"] for r in train + held}
    assert len(train) > 300 and 0.05 < len(held) / (len(train) + len(held)) < 0.15
    assert not {r["messages"][0]["content"] for r in train} & {r["messages"][0]["content"] for r in held}
    first = " ".join(inspect.getdoc(textwrap.dedent).split("\n\n")[0].split())
    assert qa["What does `textwrap.dedent` do?"] == first
    body = topics["with"].split("\n\n", 1)[1]
    assert qa["Explain the `with` statement."] == " ".join(body.split("\n\n")[0].split())
    assert default_instruct_records("eval") == held  # fixed


def _run(base_dir, data, out, **kw):
    fcfg = FinetuneConfig(model=str(base_dir), data=str(data), lora_r=4, lora_alpha=8, lora_targets="all-linear",
                          **{k: kw.pop(k) for k in ("quantize_base", "full", "task") if k in kw})
    run = {k: kw.pop(k) for k in ("resume", "stop_after") if k in kw}
    return finetune(fcfg, _cfg(out, **kw), **run)


@pytest.mark.parametrize("quantize_base", [None, "int4"])
def test_lora_and_qlora_learn_the_answers_and_write_a_peft_adapter(base_dir, chat_data, tmp_path, quantize_base,
                                                                    one_thread):
    import memlm
    from memlm.adapters.lora import lora_layers

    result, ft = _run(base_dir, chat_data, tmp_path / "run", steps=16, quantize_base=quantize_base, lr=3e-2)
    assert result.eval_losses[-1][1] < ft.eval_before - 0.5  # the held-out answers got much likelier
    run = tmp_path / "run"
    assert (run / "adapter" / "adapter_model.safetensors").is_file() and (run / "finetune.json").is_file()
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == list(range(1, 17))
    # a checkpoint holds only what trained: the adapters
    from safetensors import safe_open

    ckpt = sorted((run / "checkpoints").iterdir())[-1]
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        assert all(".lora_" in k for k in f.keys())
    if quantize_base == "int4":
        from memlm.compress.kinds import kind_of

        assert {kind_of(m.base_layer).name for m in lora_layers(ft.model).values()} == {"int4"}
    # the adapter on a fresh base through the public API computes what the trained model does
    lm = memlm.load(base_dir, weight_format=quantize_base, adapter=run / "adapter")
    x = torch.randint(0, 300, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(lm.model(x), ft.model.eval()(x), atol=1e-5, rtol=0)


def test_resume_continues_exactly(base_dir, chat_data, tmp_path, one_thread):
    straight, _ = _run(base_dir, chat_data, tmp_path / "a", steps=6, save_every=3)
    _run(base_dir, chat_data, tmp_path / "b", steps=6, save_every=3, stop_after=3)
    resumed, _ = _run(base_dir, chat_data, tmp_path / "b", steps=6, save_every=3, resume=True)
    assert resumed.last_loss == straight.last_loss
    losses = lambda run: [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()  # noqa: E731
                          if "loss" in json.loads(x)]
    assert losses(tmp_path / "a") == losses(tmp_path / "b")


def test_full_finetune_trains_every_weight(base_dir, chat_data, tmp_path, one_thread):
    import memlm

    result, ft = _run(base_dir, chat_data, tmp_path / "full", steps=6, full=True, lr=1e-3)
    assert result.eval_losses[-1][1] < ft.eval_before
    assert not (tmp_path / "full" / "adapter").exists()
    lm = memlm.load(tmp_path / "full")  # an ordinary run folder
    x = torch.randint(0, 300, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(lm.model(x), ft.model.eval()(x), atol=1e-5, rtol=0)


def test_merge_float_is_exact_and_int4_is_rounded_again(base_dir, chat_data, tmp_path, one_thread):
    import memlm

    _run(base_dir, chat_data, tmp_path / "run", steps=4)
    merged = merge_adapter(tmp_path / "run", tmp_path / "merged", eval_tokens=0)
    assert merged.layers == 2 * 7 and merged.weight_format == "fp32"
    ref = memlm.load(base_dir, adapter=tmp_path / "run" / "adapter").model
    out = memlm.load(tmp_path / "merged").model
    x = torch.randint(0, 300, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(out(x), ref(x), atol=1e-4, rtol=0)
    q = merge_adapter(tmp_path / "run", tmp_path / "merged4", weight_format="int4", eval_tokens=256)
    assert q.weight_format == "int4" and q.ppl_merged == pytest.approx(q.ppl_adapter, rel=0.1)
    assert memlm.load(tmp_path / "merged4").model.blocks[0].attn.q_proj.spec()["kind"] == "int4"


# ------------------------------------------------------------------------------ bad input


def _cli(monkeypatch, capsys, *args) -> tuple[int, str]:
    """memlm's CLI in this process (as `python -m memlm ...` runs it): exit status and stderr."""
    from memlm import cli

    monkeypatch.setattr(sys, "argv", ["memlm", *args])
    with pytest.raises(SystemExit) as e:
        cli.main()
    err = capsys.readouterr().err
    return e.value.code, err


def _assert_user_error(code, err, *fragments):
    assert code == 2, err
    assert "Traceback" not in err
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert sum(x.startswith("error: ") for x in lines) == 1 and lines[-1].startswith("hint: "), err
    for f in fragments:
        assert f in err, err


@pytest.mark.parametrize("content,fragment", [
    ("", "is empty"),
    ('{"messages": [{"role": "user", "content": "hi"}]}\n', "no assistant turn"),
    ('{"prompt": "hi"}\n', "neither a string 'text' nor 'messages'"),
])
def test_bad_instruction_data_is_refused(base_dir, tmp_path, monkeypatch, capsys, content, fragment):
    data = tmp_path / "data.jsonl"
    data.write_text(content)
    code, err = _cli(monkeypatch, capsys, "finetune", "--model", str(base_dir), "--data", str(data),
                     "--out", str(tmp_path / "run"), "--steps", "2")
    _assert_user_error(code, err, fragment)
    assert not (tmp_path / "run").exists()


def test_a_model_without_chat_template_and_a_rank_too_large_are_refused(tmp_path, chat_data, monkeypatch, capsys):
    folder = tmp_path / "plain"
    tok = _chat_tokenizer(template=None)
    save_hf(Decoder(preset("tiny", vocab_size=tok.vocab_size, n_layer=1, n_embd=64, n_head=4, n_kv_heads=2,
                           ffn_hidden=128, block_size=128)), folder, tok)
    code, err = _cli(monkeypatch, capsys, "finetune", "--model", str(folder), "--data", str(chat_data),
                     "--out", str(tmp_path / "run"), "--quantize-base", "none", "--seq-len", "64")
    _assert_user_error(code, err, "no chat template")
    code, err = _cli(monkeypatch, capsys, "finetune", "--model", str(folder), "--data", str(chat_data),
                     "--out", str(tmp_path / "run"), "--lora-r", "1000", "--quantize-base", "none", "--seq-len", "64")
    _assert_user_error(code, err, "rank 1000", "--lora-r at most")
    assert not (tmp_path / "run").exists()


def test_an_existing_run_is_not_overwritten(base_dir, chat_data, tmp_path, monkeypatch, capsys, one_thread):
    _run(base_dir, chat_data, tmp_path / "run", steps=2)
    before = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    code, err = _cli(monkeypatch, capsys, "finetune", "--model", str(base_dir), "--data", str(chat_data),
                     "--out", str(tmp_path / "run"), "--steps", "2", "--seq-len", "64")
    _assert_user_error(code, err, "already has checkpoints")
    assert {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()} == before


def test_read_records_checks_every_line(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(MemlmError, match="line 2: not valid JSON"):
        read_records(path)


# ------------------------------------------------------------------ several processes (torchrun)

def _finetune_cli(base_dir, chat_data, out, *extra: str) -> "subprocess.CompletedProcess":
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", COLUMNS="200", NO_COLOR="1")
    return subprocess.run([sys.executable, "-m", "memlm", "finetune", "--model", str(base_dir), "--data", str(chat_data),
                           "--out", str(out), "--steps", "4", "--micro-batch", "4", "--seq-len", "64", "--lr", "1e-2",
                           "--set", "train.seed=3", *extra],
                          capture_output=True, text=True, env=env, timeout=300, cwd=out.parent)


@pytest.mark.parametrize("quantize_base", ["int4", "none"])
def test_two_processes_fine_tune_as_one_does(base_dir, chat_data, tmp_path, quantize_base):
    """`memlm finetune --nproc 2` (DDP through torchrun, each rank half of every micro-batch) gives
    one process's losses, held-out figures and adapter; rank 0 alone writes and reports."""
    from safetensors.torch import load_file

    runs = {}
    for n in (1, 2):
        out = tmp_path / f"run{n}"
        proc = _finetune_cli(base_dir, chat_data, out, "--quantize-base", quantize_base, "--nproc", str(n))
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.count("fine-tuned 4 steps") == 1  # one report, from rank 0
        runs[n] = ([json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()],
                   load_file(str(out / "adapter" / "adapter_model.safetensors")), proc.stdout)
    (one, adapter1, out1), (two, adapter2, out2) = runs[1], runs[2]
    assert "starting 2 processes" in out2 + proc.stderr  # (proc: the 2-process run)
    assert [m["step"] for m in one] == [m["step"] for m in two]
    for a, b in zip(one, two):
        key = "loss" if "loss" in a else "eval_loss"
        assert b[key] == pytest.approx(a[key], rel=1e-5)
    held_out = lambda text: text.split("held-out loss ")[1].split(";")[0]  # noqa: E731  "before -> after"
    before1, before2 = (float(held_out(t).split(" -> ")[0]) for t in (out1, out2))
    assert before2 == pytest.approx(before1, rel=1e-6)  # the base's loss scored over the two ranks' rows
    assert one[-1]["eval_loss"] < before1 - 0.1  # and it learned
    assert adapter1.keys() == adapter2.keys()
    for k in adapter1:
        torch.testing.assert_close(adapter2[k], adapter1[k], atol=1e-5, rtol=1e-4)


def test_lora_on_several_processes_refuses_fsdp(base_dir, chat_data, tmp_path):
    out = tmp_path / "run"
    proc = _finetune_cli(base_dir, chat_data, out, "--nproc", "2", "--strategy", "fsdp")
    assert proc.returncode == 2 and "strategy 'ddp'" in proc.stderr and "Traceback" not in proc.stderr
    assert "starting" not in proc.stderr + proc.stdout and not out.exists()
    proc = _finetune_cli(base_dir, chat_data, out, "--nproc", "3")
    assert proc.returncode == 2 and "not divisible by the 3 processes" in proc.stderr and not out.exists()
