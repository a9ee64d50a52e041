"""Export-stage fixtures: models exported once per session into a temporary folder, and references."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared"
MNV2_WEIGHTS = SHARED / "weights" / "mobilenet_v2_imagenet.pth"
if str(ROOT) not in sys.path:  # the export env may not have the project installed
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

SMALL = "64x64"  # random-weight backbones are verified at a small input size to keep tests fast


def run_cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """`pbv-onnx ARGS` in a subprocess of this interpreter, with the project importable."""
    code = "import sys; from pbv_onnx.cli.main import main; sys.argv = ['pbv-onnx'] + sys.argv[1:]; main()"
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    return subprocess.run(
        [sys.executable, "-c", code, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


class TinyCNN(nn.Module):
    """Grouped, depthwise, dilated and strided convs, overlapping max-pool, a residual, smooth units."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.grouped = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=4)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)  # overlapping windows
        self.depthwise = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=8)
        self.act = nn.ReLU6()
        self.pointwise = nn.Conv2d(8, 8, 1)
        self.hs = nn.Hardswish()
        self.down = nn.Conv2d(8, 6, 3, stride=2)  # odd sizes: the adjoint needs output_padding
        self.silu = nn.SiLU()
        with torch.no_grad():  # non-trivial batch-norm statistics
            self.bn1.running_mean.uniform_(-0.2, 0.2)
            self.bn1.running_var.uniform_(0.5, 2.0)
            self.bn1.weight.uniform_(0.5, 1.5)
            self.bn1.bias.uniform_(-0.2, 0.2)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.pool(self.grouped(x))
        x = x + self.pointwise(self.act(self.depthwise(x)))
        return self.silu(self.down(self.hs(x)))


def tiny_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return TinyCNN().eval()


@pytest.fixture(scope="session")
def export_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("exported")


@pytest.fixture(scope="session")
def mnv2_model(export_dir) -> Path:
    """The documented CLI spelling, end to end, with the shared real weights."""
    if not MNV2_WEIGHTS.is_file():
        pytest.skip("../shared/weights/mobilenet_v2_imagenet.pth is not present (real weights needed)")
    out = export_dir / "models" / "mnv2.onnx"
    proc = run_cli(
        "export",
        "--arch",
        "mobilenet_v2",
        "--layer",
        "features.18",
        "--weights",
        "../shared/weights/mobilenet_v2_imagenet.pth",
        "--mean",
        "0.5",
        "0.5",
        "0.5",
        "--std",
        "0.5",
        "0.5",
        "0.5",
        "--out",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr
    return out


def _export(export_dir: Path, name: str, **kwargs) -> Path:
    from pbv_onnx.export import export_model

    out = export_dir / f"{name}.onnx"
    if not out.exists():
        export_model(out, progress=None, n_images=2, **kwargs)
    return out


@pytest.fixture(scope="session")
def alexnet_model(export_dir) -> Path:
    return _export(export_dir, "alexnet", arch="alexnet", layer="features", weights="none", seed=3, resize="96x96")


@pytest.fixture(scope="session")
def resnet18_model(export_dir) -> Path:
    return _export(export_dir, "resnet18", arch="resnet18", layer="layer4", weights="none", seed=4, resize=SMALL)


@pytest.fixture(scope="session")
def resnet18_avg_model(export_dir) -> Path:
    return _export(
        export_dir, "resnet18_avg", arch="resnet18", layer="layer4", weights="none", seed=4, resize=SMALL, pool="avg"
    )


@pytest.fixture(scope="session")
def tiny_cnn_model(export_dir) -> Path:
    return _export(export_dir, "tiny", module=tiny_cnn(), resize="33x33")
