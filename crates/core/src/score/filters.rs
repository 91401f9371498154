//! The built-in filters.

use super::{Candidate, Filter, RequestInfo};

/// Keeps healthy candidates only (`Candidate::healthy`).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct HealthyFilter;

impl Filter for HealthyFilter {
    fn name(&self) -> &str {
        "healthy"
    }
    fn keep(&self, _: &RequestInfo, cand: &Candidate) -> bool {
        cand.healthy
    }
}

/// When the request names a LoRA adapter, keeps only candidates that have it loaded (if none
/// has, the decision fails with [`crate::Error::NoWorkers`]); requests without an adapter
/// keep everyone.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LoraLoadedFilter;

impl Filter for LoraLoadedFilter {
    fn name(&self) -> &str {
        "lora-loaded"
    }
    fn keep(&self, req: &RequestInfo, cand: &Candidate) -> bool {
        match req.lora {
            None => true,
            Some(name) => cand.loaded_loras.contains(name),
        }
    }
}

/// Keeps candidates whose waiting queue is at most `max_waiting`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MaxQueueFilter {
    /// The longest acceptable waiting queue.
    pub max_waiting: u32,
}

impl Filter for MaxQueueFilter {
    fn name(&self) -> &str {
        "max-queue"
    }
    fn keep(&self, _: &RequestInfo, cand: &Candidate) -> bool {
        cand.load.waiting <= self.max_waiting
    }
}

#[cfg(test)]
mod tests {
    use super::super::LoraSet;
    use super::*;
    use crate::types::WorkerId;

    #[test]
    fn filters_keep_what_they_say() {
        let mut c = Candidate::new(WorkerId(0));
        let mut r = RequestInfo::default();
        assert!(HealthyFilter.keep(&r, &c));
        c.healthy = false;
        assert!(!HealthyFilter.keep(&r, &c));

        assert!(LoraLoadedFilter.keep(&r, &c));
        r.lora = Some("sql");
        assert!(!LoraLoadedFilter.keep(&r, &c));
        c.loaded_loras = LoraSet::from_names(["sql"]).unwrap();
        assert!(LoraLoadedFilter.keep(&r, &c));

        let f = MaxQueueFilter { max_waiting: 3 };
        c.load.waiting = 3;
        assert!(f.keep(&r, &c));
        c.load.waiting = 4;
        assert!(!f.keep(&r, &c));
    }
}
