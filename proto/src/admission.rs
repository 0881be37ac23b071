//! Admission of in-band handshakes: how many connecting sides work at
//! once, and whose turn it is.
//!
//! Why: a handshake is mostly CPU. Started all at once, a burst of them
//! shares the CPU, so each takes about as long as the whole burst, and a
//! burst larger than the CPU can key within the key timeout has nearly all
//! of them miss it. Admitted a limited number at a time, the admitted ones
//! finish in time and the others wait without using the CPU.
//!
//! **Who is admitted.** The connecting side, which starts a handshake,
//! before its ClientHello; it keeps its slot until the keys are derived.
//! The accepting side is not admitted again: it works once the ClientHello
//! arrives ([`crate::handshake`]). So the slots bound the handshakes under
//! way, and the limit adapts to their whole time, as a TCP sender's window
//! adapts to the round trip.
//!
//! **Waiting costs nothing.** A waiter is a future parked on a channel, not
//! a thread: only admitted handshakes run on the blocking pool. (A version
//! that waited on blocking threads held 512 of them with 1,000 requests at
//! once, so admitted handshakes could not get a thread while their peers'
//! waited, and the requests went unanswered for minutes; ARCHITECTURE.md,
//! "Admission of in-band handshakes".)
//!
//! **How many.** An admitted handshake holds its slot through its round
//! trips, when it uses no CPU, so the right number depends on how much of
//! a handshake is CPU, which differs by library and machine. So the limit
//! adapts, as a TCP window does: it starts at one per CPU (the caller's
//! choice), grows by one per round of handshakes that finished within
//! 1/[`FAST_SHARE`] of their budget (the key timeout), up to the cap
//! (`concurrent_handshakes`), and shrinks by a quarter, at most once per
//! such handshake's time, when one took more than 1/[`SLOW_SHARE`] of its
//! budget or ran out of time. (Starting at the cap let a burst start 32
//! handshakes at once on the 2-CPU VM, and the limit did not come down in
//! time: 4.5 connections/s where starting low kept 10.3.)
//!
//! **Whose turn.** The oldest waiter while the queue keeps up, and the
//! newest once it does not (the oldest has spent more than half the time
//! it had left when it queued). A waiter with less time left than a
//! typical handshake takes is never admitted: it fails at once. Under
//! overload, oldest-first hands every slot to the handshake closest to its
//! deadline, which then finishes just in time or misses it with its work
//! half done; newest-first gives the slots to handshakes with their budget
//! ahead of them, and lets the ones that could not have been keyed in time
//! fail in the queue, without using the CPU (the "adaptive LIFO" of
//! overloaded servers).
//!
//! **Stalls.** A connecting side that waits for its peer longer than
//! 1/[`STALL_SHARE`] of its budget gives its slot back, and takes one again,
//! ahead of every other waiter, when the peer's bytes arrive
//! ([`crate::socket::SocketIo`]). Without that, slots held by handshakes
//! whose peer cannot answer yet can wait for a handshake that has no slot:
//! a blocking server process is stopped by the gate while one of its
//! connections waits for keys, so it accepts none of the others, whose
//! accepting sides therefore cannot start; if their connecting sides hold
//! every slot and the stopped server's own connection waits in the queue,
//! nothing moves until the key timeout (seen in the VM with 8 clients, 200
//! connections and 3 slots). A stall breaks that cycle.
//!
//! The state is apart from any socket, so the limit, the order and the
//! deadlines are unit-tested here.

use std::collections::VecDeque;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::oneshot;

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

/// The slots, shared by every handshake that takes one. Clones share the
/// slots.
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
    budget: Duration,
    /// A handshake taking a slot again after a stall: it goes first, and
    /// is never refused for lack of time (its work is under way).
    resuming: bool,
    /// Receives the slot; dropped unsent, the waiter is refused.
    grant: oneshot::Sender<Slot>,
}

/// What an [`Admission`] counts, for the provider's metrics endpoint.
#[derive(Debug, Clone, Default)]
pub struct AdmissionMetrics {
    /// Handshakes waiting for a slot now.
    pub waiting: Gauge,
    /// The number of slots now.
    pub limit: Gauge,
    /// Handshakes whose budget ran out while they waited for a slot, or
    /// that were refused one because their budget left was shorter than
    /// a typical handshake.
    pub timed_out: Counter,
    /// Handshakes that gave their slot back because the peer took longer
    /// than the stall threshold.
    pub stalled: Counter,
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
    /// Dropped while it waits, it leaves the queue (and a slot it was
    /// handed meanwhile goes to the next waiter).
    pub async fn acquire(&self, deadline: Instant, budget: Duration) -> Result<Slot, NoSlot> {
        self.wait_turn(deadline, budget, false).await
    }

    /// Like [`Self::acquire`], for a handshake that gave its slot back
    /// during a stall and now has work again: it goes first.
    pub async fn resume(&self, deadline: Instant, budget: Duration) -> Result<Slot, NoSlot> {
        self.wait_turn(deadline, budget, true).await
    }

    /// How long one wait for the peer may last before a handshake gives
    /// its slot back: 1/[`STALL_SHARE`] of its `budget`, at least
    /// 10 ms.
    pub fn stall_after(budget: Duration) -> Duration {
        (budget / STALL_SHARE).max(STALL_AT_LEAST)
    }

    async fn wait_turn(
        &self,
        deadline: Instant,
        budget: Duration,
        resuming: bool,
    ) -> Result<Slot, NoSlot> {
        let (ticket, granted) = {
            let mut state = self.state();
            let first = resuming || state.queue.is_empty();
            if first && state.in_use < state.slots() {
                state.in_use += 1;
                return Ok(self.slot(budget));
            }
            let ticket = state.next_ticket;
            state.next_ticket += 1;
            let (grant, granted) = oneshot::channel();
            state.queue.push_back(Waiter {
                ticket,
                queued: Instant::now(),
                deadline,
                budget,
                resuming,
                grant,
            });
            self.count_waiting(&state);
            (ticket, granted)
        };
        let _leaves_the_queue = Queued {
            admission: self,
            ticket,
        };
        // A statement of its own: out of time, the receiver is dropped at
        // its end, and with it a slot handed over at the last moment, which
        // goes to the next waiter (its drop takes the lock, so no guard of
        // it may be alive then).
        let waited =
            tokio::time::timeout_at(tokio::time::Instant::from_std(deadline), granted).await;
        match waited {
            Ok(Ok(slot)) => Ok(slot),
            // Refused (the sender dropped unsent), or out of time.
            Ok(Err(_)) | Err(_) => {
                self.shared.metrics.timed_out.inc();
                let limit = self.state().slots();
                Err(NoSlot { limit })
            }
        }
    }

    /// What it counts.
    pub fn metrics(&self) -> &AdmissionMetrics {
        &self.shared.metrics
    }

    fn slot(&self, budget: Duration) -> Slot {
        Slot {
            admission: Some(self.clone()),
            since: Instant::now(),
            budget,
        }
    }

    fn count_waiting(&self, state: &State) {
        self.shared
            .metrics
            .waiting
            .set(gauge_value(state.queue.len()));
    }

    /// Hands free slots to waiters in turn (see the module's comment),
    /// refusing first the waiters that cannot finish in time any more.
    fn grant(&self, state: &mut State) {
        let now = Instant::now();
        let needed = state.typical;
        // Dropping a refused waiter's sender wakes it with the refusal.
        state
            .queue
            .retain(|w| w.resuming || w.deadline.saturating_duration_since(now) >= needed);
        while state.in_use < state.slots() {
            let overloaded = state.queue.front().is_some_and(|w| {
                now.saturating_duration_since(w.queued)
                    > w.deadline.saturating_duration_since(w.queued) / 2
            });
            let next = match state.queue.iter().position(|w| w.resuming) {
                Some(i) => state.queue.remove(i),
                None if overloaded => state.queue.pop_back(),
                None => state.queue.pop_front(),
            };
            let Some(w) = next else {
                break;
            };
            state.in_use += 1;
            if let Err(mut unwanted) = w.grant.send(self.slot(w.budget)) {
                // The waiter is gone (its request was cancelled): the slot
                // was never anyone's. Disarmed, its drop does not take the
                // lock this function runs under.
                unwanted.admission = None;
                state.in_use -= 1;
            }
        }
        self.count_waiting(state);
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

/// Takes a waiter's ticket out of the queue when its wait ends, however
/// it ends (a slot, a refusal, its deadline, or its future dropped).
struct Queued<'a> {
    admission: &'a Admission,
    ticket: u64,
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        let mut state = self.admission.state();
        let before = state.queue.len();
        state.queue.retain(|w| w.ticket != self.ticket);
        if state.queue.len() != before {
            self.admission.count_waiting(&state);
        }
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
    /// `None` for a slot that was never handed over (see
    /// [`Admission::grant`]).
    admission: Option<Admission>,
    since: Instant,
    budget: Duration,
}

impl Slot {
    /// Gives the slot back because the peer is slow to answer, counted in
    /// the metrics (the limit learns nothing from it).
    pub fn stalled(self) {
        if let Some(a) = &self.admission {
            a.shared.metrics.stalled.inc();
        }
    }

    /// Gives the slot back after the handshake ended as `finished`, which
    /// the limit learns from.
    pub fn finished(self, finished: Finished) {
        if let Some(a) = &self.admission {
            let mut state = a.state();
            a.learn(&mut state, self.since.elapsed(), self.budget, finished);
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(a) = self.admission.take() {
            let mut state = a.state();
            state.in_use = state.in_use.saturating_sub(1);
            a.grant(&mut state);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;

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

    async fn wait_for_waiters(a: &Admission, n: i64) {
        while a.shared.metrics.waiting.get() < n {
            tokio::task::yield_now().await;
        }
    }

    fn in_use(a: &Admission) -> usize {
        a.state().in_use
    }

    #[tokio::test]
    async fn free_slots_are_taken_at_once_and_the_next_caller_waits() {
        let a = admission(2);
        let one = a.acquire(far(), BUDGET).await.unwrap();
        let _two = a.acquire(far(), BUDGET).await.unwrap();
        let started = Instant::now();
        let e = a
            .acquire(Instant::now() + Duration::from_millis(150), BUDGET)
            .await
            .unwrap_err();
        assert!(started.elapsed() >= Duration::from_millis(150));
        assert_eq!(e, NoSlot { limit: 2 });
        assert_eq!(a.shared.metrics.timed_out.get(), 1);
        assert_eq!(a.shared.metrics.waiting.get(), 0);
        drop(one);
        assert!(a.acquire(far(), BUDGET).await.is_ok());
    }

    #[tokio::test]
    async fn waiters_are_admitted_oldest_first_while_the_queue_keeps_up() {
        let a = admission(1);
        let held = a.acquire(far(), BUDGET).await.unwrap();
        let (order_tx, mut order_rx) = tokio::sync::mpsc::unbounded_channel();
        let mut tasks = Vec::new();
        for i in 0..5 {
            let (mine, order_tx) = (a.clone(), order_tx.clone());
            tasks.push(tokio::spawn(async move {
                let slot = mine.acquire(far(), BUDGET).await.unwrap();
                order_tx.send(i).unwrap();
                drop(slot);
            }));
            wait_for_waiters(&a, i + 1).await;
        }
        drop(held);
        for t in tasks {
            t.await.unwrap();
        }
        let mut order = Vec::new();
        while let Ok(i) = order_rx.try_recv() {
            order.push(i);
        }
        assert_eq!(order, vec![0, 1, 2, 3, 4]);
    }

    #[tokio::test]
    async fn an_overloaded_queue_admits_the_newest_first() {
        let a = admission(1);
        let held = a.acquire(far(), BUDGET).await.unwrap();
        let (old_a, new_a) = (a.clone(), a.clone());
        let old_budget = Duration::from_millis(400);
        let old_one = tokio::spawn(async move {
            old_a
                .acquire(Instant::now() + old_budget, old_budget)
                .await
                .map(|slot| slot.since)
        });
        wait_for_waiters(&a, 1).await;
        let new_one = tokio::spawn(async move { new_a.acquire(far(), BUDGET).await });
        wait_for_waiters(&a, 2).await;
        // The oldest has now spent more than half its budget, with more
        // than a typical handshake's time still left.
        tokio::time::sleep(old_budget / 2 + Duration::from_millis(20)).await;
        drop(held);
        let new_slot = new_one.await.unwrap().unwrap();
        // The old one still waits while the new one holds the slot.
        assert_eq!(a.shared.metrics.waiting.get(), 1);
        let new_since = new_slot.since;
        drop(new_slot);
        // Then it is refused (too little time left) or admitted after.
        if let Ok(old_since) = old_one.await.unwrap() {
            assert!(old_since > new_since);
        }
    }

    #[tokio::test]
    async fn a_resuming_handshake_goes_before_older_waiters_and_is_never_refused() {
        let a = admission(1);
        let held = a.acquire(far(), BUDGET).await.unwrap();
        let (first_a, resuming_a) = (a.clone(), a.clone());
        let first =
            tokio::spawn(async move { first_a.acquire(far(), BUDGET).await.map(|s| s.since) });
        wait_for_waiters(&a, 1).await;
        // Less time left than a typical handshake: a new waiter would be
        // refused, a resuming one is not.
        let short = Instant::now() + FIRST_TYPICAL / 2;
        let resuming = tokio::spawn(async move { resuming_a.resume(short, BUDGET).await });
        wait_for_waiters(&a, 2).await;
        drop(held);
        let slot = resuming.await.unwrap().unwrap();
        assert_eq!(a.shared.metrics.waiting.get(), 1);
        let resumed_at = slot.since;
        slot.stalled();
        assert_eq!(a.shared.metrics.stalled.get(), 1);
        assert!(first.await.unwrap().unwrap() > resumed_at);
        assert_eq!(in_use(&a), 0);
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

    #[tokio::test]
    async fn waiting_holds_no_thread() {
        // 2,000 waiters on a current-thread runtime: they are futures.
        let a = admission(1);
        let held = a.acquire(far(), BUDGET).await.unwrap();
        let tasks: Vec<_> = (0..2000)
            .map(|_| {
                let mine = a.clone();
                tokio::spawn(async move { mine.acquire(far(), BUDGET).await.map(drop) })
            })
            .collect();
        wait_for_waiters(&a, 2000).await;
        drop(held);
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        assert_eq!(in_use(&a), 0);
        assert_eq!(a.shared.metrics.waiting.get(), 0);
    }

    #[tokio::test]
    async fn a_freed_slot_is_refused_to_waiters_without_the_time_to_finish() {
        let a = admission(1);
        let held = a.acquire(far(), BUDGET).await.unwrap();
        // Less time left than a typical handshake (FIRST_TYPICAL) once the
        // slot is freed: refused then, rather than failed at its deadline.
        let short = Instant::now() + FIRST_TYPICAL + Duration::from_millis(20);
        let (short_a, long_a) = (a.clone(), a.clone());
        let short_one = tokio::spawn(async move {
            let r = short_a.acquire(short, BUDGET).await.map(drop);
            (r, Instant::now())
        });
        wait_for_waiters(&a, 1).await;
        let long_one =
            tokio::spawn(async move { long_a.acquire(far(), BUDGET).await.map(|s| s.since) });
        wait_for_waiters(&a, 2).await;
        tokio::time::sleep(Duration::from_millis(40)).await;
        let freed = Instant::now();
        drop(held);
        let (r, failed_at) = short_one.await.unwrap();
        assert_eq!(r, Err(NoSlot { limit: 1 }));
        assert!(failed_at < short, "failed only at its deadline");
        assert!(long_one.await.unwrap().unwrap() >= freed);
        assert_eq!(a.shared.metrics.timed_out.get(), 1);
        assert_eq!(a.shared.metrics.waiting.get(), 0);
        assert_eq!(in_use(&a), 0);
    }

    #[tokio::test]
    async fn a_waiter_that_gave_up_or_was_dropped_does_not_swallow_a_slot() {
        let a = admission(1);
        let held = a.acquire(far(), BUDGET).await.unwrap();
        assert!(
            a.acquire(Instant::now() + Duration::from_millis(10), BUDGET)
                .await
                .is_err()
        );
        // A cancelled request: its future dropped while it waits.
        let mine = a.clone();
        let cancelled = tokio::spawn(async move { mine.acquire(far(), BUDGET).await.map(drop) });
        wait_for_waiters(&a, 1).await;
        cancelled.abort();
        assert!(cancelled.await.unwrap_err().is_cancelled());
        assert_eq!(a.shared.metrics.waiting.get(), 0);
        drop(held);
        assert_eq!(in_use(&a), 0);
        // The slot went back to the pool, not to the ones that left.
        let _again = a
            .acquire(Instant::now() + Duration::from_millis(10), BUDGET)
            .await
            .unwrap();
    }

    #[test]
    fn a_slot_handed_to_a_waiter_that_went_away_returns_to_the_pool() {
        // The race the channel covers: the slot is sent, and the waiter's
        // future is dropped before it reads it.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let a = admission(1);
        let held = rt.block_on(a.acquire(far(), BUDGET)).unwrap();
        let mut waiting = Box::pin(a.acquire(far(), BUDGET));
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        let _guard = rt.enter();
        assert!(waiting.as_mut().poll(&mut cx).is_pending());
        drop(held);
        // The slot now sits in the waiter's channel.
        assert_eq!(in_use(&a), 1);
        drop(waiting);
        assert_eq!(in_use(&a), 0);
        assert_eq!(a.shared.metrics.waiting.get(), 0);
    }

    #[tokio::test]
    async fn a_waiter_whose_receiver_is_gone_is_skipped() {
        // A future dropped between its receiver and its queue entry: the
        // slot meant for it is never in use.
        let a = admission(1);
        let held = a.acquire(far(), BUDGET).await.unwrap();
        {
            let mut state = a.state();
            let (grant, gone) = oneshot::channel();
            drop(gone);
            state.queue.push_back(Waiter {
                ticket: u64::MAX,
                queued: Instant::now(),
                deadline: far(),
                budget: BUDGET,
                resuming: false,
                grant,
            });
        }
        drop(held);
        assert_eq!(in_use(&a), 0);
        assert_eq!(a.shared.metrics.waiting.get(), 0);
        let _next = a
            .acquire(Instant::now() + Duration::from_millis(10), BUDGET)
            .await
            .unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn many_tasks_never_exceed_the_limit() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let a = admission(3);
        let inside = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..16)
            .map(|_| {
                let (a, inside, most) = (a.clone(), Arc::clone(&inside), Arc::clone(&most));
                tokio::spawn(async move {
                    for _ in 0..20 {
                        let slot = a.acquire(far(), BUDGET).await.unwrap();
                        let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
                        most.fetch_max(now, Ordering::SeqCst);
                        tokio::task::yield_now().await;
                        inside.fetch_sub(1, Ordering::SeqCst);
                        slot.finished(Finished::Succeeded);
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(most.load(Ordering::SeqCst), 3);
        assert_eq!(in_use(&a), 0);
    }

    #[tokio::test]
    async fn the_limit_grows_with_fast_handshakes_and_shrinks_with_slow_ones() {
        let most = NonZeroUsize::new(8).unwrap();
        let a = Admission::new(
            most,
            NonZeroUsize::new(2).unwrap(),
            AdmissionMetrics::default(),
        );
        let limit = |a: &Admission| a.shared.metrics.limit.get();
        assert_eq!(limit(&a), 2);
        // Fast (well within a quarter of the budget): +1/limit each, so +1
        // per round of `limit` of them (2, 2.5, 2.9, 3.2, 3.6, 3.8, 4.1,
        // 4.3, 4.6, 4.8, 5.0, 5.2).
        for _ in 0..11 {
            let slot = a.acquire(far(), BUDGET).await.unwrap();
            slot.finished(Finished::Succeeded);
        }
        assert_eq!(limit(&a), 5);
        // Slow (more than half of a 40 ms budget): a quarter off, once
        // per such handshake's time.
        let budget = Duration::from_millis(40);
        let slow = |a: Admission| async move {
            let slot = a.acquire(far(), budget).await.unwrap();
            tokio::time::sleep(Duration::from_millis(25)).await;
            slot.finished(Finished::Succeeded);
        };
        slow(a.clone()).await;
        assert_eq!(limit(&a), 3, "5.2 * 0.75");
        for _ in 0..3 {
            let slot = a.acquire(far(), BUDGET).await.unwrap();
            slot.finished(Finished::Succeeded);
        }
        assert_eq!(limit(&a), 4);
        // Past the calm time of the first cut (its handshake's 25 ms).
        tokio::time::sleep(Duration::from_millis(5)).await;
        let mut overlapping = Vec::new();
        for _ in 0..3 {
            overlapping.push(a.acquire(far(), budget).await.unwrap());
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
        for slot in overlapping {
            slot.finished(Finished::Succeeded);
        }
        // Three slow ones that ended together: one cut (4.x * 0.75).
        assert_eq!(limit(&a), 3);
        // A time-out cuts too; other failures say nothing.
        tokio::time::sleep(Duration::from_millis(30)).await;
        let slot = a.acquire(far(), BUDGET).await.unwrap();
        slot.finished(Finished::Failed);
        assert_eq!(limit(&a), 3);
        let slot = a.acquire(far(), BUDGET).await.unwrap();
        slot.finished(Finished::TimedOut);
        assert_eq!(limit(&a), 2);
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_millis(2)).await;
            let slot = a.acquire(far(), BUDGET).await.unwrap();
            slot.finished(Finished::TimedOut);
        }
        assert_eq!(limit(&a), 1, "never below one");
        // Fast ones never take it past `most`.
        for _ in 0..200 {
            let slot = a.acquire(far(), BUDGET).await.unwrap();
            slot.finished(Finished::Succeeded);
        }
        assert_eq!(limit(&a), 8);
    }

    #[tokio::test]
    async fn a_grown_limit_admits_as_many_more_waiters() {
        let most = NonZeroUsize::new(4).unwrap();
        let a = Admission::new(most, NonZeroUsize::MIN, AdmissionMetrics::default());
        let held = a.acquire(far(), BUDGET).await.unwrap();
        let mut waiters = Vec::new();
        for i in 0..2 {
            let mine = a.clone();
            waiters.push(tokio::spawn(
                async move { mine.acquire(far(), BUDGET).await },
            ));
            wait_for_waiters(&a, i + 1).await;
        }
        // One fast handshake takes the limit from 1 to 2: the slot it gives
        // back and the one the limit adds let both waiters in at once.
        held.finished(Finished::Succeeded);
        assert_eq!(a.shared.metrics.limit.get(), 2);
        let mut slots = Vec::new();
        for w in waiters {
            slots.push(w.await.unwrap().unwrap());
        }
        assert_eq!(in_use(&a), 2);
        drop(slots);
        assert_eq!(in_use(&a), 0);
    }
}
