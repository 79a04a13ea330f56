"""What every refusal test checks of the CLI: exit code 2 and exactly one line on stderr, "error: …", no traceback."""

from __future__ import annotations


def one_error_line(result) -> str:  # noqa: ANN001 - click's Result
    """Assert `result` (a CliRunner result) is a one-line refusal and return that line."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]
