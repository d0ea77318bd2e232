//! Builds the resident of the faster-joins benchmark (`bench/joins.sh`; ignored in the normal
//! suite): a Hearth database holding one public room with N local members, made through the
//! library (`ops::rooms::join` in-process) because registering 10,000 users through the client
//! API would spend minutes hashing passwords. The script then serves the database with the
//! `hearth` binary, so the joiners talk to a real process.
//!
//! Knobs (environment): `JOINBENCH_DB` (the database file to create; must not exist),
//! `JOINBENCH_SERVER_NAME` (`127.0.0.1:PORT`, the name the binary will serve it under: the
//! room ID and every event carry it), `JOINBENCH_MEMBERS` (N, default 1,000). Writes the room
//! ID to `<JOINBENCH_DB>.room`.

use std::time::Instant;

use hearth::ops::rooms::{create_room, join, NewRoom};
use ruma::{OwnedUserId, RoomVersionId};

/// Joins in flight at once: the writer commits every waiting write in one transaction, so
/// this many joins cost one fsync instead of one each.
const CONCURRENT_JOINS: usize = 200;

#[test]
#[ignore]
fn build_join_bench_resident() {
    let db = std::path::PathBuf::from(std::env::var("JOINBENCH_DB").expect("JOINBENCH_DB"));
    let server_name = std::env::var("JOINBENCH_SERVER_NAME").expect("JOINBENCH_SERVER_NAME");
    let members: usize = std::env::var("JOINBENCH_MEMBERS")
        .ok()
        .map(|n| n.parse().expect("JOINBENCH_MEMBERS is a number"))
        .unwrap_or(1000);
    assert!(!db.exists(), "{} exists already", db.display());
    let mut c = hearth::Config {
        database: db.clone(),
        listen: vec!["127.0.0.1:0".parse().unwrap()],
        server_name,
        ..Default::default()
    };
    c.rate_limits.enabled = false;
    let hs = hearth::Homeserver::start(c).unwrap();
    let app = hs.app().clone();
    let owner = hs.create_user("owner", None, false).unwrap();
    let room_id = smol::block_on(create_room(
        &app,
        &owner,
        NewRoom {
            version: RoomVersionId::V10,
            alias: None,
            public: true,
            preset: "public_chat".into(),
            creation: serde_json::json!({}),
            power_levels_override: None,
            initial_state: Vec::new(),
            name: Some(format!("{members} members")),
            topic: None,
            invite: Vec::new(),
            is_direct: false,
        },
    ))
    .unwrap();

    let t = Instant::now();
    let users: Vec<OwnedUserId> = (0..members)
        .map(|i| hs.create_user(&format!("m{i}"), None, false).unwrap())
        .collect();
    eprintln!("setup: {members} users created in {:?}", t.elapsed());
    let t = Instant::now();
    for chunk in users.chunks(CONCURRENT_JOINS) {
        let joins: Vec<_> = chunk
            .iter()
            .map(|u| {
                let (app, room_id, u) = (app.clone(), room_id.clone(), u.clone());
                smol::spawn(async move { join(&app, &room_id, &u, None, vec![]).await })
            })
            .collect();
        smol::block_on(async {
            for j in joins {
                j.await.unwrap();
            }
        });
    }
    eprintln!(
        "setup: {members} members joined {room_id} in {:?}",
        t.elapsed()
    );
    hs.stop().unwrap();
    let mut room_file = db.into_os_string();
    room_file.push(".room");
    std::fs::write(&room_file, room_id.as_str()).unwrap();
}
