"""User-facing errors.

Anything a user can fix (a recipe key, a dataset row, a missing device) raises
`VlrlError`; the CLI prints its message as one line and exits non-zero, with no
traceback. Bugs stay ordinary exceptions so their tracebacks are kept.
"""


class VlrlError(Exception):
    """An error whose message alone tells the user what to fix."""


class RecipeError(VlrlError):
    """A recipe that does not validate: the message names the key path."""


class DataError(VlrlError):
    """A dataset file or row that cannot be used: the message names file and row."""


class DeviceError(VlrlError):
    """A requested device that this machine does not have."""


class NotAvailableYet(VlrlError):
    """A stage kind or feature that the recipe names but vlrl has not built yet."""
