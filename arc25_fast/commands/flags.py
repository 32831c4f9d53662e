"""Click options generated from a command config's parts: one per option, with the option's own help text and this
command's default; ``--config FILE`` (YAML/JSON) sets them too, and the command line wins."""
import types
from typing import Any

import click

from ..runtime.options import options, resolve


def _click_type(tp: Any):
    if isinstance(tp, types.UnionType):
        tp = next(t for t in tp.__args__ if t is not type(None))
    return {int: int, float: float, str: str}[tp]


def config_options(cls: type):
    """Click options for every option of the command config ``cls``, all defaulting to None (= not given)."""
    def decorator(f):
        for opt in reversed(list(options(cls).values())):
            text = f"{opt.help} [default: {opt.default}]"
            if opt.type is bool:
                f = click.option(f"{opt.flag}/--no-{opt.flag[2:]}", opt.name, default=None, help=text)(f)
            elif opt.type == list[str]:
                f = click.option(opt.flag, opt.name, multiple=True, help=text)(f)
            else:
                f = click.option(opt.flag, opt.name, type=_click_type(opt.type), default=None, help=text)(f)
        return click.option("--config", "config_file", type=click.Path(dir_okay=False),
                            help="YAML/JSON file of options; command-line options override it.")(f)
    return decorator


def given(values: dict) -> dict:
    """The options set on the command line (click passes None or () for the others)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in values.items() if v is not None and v != ()}


def command_config(cls: type, config_file: str | None, values: dict, file_written_for: tuple[type, ...] = ()):
    """The command's checked config from its ``--config`` file and the options given on the command line."""
    return resolve(cls, config_file, given(values), file_written_for)
