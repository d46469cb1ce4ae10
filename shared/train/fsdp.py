"""FSDP2 for LoRA: a base model larger than one GPU, sharded across the ranks of one torchrun job.

``training_args.distributed`` picks how the ranks hold the model (``strategy``):

- ``ddp``: every rank holds the whole model; only the LoRA gradients are all-reduced (the default
  for models that fit a card: nothing is gathered per layer, so it is the faster of the two);
- ``fsdp``: ``torch.distributed.fsdp.fully_shard`` on every decoder layer, then on the root: each
  rank holds 1/N of every weight and all-gathers one layer at a time (FSDP2; bf16 compute, fp32
  gradient reduction and fp32 LoRA master weights on a GPU);
- ``auto``: ``fsdp`` when the base model's weights in bf16 take more than ``AUTO_FRACTION`` (half)
  of one card's total memory, else ``ddp``. The other half is what activations, the all-gathered
  layers, the LoRA optimizer state and the allocator need at the token budgets the fast path uses
  (Qwen2.5-7B: 15 GB, DDP on any 40 GB+ card; Qwen2.5-32B: 66 GB, FSDP on an 80 GB card, DDP on a
  141 GB H200). On a CPU there is no card: ``auto`` is ``ddp``. One process uses neither.

The sharded model is never whole on one device: it is built on the meta device from its config,
LoRA is injected, ``fully_shard`` runs on the meta model, ``to_empty`` allocates each rank's
shards only, and each rank then reads only its own rows of every weight from the safetensors
files (``safe_open(...).get_slice``); a benchmark passes its own ``fill`` (random init per shard).
LoRA's initial values are computed whole on the CPU from a seeded generator (they are small) and
sliced, so the adapter a run starts from does not depend on the number of ranks.

Checkpoints keep only what resuming needs (``save_adapter``/``save_optimizer``): the adapter,
gathered and written by rank 0 in peft's format, and the optimizer state sharded through
``torch.distributed.checkpoint`` (each rank writes its own file). The frozen base is never saved.

Why not transformers' own ``fsdp=`` (accelerate's FSDP2 plugin): accelerate 1.15 enables FSDP
only for GPU process groups (a gloo/CPU job gets DDP), its memory-efficient loading holds the full
state dict on rank 0 and broadcasts it, and the Trainer's FSDP checkpoints save the whole model
(frozen base included). Here the Trainer gets an already sharded model (``TrainerView``) and the
checkpoint methods of ``shared.train.training.LawtuneTrainer`` call the functions below.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from shared.core.errors import ConfigError

log = logging.getLogger(__name__)

AUTO_FRACTION = 0.5
OPTIMIZER_DIR = "optimizer"  # the DCP folder inside a checkpoint

# (parameter name, its local shard, the global rows it holds) -> fills the shard in place
Fill = Callable[[str, torch.Tensor, slice], None]


# --------------------------------------------------------------------------- the choice


def choose(mode: str, world_size: int, weight_bytes: int, card_bytes: int | None) -> str:
    """``single`` | ``ddp`` | ``fsdp`` for ``training_args.distributed`` (the rule in the module docstring)."""
    if world_size <= 1:
        return "single"
    if mode in ("ddp", "fsdp"):
        return mode
    if card_bytes is None:
        return "ddp"
    return "fsdp" if weight_bytes > AUTO_FRACTION * card_bytes else "ddp"


def base_weight_bytes(model_dir: Path, trust_remote_code: bool = False) -> int:
    """The base model's parameters in bf16 (2 bytes each), counted on the meta device."""
    model = meta_model(model_dir, torch.bfloat16, trust_remote_code=trust_remote_code)
    return 2 * sum(p.numel() for p in model.parameters())


def card_bytes() -> int | None:
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory


def strategy(config: Any, model_dir: Path, world_size: int, device: str) -> str:
    """The strategy this job trains with; every rank computes the same answer."""
    mode = config.training_args.distributed
    if world_size <= 1:
        return "single"
    if mode != "auto":
        return mode
    card = card_bytes() if device == "cuda" else None
    weights = base_weight_bytes(model_dir, config.trust_remote_code)
    chosen = choose(mode, world_size, weights, card)
    if os.environ.get("RANK", "0") == "0":
        log.info("distributed: auto -> %s (base weights %.1f GiB in bf16%s)", chosen, weights / 2**30,
                 "; no GPU" if card is None else f", {AUTO_FRACTION:.0%} of one card: {AUTO_FRACTION * card / 2**30:.1f} GiB")
    return chosen


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


# --------------------------------------------------------------------------- building the sharded model


def meta_model(model_dir_or_config: Path | Any, dtype: torch.dtype, *, trust_remote_code: bool = False,
               attn_implementation: str | None = None):
    """The causal LM from its config, parameters on the meta device, buffers (rotary tables) real on the CPU."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = model_dir_or_config
    if isinstance(config, (str, Path)):
        config = AutoConfig.from_pretrained(config, trust_remote_code=trust_remote_code)
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code, **kwargs)
    if getattr(model.config, "tie_word_embeddings", False) and hasattr(model, "tie_weights"):
        model.tie_weights()  # init_empty_weights re-registers each parameter: the head comes out untied
    return model


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks (``_no_split_modules`` of the transformers model): one FSDP unit each."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ConfigError(f"training_args.distributed: fsdp: {type(base).__name__} names no decoder layer class "
                          "(_no_split_modules); use distributed: ddp")
    return layers


def shard(model: torch.nn.Module, device: torch.device, compute_dtype: torch.dtype | None) -> torch.nn.Module:
    """``fully_shard`` each decoder layer, then the root, over all ranks (one mesh dimension)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    # bf16 all-gathers and matmuls; gradients reduced and LoRA's master weights kept in fp32.
    mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32) if compute_dtype else MixedPrecisionPolicy()
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def local_rows(param: torch.Tensor) -> tuple[torch.Tensor, slice]:
    """(the rank's shard of ``param``, the global rows along dim 0 it holds)."""
    from torch.distributed.tensor import DTensor

    if not isinstance(param, DTensor):
        return param.data, slice(0, param.shape[0] if param.dim() else 0)
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    local = param.to_local()
    if param.dim() == 0:
        return local, slice(0, 0)
    return local, slice(offset[0], offset[0] + shape[0])


def materialize(model: torch.nn.Module, device: torch.device, fill: Fill, *, seed: int) -> None:
    """Allocate every rank's shards (``to_empty``) and fill them: LoRA from a seeded whole init, the rest by ``fill``."""
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    model.to_empty(device=device)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base.config, "tie_word_embeddings", False) and hasattr(base, "tie_weights"):
        base.tie_weights()  # to_empty gave the head its own tensor; tied, it is the embedding's shard again
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name in buffers:
                b.copy_(buffers[name].to(b.device))
        gen = torch.Generator().manual_seed(seed)
        for name, param in model.named_parameters():
            local, rows = local_rows(param)
            if param.requires_grad:
                full = lora_init(name, tuple(param.shape), gen)
                local.copy_(full[rows] if param.dim() else full)
            else:
                fill(name, local, rows)


def lora_init(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """peft's default LoRA init, whole on the CPU: A ~ kaiming-uniform(a=sqrt(5)), B = 0."""
    full = torch.zeros(shape, dtype=torch.float32)
    if ".lora_A." in name or ".lora_embedding_A." in name:
        torch.nn.init.kaiming_uniform_(full, a=math.sqrt(5), generator=gen)
    elif ".lora_B." not in name and ".lora_embedding_B." not in name:
        raise ConfigError(f"training_args.distributed: fsdp: trainable parameter {name} is not a LoRA weight")
    return full


def checkpoint_key(name: str) -> str:
    """A peft parameter name as the base model's checkpoint spells it."""
    return name.removeprefix("base_model.model.").replace(".base_layer.", ".")


class SafetensorsRows:
    """``Fill`` from a model folder's safetensors: each rank reads only its rows of each tensor."""

    def __init__(self, model_dir: Path):
        self.model_dir = Path(model_dir)
        index = self.model_dir / "model.safetensors.index.json"
        if index.is_file():
            self.files = {k: self.model_dir / f for k, f in json.loads(index.read_text())["weight_map"].items()}
        elif (self.model_dir / "model.safetensors").is_file():
            from safetensors import safe_open

            with safe_open(self.model_dir / "model.safetensors", framework="pt") as f:
                self.files = {k: self.model_dir / "model.safetensors" for k in f.keys()}
        else:
            raise ConfigError(f"training_args.distributed: fsdp reads safetensors weights; {self.model_dir} has none "
                              "(model.safetensors or model.safetensors.index.json)")
        self._open: dict[Path, Any] = {}

    def __call__(self, name: str, local: torch.Tensor, rows: slice) -> None:
        key = checkpoint_key(name)
        if key not in self.files:
            raise ConfigError(f"base model {self.model_dir}: weight {key} (parameter {name}) is not in its safetensors files")
        handle = self._handle(self.files[key])
        part = handle.get_slice(key)
        data = part[rows] if local.dim() else part[:]
        local.copy_(data.to(local.dtype))

    def _handle(self, path: Path):
        from safetensors import safe_open

        if path not in self._open:
            self._open[path] = safe_open(path, framework="pt")
        return self._open[path]


def build_sharded(model: torch.nn.Module, *, device: torch.device, dtype: torch.dtype, fill: Fill, seed: int):
    """A peft LoRA model built on the meta device (``meta_model`` + ``get_peft_model``), sharded
    (decoder layers, then root) and filled shard by shard on ``device``."""
    shard(model, device, torch.bfloat16 if dtype == torch.bfloat16 else None)
    materialize(model, device, fill, seed=seed)
    return model


def random_fill(std: float, seed: int) -> Fill:
    """Benchmarks without weights: N(0, std) matrices, unit norms, zero biases; a different stream per rank."""
    import torch.distributed as dist

    gens: dict[torch.device, torch.Generator] = {}
    rank = dist.get_rank() if dist.is_initialized() else 0

    def fill(name: str, local: torch.Tensor, rows: slice) -> None:
        if name.endswith("norm.weight") or "layernorm" in name:
            local.fill_(1.0)
        elif name.endswith(".bias"):
            local.zero_()
        else:
            if local.device not in gens:
                gens[local.device] = torch.Generator(device=local.device).manual_seed(seed * 1009 + rank)
            local.normal_(0.0, std, generator=gens[local.device])

    return fill


# --------------------------------------------------------------------------- checkpoints


def trainable(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Parameter]]:
    return ((n, p) for n, p in model.named_parameters() if p.requires_grad)


def gathered_adapter(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every LoRA weight whole, on the CPU (a collective: every rank calls it; all get the tensors)."""
    from torch.distributed.tensor import DTensor

    out = {}
    for name, p in trainable(model):
        full = p.full_tensor() if isinstance(p, DTensor) else p.detach()
        out[name] = full.detach().to("cpu", copy=True)
    return out


def save_adapter(model: torch.nn.Module, output_dir: Path, is_main: bool, processing_class: Any = None) -> None:
    """The adapter in peft's format (adapter_config.json + adapter_model.safetensors), written by rank 0."""
    state = gathered_adapter(model)
    if is_main:
        model.save_pretrained(str(output_dir), state_dict=state)
        if processing_class is not None:
            processing_class.save_pretrained(str(output_dir))


def load_adapter(model: torch.nn.Module, checkpoint: Path) -> None:
    """A checkpoint's adapter into the sharded LoRA weights (every rank reads the small file, keeps its rows)."""
    from safetensors.torch import load_file

    saved = load_file(str(Path(checkpoint) / "adapter_model.safetensors"))
    adapter = getattr(model, "active_adapter", "default")  # peft drops ".<adapter>." from saved keys
    with torch.no_grad():
        for name, p in trainable(model):
            key = name.replace(f".{adapter}.", ".")
            if key not in saved:
                raise ConfigError(f"checkpoint {checkpoint}: adapter weight {key} is missing")
            local, rows = local_rows(p)
            full = saved[key]
            local.copy_((full[rows] if p.dim() else full).to(local.dtype))


def _optimizer_state(model, optimizer):
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer)


def save_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, checkpoint: Path) -> None:
    """The optimizer state, sharded like the model: ``<checkpoint>/optimizer/`` (one file per rank + .metadata)."""
    import torch.distributed.checkpoint as dcp

    dcp.save({"optimizer": _optimizer_state(model, optimizer)}, checkpoint_id=str(Path(checkpoint) / OPTIMIZER_DIR))


def load_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, checkpoint: Path) -> None:
    """The sharded optimizer state of a fetched checkpoint, verified against its manifest and read
    without unpickling anything but DCP's metadata classes (shared.train.safe_dcp)."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    from shared.train import safe_dcp

    state = {"optimizer": _optimizer_state(model, optimizer)}  # the layout to read into (states created empty)
    safe_dcp.load(state, Path(checkpoint), OPTIMIZER_DIR)
    set_optimizer_state_dict(model, optimizer, optim_state_dict=state["optimizer"])


def rank_files(checkpoint: Path, rank: int) -> list[Path]:
    """The files of a checkpoint that rank ``rank`` wrote itself (its RNG state, its optimizer shard)."""
    checkpoint = Path(checkpoint)
    mine = [checkpoint / f"rng_state_{rank}.pth"]
    mine += sorted((checkpoint / OPTIMIZER_DIR).glob(f"__{rank}_*.distcp"))
    return [p for p in mine if p.is_file()]


class TrainerView(torch.nn.Module):
    """What the Trainer runs: the sharded model behind a thin module, so accelerate does not wrap it in DDP.

    Trainer leaves a model that ``_wrap_model`` returned wrapped alone ("unhandled cases in
    accelerate"): no DDP around DTensor parameters, no second sharding. FSDP2 reduce-scatters
    the gradients itself.
    """

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)
