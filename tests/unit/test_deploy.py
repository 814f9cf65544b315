"""deploy/: every REPSERVE_* name there is a setting; the rendered Kubernetes manifests and the compose nginx keep
their invariants (task-affine routing, body limits, shutdown timing, no service-account token); and the real
compose nginx.conf sends each task to one replica (run against loopback backends when nginx is installed).

Schema validation of the manifests and hadolint are in scripts/check_deploy.sh (CI step `deploy`).
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from service.settings import ENV_PREFIX, Settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
KUBECTL = shutil.which("kubectl")
NGINX = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.access(p, os.X_OK)), None)

# Time the lifespan's close (inference worker, loader threads) gets after uvicorn's graceful drain.
CLOSE_MARGIN_S = 5
HASH_ANNOTATION = "nginx.ingress.kubernetes.io/upstream-hash-by"
BODY_ANNOTATION = "nginx.ingress.kubernetes.io/proxy-body-size"


# ---- (a) every REPSERVE_* name in deploy/ is a setting ---------------------------------------------------

# `REPSERVE_{HOST,DEVICE,LIVE}_CACHE_BYTES` (shell brace style) names three variables.
_ENV_NAME = re.compile(r"REPSERVE_[A-Z0-9_]*(?:\{[A-Z0-9_,]+\}[A-Z0-9_]*)*")


def _expand_braces(name: str) -> list[str]:
    m = re.search(r"\{([^{}]*)\}", name)
    if m is None:
        return [name]
    return [x for alt in m.group(1).split(",") for x in _expand_braces(name[: m.start()] + alt + name[m.end():])]


def _names_in_deploy() -> dict[str, set[str]]:
    """Every REPSERVE_* variable name written in a text file under deploy/ -> the files naming it. A bare prefix
    (``f"REPSERVE_{name}"`` in code) is not a name."""
    found: dict[str, set[str]] = {}
    for path in sorted(DEPLOY.rglob("*")):
        if not path.is_file() or "__pycache__" in path.parts:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for token in _ENV_NAME.findall(text):
            for name in _expand_braces(token):
                if not name.endswith("_"):
                    found.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    return found


def test_every_repserve_variable_in_deploy_is_a_setting():
    settings = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    found = _names_in_deploy()
    assert {"REPSERVE_STORE", "REPSERVE_MAX_BUNDLE_BYTES"} <= found.keys()  # the scan sees the configs
    unknown = {name: sorted(files) for name, files in found.items() if name not in settings}
    assert not unknown, f"not fields of service.settings.Settings: {unknown}"


def test_brace_names_expand():
    assert _expand_braces("REPSERVE_{HOST,DEVICE}_CACHE_BYTES") == ["REPSERVE_HOST_CACHE_BYTES",
                                                                     "REPSERVE_DEVICE_CACHE_BYTES"]
    assert _ENV_NAME.findall("x REPSERVE_{A,B}_C y f'REPSERVE_{name}'") == ["REPSERVE_{A,B}_C", "REPSERVE_"]


# ---- (b) the rendered Kubernetes manifests -----------------------------------------------------------------

needs_kubectl = pytest.mark.skipif(
    KUBECTL is None, reason="kubectl not on PATH: it renders deploy/k8s (kustomize); CI's machine image has it")

# variant -> (kustomization dir or overlay base, components); components need an overlay of their own.
VARIANTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "default": ("deploy/k8s", ()),
    "s3": ("deploy/k8s/s3", ()),
    "default+monitoring+queue-hpa": ("deploy/k8s", ("deploy/k8s/monitoring", "deploy/k8s/queue-hpa")),
    "s3+monitoring+queue-hpa": ("deploy/k8s/s3", ("deploy/k8s/monitoring", "deploy/k8s/queue-hpa")),
}
SERVING = list(VARIANTS)


def _kustomize(directory: Path) -> list[dict]:
    out = subprocess.run([KUBECTL, "kustomize", str(directory)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"kubectl kustomize {directory} failed:\n{out.stderr}"
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module")
def render(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], list[dict]]:
    cache: dict[str, list[dict]] = {}

    def get(variant: str) -> list[dict]:
        if variant not in cache:
            if variant == "train":
                cache[variant] = _kustomize(K8S / "train")
            else:
                base, components = VARIANTS[variant]
                if not components:
                    cache[variant] = _kustomize(ROOT / base)
                else:  # kustomize refuses absolute paths: the overlay names them relative to itself
                    overlay = tmp_path_factory.mktemp(variant.replace("+", "-"))
                    rel = lambda p: os.path.relpath(ROOT / p, overlay)  # noqa: E731
                    (overlay / "kustomization.yaml").write_text(yaml.safe_dump(
                        {"resources": [rel(base)], "components": [rel(c) for c in components]}))
                    cache[variant] = _kustomize(overlay)
        return cache[variant]

    return get


def _one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _all(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def _config(docs: list[dict]) -> dict[str, str]:
    return _one(docs, "ConfigMap", "repserve-config")["data"]


def _serving_container(docs: list[dict]) -> dict:
    pod = _one(docs, "Deployment", "repserve")["spec"]["template"]["spec"]
    return next(c for c in pod["containers"] if c["name"] == "repserve")


def _size_bytes(text: str) -> int:
    """nginx size syntax (``512m``, ``1g``, ``64k``, bytes) -> bytes."""
    m = re.fullmatch(r"(\d+)([kKmMgG]?)", text.strip())
    assert m, f"not an nginx size: {text!r}"
    return int(m.group(1)) << {"": 0, "k": 10, "m": 20, "g": 30}[m.group(2).lower()]


def _graceful_drain_s(config: dict[str, str]) -> float:
    """How long the service drains in-flight requests after SIGTERM: a setting if it has one (configmap value or
    default), else uvicorn's ``timeout_graceful_shutdown`` as service/__main__.py passes it."""
    for name, field in Settings.model_fields.items():
        if re.search(r"shutdown|drain|graceful", name):
            return float(config.get(ENV_PREFIX + name.upper(), field.default))
    source = (ROOT / "service" / "__main__.py").read_text()
    m = re.search(r"timeout_graceful_shutdown\s*=\s*(\d+(?:\.\d+)?)", source)
    assert m, "service/__main__.py no longer passes a literal timeout_graceful_shutdown: update this test"
    return float(m.group(1))


@needs_kubectl
@pytest.mark.parametrize("variant", SERVING)
def test_grace_period_covers_prestop_and_drain(render, variant):
    docs = render(variant)
    pod = _one(docs, "Deployment", "repserve")["spec"]["template"]["spec"]
    command = _serving_container(docs)["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep", command
    prestop, drain = float(command[1]), _graceful_drain_s(_config(docs))
    assert (prestop, drain) >= (1, 1)
    assert pod["terminationGracePeriodSeconds"] >= prestop + drain + CLOSE_MARGIN_S, (
        f"grace {pod['terminationGracePeriodSeconds']} s < preStop {prestop} + drain {drain} + close {CLOSE_MARGIN_S}")


@needs_kubectl
@pytest.mark.parametrize("variant", SERVING)
def test_ingress_body_limit_is_the_bundle_limit(render, variant):
    docs = render(variant)
    config = _config(docs)
    assert "REPSERVE_MAX_BUNDLE_BYTES" in config, "set the bundle limit explicitly, next to the ingress's"
    limit = int(config["REPSERVE_MAX_BUNDLE_BYTES"])
    ingresses = _all(docs, "Ingress")
    assert ingresses
    for ing in ingresses:
        annotation = ing["metadata"].get("annotations", {}).get(BODY_ANNOTATION)
        assert annotation is not None, f"ingress {ing['metadata']['name']} has no {BODY_ANNOTATION}"
        assert _size_bytes(annotation) == limit, f"{ing['metadata']['name']}: {annotation} != {limit} bytes"


def _routes(docs: list[dict]) -> list[tuple[dict, str, str, str]]:
    """(ingress, path, pathType, service name) for every path of every Ingress."""
    return [(ing, p["path"], p["pathType"], p["backend"]["service"]["name"])
            for ing in _all(docs, "Ingress") for rule in ing["spec"]["rules"] for p in rule["http"]["paths"]]


@needs_kubectl
@pytest.mark.parametrize("variant", SERVING)
def test_classify_is_hashed_on_the_task_parameter(render, variant):
    docs = render(variant)
    routes = _routes(docs)
    classify = [r for r in routes if r[1] == "/classify" or (r[2] == "Prefix" and r[1] in ("/", ""))]
    assert [(r[1], r[2]) for r in classify] == [("/classify", "Exact")]
    ing, _, _, service = classify[0]
    # /classify's path is fixed (its key is `task`); a v2 model's path names its task
    assert ing["metadata"]["annotations"][HASH_ANNOTATION] == "$arg_task$uri"
    hashed = sorted((path, kind) for i, path, kind, _ in routes if i is ing)
    assert hashed == [("/classify", "Exact"), ("/v2/models", "Prefix")]
    assert {(path, kind) for i, path, kind, _ in routes if i is not ing} >= {
        ("/", "Exact"), ("/static", "Prefix"), ("/v2", "Prefix"), ("/tasks", "Prefix"), ("/docs", "Prefix"),
        ("/openapi.json", "Exact")}
    # ingress-nginx keeps one balancing setting per Service port (the first Ingress wins): no other Ingress may
    # route to the hashed Service (with another setting), and the others (no task) are round-robin.
    others = [r for r in routes if r[0] is not ing]
    assert others, "the management routes (/tasks) are missing"
    for other, path, _, svc in others:
        assert svc != service, f"{other['metadata']['name']} {path} shares the hashed Service {service}"
        assert HASH_ANNOTATION not in other["metadata"].get("annotations", {})
    services = {s["metadata"]["name"]: s for s in _all(docs, "Service")}
    pod_labels = _one(docs, "Deployment", "repserve")["spec"]["template"]["metadata"]["labels"]
    for svc in {service} | {r[3] for r in others}:
        selector = services[svc]["spec"]["selector"]
        assert selector.items() <= pod_labels.items(), f"Service {svc} does not select the serving pods"
    assert "/metrics" not in {r[1] for r in routes}


@needs_kubectl
@pytest.mark.parametrize("variant", [*SERVING, "train"])
def test_no_service_account_token_is_mounted(render, variant):
    docs = render(variant)
    pods = [d["spec"]["template"]["spec"] for d in docs if d["kind"] in ("Deployment", "Job")]
    assert pods
    for pod in pods:
        assert pod.get("automountServiceAccountToken") is False
    for sa in _all(docs, "ServiceAccount"):
        assert sa.get("automountServiceAccountToken") is False
    if variant != "train":
        pod = _one(docs, "Deployment", "repserve")["spec"]["template"]["spec"]
        assert pod["serviceAccountName"] in {sa["metadata"]["name"] for sa in _all(docs, "ServiceAccount")}


@needs_kubectl
@pytest.mark.parametrize("variant", SERVING)
def test_network_policy_admits_only_the_ingress_and_prometheus(render, variant):
    docs = render(variant)
    policy = _one(docs, "NetworkPolicy", "repserve")["spec"]
    pod_labels = _one(docs, "Deployment", "repserve")["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert sorted(policy["policyTypes"]) == ["Egress", "Ingress"]
    (rule,) = policy["ingress"]
    assert [p["port"] for p in rule["ports"]] == [8000]
    assert {peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"] for peer in rule["from"]} == {
        "ingress-nginx", "monitoring"}
    egress_ports = {p["port"] for r in policy["egress"] for p in r["ports"]}
    assert egress_ports == ({53, 443, 9000} if variant.startswith("s3") else {53})


@needs_kubectl
@pytest.mark.parametrize("variant", ["s3", "s3+monitoring+queue-hpa"])
def test_s3_variant_has_no_volume_store(render, variant):
    docs = render(variant)
    config = _config(docs)
    assert config["REPSERVE_STORE"].startswith("s3://")
    assert not _all(docs, "PersistentVolumeClaim")
    pod = _one(docs, "Deployment", "repserve")["spec"]["template"]["spec"]
    assert all("persistentVolumeClaim" not in v for v in pod.get("volumes", []))
    assert not pod.get("initContainers")
    env = {e["name"]: e for e in _serving_container(docs).get("env", [])}
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert env[key]["valueFrom"]["secretKeyRef"]["name"] == "repserve-s3"


@needs_kubectl
@pytest.mark.parametrize("variant", ["default+monitoring+queue-hpa", "s3+monitoring+queue-hpa"])
def test_monitoring_component(render, variant):
    docs = render(variant)
    monitor = _one(docs, "ServiceMonitor", "repserve")
    selected = [s for s in _all(docs, "Service")
                if monitor["spec"]["selector"]["matchLabels"].items() <= s["metadata"].get("labels", {}).items()]
    assert [s["metadata"]["name"] for s in selected] == ["repserve"], "scrape each pod once, through one Service"
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= {p["name"] for p in selected[0]["spec"]["ports"]}
    namespace = _one(docs, "Deployment", "repserve")["metadata"]["namespace"]
    rule = _one(docs, "PrometheusRule", "repserve")
    assert monitor["metadata"]["namespace"] == rule["metadata"]["namespace"] == namespace
    alerts = {r["alert"] for g in rule["spec"]["groups"] for r in g["rules"]}
    readme = (DEPLOY / "README.md").read_text()
    table = readme[readme.index("## What to alert on"):]
    assert len(alerts) == len(re.findall(r"^\| `RepServe\w+` \|", table, re.M)) == 8
    for alert in alerts:
        assert f"`{alert}`" in table, f"{alert} is not in deploy/README.md's alert table"
    hpa = _one(docs, "HorizontalPodAutoscaler", "repserve")
    assert {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"} == {
        "repserve_queue_depth"}


@needs_kubectl
def test_train_job_image_is_set_by_kustomize(render):
    (job,) = render("train")
    assert job["kind"] == "Job"
    images = yaml.safe_load((K8S / "train" / "kustomization.yaml").read_text())["images"]
    (entry,) = [i for i in images if i["name"] == "repserve-train"]
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["image"] == f"{entry['newName']}:{entry['newTag']}"
    assert job["metadata"]["namespace"] == "repserve"


# ---- (c) the compose nginx ---------------------------------------------------------------------------------

NGINX_CONF = DEPLOY / "nginx.conf"


def _compose() -> dict:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


def _upstream(conf: str) -> str:
    m = re.search(r"upstream\s+repserve\s*\{(.*?)\}", conf, re.S)
    assert m, "nginx.conf has no `upstream repserve` block"
    return m.group(1)


def _replicas() -> list[str]:
    return sorted(n for n in _compose()["services"] if re.fullmatch(r"repserve-\d+", n))


def test_compose_nginx_hashes_tasks_over_every_replica():
    conf = NGINX_CONF.read_text()
    upstream = _upstream(conf)
    assert re.search(r"^\s*hash\s+\$task_key\s+consistent;", upstream, re.M)
    key = re.search(r"map\s+\$uri\s+\$task_key\s*\{(.*?)\}", conf, re.S)
    assert key, "nginx.conf has no `map $uri $task_key`: the v2 model path's task, else `?task=`"
    assert re.search(r"^\s*default\s+\$arg_task;", key.group(1), re.M)
    servers = re.findall(r"^\s*server\s+([\w.-]+):(\d+)\b([^;]*);", upstream, re.M)
    assert len(_replicas()) >= 2
    assert sorted(name for name, _, _ in servers) == _replicas(), "one upstream server per compose replica"
    assert all(port == "8000" and "resolve" in params.split() for _, port, params in servers)
    assert re.search(r"^\s*resolver\s+127\.0\.0\.11\b", conf, re.M), "resolve needs Docker's DNS resolver"
    assert re.search(r"proxy_pass\s+http://repserve;", conf)
    prometheus = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    targets = [t for job in prometheus["scrape_configs"] for sc in job.get("static_configs", []) for t in sc["targets"]]
    assert sorted(targets) == [f"{r}:8000" for r in _replicas()]


def test_compose_nginx_body_limit_is_the_bundle_limit():
    conf = NGINX_CONF.read_text()
    envs = [svc["environment"] for name, svc in _compose()["services"].items() if name in _replicas()]
    limits = {int(env["REPSERVE_MAX_BUNDLE_BYTES"]) for env in envs}
    assert len(limits) == 1
    (limit,) = limits
    (size,) = re.findall(r"^\s*client_max_body_size\s+(\w+);", conf, re.M)
    assert _size_bytes(size) == limit
    m = re.search(r"location\s+@payload_too_large\s*\{.*?return\s+413\s+'([^']*)'", conf, re.S)
    assert m, "no JSON body for nginx's own 413"
    body = json.loads(m.group(1).replace("\\n", ""))
    assert body["error"] == "payload_too_large"
    assert str(limit) in body["detail"]
    assert re.search(r"error_page\s+413\s+@payload_too_large;", conf)


# ---- the compose nginx.conf, run: each task reaches one replica --------------------------------------------


class _Backend(BaseHTTPRequestHandler):

    def _answer(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = json.dumps({"backend": self.server.name}).encode()  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def backends() -> Iterator[dict[str, ThreadingHTTPServer]]:
    servers: dict[str, ThreadingHTTPServer] = {}
    for name in ("b1", "b2", "b3"):
        server = ThreadingHTTPServer(("127.0.0.1", 0), _Backend)
        server.name = name  # type: ignore[attr-defined]
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers[name] = server
    yield servers
    for server in servers.values():
        server.shutdown()
        server.server_close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _local_conf(conf: str, prefix: Path, port: int, servers: dict[str, int], extra: list[int]) -> str:
    """The real nginx.conf on loopback: each `server repserve-N:8000 ...` line points at a local backend (same
    parameters, less `resolve`, which needs nginx >= 1.27.3), `extra` ports are added as servers (a scale-up),
    nginx runs in the foreground as one process with its files under ``prefix``."""

    def server_line(m: re.Match) -> str:
        params = " ".join(p for p in m.group(3).split() if p != "resolve")
        return f"{m.group(1)}server 127.0.0.1:{servers[m.group(2)]} {params};"

    upstream = _upstream(conf)
    local = re.sub(r"^(\s*)server\s+(repserve-\d+):8000\b([^;]*);", server_line, upstream, flags=re.M)
    local = re.sub(r"^(\s*)(keepalive\b)", "".join(f"\\1server 127.0.0.1:{p};\n" for p in extra) + r"\1\2",
                   local, count=1, flags=re.M)
    conf = conf.replace(upstream, local)
    conf = re.sub(r"^(\s*)listen\s+80;", rf"\1listen 127.0.0.1:{port};", conf, flags=re.M)
    temp = "".join(f"    {kind}_temp_path {prefix}/{kind};\n" for kind in ("client_body", "proxy", "fastcgi",
                                                                               "uwsgi", "scgi"))
    conf = re.sub(r"^http\s*\{\n", lambda m: m.group(0) + temp, conf, count=1, flags=re.M)
    return f"daemon off;\nmaster_process off;\npid {prefix}/nginx.pid;\n" + conf


class _Nginx:
    def __init__(self, conf: str, prefix: Path, port: int) -> None:
        prefix.mkdir()
        (prefix / "nginx.conf").write_text(conf)
        self.port = port
        self.log = prefix / "stderr.log"
        with self.log.open("w") as err:
            self.proc = subprocess.Popen([NGINX, "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-e",
                                          "stderr"], stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + 10
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"nginx exited {self.proc.returncode}: {self.log.read_text()}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                return
            except OSError:
                assert time.monotonic() < deadline, f"nginx did not listen: {self.log.read_text()}"
                time.sleep(0.02)

    def request(self, method: str, path: str, body: bytes = b"", headers: dict | None = None) -> tuple[int, dict]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, json.loads(resp.read() or b"{}")
        finally:
            conn.close()

    def backend(self, task: str) -> str:
        status, body = self.request("POST", f"/classify?task={task}", b"x")
        assert status == 200, body
        return body["backend"]

    def v2_backend(self, task: str, version: str | None = None) -> str:
        """Where an Open Inference Protocol infer of ``task`` goes (with a query that must not matter)."""
        path = f"/v2/models/{task}" + (f"/versions/{version}" if version else "") + "/infer?x=1"
        status, body = self.request("POST", path, b"{}")
        assert status == 200, body
        return body["backend"]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


@pytest.mark.skipif(NGINX is None, reason="nginx not installed (apt-get install nginx): runs deploy/nginx.conf")
def test_compose_nginx_routes_each_task_to_one_replica(backends, tmp_path):
    conf = NGINX_CONF.read_text()
    replicas = _replicas()[:2]
    assert len(replicas) == 2
    servers = {r: backends[b].server_address[1] for r, b in zip(replicas, ("b1", "b2"), strict=True)}
    tasks = [f"task-{i}" for i in range(200)]

    # as configured: two replicas
    port = _free_port()
    nginx = _Nginx(_local_conf(conf, tmp_path / "two", port, servers, []), tmp_path / "two", port)
    try:
        before = {t: nginx.backend(t) for t in tasks}
        assert {t: nginx.backend(t) for t in tasks} == before, "a task changed replica between two requests"
        share = sum(b == "b1" for b in before.values()) / len(tasks)
        assert 0.2 < share < 0.8, f"b1 got {share:.0%} of the tasks"
        # v2 infer: the task from the path, so each task reaches one replica, its /classify's, with or without a
        # version; tasks spread over both
        v2 = {t: nginx.v2_backend(t) for t in tasks}
        assert v2 == before, "a task's v2 infer and its /classify reached different replicas"
        assert {t: nginx.v2_backend(t, "1") for t in tasks[:20]} == {t: before[t] for t in tasks[:20]}
        assert set(v2.values()) == {"b1", "b2"}
        # no task (/tasks, the try-it page, v2 health): round-robin, both replicas
        for path in ("/tasks", "/", "/static/app.js", "/v2/health/ready"):
            assert {nginx.request("GET", path)[1]["backend"] for _ in range(6)} == {"b1", "b2"}, path
        status, body = nginx.request("GET", "/metrics")
        assert (status, body["error"]) == (404, "not_found")
        status, body = nginx.request("POST", "/tasks", headers={"Content-Length": str(600 << 20)})
        assert (status, body["error"]) == (413, "payload_too_large")
    finally:
        nginx.stop()

    # scale-up: a third replica takes over some tasks; no task moves between the two others
    port = _free_port()
    b3 = backends["b3"].server_address[1]
    nginx = _Nginx(_local_conf(conf, tmp_path / "three", port, servers, [b3]), tmp_path / "three", port)
    try:
        after = {t: nginx.backend(t) for t in tasks}
        moved = [t for t in tasks if after[t] != before[t]]
        assert all(after[t] == "b3" for t in moved)
        assert 0.1 < len(moved) / len(tasks) < 0.6, f"{len(moved)} of {len(tasks)} tasks moved"

        # a replica fails: its tasks go to the others, every other task stays where it was
        backends["b1"].shutdown()
        backends["b1"].server_close()
        failed = {t: nginx.backend(t) for t in tasks}
        assert all(failed[t] == after[t] for t in tasks if after[t] != "b1")
        assert {failed[t] for t in tasks if after[t] == "b1"} <= {"b2", "b3"}

        for name in ("b2", "b3"):
            backends[name].shutdown()
            backends[name].server_close()
        status, body = nginx.request("POST", "/classify?task=task-0", b"x")
        assert (status, body["error"]) == (503, "upstream_unavailable")
    finally:
        nginx.stop()
