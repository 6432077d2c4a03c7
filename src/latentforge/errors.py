"""User-facing errors. The CLI prints `error: <message>` on one line and exits 2 — no traceback.

Raise `UserError` for anything a user can fix (a bad path, flag, file or config); its message must
name the file/flag/key and say what to do.
"""


class UserError(Exception):
    """A mistake the user can fix; printed as one line by the CLI."""
