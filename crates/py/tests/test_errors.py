"""Bad input raises the documented exception and leaves the router usable."""

import kvroute
import pytest
from conftest import recorded_batches

KINDS = {
    "ConfigError": (1, "config"),
    "InvalidInputError": (2, "invalid_input"),
    "UnknownWorkerError": (3, "unknown_worker"),
    "WorkerExistsError": (4, "worker_exists"),
    "BlockSizeMismatchError": (5, "block_size_mismatch"),
    "DecodeError": (6, "decode"),
    "MissingSeedError": (7, "missing_seed"),
    "SnapshotError": (8, "snapshot"),
    "SequenceGapError": (9, "sequence_gap"),
    "HashMismatchError": (10, "hash_mismatch"),
    "NoWorkersError": (11, "no_workers"),
    "IoError": (12, "io"),
    "InternalError": (13, "internal"),
}


def test_hierarchy_and_codes():
    assert issubclass(kvroute.KvrouteError, Exception)
    for name, (code, kind) in KINDS.items():
        cls = getattr(kvroute, name)
        assert issubclass(cls, kvroute.KvrouteError), name
        assert (cls.code, cls.kind) == (code, kind), name
        assert cls.__module__ == "kvroute" and cls.__doc__, name
    assert issubclass(kvroute.InvalidInputError, ValueError)
    assert issubclass(kvroute.UnknownWorkerError, LookupError)


@pytest.fixture
def router(kv_events):
    r = kvroute.Router({"hash_algo": "sha256", "workers": [{"name": "pod-a"}, {"name": "pod-b"}]})
    step, payload, _ = recorded_batches(kv_events)[0]
    assert step.startswith("r1 ")
    r.apply_vllm_batch("pod-a", payload)
    return r


def still_usable(r):
    """The state after the fixture's r1 batch is intact."""
    d = r.route(list(range(100)))
    assert (d.worker, d.matched_blocks) == ("pod-a", 6)


@pytest.mark.parametrize("tokens", [[1, -1, 2], (5, -7), [2**32], [0, 2**40], [2**70]])
def test_out_of_range_token_ids(router, tokens):
    with pytest.raises(kvroute.InvalidInputError) as e:
        router.route(tokens)
    assert e.value.code == 2 and isinstance(e.value, ValueError)
    with pytest.raises(kvroute.InvalidInputError):
        kvroute.hash_blocks(tokens)
    still_usable(router)


@pytest.mark.parametrize("tokens", ["0123", [1, "2"], [1.5], 42, None, [[1, 2]], object()])
def test_wrong_token_types(router, tokens):
    with pytest.raises(TypeError):
        router.route(tokens)
    still_usable(router)


def test_malformed_payloads(router, kv_events):
    _, payload, _ = recorded_batches(kv_events)[1]
    for bad in [b"", b"\xc1\xc2\xc3", payload[:-4], b"\x93\xcb" + b"\x00" * 8 + b"\xc0"]:
        with pytest.raises(kvroute.DecodeError) as e:
            router.apply_vllm_batch("pod-a", bad)
        assert e.value.code == 6
        with pytest.raises(kvroute.DecodeError):
            kvroute.decode_vllm_batch(bad)
    with pytest.raises(TypeError):
        router.apply_vllm_batch("pod-a", "not bytes")
    with pytest.raises(TypeError):
        kvroute.decode_vllm_batch(12)
    still_usable(router)


def test_unknown_and_duplicate_workers(router, kv_events):
    _, payload, _ = recorded_batches(kv_events)[0]
    with pytest.raises(kvroute.UnknownWorkerError) as e:
        router.apply_vllm_batch("pod-z", payload)
    assert e.value.code == 3 and "pod-z" in str(e.value)
    for call in (
        lambda: router.remove_worker("pod-z"),
        lambda: router.set_healthy("pod-z", False),
        lambda: router.drain_worker("pod-z"),
        lambda: router.report_load("pod-z", waiting=1),
        lambda: router.add_worker("pod-a", 1) or router.remove_worker("pod-a", 2),
    ):
        with pytest.raises(kvroute.UnknownWorkerError):
            call()
    with pytest.raises(kvroute.WorkerExistsError) as e:
        router.add_worker("pod-a")
    assert e.value.code == 4
    with pytest.raises(kvroute.InvalidInputError):
        router.add_worker("")
    still_usable(router)


def test_bad_config():
    for cfg in ['{"block_size": 0}', {"hash_algo": "md5"}, {"no_such_field": 1}, "not json"]:
        with pytest.raises(kvroute.ConfigError) as e:
            kvroute.Router(cfg)
        assert e.value.code == 1
    with pytest.raises(TypeError):
        kvroute.Router(42)
    with pytest.raises(kvroute.MissingSeedError):
        kvroute.Router({"hash_algo": "xxhash"})
    with pytest.raises(kvroute.MissingSeedError):
        kvroute.hash_blocks(list(range(32)), algo="xxhash")
    with pytest.raises(kvroute.ConfigError):
        kvroute.hash_blocks(list(range(32)), algo="md5")


def test_lifecycle_errors(router):
    with pytest.raises(kvroute.InvalidInputError):
        router.on_finished(12345)
    d = router.route(list(range(100)))
    router.on_routed(d)
    with pytest.raises(kvroute.InvalidInputError):
        router.on_routed(d)
    router.on_finished(d.request_id)
    with pytest.raises(kvroute.InvalidInputError):
        router.on_finished(d.request_id)
    with pytest.raises(TypeError):
        router.on_routed({"worker": "pod-a"})
    with pytest.raises(kvroute.InvalidInputError):
        router.report_load("pod-a", kv_usage=1.5)
    still_usable(router)


def test_no_workers_and_bad_snapshot(router):
    empty = kvroute.Router()
    with pytest.raises(kvroute.NoWorkersError) as e:
        empty.route([1, 2, 3])
    assert e.value.code == 11
    for bad in [b"", b"garbage", router.snapshot()[:-3]]:
        with pytest.raises(kvroute.SnapshotError):
            router.restore(bad)
    still_usable(router)


def test_block_size_mismatch(kv_events):
    r = kvroute.Router({"block_size": 32, "workers": [{"name": "pod-a"}]})
    _, payload, _ = recorded_batches(kv_events)[0]
    with pytest.raises(kvroute.BlockSizeMismatchError) as e:
        r.apply_vllm_batch("pod-a", payload)
    assert e.value.code == 5
    assert r.index_stats()["holder_blocks"] == 0
