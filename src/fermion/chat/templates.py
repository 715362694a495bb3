"""Chat templates: a conversation -> text -> token ids plus a per-token loss mask.

Every template is a Jinja string in the dialect Hugging Face uses for `chat_template` (same environment settings,
`raise_exception`, and `{% generation %}` blocks around the text the assistant writes). Fermion renders it with
jinja2 exactly as transformers does, so the template that SFT trains on is byte for byte the one `export` writes into
tokenizer_config.json, and `apply_chat_template` of the exported tokenizer gives the same ids.

The loss mask comes from the `{% generation %}` blocks: a token carries loss when any of its characters lies inside
one (as in transformers' `return_assistant_tokens_mask`). Each built-in template puts the assistant's content *and*
its end-of-turn marker inside the block, so the model learns to stop. Token ids come from tokenizing the whole
rendered text once, never piece by piece, so BPE merges at the seams cannot make training and inference disagree.

Messages are dicts with `role` (system, user, assistant) and `content`. A user message may carry `input`, the
Alpaca "input" field: the alpaca template gives it its own section, the others append it to the content.

Tools (a list of OpenAI function tools) reach a template that reads the `tools` variable as transformers passes them,
with the conversation's tool turns as they are (role "tool", an assistant's `tool_calls`); a template that does not
read it, every built-in one included, gets them folded into plain messages in tinytask's format (chat/tools.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import jinja2
from jinja2 import meta, nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from fermion.chat.tools import fold
from fermion.data.tokenizer import BOS, EOS, Tokenizer

ROLES = ("system", "user", "assistant")
# A special-token marker a template writes literally, like chatml's <|im_start|>: it must be one token of the
# vocabulary, or it renders as pieces and no single token ends a turn.
_MARKER = re.compile(r"<\|[^|<>\s]+\|>")
_OPEN, _CLOSE = "\ue000", "\ue001"  # private-use markers around generation blocks while rendering

# The role check every template starts with: an unknown role is an error, not silently dropped text.
_CHECK = (
    "{% for m in messages %}{% if m['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('message ' ~ loop.index0 ~ ' has role ' ~ m['role'] ~ "
    "'; expected system, user or assistant') }}"
    "{% endif %}{% endfor %}"
)
_USER_TEXT = "{{ m['content'] }}{% if m.get('input') %}{{ '\n\n' + m['input'] }}{% endif %}"

CHATML = _CHECK + (
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ m['content'] }}{{ '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% elif m['role'] == 'user' %}"
    "{{ '<|im_start|>user\n' }}" + _USER_TEXT + "{{ '<|im_end|>\n' }}"
    "{% else %}"
    "{{ '<|im_start|>system\n' }}{{ m['content'] }}{{ '<|im_end|>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

ALPACA_PLAIN = ("Below is an instruction that describes a task. "
                 "Write a response that appropriately completes the request.")
ALPACA_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further context. "
                 "Write a response that appropriately completes the request.")
ALPACA = _CHECK + (
    "{% set first_user = messages | selectattr('role', 'equalto', 'user') | first %}"
    "{% if messages and messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}"
    "{% elif first_user is defined and first_user.get('input') %}{{ '" + ALPACA_INPUT + "' }}"
    "{% else %}{{ '" + ALPACA_PLAIN + "' }}{% endif %}{{ '\n\n' }}"
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}"
    "{{ '### Instruction:\n' }}{{ m['content'] }}{{ '\n\n' }}"
    "{% if m.get('input') %}{{ '### Input:\n' }}{{ m['input'] }}{{ '\n\n' }}{% endif %}"
    "{% elif m['role'] == 'assistant' %}"
    "{{ '### Response:\n' }}{% generation %}{{ m['content'] }}{{ eos_token }}{% endgeneration %}{{ '\n\n' }}"
    "{% elif not loop.first %}"
    "{{ raise_exception('the alpaca template takes a system message only as the first message') }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
)

TAGGED = _CHECK + (
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}"
    "{{ '<assistant>' }}{% generation %}{{ m['content'] }}{{ '</assistant>' }}{% endgeneration %}{{ '\n' }}"
    "{% elif m['role'] == 'user' %}"
    "{{ '<user>' }}" + _USER_TEXT + "{{ '</user>\n' }}"
    "{% else %}"
    "{{ '<system>' }}{{ m['content'] }}{{ '</system>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<assistant>' }}{% endif %}"
)

# The neo-3 model card's format: each tag on its own line, the text between them. A reply is trimmed when rendered:
# generation stops at </assistant> and keeps the newline before it, so a conversation re-rendered with that reply
# is the text the model wrote.
TAGGED_LINES = _CHECK + (
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}"
    "{{ '<assistant>\n' }}{% generation %}{{ m['content'] | trim }}{{ '\n</assistant>' }}{% endgeneration %}"
    "{{ '\n' }}"
    "{% elif m['role'] == 'user' %}"
    "{{ '<user>\n' }}" + _USER_TEXT + "{{ '\n</user>\n' }}"
    "{% else %}"
    "{{ '<system>\n' }}{{ m['content'] }}{{ '\n</system>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<assistant>\n' }}{% endif %}"
)

BUILTIN = {"chatml": CHATML, "alpaca": ALPACA, "tagged": TAGGED, "tagged-lines": TAGGED_LINES}
# What ends an assistant turn when generating, per template (the eos token always does).
STOP_STRINGS = {"chatml": ["<|im_end|>"], "alpaca": [], "tagged": ["</assistant>"], "tagged-lines": ["</assistant>"]}


class TemplateError(ValueError):
    """A conversation the template cannot render, or a template that does not compile."""


@dataclass(frozen=True)
class Encoded:
    ids: list[int]
    mask: list[bool]  # True where the token carries loss (assistant text and its end-of-turn marker)
    text: str


class _Generation(Extension):
    """`{% generation %}...{% endgeneration %}`, the block transformers uses for assistant masks."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_mark"), [], [], body).set_lineno(lineno)

    def _mark(self, caller):
        return _OPEN + caller() + _CLOSE


def _raise(message: str):
    raise jinja2.exceptions.TemplateError(message)


@lru_cache(maxsize=32)
def _compile(source: str) -> tuple[jinja2.Template, bool]:
    """The template, and whether it reads the `tools` variable."""
    # The same settings transformers renders chat templates with, so the two agree on whitespace.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, loopcontrols])
    env.globals["raise_exception"] = _raise
    try:
        return env.from_string(source), "tools" in meta.find_undeclared_variables(env.parse(source))
    except jinja2.TemplateSyntaxError as err:
        raise TemplateError(f"chat template does not compile: {err.message} (template line {err.lineno})") from None


class ChatTemplate:
    def __init__(self, name: str, source: str, stop_strings: list[str] | None = None):
        self.name, self.source = name, source
        self.stop_strings = list(stop_strings or [])
        self._template, self.reads_tools = _compile(source)

    @classmethod
    def get(cls, spec: str | None) -> ChatTemplate:
        """A built-in name (chatml, alpaca, tagged, tagged-lines), a path to a .jinja file, or a Jinja string; None
        is chatml."""
        spec = spec or "chatml"
        if spec in BUILTIN:
            return cls(spec, BUILTIN[spec], STOP_STRINGS[spec])
        if "{" not in spec:
            path = Path(spec)
            if not path.is_file():
                raise TemplateError(f"chat template {spec!r} is neither one of {', '.join(BUILTIN)} nor a file")
            return cls(path.stem, path.read_text(encoding="utf-8"))
        return cls("custom", spec)

    def missing_tokens(self, tokenizer: Tokenizer) -> list[str]:
        """The special-token markers (<|...|>) the template writes that the tokenizer's vocabulary lacks."""
        markers = set(_MARKER.findall(self.source))
        return sorted(marker for marker in markers if tokenizer.inner.token_to_id(marker) is None)

    def special_tokens(self, tokenizer: Tokenizer) -> list[str]:
        """The tokenizer's special tokens this template writes: those in its text, and bos/eos where it renders the
        bos_token/eos_token variables (alpaca ends a reply with eos)."""
        added = [t.content for _, t in sorted(tokenizer.inner.get_added_tokens_decoder().items()) if t.special]
        written = {token for token in added if token in self.source}
        written |= {token for name, token in (("bos_token", tokenizer.bos_token), ("eos_token", tokenizer.eos_token))
                    if name in self.source and token in added}
        return [token for token in added if token in written]

    def require_tokens(self, tokenizer: Tokenizer, where: str = "tokenizer.chat_template") -> None:
        """Refuse a template whose markers the vocabulary lacks, naming them and what would work instead."""
        missing = self.missing_tokens(tokenizer)
        if missing:
            raise TemplateError(
                f"{where}: the {self.name} template writes {', '.join(missing)}, which the tokenizer's vocabulary "
                "lacks: they would be split into pieces and no single token would end a turn; use alpaca or tagged "
                "(no special tokens needed), the tokenizer's own template, or a tokenizer that has them")

    def render_spans(self, messages: list[dict], tokenizer: Tokenizer | None = None,
                     add_generation_prompt: bool = False,
                     tools: list[dict] | None = None) -> tuple[str, list[tuple[int, int]]]:
        """The rendered text and the character spans of its generation blocks."""
        if not self.reads_tools:
            messages, tools = fold(messages, tools), None
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("content"), str):
                raise TemplateError(f"message {i} must be an object with a string 'content'")
            if _OPEN in message["content"] or _CLOSE in message["content"]:
                raise TemplateError(f"message {i} contains the reserved characters U+E000/U+E001")
        specials = {"bos_token": BOS, "eos_token": EOS}
        if tokenizer is not None:
            specials = {"bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token}
        try:
            marked = self._template.render(messages=messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                           **specials)
        except jinja2.TemplateError as err:
            raise TemplateError(f"{self.name} template: {err}") from None
        text, spans, position, start = [], [], 0, 0
        for part in re.split(f"([{_OPEN}{_CLOSE}])", marked):
            if part == _OPEN:
                start = position
            elif part == _CLOSE:
                spans.append((start, position))
            else:
                text.append(part)
                position += len(part)
        return "".join(text), spans

    def render(self, messages: list[dict], tokenizer: Tokenizer | None = None,
               add_generation_prompt: bool = False, tools: list[dict] | None = None) -> str:
        return self.render_spans(messages, tokenizer, add_generation_prompt, tools)[0]

    def encode(self, tokenizer: Tokenizer, messages: list[dict], add_generation_prompt: bool = False,
               tools: list[dict] | None = None) -> Encoded:
        text, spans = self.render_spans(messages, tokenizer, add_generation_prompt, tools)
        encoding = tokenizer.inner.encode(text, add_special_tokens=False)
        # A token carries loss when any of its characters is inside a block, as transformers' assistant masks
        # count it: a token that merges template text with the reply's first characters is the reply's.
        mask = [any(first < end and last > start for start, end in spans) for first, last in encoding.offsets]
        return Encoded(encoding.ids, mask, text)


def default_template(tokenizer: Tokenizer) -> str:
    """The template a run takes when its recipe names none: the one its tokenizer came with (tokenizer_config.json's
    chat_template, which transformers uses too); else chatml when the vocabulary has chatml's markers; else alpaca,
    which needs no special token but eos."""
    if tokenizer.chat_template:
        return tokenizer.chat_template
    return "chatml" if not ChatTemplate.get("chatml").missing_tokens(tokenizer) else "alpaca"
