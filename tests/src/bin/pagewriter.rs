//! Test workload: maps a fresh anonymous region of `--pages N` pages (default 64), writes one
//! byte into each page listed in `--write i,j,...`, has the kernel write into each page listed
//! in `--read-into k,...` (read(2) from /dev/zero, so the fault is the kernel's), then prints
//! `{"base": <address>, "pages": N}` and exits. Pages it does not list are never touched.

use std::io::Read;

fn list(arg: Option<String>) -> Vec<usize> {
    arg.map(|s| {
        s.split(',')
            .filter(|x| !x.is_empty())
            .map(|x| x.parse().expect("page index"))
            .collect()
    })
    .unwrap_or_default()
}

fn main() {
    let mut pages = 64usize;
    let mut writes = None;
    let mut reads = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--pages" => pages = args.next().expect("--pages N").parse().expect("number"),
            "--write" => writes = args.next(),
            "--read-into" => reads = args.next(),
            other => panic!("unknown argument {other}"),
        }
    }
    let len = pages * 4096;
    // SAFETY: an anonymous private mapping with no address hint; checked for MAP_FAILED.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(base, libc::MAP_FAILED, "mmap failed");
    let base = base as *mut u8;
    for i in list(writes) {
        assert!(i < pages);
        // SAFETY: i < pages, so the byte lies inside the mapping.
        unsafe { std::ptr::write_volatile(base.add(i * 4096 + 17), 1) };
    }
    let mut zero = std::fs::File::open("/dev/zero").expect("open /dev/zero");
    for i in list(reads) {
        assert!(i < pages);
        // SAFETY: the 64-byte slice lies inside page i of the mapping, which nothing else uses.
        let buf = unsafe { std::slice::from_raw_parts_mut(base.add(i * 4096 + 100), 64) };
        zero.read_exact(buf).expect("read /dev/zero");
    }
    println!("{{\"base\": {}, \"pages\": {pages}}}", base as usize);
}
