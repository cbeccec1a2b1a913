"""Exceptions that carry a message meant for the user (bad input, missing column, bad flag)."""


class UserError(Exception):
    """A problem the user can fix: the CLI prints it without a traceback and exits with code 2.
    The message must name the file (or flag) and say what to do."""


class InputSchemaError(UserError):
    """An input file lacks a required column or is not in the declared format."""
