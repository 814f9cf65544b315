"""Every benchmark runs at its --quick size and writes a well-formed result, so bench/ cannot rot.

No timing is asserted (CI machines are shared); the assertions are on the result's shape, on every
figure being a positive finite number, on the variants computing the same task, and on the report.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # bench/ is a folder of scripts at the repo root, not an installed package
    sys.path.insert(0, str(ROOT))

from bench import BENCHMARKS, inference, memory, replicas, report, scale, serving, switch, training  # noqa: E402

QUICK = ["--quick", "--threads", "1", "--device", "cpu"]
NGINX = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin")  # bench.replicas routes through it


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    """All benchmarks at their quick size, in-process (one torch import), into one directory."""
    out = tmp_path_factory.mktemp("bench")
    threads = torch.get_num_threads()
    try:
        for module in (inference, switch, memory, serving, scale, *([replicas] if NGINX else []), training):
            module.main([*QUICK, "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    return out


def positive(x: object) -> bool:
    return isinstance(x, int | float) and math.isfinite(x) and x > 0


def read(results: Path, name: str) -> dict:
    payload = json.loads((results / f"{name}.json").read_text())
    assert payload["benchmark"] == name
    assert payload["command"].startswith(f"python -m bench.{name} --quick")
    assert payload["quick"] is True
    assert payload["machine"]["torch_threads"] == 1
    assert {"cpu", "torch", "timm", "device", "usable_cpus"} <= set(payload["machine"])
    assert (results / f"{name}.png").stat().st_size > 1000
    return payload


def test_inference_quick(results):
    res = read(results, "inference")["results"]
    keys = {(r["arch"], r["dtype"], r["batch"]) for r in res["rows"]}
    assert keys == {("embedded", "fp32", 1), ("vit_tiny", "fp32", 1)}
    for arch, dtype, batch in keys:
        variants = {r["variant"]: r for r in res["rows"] if (r["arch"], r["dtype"], r["batch"]) == (arch, dtype, batch)}
        assert set(variants) == set(inference.VARIANTS)
        for r in variants.values():
            assert all(positive(r[k]) for k in ("median_s", "q1_s", "q3_s", "images_per_s", "speed_vs_plain"))
    # the variants compute the same task (fp32): merged == unmerged, mixed row 0 == merged row 0
    for c in res["checks"]:
        assert c["merged_vs_unmerged"] < 1e-4
        assert c["mixed_vs_merged_row0"] < 1e-4
    assert res["goal"]["of"] == 2


def test_switch_quick(results):
    res = read(results, "switch")["results"]
    (row,) = res["rows"]
    assert (row["arch"], row["dtype"]) == ("vit_tiny", "fp32")
    assert set(row["times"]) == set(switch.CASES)
    assert all(positive(t["median_s"]) for t in row["times"].values())
    assert all(positive(v) for v in row["ratios"].values())
    # vit_tiny: 12 blocks x (qkv [576, 192] + fc1 [768, 192]) weights and biases, fp32
    assert row["affected_bytes"] == 12 * (576 * 193 + 768 * 193) * 4
    assert row["targets"] == 24
    (kernels,) = res["kernels"]
    assert all(positive(kernels[k]["median_s"]) and positive(kernels["vs_copy"][k]) for k in switch.KERNELS)


def test_memory_quick(results):
    res = read(results, "memory")["results"]
    assert positive(res["baseline"]["rss_bytes"])
    (arch,) = res["archs"]
    assert arch["arch"] == "vit_tiny"
    assert [r["n"] for r in arch["rows"]] == [1, 10]
    for r in arch["rows"]:
        assert positive(r["repserve_bytes"])
        assert positive(r["copies_bytes"])
        assert positive(r["copies_vs_repserve"])
    # the service's own objects: every task in the host tier (one buffer of the same size each), the device and
    # live tiers within their settings and holding the merged working set
    assert [r["tasks_host"] for r in arch["rows"]] == [1, 10]
    assert arch["rows"][1]["bundle_bytes"] == 10 * arch["rows"][0]["bundle_bytes"]
    for r in arch["rows"]:
        assert 0 < r["device_tier_bytes"] <= 32 << 20
        assert 0 < r["live_tier_bytes"] <= 16 << 20
    assert arch["rows"][1]["copies_extrapolated"]
    assert not arch["rows"][0]["copies_extrapolated"]
    assert all(math.isfinite(v) for v in arch["fit"].values())


def test_serving_quick_answers_every_request(results):
    payload = read(results, "serving")

    res = payload["results"]
    assert res["errors"] == 0
    (arch,) = res["archs"]
    assert (arch["arch"], arch["tasks"], arch["input_size"]) == ("embedded", 2, [3, 96, 96])
    rows = {(r["server"], r["mix"]): r for r in arch["rows"]}
    assert set(rows) == {(s, m) for s in ("auto", serving.BASELINE) for m in serving.MIXES}
    for (server, _mix), r in rows.items():
        assert r["error_codes"] == {}
        assert r["errors"] == 0
        assert r["ok"] == r["sent"] > 0
        assert all(isinstance(r[k], float) and math.isfinite(r[k]) and r[k] > 0
                   for k in ("req_per_s", "images_per_s", "p50_ms", "p95_ms", "p99_ms", "batch_mean"))
        assert r["p50_ms"] <= r["p95_ms"] <= r["p99_ms"]
        assert r["vs_single"] is not None
        assert (r["vs_baseline"] is None) == (server == serving.BASELINE)
        assert (r["switches_per_request"] is None) == (server == serving.BASELINE)  # RepServe's counter only
    assert rows["auto", "single"]["mixed_share"] == 0.0  # one task: never a mixed batch
    assert set(arch["memory"]) == {"auto", serving.BASELINE}
    assert all(m["rss_bytes"] > 0 for m in arch["memory"].values())
    assert set(res["goal"]["auto_zipf_vs_single"]) == {"embedded"}
    assert "| zipf | auto |" in serving.render(payload)


def test_scale_quick_answers_every_request_within_the_budget(results):
    payload = read(results, "scale")
    res = payload["results"]
    assert res["errors"] == 0
    (n30,) = res["per_n"]
    assert (n30["n"], n30["distinct_bundles"]) == (30, 16)
    assert n30["cache_models"] == (64 << 20) // n30["model_bytes"] < 30  # the baseline must evict
    assert sum(n30["tiers"].values()) <= 64 << 20
    rows = {(r["server"], r["mix"]): r for r in n30["rows"]}
    assert set(rows) == {(s, m) for s in (scale.REPSERVE, *scale.BASELINES) for m in scale.MIXES}
    for (server, _mix), r in rows.items():
        assert r["ok"] > 0
        assert all(positive(r[k]) for k in ("req_per_s", "p50_ms", "p99_ms", "rss_bytes"))
        assert r["store_loads_per_request"] is not None
        assert (r["vs_baseline"] is None) == (server != scale.REPSERVE)
    for server in (scale.REPSERVE, *scale.BASELINES):
        cold = n30["cold"][server]
        assert cold["cold"]["n"] == cold["warm"]["n"] == 4
        assert cold["cold"]["load_p50_ms"] > 0  # a cold task is loaded on its first request
        assert positive(n30["startup"][server]["ready_s"])
    assert n30["cold"][scale.REPSERVE]["warm"]["load_p50_ms"] < n30["cold"][scale.REPSERVE]["cold"]["load_p50_ms"]
    assert set(res["goal"]) == {"30/zipf", "30/uniform"}
    assert "| 30 | zipf | repserve |" in scale.render(payload)


@pytest.mark.skipif(not NGINX, reason="nginx is not installed (scripts/bootstrap.sh installs it as root)")
def test_replicas_quick_routes_every_task_to_one_replica_under_hashing(results):
    payload = read(results, "replicas")
    res = payload["results"]
    assert res["errors"] == 0
    rows = {(r["routing"], r["mix"]): r for r in res["rows"]}
    assert set(rows) == {(routing, mix) for routing in replicas.ROUTINGS for mix in replicas.MIXES}
    for (routing, _), r in rows.items():
        assert r["ok"] > 0
        assert all(positive(r[k]) for k in ("req_per_s", "p50_ms", "p99_ms"))
        assert (r["vs_round_robin"] is None) == (routing != replicas.HASH)
        for one in r["per_round"]:
            assert sum(one["replica_requests"]) == one["ok"] == one["sent"]  # the replicas' counters agree
            if routing == replicas.HASH:  # hashing sends each task to exactly one replica
                assert one["tasks_on_several_replicas"] == 0
    # round-robin splits tasks asked more than once (all loads together: a single one may not, by chance)
    assert sum(one["tasks_on_several_replicas"] for (routing, _), r in rows.items() if routing == replicas.ROUND_ROBIN
               for one in r["per_round"]) > 0
    # round-robin spreads requests evenly over the two replicas whatever the task
    assert rows[replicas.ROUND_ROBIN, "uniform"]["max_share"] == pytest.approx(0.5, abs=0.1)
    assert "| zipf | hash |" in replicas.render(payload)


def test_training_quick(results):
    payload = read(results, "training")
    res = payload["results"]
    assert [(r["dataset"], r["config"], r["seed"]) for r in res["rows"]] == [("digits", m, 0) for m in training.METHODS]
    by = {r["method"]: r for r in res["rows"]}
    assert by["repadapter"]["trainable_params"] == 121_234  # 33 adapters (hidden 8, groups 2) + a 10-class head
    assert by["linear"]["trainable_params"] == 1280 * 10 + 10
    assert by["full"]["trainable_params"] > 2_000_000
    assert by["repadapter"]["merged_argmax_agreement"] == 1.0
    assert by["full"]["merged_argmax_agreement"] is None  # full tuning is not servable
    for r in res["rows"]:
        assert 0 <= r["test_macro_accuracy"] <= 1
        assert 0 <= r["test_accuracy"] <= 1
        assert positive(r["seconds_per_epoch"])
        assert positive(r["peak_memory_mib"])
        matrix = r["confusion_matrix"]  # the test split's, 10 classes, every test image counted once
        assert len(matrix) == 10
        assert sum(map(sum, matrix)) == 40
        assert sum(matrix[i][i] for i in range(10)) / 40 == pytest.approx(r["test_accuracy"])
    overall = res["summary"]["overall"]
    assert set(overall) == set(training.METHODS)
    assert overall["full"]["time_vs_full"] == 1.0
    assert overall["repadapter"]["test_accuracy"]["mean"] == by["repadapter"]["test_accuracy"]  # one seed
    vit = {r["method"]: r for r in res["vit"]}
    assert set(vit) == set(training.METHODS)
    assert vit["full"]["trainable_params"] == vit["full"]["total_params"] > vit["repadapter"]["trainable_params"]
    assert vit["linear"]["trainable_params"] == 192 * 10 + 10  # vit_tiny's head alone
    for r in vit.values():
        assert all(positive(r["seconds"][k]) for k in ("forward", "backward", "optimizer", "step"))
    # full tuning holds grads + AdamW moments of every weight: 3 x 4 bytes x its parameters
    assert vit["full"]["grad_and_optimizer_state_mib"] == pytest.approx(12 * vit["full"]["total_params"] / 2**20)
    text = training.render(payload)
    assert "| digits | repadapter |" in text
    assert "One training step on a ViT" in text


def test_training_variants_and_seeds_are_summarised():
    """Two seeds and a variant: per-cell spread over seeds, the dataset mean per seed, ratios to full per seed."""
    def row(config, seed, acc, seconds):
        return {"dataset": "d", "config": config, "seed": seed, "test_accuracy": acc, "test_macro_accuracy": acc / 2,
                "val_accuracy": acc, "seconds_per_epoch": seconds, "peak_memory_mib": 100.0}

    rows = [row("full", 1, 0.8, 10.0), row("full", 2, 0.9, 20.0), row("v", 1, 0.7, 5.0), row("v", 2, 1.0, 20.0)]
    summary = training.summarise(rows, ["full", "v"])
    v = summary["overall"]["v"]
    assert v["test_accuracy"] == {"mean": pytest.approx(0.85), "min": 0.7, "max": 1.0, "n": 2}
    assert v["test_macro_accuracy"]["mean"] == pytest.approx(0.425)
    assert v["time_vs_full"] == pytest.approx(0.75)  # median of 0.5 and 1.0
    assert training.parse_variant("lr3=--lr 3e-3 --scale 5") == ("lr3", ["--lr", "3e-3", "--scale", "5"])
    for bad in ("full=--lr 1", "--lr 1", "=x"):
        with pytest.raises(ValueError, match="--variant"):
            training.parse_variant(bad)


def test_report_is_idempotent(results, tmp_path):
    output = tmp_path / "BENCHMARKS.md"
    args = ["--results", str(results), "--output", str(output)]
    assert report.main(args) == 0
    first = output.read_text()
    assert report.main([*args, "--check"]) == 0
    assert report.main(args) == 0
    assert output.read_text() == first
    ran = [name for name in BENCHMARKS if (results / f"{name}.json").exists()]
    assert set(BENCHMARKS) - set(ran) <= ({"replicas"} if not NGINX else set())
    for name in ran:
        assert f"`python -m bench.{name} --quick" in first
        assert f"{name}.png)" in first
    assert first.count("Not run yet") == len(BENCHMARKS) - len(ran)


def test_report_without_results(tmp_path):
    output = tmp_path / "BENCHMARKS.md"
    assert report.main(["--results", str(tmp_path / "none"), "--output", str(output)]) == 0
    text = output.read_text()
    assert all(f"Not run yet: `python -m bench.{name}`" in text for name in BENCHMARKS)
