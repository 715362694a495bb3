"""Exports of a fermion checkpoint to the formats other tools load: Hugging Face folders, GGUF and ONNX.

Each format's module has a `check_exportable(cfg, dtype, tokenizer)` that refuses what it cannot write from the
model's configuration, the dtype and the tokenizer.json alone; its exporter runs it first, and `check` runs it
without a model, so `fermion run` knows before training that every export it promises can be made."""

from fermion import layout
from fermion.errors import ExportError

FORMATS = ("hf", "gguf", "onnx")
DEFAULT_DTYPES = {"hf": "bf16", "gguf": "f16", "onnx": "fp32"}


def _format_module(fmt: str):
    """The format's module; a missing optional package (gguf, onnx) raises ModuleNotFoundError."""
    if fmt not in FORMATS:
        raise ExportError(f"format {fmt!r} is not one of {', '.join(FORMATS)}")
    if fmt == "hf":
        from fermion.export import hf as module
    elif fmt == "gguf":
        from fermion.export import gguf as module
    else:
        from fermion.export import onnx as module
    return module


def check(fmt: str, cfg, dtype: str | None = None, tokenizer: dict | None = None) -> None:
    """Raise ExportError when `fmt` cannot be exported in `dtype` (None: the format's default) for a model of this
    configuration with this tokenizer.json (None: the byte-level BPE tokenizer fermion trains): the exporter's own
    check. A missing package is refused too, naming it."""
    try:
        module = _format_module(fmt)
    except ModuleNotFoundError as err:
        raise ExportError(f"the {fmt} export needs the '{err.name}' package: pip install 'fermion[export]'") from None
    module.check_exportable(cfg, dtype or DEFAULT_DTYPES[fmt], tokenizer)


def export(run, formats: list[str], out=None, dtype: str | None = None, template: str | None = None,
           warn=print, dtypes: dict[str, str | None] | None = None, adapter: bool = False) -> list:
    """Export a run or checkpoint (loaded once) to each format: <run>/export/<format>, or `out` for one format.
    The dtype of a format is dtypes[format] (a recipe's export.<format>.dtype), else `dtype`, else the format's
    default (DEFAULT_DTYPES). Returns the written paths. Import errors of an optional exporter's package propagate
    (ModuleNotFoundError). A LoRA checkpoint is exported with its adapters merged; with `adapter` (hf only), as a
    PEFT adapter folder (<run>/export/adapter) holding its base's HF export (export/peft.py)."""
    from pathlib import Path

    from fermion import checkpoint

    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ExportError(f"format {unknown[0]!r} is not one of {', '.join(FORMATS)}")
    if out is not None and len(formats) > 1:
        raise ExportError("an output folder names one format; export one format at a time with it")
    if adapter and formats != ["hf"]:
        raise ExportError("--adapter writes a PEFT adapter folder beside the hf export of its base; other formats "
                          "take the adapters merged: export them without --adapter")
    loaded = checkpoint.load(Path(run), warn=warn, merge_adapters=not adapter)
    model, tokenizer, recipe = loaded.model, loaded.tokenizer, loaded.recipe
    chat_template = loaded.chat_template(template)
    if adapter:
        from fermion.export.peft import export_adapter

        folder = Path(out) if out is not None else layout.output_root(Path(run), layout.EXPORT) / "adapter"
        return [export_adapter(model, tokenizer, folder, template=chat_template, dtype=dtype or DEFAULT_DTYPES["hf"])]
    paths = []
    for fmt in formats:
        folder = Path(out) if out is not None else layout.output_root(Path(run), layout.EXPORT) / fmt
        fmt_dtype = (dtypes or {}).get(fmt) or dtype or DEFAULT_DTYPES[fmt]
        if fmt == "hf":
            from fermion.export.hf import export_hf

            paths.append(export_hf(model, tokenizer, folder, template=chat_template, dtype=fmt_dtype))
        elif fmt == "gguf":
            from fermion.export.gguf import export_gguf

            paths.append(export_gguf(model, tokenizer, folder, dtype=fmt_dtype, chat_template=chat_template.source,
                                     template_name=chat_template.name, name=recipe.run.name, warn=warn))
        else:
            from fermion.export.onnx import export_onnx

            paths.append(export_onnx(model, folder, dtype=fmt_dtype))
    return paths
