"""The OpenAI-compatible server: a real `memlm serve` process on 127.0.0.1 with the real `openai`
client, and the app in-process (Starlette's TestClient) for what needs no socket."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402

from memlm.config import ModelConfig  # noqa: E402
from memlm.infer.generate import generate_text  # noqa: E402
from memlm.infer.sampling import SamplingSettings  # noqa: E402
from memlm.interop.hf import save_hf  # noqa: E402
from memlm.loading import load  # noqa: E402
from memlm.model import Decoder  # noqa: E402
from memlm.serve.app import create_app  # noqa: E402
from memlm.tokenizer import train_bpe  # noqa: E402

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
MODEL = "tiny-chat"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_chat(tmp_path_factory) -> Path:
    """A tiny random llama-style model with a BPE tokenizer and a chat template, as an HF folder."""
    from memlm.data import default_split

    folder = tmp_path_factory.mktemp("served") / MODEL
    torch.manual_seed(0)
    tok = train_bpe([default_split()[0][:40_000]], vocab_size=400)
    tok.chat_template = CHAT_TEMPLATE
    model = Decoder(ModelConfig(vocab_size=tok.vocab_size, block_size=128, n_layer=2, n_head=4, n_kv_heads=2,
                                n_embd=64, norm="rmsnorm", positions="rope", mlp="swiglu", bias=False)).eval()
    save_hf(model, folder, tok)
    return folder


@pytest.fixture(scope="session")
def tiny_lm(tiny_chat):
    return load(tiny_chat)


class Server:
    """`memlm serve ARGS` in its own process on a free port of 127.0.0.1."""

    def __init__(self, folder: Path, *args: str, env: dict | None = None):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "memlm", "serve", "--model", str(folder),
                                      "--port", str(self.port), *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                assert self.proc.poll() is None, self.proc.stdout.read()
                time.sleep(0.3)
        raise TimeoutError("the server did not start")

    def client(self, api_key: str = "unused", timeout: float = 60):
        return openai.OpenAI(base_url=self.base + "/v1", api_key=api_key, max_retries=0, timeout=timeout)

    def stop(self, sig=signal.SIGTERM, timeout: float = 30) -> str:
        """Stop it with `sig`; its output. Raises if it has not exited within `timeout`."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.communicate(timeout=timeout)[0]
        finally:
            if self.proc.poll() is None:
                self.proc.kill()


@pytest.fixture(scope="session")
def server(tiny_chat):
    """One `memlm serve` of the tiny model (8 slots) for every test that needs no options of its own."""
    s = Server(tiny_chat)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def app_client(tiny_lm):
    """The app in-process, context 40 (as if a memory plan had sized the KV cache for 40 tokens)."""
    with TestClient(create_app(tiny_lm, MODEL, context=40)) as client:
        yield client


# ------------------------------------------------------------------------------ the OpenAI API


def test_lists_the_model(server):
    assert [m.id for m in server.client().models.list().data] == [MODEL]


def test_completion_equals_local_generation(server, tiny_lm, one_thread):
    prompt = "The for statement"
    resp = server.client().completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    expected = generate_text(tiny_lm.model, tiny_lm.tokenizer, prompt, SamplingSettings(max_new_tokens=12, temperature=0))
    assert resp.choices[0].text == expected
    assert resp.choices[0].finish_reason in ("length", "stop")
    assert resp.usage.prompt_tokens == len(tiny_lm.tokenizer.encode(prompt))


def test_chat_streaming_equals_non_streaming(server, tiny_lm, one_thread):
    client = server.client()
    messages = [{"role": "user", "content": "What does the with statement do?"}]
    full = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0,
                                                 stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == full.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason
    assert full.choices[0].message.content == tiny_lm.chat(messages, max_new_tokens=16, temperature=0)


def test_n_completions(server):
    client = server.client()
    prompt = "The for statement"
    greedy = client.completions.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=0, n=3)
    alone = client.completions.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=0)
    assert [c.index for c in greedy.choices] == [0, 1, 2]
    assert {c.text for c in greedy.choices} == {alone.choices[0].text}
    assert greedy.usage.completion_tokens == 3 * alone.usage.completion_tokens
    sampled = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                             max_tokens=24, temperature=1.5, n=4, seed=3)
    assert len({c.message.content for c in sampled.choices}) > 1  # each choice its own seed
    assert all(c.finish_reason in ("stop", "length") for c in sampled.choices)
    again = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                           max_tokens=24, temperature=1.5, seed=3)
    assert again.choices[0].message.content == sampled.choices[0].message.content  # choice 0: the same seed
    streamed = client.completions.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=0, n=2, stream=True)
    texts = ["", ""]
    for chunk in streamed:
        for c in chunk.choices:
            texts[c.index] += c.text
    assert texts == [alone.choices[0].text] * 2


def test_bad_requests_are_400_with_a_message(server):
    client = server.client()
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model=MODEL, prompt="word " * 300, max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model=MODEL, prompt="hi", temperature=-1)
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model=MODEL, messages=[])
    with pytest.raises(openai.BadRequestError, match="'n'"):
        client.completions.create(model=MODEL, prompt="hi", n=17)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="gpt-4o", prompt="hi")


def test_requests_are_held_to_the_planned_context(app_client, tiny_lm):
    """`memlm serve --context N` (what --memory-budget sized the KV cache for): a prompt of N
    tokens or more, or max_tokens beyond what it leaves, is a 400; without max_tokens a
    completion stops at N tokens in all."""
    prompt = "The for statement"
    n_prompt = len(tiny_lm.tokenizer.encode(prompt))
    r = app_client.post("/v1/completions", json={"prompt": "word " * 60, "max_tokens": 4})
    assert r.status_code == 400 and "context is 40" in r.json()["error"]["message"]
    r = app_client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 500, "temperature": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    r = app_client.post("/v1/completions", json={"prompt": prompt, "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200
    assert r.json()["usage"]["completion_tokens"] == 40 - n_prompt


# ------------------------------------------------------------------------------ the five bugs of issue 14


def _stream_and_hang_up(base: str, nbytes: int = 150) -> bytes:
    """`curl -sN -d ... | head -c 150`: read the start of a streamed completion, then close the socket."""
    body = json.dumps({"prompt": "The for statement", "max_tokens": 100, "stream": True, "ignore_eos": True})
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall((f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                      f"Content-Length: {len(body)}\r\n\r\n{body}").encode())
        got = b""
        while len(got) < nbytes:
            piece = sock.recv(nbytes - len(got))
            if not piece:
                break
            got += piece
    return got


def test_a_client_that_hangs_up_mid_stream_leaves_the_server_serving(tiny_chat):
    """Issue 14 bug 1: the model lock was never released, every later request hung, SIGTERM did not stop it."""
    s = Server(tiny_chat)
    try:
        for _ in range(2):
            assert b"200 OK" in _stream_and_hang_up(s.base)
        deadline = time.time() + 10  # the slots are freed (within a step of the disconnect being seen)
        while httpx.get(s.base + "/health").json()["slots_in_use"] and time.time() < deadline:
            time.sleep(0.05)
        assert httpx.get(s.base + "/health").json()["slots_in_use"] == 0
        resp = s.client(timeout=30).completions.create(model=MODEL, prompt="The while", max_tokens=5, temperature=0)
        assert resp.choices[0].finish_reason in ("length", "stop")
    finally:
        log = s.stop(signal.SIGTERM, timeout=30)  # uvicorn re-raises the signal once it has shut down
    assert "Finished server process" in log and s.proc.returncode in (0, -signal.SIGTERM)


def test_fifty_concurrent_streams_all_finish(server):
    """Issue 14 bug 2: 41+ concurrent streaming requests deadlocked the server (a thread pool running dry)."""

    async def main():
        async with httpx.AsyncClient(base_url=server.base, timeout=120) as client:
            async def one(i: int) -> str:
                body = {"prompt": f"The {i} statement", "max_tokens": 4, "stream": True, "temperature": 0}
                async with client.stream("POST", "/v1/completions", json=body) as r:
                    assert r.status_code == 200
                    return (await r.aread()).decode()

            streams = [asyncio.ensure_future(one(i)) for i in range(50)]
            health = await client.get("/health")  # answered while all 50 are open
            return health.status_code, await asyncio.gather(*streams)

    status, texts = asyncio.run(main())
    assert status == 200
    assert all(t.rstrip().endswith("data: [DONE]") for t in texts)


WRONG_TYPES = [
    {"prompt": "hi", "max_tokens": "abc"}, {"prompt": "hi", "max_tokens": [1]}, {"prompt": "hi", "max_tokens": "5"},
    {"prompt": "hi", "temperature": "hot"}, {"prompt": "hi", "top_p": "x"}, {"prompt": "hi", "stop": 5},
    {"prompt": "hi", "seed": "x"}, {"prompt": "hi", "n": True}, {"prompt": 5}, {"prompt": None}, {},
    {"prompt": "hi", "stream": "yes"}, {"prompt": "hi", "max_tokens": 1.5}, {"prompt": [[1, 2], "x"]},
    {"prompt": "hi", "seed": 2 ** 70}, {"prompt": [999999]},
]
WRONG_CHAT = [{"messages": ["hi"]}, {"messages": [None]}, {"messages": "hi"}, {"messages": [{"role": "user"}, 3]},
              {"messages": [{"role": "wizard", "content": "hi"}]}, {"messages": [{"role": "user", "content": 5}]}]


@pytest.mark.parametrize("body", WRONG_TYPES, ids=lambda b: json.dumps(b)[:40])
def test_wrongly_typed_fields_are_400_naming_the_field(app_client, body):
    """Issue 14 bug 3: these were 500s."""
    r = app_client.post("/v1/completions", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["message"]
    bad = next(iter(set(body) - {"prompt"}), "prompt")
    assert bad in err["message"]


@pytest.mark.parametrize("body", WRONG_CHAT, ids=lambda b: json.dumps(b)[:40])
def test_wrongly_typed_messages_are_400(app_client, body):
    r = app_client.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    assert "messages" in r.json()["error"]["message"]


def test_null_sampling_fields_mean_the_defaults(app_client):
    r = app_client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3, "temperature": None,
                                                 "top_p": None, "stop": None, "seed": None, "n": None,
                                                 "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def test_a_body_over_the_limit_is_413_before_it_is_read_in_full(tiny_lm):
    """Issue 14 bug 4: a 50 MB prompt was tokenized in full (56 s, +6.5 GB resident)."""
    with TestClient(create_app(tiny_lm, MODEL, max_body=10_000)) as client:
        big = {"prompt": "word " * 5_000}
        r = client.post("/v1/completions", json=big)
        assert r.status_code == 413 and "10000 bytes" in r.json()["error"]["message"]

        def chunked():  # no Content-Length: the limit is counted as the body arrives
            for _ in range(100):
                yield b"x" * 1000

        r = client.post("/v1/completions", content=chunked(), headers={"content-type": "application/json"})
        assert r.status_code == 413
        assert client.post("/v1/completions", json={"prompt": "word " * 10, "max_tokens": 2}).status_code == 200


def test_unknown_model_and_max_tokens_zero_are_refused(app_client):
    """Issue 14 bug 5: any model name was accepted, and max_tokens 0 became 256."""
    r = app_client.post("/v1/completions", json={"model": "gpt-4o", "prompt": "hi"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = app_client.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    r = app_client.post("/v1/completions", json={"prompt": "hi", "echo": True})
    assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported_parameter"


def test_api_key_guards_every_route_but_health(tiny_chat):
    """--api-key / MEMLM_API_KEY: Bearer KEY on every route but /health (401 otherwise)."""
    s = Server(tiny_chat, env={"MEMLM_API_KEY": "sesame"})
    try:
        assert httpx.get(s.base + "/health").status_code == 200
        for path in ("/v1/models", "/openapi.json"):
            r = httpx.get(s.base + path)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            assert httpx.get(s.base + path, headers={"Authorization": "Bearer sesame!"}).status_code == 401
        with pytest.raises(openai.AuthenticationError):
            s.client("wrong").completions.create(model=MODEL, prompt="hi", max_tokens=2)
        ok = s.client("sesame").completions.create(model=MODEL, prompt="hi", max_tokens=2)
        assert ok.choices[0].finish_reason in ("stop", "length")
    finally:
        s.stop()


# ------------------------------------------------------------------------------ the pool, the queue, limits, metrics


def test_beyond_the_pool_and_the_queue_requests_get_429_with_retry_after(tiny_lm):
    """One slot and one place in the queue, both taken (the scheduler is not started, so nothing
    leaves): the next request is refused at once, as OpenAI's rate-limit error, with Retry-After.
    A request of more completions than slot + queue can ever hold is refused the same way."""
    from memlm.infer.sampling import SamplingSettings as Settings
    from memlm.serve.scheduler import Sequence

    app = create_app(tiny_lm, MODEL, slots=1, queue_size=1)
    client = TestClient(app)  # no lifespan: the scheduler thread does not run
    waiting = [Sequence([5, 6], Settings(max_new_tokens=2), i, lambda out: None) for i in range(2)]
    app.state.scheduler.submit(waiting)
    assert client.get("/health").json()["queue_depth"] == 2
    r = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
    assert r.json()["error"]["type"] == "rate_limit_error"
    oai = openai.OpenAI(base_url="http://testserver/v1", api_key="-", http_client=client, max_retries=0)
    with pytest.raises(openai.RateLimitError) as refused:
        oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert refused.value.body["code"] == "server_busy"
    app.state.scheduler.cancel(waiting)
    with pytest.raises(openai.RateLimitError):
        oai.completions.create(model=MODEL, prompt="hi", max_tokens=2, n=3)


def test_the_budget_sizes_the_kv_pool(tiny_chat):
    """--memory-budget with more --slots than any format holds: the pool gets as many slots as
    the format that holds the most (at fp32 the budget holds 2000; bf16's cache is half as big),
    and the server's pool, prediction and memory are the plan's."""
    import re

    from memlm.loading import model_config_of
    from memlm.memory.estimate import estimate_inference, kv_cache_bytes
    from memlm.memory.plan import SAFETY_MARGIN

    config = model_config_of(tiny_chat)
    need = estimate_inference(config, batch=2000, context=128, weight_format="fp32", prompt_len=1,
                              runtime="serve").total
    budget = int(need / (1 - SAFETY_MARGIN))
    s = Server(tiny_chat, "--memory-budget", str(budget), "--slots", "16384", "--context", "128")
    try:
        stats = httpx.get(s.base + "/stats").json()
    finally:
        s.stop()
    slots = stats["slots"]
    weights, kv = re.search(r"(\w+) weights, (\w+) KV cache for (\d+) x 128 tokens", stats["plan"]).groups()[:2]
    assert 2000 <= slots < 16384 and stats["context"] == 128 and f"for {slots} x 128" in stats["plan"]
    assert stats["memory"]["kv_pool_bytes"] == kv_cache_bytes(config, slots, 128, kv)
    predicted = estimate_inference(config, batch=slots, context=128, weight_format=weights, prompt_len=1,
                                   runtime="serve").total
    # The server placed its runtime by its own start, this process by a kept one: they differ by
    # the start-up drift (within 4 MiB before; 25.5 MiB once on 2026-12-04's AVX2 EPYC VM, the
    # server's start the higher). The plan's other terms are the same to the byte.
    assert stats["memory"]["predicted_peak_bytes"] == pytest.approx(predicted, abs=32 * 2**20)
    assert stats["memory"]["predicted_peak_bytes"] <= budget * (1 - SAFETY_MARGIN)
    assert stats["memory"]["budget_bytes"] == budget
    assert stats["memory"]["peak_resident_bytes"] <= budget


def test_a_request_past_its_timeout_is_408_and_frees_its_slot(tiny_lm):
    with TestClient(create_app(tiny_lm, MODEL, slots=2, request_timeout=0.01)) as client:
        long = {"prompt": "The for statement", "max_tokens": 100, "ignore_eos": True}
        r = client.post("/v1/completions", json=long)
        assert r.status_code == 408 and r.json()["error"]["code"] == "request_timeout"
        events = client.post("/v1/completions", json={**long, "stream": True}).text
        assert "request_timeout" in events
        scheduler = client.app.state.scheduler
        deadline = time.time() + 10
        while scheduler.running and time.time() < deadline:
            time.sleep(0.01)
        assert scheduler.running == 0


def test_metrics_count_what_was_served(tiny_lm):
    from prometheus_client.parser import text_string_to_metric_families

    with TestClient(create_app(tiny_lm, MODEL, slots=3)) as client:
        tokens = 0
        for i in range(4):
            r = client.post("/v1/completions", json={"prompt": f"The {i}", "max_tokens": 5 + i, "n": 2,
                                                     "ignore_eos": True})
            tokens += r.json()["usage"]["completion_tokens"]
        client.post("/v1/completions", json={"prompt": "hi", "max_tokens": "x"})
        text = client.get("/metrics").text
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    assert tokens == 2 * sum(5 + i for i in range(4))
    assert samples[("memlm_generated_tokens_total", ())] == tokens
    assert samples[("memlm_requests_total", (("route", "/v1/completions"), ("status", "200")))] == 4
    assert samples[("memlm_requests_total", (("route", "/v1/completions"), ("status", "400")))] == 1
    assert samples[("memlm_time_to_first_token_seconds_count", ())] == 8  # one per completion
    assert samples[("memlm_inter_token_latency_seconds_count", ())] == tokens - 8
    assert samples[("memlm_queue_depth", ())] == 0 and samples[("memlm_kv_slots_in_use", ())] == 0
    assert samples[("memlm_kv_slots", ())] == 3
    assert 0 < samples[("memlm_resident_memory_bytes", ())] <= samples[("memlm_peak_resident_memory_bytes", ())]
