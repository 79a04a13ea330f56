"""Shared pieces of the CLI: the typer app, the stderr console, rich progress, and one-line user errors."""

from __future__ import annotations

import errno
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console, ConsoleDimensions
from rich.markup import escape
from typer.core import TyperGroup

from vsectl import __version__
from vsectl.cli.progress import ConsoleProgress

T = TypeVar("T")
GLOBAL_FLAGS = ("--debug", "--verbose", "-v", "--quiet", "-q")  # accepted before or after the subcommand
METAVARS = {"set": "KEY=VALUE"}  # option name → metavar, where the upper-cased name would not say it


def hoist_global_flags(args: Sequence[str]) -> list[str]:
    """Move the global flags given after a subcommand to the front, so `vsectl eval RUN --debug` works too."""
    args = list(args)
    end = args.index("--") if "--" in args else len(args)  # after `--` everything is a positional value
    flags = [a for a in args[:end] if a in GLOBAL_FLAGS]
    return flags + [a for a in args[:end] if a not in GLOBAL_FLAGS] + args[end:]


def _flag_name(param: Any) -> str:
    longest = max(param.opts, key=len).lstrip("-")
    return METAVARS.get(longest, longest.replace("-", "_").upper())


def _plain_argument(param: Any) -> None:
    name = param.metavar = param.metavar or param.name.upper()
    param.display_type_rich = lambda ctx: None  # the name says it; typer would add `<path>`
    usage = (name if param.required else f"[{name}]") + ("..." if param.nargs != 1 else "")
    param._usage_display_name = lambda: usage  # typer writes a required argument as `{recipe}`


def plain_metavars(command: Any) -> None:
    """Plain help: `--protocol PROTOCOL`, `RECIPE`, bare flags, instead of typer's `<str>`, `{recipe}`, `<bool>`."""
    for param in command.params:
        if param.param_type_name == "argument":
            _plain_argument(param)
        elif getattr(param, "is_flag", False) or getattr(param, "count", False):
            param.metavar = ""
        elif param.metavar is None:
            param.metavar = _flag_name(param)
    original = command.get_help_option

    def help_option(ctx: Any) -> Any:
        option = original(ctx)
        if option is not None:
            option.metavar = ""
        return option

    command.get_help_option = help_option
    for sub in getattr(command, "commands", {}).values():
        plain_metavars(sub)


class VsectlGroup(TyperGroup):
    """The root command group: global flags anywhere on the line, plain metavars in every help page."""

    def main(self, args: Sequence[str] | None = None, *rest: Any, **kwargs: Any) -> Any:
        import typer.rich_utils

        if not sys.stdout.isatty() and "TERMINAL_WIDTH" not in os.environ:  # help piped or captured: no 80-col cut
            typer.rich_utils.MAX_WIDTH = HELP_WIDTH_NO_TTY
        plain_metavars(self)
        args = hoist_global_flags(sys.argv[1:] if args is None else args)
        STATE["command"] = self.command_of(args)
        return super().main(args, *rest, **kwargs)

    def command_of(self, args: Sequence[str]) -> Any:
        """The (sub)command `args` name, e.g. `eval` or `data prepare openclipart` (messages name its options)."""
        command: Any = self
        for word in args:
            sub = getattr(command, "commands", {}).get(word) if not word.startswith("-") else None
            if sub is None and not word.startswith("-"):
                break
            command = sub or command
        return command


class StderrConsole(Console):
    """The stderr console. Without a terminal (a log file, nohup, SLURM, CI) nothing is hard-wrapped: rich would
    wrap at 80 columns there and split log lines, paths and table rows in two; tables take their natural width."""

    @property
    def size(self) -> ConsoleDimensions:
        size = Console.size.fget(self)
        return size if self.is_terminal else ConsoleDimensions(NO_WRAP_WIDTH, size.height)

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        Console.size.fset(self, new_size)


NO_WRAP_WIDTH = 100_000  # "no wrapping": wider than any line vsectl writes
HELP_WIDTH_NO_TTY = 160  # --help without a terminal: help panels fill their width, so it stays finite, but past 80

app = typer.Typer(no_args_is_help=True, pretty_exceptions_show_locals=False, add_completion=False, cls=VsectlGroup,
                  help="Image-text retrieval with visual semantic embeddings and learned pooling (VSE∞).")
data_app = typer.Typer(no_args_is_help=True, help="Prepare and check datasets.")
app.add_typer(data_app, name="data")
err = StderrConsole(stderr=True)
STATE = {"debug": False}

RecipeArg = Annotated[Path, typer.Argument(help="YAML recipe, e.g. recipes/tiny.yaml")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Override a recipe value: a.b=c (repeatable)")]
DeviceOpt = Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")]


class RichProgress(ConsoleProgress):
    """The CLI's progress on its stderr console (`vsectl.cli.progress`): bars on a terminal, lines elsewhere."""

    def __init__(self, enabled: bool = True) -> None:
        super().__init__(err, enabled)


def interrupted(message: str) -> None:
    """Ctrl-C: say what was kept and how to go on, then exit with the shell's code for SIGINT (130)."""
    err.print(f"[yellow]interrupted:[/yellow] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(130)


# A recipe value a command without --set takes as an option of its own (eval reads a run, not a recipe).
SET_AS_OPTION = {"data.root": "--data-root"}
SET_HINT = re.compile(r"--set ([a-z_][\w.]*)=(\S*[^\s).,;])")


def command_hints(message: str, command: Any | None = None) -> str:
    """Name in `message` only options the running command has: the library's `--set KEY=VALUE` hints become the
    command's own option (`--data-root VALUE` for eval) or, where it has none, the recipe key to set."""
    command = command or STATE.get("command")
    if command is None:
        return message
    options = {opt for param in command.params for opt in getattr(param, "opts", [])}
    if "--set" in options:
        return message

    def render(match: re.Match) -> str:
        key, value = match.group(1), match.group(2)
        option = SET_AS_OPTION.get(key)
        return f"{option} {value}" if option in options else f"{key}: {value} in the training recipe"

    return SET_HINT.sub(render, message)


def fail(message: str) -> None:
    # escaped: a message such as "pip install 'vsectl[faiss]'" must not be read as rich markup
    message = command_hints(message)
    err.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)  # one line, however long
    raise typer.Exit(2)


# OS errors that are the user's to fix (a path, permissions, space) rather than a bug: one line, exit 2.
USER_OS_ERRORS = {errno.ENOENT: "no such file or folder", errno.EACCES: "permission denied",
                  errno.EPERM: "operation not permitted", errno.ENOTDIR: "a path component is a file, not a folder",
                  errno.EISDIR: "a folder where a file was expected", errno.ENOSPC: "no space left on the device",
                  errno.EDQUOT: "disk quota exceeded", errno.EFBIG: "file larger than the file system or the size "
                  "limit allows (ulimit -f)", errno.EROFS: "read-only file system",
                  errno.EEXIST: "already exists"}


def os_error_line(e: OSError) -> str:
    """One line for an OS error a user can fix: what went wrong, on which path, and what to do."""
    what = USER_OS_ERRORS[e.errno]
    where = f" ({e.filename})" if e.filename else ""
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return f"{what} while writing{where}; free space or choose another output folder (nothing finished is lost)"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR):
        return f"cannot write or read here: {what}{where}; check the path or choose another output folder"
    return f"{what}{where}"


def run_guarded(fn, *args, **kwargs):  # noqa: ANN001, ANN201 - a thin wrapper
    """Call a library function; a user's mistake becomes one red line and exit code 2 (traceback with --debug)."""
    from vsectl.errors import VsectlError

    try:
        return fn(*args, **kwargs)
    except VsectlError as e:
        if STATE["debug"]:
            raise
        fail(str(e))
    except OSError as e:
        if STATE["debug"] or e.errno not in USER_OS_ERRORS:
            raise
        fail(os_error_line(e))


def json_output(as_json: bool) -> None:
    """With --json stdout carries the JSON and stderr stays quiet (no tables, progress or info lines) unless -v."""
    if as_json and not STATE.get("verbose"):
        import logging

        STATE["quiet"] = True
        logging.getLogger("vsectl").setLevel(logging.WARNING)


def version_callback(value: bool) -> None:
    if value:
        typer.echo(f"vsectl {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only results on stdout.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=version_callback, is_eager=True)] = False,
) -> None:
    from vsectl.logs import process_rank, setup_logging

    STATE["debug"] = debug
    STATE["rank"] = process_rank()
    STATE["quiet"] = quiet or STATE["rank"] > 0  # a torchrun job's other ranks: no progress, no tables, no results
    STATE["verbose"] = verbose
    setup_logging(verbose=verbose, quiet=quiet, console=err)  # one console: logs print above the bars
