"""``repserve classify IMAGE... --task T``: POST /classify and print the top-k per image."""

from __future__ import annotations

import argparse
from pathlib import Path

from .client import Client, add_client_options, print_json, table, token_from_env

EXAMPLES = """examples:
  repserve classify cat.jpg --task imagenet
  repserve classify a.png b.png --task fashion --top-k 3 --json
  REPSERVE_URL=http://repserve:8000 REPSERVE_TOKEN=... repserve classify x.jpg --task digits
"""


def add_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("classify", help="classify images with a task of a running server",
                            description="Classify images with one task of a running server (POST /classify).",
                            epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="image files (JPEG, PNG, ...)")
    p.add_argument("--task", required=True, help="task name (repserve tasks list shows them)")
    p.add_argument("--top-k", type=int, default=5, help="predictions per image (default: 5)")
    add_client_options(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    body = Client(args.url, token_from_env(admin=False), args.timeout).classify(args.task, args.images, args.top_k)
    if args.json:
        print_json(body)
        return 0
    rows: list[list[object]] = []
    for result in body["results"]:
        name = result.get("filename") or str(result["index"])
        for rank, p in enumerate(result["predictions"], 1):
            rows.append([name if rank == 1 else "", rank, p["label"], f"{p['score']:.4f}"])
    print(table(rows, ["image", "rank", "label", "score"]))
    print(f"task {body['task']} version {body['task_version']}, {body['timings']['total_ms']:.0f} ms")
    return 0
