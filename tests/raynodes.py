"""Real Ray nodes for the cluster tests: `ray start` processes found by their private temp dir.

Every node gets its own short --temp-dir (Ray's socket paths must stay under ~107 characters)
and RAY_TMPDIR; its processes carry that path in their environment, so a node is stopped by
killing exactly those PIDs (never `ray stop`, which stops every Ray on the machine). Ports are
fresh for every node: others run Ray on this machine too, and Redis holds 6379.

Also here: which TCP ports a set of processes listens on (from /proc), and the GCS's answer to a
gRPC call made with or without a token.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

RAY = str(Path(sys.executable).parent / "ray")
HEAD_IP = "127.0.0.2"  # see start_node: multi-node Ray needs node IPs other than 127.0.0.1


def new_token() -> str:
    return secrets.token_hex(32)


def free_ports(count: int) -> list[int]:
    """Distinct free loopback ports, held open together so none is handed out twice."""
    with contextlib.ExitStack() as stack:
        probes = [stack.enter_context(socket.socket()) for _ in range(count)]
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in probes]


def processes_with(marker: str) -> list[int]:
    """PIDs whose environment holds `marker` (a private RAY_TMPDIR): exactly what one test started."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            with contextlib.suppress(OSError):
                if marker.encode() in (entry / "environ").read_bytes():
                    found.append(int(entry.name))
    return found


def kill_pids(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    return inodes


def _listening_by_inode() -> dict[str, tuple[str, int]]:
    """inode -> (address, port) of every listening TCP socket in this network namespace."""
    found = {}
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A":  # TCP_LISTEN
                continue
            address, port = fields[1].split(":")
            raw = bytes.fromhex(address)
            raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))  # little-endian words
            found[fields[9]] = (socket.inet_ntop(family, raw), int(port, 16))
    return found


def listening(pids: list[int]) -> list[tuple[int, str, str, int]]:
    """(pid, process name, address, port) of every TCP port the processes listen on."""
    table = _listening_by_inode()
    rows = []
    for pid in pids:
        with contextlib.suppress(OSError):
            name = Path(f"/proc/{pid}/comm").read_text().strip()
            rows += [(pid, name, *table[i]) for i in _socket_inodes(pid) if i in table]
    return rows


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def gcs_call(gcs_address: str, token: str | None) -> str:
    """'OK' or the gRPC status name of one GCS call (GetClusterId), sent with `token` or none."""
    import grpc
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    metadata = [("authorization", f"Bearer {token}")] if token else []
    with grpc.insecure_channel(gcs_address) as channel:
        stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
        try:
            stub.GetClusterId(gcs_service_pb2.GetClusterIdRequest(), metadata=metadata, timeout=10)
        except grpc.RpcError as error:
            return error.code().name
    return "OK"


@dataclass
class Node:
    """One `ray start` node: its temp dir (the PID marker), node IP and, for a head, its ports."""

    temp_dir: str
    ip: str
    gcs_port: int | None = None
    dashboard_port: int | None = None
    env: dict[str, str] = field(default_factory=dict)

    @property
    def gcs_address(self) -> str:
        return f"{self.ip}:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://{self.ip}:{self.dashboard_port}"

    def pids(self) -> list[int]:
        return processes_with(f"RAY_TMPDIR={self.temp_dir}")

    def node_id(self) -> str:
        """The raylet's node id (hex), from its command line."""
        for pid in self.pids():
            with contextlib.suppress(OSError):
                args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                if args and args[0].endswith(b"/raylet"):
                    flag = next(a for a in args if a.startswith(b"--node_id="))
                    return flag.split(b"=", 1)[1].decode()
        raise LookupError(f"no raylet under {self.temp_dir}")

    def kill(self) -> None:
        kill_pids(self.pids())


def ray_env(temp_dir: str, token: str, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment minus any Ray setting of the developer's, with token auth on."""
    env = {k: v for k, v in (base or os.environ).items() if not k.startswith("RAY_")}
    return env | {
        "RAY_TMPDIR": temp_dir,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,
        "RAY_USAGE_STATS_ENABLED": "0",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
    }


def start_node(
    token: str,
    *,
    ip: str,
    head: Node | None = None,
    num_cpus: float = 1,
    num_gpus: float = 0,
    resources: str | None = None,
    dashboard: bool = False,
    base_env: dict[str, str] | None = None,
) -> Node:
    """`ray start --head` (head=None) or a worker joining `head`, with token auth and fresh ports.

    Node IPs: Ray binds every port to loopback only when a node's IP is exactly 127.0.0.1, and on
    Linux it rewrites 127.0.0.1 to the machine's routable IP unless its single-machine mode is on,
    which refuses worker nodes. A multi-node cluster therefore runs on other loopback addresses
    (127.0.0.2, .3, ...), one per node: every client reaches it only over loopback, but Ray's
    gRPC servers listen on all interfaces, and token auth is what keeps other hosts out.
    A lone head (for the Jobs API) can be bound to 127.0.0.1 itself: pass ip="127.0.0.1".
    """
    temp_dir = tempfile.mkdtemp(prefix="ln", dir="/tmp")
    env = ray_env(temp_dir, token, base_env)
    command = [
        RAY,
        "start",
        f"--node-ip-address={ip}",
        f"--num-cpus={num_cpus:g}",
        f"--num-gpus={num_gpus:g}",
        "--object-store-memory=100000000",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]
    if resources:
        command.append(f"--resources={resources}")
    gcs = dashboard_port = None
    if head is None:
        gcs, dashboard_port, agent, agent_grpc, metrics, runtime_env, client = free_ports(7)
        command += [
            "--head",
            f"--port={gcs}",
            f"--include-dashboard={'true' if dashboard else 'false'}",
            f"--dashboard-host={ip}",
            f"--dashboard-port={dashboard_port}",
            f"--dashboard-agent-listen-port={agent}",
            f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--metrics-export-port={metrics}",
            f"--runtime-env-agent-port={runtime_env}",
            f"--ray-client-server-port={client}",
        ]
        if ip == "127.0.0.1":
            env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # keep 127.0.0.1: loopback-only ports
    else:
        agent, agent_grpc, metrics, runtime_env = free_ports(4)
        command += [
            f"--address={head.gcs_address}",
            f"--dashboard-agent-listen-port={agent}",
            f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--metrics-export-port={metrics}",
            f"--runtime-env-agent-port={runtime_env}",
        ]
    node = Node(temp_dir, ip, gcs, dashboard_port if dashboard else None, env)
    started = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    if started.returncode != 0:
        stop_node(node)
        raise RuntimeError(f"ray start failed:\n{started.stdout}\n{started.stderr}")
    return node


def stop_node(node: Node) -> None:
    node.kill()
    shutil.rmtree(node.temp_dir, ignore_errors=True)


@contextlib.contextmanager
def cluster(
    token: str, workers: list[dict], *, head_cpus: float = 0, dashboard: bool = False
) -> Iterator[list[Node]]:
    """A head on HEAD_IP plus one worker per dict of start_node options (each its own IP)."""
    nodes: list[Node] = []
    try:
        nodes.append(start_node(token, ip=HEAD_IP, num_cpus=head_cpus, dashboard=dashboard))
        for i, options in enumerate(workers):
            nodes.append(start_node(token, ip=f"127.0.0.{3 + i}", head=nodes[0], **options))
        yield nodes
    finally:
        for node in reversed(nodes):
            stop_node(node)
