"""The `vae-engine` command: thin Typer commands over the library, one error policy, progress bars."""

from .commands import app, main

__all__ = ["app", "main"]
