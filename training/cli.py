"""``python -m training``: train a task and publish its bundle; flags are generated from ``TrainConfig``.

Exit codes: 0 success, 1 failure (message on stderr), 2 bad usage, 3 trained but not published (the
bundle is kept in the run directory; the message names the ``--resume --register ...`` that publishes it
without training again), 130 interrupted (Ctrl-C: the store is untouched; ``--resume`` continues from
the last epoch's checkpoint). A JSON summary goes to stdout, logs and the progress bar to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any

from pydantic import ValidationError
from pydantic_settings import CliSettingsSource
from tqdm.contrib.logging import logging_redirect_tqdm

from repadapter.errors import RepServeError, describe_validation_error

from .config import TrainConfig
from .demo import IMAGENET_TASK, build_demo, demo_configs
from .export import PublishError
from .pipeline import run

log = logging.getLogger(__name__)

_PROG = "python -m training"
EXAMPLES = """examples:
  python -m training --data DIR --task flowers                      # ImageFolder DIR/train/<class>/*.jpg
  python -m training --data fashion-mnist --task fashion --image-size 96 --search-scale
  python -m training --data mnist --task digits --method linear     # the linear-probe baseline
  python -m training --data DIR --task flowers --register http://localhost:8000 --token $TOKEN
  torchrun --standalone --nproc_per_node 2 -m training --data mnist --task digits
  python -m training --demo --overwrite                             # rebuild adapters_store's demo tasks
"""


def config_flags(parser: argparse.ArgumentParser) -> CliSettingsSource[TrainConfig]:
    """Add a flag for every :class:`TrainConfig` field to ``parser`` and return the source that reads them back.

    pydantic-settings' CLI source, as for the service's settings: kebab-case flags (aliases win:
    ``--register``), ``--x``/``--no-x`` for booleans, comma lists for tuples (``--scale-grid 0.1,1,10``),
    Literal choices, the description and default in the help. Only flags given reach the config, so new
    ``TrainConfig`` fields become flags on their own. TrainConfig is a plain model: no environment is read.
    """
    return CliSettingsSource(TrainConfig, root_parser=parser, cli_kebab_case=True, cli_implicit_flags=True,
                             cli_hide_none_type=True)


def _build(prog: str) -> tuple[argparse.ArgumentParser, CliSettingsSource[TrainConfig]]:
    parser = argparse.ArgumentParser(
        prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES.replace(_PROG, prog),
        description="Train a RepAdapter (or a linear-probe / full fine-tuning baseline) on a frozen backbone and\n"
                    "write the task bundle into the store, or register it with a running service.\n"
                    "--data and --task are required, except with --demo.",
    )
    source = config_flags(parser)
    extra = parser.add_argument_group("run control")
    extra.add_argument("--demo", action="store_true",
                       help=f"rebuild the demo tasks ({IMAGENET_TASK}, fashion, digits) into --store; other "
                            "flags override the demo recipe")
    extra.add_argument("--progress", action=argparse.BooleanOptionalAction, default=sys.stderr.isatty(),
                       help="progress bar with loss, accuracy and throughput (default: when stderr is a terminal)")
    extra.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                       help="logging level on stderr (default: INFO; other ranks than 0 log warnings only)")
    return parser, source


def build_parser(prog: str = _PROG) -> argparse.ArgumentParser:
    return _build(prog)[0]


def _setup_logging(level: str) -> None:
    """Log to stderr, unless the host (a test runner, an embedding program) configured logging already."""
    rank = int(os.environ.get("RANK", "0"))
    prefix = f"[rank {rank}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    logging.basicConfig(level=level if rank == 0 else "WARNING", stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s {prefix}%(name)s: %(message)s")


def _summary(report: dict[str, Any]) -> dict[str, Any]:
    """The report without its per-epoch history and configuration (both are in report.json)."""
    return {k: v for k, v in report.items() if k not in ("history", "config", "preprocess")}


def _validation_message(e: ValidationError) -> str:
    return describe_validation_error(e, flag_style=True, empty="config")


def main(argv: list[str] | None = None, prog: str = _PROG) -> int:
    parser, source = _build(prog)
    args = parser.parse_args(argv)
    demo, progress = args.demo, args.progress
    _setup_logging(args.log_level)
    opts = source(parsed_args=args)()
    if opts.get("register") and "token" not in opts:  # the repserve client's variable, then the server's own
        opts["token"] = os.environ.get("REPSERVE_TOKEN") or os.environ.get("REPSERVE_ADMIN_TOKEN")
    try:
        if demo:
            if {"data", "task"} & opts.keys():
                parser.error("--demo builds its own tasks: drop --data and --task")
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                parser.error("--demo runs in one process: start it without torchrun")
            configs = demo_configs(str(opts.pop("store", TrainConfig.model_fields["store"].default)), opts)
        else:
            missing = [f"--{f}" for f in ("data", "task") if f not in opts]
            if missing:
                parser.error(f"the following arguments are required: {', '.join(missing)} (or use --demo)")
            config = TrainConfig(**opts)
    except ValidationError as e:
        parser.error(_validation_message(e))
    try:
        with logging_redirect_tqdm():
            if demo:
                result: Any = [_summary(r) for r in build_demo(configs, progress=progress)]
            else:
                report = run(config, progress=progress)
                result = None if report is None else _summary(report)
    except PublishError as e:  # trained and kept, not published: the message says how to publish it
        log.error("%s", e)
        return 3
    except KeyboardInterrupt:
        log.error("interrupted: the store is untouched; rerun with --resume to continue from the last checkpoint")
        return 130
    except (RepServeError, ValueError, OSError) as e:
        log.error("training failed: %s", e)
        return 1
    if result is not None:
        print(json.dumps(result, indent=2))
    return 0
