"""The built-in pretrained model end to end: names, chat, eval, and HF folders in and out."""

import json
import struct

import pytest
import torch

from memlm.errors import MemlmError
from memlm.interop.hf import load_hf, save_hf
from memlm.loading import load, resolve
from tests.test_cli import assert_user_error, memlm


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf_path):
    return load("smollm2-135m-instruct")


def test_known_name_resolves_to_the_packaged_gguf(smollm2_gguf_path):
    kind, path = resolve("smollm2-135m-instruct")
    assert kind == "gguf" and path == smollm2_gguf_path


@pytest.mark.slow
def test_chat_cli_streams_keeps_history_and_resets(tmp_path, smollm2):
    script = "What is the capital of France?\n/reset\nSay hello.\n/exit\n"
    proc = memlm("chat", "--model", "smollm2-135m-instruct", "--temperature", "0", "--max-new-tokens", "24",
                 "--repetition-penalty", "1.0", cwd=tmp_path, input=script)
    assert proc.returncode == 0, proc.stderr
    replies = [line.split("bot> ", 1)[1] for line in proc.stdout.splitlines() if "bot> " in line]
    assert len(replies) == 2 and "(history cleared)" in proc.stderr
    assert "Paris" in replies[0]
    # The same turn through the Python API gives the same greedy reply.
    expected = smollm2.chat([{"role": "user", "content": "What is the capital of France?"}],
                            temperature=0, max_new_tokens=24)
    assert replies[0].strip() == expected.strip()
    # After /reset the second question is asked with no history: same as a fresh one-turn chat.
    fresh = smollm2.chat([{"role": "user", "content": "Say hello."}], temperature=0, max_new_tokens=24)
    assert replies[1].strip() == fresh.strip()


@pytest.mark.slow
def test_generate_chat_flag_one_turn(tmp_path, smollm2):
    proc = memlm("generate", "What is the capital of France?", "--chat", "--model", "smollm2-135m-instruct",
                 "--temperature", "0", "--max-new-tokens", "12", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout


@pytest.mark.slow
def test_perplexity_matches_transformers_on_real_text(smollm2, smollm2_gguf_path):
    """memlm's windowed perplexity = exp(mean HF loss) on the first windows of the eval split."""
    transformers = pytest.importorskip("transformers")
    from memlm.data import default_split
    from memlm.eval.perplexity import perplexity

    ids = smollm2.tokenizer.encode(default_split()[1])[: 3 * 256]
    ours = perplexity(smollm2.model, ids, window=256)
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_gguf_path.parent, gguf_file=smollm2_gguf_path.name, dtype=torch.float32).eval()
    total = 0.0
    with torch.no_grad():
        for w in range(3):
            x = torch.tensor([ids[w * 256:(w + 1) * 256]])
            total += ref(x, labels=x).loss.item() * 255
    assert ours.n_scored == 3 * 255
    assert ours.nll == pytest.approx(total / (3 * 255), rel=1e-4)


def test_hf_pytorch_bin_is_read_without_unpickling_code(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=100, n_positions=32, n_embd=32, n_layer=1, n_head=2)
    ref = transformers.GPT2LMHeadModel(cfg).eval()
    ref.config.to_json_file(tmp_path / "config.json")
    torch.save(ref.state_dict(), tmp_path / "pytorch_model.bin")  # the legacy format, a pickle of tensors
    ours = load_hf(tmp_path)
    ids = torch.randint(0, 100, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), ref(ids).logits, atol=1e-4, rtol=0)
    # A pickle that would run code is refused by weights_only loading.
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04cos\nsystem\n(S'echo pwned'\ntR.")
    with pytest.raises(MemlmError, match="cannot read weights"):
        load_hf(tmp_path)


def test_truncated_safetensors_is_a_clear_error(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, max_position_embeddings=32)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:500])
    proc = memlm("generate", "hi", "--model", str(tmp_path / "m"), cwd=tmp_path)
    assert_user_error(proc, "cannot read weights")
    # A header length pointing past the end of the file.
    weights.write_bytes(struct.pack("<Q", 10**9) + b"{}")
    with pytest.raises(MemlmError, match="cannot read weights"):
        load_hf(tmp_path / "m")


def test_unsupported_hf_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    with pytest.raises(MemlmError, match="'mamba' is not supported"):
        load_hf(tmp_path)


def test_export_cli_round_trips_through_hf_and_gguf(tmp_path):
    from memlm.config import ModelConfig
    from memlm.model import Decoder
    from memlm.tokenizer import train_bpe

    torch.manual_seed(0)
    model = Decoder(ModelConfig(vocab_size=300, block_size=32, n_layer=1, n_head=2, n_kv_heads=1, n_embd=32,
                                norm="rmsnorm", positions="rope", mlp="swiglu", bias=False)).eval()
    tok = train_bpe(["some text for a tiny tokenizer, some more text. " * 50], vocab_size=300)
    save_hf(model, tmp_path / "src", tok)
    assert memlm("export", str(tmp_path / "src"), "--to", "gguf", "--qtype", "F32",
                 "--out", str(tmp_path / "m.gguf"), cwd=tmp_path).returncode == 0
    back = load(tmp_path / "m.gguf")
    ids = torch.randint(0, 300, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(back.model(ids), model(ids), atol=1e-5, rtol=0)
    assert back.tokenizer.encode("some text") == tok.encode("some text")
