"""Streaming Hugging Face datasets: a `dataset:` source with `streaming: true` is read as a datasets IterableDataset
(as it is used, never downloaded whole), its position saved and restored so an interrupted pass goes on with the same
next document; and a pretraining run reads one. No network: the data sets are folders of data files made here, which
`datasets.load_dataset` reads as it would a Hub repository's."""

import json

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import TINY_STORIES, cli

from fermion.config import RecipeError, SourceConfig, load_recipe
from fermion.data.shards import load_index
from fermion.data.sources import DataError, DocumentStream, dataset_rows, iter_documents, iter_records

pytestmark = pytest.mark.skipif(not TINY_STORIES.is_file(), reason=f"{TINY_STORIES} is missing")


def stories(n: int) -> list[str]:
    text = TINY_STORIES.read_text(encoding="utf-8")
    return [story.strip() for story in text.split("<|endoftext|>") if story.strip()][:n]


def data_set(folder, documents: list[str], kind: str = "jsonl", files: int = 2):
    """A folder of `files` data files holding the documents in order, as a Hub data set repository lays them out."""
    folder.mkdir(parents=True, exist_ok=True)
    size = -(-len(documents) // files)
    for number in range(files):
        part = documents[number * size:(number + 1) * size]
        rows = [{"id": number * size + i, "text": text} for i, text in enumerate(part)]
        if kind == "jsonl":
            (folder / f"train-{number:05d}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        else:
            pq.write_table(pa.Table.from_pylist(rows), folder / f"train-{number:05d}.parquet", row_group_size=16)
    return folder


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_a_stream_stopped_mid_way_resumes_at_the_same_next_document(tmp_path, kind):
    documents = stories(90)
    source = SourceConfig(name="web", dataset=str(data_set(tmp_path / "web", documents, kind)), streaming=True)
    assert isinstance(dataset_rows(source), datasets.IterableDataset)
    assert list(iter_documents(source)) == documents  # every row, in the files' order

    for stop in (0, 1, 17, 44, 45, 46, 89, 90):  # the first file holds 45 rows
        stream = iter(first := DocumentStream(source))
        taken = [next(stream) for _ in range(stop)]
        saved = json.loads(json.dumps(first.state_dict()))  # as a checkpoint would keep it
        assert first.position == stop and saved["consumed"]["dataset"] == stop
        again = DocumentStream(source)
        again.load_state_dict(saved)
        assert taken + list(again) == documents, f"resumed after {stop} documents"


def test_positions_of_files_datasets_and_builtins_and_max_documents(tmp_path):
    """A source of files, a downloaded (not streamed) data set and generated stories, capped by max_documents:
    resumed anywhere, the same documents follow."""
    text = tmp_path / "notes.txt"
    text.write_text("one\n===\ntwo\n===\nthree")
    folder = data_set(tmp_path / "books", stories(10), files=1)
    source = SourceConfig(name="mixed", paths=[str(text)], separator="===", dataset=str(folder), builtin="stories",
                          max_documents=16)
    every = list(iter_documents(source))
    assert len(every) == 16 and every[:4] == ["one", "two", "three", stories(1)[0]]
    for stop in range(17):
        stream = iter(first := DocumentStream(source))
        taken = [next(stream) for _ in range(stop)]
        again = DocumentStream(source)
        again.load_state_dict(json.loads(json.dumps(first.state_dict())))
        assert taken + list(again) == every

    other = DocumentStream(source.model_copy(update={"name": "other"}))
    with pytest.raises(DataError, match="'other': the saved position is of another source"):
        other.load_state_dict(first.state_dict())


def test_records_and_bad_rows_of_a_streamed_data_set(tmp_path):
    folder = data_set(tmp_path / "web", stories(6), files=1)
    source = SourceConfig(name="web", dataset=str(folder), streaming=True)
    where, record = next(iter_records(source))
    assert where == f"{folder}[train]#0" and record == {"id": 0, "text": stories(1)[0]}
    wrong_field = source.model_copy(update={"text_field": "body"})
    with pytest.raises(DataError, match=r"#0: record has no field 'body' \(it has: id, text\)"):
        next(iter_documents(wrong_field))
    missing = source.model_copy(update={"dataset": str(tmp_path / "nothing")})
    with pytest.raises(DataError, match="source 'web': cannot load dataset"):
        next(iter_documents(missing))


def test_streaming_needs_a_dataset(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"data": {"sources": [{"name": "s", "builtin": "python-stdlib",
                                                          "streaming": True}]}}))
    with pytest.raises(RecipeError, match=r"data.sources\[0\]: .*streaming: true reads a dataset as it goes"):
        load_recipe(path)


def test_prepare_streams_the_data_set_too():
    from fermion.prepare.readers import DatasetReader

    hub = SourceConfig(name="edu", dataset="HuggingFaceFW/fineweb-edu", subset="sample-10BT", streaming=True)
    assert DatasetReader(hub, strict=False).streaming is True
    assert DatasetReader(hub.model_copy(update={"streaming": False}), strict=False).streaming is False


def test_pretraining_reads_a_streamed_source_for_epochs(tmp_path):
    """A tiny pretraining run whose only source is a streamed data set, for one epoch of its shards: the tokenizer
    and the shards are made from the stream, and the steps follow from the shards."""
    documents = stories(400)
    folder = data_set(tmp_path / "web", documents)
    run_dir = tmp_path / "run"
    recipe = {
        "run": {"name": "streamed", "dir": str(run_dir), "seed": 5},
        "model": {"vocab_size": 384, "d_model": 32, "n_layers": 1, "n_heads": 2, "ffn_hidden": 64,
                  "context_length": 64},
        "tokenizer": {"vocab_size": 384, "train_bytes": 100_000},
        "data": {"sources": [{"name": "web", "dataset": str(folder), "streaming": True, "text_field": "text"}],
                 "val_fraction": 0.05, "num_workers": 1},
        "train": {"epochs": 0.5, "micro_batch_size": 16, "lr": 3e-3, "warmup_steps": 1, "eval_every": 1000,
                  "eval_batches": 1, "checkpoint_every": 1000, "compile": False, "precision": "fp32",
                  "tensorboard": False, "progress": False},
        "eval": {"tasks": ["arithmetic"], "limit": 2},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = cli("pretrain", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    index = load_index(run_dir / "data")
    assert index["splits"]["train"]["documents"] + index["splits"]["val"]["documents"] == len(documents)
    train_tokens = index["splits"]["train"]["tokens"]
    assert train_tokens > 64 * 16  # enough for more than one step, so the count below means something
    line = next(line for line in result.stdout.splitlines() if line.startswith("train.epochs 0.5:"))
    windows = int(line.split(": ")[1].split(" windows")[0].replace(",", ""))
    steps = -(-windows // 32)  # half of the windows, 16 sequences a step, rounded up
    assert line.endswith(f"-> {steps:,} steps") and f"{steps:,} steps ×" in result.stdout
    saved = load_recipe(run_dir / "recipe.yaml")
    assert (saved.train.steps, saved.train.epochs) == (steps, None)  # the resolved recipe loads again
