//! The branch tree over time as an SVG chart: one row per branch (a child under its
//! parent, in the order they started), a bar from its start to its last record, a tick
//! per moment its processes did something (colored by class: file, net, proc, page), a
//! connector from the parent's row at each fork to the child's start, and a diamond at
//! each commit. Every mark has a `<title>` (a tooltip in a browser).

use std::fmt::Write as _;

use super::{BranchReport, Report};

const WIDTH: f64 = 1000.0;
const LABEL: f64 = 170.0;
const RIGHT: f64 = 30.0;
const TOP: f64 = 40.0;
const ROW: f64 = 30.0;
const BAR: f64 = 14.0;

/// Text for XML: markup escaped, characters XML does not allow dropped.
fn escape(s: &str) -> String {
    s.chars()
        .filter(|c| !c.is_control() || matches!(c, '\t' | '\n'))
        .collect::<String>()
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn color(kind: &str) -> &'static str {
    match kind.split('_').next().unwrap_or("") {
        "file" => "#3b73b9",
        "net" => "#e07b24",
        "proc" => "#3a9a4a",
        "page" => "#8c5bb5",
        _ => "#777777",
    }
}

/// The rows in tree order: roots (no parent among the branches) first, each followed by its
/// children, children in the order they started.
fn rows(report: &Report) -> Vec<(&BranchReport, usize)> {
    let known = |p: &Option<String>| {
        p.as_ref()
            .is_some_and(|p| report.branches.iter().any(|b| &b.name == p))
    };
    let mut out = Vec::new();
    fn visit<'a>(
        b: &'a BranchReport,
        depth: usize,
        all: &'a [BranchReport],
        out: &mut Vec<(&'a BranchReport, usize)>,
    ) {
        if out.iter().any(|(o, _)| o.name == b.name) {
            return;
        }
        out.push((b, depth));
        let mut kids: Vec<&BranchReport> = all
            .iter()
            .filter(|c| c.parent.as_deref() == Some(b.name.as_str()))
            .collect();
        kids.sort_by_key(|c| c.start_ns);
        for k in kids {
            visit(k, depth + 1, all, out);
        }
    }
    let mut roots: Vec<&BranchReport> = report
        .branches
        .iter()
        .filter(|b| !known(&b.parent))
        .collect();
    roots.sort_by_key(|b| b.start_ns);
    for r in roots {
        visit(r, 0, &report.branches, &mut out);
    }
    // Parents that point at each other (a hand-made file): shown as roots all the same.
    for b in &report.branches {
        visit(b, 0, &report.branches, &mut out);
    }
    out
}

/// A tick step of about a tenth of `span_ns`, rounded to 1, 2 or 5 times a power of ten.
fn tick_step(span_ns: u64) -> u64 {
    let rough = (span_ns as f64 / 10.0).max(1.0);
    let pow = 10f64.powf(rough.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * pow)
        .find(|s| *s >= rough)
        .unwrap_or(10.0 * pow);
    step as u64
}

fn label_time(ns: u64, step: u64) -> String {
    if step >= 1_000_000_000 {
        format!("{:.0} s", ns as f64 / 1e9)
    } else if step >= 1_000_000 {
        format!("{:.0} ms", ns as f64 / 1e6)
    } else {
        format!("{:.0} µs", ns as f64 / 1e3)
    }
}

/// The chart of `report`, with `times[i]` the instants of branch `i`'s process events
/// (same order as `report.branches`) and their kinds.
pub fn chart(report: &Report, times: &[Vec<(u64, String)>]) -> String {
    let rows = rows(report);
    let span = report.end_ns.saturating_sub(report.start_ns).max(1);
    let plot = WIDTH - LABEL - RIGHT;
    let x =
        |ns: u64| LABEL + (ns.saturating_sub(report.start_ns) as f64 / span as f64).min(1.0) * plot;
    let height = TOP + ROW * rows.len() as f64 + 20.0;
    let row_y = |name: &str| {
        rows.iter()
            .position(|(b, _)| b.name == name)
            .map(|i| TOP + ROW * i as f64 + ROW / 2.0)
    };
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        s,
        r#"<title>forkscope: {} branches over {:.3} s</title>"#,
        rows.len(),
        span as f64 / 1e9
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    // The time axis.
    let step = tick_step(span).max(span / 20).max(1);
    let mut t: u64 = 0;
    while t <= span {
        let tx = x(report.start_ns.saturating_add(t));
        let _ = writeln!(
            s,
            r##"<line x1="{tx:.1}" y1="{}" x2="{tx:.1}" y2="{:.1}" stroke="#e4e4e4"/><text x="{tx:.1}" y="{}" text-anchor="middle" fill="#555">{}</text>"##,
            TOP - 8.0,
            height - 20.0,
            TOP - 14.0,
            label_time(t, step)
        );
        let Some(next) = t.checked_add(step) else {
            break;
        };
        t = next;
    }
    for (i, (b, depth)) in rows.iter().enumerate() {
        let y = TOP + ROW * i as f64 + ROW / 2.0;
        let _ = writeln!(s, r#"<g class="branch" data-branch="{}">"#, escape(&b.name));
        let _ = writeln!(
            s,
            r##"<text x="{:.1}" y="{:.1}" fill="#222">{}</text>"##,
            8.0 + 12.0 * *depth as f64,
            y + 4.0,
            escape(&b.name)
        );
        let (Some(start), Some(end)) = (b.start_ns, b.end_ns) else {
            // No records: its name only.
            let _ = writeln!(s, "</g>");
            continue;
        };
        let (x0, x1) = (x(start), x(end).max(x(start) + 2.0));
        let _ = writeln!(
            s,
            r##"<rect class="life" x="{x0:.1}" y="{:.1}" width="{:.1}" height="{BAR}" fill="#eef2f7" stroke="#9fb3c8"><title>{}: {} events</title></rect>"##,
            y - BAR / 2.0,
            x1 - x0,
            escape(&b.name),
            b.events
        );
        // One tick per pixel column with events, colored by the first kind there.
        let idx = report
            .branches
            .iter()
            .position(|r| r.name == b.name)
            .expect("a row is a branch");
        let mut seen = std::collections::BTreeSet::new();
        for (ts, kind) in times.get(idx).into_iter().flatten() {
            let px = x(*ts).round() as i64;
            if seen.insert(px) {
                let _ = writeln!(
                    s,
                    r#"<rect class="tick" x="{px}" y="{:.1}" width="1.5" height="{:.1}" fill="{}"/>"#,
                    y - BAR / 2.0 + 2.0,
                    BAR - 4.0,
                    color(kind)
                );
            }
        }
        for f in &b.forks {
            let fx = x(f.ts_ns);
            for child in &f.into {
                if let Some(cy) = row_y(child) {
                    let cx = x(f.ts_ns.saturating_add(f.duration_ns));
                    let _ = writeln!(
                        s,
                        r##"<path class="fork" d="M{fx:.1},{y:.1} L{fx:.1},{cy:.1} L{cx:.1},{cy:.1}" fill="none" stroke="#555" stroke-dasharray="3,2"><title>fork {} -> {}: {:.2} ms</title></path>"##,
                        escape(&b.name),
                        escape(child),
                        f.duration_ns as f64 / 1e6
                    );
                }
            }
            let _ = writeln!(
                s,
                r##"<circle class="fork-point" cx="{fx:.1}" cy="{y:.1}" r="3.5" fill="#555"><title>fork of {} into {}: {:.2} ms</title></circle>"##,
                escape(&b.name),
                escape(&f.into.join(", ")),
                f.duration_ns as f64 / 1e6
            );
        }
        for c in &b.commits {
            let cx = x(c.ts_ns);
            let _ = writeln!(
                s,
                r##"<path class="commit" d="M{cx:.1},{:.1} l6,9 l-6,9 l-6,-9 z" fill="#2a9d3a"><title>commit of {} into {}: {:.2} ms</title></path>"##,
                y - 9.0,
                escape(&b.name),
                escape(&c.into.join(", ")),
                c.duration_ns as f64 / 1e6
            );
        }
        let _ = writeln!(s, "</g>");
    }
    let legend = [
        ("file", "#3b73b9"),
        ("net", "#e07b24"),
        ("proc", "#3a9a4a"),
        ("page", "#8c5bb5"),
    ];
    for (i, (name, c)) in legend.iter().enumerate() {
        let lx = LABEL + 70.0 * i as f64;
        let _ = writeln!(
            s,
            r##"<rect x="{lx:.1}" y="{:.1}" width="10" height="10" fill="{c}"/><text x="{:.1}" y="{:.1}" fill="#555">{name}</text>"##,
            height - 14.0,
            lx + 14.0,
            height - 5.0
        );
    }
    s.push_str("</svg>\n");
    s
}

/// The instants and kinds of the process events of each branch in `traces`.
pub fn event_times(traces: &[(String, Vec<serde_json::Value>)]) -> Vec<Vec<(u64, String)>> {
    traces
        .iter()
        .map(|(_, records)| {
            records
                .iter()
                .filter_map(|r| {
                    let kind = r["kind"].as_str()?;
                    (!super::is_operation(kind))
                        .then(|| (r["ts_ns"].as_u64().unwrap_or(0), kind.to_string()))
                })
                .collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round() {
        assert_eq!(tick_step(1_000_000_000), 100_000_000);
        assert_eq!(tick_step(3_000_000), 500_000);
        assert_eq!(tick_step(15), 2);
    }

    #[test]
    fn one_group_per_branch_children_under_their_parent() {
        let traces = vec![
            (
                "b<1>".to_string(),
                vec![
                    serde_json::json!({"ts_ns": 10, "cgroup": 0, "pid": 0, "tid": 0, "comm": "forkscope", "kind": "branch_start", "parent": "root"}),
                ],
            ),
            (
                "root".to_string(),
                vec![
                    serde_json::json!({"ts_ns": 1, "cgroup": 0, "pid": 3, "tid": 3, "comm": "sh", "kind": "file_write", "path": "/a", "bytes": 1}),
                    serde_json::json!({"ts_ns": 5, "cgroup": 0, "pid": 0, "tid": 0, "comm": "forkscope", "kind": "branch_fork", "duration_ns": 5, "children": ["b<1>"]}),
                ],
            ),
        ];
        let r = super::super::report(&traces);
        let svg = chart(&r, &event_times(&traces));
        assert_eq!(svg.matches(r#"class="branch""#).count(), 2);
        let root = svg.find(r#"data-branch="root""#).unwrap();
        let kid = svg.find(r#"data-branch="b&lt;1&gt;""#).unwrap();
        assert!(root < kid, "the parent's row comes first");
        assert_eq!(svg.matches(r#"class="fork""#).count(), 1);
        assert!(!svg.contains("b<1>"), "names are escaped everywhere");
        assert_eq!(svg.matches(r#"class="tick""#).count(), 1);
    }
}
