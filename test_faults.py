"""Fault injection: broken configs and tensors (made by editing a small random checkpoint), a slice
target that appears mid-run, two runs on one target, interruptions inside the --force swap, killed
runs' leftovers, a full disk, a GPU without the memory for the weights, SIGTERM, and input that is
not UTF-8. Each case checks the exit code or the error, its one line, and what is left on disk."""

import errno
import json
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import chat
import checkpoint
import nanoelastic as ne
import slice as slicer
from test_nanoelastic import (CONFIGS, broken_copy, checkpoints,  # noqa: F401 (fixtures)
                              release_fp8_linears)

ROOT = Path(__file__).parent
SHARDS = "model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors"


@pytest.fixture(scope="module")
def source(checkpoints):
    return checkpoints[("A", True)]


def one_line_error(fn, *args, **kwargs) -> str:
    with pytest.raises(ne.NanoElasticError) as e:
        fn(*args, **kwargs)
    assert "\n" not in str(e.value)
    return str(e.value)


def slice_main(argv: list, capsys) -> tuple[int | str, str]:
    """slice.py's cli() in-process: (exit code or message, stderr)."""
    with pytest.raises(SystemExit) as e:
        slicer.cli(list(map(str, argv)))
    return e.value.code, capsys.readouterr().err


def listing(folder: Path) -> dict[str, str]:
    """Every file under folder (hidden ones too) -> its text, or its size for binaries."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            out[str(p.relative_to(folder))] = (p.read_text() if p.suffix in (".txt", ".json")
                                               else p.stat().st_size)
    return out


def old_target(folder: Path) -> Path:
    """A user's earlier slice at folder: what --force may replace (a config.json and weights)."""
    folder.mkdir()
    (folder / "config.json").write_text('"the user\'s old slice"')
    (folder / "model.safetensors").write_bytes(b"old")
    return folder


def old_listing(name: str) -> dict[str, str | int]:  # listing() of the folders old_target wrote
    return {f"{name}/config.json": '"the user\'s old slice"', f"{name}/model.safetensors": 3}


# --------------------------------------------------------------------------------------------------
# config.json: every field checked before anything is built, one line naming the field

def edited(config: dict, **changes) -> dict:
    return {**config, **changes}


def without(config: dict, name: str) -> dict:
    return {k: v for k, v in config.items() if k != name}


CONFIG_FAULTS = [  # (edit of config.json, the message expected)
    (lambda c: edited(c, hidden_size="256"), "hidden_size must be int, not '256'"),
    (lambda c: edited(c, n_routed_experts=16.0), "n_routed_experts must be int, not 16.0"),
    (lambda c: edited(c, use_conv_bias=1), "use_conv_bias must be bool, not 1"),
    (lambda c: edited(c, hybrid_override_pattern=7),
     "the layer pattern must be a string or a list"),
    (lambda c: edited(c, hybrid_override_pattern="M" * 200_000),
     "200000 layers, expected 1 to 1000"),
    (lambda c: [c], "config must be a JSON object, not list"),
    (lambda c: edited(c, chunk_size=0), "chunk_size = 0 is out of range (must be >= 1)"),
    (lambda c: edited(c, hidden_size=-48), "hidden_size = -48 is out of range"),
    (lambda c: edited(c, layer_norm_epsilon=0),
     "layer_norm_epsilon = 0 is out of range (must be > 0.0)"),
    (lambda c: edited(c, num_experts_per_tok=9), "num_experts_per_tok (9) > n_routed_experts (8)"),
    (lambda c: edited(c, n_group=2, topk_group=3), "topk_group (3) > n_group (2)"),
    (lambda c: edited(c, n_group=3), "n_routed_experts (8) is not a multiple of n_group (3)"),
    (lambda c: edited(c, n_groups=3), "mamba_num_heads (8) is not a multiple of n_groups (3)"),
    (lambda c: edited(c, time_step_limit=[0.0]), "time_step_limit must be pair of float"),
    (lambda c: edited(c, routed_scaling_factor=math.nan),
     "routed_scaling_factor must be float, not nan"),
    (lambda c: edited(c, layer_norm_epsilon=math.inf), "layer_norm_epsilon must be float, not inf"),
    (lambda c: edited(c, time_step_limit=[math.nan, 1.0]), "time_step_limit must be pair of float"),
    (lambda c: edited(c, time_step_limit=[5.0, 1.0]), "time_step_limit [5.0, 1.0] has min > max"),
    (lambda c: edited(c, n_group=8, topk_group=1), "n_group 8 leaves 1 expert per group"),
    (lambda c: edited(c, n_group=4, topk_group=1, num_experts_per_tok=3),
     "num_experts_per_tok (3) > the 2 experts of the topk_group best groups"),
    (lambda c: edited(c, chunk_size=4097), "chunk_size 4097 > 4096"),
    (lambda c: edited(c, vocab_size=2**62),
     "vocab_size = 4611686018427387904 is out of range (must be at most 2147483647)"),
    (lambda c: edited(c, eos_token_id=[2, 10**30]), "eos_token_id = [2, 10000000000000000000"),
    (lambda c: edited(c, eos_token_id=[]), "eos_token_id must be int or list of int, not []"),
    (lambda c: edited(c, vocab_size=2**30, hidden_size=2**20),
     "its embeddings tensor would have 1.13e+15 elements (more than 1.1e+12)"),
    (lambda c: edited(c, n_routed_experts=2**20, moe_intermediate_size=2**16),
     "its experts tensor would have 3.3e+12"),
    (lambda c: edited(c, num_hidden_layers=52), "num_hidden_layers = 52 but the layer pattern has"),
    (lambda c: edited(c, eos_token_id=[2, 100_000]),
     "eos_token_id [2, 100000] is not below vocab_size"),
    (lambda c: without(c, "hidden_size"), "missing field hidden_size"),
    (lambda c: without(without(c, "vocab_size"), "head_dim"),
     "missing field vocab_size (and 1 more)"),
]


@pytest.mark.parametrize("edit,message", CONFIG_FAULTS,
                         ids=[m.split()[0] for _, m in CONFIG_FAULTS])
def test_bad_config_is_one_line_naming_the_field(source, tmp_path, edit, message):
    ckpt = broken_copy(source, tmp_path / "ckpt")
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps(edit(config)))
    error = one_line_error(ne.Model.from_pretrained, ckpt, device="cpu", verbose=False)
    assert message in error and str(ckpt / "config.json") in error


def test_config_not_utf8_or_unreadable(source, tmp_path, monkeypatch):
    ckpt = broken_copy(source, tmp_path / "ckpt")
    (ckpt / "config.json").write_bytes(b'{"hidden_size": "\xff\xfe"}')
    assert one_line_error(ne.Config.from_file, ckpt / "config.json").endswith("is not UTF-8 text")
    for raw, why in [(b'{"hidden_size": %s}' % (b"1" * 5000), "Exceeds the limit"),
                     (b"[" * 100_000 + b"]" * 100_000, "maximum recursion depth")]:
        (ckpt / "config.json").write_bytes(raw)
        error = one_line_error(ne.Config.from_file, ckpt / "config.json")
        assert re.search(f"config.json is not valid JSON: .*{why}", error), error

    def denied(self):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))
    # root reads any file: deny it the way a user is denied
    monkeypatch.setattr(Path, "read_bytes", denied)
    assert one_line_error(ne.Config.from_file, ckpt / "config.json").endswith("Permission denied")


def test_bad_config_refused_by_slice_before_writing(source, tmp_path, capsys):
    ckpt = broken_copy(source, tmp_path / "ckpt")
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps(edited(config, chunk_size=0)))
    code, _ = slice_main(["--source-checkpoint", ckpt, "--target-checkpoint", tmp_path / "out",
                          "--size", "32x8"], capsys)
    assert code == (f"slice.py: error: {ckpt / 'config.json'}: config: "
                    "chunk_size = 0 is out of range (must be >= 1)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


# --------------------------------------------------------------------------------------------------
# tensors: dtypes outside the format, bad FP8 scales, an index naming the wrong shard, an
# unreadable shard

SCALE = "backbone.layers.1.mixer.experts.2.up_proj.weight_scale"
INPUT_SCALE = "backbone.layers.0.mixer.in_proj.input_scale"  # unused by the model, still checked
NORM = "backbone.layers.0.norm.weight"


def set_tensor(name: str, value: torch.Tensor):
    def edit(tensors):
        if name in tensors:
            tensors[name] = value
    return edit


TENSOR_FAULTS = [
    (NORM, torch.ones(48, dtype=torch.int32),
     f"{NORM} is I32: the format stores it as F8_E4M3 or BF16 or F32"),
    (NORM, torch.ones(48, dtype=torch.float64), f"{NORM} is F64"),
    (NORM, torch.ones(48, dtype=torch.bool), f"{NORM} is BOOL"),
    (SCALE, torch.tensor(1.0, dtype=torch.float64), f"{SCALE} is F64: the format stores it as F32"),
    (SCALE, torch.tensor(float("nan")), f"{SCALE} is nan: an FP8 scale must be finite and > 0"),
    (SCALE, torch.tensor(float("inf")), f"{SCALE} is inf: an FP8 scale must be finite and > 0"),
    (SCALE, torch.tensor(0.0), f"{SCALE} is 0.0: an FP8 scale must be finite and > 0"),
    (SCALE, torch.tensor(-0.5), f"{SCALE} is -0.5: an FP8 scale must be finite and > 0"),
    (SCALE, torch.ones(2), f"wrong shape for {SCALE}: [2], expected a scalar"),  # per channel
    (INPUT_SCALE, torch.tensor(float("nan")),
     f"{INPUT_SCALE} is nan: an FP8 scale must be finite and > 0"),
]


@pytest.mark.parametrize("name,value,message", TENSOR_FAULTS,
                         ids=[m.split(": ")[0][-30:] + str(v.dtype) + str(v.flatten()[0].item())
                              for _, v, m in TENSOR_FAULTS])
def test_bad_tensor_refused_at_load_and_by_slice(source, tmp_path, capsys, name, value, message):
    ckpt = broken_copy(source, tmp_path / "ckpt", edit=set_tensor(name, value))
    error = one_line_error(ne.Model.from_pretrained, ckpt, device="cpu", verbose=False)
    assert message in error
    code, _ = slice_main(["--source-checkpoint", ckpt, "--target-checkpoint", tmp_path / "out",
                          "--size", "32x8"], capsys)
    assert message in code and "\n" not in code
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no target, no temporary folder


@pytest.mark.parametrize("fp8", [True, False], ids=["fp8", "bf16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("size", [None, "40x16"])
def test_placed_bytes_are_what_loading_takes(checkpoints, fp8, dtype, size):
    path = checkpoints[("A", fp8)]
    model = ne.Model.from_pretrained(path, device="cpu", dtype=dtype, verbose=False, size=size)
    with torch.device("meta"):
        whole = ne.Model(CONFIGS["A"])
    fp8_linears = checkpoint.check_checkpoint(whole, path).fp8
    assert bool(fp8_linears) == fp8
    expected = checkpoint.placed_bytes(whole.nested(size), fp8_linears, dtype)
    assert expected == sum(t.nbytes for t in model.state_dict().values())


def test_weights_that_do_not_fit_the_gpu_are_refused_before_loading(source, monkeypatch):
    """On a GPU, the weights' bytes are compared with its free memory before a tensor is read; the
    error names the nested sizes that do fit (the presets do not fit config A: the real config's
    meta model, with the release's FP8 recipe, shows the hints)."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10_000, 80_000))
    with torch.device("meta"):
        model = ne.Model(CONFIGS["A"])
    read = []
    monkeypatch.setattr(checkpoint, "place_tensor", lambda *args: read.append(args))
    message = one_line_error(checkpoint.load_checkpoint, model, source, torch.device("cuda"),
                             torch.bfloat16, False)
    assert re.fullmatch(r"the weights need 0\.0 GB on cuda, which has 0\.0 GB free", message)
    assert read == []
    with torch.device("meta"):
        real = ne.Model(ne.Config())
    fp8 = release_fp8_linears(real.config)
    hints = {  # free bytes -> the hint: the nested sizes that fit in them
        30e9: r": load a nested size alone \(--load SIZE, or size= in from_pretrained\): "
              r"23B \(24\.5 GB\) or 12B \(13\.2 GB\)",
        20e9: r": load .*: 12B \(13\.2 GB\)",
        5e9: r", too little for any nested size \(13\.2 GB at least\)"}
    for free, hint in hints.items():
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 80e9))
        message = one_line_error(checkpoint.check_memory, real, real, fp8, torch.bfloat16,
                                 torch.device("cuda:0"))
        assert re.fullmatch(rf"the weights need 32\.7 GB on cuda:0, which has {free / 1e9:.1f} "
                            rf"GB free{hint}", message), message


def test_out_of_memory_while_loading_is_one_line(source, monkeypatch):
    def out_of_memory(*args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 MiB")
    monkeypatch.setattr(checkpoint, "place_tensor", out_of_memory)
    message = one_line_error(ne.Model.from_pretrained, source, device="cpu")
    assert re.fullmatch(r"out of memory on cpu while loading A-fp8 \(0 of \d+ tensors loaded\): "
                        r"is another process using the GPU\?", message), message


def test_index_naming_the_wrong_shard(source, tmp_path):
    ckpt = broken_copy(source, tmp_path / "ckpt")
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    name = next(n for n, shard in index["weight_map"].items() if shard == SHARDS[0])
    index["weight_map"][name] = SHARDS[1]
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    error = one_line_error(ne.Model.from_pretrained, ckpt, device="cpu", verbose=False)
    assert error == f"{name} is not in {SHARDS[1]}, the shard the index names for it"


# ... and JSON that Python's parser refuses: a number of more than 4300 digits, nesting too deep
@pytest.mark.parametrize("raw, says", [
    (b"\xff\xfe", "is not UTF-8 text"), (b"{", "is not valid JSON: "),
    (b'{"weight_map": %s}' % (b"9" * 5000), "is not valid JSON: "),
    (b"[" * 100_000 + b"]" * 100_000, "is not valid JSON: "),
    (b"[1, 2]", "is not a safetensors index: "),
    (b'{"weight_map": [1]}', "is not a safetensors index: "),
    (b'{"weight_map": {"a": 3}}', "is not a safetensors index: ")])
def test_broken_index(source, tmp_path, raw, says):
    ckpt = broken_copy(source, tmp_path / "ckpt")
    (ckpt / "model.safetensors.index.json").write_bytes(raw)
    error = one_line_error(ne.Model.from_pretrained, ckpt, device="cpu", verbose=False)
    assert error.startswith(f"{ckpt / 'model.safetensors.index.json'} {says}"), error


def test_a_corrupt_one_file_checkpoint_is_named(source, tmp_path):
    """model.safetensors alone (no index), not safetensors: the same one line as a shard's."""
    ckpt = tmp_path / "one"
    ckpt.mkdir()
    (ckpt / "config.json").write_text((source / "config.json").read_text())
    (ckpt / "model.safetensors").write_bytes(b"not safetensors" * 10)
    error = one_line_error(ne.Model.from_pretrained, ckpt, device="cpu", verbose=False)
    assert error.startswith(f"{ckpt / 'model.safetensors'} is not a valid safetensors file (")


def test_a_bad_kernels_setting_fails_before_the_weights_are_read(source, tmp_path, monkeypatch):
    """NANOELASTIC_KERNELS is checked for the device before the (long) load, not at the first
    matmul: here the corrupt weights are never reached."""
    ckpt = tmp_path / "one"
    ckpt.mkdir()
    (ckpt / "config.json").write_text((source / "config.json").read_text())
    (ckpt / "model.safetensors").write_bytes(b"not safetensors" * 10)
    monkeypatch.setattr(ne, "KERNELS", "cuda")
    error = one_line_error(ne.Model.from_pretrained, ckpt, device="cpu", verbose=False)
    assert error == "NANOELASTIC_KERNELS='cuda': use 'torch' or 'triton', or leave it unset"


def test_unreadable_shard_reports_the_true_cause(source, tmp_path, monkeypatch):
    real_open = open

    # root reads any file: deny the shard the way a user is denied
    def denied(file, *args, **kwargs):
        if str(file).endswith(SHARDS[1]):
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)
    monkeypatch.setattr(checkpoint, "open", denied, raising=False)
    error = one_line_error(ne.Model.from_pretrained, source, device="cpu", verbose=False)
    assert error == f"cannot read {source / SHARDS[1]}: Permission denied"


# --------------------------------------------------------------------------------------------------
# slice.py's target: claimed, never replaced or merged unless told, the old one survives any
# interruption

def test_target_appearing_mid_run_is_left_as_it_is(source, tmp_path, monkeypatch, capsys):
    dst, write = tmp_path / "out", checkpoint.write_safetensors

    def someone_creates_the_target(path, outputs, tensors):
        write(path, outputs, tensors)
        if not dst.exists():
            old_target(dst)
    monkeypatch.setattr(checkpoint, "write_safetensors", someone_creates_the_target)
    code, _ = slice_main(["--source-checkpoint", source, "--target-checkpoint", dst,
                          "--size", "32x8"], capsys)
    assert code == (f"slice.py: error: target {dst} appeared while slicing: left as it is; "
                    "nothing was written")
    assert listing(tmp_path) == old_listing("out")


def test_force_leaves_a_file_that_appeared_mid_run(source, tmp_path, monkeypatch, capsys):
    """--force replaces a checkpoint folder only, checked again before the swap: a file that
    appeared at the target while slicing is left as it is."""
    dst, write = tmp_path / "out", checkpoint.write_safetensors

    def someone_writes_a_file(path, outputs, tensors):
        write(path, outputs, tensors)
        if not dst.exists():
            dst.write_text("notes")
    monkeypatch.setattr(checkpoint, "write_safetensors", someone_writes_a_file)
    code, _ = slice_main(["--source-checkpoint", source, "--target-checkpoint", dst,
                          "--size", "32x8", "--force"], capsys)
    assert code == (f"slice.py: error: target {dst} is a file: --force replaces a checkpoint "
                    f"folder only")
    assert listing(tmp_path) == {"out": 5}


def test_second_run_on_the_same_target_is_refused(source, tmp_path, capsys):
    dst = tmp_path / "out"
    lock = slicer.lock_target(dst)  # a first run, in the middle of writing
    try:
        code, _ = slice_main(["--source-checkpoint", source, "--target-checkpoint", dst,
                              "--size", "32x8"], capsys)
        assert code == (f"slice.py: error: another slice.py is writing {dst}: wait for it, "
                        "or choose another target")
        # the first run's lock only
        assert sorted(p.name for p in tmp_path.iterdir()) == [".out.slice-lock"]
    finally:
        slicer.unlock_target(dst, lock)
    # once it is done, the target is free
    slicer.slice_checkpoint(source, dst, "32x8", log=lambda s: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_two_concurrent_processes_one_wins(source, tmp_path):
    dst = tmp_path / "out"
    argv = [sys.executable, str(ROOT / "slice.py"), "--source-checkpoint", str(source),
            "--target-checkpoint", str(dst), "--size", "32x8"]
    runs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    results = [(p.wait(timeout=120), p.stderr.read().strip().splitlines()[-1:]) for p in runs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 1], results  # exactly one wrote the target; the other said why it did not
    refused = next(lines for code, lines in results if code == 1)
    assert refused in ([f"slice.py: error: another slice.py is writing {dst}: wait for it, "
                        "or choose another target"],
                       [f"slice.py: error: target exists: {dst} (use --force to replace it)"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    checkpoint.check_checkpoint(ne.Model(ne.Config.from_file(dst / "config.json")).to("meta"), dst)


@pytest.mark.parametrize("call", [1, 2], ids=["old-moved-aside", "new-moved-in"])
def test_force_swap_interrupted_keeps_the_old_target(source, tmp_path, monkeypatch, capsys, call):
    dst, calls = old_target(tmp_path / "out"), []

    def interrupted(rename):  # Ctrl-C at the chosen rename of the swap, before it happens
        def wrapped(src, to):
            calls.append(src)
            if len(calls) == call:
                raise KeyboardInterrupt
            return rename(src, to)
        return wrapped
    monkeypatch.setattr(Path, "rename", interrupted(Path.rename))  # the old target moved aside
    monkeypatch.setattr(checkpoint, "rename_no_replace", interrupted(checkpoint.rename_no_replace))
    code, err = slice_main(["--source-checkpoint", source, "--target-checkpoint", dst,
                            "--size", "32x8", "--force"], capsys)
    assert code == 130
    assert (err.splitlines()[-1]
            == f"slice.py: error: interrupted; nothing half-written is left at {dst}")
    assert listing(tmp_path) == old_listing("out")


def test_killed_runs_leftovers_restored_or_removed(source, tmp_path, capsys):
    """A run killed (SIGKILL) between the swap's renames left the old target aside, and one killed
    while writing left its temporary folder: the next run puts the first back and removes the
    second."""
    dst = tmp_path / "out"
    old_target(tmp_path / ".out.old-999999")
    (tmp_path / ".out.tmp-999998").mkdir()
    (tmp_path / ".out.tmp-999998" / "model-00001-of-00002.safetensors").write_bytes(b"\0" * 100)
    code, _ = slice_main(["--source-checkpoint", source, "--target-checkpoint", dst,
                          "--size", "32x8"], capsys)
    assert code == f"slice.py: error: target exists: {dst} (use --force to replace it)"
    assert listing(tmp_path) == old_listing("out")
    # Killed after the swap (while removing the backup): the new target stays, the backup goes.
    (tmp_path / ".out.old-999997").mkdir()
    log = []
    slicer.slice_checkpoint(source, tmp_path / "new", "32x8", log=log.append)
    slicer.slice_checkpoint(source, dst, "32x8", force=True, log=log.append)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "out"]
    assert listing(tmp_path / "out") == listing(tmp_path / "new")
    assert any(line.startswith(f"removed {tmp_path / '.out.old-999997'}, the old target")
               for line in log)


def test_symlinked_target_refused_up_front(source, tmp_path, capsys):
    real, link = old_target(tmp_path / "real"), tmp_path / "out"
    link.symlink_to(real)
    for force in ([], ["--force"]):
        code, _ = slice_main(["--source-checkpoint", source, "--target-checkpoint", link,
                              "--size", "32x8", *force], capsys)
        assert code == (f"slice.py: error: target {link} is a symbolic link: "
                        "give the path of the folder itself")
        assert (link.readlink() == real
                and listing(tmp_path) == old_listing("real"))


# --------------------------------------------------------------------------------------------------
# a full disk: one line with the cause, nothing half-written

def test_full_disk_while_slicing(source, tmp_path, monkeypatch, capsys):
    """The disk fills while writing the second shard (simulated: a write fails with ENOSPC)."""
    dst, write, shards = old_target(tmp_path / "out"), checkpoint.write_safetensors, []

    def disk_full(path, outputs, tensors):
        shards.append(path)
        if len(shards) == 2:
            path.write_bytes(b"\0" * 64)  # a partial file, as a full disk leaves one
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        write(path, outputs, tensors)
    monkeypatch.setattr(checkpoint, "write_safetensors", disk_full)
    code, _ = slice_main(["--source-checkpoint", source, "--target-checkpoint", dst,
                          "--size", "40x16", "--force"], capsys)
    assert code == f"slice.py: error: [Errno 28] No space left on device: '{shards[1]}'"
    assert listing(tmp_path) == old_listing("out")


def test_full_disk_while_writing_the_demo_checkpoint(tmp_path, monkeypatch):
    """chat.py's demo checkpoint, tokenizer.json included, appears whole or not at all."""
    def disk_full(self, path, *args):
        Path(path).write_text('{"trunc')
        raise OSError(errno.ENOSPC, "No space left on device", path)
    monkeypatch.setattr(type(chat.demo_tokenizer()), "save", disk_full)
    with pytest.raises(OSError, match="No space left on device"):
        chat.write_demo_checkpoint(tmp_path / "demo")
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def small_disk(tmp_path):
    """A real 2 MB filesystem (tmpfs), where the machine lets us mount one (root, Linux)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root); "
                    "test_full_disk_* above simulate ENOSPC instead")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def test_really_full_disk(small_disk, tmp_path):
    """The demo checkpoint (about 7 MB) on a 2 MB disk: one line, and the disk is left empty."""
    result = subprocess.run([sys.executable, str(ROOT / "chat.py"), "--demo",
                             "--ckpt", str(small_disk / "demo"), "--prompt", "hi"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "No space left on device" in result.stderr
    *banner, error = result.stderr.splitlines()  # the demo banner goes to stderr in one-shot mode
    assert error.startswith("chat.py: error:") and "No space left on device" in error
    assert banner[0].startswith("DEMO:") and "Traceback" not in result.stderr
    assert list(small_disk.iterdir()) == []


def test_folder_appearing_while_a_checkpoint_is_written(tmp_path):
    """Two demo runs writing the same folder: the second to finish leaves the first's output as it
    is."""
    path = tmp_path / "demo"
    chat.write_demo_checkpoint(path)
    first = listing(path)
    path_again = tmp_path / "demo2"
    error = one_line_error(checkpoint.write_random_checkpoint, path_again, ne.DEMO_CONFIG,
                           extra_files=lambda folder: chat.write_demo_checkpoint(path_again))
    assert error == f"{path_again} appeared while it was written (another run?): left as it is"
    assert (listing(path_again) == first
            and sorted(p.name for p in tmp_path.iterdir()) == ["demo", "demo2"])


# --------------------------------------------------------------------------------------------------
# the chat: text that is not UTF-8, SIGTERM

def run_chat(*args, stdin=b"", env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "chat.py"), "--demo", *args], input=stdin,
                          capture_output=True, timeout=120, env=env)


def test_not_utf8_input_is_replaced_and_the_chat_goes_on(tmp_path):
    ckpt = tmp_path / "demo"
    chat.write_demo_checkpoint(ckpt)
    one_shot = run_chat("--ckpt", ckpt, "--max-new-tokens", "4",
                        "--prompt", os.fsdecode(b"hi \xff\xfe there"))
    assert one_shot.returncode == 0 and b"Traceback" not in one_shot.stderr
    replies = re.compile(rb"^\[think \S+: \d+ tok", re.M)  # a reply's status line
    assert len(replies.findall(one_shot.stderr)) == 1
    piped = run_chat("--ckpt", ckpt, "--max-new-tokens", "4", "--interactive",
                     stdin=b"caf\xe9 \xff\n/help\nsecond line\n")
    assert piped.returncode == 0 and b"Traceback" not in piped.stderr
    assert "caf\ufffd \ufffd".encode() in piped.stdout  # echoed with replacement characters
    assert len(replies.findall(piped.stdout)) == 2  # both lines answered


def test_sigterm_removes_the_demo_checkpoint(tmp_path):
    temp = tmp_path / "temp"
    temp.mkdir()
    proc = subprocess.Popen([sys.executable, str(ROOT / "chat.py"), "--demo", "--interactive"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "TMPDIR": str(temp)})
    try:
        # until the chat waits for input, its checkpoint written and loaded
        for line in proc.stdout:
            if line.startswith(b"nanoelastic chat:"):
                break
        assert any(temp.iterdir())  # the demo checkpoint is there ...
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 143
    finally:
        proc.kill()
    assert b"Traceback" not in proc.stderr.read()
    assert list(temp.iterdir()) == []  # ... and gone


def test_move_into_place_never_replaces_what_appears_at_the_target(tmp_path, monkeypatch):
    """An empty folder made at the target after every check (here: the checks are blinded) is left
    as it is: the rename itself refuses to replace (renameat2 with RENAME_NOREPLACE)."""
    new, target = tmp_path / "new", tmp_path / "target"
    new.mkdir()
    (new / "model.safetensors").write_text("new")
    target.mkdir()  # rename() would silently replace an empty folder
    monkeypatch.setattr(os.path, "lexists", lambda path: False)
    assert checkpoint.move_into_place(new, target) is False
    assert list(target.iterdir()) == [] and (new / "model.safetensors").read_text() == "new"
    monkeypatch.undo()
    target.rmdir()
    assert (checkpoint.move_into_place(new, target) is True
            and (target / "model.safetensors").exists())


def test_slice_to_the_current_folder_is_one_line(source, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for target in (".", "", "./"):
        code, _ = slice_main(["--source-checkpoint", source, "--target-checkpoint", target,
                              "--size", "40x16"], capsys)
        assert code.startswith("slice.py: error: ") and "\n" not in code, code


def test_a_killed_demo_writers_folder_is_removed_by_the_next_run(tmp_path):
    """kill -9 while the demo checkpoint is written leaves `.NAME.tmp-PID-*`; the next run removes
    the folders of dead processes (and leaves those of live ones)."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    left = tmp_path / f".demo.tmp-{dead.pid}-abc"
    live = tmp_path / f".demo.tmp-{os.getppid()}-xyz"  # pytest's parent: alive
    for folder in (left, live):
        folder.mkdir()
        (folder / "model-00001-of-00002.safetensors").write_bytes(b"half")
    chat.write_demo_checkpoint(tmp_path / "demo")
    assert not left.exists() and live.exists() and (tmp_path / "demo" / "config.json").exists()
