"""Running it as a hospital IT person would (issue 9, item 4): clear answers, nothing left behind.

* a site whose key is not registered stops with one line naming its key and the fix, and the
  coordinator shows the rejected join with the site's address (real SuperLink, TLS, node auth);
* a SIGKILLed coordinator leaves no SuperLink, gateway, SuperExec or ServerApp behind;
* ``tdamil-client --check`` opens every feature file (truncated, NaN, other encoder);
* one site-name rule, one name for the folder of site keys, one-line errors.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import ssl
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml

from tdamil.federation.processes import ManagedProcess, flower_env
from tdamil.net import free_port
from tdamil.federation.watchdog import descendants, process_table

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _cmdline(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _wait_for(what: str, predicate, timeout: float, proc: ManagedProcess) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        assert proc.poll() is None, f"{proc.name} exited while waiting for {what}:\n{proc.tail(40)}"
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}:\n{proc.tail(40)}")


@pytest.mark.slow
@pytest.mark.e2e
def test_unregistered_site_is_told_and_a_killed_coordinator_leaves_nothing(tmp_path):
    from tdamil.federation.demo import write_demo_federation

    paths = write_demo_federation(tmp_path / "demo", num_sites=2, train_bags=4, val_bags=2, test_bags=2,
                                  heldout_bags=4, superlink=f"127.0.0.1:{free_port()}", internal_port=free_port(),
                                  runtime_ports=[free_port(), free_port()],
                                  federation={"rounds": 1, "wait_for_sites_s": 300})
    keys = tmp_path / "demo" / "certs" / "site_keys"
    (tmp_path / "not_sent").mkdir()
    shutil.move(keys / "site_b.pub", tmp_path / "not_sent" / "site_b.pub")  # site_b never sent its key
    server = ManagedProcess("flwr-server", [str(BIN / "flwr-server"), "--config", str(paths["server"])],
                            tmp_path / "server.log", env=flower_env(threads=1))
    try:
        _wait_for("the gateway", lambda: "Sites connect to" in (tmp_path / "server.log").read_text(), 120, server)
        res = subprocess.run([str(BIN / "tdamil-client"), "--config", str(paths["site_b"]), "--no-extract",
                              "--state-dir", str(tmp_path / "state_b")],
                             capture_output=True, text=True, timeout=180, env=flower_env(threads=1))
        assert res.returncode == 3, res.stdout[-3000:] + res.stderr[-3000:]
        (line,) = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
        assert "site_b.key" in line and "not registered" in line and "site_b.pub" in line and "register" in line
        assert "Traceback" not in res.stderr and "may be restarting" not in res.stdout + res.stderr
        _wait_for("the rejected join in the coordinator's output",
                  lambda: "Rejected join from 127.0.0.1" in (tmp_path / "server.log").read_text(), 30, server)

        # the ServerApp is up (waiting for sites): SIGKILL the coordinator alone, nothing may survive it
        _wait_for("the ServerApp", lambda: any("flwr-serverapp" in _cmdline(p) for p in descendants(server.pid)),
                  120, server)
        tree = descendants(server.pid)
        names = " | ".join(_cmdline(p) for p in tree)
        assert "flower-superlink" in names and "tdamil.server.gateway" in names and "flower-superexec" in names
        os.kill(server.pid, signal.SIGKILL)
        killed = time.monotonic()
        alive = dict(tree)
        while alive and time.monotonic() - killed < 15:
            table = process_table()
            alive = {p: s for p, s in alive.items() if p in table and table[p][1] == s}
            time.sleep(0.2)
        gone_after = time.monotonic() - killed
        print(f"{len(tree)} descendants of the coordinator gone {gone_after:.1f} s after SIGKILL")
        assert not alive, f"still running 15 s after SIGKILL: {[_cmdline(p) for p in alive]}"
        assert gone_after < 10, f"descendants took {gone_after:.1f} s to exit"
    finally:
        server.stop()


def _site_yaml(tmp_path: Path):
    from tdamil.federation.demo import write_demo_federation

    paths = write_demo_federation(tmp_path / "demo", num_sites=2, train_bags=4, val_bags=2, test_bags=2,
                                  heldout_bags=4, secure=False)
    features = sorted((tmp_path / "demo" / "site_a" / "features").glob("*.h5"))
    return paths["site_a"], features


def _check(config: Path, capsys) -> tuple[int, str]:
    from tdamil.client.site import main as client_main

    rc = client_main(["--config", str(config), "--check", "--insecure", "--no-extract"])
    return rc, capsys.readouterr()


@pytest.mark.parametrize("damage", ["truncated", "nan", "other_encoder"])
def test_check_opens_every_feature_file(tmp_path, capsys, damage):
    config, features = _site_yaml(tmp_path)
    rc, out = _check(config, capsys)
    assert rc == 0 and "every feature file opens, 64 features per patch" in out.out, out.err
    victim = features[-1]  # the last file read: every file before it was opened too
    if damage == "truncated":
        data = victim.read_bytes()
        victim.write_bytes(data[: len(data) // 2])
    else:
        with h5py.File(victim, "r+") as f:
            feats = f["features"][()]
            if damage == "nan":
                feats[0, 0] = np.nan
                f["features"][...] = feats
            else:
                del f["features"]
                f["features"] = np.zeros((feats.shape[0], 32), dtype=np.float32)
    rc, out = _check(config, capsys)
    assert rc == 2
    (line,) = [ln for ln in out.err.splitlines() if ln.startswith("error:")]
    assert victim.name in line and "Traceback" not in out.err
    assert re.search(r"tdamil-extract|re-extract|Re-extract", line), line


def test_one_site_name_rule_for_yaml_and_certificates(tmp_path):
    from tdamil.client.config import SiteConfig
    from tdamil.data.config import DataConfig
    from tdamil.security.certs import CertsError, init_pki, issue_site

    pki = init_pki(tmp_path / "certs", ["localhost"])
    data = DataConfig(manifest=tmp_path / "m.csv", features_dir=tmp_path)
    longest = "s" + "x" * 62  # 63 characters: the longest name both accept
    SiteConfig(site=longest, data=data)
    assert issue_site(longest, pki=pki.root).public_key.name == f"{longest}.pub"
    for bad in ("s" + "x" * 63, "-site", "site a", "site/a", ""):
        with pytest.raises(ValueError, match="not allowed"):
            SiteConfig(site=bad, data=data)
        with pytest.raises(CertsError, match="not allowed"):
            issue_site(bad, pki=pki.root)


def test_one_name_for_the_folder_of_site_public_keys():
    from tdamil.security.certs import _parser

    docs = {p: p.read_text() for p in [REPO / "README.md", REPO / "deploy" / "README.md",
                                       *sorted((REPO / "configs").rglob("server*.yaml")),
                                       REPO / "tdamil" / "security" / "certs.py"]}
    help_text = _parser().format_help() + "".join(
        a.format_help() for a in _parser()._subparsers._group_actions[0].choices.values())  # noqa: SLF001
    docs[Path("tdamil-certs --help")] = help_text
    for path, text in docs.items():
        for old in ("certs/sites/<site>.pub", "certs/sites\n", "site_public_keys: ../certs/sites",
                    "pki/sites/<site>.pub", "<pki>/sites/<site>.pub"):
            assert old not in text, f"{path} still names the key folder {old!r}"
    for path in (REPO / "README.md", REPO / "deploy" / "README.md", Path("tdamil-certs --help")):
        assert "site_keys" in docs[path], f"{path} does not name the site_keys folder"
    for path in sorted((REPO / "configs").rglob("server*.yaml")):
        auth = yaml.safe_load(path.read_text()).get("auth") or {}
        if auth.get("site_public_keys"):
            assert Path(auth["site_public_keys"]).name == "site_keys", path


def test_expired_coordinator_certificate_message_reads_right(tmp_path):
    from tdamil.security.certs import init_pki
    from tdamil.security.preflight import SecurityCheckError, probe_tls

    pki = init_pki(tmp_path / "certs", ["localhost"], server_days=0)  # expires the moment it is made
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(pki.server_cert), str(pki.server_key))
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]

    def serve() -> None:
        conn, _ = srv.accept()
        try:
            with ctx.wrap_socket(conn, server_side=True):
                pass
        except (OSError, ssl.SSLError):
            pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    time.sleep(1.1)
    try:
        with pytest.raises(SecurityCheckError) as info:
            probe_tls(f"127.0.0.1:{port}", pki.ca_cert)
    finally:
        thread.join(timeout=10)
        srv.close()
    text = str(info.value)
    assert "is not valid at this machine's time (certificate has expired)" in text
    assert "is certificate has" not in text


def test_run_errors_are_one_line_and_missing_sites_say_how_to_resume(tmp_path):
    from tdamil.federation.demo import write_demo_federation
    from tdamil.logs import one_line_error
    from tdamil.server.coordinator import Coordinator

    assert one_line_error("<class 'ValueError'>:<'site_a.yaml: bad\n value'>") == "site_a.yaml: bad value"
    paths = write_demo_federation(tmp_path / "demo", num_sites=2, train_bags=4, val_bags=2, test_bags=2,
                                  heldout_bags=4, secure=False)
    coord = Coordinator(paths["server"], insecure=True)
    hint = coord._resume_hint("Only 0 site(s) connected, 2 required (federation.min_sites)")  # noqa: SLF001
    assert f"flwr-server --config {paths['server'].resolve()} --resume" in hint
    assert coord._resume_hint("ValueError: x") == ""  # noqa: SLF001


# Flower 1.42's SuperNode lines (its console format) around a run that finished and a coordinator that left.
_FLOWER = "\x1b[92mINFO \x1b[0m:      {}"
_RUN = [_FLOWER.format("SuperNode ID: 123"), _FLOWER.format("[RUN 7, ROUND 2]"),
        _FLOWER.format("Receiving: train message (ID: abc)"), _FLOWER.format("Received successfully"),
        _FLOWER.format("Sending: train message (ID: def)")]
_SENT = [_FLOWER.format("Sent successfully")]
_GONE = ["\x1b[93mWARNING \x1b[0m:   Connection attempt failed, retrying in 1.05 seconds",
         "\x1b[93mWARNING \x1b[0m:   Giving up reconnection after 2.49 seconds and 4 tries.",
         "\x1b[91mERROR \x1b[0m:     Exit Code: 305", "Failed to initialize the connection to the SuperLink.",
         "[Errno 111] Connection refused", "The SuperNode could not establish a connection to the SuperLink.", "",
         "For more information, visit: <https://flower.ai/docs/framework/1.42/en/ref-exit-codes/305.html>"]


def _echoed(lines: list[str], capsys, state=None) -> str:
    from tdamil.federation.supernode import _Output

    out = _Output(state)
    for line in lines:
        out(line + "\n")
    return capsys.readouterr().out


def test_a_coordinator_gone_after_a_finished_run_is_waiting_not_an_error(capsys):
    from tdamil.federation.supernode import RUN_FINISHED_LINE, _RunState

    state = _RunState()
    text = _echoed(_RUN + _SENT + _GONE, capsys, state)
    assert text.count(RUN_FINISHED_LINE) == 1 and " INFO tdamil.client: " in text
    assert "ERROR" not in text and "Connection refused" not in text and "305" not in text
    assert "Sent successfully" in text and "Receiving: train message" in text  # the run's own lines stay
    # the next SuperNode (restarted while the site waits) is quiet about the missing coordinator ...
    assert _echoed(_GONE, capsys, state).strip() == ""
    # ... and a new coordinator's first message ends the wait
    assert "Receiving" in _echoed(_RUN, capsys, state) and not state.waiting


@pytest.mark.parametrize("before", [[], _RUN], ids=["never-connected", "mid-message"])
def test_a_coordinator_gone_before_a_reply_or_mid_message_stays_an_error(capsys, before):
    from tdamil.federation.supernode import RUN_FINISHED_LINE

    text = _echoed(before + _GONE, capsys)
    assert RUN_FINISHED_LINE not in text
    assert "ERROR flower-supernode: Exit Code: 305" in text and "Connection refused" in text


def test_extraction_summary_fits_80_columns_and_words_the_fix_for_a_slides_folder():
    from rich.console import Console

    from tdamil.wsi.extract_report import ExtractionSummary, SlideResult, fix_for
    from tdamil.wsi.reader import SlideReadError

    reason = ("/hospital/archive/slides/2024/very_long_slide_name_0001.svs: tile (12, 40) of level 0 cannot be "
              "decoded (JPEG error). The file is damaged.")
    results = [SlideResult("very_long_slide_name_0001", "failed", reason=reason, fix=fix_for(SlideReadError(reason))),
               SlideResult("ok_slide", "extracted", n_patches=1200, seconds=61.2, read_level=1)]
    for from_folder, wording in ((False, "remove the slide from the manifest"),
                                 (True, "move its file out of data.slides_dir")):
        summary = ExtractionSummary(results, "uni", Path("/hospital/features"), 62.0, from_folder=from_folder)
        console = Console(width=80, record=True, color_system=None)
        summary.print(console)
        text = console.export_text()
        assert wording in text and ("manifest" not in text) == from_folder
        assert max(len(line) for line in text.splitlines()) <= 80
        row = [line for line in text.splitlines() if "very_long_slide_name" in line and "failed" in line]
        assert len(row) == 1  # the slide's row is one line; its reason and fix follow the table
        assert len(text.splitlines()) <= 16, text
