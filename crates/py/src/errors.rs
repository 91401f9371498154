//! `kvroute.KvrouteError` and one subclass per core error kind, each with the stable
//! `.code` of [`kvroute::Error::code`] and the `.kind` of [`kvroute::Error::kind_name`].
//!
//! The classes are built once per interpreter with `type(name, bases, namespace)` so that
//! a kind can also derive from the matching built-in exception (`InvalidInputError` is a
//! `ValueError`, `UnknownWorkerError` a `LookupError`, `IoError` an `OSError`).

use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyTuple, PyType};

/// One error kind: class name, code, kind name, built-in base (besides `KvrouteError`), doc.
struct Kind {
    name: &'static str,
    code: u32,
    kind: &'static str,
    builtin: Option<&'static str>,
    doc: &'static str,
}

/// The kinds in code order (code = index + 1), matching `kvroute::Error::code`.
const KINDS: [Kind; 13] = [
    Kind {
        name: "ConfigError",
        code: 1,
        kind: "config",
        builtin: Some("ValueError"),
        doc: "A configuration is invalid (unknown scorer, zero block size, bad JSON, ...).",
    },
    Kind {
        name: "InvalidInputError",
        code: 2,
        kind: "invalid_input",
        builtin: Some("ValueError"),
        doc: "An argument is out of range or malformed (negative token id, id >= 2**32, empty worker name, ...).",
    },
    Kind {
        name: "UnknownWorkerError",
        code: 3,
        kind: "unknown_worker",
        builtin: Some("LookupError"),
        doc: "The named worker is not known to the router.",
    },
    Kind {
        name: "WorkerExistsError",
        code: 4,
        kind: "worker_exists",
        builtin: None,
        doc: "A worker with this name and rank is already registered.",
    },
    Kind {
        name: "BlockSizeMismatchError",
        code: 5,
        kind: "block_size_mismatch",
        builtin: None,
        doc: "An event announced blocks of another size than the router's block size.",
    },
    Kind {
        name: "DecodeError",
        code: 6,
        kind: "decode",
        builtin: Some("ValueError"),
        doc: "A payload could not be decoded (malformed msgpack, truncated input, wrong types).",
    },
    Kind {
        name: "MissingSeedError",
        code: 7,
        kind: "missing_seed",
        builtin: None,
        doc: "An xxhash scheme was selected without an explicit hash seed (PYTHONHASHSEED).",
    },
    Kind {
        name: "SnapshotError",
        code: 8,
        kind: "snapshot",
        builtin: Some("ValueError"),
        doc: "A snapshot is malformed, truncated, or of an unsupported version.",
    },
    Kind {
        name: "SequenceGapError",
        code: 9,
        kind: "sequence_gap",
        builtin: None,
        doc: "Sequence numbers of an event stream skipped ahead.",
    },
    Kind {
        name: "HashMismatchError",
        code: 10,
        kind: "hash_mismatch",
        builtin: None,
        doc: "The engine's block hashes disagree with the router's own (check hash algorithm, PYTHONHASHSEED, block size).",
    },
    Kind {
        name: "NoWorkersError",
        code: 11,
        kind: "no_workers",
        builtin: None,
        doc: "No worker is available to take the request (none registered, or all filtered out).",
    },
    Kind {
        name: "IoError",
        code: 12,
        kind: "io",
        builtin: Some("OSError"),
        doc: "An I/O or transport error.",
    },
    Kind {
        name: "InternalError",
        code: 13,
        kind: "internal",
        builtin: None,
        doc: "A bug inside kvroute.",
    },
];

/// The base class and the kind classes, in code order.
struct Classes {
    base: Py<PyType>,
    kinds: Vec<Py<PyType>>,
}

static CLASSES: PyOnceLock<Classes> = PyOnceLock::new();

fn make_class(
    py: Python<'_>,
    name: &str,
    bases: Bound<'_, PyTuple>,
    doc: &str,
    code: u32,
    kind: &str,
) -> PyResult<Py<PyType>> {
    let ns = PyDict::new(py);
    ns.set_item("__module__", "kvroute")?;
    ns.set_item("__doc__", doc)?;
    ns.set_item("__qualname__", name)?;
    ns.set_item("code", code)?;
    ns.set_item("kind", kind)?;
    let builtins = py.import("builtins")?;
    let ty = builtins.getattr("type")?.call1((name, bases, ns))?;
    Ok(ty.cast_into::<PyType>()?.unbind())
}

fn classes(py: Python<'_>) -> PyResult<&'static Classes> {
    CLASSES.get_or_try_init(py, || {
        let builtins = py.import("builtins")?;
        let exception = builtins.getattr("Exception")?;
        let base = make_class(
            py,
            "KvrouteError",
            PyTuple::new(py, [exception])?,
            "The base of every kvroute error. `.code` is the stable numeric code of the \
             error kind (the same as the C ABI's), `.kind` its short name.",
            0,
            "error",
        )?;
        let mut kinds = Vec::with_capacity(KINDS.len());
        for k in &KINDS {
            let mut bases = vec![base.bind(py).clone().into_any()];
            if let Some(b) = k.builtin {
                bases.push(builtins.getattr(b)?);
            }
            kinds.push(make_class(py, k.name, PyTuple::new(py, bases)?, k.doc, k.code, k.kind)?);
        }
        Ok(Classes { base, kinds })
    })
}

/// Adds the exception classes to the module.
pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    let c = classes(py)?;
    m.add("KvrouteError", c.base.bind(py))?;
    for (k, ty) in KINDS.iter().zip(&c.kinds) {
        m.add(k.name, ty.bind(py))?;
    }
    Ok(())
}

/// The Python exception for a core error: the class of its kind, with its message.
pub(crate) fn to_py(py: Python<'_>, e: kvroute::Error) -> PyErr {
    let index = (e.code() as usize).wrapping_sub(1);
    match classes(py) {
        Ok(c) => match c.kinds.get(index) {
            Some(ty) => PyErr::from_type(ty.bind(py).clone(), e.to_string()),
            None => PyErr::from_type(c.base.bind(py).clone(), e.to_string()),
        },
        Err(err) => err,
    }
}

/// An `InvalidInputError` with a message.
pub(crate) fn invalid(py: Python<'_>, msg: impl std::fmt::Display) -> PyErr {
    to_py(py, kvroute::Error::invalid(msg))
}

/// Converts core results to Python results.
pub(crate) trait OrRaise<T> {
    /// The value, or the core error as its Python exception.
    fn or_raise(self, py: Python<'_>) -> PyResult<T>;
}

impl<T> OrRaise<T> for kvroute::Result<T> {
    fn or_raise(self, py: Python<'_>) -> PyResult<T> {
        self.map_err(|e| to_py(py, e))
    }
}
