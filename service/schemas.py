"""Request and response bodies of the matching service (pydantic models)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import UploadFile
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

from .store import GalleryItem
from .store.base import LABEL_MAX, InvalidItem, check_label

__all__ = ["GALLERY_PATTERN", "IMAGE_ID_PATTERN", "LABEL_MAX", "TOP_K_MAX", "RERANK_MAX",
           "ErrorBody", "ErrorResponse", "GalleryImage", "UploadResponse", "ImageList",
           "DeletedImage", "DeletedGallery", "GallerySummary", "GallerySettings", "GalleryInfo",
           "GalleryList", "QueryResult",
           "QueryTimings", "QueryResponse", "Health", "Readiness", "UploadForm", "QueryForm"]

# Gallery names go into store keys and URLs: a conservative alphabet.
GALLERY_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
# Image ids: the service's are 32 hex digits; a client may give its own (idempotent uploads).
IMAGE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
TOP_K_MAX = 1000
RERANK_MAX = 100_000  # a longer shortlist is no cheaper than exhaustive (rerank=0)


class ErrorBody(BaseModel):
    code: str = Field(description="Stable machine-readable error code", examples=["not_found"])
    message: str = Field(description="What went wrong and what to fix")
    details: Any = Field(None, description="Structured context (field errors, file name, ...)")


class ErrorResponse(BaseModel):
    """The body of every error response."""

    error: ErrorBody


class GalleryImage(BaseModel):
    """A stored gallery image's description."""

    image_id: str = Field(description="Id given at upload: the client's, or the service's "
                                      "(32 hex digits)")
    person_id: str
    camera_id: str
    filename: str | None = Field(None, description="The uploaded file's name")
    width: int | None = Field(None, description="Width of the upright image in pixels")
    height: int | None = Field(None, description="Height of the upright image in pixels")
    metadata: dict[str, Any] = Field(default_factory=dict,
                                     description="Free metadata given at upload")
    created_at: datetime

    @classmethod
    def from_item(cls, item: GalleryItem) -> GalleryImage:
        return cls(image_id=item.image_id, person_id=item.person_id, camera_id=item.camera_id,
                   filename=item.filename, width=item.width, height=item.height,
                   metadata=item.metadata,
                   created_at=datetime.fromtimestamp(item.created_at, tz=UTC))


class UploadResponse(BaseModel):
    gallery: str
    model_id: str
    count: int = Field(description="Images stored by this request")
    already_stored: int = Field(0, description="Images whose image_id the gallery already held "
                                               "with the same content: left as they were")
    gallery_size: int | None = Field(description="Images in the gallery afterwards; null when "
                                                 "a part of it could not be counted just now "
                                                 "(a Redis node failing over): the upload "
                                                 "itself was stored")
    images: list[GalleryImage] = Field(description="The images, in upload order, as stored "
                                                   "(now or before)")


class ImageList(BaseModel):
    gallery: str
    total: int = Field(description="Images in the gallery")
    offset: int
    limit: int
    images: list[GalleryImage]
    skipped: int = Field(0, description="Entries of this page left out because they could not "
                                        "be read (damaged in the store; the log names them)")


class DeletedImage(BaseModel):
    gallery: str
    image_id: str
    deleted: bool = True


class DeletedGallery(BaseModel):
    gallery: str
    deleted_images: int


class GallerySummary(BaseModel):
    name: str
    size: int


class GallerySettings(BaseModel):
    """``PUT /v1/galleries/{gallery}``: the settings a gallery is created with (each
    omitted one: the service's default, DSMI_GALLERY_SHARDS, DSMI_RETENTION_DAYS)."""

    model_config = ConfigDict(extra="forbid")

    shards: int | None = Field(None, ge=1, le=64,
                               description="Parts the gallery is split into, each on its own "
                                           "Redis slot (over a cluster's masters)")
    retention_days: float | None = Field(
        None, gt=0, le=365_000, description="Images older than this disappear from answers at "
                                            "once and are purged from the store")


class GalleryInfo(BaseModel):
    name: str
    size: int
    shards: int
    retention_days: float | None
    created_at: datetime


class GalleryList(BaseModel):
    model_id: str
    galleries: list[GallerySummary]


class QueryResult(BaseModel):
    rank: int = Field(description="1 for the best match")
    image_id: str
    person_id: str
    camera_id: str
    score: float = Field(description="DSMI similarity (cosine, -1 to 1; higher is closer)")
    probability: float | None = Field(
        None, description="Probability that the probe and this image show the same person, "
                          "at even prior odds (calibrated on identities held out of "
                          "training); null when the model has no calibration")


class QueryTimings(BaseModel):
    model_config = ConfigDict(json_schema_extra={"description": "Milliseconds per stage"})

    encode_ms: float = Field(description="Decoding, preprocessing and encoding the probe")
    fetch_ms: float = Field(description="Reading the gallery from the store: for a resident "
                                        "gallery, the generation check and any changes "
                                        "replayed")
    score_ms: float = Field(description="Scoring the probe against the gallery (both stages)")
    shortlist_ms: float = Field(0.0, description="Of score_ms, stage one of two-stage "
                                                 "retrieval (the embeddings' cosine)")
    total_ms: float


class QueryResponse(BaseModel):
    gallery: str
    model_id: str
    top_k: int
    gallery_size: int = Field(description="Images in the gallery when the query ran")
    scored: int = Field(description="Gallery images ranked (after the filters)")
    rescored: int = Field(description="Of those, the images scored by the DSMI pair head: all "
                                      "of them when exhaustive, the shortlist otherwise")
    rerank: int = Field(description="The shortlist length used; 0: exhaustive")
    resident: bool = Field(description="Whether the gallery was scored from this process's "
                                       "resident copy (else streamed from the store)")
    results: list[QueryResult] = Field(description="Best first")
    timings: QueryTimings


class Health(BaseModel):
    status: str = "ok"


class Readiness(BaseModel):
    status: str = "ready"
    model_id: str
    variant: str
    providers: list[str]
    store: str = Field(description="redis or memory")
    persistent: bool = Field(description="Whether galleries survive a restart")
    warnings: list[str] = Field(default_factory=list)


# -- multipart forms --------------------------------------------------------------------------

def _printable(value: str) -> str:
    try:
        return check_label("id", value)
    except InvalidItem as exc:
        raise ValueError(str(exc)) from None


Label = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1,
                                         max_length=LABEL_MAX), AfterValidator(_printable)]


class UploadForm(BaseModel):
    """``POST /v1/galleries/{gallery}/images``: one or many images with their labels."""

    images: list[UploadFile] = Field(
        min_length=1, description="Image files (JPEG, PNG, BMP, WEBP, TIFF, GIF, PPM), repeated")
    person_id: list[Label] = Field(min_length=1, description="Person id of each image, in the "
                                                             "same order")
    camera_id: list[Label] = Field(min_length=1, description="Camera id of each image, in the "
                                                             "same order")
    metadata: list[str] | None = Field(
        None, description="Free metadata as JSON: one object for all images, one object per "
                          "image (repeated, in order), or one array of objects")
    image_id: list[Annotated[str, StringConstraints(pattern=IMAGE_ID_PATTERN)]] | None = Field(
        None, description="The client's own id of each image (repeated, in order): uploading "
                          "an id again with the same content (file, labels, metadata) is a "
                          "no-op answered 200 with the stored image, with other content a "
                          "409; retries never store twice. Default: ids given by the service")


class QueryForm(BaseModel):
    """``POST /v1/galleries/{gallery}/query``: a probe image and how to rank."""

    image: UploadFile = Field(description="The probe image")
    top_k: int = Field(10, ge=1, le=TOP_K_MAX, description="How many matches to return")
    camera_id: Label | None = Field(None, description="The probe's camera")
    exclude_same_camera: bool = Field(
        False, description="Leave out gallery images from the probe's camera (needs camera_id)")
    cameras: list[Label] | None = Field(None, description="Only gallery images from these "
                                                          "cameras (repeated)")
    exclude_cameras: list[Label] | None = Field(None, description="Leave out gallery images "
                                                                  "from these cameras")
    min_probability: float | None = Field(
        None, ge=0.0, le=1.0,
        description="Only matches whose probability of being the same person is at least this "
                    "(needs a calibrated model; fewer than top_k results may come back)")
    rerank: int | None = Field(
        None, ge=0, le=RERANK_MAX,
        description="Two-stage retrieval: rank the gallery by the per-image embeddings, then "
                    "re-score this many of the best with the DSMI pair head; 0 re-scores "
                    "every image (exhaustive). Default: the service's DSMI_RERANK")
