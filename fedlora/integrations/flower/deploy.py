"""Helpers behind ``fedlora flower ...``: the commands of a deployment, and Flower's connection file.

Flower 1.41 keeps SuperLink connections in ``$FLWR_HOME/config.toml``
(``~/.flwr/config.toml``): ``flwr run APP CONNECTION`` reads the address and
TLS settings of ``[superlink.CONNECTION]`` there.
"""
from __future__ import annotations

import os
import shlex
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

from .config import QUIET_ENV

LOCAL_SIMULATION = ":local:"  # flwr's address for a SuperLink it starts itself, in simulation mode


def flower_config_path() -> Path:
    home = os.environ.get("FLWR_HOME")
    return (Path(home) if home else Path.home() / ".flwr") / "config.toml"


def env_lines() -> list[str]:
    """``export`` lines that keep Flower, its runtime and Ray off the network (telemetry, update checks, uv)."""
    return [f"export {k}={v}" for k, v in QUIET_ENV.items()]


def write_connection(name: str, address: str, *, insecure: bool = False, root_certificates: str | None = None,
                     num_supernodes: int | None = None, default: bool = False,
                     path: Path | None = None) -> Path:
    """Add or replace ``[superlink.NAME]`` in Flower's config file; returns the file.

    address: the SuperLink's host:port, or ":local:" for a local simulation
    (num_supernodes: how many virtual SuperNodes it runs).
    """
    import tomli_w  # a dependency of flwr

    if not insecure and root_certificates is None and address != LOCAL_SIMULATION:
        raise ValueError("a remote SuperLink needs --root-certificates (TLS) or, on a trusted network, --insecure")
    path = path or flower_config_path()
    data = tomllib.loads(path.read_text()) if path.is_file() else {
        "superlink": {"default": "local", "local": {"address": LOCAL_SIMULATION}}}
    conn: dict = {"address": address}
    if address != LOCAL_SIMULATION:
        conn["insecure"] = bool(insecure)
    if root_certificates is not None:
        conn["root-certificates"] = str(Path(root_certificates).expanduser().resolve())
    if num_supernodes is not None:
        conn["options"] = {"num-supernodes": int(num_supernodes)}
    superlinks = data.setdefault("superlink", {})
    superlinks[name] = conn
    if default:
        superlinks["default"] = name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(data))
    return path


def deployment_commands(app: str, superlink_host: str, *, nodes: int, fleet_port: int = 9093,
                        node_port: int = 9094, connection: str = "fedlora", insecure: bool = True,
                        certificates: str = "certificates") -> list[str]:
    """The shell commands that run ``app`` on a SuperLink with ``nodes`` SuperNodes (one per client).

    superlink_host: the address SuperNodes and ``flwr`` reach the SuperLink at
    (127.0.0.1 for a single machine). TLS (insecure=False) expects
    ``{certificates}/ca.crt``, ``server.pem`` and ``server.key`` (the server's must
    name superlink_host).
    """
    q = shlex.quote
    bind = "127.0.0.1" if superlink_host in ("127.0.0.1", "localhost") else superlink_host
    link_tls = ["--insecure"] if insecure else [
        "--ssl-ca-certfile", f"{certificates}/ca.crt", "--ssl-certfile", f"{certificates}/server.pem",
        "--ssl-keyfile", f"{certificates}/server.key"]
    node_tls = ["--insecure"] if insecure else ["--root-certificates", f"{certificates}/ca.crt"]
    address = f"{superlink_host}:{fleet_port}"
    out = ["# every machine: keep Flower, its runtime and Ray off the network", *env_lines(), "",
           "# the SuperLink (one machine)",
           " ".join(["flower-superlink", *link_tls, "--host", bind, "--port", str(fleet_port),
                     "--disable-runtime-dependency-installation"]), "",
           "# one SuperNode per client (node k holds the data's k-th training client; add rank=R to override)"]
    for k in range(nodes):
        node_config = f"partition-id={k} num-partitions={nodes}"
        out.append(" ".join(["flower-supernode", *node_tls, "--superlink", address, "--host", "127.0.0.1",
                             "--port", str(node_port + k), "--node-config", q(node_config)]))
    tls = ["--insecure"] if insecure else ["--root-certificates", f"{certificates}/ca.crt"]
    out += ["", "# where you run flwr: register the SuperLink once, then start the run",
            " ".join(["fedlora", "flower", "connection", connection, "--address", address, *tls]),
            " ".join(["flwr", "run", q(app), connection, "--stream"]),
            f"# without --stream flwr run returns at once: follow the run with `flwr log RUN_ID {connection}`, "
            f"list runs with `flwr ls {connection}`"]
    return out
