"""Batched inference with a trained network: conv5 features and query x gallery distances."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from model.network import MatchingNetwork

from .data.dataset import ReIDImages
from .data.records import ImageRecord

__all__ = ["encode_records", "distance_matrix"]


@torch.no_grad()
def encode_records(net: MatchingNetwork, records: Sequence[ImageRecord], stream: str = "a",
                   batch_size: int = 64, device: str | torch.device = "cpu",
                   num_workers: int = 0, progress: bool = False) -> torch.Tensor:
    """Records -> conv5 maps ``(N, C, K1, K2)`` on ``device``, in record order."""
    net.eval()
    loader = DataLoader(ReIDImages(records, net.input_size), batch_size=batch_size,
                        num_workers=num_workers)
    if progress:
        from tqdm import tqdm
        loader = tqdm(loader, desc=f"encode ({stream})", unit="batch", leave=False)
    maps = [net.encode(images.to(device), stream) for images, *_ in loader]
    return torch.cat(maps)


@torch.no_grad()
def distance_matrix(net: MatchingNetwork, queries: Sequence[ImageRecord],
                    gallery: Sequence[ImageRecord], batch_size: int = 64,
                    pair_batch: int = 4096, device: str | torch.device = "cpu",
                    num_workers: int = 0, progress: bool = False,
                    embedding_only: bool = False) -> np.ndarray:
    """``(Q, G)`` distances (1 - similarity; lower is a better match). Queries are stream A.

    ``embedding_only`` drops the per-pair head (F~ = 0): the cosine of the per-image
    embeddings FC(g_A), FC(g_B), which is what the gate and the IRNNs are measured against.
    """
    net.eval()
    q_feats = net.prepare_probe(encode_records(net, queries, "a", batch_size, device,
                                               num_workers, progress))
    g_feats = net.prepare_gallery(encode_records(net, gallery, "b", batch_size, device,
                                                 num_workers, progress))
    if embedding_only:
        from .baselines import cosine_distance

        q_emb, g_emb = (torch.nn.functional.normalize(f.embedding.float(), dim=1).cpu().numpy()
                        for f in (q_feats, g_feats))
        return cosine_distance(q_emb, g_emb)
    rows = range(len(queries))
    if progress:
        from tqdm import tqdm
        rows = tqdm(rows, desc="score", unit="query", leave=False)
    dist = np.empty((len(queries), len(gallery)), dtype=np.float32)
    for q in rows:
        probe = type(q_feats)(*(t[q:q + 1] for t in q_feats))
        dist[q] = (1 - net.score(probe, g_feats, batch_size=pair_batch)).cpu().numpy()
    return dist
