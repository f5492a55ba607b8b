"""The one backend Protocol and the typed facades the runtime talks to.

A backend opens one ``Engine`` per component (load once, call many). An engine maps input names to
float32 numpy arrays and returns output names to arrays, as Polygraphy's runners do. The facades
check every call against the component's ModelSpec and log calls, batch sizes and time.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import numpy as np

from adadiff.errors import EngineMismatchError, ShapeError
from adadiff.specs import ModelSpec


class Engine(Protocol):
    spec: ModelSpec

    def __call__(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def close(self) -> None:
        """Release what the engine holds (session, module, TensorRT context); it is not called
        again after this."""
        ...


class Backend(Protocol):
    name: str

    def open(self, component: str) -> Engine: ...

    def describe(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


@dataclass
class CallLog:
    """Per component: calls, tile evaluations and seconds spent inside engine calls."""

    calls: dict[str, int] = field(default_factory=dict)
    items: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def add(self, component: str, batch: int, seconds: float) -> None:
        self.calls[component] = self.calls.get(component, 0) + 1
        self.items[component] = self.items.get(component, 0) + batch
        self.seconds[component] = self.seconds.get(component, 0.0) + seconds

    def as_dict(self) -> dict[str, dict[str, float]]:
        return {
            name: {
                "calls": self.calls[name],
                "items": self.items[name],
                "seconds": round(self.seconds[name], 6),
            }
            for name in sorted(self.calls)
        }


class Facade:
    def __init__(self, engine: Engine, log: CallLog) -> None:
        self.engine = engine
        self.spec = engine.spec
        self.log = log

    def run(self, **feeds: np.ndarray) -> np.ndarray:
        feeds = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in feeds.items()}
        batch = self.spec.check_inputs(feeds)
        start = time.perf_counter()
        out = self.engine(feeds)
        self.log.add(self.spec.name, batch, time.perf_counter() - start)
        (name,) = self.spec.output_names
        result = out[name]
        if result.shape[0] != batch:
            raise ShapeError(
                f"{self.spec.name} returned batch {result.shape[0]} for input batch {batch}"
            )
        return result


class UNet(Facade):
    def denoise(self, sample: np.ndarray, timestep: np.ndarray) -> np.ndarray:
        return self.run(sample=sample, timestep=timestep)


class VAEEncoder(Facade):
    def encode(self, image: np.ndarray) -> np.ndarray:
        return self.run(image=image)


class VAEDecoder(Facade):
    def decode(self, latent: np.ndarray) -> np.ndarray:
        return self.run(latent=latent)


class PFJModule(Facade):
    def modulate(self, lr_latent: np.ndarray, gain: np.ndarray) -> np.ndarray:
        return self.run(lr_latent=lr_latent, gain=gain)


class MMLEModule(Facade):
    def score(self, x0: np.ndarray, lr_latent: np.ndarray, timestep: np.ndarray) -> np.ndarray:
        return self.run(x0=x0, lr_latent=lr_latent, timestep=timestep)


FacadeT = TypeVar("FacadeT", bound=Facade)

FACADES: dict[str, type[Facade]] = {
    "unet": UNet,
    "vae_encoder": VAEEncoder,
    "vae_decoder": VAEDecoder,
    "pfj": PFJModule,
    "mmle": MMLEModule,
}


class Components:
    """Opens each component once, on first use, and hands out its facade."""

    def __init__(self, backend: Backend, log: CallLog | None = None) -> None:
        self.backend = backend
        self.log = log or CallLog()
        self._open: dict[str, Facade] = {}

    def new_log(self) -> CallLog:
        """Start counting afresh (one log per upscale)."""
        self.log = CallLog()
        for facade in self._open.values():
            facade.log = self.log
        return self.log

    def close(self) -> None:
        """Close every engine opened so far (the backend closes itself after)."""
        for facade in self._open.values():
            facade.engine.close()
        self._open.clear()

    def open_all(self) -> None:
        """Open every component now: a damaged or mismatched file or engine fails before any
        work, not after the denoising (the decoder is used last)."""
        for name in FACADES:
            self.get(name)

    def get(self, name: str) -> Facade:
        if name not in self._open:
            self._open[name] = FACADES[name](self.backend.open(name), self.log)
        return self._open[name]

    def _typed(self, name: str, kind: type[FacadeT]) -> FacadeT:
        facade = self.get(name)
        if not isinstance(facade, kind):  # FACADES maps each name to its kind
            raise EngineMismatchError(f"component {name} opened as {type(facade).__name__}")
        return facade

    @property
    def unet(self) -> UNet:
        return self._typed("unet", UNet)

    @property
    def vae_encoder(self) -> VAEEncoder:
        return self._typed("vae_encoder", VAEEncoder)

    @property
    def vae_decoder(self) -> VAEDecoder:
        return self._typed("vae_decoder", VAEDecoder)

    @property
    def pfj(self) -> PFJModule:
        return self._typed("pfj", PFJModule)

    @property
    def mmle(self) -> MMLEModule:
        return self._typed("mmle", MMLEModule)
