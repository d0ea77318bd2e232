//! The matrix-rust-sdk (`matrix-sdk` and `matrix-sdk-ui`'s Timeline, what Element X is built
//! on) used as a new user would, against Hearth and against a real Synapse (issue 14). Every
//! scenario runs once per server, as `<scenario>::hearth` and `<scenario>::synapse`, so a
//! difference between the two shows as a failure on one side only.
//!
//! Hearth: the one at `HEARTH_URL` (scripts/test.sh starts it), else `HEARTH_BIN` (default
//! `../../target/debug/hearth`) started here. Synapse: the one on `HEARTH_TEST_SYNAPSE_PORT`,
//! else one started here from `../shared/synapse-peer/` (TLS with a self-signed certificate,
//! so the SDK runs with certificate checks off). Servers started here are stopped by the last
//! test to finish (a test binary has no "after all" hook), so run the whole file.

// The SDK's sync future (with its crypto machinery) is deeper than the default limit.
#![recursion_limit = "256"]

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Mutex, OnceLock,
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{anyhow, bail, ensure, Context, Result};
use matrix_sdk::{
    config::SyncSettings,
    room::MessagesOptions,
    room_preview::RoomPreview,
    ruma::{
        api::client::{
            account::register,
            directory::get_public_rooms_filtered,
            filter::{FilterDefinition, RoomEventFilter, RoomFilter},
            room::{create_room, Visibility},
            sync::sync_events::v3::Filter,
            uiaa::{AuthData, Dummy},
        },
        directory::Filter as DirectoryFilter,
        events::{
            room::{
                encryption::RoomEncryptionEventContent, join_rules::JoinRule,
                member::MembershipState, message::RoomMessageEventContent,
            },
            InitialStateEvent,
        },
        serde::Raw,
        uint, OwnedEventId, OwnedRoomAliasId, OwnedRoomId, OwnedUserId, RoomAliasId, RoomId,
        RoomOrAliasId, UserId,
    },
    Client, Room, RoomState,
};
use matrix_sdk_ui::timeline::{RoomExt, Timeline};
use serde_json::Value;

/// How long any one wait for the server may take before the test fails.
const WAIT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// The two servers

#[derive(Clone, Copy, Debug)]
enum Kind {
    Hearth,
    Synapse,
}

/// A server started by this test binary (or handed to it), stopped by the last test.
struct Server {
    url: String,
    /// Set when this binary started Hearth itself.
    child: Option<Child>,
    /// Set when this binary started Synapse itself (the synapse-peer name to stop).
    synapse_name: Option<String>,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(name) = &self.synapse_name {
            let _ = Command::new("bash")
                .arg(repo_dir().join("../shared/synapse-peer/stop.sh"))
                .arg(name)
                .env("SYNPEER_PURGE", "1")
                .output();
        }
    }
}

fn repo_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

fn wait_for_versions(url: &str) {
    for _ in 0..300 {
        let ok = Command::new("curl")
            .args([
                "-fsSk",
                "--max-time",
                "2",
                &format!("{url}/_matrix/client/versions"),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{url} did not answer /versions within 30 s");
}

fn start_hearth() -> Server {
    if let Ok(url) = std::env::var("HEARTH_URL") {
        return Server {
            url,
            child: None,
            synapse_name: None,
        };
    }
    spawn_hearth(false)
}

/// Starts a Hearth from `HEARTH_BIN` (default `target/debug/hearth`) on a free loopback port.
/// With `tls`, it serves the client and federation APIs over TLS with a self-signed
/// certificate made by the machine's openssl, and accepts self-signed peers
/// (`--insecure-federation-tls`): what it takes to federate with the Synapse started here.
fn spawn_hearth(tls: bool) -> Server {
    let bin = std::env::var("HEARTH_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|_| repo_dir().join("target/debug/hearth"));
    let port = free_port();
    let dir = std::env::temp_dir().join(format!("hearth-sdk-{port}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("a temp dir for Hearth");
    let mut cmd = Command::new(&bin);
    cmd.arg("--database")
        .arg(dir.join("hearth.db"))
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--server-name", &format!("127.0.0.1:{port}")])
        .arg("--no-rate-limit");
    if tls {
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        let out = Command::new("openssl")
            .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
            .args(["ec_paramgen_curve:prime256v1", "-nodes", "-days", "1"])
            .args([
                "-subj",
                "/CN=127.0.0.1",
                "-addext",
                "subjectAltName=IP:127.0.0.1",
            ])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .output()
            .expect("openssl is installed");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        cmd.arg("--tls-cert")
            .arg(cert)
            .arg("--tls-key")
            .arg(key)
            .arg("--insecure-federation-tls");
    }
    let child = cmd
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("server.log")).expect("a log file"))
        .spawn()
        .unwrap_or_else(|e| panic!("starting {} (build it first): {e}", bin.display()));
    let scheme = if tls { "https" } else { "http" };
    let server = Server {
        url: format!("{scheme}://127.0.0.1:{port}"),
        child: Some(child),
        synapse_name: None,
    };
    wait_for_versions(&server.url);
    server
}

fn start_synapse() -> Server {
    if let Some(port) = std::env::var("HEARTH_TEST_SYNAPSE_PORT")
        .ok()
        .and_then(|p| p.parse::<u16>().ok())
    {
        return Server {
            url: format!("https://127.0.0.1:{port}"),
            child: None,
            synapse_name: None,
        };
    }
    let port = free_port();
    let name = format!("hearth-sdk-{port}");
    // Synapse lets nobody publish rooms to its directory unless configured to; a public
    // server that has a directory allows it.
    let extra = std::env::temp_dir().join(format!("{name}-extra.yaml"));
    std::fs::write(&extra, "room_list_publication_rules:\n  - action: allow\n")
        .expect("extra config");
    let out = Command::new("bash")
        .arg(repo_dir().join("../shared/synapse-peer/start.sh"))
        .args([&name, &port.to_string()])
        .env("SYNPEER_RESET", "1")
        .env("SYNPEER_EXTRA_CONFIG", &extra)
        .output()
        .expect("synapse-peer/start.sh runs");
    let server = Server {
        url: format!("https://127.0.0.1:{port}"),
        child: None,
        synapse_name: Some(name),
    };
    assert!(
        out.status.success(),
        "starting Synapse failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    server
}

fn servers(kind: Kind) -> &'static Mutex<Option<Server>> {
    static HEARTH: OnceLock<Mutex<Option<Server>>> = OnceLock::new();
    static SYNAPSE: OnceLock<Mutex<Option<Server>>> = OnceLock::new();
    match kind {
        Kind::Hearth => HEARTH.get_or_init(|| Mutex::new(Some(start_hearth()))),
        Kind::Synapse => SYNAPSE.get_or_init(|| Mutex::new(Some(start_synapse()))),
    }
}

fn server_url(kind: Kind) -> String {
    let guard = servers(kind).lock().unwrap_or_else(|p| p.into_inner());
    guard
        .as_ref()
        .expect("the server is running until the last test")
        .url
        .clone()
}

/// Scenarios times two servers, plus the federated ones: the last test to finish stops the
/// servers started here.
const TESTS: usize = 2 * 6 + 1;

struct Finished;

impl Drop for Finished {
    fn drop(&mut self) {
        static DONE: AtomicUsize = AtomicUsize::new(0);
        if DONE.fetch_add(1, Ordering::SeqCst) + 1 == TESTS {
            for kind in [Kind::Hearth, Kind::Synapse] {
                let taken = servers(kind)
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .take();
                drop(taken);
            }
        }
    }
}

/// Each scenario as one test per server.
macro_rules! scenario {
    ($name:ident) => {
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn hearth() {
                super::run(super::Kind::Hearth, super::$name).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn synapse() {
                super::run(super::Kind::Synapse, super::$name).await;
            }
        }
    };
}

async fn run<F, Fut>(kind: Kind, scenario: F)
where
    F: FnOnce(String) -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let _finished = Finished;
    let url = tokio::task::spawn_blocking(move || server_url(kind))
        .await
        .expect("server start");
    if let Err(e) = scenario(url.clone()).await {
        panic!("{kind:?} at {url}: {e:#}");
    }
}

scenario!(invite_shows_inviter_then_chat_through_the_timeline);
scenario!(pagination_reaches_the_rooms_creation);
scenario!(alias_publish_and_removal_update_the_room);
scenario!(room_summary_of_a_public_room);
scenario!(decline_then_accept_an_invite);
scenario!(joining_a_room_everyone_left_is_not_found);

/// A Hearth user and a Synapse user chat in an encrypted room over federation (issue 10). The
/// Hearth here is one started for this test with TLS, so the Synapse can reach it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypted_chat_between_a_hearth_user_and_a_synapse_user() {
    let _finished = Finished;
    let synapse = tokio::task::spawn_blocking(|| server_url(Kind::Synapse))
        .await
        .expect("server start");
    let hearth = tokio::task::spawn_blocking(|| spawn_hearth(true))
        .await
        .expect("hearth start");
    if let Err(e) = encrypted_chat_across_federation(&hearth.url, &synapse).await {
        let log = hearth
            .url
            .rsplit(':')
            .next()
            .map(|port| std::env::temp_dir().join(format!("hearth-sdk-{port}/server.log")))
            .and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        panic!(
            "Hearth {} with Synapse {synapse}: {e:#}\n--- Hearth log (last lines, newest first) ---\n{}",
            hearth.url,
            tail.join("\n")
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers

/// Alice created a private room named `name` and invited Bob, whose SDK has synced the invite.
struct Invited {
    alice: User,
    bob: User,
    /// Alice's view of the room.
    room: Room,
    /// Bob's view of the room, in the invited state.
    invited: Room,
}

async fn invited(url: &str, name: &str) -> Result<Invited> {
    let alice = register_user(url, "alice").await?;
    let bob = register_user(url, "bob").await?;
    let room = create_room(&alice.client, |r| r.name = Some(name.to_owned())).await?;
    room.invite_user_by_id(&bob.id).await.context("invite")?;
    let invited = room_in_state(&bob.client, room.room_id(), RoomState::Invited).await?;
    Ok(Invited {
        alice,
        bob,
        room,
        invited,
    })
}

/// A user of the SDK, with the password to log in again from another device.
struct User {
    client: Client,
    id: OwnedUserId,
    password: String,
    url: String,
}

fn unique(prefix: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{prefix}{nanos}x{}", N.fetch_add(1, Ordering::SeqCst))
}

async fn new_client(url: &str) -> Result<Client> {
    Ok(Client::builder()
        .homeserver_url(url)
        // Synapse's certificate is self-signed; Hearth here is plain HTTP.
        .disable_ssl_verification()
        .build()
        .await?)
}

/// Registers through the SDK (the single `m.login.dummy` stage both servers offer) and sets a
/// display name, as a new user's first steps.
async fn register_user(url: &str, name: &str) -> Result<User> {
    let client = new_client(url).await?;
    let password = format!("pw-{name}-long-enough");
    let mut req = register::v3::Request::new();
    req.username = Some(unique(name));
    req.password = Some(password.clone());
    req.initial_device_display_name = Some("hearth sdk test".to_owned());
    req.auth = Some(AuthData::Dummy(Dummy::new()));
    let res = client
        .matrix_auth()
        .register(req)
        .await
        .context("register")?;
    ensure!(
        client.user_id() == Some(&*res.user_id),
        "the SDK took the registration's session"
    );
    client
        .account()
        .set_display_name(Some(name))
        .await
        .context("set display name")?;
    Ok(User {
        id: res.user_id,
        client,
        password,
        url: url.to_owned(),
    })
}

impl User {
    /// The same account on a new device with empty stores (a fresh login).
    async fn another_device(&self) -> Result<Client> {
        let client = new_client(&self.url).await?;
        client
            .matrix_auth()
            .login_username(&self.id, &self.password)
            .initial_device_display_name("hearth sdk test, second device")
            .await
            .context("login")?;
        Ok(client)
    }

    fn server_name(&self) -> String {
        self.id.server_name().to_string()
    }
}

/// One short sync (a 500 ms long-poll at most).
async fn sync(client: &Client) -> Result<()> {
    client
        .sync_once(SyncSettings::default().timeout(Duration::from_millis(500)))
        .await
        .context("sync")?;
    Ok(())
}

/// Syncs until `check` holds (bounded by [`WAIT`]); `what` names it in the failure.
async fn sync_until<T>(
    client: &Client,
    what: &str,
    mut check: impl FnMut(&Client) -> Option<T>,
) -> Result<T> {
    let start = Instant::now();
    loop {
        sync(client).await?;
        if let Some(v) = check(client) {
            return Ok(v);
        }
        if start.elapsed() > WAIT {
            bail!("waited {WAIT:?} for {what}");
        }
    }
}

async fn room_in_state(client: &Client, room: &RoomId, state: RoomState) -> Result<Room> {
    sync_until(client, &format!("{room} to be {state:?}"), |c| {
        c.get_room(room).filter(|r| r.state() == state)
    })
    .await
}

/// Syncs until `user`'s membership in `room` (as `client` sees it) is `want`. Member events,
/// not the room summary's counts: Synapse sends the summary only to lazy-loading clients.
async fn sync_until_member(
    client: &Client,
    room: &Room,
    user: &UserId,
    want: MembershipState,
) -> Result<()> {
    let start = Instant::now();
    loop {
        sync(client).await?;
        let member = room.get_member_no_sync(user).await?;
        if member.as_ref().is_some_and(|m| *m.membership() == want) {
            return Ok(());
        }
        ensure!(
            start.elapsed() < WAIT,
            "waited {WAIT:?} for {user} to be {want} in {}: {:?}",
            room.room_id(),
            member.map(|m| m.membership().clone())
        );
    }
}

async fn create_room(
    client: &Client,
    f: impl FnOnce(&mut create_room::v3::Request),
) -> Result<Room> {
    let mut req = create_room::v3::Request::new();
    f(&mut req);
    client.create_room(req).await.context("create room")
}

fn status(e: &matrix_sdk::Error) -> Option<u16> {
    e.as_client_api_error().map(|e| e.status_code.as_u16())
}

fn json(raw: &Raw<impl Sized>) -> Value {
    raw.deserialize_as_unchecked::<Value>()
        .unwrap_or(Value::Null)
}

fn alias(server_name: &str, prefix: &str) -> Result<OwnedRoomAliasId> {
    Ok(RoomAliasId::parse(format!(
        "#{}:{server_name}",
        unique(prefix)
    ))?)
}

/// A client syncing in the background, with the event cache on, as an app with a Timeline.
fn sync_in_background(client: &Client) -> Result<tokio::task::JoinHandle<()>> {
    client.event_cache().subscribe()?;
    let c = client.clone();
    Ok(tokio::spawn(async move {
        let _ = c
            .sync(SyncSettings::default().timeout(Duration::from_secs(1)))
            .await;
    }))
}

/// The remote events in a timeline, as JSON, in order.
async fn timeline_events(timeline: &Timeline) -> Vec<Value> {
    timeline
        .items()
        .await
        .iter()
        .filter_map(|item| item.as_event())
        .filter_map(|ev| ev.original_json().map(json))
        .collect()
}

fn bodies(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .filter(|e| e["type"] == "m.room.message")
        .filter_map(|e| e["content"]["body"].as_str().map(str::to_owned))
        .collect()
}

async fn timeline_until(
    timeline: &Timeline,
    what: &str,
    check: impl Fn(&[Value]) -> bool,
) -> Result<()> {
    let start = Instant::now();
    loop {
        let events = timeline_events(timeline).await;
        if check(&events) {
            return Ok(());
        }
        if start.elapsed() > WAIT {
            bail!("waited {WAIT:?} for {what}; the timeline has {events:#?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Scenarios

/// Alice (on Hearth) creates an encrypted room and invites Bob (on Synapse); both send a
/// message, and each one's SDK decrypts the other's: device keys asked of the other server
/// (`/user/keys/query`), a one-time key claimed across (`/user/keys/claim`), the room key
/// delivered as an `m.direct_to_device` EDU.
async fn encrypted_chat_across_federation(hearth: &str, synapse: &str) -> Result<()> {
    let alice = register_user(hearth, "alice").await?;
    let bob = register_user(synapse, "bob").await?;
    let room = create_room(&alice.client, |r| {
        r.name = Some("Secret den".to_owned());
        r.invite = vec![bob.id.clone()];
        r.initial_state = vec![InitialStateEvent::with_empty_state_key(
            RoomEncryptionEventContent::with_recommended_defaults(),
        )
        .to_raw_any()];
    })
    .await?;
    ensure!(
        room.latest_encryption_state().await?.is_encrypted(),
        "the room is not encrypted for its creator"
    );
    let invited = room_in_state(&bob.client, room.room_id(), RoomState::Invited).await?;
    invited.join().await.context("bob joins over federation")?;
    let bob_room = room_in_state(&bob.client, room.room_id(), RoomState::Joined).await?;
    sync_until_member(&alice.client, &room, &bob.id, MembershipState::Join).await?;

    let alice_sync = sync_in_background(&alice.client)?;
    let bob_sync = sync_in_background(&bob.client)?;
    let alice_timeline = room.timeline().await.context("alice's timeline")?;
    let bob_timeline = bob_room.timeline().await.context("bob's timeline")?;

    room.send(RoomMessageEventContent::text_plain(
        "from hearth, encrypted",
    ))
    .await
    .context("alice sends")?;
    decrypted_until(&bob_timeline, "from hearth, encrypted").await?;
    bob_room
        .send(RoomMessageEventContent::text_plain(
            "from synapse, encrypted",
        ))
        .await
        .context("bob sends")?;
    decrypted_until(&alice_timeline, "from synapse, encrypted").await?;
    alice_sync.abort();
    bob_sync.abort();
    Ok(())
}

/// Waits until the timeline holds a message with `body` that arrived encrypted and was
/// decrypted by the SDK.
async fn decrypted_until(timeline: &Timeline, body: &str) -> Result<()> {
    let start = Instant::now();
    loop {
        let items = timeline.items().await;
        let found = items.iter().filter_map(|i| i.as_event()).any(|ev| {
            ev.encryption_info().is_some()
                && ev.content().as_message().is_some_and(|m| m.body() == body)
        });
        if found {
            return Ok(());
        }
        if start.elapsed() > WAIT {
            let seen: Vec<String> = items
                .iter()
                .filter_map(|i| i.as_event())
                .map(|ev| {
                    format!(
                        "{:?} encrypted={} utd={}",
                        ev.content().as_message().map(|m| m.body().to_owned()),
                        ev.encryption_info().is_some(),
                        ev.content().is_unable_to_decrypt()
                    )
                })
                .collect();
            bail!("waited {WAIT:?} for {body:?} decrypted; the timeline has {seen:#?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Register two users, create a room, invite; the invitee's SDK names the inviter (from the
/// inviter's member event in the invite's stripped state); the invitee accepts, and both send
/// and see messages through `matrix-sdk-ui`'s Timeline.
async fn invite_shows_inviter_then_chat_through_the_timeline(url: String) -> Result<()> {
    let Invited {
        alice,
        bob,
        room,
        invited,
    } = invited(&url, "Den").await?;
    let invite = invited.invite_details().await.context("invite details")?;
    ensure!(
        invite.inviter_id == alice.id,
        "inviter id {} is not {}",
        invite.inviter_id,
        alice.id
    );
    let inviter = invite
        .inviter
        .ok_or_else(|| anyhow!("the invite has no inviter member (its stripped state lacks the inviter's m.room.member)"))?;
    ensure!(
        inviter.user_id() == alice.id,
        "inviter {}",
        inviter.user_id()
    );
    ensure!(
        inviter.display_name() == Some("alice"),
        "inviter's name {:?}",
        inviter.display_name()
    );
    ensure!(
        invited.name().as_deref() == Some("Den"),
        "the invite shows the room name: {:?}",
        invited.name()
    );

    invited.join().await.context("accept the invite")?;
    room_in_state(&bob.client, room.room_id(), RoomState::Joined).await?;

    let _a_sync = sync_in_background(&alice.client)?;
    let _b_sync = sync_in_background(&bob.client)?;
    let a_room = alice
        .client
        .get_room(room.room_id())
        .context("alice's room")?;
    let b_room = bob.client.get_room(room.room_id()).context("bob's room")?;
    let a_timeline = a_room.timeline().await.context("alice's timeline")?;
    let b_timeline = b_room.timeline().await.context("bob's timeline")?;

    // Each sends through their Timeline and sees the other's message arrive in theirs.
    let exchange = [
        (&a_timeline, &b_timeline, &alice.id, "hello bob"),
        (&b_timeline, &a_timeline, &bob.id, "hi alice"),
    ];
    for (from, to, sender, body) in exchange {
        from.send(RoomMessageEventContent::text_plain(body).into())
            .await?;
        timeline_until(
            to,
            &format!("{sender}'s {body:?} in the other timeline"),
            |evs| {
                evs.iter()
                    .any(|e| e["sender"] == sender.as_str() && e["content"]["body"] == body)
            },
        )
        .await?;
    }
    // Both see both, in the same order, once each (alice's own one too, once its remote echo
    // replaced the local echo).
    for (who, tl) in [("alice", &a_timeline), ("bob", &b_timeline)] {
        timeline_until(
            tl,
            &format!("both messages once, in order, in {who}'s timeline"),
            |evs| bodies(evs) == ["hello bob", "hi alice"],
        )
        .await?;
    }
    Ok(())
}

/// Messages sent, then a fresh device pages back to the room's creation: with raw `/messages`
/// (every event once, `end` absent only once `m.room.create` was returned) and with the
/// Timeline's back-pagination (which stops when the server says the start was reached).
async fn pagination_reaches_the_rooms_creation(url: String) -> Result<()> {
    const N: usize = 25;
    let alice = register_user(&url, "alice").await?;
    let room = create_room(&alice.client, |r| r.name = Some("History".to_owned())).await?;
    let mut sent: Vec<OwnedEventId> = Vec::new();
    for i in 0..N {
        let res = room
            .send(RoomMessageEventContent::text_plain(format!("m{i}")))
            .await?;
        sent.push(res.response.event_id);
    }
    let expected: Vec<String> = (0..N).map(|i| format!("m{i}")).collect();

    // A limited first sync, so most of the history is behind its prev_batch.
    let mut def = FilterDefinition::default();
    def.room = RoomFilter::default();
    def.room.timeline = RoomEventFilter::default();
    def.room.timeline.limit = Some(uint!(3));
    let limited = SyncSettings::default().filter(Filter::FilterDefinition(def));

    // Raw /messages from the sync's prev_batch, in pages of 7.
    let dev2 = alice.another_device().await?;
    dev2.sync_once(limited.clone())
        .await
        .context("limited sync")?;
    let r2 = dev2
        .get_room(room.room_id())
        .context("room on the second device")?;
    let mut from = r2.last_prev_batch();
    ensure!(from.is_some(), "a limited sync gives a prev_batch");
    let mut seen: Vec<Value> = Vec::new();
    let mut pages = 0;
    loop {
        pages += 1;
        ensure!(pages <= 60, "/messages did not reach the start in 60 pages");
        let mut opts = MessagesOptions::backward().from(from.as_deref());
        opts.limit = uint!(7);
        let page = r2.messages(opts).await.context("/messages")?;
        seen.extend(page.chunk.iter().map(|e| json(e.raw())));
        match page.end {
            Some(end) => from = Some(end),
            None => break,
        }
    }
    let ids: Vec<&str> = seen.iter().filter_map(|e| e["event_id"].as_str()).collect();
    let mut unique_ids = ids.clone();
    unique_ids.sort_unstable();
    unique_ids.dedup();
    ensure!(
        unique_ids.len() == ids.len(),
        "an event came twice in /messages: {ids:?}"
    );
    ensure!(
        seen.last().is_some_and(|e| e["type"] == "m.room.create"),
        "the last event paginated is the room's creation: {:?}",
        seen.last()
    );
    // The sync's timeline holds the last 3; /messages before it, newest first.
    let mut paged: Vec<String> = bodies(&seen);
    paged.reverse();
    ensure!(paged == expected[..N - 3], "/messages gave {paged:?}");

    // The Timeline on a third device, paging back until the SDK says the start is reached.
    let dev3 = alice.another_device().await?;
    dev3.event_cache().subscribe()?;
    dev3.sync_once(limited).await.context("limited sync")?;
    let r3 = dev3
        .get_room(room.room_id())
        .context("room on the third device")?;
    let timeline = r3.timeline().await.context("timeline")?;
    let mut reached = false;
    for _ in 0..60 {
        if timeline
            .paginate_backwards(10)
            .await
            .context("paginate back")?
        {
            reached = true;
            break;
        }
    }
    ensure!(
        reached,
        "the Timeline did not reach the start in 60 back-paginations"
    );
    // The Timeline applies the event cache's updates in a task of its own, so the last page
    // may show a moment after the pagination returned.
    timeline_until(
        &timeline,
        "every message once, in order, after m.room.create",
        |evs| bodies(evs) == expected && evs.first().is_some_and(|e| e["type"] == "m.room.create"),
    )
    .await?;
    let events = timeline_events(&timeline).await;
    let ids: Vec<&str> = events
        .iter()
        .filter_map(|e| e["event_id"].as_str())
        .collect();
    for id in &sent {
        ensure!(
            ids.iter().filter(|i| **i == id.as_str()).count() == 1,
            "{id} once in the Timeline"
        );
    }
    Ok(())
}

/// Search the public room directory of the user's server.
async fn directory_has(client: &Client, term: &str, room: &RoomId) -> Result<bool> {
    let mut req = get_public_rooms_filtered::v3::Request::new();
    let mut filter = DirectoryFilter::new();
    filter.generic_search_term = Some(term.to_owned());
    req.filter = filter;
    let res = client
        .public_rooms_filtered(req)
        .await
        .context("directory search")?;
    Ok(res.chunk.iter().any(|r| r.room_id == room))
}

/// Publish an alias, make it canonical; delete it: it no longer resolves, and the room's
/// `m.room.canonical_alias` drops it (the server sends the new state event).
async fn alias_publish_and_removal_update_the_room(url: String) -> Result<()> {
    let alice = register_user(&url, "alice").await?;
    let bob = register_user(&url, "bob").await?;
    let room = create_room(&alice.client, |r| {
        r.name = Some("Plaza".to_owned());
        r.visibility = Visibility::Public;
        r.preset = Some(create_room::v3::RoomPreset::PublicChat);
    })
    .await?;
    let alias = alias(&alice.server_name(), "plaza")?;
    alice
        .client
        .create_room_alias(&alias, room.room_id())
        .await
        .context("publish alias")?;
    let resolved = bob
        .client
        .resolve_room_alias(&alias)
        .await
        .context("resolve")?;
    ensure!(
        resolved.room_id == room.room_id(),
        "resolves to {}",
        resolved.room_id
    );
    room.privacy_settings()
        .update_canonical_alias(Some(alias.clone()), vec![])
        .await
        .context("set canonical alias")?;
    sync_until(&alice.client, "the canonical alias in the room", |c| {
        c.get_room(room.room_id())
            .filter(|r| r.canonical_alias().as_ref() == Some(&alias))
            .map(|_| ())
    })
    .await?;
    let term = alias.alias().to_owned();
    let start = Instant::now();
    while !directory_has(&bob.client, &term, room.room_id()).await? {
        ensure!(
            start.elapsed() < WAIT,
            "the directory never found the room by its alias"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    alice
        .client
        .remove_room_alias(&alias)
        .await
        .context("delete alias")?;
    ensure!(
        bob.client
            .is_room_alias_available(&alias)
            .await
            .context("resolve deleted")?,
        "a deleted alias does not resolve"
    );
    sync_until(
        &alice.client,
        "the canonical alias gone from the room",
        |c| {
            c.get_room(room.room_id())
                .filter(|r| r.canonical_alias().is_none() && r.alt_aliases().is_empty())
                .map(|_| ())
        },
    )
    .await?;
    let start = Instant::now();
    while directory_has(&bob.client, &term, room.room_id()).await? {
        ensure!(
            start.elapsed() < WAIT,
            "the directory still finds the room by a deleted alias"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

/// A user not in a public room previews it through the SDK (by alias and by ID); the room
/// summary endpoint itself answers (not only the SDK's fallbacks); a private room is 404.
async fn room_summary_of_a_public_room(url: String) -> Result<()> {
    let alice = register_user(&url, "alice").await?;
    let bob = register_user(&url, "bob").await?;
    let local = unique("lobby");
    let room = create_room(&alice.client, |r| {
        r.name = Some("Lobby".to_owned());
        r.topic = Some("come in".to_owned());
        r.visibility = Visibility::Public;
        r.preset = Some(create_room::v3::RoomPreset::PublicChat);
        r.room_alias_name = Some(local.clone());
    })
    .await?;
    let alias = RoomAliasId::parse(format!("#{local}:{}", alice.server_name()))?;
    let id: OwnedRoomId = room.room_id().to_owned();

    let check = |p: &RoomPreview, joined: u64| -> Result<()> {
        ensure!(p.room_id == id, "room id {}", p.room_id);
        ensure!(p.name.as_deref() == Some("Lobby"), "name {:?}", p.name);
        ensure!(p.topic.as_deref() == Some("come in"), "topic {:?}", p.topic);
        ensure!(
            p.canonical_alias.as_ref() == Some(&alias),
            "alias {:?}",
            p.canonical_alias
        );
        ensure!(
            p.num_joined_members == joined,
            "joined members {}",
            p.num_joined_members
        );
        ensure!(
            p.join_rule == Some(JoinRule::Public.into()),
            "join rule {:?}",
            p.join_rule
        );
        ensure!(p.room_type.is_none(), "room type {:?}", p.room_type);
        Ok(())
    };
    let by_alias: &RoomOrAliasId = <&RoomOrAliasId>::from(&*alias);
    let p = bob
        .client
        .get_room_preview(by_alias, vec![])
        .await
        .context("preview by alias")?;
    check(&p, 1)?;
    ensure!(p.state.is_none(), "bob is not in the room: {:?}", p.state);
    let by_id: &RoomOrAliasId = <&RoomOrAliasId>::from(&*id);
    let p = RoomPreview::from_room_summary(&bob.client, id.clone(), by_id, vec![])
        .await
        .context("the room summary endpoint")?;
    check(&p, 1)?;
    let p = RoomPreview::from_room_summary(&bob.client, id.clone(), by_alias, vec![])
        .await
        .context("the room summary endpoint by alias")?;
    check(&p, 1)?;

    // After joining, the summary counts bob and gives his membership.
    bob.client.join_room_by_id(&id).await.context("join")?;
    let p = RoomPreview::from_room_summary(&bob.client, id.clone(), by_id, vec![])
        .await
        .context("summary after joining")?;
    check(&p, 2)?;
    ensure!(
        p.state == Some(RoomState::Joined),
        "membership {:?}",
        p.state
    );

    // A private room bob is not in has no summary for him.
    let private = create_room(&alice.client, |r| r.name = Some("Back office".to_owned())).await?;
    let pid: OwnedRoomId = private.room_id().to_owned();
    match RoomPreview::from_room_summary(
        &bob.client,
        pid.clone(),
        <&RoomOrAliasId>::from(&*pid),
        vec![],
    )
    .await
    {
        Ok(p) => bail!(
            "a private room's summary was given to a non-member: {:?}",
            p.name
        ),
        Err(e) => ensure!(
            status(&e) == Some(404),
            "a private room's summary is 404, got {e:?}"
        ),
    }
    Ok(())
}

/// Decline an invite (the leave comes back at once on a long-poll), be invited again, see the
/// inviter, accept.
async fn decline_then_accept_an_invite(url: String) -> Result<()> {
    let Invited {
        alice,
        bob,
        room,
        invited,
    } = invited(&url, "Club").await?;
    invited.leave().await.context("decline")?;
    ensure!(
        invited.state() == RoomState::Left,
        "declined: {:?}",
        invited.state()
    );

    // A long-poll right after declining returns with the leave, not after its timeout.
    let start = Instant::now();
    let res = bob
        .client
        .sync_once(SyncSettings::default().timeout(Duration::from_secs(20)))
        .await
        .context("long-poll after declining")?;
    let took = start.elapsed();
    let left = res.rooms.left.contains_key(room.room_id());
    // If an earlier short sync already carried the leave the poll may wait; only a leave
    // that is still to come must come at once.
    ensure!(
        left || took < Duration::from_secs(19),
        "the long-poll waited {took:?} without the leave"
    );
    ensure!(
        !left || took < Duration::from_secs(10),
        "the leave came after {took:?}"
    );
    ensure!(
        bob.client
            .get_room(room.room_id())
            .is_some_and(|r| r.state() == RoomState::Left),
        "room left"
    );

    // Alice sees the declined invite as a leave, and invites again.
    sync_until_member(&alice.client, &room, &bob.id, MembershipState::Leave).await?;
    room.invite_user_by_id(&bob.id)
        .await
        .context("invite again")?;
    let invited = room_in_state(&bob.client, room.room_id(), RoomState::Invited).await?;
    let invite = invited.invite_details().await.context("invite details")?;
    ensure!(
        invite.inviter.is_some_and(|m| m.user_id() == alice.id),
        "the second invite names the inviter"
    );
    invited.join().await.context("accept")?;
    room_in_state(&bob.client, room.room_id(), RoomState::Joined).await?;
    sync_until_member(&alice.client, &room, &bob.id, MembershipState::Join).await?;
    Ok(())
}

/// When every member has left a room, joining it (even with a pending invite) is 404: there
/// is no one left to let the user in.
async fn joining_a_room_everyone_left_is_not_found(url: String) -> Result<()> {
    let Invited { room, invited, .. } = invited(&url, "Attic").await?;
    room.leave().await.context("alice leaves")?;
    match invited.join().await {
        Ok(()) => bail!("joined a room nobody is in"),
        Err(e) => ensure!(
            status(&e) == Some(404),
            "joining an emptied room is 404, got {e:?}"
        ),
    }
    Ok(())
}
