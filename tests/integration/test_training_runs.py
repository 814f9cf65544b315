"""Real training runs on real data (MNIST digits, embedded pretrained MobileNetV2), CPU-sized.

Each run is small (200 train / 50 val images at 64 px, a few epochs) but real: the loss must fall,
accuracy must be far above chance (10%), and the served (merged) bundle must predict exactly what the
training-time (unmerged) model predicted.
"""

from __future__ import annotations

import argparse
import email.parser
import email.policy
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from repadapter import (
    AdapterConfig,
    BackboneRef,
    LocalStore,
    Manifest,
    PreprocessConfig,
    TaskBundle,
    WeightSwitcher,
    attach_slots,
    load_backbone,
)
from repadapter.errors import CheckpointError
from repadapter.preprocess import preprocess_batch
from training.checkpoint import CHECKPOINT_FILE, load_checkpoint
from training.cli import config_flags, main
from training.config import RECIPES, TrainConfig
from training.data import FASHION_MNIST_DIR, load_dataset
from training.export import Hints, RegisterError, check_registration, publish, register
from training.pipeline import run

ROOT = Path(__file__).resolve().parents[2]
REGISTER_TOKEN = "t0ken-for-the-training-test"
TINY: dict[str, Any] = {"data": "mnist", "n_train": 200, "n_val": 50, "n_test": 100, "image_size": 64, "epochs": 5,
                        "batch_size": 32, "lr": 3e-3}
"""The CI run: 35 optimizer steps, ~15 s on 2 CPU cores."""
MICRO: dict[str, Any] = {"data": "mnist", "n_train": 64, "n_val": 32, "n_test": 0, "image_size": 32, "epochs": 3,
                         "batch_size": 32}
"""For mechanics (resume, search, interrupts): 2 steps an epoch at 32 px."""


def config(tmp: Path, task: str, base: dict[str, Any] = TINY, **kw: Any) -> TrainConfig:
    return TrainConfig(**{**base, "task": task, "store": tmp / "store", "out_dir": tmp / "runs" / task, **kw})


def parsed(argv: list[str]) -> TrainConfig:
    """The configuration ``python -m training`` builds from ``argv``."""
    parser = argparse.ArgumentParser()
    source = config_flags(parser)
    return TrainConfig(**source(parsed_args=parser.parse_args(argv))())


def cli_args(cfg: TrainConfig) -> list[str]:
    """The command line equivalent of ``cfg`` (flags for every non-default field)."""
    args = []
    for name, value in cfg.model_dump(exclude_defaults=True).items():
        flag = "--" + name.replace("_", "-")
        args += [flag] if value is True else [flag, str(value)]
    return args


def served_accuracy(bundle: TaskBundle, images: list[Image.Image], labels: list[int]) -> float:
    """Accuracy of a stored bundle the way the service runs it, on a freshly loaded backbone."""
    backbone = load_backbone()
    sites = attach_slots(backbone.model)
    bundle.check_compatible(backbone.arch, backbone.fingerprint, sites, backbone.num_features)
    switcher = WeightSwitcher(sites)
    switcher.activate(switcher.prepare(bundle.name, bundle.adapters) if bundle.adapters else None)
    with torch.no_grad():
        x = preprocess_batch(images, bundle.manifest.preprocess)  # the service's preprocessing
        logits = F.linear(backbone.model(x), bundle.head_weight, bundle.head_bias)
    return (logits.argmax(1) == torch.tensor(labels)).float().mean().item()


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """One intra-op thread: on a shared 2-core machine, OpenMP spin-waiting makes 2 threads 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("training")


@pytest.fixture(scope="module")
def adapter_run(tmp: Path) -> dict[str, Any]:
    report = run(config(tmp, "digits"))
    assert report is not None
    return report


@pytest.fixture(scope="module")
def linear_run(tmp: Path) -> dict[str, Any]:
    report = run(config(tmp, "digits-linear", method="linear"))
    assert report is not None
    return report


# --- quality of the three methods ---------------------------------------------------------------------


def test_repadapter_learns_and_its_bundle_serves_exactly(adapter_run, tmp):
    m, history = adapter_run["metrics"], adapter_run["history"]
    assert len(history) == m["epochs"] == 5
    assert m["steps"] == 35
    assert history[-1]["train_loss"] < 0.6 * history[0]["train_loss"]
    assert m["val_accuracy"] >= 0.6  # chance: 0.1
    assert m["test_accuracy"] >= 0.6
    assert m["merged_argmax_agreement"] == 1.0
    assert m["merged_max_abs_logit_diff"] < 1e-3
    assert m["trainable_params"] == 121_234
    assert m["peak_memory_mib"] > 100
    assert m["peak_memory_kind"] == "cpu_peak_rss"
    assert m["seconds_per_epoch"] > 0
    assert Path(adapter_run["plot"]).read_bytes()[:4] == b"\x89PNG"
    assert Path(adapter_run["confusion_plot"]).read_bytes()[:4] == b"\x89PNG"
    assert Path(adapter_run["confusion_plot"]).parent == Path(adapter_run["plot"]).parent
    stored = json.loads(Path(adapter_run["report"]).read_text())
    assert stored["metrics"] == m
    assert stored["evaluation"] == adapter_run["evaluation"]
    for split, n in (("val", 50), ("test", 100)):
        figures = adapter_run["evaluation"][split]
        cm = torch.tensor(figures["confusion_matrix"])  # [true 10, predicted 10]
        assert cm.shape == (10, 10)
        assert cm.sum().item() == n
        assert [row["support"] for row in figures["per_class"]] == cm.sum(1).tolist()
        recall = cm.diag() / cm.sum(1)
        assert figures["macro_accuracy"] == pytest.approx(recall.mean().item())
        assert m[f"{split}_macro_accuracy"] == figures["macro_accuracy"]
        assert m[f"{split}_accuracy"] == pytest.approx(cm.diag().sum().item() / n)
        assert [row["label"] for row in figures["per_class"]] == [str(d) for d in range(10)]

    bundle = LocalStore(tmp / "store").get("digits")
    assert adapter_run["bundle"] == {"store": str(tmp / "store"), "name": "digits", "version": 1}
    manifest = bundle.manifest
    assert (manifest.method, manifest.labels, manifest.metrics) == ("repadapter", [str(d) for d in range(10)], m)
    assert manifest.metrics["val_macro_accuracy"] > 0.5  # what GET /tasks/{name} shows a client
    assert manifest.metrics["test_macro_accuracy"] > 0.5
    assert manifest.preprocess == load_backbone().preprocess.with_size(64)
    assert (manifest.adapter.hidden, manifest.adapter.groups, manifest.adapter.scale) == (8, 2, 1.0)
    assert len(bundle.adapters) == 33
    val = load_dataset("mnist", seed=42, n_train=200, n_val=50, n_test=100).val
    images, labels = zip(*(val[i] for i in range(len(val))), strict=True)
    assert abs(served_accuracy(bundle, list(images), list(labels)) - m["val_accuracy"]) <= 1 / 50


def test_linear_probe_trains_the_head_only(linear_run, tmp):
    m = linear_run["metrics"]
    assert m["trainable_params"] == 1280 * 10 + 10
    assert m["val_accuracy"] >= 0.5
    assert m["merged_argmax_agreement"] == 1.0
    assert m["feature_seconds"] > 0
    assert linear_run["history"][-1]["train_loss"] < 0.6 * linear_run["history"][0]["train_loss"]
    bundle = LocalStore(tmp / "store").get("digits-linear")
    assert (bundle.manifest.method, bundle.adapters, bundle.manifest.adapter.hidden) == ("linear", {}, 0)


def test_full_finetuning_reports_figures_but_no_bundle(tmp):
    report = run(config(tmp, "digits-full", MICRO, method="full", epochs=2))
    m = report["metrics"]
    assert m["trainable_params"] == 2_223_872 + 12_810  # every backbone parameter + the head
    assert "merged_argmax_agreement" not in m
    assert m["peak_memory_mib"] > 100
    assert report["bundle"] is None
    assert "digits-full" not in [e.name for e in LocalStore(tmp / "store").list()]


# --- resuming and interruptions -----------------------------------------------------------------------


def test_interrupted_run_resumes_exactly(tmp_path):
    straight = run(config(tmp_path, "straight", MICRO))
    final = load_checkpoint(tmp_path / "runs/straight" / CHECKPOINT_FILE)[0]

    cfg = config(tmp_path, "resumed", MICRO)

    def interrupt(stats: Any) -> None:
        if stats.epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(cfg, on_epoch_end=interrupt)
    assert [e.name for e in LocalStore(tmp_path / "store").list()] == ["straight"]  # no half task
    assert not list((tmp_path / "store/.tmp").iterdir())
    _, meta = load_checkpoint(cfg.run_dir / CHECKPOINT_FILE)
    assert (meta["epoch"], meta["step"], meta["finished"]) == (2, 4, False)
    assert [h["val_accuracy"] for h in meta["history"]] == [h["val_accuracy"] for h in straight["history"][:2]]

    with pytest.raises(CheckpointError, match="other settings"):  # a changed recipe must not resume
        run(cfg.model_copy(update={"resume": True, "lr": 5e-3}))

    resumed = run(cfg.model_copy(update={"resume": True}))
    tensors = load_checkpoint(cfg.run_dir / CHECKPOINT_FILE)[0]
    assert tensors.keys() == final.keys()
    for name, t in final.items():  # bitwise: data order, dropout and drop-path are seeded per epoch
        assert torch.equal(tensors[name], t), name
    keys = ("train_loss", "val_loss", "val_accuracy", "lr", "step")
    assert [[h[k] for k in keys] for h in resumed["history"]] == [[h[k] for k in keys] for h in straight["history"]]
    assert resumed["metrics"]["val_accuracy"] == straight["metrics"]["val_accuracy"]


def test_ctrl_c_exits_130_and_leaves_the_store_untouched(tmp_path):
    cfg = config(tmp_path, "sigint", MICRO, epochs=200)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "training", *cli_args(cfg)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ckpt = cfg.run_dir / CHECKPOINT_FILE
    deadline = time.monotonic() + 300  # generous: CI machines can be slow and shared
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ckpt.exists(), proc.stderr.read() if proc.poll() is not None else "no checkpoint in 300 s"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 130, err
    assert "--resume" in err
    assert out == ""  # no summary for a run that did not finish
    assert not (tmp_path / "store/sigint").exists()
    _, meta = load_checkpoint(ckpt)
    assert meta["epoch"] >= 1
    assert meta["finished"] is False


def test_scale_search_keeps_the_best_scale(tmp_path):
    report = run(config(tmp_path, "search", MICRO, epochs=2, search_scale=True, scale_grid=(0.1, 10.0)))
    m, search = report["metrics"], report["scale_search"]
    assert [t["scale"] for t in search] == [0.1, 10.0]
    best = max(search, key=lambda t: t["val_accuracy"])
    assert m["scale"] == best["scale"]
    assert m["val_accuracy"] == best["val_accuracy"]  # the reloaded best state, re-evaluated
    assert m["merged_argmax_agreement"] == 1.0
    assert m["scale_search"] == search
    assert (tmp_path / "runs/search/scale-0.1" / CHECKPOINT_FILE).exists()
    assert (tmp_path / "runs/search/scale-10" / CHECKPOINT_FILE).exists()
    bundle = LocalStore(tmp_path / "store").get("search")
    assert bundle.manifest.adapter.scale == best["scale"]
    assert {w.scale for w in bundle.adapters.values()} == {best["scale"]}


@pytest.mark.parametrize("balance", ["loss", "sampler"])
def test_balanced_training_on_an_imbalanced_mix_serves_exactly(tmp_path, balance, caplog):
    cfg = config(tmp_path, f"mix-{balance}", MICRO, epochs=2, n_test=40, class_mix=(57, 11, 4, 27), balance=balance)
    with caplog.at_level("INFO", logger="training.trainer"):
        report = run(cfg)
    m = report["metrics"]
    assert m["balance"] == balance
    assert m["merged_argmax_agreement"] == 1.0  # the served bundle is the trained model, balance or not
    assert m["merged_max_abs_logit_diff"] < 1e-3
    assert [row["support"] for row in report["evaluation"]["val"]["per_class"]] == [18, 4, 1, 9]  # 32 at the mix
    weights = next(r.getMessage() for r in caplog.records if r.getMessage().startswith(f"balance={balance}"))
    assert "class_counts=[37, 7, 2, 18] class_weights=[0.432, 2.286, 8.0, 0.889]" in weights  # 64 / (4 x count)
    bundle = LocalStore(tmp_path / "store").get(f"mix-{balance}")
    assert bundle.manifest.labels == ["0", "1", "2", "3"]
    assert bundle.manifest.metrics["balance"] == balance


def test_tuned_recipe_and_label_smoothing_serve_exactly(tmp_path):
    """The recipe options change training, never what is served: the bundle still predicts what trained."""
    smooth = run(config(tmp_path, "smooth", MICRO, epochs=1, recipe="tuned", label_smoothing=0.2, n_test=40))
    plain = run(config(tmp_path, "plain", MICRO, epochs=1, recipe="tuned", n_test=40))
    for report in (smooth, plain):
        assert report["metrics"]["merged_argmax_agreement"] == 1.0
        assert report["metrics"]["merged_max_abs_logit_diff"] < 1e-3
        assert {k: report["config"][k] for k in RECIPES["tuned"]} == RECIPES["tuned"]
    assert smooth["config"]["label_smoothing"] == 0.2
    # same seed, same batches: only the smoothed targets differ, so does the training loss
    assert smooth["history"][0]["train_loss"] != pytest.approx(plain["history"][0]["train_loss"], abs=1e-4)
    bundle = LocalStore(tmp_path / "store").get("smooth")
    assert bundle.manifest.adapter.hidden == RECIPES["tuned"].get("hidden", 8)
    assert bundle.manifest.adapter.scale == RECIPES["tuned"].get("scale", 1.0)


# --- torchrun -----------------------------------------------------------------------------------------


@pytest.mark.timeout(420)
def test_torchrun_two_processes_match_one(adapter_run, tmp_path):
    cfg = config(tmp_path, "digits")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "training", *cli_args(cfg), "--no-progress"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)  # printed once, by rank 0
    m, single = summary["metrics"], adapter_run["metrics"]
    assert m["world_size"] == 2
    assert (m["steps"], m["epochs"], m["trainable_params"]) == (single["steps"], single["epochs"],
                                                                single["trainable_params"])
    assert m["val_accuracy"] >= 0.6
    assert abs(m["val_accuracy"] - single["val_accuracy"]) <= 0.2
    assert m["merged_argmax_agreement"] == 1.0
    ddp_bundle = LocalStore(tmp_path / "store").get("digits")
    single_bundle = LocalStore(adapter_run["bundle"]["store"]).get("digits")
    assert {k: v.shape for k, v in ddp_bundle.tensors().items()} == {
        k: v.shape for k, v in single_bundle.tensors().items()}


# --- data sources, registration, demo -----------------------------------------------------------------


class _Service(BaseHTTPRequestHandler):
    """A stand-in for the service's task API: ``GET /healthz``, ``GET /tasks/{name}`` (known once registered)
    and ``POST /tasks`` (no body: 422, as the service answers an accepted token; a bundle: parsed, recorded,
    answered ``status``). ``queued`` statuses are answered first to any request, with ``Retry-After: 1``.
    With ``token`` set, ``POST /tasks`` answers 401 without a bearer token and 403 with another one; every
    request's ``Authorization`` header is kept in ``auths``."""

    received: ClassVar[list[dict[str, Any]]] = []
    requests: ClassVar[list[str]] = []
    auths: ClassVar[list[str | None]] = []
    status: ClassVar[int] = 201
    queued: ClassVar[list[int]] = []
    token: ClassVar[str | None] = None

    def _reply(self, status: int, body: dict[str, Any]) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        if status in (429, 503):
            self.send_header("Retry-After", "1")
        self.end_headers()
        self.wfile.write(json.dumps(body).encode())

    def do_GET(self) -> None:
        self.requests.append(f"GET {self.path}")
        self.auths.append(self.headers.get("Authorization"))
        name = self.path.removeprefix("/tasks/")
        if self.queued:
            self._reply(self.queued.pop(0), {"error": "not_ready", "detail": "later"})
        elif self.path == "/healthz":
            self._reply(200, {"status": "ok"})
        elif any(r["name"] == name and r["status"] == 201 for r in self.received):
            self._reply(200, {"name": name, "version": 7})
        else:
            self._reply(404, {"error": "task_not_found", "detail": f"no task {name!r}"})

    def do_POST(self) -> None:
        self.requests.append(f"POST {self.path}")
        self.auths.append(self.headers.get("Authorization"))
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.queued:
            return self._reply(self.queued.pop(0), {"error": "queue_full", "detail": "later"})
        if self.token and self.headers.get("Authorization") != f"Bearer {self.token}":
            missing = self.headers.get("Authorization") is None
            return self._reply(401 if missing else 403, {"error": "unauthorized", "detail": "admin token"})
        if not body:
            return self._reply(422, {"error": "malformed_request", "detail": "got none"})
        header = f"Content-Type: {self.headers['Content-Type']}\r\n\r\n".encode()
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(header + body)
        parts = {p.get_param("name", header="content-disposition"): p.get_payload(decode=True)
                 for p in message.iter_parts()}
        manifest = json.loads(parts["manifest"]) | {"version": 7}
        self.received.append({"path": self.path, "auth": self.headers.get("Authorization"), "parts": parts,
                              "name": manifest["name"], "status": self.status})
        return self._reply(self.status, manifest if self.status == 201 else {"error": "failed", "detail": "no"})

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def service() -> Iterator[tuple[str, type[_Service]]]:
    _Service.received, _Service.requests, _Service.auths, _Service.status, _Service.queued = [], [], [], 201, []
    _Service.token = None
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Service)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", _Service
    server.shutdown()


@pytest.fixture(scope="module")
def folder(tmp: Path) -> Path:
    """An ImageFolder tree of real MNIST digits (3 classes, PNG files), without a val/ folder."""
    pool = load_dataset("mnist", seed=0, n_train=90, n_val=10, n_test=0).train
    root = tmp / "folder"
    for i in range(len(pool)):
        image, label = pool[i]
        if label < 3:
            path = root / "train" / ["zero", "one", "two"][label] / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            image.convert("L").save(path)
    return root


def test_cli_trains_on_a_folder_and_registers_with_a_service(folder, service, tmp_path, capsys):
    url, recorder = service
    argv = ["--data", str(folder), "--task", "zot", "--method", "linear", "--image-size", "64", "--epochs", "5",
            "--batch-size", "8", "--lr", "3e-3", "--out-dir", str(tmp_path / "run"), "--store", str(tmp_path / "s"),
            "--register", url, "--token", "s3cret", "--no-progress"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["bundle"] == {"registered": url, "name": "zot", "version": 7}
    assert summary["metrics"]["val_accuracy"] >= 0.6  # chance: 1/3
    n_images = len(list(folder.rglob("*.png")))
    assert summary["metrics"]["n_val"] == round(0.2 * n_images)  # no val/: 20% carved out of train/
    assert summary["metrics"]["n_train"] == n_images - summary["metrics"]["n_val"]
    (request,) = recorder.received
    assert request["path"] == "/tasks?overwrite=false"
    assert request["auth"] == "Bearer s3cret"
    bundle = TaskBundle.deserialize(request["parts"]["manifest"], request["parts"]["tensors"])  # checks sha256
    assert bundle.manifest.labels == ["one", "two", "zero"]
    assert bundle.manifest.metrics["merged_argmax_agreement"] == 1.0
    assert not (tmp_path / "s" / "zot").exists()  # registered, not stored

    assert main([*argv, "--resume"]) == 1  # registered now: refused before training, without --overwrite
    assert len(recorder.received) == 1


def test_registration_waits_for_retry_after(service):
    url, recorder = service
    recorder.queued = [503, 429]
    start = time.monotonic()
    check_registration(url, "s3cret", "free", overwrite=False)
    assert time.monotonic() - start >= 1.9  # two answers of Retry-After: 1
    assert recorder.requests == ["GET /healthz"] * 3 + ["POST /tasks", "GET /tasks/free"]
    recorder.queued = [503] * 5
    with pytest.raises(RegisterError, match="GET /healthz answered 503"):  # bounded: 5 tries, then the answer
        check_registration(url, "s3cret", "free", overwrite=False)
    assert recorder.requests.count("GET /healthz") == 3 + 5


def _probe_bundle(name: str) -> TaskBundle:
    """A tiny linear bundle: what the service does with it does not matter to the stand-in."""
    manifest = Manifest(name=name, labels=["a", "b"], method="linear", adapter=AdapterConfig(hidden=0),
                        backbone=BackboneRef(arch="x", fingerprint="f"), preprocess=PreprocessConfig())
    return TaskBundle(manifest, {}, torch.zeros(2, 4), torch.zeros(2))


def test_registration_errors_name_how_the_caller_gives_url_and_token(service):
    """The training CLI's flags by default; ``repserve tasks register`` / ``import-official --url`` pass theirs."""
    url, recorder = service
    recorder.token = "right"
    client = Hints(url="--url", token="$REPSERVE_TOKEN or $REPSERVE_ADMIN_TOKEN")
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        nowhere = f"http://127.0.0.1:{s.getsockname()[1]}"
    for token, words in ((None, "needs an admin token to register tasks: pass"),
                         ("wrong", "refused the admin token (admin token): check")):
        with pytest.raises(RegisterError) as default:
            register(_probe_bundle("p"), url, token)
        assert f"{words} --token, $REPSERVE_TOKEN or $REPSERVE_ADMIN_TOKEN" in str(default.value)
        with pytest.raises(RegisterError) as theirs:
            publish(_probe_bundle("p"), store="unused", register_url=url, token=token, hints=client)
        assert f"{words} $REPSERVE_TOKEN or $REPSERVE_ADMIN_TOKEN" in str(theirs.value)
        assert "--token" not in str(theirs.value)
        with pytest.raises(RegisterError, match=r"check \$REPSERVE_TOKEN|pass \$REPSERVE_TOKEN"):
            check_registration(url, token, "p", overwrite=False, hints=client)
    with pytest.raises(RegisterError, match="check --register and that the server is running"):
        register(_probe_bundle("p"), nowhere, "right")
    with pytest.raises(RegisterError, match="check --url and that the server is running") as unreachable:
        register(_probe_bundle("p"), nowhere, "right", hints=client)
    assert "--register" not in str(unreachable.value)
    assert register(_probe_bundle("p"), url, "right", hints=client)["version"] == 7
    assert recorder.received[-1]["auth"] == "Bearer right"


def test_register_reads_repserve_token_then_the_admin_token(service, monkeypatch, caplog):
    """``--register`` without ``--token`` (``repserve train --register``): $REPSERVE_TOKEN, else
    $REPSERVE_ADMIN_TOKEN. The task exists, so each run stops after the token check, before any data."""
    url, recorder = service
    recorder.token = "client"
    recorder.received.append({"name": "taken", "status": 201})  # GET /tasks/taken: 200
    argv = ["--data", "digits", "--task", "taken", "--method", "linear", "--register", url, "--no-progress"]
    monkeypatch.setenv("REPSERVE_TOKEN", "client")
    monkeypatch.setenv("REPSERVE_ADMIN_TOKEN", "admin")
    assert main(argv, prog="repserve train") == 1
    assert "already registered" in caplog.text  # the token passed the POST /tasks check
    assert set(recorder.auths) == {"Bearer client"}
    monkeypatch.delenv("REPSERVE_TOKEN")
    recorder.token, recorder.auths = "admin", []
    assert main(argv, prog="repserve train") == 1
    assert set(recorder.auths) == {"Bearer admin"}
    recorder.auths = []
    assert main([*argv, "--token", "flag"], prog="repserve train") == 1  # the flag wins
    assert set(recorder.auths) == {"Bearer flag"}
    assert "refused the admin token" in caplog.text


def test_publish_failure_exits_3_and_its_resume_command_publishes(folder, service, tmp_path, caplog, capsys):
    """Training succeeds, the service refuses the bundle: exit 3, the checkpoint kept, and the command printed
    publishes it without training again."""
    url, recorder = service
    recorder.status = 500
    run_dir = tmp_path / "run"
    argv = ["--data", str(folder), "--task", "late", "--method", "linear", "--image-size", "32", "--epochs", "2",
            "--batch-size", "8", "--n-test", "0", "--out-dir", str(run_dir), "--register", url, "--token", "s3cret"]
    assert main([*argv, "--no-progress"]) == 3
    (message,) = [r.getMessage() for r in caplog.records if "training succeeded" in r.getMessage()]
    assert "answered 500" in message
    assert str(run_dir / CHECKPOINT_FILE) in message
    assert "s3cret" not in message
    command = shlex.split(message.splitlines()[-1])
    assert command[:3] == ["python", "-m", "training"]
    assert parsed(command[3:]) == parsed([*argv[:-2], "--resume"])  # this run's flags (token aside) + --resume
    checkpoint = (run_dir / CHECKPOINT_FILE).read_bytes()
    recorder.status = 201
    capsys.readouterr()
    assert main([*command[3:], "--token", "s3cret", "--no-progress"]) == 0
    assert (run_dir / CHECKPOINT_FILE).read_bytes() == checkpoint  # no epoch trained again
    assert json.loads(capsys.readouterr().out)["bundle"] == {"registered": url, "name": "late", "version": 7}
    assert [r["status"] for r in recorder.received] == [500, 201]


def test_register_with_a_real_service(start_server, tmp_path, capsys, caplog, monkeypatch):
    """--register against the real service process: 201; then, before any training, an existing name without
    --overwrite, no token, a wrong token and an unreachable server are refused, each naming its flag."""
    monkeypatch.delenv("REPSERVE_ADMIN_TOKEN", raising=False)
    monkeypatch.delenv("REPSERVE_TOKEN", raising=False)
    server = start_server(tmp_path / "served", "--admin-token", REGISTER_TOKEN, "--store-poll-s", "0",
                          "--torch-threads", "1", "--log-level", "warning")
    argv = ["--data", "digits", "--task", "reg", "--method", "linear", "--image-size", "48", "--n-train", "100",
            "--n-val", "50", "--n-test", "0", "--epochs", "3", "--batch-size", "25", "--out-dir", str(tmp_path / "run"),
            "--register", server.url, "--token", REGISTER_TOKEN, "--no-progress"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["bundle"] == {"registered": server.url, "name": "reg", "version": 1}
    auth = {"Authorization": f"Bearer {REGISTER_TOKEN}"}
    info = httpx.get(f"{server.url}/tasks/reg", headers=auth, timeout=30).json()
    assert (info["version"], info["method"], info["num_labels"]) == (1, "linear", 10)
    assert info["metrics"]["val_accuracy"] == summary["metrics"]["val_accuracy"]
    refused = tmp_path / "refused"
    untokened = [a for a in argv if a != REGISTER_TOKEN and a != "--token"]
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        nowhere = f"http://127.0.0.1:{s.getsockname()[1]}"
    for args, flag in (
        ([*argv, "--out-dir", str(refused)], "--overwrite"),  # the task exists
        ([*untokened, "--out-dir", str(refused), "--overwrite"], "--token"),  # no token: 401
        ([*untokened, "--out-dir", str(refused), "--overwrite", "--token", "wrong-" + REGISTER_TOKEN], "--token"),
        ([*argv, "--out-dir", str(refused), "--overwrite", "--register", nowhere], "--register"),
    ):
        caplog.clear()
        start = time.monotonic()
        assert main(args) == 1
        assert time.monotonic() - start < 20  # before the data, the backbone or any epoch
        assert not refused.exists()  # no run directory, no checkpoint
        (failure,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("training failed")]
        assert flag in failure, failure
        assert "overwrite=true" not in failure
    resume = [*argv, "--resume"]  # the finished checkpoint: publish again without retraining
    assert main(resume) == 1  # 409: the task exists
    assert main([*resume, "--overwrite", "--token", "wrong"]) == 1  # refused token
    assert main([*resume, "--overwrite"]) == 0
    assert json.loads(capsys.readouterr().out)["bundle"]["version"] == 2


@pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(), reason="dataset-fashion-mnist is not installed")
def test_demo_rebuilds_the_three_shipped_tasks(tmp_path, photos, capsys):
    store = tmp_path / "store"
    argv = ["--demo", "--store", str(store), "--out-dir", str(tmp_path / "runs"), "--max-steps", "2",
            "--n-train", "40", "--n-val", "20", "--n-test", "20", "--image-size", "32", "--batch-size", "20",
            "--no-progress"]
    assert main(argv) == 0
    summaries = json.loads(capsys.readouterr().out)
    assert [s["task"] for s in summaries] == ["imagenet", "fashion", "digits"]
    assert [e.name for e in LocalStore(store).list()] == ["digits", "fashion", "imagenet"]
    imagenet = LocalStore(store).get("imagenet")
    assert (imagenet.manifest.method, imagenet.adapters, len(imagenet.manifest.labels)) == ("pretrained", {}, 1000)
    assert imagenet.manifest.preprocess.input_size == (3, 224, 224)
    chelsea = photos[0]
    backbone = load_backbone()
    with torch.no_grad():
        logits = F.linear(backbone.model(preprocess_batch([chelsea], imagenet.manifest.preprocess)),
                          imagenet.head_weight, imagenet.head_bias)
    assert imagenet.manifest.labels[logits.argmax().item()] == "Egyptian cat"
    fashion = LocalStore(store).manifest("fashion")
    assert (fashion.labels[0], fashion.preprocess.input_size, fashion.metrics["steps"]) == ("T-shirt/top",
                                                                                            (3, 32, 32), 2)
    assert (tmp_path / "runs/digits/report.json").exists()
    assert main(argv) == 1  # the tasks exist now: refused before any training, without --overwrite
