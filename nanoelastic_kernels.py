"""
nanoelastic_kernels.py: Triton kernels for nanoelastic's hot paths.

Each public function here has the signature and the result of the plain-torch function of the same
name in nanoelastic.py, which is the reference (the spec); nanoelastic routes calls here on CUDA
tensors:

    NANOELASTIC_KERNELS unset    Triton on CUDA tensors of sm_80+ GPUs, torch references elsewhere
    NANOELASTIC_KERNELS=torch    torch references everywhere
    NANOELASTIC_KERNELS=triton   Triton everywhere; on CPU tensors under TRITON_INTERPRET=1 (CI)

    linear          x @ W^T, W FP8 (x per-tensor scale), BF16 or FP32 (the router's), read through
                    nested prefix views with their strides: no copy, no dequantised weight in
                    memory; `plus` adds the routed experts' outputs before the one rounding. On
                    GPUs before Hopper (A100, L40S), FP8 weights are read as bytes and converted
                    by bit moves (_weight_operand)
    relu2_linear    relu(x @ W^T)^2, the same kernel with the activation in its epilogue
    select_experts  the router's choice: sigmoid, top-k of scores + bias, weights renormalised
    moe_experts     top-k routed experts, up -> relu^2 -> down x routing weight, over stacked
                    [E, out, in] weights; tokens grouped by expert on the device (one token needs
                    no grouping), no host synchronisation (graph-capturable)
    ssd_chunked     the chunked Mamba-2 scan for prefill: chunk states, state passing, outputs
    mamba_step      the decode step: conv-state update + conv + SSM state update + output, in place
    decode_attention  a decoded token: K, V into the cache, attention split over the positions
    rms_norm        RMSNorm in groups, with the Mamba gate y * silu(z) fused
    add_rms_norm    the residual add fused with the next layer's RMSNorm

All accumulate in fp32. Products of bf16 activations run on tensor cores (bf16 operands; FP8
weights convert to bf16 exactly); fp32 operands (the tests' exact mode, the router's
weight) multiply in full fp32.
Block sizes are fixed heuristics (no autotuning, so the interpreter stays fast), chosen so that
nothing on the bf16 path (what a GPU runs) spills more than a few bytes on an H100: test_compile.py
compiles every launch the model makes for sm_90 and checks ptxas' report. Optional inputs are
passed as None, which Triton compiles out: no dummy pointers, no mode flags. On Hopper and later,
every launch can overlap the one before it (programmatic dependent launch: PDL below, off by
default).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@functools.cache
def supported(device: torch.device) -> bool:
    """Whether these kernels run on CUDA device `device`: they multiply bf16 on tensor cores, which
    GPUs have from sm_80 (A100) on. nanoelastic runs the torch references on older ones."""
    return torch.cuda.get_device_capability(device) >= (8, 0)


@functools.cache
def hopper_or_later(device: torch.device) -> bool:
    """Whether `device` is a GPU from sm_90 on, or the interpreter's CPU. There the kernels read
    float8_e4m3fn weights as such (before sm_89 Triton has no such type; on sm_89, Ada, Triton 3.6
    converts it to bf16 with an instruction that needs sm_90, cvt.bf16.f16, so Ada reads the
    bytes), and only there PDL can launch (griddepcontrol is sm_90's)."""
    return device.type != "cuda" or torch.cuda.get_device_capability(device) >= (9, 0)


def _pow2(n: int, least: int = 16) -> int:
    return max(least, triton.next_power_of_2(n))


def _rows_last(t: Tensor) -> Tensor:
    """t with unit stride in its last dimension (the kernels' inner loads), copied only if
    needed."""
    return t if t.stride(-1) == 1 else t.contiguous()


_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


# Programmatic dependent launch (Hopper and later): a kernel may start while the one before it
# finishes, and waits for it (griddepcontrol.wait: its writes visible) before it touches memory.
# What it can hide is the gap between the ~320 kernels of a decode step. Off until a GPU has
# measured it (bench.py decodes both ways); `nanoelastic_kernels.PDL = True` turns it on for
# later launches on Hopper and later GPUs (older ones launch without it).
PDL = False


def _launch(device: torch.device) -> dict:
    """The launch options of every kernel here: PDL as the kernel's constexpr and the launch's."""
    on = PDL and not _INTERPRET and hopper_or_later(device)
    return dict(PDL=on, launch_pdl=on)


@triton.jit
def _pdl_start(PDL: tl.constexpr):
    """First in every kernel: with PDL, wait for the kernel before (all of it, not only what this
    one reads: this one's writes may land where that one still reads), then let the next launch."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


def _dot_args(dtype: torch.dtype) -> dict:
    """How _dot multiplies in compute dtype `dtype`: operands rounded to DOT_DTYPE, then products
    by PRECISION: "tf32" (which 16-bit operands ignore) on tensor cores, "ieee" in full fp32 (fp32
    operands: no TF32 rounding). Under the interpreter, whose tl.dot mis-reads 16-bit operands
    (Triton 3.9), 16-bit operands are rounded to 16 bits and then multiply in fp32, which is exact
    for them: the CPU tests see the GPU's operand rounding. (The interpreter's fp32 -> bf16
    truncates where a GPU rounds to nearest: about twice the GPU's error, so a bound on it.)"""
    if dtype == torch.float32:
        return dict(DOT_DTYPE=tl.float32, PRECISION="ieee")
    dot_dtype = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]
    return dict(DOT_DTYPE=dot_dtype, PRECISION="ieee" if _INTERPRET else "tf32")


@triton.jit
def _dot(a, b, acc, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a @ b (acc None: zeros) in fp32, with a and b rounded to DOT_DTYPE (_dot_args)."""
    a, b = a.to(DOT_DTYPE), b.to(DOT_DTYPE)
    if PRECISION == "ieee":  # fp32 products (16-bit operands: the interpreter's emulation)
        a, b = a.to(tl.float32), b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


# --------------------------------------------------------------------------------------------------
# 1. One matmul kernel for linear() and for both halves of the MoE; the experts' choice

@triton.jit
def _last_to_arrive(ticket_ptr, count):
    """Take this program's ticket of a group of `count` programs; True for the last one, which
    then sees every write the others made before theirs (and must reset the ticket to 0). The
    barrier first, so that all of this program's threads are done with memory, then one thread's
    gpu-scope acquire-release atomic: the ordering cooperative groups' grid sync relies on."""
    tl.debug_barrier()
    return tl.atomic_add(ticket_ptr, 1, sem="acq_rel", scope="gpu") == count - 1


@triton.jit
def _matmul_kernel(a_ptr, w_ptr, out_ptr, scale_ptr, pair_ptr, block_expert_ptr, pair_weight_ptr,
                   plus_ptr, partial_ptr, ticket_ptr, M, N, K, K_SPAN, TOP_K,
                   stride_am, stride_ak, stride_we, stride_wn, stride_wk, stride_om, stride_on,
                   stride_pm, stride_pj, RELU2: tl.constexpr, DOT_DTYPE: tl.constexpr,
                   PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    """One [BLOCK_M, BLOCK_N] tile of out = epilogue(scale * A @ W^T), fp32 accumulation; RELU2:
    relu(.)^2 in the epilogue (the up-projections). Which optional pointers are given (None ones
    are compiled out) sets the mode:

      linear    block_expert_ptr None: row r of A gives row r of out; one weight. scale_ptr
                None: BF16 weight. plus_ptr given: + the TOP_K rows plus[r, j, :] in fp32
                before the one rounding (the routed experts' outputs, into the shared expert's).
      MoE up    block_expert_ptr given, pair_weight_ptr None: row r reads A row pair[r] // TOP_K
                (the pair's token) and stores at out row r.
      MoE down  pair_weight_ptr given: row r reads A row r and stores at out row pair[r], times
                the pair's routing weight.

    In the MoE modes W is stacked [E, N, K] and each row block has one expert, block_expert[pid_m]
    (-1: an unused block of a grid sized for the worst case). Which pair a row holds: with pair_ptr,
    pair[r] (the (token, expert) pairs sorted by expert, each expert's group padded to BLOCK_M rows
    with pair -1); without, one pair per row block, pair pid_m on its first row (one token, whose k
    experts are distinct: nothing to sort or group). W is read through its strides, so nested
    prefix views need no copy; an FP8 W converts exactly to the dot dtype and its scale (one per
    expert) multiplies the accumulator once, so no dequantised weight exists anywhere.

    Split K (linear; partial_ptr given): the grid's third axis splits the inner dimension into
    spans of K_SPAN (whole blocks), so that a decode matmul with few column blocks still has a
    program on every SM. Each program stores its fp32 partial tile and takes a ticket; the tile's
    last program sums the partials in split order (deterministic: no float atomics), runs the
    epilogue and resets the ticket to 0.
    """
    _pdl_start(PDL)
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    expert = 0
    w_base = w_ptr
    if block_expert_ptr is None:
        valid = rows < M
        a_rows, out_rows = rows, rows
    else:
        expert = tl.load(block_expert_ptr + pid_m)
        if expert < 0:
            return
        w_base += expert.to(tl.int64) * stride_we
        if pair_ptr is None:
            pair = tl.where(rows == pid_m * BLOCK_M, pid_m, -1)
        else:
            pair = tl.load(pair_ptr + rows)
        valid = pair >= 0
        a_rows = pair // TOP_K if pair_weight_ptr is None else rows
        out_rows = rows if pair_weight_ptr is None else pair
    a_rows = tl.where(valid, a_rows, 0)

    k_lo, k_hi = 0, K
    if partial_ptr is not None:  # this program's span of K
        k_lo = pid_k * K_SPAN
        k_hi = tl.minimum(K, k_lo + K_SPAN)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_ptr + a_rows[:, None].to(tl.int64) * stride_am + ks[None, :] * stride_ak,
                    mask=valid[:, None] & (ks[None, :] < K), other=0.0)
        # W^T [BLOCK_K, BLOCK_N]
        w = tl.load(w_base + cols[None, :] * stride_wn + ks[:, None] * stride_wk,
                    mask=(cols[None, :] < N) & (ks[:, None] < K), other=0.0)
        if w_ptr.dtype.element_ty == tl.uint8:  # FP8 bytes (_weight_operand) -> fp16, 2^-8 as big
            w = w.to(tl.uint16)
            w = (((w & 0x80) << 8) | ((w & 0x7F) << 7)).to(tl.float16, bitcast=True)
            w = w.to(tl.float32)
        acc = _dot(a, w, acc, DOT_DTYPE, PRECISION)

    if partial_ptr is not None:
        tile_mask = (rows[:, None] < M) & (cols[None, :] < N)
        partial = partial_ptr + rows[:, None].to(tl.int64) * N + cols[None, :]
        tl.store(partial + pid_k.to(tl.int64) * M * N, acc, mask=tile_mask)
        ticket = ticket_ptr + pid_m * tl.num_programs(1) + pid_n
        if not _last_to_arrive(ticket, tl.num_programs(2)):
            return
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for split in range(tl.num_programs(2)):  # .cg: read from L2, where the others wrote
            acc += tl.load(partial + split * M * N, mask=tile_mask, other=0.0, cache_modifier=".cg")
        tl.atomic_xchg(ticket, 0, sem="relaxed", scope="gpu")

    if scale_ptr is not None:
        scale = tl.load(scale_ptr + expert)
        if w_ptr.dtype.element_ty == tl.uint8:  # FP8 bytes were read 2^8 smaller
            scale = scale * 256.0
        acc = acc * scale
    if RELU2:
        acc = tl.maximum(acc, 0.0)
        acc = acc * acc
    if pair_weight_ptr is not None:  # MoE down: times the routing weight
        weight = tl.load(pair_weight_ptr + tl.where(valid, pair, 0), mask=valid, other=0.0)
        acc = acc * weight[:, None]
    if plus_ptr is not None:
        plus = plus_ptr + rows[:, None].to(tl.int64) * stride_pm + cols[None, :]
        for j in range(TOP_K):
            acc += tl.load(plus + j * stride_pj, mask=valid[:, None] & (cols[None, :] < N),
                           other=0.0)
    out = out_ptr + out_rows[:, None].to(tl.int64) * stride_om + cols[None, :] * stride_on
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=valid[:, None] & (cols[None, :] < N))


def _blocks(rows: int, dtype: torch.dtype) -> dict:
    """Decode (a few rows): thin row blocks, narrow column blocks, so that many programs stream
    the weight.
    Prefill: square tiles that reuse each loaded weight tile across many rows. fp32 activations (the
    tests' exact mode) multiply on FMA units, where each thread holds its slice of the inner
    dimension in registers: a short BLOCK_K keeps that from spilling."""
    if dtype == torch.float32:
        return dict(BLOCK_M=16 if rows <= 16 else 64, BLOCK_N=32 if rows <= 16 else 64, BLOCK_K=32,
                    num_warps=4 if rows <= 16 else 8)
    if rows <= 16:
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, num_warps=4, num_stages=4)
    if rows <= 64:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, num_warps=4)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3)


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 132  # an H100 SXM's (the interpreter)
    return torch.cuda.get_device_properties(device).multi_processor_count


def _k_splits(tiles: int, K: int, BLOCK_K: int, device: torch.device) -> int:
    """How many ways a decode matmul of `tiles` output tiles splits K: enough for about two
    programs per SM (so a narrow one, such as the 2688 columns of out_proj in 84 tiles, still
    streams its weight from every SM), each with at least 4 blocks of K to pipeline."""
    return max(1, min(triton.cdiv(2 * _sm_count(device), tiles), K // (4 * BLOCK_K)))


_TICKETS: dict = {}


def _tickets(device: torch.device, n: int) -> Tensor:
    """n tickets for a launch whose last program of a group merges or finishes the group's work
    (split-K matmuls, decode attention, the Mamba step's shared conv window): zero between
    launches, since that program resets its own. One buffer per device that only grows (a CUDA
    graph keeps its address: old buffers stay alive), so graphs and eager calls share it."""
    if device not in _TICKETS or _TICKETS[device][-1].numel() < n:
        _TICKETS.setdefault(device, []).append(
            torch.zeros(max(1024, n), device=device, dtype=torch.int32))
    return _TICKETS[device][-1]


def _weight_operand(weight: Tensor) -> Tensor:
    """The weight as _matmul_kernel reads it. Before Hopper (A100, L40S, RTX 30xx and 40xx; see
    hopper_or_later) an FP8 weight goes in as its bytes (a view, no copy), and the kernel moves each
    byte's sign, exponent and mantissa bits into an fp16's (exponent bias 15 instead of 7):
    exactly 2^-8 of the FP8 value, subnormals included, made up for in the scale; then to fp32,
    which every GPU converts to bf16."""
    if weight.dtype == torch.float8_e4m3fn and not hopper_or_later(weight.device):
        return weight.view(torch.uint8)
    return weight


def linear(x: Tensor, weight: Tensor, weight_scale: Tensor | None = None,
           plus: Tensor | None = None) -> Tensor:
    """x [..., K] @ weight[N, K]^T (* weight_scale for FP8) (+ plus [..., j, N] summed over j)
    -> [..., N] in the wider of x's and weight's dtypes (x's for FP8); weight may be a strided
    view."""
    return _linear(x, weight, weight_scale, relu2=False, plus=plus)


def relu2_linear(x: Tensor, weight: Tensor, weight_scale: Tensor | None = None) -> Tensor:
    """relu(x @ weight^T)^2 in one launch (the shared expert's up-projection)."""
    return _linear(x, weight, weight_scale, relu2=True)


def _linear(x: Tensor, weight: Tensor, weight_scale: Tensor | None, relu2: bool,
            plus: Tensor | None = None) -> Tensor:
    K, N = x.shape[-1], weight.shape[0]
    a = x.reshape(-1, K)
    M = a.shape[0]
    # an fp32 weight (the router's) with bf16 x multiplies in fp32: no fp32 copy of x
    dtype = x.dtype if weight_scale is not None else torch.promote_types(x.dtype, weight.dtype)
    out = torch.empty(M, N, device=x.device, dtype=dtype)
    if out.numel() == 0:
        return out.view(*x.shape[:-1], N)
    plus_rows, plus_strides = 1, (0, 0)
    if plus is not None:
        plus = _rows_last(plus.reshape(M, -1, N))
        plus_rows, plus_strides = plus.shape[1], plus.stride()[:2]
    cfg = _blocks(M, dtype)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(N, cfg["BLOCK_N"]))
    splits = _k_splits(grid[0] * grid[1], K, cfg["BLOCK_K"], x.device) if M <= 64 else 1
    span = triton.cdiv(triton.cdiv(K, splits), cfg["BLOCK_K"]) * cfg["BLOCK_K"]  # whole blocks
    splits = triton.cdiv(K, span)  # none empty
    partial, tickets = None, None
    if splits > 1:
        partial = torch.empty(splits, M, N, device=x.device, dtype=torch.float32)
        tickets = _tickets(x.device, grid[0] * grid[1])
    _matmul_kernel[grid + (splits,)](
        a, _weight_operand(weight), out, weight_scale, None, None, None, plus, partial, tickets, M,
        N, K, span, plus_rows, a.stride(0), a.stride(1), 0, weight.stride(0), weight.stride(1),
        out.stride(0), out.stride(1), *plus_strides, RELU2=relu2, **_dot_args(dtype), **cfg,
        **_launch(x.device))
    return out.view(*x.shape[:-1], N)


def _group_by_expert(experts: Tensor, E: int, BM: int) -> tuple[Tensor, Tensor, int]:
    """The (token, expert) pairs sorted by expert, each expert's group starting at a multiple of
    BM rows: (pair of each row, -1 for padding; expert of each row block, -1 for unused blocks;
    the number of row blocks, enough for any routing)."""
    flat = experts.flatten()
    pairs = flat.numel()
    sorted_experts, pair_of_sorted = flat.sort(stable=True)
    counts = torch.zeros(E, device=flat.device, dtype=torch.int64)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + BM - 1) // BM * BM
    padded_end = padded.cumsum(0)
    rank = torch.arange(pairs, device=flat.device) - (counts.cumsum(0) - counts)[sorted_experts]
    blocks = triton.cdiv(pairs, BM) + min(E, pairs)  # >= sum over experts of ceil(count / BM)
    pair_of_row = torch.full((blocks * BM,), -1, device=flat.device, dtype=torch.int64)
    pair_of_row[(padded_end - padded)[sorted_experts] + rank] = pair_of_sorted
    block_expert = torch.searchsorted(padded_end, torch.arange(blocks, device=flat.device) * BM,
                                      right=True)
    return pair_of_row, torch.where(block_expert < E, block_expert, -1), blocks


def moe_experts(x: Tensor, weights: Tensor, experts: Tensor, up_weight: Tensor,
                up_scale: Tensor | None, down_weight: Tensor, down_scale: Tensor | None) -> Tensor:
    """x [n, d], routing weights [n, k] fp32 and experts [n, k] -> [n, k, d] fp32, each chosen
    expert's weighted output weights[:, j] * down[e_j](relu(up[e_j](x))^2) (linear's `plus` sums
    them), up_weight [E, f, d] and down_weight [E, d, f] possibly nested views. Only device ops:
    the grid is sized for the worst case, unused blocks exit."""
    n, top_k = experts.shape
    E, f, d = up_weight.shape
    pairs = n * top_k
    up_scale, down_scale = (None if s is None else s.contiguous() for s in (up_scale, down_scale))
    cfg = _blocks(pairs // min(E, pairs) + 1, x.dtype)  # rows per expert on average
    BM = cfg["BLOCK_M"]

    if n == 1:  # one token's experts are distinct: a row block per pair, nothing to sort
        pair_of_row, block_expert, blocks = None, experts.flatten().contiguous(), top_k
    else:
        pair_of_row, block_expert, blocks = _group_by_expert(experts, E, BM)
    dots = _dot_args(x.dtype)
    h = torch.empty(blocks * BM, f, device=x.device, dtype=x.dtype)  # rows in sorted, padded order
    _matmul_kernel[(blocks, triton.cdiv(f, cfg["BLOCK_N"]))](
        x, _weight_operand(up_weight), h, up_scale, pair_of_row, block_expert, None, None, None,
        None, pairs, f, d, d, top_k, x.stride(0), x.stride(1), *up_weight.stride(), h.stride(0),
        h.stride(1), 0, 0, RELU2=True, **dots, **cfg, **_launch(x.device))
    # every pair's row is written once
    out = torch.empty(pairs, d, device=x.device, dtype=torch.float32)
    _matmul_kernel[(blocks, triton.cdiv(d, cfg["BLOCK_N"]))](
        h, _weight_operand(down_weight), out, down_scale, pair_of_row, block_expert,
        weights.float().contiguous(), None, None, None, pairs, d, f, f, top_k, h.stride(0),
        h.stride(1), *down_weight.stride(), out.stride(0), out.stride(1), 0, 0, RELU2=False,
        **dots, **cfg, **_launch(x.device))
    return out.view(n, top_k, d)


@triton.jit
def _select_experts_kernel(logits_ptr, bias_ptr, weights_ptr, experts_ptr, n, E, scaling,
                           TOP_K: tl.constexpr, NORMALIZE: tl.constexpr, BLOCK_T: tl.constexpr,
                           BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    """BLOCK_T tokens' routing: sigmoid scores, the top-k of scores + bias by k rounds of argmax
    (each round masks its winner), their unbiased scores renormalised and scaled."""
    _pdl_start(PDL)
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    es = tl.arange(0, BLOCK_E)
    valid = (tokens[:, None] < n) & (es[None, :] < E)
    logits = tl.load(logits_ptr + tokens[:, None].to(tl.int64) * E + es[None, :], mask=valid,
                     other=0.0)
    scores = tl.sigmoid(logits.to(tl.float32))
    bias = tl.load(bias_ptr + es, mask=es < E, other=0.0).to(tl.float32)
    choice = tl.where(valid, scores + bias[None, :], -float("inf"))
    ks = tl.arange(0, BLOCK_K)
    chosen = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.int32)
    weights = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        best = tl.argmax(choice, axis=1)  # [BLOCK_T]
        hit = es[None, :] == best[:, None]
        chosen = tl.where(ks[None, :] == j, best[:, None], chosen)
        weights = tl.where(ks[None, :] == j, tl.sum(tl.where(hit, scores, 0.0), axis=1)[:, None],
                           weights)
        choice = tl.where(hit, -float("inf"), choice)
    if NORMALIZE:
        weights = weights / (tl.sum(weights, axis=1)[:, None] + 1e-20)
    out = tokens[:, None].to(tl.int64) * TOP_K + ks[None, :]
    keep = (tokens[:, None] < n) & (ks[None, :] < TOP_K)
    tl.store(weights_ptr + out, weights * scaling, mask=keep)
    tl.store(experts_ptr + out, chosen.to(tl.int64), mask=keep)


def select_experts(logits: Tensor, bias: Tensor, config) -> tuple[Tensor, Tensor]:
    """Router logits [n, E] -> routing weights [n, k] fp32, chosen experts [n, k] int64, in one
    launch. Group-limited routing (n_group > 1; 1 in this model's config) runs the reference."""
    if config.n_group > 1:
        import nanoelastic
        return nanoelastic.select_experts.reference(logits, bias, config)
    n, E = logits.shape
    k = config.num_experts_per_tok
    logits, bias = logits.contiguous(), bias.contiguous()
    weights = torch.empty(n, k, device=logits.device, dtype=torch.float32)
    experts = torch.empty(n, k, device=logits.device, dtype=torch.int64)
    BLOCK_T = 16
    _select_experts_kernel[(triton.cdiv(n, BLOCK_T),)](
        logits, bias, weights, experts, n, E, config.routed_scaling_factor, TOP_K=k,
        NORMALIZE=config.norm_topk_prob, BLOCK_T=BLOCK_T, BLOCK_E=_pow2(E), BLOCK_K=_pow2(k, 1),
        **_launch(logits.device))
    return weights, experts


# --------------------------------------------------------------------------------------------------
# 2. The chunked SSD scan (prefill), in three kernels over (batch x head, chunk, tile):
#    a. each chunk's own end state, b. the states passed between chunks (sequential over chunks),
#    c. the outputs. Within a chunk the decay from step j to step i is exp(cum_i - cum_j), where cum
#    is the within-chunk cumulative sum of dt * A, computed once beforehand (torch) so that any tile
#    reads it.
#
# The products are tensor-core dots (as mamba_ssm does it): bf16 x, B, C stay bf16 and the fp32
# factors multiplied into them (decays, dt, the states) are rounded to bf16 on the way in; fp32 x,
# B, C (the tests' exact mode) multiply in full fp32. Accumulation is fp32 either way. Tiles are 64
# wide (32 on FMA units) so that one program's operands and accumulator fit in registers without
# spilling (see test_compile.py).
# Offsets that grow with batch x tokens are int64: one call may hold more than 2^31 elements.

@triton.jit
def _ssd_chunk_state_kernel(x_ptr, B_ptr, dt_ptr, cum_ptr, states_ptr,
                            T, H, P, N, HEADS_PER_GROUP, CHUNK, n_chunks,
                            s_xb, s_xt, s_xh, s_Bb, s_Bt, s_Bg,
                            DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, BLOCK_P: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    """states[bh, c, p, n] = sum_l x[l, p] * exp(cum_last - cum_l) * dt_l * B[l, n] over chunk c:
    what the chunk adds to the state by its end, one [BLOCK_P, BLOCK_N] tile per program."""
    _pdl_start(PDL)
    bh, c, tile = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h = bh // H, bh % H
    n_tiles_p = tl.cdiv(P, BLOCK_P)
    ps = (tile % n_tiles_p) * BLOCK_P + tl.arange(0, BLOCK_P)
    ns = (tile // n_tiles_p) * BLOCK_N + tl.arange(0, BLOCK_N)
    t0 = c * CHUNK
    x_base = x_ptr + b.to(tl.int64) * s_xb + t0.to(tl.int64) * s_xt + h * s_xh
    B_base = B_ptr + b.to(tl.int64) * s_Bb + t0.to(tl.int64) * s_Bt + (h // HEADS_PER_GROUP) * s_Bg
    # this chunk in dt and cum [b * H, n_chunks, CHUNK]
    row = (bh.to(tl.int64) * n_chunks + c) * CHUNK
    cum_last = tl.load(cum_ptr + row + CHUNK - 1)
    acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    for l0 in range(0, CHUNK, BLOCK_K):
        ls = l0 + tl.arange(0, BLOCK_K)
        valid = (ls < CHUNK) & (t0 + ls < T)
        coef = tl.load(dt_ptr + row + ls, mask=valid, other=0.0) * tl.exp(
            cum_last - tl.load(cum_ptr + row + ls, mask=valid, other=0.0))
        x = tl.load(x_base + ls[None, :] * s_xt + ps[:, None],
                    mask=valid[None, :] & (ps[:, None] < P), other=0.0)  # x^T [BLOCK_P, BLOCK_K]
        Bm = tl.load(B_base + ls[:, None] * s_Bt + ns[None, :],
                     mask=valid[:, None] & (ns[None, :] < N), other=0.0)
        Bm = (Bm.to(tl.float32) * coef[:, None]).to(DOT_DTYPE)
        acc = _dot(x, Bm, acc, DOT_DTYPE, PRECISION)
    out = states_ptr + (bh.to(tl.int64) * n_chunks + c) * P * N + ps[:, None] * N + ns[None, :]
    tl.store(out, acc, mask=(ps[:, None] < P) & (ns[None, :] < N))


@triton.jit
def _ssd_state_passing_kernel(states_ptr, cum_ptr, init_ptr, final_ptr, n_chunks, PN, CHUNK,
                              BLOCK: tl.constexpr, PDL: tl.constexpr):
    """states[c] := the state entering chunk c (it held the state chunk c adds); final = after the
    last. Sequential over chunks, parallel over (batch x head, BLOCK of the P*N state entries)."""
    _pdl_start(PDL)
    bh, blk = tl.program_id(0).to(tl.int64), tl.program_id(1)
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < PN
    state = tl.zeros((BLOCK,), dtype=tl.float32)
    if init_ptr is not None:
        state = tl.load(init_ptr + bh * PN + offs, mask=mask, other=0.0)
    for c in range(n_chunks):
        ptr = states_ptr + (bh * n_chunks + c) * PN + offs
        added = tl.load(ptr, mask=mask, other=0.0)
        tl.store(ptr, state, mask=mask)
        chunk_decay = tl.exp(tl.load(cum_ptr + (bh * n_chunks + c) * CHUNK + CHUNK - 1))
        state = state * chunk_decay + added
    tl.store(final_ptr + bh * PN + offs, state, mask=mask)


@triton.jit
def _ssd_chunk_scan_kernel(x_ptr, B_ptr, C_ptr, dt_ptr, cum_ptr, states_ptr, y_ptr,
                           T, H, P, N, HEADS_PER_GROUP, CHUNK, n_chunks,
                           s_xb, s_xt, s_xh, s_Bb, s_Bt, s_Bg, s_yb, s_yt, s_yh,
                           DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
                           PDL: tl.constexpr):
    """y for BLOCK_M rows i of chunk c and BLOCK_P channels: the entering state read out,
    exp(cum_i) S C_i, plus the causal within-chunk part,
    sum_{j <= i} (C_i . B_j) exp(cum_i - cum_j) dt_j x_j, over source blocks of BLOCK_K rows up to
    the diagonal; the products over N in blocks of BLOCK_N."""
    _pdl_start(PDL)
    bh, c, tile = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h = bh // H, bh % H
    n_tiles_p = tl.cdiv(P, BLOCK_P)
    ms = (tile // n_tiles_p) * BLOCK_M + tl.arange(0, BLOCK_M)
    ps = (tile % n_tiles_p) * BLOCK_P + tl.arange(0, BLOCK_P)
    t0 = c * CHUNK
    x_base = x_ptr + b.to(tl.int64) * s_xb + t0.to(tl.int64) * s_xt + h * s_xh
    state_offset = (bh.to(tl.int64) * n_chunks + c) * P * N
    bc_offset = b.to(tl.int64) * s_Bb + t0.to(tl.int64) * s_Bt + (h // HEADS_PER_GROUP) * s_Bg
    row = (bh.to(tl.int64) * n_chunks + c) * CHUNK
    rows_valid = (ms < CHUNK) & (t0 + ms < T)
    cum_i = tl.load(cum_ptr + row + ms, mask=rows_valid, other=0.0)

    # From the state entering the chunk: y_i = exp(cum_i) S C_i
    y = tl.zeros((BLOCK_M, BLOCK_P), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        ns = n0 + tl.arange(0, BLOCK_N)
        Cm = tl.load(C_ptr + bc_offset + ms[:, None] * s_Bt + ns[None, :],
                     mask=rows_valid[:, None] & (ns[None, :] < N), other=0.0)  # [BLOCK_M, BLOCK_N]
        # S^T [BLOCK_N, BLOCK_P]
        S_t = tl.load(states_ptr + state_offset + ps[None, :] * N + ns[:, None],
                      mask=(ps[None, :] < P) & (ns[:, None] < N), other=0.0)
        y = _dot(Cm, S_t, y, DOT_DTYPE, PRECISION)
    y = y * tl.exp(cum_i)[:, None]

    # Within the chunk, source rows j up to the last row of this tile
    hi = tl.minimum((tile // n_tiles_p + 1) * BLOCK_M, CHUNK)
    for j0 in range(0, hi, BLOCK_K):
        js = j0 + tl.arange(0, BLOCK_K)
        cols_valid = (js < CHUNK) & (t0 + js < T)
        scores = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)  # C_i . B_j
        for n0 in range(0, N, BLOCK_N):
            ns = n0 + tl.arange(0, BLOCK_N)
            Cm = tl.load(C_ptr + bc_offset + ms[:, None] * s_Bt + ns[None, :],
                         mask=rows_valid[:, None] & (ns[None, :] < N), other=0.0)
            # B^T [BLOCK_N, BLOCK_K]
            Bm = tl.load(B_ptr + bc_offset + js[None, :] * s_Bt + ns[:, None],
                         mask=cols_valid[None, :] & (ns[:, None] < N), other=0.0)
            scores = _dot(Cm, Bm, scores, DOT_DTYPE, PRECISION)
        cum_j = tl.load(cum_ptr + row + js, mask=cols_valid, other=0.0)
        dt_j = tl.load(dt_ptr + row + js, mask=cols_valid, other=0.0)
        causal = (ms[:, None] >= js[None, :]) & cols_valid[None, :]
        decay = tl.exp(tl.where(causal, cum_i[:, None] - cum_j[None, :], float("-inf")))
        scores = scores * decay * dt_j[None, :]
        x = tl.load(x_base + js[:, None] * s_xt + ps[None, :],
                    mask=cols_valid[:, None] & (ps[None, :] < P), other=0.0)  # [BLOCK_K, BLOCK_P]
        y = _dot(scores, x, y, DOT_DTYPE, PRECISION)
    out = (y_ptr + b.to(tl.int64) * s_yb + (t0 + ms[:, None]).to(tl.int64) * s_yt + h * s_yh
           + ps[None, :])
    tl.store(out, y, mask=rows_valid[:, None] & (ps[None, :] < P))


def ssd_chunked(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk: int,
                initial_state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """x [b, T, H, P] and B, C [b, T, G, N] (bf16 or fp32), dt [b, T, H] and A [H] fp32
    -> y [b, T, H, P] fp32, final state [b, H, P, N] fp32."""
    b, T, H, P = x.shape
    G, N = B.shape[-2:]
    dtype = torch.promote_types(x.dtype, B.dtype)
    x, B, C = (_rows_last(t.to(dtype)) for t in (x, B, C))
    if C.stride() != B.stride():  # the kernels read both through one set of strides
        B, C = B.contiguous(), C.contiguous()
    n_chunks = triton.cdiv(T, chunk)
    # dt and its within-chunk cumulative log decay, [b * H, n_chunks, chunk], zero past T
    dt = torch.nn.functional.pad(dt.float().transpose(1, 2), (0, n_chunks * chunk - T))
    dt = dt.reshape(b * H, n_chunks, chunk).contiguous()
    cum = (dt * A.float().repeat(b)[:, None, None]).cumsum(-1)
    states = torch.empty(b * H, n_chunks, P, N, device=x.device, dtype=torch.float32)
    y = torch.empty(b, T, H, P, device=x.device, dtype=torch.float32)
    final = torch.empty(b, H, P, N, device=x.device, dtype=torch.float32)
    dims = (T, H, P, N, H // G, chunk, n_chunks, *x.stride()[:3], *B.stride()[:3])
    dots = _dot_args(dtype)
    # tensor cores: 64-wide tiles, N whole; FMA units (fp32): 32-wide tiles and 32-long inner
    # products, since each thread then holds its whole slice of the inner dimension in registers
    tile = 32 if dots["DOT_DTYPE"] == tl.float32 else 64
    BP, BL = min(tile, _pow2(P)), min(tile, _pow2(chunk))
    BN = min(tile, _pow2(N))
    _ssd_chunk_state_kernel[(b * H, n_chunks, triton.cdiv(P, BP) * triton.cdiv(N, BN))](
        x, B, dt, cum, states, *dims, **dots, BLOCK_P=BP, BLOCK_N=BN, BLOCK_K=BL, num_warps=4,
        **_launch(x.device))
    init = initial_state.float().contiguous() if initial_state is not None else None
    _ssd_state_passing_kernel[(b * H, triton.cdiv(P * N, 1024))](
        states, cum, init, final, n_chunks, P * N, chunk, BLOCK=1024, **_launch(x.device))
    BN = _pow2(N) if tile == 64 else BN
    _ssd_chunk_scan_kernel[(b * H, n_chunks, triton.cdiv(chunk, BL) * triton.cdiv(P, BP))](
        x, B, C, dt, cum, states, y, *dims, *y.stride()[:3], **dots, BLOCK_M=BL, BLOCK_K=BL,
        BLOCK_P=BP, BLOCK_N=BN, num_warps=8 if tile == 64 else 4, num_stages=2,
        **_launch(x.device))
    return y, final


# --------------------------------------------------------------------------------------------------
# 3. The Mamba-2 decode step, one program per (sequence, head): (a) the depthwise conv over the
#    cached K-1 inputs and the new one, for the head's x channels and its group's B and C channels;
#    (b) dt, the state update S = exp(dt A) S + dt x B^T, the output y = S C + D x. Each program
#    shifts its own x channels' conv state once all its threads have read it (a barrier); the
#    group's B and C channels, which its heads all read, are shifted by the group's last program (a
#    ticket), after every head has read them.

@triton.jit
def _conv_silu(xBC_ptr, state_ptr, w_ptr, bias_ptr, ch, mask, s_sc, s_sk, s_wc, s_wk,
               K: tl.constexpr):
    """silu(conv over the K-1 cached inputs of channels `ch` and the new one + bias), fp32."""
    acc = tl.load(xBC_ptr + ch, mask=mask, other=0.0).to(tl.float32) * tl.load(
        w_ptr + ch * s_wc + (K - 1) * s_wk, mask=mask, other=0.0).to(tl.float32)
    for k in tl.static_range(K - 1):  # oldest first
        past = tl.load(state_ptr + ch * s_sc + k * s_sk, mask=mask, other=0.0)
        weight = tl.load(w_ptr + ch * s_wc + k * s_wk, mask=mask, other=0.0)
        acc += past.to(tl.float32) * weight.to(tl.float32)
    if bias_ptr is not None:
        acc += tl.load(bias_ptr + ch, mask=mask, other=0.0).to(tl.float32)
    return acc * tl.sigmoid(acc)


@triton.jit
def _shift_conv_state(xBC_ptr, state_ptr, ch, mask, s_sc, s_sk, K: tl.constexpr):
    """The conv window of channels `ch` one step on: drop the oldest input, append the new one."""
    state = state_ptr + ch * s_sc
    for k in tl.static_range(1, K - 1):
        tl.store(state + (k - 1) * s_sk, tl.load(state + k * s_sk, mask=mask, other=0.0),
                 mask=mask)
    new = tl.load(xBC_ptr + ch, mask=mask, other=0.0)
    tl.store(state + (K - 2) * s_sk, new.to(state_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _mamba_step_kernel(xBC_ptr, dt_ptr, conv_state_ptr, conv_w_ptr, conv_bias_ptr, dt_bias_ptr,
                       A_log_ptr, D_ptr, state_ptr, y_ptr, ticket_ptr,
                       H, P, N, G, HEADS_PER_GROUP, dt_min, dt_max,
                       s_xb, s_dtb, s_cb, s_cc, s_ck, s_wc, s_wk, s_sb, s_sh, s_sp,
                       K: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
                       PDL: tl.constexpr):
    """One head of one sequence. A program holds its head's whole [P, N] state, read and written
    once: the step is bound by reading the states, so nothing else is tiled."""
    _pdl_start(PDL)
    b, h = tl.program_id(0).to(tl.int64), tl.program_id(1)  # int64: batch x state may pass 2^31
    g = h // HEADS_PER_GROUP
    ps, ns = tl.arange(0, BLOCK_P), tl.arange(0, BLOCK_N)
    pm, nm = ps < P, ns < N
    row, conv = xBC_ptr + b * s_xb, conv_state_ptr + b * s_cb
    B_ch, C_ch = H * P + g * N + ns, H * P + G * N + g * N + ns
    x_ch = h * P + ps
    x = _conv_silu(row, conv, conv_w_ptr, conv_bias_ptr, x_ch, pm, s_cc, s_ck, s_wc, s_wk, K=K)
    Bv = _conv_silu(row, conv, conv_w_ptr, conv_bias_ptr, B_ch, nm, s_cc, s_ck, s_wc, s_wk, K=K)
    Cv = _conv_silu(row, conv, conv_w_ptr, conv_bias_ptr, C_ch, nm, s_cc, s_ck, s_wc, s_wk, K=K)
    ticket = ticket_ptr + b * G + g
    last = _last_to_arrive(ticket, HEADS_PER_GROUP)
    # after the ticket's barrier: the window's loads are spread over every warp (each holds a copy)
    # and its stores over fewer, so a shift before it could move inputs a slower warp still reads
    _shift_conv_state(row, conv, x_ch, pm, s_cc, s_ck, K=K)  # this head's own channels
    if last:  # every head has read the group's B, C window
        _shift_conv_state(row, conv, B_ch, nm, s_cc, s_ck, K=K)
        _shift_conv_state(row, conv, C_ch, nm, s_cc, s_ck, K=K)
        tl.atomic_xchg(ticket, 0, sem="relaxed", scope="gpu")

    raw = tl.load(dt_ptr + b * s_dtb + h).to(tl.float32) + tl.load(dt_bias_ptr + h).to(tl.float32)
    # softplus, as torch's (threshold 20); log(1 + e) as log(u) e / (u - 1), u = 1 + e rounded: it
    # keeps the digits that 1 + e loses for small e (dt_bias often puts raw near -5)
    e = tl.exp(raw)
    u = 1.0 + e
    log1p = tl.where(u == 1.0, e, tl.log(u) * e / tl.where(u == 1.0, 1.0, u - 1.0))
    dt = tl.where(raw > 20.0, raw, log1p)
    dt = tl.minimum(tl.maximum(dt, dt_min), dt_max)
    A = -tl.exp(tl.load(A_log_ptr + h).to(tl.float32))
    sp = state_ptr + b * s_sb + h * s_sh + ps[:, None] * s_sp + ns[None, :]
    state = tl.load(sp, mask=pm[:, None] & nm[None, :], other=0.0)
    state = state * tl.exp(dt * A) + (dt * x)[:, None] * Bv[None, :]
    tl.store(sp, state, mask=pm[:, None] & nm[None, :])
    y = tl.sum(state * Cv[None, :], axis=1) + tl.load(D_ptr + h).to(tl.float32) * x
    tl.store(y_ptr + b * H * P + h * P + ps, y, mask=pm)


def mamba_step(xBC: Tensor, dt: Tensor, conv_state: Tensor, ssm_state: Tensor, conv_weight: Tensor,
               conv_bias: Tensor | None, dt_bias: Tensor, A_log: Tensor, D: Tensor, n_groups: int,
               dt_limit: tuple[float, float]) -> Tensor:
    """xBC [b, C] and raw dt [b, H] of one token -> y [b, H*P] fp32; conv_state [b, C, K-1] and
    ssm_state [b, H, P, N] (fp32) are updated in place. One launch."""
    b, CH = xBC.shape
    H, P, N = ssm_state.shape[1:]
    K = conv_state.shape[-1] + 1
    xBC, dt = _rows_last(xBC), _rows_last(dt)  # rows of in_proj's output: strided, not copied
    conv_bias, dt_bias, A_log, D = (None if t is None else t.contiguous()
                                    for t in (conv_bias, dt_bias, A_log, D))
    if ssm_state.stride(-1) != 1:  # updated in place: a copy would not do
        raise ValueError("mamba_step needs an ssm_state with unit stride in its last axis")
    w = conv_weight.view(CH, K)
    y = torch.empty(b, H * P, device=xBC.device, dtype=torch.float32)
    _mamba_step_kernel[(b, H)](
        xBC, dt, conv_state, w, conv_bias, dt_bias, A_log, D, ssm_state, y,
        _tickets(xBC.device, b * n_groups), H, P, N, n_groups, H // n_groups,
        float(dt_limit[0]), float(min(dt_limit[1], 3.0e38)), xBC.stride(0), dt.stride(0),
        *conv_state.stride(), *w.stride(), *ssm_state.stride()[:3], K=K,
        BLOCK_P=_pow2(P, 1), BLOCK_N=_pow2(N, 1), **_launch(xBC.device))
    return y


# --------------------------------------------------------------------------------------------------
# 4. Decode attention, split over the KV positions (flash-decoding): programs over (batch x KV head,
#    span of 256 positions), each an online softmax over its span for the G query heads of its KV
#    head; each (batch, KV head)'s last program merges the spans in order, with the new token.

@triton.jit
def _decode_attention_kernel(q_ptr, k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, position_ptr, out_ptr,
                             partial_ptr, ticket_ptr, Hkv, G, HD, SPAN, scale,
                             s_qb, s_qh, s_kb, s_kh, s_vb, s_vh, s_cb, s_ch, s_cl, s_ob, s_oh,
                             DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
                             BLOCK_G: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
                             PDL: tl.constexpr):
    """Program (b * Hkv + j, split): cache positions [split * SPAN, min((split + 1) * SPAN,
    position)) of KV head j, whose G query heads are the rows of one [BLOCK_G, BLOCK_D] tile. Its
    (max, sum, unnormalised output) go to the workspace; the last program of the (b, j) ticket
    merges them in split order with the new token's own key and value (so nothing in this launch
    reads what split 0 writes: the new key and value into the caches at `position`)."""
    _pdl_start(PDL)
    bj, split = tl.program_id(0), tl.program_id(1)
    b, j = bj // Hkv, bj % Hkv
    n_splits = tl.num_programs(1)
    pos = tl.load(position_ptr)
    gs, ds = tl.arange(0, BLOCK_G), tl.arange(0, BLOCK_D)
    gmask, dmask = gs < G, ds < HD
    q = tl.load(q_ptr + b * s_qb + (j * G + gs)[:, None] * s_qh + ds[None, :],
                mask=gmask[:, None] & dmask[None, :], other=0.0)  # [BLOCK_G, BLOCK_D]
    k_new = tl.load(k_ptr + b * s_kb + j * s_kh + ds, mask=dmask, other=0.0)
    v_new = tl.load(v_ptr + b * s_vb + j * s_vh + ds, mask=dmask, other=0.0)
    cache = b.to(tl.int64) * s_cb + j * s_ch
    if split == 0:
        tl.store(k_cache_ptr + cache + pos * s_cl + ds, k_new, mask=dmask)
        tl.store(v_cache_ptr + cache + pos * s_cl + ds, v_new, mask=dmask)

    m = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)  # running max of the scores
    l = tl.zeros((BLOCK_G,), dtype=tl.float32)  # running sum of exp(score - m)
    acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)
    lo = split * SPAN
    hi = tl.minimum(lo + SPAN, pos)
    for l0 in range(lo, hi, BLOCK_L):  # every block holds a position < hi: m stays finite
        ls = l0 + tl.arange(0, BLOCK_L)
        lmask = ls < hi
        kt = tl.load(k_cache_ptr + cache + ls[None, :] * s_cl + ds[:, None],
                     mask=lmask[None, :] & dmask[:, None], other=0.0)  # K^T [BLOCK_D, BLOCK_L]
        scores = _dot(q, kt, None, DOT_DTYPE, PRECISION) * scale
        scores = tl.where(lmask[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        p = tl.exp(scores - m_new[:, None])
        alpha = tl.exp(m - m_new)
        vt = tl.load(v_cache_ptr + cache + ls[:, None] * s_cl + ds[None, :],
                     mask=lmask[:, None] & dmask[None, :], other=0.0)  # [BLOCK_L, BLOCK_D]
        acc = _dot(p, vt, acc * alpha[:, None], DOT_DTYPE, PRECISION)
        l = l * alpha + tl.sum(p, axis=1)
        m = m_new

    # workspace [b * Hkv, n_splits, BLOCK_G, 2 + BLOCK_D]: each split's max, sum, output
    first = partial_ptr + (bj * n_splits * BLOCK_G + gs.to(tl.int64)) * (2 + BLOCK_D)  # split 0
    per_split = BLOCK_G * (2 + BLOCK_D)
    row = first + split * per_split
    tl.store(row, m)
    tl.store(row + 1, l)
    tl.store(row[:, None] + 2 + ds[None, :], acc)
    if not _last_to_arrive(ticket_ptr + bj, n_splits):
        return
    s_new = tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], axis=1) * scale
    m_all = s_new
    for other in range(n_splits):
        m_all = tl.maximum(m_all, tl.load(first + other * per_split, cache_modifier=".cg"))
    l_all = tl.exp(s_new - m_all)
    acc = l_all[:, None] * v_new.to(tl.float32)[None, :]
    for other in range(n_splits):  # split order: the same sums whichever program merges
        row = first + other * per_split
        factor = tl.exp(tl.load(row, cache_modifier=".cg") - m_all)  # 0 for an empty span
        l_all += tl.load(row + 1, cache_modifier=".cg") * factor
        acc += tl.load(row[:, None] + 2 + ds[None, :], cache_modifier=".cg") * factor[:, None]
    out = out_ptr + b * s_ob + (j * G + gs)[:, None] * s_oh + ds[None, :]
    tl.store(out, (acc / l_all[:, None]).to(out_ptr.dtype.element_ty),
             mask=gmask[:, None] & dmask[None, :])
    tl.atomic_xchg(ticket_ptr + bj, 0, sem="relaxed", scope="gpu")


def decode_attention(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor,
                     position: Tensor, window: int) -> Tensor:
    """q [B, Hq, 1, hd], the new k, v [B, Hkv, 1, hd] (written into k_cache, v_cache
    [B, Hkv, L, hd] at position) -> [B, Hq, 1, hd]: attention over positions 0..position. One
    launch; the grid depends on window alone, so a CUDA graph holds for every position in it."""
    B, Hq, _, hd = q.shape
    Hkv = k.shape[1]
    SPAN = 256
    n_splits = triton.cdiv(window, SPAN)
    BLOCK_G, BLOCK_D = _pow2(Hq // Hkv), _pow2(hd)
    dots = _dot_args(q.dtype)
    out = torch.empty(B, Hq, 1, hd, device=q.device, dtype=q.dtype)
    partial = torch.empty(B * Hkv, n_splits, BLOCK_G, 2 + BLOCK_D, device=q.device,
                          dtype=torch.float32)
    q, k, v = (_rows_last(t) for t in (q, k, v))
    assert k_cache.stride(-1) == 1 and k_cache.stride() == v_cache.stride()
    _decode_attention_kernel[(B * Hkv, n_splits)](
        q, k, v, k_cache, v_cache, position, out, partial, _tickets(q.device, B * Hkv), Hkv,
        Hq // Hkv, hd, SPAN, hd ** -0.5, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        v.stride(0), v.stride(1), *k_cache.stride()[:3], out.stride(0), out.stride(1), **dots,
        BLOCK_G=BLOCK_G, BLOCK_L=32 if dots["DOT_DTYPE"] == tl.float32 else 64, BLOCK_D=BLOCK_D,
        num_warps=4, **_launch(q.device))
    return out


# --------------------------------------------------------------------------------------------------
# 5. RMSNorm in groups: weight * g / sqrt(mean(g^2) + eps), where g = x * silu(gate) (the Mamba
#    output norm), or g = x + update, also stored (the residual add fused with the next layer's
#    norm), or g = x

@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, gate_ptr, update_ptr, sum_ptr, n_rows, width, eps,
                     s_x, s_other, s_out, BLOCK_ROWS: tl.constexpr, BLOCK: tl.constexpr,
                     PDL: tl.constexpr):
    """BLOCK_ROWS rows of one group of `width` channels: out = w * g / sqrt(mean(g^2) + eps) with
    fp32 statistics, where g = x * silu(gate) (gate_ptr given: the Mamba output norm), or
    g = x + update, also stored at sum_ptr (update_ptr given: the residual add fused with the next
    layer's norm), or g = x. A program normalises whole rows (one reduction, no second pass); narrow
    rows go several per program."""
    _pdl_start(PDL)
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.program_id(1) * width + tl.arange(0, BLOCK)
    mask = (rows[:, None] < n_rows) & (tl.arange(0, BLOCK)[None, :] < width)
    rows = rows.to(tl.int64)[:, None]
    x = tl.load(x_ptr + rows * s_x + cols[None, :], mask=mask, other=0.0)
    if update_ptr is not None:  # the sum is rounded to the data type, as the residual stream is
        update = tl.load(update_ptr + rows * s_other + cols[None, :], mask=mask, other=0.0)
        x = (x.to(tl.float32) + update.to(tl.float32)).to(sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + rows * s_out + cols[None, :], x, mask=mask)
    x = x.to(tl.float32)
    if gate_ptr is not None:
        gate = tl.load(gate_ptr + rows * s_other + cols[None, :],
                       mask=mask, other=0.0).to(tl.float32)
        x = x * gate * tl.sigmoid(gate)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / width + eps)
    w = tl.load(w_ptr + cols, mask=cols < (tl.program_id(1) + 1) * width, other=0.0).to(tl.float32)
    out = (x * rstd[:, None] * w[None, :]).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + rows * s_out + cols[None, :], out, mask=mask)


def _norm(x: Tensor, weight: Tensor, eps: float, groups: int = 1, gate: Tensor | None = None,
          update: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """(the norm, x + update or None): rows with unit channel stride; gate and update are
    exclusive."""
    C = x.shape[-1]
    if C % groups:
        raise ValueError(f"rms_norm: {C} channels do not split into {groups} groups")
    weight = weight.contiguous()
    rows_of = lambda t: None if t is None else _rows_last(t.reshape(-1, C))
    rows, gate, update = rows_of(x), rows_of(gate), rows_of(update)
    other = gate if gate is not None else update
    out = torch.empty(rows.shape, device=x.device, dtype=(x if gate is None else gate).dtype)
    total = torch.empty_like(out) if update is not None else None
    width = C // groups
    block = _pow2(width, 1)
    block_rows = max(1, min(16, 4096 // block))  # narrow rows: several per program
    grid = (triton.cdiv(rows.shape[0], block_rows), groups)
    _rms_norm_kernel[grid](rows, weight, out, gate, update, total, rows.shape[0], width, eps,
                           rows.stride(0),
                           other.stride(0) if other is not None else 0, out.stride(0),
                           BLOCK_ROWS=block_rows, BLOCK=block, num_warps=4 if width <= 4096 else 8,
                           **_launch(rows.device))
    return out.view(x.shape), None if total is None else total.view(x.shape)


def rms_norm(x: Tensor, weight: Tensor, eps: float, groups: int = 1,
             gate: Tensor | None = None) -> Tensor:
    """x [..., C] (times silu(gate) first, if given) normalised over `groups` equal slices ->
    x.dtype (gate.dtype with a gate)."""
    return _norm(x, weight, eps, groups, gate=gate)[0]


def add_rms_norm(h: Tensor, update: Tensor | None, weight: Tensor,
                 eps: float) -> tuple[Tensor, Tensor]:
    """(rms_norm(h + update), h + update) in one pass; update None: (rms_norm(h), h)."""
    if update is None:
        return rms_norm(h, weight, eps), h
    return _norm(h, weight, eps, update=update)
