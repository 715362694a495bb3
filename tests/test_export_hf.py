"""Export to a Hugging Face folder, checked against transformers itself: the folder loads with no custom code, gives
fermion's logits and greedy tokens, its tokenizer renders every chat template exactly as fermion does, and an
export -> import -> export round trip reproduces every tensor."""

import json

import pytest
import torch
import transformers
from conftest import tiny_model
from safetensors.torch import load_file

from fermion.chat.templates import BUILTIN, ChatTemplate
from fermion.config import ModelConfig
from fermion.data.tokenizer import Tokenizer
from fermion.errors import ExportError
from fermion.export.hf import export_hf
from fermion.infer.engine import Engine, SamplingParams
from fermion.model.hf import architecture, hf_config, import_hf, imported_recipe, to_hf_state_dict
from fermion.model.transformer import Transformer

CONVERSATION = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4, of course!"},
    {"role": "user", "content": "Summarise this.", "input": "To be, or not to be: that is the question."},
    {"role": "assistant", "content": "A question of being.\nNothing more."},
]


@pytest.fixture(scope="module")
def tokenizer(shakespeare_tokenizer) -> Tokenizer:
    return shakespeare_tokenizer


def build(vocab: int, **overrides) -> Transformer:
    return tiny_model(vocab_size=vocab, context_length=64, **overrides)


VARIANTS = {
    "llama-untied": ("llama", {}),
    "llama-tied-mha": ("llama", {"tie_embeddings": True, "n_kv_heads": 4}),
    "mistral-window": ("mistral", {"sliding_window": 8}),
    "qwen3-qknorm": ("qwen3", {"qk_norm": True}),
    "qwen3-qknorm-window": ("qwen3", {"qk_norm": True, "sliding_window": 8}),
    "mixtral-moe": ("mixtral", {"moe": {"n_experts": 4, "top_k": 2}}),
    "mixtral-moe-window-tied": ("mixtral", {"moe": {"n_experts": 4, "top_k": 2}, "sliding_window": 8,
                                            "tie_embeddings": True}),
    "qwen3moe-qknorm": ("qwen3_moe", {"moe": {"n_experts": 4, "top_k": 2}, "qk_norm": True}),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_transformers_loads_export_with_same_logits_and_greedy_tokens(tokenizer, tmp_path, variant):
    arch, overrides = VARIANTS[variant]
    model = build(tokenizer.vocab_size, **overrides)
    assert architecture(model.cfg) == arch
    out = export_hf(model, tokenizer, tmp_path / "hf", template=ChatTemplate.get("chatml"), dtype="fp32")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert type(hf).__name__ == json.loads((out / "config.json").read_text())["architectures"][0]

    prompts = torch.randint(0, tokenizer.vocab_size, (4, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, _ = model(prompts)
        theirs = hf(prompts).logits
    assert (ours - theirs).abs().max().item() < 1e-4

    prompt = prompts[0, :8].tolist()
    engine = Engine(model, tokenizer)
    greedy = engine.generate([prompt], SamplingParams(max_new_tokens=32, temperature=0.0, ignore_eos=True))[0]
    hf.generation_config.eos_token_id = None  # neither side stops early: 32 tokens each
    with torch.no_grad():
        hf_out = hf.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, pad_token_id=tokenizer.pad_id)
    assert greedy.token_ids == hf_out[0, len(prompt):].tolist()


# A custom template whose reply tokens merge with the template's text (" y|es" after "A:").
CUSTOM = ("{% for m in messages %}{% if m['role'] == 'assistant' %}A: {% generation %}{{ m['content'] }}"
          "{{ eos_token }}{% endgeneration %}{{ '\\n' }}{% else %}{{ m['role'] }}: {{ m['content'] }}{{ '\\n' }}"
          "{% endif %}{% endfor %}{% if add_generation_prompt %}A:{% endif %}")


@pytest.mark.parametrize("name", [*BUILTIN, CUSTOM])
def test_exported_tokenizer_renders_each_template_like_fermion(tokenizer, tmp_path, name):
    model = build(tokenizer.vocab_size)
    template = ChatTemplate.get(name)
    out = export_hf(model, tokenizer, tmp_path / "hf", template=template, dtype="fp32")
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    ours = template.encode(tokenizer, CONVERSATION)
    text = hf_tok.apply_chat_template(CONVERSATION, tokenize=False)
    assert text == ours.text
    rendered = hf_tok.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True,
                                          return_assistant_tokens_mask=True)
    assert rendered["input_ids"] == ours.ids
    assert [bool(m) for m in rendered["assistant_masks"]] == ours.mask  # HF's {% generation %} masks agree too
    prompt = CONVERSATION[:2]
    assert hf_tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True) == template.render(
        prompt, tokenizer, add_generation_prompt=True)
    assert hf_tok.decode(ours.ids) == ours.text


@pytest.mark.parametrize("variant", ["llama-tied-mha", "qwen3moe-qknorm", "mixtral-moe"])
def test_round_trip_export_import_export_is_identical(tokenizer, tmp_path, variant):
    model = build(tokenizer.vocab_size, **VARIANTS[variant][1])
    template = ChatTemplate.get("tagged")
    first = export_hf(model, tokenizer, tmp_path / "first", template=template, dtype="fp32")
    imported = import_hf(first)
    assert hf_config(imported.config, tokenizer) == hf_config(model.cfg, tokenizer)  # the same architecture
    assert imported.chat_template == template.source
    again = Transformer(imported.config)
    again.load_state_dict(imported.state_dict)
    second = export_hf(again, imported.tokenizer, tmp_path / "second",
                       template=ChatTemplate.get(imported.chat_template), dtype="fp32")
    a, b = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (first / name).read_text() == (second / name).read_text()


def test_import_reads_a_folder_transformers_saved(tokenizer, tmp_path):
    """A base model someone else trained: transformers writes it (v5 fuses Mixtral experts on save)."""
    model = build(tokenizer.vocab_size, moe={"n_experts": 4, "top_k": 2})
    first = export_hf(model, tokenizer, tmp_path / "first", template=ChatTemplate.get("chatml"), dtype="fp32")
    hf = transformers.AutoModelForCausalLM.from_pretrained(first)
    hf.save_pretrained(tmp_path / "saved")
    tokenizer.inner.save(str(tmp_path / "saved" / "tokenizer.json"))
    imported = import_hf(tmp_path / "saved")
    reference = to_hf_state_dict(model)
    again = Transformer(imported.config)
    again.load_state_dict(imported.state_dict)
    assert all(torch.equal(reference[k], v) for k, v in to_hf_state_dict(again).items())


def test_sharded_export_and_dtypes(tokenizer, tmp_path):
    model = build(tokenizer.vocab_size)
    out = export_hf(model, tokenizer, tmp_path / "hf", template=ChatTemplate.get("chatml"), dtype="bf16",
                    max_shard_bytes=100_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    hf = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert hf.model.embed_tokens.weight.dtype == torch.bfloat16
    with pytest.raises(ExportError, match="int3"):
        export_hf(model, tokenizer, tmp_path / "bad", template=ChatTemplate.get("chatml"), dtype="int3")


def test_import_refuses_what_fermion_cannot_compute(tokenizer, tmp_path):
    model = build(tokenizer.vocab_size)
    out = export_hf(model, tokenizer, tmp_path / "hf", template=ChatTemplate.get("chatml"), dtype="fp32")
    config = json.loads((out / "config.json").read_text())
    for field, value, message in [("attention_bias", True, "attention_bias"),
                                  ("rope_parameters", {"rope_type": "llama3", "rope_theta": 1e4}, "llama3"),
                                  ("model_type", "gpt2", "gpt2")]:
        (out / "config.json").write_text(json.dumps({**config, field: value}))
        with pytest.raises(ExportError, match=message):
            import_hf(out)


def test_an_option_no_architecture_has_is_refused_by_name(tokenizer, tmp_path):
    class WithParallelBlocks(ModelConfig):  # a hypothetical future option (GPT-J-style parallel attention + MLP)
        parallel_blocks: bool = False

    model = build(tokenizer.vocab_size)
    model.cfg = WithParallelBlocks(**model.cfg.model_dump(), parallel_blocks=True)
    with pytest.raises(ExportError, match="model.parallel_blocks = True"):
        export_hf(model, tokenizer, tmp_path / "hf", template=ChatTemplate.get("chatml"))
    assert not (tmp_path / "hf").exists()
    model.cfg = WithParallelBlocks(**model.cfg.model_dump(exclude={"parallel_blocks"}))  # off: exports as usual
    assert (export_hf(model, tokenizer, tmp_path / "hf", template=ChatTemplate.get("chatml")) / "config.json").is_file()


# What `fermion import` reads: folders transformers itself writes (its config class + save_pretrained), one per
# architecture the map lists, each with options that change the computation where the architecture has them.
SIZES = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=64, rope_theta=5000.0, rms_norm_eps=1e-5)
SAVED_BY_TRANSFORMERS = {
    "llama": ("LlamaConfig", {}),
    "llama-tied": ("LlamaConfig", dict(tie_word_embeddings=True)),
    "mistral-window": ("MistralConfig", dict(sliding_window=8)),
    "qwen3": ("Qwen3Config", dict(head_dim=32)),
    "qwen3-window": ("Qwen3Config", dict(use_sliding_window=True, sliding_window=8, max_window_layers=0)),
    # Windows only from layer 28 on, so none of these 2: full attention throughout, as transformers computes it.
    "qwen3-window-past-depth": ("Qwen3Config", dict(use_sliding_window=True, sliding_window=8, max_window_layers=28)),
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2)),
    # transformers 5.x saves the expert count as num_local_experts; 4.x as num_experts.
    "qwen3_moe": ("Qwen3MoeConfig", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                                         norm_topk_prob=True)),
}


def save_with_transformers(tokenizer, folder, config_class: str, **options):
    config = getattr(transformers, config_class)(vocab_size=tokenizer.vocab_size, **{**SIZES, **options})
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():  # norms away from one, so a misplaced norm shows
        for name, param in hf.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    hf.save_pretrained(folder)
    tokenizer.inner.save(str(folder / "tokenizer.json"))
    return hf


@pytest.mark.parametrize("variant", list(SAVED_BY_TRANSFORMERS))
def test_import_of_a_folder_transformers_wrote_gives_its_logits(tokenizer, tmp_path, variant):
    config_class, options = SAVED_BY_TRANSFORMERS[variant]
    hf = save_with_transformers(tokenizer, tmp_path / "saved", config_class, **options)
    model, _, recipe = imported_recipe(tmp_path / "saved")  # what `fermion import` runs
    assert architecture(recipe.model) == variant.split("-")[0]
    ids = torch.randint(0, tokenizer.vocab_size, (2, 40), generator=torch.Generator().manual_seed(2))  # > window
    with torch.no_grad():
        ours, _ = model(ids)
        theirs = hf(ids).logits
    assert (ours - theirs).abs().max().item() < 1e-4
    assert (ours.argmax(-1) == theirs.argmax(-1)).all()


@pytest.mark.parametrize("key, value, message", [
    ("num_attention_heads", 3, "num_attention_heads \\(3\\) must be a multiple of num_key_value_heads \\(2\\)"),
    ("hidden_size", None, "hidden_size is missing"),
    ("layer_types", ["sliding_attention", "full_attention"], "layer_types"),
])
def test_import_names_a_config_key_it_cannot_honour(tokenizer, tmp_path, key, value, message):
    save_with_transformers(tokenizer, tmp_path / "saved", "Qwen3Config")
    path = tmp_path / "saved" / "config.json"
    config = json.loads(path.read_text())
    if value is None:
        del config[key]
    else:
        config[key] = value
    path.write_text(json.dumps(config))
    with pytest.raises(ExportError, match=f"config.json: .*{message}"):
        imported_recipe(tmp_path / "saved")
