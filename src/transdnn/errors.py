"""Typed errors: library code raises these; only the CLI turns them into messages and exit codes."""


class TransdnnError(Exception):
    """Base class: the message is the one line the user sees."""


class InputError(TransdnnError):
    """An input file (h5ad, CSV, checkpoint) is missing or violates the data contract."""


class ConfigError(TransdnnError):
    """params.yaml or a CLI option holds an unknown key, a wrong type or an impossible value."""


class OutputError(TransdnnError):
    """An output cannot be written where the settings put it: a file in the way, no permission, a full disk."""


class TrackingError(TransdnnError):
    """The MLflow store or registry cannot give what was asked for."""


class StoreFailure(TrackingError):
    """The MLflow store stopped answering, or failed a request, in the middle of a job."""


class ResourceError(TransdnnError):
    """The device ran out of memory for the data set and model asked of it."""


def first_line(exc: BaseException, limit: int = 160) -> str:
    """What a library's exception says, fit for the one line of ours that wraps it: its first non-blank
    line, capped, or its type where it says nothing (`str(exc).splitlines()[0]` fails on an empty message)."""
    line = next((text for text in str(exc).splitlines() if text.strip()), "")
    return line[:limit] if line else type(exc).__name__
