"""The four published recipes (configs/published/) against the texts they reproduce (../shared/seeds/, whose README
says which file is which): the counted fields equal what each text states; and each recipe run in miniature by
`fermion run` (a tiny model, a few steps, local data standing in for the Hub data sets), every stage its author used.
"""

import json
import re
from pathlib import Path

import pytest
import yaml
from conftest import REPO, SHARED_DATA, cli

from fermion.chat.templates import ChatTemplate
from fermion.checkpoint import find
from fermion.config import load_recipe
from fermion.data.tokenizer import Tokenizer
from fermion.eval.runner import task_names
from fermion.layout import step_of
from fermion.model.counting import count

PUBLISHED = REPO / "configs" / "published"
SEEDS = REPO.parent / "shared" / "seeds"

# ------------------------------------------------------------------------------------------------ what the texts say

# seeds/002_6709daca40c3b5a7.txt, the auto-g-nano-1b model card: "Architecture", "Training data", "Training
# procedure", "SFT variant" and the smoke test line.
AUTO_G = {
    "model": {"n_layers": 24, "d_model": 1792, "n_heads": 14, "n_kv_heads": 2, "head_dim": 128, "ffn_hidden": 5376,
              "context_length": 1024, "vocab_size": 50257, "rope_theta": 500_000, "tie_embeddings": False},
    "params": 1_050_002_688,
    "mix": {"fineweb-edu-dedup": 0.40, "cosmopedia-v2": 0.25, "starcoderdata/python": 0.35},
    "optimizer": {"betas": (0.9, 0.95), "weight_decay": 0.1, "lr": 3e-4, "schedule": "cosine", "precision": "bf16"},
    "steps": 50_000, "tokens_per_step": 262_144, "gpus": 2,  # "8 × 16 × 1024 × 2 GPUs"
    "sft": {"dataset": "databricks/databricks-dolly-15k", "template": "alpaca", "epochs": 3, "lr": 5e-5,
            "schedule": "cosine"},
    "smoke": (6, 2),  # "6 prompts × 2 temperatures"
    "sample_prompts": ["Once upon a time, in a small village near the mountains,", "def fibonacci(n):",
                       "Question: Why is the sky blue?\nAnswer:"],
}
# seeds/001_7e039062e979c8a3.txt, the neo-3-1B-A90M-Instruct model card: core properties, the evaluation tables,
# "Chat formatting" and "Training and data overview".
NEO = {
    "moe": (8, 2), "context_length": 8192, "vocab_size": 32_768, "total_billions": 1,  # "top-2-of-8", "8K", "32k"
    "evals": ["mmlu", "hellaswag", "piqa", "arc_easy", "arc_challenge", "gsm8k", "bbh", "ifeval", "tinytask"],
    "chat_example": ("<user>\nYou are a helpful assistant. Explain sparse mixture-of-experts models to a beginner.\n"
                     "</user>\n<assistant>\n"),
    "sources": ["wikipedia", "synthetic", "code", "math", "dialogue"],
}
# seeds/003_6373c13ce0b5e53f.txt, the Nucleus post: "based on Mistral ... 1.13 billion parameters", TinyStories, then
# Tiny Textbooks "for two epochs", MIT.
NUCLEUS = {"hundredths_of_billions": 113, "stages": ["roneneldan/TinyStories", "nampdn-ai/tiny-textbooks"],
           "textbook_epochs": 2,
           "params": 1_132_034_048}  # the post names no shape: the count of the one the recipe chose
# seeds/000_9f0d107d268a9de4.txt, the Neutrino-Instruct 7B post: 7B, RoPE + GQA + SwiGLU, FSDP, ~1.5T tokens of
# CommonCrawl, Wikipedia, arXiv and GitHub; deduplication, heuristic filtering and a perplexity filter by a smaller
# model; SFT then DPO; a system turn in its chat example.
NEUTRINO = {"billions": 7, "tokens": 1.5e12, "devices": 16, "sources": ["web", "wikipedia", "arxiv", "code"],
            "params": 7_241_732_096}


def published(name: str):
    return load_recipe(PUBLISHED / f"{name}.yaml", check_paths=False)


def test_every_seed_text_is_the_one_its_recipe_cites():
    index = (SEEDS / "README.md").read_text()
    for seed, release in [("002_6709daca40c3b5a7", "auto-g-nano-1b"), ("001_7e039062e979c8a3", "neo-3-1B-A90M"),
                          ("003_6373c13ce0b5e53f", "Nucleus"), ("000_9f0d107d268a9de4", "Neutrino")]:
        assert re.search(rf"{seed}\.txt \| {release}", index), seed


def test_auto_g_nano_matches_its_card():
    recipe = published("auto-g-nano-1b")
    assert {k: getattr(recipe.model, k) for k in AUTO_G["model"]} == AUTO_G["model"]
    assert count(recipe.model).total_params == AUTO_G["params"]
    assert recipe.tokenizer.path.endswith("gpt2/tokenizer.json") and recipe.tokenizer.chat_template == "alpaca"
    # a source by its Hub subset, or by the last two folders of the StarCoderData copy it reads
    mix = {s.subset or "/".join(Path(s.dataset).parts[-2:]): s.weight for s in recipe.data.sources}
    assert mix == AUTO_G["mix"] and all(s.streaming for s in recipe.data.sources)
    train = recipe.train
    assert {k: getattr(train, k) for k in AUTO_G["optimizer"]} == AUTO_G["optimizer"]
    assert train.steps == AUTO_G["steps"]
    assert train.micro_batch_size * train.grad_accum * recipe.seq_len * AUTO_G["gpus"] == AUTO_G["tokens_per_step"]
    sft = AUTO_G["sft"]
    assert [s.dataset for s in recipe.sft.sources] == [sft["dataset"]] and recipe.sft.sources[0].format == "dolly"
    assert (recipe.tokenizer.chat_template, recipe.sft.epochs) == (sft["template"], sft["epochs"])
    assert (recipe.sft.train.lr, recipe.sft.train.schedule) == (sft["lr"], sft["schedule"])
    assert recipe.dpo is None  # the card has no preference stage
    smoke = recipe.eval.smoke
    assert (len(smoke.prompts), len(smoke.temperatures)) == AUTO_G["smoke"] and "smoke" in recipe.eval.tasks
    assert set(AUTO_G["sample_prompts"]) <= {p.opening for p in smoke.prompts}


def test_neo_matches_its_card():
    recipe = published("neo-3-1b-a90m")
    model = recipe.model
    assert (model.moe.n_experts, model.moe.top_k) == NEO["moe"] and model.kv_heads < model.n_heads
    assert model.context_length == recipe.seq_len == NEO["context_length"] and model.vocab_size == NEO["vocab_size"]
    assert round(count(model).total_params / 1e9) == NEO["total_billions"]
    assert [s.name for s in recipe.data.sources] == NEO["sources"]
    assert set(NEO["evals"]) <= set(task_names(recipe.eval.tasks))
    assert recipe.tokenizer.chat_template == "tagged-lines" and recipe.sft is not None and recipe.dpo is not None
    template = ChatTemplate.get(recipe.tokenizer.chat_template)
    question = NEO["chat_example"].split("\n")[1]
    assert template.render([{"role": "user", "content": question}], add_generation_prompt=True) == NEO["chat_example"]
    # "concatenating user/assistant turns in the same style"
    turns = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."},
             {"role": "user", "content": "Bye."}]
    assert template.render(turns, add_generation_prompt=True) == (
        "<user>\nHi.\n</user>\n<assistant>\nHello.\n</assistant>\n<user>\nBye.\n</user>\n<assistant>\n")
    assert {"<user>", "</user>", "<assistant>", "</assistant>"} <= set(recipe.tokenizer.special_tokens)


def test_nucleus_matches_its_post():
    recipe = published("nucleus-1b")
    total = count(recipe.model).total_params
    assert round(total / 1e7) == NUCLEUS["hundredths_of_billions"] and total == NUCLEUS["params"]
    assert f"{total:,}" in (PUBLISHED / "nucleus-1b.yaml").read_text()  # the comment states model info's count
    assert recipe.model.sliding_window is not None and recipe.model.kv_heads < recipe.model.n_heads  # Mistral's
    assert recipe.train.init_from  # the untrained Hub Mistral folder
    assert [s.dataset for s in recipe.data.sources] + [s.dataset for s in recipe.stages[0].data.sources] == \
        NUCLEUS["stages"]
    assert recipe.stage_train(0).epochs == NUCLEUS["textbook_epochs"]
    assert recipe.stage_recipe(0).train.init_from == str(recipe.run_dir)
    assert recipe.pretrained_dir == recipe.run_dir / "stages" / "textbooks"
    assert recipe.sft is None and recipe.dpo is None  # the post has no post-training
    assert "MIT" in (PUBLISHED / "nucleus-1b.yaml").read_text()


def test_neutrino_matches_its_post():
    recipe = published("neutrino-7b")
    assert round(count(recipe.model).total_params / 1e9) == NEUTRINO["billions"]
    assert count(recipe.model).total_params == NEUTRINO["params"]
    model = recipe.model
    assert model.kv_heads < model.n_heads and model.moe is None and model.sliding_window is None
    assert [s.name for s in recipe.data.sources] == NEUTRINO["sources"]
    prepare = recipe.data.prepare
    assert prepare.exact_dedup and prepare.minhash is not None  # "aggressive deduplication"
    assert prepare.gopher_quality and prepare.gopher_repetition and prepare.c4 and prepare.fineweb  # heuristics
    assert prepare.perplexity is not None and prepare.perplexity.high is not None  # "a smaller ... model"
    train = recipe.train
    tokens = train.steps * train.micro_batch_size * train.grad_accum * recipe.seq_len * NEUTRINO["devices"]
    assert abs(tokens / NEUTRINO["tokens"] - 1) < 1e-3 and train.distributed == "fsdp"
    assert recipe.sft is not None and recipe.dpo is not None
    system = ChatTemplate.get(recipe.tokenizer.chat_template).render([{"role": "system", "content": "S"},
                                                                      {"role": "user", "content": "U"}])
    assert system.index("S") < system.index("U")


@pytest.mark.parametrize("name", ["auto-g-nano-1b", "neo-3-1b-a90m", "nucleus-1b", "neutrino-7b"])
def test_model_info_counts_what_the_comment_says(name):
    result = cli("model", "info", str(PUBLISHED / f"{name}.yaml"))
    assert result.returncode == 0, result.stderr
    counts = count(published(name).model)
    assert f"{counts.total_params:,}" in result.stdout and f"{counts.active_params:,}" in result.stdout
    comment = (PUBLISHED / f"{name}.yaml").read_text()
    assert f"{counts.total_params:,}" in comment and f"{counts.active_params:,}" in comment


# ------------------------------------------------------------------------------------------------ in miniature

STORIES = SHARED_DATA / "pretrain" / "tinystories" / "tinystories_train_sample_2MiB.txt"
C4 = SHARED_DATA / "pretrain" / "llamafactory_demo" / "c4_demo.jsonl"
WIKI = SHARED_DATA / "pretrain" / "llamafactory_demo" / "wiki_demo.txt"  # one article a line
WIKITEXT = SHARED_DATA / "pretrain" / "wikitext-2-raw" / "wiki.test.raw"  # sections start with a " = " heading line
DOLLY = SHARED_DATA / "sft" / "dolly_hhrlhf" / "dolly_hhrlhf_train_small.jsonl"  # prompts already in Alpaca's form
ALPACA = SHARED_DATA / "sft" / "llamafactory_demo" / "alpaca_en_demo.json"
HH = SHARED_DATA / "preference" / "hh-rlhf"
TINY_MODEL = {"d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "head_dim": 16, "ffn_hidden": 96,
              "context_length": 128}
WATCH = {"precision": "fp32", "compile": False, "progress": False, "tensorboard": False, "log_every": 4,
         "eval_batches": 2, "micro_batch_size": 4, "grad_accum": 1}
QUICK = {**WATCH, "steps": 8, "warmup_steps": 2, "eval_every": 8, "checkpoint_every": 8}
BY_EPOCH = {**WATCH, "warmup_steps": 1, "eval_every": 50, "checkpoint_every": 50}  # steps follow from the epochs

pytestmark = pytest.mark.skipif(not (STORIES.is_file() and DOLLY.is_file()), reason="shared data is missing")


def sets(prefix: str, values: dict) -> list[str]:
    """--set PREFIX.KEY=VALUE for each item (values written as JSON, which YAML reads)."""
    return [item for key, value in values.items() for item in ("--set", f"{prefix}.{key}={json.dumps(value)}")]


def local(source: str, **fields) -> list[str]:
    """--set items that replace a source's Hub data set or files by local data; its name, kind and weight stay."""
    return sets(source, {"dataset": None, "subset": None, "streaming": False, "paths": [], "builtin": None,
                         "text_field": "text", **fields})


STDOUT: dict[Path, str] = {}  # what each miniature run printed


def run_miniature(name: str, run_dir: Path, *overrides: str) -> dict:
    """`fermion run` on the published recipe with the overrides; the ledger's steps."""
    result = cli("run", str(PUBLISHED / f"{name}.yaml"), "--set", f"run.dir={run_dir}", *overrides)
    STDOUT[run_dir] = result.stdout
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-3000:]
    return json.loads((run_dir / "run.json").read_text())["steps"]


def check_shipped(run_dir: Path, steps: dict, expected: list[str], stages: list[Path], formats: list[str],
                  tasks: list[str]) -> None:
    """Every expected step done (and no other), every trained model evaluated on the recipe's tasks, the final one
    exported to each format with its model card."""
    assert list(steps) == expected and all(s["status"] == "done" for s in steps.values()), steps
    for directory in stages:
        results = json.loads((directory / "eval" / "results.json").read_text())
        assert [r["task"] for r in results["results"]] == tasks, directory
    for fmt in formats:
        assert any((stages[-1] / "export" / fmt).iterdir()), fmt
    assert (stages[-1] / "export" / "hf" / "README.md").is_file()


def _byte_level_bpe(specials: list[str], vocab_size: int):
    from tokenizers import Tokenizer as Inner
    from tokenizers import decoders, models, pre_tokenizers, trainers

    inner = Inner(models.BPE())
    inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    inner.decoder = decoders.ByteLevel()
    inner.train_from_iterator([STORIES.read_text(encoding="utf-8")[:200_000], C4.read_text(encoding="utf-8")[:100_000]],
                              trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return inner


@pytest.fixture(scope="module")
def gpt2_shaped(tmp_path_factory) -> Path:
    """A tokenizer.json shaped like GPT-2's (byte-level BPE, <|endoftext|> its only special token), with the
    tokenizer_config.json the recipe's comment asks for beside it."""
    folder = tmp_path_factory.mktemp("gpt2")
    _byte_level_bpe(["<|endoftext|>"], 512).save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({role: "<|endoftext|>" for role in
                                                              ("bos_token", "eos_token", "pad_token")}))
    return folder / "tokenizer.json"


def test_auto_g_nano_in_miniature(gpt2_shaped, tmp_path):
    """GPT-2's tokenizer, the three-way mix, SFT on Dolly in the Alpaca template for 3 epochs, the card's smoke test,
    and the card's files: bf16 safetensors and fp16 ONNX."""
    run_dir = tmp_path / "auto-g"
    steps = run_miniature(
        "auto-g-nano-1b", run_dir, *sets("model", {**TINY_MODEL, "vocab_size": 512}),
        "--set", f"tokenizer.path={gpt2_shaped}",
        *local("data.sources.0", paths=[str(C4)], max_documents=60),
        *local("data.sources.1", builtin="textbook", max_documents=60),
        *local("data.sources.2", builtin="python-stdlib", max_documents=60),
        *sets("data", {"num_workers": 1, "val_fraction": 0.1}), *sets("train", QUICK),
        *local("sft.sources.0", paths=[str(DOLLY)], format="auto", max_documents=24),
        *sets("sft", {"val_fraction": 0.2}), *sets("sft.train", BY_EPOCH),
        "--set", "eval.limit=1")
    check_shipped(run_dir, steps, ["tokenizer", "pretrain", "sft", "eval", "export", "card"],
                  [run_dir, run_dir / "sft"], ["hf", "onnx"],
                  ["smoke", "hellaswag", "arc_easy", "arc_challenge", "piqa", "mmlu", "humaneval"])
    assert not (run_dir / "dpo").exists()
    tokenizer = Tokenizer.load(find(run_dir / "sft") / "tokenizer.json")
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|endoftext|>",) * 2
    sft = yaml.safe_load((run_dir / "sft" / "recipe.yaml").read_text())
    assert (sft["tokenizer"]["chat_template"], sft["sft"]["epochs"]) == ("alpaca", 3)
    smoke = json.loads((run_dir / "eval" / "results.json").read_text())["results"][0]
    # eval.limit 1: the first of the card's 6 prompts, at its 2 temperatures (test_auto_g_nano_matches_its_card
    # checks all six)
    assert smoke["n"] == 1 * 2 and {s["temperature"] for s in smoke["samples"]} == {0.0, 0.8}
    hf_config = json.loads((run_dir / "sft" / "export" / "hf" / "config.json").read_text())
    assert hf_config["torch_dtype"] == "bfloat16"
    config = json.loads((run_dir / "sft" / "export" / "hf" / "tokenizer_config.json").read_text())
    assert config["chat_template"] == ChatTemplate.get("alpaca").source


def test_neo_in_miniature(tmp_path):
    """The MoE model with its card's chat format: pretraining on the five kinds of text, SFT, DPO; evaluated on the
    card's BBH and TinyTask (all of its tasks take minutes on three models even this small: test_neo_matches_its_card
    checks the list); the export renders the card's format exactly as fermion does."""
    transformers = pytest.importorskip("transformers")
    run_dir = tmp_path / "neo"
    steps = run_miniature(
        "neo-3-1b-a90m", run_dir, *sets("model", {**TINY_MODEL, "vocab_size": 512, "context_length": 64}),
        *sets("tokenizer", {"vocab_size": 512, "train_bytes": 200_000}),
        *local("data.sources.0", paths=[str(WIKI)], separator="\n", max_documents=20),
        *local("data.sources.1", builtin="textbook", max_documents=40),
        *local("data.sources.2", builtin="python-stdlib", max_documents=40),
        *local("data.sources.3", builtin="arithmetic", max_documents=100),
        *local("data.sources.4", paths=[str(HH / "harmless-base" / "test.jsonl.gz")], text_field="chosen",
               max_documents=40),
        *sets("data", {"num_workers": 1, "val_fraction": 0.1}), *sets("train", QUICK),
        *local("sft.sources.0", builtin="chat", format="auto", max_documents=24),
        *sets("sft", {"val_fraction": 0.2, "epochs": 1}), *sets("sft.train", BY_EPOCH),
        *local("dpo.sources.0", paths=[str(HH / "helpful-base" / "test.jsonl.gz")], format="auto",
               max_documents=24),
        *sets("dpo", {"val_fraction": 0.2}), *sets("dpo.train", BY_EPOCH),
        *sets("eval", {"tasks": ["bbh", "tinytask"], "limit": 1, "shots": 0}))
    formats = load_recipe(PUBLISHED / "neo-3-1b-a90m.yaml", check_paths=False).export.formats
    tasks = ["bbh", "tinytask"]
    check_shipped(run_dir, steps, ["tokenizer", "pretrain", "sft", "dpo", "eval", "export", "card"],
                  [run_dir, run_dir / "sft", run_dir / "dpo"], formats, tasks)
    tokenizer = Tokenizer.load(run_dir / "tokenizer.json")
    assert all(len(tokenizer.encode(tag)) == 1 for tag in ("<user>", "</user>", "<assistant>", "</assistant>"))

    folder = run_dir / "dpo" / "export" / "hf"
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    template = ChatTemplate.get("tagged-lines")
    question = NEO["chat_example"].split("\n")[1]
    prompt = [{"role": "user", "content": question}]
    assert hf_tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True) == NEO["chat_example"]
    chat = [{"role": "system", "content": "Be brief."}, *prompt, {"role": "assistant", "content": "Few experts."},
            {"role": "user", "content": "More?"}]
    ours = template.encode(tokenizer, chat, add_generation_prompt=True)
    theirs = hf_tokenizer.apply_chat_template(chat, tokenize=True, add_generation_prompt=True, return_dict=True)
    assert hf_tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == ours.text
    assert list(theirs["input_ids"]) == ours.ids
    generation = json.loads((folder / "generation_config.json").read_text())
    assert tokenizer.token_id("</assistant>") in generation["eos_token_id"]  # a reply stops in transformers too


@pytest.fixture(scope="module")
def mistral_folder(tmp_path_factory) -> Path:
    """A tiny untrained Mistral folder as transformers saves it (sliding window 32), the Hub folder's stand-in."""
    transformers = pytest.importorskip("transformers")
    import torch

    folder = tmp_path_factory.mktemp("mistral")
    hf_tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=_byte_level_bpe(["<unk>", "<s>", "</s>"], 512), bos_token="<s>", eos_token="</s>",
        unk_token="<unk>")
    hf_tokenizer.save_pretrained(folder)
    config = transformers.MistralConfig(
        vocab_size=len(hf_tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=128, sliding_window=32, rope_theta=10000.0,
        rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    transformers.MistralForCausalLM(config).save_pretrained(folder)
    return folder


def test_nucleus_in_miniature(mistral_folder, tmp_path):
    """From the Hub Mistral folder: TinyStories for one epoch, then textbooks for two; the folder's tokenizer is the
    run's. Exported as hf only: GGUF cannot hold the sliding window, and the recipe's export section is another
    change's."""
    run_dir = tmp_path / "nucleus"
    vocab = Tokenizer.load(mistral_folder / "tokenizer.json").vocab_size
    steps = run_miniature(
        "nucleus-1b", run_dir,
        *sets("model", {**TINY_MODEL, "head_dim": None, "vocab_size": vocab, "sliding_window": 32,
                        "rope_theta": 10000.0}),
        "--set", f"train.init_from={mistral_folder}",
        *local("data.sources.0", paths=[str(STORIES)], separator="<|endoftext|>", max_documents=40),
        *sets("data", {"num_workers": 1, "val_fraction": 0.1}), *sets("train", BY_EPOCH),
        *local("stages.0.data.sources.0", builtin="textbook", max_documents=16),
        *sets("stages.0.data", {"num_workers": 1, "val_fraction": 0.1}),
        *sets("stages.0.train", {"warmup_steps": 1}),
        "--set", "eval.limit=1", "--set", "export.formats=[hf]")
    textbooks = run_dir / "stages" / "textbooks"
    check_shipped(run_dir, steps, ["tokenizer", "pretrain", "textbooks", "eval", "export", "card"],
                  [run_dir, textbooks], ["hf"], ["smoke", "hellaswag", "arc_easy", "arc_challenge", "piqa", "mmlu"])
    assert steps["tokenizer"]["note"].startswith("train.init_from's")
    assert Tokenizer.load(run_dir / "tokenizer.json").hash == Tokenizer.load(mistral_folder / "tokenizer.json").hash
    # two passes over the textbooks' windows, at the miniature's 4 sequences a step
    windows, steps_made = re.search(r"train\.epochs 2: ([\d,]+) windows of \d+ tokens in the train shards, 4 "
                                    r"sequences a step -> ([\d,]+) steps", STDOUT[run_dir]).groups()
    stage = yaml.safe_load((textbooks / "recipe.yaml").read_text())
    assert stage["train"]["steps"] == int(steps_made.replace(",", "")) == -(-2 * int(windows.replace(",", "")) // 4)
    assert stage["train"]["init_from"] == str(run_dir) and step_of(find(textbooks)) == stage["train"]["steps"]
    config = json.loads((textbooks / "export" / "hf" / "config.json").read_text())
    assert config["sliding_window"] == 32 and config["architectures"] == ["MistralForCausalLM"]


def test_neutrino_in_miniature(tiny_run, tmp_path):
    """Prepare (dedup, heuristic filters, perplexity scored by a smaller model: the shared tiny run), pretraining on
    web, Wikipedia, arXiv and code, SFT, DPO."""
    run_dir = tmp_path / "neutrino"
    wikipedia = tmp_path / "wikipedia.txt"  # sources read .txt files; WikiText's is .raw
    wikipedia.symlink_to(WIKITEXT)
    steps = run_miniature(
        "neutrino-7b", run_dir, *sets("model", {**TINY_MODEL, "vocab_size": 512}),
        *sets("tokenizer", {"vocab_size": 512, "train_bytes": 200_000}),
        *local("data.sources.0", paths=[str(C4)], max_documents=60),
        *local("data.sources.1", paths=[str(wikipedia)], separator="\n = ", max_documents=40),
        *local("data.sources.2", builtin="textbook", max_documents=40),
        *local("data.sources.3", builtin="python-stdlib", max_documents=40),
        *sets("data", {"num_workers": 1, "val_fraction": 0.1}),
        *sets("data.prepare", {"workers": 1}), "--set", f"data.prepare.perplexity.checkpoint={tiny_run}",
        *sets("train", QUICK),
        *local("sft.sources.0", paths=[str(ALPACA)], format="auto", max_documents=24),
        *sets("sft", {"val_fraction": 0.2, "epochs": 1}), *sets("sft.train", BY_EPOCH),
        *local("dpo.sources.0", paths=[str(HH / "helpful-base" / "test.jsonl.gz")], format="auto",
               max_documents=24),
        *sets("dpo", {"val_fraction": 0.2}), *sets("dpo.train", BY_EPOCH),
        "--set", "eval.limit=1")
    formats = load_recipe(PUBLISHED / "neutrino-7b.yaml", check_paths=False).export.formats
    tasks = ["hellaswag", "arc_easy", "arc_challenge", "piqa", "mmlu", "gsm8k", "bbh", "humaneval", "ifeval", "smoke"]
    check_shipped(run_dir, steps, ["prepare", "tokenizer", "pretrain", "sft", "dpo", "eval", "export", "card"],
                  [run_dir, run_dir / "sft", run_dir / "dpo"], formats, tasks)
    report = json.loads(next(run_dir.glob("prepared/*/prepare_report.json")).read_text())
    for source in ("web", "wikipedia", "arxiv", "code"):
        ran = [row["step"] for row in report["sources"][source]["steps"]]
        assert {"exact_dedup", "minhash", "perplexity"} <= set(ran), (source, ran)
    assert report["totals"]["kept"]["documents"] > 0
