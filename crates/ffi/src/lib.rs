//! The C ABI of kvroute (`libkvroute.a`, `libkvroute.so`, header `include/kvroute.h`).
//!
//! Conventions, in the style of rustls-ffi:
//!
//! - Names are `kvroute_<type>_<verb>`; handles (`kvroute_router`, `kvroute_decision`)
//!   are opaque and created and freed by kvroute.
//! - Fallible functions return a [`kvroute_result`] whose numbers never change meaning:
//!   `0` is success, `1..=13` are exactly `kvroute::Error::code()`, `100..` are errors of the
//!   boundary itself (NULL pointer, invalid UTF-8, buffer too small, panic).
//! - Outputs are written only on success. The one exception: on
//!   `KVROUTE_RESULT_BUFFER_TOO_SMALL` the length out-parameter receives the size needed.
//! - A failing call stores a message in a thread-local slot that
//!   [`kvroute_last_error_message`] copies out; a successful call clears it.
//! - Every export runs through [`boundary`], which catches panics and checks pointers.
//!
//! Threading: `kvroute_router` is thread-safe. Every function that takes a
//! `const kvroute_router *` may be called from many threads at once on the same router.
//! `kvroute_router_free` must be called exactly once, after every other call on that router
//! has returned. A `kvroute_decision` is immutable: its accessors may be called from many
//! threads; `kvroute_decision_free` must not race with them.

#![allow(non_camel_case_types)]

mod boundary;
#[cfg(test)]
mod header_test;

use boundary::{
    check_out, copy_str_out, free_bytes, free_c_string, free_handle, guard, guard_void, into_bytes,
    into_handle, opt_str, owned_c_string, try_ref, try_slice, try_slice_mut, try_str, write_out,
    FfiError,
};
use kvroute_core::hash::RequestExtras;
use kvroute_core::router::{ApplyReport, Decision, LoadReport, Request, Router};
use kvroute_core::Error;
use std::ffi::{c_char, CString};

/// Major version of the library (matches `Cargo.toml`).
pub const KVROUTE_VERSION_MAJOR: u32 = 0;
/// Minor version of the library.
pub const KVROUTE_VERSION_MINOR: u32 = 1;
/// Patch version of the library.
pub const KVROUTE_VERSION_PATCH: u32 = 0;
/// Bytes of [`kvroute_decision_info::worker`], the NUL included.
pub const KVROUTE_WORKER_NAME_CAPACITY: usize = 256;

/// Result codes. These numbers never change meaning; new codes get new numbers.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum kvroute_result {
    /// Success.
    Ok = 0,
    /// Invalid configuration (`kvroute::Error::Config`).
    Config = 1,
    /// An argument is out of range or malformed.
    InvalidInput = 2,
    /// The named worker is not known.
    UnknownWorker = 3,
    /// A worker with this name and rank already exists.
    WorkerExists = 4,
    /// An event's block size differs from the router's.
    BlockSizeMismatch = 5,
    /// A payload could not be decoded.
    Decode = 6,
    /// The xxhash family was selected without a hash seed.
    MissingSeed = 7,
    /// A snapshot is malformed, truncated or of an unsupported version.
    Snapshot = 8,
    /// An event stream skipped sequence numbers. Not returned by this API (the numbers are
    /// shared with `kvroute::Error::code()`).
    SequenceGap = 9,
    /// The engine's block hashes disagree with the router's.
    HashMismatch = 10,
    /// No worker is available for the request.
    NoWorkers = 11,
    /// An I/O or transport error. Not returned by this API (the library does no I/O).
    Io = 12,
    /// A bug inside kvroute: an internal invariant failed. Not reachable without a bug.
    Internal = 13,
    /// A required pointer argument was NULL.
    NullPointer = 100,
    /// A string argument was not valid UTF-8.
    InvalidUtf8 = 101,
    /// A caller buffer was too small; the length out-parameter holds the size needed.
    BufferTooSmall = 102,
    /// kvroute panicked (a bug); the call had no effect that can be relied on. Not
    /// reachable without a bug.
    Panic = 103,
}

impl kvroute_result {
    const ALL: [kvroute_result; 18] = [
        kvroute_result::Ok,
        kvroute_result::Config,
        kvroute_result::InvalidInput,
        kvroute_result::UnknownWorker,
        kvroute_result::WorkerExists,
        kvroute_result::BlockSizeMismatch,
        kvroute_result::Decode,
        kvroute_result::MissingSeed,
        kvroute_result::Snapshot,
        kvroute_result::SequenceGap,
        kvroute_result::HashMismatch,
        kvroute_result::NoWorkers,
        kvroute_result::Io,
        kvroute_result::Internal,
        kvroute_result::NullPointer,
        kvroute_result::InvalidUtf8,
        kvroute_result::BufferTooSmall,
        kvroute_result::Panic,
    ];

    /// The result for a core error: the same number as `Error::code()`.
    fn from_core(e: &Error) -> kvroute_result {
        Self::from_u32(e.code())
            .filter(|r| (1..100).contains(&(*r as u32)))
            .unwrap_or(kvroute_result::Internal)
    }

    fn from_u32(code: u32) -> Option<kvroute_result> {
        Self::ALL.iter().copied().find(|r| *r as u32 == code)
    }

    /// The description: for the core codes, the title of `kvroute::ERROR_KINDS` (the one
    /// table of error kinds); for the boundary's own codes, written here.
    fn as_cstr(self) -> &'static std::ffi::CStr {
        static CORE_TITLES: std::sync::OnceLock<Vec<CString>> = std::sync::OnceLock::new();
        let code = self as u32;
        match self {
            kvroute_result::Ok => c"ok",
            kvroute_result::NullPointer => c"null pointer",
            kvroute_result::InvalidUtf8 => c"invalid UTF-8",
            kvroute_result::BufferTooSmall => c"buffer too small",
            kvroute_result::Panic => c"panic",
            _ => {
                let titles = CORE_TITLES.get_or_init(|| {
                    kvroute_core::ERROR_KINDS.iter().map(|k| c_name(k.title)).collect()
                });
                let index = (code as usize).wrapping_sub(1);
                titles.get(index).map_or(c"unknown result code", |t| t.as_c_str())
            }
        }
    }
}

/// A router. Create with [`kvroute_router_new`], free with [`kvroute_router_free`].
/// Thread-safe: share one handle between threads.
pub struct kvroute_router {
    inner: Router,
}

/// One routing decision, with every candidate's scores. Returned by
/// [`kvroute_router_route`], freed with [`kvroute_decision_free`]. Immutable.
pub struct kvroute_decision {
    decision: Decision,
    worker: CString,
    /// C strings of the candidates' workers and of the score names, made on the first
    /// call that needs them (routing itself builds none).
    strings: std::sync::OnceLock<DecisionStrings>,
}

struct DecisionStrings {
    workers: Vec<CString>,
    score_names: Vec<CString>,
}

/// A C string for a name; interior NULs (possible only through a JSON configuration)
/// become U+FFFD.
fn c_name(s: &str) -> CString {
    CString::new(s.replace('\0', "\u{FFFD}")).unwrap_or_default()
}

impl kvroute_decision {
    fn new(decision: Decision) -> Self {
        let worker = c_name(&decision.worker.name);
        kvroute_decision { decision, worker, strings: std::sync::OnceLock::new() }
    }

    fn strings(&self) -> &DecisionStrings {
        self.strings.get_or_init(|| {
            let d = &self.decision;
            DecisionStrings {
                workers: (0..d.candidates.len())
                    .map(|i| c_name(d.candidate_worker(i).map_or("", |w| w.name.as_str())))
                    .collect(),
                score_names: d.score_names().iter().map(|n| c_name(n)).collect(),
            }
        })
    }

    fn info(&self) -> kvroute_decision_info {
        let d = &self.decision;
        let name = self.worker.as_bytes();
        let mut worker = [0 as c_char; KVROUTE_WORKER_NAME_CAPACITY];
        // Truncate at a UTF-8 boundary so the fixed buffer always holds valid UTF-8.
        let mut n = name.len().min(KVROUTE_WORKER_NAME_CAPACITY - 1);
        while n > 0 && n < name.len() && (name[n] & 0xC0) == 0x80 {
            n -= 1;
        }
        for (dst, &b) in worker.iter_mut().zip(&name[..n]) {
            *dst = b as c_char;
        }
        kvroute_decision_info {
            request_id: d.request_id,
            worker,
            worker_len: name.len(),
            dp_rank: d.worker.dp_rank,
            matched_blocks: d.matched_blocks,
            total_blocks: d.total_blocks,
            prompt_tokens: d.prompt_tokens,
            num_candidates: d.candidates.len(),
        }
    }
}

/// The summary of a decision, in a caller-owned struct.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct kvroute_decision_info {
    /// The id for the lifecycle calls.
    pub request_id: u64,
    /// The chosen worker's name, NUL-terminated. If `worker_len` is
    /// `KVROUTE_WORKER_NAME_CAPACITY` or more the name was truncated (at a UTF-8 boundary):
    /// get the whole name with [`kvroute_decision_worker`].
    pub worker: [c_char; KVROUTE_WORKER_NAME_CAPACITY],
    /// The full length of the chosen worker's name in bytes (without the NUL).
    pub worker_len: usize,
    /// The chosen worker's data-parallel rank.
    pub dp_rank: u32,
    /// Blocks of the prompt the chosen worker holds.
    pub matched_blocks: u32,
    /// Full blocks in the prompt.
    pub total_blocks: u32,
    /// Tokens in the prompt.
    pub prompt_tokens: u32,
    /// Candidates that passed the filters (see [`kvroute_decision_candidate`]).
    pub num_candidates: usize,
}

/// One candidate of a decision. `worker` is borrowed from the decision: valid until
/// [`kvroute_decision_free`].
#[repr(C)]
#[derive(Clone, Copy)]
pub struct kvroute_candidate {
    /// The worker's name (NUL-terminated, borrowed from the decision).
    pub worker: *const c_char,
    /// The worker's data-parallel rank.
    pub dp_rank: u32,
    /// Blocks of the prompt the worker holds (longest prefix).
    pub matched_blocks: u32,
    /// Of those, by best tier: GPU, CPU, disk.
    pub matched_by_tier: [u32; 3],
    /// The combined score.
    pub total: f64,
    /// Named scores of this candidate (see [`kvroute_decision_score`]).
    pub num_scores: usize,
}

/// What applying one event batch did.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct kvroute_apply_report {
    /// Events applied.
    pub events: u32,
    /// Blocks stored.
    pub blocks_stored: u32,
    /// Blocks removed.
    pub blocks_removed: u32,
    /// Removals of blocks the worker did not hold.
    pub unknown_removals: u32,
    /// Stored runs whose parent was unknown.
    pub orphans: u32,
    /// Placeholder events skipped.
    pub placeholders_skipped: u32,
    /// Events skipped for an unknown medium.
    pub unknown_medium: u32,
    /// Events of KV cache groups other than 0 skipped.
    pub other_groups_skipped: u32,
    /// Engine hashes checked against the router's.
    pub hashes_verified: u32,
    /// Engine hashes that disagreed (with `on_hash_mismatch: "count"`).
    pub hash_mismatches: u32,
}

impl From<ApplyReport> for kvroute_apply_report {
    fn from(r: ApplyReport) -> Self {
        kvroute_apply_report {
            events: r.events,
            blocks_stored: r.blocks_stored,
            blocks_removed: r.blocks_removed,
            unknown_removals: r.unknown_removals,
            orphans: r.orphans,
            placeholders_skipped: r.placeholders_skipped,
            unknown_medium: r.unknown_medium,
            other_groups_skipped: r.other_groups_skipped,
            hashes_verified: r.hashes_verified,
            hash_mismatches: r.hash_mismatches,
        }
    }
}

/// A load report for one worker. Fields that are "not reported" leave the router's tracked
/// value in place.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct kvroute_load_report {
    /// Requests waiting (`vllm:num_requests_waiting`); negative: not reported.
    pub waiting: i64,
    /// Requests running (`vllm:num_requests_running`); negative: not reported.
    pub running: i64,
    /// KV cache usage in 0..1 (`vllm:kv_cache_usage_perc`); NaN: not reported.
    pub kv_usage: f64,
    /// Names of the LoRA adapters loaded (`loras_len` strings); NULL: not reported.
    pub loras: *const *const c_char,
    /// Number of strings in `loras`.
    pub loras_len: usize,
}

// ----- results, errors, version ------------------------------------------------------

/// A static, NUL-terminated description of a result code (`"unknown result code"` for
/// numbers that are not codes). Never NULL; do not free. Thread-safe.
#[no_mangle]
pub extern "C" fn kvroute_result_str(code: u32) -> *const c_char {
    match kvroute_result::from_u32(code) {
        Some(r) => r.as_cstr().as_ptr(),
        None => c"unknown result code".as_ptr(),
    }
}

/// Copies the calling thread's last error message (empty if the thread's last call
/// succeeded) into `buf` (`len` bytes, NUL included). `*out_len` receives the message's
/// length without the NUL, also on `KVROUTE_RESULT_BUFFER_TOO_SMALL`. Does not change the
/// stored message.
///
/// # Safety
/// `buf` must be valid for `len` byte writes (NULL is allowed with `len` 0), `out_len` for
/// one write.
#[no_mangle]
pub unsafe extern "C" fn kvroute_last_error_message(
    buf: *mut c_char,
    len: usize,
    out_len: *mut usize,
) -> kvroute_result {
    let msg = boundary::last_error();
    // Not through `guard`: reading the message must not replace it.
    let r = std::panic::catch_unwind(|| {
        // SAFETY: forwarded contract.
        unsafe { copy_str_out(&msg, buf, len, out_len, "buf") }
    });
    match r {
        Ok(Ok(())) => kvroute_result::Ok,
        Ok(Err(FfiError::TooSmall { .. })) => kvroute_result::BufferTooSmall,
        Ok(Err(_)) => kvroute_result::NullPointer,
        Err(_) => kvroute_result::Panic,
    }
}

/// The version of the library actually linked (`KVROUTE_VERSION` is the header's).
/// Static; do not free.
#[no_mangle]
pub extern "C" fn kvroute_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

/// Frees a string returned by kvroute (statistics, Prometheus text). NULL is a no-op.
///
/// # Safety
/// `s` must be NULL or a string returned by kvroute and not yet freed.
#[no_mangle]
pub unsafe extern "C" fn kvroute_string_free(s: *mut c_char) {
    // SAFETY: forwarded contract.
    guard_void(|| unsafe { free_c_string(s) })
}

/// Frees a byte buffer returned by kvroute (snapshots), with the length it came with.
/// NULL is a no-op.
///
/// # Safety
/// `data`/`len` must be NULL or a pair returned by kvroute and not yet freed.
#[no_mangle]
pub unsafe extern "C" fn kvroute_bytes_free(data: *mut u8, len: usize) {
    // SAFETY: forwarded contract.
    guard_void(|| unsafe { free_bytes(data, len) })
}

// ----- router ------------------------------------------------------------------------

/// Creates a router from a JSON configuration (`"{}"` is valid: precise mode, no workers).
/// On success `*router_out` owns a new router; free it with [`kvroute_router_free`].
///
/// # Safety
/// `config_json` must be a NUL-terminated string; `router_out` valid for one write.
#[no_mangle]
pub unsafe extern "C" fn kvroute_router_new(
    config_json: *const c_char,
    router_out: *mut *mut kvroute_router,
) -> kvroute_result {
    guard("kvroute_router_new", || {
        // SAFETY: forwarded contract.
        let json = unsafe { try_str(config_json, "config_json") }?;
        check_out(router_out, "router_out")?;
        let inner = Router::from_json(json)?;
        // SAFETY: forwarded contract.
        unsafe { write_out(router_out, into_handle(kvroute_router { inner }), "router_out") }
    })
}

/// Frees a router. NULL is a no-op. No other call on the router may run concurrently or
/// follow.
///
/// # Safety
/// `router` must be NULL or a router from [`kvroute_router_new`] not yet freed.
#[no_mangle]
pub unsafe extern "C" fn kvroute_router_free(router: *mut kvroute_router) {
    // SAFETY: forwarded contract.
    guard_void(|| unsafe { free_handle(router) })
}

/// Routes a request: chooses a worker for `tokens` (`tokens_len` token ids).
///
/// `session` (a session key such as the client IP), `lora` (a LoRA adapter name) and
/// `cache_salt` are optional NUL-terminated strings (NULL: none). On success `*info_out`
/// receives the summary and, if `decision_out` is not NULL, `*decision_out` a decision
/// handle (for [`kvroute_router_on_routed`] and the candidate accessors) that the caller
/// frees with [`kvroute_decision_free`]. Thread-safe.
///
/// # Safety
/// `router` must be a live router; `tokens` valid for `tokens_len` reads (NULL allowed
/// when `tokens_len` is 0); strings NUL-terminated or NULL; `info_out` valid for a write;
/// `decision_out` NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn kvroute_router_route(
    router: *const kvroute_router,
    tokens: *const u32,
    tokens_len: usize,
    session: *const c_char,
    lora: *const c_char,
    cache_salt: *const c_char,
    info_out: *mut kvroute_decision_info,
    decision_out: *mut *mut kvroute_decision,
) -> kvroute_result {
    guard("kvroute_router_route", || {
        // SAFETY: forwarded contract.
        unsafe {
            route_impl(
                router,
                tokens,
                tokens_len,
                session,
                lora,
                cache_salt,
                None,
                info_out,
                decision_out,
            )
        }
    })
}

/// [`kvroute_router_route`] at an explicit time: `now_ms` (milliseconds on the caller's
/// clock, e.g. since the Unix epoch) instead of the wall clock, for session time-to-live
/// and request ages. Use one clock for every call on a router. Thread-safe.
///
/// # Safety
/// As for [`kvroute_router_route`].
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn kvroute_router_route_at(
    router: *const kvroute_router,
    tokens: *const u32,
    tokens_len: usize,
    session: *const c_char,
    lora: *const c_char,
    cache_salt: *const c_char,
    now_ms: u64,
    info_out: *mut kvroute_decision_info,
    decision_out: *mut *mut kvroute_decision,
) -> kvroute_result {
    guard("kvroute_router_route_at", || {
        // SAFETY: forwarded contract.
        unsafe {
            route_impl(
                router,
                tokens,
                tokens_len,
                session,
                lora,
                cache_salt,
                Some(now_ms),
                info_out,
                decision_out,
            )
        }
    })
}

/// The body of [`kvroute_router_route`] and [`kvroute_router_route_at`].
///
/// # Safety
/// As for [`kvroute_router_route`].
#[allow(clippy::too_many_arguments)]
unsafe fn route_impl(
    router: *const kvroute_router,
    tokens: *const u32,
    tokens_len: usize,
    session: *const c_char,
    lora: *const c_char,
    cache_salt: *const c_char,
    now_ms: Option<u64>,
    info_out: *mut kvroute_decision_info,
    decision_out: *mut *mut kvroute_decision,
) -> Result<(), FfiError> {
    // SAFETY (all blocks below): forwarded contract, checked by the boundary helpers.
    let r = unsafe { try_ref(router, "router") }?;
    let tokens = unsafe { try_slice(tokens, tokens_len, "tokens") }?;
    let session = unsafe { opt_str(session, "session") }?;
    let lora = unsafe { opt_str(lora, "lora") }?;
    let salt = unsafe { opt_str(cache_salt, "cache_salt") }?;
    check_out(info_out, "info_out")?;
    let extras = RequestExtras::from_lora_and_salt(lora, None, salt)?;
    let req = Request { tokens, session, lora, extras: extras.as_ref(), now_ms };
    let decision = kvroute_decision::new(r.inner.route(&req)?);
    unsafe { write_out(info_out, decision.info(), "info_out") }?;
    if !decision_out.is_null() {
        unsafe { write_out(decision_out, into_handle(decision), "decision_out") }?;
    }
    Ok(())
}

/// Applies a vLLM `KVEventBatch` (the raw msgpack payload of one ZeroMQ message) for the
/// worker named `worker` (the data-parallel rank comes from the batch). On error nothing
/// is applied. `report_out` may be NULL. Thread-safe.
///
/// # Safety
/// `router` live; `worker` NUL-terminated; `payload` valid for `payload_len` reads (NULL
/// allowed when 0); `report_out` NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn kvroute_router_apply_vllm_batch(
    router: *const kvroute_router,
    worker: *const c_char,
    payload: *const u8,
    payload_len: usize,
    report_out: *mut kvroute_apply_report,
) -> kvroute_result {
    guard("kvroute_router_apply_vllm_batch", || {
        // SAFETY (all blocks below): forwarded contract.
        let r = unsafe { try_ref(router, "router") }?;
        let worker = unsafe { try_str(worker, "worker") }?;
        let payload = unsafe { try_slice(payload, payload_len, "payload") }?;
        let report = r.inner.apply_vllm_batch(worker, payload)?;
        if !report_out.is_null() {
            unsafe { write_out(report_out, report.into(), "report_out") }?;
        }
        Ok(())
    })
}

/// [`kvroute_router_apply_vllm_batch`] for a batch read from a publisher's stream: also
/// records `seq` as the last sequence number applied from `publisher` (for example the
/// ZeroMQ endpoint), atomically with the batch, even when the batch is rejected (a replay
/// would bring the same batch). Snapshots carry these positions;
/// [`kvroute_router_restore_positions`] returns them. Thread-safe.
///
/// # Safety
/// As for [`kvroute_router_apply_vllm_batch`]; `publisher` NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn kvroute_router_apply_vllm_batch_from(
    router: *const kvroute_router,
    worker: *const c_char,
    payload: *const u8,
    payload_len: usize,
    publisher: *const c_char,
    seq: u64,
    report_out: *mut kvroute_apply_report,
) -> kvroute_result {
    guard("kvroute_router_apply_vllm_batch_from", || {
        // SAFETY (all blocks below): forwarded contract.
        let r = unsafe { try_ref(router, "router") }?;
        let worker = unsafe { try_str(worker, "worker") }?;
        let payload = unsafe { try_slice(payload, payload_len, "payload") }?;
        let publisher = unsafe { try_str(publisher, "publisher") }?;
        let report = r.inner.apply_vllm_batch_from(worker, payload, publisher, seq)?;
        if !report_out.is_null() {
            unsafe { write_out(report_out, report.into(), "report_out") }?;
        }
        Ok(())
    })
}

/// The request of `decision` was sent to its worker (tracks load; in approximate and
/// hybrid modes feeds the worker's cache model). Reporting one decision twice is
/// `KVROUTE_RESULT_INVALID_INPUT`. Thread-safe.
///
/// # Safety
/// `router` live; `decision` a live decision handle.
#[no_mangle]
pub unsafe extern "C" fn kvroute_router_on_routed(
    router: *const kvroute_router,
    decision: *const kvroute_decision,
) -> kvroute_result {
    guard("kvroute_router_on_routed", || {
        // SAFETY: forwarded contract.
        let r = unsafe { try_ref(router, "router") }?;
        let d = unsafe { try_ref(decision, "decision") }?;
        Ok(r.inner.on_routed(&d.decision)?)
    })
}

/// The first token of request `request_id` came back (its prefill is done). Thread-safe.
///
/// # Safety
/// `router` live.
#[no_mangle]
pub unsafe extern "C" fn kvroute_router_on_first_token(
    router: *const kvroute_router,
    request_id: u64,
) -> kvroute_result {
    guard("kvroute_router_on_first_token", || {
        // SAFETY: forwarded contract.
        let r = unsafe { try_ref(router, "router") }?;
        Ok(r.inner.on_first_token(request_id)?)
    })
}

/// Request `request_id` finished or failed: it leaves its worker's load. Thread-safe.
///
/// # Safety
/// `router` live.
#[no_mangle]
pub unsafe extern "C" fn kvroute_router_on_finished(
    router: *const kvroute_router,
    request_id: u64,
) -> kvroute_result {
    guard("kvroute_router_on_finished", || {
        // SAFETY: forwarded contract.
        let r = unsafe { try_ref(router, "router") }?;
        Ok(r.inner.on_finished(request_id)?)
    })
}

/// Adds a worker (name and data-parallel rank) with the default capacity. Thread-safe.
///
/// # Safety
/// `router` live; `name` NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn kvroute_router_add_worker(
    router: *const kvroute_router,
    name: *const c_char,
    dp_rank: u32,
) -> kvroute_result {
    guard("kvroute_router_add_worker", || {
        // SAFETY: forwarded contract.
        let r = unsafe { try_ref(router, "router") }?;
        let name = unsafe { try_str(name, "name") }?;
        r.inner.add_worker(name, dp_rank)?;
        Ok(())
    })
}

/// Removes a worker with its index entries, sessions and in-flight requests. Thread-safe.
///
/// # Safety
/// `router` live; `name` NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn kvroute_router_remove_worker(
    router: *const kvroute_router,
    name: *const c_char,
    dp_rank: u32,
) -> kvroute_result {
    guard("kvroute_router_remove_worker", || {
        // SAFETY: forwarded contract.
        let r = unsafe { try_ref(router, "router") }?;
        let name = unsafe { try_str(name, "name") }?;
        Ok(r.inner.remove_worker(name, dp_rank)?)
    })
}

/// Marks a worker healthy or not (unhealthy workers get no requests). Thread-safe.
///
/// # Safety
/// `router` live; `name` NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn kvroute_router_set_healthy(
    router: *const kvroute_router,
    name: *const c_char,
    dp_rank: u32,
    healthy: bool,
) -> kvroute_result {
    guard("kvroute_router_set_healthy", || {
        // SAFETY: forwarded contract.
        let r = unsafe { try_ref(router, "router") }?;
        let name = unsafe { try_str(name, "name") }?;
        Ok(r.inner.set_healthy(name, dp_rank, healthy)?)
    })
}

/// Starts (`draining` true) or ends draining a worker: a draining worker gets no new
/// requests but keeps its cache entries and in-flight requests. Thread-safe.
///
/// # Safety
/// `router` live; `name` NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn kvroute_router_drain_worker(
    router: *const kvroute_router,
    name: *const c_char,
    dp_rank: u32,
    draining: bool,
) -> kvroute_result {
    guard("kvroute_router_drain_worker", || {
        // SAFETY: forwarded contract.
        let r = unsafe { try_ref(router, "router") }?;
        let name = unsafe { try_str(name, "name") }?;
        Ok(r.inner.drain_worker(name, dp_rank, draining)?)
    })
}

/// Pushes a load report for a worker. Thread-safe. (The `kvroute` preset starts the clock
/// of what other router replicas started there since the previous report at the next
/// route; [`kvroute_router_report_load_at`] gives it the scrape's time.)
///
/// # Safety
/// `router` live; `name` NUL-terminated; `report` valid, and its `loras` NULL or valid for
/// `loras_len` reads of NUL-terminated strings.
#[no_mangle]
pub unsafe extern "C" fn kvroute_router_report_load(
    router: *const kvroute_router,
    name: *const c_char,
    dp_rank: u32,
    report: *const kvroute_load_report,
) -> kvroute_result {
    guard("kvroute_router_report_load", || {
        // SAFETY: forwarded contract.
        unsafe { report_load(router, name, dp_rank, report, None) }
    })
}

/// [`kvroute_router_report_load`] for a report scraped at `now_ms` (milliseconds on the
/// clock of the routes: the wall clock of [`kvroute_router_route`], or the `now_ms` given
/// to [`kvroute_router_route_at`]). With several router replicas in front of one fleet,
/// the prefill the other replicas started on the worker since the previous report is
/// worked off from that time (the `kvroute` preset's rule 12, docs/simulation.md).
/// Thread-safe.
///
/// # Safety
/// As [`kvroute_router_report_load`].
#[no_mangle]
pub unsafe extern "C" fn kvroute_router_report_load_at(
    router: *const kvroute_router,
    name: *const c_char,
    dp_rank: u32,
    report: *const kvroute_load_report,
    now_ms: u64,
) -> kvroute_result {
    guard("kvroute_router_report_load_at", || {
        // SAFETY: forwarded contract.
        unsafe { report_load(router, name, dp_rank, report, Some(now_ms)) }
    })
}

/// Both load-report calls: checks and converts the report, then pushes it.
///
/// # Safety
/// As [`kvroute_router_report_load`].
unsafe fn report_load(
    router: *const kvroute_router,
    name: *const c_char,
    dp_rank: u32,
    report: *const kvroute_load_report,
    now_ms: Option<u64>,
) -> Result<(), FfiError> {
    // SAFETY (all blocks below): forwarded contract.
    let r = unsafe { try_ref(router, "router") }?;
    let name = unsafe { try_str(name, "name") }?;
    let rep = unsafe { try_ref(report, "report") }?;
    let count = |v: i64, field: &str| -> Result<Option<u32>, FfiError> {
        if v < 0 {
            return Ok(None);
        }
        u32::try_from(v)
            .map(Some)
            .map_err(|_| Error::invalid(format!("{field} {v} is too large")).into())
    };
    let loras = if rep.loras.is_null() {
        None
    } else {
        let ptrs = unsafe { try_slice(rep.loras, rep.loras_len, "report.loras") }?;
        let mut names = Vec::with_capacity(ptrs.len());
        for &p in ptrs {
            names.push(unsafe { try_str(p, "report.loras[i]") }?.to_string());
        }
        Some(names)
    };
    let load = LoadReport {
        waiting: count(rep.waiting, "waiting")?,
        running: count(rep.running, "running")?,
        kv_usage: (!rep.kv_usage.is_nan()).then_some(rep.kv_usage),
        loras,
    };
    match now_ms {
        Some(t) => r.inner.report_load_at(name, dp_rank, &load, t)?,
        None => r.inner.report_load(name, dp_rank, &load)?,
    }
    Ok(())
}

/// The router's block keys for `tokens` (full blocks only), with an optional LoRA name
/// and cache salt. `*keys_len` is the capacity of `keys_out` on entry and the number of
/// keys written on exit; on `KVROUTE_RESULT_BUFFER_TOO_SMALL` it is the number needed.
/// Thread-safe.
///
/// # Safety
/// `router` live; `tokens` valid for `tokens_len` reads (NULL allowed when 0); strings
/// NUL-terminated or NULL; `keys_len` valid for a read and write; `keys_out` valid for
/// `*keys_len` writes (NULL allowed when `*keys_len` is 0).
#[no_mangle]
pub unsafe extern "C" fn kvroute_router_block_keys(
    router: *const kvroute_router,
    tokens: *const u32,
    tokens_len: usize,
    lora: *const c_char,
    cache_salt: *const c_char,
    keys_out: *mut u64,
    keys_len: *mut usize,
) -> kvroute_result {
    guard("kvroute_router_block_keys", || {
        // SAFETY (all blocks below): forwarded contract.
        let r = unsafe { try_ref(router, "router") }?;
        let tokens = unsafe { try_slice(tokens, tokens_len, "tokens") }?;
        let lora = unsafe { opt_str(lora, "lora") }?;
        let salt = unsafe { opt_str(cache_salt, "cache_salt") }?;
        let cap = *unsafe { try_ref(keys_len.cast_const(), "keys_len") }?;
        let extras = RequestExtras::from_lora_and_salt(lora, None, salt)?;
        let keys = r.inner.block_keys(tokens, extras.as_ref())?;
        if keys.len() > cap {
            unsafe { keys_len.write(keys.len()) };
            return Err(FfiError::TooSmall { arg: "keys_out", needed: keys.len() });
        }
        let dst = unsafe { try_slice_mut(keys_out, keys.len(), "keys_out") }?;
        dst.copy_from_slice(&keys);
        unsafe { write_out(keys_len, keys.len(), "keys_len") }
    })
}

/// Serializes the index, the worker names and the event stream positions. On success
/// `*data_out`/`*len_out` own a buffer the caller frees with [`kvroute_bytes_free`].
/// Thread-safe.
///
/// # Safety
/// `router` live; `data_out` and `len_out` valid for a write.
#[no_mangle]
pub unsafe extern "C" fn kvroute_router_snapshot(
    router: *const kvroute_router,
    data_out: *mut *mut u8,
    len_out: *mut usize,
) -> kvroute_result {
    guard("kvroute_router_snapshot", || {
        // SAFETY (all blocks below): forwarded contract.
        let r = unsafe { try_ref(router, "router") }?;
        check_out(data_out, "data_out")?;
        check_out(len_out, "len_out")?;
        let (ptr, len) = into_bytes(r.inner.snapshot());
        unsafe { write_out(len_out, len, "len_out") }?;
        unsafe { write_out(data_out, ptr, "data_out") }
    })
}

/// Replaces the index with a snapshot's (from a router with the same block size and hash
/// scheme); unknown workers named in it are added. On error nothing changes. Thread-safe.
///
/// # Safety
/// `router` live; `data` valid for `len` reads (NULL allowed when 0).
#[no_mangle]
pub unsafe extern "C" fn kvroute_router_restore(
    router: *const kvroute_router,
    data: *const u8,
    len: usize,
) -> kvroute_result {
    guard("kvroute_router_restore", || {
        // SAFETY: forwarded contract.
        let r = unsafe { try_ref(router, "router") }?;
        let bytes = unsafe { try_slice(data, len, "data") }?;
        r.inner.restore(bytes)?;
        Ok(())
    })
}

/// [`kvroute_router_restore`], also returning the stream positions the snapshot recorded:
/// on success `*positions_json_out` owns a JSON object `{"<publisher>": <last seq>, ...}`
/// (empty `{}` when none) that the caller frees with [`kvroute_string_free`]; subscribe
/// to each publisher from one past its seq to replay only what the snapshot lacks. On
/// error nothing changes and nothing is written. Thread-safe.
///
/// # Safety
/// `router` live; `data` valid for `len` reads (NULL allowed when 0); `positions_json_out`
/// valid for a write.
#[no_mangle]
pub unsafe extern "C" fn kvroute_router_restore_positions(
    router: *const kvroute_router,
    data: *const u8,
    len: usize,
    positions_json_out: *mut *mut c_char,
) -> kvroute_result {
    guard("kvroute_router_restore_positions", || {
        // SAFETY (all blocks below): forwarded contract.
        let r = unsafe { try_ref(router, "router") }?;
        let bytes = unsafe { try_slice(data, len, "data") }?;
        check_out(positions_json_out, "positions_json_out")?;
        let positions = r.inner.restore(bytes)?;
        let json = serde_json::to_string(&positions)
            .map_err(|e| FfiError::from(Error::Internal(e.to_string())))?;
        let ptr = owned_c_string(json)?;
        unsafe { write_out(positions_json_out, ptr, "positions_json_out") }
    })
}

/// Every counter and gauge as a JSON object (`routes`, `prompt_tokens`, `index`,
/// `workers`, ...). On success `*json_out` owns a string the caller frees with
/// [`kvroute_string_free`]. Thread-safe.
///
/// # Safety
/// `router` live; `json_out` valid for a write.
#[no_mangle]
pub unsafe extern "C" fn kvroute_router_metrics_json(
    router: *const kvroute_router,
    json_out: *mut *mut c_char,
) -> kvroute_result {
    guard("kvroute_router_metrics_json", || {
        // SAFETY: forwarded contract.
        let r = unsafe { try_ref(router, "router") }?;
        check_out(json_out, "json_out")?;
        let json = serde_json::to_string(&r.inner.metrics())
            .map_err(|e| Error::Internal(format!("metrics serialization: {e}")))?;
        let s = owned_c_string(json)?;
        unsafe { write_out(json_out, s, "json_out") }
    })
}

/// The metrics in the Prometheus text exposition format. On success `*text_out` owns a
/// string the caller frees with [`kvroute_string_free`]. Thread-safe.
///
/// # Safety
/// `router` live; `text_out` valid for a write.
#[no_mangle]
pub unsafe extern "C" fn kvroute_router_prometheus(
    router: *const kvroute_router,
    text_out: *mut *mut c_char,
) -> kvroute_result {
    guard("kvroute_router_prometheus", || {
        // SAFETY: forwarded contract.
        let r = unsafe { try_ref(router, "router") }?;
        check_out(text_out, "text_out")?;
        let s = owned_c_string(r.inner.prometheus())?;
        unsafe { write_out(text_out, s, "text_out") }
    })
}

// ----- decision ----------------------------------------------------------------------

/// Frees a decision. NULL is a no-op.
///
/// # Safety
/// `decision` must be NULL or a decision from [`kvroute_router_route`] not yet freed.
#[no_mangle]
pub unsafe extern "C" fn kvroute_decision_free(decision: *mut kvroute_decision) {
    // SAFETY: forwarded contract.
    guard_void(|| unsafe { free_handle(decision) })
}

/// The decision's summary (the same as [`kvroute_router_route`] wrote).
///
/// # Safety
/// `decision` live; `info_out` valid for a write.
#[no_mangle]
pub unsafe extern "C" fn kvroute_decision_get_info(
    decision: *const kvroute_decision,
    info_out: *mut kvroute_decision_info,
) -> kvroute_result {
    guard("kvroute_decision_get_info", || {
        // SAFETY: forwarded contract.
        let d = unsafe { try_ref(decision, "decision") }?;
        unsafe { write_out(info_out, d.info(), "info_out") }
    })
}

/// The chosen worker's whole name, borrowed from the decision (valid until
/// [`kvroute_decision_free`]).
///
/// # Safety
/// `decision` live; `name_out` valid for a write.
#[no_mangle]
pub unsafe extern "C" fn kvroute_decision_worker(
    decision: *const kvroute_decision,
    name_out: *mut *const c_char,
) -> kvroute_result {
    guard("kvroute_decision_worker", || {
        // SAFETY: forwarded contract.
        let d = unsafe { try_ref(decision, "decision") }?;
        unsafe { write_out(name_out, d.worker.as_ptr(), "name_out") }
    })
}

/// Candidate `index` (0-based, below `num_candidates`) of a decision. Out of range is
/// `KVROUTE_RESULT_INVALID_INPUT`.
///
/// # Safety
/// `decision` live; `candidate_out` valid for a write.
#[no_mangle]
pub unsafe extern "C" fn kvroute_decision_candidate(
    decision: *const kvroute_decision,
    index: usize,
    candidate_out: *mut kvroute_candidate,
) -> kvroute_result {
    guard("kvroute_decision_candidate", || {
        // SAFETY: forwarded contract.
        let d = unsafe { try_ref(decision, "decision") }?;
        check_out(candidate_out, "candidate_out")?;
        let n = d.decision.candidates.len();
        let c = d.decision.candidates.get(index).ok_or_else(|| {
            Error::invalid(format!("candidate index {index} out of range (have {n})"))
        })?;
        let out = kvroute_candidate {
            worker: d.strings().workers[index].as_ptr(),
            dp_rank: d.decision.candidate_worker(index).map_or(0, |w| w.dp_rank),
            matched_blocks: c.matched_blocks,
            matched_by_tier: c.matched_by_tier,
            total: c.total,
            num_scores: d.decision.score_names().len(),
        };
        unsafe { write_out(candidate_out, out, "candidate_out") }
    })
}

/// Score `score` (0-based, below the candidate's `num_scores`) of candidate `candidate`:
/// the scorer's name (borrowed from the decision) and its value. Out of range is
/// `KVROUTE_RESULT_INVALID_INPUT`.
///
/// # Safety
/// `decision` live; `name_out` and `value_out` valid for a write.
#[no_mangle]
pub unsafe extern "C" fn kvroute_decision_score(
    decision: *const kvroute_decision,
    candidate: usize,
    score: usize,
    name_out: *mut *const c_char,
    value_out: *mut f64,
) -> kvroute_result {
    guard("kvroute_decision_score", || {
        // SAFETY: forwarded contract.
        let d = unsafe { try_ref(decision, "decision") }?;
        check_out(name_out, "name_out")?;
        check_out(value_out, "value_out")?;
        if candidate >= d.decision.candidates.len() {
            return Err(Error::invalid(format!("candidate index {candidate} out of range")).into());
        }
        let value = d
            .decision
            .candidate_scores(candidate)
            .get(score)
            .ok_or_else(|| Error::invalid(format!("score index {score} out of range")))?;
        let name = d.strings().score_names[score].as_ptr();
        unsafe { write_out(value_out, *value, "value_out") }?;
        unsafe { write_out(name_out, name, "name_out") }
    })
}
