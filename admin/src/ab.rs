//! The figures of `tlshubctl ab`: per provider, what its connections cost
//! on this node (keyed, failed by reason, key time and gate hold p50/p99
//! with 95% confidence intervals), and whether the two providers differ.
//! Only the arithmetic is here; the command alternates the providers and
//! feeds the core's outcomes in ([`AbSample::add`]).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::pb;

/// Fewer samples than this per provider: no interval and no verdict.
pub const MIN_SAMPLES: usize = 20;

/// Resamples of the bootstrap behind [`Difference`].
const RESAMPLES: usize = 2_000;

/// z for a two-sided 95% interval.
const Z95: f64 = 1.959_964;

/// One provider's outcomes collected during a run.
#[derive(Debug, Default, Clone)]
pub struct ProviderSample {
    /// Key times of the connections it keyed (ms).
    pub key_ms: Vec<f64>,
    /// How long the gate held apps on its connections (ms).
    pub hold_ms: Vec<f64>,
    /// Connections it could not key, by reason.
    pub failed: BTreeMap<String, u64>,
}

/// The outcomes of the two providers under comparison.
#[derive(Debug, Clone)]
pub struct AbSample {
    /// The providers' names, A first.
    pub names: [String; 2],
    /// Their samples, A first.
    pub samples: [ProviderSample; 2],
}

impl AbSample {
    /// Empty samples for providers `a` and `b`.
    pub fn new(a: &str, b: &str) -> Self {
        Self {
            names: [a.to_owned(), b.to_owned()],
            samples: [ProviderSample::default(), ProviderSample::default()],
        }
    }

    /// Adds one outcome from the core; outcomes of other providers (a
    /// fallback, say) are not part of the comparison and are skipped.
    pub fn add(&mut self, o: &pb::Outcome) {
        let Some(i) = self.names.iter().position(|n| *n == o.provider) else {
            return;
        };
        let s = &mut self.samples[i];
        match o.kind() {
            pb::OutcomeKind::Keyed => s.key_ms.push(o.ms),
            pb::OutcomeKind::Held => s.hold_ms.push(o.ms),
            pb::OutcomeKind::Failed => *s.failed.entry(o.reason.clone()).or_default() += 1,
            pb::OutcomeKind::Unspecified => {}
        }
    }
}

/// A quantile and its 95% confidence interval (none below
/// [`MIN_SAMPLES`], or when the sample cannot bound it).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Estimate {
    /// The sample quantile (ms).
    pub ms: f64,
    /// The interval's lower bound (ms).
    pub low_ms: Option<f64>,
    /// The interval's upper bound (ms).
    pub high_ms: Option<f64>,
}

/// p50 and p99 of one measure.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Quantiles {
    /// How many samples.
    pub count: usize,
    /// The median, if there is any sample.
    pub p50: Option<Estimate>,
    /// The 99th percentile, if there is any sample.
    pub p99: Option<Estimate>,
}

/// One provider's figures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProviderFigures {
    /// The provider.
    pub provider: String,
    /// Connections it keyed.
    pub keyed: u64,
    /// Connections it could not key, by reason.
    pub failed: BTreeMap<String, u64>,
    /// Provider asked to keys installed.
    pub key_time: Quantiles,
    /// How long the gate stopped an app for its keys.
    pub gate_hold: Quantiles,
}

/// B's median minus A's, with a 95% bootstrap interval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Difference {
    /// What is compared (`key time p50`).
    pub measure: String,
    /// B's p50 minus A's (ms); negative: B is faster.
    pub b_minus_a_ms: f64,
    /// The interval's lower bound (ms).
    pub low_ms: f64,
    /// The interval's upper bound (ms).
    pub high_ms: f64,
    /// In words.
    pub verdict: String,
}

/// What `tlshubctl ab` did and measured (its `--json` output).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AbRun {
    /// Provider A.
    pub a: String,
    /// Provider B.
    pub b: String,
    /// How long it ran.
    pub seconds: f64,
    /// How often it switched between A and B.
    pub switch_every_seconds: f64,
    /// How many times the active provider was set (the first included).
    pub switches: u32,
    /// Stopped early by SIGINT or SIGTERM.
    pub interrupted: bool,
    /// The provider active before the run, active again after it.
    pub restored: String,
    /// Outcomes the core no longer kept when they were asked for (a gap
    /// in the sample).
    pub lost: u64,
    /// The figures and their comparison.
    #[serde(flatten)]
    pub report: AbReport,
}

/// Everything `tlshubctl ab` reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AbReport {
    /// A's figures, then B's.
    pub providers: Vec<ProviderFigures>,
    /// The key time and gate hold medians compared (none with too few
    /// samples).
    pub differences: Vec<Difference>,
    /// Statements for people: each difference's verdict, or why there is
    /// none.
    pub verdicts: Vec<String>,
}

/// Quantile `q` (0..=1) of sorted `v` by linear interpolation.
fn quantile(v: &[f64], q: f64) -> f64 {
    let pos = q * (v.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    v[lo] + (v[hi] - v[lo]) * (pos - lo as f64)
}

/// Quantile `q` of sorted `v` with its distribution-free 95% interval:
/// the order statistics whose ranks bracket `n q` by z standard errors of
/// the binomial count below the quantile.
fn estimate(v: &[f64], q: f64) -> Option<Estimate> {
    if v.is_empty() {
        return None;
    }
    let n = v.len() as f64;
    let spread = Z95 * (n * q * (1.0 - q)).sqrt();
    let low_rank = (n * q - spread).floor();
    let high_rank = (n * q + spread).ceil();
    let bounded = v.len() >= MIN_SAMPLES && low_rank >= 1.0 && high_rank <= n;
    Some(Estimate {
        ms: quantile(v, q),
        low_ms: bounded.then(|| v[low_rank as usize - 1]),
        high_ms: bounded.then(|| v[high_rank as usize - 1]),
    })
}

fn quantiles(v: &[f64]) -> Quantiles {
    let mut sorted = v.to_vec();
    sorted.sort_by(f64::total_cmp);
    Quantiles {
        count: sorted.len(),
        p50: estimate(&sorted, 0.5),
        p99: estimate(&sorted, 0.99),
    }
}

/// A small deterministic generator for the bootstrap (xorshift64*), so
/// that one sample always gives the same interval.
struct Xorshift(u64);

impl Xorshift {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n as u64) as usize
    }
}

/// The median of a resample of `v` (with replacement), by selection
/// rather than sorting: a run can collect tens of thousands of samples.
fn median_of_resample(v: &[f64], rng: &mut Xorshift, scratch: &mut Vec<f64>) -> f64 {
    scratch.clear();
    scratch.extend((0..v.len()).map(|_| v[rng.below(v.len())]));
    let (mid, odd) = (scratch.len() / 2, scratch.len() % 2 == 1);
    let (lower, median, _) = scratch.select_nth_unstable_by(mid, f64::total_cmp);
    let median = *median;
    if odd {
        return median;
    }
    // Even: the mean of the two middle values (as quantile() gives).
    let below = lower.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (below + median) / 2.0
}

/// B's median minus A's with a 95% percentile-bootstrap interval, or
/// `None` with fewer than [`MIN_SAMPLES`] on either side.
fn difference(measure: &str, names: &[String; 2], a: &[f64], b: &[f64]) -> Option<Difference> {
    if a.len() < MIN_SAMPLES || b.len() < MIN_SAMPLES {
        return None;
    }
    let median = |v: &[f64]| {
        let mut s = v.to_vec();
        s.sort_by(f64::total_cmp);
        quantile(&s, 0.5)
    };
    let observed = median(b) - median(a);
    let mut rng = Xorshift(0x9e37_79b9_7f4a_7c15);
    let mut scratch = Vec::new();
    let mut diffs: Vec<f64> = (0..RESAMPLES)
        .map(|_| {
            median_of_resample(b, &mut rng, &mut scratch)
                - median_of_resample(a, &mut rng, &mut scratch)
        })
        .collect();
    diffs.sort_by(f64::total_cmp);
    let (low, high) = (quantile(&diffs, 0.025), quantile(&diffs, 0.975));
    let [a_name, b_name] = names;
    let verdict = if low > 0.0 {
        format!(
            "{measure}: {a_name} is faster than {b_name} by {observed:.2} ms (95% CI {low:.2} to {high:.2} ms)"
        )
    } else if high < 0.0 {
        format!(
            "{measure}: {b_name} is faster than {a_name} by {:.2} ms (95% CI {:.2} to {:.2} ms)",
            -observed, -high, -low
        )
    } else {
        format!(
            "{measure}: no difference detectable ({b_name} minus {a_name}: 95% CI {low:.2} to {high:.2} ms)"
        )
    };
    Some(Difference {
        measure: measure.into(),
        b_minus_a_ms: observed,
        low_ms: low,
        high_ms: high,
        verdict,
    })
}

impl AbSample {
    /// The figures and verdicts of what was collected.
    pub fn report(&self) -> AbReport {
        let providers = self
            .names
            .iter()
            .zip(&self.samples)
            .map(|(name, s)| ProviderFigures {
                provider: name.clone(),
                keyed: s.key_ms.len() as u64,
                failed: s.failed.clone(),
                key_time: quantiles(&s.key_ms),
                gate_hold: quantiles(&s.hold_ms),
            })
            .collect();
        let [a, b] = &self.samples;
        let mut differences = Vec::new();
        let mut verdicts = Vec::new();
        for (measure, a, b) in [
            ("key time p50", &a.key_ms, &b.key_ms),
            ("gate hold p50", &a.hold_ms, &b.hold_ms),
        ] {
            match difference(measure, &self.names, a, b) {
                Some(d) => {
                    verdicts.push(d.verdict.clone());
                    differences.push(d);
                }
                None => verdicts.push(format!(
                    "{measure}: too few samples to compare ({} {}, {} {}; {MIN_SAMPLES} of each needed)",
                    self.names[0],
                    a.len(),
                    self.names[1],
                    b.len()
                )),
            }
        }
        AbReport {
            providers,
            differences,
            verdicts,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(provider: &str, kind: pb::OutcomeKind, ms: f64, reason: &str) -> pb::Outcome {
        let mut o = pb::Outcome {
            provider: provider.into(),
            ms,
            reason: reason.into(),
            ..Default::default()
        };
        o.set_kind(kind);
        o
    }

    /// `n` key times spread evenly around `centre` (± 20%).
    fn keyed(s: &mut AbSample, provider: &str, centre: f64, n: usize) {
        for i in 0..n {
            let ms = centre * (0.8 + 0.4 * i as f64 / (n - 1) as f64);
            s.add(&outcome(provider, pb::OutcomeKind::Keyed, ms, ""));
        }
    }

    #[test]
    fn outcomes_are_sorted_by_provider_and_kind_and_others_are_skipped() {
        let mut s = AbSample::new("openssl", "boringssl");
        s.add(&outcome("openssl", pb::OutcomeKind::Keyed, 3.0, ""));
        s.add(&outcome("openssl", pb::OutcomeKind::Held, 4.0, ""));
        s.add(&outcome(
            "boringssl",
            pb::OutcomeKind::Failed,
            0.0,
            "timeout",
        ));
        s.add(&outcome(
            "boringssl",
            pb::OutcomeKind::Failed,
            0.0,
            "timeout",
        ));
        s.add(&outcome("tlshub", pb::OutcomeKind::Keyed, 1.0, ""));
        let r = s.report();
        assert_eq!(r.providers[0].keyed, 1);
        assert_eq!(r.providers[0].gate_hold.count, 1);
        assert_eq!(r.providers[1].keyed, 0);
        assert_eq!(r.providers[1].failed["timeout"], 2);
        assert!(r.differences.is_empty());
        assert!(
            r.verdicts[0].contains("too few samples"),
            "{:?}",
            r.verdicts
        );
    }

    #[test]
    fn a_clear_difference_names_the_faster_provider_and_its_interval_excludes_zero() {
        let mut s = AbSample::new("openssl", "boringssl");
        keyed(&mut s, "openssl", 100.0, 200);
        keyed(&mut s, "boringssl", 60.0, 200);
        let r = s.report();
        let d = &r.differences[0];
        assert!((d.b_minus_a_ms + 40.0).abs() < 1.0, "{d:?}");
        assert!(d.low_ms < d.b_minus_a_ms && d.b_minus_a_ms < d.high_ms && d.high_ms < 0.0);
        assert!(
            d.verdict
                .starts_with("key time p50: boringssl is faster than openssl by 40"),
            "{}",
            d.verdict
        );
        // The same sample, the same interval.
        assert_eq!(s.report(), r);
    }

    #[test]
    fn equal_providers_give_no_verdict_either_way() {
        let mut s = AbSample::new("openssl", "boringssl");
        keyed(&mut s, "openssl", 50.0, 101);
        keyed(&mut s, "boringssl", 50.0, 99);
        let d = &s.report().differences[0];
        assert!(d.low_ms <= 0.0 && d.high_ms >= 0.0, "{d:?}");
        assert!(
            d.verdict.contains("no difference detectable"),
            "{}",
            d.verdict
        );
    }

    #[test]
    fn a_quantile_interval_brackets_the_quantile_and_needs_enough_samples() {
        let v: Vec<f64> = (1..=1000).map(f64::from).collect();
        let p50 = estimate(&v, 0.5).unwrap();
        assert_eq!(p50.ms, 500.5);
        // ±1.96·√250 ≈ 31 ranks around 500.
        assert_eq!((p50.low_ms, p50.high_ms), (Some(469.0), Some(531.0)));
        let p99 = estimate(&v, 0.99).unwrap();
        assert!(p99.low_ms.unwrap() < p99.ms && p99.ms < p99.high_ms.unwrap());
        // p99 of 50 samples cannot be bounded from above.
        let few: Vec<f64> = (1..=50).map(f64::from).collect();
        assert_eq!(estimate(&few, 0.99).unwrap().high_ms, None);
        assert_eq!(estimate(&few[..10], 0.5).unwrap().low_ms, None);
        assert_eq!(estimate(&[], 0.5), None);
    }
}
