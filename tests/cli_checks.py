"""What every refusal test checks of the CLI: exit code 2 and exactly one line on stderr, "error: …", no traceback."""

from __future__ import annotations


def one_error_line(result) -> str:  # noqa: ANN001 - click's Result
    """Assert `result` (a CliRunner result) is a one-line refusal and return that line."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


GLOBAL_OPTIONS = {"--debug", "--verbose", "-v", "--quiet", "-q", "--help", "--version"}


def _command(app, words: list[str]):  # noqa: ANN001, ANN202 - typer app, click command
    """The click command `words` name (e.g. ["data", "prepare", "openclipart"]); None when they name none."""
    import typer.main

    cmd = typer.main.get_command(app)
    for word in words:
        sub = getattr(cmd, "commands", {}).get(word)
        if sub is None:
            break
        cmd = sub
    return cmd


def hint_options(line: str, argv: list[str], app) -> list[str]:  # noqa: ANN001 - the typer app
    """The `--options` a message names that the command they are meant for does not have.

    An option written after `vsectl <command>` in the same clause belongs to that command; after `pip install` to
    pip; any other belongs to the command that was run (`argv`, its leading global flags skipped).
    """
    import re

    ran = [a for a in argv if not a.startswith("-")][:3]
    missing = []
    for clause in re.split(r"[;:(,]\s|\) ", line):
        owner = ran
        for token in re.findall(r"vsectl(?: [a-z][a-z-]*)+|pip install|--[a-z][a-z-]*", clause):
            if token.startswith("vsectl"):
                owner = token.split()[1:]
            elif token == "pip install":
                owner = None
            elif owner is not None and token not in GLOBAL_OPTIONS:
                cmd = _command(app, owner)
                opts = {o for p in cmd.params for o in getattr(p, "opts", []) + getattr(p, "secondary_opts", [])}
                if token not in opts:
                    missing.append(f"{token} (on {' '.join(owner)})")
    return missing
