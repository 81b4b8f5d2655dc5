"""
Tests of nanoelastic_kernels.py: every Triton kernel against its plain-torch reference in
nanoelastic.py (the function's `.reference`), at awkward shapes (non-multiples of every block size,
strided nested views, batch > 1, FP8 and BF16 weights), by relative error against an fp32
reference; then the whole model with kernels against the model with references. Without CUDA
the kernels run on the CPU under TRITON_INTERPRET=1 at small shapes; on a GPU the same tests run on
CUDA and add the real model shapes.

    TRITON_INTERPRET=1 python -m pytest -q test_kernels.py
"""

import collections
import dataclasses
import functools

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

import checkpoint
import nanoelastic_kernels as kernels
import nanoelastic as ne
from test_nanoelastic import CONFIGS, random_config

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
assert CUDA or kernels._INTERPRET, "without a GPU, run the kernel tests with TRITON_INTERPRET=1"

# Relative error allowed: fp32 data differs only in summation order; bf16 data is rounded to 8 bits.
TOL = {torch.float32: 2e-5, torch.bfloat16: 1.5e-2}


def rel_err(out, ref):
    out, ref = out.double().cpu(), ref.double().cpu()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def rand(*shape, dtype=torch.float32, gen=None):
    return torch.randn(*shape, generator=gen).to(device=DEVICE, dtype=dtype)


def weight(rows, cols, fp8, dtype, gen, nested=None):
    """A weight as the model holds it (FP8 + fp32 scale, or `dtype`), optionally a nested prefix
    view; drawn and quantised on the device (seconds a weight on a CPU at the real shapes)."""
    seed = int(torch.randint(2**62, (1,), generator=gen))
    draw = torch.Generator(DEVICE).manual_seed(seed)
    w = torch.randn(rows, cols, generator=draw, device=DEVICE) / cols ** 0.5
    w, scale = checkpoint.fp8_quantize(w) if fp8 else (w.to(dtype), None)
    if nested:
        w = w[:nested[0], :nested[1]]
    return w, scale


def dequant(w, scale):  # per-tensor scale, or one per stacked expert
    if scale is None:
        return w.float()
    return w.float() * (scale.view(-1, 1, 1) if scale.dim() else scale)


@pytest.fixture(autouse=True)
def triton_everywhere(monkeypatch):
    monkeypatch.setattr(ne, "KERNELS", "triton")


# --------------------------------------------------------------------------------------------------
# linear: FP8 x per-tensor scale or BF16, contiguous or nested views; decode rows and prefill rows

# (rows, in, out)
# (2, 1100, 40) and (40, 1100, 20) split K in both dtypes
LINEAR_SHAPES = [(1, 70, 33), (3, 40, 100), (17, 129, 65), (70, 48, 97), (300, 40, 33),
                 (2, 1100, 40), (40, 1100, 20)]
if CUDA:  # the real 30B's projections at decode and prefill row counts (out_proj's split K)
    LINEAR_SHAPES += [(1, 2688, 10304), (1, 4096, 2688), (32, 4096, 2688), (1, 2688, 256),
                      (4096, 2688, 10304), (1, 2688, 131072)]


@pytest.mark.parametrize("rows,k,n", LINEAR_SHAPES)
@pytest.mark.parametrize("fp8", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear(rows, k, n, fp8, dtype):
    gen = torch.Generator().manual_seed(rows * 1000 + k)
    w, scale = weight(n + 5, k + 7, fp8, dtype, gen, nested=(n, k))  # a strided prefix view
    x = rand(2, rows, k, dtype=dtype, gen=gen)[1]
    out = kernels.linear(x, w, scale)
    ref = x.float() @ dequant(w, scale).T
    assert out.shape == (rows, n) and out.dtype == dtype
    assert rel_err(out, ref) < TOL[dtype]
    # The reference itself agrees, and a contiguous copy of the view gives the very same result.
    assert (rel_err(ne.linear.reference(x.float(), w if fp8 else w.float(), scale), ref)
            < TOL[torch.float32])
    assert torch.equal(out, kernels.linear(x, w.contiguous(), scale))


@pytest.mark.parametrize("rows,k,n", [(1, 70, 33), (17, 129, 65), (70, 48, 97), (2, 1100, 40)])
@pytest.mark.parametrize("fp8", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_relu2_linear(rows, k, n, fp8, dtype):  # (2, 1100, 40): relu^2 after the split-K merge
    gen = torch.Generator().manual_seed(rows + k)
    w, scale = weight(n + 5, k + 7, fp8, dtype, gen, nested=(n, k))
    x = rand(rows, k, dtype=dtype, gen=gen)
    out = kernels.relu2_linear(x, w, scale)
    ref = (x.float() @ dequant(w, scale).T).relu().square()
    assert out.shape == (rows, n) and out.dtype == dtype and (out >= 0).all()
    assert rel_err(out, ref) < TOL[dtype]
    ref_fn = ne.relu2_linear.reference(x.float(), w if fp8 else w.float(), scale)
    assert rel_err(ref_fn, ref) < TOL[torch.float32]


@pytest.mark.parametrize("rows,j,k", [(1, 6, 40), (37, 3, 40), (1, 6, 1100)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_plus(rows, j, k, dtype):
    """plus [rows, j, n] fp32 (the routed experts' outputs) summed into the result (k = 1100:
    after the split-K merge)."""
    gen = torch.Generator().manual_seed(rows + j)
    w, scale = weight(53, k, True, dtype, gen)
    x, plus = rand(rows, k, dtype=dtype, gen=gen), rand(2, rows, j, 53, gen=gen)[1]
    out = kernels.linear(x, w, scale, plus)
    ref = x.float() @ dequant(w, scale).T + plus.sum(1)
    assert out.shape == (rows, 53) and out.dtype == dtype
    assert rel_err(out, ref) < TOL[dtype]
    assert rel_err(ne.linear.reference(x.float(), w, scale, plus), ref) < TOL[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_weights_as_bytes_before_hopper(monkeypatch, dtype):
    """On GPUs before Hopper (kernels.hopper_or_later: the A100, the L40S), FP8 weights go in
    as bytes that the kernel turns into fp16s of 2^-8 the value, made up for in the scale: the very
    same results as the native path, for every FP8 value (each of the 254 that are not NaN), split
    K, nested views, the relu^2 epilogue and both MoE layouts."""
    gen = torch.Generator().manual_seed(5)
    every = torch.tensor([b for b in range(256) if b & 0x7F != 0x7F], dtype=torch.uint8)
    w = every[torch.randint(0, len(every), (60, 1100), generator=gen)]
    w = w.view(torch.float8_e4m3fn).to(DEVICE)[:53, :1050]  # a nested view of every value
    scale = torch.tensor(0.003, device=DEVICE)
    x = rand(37, 1050, dtype=dtype, gen=gen)
    moe = moe_inputs(37, 6, True, dtype, seed=6), moe_inputs(1, 6, True, dtype, seed=7)

    def outputs():
        out = [kernels.linear(x[:rows], w, scale) for rows in (1, 2, 37)]  # split K: 1 and 2 rows
        out.append(kernels.relu2_linear(x, w, scale))
        out += [kernels.moe_experts(*inputs) for inputs in moe]
        return out

    native = outputs()
    monkeypatch.setattr(kernels, "hopper_or_later", lambda device: False)
    assert kernels._weight_operand(w).dtype == torch.uint8
    for got, expected in zip(outputs(), native, strict=True):
        assert torch.equal(got, expected)


@pytest.mark.parametrize("capability,runs,native", [((7, 5), False, False), ((8, 0), True, False),
                                                    ((8, 6), True, False), ((8, 9), True, False),
                                                    ((9, 0), True, True)])
def test_which_gpus_run_the_kernels(monkeypatch, capability, runs, native):
    """The kernels from sm_80 on (bf16 tensor cores; older GPUs run the references), with FP8
    weights as bytes before Hopper (kernels.hopper_or_later)."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: capability)
    gpu = torch.device("cuda", 0)
    assert kernels.supported.__wrapped__(gpu) == runs  # uncached: the patched capability
    assert kernels.hopper_or_later.__wrapped__(gpu) == native


@pytest.mark.parametrize("rows", [1, 70])
def test_linear_fp32_weight_bf16_x(rows):
    """The router: bf16 x times its fp32 weight gives fp32 logits, multiplied in full fp32 (no
    rounding of the products, which a choice among 128 experts would feel)."""
    gen = torch.Generator().manual_seed(rows)
    w, x = rand(128, 96, gen=gen), rand(rows, 96, dtype=torch.bfloat16, gen=gen)
    out = kernels.linear(x, w)
    ref = x.double() @ w.double().T
    assert out.dtype == torch.float32 and rel_err(out, ref) < 1e-6
    assert rel_err(ne.linear.reference(x, w), ref) < 1e-6


def test_decode_matmuls_with_few_tiles_split_k():
    """The split-K rule: a narrow decode matmul (out_proj's 84 tiles) splits so the grid covers
    every SM about twice; a wide one (lm_head), a short K or prefill rows do not."""
    device = torch.device(DEVICE)
    sms = kernels._sm_count(device)
    assert kernels._k_splits(84, 4096, 128, device) * 84 >= 2 * sms
    assert kernels._k_splits(84, 4096, 128, device) <= 4096 // (4 * 128)
    assert kernels._k_splits(4096, 2688, 128, device) == 1
    assert kernels._k_splits(1, 256, 128, device) == 1
    assert kernels._k_splits(1, 1100, 128, device) == 2
    assert kernels._k_splits(1, 1100, 32, device) > 2
    # after a split launch every ticket is back at zero, ready for the next one
    x, w = rand(2, 1100, dtype=torch.bfloat16), rand(40, 1100, dtype=torch.bfloat16)
    kernels.linear(x, w)
    assert kernels._TICKETS[x.device][-1].count_nonzero() == 0


def test_linear_reads_any_strides():
    gen = torch.Generator().manual_seed(0)
    w = rand(40, 24, gen=gen).T  # stride (1, 24): a column-major weight
    x = rand(5, 40, gen=gen)
    assert rel_err(kernels.linear(x, w), x @ w.T) < TOL[torch.float32]


# --------------------------------------------------------------------------------------------------
# MoE: grouped by expert on the device, relu^2, routing weights fused, nested views [:, :f, :d]

# (tokens, top-k); 64 x 3 takes the 64-row blocks
MOE_SHAPES = [(1, 1), (1, 3), (5, 3), (64, 3), (23, 6)]
if CUDA:
    MOE_SHAPES += [(1, 6), (32, 6), (4096, 6)]


def moe_inputs(n, k, fp8, dtype, E=8, d_full=48, f_full=24, nested=(40, 16), seed=0):
    gen = torch.Generator().manual_seed(seed)
    if CUDA and n > 64:  # real expert shapes
        E, d_full, f_full, nested = 128, 2688, 1856, (2048, 1280)
    d, f = nested
    up = [weight(f_full, d_full, fp8, dtype, gen) for _ in range(E)]
    down = [weight(d_full, f_full, fp8, dtype, gen) for _ in range(E)]
    stack = lambda ws: (torch.stack([w for w, _ in ws]),
                        None if not fp8 else torch.stack([s for _, s in ws]))
    (up_w, up_s), (down_w, down_s) = stack(up), stack(down)
    x = rand(n, d, dtype=dtype, gen=gen)
    experts = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(n)]).to(DEVICE)
    if n >= 5:
        experts[experts == 1] = 0  # an expert nobody chose, beside one chosen often
    weights = torch.rand(n, k, generator=gen).to(DEVICE)
    return x, weights, experts, up_w[:, :f, :d], up_s, down_w[:, :d, :f], down_s


@pytest.mark.parametrize("n,k", MOE_SHAPES)
@pytest.mark.parametrize("fp8", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moe_experts(n, k, fp8, dtype):
    x, weights, experts, up_w, up_s, down_w, down_s = moe_inputs(n, k, fp8, dtype, seed=n * 10 + k)
    out = kernels.moe_experts(x, weights, experts, up_w, up_s, down_w, down_s)
    # fp32 reference: each token through each of its experts, written out directly, 8 tokens at a
    # time (up[experts] copies k experts a token: 4096 tokens of the real shapes would be 240 GiB)
    up, down = dequant(up_w, up_s), dequant(down_w, down_s)
    ref = []
    for rows in torch.arange(n, device=experts.device).split(8):
        chosen = experts[rows]
        h = torch.relu(torch.einsum("nd,nkfd->nkf", x[rows].float(), up[chosen])).square()
        ref.append(torch.einsum("nkf,nkdf,nk->nkd", h, down[chosen], weights[rows]))
    ref = torch.cat(ref)
    assert out.shape == (n, k, x.shape[1]) and out.dtype == torch.float32
    assert rel_err(out, ref) < TOL[dtype]
    f32 = (lambda w: w) if fp8 else (lambda w: w.float())
    ref_fn = ne.moe_experts.reference(x.float(), weights, experts,
                                      f32(up_w), up_s, f32(down_w), down_s)
    assert rel_err(ref_fn, ref) < TOL[torch.float32]


@pytest.mark.parametrize("n,E,k,normalise", [(1, 128, 6, True), (37, 128, 6, True),
                                              (5, 8, 3, False), (3, 10, 1, True),
                                              (1000, 128, 6, True)])
def test_select_experts(n, E, k, normalise):
    """The router's choice: the same experts in the same (descending) order, the same weights."""
    gen = torch.Generator().manual_seed(n + E + k)
    config = ne.Config(n_routed_experts=E, num_experts_per_tok=k, norm_topk_prob=normalise)
    logits, bias = rand(n, E, gen=gen) * 3, rand(E, gen=gen) * 0.3
    weights, experts = kernels.select_experts(logits, bias, config)
    weights_ref, experts_ref = ne.select_experts.reference(logits, bias, config)
    assert experts.dtype == torch.int64 and torch.equal(experts, experts_ref)
    assert weights.dtype == torch.float32 and rel_err(weights, weights_ref) < 1e-6


def test_select_experts_group_limited_is_the_reference():
    config = ne.Config(n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2)
    gen = torch.Generator().manual_seed(1)
    logits, bias = rand(7, 16, gen=gen), rand(16, gen=gen)
    weights, experts = kernels.select_experts(logits, bias, config)
    weights_ref, experts_ref = ne.select_experts.reference(logits, bias, config)
    assert torch.equal(experts, experts_ref) and torch.equal(weights, weights_ref)
    # the groups matter: each token's experts come from its two best groups of four
    assert all(len(set(row.tolist())) <= 2 for row in experts // 4)


def record_launches(monkeypatch):
    """Record every kernel launch by name. On a GPU the kernels still run. Under the interpreter
    (which itself copies tensors to the host to run a kernel) they are replaced by the record, so
    that a test can check everything around the kernels for host syncs; nothing is computed then,
    and the router's choice is expert 0 (a valid index for the MoE's grouping)."""
    launches = []

    def launch(name, jit, grid, *args, **kwargs):
        launches.append(name)
        if not kernels._INTERPRET:
            return jit[grid](*args, **kwargs)
        if name == "_select_experts_kernel":
            with _disable_current_modes():  # not the step's work: CountOps does not see it
                args[3].zero_()  # experts_ptr
    for name in dir(kernels):
        if name.endswith("_kernel"):
            jit = getattr(kernels, name)
            monkeypatch.setattr(kernels, name, type("Launch", (), {
                "__getitem__": lambda self, grid, name=name, jit=jit:
                    functools.partial(launch, name, jit, grid)})())
    return launches


def forbid_host_syncs(monkeypatch):
    """Make every Python-level way for a tensor's value to reach the host raise (and CUDA's own
    check)."""
    def sync(*_, **__):
        raise AssertionError("host synchronisation")
    for method in ("item", "tolist", "__bool__", "__int__", "__index__", "__float__", "nonzero",
                   "numpy", "cpu"):
        monkeypatch.setattr(torch.Tensor, method, sync)
    if CUDA:
        torch.cuda.set_sync_debug_mode("error")


def test_moe_experts_has_no_host_sync(monkeypatch):
    """Graph capture needs a sync-free MoE: forbid every way a tensor's value can reach the host."""
    args = moe_inputs(5, 3, True, torch.float32)
    expected = kernels.moe_experts(*args)
    launches = record_launches(monkeypatch)
    forbid_host_syncs(monkeypatch)
    try:
        # the guard works: the reference syncs (bincount().tolist(); on CUDA bincount itself,
        # which CUDA's sync check reports)
        with pytest.raises((AssertionError, RuntimeError),
                           match="host synchronisation|called a synchronizing CUDA operation"):
            ne.moe_experts.reference(*args)
        out = kernels.moe_experts(*args)
    finally:
        if CUDA:
            torch.cuda.set_sync_debug_mode("default")
    monkeypatch.undo()
    if kernels._INTERPRET:
        assert launches == ["_matmul_kernel"] * 2  # up and down
    else:
        torch.testing.assert_close(out, expected)


# --------------------------------------------------------------------------------------------------
# Mamba-2: the chunked scan, and the fused decode step

SSD_SHAPES = [  # (batch, T, heads, head dim, groups, state, chunk)
    (1, 1, 4, 6, 1, 8, 8), (2, 21, 4, 6, 2, 8, 8), (1, 16, 8, 16, 2, 16, 16),
    (1, 37, 2, 5, 1, 3, 16)]
if CUDA:
    SSD_SHAPES += [(1, 8192, 64, 64, 8, 128, 128), (2, 1000, 64, 64, 8, 128, 128)]


@pytest.mark.parametrize("b,T,H,P,G,N,chunk", SSD_SHAPES)
@pytest.mark.parametrize("initial", [False, True])
def test_ssd_chunked(b, T, H, P, G, N, chunk, initial):
    gen = torch.Generator().manual_seed(T * 7 + H)
    x, B, C = rand(b, T, H, P, gen=gen), rand(b, T, G, N, gen=gen), rand(b, T, G, N, gen=gen)
    dt = torch.nn.functional.softplus(rand(b, T, H, gen=gen) - 1)
    A = -torch.rand(H, generator=gen).to(DEVICE) * 4
    init = rand(b, H, P, N, gen=gen) if initial else None
    y, final = kernels.ssd_chunked(x, dt, A, B, C, chunk, init)
    y_ref, final_ref = ne.ssd_chunked.reference(x, dt, A, B, C, chunk, init)
    assert y.shape == y_ref.shape and final.shape == final_ref.shape
    # long chunks: exp of differences of cumulative sums
    tol = 1e-4 if T > 1000 else TOL[torch.float32]
    assert rel_err(y, y_ref) < tol and rel_err(final, final_ref) < tol


def test_ssd_chunked_bf16_inputs():
    """The model's path: bf16 x, B, C (tensor-core operands on a GPU) as strided views of one xBC
    row."""
    gen = torch.Generator().manual_seed(1)
    b, T, H, P, G, N, chunk = 2, 45, 4, 16, 2, 16, 16
    xBC = rand(b, T, H * P + 2 * G * N, dtype=torch.bfloat16, gen=gen)
    x, B, C = xBC.split([H * P, G * N, G * N], dim=-1)
    x, B, C = x.unflatten(-1, (H, P)), B.unflatten(-1, (G, N)), C.unflatten(-1, (G, N))
    dt = torch.nn.functional.softplus(rand(b, T, H, gen=gen) - 1)
    A = -torch.rand(H, generator=gen).to(DEVICE) * 4
    init = rand(b, H, P, N, gen=gen)
    y, final = kernels.ssd_chunked(x, dt, A, B, C, chunk, init)
    y_ref, final_ref = ne.ssd_chunked.reference(x.float(), dt, A, B.float(), C.float(), chunk, init)
    assert y.dtype == final.dtype == torch.float32
    assert (rel_err(y, y_ref) < TOL[torch.bfloat16]
            and rel_err(final, final_ref) < TOL[torch.bfloat16])
    # ... and not closer than bf16 operands allow: the fp32 factors multiplied into them (decays,
    # dt, the states, the scores) are rounded to bf16 for the dots, on a GPU and (emulated, see
    # kernels._dot_args) in the interpreter (about 4e-3 here; fp32 products would give about 1e-7)
    assert rel_err(y, y_ref) > 1e-4 and rel_err(final, final_ref) > 1e-4


def huge_view(shape, strides, dtype):
    """A view whose offsets pass 2^31 elements, over memory that is reserved but never touched
    (Linux maps pages on first use), so that 64-bit offsets are tested without gigabytes of RAM."""
    numel = 1 + sum((n - 1) * s for n, s in zip(shape, strides))
    assert numel > 2**31
    return torch.empty(numel, dtype=dtype, device=DEVICE).as_strided(shape, strides).normal_()


def test_ssd_chunked_offsets_past_2_31():
    """Chunk starts t0 * (stride of a token) pass 2^31, as they do for a prompt of more than
    2^31 / conv_dim (about 200K) tokens in one call."""
    gen = torch.Generator().manual_seed(2)
    b, T, H, P, G, N, chunk = 1, 200, 2, 16, 1, 16, 8
    # 6.7 GB reserved, 13 KB used
    x = huge_view((b, T, H, P), (T * 2**24, 2**24, P, 1), torch.bfloat16)
    B, C = (rand(b, T, G, N, dtype=torch.bfloat16, gen=gen),
            rand(b, T, G, N, dtype=torch.bfloat16, gen=gen))
    dt = torch.nn.functional.softplus(rand(b, T, H, gen=gen) - 1)
    A = -torch.rand(H, generator=gen).to(DEVICE)
    y, final = kernels.ssd_chunked(x, dt, A, B, C, chunk)
    y_ref, final_ref = ne.ssd_chunked.reference(x.float(), dt, A, B.float(), C.float(), chunk)
    assert (rel_err(y, y_ref) < TOL[torch.bfloat16]
            and rel_err(final, final_ref) < TOL[torch.bfloat16])


def test_mamba_step_offsets_past_2_31():
    """Batch offsets b * (stride of a sequence's SSM state) pass 2^31, as at a batch of more than
    4096 sequences of the real model."""
    gen = torch.Generator().manual_seed(3)
    b, H, P, G, N, K = 3, 2, 4, 1, 8, 4
    ch = H * P + 2 * G * N
    # 12.9 GB reserved
    ssm_state = huge_view((b, H, P, N), (2**30 + 64, P * N, N, 1), torch.float32)
    xBC, dt, conv_state = rand(b, ch, gen=gen), rand(b, H, gen=gen), rand(b, ch, K - 1, gen=gen)
    args = (rand(ch, 1, K, gen=gen), rand(ch, gen=gen), rand(H, gen=gen), rand(H, gen=gen),
            rand(H, gen=gen), G, (0.0, float("inf")))
    ref_ssm, ref_conv = ssm_state.clone(), conv_state.clone()
    y = kernels.mamba_step(xBC, dt, conv_state, ssm_state, *args)
    y_ref = ne.mamba_step.reference(xBC, dt, ref_conv, ref_ssm, *args)
    assert (rel_err(y, y_ref) < TOL[torch.float32]
            and rel_err(ssm_state, ref_ssm) < TOL[torch.float32])


# (batch, H, P, G, N, conv kernel)
STEP_SHAPES = [(1, 4, 6, 1, 8, 4), (3, 4, 6, 2, 8, 4), (2, 2, 5, 1, 3, 2)]
if CUDA:
    STEP_SHAPES += [(1, 64, 64, 8, 128, 4), (32, 64, 64, 8, 128, 4)]


@pytest.mark.parametrize("b,H,P,G,N,K", STEP_SHAPES)
@pytest.mark.parametrize("dtype,bias,clamp", [(torch.float32, True, False),
                                              (torch.bfloat16, True, False),
                                              (torch.float32, False, True)])
def test_mamba_step(b, H, P, G, N, K, dtype, bias, clamp):
    gen = torch.Generator().manual_seed(b * 100 + H)
    ch = H * P + 2 * G * N
    xBC, dt = rand(b, ch, dtype=dtype, gen=gen), rand(b, H, dtype=dtype, gen=gen)
    conv_state, ssm_state = rand(b, ch, K - 1, dtype=dtype, gen=gen), rand(b, H, P, N, gen=gen)
    conv_w, conv_b = (rand(ch, 1, K, dtype=dtype, gen=gen),
                      rand(ch, dtype=dtype, gen=gen) if bias else None)
    dt_bias, A_log, D = rand(H, gen=gen), rand(H, gen=gen), rand(H, gen=gen)
    states_ref = conv_state.clone(), ssm_state.clone()
    limit = (0.0, float("inf"))
    if clamp:  # a time_step_limit that clamps some dt from below and some from above
        soft = torch.nn.functional.softplus(dt.float() + dt_bias).flatten().cpu()
        limit = tuple(soft.quantile(torch.tensor([0.25, 0.75])).tolist())
        assert (soft < limit[0]).any() and (soft > limit[1]).any()
    args = (conv_w, conv_b, dt_bias, A_log, D, G, limit)
    y = kernels.mamba_step(xBC, dt, conv_state, ssm_state, *args)
    # fp32 reference from the same inputs (the reference rounds its conv to the data dtype; this
    # one doesn't)
    f32 = lambda t: None if t is None else t.float()
    ref_conv, ref_ssm = states_ref[0].float(), states_ref[1]
    y_ref = ne.mamba_step.reference(xBC.float(), dt.float(), ref_conv, ref_ssm,
                                    f32(conv_w), f32(conv_b), *args[2:])
    assert y.shape == (b, H * P) and y.dtype == torch.float32
    assert rel_err(y, y_ref) < TOL[dtype] and rel_err(ssm_state, ref_ssm) < TOL[dtype]
    assert torch.equal(conv_state.float(), ref_conv)  # the shifted window holds the inputs exactly
    assert kernels._TICKETS[xBC.device][-1].count_nonzero() == 0  # the groups' tickets reset


# --------------------------------------------------------------------------------------------------
# Decode attention: the new K, V into the cache, attention split over spans of 256 positions

# (batch, query heads, KV heads, head dim, cache length, window, position): the first position,
# a span's edge, several spans, the window's last position, one query head per KV head
ATTENTION_SHAPES = [(1, 4, 2, 20, 300, 256, 0), (1, 4, 2, 20, 300, 256, 130),
                    (2, 8, 2, 16, 1030, 1024, 256), (2, 8, 2, 16, 1030, 1024, 700),
                    (1, 2, 2, 32, 600, 512, 511), (2, 32, 2, 128, 520, 512, 300)]
if CUDA:  # the real 30B's heads at a long context
    ATTENTION_SHAPES += [(1, 32, 2, 128, 32768, 32768, 20000), (8, 32, 2, 128, 4096, 4096, 3000)]


@pytest.mark.parametrize("B,Hq,Hkv,hd,L,window,position", ATTENTION_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention(B, Hq, Hkv, hd, L, window, position, dtype):
    gen = torch.Generator().manual_seed(position + hd)
    q, k, v = (rand(B, H, 1, hd, dtype=dtype, gen=gen) for H in (Hq, Hkv, Hkv))
    caches = [rand(B, Hkv, L, hd, dtype=dtype, gen=gen) for _ in range(2)]
    position_t = torch.tensor(position, device=DEVICE)
    ref_caches = [c.double() for c in caches]
    ref = ne.decode_attention.reference(q.double(), k.double(), v.double(), *ref_caches,
                                        position_t, window)
    out = kernels.decode_attention(q, k, v, *caches, position_t, window)
    assert out.shape == (B, Hq, 1, hd) and out.dtype == dtype
    assert rel_err(out, ref) < TOL[dtype]
    for cache, ref_cache in zip(caches, ref_caches):  # the new token written, nothing else
        assert torch.equal(cache.double(), ref_cache)
    assert kernels._TICKETS[q.device][-1].count_nonzero() == 0


# --------------------------------------------------------------------------------------------------
# RMSNorm: plain, in groups, gated; strided rows

NORM_SHAPES = [(1, 48, 1), (7, 40, 1), (5, 48, 4), (3, 1000, 2)]  # (rows, channels, groups)
if CUDA:
    NORM_SHAPES += [(1, 2688, 1), (8192, 2688, 1), (8192, 4096, 8)]


@pytest.mark.parametrize("rows,C,groups", NORM_SHAPES)
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm(rows, C, groups, gated, dtype):
    gen = torch.Generator().manual_seed(rows + C)
    # rows with a stride wider than C; gated as in Mamba: fp32 scan output x, gate in `dtype`
    x = rand(rows, C + 3, dtype=torch.float32 if gated else dtype, gen=gen)[:, :C]
    z = rand(rows, C, dtype=dtype, gen=gen) if gated else None
    w = rand(C, gen=gen).to(dtype)
    out = kernels.rms_norm(x, w, 1e-5, groups, z)
    ref = ne.rms_norm.reference(x.float(), w.float(), 1e-5, groups,
                                None if z is None else z.float())
    assert out.shape == x.shape and out.dtype == dtype
    assert ne.rms_norm.reference(x, w, 1e-5, groups, z).dtype == dtype
    assert rel_err(out, ref) < TOL[dtype]


def test_kernels_read_inputs_through_their_strides():
    """Each kernel reads a strided view as its reference does (or copies a small one first): the
    new v of another layout than k, a transposed dt, every-other-element views of the 1-D
    parameters, the routing bias, the norm weight and the experts' FP8 scales; empty outputs."""
    gen = torch.Generator().manual_seed(7)
    every_other = lambda t: torch.stack([t, torch.zeros_like(t)], -1)[..., 0]  # stride 2
    q, v = rand(2, 4, 1, 16, gen=gen), rand(2, 2, 1, 16, gen=gen)
    k = rand(2, 2, 1, 19, gen=gen)[..., :16]  # strides unlike v's
    caches = [rand(2, 2, 64, 16, gen=gen) for _ in range(2)]
    ref_caches = [c.clone() for c in caches]
    position = torch.tensor(40, device=DEVICE)
    out = kernels.decode_attention(q, k, v, *caches, position, 64)
    ref = ne.decode_attention.reference(q, k, v, *ref_caches, position, 64)
    assert rel_err(out, ref) < TOL[torch.float32] and torch.equal(caches[1], ref_caches[1])

    H, P, G, N, K = 2, 4, 1, 8, 4
    ch = H * P + 2 * G * N
    xBC, dt = rand(1, ch, gen=gen), rand(H, 1, gen=gen).T
    conv, ssm = rand(1, ch, K - 1, gen=gen), rand(1, H, P, N, gen=gen)
    args = (rand(ch, 1, K, gen=gen), *(every_other(rand(n, gen=gen)) for n in (ch, H, H, H)),
            G, (0.0, float("inf")))
    ref_conv, ref_ssm = conv.clone(), ssm.clone()
    y = kernels.mamba_step(xBC, dt, conv, ssm, *args)
    y_ref = ne.mamba_step.reference(xBC, dt, ref_conv, ref_ssm, *args)
    assert rel_err(y, y_ref) < TOL[torch.float32] and rel_err(ssm, ref_ssm) < TOL[torch.float32]

    logits, bias = rand(3, 8, gen=gen), every_other(rand(8, gen=gen) * 3)
    config = dataclasses.replace(CONFIGS["A"], n_routed_experts=8, num_experts_per_tok=3)
    assert torch.equal(kernels.select_experts(logits, bias, config)[1].sort(1).values,
                       ne.select_experts.reference(logits, bias, config)[1].sort(1).values)

    x, w = rand(3, 40, gen=gen), every_other(rand(40, gen=gen))
    assert rel_err(kernels.rms_norm(x, w, 1e-5), ne.rms_norm.reference(x, w, 1e-5)) < 2e-5
    with pytest.raises(ValueError, match="40 channels do not split into 3 groups"):
        kernels.rms_norm(x, w, 1e-5, groups=3)

    x, weights, experts, up_w, up_s, down_w, down_s = moe_inputs(5, 3, True, torch.float32)
    up_s, down_s = every_other(up_s), every_other(down_s)
    assert rel_err(kernels.moe_experts(x, weights, experts, up_w, up_s, down_w, down_s),
                   ne.moe_experts.reference(x, weights, experts, up_w, up_s, down_w,
                                            down_s)) < TOL[torch.float32]
    empty = kernels.linear(rand(0, 40, gen=gen), rand(24, 40, gen=gen))
    assert empty.shape == (0, 24)


@pytest.mark.parametrize("raw", [-7.0, -9.0, -12.0, -20.0])
def test_mamba_step_softplus_keeps_small_dt(raw):
    """dt = softplus(dt + dt_bias) as accurate as torch's where 1 + exp(raw) rounds: from a zero
    state without the D skip, the state and output are dt x B^T and its read-out."""
    gen = torch.Generator().manual_seed(1)
    H, P, G, N, K = 2, 4, 1, 8, 4
    ch = H * P + 2 * G * N
    xBC, dt = rand(1, ch, gen=gen), torch.zeros(1, H, device=DEVICE)
    conv, ssm = rand(1, ch, K - 1, gen=gen), torch.zeros(1, H, P, N, device=DEVICE)
    args = (rand(ch, 1, K, gen=gen), rand(ch, gen=gen), torch.full((H,), raw, device=DEVICE),
            rand(H, gen=gen), torch.zeros(H, device=DEVICE), G, (0.0, float("inf")))
    ref_conv, ref_ssm = conv.clone(), ssm.clone()
    y = kernels.mamba_step(xBC, dt, conv, ssm, *args)
    y_ref = ne.mamba_step.reference(xBC, dt, ref_conv, ref_ssm, *args)
    assert rel_err(y, y_ref) < TOL[torch.float32] and rel_err(ssm, ref_ssm) < TOL[torch.float32]


# --------------------------------------------------------------------------------------------------
# Routing, and the whole model with kernels == with references

def test_routing(monkeypatch):
    x, w = torch.randn(2, 8, device=DEVICE), torch.randn(3, 8, device=DEVICE)

    def boom(*_, **__):
        raise RuntimeError("kernel called")
    monkeypatch.setattr(kernels, "linear", boom)
    with pytest.raises(RuntimeError, match="kernel called"):
        ne.linear(x, w)  # NANOELASTIC_KERNELS=triton: kernels (interpreted, on a CPU)
    monkeypatch.setattr(ne, "INTERPRET", False)  # as on a GPU machine: CPU tensors cannot go there
    with pytest.raises(ne.NanoElasticError, match="on the CPU needs TRITON_INTERPRET=1"):
        ne.linear(x.cpu(), w.cpu())
    monkeypatch.setattr(ne, "KERNELS", "torch")
    ne.linear(x, w)
    monkeypatch.setattr(ne, "KERNELS", "")
    assert ne.use_kernels(x.to(DEVICE)) == CUDA  # unset: kernels exactly on CUDA tensors
    monkeypatch.setattr(ne, "KERNELS", "cuda")
    with pytest.raises(ne.NanoElasticError, match="NANOELASTIC_KERNELS='cuda'"):
        ne.linear(x, w)


def test_a_reference_is_torch_all_through(monkeypatch):
    """.reference runs the routed calls it makes on their references too: the MoE reference's
    per-expert linear() must not reach the kernels (bench.py would time Triton against Triton)."""
    calls, real_linear = [], kernels.linear
    monkeypatch.setattr(kernels, "linear", lambda *args: calls.append(1) or real_linear(*args))
    x, weights, experts, up_w, up_s, down_w, down_s = moe_inputs(5, 3, True, torch.float32)
    ne.moe_experts.reference(x, weights, experts, up_w, up_s, down_w, down_s)
    assert not calls and ne.KERNELS == "triton"  # the routing as it was (triton_everywhere)
    ne.linear(x, up_w[0], up_s[0])  # routed: the kernels
    assert calls


@pytest.mark.parametrize("name,fp8,size,load", [("A", True, "40x16", False),
                                               ("A", True, "40x16", True),
                                               ("B", False, None, False)])
def test_model_with_kernels_matches_references(tmp_path, monkeypatch, name, fp8, size, load):
    """load: the nested size loaded alone (size= in from_pretrained: its own, contiguous tensors,
    read onto the device) and run at its full size."""
    path = checkpoint.write_random_checkpoint(tmp_path / "ckpt", CONFIGS[name],
                                              fp8=fp8, shards=2, seed=3)
    model = ne.Model.from_pretrained(path, device=DEVICE, dtype=torch.float32, verbose=False,
                                     size=size if load else None)
    size = None if load else size  # what was loaded is the nested size: run it whole
    tokens = torch.randint(0, CONFIGS[name].vocab_size, (1, 12),
                           generator=torch.Generator().manual_seed(1))

    def run():  # prefill 10 tokens, decode 2: every kernel is used
        cache = model.new_cache(1, 16)
        prefill = model(tokens[:, :10], cache, size=size)
        steps = [model(tokens[:, i:i + 1], cache, size=size) for i in (10, 11)]
        return torch.cat([prefill, *steps], dim=1), cache

    logits, cache = run()
    monkeypatch.setattr(ne, "KERNELS", "torch")
    logits_ref, cache_ref = run()
    assert rel_err(logits, logits_ref) < 1e-5
    assert torch.equal(logits.argmax(-1), logits_ref.argmax(-1))
    for state, state_ref in zip(cache.layers, cache_ref.layers):  # KV, conv and SSM states
        for t, t_ref in zip(state or (), state_ref or ()):
            assert rel_err(t, t_ref) < 1e-5


@pytest.mark.parametrize("seed", range(4))
def test_kernels_in_the_model_on_random_configs(monkeypatch, seed):
    """The kernels in the model on test_nanoelastic's random configs (conv widths, SSM groups,
    head and state sizes, a random nested size): two sequences prefilled, then decoded."""
    config, size = random_config(seed)
    model = checkpoint.random_model(config, device=DEVICE, dtype=torch.float32,
                                    fp8=seed % 2 == 1, seed=seed)
    tokens = torch.randint(0, config.vocab_size, (2, 9 + seed),
                           generator=torch.Generator().manual_seed(seed)).to(DEVICE)

    def run():
        cache = model.new_cache(2, 32)
        cut = 3 + seed
        prefill = model(tokens[:, :cut], cache, size=size)
        steps = [model(tokens[:, i:i + 1], cache, size=size) for i in range(cut, tokens.shape[1])]
        return torch.cat([prefill, *steps], dim=1)

    logits = run()
    monkeypatch.setattr(ne, "KERNELS", "torch")
    assert rel_err(logits, run()) < 1e-5


@pytest.mark.parametrize("batch", [1, 2])  # one token's MoE path, and the grouped one
def test_decode_step_has_no_host_sync(tmp_path, monkeypatch, batch):
    """The decode step (model(), one token, with a cache) must not wait for the host, so that a CUDA
    graph can capture it: nothing but forward()'s check of the token ids, which DecodeGraph skips
    while it captures. Under the interpreter the kernel launches themselves are replaced (the
    interpreter copies tensors to the host); on a GPU they run, under torch.cuda's sync check."""
    path = checkpoint.write_random_checkpoint(tmp_path / "ckpt", CONFIGS["A"], fp8=True, shards=1)
    model = ne.Model.from_pretrained(path, device=DEVICE, dtype=torch.float32, verbose=False)
    cache = model.new_cache(batch, 16)
    model(torch.randint(0, 97, (batch, 5)).to(DEVICE), cache)
    launches = record_launches(monkeypatch)
    token = torch.tensor([[3], [4]][:batch], device=DEVICE)
    forbid_host_syncs(monkeypatch)
    try:
        with pytest.raises(AssertionError, match="host synchronisation"):
            model(token, cache)  # the guard works: forward() checks token ids on the host
        # as when capturing
        monkeypatch.setattr(ne, "checked_tokens", lambda tokens, vocab_size: tokens)
        model(token, cache, "40x16")
        model(token, cache)
    finally:
        if CUDA:
            torch.cuda.set_sync_debug_mode("default")
        monkeypatch.undo()
    assert int(cache.position) == 7
    if kernels._INTERPRET:
        assert {"_matmul_kernel", "_select_experts_kernel", "_mamba_step_kernel",
                "_rms_norm_kernel", "_decode_attention_kernel"} <= set(launches)


def test_decode_graph_refuses_an_interrupted_cache(tmp_path):
    """A step cut short (Ctrl-C) leaves its cache half-written: every later step says so, the first
    one included, which on a GPU would capture a new graph first (a capture that fails must not
    clear the mark)."""
    path = checkpoint.write_random_checkpoint(tmp_path / "ckpt", CONFIGS["A"], fp8=True, shards=1)
    model = ne.Model.from_pretrained(path, device=DEVICE, dtype=torch.float32, verbose=False)
    cache = model.new_cache(1, 16)
    model(torch.randint(0, 97, (1, 5)).to(DEVICE), cache)
    step = ne.DecodeGraph(model, cache)
    cache.begin(1, 1)  # a step begun, then interrupted
    for _ in range(2):
        with pytest.raises(ne.NanoElasticError, match="interrupted"):
            step(torch.tensor([[3]], device=DEVICE))
    assert cache.interrupted and not step.graphs and cache.length == 5


class CountOps(TorchDispatchMode):
    """Counts the torch ops that do device work: not views, not bare allocations, not the ones
    that make no tensor (torch.promote_types)."""
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if not func.is_view and not name.startswith("empty") and isinstance(out, torch.Tensor):
            self.ops[name] += 1
        return out


def test_decode_step_launches_few_kernels(monkeypatch):
    """Replayed from a CUDA graph, every kernel costs a few microseconds whatever it does: at batch
    1 that overhead, not the weights' bytes, would bound decode. So the step of the real 52-layer
    pattern (narrow widths) launches at most 7 kernels and torch ops per layer (about 6 now; 25
    when the router was ten torch ops and the batch-1 MoE grouped its pairs in twenty more, 9
    before the routed outputs were summed inside the shared expert's down-projection and before
    decode_attention and the one-launch mamba_step)."""
    config = dataclasses.replace(ne.Config(), hidden_size=128, moe_intermediate_size=64,
                                 moe_shared_expert_intermediate_size=128, mamba_num_heads=8,
                                 mamba_head_dim=16, ssm_state_size=16, n_groups=2,
                                 num_attention_heads=4, head_dim=32, vocab_size=1024)
    model = checkpoint.random_model(config, DEVICE, torch.bfloat16, fp8=True, seed=0)
    cache = model.new_cache(1, 16)  # empty: the first token is decoded like any other
    monkeypatch.setattr(ne, "checked_tokens", lambda tokens, vocab_size: tokens)  # as captured
    launches = record_launches(monkeypatch)
    token = torch.tensor([[7]], device=DEVICE)
    with CountOps() as counted:
        model(token, cache, last_only=True)
    layers = len(config.layers_block_type)
    assert {"_select_experts_kernel", "_matmul_kernel"} <= set(launches)
    assert len(launches) + counted.ops.total() <= 7 * layers, (len(launches), counted.ops)


if CUDA:  # programs that run at once exist only there
    @pytest.mark.parametrize("pdl", [False, True])
    def test_merging_kernels_repeat_bit_for_bit(monkeypatch, pdl):
        """The kernels whose last program of a group merges the group's work (split-K linear,
        decode_attention, mamba_step's shared conv window) give the same bits every time: a
        missing barrier or a ticket taken too early shows as a result that moves between runs.
        With PDL each launch overlaps the one before: a wait placed too late shows the same way."""
        monkeypatch.setattr(kernels, "PDL", pdl)
        gen = torch.Generator().manual_seed(0)
        bf16 = torch.bfloat16
        w, scale = weight(2688, 4096, True, bf16, gen)  # out_proj: 84 tiles, K split
        x = rand(1, 4096, dtype=bf16, gen=gen)
        q, k, v = (rand(1, H, 1, 128, dtype=bf16, gen=gen) for H in (32, 2, 2))
        caches = [rand(1, 2, 8192, 128, dtype=bf16, gen=gen) for _ in range(2)]
        position = torch.tensor(5000, device=DEVICE)
        H, P, G, N, K = 64, 64, 8, 128, 4
        ch = H * P + 2 * G * N
        step_in = (rand(1, ch, dtype=bf16, gen=gen), rand(1, H, dtype=bf16, gen=gen),
                   rand(1, ch, K - 1, dtype=bf16, gen=gen), rand(1, H, P, N, gen=gen))
        step_args = (rand(ch, 1, K, dtype=bf16, gen=gen), rand(ch, dtype=bf16, gen=gen),
                     rand(H, gen=gen), rand(H, gen=gen), rand(H, gen=gen), G, (0.0, float("inf")))

        def run():
            states = [t.clone() for t in step_in[2:]]
            y = kernels.mamba_step(*step_in[:2], *states, *step_args)
            o = kernels.decode_attention(q, k, v, *[c.clone() for c in caches], position, 8192)
            return [kernels.linear(x, w, scale), o, y, *states]

        first = run()
        for _ in range(30):
            assert all(torch.equal(a, b) for a, b in zip(run(), first))
        assert kernels._TICKETS[x.device][-1].count_nonzero() == 0

    @pytest.mark.parametrize("batch", [1, 2])  # one token's MoE path, and the grouped one
    @pytest.mark.parametrize("pdl", [False, True])  # the graph's launches overlapping, or not
    def test_decode_graph_matches_eager(tmp_path, monkeypatch, batch, pdl):
        path = checkpoint.write_random_checkpoint(tmp_path / "ckpt", CONFIGS["A"],
                                                  fp8=True, shards=1)
        model = ne.Model.from_pretrained(path, device="cuda", dtype=torch.float32, verbose=False)
        tokens = torch.randint(0, 97, (batch, 9), device="cuda")
        eager, graphed = model.new_cache(batch, 16), model.new_cache(batch, 16)
        graph = ne.DecodeGraph(model, graphed)
        assert graph.capture_graphs
        for cache in (eager, graphed):
            model(tokens[:, :5], cache, size="40x16")
        for i in range(5, 9):
            size = "40x16" if i < 7 else None  # a size switch between graph steps
            expected = model(tokens[:, i:i + 1], eager, size=size)[:, -1]
            monkeypatch.setattr(kernels, "PDL", pdl)  # the graph's kernels only
            got = graph(tokens[:, i:i + 1], size)
            monkeypatch.setattr(kernels, "PDL", False)
            assert rel_err(got, expected) < 1e-5
        assert graphed.length == eager.length == 9 and int(graphed.position) == 9


@pytest.mark.parametrize(
    "rows,C", [(1, 48), (9, 40), (33, 1000)] + ([(1, 2688), (8192, 2688)] if CUDA else []))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_rms_norm(rows, C, dtype):
    gen = torch.Generator().manual_seed(rows + C)
    h, update = rand(rows, C, dtype=dtype, gen=gen), rand(2, rows, C, dtype=dtype, gen=gen)[1]
    w = rand(C, gen=gen).to(dtype)
    out, total = kernels.add_rms_norm(h, update, w, 1e-5)
    # the residual stream
    assert total.dtype == dtype and rel_err(total, h.float() + update.float()) < TOL[dtype]
    ref = ne.rms_norm.reference(total.float(), w.float(), 1e-5)
    assert out.dtype == dtype and rel_err(out, ref) < TOL[dtype]
    out_first, same = kernels.add_rms_norm(h, None, w, 1e-5)  # the first layer: nothing to add yet
    assert (same is h
            and rel_err(out_first, ne.rms_norm.reference(h.float(), w.float(), 1e-5)) < TOL[dtype])
