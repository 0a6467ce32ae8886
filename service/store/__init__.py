"""Gallery stores: Redis for real use, an in-process one for trying things out."""

from .base import (
    Change,
    Chunk,
    GalleryItem,
    GalleryStore,
    Generation,
    InvalidItem,
    NewItem,
    StoreError,
    StoreUnavailable,
    new_image_id,
)
from .memory_store import MemoryGalleryStore
from .redis_store import RedisGalleryStore

__all__ = ["Change", "Generation", "Chunk", "GalleryItem", "GalleryStore", "InvalidItem",
           "NewItem", "StoreError", "StoreUnavailable", "new_image_id", "MemoryGalleryStore",
           "RedisGalleryStore"]
