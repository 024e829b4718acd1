"""The one exception type users see: a one-line message that names the problem and the fix."""


class SurgeryError(Exception):
    """Bad input or an unmet precondition. The CLI prints it on one line and exits with code 2."""

    exit_code = 2
