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


def validation_line(errors: list[dict], loc: str, expected: str | None = None) -> str:
    """`loc: what was expected (got the value) [+n more error(s)]` for the first of pydantic's
    `ValidationError.errors()`: one line for the CLI, where pydantic's own message is a dozen
    lines with links. Shared by the recipe and the reward stack config, so both read alike."""
    err = errors[0]
    if expected is None:
        t = err["type"]
        msg = err["msg"].removeprefix("Value error, ")
        expected = "unknown key" if t == "extra_forbidden" else "missing required key" if t == "missing" else msg[:1].lower() + msg[1:]
    got = ""
    if err["type"] not in ("missing", "union_tag_not_found") and "input" in err and not isinstance(err["input"], dict | list):
        got = f" (got {err['input']!r})"
    more = f" [+{len(errors) - 1} more error(s)]" if len(errors) > 1 else ""
    return f"{loc}: {expected}{got}{more}"
