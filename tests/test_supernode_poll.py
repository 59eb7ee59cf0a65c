"""The site's SuperNode command: Flower's own loop with a shorter idle poll (tdamil.client.supernode_poll),
and process isolation beside the warm-start SuperExec when ``federation.warm_start`` is on."""

from __future__ import annotations

import inspect
import time
from types import SimpleNamespace

import pytest

pytest.importorskip("flwr")


def test_flowers_supernode_loop_still_sleeps_where_we_shorten_it():
    """The two fixed sleeps PollClock replaces, read through the module's ``time`` attribute; if a
    Flower release changes them this fails instead of sites silently polling every 3 s again."""
    import flwr.supernode.start_client_internal as loop
    from tdamil.client.supernode_poll import FLOWER_IDLE_SLEEP_S, FLOWER_REPLY_SLEEP_S

    source = inspect.getsource(loop)
    assert loop.time is time or type(loop.time).__name__ == "PollClock"
    assert f"time.sleep({FLOWER_IDLE_SLEEP_S})" in source and f"time.sleep({FLOWER_REPLY_SLEEP_S})" in source
    assert "from time import" not in source


def test_poll_clock_replaces_only_flowers_two_sleeps(monkeypatch):
    import tdamil.client.supernode_poll as sn

    slept = []
    monkeypatch.setattr(sn._time, "sleep", slept.append)
    clock = sn.PollClock(idle_s=1.0, reply_s=0.1)
    for s in (3, 0.5, 2.0):
        clock.sleep(s)
    assert slept == [1.0, 0.1, 2.0]
    assert clock.time is time.time and clock.monotonic is time.monotonic


def _site(tmp_path, **federation):
    """A validated site's config as supernode_command reads it."""
    from tdamil.client.config import SiteFederationConfig

    return SimpleNamespace(site="site_a", federation=SiteFederationConfig(**federation),
                           tls=SimpleNamespace(ca_cert=tmp_path / "ca.pem"), auth=SimpleNamespace(private_key=None))


def test_the_site_starts_flowers_supernode_through_it_with_its_poll_interval(tmp_path):
    import sys

    from tdamil.client.config import SiteFederationConfig
    from tdamil.client.site import supernode_command

    cmd = supernode_command(_site(tmp_path, poll_interval_s=0.5), tmp_path / "site_a.yaml")
    assert cmd[:5] == [sys.executable, "-m", "tdamil.client.supernode_poll", "--poll-interval", "0.5"]
    assert cmd[cmd.index("--root-certificates") + 1] == str(tmp_path / "ca.pem")
    with pytest.raises(ValueError, match="poll_interval_s"):
        SiteFederationConfig(poll_interval_s=10)


def test_the_site_runs_its_supernode_in_process_isolation_only_when_warm(tmp_path):
    """With warm_start the ClientApps come from tdamil.client.warm_start, started beside the SuperNode."""
    from tdamil.client.site import supernode_command
    from tdamil.client.warm_start import warm_superexec_command

    warm_cmd = supernode_command(_site(tmp_path, runtime_port=9123, warm_start=True), tmp_path / "site_a.yaml",
                                 insecure=True)
    cold_cmd = supernode_command(_site(tmp_path, runtime_port=9123, warm_start=False), tmp_path / "site_a.yaml",
                                 insecure=True)
    assert warm_cmd[warm_cmd.index("--isolation") + 1] == "process" and "--isolation" not in cold_cmd
    companion = warm_superexec_command(9123, 4242)
    assert companion[1:3] == ["-m", "tdamil.client.warm_start"]
    assert companion[companion.index("--runtime-api-address") + 1] == "127.0.0.1:9123"
    assert companion[companion.index("--parent-pid") + 1] == "4242"
