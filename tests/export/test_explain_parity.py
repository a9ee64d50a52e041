"""The runtime's explanation of a pair equals torch autograd on the same backbone and definition."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

torch = pytest.importorskip("torch", reason="the parity test runs in the export environment (.venv/export)")
pipeline = pytest.importorskip(
    "pbv_onnx.export.pipeline", reason="the export stage (export/pipeline.py) is not present"
)

from pbv_onnx.data.features import model_attrs  # noqa: E402
from pbv_onnx.data.readouts import write_readouts  # noqa: E402
from pbv_onnx.data.responses import make_responses  # noqa: E402
from pbv_onnx.export import backbone  # noqa: E402
from pbv_onnx.method.stats import rel_l2  # noqa: E402
from pbv_onnx.runtime.engine import Engine  # noqa: E402
from pbv_onnx.runtime.images import load_batch  # noqa: E402
from pbv_onnx.workflows import explain as ex  # noqa: E402

ARCH, LAYER, SIZE = "resnet18", "layer2", "64x64"


@pytest.fixture(scope="module")
def setup(tmp_path_factory, shared_images):
    folder = tmp_path_factory.mktemp("parity")
    model = pipeline.export_model(
        folder / "m.onnx", arch=ARCH, layer=LAYER, weights="none", seed=0, resize=SIZE, progress=None
    ).path
    eng = Engine(model, device="cpu")
    files = shared_images[:6]
    stim = [f"s{i}" for i in range(len(files))]
    cats = ["body", "body", "body", "body", "object", "object"]
    D = eng.info.n_features
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((1, D)) * 0.01).astype(np.float32)
    resp = rng.standard_normal((1, len(files)))
    resp[0, 4] = 10.0  # s4 is the channel's top object
    ds = make_responses(resp, [0], stim, cats, file=[str(f) for f in files], preferred="body")
    ds.to_netcdf(folder / "responses.nc", engine="h5netcdf")
    ro = xr.Dataset(
        {"weight": (("channel", "feature"), w), "bias": ("channel", np.zeros(1, np.float32))},
        coords={"channel": [0]},
        attrs={**model_attrs(eng.info), "preferred_category": "body"},
    )
    write_readouts(ro, folder / "readouts.nc")
    study = ex.open_study(
        model, folder / "readouts.nc", folder / "responses.nc", device="cpu", progress=False, engine=eng
    )
    net = backbone.truncate(backbone.load_backbone(ARCH, "none", 0).model, LAYER, "none").double().eval()
    return study, net, w[0].astype(np.float64)


def torch_pair(net, x_o: np.ndarray, x_b: np.ndarray, w: np.ndarray):
    """phi, s_n, v and both J^T v by torch autograd in float64, straight from docs/method.md."""
    x = torch.tensor(np.stack([x_o, x_b]), dtype=torch.float64, requires_grad=True)
    phi = net(x).reshape(2, -1)
    wt = torch.tensor(w)
    u, z = wt * phi[0], wt * phi[1]
    v = (wt**2 * phi[0] * phi[1] / (u.norm() * z.norm())).detach()
    (g,) = torch.autograd.grad((phi * v).sum(), x)
    s = (u @ z / (u.norm() * z.norm())).item()
    return phi.detach().numpy(), s, v.numpy(), g.numpy()


@pytest.mark.parametrize("candidates", ["top-k", "all"])
def test_explained_pair_equals_torch_autograd(setup, candidates):
    study, net, w = setup
    pairs = ex.build_pairs(study, top_k_objects=1, mode=candidates, k=2)
    assert pairs[0].ooc.label == "s4"
    ds = ex.explain(study, pairs)
    spec = study.engine.info.preprocessing
    x = load_batch([pairs[0].ooc.path, pairs[0].reference.path], spec)
    phi, s, v, g = torch_pair(net, x[0], x[1], w)
    ours_phi = study.phi([pairs[0].ooc, pairs[0].reference])
    assert rel_l2(ours_phi, phi) < 1e-5
    assert float(ds["similarity"][0]) == pytest.approx(s, abs=1e-6)
    from pbv_onnx.method.saliency import hadamard_weights

    assert rel_l2(hadamard_weights(w, *ours_phi), v) < 1e-5
    grads = ds["input_grad"].values[0]
    print(
        f"\nparity ({candidates}): features {rel_l2(ours_phi, phi):.1e}, similarity "
        f"{abs(float(ds['similarity'][0]) - s):.1e}, G_o {rel_l2(grads[0], g[0]):.1e}, G_b {rel_l2(grads[1], g[1]):.1e}"
    )
    for r in range(2):
        assert rel_l2(grads[r], g[r]) < 1e-3, (r, rel_l2(grads[r], g[r]))
    # and the reference is the best candidate under torch's similarity too
    cands = ex.candidates(study, 0, candidates, 2, exclude=pairs[0].ooc)
    xs = load_batch([c.path for c in cands], spec)
    best = max(cands, key=lambda c: torch_pair(net, x[0], xs[cands.index(c)], w)[1])
    assert pairs[0].reference.label == best.label
