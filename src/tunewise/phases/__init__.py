"""Workflow phases: training, diagnosis, optimization, significance, decision, finalization and their gates.

Each phase is a function with explicit arguments and a return value; `tunewise.cli` only parses a verb's
arguments, calls one of them and maps the errors to an exit code.
"""


class CliError(RuntimeError):
    """An error whose message is the whole story: the CLI prints it without a traceback (exit code 2)."""
