//! Ring-buffer records to typed events. Records come from the kernel, so every length is
//! checked before a record is read.

use std::mem::size_of;

use forkscope_common::{EventHeader, EventKind, FdEvent, PathEvent, ProcEvent};

/// One event as the eBPF programs sent it.
#[derive(Clone)]
pub enum RawEvent {
    Fd(FdEvent),
    Path(Box<PathEvent>),
    Proc(Box<ProcEvent>),
}

impl RawEvent {
    /// The common header.
    pub fn header(&self) -> &EventHeader {
        match self {
            RawEvent::Fd(e) => &e.hdr,
            RawEvent::Path(e) => &e.hdr,
            RawEvent::Proc(e) => &e.hdr,
        }
    }

    /// The event's kind.
    pub fn kind(&self) -> EventKind {
        EventKind::from_u32(self.header().kind).expect("checked in decode")
    }
}

/// Why a record could not be decoded (a version mismatch between the object and this
/// build, or a corrupt record).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("record of {0} bytes is shorter than an event header")]
    Short(usize),
    #[error("unknown event kind {0}")]
    UnknownKind(u32),
    #[error("record of {len} bytes does not match any shape of kind {kind:?}")]
    BadLength { kind: EventKind, len: usize },
}

/// Reads a `T` from the start of `bytes`, which must be at least `size_of::<T>()` long.
fn read<T: Copy>(bytes: &[u8]) -> T {
    assert!(bytes.len() >= size_of::<T>());
    // SAFETY: the length is checked above, T is a #[repr(C)] plain-data type for which every
    // bit pattern is valid, and read_unaligned copes with any alignment of the buffer.
    unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) }
}

/// Decodes one ring-buffer record.
pub fn decode(bytes: &[u8]) -> Result<RawEvent, DecodeError> {
    if bytes.len() < size_of::<EventHeader>() {
        return Err(DecodeError::Short(bytes.len()));
    }
    let hdr: EventHeader = read(bytes);
    let kind = EventKind::from_u32(hdr.kind).ok_or(DecodeError::UnknownKind(hdr.kind))?;
    let len = bytes.len();
    use EventKind::*;
    let fd_ok = matches!(
        kind,
        FileWrite
            | FileTruncate
            | FileMeta
            | FileMmap
            | NetConnect
            | NetSend
            | NetDenied
            | NetBuffered
            | Chdir
            | FileClone
    );
    let path_ok = matches!(
        kind,
        FileOpen
            | FileTruncate
            | FileRename
            | FileUnlink
            | FileMkdir
            | FileMeta
            | Chdir
            | FileLink
            | FileSymlink
            | FileMknod
    );
    let proc_ok = matches!(kind, ProcFork | ProcExec | ProcExit);
    if fd_ok && len == size_of::<FdEvent>() {
        Ok(RawEvent::Fd(read(bytes)))
    } else if path_ok && len == size_of::<PathEvent>() {
        Ok(RawEvent::Path(Box::new(read(bytes))))
    } else if proc_ok && len == size_of::<ProcEvent>() {
        Ok(RawEvent::Proc(Box::new(read(bytes))))
    } else {
        Err(DecodeError::BadLength { kind, len })
    }
}

/// The text of a NUL-terminated byte buffer (lossy UTF-8).
pub fn c_str(buf: &[u8]) -> String {
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use forkscope_common::{COMM_LEN, PATH_LEN};

    pub fn header(kind: EventKind, pid: u32) -> EventHeader {
        let mut comm = [0u8; COMM_LEN];
        comm[..4].copy_from_slice(b"test");
        EventHeader {
            kind: kind as u32,
            syscall: 1,
            pid,
            tid: pid,
            ts_ns: 42,
            cgroup: 7,
            comm,
        }
    }

    pub fn bytes_of<T>(v: &T) -> Vec<u8> {
        // SAFETY: reads size_of::<T>() bytes of a live value for the test.
        unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), size_of::<T>()) }.to_vec()
    }

    pub fn path_event(kind: EventKind, pid: u32, path: &str, path2: &str) -> PathEvent {
        let mut e = PathEvent {
            hdr: header(kind, pid),
            ret: 0,
            flags: 0,
            mode: 0,
            dirfd: forkscope_common::syscalls::AT_FDCWD,
            dirfd2: forkscope_common::syscalls::AT_FDCWD,
            dir_dev: 0,
            dir2_dev: 0,
            dir_ino: 0,
            dir2_ino: 0,
            file_dev: 0,
            file_type: 0,
            file_ino: 0,
            arg: 0,
            trunc: 0,
            _pad: 0,
            path: [0; PATH_LEN],
            path2: [0; PATH_LEN],
        };
        e.path[..path.len()].copy_from_slice(path.as_bytes());
        e.path2[..path2.len()].copy_from_slice(path2.as_bytes());
        e
    }

    #[test]
    fn decodes_each_shape_by_kind_and_length() {
        let p = path_event(EventKind::FileRename, 5, "/a", "/b");
        match decode(&bytes_of(&p)).unwrap() {
            RawEvent::Path(e) => {
                assert_eq!(c_str(&e.path), "/a");
                assert_eq!(c_str(&e.path2), "/b");
            }
            _ => panic!("expected a path event"),
        }
        let proc = ProcEvent {
            hdr: header(EventKind::ProcExit, 9),
            child_pid: 0,
            exit_code: 3 << 8,
            filename: [0; PATH_LEN],
        };
        assert!(
            matches!(decode(&bytes_of(&proc)).unwrap(), RawEvent::Proc(e) if e.exit_code == 768)
        );
    }

    #[test]
    fn rejects_short_unknown_and_mismatched_records() {
        assert_eq!(decode(&[0u8; 10]).err(), Some(DecodeError::Short(10)));
        let mut h = header(EventKind::FileWrite, 1);
        h.kind = 999;
        assert_eq!(
            decode(&bytes_of(&h)).err(),
            Some(DecodeError::UnknownKind(999))
        );
        // A FileRename must be a PathEvent: an FdEvent-sized record is refused.
        let mut b = vec![0u8; size_of::<FdEvent>()];
        b[..size_of::<EventHeader>()].copy_from_slice(&bytes_of(&header(EventKind::FileRename, 1)));
        assert!(matches!(decode(&b), Err(DecodeError::BadLength { .. })));
    }
}
