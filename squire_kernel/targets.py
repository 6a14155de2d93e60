"""Orchestrator addresses: one, or several replicas that follow the leader.

``"h1:p1,h2:p2"`` names the replicas of one orchestrator on a shared store:
one leads, the others stand by and answer health NOT_SERVING. The channel
goes to all of them with gRPC's round-robin policy and client-side health
checking (gRPC A17), so calls go to the replica that serves (the leader)
and move with it on a failover; while none serves they fail UNAVAILABLE,
which the SDK's reattach and the worker's reconnect ride out. A
``dns:///name:port`` target (one name resolving to every replica, as a
headless Service does) follows the leader the same way; any other single
address is used as given.
"""

from __future__ import annotations

import ipaddress
import json
import socket
from typing import Any

# Round-robin over the replicas that pass the health check: only the leader.
FOLLOW_THE_LEADER = json.dumps({
    "loadBalancingConfig": [{"round_robin": {}}],
    "healthCheckConfig": {"serviceName": ""},
})


def split(target: str) -> list[str]:
    return [part.strip() for part in target.split(",") if part.strip()]


def channel_target(target: str) -> tuple[str, list[tuple[str, Any]]]:
    """The gRPC target and extra channel options for ``target``.

    Raises ValueError naming an address that is not ``host:port`` or does
    not resolve."""
    parts = split(target)
    if len(parts) == 1 and parts[0].startswith("dns:///"):
        # One name for every replica (a headless Service): follow the leader too.
        return parts[0], [("grpc.service_config", FOLLOW_THE_LEADER)]
    if len(parts) <= 1:
        return target.strip(), []
    v4: list[str] = []
    v6: list[str] = []
    names: list[str] = []
    for part in parts:
        host, sep, port = part.rpartition(":")
        host = host.strip("[]")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"orchestrator address {part!r} is not host:port")
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            names.append(host)
            try:
                infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
            except OSError as exc:
                raise ValueError(f"orchestrator address {part!r} does not resolve: {exc}") from exc
            ip = ipaddress.ip_address(str(infos[0][4][0]))
        (v4 if ip.version == 4 else v6).append(f"[{ip}]:{port}" if ip.version == 6 else
                                               f"{ip}:{port}")
    if v4 and v6:
        raise ValueError(f"orchestrator addresses {target!r} mix IPv4 and IPv6")
    scheme = "ipv4" if v4 else "ipv6"
    options: list[tuple[str, Any]] = [("grpc.service_config", FOLLOW_THE_LEADER)]
    if names:  # TLS: check the certificate against the name given, not the IP
        options.append(("grpc.ssl_target_name_override", names[0]))
    return f"{scheme}:{','.join(v4 or v6)}", options
