//! Embedding Hearth in a desktop application: start a homeserver on a directory and port of
//! your choosing, create a user, and stop cleanly.
//!
//! ```text
//! cargo run --example embed -- /tmp/my-app-data 127.0.0.1:0
//! ```

use std::path::PathBuf;

fn main() -> Result<(), String> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(args.next().unwrap_or_else(|| {
        std::env::temp_dir()
            .join("hearth-embed")
            .display()
            .to_string()
    }));
    let listen = args.next().unwrap_or_else(|| "127.0.0.1:0".into());
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;

    // 1. Configure: a database in the app's data directory, loopback only, no public signup.
    let mut config = hearth::Config::default();
    config.database = dir.join("hearth.db");
    config.listen = vec![listen.parse().map_err(|e| format!("{listen}: {e}"))?];
    config.registration = hearth::config::Registration::Closed;

    // 2. Start: the server runs on its own thread; this call returns once it is listening.
    let hs = hearth::Homeserver::start(config)?;
    let addr = hs.addrs()[0];
    println!("homeserver {} listening on http://{addr}", hs.server_name());

    // 3. Create the app's user (idempotent across runs of the example).
    match hs.create_user("me", Some("correct horse battery staple"), true) {
        Ok(user) => println!("created {user}"),
        Err(e) if e.contains("M_USER_IN_USE") => println!("user already exists"),
        Err(e) => return Err(e),
    }

    // 4. Use it: any Matrix client library can now log in at http://{addr}.
    let body = ureq_free_get(addr, "/_matrix/client/versions")?;
    println!("GET /_matrix/client/versions -> {body}");

    // 5. Stop: finishes in-flight writes, checkpoints the WAL, joins the server thread.
    hs.stop()?;
    println!("stopped cleanly");
    Ok(())
}

/// A minimal HTTP GET over std, so the example needs nothing beyond Hearth itself.
fn ureq_free_get(addr: std::net::SocketAddr, path: &str) -> Result<String, String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).map_err(|e| e.to_string())?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut out = String::new();
    s.read_to_string(&mut out).map_err(|e| e.to_string())?;
    Ok(out.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned())
}
