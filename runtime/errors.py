"""The project's exception types: a mistake in the user's input, and a stop on a signal."""


class UserError(Exception):
    """A mistake in the user's input: printed as one line, exit status 2, no traceback."""


class Interrupted(Exception):
    """The run stopped on SIGTERM / SIGINT after saving a checkpoint; exit status 128 + signal."""

    def __init__(self, signum: int, msg: str):
        super().__init__(msg)
        self.signum = signum
