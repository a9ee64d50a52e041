"""What every experiment of the validation study reads: the engine, the stimuli (preprocessed images and
features, cached), masks and boxes in input pixels, the readouts, w*, recorded responses and groups."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import xarray as xr
from PIL import Image

from pbv_onnx.base.errors import InputDataError
from pbv_onnx.base.netcdf import read_netcdf
from pbv_onnx.demo.stimuli import TABLE, Stimulus, read_table
from pbv_onnx.runtime.engine import Engine
from pbv_onnx.runtime.images import Preprocessing, display_image, load_batch


def mask_to_input(mask: np.ndarray, spec: Preprocessing) -> np.ndarray:
    """A stimulus-pixel mask through the model's resize/crop (nearest neighbour): [H, W] bool."""
    img = Image.fromarray(np.asarray(mask, np.uint8) * 255).convert("RGB")
    return display_image(img, replace(spec, interpolation="nearest"))[..., 0] > 127


def box_mask(box, shape: tuple[int, int]) -> np.ndarray:
    """A boolean [H, W] mask of the box (x0, y0, x1, y1), x1/y1 exclusive."""
    m = np.zeros(shape, bool)
    x0, y0, x1, y1 = (int(v) for v in box)
    m[max(y0, 0) : max(y1, 0), max(x0, 0) : max(x1, 0)] = True
    return m


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """The bounding box (x0, y0, x1, y1) of a non-empty mask."""
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


@dataclass
class Lab:
    """The experiment folder opened for the study."""

    folder: Path
    engine: Engine
    table: dict[str, Stimulus]
    readouts: xr.Dataset
    channels: list[str]  # the readouts' channel ids, in their order
    weight: np.ndarray  # [C, *feature_shape] fitted readouts
    bias: np.ndarray  # [C]
    mean: xr.DataArray  # recorded mean response (channel, stimulus)
    gt: object  # synthetic.GroundTruth
    _x: dict = field(default_factory=dict)
    _a: dict = field(default_factory=dict)

    @property
    def spec(self) -> Preprocessing:
        return self.engine.info.preprocessing

    @property
    def size(self) -> tuple[int, int]:
        return tuple(self.spec.input_size)

    def role(self, role: str) -> list[Stimulus]:
        return [s for s in self.table.values() if s.role == role]

    def load(self, ids) -> None:
        """Preprocess and compute features of the stimuli not cached yet, in one batch."""
        todo = [i for i in dict.fromkeys(ids) if i not in self._x]
        if not todo:
            return
        x = load_batch([self.folder / self.table[i].file for i in todo], self.spec)
        a = self.engine.feature_maps(x)
        for k, i in enumerate(todo):
            self._x[i], self._a[i] = x[k], np.asarray(a[k], np.float64)

    def x(self, ids) -> np.ndarray:
        """Preprocessed images [N, 3, H, W]."""
        ids = list(ids)
        self.load(ids)
        return np.stack([self._x[i] for i in ids]) if ids else np.zeros((0, 3, *self.size), np.float32)

    def a(self, ids) -> np.ndarray:
        """Features [N, *feature_shape] (float64)."""
        ids = list(ids)
        self.load(ids)
        return np.stack([self._a[i] for i in ids])

    def mask(self, sid: str, which: str = "part") -> np.ndarray:
        """A stimulus's mask ("part", "part2" or "decoy") in input pixels."""
        from pbv_onnx.demo.stimuli import load_mask

        return mask_to_input(load_mask(self.folder, self.table[sid], which), self.spec)

    def box(self, sid: str, which: str = "part") -> tuple[int, int, int, int]:
        """The rectangle of a stimulus's mask in input pixels."""
        return mask_box(self.mask(sid, which))

    def index(self, channel) -> int:
        return self.channels.index(str(channel))

    def gt_index(self, channel) -> int:
        return [str(c) for c in self.gt.channel].index(str(channel))

    def w_star(self, channel) -> np.ndarray:
        """w* of a channel in the feature shape."""
        return self.gt.w_star()[self.gt_index(channel)].reshape(self.engine.info.feature_shape)

    def gt_response(self, a: np.ndarray, channel) -> np.ndarray:
        """r_GT of one channel for features [N, ...]."""
        from pbv_onnx.demo import synthetic

        return np.asarray(synthetic.gt_response(self.gt, np.asarray(a, np.float32)))[self.gt_index(channel)]

    def gt_cotangent(self, a: np.ndarray, channel) -> np.ndarray:
        from pbv_onnx.demo import synthetic

        return np.asarray(synthetic.gt_cotangent(self.gt, np.asarray(a, np.float32), self.gt_index(channel)))

    def readout(self, a: np.ndarray, channel) -> np.ndarray:
        """The fitted readout's prediction for features [N, ...]."""
        n = self.index(channel)
        return np.asarray(a, np.float64).reshape(len(a), -1) @ self.weight[n].ravel() + self.bias[n]

    def group(self, sid: str) -> str:
        s = self.table[sid]
        return s.group or s.source

    def top_bodies(self, channel, k: int) -> list[str]:
        """The channel's k body stimuli with the highest recorded mean response (ties by id)."""
        bodies = sorted(s.stimulus for s in self.role("body") if s.stimulus in self.mean["stimulus"].values)
        resp = self.mean.sel(channel=str(channel)).sel(stimulus=bodies).values
        order = np.lexsort((np.arange(len(bodies)), -resp))
        return [bodies[i] for i in order[:k]]


def similarity(w: np.ndarray, a_o: np.ndarray, a_b: np.ndarray) -> np.ndarray:
    """s(o, b) for one readout w [D...] and features a_o [N, ...] against one a_b [...] or paired [N, ...]."""
    w = np.asarray(w, np.float64).ravel()
    u = np.asarray(a_o, np.float64).reshape(len(a_o), -1) * w
    b = np.asarray(a_b, np.float64)
    z = (b.reshape(len(b), -1) if b.ndim == np.ndim(a_o) else b.reshape(1, -1)) * w
    num = (u * z).sum(1)
    den = np.linalg.norm(u, axis=1) * np.linalg.norm(z, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, 0.0)


def best_reference(lab: Lab, w: np.ndarray, obj: str, channel, k: int) -> str:
    """argmax_b s(o, b) over the channel's top-k bodies by recorded response (ties: the first id)."""
    cands = lab.top_bodies(channel, k)
    s = similarity(w, lab.a(cands), lab.a([obj])[0])
    return cands[int(np.argmax(s))]


def open_lab(model, readouts, experiment, device: str = "auto", batch_size: int = 16) -> Lab:
    """Open the experiment folder, its ground truth and the fitted readouts for the study."""
    from pbv_onnx.demo import synthetic

    folder = Path(experiment)
    table = {s.stimulus: s for s in read_table(folder / TABLE)}
    engine = Engine(model, device=device, batch_size=batch_size)
    ro = read_netcdf(readouts, "readouts")
    fs = engine.info.feature_shape
    if ro.sizes.get("feature") != int(np.prod(fs)):
        raise InputDataError(
            readouts, f"readouts have {ro.sizes.get('feature')} features, the model {int(np.prod(fs))}"
        )
    resp = read_netcdf(folder / "responses.nc", "responses")
    mean = resp["response"].mean("repetition")
    gt = synthetic.load_ground_truth(folder)
    return Lab(
        folder=folder,
        engine=engine,
        table=table,
        readouts=ro,
        channels=[str(c) for c in ro["channel"].values],
        weight=np.asarray(ro["weight"].values, np.float64).reshape(-1, *fs),
        bias=np.asarray(ro["bias"].values, np.float64),
        mean=mean.assign_coords(channel=[str(c) for c in mean["channel"].values]),
        gt=gt,
    )
