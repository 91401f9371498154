//! kvroute-zmq: a ZeroMQ subscriber for vLLM KV-event publishers (work in progress).
