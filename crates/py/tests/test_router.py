"""The Router's lifecycle, load, snapshot and metrics calls."""

import array

import kvroute
from conftest import recorded_batches


def two_pods(**extra):
    cfg = {"hash_algo": "sha256", "workers": [{"name": "pod-a"}, {"name": "pod-b"}]}
    cfg.update(extra)
    return kvroute.Router(cfg)


def test_config_as_dict_or_json_string():
    a = kvroute.Router({"block_size": 32, "hash_algo": "sha256_cbor"})
    b = kvroute.Router('{"block_size": 32, "hash_algo": "sha256_cbor"}')
    assert a.config() == b.config()
    assert a.config()["block_size"] == 32
    assert kvroute.Router().config()["block_size"] == 16


def test_token_containers_agree():
    r = two_pods()
    toks = list(range(7, 107))
    want = r.block_keys(toks)
    assert len(want) == 6
    assert r.block_keys(tuple(toks)) == want
    assert r.block_keys(array.array("I", toks)) == want
    assert r.block_keys(array.array("q", toks)) == want
    assert r.block_keys(array.array("H", toks)) == want
    assert r.block_keys(memoryview(array.array("l", toks))) == want
    assert r.block_keys(iter(toks)) == want
    assert r.block_keys(range(7, 107)) == want
    assert r.block_keys(bytes(range(7, 107))) == want


LOAD = {"scorers": [{"name": "running", "weight": 1}, {"name": "queue", "weight": 1}, {"name": "kv-utilization", "weight": 1}]}


def test_lifecycle_moves_load(kv_events):
    r = two_pods(profile=LOAD)
    a = r.route(list(range(64)))
    r.on_routed(a)
    assert r.inflight_requests() == 1
    # With one request running on the first pick, the load profile picks the other pod.
    b = r.route(list(range(64)))
    assert b.worker != a.worker
    r.on_routed(b)
    r.on_first_token(a.request_id)
    r.on_finished(a.request_id)
    r.on_finished(b.request_id)
    assert r.inflight_requests() == 0


def test_report_load_health_and_drain():
    r = two_pods(profile=LOAD)
    r.report_load("pod-a", waiting=50, running=10, kv_usage=0.9)
    assert {r.route([1] * 32).worker for _ in range(5)} == {"pod-b"}
    r.report_load("pod-a", waiting=0, running=0, kv_usage=0.0)
    r.set_healthy("pod-b", False)
    assert {r.route([1] * 32).worker for _ in range(5)} == {"pod-a"}
    r.set_healthy("pod-b", True)
    r.drain_worker("pod-a")
    assert {r.route([1] * 32).worker for _ in range(5)} == {"pod-b"}
    r.drain_worker("pod-a", False)
    r.remove_worker("pod-b")
    assert r.workers() == [("pod-a", 0)]
    r.add_worker("pod-c", 2)
    assert ("pod-c", 2) in r.workers()


def test_a_timed_load_report_works_off_other_routers_prefill_from_the_scrape():
    # The kvroute preset (the default) reads a rise of the other router replicas' active
    # requests on a worker between two scrapes as one request of theirs in prefill there,
    # worked off from the scrape's time (`now_ms`) or, without it, from the next route.
    def queue_s(timed):
        r = two_pods()
        d = r.route(list(range(1000)), now_ms=1_000)
        r.on_routed(d)
        r.on_first_token(d.request_id)
        r.on_finished(d.request_id)
        at = {"now_ms": 2_000} if timed else {}
        r.report_load(d.worker, waiting=0, running=0, **at)
        at = {"now_ms": 2_050} if timed else {}
        r.report_load(d.worker, waiting=0, running=1, **at)
        # A minute later: long enough for any prefill of one request.
        later = r.route(list(range(5000, 6000)), now_ms=62_050)
        (c,) = [c for c in later.candidates if c.worker == d.worker]
        return c.scores["queue_s"]

    assert queue_s(timed=False) > 0.0
    assert queue_s(timed=True) == 0.0


def test_snapshot_restore_roundtrip(kv_events):
    r = two_pods(profile="prefix")
    for _, payload, _ in recorded_batches(kv_events)[:1]:
        r.apply_vllm_batch("pod-a", payload)
    snap = r.snapshot()
    assert isinstance(snap, bytes) and len(snap) > 0
    fresh = two_pods(profile="prefix")
    assert fresh.route(list(range(100))).matched_blocks == 0
    assert fresh.restore(snap) == {}
    d = fresh.route(list(range(100)))
    assert (d.worker, d.matched_blocks) == ("pod-a", 6)
    assert fresh.index_stats() == r.index_stats() or fresh.index_stats()["holder_blocks"] == 6


def test_metrics_and_prometheus(kv_events):
    r = two_pods()
    _, payload, _ = recorded_batches(kv_events)[0]
    r.apply_vllm_batch("pod-a", payload)
    for _ in range(3):
        r.route(list(range(100)))
    m = r.metrics()
    assert m["routes"] == 3
    assert sum(w["decisions"] for w in m["workers"]) == 3
    names = {w["worker"]["name"] for w in m["workers"]}
    assert names == {"pod-a", "pod-b"}
    text = r.prometheus()
    assert "kvroute_" in text and "pod-a" in text


def test_decision_to_dict():
    r = two_pods()
    d = r.route(list(range(40)), session="client-1")
    dd = d.to_dict()
    assert dd["worker"] == d.worker and dd["request_id"] == d.request_id
    assert dd["total_blocks"] == 2 and dd["prompt_tokens"] == 40
    assert [c["worker"] for c in dd["candidates"]] == [c.worker for c in d.candidates]
    assert all(isinstance(c["scores"], dict) for c in dd["candidates"])
    assert "Decision(" in repr(d)


def test_kvroute_preset_and_prediction_metrics():
    # The default profile is the kvroute preset, explained in seconds.
    r = kvroute.Router({"workers": [{"name": "a"}, {"name": "b"}]})
    tokens = list(range(160))
    d = r.route(tokens)
    assert list(d.candidates[0].scores)[0] == "ttft_s"
    r.on_routed(d)
    # The routed request's blocks are predicted on its worker until events confirm them.
    again = r.route(tokens)
    assert (again.worker, again.matched_blocks) == (d.worker, 10)
    m = r.metrics()
    assert m["predictions"]["made"] == 10 and m["predictions_held"] == 10
    assert all(w["prefill_tokens_per_s"] == 10000.0 for w in m["workers"])
    assert all(w["prediction_ttl_s"] == 2.0 for w in m["workers"])
    assert "kvroute_predictions_made_total 10" in r.prometheus()
    assert kvroute.Router({"profile": "kvroute"}).metrics()["predictions"]["made"] == 0


def test_ttft_tail_metric():
    # The router's TTFT tail (the p99 of the first-token times it observed) is exported.
    import time

    r = kvroute.Router({"workers": [{"name": "a"}, {"name": "b"}]})
    assert r.metrics()["tail_ttft_s"] == 0.0
    for i in range(64):
        d = r.route(list(range(1000 + 64 * i, 1064 + 64 * i)))
        r.on_routed(d)
        time.sleep(0.002)
        r.on_first_token(d.request_id)
        r.on_finished(d.request_id)
    tail = r.metrics()["tail_ttft_s"]
    assert 0.001 <= tail < 10.0
    assert "kvroute_ttft_tail_seconds " in r.prometheus()
