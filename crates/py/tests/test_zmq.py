"""ZmqSubscriber against a vLLM-style pyzmq publisher on loopback."""

import struct
import time

import kvroute
import pytest
from conftest import require, recorded_batches

zmq = require("zmq")


def wait_for(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return False


class Publisher:
    """vLLM's ZmqEventPublisher wire format: [topic, seq (8 bytes BE), payload] on PUB."""

    def __init__(self):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.PUB)
        port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"

    def send(self, seq, payload, topic=b"kv-events"):
        self.sock.send_multipart([topic, struct.pack(">Q", seq), payload])

    def close(self):
        self.sock.close(linger=0)
        self.ctx.term()


@pytest.fixture
def publisher():
    p = Publisher()
    yield p
    p.close()


def two_pods():
    return kvroute.Router({"hash_algo": "sha256", "profile": "prefix", "workers": [{"name": "pod-a"}, {"name": "pod-b"}]})


def connect(sub, pub, clear_payload):
    """Sends harmless AllBlocksCleared batches with rising seqs until one arrives (the
    PUB/SUB slow-joiner); returns the next seq to use."""
    seq = 0
    for _ in range(500):
        pub.send(seq, clear_payload)
        seq += 1
        if sub.stats()[0]["batches"] > 0:
            return seq
        time.sleep(0.01)
    raise AssertionError("the subscriber never received a batch")


def test_subscriber_feeds_the_router(publisher, kv_events):
    r = two_pods()
    batches = recorded_batches(kv_events)
    clear = next(p for s, p, _ in batches if s.startswith("reset_prefix_cache"))
    r1, r2 = batches[0][1], batches[1][1]
    with kvroute.ZmqSubscriber(r, [{"endpoint": publisher.endpoint, "worker": "pod-a"}], poll_interval=0.01) as sub:
        assert sub.running
        seq = connect(sub, publisher, clear)
        publisher.send(seq, r1)
        assert wait_for(lambda: sub.stats()[0]["last_seq"] == seq)
        d = r.route(list(range(100)))
        assert (d.worker, d.matched_blocks) == ("pod-a", 6)
        st = sub.stats()[0]
        assert st["worker"] == "pod-a" and st["endpoint"] == publisher.endpoint
        assert st["sink_errors"] == 0 and st["resets"] == 0
        # The stream position goes into snapshots.
        fresh = two_pods()
        assert fresh.restore(r.snapshot()) == {"pod-a": seq}

        # The engine restarts: its seq goes backwards. The router drops pod-a's entries
        # before applying the new stream's r2, so tokens 0..99 match nothing (without the
        # reset, r2 would have left 4 of r1's 6 blocks).
        publisher.send(0, r2)
        assert wait_for(lambda: sub.stats()[0]["last_seq"] == 0)
        st = sub.stats()[0]
        assert st["restarts"] == 1 and st["resets"] == 1
        assert r.route(list(range(100))).matched_blocks == 0
        # A malformed payload is counted and changes nothing.
        publisher.send(1, b"\xc1garbage")
        assert wait_for(lambda: sub.stats()[0]["sink_errors"] == 1)
        assert r.route(list(range(100))).matched_blocks == 0
    assert not sub.running and sub.stats() == []
    sub.shutdown()  # idempotent


def test_reference_without_reset(kv_events):
    # The claim above: r1 then r2 without a reset leaves 4 matched blocks.
    r = two_pods()
    batches = recorded_batches(kv_events)
    r.apply_vllm_batch("pod-a", batches[0][1])
    r.apply_vllm_batch("pod-a", batches[1][1])
    assert r.route(list(range(100))).matched_blocks == 4


def test_bad_subscriber_configs():
    r = two_pods()
    with pytest.raises(kvroute.ConfigError):
        kvroute.ZmqSubscriber(r, [])
    with pytest.raises(kvroute.ConfigError):
        kvroute.ZmqSubscriber(r, ["udp://127.0.0.1:1"])
    with pytest.raises(kvroute.ConfigError):
        kvroute.ZmqSubscriber(r, [{"endpoint": "tcp://127.0.0.1:1", "worker": "x"}, {"endpoint": "tcp://127.0.0.1:2", "worker": "x"}])
    with pytest.raises(kvroute.InvalidInputError):
        kvroute.ZmqSubscriber(r, [{"endpoint": "tcp://127.0.0.1:1", "bogus": 1}])
    with pytest.raises(kvroute.InvalidInputError):
        kvroute.ZmqSubscriber(r, ["tcp://127.0.0.1:1"], replay_timeout=-1)
    with pytest.raises(TypeError):
        kvroute.ZmqSubscriber(r, [42])
    with pytest.raises(TypeError):
        kvroute.ZmqSubscriber("not a router", ["tcp://127.0.0.1:1"])


def test_default_topic_receives_llm_d_topics(publisher, kv_events):
    # llm-d publishes on kv@<pod-ip>:<port>@<model>; the default topic ("") receives it.
    r = two_pods()
    batches = recorded_batches(kv_events)
    clear = next(p for s, p, _ in batches if s.startswith("reset_prefix_cache"))
    topic = b"kv@10.0.0.7:8000@Qwen/Qwen3-0.6B"
    with kvroute.ZmqSubscriber(r, [{"endpoint": publisher.endpoint, "worker": "pod-a"}], poll_interval=0.01) as sub:
        seq = 0
        for _ in range(500):
            publisher.send(seq, clear, topic=topic)
            seq += 1
            if sub.stats()[0]["batches"] > 0:
                break
            time.sleep(0.01)
        publisher.send(seq, batches[0][1], topic=topic)
        assert wait_for(lambda: sub.stats()[0]["last_seq"] == seq)
        assert r.route(list(range(100))).matched_blocks == 6
        st = sub.stats()[0]
        assert st["foreign_topic"] == 0 and st["idle"] is False


def test_stats_are_the_rust_serialization_and_flag_idle_publishers(publisher):
    r = two_pods()
    cfg = [{"endpoint": publisher.endpoint, "worker": "pod-a", "topic": "kv-events"}]
    with kvroute.ZmqSubscriber(r, cfg, poll_interval=0.01, idle_warning=0.3) as sub:
        assert wait_for(lambda: sub.stats()[0]["idle"])
        st = sub.stats()[0]
        assert set(st) == {
            "worker", "endpoint", "connected", "batches", "last_seq", "gaps", "replays_ok",
            "replays_failed", "restarts", "resets", "sink_errors", "last_error", "frame_errors",
            "foreign_topic", "duplicates", "reconnects", "last_batch_at", "connected_at", "idle",
        }
        assert st["connected"] and st["batches"] == 0 and st["last_error"] is None
        assert abs(st["connected_at"] - time.time()) < 60
    with pytest.raises(kvroute.ConfigError):
        kvroute.ZmqSubscriber(r, cfg, idle_warning=0.0)
