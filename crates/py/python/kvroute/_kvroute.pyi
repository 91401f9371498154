"""Type stubs of kvroute's native module (re-exported by ``kvroute``)."""

import sys
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union, final

if sys.version_info >= (3, 12):
    from collections.abc import Buffer as _Buffer
else:
    _Buffer = Union[bytes, bytearray, memoryview]

#: Token ids: a list, tuple, numpy integer array, integer buffer or iterable of ints.
Tokens = Union[Sequence[int], _Buffer, Iterable[int], Any]
#: Binary payloads: bytes, bytearray, memoryview or another buffer.
BytesLike = Union[bytes, bytearray, memoryview, _Buffer]

__version__: str

class KvrouteError(Exception):
    """The base of every kvroute error."""

    #: The stable numeric code of the error kind (the C ABI's code); 0 on the base class.
    code: int
    #: The short, stable name of the error kind (``"invalid_input"``, ...).
    kind: str

class ConfigError(KvrouteError, ValueError):
    """A configuration is invalid (code 1)."""

class InvalidInputError(KvrouteError, ValueError):
    """An argument is out of range or malformed, e.g. a negative token id (code 2)."""

class UnknownWorkerError(KvrouteError, LookupError):
    """The named worker is not known to the router (code 3)."""

class WorkerExistsError(KvrouteError):
    """A worker with this name and rank is already registered (code 4)."""

class BlockSizeMismatchError(KvrouteError):
    """An event's block size differs from the router's (code 5)."""

class DecodeError(KvrouteError, ValueError):
    """A payload could not be decoded (code 6)."""

class MissingSeedError(KvrouteError):
    """An xxhash scheme was selected without a hash seed (code 7)."""

class SnapshotError(KvrouteError, ValueError):
    """A snapshot is malformed, truncated or of an unsupported version (code 8)."""

class SequenceGapError(KvrouteError):
    """Sequence numbers of an event stream skipped ahead (code 9)."""

class HashMismatchError(KvrouteError):
    """The engine's block hashes disagree with the router's own (code 10)."""

class NoWorkersError(KvrouteError):
    """No worker is available to take the request (code 11)."""

class IoError(KvrouteError, OSError):
    """An I/O or transport error (code 12)."""

class InternalError(KvrouteError):
    """A bug inside kvroute (code 13)."""

@final
class Candidate:
    """One candidate worker of a decision, with each scorer's score."""

    @property
    def worker(self) -> str:
        """The worker's name."""
    @property
    def dp_rank(self) -> int:
        """The worker's data-parallel rank."""
    @property
    def matched_blocks(self) -> int:
        """Blocks of the prompt the worker holds (longest prefix)."""
    @property
    def matched_by_tier(self) -> Tuple[int, int, int]:
        """Matched blocks by best tier: (gpu, cpu, disk)."""
    @property
    def scores(self) -> Dict[str, float]:
        """Each scorer's score by scorer name."""
    @property
    def total(self) -> float:
        """The combined total score."""
    def to_dict(self) -> Dict[str, Any]:
        """The candidate as a plain dict."""

@final
class Decision:
    """The router's choice for one request; pass it to ``Router.on_routed``."""

    @property
    def request_id(self) -> int:
        """The id to pass to ``on_first_token`` and ``on_finished``."""
    @property
    def worker(self) -> str:
        """The chosen worker's name."""
    @property
    def dp_rank(self) -> int:
        """The chosen worker's data-parallel rank."""
    @property
    def matched_blocks(self) -> int:
        """Blocks of the prompt the chosen worker holds."""
    @property
    def total_blocks(self) -> int:
        """Full blocks in the prompt."""
    @property
    def prompt_tokens(self) -> int:
        """Tokens in the prompt."""
    @property
    def candidates(self) -> List[Candidate]:
        """Every candidate that passed the filters, with its scores."""
    def to_dict(self) -> Dict[str, Any]:
        """The decision as a plain dict (candidates as dicts)."""

@final
class Router:
    """A KV-cache-aware router; thread-safe, share one between threads.

    ``config`` is a ``RouterConfig`` as a dict or JSON string (the same as the C ABI and
    the CLI), or None for the defaults. Raises ``ConfigError`` on a bad configuration.
    """

    def __new__(cls, config: Union[Mapping[str, Any], str, None] = None) -> "Router": ...
    def route(
        self,
        tokens: Tokens,
        *,
        session: Optional[str] = None,
        lora: Optional[str] = None,
        cache_salt: Optional[str] = None,
        lora_path: Optional[str] = None,
        now_ms: Optional[int] = None,
    ) -> Decision:
        """Chooses a worker for the prompt ``tokens``.

        Raises ``InvalidInputError`` for negative ids or ids >= 2**32, ``TypeError`` for
        non-integer tokens, ``NoWorkersError`` when no worker can take the request.
        """
    def block_keys(
        self,
        tokens: Tokens,
        *,
        lora: Optional[str] = None,
        cache_salt: Optional[str] = None,
        lora_path: Optional[str] = None,
    ) -> List[int]:
        """The router's block keys of ``tokens`` (full blocks only)."""
    def apply_vllm_batch(self, worker: str, payload: BytesLike) -> Dict[str, int]:
        """Decodes and applies a vLLM ``KVEventBatch`` for ``worker``; returns the apply report.

        Raises ``DecodeError`` (malformed payload), ``UnknownWorkerError``,
        ``BlockSizeMismatchError`` or ``HashMismatchError``; a failed batch changes nothing.
        """
    def on_routed(self, decision: Decision) -> None:
        """The request of ``decision`` was sent to its worker."""
    def on_first_token(self, request_id: int) -> None:
        """The first token of the request came back (prefill done)."""
    def on_finished(self, request_id: int) -> None:
        """The request finished or failed."""
    def add_worker(self, worker: str, dp_rank: int = 0) -> None:
        """Registers a worker; ``WorkerExistsError`` if it is already registered."""
    def remove_worker(self, worker: str, dp_rank: int = 0) -> None:
        """Removes a worker; ``UnknownWorkerError`` if unknown."""
    def set_healthy(self, worker: str, healthy: bool = True, *, dp_rank: int = 0) -> None:
        """Marks a worker healthy or not."""
    def drain_worker(self, worker: str, draining: bool = True, *, dp_rank: int = 0) -> None:
        """Drains (or undrains) a worker."""
    def report_load(
        self,
        worker: str,
        *,
        waiting: Optional[int] = None,
        running: Optional[int] = None,
        kv_usage: Optional[float] = None,
        loras: Optional[Sequence[str]] = None,
        dp_rank: int = 0,
        now_ms: Optional[int] = None,
    ) -> None:
        """Pushes a load report for a worker (``kv_usage`` in 0..1), scraped at ``now_ms``
        (the routes' clock) if given."""
    def workers(self) -> List[Tuple[str, int]]:
        """The registered workers as (name, dp_rank)."""
    def inflight_requests(self) -> int:
        """Requests reported routed and not yet finished."""
    def index_stats(self) -> Dict[str, int]:
        """Index statistics."""
    def config(self) -> Dict[str, Any]:
        """The configuration with defaults filled in."""
    def snapshot(self) -> bytes:
        """Serializes the index, worker names and stream positions."""
    def restore(self, data: BytesLike) -> Dict[str, int]:
        """Restores a snapshot; returns its stream positions. ``SnapshotError`` if bad."""
    def metrics(self) -> Dict[str, Any]:
        """The router's metrics."""
    def prometheus(self) -> str:
        """The router's metrics in Prometheus text format."""

@final
class ZmqSubscriber:
    """Subscribes to vLLM KV-event publishers (ZeroMQ) and applies every batch to a Router.

    ``publishers``: endpoint strings or dicts with ``endpoint`` and optionally
    ``replay_endpoint``, ``topic`` (a prefix; default ``""``, every topic), ``worker``
    (default ``host:port``) and ``start_seq``. Runs on background threads that never take
    the GIL. A publisher connected ``idle_warning`` seconds without a batch is flagged
    ``idle`` in ``stats()``.
    Raises ``ConfigError`` for a bad configuration, ``IoError`` when ZeroMQ refuses it.
    """

    def __new__(
        cls,
        router: Router,
        publishers: Iterable[Union[str, Mapping[str, Any]]],
        *,
        replay_timeout: float = 2.0,
        rcvhwm: int = 10000,
        poll_interval: float = 0.05,
        reconnect_interval: float = 0.1,
        idle_warning: float = 10.0,
        max_pending: int = 100000,
    ) -> "ZmqSubscriber": ...
    def stats(self) -> List[Dict[str, Any]]:
        """Each publisher's counters (batches, last_seq, gaps, restarts, resets, idle, ...)."""
    @property
    def running(self) -> bool:
        """True until ``shutdown()``."""
    def shutdown(self) -> None:
        """Stops the threads and waits for them; idempotent."""
    def __enter__(self) -> "ZmqSubscriber": ...
    def __exit__(self, *args: Any) -> bool: ...

def hash_blocks(
    tokens: Tokens,
    algo: str = "sha256",
    block_size: int = 16,
    hash_seed: Optional[str] = None,
    lora_name: Optional[str] = None,
    lora_path: Optional[str] = None,
    cache_salt: Optional[str] = None,
    *,
    mm_features: Optional[Iterable[Union[Mapping[str, Any], Tuple[str, int, int]]]] = None,
    prompt_embeds: Optional[Any] = None,
    extra_keys_style: str = "v033",
) -> List[Dict[str, Any]]:
    """vLLM's block hashes of ``tokens``: one ``{"hash": hex, "event_hash": int}`` per full block.

    Raises ``ConfigError`` (unknown algorithm, bad block size), ``MissingSeedError``
    (xxhash family without ``hash_seed``), ``InvalidInputError`` (bad token ids).
    """

def decode_vllm_batch(payload: BytesLike) -> Dict[str, Any]:
    """Decodes a vLLM ``KVEventBatch`` msgpack payload (same JSON as ``kvroute events decode``).

    Raises ``DecodeError`` on a malformed payload.
    """


def simulate(
    *,
    workload: str = ...,
    workloads: List[str] = ...,
    workers: Optional[int] = ...,
    policies: Optional[List[str]] = ...,
    model: Optional[str] = ...,
    gpu: str = ...,
    capacity_blocks: Optional[int] = ...,
    block_size: int = ...,
    rate: float = ...,
    requests: Optional[int] = ...,
    seed: int = ...,
    event_delay: float = ...,
    router_replicas: int = ...,
) -> Any:
    """Runs the simulator behind ``kvroute simulate``.

    Returns what ``kvroute simulate --json`` writes: a dict ``{"workload", "config",
    "results": [...]}`` for one workload, a list of them for several. Raises
    ``ConfigError`` on unknown names or bad values and ``DecodeError`` on a malformed trace.
    """
    ...
