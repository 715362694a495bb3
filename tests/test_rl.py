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


# -------------------------------------------------------------------------------------------------- verifiers

TOOLS = [{"name": "calculate", "parameters": {"type": "object", "properties": {
    "operation": {"type": "string", "enum": ["add", "multiply"]}, "a": {"type": "integer"}, "b": {"type": "integer"}},
    "required": ["operation", "a", "b"], "additionalProperties": False}}]
CALL = {"name": "calculate", "arguments": {"operation": "add", "a": 2, "b": 3}}


@pytest.mark.parametrize("name, record, right, wrong, malformed", [
    ("arithmetic", {"answer": 12}, "12", "13", "twelve"),
    ("gsm8k", {"answer": "She has 3 + 4 = 7 apples.\n#### 7"}, "So 7 in all.\n#### 7", "#### 8", "no idea"),
    ("tool_call", {"answer": CALL, "tools": TOOLS}, json.dumps(CALL), json.dumps({**CALL, "arguments": {
        "operation": "add", "a": 2, "b": 4}}), '{"name": "calculate", "arguments": '),
    ("format", {"answer": 12}, " 12 ", None, "12, I think"),
    ("format", {"answer": CALL, "tools": TOOLS}, json.dumps(CALL), None, "Sure: " + json.dumps(CALL)),
])
def test_verifiers_score_right_wrong_and_malformed_answers(name, record, right, wrong, malformed):
    verify = rewards.resolve(name)
    assert verify(right, record) == 1.0
    if wrong is not None:
        assert verify(wrong, record) < 1.0
    assert verify(malformed, record) == 0.0


def test_tool_call_gives_partial_credit_and_verifiers_skip_records_not_theirs():
    two_of_three = json.dumps({**CALL, "arguments": {"operation": "add", "a": 2, "b": 4}})
    assert rewards.tool_call(two_of_three, {"answer": CALL, "tools": TOOLS}) == pytest.approx(0.2 + 0.2 + 0.6 * 2 / 3)
    assert rewards.tool_call(json.dumps({"name": "calculate", "arguments": {"x": 1}}),
                             {"answer": CALL, "tools": TOOLS}) == pytest.approx(0.2)  # JSON, wrong schema, no args
    assert rewards.arithmetic("5", {"answer": CALL}) is None and rewards.tool_call("5", {"answer": 5}) is None
    scored = rewards.Rewards.from_recipe({"arithmetic": 1.0, "format": 0.5})
    assert scored.score("12", {"answer": 12}) == (1.5, [1.0, 1.0])
    assert scored.score("{}", {"answer": CALL, "tools": TOOLS}) == (0.0, [None, 0.0])


def test_user_verifier_by_python_path_and_bad_paths_name_the_field(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent("""
        def shouting(completion, record):
            return float(completion.isupper())
        NOT_A_FUNCTION = 3
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    verify = rewards.resolve("my_rewards:shouting")
    assert verify("HELLO", {}) == 1.0 and verify("hello", {}) == 0.0
    for path, said in [("no_such_module:f", "cannot import no_such_module"),
                       ("my_rewards:missing", "my_rewards has no attribute 'missing'"),
                       ("my_rewards:NOT_A_FUNCTION", "has a int, not a function"),
                       ("exactness", "unknown verifier; built in: arithmetic, gsm8k, tool_call, format")]:
        with pytest.raises(RecipeError, match=f"rl.verifiers.{path}: .*{said}"):
            rewards.resolve(path)


def test_calculator_evaluates_arithmetic_safely():
    assert calculate("17 * (3 + 4)") == "119" and calculate("7 / 2") == "3.5" and calculate("-2 - 3") == "-5"
    run = CALCULATOR.run
    assert run({"expression": "__import__('os').system('true')"}).startswith("error: only numbers")
    assert run({"expression": "2 ** 99999"}).startswith("error: only numbers")  # no power: no runaway numbers
    assert run({"expression": "1 / 0"}) == "error: division by zero"
    assert run({"expr": "1"}).startswith("error: give the expression")


# ------------------------------------------------------------------------------------------------ multi-turn


class Scripted(torch.nn.Module):
    """A policy that writes a fixed reply on each turn, whatever it is asked: the engine's own prefill and decode
    steps drive it (a new prompt's prefill starts the next turn), and the token the script names at a position gets
    all the probability. A real tiny model lends it the configuration and embedding the engine's cache reads."""

    def __init__(self, base, replies: list[list[int]], eos: int):
        super().__init__()
        self.base, self.cfg, self.tok_emb = base, base.cfg, base.tok_emb
        self.replies, self.eos, self.turn, self.start = replies, eos, -1, 0

    def hidden(self, tokens, positions, kv_cache=None, **_):
        if tokens.shape[1] > 1:  # a prompt's prefill: the next turn; its first reply token follows position start
            self.turn, self.start = self.turn + 1, int(positions[0, -1]) + 1
        return positions[..., None].float(), None

    def logits(self, x):
        out = torch.full((*x.shape[:-1], self.cfg.vocab_size), -30.0)
        for row, position in enumerate(x[..., 0].long().tolist()):
            reply = self.replies[self.turn]
            offset = position - self.start
            out[row, reply[offset] if offset < len(reply) else self.eos] = 30.0
        return out


def test_rollout_calls_the_calculator_reads_its_result_and_only_model_tokens_carry_loss(shakespeare_tokenizer):
    from fermion.config import RLConfig
    from fermion.device import DistInfo
    from fermion.train.rollout import Prompt, Rollouts, collate

    tok, end = shakespeare_tokenizer, shakespeare_tokenizer.token_id("<|im_end|>")
    call = json.dumps({"name": "calculator", "arguments": {"expression": "17 * 3"}})
    policy = Scripted(tiny_model(vocab_size=tok.vocab_size, context_length=256),
                      [tok.encode(call) + [end], tok.encode("51") + [end]], tok.eos_id)
    cfg = RLConfig(sources=[{"name": "a", "paths": ["x.jsonl"]}], verifiers={"arithmetic": 1.0},
                   tools=["calculator"], max_turns=3, max_new_tokens=100)
    rollouts = Rollouts(policy, tok, CHATML, [CALCULATOR], rewards.Rewards.from_recipe(cfg.verifiers), cfg, 256,
                        "fp32", DistInfo(0, 1, 0, torch.device("cpu")), seed=0)
    question = [{"role": "user", "content": "What is 17 * 3?"}]
    prompt = Prompt(question, {"answer": 51, "messages": question}, "test")
    [rollout] = rollouts.sample([prompt], [rollouts.prompt_ids(question)], [[1, 2, 3]])
    assert (rollout.turns, rollout.tool_calls, rollout.text, rollout.reward) == (2, 1, "51", 1.0)
    # The whole conversation is what the chat template renders for it, the calculator's result a tool message.
    conversation = [*question, {"role": "assistant", "content": call},
                    {"role": "tool", "name": "calculator", "content": "51"}, {"role": "assistant", "content": "51"}]
    rendered = CHATML.render(conversation, tok, tools=[CALCULATOR.definition])
    assert tok.decode(rollout.ids) == rendered.removesuffix("\n")
    assert "Result of calculator: 51" in rendered
    # Loss on the model's own tokens, each turn's end marker included, and nothing else.
    assert tok.decode([t for t, mine in zip(rollout.ids, rollout.model, strict=True) if mine]) == \
        f"{call}<|im_end|>51<|im_end|>"
    inputs, targets = collate([{"ids": rollout.ids, "model": rollout.model}], tok.pad_id, 256)
    scored = (targets[0] != IGNORE_INDEX).tolist()
    assert scored[:len(rollout.ids) - 1] == rollout.model[1:] and not any(scored[len(rollout.ids) - 1:])
    mine = [t for t, m in zip(rollout.ids, rollout.model, strict=True) if m]
    assert targets[0][targets[0] != IGNORE_INDEX].tolist() == mine


# ----------------------------------------------------------------------------------------------- the stage

TINY = REPO / "configs" / "tiny.yaml"
STARTS_THE = """
def starts_the(completion, record):
    return float(completion.strip().lower().startswith("the"))
"""


def rl_recipe(folder: Path, init_from: Path, **rl) -> Path:
    """configs/tiny.yaml with an rl section over arithmetic prompts, rewarded (besides the arithmetic it cannot do)
    for answers that start with "the": rare in the pretrained tiny model's samples, so a reward to climb."""
    raw = yaml.safe_load(TINY.read_text())
    raw["run"]["dir"] = str(folder / "run")
    train = {"init_from": str(init_from), "steps": 6, "micro_batch_size": 8, "lr": 1e-2, "warmup_steps": 1,
             "precision": "fp32", "compile": False, "eval_every": 3, "eval_batches": 1, "checkpoint_every": 1,
             "keep_checkpoints": 20, "log_every": 1, "tensorboard": False, "progress": False}
    raw["rl"] = {"sources": [{"name": "arithmetic", "builtin": "arithmetic", "max_documents": 40, "seed": 1}],
                 "verifiers": {"rewards_for_tests:starts_the": 1.0, "arithmetic": 1.0}, "group_size": 4,
                 "prompts_per_step": 4, "max_new_tokens": 6, "iterations": 2, "val_fraction": 0.2, "train": train,
                 **rl}
    path = folder / "rl.yaml"
    path.write_text(yaml.safe_dump(raw))
    (folder / "rewards_for_tests.py").write_text(STARTS_THE)
    return path


def rl_metrics(run_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "rl" / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "elapsed_s", "mfu")} for r in records]


def run_rl(folder: Path, recipe: Path):
    """`fermion rl RECIPE` with the folder holding the recipe's user verifier importable."""
    sys.path.insert(0, str(folder))
    try:
        return cli("rl", str(recipe))
    finally:
        sys.path.remove(str(folder))


@pytest.fixture(scope="module")
def uninterrupted(tiny_run, tmp_path_factory):
    folder = tmp_path_factory.mktemp("rl")
    recipe = rl_recipe(folder, tiny_run)
    result = run_rl(folder, recipe)
    assert result.returncode == 0, result.stderr
    return folder, result.stdout


def test_stage_trains_and_records_rewards_clipping_and_validation(uninterrupted):
    folder, output = uninterrupted
    steps = [r for r in rl_metrics(folder / "run") if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 7))
    first = steps[0]
    assert {"reward", "reward_starts_the", "reward_arithmetic", "completion_tokens", "clip_fraction",
            "zero_std_groups"} <= set(first)
    assert first["clip_fraction"] == 0 and abs(first["loss"]) < 1e-6  # on-policy: ratio 1, advantages sum to 0
    assert any(r["clip_fraction"] > 0 for r in steps[1::2])  # the second iteration on a batch moves past the clip
    assert steps[0]["reward"] == steps[1]["reward"] != steps[2]["reward"]  # two steps per rollout batch
    assert first["reward"] == pytest.approx(first["reward_starts_the"] + first["reward_arithmetic"])
    validations = [r for r in rl_metrics(folder / "run") if "val_reward" in r]
    assert [r["step"] for r in validations] == [3, 6] and "val_reward_start" in validations[0]
    assert validations[0]["val_reference_nll_start"] > 0 and validations[0]["val_reference_nll"] > 0
    report = json.loads((folder / "run" / "rl" / "report.json").read_text())
    assert report["train_prompts"] == 32 and report["val_prompts"] == 8 and report["rollouts"] == 3
    assert "rl: starting model: val reward" in output
    from fermion import checkpoint
    from fermion.card.data import data_section
    from fermion.card.records import _stage
    from fermion.config import load_recipe

    assert checkpoint.stage_of(folder / "run" / "rl") == "rl"
    rl_dir = folder / "run" / "rl"
    card = "\n".join(data_section([_stage("rl", "rl", rl_dir, load_recipe(rl_dir / "recipe.yaml").rl)]))
    assert "#### RL rewards" in card and f"| mean reward of the rollouts | {first['reward']:.3f} (step 1)" in card
    assert f"| SFT loss on their reference answers | {validations[-1]['val_reference_nll_start']:.3f} (start)" in card


def test_exact_resume_after_sigkill(uninterrupted, tiny_run, tmp_path):
    """Killed mid-stage (between the two iterations on a rollout batch, too), resumed: the same rewards and losses
    at every step and the same final weights as the uninterrupted run."""
    folder, _ = uninterrupted
    recipe = rl_recipe(tmp_path, tiny_run)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "fermion", "rl", str(recipe)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    metrics, deadline = tmp_path / "run" / "rl" / "metrics.jsonl", time.monotonic() + HANG
    while not (metrics.is_file() and '"step": 3,' in metrics.read_text()):
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "the RL run did not reach step 3"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert '"step": 6,' not in metrics.read_text()
    result = run_rl(tmp_path, recipe)
    assert result.returncode == 0 and "resuming from" in result.stdout, result.stderr
    assert rl_metrics(tmp_path / "run") == rl_metrics(folder / "run")
    final = [load_file(d / "run" / "rl" / "checkpoints" / "step_00000006" / "model.safetensors")
             for d in (tmp_path, folder)]
    assert all(final[0][k].equal(final[1][k]) for k in final[1])


@pytest.mark.slow
@pytest.mark.parametrize("distributed", ["ddp", "fsdp"])
def test_two_processes_match_one_process(uninterrupted, tiny_run, tmp_path, distributed):
    """torchrun, 2 processes (gloo, CPU), the same global batch: each samples its half of the prompts with the seeds
    one process would use, so the rewards are the same at every step and the losses agree to float noise. Under
    FSDP2 each process decodes with a whole copy of the weights, gathered from the shards before every rollout
    batch and validation: the same rewards at every step say the copy follows the training."""
    folder, _ = uninterrupted
    recipe = rl_recipe(tmp_path, tiny_run, train={**yaml.safe_load((folder / "rl.yaml").read_text())["rl"]["train"],
                                                  "micro_batch_size": 4, "distributed": distributed})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "-m", "fermion", "rl", str(recipe)], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=HANG)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    two, one = ([r for r in rl_metrics(d / "run") if "loss" in r] for d in (tmp_path, folder))
    assert [r["reward"] for r in two] == [r["reward"] for r in one]
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(two, one, strict=True)) < 1e-5
    validations = [[r["val_reward"] for r in rl_metrics(d / "run") if "val_reward" in r] for d in (tmp_path, folder)]
    assert len(validations[0]) >= 2 and validations[0] == validations[1]


@pytest.mark.parametrize("change, said", [
    ({"verifiers": {"exactness": 1.0}}, "rl.verifiers.exactness: unknown verifier"),
    ({"tools": ["abacus"], "max_turns": 2}, "rl.tools: unknown tool 'abacus'; registered tools: calculator"),
    ({"tools": ["calculator"]}, "set max_turns to 2 or more"),
    ({"group_size": 3}, "not a multiple of rl.train.micro_batch_size"),
])
def test_bad_rl_recipes_fail_in_one_line(tiny_run, tmp_path, change, said):
    result = cli("rl", str(rl_recipe(tmp_path, tiny_run, **change)))
    assert result.returncode == 2 and said in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_rollouts_decode_in_the_weights_dtype_under_the_trainers_bf16_autocast(shakespeare_tokenizer):
    """Validation runs under the trainer's autocast; the engine's KV cache holds the weights' dtype, so decoding
    must not be autocast (it raised a dtype mismatch in the cache) and log-probs still come in the training one."""
    from fermion.config import RLConfig
    from fermion.device import DistInfo
    from fermion.train.rollout import Prompt, Rollouts, collate

    tok = shakespeare_tokenizer
    cfg = RLConfig(sources=[{"name": "a", "paths": ["x.jsonl"]}], verifiers={"arithmetic": 1.0}, max_new_tokens=4)
    policy = tiny_model(vocab_size=tok.vocab_size, context_length=64)
    rollouts = Rollouts(policy, tok, CHATML, [], rewards.Rewards.from_recipe(cfg.verifiers), cfg, 64, "bf16",
                        DistInfo(0, 1, 0, torch.device("cpu")), seed=0)
    question = [{"role": "user", "content": "What is 2 + 2?"}]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        [rollout] = rollouts.sample([Prompt(question, {"answer": 4}, "t")], [rollouts.prompt_ids(question)], None)
    assert 1 <= sum(rollout.model) <= 5
    inputs, targets = collate([{"ids": rollout.ids, "model": rollout.model}], tok.pad_id, 64)
    assert rollouts.logps(policy, inputs, targets).dtype == torch.float32


def test_prompt_records_and_builtin_sources_give_prompts_with_answers():
    from fermion.chat.conversations import Skipped
    from fermion.config import SourceConfig
    from fermion.data.sources import DataError
    from fermion.data.synthetic import held_out
    from fermion.train.rollout import source_records, to_prompt

    plain = to_prompt({"prompt": "What is 2 + 2?", "answer": 4}, "f:1")
    assert plain.messages == [{"role": "user", "content": "What is 2 + 2?"}] and plain.record["answer"] == 4
    chat = to_prompt({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                      "expected": "#### 3"}, "f:2")
    assert chat.record["answer"] == "#### 3" and len(chat.messages) == 2
    with pytest.raises(Skipped, match="f:3: no answer"):
        to_prompt({"prompt": "no answer"}, "f:3")
    with pytest.raises(DataError, match="f:4: the prompt must end with a user turn"):
        to_prompt({"messages": [{"role": "assistant", "content": "x"}], "answer": 1}, "f:4")
    arithmetic = source_records(SourceConfig(name="a", builtin="arithmetic", max_documents=50))
    operands = [r["prompt"].removeprefix("What is ").removesuffix("?").split(" ") for _, r in arithmetic]
    assert len(operands) == 50 and not any(held_out(int(a), op, int(b)) for a, op, b in operands)  # train side only
    [(where, record)] = source_records(SourceConfig(name="t", builtin="tinytask", max_documents=1))
    assert record["answer"]["name"] in {t["name"] for t in record["tools"]} and where == "builtin tinytask #0"
    with pytest.raises(DataError, match="builtin 'chat' has no answers to verify"):
        source_records(SourceConfig(name="c", builtin="chat", max_documents=1))


def test_rl_trains_lora_adapters_and_the_run_loads_merged(tiny_run, tmp_path):
    # rl.lora, as sft.lora and dpo.lora: the rollouts decode through the adapters, the checkpoints hold them alone,
    # and loading the run merges them into the base.
    from fermion import checkpoint
    from fermion.checkpoint import find

    recipe = rl_recipe(tmp_path, tiny_run, lora={"rank": 4, "alpha": 8, "trainable_tokens": "data"}, train={
        "init_from": str(tiny_run), "steps": 2, "micro_batch_size": 8, "lr": 1e-2, "warmup_steps": 1,
        "precision": "fp32", "compile": False, "eval_every": 100, "checkpoint_every": 1, "log_every": 1,
        "tensorboard": False, "progress": False})
    result = run_rl(tmp_path, recipe)
    assert result.returncode == 0, result.stderr
    rl_dir = tmp_path / "run" / "rl"
    ckpt = find(rl_dir)
    assert (ckpt / "adapter.json").is_file()
    from safetensors.torch import load_file

    names = list(load_file(ckpt / "model.safetensors"))
    assert names and all("lora" in name for name in names if name != "tok_emb.token_rows"), names[:5]
    # trainable_tokens "data": the rows of the chat markers and of every token of the prompts.
    assert len(json.loads((ckpt / "adapter.json").read_text())["trainable_tokens"]) > 2
    loaded = checkpoint.load(rl_dir)
    assert not any("lora" in name or "token_rows" in name for name in loaded.model.state_dict())


def test_prompts_that_leave_too_little_room_to_answer_are_counted_and_warned_about(tiny_run, tmp_path, monkeypatch):
    """A completion cut by the end of the context scores as a broken answer, so RL learns to avoid long right
    answers; the stage counts such prompts and says how to give them room (configs/tiny.yaml: 64 tokens)."""
    import torch
    from rich.console import Console

    from fermion.config import load_recipe
    from fermion.device import DistInfo
    from fermion.train.rl import RLSetup, prepare

    monkeypatch.syspath_prepend(str(tmp_path))  # the recipe's user verifier
    fits = prepare(load_recipe(rl_recipe(tmp_path, tiny_run)))[3]
    assert fits.extra["prompts_short_of_room"] == 0
    cramped = prepare(load_recipe(rl_recipe(tmp_path, tiny_run, max_new_tokens=48)))
    assert cramped[3].extra["prompts_short_of_room"] == cramped[3].used == 40
    console = Console(record=True, width=400)
    setup = RLSetup(load_recipe(tmp_path / "rl.yaml"), cramped)
    setup.plan(DistInfo(0, 1, 0, torch.device("cpu")), console)
    setup.write_files(console)
    assert ("rl: warning: 40 of 40 prompts leave fewer than rl.max_new_tokens (48) positions in the 64-token "
            "context") in console.export_text()


def test_validation_tracks_the_sft_loss_of_the_reference_answers(shakespeare_tokenizer):
    """RL may raise the reward by unlearning what SFT taught; validation also scores the prompts' reference answers
    (a record's "completion") as SFT does: the mean NLL of the reply's tokens and its end-of-turn marker."""
    import torch.nn.functional as F

    from fermion.config import RLConfig
    from fermion.device import DistInfo
    from fermion.train.objectives import GRPO
    from fermion.train.rollout import Prompt, Rollouts

    tok = shakespeare_tokenizer
    cfg = RLConfig(sources=[{"name": "a", "paths": ["x.jsonl"]}], verifiers={"arithmetic": 1.0}, max_new_tokens=4)
    policy = tiny_model(vocab_size=tok.vocab_size, context_length=64)
    rollouts = Rollouts(policy, tok, CHATML, [], rewards.Rewards.from_recipe(cfg.verifiers), cfg, 64, "fp32",
                        DistInfo(0, 1, 0, torch.device("cpu")), seed=0)
    asked = [[{"role": "user", "content": f"What is {a} + 2?"}] for a in (2, 3)]
    prompts = [Prompt(asked[0], {"answer": 4, "completion": "4"}, "t"), Prompt(asked[1], {"answer": 5}, "u")]
    sums = rollouts.greedy_sums(prompts, [rollouts.prompt_ids(m) for m in asked])
    encoded = CHATML.encode(tok, [*asked[0], {"role": "assistant", "content": "4"}])
    ids, mask = torch.tensor(encoded.ids), torch.tensor(encoded.mask)
    with torch.no_grad():
        logits, _ = policy(ids[None, :-1])
    nll = F.cross_entropy(logits[0], ids[1:], reduction="none")[mask[1:]]
    assert sums[-1] == int(mask[1:].sum()) == len(tok.encode("4<|im_end|>")) and sums[-2] == pytest.approx(nll.sum())
    summary = GRPO(("arithmetic",)).summarise(sums)
    assert summary["val_reference_nll"] == pytest.approx(nll.mean().item())
    assert "reference answers' NLL" in GRPO(("arithmetic",)).describe(summary)
    none = rollouts.greedy_sums(prompts[1:], [rollouts.prompt_ids(asked[1])])
    assert "val_reference_nll" not in GRPO(("arithmetic",)).summarise(none)
