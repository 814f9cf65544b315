"""``repserve tasks list|show|register|delete``: the task management routes of a running server."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .client import Client, ClientError, add_client_options, print_json, registration_hints, table, token_from_env

if TYPE_CHECKING:
    from repadapter.bundle import TaskBundle

EXAMPLES = """examples:
  repserve tasks list
  repserve tasks show imagenet --json
  repserve tasks register adapters_store/fashion/v000001  # a store version folder: manifest.json + adapter.safetensors
  repserve tasks register flowers.zip --overwrite         # or a .zip / .tar / .tar.gz holding both
  repserve tasks delete flowers --version 3               # only if version 3 is the one served
"""
MAX_ARCHIVE_BYTES = 2 << 30
"""Largest archive read by ``tasks register`` (the server applies its own, smaller, limit)."""


def add_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("tasks", help="list, show, register and delete tasks of a running server",
                            description="Manage the tasks of a running server (GET/POST/DELETE /tasks). "
                                        "register and delete need the admin token when the server has one.",
                            epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="every served task (latest version)")
    add_client_options(listing)
    listing.set_defaults(run=list_tasks)
    show = actions.add_parser("show", help="one task with its labels")
    show.add_argument("name")
    add_client_options(show)
    show.set_defaults(run=show_task)
    register = actions.add_parser("register", help="register a bundle folder or archive (POST /tasks)")
    register.add_argument("bundle", type=Path, metavar="BUNDLE_DIR_OR_ARCHIVE",
                          help="a folder holding manifest.json and adapter.safetensors (a store's version folder, "
                               "e.g. adapters_store/NAME/v000001), or a .zip/.tar/.tar.gz of them")
    register.add_argument("--overwrite", action="store_true", help="replace an existing task (as its next version)")
    add_client_options(register)
    register.set_defaults(run=register_task)
    delete = actions.add_parser("delete", help="delete a task (DELETE /tasks/NAME)")
    delete.add_argument("name")
    delete.add_argument("--version", type=int, help="delete only if this is the version served now (refused "
                                                    "otherwise: someone replaced the task since you looked)")
    add_client_options(delete)
    delete.set_defaults(run=delete_task)


def _row(t: dict[str, Any]) -> list[object]:
    try:
        a = t["adapter"]
        adapter = f"r={a['hidden']} g={a['groups']} s={a['scale']:g} {a['placement']}" if a["hidden"] else "-"
        return [t["name"], t["version"], t["method"], t["num_labels"], adapter, t["resident"]]
    except (KeyError, TypeError, ValueError) as e:
        raise ClientError(f"not a RepServe task ({type(e).__name__}: {e}); is --url a RepServe server?") from e


_HEADERS = ["name", "version", "method", "labels", "adapter", "resident"]


def list_tasks(args: argparse.Namespace) -> int:
    tasks = Client(args.url, token_from_env(admin=False), args.timeout).tasks()
    if args.json:
        print_json(tasks)
    else:
        print(table([_row(t) for t in tasks], _HEADERS))
    return 0


def show_task(args: argparse.Namespace) -> int:
    task = Client(args.url, token_from_env(admin=False), args.timeout).task(args.name)
    if args.json:
        print_json(task)
        return 0
    row = _row(task)
    try:
        backbone = task["backbone"]
        lines = [f"backbone {backbone['arch']} ({backbone['fingerprint'][:12]}), input "
                 f"{task['preprocess']['input_size']}, created {task['created_at']}",
                 *([task["description"]] if task["description"] else []),
                 "labels: " + ", ".join(task["labels"] or [])]
    except (KeyError, TypeError) as e:
        raise ClientError(f"not a RepServe task ({type(e).__name__}: {e}); is --url a RepServe server?") from e
    print(table([row], _HEADERS))
    print("\n".join(lines))
    return 0


def read_bundle(path: Path) -> TaskBundle:
    """The :class:`~repadapter.TaskBundle` in a folder (``manifest.json`` + ``adapter.safetensors``) or an
    archive of them, checked (checksum, shapes) before anything is sent."""
    from repadapter.bundle import MANIFEST_FILE, TENSORS_FILE, TaskBundle
    from service.archive import read_bundle_archive

    if path.is_dir():
        manifest, tensors = (path / MANIFEST_FILE).read_bytes(), (path / TENSORS_FILE).read_bytes()
    else:
        manifest, tensors = read_bundle_archive(path.read_bytes(), limit=MAX_ARCHIVE_BYTES)
    return TaskBundle.deserialize(manifest, tensors)


def register_task(args: argparse.Namespace) -> int:
    from training.export import register  # the one place that POSTs a bundle

    bundle = read_bundle(args.bundle)
    stored = register(bundle, args.url, token_from_env(admin=True), overwrite=args.overwrite, timeout_s=args.timeout,
                      hints=registration_hints())
    if args.json:
        print_json(stored)
    else:
        print(f"registered {stored['name']} version {stored['version']} at {args.url}")
    return 0


def delete_task(args: argparse.Namespace) -> int:
    Client(args.url, token_from_env(admin=True), args.timeout).delete(args.name, version=args.version)
    if args.json:
        print_json({"deleted": args.name})
    else:
        print(f"deleted {args.name}")
    return 0
