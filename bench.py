"""
bench.py: measured speed of nanoelastic on the device it runs on, as a table and then as JSON.

    python bench.py                   # kernels, then the model: 52-layer 30B, random FP8 weights
    python bench.py --only kernels    # each kernel vs its torch reference and the device's ceilings
    python bench.py --only model      # decode, prefill, size switch, memory
    python bench.py --small           # a small config and small shapes: runs anywhere, a CPU too
                                      # (there the kernels run interpreted: slow, but checked)
    python bench.py --budget P.jsonl  # accuracy against latency of think/answer sizes and
                                      # budgets (section 5)

Every number is measured here, beside what it is compared with: the device's ceilings (a
device-to-device copy for bandwidth, a large matmul for FLOP/s) and, for kernels, the torch
reference. Each kernel's error against its reference is measured before its time; one that differs
fails the run at the end, after the rest was measured. Decode reads its bytes from the weights the
step really touches (the chosen experts, not all 128), the KV cache (all of it: an upper bound,
as a step reads the positions up to its own, and these caches hold little more than the prompt and
the steps) and the Mamba states; the achieved bandwidth is those bytes over the step time. A
profile of the batch-1 step, at the end, says where its time goes: kernels against the gaps between
them, and each kernel's share (and bandwidth, for the matmuls and the SSM step). Each result is
also printed to stderr as it is measured, and --json is written however the run ends.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import signal
import sys
import time
from collections import Counter
from contextlib import contextmanager
from decimal import Decimal
from fractions import Fraction
from itertools import chain
from pathlib import Path

if __name__ == "__main__":  # Ctrl-C while torch imports (seconds): nothing to undo yet, exit
    signal.signal(signal.SIGINT, lambda signum, frame: os._exit(130))  # (run_cli restores it)

import numpy as np
import torch
from torch import Tensor

CUDA = torch.cuda.is_available()
# the Triton kernels can only run in Triton's interpreter here; set before triton is imported
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import checkpoint  # noqa: E402
import nanoelastic as ne  # noqa: E402 (after TRITON_INTERPRET)
from nanoelastic import NanoElasticError  # noqa: E402

DEVICE = torch.device("cuda" if CUDA else "cpu")


def timed(fn, iters: int, warmup: int = 2) -> float:
    """Median seconds per call of fn()."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if CUDA:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def copy_like(t: Tensor) -> Tensor:
    """A copy with the same values and strides: a nested view stays a strided view."""
    if t._base is None:
        return t.clone()
    return t._base.clone().as_strided(t.shape, t.stride(), t.storage_offset())


def input_copies(args: tuple, nbytes: int) -> list[tuple]:
    """args, and on a GPU enough copies of its tensors that one call over each overflows the L2
    cache four times: the timed bytes then come from device memory, as a model's do."""
    if not CUDA:
        return [args]
    tensors = [a for a in args if isinstance(a, Tensor)]
    held = sum((t if t._base is None else t._base).nbytes for t in tensors)  # bytes a copy holds
    l2 = torch.cuda.get_device_properties(DEVICE).L2_cache_size
    n = max(1, min(math.ceil(4 * l2 / nbytes), 64, int(8e9 // held)))
    return [args] + [tuple(copy_like(a) if isinstance(a, Tensor) else a for a in args)
                     for _ in range(n - 1)]


def kernel_seconds(fn, arg_sets: list[tuple], iters: int) -> tuple[float, str]:
    """(median seconds per call, how it was timed), a call on each input set in turn. On a GPU:
    replays of a CUDA graph of those calls, so that launch gaps do not swamp a kernel of a few
    microseconds (a decode step replays its kernels the same way); eager calls where fn
    synchronises with the host and cannot be captured (the MoE reference)."""
    def eager():
        for args in arg_sets:
            fn(*args)
    if not CUDA:
        eager()  # warm-up
        return timed(eager, iters, warmup=0) / len(arg_sets), "eager"
    stream = torch.cuda.Stream()  # warm-up (compilation, allocations) off the capturing stream,
    stream.wait_stream(torch.cuda.current_stream())  # as DecodeGraph does
    with torch.cuda.stream(stream):
        eager()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    try:
        torch.cuda.set_sync_debug_mode("error")
        fn(*arg_sets[0])
        syncs = False
    except RuntimeError:
        syncs = True
    finally:
        torch.cuda.set_sync_debug_mode("default")
    if syncs:
        return timed(eager, iters) / len(arg_sets), "eager"
    # no fallback if this fails: a capture cut short can leave the stream unusable
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        eager()
    return timed(graph.replay, iters) / len(arg_sets), "graph"


TOLERANCE = 2e-2  # relative error of a kernel against its torch reference (bf16 on a GPU)


def rel_err(out, ref) -> float:
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


# --------------------------------------------------------------------------------------------------
# 1. The device's ceilings

def ceilings(small: bool) -> dict:
    n = (64 if small else 1024) * 2 ** 20  # bytes copied
    src = torch.empty(n, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    copy_s = timed(lambda: dst.copy_(src), 5 if small else 20)
    m = 512 if small else 8192
    dtype = torch.float32 if small and not CUDA else torch.bfloat16
    a, b = (torch.randn(m, m, device=DEVICE, dtype=dtype) for _ in range(2))
    mm_s = timed(lambda: a @ b, 3 if small else 20)
    return {"copy_GBps": 2 * n / copy_s / 1e9, "matmul_TFLOPs": 2 * m ** 3 / mm_s / 1e12,
            "matmul_dtype": str(dtype)}


# --------------------------------------------------------------------------------------------------
# 2. Kernels: correctness first, then time against the torch reference and the ceilings

def kernel_cases(small: bool):
    """(label, kernel name, args, bytes read, flops) at the real 30B shapes, or small ones."""
    c = ne.DEMO_CONFIG if small else ne.Config()
    D, E, Fe, k = c.hidden_size, c.n_routed_experts, c.moe_intermediate_size, c.num_experts_per_tok
    d, f = ne.parse_size("192x96" if small else "23B", c)
    g = torch.Generator(device=DEVICE).manual_seed(0)
    randn = lambda *s, dtype=torch.bfloat16: torch.randn(*s, device=DEVICE, generator=g).to(dtype)
    fp8 = lambda *s: checkpoint.fp8_quantize(randn(*s, dtype=torch.float32) / s[-1] ** 0.5)
    cases = []

    w, s = fp8(c.in_proj_dim, D)
    for rows in (1, 32, 512 if small else 4096):
        x = randn(rows, D)
        flops = 2 * rows * w.numel()
        cases.append((f"linear fp8 {rows}x{D} @ {c.in_proj_dim}x{D}", "linear", (x, w, s),
                      w.numel() + x.numel() * 2, flops))
    w_out, s_out = fp8(D, c.mamba_inner)  # few output columns: a narrow grid at decode
    for name, how in (("linear", "split K"), ("linear_unsplit", "K unsplit")):
        cases.append((f"linear fp8 1x{c.mamba_inner} @ out_proj {D}x{c.mamba_inner}, {how}", name,
                      (randn(1, c.mamba_inner), w_out, s_out), w_out.numel(), 2 * w_out.numel()))
    w_bf16 = randn(c.vocab_size, D)
    cases.append((f"linear bf16 1x{D} @ lm_head", "linear", (randn(1, D), w_bf16, None),
                  w_bf16.numel() * 2, 2 * w_bf16.numel()))
    view = w[:, :d]  # the 23B's nested view vs the same bytes contiguous
    cases.append((f"linear fp8 1x{d} nested view", "linear", (randn(1, d), view, s),
                  view.numel(), 2 * view.numel()))
    cases.append((f"linear fp8 1x{d} contiguous", "linear", (randn(1, d), view.contiguous(), s),
                  view.numel(), 2 * view.numel()))

    # stacked weights, scales [E]
    per_expert = lambda ws: (torch.stack([w for w, _ in ws]), torch.stack([s for _, s in ws]))
    up = per_expert([fp8(Fe, D) for _ in range(E)])
    down = per_expert([fp8(D, Fe) for _ in range(E)])
    for n in (1, 32):
        x = randn(n, D)
        weights = torch.rand(n, k, device=DEVICE, generator=g)
        experts = torch.rand(n, E, device=DEVICE, generator=g).topk(k).indices
        touched = experts.unique().numel()
        cases.append((f"moe fp8 {n} tok top-{k} of {E}", "moe_experts",
                      (x, weights, experts, up[0], up[1], down[0], down[1]),
                      touched * 2 * Fe * D, 2 * n * k * 2 * Fe * D))
    for n in (1, 32):
        logits = randn(n, E, dtype=torch.float32)
        cases.append((f"select experts {n} tok top-{k} of {E}", "select_experts",
                      (logits, randn(E, dtype=torch.float32), c), logits.numel() * 4, None))
    upv, downv = up[0][:, :f, :d], down[0][:, :d, :f]
    cases.append((f"moe fp8 1 tok nested {d}x{f}", "moe_experts",
                  (randn(1, d), weights[:1], experts[:1], upv, up[1], downv, down[1]),
                  k * 2 * f * d, 2 * k * 2 * f * d))

    H, P, G, N = c.mamba_num_heads, c.mamba_head_dim, c.n_groups, c.ssm_state_size
    T = 64 if small else 8192
    # bf16, as the model passes them
    x, B, C = randn(1, T, H, P), randn(1, T, G, N), randn(1, T, G, N)
    dt = torch.nn.functional.softplus(randn(1, T, H, dtype=torch.float32) - 2)
    A = -torch.rand(H, device=DEVICE, generator=g) * 4
    cases.append((f"ssd scan T={T}", "ssd_chunked", (x, dt, A, B, C, c.chunk_size),
                  (x.numel() + 2 * B.numel()) * 2 + x.numel() * 4, None))

    ch = c.conv_dim
    step_args = lambda: (randn(1, ch), randn(1, H), randn(1, ch, c.conv_kernel - 1),
                         randn(1, H, P, N, dtype=torch.float32), randn(ch, 1, c.conv_kernel),
                         randn(ch), randn(H, dtype=torch.float32), randn(H, dtype=torch.float32),
                         randn(H, dtype=torch.float32), G, (0.0, math.inf))
    cases.append(("mamba decode step", "mamba_step", step_args(), 2 * H * P * N * 4, None))
    Hq, Hkv, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    window = 512 if small else 32768
    kv = lambda: randn(1, Hkv, window, hd)
    position = torch.tensor(window - 100, device=DEVICE)
    cases.append((f"decode attention at {window - 100} of {window}", "decode_attention",
                  (randn(1, Hq, 1, hd), randn(1, Hkv, 1, hd), randn(1, Hkv, 1, hd), kv(), kv(),
                   position, window), 2 * Hkv * (window - 100) * hd * 2, None))
    for rows in (1, 512 if small else 8192):
        # as in Mamba: fp32 scan output, bf16 gate and result
        cases.append((f"gated rms_norm {rows}x{c.mamba_inner}", "rms_norm",
                      (randn(rows, c.mamba_inner, dtype=torch.float32), randn(c.mamba_inner),
                       1e-5, G, randn(rows, c.mamba_inner)),
                      rows * c.mamba_inner * (4 + 2 + 2), None))
    return cases


def linear_unsplit(x: Tensor, weight: Tensor, weight_scale: Tensor | None = None) -> Tensor:
    """kernels.linear with K never split: beside the split row, what the split buys."""
    import nanoelastic_kernels as kernels
    k_splits = kernels._k_splits
    kernels._k_splits = lambda *args: 1
    try:
        return kernels.linear(x, weight, weight_scale)
    finally:
        kernels._k_splits = k_splits


def bench_kernels(small: bool, ceil: dict):
    """Yields a row per kernel case as it is measured. A kernel that differs from its reference
    (relative error over TOLERANCE) is timed all the same: main() reports it, and fails, at the
    end, so that one wrong kernel does not cost the rest of a run."""
    try:
        import nanoelastic_kernels as kernels
    except ImportError as e:
        print(f"bench.py: no kernel table: Triton is not installed here ({e})", file=sys.stderr)
        return
    variants = {"linear_unsplit": (linear_unsplit, ne.linear.reference)}
    for label, name, args, nbytes, flops in kernel_cases(small):
        triton_fn, reference = variants.get(name) or (getattr(kernels, name),
                                                      getattr(ne, name).reference)
        # fresh copies of the arguments (some ops work in place), nested views kept as views
        fresh = lambda: tuple(copy_like(a) if isinstance(a, Tensor) else a for a in args)
        out, ref = triton_fn(*fresh()), reference(*fresh())
        out, ref = (out[0], ref[0]) if isinstance(out, tuple) else (out, ref)
        err = rel_err(out, ref)
        iters = 1 if small else 20
        arg_sets = input_copies(args, nbytes)
        t_triton, _ = kernel_seconds(triton_fn, arg_sets, iters)
        t_torch, torch_timing = kernel_seconds(reference, arg_sets, iters)
        del arg_sets
        row = {"kernel": label, "rel_err": err, "triton_us": t_triton * 1e6,
               "torch_us": t_torch * 1e6, "torch_timing": torch_timing,
               "speedup": t_torch / t_triton, "GBps": nbytes / t_triton / 1e9}
        row["pct_copy_bw"] = 100 * row["GBps"] / ceil["copy_GBps"]
        if flops:
            row["TFLOPs"] = flops / t_triton / 1e12
            row["pct_matmul"] = 100 * row["TFLOPs"] / ceil["matmul_TFLOPs"]
        yield row


# --------------------------------------------------------------------------------------------------
# 3. The model: decode at batch 1/8/32 per size, prefill, size switch, memory

def contiguous_copy(model: ne.Model, size: str) -> ne.Model:
    """A standalone model of `size` whose weights are contiguous copies of the nested views (what
    slice.py writes), to compare with the views."""
    view = model.nested(size)
    with torch.device("meta"):
        copy = ne.Model(view.config)
    for name, t in chain(view.named_parameters(), view.named_buffers()):
        checkpoint.assign_tensor(copy, name, t.contiguous().clone())
    return copy


def experts_touched(model: ne.Model, cache: ne.Cache, tokens: torch.Tensor) -> dict[int, int]:
    """Run one eager decode step and count, per MoE layer, the distinct experts its router chose."""
    counts, hooks = {}, []
    for i, layer in enumerate(model.backbone.layers):
        if isinstance(layer.mixer, ne.MoE):
            hook = lambda m, args, out, i=i: counts.__setitem__(i, out[1].unique().numel())
            hooks.append(layer.mixer.gate.register_forward_hook(hook))
    try:
        model(tokens, cache)
    finally:
        for h in hooks:
            h.remove()
    return counts


def decode_bytes(model: ne.Model, cache: ne.Cache, batch: int,
                 touched: dict[int, int]) -> dict[str, int]:
    """Bytes one decode step reads, by what reads them: each weight of this size once, except that
    of the embeddings only `batch` rows and of the routed experts only those chosen; the whole KV
    cache; the Mamba states twice (read, written). "linear" is what the matmul kernel reads."""
    parts = Counter()
    linears = {name for name, m in model.named_modules() if isinstance(m, ne.Linear)}
    for name, t in chain(model.named_parameters(), model.named_buffers()):
        nbytes = t.numel() * t.element_size()
        if "embeddings" in name:
            nbytes = batch * t.shape[1] * t.element_size()
        elif ".experts." in name and "shared" not in name:
            nbytes = nbytes // t.shape[0] * touched[int(name.split(".")[2])]
        parts["linear" if name.rsplit(".", 1)[0] in linears else "other weights"] += nbytes
    for kind, state in zip(cache.kinds, cache.layers):
        for t in state or ():
            nbytes = t.numel() * t.element_size()
            if kind == "attention":
                parts["kv cache"] += nbytes
            else:  # a Mamba state: read and written
                parts["mamba states"] += 2 * nbytes
    return dict(parts)


def warm_decoder(model: ne.Model, size: str | None, batch: int, prompt: int, steps: int):
    """A cache holding a random `prompt`-token prefill with room for `steps` more, the decode step
    on it (graph captured), its next tokens, and the bytes a step reads (decode_bytes)."""
    view = model.nested(size)
    cache = model.new_cache(batch, prompt + steps + 8)
    g = torch.Generator(device=DEVICE).manual_seed(batch)
    tokens = torch.randint(0, model.config.vocab_size, (batch, prompt), device=DEVICE, generator=g)
    ne.prefill(model, tokens, cache, size)
    parts = decode_bytes(view, cache, batch, experts_touched(view, cache, tokens[:, -1:]))
    step, token = ne.DecodeGraph(model, cache), tokens[:, -1:]
    for _ in range(3):  # warm up (and capture the graph)
        token = step(token, size).argmax(-1, keepdim=True)
    return step, token, parts


def seconds_per_step(step: ne.DecodeGraph, token: torch.Tensor, size: str | None,
                     steps: int) -> float:
    if CUDA:
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        # stays on the device: no host round trip
        token = step(token, size).argmax(-1, keepdim=True)
    if CUDA:
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / steps


def bench_decode(model: ne.Model, size: str | None, batch: int, steps: int, prompt: int, ceil: dict,
                 label: str) -> dict:
    step, token, parts = warm_decoder(model, size, batch, prompt, steps)
    nbytes = sum(parts.values())
    seconds = seconds_per_step(step, token, size, steps)
    gbps = nbytes / seconds / 1e9
    cache_bytes = sum(t.nbytes for state in step.cache.layers for t in state or ())
    return {"model": label, "batch": batch, "tok_per_s": batch / seconds, "step_ms": seconds * 1e3,
            "GB_per_step": nbytes / 1e9, "GBps": gbps,
            "pct_copy_bw": 100 * gbps / ceil["copy_GBps"],
            "ceiling_tok_per_s": batch * ceil["copy_GBps"] * 1e9 / nbytes,
            "cache_GB": cache_bytes / 1e9}


def kernel_timeline(intervals: list[tuple[str, float, float]], steps: int, step_us: float,
                    nbytes: dict[str, int], copy_GBps: float) -> dict:
    """Where `steps` decode steps of step_us each went, from the kernels' (name, start us, end us):
    the time some kernel ran (the union of the intervals) against the step, the rest gaps between
    kernels; per kernel name, its launches and microseconds per step, its share of the step, the
    idle time just before its launches (what a launch of it costs beyond its run: what fusing it
    into the kernel before would save, at most) and, for the names that nbytes gives bytes per
    step for (by prefix), its bandwidth."""
    busy, end, idle_before = 0.0, -math.inf, Counter()
    for name, start, stop in sorted(intervals, key=lambda i: i[1]):
        if end > -math.inf:  # the first has none before it
            idle_before[name] += max(0.0, start - end)
        busy += max(0.0, stop - max(start, end))
        end = max(end, stop)
    totals, launches = Counter(), Counter()
    for name, start, stop in intervals:
        totals[name] += stop - start
        launches[name] += 1
    rows = []
    for name, us in totals.most_common():
        row = {"kernel": name[:80], "per_step": launches[name] / steps, "us_per_step": us / steps,
               "pct_step": 100 * us / steps / step_us, "idle_before_us": idle_before[name] / steps}
        for prefix, b in nbytes.items():
            if name.startswith(prefix) and us > 0:
                row["GBps"] = b / row["us_per_step"] / 1e3
                row["pct_copy_bw"] = 100 * row["GBps"] / copy_GBps
        rows.append(row)
    return {"step_us": step_us, "kernel_us": busy / steps, "gap_us": step_us - busy / steps,
            "launches_per_step": len(intervals) / steps, "kernels": rows}


def profile_decode(model: ne.Model, size: str, ceil: dict, steps: int = 20) -> dict:
    """Batch-1 decode at `size` as a GPU runs it (graph replays), kernel by kernel from
    torch.profiler's timeline: what bounds decode where it falls short of the copy bandwidth. (On a
    CPU, the top-level torch ops of eager steps.)"""
    from torch.profiler import ProfilerActivity, profile
    step, token, parts = warm_decoder(model, size, 1, 256, steps)
    with profile(activities=[ProfilerActivity.CUDA if CUDA else ProfilerActivity.CPU]) as prof:
        step_us = seconds_per_step(step, token, size, steps) * 1e6
    kernels = (e for e in prof.events()
               if (e.device_type == torch.autograd.DeviceType.CUDA if CUDA
                   else e.cpu_parent is None))
    intervals = [(e.name, e.time_range.start, e.time_range.end) for e in kernels]
    if not intervals:
        raise RuntimeError("the profiler recorded no kernels")
    nbytes = {"_matmul_kernel": parts["linear"], "_mamba_step_kernel": parts["mamba states"]}
    timeline = kernel_timeline(intervals, steps, step_us, nbytes, ceil["copy_GBps"])
    what = "CUDA kernels of graph replays" if CUDA else "top-level torch ops of eager steps"
    return {"model": size, "timeline": what, **timeline}


def bench_prefill(model: ne.Model, size: str | None, length: int, chunk: int) -> dict:
    tokens = torch.randint(0, model.config.vocab_size, (1, length), device=DEVICE)
    cache = model.new_cache(1, length)

    def prefill():
        cache.reset()
        ne.prefill(model, tokens, cache, size, chunk)  # in pieces, as generate() does
    seconds = timed(prefill, 2 if CUDA else 1, warmup=1)
    return {"length": length, "tok_per_s": length / seconds, "seconds": seconds}


def bench_switch(model: ne.Model, think: str, answer: str, thought: int, chunk: int) -> dict:
    """After `thought` tokens at `think`, the cost of going on at `answer`. Transplant: the next
    decode step at the new size on the same cache, against a step at that size after one at that
    size (the difference is what the switch itself costs); re-prefill: rebuilding the cache at the
    new size."""
    cache = model.new_cache(1, thought + 16)
    tokens = torch.randint(0, model.config.vocab_size, (1, thought), device=DEVICE)
    step = ne.DecodeGraph(model, cache)
    token = tokens[:, -1:]

    def step_after(before: str) -> float:  # seconds of a step at `answer` after one at `before`
        cache.reset()
        ne.prefill(model, tokens[:, :-1], cache, think, chunk)
        step(token, before)
        if CUDA:
            torch.cuda.synchronize()
        t = time.perf_counter()
        step(token, answer)
        if CUDA:
            torch.cuda.synchronize()
        return time.perf_counter() - t

    def reprefill():
        cache.reset()
        ne.prefill(model, tokens, cache, answer, chunk)
    step_after(think), step_after(answer)  # warm up: capture both sizes' graphs
    median = lambda before: sorted(step_after(before) for _ in range(5))[2]
    t_switch, t_same = median(think), median(answer)
    t_reprefill = timed(reprefill, 2 if CUDA else 1, warmup=1)
    return {"thought_tokens": thought, "transplant_ms": t_switch * 1e3,
            "same_size_step_ms": t_same * 1e3, "switch_overhead_ms": (t_switch - t_same) * 1e3,
            "reprefill_ms": t_reprefill * 1e3}


def bench_model(small: bool, ceil: dict, batches: list[int], out: dict) -> None:
    """Fills `out` as it measures: what a failure stops short of is missing, the rest stays."""
    config = ne.DEMO_CONFIG if small else ne.Config()
    sizes = ["256x128", "224x112", "192x96"] if small else ["30B", "23B", "12B"]
    names = ["full", "mid", "small"] if small else sizes
    t = time.perf_counter()
    model = checkpoint.random_model(config, DEVICE, torch.bfloat16 if CUDA else torch.float32,
                                    fp8=True, seed=0)
    print(f"random FP8 model of {'the small demo config' if small else 'the 30B config'} "
          f"made on {DEVICE} in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    steps, prompt = (4, 16) if small else (128, 256)
    out["weights_GB"] = (sum(t.numel() * t.element_size()
                              for t in chain(model.parameters(), model.buffers())) / 1e9)
    decode = out["decode"] = []
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    for batch in batches:  # every size as views of the one model, each with its cache
        for size, name in zip(sizes, names):
            progress(decode, bench_decode(model, size, batch, steps, prompt, ceil,
                                          f"{name} (view)"))
    out["largest_cache_GB"] = max(r["cache_GB"] for r in decode)
    if CUDA:
        out["peak_memory_GB"] = torch.cuda.max_memory_allocated() / 1e9
    for size, name in zip(sizes[1:], names[1:]):
        sliced = contiguous_copy(model, size)
        for batch in batches:
            progress(decode, bench_decode(sliced, None, batch, steps, prompt, ceil,
                                          f"{name} (sliced copy)"))
        del sliced  # freed here: nothing refers back to it
        if CUDA:
            torch.cuda.empty_cache()
    chunk = 8192
    for row in decode:  # the views' cost: their tokens/s against the sliced copies'
        copy = [r for r in decode if r["model"] == row["model"].replace("(view)", "(sliced copy)")
                and r["batch"] == row["batch"]]
        if copy and row is not copy[0]:
            row["pct_of_sliced"] = 100 * row["tok_per_s"] / copy[0]["tok_per_s"]
    progress(out, bench_switch(model, sizes[1], sizes[0], 256 if small else 4096, chunk),
             "switch")
    # the 32K prompt goes in 8K chunks: attention after a cached prefix
    prefill = out["prefill"] = []
    for n in (128, 512) if small else (2048, 8192, 32768):
        progress(prefill, bench_prefill(model, None, n, chunk))
    # Last, so that the numbers above stand without them: where the time of a step goes ...
    optional("decode profile", lambda: progress(  # (e.g. no CUPTI)
        out, profile_decode(model, sizes[0], ceil, 20 if CUDA else 2), "profile"))
    # ... and what programmatic dependent launch (off by default until measured) hides of the
    # gaps between its kernels (on Hopper and later: before, kernels.PDL launches without it)
    if CUDA and ne.kernels is not None and ne.kernels.hopper_or_later(torch.device("cuda")):
        ne.kernels.PDL = True
        try:
            optional("PDL row", lambda: progress(decode, bench_decode(
                model, sizes[0], 1, steps, prompt, ceil, f"{names[0]} (view, PDL)")))
        finally:
            ne.kernels.PDL = False


def optional(what: str, measure) -> None:
    """One of the closing measurements: a failure is reported and skipped, the run goes on (but
    not SIGTERM's, which C code may have turned into another exception: see ne.run_cli)."""
    try:
        measure()
    except Exception as e:  # noqa: BLE001
        if ne.Terminated.received:
            raise
        print(f"bench.py: no {what}: {type(e).__name__}: {e}", file=sys.stderr)


def progress(into: list | dict, row: dict, key: str | None = None) -> None:
    """Keep a result (appended to a list, or at `key` of a dict), then show it on stderr: a run cut
    short still shows what it measured, and its JSON holds all it showed."""
    if key is None:
        into.append(row)
    else:
        into[key] = row
    print(f"bench.py: {json.dumps(row)}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------
# 4. Report

def table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """columns: (key, header, format)."""
    cells = ([[h for _, h, _ in columns]]
             + [[format(r[k], f) if k in r else "" for k, _, f in columns] for r in rows])
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    return "\n".join("  ".join(c.rjust(w) if i else c.ljust(w)
                               for i, (c, w) in enumerate(zip(row, widths)))
                     for row in cells)


def profile_report(p: dict) -> str:
    head = (f"batch-1 decode of the {p['model']}, by {p['timeline']} (torch.profiler): "
            f"{p['step_us']:.0f} us a step, kernels busy {p['kernel_us']:.0f} "
            f"us, gaps {p['gap_us']:.0f} us, {p['launches_per_step']:.0f} launches")
    return head + "\n" + table(p["kernels"][:15], [
        ("kernel", "kernel", "s"), ("per_step", "per step", ".3g"),
        ("us_per_step", "us/step", ".1f"), ("pct_step", "% step", ".1f"),
        ("idle_before_us", "us idle before", ".1f"), ("GBps", "GB/s", ".0f"),
        ("pct_copy_bw", "% copy", ".0f")])


def main(argv: list[str] | None = None) -> dict:
    p = ne.ArgumentParser(prog="bench.py", description=__doc__.split("\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=["kernels", "model"], help="run one part")
    p.add_argument("--small", action="store_true", help="small config and shapes (CPU)")
    p.add_argument("--batch", type=int, nargs="+", default=None,
                   help="decode batch sizes (default 1 8 32; with --small 1 8)")
    p.add_argument("--json", metavar="FILE", help="also write the JSON here")
    plain = set(vars(p.parse_args([])))
    add_budget_args(p)
    args = p.parse_args(argv)
    if not args.budget:
        given = sorted(d for d in set(vars(args)) - plain if getattr(args, d) != p.get_default(d))
        if given:
            p.error(f"--{given[0].replace('_', '-')} is an option of --budget PROBLEMS.jsonl")
    elif args.only or args.small or args.batch or args.json:
        p.error("--only, --small, --batch and --json are not options of --budget")
    if args.json and Path(args.json).is_dir():
        p.error(f"--json {args.json}: is a folder; give a file name")
    if args.json and not os.access(Path(args.json).resolve().parent, os.W_OK):
        p.error(f"--json {args.json}: its folder does not exist or is not writable")
    if args.batch and min(args.batch) < 1:
        p.error(f"--batch {' '.join(map(str, args.batch))}: each batch size must be >= 1")
    if args.budget:
        return run_budget(args, argv)
    if not CUDA and not args.small:
        p.error("no GPU here: the full-size benchmark needs one (try --small)")
    device_name = (torch.cuda.get_device_name() if CUDA
                   else f"CPU ({torch.get_num_threads()} threads)")
    result = {"date": time.strftime("%Y-%m-%d"), "device": device_name, "torch": torch.__version__,
              "kernels": "triton" if ne.use_kernels(torch.empty(0, device=DEVICE)) else "torch",
              "command": " ".join(["python", "bench.py",
                                   *(argv if argv is not None else sys.argv[1:])])}
    try:
        measure(args, result)
    finally:  # an error, Ctrl-C or a timeout's SIGTERM (run_cli) stops it: what was measured stays
        if args.json:
            write_atomic(Path(args.json),
                         lambda tmp: tmp.write_text(json.dumps(result, indent=1)))
    print("\n" + json.dumps(result))
    wrong = [r["kernel"] for r in result.get("kernel_bench", []) if r["rel_err"] > TOLERANCE]
    if wrong:
        raise SystemExit(f"bench.py: error: Triton and the torch reference differ (relative "
                         f"error over {TOLERANCE:g}): {', '.join(wrong)}")
    return result


def measure(args: argparse.Namespace, result: dict) -> None:
    """The tables, each printed once measured; `result` filled as the numbers come."""
    if CUDA:  # CUPTI started before any CUDA graph is captured: graphs captured before it may fault
        # or go missing under the profile at the end (pytorch/pytorch#75504)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]):
            pass
    ceil = result["ceilings"] = ceilings(args.small)
    print(f"# {result['date']}  {result['device']}  torch {torch.__version__}  "
          f"kernels: {result['kernels']}")
    print(f"# ceilings: copy {ceil['copy_GBps']:.0f} GB/s, "
          f"matmul {ceil['matmul_TFLOPs']:.3g} TFLOP/s ({ceil['matmul_dtype']})")
    if args.only in (None, "kernels"):
        rows = result["kernel_bench"] = []
        for row in bench_kernels(args.small, ceil):
            progress(rows, row)
        print("\n" + table(rows, [
            ("kernel", "kernel", "s"), ("rel_err", "rel err", ".1e"),
            ("triton_us", "triton us", ".1f"), ("torch_us", "torch us", ".1f"),
            ("torch_timing", "torch timed", "s"), ("speedup", "x torch", ".1f"),
            ("GBps", "GB/s", ".0f"), ("pct_copy_bw", "% copy", ".0f"),
            ("TFLOPs", "TFLOP/s", ".1f"), ("pct_matmul", "% mm", ".0f")]))
        if CUDA:
            print("(Triton: CUDA-graph replays over input copies that overflow L2; torch the same,"
                  " or eager calls where its reference syncs with the host)")
    if args.only in (None, "model"):
        m = result["model_bench"] = {}
        bench_model(args.small, ceil, args.batch or ([1, 8] if args.small else [1, 8, 32]), m)
        print("\n" + table(sorted(m["decode"], key=lambda r: r["batch"]), [
            ("model", "decode", "s"), ("batch", "batch", "d"), ("tok_per_s", "tok/s", ".1f"),
            ("step_ms", "ms/step", ".2f"), ("GB_per_step", "GB/step", ".3f"),
            ("GBps", "GB/s", ".0f"), ("pct_copy_bw", "% copy", ".0f"),
            ("ceiling_tok_per_s", "ceiling tok/s", ".0f"),
            ("pct_of_sliced", "% of sliced", ".0f")]))
        print("\n" + table(m["prefill"], [("length", "prefill tokens", "d"),
                                          ("tok_per_s", "tok/s", ".0f"), ("seconds", "s", ".3f")]))
        s = m["switch"]
        print(f"\nsize switch after {s['thought_tokens']} thinking tokens: transplant "
              f"{s['transplant_ms']:.2f} ms for the first step at the new size, against "
              f"{s['same_size_step_ms']:.2f} ms for a step without a switch (the switch: "
              f"{s['switch_overhead_ms']:+.2f} ms); re-prefill {s['reprefill_ms']:.1f} ms")
        if "peak_memory_GB" in m:
            print(f"peak GPU memory, the three sizes as views decoding with their caches: "
                  f"{m['peak_memory_GB']:.1f} GB (weights {m['weights_GB']:.1f} GB, the largest "
                  f"cache {m['largest_cache_GB']:.2f} GB)")
        if "profile" in m:
            print("\n" + profile_report(m["profile"]))


# --------------------------------------------------------------------------------------------------
# 5. Budget control: accuracy against latency of think/answer sizes and thinking budgets, on a
#    user's problems (python bench.py --budget PROBLEMS.jsonl). Each problem is one chat turn, as
#    chat.py replies: the THINK size thinks until it writes </think> or the budget forces it, then
#    the ANSWER size answers.

BUDGET_CONFIGS = "30B:30B,23B:30B,23B:23B,12B:30B,12B:12B"
BUDGET_THINK = "512,2048,8192"
ANSWER_ROOM = 4096  # default --max-new-tokens: the largest budget plus this much for the answer
DEMO_THINK, DEMO_MAX_NEW = "8,32", 64  # the demo's: random weights are slow on a CPU and never stop
# 1,000 and 3.5 are one number each
NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+")
DECIMAL = re.compile(r"-?(?:\d+(?:\.\d*)?|\.\d+)")


def add_budget_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("budget control (--budget PROBLEMS.jsonl: accuracy against latency)")
    g.add_argument("--budget", metavar="PROBLEMS.jsonl",
                   help='one {"question": ..., "answer": ...} a line: '
                   "solve each with every --configs at every --think-budgets")
    g.add_argument("--configs", default=BUDGET_CONFIGS, metavar="T:A,...",
                   help="THINK:ANSWER sizes (default %(default)s)")
    g.add_argument("--think-budgets", metavar="N,...",
                   help=f"thinking budgets: after N tokens </think> is "
                   f"written for the model (default {BUDGET_THINK}; demo {DEMO_THINK})")
    g.add_argument("--switch", default="transplant", choices=["transplant", "reprefill"],
                   help="at </think>: keep the caches (transplant) "
                   "or rebuild them with the answer size")
    g.add_argument("--max-new-tokens", type=int, metavar="N", help="per reply, thinking included "
                   f"(default: the largest budget + {ANSWER_ROOM}; demo {DEMO_MAX_NEW})")
    g.add_argument("--limit", type=int, metavar="N", help="the first N problems only")
    g.add_argument("--temperature", type=float, default=1.0, metavar="T",
                   help="default 1.0 with --top-p 1.0: the model card's advice for reasoning; "
                   "0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling")
    g.add_argument("--seed", type=int, default=0,
                   help="problem i samples with seed + i (default 0)")
    g.add_argument("--ckpt", metavar="DIR", help="checkpoint folder, found as chat.py finds it")
    g.add_argument("--load", metavar="SIZE", help="read only this size's weights, as chat.py "
                   "--load does: every configuration's sizes must fit in it")
    g.add_argument("--demo", action="store_true",
                   help="chat.py's small random checkpoint (accuracy: meaningless)")
    g.add_argument("--out", default="budget_results", metavar="DIR",
                   help="results.jsonl (one line per reply done: a rerun goes on from there), "
                   "results.json and frontier.png (default %(default)s)")


def fail(message: str):
    raise SystemExit(f"bench.py: error: {message}")


# -- grading ---------------------------------------------------------------------------------------

def boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} whose braces balance (a cut-off last box: the one
    before)."""
    for m in reversed(list(re.finditer(r"\\boxed\s*\{", text))):
        depth = 1
        for j in range(m.end(), len(text)):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            if depth == 0:
                return text[m.end():j]
    return None


def extract_answer(text: str) -> str | None:
    """The final answer of a reply: the last \\boxed{...}, else the last number, else None."""
    found = boxed(text)
    if found is None:
        numbers = NUMBER.findall(text)
        found = numbers[-1] if numbers else None
    return found


def normalize(answer: str) -> str:
    """Spaces, $, \\text{}, thin spaces, %, a trailing period and a leading `x =` out;
    1,000 -> 1000; \\frac12 -> \\frac{1}{2}."""
    s = re.sub(r"\\(?:text|textbf|mathrm)\{([^{}]*)\}", r"\1", answer)
    for old, new in (("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("{,}", ","), ("\\!", ""),
                     ("\\,", ""), ("\\%", ""), ("%", ""), ("\\$", ""), ("$", "")):
        s = s.replace(old, new)
    s = re.sub(r"\s+", "", s).rstrip(".")
    s = re.sub(r"^[A-Za-z]\w*=(?!=)", "", s)  # x=4: the value
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    return s.replace(",", "") if NUMBER.fullmatch(s) else s


def rational(answer: str) -> Fraction | None:
    """A normalized answer as an exact number: a decimal, a/b or \\frac{a}{b}; else None."""
    if DECIMAL.fullmatch(answer):
        return Fraction(Decimal(answer))
    m = re.fullmatch(r"(-?)(?:(\d+)/(\d+)|\\frac\{(\d+)\}\{(\d+)\})", answer)
    if m is None:
        return None
    p, q = (m[2], m[3]) if m[2] else (m[4], m[5])
    return None if int(q) == 0 else Fraction(int(m[1] + p), int(q))


def is_correct(predicted: str | None, reference) -> bool:
    """Equal after normalize(), as exact numbers when both are (1000 == 1000.0, 0.5 == 1/2 ==
    \\frac{1}{2}). A boxed reference: its box."""
    if predicted is None:
        return False
    reference = str(reference)
    a, b = normalize(predicted), normalize(boxed(reference) or reference)
    x, y = rational(a), rational(b)
    return x == y if x is not None and y is not None else a == b


# -- one problem -----------------------------------------------------------------------------------

def load_problems(path: str, limit: int | None) -> list[dict]:
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        fail(f"cannot read {path}: {e.strerror}")
    except UnicodeDecodeError:
        fail(f"{path} is not UTF-8 text")
    problems = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            p = json.loads(line)
        except json.JSONDecodeError as e:
            fail(f"{path} line {n}: not JSON ({e.msg})")
        except (ValueError, RecursionError) as e:  # a >4300-digit number, nesting too deep
            fail(f"{path} line {n}: not JSON ({str(e)[:200]})")
        if not (isinstance(p, dict) and isinstance(p.get("question"), str) and p["question"].strip()
                and isinstance(p.get("answer"), (str, int, float))
                and not isinstance(p["answer"], bool)):
            fail(f'{path} line {n}: expected {{"question": "...", "answer": ...}} '
                 "(a non-empty question, a text or number answer)")
        problems.append({"question": p["question"], "answer": str(p["answer"])})
    if not problems:
        fail(f"{path} holds no problems")
    return problems[:limit]


def solve(model: ne.Model, tokenizer, step: ne.DecodeGraph, prompt: list[int], think: str,
          answer: str, budget: int, args: argparse.Namespace,
          seed: int) -> tuple[dict, list[ne.Token]]:
    """One reply to `prompt` (chat.render_chat's, thinking on), timed: think at `think` (a model
    size), answer at `answer`. Returns its measurements and its tokens. Ctrl-C (which ends
    generate()'s stream) raises KeyboardInterrupt: a cut reply is not a result."""
    switch = ne.Switch(answer, on_token=tokenizer.think_end, after=budget, mode=args.switch)
    step.cache.reset()
    tokens, times = [], []
    t0 = time.perf_counter()
    for token in ne.generate(model, prompt, args.max_new_tokens, size=think, switch=switch,
                             stop_tokens=tokenizer.stop, temperature=args.temperature,
                             top_p=args.top_p, seed=seed, cache=step):
        tokens.append(token)
        times.append(time.perf_counter() - t0)
    ids = [t.id for t in tokens]
    finished = bool(ids) and ids[-1] in tokenizer.stop
    if not finished and len(ids) < args.max_new_tokens:
        raise KeyboardInterrupt
    body = ids[:-1] if finished else ids
    end = body.index(tokenizer.think_end) if tokenizer.think_end in body else len(body)  # </think>
    thought, said = body[:end], body[end + 1:]
    last = len(ids) - 1
    # decode steps of each phase (the first token's time is the first token's)
    think_steps = min(end, last)
    reply = tokenizer.decode(said)
    predicted = extract_answer(reply)
    return {"predicted": predicted, "think_tokens": len(thought), "answer_tokens": len(said),
            "budget_hit": end < len(body) and len(thought) >= budget, "finished": finished,
            "latency_s": times[-1], "first_token_s": times[0],
            "think_steps": think_steps, "think_s": times[think_steps] - times[0],
            "answer_steps": last - think_steps, "answer_s": times[last] - times[think_steps],
            "reply": reply}, tokens


# -- the run ---------------------------------------------------------------------------------------

def parse_configs(text: str) -> list[tuple[str, str]]:
    configs = [tuple(ne.size_name(s) for s in c.split(":")) for c in text.split(",") if c.strip()]
    if not configs or any(len(c) != 2 or not all(c) for c in configs):  # any case, as chat.py
        fail(f"--configs {text!r}: expected THINK:ANSWER pairs separated by commas, "
             "e.g. 23B:30B,12B:12B")
    return list(dict.fromkeys(configs))


def parse_budgets(text: str) -> list[int]:
    try:
        budgets = [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        budgets = []
    if not budgets or min(budgets) < 0:
        fail(f"--think-budgets {text!r}: expected token counts >= 0 separated by commas, "
             "e.g. 512,2048")
    return sorted(set(budgets))


def read_results(path: Path) -> dict[tuple, dict]:
    """The replies done so far, by key, graded again. A line cut by a crash mid-write is dropped
    (and cut from the file)."""
    if not path.exists():
        return {}
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        data = data[:data.rfind(b"\n") + 1]
        with open(path, "r+b") as f:
            f.truncate(len(data))
    done = {}
    for line in data.decode("utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
            # graded again: a reply kept from an earlier run counts as this grader says
            record["correct"] = is_correct(record["predicted"], record["reference"])
            done[tuple(record["key"])] = record
        except (ValueError, RecursionError, KeyError, TypeError):
            fail(f"{path} has a line that is not one of this script's results: move the file away")
    return done


def write_atomic(path: Path, write) -> None:
    """write(temp_path), then rename over path: readers see the old file or the new one, never half
    of one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def summarize(records: list[dict], configs: list[tuple[str, str]],
              budgets: list[int]) -> list[dict]:
    """One row per (configuration, budget) with results, and which rows are on the Pareto frontier:
    no other row is as fast and at least as accurate."""
    rows = []
    for think, answer in configs:
        for budget in budgets:
            rs = [r for r in records
                  if (r["think"], r["answer"], r["budget"]) == (think, answer, budget)]
            if not rs:
                continue
            latency = [r["latency_s"] for r in rs]
            rate = lambda phase: (sum(r[f"{phase}_steps"] for r in rs) / seconds
                                  if (seconds := sum(r[f"{phase}_s"] for r in rs)) > 0 else None)
            rows.append({"think": think, "answer": answer, "budget": budget, "problems": len(rs),
                         "accuracy": sum(r["correct"] for r in rs) / len(rs),
                         "latency_mean_s": sum(latency) / len(rs),
                         "latency_p90_s": float(np.percentile(latency, 90)),  # interpolated
                         "first_token_mean_s": sum(r["first_token_s"] for r in rs) / len(rs),
                         "think_tokens_mean": sum(r["think_tokens"] for r in rs) / len(rs),
                         "answer_tokens_mean": sum(r["answer_tokens"] for r in rs) / len(rs),
                         "think_tok_per_s": rate("think"), "answer_tok_per_s": rate("answer"),
                         "budget_hit": sum(r["budget_hit"] for r in rs) / len(rs),
                         "unfinished": sum(not r["finished"] for r in rs)})
    best = -1.0
    for row in sorted(rows, key=lambda r: (r["latency_mean_s"], -r["accuracy"])):
        row["frontier"] = row["accuracy"] > best
        best = max(best, row["accuracy"])
    return rows


def plot_frontier(rows: list[dict], path: Path, title: str) -> str:
    """Accuracy against mean latency, a line per configuration through its budgets, the frontier
    dashed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return ("no plot: matplotlib is not installed (pip install matplotlib); "
                "the table and JSON are written")
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    for think, answer in dict.fromkeys((r["think"], r["answer"]) for r in rows):
        rs = [r for r in rows if (r["think"], r["answer"]) == (think, answer)]
        ax.plot([r["latency_mean_s"] for r in rs], [100 * r["accuracy"] for r in rs], "o-",
                label=f"think {think} → answer {answer}")
        for r in rs:
            ax.annotate(str(r["budget"]), (r["latency_mean_s"], 100 * r["accuracy"]), fontsize=7,
                        textcoords="offset points", xytext=(4, 4))
    front = sorted((r for r in rows if r["frontier"]), key=lambda r: r["latency_mean_s"])
    ax.plot([r["latency_mean_s"] for r in front], [100 * r["accuracy"] for r in front], "k--",
            marker="o", markersize=11, markerfacecolor="none", drawstyle="steps-post", linewidth=1,
            label="Pareto frontier")
    ax.set_ylim(-4, 104)
    ax.set_xlabel("mean latency per problem (s)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return f"plot: {path}"


def budget_table(rows: list[dict]) -> str:
    rows = [{**{k: v for k, v in r.items() if v is not None},  # no time in a phase: an empty cell
             "config": f"{r['think']}:{r['answer']}", "accuracy_pct": 100 * r["accuracy"],
             "budget_hit_pct": 100 * r["budget_hit"], "on_frontier": "*" if r["frontier"] else ""}
            for r in rows]
    return table(rows, [
        ("config", "think:answer", "s"), ("budget", "budget", "d"), ("problems", "n", "d"),
        ("accuracy_pct", "acc %", ".1f"), ("latency_mean_s", "latency s", ".2f"),
        ("latency_p90_s", "p90 s", ".2f"),
        ("think_tokens_mean", "think tok", ".0f"), ("answer_tokens_mean", "answer tok", ".0f"),
        ("think_tok_per_s", "think tok/s", ".1f"), ("answer_tok_per_s", "answer tok/s", ".1f"),
        ("budget_hit_pct", "budget hit %", ".0f"), ("on_frontier", "frontier", "s")])


@contextmanager
def locked(folder: Path):
    """Hold folder/.lock: two runs appending to the same results.jsonl would interleave their
    lines."""
    with open(folder / ".lock", "w") as lock:
        try:
            import fcntl
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # not on Unix: no lock
            pass
        except OSError:
            fail(f"another bench.py --budget run is writing to {folder}")
        yield


def budget_plan(args: argparse.Namespace) -> tuple[list, list, list, dict, Path | None]:
    """--budget's arguments, checked before anything loads: (configurations, budgets, problems,
    the demo's size names, the checkpoint folder or None for the demo). Sets --max-new-tokens, and
    --load to the model's name of that size."""
    import chat
    configs = parse_configs(args.configs)
    if args.think_budgets is None:
        args.think_budgets = DEMO_THINK if args.demo else BUDGET_THINK
    budgets = parse_budgets(args.think_budgets)
    if args.max_new_tokens is None:
        args.max_new_tokens = DEMO_MAX_NEW if args.demo else max(budgets) + ANSWER_ROOM
    if args.max_new_tokens < 1:
        fail(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.limit is not None and args.limit < 1:
        fail(f"--limit must be >= 1, got {args.limit}")
    try:
        ne.check_sampling(args.temperature, args.top_p, 0, chat.SAMPLING_FLAGS)
    except ne.NanoElasticError as e:
        fail(str(e))
    if max(budgets) + 1 >= args.max_new_tokens:
        fail(f"--max-new-tokens {args.max_new_tokens} leaves no room to answer "
             f"after a budget of {max(budgets)}")
    problems = load_problems(args.budget, args.limit)
    most = ne.MAX_SEED + 1 - len(problems)  # problem i samples with seed + i
    if not 0 <= args.seed <= most:
        fail(f"--seed must be in 0..{most} ({len(problems)} problems), got "
             f"{args.seed}")
    try:
        size_names = chat.DEMO_SIZES if args.demo else {}
        if args.demo:
            chat.check_demo_folder(args.ckpt)
        ckpt = None if args.demo else chat.find_checkpoint(args.ckpt)
        config = chat.demo_config() if args.demo else ne.Config.from_file(ckpt / "config.json")
        if args.load:
            args.load = ne.model_size(args.load, config, size_names)
            config = config.sliced(*ne.parse_size(args.load, config))
        for size in {s for c in configs for s in c}:  # every size, before the (long) load
            ne.model_size(size, config, size_names)
    except NanoElasticError as e:
        fail(str(e))
    if args.max_new_tokens >= config.max_position_embeddings:  # (the prompts' lengths: once loaded)
        fail(f"--max-new-tokens {args.max_new_tokens} leaves no room for a prompt in the model's "
             f"{config.max_position_embeddings} positions")
    return configs, budgets, problems, size_names, ckpt


def run_budget(args: argparse.Namespace, argv: list[str] | None) -> dict:
    import chat
    configs, budgets, problems, size_names, ckpt = budget_plan(args)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        fail(f"--out {out} is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    if args.demo:
        print("DEMO: random weights, so accuracy is meaningless; the sizes, the budgets, "
              "the switch and the timing are real. 30B/23B/12B stand for the nested sizes "
              f"{'/'.join(chat.DEMO_SIZES.values())}.", flush=True)

    # A reply's key: everything that decides it; a rerun reuses the replies whose keys it asks for.
    settings = {"checkpoint": "demo" if args.demo else str(ckpt.resolve()), "switch": args.switch,
                "temperature": args.temperature, "top_p": args.top_p, "seed": args.seed,
                "max_new_tokens": args.max_new_tokens}
    if args.load:  # the same replies, but timed on another model: not the views' results
        settings["load"] = args.load
    problem_ids = [hashlib.sha1(json.dumps([p["question"], p["answer"]]).encode()).hexdigest()[:12]
                   for p in problems]
    key = lambda think, answer, budget, i: (*settings.values(), think, answer, budget, i,
                                            problem_ids[i])
    wanted = [(t, a, b, i) for t, a in configs for b in budgets for i in range(len(problems))]
    results = out / "results.jsonl"
    with locked(out):
        in_file = read_results(results)
        # this run's part of the file
        done = {key(*w): in_file[key(*w)] for w in wanted if key(*w) in in_file}
        print(f"{len(configs)} configurations x {len(budgets)} budgets x "
              f"{len(problems)} problems = "
              f"{len(wanted)} replies" + (f", {len(done)} already in {results}" if done else ""),
              file=sys.stderr, flush=True)
        try:
            interrupted = solve_all(args, problems, wanted, key, size_names, results, done)
        except NanoElasticError as e:
            fail(str(e))
    records = [done[key(*w)] for w in wanted if key(*w) in done]
    rows = summarize(records, configs, budgets)

    device_name = torch.cuda.get_device_name() if CUDA else "CPU"
    result = {"date": time.strftime("%Y-%m-%d"), "device": device_name, "torch": torch.__version__,
              "command": " ".join(["python", "bench.py",
                                   *(argv if argv is not None else sys.argv[1:])]),
              "demo": args.demo, "problems_file": str(args.budget), "problems": len(problems),
              "complete": len(records) == len(wanted), "settings": settings, "budget_bench": rows}
    write_atomic(out / "results.json", lambda tmp: tmp.write_text(json.dumps(result, indent=1)))
    print(("\nDEMO (random weights: accuracy is meaningless)\n" if args.demo else "\n")
          + budget_table(rows))
    title = (f"{Path(args.budget).name}: {len(problems)} problems, switch {args.switch}, "
             f"{device_name}"
             + ("\nDEMO: random weights, accuracy is meaningless" if args.demo else ""))
    print(plot_frontier(rows, out / "frontier.png", title) if rows else "no plot: no results yet")
    print(f"results: {out / 'results.json'}")
    if interrupted:
        print(f"interrupted: {len(records)} of {len(wanted)} replies are kept in {results}; "
              f"the same command goes on from there", file=sys.stderr)
        raise SystemExit(interrupted)
    return result


def solve_all(args, problems, wanted, key, size_names, results: Path, done: dict) -> int:
    """Solve each (think, answer, budget, problem) of `wanted` not in `done` yet, appending each
    result to `results` as it completes (flushed to disk) and to `done`. The exit code when Ctrl-C
    (130) or SIGTERM (143) stopped it, else 0."""
    import tempfile
    from argparse import Namespace

    import chat
    todo = [w for w in wanted if key(*w) not in done]
    if not todo:
        return 0
    group_of = lambda k: tuple(k[:-2])  # (settings, think, answer, budget)
    tally = Counter()  # per group: replies, correct ones
    for k, r in done.items():
        tally[group_of(k), "n"] += 1
        tally[group_of(k), "correct"] += r["correct"]

    try:  # Ctrl-C or SIGTERM (ne.Terminated, from the command line): what is done stays done
        with tempfile.TemporaryDirectory() as tmp, open(results, "a", encoding="utf-8") as log:
            model, tokenizer = chat.load(Namespace(demo=args.demo, ckpt=args.ckpt), tmp, args.load)
            prompts = [
                tokenizer.encode(chat.render_chat([{"role": "user", "content": p["question"]}],
                                                  add_generation_prompt=True))
                for p in problems]
            max_len = max(map(len, prompts)) + args.max_new_tokens
            if max_len > model.config.max_position_embeddings:
                fail(f"the longest prompt ({max(map(len, prompts))} tokens) + --max-new-tokens "
                     f"{args.max_new_tokens} > the model's "
                     f"{model.config.max_position_embeddings} positions")
            # one cache (and its graphs) for every reply
            step = ne.DecodeGraph(model, model.new_cache(1, max_len))
            warm_up = Namespace(**{**vars(args), "max_new_tokens": min(8, args.max_new_tokens)})
            # compile kernels, capture graphs: untimed
            for think, answer in dict.fromkeys(w[:2] for w in todo):
                solve(model, tokenizer, step, prompts[0], size_names.get(think, think),
                      size_names.get(answer, answer), 2, warm_up, args.seed)
            t_start = time.perf_counter()
            for n, (think, answer, budget, i) in enumerate(todo, 1):
                measured, _ = solve(model, tokenizer, step, prompts[i],
                                    size_names.get(think, think), size_names.get(answer, answer),
                                    budget, args, args.seed + i)
                k = key(think, answer, budget, i)
                record = {"key": list(k), "think": think, "answer": answer, "budget": budget,
                          "problem": i, "reference": problems[i]["answer"],
                          "correct": is_correct(measured["predicted"], problems[i]["answer"]),
                          **measured}
                log.write(json.dumps(record) + "\n")
                log.flush()
                os.fsync(log.fileno())
                done[k] = record
                tally[group_of(k), "n"] += 1
                tally[group_of(k), "correct"] += record["correct"]
                count, correct = tally[group_of(k), "n"], tally[group_of(k), "correct"]
                elapsed = time.perf_counter() - t_start
                print(f"{think}:{answer} budget {budget}: {count}/{len(problems)} problems, "
                      f"accuracy {100 * correct / count:.0f}% | "
                      f"{n}/{len(todo)} replies in {elapsed:.0f} s",
                      file=sys.stderr, flush=True)
    except (KeyboardInterrupt, ne.Terminated) as e:
        return ne.interrupted_exit_code(e)
    return 0


if __name__ == "__main__":
    ne.run_cli("bench.py", main)
