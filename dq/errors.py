"""The one exception type users see from dq."""


class DQError(Exception):
    """A problem the user can fix: the message says what was found, what was expected, and what to do."""
