#!/usr/bin/env python3
"""A scriptable stand-in for vLLM's ZmqEventPublisher (vLLM 0.33), for kvroute-zmq's tests.

Wire protocol, as vLLM speaks it (see testdata/vllm/zmq_wire.json):
  * live messages on a publisher socket: [topic, seq (8 bytes big-endian), payload],
    seq counting from 0;
  * a ROUTER replay socket: a request [identity, "", start_seq (8 bytes BE)] is answered
    with [identity, "", topic, seq, payload] for every buffered batch with seq >= start_seq,
    then the end marker [identity, "", "", 0xFFFFFFFFFFFFFFFF, ""];
  * a ring buffer of the last --buffer batches (vLLM's buffer_steps).
With --legacy-replay, replay replies omit the topic frame, as vLLM before 0.26-0.28 sent
them: [identity, "", seq, payload], ended by [identity, "", 0xFFFFFFFFFFFFFFFF, ""].

The publisher socket is an XPUB rather than vLLM's PUB. On the wire the two are the same
(XPUB is a PUB that also hands incoming subscriptions to the application). The XPUB lets
the `waitsub` command wait until the subscriber's subscription has arrived, so tests need
no sleeps to avoid ZeroMQ's "slow joiner" message loss.

Payloads are the real msgpack KVEventBatch payloads of kv_events.json, cycled:
payload(seq) = payloads[seq % n]. With --epoch E > 0 (a "restarted engine") the batch
timestamp (the float64 right after the 0x93 0xcb array and float headers) is replaced by
E * 1e6 + seq, so batches of different epochs differ like those of a real restarted engine.

Prints "PUB <endpoint>", "REPLAY <endpoint>", "READY", then reads commands from stdin, one
per line, and answers each with "OK <next seq>" (or "ERR <reason>"):
  pub N [DELAY_MS]   publish N batches (sleeping DELAY_MS between them)
  drop N             buffer N batches for replay without sending them (lost on the wire)
  lose N             skip N seqs: neither sent nor buffered (replay cannot fill them)
  clear              empty the replay buffer
  restart            in-process engine restart: seq back to 0, buffer emptied, epoch + 1
  replay on|off      answer replay requests or ignore them (to force a timeout)
  replay hold        queue replay requests without answering them
  replay release     wait (up to 10 s) for a queued request, then answer the queued ones
  raw HEX...         send one raw multipart message (frames as hex, "-" for an empty frame)
  waitsub            wait (up to 10 s) until a subscription has arrived
  quit               exit
"""

import argparse
import collections
import json
import os
import struct
import sys
import time

import msgpack
import zmq

END_SEQ = (2**64 - 1).to_bytes(8, "big")


def load_payloads(path):
    with open(path) as f:
        steps = json.load(f)["steps"]
    out = []
    for step in steps:
        batch = step.get("batch")
        if batch is None:
            continue
        payload = bytes.fromhex(batch["payload_hex"])
        decoded = msgpack.unpackb(payload, raw=False, strict_map_key=False)
        if not (isinstance(decoded, list) and len(decoded) == 3):
            raise SystemExit(f"payload is not a 3-element KVEventBatch: {decoded!r}")
        if payload[:2] != b"\x93\xcb":
            raise SystemExit("payload does not start with [float64 ts, ...]")
        out.append(payload)
    if not out:
        raise SystemExit(f"no payloads in {path}")
    return out


class Publisher:
    def __init__(self, args):
        self.payloads = load_payloads(args.payloads)
        self.topic = args.topic.encode()
        self.epoch = args.epoch
        self.seq = 0
        self.buffer = collections.deque(maxlen=args.buffer)
        self.answer_replay = True
        self.hold_replay = False
        self.held = []
        self.legacy_replay = args.legacy_replay
        self.subscriptions = 0
        self.ctx = zmq.Context()
        self.pub = self.ctx.socket(zmq.XPUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        # Deliver every subscription, also one equal to a subscription already seen.
        self.pub.setsockopt(zmq.XPUB_VERBOSE, 1)
        self.pub.setsockopt(zmq.SNDHWM, args.sndhwm)
        if args.sndbuf > 0:
            self.pub.setsockopt(zmq.SNDBUF, args.sndbuf)
        self.pub.bind(f"tcp://127.0.0.1:{args.pub_port}")
        self.replay = self.ctx.socket(zmq.ROUTER)
        self.replay.setsockopt(zmq.LINGER, 0)
        self.replay.bind(f"tcp://127.0.0.1:{args.replay_port}")
        self.poller = zmq.Poller()
        self.poller.register(self.pub, zmq.POLLIN)
        self.poller.register(self.replay, zmq.POLLIN)

    def payload(self, seq):
        p = self.payloads[seq % len(self.payloads)]
        if self.epoch == 0:
            return p
        ts = self.epoch * 1e6 + seq
        patched = p[:2] + struct.pack(">d", ts) + p[10:]
        assert msgpack.unpackb(patched, raw=False, strict_map_key=False)[0] == ts
        return patched

    def next_batch(self):
        seq = self.seq
        self.seq += 1
        payload = self.payload(seq)
        self.buffer.append((seq, payload))
        return seq, payload

    def service(self, timeout_ms=0):
        """Answers pending replay requests and reads subscriptions."""
        for sock, _ in self.poller.poll(timeout_ms):
            if sock is self.pub:
                while True:
                    try:
                        msg = self.pub.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    if msg[:1] == b"\x01":
                        self.subscriptions += 1
            elif sock is self.replay:
                while True:
                    try:
                        frames = self.replay.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    if self.hold_replay:
                        self.held.append(frames)
                    elif self.answer_replay:
                        self.answer(frames)

    def answer(self, frames):
        # Mirrors vLLM's ZmqEventPublisher._service_replay.
        if len(frames) != 3:
            return
        client_id, _, start_seq_bytes = frames
        start_seq = int.from_bytes(start_seq_bytes, "big")
        topic = () if self.legacy_replay else (self.topic,)
        for seq, buf in self.buffer:
            if seq >= start_seq:
                self.replay.send_multipart(
                    (client_id, b"", *topic, seq.to_bytes(8, "big"), buf)
                )
        end_topic = () if self.legacy_replay else (b"",)
        self.replay.send_multipart((client_id, b"", *end_topic, END_SEQ, b""))

    def command(self, line):
        parts = line.split()
        if not parts:
            return None
        cmd, rest = parts[0], parts[1:]
        if cmd == "pub":
            n = int(rest[0])
            delay = float(rest[1]) / 1000.0 if len(rest) > 1 else 0.0
            for _ in range(n):
                seq, payload = self.next_batch()
                try:
                    # Like vLLM: a full send queue drops the message (PUB semantics).
                    self.pub.send_multipart(
                        (self.topic, seq.to_bytes(8, "big"), payload), zmq.NOBLOCK
                    )
                except zmq.Again:
                    pass
                self.service(0)
                if delay:
                    time.sleep(delay)
        elif cmd == "drop":
            for _ in range(int(rest[0])):
                self.next_batch()
        elif cmd == "lose":
            self.seq += int(rest[0])
        elif cmd == "clear":
            self.buffer.clear()
        elif cmd == "restart":
            self.seq = 0
            self.buffer.clear()
            self.epoch += 1
        elif cmd == "replay" and rest[0] == "hold":
            self.hold_replay = True
        elif cmd == "replay" and rest[0] == "release":
            deadline = time.monotonic() + 10.0
            while not self.held and time.monotonic() < deadline:
                self.service(20)
            if not self.held:
                return "ERR no replay request within 10 s"
            self.hold_replay = False
            held, self.held = self.held, []
            for frames in held:
                self.answer(frames)
        elif cmd == "replay":
            self.answer_replay = rest[0] == "on"
        elif cmd == "raw":
            frames = [b"" if h == "-" else bytes.fromhex(h) for h in rest]
            self.pub.send_multipart(frames)
        elif cmd == "waitsub":
            deadline = time.monotonic() + 10.0
            while self.subscriptions == 0 and time.monotonic() < deadline:
                self.service(20)
            if self.subscriptions == 0:
                return "ERR no subscription within 10 s"
            self.subscriptions = 0
        elif cmd == "quit":
            return "BYE"
        else:
            return f"ERR unknown command {cmd!r}"
        return f"OK {self.seq}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--payloads", required=True, help="path to kv_events.json")
    ap.add_argument("--topic", default="kv-events")
    ap.add_argument("--pub-port", type=int, default=0)
    ap.add_argument("--replay-port", type=int, default=0)
    ap.add_argument("--buffer", type=int, default=100, help="replay ring buffer size")
    ap.add_argument("--sndhwm", type=int, default=1000)
    ap.add_argument("--sndbuf", type=int, default=0, help="kernel send buffer (0: default)")
    ap.add_argument("--epoch", type=int, default=0)
    ap.add_argument("--legacy-replay", action="store_true", help="replies without topic frame")
    args = ap.parse_args()

    p = Publisher(args)
    print("PUB", p.pub.getsockopt(zmq.LAST_ENDPOINT).decode(), flush=True)
    print("REPLAY", p.replay.getsockopt(zmq.LAST_ENDPOINT).decode(), flush=True)
    print("READY", flush=True)

    stdin = sys.stdin.fileno()
    outer = zmq.Poller()
    outer.register(p.pub, zmq.POLLIN)
    outer.register(p.replay, zmq.POLLIN)
    outer.register(stdin, zmq.POLLIN)
    pending = b""
    while True:
        ready = dict(outer.poll(1000))
        if stdin in ready:
            chunk = os.read(stdin, 65536)
            if not chunk:
                break  # the test went away
            pending += chunk
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                reply = p.command(line.decode())
                if reply is not None:
                    print(reply, flush=True)
                if reply == "BYE":
                    return
        p.service(0)


if __name__ == "__main__":
    main()
