//! Conversions between Python objects and the core's inputs and outputs: token ids (lists,
//! tuples, numpy arrays, buffers, iterables), byte payloads, and JSON values.

use crate::errors::invalid;
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyByteArray, PyBytes, PyDict, PyInt, PyList, PyString, PyTuple};
use std::borrow::Cow;

/// A core JSON value as a Python object (objects become dicts, arrays lists).
pub(crate) fn json_to_py(py: Python<'_>, v: &serde_json::Value) -> PyResult<Py<PyAny>> {
    use serde_json::Value as J;
    Ok(match v {
        J::Null => py.None(),
        J::Bool(b) => PyBool::new(py, *b).to_owned().into_any().unbind(),
        J::Number(n) => {
            if let Some(u) = n.as_u64() {
                u.into_pyobject(py)?.into_any().unbind()
            } else if let Some(i) = n.as_i64() {
                i.into_pyobject(py)?.into_any().unbind()
            } else {
                n.as_f64().unwrap_or(f64::NAN).into_pyobject(py)?.into_any().unbind()
            }
        }
        J::String(s) => PyString::new(py, s).into_any().unbind(),
        J::Array(a) => {
            let items = a.iter().map(|x| json_to_py(py, x)).collect::<PyResult<Vec<_>>>()?;
            PyList::new(py, items)?.into_any().unbind()
        }
        J::Object(o) => {
            let d = PyDict::new(py);
            for (k, x) in o {
                d.set_item(k, json_to_py(py, x)?)?;
            }
            d.into_any().unbind()
        }
    })
}

/// Any serializable core value as a Python object, through its JSON form.
pub(crate) fn to_py_via_json<T: serde::Serialize>(py: Python<'_>, v: &T) -> PyResult<Py<PyAny>> {
    let j = serde_json::to_value(v)
        .map_err(|e| crate::errors::to_py(py, kvroute::Error::Internal(e.to_string())))?;
    json_to_py(py, &j)
}

/// The bytes of a `bytes`, `bytearray`, `memoryview` or other buffer object.
pub(crate) fn extract_bytes<'a>(obj: &'a Bound<'_, PyAny>) -> PyResult<Cow<'a, [u8]>> {
    if let Ok(b) = obj.cast::<PyBytes>() {
        return Ok(Cow::Borrowed(b.as_bytes()));
    }
    if let Ok(b) = obj.cast::<PyByteArray>() {
        return Ok(Cow::Owned(b.to_vec()));
    }
    let py = obj.py();
    let mv = py.import("builtins")?.getattr("memoryview")?.call1((obj,)).map_err(|_| {
        PyTypeError::new_err(format!(
            "expected bytes or a buffer, not {}",
            obj.get_type().name().map(|n| n.to_string()).unwrap_or_default()
        ))
    })?;
    let bytes = mv.call_method0("tobytes")?;
    Ok(Cow::Owned(bytes.cast_into::<PyBytes>()?.as_bytes().to_vec()))
}

/// Checks one token id.
fn check_id(py: Python<'_>, pos: usize, v: i128) -> PyResult<u32> {
    u32::try_from(v).map_err(|_| {
        if v < 0 {
            invalid(py, format!("token id {v} at position {pos} is negative"))
        } else {
            invalid(py, format!("token id {v} at position {pos} does not fit in 32 bits"))
        }
    })
}

/// One token id from a Python object.
fn item_to_id(item: &Bound<'_, PyAny>, pos: usize) -> PyResult<u32> {
    let py = item.py();
    if let Ok(v) = item.extract::<i64>() {
        return check_id(py, pos, i128::from(v));
    }
    if let Ok(v) = item.extract::<u64>() {
        return check_id(py, pos, i128::from(v));
    }
    if item.is_instance_of::<PyInt>() || item.hasattr("__index__").unwrap_or(false) {
        return Err(invalid(py, format!("token id at position {pos} does not fit in 32 bits")));
    }
    Err(PyTypeError::new_err(format!(
        "token ids must be integers; position {pos} holds a {}",
        item.get_type().name().map(|n| n.to_string()).unwrap_or_default()
    )))
}

/// Integers of one size and signedness packed in bytes.
#[derive(Clone, Copy, Debug)]
struct IntLayout {
    signed: bool,
    size: usize,
    big_endian: bool,
}

fn unpack(py: Python<'_>, bytes: &[u8], l: IntLayout) -> PyResult<Vec<u32>> {
    if !matches!(l.size, 1 | 2 | 4 | 8) || bytes.len() % l.size != 0 {
        return Err(PyTypeError::new_err(format!(
            "token buffer of {} bytes with items of {} bytes is not an integer array",
            bytes.len(),
            l.size
        )));
    }
    // Fast path: native little-endian u32, the layout the core takes.
    if !l.signed && l.size == 4 && !l.big_endian {
        return Ok(bytes
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect());
    }
    let mut out = Vec::with_capacity(bytes.len() / l.size);
    for (pos, c) in bytes.chunks_exact(l.size).enumerate() {
        let mut buf = [0u8; 8];
        let raw: u64 = if l.big_endian {
            buf[8 - l.size..].copy_from_slice(c);
            u64::from_be_bytes(buf)
        } else {
            buf[..l.size].copy_from_slice(c);
            u64::from_le_bytes(buf)
        };
        let v = if l.signed {
            // Sign-extend from `size` bytes.
            let shift = 64 - 8 * l.size as u32;
            i128::from(((raw << shift) as i64) >> shift)
        } else {
            i128::from(raw)
        };
        out.push(check_id(py, pos, v)?);
    }
    Ok(out)
}

/// The layout of a numpy dtype string such as `<i8`, `|u1` or `>u4`.
fn numpy_layout(dtype: &str) -> Option<IntLayout> {
    let b = dtype.as_bytes();
    if b.len() < 3 {
        return None;
    }
    let big_endian = match b[0] {
        b'>' => true,
        b'<' | b'|' => false,
        b'=' => cfg!(target_endian = "big"),
        _ => return None,
    };
    let signed = match b[1] {
        b'i' => true,
        b'u' => false,
        _ => return None,
    };
    let size = dtype[2..].parse().ok()?;
    Some(IntLayout { signed, size, big_endian })
}

/// The layout of a `struct` format of a memoryview (`B`, `<i`, `=q`, ...).
fn struct_layout(format: &str, itemsize: usize) -> Option<IntLayout> {
    let (big_endian, code) = match format.as_bytes() {
        [c] => (cfg!(target_endian = "big"), *c),
        [b'@' | b'=', c] => (cfg!(target_endian = "big"), *c),
        [b'<', c] => (false, *c),
        [b'>' | b'!', c] => (true, *c),
        _ => return None,
    };
    let signed = match code {
        b'b' | b'h' | b'i' | b'l' | b'q' | b'n' => true,
        b'B' | b'H' | b'I' | b'L' | b'Q' | b'N' => false,
        _ => return None,
    };
    Some(IntLayout { signed, size: itemsize, big_endian })
}

/// Token ids from a list, tuple, numpy integer array, integer buffer (`array.array`,
/// `bytes`, memoryview) or any iterable of ints.
///
/// Arrays and buffers are read with one bulk copy of their bytes (no per-element Python
/// calls). Negative ids and ids of 2**32 or more raise `InvalidInputError`; non-integers
/// raise `TypeError`.
pub(crate) fn extract_tokens(obj: &Bound<'_, PyAny>) -> PyResult<Vec<u32>> {
    let py = obj.py();
    if let Ok(list) = obj.cast::<PyList>() {
        return list.iter().enumerate().map(|(i, x)| item_to_id(&x, i)).collect();
    }
    if let Ok(t) = obj.cast::<PyTuple>() {
        return t.iter().enumerate().map(|(i, x)| item_to_id(&x, i)).collect();
    }
    if obj.is_instance_of::<PyString>() {
        return Err(PyTypeError::new_err("token ids must be a sequence of ints, not str"));
    }
    if let Ok(b) = obj.cast::<PyBytes>() {
        return Ok(b.as_bytes().iter().map(|&x| u32::from(x)).collect());
    }
    if obj.hasattr("__array_interface__")? {
        let dtype: String = obj.getattr("dtype")?.getattr("str")?.extract()?;
        let ndim: usize = obj.getattr("ndim")?.extract()?;
        let layout = numpy_layout(&dtype).ok_or_else(|| {
            PyTypeError::new_err(format!("token array must have an integer dtype, not {dtype}"))
        })?;
        if ndim != 1 {
            return Err(invalid(py, format!("token array must be 1-dimensional, not {ndim}-d")));
        }
        let bytes = obj.call_method0("tobytes")?;
        return unpack(py, bytes.cast::<PyBytes>()?.as_bytes(), layout);
    }
    let builtins = py.import("builtins")?;
    if let Ok(mv) = builtins.getattr("memoryview")?.call1((obj,)) {
        let format: String = mv.getattr("format")?.extract()?;
        let itemsize: usize = mv.getattr("itemsize")?.extract()?;
        let ndim: usize = mv.getattr("ndim")?.extract()?;
        let layout = struct_layout(&format, itemsize).ok_or_else(|| {
            PyTypeError::new_err(format!("token buffer must hold integers, not format {format:?}"))
        })?;
        if ndim != 1 {
            return Err(invalid(py, format!("token buffer must be 1-dimensional, not {ndim}-d")));
        }
        let bytes = mv.call_method0("tobytes")?;
        return unpack(py, bytes.cast::<PyBytes>()?.as_bytes(), layout);
    }
    let iter = obj.try_iter().map_err(|_| {
        PyTypeError::new_err(format!(
            "token ids must be a sequence of ints, not {}",
            obj.get_type().name().map(|n| n.to_string()).unwrap_or_default()
        ))
    })?;
    iter.enumerate().map(|(i, x)| item_to_id(&x?, i)).collect()
}
