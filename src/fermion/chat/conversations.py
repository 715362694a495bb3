"""Instruction and preference records in the formats people publish them in, turned into conversations.

SFT records become a list of messages ({"role", "content"}; a user message may carry "input"):

    messages           {"messages": [{"role": "user", "content": ...}, ...]}   (also ShareGPT's
                       {"conversations": [{"from": "human", "value": ...}, ...]})
    alpaca             {"instruction", "input", "output"}
    dolly              {"instruction", "context", "response"}
    prompt_completion  {"prompt", "completion"} (or "response")

Preference records become a `Pair`: the conversation so far, then the chosen and the rejected assistant reply:

    preference         {"prompt", "chosen", "rejected"}: strings, or message lists (TRL's conversational form),
                       or ShareGPT's {"conversations", "chosen": {"from", "value"}, "rejected": {...}}
    hh                 {"chosen", "rejected"}: Anthropic HH transcripts, "\n\nHuman: ..." / "\n\nAssistant: ..."
                       turns, identical up to the final assistant reply

A prompt that already carries a template would be wrapped twice by the chat template. The Alpaca rendering (Dolly as
mosaicml publishes it: "Below is an instruction...\n\n### Instruction:\n...\n\n### Response:\n") is taken apart
into the instruction, the input and (when not the standard one) the preamble as a system message, so the recipe's
template wraps it once (with the alpaca template the prompt comes out byte for byte as it was); the stage's data report
counts these. A prompt that starts with another template's markers (chatml, [INST]) is refused, the field named.

`format: auto` recognises each by its fields. A malformed record is a DataError naming it (file and line); a
well-formed record that cannot be trained on (no assistant turn, identical replies, HH transcripts that part before
the last reply) is `Skipped`, which the stages count by reason and report.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from fermion.chat.templates import ALPACA_INPUT, ALPACA_PLAIN, ROLES
from fermion.data.sources import DataError

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "model": "assistant"}
SFT_FORMATS = ("messages", "alpaca", "dolly", "prompt_completion")
PREFERENCE_FORMATS = ("preference", "hh")
_HH_TURN = re.compile(r"\n\n(Human|Assistant): ")
_ALPACA_RENDERED = re.compile(r"(?P<preamble>[^\n]*)\n\n### Instruction:\n(?P<instruction>.*?)\n\n"
                              r"(?:### Input:\n(?P<input>.*?)\n\n)?### Response:\n?", re.DOTALL)
_TEMPLATE_MARKERS = ("<|im_start|>", "[INST]", "<s>[INST]", "<|start_header_id|>", "<|user|>")
ALREADY_ALPACA = "prompt already in the Alpaca template: unwrapped, so the chat template applies once"


class Skipped(DataError):
    """A record left out of training; `reason` is the short label it is counted under."""

    def __init__(self, where: str, reason: str, detail: str = ""):
        super().__init__(f"{where}: {reason}{detail}")
        self.reason = reason


@dataclass(frozen=True)
class Pair:
    prompt: list[dict]  # the conversation before the reply; ends with a user turn
    chosen: str
    rejected: str


def detect_format(record: dict, where: str, allowed: tuple[str, ...]) -> str:
    keys = set(record)
    found = None
    if {"chosen", "rejected"} <= keys:
        found = "preference" if ("prompt" in keys or "conversations" in keys) else "hh"
    elif "messages" in keys or "conversations" in keys:
        found = "messages"
    elif {"instruction", "output"} <= keys:
        found = "alpaca"
    elif {"instruction", "response"} <= keys:
        found = "dolly"
    elif "prompt" in keys and ({"completion", "response"} & keys):
        found = "prompt_completion"
    if found not in allowed:
        raise DataError(f"{where}: fields {', '.join(sorted(map(str, keys))) or 'none'} match no "
                        f"{' / '.join(allowed)} record; see the formats in chat/conversations.py or set format")
    return found


def to_messages(record: dict, where: str, format: str = "auto", note: Callable[[str, str], None] | None = None
                ) -> list[dict]:
    """An SFT record -> messages with at least one assistant turn. `note(reason, where)` hears of a record that was
    changed on the way (an already templated prompt unwrapped)."""
    format = detect_format(record, where, SFT_FORMATS) if format == "auto" else format
    if format == "messages":
        messages = _message_list(record.get("messages", record.get("conversations")), where, "messages")
    elif format in ("alpaca", "dolly"):
        extra, answer = ("input", "output") if format == "alpaca" else ("context", "response")
        user = {"role": "user", "content": _text(record, "instruction", where)}
        if record.get(extra):
            user["input"] = _text(record, extra, where)
        messages = [user, {"role": "assistant", "content": _text(record, answer, where)}]
    elif format == "prompt_completion":
        answer = "completion" if "completion" in record else "response"
        messages = [*_prompt_messages(_text(record, "prompt", where), where, note),
                    {"role": "assistant", "content": _text(record, answer, where)}]
    else:
        raise DataError(f"{where}: format {format!r} is for preference data, not SFT")
    if not any(m["role"] == "assistant" for m in messages):
        raise Skipped(where, "no assistant turn", " (nothing to learn from)")
    return messages


def _prompt_messages(prompt: str, where: str, note: Callable[[str, str], None] | None) -> list[dict]:
    """A prompt field as the messages before the reply: one user message, or, for a prompt already rendered with the
    Alpaca template, its parts."""
    rendered = _ALPACA_RENDERED.fullmatch(prompt)
    if rendered is None or "### Instruction:" in rendered["instruction"]:
        stripped = prompt.lstrip()
        marker = next((m for m in _TEMPLATE_MARKERS if stripped.startswith(m)), None)
        if marker is not None:
            raise DataError(f"{where}: field 'prompt' already carries a chat template (it starts with {marker}); "
                            "fermion applies tokenizer.chat_template itself: give the plain text, or the "
                            "conversation as a messages record")
        return [{"role": "user", "content": prompt}]
    user = {"role": "user", "content": rendered["instruction"]}
    if rendered["input"]:
        user["input"] = rendered["input"]
    standard = ALPACA_INPUT if rendered["input"] else ALPACA_PLAIN
    system = [] if rendered["preamble"] == standard else [{"role": "system", "content": rendered["preamble"]}]
    if note is not None:
        note(ALREADY_ALPACA, where)
    return [*system, user]


def to_pair(record: dict, where: str, format: str = "auto") -> Pair:
    """A preference record -> the shared prompt and the two replies."""
    format = detect_format(record, where, PREFERENCE_FORMATS) if format == "auto" else format
    if format == "hh":
        chosen = _hh_turns(_text(record, "chosen", where), f"{where}: chosen")
        rejected = _hh_turns(_text(record, "rejected", where), f"{where}: rejected")
        if chosen[:-1] != rejected[:-1]:
            raise Skipped(where, "replies part before the last turn")
        return _checked(Pair(chosen[:-1], chosen[-1]["content"], rejected[-1]["content"]), where)
    if format != "preference":
        raise DataError(f"{where}: format {format!r} is for SFT data, not preference pairs")
    if "conversations" in record:
        prompt = _message_list(record["conversations"], where, "conversations")
    elif isinstance(record.get("prompt"), list):
        prompt = _message_list(record["prompt"], where, "prompt")
    else:
        prompt = [{"role": "user", "content": _text(record, "prompt", where)}]
    if not prompt or prompt[-1]["role"] != "user":
        raise DataError(f"{where}: the prompt must end with a user turn for the replies to answer")
    return _checked(Pair(prompt, _reply(record, "chosen", where), _reply(record, "rejected", where)), where)


def _checked(pair: Pair, where: str) -> Pair:
    if pair.chosen.strip() == pair.rejected.strip():
        raise Skipped(where, "identical chosen and rejected")
    return pair


def _reply(record: dict, field: str, where: str) -> str:
    value = record.get(field)
    if isinstance(value, str):
        return value
    if isinstance(value, dict):  # ShareGPT: {"from": "gpt", "value": ...}
        value = [value]
    if isinstance(value, list):
        messages = _message_list(value, where, field)
        if messages and messages[-1]["role"] == "assistant":
            return messages[-1]["content"]
    raise DataError(f"{where}: {field!r} must be a string or a message list ending with an assistant turn")


def _message_list(value: object, where: str, field: str) -> list[dict]:
    if not isinstance(value, list):
        raise DataError(f"{where}: {field!r} must be a list of messages, got {type(value).__name__}")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise DataError(f"{where}: {field}[{i}] must be an object with role and content")
        if "from" in message and "role" not in message:  # ShareGPT
            role = SHAREGPT_ROLES.get(str(message["from"]).lower())
            content = message.get("value")
            if role is None:
                raise DataError(f"{where}: {field}[{i}] has unknown speaker {message['from']!r}; expected one of "
                                f"{', '.join(SHAREGPT_ROLES)}")
        else:
            role, content = message.get("role"), message.get("content")
            if role not in ROLES:
                raise DataError(f"{where}: {field}[{i}] has unknown role {role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise DataError(f"{where}: {field}[{i}] needs string content, got {type(content).__name__}")
        messages.append({"role": role, "content": content})
    return messages


def _text(record: dict, field: str, where: str) -> str:
    value = record.get(field)
    if not isinstance(value, str):
        got = "nothing" if value is None else type(value).__name__
        raise DataError(f"{where}: field {field!r} must be a string, got {got}")
    return value


def _hh_turns(transcript: str, where: str) -> list[dict]:
    parts = _HH_TURN.split(transcript)
    if len(parts) < 3 or parts[0].strip():
        raise DataError(f"{where}: not an HH transcript; expected '\\n\\nHuman: ...\\n\\nAssistant: ...' turns")
    turns = [{"role": "user" if speaker == "Human" else "assistant", "content": text.strip()}
             for speaker, text in zip(parts[1::2], parts[2::2], strict=True)]
    if turns[-1]["role"] != "assistant":
        raise DataError(f"{where}: the transcript does not end with an assistant reply")
    return turns
