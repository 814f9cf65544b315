"""``repserve import-official CKPT``: a checkpoint of the official RepAdapter code as a task (store or server).

The work is :func:`repadapter.official.official_bundle`; this module reads the files, loads the backbone the
task will be served on, and publishes the bundle with :func:`training.export.publish`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path

from .client import print_json, registration_hints, token_from_env

EXAMPLES = """examples:
  repserve import-official cifar100.pt --scale 10 --task cifar100 --labels cifar100.txt \\
      --backbone-checkpoint vit_base_patch16_224.safetensors
  repserve import-official dtd.safetensors --scale 1 --task dtd --url http://localhost:8000 \\
      --backbone vit_base_patch16_224 --backbone-checkpoint vit-b16.safetensors

What the checkpoint's keys tell is read from them: placement (adapter_mlp keys: block), depth and width
(hence a standard ViT: vit_{tiny,small,base}_patch16_224, vit_large_patch16_224), hidden size, groups and
classes. What they cannot tell is asked: the scale (--scale), the task name, the class names (default
class_0..), and the backbone's weights (--backbone-checkpoint; the task is bound to them by fingerprint, so
give the file the server runs with). A .pt/.pth file is read with torch.load(weights_only=True), which
loads tensors only; safetensors is preferred.
"""


class UsageError(Exception):
    """The arguments cannot work (exit 2); the message says which one to give."""


def json_object(text: str) -> dict[str, object]:
    """``--backbone-options``: a JSON object (its keys become keyword arguments), else a usage error (exit 2)."""
    try:
        value = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e}): give an object, e.g. '{{\"img_size\": 384}}'") from e
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"a JSON object is needed, e.g. '{{\"img_size\": 384}}'; got {text!r}")
    return value


def _store_setting() -> tuple[str, str]:
    """``(variable, default)`` of the server's store setting: service.settings' (imported on use)."""
    from service.settings import ENV_PREFIX, Settings

    return f"{ENV_PREFIX}STORE", str(Settings.model_fields["store"].default)


def default_store() -> str:
    """The server's store, so that an import lands where ``repserve serve`` looks: ``$REPSERVE_STORE``, else
    :class:`~service.settings.Settings`' default."""
    variable, default = _store_setting()
    return os.environ.get(variable) or default


def add_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("import-official", help="turn an official RepAdapter checkpoint into a task",
                            description="Turn a checkpoint of the paper's official RepAdapter code "
                                        "(luogen1996/RepAdapter) into a task bundle, written into a store or "
                                        "registered with a running server.",
                            epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path, metavar="CKPT", help="the official checkpoint (.safetensors, .pt, .pth)")
    p.add_argument("--scale", type=float, required=True, help="the adapter scale s it was trained with (not stored "
                                                              "in the checkpoint)")
    p.add_argument("--task", required=True, help="task name (a-z, 0-9, '_', '-')")
    p.add_argument("--placement", choices=["block", "attn"],
                   help="adapter sites; default: what the keys tell (block when adapter_mlp keys are present)")
    p.add_argument("--labels", type=Path, metavar="FILE", help="class names, one per line (default: class_0 ..)")
    where = p.add_mutually_exclusive_group()
    variable, default = _store_setting()
    where.add_argument("--store", help=f"store to write the task into (default: ${variable} or {default})")
    where.add_argument("--url", help="register with the server at this base URL instead (token: $REPSERVE_TOKEN or "
                                     "$REPSERVE_ADMIN_TOKEN)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing task (as its next version)")
    bb = p.add_argument_group("backbone (the server's: --backbone, --checkpoint, --backbone-options, --seed there)")
    bb.add_argument("--backbone", help="timm architecture; default: the standard ViT of the checkpoint's width and "
                                       "depth")
    bb.add_argument("--backbone-checkpoint", type=Path, metavar="FILE",
                    help="the backbone's weights; without it a random backbone from --seed (tests only)")
    bb.add_argument("--backbone-options", type=json_object, default={}, metavar="JSON",
                    help='extra timm create_model arguments, e.g. \'{"img_size": 384}\'')
    bb.add_argument("--seed", type=int, default=0, help="seed of a backbone without checkpoint (default: 0)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from repadapter import load_backbone
    from repadapter.backbone import read_checkpoint
    from repadapter.official import inspect_official, official_bundle, read_labels
    from training.export import publish

    state_dict = read_checkpoint(args.checkpoint)
    shape = inspect_official(state_dict)
    arch = args.backbone or shape.arch
    if arch is None:
        raise UsageError(f"the checkpoint's ViT ({shape.depth} blocks of width {shape.dim}) is not a standard one: "
                         "name it with --backbone (and --backbone-options for its depth and size)")
    backbone = load_backbone(arch, args.backbone_checkpoint, seed=args.seed, **args.backbone_options)
    labels = read_labels(args.labels.read_text()) if args.labels else None
    digest = hashlib.sha256(args.checkpoint.read_bytes()).hexdigest()
    bundle = official_bundle(
        state_dict, backbone, task=args.task, scale=args.scale, placement=args.placement, labels=labels,
        description=f"imported from the official RepAdapter checkpoint {args.checkpoint.name} (sha256 {digest})")
    store = args.store or default_store()
    where = publish(bundle, store=store, register_url=args.url, token=token_from_env(admin=True),
                    overwrite=args.overwrite, hints=registration_hints(url="--url"))
    a = bundle.manifest.adapter
    result = {**where, "backbone": arch, "placement": a.placement, "hidden": a.hidden, "groups": a.groups,
              "scale": a.scale, "classes": len(bundle.manifest.labels), "checkpoint_sha256": digest}
    if args.json:
        print_json(result)
    else:
        print(f"imported {result['name']} version {result['version']} into {where.get('store') or where['registered']}"
              f" ({arch}, {a.placement}, r={a.hidden}, groups={a.groups}, scale={a.scale:g}, "
              f"{result['classes']} classes; checkpoint sha256 {digest})")
    return 0
