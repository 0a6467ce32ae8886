"""Training end to end on a tiny generated dataset: logs, checkpoints, resume, Ctrl-C, report."""

import json

import numpy as np
import pytest
import torch

from dsmi_cli.main import main
from model.checkpoint import load_checkpoint
from training.config import load_config
from training.train import Trainer


def tiny_overrides(manifest, **extra):
    items = {"model.variant": "dsmi-small", "train.optimizer": "adam",
             "data.root": str(manifest.parent), "data.manifest": manifest.name,
             "data.test_split": "test", "data.val_ids": 3, "train.batch_size": 16,
             "train.epochs": 2, "train.max_minutes": None, "train.patience": 10,
             "train.threads": 1, "train.pretrain_epochs": 0, "train.eval_every": 1, **extra}
    return [f"{k}={json.dumps(v) if v is None else v}" for k, v in items.items()]


def test_train_writes_log_checkpoints_and_report(tiny_manifest, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--config", "configs/cpu.yaml", "--out", str(out), "--no-progress",
                 *sum((["--set", o] for o in tiny_overrides(tiny_manifest)), [])])
    assert code == 0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2]
    assert all(np.isfinite(r["loss"]) and 0 <= r["val_map"] <= 1 for r in log)
    assert log[1]["lr"] < log[0]["lr"]  # cosine schedule
    net, payload = load_checkpoint(out / "best.pt")
    assert payload["train_state"]["best_epoch"] in (1, 2)
    assert net.variant == "dsmi-small"
    report = json.loads((out / "eval" / "report.json").read_text())
    assert report["num_queries"] == 4 * 3 and report["num_gallery"] == 4 * 3
    assert (out / "eval" / "cmc.png").stat().st_size > 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped"] == "epochs" and summary["epochs"] == 2
    assert (out / "curve.png").stat().st_size > 0
    # The match probability, fitted on the held-out identities, and its test reliability.
    calibration = json.loads((out / "calibration.json").read_text())
    assert calibration["a"] > 0 and calibration["pairs"] > 0
    assert 0 <= report["calibration"]["ece"] <= 1 and (out / "eval" / "reliability.png").is_file()
    (out / "calibration.json").unlink()
    assert main(["calibrate", "--run", str(out)]) == 0  # the same fit, by hand
    assert json.loads((out / "calibration.json").read_text()) == calibration


def test_resume_continues_where_it_stopped(tiny_manifest, tmp_path):
    cfg = load_config("configs/cpu.yaml", tiny_overrides(tiny_manifest, **{"train.epochs": 1}))
    Trainer(cfg, tmp_path, progress=False).fit()
    cfg2 = load_config("configs/cpu.yaml", tiny_overrides(tiny_manifest, **{"train.epochs": 3}))
    trainer = Trainer(cfg2, tmp_path, resume=True, progress=False)
    assert trainer.state.epoch == 1
    resumed_weights = next(trainer.net.parameters()).detach().clone()
    saved, _ = load_checkpoint(tmp_path / "last.pt")
    assert torch.equal(resumed_weights, next(saved.parameters()))
    trainer.fit()
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3]


def test_ctrl_c_leaves_a_usable_checkpoint(tiny_manifest, tmp_path, monkeypatch):
    cfg = load_config("configs/cpu.yaml", tiny_overrides(tiny_manifest))
    trainer = Trainer(cfg, tmp_path, progress=False)
    calls = {"n": 0}
    real_loss = trainer._loss

    def interrupting_loss(images, pids, indices=None):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_loss(images, pids, indices)

    monkeypatch.setattr(trainer, "_loss", interrupting_loss)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    net, payload = load_checkpoint(tmp_path / "last.pt")
    assert payload["interrupted"] and payload["train_state"]["step"] == 1
    resumed = Trainer(cfg, tmp_path, resume=True, progress=False)
    assert resumed.state.step == 1
    assert resumed.fit()["epochs"] == 2


def test_loss_falls_when_fitting_one_batch(tiny_manifest):
    cfg = load_config("configs/cpu.yaml", tiny_overrides(tiny_manifest))
    trainer = Trainer(cfg, "/tmp/unused-run", progress=False)
    images, pids, *_ = next(iter(trainer.loader))
    trainer.net.train()
    first = trainer._loss(images, pids).item()
    for _ in range(15):
        loss = trainer._loss(images, pids)
        trainer.optimizer.zero_grad()
        loss.backward()
        trainer.optimizer.step()
    assert trainer._loss(images, pids).item() < 0.7 * first


@pytest.mark.parametrize("variant,extra", [("fc-cnn-small", {}),
                                           ("dsmi-small", {"train.pretrain_epochs": 1,
                                                           "train.sampler": "pk"})])
def test_softmax_variant_and_two_phase_training(tiny_manifest, tmp_path, variant, extra):
    cfg = load_config("configs/cpu.yaml", tiny_overrides(
        tiny_manifest, **{"model.variant": variant, **extra}))
    summary = Trainer(cfg, tmp_path, progress=False).fit()
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    phases = [r["phase"] for r in log]
    if extra:
        assert phases == ["pretrain", "main", "main"] and "val_map" not in log[0]
    else:
        assert phases == ["main", "main"]
    assert summary["best_epoch"] >= 1


def test_pk_sampler_is_for_the_pair_loss_only(tiny_manifest, tmp_path):
    from training.data.sampling import IdentityBatchSampler, RandomBatchSampler

    pk = {"train.sampler": "pk", "train.instances_per_id": 2}
    fc_cnn = Trainer(load_config("configs/cpu.yaml", tiny_overrides(
        tiny_manifest, **{"model.variant": "fc-cnn-small", **pk})), tmp_path / "a", progress=False)
    assert isinstance(fc_cnn.loader.batch_sampler, RandomBatchSampler)
    dsmi = Trainer(load_config("configs/cpu.yaml", tiny_overrides(
        tiny_manifest, **{"train.pretrain_epochs": 1, **pk})), tmp_path / "b", progress=False)
    (tmp_path / "b").mkdir()
    assert isinstance(dsmi.loader.batch_sampler, RandomBatchSampler)  # phase 1: softmax
    dsmi._run_epoch()
    assert dsmi.state.phase == "main"
    assert isinstance(dsmi.loader.batch_sampler, IdentityBatchSampler)


@pytest.mark.parametrize("optimizer,cls", [("adam", torch.optim.Adam),
                                           ("adamw", torch.optim.AdamW),
                                           ("sgd", torch.optim.SGD)])
def test_optimizers(tiny_manifest, tmp_path, optimizer, cls):
    cfg = load_config("configs/cpu.yaml", tiny_overrides(
        tiny_manifest, **{"train.optimizer": optimizer, "train.weight_decay": 0.01}))
    trainer = Trainer(cfg, tmp_path, progress=False)
    assert type(trainer.optimizer) is cls
    net = trainer.net
    decay = {id(p): g["weight_decay"] for g in trainer.optimizer.param_groups
             for p in g["params"]}
    assert decay[id(net.fc.weight)] == 0.01 and decay[id(net.fusion.U.weight)] == 0.01
    assert decay[id(net.fc.bias)] == 0.0  # offsets are not decayed
    assert decay[id(net.trunks[0].features[1].weight)] == 0.0  # a batch-norm scale
    assert len(decay) == sum(p.requires_grad for p in net.parameters())
    with pytest.raises(ValueError, match="train.optimizer is 'lbfgs'; allowed: adam, adamw"):
        load_config("configs/cpu.yaml", tiny_overrides(tiny_manifest,
                                                       **{"train.optimizer": "lbfgs"}))


def test_trunk_lr_mult_scales_only_the_trunk(tiny_manifest, tmp_path):
    cfg = load_config("configs/cpu.yaml", tiny_overrides(
        tiny_manifest, **{"train.trunk_lr_mult": 0.1, "train.lr": 0.01,
                          "train.schedule": "constant"}))
    trainer = Trainer(cfg, tmp_path, progress=False)
    trainer._set_lr(0.0)
    lr = {id(p): g["lr"] for g in trainer.optimizer.param_groups for p in g["params"]}
    assert lr[id(trainer.net.fc.weight)] == pytest.approx(0.01)
    assert lr[id(trainer.net.trunks[0].features[0].weight)] == pytest.approx(0.001)


def test_resume_reads_through_the_checkpoint_reader(tiny_manifest, tmp_path):
    cfg = load_config("configs/cpu.yaml", tiny_overrides(tiny_manifest))
    torch.save({"state_dict": {}}, tmp_path / "last.pt")  # not one of ours
    with pytest.raises(ValueError, match="not a dsmi checkpoint"):
        Trainer(cfg, tmp_path, resume=True, progress=False)


def test_adamw_keeps_a_head_without_loss_gradient(tiny_manifest, tmp_path):
    """Phase 2 starts with the IRNN's last projection at zero, so nothing behind it gets a
    loss gradient at first. Adam's L2 decay still drives those weights towards zero at about
    lr per step; AdamW's decoupled decay shrinks them by only lr * weight_decay."""
    norms = {}
    for optimizer in ("adam", "adamw"):
        cfg = load_config("configs/cpu.yaml", tiny_overrides(
            tiny_manifest, **{"train.optimizer": optimizer, "train.lr": 0.01,
                              "train.weight_decay": 0.01}))
        torch.manual_seed(0)
        trainer = Trainer(cfg, tmp_path / optimizer, progress=False)
        net = trainer.net
        w = net.pooling.layers[0].in_conv.weight
        before = w.detach().abs().mean().item()
        for _ in range(10):  # no loss gradient reaches the pooling: only the decay acts
            for p in net.pooling.parameters():
                p.grad = torch.zeros_like(p)
            trainer.optimizer.step()
        norms[optimizer] = w.detach().abs().mean().item() / before
    assert norms["adamw"] > 0.99
    assert norms["adam"] < 0.9


def test_phase_two_starts_at_the_fc_cnn_similarity(tiny_manifest, tmp_path):
    cfg = load_config("configs/cpu.yaml", tiny_overrides(
        tiny_manifest, **{"train.pretrain_epochs": 1, "train.epochs": 1}))
    trainer = Trainer(cfg, tmp_path, progress=False)
    fc_cnn = trainer._pretrain_heads[0]
    trainer._run_epoch()  # the FC-CNN epoch, then the switch to phase 2
    assert trainer.state.phase == "main"
    fc_cnn.eval()
    net = trainer.net.eval()
    images = torch.randn(5, 3, *net.input_size)
    with torch.no_grad():
        maps = net.encode(images)
        expected = torch.nn.functional.cosine_similarity(fc_cnn.embed(maps[:1]),
                                                         fc_cnn.embed(maps), dim=1)
        assert torch.allclose(net.score(maps[:1], maps), expected, atol=1e-5)
    assert net.pooling.out_proj.weight.abs().sum() == 0


def test_init_from_copies_every_fitting_tensor(tiny_manifest, tmp_path):
    first = load_config("configs/cpu.yaml", tiny_overrides(tiny_manifest, **{"train.epochs": 1}))
    Trainer(first, tmp_path / "a", progress=False).fit()
    source, _ = load_checkpoint(tmp_path / "a" / "best.pt")
    cfg = load_config("configs/cpu.yaml", tiny_overrides(
        tiny_manifest, **{"train.init_from": str(tmp_path / "a" / "best.pt")}))
    trainer = Trainer(cfg, tmp_path / "b", progress=False)
    assert trainer.init_report["kept_random"] == []
    for (name, mine), theirs in zip(trainer.net.state_dict().items(),
                                    source.state_dict().values(), strict=True):
        assert torch.equal(mine, theirs), name

    # an FC-CNN of another dataset: same trunk and FC, another identity classifier
    cfg = load_config("configs/cpu.yaml", tiny_overrides(
        tiny_manifest, **{"model.variant": "fc-cnn-small", "train.epochs": 1}))
    Trainer(cfg, tmp_path / "c", progress=False).fit()
    fc_cnn, _ = load_checkpoint(tmp_path / "c" / "best.pt")
    cfg = load_config("configs/cpu.yaml", tiny_overrides(
        tiny_manifest, **{"model.variant": "fc-cnn-small", "data.val_ids": 4,
                          "train.init_from": str(tmp_path / "c" / "best.pt")}))
    trainer = Trainer(cfg, tmp_path / "d", progress=False)
    kept = trainer.init_report["kept_random"]
    assert kept and all(name.startswith("classifier") for name in kept)
    key = "trunks.0.features.0.weight"
    assert torch.equal(trainer.net.state_dict()[key], fc_cnn.state_dict()[key])


def test_init_from_refuses_a_missing_or_unfitting_checkpoint(tiny_manifest, tmp_path):
    cfg = load_config("configs/cpu.yaml", tiny_overrides(
        tiny_manifest, **{"train.init_from": str(tmp_path / "nothing.pt")}))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        Trainer(cfg, tmp_path, progress=False)
    torch.save({"format": 1, "variant": "x", "state_dict": {"w": torch.zeros(2)}},
               tmp_path / "other.pt")
    cfg = load_config("configs/cpu.yaml", tiny_overrides(
        tiny_manifest, **{"train.init_from": str(tmp_path / "other.pt")}))
    with pytest.raises(ValueError, match="no tensor"):
        Trainer(cfg, tmp_path, progress=False)


def test_loader_workers_share_the_preloaded_cache(tiny_manifest, tmp_path):
    """With workers, images are decoded once in the main process (the workers are forked
    with the cache) and augmentation runs on the batch after it reaches the device."""
    cfg = load_config("configs/cpu.yaml", tiny_overrides(
        tiny_manifest, **{"data.num_workers": 1, "train.epochs": 1}))
    trainer = Trainer(cfg, tmp_path, progress=False)
    dataset = trainer.loader.dataset
    assert len(dataset._cache) == len(dataset)  # preloaded before the workers start
    assert dataset.transform is None and trainer.loader.persistent_workers
    assert not trainer.loader.pin_memory  # pinned memory is for a CUDA device
    seen = []
    real = trainer.augment.__call__

    class Spy:
        def __call__(self, images):
            seen.append(images.shape)
            return real(images)

    trainer.augment = Spy()
    summary = trainer.fit()
    assert summary["epochs"] == 1 and seen and all(s[0] > 1 for s in seen)


def bnneck_overrides(manifest, **extra):
    return tiny_overrides(manifest, **{
        "model.variant": "dsmi-lite0-bnneck", "model.overrides": "{weights: null, "
        "input_size: [64, 32]}", "train.optimizer": "adamw", "train.sampler": "pk",
        "train.pretrain_epochs": 2, "train.pretrain_batch_size": 16, "train.warmup_epochs": 1,
        "train.label_smoothing": 0.1, "train.erasing": 0.5, "train.channels_last": True,
        "train.lr": 0.01, **extra})


def test_bnneck_trains_the_embedding_then_the_head_alone_on_cached_maps(tiny_manifest,
                                                                       tmp_path):
    cfg = load_config("configs/cpu-bnneck.yaml", bnneck_overrides(tiny_manifest))
    trainer = Trainer(cfg, tmp_path, progress=False)
    assert trainer.bnneck and trainer.state.phase == "pretrain"
    assert trainer.loader.batch_sampler.ids_per_batch == 4  # P x K in phase 1 too
    start = {k: v.clone() for k, v in trainer.net.state_dict().items()}
    switched = {}
    original = trainer._start_from_pretrained

    def spy():
        original()
        switched.update({k: v.clone() for k, v in trainer.net.state_dict().items()})
    trainer._start_from_pretrained = spy
    trainer.fit()
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in log] == ["pretrain", "pretrain", "main", "main"]
    assert all("val_map" in r for r in log)  # phase 1 is validated (embedding only)
    end = trainer.net.state_dict()
    trunk_keys = [k for k in end if k.startswith(("trunks.", "fc."))]
    head_keys = [k for k in end if k.startswith(("fusion.", "pooling."))]
    # Phase 1 moved the trunk and left the head alone (its output projection at zero) ...
    assert any(not torch.equal(start[k], switched[k]) for k in trunk_keys if "weight" in k)
    assert all(torch.equal(start[k], switched[k]) for k in head_keys)
    assert not switched["pooling.layers.1.out_conv.weight"].any()
    # ... phase 2 moved the head only.
    assert all(torch.equal(switched[k], end[k]) for k in trunk_keys)
    assert end["pooling.layers.1.out_conv.weight"].abs().sum() > 0
    n = len(trainer.train_records)
    assert trainer._maps.shape == (2, n, 1280, 2, 1) and trainer._maps.dtype == torch.float16
    net, _ = load_checkpoint(tmp_path / "best.pt")
    assert net.variant == "dsmi-lite0-bnneck"


def test_stripes_train_one_identity_classifier_per_region(tiny_manifest, tmp_path):
    cfg = load_config("configs/cpu-bnneck.yaml", bnneck_overrides(tiny_manifest, **{
        "model.variant": "dsmi-lite0-stripes", "train.pretrain_epochs": 1, "train.epochs": 1}))
    trainer = Trainer(cfg, tmp_path, progress=False)
    heads = trainer._phase_model()[2]
    assert len(heads) == 3 and all(h.in_features == 1280 for h in heads)
    before = [h.weight.clone() for h in heads]
    trainer.fit()
    # Each stripe's classifier learned (each reads its own region of the embedding).
    assert all(not torch.equal(b, h.weight) for b, h in zip(before, heads, strict=True))
    net, _ = load_checkpoint(tmp_path / "best.pt")
    assert net.variant == "dsmi-lite0-stripes" and net.fc.out_features == 3 * 1280
    with torch.no_grad():
        assert net.eval().embed(net.encode(torch.randn(2, 3, 64, 32))).shape == (2, 3840)


def test_bnneck_phase_one_ends_on_its_own_budget(tiny_manifest, tmp_path):
    cfg = load_config("configs/cpu-bnneck.yaml", bnneck_overrides(tiny_manifest, **{
        "train.pretrain_epochs": 50, "train.pretrain_minutes": 1e-6, "train.epochs": 1}))
    Trainer(cfg, tmp_path, progress=False).fit()
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in log] == ["pretrain", "main"]
    assert log[0]["batches"] == 1  # stopped after the batch that spent the budget


def test_heads_compared_on_one_embedding_start_from_nothing(tiny_manifest, tmp_path):
    cfg = load_config("configs/cpu-bnneck.yaml", bnneck_overrides(tiny_manifest, **{
        "train.pretrain_epochs": 1, "train.epochs": 1}))
    Trainer(cfg, tmp_path / "dsmi", progress=False).fit()
    trained, _ = load_checkpoint(tmp_path / "dsmi" / "best.pt")
    for parts, variant in (("embedding", "dsmi-lite0-bnneck"),
                           ("embedding", "mi-spp-lite0-bnneck"), ("all", "dsmi-lite0-bnneck")):
        cfg = load_config("configs/cpu-bnneck.yaml", bnneck_overrides(tiny_manifest, **{
            "model.variant": variant, "train.pretrain_epochs": 0, "train.epochs": 1,
            "train.init_from": str(tmp_path / "dsmi" / "best.pt"),
            "train.init_from_parts": parts}))
        trainer = Trainer(cfg, tmp_path / f"{variant}-{parts}", progress=False)
        assert trainer.state.phase == "main"
        own = trainer.net.state_dict()
        for key, value in trained.state_dict().items():
            if key.startswith(("trunks.", "fc.")):
                assert torch.equal(own[key], value)
        out = trainer.net.pooling.out_proj.weight
        head_loaded = parts == "all"
        assert bool(out.abs().sum() > 0) == (head_loaded and trained.pooling.out_proj
                                             .weight.abs().sum() > 0)


def test_phase_two_maps_are_kept_on_disk_for_the_next_run(tiny_manifest, tmp_path,
                                                          monkeypatch):
    cache = tmp_path / "maps"
    cfg = load_config("configs/cpu-bnneck.yaml", bnneck_overrides(tiny_manifest, **{
        "train.pretrain_epochs": 0, "train.epochs": 1, "train.map_cache": str(cache)}))
    first = Trainer(cfg, tmp_path / "a", progress=False)
    files = list(cache.glob("maps-*.pt"))
    assert len(files) == 1 and not list(cache.glob("*.partial"))
    monkeypatch.setattr(Trainer, "_compute_maps", lambda self, dataset: pytest.fail(
        "the maps should come from the cache"))
    second = Trainer(cfg, tmp_path / "b", progress=False)
    assert torch.equal(first._maps, second._maps)
    # Another trunk is another file.
    with torch.no_grad():
        next(second.net.trunks.parameters()).add_(1.0)
    assert second._map_cache_file(second.loader.dataset) != files[0]
