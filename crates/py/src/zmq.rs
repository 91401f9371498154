//! `kvroute.ZmqSubscriber`: runs the `kvroute-zmq` subscriber on vLLM KV-event publishers
//! and feeds a `Router`. All ZeroMQ work (sequence tracking, gap replay, restart detection)
//! is `kvroute_zmq::Subscriber`'s; this file maps its configuration and statistics and
//! connects it to the router.

use crate::errors::{invalid, OrRaise};
use crate::router::PyRouter;
use kvroute_zmq::{PublisherConfig, PublisherStats, RouterSink, Subscriber, SubscriberConfig};
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyString};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A ZeroMQ subscriber to vLLM KV-event publishers that applies every batch to a
/// `Router`, in order and exactly once per publisher, filling gaps through the
/// publishers' replay endpoints and dropping a worker's entries when its engine restarts.
///
/// `publishers` is a list of PUB endpoints (`"tcp://10.0.0.7:5557"`) or dicts with
/// `endpoint` and optionally `replay_endpoint`, `topic` (a prefix; default `""`, every
/// topic: vLLM's default is `""`, llm-d's `kv@<pod-ip>:<port>@<model>`), `worker` (the router's worker name; default `host:port` of the endpoint) and
/// `start_seq` (replay from this sequence number on the first message, e.g. from the
/// positions `Router.restore` returned). The subscriber runs on background threads
/// (one per publisher) that never take the GIL; stop it with `shutdown()` or a `with`
/// block. Times are in seconds. A publisher connected for `idle_warning` seconds without
/// sending a batch is flagged `idle` in `stats()`. At most `max_pending` live batches are
/// buffered while a replay is in progress (more wait in the socket's queue).
#[pyclass(module = "kvroute", name = "ZmqSubscriber", frozen)]
pub(crate) struct PyZmqSubscriber {
    inner: Mutex<Option<Subscriber>>,
}

fn publisher(item: &Bound<'_, PyAny>) -> PyResult<PublisherConfig> {
    if let Ok(s) = item.cast::<PyString>() {
        return Ok(PublisherConfig::new(s.extract::<String>()?));
    }
    let d = item.cast::<PyDict>().map_err(|_| {
        PyTypeError::new_err("a publisher is an endpoint string or a dict with an \"endpoint\"")
    })?;
    for key in d.keys() {
        let k: String = key.extract()?;
        if !["endpoint", "replay_endpoint", "topic", "worker", "start_seq"].contains(&k.as_str()) {
            return Err(invalid(item.py(), format!("unknown publisher field {k:?}")));
        }
    }
    let endpoint: String = d
        .get_item("endpoint")?
        .ok_or_else(|| invalid(item.py(), "a publisher dict needs an \"endpoint\""))?
        .extract()?;
    let mut p = PublisherConfig::new(endpoint);
    if let Some(v) = d.get_item("replay_endpoint")? {
        p.replay_endpoint = v.extract()?;
    }
    if let Some(v) = d.get_item("topic")? {
        p.topic = v.extract()?;
    }
    if let Some(v) = d.get_item("worker")? {
        p.worker = v.extract()?;
    }
    if let Some(v) = d.get_item("start_seq")? {
        p.start_seq = v.extract()?;
    }
    Ok(p)
}

fn duration(py: Python<'_>, what: &str, secs: f64) -> PyResult<Duration> {
    Duration::try_from_secs_f64(secs)
        .map_err(|_| invalid(py, format!("{what} must be a non-negative number of seconds")))
}

#[pymethods]
impl PyZmqSubscriber {
    #[new]
    #[pyo3(signature = (
        router, publishers, *, replay_timeout = 2.0, rcvhwm = 10_000, poll_interval = 0.05,
        reconnect_interval = 0.1, idle_warning = 10.0, max_pending = 100_000
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        router: &Bound<'_, PyRouter>,
        publishers: &Bound<'_, PyAny>,
        replay_timeout: f64,
        rcvhwm: i32,
        poll_interval: f64,
        reconnect_interval: f64,
        idle_warning: f64,
        max_pending: usize,
    ) -> PyResult<Self> {
        let pubs = publishers.try_iter()?.map(|x| publisher(&x?)).collect::<PyResult<Vec<_>>>()?;
        let cfg = SubscriberConfig {
            publishers: pubs,
            replay_timeout: duration(py, "replay_timeout", replay_timeout)?,
            rcvhwm,
            poll_interval: duration(py, "poll_interval", poll_interval)?,
            reconnect_interval: duration(py, "reconnect_interval", reconnect_interval)?,
            idle_warning: duration(py, "idle_warning", idle_warning)?,
            max_pending,
        };
        let sink = Arc::new(RouterSink::new(Arc::clone(&router.get().inner)));
        let sub = py.detach(|| Subscriber::start(cfg, sink)).or_raise(py)?;
        Ok(PyZmqSubscriber { inner: Mutex::new(Some(sub)) })
    }

    /// Each publisher's counters, in configuration order: the fields of the Rust
    /// `kvroute_zmq::PublisherStats` (`worker`, `endpoint`, `connected`, `batches`,
    /// `last_seq`, `gaps`, `replays_ok`, `replays_failed`, `restarts`, `resets`,
    /// `sink_errors`, `last_error`, `frame_errors`, `foreign_topic`, `duplicates`,
    /// `reconnects`, `last_batch_at`, `connected_at` (seconds since the epoch or None),
    /// `idle`), as serialized there. Empty once shut down.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let stats: Vec<PublisherStats> = match self.inner.lock() {
            Ok(g) => g.as_ref().map(Subscriber::stats).unwrap_or_default(),
            Err(_) => Vec::new(),
        };
        let out = PyList::empty(py);
        for s in &stats {
            out.append(crate::convert::to_py_via_json(py, s)?)?;
        }
        Ok(out)
    }

    /// True until `shutdown()`.
    #[getter]
    fn running(&self) -> bool {
        self.inner.lock().map(|g| g.is_some()).unwrap_or(false)
    }

    /// Stops the subscriber's threads and waits for them (about one poll interval).
    /// Calling it again does nothing.
    fn shutdown(&self, py: Python<'_>) {
        let sub = self.inner.lock().ok().and_then(|mut g| g.take());
        if let Some(sub) = sub {
            py.detach(|| sub.shutdown());
        }
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(&self, py: Python<'_>, _args: &Bound<'_, pyo3::types::PyTuple>) -> bool {
        self.shutdown(py);
        false
    }
}
