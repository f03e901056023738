"""One exception type for every mistake a user can fix.

The CLI prints a LabError as a single line and exits 2; anything else is a bug and keeps its
traceback.
"""


class LabError(Exception):
    """A problem with the user's input or environment, with the fix in the message."""
