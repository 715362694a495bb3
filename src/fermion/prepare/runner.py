"""Running a plan: each stage on the executor the recipe names, stage after stage, each source's documents accounted
for after every pass, and the report written last.

Re-running skips every task that datatrove marked complete. A failed or interrupted run writes no report, so
training never reads its partial output.

The same recipe runs on datatrove's Slurm or Ray executor with `data.prepare.executor`, `executor_options` being
the executor's keyword arguments (partition and time are required for Slurm). Slurm jobs are submitted, chained
stage after stage, and the command returns: run it again once they have all finished (not before: datatrove would
submit the unfinished tasks a second time) to write the report, the tokenizer and the shards. Ray runs in the
command, on the cluster RAY_ADDRESS names or else a local one; its logs dir must be on storage all nodes share.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from datatrove.executor import LocalPipelineExecutor
from datatrove.executor.base import PipelineExecutor
from datatrove.pipeline.base import PipelineStep
from datatrove.utils.logging import logger, setup_default_logger
from rich.console import Console

from fermion.config import PrepareConfig, Recipe, RecipeError
from fermion.data.sources import DataError
from fermion.prepare.plan import Plan, Stage, check_plan, make_plan, plan_stages, write_input_lists
from fermion.prepare.report import SourceAccount, add_tallies, build_report, write_report

# ---------------------------------------------------------------------------------------------------- executors


class _Discard(io.TextIOBase):
    def write(self, text: str) -> int:
        return len(text)


DISCARD = _Discard()


class QuietLocalExecutor(LocalPipelineExecutor):
    """datatrove's local executor, minus the copy of every task's log and stats it prints to stderr (each task's
    log is still written to logs/<stage>/logs/, and fermion prints its own summary)."""

    def _run_for_rank(self, rank: int, local_rank: int = 0, node_rank: int = -1):
        with contextlib.redirect_stderr(DISCARD):  # datatrove adds a sink on sys.stderr as each task starts
            return super()._run_for_rank(rank, local_rank, node_rank)


@contextlib.contextmanager
def _quiet_datatrove() -> Iterator[None]:
    """Also silence the executor's own messages in this process; datatrove's default logger comes back after."""
    with contextlib.redirect_stderr(DISCARD):
        logger.remove()
        logger.add(sys.stderr)
        try:
            yield
        finally:
            logger.remove()
    setup_default_logger()


def make_executor(settings: PrepareConfig, name: str, pipeline: list[PipelineStep], tasks: int, logging_dir: Path,
                  depends: PipelineExecutor | None) -> PipelineExecutor:
    """The executor the recipe asks for, given data.prepare.executor_options as keyword arguments."""
    from datatrove.executor import RayPipelineExecutor, SlurmPipelineExecutor

    options = dict(settings.executor_options)
    if settings.executor == "local":
        executor_class = QuietLocalExecutor
        options = {"workers": min(tasks, settings.workers or os.cpu_count() or 1), **options}
    elif settings.executor == "slurm":
        executor_class = SlurmPipelineExecutor
        options = {"job_name": f"fermion-{name}", **options}
    else:
        executor_class = RayPipelineExecutor
    try:
        return executor_class(pipeline, tasks=tasks, logging_dir=str(logging_dir), depends=depends, **options)
    except TypeError as err:
        raise RecipeError(f"data.prepare.executor_options: not accepted by datatrove's {executor_class.__name__} "
                          f"({err})") from None


def build_stages(plan: Plan, strict: bool) -> list[Stage]:
    """Every stage of the plan, each executor depending on the one before (Slurm chains the jobs that way)."""
    stages, previous = plan_stages(plan, strict), None
    for stage in stages:
        stage.executor = make_executor(plan.settings, stage.name, stage.pipeline, stage.tasks,
                                       plan.root / "logs" / stage.name, previous)
        previous = stage.executor
    return stages


# ------------------------------------------------------------------------------------------------------ running


def run(recipe: Recipe, console: Console, strict: bool = False) -> dict | None:
    """Run the pipeline (skipping finished tasks), write the report and return it; None when the work was handed
    to Slurm."""
    plan = make_plan(recipe)
    check_plan(plan)
    write_input_lists(plan)
    stages = build_stages(plan, strict)
    pending = sum(len(stage.executor.get_incomplete_ranks()) for stage in stages)
    total = sum(stage.executor.world_size for stage in stages)
    console.print(f"prepare: {len(stages)} stages, {total:,} tasks ({total - pending:,} done before) on the "
                  f"{plan.settings.executor} executor -> {plan.root}")
    accounts = _run_stages(plan, stages, console)
    if accounts is None:
        return None
    if strict:  # bad records counted by an earlier run without --strict
        for account in accounts.values():
            account.check_no_problems()
    report = build_report(plan, accounts)
    write_report(plan, report)
    return report


def _run_stages(plan: Plan, stages: list[Stage], console: Console) -> dict[str, SourceAccount] | None:
    """Run the stages in order and account for each source's documents; None while Slurm jobs are unfinished."""
    queued = plan.settings.executor == "slurm"  # Slurm only queues the jobs: they are counted once all are done
    accounts = {source.name: SourceAccount(source) for source in plan.sources}
    for stage in stages:
        _run_stage(stage, plan.settings, console)
        if not queued:
            add_tallies(stage, accounts)  # before the next stage: a source left with nothing stops the run here
    if not queued:
        return accounts
    if any(stage.executor.get_incomplete_ranks() for stage in stages):
        console.print("Slurm jobs submitted; run this command again once they have finished to write the report, "
                      f"the tokenizer and the shards (logs: {plan.root / 'logs'})")
        return None
    for stage in stages:
        add_tallies(stage, accounts)
    return accounts


def _run_stage(stage: Stage, settings: PrepareConfig, console: Console) -> None:
    pending = len(stage.executor.get_incomplete_ranks())
    start = time.perf_counter()
    quiet = _quiet_datatrove() if settings.executor == "local" else contextlib.nullcontext()
    try:
        with quiet:
            stage.executor.run()
    except (DataError, RecipeError):
        raise
    except Exception as err:  # anything a step raised in a task: one line here, the traceback in the task's log
        raise DataError(f"prepare stage {stage.name} failed ({type(err).__name__}: {err}); task logs are in "
                        f"{stage.logging_dir / 'logs'}") from err
    done = f"{time.perf_counter() - start:.1f} s" if pending else "done before"
    console.print(f"  {stage.name}: {stage.executor.world_size} task(s), {done}")
