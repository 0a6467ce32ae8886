"""One evaluator for validation in training and for ``dsmi evaluate``: batches of images go in
(:meth:`Evaluator.add`), query x gallery distances and ranking figures come out
(:meth:`Evaluator.distances`, :meth:`Evaluator.result`); :meth:`Evaluator.reset` starts over.

Queries are stream A, gallery images stream B (they differ only for variants whose streams do
not share a trunk). The network runs in eval mode while the evaluator uses it, and is put
back in the mode it was in afterwards, so validation in the middle of an epoch leaves training
as it was.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from torch.utils.data import DataLoader

from model.network import MatchingNetwork

from .data.dataset import ReIDImages
from .data.records import ImageRecord
from .metrics import evaluate_ranking

__all__ = ["Evaluator", "eval_mode", "distance_matrix"]


@contextmanager
def eval_mode(net: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``net`` in eval mode, no gradients; its previous mode is restored on exit."""
    modes = {m: m.training for m in net.modules()}
    net.eval()
    try:
        with torch.no_grad():
            yield net
    finally:
        for module, training in modes.items():
            module.training = training


class Evaluator:
    """Collects the conv5 maps of query and gallery images, then ranks.

    ``embedding_only`` ranks by the per-image embeddings' cosine (F~ = 0), without the pair
    head; ``pair_batch`` bounds the pairs the head scores at once.
    """

    def __init__(self, net: MatchingNetwork, device: str | torch.device = "cpu",
                 embedding_only: bool = False, pair_batch: int = 4096) -> None:
        self.net, self.device = net, torch.device(device)
        self.embedding_only, self.pair_batch = embedding_only, pair_batch
        self.reset()

    def reset(self) -> None:
        self._maps: dict[bool, list[torch.Tensor]] = {True: [], False: []}
        self._pids: dict[bool, list[int]] = {True: [], False: []}
        self._cams: dict[bool, list[int]] = {True: [], False: []}

    def add(self, images: torch.Tensor, pids: Sequence[int], camids: Sequence[int],
            query: bool) -> None:
        """A batch of normalised images ``(B, 3, H, W)`` with their labels, all queries or
        all gallery images."""
        with eval_mode(self.net):
            maps = self.net.encode(images.to(self.device), "a" if query else "b")
        self._maps[query].append(maps)
        self._pids[query] += [int(p) for p in pids]
        self._cams[query] += [int(c) for c in camids]

    def labels(self, query: bool) -> tuple[np.ndarray, np.ndarray]:
        return np.asarray(self._pids[query]), np.asarray(self._cams[query])

    def distances(self) -> np.ndarray:
        """``(Q, G)`` distances, 1 - similarity (lower is a better match)."""
        if not self._maps[True] or not self._maps[False]:
            raise ValueError("the evaluator needs query and gallery images")
        net = self.net
        with eval_mode(net):
            q_feats = net.prepare_probe(torch.cat(self._maps[True]))
            g_feats = net.prepare_gallery(torch.cat(self._maps[False]))
            if self.embedding_only:
                q, g = (torch.nn.functional.normalize(f.embedding.float(), dim=1)
                        for f in (q_feats, g_feats))
                return (1.0 - q @ g.T).cpu().numpy().astype(np.float32)
            dist = np.empty((len(q_feats[0]), len(g_feats[0])), dtype=np.float32)
            for k in range(len(dist)):
                probe = type(q_feats)(*(t[k:k + 1] for t in q_feats))
                dist[k] = (1 - net.score(probe, g_feats, batch_size=self.pair_batch)
                           ).cpu().numpy()
        return dist

    def result(self, max_rank: int = 20) -> dict:
        """All-gallery CMC and mAP of what was added (torchreid's rules, see
        :func:`training.metrics.evaluate_ranking`): rank1, rank5, mAP and the curve."""
        (qp, qc), (gp, gc) = self.labels(True), self.labels(False)
        cmc, mean_ap = evaluate_ranking(self.distances(), qp, gp, qc, gc, max_rank=max_rank)
        return {"rank1": float(cmc[0]), "rank5": float(cmc[min(4, len(cmc) - 1)]),
                "mAP": float(mean_ap), "cmc": [float(v) for v in cmc]}

    def add_records(self, records: Sequence[ImageRecord], query: bool, batch_size: int = 64,
                    num_workers: int = 0, progress: bool = False) -> None:
        """Read, preprocess and :meth:`add` image records in batches."""
        loader = DataLoader(ReIDImages(records, self.net.input_size), batch_size=batch_size,
                            num_workers=num_workers)
        if progress:
            from tqdm import tqdm
            loader = tqdm(loader, desc=f"encode ({'queries' if query else 'gallery'})",
                          unit="batch", leave=False)
        for images, pids, camids, _ in loader:
            self.add(images, pids.tolist(), camids.tolist(), query)


def distance_matrix(net: MatchingNetwork, queries: Sequence[ImageRecord],
                    gallery: Sequence[ImageRecord], batch_size: int = 64,
                    pair_batch: int = 4096, device: str | torch.device = "cpu",
                    num_workers: int = 0, progress: bool = False,
                    embedding_only: bool = False) -> np.ndarray:
    """``(Q, G)`` distances of query and gallery records through one :class:`Evaluator`."""
    evaluator = Evaluator(net, device, embedding_only=embedding_only, pair_batch=pair_batch)
    evaluator.add_records(queries, True, batch_size, num_workers, progress)
    evaluator.add_records(gallery, False, batch_size, num_workers, progress)
    return evaluator.distances()
