"""
The compile test: every Triton kernel launch the model makes, compiled for an H100 (and the FP8
30B's for an L40S and an A100) on a machine without a GPU.

Most machines that run this suite (CI among them) have no GPU, and Triton's interpreter, which runs
the kernels there, is no compiler: it never shows a kernel that fails to compile for a GPU, spills
registers to local memory, or asks for more shared memory than a block has. Triton can compile for
a GPU that is not there (`triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`), and
the ptxas that ships in Triton's wheel reports what the cubin uses. So this test

  1. records the launches a real-width model makes: Config()'s widths (the 30B's) with one layer of
     each kind (Mamba-2, MoE, attention), at the 30B, 23B and 12B sizes, FP8 and BF16 weights, bf16
     and fp32 activations, prefill and decode at the row counts that choose each block-size branch;
     and the FP8 bf16 30B's launches once more for sm_89 and for sm_80, as GPUs before Hopper
     make them (FP8 weights as bytes: kernels._weight_operand). Launch arguments depend on shapes
     and dtypes, never on values, so the weights are left uninitialised and no kernel runs:
     `JITFunction.run` is replaced by a recorder;
  2. compiles each distinct launch (kernel, argument types, Triton's specialisations, constexprs,
     warps, stages) for its GPU and runs `ptxas -v` on its PTX, in a process per core;
  3. asserts that every launch compiles, that nothing on the bf16 path (what a GPU runs) spills
     more than a few bytes, that every kernel's shared memory fits a block (SHARED), and that each
     ticket (the atomic by which a group's last program finds itself) comes after a barrier.

    python -m pytest -q test_compile.py    # part of the test suite
    python test_compile.py                 # print the table of README.md's kernel section
"""

import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent
# The GPUs compiled for: sm_90 (Hopper, what the block sizes are tuned for), and for the 30B's FP8
# bf16 launches the GPUs before Hopper, where FP8 weights go in as bytes (kernels._weight_operand):
# sm_89 (Ada: L40S, RTX 40xx) and sm_80 (A100). Per GPU, the spills allowed on the bf16 path, in
# bytes: a few at most on sm_90, more on the others (sm_80: Triton 3.9 spills 12 in the router's
# prefill matmul, 3.6 32 in a 64-row FP8 one); and the shared memory a block may use: 99 KiB
# before Hopper, the limit of sm_89 and of sm_86 (A10, RTX 30xx), not the A100's 163.
BEFORE_HOPPER = (89, 80)
SPILL_OK = {90: 8, 89: 64, 80: 64}
SHARED = {90: 227 * 1024, 89: 99 * 1024, 80: 99 * 1024}
# name -> (batch, new tokens): each block-size branch of nanoelastic_kernels.py, bench.py's batches
PHASES = {
    "decode": (1, 1), "decode x8": (8, 1), "decode x32": (32, 1), "prefill 40": (1, 40),
    "prefill 1000": (1, 1000), "prefill 2048": (1, 2048)}
MODES = {  # name -> (FP8 weights, activation dtype name)
    "fp8/bf16": (True, "bfloat16"), "bf16/bf16": (False, "bfloat16"),
    "fp8/fp32": (True, "float32"), "fp32/fp32": (False, "float32")}
PDL_PHASES = ("decode", "decode x8", "prefill 1000")  # also with kernels.PDL, FP8 bf16 30B


# --------------------------------------------------------------------------------------------------
# 1. Recording: run the model with every launch intercepted (this process has no Triton interpreter)

def specialise(value):
    """(type, attribute) of one kernel argument, as Triton's launcher specialises it on a GPU: ints
    equal to 1 become constexprs, ints and pointers divisible by 16 are marked so (what lets loads
    vectorise)."""
    import torch
    if value is None:
        return "constexpr", None
    if isinstance(value, bool):
        return "u1", None
    if isinstance(value, int):
        if value == 1:
            return "constexpr", 1
        kind = "i32" if -2**31 <= value < 2**31 else "i64"
        return kind, "D" if value % 16 == 0 else None
    if isinstance(value, float):
        return "fp32", None
    if isinstance(value, torch.Tensor):
        names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
                 torch.float8_e4m3fn: "fp8e4nv", torch.uint8: "u8", torch.int64: "i64",
                 torch.int32: "i32"}
        return "*" + names[value.dtype], "D" if value.data_ptr() % 16 == 0 else None
    raise TypeError(f"unexpected kernel argument {value!r}")


def fp8_model(ne, model):
    """Make the Linears the FP8 release quantises float8_e4m3fn with a scale (uninitialised
    values)."""
    import torch

    import checkpoint
    quantised = {re.sub(r"experts\.\d+\.", "experts.", n)
                 for n in checkpoint.fp8_recipe(model.config)}
    for name, module in model.named_modules():
        if name in quantised:
            w = module.weight
            module.weight = torch.nn.Parameter(torch.empty_like(w, dtype=torch.float8_e4m3fn),
                                               requires_grad=False)
            module.weight_scale = torch.ones(w.shape[0] if w.dim() == 3 else (),
                                             dtype=torch.float32)
    return model


def record_launches() -> list[dict]:
    """Every distinct launch of the model's phases x sizes x modes, with the cases that made it."""
    os.environ.pop("TRITON_INTERPRET", None)
    from triton.runtime.jit import JITFunction
    seen = {}

    def record(fn, *args, grid, warmup, **kwargs):
        bound = (dict(zip(fn.arg_names, args))
                 | {k: v for k, v in kwargs.items() if k in fn.arg_names})
        options = {k: v for k, v in kwargs.items() if k not in fn.arg_names}
        signature, constexprs, attrs = {}, {}, {}
        for i, p in enumerate(fn.params):
            value = bound[p.name]
            kind, attr = ("constexpr", None) if p.is_constexpr else specialise(value)
            signature[p.name] = kind
            if kind == "constexpr":
                constexprs[p.name] = value
            elif attr:
                attrs[i] = attr
        key = (arch, fn.__name__, repr(signature), repr(constexprs), repr(attrs),
               repr(sorted(options.items())))
        launch = seen.setdefault(key, dict(kernel=fn.__name__, signature=signature,
                                           constexprs=constexprs, attrs=attrs, options=options,
                                           arch=arch, cases=[]))
        launch["cases"].append(case)
        if fn.__name__ == "_select_experts_kernel":  # what no kernel wrote indexes torch ops next
            bound["experts_ptr"].zero_()

    JITFunction.run = record
    import nanoelastic_kernels as kernels  # without the interpreter: JITFunctions, GPU dot dtypes
    os.environ["TRITON_INTERPRET"] = "1"  # lets nanoelastic route CPU tensors to the kernels
    os.environ["NANOELASTIC_KERNELS"] = "triton"
    import torch

    import nanoelastic as ne

    config = ne.Config(layers_block_type=["mamba", "moe", "attention"])
    case, arch = "", 90

    def run(model, size, phase):
        batch, T = PHASES[phase]
        cache = model.new_cache(batch, T + 1)
        if T == 1:  # decode after one prefilled token
            model(torch.zeros(batch, 1, dtype=torch.long), cache, size=size)
        model(torch.zeros(batch, T, dtype=torch.long), cache, size=size)

    for mode, (fp8, dtype_name) in MODES.items():
        model = ne.Model(config).to(getattr(torch, dtype_name))
        if fp8:
            fp8_model(ne, model)
        for size in ("30B", "23B", "12B"):
            for phase in PHASES:
                case = f"{mode} {size} {phase}"
                run(model, size, phase)
        if mode == "fp8/bf16":
            kernels.PDL = True
            for phase in PDL_PHASES:
                case = f"{mode} 30B {phase} PDL"
                run(model, "30B", phase)
            # every phase of the 30B for Ada and for the A100, with FP8 weights as bytes, and
            # kernels.PDL still on, which they launch without (griddepcontrol is sm_90's)
            native, kernels.hopper_or_later = kernels.hopper_or_later, lambda device: False
            for arch in BEFORE_HOPPER:
                for phase in PHASES:
                    case = f"{mode} 30B {phase} sm_{arch}"
                    run(model, "30B", phase)
            arch, kernels.hopper_or_later = 90, native
            kernels.PDL = False
        del model
    for name in ("TRITON_INTERPRET", "NANOELASTIC_KERNELS"):  # for the compiling processes
        os.environ.pop(name)
    return list(seen.values())


# --------------------------------------------------------------------------------------------------
# 2. Compiling for a GPU (sm_90, sm_89 or sm_80) and reading ptxas' report

def ptxas() -> str:
    """The ptxas Triton itself uses for sm_90 (its wheel carries more than one); it compiles for
    sm_89 and sm_80 too."""
    from triton.backends.nvidia import compiler
    try:
        return compiler.get_ptxas(90).path
    except TypeError:  # older Triton: one ptxas
        return compiler.get_ptxas().path


def compile_for_gpu(launch: dict) -> dict:
    """Registers, spill bytes (stores + loads) and shared memory of one launch compiled for its
    GPU (sm_90, sm_89 or sm_80)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend

    import nanoelastic_kernels as kernels  # this process has no interpreter: JITFunctions
    target = GPUTarget("cuda", launch["arch"], 32)
    backend = make_backend(target)
    attrs = {(i,): backend.parse_attr(a) for i, a in launch["attrs"].items()}
    src = ASTSource(getattr(kernels, launch["kernel"]), launch["signature"], launch["constexprs"],
                    attrs)
    compiled = triton.compile(src, target=target, options=launch["options"])
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "kernel.ptx"
        ptx.write_text(compiled.asm["ptx"])
        # the flags Triton compiles with (its ptxas 13 needs --regAllocOptLevel=2), plus -v
        gpu = "sm_90a" if launch["arch"] == 90 else f"sm_{launch['arch']}"
        command = [ptxas(), "-v", "--regAllocOptLevel=2", f"--gpu-name={gpu}", str(ptx),
                   "-o", f"{ptx}.o"]
        report = subprocess.run(command, capture_output=True, text=True, check=True).stderr
    regs = int(re.search(r"Used (\d+) registers", report).group(1))
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", report))
    lines = [line.strip() for line in compiled.asm["ptx"].splitlines()]
    return dict(registers=regs, spill_bytes=spills, shared=compiled.metadata.shared,
                ticket=ticket_order(lines), pdl=pdl_order(lines))


GLOBAL_ACCESS = re.compile(r"\b(ld|st|red|atom|cp\.async)\S*\.global")  # in a line of PTX


def first(lines: list[str], pattern: str) -> int | None:
    """The index of the first line that matches `pattern` (None: none does)."""
    return next((i for i, line in enumerate(lines) if re.search(pattern, line)), None)


def pdl_order(lines: list[str]) -> dict:
    """Where the griddepcontrol instructions of programmatic dependent launch sit in a kernel's
    PTX lines: the global memory accesses before the wait (None: no wait), and whether the next
    kernel's launch comes after it."""
    wait = first(lines, r"^griddepcontrol\.wait")
    launch = first(lines, r"^griddepcontrol\.launch_dependents")
    return dict(before_wait=None if wait is None else sum(bool(GLOBAL_ACCESS.search(line))
                                                           for line in lines[:wait]),
                launch_after_wait=launch is not None and wait is not None and launch > wait)


def ticket_order(lines: list[str]) -> dict | None:
    """Where a kernel's ticket (_last_to_arrive: its acq_rel atomic) sits in its PTX lines: the
    global stores before it, and whether a CTA barrier comes between the last global memory access
    and it (None: no ticket)."""
    atom = first(lines, r"atom\.global\S*acq_rel")
    if atom is None:
        return None
    last_access = max((i for i in range(atom) if GLOBAL_ACCESS.search(lines[i])), default=-1)
    return dict(stores=sum(bool(re.search(r"\bst\S*\.global", line)) for line in lines[:atom]),
                barrier=any(line.startswith("bar.sync") for line in lines[last_access + 1:atom]))


def results() -> list[dict]:
    """One row per distinct launch: kernel, its constexprs, the cases that make it, and what it
    uses."""
    launches = record_launches()
    # compiling is CPU work, one launch at a time: a process per core (spawned, not forked from
    # this process's threads)
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(os.cpu_count(), mp_context=spawn) as pool:
        usages = list(pool.map(compile_for_gpu, launches))
    rows = []
    for launch, usage in zip(launches, usages):
        consts = {k: str(v) for k, v in launch["constexprs"].items() if v is not None}
        rows.append(dict(kernel=launch["kernel"], constexprs=consts, options=launch["options"],
                         cases=launch["cases"], arch=launch["arch"],
                         weight=launch["signature"].get("w_ptr"), **usage))
    return rows


def run_in_subprocess() -> list[dict]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRITON_INTERPRET", "NANOELASTIC_KERNELS")}
    out = subprocess.run([sys.executable, str(ROOT / "test_compile.py"), "--json"],
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.splitlines()[-1])


def path(row: dict) -> str:
    """'bf16' for launches a GPU makes with bf16 activations (what users run), 'fp32' for the tests'
    exact mode; a launch made by both counts as bf16."""
    return "bf16" if any(case.split()[0].endswith("/bf16") for case in row["cases"]) else "fp32"


# --------------------------------------------------------------------------------------------------
# 3. The test, and the table

def test_every_launch_compiles_for_each_gpu_without_spills():
    rows = run_in_subprocess()
    kernels = {"_matmul_kernel", "_select_experts_kernel", "_ssd_chunk_state_kernel",
               "_ssd_state_passing_kernel", "_ssd_chunk_scan_kernel", "_mamba_step_kernel",
               "_rms_norm_kernel", "_decode_attention_kernel"}
    for arch in SHARED:
        assert {r["kernel"] for r in rows if r["arch"] == arch} == kernels
    cases = {c for r in rows for c in r["cases"]}
    # every case launched kernels
    assert len(cases) == (len(MODES) * 3 * len(PHASES) + len(PDL_PHASES)
                          + len(BEFORE_HOPPER) * len(PHASES))
    # before Hopper, FP8 weights are bytes
    for arch in BEFORE_HOPPER:
        weights = {r["weight"] for r in rows
                   if r["kernel"] == "_matmul_kernel" and r["arch"] == arch}
        assert "*u8" in weights and "*fp8e4nv" not in weights
    pdl = [r for r in rows if r["constexprs"].get("PDL") == "True"]
    assert {r["kernel"] for r in pdl} == {r["kernel"] for r in rows}  # every kernel takes it
    assert {r["arch"] for r in pdl} == {90}  # (ptxas refuses griddepcontrol before sm_90)
    for r in rows:  # with PDL: the wait before any global memory access, then the next launch
        on = r in pdl
        assert r["options"].get("launch_pdl") == on, r
        assert (r["pdl"] == dict(before_wait=0, launch_after_wait=True) if on
                else r["pdl"] == dict(before_wait=None, launch_after_wait=False)), r
    assert any(r["kernel"] == "_matmul_kernel" and r["ticket"] for r in rows)  # split K
    for r in rows:
        assert r["shared"] <= SHARED[r["arch"]], r
        assert r["spill_bytes"] <= (SPILL_OK[r["arch"]] if path(r) == "bf16" else 1024), r
        # the merging kernels' ticket: a barrier first, so that every thread's writes (and reads)
        # are done before the program counts itself in
        if r["kernel"] in ("_mamba_step_kernel", "_decode_attention_kernel"):
            assert r["ticket"] is not None, r
        assert r["ticket"] is None or r["ticket"]["barrier"], r
        # mamba_step shifts conv windows in place that all its warps read (each a copy): a store
        # before its ticket's barrier would race with a slower warp's loads of the same inputs
        if r["kernel"] == "_mamba_step_kernel":
            assert r["ticket"]["stores"] == 0, r


def table(rows: list[dict]) -> str:
    """One line per kernel, GPU, path and block shape; the worst of its variants (argument
    alignments, sizes)."""
    groups = {}
    for r in rows:
        blocks = ", ".join(f"{k}={v}" for k, v in r["constexprs"].items() if k.startswith("BLOCK"))
        warps = r["options"].get("num_warps", 4)
        key = (r["kernel"].strip("_"), -r["arch"], path(r), blocks, warps)  # the newest GPU first
        groups.setdefault(key, []).append(r)
    lines = [("| kernel | GPU | activations | blocks | warps | variants | registers | spills (B) | "
              "shared (KiB) |"),
             "|---|---|---|---|---:|---:|---:|---:|---:|"]
    for (kernel, minus_arch, act, blocks, warps), g in sorted(groups.items()):
        worst = lambda key: max(r[key] for r in g)
        lines.append(f"| {kernel} | sm_{-minus_arch} | {act} | {blocks} | {warps} | {len(g)} | "
                     f"{worst('registers')} | {worst('spill_bytes')} | "
                     f"{worst('shared') / 1024:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    if "--json" in sys.argv:
        print(json.dumps(results()))
    else:
        print(table(run_in_subprocess()))
