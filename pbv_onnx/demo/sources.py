"""The demo's source photographs: what ships in registry packages and in ../shared/images, labelled."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from pbv_onnx.runtime.images import default_shared, shared_photos  # noqa: F401  (one implementation)


@dataclass(frozen=True)
class Source:
    """One real photograph: its category, where it comes from, and (for bodies) a body-part box.

    `part` is (x0, y0, x1, y1) as fractions of the width and height: a head or face, the body
    part that planted objects borrow. Boxes were drawn by hand on the original photographs.
    """

    name: str
    category: str  # "body" or "object"
    kind: str  # "human", "animal" or "object"
    origin: str  # "skimage", "matplotlib", "sklearn" or "shared"
    part: tuple[float, float, float, float] | None = None
    family: str = ""  # the part's family: "face" (human faces and heads), "animal" (animal and bird heads), "" none


# The catalogue: (file, category, kind, part box). Photos whose package needs a download, or
# that are missing, are skipped when the demo is built. Every real photograph these packages ship
# is used once; left out: synthetic images (chessboard, color, logo, phantom), the horse silhouette,
# motorcycle_right (the stereo twin of motorcycle_left: not a distinct photo) and microaneurysms
# (102 px, a retina image like retina.jpg).
SKIMAGE = [
    ("astronaut.png", "body", "human", (0.28, 0.04, 0.52, 0.31)),
    ("camera.png", "body", "human", (0.29, 0.12, 0.54, 0.42)),
    ("chelsea.png", "body", "animal", (0.33, 0.12, 0.85, 0.90)),
    ("coffee.png", "object", "object", None),
    ("coins.png", "object", "object", None),
    ("clock_motion.png", "object", "object", None),
    ("rocket.jpg", "object", "object", None),
    ("motorcycle_left.png", "object", "object", None),
    # textures and scientific photographs: real, non-body, distinct photos
    ("brick.png", "object", "object", None),
    ("grass.png", "object", "object", None),
    ("gravel.png", "object", "object", None),
    ("moon.png", "object", "object", None),
    ("hubble_deep_field.jpg", "object", "object", None),
    ("retina.jpg", "object", "object", None),
    ("cell.png", "object", "object", None),
    ("ihc.png", "object", "object", None),
    ("page.png", "object", "object", None),
    ("text.png", "object", "object", None),
]
MATPLOTLIB = [
    ("grace_hopper.jpg", "body", "human", (0.24, 0.14, 0.74, 0.58)),
    ("Minduka_Present_Blue_Pack.png", "object", "object", None),
]
SKLEARN = [
    ("china.jpg", "object", "object", None),
    ("flower.jpg", "object", "object", None),
]
# ../shared/images (labelled in its README); grace_hopper.png duplicates matplotlib's photo and
# kite_and_cold.jpg mixes people and objects, so neither is used.
SHARED = [
    ("squat.png", "body", "human", (0.30, 0.16, 0.76, 0.52)),
    ("face.jpg", "body", "human", (0.47, 0.04, 0.73, 0.46)),
    ("pets.jpg", "body", "animal", (0.26, 0.06, 0.66, 0.50)),
    ("cat.png", "body", "animal", (0.33, 0.12, 0.70, 0.56)),
    ("bird.png", "body", "animal", (0.04, 0.20, 0.58, 0.62)),
    ("parrot.jpg", "body", "animal", (0.50, 0.04, 0.96, 0.34)),
    ("owl.jpg", "body", "animal", (0.28, 0.04, 0.66, 0.36)),
    ("dog_segmentation.png", "body", "animal", (0.34, 0.08, 0.96, 0.76)),
    ("dragonfly.png", "body", "animal", (0.36, 0.42, 0.62, 0.70)),
    ("sunflower.png", "object", "object", None),
    ("hot_dog.jpg", "object", "object", None),
    ("missvickie_potato_chips.png", "object", "object", None),
]


# The part families that planted objects borrow: human faces and heads, animal and bird heads.
# The dragonfly's box is not a head of either kind, so it lends no part.
FAMILIES = ("face", "animal")


def family_of(name: str, kind: str) -> str:
    """The part family of a body photo ("" for none)."""
    if name == "dragonfly.png":
        return ""
    return {"human": "face", "animal": "animal"}.get(kind, "")


def _skimage_loader(name: str) -> Callable[[], Image.Image]:
    def load() -> Image.Image:
        import skimage.data

        path = Path(os.path.dirname(skimage.data.__file__)) / name
        with Image.open(path) as im:  # the file ships inside the package; no download
            return im.convert("RGB")

    return load


def _matplotlib_loader(name: str) -> Callable[[], Image.Image]:
    def load() -> Image.Image:
        import matplotlib.cbook

        with matplotlib.cbook.get_sample_data(name, asfileobj=True) as f:
            with Image.open(f) as im:
                return im.convert("RGB")

    return load


def _sklearn_loader(name: str) -> Callable[[], Image.Image]:
    def load() -> Image.Image:
        from sklearn.datasets import load_sample_image

        return Image.fromarray(np.asarray(load_sample_image(name), np.uint8)).convert("RGB")

    return load


def _file_loader(path: Path) -> Callable[[], Image.Image]:
    def load() -> Image.Image:
        with Image.open(path) as im:
            return im.convert("RGB")

    return load


def available_sources(shared: Path | None = None, use_shared: bool = True) -> list[tuple[Source, Image.Image]]:
    """Load every catalogued photo that is available here, in catalogue order.

    A photo whose package is not installed, needs a download, or whose file is absent is skipped.
    """
    entries: list[tuple[Source, Callable[[], Image.Image]]] = []
    for table, origin, loader in (
        (SKIMAGE, "skimage", _skimage_loader),
        (MATPLOTLIB, "matplotlib", _matplotlib_loader),
        (SKLEARN, "sklearn", _sklearn_loader),
    ):
        for name, cat, kind, part in table:
            entries.append((Source(name, cat, kind, origin, part, family_of(name, kind)), loader(name)))
    if use_shared:
        folder = Path(shared) if shared is not None else default_shared()
        for name, cat, kind, part in SHARED:
            src = Source(name, cat, kind, "shared", part, family_of(name, kind))
            entries.append((src, _file_loader(folder / name)))
    out = []
    for src, load in entries:
        try:
            out.append((src, load()))
        except Exception:  # noqa: BLE001  (missing package, offline download, absent file)
            continue
    return out
