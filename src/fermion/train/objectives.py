"""Training objectives: how a batch becomes a loss. `Objective` below is the interface the trainer uses, and the only
one: pretraining, SFT, DPO and GRPO (RL) implement it.

Each objective meets the vocabulary in one of two ways (its cross-entropy mode, see `Objective.set_cross_entropy`):
- "full": the model's logits for the whole micro-batch, [tokens, vocab], then cross-entropy in fp32 on all of them.
- "chunked": the model returns its final hidden states and the output projection and fp32 cross-entropy run
  `chunk_tokens` tokens at a time, each chunk under activation checkpointing: backward recomputes a chunk's logits
  instead of keeping them. The largest vocabulary-wide tensors are then [chunk_tokens, vocab] (the chunk's logits,
  their fp32 copy and gradient, one chunk at a time) instead of [tokens, vocab]; the price is one more output-layer
  matmul per chunk in backward. Same loss and gradients up to float summation order.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
CHUNK_TOKENS = 4096  # tokens per cross-entropy chunk: [4096, vocab] fp32 logits are 0.5 GiB at a 32k vocabulary


class Objective(Protocol):
    """What the trainer calls, in this order, and nothing else.

    - `set_cross_entropy(mode)`: once, before anything below, with the run's resolved train.cross_entropy ("full"
      or "chunked", never "auto"). An objective may also take the mode at construction; this call overrides it.
    - `loss(model, batch) -> (loss, metrics)`: every micro-batch, under autocast, possibly through torch.compile.
      `loss` is the scalar to backpropagate; `metrics` holds scalar tensors, returned undetached (detaching them
      inside a compiled graph makes the loss lose its graph under torch 2.13); the trainer detaches what it keeps.
    - `logged`: the names in `metrics` the trainer averages over micro-batches and processes and logs each step.
    - `eval_sums(model, batch) -> tensor`: every validation batch, without gradients: a 1-D tensor of sums that
      adds up over batches (and processes), turned into named metrics by `summarise(total) -> {name: value}`.
      The metrics include "val_loss" (RL's are rewards instead); `describe(metrics)` is the one line printed for
      them.
    - `name`: the progress bar's label.
    - `state_dict() -> dict` / `load_state_dict(state)`: whatever the objective changes while training (an
      adaptive KL coefficient, say), JSON-serialisable; saved in every checkpoint's trainer_state.json and given
      back on resume before the first step. Stateless objectives return {} and ignore it.
    """

    name: str
    logged: tuple[str, ...]

    def set_cross_entropy(self, mode: str) -> None: ...

    def loss(self, model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...

    def eval_sums(self, model, batch) -> torch.Tensor: ...

    def summarise(self, sums: torch.Tensor) -> dict[str, float]: ...

    def describe(self, metrics: dict[str, float]) -> str: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def _chunk_nll(model, hidden: torch.Tensor, targets: torch.Tensor, reduction: str,
               temperature: float = 1.0) -> torch.Tensor:
    logits = model.logits(hidden).float()
    logits = logits if temperature == 1.0 else logits / temperature
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction=reduction)


def chunked_nll(model, hidden: torch.Tensor, targets: torch.Tensor, chunk_tokens: int = CHUNK_TOKENS,
                reduction: str = "sum", temperature: float = 1.0) -> torch.Tensor:
    """Cross-entropy of `model.logits(hidden) / temperature` against `targets` (IGNORE_INDEX skipped),
    `chunk_tokens` rows at a time: the summed NLL (reduction "sum") or each token's ("none", 0 where ignored, in the
    targets' shape). With gradients on, each chunk is checkpointed, so no chunk's logits outlive its own forward
    and backward."""
    flat_hidden, flat_targets = hidden.flatten(0, -2), targets.flatten()
    pieces = []
    for start in range(0, flat_targets.shape[0], chunk_tokens):
        h, t = flat_hidden[start : start + chunk_tokens], flat_targets[start : start + chunk_tokens]
        if torch.is_grad_enabled():
            pieces.append(checkpoint(_chunk_nll, model, h, t, reduction, temperature, use_reentrant=False,
                                     preserve_rng_state=False))
        else:
            pieces.append(_chunk_nll(model, h, t, reduction, temperature))
    if reduction == "sum":
        return torch.stack(pieces).sum() if pieces else flat_hidden.new_zeros((), dtype=torch.float32)
    return torch.cat(pieces).view(targets.shape)


def target_nll(model, inputs: torch.Tensor, targets: torch.Tensor, *packing, reduction: str = "sum",
               temperature: float = 1.0, cross_entropy: str = "full", chunk_tokens: int = CHUNK_TOKENS,
               only_targets: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The NLL of `targets` under softmax(logits / temperature) (fp32, whatever the autocast dtype), summed
    (reduction "sum") or per token ("none": in the targets' shape, 0 where IGNORE_INDEX), and the MoE aux loss.

    `only_targets`: the output layer and cross-entropy run only at the positions that have a target, the way the
    objectives that learn from a few tokens of each sequence want it (SFT's assistant tokens, DPO's replies, RL's
    completions: on the demo's SFT a third of the positions). The selection has a data-dependent size, so under
    torch.compile the loss is two graphs (the body, then the head on the selected rows), and on a GPU it waits for
    the count; pretraining, where every position has a target, leaves it off."""
    def head(inner, hidden):
        flat_targets = targets.flatten()
        if only_targets:
            keep = (flat_targets != IGNORE_INDEX).nonzero().squeeze(1)
            hidden, selected = hidden.flatten(0, -2).index_select(0, keep), flat_targets.index_select(0, keep)
        else:
            hidden, selected = hidden.flatten(0, -2), flat_targets
        if cross_entropy == "chunked":
            nll = chunked_nll(inner, hidden, selected, chunk_tokens, reduction, temperature)
        else:
            nll = _chunk_nll(inner, hidden, selected, reduction, temperature)
        if reduction == "sum":
            return nll
        if only_targets:
            nll = nll.new_zeros(flat_targets.shape).index_copy(0, keep, nll)
        return nll.view(targets.shape)

    return model(inputs, *packing, head=head)


class _Objective:
    """What the objectives here share: how the vocabulary is met (see the module docstring), and no state."""

    logged: tuple[str, ...] = ()
    only_targets = True  # the output layer only where a target is (see target_nll); pretraining's has one everywhere

    def __init__(self, cross_entropy: str = "full", chunk_tokens: int = CHUNK_TOKENS):
        if chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be at least 1, got {chunk_tokens}")
        self.chunk_tokens = chunk_tokens
        self.set_cross_entropy(cross_entropy)

    def set_cross_entropy(self, mode: str) -> None:
        if mode not in ("full", "chunked"):
            raise ValueError(f"cross_entropy {mode!r} is not one of full, chunked (resolve auto first)")
        self.cross_entropy = mode

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def token_nll(self, model, inputs: torch.Tensor, targets: torch.Tensor, *packing,
                  reduction: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(NLL of the targets, "sum" over them or per token ("none", 0 where ignored), and the MoE aux loss)."""
        return target_nll(model, inputs, targets, *packing, reduction=reduction, cross_entropy=self.cross_entropy,
                          chunk_tokens=self.chunk_tokens, only_targets=self.only_targets)


class Pretrain(_Objective):
    """Next-token cross-entropy, plus the MoE auxiliary losses the model returns."""

    name = "pretrain"
    only_targets = False

    def __init__(self, token_bytes: torch.Tensor, cross_entropy: str = "full", chunk_tokens: int = CHUNK_TOKENS):
        super().__init__(cross_entropy, chunk_tokens)
        self.token_bytes = token_bytes  # UTF-8 bytes each token id stands for, for bits per byte

    def loss(self, model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        inputs, targets, *packing = batch  # packed batches add (positions, segments)
        nll, aux_loss = self.token_nll(model, inputs, targets, *packing, reduction="sum")
        ce = nll / (targets != IGNORE_INDEX).sum()  # the mean F.cross_entropy takes (NaN with no targets, too)
        # Metrics are returned undetached: under torch.compile (2.13) returning a detached copy of `ce` beside the
        # loss makes the loss lose its graph. Callers detach what they keep.
        return ce + aux_loss, {"ce": ce, "aux": aux_loss}

    @torch.no_grad()
    def eval_sums(self, model, batch) -> torch.Tensor:
        """[summed loss in nats, target tokens, target bytes] for one validation batch."""
        inputs, targets, *packing = batch
        nats, _ = self.token_nll(model, inputs, targets, *packing, reduction="sum")
        counted = targets != IGNORE_INDEX
        n_bytes = self.token_bytes.to(targets.device)[targets.clamp(min=0)][counted].sum()
        return torch.stack([nats, counted.sum().float(), n_bytes.float()])

    def summarise(self, sums: torch.Tensor) -> dict[str, float]:
        return summarise_eval(sums)

    def describe(self, metrics: dict[str, float]) -> str:
        return f"val loss {metrics['val_loss']:.4f} · val bits/byte {metrics['val_bpb']:.4f}"


class SFT(Pretrain):
    """Cross-entropy on the tokens the chat template marks as the assistant's (the rest are IGNORE_INDEX), over
    packed conversations (each attending only to itself, positions restarting) or padded ones."""

    name = "sft"
    only_targets = True

    def describe(self, metrics: dict[str, float]) -> str:
        return f"val loss {metrics['val_loss']:.4f} (assistant tokens) · val bits/byte {metrics['val_bpb']:.4f}"


def summarise_eval(sums: torch.Tensor) -> dict[str, float]:
    nats, tokens, n_bytes = sums.tolist()
    return {"val_loss": nats / max(tokens, 1), "val_bpb": nats / (math.log(2) * max(n_bytes, 1))}


def token_logps(model, inputs: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                cross_entropy: str = "full", chunk_tokens: int = CHUNK_TOKENS) -> tuple[torch.Tensor, torch.Tensor]:
    """Each target's log-probability under softmax(logits / temperature), [rows, T] with 0 where ignored
    (log-softmax in fp32, whatever the autocast dtype of the logits), and the model's MoE auxiliary loss."""
    nll, aux_loss = target_nll(model, inputs, targets, reduction="none", temperature=temperature,
                               cross_entropy=cross_entropy, chunk_tokens=chunk_tokens, only_targets=True)
    return -nll, aux_loss


def sequence_logps(model, inputs: torch.Tensor, targets: torch.Tensor, cross_entropy: str = "full",
                   chunk_tokens: int = CHUNK_TOKENS) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's summed log-probability of its non-ignored targets, and the model's MoE auxiliary loss."""
    logps, aux_loss = token_logps(model, inputs, targets, 1.0, cross_entropy, chunk_tokens)
    return logps.sum(-1), aux_loss


class DPO(_Objective):
    """Direct Preference Optimization (Rafailov et al. 2023) and its IPO and hinge variants, as TRL 1.16 defines them.

    A batch is (inputs [2B, T], targets [2B, T], ref_logps [2B]): rows 0..B-1 are the chosen replies of B pairs and
    rows B..2B-1 the rejected replies of the same pairs, right-padded, targets IGNORE_INDEX except on reply tokens.
    `ref_logps` holds the reference model's summed log-probabilities, precomputed before training; when this
    objective holds a frozen `reference` model instead, it scores every batch itself and `ref_logps` (NaN) is unused.
    The implicit reward of a reply is beta * (policy log-prob - reference log-prob), summed over its tokens.
    """

    name = "dpo"
    logged = ("rewards_chosen", "rewards_rejected", "margin", "accuracy")

    def __init__(self, beta: float = 0.1, loss_type: str = "sigmoid", reference: torch.nn.Module | None = None,
                 sft_weight: float = 0.0, cross_entropy: str = "full", chunk_tokens: int = CHUNK_TOKENS):
        super().__init__(cross_entropy, chunk_tokens)
        if loss_type not in ("sigmoid", "ipo", "hinge"):
            raise ValueError(f"DPO loss {loss_type!r} is not one of sigmoid, ipo, hinge")
        self.beta, self.loss_type, self.reference = beta, loss_type, reference
        # RPO (Pang et al. 2024): plus the SFT loss on the chosen replies, so DPO cannot buy its margin by making
        # the preferred answer itself unlikely. TRL spells it loss_type=[..., "sft"], loss_weights=[1, sft_weight].
        self.sft_weight = sft_weight

    def pair_terms(self, logps: torch.Tensor, ref_logps: torch.Tensor,
                   counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-pair losses and the chosen and rejected rewards, from per-sequence [2B] log-probs and token counts."""
        chosen_ratio, rejected_ratio = (logps - ref_logps).chunk(2)
        if self.loss_type == "ipo":
            # IPO on per-token means, so beta means the same for short and long replies (TRL, after the authors)
            chosen_count, rejected_count = counts.clamp(min=1).chunk(2)
            delta = chosen_ratio / chosen_count - rejected_ratio / rejected_count
            losses = (delta - 1 / (2 * self.beta)) ** 2
        else:
            delta = chosen_ratio - rejected_ratio
            losses = -F.logsigmoid(self.beta * delta) if self.loss_type == "sigmoid" else F.relu(1 - self.beta * delta)
        return losses, self.beta * chosen_ratio, self.beta * rejected_ratio

    def _terms(self, model, batch):
        """(losses, chosen rewards, rejected rewards, aux loss, (policy logps, reference logps, token counts))."""
        inputs, targets, ref_logps = batch
        logps, aux_loss = sequence_logps(model, inputs, targets, self.cross_entropy, self.chunk_tokens)
        if self.reference is not None:
            with torch.no_grad():
                ref_logps, _ = sequence_logps(self.reference, inputs, targets, self.cross_entropy, self.chunk_tokens)
        counts = (targets != IGNORE_INDEX).sum(-1).float()
        return *self.pair_terms(logps, ref_logps, counts), aux_loss, (logps, ref_logps, counts)

    def loss(self, model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        losses, chosen, rejected, aux_loss, (logps, _, counts) = self._terms(model, batch)
        loss = losses.mean() + aux_loss
        if self.sft_weight:  # per token over all chosen tokens of the batch, as TRL's "sft" loss
            loss = loss - self.sft_weight * logps.chunk(2)[0].sum() / counts.chunk(2)[0].sum().clamp(min=1)
        # Undetached, as in Pretrain.loss (torch.compile 2.13); the trainer detaches what it logs.
        metrics = {"rewards_chosen": chosen.mean(), "rewards_rejected": rejected.mean(),
                   "margin": (chosen - rejected).mean(), "accuracy": (chosen > rejected).float().mean()}
        return loss, metrics

    @torch.no_grad()
    def eval_sums(self, model, batch) -> torch.Tensor:
        """[summed loss, summed chosen rewards, summed rejected rewards, pairs ranked right, pairs, chosen-reply
        NLL under the policy, the same under the reference, chosen-reply tokens]."""
        losses, chosen, rejected, _, (logps, ref_logps, counts) = self._terms(model, batch)
        chosen_logps, chosen_ref = logps.chunk(2)[0], ref_logps.chunk(2)[0]
        return torch.stack([losses.sum(), chosen.sum(), rejected.sum(), (chosen > rejected).float().sum(),
                            torch.tensor(float(len(losses)), device=losses.device), -chosen_logps.sum(),
                            -chosen_ref.sum(), counts.chunk(2)[0].sum()])

    def summarise(self, sums: torch.Tensor) -> dict[str, float]:
        pairs, tokens = max(sums[4].item(), 1), max(sums[7].item(), 1)
        loss, chosen, rejected, correct = (value / pairs for value in sums[:4].tolist())
        # The SFT loss on the chosen replies, now and at the start: DPO may lower the likelihood of what it prefers.
        return {"val_loss": loss, "val_rewards_chosen": chosen, "val_rewards_rejected": rejected,
                "val_margin": chosen - rejected, "val_accuracy": correct,
                "val_chosen_nll": sums[5].item() / tokens, "val_chosen_nll_start": sums[6].item() / tokens}

    def describe(self, metrics: dict[str, float]) -> str:
        return (f"val loss {metrics['val_loss']:.4f} · preference accuracy {100 * metrics['val_accuracy']:.1f}% · "
                f"margin {metrics['val_margin']:.3f} (chosen {metrics['val_rewards_chosen']:+.3f}, "
                f"rejected {metrics['val_rewards_rejected']:+.3f}) · chosen NLL {metrics['val_chosen_nll']:.3f} "
                f"(start {metrics['val_chosen_nll_start']:.3f})")


class GRPO(_Objective):
    """Group Relative Policy Optimization (Shao et al. 2024) with PPO's clipped ratio, as TRL 1.16's GRPOTrainer
    computes its loss for loss_type "dapo" or "bnpo" (token-level importance sampling, no entropy bonus).

    A batch is the rollout loader's (train/rollout.py): inputs and targets [B, T] (targets IGNORE_INDEX except on
    the tokens the policy sampled), advantages [B], the log-probs at rollout time [B, T] (or [0]: one iteration per
    rollout batch, where they are the current ones, detached), the reference's [B, T] (or [0] when beta is 0), the
    dapo normaliser [1] and the rollout batch's statistics [K] (logged as they are). Per token, with the ratio
    r = exp(logp - old logp) and advantage A:

        loss_t = -min(r A, clip(r, 1 - epsilon, 1 + epsilon_high) A) + beta r (exp(ref - logp) - (ref - logp) - 1)

    the KL term being TRL's: Schulman's k3 estimator, times the ratio (use_bias_correction_kl, TRL's default: the
    unbiased reverse-KL gradient of DeepSeek-V3.2 even off-policy); log-probs are those of softmax(logits / T), the
    distribution the rollouts were sampled from (as TRL scores them). dapo sums loss_t over the micro-batch's model
    tokens and divides by the normaliser (so a step weighs every completion token of the rollout batch alike);
    bnpo divides by the micro-batch's own model tokens.

    Validation answers held-out prompts greedily through `validate(indices) -> sums` (the rollouts' own, so the
    policy is scored as it would answer), one row of indices per validation batch.
    """

    name = "rl"

    def __init__(self, verifiers: tuple[str, ...], epsilon: float = 0.2, epsilon_high: float | None = None,
                 beta: float = 0.0, loss_type: str = "dapo", temperature: float = 1.0, validate=None,
                 cross_entropy: str = "full", chunk_tokens: int = CHUNK_TOKENS):
        super().__init__(cross_entropy, chunk_tokens)
        if loss_type not in ("dapo", "bnpo"):
            raise ValueError(f"GRPO loss {loss_type!r} is not one of dapo, bnpo")
        self.epsilon, self.epsilon_high = epsilon, epsilon if epsilon_high is None else epsilon_high
        self.beta, self.loss_type, self.temperature, self.validate = beta, loss_type, temperature, validate
        self.verifiers = tuple(reward_name(v) for v in verifiers)
        # The statistics the rollout loader computes, in its order (rollout.RolloutLoader._statistics).
        self.statistics = ("reward", "completion_tokens", "zero_std_groups", *self.verifiers)
        self.logged = (*self.statistics, "clip_fraction", *(("kl",) if beta else ()))
        self.start: dict[str, float] = {}  # the validation of the starting weights, reported beside every later one

    def loss(self, model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        inputs, targets, advantages, old_logps, ref_logps, normaliser, statistics = batch
        logps, aux_loss = token_logps(model, inputs, targets, self.temperature, self.cross_entropy,
                                      self.chunk_tokens)
        mask = (targets != IGNORE_INDEX).float()
        old_logps = logps.detach() if old_logps.numel() == 0 else old_logps
        ratio = torch.exp(logps - old_logps)
        advantage = advantages[:, None]
        clipped = torch.clamp(ratio, 1 - self.epsilon, 1 + self.epsilon_high)
        per_token = -torch.min(ratio * advantage, clipped * advantage)
        tokens = mask.sum().clamp(min=1.0)
        metrics = dict(zip(self.statistics, statistics, strict=True))
        if self.beta:
            delta = ref_logps - logps
            kl = (torch.exp(delta) - delta - 1) * ratio  # the ratio makes it the unbiased reverse-KL gradient
            per_token = per_token + self.beta * kl
            metrics["kl"] = (kl * mask).sum() / tokens
        total = (per_token * mask).sum()
        loss = total / normaliser[0] if self.loss_type == "dapo" else total / tokens
        was_clipped = (((ratio < 1 - self.epsilon) & (advantage < 0))
                       | ((ratio > 1 + self.epsilon_high) & (advantage > 0)))
        metrics["clip_fraction"] = (was_clipped.float() * mask).sum() / tokens
        return loss + aux_loss, metrics

    @torch.no_grad()
    def eval_sums(self, model, batch) -> torch.Tensor:
        """[prompts, summed reward, summed completion tokens, then per verifier: summed reward, prompts it applied
        to, then the reference answers' summed NLL and tokens] over the held-out prompts `batch[0]` names."""
        if self.validate is None:
            raise RuntimeError("GRPO validation needs the rollouts' validate function")
        return self.validate(batch[0].tolist())

    def summarise(self, sums: torch.Tensor) -> dict[str, float]:
        values = sums.tolist()
        count = max(values[0], 1)
        out = {"val_reward": values[1] / count, "val_completion_tokens": values[2] / count}
        for k, name in enumerate(self.verifiers):
            applied = values[4 + 2 * k]
            out[f"val_{name}"] = values[3 + 2 * k] / applied if applied else 0.0
        nll, tokens = values[3 + 2 * len(self.verifiers):]
        if tokens:  # SFT's loss on the held-out prompts' reference answers: what RL must not unlearn
            out["val_reference_nll"] = nll / tokens
        return {**out, **self.start}

    def describe(self, metrics: dict[str, float]) -> str:
        each = " · ".join(f"{name} {metrics[f'val_{name}']:.3f}" for name in self.verifiers)
        reference = (f" · reference answers' NLL {metrics['val_reference_nll']:.4f}"
                     if "val_reference_nll" in metrics else "")
        return (f"val reward {metrics['val_reward']:.4f} (greedy, held-out prompts) · {each} · "
                f"{metrics['val_completion_tokens']:.1f} tokens per answer{reference}")


def reward_name(verifier: str) -> str:
    """The metric name of a verifier's reward: reward_<name>, a user verifier by its function's name."""
    return "reward_" + verifier.rpartition(":")[2]
