"""Addresses on a network, framework-free: what an option naming a machine's HOST:PORT may hold."""

from __future__ import annotations

from .errors import ConfigError


def parse_address(address: str | None, flag: str = "--replica-address") -> tuple[str, int]:
    """HOST:PORT -> (HOST, PORT); a ConfigError naming `flag` otherwise."""
    host, _, port = (address or "").rpartition(":")
    if not (host and port.isdigit() and 0 < int(port) < 65536):
        raise ConfigError(f"{flag} must be HOST:PORT (e.g. 10.0.0.1:29500), got {address!r}")
    return host, int(port)
