"""The command line: thin wrappers that parse options, call the library and print."""

from actcap.cli.main import cli, main

__all__ = ["cli", "main"]
