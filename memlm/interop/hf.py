"""Hugging Face checkpoints in and out: GPT-2 (`GPT2LMHeadModel`) and Llama (`LlamaForCausalLM`).

A folder holds `config.json` and `*.safetensors` (or a `pytorch_model.bin`, read with
`torch.load(weights_only=True)`: never an unrestricted unpickle). Loading reads one tensor at a
time and converts it (to a weight format if asked) before reading the next. `transformers` is
not needed; tests use it as the independent reference.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from memlm.compress.assemble import ModelAssembler
from memlm.compress.storage import TensorFile
from memlm.config import ModelConfig, check_range
from memlm.errors import MemlmError, io_error
from memlm.integrity import read_json_object
from memlm.model import Decoder, empty_model

SUPPORTED = ("gpt2", "llama")


# ---- config ----------------------------------------------------------------------------------

_REQUIRED = object()


def _get(hf: dict[str, Any], key: str, kind: type, default: Any = _REQUIRED, size: bool = False) -> Any:
    """A config.json field of the right type (and, for a `size`, at least 1), or a one-line error
    naming it; `default` when it is missing or null."""
    value = hf.get(key)
    if value is None:
        if default is _REQUIRED:
            raise MemlmError(f"config.json has no '{key}'", "is the folder complete, and of a supported architecture?")
        return default
    number = kind in (int, float) and not isinstance(value, bool)
    ok = isinstance(value, (int, float) if kind is float else kind) and (number or kind not in (int, float))
    if not ok:
        raise MemlmError(f"config.json: '{key}' must be {kind.__name__}, got {value!r}", "fix config.json")
    if size:
        check_range("config.json", key, value, low=1, hint="fix config.json")
    elif kind is float:
        check_range("config.json", key, value, low=0, low_open=True, hint="fix config.json")
    return value


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    if not isinstance(hf, dict):
        raise MemlmError(f"config.json must hold a JSON object, got {type(hf).__name__}", "is this a Hugging Face model folder?")
    kind = hf.get("model_type")
    if kind == "gpt2":
        act = _get(hf, "activation_function", str, "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh", "gelu"):
            raise MemlmError(f"GPT-2 activation '{act}' is not supported", "supported: gelu_new, gelu")
        n_embd = _get(hf, "n_embd", int, size=True)
        return ModelConfig(
            name=_get(hf, "_name_or_path", str, "") or "gpt2", vocab_size=_get(hf, "vocab_size", int, size=True),
            block_size=_get(hf, "n_positions", int, size=True), n_layer=_get(hf, "n_layer", int, size=True),
            n_head=_get(hf, "n_head", int, size=True),
            n_embd=n_embd, ffn_hidden=_get(hf, "n_inner", int, 4 * n_embd, size=True),
            norm="layernorm", norm_eps=_get(hf, "layer_norm_epsilon", float, 1e-5), positions="learned",
            mlp="gelu", gelu_approximate="none" if act == "gelu" else "tanh", bias=True,
            tied_embeddings=_get(hf, "tie_word_embeddings", bool, True),
        )
    if kind == "llama":
        if _get(hf, "hidden_act", str, "silu") != "silu":
            raise MemlmError(f"Llama activation '{hf['hidden_act']}' is not supported", "supported: silu")
        rope = _get(hf, "rope_parameters", dict, None) or _get(hf, "rope_scaling", dict, None) or {}
        if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
            raise MemlmError(f"RoPE scaling '{rope.get('rope_type')}' is not supported", "only plain RoPE is")
        attn_bias, mlp_bias = _get(hf, "attention_bias", bool, False), _get(hf, "mlp_bias", bool, False)
        if attn_bias != mlp_bias:
            raise MemlmError("Llama checkpoints with bias in attention but not the MLP are not supported")
        n_head = _get(hf, "num_attention_heads", int, size=True)
        return ModelConfig(
            name=_get(hf, "_name_or_path", str, "") or "llama", vocab_size=_get(hf, "vocab_size", int, size=True),
            block_size=_get(hf, "max_position_embeddings", int, 2048, size=True),
            n_layer=_get(hf, "num_hidden_layers", int, size=True),
            n_head=n_head, n_kv_heads=_get(hf, "num_key_value_heads", int, n_head, size=True),
            n_embd=_get(hf, "hidden_size", int, size=True), head_dim=_get(hf, "head_dim", int, None, size=True),
            ffn_hidden=_get(hf, "intermediate_size", int, size=True), norm="rmsnorm",
            norm_eps=_get(hf, "rms_norm_eps", float, 1e-6), positions="rope",
            rope_theta=float(_get(rope, "rope_theta", float, None) or _get(hf, "rope_theta", float, 10000.0)),
            mlp="swiglu", bias=attn_bias, tied_embeddings=_get(hf, "tie_word_embeddings", bool, False),
        )
    raise MemlmError(f"Hugging Face model_type '{kind}' is not supported", f"supported: {', '.join(SUPPORTED)}")


def hf_architecture(config: ModelConfig) -> str:
    """Which HF architecture holds this memlm config exactly, or an error naming why none does."""
    if config.kind != "decoder":
        raise MemlmError(f"a {config.kind} model has no Hugging Face decoder twin to export to",
                         "export it with --to safetensors (memlm.load reads that folder back)")
    if config.norm == "layernorm" and config.positions == "learned" and config.mlp == "gelu" and config.bias \
            and config.n_kv_heads == config.n_head:
        return "gpt2"
    if config.norm == "rmsnorm" and config.positions == "rope" and config.mlp == "swiglu":
        return "llama"
    raise MemlmError(
        f"model '{config.name}' ({config.norm}, {config.positions} positions, {config.mlp}) has no Hugging Face twin",
        "export GPT-2 flavour (layernorm, learned, gelu, bias) or Llama flavour (rmsnorm, rope, swiglu)",
    )


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
    if hf_architecture(config) == "gpt2":
        return {
            "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": config.vocab_size,
            "n_positions": config.block_size, "n_ctx": config.block_size, "n_embd": config.n_embd,
            "n_layer": config.n_layer, "n_head": config.n_head, "n_inner": config.ffn_hidden,
            "activation_function": "gelu_new" if config.gelu_approximate == "tanh" else "gelu",
            "layer_norm_epsilon": config.norm_eps, "tie_word_embeddings": config.tied_embeddings,
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "torch_dtype": "float32",
        }
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": config.vocab_size,
        "hidden_size": config.n_embd, "intermediate_size": config.ffn_hidden,
        "num_hidden_layers": config.n_layer, "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_kv_heads, "head_dim": config.head_dim,
        "max_position_embeddings": config.block_size, "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta, "hidden_act": "silu", "attention_bias": config.bias,
        "mlp_bias": config.bias, "tie_word_embeddings": config.tied_embeddings, "torch_dtype": "float32",
    }


# ---- weights ---------------------------------------------------------------------------------

def _gpt2_names(config: ModelConfig):
    """(memlm name, HF name) pairs; HF GPT-2 Conv1D weights are stored transposed."""
    yield "tok_emb.weight", "transformer.wte.weight"
    yield "pos_emb.weight", "transformer.wpe.weight"
    for i in range(config.n_layer):
        m, h = f"blocks.{i}.", f"transformer.h.{i}."
        for part in ("weight", "bias"):
            yield m + f"attn_norm.{part}", h + f"ln_1.{part}"
            yield m + f"mlp_norm.{part}", h + f"ln_2.{part}"
            yield m + f"attn.o_proj.{part}", h + f"attn.c_proj.{part}"
            yield m + f"mlp.up_proj.{part}", h + f"mlp.c_fc.{part}"
            yield m + f"mlp.down_proj.{part}", h + f"mlp.c_proj.{part}"
    yield "norm.weight", "transformer.ln_f.weight"
    yield "norm.bias", "transformer.ln_f.bias"


def _llama_names(config: ModelConfig):
    yield "tok_emb.weight", "model.embed_tokens.weight"
    parts = ("weight", "bias") if config.bias else ("weight",)
    for i in range(config.n_layer):
        m, h = f"blocks.{i}.", f"model.layers.{i}."
        yield m + "attn_norm.weight", h + "input_layernorm.weight"
        yield m + "mlp_norm.weight", h + "post_attention_layernorm.weight"
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            for part in parts:
                yield m + f"attn.{proj}.{part}", h + f"self_attn.{proj}.{part}"
        for proj in ("gate_proj", "up_proj", "down_proj"):
            for part in parts:
                yield m + f"mlp.{proj}.{part}", h + f"mlp.{proj}.{part}"
    yield "norm.weight", "model.norm.weight"


def hf_module_names(config: ModelConfig) -> dict[str, str]:
    """{memlm name of a block Linear: the HF module that holds its weight}: what adapters on
    one are called on the other (GPT-2's q/k/v share its fused Conv1D `attn.c_attn`)."""
    arch = hf_architecture(config)
    out = {}
    for ours, theirs in (_gpt2_names(config) if arch == "gpt2" else _llama_names(config)):
        if ours.startswith("blocks.") and ours.endswith("_proj.weight"):
            out[ours.removesuffix(".weight")] = theirs.removesuffix(".weight")
    if arch == "gpt2":
        for i in range(config.n_layer):
            for proj in ("q_proj", "k_proj", "v_proj"):
                out[f"blocks.{i}.attn.{proj}"] = f"transformer.h.{i}.attn.c_attn"
    return out


def iter_state_from_hf(config: ModelConfig, get: Callable[[str], torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """(memlm name, tensor) pairs of an HF checkpoint, renamed (and for GPT-2 transposed/split),
    reading each HF tensor through `get(name)` once, when its pair is due: a loader that
    converts each pair before asking for the next holds one tensor at a time."""
    arch = hf_architecture(config)
    names = _gpt2_names(config) if arch == "gpt2" else _llama_names(config)
    for ours, theirs in names:
        t = get(theirs)
        if arch == "gpt2" and theirs.endswith("weight") and t.ndim == 2 and ".h." in theirs:
            t = t.t()  # Conv1D (in, out) -> Linear (out, in)
        yield ours, t.contiguous()
    if arch == "gpt2":
        d = config.n_embd
        for i in range(config.n_layer):
            w = get(f"transformer.h.{i}.attn.c_attn.weight").t()  # (3d, d)
            b = get(f"transformer.h.{i}.attn.c_attn.bias")
            for j, proj in enumerate(("q_proj", "k_proj", "v_proj")):
                yield f"blocks.{i}.attn.{proj}.weight", w[j * d:(j + 1) * d].contiguous()
                yield f"blocks.{i}.attn.{proj}.bias", b[j * d:(j + 1) * d].contiguous()
    if not config.tied_embeddings:
        yield "lm_head.weight", get("lm_head.weight").contiguous()


def _missing(name: str) -> MemlmError:
    return MemlmError(f"checkpoint is missing tensor '{name}'", "is the folder complete and of this architecture?")


def state_dict_from_hf(config: ModelConfig, hf_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename (and for GPT-2 transpose/split) an HF state dict into memlm's names."""

    def take(name: str) -> torch.Tensor:
        if name not in hf_sd:
            raise _missing(name)
        return hf_sd[name]

    sd = dict(iter_state_from_hf(config, take))
    if config.tied_embeddings:
        sd["lm_head.weight"] = sd["tok_emb.weight"]
    return sd


def state_dict_to_hf(model: Decoder) -> dict[str, torch.Tensor]:
    config = model.config
    ours = {k: v.detach() for k, v in model.state_dict().items()}
    arch = hf_architecture(config)
    out: dict[str, torch.Tensor] = {}
    names = _gpt2_names(config) if arch == "gpt2" else _llama_names(config)
    for mine, theirs in names:
        t = ours[mine]
        if arch == "gpt2" and theirs.endswith("weight") and t.ndim == 2 and ".h." in theirs:
            t = t.t()
        out[theirs] = t
    if arch == "gpt2":
        for i in range(config.n_layer):
            a = f"blocks.{i}.attn."
            out[f"transformer.h.{i}.attn.c_attn.weight"] = torch.cat(
                [ours[a + f"{p}.weight"] for p in ("q_proj", "k_proj", "v_proj")]).t()
            out[f"transformer.h.{i}.attn.c_attn.bias"] = torch.cat(
                [ours[a + f"{p}.bias"] for p in ("q_proj", "k_proj", "v_proj")])
    if not config.tied_embeddings:
        out["lm_head.weight"] = ours["lm_head.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def model_from_hf_state_dict(config: ModelConfig, hf_sd: dict[str, torch.Tensor],
                             dtype: torch.dtype = torch.float32, weight_format: str | None = None) -> Decoder:
    """Build on the meta device and assign the converted tensors: no throw-away random init."""
    return _assemble(config, hf_sd.__getitem__, dtype, weight_format, "the state dict", set(hf_sd))


def _assemble(config: ModelConfig, get: Callable[[str], torch.Tensor], dtype: torch.dtype,
              weight_format: str | None, source: str, names: set[str], use_kernel: bool | None = None) -> Decoder:
    assembler = ModelAssembler(empty_model(config), weight_format, dtype, use_kernel, source=source)

    def take(name: str) -> torch.Tensor:
        if name not in names:
            raise _missing(name)
        return get(name)

    for key, t in iter_state_from_hf(config, take):
        assembler.put(key, t)  # a block Linear is converted here, before the next tensor is read
    return assembler.finish()


# ---- folders ---------------------------------------------------------------------------------

def read_hf_config(folder: str | Path) -> dict[str, Any]:
    """The JSON of a folder's config.json (a one-line error when it is not JSON)."""
    return read_json_object(Path(folder) / "config.json", "is this a Hugging Face model folder?")


def is_hf_folder(path: str | Path) -> bool:
    return (Path(path) / "config.json").is_file()


class _FolderWeights:
    """The tensors of an HF folder by name, each read on request into fresh memory.

    safetensors shards go through TensorFile (plain reads, not a map of the file whose touched
    pages would stay charged to the process); a legacy pytorch_model.bin is loaded with
    `torch.load(weights_only=True, mmap=True)`: never an unrestricted unpickle.
    """

    def __init__(self, folder: Path):
        self.folder = folder
        self._files: list[TensorFile] = []
        self._where: dict[str, TensorFile] = {}
        self._bin: dict[str, torch.Tensor] | None = None
        try:
            for path in sorted(folder.glob("*.safetensors")):
                f = TensorFile(path)
                self._files.append(f)
                self._where.update(dict.fromkeys(f.keys(), f))
            if not self._files and (folder / "pytorch_model.bin").is_file():
                self._bin = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True, mmap=True)
        except MemlmError as e:
            self.close()
            raise self._unreadable(e.message) from None
        except pickle.UnpicklingError:  # torch's weights-only unpickler met something but tensors
            self.close()
            raise MemlmError(
                f"{folder / 'pytorch_model.bin'} holds Python objects besides tensors: a pickle that could run "
                "code, which memlm never unpickles",
                "get the model as .safetensors, or convert the file with a tool you trust",
            ) from None
        except (OSError, RuntimeError, ValueError) as e:
            self.close()
            raise self._unreadable(str(e).splitlines()[0]) from None
        if not self._where and not self._bin:
            raise MemlmError(f"no weights in {folder}", "expected *.safetensors or pytorch_model.bin beside config.json")

    def _unreadable(self, why: str) -> MemlmError:
        return MemlmError(f"cannot read weights in {self.folder}: {why}",
                          "the file is truncated or corrupted: export or download it again")

    def names(self) -> set[str]:
        return set(self._bin) if self._bin is not None else set(self._where)

    def get(self, name: str) -> torch.Tensor:
        if self._bin is not None:
            return self._bin[name]
        try:
            return self._where[name].read(name)
        except MemlmError as e:
            raise self._unreadable(e.message) from None

    def close(self) -> None:
        for f in self._files:
            f.close()


def load_hf(folder: str | Path, dtype: torch.dtype = torch.float32, weight_format: str | None = None,
            use_kernel: bool | None = None) -> Decoder:
    """A Hugging Face folder as a memlm Decoder; weight_format as in memlm.loading.load_model
    (each block Linear is converted as it is read: the float32 model never exists)."""
    folder = Path(folder)
    hf_config = read_hf_config(folder)
    config = config_from_hf(hf_config)
    config.name = folder.name
    weights = _FolderWeights(folder)
    try:
        return _assemble(config, weights.get, dtype, weight_format, str(folder), weights.names(), use_kernel)
    finally:
        weights.close()


def save_hf(model: Decoder, folder: str | Path, tokenizer=None) -> Path:
    """Write config.json + model.safetensors (+ tokenizer.json) that `from_pretrained(folder)` loads."""
    folder = Path(folder)
    hf_config = config_to_hf(model.config)
    if tokenizer is not None:
        hf_config.update(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id)
    tensors = {k: v.float() if v.dtype != torch.bfloat16 else v for k, v in state_dict_to_hf(model).items()}
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _atomic_write(folder / "config.json", lambda p: Path(p).write_text(json.dumps(hf_config, indent=2)))
        _atomic_write(folder / "model.safetensors", lambda p: save_file(tensors, p, metadata={"format": "pt"}))
        if tokenizer is not None:
            tokenizer.save(folder)
    except (OSError, SafetensorError) as e:
        if created:  # a failed export leaves nothing behind
            shutil.rmtree(folder, ignore_errors=True)
        raise io_error(e, f"export to {folder}") from e
    return folder


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
