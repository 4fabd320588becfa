"""One exception type for every input problem hftune detects before (or instead of) training."""

import difflib


class HftuneError(ValueError):
    """A problem with the user's config, data or environment; the message names the fix.

    `hftune` prints it as one line and exits with status 2, without a traceback.
    """


def closest(name, choices):
    """` Did you mean 'x'?` for the closest valid choice, or '' when nothing is close."""
    match = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" Did you mean '{match[0]}'?" if match else ""
