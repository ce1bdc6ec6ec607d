"""ZeroMQ CURVE security: loopback by default, keys required for anything else.

Generate keys once with ``calm-rt keys --out keys/``: a server key pair, a
client key pair and ``keys/authorized/`` holding the public keys of clients
the server accepts (add one file per rig). The server then refuses, on every
socket it binds (publish, control, PULL ingest), any peer whose key is not
authorised: ZeroMQ drops the handshake, so such a peer receives nothing.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from calm_rt.errors import ConfigError

__all__ = [
    "CurveKeys",
    "CurveServer",
    "check_bind_policy",
    "generate_keys",
    "secure_client_socket",
]

_LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}


@dataclass(frozen=True)
class CurveKeys:
    """The server's secret key file and the folder of authorised client public keys."""

    server_secret: Path
    authorized: Path

    @classmethod
    def from_folder(cls, folder: str | Path) -> CurveKeys:
        folder = Path(folder)
        keys = cls(folder / "server.key_secret", folder / "authorized")
        if not keys.server_secret.exists() or not keys.authorized.is_dir():
            raise ConfigError(
                f"{folder} has no server.key_secret and authorized/; create it with `calm-rt keys --out {folder}`"
            )
        return keys


def generate_keys(out: str | Path) -> dict[str, Path]:
    """Create server and client key pairs and the authorised-clients folder in ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    server_public, server_secret = zmq.auth.create_certificates(out, "server")
    client_public, client_secret = zmq.auth.create_certificates(out, "client")
    (out / "authorized").mkdir(exist_ok=True)
    shutil.copy(client_public, out / "authorized" / "client.key")
    return {
        "server_public": Path(server_public),
        "server_secret": Path(server_secret),
        "client_public": Path(client_public),
        "client_secret": Path(client_secret),
    }


def _host(endpoint: str) -> str | None:
    if endpoint.startswith(("inproc://", "ipc://")):
        return None  # never leaves the machine
    parsed = urlparse(endpoint)
    host = parsed.hostname if parsed.hostname is not None else parsed.netloc.rsplit(":", 1)[0]
    return host


def is_loopback(endpoint: str) -> bool:
    host = _host(endpoint)
    return host is None or host in _LOOPBACK


def check_bind_policy(config: Any, keys: CurveKeys | None) -> None:
    """Refuse to expose a socket beyond this machine without CURVE keys."""
    endpoints = [config.publish, config.control, config.ingest]
    exposed = [e for e in endpoints if not is_loopback(e)]
    if exposed and keys is None:
        raise ConfigError(
            f"{', '.join(exposed)} would accept connections from the network; that needs CURVE keys: "
            "run `calm-rt keys --out keys/` and pass --keys keys/ (or bind 127.0.0.1)"
        )


class CurveServer:
    """CURVE for the sockets one server binds: one ZAP authenticator per ZeroMQ context.

    Built once by the server (before its threads start), so the threads only
    apply keys to their own sockets; :meth:`stop` ends the authenticator.
    """

    def __init__(self, ctx: zmq.Context, keys: CurveKeys) -> None:
        self._auth = ThreadAuthenticator(ctx)
        self._auth.start()
        self._auth.configure_curve(domain="*", location=str(keys.authorized))
        self._public, self._secret = zmq.auth.load_certificate(keys.server_secret)

    def secure(self, sock: zmq.Socket) -> None:
        """Make ``sock`` a CURVE server that only accepts authorised client keys."""
        sock.curve_secretkey = self._secret
        sock.curve_publickey = self._public
        sock.curve_server = True

    def stop(self) -> None:
        self._auth.stop()


def secure_client_socket(
    sock: zmq.Socket, client_secret: str | Path, server_public: str | Path
) -> None:
    """Make ``sock`` a CURVE client with its own key pair, trusting ``server_public``."""
    public, secret = zmq.auth.load_certificate(client_secret)
    server_key, _ = zmq.auth.load_certificate(server_public)
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_serverkey = server_key
