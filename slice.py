"""
slice.py: write one nested model of a Nemotron Elastic checkpoint as a standalone HF checkpoint,
which transformers, vLLM or any engine that reads the base model can serve. The interface of
NVIDIA's zero_shot_slicing.py:

    python slice.py --source-checkpoint SRC --target-checkpoint DST --size 23B|12B|HIDDENxFFN
    [--precision fp8|bf16]

- Tensors: nested_view() of nanoelastic, i.e. the NESTED_AXES table the model's own views use.
  Every FP8 weight_scale / input_scale and the FP8-KV k_scale / v_scale are per-tensor scalars:
  unchanged. mtp.* tensors (a multi-token-prediction head, if any) are dropped: the release defines
  no nesting rule for them and a prefix of the wrong axis would be silently wrong (its eh_proj
  concatenates two hidden vectors).
- config.json: hidden_size, moe_intermediate_size, intermediate_size changed, nothing else (except:
  num_nextn_predict_layers -> 0 when mtp.* tensors were dropped; quantization_config dropped with
  FP8).
- Every other file of SRC (tokenizer, generation config, hf_quant_config.json, ...) is copied,
  except dot-files (download caches) and other *.safetensors files.
- --precision defaults to the source's. bf16 from an FP8 source dequantises (weight.float() *
  weight_scale, as ModelOpt defines it) and drops the scales and the quantisation config. fp8 from a
  BF16 source is an error: per-tensor weights would be easy (amax / 448), but ModelOpt's FP8 also
  stores a *calibrated* activation scale (input_scale) per Linear, which needs calibration data; a
  made-up one would load in vLLM and silently degrade it.

Safe: the source (config, index, every tensor's presence, shape, dtype and FP8 pairing), the size
and the target are checked before anything is written. One run per target (an flock on
`.NAME.slice-lock`, which the kernel drops if the run dies); the checkpoint is written into
`.NAME.tmp-PID` beside the target, checked again like a source, and renamed into place at the end,
unless a target appeared meanwhile (then it is left as it is). --force moves the old target to
`.NAME.old-PID`, renames the new one in, then removes the old: an interruption puts the old one
back; a kill leaves it aside, and the next run on that target puts it back (or removes it, if the
new one was in place) and removes killed runs' temporary folders: only those names, and only when
no process PID is alive. A folder that cannot be removed once the new target is in place is left,
named in one line on stderr, and the slice succeeds. A symlinked target is refused up front, and
--force replaces only an empty folder or a checkpoint (config.json beside *.safetensors).
Streams: every output tensor's shape and dtype are planned from the source headers, so each output
shard is written header first and then one tensor at a time (read, sliced, appended, freed).
Memory holds one tensor, plus the pages of the memory-mapped source shard being read (page cache,
which the kernel can reclaim): about one shard.
"""

import fcntl
import math
import os
import shutil
import signal
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Iterator, NamedTuple

if __name__ == "__main__":  # Ctrl-C while torch imports (seconds): nothing to undo yet, exit
    signal.signal(signal.SIGINT, lambda signum, frame: os._exit(130))  # (run_cli restores it)

import torch
from safetensors import safe_open

import checkpoint
from checkpoint import (SAFETENSORS_DTYPES, Planned, Progress, by_shard, check_checkpoint,
                        checked_scale, nbytes)
import nanoelastic as ne
from nanoelastic import Config, Model, NanoElasticError, Terminated, nested_view, parse_size

PARAMS = ("", "K", "M", "B")  # parameter counts: 23.59 B
SCALES = (".weight_scale", ".input_scale", ".k_scale", ".v_scale")  # FP8 per-tensor scalars
REWRITTEN = ("model.safetensors.index.json", "config.json")
MTP_DROPPED = "mtp.* (no nesting rule for the MTP head)"
SCALES_DROPPED = "FP8 scales (dequantised to BF16)"


class Slice(NamedTuple):
    """Everything a slice writes, planned and checked before anything is written."""
    source: Path
    target: Path
    d: int
    f: int
    precision: str
    dequantize: bool  # FP8 source, BF16 output
    weight_map: dict[str, Path]  # the source's tensors -> their shards
    shards: list[list[Planned]]  # the output tensors, shard by shard, in source shard order
    dropped: Counter  # source tensors not written, by reason
    scales: dict[str, torch.Tensor]  # weight name -> its weight_scale, when dequantising
    config_json: dict  # the output's config.json
    config: Config  # the output's config


def human(n: float, unit: str, prefixes=("", "k", "M", "G")) -> str:
    """12345678, "B" -> '12.35 MB'."""
    k = min(int(math.log10(max(n, 1)) // 3), len(prefixes) - 1)
    return f"{n / 1000 ** k:.2f} {prefixes[k]}{unit}"


# --------------------------------------------------------------------------------------------------
# 1. Plan: check the source, the size, the precision and the target; plan every output tensor

def plan_slice(source: Path, target: Path, size: str, precision: str | None) -> Slice:
    target = Path(os.path.abspath(target))  # "." and "dir/" have a name to put beside
    if not source.is_dir():
        problem = "is not a folder" if source.exists() else "folder not found"
        raise NanoElasticError(f"source checkpoint {problem}: {source}")
    config = Config.from_file(source / "config.json")
    d, f = parse_size(size, config)
    with torch.device("meta"):
        model = Model(config)  # shapes only, to check the source against
    checked = check_checkpoint(model, source)
    weight_map = checked.weight_map
    source_fp8 = any(name.endswith(".weight_scale") for name in checked.plan)
    precision = precision or ("fp8" if source_fp8 else "bf16")
    if precision == "fp8" and not source_fp8:
        raise NanoElasticError("--precision fp8 needs an FP8 source: quantising BF16 needs "
                               "calibrated activation scales (input_scale); quantise with NVIDIA "
                               "ModelOpt, or slice the FP8 release")
    dequantize = source_fp8 and precision == "bf16"
    src, dst = source.resolve(), target.resolve()
    if dst == src or src in dst.parents or dst in src.parents:
        raise NanoElasticError(f"target {target} must be a folder outside the source {source}")
    if target.is_symlink():
        raise NanoElasticError(f"target {target} is a symbolic link: give the path of the folder "
                               f"itself")
    try:
        str(target).encode()
    except UnicodeEncodeError:  # (found only once every shard was written)
        raise NanoElasticError(f"target {target}: the path is not UTF-8, and safetensors opens "
                               f"only UTF-8 paths") from None
    parent = next(p for p in target.parents if p.exists())
    if not parent.is_dir():
        raise NanoElasticError(f"target {target}: {parent} is not a folder")
    outputs, dropped = plan_outputs(weight_map, d, f, dequantize)
    max_shard_bytes = max(shard.stat().st_size for shard in set(weight_map.values()))
    scales = read_scales(weight_map, outputs) if dequantize else {}
    return Slice(source, target, d, f, precision, dequantize, weight_map,
                 checkpoint.split_shards(outputs, max_shard_bytes),
                 dropped, scales,
                 sliced_config_json(source, config.nested_widths(d, f), weight_map, dequantize),
                 config.sliced(d, f))


def plan_outputs(weight_map: dict[str, Path], d: int, f: int,
                 dequantize: bool) -> tuple[list[Planned], Counter]:
    """Every output tensor with its shape and dtype, from the source headers and the slicing table
    alone (nested_view of a meta tensor), in source shard order; and what is dropped, by reason."""
    outputs, dropped = [], Counter()
    for shard, names in by_shard(weight_map, weight_map).items():
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
                meta = torch.empty(header.get_shape(), dtype=SAFETENSORS_DTYPES[header.get_dtype()],
                                   device="meta")
                meta = nested_view(name, meta, d, f)
                if dequantize and f"{name}_scale" in weight_map:
                    meta = meta.to(torch.bfloat16)
                outputs.append(Planned(name, meta))
    return outputs, dropped


def read_scales(weight_map: dict[str, Path], outputs: list[Planned]) -> dict[str, torch.Tensor]:
    """weight name -> its weight_scale, for the weights to dequantise (maybe in another shard)."""
    scales = {}
    names = [f"{out.name}_scale" for out in outputs if f"{out.name}_scale" in weight_map]
    for shard, in_shard in by_shard(names, weight_map).items():
        with safe_open(shard, "pt") as sf:
            for name in in_shard:
                scales[name.removesuffix("_scale")] = checked_scale(name, sf.get_tensor(name))
    return scales


def sliced_config_json(source: Path, widths: dict, weight_map: dict, dequantize: bool) -> dict:
    """The source's config.json with the nested widths (see the top of this file for the rest)."""
    config = checkpoint.read_json(source / "config.json")
    config.update(widths)
    mtp = any(name.startswith("mtp.") for name in weight_map)
    if mtp and config.get("num_nextn_predict_layers"):
        config["num_nextn_predict_layers"] = 0  # its tensors are dropped
    if dequantize:
        config.pop("quantization_config", None)
    return config


# --------------------------------------------------------------------------------------------------
# 2. Write: the sliced tensors, streamed shard by shard, and the other files, into a folder

def sliced_tensors(job: Slice, counts: dict, progress: Progress) -> Iterator[torch.Tensor]:
    """The output tensors in plan order, read one at a time, each source shard opened once."""
    outputs = [out.name for shard in job.shards for out in shard]
    total = sum(nbytes(out.meta) for shard in job.shards for out in shard)
    for shard, names in by_shard(outputs, job.weight_map).items():
        with safe_open(shard, "pt") as sf:
            for name in names:
                t = sf.get_tensor(name)
                if name.rpartition(".")[2] in checkpoint.SCALES:
                    checked_scale(name, t)
                counts["read"] += nbytes(t)
                t = nested_view(name, t, job.d, job.f)
                if name in job.scales:
                    t = (t.float() * job.scales[name]).to(torch.bfloat16)
                # before the yield: the writer takes the last tensor and does not come back
                counts["written"] += nbytes(t)
                progress(f"slicing: {human(counts['written'], 'B')} of {human(total, 'B')} written")
                yield t


def write_slice(job: Slice, folder: Path, counts: dict) -> Model:
    """The sliced checkpoint, written into `folder` and checked like a source; its (meta) model."""
    def on_shard(k: int, n: int) -> None:
        if not sys.stderr.isatty():  # a log: one line per shard
            print(f"slicing: wrote shard {k}/{n}", file=sys.stderr, flush=True)

    index_path = job.source / "model.safetensors.index.json"
    metadata = checkpoint.read_json(index_path).get("metadata") if index_path.is_file() else {}
    metadata = metadata if isinstance(metadata, dict) else {}  # informational: a bad one is dropped
    progress = Progress()
    try:
        checkpoint.write_shards(folder, job.shards, sliced_tensors(job, counts, progress), metadata,
                                on_shard)
    finally:
        if progress.last:  # a progress line is open: end it, before an error message too
            print(file=sys.stderr)
    checkpoint.write_json(folder / "config.json", job.config_json)
    for item in sorted(job.source.iterdir()):
        if item.name.startswith(".") or item.name in REWRITTEN or item.suffix == ".safetensors":
            continue  # dot-files: download caches; *.safetensors: weights, rewritten above
        if job.dequantize and item.name == "hf_quant_config.json":
            continue
        (shutil.copytree if item.is_dir() else shutil.copy2)(item, folder / item.name)
    with torch.device("meta"):
        sliced_model = Model(job.config)
    check_checkpoint(sliced_model, folder)
    return sliced_model


# --------------------------------------------------------------------------------------------------
# 3. Swap: the written folder renamed into place, one run per target, the old one kept until then

def lock_target(target: Path) -> int:
    """One run per target: an flock on `.NAME.slice-lock` beside it (dropped if the run dies)."""
    lock = target.with_name(f".{target.name}.slice-lock")
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise NanoElasticError(f"another slice.py is writing {target}: wait for it, or choose "
                                   f"another target")
        try:
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # the run before us removed the lock file as we opened it: lock the new one


def unlock_target(target: Path, fd: int) -> None:
    try:
        target.with_name(f".{target.name}.slice-lock").unlink(missing_ok=True)
    finally:
        os.close(fd)


def remove(path: Path) -> bool:
    """A folder or a file, if there; if it cannot be removed, one line on stderr and False."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif os.path.lexists(path):
            path.unlink()
    except OSError as e:
        print(f"slice.py: warning: could not remove {path} ({e.strerror or e}): remove it by hand",
              file=sys.stderr)
        return False
    return True


def clean_leftovers(target: Path, log) -> None:
    """What killed runs left beside the target (under the lock, no live run owns any of it): a
    backup of an interrupted --force swap goes back in place if the target is missing, else is
    removed; temporary folders are removed."""
    for old in checkpoint.dead_runs_folders(target, "old"):
        if not os.path.lexists(target):
            checkpoint.rename_no_replace(old, target)
            log(f"restored {target}, which an interrupted slice.py --force had moved to {old.name}")
        elif remove(old):  # the swap had finished: the new target is in place
            log(f"removed {old}, the old target that an interrupted slice.py --force had replaced")
    for tmp in checkpoint.dead_runs_folders(target, "tmp"):
        if remove(tmp):
            log(f"removed {tmp}, the unfinished output of an interrupted slice.py")


def check_replaceable(target: Path) -> None:
    """--force replaces an empty folder or a checkpoint folder (config.json beside *.safetensors),
    nothing else: a mistyped --target-checkpoint must not delete a file or somebody's folder."""
    if not os.path.lexists(target):
        return
    if not target.is_dir():
        raise NanoElasticError(f"target {target} is a file: --force replaces a checkpoint folder "
                               f"only")
    names = [p.name for p in target.iterdir()]
    if names and not ("config.json" in names and any(n.endswith(".safetensors") for n in names)):
        raise NanoElasticError(f"target {target} is a folder but not a checkpoint (no config.json "
                               f"beside *.safetensors): --force replaces a checkpoint folder only; "
                               f"remove it yourself or choose another target")


def swap_into_place(target: Path, force: bool, log, write):
    """write(folder) (its result is returned) into `.NAME.tmp-PID` beside the target, then rename it
    into place. One run per target (a lock); what killed runs left beside it is cleaned first; the
    target must not exist (or --force) now and still at the end: one that appears meanwhile is left
    as it is."""
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = lock_target(target)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    try:
        clean_leftovers(target, log)
        if os.path.lexists(target) and not force:
            raise NanoElasticError(f"target exists: {target} (use --force to replace it)")
        check_replaceable(target)
        tmp.mkdir()
        written = write(tmp)
        # on the disk before it is renamed into place (and the old target removed): after a power
        # cut, the target is the old checkpoint or the whole new one, never one with empty shards
        for path in [*tmp.rglob("*"), tmp]:
            checkpoint.fsync(path)
        if os.path.lexists(target) and not force:
            raise NanoElasticError(f"target {target} appeared while slicing: left as it is; "
                                   f"nothing was written")
        # --force: the old target is gone only once the new one is in place
        check_replaceable(target)  # it may have changed meanwhile
        if os.path.lexists(target):
            target.rename(old)
        if not checkpoint.move_into_place(tmp, target):
            raise NanoElasticError(f"target {target} appeared while slicing: left as it is")
        checkpoint.fsync(target.parent)  # the rename too, before the old target goes
    finally:
        try:
            if old.exists() and not os.path.lexists(target):
                checkpoint.move_into_place(old, target)  # interrupted in the swap: the old one back
            remove(old)  # the new target is in place: a failure here is a warning, not the slice's
            remove(tmp)
        finally:
            unlock_target(target, lock)
    return written


def slice_checkpoint(source: str | Path, target: str | Path, size: str,
                     precision: str | None = None,
                     force: bool = False, log=print) -> dict:
    """Write the nested model `size` of checkpoint `source` to folder `target`; the summary."""
    t0 = time.time()
    for what, path in (("source", source), ("target", target)):
        if str(path) == "":  # Path("") is the current folder
            raise NanoElasticError(f"the {what} checkpoint path is empty: give a folder")
    job = plan_slice(Path(source), Path(target), size, precision)
    counts = {"read": 0, "written": 0}
    sliced_model = swap_into_place(job.target, force, log,
                                   lambda folder: write_slice(job, folder, counts))
    total, active = sliced_model.num_params()
    tensors = sum(len(shard) for shard in job.shards)
    summary = dict(size=(job.d, job.f), precision=job.precision, tensors=tensors,
                   dropped=dict(job.dropped),
                   bytes_read=counts["read"], bytes_written=counts["written"],
                   shards=len(job.shards),
                   params_total=total, params_active=active, seconds=time.time() - t0)
    n = len(job.shards)
    log(f"wrote {job.target}: {size} = hidden {job.d} x expert FFN {job.f}, {job.precision}\n"
        f"  tensors     {tensors} written"
        + "".join(f", {k} {why} dropped" for why, k in job.dropped.items()) + "\n"
        f"  bytes       {human(counts['read'], 'B')} read, {human(counts['written'], 'B')} written "
        f"in {n} shard{'s' * (n > 1)}\n"
        f"  parameters  {human(total, '', PARAMS)} total, {human(active, '', PARAMS)} active per "
        f"token\n  time        {summary['seconds']:.1f} s")
    return summary


def main(argv: list[str] | None = None) -> None:
    ap = ne.ArgumentParser(prog="slice.py", description="Write one nested model (23B, 12B or "
                           "HIDDENxFFN) of a Nemotron Elastic checkpoint as a standalone "
                           "HF-format checkpoint.")
    ap.add_argument("--source-checkpoint", required=True, help="the Elastic checkpoint folder (FP8 "
                    "or BF16)")
    ap.add_argument("--target-checkpoint", required=True, help="the folder to write (must not "
                    "exist, see --force)")
    ap.add_argument("--size", required=True, help="23B, 12B, 30B or HIDDENxFFN (e.g. 2304x1600)")
    ap.add_argument("--precision", choices=["fp8", "bf16"], help="default: the source's; bf16 from "
                    "FP8 dequantises")
    ap.add_argument("--force", action="store_true", help="replace an existing target")
    args = ap.parse_args(argv)
    try:
        slice_checkpoint(args.source_checkpoint, args.target_checkpoint, args.size, args.precision,
                         args.force)
    except (KeyboardInterrupt, Terminated):
        print(f"{ap.prog}: error: interrupted; nothing half-written is left at "
              f"{args.target_checkpoint}", file=sys.stderr)
        raise


def cli(argv: list[str] | None = None) -> None:
    ne.run_cli("slice.py", main, argv)


if __name__ == "__main__":
    cli()
