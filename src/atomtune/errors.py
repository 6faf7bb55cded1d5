"""One exception type for every user-facing error: the CLI turns it into one line and exit code 2."""


class AtomtuneError(ValueError):
    """Bad input: a wrong option, a file that is missing or corrupt, an adapter for another model."""
