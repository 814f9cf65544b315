"""``python -m service`` / ``repserve serve``: start the RepServe HTTP server (uvicorn, one process, one backbone).

Every :class:`~service.settings.Settings` field is a flag (``--max-batch 32`` overrides
``REPSERVE_MAX_BATCH``); flags not given keep the environment's value or the default. Scale out with
replicas, not uvicorn workers: each process holds its own backbone.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError
from pydantic_settings import CliSettingsSource

from repadapter.errors import validation_problems

from .logs import configure_logging
from .settings import Settings, settings_table, unknown_variables

log = logging.getLogger(__name__)


def settings_flags(parser: argparse.ArgumentParser) -> CliSettingsSource[Settings]:
    """Add a flag for every Settings field to ``parser`` and return the source that reads them back.

    pydantic-settings' own CLI source does the mapping (the one used by ``repserve serve`` and, with the
    training config, by ``python -m training``): kebab-case flags, ``--x``/``--no-x`` for booleans, JSON for
    dicts, Literal choices, the description, default and ``REPSERVE_*`` name in the help. Only flags given
    reach the settings, so the others keep the environment's value or the default.
    """
    return CliSettingsSource(Settings, root_parser=parser, cli_kebab_case=True, cli_implicit_flags=True,
                             cli_show_env_vars=True, cli_hide_none_type=True)


def _build(prog: str) -> tuple[argparse.ArgumentParser, CliSettingsSource[Settings]]:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__.split("\n\n")[0],
        epilog="Every flag also reads from its environment variable; prefer the environment for tokens "
               "(command lines are visible to other users).",
    )
    parser.add_argument("--print-config-table", action="store_true",
                        help="print the configuration table (markdown) and exit")
    parser.add_argument("--check-config", action="store_true",
                        help="validate the configuration (flags, environment), report unknown REPSERVE_* variables, "
                             "and exit: 0 valid, 2 invalid")
    return parser, settings_flags(parser)


def build_parser(prog: str = "python -m service") -> argparse.ArgumentParser:
    return _build(prog)[0]


def settings_from_args(args: Mapping[str, Any]) -> Settings:
    """Settings from parsed flags (only those given) over the environment and defaults."""
    source = settings_flags(argparse.ArgumentParser(add_help=False))
    return Settings(_cli_settings_source=source(parsed_args=argparse.Namespace(**args)))


def main(argv: list[str] | None = None, prog: str = "python -m service") -> int:
    parser, source = _build(prog)
    args = parser.parse_args(argv)
    if args.print_config_table:
        sys.stdout.write(settings_table())
        return 0
    try:
        settings = Settings(_cli_settings_source=source(parsed_args=args))
    except ValidationError as e:
        # locations and messages only: pydantic's own text repeats the input values, and a value may be a token
        problems = validation_problems(e, flag_style=True, empty="config")
        sys.stderr.write("invalid configuration:\n" + "".join(f"  {p}\n" for p in problems))
        return 2
    unknown = unknown_variables(os.environ)
    if args.check_config:
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
