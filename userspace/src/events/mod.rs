//! Events from the kernel, as userspace handles them: [`decode`] turns ring-buffer records
//! into typed values, [`resolve`] names files and destinations (absolute paths, IP
//! addresses), [`record`] is the JSON shape researchers read ([`jsonl`] writes it fast),
//! [`summary`] totals a trace, and [`runs`] harvests the writes the kernel merged and has
//! not sent yet; [`egress`] makes `net_send` records from the packets of branches traced
//! without per-write detail.

pub mod decode;
pub mod egress;
pub mod jsonl;
pub mod record;
pub mod resolve;
pub mod runs;
pub mod summary;

pub use decode::{RawEvent, decode};
pub use record::TraceEvent;
pub use resolve::Resolver;
pub use summary::Summary;
