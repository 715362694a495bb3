"""Checkpoints: one directory per step, written under a temporary name and renamed when complete.

    <run>/checkpoints/step_00000060/
        model.safetensors      weights (one process or DDP)   | dcp/   sharded model + optimizer (FSDP2)
        optimizer.pt           AdamW state (torch.save; loaded with weights_only=True)
        rng_rank<r>.pt         every rank's RNG states
        trainer_state.json     step, tokens seen, data-loader position, non-finite streak, lr, wall time,
                               hardware, resolved precision, compiled, the stage kind (STAGES), objective state
        recipe.yaml            the resolved recipe
        adapter.json           with LoRA only: the adapters' settings and the base they were trained on (path and
                               weights digest); model.safetensors and optimizer.pt then hold the adapters alone
        tokenizer.json         the tokenizer the run uses
        manifest.json          sha256 of every file above (damage is detected before anything is loaded)
    <run>/checkpoints/latest   the name of the newest complete checkpoint

A checkpoint resumes with any number of processes and either layout: DCP shards are resharded on load (into an
FSDP2 model of another world size, or gathered whole into one process or DDP replicas), and safetensors are
distributed to FSDP2 shards. What must not change is the global batch (micro_batch_size x grad_accum x world
size), since it decides which samples make up each step.

With train.async_checkpoint the tensor files are written in the background (DCP's async_save under FSDP2, a
thread writing safetensors from a CPU copy otherwise) while training goes on; the directory keeps its temporary
name until every file is written and hashed, and only then is it renamed and `latest` moved (see PendingSave).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file

from fermion import layout
from fermion.atomic import discard, free_space, no_space, replaced_dir, replaced_file, storage_errors
from fermion.chat.templates import ChatTemplate
from fermion.config import LoRAConfig, ModelConfig, Recipe, recipe_from_dict
from fermion.data.tokenizer import Tokenizer
from fermion.device import DistInfo, all_reduce, barrier
from fermion.errors import CheckpointError, StorageError
from fermion.model import lora
from fermion.model.hf import imported_recipe, is_hf_folder, read_config
from fermion.model.transformer import Transformer

# The kinds of training stage a checkpoint can come from, as trainer_state.json records them ("stage"): pretraining
# from scratch, continued pretraining (from train.init_from or a previous stage), and the post-training stages.
STAGES = ("pretrain", "continued", "sft", "dpo", "rl")
POST_TRAINED = ("sft", "dpo", "rl")  # their models expect chat-formatted prompts


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint directories, oldest first (unverified: `find` checks them)."""
    root = layout.checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and layout.step_of(p) is not None]
    return sorted(found, key=layout.step_of)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _files(ckpt: Path) -> list[Path]:
    return sorted(p for p in ckpt.rglob("*") if p.is_file() and p.name != "manifest.json")


def verify(ckpt: Path) -> str | None:
    """None when every file matches the manifest, else a description of the damage."""
    manifest_path = ckpt / "manifest.json"
    if not manifest_path.is_file():
        return f"{manifest_path} is missing"
    try:
        expected = json.loads(manifest_path.read_text())["files"]
    except (ValueError, KeyError):
        return f"{manifest_path} is not a valid manifest"
    for rel, digest in expected.items():
        path = ckpt / rel
        if not path.is_file():
            return f"{path} is missing"
        if _sha256(path) != digest:
            return f"{path} does not match its checksum"
    return None


# ------------------------------------------------------------------------------------------------------- saving


def _rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class _Job:
    """Work that runs now (synchronous saves) or in a daemon thread (asynchronous ones); either way its error
    surfaces in wait(), on the training thread, where PendingSave.finish cleans up after it."""

    def __init__(self, work: Callable[[], None], background: bool):
        self._error: BaseException | None = None
        self._thread = None
        if background:
            self._thread = threading.Thread(target=self._run, args=(work,), name="fermion-checkpoint", daemon=True)
            self._thread.start()
        else:
            self._run(work)

    def _run(self, work: Callable[[], None]) -> None:
        try:
            work()
        except BaseException as err:  # noqa: BLE001 - handed to the training thread by wait()
            self._error = err

    def done(self) -> bool:
        return self._thread is None or not self._thread.is_alive()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
        if self._error is not None:
            raise self._error


class PendingSave:
    """A checkpoint whose files are being written under a temporary name. finish() (every rank) waits for the
    files, then renames the directory into place, moves `latest` and drops old checkpoints: until then the
    checkpoint is invisible, so a crash mid-write leaves only a hidden .step_N.tmp that the next save removes."""

    def __init__(self, run_dir: Path, final: Path, tmp: Path, job: _Job, info: DistInfo, keep: int):
        self.run_dir, self.final, self.tmp, self.job, self.info, self.keep = run_dir, final, tmp, job, info, keep

    def done(self) -> bool:
        """Whether this rank's share of the writing is over (finish() then returns without waiting for it)."""
        return self.job.done()

    def finish(self) -> Path:
        """Put the checkpoint in place. When writing it failed, its temporary directory goes (a full disk is not
        kept full) and the error is raised: a StorageError as it is, anything else as a CheckpointError."""
        try:
            self.job.wait()
        except Exception as err:
            if self.info.is_main:
                discard(self.tmp)
            if isinstance(err, StorageError):
                raise
            raise CheckpointError(f"writing checkpoint {self.final} failed: {err}") from err
        barrier(self.info)
        if self.info.is_main:
            shutil.rmtree(self.final, ignore_errors=True)
            os.replace(self.tmp, self.final)
            with replaced_file(layout.latest_file(self.run_dir)) as tmp:
                tmp.write_text(self.final.name + "\n")
            for old in list_checkpoints(self.run_dir)[:-self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        barrier(self.info)
        return self.final


def _cpu_copy(value):
    """A deep copy with every tensor copied to CPU memory, so training can go on changing the originals."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _cpu_copy(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_cpu_copy(v) for v in value)
    return value


def _write_manifest(tmp: Path, step: int) -> None:
    manifest = {"step": step, "files": {str(p.relative_to(tmp)): _sha256(p) for p in _files(tmp)}}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))


def _tensor_bytes(value) -> int:
    """Bytes of every tensor in a (nested) state dict; of this process's shards where they are DTensors."""
    if isinstance(value, torch.Tensor):
        local = value.to_local() if hasattr(value, "to_local") else value
        return local.numel() * local.element_size()
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, list | tuple):
        return sum(_tensor_bytes(v) for v in value)
    return 0


SMALL_FILES = 256 << 10  # RNG states, JSON, the recipe, the files' headers: a generous allowance


def _share_bytes(model, optimizer, info: DistInfo, sharded: bool, tokenizer_path: Path) -> int:
    """About how many bytes this process writes into a checkpoint: its tensors (all of them on rank 0 of one
    process or DDP, its shards under FSDP2), the tokenizer on rank 0, and SMALL_FILES."""
    needed = SMALL_FILES
    if sharded or info.is_main:
        needed += _tensor_bytes(model.state_dict()) + _tensor_bytes(optimizer.state_dict()["state"])
    if info.is_main:
        needed += Path(tokenizer_path).stat().st_size
    return needed


def _check_space(root: Path, final: Path, needed: int, info: DistInfo) -> None:
    """Refuse a checkpoint that will not fit before writing any of it, on every rank together (a rank that failed
    alone would leave the others waiting at the next barrier)."""
    free = free_space(root)
    short = all_reduce(torch.tensor([float(needed > free)], device=info.device), info, op="max")
    if needed > free:
        raise no_space(final, free, needed)
    if short.item():
        raise StorageError(f"no space left on device for {final}: another process has no room for its share "
                           "(its message says how much it needs); free some space, then run again")


def start_save(
    run_dir: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict,
    info: DistInfo,
    sharded: bool,
    recipe: Recipe,
    tokenizer_path: Path,
    keep: int,
    asynchronous: bool = False,
    process_group=None,
) -> PendingSave:
    """Begin a checkpoint (every rank calls this): the state is captured now, the tensor files are written now or,
    with `asynchronous`, in the background (DCP async_save on `process_group`, which must not be the group
    training uses, when sharded; a thread writing safetensors from a CPU copy otherwise). Small files are written
    at once. Call finish() on the result, on every rank, before the next save and before the process exits."""
    root = layout.checkpoints_dir(run_dir)
    final = layout.checkpoint_dir(run_dir, step)
    tmp = root / f".{final.name}.tmp"
    needed = _share_bytes(model, optimizer, info, sharded, tokenizer_path)
    _check_space(root, final, needed, info)
    try:
        with storage_errors(final, needed, tmp):
            if info.is_main:
                root.mkdir(parents=True, exist_ok=True)
                for stale in root.glob(f".{layout.STEP_PREFIX}*.tmp"):  # left by a run that died while writing
                    shutil.rmtree(stale, ignore_errors=True)
                tmp.mkdir(parents=True)
            barrier(info)
            torch.save(_rng_state(), tmp / f"rng_rank{info.rank}.pt")
            if info.is_main:
                state = {**trainer_state, "step": step, "world_size": info.world_size,
                         "format": "dcp" if sharded else "safetensors"}
                (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
                layout.recipe_file(tmp).write_text(recipe.to_yaml())
                Tokenizer.load(tokenizer_path).save(layout.tokenizer_file(tmp))  # with its tokenizer_config.json
                if lora.adapted(model):
                    layout.adapter_file(tmp).write_text(json.dumps(model.adapters, indent=2))
    except Exception:
        if info.is_main:
            discard(tmp)
        raise
    barrier(info)  # every rank's small files exist before rank 0 may hash them
    write: Callable[[], None] = lambda: None  # noqa: E731
    if sharded:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(model, optimizer)
        bundle = {"model": model_state, "optim": optim_state}
        if asynchronous:  # staged to CPU memory here, written by DCP's own thread
            future = dcp.async_save(bundle, checkpoint_id=str(tmp / "dcp"), process_group=process_group)
            write = future.result  # on rank 0 it returns once every rank's shards and the metadata are written
        else:
            write = lambda: dcp.save(bundle, checkpoint_id=str(tmp / "dcp"))  # noqa: E731
    elif info.is_main:
        weights = {k: v.detach().contiguous() for k, v in _saved_state(model).items()}
        optim_state = optimizer.state_dict()
        if asynchronous:
            weights, optim_state = _cpu_copy(weights), _cpu_copy(optim_state)

        def write() -> None:
            save_file({k: v.cpu() for k, v in weights.items()}, tmp / "model.safetensors")
            torch.save(optim_state, tmp / "optimizer.pt")

    def work() -> None:  # on the checkpoint thread when asynchronous, so a refused write is named there
        with storage_errors(final, needed, tmp):
            write()
            if info.is_main:
                _write_manifest(tmp, step)

    return PendingSave(run_dir, final, tmp, _Job(work, background=asynchronous), info, keep)


def _saved_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint keeps of a model: its adapters alone when it has them (the base is referenced), else all."""
    return lora.adapter_state(model) if lora.adapted(model) else model.state_dict()


def save_weights(model: torch.nn.Module, recipe: Recipe, tokenizer: Tokenizer, out: Path) -> Path:
    """A weights-only checkpoint (no optimizer or trainer state): what `fermion import` writes and `init_from` reads.

    It has the same layout and manifest as a training checkpoint, so every command that takes one takes this too.
    """
    out = Path(out)
    with replaced_dir(out, "manifest.json", CheckpointError, "a checkpoint") as tmp:
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        save_file(state, tmp / "model.safetensors")
        layout.recipe_file(tmp).write_text(recipe.to_yaml())
        tokenizer.save(layout.tokenizer_file(tmp))
        _write_manifest(tmp, 0)
    return out


# ------------------------------------------------------------------------------------------------------ loading


def trainer_state_of(ckpt: Path) -> dict:
    """A checkpoint's trainer_state.json: step, tokens seen, loader position, world size, format, batch sizes."""
    return json.loads((ckpt / "trainer_state.json").read_text())


def load_training(ckpt: Path, model, optimizer, info: DistInfo, sharded: bool) -> dict:
    """Restore model, optimizer and this rank's RNG in place; return the trainer state.

    Any layout resumes into any other and any world size: DCP shards are resharded to this run's FSDP2 layout or
    gathered whole for one process or DDP; safetensors are distributed to this run's FSDP2 shards. (Matching the
    global batch is the caller's check: see Trainer.restore.)
    """
    state = trainer_state_of(ckpt)
    if state["format"] == "dcp":
        _load_dcp(ckpt, model, optimizer)
    elif sharded:
        _load_full_into_sharded(ckpt, model, optimizer, info)
    else:
        _load_state(ckpt, model, load_file(ckpt / "model.safetensors", device=str(info.device)))
        optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True, map_location=info.device))
    _restore_rng(ckpt, info.rank)
    return state


def _load_state(ckpt: Path, model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """A checkpoint's model.safetensors into a model: adapters into an adapted model trained on the same base (the
    digest adapter.json records), all weights into a plain one."""
    record = lora.read_record(ckpt)
    if (record is None) != (not lora.adapted(model)):
        raise CheckpointError(f"{ckpt} holds {'adapters' if record else 'a whole model'}, but this stage trains "
                              f"{'adapters' if lora.adapted(model) else 'every weight'}: the recipe's lora section "
                              "changed; restore it or use another run.dir")
    if record is None:
        model.load_state_dict(weights)
        return
    if record["base"]["digest"] != model.adapters["base"]["digest"]:
        raise CheckpointError(f"{ckpt}'s adapters were trained on {record['base']['checkpoint']}, whose weights "
                              f"differ from those this stage starts from ({model.adapters['base']['checkpoint']}); "
                              "resume from the same base or use another run.dir")
    lora.load_adapter_state(model, weights, str(ckpt), tokens=record.get("trainable_tokens", {}))


def base_reference(source: str | os.PathLike, weights: dict[str, torch.Tensor]) -> dict:
    """What adapters trained on the weights loaded from `source` (a run, checkpoint or HF folder) record of it: the
    path given, the checkpoint it resolved to, and the weights' digest (checked whenever the adapters are loaded)."""
    source = Path(source)
    resolved = source if is_hf_folder(source) else find(source)
    digest = lora.weights_digest(weights)
    return {"path": str(source.resolve()), "checkpoint": str(resolved.resolve()), "digest": digest}


def _load_dcp(ckpt: Path, model, optimizer) -> None:
    """DCP shards into this run's layout: FSDP2 of any world size, DDP replicas or a single process (each rank
    then reads whole tensors). get_state_dict describes the layout wanted; DCP reads the pieces that fill it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    bundle = {"model": model_state, "optim": optim_state}
    with warnings.catch_warnings():  # in one process DCP warns that it loads without a process group
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        warnings.filterwarnings("ignore", message="torch.distributed is unavailable")
        dcp.load(bundle, checkpoint_id=str(ckpt / "dcp"))
    set_state_dict(model, optimizer, model_state_dict=bundle["model"], optim_state_dict=bundle["optim"])


def _load_full_into_sharded(ckpt: Path, model, optimizer, info: DistInfo) -> None:
    """A safetensors checkpoint (one process or DDP) into an FSDP2 model: every rank reads the whole state and
    keeps its own shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    weights = load_file(ckpt / "model.safetensors", device="cpu")
    saved = torch.load(ckpt / "optimizer.pt", weights_only=True, map_location="cpu")
    set_state_dict(model, optimizer, model_state_dict=weights,
                   optim_state_dict=_optimizer_by_name(saved, model, optimizer, ckpt),
                   options=StateDictOptions(full_state_dict=True))


def _optimizer_by_name(saved: dict, model, optimizer, ckpt: Path) -> dict:
    """A torch optimizer state dict (parameters numbered) keyed by parameter names instead, the form
    set_state_dict takes. Numbers map to this optimizer's parameters in order, as Optimizer.load_state_dict does."""
    names = {id(p): name for name, p in model.named_parameters()}
    ours = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    theirs = list(chain.from_iterable(group["params"] for group in saved["param_groups"]))
    if len(ours) != len(theirs) or len(optimizer.param_groups) != len(saved["param_groups"]):
        raise CheckpointError(f"{ckpt / 'optimizer.pt'} has {len(theirs)} parameters in "
                              f"{len(saved['param_groups'])} groups; this optimizer {len(ours)} in "
                              f"{len(optimizer.param_groups)}")
    name_of = dict(zip(theirs, ours, strict=True))
    return {"state": {name_of[i]: s for i, s in saved["state"].items()},
            "param_groups": [{**g, "params": [name_of[i] for i in g["params"]]} for g in saved["param_groups"]]}


def _restore_rng(ckpt: Path, rank: int) -> None:
    """This rank's RNG states. A rank the checkpoint has none for (the run had fewer processes) is seeded from
    rank 0's saved torch state and its rank, so resuming stays deterministic."""
    own = ckpt / f"rng_rank{rank}.pt"
    if own.is_file():
        _set_rng_state(torch.load(own, weights_only=True))
        return
    first = ckpt / "rng_rank0.pt"
    if not first.is_file():
        return
    generator = torch.Generator()
    generator.set_state(torch.load(first, weights_only=True)["torch"])
    seed = int(torch.randint(0, 2**31, (1,), generator=generator)) + rank
    torch.manual_seed(seed)  # CUDA devices too
    random.seed(seed)
    np.random.seed(seed)


def find(path: str | os.PathLike, warn=print, required: bool = True) -> Path | None:
    """The checkpoint `path` names, verified: a checkpoint directory itself, or a run (or stage) directory's newest
    checkpoint whose files match their checksums (damaged ones are named to `warn` and skipped).

    Where there is none, CheckpointError says why; with required=False, None instead (a damaged checkpoint
    directory still raises).
    """
    path = Path(path)
    if (path / "manifest.json").is_file():
        problem = verify(path)
        if problem:
            raise CheckpointError(f"checkpoint {path} is damaged: {problem}")
        return path
    for ckpt in reversed(list_checkpoints(path)):
        problem = verify(ckpt)
        if problem is None:
            return ckpt
        warn(f"checkpoint {ckpt} is damaged ({problem}); trying the previous one")
    if not required:
        return None
    if layout.checkpoints_dir(path).is_dir():
        raise CheckpointError(f"{path} has no complete, undamaged checkpoint")
    raise CheckpointError(f"{path} is neither a run directory nor a checkpoint directory")


def describe(path: str | os.PathLike) -> tuple[ModelConfig, Path]:
    """A run, a checkpoint or a Hugging Face folder without reading its weights: its model configuration and the
    path of its tokenizer.json."""
    if is_hf_folder(path):
        return read_config(path), layout.tokenizer_file(Path(path))
    ckpt = find(path)
    return load_recipe_of(ckpt).model, layout.tokenizer_file(ckpt)


def load_recipe_of(ckpt: Path) -> Recipe:
    path = layout.recipe_file(ckpt)
    return recipe_from_dict(yaml.safe_load(path.read_text()), source=str(path),
                            check_paths=False)


def stage_of(path: str | os.PathLike, warn=print) -> str:
    """The kind of stage (one of STAGES) that wrote a run's newest checkpoint or the given checkpoint."""
    ckpt = find(path, warn=warn)
    return _recorded_stage(ckpt, load_recipe_of(ckpt))


def _recorded_stage(ckpt: Path, recipe: Recipe) -> str:
    state_file = ckpt / "trainer_state.json"  # weights-only checkpoints (save_weights) have none
    stage = json.loads(state_file.read_text()).get("stage") if state_file.is_file() else None
    return stage or stage_by_name(recipe)


def stage_by_name(recipe: Recipe) -> str:
    """The stage kind for what records none: checkpoints written before the trainer recorded it, weights-only ones and
    Hugging Face folders. Post-training stages named their runs <run>-sft and <run>-dpo (posttrain.setup_stage), and
    continued pretraining started from train.init_from; a run merely named so is misread, which is why the kind is
    recorded now."""
    for kind in POST_TRAINED:
        if recipe.run.name.endswith(f"-{kind}"):
            return kind
    return "continued" if recipe.train.init_from else "pretrain"


def _adapted(ckpt: Path, record: dict, device: str, warn, merge_adapters: bool) -> Transformer:
    """The base an adapter checkpoint names (its checkpoint, else the path it was given as), verified by digest,
    with the checkpoint's adapters."""
    base = record["base"]
    source = base["checkpoint"] if Path(base["checkpoint"]).exists() else base["path"]
    if not Path(source).exists():
        raise CheckpointError(f"{ckpt} holds LoRA adapters for the base model {base['checkpoint']}, which is gone "
                              f"(and {base['path']} too); put the base back to use them")
    model = load(source, device, warn=warn).model
    if lora.weights_digest(model.state_dict()) != base["digest"]:
        raise CheckpointError(f"{ckpt} holds LoRA adapters trained on other weights than {source} now has (it "
                              "changed since): they fit only the base they were trained on; restore it")
    lora.add_adapters(model, LoRAConfig(**record["lora"]), base, tokens=record.get("trainable_tokens"))
    lora.load_adapter_state(model, load_file(ckpt / "model.safetensors", device=str(device)), str(ckpt))
    return lora.merge(model) if merge_adapters else model


def load_weights(ckpt: Path, model: torch.nn.Module) -> None:
    """Load a checkpoint's weights into an unwrapped model, from safetensors or from DCP shards."""
    if (ckpt / "model.safetensors").is_file():
        model.load_state_dict(load_file(ckpt / "model.safetensors", device=str(next(model.parameters()).device)))
        return
    import torch.distributed.checkpoint as dcp

    bundle = {"model": model.state_dict()}
    with warnings.catch_warnings():  # DCP warns that it loads in one process, which is what we ask of it
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        warnings.filterwarnings("ignore", message="torch.distributed is unavailable")
        dcp.load(bundle, checkpoint_id=str(ckpt / "dcp"))
    model.load_state_dict(bundle["model"])


@dataclass(frozen=True)
class Loaded:
    model: Transformer  # in eval mode
    tokenizer: Tokenizer
    recipe: Recipe
    stage: str  # one of STAGES: what trained it

    @property
    def post_trained(self) -> bool:
        """Trained on chat-formatted conversations (SFT, DPO): prompt it through its chat template."""
        return self.stage in POST_TRAINED

    def chat_template(self, spec: str | None = None) -> ChatTemplate:
        """The chat template it was trained with (its recipe's tokenizer.chat_template), or the one `spec` names."""
        return ChatTemplate.get(spec or self.recipe.tokenizer.chat_template)


def load(path: str | os.PathLike, device: str = "cpu", dtype: torch.dtype | None = None, warn=print,
         merge_adapters: bool = True) -> Loaded:
    """A run directory (its newest good checkpoint), a checkpoint directory or a Hugging Face folder. A checkpoint
    trained with LoRA is its base (loaded the same way, and checked against the digest it recorded) with the
    adapters merged in, or with `merge_adapters=False` kept apart (model/lora.py; the PEFT export)."""
    if is_hf_folder(path):
        model, tokenizer, recipe = imported_recipe(Path(path))
        stage = stage_by_name(recipe)
    else:
        ckpt = find(path, warn=warn)
        recipe = load_recipe_of(ckpt)
        record = lora.read_record(ckpt)
        if record is None:
            model = Transformer.build(recipe.model, device)
            load_weights(ckpt, model)
        else:
            model = _adapted(ckpt, record, device, warn, merge_adapters)
        tokenizer = Tokenizer.load(layout.tokenizer_file(ckpt))
        stage = _recorded_stage(ckpt, recipe)
    model.reset_rope()
    model = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    if dtype is not None:
        model.reset_rope()  # rotary tables stay fp32 whatever the weights are
    return Loaded(model.eval(), tokenizer, recipe, stage)

