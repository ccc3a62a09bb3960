"""CURVE keys: load them with clear errors, and put them on sockets.

Keys are zmq.auth certificate files (``zchat-keygen`` makes them): ``NAME.key``
holds the public key, ``NAME.key_secret`` both keys. The broker needs its own
secret file and a directory of the public files of the clients it admits;
a client needs the broker's public file and its own secret file.

Defines: ``KeyFileError``,
``ClientKeys``, ``ServerKeys``, ``load_client_keys``, ``load_server_keys``,
``keys_from_env``, ``make_keypair``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
import zmq.auth

from zchat.errors import ZchatError

__all__ = [
    "ClientKeys",
    "KeyFileError",
    "ServerKeys",
    "keys_from_env",
    "load_client_keys",
    "load_server_keys",
    "make_keypair",
]


class KeyFileError(ZchatError):
    """A key file is missing, unreadable or not a certificate."""


@dataclass(frozen=True, slots=True)
class ClientKeys:
    """What a client needs for CURVE: the broker's public key and its own pair."""

    server_public: bytes
    public: bytes
    secret: bytes

    def apply(self, sock: zmq.Socket[Any]) -> None:
        """Make ``sock`` a CURVE client of the broker (before connect)."""
        sock.curve_serverkey = self.server_public
        sock.curve_publickey = self.public
        sock.curve_secretkey = self.secret


@dataclass(frozen=True, slots=True)
class ServerKeys:
    """What the broker needs: its key pair and the directory of admitted clients."""

    public: bytes
    secret: bytes
    authorized: Path

    def apply(self, sock: zmq.Socket[Any]) -> None:
        """Make ``sock`` a CURVE server (before bind)."""
        sock.curve_server = True
        sock.curve_publickey = self.public
        sock.curve_secretkey = self.secret


def _load(path: str | os.PathLike[str], *, secret: bool) -> tuple[bytes, bytes | None]:
    file = Path(path)
    try:
        public, secret_key = zmq.auth.load_certificate(file)
    except (OSError, ValueError) as exc:
        raise KeyFileError(f"cannot read key file {file}: {exc}") from exc
    if secret and secret_key is None:
        raise KeyFileError(f"{file} holds no secret key (use the .key_secret file)")
    return public, secret_key


def load_client_keys(server_key: str | os.PathLike[str],
                     key: str | os.PathLike[str]) -> ClientKeys:
    """Keys from the broker's public file and the client's secret file."""
    server_public, _ = _load(server_key, secret=False)
    public, secret = _load(key, secret=True)
    return ClientKeys(server_public, public, secret or b"")


def keys_from_env(environ: Mapping[str, str] | None = None) -> ClientKeys | None:
    """Client keys named by ``ZCHAT_SERVER_KEY`` and ``ZCHAT_KEY``, if set.

    For programs configured by their environment (containers, bots).

    Raises:
        KeyFileError: only one of the two is set, or a file is bad.
    """
    env = os.environ if environ is None else environ
    server_key, key = env.get("ZCHAT_SERVER_KEY") or None, env.get("ZCHAT_KEY") or None
    if server_key is None and key is None:
        return None
    if server_key is None or key is None:
        raise KeyFileError("ZCHAT_SERVER_KEY and ZCHAT_KEY go together")
    return load_client_keys(server_key, key)


def load_server_keys(secret_key: str | os.PathLike[str],
                     authorized: str | os.PathLike[str]) -> ServerKeys:
    """The broker's pair and the directory of admitted client public keys."""
    public, secret = _load(secret_key, secret=True)
    directory = Path(authorized)
    if not directory.is_dir():
        raise KeyFileError(f"authorized keys {directory} is not a directory")
    return ServerKeys(public, secret or b"", directory)


def make_keypair(directory: str | os.PathLike[str], name: str) -> tuple[Path, Path]:
    """Write ``NAME.key`` and ``NAME.key_secret`` (mode 0600) in ``directory``."""
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    public, secret = zmq.auth.create_certificates(folder, name)
    os.chmod(secret, 0o600)
    return Path(public), Path(secret)
