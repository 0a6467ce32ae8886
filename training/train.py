"""Training: the paper's protocol (all pairs of 128-image batches, binomial deviance, early
stopping on validation), a JSON-lines log, a checkpoint every epoch, resume, and ``dsmi train``.

Run folder (``--out``): ``config.yaml`` (resolved), ``log.jsonl`` (one line per epoch),
``last.pt`` (every epoch, and on Ctrl-C), ``best.pt`` (best validation mAP), and
``eval/`` (the test report of ``best.pt``) when training ends.
"""

from __future__ import annotations

import hashlib
import json
import math
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from torch.utils.data import DataLoader

from model import FCCNN, batch_hard_triplet, binomial_deviance, build_model
from model.checkpoint import read_checkpoint, save_checkpoint
from model.network import MatchingNetwork

from .config import Config, validate_config
from .data.dataset import ReIDImages
from .data.records import relabel
from .data.sampling import IdentityBatchSampler, RandomBatchSampler
from .data.transforms import FlipShift, RandomErasing
from .evaluator import Evaluator
from .protocols import DataSplits, prepare_data

__all__ = ["Trainer", "TrainState"]


@dataclass
class TrainState:
    epoch: int = 0                 # epochs completed
    phase: str = "pretrain"        # "pretrain" (FC-CNN softmax) then "main"
    step: int = 0
    best_map: float = -1.0
    best_epoch: int = -1
    stale: int = 0                 # epochs since the best validation mAP
    elapsed_s: float = 0.0         # training wall time, carried across resumes
    history: list[dict] = field(default_factory=list)
    stopped: str = ""              # why training ended: "epochs", "early_stop", "budget"
    phase_started_s: float = 0.0   # elapsed_s when the current phase began
    phase_start_epoch: int = 0     # epochs completed when the current phase began


class Trainer:
    """Trains one config into one run folder. ``fit()`` returns the final summary dict."""

    def __init__(self, cfg: Config, out_dir: str | Path, resume: bool = False,
                 progress: bool = True) -> None:
        self.cfg, self.out = cfg, Path(out_dir)
        self.progress = progress
        validate_config(cfg)
        t = cfg.train
        if t.threads:
            torch.set_num_threads(t.threads)
        torch.manual_seed(t.seed)
        self.device = torch.device(t.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("--device cuda was asked for but no CUDA device is available")
        self.data: DataSplits = prepare_data(cfg.data)
        self.train_records, self.pid_map = relabel(self.data.train)
        overrides = dict(cfg.model.overrides)
        if cfg.model.variant.startswith("fc-cnn"):
            overrides.setdefault("num_classes", len(self.pid_map))
        self.net: MatchingNetwork = build_model(cfg.model.variant, **overrides).to(self.device)
        self.softmax_only = isinstance(self.net, FCCNN)
        # A BNNeck network trains in the field's two phases: the trunk and embedding as a re-id
        # embedding (identity softmax + batch-hard triplet), then the pair head alone on the
        # fixed trunk's cached maps (binomial deviance).
        self.bnneck = bool(getattr(self.net, "bnneck", False))
        self._maps: torch.Tensor | None = None  # phase 2 of a BNNeck net: (views, N, C, H, W)
        if t.channels_last:
            self.net.to(memory_format=torch.channels_last)
        self.init_report = self._init_from(t.init_from) if t.init_from else None
        if self.bnneck and not any(k.startswith("pooling.") for k in
                                   (self.init_report or {}).get("loaded_keys", ())):
            self._zero_head_output()  # a new head starts by ranking as the embedding does
        self.state = TrainState(phase="main" if t.pretrain_epochs == 0 or self.softmax_only
                                else "pretrain")
        self._build_phase()
        if resume:
            self._resume()

    # -- setup -------------------------------------------------------------------------

    @torch.no_grad()
    def _init_from(self, path: str | Path) -> dict:
        """Start from another run's weights, as the paper starts from ImageNet's: every tensor
        of the checkpoint whose name and shape match this network's is copied (an identity
        classifier of another dataset has another shape and stays random)."""
        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"train.init_from: no checkpoint at {path}")
        payload = read_checkpoint(path)
        own = self.net.state_dict()
        # "embedding": the trunk and the embedding only, so that heads compared on one
        # phase-1 model all start from nothing.
        parts = ("trunks.", "fc.") if self.cfg.train.init_from_parts == "embedding" else ("",)
        picked = {k: v for k, v in payload["state_dict"].items()
                  if k in own and own[k].shape == v.shape and k.startswith(parts)}
        if not picked:
            raise ValueError(f"train.init_from: no tensor of {path} ({payload.get('variant')}) "
                             f"fits a {self.cfg.model.variant} network")
        self.net.load_state_dict(picked, strict=False)
        return {"checkpoint": str(path), "variant": payload.get("variant"),
                "loaded": len(picked), "loaded_keys": sorted(picked),
                "kept_random": sorted(set(own) - set(picked))}

    def _phase_model(self) -> torch.nn.Module:
        """What the current phase optimises: the FC-CNN around the trunk(s) (with a BNNeck:
        the trunk, the embedding and an identity classifier), or the network."""
        if self.state.phase == "pretrain":
            if not hasattr(self, "_pretrain_heads"):
                n = len(self.pid_map)
                if self.bnneck:
                    # One identity classifier per region of the embedding (the whole map, then
                    # each stripe): a stripe that must name people by itself learns its part.
                    classifiers = [torch.nn.Linear(self.net.fc.channels, n, bias=False)
                                   for _ in range(self.net.fc.regions)]
                    for classifier in classifiers:
                        torch.nn.init.normal_(classifier.weight, std=0.001)
                    self._pretrain_heads = torch.nn.ModuleList(classifiers).to(self.device)
                else:
                    self._pretrain_heads = torch.nn.ModuleList(
                        FCCNN(trunk, self.net.map_size, self.net.fc.out_features, n)
                        for trunk in self.net.trunks).to(self.device)
            if self.bnneck:
                return torch.nn.ModuleList([self.net.trunks, self.net.fc, self._pretrain_heads])
            return self._pretrain_heads
        return self.net

    @torch.no_grad()
    def _zero_head_output(self) -> None:
        """F~ = 0: the network scores by its per-image embeddings alone until the head learns
        (the pooling's last projection at zero)."""
        out = self.net.pooling.out_proj
        if out is not None:
            out.weight.zero_()
            out.bias.zero_()

    @torch.no_grad()
    def _start_from_pretrained(self) -> None:
        """Phase 2 starts where phase 1 ended: the network's FC takes the FC-CNN's FC (same
        shape: the flattened conv5 map to ``fc_dim``) and the pooling's last projection is
        zeroed, so F~ = 0 and x = FC(g - F~) is the FC-CNN embedding: the first similarity
        is FC-CNN's cosine, and binomial deviance refines it from there. The paper copies only
        the convolutions; starting the head at zero keeps phase 1's matching quality instead
        of a random head's."""
        if self.bnneck:
            # The best phase-1 epoch (held-out mAP), not the last, carries on into phase 2.
            best = self.out / "best.pt"
            if best.is_file():
                self.net.load_state_dict(read_checkpoint(best, map_location=self.device)
                                         ["state_dict"])
        else:
            self.net.fc.load_state_dict(self._pretrain_heads[0].fc.state_dict())
        self._zero_head_output()

    def _fix_embedding(self) -> None:
        """Phase 2 of a BNNeck net: the trunk and embedding stay as phase 1 left them."""
        for module in (self.net.trunks, self.net.fc):
            module.eval()
            for p in module.parameters():
                p.requires_grad_(False)

    def _map_cache_file(self, dataset: ReIDImages) -> Path | None:
        """Where the maps of this trunk on these images are kept on disk (``train.map_cache``),
        named by a hash of the trunk's weights, the image paths and the input size: runs that
        train heads on one phase-1 model share one file."""
        folder = self.cfg.train.map_cache
        if not folder:
            return None
        digest = hashlib.sha256()
        for name, tensor in sorted(self.net.trunks.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        digest.update(repr([str(r.path) for r in dataset.records]).encode())
        digest.update(repr(tuple(self.net.input_size)).encode())
        return Path(folder).expanduser() / f"maps-{digest.hexdigest()[:20]}.pt"

    @torch.no_grad()
    def _cache_maps(self, dataset: ReIDImages) -> torch.Tensor:
        """conv5 maps of every training image and its mirror image, float16, computed once:
        with the trunk fixed, phase 2 needs no trunk pass per step."""
        path = self._map_cache_file(dataset)
        if path is not None and path.is_file():
            return torch.load(path, weights_only=True)
        maps = self._compute_maps(dataset)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(path.name + ".partial")
            torch.save(maps, partial)
            partial.replace(path)  # never a half-written cache under the real name
        return maps

    def _compute_maps(self, dataset: ReIDImages) -> torch.Tensor:
        self.net.eval()
        views = []
        for flip in (False, True):
            indices = range(0, len(dataset), 64)
            if self.progress:
                from tqdm import tqdm
                indices = tqdm(indices, desc=f"cache maps{' (mirrored)' if flip else ''}",
                               unit="batch", leave=False)
            chunks = []
            for start in indices:
                images = torch.stack([dataset[i][0] for i in
                                      range(start, min(start + 64, len(dataset)))])
                images = images.flip(-1) if flip else images
                chunks.append(self.net.encode(self._to_device(images)).to(torch.float16).cpu())
            views.append(torch.cat(chunks))
        return torch.stack(views)

    def _to_device(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True)
        if self.cfg.train.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images

    def _param_groups(self) -> list[dict]:
        """Four groups: trunk or not (``train.trunk_lr_mult`` scales the trunk's learning
        rate: a pretrained trunk needs smaller steps than the new FC, gate and IRNNs) x decayed
        or not (weight decay on weight matrices and kernels only: biases and norm scales are
        offsets, and decaying them only pulls a layer away from its fit)."""
        trunk = {id(p) for p in self.net.trunks.parameters()}
        groups: dict[tuple[bool, bool], list] = {}
        for p in self._phase_model().parameters():
            if p.requires_grad:
                groups.setdefault((id(p) in trunk, p.dim() >= 2), []).append(p)
        mult = self.cfg.train.trunk_lr_mult
        return [{"params": params, "lr_mult": mult if in_trunk else 1.0,
                 **({} if decayed else {"weight_decay": 0.0})}
                for (in_trunk, decayed), params in sorted(groups.items())]

    def _build_phase(self) -> None:
        t = self.cfg.train
        if self.bnneck and self.state.phase == "main":
            self._fix_embedding()
        params = self._param_groups()
        if t.optimizer == "adam":
            self.optimizer = torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay)
        elif t.optimizer == "adamw":
            # Decoupled decay: Adam's L2 term is rescaled per parameter, so a weight whose loss
            # gradient is ~0 (the gate and IRNNs behind the zeroed projection when phase 2
            # starts) is driven to zero at a rate of lr per step, and the head never wakes up.
            self.optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
        elif t.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(params, lr=t.lr, momentum=t.momentum,
                                             weight_decay=t.weight_decay, nesterov=True)
        self.base_lr = t.pretrain_lr if self.state.phase == "pretrain" and t.pretrain_lr \
            else t.lr
        # Augmentation runs on whole batches on the training device (FlipShift), so the
        # loader's workers only decode, and a GPU is not left waiting on per-image CPU work.
        self.augment = FlipShift(t.flip, t.shift)
        self.erase = RandomErasing(t.erasing if self.state.phase == "pretrain" else 0.0)
        if hasattr(self, "loader"):
            dataset = self.loader.dataset  # keep the image cache across phases
        else:
            dataset = ReIDImages(self.train_records, self.net.input_size,
                                 cache=self.cfg.data.cache_images)
            if self.cfg.data.cache_images and self.cfg.data.num_workers > 0:
                # Decoded once here: forked workers then share the cache instead of each
                # filling its own copy.
                dataset.preload(progress=self.progress)
        pids = [r.pid for r in self.train_records]
        if self.bnneck and self.state.phase == "main":
            if self._maps is None:
                self._maps = self._cache_maps(dataset)
        # P x K exists to give the pair loss positives; an identity softmax (phase 1, FC-CNN)
        # learns from every image, so it keeps the paper's random batches (the triplet of a
        # BNNeck phase 1 needs positives too).
        pk_pretrain = self.bnneck and self.state.phase == "pretrain"
        batch_size = t.pretrain_batch_size if self.state.phase == "pretrain" and \
            t.pretrain_batch_size else t.batch_size
        if t.sampler == "random" or (self.state.phase == "pretrain" and not pk_pretrain) \
                or self.softmax_only:
            sampler = RandomBatchSampler(len(dataset), batch_size, t.seed)
        else:
            sampler = IdentityBatchSampler(pids, batch_size, t.instances_per_id, t.seed)
        workers = self.cfg.data.num_workers
        self.loader = DataLoader(dataset, batch_sampler=sampler, num_workers=workers,
                                 pin_memory=self.device.type == "cuda",
                                 persistent_workers=workers > 0)

    def _resume(self) -> None:
        path = self.out / "last.pt"
        if not path.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint at {path}")
        payload = read_checkpoint(path, map_location=self.device)
        self.net.load_state_dict(payload["state_dict"])
        self.state = TrainState(**payload["train_state"])
        # A finished run resumed (e.g. with more epochs) trains on; each epoch end re-decides.
        self.state.stopped = ""
        if self.state.phase == "pretrain" and "pretrain_heads" in payload:
            self._phase_model().load_state_dict(payload["pretrain_heads"])
        self._build_phase()
        self.optimizer.load_state_dict(payload["optimizer"])
        torch.set_rng_state(payload["rng"])

    # -- one step ----------------------------------------------------------------------

    def _loss(self, images: torch.Tensor | None, pids: torch.Tensor,
              indices: torch.Tensor | None = None) -> torch.Tensor:
        t = self.cfg.train
        # bf16 autocast runs convolutions and matrix products in bfloat16 (weights and the loss
        # stay float32): faster for dense convolutions on CPUs with AVX512-BF16, not for the
        # depthwise ones of EfficientNet (docs/results.md has the measurements).
        with torch.autocast(self.device.type, dtype=torch.bfloat16,
                            enabled=t.precision == "bf16"):
            if self.state.phase == "pretrain" and self.bnneck:
                pooled = self.net.fc.pooled(self.net.encode(images)).float()
                normed = self.net.fc.bn(pooled).view(len(pids), self.net.fc.regions, -1)
                identity = sum(F.cross_entropy(head(normed[:, r]), pids,
                                               label_smoothing=t.label_smoothing)
                               for r, head in enumerate(self._pretrain_heads))
                return (identity / len(self._pretrain_heads)
                        + batch_hard_triplet(pooled, pids, t.triplet_margin))
            if self._maps is not None:
                # A random view (mirrored or not) of each image's cached map.
                views = torch.randint(self._maps.shape[0], (len(indices),))
                maps = self._maps[views, indices].to(self.device).float()
                sim = self.net.similarity_matrix_of_maps(maps, maps).float()
            elif self.state.phase == "pretrain":
                return sum(F.cross_entropy(head.logits(images).float(), pids)
                           for head in self._pretrain_heads)
            elif self.softmax_only:
                return F.cross_entropy(self.net.logits(images).float(), pids)
            else:
                sim = self.net.similarity_matrix(images).float()
        n = len(pids)
        same = pids[:, None] == pids[None, :]
        off_diagonal = ~torch.eye(n, dtype=torch.bool, device=self.device)
        return binomial_deviance(sim, same, t.alpha, t.beta, valid=off_diagonal)

    # -- validation --------------------------------------------------------------------

    def validate(self) -> dict:
        """Held-out figures (all-gallery) of the network as it is now, through the same
        :class:`~training.evaluator.Evaluator` as ``dsmi evaluate``."""
        # Phase 1 of a BNNeck net trains the embedding alone: it is what is measured.
        evaluator = Evaluator(self.net, self.device,
                              embedding_only=self.bnneck and self.state.phase == "pretrain")
        evaluator.add_records(self.data.val_queries, query=True)
        evaluator.add_records(self.data.val_gallery, query=False)
        figures = evaluator.result()
        return {"val_rank1": figures["rank1"], "val_rank5": figures["rank5"],
                "val_map": figures["mAP"]}

    # -- the loop ----------------------------------------------------------------------

    def _checkpoint(self, name: str, **extra) -> Path:
        payload = dict(train_state=vars(self.state).copy(), optimizer=self.optimizer.state_dict(),
                       rng=torch.get_rng_state(),
                       config=self.cfg.to_dict(), pid_map=self.pid_map, **extra)
        if self.state.phase == "pretrain":
            payload["pretrain_heads"] = self._pretrain_heads.state_dict()
        return save_checkpoint(self.out / name, self.net, **payload)

    def _log(self, record: dict) -> None:
        with (self.out / "log.jsonl").open("a") as fh:
            fh.write(json.dumps(record) + "\n")

    def _progress(self, started: float) -> float:
        """How far this phase is, in [0, 1]: by steps or by the time budget, whichever is
        further, so that a budget-limited run still ends its schedule at the small LR."""
        t = self.cfg.train
        epochs = t.pretrain_epochs if self.state.phase == "pretrain" else t.epochs
        by_steps = self._phase_steps_done() / max(epochs * len(self.loader.batch_sampler), 1)
        by_time = 0.0
        now = self.state.elapsed_s + time.time() - started
        began = self.state.phase_started_s
        if t.max_minutes:
            # The share of the budget this phase had left when it began.
            by_time = (now - began) / max(t.max_minutes * 60 - began, 1e-9)
        if self.state.phase == "pretrain" and t.pretrain_minutes:
            by_time = max(by_time, (now - self.state.phase_started_s) / (t.pretrain_minutes * 60))
        return min(max(by_steps, by_time), 1.0)

    def _phase_steps_done(self) -> int:
        return ((self.state.epoch - self.state.phase_start_epoch)
                * len(self.loader.batch_sampler) + self._batch_in_epoch)

    def _set_lr(self, started: float) -> None:
        lr = self.base_lr
        if self.cfg.train.schedule == "cosine":
            floor = 0.01 * lr
            lr = floor + (lr - floor) * 0.5 * (1 + math.cos(math.pi * self._progress(started)))
        warmup = self.cfg.train.warmup_epochs * len(self.loader.batch_sampler)
        if warmup and self._phase_steps_done() < warmup:
            lr *= (self._phase_steps_done() + 1) / warmup
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)

    def _pretrain_over_budget(self, started: float) -> bool:
        budget = self.cfg.train.pretrain_minutes
        spent = self.state.elapsed_s + time.time() - started - self.state.phase_started_s
        return self.state.phase == "pretrain" and budget is not None and spent > budget * 60

    def _over_budget(self, started: float) -> bool:
        budget = self.cfg.train.max_minutes
        return budget is not None and self.state.elapsed_s + time.time() - started > budget * 60

    def fit(self) -> dict:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "config.yaml").write_text(yaml.safe_dump(self.cfg.to_dict(), sort_keys=False))
        previous_handler = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
        try:
            while not self.state.stopped:
                self._run_epoch()
        except KeyboardInterrupt:
            path = self._checkpoint("last.pt", interrupted=True)
            print(f"\ninterrupted: checkpoint saved to {path} (resume with --resume)")
            raise
        finally:
            signal.signal(signal.SIGTERM, previous_handler)
        summary = {"stopped": self.state.stopped, "epochs": self.state.epoch,
                   "best_epoch": self.state.best_epoch, "best_val_map": self.state.best_map,
                   "train_minutes": round(self.state.elapsed_s / 60, 2),
                   "out": str(self.out)}
        if self.init_report:
            summary["init_from"] = {**self.init_report,
                                    "kept_random": len(self.init_report["kept_random"]),
                                    "loaded_keys": len(self.init_report["loaded_keys"])}
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary

    # -- one epoch: batches, then the end-of-epoch hooks ---------------------------------

    def batches(self) -> Iterator[tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]]:
        """This epoch's batches for the current phase: ``(images or None, pids, indices)``;
        phase 2 of a BNNeck net reads no image (its maps are cached)."""
        sampler = self.loader.batch_sampler
        sampler.set_epoch(self.state.epoch)
        if self._maps is not None:
            pids = torch.tensor([r.pid for r in self.train_records])
            for idx in sampler:
                yield None, pids[idx], torch.tensor(idx)
        else:
            for images, pids, _cams, idx in self.loader:
                yield images, pids, idx

    def step(self, images: torch.Tensor | None, pids: torch.Tensor,
             indices: torch.Tensor) -> float:
        """One optimisation step on one batch of :meth:`batches` -> its loss."""
        if images is not None:
            images = self.erase(self.augment(self._to_device(images)))
        pids = pids.to(self.device, non_blocking=True)
        loss = self._loss(images, pids, indices)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss became {loss.item()} at step {self.state.step}")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.state.step += 1
        return loss.item()

    def train_mode(self) -> None:
        """What trains in this phase in train mode; a fixed trunk and embedding stay in eval."""
        self._phase_model().train()
        if self.bnneck and self.state.phase == "main":
            self._fix_embedding()

    def _run_epoch(self) -> None:
        started = time.time()
        losses, cut = self._run_batches(started)
        self.state.epoch += 1
        record = {"epoch": self.state.epoch, "phase": self.state.phase,
                  "loss": sum(losses) / max(len(losses), 1), "batches": len(losses),
                  "lr": self.optimizer.param_groups[0]["lr"]}
        improved = self._validation_hook(record, force=cut == "phase")
        self.state.elapsed_s += time.time() - started
        record["elapsed_min"] = round(self.state.elapsed_s / 60, 2)
        self.state.history.append(record)
        self._log(record)
        if self.progress:
            shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in record.items()}
            print(json.dumps(shown), flush=True)
        self._end_of_epoch_hook(cut, improved)

    def _run_batches(self, started: float) -> tuple[list[float], str]:
        """The epoch's steps -> (losses, why it ended early: "", "budget" or "phase")."""
        self.train_mode()
        batches = self.batches()
        if self.progress:
            from tqdm import tqdm
            batches = tqdm(batches, total=len(self.loader.batch_sampler), unit="batch",
                           dynamic_ncols=True,
                           desc=f"{self.state.phase} epoch {self.state.epoch + 1}")
        losses: list[float] = []
        self._batch_in_epoch = 0
        for images, pids, indices in batches:
            self._set_lr(started)
            step_started = time.time()
            losses.append(self.step(images, pids, indices))
            self._batch_in_epoch += 1
            if self.progress:
                rate = len(pids) / max(time.time() - step_started, 1e-9)
                batches.set_postfix(loss=f"{losses[-1]:.4f}", img_s=f"{rate:.1f}")
            if self._over_budget(started):
                return losses, "budget"
            if self._pretrain_over_budget(started):
                return losses, "phase"
        return losses, ""

    def _validation_hook(self, record: dict, force: bool = False) -> bool:
        """Validate every ``eval_every`` epochs (and when a phase is cut short) -> whether
        the held-out mAP improved. FC-CNN-style phase 1 is not validated (no embedding yet
        of the network's own)."""
        validates = self.state.phase == "main" or self.bnneck
        if not validates or not (self.state.epoch % self.cfg.train.eval_every == 0 or force):
            return False
        record.update(self.validate())
        if record["val_map"] > self.state.best_map:
            self.state.best_map, self.state.best_epoch = record["val_map"], self.state.epoch
            self.state.stale = 0
            return True
        self.state.stale += 1
        return False

    def _end_of_epoch_hook(self, cut: str, improved: bool) -> None:
        """Checkpoints, the stopping rules and the phase switch."""
        t = self.cfg.train
        phase_epochs = t.pretrain_epochs if self.state.phase == "pretrain" else t.epochs
        phase_done = self.state.epoch - self.state.phase_start_epoch >= phase_epochs
        if improved:  # before a phase switch, which starts phase 2 from best.pt
            self._checkpoint("best.pt")
        stale = self.state.stale >= t.patience
        if cut == "budget":
            self.state.stopped = "budget"
        elif self.state.phase == "main" and stale:
            self.state.stopped = "early_stop"
        elif self.state.phase == "pretrain" and (phase_done or cut == "phase"
                                                 or (self.bnneck and stale)):
            self._switch_phase()
        elif phase_done:
            self.state.stopped = "epochs"
        self._checkpoint("last.pt")
        if self.state.stopped and not (self.out / "best.pt").exists():
            self._checkpoint("best.pt")  # e.g. a budget hit before the first validation

    def _switch_phase(self) -> None:
        self._start_from_pretrained()
        self.state.phase = "main"
        self.state.phase_started_s = self.state.elapsed_s
        self.state.phase_start_epoch = self.state.epoch
        self.state.stale = 0
        del self._pretrain_heads
        self._build_phase()


def _raise_keyboard_interrupt(signum, frame):  # SIGTERM: save like Ctrl-C
    raise KeyboardInterrupt


# -- command line ------------------------------------------------------------------------
