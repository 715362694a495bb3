"""`fermion chat`: each turn sends the whole conversation through the template and streams exactly what the engine
generates for it, the /commands do what they say, an overlong conversation loses its oldest turns, Ctrl-C takes
the turn back, and the command works end to end with piped input."""

import json
import re

import pytest
from conftest import cli, tiny_model

from fermion.chat.conversations import to_messages
from fermion.chat.templates import ChatTemplate
from fermion.infer.engine import Engine, SamplingParams
from fermion.infer.repl import ChatSession

# ignore_eos: a random model often says eos at once, and an empty answer would prove nothing about turn two.
GREEDY = SamplingParams(max_new_tokens=10, temperature=0.0, ignore_eos=True)
SPEED = re.compile(r"^\d+ tokens in \d+\.\d\d s · [\d,]+\.\d tokens/s$")


@pytest.fixture(scope="module")
def engine(shakespeare_tokenizer) -> Engine:
    model = tiny_model(vocab_size=shakespeare_tokenizer.vocab_size, context_length=256, init_std=0.3)
    return Engine(model, shakespeare_tokenizer, max_batch=1)


def say(session: ChatSession, line: str) -> tuple[str, list[str]]:
    """The answer text and the notes one input line produces."""
    pieces = list(session.handle(line))
    return "".join(p.text for p in pieces if p.kind == "answer"), [p.text for p in pieces if p.kind == "note"]


@pytest.mark.parametrize("name", ["chatml", "alpaca", "tagged"])
def test_each_turn_streams_what_the_engine_generates_for_the_whole_conversation(engine, name):
    template = ChatTemplate.get(name)
    session = ChatSession(engine, template, GREEDY, system="Answer as a player would.")
    first, notes = say(session, "Who goes there?")
    assert first and SPEED.match(notes[-1])
    assert session.messages == [{"role": "user", "content": "Who goes there?"},
                                {"role": "assistant", "content": first}]

    conversation = session.conversation() + [{"role": "user", "content": "Stand and unfold yourself."}]
    expected = template.encode(engine.tokenizer, conversation, add_generation_prompt=True)
    second, notes = say(session, "Stand and unfold yourself.")
    assert engine.last.prompt_ids == expected.ids
    assert first in expected.text and expected.text.startswith("Answer as a player would.") == (name == "alpaca")
    assert second == engine.generate([expected.ids], session.params)[0].text
    assert SPEED.match(notes[-1]) and notes[-1].startswith(f"{len(engine.last.token_ids)} tokens")
    assert [m["role"] for m in session.conversation()] == ["system", "user", "assistant", "user", "assistant"]


def test_system_reset_and_temperature_commands(engine):
    session = ChatSession(engine, ChatTemplate.get("chatml"), GREEDY)
    assert say(session, "/system") == ("", ["no system prompt (set one: /system TEXT)"])
    assert say(session, "/system Speak in verse.")[1] == ["system prompt set to 'Speak in verse.'"]
    say(session, "Hail!")
    assert len(session.messages) == 2
    assert say(session, "/reset")[1] == ["conversation cleared (system prompt kept)"]
    assert session.conversation() == [{"role": "system", "content": "Speak in verse."}]

    assert say(session, "/temp 1.3")[1] == ["temperature set to 1.3"] and session.params.temperature == 1.3
    assert say(session, "/temp 0")[1] == ["temperature set to 0 (greedy)"]
    for bad, message in [("warm", "/temp takes a number in [0, 2], not 'warm'"), ("", "/temp takes a number in [0, 2]"),
                         ("-1", "temperature = -1.0 must be in [0, 2]"), ("nan", "temperature = nan must be in [0, 2]"),
                         ("2.5", "temperature = 2.5 must be in [0, 2]")]:
        assert say(session, f"/temp {bad}")[1][0].startswith(message)
    assert session.params.temperature == 0
    assert session.params.stop == ["<|im_end|>"]  # the template's end of turn stops an answer


def test_save_writes_a_conversation_sft_reads(engine, tmp_path):
    session = ChatSession(engine, ChatTemplate.get("tagged"), GREEDY, system="Be brief.")
    answer, _ = say(session, "What news?")
    path = tmp_path / "talk.json"
    assert say(session, f"/save {path}")[1] == [f"saved 2 messages to {path}"]
    record = json.loads(path.read_text(encoding="utf-8"))
    assert to_messages(record, "talk.json") == [{"role": "system", "content": "Be brief."},
                                                {"role": "user", "content": "What news?"},
                                                {"role": "assistant", "content": answer}]
    assert say(session, f"/save {path / 'x.json'}")[1][0].startswith("could not save to")  # under a file
    new = tmp_path / "new" / "talk.json"  # a folder that does not exist yet is made
    assert say(session, f"/save {new}")[1] == [f"saved 2 messages to {new}"]
    new.unlink()
    new.parent.rmdir()
    assert say(session, "/save")[1] == ["/save needs a path: /save chat.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["talk.json"]  # no temporary file left behind


def test_unknown_command_lists_the_valid_ones_and_exit_ends(engine):
    session = ChatSession(engine, ChatTemplate.get("chatml"), GREEDY)
    (listing,) = say(session, "/quit")[1]
    assert listing.startswith("unknown command /quit; the commands are:")
    assert all(f"\n/{name} " in listing for name in ("system", "reset", "temp", "save", "help", "exit"))
    assert say(session, "/help")[1][0] == listing.split("\n", 1)[1]
    assert say(session, "   ") == ("", []) and not session.messages and not session.done
    say(session, "/exit")
    assert session.done


def test_an_overlong_conversation_drops_its_oldest_turn_and_keeps_the_system_prompt(engine):
    template = ChatTemplate.get("chatml")
    session = ChatSession(engine, template, GREEDY, system="Be brief.")
    say(session, "Tell me of the king and all his court, his horses and his hounds.")
    latest = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "And the queen?"}]
    room = engine.max_seq - len(template.encode(engine.tokenizer, latest, add_generation_prompt=True).ids)
    session.params = SamplingParams(max_new_tokens=room, temperature=0.0)  # exactly enough without turn one

    _, notes = say(session, "And the queen?")
    assert notes[0] == "(the conversation outgrew the context: dropped the oldest 2 messages)"
    assert engine.last.prompt_ids == template.encode(engine.tokenizer, latest, add_generation_prompt=True).ids
    assert session.conversation()[:2] == latest


def test_a_prompt_longer_than_the_context_is_refused_and_not_kept(engine):
    session = ChatSession(engine, ChatTemplate.get("chatml"), GREEDY)
    _, notes = say(session, "word " * 400)
    assert notes[0].startswith("error: the prompt has") and session.messages == []


def test_stopping_an_answer_frees_the_engine_and_takes_the_turn_back(engine):
    session = ChatSession(engine, ChatTemplate.get("chatml"), GREEDY)
    pieces = session.handle("Speak!")
    assert next(pieces).kind == "answer"
    pieces.close()  # what Ctrl-C in the REPL does
    assert engine.active == [] and session.messages == []
    answer, notes = say(session, "Speak!")  # the next turn works as if nothing happened
    assert answer and SPEED.match(notes[-1]) and len(session.messages) == 2


def test_the_chat_command_with_piped_input(tiny_run):
    result = cli("chat", str(tiny_run), "--seed", "0", input="hello\n/temp 0\nhi\n/bogus\n/exit\n")
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert sum(bool(re.search(r"\d+ tokens in \d+\.\d\d s · [\d,.]+ tokens/s", line)) for line in lines) == 2
    assert "temperature set to 0 (greedy)" in result.stdout
    assert "unknown command /bogus" in result.stdout
    assert "chat · chatml template" in lines[0]
    eof = cli("chat", str(tiny_run), "--template", "tagged", input="hello\n")  # end of input ends, no /exit
    assert eof.returncode == 0 and "tokens/s" in eof.stdout and "tagged template" in eof.stdout, eof.stderr[-2000:]
