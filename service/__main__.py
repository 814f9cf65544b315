"""``python -m service`` / ``repserve``: start the RepServe HTTP server (uvicorn, one process, one backbone).

Every :class:`~service.settings.Settings` field is a flag (``--max-batch 32`` overrides
``REPSERVE_MAX_BATCH``); flags not given keep the environment's value or the default. Scale out with
replicas, not uvicorn workers: each process holds its own backbone.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import SecretStr, ValidationError

from .logs import configure_logging
from .settings import ENV_PREFIX, Settings, default_text, settings_table, unknown_variables

log = logging.getLogger(__name__)


def _flag_kwargs(annotation: Any) -> dict[str, Any]:
    """argparse keyword arguments for one Settings field type."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        annotation = args[0]  # Optional[X] -> X
    if annotation is bool:
        return {"action": argparse.BooleanOptionalAction}
    if typing.get_origin(annotation) is typing.Literal:
        return {"choices": typing.get_args(annotation)}
    if typing.get_origin(annotation) is dict:
        return {"type": json.loads, "metavar": "JSON"}
    if annotation in (int, float, Path):
        return {"type": annotation}
    if annotation is SecretStr:
        return {"type": str, "metavar": "TOKEN"}
    return {"type": str}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="repserve", description=__doc__.split("\n\n")[0],
        epilog="Every flag also reads from its environment variable; prefer the environment for tokens "
               "(command lines are visible to other users).",
    )
    for name, field in Settings.model_fields.items():
        parser.add_argument(
            f"--{name.replace('_', '-')}", dest=name, default=argparse.SUPPRESS,
            help=f"{field.description} [env {ENV_PREFIX}{name.upper()}, default {default_text(name)}]",
            **_flag_kwargs(field.annotation),
        )
    parser.add_argument("--print-config-table", action="store_true",
                        help="print the configuration table (markdown) and exit")
    parser.add_argument("--check-config", action="store_true",
                        help="validate the configuration (flags, environment), report unknown REPSERVE_* variables, "
                             "and exit: 0 valid, 2 invalid")
    return parser


def settings_from_args(args: dict[str, Any]) -> Settings:
    """Settings from parsed flags (only those given) over the environment and defaults."""
    return Settings(**{k: v for k, v in args.items() if k in Settings.model_fields})


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    if args.get("print_config_table"):
        sys.stdout.write(settings_table())
        return 0
    try:
        settings = settings_from_args(args)
    except ValidationError as e:
        sys.stderr.write(f"invalid configuration:\n{e}\n")
        return 2
    unknown = unknown_variables(os.environ)
    if args.get("check_config"):
        for name in unknown:
            sys.stderr.write(f"warning: {name} is not a RepServe setting (ignored)\n")
        sys.stdout.write("configuration valid\n")
        return 0
    configure_logging(settings.log_level, settings.log_format)
    for name in unknown:
        log.warning("%s is not a RepServe setting and is ignored (python -m service --help lists them)", name)
    import uvicorn  # after argument parsing: `--help` stays fast

    from .app import create_app

    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_config=None,
                log_level=settings.log_level, timeout_graceful_shutdown=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
