"""The one exception type users see.

Anything that is the user's to fix (a wrong folder, a corrupt image, a checkpoint from another
model, an impossible setting) raises `MedsegError` with a one-line message that says what is
wrong, where, and how to fix it. The command line prints that line and exits with status 2,
without a traceback; everything else is a bug and keeps its traceback.
"""


class MedsegError(Exception):
    """A problem with the user's input or environment, described in one line."""
