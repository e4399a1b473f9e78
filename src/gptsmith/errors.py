"""Errors a user can fix. The CLI prints their message (which names the file, line or field and the fix)
without a traceback and exits with status 2."""


class InputError(ValueError):
    """Bad input data: unreadable file, invalid UTF-8, malformed line, missing field, empty corpus."""
