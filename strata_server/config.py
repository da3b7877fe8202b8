"""The daemon's TOML config file (SPEC §9): what ``strata serve --config FILE`` reads.

A config that cannot be read or holds a wrong key is a :class:`ConfigError` naming the file and
the key, before anything is started.

Imports: the standard library only.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(Exception):
    """The config file is missing, is not TOML, or holds a missing or wrong key."""

    code = "invalid_config"

    def __init__(self, path: str, detail: str) -> None:
        self.path = path
        self.detail = detail
        super().__init__(f"{path}: {detail}")


@dataclass(frozen=True)
class RepositoryConfig:
    """A repository connected at start: its transient id, its format, the rest of its keys."""

    id: str
    format: str
    connection_parameters: dict[str, Any]


@dataclass(frozen=True)
class TcpConfig:
    host: str
    port: int
    certfile: str
    keyfile: str
    token_file: str

    def token(self) -> str:
        return Path(self.token_file).read_text().strip()


@dataclass(frozen=True)
class ServerConfig:
    host_id: str
    state_dir: str
    socket: str
    lease_timeout: float = 60.0
    repositories: tuple[RepositoryConfig, ...] = field(default_factory=tuple)
    tcp: TcpConfig | None = None


_TOP_KEYS = {"host_id", "state_dir", "lease_timeout", "socket", "repositories", "tcp"}
_TCP_KEYS = {"listen", "certfile", "keyfile", "token_file"}


def load_config(path: str | Path) -> ServerConfig:
    """Read and check the config at ``path``."""
    where = str(path)
    try:
        raw = tomllib.loads(Path(path).read_text())
    except OSError as e:
        raise ConfigError(where, f"cannot read it: {e.strerror or e}") from e
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(where, f"not valid TOML: {e}") from e
    return parse_config(raw, where)


def parse_config(raw: dict[str, Any], where: str = "<config>") -> ServerConfig:
    unknown = sorted(set(raw) - _TOP_KEYS)
    if unknown:
        raise ConfigError(where, f"unknown key(s) {unknown}; known: {sorted(_TOP_KEYS)}")
    host_id = _string(raw, "host_id", where)
    state_dir = _string(raw, "state_dir", where)
    socket = _string(raw, "socket", where)
    lease_timeout = raw.get("lease_timeout", 60.0)
    if isinstance(lease_timeout, bool) or not isinstance(lease_timeout, int | float):
        raise ConfigError(where, f"lease_timeout must be seconds, not {lease_timeout!r}")
    if lease_timeout <= 0:
        raise ConfigError(where, f"lease_timeout must be positive, not {lease_timeout!r}")
    repos = raw.get("repositories", [])
    if not isinstance(repos, list):
        raise ConfigError(where, "repositories must be an array of tables ([[repositories]])")
    parsed = tuple(_repository(r, i, where) for i, r in enumerate(repos))
    ids = [r.id for r in parsed]
    if len(set(ids)) != len(ids):
        raise ConfigError(where, f"repository ids must be distinct, got {ids}")
    tcp = _tcp(raw["tcp"], where) if "tcp" in raw else None
    return ServerConfig(host_id, state_dir, socket, float(lease_timeout), parsed, tcp)


def _string(table: dict[str, Any], key: str, where: str, prefix: str = "") -> str:
    if key not in table:
        raise ConfigError(where, f"missing key {prefix}{key}")
    value = table[key]
    if not isinstance(value, str) or not value:
        raise ConfigError(where, f"{prefix}{key} must be a non-empty string, not {value!r}")
    return value


def _repository(table: Any, index: int, where: str) -> RepositoryConfig:
    prefix = f"repositories[{index}]."
    if not isinstance(table, dict):
        raise ConfigError(where, f"repositories[{index}] must be a table")
    rest = {k: v for k, v in table.items() if k not in ("id", "format")}
    return RepositoryConfig(
        _string(table, "id", where, prefix), _string(table, "format", where, prefix), rest
    )


def _tcp(table: Any, where: str) -> TcpConfig:
    if not isinstance(table, dict):
        raise ConfigError(where, "tcp must be a table ([tcp])")
    unknown = sorted(set(table) - _TCP_KEYS)
    if unknown:
        raise ConfigError(where, f"unknown key(s) in [tcp]: {unknown}; known: {sorted(_TCP_KEYS)}")
    listen = _string(table, "listen", where, "tcp.")
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(where, f"tcp.listen must be HOST:PORT, not {listen!r}")
    return TcpConfig(
        host.strip("[]"),
        int(port),
        _string(table, "certfile", where, "tcp."),
        _string(table, "keyfile", where, "tcp."),
        _string(table, "token_file", where, "tcp."),
    )
