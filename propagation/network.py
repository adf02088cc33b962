"""What a service needs to know of the network, in one place.

Hosts as gRPC reads them, loopback or not, the bind a server will do, addresses as gRPC
writes them, the message limit.
"""

from __future__ import annotations

import errno
import ipaddress
import re
import socket
import urllib.parse
from typing import Iterable

# Every message of this contract is well under a kilobyte; gRPC's default is 4 MiB.
MAX_MESSAGE_BYTES = 64 * 1024

# Host names as gRPC resolves them: labels of 1 to 63 characters, no dot at the end.
MAX_HOST = 253
LABEL = re.compile(r"[A-Za-z0-9_-]{1,63}")
# A label that reads as a number (or as hex, "0x7f"): the host is then an IPv4 address,
# which gRPC reads as four decimal numbers only.
NUMERIC_LABEL = re.compile(r"[0-9]+|0[xX][0-9A-Fa-f]*")
DECIMAL_BYTE = re.compile(r"0|[1-9][0-9]{0,2}")
SCOPE = re.compile(r"[A-Za-z0-9_.-]+")
# gRPC reads "unix:7010" as the unix socket "7010", whatever the case: a target that
# starts with the name of one of its resolvers is a URI of that scheme, not host:port.
GRPC_SCHEMES = frozenset({"dns", "ipv4", "ipv6", "unix", "unix-abstract", "vsock", "xds", "google-c2p"})


def host_problem(host: str, port: int) -> str | None:
    """Why gRPC would not read ``host:port`` as this host and port, or not resolve it as Python does; None if it would.

    Python's resolver is more lenient than gRPC's: it takes ``127.1``, ``2130706433`` and
    ``0x7f000001`` as 127.0.0.1, ``0177.0.0.1`` as 127.0.0.1 where gRPC reads 177.0.0.1,
    and ``localhost.`` with its final dot; a label that is empty (``agent..lan``) or over 63
    characters fails there with a ``UnicodeError``.
    """
    if len(host) > MAX_HOST:
        return f"a host name has at most {MAX_HOST} characters"
    if ":" in host:
        address, percent, scope = host.partition("%")
        try:
            ipaddress.IPv6Address(address)
        except ValueError:
            return "not a host name, and not an IPv6 address"
        bad_scope = percent and not SCOPE.fullmatch(scope)
        return "an IPv6 address's scope (after %) is an interface name or number" if bad_scope else None
    labels = (host[:-1] if host.endswith(".") else host).split(".")
    wrong = next((label for label in labels if not LABEL.fullmatch(label)), "")
    scheme = host.lower()
    ipv4 = len(labels) == 4 and all(DECIMAL_BYTE.fullmatch(label) and int(label) < 256 for label in labels)
    problems = (
        ("" in labels, "it has an empty label (a dot at the start or two in a row)"),
        (wrong != "", f"its label {wrong[:70]!r} is not 1 to 63 letters, digits, '-' or '_'"),
        (host.endswith("."), f"gRPC does not resolve a name that ends with a dot; write {host[:-1]!r}"),
        (
            NUMERIC_LABEL.fullmatch(labels[-1]) and not ipv4,
            "not an IPv4 address as gRPC reads it (four numbers 0 to 255, without leading zeros, e.g."
            " 127.0.0.1); Python reads short and hex forms, gRPC does not",
        ),
        (scheme in GRPC_SCHEMES, f"gRPC reads '{host}:{port}' as a {scheme}: address, not as a host and port"),
    )
    return next((problem for failed, problem in problems if failed), None)


def check_port_free(host: str, port: int) -> None:
    """Tries the bind that gRPC will do, to name the problem in one line.

    gRPC reports a failed bind as a generic error (and a C-level log line); a plain
    socket tells why.

    Raises:
        ValueError: the host does not resolve, is not an address of this machine, or
            the port is in use there.

    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        msg = f"host {host!r} does not resolve: {exc.strerror}"
        raise ValueError(msg) from None
    except UnicodeError:  # a label that is empty or too long (host_problem says which)
        msg = f"host {host!r} is not a valid host name"
        raise ValueError(msg) from None
    for family, kind, proto, _, sockaddr in infos:
        with socket.socket(family, kind, proto) as probe:
            # As gRPC does: connections of a stopped server in TIME_WAIT must not
            # block a restart, while a live listener still does.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                probe.bind(sockaddr)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    msg = f"port {port} on {host} ({sockaddr[0]}) is already in use"
                elif exc.errno == errno.EADDRNOTAVAIL and family == socket.AF_INET6 and len(infos) > 1:
                    continue  # no IPv6 here: gRPC binds the IPv4 address alone
                else:
                    msg = f"cannot listen on {host}:{port} ({sockaddr[0]}): {exc.strerror}"
                raise ValueError(msg) from None


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine's loopback only: a peer there is never behind a thin link."""
    addresses = _resolve(host)
    return bool(addresses) and all(ipaddress.ip_address(address.split("%")[0]).is_loopback for address in addresses)


def addresses_of(hosts: Iterable[str]) -> set[str]:
    """The IP addresses the hosts resolve to now; a host that does not resolve adds none."""
    found = (_normal(address) for host in set(hosts) for address in _resolve(host))
    return {address for address in found if address}


def _resolve(host: str) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):  # UnicodeError: a label that is empty or too long
        return []
    return [info[4][0] for info in infos]


def grpc_address(host: str, port: int) -> str:
    """``host:port`` as gRPC reads it: an IPv6 address goes in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def address_of_peer(peer: str) -> str:
    """The IP address in gRPC's name for a peer (``ipv4:10.0.0.2:5000``, ``ipv6:%5B::1%5D:5000``).

    IPv4 in IPv6 form (``::ffff:10.0.0.2``) comes back as IPv4, a peer not on IP as its name.
    """
    kind, _, rest = peer.partition(":")
    address = kind in ("ipv4", "ipv6") and _normal(urllib.parse.unquote(rest).rpartition(":")[0].strip("[]"))
    return address or peer


def _normal(host: str) -> str | None:
    """An IP address as ``str(ipaddress.ip_address())`` writes it, IPv4 in IPv6 form as IPv4."""
    try:
        address = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return None
    return str(getattr(address, "ipv4_mapped", None) or address)
