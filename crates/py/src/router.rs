//! `kvroute.Router`, `kvroute.Decision` and `kvroute.Candidate`: thin glue over
//! [`kvroute::router::Router`].

use crate::convert::{extract_bytes, extract_tokens, to_py_via_json};
use crate::errors::OrRaise;
use crate::hashing::extras;
use kvroute::router::{CandidateExplanation, Decision, LoadReport, Request, Router};
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyString};
use std::sync::Arc;

/// A KV-cache-aware router (`Send + Sync`: share one between threads freely).
///
/// `config` is the router configuration (the same `RouterConfig` JSON as the C ABI and the
/// CLI) as a dict or a JSON string; `None` is the default configuration (precise mode,
/// native `xxh3` keys, no workers). Routing, event application and snapshots run with
/// the GIL released.
#[pyclass(module = "kvroute", name = "Router", frozen)]
pub(crate) struct PyRouter {
    /// Shared with the ZeroMQ subscriber's threads.
    pub(crate) inner: Arc<Router>,
}

/// The router's choice for one request. Pass it to `Router.on_routed` once the request is
/// sent to `worker`.
#[pyclass(module = "kvroute", name = "Decision", frozen)]
pub(crate) struct PyDecision {
    inner: Decision,
}

/// One candidate worker of a decision, with each scorer's score.
#[pyclass(module = "kvroute", name = "Candidate", frozen)]
pub(crate) struct PyCandidate {
    inner: CandidateExplanation,
}

fn config_json(py: Python<'_>, config: Option<&Bound<'_, PyAny>>) -> PyResult<String> {
    match config {
        None => Ok("{}".to_string()),
        Some(c) if c.is_none() => Ok("{}".to_string()),
        Some(c) => {
            if let Ok(s) = c.cast::<PyString>() {
                return s.extract();
            }
            if c.cast::<PyDict>().is_ok() {
                let json = py.import("json")?;
                return json.getattr("dumps")?.call1((c,))?.extract();
            }
            Err(PyTypeError::new_err("config must be a dict, a JSON string or None"))
        }
    }
}

#[pymethods]
impl PyRouter {
    #[new]
    #[pyo3(signature = (config = None))]
    fn new(py: Python<'_>, config: Option<&Bound<'_, PyAny>>) -> PyResult<Self> {
        let json = config_json(py, config)?;
        Ok(PyRouter { inner: Arc::new(Router::from_json(&json).or_raise(py)?) })
    }

    /// Chooses a worker for the prompt `tokens` (a list, tuple, numpy integer array or
    /// integer buffer of token ids). `session` is a session key (client IP, session id)
    /// for affinity, `lora` the LoRA adapter's name (for LoRA affinity and the hash) and
    /// `lora_path` its path (vLLM 0.33 hashes both), `cache_salt` vLLM's per-request cache
    /// salt (folded into the block hashes as vLLM does). `now_ms` overrides the wall clock.
    #[pyo3(signature = (
        tokens, *, session = None, lora = None, cache_salt = None, lora_path = None,
        now_ms = None
    ))]
    #[allow(clippy::too_many_arguments)]
    fn route(
        &self,
        py: Python<'_>,
        tokens: &Bound<'_, PyAny>,
        session: Option<String>,
        lora: Option<String>,
        cache_salt: Option<String>,
        lora_path: Option<String>,
        now_ms: Option<u64>,
    ) -> PyResult<PyDecision> {
        let tokens = extract_tokens(tokens)?;
        // The LoRA name alone is folded in by the core; with a salt or a LoRA path, the
        // request's extras carry all of them.
        let ex = if cache_salt.is_some() || lora_path.is_some() {
            Some(extras(py, lora.clone(), lora_path, cache_salt)?)
        } else {
            None
        };
        let decision = py
            .detach(|| {
                self.inner.route(&Request {
                    tokens: &tokens,
                    session: session.as_deref(),
                    lora: lora.as_deref(),
                    extras: ex.as_ref(),
                    now_ms,
                })
            })
            .or_raise(py)?;
        Ok(PyDecision { inner: decision })
    }

    /// The router's block keys of `tokens` (full blocks only), as ints.
    #[pyo3(signature = (tokens, *, lora = None, cache_salt = None, lora_path = None))]
    fn block_keys(
        &self,
        py: Python<'_>,
        tokens: &Bound<'_, PyAny>,
        lora: Option<String>,
        cache_salt: Option<String>,
        lora_path: Option<String>,
    ) -> PyResult<Vec<u64>> {
        let tokens = extract_tokens(tokens)?;
        let ex = if lora.is_some() || cache_salt.is_some() || lora_path.is_some() {
            Some(extras(py, lora, lora_path, cache_salt)?)
        } else {
            None
        };
        py.detach(|| self.inner.block_keys(&tokens, ex.as_ref())).or_raise(py)
    }

    /// Decodes a vLLM `KVEventBatch` msgpack payload and applies it for `worker` (the
    /// data-parallel rank comes from the batch). Returns the apply report as a dict
    /// (`events`, `blocks_stored`, `blocks_removed`, ...). A bad batch raises and changes
    /// nothing.
    fn apply_vllm_batch(
        &self,
        py: Python<'_>,
        worker: &str,
        payload: &Bound<'_, PyAny>,
    ) -> PyResult<Py<PyAny>> {
        let bytes = extract_bytes(payload)?.into_owned();
        let report = py.detach(|| self.inner.apply_vllm_batch(worker, &bytes)).or_raise(py)?;
        to_py_via_json(py, &report)
    }

    /// Reports that the request of `decision` was sent to its worker.
    fn on_routed(&self, py: Python<'_>, decision: &Bound<'_, PyDecision>) -> PyResult<()> {
        let d = &decision.get().inner;
        py.detach(|| self.inner.on_routed(d)).or_raise(py)
    }

    /// Reports that the first token of request `request_id` came back (prefill is done).
    fn on_first_token(&self, py: Python<'_>, request_id: u64) -> PyResult<()> {
        self.inner.on_first_token(request_id).or_raise(py)
    }

    /// Reports that request `request_id` finished or failed.
    fn on_finished(&self, py: Python<'_>, request_id: u64) -> PyResult<()> {
        py.detach(|| self.inner.on_finished(request_id)).or_raise(py)
    }

    /// Registers a worker (its name, as in vLLM's event topic, and data-parallel rank).
    /// Raises `WorkerExistsError` if it is already registered.
    #[pyo3(signature = (worker, dp_rank = 0))]
    fn add_worker(&self, py: Python<'_>, worker: &str, dp_rank: u32) -> PyResult<()> {
        self.inner.add_worker(worker, dp_rank).or_raise(py).map(drop)
    }

    /// Removes a worker with its index entries, sessions and in-flight requests.
    #[pyo3(signature = (worker, dp_rank = 0))]
    fn remove_worker(&self, py: Python<'_>, worker: &str, dp_rank: u32) -> PyResult<()> {
        py.detach(|| self.inner.remove_worker(worker, dp_rank)).or_raise(py)
    }

    /// Marks a worker healthy or not (unhealthy workers get no requests).
    #[pyo3(signature = (worker, healthy = true, *, dp_rank = 0))]
    fn set_healthy(
        &self,
        py: Python<'_>,
        worker: &str,
        healthy: bool,
        dp_rank: u32,
    ) -> PyResult<()> {
        self.inner.set_healthy(worker, dp_rank, healthy).or_raise(py)
    }

    /// Drains a worker (no new requests; it keeps its cache entries) or undrains it.
    #[pyo3(signature = (worker, draining = true, *, dp_rank = 0))]
    fn drain_worker(
        &self,
        py: Python<'_>,
        worker: &str,
        draining: bool,
        dp_rank: u32,
    ) -> PyResult<()> {
        self.inner.drain_worker(worker, dp_rank, draining).or_raise(py)
    }

    /// Pushes a load report for a worker (for example scraped from vLLM's `/metrics`):
    /// `waiting` and `running` request counts, `kv_usage` in 0..1, loaded `loras`.
    /// Fields left as None keep their previous value. `now_ms`: when it was scraped, on
    /// the routes' clock (the wall clock, or the `now_ms` given to `route`); with several
    /// router replicas, the prefill the others started there since the previous report is
    /// worked off from then (without it, from the next route).
    #[pyo3(signature = (worker, *, waiting = None, running = None, kv_usage = None, loras = None, dp_rank = 0, now_ms = None))]
    #[allow(clippy::too_many_arguments)]
    fn report_load(
        &self,
        py: Python<'_>,
        worker: &str,
        waiting: Option<u32>,
        running: Option<u32>,
        kv_usage: Option<f64>,
        loras: Option<Vec<String>>,
        dp_rank: u32,
        now_ms: Option<u64>,
    ) -> PyResult<()> {
        let report = LoadReport { waiting, running, kv_usage, loras };
        match now_ms {
            Some(t) => self.inner.report_load_at(worker, dp_rank, &report, t).or_raise(py),
            None => self.inner.report_load(worker, dp_rank, &report).or_raise(py),
        }
    }

    /// The registered workers as `(name, dp_rank)` tuples, ordered by id.
    fn workers(&self) -> Vec<(String, u32)> {
        self.inner.workers().into_iter().map(|k| (k.name, k.dp_rank)).collect()
    }

    /// Requests reported routed and not yet finished.
    fn inflight_requests(&self) -> usize {
        self.inner.inflight_requests()
    }

    /// Index statistics as a dict (`blocks`, `holder_blocks`, `nodes`, `heap_bytes`, ...).
    fn index_stats(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        to_py_via_json(py, &self.inner.index_stats())
    }

    /// The configuration as a dict (every field, defaults filled in).
    fn config(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        to_py_via_json(py, self.inner.config())
    }

    /// Serializes the index, worker names and stream positions.
    fn snapshot<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        let bytes = py.detach(|| self.inner.snapshot());
        PyBytes::new(py, &bytes)
    }

    /// Replaces the index with a snapshot's (from a router with the same block size and
    /// hash scheme). Returns the snapshot's stream positions `{publisher: seq}`. A bad
    /// snapshot raises `SnapshotError` and changes nothing.
    fn restore(&self, py: Python<'_>, data: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        let bytes = extract_bytes(data)?.into_owned();
        let positions = py.detach(|| self.inner.restore(&bytes)).or_raise(py)?;
        to_py_via_json(py, &positions)
    }

    /// The router's metrics as a dict (decisions, hit rates, per-worker counters).
    fn metrics(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        to_py_via_json(py, &self.inner.metrics())
    }

    /// The router's metrics in the Prometheus text exposition format.
    fn prometheus(&self) -> String {
        self.inner.prometheus()
    }

    fn __repr__(&self) -> String {
        format!("{:?}", self.inner)
    }
}

#[pymethods]
impl PyDecision {
    /// The id to pass to `on_first_token` and `on_finished`.
    #[getter]
    fn request_id(&self) -> u64 {
        self.inner.request_id
    }

    /// The chosen worker's name.
    #[getter]
    fn worker(&self) -> &str {
        &self.inner.worker.name
    }

    /// The chosen worker's data-parallel rank.
    #[getter]
    fn dp_rank(&self) -> u32 {
        self.inner.worker.dp_rank
    }

    /// Blocks of the prompt the chosen worker holds.
    #[getter]
    fn matched_blocks(&self) -> u32 {
        self.inner.matched_blocks
    }

    /// Full blocks in the prompt.
    #[getter]
    fn total_blocks(&self) -> u32 {
        self.inner.total_blocks
    }

    /// Tokens in the prompt.
    #[getter]
    fn prompt_tokens(&self) -> u32 {
        self.inner.prompt_tokens
    }

    /// Every candidate that passed the filters, with its scores.
    #[getter]
    fn candidates(&self) -> Vec<PyCandidate> {
        self.inner.explain().into_iter().map(|c| PyCandidate { inner: c }).collect()
    }

    /// The decision as a plain dict (candidates as dicts).
    fn to_dict(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        let d = PyDict::new(py);
        d.set_item("request_id", self.inner.request_id)?;
        d.set_item("worker", &self.inner.worker.name)?;
        d.set_item("dp_rank", self.inner.worker.dp_rank)?;
        d.set_item("matched_blocks", self.inner.matched_blocks)?;
        d.set_item("total_blocks", self.inner.total_blocks)?;
        d.set_item("prompt_tokens", self.inner.prompt_tokens)?;
        let cands = self
            .inner
            .explain()
            .iter()
            .map(|c| candidate_dict(py, c))
            .collect::<PyResult<Vec<_>>>()?;
        d.set_item("candidates", cands)?;
        Ok(d.into_any().unbind())
    }

    fn __repr__(&self) -> String {
        format!(
            "Decision(worker={:?}, dp_rank={}, request_id={}, matched_blocks={}, total_blocks={})",
            self.inner.worker.name,
            self.inner.worker.dp_rank,
            self.inner.request_id,
            self.inner.matched_blocks,
            self.inner.total_blocks
        )
    }
}

fn scores_dict<'py>(py: Python<'py>, c: &CandidateExplanation) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    for (name, v) in &c.scores {
        d.set_item(name, v)?;
    }
    Ok(d)
}

fn candidate_dict(py: Python<'_>, c: &CandidateExplanation) -> PyResult<Py<PyAny>> {
    let d = PyDict::new(py);
    d.set_item("worker", &c.worker.name)?;
    d.set_item("dp_rank", c.worker.dp_rank)?;
    d.set_item("matched_blocks", c.matched_blocks)?;
    d.set_item("matched_by_tier", c.matched_by_tier.to_vec())?;
    d.set_item("scores", scores_dict(py, c)?)?;
    d.set_item("total", c.total)?;
    Ok(d.into_any().unbind())
}

#[pymethods]
impl PyCandidate {
    /// The worker's name.
    #[getter]
    fn worker(&self) -> &str {
        &self.inner.worker.name
    }

    /// The worker's data-parallel rank.
    #[getter]
    fn dp_rank(&self) -> u32 {
        self.inner.worker.dp_rank
    }

    /// Blocks of the prompt the worker holds (longest prefix).
    #[getter]
    fn matched_blocks(&self) -> u32 {
        self.inner.matched_blocks
    }

    /// Matched blocks by best tier: `(gpu, cpu, disk)`.
    #[getter]
    fn matched_by_tier(&self) -> (u32, u32, u32) {
        let [g, c, d] = self.inner.matched_by_tier;
        (g, c, d)
    }

    /// Each scorer's score by scorer name.
    #[getter]
    fn scores<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        scores_dict(py, &self.inner)
    }

    /// The combined total score.
    #[getter]
    fn total(&self) -> f64 {
        self.inner.total
    }

    /// The candidate as a plain dict.
    fn to_dict(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        candidate_dict(py, &self.inner)
    }

    fn __repr__(&self) -> String {
        format!(
            "Candidate(worker={:?}, dp_rank={}, matched_blocks={}, total={})",
            self.inner.worker.name,
            self.inner.worker.dp_rank,
            self.inner.matched_blocks,
            self.inner.total
        )
    }
}
