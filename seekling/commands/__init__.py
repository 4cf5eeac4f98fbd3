"""Subcommands of the `seekling` CLI, one module each (see seekling/cli.py)."""
