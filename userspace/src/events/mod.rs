//! Events from the kernel, as userspace handles them: [`decode`] turns ring-buffer records
//! into typed values, [`resolve`] names files and destinations (absolute paths, IP addresses),
//! [`record`] is the JSON shape researchers read, and [`summary`] totals a trace.

pub mod decode;
pub mod record;
pub mod resolve;
pub mod summary;

pub use decode::{RawEvent, decode};
pub use record::TraceEvent;
pub use resolve::Resolver;
pub use summary::Summary;
