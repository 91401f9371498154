//! The positional arguments the simulator's diagnostic examples share:
//! `WORKLOAD [WORKERS] [CAPACITY_BLOCKS] [REQUESTS]` (0 or absent: the workload's default).

use kvroute_sim::SimulateSpec;

/// The workload name (default `chat`) and a spec for it from `args` (program name
/// excluded).
pub fn spec_from_args(args: &[String]) -> (String, SimulateSpec) {
    let workload = args.first().cloned().unwrap_or_else(|| "chat".into());
    let spec = SimulateSpec {
        workloads: vec![workload.clone()],
        workers: positive(args, 1),
        capacity_blocks: positive(args, 2),
        requests: positive(args, 3),
        ..Default::default()
    };
    (workload, spec)
}

/// Argument `i` as a positive number, if it is one.
fn positive<T: std::str::FromStr + PartialOrd + Default>(args: &[String], i: usize) -> Option<T> {
    args.get(i).and_then(|s| s.parse().ok()).filter(|n| *n > T::default())
}
