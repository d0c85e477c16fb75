//! Dirtied pages: a program that writes a known set of pages is reported with exactly that
//! set, whether the process stores into them or the kernel writes into them (read(2)).

use forkscope_tests::{TempDir, require_root, trace, workload};
use serde_json::Value;

/// Pages of [base, base + pages * 4096) reported dirty for `pid`, as indexes.
fn dirty_indexes(summary: &Value, base: u64, pages: u64) -> Vec<u64> {
    let mut out = Vec::new();
    for r in summary["page_ranges"]
        .as_array()
        .expect("page_ranges with --page-addresses")
    {
        let (start, end) = (r[0].as_u64().unwrap(), r[1].as_u64().unwrap());
        let mut a = start;
        while a < end {
            if a >= base && a < base + pages * 4096 {
                out.push((a - base) / 4096);
            }
            a += 4096;
        }
    }
    out.sort_unstable();
    out
}

/// How many pages the `page_ranges` of a page_dirty_summary cover.
fn pages_in_ranges(summary: &Value) -> u64 {
    summary["page_ranges"]
        .as_array()
        .expect("page_ranges with --page-addresses")
        .iter()
        .map(|r| (r[1].as_u64().unwrap() - r[0].as_u64().unwrap()) / 4096)
        .sum()
}

#[test]
fn a_known_set_of_written_pages_is_reported_exactly() {
    require_root();
    let dir = TempDir::new("pages");
    let bin = workload("pagewriter");
    let run = trace(
        dir.path(),
        &["--page-addresses"],
        &[
            bin.to_str().unwrap(),
            "--pages",
            "64",
            "--write",
            "0,3,4,5,31,63",
            "--read-into",
            "10,40",
        ],
    );
    assert_eq!(run.code(), Some(0), "{}", run.stderr());
    let stdout = String::from_utf8_lossy(&run.output.stdout);
    let info: Value = serde_json::from_str(stdout.trim()).expect("pagewriter output");
    let base = info["base"].as_u64().unwrap();
    let exec = run
        .of_kind("proc_exec")
        .find(|e| e["filename"].as_str().unwrap().ends_with("pagewriter"))
        .unwrap();
    let pid = exec["pid"].as_u64().unwrap();
    let summary = run
        .of_kind("page_dirty_summary")
        .find(|e| e["pid"].as_u64() == Some(pid))
        .expect("summary");
    assert_eq!(
        dirty_indexes(summary, base, 64),
        vec![0, 3, 4, 5, 10, 31, 40, 63]
    );
    // The count covers the whole process (stack, heap, libraries), so it is at least the set.
    let ranges_total = pages_in_ranges(summary);
    assert_eq!(
        summary["pages"].as_u64().unwrap(),
        ranges_total,
        "count equals the reported set"
    );
    assert_eq!(summary["bytes"].as_u64().unwrap(), ranges_total * 4096);
}

#[test]
fn writing_more_pages_is_charged_exactly_that_many_more() {
    require_root();
    let dir = TempDir::new("pages-delta");
    let bin = workload("pagewriter");
    let pages_of = |write: &str| {
        let run = trace(
            dir.path(),
            &[],
            &[bin.to_str().unwrap(), "--pages", "512", "--write", write],
        );
        assert_eq!(run.code(), Some(0), "{}", run.stderr());
        let exec = run.of_kind("proc_exec").last().unwrap();
        let pid = exec["pid"].as_u64();
        run.of_kind("page_dirty_summary")
            .find(|e| e["pid"].as_u64() == pid)
            .unwrap()["pages"]
            .as_u64()
            .unwrap()
    };
    let none = pages_of("");
    let all: Vec<String> = (0..300).map(|i| i.to_string()).collect();
    let many = pages_of(&all.join(","));
    // Allow a page or two of noise from the larger argument list on the stack.
    let extra = many - none;
    assert!(
        (300..=303).contains(&extra),
        "writing 300 pages added {extra} dirty pages ({none} -> {many})"
    );
}

#[test]
fn a_page_set_too_small_for_the_process_says_so_instead_of_losing_pages_silently() {
    require_root();
    let dir = TempDir::new("pages-full");
    let bin = workload("pagewriter");
    // One page in each of 1,000 regions of 2 MiB: the set needs 1,000 entries (and a few
    // for the stack, heap and libraries).
    let every_region: Vec<String> = (0..1000).map(|i| (i * 512).to_string()).collect();
    let every_region = every_region.join(",");
    let summary_of = |capacity: &str| {
        let summary_file = dir.path().join("summary.json");
        let run = trace(
            dir.path(),
            &[
                "--dirty-regions",
                capacity,
                "--summary-json",
                summary_file.to_str().unwrap(),
                "--page-addresses",
            ],
            &[
                bin.to_str().unwrap(),
                "--pages",
                "512000",
                "--write",
                &every_region,
            ],
        );
        assert_eq!(run.code(), Some(0), "{}", run.stderr());
        let pid = run.of_kind("proc_exec").last().unwrap()["pid"].as_u64();
        let page_summary = run
            .of_kind("page_dirty_summary")
            .find(|e| e["pid"].as_u64() == pid)
            .expect("a page_dirty_summary for pagewriter")
            .clone();
        let totals: Value = serde_json::from_slice(&std::fs::read(&summary_file).unwrap()).unwrap();
        (page_summary, totals, run.stderr())
    };

    let (roomy, totals, stderr) = summary_of("131072");
    let pages = roomy["pages"].as_u64().unwrap();
    assert!(pages >= 1000, "{roomy}");
    assert!(roomy.get("pages_recorded").is_none(), "{roomy}");
    assert_eq!(totals["pages_inexact"], 0, "{totals}");
    assert!(!stderr.contains("inexact"), "{stderr}");

    let (full, totals, stderr) = summary_of("256");
    let recorded = full["pages_recorded"]
        .as_u64()
        .unwrap_or_else(|| panic!("a set of 256 regions cannot hold 1,000: {full}"));
    assert!(recorded < 1000, "{full}");
    assert!(
        full["pages"].as_u64().unwrap() >= pages.min(1000),
        "the count still covers every page written: {full}"
    );
    let ranged = pages_in_ranges(&full);
    assert_eq!(
        ranged, recorded,
        "the ranges are what the set holds: {full}"
    );
    assert_eq!(totals["pages_inexact"], 1, "{totals}");
    assert!(
        stderr.contains("dirtied pages inexact for 1 processes")
            && stderr.contains("--dirty-regions"),
        "{stderr}"
    );
}
