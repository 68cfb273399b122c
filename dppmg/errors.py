"""The one exception type for mistakes a user can fix (bad config, bad input file, missing run).

The command line prints these as one clear message and exits non-zero without a traceback;
anything else is a bug and keeps its traceback.
"""


class DppmgError(Exception):
    """An expected, user-facing error: the message says what is wrong and where."""
