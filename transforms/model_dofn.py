"""One pattern for every per-image model (OCR, NSFW): load once per worker, cache by image sha256, ledger on failure.

A model is an ``ImageModel``: ``load()`` (called once, in ``DoFn.setup``), ``run(image) -> dict``
(JSON-able result for one upright RGB image) and ``cache_id`` (model name, version and every setting
that changes the result). ``ImageModelFn`` decodes each record's image through the shared decoder
(``transforms.images.decode``: EXIF orientation, mode conversion, pixel bound), looks the result up
in a ``rewriter.cache.ResponseCache`` under ``sha256([cache_id, image_sha256])`` and only runs the
model on a miss, so a crashed or repeated run never pays twice for an image. A subclass turns the
result into an ``Outcome`` (``annotate``). Every record ends as exactly one outcome:

* no image bytes -> rejected ``image_missing``;
* bytes the decoder refuses -> rejected ``image_undecodable`` / ``image_too_many_pixels``;
* the model raising on a decoded image -> error ``model_error`` (the detail names the model and the
  exception type; the stage goes on).
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from typing import Any, Iterable

import apache_beam as beam
from apache_beam.metrics import Metrics
from PIL import Image

from rewriter.cache import ResponseCache
from schemas import reasons
from schemas.records import ERROR, REJECTED, Outcome, Pair
from transforms import images


class ImageModel:
    """Interface of a per-image model. Subclasses set ``name`` and implement ``load``/``run``."""

    name = "model"

    @property
    def cache_id(self) -> list[Any]:
        """What determines a result besides the pixels (model, version, settings); part of the cache key."""
        return [self.name]

    def load(self) -> None:
        """Load weights (once per worker)."""

    def run(self, image: Image.Image) -> dict[str, Any]:
        raise NotImplementedError


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def error_detail(e: BaseException) -> str:
    """Exception type and message without object addresses (PIL names ``<BytesIO at 0x...>``), so
    ledgers stay byte-identical across runs."""
    return f"{type(e).__name__}: {_ADDRESS.sub('', str(e))[:200]}"


def result_key(model: ImageModel, image_sha256: str) -> str:
    blob = json.dumps([model.cache_id, image_sha256], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class ImageModelFn(beam.DoFn):
    """Run ``models`` on every record's image; subclasses implement ``annotate``.

    Args:
        models: the per-image models, run in order on the same decoded image.
        stage: metrics namespace (``mmcorpus.<stage>``).
        cache_dir: ``ResponseCache`` root (local path or URL); None: no cache.
        max_pixels: decode bound (header-checked, nothing decoded beyond it).
    """

    def __init__(self, models: list[ImageModel], stage: str, cache_dir: str | None = None,
                 max_pixels: int = 89_478_485):
        self.models = models
        self.stage = stage
        self.cache_dir = cache_dir
        self.max_pixels = max_pixels

    def setup(self):
        for m in self.models:
            m.load()
        self._cache = ResponseCache(self.cache_dir) if self.cache_dir else None
        ns = f"mmcorpus.{self.stage}"
        self._hits = Metrics.counter(ns, "cache_hits")
        self._misses = Metrics.counter(ns, "cache_misses")
        self._model_ms = {m.name: Metrics.distribution(ns, f"{m.name}_ms") for m in self.models}

    def _result(self, model: ImageModel, sha: str, get_image) -> dict[str, Any]:
        key = result_key(model, sha)
        if self._cache is not None:
            hit = self._cache.get(key)
            if hit is not None:
                self._hits.inc()
                return hit["result"]
        self._misses.inc()
        t0 = time.perf_counter()
        result = model.run(get_image())
        self._model_ms[model.name].update(int((time.perf_counter() - t0) * 1000))
        if self._cache is not None:
            self._cache.put(key, {"model": model.cache_id, "image_sha256": sha, "result": result})
        return result

    def process(self, pair: Pair) -> Iterable[Outcome]:
        if not pair.image:
            yield Outcome.dropped(pair, REJECTED, reasons.IMAGE_MISSING, "record has no image bytes")
            return
        sha = pair.image_sha256 or hashlib.sha256(pair.image).hexdigest()
        decoded: list[Image.Image] = []

        def get_image() -> Image.Image:
            if not decoded:
                decoded.append(images.decode(pair.image, max_pixels=self.max_pixels))
            return decoded[0]

        results: dict[str, dict[str, Any]] = {}
        for model in self.models:
            try:
                results[model.name] = self._result(model, sha, get_image)
            except images.TooManyPixels as e:
                yield Outcome.dropped(pair, REJECTED, reasons.IMAGE_TOO_MANY_PIXELS, str(e))
                return
            except Exception as e:  # noqa: BLE001 - one bad record must never stop the stage
                if not decoded:  # the decoder refused the bytes
                    yield Outcome.dropped(pair, REJECTED, reasons.IMAGE_UNDECODABLE, error_detail(e))
                else:
                    yield Outcome.dropped(pair, ERROR, reasons.MODEL_ERROR, f"{model.name}: {error_detail(e)}")
                return
        yield from self.annotate(pair.replace(image_sha256=sha), results)

    def annotate(self, pair: Pair, results: dict[str, dict[str, Any]]) -> Iterable[Outcome]:
        """Turn the models' results into outcomes (one per record)."""
        raise NotImplementedError
