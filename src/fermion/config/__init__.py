"""Recipes: one YAML file per run, validated by pydantic models.

Every section is a strict model (unknown keys are errors). `load_recipe` reads the YAML, applies `--set a.b=c`
overrides, validates, and turns any problem into a `RecipeError` whose message names the file, the field path and
what would be right. The CLI prints that one line and exits with code 2 before anything is written. The data
section (sources, split, shards) is in config/data.py, `fermion prepare`'s settings (data.prepare) in
config/prepare.py, the base every section shares in config/base.py.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, ValidationInfo, field_validator, model_validator

from fermion import layout
from fermion.config import sizing
from fermion.config.base import RecipeError, Section, eval_data_dir
from fermion.config.data import DataConfig, SourceConfig, file_states, matching_files, no_match_message
from fermion.config.prepare import PrepareConfig
from fermion.config.rl import RLSettings

__all__ = ["DataConfig", "PrepareConfig", "RecipeError", "SourceConfig", "file_states", "matching_files",
           "no_match_message"]  # besides what is defined here: re-exported from config/data.py and the others


class MoEConfig(Section):
    n_experts: int = Field(8, ge=2)
    top_k: int = Field(2, ge=1)
    aux_loss_coef: float = Field(0.01, ge=0)  # Switch/Mixtral load-balancing loss weight
    z_loss_coef: float = Field(0.001, ge=0)  # ST-MoE router z-loss weight

    @model_validator(mode="after")
    def _top_k_fits(self) -> MoEConfig:
        if self.top_k > self.n_experts:
            raise ValueError(f"top_k ({self.top_k}) must be at most n_experts ({self.n_experts})")
        return self


class ModelConfig(Section):
    # One dial for the size (config/sizing.py): n_layers, d_model, n_heads, n_kv_heads and ffn_hidden follow from
    # it, and pretraining's lr, batch and steps too; any of those set in the recipe wins.
    depth: int | None = Field(None, ge=1, le=128)
    vocab_size: int = Field(4096, ge=2)
    d_model: int = Field(256, ge=8)
    n_layers: int = Field(4, ge=1)
    n_heads: int = Field(8, ge=1)
    n_kv_heads: int | None = Field(None, ge=1)  # None: as many as n_heads (plain multi-head attention)
    head_dim: int | None = Field(None, ge=2)  # None: d_model // n_heads
    ffn_hidden: int = Field(688, ge=1)  # SwiGLU hidden size (per expert with MoE)
    context_length: int = Field(256, ge=2)
    rope_theta: float = Field(10000.0, gt=0)
    norm_eps: float = Field(1e-5, gt=0)
    tie_embeddings: bool = True
    qk_norm: bool = False
    sliding_window: int | None = Field(None, ge=1)  # Mistral-style local attention span, in tokens
    moe: MoEConfig | None = None
    init_std: float = Field(0.02, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _sized_by_depth(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("depth"), int) and data["depth"] >= 1:
            return {**sizing.shape(data["depth"]), **data}
        return data

    @model_validator(mode="after")
    def _heads_fit(self) -> ModelConfig:
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads}), or set head_dim")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.kv_heads})")
        if self.dim_per_head % 2:
            raise ValueError(f"head dimension ({self.dim_per_head}) must be even for RoPE")
        return self

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.d_model // self.n_heads


DEFAULT_SPECIAL_TOKENS = [
    "<|bos|>",
    "<|eos|>",
    "<|pad|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|tool|>",
]


class TokenizerConfig(Section):
    path: str | None = None  # an existing tokenizer.json to use instead of training one
    vocab_size: int = Field(4096, ge=300)
    min_frequency: int = Field(2, ge=1)
    special_tokens: list[str] = Field(default_factory=lambda: list(DEFAULT_SPECIAL_TOKENS))
    train_bytes: int = Field(20_000_000, ge=1000)  # how much of the corpus the BPE trainer reads
    # The chat template SFT renders with and export writes: chatml, alpaca, tagged, tagged-lines, a .jinja file or a
    # Jinja string.
    chat_template: str = "chatml"

    @model_validator(mode="after")
    def _required_specials(self) -> TokenizerConfig:
        if self.path is not None:  # an existing tokenizer (ours or imported) is not trained: its specials stand
            return self
        for token in ("<|bos|>", "<|eos|>", "<|pad|>"):
            if token not in self.special_tokens:
                raise ValueError(f"special_tokens must include {token!r}")
        return self


class TrainConfig(Section):
    # Start from these weights instead of a random init: a fermion run or checkpoint directory, or a Hugging Face
    # Llama/Mistral/Qwen3/Mixtral folder. The model and tokenizer come from it (continued pretraining, SFT).
    init_from: str | None = None
    steps: int = Field(1000, ge=1)
    epochs: float | None = Field(None, gt=0)  # pretraining: passes over the shards instead of steps (sft.epochs)
    micro_batch_size: int = Field(8, ge=1)  # sequences per device per micro-step
    grad_accum: int = Field(1, ge=1)
    seq_len: int | None = Field(None, ge=2)  # default: model.context_length
    lr: float = Field(3e-4, gt=0)
    # adamw: AdamW for every parameter. muon: Muon for the blocks' weight matrices (orthogonalised momentum, its
    # update scaled to AdamW's RMS so it takes the same lr unless muon_lr says otherwise), AdamW for embeddings,
    # output head, norms and the MoE router (train/muon.py).
    optimizer: Literal["adamw", "muon"] = "adamw"
    muon_lr: float | None = Field(None, gt=0)  # None: lr
    muon_momentum: float = Field(0.95, ge=0, lt=1)  # Nesterov momentum of the Muon matrices
    min_lr_ratio: float = Field(0.1, ge=0, le=1)  # final lr as a fraction of the peak
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int | None = Field(None, ge=0)  # None: a tenth of the steps, at most 100, at least 1 (`warmup`)
    decay_fraction: float = Field(0.2, gt=0, le=1)  # wsd: share of steps spent decaying
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    decay_norms_and_embeddings: bool = False
    grad_clip: float | None = Field(1.0, gt=0)
    # auto: bf16 autocast where the device computes bf16 natively (recent GPUs, CPUs with AVX512-BF16/AMX), else fp32
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # torch.compile the loss (model + cross-entropy), or each block under FSDP2. auto: on a GPU; on a CPU when the run
    # is long enough to repay the compile (train/distributed.py compile_decision, measured by bench/compile_payback.py).
    compile: bool | Literal["auto"] = "auto"
    # Deterministic kernels: the same run gives the same bits, which exact resume relies on. Under bf16 +
    # torch.compile on CPU it is what makes runs repeatable, at no measured cost; turn off only to chase GPU speed.
    deterministic: bool = True
    distributed: Literal["ddp", "fsdp"] = "ddp"  # used when launched with torchrun
    # Recompute activations in backward to save memory: none; selective (each block's attention and SwiGLU
    # intermediates are recomputed, its inputs kept); full (only each block's input is kept).
    activation_checkpointing: Literal["none", "selective", "full"] = "none"
    # How the loss meets the vocabulary: full (one logits tensor for the whole micro-batch); chunked (the output
    # projection and cross-entropy run a slice of tokens at a time, never materialising [tokens, vocab] fp32
    # logits); auto: chunked on CUDA, full on CPU.
    cross_entropy: Literal["auto", "full", "chunked"] = "auto"
    # How packed documents and sliding windows attend: sdpa (a dense [B, 1, T, T] mask, no flash kernels); flex
    # (FlexAttention with a block-sparse mask, compiled kernels, GQA without repeating K/V; no backward on CPU, so
    # GPU only for training); auto: flex on CUDA, sdpa otherwise. Plain causal attention always runs SDPA's kernel.
    attention: Literal["auto", "sdpa", "flex"] = "auto"
    # Write checkpoints in the background: training continues while the files go to storage.
    async_checkpoint: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"
    eval_every: int = Field(100, ge=1)
    eval_batches: int = Field(10, ge=1)
    log_every: int = Field(10, ge=1)
    checkpoint_every: int = Field(500, ge=1)
    keep_checkpoints: int = Field(3, ge=1)
    max_nonfinite: int = Field(3, ge=1)  # consecutive non-finite losses before the run stops
    peak_flops: float | None = Field(None, gt=0)  # per device, for MFU; None: look the device up
    tensorboard: bool = True
    wandb: bool = False
    progress: bool = True

    @field_validator("warmup_steps")
    @classmethod
    def _warmup_fits(cls, value: int | None, info: ValidationInfo) -> int | None:
        steps = info.data.get("steps")  # with epochs: checked once the steps are known (pretrain.settle_epochs)
        if value is not None and steps is not None and info.data.get("epochs") is None and value > steps:
            raise ValueError(f"must not exceed steps ({steps}); lower warmup_steps, or leave it out to get "
                             f"{sizing.default_warmup(steps)}")
        return value

    @model_validator(mode="after")
    def _schedule_fits(self) -> TrainConfig:
        if self.epochs is not None and "steps" in self.model_fields_set:
            raise ValueError(f"give steps ({self.steps}) or epochs ({self.epochs:g}), not both")
        return self

    @property
    def warmup(self) -> int:
        """Warmup steps in effect: warmup_steps, or where the recipe leaves it out (a continued stage, a run whose
        steps come from epochs: each from its own steps) sizing.default_warmup of the steps."""
        return self.warmup_steps if self.warmup_steps is not None else sizing.default_warmup(self.steps)


class RunConfig(Section):
    name: str = "run"
    dir: str | None = None  # default: runs/<name>
    seed: int = 1337
    # The model's license (an SPDX-style id as the Hugging Face Hub takes it: mit, apache-2.0, ...): the model card's
    # metadata. None: the recipe records none, and the card says it falls back to apache-2.0.
    license: str | None = None


def _post_train(lr: float, steps: int = 200) -> TrainConfig:
    return TrainConfig(steps=steps, lr=lr, warmup_steps=10, min_lr_ratio=0.0, eval_every=50, checkpoint_every=100,
                       log_every=10)


class LoRAConfig(Section):
    """Low-rank adapters (model/lora.py) on the chosen projections, the model's own weights frozen: a post-training
    stage's `lora` sub-section (sft.lora, dpo.lora, rl.lora). Its checkpoints then hold the adapters and a reference
    to the base; loading merges them."""

    rank: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)  # the adapters' output is scaled by alpha / rank
    dropout: float = Field(0.0, ge=0, lt=1)  # on the adapters' input only
    # The model's own projection names: wqkv, wo, w_gate_up, w_down (an MoE model: wqkv, wo). None: all of them.
    targets: list[str] | None = Field(None, min_length=1)
    # int4: QLoRA. The frozen matrices of every block are held in 4 bits while training (infer/quantize.py's int4
    # quantizer, dequantized on the fly); the adapters stay fp32. Inference merges them into the float base.
    quantize: Literal["none", "int4"] = "none"
    # The tokens whose rows of the embedding (and of the output layer, tied to it or not) train beside the adapters
    # (PEFT's trainable_token_indices). "auto": the special tokens the chat template writes that the tokenizer has
    # (chatml's <|im_start|> and <|im_end|>, alpaca's eos): a base pretrained on plain text never saw them, so their
    # rows are still at their random init, and with them frozen the adapters cannot learn to read or end a turn.
    # "data": those and every token of the stage's training examples (SFT's conversations, DPO's pairs, RL's
    # prompts): the embedding adapts to the data's vocabulary, as full fine-tuning's does, at d_model parameters a
    # token (the demo's SFT data: 1,101 of 4,096 tokens; bench/RESULTS.md). A list: those tokens, each one token of
    # the vocabulary. []: none (the embeddings stay frozen).
    trainable_tokens: Literal["auto", "data"] | list[str] = "auto"


class SFTConfig(Section):
    sources: list[SourceConfig] = Field(min_length=1)
    dir: str | None = None  # default: <run dir>/sft
    packing: bool = True  # several conversations per sequence, attending only within themselves; else padding
    overlong: Literal["truncate", "drop"] = "truncate"  # a conversation longer than the sequence
    val_fraction: float = Field(0.05, ge=0, lt=1)
    epochs: float | None = Field(1.0, gt=0)  # when set, the step count follows from it and train.steps is unused
    # Its own optimisation: lr, schedule, batch. train.init_from defaults to this recipe's pretraining run.
    train: TrainConfig = Field(default_factory=lambda: _post_train(lr=1e-4))
    lora: LoRAConfig | None = None  # train adapters instead of every weight


class DPOConfig(Section):
    sources: list[SourceConfig] = Field(min_length=1)
    dir: str | None = None  # default: <run dir>/dpo
    beta: float = Field(0.1, gt=0)
    loss: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"
    # precomputed: reference log-probabilities computed once before training (no second model in memory);
    # model: a frozen copy of the starting model scores every batch.
    reference: Literal["precomputed", "model"] = "precomputed"
    # Weight of the SFT loss on the chosen replies added to the DPO loss (RPO): 0 is plain DPO. DPO alone can widen
    # the margin by making both replies unlikely; a weight near 1 keeps the chosen ones likely.
    sft_weight: float = Field(0.0, ge=0)
    overlong: Literal["truncate", "drop"] = "truncate"
    val_fraction: float = Field(0.1, ge=0, lt=1)
    epochs: float | None = Field(1.0, gt=0)
    # train.init_from defaults to this recipe's SFT run.
    train: TrainConfig = Field(default_factory=lambda: _post_train(lr=5e-6))
    lora: LoRAConfig | None = None  # train adapters instead of every weight


class RLConfig(RLSettings):
    # Its own optimisation; train.grad_accum follows from the rollout batch. init_from: the last post-training stage.
    train: TrainConfig = Field(default_factory=lambda: _post_train(lr=1e-5))
    lora: LoRAConfig | None = None  # train adapters instead of every weight (rollouts decode through them)


class SmokePromptConfig(Section):
    prompt: str = Field(min_length=1)  # the request as a chat model's user turn
    opening: str | None = None  # the same request as an opening a base model continues; None: the prompt
    kind: Literal["story", "code", "factual", "instruction"] = "instruction"
    keywords: list[str] = Field(default_factory=list)  # an on-topic answer names one (factual: the answer); []: any


class SmokeSettings(Section):
    prompts: list[SmokePromptConfig] | None = Field(None, min_length=1)  # None: the built-in dozen (eval/smoke.py)
    temperatures: list[Annotated[float, Field(ge=0)]] = Field(default_factory=lambda: [0.3, 1.0], min_length=1)


class EvalConfig(Section):
    """Benchmarks for `fermion eval RUN` with no --tasks, and (with `every`) during pretraining, SFT and DPO."""

    tasks: list[str] = Field(default_factory=lambda: ["mc", "smoke"])
    # Folder laid out as ../shared/data/eval (<benchmark>/<files>). None: $FERMION_EVAL_DATA, else
    # ~/.cache/fermion/eval; a task whose files are missing there reads its Hugging Face dataset instead.
    data_dir: str | None = None
    limit: int | None = Field(None, ge=1)  # examples per task (per BBH subtask); None: all
    shots: int | None = Field(None, ge=0)  # None: each task's standard number
    every: int | None = Field(None, ge=1)  # run the tasks every N training steps (and at the end); None: never
    smoke: SmokeSettings = Field(default_factory=SmokeSettings)

    def resolved_data_dir(self) -> Path:
        return eval_data_dir(self.data_dir)


class StageConfig(Section):
    """A continued-pretraining stage (stories, then textbooks): the previous stage's final weights and the run's
    tokenizer, trained on its own data. `train` holds only what differs from the recipe's train section."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    data: DataConfig
    train: dict[str, Any] = Field(default_factory=dict)  # overrides of the recipe's train section (steps, lr, ...)
    dir: str | None = None  # default: <run dir>/stages/<name>


class FormatExport(Section):
    # None: the format's default (hf bf16, gguf f16, onnx fp32); the exporter names the valid ones (fermion.export).
    dtype: str | None = None


class ExportConfig(Section):
    """What `fermion run` ships: the final stage exported to these formats (the model card goes beside hf), each
    in its dtype: `export: {formats: [hf, onnx], onnx: {dtype: fp16}}`. `fermion run` checks every format against
    the model and tokenizer before it trains anything."""

    formats: list[Literal["hf", "gguf", "onnx"]] = Field(default_factory=lambda: ["hf", "gguf"], min_length=1)
    hf: FormatExport = Field(default_factory=FormatExport)
    gguf: FormatExport = Field(default_factory=FormatExport)
    onnx: FormatExport = Field(default_factory=FormatExport)

    def dtypes(self) -> dict[str, str | None]:
        """format -> the dtype the recipe asks for (None: the format's default), for every format it exports."""
        return {fmt: getattr(self, fmt).dtype for fmt in self.formats}


RUN_STEPS = ("prepare", "tokenizer", "pretrain", "sft", "dpo", "rl", "eval", "export", "card")


class Recipe(Section):
    run: RunConfig = Field(default_factory=RunConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    data: DataConfig | None = None
    train: TrainConfig = Field(default_factory=TrainConfig)
    stages: list[StageConfig] = Field(default_factory=list)  # continued pretraining after train, in order
    sft: SFTConfig | None = None
    dpo: DPOConfig | None = None
    rl: RLConfig | None = None
    eval: EvalConfig = Field(default_factory=EvalConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)

    @model_validator(mode="before")
    @classmethod
    def _train_sized_by_depth(cls, data: Any) -> Any:
        """With model.depth, pretraining's lr, batch and steps not given in `train` come from the size rule."""
        if not isinstance(data, dict) or not isinstance(data.get("model"), dict) or "depth" not in data["model"]:
            return data
        train = data.get("train") or {}
        if not isinstance(train, dict):
            return data
        try:
            model = ModelConfig.model_validate(data["model"])
        except ValidationError:
            return data  # reported with its field path by the normal validation
        seq_len = train.get("seq_len") or model.context_length
        if not isinstance(seq_len, int):
            return data
        return {**data, "train": sizing.fill_train(model.model_dump(), train, seq_len)}

    def depth_sizing(self) -> sizing.Sizing | None:
        """What model.depth derives for pretraining (None without it), for `fermion model info`."""
        return sizing.training(self.model.n_layers, self.model.d_model, self.seq_len) if self.model.depth else None

    @model_validator(mode="after")
    def _lengths_fit(self) -> Recipe:
        if self.train.seq_len is not None and self.train.seq_len > self.model.context_length:
            raise ValueError(
                f"train.seq_len ({self.train.seq_len}) exceeds model.context_length ({self.model.context_length})"
            )
        names = [stage.name for stage in self.stages]
        for i, stage in enumerate(self.stages):
            if stage.name in names[:i] or stage.name in RUN_STEPS:
                raise ValueError(f"stages[{i}].name {stage.name!r} is used twice or is one of fermion run's own "
                                 f"steps ({', '.join(RUN_STEPS)})")
            self.stage_train(i)
        for name in layout.POST_TRAINING:
            section = getattr(self, name)
            if section is not None and section.train.epochs is not None:
                where = f"{name}.epochs" if name != "rl" else "rl.train.steps (optimisation steps)"
                raise ValueError(f"{name}.train.epochs: {name} counts its passes over the data in {where}")
            marked = [i for i, source in enumerate(section.sources if section else []) if source.validation]
            if marked:
                raise ValueError(f"{name}.sources[{marked[0]}].validation: only pretraining data (data.sources) is "
                                 f"split this way; {name} holds out {name}.val_fraction of its records")
        if self.stages and self.data is None:
            raise ValueError("stages continue a pretraining run: add the data section it starts from")
        return self

    def stage_train(self, index: int) -> TrainConfig:
        """The train section of continued stage `index`: the recipe's, with the stage's overrides."""
        stage = self.stages[index]
        unknown = sorted(set(stage.train) - set(TrainConfig.model_fields))
        if unknown:
            close = difflib.get_close_matches(unknown[0], list(TrainConfig.model_fields), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"stages[{index}].train: unknown key {unknown[0]!r}{hint}")
        if len({"steps", "epochs"} & set(stage.train)) != 1:
            raise ValueError(f"stages[{index}].train: give one of steps and epochs (passes over the stage's data)")
        merged = {**self.train.model_dump(exclude={"init_from", "steps", "epochs"}), **stage.train}
        try:
            return TrainConfig.model_validate(merged)
        except ValidationError as err:
            first = err.errors()[0]
            where = "".join(f".{p}" for p in first["loc"])
            raise ValueError(f"stages[{index}].train{where}: {first['msg'].removeprefix('Value error, ')}") from None

    @property
    def seq_len(self) -> int:
        return self.train.seq_len or self.model.context_length

    @property
    def run_dir(self) -> Path:
        return layout.run_dir(self.run)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    @property
    def tokenizer_file(self) -> Path:
        """The tokenizer every stage of the run uses: tokenizer.path, else <run dir>/tokenizer.json."""
        return layout.tokenizer_file(self.run_dir, self.tokenizer.path)

    def stage_dir(self, index: int) -> Path:
        return layout.continued_stage_dir(self.run_dir, self.stages[index])

    def stage_recipe(self, index: int) -> Recipe:
        """Continued stage `index` as a pretraining recipe of its own: its data and train settings, in its own
        directory, starting from the previous stage's (or the base run's) final weights, with the run's tokenizer."""
        stage = self.stages[index]
        train = self.stage_train(index).model_copy(
            update={"init_from": str(self.stage_dir(index - 1) if index else self.run_dir)})
        return self.model_copy(update={
            "run": self.run.model_copy(update={"name": f"{self.run.name}-{stage.name}",
                                               "dir": str(self.stage_dir(index))}),
            "tokenizer": self.tokenizer.model_copy(update={"path": str(self.tokenizer_file)}),
            "data": stage.data, "train": train, "stages": [], "sft": None, "dpo": None,
            "rl": None})

    def post_training_dir(self, name: str) -> Path:
        """The directory of the sft, dpo or rl stage."""
        return layout.post_training_dir(self.run_dir, name, getattr(self, name))

    @property
    def pretrained_dir(self) -> Path:
        """Where pretraining ends: the last continued stage's directory, else the run directory."""
        return self.stage_dir(len(self.stages) - 1) if self.stages else self.run_dir


# ---------------------------------------------------------------------------------------------- loading + errors


# What `fermion tokenizer train` reads of a recipe ("section.field": that field alone).
TOKENIZER_SECTIONS = ("run", "tokenizer", "data", "train.init_from")


def load_recipe(path: str | os.PathLike, overrides: list[str] | None = None, check_paths: bool = True,
                sections: tuple[str, ...] | None = None) -> Recipe:
    """Read, override, validate. Raises RecipeError with a one-line, user-facing message. With `sections`, only
    those are validated (`only_sections`): a command is not refused over a section it never uses, though a
    misspelt key is an error wherever it is."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise RecipeError(f"{path}{where}: not valid YAML ({getattr(err, 'problem', err)})") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of sections (model, tokenizer, data, train, ...)")
    for item in overrides or []:
        apply_override(raw, item, source=str(path))
    if sections is not None:
        raw = only_sections(raw, sections, source=str(path))
    return recipe_from_dict(raw, source=str(path), check_paths=check_paths)


def only_sections(raw: dict, sections: tuple[str, ...], source: str = "recipe") -> dict:
    """The raw recipe with only `sections`, each whole or ("train.init_from") one field of it, once no key of the
    whole recipe is unknown (misspelt)."""
    try:
        Recipe.model_validate(raw)
    except ValidationError as err:
        unknown = [error for error in err.errors() if error["type"] == "extra_forbidden"]
        if unknown:
            raise RecipeError(f"{source}: {describe_error(unknown[0], raw)}") from None
    kept = {}
    for key, value in raw.items():
        fields = [name.partition(".")[2] for name in sections if name.partition(".")[0] == key]
        if "" in fields:
            kept[key] = value
        elif fields and isinstance(value, dict):
            kept[key] = {field: value[field] for field in fields if field in value}
    return kept


def recipe_from_dict(raw: dict, source: str = "recipe", check_paths: bool = True) -> Recipe:
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as err:
        raise RecipeError(f"{source}: {describe_error(err.errors()[0], raw)}") from None
    if check_paths:
        check_data_paths(recipe, source)
    return recipe


def apply_override(raw: dict, item: str, source: str = "--set") -> None:
    """Apply one `a.b.c=value` override in place. The value is parsed as YAML (numbers, bools, lists);
    a number in the key indexes a list (`data.sources.0.weight=2`)."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise RecipeError(f"--set {item!r}: expected KEY=VALUE, for example --set train.lr=3e-4")
    parts: list = [int(p) if p.isdigit() else p for p in key.strip().split(".")]
    node = raw
    for part in parts[:-1]:
        _check_index(node, part, item)
        if isinstance(node, dict) and node.get(part) is None:
            node[part] = {}
        node = node[part]
        if not isinstance(node, (dict, list)):
            raise RecipeError(f"--set {item!r}: {part!r} is not a section")
    _check_index(node, parts[-1], item)
    try:
        node[parts[-1]] = yaml.safe_load(value)
    except yaml.YAMLError:
        node[parts[-1]] = value


def _check_index(node, part, item: str) -> None:
    if isinstance(node, list) and not (isinstance(part, int) and part < len(node)):
        raise RecipeError(f"--set {item!r}: {part!r} is not an index of that list (it has {len(node)} items)")


def describe_error(error: dict, raw: dict) -> str:
    loc = [str(p) for p in error["loc"]]
    where = _dotted(error["loc"])
    if error["type"] == "extra_forbidden":
        model = _model_at(loc[:-1])
        valid = list(model.model_fields) if model else []
        close = difflib.get_close_matches(loc[-1], valid, n=1, cutoff=0.5)
        if close:
            return f"unknown key '{where}'; did you mean '{_dotted([*error['loc'][:-1], close[0]])}'?"
        return f"unknown key '{where}' (valid keys here: {', '.join(valid)})"
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "missing":
        return f"'{where}' is required"
    got = f" (got {error['input']!r})" if "input" in error and not isinstance(error["input"], dict) else ""
    return f"{where}: {message}{got}" if where else f"{message}{got}"


def _dotted(loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _model_at(loc: list[str]) -> type[BaseModel] | None:
    model: Any = Recipe
    for part in loc:
        if part.isdigit():
            continue
        field = model.model_fields.get(part)
        if field is None:
            return None
        model = _model_type(field.annotation)
        if model is None:
            return None
    return model


def _model_type(annotation) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_type(arg)
        if found is not None:
            return found
    return None


def check_data_paths(recipe: Recipe, source: str) -> None:
    if recipe.tokenizer.path and not Path(recipe.tokenizer.path).is_file():
        raise RecipeError(f"{source}: tokenizer.path: file not found: {recipe.tokenizer.path}")
    sections = [("data", recipe.data), *((f"stages[{i}].data", s.data) for i, s in enumerate(recipe.stages)),
                ("sft", recipe.sft), ("dpo", recipe.dpo), ("rl", recipe.rl)]
    for section, config in sections:
        for i, src in enumerate(config.sources if config is not None else []):
            for j, pattern in enumerate(src.paths):
                if not matching_files(pattern):
                    raise RecipeError(f"{source}: {section}.sources[{i}].paths[{j}]: {no_match_message(pattern)}")
