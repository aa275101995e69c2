"""The ``faas`` command: parses the command line, runs one command, turns errors into exit statuses.

Exit statuses: 0 success; 1 an error from the platform or the function (or the local environment:
pip failed, a folder exists); 2 a usage error (bad arguments, an invalid ``faas.yaml``, a handler
module missing from the project); 130 interrupted.  An expected error prints ``error: <message>`` on
stderr, never a traceback.

Every subcommand sets ``func`` (``args -> int | None``) with ``set_defaults``; the cluster commands
(``up``, ``down``, ``status``) come from ``faas.cli.cluster``.  ``--url`` and ``--namespace`` are
accepted before or after the function commands (``faas -n dev ls`` and ``faas ls -n dev``).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from faas.core.errors import FaasError

from . import cluster, commands, serve
from .archive import HandlerModuleNotFound
from .errors import UsageError
from .manifest import ManifestError

DEFAULT_URL = "http://127.0.0.1:8080"
USAGE_ERRORS = (UsageError, ManifestError, HandlerModuleNotFound)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="faas",
        description="Deploy and run Python functions on the faas platform.",
    )
    _add_global_options(
        parser,
        url=os.environ.get("FAAS_URL") or DEFAULT_URL,
        namespace=os.environ.get("FAAS_NAMESPACE") or None,
        api_key=os.environ.get("FAAS_API_KEY") or None,
    )
    # The same options on each function command, defaulting to "not given" so that a value given
    # before the command is kept.
    common = argparse.ArgumentParser(add_help=False)
    _add_global_options(common, url=argparse.SUPPRESS, namespace=argparse.SUPPRESS, api_key=argparse.SUPPRESS)
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    commands.add_parsers(subparsers, parents=[common])
    serve.add_parsers(subparsers, parents=[common])
    cluster.add_parsers(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        status = func(args)
    except USAGE_ERRORS as exc:
        _print_error(exc)
        return 2
    except FaasError as exc:
        _print_error(exc)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader of stdout went away (faas logs x | head): stop quietly, and keep Python's
        # own flush at exit from failing again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    return int(status or 0)


def _add_global_options(parser: argparse.ArgumentParser, *, url: str, namespace: str | None, api_key: str | None) -> None:
    parser.add_argument("--url", default=url, help=f"the gateway's URL (default: $FAAS_URL or {DEFAULT_URL})")
    parser.add_argument(
        "-n", "--namespace", default=namespace,
        help="the namespace (default: $FAAS_NAMESPACE, else your API key's; only an admin key may name another)",
    )  # fmt: skip
    parser.add_argument(
        "--api-key", default=api_key,
        help="the API key (default: $FAAS_API_KEY, else the one 'faas login' saved for the URL, else the "
        "admin key of the platform 'faas up' started under $FAAS_HOME or .faas)",
    )  # fmt: skip


def _print_error(exc: FaasError) -> None:
    lines = exc.problems if isinstance(exc, ManifestError) else [exc.message]
    for line in lines:
        print(f"error: {line}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
