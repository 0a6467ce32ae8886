"""Query a gallery with a probe image: the gallery ranked by DSMI similarity."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Annotated

import numpy as np
from fastapi import APIRouter, Depends

from ..deps import get_cache, get_decode_budget, get_engine, get_metrics, get_settings, get_store
from ..errors import ServiceError
from ..matching import CameraFilter, DecodeBudget, encode_probe, rank_gallery, read_image
from ..metrics import ServiceMetrics
from ..schemas import QueryForm, QueryResponse, QueryResult, QueryTimings
from ..settings import Settings
from ..store import GalleryStore
from ..store.resident import ResidentCache
from .common import MULTIPART, GalleryName, errors

if TYPE_CHECKING:
    from ..engine import Engine

router = APIRouter(prefix="/v1/galleries", tags=["query"])


def _camera_filter(form: QueryForm) -> CameraFilter:
    excluded = set(form.exclude_cameras or ())
    if form.exclude_same_camera:
        excluded.add(form.camera_id)
    return CameraFilter.of(form.cameras or None, excluded)


@router.post("/{gallery}/query", response_model=QueryResponse, summary="Rank a gallery",
             responses=errors(400, 401, 404, 413, 415, 422, 503))
def query_gallery(gallery: GalleryName, form: Annotated[QueryForm, MULTIPART],
                  engine: Engine = Depends(get_engine),
                  store: GalleryStore = Depends(get_store),
                  settings: Settings = Depends(get_settings),
                  metrics: ServiceMetrics = Depends(get_metrics),
                  cache: ResidentCache | None = Depends(get_cache),
                  budget: DecodeBudget = Depends(get_decode_budget)) -> QueryResponse:
    """Score the probe `image` against the gallery and return the `top_k` best matches,
    best first, with the time spent encoding the probe, fetching and scoring the gallery.

    Two-stage by default: the whole gallery is ranked by the per-image embeddings and the
    best `rerank` (DSMI_RERANK) are re-scored by the DSMI pair head; `rerank=0` scores every
    image with the pair head (exhaustive).

    Filters: `exclude_same_camera` (with the probe's `camera_id`) leaves out the probe's own
    camera, `cameras` keeps only those cameras, `exclude_cameras` leaves those out."""
    start = time.perf_counter()
    if form.exclude_same_camera and form.camera_id is None:
        raise ServiceError(422, "validation_error",
                           "exclude_same_camera needs the probe's camera_id")
    if form.min_probability is not None and engine.calibration is None:
        raise ServiceError(422, "validation_error",
                           "min_probability needs a calibrated model; this one has none "
                           "(export it with a calibration.json)")
    size = store.gallery_size(gallery)
    if size is None:
        raise ServiceError(404, "gallery_not_found", f"no gallery named {gallery!r}",
                           details={"gallery": gallery})
    data = form.image.file.read(settings.max_image_bytes + 1)
    decoded = read_image(data, engine, settings.max_image_bytes, settings.max_pixels,
                         form.image.filename, max_decode_bytes=settings.max_decode_bytes,
                         budget=budget)
    probe = encode_probe(engine, decoded.tensor)
    encode_s = time.perf_counter() - start
    rerank = settings.rerank if form.rerank is None else form.rerank
    outcome = rank_gallery(engine, store, gallery, probe, form.top_k, _camera_filter(form),
                           metrics, cache=cache, rerank=rerank, size_hint=size)
    total_s = time.perf_counter() - start
    for stage, seconds in (("encode", encode_s), ("fetch", outcome.fetch_s),
                           ("shortlist", outcome.shortlist_s), ("score", outcome.score_s)):
        metrics.query_stage.labels(stage).observe(seconds)
    scores = np.array([score for _, score in outcome.ranked], dtype=np.float64)
    probabilities = (engine.calibration.probability(scores).tolist()
                     if engine.calibration is not None else [None] * len(scores))
    results = [QueryResult(rank=r, image_id=item.image_id, person_id=item.person_id,
                           camera_id=item.camera_id, score=score,
                           probability=None if p is None or p != p else round(p, 6))
               for r, ((item, score), p) in enumerate(zip(outcome.ranked, probabilities,
                                                          strict=True), start=1)
               if form.min_probability is None or (p is not None and p >= form.min_probability)]
    return QueryResponse(
        gallery=gallery, model_id=engine.model_id, top_k=form.top_k, gallery_size=size,
        scored=outcome.scored, rescored=outcome.rescored, rerank=outcome.rerank,
        resident=outcome.resident, results=results,
        timings=QueryTimings(encode_ms=1e3 * encode_s, fetch_ms=1e3 * outcome.fetch_s,
                             score_ms=1e3 * outcome.score_s,
                             shortlist_ms=1e3 * outcome.shortlist_s, total_ms=1e3 * total_s))
