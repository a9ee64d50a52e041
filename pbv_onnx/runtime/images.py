"""Safe image loading and torchvision-equivalent preprocessing with Pillow and numpy."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from pbv_onnx.base.errors import InputDataError, UsageError

# Stimulus photographs are at most a few megapixels; anything far larger is refused as a
# possible decompression bomb before Pillow allocates it.
MAX_PIXELS = 64_000_000


@dataclass(frozen=True)
class Preprocessing:
    """The recorded preprocessing spec of a model (torchvision's Resize, CenterCrop, Normalize).

    `resize`: an int resizes the shorter side (torchvision `Resize(int)`), a pair (h, w) resizes
    to exactly that size. `crop`: (h, w) centre crop after resizing, or None.
    """

    resize: int | tuple[int, int] = (224, 224)
    crop: tuple[int, int] | None = None
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: str = "bilinear"

    @property
    def input_size(self) -> tuple[int, int]:
        """(H, W) of the network input."""
        if self.crop is not None:
            return tuple(self.crop)
        if isinstance(self.resize, int):
            raise ValueError("a shorter-side resize needs a crop to fix the input size")
        return tuple(self.resize)

    def to_dict(self) -> dict:
        return {
            "resize": self.resize if isinstance(self.resize, int) else list(self.resize),
            "crop": None if self.crop is None else list(self.crop),
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        resize = d["resize"]
        return cls(
            resize=resize if isinstance(resize, int) else tuple(resize),
            crop=None if d.get("crop") is None else tuple(d["crop"]),
            mean=tuple(float(v) for v in d["mean"]),
            std=tuple(float(v) for v in d["std"]),
            interpolation=d.get("interpolation", "bilinear"),
        )


_RESAMPLE = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}


def load_image(path: str | os.PathLike, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open an image file as RGB, refusing missing, corrupt, truncated or oversized files."""
    path = Path(path)
    if not path.is_file():
        raise InputDataError(path, "image file not found")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's notes on damaged metadata: the decode decides
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                if w * h > max_pixels:
                    raise InputDataError(path, f"image has {w}x{h} pixels, over the limit of {max_pixels}")
                im.load()  # decode now so truncated files fail here
                return im.convert("RGB")
    except InputDataError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InputDataError(
            path, f"image claims more pixels than the limit of {max_pixels} (refused as a possible decompression bomb)"
        ) from None
    except UnidentifiedImageError as exc:
        raise InputDataError(path, f"not a readable image ({exc.__class__.__name__})") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise InputDataError(path, f"corrupt or truncated image ({exc})") from None


def _resized_size(w: int, h: int, resize: int | tuple[int, int]) -> tuple[int, int]:
    """(new_w, new_h) as torchvision's Resize computes it."""
    if isinstance(resize, int):
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = resize, int(resize * long / short)
        return (new_short, new_long) if w <= h else (new_long, new_short)
    return resize[1], resize[0]


def _geometry(image: Image.Image, spec: Preprocessing) -> Image.Image:
    """Resize and centre-crop exactly as torchvision's Resize and CenterCrop do on PIL input."""
    w, h = image.size
    new_w, new_h = _resized_size(w, h, spec.resize)
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), _RESAMPLE[spec.interpolation])
    if spec.crop is not None:
        ch, cw = spec.crop
        if ch > new_h or cw > new_w:
            raise ValueError(f"crop {spec.crop} larger than resized image {(new_h, new_w)}")
        top = int(round((new_h - ch) / 2.0))
        left = int(round((new_w - cw) / 2.0))
        image = image.crop((left, top, left + cw, top + ch))
    return image


def preprocess(image: Image.Image, spec: Preprocessing) -> np.ndarray:
    """One RGB PIL image -> float32 [3, H, W], as torchvision's transforms do it on PIL input."""
    x = np.asarray(_geometry(image, spec), dtype=np.float32) / 255.0
    x = (x - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def load_batch(paths: Sequence[str | os.PathLike], spec: Preprocessing) -> np.ndarray:
    """Load and preprocess image files -> float32 [N, 3, H, W]."""
    H, W = spec.input_size
    out = np.empty((len(paths), 3, H, W), np.float32)
    for i, p in enumerate(paths):
        out[i] = preprocess(load_image(p), spec)
    return out


def as_rgb(image: str | os.PathLike | Image.Image | np.ndarray) -> Image.Image:
    """An image file, a PIL image or an HxWx3 uint8 array as an RGB PIL image."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise UsageError(
                None, f"an image array must be HxWx3 uint8, got {list(image.shape)} {image.dtype}", param="images"
            )
        return Image.fromarray(image, "RGB")
    return load_image(image)


def preprocess_images(images, spec: Preprocessing) -> np.ndarray:
    """Image files, PIL images or HxWx3 uint8 arrays (one, a list, or an [N, H, W, 3] uint8 array)
    -> float32 [N, 3, H, W]."""
    one = isinstance(images, (str, os.PathLike, Image.Image)) or (isinstance(images, np.ndarray) and images.ndim == 3)
    items = [images] if one else list(images)
    H, W = spec.input_size
    out = np.empty((len(items), 3, H, W), np.float32)
    for i, item in enumerate(items):
        out[i] = preprocess(as_rgb(item), spec)
    return out


def display_image(image: Image.Image, spec: Preprocessing) -> np.ndarray:
    """The uint8 [H, W, 3] crop the network sees, for overlays."""
    return np.asarray(_geometry(image, spec), dtype=np.uint8)


# -- real photographs for checks (the export's verification, benchmarks) and the demo --------------
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
# scikit-image's colour photographs that ship inside its package (no download)
SAMPLE_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png")


def default_shared() -> Path:
    """`../shared/images` beside the repository root (present on the project's machines only)."""
    return Path(__file__).resolve().parents[2].parent / "shared" / "images"


def shared_photos(folder: Path | None = None) -> list[Path]:
    """The photographs in `folder` (default `default_shared()`), sorted; [] where there are none."""
    folder = default_shared() if folder is None else Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def sample_photos() -> list[Path]:
    """SAMPLE_PHOTOS from the installed scikit-image package; [] without it."""
    try:
        import skimage.data
    except ImportError:
        return []
    folder = Path(skimage.data.__file__).parent
    return [folder / name for name in SAMPLE_PHOTOS if (folder / name).is_file()]


def real_photos(folder: Path | None = None) -> list[Path]:
    """Real photographs to check a model on: `shared_photos(folder)`, else `sample_photos()`."""
    return shared_photos(folder) or sample_photos()
