"""ONNX export: token ids [batch, sequence] -> logits [batch, sequence, vocab], both axes dynamic.

The graph comes from torch's dynamo-based exporter (`torch.onnx.export(..., dynamo=True)`), the default since
torch 2.9; the TorchScript one warns that it is deprecated. It traces through `torch.export` with symbolic batch and
sequence sizes declared as `Dim`s (the sequence bounded by the context length, the size of the rotary tables), so
shape arithmetic such as slicing those tables stays symbolic in the graph. It does not make Python branches on
shapes symbolic: it keeps the branch the trace took, silently. So the two parts of the model whose Python decisions
depend on sizes or data are switched to their trace-friendly formulation while exporting, options of the model's
own code: the sliding window becomes a mask at every length (`Transformer.mask_window_always`) instead of a branch
on `T > window`, and the mixture-of-experts layers run densely (`MoEFeedForward.expert_impl = "dense"`) instead of
grouping tokens by expert, whose counts follow the routing of the traced tokens (that one fails loudly).

fp16 exports store weights and compute in fp16 (RMSNorm and the router's softmax stay fp32 inside, as in PyTorch)
and return fp32 logits, so a consumer reads the same output type whichever dtype was exported.

The graph cannot take more tokens than the context length (its rotary tables have that many rows), and ONNX has no
operator to refuse such an input with a message: onnxruntime fails with a broadcast error deep inside. So the file
states the limit where tools show it (the model's description and its `context_length` metadata, which
onnxruntime returns from `get_modelmeta()`), and `OnnxModel`, fermion's way to run the file, checks it first.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fermion.atomic import replaced_dir
from fermion.config import ModelConfig
from fermion.errors import ExportError
from fermion.layout import CARD_FILES
from fermion.model.moe import MoEFeedForward
from fermion.model.transformer import Transformer

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
# Above this much weight data the weights go to `model.onnx.data`: protobuf refuses single files over 2 GiB.
EXTERNAL_DATA_BYTES = int(1.5 * 2**30)
# torch's ONNX functions start at opset 18; asked for less, it exports 18 anyway after a failed down-conversion.
MIN_OPSET = 18
CONTEXT_KEY = "context_length"  # the metadata entry holding the most tokens a row may have


def export_onnx(model: Transformer, out_dir: Path, *, dtype: str = "fp32", opset: int | None = None) -> Path:
    """Write `out_dir/model.onnx` (plus `model.onnx.data` for big models) and return its path.

    The graph accepts any batch size and any sequence length up to the model's context length. `opset` None takes
    the exporter's default (20 with torch 2.13).
    """
    check_exportable(model.cfg, dtype)
    if opset is not None and opset < MIN_OPSET:
        raise ExportError(f"ONNX opset {opset} is older than the exporter supports; use {MIN_OPSET} or later")
    # Converting a copy leaves the caller's weights alone; without a conversion the model itself is exported.
    subject = copy.deepcopy(model).to(DTYPES[dtype]) if DTYPES[dtype] != model.tok_emb.weight.dtype else model
    context = subject.cfg.context_length
    # Two rows and several tokens: torch.export specialises sizes 0 and 1, so the trace must not use them.
    example = torch.randint(0, subject.cfg.vocab_size, (2, min(8, context)), device=subject.tok_emb.weight.device)
    dynamic = {"input_ids": {0: torch.export.Dim("batch"), 1: torch.export.Dim("sequence", max=context)}}
    with exportable(subject) as module, quiet_exporter():
        program = torch.onnx.export(
            module, (example,), input_names=["input_ids"], output_names=["logits"],
            dynamic_shapes=dynamic, opset_version=opset, dynamo=True, verbose=False,
        )
    program.model.metadata_props[CONTEXT_KEY] = str(context)
    program.model.doc_string = (f"fermion model. input_ids: int64 [batch, sequence], at most {context} tokens per "
                                f"row (the context length); logits: float32 [batch, sequence, "
                                f"{subject.cfg.vocab_size}].")
    weight_bytes = sum(p.numel() * p.element_size() for p in subject.parameters())
    return _save_atomically(program, Path(out_dir), external_data=weight_bytes > EXTERNAL_DATA_BYTES)


def check_exportable(cfg: ModelConfig, dtype: str = "fp32", tokenizer: dict | None = None) -> None:
    """What the ONNX export refuses, known before there is a model: a dtype it does not write, or the packages
    torch's exporter needs. Any fermion architecture traces (see the module's docstring); the graph takes token
    ids, so the tokenizer does not matter. `export_onnx` runs it first; `fermion run` runs it before training."""
    if dtype not in DTYPES:
        raise ExportError(f"unsupported ONNX dtype {dtype!r}; valid: {', '.join(DTYPES)}")
    missing = [name for name in ("onnx", "onnxscript") if importlib.util.find_spec(name) is None]
    if missing:
        raise ExportError(f"the ONNX export needs the {' and '.join(missing)} package(s): "
                          "pip install 'fermion[export]'")


class OnnxModel:
    """An exported model in onnxruntime (CPU), refusing with a message an input the graph cannot take."""

    def __init__(self, path: str | Path):
        import onnxruntime

        self.session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        limit = self.session.get_modelmeta().custom_metadata_map.get(CONTEXT_KEY)
        self.context_length = int(limit) if limit is not None else None  # None: exported before it was recorded

    def logits(self, input_ids) -> np.ndarray:
        """Logits [batch, sequence, vocab] for token ids [batch, sequence]."""
        ids = np.asarray(input_ids, dtype=np.int64)
        if ids.ndim != 2:
            raise ExportError(f"input_ids has shape {list(ids.shape)}; the ONNX model takes [batch, sequence]")
        if self.context_length is not None and ids.shape[1] > self.context_length:
            raise ExportError(f"input of {ids.shape[1]} tokens is longer than the model's context length "
                              f"({self.context_length}); pass at most {self.context_length} tokens per row, e.g. the "
                              "last ones of a longer text")
        return self.session.run(None, {"input_ids": ids})[0]


class _LogitsOnly(nn.Module):
    """The graph's one output is the logits; the auxiliary MoE loss only matters in training."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids)[0].float()


@contextlib.contextmanager
def exportable(model: Transformer) -> Iterator[nn.Module]:
    """The model as one logits-only module, switched to its traceable formulations until the block exits."""
    # The dense experts cost n_experts / top_k times the feed-forward FLOPs: the price of a static graph without a
    # grouped-matmul operator in ONNX, and acceptable for the model sizes this exporter targets.
    settings = [(model, "mask_window_always", True)] + [
        (module, "expert_impl", "dense") for module in model.modules() if isinstance(module, MoEFeedForward)]
    saved = [(obj, name, vars(obj).get(name)) for obj, name, _ in settings]  # None: the class's own setting
    was_training = model.training
    for obj, name, value in settings:
        setattr(obj, name, value)
    try:
        yield _LogitsOnly(model).eval()  # eval only quiets the exporter's warning: the model has no dropout
    finally:
        model.train(was_training)
        for obj, name, value in saved:
            if value is None:
                delattr(obj, name)
            else:
                setattr(obj, name, value)


@contextlib.contextmanager
def quiet_exporter() -> Iterator[None]:
    """Hide the exporter's notices that concern torch's own internals, not this model."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)  # "torchvision is not installed. Skipping torchvision::nms" and kin
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
            yield
    finally:
        registration.setLevel(level)


def _save_atomically(program: torch.onnx.ONNXProgram, out_dir: Path, *, external_data: bool) -> Path:
    # The whole folder is replaced, so model.onnx and its data file (which model.onnx names, hence written under
    # their own names) change together, and a stale data file of an earlier external-data export goes with it.
    with replaced_dir(out_dir, "model.onnx", ExportError, "an ONNX export", keep=CARD_FILES) as tmp:
        program.save(tmp / "model.onnx", external_data=external_data)
    return out_dir / "model.onnx"
