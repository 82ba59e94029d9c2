"""`lorakit serve`: the OpenAI-compatible server (its options live with it, in lorakit.serve.server)."""

from __future__ import annotations

import argparse

from lorakit.cli.options import CliError


def run(args: argparse.Namespace) -> int:
    from lorakit.serve import run_server

    run_server(args)
    return 0


def register(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible server for many adapters on one base model")
    try:
        from lorakit.serve import add_serve_arguments
    except ImportError as e:  # an installation without the server's dependencies (fastapi, uvicorn)
        p.set_defaults(func=lambda args, e=e: _missing(e))
    else:
        add_serve_arguments(p)
        p.set_defaults(func=run)


def _missing(error: Exception) -> int:
    raise CliError(f"the serving module lorakit.serve is not available in this installation ({error})")
