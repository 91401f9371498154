//! `kvroute.KvrouteError` and one subclass per core error kind, each with the stable
//! `.code` of [`kvroute::Error::code`] and the `.kind` of [`kvroute::Error::kind_name`].
//!
//! The classes are built once per interpreter with `type(name, bases, namespace)` so that
//! a kind can also derive from the matching built-in exception (`InvalidInputError` is a
//! `ValueError`, `UnknownWorkerError` a `LookupError`, `IoError` an `OSError`).

use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyTuple, PyType};

/// The built-in exception a kind's class also derives from (besides `KvrouteError`); the
/// only Python-specific part of the table. Everything else (code, kind name, class name,
/// doc) comes from [`kvroute::ERROR_KINDS`].
fn builtin_base(kind: &str) -> Option<&'static str> {
    match kind {
        "config" | "invalid_input" | "decode" | "snapshot" => Some("ValueError"),
        "unknown_worker" => Some("LookupError"),
        "io" => Some("OSError"),
        _ => None,
    }
}

/// The class name of a kind: `invalid_input` -> `InvalidInputError`.
pub(crate) fn class_name(kind: &str) -> String {
    let mut out: String = kind.split('_').map(|w| w[..1].to_uppercase() + &w[1..]).collect();
    out.push_str("Error");
    out
}

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
        let mut kinds = Vec::with_capacity(kvroute::ERROR_KINDS.len());
        for k in &kvroute::ERROR_KINDS {
            let mut bases = vec![base.bind(py).clone().into_any()];
            if let Some(b) = builtin_base(k.name) {
                bases.push(builtins.getattr(b)?);
            }
            let name = class_name(k.name);
            kinds.push(make_class(
                py,
                &name,
                PyTuple::new(py, bases)?,
                k.description,
                k.code,
                k.name,
            )?);
        }
        Ok(Classes { base, kinds })
    })
}

/// Adds the exception classes to the module.
pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    let c = classes(py)?;
    m.add("KvrouteError", c.base.bind(py))?;
    for (k, ty) in kvroute::ERROR_KINDS.iter().zip(&c.kinds) {
        m.add(class_name(k.name), ty.bind(py))?;
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
