"""`lorakit serve`: an OpenAI-compatible server for many LoRA adapters on one base model.

Heavy imports (torch, transformers, fastapi) happen only when the server is built, so the CLI can
register the subcommand's options cheaply.
"""

from .server import ServerThread, add_serve_arguments, build_server, run_server

__all__ = ["add_serve_arguments", "run_server", "build_server", "ServerThread"]
