"""Query a gallery with a probe image: the gallery ranked by DSMI similarity.

The route parses the form, calls :meth:`service.ranking.GalleryRanker.rank` once and turns its
outcome into the response; what can go wrong is raised there as a :mod:`service.domain` error
and answered by :mod:`service.errors`.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends

from ..deps import get_ranker
from ..ranking import GalleryRanker, QueryOptions
from ..schemas import QueryForm, QueryResponse, QueryResult, QueryTimings
from .common import MULTIPART, GalleryName, errors

router = APIRouter(prefix="/v1/galleries", tags=["query"])


@router.post("/{gallery}/query", response_model=QueryResponse, summary="Rank a gallery",
             responses=errors(400, 401, 404, 413, 415, 422, 503))
def query_gallery(gallery: GalleryName, form: Annotated[QueryForm, MULTIPART],
                  ranker: GalleryRanker = Depends(get_ranker)) -> QueryResponse:
    """Score the probe `image` against the gallery and return the `top_k` best matches,
    best first, with the time spent encoding the probe, fetching and scoring the gallery.

    Two-stage by default: the whole gallery is ranked by the per-image embeddings and the
    best `rerank` (DSMI_RERANK) are re-scored by the DSMI pair head; `rerank=0` scores every
    image with the pair head (exhaustive).

    Filters: `exclude_same_camera` (with the probe's `camera_id`) leaves out the probe's own
    camera, `cameras` keeps only those cameras, `exclude_cameras` leaves those out."""
    options = QueryOptions(top_k=form.top_k, rerank=form.rerank, camera_id=form.camera_id,
                           exclude_same_camera=form.exclude_same_camera,
                           cameras=form.cameras, exclude_cameras=form.exclude_cameras,
                           min_probability=form.min_probability)
    outcome = ranker.rank(gallery, form.image.file, options, filename=form.image.filename)
    results = [QueryResult(rank=r, image_id=m.item.image_id, person_id=m.item.person_id,
                           camera_id=m.item.camera_id, score=m.score,
                           probability=None if m.probability is None
                           else round(m.probability, 6))
               for r, m in enumerate(outcome.matches, start=1)]
    return QueryResponse(
        gallery=gallery, model_id=outcome.model_id, top_k=form.top_k,
        gallery_size=outcome.gallery_size, scored=outcome.scored, rescored=outcome.rescored,
        rerank=outcome.rerank, resident=outcome.resident, results=results,
        timings=QueryTimings(encode_ms=1e3 * outcome.encode_s, fetch_ms=1e3 * outcome.fetch_s,
                             score_ms=1e3 * outcome.score_s,
                             shortlist_ms=1e3 * outcome.shortlist_s,
                             total_ms=1e3 * outcome.total_s))
