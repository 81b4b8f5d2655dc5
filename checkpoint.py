"""
checkpoint.py: the HF checkpoint format, the machinery beside the model: config.json read and
checked, a checkpoint folder checked against a model before a byte of it is loaded, and checkpoints
written.

One writer serves both kinds of checkpoint this repo writes: slice.py's nested models and the random
ones the tests, the demos and bench.py run on. A checkpoint is planned first (every tensor's name,
shape and dtype), split into shards, then streamed: each shard's header, then its tensors one at a
time, so memory holds one tensor. It is written into a temporary folder beside the target and
renamed into place at the end, so an interruption or a full disk leaves nothing half-written.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import glob
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from itertools import chain
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple

import torch
from torch import Tensor, nn

import nanoelastic as ne
from nanoelastic import Config, Model, NanoElasticError

# --------------------------------------------------------------------------------------------------
# 1. config.json: the spellings seen in the wild, and every field checked before anything is built

OLD_SPELLINGS = {  # older config.json spellings -> HF's current field names
    "mamba_n_groups": "n_groups", "mamba_d_conv": "conv_kernel", "mamba_chunk_size": "chunk_size",
    "mamba_dt_limit": "time_step_limit", "mamba_conv_bias": "use_conv_bias",
    "mamba_d_state": "ssm_state_size",
}
REQUIRED_FIELDS = ("vocab_size", "hidden_size", "num_attention_heads", "num_key_value_heads",
                   "head_dim", "mamba_num_heads", "mamba_head_dim", "ssm_state_size", "n_groups",
                   "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size",
                   "moe_shared_expert_intermediate_size")
MAX_CHUNK = 4096  # Mamba-2 checkpoints use 128 or 256
MAX_INT = 2**31 - 1  # no config.json integer is larger (the real ones are at most 262144)
MAX_TENSOR = 2**40  # elements; the real model's largest tensor (its experts) has 6.4e8
CONFIG_FIELDS = {  # config.json field -> (type, smallest value)
    **dict.fromkeys(REQUIRED_FIELDS + ("conv_kernel", "chunk_size", "intermediate_size", "n_group",
                                       "topk_group", "max_position_embeddings"), (int, 1)),
    **dict.fromkeys(("bos_token_id", "pad_token_id"), (int, 0)),
    "eos_token_id": ("int or list of int", 0),
    "routed_scaling_factor": (float, 0.0), "layer_norm_epsilon": (float, 0.0),
    "time_step_limit": ("pair of float", 0.0),
    **dict.fromkeys(("use_conv_bias", "norm_topk_prob", "tie_word_embeddings"), (bool, None)),
    "mlp_hidden_act": (str, None), "num_hidden_layers": (int, 1),
}


LAYER_TYPES = {  # every spelling of a layer type seen in config.json -> the model's name
    **ne.LAYER_LETTERS, "mamba": "mamba", "linear_attention": "mamba", "attention": "attention",
    "full_attention": "attention", "moe": "moe", "mlp": "mlp",
}
LAYER_LETTERS = {kind: letter for letter, kind in ne.LAYER_LETTERS.items()}
MAX_LAYERS = 1000  # the real model has 52; a bigger pattern is a broken config, refused early


def layer_kinds(layers) -> list[str]:
    """hybrid_override_pattern ('MEM*E...') or layers_block_type (names) -> mixer names."""
    if not isinstance(layers, (str, list)) or not all(isinstance(t, str) for t in layers):
        raise NanoElasticError("config: the layer pattern must be a string or a list of layer type "
                               "names")
    unknown = sorted({t for t in layers if t not in LAYER_TYPES})
    if unknown:
        raise NanoElasticError(f"config: unknown layer types {unknown}")
    if not 1 <= len(layers) <= MAX_LAYERS:
        raise NanoElasticError(f"config: {len(layers)} layers, expected 1 to {MAX_LAYERS}")
    return [LAYER_TYPES[t] for t in layers]


def check_config_field(name: str, value, kind, low) -> None:
    """One config.json value against its CONFIG_FIELDS entry (bool is not an int, nor is 16.0)."""
    def number(v, t):
        return not isinstance(v, bool) and isinstance(v, int if t is int else (int, float))

    if kind == "int or list of int":
        values = value if isinstance(value, list) else [value]
        ok = bool(values) and all(number(v, int) for v in values)  # [] would stop nothing
    elif kind == "pair of float":
        values = value if isinstance(value, list) and len(value) == 2 else None
        ok = values is not None and all(number(v, float) for v in values)
    else:
        values = [value]
        ok = number(value, kind) if kind in (int, float) else isinstance(value, kind)
    if ok and kind in (float, "pair of float"):  # never NaN; inf only as the dt limit's maximum
        ok = all(math.isfinite(v) for v in values[:1 if kind == "pair of float" else None])
        ok = ok and not any(math.isnan(v) for v in values)
    if not ok:
        message = f"config: {name} must be {getattr(kind, '__name__', kind)}, not {value!r}"
        raise NanoElasticError(message[:160])
    if low is not None and any(v < low or (kind is float and v == low) for v in values):
        bound = ">" if kind is float else ">="
        raise NanoElasticError(f"config: {name} = {value!r} is out of range (must be {bound} "
                               f"{low})")
    if kind in (int, "int or list of int") and any(v > MAX_INT for v in values):
        raise NanoElasticError(f"config: {name} = {value!r} is out of range (must be at most "
                               f"{MAX_INT})")


def config_fields(d: dict, known: set[str]) -> dict:
    """config.json's fields -> Config's keyword arguments, every value checked."""
    if not isinstance(d, dict):
        raise NanoElasticError(f"config must be a JSON object, not {type(d).__name__}")
    d = {OLD_SPELLINGS.get(k, k): v for k, v in d.items()}
    layers = d.get("layers_block_type") or d.get("hybrid_override_pattern")
    if layers is None:
        raise NanoElasticError("config has neither hybrid_override_pattern nor layers_block_type")
    d["layers_block_type"] = layer_kinds(layers)
    count = d.get("num_hidden_layers")
    if count is not None and count != len(d["layers_block_type"]):
        raise NanoElasticError(f"config: num_hidden_layers = {count!r} but the layer pattern has "
                               f"{len(d['layers_block_type'])} layers")
    for name, (kind, low) in CONFIG_FIELDS.items():
        if d.get(name) is not None:
            check_config_field(name, d[name], kind, low)
    if d.get("time_step_limit") is not None:
        d["time_step_limit"] = tuple(float(v) for v in d["time_step_limit"])
    return {k: v for k, v in d.items() if k in known and v is not None}


def check_config(c: Config) -> None:
    """What this implementation supports, and the fields that must divide or bound one another."""
    if c.mlp_hidden_act != "relu2":
        raise NanoElasticError(f"config: mlp_hidden_act {c.mlp_hidden_act!r} is not supported "
                               f"(relu2)")
    if c.tie_word_embeddings:
        raise NanoElasticError("config: tie_word_embeddings is not supported (this model has its "
                               "own lm_head)")
    for small, large in (("n_groups", "mamba_num_heads"),
                         ("num_key_value_heads", "num_attention_heads"),
                         ("n_group", "n_routed_experts")):
        if getattr(c, large) % getattr(c, small):
            raise NanoElasticError(f"config: {large} ({getattr(c, large)}) is not a multiple of "
                                   f"{small} ({getattr(c, small)})")
    for small, large in (("num_experts_per_tok", "n_routed_experts"), ("topk_group", "n_group")):
        if getattr(c, small) > getattr(c, large):
            raise NanoElasticError(f"config: {small} ({getattr(c, small)}) > {large} "
                                   f"({getattr(c, large)})")
    per_group = c.n_routed_experts // c.n_group
    if c.n_group > 1 and per_group < 2:  # groups are ranked by their two best experts
        raise NanoElasticError(f"config: n_group {c.n_group} leaves {per_group} expert per group "
                               f"(group-limited routing needs at least 2)")
    if c.num_experts_per_tok > c.topk_group * per_group:
        raise NanoElasticError(f"config: num_experts_per_tok ({c.num_experts_per_tok}) > the "
                               f"{c.topk_group * per_group} experts of the topk_group best groups")
    elements = {"embeddings": c.vocab_size * c.hidden_size,
                "in_proj": c.in_proj_dim * c.hidden_size,
                "q_proj": c.num_attention_heads * c.head_dim * c.hidden_size,
                "experts": c.n_routed_experts * c.moe_intermediate_size * c.hidden_size,
                "shared expert": c.moe_shared_expert_intermediate_size * c.hidden_size,
                "dense MLP": c.intermediate_size * c.hidden_size,
                "conv1d": c.conv_dim * c.conv_kernel}
    largest = max(elements, key=elements.get)
    if elements[largest] > MAX_TENSOR:
        raise NanoElasticError(f"config: its {largest} tensor would have {elements[largest]:.3g} "
                               f"elements (more than {MAX_TENSOR:.3g}): a broken config")
    if c.chunk_size > MAX_CHUNK:
        raise NanoElasticError(f"config: chunk_size {c.chunk_size} > {MAX_CHUNK} (the scan holds "
                               f"chunk x chunk decays)")
    low, high = c.time_step_limit
    if low > high:
        raise NanoElasticError(f"config: time_step_limit {list(c.time_step_limit)} has min > max")
    for name, ids in (("bos_token_id", [c.bos_token_id]), ("pad_token_id", [c.pad_token_id]),
                      ("eos_token_id", ne.token_id_list(c.eos_token_id))):
        if any(i >= c.vocab_size for i in ids):
            raise NanoElasticError(f"config: {name} {ids if len(ids) > 1 else ids[0]} is not below "
                                   f"vocab_size {c.vocab_size}")


def config_from_dict(d: dict) -> Config:
    """config.json's fields -> a Config, checked; unknown fields are ignored."""
    config = Config(**config_fields(d, {f.name for f in dataclasses.fields(Config)}))
    check_config(config)
    return config


def config_json(config: Config) -> dict:
    """The config.json of a Config, in the release's spelling (hybrid_override_pattern)."""
    d = dataclasses.asdict(config)
    d["hybrid_override_pattern"] = "".join(LAYER_LETTERS[t] for t in d.pop("layers_block_type"))
    d["time_step_limit"] = list(config.time_step_limit)
    return {"architectures": ["NemotronHForCausalLM"], "model_type": "nemotron_h",
            "num_hidden_layers": len(config.layers_block_type), **d}


def read_json(path: Path):
    """The JSON in file `path`; one line if it cannot be read or is not JSON."""
    try:
        return json.loads(path.read_bytes().decode())
    except OSError as e:
        raise NanoElasticError(f"cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise NanoElasticError(f"{path} is not UTF-8 text") from None
    except (ValueError, RecursionError) as e:  # and a >4300-digit number, or nesting too deep
        raise NanoElasticError(f"{path} is not valid JSON: {str(e)[:200]}") from None


def read_config(path: Path) -> Config:
    """Config.from_file: config.json read and checked, every field that sets a shape required."""
    if not path.is_file():
        raise NanoElasticError(f"missing config: {path}")
    d = read_json(path)
    missing = [name for name in REQUIRED_FIELDS if isinstance(d, dict) and d.get(name) is None]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise NanoElasticError(f"{path}: missing field {missing[0]}{more}")
    try:
        return config_from_dict(d)
    except NanoElasticError as e:
        raise NanoElasticError(f"{path}: {e}") from None


# --------------------------------------------------------------------------------------------------
# 2. A checkpoint folder checked against a (meta-device) model, from the index and headers alone

SAFETENSORS_DTYPES = {"F8_E4M3": torch.float8_e4m3fn, "BF16": torch.bfloat16,
                      "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
                      "I64": torch.int64, "I32": torch.int32}
SCALES = ("weight_scale", "input_scale")  # per-tensor FP8 scales of a Linear
# MTP head; FP8-KV scales
IGNORED_TENSORS = re.compile(r"mtp\..*|.*\.(k_proj\.k_scale|v_proj\.v_scale)")


def read_weight_map(path: Path) -> dict[str, Path]:
    """tensor name -> shard file, from model.safetensors.index.json (or one model.safetensors)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = read_json(index)
        names = names.get("weight_map") if isinstance(names, dict) else None
        if not isinstance(names, dict) or not all(isinstance(s, str) for s in names.values()):
            raise NanoElasticError(f"{index} is not a safetensors index: it needs a weight_map "
                                   "of tensor names to shard file names")
        weight_map = {name: path / shard for name, shard in names.items()}
    elif (path / "model.safetensors").is_file():
        with open_safetensors(path / "model.safetensors") as f:
            weight_map = {name: path / "model.safetensors" for name in f.keys()}
    else:
        raise NanoElasticError(f"no model.safetensors.index.json or model.safetensors in {path}")
    for shard in sorted(set(weight_map.values())):
        if not shard.is_file():
            raise NanoElasticError(f"missing shard: {shard} (named in the index)")
    return weight_map


class CheckedCheckpoint(NamedTuple):
    # every tensor name in the checkpoint -> its shard (IGNORED_TENSORS too)
    weight_map: dict[str, Path]
    # every other name -> (model tensor, expert index or None)
    plan: dict[str, tuple[str, int | None]]
    total_bytes: int  # of the planned tensors
    fp8: set[str]  # the FP8 Linears (those with a weight_scale)


def check_checkpoint(model: Model, path: Path) -> CheckedCheckpoint:
    """Check a checkpoint folder against a (meta-device) model of its config from the index and the
    shard headers alone, reading no tensor data: every tensor present, none unexpected, every shape,
    every FP8 weight paired with its weight_scale. Used by from_pretrained before it loads a byte,
    and by slice.py before it writes one (and on what it wrote)."""
    weight_map = read_weight_map(path)
    plan = plan_tensors(model, weight_map)
    scales = [target for target, _ in plan.values() if target.endswith(".weight_scale")]
    fp8 = {target.rpartition(".")[0] for target in scales}  # the FP8 Linears
    params = dict(model.named_parameters())
    total_bytes = sum(check_headers(shard, names, plan, params, fp8)
                      for shard, names in by_shard(plan, weight_map).items())
    return CheckedCheckpoint(weight_map, plan, total_bytes, fp8)


def plan_tensors(model: Model, weight_map: dict[str, Path]) -> dict[str, tuple[str, int | None]]:
    """Each checkpoint tensor -> (the model's tensor, expert index); none missing or unexpected."""
    params = dict(model.named_parameters())
    linears = {name for name, m in model.named_modules() if isinstance(m, ne.Linear)}
    E = model.config.n_routed_experts
    plan, unexpected = {}, []
    for name in weight_map:
        if IGNORED_TENSORS.fullmatch(name):
            continue
        target, expert = model_tensor(name)
        owner, _, leaf = target.rpartition(".")
        known = target in params or (owner in linears and leaf in SCALES)
        # routed experts are stacked; "shared_experts." does not match
        stacked = ".experts." in target
        if known and stacked == (expert is not None) and (expert or 0) < E:
            plan[name] = (target, expert)
        else:
            unexpected.append(name)
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise NanoElasticError(f"unexpected tensor in checkpoint: {unexpected[0]}{more}")
    found = set(plan.values())
    for target in params:
        stacked = ".experts." in target
        for e in range(E) if stacked else [None]:
            if (target, e) not in found:
                missing = target.replace(".experts.", f".experts.{e}.") if stacked else target
                raise NanoElasticError(f"missing tensor in checkpoint: {missing}")
    for target in {t for t, e in found if e is not None and t.endswith(".weight_scale")}:
        if any((target, e) not in found for e in range(E)):  # a stacked FP8 Linear: every expert's
            owner = target.removesuffix(".weight_scale")
            raise NanoElasticError(f"{owner}: some experts have a weight_scale and some do not")
    return plan


def open_safetensors(shard: Path):
    """safe_open(shard) for its header, or one error that names the file and the problem."""
    from safetensors import SafetensorError, safe_open

    try:
        # the true cause (permission denied...) before safetensors' own message
        open(shard, "rb").close()
        return safe_open(shard, "pt")
    except OSError as e:
        raise NanoElasticError(f"cannot read {shard}: {e.strerror}") from None
    except SafetensorError as e:  # a truncated download, a file that is not safetensors
        raise NanoElasticError(f"{shard} is not a valid safetensors file ({e})") from None


def check_headers(shard: Path, names: list[str], plan: dict, params: dict, fp8: set[str]) -> int:
    """The shapes and dtypes of `names` from `shard`'s header (no data read) -> their bytes."""
    total = 0
    with open_safetensors(shard) as f:
        in_shard = set(f.keys())
        for name in names:
            if name not in in_shard:
                raise NanoElasticError(f"{name} is not in {shard.name}, the shard the index names "
                                       f"for it")
            target, expert = plan[name]
            owner, _, leaf = target.rpartition(".")
            sl = f.get_slice(name)
            shape, st_dtype = list(sl.get_shape()), sl.get_dtype()
            if leaf in SCALES:
                expected, ok = "a scalar", math.prod(shape) == 1
            else:
                want = params[target].shape[1:] if expert is not None else params[target].shape
                expected, ok = list(want), shape == list(want)
            if not ok:
                raise NanoElasticError(f"wrong shape for {name}: {shape}, expected {expected}")
            check_dtype(name, st_dtype, owner in fp8, leaf)
            total += math.prod(shape) * SAFETENSORS_DTYPES[st_dtype].itemsize
    return total


def check_dtype(name: str, st_dtype: str, fp8: bool, leaf: str) -> None:
    """FP8 weights exactly where there is a weight_scale; scales F32; the rest FP8, BF16 or F32."""
    if fp8 and leaf == "weight" and st_dtype != "F8_E4M3":
        raise NanoElasticError(f"{name} has a weight_scale but is {st_dtype}, not F8_E4M3")
    if not fp8 and st_dtype.startswith("F8"):
        raise NanoElasticError(f"{name} is FP8 but has no weight_scale")
    allowed = ("F32",) if leaf in SCALES else ("F8_E4M3", "BF16", "F32")
    if st_dtype not in allowed:
        raise NanoElasticError(f"{name} is {st_dtype}: the format stores it as "
                               f"{' or '.join(allowed)}")


# --------------------------------------------------------------------------------------------------
# 3. Loading: one shard and one tensor at a time (or its nested prefix), straight to the device,
#    into a meta-device model, once its bytes are known to fit

EXPERT_TENSOR = re.compile(r"(.*\.experts)\.(\d+)\.(up_proj|down_proj)\."
                           r"(weight|weight_scale|input_scale)")
# tiny, used in fp32
FP32_TENSORS = ("gate.weight", "e_score_correction_bias", "A_log", ".D", "dt_bias")


def checked_scale(name: str, t: Tensor) -> Tensor:
    """An FP8 scale as an fp32 scalar, refused unless finite and > 0 (else the logits are NaN)."""
    t = t.float().reshape(())
    if not (torch.isfinite(t) and t > 0):
        raise NanoElasticError(f"{name} is {t.item()}: an FP8 scale must be finite and > 0")
    return t


def by_shard(names, weight_map: dict[str, Path]) -> dict[Path, list[str]]:
    """Tensor names grouped by the shard that holds them, in shard order (each opened once)."""
    groups = {}
    for name in names:
        groups.setdefault(weight_map[name], []).append(name)
    return dict(sorted(groups.items()))


def model_tensor(name: str) -> tuple[str, int | None]:
    """Checkpoint name -> (the model's tensor, expert index): experts go into stacked tensors."""
    m = EXPERT_TENSOR.fullmatch(name)
    return (f"{m[1]}.{m[3]}.{m[4]}", int(m[2])) if m else (name, None)


def assign_tensor(model: nn.Module, name: str, t: Tensor) -> None:
    """Make `t` the parameter or buffer `name` of `model` (e.g. in place of a meta tensor)."""
    owner, _, leaf = name.rpartition(".")
    module = model.get_submodule(owner)
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(t, requires_grad=False)
    else:
        module._buffers[leaf] = t


def place_tensor(model: Model, stacks: dict, name: str, t: Tensor, dtype: torch.dtype) -> None:
    """Put checkpoint tensor `name` (already on its device) into a meta-device model: FP8 weights
    stay FP8, scales become fp32 scalars, FP32_TENSORS fp32, the rest `dtype`; experts fill stacked
    tensors."""
    target, expert = model_tensor(name)
    if target.endswith(SCALES):
        t = checked_scale(name, t)
        if target.endswith(".input_scale"):  # checked, not kept: activations stay BF16
            return
    elif t.dtype != torch.float8_e4m3fn:
        t = t.to(torch.float32 if target.endswith(FP32_TENSORS) else dtype)
    if expert is not None:  # stacks: target -> [E, ...], filled one expert at a time
        if target not in stacks:
            shape = (model.config.n_routed_experts, *t.shape)
            stacks[target] = torch.empty(shape, dtype=t.dtype, device=t.device)
        stacks[target][expert] = t
        t = stacks[target]
    assign_tensor(model, target, t)


def placed_bytes(model: Model, fp8: set[str], dtype: torch.dtype) -> int:
    """The bytes the weights of (meta-device) `model` take once placed (place_tensor): an FP8
    weight 1 a value, FP32_TENSORS 4, the rest `dtype`, and each FP8 scale 4 (per expert)."""
    total = 0
    for name, p in model.named_parameters():
        owner, _, leaf = name.rpartition(".")
        if owner in fp8 and leaf == "weight":  # FP8 values, and one fp32 scale a weight matrix
            total += p.numel() + 4 * (p[..., 0, 0].numel())
        else:
            total += p.numel() * (4 if name.endswith(FP32_TENSORS) else dtype.itemsize)
    return total


def check_memory(whole: Model, model: Model, fp8: set[str], dtype: torch.dtype,
                 device: torch.device) -> None:
    """Refuse, before anything loads, weights that cannot fit in the GPU's free memory, naming the
    nested sizes that can (caches and activations come on top)."""
    free, _ = torch.cuda.mem_get_info(device)
    need = placed_bytes(model, fp8, dtype)
    if need <= free:
        return
    own = (model.config.hidden_size, model.config.moe_intermediate_size)
    smaller = {name: placed_bytes(whole.nested(name), fp8, dtype)
               for name in ne.preset_sizes(model.config) if ne.SIZE_PRESETS[name] != own}
    fits = [f"{name} ({n / 1e9:.1f} GB)" for name, n in smaller.items() if n <= free]
    hint = ""
    if fits:
        hint = (f": load a nested size alone (--load SIZE, or size= in from_pretrained): "
                f"{' or '.join(fits)}")
    elif smaller:
        hint = f", too little for any nested size ({min(smaller.values()) / 1e9:.1f} GB at least)"
    raise NanoElasticError(f"the weights need {need / 1e9:.1f} GB on {device}, which has "
                           f"{free / 1e9:.1f} GB free{hint}")


class Progress:
    """A status line on stderr, redrawn at most four times a second, on a terminal only."""

    def __init__(self, enabled: bool = True):
        self.enabled, self.last = enabled and sys.stderr.isatty(), 0.0

    def __call__(self, text: str) -> None:
        if self.enabled and time.time() - self.last > 0.25:
            self.last = time.time()
            print(f"\r{text}", end="", file=sys.stderr, flush=True)


def load_checkpoint(model: Model, path: Path, device: torch.device, dtype: torch.dtype,
                    verbose: bool, config: Config | None = None) -> None:
    """Fill a meta-device model from the checkpoint, one shard and one tensor at a time, straight to
    `device`. Every name, shape and FP8 pairing is checked from the shard headers before anything
    loads. `config`: the checkpoint's, when `model` is one of its nested sizes (model.config): then
    only each tensor's nested prefix is read."""
    from safetensors import safe_open

    with torch.device("meta"):  # what the checkpoint is checked against
        whole = Model(config) if config else model
    weight_map, plan, total_bytes, fp8 = check_checkpoint(whole, path)
    if device.type == "cuda":
        check_memory(whole, model, fp8, dtype, device)
    d, f = model.config.hidden_size, model.config.moe_intermediate_size
    progress, stacks = Progress(verbose), {}  # stacks: the stacked expert tensors being filled
    done_tensors, read_bytes, t0 = 0, 0, time.time()
    try:
        for shard, names in by_shard(plan, weight_map).items():
            with safe_open(shard, "pt", device=str(device)) as sf:
                for name in names:
                    tensor = sf.get_slice(name)
                    shape = tensor.get_shape()
                    # a prefix can be a strided view of the whole tensor: kept as a compact copy
                    t = tensor[ne.nested_index(name, len(shape), d, f)].to(device).contiguous()
                    place_tensor(model, stacks, name, t, dtype)
                    done_tensors += 1
                    read_bytes += math.prod(shape) * t.element_size()
                    progress(f"loading {path.name}: {done_tensors}/{len(plan)} tensors, "
                             f"{read_bytes / 1e9:.2f}/{total_bytes / 1e9:.2f} GB")
    except torch.cuda.OutOfMemoryError:  # free memory taken meanwhile (check_memory passed)
        raise NanoElasticError(f"out of memory on {device} while loading {path.name} "
                               f"({done_tensors} of {len(plan)} tensors loaded): is another "
                               f"process using the GPU?") from None
    if verbose:
        nested = f" at {d}x{f}" if whole is not model else ""
        held = sum(t.numel() * t.element_size() for t in chain(model.parameters(), model.buffers()))
        print(f"\rloaded {path.name}{nested}: {done_tensors} tensors, {held / 1e9:.2f} GB on "
              f"{device} in {time.time() - t0:.1f} s", file=sys.stderr)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`device`, or cuda when there is one, else cpu; checked that the model can run there: a
    CPU, or a CUDA GPU that torch sees (the only devices the model is written and tested for)."""
    try:
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except (RuntimeError, TypeError):
        raise NanoElasticError(f"unknown device {device!r}: use cpu or cuda") from None
    if device.type not in ("cpu", "cuda"):
        raise NanoElasticError(f"cannot run on the {device.type} device: use cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise NanoElasticError(f"device {device} asked for, but torch sees no CUDA GPU here: "
                               f"use the cpu device")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise NanoElasticError(f"device {device}: torch sees {torch.cuda.device_count()} CUDA "
                               f"GPU(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device


def load_model(path: Path, device, dtype: torch.dtype | None, verbose: bool,
               size: str | None = None) -> Model:
    """Model.from_pretrained: the config, a model on the meta device (of the nested `size`, if
    given), the checkpoint checked and then loaded into it on `device`."""
    if dtype not in (None, torch.bfloat16, torch.float16, torch.float32):
        raise NanoElasticError(f"dtype {dtype!r}: the compute dtype is torch.bfloat16 (the "
                               f"default), torch.float16 or torch.float32")
    if not path.is_dir():
        raise NanoElasticError(f"checkpoint folder not found: {path}")
    config = read_config(path / "config.json")
    d, f = ne.parse_size(size, config)
    nested = (d, f) != (config.hidden_size, config.moe_intermediate_size)
    device = resolve_device(device)
    ne.use_kernels(torch.empty(0, device=device))  # a bad NANOELASTIC_KERNELS: before the load
    with torch.device("meta"):
        model = Model(config.sliced(d, f) if nested else config)
    load_checkpoint(model, path, device, dtype or torch.bfloat16, verbose,
                    config if nested else None)
    model.stop_tokens = stop_tokens(path, config)
    return model


def stop_tokens(folder: Path, config: Config) -> tuple[int, ...]:
    """The ids that end a generation: generation_config.json's eos_token_id (the release's are
    </s> and <|im_end|>), else config.json's."""
    file = folder / "generation_config.json"
    d = read_json(file) if file.is_file() else {}
    eos = d.get("eos_token_id") if isinstance(d, dict) else None
    if eos is None:  # errors then name the file the ids came from
        eos, file = config.eos_token_id, folder / "config.json"
    check_config_field(f"{file.name}: eos_token_id", eos, "int or list of int", 0)
    ids = tuple(ne.token_id_list(eos))
    if max(ids) >= config.vocab_size:
        raise NanoElasticError(f"{file}: eos_token_id {list(ids)} is not below vocab_size "
                               f"{config.vocab_size}")
    return ids


def load_tokenizer(folder: Path):
    """The checkpoint's tokenizer.json (a tokenizers.Tokenizer)."""
    from tokenizers import Tokenizer
    file = folder / "tokenizer.json"
    if not folder.is_dir():
        raise NanoElasticError(f"checkpoint folder not found: {folder}")
    if not file.is_file():
        raise NanoElasticError(f"missing tokenizer: {file}")
    try:
        return Tokenizer.from_file(str(file))
    except Exception as e:  # the Rust side's message, e.g. "expected value at line 1 column 1"
        raise NanoElasticError(f"{file}: {e}") from None


# --------------------------------------------------------------------------------------------------
# 4. Writing: planned shards streamed one tensor at a time, their index, the folder put in place

# torch dtype -> safetensors
DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


class Planned(NamedTuple):
    """One tensor of a checkpoint to write: its name, and its shape and dtype as a meta tensor."""
    name: str
    meta: Tensor


def nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def split_shards(planned: Iterable[Planned], max_bytes: float) -> list[list[Planned]]:
    """The planned tensors in order, in shards: a new one when the next would go over max_bytes."""
    shards, size = [[]], 0
    for p in planned:
        if shards[-1] and size + nbytes(p.meta) > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(p)
        size += nbytes(p.meta)
    return shards


def write_safetensors(path: Path, planned: list[Planned], tensors: Iterator[Tensor]) -> None:
    """A safetensors file written one tensor at a time: the header holds the planned names, dtypes
    and shapes, then each tensor's bytes follow as `tensors` yields them. Only one tensor is ever in
    memory."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for p in planned:
        size = nbytes(p.meta)
        header[p.name] = {"dtype": DTYPE_NAMES[p.meta.dtype], "shape": list(p.meta.shape),
                          "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    # tensor data starts 8-byte aligned, as safetensors itself writes it
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as file:
        file.write(len(raw).to_bytes(8, "little") + raw)
        for p in planned:
            t = next(tensors)
            # the plan is the data
            assert t.shape == p.meta.shape and t.dtype == p.meta.dtype, p.name
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


def rename_no_replace(src: Path, dst: Path) -> None:
    """src -> dst, or FileExistsError if anything is at dst. Linux's renameat2(RENAME_NOREPLACE)
    does it atomically; where that is missing, a check just before the rename (which would replace
    an empty folder) is the best there is."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        renameat2 = None
    if renameat2 is not None:
        at_cwd, no_replace = -100, 1
        if renameat2(at_cwd, os.fsencode(src), at_cwd, os.fsencode(dst), no_replace) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.ENOSYS, errno.EINVAL):  # else: a file system without the flag
            raise OSError(err, os.strerror(err), str(dst))
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    src.rename(dst)


def fsync(path: Path) -> None:
    """A file's data, or a folder's entries, on the disk, not only in memory."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def move_into_place(folder: Path, path: Path) -> bool:
    """Rename `folder` to `path`, unless something is at `path` (then False: left as it is)."""
    try:
        rename_no_replace(folder, path)
    except OSError as e:
        if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
            raise
        return False
    return True


# --------------------------------------------------------------------------------------------------
# 5. Random checkpoints: the real on-disk format with random weights (tests, demos, bench.py)

def fp8_quantize(w: Tensor) -> tuple[Tensor, Tensor]:  # ModelOpt's per-tensor FP8, amax / 448
    scale = w.abs().max().float().clamp(min=1e-12) / 448.0
    return (w.float() / scale).clamp(-448, 448).to(torch.float8_e4m3fn), scale


def fp8_recipe(config: Config) -> set[str]:
    """The Linears the FP8 release quantizes (inferred from its tensors): all routed and shared
    experts, and the in/out_proj of every Mamba layer not right before an attention layer."""
    kinds, names = config.layers_block_type, set()
    for i, kind in enumerate(kinds):
        p = f"backbone.layers.{i}.mixer"
        if kind == "moe":
            experts = [f"experts.{j}" for j in range(config.n_routed_experts)]
            names |= {f"{p}.{e}.{proj}" for e in ["shared_experts", *experts]
                      for proj in ("up_proj", "down_proj")}
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
    """Random tensors of `config` under their checkpoint names and dtypes (FP8 recipe or all BF16),
    one at a time, made on `device`. On the meta device: the same names, shapes and dtypes, no data
    (a plan)."""
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
                q, scale = fp8_quantize(t)
                yield full, q
                yield f"{owner}.weight_scale", scale.reshape(())
                yield f"{owner}.input_scale", rand() * 0.05 + 0.01
            elif full.endswith(FP32_TENSORS):
                yield full, t.float()
            else:
                yield full, t.to(torch.bfloat16)


def dead_run(pid: int) -> bool:
    """Whether the run of PID (named in its temporary folder's name) is gone, killed (kill -9, a
    power cut): not this process, and no process PID is alive."""
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError):  # alive, another user's; too large for a PID
        pass
    return False


def dead_runs_folders(path: Path, kind: str, tail: str = "") -> list[Path]:
    """The folders `.NAME.KIND-PID` + `tail` (a regex: what tempfile.mkdtemp adds, say) beside
    `path` of runs that are gone (no process PID alive): exactly those names, not a user's
    `.NAME.old-keep`. Kinds: tmp (a run's output), old (slice.py: the target it replaced)."""
    prefix, folders = f".{path.name}.{kind}-", []
    for folder in sorted(path.parent.glob(f"{glob.escape(prefix)}*")):
        pid = re.fullmatch(f"([0-9]+){tail}", folder.name[len(prefix):])
        if pid and dead_run(int(pid[1])):
            folders.append(folder)
    return folders


def write_random_checkpoint(path: str | Path, config: Config, fp8: bool = True, shards: int = 2,
                            seed: int = 0, extra_files=None) -> Path:
    """Write a random checkpoint of `config` in the exact on-disk format of the real one:
    config.json, generation_config.json, `shards` safetensors shards and their index. Streams: one
    tensor in memory. Written into a temporary folder renamed at the end: an interruption or a full
    disk leaves nothing, and a folder that appears at `path` meanwhile (another run) is refused,
    left as it is. extra_files(folder), if given, adds files (a tokenizer) before the rename."""
    path = Path(path)
    if path.exists():
        raise NanoElasticError(f"{path} already exists")
    planned = [Planned(n, t) for n, t in random_checkpoint_tensors(config, fp8, seed, "meta")]
    largest = max(nbytes(p.meta) for p in planned)
    # At most `shards` shards: each but the last holds more than total / shards.
    plan = split_shards(planned, sum(nbytes(p.meta) for p in planned) / shards + largest)
    path.parent.mkdir(parents=True, exist_ok=True)
    for tmp in dead_runs_folders(path, "tmp", "-[a-z0-9_]+"):  # killed runs' (kill -9, power cut)
        shutil.rmtree(tmp, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent))
    try:
        tensors = (t for _, t in random_checkpoint_tensors(config, fp8, seed))
        write_shards(tmp, plan, tensors)
        write_json(tmp / "config.json", config_json(config))
        write_json(tmp / "generation_config.json", {"bos_token_id": config.bos_token_id,
                                                    "eos_token_id": config.eos_token_id,
                                                    "pad_token_id": config.pad_token_id})
        if fp8:
            write_json(tmp / "hf_quant_config.json", {"producer": {"name": "nanoelastic (random)"},
                                                      "quantization": {"quant_algo": "FP8"}})
        if extra_files:
            extra_files(tmp)
        if not move_into_place(tmp, path):
            raise NanoElasticError(f"{path} appeared while it was written (another run?): left as "
                                   f"it is")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def random_model(config: Config, device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None, fp8: bool = True, seed: int = 0) -> Model:
    """A model of `config` with random weights of the kind write_random_checkpoint() writes (FP8
    recipe or all BF16), made directly on `device`, no disk: what bench.py measures the real
    52-layer shapes with. On the CPU they are the very weights that function writes for the same
    seed; a GPU's generator draws others."""
    device = resolve_device(device)
    with torch.device("meta"):
        model = Model(config)
    stacks = {}
    for name, t in random_checkpoint_tensors(config, fp8, seed, device):
        place_tensor(model, stacks, name, t, dtype or torch.bfloat16)
    return model
