"""The Ansible roles: lint-clean at the production profile, one copy of each template."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jinja2
import jinja2.meta
import yaml

from tests.conftest import ROOT

ANSIBLE = ROOT / "ansible"
BIN = Path(sys.executable).parent


def run(*cmd: str) -> subprocess.CompletedProcess[str]:
    env = dict(
        os.environ, PATH=f"{BIN}:{os.environ.get('PATH', '')}", ANSIBLE_NOCOLOR="1", NO_COLOR="1"
    )
    return subprocess.run(
        cmd, cwd=ANSIBLE, capture_output=True, text=True, timeout=600, env=env, check=False
    )


def test_ansible_lint_production_profile() -> None:
    result = run(str(BIN / "ansible-lint"), "--profile", "production", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_playbook_syntax() -> None:
    result = run(str(BIN / "ansible-playbook"), "--syntax-check", "playbooks/site.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def _template_variables(path: Path) -> set[str]:
    env = jinja2.Environment(autoescape=False)  # noqa: S701 (config files, not HTML)
    return set(jinja2.meta.find_undeclared_variables(env.parse(path.read_text())))


def _defaults(role: str) -> set[str]:
    return set(yaml.safe_load((ANSIBLE / "roles" / role / "defaults" / "main.yml").read_text()))


def test_roles_render_the_repository_templates_with_every_variable_defined() -> None:
    nginx = _template_variables(ROOT / "nginx" / "onnx-appliance.conf.j2")
    assert nginx <= _defaults("nginx_site"), nginx - _defaults("nginx_site")
    lb = _template_variables(ROOT / "nginx" / "onnx-appliance-lb.conf.j2")
    assert lb <= _defaults("nginx_lb"), lb - _defaults("nginx_lb")
    systemd = set().union(*(_template_variables(p) for p in (ROOT / "systemd").glob("*.j2")))
    assert systemd <= _defaults("onnx_appliance"), systemd - _defaults("onnx_appliance")
    tasks = "".join(p.read_text() for p in (ANSIBLE / "roles").glob("*/tasks/main.yml"))
    assert "../../../nginx/onnx-appliance.conf.j2" in tasks
    assert "../../../nginx/onnx-appliance-lb.conf.j2" in tasks
    assert "../../../systemd/{{ item }}.j2" in tasks


def test_no_second_copy_of_a_template() -> None:
    for path in ANSIBLE.rglob("*"):
        if path.is_file():
            text = path.read_text(errors="replace")
            assert "ssl_protocols" not in text, path
            assert "[Service]" not in text, path


def test_every_public_variable_is_documented() -> None:
    for role_dir in (ANSIBLE / "roles").iterdir():
        readme = (role_dir / "README.md").read_text()
        for name in _defaults(role_dir.name):
            assert name.startswith(f"{role_dir.name}_"), (role_dir.name, name)
            assert f"`{name}`" in readme, (role_dir.name, name)


def _rules_play(tmp_path: Path, **variables: str | bool) -> subprocess.CompletedProcess[str]:
    """The role's rules tasks on this machine (connection local), into ``tmp_path``."""
    playbook = tmp_path / "rules.yml"
    include = {"name": "onnx_appliance", "tasks_from": "prometheus_rules"}
    task = {"name": "Install the rules", "ansible.builtin.include_role": include}
    play = {"hosts": "localhost", "connection": "local", "gather_facts": False, "tasks": [task]}
    playbook.write_text(yaml.safe_dump([play]))
    extra = {
        "ansible_python_interpreter": sys.executable,
        "onnx_appliance_manage_service": False,
        **variables,
    }
    return run(
        str(BIN / "ansible-playbook"), "-i", "localhost,", str(playbook), "-e", json.dumps(extra)
    )


def test_alert_rules_land_where_prometheus_reads_them_checked_by_promtool(tmp_path: Path) -> None:
    rules_dir = tmp_path / "rules.d"
    first = _rules_play(tmp_path, onnx_appliance_prometheus_rules_dir=str(rules_dir))
    assert first.returncode == 0, first.stdout + first.stderr
    assert "changed=2" in first.stdout  # the folder and the file
    source = ROOT / "packaging" / "monitoring" / "onnx-appliance.rules.yml"
    assert (rules_dir / "onnx-appliance.rules.yml").read_text() == source.read_text()
    second = _rules_play(tmp_path, onnx_appliance_prometheus_rules_dir=str(rules_dir))
    assert "changed=0" in second.stdout, second.stdout
    # A file promtool refuses is never written (here a promtool that refuses everything).
    refused = tmp_path / "refused.d"
    bad = _rules_play(
        tmp_path, onnx_appliance_prometheus_rules_dir=str(refused), onnx_appliance_promtool="false"
    )
    assert bad.returncode != 0
    assert "failed to validate" in bad.stdout
    assert not (refused / "onnx-appliance.rules.yml").exists()
    # Off by default: nothing installed.
    off = _rules_play(tmp_path)
    assert off.returncode == 0 and "changed=0" in off.stdout, off.stdout
