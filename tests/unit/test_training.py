"""training/: config and CLI contract, batch order, checkpoints, train-mode policy, reports (no training)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from timm.layers import DropPath
from torch import nn

from repadapter import RepAdapter, attach_slots, load_backbone
from repadapter.errors import CheckpointError
from training.batches import ShardedBatchSampler
from training.checkpoint import flatten_optimizer, load_checkpoint, save_checkpoint, unflatten_optimizer
from training.cli import build_parser, main
from training.config import SCALE_GRID, TrainConfig
from training.demo import imagenet_bundle
from training.model import TaskModel, build_model, set_train_mode, train_state
from training.report import plot_curves, write_json

AGREED_FLAGS = (  # docs/CORE_API.md "Agreed interfaces": the service's integration test relies on them
    "--data", "--task", "--store", "--backbone", "--checkpoint", "--method", "--epochs", "--max-steps",
    "--batch-size", "--lr", "--weight-decay", "--hidden", "--groups", "--scale", "--search-scale", "--dropout",
    "--drop-path", "--placement", "--image-size", "--n-train", "--n-val", "--n-test", "--seed", "--out-dir",
    "--resume", "--overwrite", "--register", "--token", "--device", "--amp",
)


# --- config and CLI -----------------------------------------------------------------------------------


def test_defaults_are_the_paper_recipe():
    cfg = TrainConfig(data="mnist", task="digits")
    assert (cfg.lr, cfg.weight_decay, cfg.batch_size, cfg.seed) == (1e-3, 1e-4, 64, 42)
    assert (cfg.hidden, cfg.groups, cfg.scale, cfg.dropout, cfg.drop_path) == (8, 2, 1.0, 0.1, 0.1)
    assert (cfg.n_train, cfg.n_val, cfg.method, cfg.placement) == (800, 200, "repadapter", "block")
    assert SCALE_GRID == (0.1, 0.5, 1.0, 5.0, 10.0)
    assert cfg.scales == (1.0,)
    assert TrainConfig(data="mnist", task="digits", search_scale=True).scales == SCALE_GRID
    assert cfg.run_dir == Path("runs/digits")


@pytest.mark.parametrize(("kw", "message"), [
    ({"task": "Bad Name"}, "task names"),
    ({"hidden": 6, "groups": 4}, "divisible"),
    ({"method": "linear", "search_scale": True}, "'repadapter' only"),
    ({"scale_grid": (1.0, 1.0)}, "distinct"),
    ({"placement": "mlp"}, "block"),
])
def test_config_refuses_inconsistent_settings(kw, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{"data": "mnist", "task": "digits", **kw})


def test_token_never_reaches_reports():
    cfg = TrainConfig(data="mnist", task="digits", register="http://x", token="s3cret")
    assert cfg.register_url == "http://x"
    assert "s3cret" not in json.dumps(cfg.public_dict())
    assert "s3cret" not in repr(cfg)


def test_help_documents_every_agreed_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag in [*AGREED_FLAGS, "--demo", "--scale-grid"]:
        assert flag in out, flag
    for action in build_parser()._actions:  # every flag says what it does
        assert len(action.help or "") > 10, action.option_strings


@pytest.mark.parametrize("argv", [
    ["--task", "digits"],  # no --data
    ["--data", "mnist", "--task", "No Such"],
    ["--data", "mnist", "--task", "digits", "--method", "sgd"],
    ["--demo", "--data", "mnist"],
])
def test_bad_usage_exits_2(argv):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2


def test_existing_task_is_refused_before_training(tmp_path, embedded):
    from repadapter import LocalStore
    from training.demo import imagenet_bundle

    LocalStore(tmp_path).put(imagenet_bundle(embedded))
    rc = main(["--data", "mnist", "--task", "imagenet", "--store", str(tmp_path), "--out-dir", str(tmp_path / "r")])
    assert rc == 1
    assert not (tmp_path / "r").exists()  # nothing ran


# --- batch order --------------------------------------------------------------------------------------


def test_sharded_batches_equal_the_single_process_batches():
    single = ShardedBatchSampler(70, 8, seed=3)
    ranks = [ShardedBatchSampler(70, 8, seed=3, rank=r, world_size=2) for r in range(2)]
    for epoch in (0, 1):
        for s in (single, *ranks):
            s.set_epoch(epoch)
        whole = list(single)
        shards = list(zip(*ranks, strict=True))
        assert len(whole) == len(single) == 9  # 8 full batches + 6 left over
        assert len(shards) == len(ranks[0]) == 9
        for batch, (a, b) in zip(whole, shards, strict=True):
            assert sorted(a + b) == sorted(batch)
            assert len(a) == len(b)
    single.set_epoch(0)
    first = list(single)
    single.set_epoch(1)
    assert list(single) != first
    single.set_epoch(0)
    assert list(single) == first


def test_sharded_batches_drop_a_tail_too_small_for_every_rank():
    sampler = ShardedBatchSampler(9, 4, seed=0, rank=1, world_size=4)
    assert len(sampler) == len(list(sampler)) == 2  # the ninth sample cannot feed four ranks
    with pytest.raises(ValueError, match="divisible"):
        ShardedBatchSampler(9, 6, seed=0, world_size=4)


# --- checkpoints --------------------------------------------------------------------------------------


def _trained_adamw(seed: int = 0) -> tuple[nn.Linear, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Linear(5, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(4, 5)).square().sum().backward()
        opt.step()
    return model, opt


def test_checkpoint_round_trip_continues_identically(tmp_path):
    model, opt = _trained_adamw()
    opt_tensors, opt_meta = flatten_optimizer(opt.state_dict())
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, {f"model.{k}": v for k, v in model.state_dict().items()} | opt_tensors,
                    {"optimizer": opt_meta, "epoch": 3})
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.safetensors"]  # no temp file left behind
    tensors, meta = load_checkpoint(path)
    assert meta["epoch"] == 3
    clone = nn.Linear(5, 3)
    clone.load_state_dict({k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")})
    clone_opt = torch.optim.AdamW(clone.parameters(), lr=1e-2)
    clone_opt.load_state_dict(unflatten_optimizer(tensors, meta["optimizer"]))
    x = torch.randn(4, 5)
    for m, o in ((model, opt), (clone, clone_opt)):
        o.zero_grad()
        m(x).square().sum().backward()
        o.step()
    for a, b in zip(model.parameters(), clone.parameters(), strict=True):
        assert torch.equal(a, b)


def test_checkpoint_refuses_foreign_files(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, tmp_path / "foreign.safetensors")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(tmp_path / "foreign.safetensors")
    (tmp_path / "torn.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "torn.safetensors")


# --- model and train mode -----------------------------------------------------------------------------


def test_drop_path_backbone_keeps_its_fingerprint(embedded):
    with_drop_path = load_backbone(drop_path_rate=0.1)
    assert with_drop_path.fingerprint == embedded.fingerprint  # bundles stay servable on the plain backbone
    rates = [m.drop_prob for m in with_drop_path.model.modules() if isinstance(m, DropPath)]
    assert len(rates) > 10
    assert 0 < max(rates) <= 0.1


def test_train_mode_keeps_batchnorm_frozen_for_adapters():
    backbone = load_backbone(drop_path_rate=0.1)
    cfg = TrainConfig(data="mnist", task="digits")
    sites = attach_slots(backbone.model)
    model = build_model(cfg, backbone, sites, num_classes=10, scale=1.0)
    set_train_mode(model, "repadapter")
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    adapters = [m for m in model.modules() if isinstance(m, RepAdapter)]
    assert len(adapters) == len(sites) == 33
    assert bns
    assert not any(m.training for m in bns)
    assert all(m.training and m.dropout.training for m in adapters)
    assert all(m.training for m in model.modules() if isinstance(m, DropPath))
    before = [m.running_mean.clone() for m in bns]
    model(torch.randn(2, 3, 32, 32))
    assert all(torch.equal(b, m.running_mean) for b, m in zip(before, bns, strict=True))
    trainable = train_state(model, "repadapter")
    assert set(trainable) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert sum(t.numel() for t in trainable.values()) == 121_234  # 33 adapters + a 10-class head
    set_train_mode(model, "full")
    assert all(m.training for m in bns)


def test_linear_model_is_a_head_on_features():
    model = TaskModel(None, 16, 4)
    assert sum(p.numel() for p in model.parameters()) == 16 * 4 + 4
    assert model(torch.randn(3, 16)).shape == (3, 4)


def test_imagenet_bundle_is_the_backbone_classifier(embedded):
    bundle = imagenet_bundle(embedded)
    assert bundle.manifest.labels == embedded.labels  # unique: 'crane' and 'maillot' carry their WordNet id
    assert bundle.manifest.labels[134] == "crane (n02012849)"
    assert (bundle.manifest.method, bundle.adapters, bundle.manifest.adapter.hidden) == ("pretrained", {}, 0)
    assert torch.equal(bundle.head_weight, embedded.classifier[0])
    assert bundle.manifest.preprocess == embedded.preprocess


# --- reports ------------------------------------------------------------------------------------------


def test_report_files(tmp_path):
    history = [{"epoch": e, "train_loss": 2 / e, "val_loss": 2.1 / e, "train_accuracy": e / 4,
                "val_accuracy": e / 5} for e in (1, 2, 3)]
    search = [{"scale": s, "val_accuracy": a} for s, a in ((0.1, 0.5), (1.0, 0.6))]
    plot_curves(tmp_path / "curves.png", history, "t", search)
    png = (tmp_path / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(png) > 10_000
    write_json(tmp_path / "report.json", {"metrics": {"val_accuracy": 0.5}})
    assert json.loads((tmp_path / "report.json").read_text()) == {"metrics": {"val_accuracy": 0.5}}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png", "report.json"]
