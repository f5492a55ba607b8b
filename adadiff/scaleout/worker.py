"""The long-lived worker: one Upscaler, one engine thread, images in, encoded outputs back.

Ray runs ``UpscaleWorker`` as a threaded actor. Each ``upscale`` call queues one image and waits;
the engine thread admits queued images into an ``ImageStream`` whenever too few tiles are active,
so the tiles of several images share UNet calls. ``progress`` says where each admitted image is;
it runs on another of the actor's threads, so the driver can ask while the engine is busy. The
class itself knows nothing of Ray: the tests use it directly.
"""

from __future__ import annotations

import os
import queue
import socket
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from adadiff.errors import AdadiffError, OutputPathError, WorkerStoppedError
from adadiff.file_upscale import output_record
from adadiff.imageio import check_output_size, decode_image_bytes, encode_image
from adadiff.runtime.stream import ImageStream, StreamItem
from adadiff.runtime.upscaler import Upscaler
from adadiff.scaleout.plan import JobSettings

_STOP = object()
# A failed round fails the images in it and the worker goes on; this many failed rounds in a
# row (a lost device rather than one oversized batch) stop it for good.
MAX_FAILED_ROUNDS = 3


class UpscaleWorker:
    def __init__(
        self,
        settings: dict[str, Any],
        *,
        threads: int | None = None,
        cross_image: bool = True,
        target_tiles: int | None = None,
    ) -> None:
        self.settings = JobSettings(**settings)
        s = self.settings
        started = time.perf_counter()
        self.upscaler = Upscaler.open(s.run_settings(threads))
        # Only here is the model's default schedule known on a remote cluster: refuse once,
        # not for every image.
        self.upscaler.schedule_of(s.schedule, s.interval)
        self.load_seconds = time.perf_counter() - started
        self.stream = ImageStream(
            self.upscaler,
            target_tiles=target_tiles,
            cross_image=cross_image,
            progress=self._on_progress,
        )
        # key -> (name, stage, done, total, stage start): written by the engine thread
        self.status: dict[int, tuple[str, str, int, int, float]] = {}
        self.status_lock = threading.Lock()
        self.inbox: queue.Queue[Any] = queue.Queue()
        self.waiting: dict[int, tuple[dict[str, Any], Any, Future]] = {}
        self.next_id = 0
        self.busy_seconds = 0.0
        self.failure: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, name="adadiff-engine", daemon=True)
        self.thread.start()

    def info(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "backend": self.upscaler.backend.describe(),
            "model": self.upscaler.model_name,
            "load_seconds": round(self.load_seconds, 3),
        }

    def stats(self) -> dict[str, Any]:
        st = self.stream.stats
        return {
            "pid": os.getpid(),
            "images": st.images,
            "unet_calls": st.unet_calls,
            "unet_evaluations": st.unet_evaluations,
            "mean_batch": round(st.mean_batch, 3),
            "busy_seconds": round(self.busy_seconds, 3),
        }

    def progress(self) -> list[dict[str, Any]]:
        """Each admitted image's name, stage (encode, denoise, decode), done and total of that
        stage, and seconds in it; images still queued are not listed."""
        now = time.perf_counter()
        with self.status_lock:
            entries = list(self.status.values())
        return [
            {"name": name, "stage": stage, "done": done, "total": total, "seconds": now - since}
            for name, stage, done, total, since in entries
        ]

    def upscale(self, task: dict[str, Any]) -> dict[str, Any]:
        """Upscale one image given as {"name", "data" (file bytes), "suffix"}; return a record:
        {"status": "done", "image": bytes, "report": {...}} or {"status": "failed", "error"}."""
        if self.failure is not None:
            raise self._stopped()
        done: Future = Future()
        self.inbox.put((task, done))
        if self.failure is not None:  # it stopped while this was put: no one else reads now
            _fail_queued(self.inbox, self._stopped())
        return done.result()

    def _stopped(self) -> WorkerStoppedError:
        return WorkerStoppedError(f"the engine thread stopped: {self.failure!r}")

    def close(self) -> None:
        self.inbox.put(_STOP)
        self.thread.join(timeout=30)
        self.upscaler.close()

    # -- engine thread -------------------------------------------------------------------

    def _loop(self) -> None:
        failed_rounds = 0
        try:
            while True:
                if not self._admit():
                    return
                if self.stream.idle:
                    continue
                started = time.perf_counter()
                try:
                    finished = self.stream.step()
                except Exception as exc:
                    failed_rounds += 1
                    if failed_rounds >= MAX_FAILED_ROUNDS:
                        raise
                    for key in self.stream.abandon():
                        self._forget(key)
                        self.waiting.pop(key)[2].set_exception(exc)
                    continue
                failed_rounds = 0
                self.busy_seconds += time.perf_counter() - started
                for result in finished:
                    self._deliver(result)
        except BaseException as exc:  # handed to every caller waiting on us
            self.failure = exc
            with self.status_lock:
                self.status.clear()
            for _, _, done in self.waiting.values():
                done.set_exception(exc)
            self.waiting.clear()
            _fail_queued(self.inbox, self._stopped())  # these never ran: another worker may

    def _admit(self) -> bool:
        """Move queued images into the stream while it wants more; False on stop."""
        s = self.settings
        while self.stream.wants_more():
            try:
                item = self.inbox.get(block=self.stream.idle)
            except queue.Empty:
                return True
            if item is _STOP:
                return False
            task, done = item
            started = time.perf_counter()
            try:
                kwargs = {} if s.max_pixels is None else {"max_pixels": s.max_pixels}
                image = decode_image_bytes(task["data"], task["name"], **kwargs)
                factor = self.upscaler.config.upscale
                out_name = f"{Path(task['name']).stem}{task['suffix']}"
                check_output_size(out_name, image.width * factor, image.height * factor)
            except AdadiffError as exc:
                done.set_result(_failed(task, exc))
                continue
            except Exception as exc:  # a decoder's bug, memory: this image fails, not the worker
                done.set_exception(exc)
                continue
            key = self.next_id
            self.next_id += 1
            self.waiting[key] = (task, image, done)
            refused = self.stream.add(
                StreamItem(key, image.rgb, schedule=s.schedule, interval=s.interval, seed=s.seed)
            )
            self.busy_seconds += time.perf_counter() - started
            if refused is not None:
                self._deliver(refused)
        return True

    def _on_progress(self, key: int, stage: str, done: int, total: int) -> None:
        self._set_status(key, self.waiting[key][0]["name"], stage, done, total)

    def _set_status(self, key: int, name: str, stage: str, done: int, total: int) -> None:
        with self.status_lock:
            old = self.status.get(key)
            since = old[4] if old is not None and old[1] == stage else time.perf_counter()
            self.status[key] = (name, stage, done, total, since)

    def _forget(self, key: int) -> None:
        with self.status_lock:
            self.status.pop(key, None)

    def _deliver(self, result: Any) -> None:
        task, image, done = self.waiting.pop(result.key)
        try:
            self._reply(result, task, image, done)
        except Exception as exc:  # saving this image failed (memory, an encoder): it alone
            if not done.done():
                done.set_exception(exc)
        finally:
            self._forget(result.key)

    def _reply(self, result: Any, task: dict[str, Any], image: Any, done: Future) -> None:
        if result.error is not None:
            if not isinstance(result.error, AdadiffError):
                done.set_exception(result.error)
                return
            done.set_result(_failed(task, result.error))
            return
        started = time.perf_counter()
        # encoding a large PNG takes seconds: the image is not lost from the progress lines
        self._set_status(result.key, task["name"], "save", 0, 1)
        record = output_record(image, result.image, result.report, self.upscaler.config.upscale)
        try:
            encoded = _encode(record, task["suffix"])
        except ValueError as exc:  # an encoder's own limit (e.g. EXIF too long for JPEG)
            done.set_result(_failed(task, OutputPathError(f"{task['name']}: {exc}")))
            return
        self.busy_seconds += time.perf_counter() - started
        done.set_result(
            {
                "status": "done",
                "name": task["name"],
                "image": encoded,
                "report": record["report"],
                "pid": os.getpid(),
            }
        )


def _encode(record: dict[str, Any], suffix: str) -> bytes:
    return encode_image(
        record["rgb"],
        record["alpha"],
        suffix=suffix,
        bit_depth=record["bit_depth"],
        grayscale=record["grayscale"],
        icc_profile=record["icc_profile"],
        exif=record["exif"],
    )


def _failed(task: dict[str, Any], exc: BaseException) -> dict[str, Any]:
    return {"status": "failed", "name": task["name"], "error": str(exc), "pid": os.getpid()}


def _fail_queued(inbox: queue.Queue[Any], exc: BaseException) -> None:
    while True:
        try:
            item = inbox.get_nowait()
        except queue.Empty:
            return
        if item is not _STOP:
            item[1].set_exception(exc)
