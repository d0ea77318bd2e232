//! Use cases: gather (async, may do network I/O, writes nothing), then one commit (a write
//! closure), then answer. The client handlers, the federation handlers, the CLI and embedders
//! call these; handlers only parse the request (ruma's types) and shape the answer.

pub mod account;
pub mod e2ee;
pub mod edu;
pub mod events;
pub mod federation;
pub mod knock;
pub mod partial;
pub mod profile;
pub mod push;
pub mod rooms;
