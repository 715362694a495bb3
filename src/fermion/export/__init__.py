"""Exports of a fermion checkpoint to the formats other tools load: Hugging Face folders, GGUF and ONNX."""


class ExportError(Exception):
    """A checkpoint or option that cannot be exported faithfully; the message names the field and what would work."""
