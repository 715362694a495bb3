"""ONNX export against PyTorch: onnxruntime must give the model's logits for every architecture option, at batch
sizes and sequence lengths other than the ones traced (shorter and longer), in fp32 and fp16."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import fermion.export.onnx as onnx_export
from fermion.config import ModelConfig
from fermion.errors import ExportError
from fermion.export.onnx import OnnxModel, export_onnx
from fermion.model.transformer import Transformer

TINY = dict(vocab_size=97, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=96, context_length=48,
            rope_theta=5000.0)
CONFIGS = {
    "dense-tied-gqa": {},
    "dense-untied-mha": dict(n_kv_heads=None, tie_embeddings=False),
    # Wider than the exporter's 8-token trace and narrower than the context: a graph that kept the branch the
    # trace took would be wrong past 16 tokens.
    "sliding-window": dict(sliding_window=16),
    "qk-norm": dict(qk_norm=True),
    "moe": dict(moe=dict(n_experts=4, top_k=2)),
}
EVERYTHING = dict(sliding_window=16, qk_norm=True, moe=dict(n_experts=4, top_k=2))
# (batch, sequence) pairs unlike the (2, 8) trace: one token, shorter than the window, longer, full context.
SHAPES = [(1, 1), (1, 5), (3, 40), (4, 48)]


def build(**overrides) -> Transformer:
    model = Transformer(ModelConfig(**{**TINY, **overrides}))
    model.init_weights(torch.Generator().manual_seed(0))
    with torch.no_grad():  # non-trivial norm weights, so a norm the export dropped or misplaced would show
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(1))
    return model.eval()


def session(path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def max_diff(model: Transformer, sess: ort.InferenceSession, shape: tuple[int, int]) -> float:
    ids = torch.randint(0, model.cfg.vocab_size, shape, generator=torch.Generator().manual_seed(shape[1]))
    (logits,) = sess.run(None, {"input_ids": ids.numpy()})
    with torch.no_grad():
        expected = model(ids)[0].numpy()
    assert logits.shape == expected.shape and logits.dtype == np.float32
    return float(np.abs(logits - expected).max())


@pytest.fixture(scope="module", params=list(CONFIGS))
def exported(request, tmp_path_factory):
    model = build(**CONFIGS[request.param])
    return model, session(export_onnx(model, tmp_path_factory.mktemp(request.param)))


@pytest.mark.parametrize("shape", SHAPES)
def test_fp32_logits_match_pytorch(exported, shape):
    model, sess = exported
    assert max_diff(model, sess, shape) < 1e-4


def test_graph_has_dynamic_batch_and_sequence(exported):
    model, sess = exported
    (inp,), (out,) = sess.get_inputs(), sess.get_outputs()
    assert (inp.name, inp.type, inp.shape) == ("input_ids", "tensor(int64)", ["batch", "sequence"])
    assert (out.name, out.shape) == ("logits", ["batch", "sequence", model.cfg.vocab_size])


def test_export_leaves_the_model_as_it_was(exported):
    model, _ = exported
    assert not model.training
    assert not any({"forward", "expert_impl", "mask_window_always"} & vars(module).keys() for module in model.modules())


def test_fp16_export_stays_close_to_fp32(tmp_path):
    # fp16 keeps 11 significant bits: for these logits (|z| < 2) one unit in the last place is about 1e-3. Measured
    # worst case over the shapes: 4.6e-4, where PyTorch's own fp16 model is 7.5e-4 off. 2e-3 allows two units, far
    # below what a wrong mask or routing does (1e-1 here).
    model = build(**EVERYTHING)
    path = export_onnx(model, tmp_path, dtype="fp16")
    weights = [t for t in onnx.load(str(path)).graph.initializer if len(t.dims) == 2 and min(t.dims) >= 64]
    assert weights and all(t.data_type == onnx.TensorProto.FLOAT16 for t in weights)
    sess = session(path)
    for shape in SHAPES:
        assert max_diff(model, sess, shape) < 2e-3
    assert next(model.parameters()).dtype == torch.float32  # the caller's model is not converted


def test_big_models_write_external_data_atomically(tmp_path, monkeypatch):
    model = build(n_layers=1)
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 0)
    path = export_onnx(model, tmp_path)
    assert (tmp_path / "model.onnx.data").stat().st_size > path.stat().st_size
    assert max_diff(model, session(path), (2, 9)) < 1e-4
    monkeypatch.undo()
    export_onnx(model, tmp_path)  # small again: the stale data file goes, and no staging folder stays behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]
    assert max_diff(model, session(path), (2, 9)) < 1e-4


@pytest.mark.parametrize("options, message", [(dict(dtype="bf16"), "valid: fp32, fp16"),
                                              (dict(opset=17), "use 18 or later")])
def test_unsupported_options_are_refused(tmp_path, options, message):
    with pytest.raises(ExportError, match=message):
        export_onnx(build(), tmp_path / "out", **options)
    assert not (tmp_path / "out").exists()


def test_an_input_longer_than_the_context_is_refused_naming_the_context_length(tmp_path):
    model = build()
    path = export_onnx(model, tmp_path)
    meta = session(path).get_modelmeta()  # what any onnxruntime user can read
    assert meta.custom_metadata_map["context_length"] == "48"
    assert "at most 48 tokens per row (the context length)" in meta.description
    runner = OnnxModel(path)
    assert runner.context_length == 48
    ids = torch.randint(0, model.cfg.vocab_size, (2, 49), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids[:, :48])[0].numpy()
    np.testing.assert_allclose(runner.logits(ids[:, :48].numpy()), expected, atol=1e-4, rtol=0)  # the whole context
    with pytest.raises(ExportError, match=r"input of 49 tokens is longer than the model's context length \(48\)"):
        runner.logits(ids.numpy())
    with pytest.raises(ExportError, match=r"shape \[49\]; the ONNX model takes \[batch, sequence\]"):
        runner.logits(ids[0].numpy())
