"""The data layer on real text: sources, tokenizer, shards, loaders."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import tokenizers
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fermion.config import DataConfig, SourceConfig, TokenizerConfig
from fermion.data import (
    DataError,
    ShardSet,
    Tokenizer,
    TokenLoader,
    check_tokenizer,
    interleave_documents,
    iter_documents,
    load_index,
    token_dtype,
    val_batches,
    write_shards,
)
from fermion.data.sources import _split_stream

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "pretrain"
TINYSTORIES = str(SHARED / "tinystories/tinystories_train_sample_2MiB.txt")
C4 = str(SHARED / "llamafactory_demo/c4_demo.jsonl")
SHAKESPEARE = str(SHARED / "tinyshakespeare/input.txt")  # nanoGPT's first corpus: one file, one document
SEPARATOR = "<|endoftext|>"
SEQ_LEN = 32

pytestmark = pytest.mark.skipif(not SHARED.is_dir(), reason=f"needs the shared data sets in {SHARED}")


def stories(**overrides) -> SourceConfig:
    return SourceConfig(**{"name": "stories", "paths": [TINYSTORIES], "separator": SEPARATOR, **overrides})


def c4(**overrides) -> SourceConfig:
    return SourceConfig(**{"name": "c4", "paths": [C4], **overrides})


def mixture(num_workers: int = 2, **overrides) -> DataConfig:
    sources = [stories(max_documents=600, weight=3.0), c4(max_documents=150, weight=1.0)]
    settings = {"sources": sources, "val_fraction": 0.05, "shard_tokens": 20_000, "num_workers": num_workers}
    return DataConfig(**{**settings, **overrides})


def write_lines(path: Path, lines: list[str]) -> str:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    texts = interleave_documents([stories(max_documents=400), c4(max_documents=100)])
    return Tokenizer.train(texts, TokenizerConfig(vocab_size=512, train_bytes=400_000))


@pytest.fixture(scope="session")
def shard_dir(tokenizer, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mixture") / "shards"
    write_shards(mixture(num_workers=2), tokenizer, out, seed=7)
    return out


# ---------------------------------------------------------------------------------------------- sources


def test_txt_split_on_separator_gives_every_story():
    documents = list(iter_documents(stories()))
    assert len(documents) == 2317  # 2316 separators in the file
    assert documents[0].startswith("One day, a little girl named Lily")
    assert all(SEPARATOR not in doc and doc == doc.strip() and doc for doc in documents)


def test_txt_without_separator_is_one_document(tmp_path):
    path = write_lines(tmp_path / "a.txt", ["first line", "", "second line"])
    assert list(iter_documents(SourceConfig(name="a", paths=[path]))) == ["first line\n\nsecond line\n"]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(alphabet="ab<|>x\n", max_size=12)), st.lists(st.integers(1, 9)))
def test_split_stream_agrees_with_str_split_for_any_chunking(pieces, cuts):
    text = "<|x|>".join(pieces)
    chunks, start = [], 0
    for cut in cuts:
        chunks.append(text[start : start + cut])
        start += cut
    chunks.append(text[start:])
    assert list(_split_stream(chunks, "<|x|>")) == text.split("<|x|>")


def test_jsonl_and_max_documents():
    documents = list(iter_documents(c4()))
    assert len(documents) == 300
    assert list(iter_documents(c4(max_documents=5))) == documents[:5]


def test_jsonl_gz_reads_like_plain_jsonl(tmp_path):
    plain = Path(C4).read_text(encoding="utf-8").splitlines()[:20]
    packed = tmp_path / "part.jsonl.gz"
    packed.write_bytes(gzip.compress(("\n\n".join(plain) + "\n").encode("utf-8")))  # blank lines are skipped
    expected = [json.loads(line)["text"] for line in plain]
    assert list(iter_documents(SourceConfig(name="gz", paths=[str(packed)]))) == expected


def test_globs_are_expanded_sorted(tmp_path):
    for name in ("b", "a", "c"):
        (tmp_path / f"{name}.txt").write_text(name)
    source = SourceConfig(name="g", paths=[str(tmp_path / "*.txt")])
    assert list(iter_documents(source)) == ["a", "b", "c"]


def test_bad_json_line_names_file_and_line(tmp_path):
    path = write_lines(tmp_path / "bad.jsonl", ['{"text": "ok"}', "", '{"text": "broken'])
    with pytest.raises(DataError, match=rf"^{path}:3: not valid JSON"):
        list(iter_documents(SourceConfig(name="bad", paths=[path])))


@pytest.mark.parametrize(
    ("record", "expected"),
    [('{"body": "x"}', "has no field 'text'"), ('{"text": 3}', "field 'text' must be a string"), ("[1]", "object")],
)
def test_unusable_record_names_file_line_and_field(tmp_path, record, expected):
    path = write_lines(tmp_path / "r.jsonl", ['{"text": "ok"}', record])
    with pytest.raises(DataError, match=rf"^{path}:2: .*{expected}"):
        list(iter_documents(SourceConfig(name="r", paths=[path])))


def test_unsupported_extension_and_missing_files_are_refused(tmp_path):
    (tmp_path / "table.csv").write_text("a,b")
    with pytest.raises(DataError, match=r"table.csv: unsupported file type .*\.txt, \.jsonl, \.jsonl\.gz"):
        iter_documents(SourceConfig(name="t", paths=[str(tmp_path / "table.csv")]))
    with pytest.raises(DataError, match="no file matches"):
        iter_documents(SourceConfig(name="t", paths=[str(tmp_path / "nothing*.txt")]))


def test_python_stdlib_builtin_yields_many_python_files():
    documents = list(iter_documents(SourceConfig(name="py", builtin="python-stdlib")))
    assert len(documents) > 300
    assert documents[0].startswith('"""Record of phased-in incompatible language changes')  # __future__.py sorts first
    assert sum("(unittest.TestCase)" in doc for doc in documents) <= 2  # test folders are left out; doctest remains


def test_interleave_alternates_sources():
    mixed = list(interleave_documents([c4(max_documents=2), stories(max_documents=3)]))
    assert mixed[1] == next(iter_documents(stories()))
    assert len(mixed) == 5


# ---------------------------------------------------------------------------------------------- tokenizer


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_round_trip_of_any_text(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_special_tokens_come_first_and_are_never_added(tokenizer):
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (0, 1, 2)
    assert tokenizer.token_id("<|im_start|>") == 3
    assert tokenizer.vocab_size == 512
    assert tokenizer.encode("<|eos|>") == [1]  # written literally, a special is recognised
    assert not set(tokenizer.encode("Once upon a time")) & set(range(9))
    assert tokenizer.encode_batch(["a b", "c"]) == [tokenizer.encode("a b"), tokenizer.encode("c")]
    with pytest.raises(DataError, match="not in the tokenizer's vocabulary"):
        tokenizer.token_id("<|nope|>")


def test_token_bytes_add_up_to_utf8_length(tokenizer):
    counts = tokenizer.token_bytes()
    assert counts.dtype == np.int32 and counts.shape == (tokenizer.vocab_size,)
    assert not counts[:9].any()  # special tokens
    text = "Tom said: «Ünïcödé — naïve 東京 🙂» and\tleft.\n"
    assert counts[tokenizer.encode(text)].sum() == len(text.encode("utf-8"))
    assert b"".join(map(tokenizer.piece, tokenizer.encode(text))) == text.encode("utf-8")  # logprobs' `bytes`


def test_save_load_keeps_hash_and_is_loadable_elsewhere(tokenizer, tmp_path):
    path = tmp_path / "tok" / "tokenizer.json"
    tokenizer.save(path)
    assert Tokenizer.load(path).hash == tokenizer.hash
    assert [p.name for p in path.parent.iterdir()] == ["tokenizer.json"]  # no temporary left
    text = "Lily found a needle. <|eos|>"
    assert tokenizers.Tokenizer.from_file(str(path)).encode(text, add_special_tokens=False).ids == tokenizer.encode(
        text
    )
    transformers = pytest.importorskip("transformers")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(path))
    assert fast.encode(text, add_special_tokens=False) == tokenizer.encode(text)


def test_load_refuses_missing_and_invalid_files(tmp_path):
    with pytest.raises(DataError, match="tokenizer file not found"):
        Tokenizer.load(tmp_path / "absent.json")
    (tmp_path / "bad.json").write_text("{ nope")
    with pytest.raises(DataError, match="bad.json: not a valid tokenizer.json"):
        Tokenizer.load(tmp_path / "bad.json")


def test_train_bytes_caps_what_the_trainer_reads():
    texts = ["aaaa bbbb " * 100, "zq" * 500]  # 1000 bytes, then text that only a larger budget reaches
    small = Tokenizer.train(texts, TokenizerConfig(vocab_size=300, train_bytes=1000))
    large = Tokenizer.train(texts, TokenizerConfig(vocab_size=300, train_bytes=2000))
    assert small.inner.token_to_id("zq") is None and large.inner.token_to_id("zq") is not None


# ---------------------------------------------------------------------------------------------- shards


def test_dtype_fits_the_vocabulary():
    assert token_dtype(512) == np.uint16 and token_dtype(65535) == np.uint16
    assert token_dtype(65536) == np.uint32 and token_dtype(200_000) == np.uint32


def test_shards_recover_every_document_exactly(tokenizer, shard_dir):
    index = load_index(shard_dir)
    assert index["dtype"] == "uint16" and index["eos_id"] == tokenizer.eos_id
    for config in mixture().sources:
        originals = list(iter_documents(config))
        recovered = {
            split: _decoded_documents(ShardSet(shard_dir, split), config.name, tokenizer) for split in ("train", "val")
        }
        assert sorted(recovered["train"] + recovered["val"]) == sorted(originals)
        in_train = set(recovered["train"])
        assert recovered["train"] == [doc for doc in originals if doc in in_train]  # corpus order is kept
        assert index["sources"][config.name]["train"]["documents"] == len(recovered["train"])
        assert index["sources"][config.name]["val"]["bytes"] == sum(len(d.encode()) for d in recovered["val"])


def _decoded_documents(shards: ShardSet, source: str, tokenizer: Tokenizer) -> list[str]:
    spans = shards.documents(source)
    for file, _, end in spans:
        assert shards.file_tokens(file)[end] == tokenizer.eos_id
    return [tokenizer.decode(shards.file_tokens(file)[start:end]) for file, start, end in spans]


def test_windows_are_text_of_the_source_and_stay_inside_one_file(tokenizer, shard_dir):
    shards = ShardSet(shard_dir, "train")
    files = list(dict.fromkeys(file for file, _, _ in shards.documents("stories")))
    first, second = shards.file_tokens(files[0]), shards.file_tokens(files[1])
    assert first.dtype == np.uint16
    count = shards.num_windows("stories", SEQ_LEN)
    assert count == sum((len(shards.file_tokens(file)) - 1) // SEQ_LEN for file in files)
    last_in_first = (len(first) - 1) // SEQ_LEN - 1
    start = last_in_first * SEQ_LEN
    assert np.array_equal(shards.window("stories", last_in_first, SEQ_LEN), first[start : start + SEQ_LEN + 1])
    assert np.array_equal(shards.window("stories", last_in_first + 1, SEQ_LEN), second[: SEQ_LEN + 1])
    corpus = "\n".join(iter_documents(mixture().sources[0]))
    for k in range(0, count, 97):
        window = shards.window("stories", k, SEQ_LEN)
        assert window.dtype == np.int64 and window.shape == (SEQ_LEN + 1,)
        for piece in tokenizer.decode(window).split("<|eos|>"):
            assert piece.strip("\ufffd") in corpus  # a window may start or end inside a character


def test_worker_count_does_not_change_a_byte(tokenizer, shard_dir, tmp_path):
    single = tmp_path / "one"
    write_shards(mixture(num_workers=1), tokenizer, single, seed=7)
    names = sorted(p.name for p in shard_dir.iterdir())
    assert names == sorted(p.name for p in single.iterdir())
    assert all((shard_dir / name).read_bytes() == (single / name).read_bytes() for name in names)


def test_matching_fingerprint_reuses_the_shards(tokenizer, tmp_path):
    data = DataConfig(sources=[c4(max_documents=30)], val_fraction=0.1, num_workers=1)
    calls = []
    first = write_shards(data, tokenizer, tmp_path / "d", seed=1, progress=lambda *args: calls.append(args))
    assert calls[-1][:2] == ("c4", 30)
    stamp = (tmp_path / "d" / "index.json").stat().st_mtime_ns
    assert write_shards(data, tokenizer, tmp_path / "d", seed=1, progress=lambda *args: calls.append(args)) == first
    assert len(calls) == 1 and (tmp_path / "d" / "index.json").stat().st_mtime_ns == stamp
    changed = write_shards(data, tokenizer, tmp_path / "d", seed=2)
    assert changed["fingerprint"] != first["fingerprint"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # no temporary or retired directory left


def test_an_edited_data_file_makes_the_shards_anew(tokenizer, tmp_path):
    """Same sources as written, other text in the file: the shards are made again, not reused stale."""
    path = tmp_path / "c4.jsonl"
    lines = Path(C4).read_text(encoding="utf-8").splitlines(keepends=True)
    path.write_text("".join(lines[:20]), encoding="utf-8")
    data = DataConfig(sources=[c4(paths=[str(path)])], val_fraction=0.1, num_workers=1)
    first = write_shards(data, tokenizer, tmp_path / "d", seed=1)
    path.write_text("".join(lines[:25]), encoding="utf-8")
    edited = write_shards(data, tokenizer, tmp_path / "d", seed=1)
    assert edited["fingerprint"] != first["fingerprint"]
    assert sum(edited["splits"][split]["documents"] for split in ("train", "val")) == 25


def test_long_documents_get_their_own_file_and_val_is_never_empty(tokenizer, tmp_path):
    data = DataConfig(sources=[c4(max_documents=12)], val_fraction=0.001, shard_tokens=1000, num_workers=1)
    index = write_shards(data, tokenizer, tmp_path / "d", seed=3)
    assert all(shard["documents"] == 1 or shard["tokens"] <= 1000 for shard in index["splits"]["train"]["shards"])
    assert index["splits"]["val"]["documents"] == 1  # moved from the largest source: its last document
    val = ShardSet(tmp_path / "d", "val")
    assert _decoded_documents(val, "c4", tokenizer) == list(iter_documents(c4(max_documents=12)))[-1:]


def test_a_one_document_source_gives_the_tail_of_its_text_to_val_as_nanogpt_does(tokenizer, tmp_path):
    """tinyshakespeare's input.txt is one document, which went to train or to val whole (alone: "the train split is
    empty", whatever val_fraction). Its last val_fraction of text is val now (nanoGPT's data[int(n * 0.9):]), the
    rest train; beside it a source of many documents is still split document by document."""
    text = Path(SHAKESPEARE).read_text(encoding="utf-8")
    cut = int(len(text) * 0.9)
    data = DataConfig(sources=[SourceConfig(name="shakespeare", paths=[SHAKESPEARE]), c4(max_documents=60)],
                      val_fraction=0.1, num_workers=1)
    index = write_shards(data, tokenizer, tmp_path / "d", seed=5)
    train, val = ShardSet(tmp_path / "d", "train"), ShardSet(tmp_path / "d", "val")
    assert _decoded_documents(val, "shakespeare", tokenizer) == [text[cut:]]  # exactly the file's tail
    assert _decoded_documents(train, "shakespeare", tokenizer) == [text[:cut]]
    shakespeare = index["sources"]["shakespeare"]
    assert shakespeare["val"]["bytes"] == len(text.encode()) - cut  # ASCII: 111,540, as nanoGPT's val.bin holds
    assert shakespeare["val"]["tokens"] / (shakespeare["val"]["tokens"] + shakespeare["train"]["tokens"]) == \
        pytest.approx(0.1, abs=0.01)
    documents = list(iter_documents(c4(max_documents=60)))
    held_out = _decoded_documents(val, "c4", tokenizer)
    assert 0 < len(held_out) < 20 and sorted(held_out + _decoded_documents(train, "c4", tokenizer)) == sorted(documents)


def test_a_source_marked_validation_is_the_val_split_whole_and_the_others_are_trained_on_whole(tokenizer, tmp_path):
    """No way to name held-out data before: every source was split by a hash of each document."""
    held = c4(name="held", max_documents=10, validation=True)
    data = DataConfig(sources=[stories(max_documents=50), held], num_workers=1)
    index = write_shards(data, tokenizer, tmp_path / "d", seed=5)
    counts = {name: (entry["train"]["documents"], entry["val"]["documents"])
              for name, entry in index["sources"].items()}
    assert counts == {"stories": (50, 0), "held": (0, 10)}
    val = ShardSet(tmp_path / "d", "val")
    assert _decoded_documents(val, "held", tokenizer) == list(iter_documents(c4(max_documents=10)))
    unmarked = DataConfig(sources=[stories(max_documents=50), c4(name="held", max_documents=10)], num_workers=1)
    assert write_shards(unmarked, tokenizer, tmp_path / "d", seed=5)["fingerprint"] != index["fingerprint"]
    with pytest.raises(ValueError, match=r"val_fraction\n.*a source is marked validation \(sources\[1\] \('held'\)\)"):
        DataConfig(sources=[stories(), held], val_fraction=0.1)
    with pytest.raises(ValueError, match="every source is marked validation"):
        DataConfig(sources=[held])


def test_refusals_before_and_after_tokenizing(tokenizer, tmp_path):
    two_documents = write_lines(tmp_path / "two.txt", ["a document", "|", "another"])
    data = DataConfig(sources=[SourceConfig(name="two", paths=[two_documents], separator="|")], val_fraction=0.9,
                      num_workers=1)
    with pytest.raises(DataError, match="train split is empty: all 2 document.* went to val; lower data.val_fraction"):
        write_shards(data, tokenizer, tmp_path / "d", seed=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["two.txt"]
    twice = DataConfig(sources=[c4(), c4()])
    with pytest.raises(DataError, match=r"data.sources\[1\].name: 'c4' is used twice"):
        write_shards(twice, tokenizer, tmp_path / "d", seed=0)
    with pytest.raises(DataError, match="cannot be used in file names"):
        write_shards(DataConfig(sources=[c4(name="web/c4")]), tokenizer, tmp_path / "d", seed=0)
    with pytest.raises(DataError, match="is not a shard directory"):
        write_shards(DataConfig(sources=[c4()]), tokenizer, tmp_path, seed=0)


def test_index_and_tokenizer_checks(tokenizer, shard_dir, tmp_path):
    with pytest.raises(DataError, match="index.json: not found"):
        load_index(tmp_path)
    (tmp_path / "index.json").write_text("{")
    with pytest.raises(DataError, match="index.json: unreadable"):
        load_index(tmp_path)
    check_tokenizer(load_index(shard_dir), tokenizer, shard_dir)
    other = Tokenizer.train(iter_documents(c4(max_documents=20)), TokenizerConfig(vocab_size=300))
    with pytest.raises(DataError, match=rf"made with tokenizer {tokenizer.hash[:12]} but this run's tokenizer is"):
        check_tokenizer(load_index(shard_dir), other, shard_dir)


# ---------------------------------------------------------------------------------------------- loaders


def test_loader_batches_are_shifted_windows(shard_dir):
    x, y = TokenLoader(ShardSet(shard_dir), SEQ_LEN, batch_size=4, seed=0).next_batch()
    assert x.shape == y.shape == (4, SEQ_LEN) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_loader_resumes_exactly(shard_dir):
    shards = ShardSet(shard_dir)
    uninterrupted = TokenLoader(shards, SEQ_LEN, batch_size=8, seed=5)
    for _ in range(7):
        uninterrupted.next_batch()
    state = json.loads(json.dumps(uninterrupted.state_dict()))
    expected = [uninterrupted.next_batch() for _ in range(5)]
    resumed = TokenLoader(shards, SEQ_LEN, batch_size=8, seed=5)
    resumed.load_state_dict(state)
    for (x, y), (rx, ry) in zip(expected, (resumed.next_batch() for _ in range(5)), strict=True):
        assert torch.equal(x, rx) and torch.equal(y, ry)
    with pytest.raises(DataError, match="seq_len"):
        TokenLoader(shards, SEQ_LEN * 2, batch_size=8, seed=5).load_state_dict(state)


def test_two_ranks_together_see_what_one_rank_sees(shard_dir):
    shards = ShardSet(shard_dir)
    single = TokenLoader(shards, SEQ_LEN, batch_size=6, seed=1)
    ranks = [TokenLoader(shards, SEQ_LEN, batch_size=3, seed=1, rank=r, world_size=2) for r in range(2)]
    for _ in range(20):
        x, y = single.next_batch()
        parts = [loader.next_batch() for loader in ranks]
        assert torch.equal(x, torch.cat([p[0] for p in parts])) and torch.equal(y, torch.cat([p[1] for p in parts]))


def test_sampling_honours_source_weights(shard_dir):
    loader = TokenLoader(ShardSet(shard_dir), SEQ_LEN, batch_size=64, seed=2)
    for _ in range(300):
        loader.next_batch()
    consumed = loader.state_dict()["consumed"]
    assert consumed["stories"] / loader.position == pytest.approx(0.75, abs=0.02)


def test_small_source_repeats_every_window_each_epoch(tokenizer, tmp_path):
    write_shards(DataConfig(sources=[c4(max_documents=3)], val_fraction=0, num_workers=1), tokenizer, tmp_path, seed=0)
    shards = ShardSet(tmp_path)
    windows = shards.num_windows("c4", SEQ_LEN)
    everything = sorted(tuple(shards.window("c4", k, SEQ_LEN)[:-1]) for k in range(windows))
    loader = TokenLoader(shards, SEQ_LEN, batch_size=windows, seed=0)
    epochs = [loader.next_batch()[0] for _ in range(2)]
    for x in epochs:
        assert sorted(tuple(row.tolist()) for row in x) == everything
    assert not torch.equal(epochs[0], epochs[1])  # a fresh order each epoch
    with pytest.raises(DataError, match="val split has no"):
        val_batches(ShardSet(tmp_path, "val"), SEQ_LEN, 4, 2)


def test_val_batches_are_fixed_and_cover_every_source(shard_dir):
    shards = ShardSet(shard_dir, "val")
    first, again = val_batches(shards, SEQ_LEN, 4, 5), val_batches(shards, SEQ_LEN, 4, 5)
    assert len(first) == 5 and all(x.shape == (4, SEQ_LEN) for x, _ in first)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again, strict=True))
    rows = {tuple(row.tolist()) for x, _ in first for row in x}
    by_source = {
        name: {tuple(shards.window(name, k, SEQ_LEN)[:-1]) for k in range(shards.num_windows(name, SEQ_LEN))}
        for name in shards.sources
    }
    assert all(rows & windows for windows in by_source.values())
    total = sum(shards.num_windows(name, SEQ_LEN) for name in shards.sources)
    everything = val_batches(shards, SEQ_LEN, 4, 10_000)
    assert sum(len(x) for x, _ in everything) == total


def test_a_jsonl_zst_source_trains_the_tokenizer_and_pretrains(tmp_path):
    """A .jsonl.zst source, which `fermion prepare` reads, is read the same way by `fermion tokenizer train` and
    `fermion pretrain` (the functions those commands call): same documents as the uncompressed file, shards, steps."""
    import zstandard
    from rich.console import Console

    from fermion.config import load_recipe
    from fermion.train.pretrain import pretrain, train_tokenizer

    compressed = tmp_path / "c4.jsonl.zst"
    compressed.write_bytes(zstandard.ZstdCompressor().compress(Path(C4).read_bytes()))
    plain, zst = (list(iter_documents(SourceConfig(name="c4", paths=[p]))) for p in (C4, str(compressed)))
    assert zst == plain and len(zst) == 300

    tiny = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
    recipe = load_recipe(tiny, [f"run.dir={tmp_path / 'run'}", f"data.sources.0.paths=[{compressed}]",
                                "data.sources.0.max_documents=null", "train.steps=3", "train.warmup_steps=1"])
    quiet = Console(quiet=True)
    assert Tokenizer.load(train_tokenizer(recipe, quiet)).vocab_size == recipe.tokenizer.vocab_size
    assert pretrain(recipe, console=quiet).step == 3
    index = load_index(tmp_path / "run" / "data")
    assert sum(index["sources"]["stories"][split]["documents"] for split in ("train", "val")) == 300
