//! Admission of in-band handshakes: how many work at once per role, and
//! whose turn it is.
//!
//! Why: a handshake is mostly CPU. Started all at once, a burst of them
//! shares the CPU, so each takes about as long as the whole burst, and a
//! burst larger than the CPU can key within the key timeout has nearly all
//! of them miss it. Admitted a limited number at a time, the admitted ones
//! finish in time and the others wait without using the CPU.
//! ARCHITECTURE.md ("Where setup time goes") has what each rule here
//! changed in the benchmark.
//!
//! **How many.** An admitted handshake holds its slot through its round
//! trips, when it uses no CPU, so the right number depends on how much of
//! a handshake is CPU, which differs by library and machine: on the
//! benchmark VM a fixed 2 per role helped OpenSSL's bursts but cut
//! BoringSSL's rate, and 16 per role did the reverse. So the limit adapts,
//! as a TCP window does: it grows by one per round of handshakes that
//! finished within 1/[`FAST_SHARE`] of their budget (the key timeout), and
//! shrinks by a quarter, at most once per such handshake's time, when one
//! took more than 1/[`SLOW_SHARE`] of it or ran out of time.
//! `concurrent_handshakes` caps it.
//!
//! **Whose turn.** A handshake that gave its slot back during a stall
//! (below) comes first. Then the oldest waiter while the queue keeps up,
//! and the newest once it does not (the oldest has spent more than half
//! the time it had left when it queued). A waiter with less time left
//! than a typical handshake takes is never admitted: it fails at once.
//! Under overload, oldest-first hands every slot to the handshake closest
//! to its deadline, which then finishes just in time or misses it with
//! its work half done; newest-first gives the slots to handshakes with
//! their budget ahead of them, and lets the ones that could not have been
//! keyed in time fail in the queue, without using the CPU (the "adaptive
//! LIFO" of overloaded servers).
//!
//! **Stalls.** A wait for the peer longer than 1/[`STALL_SHARE`] of the
//! budget gives the slot back, so a peer that never answers holds a slot
//! of this node for that long, not for the whole budget, and cannot hold
//! up handshakes with other peers. When the peer's message arrives, the
//! handshake takes a slot again before it computes.
//!
//! The state is apart from any socket, so the limit, the order and the
//! deadlines are unit-tested here; [`crate::socket::SocketIo`] takes and
//! gives back the slots.

use std::collections::VecDeque;
use std::num::NonZeroUsize;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;

/// What a typical handshake takes before any admitted one has finished.
const FIRST_TYPICAL: Duration = Duration::from_millis(100);
/// A handshake that finished within this share of its budget (a quarter)
/// lets the limit grow.
pub const FAST_SHARE: u32 = 4;
/// A handshake that took more than this share of its budget (half)
/// shrinks the limit.
pub const SLOW_SHARE: u32 = 2;
/// A wait for the peer longer than this share of the budget (a quarter)
/// is a stall.
pub const STALL_SHARE: u32 = 4;
/// A stall is never shorter than this (a scheduler hiccup is not one).
const STALL_AT_LEAST: Duration = Duration::from_millis(10);

/// The slots of one role (connecting or accepting sides), shared by every
/// handshake of that role. Clones share the slots.
#[derive(Debug, Clone)]
pub struct Admission {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    most: NonZeroUsize,
    state: Mutex<State>,
    metrics: AdmissionMetrics,
}

#[derive(Debug)]
struct State {
    in_use: usize,
    /// How many may be in use; its floor counts, and never below 1.
    limit: f64,
    /// Waiting handshakes, oldest first.
    queue: VecDeque<Waiter>,
    /// Tickets handed a slot that their thread has not collected yet.
    granted: Vec<u64>,
    /// Tickets refused for lack of time, not collected yet either.
    refused: Vec<u64>,
    next_ticket: u64,
    /// A moving average of how long an admitted handshake that succeeded
    /// held its slot.
    typical: Duration,
    /// The limit shrinks at most once until then.
    calm_until: Instant,
}

#[derive(Debug)]
struct Waiter {
    ticket: u64,
    queued: Instant,
    deadline: Instant,
    /// A handshake taking a slot again after a stall.
    resuming: bool,
    /// Each waiter has its own, so a freed slot wakes exactly one thread.
    wake: Arc<Condvar>,
}

/// What an [`Admission`] counts, for the provider's metrics endpoint.
#[derive(Debug, Clone, Default)]
pub struct AdmissionMetrics {
    /// Handshakes waiting for a slot now.
    pub waiting: Gauge,
    /// The number of slots now.
    pub limit: Gauge,
    /// Handshakes that gave their slot back because the peer took longer
    /// than the stall threshold.
    pub stalled: Counter,
    /// Handshakes whose budget ran out while they waited for a slot, or
    /// that were refused one because their budget left was shorter than
    /// a typical handshake.
    pub timed_out: Counter,
}

/// No slot could be had in time to finish before the deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "no handshake slot was free in time to finish before the deadline ({limit} handshakes at once)"
)]
pub struct NoSlot {
    /// The number of slots then.
    pub limit: usize,
}

/// How an admitted handshake ended, which tells the limit whether to grow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finished {
    /// Keys were derived.
    Succeeded,
    /// The budget ran out while it held the slot.
    TimedOut,
    /// Any other failure (the peer's doing): says nothing of the load.
    Failed,
}

impl Admission {
    /// At most `most` handshakes at once, starting from `start` (capped
    /// at `most`), counted in `metrics`.
    pub fn new(most: NonZeroUsize, start: NonZeroUsize, metrics: AdmissionMetrics) -> Self {
        let start = start.min(most);
        metrics.limit.set(gauge_value(start.get()));
        Self {
            shared: Arc::new(Shared {
                most,
                state: Mutex::new(State {
                    in_use: 0,
                    limit: start.get() as f64,
                    queue: VecDeque::new(),
                    granted: Vec::new(),
                    refused: Vec::new(),
                    next_ticket: 0,
                    typical: FIRST_TYPICAL,
                    calm_until: Instant::now(),
                }),
                metrics,
            }),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // No code panics with the lock held; the counts stay whole anyway.
        self.shared
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Waits for this handshake's turn (see the module's comment) until
    /// `deadline`; refused for lack of time, it fails at once. `budget` is
    /// the handshake's whole time, which its own time is judged against.
    pub fn acquire(&self, deadline: Instant, budget: Duration) -> Result<Slot, NoSlot> {
        self.wait_turn(deadline, budget, false)
    }

    /// Like [`Self::acquire`], for a handshake that gave its slot back
    /// during a stall and now has work again: it goes first.
    pub fn resume(&self, deadline: Instant, budget: Duration) -> Result<Slot, NoSlot> {
        self.wait_turn(deadline, budget, true)
    }

    fn wait_turn(
        &self,
        deadline: Instant,
        budget: Duration,
        resuming: bool,
    ) -> Result<Slot, NoSlot> {
        let mut state = self.state();
        if state.queue.is_empty() && state.in_use < state.slots() {
            state.in_use += 1;
            return Ok(self.slot(budget));
        }
        let ticket = state.next_ticket;
        state.next_ticket += 1;
        let wake = Arc::new(Condvar::new());
        state.queue.push_back(Waiter {
            ticket,
            queued: Instant::now(),
            deadline,
            resuming,
            wake: Arc::clone(&wake),
        });
        self.shared.metrics.waiting.inc();
        loop {
            if let Some(i) = state.granted.iter().position(|&t| t == ticket) {
                state.granted.swap_remove(i);
                self.shared.metrics.waiting.dec();
                return Ok(self.slot(budget));
            }
            let refused = state.refused.iter().position(|&t| t == ticket);
            if let Some(i) = refused {
                state.refused.swap_remove(i);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if refused.is_some() || left.is_zero() {
                state.queue.retain(|w| w.ticket != ticket);
                self.shared.metrics.waiting.dec();
                self.shared.metrics.timed_out.inc();
                return Err(NoSlot {
                    limit: state.slots(),
                });
            }
            state = wake
                .wait_timeout(state, left)
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
    }

    fn slot(&self, budget: Duration) -> Slot {
        Slot {
            admission: self.clone(),
            since: Instant::now(),
            budget,
        }
    }

    /// How long one wait for the peer may last before a handshake gives
    /// its slot back: 1/[`STALL_SHARE`] of its `budget`, at least
    /// [`STALL_AT_LEAST`].
    pub fn stall_after(budget: Duration) -> Duration {
        (budget / STALL_SHARE).max(STALL_AT_LEAST)
    }

    /// Hands free slots to waiters, in turn (see the module's comment),
    /// refusing first the waiters that cannot finish in time any more.
    fn grant(&self, state: &mut State) {
        let now = Instant::now();
        let needed = state.typical;
        let State { queue, refused, .. } = state;
        queue.retain(|w| {
            let in_time = w.resuming || w.deadline.saturating_duration_since(now) >= needed;
            if !in_time {
                refused.push(w.ticket);
                w.wake.notify_one();
            }
            in_time
        });
        while state.in_use < state.slots() && !state.queue.is_empty() {
            let overloaded = state.queue.front().is_some_and(|w| {
                now.saturating_duration_since(w.queued)
                    > w.deadline.saturating_duration_since(w.queued) / 2
            });
            let next = match state.queue.iter().position(|w| w.resuming) {
                Some(i) => i,
                None if overloaded => state.queue.len() - 1,
                None => 0,
            };
            if let Some(w) = state.queue.remove(next) {
                state.in_use += 1;
                state.granted.push(w.ticket);
                w.wake.notify_one();
            }
        }
    }

    /// Learns from a handshake that held a slot for `held` of its
    /// `budget` and ended as `finished` (see the module's comment).
    fn learn(&self, state: &mut State, held: Duration, budget: Duration, finished: Finished) {
        let now = Instant::now();
        let slow = match finished {
            Finished::Succeeded => {
                state.typical = (state.typical * 7 + held) / 8;
                held > budget / SLOW_SHARE
            }
            Finished::TimedOut => true,
            Finished::Failed => return,
        };
        if slow {
            if now >= state.calm_until {
                state.limit = (state.limit * 0.75).max(1.0);
                state.calm_until = now + held;
            }
        } else if held <= budget / FAST_SHARE {
            state.limit = (state.limit + 1.0 / state.limit).min(self.shared.most.get() as f64);
        }
        self.shared.metrics.limit.set(gauge_value(state.slots()));
    }
}

impl State {
    /// The slots there are now.
    fn slots(&self) -> usize {
        // At least 1 and at most `most`, both of which fit.
        self.limit as usize
    }
}

fn gauge_value(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// One admitted handshake's slot; given back when dropped.
#[derive(Debug)]
pub struct Slot {
    admission: Admission,
    since: Instant,
    budget: Duration,
}

impl Slot {
    /// Gives the slot back after the handshake ended as `finished`, which
    /// the limit learns from.
    pub fn finished(self, finished: Finished) {
        let mut state = self.admission.state();
        self.admission
            .learn(&mut state, self.since.elapsed(), self.budget, finished);
    }

    /// Gives the slot back because the peer is slow to answer, counted in
    /// the metrics.
    pub fn stalled(self) {
        self.admission.shared.metrics.stalled.inc();
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut state = self.admission.state();
        state.in_use = state.in_use.saturating_sub(1);
        self.admission.grant(&mut state);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::thread;

    const BUDGET: Duration = Duration::from_secs(30);

    /// `n` slots that stay `n`: handshakes this fast neither grow nor
    /// shrink them past `n`.
    fn admission(n: usize) -> Admission {
        let n = NonZeroUsize::new(n).unwrap();
        Admission::new(n, n, AdmissionMetrics::default())
    }

    fn far() -> Instant {
        Instant::now() + BUDGET
    }

    fn wait_for_waiters(a: &Admission, n: i64) {
        while a.shared.metrics.waiting.get() < n {
            thread::yield_now();
        }
    }

    #[test]
    fn free_slots_are_taken_at_once_and_the_next_caller_waits() {
        let a = admission(2);
        let one = a.acquire(far(), BUDGET).unwrap();
        let _two = a.acquire(far(), BUDGET).unwrap();
        let started = Instant::now();
        let e = a
            .acquire(Instant::now() + Duration::from_millis(150), BUDGET)
            .unwrap_err();
        assert!(started.elapsed() >= Duration::from_millis(150));
        assert_eq!(e, NoSlot { limit: 2 });
        assert_eq!(a.shared.metrics.timed_out.get(), 1);
        assert_eq!(a.shared.metrics.waiting.get(), 0);
        drop(one);
        assert!(a.acquire(far(), BUDGET).is_ok());
    }

    #[test]
    fn waiters_are_admitted_oldest_first_while_the_queue_keeps_up() {
        let a = admission(1);
        let held = a.acquire(far(), BUDGET).unwrap();
        let (order_tx, order_rx) = mpsc::channel();
        let mut threads = Vec::new();
        for i in 0..5 {
            let (mine, order_tx) = (a.clone(), order_tx.clone());
            threads.push(thread::spawn(move || {
                let slot = mine.acquire(far(), BUDGET).unwrap();
                order_tx.send(i).unwrap();
                drop(slot);
            }));
            wait_for_waiters(&a, i + 1);
        }
        drop(held);
        for t in threads {
            t.join().unwrap();
        }
        let order: Vec<i64> = order_rx.try_iter().collect();
        assert_eq!(order, vec![0, 1, 2, 3, 4]);
    }

    #[test]
    fn an_overloaded_queue_admits_the_newest_first() {
        let a = admission(1);
        let held = a.acquire(far(), BUDGET).unwrap();
        let (old_a, new_a) = (a.clone(), a.clone());
        let old_budget = Duration::from_millis(400);
        let old_one = thread::spawn(move || {
            old_a
                .acquire(Instant::now() + old_budget, old_budget)
                .map(|slot| slot.since)
        });
        wait_for_waiters(&a, 1);
        let new_one = thread::spawn(move || new_a.acquire(far(), BUDGET));
        wait_for_waiters(&a, 2);
        // The oldest has now spent more than half its budget, with more
        // than a typical handshake's time still left.
        thread::sleep(old_budget / 2 + Duration::from_millis(20));
        drop(held);
        let new_slot = new_one.join().unwrap().unwrap();
        // The old one still waits while the new one holds the slot.
        assert_eq!(a.shared.metrics.waiting.get(), 1);
        let new_since = new_slot.since;
        drop(new_slot);
        if let Ok(old_since) = old_one.join().unwrap() {
            assert!(old_since > new_since);
        }
    }

    #[test]
    fn a_resuming_handshake_goes_before_older_waiters() {
        let a = admission(1);
        let held = a.acquire(far(), BUDGET).unwrap();
        let (first_a, resuming_a) = (a.clone(), a.clone());
        let first = thread::spawn(move || first_a.acquire(far(), BUDGET).map(|s| s.since));
        wait_for_waiters(&a, 1);
        let resuming = thread::spawn(move || resuming_a.resume(far(), BUDGET));
        wait_for_waiters(&a, 2);
        drop(held);
        let slot = resuming.join().unwrap().unwrap();
        assert_eq!(a.shared.metrics.waiting.get(), 1);
        let resumed_at = slot.since;
        drop(slot);
        assert!(first.join().unwrap().unwrap() > resumed_at);
    }

    #[test]
    fn a_freed_slot_is_refused_to_waiters_without_the_time_to_finish() {
        let a = admission(1);
        let held = a.acquire(far(), BUDGET).unwrap();
        // Less time left than a typical handshake (FIRST_TYPICAL) once the
        // slot is freed: refused then, rather than failed at its deadline.
        let short = Instant::now() + FIRST_TYPICAL + Duration::from_millis(20);
        let (short_a, long_a) = (a.clone(), a.clone());
        let short_one = thread::spawn(move || {
            let r = short_a.acquire(short, BUDGET).map(drop);
            (r, Instant::now())
        });
        wait_for_waiters(&a, 1);
        let long_one = thread::spawn(move || long_a.acquire(far(), BUDGET).map(|slot| slot.since));
        wait_for_waiters(&a, 2);
        thread::sleep(Duration::from_millis(40));
        let freed = Instant::now();
        drop(held);
        let (r, failed_at) = short_one.join().unwrap();
        assert_eq!(r, Err(NoSlot { limit: 1 }));
        assert!(failed_at < short, "failed only at its deadline");
        assert!(long_one.join().unwrap().unwrap() >= freed);
        assert_eq!(a.shared.metrics.timed_out.get(), 1);
        assert_eq!(a.shared.metrics.waiting.get(), 0);
        assert_eq!(a.state().in_use, 0);
    }

    #[test]
    fn a_waiter_that_gave_up_does_not_swallow_a_slot() {
        let a = admission(1);
        let held = a.acquire(far(), BUDGET).unwrap();
        assert!(
            a.acquire(Instant::now() + Duration::from_millis(10), BUDGET)
                .is_err()
        );
        drop(held);
        // The slot went back to the pool, not to the one that left.
        let _again = a
            .acquire(Instant::now() + Duration::from_millis(10), BUDGET)
            .unwrap();
    }

    #[test]
    fn many_threads_never_exceed_the_limit() {
        let a = admission(3);
        let inside = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let most = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let threads: Vec<_> = (0..16)
            .map(|_| {
                let (a, inside, most) = (a.clone(), Arc::clone(&inside), Arc::clone(&most));
                thread::spawn(move || {
                    for _ in 0..20 {
                        let slot = a.acquire(far(), BUDGET).unwrap();
                        let now = inside.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                        most.fetch_max(now, std::sync::atomic::Ordering::SeqCst);
                        thread::yield_now();
                        inside.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                        slot.finished(Finished::Succeeded);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(most.load(std::sync::atomic::Ordering::SeqCst), 3);
        assert_eq!(a.state().in_use, 0);
    }

    #[test]
    fn the_limit_grows_with_fast_handshakes_and_shrinks_with_slow_ones() {
        let most = NonZeroUsize::new(8).unwrap();
        let a = Admission::new(
            most,
            NonZeroUsize::new(2).unwrap(),
            AdmissionMetrics::default(),
        );
        assert_eq!(a.shared.metrics.limit.get(), 2);
        // Fast (well within a quarter of the budget): +1 per round, up to
        // `most`.
        for _ in 0..100 {
            a.acquire(far(), BUDGET)
                .unwrap()
                .finished(Finished::Succeeded);
        }
        assert_eq!(a.shared.metrics.limit.get(), 8);
        // Slow (more than half of a 40 ms budget): a quarter off, once
        // per such handshake's time.
        let budget = Duration::from_millis(40);
        let slow = |a: &Admission| {
            let slot = a.acquire(far(), budget).unwrap();
            thread::sleep(Duration::from_millis(25));
            slot.finished(Finished::Succeeded);
        };
        slow(&a);
        assert_eq!(a.shared.metrics.limit.get(), 6);
        // Past the calm time of the first cut (its handshake's 25 ms).
        thread::sleep(Duration::from_millis(5));
        slow(&a);
        assert_eq!(a.shared.metrics.limit.get(), 4);
        thread::sleep(Duration::from_millis(5));
        let overlapping: Vec<Slot> = (0..3).map(|_| a.acquire(far(), budget).unwrap()).collect();
        thread::sleep(Duration::from_millis(25));
        for slot in overlapping {
            slot.finished(Finished::Succeeded);
        }
        // Three slow ones that ended together: one cut (4 * 0.75).
        assert_eq!(a.shared.metrics.limit.get(), 3);
        // A time-out cuts too; other failures say nothing.
        thread::sleep(Duration::from_millis(30));
        a.acquire(far(), BUDGET).unwrap().finished(Finished::Failed);
        assert_eq!(a.shared.metrics.limit.get(), 3);
        a.acquire(far(), BUDGET)
            .unwrap()
            .finished(Finished::TimedOut);
        assert_eq!(a.shared.metrics.limit.get(), 2);
        for _ in 0..10 {
            thread::sleep(Duration::from_millis(2));
            a.acquire(far(), BUDGET)
                .unwrap()
                .finished(Finished::TimedOut);
        }
        assert_eq!(a.shared.metrics.limit.get(), 1, "never below one");
    }

    #[test]
    fn a_grown_limit_admits_as_many_more_waiters() {
        let most = NonZeroUsize::new(4).unwrap();
        let a = Admission::new(most, NonZeroUsize::MIN, AdmissionMetrics::default());
        let held = a.acquire(far(), BUDGET).unwrap();
        let waiters: Vec<_> = (0..2)
            .map(|i| {
                let mine = a.clone();
                let w = thread::spawn(move || mine.acquire(far(), BUDGET));
                wait_for_waiters(&a, i + 1);
                w
            })
            .collect();
        // One fast handshake takes the limit from 1 to 2: the slot it gives
        // back and the one the limit adds let both waiters in at once.
        held.finished(Finished::Succeeded);
        assert_eq!(a.shared.metrics.limit.get(), 2);
        let slots: Vec<Slot> = waiters
            .into_iter()
            .map(|w| w.join().unwrap().unwrap())
            .collect();
        assert_eq!(a.state().in_use, 2);
        drop(slots);
        assert_eq!(a.state().in_use, 0);
    }

    #[test]
    fn the_stall_threshold_is_a_share_of_the_budget() {
        assert_eq!(
            Admission::stall_after(Duration::from_secs(2)),
            Duration::from_millis(500)
        );
        assert_eq!(
            Admission::stall_after(Duration::from_millis(20)),
            STALL_AT_LEAST
        );
    }
}
