"""Exceptions that carry a message meant for the user (bad input, missing column, bad flag)."""


class UserError(Exception):
    """A problem the user can fix: the CLI prints it without a traceback and exits with code 2.
    The message must name the file (or flag) and say what to do."""


class StageFailed(RuntimeError):
    """A stage's engine failed for a reason no single record can be blamed for (its workers died
    repeatedly, the cluster went away), and nothing was published. The CLI prints the message without
    a traceback and exits with code 1 (``MMCORPUS_LOG_LEVEL=DEBUG`` shows the traceback); the message
    must say what to check before the rerun."""


class InputSchemaError(UserError):
    """An input file lacks a required column or is not in the declared format."""
