"""Tests of bench.py on the CPU: the small config end to end (kernels in Triton's interpreter, the model
with the torch references), and the byte accounting that the bandwidth figures rest on."""

import json
import os
import subprocess
import sys

import pytest
import torch

import bench
import nanoelastic as ne


def test_bench_small_end_to_end(tmp_path):
    out = tmp_path / "bench.json"
    # as a user runs it: no environment variables (on a CPU bench.py runs the kernels in Triton's interpreter)
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "NANOELASTIC_KERNELS")}
    run = subprocess.run([sys.executable, "bench.py", "--small", "--batch", "1", "2", "--json", str(out)],
                         capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(out.read_text())
    assert json.loads(run.stdout.strip().splitlines()[-1]) == result  # the JSON line printed after the tables
    assert result["ceilings"]["copy_GBps"] > 0 and result["ceilings"]["matmul_TFLOPs"] > 0
    kernels = {r["kernel"]: r for r in result["kernel_bench"]}
    assert {"linear", "moe", "ssd", "mamba", "gated"} <= {k.split()[0] for k in kernels}
    assert all(r["rel_err"] < 2e-2 and r["triton_us"] > 0 and r["torch_us"] > 0 for r in kernels.values())

    decode = {(r["model"], r["batch"]): r for r in result["model_bench"]["decode"]}
    assert set(decode) == {(m, b) for b in (1, 2) for m in ("full (view)", "mid (view)", "small (view)",
                                                            "mid (sliced copy)", "small (sliced copy)")}
    for b in (1, 2):
        full, mid, small = (decode[(m, b)]["GB_per_step"] for m in ("full (view)", "mid (view)", "small (view)"))
        assert full > mid > small  # smaller sizes read fewer bytes
        for m in ("mid", "small"):  # a view reads exactly the bytes of its contiguous copy
            assert decode[(f"{m} (view)", b)]["GB_per_step"] == decode[(f"{m} (sliced copy)", b)]["GB_per_step"]
    assert all(r["tok_per_s"] > 0 for r in decode.values())
    assert [r["length"] for r in result["model_bench"]["prefill"]] == [128, 512]
    assert result["model_bench"]["switch"]["reprefill_ms"] > 0


def test_decode_bytes_counts_what_a_step_reads():
    config = ne.DEMO_CONFIG
    with torch.device("meta"):
        model = ne.Model(config)
    cache = ne.Cache(config, 2, 64, "meta", torch.bfloat16)
    moe_layers = [i for i, kind in enumerate(config.layers_block_type) if kind == "moe"]
    touched = {i: 3 for i in moe_layers}
    nbytes = bench.decode_bytes(model, cache, batch=2, touched=touched)
    D, E, Fe = config.hidden_size, config.n_routed_experts, config.moe_intermediate_size
    params = sum(p.numel() for p in model.parameters()) * 4  # meta Parameters are fp32
    untouched = len(moe_layers) * (E - 3) * 2 * Fe * D * 4  # up and down of the experts nobody chose
    embeddings = (config.vocab_size - 2) * D * 4  # only 2 rows read
    kv = sum(t.numel() for s, k in zip(cache.layers, config.layers_block_type) if k == "attention" for t in s) * 2
    mamba = sum(t.numel() * t.element_size() for s, k in zip(cache.layers, config.layers_block_type)
                if k == "mamba" for t in s) * 2
    assert nbytes == params - untouched - embeddings + kv + mamba


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the full benchmark runs")
def test_bench_without_gpu_says_so():
    run = subprocess.run([sys.executable, "bench.py"], capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "no GPU here" in run.stderr and "Traceback" not in run.stderr
