"""The OpenAI-compatible server: a real `memlm serve` process on 127.0.0.1, the real `openai` client."""

import os
import socket
import subprocess
import sys
import time

import pytest
import torch

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from memlm.config import ModelConfig  # noqa: E402
from memlm.infer.generate import generate_text  # noqa: E402
from memlm.infer.sampling import SamplingSettings  # noqa: E402
from memlm.interop.hf import save_hf  # noqa: E402
from memlm.loading import load  # noqa: E402
from memlm.model import Decoder  # noqa: E402
from memlm.tokenizer import train_bpe  # noqa: E402

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from memlm.data import default_split

    folder = tmp_path_factory.mktemp("served") / "tiny-chat"
    torch.manual_seed(0)
    tok = train_bpe([default_split()[0][:40_000]], vocab_size=400)
    tok.chat_template = CHAT_TEMPLATE
    model = Decoder(ModelConfig(vocab_size=tok.vocab_size, block_size=128, n_layer=2, n_head=4, n_kv_heads=2,
                                n_embd=64, norm="rmsnorm", positions="rope", mlp="swiglu", bias=False)).eval()
    save_hf(model, folder, tok)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "memlm", "serve", "--model", str(folder), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.5)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)
    yield client, load(folder)
    proc.terminate()
    proc.wait(timeout=30)


def test_lists_the_model(server):
    client, _ = server
    assert [m.id for m in client.models.list().data] == ["tiny-chat"]


def test_completion_equals_local_generation(server):
    client, lm = server
    prompt = "The for statement"
    resp = client.completions.create(model="tiny-chat", prompt=prompt, max_tokens=12, temperature=0)
    expected = generate_text(lm.model, lm.tokenizer, prompt, SamplingSettings(max_new_tokens=12, temperature=0))
    assert resp.choices[0].text == expected
    assert resp.choices[0].finish_reason in ("length", "stop")
    assert resp.usage.prompt_tokens == len(lm.tokenizer.encode(prompt))


def test_chat_streaming_equals_non_streaming(server):
    client, lm = server
    messages = [{"role": "user", "content": "What does the with statement do?"}]
    full = client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=16, temperature=0)
    stream = client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=16, temperature=0,
                                            stream=True)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == full.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason
    assert full.choices[0].message.content == lm.chat(messages, max_new_tokens=16, temperature=0)


def test_n_completions_are_decoded_together(server):
    client, lm = server
    prompt = "The for statement"
    greedy = client.completions.create(model="tiny-chat", prompt=prompt, max_tokens=10, temperature=0, n=3)
    alone = client.completions.create(model="tiny-chat", prompt=prompt, max_tokens=10, temperature=0)
    assert [c.index for c in greedy.choices] == [0, 1, 2]
    assert {c.text for c in greedy.choices} == {alone.choices[0].text}
    assert greedy.usage.completion_tokens == sum(len(lm.tokenizer.encode(c.text)) for c in greedy.choices)
    sampled = client.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "Hi"}],
                                             max_tokens=24, temperature=1.5, n=4, seed=3)
    assert len({c.message.content for c in sampled.choices}) > 1  # independent samples, one batch
    assert all(c.finish_reason in ("stop", "length") for c in sampled.choices)
    with pytest.raises(openai.BadRequestError, match="stream"):
        client.completions.create(model="tiny-chat", prompt=prompt, n=2, stream=True)


def test_bad_requests_are_400_with_a_message(server):
    client, _ = server
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model="tiny-chat", prompt="word " * 300, max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="tiny-chat", prompt="hi", temperature=-1)
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model="tiny-chat", messages=[])
    with pytest.raises(openai.BadRequestError, match="'n'"):
        client.completions.create(model="tiny-chat", prompt="hi", n=17)


def test_requests_are_held_to_the_planned_context(server):
    """`memlm serve --context N` (what --memory-budget sized the KV cache for): a prompt of N tokens
    or more is a 400; a completion stops at N tokens in all, however many max_tokens asked for."""
    from fastapi.testclient import TestClient

    from memlm.serve.app import create_app

    _, lm = server
    client = TestClient(create_app(lm, "tiny-chat", context=40))
    prompt = "The for statement"
    n_prompt = len(lm.tokenizer.encode(prompt))
    r = client.post("/v1/completions", json={"prompt": "word " * 60, "max_tokens": 4})
    assert r.status_code == 400 and "context is 40" in r.json()["error"]["message"]
    r = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 500, "temperature": 0})
    assert r.status_code == 200
    assert r.json()["usage"]["completion_tokens"] <= 40 - n_prompt
