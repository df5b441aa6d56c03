"""The exception hierarchy for all of plora.

It lives in the bottom layer (storage) so that every other layer can raise and catch the
same types. Messages quote what was received, what was expected, and how to fix it.
"""


class PloraError(Exception):
    """Base class of every error plora raises on purpose."""


class ConfigError(PloraError, ValueError):
    """Inconsistent or unsupported configuration."""


class VersionMismatchError(PloraError):
    """Two parties disagree on the backbone version or the adapter configuration."""


class AdapterFileError(PloraError):
    """An adapter file is corrupt, or was made for another backbone or configuration."""


class DataError(PloraError, ValueError):
    """User data that cannot be used for training or evaluation."""


class SessionError(PloraError):
    """A split session was used in a way its state does not allow."""


class ValidationError(PloraError, ValueError):
    """A protocol message or tensor failed validation."""


class NonFiniteError(ValidationError):
    """A tensor from the other party holds NaN or infinity."""


class DivergedError(PloraError):
    """The device's own numbers stopped being finite: training diverged (a learning rate too
    high for the data), and its M can no longer be used."""


class TransportError(PloraError):
    """The link between device and cloud failed."""


class RegistryError(PloraError):
    """The platform registry cannot do what was asked (missing or conflicting records)."""


class AuthenticationError(PloraError):
    """A request without valid device credentials."""


class CapacityError(PloraError):
    """A limit of the service was reached (sessions, tokens, message size)."""


def quoted(value: object, limit: int = 64) -> str:
    """`value` as repr, cut to `limit` characters: strings from the other party end up in
    errors and logs, and must not flood them."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 1]}…(+{len(text) - limit + 1} chars)"
