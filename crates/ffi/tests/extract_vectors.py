#!/usr/bin/env python3
"""Turns testdata/vllm/kv_events.json into a line format the C tests read.

Lines:
  P <step> <held> <payload hex>   recorded vLLM 0.33 batches, in order; <held> is the number
                                  of distinct blocks the worker holds after the batch, by a
                                  reference model of the decoded events
  H <u64> <u64> ...                            the engine's block hashes of step r1's
                                               BlockStored event (tokens 0..99, sha256)
The hand-crafted batches at the end (made-up hashes) are left out, as in the Rust tests.
"""
import json
import sys

src, dst = sys.argv[1], sys.argv[2]
with open(src) as f:
    doc = json.load(f)


def key(h):
    # vLLM's bytes mode: the router keys the block by the digest's last 8 bytes.
    if isinstance(h, dict):
        return int(h["bytes_hex"][-16:], 16)
    return h


held = {}


def apply(events):
    for ev in events:
        if ev["type"] == "BlockStored":
            for h in ev["block_hashes"]:
                held[key(h)] = held.get(key(h), 0) + 1
        elif ev["type"] == "BlockRemoved":
            for h in ev["block_hashes"]:
                if key(h) in held:
                    held[key(h)] -= 1
                    if held[key(h)] == 0:
                        del held[key(h)]
        elif ev["type"] == "AllBlocksCleared":
            held.clear()
        else:
            raise SystemExit(f"unexpected event {ev['type']}")


out = []
r1_hashes = None
for step in doc["steps"]:
    batch = step["batch"]
    if batch is None or step["step"].startswith("handcrafted"):
        continue
    name = step["step"].split()[0]
    apply(batch["decoded"][1])
    out.append(f"P {name} {len(held)} {batch['payload_hex']}")
    if r1_hashes is None and step["step"].startswith("r1 "):
        ev = batch["decoded"][1][0]
        assert ev["type"] == "BlockStored"
        r1_hashes = ev["block_hashes"]
assert r1_hashes, "no r1 step in the vectors"
out.append("H " + " ".join(str(h) for h in r1_hashes))
with open(dst, "w") as f:
    f.write("\n".join(out) + "\n")
