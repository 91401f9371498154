//! `kvroute.simulate`: the simulator behind `kvroute simulate`, with the same settings
//! (`kvroute_sim::SimulateSpec`) and the same JSON result as `kvroute simulate --json`.

use crate::convert::json_to_py;
use crate::errors::OrRaise;
use pyo3::prelude::*;
use pyo3::types::PyDict;

/// Runs the simulator and returns what `kvroute simulate --json` writes: a dict
/// `{"workload", "config", "results": [{"policy", "hit_rate", "top_worker_share",
/// "ttft_p50_s", "ttft_p90_s", "ttft_p99_s", "throughput_tok_s", "requests", ...}]}` for
/// one workload, or a list of such dicts for several.
///
/// Keyword arguments are the fields of the simulation spec: `workloads` (list of `"seed"`,
/// `"shared-prefix"`, `"chat"`, `"trace:PATH"`; default seed then shared-prefix),
/// `workers`, `policies` (list of names), `model`, `gpu`, `capacity_blocks`,
/// `block_size`, `rate`, `requests`, `seed`, `event_delay`, `router_replicas`. A single `workload="..."` is
/// accepted too. Unknown names or bad values raise `ConfigError`; a malformed trace
/// raises `DecodeError` naming the line. The GIL is released while it runs.
#[pyfunction]
#[pyo3(signature = (**kwargs))]
pub(crate) fn simulate(py: Python<'_>, kwargs: Option<&Bound<'_, PyDict>>) -> PyResult<Py<PyAny>> {
    let mut spec = serde_json::Map::new();
    if let Some(kw) = kwargs {
        let json = py.import("json")?;
        for (k, v) in kw.iter() {
            let key: String = k.extract()?;
            let text: String = json.call_method1("dumps", (v,))?.extract()?;
            let value: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| pyo3::exceptions::PyTypeError::new_err(e.to_string()))?;
            if key == "workload" {
                spec.insert("workloads".into(), serde_json::Value::Array(vec![value]));
            } else {
                spec.insert(key, value);
            }
        }
    }
    let spec = kvroute_sim::SimulateSpec::from_json(&serde_json::Value::Object(spec).to_string())
        .or_raise(py)?;
    let reports = py.detach(|| kvroute_sim::simulate(&spec)).or_raise(py)?;
    // Straight to a JSON value: no text round trip, so floats stay bit-exact.
    let value = kvroute_sim::reports_json(&reports).or_raise(py)?;
    json_to_py(py, &value)
}
