module kvroute.dev/examples/proxy

go 1.22

require kvroute.dev/kvroute v0.0.0

replace kvroute.dev/kvroute => ../../crates/ffi/go
