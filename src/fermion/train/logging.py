"""Where training metrics go: metrics.jsonl (always), TensorBoard, W&B (when installed and enabled), and a rich
progress bar. Only rank 0 logs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from fermion import layout
from fermion.atomic import replaced_file, storage_errors
from fermion.errors import DamagedFileError

# Dense bf16 tensor-core peaks (FLOP/s) per device, from the vendors' data sheets; used for MFU.
PEAK_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "A10G": 125e12,
    "L40S": 362e12,
    "L4": 121e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
    "V100": 125e12,
}


def peak_flops(device_name: str | None) -> float | None:
    if not device_name:
        return None
    for key, value in PEAK_FLOPS.items():
        if key in device_name:
            return value
    return None


def read_metrics(path: Path, warn=print) -> list[dict]:
    """The records of a metrics.jsonl, in order: the one reader of the file.

    A last line that does not parse (or is no record) is a write cut short by a crash or power loss: it is left out
    and named to `warn`. A bad line before the last is damage no interrupted append leaves: DamagedFileError names
    it."""
    lines = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()
    last = max((number for number, line in enumerate(lines, start=1) if line.strip()), default=0)
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        record = _record(line)
        if record is not None:
            records.append(record)
        elif number == last:
            warn(f"{path}:{number}: dropped its last line, cut short by an interrupted write: {line[:60]!r}")
        else:
            raise DamagedFileError(
                f"{path}:{number}: not a metrics record ({line[:60]!r}), and not the last line, so not an interrupted "
                "write: the file is damaged. Delete that line (or the file: it only holds the logged curves) and "
                "run again")
    return records


def _record(line: str) -> dict | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) and isinstance(record.get("step"), int) else None


class MetricsLogger:
    def __init__(self, run_dir: Path, resume_step: int, tensorboard: bool, wandb: bool, recipe_dict: dict,
                 console: Console):
        self.path = layout.metrics_file(run_dir)
        self.console = console
        self._truncate_after(resume_step)
        self.tb = self._tensorboard(run_dir) if tensorboard else None
        self.wandb = self._wandb(recipe_dict, run_dir) if wandb else None

    def _truncate_after(self, step: int) -> None:
        """Drop records past the step we resume from (a crashed run may have logged steps that will be redone) and
        a torn last line, rewriting the file whole or not at all, so appending goes on after a complete line."""
        if not self.path.exists():
            return
        warn = lambda message: self.console.print(f"[yellow]warning:[/] {escape(message)}")  # noqa: E731
        kept = [record for record in read_metrics(self.path, warn) if record["step"] <= step]
        with replaced_file(self.path) as tmp:
            tmp.write_text("".join(json.dumps(record) + "\n" for record in kept))

    @staticmethod
    def _tensorboard(run_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(log_dir=str(layout.tensorboard_dir(run_dir)))

    def _wandb(self, recipe_dict: dict, run_dir: Path):
        try:
            import wandb
        except ImportError:
            self.console.print("[yellow]train.wandb is on but wandb is not installed; logging locally only[/]")
            return None
        name = recipe_dict["run"]["name"]
        return wandb.init(project="fermion", name=name, id=name, resume="allow", config=recipe_dict,
                          dir=str(run_dir))

    def log(self, record: dict) -> None:
        with storage_errors(self.path), open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        step = record["step"]
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and self.tb is not None:
                self.tb.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def make_progress(console: Console, enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[stats]}"),
        TimeRemainingColumn(),
        console=console,
        disable=not enabled or not sys.stdout.isatty(),
    )


def format_stats(record: dict) -> str:
    parts = [f"loss {record['loss']:.4f}", f"lr {record['lr']:.2e}", f"{record['tokens_per_s']:,.0f} tok/s"]
    if record.get("mfu") is not None:
        parts.append(f"MFU {100 * record['mfu']:.1f}%")
    return " · ".join(parts)
