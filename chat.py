"""
chat.py: chat with Nemotron 3 Nano Elastic, thinking with one nested size and answering with
another.

    python chat.py --think 23B --answer 30B     # a multi-turn chat with the real checkpoint
    python chat.py --demo                       # the same on random weights: no GPU, no download
    python chat.py --prompt "What is 17 * 23?"  # one-shot (or a prompt piped on stdin)

The model thinks with the --think size until it writes </think> (or the --max-think budget runs out
and </think> is written for it), then the same cache carries on with the --answer size: "transplant"
keeps the caches as the thinking size left them, "reprefill" rebuilds them with the answering size
(exact, one prefill). Prompts are the checkpoint's own chat template (render_chat below), tokenized
by its tokenizer.json.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import time
import unicodedata
from dataclasses import dataclass, replace
from pathlib import Path

if __name__ == "__main__":  # Ctrl-C while torch imports (seconds): nothing to undo yet, exit
    signal.signal(signal.SIGINT, lambda signum, frame: os._exit(130))  # (run_cli restores it)

import torch

import checkpoint
import nanoelastic as ne
from nanoelastic import NanoElasticError

HF_REPOS = ("nvidia/NVIDIA-Nemotron-Labs-3-Elastic-30B-A3B-FP8",
            "nvidia/NVIDIA-Nemotron-Labs-3-Elastic-30B-A3B-BF16")
# tokens the chat's one cache holds (KV is about 6 KB a token on the real model)
MAX_CONTEXT = 65536
PREFILL_CHUNK = 8192
SAMPLING_FLAGS = ("--temperature", "--top-p", "--top-k")  # the names in check_sampling's errors

HELP = """commands:
  /think SIZE     think with SIZE (30B, 23B, 12B or HIDDENxFFN)
  /answer SIZE    answer with SIZE
  /switch MODE    transplant (keep the caches, free) or reprefill (rebuild them with the answer
                  size, exact)
  /nothink        thinking off (again: on)
  /clear          forget the conversation
  /help           this list
  /exit           leave (or Ctrl-D); Ctrl-C stops a reply and keeps the conversation, and at the
                  prompt clears the line
commands in any case; a prompt that starts with / is sent by typing // instead (one / is dropped).
a prompt of several lines: end a line with \\ to go on on the next one, or put the lines between two
lines of \"\"\"; a paste of several lines is one prompt."""


# --------------------------------------------------------------------------------------------------
# 1. The chat format: the checkpoint's chat template (tokenizer_config.json's chat_template, jinja2)
#    in plain Python, for conversations without tools. test_chat.py compares it with stored jinja2
#    renderings of that template (and with the template itself when a checkpoint is at hand).

def render_chat(messages: list[dict], add_generation_prompt: bool = False,
                enable_thinking: bool = True,
                truncate_history_thinking: bool = True) -> str:
    """The prompt text of a conversation ([{"role": ..., "content": ...}, ...]), as the
    checkpoint's chat template renders it: an optional system turn first, earlier replies with
    their thinking cut (truncate_history_thinking), and with add_generation_prompt the assistant
    turn opened, <think> or an empty <think></think> (enable_thinking)."""
    system, turns = "", messages
    if messages and messages[0]["role"] == "system":
        system, turns = messages[0]["content"], messages[1:]
    last_user = max((i for i, m in enumerate(turns) if m["role"] == "user"), default=-1)
    text = f"<|im_start|>system\n{system}<|im_end|>\n"  # always, even when empty
    for i, m in enumerate(turns):
        if m["role"] == "tool" or m.get("tool_calls"):
            raise NanoElasticError("render_chat renders conversations without tools")
        if m["role"] == "assistant":
            content = assistant_content(m, cut_thinking=truncate_history_thinking and i < last_user)
            text += f"<|im_start|>assistant\n{content}<|im_end|>\n"
        else:
            text += f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n"
    if add_generation_prompt:
        text += "<|im_start|>assistant\n" + ("<think>\n" if enable_thinking else "<think></think>")
    return text


def assistant_content(message: dict, cut_thinking: bool) -> str:
    """An assistant turn's text: its thinking in <think> tags (empty tags when it has none), then
    the answer. Turns before the last user turn keep only the answer (cut_thinking)."""
    reasoning, content = message.get("reasoning_content"), message.get("content") or ""
    if isinstance(reasoning, str) and reasoning.strip():
        content = f"<think>\n{reasoning}\n</think>\n{content}"
    elif "<think>" not in content and "</think>" not in content:
        content = "<think></think>" + content
    if cut_thinking and "<think>" in content and "</think>" in content:
        content = "<think></think>" + content.split("</think>")[-1]
    return content.strip()


# --------------------------------------------------------------------------------------------------
# 2. Checkpoint and tokenizer

def hf_cache_checkpoint() -> Path | None:
    """The downloaded snapshot of the FP8 (else BF16) release in the Hugging Face cache, if any."""
    home = Path(os.environ.get("HF_HOME") or Path.home() / ".cache/huggingface")
    hub = os.environ.get("HF_HUB_CACHE") or home / "hub"
    for repo in HF_REPOS:
        folder = Path(hub) / f"models--{repo.replace('/', '--')}"
        main = folder / "refs" / "main"
        # (a damaged cache, such as a garbled ref or a dangling link, is passed over, not an error)
        ref = main.read_text(errors="replace").strip() if main.is_file() else ""
        snapshots = [folder / "snapshots" / ref] if ref else []
        snapshots += sorted((folder / "snapshots").glob("*"), key=lambda p: p.lstat().st_mtime,
                            reverse=True)
        for snapshot in snapshots:
            if (snapshot / "config.json").is_file():
                return snapshot
    return None


def find_checkpoint(ckpt: str | None) -> Path:
    """--ckpt, else $NANOELASTIC_CKPT, else the Hugging Face cache."""
    path = ckpt or os.environ.get("NANOELASTIC_CKPT") or hf_cache_checkpoint()
    if path is None:
        raise NanoElasticError(
            f"no checkpoint found (--ckpt DIR, $NANOELASTIC_CKPT, or the Hugging Face cache): "
            f"download one with `hf download {HF_REPOS[0]}` (about 32 GB), or try --demo (no "
            f"GPU, no download)")
    path = Path(path)
    if not (path / "config.json").is_file():
        raise NanoElasticError(f"{path} is not a checkpoint folder (no config.json); or try "
                               f"--demo")
    return path


@dataclass
class ChatTokenizer:
    """The checkpoint's tokenizer.json and the special ids the chat needs, read from it."""
    tokenizer: object  # tokenizers.Tokenizer
    think_end: int  # </think>: where thinking stops and the size switches
    stop: tuple[int, ...]  # <|im_end|> and </s>: the reply is over

    @classmethod
    def load(cls, ckpt: Path) -> "ChatTokenizer":
        tokenizer = checkpoint.load_tokenizer(ckpt)
        needed = ("<|im_start|>", "<|im_end|>", "<think>", "</think>")
        ids = {t: tokenizer.token_to_id(t) for t in needed + ("</s>",)}
        missing = [t for t in needed if ids[t] is None]
        if missing:
            raise NanoElasticError(f"{ckpt / 'tokenizer.json'} has no {', '.join(missing)}: "
                                   f"not the chat tokenizer of this model")
        stop = tuple(ids[t] for t in ("<|im_end|>", "</s>") if ids[t] is not None)
        return cls(tokenizer, ids["</think>"], stop)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids  # the template has no BOS

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)


class TextStream:
    """Token ids in, printable text out, one token at a time. A byte-level BPE token can hold part
    of a UTF-8 character, so text ending in a half character (U+FFFD) is held back, but never more
    than 3 tokens: a half character has at most 3 bytes, so what comes before them is final
    (invalid bytes, which random weights write plenty of, would otherwise hold everything back).
    Decoding restarts from the last released token, so each step decodes a few tokens, not the
    whole reply."""

    def __init__(self, tokenizer: ChatTokenizer):
        # ids[start:done] already shown
        self.tokenizer, self.ids, self.start, self.done = tokenizer, [], 0, 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        shown = self.tokenizer.decode(self.ids[self.start:self.done])
        for end in (len(self.ids), len(self.ids) - 3):
            text = self.tokenizer.decode(self.ids[self.start:max(end, self.done)])
            if len(text) > len(shown) and (end < len(self.ids) or not text.endswith("\ufffd")):
                self.start, self.done = self.done, end
                return text[len(shown):]
        return ""

    def flush(self) -> str:  # the end of the stream: whatever is left, half characters included
        shown = self.tokenizer.decode(self.ids[self.start:self.done])
        text = self.tokenizer.decode(self.ids[self.start:])
        self.start = self.done = len(self.ids)
        return text[len(shown):]


# --------------------------------------------------------------------------------------------------
# 3. The demo: a small random checkpoint with nested sizes and a byte-level tokenizer, on the fly

DEMO_SIZES = ne.DEMO_SIZES  # stand-ins for 30B/23B/12B inside the demo's 256x128
DEMO_SPECIAL = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]


def demo_tokenizer():
    """Byte-level BPE without merges: the chat's special tokens, then one token per byte."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    # GPT-2's byte -> character map that ByteLevel uses (printable bytes stand for themselves)
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    unprintable = [b for b in range(256) if b not in printable]
    char = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(unprintable)}
    vocab = {t: i for i, t in enumerate(DEMO_SPECIAL + [char[b] for b in range(256)])}
    tokenizer = Tokenizer(models.BPE(vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(DEMO_SPECIAL)
    return tokenizer


def tokens(n: int) -> str:
    return f"{n} token" + "s" * (n != 1)


def demo_config() -> ne.Config:
    """ne.DEMO_CONFIG with the byte-level tokenizer's vocabulary and end-of-reply ids."""
    tokenizer = demo_tokenizer()
    eos = [tokenizer.token_to_id("</s>"), tokenizer.token_to_id("<|im_end|>")]
    return replace(ne.DEMO_CONFIG, vocab_size=tokenizer.get_vocab_size(), eos_token_id=eos)


def write_demo_checkpoint(path: str | Path) -> Path:
    """ne.DEMO_CONFIG (vocab cut to the byte-level tokenizer), random FP8 weights, and a
    tokenizer.json; all of it in place at once (a folder renamed), so an interrupted run or a full
    disk leaves nothing."""
    def add_tokenizer(folder: Path) -> None:
        demo_tokenizer().save(str(folder / "tokenizer.json"))
    return checkpoint.write_random_checkpoint(path, demo_config(), extra_files=add_tokenizer)


# --------------------------------------------------------------------------------------------------
# 4. The chat: one conversation, one cache, a reply streamed phase by phase

@dataclass
class Settings:
    """A chat's settings; the defaults here are the command line's (DEMO_SETTINGS: the demo's)."""
    think: str = "30B"
    answer: str = "30B"
    switch: str = "transplant"
    thinking: bool = True
    max_think: int | None = None
    max_new_tokens: int = 8192
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    system: str | None = None


# The demo: the 23B thinks, and not for long, so that the switch shows; reproducible (with seed 1
# the first reply shows the switch).
DEMO_SETTINGS = dict(think="23B", max_think=16, max_new_tokens=64, seed=1)


@dataclass
class Phase:  # thinking or answering, as the status line reports it
    label: str
    size: str
    stream: TextStream
    tokens: int = 0  # of text (not </think>, not the stop token)
    # decode steps timed (every token but the reply's first, whose time is the time to first token)
    steps: int = 0
    seconds: float = 0.0
    started: bool = False  # some text is out (the model opens a phase with a newline: not shown)


@dataclass
class Turn:  # one reply as it streams
    think: Phase
    answer: Phase
    phase: Phase | None = None  # the one streaming now
    count: int = 0  # tokens generated
    first_token: float | None = None  # seconds to the first token
    stopped: bool = False  # the model wrote a stop token
    interrupted: bool = False  # Ctrl-C (set at the end)
    switched: str | None = None  # the switch's mode, once a token came from the answer size


@dataclass
# the cache right after a conversation's history was prefilled (see Chat.prefill_history)
class Snapshot:
    ids: list[int]
    size: str
    states: tuple  # Cache.snapshot()


class Chat:
    """One conversation on one model and cache: each reply thinks at settings.think and answers
    at settings.answer, the answer's text streamed to `out` and the rest (the labels, the thinking,
    the status line) to `log` (default: `out`); the cache is kept per turn and reused when the
    history allows."""
    def __init__(self, model: ne.Model, tokenizer: ChatTokenizer, settings: Settings,
                 size_names: dict[str, str] | None = None, color: bool = False, out=sys.stdout,
                 log=None):
        self.model, self.tokenizer, self.settings, self.out = model, tokenizer, settings, out
        self.log = out if log is None else log
        # what the user calls a size -> what the model calls it (the demo)
        self.size_names = size_names or {}
        self.color = color  # dim the thinking (`log` is a terminal)
        self.at_line_start = True
        self.messages: list[dict] = []
        self.cache = model.new_cache(1, min(model.config.max_position_embeddings, MAX_CONTEXT))
        self.decoder = ne.DecodeGraph(model, self.cache)  # its CUDA graphs serve every turn
        self.snapshot: Snapshot | None = None
        self.turn = 0

    def model_size(self, size: str) -> str:
        return ne.model_size(size, self.model.config, self.size_names)

    def write(self, text: str, dim: bool = False, answer: bool = False) -> None:
        """Write to `log`, or the answer's text to `out`."""
        if text:
            out = self.out if answer else self.log
            out.write(f"\x1b[2m{text}\x1b[0m" if dim and self.color else text)
            out.flush()

    # -- multi-turn cache reuse -------------------------------------------------------------------
    # The template cuts earlier turns' thinking out of the history, so the next prompt is NOT the
    # last prompt plus what was generated, and Mamba state cannot be rewound to a common prefix.
    # What does carry over is the rendered history up to the last user turn (everything before the
    # generation prompt): each turn prefills that, keeps a copy of the cache there (Mamba states
    # and the KV prefix: small), and the next turn starts from the copy when it is a prefix of its
    # own history and was made at the same size. Otherwise the history is prefilled from scratch.
    # Either way the cache the reply starts from equals a fresh prefill of the whole prompt at the
    # starting size.

    def prefill_history(self, history: list[int], size: str) -> None:
        saved, cache = self.snapshot, self.cache
        n = len(saved.ids) if saved else 0
        if saved and saved.size == size and n <= len(history) and history[:n] == saved.ids:
            cache.restore(saved.states)
        else:
            cache.reset()
        if len(history) > cache.length:
            new = torch.tensor([history[cache.length:]], device=self.model.lm_head.weight.device)
            ne.prefill(self.model, new, cache, size, PREFILL_CHUNK)
        self.snapshot = Snapshot(list(history), size, cache.snapshot())

    def clear(self) -> None:
        self.messages, self.snapshot = [], None
        self.cache.reset()

    # -- one reply ---------------------------------------------------------------------------------

    def reply(self, text: str) -> bool:
        """Stream the reply to `text`, then its status line; False when Ctrl-C stopped it. A stopped
        reply stays in the conversation as far as it got (the next turn can say "go on"; /clear
        forgets it); one that fails (an error, raised) leaves the conversation as it was."""
        st, tok = self.settings, self.tokenizer
        start_size = self.model_size(st.think if st.thinking else st.answer)
        end_size = self.model_size(st.answer)
        switch = None
        if st.thinking and (start_size != end_size or st.max_think is not None):
            switch = ne.Switch(end_size, on_token=tok.think_end, after=st.max_think,
                               mode=st.switch)
        system = [{"role": "system", "content": st.system}] if st.system is not None else []
        messages = self.messages + [{"role": "user", "content": text}]
        history = tok.encode(render_chat(system + messages))
        prompt = tok.encode(render_chat(system + messages, add_generation_prompt=True,
                                        enable_thinking=st.thinking))
        context = self.cache.max_len
        max_new = min(st.max_new_tokens, context - len(prompt))
        if max_new <= 0:
            alone = len(tok.encode(render_chat(system + messages[-1:], add_generation_prompt=True,
                                               enable_thinking=st.thinking)))
            if alone < context:  # it fits without the turns before it
                raise NanoElasticError(f"the conversation fills the context ({tokens(context)}): "
                                       f"/clear starts a new one")
            raise NanoElasticError(f"the prompt ({tokens(alone)}) leaves no room for a reply in "
                                   f"the context ({tokens(context)}): shorten it")
        turn = Turn(Phase("think", st.think, TextStream(tok)),
                    Phase("answer", st.answer, TextStream(tok)))
        turn.phase = turn.think if st.thinking else turn.answer
        try:
            # (history is a prefix of prompt: the generation prompt starts with a special token)
            self.prefill_history(history if prompt[:len(history)] == history else [], start_size)
            self.stream(turn, prompt, max_new, start_size, switch)
        except KeyboardInterrupt:  # outside generate() (which ends its stream on one): stopped too
            self.finish(turn, messages, max_new)
            raise
        except BaseException:  # an error: no status line, and the turn is not kept
            self.end_line(turn)
            raise
        self.finish(turn, messages, max_new)
        return not turn.interrupted

    def stream(self, turn: Turn, prompt: list[int], max_new: int, size: str, switch) -> None:
        st, tok = self.settings, self.tokenizer
        seed = None if st.seed is None else (st.seed + self.turn) % (ne.MAX_SEED + 1)
        # generate() checks its arguments when called: a bad one fails here, before any output
        reply = ne.generate(self.model, prompt, max_new, size=size, switch=switch,
                            stop_tokens=tok.stop, temperature=st.temperature, top_p=st.top_p,
                            seed=seed, cache=self.decoder, prefill_chunk=PREFILL_CHUNK)
        self.start_phase(turn.phase)
        t0 = last = time.perf_counter()
        for token in reply:
            now, phase = time.perf_counter(), turn.phase
            turn.count += 1
            if token.size != size:  # the answer size wrote it: the switch happened
                turn.switched = switch.mode
            if turn.first_token is None:
                turn.first_token = now - t0
            else:
                phase.steps += 1
                phase.seconds += now - last
            last = now
            if token.id in tok.stop:
                turn.stopped = True
                return
            if phase is turn.think and token.id == tok.think_end:
                self.show(phase, phase.stream.flush())
                turn.phase = turn.answer
                self.start_phase(turn.answer)
                continue
            phase.tokens += 1
            self.show(phase, phase.stream.push(token.id))

    def finish(self, turn: Turn, messages: list[dict], max_new: int) -> None:
        """The end of a reply, stopped or not: the rest of its text, why it ended, its status."""
        turn.interrupted = not turn.stopped and turn.count < max_new
        self.show(turn.phase, turn.phase.stream.flush())
        self.end_line(turn)
        if turn.interrupted:
            self.write("[stopped]\n")
        elif not turn.stopped:
            limit = ("--max-new-tokens" if max_new == self.settings.max_new_tokens
                     else f"the context ({tokens(self.cache.max_len)}) is full")
            self.write(f"[cut at {tokens(max_new)}: {limit}]\n")
        think = turn.think if self.settings.thinking else None
        self.write(self.status(think, turn.answer, turn.first_token, turn.switched) + "\n")
        thought = self.tokenizer.decode(turn.think.stream.ids)
        said = self.tokenizer.decode(turn.answer.stream.ids)
        answer = {"role": "assistant", "content": said, "reasoning_content": thought}
        self.messages = messages + [answer]
        self.turn += 1

    def end_line(self, turn: Turn) -> None:
        """End the line the reply's text left open (the answer's on `out`)."""
        self.write("" if self.at_line_start else "\n", answer=turn.answer.started)
        self.at_line_start = True

    def start_phase(self, phase: Phase) -> None:
        # an answer written to another stream than its label starts on a line of its own there, so
        # that each stream's lines are whole (and the two together, on one terminal, read right)
        own_line = phase.label == "answer" and self.out is not self.log
        self.write(("" if self.at_line_start else "\n") + f"[{phase.label} {phase.size}]"
                   + ("\n" if own_line else " "), dim=phase.label == "think")
        self.at_line_start = own_line

    def show(self, phase: Phase, text: str) -> None:
        text = printable(text)
        if not phase.started:
            text = text.lstrip()
            phase.started = bool(text)
        if text:
            self.write(text, dim=phase.label == "think", answer=phase.label == "answer")
            self.at_line_start = text.endswith("\n")

    def status(self, think: Phase | None, answer: Phase, first_token: float | None,
               switched: str | None) -> str:
        parts = []
        for p in (think, answer):
            if p is not None:
                rate = f"{p.steps / p.seconds:.1f} tok/s" if p.seconds > 0 else "- tok/s"
                budget = " (budget)" if p is think and p.tokens == self.settings.max_think else ""
                parts.append(f"{p.label} {p.size}: {p.tokens} tok{budget}, {rate}")
        parts.append("first token " + (f"{first_token:.2f} s" if first_token is not None else "-"))
        parts.append(f"switch {switched}" if switched else "no switch")
        return "[" + " | ".join(parts) + "]"


def printable(text: str) -> str:
    """Control characters (random weights write plenty) would move the cursor: show U+FFFD."""
    return "".join(c if c in "\n\t" or unicodedata.category(c) != "Cc" else "\ufffd" for c in text)


# --------------------------------------------------------------------------------------------------
# 5. The REPL and the command line

USAGE = {"/think": "/think SIZE   (30B, 23B, 12B or HIDDENxFFN)",
         "/answer": "/answer SIZE   (30B, 23B, 12B or HIDDENxFFN)",
         "/switch": "/switch transplant|reprefill", "/nothink": "/nothink", "/clear": "/clear",
         "/help": "/help", "/exit": "/exit", "/quit": "/quit"}


def command(chat: Chat, line: str) -> bool:
    """Run one /command (in any case); False means leave. A misused command gets its usage
    line."""
    typed, arg = (line.split(maxsplit=1) + [""])[:2]
    name, arg, st = typed.lower(), arg.strip(), chat.settings
    if name not in USAGE:
        raise NanoElasticError(f"unknown command {typed}: /help lists them (// sends a prompt "
                               f"that starts with /)")
    takes_arg = name in ("/think", "/answer", "/switch")
    if bool(arg) != takes_arg or len(arg.split()) > 1 or (
            name == "/switch" and arg.lower() not in ("transplant", "reprefill")):
        raise NanoElasticError(f"usage: {USAGE[name]}")
    if name in ("/exit", "/quit"):
        return False
    if name == "/help":
        print(HELP)
    elif name in ("/think", "/answer"):
        chat.model_size(arg)
        setattr(st, name[1:], ne.size_name(arg))
        print(f"think {st.think}, answer {st.answer}")
    elif name == "/switch":
        st.switch = arg.lower()
        print(f"switch {st.switch}")
    elif name == "/nothink":
        st.thinking = not st.thinking
        print("thinking " + ("on" if st.thinking else "off"))
    elif name == "/clear":
        chat.clear()
        print("conversation cleared")
    return True


def pending_input(seconds: float = 0.03) -> bool:
    """Whether more typed or pasted input is already waiting on a terminal's stdin (a paste arrives
    at once; typing does not)."""
    import select

    try:
        return bool(select.select([sys.stdin], [], [], seconds)[0])
    except (OSError, ValueError):  # no select on this stdin (e.g. Windows consoles)
        return False


def read_prompt(echo: bool) -> str:
    """One prompt: a line; lines ending in \\ go on; lines between two \"\"\" lines are one prompt;
    on a terminal, lines that arrive together (a paste) are one prompt. EOFError at the end of
    input (a prompt that the end cuts short is returned first)."""
    lines, block = [], False
    while True:
        try:
            line = input("> " if not lines else ". ")
        except EOFError:  # the input ends inside a prompt (after a \ or in a """ block): send it
            if not lines:
                raise
            print()
            return "\n".join(lines)
        if echo:  # input from a pipe: show it, so the transcript reads like a conversation
            print(line)
        if line.strip() == '"""':
            if block or not lines:
                block = not block
                if not block:
                    return "\n".join(lines)
                continue
        if line.endswith("\\") and not block:
            lines.append(line[:-1])
            continue
        lines.append(line)
        if not block and (echo or not pending_input()):
            return "\n".join(lines)


def repl(chat: Chat, echo: bool) -> None:
    """Read a prompt, answer it; until /exit or Ctrl-D. Ctrl-C at the prompt clears the line."""
    if not echo:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    while True:
        try:
            line = read_prompt(echo).strip()
            if line.startswith("/") and not line.startswith("//"):
                if not command(chat, line):
                    return
            elif line:
                chat.reply(line[1:] if line.startswith("//") else line)
        except EOFError:
            print()
            return
        except KeyboardInterrupt:
            # The one place for Ctrl-C. At the prompt the line is dropped (as in a shell); in a
            # reply, the reply has stopped (and said so). The chat goes on.
            print("^C" if echo else "")
        except NanoElasticError as e:
            print(f"error: {e}")
        except torch.cuda.OutOfMemoryError as e:  # the reply is dropped, as after any error
            print(f"error: {str(e).splitlines()[0]} (a shorter conversation needs less: /clear)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = ne.ArgumentParser(prog="chat.py", description="Chat with Nemotron 3 Nano Elastic: think "
                           "with one nested size, answer with another, switching when the model "
                           "writes </think>.", epilog=HELP,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", metavar="DIR", help="checkpoint folder (default: $NANOELASTIC_CKPT, "
                    "else the Hugging Face cache of "
                    "nvidia/NVIDIA-Nemotron-Labs-3-Elastic-30B-A3B-FP8 or -BF16)")
    ap.add_argument("--demo", action="store_true", help="a small random checkpoint (random "
                    "weights: the text is noise); with --ckpt DIR it is kept in DIR (written there "
                    "when missing or empty)")
    # every default is Settings' (or the demo's), none is set here
    d, demo = Settings(), DEMO_SETTINGS
    ap.add_argument("--think", metavar="SIZE", help=f"size that thinks: 30B, 23B, 12B or "
                    f"HIDDENxFFN (default {d.think}; demo {demo['think']})")
    ap.add_argument("--answer", metavar="SIZE", help="size that answers")
    ap.add_argument("--load", metavar="SIZE", help="read only this size's weights: less memory "
                    "(12B: about 13 GB in FP8), and no larger size to think or answer with")
    ap.add_argument("--switch", choices=["transplant", "reprefill"], help="at </think>: keep the "
                    "caches (transplant) or rebuild them with the answer size")
    ap.add_argument("--no-think", action="store_true", help="answer without thinking")
    ap.add_argument("--max-think", type=int, metavar="N", help=f"thinking budget: after N tokens, "
                    f"</think> is written for the model and the size switches "
                    f"(demo: {demo['max_think']})")
    ap.add_argument("--max-new-tokens", type=int, metavar="N", help=f"per reply, thinking included "
                    f"(default {d.max_new_tokens}; demo {demo['max_new_tokens']})")
    ap.add_argument("--temperature", type=float, metavar="T", help=f"default {d.temperature} with "
                    f"--top-p {d.top_p}: the model card's advice for reasoning; 0 = greedy")
    ap.add_argument("--top-p", type=float, metavar="P", help="nucleus sampling")
    ap.add_argument("--seed", type=int, help=f"for reproducible sampling (demo: {demo['seed']})")
    ap.add_argument("--system", metavar="TEXT", help="system prompt")
    ap.add_argument("--prompt", metavar="TEXT", help="answer this and exit")
    ap.add_argument("--interactive", action="store_true", help="chat line by line even when stdin "
                    "is not a terminal")
    args = ap.parse_args(argv)
    for name, low, high in (("max_think", 0, math.inf), ("max_new_tokens", 1, math.inf),
                            ("seed", 0, ne.MAX_SEED)):
        value = getattr(args, name)
        if value is not None and not low <= value <= high:
            bounds = f">= {low}" if high == math.inf else f"in [{low}, {high}]"
            ap.error(f"--{name.replace('_', '-')} must be {bounds}")
    try:  # what is not given is checked with the default's values, which pass
        ne.check_sampling(0.0 if args.temperature is None else args.temperature,
                          1.0 if args.top_p is None else args.top_p, 0, SAMPLING_FLAGS)
    except NanoElasticError as e:
        ap.error(str(e))
    return args


def settings_of(args: argparse.Namespace) -> Settings:
    """The command line's settings over the defaults (Settings', or the demo's)."""
    given = dict(think=args.think, answer=args.answer, switch=args.switch,
                 thinking=not args.no_think, max_think=args.max_think,
                 max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                 top_p=args.top_p, seed=args.seed, system=args.system)
    defaults = Settings(**DEMO_SETTINGS) if args.demo else Settings()
    settings = replace(defaults, **{k: v for k, v in given.items() if v is not None})
    settings.think, settings.answer = ne.size_name(settings.think), ne.size_name(settings.answer)
    return settings


def check_sizes(args: argparse.Namespace, settings: Settings) -> tuple[dict[str, str], str | None]:
    """Refuse a size that does not fit the checkpoint (or the --load size) before anything is
    loaded (its config.json is enough). -> the size names that differ from the model's (the demo's
    stand-ins), and the model's name of the --load size."""
    size_names = DEMO_SIZES if args.demo else {}
    if args.demo:
        config = demo_config()
    else:
        config = ne.Config.from_file(find_checkpoint(args.ckpt) / "config.json")
    whole = f"{config.hidden_size}x{config.moe_intermediate_size}"
    load = None
    if args.load:
        whole = args.load = ne.size_name(args.load)
        load = ne.model_size(args.load, config, size_names)
        config = config.sliced(*ne.parse_size(load, config))
    for name in ("think", "answer"):
        try:
            ne.model_size(getattr(settings, name), config, size_names)
        except NanoElasticError:
            if getattr(args, name) is not None:
                raise
            # the default (30B) does not fit a sliced checkpoint or --load: use the whole model
            setattr(settings, name, whole)
    return size_names, load


def check_demo_folder(ckpt: str | None) -> None:
    """--demo --ckpt DIR: a folder that is missing, empty (not the current one: the demo is
    written beside it and renamed into place) or holds a checkpoint (a link to one will do); else
    one clear error."""
    if not ckpt:  # no folder given: load() writes it in a temporary one
        return
    path = Path(ckpt)
    if path.is_file():
        raise NanoElasticError(f"{ckpt} is a file: --demo --ckpt takes a folder (written if "
                               f"missing)")
    if path.is_symlink() and not (path / "config.json").is_file():
        raise NanoElasticError(f"{ckpt} is a symbolic link: --demo writes its checkpoint into a "
                               f"folder, not through a link; give the folder itself")
    if not path.is_dir():  # missing: written there
        return
    empty = not any(path.iterdir())
    if empty and path.resolve() == Path.cwd():
        raise NanoElasticError(f"--demo --ckpt {ckpt}: the current folder; give a new folder for "
                               f"the demo checkpoint, e.g. {path / 'demo'}")
    if not empty and not (path / "config.json").is_file():
        raise NanoElasticError(f"{ckpt} holds no demo checkpoint (no config.json): give a new or "
                               f"empty folder for one, or the folder of one")


def load(args: argparse.Namespace, tmp: str,
         size: str | None = None) -> tuple[ne.Model, ChatTokenizer]:
    """The checkpoint's model (of the nested `size` only, if given) and tokenizer."""
    if args.demo:
        check_demo_folder(args.ckpt)
        path = Path(args.ckpt) if args.ckpt else Path(tmp) / "demo"
        if path.is_dir() and not any(path.iterdir()):
            path.rmdir()  # an empty folder (made for it): the demo checkpoint is written there
        if not path.exists():
            try:
                write_demo_checkpoint(path)
            except NanoElasticError:  # another demo run wrote it meanwhile: check it and use it
                if not path.is_dir():
                    raise
        if ne.Config.from_file(path / "config.json") != demo_config():
            raise NanoElasticError(f"{path} is not a demo checkpoint (its config is not the "
                                   f"demo's)")
    else:
        path = find_checkpoint(args.ckpt)
    tokenizer = ChatTokenizer.load(path)
    if args.demo and not torch.cuda.is_available():
        torch.set_num_threads(1)  # tiny matrices: more threads only add overhead
    model = ne.Model.from_pretrained(path, dtype=torch.float32 if args.demo else None,
                                     verbose=not args.demo, size=size)
    return model, tokenizer


def main(argv: list[str] | None = None) -> int:
    import tempfile

    args = parse_args(argv)
    # not UTF-8 (Python hands them over surrogate-escaped): U+FFFD
    for name in ("prompt", "system"):
        text = getattr(args, name)
        if text is not None:
            setattr(args, name, text.encode(errors="surrogateescape").decode(errors="replace"))
    prompt = args.prompt
    if prompt is None and not args.interactive and not sys.stdin.isatty():
        prompt = sys.stdin.read()
    if prompt is not None and not prompt.strip():
        raise NanoElasticError("empty prompt")
    settings = settings_of(args)
    size_names, load_size = check_sizes(args, settings)
    if args.demo:
        check_demo_folder(args.ckpt)  # before the banner: one line
    # one-shot (--prompt, piped): stdout is only the answer; the rest goes to stderr
    log = sys.stderr if prompt is not None else sys.stdout
    if args.demo:
        print(f"DEMO: random weights, so the text is noise; the sizes, caches and switch are "
              f"real.\n30B/23B/12B stand for the nested sizes {'/'.join(DEMO_SIZES.values())} of a "
              f"small random checkpoint.\nRandom weights rarely write </think>: thinking stops "
              f"after {tokens(settings.max_think)} (--max-think).",
              file=log, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        model, tokenizer = load(args, tmp, load_size)
        color = log.isatty() and not os.environ.get("NO_COLOR")
        chat = Chat(model, tokenizer, settings, size_names, color, log=log)
        if prompt is not None:
            return 0 if chat.reply(prompt.strip()) else 130
        sizes = f"think {settings.think}, answer {settings.answer}, switch {settings.switch}"
        if not settings.thinking:
            sizes = f"answer {settings.answer}, thinking off"
        if args.load:
            sizes += f" (only {args.load} loaded)"
        print(f"nanoelastic chat: {sizes}. /help for commands, Ctrl-D to leave.")
        repl(chat, echo=not sys.stdin.isatty())
    return 0


if __name__ == "__main__":
    sys.stdin.reconfigure(errors="replace")  # bytes that are not UTF-8 read as U+FFFD
    ne.run_cli("chat.py", main)  # SIGTERM removes the demo's temporary checkpoint, as Ctrl-C does
