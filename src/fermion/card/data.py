"""The card's data: the sources each stage trained on, tokens per source from the shard index, the filtering
counts of `fermion prepare`, the SFT/DPO/RL record counts and RL's rewards."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from fermion import layout
from fermion.card.markdown import number, table
from fermion.card.records import StageRecord
from fermion.config import Recipe


def source_label(source) -> str:
    if source.dataset:
        return source.dataset + (f" ({source.subset})" if source.subset else "")
    if source.builtin:
        return source.builtin
    return ", ".join(source.paths) or source.name


def dataset_names(sources) -> list[str]:
    """The card metadata's datasets, one entry each: a Hub dataset's id, each file or glob of a local source, a
    builtin's name."""
    names = []
    for source in sources:
        names += [source.dataset] if source.dataset else [source.builtin] if source.builtin else source.paths
    return list(dict.fromkeys(names))


def data_section(stages: list[StageRecord]) -> list[str]:
    lines = ["## Data", ""]
    for stage in stages:
        if stage.kind == "pretrain":
            lines += _pretraining_data(stage)
        else:
            lines += _post_training_data(stage)
    return lines


def _pretraining_data(stage: StageRecord) -> list[str]:
    """The mix of the base run or of a continued stage: tokens per source from its shard index, and filtering."""
    title = "Pretraining mix" if stage.name == "pretrain" else f"Continued pretraining: {stage.name}"
    lines = [f"### {title}", ""]
    if stage.data is None:
        return [*lines, "Not recorded: the recipe has no data section for this stage.", ""]
    index_path = layout.shard_dir(stage.dir, stage.data) / layout.SHARD_INDEX
    index = json.loads(index_path.read_text()) if index_path.is_file() else None
    rows = []
    for source in stage.data.sources:
        entry = (index or {}).get("sources", {}).get(source.name)
        if entry:
            rows.append([source.name, source_label(source), entry["kind"], f"{entry['weight']:g}",
                         number(entry["train"]["documents"]), number(entry["train"]["tokens"]),
                         number(entry["val"]["tokens"])])
        else:
            rows.append([source.name, source_label(source), source.kind, f"{source.weight:g}",
                         "not recorded", "not recorded", "not recorded"])
    lines += table(["source", "from", "kind", "weight", "train documents", "train tokens", "val tokens"], rows)
    if index:
        lines += ["", f"Total: {number(index['splits']['train']['tokens'])} train tokens, "
                      f"{number(index['splits']['val']['tokens'])} validation tokens (`{index_path}`)."]
    else:
        lines += ["", f"No shard index at `{index_path}`: token counts per source are not recorded."]
    heading = "### Filtering" if stage.name == "pretrain" else f"#### Filtering ({stage.name})"
    return [*lines, "", heading, "", *_filtering(stage.dir, stage.recipe), ""]


def _post_training_data(stage: StageRecord) -> list[str]:
    lines = [f"### {stage.name.upper()} data", ""]
    if stage.data is not None:
        lines += [f"Sources: {', '.join(f'{s.name} ({source_label(s)})' for s in stage.data.sources)}.", ""]
    report = stage.report
    if report is None:
        return [*lines, f"No `{layout.report_file(stage.dir)}`: record counts are not recorded.", ""]
    rows = [["records read", number(report["records_read"])], ["records used", number(report["records_used"])]]
    rows += [[f"skipped: {reason}", number(n)] for reason, n in report.get("skipped", {}).items()]
    for key in ("truncated", "train_conversations", "val_conversations", "train_pairs", "val_pairs",
                "train_tokens", "assistant_tokens", "train_prompts", "val_prompts", "rollouts"):
        if isinstance(report.get(key), int):
            rows.append([key.replace("_", " "), number(report[key])])
    lines += [*table(["", "count"], rows), ""]
    return lines + (_rl_rewards(stage, report) if stage.kind == "rl" else [])


def _rl_rewards(stage: StageRecord, report: dict) -> list[str]:
    """What RL did to the rewards: the verifiers and settings (report.json), the mean reward of the first and last
    rollout batches, and the held-out prompts' greedy reward and SFT loss on their reference answers before and after
    (metrics.jsonl)."""
    settings = (f"Verifiers {', '.join(f'{n} ×{w:g}' for n, w in report.get('verifiers', {}).items())}; "
                f"{report.get('prompts_per_step')} prompts × {report.get('group_size')} completions per rollout "
                f"batch, loss {report.get('loss_type')}, beta {report.get('beta')}, {report.get('iterations')} "
                f"iteration(s) per batch" + (f", tools {', '.join(report['tools'])}" if report.get("tools") else ""))
    train = [r for r in stage.metrics if isinstance(r.get("reward"), (int, float))]
    val = [r for r in stage.metrics if isinstance(r.get("val_reward"), (int, float))]
    rows = []
    if train:
        rows.append(["mean reward of the rollouts", f"{train[0]['reward']:.3f} (step {number(train[0]['step'])})",
                     f"{train[-1]['reward']:.3f} (step {number(train[-1]['step'])})"])
    if val:
        rows.append(["held-out prompts, greedy", f"{val[-1]['val_reward_start']:.3f} (start)",
                     f"{val[-1]['val_reward']:.3f} (step {number(val[-1]['step'])})"])
        if "val_reference_nll" in val[-1]:
            rows.append(["SFT loss on their reference answers", f"{val[-1]['val_reference_nll_start']:.3f} (start)",
                         f"{val[-1]['val_reference_nll']:.3f} (step {number(val[-1]['step'])})"])
    if not rows:
        return ["#### RL rewards", "", settings + ".", "", "Rewards not recorded: no metrics.jsonl.", ""]
    return ["#### RL rewards", "", settings + ".", "", *table(["", "first", "last"], rows), ""]


def _filtering(run_dir: Path, recipe: Recipe) -> list[str]:
    if recipe.data.prepare is None:
        return ["No filtering: the recipe has no `data.prepare` section, so the sources were tokenized as read "
                "(no per-source filtering counts exist)."]
    from fermion.prepare import plan_id

    base = layout.prepared_dir(run_dir, recipe.data)
    path = base / plan_id(recipe) / layout.PREPARE_REPORT
    if not path.is_file():
        found = sorted(base.glob(f"*/{layout.PREPARE_REPORT}"))
        if len(found) != 1:
            return [f"Not recorded: no `fermion prepare` report at `{path}`."]
        path = found[0]
    report = json.loads(path.read_text())
    rows = []
    for name, source in report["sources"].items():
        removed = Counter()
        for step in source.get("steps", []):
            removed[step["step"]] += step["documents_in"] - step["documents_out"]
        dropped = ", ".join(f"{step} {number(n)}" for step, n in removed.items() if n) or "none"
        kept_tokens = source["kept"].get("tokens")
        rows.append([name, number(source["read"]["documents"]), number(source["kept"]["documents"]),
                     number(kept_tokens) if kept_tokens is not None else "not recorded", dropped])
    return [*table(["source", "documents read", "documents kept", "tokens kept", "removed by step"], rows), "",
            f"From `{path}`."]
