//! One trace event as one JSON line, written straight into a buffer: the bytes of
//! `serde_json::to_vec(&event)` and a newline (the tests hold them equal, field by field),
//! at a fraction of the cost. Field names are constants, integers go through `itoa` (what
//! serde_json uses), and a string that needs no escaping (nearly all: paths, command names)
//! is copied whole; the rare values of other shapes go through serde_json. This is the
//! consumers' hot path (`forkscope trace`, the daemon's per-branch traces): serde_json's
//! token-by-token writes and per-byte escaping were about 40% of the consumer's time.

use std::{borrow::Cow, collections::BTreeMap};

use super::record::TraceEvent;

/// Calls macro `$m` with TraceEvent's optional fields, in the order it declares them
/// (serde's order).
macro_rules! optional_fields {
    ($m:ident) => {
        $m!(
            syscall,
            path,
            new_path,
            src_path,
            offset,
            bytes,
            calls,
            packets,
            size,
            fd,
            flags,
            mode,
            family,
            addr,
            port,
            child_pid,
            filename,
            exit_code,
            signal,
            pages,
            pages_recorded,
            page_ranges,
            truncated,
            parent,
            children,
            target,
            duration_ns,
            phases_us
        )
    };
}

/// Appends `ev` as one JSON object and a newline to `out`.
pub fn write_line(ev: &TraceEvent, out: &mut Vec<u8>) {
    out.extend_from_slice(b"{\"ts_ns\":");
    ev.ts_ns.write_json(out);
    out.extend_from_slice(b",\"cgroup\":");
    ev.cgroup.write_json(out);
    out.extend_from_slice(b",\"pid\":");
    ev.pid.write_json(out);
    out.extend_from_slice(b",\"tid\":");
    ev.tid.write_json(out);
    out.extend_from_slice(b",\"comm\":");
    ev.comm.write_json(out);
    out.extend_from_slice(b",\"kind\":");
    ev.kind.write_json(out);
    // The optional fields, each left out when None as its `skip_serializing_if` says.
    macro_rules! optional {
        ($($field:ident),* $(,)?) => {
            $(
                if let Some(v) = &ev.$field {
                    out.extend_from_slice(concat!(",\"", stringify!($field), "\":").as_bytes());
                    v.write_json(out);
                }
            )*
        };
    }
    optional_fields!(optional);
    out.extend_from_slice(b"}\n");
}

/// A value written as JSON, as serde_json writes it.
trait WriteJson {
    fn write_json(&self, out: &mut Vec<u8>);
}

macro_rules! integers {
    ($($t:ty),*) => {
        $(
            impl WriteJson for $t {
                fn write_json(&self, out: &mut Vec<u8>) {
                    out.extend_from_slice(itoa::Buffer::new().format(*self).as_bytes());
                }
            }
        )*
    };
}
integers!(u16, u32, u64, i32, i64);

impl WriteJson for bool {
    fn write_json(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(if *self { b"true" } else { b"false" });
    }
}

impl WriteJson for str {
    fn write_json(&self, out: &mut Vec<u8>) {
        // serde_json escapes exactly these: control characters, '"' and '\'.
        if self.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
            out.reserve(self.len() + 2);
            out.push(b'"');
            out.extend_from_slice(self.as_bytes());
            out.push(b'"');
        } else {
            serde_fallback(self, out);
        }
    }
}

impl WriteJson for String {
    fn write_json(&self, out: &mut Vec<u8>) {
        self.as_str().write_json(out);
    }
}

impl WriteJson for Cow<'static, str> {
    fn write_json(&self, out: &mut Vec<u8>) {
        self.as_ref().write_json(out);
    }
}

impl WriteJson for Vec<[u64; 2]> {
    fn write_json(&self, out: &mut Vec<u8>) {
        serde_fallback(self, out);
    }
}

impl WriteJson for Vec<String> {
    fn write_json(&self, out: &mut Vec<u8>) {
        serde_fallback(self, out);
    }
}

impl WriteJson for BTreeMap<String, u64> {
    fn write_json(&self, out: &mut Vec<u8>) {
        serde_fallback(self, out);
    }
}

/// Writes `v` with serde_json (which cannot fail for these types: strings, integers and
/// their collections, into a Vec).
fn serde_fallback<T: serde::Serialize + ?Sized>(v: &T, out: &mut Vec<u8>) {
    let written = serde_json::to_writer(&mut *out, v);
    debug_assert!(written.is_ok(), "serde_json failed on a plain value");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every field set, strings that need escaping included. A struct literal without
    /// `..Default::default()`: a field added to TraceEvent fails to compile here until this
    /// test (and `write_line`) covers it.
    fn full() -> TraceEvent {
        TraceEvent {
            ts_ns: u64::MAX,
            cgroup: 12345,
            pid: u32::MAX,
            tid: 7,
            comm: "py\"th\\on\n\u{1}\u{1f} \u{7f}é".into(),
            kind: "file_write".into(),
            syscall: Some("pwrite64".into()),
            path: Some("/tmp/a b/ünï\tcode".into()),
            new_path: Some("/tmp/\"quoted\"".into()),
            src_path: Some("/tmp/back\\slash".into()),
            offset: Some(-1),
            bytes: Some(i64::MIN),
            calls: Some(3),
            packets: Some(4),
            size: Some(i64::MAX),
            fd: Some(-100),
            flags: Some(0o101),
            mode: Some("0644".into()),
            family: Some("inet6".into()),
            addr: Some("::1".into()),
            port: Some(u16::MAX),
            child_pid: Some(99),
            filename: Some("/usr/bin/git".into()),
            exit_code: Some(i32::MIN),
            signal: Some(9),
            pages: Some(0),
            pages_recorded: Some(u64::MAX),
            page_ranges: Some(vec![[0x1000, 0x3000], [u64::MAX - 1, u64::MAX]]),
            truncated: Some(true),
            parent: Some("root".into()),
            children: Some(vec!["a".into(), "b\"c".into()]),
            target: Some("host".into()),
            duration_ns: Some(1),
            phases_us: Some([("freeze".to_string(), 200), ("files".to_string(), 3)].into()),
        }
    }

    fn same_as_serde(ev: &TraceEvent) {
        let mut want = serde_json::to_vec(ev).unwrap();
        want.push(b'\n');
        let mut got = Vec::new();
        write_line(ev, &mut got);
        assert_eq!(
            String::from_utf8_lossy(&got),
            String::from_utf8_lossy(&want)
        );
    }

    #[test]
    fn every_field_is_written_as_serde_json_writes_it() {
        same_as_serde(&full());
        same_as_serde(&TraceEvent::default());
        let mut ev = full();
        ev.truncated = Some(false);
        ev.comm = String::new();
        same_as_serde(&ev);
    }

    #[test]
    fn each_optional_field_left_out_alone_is_left_out_as_serde_json_does() {
        macro_rules! without_each {
            ($($field:ident),*) => {
                $(
                    let mut ev = full();
                    ev.$field = None;
                    same_as_serde(&ev);
                )*
            };
        }
        optional_fields!(without_each);
    }

    #[test]
    fn a_line_reads_back_as_the_event() {
        let mut line = Vec::new();
        write_line(&full(), &mut line);
        let back: TraceEvent = serde_json::from_slice(&line).unwrap();
        assert_eq!(back, full());
    }
}
