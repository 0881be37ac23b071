#![forbid(unsafe_code)]
//! The benchmark's figures as typed records. The VM benchmark
//! (`tlshub-vm-tests`) prints each figure as one console line
//! ([`Figure::line`]); `cargo xtask bench` reads them back from the serial
//! log ([`Report::from_console`]) and writes them as JSON, CSV and Markdown
//! tables. One type on both sides, so a figure cannot change shape on the
//! way. [`console`] is the rest of what the runner prints for the xtask:
//! the plan, each scenario's result, the end.

pub mod console;

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

/// What starts a figure's console line; the JSON record follows.
pub const LINE_PREFIX: &str = "TLSHUB-FIGURE ";

/// Why a report could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// A figure line whose record does not parse.
    #[error("console line {line}: not a figure record: {source}")]
    Malformed {
        /// 1-based line number in the console log.
        line: usize,
        /// What serde said.
        #[source]
        source: serde_json::Error,
    },
    /// A figure whose value is not a finite number.
    #[error("{part} / {subject} / {measure}: the value is not a finite number")]
    NotFinite {
        /// The figure's part.
        part: String,
        /// The figure's subject.
        subject: String,
        /// The figure's measure.
        measure: String,
    },
    /// JSON encoding failed.
    #[error("cannot encode: {0}")]
    Encode(#[from] serde_json::Error),
}

/// The unit of a figure's value, which also says how it is printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Unit {
    /// Microseconds (printed in ms from 1,000 µs).
    Microseconds,
    /// Milliseconds.
    Milliseconds,
    /// Events per second (connections, transactions).
    PerSecond,
    /// Bytes per second (printed in MB/s).
    BytesPerSecond,
    /// A count.
    Count,
    /// A share, in percent.
    Percent,
}

impl Unit {
    /// `value` for a table cell.
    pub fn format(self, value: f64) -> String {
        match self {
            Self::Microseconds if value >= 1000.0 => format!("{:.2} ms", value / 1000.0),
            Self::Microseconds => format!("{value:.0} µs"),
            Self::Milliseconds => format!("{value:.1} ms"),
            Self::PerSecond if value < 100.0 => format!("{value:.1}/s"),
            Self::PerSecond => format!("{value:.0}/s"),
            Self::BytesPerSecond => format!("{:.1} MB/s", value / 1e6),
            Self::Count => format!("{value:.0}"),
            Self::Percent => format!("{value:.1}%"),
        }
    }
}

/// The fractions at which a distribution part records its points: the
/// figure `p99.9` of such a part is the value below which 99.9% of the
/// samples fall.
pub const CDF_FRACTIONS: [f64; 14] = [
    0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999,
];

/// What ends the name of a part whose figures are points of a cumulative
/// distribution (one figure per [`CDF_FRACTIONS`] entry and subject), which
/// is charted as a CDF rather than as bars.
pub const CDF_PART_SUFFIX: &str = "_cdf";

/// The measure name of the point at `fraction` (`0.999` is `p99.9`).
pub fn cdf_measure(fraction: f64) -> String {
    let percent = format!("{:.1}", fraction * 100.0);
    format!("p{}", percent.trim_end_matches(".0"))
}

/// The fraction a distribution point's measure name stands for.
pub fn cdf_fraction(measure: &str) -> Option<f64> {
    let percent: f64 = measure.strip_prefix('p')?.parse().ok()?;
    (0.0..=100.0).contains(&percent).then_some(percent / 100.0)
}

/// One measured figure.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Figure {
    /// The benchmark part that measured it (`bench`, `concurrency`, ...).
    pub part: String,
    /// What it was measured on: a peer (`no tlshub`, `raw ktls`,
    /// `wireguard`, `stunnel`, `plain`) or a provider.
    pub subject: String,
    /// The quantity, e.g. `setup p99` or `rr transactions`.
    pub measure: String,
    /// The value, in `unit`.
    pub value: f64,
    /// The value's unit.
    pub unit: Unit,
    /// When the figure was measured more than once in the run: `value`
    /// is the median and this the range, the run-to-run spread that
    /// [`Report::compare`] judges a change against.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spread: Option<Spread>,
}

/// The range of a figure measured several times in one run.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Spread {
    /// The lowest of the repetitions.
    pub min: f64,
    /// The highest.
    pub max: f64,
    /// How many repetitions.
    pub runs: u32,
}

impl Figure {
    /// A figure; `value` in `unit`.
    pub fn new(part: &str, subject: &str, measure: &str, value: f64, unit: Unit) -> Self {
        Self {
            part: part.into(),
            subject: subject.into(),
            measure: measure.into(),
            value,
            unit,
            spread: None,
        }
    }

    /// A figure measured once per entry of `values`: the median (the
    /// lower middle one for an even count) with the range as its spread.
    /// `None` for no values.
    pub fn repeated(
        part: &str,
        subject: &str,
        measure: &str,
        values: &[f64],
        unit: Unit,
    ) -> Option<Self> {
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        let median = *sorted.get((sorted.len().checked_sub(1)?) / 2)?;
        let mut f = Self::new(part, subject, measure, median, unit);
        f.spread = Some(Spread {
            min: sorted[0],
            max: sorted[sorted.len() - 1],
            runs: u32::try_from(sorted.len()).unwrap_or(u32::MAX),
        });
        Some(f)
    }

    /// The console line that carries it. A value that is not a finite
    /// number is refused (JSON has no NaN).
    pub fn line(&self) -> Result<String, ReportError> {
        if !self.value.is_finite() {
            return Err(ReportError::NotFinite {
                part: self.part.clone(),
                subject: self.subject.clone(),
                measure: self.measure.clone(),
            });
        }
        Ok(format!("{LINE_PREFIX}{}", serde_json::to_string(self)?))
    }
}

/// The figures of one benchmark run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// The kernel the VM ran (`6.1`, `6.12`).
    pub kernel: String,
    /// The commit the run was built from (`git describe --always
    /// --dirty`), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
    /// The host CPU model that emulated the VM, when known: absolute
    /// figures mean nothing across hosts (and little across runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<String>,
    /// The figures in the order they were measured.
    pub figures: Vec<Figure>,
}

impl Report {
    /// The figures in a console log (anything before [`LINE_PREFIX`] on a
    /// line, such as a runner's label, is ignored; lines without it are
    /// skipped). A figure line that does not parse is an error.
    pub fn from_console(kernel: &str, console: &str) -> Result<Self, ReportError> {
        let mut figures = Vec::new();
        for (i, line) in console.lines().enumerate() {
            let Some(at) = line.find(LINE_PREFIX) else {
                continue;
            };
            let record = line[at + LINE_PREFIX.len()..].trim_end_matches('\r');
            let figure = serde_json::from_str(record).map_err(|source| ReportError::Malformed {
                line: i + 1,
                source,
            })?;
            figures.push(figure);
        }
        Ok(Self {
            kernel: kernel.into(),
            commit: None,
            cpu: None,
            figures,
        })
    }

    /// Each figure of this run that `old` has too (same part, subject and
    /// measure), as a Markdown table: old value, new value and new/old.
    /// Where the old figure was measured several times, a new value
    /// inside its spread is marked "within spread" and one outside it
    /// "outside"; figures measured once are not judged (under emulation,
    /// runs of one build differ by tens of percent). Figures only one run
    /// has are counted below the table.
    pub fn compare(&self, old: &Report) -> String {
        let key = |f: &Figure| (f.part.clone(), f.subject.clone(), f.measure.clone());
        let mut out = format!(
            "| part | subject | measure | old ({}) | new ({}) | new/old | |\n|---|---|---|---|---|---|---|\n",
            old.commit.as_deref().unwrap_or("?"),
            self.commit.as_deref().unwrap_or("?")
        );
        let mut matched = 0;
        for new in &self.figures {
            let Some(was) = old.figures.iter().rev().find(|f| key(f) == key(new)) else {
                continue;
            };
            matched += 1;
            let ratio = if was.value == 0.0 {
                "-".to_string()
            } else {
                format!("x{:.2}", new.value / was.value)
            };
            let verdict = match was.spread {
                Some(s) if (s.min..=s.max).contains(&new.value) => {
                    format!("within spread ({} runs)", s.runs)
                }
                Some(s) => format!("outside spread ({} runs)", s.runs),
                None => String::new(),
            };
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {ratio} | {verdict} |",
                new.part,
                new.subject,
                new.measure,
                was.unit.format(was.value),
                new.unit.format(new.value)
            );
        }
        let only_new = self.figures.len() - matched;
        let only_old = old
            .figures
            .iter()
            .filter(|f| !self.figures.iter().any(|n| key(n) == key(f)))
            .count();
        let _ = writeln!(
            out,
            "\n{matched} figures in both runs; {only_new} only in the new one, {only_old} only in the old one."
        );
        out
    }

    /// The parts, in the order first measured.
    pub fn parts(&self) -> Vec<&str> {
        first_seen(self.figures.iter().map(|f| f.part.as_str()))
    }

    /// `part`'s subjects (columns), in the order first measured.
    pub fn subjects<'a>(&'a self, part: &str) -> Vec<&'a str> {
        first_seen(self.of(part).map(|f| f.subject.as_str()))
    }

    /// `part`'s measures (rows), in the order first measured.
    pub fn measures<'a>(&'a self, part: &str) -> Vec<&'a str> {
        first_seen(self.of(part).map(|f| f.measure.as_str()))
    }

    /// The figure of `part` for `subject` and `measure`; the last one if a
    /// part measured it twice.
    pub fn figure<'a>(&'a self, part: &str, subject: &str, measure: &str) -> Option<&'a Figure> {
        self.of(part)
            .filter(|f| f.subject == subject && f.measure == measure)
            .last()
    }

    fn of<'a>(&'a self, part: &str) -> impl Iterator<Item = &'a Figure> {
        let part = part.to_owned();
        self.figures.iter().filter(move |f| f.part == part)
    }

    /// One row per figure, with the run's kernel, commit and CPU on every
    /// row: `kernel,commit,cpu,part,subject,measure,value,unit,min,max,runs`
    /// (the last three empty for a figure measured once).
    pub fn to_csv(&self) -> String {
        let mut out =
            String::from("kernel,commit,cpu,part,subject,measure,value,unit,min,max,runs\n");
        let run = [
            csv_field(&self.kernel),
            csv_field(self.commit.as_deref().unwrap_or_default()),
            csv_field(self.cpu.as_deref().unwrap_or_default()),
        ]
        .join(",");
        for f in &self.figures {
            let unit = serde_json::to_value(f.unit)
                .ok()
                .and_then(|v| v.as_str().map(String::from))
                .unwrap_or_default();
            let spread = f
                .spread
                .map(|s| format!("{},{},{}", s.min, s.max, s.runs))
                .unwrap_or_else(|| ",,".into());
            let _ = writeln!(
                out,
                "{run},{},{},{},{},{unit},{spread}",
                csv_field(&f.part),
                csv_field(&f.subject),
                csv_field(&f.measure),
                f.value,
            );
        }
        out
    }

    /// A Markdown table per part: a row per measure and a column per
    /// subject, both in the order first measured; a cell with no figure
    /// is empty.
    pub fn to_markdown(&self) -> String {
        self.to_markdown_against(None)
    }

    /// [`Self::to_markdown`], with each other subject's cell followed by
    /// its ratio to `base`'s figure of the same measure (`(x1.31)`), where
    /// `base` has one.
    pub fn to_markdown_against(&self, base: Option<&str>) -> String {
        let mut out = String::new();
        for part in self.parts() {
            let subjects = self.subjects(part);
            let measures = self.measures(part);
            let _ = writeln!(out, "### {part} (Linux {})\n", self.kernel);
            let _ = writeln!(out, "| | {} |", subjects.join(" | "));
            let _ = writeln!(out, "|---|{}", "---|".repeat(subjects.len()));
            for measure in &measures {
                let against = base.and_then(|b| self.figure(part, b, measure));
                let cells: Vec<String> = subjects
                    .iter()
                    .map(|s| {
                        let Some(f) = self.figure(part, s, measure) else {
                            return String::new();
                        };
                        match against {
                            Some(b) if Some(*s) != base && b.value > 0.0 => {
                                format!("{} ({})", f.unit.format(f.value), ratio(f.value / b.value))
                            }
                            _ => f.unit.format(f.value),
                        }
                    })
                    .collect();
                let _ = writeln!(out, "| {measure} | {} |", cells.join(" | "));
            }
            out.push('\n');
        }
        out
    }
}

/// A ratio as the tables print it: two decimals below 10, then fewer.
fn ratio(r: f64) -> String {
    if r < 10.0 {
        format!("x{r:.2}")
    } else if r < 100.0 {
        format!("x{r:.1}")
    } else {
        format!("x{r:.0}")
    }
}

/// The distinct items in the order they first appear.
fn first_seen<'a>(items: impl Iterator<Item = &'a str>) -> Vec<&'a str> {
    let mut seen: Vec<&str> = Vec::new();
    for i in items {
        if !seen.contains(&i) {
            seen.push(i);
        }
    }
    seen
}

/// A CSV field, quoted when it holds a comma, a quote or a line break.
fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_table_against_a_subject_puts_each_other_cell_s_ratio_next_to_it() {
        let mut r = Report::from_console("6.1", "").unwrap();
        for (subject, v) in [
            ("no tlshub", 2000.0),
            ("openssl", 92_000.0),
            ("raw ktls", 3000.0),
        ] {
            r.figures.push(Figure::new(
                "bench",
                subject,
                "setup p50",
                v,
                Unit::Microseconds,
            ));
        }
        r.figures.push(Figure::new(
            "bench",
            "openssl",
            "key time",
            50.0,
            Unit::Milliseconds,
        ));
        let md = r.to_markdown_against(Some("no tlshub"));
        assert!(
            md.contains("| setup p50 | 2.00 ms | 92.00 ms (x46.0) | 3.00 ms (x1.50) |"),
            "{md}"
        );
        // No base figure for the measure: no ratio.
        assert!(md.contains("| key time |  | 50.0 ms |  |"), "{md}");
    }

    #[test]
    fn a_distribution_point_is_named_by_its_percentage_and_read_back() {
        let names: Vec<String> = CDF_FRACTIONS.iter().map(|f| cdf_measure(*f)).collect();
        assert_eq!(names[0], "p1");
        assert_eq!(names[6], "p50");
        assert_eq!(names[13], "p99.9");
        for (f, name) in CDF_FRACTIONS.iter().zip(&names) {
            assert!((cdf_fraction(name).unwrap() - f).abs() < 1e-9, "{name}");
        }
        assert_eq!(cdf_fraction("setup p50"), None);
        assert_eq!(cdf_fraction("p120"), None);
    }

    use super::*;

    fn figure(subject: &str, measure: &str, value: f64, unit: Unit) -> Figure {
        Figure::new("rr", subject, measure, value, unit)
    }

    #[test]
    fn figures_come_back_from_a_console_log_as_they_were_written() {
        let written = vec![
            figure("no tlshub", "transactions", 2457.0, Unit::PerSecond),
            figure("openssl", "round trip p99", 3696.0, Unit::Microseconds),
        ];
        let mut console = String::from("[    1.0] booting\nTLSHUB-BENCH a human line\n");
        for f in &written {
            console.push_str(&format!("[bench-6.1] {}\r\n", f.line().unwrap()));
        }
        let report = Report::from_console("6.1", &console).unwrap();
        assert_eq!(report.figures, written);
        assert_eq!(report.kernel, "6.1");
    }

    #[test]
    fn a_broken_figure_line_is_an_error_naming_its_line() {
        let console = "ok\nTLSHUB-FIGURE {\"part\":\"rr\"}\n";
        match Report::from_console("6.1", console) {
            Err(ReportError::Malformed { line: 2, .. }) => {}
            other => panic!("want a malformed line 2, got {other:?}"),
        }
    }

    #[test]
    fn a_value_that_is_not_a_number_is_refused_before_it_is_written() {
        let f = figure("x", "y", f64::NAN, Unit::Count);
        assert!(matches!(f.line(), Err(ReportError::NotFinite { .. })));
    }

    #[test]
    fn markdown_has_a_column_per_subject_and_a_row_per_measure_with_gaps_empty() {
        let report = Report {
            kernel: "6.12".into(),
            commit: None,
            cpu: None,
            figures: vec![
                figure("no tlshub", "transactions", 2457.0, Unit::PerSecond),
                figure("no tlshub", "8 streams", 22.9e6, Unit::BytesPerSecond),
                figure("openssl", "transactions", 12.34, Unit::PerSecond),
                figure("openssl", "round trip p99", 3696.0, Unit::Microseconds),
            ],
        };
        let md = report.to_markdown();
        let want = "### rr (Linux 6.12)\n\n\
                    | | no tlshub | openssl |\n\
                    |---|---|---|\n\
                    | transactions | 2457/s | 12.3/s |\n\
                    | 8 streams | 22.9 MB/s |  |\n\
                    | round trip p99 |  | 3.70 ms |\n\n";
        assert_eq!(md, want);
    }

    #[test]
    fn csv_quotes_fields_that_need_it() {
        let repeated =
            Figure::repeated("rr", "x", "tps", &[1.0, 3.0, 2.0], Unit::PerSecond).unwrap();
        let report = Report {
            kernel: "6.1".into(),
            commit: Some("abc".into()),
            cpu: Some("AMD EPYC, 2 cores".into()),
            figures: vec![figure("a, \"b\"", "p50", 1.5, Unit::Milliseconds), repeated],
        };
        assert_eq!(
            report.to_csv(),
            "kernel,commit,cpu,part,subject,measure,value,unit,min,max,runs\n\
             6.1,abc,\"AMD EPYC, 2 cores\",rr,\"a, \"\"b\"\"\",p50,1.5,milliseconds,,,\n\
             6.1,abc,\"AMD EPYC, 2 cores\",rr,x,tps,2,per_second,1,3,3\n"
        );
    }

    #[test]
    fn a_comparison_pairs_figures_by_part_subject_and_measure() {
        let run = |commit: &str, figures| Report {
            kernel: "6.1".into(),
            commit: Some(commit.into()),
            cpu: None,
            figures,
        };
        let old = run(
            "aaa",
            vec![
                figure("openssl", "transactions", 1000.0, Unit::PerSecond),
                figure("openssl", "gone", 1.0, Unit::Count),
            ],
        );
        let new = run(
            "bbb",
            vec![
                figure("openssl", "transactions", 1500.0, Unit::PerSecond),
                figure("tlshub", "transactions", 900.0, Unit::PerSecond),
            ],
        );
        let table = new.compare(&old);
        assert!(
            table.contains("| rr | openssl | transactions | 1000/s | 1500/s | x1.50 |  |"),
            "{table}"
        );
        assert!(table.contains("old (aaa) | new (bbb)"), "{table}");
        assert!(
            table.contains("1 figures in both runs; 1 only in the new one, 1 only in the old one."),
            "{table}"
        );
    }

    #[test]
    fn a_report_without_commit_or_cpu_still_reads() {
        let r: Report = serde_json::from_str(r#"{"kernel":"6.1","figures":[]}"#).unwrap();
        assert_eq!((r.commit, r.cpu), (None, None));
    }

    #[test]
    fn a_repeated_figure_is_the_median_with_its_range_and_judges_a_comparison() {
        let f = Figure::repeated(
            "rr",
            "openssl",
            "tps",
            &[900.0, 1200.0, 1000.0],
            Unit::PerSecond,
        )
        .unwrap();
        assert_eq!(f.value, 1000.0);
        assert_eq!(
            f.spread,
            Some(Spread {
                min: 900.0,
                max: 1200.0,
                runs: 3
            })
        );
        assert!(Figure::repeated("rr", "x", "y", &[], Unit::Count).is_none());
        let run = |figures| Report {
            kernel: "6.1".into(),
            commit: None,
            cpu: None,
            figures,
        };
        let old = run(vec![f]);
        let inside = run(vec![figure("openssl", "tps", 1100.0, Unit::PerSecond)]);
        let outside = run(vec![figure("openssl", "tps", 1300.0, Unit::PerSecond)]);
        assert!(inside.compare(&old).contains("| within spread (3 runs) |"));
        assert!(
            outside
                .compare(&old)
                .contains("| outside spread (3 runs) |")
        );
    }
}
