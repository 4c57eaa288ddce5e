"""The one exception type users see, and the exit status of each kind of failure.

Anything that is the user's to fix (a wrong folder, a corrupt image, a checkpoint from another
model, an impossible setting) raises `MedsegError` with a one-line message that says what is
wrong, where, and how to fix it. The command line prints that line and exits with
`EXIT_BAD_INPUT`, without a traceback. Failures of the machine rather than the input (out of
memory, a disk error) get a line and an exit status of their own; anything else is a bug,
reported in one line that asks for ``--debug`` (or ``MEDSEG_DEBUG=1``), which shows the traceback.
"""

EXIT_OK = 0
EXIT_PARTIAL = 1  # some inputs failed (listed), the others were done
EXIT_BAD_INPUT = 2  # MedsegError, or a command line that does not parse
EXIT_OUT_OF_MEMORY = 3
EXIT_SYSTEM = 4  # an operating-system error nothing turned into a MedsegError
EXIT_BUG = 70  # BSD's EX_SOFTWARE: an internal error
EXIT_INTERRUPTED = 130  # Ctrl-C, as a shell reports SIGINT


class MedsegError(Exception):
    """A problem with the user's input or environment, described in one line."""
