"""Two network hosts on this machine, for the multi-node tests: two network namespaces joined by a veth pair.

    with two_hosts() as hosts:
        procs = [hosts.launch(rank, ["ssvit/pretrain.py", ...]) for rank in (0, 1)]

Each host has its own network stack (loopback, one interface, one address in 10.213.0.0/24, a private range
used only inside these namespaces), so `accelerate launch --num_machines 2` talks TCP between them as between
two machines; the file system is shared, as on a cluster with a shared disk. Needs root and iproute2. The
namespaces (and with them the veth pair) are deleted on exit, whatever happened.

Run by hand: `python tests/two_hosts.py -- ssvit/pretrain.py --max_steps 5 ...` launches both ranks and
prints their output.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ADDRESSES = ("10.213.0.1", "10.213.0.2")
PORT = 29500


def why_not() -> str | None:
    """None when this machine can make the hosts, else the reason (for pytest.skip)."""
    if os.name != "posix" or os.geteuid() != 0:
        return "creating network namespaces needs root"
    if shutil.which("ip") is None:
        return "iproute2 (the ip command) is not installed"
    probe = f"ssvitprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode:
        return f"ip netns add failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _kill_all_in(namespace: str) -> None:
    pids = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


@dataclass
class Hosts:
    names: tuple[str, str]
    interfaces: tuple[str, str]

    def launch(self, rank: int, args: list[str], env: dict, processes_per_host: int = 1, log: Path | None = None):
        """`accelerate launch` of rank `rank` inside its host. Returns the Popen; its output goes to `log`."""
        launcher = str(Path(sys.executable).with_name("accelerate"))
        cmd = ["ip", "netns", "exec", self.names[rank], launcher, "launch", "--multi_gpu",
               "--num_machines", "2", "--machine_rank", str(rank), "--num_processes", str(2 * processes_per_host),
               "--main_process_ip", ADDRESSES[0], "--main_process_port", str(PORT),
               "--mixed_precision", "no", "--dynamo_backend", "no", *args]  # fmt: skip
        # gloo must use the host's own interface, not guess from the host name (which both hosts share).
        env = dict(env, GLOO_SOCKET_IFNAME=self.interfaces[rank])
        out = open(log, "w") if log else subprocess.DEVNULL
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)

    def kill(self, rank: int) -> None:
        """SIGKILL every process of host `rank`, as if the machine died. (Killing the launcher is not enough:
        torch's elastic agent starts each worker in a session of its own, which outlives it.)"""
        _kill_all_in(self.names[rank])


@contextmanager
def two_hosts():
    tag = f"ssvit{os.getpid() % 100000}"
    names, interfaces = (f"{tag}h0", f"{tag}h1"), (f"{tag}a", f"{tag}b")  # interface names: 15 characters at most
    try:
        for name in names:
            _ip("netns", "add", name)
            _ip("-n", name, "link", "set", "lo", "up")
        _ip("link", "add", interfaces[0], "type", "veth", "peer", "name", interfaces[1])
        for name, interface, address in zip(names, interfaces, ADDRESSES):
            _ip("link", "set", interface, "netns", name)
            _ip("-n", name, "addr", "add", f"{address}/24", "dev", interface)
            _ip("-n", name, "link", "set", interface, "up")
        yield Hosts(names, interfaces)
    finally:
        for name in names:  # deleting a namespace deletes the veth end inside it, and so the pair
            _kill_all_in(name)  # nothing a test started outlives it
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        subprocess.run(["ip", "link", "del", interfaces[0]], capture_output=True)  # if it never moved into one


if __name__ == "__main__":
    args = sys.argv[sys.argv.index("--") + 1 :] if "--" in sys.argv else sys.argv[1:]
    with two_hosts() as hosts:
        procs = [hosts.launch(rank, args, dict(os.environ), log=Path(f"host{rank}.log")) for rank in (0, 1)]
        codes = [p.wait(timeout=600) for p in procs]
    for rank in (0, 1):
        print(f"--- host {rank} (exit {codes[rank]}) ---\n" + Path(f"host{rank}.log").read_text()[-3000:])
    sys.exit(max(codes))
