"""The prefetcher hands out exactly the loader's batches, in order, and its state_dict describes the batches
consumed, not those read ahead: a loader restored from it continues with the very next batch."""

import numpy as np
import pytest
import torch

from fermion.data.shards import TokenLoader
from fermion.train.prefetch import Prefetcher


class FakeShards:
    """What TokenLoader reads from a ShardSet: two sources of random tokens, 3:1 weights."""

    shard_dir, split = "memory", "train"

    def __init__(self):
        rng = np.random.default_rng(0)
        self.tokens = {"a": rng.integers(0, 500, 5000), "b": rng.integers(0, 500, 1300)}
        self.sources, self.weights = ["a", "b"], {"a": 3.0, "b": 1.0}

    def num_windows(self, source, seq_len):
        return (len(self.tokens[source]) - 1) // seq_len

    def window(self, source, k, seq_len):
        return np.array(self.tokens[source][k * seq_len : k * seq_len + seq_len + 1], dtype=np.int64)


def token_loader():
    return TokenLoader(FakeShards(), seq_len=16, batch_size=3, seed=11)


def reference_batches(n):
    loader = token_loader()
    return [loader.next_batch() for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


@pytest.mark.parametrize("threaded", [False, True], ids=["passthrough", "thread"])
@pytest.mark.parametrize("depth", [1, 3])
def test_resume_from_state_continues_with_the_next_consumed_batch(threaded, depth):
    ref = reference_batches(12)
    prefetcher = Prefetcher(token_loader(), "cpu", depth=depth, threaded=threaded)
    for k in range(5):
        assert_batches_equal(prefetcher.next_batch(), ref[k])
    state = prefetcher.state_dict()
    assert state["position"] == 5 * 3  # five batches of three samples consumed, whatever was read ahead
    fresh = token_loader()
    fresh.load_state_dict(state)
    for k in range(5, 9):
        assert_batches_equal(fresh.next_batch(), ref[k])
        assert_batches_equal(prefetcher.next_batch(), ref[k])
    prefetcher.close()


def test_state_before_any_batch_and_load_state_dict_while_reading_ahead():
    ref = reference_batches(10)
    prefetcher = Prefetcher(token_loader(), "cpu", depth=3, threaded=True)
    assert prefetcher.state_dict() == token_loader().state_dict()
    assert_batches_equal(prefetcher.next_batch(), ref[0])
    assert_batches_equal(prefetcher.next_batch(), ref[1])
    after_two = prefetcher.state_dict()
    for k in range(2, 6):
        assert_batches_equal(prefetcher.next_batch(), ref[k])
    prefetcher.load_state_dict(after_two)  # as the trainer does when it resumes
    assert prefetcher.state_dict() == after_two
    for k in range(2, 8):
        assert_batches_equal(prefetcher.next_batch(), ref[k])
    prefetcher.close()  # stopping drops what was read ahead and rewinds the loader to what was consumed
    assert prefetcher.loader.state_dict() == prefetcher.state_dict()
    assert_batches_equal(prefetcher.next_batch(), ref[8])
    prefetcher.close()


class Failing:
    def __init__(self, fail_at):
        self.n, self.fail_at = 0, fail_at

    def next_batch(self):
        if self.n == self.fail_at:
            raise OSError("disk went away")
        self.n += 1
        return (torch.full((2,), self.n),)

    def state_dict(self):
        return {"n": self.n}

    def load_state_dict(self, state):
        self.n = state["n"]


def test_a_loader_error_reaches_the_caller_after_the_good_batches():
    prefetcher = Prefetcher(Failing(3), "cpu", depth=2, threaded=True)
    assert [int(prefetcher.next_batch()[0][0]) for _ in range(3)] == [1, 2, 3]
    with pytest.raises(OSError, match="disk went away"):
        prefetcher.next_batch()
    assert prefetcher.state_dict() == {"n": 3}


def test_dict_batches_and_loader_attributes_pass_through():
    class DictLoader(Failing):
        def next_batch(self):
            self.n += 1
            return {"x": torch.tensor([self.n])}

    prefetcher = Prefetcher(DictLoader(99), "cpu", threaded=True)
    assert int(prefetcher.next_batch()["x"]) == 1
    assert prefetcher.fail_at == 99
    prefetcher.close()
    assert Prefetcher(token_loader(), "cpu").passes(10).keys() == {"a", "b"}
    with pytest.raises(ValueError):
        Prefetcher(token_loader(), "cpu", depth=0)
