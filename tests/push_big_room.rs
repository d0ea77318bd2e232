//! The push evaluator's cost for one message in a room of 10,000 LOCAL members
//! (`bench/push_big_room.sh` runs this in release mode; ignored in the normal suite).
//!
//! Works on a COPY of the faster-joins resident (`tests/join_bench.rs` builds it:
//! `PUSH_BIG_DB`, default `/tmp/hearth-joins/resident-10000-8680.db`, room ID in the `.room`
//! file beside it, server name `127.0.0.1:8680`). The room's creator sends one message, then
//! `ops::push::evaluate` (the evaluator's read) evaluates it for every member with a fresh
//! rule cache (cold: every member's rules loaded) and again with the same cache (warm, median
//! of `PUSH_BIG_RUNS`). Prints `BENCH` lines, including the process's resident memory before
//! and after the cold run while the cache is still alive (what the cache holds for the
//! members: the resident's evaluator keeps its cache for its whole life).

mod common;

use std::{
    alloc::{GlobalAlloc, Layout, System},
    sync::{
        atomic::{AtomicIsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use hearth::{
    ops::push::{evaluate, RulesCache},
    room::build::NewEvent,
    store::queries as q,
};
use ruma::{OwnedRoomId, OwnedUserId};
use serde_json::json;

/// Counts the bytes the Rust heap holds (SQLite's own allocations are not counted), so what the
/// rule cache keeps is measured apart from the page cache and the allocator's slack.
struct Counting;

static HELD: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        HELD.fetch_add(layout.size() as isize, Ordering::Relaxed);
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        HELD.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        HELD.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn held_mib() -> f64 {
    HELD.load(Ordering::Relaxed) as f64 / (1024.0 * 1024.0)
}

/// The process's resident set size in KiB (`VmRSS`).
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[test]
#[ignore]
fn bench_push_evaluation_in_a_10000_member_room() {
    let src = std::env::var("PUSH_BIG_DB")
        .unwrap_or_else(|_| "/tmp/hearth-joins/resident-10000-8680.db".into());
    let runs: usize = std::env::var("PUSH_BIG_RUNS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(10);
    let room = std::fs::read_to_string(format!("{src}.room")).expect("the .room file");
    let room = room.trim().to_owned();
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::config_in(dir.path());
    std::fs::copy(&src, &config.database).expect("copy of the resident database");
    config.server_name = "127.0.0.1:8680".into();
    // The bench drives the evaluator's read itself: the worker would evaluate the whole
    // history of the room first.
    config.push.evaluate = false;
    let hs = hearth::Homeserver::start(config).unwrap();
    let app = hs.app().clone();
    let server = hs.server_name().to_owned();

    let room_id = OwnedRoomId::try_from(room.as_str()).unwrap();
    let r = room.clone();
    let creator = smol::block_on(app.store.read(move |c| {
        let create = q::get_current_state(c, &r, "m.room.create", "")?.unwrap();
        Ok(q::get_event(c, &create)?.unwrap().sender)
    }))
    .unwrap();
    let creator = OwnedUserId::try_from(creator).unwrap();
    let ev = smol::block_on(hearth::ops::events::send_event(
        &app,
        &creator,
        "BENCH",
        room_id,
        NewEvent::message(
            "m.room.message",
            json!({ "msgtype": "m.text", "body": "hello everyone" }),
        ),
        None,
    ))
    .unwrap();
    let pos = smol::block_on(
        app.store
            .read(move |c| Ok(q::get_event(c, &ev)?.map_or(0, |r| r.pos))),
    )
    .unwrap();

    let one = |cache: &Arc<RulesCache>| {
        let (server, cache) = (server.clone(), Arc::clone(cache));
        let t = Instant::now();
        let batch = smol::block_on(
            app.store
                .read(move |c| evaluate(c, &server, &cache, pos - 1, pos - 1)),
        )
        .unwrap();
        (t.elapsed(), batch.found.len())
    };
    // What one parsed default rule set costs, for scale.
    let h = held_mib();
    let sets: Vec<_> = (0..100)
        .map(|i| {
            let u = OwnedUserId::try_from(format!("@m{i}:127.0.0.1:8680")).unwrap();
            hearth::ops::push::default_rules(&u)
        })
        .collect();
    eprintln!(
        "BENCH one parsed default rule set: {:.1} KiB",
        (held_mib() - h) * 1024.0 / sets.len() as f64
    );
    drop(sets);
    // The same for stored sets parsed on a reader thread, as the evaluator does.
    let h = held_mib();
    let who = creator.to_string();
    let parsed = smol::block_on(app.store.read(move |c| {
        (0..100)
            .map(|_| hearth::ops::push::load_rules(c, &who))
            .collect::<hearth::error::Result<Vec<_>>>()
    }))
    .unwrap();
    eprintln!(
        "BENCH one stored rule set parsed on a reader thread: {:.1} KiB",
        (held_mib() - h) * 1024.0 / parsed.len() as f64
    );
    drop(parsed);
    let cache = Arc::new(RulesCache::default());
    let (before, held_before) = (rss_kib(), held_mib());
    let (cold, notified) = one(&cache);
    let (after, held_after) = (rss_kib(), held_mib());
    eprintln!(
        "BENCH 10000-member room, one message, cold (rules loaded): {:.1} ms, {notified} members notified",
        ms(cold)
    );
    eprintln!(
        "BENCH resident memory: {} MiB before, {} MiB after the cold evaluation (+{} MiB, the cache alive)",
        before / 1024,
        after / 1024,
        after.saturating_sub(before) / 1024
    );
    eprintln!(
        "BENCH Rust heap held by the rule cache after the cold evaluation: {:.2} MiB ({:.1} MiB before, {:.1} MiB after)",
        held_after - held_before,
        held_before,
        held_after
    );
    let mut warm: Vec<Duration> = (0..runs).map(|_| one(&cache).0).collect();
    warm.sort();
    let median = warm[warm.len() / 2];
    eprintln!(
        "BENCH 10000-member room, one message, warm: median {:.1} ms ({:.1} µs per member; min {:.1}, max {:.1} ms; {runs} runs)",
        ms(median),
        median.as_secs_f64() * 1e6 / notified.max(1) as f64,
        ms(warm[0]),
        ms(warm[warm.len() - 1]),
    );
    eprintln!(
        "BENCH resident memory after the warm runs: {} MiB",
        rss_kib() / 1024
    );
    let held = held_mib();
    drop(cache);
    eprintln!(
        "BENCH Rust heap freed by dropping the rule cache: {:.2} MiB",
        held - held_mib()
    );
    assert!(notified >= 9_999, "every member but the sender is notified");
}
