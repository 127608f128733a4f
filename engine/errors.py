"""Errors a user can act on. The CLI prints them as one line and exits 2, with no traceback."""


class UserError(Exception):
    """A problem with the input or the options: the message names the file, line and field at fault."""
