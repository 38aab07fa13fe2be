"""Exporting a finished Axolotl MiniCPM-V run: a PEFT adapter, the seed's official LoRA layout, or a merged
checkpoint in the official format (config.json verbatim, the base's tensor names and shapes, bf16 shards).

What is written loads with one call (`loading.load_model`, `MiniCPMVChat`, `MiniCPMV.from_pretrained`) and
computes what the trained model computed: tests/test_export.py compares logits and beam-search answers.
Backs `axolotl minicpmv-export` / `python -m axolotl_minicpmv export` (cli.py).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..model.checkpoint import CheckpointError, check_checkpoint_dir, is_hub_id
from .adapters import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    OFFICIAL_FULL_WEIGHTS,
    PEFT_PREFIX,
    Adapter,
    AdapterError,
    check_adapter_fits,
    lora_merge_plan,
    merged_tensor,
    read_adapter,
)

LOG = logging.getLogger(__name__)

FORMATS = ("adapter", "official-lora", "merged")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")
# Copied verbatim from the base into a merged export (plus any remote-code *.py the base ships for its auto_map).
MODEL_SIDE_FILES = ("config.json", "generation_config.json", "preprocessor_config.json")
SHARD_NAME = "model-{index:05d}-of-{total:05d}.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"


class ExportError(ValueError):
    """A run, base model or output directory that cannot be exported as asked, with the fix."""


# ------------------------------------------------------------------------------------------- the run


@dataclass
class Run:
    """What an export reads: the adapter folder (final or checkpoint-N) and the base model it was trained on."""

    adapter_dir: Path
    base_model: str
    axolotl_config: dict | None = None
    quantized: str | None = None  # e.g. "adapter: qlora, load_in_4bit" when the base was quantized in training


def resolve_run(source: str | os.PathLike, checkpoint: str | None = None, base_model: str | None = None) -> Run:
    """`source` is the run's Axolotl YAML (output_dir and base_model are read from it; relative paths are
    relative to the current directory, as for Axolotl) or its output_dir (base model from adapter_config.json)."""
    source_path = Path(source)
    if not source_path.exists():
        raise ExportError(f"{str(source)!r} does not exist: pass the run's Axolotl config (.yml) or its output_dir")
    cfg = None
    if source_path.is_file():
        if source_path.suffix not in (".yml", ".yaml"):
            raise ExportError(f"{str(source)!r} is a file but not a YAML config: pass the run's Axolotl config (.yml) or its output_dir")
        import yaml

        cfg = yaml.safe_load(source_path.read_text()) or {}
        if not isinstance(cfg, dict) or not cfg.get("output_dir"):
            raise ExportError(f"{str(source)!r} has no `output_dir`: is it the Axolotl config of the run?")
        run_dir = Path(cfg["output_dir"])
        if not run_dir.is_dir():
            raise ExportError(
                f"output_dir {str(run_dir)!r} (from {str(source)!r}, relative to the current directory {os.getcwd()!r}) "
                "does not exist: run the export from the directory training ran in, or pass the output_dir itself"
            )
    else:
        run_dir = source_path
    adapter_dir = _pick_adapter_dir(run_dir, checkpoint)
    try:
        adapter_config = json.loads((adapter_dir / "adapter_config.json").read_text())
    except json.JSONDecodeError as err:
        raise ExportError(f"{adapter_dir / 'adapter_config.json'} is not valid JSON ({err}): was the save interrupted?") from None
    base = base_model or (cfg or {}).get("base_model") or adapter_config.get("base_model_name_or_path")
    if not base:
        raise ExportError(
            f"no base model known for {str(adapter_dir)!r} (adapter_config.json has no base_model_name_or_path): pass --base-model"
        )
    return Run(adapter_dir=adapter_dir, base_model=str(base), axolotl_config=cfg, quantized=_quantization(cfg, run_dir))


def _checkpoints(run_dir: Path) -> list[Path]:
    found = [p for p in run_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-", 1)[1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-", 1)[1]))


def _has_adapter(path: Path) -> bool:
    """An adapter folder as `adapters.read_adapter` takes it: its config and its weights."""
    return (path / ADAPTER_CONFIG).is_file() and any((path / n).is_file() for n in ADAPTER_WEIGHTS)


def _pick_adapter_dir(run_dir: Path, checkpoint: str | None) -> Path:
    checkpoints = _checkpoints(run_dir)
    found = ", ".join(p.name for p in checkpoints) or "none"
    if checkpoint is not None:
        name = f"checkpoint-{checkpoint}" if str(checkpoint).isdigit() else str(checkpoint)
        chosen = run_dir / name
        if not chosen.is_dir():
            raise ExportError(f"{str(run_dir)!r} has no {name}; checkpoints found: {found}")
        if not _has_adapter(chosen):
            raise ExportError(
                f"{str(chosen)!r} holds no adapter (adapter_config.json + adapter_model.safetensors/.bin){_zero3_note(chosen)}"
            )
        return chosen
    if _has_adapter(run_dir):
        return run_dir
    if any(run_dir.glob("model*.safetensors")) or any(run_dir.glob("pytorch_model*.bin")):
        raise ExportError(
            f"{str(run_dir)!r} holds a full model (the run trained without `adapter:`), not a LoRA adapter: it is already a checkpoint"
        )
    if (run_dir / "adapter_config.json").is_file():
        why = "has adapter_config.json but no adapter_model.safetensors/.bin: the run has not finished (or stopped before its final save)"
    else:
        why = "holds no final adapter (adapter_config.json + adapter_model.safetensors)"
    raise ExportError(
        f"{str(run_dir)!r} {why}{_zero3_note(run_dir)}. Checkpoints found: {found}; export one with --checkpoint checkpoint-N"
    )


def _zero3_note(path: Path) -> str:
    if any(path.glob("global_step*")):
        return (
            "; it has DeepSpeed global_step* shards only: set `stage3_gather_16bit_weights_on_model_save: true` "
            "for ZeRO-3 runs so the adapter is saved whole"
        )
    return ""


def _quantization(cfg: dict | None, run_dir: Path) -> str | None:
    """How the base was quantized during training (QLoRA), from the YAML or the config.json Axolotl saves."""
    keys = [k for k in ("load_in_4bit", "load_in_8bit") if (cfg or {}).get(k)]
    if (cfg or {}).get("adapter") == "qlora":
        keys.insert(0, "adapter: qlora")
    if not keys and (run_dir / "config.json").is_file():
        quant = json.loads((run_dir / "config.json").read_text()).get("quantization_config") or {}
        keys = [k for k in ("load_in_4bit", "load_in_8bit") if quant.get(k)]
    return ", ".join(keys) or None


# ------------------------------------------------------------------------------------------- the base


class BaseCheckpoint:
    """The base model's files, read tensor by tensor (safetensors shards or pytorch_model*.bin)."""

    def __init__(self, name: str):
        self.name = name
        self.path = _locate_base(name)
        try:
            check_checkpoint_dir(self.path)
        except CheckpointError as err:
            raise ExportError(f"base model {name!r}: {err}") from None
        if json.loads((self.path / "config.json").read_text()).get("quantization_config"):
            raise ExportError(
                f"base model {name!r} is stored quantized; pass the unquantized base (e.g. openbmb/MiniCPM-V-2) with --base-model"
            )
        self.weight_map = self._weight_map()  # tensor name -> file name, in the base's order
        self.sharded_safetensors = (self.path / SAFETENSORS_INDEX).is_file()
        self._open: dict[str, object] = {}
        self.shapes = {name: tuple(self._meta(name)[0]) for name in self.weight_map}

    def _weight_map(self) -> dict[str, str]:
        for index in (SAFETENSORS_INDEX, "pytorch_model.bin.index.json"):
            if (self.path / index).is_file():
                return dict(json.loads((self.path / index).read_text())["weight_map"])
        for single in ("model.safetensors", "pytorch_model.bin"):
            if (self.path / single).is_file():
                return dict.fromkeys(self._file(single).keys(), single)
        raise ExportError(f"base model {self.name!r}: no weights in {str(self.path)!r}")

    def _file(self, file: str):
        if file not in self._open:
            if file.endswith(".safetensors"):
                from safetensors import safe_open

                self._open[file] = safe_open(str(self.path / file), framework="pt")
            else:
                from .adapters import load_torch_file

                self._open[file] = load_torch_file(self.path / file)
        return self._open[file]

    def _meta(self, name: str) -> tuple[list[int], str]:
        handle = self._file(self.weight_map[name])
        if isinstance(handle, dict):
            return list(handle[name].shape), str(handle[name].dtype)
        piece = handle.get_slice(name)
        return piece.get_shape(), piece.get_dtype()

    def tensor(self, name: str) -> torch.Tensor:
        handle = self._file(self.weight_map[name])
        return handle[name] if isinstance(handle, dict) else handle.get_tensor(name)

    def copy_side_files(self, names, out: Path) -> list[str]:
        copied = []
        for name in names:
            if (self.path / name).is_file():
                shutil.copyfile(self.path / name, out / name)
                copied.append(name)
        return copied


def _locate_base(name: str) -> Path:
    path = Path(name)
    if path.exists():
        return path
    if is_hub_id(name):
        from huggingface_hub import snapshot_download

        patterns = ["*.json", "*.model", "*.py", "*.txt"]
        try:
            local = Path(snapshot_download(name, allow_patterns=patterns + ["*.safetensors"]))
            if not any(local.glob("*.safetensors")):
                local = Path(snapshot_download(name, allow_patterns=patterns + ["*.bin"]))
        except Exception as err:
            raise ExportError(
                f"base model {name!r} could not be fetched from the Hugging Face Hub ({err}); pass a local directory with --base-model"
            ) from None
        return local
    raise ExportError(f"base model {name!r} not found (relative paths are relative to {os.getcwd()!r}); pass it with --base-model")


# ------------------------------------------------------------------------------------------- export


def export(
    source: str | os.PathLike,
    fmt: str,
    out: str | os.PathLike,
    *,
    checkpoint: str | None = None,
    base_model: str | None = None,
    overwrite: bool = False,
    dtype: str | torch.dtype = "bfloat16",
) -> Path:
    """Export the run in `source` (Axolotl YAML or output_dir) as `fmt` into `out`; returns `out`.

    fmt: "adapter" (self-contained PEFT adapter), "official-lora" (the seed's layout: LoRA-only PEFT files +
    vpm_resampler_embedtokens.pt) or "merged" (a standalone checkpoint in the official format, merged in
    float32 and stored in `dtype`). `checkpoint` picks checkpoint-N instead of the final adapter; `base_model`
    overrides the run's base. `out` is written through a temporary folder beside it and appears only complete.
    """
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    dtype = _parse_dtype(dtype)
    run = resolve_run(source, checkpoint=checkpoint, base_model=base_model)
    base = BaseCheckpoint(run.base_model)
    try:
        adapter = read_adapter(run.adapter_dir)
        check_adapter_fits(adapter, base.shapes, run.base_model)
    except AdapterError as err:
        raise ExportError(str(err)) from None
    out = Path(out)
    with _staged_output(out, overwrite, protected=[run.adapter_dir, base.path]) as staging:
        writer = {"adapter": _write_adapter, "official-lora": _write_official_lora, "merged": _write_merged}[fmt]
        writer(run, base, adapter, staging, dtype=dtype, name=out.absolute().name)
    return out


def _parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.removeprefix("torch.")]
    raise ExportError(f"--dtype {dtype!r} is not supported; choose one of {', '.join(DTYPES)}")


@contextmanager
def _staged_output(out: Path, overwrite: bool, protected: list[Path]):
    """Yield a fresh folder beside `out`; on success it replaces `out` by rename, on failure it is removed."""
    target = out.absolute()
    if target.is_symlink():  # the folder the link names is replaced; the link stays
        target = target.resolve()
    for keep in protected:
        keep = keep.resolve()
        if target.resolve() == keep or target.resolve() in keep.parents:
            raise ExportError(f"--out {str(out)!r} would replace {str(keep)!r}, which the export reads; choose another directory")
    if target.exists():
        if not target.is_dir():
            raise ExportError(f"--out {str(out)!r} exists and is a file")
        if any(target.iterdir()) and not overwrite:
            raise ExportError(f"--out {str(out)!r} exists and is not empty; choose a new directory or pass --overwrite to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.incomplete-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        yield staging
        replaced = None
        if target.exists():
            replaced = target.parent / f".{target.name}.replaced-{uuid.uuid4().hex[:8]}"
            target.rename(replaced)
        staging.rename(target)
        if replaced is not None:
            shutil.rmtree(replaced)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _peft_key(name: str) -> str:
    return PEFT_PREFIX + name


def _load_adapter_tensors(adapter: Adapter) -> dict[str, torch.Tensor]:
    return adapter.tensors(progress=True)


def _save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _copy_tokenizer(run: Run, base: BaseCheckpoint, out: Path) -> None:
    if not base.copy_side_files(TOKENIZER_FILES, out):  # fall back to the tokenizer Axolotl saved in the run
        for name in TOKENIZER_FILES:
            for folder in (run.adapter_dir, run.adapter_dir.parent):
                if (folder / name).is_file() and not (out / name).exists():
                    shutil.copyfile(folder / name, out / name)


def _base_for_config(run: Run, base: BaseCheckpoint) -> str:
    return str(base.path.resolve()) if Path(run.base_model).exists() else run.base_model


def _write_adapter(run: Run, base: BaseCheckpoint, adapter: Adapter, out: Path, dtype: torch.dtype, name: str) -> None:
    config = dict(adapter.config, base_model_name_or_path=_base_for_config(run, base))
    if adapter.full_file is not None and not config.get("modules_to_save"):
        raise ExportError(f"{str(run.adapter_dir)!r} is already in the official-lora layout; export it from the Axolotl run instead")
    tensors = _load_adapter_tensors(adapter)
    _save_safetensors({_peft_key(k): v for k, v in tensors.items()}, out / "adapter_model.safetensors")
    _write_json(out / "adapter_config.json", config)
    _copy_tokenizer(run, base, out)
    _write_readme(out, name, "adapter", run, base, adapter)


def _write_official_lora(run: Run, base: BaseCheckpoint, adapter: Adapter, out: Path, dtype: torch.dtype, name: str) -> None:
    config = dict(adapter.config, base_model_name_or_path=_base_for_config(run, base), modules_to_save=None)
    tensors = _load_adapter_tensors(adapter)
    lora_names = set(adapter.lora_names)
    lora = {_peft_key(k): v for k, v in tensors.items() if k in lora_names}
    full = {_peft_key(k): v.contiguous() for k, v in tensors.items() if k not in lora_names}
    _save_safetensors(lora, out / "adapter_model.safetensors")
    torch.save(full, out / OFFICIAL_FULL_WEIGHTS)
    _write_json(out / "adapter_config.json", config)
    _copy_tokenizer(run, base, out)
    _write_readme(out, name, "official-lora", run, base, adapter)


def _write_merged(run: Run, base: BaseCheckpoint, adapter: Adapter, out: Path, dtype: torch.dtype, name: str) -> None:
    config = adapter.config
    if run.quantized:
        LOG.warning(
            "The adapter was trained on a quantized base (%s); merging it onto the unquantized base weights of %s. "
            "The merged model therefore differs from the trained one by the quantization error of the base.",
            run.quantized,
            run.base_model,
        )
    try:
        lora, full = lora_merge_plan(adapter, adapter.tensors(progress=True), base.shapes)
    except AdapterError as err:
        raise ExportError(f"{err}; use --format adapter") from None

    def merged(tensor_name: str) -> torch.Tensor:
        tensor = full[tensor_name] if tensor_name in full else base.tensor(tensor_name)
        return merged_tensor(tensor_name, tensor, lora, config).to(dtype)

    plan = _shard_plan(base, dtype)
    index = {}
    total = 0
    with tqdm(
        total=len(base.weight_map), desc=f"merging LoRA in float32, writing {str(dtype).removeprefix('torch.')}", unit="tensor"
    ) as bar:
        for shard, names in plan.items():
            shard_tensors = {}
            for tensor_name in names:
                shard_tensors[tensor_name] = tensor = merged(tensor_name)
                total += tensor.numel() * tensor.element_size()
                index[tensor_name] = shard
                bar.update()
            _save_safetensors(shard_tensors, out / shard)
            del shard_tensors
    _write_json(out / SAFETENSORS_INDEX, {"metadata": {"total_size": total}, "weight_map": dict(sorted(index.items()))})
    base.copy_side_files(MODEL_SIDE_FILES, out)
    _set_config_dtype(out / "config.json", dtype)
    base.copy_side_files(sorted(p.name for p in base.path.glob("*.py")), out)  # remote code named by auto_map
    _copy_tokenizer(run, base, out)


def _set_config_dtype(config_file: Path, dtype: torch.dtype) -> None:
    """The copied config names the dtype the weights were written in: transformers (`dtype="auto"`, the default) and
    vLLM load a checkpoint in the dtype its config names, so a float32 export left saying bfloat16 would be rounded."""
    config = json.loads(config_file.read_text())
    name = str(dtype).removeprefix("torch.")
    keys = [key for key in ("torch_dtype", "dtype") if key in config] or ["torch_dtype"]
    if any(config.get(key) != name for key in keys):  # else the base's file stays byte for byte
        config.update({key: name for key in keys})
        config_file.write_text(json.dumps(config, indent=2) + "\n")


def _shard_plan(base: BaseCheckpoint, dtype: torch.dtype) -> dict[str, list[str]]:
    """Output shard -> tensor names: the base's own sharding when it has one (the official release: two
    shards), otherwise two shards split by size in the base's tensor order."""
    if base.sharded_safetensors:
        plan: dict[str, list[str]] = defaultdict(list)
        for name, shard in base.weight_map.items():
            plan[shard].append(name)
        return dict(plan)
    names = list(base.weight_map)
    sizes = [max(1, int(torch.Size(base.shapes[n]).numel())) for n in names]
    half, running, split = sum(sizes) / 2, 0, len(names)
    for i, size in enumerate(sizes):
        running += size
        if running >= half:
            split = i + 1
            break
    split = min(max(split, 1), max(len(names) - 1, 1))
    groups = [names[:split], names[split:]] if len(names) > 1 else [names]
    return {SHARD_NAME.format(index=i + 1, total=len(groups)): g for i, g in enumerate(groups)}


def _write_readme(out: Path, name: str, fmt: str, run: Run, base: BaseCheckpoint, adapter: Adapter) -> None:
    c = adapter.config
    base_name = _base_for_config(run, base)
    full = c.get("modules_to_save") or []
    cfg = run.axolotl_config or {}
    training = ", ".join(
        f"{k}: {cfg[k]}" for k in ("adapter", "learning_rate", "num_epochs", "max_steps", "micro_batch_size", "sequence_len") if k in cfg
    )
    lines = [
        f"# MiniCPM-V 2.0 LoRA adapter ({fmt} layout)",
        "",
        f"Exported by `minicpmv-export` (axolotl-minicpmv) from `{run.adapter_dir}`.",
        "",
        f"- Base model: `{base_name}`",
        f"- LoRA: r={c.get('r')}, lora_alpha={c.get('lora_alpha')}, lora_dropout={c.get('lora_dropout')}, "
        f"rslora={bool(c.get('use_rslora'))}, targets `{c.get('target_modules')}`",
        f"- Trained in full and stored here: {', '.join(full) or 'none'}"
        + (f" (in `{OFFICIAL_FULL_WEIGHTS}`)" if fmt == "official-lora" else " (modules_to_save, in adapter_model.safetensors)"),
    ]
    if training:
        lines.append(f"- Training: {training}")
    if run.quantized:
        lines.append(f"- Trained on a quantized base ({run.quantized}); load it onto the unquantized base.")
    lines += ["", "## Load", "", "```python", "from axolotl_minicpmv import MiniCPMV, MiniCPMVChat", ""]
    lines.append(f'chat = MiniCPMVChat("{base_name}", adapter="{name}")  # or load_model(base, adapter=...)')
    if fmt == "adapter":
        lines += [
            "# or with peft alone:",
            "from peft import PeftModel",
            f'model = PeftModel.from_pretrained(MiniCPMV.from_pretrained("{base_name}"), "{name}")',
        ]
    else:
        lines += [
            "# or the seed's recipe:",
            "import torch",
            "from peft import LoraConfig, get_peft_model, set_peft_model_state_dict",
            "from safetensors.torch import load_file",
            f'model = get_peft_model(MiniCPMV.from_pretrained("{base_name}"), LoraConfig.from_pretrained("{name}"))',
            f'model.load_state_dict(torch.load("{name}/{OFFICIAL_FULL_WEIGHTS}", weights_only=True), strict=False)',
            f'set_peft_model_state_dict(model, load_file("{name}/adapter_model.safetensors"))',
        ]
    lines += ["```", ""]
    (out / "README.md").write_text("\n".join(lines))


# ------------------------------------------------------------------------------------------- axolotl merge-lora


def refuse_axolotl_merge_lora(cfg) -> None:
    """Stop `axolotl merge-lora` before it writes anything (call from the plugin's `register`).

    Axolotl's default (memory-efficient) merge drops every trained vision/resampler tensor whose name does not
    end in `.weight` and its legacy merge runs in the training dtype, so neither equals `--format merged`.
    `axolotl merge-lora` sets `merge_lora: true` before plugins are registered, which is how it is recognised.
    """
    if not cfg.get("merge_lora"):
        return
    config = cfg.get("axolotl_config_path") or "CONFIG.yml"
    merged = Path(cfg.get("output_dir") or "OUTPUT_DIR") / "merged"
    raise ValueError(
        "axolotl merge-lora does not merge MiniCPM-V runs correctly (it drops trained vision-tower/resampler tensors "
        "such as biases, pos_embed and query), so it is stopped before writing anything. Merge with the plugin's exporter "
        f"instead:\n  axolotl minicpmv-export {config} --format merged --out {merged}"
    )
