"""Tests for chat.py: the chat template against stored renderings of the checkpoint's own, streaming
decode, the multi-turn cache, and chat.py driven as a user drives it (a subprocess: --prompt, piped
stdin, the REPL, Ctrl-C, bad input) on the demo's random checkpoint with its byte-level
tokenizer."""

import argparse
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import chat
import checkpoint
import nanoelastic as ne

ROOT = Path(__file__).parent
STATUS = re.compile(r"^\[(think|answer) .*\]$", re.M)


# --------------------------------------------------------------------------------------------------
# the chat format

TEMPLATE_CASES = ROOT / "test_chat_template.json"


def template_cases():
    """(messages, options, expected string) for every case of test_chat_template.json.

    The file holds facts about the checkpoint's chat template: 164 conversations, hand-made and
    random (with and without system, multi-turn, a system turn in the middle, assistant turns with
    reasoning_content (blank or None too), think tags inside the content (whole, only open, only
    close), empty or None content, surrounding whitespace, non-ASCII text, jinja-like text, a final
    assistant turn), each rendered once with jinja2 (trim_blocks, lstrip_blocks, as transformers
    renders chat templates) from the template of the Nemotron 3 Nano release, under the 8
    combinations of add_generation_prompt, enable_thinking and truncate_history_thinking. Identical
    renderings of one conversation are stored once ("which" picks the rendering of each option
    combination)."""
    data = json.loads(TEMPLATE_CASES.read_text())
    for case in data["cases"]:
        for options, which in zip(data["options"], case["which"]):
            yield case["messages"], options, case["rendered"][which]


def test_render_matches_the_template_renderings():
    n = 0
    for messages, options, expected in template_cases():
        assert chat.render_chat(messages, **options) == expected, (messages, options)
        n += 1
    assert n > 1000
    # the shape of a two-turn chat, spelled out once: the history's thinking is cut to an empty
    # <think></think>, and the generation prompt opens a thought
    two_turns = [{"role": "user", "content": "2+2?"},
                 {"role": "assistant", "content": "\n4", "reasoning_content": "add"},
                 {"role": "user", "content": "and 3+3?"}]
    assert chat.render_chat(two_turns, add_generation_prompt=True) == (
        "<|im_start|>system\n<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
        "<|im_start|>assistant\n<think></think>\n\n4<|im_end|>\n"
        "<|im_start|>user\nand 3+3?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n")


def checkpoint_template():
    """The chat_template of a real checkpoint's tokenizer_config.json, found as chat.py finds the
    checkpoint ($NANOELASTIC_CKPT, else the Hugging Face cache), or None."""
    try:
        folder = chat.find_checkpoint(None)
    except ne.NanoElasticError:
        return None
    config = Path(folder) / "tokenizer_config.json"
    template = json.loads(config.read_text()).get("chat_template") if config.exists() else None
    return template if isinstance(template, str) else None


def test_render_matches_the_checkpoint_template_itself():
    """The same conversations through the template of the checkpoint at hand (skips without one)."""
    source = checkpoint_template()
    if source is None:
        pytest.skip("no real checkpoint here (set NANOELASTIC_CKPT): the stored renderings above "
                    "still ran")
    import jinja2

    template = jinja2.Environment(trim_blocks=True, lstrip_blocks=True).from_string(source)
    for messages, options, _ in template_cases():
        assert (chat.render_chat(messages, **options)
                == template.render(messages=messages, **options)), (messages, options)


# --------------------------------------------------------------------------------------------------
# the demo checkpoint, its tokenizer, streaming

@pytest.fixture(autouse=True)
def one_thread():
    """The demo model's matrices are tiny: more threads only add overhead (as chat.py --demo
    knows)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def demo_ckpt(tmp_path_factory):
    return chat.write_demo_checkpoint(tmp_path_factory.mktemp("chat") / "demo")


@pytest.fixture(scope="session")
def demo_model(demo_ckpt):
    """The demo model as `chat.py --demo` loads it: fp32, on the GPU if there is one, so that a seed
    picked here samples the same tokens in chat.py (CUDA's generator draws other numbers than the
    CPU's)."""
    return ne.Model.from_pretrained(demo_ckpt, dtype=torch.float32, verbose=False)


def test_tokenizer_ids_come_from_tokenizer_json(demo_ckpt):
    tok = chat.ChatTokenizer.load(demo_ckpt)
    vocab = json.loads((demo_ckpt / "tokenizer.json").read_text())["model"]["vocab"]
    assert tok.think_end == vocab["</think>"] and tok.stop == (vocab["<|im_end|>"], vocab["</s>"])
    text = chat.render_chat([{"role": "user", "content": "é!"}], add_generation_prompt=True)
    ids = tok.encode(text)
    # no BOS; "\n" is Ċ
    assert ids[0] == vocab["<|im_start|>"] and ids[-2:] == [vocab["<think>"], vocab["Ċ"]]
    assert (ids.count(vocab["<|im_end|>"]) == 2
            and tok.tokenizer.decode(ids, skip_special_tokens=False) == text)
    assert len(vocab) == chat.demo_config().vocab_size  # every id the model can write decodes


def test_stream_releases_whole_characters(demo_ckpt):
    tok = chat.ChatTokenizer.load(demo_ckpt)
    text = "naïve 漢字 🙂 ok"
    ids = tok.encode(text)
    assert len(ids) == len(text.encode())  # one token a byte: characters span several tokens
    stream = chat.TextStream(tok)
    pieces = [stream.push(i) for i in ids]
    assert "".join(pieces) + stream.flush() == text
    # held back mid-character
    assert "\ufffd" not in "".join(pieces) and pieces.count("") == len(ids) - len(text)
    cut = chat.TextStream(tok)  # a stream that ends mid-character shows what it has
    assert "".join(cut.push(i) for i in tok.encode("a🙂")[:3]) == "a" and cut.flush() == "\ufffd"


def test_history_cache_reuse_equals_a_fresh_prefill(demo_model, demo_ckpt):
    """Turn 2 starts from turn 1's saved cache (history up to turn 1's user message) and prefills
    only the rest: the same cache as prefilling the whole history afresh. Tokens after </think> come
    from the answer size; the thinking is dimmed on a terminal."""
    tok = chat.ChatTokenizer.load(demo_ckpt)
    out = io.StringIO()
    seed = quiet_seed(demo_model, tok, "first question", "12B", 3, system="Be brief.")
    settings = chat.Settings(think="12B", answer="30B", max_think=3, max_new_tokens=24, seed=seed,
                             system="Be brief.")
    talk = chat.Chat(demo_model, tok, settings, chat.DEMO_SIZES, color=True, out=out)
    sizes = []
    real_generate = ne.generate

    def recording(*args, **kwargs):
        for token in real_generate(*args, **kwargs):
            sizes.append(token.size)
            yield token

    ne.generate = recording
    try:
        talk.reply("first question")
    finally:
        ne.generate = real_generate
    first = talk.snapshot
    think_n = sizes.index(chat.DEMO_SIZES["30B"])
    assert (set(sizes[:think_n]) == {chat.DEMO_SIZES["12B"]}
            and set(sizes[think_n:]) == {chat.DEMO_SIZES["30B"]})
    assert "\x1b[2m[think 12B] \x1b[0m" in out.getvalue() and "[answer 30B] " in out.getvalue()

    talk.reply("second question")
    history = tok.encode(chat.render_chat([{"role": "system", "content": "Be brief."}]
                                          + talk.messages[:3]))
    # a prefix: reused
    assert talk.snapshot.ids == history and history[:len(first.ids)] == first.ids
    fresh = chat.Chat(demo_model, tok, settings, chat.DEMO_SIZES, out=io.StringIO())
    fresh.prefill_history(history, chat.DEMO_SIZES["12B"])
    for reused, scratch in zip(talk.snapshot.states[1], fresh.snapshot.states[1]):  # per layer
        for a, b in zip(reused or (), scratch or ()):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert len(talk.messages) == 4 and talk.messages[1]["role"] == "assistant"
    # and the reply from the reused cache is that of a chat that prefills the whole history afresh
    fresh.messages, fresh.turn = talk.messages[:2], 1  # (the turn number goes into the seed)
    fresh.reply("second question")
    assert fresh.messages == talk.messages


def test_a_reply_shows_its_phases_and_keeps_its_thinking(demo_model, demo_ckpt):
    """Each phase's text follows its label, without the newline the model opens it with, control
    characters (which would move a terminal's cursor) shown as U+FFFD; the kept assistant message
    holds the answer and, apart, the thinking, as the chat template takes them."""
    tok = chat.ChatTokenizer.load(demo_ckpt)
    assert chat.printable("a\x1b[2Jb\tc\x07\nd") == "a\ufffd[2Jb\tc\ufffd\nd"
    seed = quiet_seed(demo_model, tok, "hello", "12B", 6, fits=lambda ids: tok.decode(ids).strip())
    settings = chat.Settings(think="12B", answer="30B", max_think=6, max_new_tokens=12, seed=seed)
    talk = chat.Chat(demo_model, tok, settings, chat.DEMO_SIZES, out=io.StringIO(),
                     log=io.StringIO())
    phase = chat.Phase("answer", "30B", chat.TextStream(tok))
    talk.show(phase, "\n \n")  # nothing yet: the phase has not started
    talk.show(phase, "\nHi\x1b!")
    talk.show(phase, "\n there")
    assert talk.out.getvalue() == "Hi\ufffd!\n there"

    talk = chat.Chat(demo_model, tok, settings, chat.DEMO_SIZES, out=io.StringIO(),
                     log=io.StringIO())
    talk.reply("hello")
    reply = talk.messages[-1]
    assert reply["role"] == "assistant" and reply["reasoning_content"]
    thinking = talk.log.getvalue().split("[think 12B] ", 1)[1].split("[answer 30B]")[0]
    assert thinking.rstrip() == chat.printable(reply["reasoning_content"]).strip()
    answer = chat.printable(reply["content"]).lstrip()
    assert talk.out.getvalue().rstrip("\n") == answer.rstrip("\n")  # (a line end after it)


def test_a_history_that_is_not_a_prefix_of_the_prompt_is_not_reused(demo_model, demo_ckpt):
    """The saved cache holds the history's ids; should a tokenizer encode the history alone
    otherwise than as the start of the prompt (a merge across the boundary, say), the reply
    prefills the whole prompt instead: the replies of a chat whose tokenizer does not."""
    tok = chat.ChatTokenizer.load(demo_ckpt)

    class Merging(chat.ChatTokenizer):  # the history alone: other ids
        def encode(self, text):
            ids = super().encode(text)
            return ids if text.endswith(("<think>\n", "<think></think>")) else ids[::-1]

    settings = chat.Settings(think="12B", answer="30B", max_think=3, max_new_tokens=12,
                             temperature=0.0)
    replies = []
    for tokenizer in (Merging(tok.tokenizer, tok.think_end, tok.stop), tok):
        talk = chat.Chat(demo_model, tokenizer, settings, chat.DEMO_SIZES, out=io.StringIO(),
                         log=io.StringIO())
        talk.reply("first question")
        talk.reply("second question")
        replies.append(talk.messages)
    assert replies[0] == replies[1]


@pytest.mark.parametrize("seed", range(6))
def test_random_conversations_reply_as_from_scratch(demo_model, demo_ckpt, seed):
    """Random conversations (sizes, switch modes, thinking budgets, thinking toggled, sampling and
    greedy, a system prompt or none, settings changed between turns): each reply equals that of a
    new chat given the same history, which prefills it all afresh."""
    import copy
    import random
    rng = random.Random(seed)
    tok = chat.ChatTokenizer.load(demo_ckpt)
    sizes = ["30B", "23B", "12B", "160x80", "256x64"]
    settings = chat.Settings(
        think=rng.choice(sizes), answer=rng.choice(sizes),
        switch=rng.choice(["transplant", "reprefill"]), thinking=rng.random() < 0.7,
        max_think=rng.choice([None, 0, 3, 10]), max_new_tokens=rng.choice([8, 20]),
        temperature=rng.choice([0.0, 1.0]), seed=3, system=rng.choice([None, "Be brief."]))
    talk = chat.Chat(demo_model, tok, settings, chat.DEMO_SIZES, out=io.StringIO(),
                     log=io.StringIO())
    for _ in range(4):
        if rng.random() < 0.3:
            settings.think = rng.choice(sizes)
        if rng.random() < 0.3:
            settings.thinking = not settings.thinking
        text = rng.choice(["hi", "what is 2+2?", "tell me more", "é ü 漢字", "two\nlines"])
        fresh = chat.Chat(demo_model, tok, copy.deepcopy(settings), chat.DEMO_SIZES,
                          out=io.StringIO(), log=io.StringIO())
        fresh.messages, fresh.turn = copy.deepcopy(talk.messages), talk.turn
        talk.out = io.StringIO()  # the answer's text
        talk.reply(text)
        fresh.reply(text)
        assert talk.out.getvalue() == fresh.out.getvalue()
        assert talk.messages == fresh.messages  # the thinking too


def test_checkpoint_from_flag_then_environment_then_hf_cache(monkeypatch, tmp_path, demo_ckpt):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("NANOELASTIC_CKPT", raising=False)
    with pytest.raises(ne.NanoElasticError, match="no checkpoint found"):
        chat.find_checkpoint(None)
    bf16 = tmp_path / "hub" / "models--nvidia--NVIDIA-Nemotron-Labs-3-Elastic-30B-A3B-BF16"
    shutil.copytree(demo_ckpt, bf16 / "snapshots" / "0123abc")  # no refs/main: the newest snapshot
    assert chat.find_checkpoint(None) == bf16 / "snapshots" / "0123abc"
    fp8 = tmp_path / "hub" / "models--nvidia--NVIDIA-Nemotron-Labs-3-Elastic-30B-A3B-FP8"
    (fp8 / "snapshots" / "old").mkdir(parents=True)  # an unfinished download: no config.json
    shutil.copytree(demo_ckpt, fp8 / "snapshots" / "4567def")
    (fp8 / "refs").mkdir()
    (fp8 / "refs" / "main").write_text("4567def")
    assert chat.find_checkpoint(None) == fp8 / "snapshots" / "4567def"  # FP8 before BF16
    # a damaged cache: a ref that is not UTF-8, a dangling link among the snapshots
    (fp8 / "refs" / "main").write_bytes(b"\xff\xfe")
    (fp8 / "snapshots" / "gone").symlink_to(tmp_path / "nowhere")
    assert chat.find_checkpoint(None) == fp8 / "snapshots" / "4567def"
    monkeypatch.setenv("NANOELASTIC_CKPT", str(demo_ckpt))
    assert chat.find_checkpoint(None) == demo_ckpt
    assert (chat.find_checkpoint(str(bf16 / "snapshots" / "0123abc"))
            == bf16 / "snapshots" / "0123abc")


# --------------------------------------------------------------------------------------------------
# chat.py as a user runs it

def run(*args, input="", env=None, timeout=120, merge=False):
    """python chat.py ARGS with stdin from a pipe; no real checkpoint can be found by accident.
    merge: stderr into stdout, as a terminal shows the two."""
    environ = {k: v for k, v in os.environ.items() if k != "NANOELASTIC_CKPT"}
    environ.update(PYTHONUNBUFFERED="1", HF_HOME=str(ROOT / ".no-hf-home"),
                   HF_HUB_CACHE=str(ROOT / ".no-hf-home"))
    return subprocess.run([sys.executable, str(ROOT / "chat.py"), *args], input=input,
                          stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT if merge else subprocess.PIPE, text=True,
                          env={**environ, **(env or {})}, timeout=timeout, cwd=ROOT)


def quiet_seed(model, tok, text, size, n, system=None, fits=lambda ids: True):
    """A seed whose first n sampled tokens neither stop the reply nor close the thought (random
    weights write them now and then, which would cut short what a test wants to see) and that
    `fits` (a test's own condition on those tokens)."""
    messages = [{"role": "system", "content": system}] if system is not None else []
    prompt = tok.encode(chat.render_chat(messages + [{"role": "user", "content": text}],
                                         add_generation_prompt=True))
    for seed in range(100):
        ids = [t.id for t in ne.generate(model, prompt, n, size=chat.DEMO_SIZES[size],
                                         stop_tokens=tok.stop, temperature=1.0, seed=seed)]
        if not set(ids) & {*tok.stop, tok.think_end} and fits(ids):
            return seed
    raise AssertionError("no quiet seed")


def test_one_shot_thinks_small_then_answers_large_after_the_budget(demo_ckpt, demo_model):
    seed = quiet_seed(demo_model, chat.ChatTokenizer.load(demo_ckpt), "What is 17 * 23?", "12B", 5)
    args = ("--demo", "--ckpt", str(demo_ckpt), "--prompt", "What is 17 * 23?",
            "--think", "12B", "--answer", "30B", "--max-think", "5", "--max-new-tokens", "10",
            "--seed", str(seed))
    r = run(*args)
    # one-shot: stdout is the answer only; the demo's banner, the labels, the thinking and the
    # status line go to stderr
    assert (r.returncode == 0
            and r.stderr.startswith("DEMO: random weights, so the text is noise")), r.stderr
    assert r.stdout.strip() and not re.search(r"DEMO|\[(think|answer|cut)", r.stdout), r.stdout
    think, answer = r.stderr.index("\n[think 12B] "), r.stderr.index("\n[answer 30B]\n")
    assert think < answer
    status = re.search(r"^\[think 12B: 5 tok \(budget\), [\d.]+ tok/s \| "
                       r"answer 30B: \d+ tok, [\d.]+ tok/s \| "
                       r"first token [\d.]+ s \| switch transplant\]$", r.stderr, re.M)
    assert status and r.stderr.endswith(status[0] + "\n"), r.stderr
    # stdout and stderr together (on one terminal, or 2>&1) read as one transcript, the answer
    # in its place: on the lines after its label, before the reason it ended or the status line
    both = run(*args, merge=True).stdout
    assert r.stdout.endswith("\n") and f"\n[answer 30B]\n{r.stdout}[" in both, both


def test_load_reads_one_size_and_answers_as_its_view_does(demo_ckpt, demo_model):
    """--load 23B: the model holds the 23B's prefixes only; the sizes default to it, what it writes
    is what the 23B view of the whole model writes, and a larger size is refused."""
    seed = quiet_seed(demo_model, chat.ChatTokenizer.load(demo_ckpt), "Hi", "12B", 5)
    args = ("--demo", "--ckpt", str(demo_ckpt), "--prompt", "Hi", "--think", "12B",
            "--max-think", "5", "--max-new-tokens", "12", "--seed", str(seed))
    loaded, viewed = run(*args, "--load", "23b"), run(*args, "--answer", "23B")
    assert loaded.returncode == 0 and viewed.returncode == 0, loaded.stderr + viewed.stderr
    assert "[answer 23B]" in loaded.stderr and loaded.stdout.strip(), loaded.stderr
    assert loaded.stdout == viewed.stdout
    r = run("--demo", "--ckpt", str(demo_ckpt), "--interactive", "--load", "23B",
            input="/answer 30b\n/think 12B\n/exit\n")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert re.search(r"^nanoelastic chat: think 23B, answer 23B, switch transplant \(only 23B "
                     r"loaded\)\.", r.stdout, re.M), r.stdout
    assert ("error: size 30B = hidden 256 x expert FFN 128 does not fit in this model (192x96): "
            "use 23B (= 192x96), 12B (= 128x64), or HIDDENxFFN up to 192x96\n") in r.stdout
    assert "think 12B, answer 23B\n" in r.stdout


def test_piped_prompt_switches_where_the_model_writes_think_end(demo_ckpt, demo_model, tmp_path):
    """Random weights rarely write </think>, so this checkpoint's tokenizer calls </think> the token
    the model writes 4th (the model and the prompt's ids are unchanged): the switch must come right
    there, before the budget, in reprefill mode too."""
    tok, text = chat.ChatTokenizer.load(demo_ckpt), "Hello there"
    prompt = tok.encode(chat.render_chat([{"role": "user", "content": text}],
                                         add_generation_prompt=True))
    # the 4th token can be renamed: not a special token, not written before
    renamable = lambda ids: ids[3] >= len(chat.DEMO_SPECIAL) and ids[3] not in prompt + ids[:3]
    seed = quiet_seed(demo_model, tok, text, "23B", 4, fits=renamable)
    fourth = [t.id for t in ne.generate(demo_model, prompt, 4, size=chat.DEMO_SIZES["23B"],
                                        temperature=1.0, seed=seed)][3]
    ckpt = Path(shutil.copytree(demo_ckpt, tmp_path / "early-thinker"))
    tokenizer = json.loads((ckpt / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    byte = next(t for t, i in vocab.items() if i == fourth)
    vocab[byte], vocab["</think>"] = tok.think_end, fourth
    next(t for t in tokenizer["added_tokens"] if t["content"] == "</think>")["id"] = fourth
    (ckpt / "tokenizer.json").write_text(json.dumps(tokenizer))

    r = run("--demo", "--ckpt", str(ckpt), "--max-think", "8", "--max-new-tokens", "8",
            "--switch", "reprefill", "--seed", str(seed), input=text + "\n")
    assert r.returncode == 0 and r.stderr.startswith("DEMO: ") and "DEMO" not in r.stdout, r.stderr
    assert re.search(r"^\[think 23B: 3 tok, [\d.]+ tok/s \| "
                     r"answer 30B: \d+ tok, .*\| switch reprefill\]$", r.stderr, re.M), r.stderr
    assert r.stderr.index("[think 23B] ") < r.stderr.index("\n[answer 30B]\n")


def test_repl_commands(demo_ckpt):
    lines = ["/help", "/think 12b", "/answer 23B", "/switch reprefill", "hello \\", "on two lines",
             "/nothink", '"""', "again", "", "in a block", '"""', "/think 99B", "/think 2304x1600",
             "/switch sideways", "/switch", "/think", "/think 12B 23B", "/clear now", "/frobnicate",
             "/clear", "", "/exit", "not read"]
    r = run("--demo", "--ckpt", str(demo_ckpt), "--interactive", "--max-think", "2",
            "--max-new-tokens", "4", input="\n".join(lines) + "\n")
    out = r.stdout
    assert r.returncode == 0 and r.stderr == "", r.stderr
    usage = "error: usage: /switch transplant|reprefill\n"
    for expected in ["/nothink        thinking off", "think 12B, answer 30B",
                     "think 12B, answer 23B", "switch reprefill", "thinking off",
                     "error: unknown size '99B': use 30B (= 256x128), 23B (= 192x96), "
                     "12B (= 128x64), or HIDDENxFFN up to 256x128",
                     "error: size 2304x1600 = hidden 2304",
                     "> /switch sideways\n" + usage, "> /switch\n" + usage,
                     "> /think\nerror: usage: /think SIZE",
                     "> /think 12B 23B\nerror: usage: /think SIZE",
                     "> /clear now\nerror: usage: /clear\n", "error: unknown command /frobnicate",
                     "conversation cleared", "a paste of several lines is one prompt",
                     "a prompt that starts with / is sent by typing // instead"]:
        assert expected in out, expected
    statuses = STATUS.findall(out)
    # two replies (each of several lines), nothing after /exit
    assert statuses == ["think", "answer"], out
    first, second = [line for line in out.splitlines() if STATUS.match(line)]
    assert (first.startswith("[think 12B: ") and "| answer 23B: " in first
            and first.endswith("| switch reprefill]"))
    assert (second.startswith("[answer 23B: ") and second.endswith("| no switch]")
            and "[think" not in out.split("> again")[1])


class Prompts:
    """Stands in for a Chat in chat.repl: keeps the prompts that the REPL sends."""

    def __init__(self):
        self.settings, self.sent = chat.Settings(), []

    def model_size(self, size):
        return size

    def reply(self, text):
        self.sent.append(text)


def repl_on(lines, monkeypatch, prompts=None):
    """chat.repl reading these lines from a pipe; the stand-in chat it drove."""
    prompts = prompts or Prompts()
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(lines) + "\n"))
    chat.repl(prompts, echo=True)
    return prompts


def test_repl_commands_in_any_case_and_prompts_that_start_with_a_slash(monkeypatch, capsys):
    prompts = repl_on(["/THINK 12b", "/Switch REPREFILL", "/NoThink", "/usr/bin/x is broken",
                       "//usr/bin/x is broken", "/EXIT", "not read"], monkeypatch)
    st = prompts.settings
    assert (st.think, st.switch, st.thinking) == ("12B", "reprefill", False)
    assert prompts.sent == ["/usr/bin/x is broken"]  # // sends it, one / dropped
    out = capsys.readouterr().out
    assert ("> /usr/bin/x is broken\nerror: unknown command /usr/bin/x: /help lists them (// sends "
            "a prompt that starts with /)\n") in out


def test_out_of_memory_in_a_reply_is_one_line_and_the_chat_goes_on(monkeypatch, capsys):
    class OutOfMemory(Prompts):
        def reply(self, text):
            if text == "too long":
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB."
                                                  "\nIf reserved but unallocated memory is large")
            super().reply(text)

    assert repl_on(["too long", "short"], monkeypatch, OutOfMemory()).sent == ["short"]
    assert ("> too long\nerror: CUDA out of memory. Tried to allocate 9.00 GiB. (a shorter "
            "conversation needs less: /clear)\n> short\n") in capsys.readouterr().out


@pytest.mark.parametrize("lines, sent", [(["first", "hello \\"], ["first", "hello"]),
                                         (['"""', "in a", "block"], ["in a\nblock"])])
def test_input_that_ends_inside_a_prompt_sends_it(monkeypatch, capsys, lines, sent):
    """Piped input that ends after a trailing \\ or in an open \"\"\" block: what it gathered is
    sent."""
    assert repl_on(lines, monkeypatch).sent == sent
    # the prompt's last line ended (at ". "), then the input's end leaves the REPL (at "> ")
    assert capsys.readouterr().out.endswith(f"{lines[-1]}\n. \n> \n")


def test_an_error_in_a_reply_is_one_line_and_the_chat_goes_on_as_before(demo_ckpt, tmp_path):
    """A prompt the model cannot read (a token id beyond its vocabulary: this tokenizer has two
    more tokens than the model) fails in one line, with no status line; the conversation goes on
    as if it had not been sent."""
    from tokenizers import Tokenizer

    ckpt = Path(shutil.copytree(demo_ckpt, tmp_path / "more-tokens"))
    tokenizer = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    tokenizer.add_special_tokens(["<extra_0>", "<extra_1>"])
    tokenizer.save(str(ckpt / "tokenizer.json"))
    args = ("--ckpt", str(ckpt), "--interactive", "--max-new-tokens", "3", "--seed", "1")
    r = run(*args, input="hi <extra_1>\nhello\nagain\n/exit\n")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    vocab = chat.demo_config().vocab_size
    assert re.search(rf"^> hi <extra_1>\nerror: token id out of range: \d+\.\.{vocab + 1} not in "
                     rf"0\.\.{vocab - 1}\n> hello\n\[think ", r.stdout, re.M), r.stdout
    assert "[stopped]" not in r.stdout and r.stdout.count("error:") == 1, r.stdout
    assert STATUS.findall(r.stdout) == ["think", "think"], r.stdout
    # the reply to "hello" is the first turn's, as if "hi <extra_1>" had never been sent
    fresh = run(*args, input="hello\n/exit\n")
    # the reply (any bytes, newlines too, and why it ended), up to the status line and its timings
    reply = lambda out: re.search(r"^> hello\n(.*?)^\[think \S+: \d+ tok", out, re.M | re.S)[1]
    assert reply(r.stdout) == reply(fresh.stdout), (r.stdout, fresh.stdout)


def test_a_setting_that_generate_refuses_fails_before_any_output(demo_model, demo_ckpt):
    out = io.StringIO()
    talk = chat.Chat(demo_model, chat.ChatTokenizer.load(demo_ckpt),
                     chat.Settings(think="12B", answer="30B", temperature=-1.0), chat.DEMO_SIZES,
                     out=out)
    with pytest.raises(ne.NanoElasticError, match="temperature must be >= 0"):
        talk.reply("hi")
    assert out.getvalue() == "" and talk.messages == [] and talk.turn == 0  # as if never sent


def test_the_seed_of_each_turn_stays_in_the_range_generate_takes(demo_model, demo_ckpt,
                                                                 monkeypatch):
    """The chat adds the turn number to --seed; past 2**63 - 1 it wraps to 0."""
    seeds = []
    real_generate = ne.generate

    def recording(*args, seed=None, **kwargs):
        seeds.append(seed)
        return real_generate(*args, seed=seed, **kwargs)

    monkeypatch.setattr(ne, "generate", recording)
    settings = chat.Settings(think="12B", answer="12B", max_new_tokens=2, seed=2**63 - 1)
    talk = chat.Chat(demo_model, chat.ChatTokenizer.load(demo_ckpt), settings, chat.DEMO_SIZES,
                     out=io.StringIO())
    talk.reply("one")
    talk.reply("two")
    assert seeds == [2**63 - 1, 0]


def test_one_shot_at_the_end_of_the_context(demo_ckpt, demo_model):
    """A piped prompt that leaves 4 tokens of the demo's 4096-token context: the reply is cut there,
    still thinking (so the answer size never ran, and stdout, the answer, is empty). A longer one
    is refused in terms of one-shot mode (no /clear)."""
    tok, room = chat.ChatTokenizer.load(demo_ckpt), 4
    empty = tok.encode(chat.render_chat([{"role": "user", "content": ""}],
                                        add_generation_prompt=True))
    text = "a" * (demo_model.config.max_position_embeddings - len(empty) - room)  # a token a byte
    seed = quiet_seed(demo_model, tok, text, "23B", room)
    r = run("--demo", "--ckpt", str(demo_ckpt), "--max-new-tokens", "200", "--seed", str(seed),
            input=text + "\n")
    assert r.returncode == 0 and r.stdout == "", r.stderr
    assert "\n[cut at 4 tokens: the context (4096 tokens) is full]\n" in r.stderr, r.stderr
    assert re.search(r"^\[think 23B: 4 tok, .*\| no switch\]$", r.stderr, re.M), r.stderr
    r = run("--demo", "--ckpt", str(demo_ckpt), input="a" * 5000)
    assert r.returncode == 1 and r.stdout == "" and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.splitlines()[-1] == (f"chat.py: error: the prompt ({len(empty) + 5000} tokens) "
                                         f"leaves no room for a reply in the context (4096 "
                                         f"tokens): shorten it")



def test_a_full_context_says_whether_clear_would_help(demo_model, demo_ckpt):
    """A message that would fit on its own but not after the turns before it: /clear helps. One
    that does not fit on its own: shorten it. Either way the conversation is as it was."""
    tok = chat.ChatTokenizer.load(demo_ckpt)
    talk = chat.Chat(demo_model, tok, chat.Settings(think="12B", answer="30B", max_new_tokens=2),
                     chat.DEMO_SIZES, out=io.StringIO())
    talk.reply("hi")
    kept = list(talk.messages)
    empty = tok.encode(chat.render_chat([{"role": "user", "content": ""}],
                                        add_generation_prompt=True))
    context = talk.cache.max_len
    with pytest.raises(ne.NanoElasticError, match=r"^the conversation fills the context "
                                                  rf"\({context} tokens\): /clear starts"):
        talk.reply("a" * (context - len(empty) - 2))  # a token a byte: room for 2 on its own
    with pytest.raises(ne.NanoElasticError, match=rf"^the prompt \({len(empty) + context} tokens\) "
                                                  "leaves no room .*: shorten it$"):
        talk.reply("a" * context)
    assert talk.messages == kept and talk.turn == 1

class Reader:
    """Collects a process's stdout in the background so a test can wait for text to appear."""

    def __init__(self, stream):
        self.text, self.stream = "", stream
        threading.Thread(target=self.run, daemon=True).start()

    def run(self):
        for chunk in iter(lambda: os.read(self.stream.fileno(), 4096), b""):
            self.text += chunk.decode(errors="replace")

    def wait_for(self, pattern, count=1, timeout=60):
        end = time.time() + timeout
        while len(re.findall(pattern, self.text, re.M)) < count:
            assert time.time() < end, f"no {pattern!r} in:\n{self.text}"
            time.sleep(0.005)  # a GPU writes a token a millisecond or two


def test_ctrl_c_stops_a_reply_and_the_chat_goes_on(demo_ckpt, demo_model):
    # quiet for longer than a Ctrl-C takes to land (a GPU writes tokens ten times faster)
    seed = quiet_seed(demo_model, chat.ChatTokenizer.load(demo_ckpt), "Tell me a long story",
                      "23B", 64)
    proc = subprocess.Popen([sys.executable, str(ROOT / "chat.py"), "--demo", "--ckpt",
                             str(demo_ckpt), "--interactive", "--max-think", "3000",
                             "--max-new-tokens", "3000", "--seed", str(seed)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, cwd=ROOT)
    out = Reader(proc.stdout)
    try:
        proc.stdin.write(b"Tell me a long story\n")
        proc.stdin.flush()
        out.wait_for(r"\[think 23B\] \S")  # streaming
        proc.send_signal(signal.SIGINT)
        # stopped while thinking: the answer size never ran
        out.wait_for(r"^\[stopped\]\n\[think 23B: \d+ tok, .*\| no switch\]$")
        # the chat still answers: commands, and a reply that streams
        proc.stdin.write(b"/help\nGo on\n")
        proc.stdin.flush()
        out.wait_for(r"^commands:")
        out.wait_for(r"\[think 23B\] ", count=2)
        # stops the second reply, or (had it ended) clears the prompt's line
        proc.send_signal(signal.SIGINT)
        out.wait_for(STATUS.pattern, count=2)
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)  # at the prompt: the line is cleared, the chat goes on
        out.wait_for(r"^> \^C$")
        proc.stdin.write(b"/nothink\n")
        proc.stdin.flush()
        out.wait_for(r"^thinking off$")
        proc.stdin.close()  # Ctrl-D
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
    assert proc.stderr.read() == b""
    assert "Traceback" not in out.text


def test_demo_checkpoint_is_written_into_an_empty_folder(tmp_path, monkeypatch):
    """--demo --ckpt DIR writes the demo there when DIR is missing or empty (made for it), but not
    over the current folder (it is written beside and renamed into place)."""
    empty = tmp_path / "made-for-it"
    empty.mkdir()
    with monkeypatch.context() as m, pytest.raises(
            ne.NanoElasticError, match=r"--demo --ckpt \.: the current folder; give a new folder "
                                       r".*, e\.g\. demo$"):
        m.chdir(empty)
        chat.load(argparse.Namespace(demo=True, ckpt="."), str(tmp_path))
    model, _ = chat.load(argparse.Namespace(demo=True, ckpt=str(empty)), str(tmp_path))
    assert (empty / "tokenizer.json").is_file() and model.config == chat.demo_config()



def test_demo_folder_may_be_a_link_to_a_demo_checkpoint_only(demo_ckpt, tmp_path):
    (tmp_path / "to-demo").symlink_to(demo_ckpt)
    chat.check_demo_folder(str(tmp_path / "to-demo"))  # read through the link: fine
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")  # would be written through it
    with pytest.raises(ne.NanoElasticError, match="dangling is a symbolic link: --demo writes"):
        chat.check_demo_folder(str(tmp_path / "dangling"))

def test_bad_input_is_one_line_error(demo_ckpt, tmp_path):
    no_tokenizer = checkpoint.write_random_checkpoint(tmp_path / "no-tokenizer", chat.demo_config())
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    notes = tmp_path / "notes"  # somebody's folder, not a checkpoint
    notes.mkdir()
    (notes / "notes.txt").write_text("keep")
    shutil.copy(no_tokenizer / "config.json", config_only)
    link = tmp_path / "link"  # to an empty folder
    (tmp_path / "empty").mkdir()
    link.symlink_to(tmp_path / "empty")
    sliced_23b = tmp_path / "sliced-23B"  # the config of a standalone 23B (slice.py's output)
    sliced_23b.mkdir()
    config_23b = checkpoint.config_json(ne.Config().sliced(2304, 1600))
    (sliced_23b / "config.json").write_text(json.dumps(config_23b))
    cases = [  # (arguments, stdin, what the one line says)
        (["--demo", "--ckpt", str(demo_ckpt), "--think", "40B", "--prompt", "hi"], "",
         "unknown size '40B'"),
        (["--prompt", "hi"], "", "no checkpoint found.*hf download nvidia/.*or try --demo"),
        (["--demo", "--ckpt", str(config_only / "config.json"), "--prompt", "hi"], "",
         "config.json is a file: --demo --ckpt takes a folder"),
        (["--ckpt", str(tmp_path / "nowhere"), "--prompt", "hi"], "", "is not a checkpoint folder"),
        (["--demo", "--ckpt", str(notes), "--prompt", "hi"], "",
         "notes holds no demo checkpoint \\(no config.json\\): give a new or empty folder"),
        (["--demo", "--ckpt", str(link), "--prompt", "hi"], "",
         "link is a symbolic link: --demo writes its checkpoint into a folder, not through a link"),
        # stdin is a pipe holding nothing
        (["--demo", "--ckpt", str(demo_ckpt)], "", "empty prompt"),
        (["--ckpt", str(no_tokenizer), "--think", "192x96", "--answer", "256x128",
          "--prompt", "hi"], "", "missing tokenizer: .*tokenizer.json"),
        # refused from config.json alone, before the tokenizer and the weights (none here) are read
        (["--ckpt", str(config_only), "--think", "12B", "--prompt", "hi"], "",
         "size 12B = hidden 1920 .* does not fit"),
        (["--demo", "--ckpt", str(demo_ckpt), "--think", "12b", "--answer", "500x10",
          "--prompt", "hi"], "", "size 500x10 .* does not fit .*: use 30B \\(= 256x128\\)"),
        (["--demo", "--ckpt", str(demo_ckpt), "--temperature", "nan", "--prompt", "hi"], "",
         "--temperature"),
        (["--demo", "--ckpt", str(demo_ckpt), "--temperature", "inf", "--prompt", "hi"], "",
         "--temperature must be a finite number, got inf"),
        (["--demo", "--ckpt", str(demo_ckpt), "--top-p", "1.5", "--prompt", "hi"], "",
         r"--top-p must be in \(0, 1\], got 1.5"),
        (["--demo", "--ckpt", str(demo_ckpt), "--seed", str(2**63), "--prompt", "hi"], "",
         r"--seed must be in \[0, 9223372036854775807\]"),
        (["--ckpt", str(sliced_23b), "--think", "30B", "--prompt", "hi"], "",
         "size 30B .* does not fit .*: use 23B, 12B, or HIDDENxFFN up to 2304x1600"),
        (["--ckpt", str(config_only), "--load", "12B", "--prompt", "hi"], "",
         r"size 12B = hidden 1920 .* does not fit in this model \(256x128\)"),
        (["--demo", "--ckpt", str(demo_ckpt), "--load", "12B", "--answer", "23b", "--prompt",
          "hi"], "", r"size 23B = hidden 192 x .* does not fit in this model \(128x64\)"),
        # no size given: the default 30B does not fit, so the checkpoint's own size is used (then
        # the missing tokenizer is the first problem)
        (["--ckpt", str(sliced_23b), "--prompt", "hi"], "", "missing tokenizer"),
    ]
    env = {**{k: v for k, v in os.environ.items() if k != "NANOELASTIC_CKPT"},
           "HF_HOME": str(tmp_path), "HF_HUB_CACHE": str(tmp_path)}
    procs = [(subprocess.Popen([sys.executable, str(ROOT / "chat.py"), *args],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env),
              stdin, message)
             for args, stdin, message in cases]  # all at once: each spends its time importing torch
    for proc, stdin, message in procs:
        out, err = proc.communicate(stdin, timeout=120)
        assert proc.returncode != 0 and "Traceback" not in err, err
        assert (err.count("\n") == 1
                and re.match(f"chat.py: error: .*{message}", err)), (message, err)
    assert [p.name for p in notes.iterdir()] == ["notes.txt"]


@pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs a pseudo-terminal")
def test_a_pasted_block_is_one_prompt_on_a_terminal(demo_ckpt):
    """On a terminal, lines that arrive together (a paste) are one prompt, not one turn a line."""
    import select

    terminal, child_end = os.openpty()
    # Popen forks in C: no fork() of this multi-threaded process in Python (pty.fork warns of it)
    proc = subprocess.Popen([sys.executable, str(ROOT / "chat.py"), "--demo", "--ckpt",
                             str(demo_ckpt), "--max-new-tokens", "4", "--max-think", "2"],
                            stdin=child_end, stdout=child_end, stderr=child_end,
                            start_new_session=True)
    os.close(child_end)
    out = b""

    def read_until(pattern, timeout=60):
        nonlocal out
        end = time.time() + timeout
        while not re.search(pattern, out.decode(errors="replace"), re.M):
            assert time.time() < end, out.decode(errors="replace")
            if select.select([terminal], [], [], 0.1)[0]:
                out += os.read(terminal, 4096)

    try:
        read_until("Ctrl-D to leave")
        os.write(terminal, b"first line\nsecond line\n")
        read_until(r"\| switch transplant\]")
        os.write(terminal, b"/exit\n")
        read_until(r"^> /exit")
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
        os.close(terminal)
    text = out.decode(errors="replace")
    assert ("> first line\r\n. second line\r\n" in text
            and len(re.findall(r"^\[think 23B: ", text, re.M)) == 1), text
