"""The ``repserve`` command line: help and usage, the client commands against a real server process on
loopback (one for the module), and ``import-official`` on a checkpoint laid out as the official code saves it."""

from __future__ import annotations

import io
import json
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torchvision import transforms

from bench.servers import ServerProcess, free_port
from repadapter import AdapterConfig, BackboneRef, LocalStore, Manifest, TaskBundle, attach_slots, load_backbone
from repadapter.official import OFFICIAL_ARCHS, inspect_official, read_labels
from repserve.cli import main
from repserve.client import token_from_env
from tests.conftest import random_adapters
from tests.servicekit import TINY_ARCH, TINY_OPTIONS, Model, assert_predictions, encode
from tests.unit.test_bundle import official_state_dict

ADMIN_TOKEN = "admin-t0ken-for-the-cli-test"
READ_TOKEN = "read-t0ken-for-the-cli-test"
TOKEN_VARIABLES = ("REPSERVE_TOKEN", "REPSERVE_ADMIN_TOKEN", "REPSERVE_CLASSIFY_TOKEN", "REPSERVE_URL")


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch) -> None:
    """No token or URL from the developer's shell reaches a test."""
    for name in TOKEN_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    """``repserve argv`` in this process: exit code (argparse's SystemExit included), stdout, stderr."""
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


# --- help and usage -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("command", "examples"), [
    ([], True), (["serve"], False), (["train"], True), (["classify"], True), (["tasks"], True),
    (["tasks", "list"], False), (["tasks", "show"], False), (["tasks", "register"], False),
    (["tasks", "delete"], False), (["import-official"], True),
])
def test_every_command_has_help(capsys, command, examples):
    rc, out, _ = run(capsys, *command, "--help")
    assert rc == 0
    assert out.startswith(f"usage: {' '.join(['repserve', *command])}")
    assert ("examples:" in out) is examples


def test_top_level_help_documents_exit_codes_and_environment(capsys):
    rc, out, _ = run(capsys, "--help")
    assert rc == 0
    for text in ("exit codes:", "3    train only: trained but not published", "REPSERVE_URL", "REPSERVE_TOKEN",
                 *("serve", "train", "classify", "tasks", "import-official", "bench")):
        assert text in out, text


def test_train_exits_3_when_trained_but_not_published(tmp_path, capsys, caplog, monkeypatch):
    """The pipeline raises PublishError after a successful training: its message is logged as is, exit 3."""
    import training.cli
    from training.export import PublishError

    message = "trained and kept in runs/x; publishing failed (503): publish with --resume --register URL"

    def publish_fails(config: object, progress: bool) -> None:
        raise PublishError(message)

    monkeypatch.setattr(training.cli, "run", publish_fails)
    rc, out, _ = run(capsys, "train", "--data", "mnist", "--task", "x", "--store", tmp_path, "--no-progress")
    assert (rc, out) == (3, "")
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == [message]


def test_server_flags_without_a_command_start_the_server_as_before(capsys):
    """`repserve --port 8000` was the server's console script: flags first still go to `serve`."""
    from service.settings import settings_table

    assert run(capsys, "--print-config-table")[:2] == (0, settings_table())
    assert run(capsys, "--check-config", "--max-batch", "8")[:2] == (0, "configuration valid\n")


def test_bench_help_runs_python_m_bench(capfd):
    """A child process (bench/ is not installed): its help arrives on the inherited stdout."""
    assert main(["bench", "--help"]) == 0
    out = capfd.readouterr().out
    assert out.startswith("usage: python -m bench")
    assert "Run every benchmark, each in its own process, then rebuild BENCHMARKS.md." in out
    assert "--quick" in out


@pytest.mark.parametrize(("argv", "says"), [
    (["classify", "x.png"], "repserve classify: error: the following arguments are required: --task"),
    (["tasks"], "repserve tasks: error: the following arguments are required: ACTION"),
    (["tasks", "delete", "x", "--version", "two"], "argument --version: invalid int value: 'two'"),
    (["import-official", "c.pt", "--scale", "1", "--task", "t", "--placement", "mlp"],
     "argument --placement: invalid choice: 'mlp'"),
    (["import-official", "c.pt", "--scale", "1", "--task", "t", "--store", "s", "--url", "http://x"],
     "argument --url: not allowed with argument --store"),
    (["import-official", "c.pt", "--scale", "1", "--task", "t", "--backbone-options", "[1]"],
     "argument --backbone-options: a JSON object is needed, e.g. '{\"img_size\": 384}'; got '[1]'"),
    (["import-official", "c.pt", "--scale", "1", "--task", "t", "--backbone-options", "{img_size: 1}"],
     "argument --backbone-options: not JSON (Expecting property name enclosed in double quotes"),
    (["no-such-command"], "argument COMMAND: invalid choice: 'no-such-command'"),
    (["serve", "--max-batch", "0"], "--max-batch: Input should be greater than or equal to 1"),  # the server's
])
def test_bad_usage_exits_2(capsys, argv, says):
    rc, out, err = run(capsys, *argv)
    assert (rc, out) == (2, "")
    assert says in err


@pytest.mark.parametrize(("missing", "argv"), [
    ("pydantic_settings", ["--help"]),  # service.settings (the client's variables) needs it
    ("pydantic_settings", ["tasks", "list"]),
    ("httpx", ["tasks", "list", "--url", "http://127.0.0.1:9"]),
])
def test_a_missing_optional_dependency_is_one_line_naming_the_extra(capsys, monkeypatch, missing, argv):
    """A core-only install: pydantic-settings and httpx come with the serve extra."""
    import sys

    monkeypatch.setitem(sys.modules, missing, None)  # `import missing` raises ImportError
    monkeypatch.delitem(sys.modules, "service.settings")  # imported again on use, and fails
    rc, out, err = run(capsys, *argv)
    assert (rc, out) == (1, "")
    command = "repserve" if missing == "pydantic_settings" else "repserve tasks list"  # before parsing: no command
    assert err == f"{command}: needs the 'serve' extra ({missing} is missing): pip install 'repserve[serve]'\n"


def test_import_official_stores_where_the_server_looks(monkeypatch):
    from repserve.importer import default_store
    from service.settings import Settings

    monkeypatch.delenv("REPSERVE_STORE", raising=False)
    assert default_store() == Settings().store == "adapters_store"
    monkeypatch.setenv("REPSERVE_STORE", "/srv/tasks")
    assert default_store() == Settings().store == "/srv/tasks"


@pytest.fixture
def foreign_server() -> Iterator[str]:
    """Something that is not RepServe on --url: JSON of another shape on /tasks and /tasks/x, HTML elsewhere."""
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body, kind = {"/tasks": (b'{"items": []}', "application/json"),
                          "/tasks/x": (b'{"name": "x"}', "application/json"),
                          "/tasks/list": (b'[1, 2]', "application/json")}.get(self.path, (b"<html>hi</html>",
                                                                                          "text/html"))
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.mark.parametrize(("argv", "says"), [
    (["tasks", "list"], "repserve tasks list: GET {url}/tasks: not a RepServe task list (is {url} a RepServe server?)"),
    (["tasks", "show", "x"], "repserve tasks show: not a RepServe task (KeyError: 'adapter'); is --url a RepServe "
                             "server?"),
    (["tasks", "show", "list"], "repserve tasks show: GET {url}/tasks/list: not a RepServe task (is {url} a "
                                "RepServe server?)"),
    (["tasks", "show", "html"], "repserve tasks show: GET {url}/tasks/html: 200, but not a RepServe answer "
                                "(text/html); is --url a RepServe server?"),
])
def test_an_answer_not_from_repserve_is_one_line(foreign_server, capsys, argv, says):
    rc, out, err = run(capsys, *argv, "--url", foreign_server)
    assert (rc, out) == (1, "")
    assert err == says.format(url=foreign_server) + "\n"


def test_server_down_fails_fast_with_one_line(capsys):
    start = time.monotonic()
    rc, out, err = run(capsys, "tasks", "list", "--url", f"http://127.0.0.1:{free_port()}")
    assert (rc, out) == (1, "")
    assert time.monotonic() - start < 5
    assert err.count("\n") == 1
    assert "cannot connect to http://127.0.0.1" in err


def test_token_comes_from_the_environment_by_role():
    env = {"REPSERVE_ADMIN_TOKEN": "a", "REPSERVE_CLASSIFY_TOKEN": "c"}
    assert (token_from_env(admin=True, environ=env), token_from_env(admin=False, environ=env)) == ("a", "c")
    assert token_from_env(admin=False, environ={"REPSERVE_ADMIN_TOKEN": "a"}) == "a"  # admin may read
    assert token_from_env(admin=True, environ={**env, "REPSERVE_TOKEN": "t"}) == "t"
    assert token_from_env(admin=True, environ={"REPSERVE_CLASSIFY_TOKEN": "c"}) is None


# --- a real server ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[str]:
    """The embedded backbone on an empty store (the backbone's own ``imagenet`` task), tokens on both roles."""
    root = tmp_path_factory.mktemp("cli-server")
    proc = ServerProcess("service", "service", [
        "--store", str(root / "store"), "--store-poll-s", "0", "--torch-threads", "1", "--no-warmup",
        "--log-level", "warning", "--admin-token", ADMIN_TOKEN, "--classify-token", READ_TOKEN], root / "server.log")
    try:
        proc.wait_ready(180)
        yield proc.url
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def chelsea(tmp_path_factory, photos) -> Path:
    path = tmp_path_factory.mktemp("images") / "chelsea.png"
    photos[0].save(path)
    return path


@pytest.mark.slow
def test_classify_prints_a_table_or_json(server, chelsea, capsys, monkeypatch):
    monkeypatch.setenv("REPSERVE_CLASSIFY_TOKEN", READ_TOKEN)  # the server's own variable works as a fallback
    rc, out, _ = run(capsys, "classify", chelsea, "--task", "imagenet", "--url", server, "--top-k", "3")
    assert rc == 0
    lines = out.splitlines()
    assert lines[0].split() == ["image", "rank", "label", "score"]
    assert lines[1].startswith("chelsea.png")
    assert "Egyptian cat" in lines[1]
    assert len(lines) == 5
    assert lines[-1].startswith("task imagenet version")
    monkeypatch.setenv("REPSERVE_URL", server)  # the URL from the environment too
    rc, out, _ = run(capsys, "classify", chelsea, chelsea, "--task", "imagenet", "--json")
    body = json.loads(out)
    assert rc == 0
    assert [r["predictions"][0]["label"] for r in body["results"]] == ["Egyptian cat"] * 2
    assert body["results"][0]["predictions"][0]["score"] == pytest.approx(0.72, abs=0.05)


@pytest.mark.slow
def test_failures_exit_1_with_the_servers_detail(server, chelsea, capsys, monkeypatch):
    rc, out, err = run(capsys, "classify", chelsea, "--task", "imagenet", "--url", server)
    assert (rc, out) == (1, "")
    assert err.startswith("repserve classify: POST /classify: 401 unauthorized: ")
    assert err.count("\n") == 1
    monkeypatch.setenv("REPSERVE_TOKEN", "wrong-token-of-enough-length")
    rc, _, err = run(capsys, "tasks", "list", "--url", server)
    assert rc == 1
    assert "403" in err
    assert "wrong-token" not in err
    monkeypatch.setenv("REPSERVE_TOKEN", READ_TOKEN)
    rc, out, err = run(capsys, "classify", chelsea, "--task", "nope", "--url", server)
    assert (rc, out) == (1, "")
    assert "404 task_not_found" in err
    assert "nope" in err
    assert err.count("\n") == 1
    rc, _, err = run(capsys, "classify", chelsea.with_name("missing.png"), "--task", "imagenet", "--url", server)
    assert rc == 1
    assert "cannot read" in err
    assert "missing.png" in err


def _bundle_dir(root: Path, name: str) -> Path:
    """A bundle for the embedded backbone as a folder (manifest.json + adapter.safetensors)."""
    backbone = load_backbone()
    sites = attach_slots(backbone.model)
    g = torch.Generator().manual_seed(3)
    manifest = Manifest(name=name, labels=["a", "b", "c"], adapter=AdapterConfig(hidden=8, groups=2, scale=1.0),
                        backbone=BackboneRef(arch=backbone.arch, fingerprint=backbone.fingerprint),
                        preprocess=backbone.preprocess)
    bundle = TaskBundle(manifest, random_adapters(sites, 3, std=0.01),
                        torch.randn(3, backbone.num_features, generator=g) * 0.01, torch.zeros(3))
    folder = root / name
    folder.mkdir()
    manifest_bytes, tensors = bundle.serialize()
    (folder / "manifest.json").write_bytes(manifest_bytes)
    (folder / "adapter.safetensors").write_bytes(tensors)
    return folder


@pytest.mark.slow
def test_tasks_register_show_list_delete_round_trip(server, tmp_path, capsys, monkeypatch):
    folder = _bundle_dir(tmp_path, "cli-task")
    monkeypatch.setenv("REPSERVE_URL", server)
    rc, _, err = run(capsys, "tasks", "register", folder)  # no admin token: the hint names repserve's variables
    assert (rc, err.count("\n")) == (1, 1)
    assert err.endswith("needs an admin token to register tasks: pass $REPSERVE_TOKEN or $REPSERVE_ADMIN_TOKEN\n")
    monkeypatch.setenv("REPSERVE_ADMIN_TOKEN", ADMIN_TOKEN)  # the server's variable: admin and reads
    rc, out, _ = run(capsys, "tasks", "register", folder, "--json")
    assert rc == 0
    assert (json.loads(out)["name"], json.loads(out)["version"]) == ("cli-task", 1)
    rc, _, err = run(capsys, "tasks", "register", folder)
    assert err.startswith("repserve tasks register: task 'cli-task' is already registered")
    assert rc == 1
    assert "--overwrite" in err
    assert err.count("\n") == 1
    archive = tmp_path / "cli-task.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in folder.iterdir():
            zf.write(f, f"cli-task/{f.name}")
    rc, out, _ = run(capsys, "tasks", "register", archive, "--overwrite")
    assert (rc, out.strip()) == (0, f"registered cli-task version 2 at {server}")
    rc, out, _ = run(capsys, "tasks", "show", "cli-task", "--json")
    shown = json.loads(out)
    assert (rc, shown["version"], shown["labels"], shown["adapter"]["hidden"]) == (0, 2, ["a", "b", "c"], 8)
    rc, out, _ = run(capsys, "tasks", "list")
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:]}
    assert rc == 0
    assert set(rows) == {"imagenet", "cli-task"}
    assert rows["cli-task"][1] == "2"
    rc, _, err = run(capsys, "tasks", "delete", "cli-task", "--version", "1")  # checked by the server
    assert (rc, err) == (1, "repserve tasks delete: DELETE /tasks/cli-task: 409 version_mismatch: task 'cli-task' is "
                            "at version 2, not 1 (replaced since you looked?): nothing changed\n")
    assert run(capsys, "tasks", "show", "cli-task", "--json")[0] == 0  # still served
    assert run(capsys, "tasks", "delete", "cli-task", "--version", "2")[:2] == (0, "deleted cli-task\n")
    rc, _, err = run(capsys, "tasks", "show", "cli-task")
    assert rc == 1
    assert "404 task_not_found" in err
    rc, _, err = run(capsys, "tasks", "delete", "cli-task", "--version", "2")
    assert (rc, err.count("\n")) == (1, 1)
    assert "DELETE /tasks/cli-task: 404 task_not_found" in err


@pytest.mark.slow
def test_tasks_register_takes_a_store_version_folder(server, tmp_path, capsys, monkeypatch):
    """The layout of the help's example (adapters_store/fashion/v000001): a copy of the shipped demo task."""
    import shutil

    shipped = Path(__file__).resolve().parents[2] / "adapters_store" / "fashion" / "v000001"
    folder = shutil.copytree(shipped, tmp_path / "adapters_store" / "fashion" / "v000001")
    monkeypatch.setenv("REPSERVE_URL", server)
    monkeypatch.setenv("REPSERVE_ADMIN_TOKEN", ADMIN_TOKEN)
    rc, out, err = run(capsys, "tasks", "register", folder)
    assert (rc, out, err) == (0, f"registered fashion version 1 at {server}\n", "")
    rc, out, _ = run(capsys, "tasks", "show", "fashion", "--json")
    assert (rc, json.loads(out)["labels"]) == (0, json.loads((shipped / "manifest.json").read_text())["labels"])
    assert run(capsys, "tasks", "delete", "fashion", "--version", "1")[0] == 0


# --- import-official ----------------------------------------------------------------------------------


def test_inspect_reads_what_the_keys_tell():
    """A ViT-B/16 checkpoint with attention adapters only: shape read without building any model."""
    sd = {}
    for i in range(12):
        sd[f"blocks.{i}.adapter_attn.conv_A.weight"] = torch.zeros(8, 768, 1)
        sd[f"blocks.{i}.adapter_attn.conv_B.weight"] = torch.zeros(768, 2, 1)
    sd["head.weight"] = torch.zeros(100, 768)
    shape = inspect_official(sd)
    assert (shape.depth, shape.dim, shape.hidden, shape.groups, shape.placement, shape.num_classes) == (
        12, 768, 8, 4, "attn", 100)
    assert shape.arch == OFFICIAL_ARCHS[(768, 12)] == "vit_base_patch16_224"
    assert read_labels("cat\n\n dog \n") == ["cat", "dog"]


@torch.no_grad()
def official_forward(state_dict: dict, scale: float, groups: int, images: list[Image.Image]) -> torch.Tensor:
    """Softmax of the official model on ``images``: its transform (``Resize((size, size), bicubic)``, ``ToTensor``,
    ``Normalize`` with ImageNet's mean/std), its adapters as Conv1d modules on the inputs of ``attn`` and ``mlp``
    (``attn(adapter_attn(norm1(x)))``), the branch ``conv_B(conv_A(x)) * scale + x`` on ``[B, C, N]``."""
    size = TINY_OPTIONS["img_size"]
    transform = transforms.Compose([transforms.Resize((size, size), interpolation=3), transforms.ToTensor(),
                                    transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])])
    model = load_backbone(TINY_ARCH, **TINY_OPTIONS).model
    for i, block in enumerate(model.blocks):
        for kind, module in (("attn", block.attn), ("mlp", block.mlp)):
            r, d = state_dict[f"blocks.{i}.adapter_{kind}.conv_A.weight"].shape[:2]
            conv_a, conv_b = torch.nn.Conv1d(d, r, 1), torch.nn.Conv1d(r, d, 1, groups=groups)
            for conv, name in ((conv_a, "conv_A"), (conv_b, "conv_B")):
                conv.weight.copy_(state_dict[f"blocks.{i}.adapter_{kind}.{name}.weight"])
                conv.bias.copy_(state_dict[f"blocks.{i}.adapter_{kind}.{name}.bias"])

            def adapter(_: torch.nn.Module, inputs: tuple, conv_a=conv_a, conv_b=conv_b) -> tuple:
                x = inputs[0].transpose(1, 2)
                return ((conv_b(conv_a(x)) * scale + x).transpose(1, 2),)

            module.register_forward_pre_hook(adapter)
    feats = model(torch.stack([transform(image) for image in images]))
    return torch.nn.functional.linear(feats, state_dict["head.weight"], state_dict["head.bias"]).softmax(-1)


@pytest.fixture(scope="module")
def official() -> dict:
    """A checkpoint of the tiny ViT laid out as the official code saves it (adapters and head only)."""
    backbone = load_backbone(TINY_ARCH, **TINY_OPTIONS)
    adapters = random_adapters(attach_slots(backbone.model), seed=4, groups=2, std=0.2)
    return official_state_dict(adapters, classes=3, features=backbone.num_features)


IMPORT = ["--backbone", TINY_ARCH, "--backbone-options", json.dumps(TINY_OPTIONS)]


def test_import_official_serves_what_the_official_model_computes(official, tmp_path, photos, capsys):
    ckpt = tmp_path / "official.pt"
    torch.save(official, ckpt)  # what the official code writes; read back with weights_only=True
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\nbird\n")
    rc, out, err = run(capsys, "import-official", ckpt, "--scale", "0.5", "--task", "offi", "--labels", labels,
                       "--store", tmp_path / "store", "--json", *IMPORT)
    assert rc == 0, err
    result = json.loads(out)
    assert {k: result[k] for k in ("name", "version", "placement", "hidden", "groups", "scale", "classes")} == {
        "name": "offi", "version": 1, "placement": "block", "hidden": 8, "groups": 2, "scale": 0.5, "classes": 3}
    bundle = LocalStore(tmp_path / "store").get("offi")
    assert bundle.manifest.labels == ["cat", "dog", "bird"]
    assert result["checkpoint_sha256"] in bundle.manifest.description
    images = [encode(p, "PNG", (80, 64)) for p in photos]
    expected = official_forward(official, 0.5, 2, [Image.open(io.BytesIO(b)).convert("RGB") for b in images])
    scores, index = expected.topk(3)
    want = [[(bundle.manifest.labels[i], s) for i, s in zip(ri, rs, strict=True)]
            for ri, rs in zip(index.tolist(), scores.tolist(), strict=True)]
    assert_predictions(Model.load(TINY_ARCH, **TINY_OPTIONS).predict(bundle, images, top_k=3), want, tol=1e-5)
    assert len({p[0][0] for p in want}) > 1  # the photos are told apart: a real comparison, not one class
    rc, _, err = run(capsys, "import-official", ckpt, "--scale", "0.5", "--task", "offi", "--store",
                     tmp_path / "store", *IMPORT)
    assert rc == 1
    assert "exists" in err


def _drop_site(sd: dict) -> None:
    for key in [k for k in sd if k.startswith("blocks.2.adapter_mlp.")]:
        del sd[key]


@pytest.mark.parametrize(("edit", "flags", "code", "says"), [
    (_drop_site, [], 1, r"no adapters for 1 of the 6 sites: ['blocks.2.adapter_mlp']"),
    (lambda sd: sd.__setitem__("head.weight", torch.zeros(3, 100)), [], 1, "head takes 100 features"),
    (lambda sd: sd.__setitem__("blocks.0.adapter_attn.conv_A.weight", torch.zeros(8, 100, 1)), [], 1,
     "blocks.0.adapter_attn"),
    (lambda sd: sd.__setitem__("blocks.0.attn.qkv.weight", torch.zeros(1)), [], 1, "unexpected key"),
    (lambda sd: [sd.pop("head.weight"), sd.pop("head.bias")], [], 1, "no head"),
    (lambda sd: None, ["--placement", "attn"], 1, "its placement is 'block'"),
    (lambda sd: None, ["--labels", "three-labels.txt"], 1, "3 classes but 2 labels"),
    (lambda sd: sd.clear(), [], 1, "not a RepAdapter checkpoint"),
])
def test_import_official_refuses_with_a_clear_message(official, tmp_path, capsys, monkeypatch, edit, flags, code,
                                                      says):
    monkeypatch.chdir(tmp_path)
    Path("three-labels.txt").write_text("a\nb\n")
    sd = {k: v.clone() for k, v in official.items()}
    edit(sd)
    save_file(sd, "c.safetensors")
    rc, out, err = run(capsys, "import-official", "c.safetensors", "--scale", "1", "--task", "t", "--store", "s",
                       *IMPORT, *flags)
    assert (rc, out) == (code, "")
    assert says in err
    assert err.count("\n") == 1
    assert not Path("s").exists() or not LocalStore("s").list()  # nothing written


def test_import_official_asks_for_what_the_keys_cannot_tell(official, tmp_path, capsys):
    save_file(official, tmp_path / "c.safetensors")
    rc, _, err = run(capsys, "import-official", tmp_path / "c.safetensors", "--scale", "1", "--task", "t")
    assert rc == 2
    assert "3 blocks of width 192" in err
    assert "--backbone" in err
    rc, _, err = run(capsys, "import-official", tmp_path / "missing.pt", "--scale", "1", "--task", "t")
    assert rc == 1
    assert "does not exist" in err
