"""
checkpoint.py: writing HF-format checkpoints, the machinery beside the model.

One writer serves both kinds of checkpoint this repo makes: slice.py's nested models and the random
ones the tests, the demos and bench.py run on. A checkpoint is planned first (every tensor's name, shape
and dtype), split into shards, then streamed: each shard's header, then its tensors one at a time, so
memory holds one tensor. It is written into a temporary folder beside the target and renamed into place
at the end, so an interruption or a full disk leaves nothing half-written.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple

import torch
from torch import Tensor

import nanoelastic as ne
from nanoelastic import Config, Model, NanoElasticError

DTYPE_NAMES = {dtype: name for name, dtype in ne.SAFETENSORS_DTYPES.items()}  # torch dtype -> safetensors


class Planned(NamedTuple):
    """One tensor of a checkpoint to write: its name, and its shape and dtype as a meta tensor."""
    name: str
    meta: Tensor


def nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def split_shards(planned: Iterable[Planned], max_bytes: float) -> list[list[Planned]]:
    """The planned tensors in order, in shards: a new one when the next tensor would go over max_bytes."""
    shards, size = [[]], 0
    for p in planned:
        if shards[-1] and size + nbytes(p.meta) > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(p)
        size += nbytes(p.meta)
    return shards


def write_safetensors(path: Path, planned: list[Planned], tensors: Iterator[Tensor]) -> None:
    """A safetensors file written one tensor at a time: the header holds the planned names, dtypes and
    shapes, then each tensor's bytes follow as `tensors` yields them. Only one tensor is ever in memory."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for p in planned:
        size = nbytes(p.meta)
        header[p.name] = {"dtype": DTYPE_NAMES[p.meta.dtype], "shape": list(p.meta.shape),
                          "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # tensor data starts 8-byte aligned, as safetensors itself writes it
    with open(path, "wb") as file:
        file.write(len(raw).to_bytes(8, "little") + raw)
        for p in planned:
            t = next(tensors)
            assert t.shape == p.meta.shape and t.dtype == p.meta.dtype, p.name  # the plan is the data
            file.write(t.contiguous().reshape(-1).view(torch.uint8).cpu().numpy())


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def write_shards(folder: Path, shards: list[list[Planned]], tensors: Iterator[Tensor],
                 metadata: dict | None = None, on_shard=None) -> None:
    """model-0000k-of-0000n.safetensors for each shard and their model.safetensors.index.json, into
    `folder`; `tensors` yields every planned tensor in order. on_shard(k, n) after each shard."""
    n = len(shards)
    names = [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    for k, (name, shard) in enumerate(zip(names, shards), 1):
        write_safetensors(folder / name, shard, tensors)
        if on_shard:
            on_shard(k, n)
    total = sum(nbytes(p.meta) for shard in shards for p in shard)
    weight_map = {p.name: name for name, shard in zip(names, shards) for p in shard}
    write_json(folder / "model.safetensors.index.json",
               {"metadata": {**(metadata or {}), "total_size": total}, "weight_map": weight_map})


def move_into_place(folder: Path, path: Path) -> bool:
    """Rename `folder` to `path`, unless something is at `path` (then False, and it is left as it is)."""
    try:
        if os.path.lexists(path):  # rename() would replace an empty folder
            raise FileExistsError(errno.EEXIST, "exists")
        folder.rename(path)
    except OSError as e:
        if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
            raise
        return False
    return True


# ----------------------------------------------------------------------------------------------------
# Random checkpoints: the real on-disk format with random weights (tests, demos, bench.py)

def fp8_recipe(config: Config) -> set[str]:
    """Which Linears the FP8 release quantizes (inferred from its tensors): all routed and shared
    experts, and the in/out_proj of every Mamba layer that does not sit right before an attention layer."""
    kinds = config.layers_block_type
    names = set()
    for i, kind in enumerate(kinds):
        p = f"backbone.layers.{i}.mixer"
        if kind == "moe":
            names |= {f"{p}.shared_experts.up_proj", f"{p}.shared_experts.down_proj"}
            for j in range(config.n_routed_experts):
                names |= {f"{p}.experts.{j}.up_proj", f"{p}.experts.{j}.down_proj"}
        elif kind == "mamba" and (i + 1 == len(kinds) or kinds[i + 1] != "attention"):
            names |= {f"{p}.in_proj", f"{p}.out_proj"}
    return names


def random_tensor(name: str, shape, n_layers: int, randn, rand) -> Tensor:
    """One random tensor, scaled so that activations stay O(1) through the layers."""
    owner, _, leaf = name.rpartition(".")
    if leaf == "A_log":
        return torch.log(rand(shape) * 15 + 1)
    if leaf == "dt_bias":  # softplus(dt_bias) log-uniform in [1e-3, 1e-1]
        dt = torch.exp(rand(shape) * math.log(100) + math.log(1e-3))
        return dt + torch.log(-torch.expm1(-dt))
    if leaf == "D" or name.endswith(("norm.weight", "norm_f.weight")):
        return 1 + randn(shape, 0.1)
    if leaf == "e_score_correction_bias":
        return rand(shape) * 0.1
    if leaf == "bias":  # conv1d
        return randn(shape, 0.1)
    if "embeddings" in name:
        return randn(shape, 1.0)
    if "conv1d" in name:
        return randn(shape, 0.5)
    # projections: std 1/sqrt(fan_in), and 1/sqrt(layers) more for those that write the residual
    std = shape[-1] ** -0.5
    if owner.endswith(("out_proj", "o_proj", "down_proj")):
        std /= math.sqrt(n_layers)
    if owner == "lm_head":
        std *= 4  # peaked logits: greedy decoding is not a coin toss between near-ties
    return randn(shape, std)


def random_checkpoint_tensors(config: Config, fp8: bool = True, seed: int = 0,
                              device: str | torch.device = "cpu") -> Iterator[tuple[str, Tensor]]:
    """Random tensors of `config` under their checkpoint names and dtypes (FP8 recipe or all BF16), one
    at a time, made on `device`. On the meta device: the same names, shapes and dtypes, no data (a plan)."""
    with torch.device("meta"):
        shapes = Model(config)
    meta = torch.device(device).type == "meta"
    g = None if meta else torch.Generator(device).manual_seed(seed)
    quantized = fp8_recipe(config) if fp8 else set()

    def randn(shape, std):
        return torch.randn(shape, generator=g, device=device) * std

    def rand(shape=()):
        return torch.rand(shape, generator=g, device=device)

    for name, p in shapes.named_parameters():
        owner, _, leaf = name.rpartition(".")
        per_tensor = [(owner, p.shape)]
        if ".experts." in name:  # stacked experts [E, out, in] are stored one tensor per expert
            experts, proj = owner.rsplit(".", 1)
            per_tensor = [(f"{experts}.{j}.{proj}", p.shape[1:]) for j in range(p.shape[0])]
        for owner, shape in per_tensor:
            full = f"{owner}.{leaf}"
            t = random_tensor(full, shape, len(config.layers_block_type), randn, rand)
            if owner in quantized and leaf == "weight":
                q, scale = ne.fp8_quantize(t)
                yield full, q
                yield f"{owner}.weight_scale", scale.reshape(())
                yield f"{owner}.input_scale", rand() * 0.05 + 0.01
            elif full.endswith(ne.FP32_TENSORS):
                yield full, t.float()
            else:
                yield full, t.to(torch.bfloat16)


def write_random_checkpoint(path: str | Path, config: Config, fp8: bool = True, shards: int = 2,
                            seed: int = 0, extra_files=None) -> Path:
    """Write a random checkpoint of `config` in the exact on-disk format of the real one:
    config.json, generation_config.json, `shards` safetensors shards and their index. Streams: one
    tensor in memory. Written into a temporary folder renamed at the end: an interruption or a full disk
    leaves nothing, and a folder that appears at `path` meanwhile (another run) is refused, left as it is.
    extra_files(folder), if given, adds files (a tokenizer) before the rename."""
    path = Path(path)
    if path.exists():
        raise NanoElasticError(f"{path} already exists")
    planned = [Planned(n, t) for n, t in random_checkpoint_tensors(config, fp8, seed, "meta")]
    largest = max(nbytes(p.meta) for p in planned)
    # At most `shards` shards: each but the last holds more than total / shards.
    plan = split_shards(planned, sum(nbytes(p.meta) for p in planned) / shards + largest)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))  # a name of its own
    try:
        tensors = (t for _, t in random_checkpoint_tensors(config, fp8, seed))
        write_shards(tmp, plan, tensors)
        write_json(tmp / "config.json", config.to_dict())
        write_json(tmp / "generation_config.json", {"bos_token_id": config.bos_token_id,
                                                    "eos_token_id": list(ne.STOP_TOKENS),
                                                    "pad_token_id": config.pad_token_id})
        if fp8:
            write_json(tmp / "hf_quant_config.json", {"producer": {"name": "nanoelastic (random)"},
                                                      "quantization": {"quant_algo": "FP8"}})
        if extra_files:
            extra_files(tmp)
        if not move_into_place(tmp, path):
            raise NanoElasticError(f"{path} appeared while it was written (another run?): left as it is")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def random_model(config: Config, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                 fp8: bool = True, seed: int = 0) -> Model:
    """A model of `config` with the weights write_random_checkpoint() writes (FP8 recipe or all BF16),
    made directly on `device`, no disk: what bench.py measures the real 52-layer shapes with."""
    device = ne.resolve_device(device)
    with torch.device("meta"):
        model = Model(config)
    stacks = {}
    for name, t in random_checkpoint_tensors(config, fp8, seed, device):
        ne.place_tensor(model, stacks, name, t, dtype or torch.bfloat16)
    return model
