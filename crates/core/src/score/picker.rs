//! The built-in pickers. All randomness comes from the caller's [`SplitMix64`], so a seeded
//! router makes reproducible choices.

use super::{Picker, TIE_EPSILON};
use crate::rng::SplitMix64;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Uniform index in `0..n` (`n > 0`).
#[inline]
fn uniform(n: usize, rng: &mut SplitMix64) -> usize {
    rng.below(n as u64) as usize
}

/// The highest total; totals within [`TIE_EPSILON`] of it are tied and one of them is chosen
/// uniformly at random, so a cold request (all totals equal) does not always land on the
/// same worker. NaN totals never win; if no total is a number, the choice is uniform.
pub fn pick_max(totals: &[f64], rng: &mut SplitMix64) -> usize {
    let n = totals.len();
    if n <= 1 {
        return 0;
    }
    let max = totals.iter().copied().filter(|x| !x.is_nan()).fold(f64::NEG_INFINITY, f64::max);
    if max == f64::NEG_INFINITY {
        return uniform(n, rng);
    }
    let tied = |x: f64| x >= max - TIE_EPSILON;
    let ties = totals.iter().filter(|&&x| tied(x)).count();
    if ties == 1 {
        return totals.iter().position(|&x| tied(x)).unwrap_or(0);
    }
    let k = uniform(ties, rng);
    totals.iter().enumerate().filter(|(_, &x)| tied(x)).nth(k).map(|(i, _)| i).unwrap_or(0)
}

/// Samples `i` with probability proportional to `weight(i)` (non-negative, finite); uniform
/// when all weights are 0.
fn pick_weighted(n: usize, weight: impl Fn(usize) -> f64, rng: &mut SplitMix64) -> usize {
    let sum: f64 = (0..n).map(&weight).sum();
    if !(sum > 0.0 && sum.is_finite()) {
        return uniform(n, rng);
    }
    let r = rng.next_f64() * sum;
    let mut acc = 0.0;
    let mut last_positive = 0;
    for i in 0..n {
        let w = weight(i);
        if w > 0.0 {
            acc += w;
            last_positive = i;
            if r < acc {
                return i;
            }
        }
    }
    // Rounding left r at the very top: the last index with weight.
    last_positive
}

/// Softmax sampling: `p_i ∝ exp((t_i - max) / temperature)`. A temperature of 0 (or below)
/// is [`pick_max`]; a very high temperature approaches uniform.
pub fn pick_softmax(totals: &[f64], temperature: f64, rng: &mut SplitMix64) -> usize {
    let n = totals.len();
    if n <= 1 {
        return 0;
    }
    if temperature.is_nan() || temperature <= 0.0 {
        return pick_max(totals, rng);
    }
    let max = totals.iter().copied().filter(|x| !x.is_nan()).fold(f64::NEG_INFINITY, f64::max);
    if max == f64::NEG_INFINITY {
        return uniform(n, rng);
    }
    let w = |i: usize| {
        let x = totals[i];
        if x.is_nan() {
            0.0
        } else {
            let e = ((x - max) / temperature).exp();
            if e.is_nan() {
                1.0 // (inf - inf) / inf: the infinite-temperature limit
            } else {
                e
            }
        }
    };
    pick_weighted(n, w, rng)
}

/// Picks the highest total, ties broken uniformly at random ([`pick_max`]).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct MaxPicker;

impl Picker for MaxPicker {
    fn name(&self) -> &str {
        "max"
    }
    fn pick(&self, totals: &[f64], rng: &mut SplitMix64) -> usize {
        pick_max(totals, rng)
    }
}

/// Samples with `p_i ∝ exp((t_i - max) / temperature)` ([`pick_softmax`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SoftmaxPicker {
    /// The temperature, in units of totals (0 = max).
    pub temperature: f64,
}

impl Picker for SoftmaxPicker {
    fn name(&self) -> &str {
        "softmax"
    }
    fn pick(&self, totals: &[f64], rng: &mut SplitMix64) -> usize {
        pick_softmax(totals, self.temperature, rng)
    }
}

/// Samples with `p_i ∝ max(t_i, 0)`; uniform when every total is 0.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct WeightedRandomPicker;

impl Picker for WeightedRandomPicker {
    fn name(&self) -> &str {
        "weighted-random"
    }
    fn pick(&self, totals: &[f64], rng: &mut SplitMix64) -> usize {
        let n = totals.len();
        if n <= 1 {
            return 0;
        }
        pick_weighted(
            n,
            |i| {
                let x = totals[i];
                if x > 0.0 && x.is_finite() {
                    x
                } else {
                    0.0
                }
            },
            rng,
        )
    }
}

/// Cycles through the candidates: the `k`-th call picks index `k mod n`, ignoring totals.
/// The counter is atomic, so a shared profile stays usable from many threads.
#[derive(Debug, Default)]
pub struct RoundRobinPicker {
    next: AtomicUsize,
}

impl RoundRobinPicker {
    /// A picker starting at index 0.
    pub fn new() -> Self {
        Self::default()
    }
}

impl Picker for RoundRobinPicker {
    fn name(&self) -> &str {
        "round-robin"
    }
    fn pick(&self, totals: &[f64], _: &mut SplitMix64) -> usize {
        let n = totals.len();
        if n == 0 {
            return 0;
        }
        self.next.fetch_add(1, Ordering::Relaxed) % n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pearson chi-square statistic of observed counts against a uniform expectation.
    fn chi_square_uniform(counts: &[u64]) -> f64 {
        let total: u64 = counts.iter().sum();
        let e = total as f64 / counts.len() as f64;
        counts.iter().map(|&c| (c as f64 - e).powi(2) / e).sum()
    }

    #[test]
    fn max_picks_the_single_best() {
        let mut rng = SplitMix64::new(1);
        assert_eq!(pick_max(&[0.1, 0.9, 0.5], &mut rng), 1);
        assert_eq!(pick_max(&[f64::NAN, 0.2, 0.1], &mut rng), 1);
        assert_eq!(pick_max(&[3.0], &mut rng), 0);
        // 1e-8 apart is not a tie.
        assert_eq!(pick_max(&[1.0, 1.0 + 1e-8], &mut rng), 1);
    }

    #[test]
    fn max_tie_break_is_uniform() {
        // Five totals within 1e-9 of the max (0.7 + 5e-10) and one lower; 50,000 seeded draws.
        let totals = [0.7, 0.7 + 5e-10, 0.2, 0.7, 0.7 - 4e-10, 0.7];
        let mut rng = SplitMix64::new(0x5EED);
        let mut counts = [0u64; 6];
        for _ in 0..50_000 {
            counts[pick_max(&totals, &mut rng)] += 1;
        }
        assert_eq!(counts[2], 0);
        let tied: Vec<u64> = [0, 1, 3, 4, 5].iter().map(|&i| counts[i]).collect();
        // 4 degrees of freedom: P(chi2 > 18.47) = 0.001.
        let chi = chi_square_uniform(&tied);
        assert!(chi < 18.47, "chi-square {chi} for {tied:?}");
    }

    #[test]
    fn softmax_low_temperature_is_argmax() {
        let totals = [0.30, 0.31, 0.10, 0.305];
        let mut rng = SplitMix64::new(3);
        for _ in 0..2_000 {
            assert_eq!(pick_softmax(&totals, 1e-4, &mut rng), 1);
            assert_eq!(pick_softmax(&totals, 0.0, &mut rng), 1);
        }
    }

    #[test]
    fn softmax_high_temperature_approaches_uniform() {
        let totals = [0.0, 1.0, 2.0, 3.0];
        let mut rng = SplitMix64::new(11);
        let mut counts = [0u64; 4];
        for _ in 0..40_000 {
            counts[pick_softmax(&totals, 1e6, &mut rng)] += 1;
        }
        // 3 degrees of freedom: P(chi2 > 16.27) = 0.001.
        let chi = chi_square_uniform(&counts);
        assert!(chi < 16.27, "chi-square {chi} for {counts:?}");
    }

    #[test]
    fn softmax_matches_its_distribution() {
        // T = 1 over [0, ln 3]: probabilities 1/4 and 3/4.
        let totals = [0.0, 3f64.ln()];
        let mut rng = SplitMix64::new(5);
        let n = 40_000;
        let ones = (0..n).filter(|_| pick_softmax(&totals, 1.0, &mut rng) == 1).count();
        let p = ones as f64 / n as f64;
        // Standard error sqrt(0.75*0.25/40000) ~ 0.0022; allow 5 sigma.
        assert!((p - 0.75).abs() < 0.011, "p = {p}");
    }

    #[test]
    fn weighted_random_follows_weights() {
        let totals = [1.0, 3.0, 0.0, -2.0];
        let mut rng = SplitMix64::new(9);
        let mut counts = [0u64; 4];
        let n = 40_000;
        for _ in 0..n {
            counts[WeightedRandomPicker.pick(&totals, &mut rng)] += 1;
        }
        assert_eq!(counts[2] + counts[3], 0);
        let p1 = counts[1] as f64 / n as f64;
        assert!((p1 - 0.75).abs() < 0.011, "p1 = {p1}");
        // All zero: uniform over everyone.
        let mut seen = [false; 3];
        for _ in 0..200 {
            seen[WeightedRandomPicker.pick(&[0.0, 0.0, 0.0], &mut rng)] = true;
        }
        assert_eq!(seen, [true; 3]);
    }

    #[test]
    fn round_robin_cycles() {
        let p = RoundRobinPicker::new();
        let mut rng = SplitMix64::new(0);
        let got: Vec<usize> = (0..7).map(|_| p.pick(&[0.0; 3], &mut rng)).collect();
        assert_eq!(got, vec![0, 1, 2, 0, 1, 2, 0]);
    }
}
