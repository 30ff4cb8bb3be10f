"""The appliance proven on a booted Debian 12 (`make test-appliance`).

A debootstrapped bookworm root (cached between runs) is provisioned by the real playbook over
the community.general.chroot connection with the `make dist` artifact, then booted with
systemd-nspawn (systemd as PID 1, private network: loopback only). A one-shot unit asserts from
inside: both services active, an HTTPS prediction through NGINX over HTTP/2 verified against
the lab certificate, /metrics refused outside its allow-list, a gRPC inference through NGINX,
and `systemctl reload` during a burst of requests losing none; then it powers the container
off and the result is read from a file in the root. A second playbook run must change nothing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from app import __version__
from tests.conftest import ROOT
from tests.e2e.conftest import base_rootfs

sys.path.insert(0, str(ROOT / "packaging"))
import dist

pytestmark = [pytest.mark.root, pytest.mark.slow]

BIN = Path(sys.executable).parent
ROW = ",".join(["0.5"] * 30)
SELFTEST = f"""#!/bin/sh
# Runs inside the booted appliance; writes /selftest.json and powers off either way.
out=/selftest.json
fail() {{ printf '{{"ok": false, "step": "%s"}}\\n' "$1" > $out; exit 1; }}
for i in $(seq 1 90); do
  systemctl is-active -q onnx-appliance.service && systemctl is-active -q nginx.service && break
  sleep 1
done
systemctl is-active -q onnx-appliance.socket || fail "socket not active"
systemctl is-active -q onnx-appliance.service || fail "onnx-appliance not active"
systemctl is-active -q nginx.service || fail "nginx not active"
CA=/etc/nginx/tls/onnx-appliance.crt
C="curl -sS --max-time 20 --cacert $CA --resolve appliance.test:443:127.0.0.1"
URL=https://appliance.test/v1/models/tabular:predict
JSON='Content-Type: application/json'
for i in $(seq 1 90); do
  [ "$($C -o /dev/null -w '%{{http_code}}' https://appliance.test/v2/health/ready)" = 200 ] && break
  sleep 1
done
BODY='{{"instances": [[{ROW}]]}}'
r=$($C --http2 -o /tmp/prediction -w '%{{http_code}} %{{http_version}}' -H "$JSON" -d "$BODY" $URL)
[ "$r" = "200 2" ] || fail "prediction over HTTP/2 gave '$r'"
grep -q '"model_name":"tabular"' /tmp/prediction || fail "prediction body"
m=$($C -o /dev/null -w '%{{http_code}}' https://appliance.test/metrics)
[ "$m" = 403 ] || fail "metrics answered $m outside the allow-list"
# The Open Inference Protocol over gRPC through NGINX (HTTP/2, TLS) to the workers.
/opt/onnx-appliance/current/venv/bin/python - <<'PY' || fail "gRPC inference through NGINX"
import grpc
from app.protocols.grpc import inference_pb2 as pb, inference_pb2_grpc as pb_grpc
with open("/etc/nginx/tls/onnx-appliance.crt", "rb") as f:
    creds = grpc.ssl_channel_credentials(f.read())
options = [("grpc.ssl_target_name_override", "appliance.test")]
stub = pb_grpc.GRPCInferenceServiceStub(grpc.secure_channel("127.0.0.1:443", creds, options))
request = pb.ModelInferRequest(model_name="tabular")
request.inputs.add(name="input", datatype="FP32", shape=[1, 30]).contents.fp32_contents.extend(
    [0.5] * 30
)
answer = stub.ModelInfer(request, timeout=20)
assert answer.model_name == "tabular" and len(answer.outputs) == 2, answer
PY
( i=0; while [ $i -lt 120 ]; do
    $C -o /dev/null -w '%{{http_code}}\\n' -H "$JSON" -d "$BODY" $URL
    i=$((i+1)); done > /tmp/burst ) &
sleep 0.3
systemctl reload onnx-appliance.service || fail "reload"
wait
total=$(wc -l < /tmp/burst)
bad=$(grep -vc '^200$' /tmp/burst)
[ "$bad" = 0 ] || fail "reload under load lost $bad of $total requests"
journalctl -u onnx-appliance.service --no-pager -o cat | grep -q reload_complete \\
  || fail "no reload_complete in the journal"
printf '{{"ok": true, "burst": %s}}\\n' "$total" > $out
"""
UNIT = """[Unit]
Description=onnx-appliance self-test
After=multi-user.target onnx-appliance.service nginx.service
SuccessAction=poweroff
FailureAction=poweroff

[Service]
Type=oneshot
ExecStart=/usr/local/bin/appliance-selftest
TimeoutStartSec=300

[Install]
WantedBy=multi-user.target
"""


def _playbook(rootfs: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    inventory = rootfs.parent / "inventory.yml"
    inventory.write_text(
        json.dumps(
            {
                "all": {
                    "children": {
                        "appliances": {
                            "hosts": {
                                str(rootfs): {
                                    "ansible_connection": "community.general.chroot",
                                    "ansible_python_interpreter": "/usr/bin/python3",
                                }
                            }
                        }
                    }
                }
            }
        )
    )
    variables = {
        "onnx_appliance_manage_service": False,
        "nginx_site_manage_service": False,
        "nginx_site_server_name": "appliance.test",
        "nginx_site_ipv6": False,
        "nginx_site_metrics_allow": ["192.0.2.1"],
        "onnx_appliance_artifact": str(
            rootfs.parent / "dist" / f"onnx-appliance-{__version__}.tar.gz"
        ),
    }
    env = dict(os.environ, PATH=f"{BIN}:{os.environ.get('PATH', '')}", ANSIBLE_NOCOLOR="1")
    return subprocess.run(
        [
            str(BIN / "ansible-playbook"),
            "-i",
            str(inventory),
            "playbooks/site.yml",
            "-e",
            json.dumps(variables),
            *extra,
        ],
        cwd=ROOT / "ansible",
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
        check=False,
    )


@pytest.fixture(scope="module")
def provisioned(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    work = tmp_path_factory.mktemp("appliance")
    artifact = dist.build(work / "dist")
    assert artifact.name == f"onnx-appliance-{__version__}.tar.gz"
    rootfs = work / "rootfs"
    subprocess.run(["cp", "-a", str(base_rootfs()), str(rootfs)], check=True, timeout=600)
    first = _playbook(rootfs)
    assert first.returncode == 0, first.stdout[-6000:] + first.stderr[-3000:]
    return rootfs, first.stdout


def _recap(output: str) -> dict[str, int]:
    line = output[output.index("PLAY RECAP") :].splitlines()[1]
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", line)}


def test_second_run_changes_nothing(provisioned: tuple[Path, str]) -> None:
    rootfs, first = provisioned
    assert _recap(first)["changed"] > 0
    second = _playbook(rootfs)
    assert second.returncode == 0, second.stdout[-4000:]
    assert _recap(second.stdout)["changed"] == 0, second.stdout[-6000:]


def test_check_mode_on_a_fresh_host(tmp_path: Path, provisioned: tuple[Path, str]) -> None:
    rootfs, _ = provisioned
    fresh = tmp_path / "rootfs"
    subprocess.run(["cp", "-a", str(base_rootfs()), str(fresh)], check=True, timeout=600)
    (tmp_path / "dist").symlink_to(rootfs.parent / "dist")
    result = _playbook(fresh, "--check", "--diff")
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert "+[server]" in result.stdout  # the diff of the settings it would write
    assert not (fresh / "etc" / "onnx-appliance" / "appliance.toml").exists()  # nothing written


def test_booted_appliance_serves_reloads_and_guards(provisioned: tuple[Path, str]) -> None:
    rootfs, _ = provisioned
    script = rootfs / "usr" / "local" / "bin" / "appliance-selftest"
    script.write_text(SELFTEST)
    script.chmod(0o755)
    (rootfs / "etc" / "systemd" / "system" / "appliance-selftest.service").write_text(UNIT)
    wants = rootfs / "etc" / "systemd" / "system" / "multi-user.target.wants"
    wants.mkdir(exist_ok=True)
    link = wants / "appliance-selftest.service"
    if not link.exists():
        link.symlink_to("/etc/systemd/system/appliance-selftest.service")
    boot = subprocess.run(
        [
            "systemd-nspawn",
            "-q",
            "-b",
            "-D",
            str(rootfs),
            "--private-network",
            "--keep-unit",
            "--register=no",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    result_file = rootfs / "selftest.json"
    assert result_file.exists(), boot.stdout[-5000:] + boot.stderr[-2000:]
    result = json.loads(result_file.read_text())
    assert result["ok"], (result, boot.stdout[-5000:])
    assert result["burst"] == 120


def test_a_bad_model_never_replaces_a_good_one(
    tmp_path: Path, provisioned: tuple[Path, str]
) -> None:
    from tests import onnx_factory

    rootfs, _ = provisioned
    served = rootfs / "var" / "lib" / "onnx-appliance" / "models"
    before = served.readlink()
    bad = tmp_path / "models"
    shutil.copytree(ROOT / "app" / "demo_models" / "tabular", bad / "tabular")
    onnx_factory.save(onnx_factory.zipmap_classifier(), bad, "broken")  # cannot be served
    result = _playbook(rootfs, "-e", json.dumps({"models_source": str(bad)}))
    assert result.returncode != 0
    assert "Check every model of the release before it can serve" in result.stdout
    assert "zipmap=False" in result.stdout  # onnx-appliance check said why
    assert served.readlink() == before  # still the good release


def test_a_contract_break_goes_live_only_when_accepted(
    tmp_path: Path, provisioned: tuple[Path, str]
) -> None:
    from tests import onnx_factory

    rootfs, _ = provisioned
    served = rootfs / "var" / "lib" / "onnx-appliance" / "models"
    assert (rootfs / "var" / "lib" / "onnx-appliance" / "contract.json").exists()
    before = served.readlink()
    changed = tmp_path / "models"
    shutil.copytree(ROOT / "app" / "demo_models", changed)
    # regression/2 takes `features` and answers `result`: clients of version 1 would break.
    onnx_factory.save(onnx_factory.features_to_result(), changed, "regression", 2)
    refused = _playbook(rootfs, "-e", json.dumps({"models_source": str(changed)}))
    assert refused.returncode != 0
    assert "breaks the contract recorded in" in refused.stdout
    assert "--accept-contract regression" in refused.stdout
    assert served.readlink() == before
    accepted = _playbook(
        rootfs,
        "-e",
        json.dumps({"models_source": str(changed), "models_accept_contract": ["regression"]}),
    )
    assert accepted.returncode == 0, accepted.stdout[-4000:]
    assert served.readlink() != before
    release = rootfs / str(served.readlink()).lstrip("/")  # the link is absolute in the root
    assert (release / "regression" / "2" / "model.onnx").exists()
