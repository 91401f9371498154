//! Shared helpers for the kvroute benchmarks.
