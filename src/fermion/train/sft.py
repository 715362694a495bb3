"""The SFT stage: conversations -> token ids with an assistant-only loss mask -> packed (or padded) batches ->
the one trainer with the SFT objective.

A conversation of n tokens is trained as inputs ids[:-1] and targets ids[1:], a target kept only where the chat
template marks the token as the assistant's (its text and end-of-turn marker), IGNORE_INDEX elsewhere.

Packing puts several conversations into one row of `seq_len` tokens. Each carries its own positions (0, 1, ...) and
a segment id, and the model's attention mask keeps every conversation to itself, so a packed row computes exactly
what the conversations would alone (tested). Padding instead gives each conversation its own row, batched with
others of similar length (shuffle, then sort within groups of 64 batches) so little compute goes to padding.
"""

from __future__ import annotations

import bisect
import random
from dataclasses import dataclass

import numpy as np
import torch
from rich.console import Console

from fermion.chat.conversations import Skipped, to_messages
from fermion.chat.templates import ChatTemplate, TemplateError
from fermion.config import Recipe
from fermion.data.sources import DataError
from fermion.data.tokenizer import Tokenizer
from fermion.device import DistInfo
from fermion.train.objectives import IGNORE_INDEX, SFT
from fermion.train.posttrain import PostTraining, Report, encode_all, read_examples, setup_stage, split, steps_for
from fermion.train.pretrain import build_model
from fermion.train.stage import Parts, run_stage
from fermion.train.trainer import TrainResult

GROUP_BATCHES = 64  # padding mode sorts by length within groups of this many batches


@dataclass(frozen=True)
class Example:
    ids: np.ndarray  # int64 [n] tokens of the whole conversation
    targets: np.ndarray  # int64 [n - 1]: ids[1:] where the assistant's, else IGNORE_INDEX


def encode(template: ChatTemplate, tokenizer: Tokenizer, messages: list[dict], max_tokens: int, overlong: str,
           where: str) -> tuple[Example, bool]:
    """(example, truncated). Raises Skipped when the conversation cannot be trained on within max_tokens."""
    encoded = template.encode(tokenizer, messages)
    ids, mask = encoded.ids, encoded.mask
    truncated = len(ids) > max_tokens
    if truncated:
        if overlong == "drop":
            raise Skipped(where, "longer than the context", f" ({len(ids)} tokens > {max_tokens})")
        ids, mask = ids[:max_tokens], mask[:max_tokens]
    targets = np.where(np.array(mask[1:], dtype=bool), np.array(ids[1:], dtype=np.int64), IGNORE_INDEX)
    if not (targets != IGNORE_INDEX).any():
        raise Skipped(where, "no assistant tokens within the context")
    return Example(np.array(ids, dtype=np.int64), targets), truncated


def pack(examples: list[Example], seq_len: int, rng: random.Random) -> list[list[Example]]:
    """Rows of at most seq_len inputs, packed best-fit decreasing: the longest conversation first, each into the row
    it leaves the least room in (a new row when none has room), then the rows in an order shuffled by `rng`. On the
    demo's conversations (up to 277 of 512 tokens) rows come out ~99% full where filling them in the given order left
    a fifth of each row padding (TRL's SFT packs the same way: its "bfd" strategy). Ties keep the given order."""
    rows: list[list[Example]] = []
    rooms: list[int] = []  # the distinct amounts of room left in open rows, ascending
    open_rows: dict[int, list[int]] = {}  # room left -> the rows with that much room
    for example in sorted(examples, key=lambda e: len(e.targets), reverse=True):
        length = len(example.targets)
        at = bisect.bisect_left(rooms, length)
        if at < len(rooms):
            room = rooms[at]
            row = open_rows[room].pop()
            if not open_rows[room]:
                del open_rows[room], rooms[at]
        else:
            room, row = seq_len, len(rows)
            rows.append([])
        rows[row].append(example)
        if room - length > 0:
            if room - length not in open_rows:
                bisect.insort(rooms, room - length)
                open_rows[room - length] = []
            open_rows[room - length].append(row)
    rng.shuffle(rows)
    return rows


def collate_packed(rows: list[list[Example]], seq_len: int, pad_id: int) -> tuple[torch.Tensor, ...]:
    """(inputs, targets, positions, segments), each [rows, seq_len]; padding is its own segment and unlearned."""
    inputs = np.full((len(rows), seq_len), pad_id, dtype=np.int64)
    targets = np.full((len(rows), seq_len), IGNORE_INDEX, dtype=np.int64)
    positions = np.zeros((len(rows), seq_len), dtype=np.int64)
    segments = np.full((len(rows), seq_len), -1, dtype=np.int64)
    for r, row in enumerate(rows):
        start = 0
        for s, example in enumerate(row):
            n = len(example.targets)
            inputs[r, start:start + n] = example.ids[:-1]
            targets[r, start:start + n] = example.targets
            positions[r, start:start + n] = np.arange(n)
            segments[r, start:start + n] = s
            start += n
    return tuple(torch.from_numpy(a) for a in (inputs, targets, positions, segments))


def collate_padded(examples: list[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) right-padded to the longest in the batch; causal attention never sees the padding."""
    width = max(len(e.targets) for e in examples)
    inputs = np.full((len(examples), width), pad_id, dtype=np.int64)
    targets = np.full((len(examples), width), IGNORE_INDEX, dtype=np.int64)
    for r, example in enumerate(examples):
        n = len(example.targets)
        inputs[r, :n], targets[r, :n] = example.ids[:-1], example.targets
    return torch.from_numpy(inputs), torch.from_numpy(targets)


class SFTLoader:
    """Epochs over the training conversations in a seeded order per epoch, packed or length-grouped; resumable.

    Each step takes `batch_size * world_size` rows of the epoch's list and rank r the r-th slice of them, so the
    global sequence of batches does not depend on the world size. The last, partial global batch of an epoch is
    dropped (every rank must take the same number of steps).
    """

    def __init__(self, examples: list[Example], seq_len: int, batch_size: int, seed: int, pad_id: int,
                 packing: bool, rank: int = 0, world_size: int = 1):
        self.examples, self.seq_len, self.batch_size, self.seed = examples, seq_len, batch_size, seed
        self.pad_id, self.packing, self.rank, self.world_size = pad_id, packing, rank, world_size
        self.epoch, self.cursor = 0, 0
        self._items = self._epoch_items(0)
        if len(self._items) < batch_size * world_size:
            raise DataError(f"sft: {len(self._items)} {'packed rows' if packing else 'conversations'} is fewer than "
                            f"one global batch ({batch_size} × {world_size} processes); lower "
                            "sft.train.micro_batch_size or add data")

    def _epoch_items(self, epoch: int) -> list:
        order = list(self.examples)
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        if self.packing:
            return pack(order, self.seq_len, random.Random(self.seed * 1_000_003 + epoch + 1))
        global_batch = self.batch_size * self.world_size
        group = global_batch * GROUP_BATCHES
        items = []
        for start in range(0, len(order), group):
            items.extend(sorted(order[start:start + group], key=lambda e: len(e.targets), reverse=True))
        batches = [items[i:i + global_batch] for i in range(0, len(items) - global_batch + 1, global_batch)]
        random.Random(self.seed * 1_000_003 + epoch + 1).shuffle(batches)
        return [example for batch in batches for example in batch]

    @property
    def batches_per_epoch(self) -> int:
        return len(self._items) // (self.batch_size * self.world_size)

    def next_batch(self) -> tuple[torch.Tensor, ...]:
        global_batch = self.batch_size * self.world_size
        if self.cursor + global_batch > len(self._items):
            self.epoch, self.cursor = self.epoch + 1, 0
            self._items = self._epoch_items(self.epoch)
        mine = self._items[self.cursor + self.rank * self.batch_size: self.cursor + (self.rank + 1) * self.batch_size]
        self.cursor += global_batch
        if self.packing:
            return collate_packed(mine, self.seq_len, self.pad_id)
        return collate_padded(mine, self.pad_id)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        self._items = self._epoch_items(self.epoch)


def val_batches(examples: list[Example], seq_len: int, batch_size: int, pad_id: int, packing: bool,
                limit: int) -> list[tuple[torch.Tensor, ...]]:
    if packing:
        rows = pack(examples, seq_len, random.Random(0))  # shuffled: a capped val set is not the longest only
        chunks = [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]
        return [collate_packed(chunk, seq_len, pad_id) for chunk in chunks[:limit]]
    # In split order, not sorted by length: capped at `limit` batches, sorting would score only the shortest.
    chunks = [examples[i:i + batch_size] for i in range(0, len(examples), batch_size)]
    return [collate_padded(chunk, pad_id) for chunk in chunks[:limit]]


def prepare(recipe: Recipe):
    """The stage, its tokenized train/val conversations and the report (no model built)."""
    stage = setup_stage(recipe, "sft")
    if "generation" not in stage.template.source:
        raise TemplateError(f"chat template {stage.template.name!r} has no {{% generation %}} block, so no token "
                            "would carry loss; wrap each assistant message and its end-of-turn marker in "
                            "{% generation %}...{% endgeneration %}")
    cfg = recipe.sft
    report = Report("sft")
    max_tokens = stage.recipe.seq_len + 1
    def convert(record: dict, where: str, format: str) -> list[dict]:
        return to_messages(record, where, format, report.note)

    examples = encode_all(read_examples(cfg.sources, convert, report, "sft"), lambda messages, where: encode(
        stage.template, stage.tokenizer, messages, max_tokens, cfg.overlong, where), report)
    if not examples:
        raise report.nothing_usable("sft", cfg.sources, "conversation")
    train, val = split(examples, cfg.val_fraction, recipe.run.seed)
    report.extra.update(train_conversations=len(train), val_conversations=len(val),
                        train_tokens=int(sum(len(e.targets) for e in train)),
                        assistant_tokens=int(sum((e.targets != IGNORE_INDEX).sum() for e in train)),
                        template=stage.template.name, init_from=stage.init_from)
    return stage, train, val, report


class SFTSetup(PostTraining):
    def plan(self, info: DistInfo, console: Console) -> None:
        train_cfg = self.recipe.train
        self.loader = SFTLoader(self.train, self.recipe.seq_len, train_cfg.micro_batch_size, self.seed,
                                self.stage.tokenizer.pad_id, self.cfg.packing, info.rank, info.world_size)
        steps = steps_for(self.cfg.epochs, self.loader.batches_per_epoch // train_cfg.grad_accum or 1, train_cfg.steps)
        self.recipe = self.recipe.model_copy(update={"train": train_cfg.model_copy(update={"steps": steps})})
        self.report.extra.update(steps=steps, rows_per_epoch=len(self.loader._items), packing=self.cfg.packing)

    def token_arrays(self):
        return (example.ids for example in self.train)

    def build(self, info: DistInfo, console: Console) -> Parts:
        train_cfg, tokenizer = self.recipe.train, self.stage.tokenizer
        validation = val_batches(self.val, self.recipe.seq_len, train_cfg.micro_batch_size, tokenizer.pad_id,
                                 self.cfg.packing, train_cfg.eval_batches)
        return Parts(self.with_adapters(build_model(self.recipe, info.device, self.stage.weights), info),
                     SFT(torch.from_numpy(tokenizer.token_bytes())), self.loader, validation)


def sft(recipe: Recipe, resume: str = "auto", console: Console | None = None) -> TrainResult:
    return run_stage(SFTSetup(recipe, prepare(recipe)), resume, console or Console())
