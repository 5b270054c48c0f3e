"""Errors with a message a user can act on; the CLI prints them as one line."""


class DejaGuardError(Exception):
    """Bad input or an unsupported model: the message says what and, where possible, what to do."""


class NonFiniteError(DejaGuardError):
    """A model output or score was NaN or infinite."""
