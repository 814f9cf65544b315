"""training/: config and CLI contract, batch order, class balance, checkpoints, train-mode policy, trial choice,
reports, registration retries (no training)."""

from __future__ import annotations

import argparse
import json
import logging
import re
import shlex
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from timm.layers import DropPath
from torch import nn
from torch.utils.data import TensorDataset

from repadapter import RepAdapter, attach_slots, load_backbone
from repadapter.errors import CheckpointError
from training.batches import ShardedBatchSampler, batches, class_weights
from training.checkpoint import flatten_optimizer, load_checkpoint, save_checkpoint, unflatten_optimizer
from training.cli import build_parser, config_flags, main
from training.config import RECIPES, SCALE_GRID, TrainConfig
from training.demo import imagenet_bundle
from training.export import _retry_after
from training.model import TaskModel, build_model, set_train_mode, train_state
from training.pipeline import pick_trial
from training.report import class_figures, class_table, plot_confusion, plot_curves, write_json
from training.trainer import TrialResult, _balance

AGREED_FLAGS = (  # docs/CORE_API.md "Agreed interfaces": the service's integration test relies on them
    "--data", "--task", "--store", "--backbone", "--checkpoint", "--method", "--epochs", "--max-steps",
    "--batch-size", "--lr", "--weight-decay", "--hidden", "--groups", "--scale", "--search-scale", "--dropout",
    "--drop-path", "--placement", "--image-size", "--n-train", "--n-val", "--n-test", "--seed", "--out-dir",
    "--resume", "--overwrite", "--register", "--token", "--device", "--amp", "--balance", "--class-mix",
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
    ({"class_mix": (5.0, 0.0)}, "at least two"),
    ({"class_mix": (5.0, -1.0, 2.0)}, ">= 0"),
    ({"balance": "oversample"}, "none"),
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


def test_command_line_reproduces_the_config_without_the_token():
    cfg = TrainConfig(data="mnist", task="digits", register="http://h:1", token="s3cret", search_scale=True,
                      scale_grid=(0.1, 2.0), class_mix=(5.0, 1.0), balance="loss", out_dir=Path("/tmp/a b"))
    command = cfg.command_line(resume=True)
    assert "s3cret" not in command
    argv = shlex.split(command)
    assert argv[:3] == ["python", "-m", "training"]
    assert argv[3:] == ["--data", "mnist", "--task", "digits", "--search-scale", "--scale-grid", "0.1,2",
                        "--balance", "loss", "--class-mix", "5,1", "--out-dir", "/tmp/a b", "--resume",
                        "--register", "http://h:1"]
    parser = argparse.ArgumentParser()
    source = config_flags(parser)
    again = TrainConfig(**source(parsed_args=parser.parse_args(argv[3:]))())
    assert again == cfg.model_copy(update={"resume": True, "token": None})  # the same run, token aside


def _parse(argv: list[str], model: type[TrainConfig] = TrainConfig) -> TrainConfig:
    """The configuration ``python -m training`` builds from ``argv`` (its parser, any TrainConfig subclass)."""
    from pydantic_settings import CliSettingsSource

    parser = argparse.ArgumentParser()
    source = config_flags(parser) if model is TrainConfig else CliSettingsSource(
        model, root_parser=parser, cli_kebab_case=True, cli_implicit_flags=True, cli_hide_none_type=True)
    return model(**source(parsed_args=parser.parse_args(argv))())


def test_command_line_parses_back_to_every_field():
    """Every field away from its default (None over a default, tuples, bools, the --register alias, a negative
    number, an exact float) survives the printed command; a new field must join this list."""
    changed = dict(recipe="tuned", data="-odd dir", task="t-1", store="s3://b/p", backbone="vit_tiny_patch16_224",
                   checkpoint=Path("/w/b.safetensors"), method="repadapter", epochs=3, max_steps=7, warmup_epochs=0.5,
                   warmup_lr=1e-9, min_lr=0.0, batch_size=16, lr=0.00123456789, weight_decay=0.05, hidden=4, groups=4,
                   scale=0.3, search_scale=True, scale_grid=(0.25, 3.0), balance="sampler", class_mix=(5.0, 0.0, 1.5),
                   label_smoothing=0.1, dropout=0.0, drop_path=0.2, placement="attn", image_size=96, n_train=None,
                   n_val=10, n_test=None, seed=-1, out_dir=Path("/tmp/run dir"), resume=True, overwrite=True, register_url="http://h:1/x",
                   device="cpu", amp="bf16", workers=2)
    assert set(TrainConfig.model_fields) - set(changed) == {"token"}
    cfg = TrainConfig(**changed, token="s3cret")
    at_default = [k for k, f in TrainConfig.model_fields.items() if k in changed and getattr(cfg, k) == f.default]
    assert at_default == ["method"]  # --search-scale needs method repadapter
    argv = shlex.split(cfg.command_line())
    assert "s3cret" not in argv
    assert {"--n-train", "null", "--seed=-1", "--data=-odd dir", "--register", "--resume", "--overwrite"} <= set(argv)
    assert _parse(argv[3:]) == cfg.model_copy(update={"token": None})
    plain = TrainConfig(data="mnist", task="t")
    assert shlex.split(plain.command_line()) == ["python", "-m", "training", "--data", "mnist", "--task", "t"]
    assert _parse(shlex.split(cfg.command_line(resume=False, n_train=800))[3:]) == cfg.model_copy(
        update={"token": None, "resume": False, "n_train": 800})  # back at the default: left out


def test_recipe_presets_fill_what_the_flags_do_not_give():
    """``--recipe tuned`` sets its values under the explicit flags; the printed command keeps a flag that puts a
    recipe value back at the field default (it would parse back to the recipe's value without it)."""
    tuned = TrainConfig(data="mnist", task="t", recipe="tuned")
    assert {k: getattr(tuned, k) for k in RECIPES["tuned"]} == RECIPES["tuned"]
    assert TrainConfig(data="mnist", task="t", recipe="paper") == TrainConfig(data="mnist", task="t")
    mine = TrainConfig(data="mnist", task="t", recipe="tuned", lr=1e-3)
    assert mine.lr == 1e-3
    assert mine.hidden == RECIPES["tuned"]["hidden"]
    argv = shlex.split(mine.command_line())
    assert argv[3:] == ["--recipe", "tuned", "--data", "mnist", "--task", "t", "--lr", "0.001"]
    assert _parse(argv[3:]) == mine
    assert shlex.split(tuned.command_line())[3:] == ["--recipe", "tuned", "--data", "mnist", "--task", "t"]
    with pytest.raises(ValidationError, match="recipe"):
        TrainConfig(data="mnist", task="t", recipe="best")


def test_command_line_writes_a_bool_that_defaults_to_true_as_no_flag():
    from pydantic import Field

    class WithVerify(TrainConfig):
        verify: bool = Field(True, description="a flag on by default")

    cfg = WithVerify(data="mnist", task="t", verify=False, resume=True)
    argv = shlex.split(cfg.command_line())
    assert argv[3:] == ["--data", "mnist", "--task", "t", "--resume", "--no-verify"]
    assert _parse(argv[3:], WithVerify) == cfg
    assert "verify" not in WithVerify(data="mnist", task="t").command_line()


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


# --- class balance -----------------------------------------------------------------------------------


def test_class_weights_are_sklearns_balanced_weights():
    labels = torch.tensor([0, 0, 0, 1, 3, 3])  # class 2 absent
    weights = class_weights(labels, 4)
    torch.testing.assert_close(weights, torch.tensor([6 / (3 * 3), 6 / (3 * 1), 0.0, 6 / (3 * 2)]))
    assert (weights[labels].sum() / len(labels)).item() == pytest.approx(1.0)  # mean weight per image: 1
    torch.testing.assert_close(class_weights(torch.tensor([0, 1, 2, 0, 1, 2]), 3), torch.ones(3))


def _imbalanced(n0: int = 90, n1: int = 10) -> TensorDataset:
    return TensorDataset(torch.zeros(n0 + n1, 2), torch.tensor([0] * n0 + [1] * n1))


@pytest.mark.parametrize("balance", ["none", "loss", "sampler"])
def test_balance_sets_loss_weights_or_sampler_weights(balance):
    cfg = TrainConfig(data="mnist", task="digits", balance=balance)
    loss_weights, sample_weights = _balance(cfg, _imbalanced(), num_classes=2)
    if balance == "loss":
        torch.testing.assert_close(loss_weights, torch.tensor([100 / (2 * 90), 100 / (2 * 10)]))
        assert sample_weights is None
    elif balance == "sampler":
        assert loss_weights is None
        assert sample_weights.shape == (100,)
        torch.testing.assert_close(sample_weights[:90].sum(), sample_weights[90:].sum())  # each class half the draws
    else:
        assert loss_weights is None
        assert sample_weights is None


def test_weighted_sampler_draws_classes_equally_and_shards_like_one_process():
    labels = _imbalanced().tensors[1]
    weights = class_weights(labels, 2)[labels]
    single = ShardedBatchSampler(100, 20, seed=1, weights=weights)
    ranks = [ShardedBatchSampler(100, 20, seed=1, rank=r, world_size=2, weights=weights) for r in range(2)]
    drawn = []
    for epoch in range(20):
        for s in (single, *ranks):
            s.set_epoch(epoch)
        whole = list(single)
        assert [len(b) for b in whole] == [20] * 5  # an epoch is still N draws
        for batch, (a, b) in zip(whole, zip(*ranks, strict=True), strict=True):
            assert sorted(a + b) == sorted(batch)  # the same global draws, cut into shares
        drawn += [i for b in whole for i in b]
    share = (labels[torch.tensor(drawn)] == 1).float().mean().item()
    assert share == pytest.approx(0.5, abs=0.05)  # 10% of the data, half of the draws (2,000 draws)
    with pytest.raises(ValueError, match="sampling weights"):
        ShardedBatchSampler(100, 20, seed=1, weights=weights[:50])


def test_evaluation_passes_show_progress_and_log_their_duration(capsys, caplog):
    loader = torch.utils.data.DataLoader(TensorDataset(torch.zeros(10, 2), torch.zeros(10)), batch_size=4)
    with caplog.at_level(logging.INFO, logger="training.batches"):
        assert len(list(batches(loader, "test (served bundle)", enabled=True))) == 3
        assert len(list(batches(loader, "quiet", enabled=False, level=logging.DEBUG))) == 3
    bar = capsys.readouterr().err
    assert "test (served bundle)" in bar
    assert "0/3 [" in bar  # a bar over the 3 batches (cleared when done: leave=False)
    assert "quiet" not in bar
    (line,) = [r.getMessage() for r in caplog.records]
    assert re.fullmatch(r"test \(served bundle\): 10 images in \d+\.\d s", line)


# --- trial choice -------------------------------------------------------------------------------------


def _trial(scale: float, predicted: list[int], true: list[int], correct: list[int]) -> TrialResult:
    """A finished trial with these validation counts per class (its accuracy follows from them)."""
    from training.trainer import EpochStats

    stats = EpochStats(1, 1, 1e-3, 1.0, 0.5, 1.0, sum(correct) / sum(true), 1.0, 0.1, 10.0)
    return TrialResult(scale, [stats], 1, 0, {}, predicted, true, correct)


def test_a_collapsed_trial_is_named_and_never_picked(caplog):
    truth = [60, 30, 10]
    collapsed = _trial(10.0, [100, 0, 0], truth, [60, 0, 0])  # everything is class 0: 60% accuracy, the best
    nearly = _trial(5.0, [98, 2, 0], truth, [60, 2, 0])  # 98% class 0, and 38 of the 40 others (95%): collapsed
    leaning = _trial(2.0, [97, 3, 0], truth, [60, 3, 0])  # 97% class 0 but only 37 of 40 others (92.5%)
    healthy = _trial(1.0, [50, 35, 15], truth, [45, 28, 8])
    assert collapsed.collapse == (0, 1.0)
    assert nearly.collapse == (0, 0.98)
    assert leaning.collapse is None
    assert healthy.collapse is None
    with caplog.at_level(logging.WARNING, logger="training.pipeline"):
        assert pick_trial([collapsed, nearly, healthy], ["a", "b", "c"]) is healthy
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2
    assert warnings[0] == ("scale=10 collapsed: it predicts 'a' for 100.0% of the 100 validation images (60.0% of "
                           "them are 'a') and for 100.0% of the others, val_accuracy=0.6000; never picked")
    assert "scale=5 collapsed: it predicts 'a' for 98.0% of the 100 validation images (60.0% of them are 'a') " \
           "and for 95.0% of the others" in warnings[1]
    with pytest.raises(ValueError, match=r"every --search-scale trial \(10, 5\) collapsed"):
        pick_trial([collapsed, nearly], ["a", "b", "c"])
    assert pick_trial([collapsed], ["a", "b", "c"]) is collapsed  # a lone run: kept, with the warning


def test_a_good_model_of_a_skewed_split_is_not_collapsed(caplog):
    """Class 0 is 97% of the validation images: a good model predicts it for ~97% of them too, but it finds most
    of the other 3%; the collapsed one finds none (and wins on plain accuracy)."""
    truth = [970, 30]
    good = _trial(1.0, [955, 45], truth, [945, 20])  # 95.5% class 0; 20 of the 30 others found; accuracy 0.965
    collapsed = _trial(10.0, [1000, 0], truth, [970, 0])  # accuracy 0.970
    blind = _trial(5.0, [999, 1], truth, [970, 1])  # finds 1 of the 30 others: 29/30 = 96.7% called class 0
    assert good.collapse is None
    assert good.others_called(0) == pytest.approx(10 / 30)
    assert collapsed.collapse == (0, 1.0)
    assert blind.collapse == (0, 0.999)
    assert min(collapsed.val_accuracy, blind.val_accuracy) > good.val_accuracy  # what accuracy alone would pick
    with caplog.at_level(logging.WARNING, logger="training.pipeline"):
        assert pick_trial([collapsed, blind, good], ["a", "b"]) is good
    assert len(caplog.records) == 2
    assert "(97.0% of them are 'a') and for 96.7% of the others" in caplog.records[1].getMessage()
    assert pick_trial([good], ["a", "b"]) is good  # the lone skewed run: no warning either
    assert len(caplog.records) == 2
    only = _trial(1.0, [50, 0], [50, 0], [50, 0])  # one class only: nothing tells a collapse, none flagged
    assert only.collapse is None


def test_trainer_records_the_counts_that_tell_a_skewed_split_from_a_collapse(tmp_path):
    """A real (tiny, linear) training run on a 95/5 validation split: it learns the minority class, so its
    final model predicts class 0 for 95% of the images and is not collapsed (the old share-only rule said it was)."""
    from training.device import DeviceContext
    from training.trainer import Trainer

    def points(n0: int, n1: int, seed: int) -> TensorDataset:
        g = torch.Generator().manual_seed(seed)
        y = torch.tensor([0] * n0 + [1] * n1)
        x = torch.where(y[:, None] == 0, torch.tensor([3.0, -3.0]), torch.tensor([-3.0, 3.0]))
        return TensorDataset(x + 0.3 * torch.randn(len(y), 2, generator=g), y)

    cfg = TrainConfig(data="x", task="t", method="linear", epochs=4, batch_size=8, lr=0.1, warmup_epochs=0)
    trainer = Trainer(cfg, DeviceContext(torch.device("cpu")), TaskModel(None, 2, 2), points(16, 16, 0),
                      points(38, 2, 1), 1.0, tmp_path / "ckpt.safetensors")
    trial = trainer.fit()
    assert trial.val_true == [38, 2]
    assert trial.val_predicted == [38, 2]
    assert trial.val_correct == [38, 2]
    assert trial.val_accuracy == 1.0
    assert trial.collapse is None  # 95% class 0, as the split is
    assert pick_trial([trial, _trial(2.0, [40, 0], [38, 2], [38, 0])], ["a", "b"]) is trial


def test_best_trial_is_the_first_of_equals():
    trials = [_trial(0.1, [5, 5], [5, 5], [2, 3]), _trial(1.0, [6, 4], [5, 5], [4, 3]),
              _trial(10.0, [4, 6], [5, 5], [3, 4])]
    assert pick_trial(trials, ["a", "b"]).scale == 1.0


# --- registration -------------------------------------------------------------------------------------


def test_retry_after_reads_seconds_and_dates_and_is_capped():
    from datetime import UTC, datetime, timedelta
    from email.utils import format_datetime

    import httpx

    def wait(value: str | None) -> float:
        return _retry_after(httpx.Response(503, headers={} if value is None else {"Retry-After": value}))

    assert wait("2") == 2.0
    assert wait(None) == 1.0
    assert wait("junk") == 1.0
    assert wait("3600") == 30.0  # bounded
    assert wait("-5") == 0.0
    assert wait(format_datetime(datetime.now(UTC) + timedelta(seconds=10), usegmt=True)) == pytest.approx(10, abs=1.5)


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


def test_class_figures_on_known_predictions():
    labels = [0, 0, 0, 1, 1, 2]
    predicted = [0, 0, 1, 1, 0, 0]
    f = class_figures(labels, predicted, ["a", "b", "c"])
    assert f["confusion_matrix"] == [[2, 1, 0], [1, 1, 0], [1, 0, 0]]  # rows: true class, columns: predicted
    assert f["accuracy"] == pytest.approx(3 / 6)
    assert f["macro_accuracy"] == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)
    assert f["per_class"] == [
        {"label": "a", "precision": pytest.approx(2 / 4), "recall": pytest.approx(2 / 3), "support": 3},
        {"label": "b", "precision": pytest.approx(1 / 2), "recall": pytest.approx(1 / 2), "support": 2},
        {"label": "c", "precision": 0.0, "recall": 0.0, "support": 1},  # never predicted: 0, no warning
    ]
    majority = class_figures([0] * 57 + [1] * 11 + [2] * 4 + [3] * 28, [0] * 100, ["a", "b", "c", "d"])
    assert (majority["accuracy"], majority["macro_accuracy"]) == (pytest.approx(0.57), pytest.approx(0.25))
    absent = class_figures([0, 0, 1], [0, 1, 1], ["a", "b", "c"])  # class c not in the split: not averaged
    assert absent["macro_accuracy"] == pytest.approx((1 / 2 + 1) / 2)
    assert absent["per_class"][2]["support"] == 0
    table = class_table(f).splitlines()
    assert table[0].split() == ["class", "precision", "recall", "support"]
    assert table[1].split() == ["a", "0.500", "0.667", "3"]
    assert table[-1].split() == ["macro", "acc.", "0.389"]


def test_confusion_plot_is_a_png(tmp_path):
    f = class_figures([0, 0, 1, 2, 2, 2], [0, 1, 1, 2, 2, 0], ["T-shirt/top", "Trouser", "Pullover"])
    plot_confusion(tmp_path / "confusion.png", f, "t")
    png = (tmp_path / "confusion.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(png) > 10_000


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
