"""The `rl` section: reinforcement learning from verifiable rewards (GRPO, train/rl.py).

Each step's rollout batch is `prompts_per_step` prompts, each answered `group_size` times by the policy; every
completion is scored by the `verifiers` (weighted sum), and its advantage is its reward against the others of its
group. `iterations` optimisation steps are taken on each rollout batch (PPO's clipped ratio keeps them close to the
policy that sampled it), so `train.steps` counts optimisation steps and a run makes steps / iterations rollouts.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from fermion.config.base import Section
from fermion.config.data import SourceConfig

# A user verifier: "package.module:function" (imported when the stage starts; the field is named if it fails).
PYTHON_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


class RLSettings(Section):
    """Everything of the section but its `train` (config.RLConfig adds it: TrainConfig lives there)."""

    # Prompts with what a right answer is: builtin arithmetic or tinytask (training problems only, never the
    # held-out ones the eval tasks ask), or .jsonl/.json records {"prompt" or "messages", "answer" or "expected"}.
    sources: list[SourceConfig] = Field(min_length=1)
    dir: str | None = None  # default: <run dir>/rl
    # name -> weight: built-in names (eval/rewards.py: arithmetic, gsm8k, tool_call, format) or "module:function".
    verifiers: dict[str, float] = Field(min_length=1)
    group_size: int = Field(8, ge=2)  # G: completions per prompt, whose rewards make each other's baseline
    prompts_per_step: int = Field(8, ge=1)  # prompts per rollout batch, over all processes
    max_new_tokens: int = Field(64, ge=1)  # per model turn
    temperature: float = Field(1.0, gt=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    epsilon: float = Field(0.2, gt=0, lt=1)  # PPO clip: the ratio is kept within [1 - epsilon, 1 + epsilon_high]
    epsilon_high: float | None = Field(None, gt=0)  # None: epsilon (DAPO's "clip higher" suggests 0.28)
    # KL penalty to the starting model. 0 (no reference model at all), as DAPO, Dr. GRPO and TRL's default since
    # 0.19 do: with verifiable rewards the clip already keeps each update near the sampling policy, and the penalty
    # mostly slows learning (DAPO §2.3). Set it (0.01-0.05) to keep a long run close to its SFT model.
    beta: float = Field(0.0, ge=0)
    iterations: int = Field(1, ge=1)  # mu: optimisation steps on each rollout batch
    # Token-level normalisation, as TRL 1.16 defines it: dapo divides the summed token losses by the completion
    # tokens of the whole rollout batch (every token of the step weighs the same, however the batch is split);
    # bnpo by the tokens of each micro-batch.
    loss_type: Literal["dapo", "bnpo"] = "dapo"
    tools: list[str] = Field(default_factory=list)  # registered tools (chat/toolbox.py) offered in every prompt
    max_turns: int = Field(1, ge=1)  # model turns per rollout; a tool's result is only seen from turn 2 on
    val_fraction: float = Field(0.05, ge=0, lt=1)  # prompts held out, answered greedily at every validation
    # (A prompt that leaves no room to answer within the context is skipped and counted in report.json.)

    @field_validator("verifiers")
    @classmethod
    def _weights_finite(cls, value: dict[str, float]) -> dict[str, float]:
        for name, weight in value.items():
            if ":" in name and not PYTHON_PATH.match(name):
                raise ValueError(f"{name!r} is not a Python path 'package.module:function'")
            if not weight == weight or weight in (float("inf"), float("-inf")):  # NaN or infinite
                raise ValueError(f"{name}: the weight must be a finite number, got {weight}")
        return value

    @model_validator(mode="after")
    def _tools_have_turns(self) -> RLSettings:
        if self.tools and self.max_turns < 2:
            raise ValueError("tools: a tool's result reaches the model on its next turn; set max_turns to 2 or more")
        return self

    @property
    def clip_high(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high
