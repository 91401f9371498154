"""Writes xxh3_keys.json: reference keys of kvroute's native `xxh3` block-key chain.

An implementation independent of the Rust code, from the formula in
crates/core/src/hash/native.rs, with the `xxhash` and `cbor2` packages:

    h_i   = XXH3-64(little-endian u32 bytes of block i's tokens, seed = native_seed)
    h_i   = XXH3-64(cbor2.dumps(extra_keys_i, canonical=True), seed = h_i)   if any
    m     = (h_i ^ key_{i-1}) * 0x9E3779B97F4A7C15          (64x64 -> 128 bits)
    key_i = low64(m) ^ high64(m)                             key_{-1} = parent or root
    root  = splitmix64(native_seed ^ 0x006b76726f757465)    ("kvroute")

Run once to (re)generate; the file is committed and kvroute's tests compare against it.
Regenerating with different output means the chain changed, which invalidates every
snapshot taken in xxh3 mode: see README.md.

    python3 -m venv /tmp/v && /tmp/v/bin/pip install xxhash cbor2
    /tmp/v/bin/python testdata/native/generate.py
"""

import json
import os
import re
import struct

import cbor2
import xxhash

M64 = (1 << 64) - 1
MUL = 0x9E3779B97F4A7C15
ROOT_DOMAIN = 0x006B76726F757465


def splitmix64(x):
    z = (x + 0x9E3779B97F4A7C15) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def root(seed):
    return splitmix64(seed ^ ROOT_DOMAIN)


def to_py(k):
    """JSON form of an extra key -> the Python value vLLM would hash."""
    if isinstance(k, str) or isinstance(k, int):
        return k
    if isinstance(k, dict):
        return bytes.fromhex(k["bytes_hex"])
    if isinstance(k, list):
        return tuple(to_py(x) for x in k)
    raise TypeError(k)


def chain(seed, block_size, parent, tokens, extra_keys):
    key = root(seed) if parent is None else parent
    out = []
    for i in range(len(tokens) // block_size):
        block = tokens[i * block_size:(i + 1) * block_size]
        h = xxhash.xxh3_64_intdigest(struct.pack("<%dI" % len(block), *block), seed=seed)
        e = extra_keys[i] if i < len(extra_keys) else None
        if e is not None:
            h = xxhash.xxh3_64_intdigest(
                cbor2.dumps(tuple(to_py(x) for x in e), canonical=True), seed=h)
        m = (h ^ key) * MUL
        key = (m & M64) ^ (m >> 64)
        out.append(key)
    return out


def hx(v):
    return "0x%016x" % v


def case(name, seed, block_size, tokens, parent=None, extra_keys=(), request_extras=None):
    keys = chain(seed, block_size, parent, tokens, list(extra_keys))
    c = {
        "name": name,
        "native_seed": seed,
        "block_size": block_size,
        "parent": None if parent is None else hx(parent),
        "tokens": tokens,
        "extra_keys": list(extra_keys),
        "keys": [hx(k) for k in keys],
    }
    if request_extras is not None:
        c["request_extras"] = request_extras
    return c, keys


def main():
    cases = []
    seq = list(range(64))
    c, plain = case("four blocks from the root", 0, 16, seq)
    cases.append(c)
    cases.append(case("continuing from block 1's key over blocks 2 and 3", 0, 16, seq[32:],
                      parent=plain[1])[0])
    cases.append(case("an arbitrary parent", 7, 16, seq[:32], parent=0x0123456789ABCDEF)[0])
    cases.append(case("seeded, large token ids", 0xDEADBEEF, 16,
                      [151935, 0, 1, 2**31 - 1, 2**32 - 1, 128000, 42, 7] * 6)[0])
    cases.append(case("block size 4, a partial last block is not keyed", 0, 4,
                      list(range(1, 11)))[0])
    cases.append(case("no full block", 0, 16, list(range(15)))[0])
    cases.append(case("event-form extra keys", 0, 16, list(range(100, 148)), extra_keys=[
        ["my-lora"],
        None,
        ["my-lora", ["img-hash", 3], {"bytes_hex": "00ff10"}, -7],
    ])[0])
    # A request's extras in vLLM <= 0.30 event form (what kvroute's native chain hashes):
    # the bare LoRA name on every block, (identifier, offset in block) for each multimodal
    # item a block overlaps, the bare salt on block 0 only.
    cases.append(case("request extras: LoRA, salt, one image", 3, 16, list(range(200, 248)),
                      extra_keys=[
                          ["sql-lora", "tenant-42"],
                          ["sql-lora", ["abc", 4]],
                          ["sql-lora"],
                      ], request_extras={
                          "lora": {"name": "sql-lora", "path": "/adapters/sql"},
                          "cache_salt": "tenant-42",
                          "mm": [{"identifier": "abc", "offset": 20, "length": 8}],
                      })[0])
    doc = {
        "description": "Reference keys of kvroute's native xxh3 block-key chain; see README.md.",
        "generator": "testdata/native/generate.py (xxhash %s, cbor2)" % xxhash.XXHASH_VERSION,
        "roots": {str(s): hx(root(s)) for s in [0, 3, 7, 0xDEADBEEF]},
        "cases": cases,
    }
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "xxh3_keys.json")
    text = json.dumps(doc, indent=1)
    # One line per list of scalars (token ids, keys, extra keys), for readability.
    text = re.sub(r"\[[^\[\]{}]*\]", lambda m: re.sub(r"\s*\n\s*", " ", m.group(0))
                  .replace("[ ", "[").replace(" ]", "]"), text)
    with open(path, "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
