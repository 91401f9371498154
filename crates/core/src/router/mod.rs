//! The router facade (to be written: see issue 4).
