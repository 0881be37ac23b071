//! Which generation of a node pair's sessions keys a connection: the
//! decisions, with no I/O, so that every ordering of sessions, messages
//! and requests is unit-tested.
//!
//! The rule (ARCHITECTURE.md, "One handshake per node pair"):
//! - the connecting side keys from the newest *usable* generation and then
//!   tells the peer which one it used (a notice on the session);
//! - the accepting side keys from the generation the notice names, and
//!   waits for it, even when it holds one generation only: the two nodes'
//!   requests for one connection come in either order, and a node that
//!   holds one generation when it asks may be asked by a connection whose
//!   other end, asking a moment later, already uses the next one;
//! - a new generation becomes usable for connecting sides in two steps:
//!   the dialer, once it holds it, sends `Ready`; the acceptor, once it
//!   holds it and has read that `Ready`, uses it and answers `Ready`; the
//!   dialer uses it from that answer. So a connecting side never uses a
//!   generation its peer does not hold yet, and by the time the dialer
//!   uses the new generation the acceptor already does;
//! - a generation ends with its session's TCP connection; the dialer ends
//!   a replaced one a drain time after the new one became usable to it,
//!   when neither node's connecting side uses the old one any more.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::keys::{Generation, GenerationId, IDENTITY_LEN};

/// A session, numbered by this process.
pub type SessionId = u64;

/// How long a notice waits for its connection's request.
pub const NOTICE_TTL: Duration = Duration::from_secs(30);
/// At most this many notices are kept per peer node.
pub const MAX_NOTICES: usize = 65_536;

#[derive(Debug, Clone)]
struct Held {
    session: SessionId,
    generation: Arc<Generation>,
    usable: bool,
}

/// What the accepting side of a connection does.
#[derive(Debug)]
pub enum ServerChoice {
    /// Key from this generation.
    Use(Arc<Generation>),
    /// Wait for the connecting side's notice.
    Wait,
    /// The connecting side used a generation this node does not hold
    /// (any more): the connection cannot be keyed.
    Unknown(GenerationId),
}

/// The sessions with one peer node and the notices it sent.
#[derive(Debug, Default, Clone)]
pub struct PeerState {
    /// Oldest first.
    held: Vec<Held>,
    notices: HashMap<[u8; IDENTITY_LEN], (GenerationId, Instant)>,
}

impl PeerState {
    /// A session's handshake finished: its generation is held (and so keys
    /// accepted connections), not yet usable for connecting ones.
    pub fn add(&mut self, session: SessionId, generation: Arc<Generation>) {
        self.held.push(Held {
            session,
            generation,
            usable: false,
        });
    }

    /// The peer's `Ready` for `id` arrived on `session`: the peer holds the
    /// generation, so connecting sides may use it. False (and nothing
    /// changes) if that is not the session's generation.
    pub fn ready(&mut self, session: SessionId, id: GenerationId) -> bool {
        match self
            .held
            .iter_mut()
            .find(|h| h.session == session && h.generation.id() == id)
        {
            Some(h) => {
                h.usable = true;
                true
            }
            None => false,
        }
    }

    /// A session ended: its generation keys nothing more.
    pub fn remove(&mut self, session: SessionId) {
        self.held.retain(|h| h.session != session);
    }

    /// How many generations are held.
    pub fn generations(&self) -> usize {
        self.held.len()
    }

    /// The ids of the generations held, oldest first.
    pub fn held(&self) -> Vec<GenerationId> {
        self.held.iter().map(|h| h.generation.id()).collect()
    }

    /// Whether `session` is held and usable.
    pub fn is_usable(&self, session: SessionId) -> bool {
        self.held.iter().any(|h| h.session == session && h.usable)
    }

    /// The generation a connecting side keys from, with its session (which
    /// carries the notice): the newest usable one.
    pub fn for_client(&self) -> Option<(SessionId, Arc<Generation>)> {
        self.held
            .iter()
            .rev()
            .find(|h| h.usable)
            .map(|h| (h.session, Arc::clone(&h.generation)))
    }

    /// The generation an accepting side keys the connection `identity` from:
    /// the one the connecting side's notice names, once it is here.
    pub fn for_server(&mut self, identity: &[u8; IDENTITY_LEN]) -> ServerChoice {
        if let Some((id, _)) = self.notices.remove(identity) {
            return match self.held.iter().find(|h| h.generation.id() == id) {
                Some(h) => ServerChoice::Use(Arc::clone(&h.generation)),
                None => ServerChoice::Unknown(id),
            };
        }
        ServerChoice::Wait
    }

    /// The peer's notice: it keyed `identity` from `id`. Notices older than
    /// [`NOTICE_TTL`] are dropped; beyond [`MAX_NOTICES`] the new one is
    /// (its connection's accepting side then fails at its key timeout).
    /// False if it was dropped.
    pub fn note(&mut self, identity: [u8; IDENTITY_LEN], id: GenerationId, now: Instant) -> bool {
        if self.notices.len() >= MAX_NOTICES {
            self.notices
                .retain(|_, (_, at)| now.saturating_duration_since(*at) < NOTICE_TTL);
            if self.notices.len() >= MAX_NOTICES {
                return false;
            }
        }
        self.notices.insert(identity, (id, now));
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::CipherSuite;

    fn generation(byte: u8) -> Arc<Generation> {
        Arc::new(Generation::new(CipherSuite::Aes128Gcm, &[byte; 32]).unwrap())
    }

    fn id(g: &Arc<Generation>) -> GenerationId {
        g.id()
    }

    fn used(c: ServerChoice) -> GenerationId {
        match c {
            ServerChoice::Use(g) => g.id(),
            other => panic!("{other:?}"),
        }
    }

    const CONN: [u8; IDENTITY_LEN] = [1; IDENTITY_LEN];

    /// The first session: neither node keys a connecting side before the
    /// peer's Ready, and an accepting side waits for the notice even with
    /// one generation.
    #[test]
    fn first_session() {
        let g1 = generation(1);
        let (mut dialer, mut acceptor) = (PeerState::default(), PeerState::default());
        assert!(dialer.for_client().is_none());
        assert!(matches!(dialer.for_server(&CONN), ServerChoice::Wait));
        dialer.add(10, Arc::clone(&g1));
        assert!(dialer.for_client().is_none(), "not usable before Ready");
        assert!(matches!(dialer.for_server(&CONN), ServerChoice::Wait));
        dialer.note(CONN, id(&g1), Instant::now());
        assert_eq!(used(dialer.for_server(&CONN)), id(&g1));
        acceptor.add(20, Arc::clone(&g1));
        assert!(acceptor.for_client().is_none(), "not usable before Ready");
        assert!(!dialer.ready(10, [0; 8]), "another generation's Ready");
        assert!(!dialer.ready(11, id(&g1)), "another session's Ready");
        assert!(dialer.ready(10, id(&g1)));
        assert!(acceptor.ready(20, id(&g1)));
        let (session, g) = dialer.for_client().unwrap();
        assert_eq!((session, g.id()), (10, id(&g1)));
        assert_eq!(acceptor.for_client().unwrap().1.id(), id(&g1));
    }

    /// One change in a replacement, from both nodes' views.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Event {
        /// The dialer registers the new session.
        DialerAdds,
        /// The acceptor registers it.
        AcceptorAdds,
        /// The acceptor's Ready reaches the dialer.
        DialerReady,
        /// The dialer's Ready reaches the acceptor.
        AcceptorReady,
        /// The drain ends: the dialer drops the old session.
        DialerDrops,
        /// Its end reaches the acceptor.
        AcceptorDrops,
    }

    const EVENTS: [Event; 6] = [
        Event::DialerAdds,
        Event::AcceptorAdds,
        Event::DialerReady,
        Event::AcceptorReady,
        Event::DialerDrops,
        Event::AcceptorDrops,
    ];

    /// Whether `e` can happen after `done`: the dialer sends its Ready
    /// once it registered, and the acceptor handles it once it registered
    /// too; the acceptor answers with its own Ready then; the dialer drops
    /// the old session only once the new one is usable to it; the acceptor
    /// sees the end after the dialer.
    fn possible(e: Event, done: &[Event]) -> bool {
        use Event::*;
        let has = |x| done.contains(&x);
        !has(e)
            && match e {
                DialerAdds | AcceptorAdds => true,
                AcceptorReady => has(DialerAdds) && has(AcceptorAdds),
                DialerReady => has(AcceptorReady),
                DialerDrops => has(DialerReady),
                AcceptorDrops => has(DialerDrops),
            }
    }

    /// Every order of the events of a replacement.
    fn orders(done: &mut Vec<Event>, out: &mut Vec<Vec<Event>>) {
        if done.len() == EVENTS.len() {
            out.push(done.clone());
            return;
        }
        for e in EVENTS {
            if possible(e, done) {
                done.push(e);
                orders(done, out);
                done.pop();
            }
        }
    }

    /// Both nodes' states after the first `k` events of `order`, from one
    /// usable generation 1; generation 2 is the replacement.
    fn after(
        order: &[Event],
        k: usize,
        g1: &Arc<Generation>,
        g2: &Arc<Generation>,
    ) -> (PeerState, PeerState) {
        let (mut d, mut a) = (PeerState::default(), PeerState::default());
        d.add(1, Arc::clone(g1));
        a.add(1, Arc::clone(g1));
        d.ready(1, g1.id());
        a.ready(1, g1.id());
        for e in &order[..k] {
            match e {
                Event::DialerAdds => d.add(2, Arc::clone(g2)),
                Event::AcceptorAdds => a.add(2, Arc::clone(g2)),
                Event::DialerReady => assert!(d.ready(2, g2.id())),
                Event::AcceptorReady => assert!(a.ready(2, g2.id())),
                Event::DialerDrops => d.remove(1),
                Event::AcceptorDrops => a.remove(1),
            }
        }
        (d, a)
    }

    /// A replacement in every possible order of its events (the two nodes
    /// register the new session in either order; the rest follows from the
    /// messages), with the two ends of a connection asking at any two
    /// points of it, in either order (each node's core asks when it sees
    /// the connection established, and either may be the later one), but
    /// not a drain time apart: the
    /// connecting side and the accepting side key it from the same
    /// generation, the accepting side with the connecting side's notice.
    #[test]
    fn replacement_never_splits_a_connection() {
        let (g1, g2) = (generation(1), generation(2));
        let mut all = Vec::new();
        orders(&mut Vec::new(), &mut all);
        assert_eq!(all.len(), 2, "{all:?}");
        for order in &all {
            let steps = order.len();
            for client_step in 0..=steps {
                for server_step in 0..=steps {
                    // The two ends ask within the key timeout of each
                    // other, and the dialer drops the old session a drain
                    // time (longer) after the new one became usable to it:
                    // the two requests never have both between them.
                    let (lo, hi) = (client_step.min(server_step), client_step.max(server_step));
                    let between = &order[lo..hi];
                    if between.contains(&Event::DialerReady)
                        && (between.contains(&Event::DialerDrops)
                            || between.contains(&Event::AcceptorDrops))
                    {
                        continue;
                    }
                    for dialer_connects in [true, false] {
                        let pick = |k| {
                            let (d, a) = after(order, k, &g1, &g2);
                            if dialer_connects { (d, a) } else { (a, d) }
                        };
                        let (client, _) = pick(client_step);
                        let Some((_, g)) = client.for_client() else {
                            // No usable generation yet: the client waits
                            // and asks again later, another case here.
                            continue;
                        };
                        let (_, mut server) = pick(server_step);
                        if client_step <= server_step {
                            server.note(CONN, g.id(), Instant::now());
                        }
                        let choice = match server.for_server(&CONN) {
                            ServerChoice::Wait => {
                                // The notice arrives, and the server looks
                                // again, no earlier than the client asked.
                                let (_, mut later) = pick(client_step.max(server_step));
                                later.note(CONN, g.id(), Instant::now());
                                later.for_server(&CONN)
                            }
                            other => other,
                        };
                        assert_eq!(
                            used(choice),
                            g.id(),
                            "{order:?}: client at step {client_step}, server at step {server_step}, dialer connects: {dialer_connects}"
                        );
                    }
                }
            }
            let (d, a) = after(order, steps, &g1, &g2);
            assert_eq!((d.generations(), a.generations()), (1, 1));
        }
    }

    /// A notice naming a generation this node no longer holds fails the
    /// connection; a notice for a connection is used once.
    #[test]
    fn notices_name_the_generation_or_fail() {
        let (g1, g2) = (generation(1), generation(2));
        let mut s = PeerState::default();
        s.add(1, Arc::clone(&g1));
        s.add(2, Arc::clone(&g2));
        assert!(matches!(s.for_server(&CONN), ServerChoice::Wait));
        s.note(CONN, id(&g1), Instant::now());
        assert_eq!(used(s.for_server(&CONN)), id(&g1));
        assert!(
            matches!(s.for_server(&CONN), ServerChoice::Wait),
            "used once"
        );
        s.note(CONN, [9; 8], Instant::now());
        assert!(matches!(
            s.for_server(&CONN),
            ServerChoice::Unknown([9, ..])
        ));
        // With one generation left: still the notice, which may name a
        // dropped one.
        s.remove(1);
        assert!(matches!(s.for_server(&CONN), ServerChoice::Wait));
        s.note(CONN, id(&g1), Instant::now());
        assert!(matches!(s.for_server(&CONN), ServerChoice::Unknown(_)));
        s.note(CONN, id(&g2), Instant::now());
        assert_eq!(used(s.for_server(&CONN)), id(&g2));
    }

    #[test]
    fn notices_are_bounded_and_expire() {
        let mut s = PeerState::default();
        let t0 = Instant::now();
        for i in 0..MAX_NOTICES {
            let mut k = [0u8; IDENTITY_LEN];
            k[..8].copy_from_slice(&(i as u64).to_be_bytes());
            assert!(s.note(k, [1; 8], t0));
        }
        assert!(!s.note([0xff; IDENTITY_LEN], [1; 8], t0 + Duration::from_secs(1)));
        assert!(s.note([0xff; IDENTITY_LEN], [1; 8], t0 + NOTICE_TTL));
        assert_eq!(s.notices.len(), 1);
    }
}
