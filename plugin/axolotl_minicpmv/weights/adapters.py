"""Reading, checking and applying MiniCPM-V 2.0 adapters: Axolotl run dirs and `minicpmv-export` outputs.

Two layouts load with one call (`apply_adapter`, used by `loading.load_model` and `MiniCPMVChat`):
- PEFT adapter: adapter_config.json + adapter_model.safetensors (or .bin) holding the LoRA tensors and full
  copies of the `modules_to_save` (vision tower, resampler, embeddings), as Axolotl saves it;
- the seed's official LoRA layout: the same without modules_to_save, plus `vpm_resampler_embedtokens.pt`.
The loaded model must equal the trained one exactly: see tests/test_export.py.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

PEFT_PREFIX = "base_model.model."
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
OFFICIAL_FULL_WEIGHTS = "vpm_resampler_embedtokens.pt"
ZERO3_HINT = (
    "DeepSpeed ZeRO-3 saved it without gathering the partitioned weights: set "
    "`stage3_gather_16bit_weights_on_model_save: true` in the DeepSpeed config (configs/deepspeed/zero3.json does) "
    "and save again, or rebuild the weights from the checkpoint's global_step* folder with zero_to_fp32.py"
)


class AdapterError(ValueError):
    """An adapter directory that cannot be used with the given base model, with what is wrong and the fix."""


def load_torch_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A plain dict of tensors from a .bin/.pt file, unpickled with weights_only=True (never arbitrary objects)."""
    path = Path(path)
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:  # legacy (non-zip) files cannot be memory-mapped
            if "mmap" not in str(err):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise AdapterError(f"{path} cannot be read ({type(err).__name__}: {err}); the file is incomplete or not a weights file") from None
    if not isinstance(state, Mapping) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise AdapterError(f"{path} is not a dict of tensors (name -> torch.Tensor)")
    return dict(state)


def _safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except Exception as err:
        raise AdapterError(
            f"{path} cannot be read ({type(err).__name__}: {err}); the file is incomplete or corrupt (was the run stopped while saving?)"
        ) from None


def _strip_prefix(key: str, file: Path) -> str:
    if not key.startswith(PEFT_PREFIX):
        raise AdapterError(f"{file}: tensor {key!r} does not start with {PEFT_PREFIX!r}; not a PEFT adapter of a whole model")
    return key[len(PEFT_PREFIX) :]


def is_lora_name(name: str) -> bool:
    """True for LoRA's own tensors (`...q_proj.lora_A.weight`), False for full copies of trained modules."""
    return any(part.startswith("lora_") for part in name.split("."))


def base_weight_name(name: str) -> str:
    """The base tensor a full tensor of the adapter replaces: PEFT saves the base weights of LoRA-targeted embedding
    layers (lm_head, embed_tokens) under the wrapped name, `llm.lm_head.base_layer.weight` for `llm.lm_head.weight`."""
    return name.replace(".base_layer.", ".")


def split_lora_name(name: str) -> tuple[str, str, str]:
    """`llm.….q_proj.lora_A.weight` -> (`llm.….q_proj`, `lora_A`, `weight`)."""
    parts = name.split(".")
    index = next(i for i, part in enumerate(parts) if part.startswith("lora_"))
    return ".".join(parts[:index]), parts[index], ".".join(parts[index + 1 :])


@dataclass
class Adapter:
    """One adapter directory. Names are model tensor names (the `base_model.model.` prefix removed)."""

    path: Path
    config: dict
    weights_file: Path
    full_file: Path | None = None  # the official layout's vpm_resampler_embedtokens.pt
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def lora_names(self) -> list[str]:
        return [n for n in self.shapes if is_lora_name(n)]

    def tensors(self, progress: bool = False) -> dict[str, torch.Tensor]:
        """All tensors (LoRA and full copies), loaded on CPU in the dtypes they were saved in."""
        from tqdm.auto import tqdm

        if self.weights_file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(self.weights_file), framework="pt") as handle:
                keys = list(handle.keys())
                bar = tqdm(keys, desc=f"reading {self.weights_file.name}", unit="tensor", disable=not progress, leave=False)
                raw = {key: handle.get_tensor(key) for key in bar}
        else:
            raw = self._cache.pop("weights", None) or load_torch_file(self.weights_file)
        tensors = {_strip_prefix(k, self.weights_file): v for k, v in raw.items()}
        tensors.update(self.official_full_tensors())
        return tensors

    def official_full_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors of vpm_resampler_embedtokens.pt (official layout only), by model tensor name."""
        if self.full_file is None:
            return {}
        full = self._cache.pop("full", None) or load_torch_file(self.full_file)
        return {_full_name(k): v for k, v in full.items()}


def _full_name(key: str) -> str:
    return key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key


def read_adapter(path: str | os.PathLike) -> Adapter:
    """Open an adapter directory (shapes only; `Adapter.tensors()` loads), refusing partial or foreign folders."""
    path = Path(path)
    if not path.is_dir():
        raise AdapterError(f"adapter directory {str(path)!r} does not exist")
    config_file = path / ADAPTER_CONFIG
    weights = [path / name for name in ADAPTER_WEIGHTS if (path / name).is_file()]
    if not config_file.is_file():
        if (path / "config.json").is_file() and (any(path.glob("model*.safetensors")) or any(path.glob("pytorch_model*.bin"))):
            raise AdapterError(
                f"{str(path)!r} is a full model checkpoint (config.json + weights), not an adapter: load it as the model "
                f"itself, e.g. MiniCPMVChat({str(path)!r}) or MiniCPMV.from_pretrained({str(path)!r})"
            )
        raise AdapterError(f"{str(path)!r} has no {ADAPTER_CONFIG}: not a PEFT adapter directory")
    if not weights:
        raise AdapterError(
            f"{str(path)!r} has {ADAPTER_CONFIG} but no {' or '.join(ADAPTER_WEIGHTS)}: the adapter was never saved "
            "completely (Axolotl writes adapter_config.json before training starts)"
        )
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise AdapterError(f"{config_file} is not valid JSON ({err})") from None
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{config_file}: peft_type {config.get('peft_type')!r} is not supported; MiniCPM-V exports handle LoRA adapters")
    adapter = Adapter(path=path, config=config, weights_file=weights[0])
    if adapter.weights_file.stat().st_size == 0:
        raise AdapterError(f"{adapter.weights_file} is empty (0 bytes): the save was interrupted; {ZERO3_HINT}")
    if adapter.weights_file.suffix == ".safetensors":
        raw_shapes = _safetensors_shapes(adapter.weights_file)
    else:
        state = load_torch_file(adapter.weights_file)
        adapter._cache["weights"] = state
        raw_shapes = {k: tuple(v.shape) for k, v in state.items()}
    adapter.shapes = {_strip_prefix(k, adapter.weights_file): s for k, s in raw_shapes.items()}
    full_file = path / OFFICIAL_FULL_WEIGHTS
    if full_file.is_file():
        full = load_torch_file(full_file)
        adapter.full_file = full_file
        adapter._cache["full"] = full
        adapter.shapes.update({_full_name(k): tuple(v.shape) for k, v in full.items()})
    if not adapter.shapes:
        raise AdapterError(f"{adapter.weights_file} holds no tensors; {ZERO3_HINT}")
    return adapter


def check_adapter_fits(adapter: Adapter, base_shapes: Mapping[str, tuple[int, ...]], base_name: str) -> None:
    """Every adapter tensor must land on a base tensor of the right shape; otherwise name each mismatch."""
    fan_in_fan_out = bool(adapter.config.get("fan_in_fan_out"))
    empty, problems = [], []
    for name, shape in adapter.shapes.items():
        if math.prod(shape) == 0:
            empty.append(f"{name} {shape}")
            continue
        if not is_lora_name(name):
            target = base_weight_name(name)
            if target not in base_shapes:
                problems.append(f"{name}: shape {shape} in the adapter, no such tensor in the base")
            elif tuple(base_shapes[target]) != shape:
                problems.append(f"{name}: shape {shape} in the adapter, {tuple(base_shapes[target])} in the base")
            continue
        module, part, param = split_lora_name(name)
        weight = f"{module}.weight"
        if weight not in base_shapes:
            problems.append(f"{name}: LoRA on {module!r}, which the base does not have")
            continue
        out_features, in_features = tuple(base_shapes[weight])[:2]
        if fan_in_fan_out:
            out_features, in_features = in_features, out_features
        expected = {
            ("lora_A", "weight"): lambda s: s[1:] == (in_features,),
            ("lora_B", "weight"): lambda s: s[:1] == (out_features,),
            ("lora_B", "bias"): lambda s: s == (out_features,),
            ("lora_embedding_A", ""): lambda s: s[1:] == (out_features,),  # (r, num_embeddings)
            ("lora_embedding_B", ""): lambda s: s[:1] == (in_features,),  # (embedding_dim, r)
        }.get((part, param))
        if expected is not None and not expected(shape):
            problems.append(f"{name}: shape {shape} in the adapter does not fit the base's {weight} of shape {tuple(base_shapes[weight])}")
    if empty:
        raise AdapterError(f"{adapter.weights_file}: {len(empty)} tensors are empty (e.g. {', '.join(empty[:3])}): {ZERO3_HINT}")
    if problems:
        shown = "\n  - ".join(problems[:10]) + (f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else "")
        trained_on = adapter.config.get("base_model_name_or_path")
        raise AdapterError(
            f"adapter {str(adapter.path)!r} does not fit base model {base_name!r} ({len(problems)} tensors):\n  - {shown}\n"
            f"It was trained on another base model (its adapter_config.json names {trained_on!r}); "
            "pass the base model it was trained on."
        )


MERGEABLE_LORA_TENSORS = {"lora_A.weight", "lora_B.weight", "lora_B.bias", "lora_embedding_A", "lora_embedding_B"}


def lora_merge_plan(
    adapter: Adapter, tensors: Mapping[str, torch.Tensor], base_shapes: Mapping[str, tuple[int, ...]]
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """(LoRA tensors by module, e.g. {"lora_A.weight": A, "lora_B.weight": B}; full tensors by name) of an adapter,
    refusing what cannot be merged exactly into plain weights."""
    if adapter.config.get("use_dora"):
        raise AdapterError("DoRA adapters (use_dora: true) cannot be merged into plain weights")
    lora_names = set(adapter.lora_names)
    lora: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    full: dict[str, torch.Tensor] = {}
    for tensor_name, tensor in tensors.items():
        if tensor_name in lora_names:
            module, part, param = split_lora_name(tensor_name)
            lora[module][f"{part}.{param}" if param else part] = tensor
        else:
            full[base_weight_name(tensor_name)] = tensor
    for module, parts in lora.items():
        if set(parts) - MERGEABLE_LORA_TENSORS:
            raise AdapterError(f"{module}: cannot merge LoRA tensors {sorted(set(parts) - MERGEABLE_LORA_TENSORS)}")
        if not ({"lora_A.weight", "lora_B.weight"} <= parts.keys() or {"lora_embedding_A", "lora_embedding_B"} <= parts.keys()):
            raise AdapterError(f"{module}: the adapter holds only {sorted(parts)} of its LoRA pair; the adapter file is incomplete")
        if "lora_B.bias" in parts and f"{module}.bias" not in base_shapes:
            raise AdapterError(
                f"{module}: the adapter trains a LoRA bias (lora_bias: true) but the base module has no bias to merge it into"
            )
    return dict(lora), full


def merged_tensor(tensor_name: str, tensor: torch.Tensor, lora: Mapping[str, Mapping[str, torch.Tensor]], config: dict) -> torch.Tensor:
    """`tensor` (a base or fully trained tensor) with its module's LoRA delta added, in float32: the one LoRA merge
    (export and `load_model(merge=True)` both use it; tests/test_export.py pins it to PEFT's float32 merge)."""
    weight = tensor.to(torch.float32)
    module, _, leaf = tensor_name.rpartition(".")
    parts = lora.get(module)
    if not parts:
        return weight
    scale = _scaling(config, module, parts)
    if leaf == "weight" and "lora_A.weight" in parts:
        delta = parts["lora_B.weight"].float() @ parts["lora_A.weight"].float()
        return weight + (delta.T if config.get("fan_in_fan_out") else delta) * scale
    if leaf == "weight" and "lora_embedding_A" in parts:
        return weight + (parts["lora_embedding_B"].float() @ parts["lora_embedding_A"].float()).T * scale
    if leaf == "bias" and "lora_B.bias" in parts:
        return weight + parts["lora_B.bias"].float() * scale
    return weight


def _scaling(config: dict, module: str, parts: Mapping[str, torch.Tensor]) -> float:
    """PEFT's scaling for one module: lora_alpha (or its alpha_pattern) / r (sqrt(r) with rsLoRA)."""
    from peft.utils.other import get_pattern_key

    a = parts.get("lora_A.weight", parts.get("lora_embedding_A"))
    rank = a.shape[0]
    alpha_pattern = config.get("alpha_pattern") or {}
    alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), config.get("lora_alpha", 8))
    return alpha / rank**0.5 if config.get("use_rslora") else alpha / rank


def apply_adapter(model, adapter: str | os.PathLike, merge: bool = False):
    """`model` (a MiniCPMV) with the adapter in `adapter` applied: an `adapter` or `official-lora` export, or
    an Axolotl output_dir / checkpoint-N.

    Returns a `peft.PeftModel` with LoRA kept unmerged (exactly the trained arithmetic; `.chat(...)` and
    `.generate(...)` work through it), or with `merge=True` a plain MiniCPMV with LoRA merged into its weights
    by `merged_tensor` (in float32, then stored in the model's dtype: `load_model(merge=True)` loads the base in
    float32, so its weights are exactly those of a float32 `--format merged` export).
    """
    from peft import PeftModel

    info = read_adapter(adapter)
    state = model.state_dict()
    check_adapter_fits(info, {k: tuple(v.shape) for k, v in state.items()}, getattr(model.config, "_name_or_path", "") or "model")
    if merge:
        lora, full = lora_merge_plan(info, info.tensors(), {k: tuple(v.shape) for k, v in state.items()})
        changed = set(full) | {f"{module}.{leaf}" for module in lora for leaf in ("weight", "bias") if f"{module}.{leaf}" in state}
        model.load_state_dict(
            {name: merged_tensor(name, full.get(name, state[name]), lora, info.config).to(state[name].dtype) for name in changed},
            strict=False,
        )
        return model.eval()
    peft_model = PeftModel.from_pretrained(model, str(info.path))
    if info.full_file is not None:  # the seed's recipe: the trained modules go into the wrapped model by name
        full = {PEFT_PREFIX + k: v for k, v in info.official_full_tensors().items()}
        result = peft_model.load_state_dict(full, strict=False)
        if result.unexpected_keys:
            raise AdapterError(
                f"{info.full_file}: {len(result.unexpected_keys)} tensors fit nowhere in the model (e.g. {', '.join(result.unexpected_keys[:3])})"
            )
    return peft_model.eval()
