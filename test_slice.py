"""Tests for slice.py on small random checkpoints (FP8 and BF16) written in the real on-disk format.

The reference for every sliced checkpoint is the source checkpoint run at the same size through
nanoelastic's views; transformers' NemotronHForCausalLM loads the BF16 outputs from disk.
"""

import errno
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import checkpoint
import nanoelastic as ne
import slice as slicer
from nanoelastic import Model
from test_nanoelastic import (CONFIGS, broken_copy, checkpoints, models,  # noqa: F401 (fixtures)
                              small_config, tokens)

ROOT = Path(__file__).parent
EXTRA_FILES = {"tokenizer.json": '{"model": {}}',
               "tokenizer_config.json": '{"chat_template": "{{ x }}"}'}


@pytest.fixture(scope="module")
def sources(checkpoints, tmp_path_factory):
    """The test checkpoints plus what a real release also holds: tokenizer files, a download cache
    and, in the FP8 one, FP8-KV scales and a quantization_config (names from ModelOpt's exports)."""
    root = tmp_path_factory.mktemp("src")
    out = {}
    for key, path in checkpoints.items():
        name, fp8 = key

        def kv_scales(tensors):
            for i, kind in enumerate(CONFIGS[name].layers_block_type):
                if (fp8 and kind == "attention"
                        and f"backbone.layers.{i}.mixer.k_proj.weight" in tensors):
                    tensors[f"backbone.layers.{i}.mixer.k_proj.k_scale"] = torch.tensor(0.5 + i)
                    tensors[f"backbone.layers.{i}.mixer.v_proj.v_scale"] = torch.tensor(0.25 + i)

        src = broken_copy(path, root / path.name, edit=kv_scales)
        for file, text in EXTRA_FILES.items():
            (src / file).write_text(text)
        (src / ".cache" / "huggingface").mkdir(parents=True)
        (src / ".cache" / "huggingface" / "download.lock").write_text("")
        if fp8:
            config = json.loads((src / "config.json").read_text())
            config["quantization_config"] = {"quant_method": "modelopt", "quant_algo": "FP8"}
            (src / "config.json").write_text(json.dumps(config))
        out[key] = src
    return out


def tensors_of(path: Path) -> dict[str, torch.Tensor]:
    index = json.loads((path / "model.safetensors.index.json").read_text())
    out = {}
    for name, shard in index["weight_map"].items():
        with safe_open(path / shard, "pt") as f:
            out[name] = f.get_tensor(name)
    return out


def load(path: Path, dtype=torch.float32) -> Model:
    return Model.from_pretrained(path, device="cpu", dtype=dtype, verbose=False)


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "slice.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def error_of(argv: list) -> str:
    """slice.py's cli() in-process: the message it exits with (what the user sees on stderr)."""
    with pytest.raises(SystemExit) as e:
        slicer.cli(list(map(str, argv)))
    assert isinstance(e.value.code, str) and "\n" not in e.value.code
    return e.value.code


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def dead_pid() -> int:
    """The PID of a process that has exited: what a killed run's leftover folders are named by."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def cannot_remove(monkeypatch, *parts: str) -> None:
    """shutil.rmtree fails, as on a read-only folder, on every folder with one of parts in its
    name."""
    rmtree = shutil.rmtree

    def rmtree_or_fail(path, *args, **kwargs):
        if any(part in Path(path).name for part in parts):
            raise PermissionError(errno.EACCES, "Permission denied", "tokenizer.json")
        rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", rmtree_or_fail)


def warning(path: Path) -> str:
    return f"slice.py: warning: could not remove {path} (Permission denied): remove it by hand"


def messages(err: str) -> list[str]:
    """stderr's lines but the progress ones."""
    return [line for line in err.splitlines() if not line.startswith("slicing: ")]


# --------------------------------------------------------------------------------------------------
# same precision: tensors, config, index, files, and logits equal to the source's views

@pytest.mark.parametrize("key", [("A", True), ("A", False), ("B", True)],
                         ids=["A-fp8", "A-bf16", "B-fp8"])
@pytest.mark.parametrize("size", ["40x16", "32x8"])
def test_slice_equals_views(sources, models, tmp_path, key, size):
    src = sources[key]
    dst = tmp_path / "out"
    summary = slicer.slice_checkpoint(src, dst, size, log=lambda s: None)
    d, f = ne.parse_size(size, CONFIGS[key[0]])

    # config.json: exactly the three fields changed.
    old, new = (json.loads((p / "config.json").read_text()) for p in (src, dst))
    assert {k for k in old.keys() | new.keys() if old.get(k) != new.get(k)} == \
        {"hidden_size", "moe_intermediate_size", "intermediate_size"}
    assert (new["hidden_size"], new["moe_intermediate_size"], new["intermediate_size"]) == (d, f, f)

    # Every other file copied byte for byte; the download cache is not.
    skip = {"config.json", "model.safetensors.index.json"}
    copied = sorted(p.name for p in src.iterdir()
                    if p.suffix != ".safetensors" and p.name not in skip | {".cache"})
    assert "tokenizer.json" in copied and "generation_config.json" in copied
    assert ("hf_quant_config.json" in copied) == key[1]
    for name in copied:
        assert (dst / name).read_bytes() == (src / name).read_bytes(), name
    assert not (dst / ".cache").exists() and leftovers(tmp_path) == []

    # The index names every tensor of the source, in existing shards holding exactly those tensors.
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert shards == sorted(p.name for p in dst.glob("*.safetensors"))
    assert all(s.endswith(f"-of-{len(shards):05d}.safetensors") for s in shards)
    for shard in shards:
        with safe_open(dst / shard, "pt") as sf:
            assert set(sf.keys()) == {n for n, s in index["weight_map"].items() if s == shard}
    before, after = tensors_of(src), tensors_of(dst)
    assert after.keys() == before.keys()
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size()
                                                  for t in after.values())
    assert summary["bytes_written"] == index["metadata"]["total_size"]  # the last tensor too

    # Each tensor is the prefix of the table (shape and values), in its own dtype; scales unchanged.
    for name, t in after.items():
        assert t.dtype == before[name].dtype and t.is_contiguous()
        assert torch.equal(t, ne.nested_view(name, before[name], d, f)), name
    expert = ("backbone.layers.1.mixer.experts.2" if key[0] == "A"
              else "backbone.layers.0.mixer.experts.2")
    assert (after[f"{expert}.up_proj.weight"].shape == (f, d)
            and after[f"{expert}.down_proj.weight"].shape == (d, f))
    scales = [n for n in before if n.endswith(slicer.SCALES)]
    assert bool(scales) == key[1] and all(torch.equal(after[n], before[n]) for n in scales)

    # Loaded by nanoelastic, the sliced checkpoint computes what the source computes at that size.
    sliced = load(dst)
    t = tokens(2, 19, seed=5)
    torch.testing.assert_close(sliced(t), models[key](t, size=size), rtol=1e-5, atol=1e-5)
    assert (summary["params_total"], summary["params_active"]) == models[key].num_params(size)


# --------------------------------------------------------------------------------------------------
# precision

def hf_logits(path: Path, t: torch.Tensor) -> torch.Tensor:
    """transformers' NemotronHForCausalLM, loaded from the folder as a user would."""
    from transformers import NemotronHForCausalLM

    # transformers floors dt at time_step_min in its chunked prefill only; nanoelastic does not
    # (see the README).
    hf = NemotronHForCausalLM.from_pretrained(path, dtype=torch.float32, time_step_min=1e-30).eval()
    with torch.no_grad():
        return hf(t, use_cache=False).logits  # no cache: 5.25 fails on one whose layer 0 keeps none


def test_bf16_from_fp8_dequantizes(sources, tmp_path):
    src, dst = sources[("A", True)], tmp_path / "bf16"
    slicer.slice_checkpoint(src, dst, "40x16", precision="bf16", log=lambda s: None)
    before, after = tensors_of(src), tensors_of(dst)
    # weight, input and k/v scales all dropped
    assert not any(n.endswith(slicer.SCALES) for n in after)
    assert after.keys() == {n for n in before if not n.endswith(slicer.SCALES)}
    assert not any(t.dtype == torch.float8_e4m3fn for t in after.values())
    w = "backbone.layers.1.mixer.experts.5.down_proj.weight"
    expect = (ne.nested_view(w, before[w], 40, 16).float()
              * before[w + "_scale"]).to(torch.bfloat16)
    assert after[w].dtype == torch.bfloat16 and torch.equal(after[w], expect)
    # non-FP8 tensors keep their dtype
    assert after["backbone.layers.1.mixer.gate.weight"].dtype == torch.float32

    old, new = (json.loads((p / "config.json").read_text()) for p in (src, dst))
    assert {k for k in old.keys() | new.keys() if old.get(k) != new.get(k)} == \
        {"hidden_size", "moe_intermediate_size", "intermediate_size", "quantization_config"}
    assert "quantization_config" not in new and not (dst / "hf_quant_config.json").exists()
    assert (dst / "tokenizer.json").is_file()

    # Same weights as the FP8 source dequantised to BF16 on use: at BF16 compute the logits agree.
    t = tokens(2, 19, seed=6)
    source_bf16 = load(src, torch.bfloat16)
    torch.testing.assert_close(load(dst, torch.bfloat16)(t), source_bf16(t, size="40x16"),
                               rtol=1e-5, atol=1e-5)
    # transformers reads the folder as is and agrees with nanoelastic on it (fp32 compute).
    torch.testing.assert_close(hf_logits(dst, t), load(dst)(t), rtol=1e-4, atol=1e-4)


def test_bf16_output_loads_in_transformers(sources, models, tmp_path):
    dst = tmp_path / "out"
    slicer.slice_checkpoint(sources[("B", False)], dst, "32x8", log=lambda s: None)
    t = tokens(2, 19, seed=7)
    torch.testing.assert_close(hf_logits(dst, t), models[("B", False)](t, size="32x8"),
                               rtol=1e-4, atol=1e-4)


def test_fp8_from_bf16_is_refused(sources, tmp_path):
    message = error_of(["--source-checkpoint", sources[("A", False)],
                        "--target-checkpoint", tmp_path / "out",
                        "--size", "40x16", "--precision", "fp8"])
    assert message.startswith("slice.py: error: --precision fp8 needs an FP8 source")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------------
# the presets, the command line, mtp

def test_presets_on_the_real_widths(tmp_path):
    """23B and 12B by name, on a checkpoint with the 30B's hidden and expert FFN widths (few other
    params)."""
    config = small_config("EM*", hidden_size=2688, moe_intermediate_size=1856,
                          intermediate_size=1856, n_routed_experts=2, num_experts_per_tok=1)
    src = checkpoint.write_random_checkpoint(tmp_path / "src", config, shards=2)
    source = load(src)
    t = tokens(1, 9, seed=8)
    # 23B as a user runs it (a subprocess: summary on stdout, progress on stderr), 12B in-process.
    out = run("--source-checkpoint", src, "--target-checkpoint", tmp_path / "23B", "--size", "23B")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == f"wrote {tmp_path / '23B'}: 23B = hidden 2304 x expert FFN 1600, fp8"
    assert [line.split()[0] for line in lines[1:]] == ["tensors", "bytes", "parameters", "time"]
    assert re.search(r"^slicing: wrote shard 2/2$", out.stderr, re.M)  # progress
    slicer.slice_checkpoint(src, tmp_path / "12B", "12B", log=lambda s: None)
    for size, (d, f) in [("23B", (2304, 1600)), ("12B", (1920, 960))]:
        config_out = json.loads((tmp_path / size / "config.json").read_text())
        assert (config_out["hidden_size"], config_out["moe_intermediate_size"]) == (d, f)
        sliced = load(tmp_path / size)
        assert sliced.backbone.layers[0].mixer.experts.up_proj.weight.shape == (2, f, d)
        torch.testing.assert_close(sliced(t), source(t, size=size), rtol=1e-5, atol=1e-5)


def test_mtp_dropped_kv_scales_kept(checkpoints, tmp_path):
    def mtp(tensors):
        if "lm_head.weight" in tensors:
            tensors["mtp.layers.0.eh_proj.weight"] = torch.ones(48, 96, dtype=torch.bfloat16)
            tensors["mtp.layers.0.norm.weight"] = torch.ones(48, dtype=torch.bfloat16)
            tensors["backbone.layers.3.mixer.k_proj.k_scale"] = torch.tensor(0.5)

    src = broken_copy(checkpoints[("A", True)], tmp_path / "src", edit=mtp)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "num_nextn_predict_layers": 1}))
    for precision, kept in [("fp8", True), ("bf16", False)]:
        summary = slicer.slice_checkpoint(src, tmp_path / precision, "32x8", precision,
                                          log=lambda s: None)
        after = tensors_of(tmp_path / precision)
        assert not any(n.startswith("mtp.") for n in after)
        assert summary["dropped"]["mtp.* (no nesting rule for the MTP head)"] == 2
        assert ("backbone.layers.3.mixer.k_proj.k_scale" in after) == kept
        if kept:
            assert after["backbone.layers.3.mixer.k_proj.k_scale"] == 0.5
        config_out = json.loads((tmp_path / precision / "config.json").read_text())
        assert config_out["num_nextn_predict_layers"] == 0


def test_index_metadata_is_kept_and_a_bad_one_dropped(sources, tmp_path):
    """The source index's metadata goes into the slice's (total_size recounted); one that is not an
    object is dropped, not a traceback after every shard was written."""
    import shutil
    for metadata, kept in [({"format": "pt", "total_size": 1}, {"format": "pt"}), ("x", {})]:
        src = tmp_path / f"src-{len(kept)}"
        shutil.copytree(sources[("A", True)], src)
        index = json.loads((src / "model.safetensors.index.json").read_text())
        (src / "model.safetensors.index.json").write_text(json.dumps({**index,
                                                                      "metadata": metadata}))
        dst = tmp_path / f"out-{len(kept)}"
        slicer.slice_checkpoint(src, dst, "32x8", None, log=lambda s: None)
        out = json.loads((dst / "model.safetensors.index.json").read_text())["metadata"]
        assert out == {**kept, "total_size": out["total_size"]} and out["total_size"] > 1


# --------------------------------------------------------------------------------------------------
# safety and errors

def test_target_is_refused_unless_force(sources, tmp_path):
    src, dst = sources[("A", True)], tmp_path / "out"
    dst.mkdir()
    (dst / "old.txt").write_text("old")
    args = ["--source-checkpoint", src, "--target-checkpoint", dst, "--size", "32x8"]
    assert error_of(args) == f"slice.py: error: target exists: {dst} (use --force to replace it)"
    assert (dst / "old.txt").is_file()
    # --force replaces a checkpoint folder only: not a file, nor a folder that holds no checkpoint.
    assert error_of(args + ["--force"]) == (
        f"slice.py: error: target {dst} is a folder but not a checkpoint (no config.json beside "
        f"*.safetensors): --force replaces a checkpoint folder only; remove it yourself or choose "
        f"another target")
    (tmp_path / "file").write_text("keep")
    assert (error_of(["--source-checkpoint", src, "--target-checkpoint", tmp_path / "file",
                      "--size", "32x8", "--force"])
            == f"slice.py: error: target {tmp_path / 'file'} is a file: --force replaces a "
               f"checkpoint folder only")
    assert (dst / "old.txt").is_file() and (tmp_path / "file").read_text() == "keep"
    (tmp_path / "file").unlink()
    for name in ["config.json", "model.safetensors"]:
        (dst / name).write_text("{}")
    slicer.cli(list(map(str, args)) + ["--force"])
    assert (not (dst / "old.txt").exists() and (dst / "config.json").is_file()
            and leftovers(tmp_path) == [])
    (tmp_path / "empty").mkdir()  # an empty folder is replaced too
    slicer.cli(list(map(str, ["--source-checkpoint", src, "--target-checkpoint", tmp_path / "empty",
                              "--size", "32x8", "--force"])))
    assert (tmp_path / "empty" / "config.json").is_file()
    assert (error_of(["--source-checkpoint", src, "--target-checkpoint", src / "sub",
                      "--size", "32x8"])
            == f"slice.py: error: target {src / 'sub'} must be a folder outside the source {src}")



def test_the_output_is_on_disk_before_it_replaces_the_target(sources, tmp_path, monkeypatch):
    """--force over an old checkpoint: every file and folder of the new one is fsynced before the
    rename that puts it in place, and the rename (the parent folder) before the old one is removed;
    a power cut in between leaves one whole checkpoint, old or new."""
    src, dst = sources[("A", True)], tmp_path / "out"
    args = ["--source-checkpoint", src, "--target-checkpoint", dst, "--size", "32x8"]
    slicer.cli(list(map(str, args)))
    synced, events = [], []  # the paths fsynced so far, at each rename and removal
    real_fsync, real_move, real_rmtree = checkpoint.fsync, checkpoint.move_into_place, shutil.rmtree

    def fsync(path):
        synced.append(Path(path))
        real_fsync(path)

    def move_into_place(folder, path):
        events.append(("rename", folder, list(synced)))
        return real_move(folder, path)

    def rmtree(path, *args, **kwargs):
        events.append(("remove", Path(path), list(synced)))
        real_rmtree(path, *args, **kwargs)
    monkeypatch.setattr(checkpoint, "fsync", fsync)
    monkeypatch.setattr(checkpoint, "move_into_place", move_into_place)
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    slicer.cli(list(map(str, args + ["--force"])))
    (_, tmp, before), (_, old, after) = events
    assert tmp.name.startswith(".out.tmp-") and old.name.startswith(".out.old-")
    written = {tmp / p.relative_to(dst) for p in dst.rglob("*")} | {tmp}
    assert len(written) > 5 and written <= set(before), written - set(before)
    assert after[len(before):] == [tmp_path]

def test_interrupted_run_leaves_nothing(sources, tmp_path, monkeypatch, capsys):
    write = checkpoint.write_safetensors

    def interrupted(path, outputs, tensors):  # Ctrl-C once a shard is written
        write(path, outputs, tensors)
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "write_safetensors", interrupted)
    src, dst = sources[("A", True)], tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        slicer.cli(list(map(str, ["--source-checkpoint", src, "--target-checkpoint", dst,
                                   "--size", "32x8"])))
    assert e.value.code == 130  # as a shell reports Ctrl-C
    assert (capsys.readouterr().err
            == f"slice.py: error: interrupted; nothing half-written is left at {dst}\n")
    assert list(tmp_path.iterdir()) == []
    # With --force, an interrupted run leaves the old target as it was.
    dst.mkdir()
    for name in ["old.txt", "config.json", "model.safetensors"]:
        (dst / name).write_text("old")
    with pytest.raises(SystemExit):
        slicer.cli(list(map(str, ["--source-checkpoint", src, "--target-checkpoint", dst,
                                   "--size", "32x8", "--force"])))
    assert ([p.name for p in tmp_path.iterdir()] == ["out"]
            and (dst / "old.txt").read_text() == "old")


def test_interrupted_on_a_terminal(sources, tmp_path, monkeypatch, capsys):
    """The error starts a line of its own, not glued to the progress line it interrupts."""
    write = checkpoint.write_safetensors

    def interrupted(path, outputs, tensors):
        write(path, outputs, tensors)
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "write_safetensors", interrupted)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    dst = tmp_path / "out"
    with pytest.raises(SystemExit):
        slicer.cli(list(map(str, ["--source-checkpoint", sources[("A", True)],
                                   "--target-checkpoint", dst, "--size", "32x8"])))
    err = capsys.readouterr().err
    assert err.startswith("\rslicing: ") and err.endswith(
        f" written\nslice.py: error: interrupted; nothing half-written is left at {dst}\n")


def test_leftovers_not_its_own_are_kept(sources, tmp_path, capsys):
    """Beside the target, slice.py cleans only what it writes, `.NAME.tmp-PID` and `.NAME.old-PID`,
    and only of runs that are gone: a user's `.out.old-keep` or a live process's folders stay, even
    with the target missing, and a lock file a killed run left does not block."""
    src, dst, dead = sources[("A", True)], tmp_path / "out", dead_pid()
    others = [".out.old-keep", ".out.tmp-notes", f".out.old-{dead}-keep",
              f".out.old-{os.getppid()}", f".out.tmp-{os.getppid()}"]
    for name in others:
        (tmp_path / name).mkdir()
        (tmp_path / name / "w.bin").write_text(name)
    (tmp_path / ".out.slice-lock").write_text("")  # a killed run's: the kernel dropped its flock
    args = list(map(str, ["--source-checkpoint", src, "--target-checkpoint", dst,
                          "--size", "32x8"]))
    slicer.cli(args)
    assert (dst / "config.json").is_file() and not (dst / "w.bin").exists()
    assert error_of(args) == f"slice.py: error: target exists: {dst} (use --force to replace it)"
    assert all((tmp_path / name / "w.bin").read_text() == name for name in others)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(others + ["out"])
    # A killed run's: its backup goes back in place if the target is missing, its output goes.
    dst.rename(tmp_path / f".out.old-{dead}")
    (tmp_path / f".out.tmp-{dead}").mkdir()
    capsys.readouterr()
    assert error_of(args).startswith("slice.py: error: target exists")
    tmp = tmp_path / f".out.tmp-{dead}"
    assert capsys.readouterr().out.splitlines() == [
        f"restored {dst}, which an interrupted slice.py --force had moved to .out.old-{dead}",
        f"removed {tmp}, the unfinished output of an interrupted slice.py"]
    # ... and is removed if the new target is in place.
    shutil.copytree(dst, tmp_path / f".out.old-{dead}")
    assert error_of(args).startswith("slice.py: error: target exists")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(others + ["out"])
    assert all((tmp_path / name / "w.bin").read_text() == name for name in others)


def test_force_over_a_target_it_cannot_remove(sources, tmp_path, monkeypatch, capsys):
    """Once the new target is in place, an old one that cannot be removed (read-only) is left and
    named in one line on stderr: the slice succeeds, the lock goes, later runs are not blocked."""
    src, dst = sources[("A", True)], tmp_path / "out"
    args = list(map(str, ["--source-checkpoint", src, "--target-checkpoint", dst, "--force"]))
    slicer.cli(args + ["--size", "32x8"])
    cannot_remove(monkeypatch, ".old-")
    capsys.readouterr()
    slicer.cli(args + ["--size", "40x16"])  # no SystemExit: exit status 0
    old = tmp_path / f".out.old-{os.getpid()}"
    out = capsys.readouterr()
    assert messages(out.err) == [warning(old)] and out.out.startswith(f"wrote {dst}: 40x16")
    assert json.loads((dst / "config.json").read_text())["hidden_size"] == 40
    assert sorted(p.name for p in tmp_path.iterdir()) == [old.name, "out"]  # no lock file
    # Its run gone, the next run tries again, says so, and slices.
    dead = old.rename(tmp_path / f".out.old-{dead_pid()}")
    slicer.cli(args + ["--size", "32x8"])
    assert messages(capsys.readouterr().err) == [warning(dead), warning(old)]
    assert json.loads((dst / "config.json").read_text())["hidden_size"] == 32
    # An error with a folder it cannot remove: that error is the one reported; the lock still goes.
    monkeypatch.undo()
    for folder in dead, old:
        shutil.rmtree(folder)  # by hand, as the warnings say
    cannot_remove(monkeypatch, ".tmp-")

    def disk_full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "write_safetensors", disk_full)
    assert (error_of(args + ["--size", "40x16"])
            == "slice.py: error: [Errno 28] No space left on device")
    assert messages(capsys.readouterr().err) == [warning(tmp_path / f".out.tmp-{os.getpid()}")]
    assert not (tmp_path / ".out.slice-lock").exists()
    assert json.loads((dst / "config.json").read_text())["hidden_size"] == 32


def test_bad_input_errors(sources, tmp_path):
    src = sources[("A", True)]
    expert = "backbone.layers.1.mixer.experts.3.up_proj.weight"

    def drop(t):
        t.pop(expert, None)

    def reshape(t):
        if expert in t:
            t[expert] = t[expert][:, :40].contiguous()

    truncated = broken_copy(src, tmp_path / "e")
    with open(truncated / "model-00001-of-00003.safetensors", "r+b") as file:
        file.truncate(1000)  # an interrupted download
    cases = [
        (tmp_path / "nowhere", "40x16", "source checkpoint folder not found"),
        (truncated, "40x16", "model-00001-of-00003.safetensors is not a valid safetensors file"),
        (broken_copy(src, tmp_path / "a", drop_file="config.json"), "40x16", "missing config"),
        (broken_copy(src, tmp_path / "b", drop_file="model-00002-of-00003.safetensors"), "40x16",
         "missing shard: .*model-00002-of-00003.safetensors"),
        (broken_copy(src, tmp_path / "c", edit=drop), "40x16",
         f"missing tensor in checkpoint: {expert}"),
        (broken_copy(src, tmp_path / "d", edit=reshape), "40x16",
         rf"wrong shape for {expert}: \[24, 40\], expected \[24, 48\]"),
        (src, "XL", "unknown size 'XL'"),
        (src, "23B", "does not fit"),
        (src, "49x8", "does not fit"),
        (src / "config.json", "40x16", "source checkpoint is not a folder"),
        ("", "40x16", "the source checkpoint path is empty"),
    ]
    out = tmp_path / "out"
    for source, size, message in cases:
        error = error_of(["--source-checkpoint", source, "--target-checkpoint", out,
                          "--size", size])
        assert error.startswith("slice.py: error: ")
        assert re.search(message, error), (error, message)
        assert not out.exists() and leftovers(tmp_path) == []
    file = tmp_path / "file"
    file.write_text("")
    not_utf8 = tmp_path / os.fsdecode(b"out\xff")  # refused before any shard is written
    for target, message in [(file / "out", f"target {file / 'out'}: {file} is not a folder"),
                            ("", "the target checkpoint path is empty: give a folder"),
                            (not_utf8, f"target {not_utf8}: the path is not UTF-8, and "
                                       f"safetensors opens only UTF-8 paths")]:
        assert error_of(["--source-checkpoint", src, "--target-checkpoint", target,
                         "--size", "40x16"]) == f"slice.py: error: {message}"
    # As a user sees it: one line on stderr, exit status 1, no traceback.
    proc = run("--source-checkpoint", src, "--target-checkpoint", out, "--size", "99B")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and re.fullmatch(
        r"slice\.py: error: unknown size '99B': use HIDDENxFFN up to \d+x\d+ "
        r"\(this checkpoint's widths\)", lines[0])
    usage = run("--source-checkpoint", src, "--size")  # argparse's usage errors: one line too
    assert usage.returncode == 1 and usage.stderr.strip().splitlines() == [
        "slice.py: error: argument --size: expected one argument (see --help)"]
