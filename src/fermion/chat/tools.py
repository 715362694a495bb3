"""Tool calls in text: how offered tools are shown to a model, how its calls and their results are written into a
conversation, and how a call is read back out of what it wrote.

One format, tinytask's (data/synthetic/tinytask.py trains it): a system line asking for a call, the tools as one-line
signatures under "Tools:" before the user's request, and the answer one JSON object on one line,
`{"name": <tool>, "arguments": {...}}`. A chat template that reads the `tools` variable (the Hub's tool-calling
templates, rendered as transformers' `apply_chat_template(tools=...)` renders them) shows tools its own way; for
every other template, the built-in ones included, `fold` writes the tools, the assistant's calls and the tools'
results into plain system / user / assistant messages in this format, so a model fine-tuned on the built-in tinytask
data sees, when served, the prompt it was trained on.

Reading calls back accepts that JSON form (one object, a list of them, or one per line) and the Hermes / Qwen form
`<tool_call>{"name": ..., "arguments": ...}</tool_call>` that many Hub models write.
"""

from __future__ import annotations

import json
import re

SYSTEM = 'Call one of the tools. Reply with JSON only: {"name": tool, "arguments": {...}}.'
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"  # the Hermes / Qwen wrapping of a call
_FENCE = re.compile(r"```(?:json)?\s*(.*?)\s*```", re.DOTALL)


def one_line(value: object) -> str:
    """JSON as calls are written: on one line, spaced as `json.dumps` spaces it by default, which is how constrained
    decoding writes it too (infer/constrain.py's SEPARATORS)."""
    return json.dumps(value)


def functions(tools: list[dict]) -> list[dict]:
    """Function definitions ({"name", "parameters", ...}) from tools in OpenAI's form ({"type": "function",
    "function": {...}}); plain definitions pass through."""
    return [tool["function"] if "function" in tool else tool for tool in tools]


def signature(function: dict) -> str:
    """A function in one line, e.g. `book_hotel(city: city, check_in: YYYY-MM-DD, nights: 1-14, guests: 1-6)`: each
    argument's description, else its enum's values, else its range, else its type; optional ones marked `?`; the
    function's description, if any, after ` - `."""
    def hint(schema: dict) -> str:
        if "description" in schema:
            return schema["description"]
        if "enum" in schema:
            return "|".join(map(str, schema["enum"]))
        if "minimum" in schema and "maximum" in schema:
            return f"{schema['minimum']}-{schema['maximum']}"
        kind = schema.get("type", "any")
        return "|".join(kind) if isinstance(kind, list) else str(kind)

    parameters = function.get("parameters") or {}
    required = set(parameters.get("required", []))
    arguments = ", ".join(f"{name}{'' if name in required else '?'}: {hint(schema if isinstance(schema, dict) else {})}"
                          for name, schema in (parameters.get("properties") or {}).items())
    described = f" - {function['description']}" if function.get("description") else ""
    return f"{function['name']}({arguments}){described}"


def tools_block(tools: list[dict]) -> str:
    """"Tools:" and a signature a line."""
    return "Tools:\n" + "\n".join(signature(function) for function in functions(tools))


def tools_prompt(tools: list[dict], request: str) -> str:
    """A user message offering the tools: the tools block, then "Request: " and what the user asks."""
    return f"{tools_block(tools)}\nRequest: {request}"


NO_ARGUMENTS = {"type": "object", "properties": {}, "additionalProperties": False}  # OpenAI: no parameters, none


def call_schema(tools: list[dict]) -> dict:
    """The JSON Schema of an answer: a call of any one of `tools`, with that tool's arguments."""
    return {"anyOf": [{"type": "object",
                       "properties": {"name": {"const": function["name"]},
                                      "arguments": function.get("parameters") or NO_ARGUMENTS},
                       "required": ["name", "arguments"], "additionalProperties": False}
                      for function in functions(tools)]}


def fold(messages: list[dict], tools: list[dict] | None) -> list[dict]:
    """The conversation as plain system / user / assistant messages for a template that does not read `tools`.

    With tools: the system line (before the conversation's own system message, if any) and the tools block before
    the text of the last user message (or, with none, in the system message). An assistant's calls become its JSON
    lines after its text; a tool's result (role "tool") becomes a user message "Result of <name>: <content>".
    A conversation with neither tools nor tool turns is returned as it is.
    """
    if not tools and not any(m.get("tool_calls") or m.get("role") == "tool" for m in messages):
        return messages
    users = [i for i, m in enumerate(messages) if m.get("role") == "user"]
    out = []
    for i, message in enumerate(messages):
        role, content = message.get("role"), message.get("content") or ""
        if role == "tool":
            out.append({"role": "user", "content": f"Result of {message.get('name') or 'the tool'}: {content}"})
        elif role == "assistant" and message.get("tool_calls"):
            calls = [one_line({"name": call["function"]["name"], "arguments": call["function"]["arguments"]})
                     for call in message["tool_calls"]]
            out.append({**message, "content": "\n".join([content, *calls] if content else calls)})
        elif tools and users and i == users[-1]:
            out.append({**message, "content": tools_prompt(tools, content)})
        else:
            out.append(message)
    if tools:
        own = out.pop(0)["content"] if out and out[0].get("role") == "system" else ""
        system = "\n\n".join(part for part in (SYSTEM, own, "" if users else tools_block(tools)) if part)
        out.insert(0, {"role": "system", "content": system})
    return out


def parse_calls(text: str, names: set[str]) -> list[dict] | None:
    """The calls `text` is made of, each {"name", "arguments"}, or None when it is not only calls of the tools
    named (other text, broken JSON, an unknown tool, keys a call does not have)."""
    text = text.strip()
    if text.startswith(CALL_OPEN):
        values, rest = [], text
        while rest:
            if not rest.startswith(CALL_OPEN):
                return None
            body, _, rest = rest[len(CALL_OPEN):].partition(CALL_CLOSE)  # an unclosed last block runs to the end
            values.append(_json(body))
            rest = rest.strip()
    else:
        fenced = _FENCE.fullmatch(text)
        whole = _json(fenced.group(1) if fenced else text)
        values = whole if isinstance(whole, list) else [whole] if whole is not None else [
            _json(line) for line in text.splitlines() if line.strip()]
    calls = [_call(value, names) for value in values]
    return calls if calls and all(call is not None for call in calls) else None


def _json(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return None


def _call(value, names: set[str]) -> dict | None:
    if not isinstance(value, dict) or not set(value) <= {"name", "arguments"} or value.get("name") not in names:
        return None
    arguments = value.get("arguments", {})
    if isinstance(arguments, str):  # some models write the arguments as a JSON string, as the API carries them
        arguments = _json(arguments)
    return {"name": value["name"], "arguments": arguments} if isinstance(arguments, dict) else None
