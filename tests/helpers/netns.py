"""A throw-away two-node cluster on one machine: Linux network namespaces as hosts.

    with NetnsCluster() as net:                  # needs root and `ip` (iproute2)
        net.run("node2", ["getent", "hosts", "node1"])
        proc = net.popen("node1", ["torchrun", ...], env=env)

Layout (all names carry a per-process tag, e.g. `dsbt1234-node1`, so runs never collide):

* one namespace per node, each its own UTS host name (`node1`, `node2`, set by `unshare --uts` for every
  command run in it), loopback up;
* `d0`, the data interface: a veth into a bridge that lives in a separate switch namespace (10.77.1.K/24).
  The bridge joins only the node namespaces: no namespace has a route anywhere else, the root namespace
  gets no interface or address, so no packet can reach any address outside the namespaces made here;
* `m0`, a second interface on a network the other node is not on (10.77.2.K/32, a veth whose peer is
  attached to nothing: no route leads from it to the other node). Each node's own name resolves to its
  `m0` address (as where provisioning writes the management address into /etc/hosts), the other nodes'
  names to their `d0` addresses.
  Gloo, by default, binds to what the host name resolves to: without GLOO_SOCKET_IFNAME=d0 it would
  advertise the `m0` address, which the other node cannot reach; a wrong interface pick shows.

Name resolution is per namespace: what runs on a node sees /etc/netns/<namespace>/hosts bind-mounted over
/etc/hosts in a mount namespace of its own (as `ip netns exec` does), so the machine's /etc/hosts is never
edited. Teardown (also after a
failed start, and for leftovers of a killed earlier run) kills the processes inside our namespaces (all
started by us, found with `ip netns pids`), deletes the namespaces (their veths and the bridge go with
them) and removes /etc/netns/<namespace>/.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from tests.helpers.launch import SlurmCluster, Started, install_slurm

PREFIX = "dsbt"
DATA_IF, MGMT_IF = "d0", "m0"
DATA_NET, MGMT_NET = "10.77.1", "10.77.2"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def netns_unavailable_reason() -> Optional[str]:
    """None when network namespaces can be made here, else why not."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "unshare", "nsenter"):
        if not shutil.which(tool):
            return f"`{tool}` is not installed"
    return None


def _pids(ns: str) -> list[int]:
    proc = _ip("netns", "pids", ns, check=False)
    return [int(p) for p in proc.stdout.split() if p.isdigit()] if proc.returncode == 0 else []


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def kill_namespace_processes(ns: str, grace_s: float = 5.0) -> None:
    """SIGTERM, then SIGKILL, every process inside namespace `ns` (ours: we made the namespace)."""
    pids = _pids(ns)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            pids = _pids(ns)
            if not pids:
                return
            time.sleep(0.1)


def _delete_namespace(ns: str) -> None:
    kill_namespace_processes(ns)
    _ip("netns", "del", ns, check=False)
    shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)


def remove_stale() -> None:
    """Namespaces left by an earlier run of these tests that was killed (its tag's process is gone)."""
    listing = _ip("netns", "list", check=False).stdout.split("\n")
    for line in listing:
        name = line.split(" ")[0].strip()
        tag = name.split("-")[0]
        if name.startswith(PREFIX) and tag[len(PREFIX):].isdigit() and not _alive(int(tag[len(PREFIX):])):
            _delete_namespace(name)


class NetnsCluster(Started):
    """Two (or more) hosts as network namespaces; see the module doc. Use as a context manager."""

    def __init__(self, nodes: Sequence[str] = ("node1", "node2"), tag: Optional[str] = None):
        self.tag = tag or f"{PREFIX}{os.getpid()}"
        self.nodes = list(nodes)
        self.ns = {n: f"{self.tag}-{n}" for n in self.nodes}
        self.switch = f"{self.tag}-sw"
        self.addr = {n: f"{DATA_NET}.{i + 1}" for i, n in enumerate(self.nodes)}
        self.mgmt_addr = {n: f"{MGMT_NET}.{i + 1}" for i, n in enumerate(self.nodes)}
        self._made: list[str] = []

    # -- set-up and teardown
    def start(self) -> "NetnsCluster":
        remove_stale()
        sw = self.switch
        self._add_ns(sw)
        _ip("-n", sw, "link", "set", "lo", "up")
        _ip("-n", sw, "link", "add", "br-data", "type", "bridge")
        _ip("-n", sw, "link", "set", "br-data", "up")
        for i, node in enumerate(self.nodes):
            ns = self.ns[node]
            self._add_ns(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
            for ifname, peer, addr in ((DATA_IF, f"n{i + 1}d", self.addr[node]),
                                       (MGMT_IF, f"n{i + 1}m", self.mgmt_addr[node])):
                _ip("-n", sw, "link", "add", peer, "type", "veth", "peer", "name", ifname, "netns", ns)
                if ifname == DATA_IF:
                    _ip("-n", sw, "link", "set", peer, "master", "br-data")
                _ip("-n", sw, "link", "set", peer, "up")
                # m0 as a /32: no route from it to any other node, so a wrong pick fails at once
                _ip("-n", ns, "addr", "add", f"{addr}/{24 if ifname == DATA_IF else 32}", "dev", ifname)
                _ip("-n", ns, "link", "set", ifname, "up")
            etc = Path("/etc/netns") / ns
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text(self.hosts_file(node))
        self._wait_reachable()
        return self

    def _add_ns(self, ns: str) -> None:
        _ip("netns", "add", ns)
        self._made.append(ns)

    def hosts_file(self, node: str) -> str:
        lines = ["127.0.0.1 localhost", "::1 localhost ip6-localhost ip6-loopback",
                 f"{self.mgmt_addr[node]} {node}  # own name -> the second interface (see tests/helpers/netns.py)"]
        lines += [f"{self.addr[n]} {n}" for n in self.nodes if n != node]
        return "\n".join(lines) + "\n"

    def _wait_reachable(self, timeout_s: float = 20) -> None:
        """Bridge ports start in the `listening` state: wait until node1 reaches every other node."""
        first = self.nodes[0]
        deadline = time.monotonic() + timeout_s
        for node in self.nodes[1:]:
            while not self.reachable(first, self.addr[node]):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{first} cannot reach {node} ({self.addr[node]}) over {DATA_IF}")
                time.sleep(0.2)

    def reachable(self, node: str, addr: str, port: int = 9) -> bool:
        """From `node`, does `addr` answer (a refused TCP connection counts: no ping needed)?"""
        probe = ("import socket, sys\ns = socket.socket(); s.settimeout(1)\n"
                 "try:\n    s.connect((sys.argv[1], int(sys.argv[2])))\nexcept ConnectionRefusedError:\n    pass\n"
                 "except OSError:\n    sys.exit(1)\n")
        return self.run(node, [sys.executable, "-c", probe, addr, str(port)], check=False).returncode == 0

    def stop(self) -> None:
        for ns in reversed(self._made):
            _delete_namespace(ns)
        self._made.clear()
        try:
            Path("/etc/netns").rmdir()  # only when empty: another user's files stay
        except OSError:
            pass

    # -- running things on a node
    def prefix(self, node: str) -> list[str]:
        """Command prefix that runs the rest inside `node`: its network, its /etc/hosts, its host name."""
        # Not `ip netns exec`: it would also mount a fresh /sys, without /sys/fs/cgroup (slurmd needs it).
        ns = self.ns[node]
        return ["nsenter", f"--net=/var/run/netns/{ns}", "unshare", "--mount", "--uts", "--",
                "sh", "-c", 'mount --bind "$1" /etc/hosts && hostname "$0" && shift && exec "$@"',
                node, str(Path("/etc/netns") / ns / "hosts")]

    def popen(self, node: str, cmd: Sequence[str], **kwargs) -> subprocess.Popen:
        return subprocess.Popen([*self.prefix(node), *cmd], **kwargs)

    def run(self, node: str, cmd: Sequence[str], check: bool = True, timeout: float = 60,
            **kwargs) -> subprocess.CompletedProcess:
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        proc = subprocess.run([*self.prefix(node), *cmd], timeout=timeout, **kwargs)
        if check and proc.returncode != 0:
            raise RuntimeError(f"on {node}: {' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}")
        return proc

    def pids(self, node: str) -> list[int]:
        return _pids(self.ns[node])

    def kill_node(self, node: str) -> list[int]:
        """SIGKILL every process of `node` at once, as a node that loses power. Returns their pids."""
        pids = self.pids(node)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return pids


class NetnsSlurmCluster(SlurmCluster):
    """slurmctld on the first node, one slurmd per node (`slurmd -N nodeK`, NodeAddr its d0 address), one
    munged for all (a Unix socket in `root`, reachable from every namespace). Client commands (sbatch,
    scontrol, ...) run on the first node. Use as a context manager, inside the NetnsCluster's."""

    def __init__(self, root, net: NetnsCluster, slurmd_timeout_s: int = 30):
        super().__init__(root)
        self.net, self.slurmd_timeout = net, slurmd_timeout_s
        self.host = net.nodes[0]
        self.client = net.prefix(self.host)

    def _write_conf(self) -> None:
        super()._write_conf()
        r, net = self.root, self.net
        mem_mb = int(next(l for l in open("/proc/meminfo") if l.startswith("MemTotal")).split()[1]) // 1024
        per_node = max(256, (mem_mb - 1024) // len(net.nodes))
        for node in net.nodes:
            (r / "spool" / node).mkdir(parents=True, exist_ok=True)
        # The namespaces have ports of their own: the standard ones are free.
        replace = {
            "SlurmctldHost": f"{self.host}({net.addr[self.host]})",
            "SlurmctldPort": "6817", "SlurmdPort": "6818",
            "SlurmdSpoolDir": f"{r}/spool/%n", "SlurmdPidFile": f"{r}/slurmd-%n.pid",
            "SlurmdLogFile": f"{r}/log/slurmd-%n.log",
            "SlurmdTimeout": str(self.slurmd_timeout),  # a node that stops answering is DOWN after this
        }
        lines = []
        for line in self.conf.read_text().splitlines():
            key = line.split("=", 1)[0]
            if key in ("NodeName", "PartitionName"):
                continue
            lines.append(f"{key}={replace[key]}" if key in replace else line)
        lines += [f"NodeName={n} NodeAddr={net.addr[n]} NodeHostname={n} CPUs={os.cpu_count()} "
                  f"RealMemory={per_node} State=UNKNOWN" for n in net.nodes]
        lines.append(f"PartitionName=debug Nodes={','.join(net.nodes)} Default=YES MaxTime=INFINITE State=UP "
                     "OverSubscribe=NO")
        self.conf.write_text("\n".join(lines) + "\n")

    def start(self, timeout_s: float = 90) -> "NetnsSlurmCluster":
        install_slurm()
        self._write_conf()
        m = self.root / "munge"
        self._spawn(["munged", "-F", "--force", f"--socket={m}/munge.socket", f"--key-file={self.key}",
                     f"--pid-file={m}/munged.pid", f"--log-file={m}/munged.log", f"--seed-file={m}/seed"])
        self._wait(lambda: (m / "munge.socket").exists(), 15, "munged did not start")
        self._spawn(["slurmctld", "-D", "-i", "-f", str(self.conf)], prefix=tuple(self.client))
        for node in self.net.nodes:
            self._spawn(["slurmd", "-D", "-N", node, "-f", str(self.conf)], prefix=tuple(self.net.prefix(node)),
                        name=f"slurmd-{node}")

        def idle() -> bool:
            states = self.node_states()
            return set(states) == set(self.net.nodes) and set(states.values()) <= {"idle", "mix"}

        self._wait(idle, timeout_s, "the Slurm nodes did not become idle")
        return self

    def node_states(self) -> dict:
        """{node: sinfo state}, e.g. {'node1': 'idle', 'node2': 'down*'}."""
        out = subprocess.run([*self.client, "sinfo", "-h", "-N", "-o", "%N %t"], env=self.env,
                             capture_output=True, text=True, timeout=30)
        return dict(line.split() for line in out.stdout.splitlines() if len(line.split()) == 2)

    def restart_slurmd(self, node: str, timeout_s: float = 60) -> None:
        """The node is back (after NetnsCluster.kill_node): a fresh slurmd; ReturnToService=2 puts it in use."""
        self.procs = [p for p in self.procs if not (p.name == f"slurmd-{node}" and p.poll() is not None)]
        self._spawn(["slurmd", "-D", "-N", node, "-f", str(self.conf)], prefix=tuple(self.net.prefix(node)),
                    name=f"slurmd-{node}")
        self._wait(lambda: self.node_states().get(node) in ("idle", "mix"), timeout_s, f"{node} did not return")


def ssh_unavailable_reason() -> Optional[str]:
    if Path("/usr/sbin/sshd").exists() and shutil.which("ssh") and shutil.which("ssh-keygen"):
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "openssh-server is not installed and cannot be installed (needs root and apt-get)"
    return None


def install_ssh(packages: Sequence[str] = ("openssh-server", "pdsh")) -> None:
    """Debian's openssh-server (and pdsh), never started as a service: our sshd runs inside the namespaces."""
    missing = [p for p, path in (("openssh-server", "/usr/sbin/sshd"), ("pdsh", "/usr/bin/pdsh"))
               if p in packages and not Path(path).exists()]
    if not missing:
        return
    policy = Path("/usr/sbin/policy-rc.d")  # Debian's "do not start services from postinst" hook
    ours = not policy.exists()
    if ours:
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
    try:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        cmd = ["apt-get", "install", "-y", "--no-install-recommends", *missing]
        if subprocess.run(cmd, env=env, capture_output=True, timeout=900).returncode != 0:  # stale package lists?
            subprocess.run(["apt-get", "update", "-qq"], env=env, check=True, capture_output=True, timeout=900)
            subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=900)
    finally:
        if ours:
            policy.unlink()


class SshNodes(Started):
    """An sshd on every node (port 22 of its namespace), accepting root with a key made for the test, and
    `bin/ssh`: an `ssh` for PATH that uses that key and trusts any host key. Nothing in ~/.ssh or
    /etc/ssh is read or written. Use as a context manager, inside the NetnsCluster's."""

    def __init__(self, root, net: NetnsCluster):
        self.root, self.net = Path(root), net
        self.bin = self.root / "bin"
        self.procs: list[subprocess.Popen] = []
        self._made_privsep = False

    def start(self, timeout_s: float = 20) -> "SshNodes":
        install_ssh()
        r = self.root
        self.bin.mkdir(parents=True, exist_ok=True)
        for key in ("host_key", "id_test"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(r / key)], check=True,
                           capture_output=True, timeout=30)
        (r / "authorized_keys").write_text((r / "id_test.pub").read_text())
        (r / "ssh_config").write_text(f"""\
Host *
  User root
  IdentityFile {r}/id_test
  IdentitiesOnly yes
  StrictHostKeyChecking no
  UserKnownHostsFile /dev/null
  GlobalKnownHostsFile /dev/null
  BatchMode yes
  LogLevel ERROR
  ConnectTimeout 10
""")
        ssh = self.bin / "ssh"
        ssh.write_text(f'#!/bin/sh\nexec /usr/bin/ssh -F {r}/ssh_config "$@"\n')
        ssh.chmod(0o755)
        privsep = Path("/run/sshd")  # sshd refuses to start without its privilege-separation directory
        if not privsep.exists():
            privsep.mkdir(mode=0o755)
            self._made_privsep = True
        for node in self.net.nodes:
            conf = r / f"sshd_config-{node}"
            conf.write_text(f"""\
Port 22
HostKey {r}/host_key
AuthorizedKeysFile {r}/authorized_keys
PidFile {r}/sshd-{node}.pid
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
X11Forwarding no
LogLevel ERROR
""")
            log = open(r / f"sshd-{node}.log", "w")
            self.procs.append(self.net.popen(node, ["/usr/sbin/sshd", "-D", "-e", "-f", str(conf)],
                                             stdout=log, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + timeout_s
        for node in self.net.nodes:
            while self.ssh(self.net.nodes[0], node, "true").returncode != 0:
                dead = [p.args for p in self.procs if p.poll() is not None]
                if dead or time.monotonic() > deadline:
                    logs = "".join((r / f"sshd-{n}.log").read_text() for n in self.net.nodes)
                    raise RuntimeError(f"cannot ssh from {self.net.nodes[0]} to {node}: {logs}")
                time.sleep(0.2)
        return self

    def ssh(self, from_node: str, to_node: str, command: str) -> subprocess.CompletedProcess:
        return self.net.run(from_node, [str(self.bin / "ssh"), to_node, command], check=False, timeout=30)

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs.clear()
        if self._made_privsep:
            shutil.rmtree("/run/sshd", ignore_errors=True)
            self._made_privsep = False


try:  # pytest fixture: `from tests.helpers.netns import netns_cluster`
    import pytest

    @pytest.fixture(scope="session")
    def netns_cluster():
        reason = netns_unavailable_reason()
        if reason:
            pytest.skip(reason)
        net = NetnsCluster()
        try:
            net.start()
        except (OSError, RuntimeError, subprocess.SubprocessError) as err:
            net.stop()
            pytest.skip(f"cannot make network namespaces here: {err}")
        try:
            yield net
        finally:
            net.stop()
except ImportError:  # pragma: no cover
    pass
