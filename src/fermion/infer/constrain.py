"""Grammar-constrained decoding: a JSON schema becomes a grammar over the tokenizer's tokens, and each sequence's
`Constraint` (see engine.py) allows only the tokens that keep its text a prefix of some valid JSON document.

The work is done by llguidance (the grammar engine of Microsoft's guidance, also used by llama.cpp and vLLM): it
reads our tokenizer's JSON directly and accepts any tokenization of the text, not only the canonical BPE one. JSON
is generated on one line, spaced as `json.dumps` writes it (`{"a": 1, "b": [2, 3]}`, no other whitespace) with
properties in the schema's order, the form tinytask's SFT data writes it in; when the document is complete the only
token allowed is EOS, so the sequence stops there.

A `JsonSchemaGrammar` compiles the schema once and hands out a fresh constraint per sequence (a copy of a matcher
at the start of the grammar). llguidance's view of the tokenizer, which its documentation calls the expensive part
(about a second for large vocabularies), is built once per tokenizer and shared by every grammar.
"""

from __future__ import annotations

from types import ModuleType

import torch

from fermion.data.tokenizer import Tokenizer

INSTALL_HINT = "constrained decoding needs llguidance: pip install 'fermion[eval]'"
SEPARATORS = (", ", ": ")  # json.dumps's: a number after ": " is the same token as in running text
# No whitespace beyond the separators, so the longest output is bounded by the schema's values alone.
COMPILE_OPTIONS = {"whitespace_flexible": False, "item_separator": SEPARATORS[0], "key_separator": SEPARATORS[1]}

_ll_tokenizers: dict[tuple[str, int], object] = {}  # (tokenizer hash, eos id) -> llguidance.LLTokenizer


def _llguidance() -> ModuleType:
    try:
        import llguidance
    except ImportError:
        raise ImportError(INSTALL_HINT) from None
    return llguidance


def ll_tokenizer(tokenizer: Tokenizer):
    """llguidance's view of a tokenizer (every token's bytes, which are special, EOS), built once per tokenizer."""
    key = (tokenizer.hash, tokenizer.eos_id)
    if key not in _ll_tokenizers:
        _ll_tokenizers[key] = _llguidance().LLTokenizer(tokenizer.inner.to_str(), eos_token=tokenizer.eos_id)
    return _ll_tokenizers[key]


class GrammarConstraint:
    """One sequence's place in a grammar: which tokens may come next, and the tokens taken so far."""

    def __init__(self, matcher):
        self.matcher = matcher

    def allowed(self) -> torch.Tensor:
        bias = self.matcher.compute_logit_bias()  # one byte per token: 0 (forbidden) or 200 (allowed)
        return torch.frombuffer(bytearray(bias), dtype=torch.uint8) > 0

    def accept(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise RuntimeError(f"token {token} does not fit the grammar: {self.matcher.get_error()}")


class JsonSchemaGrammar:
    """A JSON schema compiled for a tokenizer; `constraint()` gives each sequence its own."""

    def __init__(self, tokenizer: Tokenizer, schema: dict):
        llguidance = _llguidance()
        lexicon = ll_tokenizer(tokenizer)
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=COMPILE_OPTIONS)
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, lexicon)
        if is_error:
            raise ValueError(f"the JSON schema cannot be used for constrained decoding: {messages[0]}")
        self._start = llguidance.LLMatcher(lexicon, grammar)

    def constraint(self) -> GrammarConstraint:
        return GrammarConstraint(self._start.deep_copy())


def json_schema_constraint(tokenizer: Tokenizer, schema: dict) -> GrammarConstraint:
    """A constraint for one sequence; for many sequences under one schema, build a JsonSchemaGrammar once."""
    return JsonSchemaGrammar(tokenizer, schema).constraint()
