"""Many threads route while one applies events; the shared Router stays consistent."""

import threading

import kvroute
from conftest import recorded_batches


def test_hammer_from_many_threads(kv_events):
    r = kvroute.Router(
        {"hash_algo": "sha256", "profile": "prefix", "workers": [{"name": "pod-a"}, {"name": "pod-b"}]}
    )
    batches = recorded_batches(kv_events)
    r1 = batches[0][1]
    r.apply_vllm_batch("pod-a", r1)
    errors = []
    stop = threading.Event()
    counts = {}

    def router_thread(i):
        n = 0
        try:
            while not stop.is_set() or n < 200:
                d = r.route(list(range(100)), session=f"s{i % 3}")
                assert d.worker in ("pod-a", "pod-b")
                assert 0 <= d.matched_blocks <= d.total_blocks == 6
                r.on_routed(d)
                r.on_finished(d.request_id)
                n += 1
                if n >= 2000:
                    break
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)
        counts[i] = n

    def event_thread():
        try:
            for _ in range(30):
                for _, payload, _ in batches:
                    r.apply_vllm_batch("pod-a", payload)
                r.apply_vllm_batch("pod-a", r1)
        except Exception as e:  # noqa: BLE001
            errors.append(e)
        finally:
            stop.set()

    threads = [threading.Thread(target=router_thread, args=(i,)) for i in range(8)]
    threads.append(threading.Thread(target=event_thread))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    assert sum(counts.values()) >= 8 * 200
    assert r.inflight_requests() == 0
    # After the event thread's last batch (r1 again, after the full sequence), the state
    # equals a fresh router fed the same sequence once.
    ref = kvroute.Router({"hash_algo": "sha256", "profile": "prefix", "workers": [{"name": "pod-a"}, {"name": "pod-b"}]})
    ref.apply_vllm_batch("pod-a", r1)
    for _, payload, _ in batches:
        ref.apply_vllm_batch("pod-a", payload)
    ref.apply_vllm_batch("pod-a", r1)
    assert r.index_stats()["holder_blocks"] == ref.index_stats()["holder_blocks"]
    assert r.route(list(range(100))).matched_blocks == ref.route(list(range(100))).matched_blocks
    assert r.metrics()["routes"] == sum(counts.values()) + 1


def test_hash_blocks_in_threads():
    toks = list(range(20000))
    want = kvroute.hash_blocks(toks)
    results = [None] * 6

    def work(i):
        results[i] = kvroute.hash_blocks(toks)

    ts = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert all(res == want for res in results)
    assert len(want) == 20000 // 16
