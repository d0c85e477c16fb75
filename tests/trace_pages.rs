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
    let ranges_total: u64 = summary["page_ranges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r[1].as_u64().unwrap() - r[0].as_u64().unwrap()) / 4096)
        .sum();
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
