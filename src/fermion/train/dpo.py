"""The DPO stage: preference pairs -> token ids with the reply marked -> padded pair batches -> the one trainer with
the DPO objective.

Each side of a pair is the whole conversation (prompt, then the chosen or the rejected reply) rendered by the chat
template and tokenized once. Its reply tokens are the last span the template marks as the assistant's (the reply
and its end-of-turn marker); earlier assistant turns of a multi-turn prompt are context, not scored. A sequence of
n tokens becomes inputs ids[:-1] and targets ids[1:], kept only on reply tokens (IGNORE_INDEX elsewhere).

The reference model's log-probabilities are either computed once before training (`reference: precomputed`, the
default: no second model in memory) or by a frozen copy on every batch (`reference: model`). Precomputed ones are
cached in the stage directory under a key of the data, the starting weights, the model and the precision, so a
resumed run reuses them and any change recomputes them.

Precision: they are computed with the starting weights in eval mode under the same autocast choice as training
(TRL does the same), so at step 0 the policy's and the reference's log-probabilities carry the same rounding and
the implicit rewards start at zero. In fp32 that holds to about 1e-6 (the first loss is log 2 to 1e-5 in the
tests). Under bf16 the precompute's batches (eager, sorted by length, other padding) round differently from the
training step's (compiled, shuffled), so the first rewards are small but not zero: on a tiny bf16 + compile run
the first loss was 0.69310 against log 2 = 0.69315. `reference: model` scores the same batch in the same graph and
precision as the policy, so there policy == reference gives log 2 to the last bit.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from safetensors import safe_open
from safetensors.torch import save_file

from fermion import device as distributed
from fermion import layout
from fermion.atomic import replaced_file
from fermion.chat.conversations import Pair, Skipped, to_pair
from fermion.chat.templates import ChatTemplate, TemplateError
from fermion.config import Recipe
from fermion.data.sources import DataError
from fermion.data.tokenizer import Tokenizer
from fermion.device import DistInfo, all_reduce, resolve_cross_entropy, resolve_precision
from fermion.model.lora import weights_digest
from fermion.train.objectives import DPO, IGNORE_INDEX, sequence_logps
from fermion.train.posttrain import (
    PostTraining,
    Report,
    Stage,
    encode_all,
    read_examples,
    setup_stage,
    split,
    steps_for,
)
from fermion.train.pretrain import build_model
from fermion.train.stage import Parts, run_stage
from fermion.train.trainer import TrainResult

GROUP_BATCHES = 16  # pairs are sorted by length within groups of this many global batches (less padding)
PAD_MULTIPLE = 8  # batch widths are rounded up to this, so compiled graphs and GPU kernels see few shapes


@dataclass(frozen=True)
class Side:
    """One side of a pair: the conversation's token ids and where its reply lies in them."""

    ids: np.ndarray  # int64 [n]
    start: int  # the reply is ids[start:end]
    end: int


@dataclass(frozen=True)
class TokenPair:
    chosen: Side
    rejected: Side
    where: str

    @property
    def length(self) -> int:
        return max(len(self.chosen.ids), len(self.rejected.ids))


# ---------------------------------------------------------------------------------------------------- tokenizing


def last_span(mask: list[bool]) -> tuple[int, int]:
    """[start, end) of the last run of True: the final assistant reply (earlier turns are marked too)."""
    end = len(mask)
    while end and not mask[end - 1]:
        end -= 1
    start = end
    while start and mask[start - 1]:
        start -= 1
    return start, end


def encode_side(template: ChatTemplate, tokenizer: Tokenizer, prompt: list[dict], reply: str, max_tokens: int,
                overlong: str, where: str) -> tuple[Side, bool]:
    """(side, truncated). Raises Skipped when the reply cannot be scored within max_tokens."""
    encoded = template.encode(tokenizer, [*prompt, {"role": "assistant", "content": reply}])
    start, end = last_span(encoded.mask)
    if start == end:
        raise TemplateError(f"the {template.name} chat template marks no assistant tokens; DPO needs the reply "
                            "inside {% generation %} ... {% endgeneration %}")
    ids = encoded.ids
    truncated = len(ids) > max_tokens
    if truncated:
        if overlong == "drop":
            raise Skipped(where, "longer than the context", f" ({len(ids)} tokens > {max_tokens})")
        ids, end = ids[:max_tokens], min(end, max_tokens)
        if start >= end:
            raise Skipped(where, "no reply token within the context", f" (the prompt fills {max_tokens} tokens)")
    return Side(np.array(ids, dtype=np.int64), max(start, 1), end), truncated


def encode_pair(template: ChatTemplate, tokenizer: Tokenizer, pair: Pair, max_tokens: int, overlong: str,
                where: str) -> tuple[TokenPair, bool]:
    """(pair, truncated). Raises Skipped for overlong pairs (drop) and pairs whose two sides tokenize the same."""
    chosen, cut_chosen = encode_side(template, tokenizer, pair.prompt, pair.chosen, max_tokens, overlong, where)
    rejected, cut_rejected = encode_side(template, tokenizer, pair.prompt, pair.rejected, max_tokens, overlong, where)
    if np.array_equal(chosen.ids, rejected.ids):
        reason = "identical once truncated to the context" if cut_chosen or cut_rejected else "identical tokens"
        raise Skipped(where, reason)
    return TokenPair(chosen, rejected, where), cut_chosen or cut_rejected


def fingerprint(pairs: list[TokenPair]) -> str:
    """sha256 of the pairs' tokens and reply spans, in order."""
    digest = hashlib.sha256()
    for pair in pairs:
        for side in (pair.chosen, pair.rejected):
            digest.update(np.array([len(side.ids), side.start, side.end], dtype=np.int64).tobytes())
            digest.update(side.ids.tobytes())
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------------- batching


def collate(pairs: list[TokenPair], pad_id: int, ref_logps: np.ndarray | None = None,
            max_width: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(inputs [2B, T], targets [2B, T], ref_logps [2B]): the chosen sides, then the rejected ones, right-padded.
    `ref_logps` is [B, 2] (chosen, rejected); without it the batch carries NaN (a reference model scores it)."""
    sides = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    width = math.ceil((max(len(s.ids) for s in sides) - 1) / PAD_MULTIPLE) * PAD_MULTIPLE
    width = width if max_width is None else min(width, max_width)
    inputs = np.full((len(sides), width), pad_id, dtype=np.int64)
    targets = np.full((len(sides), width), IGNORE_INDEX, dtype=np.int64)
    for row, side in enumerate(sides):
        inputs[row, :len(side.ids) - 1] = side.ids[:-1]
        targets[row, side.start - 1:side.end - 1] = side.ids[side.start:side.end]  # target t predicts token t + 1
    ref = np.full(len(sides), np.nan, dtype=np.float32) if ref_logps is None else ref_logps.T.reshape(-1)
    return torch.from_numpy(inputs), torch.from_numpy(targets), torch.from_numpy(np.ascontiguousarray(ref))


class PairLoader:
    """Epochs over the training pairs in a seeded, length-grouped order; deterministic and resumable.

    Epoch e shuffles the pairs with seed (seed, e), tops the list up from its own start to whole global batches of
    `batch_size * world_size` pairs (so every pair is seen each epoch, however few there are), sorts by length
    within groups of GROUP_BATCHES batches and shuffles the batches. Rank r takes the r-th slice of each global
    batch, so the pairs of a step do not depend on the world size. The position is the number of global batches
    taken, so a resume needs only it.
    """

    def __init__(self, pairs: list[TokenPair], batch_size: int, seed: int, pad_id: int, max_width: int,
                 ref_logps: np.ndarray | None = None, rank: int = 0, world_size: int = 1):
        if not pairs:
            raise DataError("dpo: no training pairs")
        self.pairs, self.batch_size, self.seed, self.pad_id = pairs, batch_size, seed, pad_id
        self.max_width, self.ref_logps, self.rank, self.world_size = max_width, ref_logps, rank, world_size
        self.global_batch = batch_size * world_size
        self.batches_per_epoch = math.ceil(len(pairs) / self.global_batch)
        self.data = fingerprint(pairs)
        self.position = 0
        self._epoch: tuple[int, np.ndarray] | None = None

    def epoch_batches(self, epoch: int) -> np.ndarray:
        """[batches_per_epoch, global batch] pair indices of an epoch."""
        if self._epoch is None or self._epoch[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            order = np.resize(rng.permutation(len(self.pairs)), self.batches_per_epoch * self.global_batch)
            lengths = np.array([self.pairs[i].length for i in order])
            group = GROUP_BATCHES * self.global_batch
            for start in range(0, len(order), group):
                by_length = np.argsort(-lengths[start:start + group], kind="stable")
                order[start:start + group] = order[start:start + group][by_length]
            batches = order.reshape(self.batches_per_epoch, self.global_batch)
            self._epoch = (epoch, batches[rng.permutation(self.batches_per_epoch)])
        return self._epoch[1]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        epoch, index = divmod(self.position, self.batches_per_epoch)
        batch = self.epoch_batches(epoch)[index]
        self.position += 1
        mine = batch[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        ref = None if self.ref_logps is None else self.ref_logps[mine]
        return collate([self.pairs[i] for i in mine], self.pad_id, ref, self.max_width)

    def state_dict(self) -> dict:
        return {"position": self.position, "seed": self.seed, "global_batch": self.global_batch, "data": self.data}

    def load_state_dict(self, state: dict) -> None:
        if state.get("data") != self.data:
            raise DataError("the DPO pairs differ from those the checkpoint was trained on (sources, template, "
                            "seq_len or val_fraction changed); set dpo.dir to start a new DPO run")
        for key in ("seed", "global_batch"):
            if state.get(key) != getattr(self, key):
                raise DataError(f"the checkpoint's DPO loader has {key} {state.get(key)}, this run "
                                f"{getattr(self, key)}; resume with the same run.seed and micro_batch_size × "
                                "processes")
        self.position = int(state["position"])


def val_batches(pairs: list[TokenPair], batch_size: int, pad_id: int, max_width: int,
                ref_logps: np.ndarray | None = None) -> list[tuple[torch.Tensor, ...]]:
    """All the pairs, batched by length."""
    order = sorted(range(len(pairs)), key=lambda i: pairs[i].length)
    chunks = [order[i:i + batch_size] for i in range(0, len(pairs), batch_size)]
    return [collate([pairs[i] for i in chunk], pad_id, None if ref_logps is None else ref_logps[chunk], max_width)
            for chunk in chunks]


# ------------------------------------------------------------------------------------------------- the reference


@torch.no_grad()
def reference_logps(model: torch.nn.Module, pairs: list[TokenPair], batch_size: int, pad_id: int, max_width: int,
                    precision: str, info: DistInfo, cross_entropy: str = "full") -> np.ndarray:
    """[pairs, 2] summed log-probabilities of the chosen and rejected replies. Each rank scores every
    world_size-th pair (longest first, so memory trouble shows at once) and one all-reduce gathers them."""
    model.eval()
    found = torch.zeros(len(pairs), 2, device=info.device)
    mine = sorted(range(info.rank, len(pairs), info.world_size), key=lambda i: -pairs[i].length)
    for start in range(0, len(mine), batch_size):
        chunk = mine[start:start + batch_size]
        inputs, targets, _ = collate([pairs[i] for i in chunk], pad_id, max_width=max_width)
        with torch.autocast(info.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            logps, _ = sequence_logps(model, inputs.to(info.device), targets.to(info.device), cross_entropy)
        found[chunk] = logps.float().view(2, -1).T
    return all_reduce(found, info).cpu().numpy()


def cached_reference(stage: Stage, model: torch.nn.Module, train: list[TokenPair], val: list[TokenPair],
                     precision: str, info: DistInfo, console: Console) -> tuple[np.ndarray, np.ndarray]:
    """The reference log-probabilities of the train and val pairs, from the stage's cache when its key matches."""
    cache = layout.reference_cache(stage.recipe.run_dir)
    key = hashlib.sha256(json.dumps({
        "train": fingerprint(train), "val": fingerprint(val), "weights": weights_digest(stage.weights),
        "model": stage.recipe.model.model_dump(mode="json"), "precision": precision}).encode()).hexdigest()
    cached = distributed.broadcast_object(_read_cache(cache, key) if info.is_main else None, info)
    if cached is not None:
        if info.is_main:
            console.print(f"reference log-probabilities: reusing {cache}")
        return cached
    if info.is_main:
        console.print(f"reference log-probabilities: scoring {len(train) + len(val):,} pairs with the starting "
                      f"weights ({precision})")
    train_cfg = stage.recipe.train
    cross_entropy = resolve_cross_entropy(train_cfg.cross_entropy, info.device)
    scores = [reference_logps(model, pairs, train_cfg.micro_batch_size, stage.tokenizer.pad_id, stage.recipe.seq_len,
                              precision, info, cross_entropy) for pairs in (train, val)]
    if info.is_main:
        with replaced_file(cache) as tmp:
            save_file({"train": torch.from_numpy(scores[0]), "val": torch.from_numpy(scores[1])}, tmp,
                      metadata={"key": key})
    return scores[0], scores[1]


def _read_cache(path: Path, key: str) -> tuple[np.ndarray, np.ndarray] | None:
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("key") != key:
                return None
            return f.get_tensor("train").numpy(), f.get_tensor("val").numpy()
    except Exception:  # a damaged cache (safetensors raises several types) is recomputed, never trusted
        return None


# ------------------------------------------------------------------------------------------------------ the stage


def prepare(recipe: Recipe) -> tuple[Stage, list[TokenPair], list[TokenPair], Report]:
    """The stage, its tokenized train/val pairs and the report (no model built)."""
    stage = setup_stage(recipe, "dpo")
    cfg = recipe.dpo
    report = Report("dpo")
    max_tokens = stage.recipe.seq_len + 1

    def encode(pair: Pair, where: str) -> tuple[TokenPair, bool]:
        try:
            return encode_pair(stage.template, stage.tokenizer, pair, max_tokens, cfg.overlong, where)
        except TemplateError as err:
            raise DataError(f"{where}: {err}") from None

    pairs = encode_all(read_examples(cfg.sources, to_pair, report, "dpo"), encode, report)
    if not pairs:
        raise report.nothing_usable("dpo", cfg.sources, "preference pair")
    # Exact repeats are left out (a repeat in both splits would be tested on what it trained on), and the split
    # keeps every prompt on one side.
    unique, seen = [], set()
    for pair in pairs:
        identity = (pair.chosen.ids.tobytes(), pair.rejected.ids.tobytes())
        if identity in seen:
            report.skip("duplicate pair", pair.where)
            continue
        seen.add(identity)
        unique.append(pair)
    report.used = len(unique)
    train, val = split(unique, cfg.val_fraction, recipe.run.seed, key=lambda p: p.chosen.ids[:p.chosen.start].tobytes())
    report.extra.update(train_pairs=len(train), val_pairs=len(val), template=stage.template.name,
                        init_from=stage.init_from, reference=cfg.reference, loss=cfg.loss, beta=cfg.beta,
                        sft_weight=cfg.sft_weight)
    return stage, train, val, report


class DPOSetup(PostTraining):
    def token_arrays(self):
        return (side.ids for pair in self.train for side in (pair.chosen, pair.rejected))

    def plan(self, info: DistInfo, console: Console) -> None:
        train_cfg = self.recipe.train
        self.global_batch = train_cfg.micro_batch_size * info.world_size
        steps = steps_for(self.cfg.epochs, math.ceil(math.ceil(len(self.train) / self.global_batch) /
                                                     train_cfg.grad_accum), train_cfg.steps)
        # A small data set can make fewer steps than the configured warmup; the warmup then spans the run.
        train_cfg = train_cfg.model_copy(update={"steps": steps, "warmup_steps": min(train_cfg.warmup, steps)})
        self.recipe = self.recipe.model_copy(update={"train": train_cfg})
        # Validation scores the first eval_batches batches of held-out pairs (the split has shuffled them).
        self.val = self.val[:train_cfg.eval_batches * train_cfg.micro_batch_size]
        self.report.extra.update(steps=steps, val_pairs_scored=len(self.val))

    def write_files(self, console: Console) -> None:
        super().write_files(console)
        cfg, train_cfg = self.cfg, self.recipe.train
        console.print(f"dpo: {len(self.train):,} training pairs, {len(self.val):,} validation pairs scored · loss "
                      f"{cfg.loss}, beta {cfg.beta} · reference {cfg.reference} · {train_cfg.steps:,} steps of "
                      f"{self.global_batch * train_cfg.grad_accum} pairs")

    def build(self, info: DistInfo, console: Console) -> Parts:
        cfg, train_cfg, stage = self.cfg, self.recipe.train, self.stage
        pad_id, seq_len = stage.tokenizer.pad_id, self.recipe.seq_len
        model = build_model(self.recipe, info.device, stage.weights)
        precision = resolve_precision(train_cfg.precision, info.device)
        if cfg.reference == "precomputed":
            # Scored before any adapters are added (with B = 0 they add nothing; QLoRA's 4-bit base would).
            train_ref, val_ref = cached_reference(stage, model, self.train, self.val, precision, info, console)
            objective = DPO(cfg.beta, cfg.loss, sft_weight=cfg.sft_weight)
        else:
            train_ref = val_ref = None
            objective = DPO(cfg.beta, cfg.loss, build_model(self.recipe, info.device, stage.weights).eval()
                            .requires_grad_(False), sft_weight=cfg.sft_weight)
        loader = PairLoader(self.train, train_cfg.micro_batch_size, self.seed, pad_id, seq_len, train_ref, info.rank,
                            info.world_size)
        validation = val_batches(self.val, train_cfg.micro_batch_size, pad_id, seq_len, val_ref)
        return Parts(self.with_adapters(model, info), objective, loader, validation)


def dpo(recipe: Recipe, resume: str = "auto", console: Console | None = None) -> TrainResult:
    return run_stage(DPOSetup(recipe, prepare(recipe)), resume, console or Console())
