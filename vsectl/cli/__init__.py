"""The `vsectl` command line: thin typer shells over the library. Human output on stderr, results on stdout.

Each module registers its commands on the shared app; importing this package assembles the whole CLI.
"""

from vsectl.cli import (  # noqa: F401  (registers commands)
    core,
    data,
    extract,
    importer,
    noise,
    planted,
    report,
    retrieval,
    science,
    serving,
)
from vsectl.cli.common import app

__all__ = ["app"]
