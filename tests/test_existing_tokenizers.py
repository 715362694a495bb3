"""Tokenizers Fermion did not train: GPT-2's byte-level BPE (`<|endoftext|>` its only special token, bos and eos named
in tokenizer_config.json) and a Mistral folder's SentencePiece-style BPE (byte fallback, metaspace, `<s>` `</s>`
`<unk>`, its own chat template), both built here. Each pretrains, SFTs and exports; the exports load in
transformers with bos/eos/pad right; training's validation bits per byte and the perplexity task's agree, on bytes
that are the text's own."""

import json
import math

import pytest
import torch
import yaml
from conftest import SHARED_DATA, cli

from fermion.chat.conversations import ALREADY_ALPACA, to_messages
from fermion.chat.templates import ChatTemplate
from fermion.checkpoint import find, load
from fermion.data.sources import DataError
from fermion.data.tokenizer import Tokenizer
from fermion.eval.perplexity import perplexity
from fermion.infer.lm import EvalModel
from fermion.train.objectives import Pretrain

STORIES = SHARED_DATA / "pretrain" / "tinystories" / "tinystories_train_sample_2MiB.txt"
DOLLY = SHARED_DATA / "sft" / "dolly_hhrlhf" / "dolly_hhrlhf_train_small.jsonl"
WATCH = {"progress": False, "tensorboard": False, "compile": False, "log_every": 10, "precision": "fp32"}
TRAIN = {"steps": 3, "micro_batch_size": 4, "lr": 3e-3, "warmup_steps": 1, "checkpoint_every": 3, "eval_every": 3,
         "eval_batches": 2, **WATCH}
# A Mistral-style template of the tokenizer's own (no generation blocks: SFT cannot train on it, export keeps it)
INST_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + "
                 "' [/INST]' }}{% else %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}")
TEXTS = ["Once upon a time, a little fox\nfound a red ball.\n\n\tThe end.", "Café, naïve — 😀 and 東京 too.",
         " leading space", "x"]

pytestmark = pytest.mark.skipif(not (STORIES.is_file() and DOLLY.is_file()), reason="shared data is missing")


def _story_text(n_chars: int) -> str:
    return STORIES.read_text(encoding="utf-8")[:n_chars]


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
    """GPT-2's shape: byte-level BPE whose only special token is <|endoftext|>, which plays bos, eos (and pad)."""
    from tokenizers import Tokenizer as Inner
    from tokenizers import decoders, models, pre_tokenizers, trainers

    inner = Inner(models.BPE())
    inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    inner.decoder = decoders.ByteLevel()
    inner.train_from_iterator([_story_text(200_000)], trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    folder = tmp_path_factory.mktemp("gpt2")
    inner.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
         "tokenizer_class": "GPT2Tokenizer"}))
    return folder


@pytest.fixture(scope="module")
def mistral_folder(tmp_path_factory):
    """A tiny Mistral model folder as transformers saves it, with a SentencePiece-style tokenizer: BPE with byte
    fallback (<0x00>..<0xFF> in the vocabulary), a metaspace, <unk> <s> </s>, and a chat template of its own."""
    from tokenizers import Tokenizer as Inner
    from tokenizers import decoders, models, pre_tokenizers, trainers

    transformers = pytest.importorskip("transformers")
    metaspace = {"replacement": "\u2581", "prepend_scheme": "first", "split": False}
    draft = Inner(models.BPE())
    draft.pre_tokenizer = pre_tokenizers.Metaspace(**metaspace)
    draft.train_from_iterator([_story_text(200_000)], trainers.BpeTrainer(vocab_size=500, limit_alphabet=80,
                                                                          show_progress=False))
    trained = json.loads(draft.to_str())["model"]
    specials = ["<unk>", "<s>", "</s>"]
    vocab = {token: i for i, token in enumerate(specials + [f"<0x{b:02X}>" for b in range(256)])}
    for token in sorted(trained["vocab"], key=trained["vocab"].get):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    inner = Inner(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    inner.pre_tokenizer = pre_tokenizers.Metaspace(**metaspace)
    inner.decoder = decoders.Sequence([decoders.Metaspace(**metaspace), decoders.ByteFallback(), decoders.Fuse()])
    inner.add_special_tokens(specials)
    hf_tokenizer = transformers.LlamaTokenizerFast(tokenizer_object=inner, bos_token="<s>", eos_token="</s>",
                                                   unk_token="<unk>")
    hf_tokenizer.chat_template = INST_TEMPLATE
    folder = tmp_path_factory.mktemp("mistral")
    hf_tokenizer.save_pretrained(folder)
    config = transformers.MistralConfig(vocab_size=len(hf_tokenizer), hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=128, sliding_window=None, bos_token_id=1,
                                        eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.MistralForCausalLM(config).save_pretrained(folder)
    return folder


def _recipe(tmp_path, name: str, **sections) -> tuple:
    run_dir = tmp_path / name
    recipe = {"run": {"name": name, "dir": str(run_dir), "seed": 1},
              "data": {"sources": [{"name": "stories", "kind": "books", "paths": [str(STORIES)],
                                   "separator": "<|endoftext|>", "max_documents": 120}],
                       "val_fraction": 0.1, "num_workers": 1},
              "train": dict(TRAIN),
              "sft": {"sources": [{"name": "dolly", "paths": [str(DOLLY)], "max_documents": 24}], "val_fraction": 0.2,
                      "epochs": None, "train": dict(TRAIN, lr=1e-3)},
              **sections}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe, allow_unicode=True))
    return path, run_dir


def _ok(*args: str):
    result = cli(*args)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    return result


@pytest.fixture(scope="module")
def gpt2_run(gpt2_folder, tmp_path_factory):
    """Pretrained from scratch on the GPT-2-shaped tokenizer, then SFT on Dolly; the recipe names no chat template."""
    path, run_dir = _recipe(tmp_path_factory.mktemp("runs"), "gpt2",
                            model={"vocab_size": 640, "d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
                                   "ffn_hidden": 128, "context_length": 128},
                            tokenizer={"path": str(gpt2_folder / "tokenizer.json")})
    pretrained = _ok("pretrain", str(path))
    _ok("sft", str(path))
    return path, run_dir, pretrained.stdout


@pytest.fixture(scope="module")
def mistral_run(mistral_folder, tmp_path_factory):
    """Continued from the Mistral folder (its model and tokenizer), then SFT with the alpaca template."""
    path, run_dir = _recipe(tmp_path_factory.mktemp("runs"), "mistral",
                            train=dict(TRAIN, init_from=str(mistral_folder)))
    _ok("pretrain", str(path))
    recipe = yaml.safe_load(path.read_text())
    sft_path = path.with_name("mistral-sft.yaml")
    sft_path.write_text(yaml.safe_dump({**recipe, "tokenizer": {"chat_template": "alpaca"}}, allow_unicode=True))
    _ok("sft", str(sft_path))
    return path, run_dir


# ------------------------------------------------------------------------------------------------- the byte count


@pytest.mark.parametrize("which", ["gpt2_folder", "mistral_folder"])
def test_token_bytes_are_the_texts_own_utf8_bytes(which, request):
    tokenizer = Tokenizer.load(request.getfixturevalue(which) / "tokenizer.json")
    metaspace = which == "mistral_folder"
    for text in TEXTS:
        ids = tokenizer.encode(text)
        # a SentencePiece tokenizer puts a space (▁) before a text that does not start with one: that byte counts
        prefix = 1 if metaspace and not text.startswith(" ") else 0
        assert tokenizer.count_bytes(ids) == len(text.encode("utf-8")) + prefix, text
        # each token's own bytes (logprobs' `bytes`) join into the text's
        assert b"".join(map(tokenizer.piece, ids)) == (b" " if prefix else b"") + text.encode("utf-8"), text
    text = (SHARED_DATA / "pretrain" / "wikitext-2-raw" / "wiki.test.raw").read_text(encoding="utf-8")[:100_000]
    assert tokenizer.count_bytes(tokenizer.encode(text)) == len(text.encode("utf-8"))  # starts with a space
    if metaspace:  # the characters of <0x0A> and ▁ are not its bytes: the count training used to make
        naive = sum(len(tokenizer.inner.id_to_token(i)) for i in tokenizer.encode(text))
        assert naive > 1.05 * len(text.encode("utf-8"))
    assert all(tokenizer.token_bytes()[tokenizer.token_id(t)] == 0 for t in (tokenizer.bos_token, tokenizer.eos_token))


@pytest.mark.parametrize("which", ["gpt2_run", "mistral_run"])
def test_val_bits_per_byte_equals_the_perplexity_task(which, request, tmp_path):
    """Training's validation (the Pretrain objective with the tokenizer's byte count) and `--tasks perplexity` score
    the same tokens of the same text with the same model: their bits per byte agree."""
    run_dir = request.getfixturevalue(which)[1]
    loaded = load(run_dir)
    tokenizer = loaded.tokenizer
    text = _story_text(400_000)[-260:].strip()  # a text the model saw no more than any other, within one window
    ids = [tokenizer.eos_id] + tokenizer.encode(text)
    assert len(ids) <= loaded.model.cfg.context_length + 1
    batch = (torch.tensor([ids[:-1]]), torch.tensor([ids[1:]]))
    objective = Pretrain(torch.from_numpy(tokenizer.token_bytes()))  # as the pretraining stage builds it
    training = objective.summarise(objective.eval_sums(loaded.model, batch))["val_bpb"]
    (tmp_path / "text.txt").write_text(text, encoding="utf-8")
    task = perplexity(EvalModel(loaded.model, tokenizer), tmp_path / "text.txt")
    metric = {m.name: m.value for m in task.metrics}["bits_per_byte"]
    assert math.isclose(training, metric, rel_tol=0.005), (training, metric)
    assert abs(task.samples[0]["bytes"] - len(text.encode("utf-8"))) <= 1  # the text's bytes (+ a leading ▁)


# ------------------------------------------------------------------------------------------------- GPT-2's shape


def test_gpt2_shaped_tokenizer_pretrains_sfts_and_exports(gpt2_run, gpt2_folder):
    transformers = pytest.importorskip("transformers")
    path, run_dir, _ = gpt2_run
    assert not (run_dir / "tokenizer.json").exists()  # tokenizer.path is the run's tokenizer: none trained
    checkpoint_tokenizer = Tokenizer.load(find(run_dir) / "tokenizer.json")
    sft_tokenizer = Tokenizer.load(run_dir / "sft" / "tokenizer.json")
    for copy in (checkpoint_tokenizer, sft_tokenizer):  # every copy keeps the names
        assert (copy.bos_token, copy.eos_token, copy.pad_token) == ("<|endoftext|>",) * 3
    # no template named, none of its own, no <|im_start|>: alpaca, which needs only eos, not chatml
    recipe = yaml.safe_load((run_dir / "sft" / "recipe.yaml").read_text())
    assert recipe["tokenizer"]["chat_template"] == "alpaca"
    report = json.loads((run_dir / "sft" / "report.json").read_text())
    assert report["noted"] == {ALREADY_ALPACA: report["records_read"]}  # Dolly's prompts, unwrapped once each

    _ok("export", str(run_dir / "sft"), "--format", "hf")
    folder = run_dir / "sft" / "export" / "hf"
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    eot = sft_tokenizer.token_id("<|endoftext|>")
    assert (hf_tokenizer.bos_token, hf_tokenizer.eos_token, hf_tokenizer.pad_token) == ("<|endoftext|>",) * 3
    assert (hf_model.config.bos_token_id, hf_model.config.eos_token_id, hf_model.config.pad_token_id) == (eot,) * 3
    messages = [{"role": "user", "content": "What is a fox?"}]
    ours = ChatTemplate.get("alpaca").encode(sft_tokenizer, messages, add_generation_prompt=True).ids
    theirs = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert list(theirs["input_ids"]) == ours
    assert hf_tokenizer.decode(ours) == sft_tokenizer.decode(ours)


def test_gpt2_shaped_tokenizer_refuses_chatml_it_cannot_spell(gpt2_run, tmp_path):
    path, run_dir, _ = gpt2_run
    recipe = yaml.safe_load(path.read_text())
    recipe["tokenizer"]["chat_template"] = "chatml"
    recipe["sft"]["dir"] = str(tmp_path / "sft")
    bad = tmp_path / "chatml.yaml"
    bad.write_text(yaml.safe_dump(recipe))
    result = cli("sft", str(bad))
    assert result.returncode != 0
    message = " ".join(result.stderr.split())
    assert "tokenizer.chat_template: the chatml template writes <|im_end|>, <|im_start|>, which the tokenizer's " \
           "vocabulary lacks" in message and "use alpaca or tagged" in message
    assert not (tmp_path / "sft").exists()


# ------------------------------------------------------------------------------------------------- a Mistral folder


def test_mistral_folder_pretrains_sfts_and_exports(mistral_run, mistral_folder):
    transformers = pytest.importorskip("transformers")
    path, run_dir = mistral_run
    source = Tokenizer.load(mistral_folder / "tokenizer.json")
    assert Tokenizer.load(run_dir / "tokenizer.json").hash == source.hash  # the source's, adopted
    assert load(run_dir).recipe.tokenizer.chat_template == INST_TEMPLATE  # the tokenizer's own, kept

    # the continued model's export keeps the template its tokenizer came with, as transformers would
    _ok("export", str(run_dir), "--format", "hf")
    base = json.loads((run_dir / "export" / "hf" / "tokenizer_config.json").read_text())
    assert base["chat_template"] == INST_TEMPLATE

    _ok("export", str(run_dir / "sft"), "--format", "hf")
    folder = run_dir / "sft" / "export" / "hf"
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert (hf_tokenizer.bos_token, hf_tokenizer.eos_token, hf_tokenizer.pad_token) == ("<s>", "</s>", "</s>")
    assert (hf_model.config.bos_token_id, hf_model.config.eos_token_id, hf_model.config.pad_token_id) == (1, 2, 2)
    messages = [{"role": "user", "content": "Name a colour.\nJust one."}]
    sft_tokenizer = Tokenizer.load(run_dir / "sft" / "tokenizer.json")
    ours = ChatTemplate.get("alpaca").encode(sft_tokenizer, messages, add_generation_prompt=True).ids
    theirs = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert list(theirs["input_ids"]) == ours
    ours_model = load(run_dir / "sft").model
    with torch.no_grad():
        mine, _ = ours_model(torch.tensor([ours]))
        hf_logits = hf_model(torch.tensor([ours])).logits
    assert (hf_logits - mine.to(torch.bfloat16).float()).abs().max().item() < 0.05  # the export is bf16


def test_fermion_run_from_a_hf_folder_trains_no_tokenizer(mistral_folder, tmp_path):
    path, run_dir = _recipe(tmp_path, "continued", train=dict(TRAIN, init_from=str(mistral_folder)),
                            sft=None)
    recipe = yaml.safe_load(path.read_text())
    del recipe["sft"]
    path.write_text(yaml.safe_dump({**recipe, "eval": {"tasks": ["smoke"], "limit": 1},
                                    "export": {"formats": ["hf"]}}, allow_unicode=True))
    from fermion.config import load_recipe
    from fermion.run import run

    result = run(load_recipe(path))
    outcomes = {o.name: o for o in result.outcomes}
    assert result.status == "complete" and outcomes["pretrain"].status == "ran"
    assert outcomes["tokenizer"].note.startswith("train.init_from's, ")
    assert Tokenizer.load(run_dir / "tokenizer.json").hash == Tokenizer.load(mistral_folder / "tokenizer.json").hash


# ------------------------------------------------------------------------------------------------- templated prompts


def test_dolly_prompts_already_in_alpaca_are_unwrapped_not_wrapped_twice():
    records = [json.loads(line) for line in DOLLY.read_text(encoding="utf-8").splitlines()[:50]]
    notes = []
    template = ChatTemplate.get("alpaca")
    for i, record in enumerate(records):
        messages = to_messages(record, f"dolly:{i + 1}", note=lambda reason, where: notes.append(where))
        assert "Below is an instruction" not in messages[0]["content"]
        # rendered with the alpaca template, the prompt is byte for byte the one the file holds
        assert template.render(messages) == record["prompt"] + record["response"] + "<|eos|>\n\n"
    assert len(notes) == len(records)
    custom = {"prompt": "You are terse.\n\n### Instruction:\nSay hi.\n\n### Input:\nto Bob\n\n### Response:\n",
              "response": "Hi Bob."}
    assert to_messages(custom, "c:1")[:2] == [{"role": "system", "content": "You are terse."},
                                              {"role": "user", "content": "Say hi.", "input": "to Bob"}]
    with pytest.raises(DataError, match=r"c:2: field 'prompt' already carries a chat template \(it starts with "
                                        r"<\|im_start\|>\)"):
        to_messages({"prompt": "<|im_start|>user\nhi<|im_end|>\n", "completion": "hello"}, "c:2")
    plain = {"prompt": "Explain ### Response: headers.", "completion": "They mark replies."}
    assert to_messages(plain, "c:3")[0] == {"role": "user", "content": plain["prompt"]}
