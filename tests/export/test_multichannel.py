"""K cotangents per image in one call (the [N*K] image-major layout): exact against one call per
cotangent and against torch autograd; the speed-motivated adjoints (BatchNorm folded into the conv
adjoint, tiled max-pool by ArgMax) against torch autograd, ties included; refusal of a wrong layout."""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
import torchvision
from conftest import MNV2_WEIGHTS, tiny_cnn
from test_parity import _resnet_trunk, assert_parity, autograd_vjp, photos, seeded
from torch import nn

from pbv_onnx.base.errors import ModelError
from pbv_onnx.export import export_model
from pbv_onnx.export.verify import rel_l2, smooth_images
from pbv_onnx.runtime.engine import Engine


class TiledNet(nn.Module):
    """conv-BN-ReLU blocks, non-overlapping max-pools with odd sizes (uncovered edge rows),
    strided depthwise convs (zero-upsampled adjoint; padded and cropped borders)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.pool1 = nn.MaxPool2d(2)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8)
        self.pool2 = nn.MaxPool2d(3)
        self.dw = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8)  # strided depthwise, odd size
        self.dw_wide = nn.Conv2d(8, 8, 5, stride=3, padding=1, dilation=1, groups=8)
        with torch.no_grad():
            for bn in (self.bn1, self.bn2):
                bn.running_mean.uniform_(-0.2, 0.2)
                bn.running_var.uniform_(0.5, 2.0)
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.2, 0.2)

    def forward(self, x):
        x = self.pool1(torch.relu(self.bn1(self.conv1(x))))
        x = self.pool2(torch.relu(self.bn2(self.conv2(x))))
        return self.dw_wide(torch.relu(self.dw(x)))


def tiled_net() -> nn.Module:
    torch.manual_seed(1)
    return TiledNet().eval()


def exported_once(path, net: Callable[[], nn.Module], resize: str):
    """`net()` exported (and checked against torch) to `path` unless an earlier test did."""
    if not path.exists():
        export_model(path, module=net(), resize=resize, progress=None, n_images=2)
    return path


@pytest.fixture(scope="module")
def tiled_model(export_dir):
    return exported_once(export_dir / "tiled.onnx", tiled_net, "71x71")


class PhaseNet(nn.Module):
    """Strided depthwise convs on even sizes (their K-per-image adjoints go phase by phase): one
    after a channel-widening 1x1 conv, BatchNorm and ReLU6, one beside it on the same input, so
    the two phase gradients are summed phase by phase, then masked by the stem's ReLU and
    interleaved before the stem's 3x3 adjoint."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.expand, self.bn1 = nn.Conv2d(8, 32, 1, bias=False), nn.BatchNorm2d(32)
        self.dw, self.bn2 = nn.Conv2d(32, 32, 3, stride=2, padding=1, groups=32, bias=False), nn.BatchNorm2d(32)
        self.project = nn.Conv2d(32, 8, 1)
        self.side = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8)
        with torch.no_grad():
            for bn in (self.bn1, self.bn2):
                bn.running_mean.uniform_(-0.2, 0.2)
                bn.running_var.uniform_(0.5, 2.0)
                bn.weight.uniform_(8.0, 16.0)  # both sides of ReLU6's mask in play
                bn.bias.uniform_(-0.2, 0.5)

    def forward(self, x):
        s = torch.relu(self.stem(x))
        a = self.project(F.relu6(self.bn2(self.dw(F.relu6(self.bn1(self.expand(s)))))))
        return torch.relu(a + self.side(s))


def phase_net() -> nn.Module:
    torch.manual_seed(2)
    return PhaseNet().eval()


class PooledNet(nn.Module):
    """VGG-like: two conv-ReLU pairs before each max-pool, one tiled (2x2) and one overlapping
    (3x3/2, padded), so the backward pass meets a ReLU mask right after each un-pooling."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
        self.c3, self.c4 = nn.Conv2d(16, 32, 3, padding=1), nn.Conv2d(32, 32, 3, padding=1)
        self.c5 = nn.Conv2d(32, 32, 3, padding=1)
        self.tiled, self.overlapping = nn.MaxPool2d(2), nn.MaxPool2d(3, 2, 1)

    def forward(self, x):
        x = self.tiled(torch.relu(self.c2(torch.relu(self.c1(x)))))
        x = self.overlapping(torch.relu(self.c4(torch.relu(self.c3(x)))))
        return torch.relu(self.c5(x))


def pooled_net() -> nn.Module:
    torch.manual_seed(4)
    return PooledNet().eval()


@pytest.fixture(scope="module")
def pooled_model(export_dir):
    return exported_once(export_dir / "pooled.onnx", pooled_net, "48x48")


def assert_multi_equals_single(engine: Engine, x: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """vjp_multi's K gradients per image equal K separate vjp calls; returns the cotangents."""
    rng = np.random.default_rng(seed)
    cot = rng.standard_normal((len(x), k, *engine.info.feature_shape)).astype(np.float32)
    f, g = engine.vjp_multi(x, cot)
    assert g.shape == (len(x), k, *x.shape[1:])
    for j in range(k):
        f1, g1 = engine.vjp(x, cot[:, j])
        np.testing.assert_allclose(f, f1, rtol=1e-5, atol=1e-6)
        for i in range(len(x)):
            assert rel_l2(g[i, j], g1[i]) < 1e-5, (i, j, rel_l2(g[i, j], g1[i]))
    return cot


def test_multi_cotangent_layout_on_every_adjoint_rule(tiny_cnn_model, tiled_model):
    for path in (tiny_cnn_model, tiled_model):
        eng = Engine(path, device="cpu", batch_size=6)
        x = smooth_images(3, eng.info.input_shape[1:], eng.info.preprocessing, seed=5)
        assert_multi_equals_single(eng, x, k=4)


def test_multi_cotangent_gradients_equal_torch_autograd(resnet18_model):
    eng = Engine(resnet18_model, device="cpu")
    reference = _resnet_trunk(seeded(torchvision.models.resnet18, 4))
    x = photos(eng.info.preprocessing, 2)
    cot = np.random.default_rng(3).standard_normal((2, 3, *eng.info.feature_shape)).astype(np.float32)
    _, g = eng.vjp_multi(x, cot)
    for j in range(3):
        _, g32 = autograd_vjp(reference, x, cot[:, j])
        _, g64 = autograd_vjp(reference, x, cot[:, j], torch.float64)
        for i in range(2):
            assert rel_l2(g[i, j], g32[i]) < max(1e-3, 10 * rel_l2(g32[i], g64[i]))


def test_mobilenet_v2_real_weights_multi_equals_single(mnv2_model):
    eng = Engine(mnv2_model, device="cpu")
    assert_multi_equals_single(eng, photos(eng.info.preprocessing, 2), k=3)


def test_folded_batchnorm_and_tiled_maxpool_match_torch_with_exact_ties(tiled_model):
    eng = Engine(tiled_model, device="cpu")
    x = smooth_images(4, (71, 71), eng.info.preprocessing, seed=6)
    x[:2, :, 8:40, 12:44] = 0.25  # a flat patch: exactly tied maxima inside pooling windows
    assert_parity(eng, tiled_net(), x, seed=7)
    graph = onnx.load(str(tiled_model)).graph
    pools = [n for n in graph.node if n.op_type == "MaxPool"]
    assert pools and all(len(n.output) == 1 for n in pools)  # no MaxPool-with-indices left


def test_a_wrong_multi_cotangent_layout_is_refused(tmp_path, monkeypatch):
    from pbv_onnx.export.graph.builder import Ctx, broadcast_shapes

    image_major = Ctx.mul

    def k_major(self, g, t, g_shape=None):  # right for K = 1, pairs rows with the wrong images for K > 1
        ts, gs = self.shape(t), tuple(g_shape if g_shape is not None else self.shape(g) or ())
        if not self.multi or not ts or ts[0] != "N" or len(gs) != len(ts):
            return image_major(self, g, t, g_shape)
        n = self.forward("Shape", [t], start=0, end=1)
        rest = self.const(np.array([int(d) for d in gs[1:]], np.int64))
        shape = self.emit("Concat", [self.const(np.array([-1], np.int64)), n, rest], axis=0)
        view = self.emit("Reshape", [g, shape])
        prod = self.emit("Mul", [view, self.emit("Unsqueeze", [t, self.const(np.array([0], np.int64))])])
        out = self.emit("Reshape", [prod, self.const(np.array([-1, *gs[1:]], np.int64))])
        return self.set_shape(out, broadcast_shapes(gs, ts))

    monkeypatch.setattr(Ctx, "mul", k_major)
    out = tmp_path / "bad.onnx"
    with pytest.raises(ModelError, match="K cotangents per image"):
        export_model(out, module=tiny_cnn(), resize="33x33", progress=None, n_images=2)
    assert not out.exists()


@pytest.mark.skipif(not MNV2_WEIGHTS.is_file(), reason="real MobileNetV2 weights not present")
def test_export_records_the_multi_cotangent_check(mnv2_model):
    from pbv_onnx.runtime.modelfile import MULTI_COTANGENT, read_info

    meta = read_info(mnv2_model).metadata
    assert meta[MULTI_COTANGENT] is True
    assert meta["verification"]["multi_cotangent_vs_single"] <= meta["verification"]["tolerance"]
    assert meta["verification"]["whole_graph_vs_parts"] <= meta["verification"]["tolerance"]


@pytest.mark.parametrize("fixture", ["mnv2_model", "resnet18_model", "resnet18_avg_model"])
def test_the_one_cotangent_per_image_pass_stays_in_the_blocked_layout(fixture, request, tmp_path):
    """What makes the VJP fast on the CPU: `cotangent` shares the image's batch axis, the masks
    are HardSigmoid steps, and the cotangent and ConvTranspose outputs enter the NCHWc layout
    through an identity Conv, so onnxruntime proves the operands of each mask product and residual
    sum equal in shape and keeps the backward pass in its NCHWc layout: a handful of layout
    conversions (mobilenet_v2's graph before: 69 + 34; the K-per-image pass, with its [N, K, ...]
    views, has about one per mask as onnxruntime optimises it: see the next test), and every
    residual Add fused into a Conv."""
    import onnxruntime as ort

    from pbv_onnx.runtime.engine import COTANGENT, IMAGE
    from pbv_onnx.runtime.modelfile import vjp_subgraph
    from pbv_onnx.runtime.sessions import session_options

    if fixture == "mnv2_model" and not MNV2_WEIGHTS.is_file():
        pytest.skip("real MobileNetV2 weights not present")
    proto = onnx.load(str(request.getfixturevalue(fixture)))
    # (--pool avg: the flattened cotangent's reshape keeps the batch axis too)
    dims = {i.name: i.type.tensor_type.shape.dim[0].dim_param for i in proto.graph.input}
    assert dims[COTANGENT] == dims[IMAGE]
    opts = session_options()
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(vjp_subgraph(proto).SerializeToString(), opts, providers=["CPUExecutionProvider"])
    nodes = onnx.load(opts.optimized_model_filepath).graph.node
    ops = [n.op_type for n in nodes]
    assert ops.count("Conv") >= 40
    assert ops.count("ReorderOutput") <= 10, ops.count("ReorderOutput")
    assert "Add" not in ops
    # no mask is a comparison and a Cast (the un-pooling's zeros, (x < x), are the only ones)
    compared = {o for n in nodes if n.op_type in ("Greater", "Less", "Cast") for o in n.output}
    assert not [n for n in nodes if n.op_type == "Mul" and compared & set(n.input)]


@pytest.mark.parametrize("fixture", ["mnv2_model", "resnet18_model"])
def test_the_k_per_image_pass_runs_in_the_blocked_layout(fixture, request, tmp_path, monkeypatch):
    """onnxruntime leaves the K-per-image pass's mask products, and the residual sums that read
    them, in the plain layout with conversions around each; the session the Engine makes runs them
    in the NCHWc layout (pbv_onnx/layout.py) and computes bitwise what onnxruntime's own graph
    computes."""
    import onnxruntime as ort

    from pbv_onnx.runtime.engine import COTANGENTS, FEATURES, IMAGE, INPUT_GRADS
    from pbv_onnx.runtime.modelfile import multi_subgraph
    from pbv_onnx.runtime.sessions import CACHE_ENV, session_options

    if fixture == "mnv2_model" and not MNV2_WEIGHTS.is_file():
        pytest.skip("real MobileNetV2 weights not present")
    path = request.getfixturevalue(fixture)
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    eng = Engine(path, device="cpu")
    x = photos(eng.info.preprocessing, 2)
    cot = np.random.default_rng(3).standard_normal((2, 3, *eng.info.feature_shape)).astype(np.float32)
    f, g = eng.vjp_multi(x, cot)

    opts = session_options()
    opts.optimized_model_filepath = str(tmp_path / "optimised.onnx")
    own = ort.InferenceSession(
        multi_subgraph(onnx.load(str(path))).SerializeToString(), opts, providers=["CPUExecutionProvider"]
    )
    want_f, want_g = own.run([FEATURES, INPUT_GRADS], {IMAGE: x, COTANGENTS: cot.reshape(6, *cot.shape[2:])})
    np.testing.assert_array_equal(f, want_f)
    np.testing.assert_array_equal(g.reshape(want_g.shape), want_g)

    def reorders(graph_file) -> int:
        return sum(n.op_type.startswith("Reorder") for n in onnx.load(str(graph_file)).graph.node)

    (entry,) = (tmp_path / "cache").glob("*.onnx")  # vjp_multi made only the K-per-image session
    before, after = reorders(tmp_path / "optimised.onnx"), reorders(entry)
    # the bench's mobilenet_v2: 170 -> 27, resnet18: 45 -> 13
    assert before >= 30 and 3 * after <= before, (before, after)


def test_strided_depthwise_adjoints_go_phase_by_phase_in_the_k_per_image_pass(tmp_path):
    """The K-per-image pass takes a stride-2 depthwise adjoint that a widening 1x1 conv feeds through
    BatchNorm and ReLU6 as four small depthwise convs, one per output phase, kept through the masks,
    BatchNorm and the 1x1 adjoint, and interleaved once on the 1x1's input channels (the pattern
    strided_depthwise_phases); the side branch's strided depthwise conv, read straight from the stem,
    keeps its zero insertion. Exact against one cotangent per call and torch autograd; the
    one-per-image pass keeps its zero insertions (phases measured slower there)."""
    from pbv_onnx.runtime.modelfile import multi_subgraph, vjp_subgraph

    out = tmp_path / "phases.onnx"
    export_model(out, module=phase_net(), resize="32x32", progress=None, n_images=2)
    eng = Engine(out, device="cpu")
    x = smooth_images(3, (32, 32), eng.info.preprocessing, seed=8)
    net = phase_net()
    with torch.no_grad():
        h = torch.relu(net.stem(torch.from_numpy(x)))
        pre = [net.bn1(net.expand(h))]
        pre.append(net.bn2(net.dw(F.relu6(pre[0]))))
    for v in pre:  # both sides of ReLU6's mask in play
        assert (v < 0).float().mean() > 0.02 and (v > 6).float().mean() > 0.02
    cot = assert_multi_equals_single(eng, x, k=4, seed=9)
    _, g = eng.vjp_multi(x, cot)
    for j in range(4):
        _, g32 = autograd_vjp(phase_net(), x, cot[:, j])
        _, g64 = autograd_vjp(phase_net(), x, cot[:, j], torch.float64)
        for i in range(3):
            assert rel_l2(g[i, j], g32[i]) < max(1e-4, 10 * rel_l2(g32[i], g64[i]))

    proto = onnx.load(str(out))

    def transposed_kernels(graph) -> list:  # the kernels' spatial sizes, from their weights
        dims = {t.name: tuple(t.dims) for t in graph.initializer}
        return sorted(dims[n.input[1]][2:] for n in graph.node if n.op_type == "ConvTranspose")

    assert transposed_kernels(multi_subgraph(proto).graph) == [(1, 1), (2, 2)]  # the side's zeros, one interleave
    assert transposed_kernels(vjp_subgraph(proto).graph) == [(1, 1), (1, 1)]  # two zero insertions


def test_unpooling_keeps_the_batch_axis_so_the_masks_after_it_stay_blocked(pooled_model, tmp_path):
    """Both max-pool adjoints hand the one-per-image pass a gradient with the symbolic batch axis
    N (the scatter-add into zeros made from the pool's input; the nearest upsampling as a Resize
    with constant scales, which export/graph/transform.keep_batch_axis annotates), so onnxruntime can prove the
    ReLU masks after them equal in shape to the gradients and keeps those products in its NCHWc
    layout. Before, every mask after an un-pooling was converted out of that layout and the
    product back in (vgg16: 36 layout conversions, 15 now); the export checked parity as ever."""
    import onnxruntime as ort

    from pbv_onnx.runtime.modelfile import vjp_subgraph
    from pbv_onnx.runtime.sessions import session_options

    sub = vjp_subgraph(onnx.load(str(pooled_model)))
    inferred = onnx.shape_inference.infer_shapes(sub).graph.value_info
    computed = {i.name for i in sub.graph.input}  # the values computed from the image/cotangent
    for n in sub.graph.node:
        if computed & set(n.input):
            computed.update(n.output)
    maps = [
        v
        for v in inferred
        if v.name in computed
        and len(v.type.tensor_type.shape.dim) == 4
        and v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    ]
    assert len(maps) > 20
    assert [v.name for v in maps if v.type.tensor_type.shape.dim[0].dim_param != "N"] == []

    opts = session_options()
    opts.optimized_model_filepath = str(tmp_path / "optimised.onnx")
    ort.InferenceSession(sub.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    nodes = onnx.load(opts.optimized_model_filepath).graph.node
    masks = {o for n in nodes if n.op_type == "HardSigmoid" for o in n.output}
    assert len(masks) >= 3
    # no mask leaves the blocked layout, and the gradient is upsampled in it
    assert [n.name for n in nodes if n.op_type == "ReorderOutput" and masks & set(n.input)] == []
    assert "Upsample" in [n.op_type for n in nodes]


def test_keep_batch_axis_annotates_resizes_that_keep_the_batch_axis():
    """A Resize with constant scales whose first scale is 1 gets its input's named batch axis, also
    down a chain; one that scales the batch axis, or whose input's batch axis is unknown, does not;
    onnxruntime runs the annotated graph at any batch size."""
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    from pbv_onnx.export.graph.transform import keep_batch_axis

    def scales(name, v):
        return numpy_helper.from_array(np.array(v, np.float32), name)

    nodes = [
        helper.make_node("Resize", ["x", "", "s1"], ["r1"], mode="nearest"),
        helper.make_node("Resize", ["r1", "", "s1"], ["r2"], mode="nearest"),
        helper.make_node("Resize", ["x", "", "s2"], ["r3"], mode="nearest"),
        helper.make_node("Reshape", ["x", "flat"], ["v"]),
        helper.make_node("Resize", ["v", "", "s1"], ["r4"], mode="nearest"),
    ]
    nodes += [helper.make_node("Relu", [f"r{i}"], [f"y{i}"]) for i in (2, 3, 4)]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 2, 3, 3])],
        [helper.make_tensor_value_info(f"y{i}", onnx.TensorProto.FLOAT, None) for i in (2, 3, 4)],
        initializer=[
            scales("s1", [1, 1, 2, 2]),
            scales("s2", [2, 1, 1, 1]),
            numpy_helper.from_array(np.array([-1, 2, 3, 3], np.int64), "flat"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    assert keep_batch_axis(model) == 2
    shapes = {
        v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in model.graph.value_info
    }
    assert shapes == {"r1": ["N", 2, 6, 6], "r2": ["N", 2, 12, 12]}
    x = np.random.default_rng(0).standard_normal((3, 2, 3, 3)).astype(np.float32)
    y2, y3, _ = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_array_equal(y2, np.maximum(x.repeat(4, axis=2).repeat(4, axis=3), 0))
    assert y3.shape == (6, 2, 3, 3)


def test_the_float16_copy_keeps_the_unpooling_scales_in_float32(pooled_model):
    """ONNX defines Resize's scales as float32; the float16 copy (CUDA's --precision fp16) casts
    them back, so it loads (here on the CPU provider) and tracks float32: the features closely, the
    gradient as closely as float16 rounding lets each window's first maximum stay where it was."""
    import onnxruntime as ort

    from pbv_onnx.runtime.engine import COTANGENT, FEATURES, IMAGE, INPUT_GRAD
    from pbv_onnx.runtime.fp16 import to_fp16
    from pbv_onnx.runtime.modelfile import vjp_subgraph

    sub = vjp_subgraph(onnx.load(str(pooled_model)))
    rng = np.random.default_rng(0)
    feeds = {
        IMAGE: rng.standard_normal((2, 3, 48, 48)).astype(np.float32),
        COTANGENT: rng.standard_normal((2, 32, 12, 12)).astype(np.float32),
    }
    want = ort.InferenceSession(sub.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        [FEATURES, INPUT_GRAD], feeds
    )
    half = ort.InferenceSession(to_fp16(sub).SerializeToString(), providers=["CPUExecutionProvider"])
    (f16, g16), (f32, g32) = half.run([FEATURES, INPUT_GRAD], feeds), want
    assert f16.dtype == g16.dtype == np.float32
    assert rel_l2(f16, f32) < 5e-3
    assert float(np.sum(g16 * g32) / np.linalg.norm(g16) / np.linalg.norm(g32)) > 0.99
