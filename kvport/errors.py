"""Exception types shared across kvport. UserError is bad input from a user (a file, a flag, a config key):
the CLI prints its one-line message and exits 2, never a traceback. Internal bugs must not use it."""


class KvportError(Exception):
    """Base of kvport's own errors."""


class UserError(KvportError):
    """Bad input: the message is one line naming the file/field/value and what was expected."""
