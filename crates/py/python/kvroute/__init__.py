"""kvroute: KV-cache-aware request routing for LLM serving.

Routes each request to the vLLM replica whose GPU KV cache already holds the longest
prefix of its prompt, using vLLM's own block hashes (``sha256``, ``sha256_cbor``,
``xxhash``, ``xxhash_cbor``) or kvroute's fast native ``xxh3`` keys, the replicas' KV
events, and their load.

Example::

    import kvroute

    router = kvroute.Router({"hash_algo": "sha256", "workers": [{"name": "pod-a"}, {"name": "pod-b"}]})
    router.apply_vllm_batch("pod-a", payload)      # a KVEventBatch from pod-a's ZeroMQ stream,
    # or let kvroute subscribe itself:
    # sub = kvroute.ZmqSubscriber(router, [{"endpoint": "tcp://10.0.0.7:5557", "worker": "pod-a"}])
    decision = router.route(token_ids)
    router.on_routed(decision)                       # the request was sent to decision.worker
    ...
    router.on_finished(decision.request_id)

Everything here is implemented in the native module ``kvroute._kvroute`` (Rust); this
package only re-exports it. Errors are subclasses of :class:`KvrouteError` with a stable
``.code``.
"""

from kvroute._kvroute import (
    BlockSizeMismatchError,
    Candidate,
    ConfigError,
    DecodeError,
    Decision,
    HashMismatchError,
    InternalError,
    InvalidInputError,
    IoError,
    KvrouteError,
    MissingSeedError,
    NoWorkersError,
    Router,
    SequenceGapError,
    SnapshotError,
    UnknownWorkerError,
    WorkerExistsError,
    ZmqSubscriber,
    __version__,
    decode_vllm_batch,
    hash_blocks,
    simulate,
)

__all__ = [
    "Router",
    "Decision",
    "Candidate",
    "ZmqSubscriber",
    "hash_blocks",
    "decode_vllm_batch",
    "simulate",
    "KvrouteError",
    "ConfigError",
    "InvalidInputError",
    "UnknownWorkerError",
    "WorkerExistsError",
    "BlockSizeMismatchError",
    "DecodeError",
    "MissingSeedError",
    "SnapshotError",
    "SequenceGapError",
    "HashMismatchError",
    "NoWorkersError",
    "IoError",
    "InternalError",
    "__version__",
]
