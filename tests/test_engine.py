"""The generation engine: KV-cached decoding equals the plain forward pass, batching changes nothing, streaming
never splits a character or shows part of a stop string, and each sampling control does what it says."""


import pytest
import torch
from conftest import tiny_model

from fermion.data.tokenizer import Tokenizer
from fermion.infer.engine import Engine, IncrementalDecoder, SamplingParams, sample
from fermion.model.transformer import Transformer


@pytest.fixture(scope="module")
def tokenizer(shakespeare_tokenizer) -> Tokenizer:
    return shakespeare_tokenizer


def build(vocab: int, **overrides) -> Transformer:
    # A large init spread gives random weights varied, confident predictions, so token equality means something.
    return tiny_model(**{"vocab_size": vocab, "context_length": 96, "init_std": 0.3, **overrides})


@torch.no_grad()
def uncached_greedy(model: Transformer, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    for _ in range(n):
        logits, _ = model(torch.tensor([ids]))
        ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt):]


GREEDY = SamplingParams(max_new_tokens=40, temperature=0.0, ignore_eos=True)
VARIANTS = {"gqa": {}, "mha-tied": {"n_kv_heads": 4, "tie_embeddings": True}, "mqa-qknorm": {"n_kv_heads": 1,
            "qk_norm": True}, "window": {"sliding_window": 8}, "moe": {"moe": {"n_experts": 4, "top_k": 2}}}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cached_decode_equals_uncached_forward_and_batching_changes_nothing(tokenizer, variant):
    model = build(tokenizer.vocab_size, **VARIANTS[variant])
    prompts = [tokenizer.encode(t) for t in ("First Citizen:\nBefore we", "O", "My lord, I have heard it said")]
    expected = [uncached_greedy(model, p, 40) for p in prompts]
    assert all(len(set(tokens)) > 5 for tokens in expected)  # varied output, not one token repeated

    alone = [Engine(model, tokenizer, max_batch=1).generate([p], GREEDY)[0].token_ids for p in prompts]
    together = Engine(model, tokenizer, max_batch=4).generate(prompts, GREEDY)
    assert alone == expected  # 40 tokens: past the 8-token window when there is one
    assert [c.token_ids for c in together] == expected
    # Fewer slots than prompts: sequences join as others finish, in different rows, with the same results.
    staggered = Engine(model, tokenizer, max_batch=2).generate(
        prompts, [SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True) for n in (40, 5, 40)])
    assert [c.token_ids for c in staggered] == [expected[0], expected[1][:5], expected[2]]


def test_cached_logits_match_the_forward_pass(tokenizer):
    model = build(tokenizer.vocab_size, sliding_window=8)
    prompt = tokenizer.encode("Good morrow, cousin; how fares the king?")
    engine = Engine(model, tokenizer, max_batch=2)
    seq = engine.add(prompt, GREEDY)
    tokens = torch.tensor([[seq.pending]])
    positions = torch.tensor([[seq.position]])
    cached = engine._forward(tokens, positions, 0, seq.position + 1)
    with torch.no_grad():
        full, _ = model(torch.tensor([prompt]))
    assert (cached[0] - full[0, -1]).abs().max().item() < 1e-5


def test_streaming_pieces_concatenate_to_the_whole_text(tokenizer):
    model = build(tokenizer.vocab_size)
    engine = Engine(model, tokenizer)
    prompt = tokenizer.encode("KING RICHARD:")
    params = SamplingParams(max_new_tokens=60, temperature=1.0, seed=7, ignore_eos=True)
    whole = engine.generate([prompt], params)[0]
    pieces = list(engine.stream(prompt, params))
    assert "".join(pieces) == whole.text == tokenizer.decode(whole.token_ids)
    assert len(pieces) > 10


def test_incremental_decoder_never_splits_a_character(tokenizer):
    text = "naïve café — 世界 🎉 done"
    ids = tokenizer.encode(text)
    assert len(ids) > len(text) // 2  # an English vocabulary: the non-ASCII characters are split into bytes
    decoder = IncrementalDecoder(tokenizer)
    pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in piece for piece in pieces)


def test_stop_strings_and_tokens_end_generation_without_showing_the_stop(tokenizer):
    model = build(tokenizer.vocab_size)
    engine = Engine(model, tokenizer)
    prompt = tokenizer.encode("To be, or not")
    full = engine.generate([prompt], GREEDY)[0]
    stop = full.text[20:24]
    cut = full.text.index(stop)
    params = SamplingParams(max_new_tokens=40, temperature=0.0, ignore_eos=True, stop=["@@never@@", stop])
    stopped = engine.generate([prompt], params)[0]
    assert stopped.text == full.text[:cut] and stopped.finish_reason == "stop"
    pieces = list(engine.stream(prompt, params))
    assert "".join(pieces) == full.text[:cut]

    token = full.token_ids[10]
    first = full.token_ids.index(token)
    by_token = engine.generate([prompt], SamplingParams(max_new_tokens=40, temperature=0.0, stop_token_ids=[token]))[0]
    assert by_token.token_ids == full.token_ids[:first] and by_token.finish_reason == "stop"
    assert full.finish_reason == "length" and len(full.token_ids) == 40


def test_generation_stops_at_the_end_of_the_context(tokenizer):
    model = build(tokenizer.vocab_size, context_length=32)
    engine = Engine(model, tokenizer)
    out = engine.generate([list(range(10, 30))], SamplingParams(max_new_tokens=100, temperature=0.0, ignore_eos=True))
    assert out[0].finish_reason == "length" and 20 + len(out[0].token_ids) == 33  # the last token is never fed
    assert out[0].token_ids == uncached_greedy(model, list(range(10, 30)), 13)
    with pytest.raises(ValueError, match="prompt has 32 tokens"):
        engine.add(list(range(32)), GREEDY)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.add([tokenizer.vocab_size + 5], GREEDY)


def test_sampling_controls():
    logits = torch.tensor([3.0, 2.9, 1.0, 0.5, -1.0])
    draws = lambda p, n=1000: {sample(logits.clone(), p, torch.tensor([], dtype=torch.long),  # noqa: E731
                                     torch.Generator().manual_seed(s)) for s in range(n)}
    assert draws(SamplingParams(temperature=0.0)) == {0}
    assert draws(SamplingParams(temperature=1.0, top_k=1)) == {0}
    assert draws(SamplingParams(temperature=1.0, top_k=2)) == {0, 1}
    assert draws(SamplingParams(temperature=1.0)) == {0, 1, 2, 3, 4}
    # top_p: the top two hold ~0.76 of the mass, so 0.7 keeps both and nothing else.
    assert draws(SamplingParams(temperature=1.0, top_p=0.7)) == {0, 1}
    assert draws(SamplingParams(temperature=1.0, top_p=0.3)) == {0}
    assert draws(SamplingParams(temperature=1.0, min_p=0.5)) == {0, 1}
    assert draws(SamplingParams(temperature=1.0, min_p=0.25)) == {0, 1}
    assert draws(SamplingParams(temperature=2.0, min_p=0.25)) == {0, 1, 2, 3}  # a flatter distribution keeps more
    penalised = sample(logits.clone(), SamplingParams(temperature=0.0, repetition_penalty=2.0),
                       torch.tensor([0]), torch.Generator())
    assert penalised == 1
    greedy = lambda p, generated: sample(logits.clone(), p, torch.tensor([], dtype=torch.long),  # noqa: E731
                                         torch.Generator(), generated)
    # presence: 0.15 once for token 0 makes 2.85 < 2.9; frequency: 0.04 per occurrence takes three to drop below 1.
    assert greedy(SamplingParams(temperature=0.0, presence_penalty=0.15), [0]) == 1
    assert greedy(SamplingParams(temperature=0.0, presence_penalty=0.05), [0, 0, 0]) == 0
    assert greedy(SamplingParams(temperature=0.0, frequency_penalty=0.04), [0, 0]) == 0
    assert greedy(SamplingParams(temperature=0.0, frequency_penalty=0.04), [0, 0, 0, 4]) == 1
    assert greedy(SamplingParams(temperature=0.0, presence_penalty=-2.0), [1]) == 1  # negative: encourages
    seeded = [sample(logits.clone(), SamplingParams(temperature=1.0), torch.tensor([], dtype=torch.long),
                     torch.Generator().manual_seed(3)) for _ in range(5)]
    assert len(set(seeded)) == 1


@pytest.mark.parametrize("field, value", [
    ("max_new_tokens", 0), ("temperature", -1.0), ("top_p", 0.0), ("top_k", -2), ("min_p", 1.0),
    ("repetition_penalty", 0.0), ("presence_penalty", 2.5), ("frequency_penalty", -3.0),
    # Each of these passed before and made sampling see inf or NaN, or torch refuse the seed.
    ("temperature", 2.5), ("temperature", float("nan")), ("temperature", float("inf")), ("top_p", float("nan")),
    ("min_p", float("nan")), ("repetition_penalty", 1e-300), ("repetition_penalty", 1e300),
    ("repetition_penalty", float("inf")), ("repetition_penalty", float("nan")), ("presence_penalty", float("nan")),
    ("frequency_penalty", float("inf")), ("top_k", 2**31), ("seed", 2**64), ("seed", -(2**63) - 1), ("seed", 1.5)])
def test_bad_sampling_parameters_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"^{field} = .* must be"):
        SamplingParams(**{field: value})


def test_tiny_positive_temperature_and_top_p_sample_the_top_token():
    """1e-300 is a valid temperature and 5e-324 a valid top_p; in float32 the one made logits inf and probabilities
    NaN, the other was 0 and dropped every token: torch.multinomial raised."""
    logits = torch.tensor([3.0, 2.9, 1.0, 0.5, -1.0])
    for params in (SamplingParams(temperature=1e-300), SamplingParams(temperature=1e-30),
                   SamplingParams(temperature=1.0, top_p=5e-324)):
        draws = {sample(logits.clone(), params, torch.tensor([], dtype=torch.long), torch.Generator().manual_seed(s))
                 for s in range(50)}
        assert draws == {0}, params


def test_decoding_under_autocast_from_fp32_weights(tokenizer):
    # RL samples rollouts from the policy's fp32 master weights under the trainer's bf16 autocast: the KV cache holds
    # the weights' dtype and takes the bf16 keys and values (it used to raise "Index put requires ... dtypes match").
    model = build(tokenizer.vocab_size)
    prompts = [tokenizer.encode(t) for t in ("First Citizen:\nBefore we", "O")]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        done = Engine(model, tokenizer, max_batch=2).generate(prompts, GREEDY)
    assert [len(c.token_ids) for c in done] == [40, 40]
