//! Branched workspaces on overlayfs, the file side of forking.
//!
//! A branch sees its workspace through an overlay: read-only layers below (the workspace at
//! the branch's start, then immutable snapshot layers), and the branch's own upper directory
//! on top, where overlayfs puts everything the branch changes. Forking a running branch
//! freezes it, copies what its upper directory gained or lost since the previous fork into a
//! new immutable layer ([`snapshot`]), and gives the child the parent's layers plus the new
//! one, under an empty upper directory of its own: the child sees the parent's files as they
//! were at the fork point, and the cost follows what changed since the previous fork, not the
//! size of the workspace. A layer in use by a mounted overlay is never modified.
//!
//! - [`base`]: a root branch's base layer, hard links to the workspace as it was at `run`;
//! - [`flatten`]: merging a deep chain of layers into one;
//! - [`overlay`]: mounting and unmounting an overlay stack;
//! - [`scan`]: walking an upper directory (whiteouts, opaque directories, change times);
//! - [`snapshot`]: delta copies of an upper directory into a new layer;
//! - [`diff`]: what a branch changed since its fork point;
//! - [`xattr`]: extended attributes (overlayfs's opaque and origin marks).

pub mod base;
pub mod diff;
pub mod flatten;
pub mod overlay;
pub mod scan;
pub mod snapshot;
pub mod xattr;
