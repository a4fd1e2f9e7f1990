"""The lab's own error types: what the command line reports as a message, not a traceback.

Every error the user can fix (a configuration that cannot run, missing or corrupt data, a
checkpoint that does not fit or does not read, a run folder in use, a diverged or interrupted
run) derives from :class:`UserError`; ``kalmannorm`` prints its message on one line and exits
with :attr:`UserError.exit_code`. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """An error the user can fix; the message says how."""

    exit_code = 2
