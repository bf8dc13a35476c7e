"""The fine-tuning loop shared by the retrieval methods (RA-CM3 now, FAiD next): teacher forcing on a frozen
backbone with LoRA on its language model and method-specific trainable modules.

Paper values (Appendix B.3, and the official `train_FAiD.py`) are the defaults of `FinetuneConfig`: one
epoch, global batch 256 (gradient accumulation over micro-batches), AdamW without weight decay, lr 2e-4 with a
10 % linear warm-up then constant, gradient norm clipped at 1 (the HF Trainer default the official script
uses), LoRA r=128, alpha=256, dropout 0.05 on the language model's q/v projections (what
`LoraConfig(task_type="CAUSAL_LM")` targets on Llama), generation head trainable, bf16 autocast where the
device computes bf16 natively (`precision: auto`, `arrag.precision`), float32 master weights.

How a method plugs in:

    def loss_fn(backbone, batch, generator) -> scalar loss (mean over the micro-batch rows)

``batch`` holds the rows of one micro-batch of ``examples`` (a dict of tensors sharing their first dimension,
moved to the model's device), ``generator`` a CPU `torch.Generator` seeded by (seed, step, micro-batch) for the
method's own randomness (e.g. caption dropout). RA-CM3 passes ``prefix_image_tokens`` to
`forward_teacher_forced`; FAiD passes ``layer_modules`` built from its blenders and gives those blenders as
``extra_modules`` so that they train, checkpoint and save with the adapter.

LoRA is injected in place (`peft.inject_adapter_in_model` on ``model.model.language_model``; Show-o:
``model.showo.model``), so module paths such as ``model.model.language_model.layers[i]`` stay valid for the decode
loop and for layer modules.

Several GPUs: run the command under ``torchrun --nproc_per_node G``; each process takes every G-th micro-batch
of a step and the gradients are summed (all-reduce) before the update, so the weights equal a single-process
run's up to floating-point summation order; process 0 writes checkpoints and outputs.

Checkpoints (a folder, resumable): ``adapter-<step>.safetensors`` (every trainable tensor) and ``state.pt``
(optimizer state, step, loss log, elapsed time; read with ``torch.load(weights_only=True)``) that names its
adapter file; both are written atomically, the state last. Each micro-batch reseeds torch's global RNG from
(seed, step, micro-batch) (LoRA dropout), and a step's rows come from `batch_indices`, so a resumed run ends
with the same weights as an uninterrupted one.

Output folder: adapter.safetensors (trainable tensors, by their names in the backbone; extra modules under
``extra.<name>.``), finetune.json (config, LoRA settings, base model), loss.csv, loss.png. `load_finetuned`
applies it to a freshly loaded backbone and merges LoRA into the weights, so generation costs what the base
model costs.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save
from torch import nn
from tqdm import tqdm

from arrag.clip import image_root
from arrag.models.janus import JanusBackbone
from arrag.precision import autocast, machine, resolve_precision
from arrag.shapes.dataset import read_annotations
from arrag.split_tokens import image_tokens
from arrag.training.loop import LossLog, batch_indices, load_checkpoint, save_checkpoint, step_generator
from evaluators.io import write_bytes_atomic, write_json_atomic

LossFunction = Callable[[JanusBackbone, dict[str, torch.Tensor], torch.Generator], torch.Tensor]
ADAPTER_FILE = "adapter.safetensors"
SETTINGS_FILE = "finetune.json"
EXTRA_PREFIX = "extra."


@dataclass(frozen=True)
class FinetuneConfig:
    epochs: float = 1.0  # passes over the examples (fractions allowed: steps = floor(epochs * n / global_batch))
    global_batch: int = 256
    micro_batch: int = 16  # rows per forward pass; gradients accumulate over global_batch / micro_batch of them
    lr: float = 2e-4
    warmup_fraction: float = 0.1  # linear warm-up over this fraction of the steps, then constant
    max_grad_norm: float = 1.0
    lora_rank: int = 128  # 0: no LoRA (the language model stays frozen)
    lora_alpha: int = 256
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    train_generation_head: bool = True
    precision: str = "auto"  # auto | fp32 | bf16 autocast (arrag.precision); resolved for the device
    checkpoint_every: int = 50  # optimizer steps
    seed: int = 0


def vq_tokens(backbone: JanusBackbone, files: list[Path], tokens_file: str | Path | None = None) -> torch.Tensor:
    """Image files -> their tokens [n, N] under the backbone's VQ (raster order, on the CPU): rows of
    `tokens_file` (`arrag tokenize`) when given, else encoded now."""
    return image_tokens(backbone.vq, files, backbone.model.config.vision_config.image_size, tokens_file)


def finetune_pairs(train_dir: str | Path, max_images: int = 0) -> tuple[list[dict], list[str], list[Path]]:
    """A fine-tuning split folder (images/<id>.png + annotations.jsonl with captions) -> (records, captions,
    image files) of its first `max_images` (0: all), in id order."""
    records = read_annotations(train_dir)[:max_images or None]
    missing = [r.get("id", "?") for r in records if not r.get("caption")]
    if missing:
        raise ValueError(f"{Path(train_dir) / 'annotations.jsonl'}: records {missing[:5]} have no 'caption'")
    return records, [r["caption"] for r in records], [image_root(train_dir) / f"{r['id']}.png" for r in records]


def optimizer_steps(config: FinetuneConfig, n_examples: int) -> int:
    return max(1, int(config.epochs * n_examples) // config.global_batch)


def learning_rate(config: FinetuneConfig, step: int, steps: int) -> float:
    """Linear warm-up over ceil(warmup_fraction * steps) steps, then constant."""
    warmup = math.ceil(config.warmup_fraction * steps)
    return config.lr * min(1.0, (step + 1) / warmup) if warmup else config.lr


def language_model(backbone) -> nn.Module:
    """The transformer LoRA goes into: Janus' language model, or Show-o's Phi model."""
    from arrag.models.showo import ShowoBackbone

    return backbone.model.showo.model if isinstance(backbone, ShowoBackbone) else backbone.model.model.language_model


def head_prefix(backbone) -> str:
    """Parameter-name prefix of the image-token head: Janus' generation head, Show-o's LM head."""
    from arrag.models.showo import ShowoBackbone

    return "showo.lm_head." if isinstance(backbone, ShowoBackbone) else "model.generation_head."


def add_lora(backbone: JanusBackbone, config: FinetuneConfig) -> None:
    """Inject LoRA layers into the language model in place (no-op when lora_rank is 0)."""
    if config.lora_rank > 0:
        lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                          target_modules=list(config.lora_targets), bias="none")
        inject_adapter_in_model(lora, language_model(backbone))


def trainable_parameters(backbone: JanusBackbone, config: FinetuneConfig,
                         extra_modules: dict[str, nn.Module]) -> dict[str, nn.Parameter]:
    """Freeze the backbone but LoRA (and the generation head if asked); every extra-module parameter trains.
    Returns {name: parameter} in a fixed order (backbone names, then extra.<module>.<name>)."""
    named, head = {}, head_prefix(backbone)
    for name, parameter in backbone.model.named_parameters():
        train = "lora_" in name or (config.train_generation_head and name.startswith(head))
        parameter.requires_grad_(train)
        if train:
            named[name] = parameter
    for module_name, module in extra_modules.items():
        for name, parameter in module.named_parameters():
            parameter.requires_grad_(True)
            named[f"{EXTRA_PREFIX}{module_name}.{name}"] = parameter
    return named


def _save_tensors(parameters: dict[str, nn.Parameter], path: Path) -> None:
    write_bytes_atomic(path, save({name: p.detach().cpu().contiguous() for name, p in parameters.items()}))


def _load_tensors(parameters: dict[str, nn.Parameter], path: Path) -> None:
    tensors = load_file(str(path))
    if set(tensors) != set(parameters):
        raise ValueError(f"{path} holds other tensors than the trainable ones: "
                         f"missing {sorted(set(parameters) - set(tensors))[:5]}, "
                         f"unexpected {sorted(set(tensors) - set(parameters))[:5]}")
    with torch.no_grad():
        for name, parameter in parameters.items():
            parameter.copy_(tensors[name])


def distributed_rank() -> tuple[int, int]:
    """(rank, world size) of the torchrun process group; (0, 1) without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def init_distributed(device: str) -> str:
    """Under torchrun (WORLD_SIZE > 1) join the process group (NCCL on GPUs, gloo on CPUs) and return this
    process's device; otherwise return `device` unchanged."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device
    backend = "nccl" if device != "cpu" and torch.cuda.is_available() else "gloo"
    torch.distributed.init_process_group(backend)
    return f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if backend == "nccl" else "cpu"


def all_reduce_gradients(parameters: dict[str, nn.Parameter], total: float, device: torch.device) -> float:
    """Sum the gradients (each process holds its micro-batches' share of the step's mean) and the logged loss
    over the processes; returns the summed loss."""
    for parameter in parameters.values():
        if parameter.grad is None:
            parameter.grad = torch.zeros_like(parameter)
        torch.distributed.all_reduce(parameter.grad)
    loss = torch.tensor([total], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(loss)
    return float(loss.item())


def finetune(
    backbone: JanusBackbone,
    examples: dict[str, torch.Tensor],
    loss_fn: LossFunction,
    config: FinetuneConfig,
    out_dir: str | Path,
    checkpoint_dir: str | Path,
    extra_modules: dict[str, nn.Module] | None = None,
    title: str = "fine-tuning",
) -> dict:
    """Fine-tune `backbone` (and `extra_modules`) on `examples` with `loss_fn`; save into `out_dir` and
    return training metrics. Resumes from `checkpoint_dir` when it holds a checkpoint of the same config."""
    extra_modules = extra_modules or {}
    device = backbone.model.device
    rank, world = distributed_rank()
    config = replace(config, precision=resolve_precision(config.precision, device))
    n_examples = len(next(iter(examples.values())))
    if any(len(v) != n_examples for v in examples.values()):
        raise ValueError("every tensor of `examples` needs the same first dimension")
    steps = optimizer_steps(config, n_examples)
    torch.manual_seed(config.seed)  # LoRA and extra-module initialisation
    add_lora(backbone, config)
    for module in extra_modules.values():
        module.to(device)
    parameters = trainable_parameters(backbone, config, extra_modules)
    for parameter in parameters.values():  # float32 master weights whatever the backbone's dtype
        parameter.data = parameter.data.float()
    optimizer = torch.optim.AdamW(parameters.values(), lr=config.lr, weight_decay=0.0)

    checkpoint_dir = Path(checkpoint_dir)
    log, start, seconds = LossLog(), 0, 0.0
    state = load_checkpoint(checkpoint_dir / "state.pt")
    if state is not None:
        if state["config"] != asdict(config) or state["n_examples"] != n_examples:
            raise ValueError(f"checkpoint {checkpoint_dir} was written with another config or data; delete it")
        _load_tensors(parameters, checkpoint_dir / state["adapter"])
        optimizer.load_state_dict(state["optimizer"])
        log, start, seconds = LossLog(state["log"]), state["step"], state["seconds"]

    backbone.model.train()
    for module in extra_modules.values():
        module.train()
    started = time.perf_counter() - seconds
    progress = tqdm(range(start, steps), desc=title, unit="step", initial=start, total=steps, mininterval=5,
                    disable=rank != 0)
    for step in progress:
        rows = batch_indices(n_examples, config.global_batch, step, config.seed)
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for micro, micro_rows in enumerate(rows.split(config.micro_batch)):
            if micro % world != rank:  # torchrun: micro-batches are dealt out to the processes
                continue
            torch.manual_seed((config.seed * 1_000_039 + step) * 1_000 + micro)  # dropout: (seed, step, micro)
            batch = {key: value[micro_rows].to(device) for key, value in examples.items()}
            generator = step_generator(config.seed, step * 1_000 + micro)
            with autocast(config.precision, device):
                loss = loss_fn(backbone, batch, generator).float()
            (loss * len(micro_rows) / len(rows)).backward()
            total += loss.item() * len(micro_rows) / len(rows)
        if world > 1:
            total = all_reduce_gradients(parameters, total, device)
        lr = learning_rate(config, step, steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        torch.nn.utils.clip_grad_norm_(parameters.values(), config.max_grad_norm)
        optimizer.step()
        log.add(step, loss=total, lr=lr)
        progress.set_postfix(loss=f"{total:.3f}", refresh=False)
        if rank == 0 and ((step + 1) % config.checkpoint_every == 0 or step + 1 == steps):
            adapter = f"adapter-{step + 1}.safetensors"
            _save_tensors(parameters, checkpoint_dir / adapter)
            save_checkpoint(checkpoint_dir / "state.pt", {
                "config": asdict(config), "n_examples": n_examples, "adapter": adapter,
                "optimizer": optimizer.state_dict(), "log": log.rows, "step": step + 1,
                "seconds": time.perf_counter() - started})
            for old in checkpoint_dir.glob("adapter-*.safetensors"):
                if old.name != adapter:
                    old.unlink()
    seconds = time.perf_counter() - started
    backbone.model.eval()
    for module in extra_modules.values():
        module.eval()

    out_dir = Path(out_dir)
    if rank == 0:
        _save_tensors(parameters, out_dir / ADAPTER_FILE)
        write_json_atomic(out_dir / SETTINGS_FILE, {
            "base": {"source": backbone.source, "revision": backbone.revision},
            "config": asdict(config), "extra_modules": sorted(extra_modules), "trainable_tensors": len(parameters)})
        log.write_csv(out_dir / "loss.csv")
        log.plot(out_dir / "loss.png", title)
    if world > 1:
        torch.distributed.barrier()
    losses = [row["loss"] for row in log.rows]
    window = max(1, min(10, len(losses) // 4))
    return {"optimizer_steps": steps, "examples": n_examples,
            "examples_seen": steps * min(n_examples, config.global_batch),
            "train_seconds": round(seconds, 1), "loss_first": sum(losses[:window]) / window,
            "loss_last": sum(losses[-window:]) / window, "loss_window": window,
            "trainable_parameters": sum(p.numel() for p in parameters.values()), "precision": config.precision,
            "machine": machine(device),
            "config": asdict(config)}


def merge_lora(module: nn.Module) -> None:
    """Merge every LoRA layer under `module` into its base layer and put the base layer back in its place."""
    for name, layer in list(module.named_modules()):
        if isinstance(layer, LoraLayer):
            layer.merge()
            parent, _, child = name.rpartition(".")
            setattr(module.get_submodule(parent), child, layer.get_base_layer())


def load_finetuned(backbone: JanusBackbone, weights_dir: str | Path,
                   extra_modules: dict[str, nn.Module] | None = None) -> dict:
    """Apply a `finetune` output folder to a freshly loaded `backbone` (and the method's `extra_modules`, built
    as for training): LoRA is injected, every saved tensor loaded, then LoRA merged into the weights.
    Returns the folder's settings (finetune.json)."""
    weights_dir = Path(weights_dir)
    settings = json.loads((weights_dir / SETTINGS_FILE).read_text())
    config = FinetuneConfig(**{**settings["config"], "lora_targets": tuple(settings["config"]["lora_targets"])})
    extra_modules = extra_modules or {}
    if sorted(extra_modules) != settings["extra_modules"]:
        raise ValueError(f"{weights_dir} was trained with extra modules {settings['extra_modules']}, "
                         f"got {sorted(extra_modules)}")
    add_lora(backbone, config)
    device = backbone.model.device
    for module in extra_modules.values():
        module.to(device)
    parameters = trainable_parameters(backbone, config, extra_modules)
    _load_tensors(parameters, weights_dir / ADAPTER_FILE)
    for parameter in backbone.model.parameters():
        parameter.requires_grad_(False)
    merge_lora(language_model(backbone))
    backbone.model.eval()
    return settings
