"""A redis-server with TLS on a loopback port, for the tests of a cache over ``rediss://``.

:func:`make_certificates` makes a throwaway CA, a server certificate for 127.0.0.1 and a
client certificate with the ``openssl`` command; :func:`tls_server` starts a
:class:`~stress.redis_server.RedisServer` that also listens with TLS (its plain port stays,
for the tests' own admin client). Skipped, with the reason, where ``openssl`` is missing or
the server was built without TLS.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

from stress.redis_server import RedisServer, free_port


@dataclass(frozen=True)
class Certificates:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def make_certificates(directory: Path) -> Certificates:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed: no certificates for a TLS server")
    ca, ca_key = directory / "ca.crt", directory / "ca.key"
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=writethrough test CA",
        "-keyout",
        str(ca_key),
        "-out",
        str(ca),
    )
    made = {}
    for name, extension in (
        ("server", "subjectAltName=IP:127.0.0.1"),
        ("client", "extendedKeyUsage=clientAuth"),
    ):
        key, request, cert = (directory / f"{name}.{s}" for s in ("key", "csr", "crt"))
        extensions = directory / f"{name}.ext"
        extensions.write_text(extension + "\n", encoding="ascii")
        _openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            f"/CN={name}",
            "-keyout",
            str(key),
            "-out",
            str(request),
        )
        _openssl(
            "x509",
            "-req",
            "-in",
            str(request),
            "-CA",
            str(ca),
            "-CAkey",
            str(ca_key),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            str(extensions),
            "-out",
            str(cert),
        )
        made[name] = (cert, key)
    return Certificates(ca, *made["server"], *made["client"])


class TlsServer:
    def __init__(self, server: RedisServer, tls_port: int, certificates: Certificates) -> None:
        self.server = server
        self.tls_port = tls_port
        self.certificates = certificates

    @property
    def url(self) -> str:
        """A ``rediss://`` URL that trusts the test CA (redis-py reads ``ssl_ca_certs``
        from the query)."""
        return f"rediss://127.0.0.1:{self.tls_port}/0?ssl_ca_certs={self.certificates.ca}"

    def client(self, **options: Any) -> redis.Redis:
        return redis.Redis.from_url(self.url, **options)

    def admin(self) -> redis.Redis:
        """On the plain port (the same server)."""
        return self.server.admin()


def tls_server_args(certificates: Certificates, auth_clients: bool = False) -> list[str]:
    """The ``redis-server`` options of a TLS port's certificates (the port itself apart)."""
    return [
        "--tls-cert-file",
        str(certificates.server_cert),
        "--tls-key-file",
        str(certificates.server_key),
        "--tls-ca-cert-file",
        str(certificates.ca),
        "--tls-auth-clients",
        "yes" if auth_clients else "no",
    ]


@contextmanager
def tls_server(certificates: Certificates, auth_clients: bool = False) -> Iterator[TlsServer]:
    tls_port = free_port()
    server = RedisServer(
        extra_args=["--tls-port", str(tls_port), *tls_server_args(certificates, auth_clients)]
    )
    try:
        server.start()
    except RuntimeError:
        server.stop()
        pytest.skip(f"{server.binary} does not start with TLS options (built without TLS?)")
    try:
        yield TlsServer(server, tls_port, certificates)
    finally:
        server.stop()
