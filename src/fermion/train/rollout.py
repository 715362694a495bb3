"""RL's data: prompts with their answers, rollouts sampled from the policy by the inference engine (tools called on
the way), rewards from the verifiers, group-normalised advantages, and the loader that hands them to the trainer.

A rollout is one conversation the policy continues: the prompt rendered by the chat template, then the model's
turn, sampled by `infer.engine.Engine` (the engine of `fermion generate`, on the policy's own current weights).
When tools are offered and the turn is nothing but calls of them (chat/tools.parse_calls, the project's one
tool-call format), each registered tool runs (chat/toolbox.py), its result is appended as a `tool` message, and the
template's text from the end of the model's turn to the next assistant prompt is tokenized and appended; then the
model takes its next turn, up to `max_turns`. The model's tokens are kept exactly as sampled (with the stop token
that ended each turn), so the log-probabilities trained are those of what was sampled; only they carry loss: the
prompt, the template's markers and the tools' results are context.

Advantages (GRPO, Shao et al. 2024, as TRL computes them): a completion's reward minus the mean of its group (the
`group_size` completions of the same prompt), divided by the group's standard deviation (Bessel-corrected) + 1e-4.
A group whose rewards are all equal gets advantage 0 everywhere: it carries no signal and so no gradient, though
its tokens still count in the dapo normaliser (as in TRL); the logged `zero_std_groups` says how many there were.

Exact resume. Sampling is seeded per sequence from (run.seed, rollout number, prompt position in the batch, sample,
turn), so the rollout RNG's whole state is the rollout counter, which with the prompt position (rollout x
prompts_per_step, in a seeded order per epoch) is the loader's state. A rollout batch serves `iterations`
optimisation steps; a checkpoint between them holds the batch itself (its token ids, advantages and the log-probs
taken at rollout time) in the loader's JSON state, since the policy that sampled it is gone.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import dataclass, field

import numpy as np
import torch

from fermion.chat.conversations import Skipped
from fermion.chat.templates import ChatTemplate
from fermion.chat.toolbox import Tool
from fermion.chat.tools import SYSTEM, parse_calls
from fermion.config import SourceConfig
from fermion.data.sources import DataError, iter_records
from fermion.data.synthetic import arithmetic_problems
from fermion.data.synthetic.tinytask import training_problems, user_text
from fermion.data.tokenizer import Tokenizer
from fermion.device import DistInfo, all_gather_object, all_reduce
from fermion.eval.rewards import Rewards
from fermion.infer.engine import Engine
from fermion.infer.sampling import SamplingParams
from fermion.train.objectives import IGNORE_INDEX, token_logps

PAD_MULTIPLE = 8  # batch widths are rounded up to this: few shapes for compiled graphs and GPU kernels
MAX_ENGINE_BATCH = 64  # sequences the engine decodes at once


# ------------------------------------------------------------------------------------------------------ prompts


@dataclass(frozen=True)
class Prompt:
    messages: list[dict]  # the conversation to answer (ends with a user turn)
    record: dict  # what the verifiers read: "answer", "messages", "tools" (the ones the prompt offers)
    where: str
    ids: list[int] = field(default_factory=list)  # as the model sees it (`prompt_ids`); rl.read_prompts sets them


def builtin_prompts(source: SourceConfig) -> list[tuple[str, dict]]:
    """(where, record) of a generated source: training problems only, never those the eval tasks hold out."""
    n, seed = source.max_documents, source.seed
    if source.builtin == "arithmetic":
        return [(f"builtin arithmetic #{i}", {"prompt": p.question, "answer": p.answer, "completion": str(p.answer)})
                for i, p in enumerate(arithmetic_problems(n, seed))]
    if source.builtin == "tinytask":
        return [(f"builtin tinytask #{i}", {"messages": [{"role": "system", "content": SYSTEM},
                                                         {"role": "user", "content": user_text(p)}],
                                            "answer": p.answer, "tools": p.tools, "completion": p.answer_text})
                for i, p in enumerate(training_problems(n, seed))]
    raise DataError(f"rl source {source.name!r}: builtin {source.builtin!r} has no answers to verify; builtins RL "
                    "can use: arithmetic, tinytask (or records with prompt/messages and answer)")


def source_records(source: SourceConfig):
    if source.builtin is not None:
        return builtin_prompts(source)
    return iter_records(source)


def to_prompt(record: dict, where: str) -> Prompt:
    """A record {"prompt": text} or {"messages": [...]} with "answer" (or "expected") -> a Prompt. An optional
    "completion" (SFT's prompt/completion format) is the reference answer whose loss validation tracks."""
    if "answer" not in record and "expected" not in record:
        raise Skipped(where, "no answer", " (an 'answer' or 'expected' field for the verifiers)")
    if isinstance(record.get("messages"), list):
        messages = record["messages"]
        if not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages):
            raise DataError(f"{where}: 'messages' must be a list of objects with role and string content")
    elif isinstance(record.get("prompt"), str):
        messages = [{"role": "user", "content": record["prompt"]}]
    else:
        raise DataError(f"{where}: a prompt record needs 'prompt' (text) or 'messages' (a list ending with a user "
                        "turn)")
    if not messages or messages[-1].get("role") != "user":
        raise DataError(f"{where}: the prompt must end with a user turn for the model to answer")
    answer = record["answer"] if "answer" in record else record["expected"]
    return Prompt(messages, {**record, "answer": answer, "messages": messages}, where)


def prompt_ids(template: ChatTemplate, tokenizer: Tokenizer, messages: list[dict], tools: list[Tool]) -> list[int]:
    """The prompt as the model sees it: rendered by the chat template with the tools offered, up to the assistant's
    turn."""
    offered = [tool.definition for tool in tools] or None
    return template.encode(tokenizer, messages, add_generation_prompt=True, tools=offered).ids


def fingerprint(ids: list[list[int]]) -> str:
    digest = hashlib.sha256()
    for row in ids:
        digest.update(np.array([len(row), *row], dtype=np.int64).tobytes())
    return digest.hexdigest()


def sample_seed(*parts: int) -> int:
    """A sequence's sampling seed from its coordinates (run seed, rollout, prompt, sample, turn): the same on every
    machine and world size, and needing no state beyond the rollout counter."""
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "big") >> 1


# ----------------------------------------------------------------------------------------------------- rollouts


@dataclass
class Rollout:
    """One sampled conversation: its tokens, which of them are the model's, and the text of its last turn."""

    ids: list[int]
    model: list[bool]  # per token: sampled by the model (carries loss)
    text: str = ""
    turns: int = 0
    tool_calls: int = 0
    reward: float = 0.0
    each: list[float | None] = field(default_factory=list)


class Rollouts:
    """Samples and scores rollouts with the policy through the engine; scores token log-probabilities."""

    def __init__(self, model: torch.nn.Module, tokenizer: Tokenizer, template: ChatTemplate, tools: list[Tool],
                 rewards: Rewards, cfg, seq_len: int, precision: str, info: DistInfo, seed: int,
                 reference: torch.nn.Module | None = None, decoder: torch.nn.Module | None = None):
        self.model, self.tokenizer, self.template, self.tools = model, tokenizer, template, tools
        self.rewards, self.cfg, self.seq_len, self.precision = rewards, cfg, seq_len, precision
        self.info, self.seed, self.reference = info, seed, reference
        # What the engine decodes with: the policy itself, or (FSDP2, which shards the policy's weights) a whole
        # copy on each process that `sync` refreshes from the shards before each rollout batch and validation.
        self.decoder = model if decoder is None else decoder
        self.tool_defs = [tool.definition for tool in tools] or None
        self._engine: Engine | None = None

    def sync(self) -> None:
        """Under FSDP2: gather the policy's whole weights into the decoding copy. A collective: every process calls
        it at the same point (before each rollout batch; before each validation)."""
        if self.decoder is self.model:
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        whole = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True))
        self.decoder.load_state_dict(whole)

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        return prompt_ids(self.template, self.tokenizer, messages, self.tools)

    @property
    def engine(self) -> Engine:
        if self._engine is None:  # the KV cache is allocated once, on first use
            self._engine = Engine(self.decoder, self.tokenizer, max_batch=MAX_ENGINE_BATCH, max_seq=self.seq_len)
        return self._engine

    def _autocast(self):
        return torch.autocast(self.info.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")

    @torch.no_grad()
    def sample(self, prompts: list[Prompt], ids: list[list[int]], seeds: list[list[int]] | None) -> list[Rollout]:
        """Each prompt continued for up to max_turns model turns; `seeds[i][turn]` seeds sequence i's turn (None:
        greedy). The decoder's train/eval mode is put back afterwards (the engine decodes in eval mode)."""
        training = self.decoder.training
        rollouts = [Rollout(list(row), [False] * len(row)) for row in ids]
        conversations = [list(p.messages) for p in prompts]
        names = {tool.name: tool for tool in self.tools}
        live = [i for i, r in enumerate(rollouts) if len(r.ids) < self.seq_len - 1]
        try:
            # Decoding runs in the weights' own dtype, as `fermion generate` does (the engine's cache holds that
            # dtype), whatever autocast the trainer's validation runs under; log-probs for the loss are taken
            # afterwards in the training precision (`logps`).
            with torch.autocast(self.info.device.type, enabled=False):
                for turn in range(self.cfg.max_turns):
                    if not live:
                        break
                    params = [SamplingParams(max_new_tokens=min(self.cfg.max_new_tokens,
                                                                self.seq_len - 1 - len(rollouts[i].ids)),
                                             temperature=self.cfg.temperature if seeds else 0.0,
                                             top_p=self.cfg.top_p, stop=list(self.template.stop_strings),
                                             seed=seeds[i][turn] if seeds else None) for i in live]
                    done = self.engine.generate([rollouts[i].ids for i in live], params)
                    carry_on = []
                    for i, completion in zip(live, done, strict=True):
                        rollout = rollouts[i]
                        sampled = completion.token_ids + ([completion.stop_token] if completion.stop_token is not
                                                          None else [])
                        rollout.ids += sampled
                        rollout.model += [True] * len(sampled)
                        rollout.text, rollout.turns = completion.text, turn + 1
                        calls = parse_calls(completion.text, set(names)) if names else None
                        if calls and completion.finish_reason == "stop" and turn + 1 < self.cfg.max_turns:
                            if self._answer_calls(rollout, conversations[i], completion.text, calls, names):
                                carry_on.append(i)
                    live = carry_on
        finally:
            self.decoder.train(training)
        for prompt, rollout in zip(prompts, rollouts, strict=True):
            rollout.reward, rollout.each = self.rewards.score(rollout.text, prompt.record)
        return rollouts

    def greedy_sums(self, prompts: list[Prompt], ids: list[list[int]]) -> torch.Tensor:
        """Validation: the prompts answered greedily, as [prompts, summed reward, summed model tokens, then per
        verifier its summed reward and the prompts it applied to, then the summed NLL of the reference answers and
        their tokens] (objectives.GRPO.summarise reads them)."""
        done = self.sample(prompts, ids, None)
        sums = [len(done), sum(r.reward for r in done), sum(sum(r.model) for r in done)]
        for k in range(len(self.rewards.names)):
            applied = [r.each[k] for r in done if r.each[k] is not None]
            sums += [sum(applied), len(applied)]
        return torch.tensor(sums + self.reference_nll(prompts), dtype=torch.float64)

    @torch.no_grad()
    def reference_nll(self, prompts: list[Prompt]) -> list[float]:
        """[summed NLL, tokens] of the reference answers (a record's "completion", the text SFT would have trained
        on) as the policy's reply to its prompt: SFT's own loss on them, which RL should not drive up while it raises
        the reward. [0, 0] when no prompt has one."""
        rows = []
        for prompt in prompts:
            reference = prompt.record.get("completion")
            if isinstance(reference, str) and reference:
                encoded = self.template.encode(self.tokenizer, [*prompt.messages, {"role": "assistant",
                                                                                    "content": reference}],
                                               tools=self.tool_defs)
                rows.append({"ids": encoded.ids[:self.seq_len], "model": encoded.mask[:self.seq_len]})
        if not rows:
            return [0.0, 0.0]
        inputs, targets = collate(rows, self.tokenizer.pad_id, self.seq_len)
        scores = self.logps(self.model, inputs, targets, temperature=1.0)
        return [-float(scores.sum()), float((targets != IGNORE_INDEX).sum())]

    def _answer_calls(self, rollout: Rollout, conversation: list[dict], text: str, calls: list[dict],
                      names: dict[str, Tool]) -> bool:
        """Run the calls, append their results and the next assistant prompt as context; False when the
        conversation no longer leaves room to answer."""
        conversation.append({"role": "assistant", "content": text})
        for call in calls:
            conversation.append({"role": "tool", "name": call["name"],
                                 "content": names[call["name"]].run(call["arguments"])})
            rollout.tool_calls += 1
        rendered, spans = self.template.render_spans(conversation, self.tokenizer, add_generation_prompt=True,
                                                     tools=self.tool_defs)
        # From the end of the model's turn (its generation block, end-of-turn marker included) to the prompt of
        # the next one; the model's own tokens before it stay as sampled.
        context = self.tokenizer.inner.encode(rendered[spans[-1][1]:], add_special_tokens=False).ids
        if len(rollout.ids) + len(context) >= self.seq_len - 1:
            return False
        rollout.ids += context
        rollout.model += [False] * len(context)
        return True

    @torch.no_grad()
    def logps(self, model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
              temperature: float | None = None) -> torch.Tensor:
        """Per-token log-probabilities at the sampling temperature (or the one given), in the training precision
        (old and reference log-probs are taken exactly as the loss takes the policy's)."""
        training = model.training
        model.eval()
        try:
            with self._autocast():
                scores, _ = token_logps(model, inputs.to(self.info.device), targets.to(self.info.device),
                                        self.cfg.temperature if temperature is None else temperature)
        finally:
            model.train(training)
        return scores.float().cpu()


def advantages(rewards: torch.Tensor, group_size: int) -> tuple[torch.Tensor, int]:
    """(each completion's advantage within its group, the number of groups whose rewards are all equal)."""
    grouped = rewards.view(-1, group_size)
    mean = grouped.mean(dim=1, keepdim=True)
    std = grouped.std(dim=1, keepdim=True)  # Bessel-corrected, as TRL's nanstd
    zero = int(torch.isclose(std, torch.zeros_like(std)).sum())
    return ((grouped - mean) / (std + 1e-4)).view(-1), zero


# ------------------------------------------------------------------------------------------------------ batches


def collate(rows: list[dict], pad_id: int, max_width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) right-padded: targets are the next token where the model sampled it, else IGNORE_INDEX."""
    width = min(max_width, math.ceil(max(len(r["ids"]) - 1 for r in rows) / PAD_MULTIPLE) * PAD_MULTIPLE)
    inputs = np.full((len(rows), width), pad_id, dtype=np.int64)
    targets = np.full((len(rows), width), IGNORE_INDEX, dtype=np.int64)
    for i, row in enumerate(rows):
        ids, model = np.array(row["ids"], dtype=np.int64), np.array(row["model"], dtype=bool)
        n = len(ids) - 1
        inputs[i, :n] = ids[:-1]
        targets[i, :n] = np.where(model[1:], ids[1:], IGNORE_INDEX)
    return torch.from_numpy(inputs), torch.from_numpy(targets)


def padded(values: list[list[float]] | None, width: int) -> torch.Tensor:
    """Per-token values (old or reference log-probs) as [rows, width], or an empty tensor when there are none."""
    if values is None:
        return torch.zeros(0)
    out = torch.zeros(len(values), width)
    for i, row in enumerate(values):
        out[i, :min(len(row), width)] = torch.tensor(row[:width])
    return out


class RolloutLoader:
    """Rollout batches in micro-batches, for the trainer: `next_batch()` / `state_dict()` / `load_state_dict()`.

    Each rollout batch takes the next `prompts_per_step` prompts of a seeded order per epoch (rank r the r-th share,
    so the batch does not depend on the world size), samples `group_size` completions of each, scores them, and
    serves `iterations` optimisation steps of `grad_accum` micro-batches of `micro_batch` rows. A batch is
    (inputs, targets, advantages, old log-probs, reference log-probs, the loss normaliser, the logged statistics);
    log-probs are [0]-sized when not needed (one iteration: the loss takes the current ones, detached; beta 0).
    """

    def __init__(self, rollouts: Rollouts, prompts: list[Prompt], micro_batch: int, grad_accum: int):
        cfg, info = rollouts.cfg, rollouts.info
        self.rollouts, self.prompts, self.cfg, self.info = rollouts, prompts, cfg, info
        self.micro_batch, self.grad_accum = micro_batch, grad_accum
        self.per_rank = cfg.prompts_per_step // info.world_size
        self.ids = [p.ids for p in prompts]
        self.data = fingerprint(self.ids)
        self.rollout, self.iteration, self.micro = 0, 0, 0
        self.buffer: dict | None = None  # the current rollout batch: rows, normaliser, statistics
        self._order: tuple[int, list[int]] = (-1, [])  # (epoch, its order of the prompts)

    def _epoch_order(self, epoch: int) -> list[int]:
        if self._order[0] != epoch:
            order = list(range(len(self.prompts)))
            random.Random(f"fermion.rl/{self.rollouts.seed}/{epoch}").shuffle(order)
            self._order = (epoch, order)
        return self._order[1]

    def _prompt_indices(self, rollout: int) -> list[int]:
        """This rank's prompts in rollout batch `rollout`, as indices into `prompts`: the batch takes the next
        prompts_per_step positions of a seeded order per epoch."""
        start = rollout * self.cfg.prompts_per_step + self.info.rank * self.per_rank
        return [self._epoch_order(position // len(self.prompts))[position % len(self.prompts)]
                for position in range(start, start + self.per_rank)]

    def _roll(self) -> None:
        cfg, g = self.cfg, self.cfg.group_size
        chosen = self._prompt_indices(self.rollout)
        first = self.info.rank * self.per_rank
        prompts = [self.prompts[i] for i in chosen for _ in range(g)]
        ids = [self.ids[i] for i in chosen for _ in range(g)]
        seeds = [[sample_seed(self.rollouts.seed, self.rollout, first + j, s, t) for t in range(cfg.max_turns)]
                 for j in range(len(chosen)) for s in range(g)]
        self.rollouts.sync()
        done = self.rollouts.sample(prompts, ids, seeds)
        rewards = torch.tensor([r.reward for r in done], dtype=torch.float32)
        advantage, zero_std = advantages(rewards, g)
        rows = [{"ids": r.ids, "model": r.model, "advantage": float(a)} for r, a in zip(done, advantage, strict=True)]
        for start in range(0, len(rows), self.micro_batch):
            chunk = rows[start:start + self.micro_batch]
            inputs, targets = collate(chunk, self.rollouts.tokenizer.pad_id, self.rollouts.seq_len)
            kept = targets != IGNORE_INDEX
            for name, model in (("old", self.rollouts.model if cfg.iterations > 1 else None),
                                ("ref", self.rollouts.reference if cfg.beta > 0 else None)):
                if model is not None:
                    scores = self.rollouts.logps(model, inputs, targets)
                    for row, score, keep in zip(chunk, scores, kept, strict=True):
                        row[name] = score[:int(keep.nonzero().max()) + 1 if keep.any() else 0].tolist()
        # Every process keeps the whole batch (in global prompt order), so the state a checkpoint saves is the same
        # on each and resumes on any number of processes.
        every = all_gather_object(rows, self.info) if cfg.iterations > 1 else [rows]
        self.buffer = {"rows": [row for part in every for row in part], **self._statistics(done, zero_std)}

    def _statistics(self, done: list[Rollout], zero_std: int) -> dict:
        """The completion tokens and the logged statistics of the rollout batch, over every process."""
        names = self.rollouts.rewards.names
        sums = [sum(r.reward for r in done), len(done), sum(sum(r.model) for r in done), zero_std]
        for k in range(len(names)):
            applied = [r.each[k] for r in done if r.each[k] is not None]
            sums += [sum(applied), len(applied)]
        totals = all_reduce(torch.tensor(sums, dtype=torch.float64), self.info).tolist()
        count, tokens = totals[1], totals[2]
        stats = [totals[0] / count, tokens / count, totals[3]]
        stats += [totals[4 + 2 * k] / totals[5 + 2 * k] if totals[5 + 2 * k] else 0.0 for k in range(len(names))]
        return {"tokens": tokens, "stats": stats}

    def next_batch(self) -> tuple[torch.Tensor, ...]:
        if self.buffer is None:
            self._roll()
        mine = self.buffer["rows"]
        if len(mine) > self.per_rank * self.cfg.group_size:  # the whole batch: this rank's share of it
            share = self.per_rank * self.cfg.group_size
            mine = mine[self.info.rank * share:(self.info.rank + 1) * share]
        rows = mine[self.micro * self.micro_batch:(self.micro + 1) * self.micro_batch]
        # dapo: the summed token losses over the completion tokens of the whole batch (all processes). The trainer
        # divides each micro-batch's loss by grad_accum and DDP averages over processes, which this undoes.
        normaliser = max(self.buffer["tokens"], 1.0) / (self.grad_accum * self.info.world_size)
        inputs, targets = collate(rows, self.rollouts.tokenizer.pad_id, self.rollouts.seq_len)
        width = inputs.shape[1]
        old = padded([r["old"] for r in rows] if "old" in rows[0] else None, width)
        ref = padded([r["ref"] for r in rows] if "ref" in rows[0] else None, width)
        batch = (inputs, targets, torch.tensor([r["advantage"] for r in rows]), old, ref,
                 torch.tensor([normaliser]), torch.tensor(self.buffer["stats"]))
        self.micro += 1
        if self.micro == self.grad_accum:
            self.micro, self.iteration = 0, self.iteration + 1
            if self.iteration == self.cfg.iterations:
                self.iteration, self.buffer = 0, None
                self.rollout += 1
        return batch

    def state_dict(self) -> dict:
        return {"rollout": self.rollout, "iteration": self.iteration, "micro": self.micro, "data": self.data,
                "prompts_per_step": self.cfg.prompts_per_step, "group_size": self.cfg.group_size,
                "buffer": json.loads(json.dumps(self.buffer)) if self.buffer is not None else None}

    def load_state_dict(self, state: dict) -> None:
        if state.get("data") != self.data:
            raise DataError("the RL prompts differ from those the checkpoint was trained on (sources, template, "
                            "tools or val_fraction changed); set rl.dir to start a new RL run")
        for key in ("prompts_per_step", "group_size"):
            if state.get(key) != getattr(self.cfg, key):
                raise DataError(f"the checkpoint's RL loader has rl.{key} {state.get(key)}, this recipe "
                                f"{getattr(self.cfg, key)}; resume with the same one or set rl.dir")
        self.rollout, self.iteration, self.micro = state["rollout"], state["iteration"], state["micro"]
        self.buffer = state["buffer"]
