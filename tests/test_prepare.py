"""`fermion prepare`: the datatrove pipeline on a corpus of real text with planted problems.

The web source is TinyStories narration (stories without dialogue: the rules keep such prose, while quoted speech
sits near the edge of Gopher's alphabetic-words rule and C4's end-punctuation rule) with planted exact duplicates,
near-duplicates, spam, copies of benchmark questions and bad lines. The code source is real standard-library
modules plus one that says it was generated and one minified line. Each planted group must leave at the step
meant for it, and exactly the real documents must stay.
"""

import gzip
import io
import itertools
import json
import os
import re
import shutil
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from conftest import SHAKESPEARE, SHARED_DATA, TINY, cli, tiny_model
from datatrove.executor import RayPipelineExecutor, SlurmPipelineExecutor
from rich.console import Console

from fermion import prepare as preparation
from fermion.checkpoint import save_weights
from fermion.config import Recipe, RecipeError, load_recipe, recipe_from_dict
from fermion.config.prepare import LengthRules
from fermion.data.shards import ShardSet, load_index
from fermion.data.sources import DataError
from fermion.data.tokenizer import Tokenizer
from fermion.train.pretrain import tokenize_data, train_tokenizer, training_data

STORIES = SHARED_DATA / "pretrain" / "tinystories" / "tinystories_train_sample_2MiB.txt"
EVAL = SHARED_DATA / "eval"
REAL_STORIES = 24
CODE_MODULES = ["bisect.py", "colorsys.py", "fnmatch.py", "glob.py"]
FAST = {"workers": 1, "exact_dedup": False, "minhash": False, "decontaminate": False}  # for the bad-input runs


def narration(count: int, skip: int = 0) -> list[str]:
    """TinyStories stories of at least 150 words with no quoted speech, in file order."""
    if not STORIES.is_file():
        pytest.skip(f"{STORIES} is missing")
    stories = STORIES.read_text(encoding="utf-8").split("<|endoftext|>")
    chosen = (s.strip() for s in stories if len(s.split()) >= 150 and not any(q in s for q in '"“”'))
    return list(itertools.islice(chosen, skip, skip + count))


def with_words_changed(text: str, positions=(20, 60, 100), word: str = "purple") -> str:
    """The text with a few words replaced: a near-duplicate."""
    words = list(re.finditer(r"[a-z]+", text))
    for position in sorted(positions, reverse=True):
        match = words[position]
        text = text[: match.start()] + word + text[match.end():]
    return text


def spam() -> list[str]:
    """Boilerplate: a line repeated, a paragraph repeated, and two link farms (the same few phrases over and over)."""
    brands, offers = ["Rolex", "Omega", "Seiko", "Casio", "Tissot", "Breitling"], ["watches", "replica", "outlet"]
    link_farm = [f"Cheap {b} {o} | Buy {b} online | {o.title()} {b} shop | Login | Cart"
                 for b, o in itertools.product(brands, offers)]
    numbered = [f"{b} {o} {n} | {b} {o} deals {n} | home | sitemap"
                for n, (b, o) in enumerate(itertools.product(brands, offers))]
    return ["\n".join(["Click here to win a free phone! Limited offer, act now."] * 25),
            "\n\n".join(["Buy cheap watches online today. Best prices guaranteed, free shipping on every order."] * 12),
            "\n".join(link_farm), "\n".join(numbered)]


def benchmark_copies(stories: list[str]) -> list[str]:
    """Stories with a GSM8K or ARC question pasted in after their first line."""
    with open(EVAL / "gsm8k" / "train.jsonl", encoding="utf-8") as lines:
        questions = [json.loads(line)["question"] for line in itertools.islice(lines, 2)]
    with open(EVAL / "arc" / "ARC-Easy-Dev.jsonl", encoding="utf-8") as lines:
        stems = (json.loads(line)["question"]["stem"] for line in lines)
        questions.append(next(stem for stem in stems if len(stem.split()) >= 18))
    return [story.replace("\n", f"\n{question}\n", 1) for question, story in zip(questions, stories, strict=True)]


@dataclass
class Corpus:
    folder: Path
    lines: dict[str, list[int]]  # group -> line numbers in web.jsonl
    near_pairs: list[tuple[int, int]]  # (original, near-duplicate) line numbers

    @property
    def web(self) -> Path:
        return self.folder / "web.jsonl"

    @property
    def code(self) -> Path:
        return self.folder / "code.jsonl"


def write_web(folder: Path) -> Corpus:
    real = narration(REAL_STORIES)
    by_length = sorted(range(REAL_STORIES), key=lambda i: -len(real[i].split()))
    near_of, exact_of = by_length[:4], by_length[4:8]  # the longest stories are the surest near-duplicates
    planted = {
        "exact": [real[exact_of[0]], real[exact_of[1]].replace(" ", "  ", 5), real[exact_of[2]].lower(),
                  real[exact_of[3]]],
        "near": [with_words_changed(real[i]) for i in near_of],
        "spam": spam(),
        "contaminated": benchmark_copies(narration(3, skip=REAL_STORIES)),
    }
    lines = [json.dumps({"text": text}).encode() for text in real]
    lines[4:4] = [b"{not json"]  # line 5
    lines[11:11] = [b'{"text": "unterminated']  # line 12
    groups = {"real": [n for n in range(1, len(lines) + 1) if n not in (5, 12)]}
    for group, texts in planted.items():
        groups[group] = list(range(len(lines) + 1, len(lines) + 1 + len(texts)))
        lines += [json.dumps({"text": text}).encode() for text in texts]
    lines.append(b'{"text": "caf\xe9 au lait"}')  # Latin-1, not UTF-8
    groups["not_utf8"] = [len(lines)]
    (folder / "web.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    near_pairs = [(groups["real"][i], line) for i, line in zip(near_of, groups["near"], strict=True)]
    return Corpus(folder, groups, near_pairs)


def write_code(path: Path) -> None:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    modules = [(stdlib / name).read_text(encoding="utf-8") for name in [*CODE_MODULES, "keyword.py"]]
    minified = "var a=" + ",".join(f"f{i}=function(x){{return x*{i}}}" for i in range(150)) + ";"
    path.write_text("".join(json.dumps({"content": text}) + "\n" for text in [*modules, minified]), encoding="utf-8")


def write_records(path: Path, texts: list[str], field: str = "text") -> None:
    path.write_text("".join(json.dumps({field: text}) + "\n" for text in texts), encoding="utf-8")


def write_recipe(path: Path, run_dir: Path, sources: list[dict], **prepare) -> Path:
    recipe = {"run": {"dir": str(run_dir)}, "tokenizer": {"vocab_size": 512},
              "model": {"vocab_size": 512, "d_model": 64, "n_layers": 1, "n_heads": 4, "ffn_hidden": 128},
              "data": {"sources": sources, "val_fraction": 0.1, "num_workers": 1, "prepare": prepare}}
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Corpus:
    folder = tmp_path_factory.mktemp("corpus")
    corpus = write_web(folder)
    write_code(corpus.code)
    return corpus


@pytest.fixture(scope="module")
def recipe_path(corpus) -> Path:
    sources = [{"name": "web", "paths": [str(corpus.web)]},
               {"name": "code", "kind": "code", "weight": 0.5, "paths": [str(corpus.code)], "text_field": "content"}]
    return write_recipe(corpus.folder / "recipe.yaml", corpus.folder / "run", sources, workers=1)


@pytest.fixture(scope="module")
def prepared(recipe_path):
    """`fermion prepare` with every default step but perplexity (decontamination reads ../shared/data/eval)."""
    result = cli("prepare", str(recipe_path))
    assert result.returncode == 0, result.stderr
    plan = preparation.make_plan(load_recipe(recipe_path))
    report = json.loads((plan.root / preparation.REPORT_NAME).read_text())
    return result, report, plan


def records(folder: Path) -> list[dict]:
    return [json.loads(line) for path in sorted(folder.glob("*.jsonl.gz")) for line in gzip.open(path)]


def line_numbers(folder: Path) -> set[int]:
    return {int(record["id"].rsplit(":", 1)[1]) for record in records(folder)}


def removed(report: dict, source: str) -> dict[str, dict[str, int]]:
    return {row["step"]: row["removed"] for row in report["sources"][source]["steps"]}


def test_each_planted_group_leaves_at_the_step_meant_for_it(prepared, corpus):
    _, report, plan = prepared
    assert removed(report, "web") == {
        "normalize": {}, "gopher_repetition": {"dup_line_frac": 1, "dup_para_frac": 1, "top_4_gram": 2},
        "gopher_quality": {}, "c4": {}, "fineweb": {}, "exact_dedup": {"duplicate": 4},
        "minhash": {"near_duplicate": 4}, "decontaminate": {"contaminated": 3}}
    excluded = plan.root / "excluded"
    assert line_numbers(excluded / "gopher_repetition" / "web") == set(corpus.lines["spam"])
    assert line_numbers(excluded / "exact_dedup" / "web") == set(corpus.lines["exact"])  # the first copy stays
    minhash_removed = line_numbers(excluded / "minhash" / "web")
    assert all(len(minhash_removed & set(pair)) == 1 for pair in corpus.near_pairs)
    assert line_numbers(excluded / "decontaminate" / "web") == set(corpus.lines["contaminated"])


def test_exactly_the_real_documents_are_kept(prepared, corpus):
    _, report, plan = prepared
    kept = line_numbers(plan.kept_dir("web"))
    stand_ins = {original: variant for original, variant in corpus.near_pairs if variant in kept}
    assert kept == {stand_ins.get(line, line) for line in corpus.lines["real"]}
    bad_lines = 3  # two not JSON, one not UTF-8
    assert report["sources"]["web"]["read"]["documents"] == len(corpus.web.read_bytes().splitlines()) - bad_lines
    assert report["sources"]["web"]["kept"]["documents"] == REAL_STORIES == len(kept)


def test_code_rules_apply_to_code_sources_only(prepared):
    _, report, plan = prepared
    assert removed(report, "code") == {"normalize": {}, "code": {"autogenerated": 1, "line_too_long": 1},
                                       "exact_dedup": {}, "minhash": {}, "decontaminate": {}}
    assert "code" not in removed(report, "web")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    kept = sorted(record["text"] for record in records(plan.kept_dir("code")))
    assert kept == sorted((stdlib / name).read_text(encoding="utf-8") for name in CODE_MODULES)


def test_bad_lines_are_counted_with_their_line_numbers(prepared, corpus):
    _, report, _ = prepared
    web = str(corpus.web)
    assert report["sources"]["web"]["problems"] == {
        "not valid JSON": {"count": 2, "first": [f"{web}:5", f"{web}:12"]},
        "not valid UTF-8": {"count": 1, "first": [f"{web}:{corpus.lines['not_utf8'][0]}"]},
    }


def test_shards_hold_the_tokenizers_count_of_the_kept_documents(prepared, recipe_path):
    _, report, plan = prepared
    recipe = load_recipe(recipe_path)
    tokenizer = Tokenizer.load(recipe.run_dir / "tokenizer.json")
    index = load_index(recipe.run_dir / "data")
    for source in ("web", "code"):
        texts = [record["text"] for record in records(plan.kept_dir(source))]
        expected = sum(len(ids) + 1 for ids in tokenizer.encode_batch(texts))  # + the eos after each document
        shards = index["sources"][source]
        assert shards["train"]["tokens"] + shards["val"]["tokens"] == expected
        assert shards["train"]["documents"] + shards["val"]["documents"] == len(texts)
        assert report["sources"][source]["kept"]["tokens"] == expected
    assert (index["sources"]["code"]["kind"], index["sources"]["code"]["weight"]) == ("code", 0.5)


def test_the_command_prints_the_report_and_inspect_shows_removed_documents(prepared, recipe_path):
    result, _, _ = prepared
    assert all(text in result.stdout for text in ("prepare report", "decontaminate", "contaminated 3", "web.jsonl:5"))
    shown = cli("prepare", str(recipe_path), "--inspect", "decontaminate")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.count("reason: contaminated") == 3 and "contaminated_by: gsm8k" in shown.stdout
    unknown = cli("prepare", str(recipe_path), "--inspect", "gopher")
    assert unknown.returncode == 2 and "not a filtering step" in unknown.stderr and "gopher_quality" in unknown.stderr


def test_a_rerun_skips_all_finished_work(prepared, recipe_path):
    _, report, plan = prepared
    task_logs = {path: path.stat().st_mtime_ns for path in plan.root.glob("logs/*/logs/*.log")}
    tokenizer = load_recipe(recipe_path).run_dir / "tokenizer.json"
    trained = tokenizer.stat().st_mtime_ns
    again = cli("prepare", str(recipe_path))
    assert again.returncode == 0, again.stderr
    stages = [line for line in again.stdout.splitlines() if line.startswith("  ") and "task(s)" in line]
    assert stages and all(line.endswith("done before") for line in stages)
    assert {path: path.stat().st_mtime_ns for path in plan.root.glob("logs/*/logs/*.log")} == task_logs
    assert tokenizer.stat().st_mtime_ns == trained
    assert json.loads((plan.root / preparation.REPORT_NAME).read_text()) == report


def test_a_changed_recipe_prepares_anew_and_retrains_tokenizer_and_shards(prepared, recipe_path, tmp_path):
    """Settings that may change the kept documents get a folder of their own, and the tokenizer and shards follow."""
    _, _, plan = prepared
    shutil.copytree(load_recipe(recipe_path).run_dir, tmp_path / "run")
    moved, length_rule = f"run.dir={tmp_path / 'run'}", "data.prepare.length.min_chars=10"
    before, after = load_recipe(recipe_path, [moved]), load_recipe(recipe_path, [moved, length_rule])
    trained, shards = (before.run_dir / "tokenizer.json").stat().st_mtime_ns, load_index(before.run_dir / "data")
    changed = cli("prepare", str(recipe_path), "--set", moved, "--set", length_rule)
    assert changed.returncode == 0, changed.stderr
    new_plan = preparation.make_plan(after)
    assert new_plan.root != preparation.make_plan(before).root and "(0 done before)" in changed.stdout
    assert (new_plan.root.parent / plan.root.name / preparation.REPORT_NAME).is_file()  # the earlier one stays
    assert (after.run_dir / "tokenizer.json").stat().st_mtime_ns != trained
    assert load_index(after.run_dir / "data")["fingerprint"] != shards["fingerprint"]
    report = json.loads((new_plan.root / preparation.REPORT_NAME).read_text())
    assert report["tokenizer_hash"] == Tokenizer.load(after.run_dir / "tokenizer.json").hash


def test_a_failed_run_leaves_nothing_to_train_on_and_a_rerun_resumes(tmp_path):
    """--strict stops at a bad line in a worker process; training refuses the unfinished preparation; the next
    run skips the source that was done and finishes."""
    stories = narration(9)
    good, half, broken = (tmp_path / name for name in ("good.jsonl", "half.jsonl", "broken.jsonl"))
    write_records(good, stories[:4])
    write_records(half, stories[4:7])
    broken.write_text(json.dumps({"text": stories[7]}) + "\n{oops\n" + json.dumps({"text": stories[8]}) + "\n",
                      encoding="utf-8")
    sources = [{"name": "good", "paths": [str(good)]}, {"name": "mixed", "paths": [str(half), str(broken)]}]
    recipe_path = write_recipe(tmp_path / "recipe.yaml", tmp_path / "run", sources, workers=2, minhash=False,
                               decontaminate=False)
    failed = cli("prepare", str(recipe_path), "--strict")
    assert failed.returncode == 2
    assert f"{broken}:2: not valid JSON (--strict stops at the first bad record)" in failed.stderr
    recipe = load_recipe(recipe_path)
    with pytest.raises(DataError, match="run `fermion prepare RECIPE` first"):
        training_data(recipe)
    assert not (recipe.run_dir / "tokenizer.json").exists() and not (recipe.run_dir / "data").exists()

    resumed = cli("prepare", str(recipe_path))
    assert resumed.returncode == 0, resumed.stderr
    assert "clean-good: 1 task(s), done before" in resumed.stdout
    report = json.loads((preparation.make_plan(recipe).root / preparation.REPORT_NAME).read_text())
    assert report["sources"]["mixed"]["problems"]["not valid JSON"] == {"count": 1, "first": [f"{broken}:2"]}
    assert report["totals"]["kept"]["documents"] == 9
    again_strict = cli("prepare", str(recipe_path), "--strict")  # the finished run still has a bad line
    assert again_strict.returncode == 2 and f"{broken}:2: not valid JSON (--strict" in again_strict.stderr
    assert [source.paths for source in training_data(recipe).sources] == [
        [str(preparation.make_plan(recipe).kept_dir(name) / "*.jsonl.gz")] for name in ("good", "mixed")]


def recipe_with(tmp_path: Path, sources: list[dict], **prepare) -> Recipe:
    return recipe_from_dict({"run": {"dir": str(tmp_path / "run")},
                             "data": {"sources": sources, "prepare": {**FAST, **prepare}}}, check_paths=False)


@pytest.mark.parametrize("executor, options, expected", [
    ("slurm", {"partition": "cpu", "time": "1:00:00", "cpus_per_task": 2}, SlurmPipelineExecutor),
    ("ray", {"cpus_per_task": 2}, RayPipelineExecutor),  # building one does not need ray itself
])
def test_one_setting_switches_the_executor(tmp_path, executor, options, expected):
    stories = tmp_path / "stories.jsonl"
    write_records(stories, narration(2))
    recipe = recipe_with(tmp_path, [{"name": "web", "paths": [str(stories)]}], executor=executor,
                         executor_options=options, exact_dedup=True)
    plan = preparation.make_plan(recipe)
    preparation.write_input_lists(plan)
    stages = preparation.build_stages(plan, strict=False)
    assert [stage.name for stage in stages] == ["clean-web", "exact_dedup-signatures", "exact_dedup-duplicates",
                                                "exact_dedup-filter"]
    assert all(type(stage.executor) is expected and stage.executor.cpus_per_task == 2 for stage in stages)
    assert [stage.executor.depends for stage in stages[1:]] == [stage.executor for stage in stages[:-1]]
    assert stages[0].logging_dir == plan.root / "logs" / "clean-web"


def test_with_slurm_the_run_after_the_jobs_finished_writes_the_report(tmp_path):
    """Slurm only queues jobs; the command run again once they are done (here: done by the local executor, which
    shares the folder, as the executor is no part of the plan) submits nothing and writes the report."""
    stories = tmp_path / "stories.jsonl"
    write_records(stories, narration(2))
    sources = [{"name": "web", "paths": [str(stories)]}]
    local = preparation.run(recipe_with(tmp_path, sources, exact_dedup=True), Console(file=io.StringIO()))
    slurm = recipe_with(tmp_path, sources, exact_dedup=True, executor="slurm",
                        executor_options={"partition": "cpu", "time": "1:00:00"})
    output = io.StringIO()
    report = preparation.run(slurm, Console(file=output, width=200))
    assert (report["sources"], report["totals"]) == (local["sources"], local["totals"])
    assert "4 tasks (4 done before)" in output.getvalue()


def test_executor_options_the_executor_does_not_take_are_a_recipe_error(tmp_path):
    stories = tmp_path / "stories.jsonl"
    write_records(stories, narration(1))
    recipe = recipe_with(tmp_path, [{"name": "web", "paths": [str(stories)]}], executor="slurm",
                         executor_options={"partition": "cpu"})
    plan = preparation.make_plan(recipe)
    preparation.write_input_lists(plan)
    with pytest.raises(RecipeError, match="data.prepare.executor_options: .*SlurmPipelineExecutor.*time"):
        preparation.build_stages(plan, strict=False)


BAD_INPUTS = {
    "missing file": (lambda folder: None, "source 'web': no file matches"),
    "missing text field": (lambda folder: write_records(folder / "web.jsonl", narration(3), field="body"),
                           r"source 'web' yielded no documents: 3 no 'text' field \(first: .*web\.jsonl:1 "
                           r"\(fields: body\)"),
    "all removed": (lambda folder: write_records(folder / "web.jsonl", spam()[:2]),
                    r"source 'web': all 2 of its documents were removed \(gopher_repetition removed 2 "
                    r"\(dup_line_frac 1, dup_para_frac 1\)\)"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_gets_one_clear_message(tmp_path, case):
    write, message = BAD_INPUTS[case]
    write(tmp_path)
    recipe = recipe_with(tmp_path, [{"name": "web", "paths": [str(tmp_path / "web.jsonl")]}])
    with pytest.raises(DataError, match=message):
        preparation.run(recipe, Console(file=io.StringIO()))
    assert not list((tmp_path / "run").glob(f"prepared/*/{preparation.REPORT_NAME}"))


def test_text_that_is_not_utf8_names_the_file_and_line(tmp_path):
    path, story = tmp_path / "book.txt", narration(1)[0]
    path.write_bytes(story.encode() + b"\nna\xefve\n")
    bad_line = story.count("\n") + 2
    recipe = recipe_with(tmp_path, [{"name": "book", "paths": [str(path)]}])
    with pytest.raises(DataError, match=f"{re.escape(str(path))}:{bad_line}: not valid UTF-8 text"):
        preparation.run(recipe, Console(file=io.StringIO()))


def test_decontamination_needs_its_benchmark_folder(tmp_path):
    stories = tmp_path / "stories.jsonl"
    write_records(stories, narration(1))
    recipe = recipe_with(tmp_path, [{"name": "web", "paths": [str(stories)]}],
                         decontaminate={"eval_dir": str(tmp_path / "nowhere")})
    with pytest.raises(RecipeError, match="evaluation data folder .*nowhere not found"):
        preparation.run(recipe, Console(file=io.StringIO()))
    assert os.listdir(tmp_path) == ["stories.jsonl"]  # refused before anything was written


def test_perplexity_scores_every_document_with_a_fermion_checkpoint(tmp_path, shakespeare_tokenizer):
    vocab = shakespeare_tokenizer.vocab_size
    model_recipe = recipe_from_dict({"model": {**TINY, "vocab_size": vocab}}, check_paths=False)
    checkpoint = save_weights(tiny_model(vocab_size=vocab), model_recipe, shakespeare_tokenizer, tmp_path / "scorer")
    stories = tmp_path / "stories.jsonl"
    write_records(stories, narration(3))
    recipe = recipe_with(tmp_path, [{"name": "web", "paths": [str(stories)]}],
                         perplexity={"checkpoint": str(checkpoint), "high": 1e9})
    report = preparation.run(recipe, Console(file=io.StringIO()))
    assert [row["step"] for row in report["sources"]["web"]["steps"]][-1] == "perplexity"
    scores = [record["metadata"]["perplexity"] for record in records(preparation.make_plan(recipe).kept_dir("web"))]
    assert len(scores) == 3 and all(1 < score < 1e9 for score in scores)


def test_prepare_settings_switch_steps_and_name_mistakes():
    def settings(prepare: dict):
        sources = [{"name": "web", "paths": ["web.jsonl"]}]
        return recipe_from_dict({"data": {"sources": sources, "prepare": prepare}}, check_paths=False).data.prepare

    chosen = settings({"minhash": False, "length": True, "perplexity": {"checkpoint": "run"}})
    assert chosen.minhash is None and chosen.length == LengthRules() and chosen.perplexity.checkpoint == "run"
    assert chosen.exact_dedup and chosen.decontaminate.n == 13 and chosen.executor == "local"
    for prepare, message in [({"minhsh": False}, "did you mean 'data.prepare.minhash'"),
                             ({"perplexity": True}, "'data.prepare.perplexity.checkpoint' is required"),
                             ({"length": {"min_chars": 9, "max_chars": 3}}, "lower bound .* exceeds"),
                             ({"executor": "k8s"}, "data.prepare.executor")]:
        with pytest.raises(RecipeError, match=message):
            settings(prepare)


def test_a_tokenizer_comes_only_from_usable_data_and_knows_what_it_was_trained_on(tmp_path):
    """An empty data file: exit 2 naming it, and nothing left to reuse (there was a 265-token tokenizer.json, which
    the next run took without a word once the data was fixed). A tokenizer keeps a record of what it was trained
    on: changed data is refused while checkpoints made with the old tokenizer are there, and trains it anew,
    saying why, once they are not; a tokenizer without a record (an earlier fermion's) is used as it is."""
    if not STORIES.is_file():
        pytest.skip(f"{STORIES} is missing")
    stories = STORIES.read_text(encoding="utf-8")
    data, run_dir = tmp_path / "stories.txt", tmp_path / "run"
    data.write_text("", encoding="utf-8")
    recipe = {"run": {"dir": str(run_dir)}, "tokenizer": {"vocab_size": 300, "train_bytes": 20_000},
              "model": {**TINY, "vocab_size": 300},
              "data": {"sources": [{"name": "stories", "paths": [str(data)], "separator": "<|endoftext|>"}],
                       "val_fraction": 0.2, "num_workers": 1},
              "train": {"steps": 2, "warmup_steps": 1, "micro_batch_size": 2, "eval_batches": 1, "compile": False,
                        "precision": "fp32", "progress": False, "tensorboard": False}}
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    tokenizer_path = run_dir / "tokenizer.json"

    empty = cli("prepare", str(recipe_path))
    assert empty.returncode == 2 and not tokenizer_path.exists() and not (run_dir / "data").exists()
    assert f"'stories' reads {data} (0 bytes)" in empty.stderr

    data.write_text(stories[:30_000], encoding="utf-8")
    size = data.stat().st_size
    fixed = cli("pretrain", str(recipe_path))  # the tokenizer, the shards and checkpoints made with them
    assert fixed.returncode == 0, fixed.stderr
    first = Tokenizer.load(tokenizer_path)
    assert first.vocab_size == 300 and load_index(run_dir / "data")["tokenizer_hash"] == first.hash
    again = cli("prepare", str(recipe_path))
    assert again.returncode == 0 and "anew" not in again.stdout and Tokenizer.load(tokenizer_path).hash == first.hash

    data.write_text(stories[30_000:70_000], encoding="utf-8")
    refused = cli("prepare", str(recipe_path))
    assert refused.returncode == 2
    assert (f"{tokenizer_path} was trained on other data or settings ({data} has changed: {size:,} bytes then, "
            f"{data.stat().st_size:,} now), and "
            f"{run_dir / 'checkpoints'} were made with it: a new tokenizer would not fit them") in refused.stderr
    assert Tokenizer.load(tokenizer_path).hash == first.hash

    (run_dir / "checkpoints").rename(tmp_path / "old-checkpoints")
    retrained = cli("prepare", str(recipe_path))
    assert retrained.returncode == 0, retrained.stderr
    assert (f"{tokenizer_path} was trained on other data or settings ({data} has changed: {size:,} bytes then"
            in retrained.stdout)
    second = Tokenizer.load(tokenizer_path)
    assert second.hash != first.hash and load_index(run_dir / "data")["tokenizer_hash"] == second.hash

    (run_dir / "tokenizer_trained_on.json").unlink()  # as an earlier fermion left it
    data.write_text(stories[:30_000], encoding="utf-8")
    unrecorded = cli("tokenizer", "train", str(recipe_path))
    assert unrecorded.returncode == 0, unrecorded.stderr
    assert f"{tokenizer_path} has no record of what it was trained on" in unrecorded.stdout
    assert Tokenizer.load(tokenizer_path).hash == second.hash


# ---------------------------------------------------------------------------------------------- the validation split


def spy_on_tokenizer_training(monkeypatch) -> list[str]:
    """The texts Tokenizer.train reads, in the order it reads them."""
    read, train = [], Tokenizer.train.__func__
    monkeypatch.setattr(Tokenizer, "train", classmethod(
        lambda cls, texts, config: train(cls, (read.append(text) or text for text in texts), config)))
    return read


def split_texts(run_dir: Path, source: str) -> dict[str, list[str]]:
    """The source's documents in the run's shards, split by split, decoded."""
    tokenizer = Tokenizer.load(run_dir / "tokenizer.json")
    return {split: [tokenizer.decode(shards.file_tokens(file)[start:end]) for file, start, end in
                    shards.documents(source)]
            for split, shards in ((split, ShardSet(run_dir / "data", split)) for split in ("train", "val"))}


def test_tinyshakespeare_one_file_trains_with_its_last_tenth_held_out(tmp_path, monkeypatch):
    """nanoGPT's starting point could not be used: "the train split is empty: all 1 document(s) went to val; lower
    data.val_fraction", which could not help. Its last 10% of text is the val split now (nanoGPT's split, to the
    character), the tokenizer never reads it, and a tiny model trains on the rest."""
    if not SHAKESPEARE.is_file():
        pytest.skip(f"{SHAKESPEARE} is missing")
    text = SHAKESPEARE.read_text(encoding="utf-8")
    cut = int(len(text) * 0.9)
    read = spy_on_tokenizer_training(monkeypatch)
    run_dir, path = tmp_path / "run", tmp_path / "shakespeare.yaml"
    path.write_text(yaml.safe_dump({
        "run": {"dir": str(run_dir)}, "tokenizer": {"vocab_size": 300, "train_bytes": 2_000_000},
        "model": {**TINY, "vocab_size": 300},
        "data": {"sources": [{"name": "shakespeare", "paths": [str(SHAKESPEARE)]}], "val_fraction": 0.1,
                 "num_workers": 1},
        "train": {"steps": 4, "warmup_steps": 1, "micro_batch_size": 2, "eval_every": 4, "eval_batches": 1,
                  "compile": False, "precision": "fp32", "progress": False, "tensorboard": False}}), encoding="utf-8")
    result = cli("pretrain", str(path))
    assert result.returncode == 0, result.stderr
    assert "step 4: val loss" in result.stdout
    assert read == [text[:cut]]  # the head, whole, and not a character of the tail
    assert split_texts(run_dir, "shakespeare") == {"train": [text[:cut]], "val": [text[cut:]]}
    counts = load_index(run_dir / "data")["sources"]["shakespeare"]
    assert counts["val"]["bytes"] == len(text) - cut == 111_540
    assert counts["val"]["tokens"] / (counts["train"]["tokens"] + counts["val"]["tokens"]) == \
        pytest.approx(0.1, abs=0.01)


@pytest.mark.parametrize("case", ["marked", "drawn", "given up"])
def test_the_tokenizer_reads_exactly_the_train_split(tmp_path, monkeypatch, case):
    """Tokenizer training read every document, validation text too. Now it reads the train split alone, whichever
    way a document became validation: a source marked validation, the hash drawing it, or a corpus that drew none
    giving up its last document."""
    web, held = tmp_path / "web.jsonl", tmp_path / "held.jsonl"
    write_records(web, narration({"marked": 30, "drawn": 40, "given up": 5}[case]))
    write_records(held, narration(8, skip=40))
    sources = [{"name": "web", "paths": [str(web)]}]
    data = {"marked": {"sources": [*sources, {"name": "held", "paths": [str(held)], "validation": True}]},
            "drawn": {"sources": sources, "val_fraction": 0.2},
            "given up": {"sources": sources, "val_fraction": 0.001}}[case]
    recipe = recipe_from_dict({"run": {"dir": str(tmp_path / "run")}, "tokenizer": {"vocab_size": 300},
                               "data": {**data, "num_workers": 1}})
    read = spy_on_tokenizer_training(monkeypatch)
    tokenize_data(recipe, Console(file=io.StringIO()))
    splits = {source["name"]: split_texts(tmp_path / "run", source["name"]) for source in data["sources"]}
    train, val = ([text for source in splits.values() for text in source[split]] for split in ("train", "val"))
    assert read == train and val and not set(read) & set(val)
    if case == "marked":
        assert splits == {"web": {"train": narration(30), "val": []}, "held": {"train": [], "val": narration(8, 40)}}
    elif case == "drawn":
        assert 0 < len(val) < 20 and sorted(train + val) == sorted(narration(40))
    else:
        assert splits == {"web": {"train": narration(4), "val": narration(1, skip=4)}}


def test_the_split_is_part_of_what_the_tokenizer_was_trained_on(tmp_path):
    """Another val_fraction or seed holds other text out: the tokenizer's record did not say, so it was kept."""
    web = tmp_path / "web.jsonl"
    write_records(web, narration(30))
    raw = {"run": {"dir": str(tmp_path / "run")}, "tokenizer": {"vocab_size": 300},
           "data": {"sources": [{"name": "web", "paths": [str(web)]}], "val_fraction": 0.1, "num_workers": 1}}
    out = io.StringIO()
    train_tokenizer(recipe_from_dict(raw), Console(file=out, width=400))
    first = Tokenizer.load(tmp_path / "run" / "tokenizer.json").hash
    raw["data"]["val_fraction"] = 0.3
    train_tokenizer(recipe_from_dict(raw), Console(file=out, width=400))
    assert ('was trained on other data or settings (the validation split it leaves out was {"rule": '
            '"fermion-split/2", "val_fraction": 0.1, "seed": 1337}, now {"rule": "fermion-split/2", "val_fraction": '
            '0.3, "seed": 1337}); training it anew') in out.getvalue()
    assert Tokenizer.load(tmp_path / "run" / "tokenizer.json").hash != first


def test_prepared_data_keeps_the_validation_mark(tmp_path):
    web, held = tmp_path / "web.jsonl", tmp_path / "held.jsonl"
    write_records(web, narration(6))
    write_records(held, narration(3, skip=6))
    recipe = recipe_with(tmp_path, [{"name": "web", "paths": [str(web)]},
                                    {"name": "held", "paths": [str(held)], "validation": True}])
    preparation.run(recipe, Console(file=io.StringIO()))
    assert [source.validation for source in training_data(recipe).sources] == [False, True]
