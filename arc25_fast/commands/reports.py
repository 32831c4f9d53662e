"""Writing a profiling command's JSON report, with the command line that made it."""
import json
import sys
from pathlib import Path

import click

from ..runtime.files import write_atomic


def write_json_report(report: dict, path: str | None) -> None:
    """The report as JSON at ``path`` (when given), with the command line that made it."""
    if path:
        write_atomic(Path(path), json.dumps({**report, "command": " ".join(sys.argv)}, indent=2))
        click.echo(f"wrote {path}")
