//! The one place where raw pointers become Rust references and panics are caught.
//!
//! Every exported function is a thin wrapper around [`guard`], which runs the body under
//! `catch_unwind`, records the thread-local last error message and turns the outcome into
//! a [`kvroute_result`]. Inside the body, pointers are only touched through the helpers
//! here, each of which checks for NULL (`KVROUTE_RESULT_NULL_POINTER`), length overflow
//! and UTF-8 (`KVROUTE_RESULT_INVALID_UTF8`) before building a reference. What cannot be
//! checked (that a non-NULL pointer really points at what the caller says, and lives long
//! enough) is the caller's contract, documented on each function.

use crate::kvroute_result;
use kvroute_core::Error;
use std::cell::RefCell;
use std::ffi::{c_char, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

/// Why an exported call failed.
#[derive(Debug)]
pub(crate) enum FfiError {
    /// An error of the router itself (its code is passed through unchanged).
    Core(Error),
    /// A required pointer argument was NULL.
    Null(&'static str),
    /// A string argument was not UTF-8.
    Utf8(&'static str),
    /// A caller buffer is too small; `needed` is what it must hold.
    TooSmall {
        /// The argument.
        arg: &'static str,
        /// Elements needed.
        needed: usize,
    },
}

impl From<Error> for FfiError {
    fn from(e: Error) -> Self {
        FfiError::Core(e)
    }
}

impl FfiError {
    fn code(&self) -> kvroute_result {
        match self {
            FfiError::Core(e) => kvroute_result::from_core(e),
            FfiError::Null(_) => kvroute_result::NullPointer,
            FfiError::Utf8(_) => kvroute_result::InvalidUtf8,
            FfiError::TooSmall { .. } => kvroute_result::BufferTooSmall,
        }
    }

    fn message(&self) -> String {
        match self {
            FfiError::Core(e) => e.to_string(),
            FfiError::Null(arg) => format!("null pointer: argument `{arg}` must not be NULL"),
            FfiError::Utf8(arg) => format!("invalid UTF-8 in argument `{arg}`"),
            FfiError::TooSmall { arg, needed } => {
                format!("buffer too small: argument `{arg}` needs room for {needed} elements")
            }
        }
    }
}

/// The result of a body run by [`guard`].
pub(crate) type FfiResult<T = ()> = Result<T, FfiError>;

thread_local! {
    static LAST_ERROR: RefCell<Option<String>> = const { RefCell::new(None) };
}

fn set_last_error(msg: Option<String>) {
    // `try_with`: during thread teardown the slot may be gone; then there is nothing to keep.
    let _ = LAST_ERROR.try_with(|slot| *slot.borrow_mut() = msg);
}

/// The calling thread's last error message (empty when the last call succeeded).
pub(crate) fn last_error() -> String {
    LAST_ERROR.try_with(|slot| slot.borrow().clone().unwrap_or_default()).unwrap_or_default()
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic payload".to_string()
    }
}

/// Runs one exported call: catches panics (`KVROUTE_RESULT_PANIC`), maps errors to their
/// stable codes and records the thread-local last error message (cleared on success).
pub(crate) fn guard(name: &'static str, body: impl FnOnce() -> FfiResult) -> kvroute_result {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => {
            set_last_error(None);
            kvroute_result::Ok
        }
        Ok(Err(e)) => {
            set_last_error(Some(format!("{name}: {}", e.message())));
            e.code()
        }
        Err(payload) => {
            set_last_error(Some(format!("{name}: panic: {}", panic_message(&*payload))));
            kvroute_result::Panic
        }
    }
}

/// Runs a call that returns nothing (a `free`): panics are caught and dropped, because
/// unwinding into C is undefined behaviour and there is no result to report them through.
pub(crate) fn guard_void(body: impl FnOnce()) {
    let _ = catch_unwind(AssertUnwindSafe(body));
}

/// A shared reference from a pointer that must not be NULL.
///
/// # Safety
/// A non-NULL `ptr` must point at a live, properly aligned `T` for `'a`.
pub(crate) unsafe fn try_ref<'a, T>(ptr: *const T, arg: &'static str) -> FfiResult<&'a T> {
    // SAFETY: non-NULL checked by `as_ref`; validity is the caller's contract.
    unsafe { ptr.as_ref() }.ok_or(FfiError::Null(arg))
}

/// Checks an output pointer for NULL before any work is done.
pub(crate) fn check_out<T>(ptr: *mut T, arg: &'static str) -> FfiResult<()> {
    if ptr.is_null() {
        Err(FfiError::Null(arg))
    } else {
        Ok(())
    }
}

/// Writes `value` through an output pointer that [`check_out`] accepted.
///
/// # Safety
/// `ptr` must be non-NULL, aligned and valid for a write of `T`.
pub(crate) unsafe fn write_out<T>(ptr: *mut T, value: T, arg: &'static str) -> FfiResult<()> {
    check_out(ptr, arg)?;
    // SAFETY: non-NULL checked; validity is the caller's contract. `write` does not drop
    // the (possibly uninitialised) old value.
    unsafe { ptr.write(value) };
    Ok(())
}

/// A slice from a pointer and a length. NULL is accepted only when `len` is 0.
///
/// # Safety
/// A non-NULL `ptr` must point at `len` initialised, aligned `T`s that live for `'a`.
pub(crate) unsafe fn try_slice<'a, T>(
    ptr: *const T,
    len: usize,
    arg: &'static str,
) -> FfiResult<&'a [T]> {
    if len == 0 {
        return Ok(&[]);
    }
    if ptr.is_null() {
        return Err(FfiError::Null(arg));
    }
    if len.checked_mul(std::mem::size_of::<T>()).is_none_or(|b| b > isize::MAX as usize) {
        return Err(Error::invalid(format!("argument `{arg}`: length {len} is too large")).into());
    }
    // SAFETY: non-NULL, size checked above; validity is the caller's contract.
    Ok(unsafe { std::slice::from_raw_parts(ptr, len) })
}

/// A mutable slice from a pointer and a length (NULL only when `len` is 0).
///
/// # Safety
/// A non-NULL `ptr` must point at `len` writable, aligned `T`s, not aliased, for `'a`.
pub(crate) unsafe fn try_slice_mut<'a, T>(
    ptr: *mut T,
    len: usize,
    arg: &'static str,
) -> FfiResult<&'a mut [T]> {
    if len == 0 {
        return Ok(&mut []);
    }
    if ptr.is_null() {
        return Err(FfiError::Null(arg));
    }
    if len.checked_mul(std::mem::size_of::<T>()).is_none_or(|b| b > isize::MAX as usize) {
        return Err(Error::invalid(format!("argument `{arg}`: length {len} is too large")).into());
    }
    // SAFETY: as above.
    Ok(unsafe { std::slice::from_raw_parts_mut(ptr, len) })
}

/// A required NUL-terminated UTF-8 string.
///
/// # Safety
/// A non-NULL `ptr` must point at a NUL-terminated string that lives for `'a`.
pub(crate) unsafe fn try_str<'a>(ptr: *const c_char, arg: &'static str) -> FfiResult<&'a str> {
    // SAFETY: forwarded contract.
    unsafe { opt_str(ptr, arg) }?.ok_or(FfiError::Null(arg))
}

/// An optional NUL-terminated UTF-8 string: NULL is `None`.
///
/// # Safety
/// A non-NULL `ptr` must point at a NUL-terminated string that lives for `'a`.
pub(crate) unsafe fn opt_str<'a>(
    ptr: *const c_char,
    arg: &'static str,
) -> FfiResult<Option<&'a str>> {
    if ptr.is_null() {
        return Ok(None);
    }
    // SAFETY: non-NULL and NUL-terminated by contract.
    let c = unsafe { CStr::from_ptr(ptr) };
    c.to_str().map(Some).map_err(|_| FfiError::Utf8(arg))
}

/// Copies `s` and a NUL into a caller buffer of `len` bytes; `*out_len` receives the
/// string's length without the NUL, on success and on `KVROUTE_RESULT_BUFFER_TOO_SMALL`
/// (so the caller can retry with `out_len + 1` bytes).
///
/// # Safety
/// `buf` must be valid for `len` byte writes (or NULL with `len` 0); `out_len` must be
/// valid for a write.
pub(crate) unsafe fn copy_str_out(
    s: &str,
    buf: *mut c_char,
    len: usize,
    out_len: *mut usize,
    arg: &'static str,
) -> FfiResult<()> {
    check_out(out_len, "out_len")?;
    let needed = s.len() + 1;
    if len < needed {
        // SAFETY: checked non-NULL; the caller's contract.
        unsafe { out_len.write(s.len()) };
        return Err(FfiError::TooSmall { arg, needed });
    }
    // SAFETY: len > 0 here, so `try_slice_mut` rejects NULL; the caller's contract.
    let dst = unsafe { try_slice_mut(buf.cast::<u8>(), len, arg) }?;
    dst[..s.len()].copy_from_slice(s.as_bytes());
    dst[s.len()] = 0;
    // SAFETY: as above.
    unsafe { out_len.write(s.len()) };
    Ok(())
}

/// Moves a value to the heap and hands ownership to C.
pub(crate) fn into_handle<T>(value: T) -> *mut T {
    Box::into_raw(Box::new(value))
}

/// Takes back and drops a handle made by [`into_handle`]; NULL is a no-op.
///
/// # Safety
/// A non-NULL `ptr` must come from [`into_handle`] with the same `T` and not be freed yet.
pub(crate) unsafe fn free_handle<T>(ptr: *mut T) {
    if !ptr.is_null() {
        // SAFETY: the caller's contract: `ptr` came from `Box::into_raw`.
        drop(unsafe { Box::from_raw(ptr) });
    }
}

/// A Rust string as an owned C string (interior NULs, impossible in kvroute's output,
/// are reported as an internal error rather than truncating).
pub(crate) fn owned_c_string(s: String) -> FfiResult<*mut c_char> {
    CString::new(s)
        .map(CString::into_raw)
        .map_err(|_| Error::Internal("string with an interior NUL".into()).into())
}

/// Frees a string made by [`owned_c_string`]; NULL is a no-op.
///
/// # Safety
/// A non-NULL `ptr` must come from [`owned_c_string`] and not be freed yet.
pub(crate) unsafe fn free_c_string(ptr: *mut c_char) {
    if !ptr.is_null() {
        // SAFETY: the caller's contract: `ptr` came from `CString::into_raw`.
        drop(unsafe { CString::from_raw(ptr) });
    }
}

/// Hands a byte buffer to C as a pointer and length.
pub(crate) fn into_bytes(bytes: Vec<u8>) -> (*mut u8, usize) {
    let boxed = bytes.into_boxed_slice();
    let len = boxed.len();
    (Box::into_raw(boxed).cast::<u8>(), len)
}

/// Frees a buffer made by [`into_bytes`]; NULL is a no-op.
///
/// # Safety
/// A non-NULL `ptr` with `len` must come from [`into_bytes`] and not be freed yet.
pub(crate) unsafe fn free_bytes(ptr: *mut u8, len: usize) {
    if !ptr.is_null() {
        let slice = std::ptr::slice_from_raw_parts_mut(ptr, len);
        // SAFETY: the caller's contract: the pair came from `into_bytes`.
        drop(unsafe { Box::from_raw(slice) });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_the_panic_result_with_its_message() {
        let rc = guard("kvroute_test", || panic!("deliberate test panic"));
        assert_eq!(rc, kvroute_result::Panic);
        assert!(last_error().contains("deliberate test panic"), "{}", last_error());
        // A successful call clears the message.
        assert_eq!(guard("kvroute_test", || Ok(())), kvroute_result::Ok);
        assert_eq!(last_error(), "");
    }

    #[test]
    fn core_errors_pass_their_code_through() {
        let rc = guard("kvroute_test", || Err(Error::Internal("invariant".into()).into()));
        assert_eq!(rc, kvroute_result::Internal);
        assert!(last_error().contains("invariant"));
    }
}
