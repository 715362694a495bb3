"""The model under evaluation (`EvalModel`): log-likelihoods of continuations and of text, and generation, plain or
through a chat template. The benchmarks in eval/ call only these methods, so they import no model code.

Scoring follows lm-evaluation-harness's conventions exactly, so that accuracies agree with it on the same examples:
a context's trailing whitespace moves to the front of the continuation; the continuation's tokens are those of
`encode(context + continuation)` after the first `len(encode(context))` (so BPE merges across the seam are what
the model would have seen); an empty context is replaced by the BOS token; inputs longer than the context window
keep their last tokens. Requests run longest first in batches bounded by a token budget, and logits are computed
only at the continuation's positions.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from fermion import checkpoint
from fermion.chat.templates import ChatTemplate
from fermion.config import Recipe
from fermion.data.tokenizer import Tokenizer
from fermion.infer.engine import Engine
from fermion.infer.sampling import Completion, Constraint, Prompt, SamplingParams
from fermion.model.transformer import Transformer


@dataclass
class LogLikelihood:
    logprob: float  # sum over the continuation's tokens
    greedy: bool  # every continuation token is the model's argmax
    tokens: int  # continuation tokens
    chars: int  # continuation characters (for per-byte normalisation)
    cut: bool = False  # the continuation alone was longer than the window: only its last tokens were scored


class EvalModel:
    def __init__(self, model: Transformer, tokenizer: Tokenizer, *, template: ChatTemplate | None = None,
                 chat: bool = False, name: str = "model", max_batch: int = 16, batch_tokens: int = 8192,
                 recipe: Recipe | None = None):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.recipe = recipe or Recipe(model=model.cfg)  # eval defaults and the template come from it
        self.template = template or ChatTemplate.get("chatml")
        self.chat = chat  # generative tasks prompt through the template (a post-trained model)
        self.name = name
        self.max_length = model.cfg.context_length
        self.batch_tokens = batch_tokens
        self.device = model.tok_emb.weight.device
        self._max_batch = max_batch
        self._engine: Engine | None = None
        self.cut_prompts = 0  # prompts prompt_ids cut to leave room to generate (eval/runner.py reports them)

    @property
    def engine(self) -> Engine:
        if self._engine is None:  # the KV cache is allocated only when something is generated
            self._engine = Engine(self.model, self.tokenizer, max_batch=self._max_batch)
        return self._engine

    # ----------------------------------------------------------------------------------------------- scoring

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        if not context:
            return [self.tokenizer.bos_id], self.tokenizer.encode(continuation)
        whole = self.tokenizer.encode(context + continuation)
        n_context = len(self.tokenizer.encode(context))
        return whole[:n_context], whole[n_context:]

    @torch.no_grad()
    def loglikelihood(self, requests: list[tuple[str, str]]) -> list[LogLikelihood]:
        """log P(continuation | context) for each (context, continuation), in request order.

        Requests with the same context share one row: the context once, then each continuation's tokens (all but
        its last, which is only predicted), each continuation attending to the context and to itself and placed
        at the positions it would have alone. The choices of a multiple-choice question cost one context instead
        of one per choice; single-token choices (MMLU's " A".." D") add nothing to the row at all.
        """
        groups: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}
        cut = [False] * len(requests)
        for i, (context, continuation) in enumerate(requests):
            full_ctx, full_cont = self.encode_pair(context, continuation)
            ctx, cont = self._fit(full_ctx, full_cont)
            groups.setdefault(tuple(ctx), []).append((i, cont))
            cut[i] = len(cont) < len(full_cont)
        rows = sorted(groups.items(), key=lambda g: -_row_length(g[0], g[1]))
        results: list[LogLikelihood | None] = [None] * len(requests)
        start = 0
        while start < len(rows):
            longest = _row_length(*rows[start])
            size = max(1, min(self._max_batch * 4, self.batch_tokens // longest))
            for i, cont, (logprob, greedy) in self._score(rows[start:start + size]):
                results[i] = LogLikelihood(logprob, greedy, len(cont), len(requests[i][1]), cut[i])
            start += size
        return results  # type: ignore[return-value]

    def _fit(self, context: list[int], continuation: list[int]) -> tuple[list[int], list[int]]:
        """Keep the last max_length + 1 tokens of context + continuation, as lm-eval does."""
        if not continuation:
            raise ValueError("a continuation to score is empty")
        whole = (context + continuation)[-(self.max_length + 1):]
        continuation = continuation[-(len(whole) - 1):]  # one longer than the window: its last tokens
        return whole[:len(whole) - len(continuation)], continuation

    def _score(self, rows) -> list[tuple[int, list[int], tuple[float, bool]]]:
        """One padded batch of shared-context rows -> (request index, continuation, (logprob, greedy))."""
        width = max(_row_length(ctx, conts) for ctx, conts in rows)
        idx = torch.full((len(rows), width), self.tokenizer.pad_id, dtype=torch.long)
        positions = torch.zeros((len(rows), width), dtype=torch.long)
        segment = torch.full((len(rows), width), -1, dtype=torch.long)  # 0: context, k: continuation k, -1: pad
        reads = []  # (row, request index, continuation, the row indices whose outputs predict its tokens)
        for r, (ctx, conts) in enumerate(rows):
            n = len(ctx)
            idx[r, :n], positions[r, :n], segment[r, :n] = torch.tensor(ctx), torch.arange(n), 0
            at = n
            for k, (i, cont) in enumerate(conts, 1):
                body = cont[:-1]
                idx[r, at:at + len(body)] = torch.tensor(body, dtype=torch.long)
                positions[r, at:at + len(body)] = torch.arange(n, n + len(body))
                segment[r, at:at + len(body)] = k
                reads.append((r, i, cont, [n - 1, *range(at, at + len(body))]))
                at += len(body)
            positions[r, at:] = torch.arange(width - at) % self.max_length
        keys, queries = segment[:, None, :], segment[:, :, None]
        order = torch.arange(width)
        mask = (order[None, :] <= order[:, None]) & ((keys == 0) | (keys == queries))
        if self.model.cfg.sliding_window is not None:
            mask &= positions[:, None, :] > positions[:, :, None] - self.model.cfg.sliding_window
        hidden, _ = self.model.hidden(idx.to(self.device), positions.to(self.device),
                                      mask=mask[:, None].to(self.device))
        # All scored positions through the output layer at once: one matmul and one softmax for the batch.
        rows_at = torch.tensor([r for r, _, _, at in reads for _ in at])
        cols_at = torch.tensor([c for _, _, _, at in reads for c in at])
        targets = torch.tensor([t for _, _, cont, _ in reads for t in cont])
        logprobs = F.log_softmax(self.model.logits(hidden[rows_at, cols_at]).float(), dim=-1).cpu()
        picked = logprobs.gather(-1, targets[:, None]).squeeze(-1)
        hits = logprobs.argmax(-1) == targets
        out, first = [], 0
        for _, i, cont, _ in reads:
            last = first + len(cont)
            out.append((i, cont, (float(picked[first:last].sum()), bool(hits[first:last].all()))))
            first = last
        return out

    @torch.no_grad()
    def token_nll(self, ids: list[int], first: int) -> float:
        """The summed negative log-likelihood (nats) of ids[first:], each predicted from the ids before it (one
        forward over ids[:-1], at most the context length; `first` >= 1)."""
        chunk = torch.tensor(ids, device=self.device)[None]
        hidden, _ = self.model.hidden(chunk[:, :-1])
        logits = self.model.logits(hidden[0, first - 1:]).float()
        return float(F.cross_entropy(logits, chunk[0, first:], reduction="sum"))

    # -------------------------------------------------------------------------------------------- generation

    def prompt_ids(self, prompt: Prompt, room: int) -> list[int]:
        """Token ids of a prompt (chat messages through the template), keeping its last tokens when it would
        leave fewer than `room` positions to generate into."""
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        else:
            ids = self.template.encode(self.tokenizer, prompt, add_generation_prompt=True).ids
        keep = max(1, self.max_length - room)
        self.cut_prompts += len(ids) > keep
        return ids[-keep:]

    def as_chat(self, text: str, system: str | None = None) -> Prompt:
        """A task's prompt text as it should reach this model: a user turn for chat models, plain text otherwise."""
        if not self.chat:
            return text
        return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]

    def stop_strings(self) -> list[str]:
        return self.template.stop_strings if self.chat else []

    def generate(self, prompts: list[Prompt], params: SamplingParams | list[SamplingParams],
                 constraints: list[Constraint | None] | None = None) -> list[Completion]:
        """Greedy or sampled completions in prompt order; chat models also stop at their template's end of turn.
        One SamplingParams for all prompts, or one each (different seeds, say)."""
        each = params if isinstance(params, list) else [params] * len(prompts)
        each = [replace(p, stop=list(dict.fromkeys([*p.stop, *self.stop_strings()]))) for p in each]
        ids = [self.prompt_ids(prompt, p.max_new_tokens) for prompt, p in zip(prompts, each, strict=True)]
        return self.engine.generate(ids, each, constraints)


def _row_length(context, continuations) -> int:
    return len(context) + sum(len(cont) - 1 for _, cont in continuations)


def load(path: str | Path, *, device: str = "cpu", dtype: str = "fp32", chat: bool | None = None,
         template: str | None = None, max_batch: int = 16, quant: str = "none", say=None) -> EvalModel:
    """A run, checkpoint or Hugging Face folder as an EvalModel, quantized if asked (`say` hears the quantization
    report). chat=None: chat prompting when the checkpoint comes from a post-training stage (SFT or DPO), as the
    checkpoint records (see checkpoint.stage_by_name for those that record none)."""
    from fermion.device import resolve_dtype
    from fermion.infer.engine import prepare_for_decode
    from fermion.infer.quantize import quantize

    torch_dtype = resolve_dtype(dtype, torch.device(device))
    loaded = checkpoint.load(path, device=device, dtype=torch_dtype, warn=lambda *_: None)
    quantize(loaded.model, quant, say=say)
    chat = loaded.post_trained if chat is None else chat
    return EvalModel(prepare_for_decode(loaded.model), loaded.tokenizer, template=loaded.chat_template(template),
                     chat=chat,
                     name=str(path), max_batch=max_batch, recipe=loaded.recipe)
