"""Exports of a fermion checkpoint to the formats other tools load: Hugging Face folders, GGUF and ONNX."""

from fermion import layout
from fermion.errors import ExportError

FORMATS = ("hf", "gguf", "onnx")


def export(run, formats: list[str], out=None, dtype: str | None = None, template: str | None = None,
           warn=print) -> list:
    """Export a run or checkpoint (loaded once) to each format: <run>/export/<format>, or `out` for one format.
    Returns the written paths. Import errors of an optional exporter's package propagate (ModuleNotFoundError)."""
    from pathlib import Path

    from fermion import checkpoint

    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ExportError(f"format {unknown[0]!r} is not one of {', '.join(FORMATS)}")
    if out is not None and len(formats) > 1:
        raise ExportError("an output folder names one format; export one format at a time with it")
    loaded = checkpoint.load(Path(run), warn=warn)
    model, tokenizer, recipe = loaded.model, loaded.tokenizer, loaded.recipe
    chat_template = loaded.chat_template(template)
    paths = []
    for fmt in formats:
        folder = Path(out) if out is not None else layout.output_root(Path(run), layout.EXPORT) / fmt
        if fmt == "hf":
            from fermion.export.hf import export_hf

            paths.append(export_hf(model, tokenizer, folder, template=chat_template, dtype=dtype or "bf16"))
        elif fmt == "gguf":
            from fermion.export.gguf import export_gguf

            paths.append(export_gguf(model, tokenizer, folder, dtype=dtype or "f16", chat_template=chat_template.source,
                                     template_name=chat_template.name, name=recipe.run.name))
        else:
            from fermion.export.onnx import export_onnx

            paths.append(export_onnx(model, folder, dtype=dtype or "fp32"))
    return paths

