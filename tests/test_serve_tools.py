"""The OpenAI parameters clients send every day, through the official client: tools / tool_choice /
parallel_tool_calls against a model fine-tuned here on the built-in tinytask data, logprobs / top_logprobs checked
against a forward pass of the model, and logit_bias."""

import json

import httpx
import jsonschema
import openai
import pytest
import torch
import torch.nn.functional as F
from conftest import openai_client, running_server, tiny_model
from openai.lib.streaming.chat import ChatCompletionStreamState

from fermion.chat.templates import BUILTIN, ChatTemplate
from fermion.chat.tools import SYSTEM, fold, parse_calls, signature
from fermion.config import TokenizerConfig
from fermion.data.synthetic import tinytask
from fermion.data.tokenizer import Tokenizer
from fermion.infer.engine import Engine, SamplingParams
from fermion.serve.app import ServerConfig
from fermion.serve.tools import CallReader
from fermion.train.objectives import IGNORE_INDEX
from fermion.train.sft import collate_padded, encode

pytest.importorskip("llguidance")  # forced calls decode under the tools' JSON Schemas

MODEL = "tinytask"
FAMILY = ("calculate", "convert_units")  # tinytask's tools with the shortest answers: learnt in the fewest steps
STEPS = 160  # 80 leave its answers broken JSON; from 120 on, every held-out one tried is the right tool's call


@pytest.fixture(scope="module")
def tuned() -> Engine:
    """A 2-layer model fine-tuned in this process on the built-in tinytask SFT records of one family through chatml,
    with a tokenizer trained on them (about 10 s of one core). One thread: these matmuls are too small to gain from
    two, and two threads per process slow to a crawl when other processes share the cores (measured: 200 steps took
    13 s of CPU on one thread, 102 s on two, at a load average of 6 on 2 cores)."""
    template = ChatTemplate.get("chatml")
    records = [r for r in tinytask.sft_records(1200, seed=0) if json.loads(r["messages"][2]["content"])["name"]
               in FAMILY]
    tokenizer = Tokenizer.train((template.render(r["messages"]) for r in records),
                                TokenizerConfig(vocab_size=512, train_bytes=1_000_000))
    examples = [encode(template, tokenizer, r["messages"], 256, "drop", str(i))[0] for i, r in enumerate(records)]
    model = tiny_model(vocab_size=tokenizer.vocab_size, context_length=256, ffn_hidden=192).train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(model, examples, tokenizer.pad_id)
    finally:
        torch.set_num_threads(threads)
    return Engine(model.eval(), tokenizer, max_batch=8)


def train(model, examples, pad_id: int, lr: float = 5e-3) -> None:
    """SFT's loss (the assistant's tokens only, as train/sft.encode masks them), 16 conversations a step, the
    learning rate falling linearly to zero."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    for step in range(STEPS):
        inputs, targets = collate_padded([examples[(step * 16 + i) % len(examples)] for i in range(16)], pad_id)
        logits, _ = model(inputs)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        for group in optimizer.param_groups:
            group["lr"] = lr * (1 - step / STEPS)


@pytest.fixture(scope="module")
def server(tuned):
    with running_server(tuned, ServerConfig(MODEL, ChatTemplate.get("chatml"))) as url:
        yield url


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai_client(server)


def held_out_problem(name: str) -> tinytask.Problem:
    return next(p for p in tinytask.problems(20) if p.answer["name"] == name)


def openai_tools(problem: tinytask.Problem) -> list[dict]:
    return [{"type": "function", "function": function} for function in problem.tools]


def streamed(client: openai.OpenAI, **request):
    """The official client's own accumulation of a stream (what its `.stream()` helper returns)."""
    state = ChatCompletionStreamState()
    for chunk in client.chat.completions.create(model=MODEL, stream=True, **request):
        state.handle_chunk(chunk)
    return state.get_final_completion()


# --------------------------------------------------------------------------------------------------------- tools


@pytest.mark.parametrize("name", list(BUILTIN))
def test_tools_render_as_the_tinytask_data_trains_them(name):
    template = ChatTemplate.get(name)
    problem = held_out_problem("book_hotel")
    trained = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": tinytask.user_text(problem)}]
    asked = [{"role": "user", "content": problem.request}]
    assert template.render(asked, add_generation_prompt=True, tools=openai_tools(problem)) == \
        template.render(trained, add_generation_prompt=True)
    # the conversation's own system message follows the tools' line; calls and results become plain turns
    call = {"id": "call_1", "type": "function", "function": {"name": "book_hotel", "arguments": {"nights": 2}}}
    conversation = [{"role": "system", "content": "Be brief."}, *asked,
                    {"role": "assistant", "content": "", "tool_calls": [call]},
                    {"role": "tool", "tool_call_id": "call_1", "name": "book_hotel", "content": "booked"}]
    assert fold(conversation, openai_tools(problem)) == [
        {"role": "system", "content": SYSTEM + "\n\nBe brief."}, trained[1],
        {"role": "assistant", "content": '{"name": "book_hotel", "arguments": {"nights": 2}}', "tool_calls": [call]},
        {"role": "user", "content": "Result of book_hotel: booked"}]
    template.render(conversation, add_generation_prompt=True, tools=openai_tools(problem))
    # any JSON Schema gets a signature: types where tinytask's have hints, optional arguments marked
    weather = {"name": "weather", "description": "The weather now.", "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "unit": {"enum": ["C", "F"]}}, "required": ["city"]}}
    assert signature(weather) == "weather(city: string, unit?: C|F) - The weather now."


def test_a_template_that_reads_tools_gets_them_as_transformers_passes_them():
    template = ChatTemplate.get(
        "{% for t in tools %}{{ t.function.name }};{% endfor %}{% for m in messages %}{{ m.role }}:{{ m.content }}"
        "{% for c in m.tool_calls or [] %}{{ c.function.arguments.a }}{% endfor %}|{% endfor %}")
    assert template.reads_tools and not ChatTemplate.get("chatml").reads_tools
    tools = openai_tools(held_out_problem("calculate"))
    call = {"id": "c", "type": "function", "function": {"name": "calculate", "arguments": {"a": 7}}}
    conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "", "tool_calls": [call]},
                    {"role": "tool", "tool_call_id": "c", "content": "9"}]
    assert template.render(conversation, tools=tools) == \
        "".join(f"{t['function']['name']};" for t in tools) + "user:hi|assistant:7|tool:9|"


def test_calls_are_read_in_the_tinytask_and_hermes_forms_and_streamed_only_when_they_cannot_be_calls():
    names = {"calculate", "convert_units"}
    call = {"name": "calculate", "arguments": {"operation": "add", "a": 1, "b": 2}}
    text = json.dumps(call)
    assert parse_calls(text, names) == [call]
    assert parse_calls(f"<tool_call>\n{text}\n</tool_call>\n<tool_call>{text}</tool_call>", names) == [call, call]
    assert parse_calls(f"{text}\n{text}", names) == [call, call]
    for not_calls in (text[:-1], '{"name": "book_hotel", "arguments": {}}', '{"answer": 3}', "3", f"So: {text}"):
        assert parse_calls(not_calls, names) is None, not_calls

    def read(text: str, parallel: bool = True) -> tuple[list[str], list[dict]]:
        reader = CallReader(names, forced=False, parallel=parallel)
        shown = [reader.feed(text[i:i + 3]) for i in range(0, len(text), 3)]
        rest, calls = reader.finish()
        return [piece for piece in [*shown, rest] if piece], calls

    shown, calls = read(f"Adding. <tool_call>{text}</tool_call><tool_call>{text}</tool_call>", parallel=False)
    assert "".join(shown) == "Adding. " and len(shown) > 1 and calls == [call]  # the text streams, the call waits
    shown, calls = read(f"  {text[:-1]}")  # broken JSON: held to the end, then shown as it was
    assert shown == [f"  {text[:-1]}"] and calls == []
    shown, calls = read("Three <tool and four")
    assert "".join(shown) == "Three <tool and four" and calls == []


def test_a_forced_call_parses_against_the_tools_schema_whole_and_streamed(client, tuned):
    problem = held_out_problem("convert_units")
    request = dict(messages=[{"role": "user", "content": problem.request}], tools=openai_tools(problem),
                   tool_choice={"type": "function", "function": {"name": "convert_units"}}, temperature=0.7, seed=3,
                   max_tokens=60, parallel_tool_calls=False)
    whole = client.chat.completions.create(model=MODEL, **request)
    choice = whole.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "convert_units"
    jsonschema.validate(json.loads(call.function.arguments), tinytask.TOOLS["convert_units"]["parameters"])

    again = streamed(client, **request).choices[0]
    assert again.finish_reason == "tool_calls" and again.message.content is None
    assert [(c.function.name, c.function.arguments) for c in again.message.tool_calls] == \
        [(call.function.name, call.function.arguments)]

    # "required": a call of one of the offered tools
    required = client.chat.completions.create(model=MODEL, **{**request, "tool_choice": "required"}).choices[0]
    assert required.finish_reason == "tool_calls" and required.message.tool_calls[0].function.name in FAMILY

    # the call and the tool's result sent back render as plain turns the template knows
    follow_up = request["messages"] + [choice.message, {"role": "tool", "tool_call_id": call.id, "content": "42"}]
    answer = client.chat.completions.create(model=MODEL, messages=follow_up, tools=request["tools"], max_tokens=8)
    expected = ChatTemplate.get("chatml").encode(tuned.tokenizer, [
        {"role": "system", "content": SYSTEM}, {"role": "user", "content": tinytask.user_text(problem)},
        {"role": "assistant", "content": json.dumps({"name": "convert_units",
                                                     "arguments": json.loads(call.function.arguments)})},
        {"role": "user", "content": "Result of convert_units: 42"}], add_generation_prompt=True)
    assert answer.usage.prompt_tokens == len(expected.ids)
    with pytest.raises(openai.BadRequestError, match="no call has the id"):
        client.chat.completions.create(model=MODEL, messages=[*follow_up[:1], follow_up[2]], max_tokens=4)


def test_the_tuned_model_calls_a_tool_unforced_and_tool_choice_none_leaves_the_tools_out(client, tuned):
    problem = held_out_problem("calculate")
    request = dict(messages=[{"role": "user", "content": problem.request}], tools=openai_tools(problem),
                   temperature=0, max_tokens=60)
    choice = client.chat.completions.create(model=MODEL, **request).choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert [c.function.name for c in choice.message.tool_calls] == ["calculate"]
    again = streamed(client, **request).choices[0]
    assert again.finish_reason == "tool_calls"
    assert [(c.function.name, c.function.arguments) for c in again.message.tool_calls] == \
        [(c.function.name, c.function.arguments) for c in choice.message.tool_calls]

    none = client.chat.completions.create(model=MODEL, **{**request, "tool_choice": "none", "max_tokens": 8})
    assert none.choices[0].message.tool_calls is None and none.choices[0].finish_reason in ("stop", "length")
    plain = ChatTemplate.get("chatml").encode(tuned.tokenizer, request["messages"], add_generation_prompt=True)
    assert none.usage.prompt_tokens == len(plain.ids)


@pytest.mark.parametrize("change, param", [
    ({"tool_choice": {"type": "function", "function": {"name": "book_flight"}}}, "tool_choice"),
    ({"tool_choice": "required", "tools": None}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f g"}}]}, "tools.0.function.name"),
    ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
    ({"messages": [{"role": "tool", "content": "4"}]}, "messages.0"),
])
def test_bad_tool_requests_are_refused_naming_the_field(server, change, param):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Add 2 and 2."}],
            "tools": openai_tools(held_out_problem("calculate")), **change}
    response = httpx.post(f"{server}/v1/chat/completions", json={k: v for k, v in body.items() if v is not None})
    assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text


# ------------------------------------------------------------------------------------------------------ logprobs


def forward_logprobs(engine: Engine, prompt: list[int], generated: list[int]) -> torch.Tensor:
    """The model's log-softmax at each generated position, from one forward pass over prompt + generated."""
    with torch.no_grad():
        logits, _ = engine.model(torch.tensor([prompt + generated]))
    return logits[0, len(prompt) - 1:-1].float().log_softmax(-1)


def test_chat_logprobs_are_the_models_own_whole_and_streamed(client, tuned):
    messages = [{"role": "user", "content": "What is 3 plus 4?"}]
    request = dict(messages=messages, max_tokens=12, temperature=0, logprobs=True, top_logprobs=3)
    answer = client.chat.completions.create(model=MODEL, **request)
    prompt = ChatTemplate.get("chatml").encode(tuned.tokenizer, messages, add_generation_prompt=True).ids
    generated = tuned.generate([prompt], SamplingParams(max_new_tokens=12, temperature=0, stop=["<|im_end|>"]))[0]
    reference = forward_logprobs(tuned, prompt, generated.token_ids)
    content = answer.choices[0].logprobs.content
    assert len(content) == len(generated.token_ids) == answer.usage.completion_tokens > 0
    for entry, token, row in zip(content, generated.token_ids, reference, strict=True):
        assert bytes(entry.bytes) == tuned.tokenizer.piece(token)
        assert entry.logprob == pytest.approx(float(row[token]), abs=1e-4)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(row.topk(3).values.tolist(), abs=1e-4)
        assert entry.top_logprobs[0].logprob >= entry.logprob - 1e-6  # greedy: the sampled token is the top one
    chunks = list(client.chat.completions.create(model=MODEL, stream=True, **request))
    flat = [e for c in chunks for choice in c.choices if choice.logprobs for e in choice.logprobs.content]
    assert [e.model_dump() for e in flat] == [e.model_dump() for e in content]


@pytest.mark.parametrize("stream", [False, True])
def test_completion_logprobs_are_the_models_own_before_temperature_and_top_k(client, tuned, stream):
    prompt = tuned.tokenizer.encode("Compute 5 + 6.")
    sampling = dict(max_new_tokens=10, temperature=1.5, top_k=5, seed=11, ignore_eos=True)
    generated = tuned.generate([prompt], SamplingParams(**sampling))[0]
    reference = forward_logprobs(tuned, prompt, generated.token_ids)
    answer = client.completions.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=1.5, seed=11,
                                       logprobs=2, stream=stream, extra_body={"top_k": 5, "ignore_eos": True})
    parts = list(answer) if stream else [answer]
    got = {key: [x for part in parts for choice in part.choices if choice.logprobs
                 for x in getattr(choice.logprobs, key)]
           for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
    text = "".join(choice.text for part in parts for choice in part.choices)
    assert text == generated.text
    pieces = [tuned.tokenizer.piece(t).decode("utf-8", "replace") for t in generated.token_ids]
    assert got["tokens"] == pieces
    assert got["token_logprobs"] == pytest.approx([float(row[t]) for row, t in zip(reference, generated.token_ids,
                                                                                      strict=True)], abs=1e-4)
    assert got["text_offset"] == [len("".join(pieces[:i])) for i in range(len(pieces))]
    for top, token, row in zip(got["top_logprobs"], pieces, reference, strict=True):
        best = row.topk(2).values.tolist()
        assert token in top and 2 <= len(top) <= 3
        assert sorted(top.values(), reverse=True)[:2] == pytest.approx(best, abs=1e-4)


def test_completion_logprobs_0_gives_the_sampled_tokens_alone(client):
    choice = client.completions.create(model=MODEL, prompt="Add 2 and 3.", max_tokens=5, temperature=0, logprobs=0,
                                       extra_body={"ignore_eos": True}).choices[0]
    assert len(choice.logprobs.tokens) == len(choice.logprobs.token_logprobs) == 5
    assert [list(top) for top in choice.logprobs.top_logprobs] == [[token] for token in choice.logprobs.tokens]
    assert all(lp <= 0 for lp in choice.logprobs.token_logprobs)


@pytest.mark.parametrize("path, change, param", [
    ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("/v1/completions", {"logprobs": 6}, "logprobs"),
    ("/v1/completions", {"logprobs": 1, "echo": True}, None),
    ("/v1/completions", {"logit_bias": {"abc": 1}}, "logit_bias"),
    ("/v1/completions", {"logit_bias": {"100000": 1}}, "logit_bias"),
    ("/v1/completions", {"logit_bias": {"5": 1e300}}, "logit_bias.5"),
    ("/v1/chat/completions", {"logit_bias": {"5": -101}}, "logit_bias.5"),
])
def test_bad_logprobs_and_logit_bias_are_refused_naming_the_field(server, path, change, param):
    body = {"model": MODEL, "max_tokens": 2, **change,
            **({"messages": [{"role": "user", "content": "Hi"}]} if "chat" in path else {"prompt": "Hi"})}
    response = httpx.post(f"{server}{path}", json=body)
    assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text


# ---------------------------------------------------------------------------------------------------- logit_bias


def test_logit_bias_forces_and_bans_a_token(client, tuned):
    tokenizer = tuned.tokenizer
    forced = tokenizer.encode(" Paris")[0]

    def greedy(bias: dict) -> list[int]:
        choice = client.completions.create(model=MODEL, prompt="What is 7 times 8?", max_tokens=4, temperature=0,
                                           logit_bias=bias, logprobs=0, extra_body={"ignore_eos": True}).choices[0]
        return choice.logprobs.tokens

    assert greedy({str(forced): 100}) == [tokenizer.piece(forced).decode()] * 4
    plain = greedy({})
    first = tuned.generate([tokenizer.encode("What is 7 times 8?")], SamplingParams(max_new_tokens=1, temperature=0,
                                                                                   ignore_eos=True))[0].token_ids[0]
    assert plain[0] == tokenizer.piece(first).decode()
    assert greedy({str(first): -100})[0] != plain[0]


def test_the_engine_refuses_a_bias_or_logprobs_out_of_range(tuned):
    for bad in ({"logit_bias": {3: 1e300}}, {"logit_bias": {3: float("nan")}}, {"logit_bias": {-1: 1.0}},
                {"logprobs": 21}, {"logprobs": -1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SamplingParams(**bad)
    with pytest.raises(ValueError, match="logit_bias: token id 100000 is outside the vocabulary"):
        tuned.add([1, 2], SamplingParams(logit_bias={100000: 1.0}))
    assert not tuned.active
