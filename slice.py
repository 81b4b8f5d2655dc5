"""
slice.py: write one nested model of a Nemotron Elastic checkpoint as a standalone HF checkpoint, which
transformers, vLLM or any engine that reads the base model can serve. The interface of NVIDIA's
zero_shot_slicing.py:

    python slice.py --source-checkpoint SRC --target-checkpoint DST --size 23B|12B|HIDDENxFFN [--precision fp8|bf16]

- Tensors: nested_view() of nanoelastic, i.e. the NESTED_AXES table the model's own views use.
  Every FP8 weight_scale / input_scale and the FP8-KV k_scale / v_scale are per-tensor scalars: unchanged.
  mtp.* tensors (a multi-token-prediction head, if any) are dropped: the release defines no nesting rule
  for them and a prefix of the wrong axis would be silently wrong (its eh_proj concatenates two hidden vectors).
- config.json: hidden_size, moe_intermediate_size, intermediate_size changed, nothing else (except:
  num_nextn_predict_layers -> 0 when mtp.* tensors were dropped; quantization_config dropped with FP8).
- Every other file of SRC (tokenizer, generation config, hf_quant_config.json, ...) is copied, except
  dot-files (download caches) and other *.safetensors files.
- --precision defaults to the source's. bf16 from an FP8 source dequantises (weight.float() * weight_scale,
  as ModelOpt defines it) and drops the scales and the quantisation config. fp8 from a BF16 source is an
  error: per-tensor weights would be easy (amax / 448), but ModelOpt's FP8 also stores a *calibrated*
  activation scale (input_scale) per Linear, which needs calibration data; a made-up one would load in
  vLLM and silently degrade it.

Safe: the source (config, index, every tensor's presence, shape, dtype and FP8 pairing), the size and the
target are checked before anything is written. One run per target (an flock on `.NAME.slice-lock`, which
the kernel drops if the run dies); the checkpoint is written into `.NAME.tmp-PID` beside the target,
checked again like a source, and renamed into place at the end, unless a target appeared meanwhile (then
it is left as it is). --force moves the old target to `.NAME.old-PID`, renames the new one in, then
removes the old: an interruption puts the old one back; a kill leaves it aside, and the next run on
that target puts it back (or removes it, if the new one was in place) and removes killed runs' temporary
folders. A symlinked target is refused up front. Streams: every output tensor's
shape and dtype are planned from the source headers, so each output shard is written header first and
then one tensor at a time (read, sliced, appended, freed). Memory holds one tensor, plus the pages of
the memory-mapped source shard being read (page cache, which the kernel can reclaim): about one shard.
"""

import argparse
import errno
import fcntl
import glob
import itertools
import json
import math
import os
import shutil
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Iterator, NamedTuple

import torch
from safetensors import SafetensorError, safe_open

from nanoelastic import (SAFETENSORS_DTYPES, Config, Model, NanoElasticError, Terminated, check_checkpoint,
                         checked_scale, interrupted_exit_code, nested_view, parse_size, sigterm_as_interrupt)

DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}  # torch dtype -> safetensors name
PARAMS = ("", "K", "M", "B")  # parameter counts: 23.59 B
SCALES = (".weight_scale", ".input_scale", ".k_scale", ".v_scale")  # FP8 per-tensor scalars
REWRITTEN = ("model.safetensors.index.json", "config.json")
MTP_DROPPED = "mtp.* (no nesting rule for the MTP head)"
SCALES_DROPPED = "FP8 scales (dequantised to BF16)"


class Output(NamedTuple):
    name: str
    source_shard: Path
    meta: torch.Tensor  # shape and dtype of the output tensor, on the meta device


def human(n: float, unit: str, prefixes=("", "k", "M", "G")) -> str:
    """12345678, "B" -> '12.35 MB'."""
    k = min(int(math.log10(max(n, 1)) // 3), len(prefixes) - 1)
    return f"{n / 1000 ** k:.2f} {prefixes[k]}{unit}"


def plan_outputs(weight_map: dict[str, Path], d: int, f: int, dequantize: bool) -> tuple[list[Output], Counter]:
    """Every output tensor with its shape and dtype, from the source headers and the slicing table alone
    (nested_view of a meta tensor), in source shard order; and what is dropped, by reason."""
    outputs, dropped = [], Counter()
    by_shard = {}
    for name, shard in weight_map.items():
        by_shard.setdefault(shard, []).append(name)
    for shard, names in sorted(by_shard.items()):
        with safe_open(shard, "pt") as sf:
            for name in names:
                if name.startswith("mtp."):
                    dropped[MTP_DROPPED] += 1
                    continue
                if dequantize and name.endswith(SCALES):
                    dropped[SCALES_DROPPED] += 1
                    continue
                header = sf.get_slice(name)
                if header.get_dtype() not in SAFETENSORS_DTYPES:
                    raise NanoElasticError(f"{name}: unsupported dtype {header.get_dtype()}")
                meta = torch.empty(header.get_shape(), dtype=SAFETENSORS_DTYPES[header.get_dtype()], device="meta")
                meta = nested_view(name, meta, d, f)
                if dequantize and f"{name}_scale" in weight_map:
                    meta = meta.to(torch.bfloat16)
                outputs.append(Output(name, shard, meta))
    return outputs, dropped


def write_safetensors(path: Path, outputs: list[Output], tensors: Iterator[torch.Tensor]) -> None:
    """A safetensors file written one tensor at a time: the header holds the planned names, dtypes and
    shapes, then each tensor's bytes follow as `tensors` yields them. Only one tensor is ever in memory."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for out in outputs:
        size = out.meta.numel() * out.meta.element_size()
        header[out.name] = {"dtype": DTYPE_NAMES[out.meta.dtype], "shape": list(out.meta.shape),
                            "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # tensor data starts 8-byte aligned, as safetensors itself writes it
    with open(path, "wb") as file:
        file.write(len(raw).to_bytes(8, "little") + raw)
        for out in outputs:
            t = next(tensors)
            assert t.shape == out.meta.shape and t.dtype == out.meta.dtype, out.name  # the plan is the data
            file.write(t.contiguous().reshape(-1).view(torch.uint8).numpy())


def lock_target(target: Path) -> int:
    """One run per target: an flock on `.NAME.slice-lock` beside it, which the kernel drops if the run dies."""
    lock = target.with_name(f".{target.name}.slice-lock")
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise NanoElasticError(f"another slice.py is writing {target}: wait for it, or choose another target")
        try:
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # the run before us removed the lock file as we opened it: lock the new one


def unlock_target(target: Path, fd: int) -> None:
    target.with_name(f".{target.name}.slice-lock").unlink(missing_ok=True)
    os.close(fd)


def remove(path: Path) -> None:
    """A folder or a file, if there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()


def clean_leftovers(target: Path, log) -> None:
    """What killed runs left beside the target (under the lock, no live run owns any of it): a backup
    of an interrupted --force swap goes back in place if the target is missing, else is removed; temporary
    folders are removed."""
    for old in sorted(target.parent.glob(f".{glob.escape(target.name)}.old-*")):
        if os.path.lexists(target):
            remove(old)  # the swap had finished: the new target is in place
        else:
            old.rename(target)
            log(f"restored {target}, which an interrupted slice.py --force had moved to {old.name}")
    for tmp in sorted(target.parent.glob(f".{glob.escape(target.name)}.tmp-*")):
        remove(tmp)
        log(f"removed {tmp}, the unfinished output of an interrupted slice.py")


def slice_checkpoint(source: str | Path, target: str | Path, size: str, precision: str | None = None,
                     force: bool = False, log=print) -> dict:
    """Write the nested model `size` of checkpoint `source` to folder `target`. Returns the summary."""
    t0 = time.time()
    source, target = Path(source), Path(target)

    # 1. Check everything before writing anything.
    if not source.is_dir():
        raise NanoElasticError(f"source checkpoint folder not found: {source}")
    config = Config.from_file(source / "config.json")
    d, f = parse_size(size, config)
    with torch.device("meta"):
        model = Model(config)  # shapes only, to check the source against
    checked = check_checkpoint(model, source)
    weight_map = checked.weight_map
    source_fp8 = any(name.endswith(".weight_scale") for name in checked.plan)
    precision = precision or ("fp8" if source_fp8 else "bf16")
    if precision == "fp8" and not source_fp8:
        raise NanoElasticError("--precision fp8 needs an FP8 source: quantising BF16 needs calibrated activation "
                               "scales (input_scale); quantise with NVIDIA ModelOpt, or slice the FP8 release")
    dequantize = source_fp8 and precision == "bf16"
    src, dst = source.resolve(), target.resolve()
    if dst == src or src in dst.parents or dst in src.parents:
        raise NanoElasticError(f"target {target} must be a folder outside the source {source}")
    if target.is_symlink():
        raise NanoElasticError(f"target {target} is a symbolic link: give the path of the folder itself")

    raw_config = json.loads((source / "config.json").read_text())
    raw_config.update(hidden_size=d, moe_intermediate_size=f, intermediate_size=f)
    if any(name.startswith("mtp.") for name in weight_map) and raw_config.get("num_nextn_predict_layers"):
        raw_config["num_nextn_predict_layers"] = 0  # its tensors are dropped (see the top of this file)
    if dequantize:
        raw_config.pop("quantization_config", None)

    # 2. Plan every output tensor and output shard (at most as large as the largest source shard).
    outputs, dropped = plan_outputs(weight_map, d, f, dequantize)
    max_shard_bytes = max(shard.stat().st_size for shard in set(weight_map.values()))
    shards, shard_bytes = [[]], 0
    for out in outputs:
        size_out = out.meta.numel() * out.meta.element_size()
        if shards[-1] and shard_bytes + size_out > max_shard_bytes:
            shards, shard_bytes = shards + [[]], 0
        shards[-1].append(out)
        shard_bytes += size_out
    total_out = sum(out.meta.numel() * out.meta.element_size() for out in outputs)
    scales = {}  # weight name -> its weight_scale, to dequantise (a scale may sit in another shard)
    if dequantize:
        scale_names = [f"{out.name}_scale" for out in outputs if f"{out.name}_scale" in weight_map]
        for shard in set(weight_map[name] for name in scale_names):
            with safe_open(shard, "pt") as sf:
                for name in (name for name in scale_names if weight_map[name] == shard):
                    scales[name.removesuffix("_scale")] = checked_scale(name, sf.get_tensor(name))

    progress = {"read": 0, "written": 0, "last": 0.0}

    def sliced_tensors() -> Iterator[torch.Tensor]:
        """The output tensors in plan order, read one at a time, each source shard opened once."""
        for shard, group in itertools.groupby(outputs, key=lambda out: out.source_shard):
            with safe_open(shard, "pt") as sf:
                for out in group:
                    t = sf.get_tensor(out.name)
                    if out.name.endswith((".weight_scale", ".input_scale")):
                        checked_scale(out.name, t)
                    progress["read"] += t.numel() * t.element_size()
                    t = nested_view(out.name, t, d, f)
                    if out.name in scales:
                        t = (t.float() * scales[out.name]).to(torch.bfloat16)
                    yield t
                    progress["written"] += t.numel() * t.element_size()
                    if sys.stderr.isatty() and time.time() - progress["last"] > 0.25:
                        progress["last"] = time.time()
                        print(f"\rslicing: {human(progress['written'], 'B')} of {human(total_out, 'B')} written",
                              end="", file=sys.stderr, flush=True)

    def write_checkpoint(folder: Path) -> Model:
        """The sliced checkpoint, written into `folder` and checked like a source; its (meta) model."""
        names = [f"model-{k:05d}-of-{len(shards):05d}.safetensors" for k in range(1, len(shards) + 1)]
        tensors = sliced_tensors()
        for k, (name, shard) in enumerate(zip(names, shards), 1):
            write_safetensors(folder / name, shard, tensors)
            if not sys.stderr.isatty():  # a log: one line per shard
                print(f"slicing: wrote shard {k}/{len(shards)}", file=sys.stderr, flush=True)
        if sys.stderr.isatty():
            print(file=sys.stderr)
        index_path = source / "model.safetensors.index.json"
        metadata = json.loads(index_path.read_text()).get("metadata", {}) if index_path.is_file() else {}
        index = {"metadata": {**metadata, "total_size": total_out},
                 "weight_map": {out.name: name for name, shard in zip(names, shards) for out in shard}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        (folder / "config.json").write_text(json.dumps(raw_config, indent=2) + "\n")
        for item in sorted(source.iterdir()):
            if item.name.startswith(".") or item.name in REWRITTEN or item.suffix == ".safetensors":
                continue  # dot-files: download caches; *.safetensors: weights, rewritten above
            if dequantize and item.name == "hf_quant_config.json":
                continue
            (shutil.copytree if item.is_dir() else shutil.copy2)(item, folder / item.name)
        with torch.device("meta"):
            sliced_model = Model(config.sliced(d, f))
        check_checkpoint(sliced_model, folder)
        return sliced_model

    # 3. Write into a temporary folder beside the target, check the result, rename it into place. One run
    # per target (a lock); what killed runs left beside it is cleaned first; the target must not exist
    # (or --force) now and still at the end: one that appears meanwhile is left as it is.
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = lock_target(target)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    try:
        clean_leftovers(target, log)
        if os.path.lexists(target) and not force:
            raise NanoElasticError(f"target exists: {target} (use --force to replace it)")
        tmp.mkdir()
        sliced_model = write_checkpoint(tmp)
        if os.path.lexists(target) and not force:
            raise NanoElasticError(f"target {target} appeared while slicing: left as it is; nothing was written")
        if os.path.lexists(target):  # --force: the old target is gone only once the new one is in place
            target.rename(old)
        try:
            tmp.rename(target)
        except OSError as e:
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            raise NanoElasticError(f"target {target} appeared while slicing: left as it is") from None
    finally:
        if old.exists() and not os.path.lexists(target):
            old.rename(target)  # interrupted inside the swap: the old target goes back
        remove(old)
        remove(tmp)
        unlock_target(target, lock)
    total, active = sliced_model.num_params()
    summary = dict(size=(d, f), precision=precision, tensors=len(outputs), dropped=dict(dropped),
                   bytes_read=progress["read"], bytes_written=total_out, shards=len(shards),
                   params_total=total, params_active=active, seconds=time.time() - t0)
    log(f"wrote {target}: {size} = hidden {d} x expert FFN {f}, {precision}\n"
        f"  tensors     {len(outputs)} written"
        + "".join(f", {n} {why} dropped" for why, n in dropped.items()) + "\n"
        f"  bytes       {human(progress['read'], 'B')} read, {human(total_out, 'B')} written "
        f"in {len(shards)} shard{'s' * (len(shards) > 1)}\n"
        f"  parameters  {human(total, '', PARAMS)} total, {human(active, '', PARAMS)} active per token\n"
        f"  time        {summary['seconds']:.1f} s")
    return summary


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="slice.py", description="Write one nested model (23B, 12B or HIDDENxFFN) "
                                 "of a Nemotron Elastic checkpoint as a standalone HF-format checkpoint.")
    ap.add_argument("--source-checkpoint", required=True, help="the Elastic checkpoint folder (FP8 or BF16)")
    ap.add_argument("--target-checkpoint", required=True, help="the folder to write (must not exist, see --force)")
    ap.add_argument("--size", required=True, help="23B, 12B, 30B or HIDDENxFFN (e.g. 2304x1600)")
    ap.add_argument("--precision", choices=["fp8", "bf16"], help="default: the source's; bf16 from FP8 dequantises")
    ap.add_argument("--force", action="store_true", help="replace an existing target")
    args = ap.parse_args(argv)
    sigterm_as_interrupt()
    try:
        slice_checkpoint(args.source_checkpoint, args.target_checkpoint, args.size, args.precision, args.force)
    except (KeyboardInterrupt, Terminated) as e:
        print(f"{ap.prog}: error: interrupted; nothing half-written is left at {args.target_checkpoint}",
              file=sys.stderr)
        sys.exit(interrupted_exit_code(e))
    except (NanoElasticError, OSError, SafetensorError) as e:  # bad input, a full disk, a corrupt shard
        sys.exit(f"{ap.prog}: error: {e}")


if __name__ == "__main__":
    main()
