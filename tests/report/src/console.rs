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
}

impl Verdict {
    fn word(self) -> &'static str {
        match self {
            Self::Pass => "PASS",
            Self::Fail => "FAIL",
        }
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
    #[error("result line without a scenario name and PASS or FAIL: {0:?}")]
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
    /// `name VERDICT [(1.2s)] detail`, after the prefix.
    fn parse(rest: &str) -> Option<Self> {
        let mut words = rest.splitn(3, ' ');
        let name = words.next().filter(|n| !n.is_empty())?.to_string();
        let verdict = match words.next()? {
            "PASS" => Verdict::Pass,
            "FAIL" => Verdict::Fail,
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
        Some(Self {
            name,
            verdict,
            seconds,
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
            result(Verdict::Fail, Some(0.0), "PLAINTEXT on the wire: a -> b"),
            result(Verdict::Fail, None, "journal: core exited (1)"),
            result(Verdict::Pass, Some(2.5), ""),
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
