//! The recent outcomes of connections, one record each, kept so that an
//! operator can compare providers on this node's own traffic (`tlshubctl
//! ab` reads them through the admin API's `ListOutcomes`). The metrics'
//! histograms answer "how is it going"; a comparison needs the samples.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

/// How many outcomes are kept (the newest); about 3 MiB at most (48 bytes
/// each: provider names are shared, not copied per record).
pub const KEPT: usize = 65_536;

/// What happened to one connection.
#[derive(Debug, Clone, PartialEq)]
pub enum OutcomeKind {
    /// Keys installed after `key` (provider asked to keys in), on the
    /// side `role` (`"client"` or `"server"`).
    Keyed {
        /// `"client"` or `"server"`.
        role: &'static str,
        /// Provider asked to keys installed.
        key: Duration,
    },
    /// Could not be keyed.
    Failed {
        /// As in `tlshub_connections_failed_total`.
        reason: &'static str,
    },
    /// A process the gate stopped for this connection's keys was continued
    /// after `held`.
    Held {
        /// How long the process was stopped.
        held: Duration,
    },
}

/// One recorded outcome.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// 1 for the first outcome the core recorded, then one more each.
    pub seq: u64,
    /// The provider that keyed, failed or held the connection.
    pub provider: Arc<str>,
    /// What happened.
    pub kind: OutcomeKind,
}

/// The newest [`KEPT`] outcomes.
#[derive(Debug)]
pub struct OutcomeLog {
    kept: VecDeque<Outcome>,
    capacity: usize,
    last: u64,
    /// Each provider name seen, shared by its records.
    names: Vec<Arc<str>>,
}

impl Default for OutcomeLog {
    fn default() -> Self {
        Self::with_capacity(KEPT)
    }
}

/// The outcomes after a sequence number, as far as they are kept.
#[derive(Debug, PartialEq)]
pub struct Since {
    /// Oldest first, at most the number asked for.
    pub outcomes: Vec<Outcome>,
    /// More are kept after the last one returned.
    pub more: bool,
    /// Outcomes after the one asked from that are no longer kept.
    pub lost: u64,
}

impl OutcomeLog {
    /// A log keeping the newest `capacity` outcomes.
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            kept: VecDeque::with_capacity(capacity.min(1024)),
            capacity: capacity.max(1),
            last: 0,
            names: Vec::new(),
        }
    }

    /// Records an outcome of `provider`'s, dropping the oldest if full.
    pub fn record(&mut self, provider: &str, kind: OutcomeKind) {
        if self.kept.len() == self.capacity {
            self.kept.pop_front();
        }
        self.last += 1;
        let provider = match self.names.iter().find(|n| ***n == *provider) {
            Some(n) => Arc::clone(n),
            None => {
                let n: Arc<str> = Arc::from(provider);
                self.names.push(Arc::clone(&n));
                n
            }
        };
        self.kept.push_back(Outcome {
            seq: self.last,
            provider,
            kind,
        });
    }

    /// Up to `max` outcomes with a sequence number above `after`.
    pub fn since(&self, after: u64, max: usize) -> Since {
        let first = self.kept.front().map_or(self.last + 1, |o| o.seq);
        let lost = first.saturating_sub(after.saturating_add(1));
        let skip =
            usize::try_from(after.saturating_add(1).saturating_sub(first)).unwrap_or(usize::MAX);
        let available = self.kept.len().saturating_sub(skip);
        let outcomes: Vec<Outcome> = self.kept.iter().skip(skip).take(max).cloned().collect();
        Since {
            more: available > outcomes.len(),
            outcomes,
            lost,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failed(log: &mut OutcomeLog, n: usize) {
        for _ in 0..n {
            log.record("openssl", OutcomeKind::Failed { reason: "timeout" });
        }
    }

    fn seqs(s: &Since) -> Vec<u64> {
        s.outcomes.iter().map(|o| o.seq).collect()
    }

    #[test]
    fn a_reader_gets_each_outcome_once_in_order_across_pages() {
        let mut log = OutcomeLog::with_capacity(10);
        failed(&mut log, 5);
        let page = log.since(0, 3);
        assert_eq!(
            (seqs(&page), page.more, page.lost),
            (vec![1, 2, 3], true, 0)
        );
        let page = log.since(3, 3);
        assert_eq!((seqs(&page), page.more, page.lost), (vec![4, 5], false, 0));
        let page = log.since(5, 3);
        assert_eq!((seqs(&page), page.more, page.lost), (vec![], false, 0));
    }

    #[test]
    fn outcomes_dropped_before_they_were_read_are_counted_as_lost() {
        let mut log = OutcomeLog::with_capacity(4);
        failed(&mut log, 10);
        // 7..=10 kept: a reader at 2 missed 3..=6.
        let page = log.since(2, 100);
        assert_eq!((seqs(&page), page.lost), (vec![7, 8, 9, 10], 4));
        // From the start: 1..=6 gone.
        assert_eq!(log.since(0, 100).lost, 6);
        // A reader that is up to date lost nothing.
        assert_eq!(log.since(10, 100).lost, 0);
        // An empty log after records: nothing to lose.
        let empty = OutcomeLog::with_capacity(4);
        assert_eq!(
            empty.since(0, 10),
            Since {
                outcomes: vec![],
                more: false,
                lost: 0
            }
        );
    }

    #[test]
    fn a_reader_ahead_of_the_log_gets_nothing_and_no_panic() {
        let mut log = OutcomeLog::with_capacity(4);
        failed(&mut log, 2);
        assert_eq!(log.since(u64::MAX, 10).outcomes, vec![]);
        assert_eq!(log.since(99, 10).lost, 0);
    }
}
