//! The benchmark's figures, read back from a bench boot's serial log and
//! written as JSON, CSV, Markdown tables and SVG charts under
//! `target/bench/`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use tlshub_bench_report::{Figure, Report};

use crate::root;

/// The name of a bench run's figures file under `target/bench`: a full
/// run's is `figures-<kernel>.json`, a run of some parts only (`--filter`,
/// `bench --quick`) `figures-<parts>-<kernel>.json`, so that it never
/// replaces a full run's (a quick run once did, and was then committed as
/// the full run's figures).
pub fn figures_stem(filter: Option<&str>) -> String {
    match filter {
        None | Some("") => "figures".into(),
        Some(parts) => format!("figures-{}", parts.replace(',', "+")),
    }
}

/// Reads the figures of the bench boot `label` (its serial log under
/// `target/vm`) on kernel line `kernel`, writes
/// `target/bench/<stem>-<kernel>.{json,csv,md}` (see [`figures_stem`]) and
/// prints the tables, and this run against `compare` (an earlier run's
/// file and figures) if given.
/// `commit` names the build the run measured (read before the boot: the
/// tree may change during a run).
pub fn write(
    label: &str,
    kernel: &str,
    stem: &str,
    commit: Option<String>,
    compare: Option<(&Path, &Report)>,
) -> Result<()> {
    let serial = root().join(format!("target/vm/serial-{label}.log"));
    let console = std::fs::read_to_string(&serial)
        .with_context(|| format!("cannot read {}", serial.display()))?;
    let mut report = Report::from_console(kernel, &console)
        .with_context(|| format!("in {}", serial.display()))?;
    report.commit = commit;
    report.cpu = cpu_model();
    if report.figures.is_empty() {
        println!("== no benchmark figures in {}", serial.display());
        return Ok(());
    }
    let dir = root().join("target/bench");
    std::fs::create_dir_all(&dir)?;
    // Not `with_extension`: the kernel's name has a dot of its own.
    let file = |ext: &str| dir.join(format!("{stem}-{kernel}.{ext}"));
    let markdown = report.to_markdown();
    std::fs::write(file("json"), serde_json::to_string_pretty(&report)?)?;
    std::fs::write(file("csv"), report.to_csv())?;
    std::fs::write(file("md"), &markdown)?;
    for part in report.parts() {
        chart(&report, part, &dir.join(format!("{part}-{kernel}.svg")))?;
    }
    println!(
        "== {} figures written to {}/{stem}-{kernel}.{{json,csv,md}}, charts to <part>-{kernel}.svg\n\n{markdown}",
        report.figures.len(),
        dir.display()
    );
    if let Some((path, old)) = compare {
        println!(
            "== this run against {}\n\n{}",
            path.display(),
            report.compare(old)
        );
    }
    Ok(())
}

/// `--compare`'s file with its figures, read before the run: a bad file
/// fails at once rather than after it, and the file may be the one the
/// run replaces (the previous run's).
pub fn load_compare(path: Option<PathBuf>) -> Result<Option<(PathBuf, Report)>> {
    path.map(|p| load(&p).map(|report| (p, report))).transpose()
}

/// An earlier run's figures (`figures-<kernel>.json`).
pub fn load(path: &Path) -> Result<Report> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not a figures file", path.display()))
}

/// `git describe --always --dirty` of the work tree, if git can say.
pub fn commit() -> Option<String> {
    let out = std::process::Command::new("git")
        .args(["describe", "--always", "--dirty"])
        .current_dir(root())
        .output()
        .ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    (out.status.success() && !text.trim().is_empty()).then(|| text.trim().to_string())
}

/// The host's CPU model (the first `model name` in /proc/cpuinfo).
fn cpu_model() -> Option<String> {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|rest| rest.split_once(':'))
        .map(|(_, model)| model.trim().to_string())
}

/// Bar charts of `part`'s figures as one SVG: a small chart per measure,
/// a bar per subject (in the order measured), each labelled with its
/// value as the tables print it.
pub fn chart(report: &Report, part: &str, path: &Path) -> Result<()> {
    use plotters::prelude::*;
    use plotters::style::text_anchor::{HPos, Pos, VPos};

    if part.ends_with(tlshub_bench_report::CDF_PART_SUFFIX) {
        return cdf_chart(report, part, path);
    }

    let (subjects, measures) = (report.subjects(part), report.measures(part));
    const COLUMNS: usize = 2;
    let rows = measures.len().div_ceil(COLUMNS).max(1);
    let (width, cell_height) = (1200u32, 300u32);
    let area = SVGBackend::new(path, (width, cell_height * rows as u32 + 40)).into_drawing_area();
    area.fill(&WHITE).map_err(draw_error)?;
    let title = format!(
        "{part}, Linux {} ({}; emulated: compare within one run only)",
        report.kernel,
        report.commit.as_deref().unwrap_or("unknown commit")
    );
    let area = area
        .titled(&title, ("sans-serif", 20))
        .map_err(draw_error)?;
    if subjects.is_empty() {
        return Ok(());
    }
    let cells = area.split_evenly((rows, COLUMNS));
    for (cell, measure) in cells.iter().zip(&measures) {
        let bars: Vec<(usize, &Figure)> = subjects
            .iter()
            .enumerate()
            .filter_map(|(i, s)| report.figure(part, s, measure).map(|f| (i, f)))
            .collect();
        let top = bars.iter().map(|(_, f)| f.value).fold(0.0, f64::max) * 1.15;
        let mut chart = ChartBuilder::on(cell)
            .caption(*measure, ("sans-serif", 16))
            .margin(8)
            .x_label_area_size(28)
            .y_label_area_size(0)
            // An integer range includes its end: one segment per subject.
            .build_cartesian_2d(
                (0..subjects.len().saturating_sub(1)).into_segmented(),
                0.0..top.max(1.0),
            )
            .map_err(draw_error)?;
        chart
            .configure_mesh()
            .disable_y_axis()
            .disable_mesh()
            .x_labels(subjects.len())
            .x_label_style(("sans-serif", 11))
            .x_label_formatter(&|x| match x {
                SegmentValue::CenterOf(i) => {
                    subjects.get(*i).map(|s| (*s).into()).unwrap_or_default()
                }
                _ => String::new(),
            })
            .draw()
            .map_err(draw_error)?;
        chart
            .draw_series(
                Histogram::vertical(&chart)
                    .margin(12)
                    .style(BLUE.mix(0.6).filled())
                    .data(bars.iter().map(|(i, f)| (*i, f.value))),
            )
            .map_err(draw_error)?;
        chart
            .draw_series(bars.iter().map(|(i, f)| {
                Text::new(
                    f.unit.format(f.value),
                    (SegmentValue::CenterOf(*i), f.value + top * 0.02),
                    ("sans-serif", 11)
                        .into_font()
                        .color(&BLACK)
                        .pos(Pos::new(HPos::Center, VPos::Bottom)),
                )
            }))
            .map_err(draw_error)?;
    }
    area.present().map_err(draw_error)?;
    Ok(())
}

/// A distribution part (see `tlshub_bench_report::CDF_FRACTIONS`) as one
/// SVG: a line per subject through its points, latency on a log scale
/// across, the fraction of connections up.
fn cdf_chart(report: &Report, part: &str, path: &Path) -> Result<()> {
    use plotters::prelude::*;

    let subjects = report.subjects(part);
    let lines: Vec<(&str, Vec<(f64, f64)>)> = subjects
        .iter()
        .map(|s| {
            let mut points: Vec<(f64, f64)> = report
                .measures(part)
                .into_iter()
                .filter_map(|m| {
                    let fraction = tlshub_bench_report::cdf_fraction(m)?;
                    // Microseconds to milliseconds.
                    Some((report.figure(part, s, m)?.value / 1000.0, fraction))
                })
                .collect();
            points.sort_by(|a, b| a.1.total_cmp(&b.1));
            (*s, points)
        })
        .collect();
    let values = lines.iter().flat_map(|(_, p)| p.iter().map(|(ms, _)| *ms));
    let (lo, hi) = values.fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let area = SVGBackend::new(path, (1200, 700)).into_drawing_area();
    area.fill(&WHITE).map_err(draw_error)?;
    if lines.iter().all(|(_, p)| p.is_empty()) {
        return Ok(());
    }
    let title = format!(
        "{part}: connect to first echoed byte, Linux {} ({}; emulated: compare within one run only)",
        report.kernel,
        report.commit.as_deref().unwrap_or("unknown commit")
    );
    let mut chart = ChartBuilder::on(&area)
        .caption(title, ("sans-serif", 18))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(((lo * 0.8).max(0.001)..hi * 1.25).log_scale(), 0.0..1.0)
        .map_err(draw_error)?;
    chart
        .configure_mesh()
        .x_desc("setup latency (ms, log scale)")
        .y_desc("fraction of connections")
        .draw()
        .map_err(draw_error)?;
    // Ten colours that stay apart on white (matplotlib's "tab10").
    const COLOURS: [(u8, u8, u8); 10] = [
        (31, 119, 180),
        (255, 127, 14),
        (44, 160, 44),
        (214, 39, 40),
        (148, 103, 189),
        (140, 86, 75),
        (227, 119, 194),
        (127, 127, 127),
        (188, 189, 34),
        (23, 190, 207),
    ];
    for (i, (subject, points)) in lines.iter().enumerate() {
        let (r, g, b) = COLOURS[i % COLOURS.len()];
        let colour = RGBColor(r, g, b);
        chart
            .draw_series(LineSeries::new(
                points.iter().copied(),
                colour.stroke_width(2),
            ))
            .map_err(draw_error)?
            .label(*subject)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(draw_error)?;
    area.present().map_err(draw_error)?;
    Ok(())
}

/// plotters' error (generic over the backend) as text.
fn draw_error(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("cannot draw the chart: {e}")
}

#[cfg(test)]
mod tests {
    use super::figures_stem;

    #[test]
    fn only_a_full_run_writes_the_full_runs_figures_file() {
        assert_eq!(figures_stem(None), "figures");
        assert_eq!(figures_stem(Some("")), "figures");
        assert_eq!(figures_stem(Some("quick")), "figures-quick");
        assert_eq!(
            figures_stem(Some("collateral_stall,concurrency")),
            "figures-collateral_stall+concurrency"
        );
    }
}
