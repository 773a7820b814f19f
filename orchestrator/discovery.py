"""Finding the generator replicas: a fixed URL list, or the DNS records of a headless Service.

With `services.generator_dns: generator-headless.pairloop.svc.cluster.local:8000` every pod IP
behind the Service becomes one replica; the orchestrator swaps each of them and spreads generation
over them. Resolution is repeated before every swap, so a replica added mid-run is found and
brought to the current weights before it serves the loop.
"""

from __future__ import annotations

import ipaddress
import socket

from orchestrator.config import ServicesConfig
from pairloop.errors import ServiceUnavailableError

__all__ = ["generator_urls"]


def _url(ip: str, port: int) -> str:
    host = f"[{ip}]" if ipaddress.ip_address(ip).version == 6 else ip
    return f"http://{host}:{port}"


def generator_urls(services: ServicesConfig) -> list[str]:
    """Every generator replica's base URL, in a stable order."""
    if not services.generator_dns:
        return list(services.generator_urls)
    host, _, port_text = services.generator_dns.rpartition(":")
    port = int(port_text)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ServiceUnavailableError(
            f"services.generator_dns: cannot resolve {host!r} ({exc.strerror}); is the headless "
            "Service up and does the orchestrator run in its namespace?"
        ) from None
    ips = sorted({str(info[4][0]) for info in infos})
    if not ips:
        raise ServiceUnavailableError(f"services.generator_dns: {host!r} has no addresses")
    return [_url(ip, port) for ip in ips]
