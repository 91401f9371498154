//! Chained block hashing (to be written: see issue 2).
