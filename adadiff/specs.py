"""Component contracts shared by export, engines, runtime and tests.

A ModelSpec names a component's inputs and outputs with symbolic shapes ("B" is the dynamic tile
batch, "h"/"w" the decoder's dynamic latent size) and holds sample inputs, TensorRT profile shapes
and parity tolerances. Every concrete shape follows from the model config.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from adadiff.config import ModelConfig
from adadiff.errors import ShapeError

Dim = int | str
COMPONENTS = ("unet", "vae_encoder", "vae_decoder", "pfj", "mmle")
# The components that run in half precision at fp16: the SD VAE overflows in fp16 and stays fp32.
# So does the MMLE: its raw scores (PSNR near 28, BRISQUE near 60) lose 0.016 to 0.25 to half
# precision's rounding, about tau or more once weighted, which flips DTSS decisions; it is a
# 0.1 M-parameter network, so fp32 costs nothing.
HALF_COMPONENTS = ("unet", "pfj")


@dataclass(frozen=True, kw_only=True)
class TensorSpec:
    name: str
    shape: tuple[Dim, ...]
    dtype: str = "float32"

    def concrete(self, dims: Mapping[str, int]) -> tuple[int, ...]:
        return tuple(d if isinstance(d, int) else int(dims[d]) for d in self.shape)


@dataclass(frozen=True, kw_only=True)
class Tolerance:
    atol: float
    rtol: float


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    fp32_tolerance: Tolerance
    fp16_tolerance: Tolerance
    # Spatial dims that stay dynamic (only the decoder) and their values at opt.
    spatial: Mapping[str, int]

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.outputs)

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        axes: dict[str, dict[int, str]] = {}
        for t in (*self.inputs, *self.outputs):
            axes[t.name] = {i: d for i, d in enumerate(t.shape) if isinstance(d, str)}
        return axes

    def dims(self, batch: int, **spatial: int) -> dict[str, int]:
        return {"B": batch, **self.spatial, **spatial}

    def sample_inputs(self, batch: int, seed: int = 0, **spatial: int) -> dict[str, np.ndarray]:
        """Random inputs in each tensor's working range (timesteps spread over [0, 999])."""
        rng = np.random.default_rng(seed)
        dims = self.dims(batch, **spatial)
        feeds: dict[str, np.ndarray] = {}
        for t in self.inputs:
            shape = t.concrete(dims)
            if t.name == "timestep":
                feeds[t.name] = rng.integers(0, 1000, size=shape).astype(np.float32)
            elif t.name == "image":
                feeds[t.name] = rng.uniform(-1, 1, size=shape).astype(np.float32)
            elif t.name == "gain":
                feeds[t.name] = np.tanh(rng.standard_normal(shape)).astype(np.float32)
            else:
                feeds[t.name] = rng.standard_normal(shape).astype(np.float32)
        return feeds

    def profile(self, min_batch: int, opt_batch: int, max_batch: int) -> dict[str, tuple]:
        """TensorRT (min, opt, max) shapes for each input over the batch range."""
        if not 1 <= min_batch <= opt_batch <= max_batch:
            raise ShapeError(
                f"batch profile must satisfy 1 <= min <= opt <= max, got "
                f"{min_batch}/{opt_batch}/{max_batch}"
            )
        return {
            t.name: tuple(t.concrete(self.dims(b)) for b in (min_batch, opt_batch, max_batch))
            for t in self.inputs
        }

    def check_inputs(self, feeds: Mapping[str, np.ndarray]) -> int:
        """Validate names, dtypes and shapes; return the batch size."""
        if set(feeds) != set(self.input_names):
            raise ShapeError(
                f"{self.name} takes inputs {list(self.input_names)}, got {sorted(feeds)}"
            )
        batch = None
        bound: dict[str, int] = {}
        for t in self.inputs:
            arr = feeds[t.name]
            if arr.dtype != np.dtype(t.dtype):
                raise ShapeError(f"{self.name}.{t.name}: expected {t.dtype}, got {arr.dtype}")
            if arr.ndim != len(t.shape):
                raise ShapeError(
                    f"{self.name}.{t.name}: expected shape {t.shape}, got {tuple(arr.shape)}"
                )
            for want, got in zip(t.shape, arr.shape, strict=True):
                ok = want == got if isinstance(want, int) else bound.setdefault(want, got) == got
                if not ok:
                    raise ShapeError(
                        f"{self.name}.{t.name}: expected shape {t.shape} (bound {bound}), "
                        f"got {tuple(arr.shape)}"
                    )
            batch = bound.get("B", batch)
        if not batch:
            raise ShapeError(f"{self.name}: batch must be at least 1")
        return int(batch)


def component_specs(cfg: ModelConfig) -> dict[str, ModelSpec]:
    c = cfg.latent_channels
    s = cfg.latent_tile
    px = cfg.tile_size
    f = cfg.vae_scale_factor
    g = cfg.pfj.gain_dim
    n = cfg.mmle.num_scores
    lat = ("B", c, s, s)
    tight = Tolerance(atol=1e-4, rtol=1e-3)
    half = Tolerance(atol=5e-2, rtol=5e-2)
    specs = (
        ModelSpec(
            name="unet",
            inputs=(
                TensorSpec(name="sample", shape=("B", 2 * c, s, s)),
                TensorSpec(name="timestep", shape=("B",)),
            ),
            outputs=(TensorSpec(name="noise_pred", shape=lat),),
            fp32_tolerance=tight,
            fp16_tolerance=half,
            spatial={},
        ),
        ModelSpec(
            name="vae_encoder",
            inputs=(TensorSpec(name="image", shape=("B", 3, px, px)),),
            outputs=(TensorSpec(name="latent", shape=lat),),
            fp32_tolerance=tight,
            fp16_tolerance=half,
            spatial={},
        ),
        ModelSpec(
            name="vae_decoder",
            inputs=(TensorSpec(name="latent", shape=("B", c, "h", "w")),),
            outputs=(TensorSpec(name="image", shape=("B", 3, f"{f}h", f"{f}w")),),
            fp32_tolerance=tight,
            fp16_tolerance=half,
            spatial={"h": s, "w": s, f"{f}h": f * s, f"{f}w": f * s},
        ),
        ModelSpec(
            name="pfj",
            inputs=(
                TensorSpec(name="lr_latent", shape=lat),
                TensorSpec(name="gain", shape=("B", g)),
            ),
            outputs=(TensorSpec(name="modulated", shape=lat),),
            fp32_tolerance=tight,
            fp16_tolerance=half,
            spatial={},
        ),
        ModelSpec(
            name="mmle",
            inputs=(
                TensorSpec(name="x0", shape=lat),
                TensorSpec(name="lr_latent", shape=lat),
                TensorSpec(name="timestep", shape=("B",)),
            ),
            outputs=(TensorSpec(name="scores", shape=("B", n)),),
            fp32_tolerance=tight,
            fp16_tolerance=half,
            spatial={},
        ),
    )
    return {spec.name: spec for spec in specs}
