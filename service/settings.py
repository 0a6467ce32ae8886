"""Service configuration: environment variables ``DSMI_*``, optionally a config file.

Precedence, highest first: keyword arguments, environment variables, the file named by
``DSMI_CONFIG`` (YAML ``.yaml``/``.yml``, TOML ``.toml``, anything else is read as a ``.env``
file of ``DSMI_*`` lines), the defaults below. YAML and TOML files use the field names
(``redis_url: redis://...``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, PrivateAttr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    DotEnvSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
    YamlConfigSettingsSource,
)

from .auth import KeyRing, key_ring_from

__all__ = ["Settings", "DEFAULT_MODEL_DIR", "CONFIG_ENV"]

# The bundled trained model, used when DSMI_MODEL_DIR is not set.
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "default_model"
CONFIG_ENV = "DSMI_CONFIG"

MiB = 1024 * 1024
# From bench/rerank_bench.py (docs/results.md): on CUHK03 val, a shortlist of 10 already keeps
# single-shot R1 and mAP within 0.5 points of exhaustive scoring; 100 equals exhaustive on every
# figure there (all-gallery mAP included) and costs 8 ms for 10,000 items: the margin is for
# galleries far larger than val's 487 images.
RERANK_DEFAULT = 100


def _split_list(value: object) -> object:
    # "a,b , c" in an environment variable; a list as is from YAML/TOML or keyword arguments.
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    """Everything an operator can set. Each field is ``DSMI_<NAME>`` in the environment."""

    model_config = SettingsConfigDict(env_prefix="DSMI_", extra="ignore",
                                      protected_namespaces=())

    model_dir: Path | None = Field(
        None, description="Exported model folder (dsmi export); default: the bundled model "
                          "in service/default_model")
    redis_url: str | None = Field(
        None, description="Redis URL of the gallery cache; unset: an in-process store that "
                          "keeps nothing across restarts")
    redis_prefix: str = Field("dsmi:", min_length=1, pattern=r"^[^{}]+$",
                              description="Key prefix; keys are <prefix><model id>:... (no "
                                          "braces: Redis Cluster hash tags)")
    redis_socket_timeout: float = Field(
        1.0, gt=0, description="Seconds a Redis reply may take; past it the request is a 503 "
                               "(a hung Redis answers within about this time)")
    redis_connect_timeout: float = Field(0.5, gt=0, description="Seconds to connect to Redis")
    redis_cluster: bool = Field(
        False, description="DSMI_REDIS_URL names one node of a Redis Cluster: the store uses "
                           "the cluster client (topology discovery, redirections, failover)")
    redis_min_replicas: int | None = Field(
        None, ge=0, description="Replicas that must acknowledge each upload or deletion (Redis "
                                "WAIT) within redis_wait_timeout_ms, else 503 (the write "
                                "itself is whole; retry it). Default: 1 in cluster mode, 0 "
                                "otherwise")
    redis_wait_timeout_ms: int = Field(
        500, ge=1, description="How long a write waits for its replicas; at least 250 ms "
                               "below redis_socket_timeout")
    gallery_shards: int | None = Field(
        None, ge=1, le=64, description="Shards of a gallery created without a setting (each "
                                       "on its own Redis slot, so spread over a cluster's "
                                       "masters). Default: 3 in cluster mode, 1 otherwise "
                                       "(bench/cluster_bench.py)")
    retention_days: float | None = Field(
        None, gt=0, description="Days a gallery created without a setting keeps its images "
                                "(unset: until deleted)")
    retention_sweep_seconds: float = Field(
        60.0, gt=0, description="How often expired images are purged from the store (they "
                                "leave queries, listings and thumbnails at once regardless)")
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Comma-separated API keys: KEY (admin) or "
                                          "KEY:RIGHTS:GALLERIES (service/auth.py); when any "
                                          "key is set, every /v1 route and /metrics needs one "
                                          "(X-API-Key or Bearer)")
    api_keys_file: Path | None = Field(None, description="YAML file of scoped API keys "
                                                         "(service/auth.py), beside or "
                                                         "instead of api_keys")
    max_upload_bytes: int = Field(64 * MiB, gt=0, description="Most bytes in one request body")
    max_image_bytes: int = Field(10 * MiB, gt=0, description="Most bytes in one image file")
    max_images_per_upload: int = Field(256, gt=0)
    max_pixels: int = Field(16_000_000, gt=0,
                            description="Most pixels in one image (decompression bombs)")
    max_decode_bytes: int = Field(
        128 * MiB, gt=0, description="Most memory decoding one image may take (estimated from "
                                     "its header: pixels x bytes per pixel of its mode, and "
                                     "the RGB copy); more is a 413")
    max_decode_bytes_in_flight: int = Field(
        512 * MiB, gt=0, description="Most memory all images being decoded at once may take in "
                                     "a worker; past it an upload or query is answered 503")
    max_metadata_bytes: int = Field(16 * 1024, gt=0, description="Most bytes of metadata JSON "
                                                                 "per image")
    score_batch: int = Field(256, gt=0, description="Gallery items fetched and scored at once")
    head_threads: int | None = Field(
        None, gt=0,
        description="On the CPU, chunks of gallery items the pair head scores side by side, "
                    "one thread each (default: the CPUs the worker may use; with several "
                    "workers on one machine, CPUs / workers)")
    max_inflight_queries: int = Field(
        default_factory=lambda: max(2, os.cpu_count() or 2), gt=0,
        description="Queries in flight at once per worker (default: the CPU count, at least "
                    "2: a query already uses every core); more are answered 503 with "
                    "Retry-After at once instead of queueing")
    max_inflight_uploads: int = Field(4, gt=0, description="Uploads in flight at once per "
                                                           "worker; more are answered 503")
    cache_dtype: Literal["float32", "float16"] = "float16"
    cache_max_bytes: int = Field(
        2 * 1024 * MiB, ge=0,
        description="Bytes of galleries each worker keeps resident (decoded, coherent with "
                    "Redis); the least recently queried are evicted past it, and a gallery "
                    "larger than it is streamed from the store per query. 0: none resident")
    rerank: int = Field(
        RERANK_DEFAULT, ge=0,
        description="Two-stage retrieval: items re-scored by the pair head after the "
                    "embedding shortlist (a query's rerank overrides it); 0: exhaustive")
    providers: Annotated[list[str] | None, NoDecode] = Field(
        None, description="ONNX Runtime execution providers, comma-separated; default: the "
                          "engine's choice (CUDA when available, else CPU)")
    keep_alive_seconds: float = Field(
        75.0, gt=0, description="How long an idle HTTP connection stays open. Above the "
                                "clients' own idle expiry (httpx: 5 s), so that a client never "
                                "reuses a connection the server is closing at that moment")
    header_timeout_seconds: float = Field(
        10.0, gt=0, description="A request's headers must be complete this long after its "
                                "connection opened (or its first byte came); else the "
                                "connection is closed (dsmi serve)")
    body_grace_seconds: float = Field(
        10.0, gt=0, description="How long a request body may take before body_min_rate "
                                "applies")
    body_min_rate: float = Field(
        8192.0, gt=0, description="After body_grace_seconds, the least average rate of a "
                                  "request body, bytes per second; slower is a 408")
    warmup: bool = True
    log_level: str = "info"

    @field_validator("api_keys", "providers", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        return _split_list(value)

    @field_validator("providers")
    @classmethod
    def _empty_providers_is_default(cls, value: list[str] | None) -> list[str] | None:
        return value or None

    _key_ring: KeyRing = PrivateAttr(default_factory=lambda: KeyRing(()))

    @model_validator(mode="after")
    def _keys_parse(self) -> Settings:
        # Parsed once, here: a malformed key or keys file fails when the settings load.
        self._key_ring = key_ring_from(self.api_keys, self.api_keys_file)
        return self

    def key_ring(self) -> KeyRing:
        """The configured API keys, parsed (:mod:`service.auth`)."""
        return self._key_ring

    @property
    def resolved_gallery_shards(self) -> int:
        if self.gallery_shards is not None:
            return self.gallery_shards
        return 3 if self.redis_cluster else 1

    @model_validator(mode="after")
    def _cluster_needs_redis(self) -> Settings:
        if self.redis_cluster and not self.redis_url:
            raise ValueError("DSMI_REDIS_CLUSTER needs DSMI_REDIS_URL (one node of the cluster)")
        if self.redis_wait_timeout_ms + 250 > self.redis_socket_timeout * 1000:
            raise ValueError(f"DSMI_REDIS_WAIT_TIMEOUT_MS ({self.redis_wait_timeout_ms}) must be "
                             "at least 250 ms below DSMI_REDIS_SOCKET_TIMEOUT "
                             f"({self.redis_socket_timeout} s)")
        return self

    @property
    def resolved_model_dir(self) -> Path:
        return Path(self.model_dir) if self.model_dir is not None else DEFAULT_MODEL_DIR

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings],
                                   init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource,
                                   dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource,
                                   ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config = os.environ.get(CONFIG_ENV)
        if config:
            sources.append(_file_source(settings_cls, Path(config)))
        return tuple(sources)


def _file_source(settings_cls: type[BaseSettings], path: Path) -> PydanticBaseSettingsSource:
    if not path.is_file():
        raise FileNotFoundError(f"{CONFIG_ENV}={path}: no such config file")
    suffix = path.suffix.lower()
    if suffix in (".yaml", ".yml"):
        return YamlConfigSettingsSource(settings_cls, yaml_file=path)
    if suffix == ".toml":
        return TomlConfigSettingsSource(settings_cls, toml_file=path)
    return DotEnvSettingsSource(settings_cls, env_file=path)
