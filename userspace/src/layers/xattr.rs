//! Extended attributes of files, read and written by path: overlayfs's own (`opaque`,
//! `origin`) on the files of layers and upper directories.

use std::{ffi::CString, os::unix::ffi::OsStrExt, path::Path};

fn c(s: &[u8]) -> std::io::Result<CString> {
    CString::new(s).map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))
}

/// Attribute `name` of `path` (of the symlink itself unless `follow`), if it has a
/// non-empty one of at most 256 bytes.
pub fn get(path: &Path, name: &str, follow: bool) -> Option<Vec<u8>> {
    let (p, name) = (
        c(path.as_os_str().as_bytes()).ok()?,
        c(name.as_bytes()).ok()?,
    );
    let mut buf = [0u8; 256];
    let get = if follow {
        libc::getxattr
    } else {
        libc::lgetxattr
    };
    // SAFETY: NUL-terminated strings and a buffer of the given length.
    let n = unsafe {
        get(
            p.as_ptr(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    (n > 0).then(|| buf[..n as usize].to_vec())
}

/// Sets attribute `name` of `path` (of the symlink itself unless `follow`) to `value`.
pub fn set(path: &Path, name: &str, value: &[u8], follow: bool) -> std::io::Result<()> {
    let (p, name) = (c(path.as_os_str().as_bytes())?, c(name.as_bytes())?);
    let set = if follow {
        libc::setxattr
    } else {
        libc::lsetxattr
    };
    // SAFETY: NUL-terminated strings and a value of the given length.
    let r = unsafe {
        set(
            p.as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
