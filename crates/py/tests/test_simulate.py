"""kvroute.simulate: the same simulator and JSON as `kvroute simulate --json`."""

import json
import os
import subprocess

import pytest

import kvroute

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))


def test_seed_experiment_matches_the_cli():
    args = dict(workload="seed", policies=["random", "session-affinity", "oracle"], seed=3)
    got = kvroute.simulate(**args)
    assert got["workload"] == "seed"
    rows = {r["policy"]: r for r in got["results"]}
    assert set(rows) == {"random", "session-affinity", "oracle"}
    # ClientIP affinity concentrates the one client on one pod; random spreads it.
    assert rows["session-affinity"]["top_worker_share"] > 0.7
    assert rows["random"]["top_worker_share"] < 0.4
    assert rows["oracle"]["hit_rate"] >= rows["session-affinity"]["hit_rate"]
    cli = os.path.join(ROOT, "target", "release", "kvroute")
    if os.path.exists(cli):
        out = os.path.join(ROOT, "target", "py-sim-test.json")
        subprocess.run(
            [cli, "simulate", "--workload", "seed", "--policies", "random,session-affinity,oracle",
             "--seed", "3", "--json", out],
            check=True, stdout=subprocess.DEVNULL,
        )
        with open(out) as f:
            assert json.load(f) == got


def test_bad_settings_raise_config_error():
    with pytest.raises(kvroute.ConfigError):
        kvroute.simulate(workload="nope")
    with pytest.raises(kvroute.ConfigError):
        kvroute.simulate(policies=["fastest"])
    with pytest.raises(kvroute.ConfigError):
        kvroute.simulate(rate=-1.0)
    with pytest.raises(kvroute.ConfigError):
        kvroute.simulate(colour="blue")


def test_malformed_trace_names_the_line(tmp_path):
    trace = tmp_path / "t.jsonl"
    trace.write_text(
        '{"timestamp": 0, "input_length": 10, "output_length": 1, "hash_ids": [0]}\n'
        "not json\n"
    )
    with pytest.raises(kvroute.KvrouteError, match="line 2"):
        kvroute.simulate(workload=f"trace:{trace}", policies=["random"])


def test_kvroute_policy_and_router_replicas():
    rep = kvroute.simulate(workload="seed", policies=["kvroute", "oracle"], router_replicas=2)
    assert rep["config"]["cluster"]["router_replicas"] == 2
    assert [r["policy"] for r in rep["results"]] == ["kvroute", "oracle"]
    assert rep["results"][0]["hit_rate"] <= rep["results"][1]["hit_rate"] + 1e-12
    with pytest.raises(kvroute.ConfigError):
        kvroute.simulate(workload="seed", router_replicas=0)
