"""The API as standard tools meet it: schemathesis fuzzing every route from /openapi.json (no
server error for anything it generates), and the real `openai` client for stop, n, streaming,
usage and every kind of refusal."""

from __future__ import annotations

import itertools

import pytest

openai = pytest.importorskip("openai")
schemathesis = pytest.importorskip("schemathesis")

from fastapi.testclient import TestClient  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

from memlm.serve.app import create_app  # noqa: E402
from tests.test_serve import MODEL, tiny_chat, tiny_lm, server  # noqa: E402, F401  (fixtures)


@pytest.fixture(scope="module")
def fuzzed_app(tiny_lm):
    app = create_app(tiny_lm, MODEL, context=64, slots=4, queue_size=16, default_max_tokens=8)
    with TestClient(app):  # runs the lifespan: the scheduler thread
        yield app


EXAMPLES = 12  # per operation and mode: bounded, so the run stays a few seconds on the tiny model


def test_no_generated_request_gives_a_server_error(fuzzed_app):
    """Every operation of /openapi.json, EXAMPLES requests each that schemathesis generates from
    the schema, valid ones and (negative mode) invalid ones: never a 5xx. (It found one: a top_p
    below float32's resolution dropped every token, see test_a_vanishing_top_p_keeps_one_token.)"""
    from hypothesis import given
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error

    schema = schemathesis.openapi.from_asgi("/openapi.json", fuzzed_app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health"}
    for op, mode in itertools.product(operations, (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)):
        if mode is GenerationMode.NEGATIVE and op.method.upper() != "POST":
            continue  # a GET without parameters has no invalid form
        @given(case=op.as_strategy(generation_mode=mode))
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def fuzz(case):
            case.call_and_validate(checks=[not_a_server_error])

        fuzz()


def test_a_vanishing_top_p_keeps_one_token(fuzzed_app):
    with TestClient(fuzzed_app) as client:
        r = client.post("/v1/completions", json={"prompt": "hi", "top_p": 5e-324, "top_k": 1, "max_tokens": 3})
    assert r.status_code == 200, r.text


def test_stop_sequences_end_the_text_where_they_start(server):
    client = server.client()
    full = client.completions.create(model=MODEL, prompt="The for statement", max_tokens=24, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = full[6:9]
    assert len(stop) == 3
    cut = client.completions.create(model=MODEL, prompt="The for statement", max_tokens=24, temperature=0,
                                    stop=[stop, "never-there"])
    assert cut.choices[0].text == full[:full.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=MODEL, prompt="The for statement", max_tokens=24, temperature=0,
                                         stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text


def test_streamed_chat_with_usage(server):
    chunks = list(server.client().chat.completions.create(
        model=MODEL, messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        max_tokens=10, temperature=0, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens <= 10
    assert chunks[-1].usage.total_tokens == chunks[-1].usage.prompt_tokens + chunks[-1].usage.completion_tokens


def test_every_refusal_is_the_openai_error_the_client_expects(server):
    client = server.client()
    cases = [
        (openai.NotFoundError, dict(model="gpt-4o")),
        (openai.BadRequestError, dict(max_tokens=0)),
        (openai.BadRequestError, dict(max_tokens=10_000)),
        (openai.BadRequestError, dict(n=99)),
        (openai.BadRequestError, dict(prompt="word " * 400)),
        (openai.BadRequestError, dict(top_p=0)),
        (openai.BadRequestError, dict(stop=["a", "b", "c", "d", "e"])),
        (openai.BadRequestError, dict(extra_body={"logprobs": 3})),
    ]
    for error, kwargs in cases:
        args = {"model": MODEL, "prompt": "hi", **kwargs}
        with pytest.raises(error) as e:
            client.completions.create(**args)
        body = e.value.body
        assert set(body) >= {"message", "type"} and body["message"], kwargs
