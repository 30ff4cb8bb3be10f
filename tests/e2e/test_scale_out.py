"""Scale-out: two appliance hosts and one load balancer host, provisioned by the playbook.

Each host is a Debian 12 root (the cached debootstrap of test_appliance plus NGINX and
OpenSSH, as a cloud image has them) booted with systemd-nspawn inside a network namespace the
test creates; a bridge in a namespace of its own joins them on 10.231.0.0/24, and nothing is
routed anywhere else. The operator's workstation is one more namespace: Ansible runs there
over SSH against an inventory with `appliances` and `load_balancers` groups, and so does the
client traffic (loadtests/traffic.py: every request counted, none retried by the client).

Proven: the load balancer's upstream comes from the inventory and spreads requests over both
appliances; a rolling update (serial: 1, each host drained from the load balancer first and
returned once ready) under continuous load loses no request and leaves the new model version
serving everywhere; an appliance host stopped abruptly (link down, every process killed) costs
at most the requests it had in flight, and none after.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from loadtests.edge import lab_tls
from loadtests.traffic import Report
from tests.conftest import ROOT
from tests.e2e.conftest import DRILL_REPORTS, ROOTFS_CACHE, base_rootfs, children, json_lines
from tests.e2e.test_appliance import dist

pytestmark = [pytest.mark.root, pytest.mark.slow]

BIN = Path(sys.executable).parent
LAB_PACKAGES = ["nginx", "openssh-server", "python3-cryptography"]
NET = "10.231.0"
NAME = "appliance.test"
HOSTS = {"lb-1": f"{NET}.10", "appliance-1": f"{NET}.11", "appliance-2": f"{NET}.12"}
CONTROL = f"{NET}.100"
# Client requests/s of the drills' traffic: each request is a new connection, whose port the
# workstation keeps in TIME_WAIT for 60 s; unpaced (~1000/s) a rolling update ran out of them.
RATE = 200
# Lab hosts get fresh host keys at every run: nothing to remember them by.
SSH_OPTIONS = ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null"]
BODY = json.dumps(
    {"inputs": [{"name": "input", "shape": [1, 30], "datatype": "FP32", "data": [0.5] * 30}]}
)


def sh(*cmd: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=check)


def _lab_image() -> Path:
    """The base root plus what a Debian cloud image brings for this: NGINX, sshd (cached)."""
    base = base_rootfs()
    digest = hashlib.sha256(" ".join(LAB_PACKAGES).encode()).hexdigest()[:8]
    image = ROOTFS_CACHE / f"{base.name}-lab-{digest}"
    if (image / ".complete").exists():
        return image
    if image.exists():
        shutil.rmtree(image)
    sh("cp", "-a", "--reflink=auto", str(base), str(image))
    (image / ".complete").unlink()
    policy = image / "usr" / "sbin" / "policy-rc.d"
    policy.write_text("#!/bin/sh\nexit 101\n")  # install, do not start services
    policy.chmod(0o755)
    env = ["env", "DEBIAN_FRONTEND=noninteractive"]
    sh("chroot", str(image), *env, "apt-get", "update", "-qq", timeout=600)
    sh(
        "chroot",
        str(image),
        *env,
        "apt-get",
        "install",
        "-y",
        "-qq",
        "--no-install-recommends",
        *LAB_PACKAGES,
        timeout=900,
    )
    sh("chroot", str(image), "apt-get", "clean")
    policy.unlink()
    for key in (image / "etc" / "ssh").glob("ssh_host_*"):
        key.unlink()  # each host makes its own
    (image / ".complete").touch()
    return image


@dataclass
class Host:
    name: str
    address: str
    netns: str
    root: Path
    process: subprocess.Popen[bytes] | None = None

    def init_pid(self) -> int:
        """The container's PID 1 as the host sees it (nspawn's child)."""
        assert self.process is not None
        return children(self.process.pid)[0]


@dataclass
class Lab:
    tmp: Path
    hosts: dict[str, Host]
    control: str
    key: Path
    tls: dict[str, Path]
    artifact: Path
    inventory: Path

    def in_control(self, *cmd: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return sh("ip", "netns", "exec", self.control, *cmd, timeout=timeout, check=False)

    def playbook(self, *args: str, **extra: Any) -> subprocess.CompletedProcess[str]:
        variables = {
            "onnx_appliance_artifact": str(self.artifact),
            "onnx_appliance_workers": 1,
            "nginx_site_server_name": NAME,
            "nginx_site_ipv6": False,
            "nginx_site_tls_certificate_src": str(self.tls["cert"]),
            "nginx_site_tls_certificate_key_src": str(self.tls["key"]),
            "nginx_site_trusted_proxies": [HOSTS["lb-1"]],
            "nginx_lb_server_name": NAME,
            "nginx_lb_ipv6": False,
            "nginx_lb_tls_certificate_src": str(self.tls["cert"]),
            "nginx_lb_tls_certificate_key_src": str(self.tls["key"]),
            "nginx_lb_upstream_ca_src": str(self.tls["ca"]),
            "nginx_lb_connect_timeout": 1,
            "nginx_lb_upstream_timeout": 5,
            "nginx_lb_fail_timeout": 30,
            # One client sends all the traffic here: lift the per-client limits.
            "nginx_lb_rate_limit": 100000,
            "nginx_lb_rate_burst": 100000,
            "nginx_site_rate_limit": 100000,
            "nginx_site_rate_burst": 100000,
            **extra,
        }
        env = [
            "env",
            f"PATH={BIN}:{os.environ.get('PATH', '')}",
            "ANSIBLE_NOCOLOR=1",
            "ANSIBLE_HOST_KEY_CHECKING=False",
            "ANSIBLE_FORKS=3",
        ]
        return subprocess.run(
            [
                "ip", "netns", "exec", self.control, *env,
                str(BIN / "ansible-playbook"), "-i", str(self.inventory), "playbooks/site.yml",
                "-e", json.dumps(variables), *args,
            ],
            cwd=ROOT / "ansible", capture_output=True, text=True, timeout=1200, check=False,
        )  # fmt: skip

    def ssh(self, host: str, command: str) -> subprocess.CompletedProcess[str]:
        return self.in_control(
            "ssh", "-i", str(self.key), "-o", "BatchMode=yes", "-o", "ConnectTimeout=2",
            *SSH_OPTIONS, f"root@{HOSTS[host]}", command, timeout=120,
        )  # fmt: skip

    def diagnose(self, run: subprocess.CompletedProcess[str]) -> str:
        """The play's tail and each appliance's journal, for a failure message."""
        journals = "".join(
            f"\n--- {h} ---\n"
            + self.ssh(
                h, "journalctl -u onnx-appliance -u nginx -n 30 --no-pager -o cat; ss -ltn"
            ).stdout
            for h in HOSTS
            if h.startswith("appliance")
        )
        return run.stdout[-6000:] + run.stderr[-2000:] + journals

    def curl(self, path: str, *args: str) -> subprocess.CompletedProcess[str]:
        return self.in_control(
            "curl", "-sS", "--max-time", "20", "--cacert", str(self.tls["ca"]),
            "--resolve", f"{NAME}:443:{HOSTS['lb-1']}", *args, f"https://{NAME}{path}",
        )  # fmt: skip

    def capacity(self, name: str) -> dict[str, Any]:
        """Locust (loadtests/loadtest.py) from the workstation at the service's name: 48 users
        offering far more than the lab can serve for 10 s, so what it serves is its capacity."""
        slo = self.tmp / "capacity.toml"
        slo.write_text(
            '[scenario.capacity]\nuser_class = "TabularSingle"\nusers = 48\nuser_rate = 100.0\n'
            'run_time = "10s"\np95_ms = 5000\np99_ms = 10000\nmax_error_ratio = 0.0\n'
            "min_rps = 50\n"
        )
        out = self.tmp / name
        run = self.in_control(
            sys.executable, str(ROOT / "loadtests" / "loadtest.py"), "--host", f"https://{NAME}",
            "--ca", str(self.tls["ca"]), "--slo", str(slo), "--out", str(out), timeout=300,
        )  # fmt: skip
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        result: dict[str, Any] = json.loads((out / "summary.json").read_text())
        return result["scenarios"]["capacity"]

    def lb_log(self) -> list[dict[str, Any]]:
        path = self.hosts["lb-1"].root / "var/log/nginx/onnx-appliance-lb.access.log"
        return json_lines(path) if path.exists() else []

    @contextlib.contextmanager
    def traffic(self, name: str, threads: int = 6) -> Iterator[dict[str, Any]]:
        """Client traffic from the workstation namespace until the block ends."""
        stop, out = self.tmp / f"{name}.stop", self.tmp / f"{name}.json"
        process = subprocess.Popen(
            [
                "ip", "netns", "exec", self.control, sys.executable, "-m", "loadtests.traffic",
                "--address", HOSTS["lb-1"], "--server-name", NAME, "--ca", str(self.tls["ca"]),
                "--body", BODY, "--threads", str(threads), "--max-seconds", "400",
                "--timeout", "30", "--rate", str(RATE), "--stop-file", str(stop),
                "--out", str(out),
            ],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        holder: dict[str, Any] = {}
        try:
            time.sleep(2)
            yield holder
        finally:
            stop.touch()
            _, err = process.communicate(timeout=60)
            assert process.returncode == 0, err
            holder["report"] = Report.from_json(json.loads(out.read_text()))


def _network(suffix: str) -> tuple[str, dict[str, str]]:
    """A bridge namespace and one namespace per host; returns (bridge ns, host -> ns)."""
    bridge = f"oa{suffix}-sw"
    sh("ip", "netns", "add", bridge)
    sh("ip", "-n", bridge, "link", "add", "br0", "type", "bridge")
    sh("ip", "-n", bridge, "link", "set", "br0", "up")
    names: dict[str, str] = {}
    for i, (host, address) in enumerate([*HOSTS.items(), ("control", CONTROL)]):
        ns = f"oa{suffix}-{i}"
        names[host] = ns
        sh("ip", "netns", "add", ns)
        sh("ip", "-n", bridge, "link", "add", f"v{i}", "type", "veth", "peer", "eth0", "netns", ns)
        sh("ip", "-n", bridge, "link", "set", f"v{i}", "master", "br0", "up")
        sh("ip", "-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
    return bridge, names


def _boot(host: Host, pubkey: str, log: Path) -> None:
    root = host.root
    (root / "etc" / "hostname").write_text(host.name + "\n")
    sh("chroot", str(root), "ssh-keygen", "-A")
    ssh_dir = root / "root" / ".ssh"
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    (ssh_dir / "authorized_keys").write_text(pubkey)
    (ssh_dir / "authorized_keys").chmod(0o600)
    # The image's package lists count as fresh: these hosts have no route to a mirror.
    stamp = root / "var" / "lib" / "apt" / "periodic" / "update-success-stamp"
    stamp.parent.mkdir(parents=True, exist_ok=True)
    stamp.touch()
    with log.open("wb") as out:
        host.process = subprocess.Popen(
            [
                "systemd-nspawn", "-q", "-b", "-D", str(root), "-M", host.name,
                f"--network-namespace-path=/run/netns/{host.netns}",
                "--keep-unit", "--register=no",
            ],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip


def _wait_ssh(lab: Lab, host: Host, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        booted = lab.ssh(host.name, "systemctl is-system-running --wait >/dev/null; true")
        if booted.returncode == 0:
            return
        time.sleep(1)
    raise AssertionError(f"{host.name}: no ssh in {timeout}s")


def _stop(host: Host) -> None:
    if host.process is None or host.process.poll() is not None:
        return
    with contextlib.suppress(OSError, ValueError, IndexError):
        os.kill(host.init_pid(), signal.SIGKILL)
    try:
        host.process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        host.process.kill()
        host.process.wait(timeout=10)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    tmp = tmp_path_factory.mktemp("scale")
    image = _lab_image()
    artifact = dist.build(tmp / "dist")
    tls_dir = tmp / "tls"
    tls_dir.mkdir()
    tls = lab_tls(tls_dir, NAME)
    key = tmp / "id_ed25519"
    sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key))
    bridge, names = _network(f"{os.getpid() % 100000}")
    hosts = {
        name: Host(name, address, names[name], tmp / "hosts" / name)
        for name, address in HOSTS.items()
    }
    inventory = tmp / "inventory.yml"
    common = {
        "ansible_user": "root",
        "ansible_ssh_private_key_file": str(key),
        "ansible_ssh_common_args": " ".join(SSH_OPTIONS),
        "ansible_python_interpreter": "/usr/bin/python3",
    }

    def group(prefix: str) -> dict[str, Any]:
        return {
            "hosts": {
                h: {"ansible_host": a, **common} for h, a in HOSTS.items() if h.startswith(prefix)
            }
        }

    inventory.write_text(
        json.dumps(
            {"all": {"children": {"appliances": group("appliance"), "load_balancers": group("lb")}}}
        )
    )
    lab = Lab(tmp, hosts, names["control"], key, tls, artifact, inventory)
    # `ip netns exec` binds /etc/netns/<ns>/hosts over /etc/hosts: the service's name resolves
    # to the load balancer inside the workstation namespace only (Locust needs a name).
    netns_etc = Path("/etc/netns") / names["control"]
    netns_etc.mkdir(parents=True, exist_ok=True)
    (netns_etc / "hosts").write_text(f"127.0.0.1 localhost\n{HOSTS['lb-1']} {NAME}\n")
    try:
        for host in hosts.values():
            host.root.parent.mkdir(exist_ok=True)
            sh("cp", "-a", "--reflink=auto", str(image), str(host.root))
            _boot(host, Path(f"{key}.pub").read_text(), tmp / f"{host.name}.console")
        for host in hosts.values():
            _wait_ssh(lab, host)
        yield lab
    finally:
        for host in hosts.values():
            _stop(host)
        for ns in [*names.values(), bridge]:
            sh("ip", "netns", "del", ns, check=False)
        shutil.rmtree(netns_etc, ignore_errors=True)
        shutil.rmtree(tmp / "hosts", ignore_errors=True)


def _server(line: dict[str, Any]) -> str:
    """The appliance that answered (the last one tried, when the balancer retried)."""
    return str(line["upstream_addr"]).split(",")[-1].strip().split(":")[0]


def _served_by(lines: list[dict[str, Any]]) -> set[str]:
    return {_server(x) for x in lines if str(x.get("upstream_status", "")).endswith("200")}


def _longest_absence(lines: list[dict[str, Any]], address: str) -> int:
    """Most consecutive logged seconds in which others served and ``address`` served nothing."""
    seconds: dict[str, set[str]] = {}
    for x in lines:
        if str(x.get("upstream_status", "")).endswith("200"):
            seconds.setdefault(x["time"], set()).add(_server(x))
    best = run = 0
    for second in sorted(seconds):
        run = run + 1 if address not in seconds[second] else 0
        best = max(best, run)
    return best


def test_inventory_provisions_a_balanced_service(lab: Lab) -> None:
    first = lab.playbook()
    assert first.returncode == 0, lab.diagnose(first)
    # The upstream is the inventory's appliances group.
    site = (lab.hosts["lb-1"].root / "etc/nginx/sites-available/onnx-appliance-lb.conf").read_text()
    members = re.findall(r"server (\S+):443 [^;]*;\s*# (\S+)", site)
    assert members == [(HOSTS["appliance-1"], "appliance-1"), (HOSTS["appliance-2"], "appliance-2")]
    before = len(lab.lb_log())
    for _ in range(20):
        answer = lab.curl(
            "/v2/models/tabular/infer", "-H", "Content-Type: application/json", "-d", BODY
        )
        assert json.loads(answer.stdout)["model_name"] == "tabular", answer.stdout + answer.stderr
    time.sleep(0.5)
    assert _served_by(lab.lb_log()[before:]) == {HOSTS["appliance-1"], HOSTS["appliance-2"]}
    # Scraped on each appliance, not through the balancer; refused in the JSON error shape.
    metrics = lab.curl("/metrics", "-w", "\n%{http_code}")
    body, status = metrics.stdout.rsplit("\n", 1)
    assert status == "403"
    assert json.loads(body)["error_code"] == "FORBIDDEN"
    # A malformed request passes through to an appliance and gets its JSON 400.
    bad = lab.curl("/v2/models/tabular/infer", "-H", "Content-Type: application/json",
                   "-d", "{not json", "-w", "\n%{http_code}")  # fmt: skip
    body, status = bad.stdout.rsplit("\n", 1)
    assert status == "400" and json.loads(body)["error_code"] == "INVALID_INPUT", bad.stdout


def test_capacity_through_the_load_balancer(lab: Lab) -> None:
    before = len(lab.lb_log())
    both = lab.capacity("capacity-two-hosts")
    DRILL_REPORTS.append(
        f"capacity through the LB, two appliances (Locust, 48 users): {both['rps']:.0f} req/s, "
        f"p99 {both['p99_ms']:g} ms, {both['failed']} failed of {both['sent']}"
    )
    assert both["passed"] and both["failed"] == 0
    time.sleep(0.5)
    assert _served_by(lab.lb_log()[before:]) == {HOSTS["appliance-1"], HOSTS["appliance-2"]}


def test_rolling_update_under_load_loses_nothing(lab: Lab, tmp_path: Path) -> None:
    models = tmp_path / "models"
    shutil.copytree(ROOT / "app" / "demo_models", models)
    shutil.copytree(models / "tabular" / "1", models / "tabular" / "3")
    (models / "tabular" / "model.toml").write_text(
        'default_version = 3\nlabels = ["malignant", "benign"]\n'
    )
    logged = len(lab.lb_log())
    with lab.traffic("rolling") as run:
        rolled = lab.playbook(models_source=str(models))
        done = time.monotonic()
        time.sleep(3)
    result: Report = run["report"]
    assert rolled.returncode == 0, lab.diagnose(rolled)
    drains = re.findall(
        r"TASK \[nginx_lb : Set the appliance's state.*?\n(.*?)\n\n", rolled.stdout, re.S
    )
    assert len(drains) == 4 and all("changed:" in d for d in drains), drains  # out and back x2
    after = result.between(done)
    # Each appliance was out of the balancer's rotation for a stretch while the other served.
    drained = {h: _longest_absence(lab.lb_log()[logged:], HOSTS[h]) for h in HOSTS if h != "lb-1"}
    DRILL_REPORTS.append(
        f"rolling update of 2 appliances behind the LB: {result.summary()}; "
        f"{after.sent} after it, versions {sorted({r.version for r in after.records})}; "
        f"seconds each host was drained: {drained}"
    )
    assert all(seconds >= 3 for seconds in drained.values()), drained
    assert result.sent > 100
    assert result.failed == 0, result.failures()[:5]
    assert {r.version for r in result.records[:10]} == {"2"}
    assert after.sent > 20 and {r.version for r in after.records} == {"3"}
    assert _served_by(lab.lb_log()[-50:]) == {HOSTS["appliance-1"], HOSTS["appliance-2"]}


def _lb_line(lab: Lab, host: str) -> str:
    site = lab.hosts["lb-1"].root / "etc/nginx/sites-available/onnx-appliance-lb.conf"
    return next(x for x in site.read_text().splitlines() if x.endswith(f"# {host}"))


def test_a_host_the_operator_drained_stays_out_through_a_rolling_update(lab: Lab) -> None:
    kept_out = lab.playbook(
        "--limit", "lb-1,appliance-2", nginx_lb_drained=["appliance-2"]
    )  # fmt: skip
    assert kept_out.returncode == 0, lab.diagnose(kept_out)
    assert " down;" in _lb_line(lab, "appliance-2")
    assert " down;" not in _lb_line(lab, "appliance-1")
    before = len(lab.lb_log())
    for _ in range(10):
        assert lab.curl("/v2/health/ready", "-o", "/dev/null", "-w", "%{http_code}").stdout == "200"
    time.sleep(0.5)
    assert _served_by(lab.lb_log()[before:]) == {HOSTS["appliance-1"]}
    back = lab.playbook("--limit", "lb-1")  # the load balancer alone: every host in again
    assert back.returncode == 0, lab.diagnose(back)
    assert " down;" not in _lb_line(lab, "appliance-2")


def test_abrupt_host_stop_costs_at_most_the_requests_in_flight(lab: Lab) -> None:
    victim = lab.hosts["appliance-2"]
    with lab.traffic("abrupt") as run:
        time.sleep(1)
        sh("ip", "-n", victim.netns, "link", "set", "eth0", "down")  # the power goes
        killed_at = time.monotonic()
        _stop(victim)
        time.sleep(8)  # past the balancer's read timeout, so requests it had are settled
    result: Report = run["report"]
    in_flight = result.in_flight(killed_at)
    late = result.between(killed_at)
    first = min(r.start for r in result.records)
    DRILL_REPORTS.append(
        f"appliance host stopped abruptly: {result.summary()}; {in_flight} in flight at the "
        f"stop, {late.failed} failed of {late.sent} sent after it; "
        f"p99 {result.between(first, killed_at).percentile(99) * 1000:.0f} ms before, "
        f"{late.percentile(99) * 1000:.0f} ms after"
    )
    assert result.sent > 100
    assert result.failed <= in_flight, result.failures()[:5]
    assert late.failed == 0, late.failures()[:5]
    assert late.succeeded > 20
    time.sleep(0.5)
    assert _served_by(lab.lb_log()[-20:]) == {HOSTS["appliance-1"]}


def test_capacity_with_one_host_left(lab: Lab) -> None:
    one = lab.capacity("capacity-one-host")
    DRILL_REPORTS.append(
        f"capacity through the LB, one appliance left (Locust, 48 users): {one['rps']:.0f} "
        f"req/s, p99 {one['p99_ms']:g} ms, {one['failed']} failed of {one['sent']}"
    )
    assert one["passed"] and one["failed"] == 0
