"""deploy/: compose demo, Dockerfiles, systemd units and proxy configs checked against the real CLIs.

Docker engines do not run here: the compose file is parsed and every bind mount, config path and
command is checked against what ``prepare_demo.sh`` creates (run here with the same functions) and
what the project's commands accept. ``systemd-analyze verify`` runs when it is installed.
"""

from __future__ import annotations

import configparser
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from tdamil.security.certs import check_certificate, check_site_key, init_pki, issue_site
from tdamil.security.certs import _parser as certs_parser

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
BIN = Path(sys.executable).parent
SCRIPTS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]


def _help(cmd: str) -> str:
    out = subprocess.run([str(BIN / cmd), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def _flags_ok(cmd: str, args: list[str]) -> None:
    """Every --flag in ``args`` is one the installed command accepts."""
    help_text = _help(cmd)
    for a in args:
        if a.startswith("--"):
            assert re.search(rf"(^|[\s\[,]){re.escape(a.split('=')[0])}([\s\],=]|$)", help_text, re.M), f"{cmd} {a}"


# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """deploy/compose copied to a temp folder and prepared as prepare_demo.sh does."""
    from tdamil.federation.demo import write_demo_federation

    root = tmp_path_factory.mktemp("compose") / "compose"
    shutil.copytree(DEPLOY / "compose", root)
    shutil.copytree(DEPLOY / "proxy", root.parent / "proxy")
    script = (root / "prepare_demo.sh").read_text()
    # the certificate commands of the script, run with the same CLI parser
    for line in script.splitlines():
        line = line.strip()
        if line.startswith("tdamil-certs ") and " check " not in f" {line} ":
            args = certs_parser().parse_args(shlex.split(line)[1:])
            if args.command == "init":
                init_pki(root / args.out, args.server_name, args.ip)
            else:
                issue_site(args.site, pki=root / args.pki)
    assert "write_demo_federation(\"demo\", num_sites=2)" in script
    write_demo_federation(root / "demo", num_sites=2)
    return root


def _compose(demo: Path) -> dict:
    return yaml.safe_load((demo / "docker-compose.yml").read_text())


def _mounts(service: dict, base: Path) -> dict[str, Path]:
    """container path -> host path of the service's bind mounts."""
    out = {}
    for v in service.get("volumes", []):
        src, dst, *_ = v.split(":")
        if src.startswith(".") or src.startswith("/"):
            out[dst] = (base / src).resolve()
    return out


def _to_host(value, mounts: dict[str, Path]):
    if isinstance(value, dict):
        return {k: _to_host(v, mounts) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_host(v, mounts) for v in value]
    if isinstance(value, str) and value.startswith("/"):
        for dst in sorted(mounts, key=len, reverse=True):
            if value == dst or value.startswith(dst.rstrip("/") + "/"):
                return str(mounts[dst]) + value[len(dst):]
    return value


def test_compose_services_mounts_and_network_layout(demo: Path):
    c = _compose(demo)
    assert set(c["services"]) == {"coordinator", "proxy", "site_a", "site_b"}
    proxy = c["services"]["proxy"]
    assert proxy["network_mode"] == "service:coordinator"  # reaches the loopback SuperLink
    assert "ports" not in c["services"]["coordinator"] or all("9093" not in str(p) for p in c["services"]["coordinator"]["ports"])
    for name, svc in c["services"].items():
        for dst, src in _mounts(svc, demo).items():
            assert src.exists(), f"{name}: bind mount {src} -> {dst} does not exist after prepare_demo.sh"
            if dst.startswith("/pki") or dst.startswith("/etc/tdamil/pki") or dst == "/config/site.yaml":
                assert svc["volumes"][[v.split(":")[1] for v in svc["volumes"]].index(dst)].endswith(":ro")
    # sites mount only their own key folder, never the CA key or another site's key
    for s in ("site_a", "site_b"):
        mounts = _mounts(c["services"][s], demo)
        assert mounts["/pki"] == (demo / "pki" / "sites" / s).resolve()
        assert not any(p.name == "ca.key" for p in mounts.values())
    assert not any(p.name == "ca.key" for p in _mounts(c["services"]["coordinator"], demo).values())


def test_compose_configs_load_with_the_projects_loaders_and_commands(demo: Path, tmp_path: Path):
    from tdamil.client.config import load_site_config
    from tdamil.server.config import load_server_config

    c = _compose(demo)
    coord = c["services"]["coordinator"]
    mounts = _mounts(coord, demo)
    server_yaml = yaml.safe_load((demo / "config" / "server.yaml").read_text())
    host_server = tmp_path / "server.yaml"
    host_server.write_text(yaml.safe_dump(_to_host(server_yaml, mounts)))
    cfg = load_server_config(host_server)  # every file it names exists through the mounts
    assert cfg.auth.enabled and cfg.tls.cert is not None
    assert coord["command"][:2] == ["--config", "/config/server.yaml"]
    _flags_ok("flwr-server", coord["command"])
    assert (DEPLOY / "docker" / "Dockerfile.coordinator").read_text().count('"flwr-server"') == 1
    nginx = (DEPLOY / "proxy" / "nginx.conf").read_text()
    assert f"server 127.0.0.1:{cfg.superlink.internal_port};" in nginx
    pki = demo / "pki"
    for s in ("site_a", "site_b"):
        svc = c["services"][s]
        m = _mounts(svc, demo)
        site_yaml = yaml.safe_load((demo / "config" / "sites" / f"{s}.yaml").read_text())
        host_site = tmp_path / f"{s}.yaml"
        host_site.write_text(yaml.safe_dump(_to_host(site_yaml, m)))
        scfg, _ = load_site_config(host_site)
        assert scfg.site == s
        host, port = scfg.federation.superlink.rsplit(":", 1)
        # the name sites dial is an alias of the coordinator and covered by the server certificate
        assert host in c["services"]["coordinator"]["networks"]["federation"]["aliases"]
        check_certificate(pki / "server.pem", scfg.tls.ca_cert, host=host)
        assert re.search(rf"listen {port} ssl;", nginx)
        # the site's private key is the one the coordinator registers
        check_site_key(scfg.auth.private_key, pki / "site_keys" / f"{s}.pub")
        assert svc["command"][:2] == ["--config", "/config/site.yaml"]
        _flags_ok("tdamil-client", svc["command"])


def _compose_cli() -> list[str] | None:
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True, timeout=60)
        if probe.returncode == 0:
            return ["docker", "compose"]
    return [shutil.which("docker-compose")] if shutil.which("docker-compose") else None


def test_compose_file_passes_compose_config_where_a_compose_cli_exists(demo: Path):
    """`docker compose config` (or docker-compose v1) validates the files against the schema."""
    cli = _compose_cli()
    files = [["-f", "docker-compose.yml"], ["-f", "docker-compose.yml", "-f", "compose.gpu.yaml"]]
    for f in files:
        if cli is None:  # no compose CLI on this machine: the YAML checks above still ran
            yaml.safe_load((demo / f[1]).read_text())
            continue
        res = subprocess.run([*cli, *f, "config"], capture_output=True, text=True, timeout=120, cwd=demo)
        assert res.returncode == 0, res.stderr
        merged = yaml.safe_load(res.stdout)
        assert set(merged["services"]) == {"coordinator", "proxy", "site_a", "site_b"}


def test_gpu_override_reserves_one_gpu_per_site():
    gpu = yaml.safe_load((DEPLOY / "compose" / "compose.gpu.yaml").read_text())
    ids = set()
    for s in ("site_a", "site_b"):
        (dev,) = gpu["services"][s]["deploy"]["resources"]["reservations"]["devices"]
        assert dev["driver"] == "nvidia" and "gpu" in dev["capabilities"]
        ids.update(dev["device_ids"])
    assert len(ids) == 2


def _dockerfile(path: Path) -> list[tuple[str, str]]:
    text = path.read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instr, _, rest = line.partition(" ")
            out.append((instr.upper(), rest.strip()))
    return out


@pytest.mark.parametrize("name,script", [("client", "tdamil-client"), ("coordinator", "flwr-server")])
def test_dockerfiles_build_from_repo_files_and_run_the_real_cli(name, script):
    instrs = _dockerfile(DEPLOY / "docker" / f"Dockerfile.{name}")
    known = {"FROM", "ENV", "RUN", "WORKDIR", "COPY", "USER", "VOLUME", "ENTRYPOINT", "CMD", "EXPOSE", "ARG", "LABEL"}
    assert {i for i, _ in instrs} <= known
    assert instrs[0][0] == "FROM"
    base = instrs[0][1]
    if name == "client":
        assert "cuda" in base and "pytorch" in base
    else:
        assert "python:3.11" in base
        assert any("download.pytorch.org/whl/cpu" in r for i, r in instrs if i == "RUN")
    for i, rest in instrs:
        if i == "COPY":
            *srcs, _dst = rest.split()
            for src in srcs:
                assert (REPO / src).exists(), f"COPY {src}: not in the repository"
    users = [r for i, r in instrs if i == "USER"]
    assert users and users[-1] not in ("root", "0")
    env = " ".join(r for i, r in instrs if i == "ENV")
    assert "FLWR_TELEMETRY_ENABLED=0" in env
    entry = yaml.safe_load([r for i, r in instrs if i == "ENTRYPOINT"][-1])
    cmd = yaml.safe_load([r for i, r in instrs if i == "CMD"][-1])
    assert entry[-1] == script and script in SCRIPTS
    _flags_ok(script, cmd)
    ignore = (DEPLOY / "docker" / f"Dockerfile.{name}.dockerignore").read_text()
    assert "!tdamil/**" in ignore


def _unit(path: Path) -> configparser.ConfigParser:
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str
    cp.read_string(path.read_text())
    return cp


@pytest.mark.parametrize("unit,script", [("tdamil-coordinator.service", "flwr-server"),
                                         ("tdamil-site@.service", "tdamil-client")])
def test_systemd_units_run_real_commands_hardened(unit, script, tmp_path):
    cp = _unit(DEPLOY / "systemd" / unit)
    svc = cp["Service"]
    exec_start = shlex.split(svc["ExecStart"])
    assert Path(exec_start[0]).name == script and script in SCRIPTS
    _flags_ok(script, [a.replace("%i", "x") for a in exec_start[1:]])
    pre = shlex.split(svc["ExecStartPre"])
    assert Path(pre[0]).name == "tdamil-certs"
    certs_parser().parse_args([a.replace("%i", "site_a") for a in pre[1:]])
    assert svc["User"] != "root" and svc["NoNewPrivileges"] == "yes" and svc["ProtectSystem"] == "strict"
    assert "FLWR_TELEMETRY_ENABLED=0" in (DEPLOY / "systemd" / unit).read_text()
    assert cp["Install"]["WantedBy"] == "multi-user.target"
    analyze = shutil.which("systemd-analyze")
    if analyze:  # full check where systemd's own verifier exists (on this machine it does)
        for f in (DEPLOY / "systemd").glob("*.service"):
            (tmp_path / f.name).write_text(f.read_text().replace("/opt/tdamil/.venv/bin", str(BIN)))
        target = unit.replace("@.service", "@site_a.service")
        if target != unit:
            shutil.copy(tmp_path / unit, tmp_path / target)
        res = subprocess.run([analyze, "verify", str(tmp_path / target)], capture_output=True, text=True,
                             timeout=120, cwd=tmp_path)
        problems = [ln for ln in (res.stderr + res.stdout).splitlines() if unit.split("@")[0] in ln
                    or "Unknown" in ln or "not executable" in ln]
        assert res.returncode == 0 and not problems, res.stderr


def test_nginx_exposes_only_the_fleet_api():
    from tdamil.server.gateway import FLEET_PATHS

    conf = (DEPLOY / "proxy" / "nginx.conf").read_text()
    body = re.sub(r"#.*", "", conf)
    locations = {}
    for m in re.finditer(r"location\s+([^{]+?)\s*\{", body):
        depth, i = 1, m.end()
        while depth:  # the block up to its matching brace (blocks nest: limit_except)
            depth += {"{": 1, "}": -1}.get(body[i], 0)
            i += 1
        locations[m.group(1).strip()] = body[m.end():i - 1]
    proxied = {loc for loc, block in locations.items() if "proxy_pass" in block}
    assert proxied == {f"= {p}" for p in FLEET_PATHS}  # the gateway's allow-list, exact matches only
    for loc in proxied:  # POST only, to the same fixed path
        assert re.fullmatch(rf"\s*limit_except POST {{ deny all; }} proxy_pass https://superlink{loc[2:]};\s*",
                            locations[loc]), locations[loc]
    assert "return 404" in locations["/"]
    # decided on the raw target before any location: no dot, %, backslash, //, ;, query or upper case
    assert 'if ($request_uri !~ "^/v1/fleet/[a-z-]+$") {' in body
    assert "if ($request_method != POST) {" in body
    server = body[body.index("server {"):]
    assert "proxy_ssl_verify on" in server and "proxy_ssl_trusted_certificate" in server
    assert "proxy_set_header Host localhost;" in server
    assert "server 127.0.0.1:9093;" in body
    assert "/v1/control" not in body and "/v1/runtime" not in body and "/health" not in body


def test_envoy_routes_only_the_fleet_api():
    from tdamil.server.gateway import FLEET_PATHS

    cfg = yaml.safe_load((DEPLOY / "proxy" / "envoy.yaml").read_text())
    (listener,) = cfg["static_resources"]["listeners"]
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    # the route sees :path as the client sent it
    assert hcm["normalize_path"] is False and hcm["merge_slashes"] is False
    assert hcm["path_with_escaped_slashes_action"] == "REJECT_REQUEST"
    routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
    (forwarded,) = [r for r in routes if "route" in r]
    method, path = forwarded["match"]["headers"]
    assert method == {"name": ":method", "string_match": {"exact": "POST"}}
    regex = path["string_match"]["safe_regex"]["regex"]
    assert path["name"] == ":path" and regex.startswith("^/v1/fleet/(") and regex.endswith(")$")
    assert {f"/v1/fleet/{name}" for name in regex[len("^/v1/fleet/("):-2].split("|")} == FLEET_PATHS
    assert forwarded["route"]["host_rewrite_literal"] == "localhost"
    assert routes[-1]["match"] == {"prefix": "/"} and routes[-1]["direct_response"]["status"] == 404
    (cluster,) = cfg["static_resources"]["clusters"]
    addr = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
    assert addr == {"address": "127.0.0.1", "port_value": 9093}
    tls = cluster["transport_socket"]["typed_config"]["common_tls_context"]["validation_context"]
    assert tls["trusted_ca"]["filename"].endswith("ca.pem")


def test_readme_commands_use_real_flags():
    text = (DEPLOY / "README.md").read_text()
    blocks = re.findall(r"```(?:bash|sh)\n(.*?)```", text, re.S)
    lines = [ln.strip() for b in blocks for ln in b.splitlines()]
    certs = [ln for ln in lines if ln.startswith("tdamil-certs ")]
    assert {"init", "issue", "check"} <= {shlex.split(ln)[1] for ln in certs}
    for ln in certs:
        certs_parser().parse_args(shlex.split(ln.split("#")[0])[1:])
    for script in ("flwr-server", "tdamil-client"):
        uses = [ln for ln in lines if ln.startswith(script + " ")]
        assert uses, f"README never shows {script}"
        for ln in uses:
            _flags_ok(script, shlex.split(ln.split("#")[0])[1:])
