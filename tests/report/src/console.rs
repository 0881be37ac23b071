//! The VM runner's protocol on the serial console, which `cargo xtask vm`
//! follows: the plan (how many scenarios will report), one result line per
//! scenario, then the end. People read the same lines in CI's output, so
//! they stay text; [`ConsoleLine`] is the one codec both sides use.
//! (Benchmark figures are separate lines, see [`crate::LINE_PREFIX`].)

use std::fmt;

/// What starts the plan line; the number of scenarios follows.
pub const PLAN_PREFIX: &str = "TLSHUB-PLAN ";
/// What starts a scenario's result line.
pub const RESULT_PREFIX: &str = "TLSHUB-RESULT ";
/// The line printed once every planned scenario has reported.
pub const DONE_LINE: &str = "TLSHUB-DONE";

/// Whether a scenario passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Every check held.
    Pass,
    /// A check failed, the scenario could not run, or it panicked.
    Fail,
    /// A protected flow carried plaintext on the wire: a failure too, named
    /// apart because it is the one bug the product must never have.
    Leak,
}

impl Verdict {
    fn word(self) -> &'static str {
        match self {
            Self::Pass => "PASS",
            Self::Fail => "FAIL",
            Self::Leak => "LEAK",
        }
    }
}

/// What a scenario's checks of the wire proved, summed over every capture
/// it checked. Printed on its result line and summed for the run, so a
/// reader sees how many protected flows the run's "no plaintext" rests on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WireTally {
    /// Protected flows (with payload) checked: TLS records only, no marker.
    pub protected: u64,
    /// Of those, decrypted with the keys the cores reported and matched to
    /// the apps' bytes.
    pub decrypted: u64,
    /// Of those, flows of connections reset before both ends had keys: a
    /// handshake's bytes, or records under the sender's keys that decrypted
    /// to the app's bytes.
    pub unkeyed: u64,
    /// Of those, flows keyed on both ends that carried a provider's
    /// handshake and no application bytes (the app sent nothing that way).
    pub handshake_only: u64,
    /// Unselected flows that showed the marker in clear: the controls that
    /// prove the capture could see plaintext.
    pub controls: u64,
}

impl WireTally {
    /// Adds another tally to this one.
    pub fn add(&mut self, other: WireTally) {
        self.protected += other.protected;
        self.decrypted += other.decrypted;
        self.unkeyed += other.unkeyed;
        self.handshake_only += other.handshake_only;
        self.controls += other.controls;
    }

    /// Reads back what `Display` printed at the start of `text`
    /// (`[wire protected=P decrypted=D unkeyed=U handshake_only=H
    /// controls=C]`), and the rest of the text after it.
    fn parse(text: &str) -> Option<(Self, &str)> {
        let (inside, rest) = text.strip_prefix("[wire ")?.split_once(']')?;
        let mut t = Self::default();
        for pair in inside.split(' ') {
            let (key, value) = pair.split_once('=')?;
            let value = value.parse().ok()?;
            match key {
                "protected" => t.protected = value,
                "decrypted" => t.decrypted = value,
                "unkeyed" => t.unkeyed = value,
                "handshake_only" => t.handshake_only = value,
                "controls" => t.controls = value,
                _ => return None,
            }
        }
        Some((t, rest.strip_prefix(' ').unwrap_or(rest)))
    }
}

impl fmt::Display for WireTally {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "[wire protected={} decrypted={} unkeyed={} handshake_only={} controls={}]",
            self.protected, self.decrypted, self.unkeyed, self.handshake_only, self.controls
        )
    }
}

/// One scenario's outcome.
#[derive(Debug, Clone, PartialEq)]
pub struct ScenarioResult {
    /// The scenario's name (`#N` appended for repeated runs).
    pub name: String,
    /// Passed or failed.
    pub verdict: Verdict,
    /// How long it ran, if the runner timed it (a shell fallback does not).
    pub seconds: Option<f64>,
    /// What its wire checks proved, if it checked a capture.
    pub wire: Option<WireTally>,
    /// The summary of what was checked, or why it failed. Its later lines
    /// are printed indented under the result line; only the first is part
    /// of the line itself.
    pub detail: String,
}

/// Why a console line that claims to be part of the protocol is not.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConsoleError {
    /// A plan line whose count is not a number.
    #[error("plan line without a scenario count: {0:?}")]
    BadPlan(String),
    /// A result line without a name and a verdict.
    #[error("result line without a scenario name and PASS, FAIL or LEAK: {0:?}")]
    BadResult(String),
}

/// A line of the serial console, as far as the protocol is concerned.
#[derive(Debug, Clone, PartialEq)]
pub enum ConsoleLine {
    /// How many results will follow.
    Plan(usize),
    /// One scenario's outcome.
    Result(ScenarioResult),
    /// Every result was printed.
    Done,
    /// Anything else (kernel messages, logs printed after a failure).
    Other,
}

impl ConsoleLine {
    /// Reads one console line (a trailing `\r` from the serial port is
    /// ignored).
    pub fn parse(line: &str) -> Result<Self, ConsoleError> {
        let line = line.trim_end_matches('\r');
        if let Some(n) = line.strip_prefix(PLAN_PREFIX) {
            return n
                .trim()
                .parse()
                .map(Self::Plan)
                .map_err(|_| ConsoleError::BadPlan(line.into()));
        }
        if let Some(rest) = line.strip_prefix(RESULT_PREFIX) {
            return ScenarioResult::parse(rest)
                .map(Self::Result)
                .ok_or_else(|| ConsoleError::BadResult(line.into()));
        }
        // The guest's console may prefix it (a kernel message's tail).
        if line.contains(DONE_LINE) {
            return Ok(Self::Done);
        }
        Ok(Self::Other)
    }
}

impl ScenarioResult {
    /// `name VERDICT [(1.2s)] [[wire ...]] detail`, after the prefix
    /// (VERDICT: `PASS`, `FAIL` or `LEAK`).
    fn parse(rest: &str) -> Option<Self> {
        let mut words = rest.splitn(3, ' ');
        let name = words.next().filter(|n| !n.is_empty())?.to_string();
        let verdict = match words.next()? {
            "PASS" => Verdict::Pass,
            "FAIL" => Verdict::Fail,
            "LEAK" => Verdict::Leak,
            _ => return None,
        };
        let tail = words.next().unwrap_or("");
        let timed = tail
            .strip_prefix('(')
            .and_then(|t| t.split_once("s)"))
            .and_then(|(secs, detail)| Some((secs.parse::<f64>().ok()?, detail)));
        let (seconds, detail) = match timed {
            Some((secs, detail)) => (Some(secs), detail.strip_prefix(' ').unwrap_or(detail)),
            None => (None, tail),
        };
        let (wire, detail) = match WireTally::parse(detail) {
            Some((tally, detail)) => (Some(tally), detail),
            None => (None, detail),
        };
        Some(Self {
            name,
            verdict,
            seconds,
            wire,
            detail: detail.to_string(),
        })
    }
}

impl fmt::Display for ScenarioResult {
    /// The console line (with [`RESULT_PREFIX`]); later lines of the detail
    /// are indented so that they cannot be taken for protocol lines.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{RESULT_PREFIX}{} {}", self.name, self.verdict.word())?;
        if let Some(secs) = self.seconds {
            write!(f, " ({secs:.1}s)")?;
        }
        if let Some(wire) = self.wire {
            write!(f, " {wire}")?;
        }
        write!(f, " {}", self.detail.replace('\n', "\n    "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(verdict: Verdict, seconds: Option<f64>, detail: &str) -> ScenarioResult {
        ScenarioResult {
            name: "gate_unusual_socket_calls".into(),
            verdict,
            seconds,
            wire: None,
            detail: detail.into(),
        }
    }

    #[test]
    fn a_printed_result_reads_back_as_the_same_result() {
        for r in [
            result(
                Verdict::Pass,
                Some(14.6),
                "30 sends racing connect(): 30 sent (after the keys)",
            ),
            result(Verdict::Leak, Some(0.0), "PLAINTEXT on the wire: a -> b"),
            result(Verdict::Fail, Some(0.0), "wire: a -> b: not TLS"),
            result(Verdict::Fail, None, "journal: core exited (1)"),
            result(Verdict::Pass, Some(2.5), ""),
            ScenarioResult {
                wire: Some(WireTally {
                    protected: 40,
                    decrypted: 38,
                    unkeyed: 1,
                    handshake_only: 1,
                    controls: 1,
                }),
                ..result(Verdict::Pass, Some(31.0), "20 exchanges, exact both ways")
            },
            ScenarioResult {
                wire: Some(WireTally::default()),
                ..result(Verdict::Leak, None, "PLAINTEXT on the wire: a -> b")
            },
        ] {
            let line = r.to_string();
            assert_eq!(
                ConsoleLine::parse(&line),
                Ok(ConsoleLine::Result(r)),
                "{line}"
            );
        }
    }

    #[test]
    fn a_multi_line_detail_keeps_its_first_line_and_indents_the_rest() {
        let r = result(Verdict::Fail, Some(1.0), "first\nsecond");
        let printed = r.to_string();
        let mut lines = printed.lines();
        let first = ConsoleLine::parse(lines.next().unwrap()).unwrap();
        assert_eq!(
            first,
            ConsoleLine::Result(result(Verdict::Fail, Some(1.0), "first"))
        );
        let second = lines.next().unwrap();
        assert_eq!(second, "    second");
        assert_eq!(ConsoleLine::parse(second), Ok(ConsoleLine::Other));
    }

    #[test]
    fn plan_done_and_other_lines() {
        assert_eq!(
            ConsoleLine::parse("TLSHUB-PLAN 45\r"),
            Ok(ConsoleLine::Plan(45))
        );
        assert_eq!(ConsoleLine::parse("TLSHUB-DONE"), Ok(ConsoleLine::Done));
        assert_eq!(
            ConsoleLine::parse("[   48.19] reboot: Power down"),
            Ok(ConsoleLine::Other)
        );
    }

    #[test]
    fn a_malformed_protocol_line_is_an_error_not_a_pass() {
        assert!(matches!(
            ConsoleLine::parse("TLSHUB-PLAN many"),
            Err(ConsoleError::BadPlan(_))
        ));
        for bad in [
            "TLSHUB-RESULT ",
            "TLSHUB-RESULT name",
            "TLSHUB-RESULT name OK (1s) x",
        ] {
            assert!(
                matches!(ConsoleLine::parse(bad), Err(ConsoleError::BadResult(_))),
                "{bad}"
            );
        }
    }
}
