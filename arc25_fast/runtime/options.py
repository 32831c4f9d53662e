"""Options: each declared once, in the part (a dataclass) that becomes its runtime object; a command's config is
composed of parts.

An option has one public name (the YAML/JSON key, and ``--name-with-dashes`` on the command line), one help text
and the checks its value must pass. ``resolve`` merges a config file and the command line, checks every value and
names where a bad one came from (``--max-steps`` or ``run.yaml: max_tokens``) in a one-line ``ConfigError``, before
any expensive work. In a file, options stand at the top level or inside a section named after a part of the command
(``data:``, ``lora:``, ...); the name alone says which part an option belongs to.
"""
import json
import math
import types
import typing
from dataclasses import Field, dataclass, field, fields
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A bad option value; one line naming the option, where it came from and the problem."""


def option(default: Any, help: str, *, choices: tuple | None = None, min: float | None = None,
           max: float | None = None, name: str | None = None, flag: str | None = None):
    """A part's field: its default, help text, checks, and its public ``name`` where that differs from the field's
    (``flag``: the command-line spelling where that differs from the name)."""
    meta = {"help": help, "choices": choices, "min": min, "max": max, "name": name, "flag": flag}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def part(cls: type, **defaults: Any):
    """A command config's field holding the part ``cls``, with this command's own defaults for some options."""
    return field(default_factory=lambda: cls(**defaults), metadata={"part": cls})


@dataclass(frozen=True)
class Option:
    """One option of a command: where it lives (``part.attr``) and what it is."""

    name: str
    part: str
    attr: str
    spec: Field
    default: Any

    @property
    def flag(self) -> str:
        return "--" + (self.spec.metadata.get("flag") or self.name.replace("_", "-"))

    @property
    def help(self) -> str:
        return self.spec.metadata["help"]

    @property
    def type(self) -> Any:
        return self.spec.type


def options(cls: type) -> dict[str, Option]:
    """Every option of a command config, by public name; a name used by two parts is an error of the program."""
    out: dict[str, Option] = {}
    defaults = cls()
    for p in fields(cls):
        value = getattr(defaults, p.name)
        for f in fields(value):
            if "help" not in f.metadata:
                continue  # a runtime field that is no option (set by the program)
            name = f.metadata.get("name") or f.name
            if name in out:
                raise TypeError(f"{cls.__name__}: option {name!r} is declared by both {out[name].part} and {p.name}")
            out[name] = Option(name, p.name, f.name, f, getattr(value, f.name))
    return out


def _check_value(value: Any, tp: Any, meta: dict, where: str) -> Any:
    """The value converted to the field's type, or a ``ConfigError`` naming ``where``."""
    optional = isinstance(tp, types.UnionType) and type(None) in tp.__args__
    if optional:
        if value is None:
            return None
        tp = next(t for t in tp.__args__ if t is not type(None))
    if typing.get_origin(tp) is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_check_value(v, typing.get_args(tp)[0], {}, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"{where}: must be a finite number, got {value!r}")
    if tp is str and not isinstance(value, str):
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if meta.get("choices") and value not in meta["choices"]:
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(meta['choices'])}")
    if meta.get("min") is not None and value < meta["min"]:
        raise ConfigError(f"{where}: must be at least {meta['min']}, got {value!r}")
    if meta.get("max") is not None and value > meta["max"]:
        raise ConfigError(f"{where}: must be at most {meta['max']}, got {value!r}")
    return value


def build(cls: type, values: dict[str, Any], origins: dict[str, str] | None = None):
    """A command config from options by public name, every value checked; ``origins`` says where each came from."""
    known = options(cls)
    origins = origins or {}
    parts: dict[str, dict[str, Any]] = {p.name: {} for p in fields(cls)}
    for name, value in values.items():
        where = origins.get(name, f"--{name.replace('_', '-')}")
        if name not in known:
            raise ConfigError(f"{where}: unknown option {name!r}")
        opt = known[name]
        parts[opt.part][opt.attr] = _check_value(value, opt.type, opt.spec.metadata, origins.get(name, opt.flag))
    defaults = cls()
    return cls(**{p: _replace(getattr(defaults, p), given) for p, given in parts.items()})


def _replace(value: Any, given: dict[str, Any]) -> Any:
    return type(value)(**{**{f.name: getattr(value, f.name) for f in fields(value) if f.init}, **given})


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Options from a YAML or JSON file: a mapping; syntax errors name the file and line."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    if path.suffix in (".yaml", ".yml"):
        import yaml  # not at the top: the sandbox's worker imports this module, and has no PyYAML

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            at = f" at line {mark.line + 1} column {mark.column + 1}" if mark else ""
            raise ConfigError(f"{path}: YAML syntax error{at}: {getattr(e, 'problem', None) or e}") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: malformed JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of options, got a {type(data).__name__}")
    return data


def file_options(path: str | Path, sections: set[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """A file's options by name, sections flattened, and where each was written (``file: section.name``)."""
    values, origins = {}, {}
    for key, value in load_config_file(path).items():
        if key in sections and isinstance(value, dict):
            for name, inner in value.items():
                values[name], origins[name] = inner, f"{path}: {key}.{name}"
        else:
            values[key], origins[key] = value, f"{path}: {key}"
    return values, origins


def resolve(cls: type, config_file: str | None, given: dict[str, Any], file_written_for: tuple[type, ...] = ()):
    """Merge a config file and command-line values (which win) into a checked ``cls``.

    ``given`` holds the command-line values that were set, by option name. Options in the file that belong to a
    command in ``file_written_for`` but not to ``cls`` are left out (a data command reads a training file)."""
    values, origins, known = {}, {}, options(cls)
    if config_file:
        sections = {p.name for c in (cls, *file_written_for) for p in fields(c)}
        values, origins = file_options(config_file, sections)
        others = {name for c in file_written_for for name in options(c)}
        values = {k: v for k, v in values.items() if k in known or k not in others}
    for name in given:
        origins[name] = known[name].flag if name in known else f"--{name}"
    return build(cls, {**values, **given}, origins)


def _literal(text: str) -> Any:
    """``6`` -> 6, ``0.5`` -> 0.5, ``true``/``false`` -> a bool; anything else stays text."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def override(value: Any, texts: dict[str, str], where: str) -> Any:
    """The part ``value`` with some fields set from text (``max_side=6``, ``noise=0.5``, ``distinct_colors=true``),
    each checked as its option is; ``where`` names the text in an error."""
    known = {f.name: f for f in fields(value) if "help" in f.metadata}
    given = {}
    for key, text in texts.items():
        if key not in known:
            raise ConfigError(f"{where}: unknown key {key!r} (one of {', '.join(known)})")
        given[key] = _check_value(_literal(text), known[key].type, known[key].metadata, f"{where}: {key}")
    try:
        return _replace(value, given)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def configure(cls: type, **values: Any):
    """A command config from options by name, every value checked as on the command line (scripts, tests)."""
    return build(cls, values)


@dataclass(frozen=True)
class RunOptions:
    """Where a run writes, and what it does with a run already there."""

    output_dir: str = option("runs/default", "Directory for the run's outputs: config.json, <command>.log and what "
                             "the command writes (its --help says what).")
    overwrite: bool = option(False, "Start again in an --output-dir that holds another run (its outputs are removed).")
    resume: bool = option(False, "Continue the run in --output-dir: train from its newest complete checkpoint; ttt, "
                          "evaluate and search-and-learn keep the tasks already done.")


@dataclass(frozen=True)
class HostOptions:
    """What a process takes of its machine, and how it talks."""

    threads: int = option(0, "torch threads per rank (0: this node's idle cores / ranks, less one per data worker "
                          "beyond the first, at least 1; OMP_NUM_THREADS wins when set).", min=0)
    verbose: bool = option(False, "Also print library messages (always written to the run's log file).")
    collective_timeout: float = option(900.0, "Seconds a collective (all-reduce, barrier) may wait for a peer rank "
                                       "before the run stops naming it.", min=1.0)
