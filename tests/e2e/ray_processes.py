"""A real Ray cluster of `ray start` processes on this host: a head (GCS, dashboard, Jobs server) and
worker nodes, each its own raylet with its own resources, as a user starts them on machines.

Every process runs `ray start --block` in a session of its own, with a private temp dir and
unique ports, so the cluster is stopped by its process groups and by the processes naming its
GCS port, never by `ray stop` (which stops every Ray on the machine, a user's too).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import psutil

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RAY = os.path.join(os.path.dirname(sys.executable), "ray")
# a lost node is declared dead within ~1 s instead of ~30 s
FAST_HEALTH = '{"health_check_period_ms":300,"health_check_failure_threshold":3,"health_check_timeout_ms":300}'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ports(*flags: str) -> list[str]:
    return [f"{flag}={free_port()}" for flag in flags]


class RayStartCluster:
    """`ray start --head` plus `add_node()` for each further raylet; `shutdown()` always."""

    def __init__(self, env: dict[str, str] | None = None, head_cpus: int = 1) -> None:
        # short private dir: Ray's sockets live under it (paths must stay under ~107 bytes)
        self.tmp = tempfile.mkdtemp(prefix="rj", dir="/tmp")
        self.env = dict(os.environ, **(env or {}), PYTHONPATH=REPO, RAY_TMPDIR=self.tmp,
                        PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
        self.env.pop("RAY_ADDRESS", None)
        # the cluster's own auth mode, not whatever a token in ~/.ray makes `ray start` pick; every
        # client of it (`client_env`) says the same
        self.env["RAY_AUTH_MODE"] = "disabled"
        self.port, self.dashboard_port = free_port(), free_port()
        self.address = f"127.0.0.1:{self.port}"                       # for `wintok tokenize --address`
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"    # for `wintok submit --address`
        self.nodes: dict[str, subprocess.Popen] = {}
        self._start("head", ["--head", f"--port={self.port}", "--include-dashboard=true",
                             "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
                             f"--system-config={FAST_HEALTH}", f"--num-cpus={head_cpus}", "--resources={\"head\": 1}",
                             *_ports("--ray-client-server-port")])
        try:
            self.wait_nodes(1)
        except BaseException:
            self.shutdown()
            raise

    def _start(self, name: str, args: list[str]) -> None:
        cmd = [RAY, "start", "--block", "--disable-usage-stats", f"--temp-dir={self.tmp}",
               "--node-ip-address=127.0.0.1", *args,
               *_ports("--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
                       "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port")]
        log = open(os.path.join(self.tmp, f"{name}.out"), "ab")
        self.nodes[name] = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)

    def client_env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """The environment of a command run against this cluster (`wintok tokenize --address`, `submit`)."""
        env = dict(os.environ, PYTHONPATH=REPO, RAY_AUTH_MODE=self.env["RAY_AUTH_MODE"], **(extra or {}))
        env.pop("RAY_ADDRESS", None)
        return env

    def add_node(self, name: str, cpus: int = 1) -> None:
        """A further raylet joining the head, with its own CPUs and a resource named after it."""
        self._start(name, [f"--address={self.address}", f"--num-cpus={cpus}", f'--resources={{"{name}": 1}}'])

    def alive_nodes(self) -> list[dict]:
        """The cluster's alive nodes from the head's state API: node_id, is_head_node, resources_total."""
        from ray.util.state import list_nodes

        return [n.__dict__ if hasattr(n, "__dict__") else dict(n)
                for n in list_nodes(address=self.dashboard, filters=[("state", "=", "ALIVE")],
                                    raise_on_missing_output=False)]

    def node_id(self, name: str) -> str:
        return next(n["node_id"] for n in self.alive_nodes() if name in (n.get("resources_total") or {}))

    def wait_nodes(self, n: int, timeout: float = 120) -> None:
        deadline, last = time.time() + timeout, None
        while time.time() < deadline:
            for name, p in self.nodes.items():
                if p.poll() is not None:
                    raise RuntimeError(f"`ray start` of {name} exited {p.returncode}: {self.log(name)[-2000:]}")
            try:
                if len(self.alive_nodes()) == n:
                    return
            except Exception as e:  # noqa: BLE001 - the dashboard is still starting
                last = e
            time.sleep(0.5)
        raise TimeoutError(f"{n} Ray nodes did not come up in {timeout:g} s ({last}): {self.log('head')[-2000:]}")

    def log(self, name: str) -> str:
        with open(os.path.join(self.tmp, f"{name}.out"), errors="replace") as f:
            return f.read()

    def kill_node(self, name: str) -> None:
        """The node is lost at once: SIGKILL to its `ray start`, raylet and everything it started."""
        self._kill_group(self.nodes.pop(name), signal.SIGKILL)

    @staticmethod
    def _kill_group(p: subprocess.Popen, sig: int, wait: float = 10) -> None:
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            pass
        try:
            p.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=10)

    def _leftovers(self) -> list[psutil.Process]:
        """Processes of this cluster outside the killed groups (workers Ray put in sessions of their
        own): those naming its GCS port or its temp dir on their command line."""
        mark = re.compile(rf"127\.0\.0\.1:{self.port}(?!\d)|{re.escape(self.tmp)}(?![\w])")
        found = []
        for p in psutil.process_iter(["pid", "cmdline"]):
            cmdline = " ".join(p.info["cmdline"] or [])
            if p.pid != os.getpid() and mark.search(cmdline):
                found.append(p)
        return found

    def shutdown(self) -> None:
        """Stop the cluster: SIGTERM to each `ray start --block` (it stops its processes), then
        SIGKILL to what is left of it."""
        for name in [n for n in self.nodes if n != "head"] + (["head"] if "head" in self.nodes else []):
            self._kill_group(self.nodes.pop(name), signal.SIGTERM, wait=3)  # the head takes ~30 s otherwise
        for p in self._leftovers():
            try:
                p.kill()
            except psutil.Error:
                pass
        shutil.rmtree(self.tmp, ignore_errors=True)
