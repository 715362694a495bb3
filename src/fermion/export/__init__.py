"""Exports of a fermion checkpoint to the formats other tools load: Hugging Face folders, GGUF and ONNX."""

# The model options the architecture mappings (hf, gguf) account for. An option added to ModelConfig later is
# refused by them until they learn it, rather than silently exported as if it were off.
MAPPED_FIELDS = {"vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_hidden",
                 "context_length", "rope_theta", "norm_eps", "tie_embeddings", "qk_norm", "sliding_window", "moe",
                 "init_std"}


class ExportError(Exception):
    """A checkpoint or option that cannot be exported faithfully; the message names the field and what would work."""


def check_mapped(cfg, target: str) -> None:
    """Refuse a model option, set away from its default, that the mapping to `target` does not know."""
    for name, field in type(cfg).model_fields.items():
        if name not in MAPPED_FIELDS and getattr(cfg, name) != field.get_default(call_default_factory=True):
            raise ExportError(f"model.{name} = {getattr(cfg, name)!r} has no equivalent in {target}; "
                              "export it with that option off")

# What `fermion card` writes into an export folder (README.md and loss_<stage>.png); re-exporting keeps them.
CARD_FILES = ("README.md", "loss_*.png")
