"""
bench.py: measured speed of nanoelastic on the device it runs on, as a table and then as JSON.

    python bench.py                   # kernels, then the model: 52-layer 30B config, random FP8 weights
    python bench.py --only kernels    # each kernel against its torch reference and the device's ceilings
    python bench.py --only model      # decode, prefill, size switch, memory
    python bench.py --small           # a small config and small shapes: runs anywhere, a CPU too
                                      # (there the kernels run in Triton's interpreter: slow, but checked)

Every number is measured here, beside what it is compared with: the device's ceilings (a device-to-device
copy for bandwidth, a large matmul for FLOP/s) and, for kernels, the torch reference. Correctness is
checked before anything is timed. Decode reads its bytes from the weights the step really touches (the
chosen experts, not all 128), the KV cache (all of it: these caches are shorter than the smallest window
a decode graph attends over) and the Mamba states; the achieved bandwidth is those bytes over the step time.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time
from itertools import chain

import torch

CUDA = torch.cuda.is_available()
if not CUDA:  # the Triton kernels can only run in Triton's interpreter here; set before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import nanoelastic as ne  # noqa: E402 (after TRITON_INTERPRET)

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


def rel_err(out, ref) -> float:
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


# ----------------------------------------------------------------------------------------------------
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
    return {"copy_GBps": 2 * n / copy_s / 1e9, "matmul_TFLOPs": 2 * m ** 3 / mm_s / 1e12, "matmul_dtype": str(dtype)}


# ----------------------------------------------------------------------------------------------------
# 2. Kernels: correctness first, then time against the torch reference and the ceilings

def kernel_cases(small: bool):
    """(name, function, args, bytes read, flops) at the real 30B shapes, or small ones."""
    c = ne.DEMO_CONFIG if small else ne.Config()
    D, E, Fe, k = c.hidden_size, c.n_routed_experts, c.moe_intermediate_size, c.num_experts_per_tok
    d, f = ne.parse_size("192x96" if small else "23B", c)
    g = torch.Generator(device=DEVICE).manual_seed(0)
    randn = lambda *s, dtype=torch.bfloat16: torch.randn(*s, device=DEVICE, generator=g).to(dtype)
    fp8 = lambda *s: ne.fp8_quantize(randn(*s, dtype=torch.float32) / s[-1] ** 0.5)
    cases = []

    w, s = fp8(c.in_proj_dim, D)
    for rows in (1, 32, 512 if small else 4096):
        x = randn(rows, D)
        flops = 2 * rows * w.numel()
        cases.append((f"linear fp8 {rows}x{D} @ {c.in_proj_dim}x{D}", "linear", (x, w, s), w.numel() + x.numel() * 2, flops))
    w_bf16 = randn(c.vocab_size, D)
    cases.append((f"linear bf16 1x{D} @ lm_head", "linear", (randn(1, D), w_bf16, None), w_bf16.numel() * 2, 2 * w_bf16.numel()))
    view = w[:, :d]  # the 23B's nested view vs the same bytes contiguous
    cases.append((f"linear fp8 1x{d} nested view", "linear", (randn(1, d), view, s), view.numel(), 2 * view.numel()))
    cases.append((f"linear fp8 1x{d} contiguous", "linear", (randn(1, d), view.contiguous(), s), view.numel(), 2 * view.numel()))

    per_expert = lambda ws: (torch.stack([w for w, _ in ws]), torch.stack([s for _, s in ws]))  # scales [E]
    up, down = per_expert([fp8(Fe, D) for _ in range(E)]), per_expert([fp8(D, Fe) for _ in range(E)])
    for n in (1, 32):
        x = randn(n, D)
        weights, experts = torch.rand(n, k, device=DEVICE, generator=g), torch.rand(n, E, device=DEVICE, generator=g).topk(k).indices
        touched = experts.unique().numel()
        cases.append((f"moe fp8 {n} tok top-{k} of {E}", "moe_experts", (x, weights, experts, up[0], up[1], down[0], down[1]),
                      touched * 2 * Fe * D, 2 * n * k * 2 * Fe * D))
    upv, downv = up[0][:, :f, :d], down[0][:, :d, :f]
    cases.append((f"moe fp8 1 tok nested {d}x{f}", "moe_experts",
                  (randn(1, d), weights[:1], experts[:1], upv, up[1], downv, down[1]), k * 2 * f * d, 2 * k * 2 * f * d))

    H, P, G, N = c.mamba_num_heads, c.mamba_head_dim, c.n_groups, c.ssm_state_size
    T = 64 if small else 8192
    x, B, C = randn(1, T, H, P, dtype=torch.float32), randn(1, T, G, N, dtype=torch.float32), randn(1, T, G, N, dtype=torch.float32)
    dt = torch.nn.functional.softplus(randn(1, T, H, dtype=torch.float32) - 2)
    A = -torch.rand(H, device=DEVICE, generator=g) * 4
    cases.append((f"ssd scan T={T}", "ssd_chunked", (x, dt, A, B, C, c.chunk_size), (x.numel() * 2 + 2 * B.numel()) * 4, None))

    ch = c.conv_dim
    step_args = lambda: (randn(1, ch), randn(1, H), randn(1, ch, c.conv_kernel - 1), randn(1, H, P, N, dtype=torch.float32),
                         randn(ch, 1, c.conv_kernel), randn(ch), randn(H, dtype=torch.float32), randn(H, dtype=torch.float32),
                         randn(H, dtype=torch.float32), G, (0.0, math.inf))
    cases.append(("mamba decode step", "mamba_step", step_args(), 2 * H * P * N * 4, None))
    for rows in (1, 512 if small else 8192):
        cases.append((f"gated rms_norm {rows}x{c.mamba_inner}", "rms_norm",
                      (randn(rows, c.mamba_inner), randn(c.mamba_inner), 1e-5, G, randn(rows, c.mamba_inner)),
                      3 * rows * c.mamba_inner * 2, None))
    return cases


def bench_kernels(small: bool, ceil: dict) -> list[dict]:
    import kernels
    rows = []
    for label, name, args, nbytes, flops in kernel_cases(small):
        triton_fn, reference = getattr(kernels, name), getattr(ne, name).reference
        fresh = lambda: tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)  # in-place ops
        out, ref = triton_fn(*fresh()), reference(*fresh())
        out, ref = (out[0], ref[0]) if isinstance(out, tuple) else (out, ref)
        err = rel_err(out, ref)
        if err > 2e-2:
            raise SystemExit(f"bench.py: error: {label}: Triton and the torch reference differ (relative error {err:.2e})")
        iters, warmup = (1, 1) if small else (50, 3)
        t_triton = timed(lambda: triton_fn(*args), iters, warmup)
        t_torch = timed(lambda: reference(*args), iters, warmup)
        row = {"kernel": label, "rel_err": err, "triton_us": t_triton * 1e6, "torch_us": t_torch * 1e6,
               "speedup": t_torch / t_triton, "GBps": nbytes / t_triton / 1e9}
        row["pct_copy_bw"] = 100 * row["GBps"] / ceil["copy_GBps"]
        if flops:
            row["TFLOPs"] = flops / t_triton / 1e12
            row["pct_matmul"] = 100 * row["TFLOPs"] / ceil["matmul_TFLOPs"]
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------------
# 3. The model: decode at batch 1/8/32 per size, prefill, size switch, memory

def contiguous_copy(model: ne.Model, size: str) -> ne.Model:
    """A standalone model of `size` whose weights are contiguous copies of the nested views (what slice.py
    writes), to compare with the views."""
    view = model.nested(size)
    with torch.device("meta"):
        copy = ne.Model(view.config)
    for name, t in chain(view.named_parameters(), view.named_buffers()):
        ne.assign_tensor(copy, name, t.contiguous().clone())
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


def decode_bytes(model: ne.Model, cache: ne.Cache, batch: int, touched: dict[int, int]) -> int:
    """Bytes one decode step reads: each weight of this size once, except that of the embeddings only `batch`
    rows and of the routed experts only those chosen; the whole KV cache; the Mamba states twice (read, write)."""
    total = 0
    for name, t in chain(model.named_parameters(), model.named_buffers()):
        nbytes = t.numel() * t.element_size()
        if "embeddings" in name:
            nbytes = batch * t.shape[1] * t.element_size()
        elif ".experts." in name and "shared" not in name:
            nbytes = nbytes // t.shape[0] * touched[int(name.split(".")[2])]
        total += nbytes
    for state in cache.layers:
        for t in state or ():
            total += t.numel() * t.element_size() * (1 if t.dim() == 4 and t.shape[2] == cache.max_len else 2)
    return total


def bench_decode(model: ne.Model, size: str | None, batch: int, steps: int, prompt: int, ceil: dict, label: str) -> dict:
    view = model.nested(size)
    cache = model.new_cache(batch, prompt + steps + 8)
    g = torch.Generator(device=DEVICE).manual_seed(batch)
    tokens = torch.randint(0, model.config.vocab_size, (batch, prompt), device=DEVICE, generator=g)
    model(tokens, cache, size)
    touched = experts_touched(view, cache, tokens[:, -1:])
    nbytes = decode_bytes(view, cache, batch, touched)
    step = model.decode_step(cache, size)
    token = tokens[:, -1:]
    for _ in range(3):  # warm up (and capture the graph)
        token = step(token).argmax(-1, keepdim=True)
    if CUDA:
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        token = step(token).argmax(-1, keepdim=True)  # stays on the device: no host round trip
    if CUDA:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - t) / steps
    gbps = nbytes / seconds / 1e9
    return {"model": label, "batch": batch, "tok_per_s": batch / seconds, "step_ms": seconds * 1e3,
            "GB_per_step": nbytes / 1e9, "GBps": gbps, "pct_copy_bw": 100 * gbps / ceil["copy_GBps"],
            "ceiling_tok_per_s": batch * ceil["copy_GBps"] * 1e9 / nbytes}


def bench_prefill(model: ne.Model, size: str | None, length: int, chunk: int) -> dict:
    tokens = torch.randint(0, model.config.vocab_size, (1, length), device=DEVICE)
    cache = model.new_cache(1, length)

    def prefill():
        cache.reset()
        model.prefill(tokens, cache, size, chunk)  # in pieces, as generate() does
    seconds = timed(prefill, 2 if CUDA else 1, warmup=1)
    return {"length": length, "tok_per_s": length / seconds, "seconds": seconds}


def bench_switch(model: ne.Model, think: str, answer: str, thought: int, chunk: int) -> dict:
    """After `thought` tokens at `think`, the cost of going on at `answer`: transplant = the next decode
    step at the new size on the same cache; re-prefill = rebuilding the cache at the new size."""
    cache = model.new_cache(1, thought + 16)
    tokens = torch.randint(0, model.config.vocab_size, (1, thought), device=DEVICE)
    think_step, answer_step = model.decode_step(cache, think), model.decode_step(cache, answer)
    token = tokens[:, -1:]

    def transplant():
        cache.reset()
        model(tokens[:, :-1], cache, think)
        think_step(token)
        if CUDA:
            torch.cuda.synchronize()
        t = time.perf_counter()
        answer_step(token)
        if CUDA:
            torch.cuda.synchronize()
        return time.perf_counter() - t

    def reprefill():
        cache.reset()
        model.prefill(tokens, cache, answer, chunk)
    transplant()  # warm up
    t_transplant = sorted(transplant() for _ in range(3))[1]
    t_reprefill = timed(reprefill, 2 if CUDA else 1, warmup=1)
    return {"thought_tokens": thought, "transplant_ms": t_transplant * 1e3, "reprefill_ms": t_reprefill * 1e3}


def bench_model(small: bool, ceil: dict, batches: list[int]) -> dict:
    config = ne.DEMO_CONFIG if small else ne.Config()
    sizes = ["256x128", "224x112", "192x96"] if small else ["30B", "23B", "12B"]
    names = ["full", "mid", "small"] if small else sizes
    t = time.perf_counter()
    model = ne.Model.from_random(config, DEVICE, torch.bfloat16 if CUDA else torch.float32, fp8=True, seed=0)
    print(f"random FP8 model of {'the small demo config' if small else 'the 30B config'} made on {DEVICE} "
          f"in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    steps, prompt = (4, 16) if small else (128, 256)
    decode = []
    for batch in batches:
        for size, name in zip(sizes, names):
            decode.append(bench_decode(model, size, batch, steps, prompt, ceil, f"{name} (view)"))
        for size, name in zip(sizes[1:], names[1:]):
            sliced = contiguous_copy(model, size)
            decode.append(bench_decode(sliced, None, batch, steps, prompt, ceil, f"{name} (sliced copy)"))
            del sliced
            gc.collect()  # a cache's decode graphs refer back to it: free the copy before making the next
            if CUDA:
                torch.cuda.empty_cache()
    chunk = 8192
    prefill = [bench_prefill(model, None, n, chunk) for n in ((128, 512) if small else (2048, 8192, 32768))]
    switch = bench_switch(model, sizes[1], sizes[0], 256 if small else 4096, chunk)
    out = {"decode": decode, "prefill": prefill, "switch": switch}
    if CUDA:
        out["peak_memory_GB"] = torch.cuda.max_memory_allocated() / 1e9
    return out


# ----------------------------------------------------------------------------------------------------
# 4. Report

def table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """columns: (key, header, format)."""
    cells = [[h for _, h, _ in columns]] + [[format(r[k], f) if k in r else "" for k, _, f in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    return "\n".join("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
                     for row in cells)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=["kernels", "model"], help="run one part")
    p.add_argument("--small", action="store_true", help="small config and shapes (CPU)")
    p.add_argument("--batch", type=int, nargs="+", default=None, help="decode batch sizes (default 1 8 32)")
    p.add_argument("--json", metavar="FILE", help="also write the JSON here")
    args = p.parse_args(argv)
    if not CUDA and not args.small:
        p.error("no GPU here: the full-size benchmark needs one (try --small)")
    device_name = torch.cuda.get_device_name() if CUDA else f"CPU ({torch.get_num_threads()} threads)"
    result = {"date": time.strftime("%Y-%m-%d"), "device": device_name, "torch": torch.__version__,
              "kernels": "triton" if ne.use_kernels(torch.empty(0, device=DEVICE)) else "torch",
              "command": " ".join(["python", "bench.py", *(argv if argv is not None else sys.argv[1:])])}
    ceil = result["ceilings"] = ceilings(args.small)
    print(f"# {result['date']}  {device_name}  torch {torch.__version__}  kernels: {result['kernels']}")
    print(f"# ceilings: copy {ceil['copy_GBps']:.0f} GB/s, matmul {ceil['matmul_TFLOPs']:.3g} TFLOP/s ({ceil['matmul_dtype']})")
    if args.only in (None, "kernels"):
        result["kernel_bench"] = bench_kernels(args.small, ceil)
        print("\n" + table(result["kernel_bench"], [
            ("kernel", "kernel", "s"), ("rel_err", "rel err", ".1e"), ("triton_us", "triton us", ".1f"),
            ("torch_us", "torch us", ".1f"), ("speedup", "x torch", ".1f"), ("GBps", "GB/s", ".0f"),
            ("pct_copy_bw", "% copy", ".0f"), ("TFLOPs", "TFLOP/s", ".1f"), ("pct_matmul", "% mm", ".0f")]))
    if args.only in (None, "model"):
        m = result["model_bench"] = bench_model(args.small, ceil, args.batch or ([1, 8] if args.small else [1, 8, 32]))
        print("\n" + table(m["decode"], [
            ("model", "decode", "s"), ("batch", "batch", "d"), ("tok_per_s", "tok/s", ".1f"), ("step_ms", "ms/step", ".2f"),
            ("GB_per_step", "GB/step", ".3f"), ("GBps", "GB/s", ".0f"), ("pct_copy_bw", "% copy", ".0f"),
            ("ceiling_tok_per_s", "ceiling tok/s", ".0f")]))
        print("\n" + table(m["prefill"], [("length", "prefill tokens", "d"), ("tok_per_s", "tok/s", ".0f"), ("seconds", "s", ".3f")]))
        s = m["switch"]
        print(f"\nsize switch after {s['thought_tokens']} thinking tokens: transplant {s['transplant_ms']:.2f} ms "
              f"(one decode step), re-prefill {s['reprefill_ms']:.1f} ms")
        if "peak_memory_GB" in m:
            print(f"peak GPU memory: {m['peak_memory_GB']:.1f} GB")
    print("\n" + json.dumps(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
