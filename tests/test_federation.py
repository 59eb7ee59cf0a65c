"""Federation unit tests: aggregation, message contents, sampling timeout, checkpoints/resume,
configs, the config-only app bundle and the coordinator's TLS guard. Tiny models, in-process."""

from __future__ import annotations

import json
import logging
import math
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

from tdamil.config import ConfigError
from tdamil.federation.audit import read_audit
from tdamil.federation.config import FederationConfig
from tdamil.federation import grids
from tdamil.federation.grids import InProcessGrid, PatientGrid, SitesUnavailableError
from tdamil.federation.records import eval_metric_keys, nan_weighted_mean, train_metric_keys
from tdamil.federation.strategies import build_strategy
from tdamil.federation.task import ModelSpec, SiteData, build_model, model_to_arrays

REPO = Path(__file__).resolve().parents[1]
TINY = {"name": "tdamil", "dim": 16, "depth": 1, "num_heads": 2}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _digits_sites(num_sites: int = 2, train: int = 8, val: int = 6, test: int = 6):
    from tdamil.data.digits import DigitsBagsConfig, make_digits_sites

    cfg = DigitsBagsConfig(num_train_bags=train, num_val_bags=val, num_test_bags=20, mean_bag_size=6, seed=1)
    return make_digits_sites(cfg, num_sites, site_test_bags=test)


# ---------------------------------------------------------------------------------------------
def _reply(arrays: ArrayRecord, n: int, loss: float) -> Message:
    keys = train_metric_keys()
    metrics = MetricRecord({k: (n if k == "num-examples" else loss) for k in keys})
    instr = Message(RecordDict(), 1001, "train")
    instr.metadata.__dict__["_message_id"] = "x"
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=instr)


def test_fedavg_is_the_slide_weighted_mean_of_every_array(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 1)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    spec = ModelSpec(TINY, in_dim=8, num_classes=2)
    a, b = build_model(spec, seed=1), build_model(spec, seed=2)
    sa, sb = a.state_dict(), b.state_dict()
    assert any("task_token" in k for k in sa) and any("channel_matrix" in k for k in sa)
    strategy = build_strategy(FederationConfig(min_sites=2))
    new, metrics = strategy.aggregate_train(1, [_reply(model_to_arrays(a), 30, 1.0), _reply(model_to_arrays(b), 10, 3.0)])
    got = new.to_torch_state_dict()
    assert set(got) == set(sa)
    for key in sa:  # by hand: (30 * a + 10 * b) / 40, T and C included
        want = (30 * sa[key].double() + 10 * sb[key].double()) / 40
        assert torch.allclose(got[key].double(), want, atol=1e-6), key
    assert metrics["train-loss"] == pytest.approx((30 * 1.0 + 10 * 3.0) / 40)


def test_metric_average_skips_a_sites_nan_but_keeps_every_key():
    keys = eval_metric_keys()
    recs = [RecordDict({"metrics": MetricRecord({k: (n if k == "num-examples" else v) for k in keys})})
            for n, v in ((10, float("nan")), (30, 0.8))]
    out = nan_weighted_mean(recs, "num-examples")
    assert set(out) == set(keys)
    assert out["auroc"] == pytest.approx(0.8) and out["num-examples"] == 40
    all_nan = nan_weighted_mean(recs[:1], "num-examples")
    assert math.isnan(all_nan["auroc"])


def test_patient_grid_stops_waiting_after_the_timeout():
    class Empty(InProcessGrid):
        def get_node_ids(self):
            return [1000]

    now = [0.0]
    grid = PatientGrid(Empty(None, {1000: {}}), min_nodes=2, wait_timeout=30, clock=lambda: now[0])
    assert list(grid.get_node_ids()) == [1000]  # still waiting
    now[0] = 31.0
    with pytest.raises(SitesUnavailableError, match="min_sites"):
        grid.get_node_ids()


# ---------------------------------------------------------------------------------------------
def _sim_cfg(tmp_path: Path, rounds: int = 2, **fed):
    from tdamil.simulation.config import SimConfig

    cfg = SimConfig(model=dict(TINY), output_dir=tmp_path / "run", baselines=False)
    cfg.federation = FederationConfig(rounds=rounds, lr=1e-3, min_sites=2, round_timeout_s=60, wait_for_sites_s=5,
                                      **fed)
    return cfg


def _sims(one_class_val: bool = False):
    from tdamil.data.bags import InMemoryBagDataset
    from tdamil.simulation.sites import SimSites

    made = _digits_sites()
    sites = {n: SiteData(n, s.train, s.val, s.test) for n, s in made.items()}
    if one_class_val:  # site_b validates on negatives only: AUROC undefined -> NaN, same keys
        val = sites["site_b"].val
        neg = [i for i in range(len(val)) if val[i].label == 0]
        sites["site_b"].val = InMemoryBagDataset([val[i].features for i in neg], [0] * len(neg), num_classes=2)
    return SimSites(sites, {"held_out": made.held_out}, int(made["site_a"].train.in_dim))


def test_sites_send_only_model_arrays_metrics_and_their_name(tmp_path):
    from tdamil.simulation.engines import run_federation

    cfg = _sim_cfg(tmp_path, rounds=1)
    sims = _sims(one_class_val=True)
    seen: list[tuple[Message, Message]] = []
    setup = run_federation(cfg, sims, tmp_path / "run", on_message=lambda m, r: seen.append((m, r)))
    state_keys = set(build_model(setup.spec).state_dict())
    assert {m.metadata.message_type for m, _ in seen} == {"train", "evaluate"}
    for msg, reply in seen:
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
        content = reply.content
        kind = msg.metadata.message_type
        assert set(content.config_records) == {"site"}
        assert set(content.config_records["site"]) == {"name", "server-round", "round-token", "versions", "extraction"}
        assert set(json.loads(content.config_records["site"]["versions"])) == {
            "tdamil-fl", "flwr", "torch", "python", "device", "precision"}
        assert content.config_records["site"]["round-token"] == msg.content["config"]["round-token"]
        assert set(content.metric_records) == {"metrics"}
        want = set(train_metric_keys() if kind == "train" else eval_metric_keys())
        assert set(content.metric_records["metrics"]) == want  # same keys from every site, NaN allowed
        if kind == "train":
            assert set(content.array_records) == {"arrays"}
            assert set(content.array_records["arrays"]) == state_keys
        else:
            assert not content.array_records
        for value in content.metric_records["metrics"].values():
            assert isinstance(value, (int, float))  # numbers only: no slide ids, no features
    val_auroc = [r.content["metrics"]["val-auroc"] for m, r in seen
                 if m.metadata.message_type == "train" and r.content["site"]["name"] == "site_b"]
    assert val_auroc and math.isnan(val_auroc[0])


def test_resume_continues_at_the_next_round_with_the_saved_model(tmp_path):
    from tdamil.checkpoint import load_checkpoint
    from tdamil.simulation.engines import run_federation

    sims = _sims()
    run_federation(_sim_cfg(tmp_path, rounds=2), sims, tmp_path / "run")
    first = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert first["round"] == 2
    r1 = load_checkpoint(tmp_path / "run" / "checkpoints" / "round_0001.pt")
    assert any(not torch.equal(first["model_state"][k], r1["model_state"][k]) for k in r1["model_state"])
    run_federation(_sim_cfg(tmp_path, rounds=3), sims, tmp_path / "run", resume=True)
    events = read_audit(tmp_path / "run" / "audit.jsonl")
    resumed = [e for e in events if e["event"] == "resumed"]
    assert resumed and resumed[0]["next_round"] == 3
    started = [e["round"] for e in events if e["event"] == "round_started"]
    assert started == [1, 2, 3]  # rounds 1-2 are not redone
    last = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert last["round"] == 3
    ckpts = [e for e in events if e["event"] == "checkpoint"]
    assert all(len(e["sha256"]) == 64 for e in ckpts)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {r["round"] for r in rows if r["phase"] == "heldout"} == {0, 1, 2, 3}
    assert {r["site"] for r in rows if r["phase"] == "train"} == {"site_a", "site_b"}
    assert (tmp_path / "run" / "metrics.csv").exists()
    assert list((tmp_path / "run" / "plots").glob("curve_site_a.png"))
    # a fresh (not resumed) run in the same folder keeps the finished one aside, never overwrites it
    run_federation(_sim_cfg(tmp_path, rounds=1), sims, tmp_path / "run")
    kept = list((tmp_path / "run" / "previous").glob("*/checkpoints/round_0003.pt"))
    assert len(kept) == 1
    assert [e["round"] for e in read_audit(tmp_path / "run" / "audit.jsonl") if e["event"] == "round_started"] == [1]


def test_a_failing_site_is_audited_and_the_round_completes_with_the_others(tmp_path):
    from tdamil.simulation.engines import run_federation

    sims = _sims()
    bad = sims.sites["site_b"]
    bad.train = None  # this site's ClientApp raises
    cfg = _sim_cfg(tmp_path, rounds=1)
    cfg.federation.min_replies = 1
    setup = run_federation(cfg, sims, tmp_path / "run")
    assert setup.result.failed_rounds == []
    events = read_audit(tmp_path / "run" / "audit.jsonl")
    assert any(e["event"] == "failure" and e["site"] == "site_b" for e in events)
    agg = [e for e in events if e["event"] == "aggregated"]
    assert agg and agg[0]["sites"] == ["site_a"]


# ---------------------------------------------------------------------------------------------
def test_configs_shipped_with_the_project_validate():
    from tdamil.client.config import load_site_config
    from tdamil.simulation.config import load_sim_config
    from tdamil.server.config import load_server_config

    load_server_config(REPO / "configs/server.yaml", check_files=False)
    load_server_config(REPO / "configs/examples/server_msi.yaml", check_files=False)
    for site in ("site_a", "site_b"):
        cfg, extraction = load_site_config(REPO / f"configs/sites/{site}.yaml", check_files=False)
        assert cfg.site == site and extraction is not None
    load_site_config(REPO / "configs/examples/site_tcga_crc.yaml", check_files=False)
    sim = load_sim_config(REPO / "configs/sim_digits.yaml")
    assert sim.data.source == "digits"


def test_config_errors_name_the_key_and_the_fix(tmp_path):
    from tdamil.client.config import load_site_config
    from tdamil.server.config import load_server_config

    text = (REPO / "configs/server.yaml").read_text()
    bad = tmp_path / "server.yaml"
    bad.write_text(text.replace("rounds: 20", "round: 20"))
    with pytest.raises(ConfigError, match=r"federation\.round.*Did you mean 'rounds'"):
        load_server_config(bad, check_files=False)
    bad.write_text(text.replace("min_sites: 2", "min_sites: two"))
    with pytest.raises(ConfigError, match=r"federation\.min_sites.*whole number"):
        load_server_config(bad, check_files=False)
    with pytest.raises(ConfigError, match=r"evaluation\.data\.manifest.*not found"):
        load_server_config(REPO / "configs/server.yaml")  # the example points at data that is not here
    site = tmp_path / "site_a.yaml"
    site.write_text((REPO / "configs/sites/site_a.yaml").read_text())
    with pytest.raises(ConfigError, match=r"data\.manifest.*not found"):
        load_site_config(site)
    site.write_text("site: site_a\n")
    with pytest.raises(ConfigError, match=r"'data' is required"):
        load_site_config(site, check_files=False)


@pytest.mark.slow
def test_coordinator_refuses_to_run_without_tls_unless_insecure(tmp_path):
    from tdamil.federation.demo import write_demo_federation

    paths = write_demo_federation(tmp_path, num_sites=2, train_bags=4, val_bags=2, test_bags=2, heldout_bags=4,
                                  secure=False)
    res = subprocess.run([sys.executable, "-m", "tdamil.server.coordinator", "--config", str(paths["server"]), "--check"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "--insecure" in res.stderr and "tdamil-certs" in res.stderr
    ok = subprocess.run([sys.executable, "-m", "tdamil.server.coordinator", "--config", str(paths["server"]), "--check",
                         "--insecure"], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr


# ---------------------------------------------------------------------------------------------
def test_the_run_bundle_carries_configuration_only_and_loads_installed_code(tmp_path):
    from flwr.cli.build import build_fab_from_disk
    from flwr.supercore.object_ref import load_app

    import tdamil.client.client_app as installed
    from tdamil.server.fab import COMPONENTS, fab_members, write_app_dir

    fab = build_fab_from_disk(write_app_dir(tmp_path / "tdamil-fl"))
    assert fab_members(fab) == [".info/CONTENT", "pyproject.toml"]
    # Flower unpacks the bundle, puts its folder first on sys.path and imports the component:
    unpacked = tmp_path / "unpacked"
    unpacked.mkdir()
    (unpacked / "pyproject.toml").write_bytes(__import__("zipfile").ZipFile(__import__("io").BytesIO(fab)).read("pyproject.toml"))
    app = load_app(COMPONENTS["clientapp"], ValueError, unpacked)
    assert app is installed.app
    assert Path(installed.__file__).resolve().is_relative_to(REPO / "client")
    # the repository's own [tool.flwr.app] names the same components
    repo_cfg = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert repo_cfg["components"] == COMPONENTS


def test_server_config_docstring_model_example_validates():
    import yaml

    import tdamil.server.config as server_config

    (line,) = [ln for ln in server_config.__doc__.splitlines() if ln.strip().startswith("model:")]
    example = yaml.safe_load(line.split("#")[0])["model"]
    server_config.validate_model(example, "server/config.py docstring")  # ConfigError on an unknown key


def test_output_folders_from_configs_are_clean_absolute_paths():
    from tdamil.simulation.config import load_sim_config
    from tdamil.server.config import load_server_config

    sim = load_sim_config(REPO / "configs/sim_digits.yaml")  # output_dir: ../runs/sim_digits
    assert sim.output_dir == REPO / "runs" / "sim_digits" and ".." not in sim.output_dir.parts
    srv = load_server_config(REPO / "configs/server.yaml", check_files=False)  # output_dir: ../runs/federation
    assert srv.output_dir == REPO / "runs" / "federation" and ".." not in srv.output_dir.parts


_LOG_LINE = r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d (DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.-]+: "


@pytest.mark.slow
def test_simulation_prints_each_flower_line_once_with_time_level_and_source(tmp_path):
    import re

    cfg_dir = tmp_path / "configs"
    cfg_dir.mkdir()
    (cfg_dir / "sim.yaml").write_text(
        "output_dir: ../runs/sim\n"
        "model: {name: tdamil, dim: 16, depth: 1, num_heads: 2}\n"
        "baselines: false\n"
        "data: {source: digits, digits: {num_sites: 2, site_test_bags: 4, held_out_fraction: 0.3,\n"
        "       bags: {num_train_bags: 6, num_val_bags: 4, num_test_bags: 8, mean_bag_size: 5, seed: 0}}}\n"
        "federation: {rounds: 1, min_sites: 2, round_timeout_s: 60, wait_for_sites_s: 5}\n")
    res = subprocess.run([sys.executable, "-m", "tdamil.simulation.cli", "--config", str(cfg_dir / "sim.yaml")],
                         capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    text = res.stdout + res.stderr
    assert "\x1b[" not in text  # no colour codes from Flower's own handler
    sampled = [ln for ln in text.splitlines() if "configure_train: Sampled" in ln]
    assert len(sampled) == 1 and re.match(_LOG_LINE.replace(r"[\w.-]+", "flwr"), sampled[0]), sampled
    assert all(re.match(_LOG_LINE, ln) for ln in res.stderr.splitlines() if ln.strip()), res.stderr[-2000:]
    # the output folder is printed as a clean absolute path (configs/../runs/sim resolved)
    assert f"everything in {tmp_path / 'runs' / 'sim'}/" in res.stdout and ".." not in res.stdout


def test_flower_console_lines_get_the_project_format():
    import logging
    import re

    from tdamil.logs import format_flower_console, reformat_flower_line

    line = reformat_flower_line("\x1b[93mWARNING \x1b[0m:   fraction_evaluate is set to 0.0: skipped\n")
    assert re.match(_LOG_LINE + r"fraction_evaluate is set to 0\.0: skipped\n$", line) and " flwr: " in line
    assert reformat_flower_line("Successfully started run 7\n") == "Successfully started run 7\n"
    from flwr.common.logger import console_handler

    flwr_logger = logging.getLogger("flwr")
    attached = console_handler in flwr_logger.handlers  # an in-process run earlier may have routed it to root
    if not attached:
        flwr_logger.addHandler(console_handler)
    try:
        handlers = format_flower_console()  # what flwr-serverapp streams to the coordinator
        assert handlers == [console_handler]
        record = logging.LogRecord("flwr", logging.INFO, __file__, 1, "aggregate_train: Received %d results", (2,),
                                   None)
        assert re.match(_LOG_LINE + "aggregate_train: Received 2 results$", console_handler.format(record))
    finally:
        if not attached:
            flwr_logger.removeHandler(console_handler)


def test_resume_refuses_a_checkpoint_with_flipped_bits_and_names_the_intact_round(tmp_path):
    from tdamil.checkpoint import load_checkpoint
    from tdamil.simulation.engines import run_federation
    from tdamil.security.integrity import CheckpointIntegrityError

    sims = _sims()
    out = tmp_path / "run"
    run_federation(_sim_cfg(tmp_path, rounds=1), sims, out)
    last, round1 = out / "checkpoints" / "last.pt", out / "checkpoints" / "round_0001.pt"
    data = bytearray(last.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit in the tensor bytes: torch.load still reads it
    last.write_bytes(bytes(data))
    load_checkpoint(last)  # (silently "fine" without the check)
    kept = {p.name: p.read_bytes() for p in (out / "checkpoints").glob("*.pt")}
    audit_before = (out / "audit.jsonl").read_text()
    with pytest.raises(CheckpointIntegrityError, match=r"last\.pt.*round_0001\.pt \(round 1\) is intact"):
        run_federation(_sim_cfg(tmp_path, rounds=2), sims, out, resume=True)
    # nothing finished is lost: every checkpoint is as it was, no round was started
    assert {p.name: p.read_bytes() for p in (out / "checkpoints").glob("*.pt")} == kept
    after = read_audit(out / "audit.jsonl")
    assert (out / "audit.jsonl").read_text().startswith(audit_before)
    assert [e["round"] for e in after if e["event"] == "round_started"] == [1]
    # following the advice works: the intact round checkpoint over last.pt, then resume
    last.write_bytes(round1.read_bytes())
    run_federation(_sim_cfg(tmp_path, rounds=2), sims, out, resume=True)
    assert load_checkpoint(last)["round"] == 2


def test_a_failed_session_is_judged_by_its_own_audit_lines_not_the_earlier_run(tmp_path):
    from tdamil.federation.audit import AuditLog, session_outcome
    from tdamil.federation.demo import write_demo_federation
    from tdamil.simulation.engines import run_federation
    from tdamil.server.coordinator import Coordinator

    sims = _sims()
    out = tmp_path / "run"
    first = run_federation(_sim_cfg(tmp_path, rounds=1), sims, out)
    assert session_outcome(out / "audit.jsonl", first.session) == ("finished", None)
    (out / "checkpoints" / "last.pt").write_bytes(b"not a checkpoint")  # unreadable on resume
    with pytest.raises(ValueError):
        run_federation(_sim_cfg(tmp_path, rounds=2), sims, out, resume=True)
    events = read_audit(out / "audit.jsonl")
    assert events[-1]["event"] == "run_failed" and "last.pt" in events[-1]["error"]
    assert "\n" not in events[-1]["error"]
    failed_session = events[-1]["session"]
    assert failed_session != first.session
    state, error = session_outcome(out / "audit.jsonl", failed_session)
    assert state == "failed" and "last.pt" in error
    # the coordinator: the earlier session's run_finished (last line) does not count for this one
    paths = write_demo_federation(tmp_path / "demo", num_sites=2, train_bags=4, val_bags=2, test_bags=2, heldout_bags=4,
                                  secure=False)
    coord = Coordinator(paths["server"], insecure=True, resume=True, output_dir=tmp_path / "coord")
    AuditLog(coord.out_dir / "audit.jsonl", session="earlier").write("run_finished", last_round=1)
    assert not coord.run_finished() and coord.outcome() == ("unknown", None)
    AuditLog(coord.out_dir / "audit.jsonl", session=coord.session).write("run_failed", error="ValueError: x")
    AuditLog(coord.out_dir / "audit.jsonl", session="earlier").write("run_finished", last_round=1)
    assert coord.outcome() == ("failed", "ValueError: x") and not coord.run_finished()



# ---------------------------------------------------------------------------------------------
# Round deadline (issue 21): one site's stalled upload never holds back or discards another's.
class _RemoteGrid(InProcessGrid):
    """An in-process grid that the PatientGrid pulls like a remote one (each reply by its own
    thread); a reply of a site in ``stall`` spends that many seconds in its pull, as
    Flower's grid does while the site's upload is still arriving."""

    runs_sites_here = False

    def __init__(self, *args, stall: dict | None = None, **kw) -> None:
        super().__init__(*args, **kw)
        self.stall = dict(stall or {})

    def pull_messages(self, message_ids):
        import time

        out = []
        for mid in list(message_ids):
            msg = self._pending.get(mid)
            replies = list(super().pull_messages([mid]))
            if msg is not None and replies:
                site = self._contexts[msg.metadata.dst_node_id].node_config["site"]
                time.sleep(self.stall.get(site, 0.0))
            out += replies
        return out


def test_a_stalled_reply_ends_at_the_deadline_without_holding_back_the_other_and_comes_back_late():
    import time

    def app(msg, ctx):
        return Message(RecordDict({"metrics": MetricRecord({"x": 1.0})}), reply_to=msg)

    grid = PatientGrid(_RemoteGrid(app, {1: {"site": "site_a"}, 2: {"site": "site_b"}}, stall={"site_b": 2.0}),
                       2, 5, poll_interval=0.01)
    msgs = [grid.create_message(RecordDict(), "train", n, "") for n in (1, 2)]
    t0 = time.monotonic()
    replies = list(grid.send_and_receive(msgs, timeout=0.5, round_phase=(2, "train"), deadline_note="deadline passed"))
    assert time.monotonic() - t0 < 1.5  # ends at the deadline, not when site_b's pull returns
    by_node = {int(r.metadata.src_node_id): r for r in replies}
    assert not by_node[1].has_error()  # site_a's reply is not held back by site_b's
    assert by_node[2].has_error() and by_node[2].error.reason == "deadline passed"
    assert by_node[2].metadata.reply_to_message_id == msgs[1].metadata.message_id
    assert grid.late_replies() == []
    time.sleep(2.5)
    late = grid.late_replies()  # site_b's reply came after the deadline: handed over as late, once
    assert [(x.round, x.phase, x.node_id) for x in late] == [(2, "train", 2)] and not late[0].reply.has_error()
    assert grid.late_replies() == []
    grid.inner.stall = {}
    nxt = [grid.create_message(RecordDict(), "train", n, "") for n in (1, 2)]
    again = list(grid.send_and_receive(nxt, timeout=5, round_phase=(3, "train")))
    assert {r.metadata.reply_to_message_id for r in again} == {m.metadata.message_id for m in nxt}


def test_the_wait_line_names_the_missing_sites():
    class One(InProcessGrid):
        def get_node_ids(self):
            return [1000]

    now = [0.0]
    grid = PatientGrid(One(None, {1000: {}}), min_nodes=2, wait_timeout=30, clock=lambda: now[0])
    grid.known_sites = lambda: {1000: ("site_a", "registered"), 1001: ("site_b", "registered")}
    grid.get_node_ids()
    now[0] = 31.0
    with pytest.raises(SitesUnavailableError, match=r"waiting for site_b \(registered\), 1 of 2 required connected"):
        grid.get_node_ids()


def test_a_site_past_the_round_deadline_is_named_the_others_are_aggregated_and_its_late_reply_refused(
        tmp_path, monkeypatch, caplog):
    """Round 2: site_b's reply takes longer than the whole round's deadline; the round aggregates
    site_a by the deadline, audits site_b by name, and refuses site_b's reply when it arrives in
    round 3 instead of aggregating it there."""
    import time

    from tdamil.client.client_app import make_client_app
    from tdamil.federation.loop import RoundLoop
    from test_federation_timeline import TINY as SPEC, _runtimes

    runtimes = _runtimes()
    app = make_client_app(lambda ctx: runtimes[ctx.node_config["site"]])
    fed = FederationConfig(rounds=3, lr=1e-3, min_sites=2, min_replies=1, round_timeout_s=6, wait_for_sites_s=5)
    inner = _RemoteGrid(app, {1: {"site": "site_a"}, 2: {"site": "site_b"}})
    grid = PatientGrid(inner, 2, 5, poll_interval=0.02)
    out = tmp_path / "run"
    loop = RoundLoop(build_strategy(fed), fed, SPEC.to_json(), out, plot=False)
    original = grid.send_and_receive

    def send(messages, **kw):  # site_b's round-2 reply comes 7.5 s after it was sent, 1.5 s into round 3
        inner.stall = {(2, "train"): {"site_b": 7.5}, (3, "train"): {"site_b": 3.0}}.get(kw.get("round_phase"), {})
        return original(messages, **kw)

    grid.send_and_receive = send
    monkeypatch.setattr(grids, "PROGRESS_S", 0.5)  # a waiting line every 0.5 s instead of 15
    t0 = time.monotonic()
    with caplog.at_level(logging.INFO):
        result = loop.run(grid, model_to_arrays(build_model(SPEC, seed=0)))
    assert result.failed_rounds == []
    # what the operators see: each reply's size and upload rate, the sites waited for, the time left
    assert re.search(r"Round 2 train: reply from site_a in: [\d.]+ MB, [\d.]+ s after the instruction was sent, "
                     r"uploaded in [\d.]+ s \(~[\d.]+ Mbit/s\); \d+ s to the round's deadline", caplog.text)
    assert re.search(r"Round 2 train: 1 of 2 replies in; waiting for site_b; \d+ s to the round's deadline",
                     caplog.text)
    assert re.search(r"Round 2: instruction in: [\d.]+ MB, [\d.]+ s after the coordinator sent it", caplog.text)
    events = read_audit(out / "audit.jsonl")
    agg = {e["round"]: e["sites"] for e in events if e["event"] == "aggregated"}
    assert agg == {1: ["site_a", "site_b"], 2: ["site_a"], 3: ["site_a", "site_b"]}
    fail = [e for e in events if e["event"] == "failure"]
    assert any(e["round"] == 2 and e["site"] == "site_b" and "round's deadline" in e["reason"] for e in fail), fail
    late = [e for e in fail if e["reason"].startswith("late reply refused")]
    assert [(e["round"], e["phase"], e["site"]) for e in late] == [(2, "train", "site_b")], fail
    ended = [e for e in events if e["event"] == "round_finished" and e["round"] == 2][0]
    assert ended["seconds"] < 6 + 3  # the round ended by its deadline, not by site_b's upload
    timeline = [e for e in events if e["event"] == "round_timeline" and e["round"] == 2][0]
    assert timeline["critical_site"] == "site_a" and timeline["columns"]["wait for missing sites"] > 2
    assert time.monotonic() - t0 < 60
