"""Where training metrics go: metrics.jsonl (always), TensorBoard, W&B (when installed and enabled), and a rich
progress bar. Only rank 0 logs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from fermion import layout

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


class MetricsLogger:
    def __init__(self, run_dir: Path, resume_step: int, tensorboard: bool, wandb: bool, recipe_dict: dict,
                 console: Console):
        self.path = layout.metrics_file(run_dir)
        self._truncate_after(resume_step)
        self.console = console
        self.tb = self._tensorboard(run_dir) if tensorboard else None
        self.wandb = self._wandb(recipe_dict, run_dir) if wandb else None

    def _truncate_after(self, step: int) -> None:
        """Drop records past the step we resume from: a crashed run may have logged steps that will be redone."""
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

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
        with open(self.path, "a") as f:
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
