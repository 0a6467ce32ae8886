"""Training: the paper's protocol (all pairs of 128-image batches, binomial deviance, early
stopping on validation), a JSON-lines log, a checkpoint every epoch, resume, and ``dsmi train``.

Run folder (``--out``): ``config.yaml`` (resolved), ``log.jsonl`` (one line per epoch),
``last.pt`` (every epoch, and on Ctrl-C), ``best.pt`` (best validation mAP), and
``eval/`` (the test report of ``best.pt``) when training ends.
"""

from __future__ import annotations

import json
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from torch.utils.data import DataLoader

from model import FCCNN, binomial_deviance, build_model
from model.checkpoint import read_checkpoint, save_checkpoint
from model.network import MatchingNetwork

from .config import Config, validate_config
from .data.dataset import ReIDImages
from .data.records import relabel
from .data.sampling import IdentityBatchSampler, RandomBatchSampler
from .data.transforms import FlipShift
from .inference import distance_matrix
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
        self.init_report = self._init_from(t.init_from) if t.init_from else None
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
        picked = {k: v for k, v in payload["state_dict"].items()
                  if k in own and own[k].shape == v.shape}
        if not picked:
            raise ValueError(f"train.init_from: no tensor of {path} ({payload.get('variant')}) "
                             f"fits a {self.cfg.model.variant} network")
        self.net.load_state_dict(picked, strict=False)
        return {"checkpoint": str(path), "variant": payload.get("variant"),
                "loaded": len(picked), "kept_random": sorted(set(own) - set(picked))}

    def _phase_model(self) -> torch.nn.Module:
        """What the current phase optimises: the FC-CNN around the trunk(s), or the network."""
        if self.state.phase == "pretrain":
            if not hasattr(self, "_pretrain_heads"):
                n = len(self.pid_map)
                self._pretrain_heads = torch.nn.ModuleList(
                    FCCNN(trunk, self.net.map_size, self.net.fc.out_features, n)
                    for trunk in self.net.trunks).to(self.device)
            return self._pretrain_heads
        return self.net

    @torch.no_grad()
    def _start_from_pretrained(self) -> None:
        """Phase 2 starts where phase 1 ended: the network's FC takes the FC-CNN's FC (same
        shape: the flattened conv5 map to ``fc_dim``) and the pooling's last projection is
        zeroed, so F~ = 0 and x = FC(g - F~) is the FC-CNN embedding: the first similarity
        is FC-CNN's cosine, and binomial deviance refines it from there. The paper copies only
        the convolutions; starting the head at zero keeps phase 1's matching quality instead
        of a random head's."""
        self.net.fc.load_state_dict(self._pretrain_heads[0].fc.state_dict())
        out = self.net.pooling.out_proj
        if out is not None:
            out.weight.zero_()
            out.bias.zero_()

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
        self.base_lr = t.lr
        # Augmentation runs on whole batches on the training device (FlipShift), so the
        # loader's workers only decode, and a GPU is not left waiting on per-image CPU work.
        self.augment = FlipShift(t.flip, t.shift)
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
        # P x K exists to give the pair loss positives; an identity softmax (phase 1, FC-CNN)
        # learns from every image, so it keeps the paper's random batches.
        if t.sampler == "random" or self.state.phase == "pretrain" or self.softmax_only:
            sampler = RandomBatchSampler(len(dataset), t.batch_size, t.seed)
        else:
            sampler = IdentityBatchSampler(pids, t.batch_size, t.instances_per_id, t.seed)
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

    def _loss(self, images: torch.Tensor, pids: torch.Tensor) -> torch.Tensor:
        t = self.cfg.train
        # bf16 autocast runs convolutions and matrix products in bfloat16 (weights and the loss
        # stay float32): 2.6x faster for the small trunk on this machine's AVX512-BF16 CPU.
        with torch.autocast(self.device.type, dtype=torch.bfloat16,
                            enabled=t.precision == "bf16"):
            if self.state.phase == "pretrain":
                return sum(F.cross_entropy(head.logits(images).float(), pids)
                           for head in self._pretrain_heads)
            if self.softmax_only:
                return F.cross_entropy(self.net.logits(images).float(), pids)
            sim = self.net.similarity_matrix(images).float()
        n = len(pids)
        same = pids[:, None] == pids[None, :]
        off_diagonal = ~torch.eye(n, dtype=torch.bool, device=images.device)
        return binomial_deviance(sim, same, t.alpha, t.beta, valid=off_diagonal)

    # -- validation --------------------------------------------------------------------

    def validate(self) -> dict:
        from .metrics import evaluate_ranking

        queries, gallery = self.data.val_queries, self.data.val_gallery
        dist = distance_matrix(self.net, queries, gallery, device=self.device)
        cmc, mean_ap = evaluate_ranking(
            dist, [r.pid for r in queries], [r.pid for r in gallery],
            [r.camid for r in queries], [r.camid for r in gallery], max_rank=20)
        return {"val_rank1": float(cmc[0]), "val_rank5": float(cmc[4]),
                "val_map": float(mean_ap)}

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
        done = (self.state.epoch - self._phase_start_epoch()) * len(self.loader.batch_sampler)
        done += self._batch_in_epoch
        by_steps = done / max(epochs * len(self.loader.batch_sampler), 1)
        by_time = 0.0
        if t.max_minutes:
            by_time = (self.state.elapsed_s + time.time() - started) / (t.max_minutes * 60)
        return min(max(by_steps, by_time), 1.0)

    def _phase_start_epoch(self) -> int:
        t = self.cfg.train
        return 0 if self.state.phase == "pretrain" or self.softmax_only else t.pretrain_epochs

    def _set_lr(self, started: float) -> None:
        lr = self.base_lr
        if self.cfg.train.schedule == "cosine":
            floor = 0.01 * lr
            lr = floor + (lr - floor) * 0.5 * (1 + math.cos(math.pi * self._progress(started)))
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)

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
                                    "kept_random": len(self.init_report["kept_random"])}
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary

    def _run_epoch(self) -> None:
        t = self.cfg.train
        started = time.time()
        model = self._phase_model()
        model.train()
        sampler = self.loader.batch_sampler
        sampler.set_epoch(self.state.epoch)
        batches = iter(self.loader)
        if self.progress:
            from tqdm import tqdm
            batches = tqdm(batches, total=len(sampler), unit="batch", dynamic_ncols=True,
                           desc=f"{self.state.phase} epoch {self.state.epoch + 1}")
        losses = []
        over_budget = False
        self._batch_in_epoch = 0
        for images, pids, _cams, _idx in batches:
            self._set_lr(started)
            images = self.augment(images.to(self.device, non_blocking=True))
            pids = pids.to(self.device, non_blocking=True)
            loss = self._loss(images, pids)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss became {loss.item()} at step {self.state.step}")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.state.step += 1
            self._batch_in_epoch += 1
            losses.append(loss.item())
            if self.progress:
                batches.set_postfix(loss=f"{losses[-1]:.4f}")
            if self._over_budget(started):
                over_budget = True
                break
        self.state.epoch += 1
        record = {"epoch": self.state.epoch, "phase": self.state.phase,
                  "loss": sum(losses) / max(len(losses), 1), "batches": len(losses),
                  "lr": self.optimizer.param_groups[0]["lr"]}
        improved = False
        if self.state.phase == "main" and self.state.epoch % t.eval_every == 0:
            record.update(self.validate())
            improved = record["val_map"] > self.state.best_map
            if improved:
                self.state.best_map, self.state.best_epoch = record["val_map"], self.state.epoch
                self.state.stale = 0
            else:
                self.state.stale += 1
        self.state.elapsed_s += time.time() - started
        record["elapsed_min"] = round(self.state.elapsed_s / 60, 2)
        self.state.history.append(record)
        self._log(record)
        if self.progress:
            shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in record.items()}
            print(json.dumps(shown), flush=True)

        phase_epochs = t.pretrain_epochs if self.state.phase == "pretrain" else \
            t.pretrain_epochs * (not self.softmax_only) + t.epochs
        if over_budget:
            self.state.stopped = "budget"
        elif self.state.phase == "main" and self.state.stale >= t.patience:
            self.state.stopped = "early_stop"
        elif self.state.epoch >= phase_epochs:
            if self.state.phase == "pretrain":
                self._start_from_pretrained()
                self.state.phase = "main"
                del self._pretrain_heads
                self._build_phase()
            else:
                self.state.stopped = "epochs"
        self._checkpoint("last.pt")
        if improved:
            self._checkpoint("best.pt")
        if self.state.stopped and not (self.out / "best.pt").exists():
            self._checkpoint("best.pt")  # e.g. a budget hit before the first validation


def _raise_keyboard_interrupt(signum, frame):  # SIGTERM: save like Ctrl-C
    raise KeyboardInterrupt


# -- command line ------------------------------------------------------------------------
