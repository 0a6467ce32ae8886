"""Gallery resources: upload images, list, get, delete."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Body, Depends, Query, Response

from ..auth import ApiKey
from ..deps import (
    current_key,
    get_decode_budget,
    get_engine,
    get_metrics,
    get_settings,
    get_store,
)
from ..domain import (
    GalleryConflict,
    GalleryNotFound,
    ImageConflict,
    ImageNotFound,
    RequestInvalid,
    RequestTooLarge,
)
from ..matching import DecodeBudget, gallery_blobs, read_image
from ..metrics import ServiceMetrics
from ..schemas import (
    DeletedGallery,
    DeletedImage,
    GalleryImage,
    GalleryInfo,
    GalleryList,
    GallerySettings,
    GallerySummary,
    ImageList,
    UploadForm,
    UploadResponse,
)
from ..settings import Settings
from ..store import GalleryItem, GalleryStore, InvalidItem, NewItem, new_image_id
from ..store.base import METADATA_MAX_DEPTH, GalleryConfig, check_metadata, content_digest
from ..thumbnails import THUMBNAIL_FIELD, THUMBNAIL_MEDIA_TYPE
from .common import MULTIPART, GalleryName, ImageId, errors

if TYPE_CHECKING:
    from ..engine import Engine

router = APIRouter(prefix="/v1/galleries", tags=["galleries"])

_FILENAME_MAX = 255
_OFFSET_MAX = 2**31 - 1


def _clean_filename(name: str | None) -> str | None:
    """A client's file name as stored: printable characters only, at most 255 of them."""
    if not name:
        return None
    return "".join(ch if ch.isprintable() else "?" for ch in name[:_FILENAME_MAX])


def _missing_image(store: GalleryStore, gallery: str, image_id: str) -> Exception:
    """The 404 for an image that is not there: its gallery's, or its own."""
    if store.gallery_size(gallery) is None:
        return GalleryNotFound(gallery)
    return ImageNotFound(gallery, image_id)


def _info(name: str, config: GalleryConfig, size: int) -> GalleryInfo:
    return GalleryInfo(name=name, size=size, shards=config.shards,
                       retention_days=config.retention_days,
                       created_at=datetime.fromtimestamp(config.created_at, tz=UTC))


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not standard JSON")


def _parse_metadata(values: list[str] | None, n: int, max_bytes: int) -> list[dict[str, Any]]:
    """``metadata`` form values -> one dict per image (see :class:`UploadForm`)."""
    if not values:
        return [{} for _ in range(n)]
    parsed = []
    for k, text in enumerate(values):
        try:
            parsed.append(json.loads(text, parse_constant=_reject_constant))
        except RecursionError as exc:
            raise RequestInvalid(f"metadata[{k}] is nested more than {METADATA_MAX_DEPTH} levels "
                                 "deep", {"index": k}, code="invalid_metadata") from exc
        except ValueError as exc:
            raise RequestInvalid(f"metadata[{k}] is not valid JSON: {exc}", {"index": k},
                                 code="invalid_metadata") from exc
    if len(parsed) == 1 and isinstance(parsed[0], list):
        parsed = parsed[0]
        if len(parsed) != n:
            raise RequestInvalid(f"metadata array has {len(parsed)} entries for {n} images",
                                 code="invalid_metadata")
    elif len(parsed) == 1:
        parsed = parsed * n
    elif len(parsed) != n:
        raise RequestInvalid(f"{len(parsed)} metadata values for {n} images: give one JSON "
                             "object for all images or one per image", code="invalid_metadata")
    for k, entry in enumerate(parsed):
        if not isinstance(entry, dict):
            raise RequestInvalid(f"metadata for image {k} must be a JSON object, not "
                                 f"{type(entry).__name__}", {"index": k},
                                 code="invalid_metadata")
        try:
            check_metadata(entry)
        except InvalidItem as exc:
            raise RequestInvalid(f"metadata for image {k}: {exc}", {"index": k},
                                 code="invalid_metadata") from None
        size = len(json.dumps(entry))
        if size > max_bytes:
            raise RequestInvalid(f"metadata for image {k} is {size} bytes; at most {max_bytes}",
                                 {"index": k}, code="invalid_metadata")
    return [dict(entry) for entry in parsed]


@router.get("", response_model=GalleryList, summary="List the galleries",
            responses=errors(401, 503))
def list_galleries(engine: Engine = Depends(get_engine),
                   store: GalleryStore = Depends(get_store),
                   key: ApiKey | None = Depends(current_key)) -> GalleryList:
    """The galleries this API key may see (all of them without keys or with an admin key)."""
    return GalleryList(model_id=engine.model_id,
                       galleries=[GallerySummary(name=n, size=s)
                                  for n, s in store.list_galleries().items()
                                  if key is None or key.sees(n)])


@router.post("/{gallery}/images", status_code=201, response_model=UploadResponse,
             summary="Upload gallery images",
             responses={200: {"model": UploadResponse,
                              "description": "Every image was already stored (a retry)"},
                        **errors(400, 401, 409, 413, 415, 422, 503)})
def upload_images(gallery: GalleryName, form: Annotated[UploadForm, MULTIPART],
                  response: Response,
                  engine: Engine = Depends(get_engine),
                  store: GalleryStore = Depends(get_store),
                  settings: Settings = Depends(get_settings),
                  metrics: ServiceMetrics = Depends(get_metrics),
                  budget: DecodeBudget = Depends(get_decode_budget)) -> UploadResponse:
    """Store one or many images in a gallery (created if new), all or nothing: if any file
    is bad, nothing of the upload is stored and the error names the file.

    Each image needs a `person_id` and a `camera_id` (repeated in the images' order), and may
    have the client's own `image_id`: then a retried upload never stores twice (an image id
    stored with the same content is answered as stored, 200 when all were; with other
    content 409). On a sharded gallery over a Redis Cluster, an upload whose answer is a 503
    may have stored some of its images: retry it with the same image ids."""
    n = len(form.images)
    if n > settings.max_images_per_upload:
        raise RequestTooLarge(f"{n} images in one upload; at most "
                              f"{settings.max_images_per_upload}", code="too_many_images")
    if len(form.person_id) != n or len(form.camera_id) != n:
        raise RequestInvalid(f"{n} images but {len(form.person_id)} person_id and "
                             f"{len(form.camera_id)} camera_id values: give one of each per "
                             "image, in the same order", code="field_count_mismatch")
    metadata = _parse_metadata(form.metadata, n, settings.max_metadata_bytes)
    if form.image_id is not None and len(form.image_id) != n:
        raise RequestInvalid(f"{n} images but {len(form.image_id)} image_id values: give one "
                             "per image, in the same order, or none",
                             code="field_count_mismatch")
    image_ids = form.image_id or [new_image_id() for _ in range(n)]
    if len(set(image_ids)) != n:
        raise RequestInvalid("an image_id is given twice in one upload",
                             code="duplicate_image_id")
    decoded, digests = [], []
    for k, upload in enumerate(form.images):
        data = upload.file.read(settings.max_image_bytes + 1)
        decoded.append(read_image(data, engine, settings.max_image_bytes, settings.max_pixels,
                                  upload.filename, k, thumbnail=True,
                                  max_decode_bytes=settings.max_decode_bytes, budget=budget))
        digests.append(content_digest(data, form.person_id[k], form.camera_id[k], metadata[k]))
    blobs = gallery_blobs(engine, [d.tensor for d in decoded],
                          [upload.filename for upload in form.images])
    for item_blobs, d in zip(blobs, decoded, strict=True):
        item_blobs[THUMBNAIL_FIELD] = d.thumbnail
    items = [GalleryItem(image_id=image_id, person_id=pid, camera_id=cam,
                         metadata=meta, width=d.width, height=d.height,
                         filename=_clean_filename(upload.filename))
             for upload, image_id, pid, cam, meta, d in zip(
                 form.images, image_ids, form.person_id, form.camera_id, metadata, decoded,
                 strict=True)]
    result = store.add_items(gallery, [NewItem(i, b, digest) for i, b, digest in
                                       zip(items, blobs, digests, strict=True)])
    if result.conflicts:
        raise ImageConflict(gallery, result.conflicts)
    metrics.images_stored.inc(len(result.added))
    stored = {item.image_id: item for item in [*result.added, *result.existing]}
    if not result.added:  # nothing new: a retry of an upload that was stored
        response.status_code = 200
    return UploadResponse(gallery=gallery, model_id=engine.model_id, count=len(result.added),
                          already_stored=len(result.existing), gallery_size=result.size,
                          images=[GalleryImage.from_item(stored.get(i.image_id, i))
                                  for i in items])


@router.put("/{gallery}", response_model=GalleryInfo, status_code=201,
            summary="Create a gallery with its settings",
            responses={200: {"model": GalleryInfo,
                             "description": "The gallery exists with these settings"},
                       **errors(400, 401, 409, 422, 503)})
def create_gallery(gallery: GalleryName, response: Response,
                   body: Annotated[GallerySettings, Body()] = GallerySettings(),
                   store: GalleryStore = Depends(get_store)) -> GalleryInfo:
    """Create the gallery with `shards` and `retention_days` (each omitted one: the service's
    default). Creating it again with the same settings is a no-op answered 200; with other
    settings a 409 (settings are fixed at creation). An upload to a gallery that does not
    exist creates it with the defaults."""
    config, created = store.create_gallery(gallery, body.shards, body.retention_days)
    asked = {"shards": body.shards, "retention_days": body.retention_days}
    have = {"shards": config.shards, "retention_days": config.retention_days}
    differs = {k: v for k, v in asked.items() if v is not None and v != have[k]}
    if not created and differs:
        raise GalleryConflict(f"gallery {gallery!r} exists with other settings ({have}); "
                              "settings are fixed when a gallery is created",
                              {"gallery": gallery, "settings": have, "asked": differs})
    if not created:
        response.status_code = 200
    return _info(gallery, config, 0 if created else store.gallery_size(gallery) or 0)


@router.get("/{gallery}", response_model=GalleryInfo, summary="A gallery's size and settings",
            responses=errors(401, 404, 422, 503))
def get_gallery(gallery: GalleryName, store: GalleryStore = Depends(get_store)) -> GalleryInfo:
    config = store.gallery_config(gallery)
    size = store.gallery_size(gallery)
    if config is None or size is None:
        raise GalleryNotFound(gallery)
    return _info(gallery, config, size)


@router.get("/{gallery}/images", response_model=ImageList, summary="List a gallery's images",
            responses=errors(401, 404, 422, 503))
def list_images(gallery: GalleryName,
                offset: Annotated[int, Query(ge=0, le=_OFFSET_MAX)] = 0,
                limit: Annotated[int, Query(ge=1, le=1000)] = 100,
                store: GalleryStore = Depends(get_store)) -> ImageList:
    """The gallery's images in upload order, `limit` at a time from `offset`."""
    listed = store.list_items(gallery, offset, limit)
    if listed is None:
        raise GalleryNotFound(gallery)
    total, items = listed
    expected = max(0, min(limit, total - offset))
    return ImageList(gallery=gallery, total=total, offset=offset, limit=limit,
                     images=[GalleryImage.from_item(i) for i in items],
                     skipped=max(0, expected - len(items)))


@router.get("/{gallery}/images/{image_id}", response_model=GalleryImage,
            summary="Get one image's metadata", responses=errors(401, 404, 422, 503))
def get_image(gallery: GalleryName, image_id: ImageId,
              store: GalleryStore = Depends(get_store)) -> GalleryImage:
    item = store.get_item(gallery, image_id)
    if item is None:
        raise _missing_image(store, gallery, image_id)
    return GalleryImage.from_item(item)


@router.get("/{gallery}/images/{image_id}/thumbnail", response_class=Response,
            summary="Get one image's thumbnail",
            responses={200: {"content": {THUMBNAIL_MEDIA_TYPE: {}},
                             "description": "A JPEG of at most 96x192 pixels"},
                       **errors(401, 404, 422, 503)})
def get_thumbnail(gallery: GalleryName, image_id: ImageId,
                  store: GalleryStore = Depends(get_store)) -> Response:
    """A small JPEG of the image (aspect kept), stored when it was uploaded."""
    blobs = store.get_blobs(gallery, image_id, [THUMBNAIL_FIELD])
    if blobs is None:
        raise _missing_image(store, gallery, image_id)
    if THUMBNAIL_FIELD not in blobs:
        raise ImageNotFound(gallery, image_id, code="thumbnail_not_found",
                            message=f"image {image_id} was stored without a thumbnail "
                                    "(uploaded by an earlier version)")
    # Images never change under their id: a client may keep the thumbnail.
    return Response(blobs[THUMBNAIL_FIELD], media_type=THUMBNAIL_MEDIA_TYPE,
                    headers={"Cache-Control": "private, max-age=86400, immutable"})


@router.delete("/{gallery}/images/{image_id}", response_model=DeletedImage,
               summary="Delete one image", responses=errors(401, 404, 422, 503))
def delete_image(gallery: GalleryName, image_id: ImageId,
                 store: GalleryStore = Depends(get_store)) -> DeletedImage:
    if not store.delete_item(gallery, image_id):
        raise _missing_image(store, gallery, image_id)
    return DeletedImage(gallery=gallery, image_id=image_id)


@router.delete("/{gallery}", response_model=DeletedGallery,
               summary="Delete a gallery and its images", responses=errors(401, 404, 422, 503))
def delete_gallery(gallery: GalleryName,
                   store: GalleryStore = Depends(get_store)) -> DeletedGallery:
    deleted = store.delete_gallery(gallery)
    if deleted is None:
        raise GalleryNotFound(gallery)
    return DeletedGallery(gallery=gallery, deleted_images=deleted)
