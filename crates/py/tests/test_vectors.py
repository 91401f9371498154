"""vLLM's own test vectors through the Python API."""

import struct

import kvroute
import pytest
from conftest import all_batches, load, recorded_batches


def case_kwargs(inputs):
    """hash_blocks keyword arguments for one input case of block_hashes.json."""
    kw = {}
    lora = inputs.get("lora")
    if lora:
        kw["lora_name"] = lora["lora_name"]
        kw["lora_path"] = lora["lora_path"]
    if inputs.get("cache_salt") is not None:
        kw["cache_salt"] = inputs["cache_salt"]
    if inputs.get("mm_features"):
        kw["mm_features"] = inputs["mm_features"]
    pe = inputs.get("prompt_embeds")
    if pe:
        dim = pe["dim"]
        rows = []
        for hx in pe["rows_hex"]:
            raw = bytes.fromhex(hx)
            rows.append(list(struct.unpack("<%df" % dim, raw)))
        kw["prompt_embeds"] = rows
    return kw


@pytest.mark.parametrize(
    "file,style", [("block_hashes.json", "v033"), ("block_hashes_legacy_v0.30.json", "v030")]
)
def test_every_block_hash_vector(file, style):
    doc = load(file)
    assert len(doc["vectors"]) > 10
    for v in doc["vectors"]:
        inputs = doc["inputs"][v["case"]]
        got = kvroute.hash_blocks(
            inputs["token_ids"],
            algo=v["algo"],
            block_size=doc["hash_block_size"],
            hash_seed=v["PYTHONHASHSEED"],
            extra_keys_style=style,
            **case_kwargs(inputs),
        )
        want = v["blocks"]
        label = (v["algo"], v["PYTHONHASHSEED"], v["case"])
        assert len(got) == len(want) == v["num_full_blocks"], label
        for g, w in zip(got, want):
            assert g["hash"] == w["hash_hex"], label
            assert g["event_hash"] == w["event_hash_u64"], label


def bytes_as_hex(x):
    """The vectors' typed-JSON decode with {"bytes_hex": h} written as plain hex strings."""
    if isinstance(x, dict):
        if set(x) == {"bytes_hex"}:
            return x["bytes_hex"]
        return {k: bytes_as_hex(v) for k, v in x.items()}
    if isinstance(x, list):
        return [bytes_as_hex(v) for v in x]
    return x


def test_decode_matches_the_generic_msgpack_decode(kv_events):
    batches = all_batches(kv_events)
    assert len(batches) >= 8
    for step, payload, decoded in batches:
        got = kvroute.decode_vllm_batch(payload)
        want = bytes_as_hex(decoded)
        assert got["ts"] == want[0], step
        assert got["dp_rank"] == want[2], step
        assert len(got["events"]) == len(want[1]), step
        for g, w in zip(got["events"], want[1]):
            # Every field vLLM sent is there with the same value; the rest are None.
            for k, v in w.items():
                assert g[k] == v, (step, k)
            for k in set(g) - set(w):
                assert g[k] is None, (step, k)
        # bytearray and memoryview payloads decode the same.
        assert kvroute.decode_vllm_batch(bytearray(payload)) == got
        assert kvroute.decode_vllm_batch(memoryview(payload)) == got


def test_apply_then_route_tokens_0_to_99(kv_events):
    r = kvroute.Router(
        {"hash_algo": "sha256", "profile": "prefix", "workers": [{"name": "pod-a"}, {"name": "pod-b"}]}
    )
    inputs = kv_events["inputs"]
    checked = set()
    for step, payload, decoded in recorded_batches(kv_events):
        report = r.apply_vllm_batch("pod-a", payload)
        assert report["events"] == len(decoded[1]), step
        if step.startswith("r1 "):
            d = r.route(list(range(100)))
            assert (d.worker, d.dp_rank) == ("pod-a", 0)
            assert (d.matched_blocks, d.total_blocks, d.prompt_tokens) == (6, 6, 100)
            by_worker = {c.worker: c for c in d.candidates}
            assert by_worker["pod-a"].matched_blocks == 6
            assert by_worker["pod-b"].matched_blocks == 0
            assert "prefix" in by_worker["pod-a"].scores
            assert by_worker["pod-a"].total > by_worker["pod-b"].total
            # A different salt names different blocks: nothing matches.
            assert r.route(list(range(100)), cache_salt="other").matched_blocks == 0
            checked.add("r1")
        if step.startswith("r4 "):
            # r4 stored tokens 0..47 under vLLM's LoRA + cache_salt extra keys.
            lora = inputs["lora"]
            toks = list(range(48))
            d = r.route(
                toks,
                lora=lora["lora_name"],
                lora_path=lora["lora_path"],
                cache_salt=inputs["cache_salt"],
            )
            assert (d.worker, d.matched_blocks) == ("pod-a", 3)
            # Without the salt (or with another) the same tokens are other blocks.
            assert r.route(toks, lora=lora["lora_name"], lora_path=lora["lora_path"]).matched_blocks == 0
            assert (
                r.route(toks, lora=lora["lora_name"], lora_path=lora["lora_path"], cache_salt="b").matched_blocks
                == 0
            )
            checked.add("r4")
    assert checked == {"r1", "r4"}
    m = r.metrics()
    assert m["routes"] >= 5


def test_router_block_keys_are_vllm_event_hashes(block_vectors):
    # In a vLLM scheme the router keys blocks by the event hash vLLM sends.
    r = kvroute.Router({"hash_algo": "sha256"})
    for v in block_vectors["vectors"]:
        if v["algo"] != "sha256" or v["PYTHONHASHSEED"] is not None:
            continue
        if v["case"] not in ("plain_0_99", "cache_salt", "plain_random_1000"):
            continue
        inputs = block_vectors["inputs"][v["case"]]
        keys = r.block_keys(inputs["token_ids"], cache_salt=inputs.get("cache_salt"))
        assert keys == [b["event_hash_u64"] for b in v["blocks"]], v["case"]
