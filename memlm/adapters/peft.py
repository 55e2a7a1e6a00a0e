"""LoRA adapters as files: the Hugging Face PEFT layout, both ways.

A folder holds what `peft`'s `save_pretrained` writes for a LoRA adapter:

  adapter_model.safetensors   {"base_model.model.<HF module>.lora_A.weight": (r, in),
                               "base_model.model.<HF module>.lora_B.weight": (out, r)}
                              (transformers' module names, e.g. model.layers.0.self_attn.q_proj;
                              metadata: "format": "pt" and memlm's fingerprint of the base)
  adapter_config.json         peft_type "LORA", task_type, r, lora_alpha, target_modules, ...

so `PeftModel.from_pretrained(transformers_model, folder)` loads a memlm adapter and
`memlm.load(base, adapter=folder)` a `peft` one. GPT-2 keeps q, k and v in one Conv1D
(`c_attn`): memlm's separate q/k/v adapters of a block are written as one c_attn adapter whose
lora_A stacks theirs and whose lora_B is block-diagonal (rank and alpha scaled together in
rank_pattern/alpha_pattern, so alpha / r is unchanged): the same update, exactly. Read back, a
c_attn adapter becomes one adapter per q/k/v sharing its lora_A.

The fingerprint (`base_fingerprint`) names the base an adapter was trained on: its shape and
its norm weights, which no memlm format quantizes (rounded to bf16, so an fp32, bf16, int8 or
int4 load of one model has one fingerprint). An adapter with another base's fingerprint, or whose
tensors do not fit the base's layers, is refused. Nothing is ever unpickled: an adapter saved
as `adapter_model.bin` is refused with a hint.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from memlm.adapters.lora import LoRALinear, lora_layers
from memlm.compress.quantize import set_module
from memlm.compress.storage import TensorFile, write_folder
from memlm.errors import MemlmError
from memlm.integrity import read_json_object
from memlm.interop.hf import hf_architecture, hf_module_names

WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
PREFIX = "base_model.model."
FINGERPRINT_KEY = "memlm_base_fingerprint"


def base_fingerprint(model: nn.Module) -> str:
    """A short hash of the base model: its config (name and dropout aside) and its norm weights
    rounded to bf16. Adapters (LoRA-wrapped layers) do not change it."""
    config = {k: v for k, v in model.config.to_dict().items() if k not in ("name", "dropout")}
    h = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if name.endswith("norm.weight"):
            h.update(name.encode())
            h.update(p.detach().to("cpu", torch.bfloat16).view(torch.int16).numpy().tobytes())
    return "memlm-base-1:" + h.hexdigest()[:32]


# ------------------------------------------------------------------------------ saving


def _uniform(values: list, what: str) -> Any:
    if len(set(values)) != 1:
        raise MemlmError(f"the adapters have different {what}s ({sorted(set(values))})",
                         "the PEFT layout is written for one rank and alpha per adapter")
    return values[0]


def adapter_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The adapters of `model` in PEFT's names, and the config fields that describe them."""
    layers = lora_layers(model)
    if not layers:
        raise MemlmError("the model has no LoRA adapters to save", "apply_lora first, or train with memlm finetune")
    r = _uniform([m.r for m in layers.values()], "rank")
    alpha = _uniform([m.alpha for m in layers.values()], "alpha")
    dropout = _uniform([getattr(m.lora_dropout, "p", 0.0) for m in layers.values()], "dropout")
    names = hf_module_names(model.config)
    tensors: dict[str, torch.Tensor] = {}
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    fused: dict[str, list[tuple[str, LoRALinear]]] = {}  # GPT-2 c_attn: its q/k/v adapters
    for name, m in layers.items():
        if name not in names:
            raise MemlmError(f"adapter on {name} has no Hugging Face counterpart")
        theirs = names[name]
        if theirs.endswith(".c_attn"):
            fused.setdefault(theirs, []).append((name, m))
            continue
        tensors[f"{PREFIX}{theirs}.lora_A.weight"] = m.lora_A.weight.detach().float().contiguous()
        tensors[f"{PREFIX}{theirs}.lora_B.weight"] = m.lora_B.weight.detach().float().contiguous()
    d = model.config.n_embd
    for theirs, parts in fused.items():
        order = {"q_proj": 0, "k_proj": 1, "v_proj": 2}
        parts.sort(key=lambda nm: order[nm[0].rpartition(".")[2]])
        A = torch.cat([m.lora_A.weight.detach().float() for _, m in parts])  # (k*r, d)
        B = torch.zeros(3 * d, A.shape[0])
        for j, (name, m) in enumerate(parts):
            row = order[name.rpartition(".")[2]] * d
            B[row:row + d, j * r:(j + 1) * r] = m.lora_B.weight.detach().float()
        tensors[f"{PREFIX}{theirs}.lora_A.weight"] = A.contiguous()
        tensors[f"{PREFIX}{theirs}.lora_B.weight"] = B
    if fused:  # PEFT matches pattern keys against the end of module names
        parts_per_block = _uniform([len(p) for p in fused.values()], "number of q/k/v adapters per block")
        rank_pattern["c_attn"], alpha_pattern["c_attn"] = r * parts_per_block, alpha * parts_per_block
    short = sorted({k.removeprefix(PREFIX).rsplit(".", 2)[0].rpartition(".")[2] for k in tensors})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha, "lora_dropout": dropout,
        "target_modules": short, "fan_in_fan_out": hf_architecture(model.config) == "gpt2",
        "bias": "none", "use_rslora": False, "use_dora": False, "modules_to_save": None,
        "init_lora_weights": True, "inference_mode": True, "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern, "layers_to_transform": None, "layers_pattern": None, "revision": None,
    }
    return tensors, config


def save_adapter(model: nn.Module, folder: str | Path, base_name: str | None = None) -> Path:
    """Write the model's adapters (only them) in the PEFT layout into `folder`, atomically."""
    from safetensors.torch import save_file

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise MemlmError(f"{folder} exists and is not a folder", "pass a folder path to save the adapter into")
    tensors, config = adapter_tensors(model)
    config = {"base_model_name_or_path": base_name, **config}
    metadata = {"format": "pt", FINGERPRINT_KEY: base_fingerprint(model)}

    def fill(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata=metadata)
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")

    return write_folder(folder, fill)


# ------------------------------------------------------------------------------ loading


def is_adapter_folder(path: str | Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def read_adapter_config(folder: str | Path) -> dict[str, Any]:
    folder = Path(folder)
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise MemlmError(f"{folder} is not a LoRA adapter folder (no {CONFIG_FILE})",
                         "pass the folder memlm finetune or peft's save_pretrained wrote")
    config = read_json_object(path, "the adapter is damaged; save it again")
    if config.get("peft_type") != "LORA":
        raise MemlmError(f"{folder} holds a {config.get('peft_type')!r} adapter; memlm reads LoRA adapters")
    for key, why in (("use_dora", "DoRA"), ("use_rslora", "rank-stabilised scaling")):
        if config.get(key):
            raise MemlmError(f"{folder} is a LoRA adapter with {why} ({key}), which memlm does not run",
                             "train the adapter with plain LoRA")
    if config.get("bias", "none") != "none" or config.get("modules_to_save"):
        raise MemlmError(f"{folder} also trains biases or whole modules (bias / modules_to_save)",
                         "memlm reads adapters of lora_A / lora_B weights only")
    for key in ("r", "lora_alpha"):
        if not isinstance(config.get(key), (int, float)) or isinstance(config.get(key), bool) or config[key] <= 0:
            raise MemlmError(f"{path}: '{key}' must be a positive number, got {config.get(key)!r}",
                             "the adapter is damaged; save it again")
    return config


def _pattern_value(pattern: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup: a key matching the end of the module's name."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _read_tensors(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        if (folder / "adapter_model.bin").is_file():
            raise MemlmError(f"{folder} holds adapter_model.bin (a pickle), which memlm never loads",
                             "save the adapter with safetensors (peft's save_pretrained does by default)")
        raise MemlmError(f"{folder} has no {WEIGHTS_FILE}", "the adapter is incomplete; save it again")
    with TensorFile(weights) as f:
        tensors = {k: f.read(k) for k in f.keys()}
    with open(weights, "rb") as fh:  # the metadata sits in the header TensorFile has validated
        n = int.from_bytes(fh.read(8), "little")
        metadata = json.loads(fh.read(n)).get("__metadata__") or {}
    return tensors, metadata


def load_adapter(model: nn.Module, folder: str | Path) -> list[str]:
    """Wrap `model`'s layers in the adapters saved in `folder` (PEFT layout), in place; returns
    the memlm names of the wrapped layers. Refuses an adapter made for another base."""
    folder = Path(folder)
    config = read_adapter_config(folder)
    tensors, metadata = _read_tensors(folder)
    fingerprint = metadata.get(FINGERPRINT_KEY)
    if fingerprint is not None and fingerprint != base_fingerprint(model):
        raise MemlmError(f"the adapter in {folder} was trained on another base model "
                         f"({config.get('base_model_name_or_path') or 'unnamed'}), not on {model.config.name}",
                         "load it onto the model it was trained on")
    ours = {theirs: [] for theirs in set(hf_module_names(model.config).values())}
    for mine, theirs in hf_module_names(model.config).items():
        ours[theirs].append(mine)
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = re.fullmatch(rf"{re.escape(PREFIX)}(.+)\.(lora_A|lora_B)(?:\.[^.]+)?\.weight", key)
        if m is None:
            raise MemlmError(f"{folder / WEIGHTS_FILE}: unexpected tensor {key!r}",
                             "memlm reads LoRA adapters of lora_A / lora_B weights only")
        if m.group(1) not in ours:
            raise MemlmError(f"the adapter in {folder} targets {m.group(1)!r}, which this base "
                             f"({model.config.name}) does not have", "load it onto the model it was trained on")
        modules.setdefault(m.group(1), {})[m.group(2)] = t
    wrapped = []
    d = model.config.n_embd
    for theirs, pair in sorted(modules.items()):
        if set(pair) != {"lora_A", "lora_B"}:
            raise MemlmError(f"{folder / WEIGHTS_FILE}: {theirs} has only {sorted(pair)}",
                             "the adapter is damaged; save it again")
        A, B = pair["lora_A"].float(), pair["lora_B"].float()
        r = int(_pattern_value(config.get("rank_pattern"), theirs, config["r"]))
        alpha = float(_pattern_value(config.get("alpha_pattern"), theirs, config["lora_alpha"]))
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise MemlmError(f"{folder / WEIGHTS_FILE}: {theirs} has lora_A {tuple(A.shape)} and lora_B "
                             f"{tuple(B.shape)}, which do not make an update", "the adapter is damaged; save it again")
        targets = sorted(ours[theirs])
        rows = [B] if len(targets) == 1 else list(B.split(d))  # GPT-2 c_attn: q, k, v rows
        for mine, b in zip(_qkv_order(targets), rows):
            if len(targets) > 1 and not b.any():
                continue  # a block of c_attn with no update (memlm wrote q and v only, say)
            wrapped.append(_wrap(model, mine, A, b, A.shape[0], alpha * A.shape[0] / r, folder))
    return wrapped


def _qkv_order(names: list[str]) -> list[str]:
    order = {"q_proj": 0, "k_proj": 1, "v_proj": 2}
    return sorted(names, key=lambda n: order.get(n.rpartition(".")[2], 0))


def _wrap(model: nn.Module, name: str, A: torch.Tensor, B: torch.Tensor, r: int, alpha: float,
          folder: Path) -> str:
    base = model.get_submodule(name)
    if isinstance(base, LoRALinear):
        raise MemlmError(f"{name} already has an adapter", "merge it first (memlm merge) or load onto the base")
    layer = LoRALinear(base, r, alpha)
    if tuple(A.shape) != (r, layer.in_features) or tuple(B.shape) != (layer.out_features, r):
        raise MemlmError(f"the adapter in {folder} does not fit {name} of this base: lora_A {tuple(A.shape)}, "
                         f"lora_B {tuple(B.shape)} for a {layer.out_features} x {layer.in_features} layer",
                         "load it onto the model it was trained on")
    with torch.no_grad():
        layer.lora_A.weight.copy_(A)
        layer.lora_B.weight.copy_(B)
    set_module(model, name, layer)
    return name
