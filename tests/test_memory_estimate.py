"""The estimator's terms against the bytes of real tensors (memlm.memory.estimate)."""

from __future__ import annotations

import dataclasses
import itertools
import json

import pytest
import torch
from rich.console import Console

from memlm.config import PREFILL_CHUNK, ModelConfig, TrainConfig, preset
from memlm.memory import estimate as est
from memlm.memory.measure import parse_size
from memlm.memory.plan import plan_inference
from memlm.memory.estimate import (
    Breakdown,
    activation_bytes,
    estimate_inference,
    estimate_training,
    inference_weight_bytes,
    kv_cache_bytes,
    optimizer_state_bytes,
    param_shapes,
    saved_for_backward_bytes,
)
from memlm.model import Decoder, KVCache
from memlm.train.loop import compute_loss
from memlm.train.optim import build_optimizer

# Small models of every flavour: (name, ModelConfig)
SMALL = {
    "llama": preset("tiny", n_layer=2, n_embd=64, n_head=4, n_kv_heads=2, ffn_hidden=160, vocab_size=300,
                    block_size=64),
    "gpt2": preset("gpt2", n_layer=2, n_embd=64, n_head=4, vocab_size=300, block_size=64),
    "untied-sinusoidal": ModelConfig(vocab_size=300, block_size=64, n_layer=3, n_head=4, n_embd=64,
                                     positions="sinusoidal", tied_embeddings=False, bias=False, mlp="swiglu"),
    "mha-rope-layernorm": ModelConfig(vocab_size=300, block_size=64, n_layer=2, n_head=2, n_embd=64,
                                      positions="rope", norm="layernorm", head_dim=48),
}


def _model(cfg: ModelConfig, precision: str = "fp32") -> Decoder:
    torch.manual_seed(0)
    model = Decoder(cfg)
    if precision == "bf16":  # as memlm.train.loop does it
        for p in model.parameters():
            p.data = p.data.to(torch.bfloat16)
    return model


# ------------------------------------------------------------------------------ parameters


@pytest.mark.parametrize("name", list(SMALL) + ["tiny", "gpt2", "smollm2-135m"])
def test_param_shapes_are_the_models(name):
    cfg = SMALL[name] if name in SMALL else preset(name)
    with torch.device("meta"):
        model = Decoder(cfg)
    real = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    assert [(s.name, s.shape) for s in param_shapes(cfg)] == real
    assert sum(s.numel for s in param_shapes(cfg)) == cfg.num_params()


@pytest.mark.parametrize("precision", ["fp32", "bf16-autocast", "bf16"])
@pytest.mark.parametrize("name", list(SMALL))
def test_weights_and_gradients_are_exact(name, precision):
    cfg = SMALL[name]
    model = _model(cfg, precision)
    tc = TrainConfig(micro_batch=2, seq_len=16, precision=precision)
    b = estimate_training(cfg, tc)
    tensors = sum(t.numel() * t.element_size() for t in itertools.chain(model.parameters(), model.buffers()))
    assert b.term("weights", "optimizer step") == tensors
    x = torch.randint(0, cfg.vocab_size, (2, 16))
    compute_loss(model, x, x, tc).backward()
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters())
    assert b.term("gradients", "optimizer step") == grads


@pytest.mark.parametrize("optimizer", ["adamw", "adamw8bit", "adafactor", "sgd"])
@pytest.mark.parametrize("name", ["llama", "gpt2", "untied-sinusoidal"])
def test_optimizer_states_are_exact_after_a_real_step(name, optimizer):
    cfg = SMALL[name]
    if optimizer == "adamw8bit":  # make some tensors big enough to get 8-bit states
        cfg = dataclasses.replace(cfg, vocab_size=1000)
    model = _model(cfg)
    tc = TrainConfig(micro_batch=2, seq_len=16, optimizer=optimizer)
    opt = build_optimizer(model, tc)
    x = torch.randint(0, cfg.vocab_size, (2, 16))
    compute_loss(model, x, x, tc).backward()
    opt.step()
    real = sum(t.numel() * t.element_size() for state in opt.state.values() for t in state.values()
               if torch.is_tensor(t))
    assert real > 0
    assert sum(optimizer_state_bytes(s, optimizer) for s in param_shapes(cfg)) == real
    assert estimate_training(cfg, tc).term("optimizer_states", "optimizer step") == real


def test_adamw8bit_constants_follow_the_optimizer():
    from memlm.train import lowbit

    assert (est.ADAMW8BIT_BLOCK, est.ADAMW8BIT_MIN_NUMEL, est.ADAMW8BIT_SLICE) == (
        lowbit.BLOCK, lowbit.MIN_QUANTIZED_NUMEL, lowbit.SLICE)


# ------------------------------------------------------------------------------ activations


def saved_tensor_bytes(model: Decoder, run) -> int:
    """Bytes of the distinct storages autograd saves while `run()` executes (parameters and
    buffers excluded: they exist anyway). Checkpointed blocks hide their saved tensors behind
    their own hooks and keep only their input, which a pre-hook records instead."""
    exclude = {t.untyped_storage().data_ptr() for t in itertools.chain(model.parameters(), model.buffers())}
    seen: dict[int, int] = {}

    def record(t: torch.Tensor) -> None:
        s = t.untyped_storage()
        if s.nbytes() and s.data_ptr() not in exclude:
            seen[s.data_ptr()] = s.nbytes()

    def pack(t):
        record(t)
        return t

    def block_input(module, args):
        if model.checkpoint_every:
            record(args[0])

    handles = [b.register_forward_pre_hook(block_input) for i, b in enumerate(model.blocks)
               if model.checkpoint_every and i % model.checkpoint_every == 0]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = run()
    finally:
        for h in handles:
            h.remove()
    del out
    return sum(seen.values())


ACTIVATION_CASES = [
    ("llama", {}),
    ("gpt2", {}),
    ("untied-sinusoidal", {}),
    ("mha-rope-layernorm", {}),
    ("gpt2", {"dropout": 0.1}),  # SDPA's math path: (T, T) weights, dropout masks
    ("llama", {"dropout": 0.1}),  # ... with GQA: k, v repeated to every head
]


@pytest.mark.parametrize("train", [
    {},
    {"precision": "bf16-autocast"},
    {"precision": "bf16"},
    {"activation_checkpointing": 1},
    {"activation_checkpointing": 2},
    {"loss_chunk": 24},
    {"precision": "bf16-autocast", "activation_checkpointing": 2, "loss_chunk": 32},
])
@pytest.mark.parametrize("name,overrides", ACTIVATION_CASES)
def test_saved_activations_match_autograd(name, overrides, train):
    cfg = dataclasses.replace(SMALL[name], **overrides)
    tc = TrainConfig(micro_batch=3, seq_len=40, **train)
    model = _model(cfg, tc.precision)
    model.train()
    model.checkpoint_every = tc.activation_checkpointing
    torch.manual_seed(1)
    x = torch.randint(0, cfg.vocab_size, (3, 40))
    y = torch.randint(0, cfg.vocab_size, (3, 40))
    measured = saved_tensor_bytes(model, lambda: compute_loss(model, x, y, tc))
    predicted = saved_for_backward_bytes(cfg, tc)
    assert predicted == pytest.approx(measured, rel=0.03)


def test_checkpointing_keeps_only_block_inputs():
    cfg = SMALL["gpt2"]
    B, T = 4, 64
    per_block = sum(s.bytes for s in est.block_activations(cfg, B, T))
    full = activation_bytes(cfg, B, T)
    every = activation_bytes(cfg, B, T, checkpoint_every=1)
    assert full - every == cfg.n_layer * (per_block - B * T * cfg.n_embd * 4)
    assert every < full / 3


# ------------------------------------------------------------------------------ inference


@pytest.mark.parametrize("kv_dtype,torch_dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
@pytest.mark.parametrize("name", ["llama", "gpt2", "mha-rope-layernorm"])
def test_kv_cache_is_exact(name, kv_dtype, torch_dtype):
    cfg = SMALL[name]
    from memlm.infer.engine import Engine

    cache = KVCache(cfg, slots=3, max_len=50, dtype=torch_dtype)
    assert kv_cache_bytes(cfg, 3, 50, kv_dtype) == cache.nbytes()
    # What generation allocates for 3 sequences of 50 tokens (the engine rounds the length up).
    pool = Engine(Decoder(cfg), cache_dtype=torch_dtype).cache(3, 50)
    b = estimate_inference(cfg, batch=3, context=50, kv_dtype=kv_dtype)
    assert b["kv_cache"] == pool.nbytes()


def _module_bytes(model: torch.nn.Module) -> int:
    total = sum(t.numel() * t.element_size() for t in itertools.chain(model.parameters(), model.buffers()))
    for m in model.modules():  # the int4 kernel's cached (scale, zero) pairs
        sz = getattr(m, "_scale_zeros", None)
        if torch.is_tensor(sz):
            total += sz.numel() * sz.element_size()
    return total


@pytest.mark.parametrize("fmt", ["fp32", "bf16", "int8", "int4"])
@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_inference_weights_are_exact(name, fmt):
    cfg = dataclasses.replace(SMALL[name], n_embd=128, n_head=4, head_dim=None, ffn_hidden=256,
                              n_kv_heads=2 if name == "llama" else 4)
    model = _model(cfg).eval()
    kernel = True
    if fmt == "bf16":
        model.to(torch.bfloat16)
    elif fmt in ("int8", "int4"):
        from memlm.compress import quantize_model
        from memlm.compress.quantize import torch_int4_layout_by_default

        quantize_model(model, fmt, progress=False)
        with torch.no_grad():  # the int4 kernel caches its (scale, zero) pairs on first use
            model(torch.zeros(1, 2, dtype=torch.long))
        kernel = torch_int4_layout_by_default()
    assert inference_weight_bytes(cfg, fmt, int4_kernel=kernel) == _module_bytes(model)


def test_quantized_embedding_bytes():
    from memlm.compress import quantize_model

    cfg = dataclasses.replace(SMALL["gpt2"], n_embd=128, ffn_hidden=256)
    model = _model(cfg).eval()
    quantize_model(model, "int8", quantize_embedding="int8", progress=False)
    assert inference_weight_bytes(cfg, "int8", quantize_embedding=True) == _module_bytes(model)


def test_inference_workspace_tracks_prompt_and_batch():
    cfg = preset("gpt2")
    small = estimate_inference(cfg, batch=1, context=1024, prompt_len=64)
    big = estimate_inference(cfg, batch=4, context=1024, prompt_len=512)
    assert big["workspace"] > 12 * small["workspace"]  # 4 rows x 256 tokens (a chunk) vs 1 x 64
    # a prompt is prefilled in chunks: beyond one chunk, a longer prompt adds no workspace
    chunk = estimate_inference(cfg, batch=4, context=1024, prompt_len=PREFILL_CHUNK)
    assert big["workspace"] == chunk["workspace"]
    assert big["kv_cache"] == 4 * small["kv_cache"]
    assert small["weights"] == big["weights"]


# ------------------------------------------------------------------------------ the breakdown


def test_breakdown_total_is_the_peak_phase():
    b = estimate_training(preset("tiny"), TrainConfig(micro_batch=8, seq_len=256))
    assert b.total == max(b.phases.values()) == b.phases[b.peak_phase]
    assert sum(t.bytes for t in b.terms) == b.total
    for name, terms in b.phase_terms.items():
        assert sum(t.bytes for t in terms) == b.phases[name]
    assert all(t.formula for t in b.terms)


def test_peak_phase_moves_with_the_settings():
    tiny, gpt2 = preset("tiny"), preset("gpt2")
    # many tokens through a small model: the loss (logits) is the peak
    assert estimate_training(tiny, TrainConfig(micro_batch=8, seq_len=256)).peak_phase == "backward: loss"
    # one short sequence through a big model: weights + grads + states + the step's temporaries
    untied = dataclasses.replace(gpt2, tied_embeddings=False)
    assert estimate_training(untied, TrainConfig(micro_batch=1, seq_len=64)).peak_phase == "optimizer step"
    # fused backward has no optimizer phase and no full set of gradients
    fused = estimate_training(gpt2, TrainConfig(micro_batch=1, seq_len=64, fused_backward=True, grad_clip=0.0))
    plain = estimate_training(gpt2, TrainConfig(micro_batch=1, seq_len=64))
    assert "optimizer step" not in fused.phases
    assert fused.total < plain.total
    # at the end only the (tied) embedding's gradient is left, next to its own optimizer step
    head = gpt2.vocab_size * gpt2.n_embd * 4
    assert fused.term("gradients", "backward: end") == head < plain.term("gradients", "optimizer step")


def test_savers_save():
    cfg = preset("w3")
    base = TrainConfig(micro_batch=8, seq_len=256)
    total = estimate_training(cfg, base).total
    for change in ({"loss_chunk": 512}, {"activation_checkpointing": 1}, {"optimizer": "adamw8bit"},
                   {"optimizer": "adafactor"}, {"micro_batch": 2, "grad_accum": 4}):
        assert estimate_training(cfg, dataclasses.replace(base, **change)).total < total, change


def test_sharding_divides_states():
    cfg = preset("gpt2")
    tc = TrainConfig(micro_batch=1, seq_len=128)
    one = estimate_training(cfg, tc)
    fsdp = estimate_training(cfg, tc, world_size=4, strategy="fsdp")
    ddp = estimate_training(cfg, tc, world_size=4, strategy="ddp")
    phase = "optimizer step"
    assert fsdp.term("optimizer_states", phase) == one.term("optimizer_states", phase) // 4
    assert fsdp.term("gradients", phase) == one.term("gradients", phase) // 4
    assert ddp.term("optimizer_states", phase) == one.term("optimizer_states", phase)
    P = sum(s.numel for s in est.param_shapes(cfg))
    # DDP (gradient_as_bucket_view): the gradients are views into its buckets, which it keeps
    assert ddp.term("sharding_buffers", phase) == P * 4 and ddp.term("gradients", phase) == 0
    assert fsdp.total < ddp.total


def test_two_process_terms_follow_what_ddp_and_fsdp_hold():
    """Per rank, against one process with the rank's share of the batch (bench/memory_accuracy.py
    measures these configurations on 2 processes)."""
    cfg = preset("gpt2", n_layer=4)  # tied embeddings: the root's gradient is summed at the end
    tc = TrainConfig(micro_batch=2, seq_len=512)
    one = estimate_training(cfg, dataclasses.replace(tc, micro_batch=1))
    ddp = estimate_training(cfg, tc, world_size=2, strategy="ddp")
    fsdp = estimate_training(cfg, tc, world_size=2, strategy="fsdp")
    shapes = est.param_shapes(cfg)
    P = sum(s.numel for s in shapes)
    Pb = sum(s.numel for s in shapes if s.name.startswith("blocks.0."))
    root = P - cfg.n_layer * Pb
    vd = cfg.vocab_size * cfg.n_embd * 4
    cpu = est.RUNTIME_BYTES["cpu"]
    ddp_rt, fsdp_rt = cpu["train-ddp"] - cpu["train"], cpu["train-fsdp"] - cpu["train"]
    here = est.runtime_bytes("cpu", "train")  # the calibrated figure moved by this machine's start
    assert ddp["runtime"] == here + ddp_rt and fsdp["runtime"] == here + fsdp_rt
    # DDP: one process's step plus the buckets, through forward too; at the end of backward the
    # tied gradients' sum is a fresh tensor next to the head's and the embedding's (3 instead of 2)
    def live(b, phase):  # the phase without glibc's heap slack (a calibrated share of the live terms)
        return b.phases[phase] - b.term("allocator", phase)

    for phase in ("forward: loss", "backward: loss"):
        assert live(ddp, phase) - live(one, phase) == P * 4 + ddp_rt
    assert live(ddp, "backward: end") - live(one, "backward: end") == vd + ddp_rt
    assert ddp.peak_phase == "backward: end"
    # FSDP: weights and states halved; the root (embeddings) gathered whole for backward, its
    # gradients unsharded until its reduce-scatter; the blocks' reduce-scattered
    assert fsdp["weights"] == P * 4 // 2 + est.buffer_bytes(cfg)
    assert fsdp.term("gradients", "backward: end") == cfg.n_layer * Pb * 4 // 2 + root * 4 + 2 * vd
    assert fsdp.term("sharding_buffers", "backward: end") == root * 4 + Pb * 4
    assert fsdp.term("sharding_buffers", "backward: root all-gather") == 2 * root * 4
    assert fsdp.term("gradients", "optimizer step") == P * 4 // 2
    assert fsdp.peak_phase == "backward: end" and fsdp.total < ddp.total


def test_breakdown_renders_and_serialises():
    b = estimate_inference(preset("gpt2"), batch=2, context=512, weight_format="int8")
    console = Console(record=True, width=120)
    console.print(b.table())
    text = console.export_text()
    assert "kv_cache" in text and "weights" in text and "total" in text
    d = json.loads(json.dumps(b.to_dict()))
    assert d["total_bytes"] == b.total and isinstance(b, Breakdown)


def test_runtime_overhead_is_the_recorded_constant_moved_by_this_machines_start():
    from memlm.memory.measure import program_start_rss_bytes

    shift = (program_start_rss_bytes() or est.CALIBRATION_START_BYTES) - est.CALIBRATION_START_BYTES
    b = estimate_training(preset("tiny"), TrainConfig(micro_batch=1, seq_len=16))
    assert b["runtime"] == est.RUNTIME_BYTES["cpu"]["train"] + shift
    assert estimate_inference(preset("tiny"), context=32)["runtime"] == est.RUNTIME_BYTES["cpu"]["infer"] + shift
    assert estimate_training(preset("tiny"), TrainConfig(micro_batch=1, seq_len=16), device="cuda")["runtime"] == 0


def test_a_compiled_decode_step_counts_the_compiler_and_plans_within_the_rest():
    eager = estimate_inference(preset("tiny"), context=32)
    compiled = estimate_inference(preset("tiny"), context=32, compile=True)
    assert compiled["compiler"] == est.COMPILE_BYTES["cpu"]
    assert compiled.total == eager.total + est.COMPILE_BYTES["cpu"]
    budget = eager.total + est.COMPILE_BYTES["cpu"] // 2  # eager fits, compiled does not
    assert plan_inference(preset("tiny"), budget, context=32, formats=["fp32"]).feasible
    assert not plan_inference(preset("tiny"), budget, context=32, formats=["fp32"], compile=True).feasible


@pytest.mark.slow
def test_predicted_peak_matches_the_real_command(tmp_path):
    """`memlm train` in a fresh process, default environment: the prediction it prints first is
    the one it compares at the end, and the whole process's VmHWM (from wait4) is within 10%."""
    import os
    import re
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    proc = subprocess.Popen([sys.executable, "-m", "memlm", "train", "--preset", "tiny", "--steps", "4",
                             "--micro-batch", "4", "--out", str(tmp_path / "run")], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    said = re.search(r"predicted peak memory ([\d.]+ [KMG]iB)", err).group(1)
    final = re.search(r"peak memory: predicted ([\d.]+ [KMG]iB), measured ([\d.]+ [KMG]iB)", err)
    assert final.group(1) == said
    predicted, measured = (parse_size(final.group(i).replace(" ", "")) for i in (1, 2))
    assert predicted == pytest.approx(measured, rel=0.10)


RUNTIME_OF_THIS_MACHINE = """
import json, sys
from memlm.memory.estimate import runtime_bytes
from memlm.memory.measure import current_rss_bytes, program_start_rss_bytes
print(json.dumps({"start": program_start_rss_bytes(), "train": runtime_bytes("cpu", "train"),
                  "cuda": runtime_bytes("cuda", "train"), "rss": current_rss_bytes()}))
"""


def _runtime_in_fresh_process(cache) -> dict:
    import os
    import subprocess
    import sys

    env = {**os.environ, "MEMLM_CACHE": str(cache)}
    out = subprocess.run([sys.executable, "-c", RUNTIME_OF_THIS_MACHINE], capture_output=True, text=True,
                         env=env, check=True, timeout=300).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_the_runtime_moves_with_this_machines_program_start_kept_a_while(tmp_path):
    """A library process measures the memlm program's start once (a fresh `import memlm.cli`:
    torch imported, so well over 100 MiB) and keeps it: processes in the next minutes read the same
    figure, and the CPU runtime terms move by its difference from the calibration's start; CUDA's
    do not. A figure kept longer ago is measured again (the start moves within a boot)."""
    first = _runtime_in_fresh_process(tmp_path)
    kept = list(tmp_path.glob("program-start-*.json"))
    assert len(kept) == 1 and json.loads(kept[0].read_text())["bytes"] == first["start"]
    assert 100 * est.MiB < first["start"] < 2 * first["rss"]
    assert first["train"] == est.RUNTIME_BYTES["cpu"]["train"] + first["start"] - est.CALIBRATION_START_BYTES
    assert first["cuda"] == 0

    record = json.loads(kept[0].read_text())  # another machine's start, 60 MiB higher
    kept[0].write_text(json.dumps({**record, "bytes": record["bytes"] + 60 * est.MiB}))
    second = _runtime_in_fresh_process(tmp_path)
    assert second["start"] == first["start"] + 60 * est.MiB
    assert second["train"] == first["train"] + 60 * est.MiB

    from memlm.memory.measure import START_KEPT_SECONDS

    record = json.loads(kept[0].read_text())  # the same 60 MiB more, kept too long ago
    kept[0].write_text(json.dumps({**record, "time": record["time"] - START_KEPT_SECONDS - 1}))
    third = _runtime_in_fresh_process(tmp_path)
    assert third["start"] != second["start"]
    assert abs(third["start"] - first["start"]) < 30 * est.MiB
    assert json.loads(kept[0].read_text())["bytes"] == third["start"]


def test_the_program_takes_its_own_start_and_keeps_it_for_the_processes_after_it(tmp_path):
    """`memlm plan` places its runtime by its own start, whatever was kept before (here a figure
    200 MiB off), and keeps its start: a library process just after predicts the same runtime."""
    import os
    import re
    import subprocess
    import sys

    _runtime_in_fresh_process(tmp_path)
    (kept,) = tmp_path.glob("program-start-*.json")
    planted = json.loads(kept.read_text())
    kept.write_text(json.dumps({**planted, "bytes": planted["bytes"] + 200 * est.MiB}))
    env = {**os.environ, "MEMLM_CACHE": str(tmp_path), "COLUMNS": "200"}
    out = subprocess.run([sys.executable, "-m", "memlm", "plan", "--model", "tiny", "--seq-len", "16",
                          "--micro-batch", "1"], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    own = json.loads(kept.read_text())["bytes"]
    assert abs(own - planted["bytes"]) < 30 * est.MiB
    after = _runtime_in_fresh_process(tmp_path)
    assert after["start"] == own
    runtime_row = re.search(r"runtime\D*([\d.]+) MiB", out.stdout + out.stderr)
    assert runtime_row and float(runtime_row.group(1)) == pytest.approx(after["train"] / est.MiB, abs=0.1)
