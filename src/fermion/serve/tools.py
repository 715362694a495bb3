"""Tools over the OpenAI API: what a request's `tools` and `tool_choice` make of its prompt and its decoding, and the
model's text read back as `tool_calls`, whole or streamed. The format itself (how tools are shown, how a call is
written and read) is chat/tools.py's.

    tool_choice       the prompt shows the tools   decoding                       the answer
    "none"            no                           free                           text
    "auto"            yes                          free                           tool_calls when the text is only
                                                                                  calls of offered tools, else text
    "required"        yes                          a call of any offered tool     tool_calls
    {"function": f}   yes                          a call of f                    tool_calls

Without tool_choice it is "auto" with tools and "none" without, as OpenAI defaults it. "none" leaves the tools out
of the prompt: the prompt that shows them asks for a call (tinytask's system line), which the answer must not be.
A forced call decodes under the JSON Schema of `{"name": f, "arguments": <f's parameters>}` (an anyOf of them for
"required") with llguidance, as response_format does, so it always parses and its arguments match the schema. A
forced call is one call; `parallel_tool_calls: false` keeps the first of several an "auto" answer makes.

Streaming holds back text only while it could still be a call: an answer whose first non-blank character starts
JSON or a fenced block (`{`, `[`, a backtick), or the text from a `<tool_call>` on, is held to the end of the answer
and then sent as `delta.tool_calls` if it is calls, else as content; text before that streams as it comes (a tail
that could begin `<tool_call>` waits, as stop strings do). Each call comes in one chunk with its index, id, name
and whole arguments string, which the official client's stream accumulation assembles as it does OpenAI's pieces.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from fermion.chat.tools import CALL_OPEN, call_schema, functions, parse_calls
from fermion.infer.engine import held_back
from fermion.serve.protocol import APIError, ChatCompletionRequest, NamedToolChoice

_CALL_STARTS = "{[`"  # an answer starting with one of these may be calls in JSON (or a fenced block of them)


@dataclass(frozen=True)
class ToolPlan:
    rendered: list[dict] | None  # the tools the chat template shows (OpenAI's form); None: no tools in play
    schema: dict | None  # the JSON Schema a forced call decodes under
    parallel: bool

    @classmethod
    def of(cls, body: ChatCompletionRequest) -> ToolPlan:
        tools = [tool.model_dump(exclude_unset=True) for tool in body.tools or []]
        choice = body.tool_choice if body.tool_choice is not None else "auto" if tools else "none"
        if not tools and choice not in ("none", "auto"):
            raise APIError(400, "tool_choice other than none or auto needs tools", param="tool_choice")
        schema = None
        if isinstance(choice, NamedToolChoice):
            chosen = [f for f in functions(tools) if f["name"] == choice.function.name]
            if not chosen:
                raise APIError(400, f"tool_choice names the function {choice.function.name!r}, which tools does not "
                                    "define", param="tool_choice")
            schema = call_schema(chosen)
        elif choice == "required":
            schema = call_schema(tools)
        if schema is not None and body.response_format is not None and body.response_format.type != "text":
            raise APIError(400, "response_format cannot shape an answer that tool_choice forces to be a call",
                           param="response_format")
        return cls(tools if choice != "none" else None, schema, body.parallel_tool_calls is not False)

    def reader(self) -> CallReader:
        names = {f["name"] for f in functions(self.rendered or [])}
        return CallReader(names, forced=self.schema is not None, parallel=self.parallel)

    def message(self, text: str) -> tuple[dict, bool]:
        """A whole answer as the assistant message, and whether it is tool calls."""
        reader = self.reader()
        content = reader.feed(text)
        rest, calls = reader.finish()
        content += rest
        message = {"role": "assistant", "content": content if content.strip() or not calls else None,
                   "refusal": None}
        if calls:
            message["tool_calls"] = openai_calls(calls, streamed=False)
        return message, bool(calls)


class CallReader:
    """One answer's text as it is generated: `feed` returns what can be shown as content now, `finish` the rest and
    the calls. With no tools in play, everything is content at once."""

    def __init__(self, names: set[str], forced: bool, parallel: bool):
        self.names, self.forced, self.parallel = names, forced, parallel
        self.text = ""
        self.sent = 0  # text[:sent] has been handed out as content
        self.held: int | None = 0 if forced else None  # where a possible call begins, held from there to the end

    def feed(self, text: str) -> str:
        self.text += text
        if not self.names:
            self.sent = len(self.text)
            return text
        if self.held is not None:
            return ""
        if self.sent == 0:
            head = self.text.lstrip()
            if not head:
                return ""  # blank so far: what comes next decides
            if head[0] in _CALL_STARTS:
                self.held = 0
                return ""
        at = self.text.find(CALL_OPEN, max(0, self.sent - len(CALL_OPEN)))
        if at >= 0:
            self.held = at
            return self._send(at)
        return self._send(len(self.text) - held_back(self.text, [CALL_OPEN]))

    def finish(self) -> tuple[str, list[dict]]:
        """(content not yet handed out, the calls); calls only when the held text is nothing but calls."""
        calls = parse_calls(self.text[self.held:], self.names) if self.held is not None else None
        if calls:
            return "", calls if self.parallel else calls[:1]
        return self._send(len(self.text), blank=True), []

    def _send(self, end: int, blank: bool = False) -> str:
        """Hand out text up to `end`; blank text at the start waits (it may precede a call) unless `blank`."""
        out = self.text[self.sent:end]
        if self.sent == 0 and not out.strip() and not blank:
            return ""
        self.sent = max(self.sent, end)
        return out


def openai_calls(calls: list[dict], streamed: bool) -> list[dict]:
    """Calls as OpenAI's `tool_calls` (a streamed delta's carry their index)."""
    return [{**({"index": k} if streamed else {}), "id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": call["name"], "arguments": json.dumps(call["arguments"], ensure_ascii=False)}}
            for k, call in enumerate(calls)]
