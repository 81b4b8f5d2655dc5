"""Tests of bench.py on the CPU: the small config end to end (kernels under TRITON_INTERPRET=1, the
model with the torch references), the byte accounting that the bandwidth figures rest on, and
--budget on the demo checkpoint (grading, the switch at the budget, resume, the JSON and the
plot)."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

import pytest
import torch

import bench
import nanoelastic as ne

ROOT = Path(__file__).resolve().parent


def test_bench_small_end_to_end(tmp_path):
    out = tmp_path / "bench.json"
    # as a user runs it: no environment variables (on a CPU bench.py runs the kernels in Triton's
    # interpreter)
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRITON_INTERPRET", "NANOELASTIC_KERNELS")}
    run = subprocess.run([sys.executable, "bench.py", "--small", "--batch", "1", "2",
                          "--json", str(out)],
                         capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(out.read_text())
    # the JSON line printed after the tables
    assert json.loads(run.stdout.strip().splitlines()[-1]) == result
    assert result["ceilings"]["copy_GBps"] > 0 and result["ceilings"]["matmul_TFLOPs"] > 0
    kernels = {r["kernel"]: r for r in result["kernel_bench"]}
    assert {"linear", "select", "moe", "ssd", "mamba", "gated"} <= {k.split()[0] for k in kernels}
    assert all(r["rel_err"] < 2e-2 and r["triton_us"] > 0 and r["torch_us"] > 0
               for r in kernels.values())

    decode = {(r["model"], r["batch"]): r for r in result["model_bench"]["decode"]}
    hopper = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)
    pdl = {("full (view, PDL)", 1)} if hopper else set()  # Hopper: a PDL row too
    assert set(decode) == pdl | {(m, b) for b in (1, 2)
                                 for m in ("full (view)", "mid (view)", "small (view)",
                                           "mid (sliced copy)", "small (sliced copy)")}
    for b in (1, 2):
        full, mid, small = (decode[(m, b)]["GB_per_step"]
                            for m in ("full (view)", "mid (view)", "small (view)"))
        assert full > mid > small  # smaller sizes read fewer bytes
        for m in ("mid", "small"):  # a view reads exactly the bytes of its contiguous copy
            view, copy = decode[(f"{m} (view)", b)], decode[(f"{m} (sliced copy)", b)]
            assert view["GB_per_step"] == copy["GB_per_step"]
            assert view["cache_GB"] == copy["cache_GB"] > 0  # the same shapes of state
            assert view["pct_of_sliced"] == 100 * view["tok_per_s"] / copy["tok_per_s"]
    assert all(r["tok_per_s"] > 0 for r in decode.values())
    assert result["model_bench"]["largest_cache_GB"] == max(
        r["cache_GB"] for (m, _), r in decode.items() if "view" in m)
    assert [r["length"] for r in result["model_bench"]["prefill"]] == [128, 512]
    switch = result["model_bench"]["switch"]
    assert switch["reprefill_ms"] > 0 and switch["same_size_step_ms"] > 0
    assert switch["switch_overhead_ms"] == pytest.approx(
        switch["transplant_ms"] - switch["same_size_step_ms"])
    profile = result["model_bench"]["profile"]  # on a CPU: torch ops of eager steps
    assert profile["launches_per_step"] > 0 and 0 < profile["kernel_us"] <= profile["step_us"]
    what = "CUDA kernels of graph replays" if torch.cuda.is_available() else "top-level torch ops"
    assert f"batch-1 decode of the 256x128, by {what}" in run.stdout


def test_bench_times_a_wrong_kernel_and_fails_after_the_rest(tmp_path, monkeypatch):
    """A kernel that differs from its torch reference (a GPU's bf16 dots would be the first to
    show one) is measured and written like the others, and the run fails at the end, naming it:
    stopping at it would lose every number after it."""
    import nanoelastic_kernels as kernels
    cases = [case for case in bench.kernel_cases(small=True)
             if case[1] in ("rms_norm", "select_experts")]
    monkeypatch.setattr(bench, "kernel_cases", lambda small: cases)
    monkeypatch.setattr(kernels, "rms_norm", lambda x, *args: 2 * x)
    out = tmp_path / "bench.json"
    with pytest.raises(SystemExit, match=r"differ \(relative error over 0.02\): gated rms_norm 1x"):
        bench.main(["--small", "--only", "kernels", "--json", str(out)])
    rows = json.loads(out.read_text())["kernel_bench"]
    assert [r["kernel"] for r in rows] == [case[0] for case in cases]
    assert ([r["rel_err"] > bench.TOLERANCE for r in rows]
            == [case[1] == "rms_norm" for case in cases])


def test_bench_cut_short_writes_what_it_measured(tmp_path):
    """.ci/gpu runs the bench under `timeout`: its SIGTERM ends the run with the numbers measured
    so far in --json, since a device call is too dear to lose to its last minute."""
    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRITON_INTERPRET", "NANOELASTIC_KERNELS")}
    run = subprocess.Popen([sys.executable, "bench.py", "--small", "--json", str(out)], cwd=ROOT,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    for line in run.stderr:
        if line.startswith("bench.py: {"):  # the first kernel row is measured
            break
    run.send_signal(signal.SIGTERM)
    stderr = run.communicate(timeout=120)[1]
    assert run.returncode == 143 and "Traceback" not in stderr, stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["ceilings"]["copy_GBps"] > 0 and result["kernel_bench"]
    assert "model_bench" not in result


def test_decode_bytes_counts_what_a_step_reads():
    config = ne.DEMO_CONFIG
    with torch.device("meta"):
        model = ne.Model(config)
    cache = ne.Cache(config, 2, 64, "meta", torch.bfloat16)
    moe_layers = [i for i, kind in enumerate(config.layers_block_type) if kind == "moe"]
    touched = {i: 3 for i in moe_layers}
    parts = bench.decode_bytes(model, cache, batch=2, touched=touched)
    D, E, Fe = config.hidden_size, config.n_routed_experts, config.moe_intermediate_size
    params = sum(p.numel() for p in model.parameters()) * 4  # meta Parameters are fp32
    # up and down of the experts nobody chose
    untouched = len(moe_layers) * (E - 3) * 2 * Fe * D * 4
    embeddings = (config.vocab_size - 2) * D * 4  # only 2 rows read
    kv = sum(t.numel() for s, k in zip(cache.layers, config.layers_block_type)
             if k == "attention" for t in s) * 2
    mamba = sum(t.numel() * t.element_size() for s, k in zip(cache.layers, config.layers_block_type)
                if k == "mamba" for t in s) * 2
    assert sum(parts.values()) == params - untouched - embeddings + kv + mamba
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, ne.Linear)) * 4
    assert parts["linear"] == linear - untouched  # what the matmul kernel reads
    assert parts["kv cache"] == kv and parts["mamba states"] == mamba


def test_kernel_timeline_splits_a_step_into_kernels_and_gaps():
    # two steps of 30 us; "b" overlaps "a" (another stream): busy time counts it once
    intervals = [("a", 0, 10), ("b", 5, 15), ("a", 20, 30), ("_matmul_kernel_x", 40, 50)]
    p = bench.kernel_timeline(intervals, steps=2, step_us=30, nbytes={"_matmul_kernel": 1000},
                              copy_GBps=1.0)
    assert (p["kernel_us"], p["gap_us"], p["launches_per_step"]) == (17.5, 12.5, 2)
    rows = {r["kernel"]: r for r in p["kernels"]}
    assert [r["kernel"] for r in p["kernels"]] == ["a", "b", "_matmul_kernel_x"]  # by time
    assert rows["a"]["per_step"] == 1 and rows["a"]["us_per_step"] == 10
    assert rows["a"]["pct_step"] == pytest.approx(100 / 3) and "GBps" not in rows["a"]
    # idle before a launch: none before the first, none where "b" starts inside "a", 5 us before
    # the second "a" (after "b" ends) and 10 us before the matmul; per step
    assert [rows[k]["idle_before_us"] for k in ("a", "b", "_matmul_kernel_x")] == [2.5, 0, 5]
    # 1000 bytes a step in 5 us a step: 0.2 GB/s, 20 % of a 1 GB/s copy
    matmul = rows["_matmul_kernel_x"]
    assert matmul["GBps"] == pytest.approx(0.2) and matmul["pct_copy_bw"] == pytest.approx(20)
    report = bench.profile_report({"model": "30B", "timeline": "kernels", **p})
    assert "30 us a step, kernels busy 18 us, gaps 12 us, 2 launches" in report
    assert report.splitlines()[-1].split() == ["_matmul_kernel_x", "0.5", "5.0", "16.7", "5.0", "0",
                                             "20"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the full benchmark runs")
def test_bench_without_gpu_says_so():
    run = subprocess.run([sys.executable, "bench.py"], capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "no GPU here" in run.stderr and "Traceback" not in run.stderr


# --------------------------------------------------------------------------------------------------
# bench.py --budget: grading, the switch at the budget, resume, the JSON and the plot (on the demo)

@pytest.mark.parametrize("text, expected", [
    ("so the answer is \\boxed{42}.", "42"),
    ("\\boxed{1} then \\boxed{2}", "2"),  # the last box
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # nested braces
    ("\\boxed{\\text{(B)}} done", "\\text{(B)}"),
    ("\\boxed{7} and then \\boxed{\\frac{3}{", "7"),  # a cut-off last box: the one before
    ("\\boxed {5}", "5"),
    ("\\boxed{}", ""),
    ("12 apples and 30 pears, 42 in all.", "42"),  # no box: the last number
    ("costs 1,000 dollars", "1,000"),
    ("the list 1, 2, 3", "3"),
    ("x = -3.5 or .5", ".5"),
    ("it is -7", "-7"),
    ("no numbers here", None),
    ("", None),
    ("3.14 then \\boxed{\\sqrt{2}} then 5", "\\sqrt{2}"),  # a box wins over later numbers
])
def test_extract_answer(text, expected):
    assert bench.extract_answer(text) == expected


@pytest.mark.parametrize("predicted, reference, correct", [
    ("1,000", "1000", True), ("1000.0", "1000", True), ("1000", "1,000", True),
    ("1 000", "1000", True), ("$42$", "42", True), ("42.", "42", True), ("42", 42, True),
    ("0.5", ".5", True), ("-3", "-3.0", True), ("\\text{(B)}", "(B)", True),
    ("\\dfrac{1}{2}", "\\frac{1}{2}", True), ("\\frac {1} {2}", "\\frac{1}{2}", True),
    ("50\\%", "50", True), ("1\\,000", "1000", True), ("12", "The answer is \\boxed{12}.", True),
    ("9007199254740993", "9007199254740992", False),  # exact, not float, equality
    ("41", "42", False), ("1,00", "100", False), ("(A)", "(B)", False), ("", "0", False),
    (None, "42", False), ("0.333", "\\frac{1}{3}", False), ("\\$18", "18", True),
    # exact numbers in any of the forms; a variable's name in front
    ("0.5", "1/2", True), ("\\frac12", "\\frac{1}{2}", True), ("-\\frac{3}{4}", "-0.75", True),
    ("2/4", "\\dfrac{1}{2}", True), ("1/3", "0.333", False), ("1/0", "0", False),
    ("x = 4", "4", True), ("4", "$x=4$", True), ("y=-2", "-2", True), ("x==4", "4", False),
])
def test_is_correct(predicted, reference, correct):
    assert bench.is_correct(predicted, reference) is correct


def test_kept_replies_are_graded_again(tmp_path):
    """A reply kept in results.jsonl counts as the grader says now, not as it said when written."""
    results = tmp_path / "results.jsonl"
    record = {"key": ["demo", 1], "predicted": "0.5", "reference": "1/2", "correct": False}
    results.write_text(json.dumps(record) + "\n")
    assert bench.read_results(results)[("demo", 1)]["correct"] is True


def test_summarize_and_the_pareto_frontier():
    def record(think, budget, correct, latency):
        return {"think": think, "answer": "30B", "budget": budget, "correct": correct,
                "latency_s": latency, "first_token_s": 0.1, "think_tokens": budget,
                "answer_tokens": 3, "think_steps": budget, "think_s": budget / 100,
                "answer_steps": 3, "answer_s": 0.3, "budget_hit": True, "finished": True}
    records = ([record("12B", 8, c, t) for c, t in ((True, 1.0), (False, 2.0))]  # 50 %, 1.5 s
               + [record("23B", 8, c, t) for c, t in ((True, 1.0), (True, 3.0))]  # 100 %, 2 s
               # 50 %, 3 s: dominated
               + [record("23B", 16, c, t) for c, t in ((True, 3.0), (False, 3.0))]
               + [record("12B", 16, False, t) for t in (1.0, 1.0)])  # 0 %, 1 s: the fastest
    rows = bench.summarize(records, [("12B", "30B"), ("23B", "30B")], [8, 16])
    by = {(r["think"], r["budget"]): r for r in rows}
    assert by["12B", 8]["accuracy"] == 0.5 and by["23B", 8]["accuracy"] == 1.0
    assert (by["12B", 8]["latency_mean_s"] == 1.5
            and by["12B", 8]["latency_p90_s"] == pytest.approx(1.9))
    assert (by["23B", 16]["think_tok_per_s"] == pytest.approx(100)
            and by["23B", 16]["answer_tok_per_s"] == pytest.approx(10))
    assert {k for k, r in by.items() if r["frontier"]} == {("12B", 16), ("12B", 8), ("23B", 8)}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """chat.py's demo model and tokenizer, as bench.py --budget --demo loads them."""
    import chat
    model, tokenizer = chat.load(Namespace(demo=True, ckpt=None, think="23B", answer="30B"),
                                 str(tmp_path_factory.mktemp("demo")))
    return model, tokenizer, chat.DEMO_SIZES


@pytest.mark.parametrize("switch", ["transplant", "reprefill"])
def test_budget_switches_size_at_the_budget_for_every_configuration(demo, switch):
    import chat
    model, tokenizer, names = demo
    args = Namespace(switch=switch, max_new_tokens=12, temperature=1.0, top_p=1.0)  # seeded below
    prompt = tokenizer.encode(chat.render_chat([{"role": "user", "content": "What is 17 * 23?"}],
                                               add_generation_prompt=True))
    step, budget, at_budget = ne.DecodeGraph(model, model.new_cache(1, len(prompt) + 12)), 4, 0
    for think, answer in bench.parse_configs(bench.BUDGET_CONFIGS):
        record, tokens = bench.solve(model, tokenizer, step, prompt, names[think], names[answer],
                                     budget, args, 0)
        ids = [t.id for t in tokens]
        body = ids[:len(ids) - record["finished"]]  # without the stop token
        end = body.index(tokenizer.think_end) if tokenizer.think_end in body else len(body)
        # </think> by the model, or forced after 4
        assert end <= budget and record["think_tokens"] == end
        assert [t.size for t in tokens] == ([names[think]] * min(end + 1, len(ids))
                                            + [names[answer]] * (len(ids) - end - 1))
        assert record["answer_tokens"] == len(body[end + 1:])
        assert (record["think_steps"] + record["answer_steps"] == len(ids) - 1
                and record["latency_s"] > 0)
        assert record["reply"] == tokenizer.decode(body[end + 1:])
        if end == budget:
            at_budget += 1
            assert (ids[budget] == tokenizer.think_end and record["budget_hit"]
                    and len(ids) > budget + 1)
    assert at_budget >= 3  # (on the CPU with seed 0: every configuration)


def test_budget_reply_cut_by_ctrl_c_is_not_a_result(demo, monkeypatch):
    import chat
    model, tokenizer, names = demo
    args = Namespace(switch="transplant", max_new_tokens=12, temperature=1.0, top_p=1.0)
    prompt = tokenizer.encode(chat.render_chat([{"role": "user", "content": "2 + 2?"}],
                                               add_generation_prompt=True))
    step = ne.DecodeGraph(model, model.new_cache(1, len(prompt) + 12))
    steps, decode_step = [], ne.DecodeGraph.__call__

    def ctrl_c_at_the_third_step(*a):
        steps.append(1)
        if len(steps) == 3:
            # generate() ends its stream quietly: the reply just looks short
            raise KeyboardInterrupt
        return decode_step(*a)
    monkeypatch.setattr(ne.DecodeGraph, "__call__", ctrl_c_at_the_third_step)
    with pytest.raises(KeyboardInterrupt):
        bench.solve(model, tokenizer, step, prompt, names["23B"], names["30B"], 4, args, 0)
    assert len(steps) == 3


def write_problems(path, n=3):
    path.write_text("".join(json.dumps({"question": f"What is {a} * 7?", "answer": a * 7}) + "\n"
                            for a in range(2, 2 + n)))
    return path


BUDGET_ARGS = ["--demo", "--configs", "23B:30B,12B:12B", "--think-budgets", "2,4",
               "--max-new-tokens", "8", "--limit", "2"]
# the frontier: by latency
TIMING = ("latency_s", "first_token_s", "think_s", "answer_s", "frontier")


def without_timing(record):
    return {k: v for k, v in record.items()
            if k not in TIMING and not k.endswith(("_mean_s", "_p90_s", "tok_per_s"))}


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_budget_run_interrupted_and_resumed_equals_an_uninterrupted_run(tmp_path, monkeypatch,
                                                                        capsys):
    problems = write_problems(tmp_path / "problems.jsonl")
    whole = bench.main(["--budget", str(problems), "--out", str(tmp_path / "whole"), *BUDGET_ARGS])
    assert whole["complete"] and len(whole["budget_bench"]) == 4
    assert len(read_jsonl(tmp_path / "whole" / "results.jsonl")) == 8
    out = capsys.readouterr().out
    assert ("DEMO (random weights: accuracy is meaningless)" in out and "23B:30B" in out
            and "12B:12B" in out)

    # each reply is graded right before it is written: Ctrl-C after the third
    graded, is_correct = [], bench.is_correct

    def interrupt_after(k):
        def grade(*a):
            if len(graded) == k:
                raise KeyboardInterrupt
            graded.append(a)
            return is_correct(*a)
        return grade
    resumed = ["--budget", str(problems), "--out", str(tmp_path / "resumed"), *BUDGET_ARGS]
    monkeypatch.setattr(bench, "is_correct", interrupt_after(3))
    with pytest.raises(SystemExit) as stopped:
        bench.main(resumed)
    assert stopped.value.code == 130
    partial = json.loads((tmp_path / "resumed" / "results.json").read_text())
    assert not partial["complete"] and sum(r["problems"] for r in partial["budget_bench"]) == 3
    with open(tmp_path / "resumed" / "results.jsonl", "a") as f:
        f.write('{"key": ["demo", "transpl')  # a line cut by a crash mid-write: dropped
    graded.clear()
    monkeypatch.setattr(bench, "is_correct", interrupt_after(100))
    again = bench.main(resumed)
    assert len(graded) == 3 + (8 - 3)  # the 3 kept replies graded again, not recomputed
    records = read_jsonl(tmp_path / "resumed" / "results.jsonl")
    assert len(records) == 8 and len({tuple(r["key"]) for r in records}) == 8
    reference = {tuple(r["key"]): without_timing(r)
                 for r in read_jsonl(tmp_path / "whole" / "results.jsonl")}
    # seeded sampling: same replies
    assert {tuple(r["key"]): without_timing(r) for r in records} == reference
    assert ([without_timing(r) for r in again["budget_bench"]]
            == [without_timing(r) for r in whole["budget_bench"]])
    graded.clear()
    bench.main(resumed)  # all done: nothing to compute (the 8 graded again), the summary written
    assert (len(graded) == 8
            and json.loads((tmp_path / "resumed" / "results.json").read_text())["complete"])
    graded.clear()
    bench.main([*resumed, "--limit", "3"])  # one more problem: only its replies are new
    assert (len(graded) == 8 + 2 * 2
            and len(read_jsonl(tmp_path / "resumed" / "results.jsonl")) == 12)


def test_budget_json_and_plot(tmp_path, capsys):
    problems = write_problems(tmp_path / "problems.jsonl", n=2)
    out = tmp_path / "out"
    result = bench.main(["--budget", str(problems), "--out", str(out), *BUDGET_ARGS,
                         "--switch", "reprefill"])
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(result))
    assert (result["demo"] and result["problems"] == 2
            and result["settings"]["switch"] == "reprefill")
    rows = result["budget_bench"]
    assert [(r["think"], r["answer"], r["budget"]) for r in rows] == [
        ("23B", "30B", 2), ("23B", "30B", 4), ("12B", "12B", 2), ("12B", "12B", 4)]
    for r in rows:
        assert (r["problems"] == 2 and 0 <= r["accuracy"] <= 1
                and r["latency_p90_s"] >= r["latency_mean_s"] > 0)  # 2 problems
        assert r["think_tokens_mean"] <= r["budget"] and 0 <= r["budget_hit"] <= 1
        assert r["think_tok_per_s"] > 0 and r["answer_tok_per_s"] > 0
        dominated = any(o["latency_mean_s"] <= r["latency_mean_s"]
                        and o["accuracy"] >= r["accuracy"]
                        and ((o["latency_mean_s"], o["accuracy"])
                             != (r["latency_mean_s"], r["accuracy"]))
                        for o in rows)
        assert r["frontier"] == (not dominated)
    stdout = capsys.readouterr().out
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        # the optional dependency is missing: the table and JSON are there, one line says why
        assert ("no plot: matplotlib is not installed" in stdout
                and not (out / "frontier.png").exists())
    else:
        assert ((out / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
                and f"plot: {out}" in stdout)
    assert not list(out.glob(".*.tmp"))  # the temporary files of the atomic writes are gone


def test_budget_without_matplotlib_writes_table_and_json(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    problems = write_problems(tmp_path / "problems.jsonl", n=1)
    out = tmp_path / "out"
    bench.main(["--budget", str(problems), "--out", str(out), *BUDGET_ARGS, "--configs", "12B:12B"])
    stdout = capsys.readouterr().out
    assert [line for line in stdout.splitlines() if line.startswith("no plot")] == [
        "no plot: matplotlib is not installed (pip install matplotlib); "
        "the table and JSON are written"]
    assert ((out / "results.json").exists() and not (out / "frontier.png").exists()
            and "12B:12B" in stdout)


@pytest.mark.parametrize("lines, args, message", [
    (['{"question": "a", "answer": 1}', "{not json"], [], "line 2: not JSON"),
    (['{"question": "a", "answer": %s}' % ("9" * 5000)], [],
     "line 1: not JSON (Exceeds the limit (4300 digits)"),
    (["[" * 100_000 + "]" * 100_000], [],
     "line 1: not JSON (maximum recursion depth exceeded"),
    (['{"question": "a"}'], [], 'line 1: expected {"question": "...", "answer": ...}'),
    (['{"question": "", "answer": 1}'], [], "line 1: expected"),
    (['["a", 1]'], [], "line 1: expected"),
    (["", "  "], [], "holds no problems"),
    (['{"question": "a", "answer": 1}'], ["--configs", "23B"], "expected THINK:ANSWER pairs"),
    (['{"question": "a", "answer": 1}'], ["--think-budgets", "8,x"], "expected token counts >= 0"),
    (['{"question": "a", "answer": 1}'], ["--think-budgets", "-1"], "expected token counts >= 0"),
    (['{"question": "a", "answer": 1}'], ["--configs", "99B:30B"], "99B"),
    (['{"question": "a", "answer": 1}'], ["--limit", "0"], "--limit must be >= 1, got 0"),
    (['{"question": "a", "answer": 1}'], ["--max-new-tokens", "0"],
     "--max-new-tokens must be >= 1, got 0"),
    (['{"question": "a", "answer": 1}'], ["--temperature", "nan"],
     "--temperature must be a finite number, got nan"),
    (['{"question": "a", "answer": 1}'], ["--temperature", "-1"], "--temperature must be >= 0"),
    (['{"question": "a", "answer": 1}'], ["--top-p", "0"], "--top-p must be in (0, 1], got 0.0"),
    (['{"question": "a", "answer": 1}'], ["--think-budgets", "8", "--max-new-tokens", "9"],
     "leaves no room to answer"),
    # (the demo's 4096 positions)
    (['{"question": "a", "answer": 1}'], ["--think-budgets", "8", "--max-new-tokens", "5000"],
     "--max-new-tokens 5000 leaves no room for a prompt in the model's 4096 positions"),
])
def test_budget_bad_input_is_one_line(tmp_path, lines, args, message):
    problems = tmp_path / "problems.jsonl"
    problems.write_text("\n".join(lines) + "\n")
    with pytest.raises(SystemExit) as e:
        bench.main(["--budget", str(problems), "--demo", "--out", str(tmp_path / "out"), *args])
    assert str(e.value.code).startswith("bench.py: error: ") and message in str(e.value.code)
    assert "\n" not in str(e.value.code)
    assert not (tmp_path / "out").exists()  # refused before anything is written (or loaded)


def test_budget_errors_without_a_checkpoint_or_with_a_busy_out(tmp_path, monkeypatch):
    import fcntl
    problems = write_problems(tmp_path / "problems.jsonl", n=1)
    with pytest.raises(SystemExit) as e:
        bench.main(["--budget", str(tmp_path / "missing.jsonl"), "--demo"])
    assert "cannot read" in str(e.value.code)
    monkeypatch.delenv("NANOELASTIC_CKPT", raising=False)
    with pytest.raises(SystemExit) as e:
        bench.main(["--budget", str(problems), "--ckpt", str(tmp_path)])
    assert "not a checkpoint folder" in str(e.value.code)
    out = tmp_path / "out"
    out.mkdir()
    with open(out / ".lock", "w") as lock:  # another run holds the folder
        fcntl.flock(lock, fcntl.LOCK_EX)
        with pytest.raises(SystemExit) as e:
            bench.main(["--budget", str(problems), "--out", str(out), *BUDGET_ARGS])
    assert "another bench.py --budget run is writing to" in str(e.value.code)


def test_budget_sigterm_keeps_what_is_done(tmp_path):
    problems = write_problems(tmp_path / "problems.jsonl", n=3)
    out = tmp_path / "out"
    run = subprocess.Popen([sys.executable, "bench.py", "--budget", str(problems), "--demo",
                            "--out", str(out), "--max-new-tokens", "48",
                            "--think-budgets", "4,16,32"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    results = out / "results.jsonl"
    deadline = time.time() + 120
    while (not (results.exists() and results.read_text().count("\n") >= 1)
           and time.time() < deadline):
        time.sleep(0.1)
    run.send_signal(signal.SIGTERM)
    stdout, stderr = run.communicate(timeout=120)
    assert run.returncode == 143, stderr[-2000:]  # 128 + SIGTERM, as every CLI here
    assert ("Traceback" not in stderr and "interrupted:" in stderr
            and "the same command goes on" in stderr)
    kept = read_jsonl(results)
    assert 1 <= len(kept) < 5 * 3 * 3  # every line whole; the run had far to go
    assert json.loads((out / "results.json").read_text())["complete"] is False


def test_budget_load_solves_as_the_views_do(tmp_path):
    """--load 23B: the sizes nested in it, one model of that size; the same replies as the views
    of the whole model give, kept under keys of their own (timed on another model)."""
    problems = write_problems(tmp_path / "problems.jsonl", n=2)
    args = ["--budget", str(problems), "--demo", "--configs", "12B:23B,23B:23B",
            "--think-budgets", "2", "--max-new-tokens", "8"]
    views = bench.main([*args, "--out", str(tmp_path / "views")])
    alone = bench.main([*args, "--out", str(tmp_path / "alone"), "--load", "23b"])
    assert alone["settings"]["load"] == "192x96" and "load" not in views["settings"]
    by_views = read_jsonl(tmp_path / "views" / "results.jsonl")
    by_alone = read_jsonl(tmp_path / "alone" / "results.jsonl")
    reply = lambda r: {k: v for k, v in without_timing(r).items() if k != "key"}
    assert len(by_views) == 4 and list(map(reply, by_alone)) == list(map(reply, by_views))
    assert not {tuple(r["key"]) for r in by_alone} & {tuple(r["key"]) for r in by_views}
    with pytest.raises(SystemExit) as e:  # refused before anything loads
        bench.main([*args, "--out", str(tmp_path / "small"), "--load", "12B"])
    assert re.fullmatch(r"bench\.py: error: size 23B = hidden 192 x expert FFN 96 does not fit "
                        r"in this model \(128x64\): use 12B \(= 128x64\), or HIDDENxFFN up to "
                        r"128x64", str(e.value.code)), e.value.code  # as chat.py says it


def test_budget_sizes_in_any_case():
    assert (bench.parse_configs("23b:30b, 12B:12b,192x96:30B, 23B :30B,192X96:30b")
            == [("23B", "30B"), ("12B", "12B"), ("192x96", "30B")])  # spaces, X: as chat.py


@pytest.mark.parametrize("args, env, message", [
    (["--small", "--json", "no-such-folder/out.json"], {},
     "--json no-such-folder/out.json: its folder"),
    (["--small", "--json", "."], {}, "--json .: is a folder"),
    (["--small", "--batch", "1", "0"], {}, "--batch 1 0: each batch size must be >= 1"),
    (["--small", "--configs", "12B:12B"], {}, "--configs is an option of --budget"),
    (["--budget", "problems.jsonl", "--demo", "--small"], {},
     "--only, --small, --batch and --json are not options of --budget"),
    (["--budget", "problems.jsonl", "--demo", "--think-budgets", ""], {},
     "--think-budgets '': expected token counts"),
    (["--budget", "problems.jsonl", "--demo", "--seed", str(2**63)], {},
     "--seed must be in 0..9223372036854775807 (1 problems)"),
    (["--small"], {"NANOELASTIC_KERNELS": "bogus"}, "NANOELASTIC_KERNELS='bogus'"),
    (["--budget", "problems.jsonl", "--demo", "--out", "file"], {}, "--out file is a file"),
])
def test_bench_errors_are_one_line(tmp_path, args, env, message):
    (tmp_path / "problems.jsonl").write_text('{"question": "a", "answer": 1}\n')
    (tmp_path / "file").write_text("")
    run = subprocess.run([sys.executable, str(ROOT / "bench.py"), *args], capture_output=True,
                         text=True, timeout=300, cwd=tmp_path, env={**os.environ, **env})
    assert run.returncode != 0 and "Traceback" not in run.stderr
    assert (run.stderr.strip().splitlines()[-1].startswith("bench.py: error: ")
            and message in run.stderr)


def test_bench_without_triton_skips_the_kernel_table(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "nanoelastic_kernels", None)  # its import: ImportError
    assert list(bench.bench_kernels(small=True, ceil={})) == []
    assert "Triton is not installed" in capsys.readouterr().err
