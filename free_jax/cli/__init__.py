"""The `free-jax` command: one module per subcommand.

May import anything in free_jax (it is the top of the dependency order).
"""

from free_jax.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
