"""`fermion serve`: the official openai client gets what `fermion generate` gets, streamed or not; concurrent
requests share decode steps and all finish correctly; a client that leaves frees its slot; every bad request is
refused in OpenAI's error format before any work, and the server keeps serving."""

import asyncio
import json
import re
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest
from conftest import HANG, REPO, cli, openai_client, running_server, tiny_model

from fermion.chat.templates import ChatTemplate
from fermion.infer.engine import Engine, SamplingParams
from fermion.serve.app import ServerConfig
from fermion.serve.protocol import MAX_STOP
from fermion.serve.scheduler import Busy, Scheduler

MODEL = "tiny-chat"


@pytest.fixture(scope="module")
def engine(shakespeare_tokenizer) -> Engine:
    model = tiny_model(vocab_size=shakespeare_tokenizer.vocab_size, context_length=256, init_std=0.3)
    return Engine(model, shakespeare_tokenizer, max_batch=8)


@pytest.fixture(scope="module")
def server(engine):
    with running_server(engine, ServerConfig(MODEL, ChatTemplate.get("chatml"))) as url:
        yield url


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai_client(server)


def health(url: str) -> dict:
    return httpx.get(f"{url}/health").json()


# ------------------------------------------------------------------------------------------ fermion generate


def generated_text(stdout: str, prompt: str = "") -> str:
    """What `fermion generate` printed for its one prompt (between the rule and the tokens/s line)."""
    body = re.search(r"─\n(.*)\n\d+ tokens in [\d.]+ s", stdout, re.S)
    assert body, stdout
    assert body.group(1).startswith(prompt)
    return body.group(1)[len(prompt):]


@pytest.fixture(scope="module")
def cli_server(tiny_run):
    """`fermion serve` itself, in its own process, on the tiny run (fp32, as `fermion generate --dtype fp32`)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "fermion", "serve", str(tiny_run), "--port", str(port),
                                "--dtype", "fp32", "--model-name", "tiny"], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + HANG
    while True:
        assert process.poll() is None, process.stdout.read()
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "fermion serve did not come up"
        time.sleep(0.2)
    yield url
    process.terminate()
    output = process.communicate(timeout=HANG)[0]
    assert "Traceback" not in output, output
    assert f"on http://127.0.0.1:{port}" in output  # loopback unless told otherwise


@pytest.mark.parametrize("sampling", [
    pytest.param({"temperature": 0.0}, id="greedy"),
    pytest.param({"temperature": 0.9, "seed": 7}, id="seeded")])
def test_openai_client_gets_what_fermion_generate_gets(cli_server, tiny_run, sampling):
    client = openai_client(cli_server)
    assert [m.id for m in client.models.list()] == ["tiny"]
    options = ["--temperature", str(sampling["temperature"]), "--top-k", "0", "--seed", str(sampling.get("seed", 0)),
           "--max-new-tokens", "24", "--dtype", "fp32"]

    prompt = "Once upon a time"
    result = cli("generate", str(tiny_run), "--prompt", prompt, *options)
    assert result.returncode == 0, result.stderr
    expected = generated_text(result.stdout, prompt)
    text = client.completions.create(model="tiny", prompt=prompt, max_tokens=24, **sampling)
    assert text.choices[0].text == expected and expected
    assert text.usage.completion_tokens <= 24 and text.usage.prompt_tokens > 0
    streamed = client.completions.create(model="tiny", prompt=prompt, max_tokens=24, stream=True, **sampling)
    assert "".join(chunk.choices[0].text for chunk in streamed if chunk.choices) == expected

    question = "Tell me about the king."
    result = cli("generate", str(tiny_run), "--chat", "--prompt", question, *options)
    assert result.returncode == 0, result.stderr
    expected = generated_text(result.stdout)
    messages = [{"role": "user", "content": question}]
    answer = client.chat.completions.create(model="tiny", messages=messages, max_tokens=24, **sampling)
    assert answer.choices[0].message.content == expected and answer.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=24, stream=True,
                                                 stream_options={"include_usage": True}, **sampling))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-1].usage.completion_tokens == answer.usage.completion_tokens
    assert chunks[-2].choices[0].finish_reason == answer.choices[0].finish_reason


# --------------------------------------------------------------------------------------------- the API


def test_streamed_and_whole_answers_agree_with_usage_n_and_stop(client, engine):
    messages = [{"role": "system", "content": "Speak as a player."}, {"role": "user", "content": "Who goes there?"}]
    extra = {"ignore_eos": True}  # a random model may end at once; these checks need text
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0,
                                           extra_body=extra)
    text, used = whole.choices[0].message.content, whole.usage.completion_tokens
    template = ChatTemplate.get("chatml")
    prompt = template.encode(engine.tokenizer, messages, add_generation_prompt=True).ids
    reference = engine.generate([prompt], SamplingParams(max_new_tokens=20, temperature=0, ignore_eos=True,
                                                         stop=template.stop_strings))[0]
    assert text == reference.text and len(text) >= 8
    assert whole.choices[0].finish_reason == reference.finish_reason  # this model happens to write <|im_end|>
    assert whole.usage.prompt_tokens == len(prompt) and used == len(reference.token_ids) <= 20
    assert whole.usage.total_tokens == len(prompt) + used

    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0,
                                                 stream=True, extra_body=extra))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert len({c.id for c in chunks}) == 1 and chunks[-1].choices[0].finish_reason == reference.finish_reason

    # n: each choice its own seeded draw; choice 0 is the n=1 answer with the same seed
    three = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=1.0, seed=3,
                                           n=3, extra_body=extra)
    one = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=1.0, seed=3,
                                         extra_body=extra)
    assert [c.index for c in three.choices] == [0, 1, 2]
    assert three.choices[0].message.content == one.choices[0].message.content
    assert len({c.message.content for c in three.choices}) > 1
    assert three.usage.prompt_tokens == len(prompt)
    streamed = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=1.0, seed=3,
                                              n=3, stream=True, extra_body=extra)
    parts = {0: "", 1: "", 2: ""}
    for chunk in streamed:
        for choice in chunk.choices:
            parts[choice.index] += choice.delta.content or ""
    assert [parts[i] for i in range(3)] == [c.message.content for c in three.choices]

    # stop: the text ends just before the first stop string, which is not included
    at = next(i for i in range(2, len(text) - 2) if text[i:i + 3].isascii() and text[i:i + 3].isprintable())
    stop = text[at:at + 3]
    stopped = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0,
                                             stop=[stop, "\u2603"], extra_body=extra)
    assert stopped.choices[0].message.content == text[:text.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"


def test_completions_take_several_prompts_token_ids_and_echo(client, engine):
    prompts = ["To be, or not", "Now is the winter"]
    many = client.completions.create(model=MODEL, prompt=prompts, max_tokens=8, temperature=0, n=2,
                                     extra_body={"ignore_eos": True})
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    assert many.choices[0].text == many.choices[1].text  # greedy: both choices of a prompt agree
    ids = engine.tokenizer.encode(prompts[1])
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=8, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert by_ids.choices[0].text == many.choices[2].text
    echoed = client.completions.create(model=MODEL, prompt=prompts[0], max_tokens=8, temperature=0, echo=True,
                                       extra_body={"ignore_eos": True})
    assert echoed.choices[0].text == prompts[0] + many.choices[0].text
    assert many.usage.prompt_tokens == sum(len(engine.tokenizer.encode(p)) for p in prompts)


def test_presence_penalty_changes_a_greedy_answer(client):
    plain = client.completions.create(model=MODEL, prompt="the the the", max_tokens=30, temperature=0,
                                      extra_body={"ignore_eos": True}).choices[0].text
    penalised = client.completions.create(model=MODEL, prompt="the the the", max_tokens=30, temperature=0,
                                          presence_penalty=2.0, frequency_penalty=2.0,
                                          extra_body={"ignore_eos": True}).choices[0].text
    assert plain != penalised


def test_response_format_json_schema_gives_valid_json(client):
    jsonschema = pytest.importorskip("jsonschema")
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 120}},
              "required": ["name", "age"], "additionalProperties": False}
    answer = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Give a person as JSON."}], max_tokens=60,
        temperature=0.8, seed=1,
        response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": schema}})
    assert answer.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(answer.choices[0].message.content), schema)


def test_models_health_and_the_chat_page(server):
    assert httpx.get(f"{server}/v1/models/{MODEL}").json()["id"] == MODEL
    state = health(server)
    assert state["status"] == "ok" and state["model"] == MODEL and state["slots"] == 8
    page = httpx.get(server)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "/v1/chat/completions" in page.text
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page.text)  # no external assets


# --------------------------------------------------------------------------------------- concurrency


def test_32_concurrent_streams_all_complete_correctly_in_shared_steps(server, engine):
    prompts = [f"{word} {i}" for i, word in enumerate(["Romeo", "Juliet", "Hamlet", "Lear"] * 8)]
    params = SamplingParams(max_new_tokens=16, temperature=0.0, ignore_eos=True)
    expected = [c.text for c in engine.generate([engine.tokenizer.encode(p) for p in prompts], params)]
    before = health(server)

    async def one(client: openai.AsyncOpenAI, prompt: str) -> tuple[str, str, int]:
        stream = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True})
        text, reason, used = "", None, None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].text
                reason = chunk.choices[0].finish_reason or reason
            if chunk.usage:
                used = chunk.usage.completion_tokens
        return text, reason, used

    async def all_of_them():
        async with openai.AsyncOpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0) as client:
            return await asyncio.gather(*(one(client, p) for p in prompts))

    results = asyncio.run(all_of_them())
    assert [text for text, _, _ in results] == expected
    assert all(reason == "length" and used == 16 for _, reason, used in results)
    after = health(server)
    steps, tokens = after["steps"] - before["steps"], after["tokens"] - before["tokens"]
    assert tokens == 32 * 16
    assert steps < tokens / 4  # continuous batching: many sequences per step, not one after another
    assert after["most_running"] == 8 and after["running"] == 0 and after["waiting"] == 0


def test_a_client_that_disconnects_frees_its_slot(server, engine):
    before = health(server)["aborted"]
    body = {"model": MODEL, "prompt": "Friends, Romans", "max_tokens": 200, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, timeout=HANG) as response:
        lines = response.iter_lines()
        assert sum(1 for line, _ in zip(lines, range(6), strict=False) if line.startswith("data:")) >= 2
    # the connection is closed mid-answer
    deadline = time.monotonic() + 60
    while health(server)["running"] or health(server)["aborted"] == before:
        assert time.monotonic() < deadline, health(server)
        time.sleep(0.05)
    assert not engine.active

    # a non-streaming client that leaves is noticed while it waits
    with socket.create_connection(("127.0.0.1", int(server.rsplit(":", 1)[1]))) as raw:
        payload = json.dumps({**body, "stream": False, "max_tokens": 240}).encode()
        raw.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
        deadline = time.monotonic() + 60
        while not health(server)["running"]:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    deadline = time.monotonic() + 60
    while health(server)["running"]:
        assert time.monotonic() < deadline, health(server)
        time.sleep(0.05)
    assert health(server)["aborted"] == before + 2


# -------------------------------------------------------------------------------------------- errors


BAD = [
    ("wrong type", "/v1/chat/completions", {"temperature": "hot"}, 400, "temperature"),
    ("wrong type: messages", "/v1/chat/completions", {"messages": "hello"}, 400, "messages"),
    ("negative max_tokens", "/v1/chat/completions", {"max_tokens": -5}, 400, "max_tokens"),
    ("zero max_tokens", "/v1/completions", {"max_tokens": 0}, 400, "max_tokens"),
    ("temperature too high", "/v1/completions", {"temperature": 2.5}, 400, "temperature"),
    ("top_p zero", "/v1/completions", {"top_p": 0}, 400, "top_p"),
    ("n too large", "/v1/completions", {"n": 1000}, 400, "n"),
    ("too many stops", "/v1/completions", {"stop": ["a"] * (MAX_STOP + 1)}, 400, "stop"),
    ("unknown field", "/v1/completions", {"frobnicate": True}, 400, "frobnicate"),
    ("unknown role", "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400,
     "messages.0.role"),
    ("tool without a function", "/v1/chat/completions", {"tools": [{"type": "function"}]}, 400, "tools.0.function"),
    ("logprobs above 5", "/v1/completions", {"logprobs": 6}, 400, "logprobs"),
    ("token id out of range", "/v1/completions", {"prompt": [1, 10**6]}, 400, "prompt"),
    ("empty prompt", "/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("missing model", "/v1/completions", {"model": None}, 400, "model"),
    ("unknown model", "/v1/chat/completions", {"model": "gpt-5"}, 404, "model"),
    ("oversized prompt", "/v1/completions", {"prompt": "word " * 400}, 400, "prompt"),
    ("oversized conversation", "/v1/chat/completions", {"messages": [{"role": "user", "content": "word " * 400}]}, 400,
     "messages"),
    ("prompt + max_tokens too long", "/v1/completions", {"max_tokens": 255}, 400, "max_tokens"),
]


@pytest.mark.parametrize("path, change, status, param", [case[1:] for case in BAD], ids=[case[0] for case in BAD])
def test_bad_requests_get_openai_errors_before_any_work_and_the_server_keeps_serving(server, path, change,
                                                                                      status, param):
    body = {"model": MODEL, "max_tokens": 4, **({"messages": [{"role": "user", "content": "Hi"}]}
                                                  if "chat" in path else {"prompt": "Hi"}), **change}
    body = {k: v for k, v in body.items() if v is not None}
    steps = health(server)["steps"]
    response = httpx.post(f"{server}{path}", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    assert error["param"] == param
    assert health(server)["steps"] == steps  # refused before any work
    ok = httpx.post(f"{server}/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2})
    assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_malformed_json_and_unknown_paths(server, client):
    for raw in (b"{not json", b"[1, 2]", b""):
        response = httpx.post(f"{server}/v1/chat/completions", content=raw,
                              headers={"content-type": "application/json"})
        assert response.status_code == 400 and "JSON" in response.json()["error"]["message"], raw
    missing = httpx.get(f"{server}/v1/engines")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "unknown_url"
    with pytest.raises(openai.NotFoundError, match="gpt-5"):
        client.chat.completions.create(model="gpt-5", messages=[{"role": "user", "content": "Hi"}])
    with pytest.raises(openai.BadRequestError, match="context length"):
        client.completions.create(model=MODEL, prompt="word " * 400)


def test_the_bearer_key_guards_the_api_when_configured(engine):
    with running_server(engine, ServerConfig(MODEL, ChatTemplate.get("chatml"), api_key="s3cret")) as url:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            response = httpx.get(f"{url}/v1/models", headers=headers)
            assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            openai_client(url, "wrong").models.list()
        keyed = openai_client(url, "s3cret")
        assert keyed.completions.create(model=MODEL, prompt="Hi", max_tokens=2).choices
        assert httpx.get(f"{url}/health").status_code == 200 and httpx.get(url).status_code == 200


def test_a_full_waiting_line_is_refused(engine):
    scheduler = Scheduler(engine, max_waiting=2)  # not started: nothing leaves the line
    jobs = lambda n: [object()] * n  # noqa: E731
    scheduler.submit(jobs(2))
    with pytest.raises(Busy, match="2 requests waiting"):
        scheduler.submit(jobs(1))


def test_serve_refuses_a_bad_model_path_in_one_line(tmp_path):
    result = cli("serve", str(tmp_path / "nothing"))
    assert result.returncode == 2 and "error:" in result.stderr
