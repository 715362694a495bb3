"""bench/learning.py's pieces that decide its numbers: the held-out split every side is scored on, the sides'
settings (the "default" side is what the shipped recipes say), and the nanoGPT-style side scored the way
eval/perplexity.py scores fermion's models (every byte of the held-out text once)."""

import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO

spec = importlib.util.spec_from_file_location("learning", REPO / "bench" / "learning.py")
learning = importlib.util.module_from_spec(spec)
spec.loader.exec_module(learning)


def test_the_held_out_text_is_nanogpts_split_and_whole_stories(tmp_path):
    train, val = learning.split_corpus("tinyshakespeare", tmp_path / "s")
    text = learning.CORPORA["tinyshakespeare"][0].read_text(encoding="utf-8")
    cut = int(len(text) * 0.9)
    assert train.read_text(encoding="utf-8") == text[:cut] and val.read_text(encoding="utf-8") == text[cut:]

    train, val = learning.split_corpus("tinystories", tmp_path / "t")
    stories = [doc.strip() for doc in learning.CORPORA["tinystories"][0].read_text(encoding="utf-8")
               .split("<|endoftext|>") if doc.strip()]
    cut = int(len(stories) * 0.95)
    assert val.read_text(encoding="utf-8") == "\n\n".join(stories[cut:]) + "\n"
    assert train.read_text(encoding="utf-8") == "\n\n".join(stories[:cut]) + "\n"


@pytest.mark.parametrize("corpus", ["tinyshakespeare", "tinystories"])
def test_the_default_side_is_what_the_shipped_recipe_says(corpus):
    import yaml

    recipe = yaml.safe_load(learning.RECIPES[corpus].read_text())
    default = learning.side_settings("default", corpus, {})
    assert default["train.optimizer"] == recipe["train"]["optimizer"]
    assert default["train.lr"] == recipe["train"]["lr"] and default["model.context_length"] == \
        recipe["model"]["context_length"]
    adamw = learning.side_settings("default-adamw", corpus, {})
    assert adamw == {**default, "train.optimizer": "adamw"}
    custom = learning.side_settings("x", corpus, {"x": {"train.lr": 1.0}})
    assert custom == {**learning.TODAY, "train.lr": 1.0}


def test_the_char_baseline_is_scored_on_every_byte_once_as_fermions_models_are():
    from transformers import LlamaConfig, LlamaForCausalLM

    from fermion.eval.perplexity import text_nll

    torch.manual_seed(0)
    vocab = sorted(set("to be or not, é\n"))
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(vocab) + 1, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                         max_position_embeddings=8, tie_word_embeddings=True))
    lm = learning.CharLM(model, vocab, block=8)
    text = "to be or not to be, é\n" * 3
    nll, tokens, n_bytes = text_nll(lm, text)
    assert tokens == len(text) and n_bytes == len(text.encode("utf-8"))
    # The first window by hand: the text's first 8 characters, each predicted from the ones before it (the first
    # from the prefix id).
    ids = [len(vocab)] + [vocab.index(ch) for ch in text[:8]]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids[:-1]])).logits[0]
    assert lm.token_nll(ids, 1) == pytest.approx(float(F.cross_entropy(logits, torch.tensor(ids[1:]),
                                                                       reduction="sum")), rel=1e-5)
    assert 0 < nll / math.log(2) / n_bytes < 10
