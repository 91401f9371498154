//! Small shared types: block keys, workers and tiers.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A u64 naming a block *and its whole prefix* (chained hashing).
///
/// Either the engine's hash as projected into KV events, or the router's own key.
pub type BlockKey = u64;

/// A dense internal id of a worker (one KV cache: a pod, or one data-parallel rank of it).
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct WorkerId(pub u32);

impl WorkerId {
    /// The id as an index into dense per-worker arrays.
    #[inline]
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

impl fmt::Display for WorkerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// The external name of a worker: its name (the pod's `ip:port`, as in vLLM's event topic)
/// plus a data-parallel rank. Each rank has its own KV cache.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct WorkerKey {
    /// The worker's name, for example `10.0.0.7:8000`.
    pub name: String,
    /// The data-parallel rank (0 when the engine runs without data parallelism).
    #[serde(default)]
    pub dp_rank: u32,
}

impl WorkerKey {
    /// A worker key for `name` at rank `dp_rank`.
    pub fn new(name: impl Into<String>, dp_rank: u32) -> Self {
        WorkerKey { name: name.into(), dp_rank }
    }
}

impl fmt::Display for WorkerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.dp_rank == 0 {
            write!(f, "{}", self.name)
        } else {
            write!(f, "{}/dp{}", self.name, self.dp_rank)
        }
    }
}

/// Where a cached block lives on a worker. A block may sit in several tiers at once.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[repr(u8)]
pub enum Tier {
    /// GPU memory (vLLM medium `GPU`), the only tier that skips prefill outright.
    Gpu = 0,
    /// Host memory (vLLM medium `CPU`), from KV offloading.
    Cpu = 1,
    /// Local disk or other slow storage.
    Disk = 2,
}

impl Tier {
    /// All tiers, fastest first.
    pub const ALL: [Tier; 3] = [Tier::Gpu, Tier::Cpu, Tier::Disk];

    /// Parses a vLLM `medium` string, case-insensitively (`"GPU"`, `"cpu"`, `"Disk"`).
    /// `None` (a missing medium) means GPU, as in vLLM.
    pub fn from_medium(medium: Option<&str>) -> Option<Tier> {
        let Some(m) = medium else {
            return Some(Tier::Gpu);
        };
        if m.eq_ignore_ascii_case("gpu") || m.eq_ignore_ascii_case("cuda") {
            Some(Tier::Gpu)
        } else if m.eq_ignore_ascii_case("cpu") {
            Some(Tier::Cpu)
        } else if m.eq_ignore_ascii_case("disk") || m.eq_ignore_ascii_case("ssd") {
            Some(Tier::Disk)
        } else {
            None
        }
    }

    /// The tier's index (0 GPU, 1 CPU, 2 disk).
    #[inline]
    pub fn index(self) -> usize {
        self as usize
    }

    /// The tier with index `i`, if any.
    pub fn from_index(i: usize) -> Option<Tier> {
        Tier::ALL.get(i).copied()
    }

    /// The lowercase name (`gpu`, `cpu`, `disk`).
    pub fn name(self) -> &'static str {
        match self {
            Tier::Gpu => "gpu",
            Tier::Cpu => "cpu",
            Tier::Disk => "disk",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medium_parsing_is_case_insensitive() {
        assert_eq!(Tier::from_medium(Some("GPU")), Some(Tier::Gpu));
        assert_eq!(Tier::from_medium(Some("cpu")), Some(Tier::Cpu));
        assert_eq!(Tier::from_medium(Some("Disk")), Some(Tier::Disk));
        assert_eq!(Tier::from_medium(None), Some(Tier::Gpu));
        assert_eq!(Tier::from_medium(Some("tape")), None);
    }
}
