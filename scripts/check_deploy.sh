#!/usr/bin/env bash
# Checks deploy/ and the Dockerfile (CI step `deploy`; runs alone too):
#   1. renders every kustomization and overlay+component combination under deploy/k8s with kustomize
#      (kubectl kustomize);
#   2. validates every core Kubernetes object with kubernetes-validate --strict at a pinned Kubernetes version
#      (unknown fields fail; a core kind or apiVersion it has no schema for fails too);
#   3. lets through only the Prometheus Operator kinds it knows (ServiceMonitor, PrometheusRule), checks their
#      required fields, and their PromQL with `promtool check rules` when promtool is installed;
#   4. lints the Dockerfile with hadolint.
# Semantic invariants of the rendered manifests (routing, limits, timing) are tests/unit/test_deploy.py.
# Needs: kubectl (kustomize), .venv/bin/kubernetes-validate, .venv/bin/hadolint (dev dependencies).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

K8S_VERSION=${K8S_VERSION:-1.33.0}   # the oldest Kubernetes the manifests promise to work on
PY=.venv/bin/python

fail() { printf 'check_deploy: %s\n' "$*" >&2; exit 1; }
say() { printf '[deploy] %s\n' "$*"; }

command -v kubectl >/dev/null 2>&1 \
    || fail "kubectl not found on PATH: it renders deploy/k8s (kustomize); install kubectl (CI's machine image has it)"
[[ -x .venv/bin/kubernetes-validate ]] \
    || fail ".venv/bin/kubernetes-validate missing: run scripts/bootstrap.sh (dev dependency kubernetes-validate)"
[[ -x .venv/bin/hadolint ]] || fail ".venv/bin/hadolint missing: run scripts/bootstrap.sh (dev dependency)"

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# name|kustomization (or overlay base)|components (comma-separated; they need an overlay of their own)
VARIANTS=(
    "default|deploy/k8s|"
    "s3|deploy/k8s/s3|"
    "train|deploy/k8s/train|"
    "default+monitoring+queue-hpa|deploy/k8s|deploy/k8s/monitoring,deploy/k8s/queue-hpa"
    "s3+monitoring+queue-hpa|deploy/k8s/s3|deploy/k8s/monitoring,deploy/k8s/queue-hpa"
)

render() {  # name base components -> $tmp/<name>.yaml
    local name=$1 base=$2 components=$3 dir overlay rel c
    if [[ -z "$components" ]]; then
        dir=$base
    else  # kustomize refuses absolute paths: the overlay names everything relative to itself
        overlay="$tmp/overlay-$name"
        mkdir -p "$overlay"
        rel() { realpath --relative-to="$overlay" "$1"; }
        {
            printf 'apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n'
            printf 'resources:\n  - %s\n' "$(rel "$base")"
            printf 'components:\n'
            IFS=, read -ra cs <<<"$components"
            for c in "${cs[@]}"; do printf '  - %s\n' "$(rel "$c")"; done
        } >"$overlay/kustomization.yaml"
        dir=$overlay
    fi
    kubectl kustomize "$dir" >"$tmp/$name.yaml" || fail "kubectl kustomize failed for $name ($base${components:+ + $components})"
}

# Splits a rendered file into core objects (<name>.core.yaml) and the allowed CRD objects (<name>.crd.yaml);
# any other non-core kind fails here, checks the CRD objects' required fields, writes their rule groups
# (<name>.rules.yaml) for promtool.
split_and_check_crds() {
    "$PY" - "$1" <<'EOF'
import sys
from pathlib import Path

import yaml

src = Path(sys.argv[1])
docs = [d for d in yaml.safe_load_all(src.read_text()) if d]
CRDS = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("monitoring.coreos.com/v1", "PrometheusRule")}
core, crds, groups, errors = [], [], [], []
for d in docs:
    key = (d.get("apiVersion", ""), d.get("kind", ""))
    group = key[0].rpartition("/")[0]  # "" for v1, "apps", "networking.k8s.io", "monitoring.coreos.com"
    if key not in CRDS:
        if "." in group and not group.endswith(".k8s.io"):
            errors.append(f"{key[1]} ({key[0]}): neither a core kind nor an allowed CRD {sorted(CRDS)}")
        else:
            core.append(d)  # kubernetes-validate fails it if it has no schema for it
        continue
    crds.append(d)
    where = f"{key[1]}/{d['metadata'].get('name')}"
    if not d["metadata"].get("namespace"):
        errors.append(f"{where}: no namespace")
    spec = d.get("spec") or {}
    if key[1] == "ServiceMonitor":
        if not spec.get("selector", {}).get("matchLabels") or not spec.get("endpoints"):
            errors.append(f"{where}: needs spec.selector.matchLabels and spec.endpoints")
        for e in spec.get("endpoints", []):
            if set(e) - {"port", "path", "interval", "scrapeTimeout", "scheme", "honorLabels", "relabelings",
                         "metricRelabelings"}:
                errors.append(f"{where}: unexpected endpoint fields {sorted(set(e))}")
    else:
        if not spec.get("groups"):
            errors.append(f"{where}: no groups")
        for g in spec.get("groups") or []:
            for r in g.get("rules", []):
                if not r.get("alert") or not r.get("expr") or "severity" not in r.get("labels", {}):
                    errors.append(f"{where}: rule {r.get('alert')!r} needs alert, expr, labels.severity")
                if set(r) - {"alert", "expr", "for", "labels", "annotations", "keep_firing_for"}:
                    errors.append(f"{where}: rule {r.get('alert')!r} has unexpected fields {sorted(set(r))}")
            groups.append(g)
stem = src.with_suffix("")
Path(f"{stem}.core.yaml").write_text(yaml.safe_dump_all(core, sort_keys=False))
Path(f"{stem}.crd.yaml").write_text(yaml.safe_dump_all(crds, sort_keys=False))
Path(f"{stem}.rules.yaml").write_text(yaml.safe_dump({"groups": groups}, sort_keys=False) if groups else "")
print(f"{len(core)} core objects, {len(crds)} CRD objects ({', '.join(sorted({d['kind'] for d in crds})) or '-'})")
if errors:
    sys.exit("\n".join(f"check_deploy: {src.name}: {e}" for e in errors))
EOF
}

have_promtool=0
if command -v promtool >/dev/null 2>&1; then have_promtool=1; fi

for v in "${VARIANTS[@]}"; do
    IFS='|' read -r name base components <<<"$v"
    render "$name" "$base" "$components"
    say "$name: $(split_and_check_crds "$tmp/$name.yaml")"
    out=$(.venv/bin/kubernetes-validate --strict --quiet -k "$K8S_VERSION" "$tmp/$name.core.yaml" 2>&1) || {
        printf '%s\n' "$out" >&2
        fail "$name: kubernetes-validate --strict -k $K8S_VERSION failed"
    }
    # kubernetes-validate only warns (exit 0) about a kind it has no schema for: a typo'd core kind or apiVersion
    if [[ -n "$out" ]]; then
        printf '%s\n' "$out" >&2
        fail "$name: kubernetes-validate reported the above for core objects (no schema = unknown kind/apiVersion)"
    fi
    if [[ -s "$tmp/$name.rules.yaml" ]]; then
        if (( have_promtool )); then
            promtool check rules "$tmp/$name.rules.yaml" >/dev/null || fail "$name: promtool check rules failed"
            say "$name: PrometheusRule groups pass promtool check rules"
        fi
    fi
done
(( have_promtool )) || say "promtool not installed: PromQL of the alert rules not checked (apt-get install prometheus)"

say "hadolint Dockerfile ($(.venv/bin/hadolint --version))"
.venv/bin/hadolint Dockerfile || fail "hadolint Dockerfile failed"
say "ok: ${#VARIANTS[@]} renderings valid against Kubernetes $K8S_VERSION (strict); Dockerfile lint clean"
