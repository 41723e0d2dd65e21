"""The one exception a user's data can cause."""


class DemoFileError(ValueError):
    """A demonstration file (or a directory to import) is missing something or is malformed.

    The message names the file, the demo and the key at fault, and what to do about it.
    """
