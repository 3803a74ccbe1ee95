"""The one exception type for mistakes a user can fix.

The CLI prints a ``UserError`` as a single message and exits non-zero without a traceback; any other
exception is a bug in transfer and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's data, config or environment; the message must name the fix."""


class ReportedElsewhere(UserError):
    """A mistake that another process of the same multi-process run reports; this process exits quietly, so
    the user reads it once (from rank 0)."""
