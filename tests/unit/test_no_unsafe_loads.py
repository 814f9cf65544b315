"""No code path of ours can execute a file's contents: every model or data load is safetensors, JSON, or
``torch.load(..., weights_only=True)``. The scan reads the syntax tree of every Python file we ship."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ("repadapter", "service", "training", "repserve", "bench", "deploy", "scripts")
UNSAFE_MODULES = {"pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
UNSAFE_CALLS = {("yaml", "load"), ("yaml", "unsafe_load"), ("yaml", "full_load"), ("numpy", "load"),
                ("np", "load"), ("pandas", "read_pickle"), ("pd", "read_pickle")}


def unsafe_uses(source: str) -> list[str]:
    """What in ``source`` could unpickle or execute data: imports of pickle-like modules, ``torch.load``
    without ``weights_only=True``, ``yaml.load`` / ``numpy.load`` (pickle unless told otherwise), ``eval``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found += [f"line {node.lineno}: import {n}" for n in names if n.split(".")[0] in UNSAFE_MODULES]
        elif isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Name) and f.id in ("eval", "exec"):
                found.append(f"line {node.lineno}: {f.id}()")
            if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name):
                pair = (f.value.id, f.attr)
                if pair == ("torch", "load"):
                    safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                               for k in node.keywords)
                    if not safe:
                        found.append(f"line {node.lineno}: torch.load without weights_only=True")
                elif pair in UNSAFE_CALLS:
                    found.append(f"line {node.lineno}: {pair[0]}.{pair[1]}()")
    return found


def test_the_scan_finds_what_it_looks_for():
    bad = ("import pickle\nimport torch\nx = torch.load('m.pt')\ny = torch.load('m.pt', weights_only=False)\n"
           "import yaml\nz = yaml.load(open('c'))\neval('1')\n")
    assert [u.split(": ", 1)[1] for u in unsafe_uses(bad)] == [
        "import pickle", "torch.load without weights_only=True", "torch.load without weights_only=True",
        "yaml.load()", "eval()"]
    assert unsafe_uses("import torch\nsd = torch.load(p, map_location='cpu', weights_only=True)\n") == []


@pytest.mark.parametrize("folder", SHIPPED)
def test_no_unsafe_load_in_shipped_code(folder):
    files = sorted((ROOT / folder).rglob("*.py"))
    problems = {str(p.relative_to(ROOT)): unsafe_uses(p.read_text()) for p in files}
    assert {k: v for k, v in problems.items() if v} == {}
