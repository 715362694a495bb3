"""RL (GRPO): the loss and its gradients match TRL's GRPOTrainer on the same batch (dapo and bnpo, several
iterations so the ratio is clipped, with and without the KL penalty); the verifiers on right, wrong and malformed
answers, a user's own by Python path and a bad path's error; a rollout that calls the calculator and reads its
result, the loss covering only the model's tokens; exact resume after SIGKILL; one-line errors for bad recipes; and
a reward the policy climbs in a few steps."""

import copy
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import HANG, REPO, cli, tiny_model
from safetensors.torch import load_file

from fermion.chat.templates import ChatTemplate
from fermion.chat.toolbox import CALCULATOR, calculate
from fermion.config import RecipeError
from fermion.eval import rewards
from fermion.export.hf import export_hf
from fermion.model.hf import to_hf_state_dict
from fermion.train.objectives import GRPO, IGNORE_INDEX, token_logps

CHATML = ChatTemplate.get("chatml")
TEMPERATURE = 0.9  # not 1: both sides must score the distribution that was sampled, softmax(logits / T)


# ------------------------------------------------------------------------------------------------- TRL parity


@pytest.fixture(scope="module")
def peers(shakespeare_tokenizer, tmp_path_factory):
    """A fermion policy, the same exported and loaded by transformers, and the log-probs of the batch's completions
    under an older policy and a reference (both perturbed copies), as TRL's inputs take them."""
    transformers = pytest.importorskip("transformers")
    vocab = shakespeare_tokenizer.vocab_size
    policy = tiny_model(vocab_size=vocab, context_length=64)
    folder = tmp_path_factory.mktemp("grpo")
    export_hf(policy, shakespeare_tokenizer, folder / "policy", template=CHATML, dtype="fp32")
    hf_policy = transformers.AutoModelForCausalLM.from_pretrained(folder / "policy")
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(folder / "policy")
    ids = torch.Generator().manual_seed(3)
    prompts = torch.randint(5, vocab, (4, 6), generator=ids)  # equal lengths: transformers takes no positions
    completions = torch.randint(5, vocab, (4, 7), generator=ids)
    completion_mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5, [1] * 6 + [0]])
    full = torch.cat([prompts, completions], dim=1)
    inputs, targets = full[:, :-1], full[:, 1:].clone()
    scored = torch.zeros_like(targets, dtype=torch.bool)
    scored[:, prompts.shape[1] - 1:] = completion_mask.bool()
    targets[~scored] = IGNORE_INDEX
    noise = torch.Generator().manual_seed(5)
    others = {}
    for name in ("old", "ref"):
        other = copy.deepcopy(policy)
        with torch.no_grad():
            for param in other.parameters():
                param.add_(0.05 * torch.randn(param.shape, generator=noise))
            others[name], _ = token_logps(other, inputs, targets, TEMPERATURE)
    return dict(policy=policy, hf_policy=hf_policy, hf_tokenizer=hf_tokenizer, folder=folder, prompts=prompts,
                completions=completions, completion_mask=completion_mask, inputs=inputs, targets=targets,
                advantages=torch.tensor([1.0, -0.5, 0.3, -1.2]), **others)


def trl_loss_and_grads(peers, loss_type: str, beta: float) -> tuple[float, dict[str, torch.Tensor]]:
    """TRL's GRPO loss of the batch (its _compute_loss on prepared inputs, as its training step calls it) and the
    gradients it gives the transformers model."""
    datasets, trl = pytest.importorskip("datasets"), pytest.importorskip("trl")
    hf_policy = copy.deepcopy(peers["hf_policy"])
    args = trl.GRPOConfig(output_dir=str(peers["folder"] / f"trl-{loss_type}-{beta}"), loss_type=loss_type,
                          beta=beta, epsilon=0.2, epsilon_high=0.28, temperature=TEMPERATURE, num_generations=2,
                          per_device_train_batch_size=4, max_completion_length=8, use_cpu=True, bf16=False,
                          report_to=[], gradient_checkpointing=False)
    trainer = trl.GRPOTrainer(model=hf_policy, reward_funcs=[lambda completions, **_: [0.0] * len(completions)],
                              args=args, train_dataset=datasets.Dataset.from_list([{"prompt": "Hi"}] * 4),
                              processing_class=peers["hf_tokenizer"])
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # what its training loop sets for one micro-batch per step
    mask = peers["completion_mask"]
    width = peers["prompts"].shape[1] - 1
    inputs = {"prompt_ids": peers["prompts"], "prompt_mask": torch.ones_like(peers["prompts"]),
              "completion_ids": peers["completions"], "completion_mask": mask, "advantages": peers["advantages"],
              "old_per_token_logps": peers["old"][:, width:], "num_items_in_batch": mask.sum()}
    if beta:
        inputs["ref_per_token_logps"] = peers["ref"][:, width:]
    loss = trainer._compute_loss(trainer.model, inputs)
    loss.backward()
    return loss.item(), {name: p.grad for name, p in trainer.model.named_parameters()}


def fermion_loss_and_grads(peers, loss_type: str, beta: float) -> tuple[float, dict, dict]:
    policy = copy.deepcopy(peers["policy"]).train()
    objective = GRPO((), epsilon=0.2, epsilon_high=0.28, beta=beta, loss_type=loss_type, temperature=TEMPERATURE)
    normaliser = (peers["targets"] != IGNORE_INDEX).sum().float()  # one micro-batch, one process
    batch = (peers["inputs"], peers["targets"], peers["advantages"], peers["old"],
             peers["ref"] if beta else torch.zeros(0), normaliser[None], torch.zeros(3))
    loss, metrics = objective.loss(policy, batch)
    loss.backward()
    grads = copy.deepcopy(policy)  # the gradients named and laid out as the transformers model's weights
    with torch.no_grad():
        for param in grads.parameters():
            param.copy_(dict(policy.named_parameters())[next(n for n, p in grads.named_parameters()
                                                             if p is param)].grad)
    return loss.item(), to_hf_state_dict(grads), metrics


@pytest.mark.parametrize("loss_type, beta", [("dapo", 0.0), ("dapo", 0.04), ("bnpo", 0.0)])
def test_loss_and_gradients_match_trl(peers, loss_type, beta):
    trl_loss, trl_grads = trl_loss_and_grads(peers, loss_type, beta)
    loss, grads, metrics = fermion_loss_and_grads(peers, loss_type, beta)
    assert loss == pytest.approx(trl_loss, abs=1e-4)
    assert metrics["clip_fraction"] > 0  # the older policy's ratios reach past the clip: clipping is exercised
    assert set(grads) == set(trl_grads)
    for name, grad in grads.items():
        assert (grad - trl_grads[name]).abs().max() < 1e-4, name
    assert max(g.abs().max() for g in grads.values()) > 1e-3  # gradients that are there to compare
    if beta:
        assert metrics["kl"] > 0
