"""The one exception type for expected bad input; the CLI prints it as one line and exits 2."""


class UserError(ValueError):
    """Bad input a user can fix (config, files, shapes); never carries a traceback to the terminal."""
