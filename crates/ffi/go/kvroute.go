// Package kvroute is the Go binding of kvroute, KV-cache-aware request routing for LLM
// serving. It calls the C ABI of libkvroute (crates/ffi/include/kvroute.h) through cgo;
// build the static library first with `cargo build -p kvroute-ffi --release`.
//
// A Router is safe for concurrent use by many goroutines. Close frees it (a finalizer
// also frees a Router that is no longer reachable); calls after Close return ErrClosed.
// Every result is copied into Go memory before the Rust memory behind it is freed.
package kvroute

/*
#cgo CFLAGS: -I${SRCDIR}/../include
#cgo LDFLAGS: ${SRCDIR}/../../../target/release/libkvroute.a -lm -ldl -lpthread -lrt -lutil
#include <stdlib.h>
#include "kvroute.h"
*/
import "C"

import (
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"runtime"
	"sync"
	"unsafe"
)

// ResultCode is a kvroute_result: a stable number whose meaning never changes.
type ResultCode uint32

// The result codes of the C ABI (crates/ffi/README.md has the table).
const (
	CodeOK                ResultCode = C.KVROUTE_RESULT_OK
	CodeConfig            ResultCode = C.KVROUTE_RESULT_CONFIG
	CodeInvalidInput      ResultCode = C.KVROUTE_RESULT_INVALID_INPUT
	CodeUnknownWorker     ResultCode = C.KVROUTE_RESULT_UNKNOWN_WORKER
	CodeWorkerExists      ResultCode = C.KVROUTE_RESULT_WORKER_EXISTS
	CodeBlockSizeMismatch ResultCode = C.KVROUTE_RESULT_BLOCK_SIZE_MISMATCH
	CodeDecode            ResultCode = C.KVROUTE_RESULT_DECODE
	CodeMissingSeed       ResultCode = C.KVROUTE_RESULT_MISSING_SEED
	CodeSnapshot          ResultCode = C.KVROUTE_RESULT_SNAPSHOT
	CodeSequenceGap       ResultCode = C.KVROUTE_RESULT_SEQUENCE_GAP
	CodeHashMismatch      ResultCode = C.KVROUTE_RESULT_HASH_MISMATCH
	CodeNoWorkers         ResultCode = C.KVROUTE_RESULT_NO_WORKERS
	CodeIO                ResultCode = C.KVROUTE_RESULT_IO
	CodeInternal          ResultCode = C.KVROUTE_RESULT_INTERNAL
	CodeNullPointer       ResultCode = C.KVROUTE_RESULT_NULL_POINTER
	CodeInvalidUTF8       ResultCode = C.KVROUTE_RESULT_INVALID_UTF8
	CodeBufferTooSmall    ResultCode = C.KVROUTE_RESULT_BUFFER_TOO_SMALL
	CodePanic             ResultCode = C.KVROUTE_RESULT_PANIC
)

// String is the library's static description of the code.
func (c ResultCode) String() string {
	return C.GoString(C.kvroute_result_str(C.uint32_t(c)))
}

// Error is a failed kvroute call: the result code and the library's message.
type Error struct {
	Code ResultCode
	Msg  string
}

func (e *Error) Error() string {
	if e.Msg == "" {
		return "kvroute: " + e.Code.String()
	}
	return "kvroute: " + e.Msg
}

// Is matches the sentinel of the same code: errors.Is(err, kvroute.ErrNoWorkers).
func (e *Error) Is(target error) bool {
	t, ok := target.(*Error)
	return ok && t.Msg == "" && t.Code == e.Code
}

// Sentinel errors, one per result code, for errors.Is.
var (
	ErrConfig            = &Error{Code: CodeConfig}
	ErrInvalidInput      = &Error{Code: CodeInvalidInput}
	ErrUnknownWorker     = &Error{Code: CodeUnknownWorker}
	ErrWorkerExists      = &Error{Code: CodeWorkerExists}
	ErrBlockSizeMismatch = &Error{Code: CodeBlockSizeMismatch}
	ErrDecode            = &Error{Code: CodeDecode}
	ErrMissingSeed       = &Error{Code: CodeMissingSeed}
	ErrSnapshot          = &Error{Code: CodeSnapshot}
	ErrSequenceGap       = &Error{Code: CodeSequenceGap}
	ErrHashMismatch      = &Error{Code: CodeHashMismatch}
	ErrNoWorkers         = &Error{Code: CodeNoWorkers}
	ErrIO                = &Error{Code: CodeIO}
	ErrInternal          = &Error{Code: CodeInternal}
	ErrNullPointer       = &Error{Code: CodeNullPointer}
	ErrInvalidUTF8       = &Error{Code: CodeInvalidUTF8}
	ErrBufferTooSmall    = &Error{Code: CodeBufferTooSmall}
	ErrPanic             = &Error{Code: CodePanic}
)

// ErrClosed is returned by calls on a closed Router.
var ErrClosed = errors.New("kvroute: router is closed")

// Version is the version of the linked library.
func Version() string { return C.GoString(C.kvroute_version()) }

// HeaderVersion is the version of the header the package was compiled against.
const HeaderVersion = C.KVROUTE_VERSION

// lastError reads the calling OS thread's last error message. The caller must hold
// runtime.LockOSThread since the failing call.
func lastError(rc C.kvroute_result) error {
	if rc == C.KVROUTE_RESULT_OK {
		return nil
	}
	buf := make([]C.char, 512)
	var n C.size_t
	got := C.kvroute_last_error_message(&buf[0], C.size_t(len(buf)), &n)
	if got == C.KVROUTE_RESULT_BUFFER_TOO_SMALL {
		buf = make([]C.char, int(n)+1)
		got = C.kvroute_last_error_message(&buf[0], C.size_t(len(buf)), &n)
	}
	msg := ""
	if got == C.KVROUTE_RESULT_OK {
		msg = C.GoStringN(&buf[0], C.int(n))
	}
	return &Error{Code: ResultCode(rc), Msg: msg}
}

// call runs one C call on a locked OS thread so that the thread-local error message read
// afterwards is this call's.
func call(f func() C.kvroute_result) error {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	return lastError(f())
}

// cstr is a C copy of s (free with C.free), or NULL for "" when optional is true.
func cstr(s string, optional bool) *C.char {
	if optional && s == "" {
		return nil
	}
	return C.CString(s)
}

func free(p *C.char) {
	if p != nil {
		C.free(unsafe.Pointer(p))
	}
}

// Router routes requests. Safe for concurrent use.
type Router struct {
	mu  sync.RWMutex
	ptr *C.kvroute_router
}

// New creates a router from a JSON configuration ("{}" is valid: precise mode, no workers).
func New(configJSON string) (*Router, error) {
	cfg := C.CString(configJSON)
	defer free(cfg)
	var ptr *C.kvroute_router
	if err := call(func() C.kvroute_result { return C.kvroute_router_new(cfg, &ptr) }); err != nil {
		return nil, err
	}
	r := &Router{ptr: ptr}
	runtime.SetFinalizer(r, (*Router).Close)
	return r, nil
}

// Close frees the router. It waits for calls in progress; later calls return ErrClosed.
// Closing twice is a no-op.
func (r *Router) Close() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.ptr != nil {
		C.kvroute_router_free(r.ptr)
		r.ptr = nil
		runtime.SetFinalizer(r, nil)
	}
	return nil
}

// with runs f with the live router pointer under the read lock.
func (r *Router) with(f func(p *C.kvroute_router) C.kvroute_result) error {
	r.mu.RLock()
	defer r.mu.RUnlock()
	if r.ptr == nil {
		return ErrClosed
	}
	return call(func() C.kvroute_result { return f(r.ptr) })
}

// RouteOptions are a request's optional inputs; empty strings mean "none".
type RouteOptions struct {
	// Session is a session key (a client IP or session id) for session affinity.
	Session string
	// LoRA is the LoRA adapter's name.
	LoRA string
	// CacheSalt is vLLM's cache_salt (folded into the first block's hash).
	CacheSalt string
}

// Score is one scorer's score of a candidate.
type Score struct {
	Name  string
	Value float64
}

// Candidate is one worker the router considered.
type Candidate struct {
	Worker        string
	DPRank        uint32
	MatchedBlocks uint32
	// MatchedByTier splits MatchedBlocks by best tier: GPU, CPU, disk.
	MatchedByTier [3]uint32
	Total         float64
	Scores        []Score
}

// Decision is the router's choice for one request.
type Decision struct {
	RequestID     uint64
	Worker        string
	DPRank        uint32
	MatchedBlocks uint32
	TotalBlocks   uint32
	PromptTokens  uint32
	Candidates    []Candidate

	mu     sync.Mutex
	handle *C.kvroute_decision
}

func (d *Decision) free() {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.handle != nil {
		C.kvroute_decision_free(d.handle)
		d.handle = nil
	}
}

func tokensPtr(tokens []uint32) *C.uint32_t {
	if len(tokens) == 0 {
		return nil
	}
	return (*C.uint32_t)(unsafe.Pointer(&tokens[0]))
}

// Route chooses a worker for a prompt's token ids.
func (r *Router) Route(tokens []uint32, opts RouteOptions) (*Decision, error) {
	return r.route(tokens, opts, nil)
}

// RouteAt is Route at an explicit time, nowMs milliseconds on the caller's clock (for
// example since the Unix epoch), instead of the wall clock: session time-to-live and
// request ages follow it. Use one clock for every call on a router.
func (r *Router) RouteAt(tokens []uint32, opts RouteOptions, nowMs uint64) (*Decision, error) {
	return r.route(tokens, opts, &nowMs)
}

func (r *Router) route(tokens []uint32, opts RouteOptions, nowMs *uint64) (*Decision, error) {
	session, lora, salt := cstr(opts.Session, true), cstr(opts.LoRA, true), cstr(opts.CacheSalt, true)
	defer free(session)
	defer free(lora)
	defer free(salt)
	var info C.kvroute_decision_info
	var handle *C.kvroute_decision
	d := &Decision{}
	err := r.with(func(p *C.kvroute_router) C.kvroute_result {
		var rc C.kvroute_result
		if nowMs == nil {
			rc = C.kvroute_router_route(p, tokensPtr(tokens), C.size_t(len(tokens)), session, lora,
				salt, &info, &handle)
		} else {
			rc = C.kvroute_router_route_at(p, tokensPtr(tokens), C.size_t(len(tokens)), session,
				lora, salt, C.uint64_t(*nowMs), &info, &handle)
		}
		if rc != C.KVROUTE_RESULT_OK {
			return rc
		}
		return copyDecision(handle, &info, d)
	})
	runtime.KeepAlive(tokens)
	if err != nil {
		if handle != nil {
			C.kvroute_decision_free(handle)
		}
		return nil, err
	}
	d.handle = handle
	runtime.SetFinalizer(d, (*Decision).free)
	return d, nil
}

// copyDecision copies a decision into Go memory.
func copyDecision(h *C.kvroute_decision, info *C.kvroute_decision_info, d *Decision) C.kvroute_result {
	var name *C.char
	if rc := C.kvroute_decision_worker(h, &name); rc != C.KVROUTE_RESULT_OK {
		return rc
	}
	d.RequestID = uint64(info.request_id)
	d.Worker = C.GoString(name)
	d.DPRank = uint32(info.dp_rank)
	d.MatchedBlocks = uint32(info.matched_blocks)
	d.TotalBlocks = uint32(info.total_blocks)
	d.PromptTokens = uint32(info.prompt_tokens)
	d.Candidates = make([]Candidate, int(info.num_candidates))
	for i := range d.Candidates {
		var c C.kvroute_candidate
		if rc := C.kvroute_decision_candidate(h, C.size_t(i), &c); rc != C.KVROUTE_RESULT_OK {
			return rc
		}
		cand := Candidate{
			Worker:        C.GoString(c.worker),
			DPRank:        uint32(c.dp_rank),
			MatchedBlocks: uint32(c.matched_blocks),
			Total:         float64(c.total),
			Scores:        make([]Score, int(c.num_scores)),
		}
		for t := 0; t < 3; t++ {
			cand.MatchedByTier[t] = uint32(c.matched_by_tier[t])
		}
		for j := range cand.Scores {
			var sn *C.char
			var v C.double
			if rc := C.kvroute_decision_score(h, C.size_t(i), C.size_t(j), &sn, &v); rc != C.KVROUTE_RESULT_OK {
				return rc
			}
			cand.Scores[j] = Score{Name: C.GoString(sn), Value: float64(v)}
		}
		d.Candidates[i] = cand
	}
	return C.KVROUTE_RESULT_OK
}

// OnRouted reports that the request of d was sent to its worker (load tracking; in
// approximate and hybrid modes it feeds the worker's cache model). Reporting one decision
// twice is ErrInvalidInput.
func (r *Router) OnRouted(d *Decision) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.handle == nil {
		return &Error{Code: CodeNullPointer, Msg: "decision has no handle (not from Route)"}
	}
	h := d.handle
	return r.with(func(p *C.kvroute_router) C.kvroute_result { return C.kvroute_router_on_routed(p, h) })
}

// OnFirstToken reports that the first token of a request came back.
func (r *Router) OnFirstToken(requestID uint64) error {
	return r.with(func(p *C.kvroute_router) C.kvroute_result {
		return C.kvroute_router_on_first_token(p, C.uint64_t(requestID))
	})
}

// OnFinished reports that a request finished or failed.
func (r *Router) OnFinished(requestID uint64) error {
	return r.with(func(p *C.kvroute_router) C.kvroute_result {
		return C.kvroute_router_on_finished(p, C.uint64_t(requestID))
	})
}

// ApplyReport says what applying one event batch did.
type ApplyReport struct {
	Events, BlocksStored, BlocksRemoved, UnknownRemovals, Orphans uint32
	PlaceholdersSkipped, UnknownMedium, OtherGroupsSkipped        uint32
	HashesVerified, HashMismatches                                uint32
}

// ApplyVLLMBatch applies one vLLM KVEventBatch (the raw msgpack payload of a ZeroMQ
// message) for a worker; the data-parallel rank comes from the batch. On error nothing
// is applied.
func (r *Router) ApplyVLLMBatch(worker string, payload []byte) (ApplyReport, error) {
	return r.applyVLLMBatch(worker, payload, nil, 0)
}

// ApplyVLLMBatchFrom is ApplyVLLMBatch for a batch read from a publisher's stream: it
// also records seq as the last sequence number applied from publisher (atomically with
// the batch, even when the batch is rejected). Snapshots carry these positions, and
// RestorePositions returns them.
func (r *Router) ApplyVLLMBatchFrom(worker string, payload []byte, publisher string, seq uint64) (ApplyReport, error) {
	pub := C.CString(publisher)
	defer free(pub)
	return r.applyVLLMBatch(worker, payload, pub, seq)
}

func (r *Router) applyVLLMBatch(worker string, payload []byte, publisher *C.char, seq uint64) (ApplyReport, error) {
	name := C.CString(worker)
	defer free(name)
	var rep C.kvroute_apply_report
	var ptr *C.uint8_t
	if len(payload) > 0 {
		ptr = (*C.uint8_t)(unsafe.Pointer(&payload[0]))
	}
	err := r.with(func(p *C.kvroute_router) C.kvroute_result {
		if publisher != nil {
			return C.kvroute_router_apply_vllm_batch_from(p, name, ptr, C.size_t(len(payload)),
				publisher, C.uint64_t(seq), &rep)
		}
		return C.kvroute_router_apply_vllm_batch(p, name, ptr, C.size_t(len(payload)), &rep)
	})
	runtime.KeepAlive(payload)
	if err != nil {
		return ApplyReport{}, err
	}
	return ApplyReport{
		Events: uint32(rep.events), BlocksStored: uint32(rep.blocks_stored),
		BlocksRemoved: uint32(rep.blocks_removed), UnknownRemovals: uint32(rep.unknown_removals),
		Orphans: uint32(rep.orphans), PlaceholdersSkipped: uint32(rep.placeholders_skipped),
		UnknownMedium: uint32(rep.unknown_medium), OtherGroupsSkipped: uint32(rep.other_groups_skipped),
		HashesVerified: uint32(rep.hashes_verified), HashMismatches: uint32(rep.hash_mismatches),
	}, nil
}

func (r *Router) workerCall(name string, f func(p *C.kvroute_router, n *C.char) C.kvroute_result) error {
	n := C.CString(name)
	defer free(n)
	return r.with(func(p *C.kvroute_router) C.kvroute_result { return f(p, n) })
}

// AddWorker adds a worker (name and data-parallel rank) with the default capacity.
func (r *Router) AddWorker(name string, dpRank uint32) error {
	return r.workerCall(name, func(p *C.kvroute_router, n *C.char) C.kvroute_result {
		return C.kvroute_router_add_worker(p, n, C.uint32_t(dpRank))
	})
}

// RemoveWorker removes a worker with its cache entries, sessions and in-flight requests.
func (r *Router) RemoveWorker(name string, dpRank uint32) error {
	return r.workerCall(name, func(p *C.kvroute_router, n *C.char) C.kvroute_result {
		return C.kvroute_router_remove_worker(p, n, C.uint32_t(dpRank))
	})
}

// SetHealthy marks a worker healthy or not; unhealthy workers get no requests.
func (r *Router) SetHealthy(name string, dpRank uint32, healthy bool) error {
	return r.workerCall(name, func(p *C.kvroute_router, n *C.char) C.kvroute_result {
		return C.kvroute_router_set_healthy(p, n, C.uint32_t(dpRank), C.bool(healthy))
	})
}

// DrainWorker starts or ends draining a worker: no new requests, state kept.
func (r *Router) DrainWorker(name string, dpRank uint32, draining bool) error {
	return r.workerCall(name, func(p *C.kvroute_router, n *C.char) C.kvroute_result {
		return C.kvroute_router_drain_worker(p, n, C.uint32_t(dpRank), C.bool(draining))
	})
}

// LoadReport is a worker's load as scraped from its metrics; nil fields are not reported.
type LoadReport struct {
	Waiting *uint32
	Running *uint32
	KVUsage *float64
	// LoRAs loaded on the worker; nil is "not reported", an empty slice is "none".
	LoRAs []string
}

// ReportLoad pushes a load report for a worker.
func (r *Router) ReportLoad(name string, dpRank uint32, rep LoadReport) error {
	return r.reportLoad(name, dpRank, rep, nil)
}

// ReportLoadAt pushes a load report for a worker scraped at nowMs (milliseconds on the
// routes' clock: the wall clock, or the nowMs given to RouteAt). With several router replicas in
// front of one fleet, the prefill the other replicas started on the worker since the
// previous report is worked off from that time (ReportLoad: from the next route).
func (r *Router) ReportLoadAt(name string, dpRank uint32, rep LoadReport, nowMs uint64) error {
	return r.reportLoad(name, dpRank, rep, &nowMs)
}

func (r *Router) reportLoad(name string, dpRank uint32, rep LoadReport, nowMs *uint64) error {
	var c C.kvroute_load_report
	c.waiting, c.running, c.kv_usage = -1, -1, C.double(math.NaN())
	if rep.Waiting != nil {
		c.waiting = C.int64_t(*rep.Waiting)
	}
	if rep.Running != nil {
		c.running = C.int64_t(*rep.Running)
	}
	if rep.KVUsage != nil {
		c.kv_usage = C.double(*rep.KVUsage)
	}
	if rep.LoRAs != nil {
		// The array of string pointers lives in C memory (cgo forbids Go memory holding
		// Go pointers crossing the boundary).
		n := len(rep.LoRAs)
		arr := (**C.char)(C.malloc(C.size_t(max(n, 1)) * C.size_t(unsafe.Sizeof((*C.char)(nil)))))
		defer C.free(unsafe.Pointer(arr))
		items := unsafe.Slice(arr, max(n, 1))
		for i, s := range rep.LoRAs {
			items[i] = C.CString(s)
			defer free(items[i])
		}
		c.loras, c.loras_len = arr, C.size_t(n)
	}
	return r.workerCall(name, func(p *C.kvroute_router, nm *C.char) C.kvroute_result {
		if nowMs != nil {
			return C.kvroute_router_report_load_at(p, nm, C.uint32_t(dpRank), &c, C.uint64_t(*nowMs))
		}
		return C.kvroute_router_report_load(p, nm, C.uint32_t(dpRank), &c)
	})
}

// BlockKeys returns the router's block keys for tokens (full blocks only).
func (r *Router) BlockKeys(tokens []uint32, opts RouteOptions) ([]uint64, error) {
	lora, salt := cstr(opts.LoRA, true), cstr(opts.CacheSalt, true)
	defer free(lora)
	defer free(salt)
	keys := make([]uint64, len(tokens)+1) // at most one key per token
	n := C.size_t(len(keys))
	err := r.with(func(p *C.kvroute_router) C.kvroute_result {
		return C.kvroute_router_block_keys(p, tokensPtr(tokens), C.size_t(len(tokens)), lora, salt,
			(*C.uint64_t)(unsafe.Pointer(&keys[0])), &n)
	})
	runtime.KeepAlive(tokens)
	if err != nil {
		return nil, err
	}
	return keys[:int(n)], nil
}

// Snapshot serializes the index, the worker names and the event stream positions.
func (r *Router) Snapshot() ([]byte, error) {
	var data *C.uint8_t
	var n C.size_t
	if err := r.with(func(p *C.kvroute_router) C.kvroute_result {
		return C.kvroute_router_snapshot(p, &data, &n)
	}); err != nil {
		return nil, err
	}
	defer C.kvroute_bytes_free(data, n)
	// Copied with a size_t length (C.GoBytes takes a C int, which caps it at 2 GiB).
	out := make([]byte, int(n))
	copy(out, unsafe.Slice((*byte)(unsafe.Pointer(data)), int(n)))
	return out, nil
}

// Restore replaces the index with a snapshot's; on error nothing changes.
func (r *Router) Restore(snapshot []byte) error {
	var ptr *C.uint8_t
	if len(snapshot) > 0 {
		ptr = (*C.uint8_t)(unsafe.Pointer(&snapshot[0]))
	}
	err := r.with(func(p *C.kvroute_router) C.kvroute_result {
		return C.kvroute_router_restore(p, ptr, C.size_t(len(snapshot)))
	})
	runtime.KeepAlive(snapshot)
	return err
}

// RestorePositions is Restore that also returns the stream positions the snapshot
// recorded: the last sequence number applied from each publisher (see
// ApplyVLLMBatchFrom). Resume each publisher's stream one past its position.
func (r *Router) RestorePositions(snapshot []byte) (map[string]uint64, error) {
	var ptr *C.uint8_t
	if len(snapshot) > 0 {
		ptr = (*C.uint8_t)(unsafe.Pointer(&snapshot[0]))
	}
	var s *C.char
	err := r.with(func(p *C.kvroute_router) C.kvroute_result {
		return C.kvroute_router_restore_positions(p, ptr, C.size_t(len(snapshot)), &s)
	})
	runtime.KeepAlive(snapshot)
	if err != nil {
		return nil, err
	}
	defer C.kvroute_string_free(s)
	positions := map[string]uint64{}
	if err := json.Unmarshal([]byte(C.GoString(s)), &positions); err != nil {
		return nil, fmt.Errorf("kvroute: stream positions: %w", err)
	}
	return positions, nil
}

func (r *Router) ownedString(f func(p *C.kvroute_router, out **C.char) C.kvroute_result) (string, error) {
	var s *C.char
	if err := r.with(func(p *C.kvroute_router) C.kvroute_result { return f(p, &s) }); err != nil {
		return "", err
	}
	defer C.kvroute_string_free(s)
	return C.GoString(s), nil
}

// MetricsJSON is every counter and gauge as the library's JSON.
func (r *Router) MetricsJSON() (string, error) {
	return r.ownedString(func(p *C.kvroute_router, out **C.char) C.kvroute_result {
		return C.kvroute_router_metrics_json(p, out)
	})
}

// Prometheus is the metrics in the Prometheus text exposition format.
func (r *Router) Prometheus() (string, error) {
	return r.ownedString(func(p *C.kvroute_router, out **C.char) C.kvroute_result {
		return C.kvroute_router_prometheus(p, out)
	})
}

// WorkerKey names a worker.
type WorkerKey struct {
	Name   string `json:"name"`
	DPRank uint32 `json:"dp_rank"`
}

// IndexStats are the prefix index's sizes.
type IndexStats struct {
	Blocks       uint64 `json:"blocks"`
	HolderBlocks uint64 `json:"holder_blocks"`
	Nodes        uint64 `json:"nodes"`
	HeapBytes    uint64 `json:"heap_bytes"`
	Evictions    uint64 `json:"evictions"`
}

// WorkerMetrics are one worker's metrics.
type WorkerMetrics struct {
	Worker                WorkerKey `json:"worker"`
	Decisions             uint64    `json:"decisions"`
	PredictedHitTokens    uint64    `json:"predicted_hit_tokens"`
	IndexBlocks           uint64    `json:"index_blocks"`
	Running               uint32    `json:"running"`
	InflightPrefillTokens uint64    `json:"inflight_prefill_tokens"`
	Healthy               bool      `json:"healthy"`
	Draining              bool      `json:"draining"`
	HasEvents             bool      `json:"has_events"`
	// Never-stale load and what the router learned about the worker (kvroute preset).
	PendingPrefillTokens uint64  `json:"pending_prefill_tokens"`
	ActiveRequests       uint32  `json:"active_requests"`
	PrefillTokensPerS    float64 `json:"prefill_tokens_per_s"`
	PrefillRateSamples   uint64  `json:"prefill_rate_samples"`
	PredictionTTLS       float64 `json:"prediction_ttl_s"`
}

// PredictionCounters count the predicted-residency overlay's predictions (precise mode).
type PredictionCounters struct {
	Made      uint64 `json:"made"`
	Confirmed uint64 `json:"confirmed"`
	Expired   uint64 `json:"expired"`
	Dropped   uint64 `json:"dropped"`
}

// Metrics is a snapshot of the router's counters (the main fields of MetricsJSON).
type Metrics struct {
	Routes             uint64 `json:"routes"`
	PromptTokens       uint64 `json:"prompt_tokens"`
	PredictedHitTokens uint64 `json:"predicted_hit_tokens"`
	EventBatches       uint64 `json:"event_batches"`
	EventErrors        uint64 `json:"event_errors"`
	HashMismatches     uint64 `json:"hash_mismatches"`
	InflightRequests   uint64 `json:"inflight_requests"`
	// TailTTFTS is the tail of the recently observed times to first token that the
	// kvroute preset protects (its tail_quantile, p99 by default), seconds; 0 until 64
	// have been observed.
	TailTTFTS       float64            `json:"tail_ttft_s"`
	Predictions     PredictionCounters `json:"predictions"`
	PredictionsHeld uint64             `json:"predictions_held"`
	Index           IndexStats         `json:"index"`
	Workers         []WorkerMetrics    `json:"workers"`
}

// Metrics returns the router's counters and gauges.
func (r *Router) Metrics() (*Metrics, error) {
	s, err := r.MetricsJSON()
	if err != nil {
		return nil, err
	}
	var m Metrics
	if err := json.Unmarshal([]byte(s), &m); err != nil {
		return nil, fmt.Errorf("kvroute: metrics JSON: %w", err)
	}
	return &m, nil
}
