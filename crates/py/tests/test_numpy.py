"""numpy integer arrays as token ids (read in one bulk copy)."""

import kvroute
import pytest
from conftest import require

np = require("numpy")


def test_numpy_dtypes_agree_with_lists():
    r = kvroute.Router({"hash_algo": "sha256"})
    toks = list(range(1000, 1100))
    want = r.block_keys(toks)
    for dtype in ["<u4", "<i4", "<i8", "<u8", ">u4", ">i8", "<u2", "i2"]:
        arr = np.array(toks, dtype=dtype)
        assert r.block_keys(arr) == want, dtype
    # A strided (non-contiguous) view.
    arr = np.array([t for t in toks for _ in (0, 1)], dtype=np.int64)[::2]
    assert r.block_keys(arr) == want
    assert kvroute.hash_blocks(np.array(toks, dtype=np.uint32)) == kvroute.hash_blocks(toks)


def test_numpy_bad_arrays():
    r = kvroute.Router({"workers": [{"name": "w"}]})
    with pytest.raises(kvroute.InvalidInputError):
        r.route(np.array([1, -2, 3], dtype=np.int64))
    with pytest.raises(kvroute.InvalidInputError):
        r.route(np.array([1, 2**33], dtype=np.uint64))
    with pytest.raises(kvroute.InvalidInputError):
        r.route(np.zeros((4, 4), dtype=np.uint32))
    with pytest.raises(TypeError):
        r.route(np.array([1.0, 2.0]))
    assert r.route(np.arange(64, dtype=np.uint32)).total_blocks == 4


def test_numpy_prompt_embeds_match_lists(block_vectors):
    import struct

    inputs = block_vectors["inputs"]["prompt_embeds"]
    pe = inputs["prompt_embeds"]
    dim = pe["dim"]
    rows = [list(struct.unpack("<%df" % dim, bytes.fromhex(h))) for h in pe["rows_hex"]]
    a = kvroute.hash_blocks(inputs["token_ids"], prompt_embeds=rows)
    b = kvroute.hash_blocks(inputs["token_ids"], prompt_embeds=np.array(rows, dtype=np.float32))
    assert a == b and len(a) == 2
