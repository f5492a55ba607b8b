"""Several images in flight on one Upscaler: their active tiles share the UNet calls.

A single image runs out of active tiles as they exit (small images, the tail of a schedule), and
its engine calls shrink with them. ``ImageStream`` keeps a ``TilePool`` topped up with new images
whenever fewer than ``target_tiles`` tiles are active, so calls stay full. Each image keeps its own
seed, policy and per-tile noise: its steps and exits are those of upscaling it alone, and its
pixels agree with that up to float rounding (a tile meets other batch neighbours).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from adadiff.runtime.sampler import DenoiseNets, TilePool
from adadiff.runtime.upscaler import PreparedImage, Report, Upscaler

# Per-image progress: (key, stage, done, total), stages as ``Upscaler.upscale`` reports them.
StreamProgress = Callable[[Any, str, int, int], None]


@dataclass(frozen=True)
class StreamItem:
    """One image to upscale; ``key`` names it in the results (a path, an id)."""

    key: Any
    image: Any
    schedule: str | None = None  # None: the model's default
    interval: int | None = None
    seed: int = 0


@dataclass
class StreamResult:
    key: Any
    image: Any = None  # like the input (PIL or array); None when ``error`` is set
    report: Report | None = None
    error: Exception | None = None


@dataclass
class StreamStats:
    images: int = 0
    unet_calls: int = 0
    unet_evaluations: int = 0

    @property
    def mean_batch(self) -> float:
        return self.unet_evaluations / max(self.unet_calls, 1)


class ImageStream:
    """Admit images, run rounds, hand back finished images; one per Upscaler, one thread.

    ``target_tiles`` (default: the upscaler's max batch) is how many active tiles the stream
    keeps before it stops admitting; ``cross_image=False`` admits the next image only when the
    previous one is done (image by image, for comparison). ``progress(key, stage, done, total)``
    hears each image's ``encode`` (tiles), ``denoise`` (timesteps of its tiles, after every
    round) and ``decode`` (latent tiles), on the thread that calls ``add`` and ``step``.
    """

    def __init__(
        self,
        upscaler: Upscaler,
        *,
        target_tiles: int | None = None,
        cross_image: bool = True,
        grouping: str = "regroup",
        progress: StreamProgress | None = None,
    ) -> None:
        self.upscaler = upscaler
        self.progress = progress
        # 0 is refused below, not taken for "the default"
        self.target_tiles = upscaler.max_batch if target_tiles is None else target_tiles
        if self.target_tiles < 1:
            raise ValueError(f"target_tiles must be >= 1, got {self.target_tiles}")
        self.cross_image = cross_image
        self.grouping = grouping
        self.pool = self._new_pool()
        self.jobs: dict[Any, PreparedImage] = {}
        self.admitted: dict[Any, float] = {}
        self.stats = StreamStats()
        self.running = False  # a run is under way (its generator started and not finished)
        upscaler.log = upscaler.components.new_log()

    def _new_pool(self, nets: DenoiseNets | None = None) -> TilePool:
        up = self.upscaler
        return TilePool(nets or up.nets(), grouping=self.grouping, **up.sampler_options())

    def abandon(self) -> list[Any]:
        """Drop every image in flight (after a round failed part-way) and return their keys;
        the stream takes new images afterwards."""
        keys = list(self.jobs)
        self.jobs.clear()
        self.admitted.clear()
        # the same engines: asking the upscaler again would fail once it is closed
        self.pool = self._new_pool(self.pool.nets)
        return keys

    @property
    def idle(self) -> bool:
        return not self.jobs

    def wants_more(self) -> bool:
        if not self.cross_image:
            return self.idle
        return self.pool.active_tiles < self.target_tiles

    def add(self, item: StreamItem) -> StreamResult | None:
        """Tile and encode an image and put its tiles in the pool. An image the upscaler
        refuses (bad input or options, a key already in flight) comes back at once as a result
        with ``error`` set."""
        if item.key in self.jobs:  # refused like a bad image: the images in flight go on
            error = ValueError(
                f"{item.key!r} is already in the stream; give each image a key of its own"
            )
            return StreamResult(item.key, error=error)
        try:
            job = self.upscaler.prepare(
                item.image,
                schedule=item.schedule,
                interval=item.interval,
                seed=item.seed,
                reset_log=False,
                progress=self._hook(item.key),
            )
            self.pool.add(item.key, job.lr_latents, job.policy, seed=item.seed)
            if self.progress is not None:
                self.progress(item.key, "denoise", *self.pool.progress(item.key))
        except Exception as exc:  # one bad image must not stop the others
            self.pool.members.pop(item.key, None)
            return StreamResult(item.key, error=exc)
        self.jobs[item.key] = job
        self.admitted[item.key] = time.perf_counter()
        self.stats.images += 1
        return None

    def step(self) -> list[StreamResult]:
        """One round over every active tile; decode and return the images that finished."""
        self.upscaler.check_open()  # closed with images in flight
        calls, evaluations = self.pool.calls, self.pool.evaluations
        finished = self.pool.round()
        self.stats.unet_calls += self.pool.calls - calls
        self.stats.unet_evaluations += self.pool.evaluations - evaluations
        results = []
        for key, error in self.pool.failed.items():  # non-finite values: that image alone
            self.jobs.pop(key)
            self.admitted.pop(key)
            results.append(StreamResult(key, error=error))
        self.pool.failed.clear()
        if self.progress is not None:
            for key in self.pool.members:
                self.progress(key, "denoise", *self.pool.progress(key))
        for key, sampled in finished:
            job = self.jobs.pop(key)
            # Wall time in the pool, shared with the images that were in flight alongside.
            job.seconds["denoise"] = time.perf_counter() - self.admitted.pop(key)
            try:
                if self.progress is not None:  # it left the pool: the loop above missed it
                    total = len(sampled.steps_per_tile) * self.pool.dtss.t_start
                    self.progress(key, "denoise", total, total)
                image, report = self.upscaler.finish(job, sampled, progress=self._hook(key))
            except Exception as exc:  # reported per image
                results.append(StreamResult(key, error=exc))
                continue
            # The component log covers every image in flight, so it is not this image's.
            report.components = {}
            results.append(StreamResult(key, image, report))
        return results

    def _hook(self, key: Any) -> Callable[[str, int, int], None] | None:
        """The stream's progress callback bound to one image, as ``Upscaler`` calls it."""
        if self.progress is None:
            return None
        report = self.progress
        return lambda stage, done, total: report(key, stage, done, total)

    def run(self, items: Iterable[StreamItem]) -> Iterator[StreamResult]:
        """Upscale every item, yielding results as images finish (not in input order).

        Leaving the loop early (``break``, an exception in it or out of ``items``) drops the
        images still in flight, so a later ``run`` yields only its own. One run at a time: a
        second would take the first one's images."""
        if self.running:
            raise RuntimeError(
                "this ImageStream is already running; finish that run or close it (break out of "
                "its loop) before starting another, or use one stream per run"
            )
        self.running = True
        pending = iter(items)
        exhausted = False
        try:
            while True:
                while not exhausted and self.wants_more():
                    item = next(pending, None)
                    if item is None:
                        exhausted = True
                        break
                    refused = self.add(item)
                    if refused is not None:
                        yield refused
                if self.idle:
                    return
                try:
                    finished = self.step()
                except Exception as exc:
                    # A round mixes the tiles of every image in flight and failed part-way
                    # (say, NaN from one image in fp16, or out of memory): those images fail
                    # with it, and the stream goes on with the next ones.
                    finished = [StreamResult(key, error=exc) for key in self.abandon()]
                yield from finished
        finally:
            # Otherwise their tiles stay in the pool, holding memory, and the next run would
            # hand back images its caller never gave it.
            if not self.idle:
                self.abandon()
            self.running = False


def upscale_many(
    upscaler: Upscaler,
    items: Iterable[StreamItem],
    *,
    target_tiles: int | None = None,
    cross_image: bool = True,
) -> Iterator[StreamResult]:
    """Upscale a stream of images with their tiles pooled into shared UNet calls."""
    yield from ImageStream(upscaler, target_tiles=target_tiles, cross_image=cross_image).run(items)
