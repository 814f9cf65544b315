"""``repserve``: the command line of RepServe, one entry point for every job.

``serve`` and ``train`` hand their arguments to ``python -m service`` / ``python -m training`` (whose flags
are generated from their pydantic models); ``classify`` and ``tasks`` talk to a running server; ``import-official``
turns a checkpoint of the official RepAdapter code into a task; ``bench`` runs ``python -m bench``.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from . import __version__, classify, importer, tasks
from .client import DEFAULT_URL, ClientError, MissingExtra, env_names

EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130

DESCRIPTION = ("RepServe: many vision tasks served from one frozen backbone. One command for the server, training, "
               "the HTTP API and official RepAdapter checkpoints; `repserve COMMAND --help` for each.")
EPILOG = """exit codes:
  0    success
  1    failure: one line on stderr (for server errors, the server's error code and detail)
  2    bad usage (unknown command or flag, invalid value)
  3    train only: trained but not published (kept in the run directory; the message says how to publish it)
  130  interrupted (Ctrl-C)

environment:
  {url_env}    server base URL of the client commands (default: {default_url})
  {token_env}  bearer token of the client commands (fallback: REPSERVE_ADMIN_TOKEN for
                  register/delete/import, REPSERVE_CLASSIFY_TOKEN then REPSERVE_ADMIN_TOKEN for
                  classify/list/show); never printed, never taken from the command line
  REPSERVE_*      every server setting (repserve serve --help lists them)

examples:
  repserve serve --store adapters_store --port 8000
  repserve train --data fashion-mnist --task fashion --image-size 96
  repserve classify cat.jpg --task imagenet
  repserve tasks list --json
  repserve tasks register adapters_store/fashion/v000001 --overwrite
  repserve import-official dtd.pt --scale 10 --task dtd --backbone-checkpoint vit-b16.safetensors
  repserve bench --quick

Without a command, `repserve [server flags]` starts the server, as before (same as `repserve serve`).
"""


def _serve(argv: list[str]) -> int:
    try:
        from service.__main__ import main
    except ImportError as e:
        return _missing("serve", e)
    return main(argv, prog="repserve serve")


def _train(argv: list[str]) -> int:
    try:
        from training.cli import main
    except ImportError as e:
        return _missing("train", e)
    return main(argv, prog="repserve train")


def _bench(argv: list[str]) -> int:
    """``python -m bench ARGS`` in a child process, from the source checkout (bench/ is not installed)."""
    if importlib.util.find_spec("bench") is None and not (Path.cwd() / "bench" / "__main__.py").is_file():
        sys.stderr.write("repserve bench: the benchmarks (bench/) ship with the source checkout only; run this "
                         "from the checkout's root (git clone ...; cd repserve; repserve bench)\n")
        return EXIT_FAILURE
    return subprocess.call([sys.executable, "-m", "bench", *argv])


def _missing(extra: str, e: ImportError) -> int:
    sys.stderr.write(f"repserve {extra}: {MissingExtra(extra, e)}\n")
    return EXIT_FAILURE


DELEGATED: dict[str, tuple[Callable[[list[str]], int], str]] = {
    "serve": (_serve, "start the HTTP server (every REPSERVE_* setting is a flag: repserve serve --help)"),
    "train": (_train, "train a task and publish it (repserve train --help; exit 3: trained, not published)"),
    "bench": (_bench, "run the benchmarks: python -m bench (source checkout only)"),
}
"""Commands whose arguments go unparsed to another program's own parser (it prints their --help)."""


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command but the delegated ones; raises :class:`~repserve.client.MissingExtra` on an
    install without the serve extra (the client's variables are defined in :mod:`service.settings`)."""
    url_env, token_env = env_names()
    epilog = EPILOG.format(url_env=url_env, token_env=token_env, default_url=DEFAULT_URL)
    parser = argparse.ArgumentParser(prog="repserve", description=DESCRIPTION, epilog=epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"repserve {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, text) in DELEGATED.items():
        commands.add_parser(name, help=text, add_help=False)
    classify.add_parser(commands)
    tasks.add_parser(commands)
    importer.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version")):
        argv = ["serve", *argv]  # `repserve --port 8000`: the server, as the console script always did
    if argv[0] in DELEGATED:
        return DELEGATED[argv[0]][0](argv[1:])
    if argv[0] == "--version":
        print(f"repserve {__version__}")
        return 0
    try:
        parser = build_parser()
    except ClientError as e:  # a core-only install: no pydantic-settings (the serve extra)
        sys.stderr.write(f"repserve: {e}\n")
        return EXIT_FAILURE
    args = parser.parse_args(argv)
    command = " ".join(filter(None, [args.command, getattr(args, "action", None)]))
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args)
    except importer.UsageError as e:
        sys.stderr.write(f"repserve {command}: error: {e}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return EXIT_INTERRUPTED
    except ImportError as e:  # register and import-official run training's publishing code
        return _fail(command, f"{e}: pip install 'repserve[train]'")
    except (ClientError, OSError, ValueError) as e:
        return _fail(command, e)
    except Exception as e:
        # The library's errors (RepServeError: bundle, checkpoint, store, registration) carry a message a
        # user can act on. Looked up, not imported: the client commands never load repadapter (torch).
        errors = sys.modules.get("repadapter.errors")
        if errors is None or not isinstance(e, errors.RepServeError):
            raise
        return _fail(command, e)


def _fail(command: str, e: BaseException | str) -> int:
    message = str(e).strip().replace("\n", " ") or type(e).__name__
    sys.stderr.write(f"repserve {command}: {message}\n")
    return EXIT_FAILURE
