"""Checkpoints: one directory per step, written under a temporary name and renamed when complete.

    <run>/checkpoints/step_00000060/
        model.safetensors      weights (one process or DDP)   | dcp/   sharded model + optimizer (FSDP2)
        optimizer.pt           AdamW state (torch.save; loaded with weights_only=True)
        rng_rank<r>.pt         every rank's RNG states
        trainer_state.json     step, tokens seen, data-loader position, non-finite streak, lr, wall time
        recipe.yaml            the resolved recipe
        tokenizer.json         the tokenizer the run uses
        manifest.json          sha256 of every file above (damage is detected before anything is loaded)
    <run>/checkpoints/latest   the name of the newest complete checkpoint
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file

from fermion.atomic import replaced_dir
from fermion.config import Recipe, recipe_from_dict
from fermion.data.tokenizer import Tokenizer
from fermion.train.distributed import DistInfo, barrier

STEP_PREFIX = "step_"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the directory and the problem."""


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_of(ckpt: Path) -> int:
    return int(ckpt.name.removeprefix(STEP_PREFIX))


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint directories, oldest first."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(STEP_PREFIX) and p.name[5:].isdigit()]
    return sorted(found, key=step_of)


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


def save(
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
) -> Path:
    """Write a complete checkpoint atomically and return its directory. Every rank calls this."""
    root = checkpoints_dir(run_dir)
    final = root / f"{STEP_PREFIX}{step:08d}"
    tmp = root / f".{final.name}.tmp"
    if info.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(info)
    if sharded:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp / "dcp"))
    elif info.is_main:
        save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(_rng_state(), tmp / f"rng_rank{info.rank}.pt")
    barrier(info)
    if info.is_main:
        state = {**trainer_state, "step": step, "world_size": info.world_size,
                 "format": "dcp" if sharded else "safetensors"}
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
        (tmp / "recipe.yaml").write_text(recipe.to_yaml())
        Tokenizer.load(tokenizer_path).save(tmp / "tokenizer.json")  # with its tokenizer_config.json, if any
        manifest = {"step": step, "files": {str(p.relative_to(tmp)): _sha256(p) for p in _files(tmp)}}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _write_latest(root, final.name)
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier(info)
    return final


def save_weights(model: torch.nn.Module, recipe: Recipe, tokenizer: Tokenizer, out: Path) -> Path:
    """A weights-only checkpoint (no optimizer or trainer state): what `fermion import` writes and `init_from` reads.

    It has the same layout and manifest as a training checkpoint, so every command that takes one takes this too.
    """
    out = Path(out)
    with replaced_dir(out, "manifest.json", CheckpointError, "a checkpoint") as tmp:
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        save_file(state, tmp / "model.safetensors")
        (tmp / "recipe.yaml").write_text(recipe.to_yaml())
        tokenizer.save(tmp / "tokenizer.json")
        manifest = {"step": 0, "files": {str(p.relative_to(tmp)): _sha256(p) for p in _files(tmp)}}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return out


def _write_latest(root: Path, name: str) -> None:
    tmp = root / "latest.tmp"
    tmp.write_text(name + "\n")
    os.replace(tmp, root / "latest")


# ------------------------------------------------------------------------------------------------------ loading


def newest_good(run_dir: Path, warn=print) -> Path | None:
    """The newest checkpoint whose files match their checksums; damaged ones are named and skipped."""
    for ckpt in reversed(list_checkpoints(run_dir)):
        problem = verify(ckpt)
        if problem is None:
            return ckpt
        warn(f"checkpoint {ckpt} is damaged ({problem}); trying the previous one")
    return None


def load_training(ckpt: Path, model, optimizer, info: DistInfo, sharded: bool) -> dict:
    """Restore model, optimizer and this rank's RNG in place; return the trainer state."""
    state = json.loads((ckpt / "trainer_state.json").read_text())
    if sharded != (state["format"] == "dcp") or (sharded and state["world_size"] != info.world_size):
        raise CheckpointError(
            f"{ckpt} was written by a {state['world_size']}-process {state['format']} run; resume it with the "
            f"same world size and train.distributed setting"
        )
    if sharded:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_state, optim_state = get_state_dict(model, optimizer)
        bundle = {"model": model_state, "optim": optim_state}
        dcp.load(bundle, checkpoint_id=str(ckpt / "dcp"))
        set_state_dict(model, optimizer, model_state_dict=bundle["model"], optim_state_dict=bundle["optim"])
    else:
        model.load_state_dict(load_file(ckpt / "model.safetensors", device=str(info.device)))
        optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True, map_location=info.device))
    rng_file = ckpt / f"rng_rank{info.rank}.pt"
    if rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=True))
    return state


def resolve(path: str | os.PathLike, warn=print) -> Path:
    """A run directory (its newest good checkpoint) or a checkpoint directory, verified."""
    path = Path(path)
    if (path / "manifest.json").is_file():
        problem = verify(path)
        if problem:
            raise CheckpointError(f"checkpoint {path} is damaged: {problem}")
        return path
    if checkpoints_dir(path).is_dir():
        found = newest_good(path, warn)
        if found is None:
            raise CheckpointError(f"{path} has no complete, undamaged checkpoint")
        return found
    raise CheckpointError(f"{path} is neither a run directory nor a checkpoint directory")


def load_recipe_of(ckpt: Path) -> Recipe:
    return recipe_from_dict(yaml.safe_load((ckpt / "recipe.yaml").read_text()), source=str(ckpt / "recipe.yaml"),
                            check_paths=False)


def load_weights(ckpt: Path, model: torch.nn.Module) -> None:
    """Load a checkpoint's weights into an unwrapped model, from safetensors or from DCP shards."""
    if (ckpt / "model.safetensors").is_file():
        model.load_state_dict(load_file(ckpt / "model.safetensors", device=str(next(model.parameters()).device)))
        return
    import torch.distributed.checkpoint as dcp

    bundle = {"model": model.state_dict()}
    with warnings.catch_warnings():  # DCP warns that it loads in one process, which is what we ask of it
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(bundle, checkpoint_id=str(ckpt / "dcp"))
    model.load_state_dict(bundle["model"])
