"""`fermion chat`: a streaming multi-turn REPL over the engine.

`ChatSession` holds the conversation and turns one input line into output pieces; it never touches the terminal,
so tests drive it directly. `run_repl` is the thin terminal loop around it: line editing and history through
`readline` where the platform has it, Ctrl-C stopping the answer in progress, Ctrl-D or /exit ending the session.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterator
from contextlib import closing, suppress
from pathlib import Path
from typing import NamedTuple

from rich.console import Console
from rich.markup import escape

from fermion.atomic import replaced_file
from fermion.chat.templates import ChatTemplate, TemplateError
from fermion.errors import StorageError
from fermion.infer.engine import Engine, SamplingParams
from fermion.infer.sampling import LIMITS

try:
    import readline
except ImportError:  # Windows without pyreadline: plain input() still works
    readline = None

HISTORY_FILE = Path("~/.fermion_chat_history").expanduser()
COMMANDS = {
    "/system": "/system TEXT  set the system prompt (alone: show it)",
    "/reset": "/reset        start a new conversation (the system prompt stays)",
    "/temp": "/temp X       set the sampling temperature (0: greedy)",
    "/save": "/save PATH    write the conversation as JSON ({\"messages\": [...]}, what `fermion sft` reads)",
    "/help": "/help         this list",
    "/exit": "/exit         leave (Ctrl-D too)",
}


class Piece(NamedTuple):
    text: str
    kind: str  # "answer": the model's text, shown as is; "note": what the REPL itself says


def note(text: str) -> Piece:
    return Piece(text, "note")


class ChatSession:
    """A conversation with the model: user and assistant messages, an optional system prompt, sampling settings."""

    def __init__(self, engine: Engine, template: ChatTemplate, params: SamplingParams, system: str | None = None):
        self.engine, self.template = engine, template
        # The template's end-of-turn strings end an answer; the eos token already does inside the engine.
        self.params = dataclasses.replace(params, stop=[*params.stop, *template.stop_strings])
        self.system = system
        self.messages: list[dict] = []  # the turns, without the system prompt
        self.done = False

    def conversation(self) -> list[dict]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.messages

    def handle(self, line: str) -> Iterator[Piece]:
        """The output for one input line: a command's answer, or the model's reply streamed as it is generated."""
        line = line.strip()
        if line.startswith("/"):
            yield note(self.command(line))
        elif line:
            yield from self.reply(line)

    # ------------------------------------------------------------------------------------------------ commands

    def command(self, line: str) -> str:
        name, _, argument = line.partition(" ")
        argument = argument.strip()
        if name == "/system":
            return self._set_system(argument)
        if name == "/reset":
            self.messages = []
            return "conversation cleared" + (" (system prompt kept)" if self.system else "")
        if name == "/temp":
            return self._set_temperature(argument)
        if name == "/save":
            return self._save(argument)
        if name == "/exit":
            self.done = True
            return "bye"
        listing = "\n".join(COMMANDS.values())
        return listing if name == "/help" else f"unknown command {name}; the commands are:\n{listing}"

    def _set_system(self, text: str) -> str:
        if not text:
            return f"system prompt: {self.system!r}" if self.system else "no system prompt (set one: /system TEXT)"
        self.system = text
        return f"system prompt set to {text!r}"

    def _set_temperature(self, value: str) -> str:
        try:
            temperature = float(value)
        except ValueError:
            return f"/temp takes a number {LIMITS['temperature']}, not {value!r}"
        try:
            self.params = dataclasses.replace(self.params, temperature=temperature)
        except ValueError as err:
            return str(err)
        return f"temperature set to {temperature:g}" + (" (greedy)" if temperature == 0 else "")

    def _save(self, where: str) -> str:
        if not where:
            return "/save needs a path: /save chat.json"
        path = Path(where).expanduser()
        try:
            with replaced_file(path) as tmp:
                tmp.write_text(json.dumps({"messages": self.conversation()}, ensure_ascii=False, indent=2) + "\n",
                               encoding="utf-8")
        except StorageError as err:  # full, read-only, no permission: its message names the path
            return f"could not save: {err}"
        except OSError as err:
            return f"could not save to {path}: {err.strerror or err}"
        return f"saved {len(self.messages)} messages to {path}"

    # --------------------------------------------------------------------------------------------------- reply

    def reply(self, text: str) -> Iterator[Piece]:
        """Stream the model's answer to `text`. When the answer does not complete (Ctrl-C, closing this
        iterator, an error), the turn is taken back, so the conversation stays one the template can render."""
        self.messages.append({"role": "user", "content": text})
        answered = False
        try:
            prompt, dropped = self._fitted_prompt()
            if dropped:
                yield note(f"(the conversation outgrew the context: dropped the oldest {dropped} messages)")
            start = time.perf_counter()
            with closing(self.engine.stream(prompt, self.params)) as deltas:
                for delta in deltas:
                    yield Piece(delta, "answer")
            seconds = time.perf_counter() - start
            self.messages.append({"role": "assistant", "content": self.engine.last.text})
            answered = True
            yield note(_speed(len(self.engine.last.token_ids), seconds))
        except (ValueError, TemplateError) as err:  # a prompt longer than the context, a template that fails
            yield note(f"error: {err}")
        finally:
            if not answered:
                self.messages.pop()

    def _fitted_prompt(self) -> tuple[list[int], int]:
        """The encoded conversation with room for a whole answer, dropping the oldest turns until it has it
        (the system prompt always stays); also how many messages were dropped."""
        dropped = 0
        while True:
            ids = self.template.encode(self.engine.tokenizer, self.conversation(), add_generation_prompt=True).ids
            if len(ids) + self.params.max_new_tokens <= self.engine.max_seq or len(self.messages) == 1:
                return ids, dropped
            # A turn is a user message and the answer to it; the newest user message is never dropped.
            turn = 2 if len(self.messages) > 2 else 1
            del self.messages[:turn]
            dropped += turn


def _speed(tokens: int, seconds: float) -> str:
    return f"{tokens} tokens in {seconds:.2f} s · {tokens / max(seconds, 1e-9):,.1f} tokens/s"


# ------------------------------------------------------------------------------------------------ the terminal


def run_repl(session: ChatSession, console: Console, interactive: bool) -> None:
    """Read lines until /exit or end of input, printing each answer as it streams."""
    console.print(f"[dim]chat · {session.template.name} template · /help for commands · Ctrl-D to leave[/]")
    if interactive:
        _load_history()
    try:
        while not session.done:
            try:
                line = input(">>> ")
            except EOFError:
                console.print()
                break
            except KeyboardInterrupt:  # at the prompt, Ctrl-C abandons the line, as in a shell
                console.print()
                continue
            _show(session.handle(line), console)
    finally:
        if interactive:
            _save_history()


def _show(pieces: Iterator[Piece], console: Console) -> None:
    answering = False
    try:
        for piece in pieces:
            if piece.kind == "answer":
                console.out(piece.text, end="", highlight=False)
                answering = True
                continue
            if answering:
                console.out("")
                answering = False
            console.print(f"[dim]{escape(piece.text)}[/]", highlight=False)
    except KeyboardInterrupt:
        pieces.close()  # releases the engine's sequence and takes the turn back
        console.print("\n[dim](stopped; this turn is not kept)[/]")


def _load_history() -> None:
    if readline is None:
        return
    with suppress(OSError):
        readline.read_history_file(HISTORY_FILE)


def _save_history() -> None:
    if readline is None:
        return
    with suppress(OSError):
        readline.set_history_length(1000)
        readline.write_history_file(HISTORY_FILE)
