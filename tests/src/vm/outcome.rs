//! What a scenario returns: a one-line summary of what held, or a
//! [`Failure`] that says what kind of thing went wrong. The kind reaches
//! the console: a plaintext leak is reported as `LEAK`, not as one more
//! `FAIL`, because it is the one bug this product must never have.

use std::fmt;

use tlshub_bench_report::console::Verdict;

/// A scenario's body: a one-line summary of what was checked, or why it
/// failed.
pub type Outcome = Result<String, Failure>;

/// Why a scenario (or a helper it calls) failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// A protected flow carried the plaintext marker on the wire.
    Plaintext(String),
    /// A protected flow's wire is not what tlshub puts there, short of
    /// plaintext: not TLS records, no records under the keys the cores
    /// reported, the two ends' keys disagree, the decrypted bytes are not
    /// the app's, or the capture was blind (no control showed its marker,
    /// packets were dropped, fewer flows than connections).
    Wire(String),
    /// A process (an app, a tool) did not finish within its time: the
    /// product promises exact bytes or a clean error, never a hang.
    Hang(String),
    /// Any other check that did not hold: an app's bytes, an error code, a
    /// count, a process that did not start or did not stop.
    Check(String),
}

impl Failure {
    /// The failure's message, without its kind.
    pub fn message(&self) -> &str {
        match self {
            Self::Plaintext(m) | Self::Wire(m) | Self::Hang(m) | Self::Check(m) => m,
        }
    }

    /// The same failure with `context` put before its message (the kind is
    /// kept, so a leak found deep in a helper is still reported as one).
    #[must_use]
    pub fn context(self, context: impl fmt::Display) -> Self {
        self.map_message(|m| format!("{context}: {m}"))
    }

    /// The same failure with its message rewritten by `f` (which gets the
    /// message without its kind), of the same kind.
    #[must_use]
    pub fn map_message(self, f: impl FnOnce(&str) -> String) -> Self {
        match self {
            Self::Plaintext(m) => Self::Plaintext(f(&m)),
            Self::Wire(m) => Self::Wire(f(&m)),
            Self::Hang(m) => Self::Hang(f(&m)),
            Self::Check(m) => Self::Check(f(&m)),
        }
    }

    /// How the console reports it.
    pub fn verdict(&self) -> Verdict {
        match self {
            Self::Plaintext(_) => Verdict::Leak,
            Self::Wire(_) | Self::Hang(_) | Self::Check(_) => Verdict::Fail,
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Plaintext(m) => write!(f, "PLAINTEXT on the wire: {m}"),
            Self::Wire(m) => write!(f, "wire: {m}"),
            Self::Hang(m) => write!(f, "hang: {m}"),
            Self::Check(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for Failure {}

/// Errors of the test bed's own plumbing (a command's output, a parse)
/// are plain checks.
impl From<String> for Failure {
    fn from(m: String) -> Self {
        Self::Check(m)
    }
}

impl From<&str> for Failure {
    fn from(m: &str) -> Self {
        Self::Check(m.to_string())
    }
}

/// `Failure::Check(format!(...))`: the usual way a scenario fails.
#[macro_export]
macro_rules! failed {
    ($($arg:tt)*) => {
        $crate::vm::outcome::Failure::Check(format!($($arg)*))
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_keeps_the_kind_and_a_leak_is_reported_as_one() {
        let leak = Failure::Plaintext("10.0.1.2:4000 -> 10.0.2.2:8443 carries the marker".into())
            .context("round 2");
        assert_eq!(leak.verdict(), Verdict::Leak);
        assert_eq!(
            leak.to_string(),
            "PLAINTEXT on the wire: round 2: 10.0.1.2:4000 -> 10.0.2.2:8443 carries the marker"
        );
        let wire = Failure::Wire("not TLS".into()).context("interop");
        assert_eq!(wire.verdict(), Verdict::Fail);
        assert_eq!(wire.message(), "interop: not TLS");
        let check: Failure = String::from("server exit 1").into();
        assert_eq!(check, failed!("server exit {}", 1));
        assert_eq!(check.to_string(), "server exit 1");
    }
}
