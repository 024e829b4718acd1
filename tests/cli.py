"""Running the command line in tests, and reading its one-line errors."""

from click.testing import CliRunner

from surgery.cli import main


def run(*args, catch: bool = True):
    """`surgery ARGS` in this process; catch=False lets an unexpected exception fail the test with its traceback."""
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=catch)


def error_line(result) -> str:
    """The one line a refused command prints ("error: ..."), asserting it is the only one."""
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def one_line(result) -> str:
    """A refusal of bad input: exit code 2 and one line naming the problem."""
    assert result.exit_code == 2, result.output
    return error_line(result)
