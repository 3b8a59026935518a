//! NBD client: connects to an export (`nbd://` or `nbd+unix://`), negotiates it with the
//! newstyle fixed handshake and runs pipelined requests on one connection.
//!
//! Module map:
//! - [`uri`]: `NbdUri` parsing; [`handshake`]: `NBD_OPT_GO` (with block sizes), falling back
//!   to `NBD_OPT_EXPORT_NAME`; [`client`]: `NbdClient`, the transmission phase;
//!   `inflight`: handle → waiter table and the one reader task; `errors`: reply errno →
//!   engine error, in one place; [`reconnect`]: `Reconnecting`, a client that reconnects
//!   and retries requests across an engine restart; [`fuse`]: a FUSE filesystem showing an export as one file
//!   (`hlstore fuse-attach`), for loop devices where kernel NBD is missing.
//!
//! Invariants:
//! - Wire constants come from [`hlstore_nbd::proto`], shared with the server.
//! - No request waits longer than its timeout; a timeout or any protocol violation kills
//!   the connection, after which every request fails fast with `Unavailable` (and a
//!   [`Reconnecting`] client makes a new connection and sends it again).
//! - Only simple replies are used (structured replies are never requested), so a READ
//!   reply is either the whole data or an error.

pub mod client;
mod errors;
pub mod fuse;
pub mod handshake;
mod inflight;
pub mod reconnect;
pub mod uri;

pub use client::{ClientOptions, NbdClient};
pub use handshake::ExportInfo;
pub use reconnect::{ReconnectPolicy, Reconnecting};
pub use uri::{NbdAddress, NbdUri};
