"""Error types that carry a message a user can act on."""


class BNCompareError(Exception):
    """Base class of every error bn-compare raises on purpose."""


class ConfigError(BNCompareError, ValueError):
    """A configuration or model-specification value is invalid."""


class DataError(BNCompareError):
    """The Fashion-MNIST files are missing, corrupt or not what they claim."""


class BackendUnavailable(BNCompareError):
    """A framework cannot be imported or cannot use the requested device."""


class NonFiniteError(BNCompareError):
    """Training produced a NaN or infinite loss or input."""


def in_words(exc: BaseException, limit: int = 300, named: bool = True) -> str:
    """An exception on one line, its type (unless not `named`) and its words, at most `limit` characters of them:
    the reason a report records for what a tool refused (an exporter, a converter, a checker)."""
    text = " ".join(str(exc).split())
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(exc).__name__}: {text}" if named else text
