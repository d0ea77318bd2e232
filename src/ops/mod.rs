//! Use cases: gather (async, may do network I/O, writes nothing), then one commit (a write
//! closure), then answer. Shared by the client and federation handlers. (The client-side use
//! cases still live in their handlers; they move here as federation needs them.)

pub mod federation;
