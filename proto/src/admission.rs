//! Admission of in-band handshakes: how many ClientHellos this node has
//! in flight, and whose turn it is to send one.
//!
//! Why: a handshake is mostly CPU, and most of it is the accepting side's
//! (key share, certificate signature) on the peer node. Started all at
//! once, a burst of handshakes shares that CPU, so each takes about as long
//! as the whole burst, and a burst larger than the CPU can key within the
//! key timeout has nearly all of them miss it. Sent a limited number at a
//! time, the admitted ones finish in time and the others wait without
//! using any CPU.
//!
//! **What a slot bounds.** A connecting side takes a slot before it sends
//! its ClientHello and gives it back when the peer's first answer arrives
//! ([`crate::socket::SocketIo`]): the slots bound the handshakes in flight,
//! sent and not yet answered, as a TCP sender's window bounds the bytes in
//! flight. The accepting side takes none: it works once the ClientHello is
//! there ([`crate::handshake`]), since the connecting node admitted it.
//! What follows the answer (the connecting side's own verification and
//! signature) needs no slot: only answers, which the slots pace, start it.
//!
//! **How many.** From one per CPU up to `handshakes_in_flight`, adapting
//! as a TCP window does: the limit grows by one per round of admitted
//! handshakes that finished within 1/[`FAST_SHARE`] of their budget (the
//! key timeout), counted from the slot to the keys
//! ([`Admission::finished`]), and shrinks by a quarter, at most once per
//! such handshake's time and never below one per CPU, when one took more
//! than 1/[`SLOW_SHARE`] of its budget or ran out of time. It learns from
//! the whole handshake rather than from the answer alone because the
//! slots do not bound this node's own work on the answers. (The
//! alternatives measured, a fixed number among them: ARCHITECTURE.md,
//! "Admission of in-band handshakes".)
//!
//! **Waiting costs nothing.** A waiter is a future parked on a channel, not
//! a thread: only admitted handshakes run on the blocking pool, which
//! waiters could otherwise fill.
//!
//! **Whose turn.** The oldest waiter while the queue keeps up, and the
//! newest once it does not (the oldest has spent more than half the time
//! it had left when it queued). A waiter with less time left than a peer
//! typically takes to answer is never admitted: it fails at once. Under
//! overload, oldest-first hands every slot to the handshake closest to its
//! deadline, which then finishes just in time or misses it with its work
//! half done; newest-first gives the slots to handshakes with their budget
//! ahead of them, and lets the ones that could not have been keyed in time
//! fail in the queue, without using the CPU (the "adaptive LIFO" of
//! overloaded servers).
//!
//! **Stalls.** A connecting side whose peer has not answered after
//! 1/[`STALL_SHARE`] of the time it had left when its slot came gives its
//! slot back, and its handshake goes on without one. Without that, slots
//! held by handshakes whose peer cannot answer yet (a blocking server the
//! gate stopped does not accept them) can wait for a handshake that has no
//! slot, until the key timeout; ARCHITECTURE.md tells how.
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

/// What a peer typically takes to answer before any peer has.
const FIRST_TYPICAL: Duration = Duration::from_millis(100);
/// A wait for the peer's first answer longer than this share of the budget
/// (a quarter) is a stall.
pub const STALL_SHARE: u32 = 4;
/// A handshake that finished within this share of its budget (an eighth)
/// lets the limit grow.
pub const FAST_SHARE: u32 = 8;
/// A handshake that took more than this share of its budget (a quarter)
/// shrinks the limit.
pub const SLOW_SHARE: u32 = 4;
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
    /// The fewest slots the limit shrinks to.
    least: NonZeroUsize,
    /// The most slots the limit grows to.
    most: NonZeroUsize,
    state: Mutex<State>,
    metrics: AdmissionMetrics,
}

#[derive(Debug)]
struct State {
    in_use: usize,
    /// How many may be in use; its floor counts, and never below 1.
    limit: f64,
    /// The limit shrinks at most once until then.
    calm_until: Instant,
    /// Waiting handshakes, oldest first.
    queue: VecDeque<Waiter>,
    next_ticket: u64,
    /// A moving average of how long a peer took to answer.
    typical: Duration,
}

#[derive(Debug)]
struct Waiter {
    ticket: u64,
    queued: Instant,
    deadline: Instant,
    /// Receives the slot; dropped unsent, the waiter is refused.
    grant: oneshot::Sender<Slot>,
}

/// What an [`Admission`] counts, for the provider's metrics endpoint.
#[derive(Debug, Clone, Default)]
pub struct AdmissionMetrics {
    /// Handshakes waiting for a slot now.
    pub waiting: Gauge,
    /// Handshakes in flight now (slots in use).
    pub in_flight: Gauge,
    /// The number of slots now.
    pub limit: Gauge,
    /// Handshakes whose budget ran out while they waited for a slot, or
    /// that were refused one because their budget left was shorter than
    /// a peer typically takes to answer.
    pub timed_out: Counter,
    /// Handshakes that gave their slot back because the peer took longer
    /// than the stall threshold to answer.
    pub stalled: Counter,
}

/// No slot could be had in time to finish before the deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "no handshake slot was free in time to finish before the deadline ({slots} handshakes in flight at once)"
)]
pub struct NoSlot {
    /// The number of slots.
    pub slots: usize,
}

impl Admission {
    /// From `least` (capped at `most`) to `most` handshakes in flight at
    /// once, starting from `least`, counted in `metrics`.
    pub fn new(least: NonZeroUsize, most: NonZeroUsize, metrics: AdmissionMetrics) -> Self {
        let start = least.min(most);
        metrics.limit.set(gauge_value(start.get()));
        Self {
            shared: Arc::new(Shared {
                least: start,
                most,
                state: Mutex::new(State {
                    in_use: 0,
                    limit: start.get() as f64,
                    calm_until: Instant::now(),
                    queue: VecDeque::new(),
                    next_ticket: 0,
                    typical: FIRST_TYPICAL,
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
    /// `deadline`; refused for lack of time, it fails at once. Dropped while
    /// it waits, it leaves the queue (and a slot it was handed meanwhile
    /// goes to the next waiter).
    pub async fn acquire(&self, deadline: Instant) -> Result<Slot, NoSlot> {
        let (ticket, granted) = {
            let mut state = self.state();
            if state.queue.is_empty() && state.in_use < state.slots() {
                state.in_use += 1;
                self.count(&state);
                return Ok(self.slot());
            }
            let ticket = state.next_ticket;
            state.next_ticket += 1;
            let (grant, granted) = oneshot::channel();
            state.queue.push_back(Waiter {
                ticket,
                queued: Instant::now(),
                deadline,
                grant,
            });
            self.count(&state);
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
                let slots = self.state().slots();
                Err(NoSlot { slots })
            }
        }
    }

    /// How long a handshake with `budget` waits for its peer's first answer
    /// before it gives its slot back: 1/[`STALL_SHARE`] of it, at least
    /// 10 ms.
    pub fn stall_after(budget: Duration) -> Duration {
        (budget / STALL_SHARE).max(STALL_AT_LEAST)
    }

    /// What it counts.
    pub fn metrics(&self) -> &AdmissionMetrics {
        &self.shared.metrics
    }

    fn slot(&self) -> Slot {
        Slot {
            admission: Some(self.clone()),
            since: Instant::now(),
        }
    }

    fn count(&self, state: &State) {
        let m = &self.shared.metrics;
        m.waiting.set(gauge_value(state.queue.len()));
        m.in_flight.set(gauge_value(state.in_use));
    }

    /// Hands free slots to waiters in turn (see the module's comment),
    /// refusing first the waiters that cannot finish in time any more.
    fn grant(&self, state: &mut State) {
        let now = Instant::now();
        let needed = state.typical;
        // Dropping a refused waiter's sender wakes it with the refusal.
        state
            .queue
            .retain(|w| w.deadline.saturating_duration_since(now) >= needed);
        while state.in_use < state.slots() {
            let overloaded = state.queue.front().is_some_and(|w| {
                now.saturating_duration_since(w.queued)
                    > w.deadline.saturating_duration_since(w.queued) / 2
            });
            let next = if overloaded {
                state.queue.pop_back()
            } else {
                state.queue.pop_front()
            };
            let Some(w) = next else {
                break;
            };
            state.in_use += 1;
            if let Err(mut unwanted) = w.grant.send(self.slot()) {
                // The waiter is gone (its request was cancelled): the slot
                // was never anyone's. Disarmed, its drop does not take the
                // lock this function runs under.
                unwanted.admission = None;
                state.in_use -= 1;
            }
        }
        self.count(state);
    }

    /// Learns from an admitted handshake that took `took` of its `budget`
    /// from its slot to its end, and ended as `finished` (see the module's
    /// comment).
    pub fn finished(&self, took: Duration, budget: Duration, finished: Finished) {
        let slow = match finished {
            Finished::Succeeded => took > budget / SLOW_SHARE,
            Finished::TimedOut => true,
            Finished::Failed => return,
        };
        let mut state = self.state();
        let now = Instant::now();
        if slow {
            if now >= state.calm_until {
                state.limit = (state.limit * 0.75).max(self.shared.least.get() as f64);
                state.calm_until = now + took;
            }
        } else if took <= budget / FAST_SHARE {
            state.limit = (state.limit + 1.0 / state.limit).min(self.shared.most.get() as f64);
        }
        self.shared.metrics.limit.set(gauge_value(state.slots()));
        // A grown limit may admit waiters now.
        self.grant(&mut state);
    }
}

/// How an admitted handshake ended, which tells the limit whether to grow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finished {
    /// Keys were derived.
    Succeeded,
    /// The budget ran out.
    TimedOut,
    /// Any other failure (the peer's doing): says nothing of the load.
    Failed,
}

impl State {
    /// The slots there are now.
    fn slots(&self) -> usize {
        // At least 1 and at most `most`, both of which fit.
        self.limit as usize
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
            self.admission.count(&state);
        }
    }
}

fn gauge_value(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// One handshake in flight; given back when dropped (the handshake failed
/// or ended before its peer answered).
#[derive(Debug)]
pub struct Slot {
    /// `None` for a slot that was never handed over (see
    /// [`Admission::grant`]).
    admission: Option<Admission>,
    since: Instant,
}

impl Slot {
    /// When it was handed over: an admitted handshake's time counts from
    /// here.
    pub fn since(&self) -> Instant {
        self.since
    }

    /// Gives the slot back because the peer answered; the typical time to
    /// answer learns from how long it took.
    pub fn answered(self) {
        if let Some(a) = &self.admission {
            let mut state = a.state();
            state.typical = (state.typical * 7 + self.since.elapsed()) / 8;
        }
    }

    /// Gives the slot back because the peer is slow to answer, counted in
    /// the metrics.
    pub fn stalled(self) {
        if let Some(a) = &self.admission {
            a.shared.metrics.stalled.inc();
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

    /// `n` slots that stay `n`.
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
        let one = a.acquire(far()).await.unwrap();
        let _two = a.acquire(far()).await.unwrap();
        let started = Instant::now();
        let e = a
            .acquire(Instant::now() + Duration::from_millis(150))
            .await
            .unwrap_err();
        assert!(started.elapsed() >= Duration::from_millis(150));
        assert_eq!(e, NoSlot { slots: 2 });
        assert_eq!(a.shared.metrics.timed_out.get(), 1);
        assert_eq!(a.shared.metrics.waiting.get(), 0);
        drop(one);
        assert!(a.acquire(far()).await.is_ok());
    }

    #[tokio::test]
    async fn waiters_are_admitted_oldest_first_while_the_queue_keeps_up() {
        let a = admission(1);
        let held = a.acquire(far()).await.unwrap();
        let (order_tx, mut order_rx) = tokio::sync::mpsc::unbounded_channel();
        let mut tasks = Vec::new();
        for i in 0..5 {
            let (mine, order_tx) = (a.clone(), order_tx.clone());
            tasks.push(tokio::spawn(async move {
                let slot = mine.acquire(far()).await.unwrap();
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
        let held = a.acquire(far()).await.unwrap();
        let (old_a, new_a) = (a.clone(), a.clone());
        let old_budget = Duration::from_millis(400);
        let old_one = tokio::spawn(async move {
            old_a
                .acquire(Instant::now() + old_budget)
                .await
                .map(|slot| slot.since)
        });
        wait_for_waiters(&a, 1).await;
        let new_one = tokio::spawn(async move { new_a.acquire(far()).await });
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
    async fn answers_teach_the_typical_time_that_waiters_must_have_left() {
        let a = admission(1);
        assert_eq!(a.metrics().in_flight.get(), 0);
        // Peers that answer in about 250 ms: the typical time goes from
        // 100 ms to about 200 ms.
        for _ in 0..8 {
            let slot = a.acquire(far()).await.unwrap();
            assert_eq!(a.metrics().in_flight.get(), 1);
            tokio::time::sleep(Duration::from_millis(250)).await;
            slot.answered();
        }
        assert_eq!(a.metrics().in_flight.get(), 0);
        let typical = a.state().typical;
        assert!(typical > Duration::from_millis(180), "{typical:?}");
        // 150 ms left when the slot frees: more than the first guess,
        // less than what peers take now.
        let held = a.acquire(far()).await.unwrap();
        let mine = a.clone();
        let short = tokio::spawn(async move {
            mine.acquire(Instant::now() + Duration::from_millis(150))
                .await
                .map(drop)
        });
        wait_for_waiters(&a, 1).await;
        drop(held);
        assert_eq!(short.await.unwrap(), Err(NoSlot { slots: 1 }));
    }

    #[tokio::test]
    async fn the_limit_grows_with_quick_handshakes_and_shrinks_to_its_floor_with_slow_ones() {
        let (least, most) = (NonZeroUsize::new(2).unwrap(), NonZeroUsize::new(8).unwrap());
        let a = Admission::new(least, most, AdmissionMetrics::default());
        let limit = |a: &Admission| a.metrics().limit.get();
        let ms = Duration::from_millis;
        let budget = ms(800);
        assert_eq!(limit(&a), 2);
        // Quick (within an eighth of the budget): +1/limit each, so +1 per
        // round of `limit` of them (2, 2.5, 2.9, 3.2, 3.6, ...).
        for _ in 0..4 {
            a.finished(ms(100), budget, Finished::Succeeded);
        }
        assert_eq!(limit(&a), 3);
        // Never past the most.
        for _ in 0..200 {
            a.finished(ms(1), budget, Finished::Succeeded);
        }
        assert_eq!(limit(&a), 8);
        // Between an eighth and a quarter: no change; failures say nothing.
        a.finished(ms(150), budget, Finished::Succeeded);
        a.finished(ms(700), budget, Finished::Failed);
        assert_eq!(limit(&a), 8);
        // Slow (more than a quarter): a quarter off, then no more cuts for
        // as long as that handshake took (three that ended together cut
        // once: three cuts would leave 3).
        for _ in 0..3 {
            a.finished(ms(250), budget, Finished::Succeeded);
        }
        assert_eq!(limit(&a), 6);
        std::thread::sleep(ms(300));
        a.finished(ms(20), budget, Finished::TimedOut);
        assert_eq!(limit(&a), 4, "6 * 0.75");
        // Never below the floor.
        for _ in 0..5 {
            std::thread::sleep(ms(25));
            a.finished(ms(20), budget, Finished::TimedOut);
        }
        assert_eq!(limit(&a), 2);
    }

    #[tokio::test]
    async fn a_grown_limit_admits_as_many_more_waiters() {
        let a = Admission::new(
            NonZeroUsize::MIN,
            NonZeroUsize::new(4).unwrap(),
            AdmissionMetrics::default(),
        );
        let held = a.acquire(far()).await.unwrap();
        let mut waiters = Vec::new();
        for i in 0..2 {
            let mine = a.clone();
            waiters.push(tokio::spawn(async move { mine.acquire(far()).await }));
            wait_for_waiters(&a, i + 1).await;
        }
        // The answer gives the slot to the first waiter; the handshake's
        // quick end takes the limit from 1 to 2, which lets the second in.
        held.answered();
        assert_eq!(a.metrics().waiting.get(), 1);
        a.finished(Duration::from_millis(1), BUDGET, Finished::Succeeded);
        assert_eq!(a.metrics().limit.get(), 2);
        assert_eq!(a.metrics().waiting.get(), 0);
        let mut slots = Vec::new();
        for w in waiters {
            slots.push(w.await.unwrap().unwrap());
        }
        assert_eq!(in_use(&a), 2);
        drop(slots);
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
        let held = a.acquire(far()).await.unwrap();
        let tasks: Vec<_> = (0..2000)
            .map(|_| {
                let mine = a.clone();
                tokio::spawn(async move { mine.acquire(far()).await.map(drop) })
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
        let held = a.acquire(far()).await.unwrap();
        // Less time left than a typical handshake (FIRST_TYPICAL) once the
        // slot is freed: refused then, rather than failed at its deadline.
        let short = Instant::now() + FIRST_TYPICAL + Duration::from_millis(20);
        let (short_a, long_a) = (a.clone(), a.clone());
        let short_one = tokio::spawn(async move {
            let r = short_a.acquire(short).await.map(drop);
            (r, Instant::now())
        });
        wait_for_waiters(&a, 1).await;
        let long_one = tokio::spawn(async move { long_a.acquire(far()).await.map(|s| s.since) });
        wait_for_waiters(&a, 2).await;
        tokio::time::sleep(Duration::from_millis(40)).await;
        let freed = Instant::now();
        drop(held);
        let (r, failed_at) = short_one.await.unwrap();
        assert_eq!(r, Err(NoSlot { slots: 1 }));
        assert!(failed_at < short, "failed only at its deadline");
        assert!(long_one.await.unwrap().unwrap() >= freed);
        assert_eq!(a.shared.metrics.timed_out.get(), 1);
        assert_eq!(a.shared.metrics.waiting.get(), 0);
        assert_eq!(in_use(&a), 0);
    }

    #[tokio::test]
    async fn a_waiter_that_gave_up_or_was_dropped_does_not_swallow_a_slot() {
        let a = admission(1);
        let held = a.acquire(far()).await.unwrap();
        assert!(
            a.acquire(Instant::now() + Duration::from_millis(10))
                .await
                .is_err()
        );
        // A cancelled request: its future dropped while it waits.
        let mine = a.clone();
        let cancelled = tokio::spawn(async move { mine.acquire(far()).await.map(drop) });
        wait_for_waiters(&a, 1).await;
        cancelled.abort();
        assert!(cancelled.await.unwrap_err().is_cancelled());
        assert_eq!(a.shared.metrics.waiting.get(), 0);
        drop(held);
        assert_eq!(in_use(&a), 0);
        // The slot went back to the pool, not to the ones that left.
        let _again = a
            .acquire(Instant::now() + Duration::from_millis(10))
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
        let held = rt.block_on(a.acquire(far())).unwrap();
        let mut waiting = Box::pin(a.acquire(far()));
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
        let held = a.acquire(far()).await.unwrap();
        {
            let mut state = a.state();
            let (grant, gone) = oneshot::channel();
            drop(gone);
            state.queue.push_back(Waiter {
                ticket: u64::MAX,
                queued: Instant::now(),
                deadline: far(),
                grant,
            });
        }
        drop(held);
        assert_eq!(in_use(&a), 0);
        assert_eq!(a.shared.metrics.waiting.get(), 0);
        let _next = a
            .acquire(Instant::now() + Duration::from_millis(10))
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
                        let slot = a.acquire(far()).await.unwrap();
                        let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
                        most.fetch_max(now, Ordering::SeqCst);
                        tokio::task::yield_now().await;
                        inside.fetch_sub(1, Ordering::SeqCst);
                        drop(slot);
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
}
