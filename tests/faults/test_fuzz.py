"""Fuzzing every reader of user files (hypothesis, bounded for `make test`; bench/faults.py runs
it far longer): GGUF header and tensor table, safetensors, tokenizer.json, config.json, TOML,
JSONL corpora, trainer_state.json, memlm_model.json, the DCP index. Inputs are valid files with
bytes changed, cut, or lengths set to huge values, and arbitrary JSON in place of the JSON
files. Only memlm's one-line errors may come out; and headers that claim more than the file
holds are refused before anything of that size is allocated."""

from __future__ import annotations

import json
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memlm.errors import MemlmError

from .readers import TARGETS, Seeds, run_target

EXAMPLES = {"gguf": 40, "safetensors": 40, "tokenizer.json": 30, "config.json": 60, "toml": 60, "jsonl": 60,
            "trainer_state.json": 40, "memlm_model.json": 30, "memlm_dcp.json": 20}
LENGTHS = [b"\xff" * 8, b"\x00" * 8, struct.pack("<Q", 10**12), struct.pack("<Q", 2**63), b"\xff\xff\xff\x7f"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def seeds(tmp_path_factory, corpus, tokenizer_dir) -> Seeds:
    return Seeds.make(tmp_path_factory.mktemp("seeds"), corpus, tokenizer_dir)


def mutations(seed: bytes) -> st.SearchStrategy[bytes]:
    """`seed` with a few bytes changed (most in its first kilobytes: the headers), some spans set
    to huge or zero lengths, and maybe cut short."""
    n = len(seed)
    position = st.one_of(st.integers(0, min(n, 4096) - 1), st.integers(0, n - 1))
    edits = st.lists(st.tuples(position, st.one_of(st.binary(min_size=1, max_size=2), st.sampled_from(LENGTHS))),
                     max_size=6)
    cut = st.one_of(st.none(), st.integers(0, n))

    def apply(edits, cut) -> bytes:
        data = bytearray(seed)
        for at, new in edits:
            data[at:at + len(new)] = new
        return bytes(data[:cut] if cut is not None else data)

    return st.builds(apply, edits, cut)


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=12)


def json_mutations(seed: bytes) -> st.SearchStrategy[bytes]:
    """The seed's JSON with one value (at any depth) replaced by arbitrary JSON, or arbitrary
    JSON, or the seed's bytes mutated."""
    doc = json.loads(seed)
    paths = []

    def walk(value, path):
        paths.append(path)
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, (*path, k))
        elif isinstance(value, list):
            for i, v in enumerate(value[:3]):
                walk(v, (*path, i))

    walk(doc, ())

    def replace(path, new) -> bytes:
        if not path:
            return json.dumps(new).encode()
        copy = json.loads(seed)
        target = copy
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = new
        return json.dumps(copy).encode()

    return st.one_of(st.builds(replace, st.sampled_from(paths), JSON), JSON.map(lambda v: json.dumps(v).encode()),
                     mutations(seed))


TEXT_KINDS = ("toml", "jsonl")
JSON_KINDS = ("tokenizer.json", "config.json", "trainer_state.json", "memlm_model.json", "memlm_dcp.json")


@pytest.mark.parametrize("kind", sorted(TARGETS))
def test_a_reader_of_user_files_only_ever_raises_one_line(kind, seeds, tmp_path):
    seed = seeds.bytes_of(kind)
    if kind in JSON_KINDS:
        inputs = json_mutations(seed)
    elif kind in TEXT_KINDS:
        inputs = st.one_of(mutations(seed), st.text().map(str.encode))
    else:
        inputs = mutations(seed)
    outcomes = {True: 0, False: 0}

    @settings(max_examples=EXAMPLES[kind], deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(inputs)
    def fuzz(data: bytes) -> None:
        outcomes[run_target(kind, seeds, data, tmp_path)] += 1

    fuzz()
    assert outcomes[True] > 0  # the inputs do reach the reader's checks
    assert not run_target(kind, seeds, seed, tmp_path)  # and the seed itself is read


# --------------------------------------------------------- claims bigger than the file


def _safetensors_claiming(shape: list[int]) -> bytes:
    header = json.dumps({"w": {"dtype": "F32", "shape": shape, "data_offsets": [0, 4 * shape[0] * shape[1]]}}).encode()
    return struct.pack("<Q", len(header)) + header + b"\0" * 64


def test_a_safetensors_header_claiming_10_12_values_is_refused_before_allocating(tmp_path, monkeypatch):
    import torch

    from memlm.compress.storage import TensorFile

    asked = []
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: asked.append(a) or real_empty(*a, **k))
    path = tmp_path / "huge.safetensors"
    path.write_bytes(_safetensors_claiming([10**6, 10**6]))
    with pytest.raises(MemlmError, match="not a readable safetensors file"):
        TensorFile(path)
    assert asked == []


def test_a_gguf_tensor_claiming_10_12_values_is_refused_before_allocating(seeds, tmp_path):
    import tracemalloc

    from memlm.interop.gguf import load_gguf

    data = bytearray(seeds.bytes_of("gguf"))
    name = b"token_embd.weight"
    at = data.index(name) + len(name)  # then: n_dims (u32), the dims (u64 each)
    n_dims = struct.unpack_from("<I", data, at)[0]
    assert n_dims == 2
    struct.pack_into("<QQ", data, at + 4, 10**6, 10**6)
    path = tmp_path / "huge.gguf"
    path.write_bytes(bytes(data))
    tracemalloc.start()
    try:
        with pytest.raises(MemlmError, match="not a valid GGUF file"):
            load_gguf(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2**20, peak  # numpy's allocations are traced: nothing near 4 TB was asked for


def test_a_config_whose_context_needs_a_huge_table_is_refused(tmp_path):
    from memlm.loading import model_config_of

    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "llama", "vocab_size": 320, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
        "num_attention_heads": 2, "max_position_embeddings": 10**9}))
    with pytest.raises(MemlmError, match="position table"):
        model_config_of(tmp_path)  # no weight holds the RoPE table: only the config sizes it
