"""Generation: prefill + decode over a preallocated KV cache, sampling, stop handling and streaming.

The engine holds up to `max_batch` sequences at once, each in its own row ("slot") of the cache. A sequence's
prompt is prefilled when it is added, all but its last token (prompts that arrive together share one prefill pass,
`add_many`); then every `step()` feeds each live sequence its pending token in one batched forward pass and samples
its next one. Every forward is the model's own (`Transformer.hidden`) with the cache as an argument: each
attention layer writes its keys and values into the cache and attends over it (`model/attention.py`, `KVCache`).
Sequences of different lengths share a step: each row carries its own positions (for the rotary embedding and the
cache), and the cache's mask lets a query see only its own row's keys at positions <= its own (and within the
sliding window, if the model has one). Finished sequences leave at once and the last row moves into the freed slot,
so live rows stay contiguous and a step touches no dead rows. This is what lets the server batch requests
continuously. MoE blocks route whatever tokens the step has. A sequence whose next token cannot be chosen (NaN
logits, a grammar left with no allowed token) ends alone, with finish_reason "error"; the rest of the step goes on.

A sequence that asks for log-probabilities (`SamplingParams.logprobs`) gets, per generated token, the model's own:
the log-softmax of its logits before logit_bias, penalties, temperature, truncation or a grammar, as vLLM returns
them by default. They say how likely the model finds each token whatever the request's sampling settings, so answers
sampled differently compare, and they are exactly what a forward pass over prompt + answer gives. Sequences that do
not ask compute nothing for them.

On CUDA, `compile=True` compiles the decode step with static shapes (all slots, the whole cache length, masks doing
the rest) so it can be captured as a CUDA graph; on CPU the eager step, which only reads the cache up to the
longest live sequence, is the fast one.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from fermion.data.tokenizer import Tokenizer
from fermion.infer.sampling import MIN_TEMPERATURE, Completion, Constraint, SamplingParams, TokenLogprob
from fermion.model.attention import KVCache
from fermion.model.transformer import Transformer


class Sequence:
    """One prompt being generated: its slot, tokens, sampling state and the text handed out so far."""

    def __init__(self, prompt: list[int], params: SamplingParams, tokenizer: Tokenizer, stop_ids: set[int],
                 constraint: Constraint | None = None):
        self.prompt, self.params, self.constraint = list(prompt), params, constraint
        self.generated: list[int] = []
        self.pending = prompt[-1]  # the token the next step feeds
        self.position = len(prompt) - 1  # where `pending` goes in the cache
        self.stop_ids = stop_ids
        self.finish_reason: str | None = None
        self.stop_token: int | None = None  # the stop token that ended it (not in `generated`)
        self.error: Exception | None = None  # why sampling failed, when finish_reason is "error"
        self.generator = torch.Generator().manual_seed(params.seed if params.seed is not None
                                                       else random.SystemRandom().getrandbits(63))
        self.seen = torch.tensor(sorted(set(prompt)), dtype=torch.long)
        self.text = ""  # decoded text of `generated`, cut at a stop string when one matched
        self.logprobs: list[TokenLogprob] | None = [] if params.logprobs is not None else None
        self._emitted = 0
        self._logprobs_taken = 0
        self._decoder = IncrementalDecoder(tokenizer)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def accept(self, token: int, context_left: int, logprob: TokenLogprob | None = None) -> str:
        """Take a sampled token (and its log-probability, when asked for); return the new text that is safe to show
        (never half a character or a stop)."""
        if token in self.stop_ids:
            self.stop_token = token
            return self._finish("stop", flush=True)
        self.generated.append(token)
        if self.logprobs is not None:
            logprob.offset = len(self.text)
            self.logprobs.append(logprob)
        self.pending, self.position = token, self.position + 1
        if self.params.repetition_penalty != 1.0 and not (self.seen == token).any():
            self.seen = torch.cat([self.seen, torch.tensor([token])])
        self.text += self._decoder.push(token)
        stops = self.params.stop
        if stops:
            start = max(0, self._emitted - max(map(len, stops)))
            hits = [i for i in (self.text.find(s, start) for s in stops) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                return self._finish("stop", flush=False)
        if len(self.generated) >= self.params.max_new_tokens or context_left <= 0:
            return self._finish("length", flush=True)
        end = len(self.text) - held_back(self.text, stops)
        delta, self._emitted = self.text[self._emitted:end], max(self._emitted, end)
        return delta

    def fail(self, error: Exception) -> str:
        """End the sequence because choosing its next token failed; nothing more is shown."""
        self.finish_reason, self.error = "error", error
        return ""

    def _finish(self, reason: str, flush: bool) -> str:
        """End the sequence; hand out everything not yet shown (a held-back tail that never became a stop)."""
        self.finish_reason = reason
        if flush:
            self.text += self._decoder.flush()
        delta, self._emitted = self.text[self._emitted:], len(self.text)
        return delta

    def completion(self) -> Completion:
        return Completion(self.prompt, self.generated, self.text, self.finish_reason or "length", self.logprobs,
                          self.stop_token)

    def take_logprobs(self) -> list[TokenLogprob] | None:
        """The log-probabilities recorded since the last call (None when the sequence records none): a stream hands
        each out with the text it came with."""
        if self.logprobs is None:
            return None
        taken, self._logprobs_taken = self.logprobs[self._logprobs_taken:], len(self.logprobs)
        return taken


def token_logprob(logprobs: torch.Tensor, token: int, top: int) -> TokenLogprob:
    """A token's entry from a row of the model's log-probabilities."""
    values, ids = logprobs.topk(top) if top else (logprobs[:0], logprobs[:0])
    return TokenLogprob(token, float(logprobs[token]), list(zip(map(int, ids), map(float, values), strict=True)))


def _constrained(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Logits with every token the constraint does not allow at -inf."""
    keep = torch.zeros(logits.shape[-1], dtype=torch.bool)
    keep[: allowed.numel()] = allowed.to(torch.bool).cpu()[: logits.shape[-1]]
    if not keep.any():
        raise RuntimeError("the constraint allows no token at all; its grammar cannot be completed here")
    return logits.masked_fill(~keep, float("-inf"))


def held_back(text: str, stops: list[str]) -> int:
    """Length of the longest end of `text` that could still become a stop string."""
    for k in range(min(len(text), max(map(len, stops), default=1) - 1), 0, -1):
        if any(s.startswith(text[-k:]) for s in stops):
            return k
    return 0


class IncrementalDecoder:
    """Token ids in, text out, never splitting a multi-byte character across two pieces.

    Decoding a window of recent tokens twice (with and without the newest) and emitting the difference keeps the
    cost per token constant; text ending in U+FFFD means a character is still incomplete and is held back.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # start of the window re-decoded each time
        self.read = 0  # end of what has been emitted

    def push(self, token: int) -> str:
        self.ids.append(token)
        before = self.tokenizer.decode(self.ids[self.prefix:self.read])
        after = self.tokenizer.decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before):]
        return ""

    def flush(self) -> str:
        before = self.tokenizer.decode(self.ids[self.prefix:self.read])
        after = self.tokenizer.decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return after[len(before):]


def sample(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor, generator: torch.Generator,
           generated: list[int] | None = None) -> int:
    """One token from a row of logits: logit bias, repetition penalty, presence and frequency penalties (over
    `generated`), temperature, top-k, top-p, min-p (in that order; the bias first, as OpenAI applies it)."""
    logits = logits.float()
    if params.logit_bias:
        logits[list(params.logit_bias)] += torch.tensor(list(params.logit_bias.values()))
    if params.repetition_penalty != 1.0 and seen.numel():
        picked = logits[seen]
        logits[seen] = torch.where(picked > 0, picked / params.repetition_penalty, picked * params.repetition_penalty)
    if generated and (params.presence_penalty or params.frequency_penalty):
        ids = torch.tensor(generated, dtype=torch.long)
        logits.index_add_(0, ids, torch.full((len(ids),), -params.frequency_penalty))  # once per occurrence
        logits[ids.unique()] -= params.presence_penalty
    if params.temperature == 0:
        return int(logits.argmax())
    logits = logits / max(params.temperature, MIN_TEMPERATURE)
    if params.top_k and params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # Keep the smallest set whose mass reaches top_p: drop a token when the mass before it already does. The
        # most likely token always stays (a top_p below float32's smallest number would otherwise drop them all).
        drop = (sorted_probs.cumsum(-1) - sorted_probs) >= params.top_p
        drop[0] = False
        probs = probs.scatter(0, order, sorted_probs.masked_fill(drop, 0.0))
    if params.min_p > 0:
        probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)
    return int(torch.multinomial(probs, 1, generator=generator))


class Engine:
    def __init__(self, model: Transformer, tokenizer: Tokenizer, *, max_batch: int = 8, max_seq: int | None = None,
                 compile: bool = False):
        self.model, self.tokenizer = model.eval(), tokenizer
        cfg = model.cfg
        self.cfg = cfg
        self.max_batch = max_batch
        self.max_seq = min(max_seq or cfg.context_length, cfg.context_length)
        self.device = model.tok_emb.weight.device
        self.cache = KVCache(cfg, max_batch, self.max_seq, dtype=model.tok_emb.weight.dtype, device=self.device)
        self.active: list[Sequence] = []
        self.last: Completion | None = None  # the most recent sequence `stream` finished
        self.compiled = compile and self.device.type == "cuda"
        self._decode = torch.compile(self._forward, mode="reduce-overhead", dynamic=False) if self.compiled \
            else self._forward

    # ---------------------------------------------------------------------------------------------- the model

    @torch.no_grad()
    def _forward(self, tokens: torch.Tensor, positions: torch.Tensor, first_row: int, kv_len: int) -> torch.Tensor:
        """tokens/positions [n, T] for cache rows first_row.. first_row+n-1 -> logits of the last position [n, V]."""
        x, _ = self.model.hidden(tokens, positions, kv_cache=self.cache.select(first_row, kv_len))
        return self.model.logits(x[:, -1])

    # -------------------------------------------------------------------------------------------- sequences

    def stop_ids(self, params: SamplingParams) -> set[int]:
        return set(params.stop_token_ids) | (set() if params.ignore_eos else {self.tokenizer.eos_id})

    def add(self, prompt: list[int], params: SamplingParams, constraint: Constraint | None = None) -> Sequence:
        """Start a sequence: prefill its prompt into a free slot. Raises ValueError when it cannot fit."""
        return self.add_many([prompt], [params], [constraint])[0]

    def add_many(self, prompts: list[list[int]], params: list[SamplingParams],
                 constraints: list[Constraint | None] | None = None) -> list[Sequence]:
        """Start several sequences with one batched prefill (the server's burst of arrivals). Each prompt is
        checked first; if any cannot fit, none is added."""
        if len(self.active) + len(prompts) > self.max_batch:
            raise RuntimeError(f"{len(prompts)} sequences do not fit: {len(self.active)} of {self.max_batch} slots "
                               "are busy")
        for prompt in prompts:
            if not prompt:
                raise ValueError("the prompt is empty; it needs at least one token")
            if len(prompt) >= self.max_seq:
                raise ValueError(f"the prompt has {len(prompt)} tokens; the context holds {self.max_seq}, "
                                 f"so at most {self.max_seq - 1} leave room to generate")
            bad = [t for t in prompt if not 0 <= t < self.cfg.vocab_size]
            if bad:
                raise ValueError(f"token id {bad[0]} is outside the vocabulary (0..{self.cfg.vocab_size - 1})")
        for p in params:
            bad = [t for t in p.logit_bias if t >= self.cfg.vocab_size]
            if bad:
                raise ValueError(f"logit_bias: token id {bad[0]} is outside the vocabulary "
                                 f"(0..{self.cfg.vocab_size - 1})")
        constraints = constraints or [None] * len(prompts)
        sequences = [Sequence(prompt, p, self.tokenizer, self.stop_ids(p), c)
                     for prompt, p, c in zip(prompts, params, constraints, strict=True)]
        self._prefill(len(self.active), [prompt[:-1] for prompt in prompts])
        self.active.extend(sequences)
        return sequences

    def _prefill(self, first_slot: int, rows: list[list[int]]) -> None:
        """Write the keys and values of each row's tokens into consecutive slots, in one forward pass.

        Shorter rows are padded at the end; their pad positions continue past the row's last token, so what the
        pads write into the cache lies beyond the sequence's position, where the mask hides it until a decode step
        overwrites it.
        """
        longest = max(map(len, rows))
        if longest == 0:
            return
        pad = self.tokenizer.eos_id
        tokens = torch.tensor([row + [pad] * (longest - len(row)) for row in rows], device=self.device)
        positions = torch.arange(longest, device=self.device)[None].expand(len(rows), longest)
        self._forward(tokens, positions, first_slot, longest)

    def step(self) -> list[tuple[Sequence, str]]:
        """One token for every live sequence; returns (sequence, new text) pairs. Finished sequences leave."""
        if not self.active:
            return []
        n = len(self.active)
        tokens = torch.tensor([[s.pending] for s in self.active], device=self.device)
        positions = torch.tensor([[s.position] for s in self.active], device=self.device)
        if self.compiled:
            tokens = F.pad(tokens, (0, 0, 0, self.max_batch - n))
            positions = F.pad(positions, (0, 0, 0, self.max_batch - n))
            logits = self._decode(tokens, positions, 0, self.max_seq)[:n].clone()
        else:
            logits = self._forward(tokens, positions, 0, int(positions.max()) + 1)
        logits = logits.float().cpu()
        events = []
        for seq, row in zip(self.active, logits, strict=True):
            try:
                events.append((seq, self._next(seq, row)))
            except Exception as err:  # noqa: BLE001 - one sequence's failure (NaN, a dead-end grammar) ends it alone
                events.append((seq, seq.fail(err)))
        for seq in [s for s in self.active if s.finished]:
            self.release(seq)
        return events

    def _next(self, seq: Sequence, row: torch.Tensor) -> str:
        """Choose a sequence's next token from its row of logits and take it; the new text to show."""
        # Only for the sequences that ask, and from the row as the model gave it (sampling changes it in place).
        logprobs = row.log_softmax(-1) if seq.logprobs is not None else None
        if seq.constraint is not None:
            row = _constrained(row, seq.constraint.allowed())
        token = sample(row, seq.params, seq.seen, seq.generator, seq.generated)
        if seq.constraint is not None:
            seq.constraint.accept(token)
        scored = token_logprob(logprobs, token, seq.params.logprobs) if logprobs is not None else None
        return seq.accept(token, self.max_seq - 1 - seq.position, scored)

    def release(self, seq: Sequence) -> None:
        """Free a sequence's slot (finished or abandoned): the last row moves into it."""
        slot = self.active.index(seq)
        last = len(self.active) - 1
        if slot != last:
            self.cache.move(last, slot)
            self.active[slot] = self.active[last]
        self.active.pop()
        if seq.finish_reason is None:
            seq.finish_reason = "abort"

    # ------------------------------------------------------------------------------------------ conveniences

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
                 constraints: list[Constraint | None] | None = None) -> list[Completion]:
        """Generate for every prompt, up to `max_batch` at a time; results in prompt order."""
        all_params = params if isinstance(params, list) else [params] * len(prompts)
        all_constraints = constraints if constraints is not None else [None] * len(prompts)
        waiting = list(enumerate(zip(prompts, all_params, all_constraints, strict=True)))
        results: dict[int, Completion] = {}
        index_of: dict[int, int] = {}
        while waiting or self.active:
            joining, waiting = waiting[:self.max_batch - len(self.active)], waiting[self.max_batch - len(self.active):]
            if joining:
                added = self.add_many(*map(list, zip(*(job for _, job in joining), strict=True)))
                index_of.update((id(seq), i) for seq, (i, _) in zip(added, joining, strict=True))
            for seq, _ in self.step():
                if seq.error is not None:
                    for other in [s for s in self.active if id(s) in index_of]:
                        self.release(other)
                    raise RuntimeError(f"generation failed: {seq.error}") from seq.error
                if seq.finished:
                    results[index_of.pop(id(seq))] = seq.completion()
        return [results[i] for i in range(len(prompts))]

    def stream(self, prompt: list[int], params: SamplingParams) -> Iterator[str]:
        """Text deltas of one sequence as they are generated; their concatenation is the whole text."""
        seq = self.add(prompt, params)
        try:
            while not seq.finished:
                for other, delta in self.step():
                    if other is seq and delta:
                        yield delta
            if seq.error is not None:
                raise RuntimeError(f"generation failed: {seq.error}") from seq.error
        finally:
            if not seq.finished:
                self.release(seq)
            self.last = seq.completion()

    def complete(self, text: str, params: SamplingParams) -> Completion:
        return self.generate([self.tokenizer.encode(text)], params)[0]


# ------------------------------------------------------------------------------------------------------ loading


class DecodeLinear(nn.Module):
    """y = x @ w_t with the weight stored transposed, [in, out].

    Decoding multiplies one row by every weight matrix, which on CPU is bound by how fast the weights stream from
    memory. For fp32, PyTorch's CPU matmul streams this layout about 1.4x faster than nn.Linear's [out, in]
    (measured on a 2-core AVX-512 machine: 27 vs 19.5 GB/s on a 64 MB matrix; a 30M model's step 8.6 -> 5.8 ms).
    For bf16 it is slower, so it is used for fp32 only.
    """

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.register_buffer("w_t", weight.detach().t().contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.w_t


def prepare_for_decode(model: Transformer) -> Transformer:
    """Put a float model's matmul weights in the layout the device decodes fastest, in place (inference only)."""
    weight = model.tok_emb.weight
    if weight.device.type != "cpu" or weight.dtype != torch.float32:
        return model
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear and child.bias is None and name != "router":
                setattr(module, name, DecodeLinear(child.weight))
    if model.lm_head is None:  # tied: the embedding table stays as it is for lookups; the head gets its own copy
        model.lm_head = DecodeLinear(weight)
    return model
