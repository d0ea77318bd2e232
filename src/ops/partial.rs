//! Partial-state joins (MSC3706, MSC3902, MSC3943): the resident server's side.
//!
//! A server that asks `/send_join` with `omit_members=true` gets the state before the join
//! without most membership events, so joining a room of 10,000 members costs a few dozen
//! events instead of 10,000; it then fetches the full state in the background (`/state_ids`,
//! `/state`, `/event` at the join, served by `http::federation::events`).

use std::collections::HashSet;

use crate::{
    error::{Error, Result},
    store::{partial as p, queries as q, Connection},
};

/// How many heroes `/sync`'s room summary names (the spec's "up to 5").
const HEROES: usize = 5;

/// The event IDs a partial-state `/send_join` answer for `join_id` (just accepted, so it has
/// a state group) carries: (state, auth chain, servers in the room).
///
/// - `state`: the state before the join without `m.room.member` events, except (as Synapse
///   does) the joiner's own previous membership and the members the join's auth events name
///   (the user who authorised a restricted join), so the joiner can check the join against
///   the state it is given; and, when the room has neither `m.room.name` nor
///   `m.room.canonical_alias`, the memberships of the room's heroes (MSC3943), so the joining
///   server's clients can name the room at once.
/// - `auth_chain`: the auth chain of that state and of the join, without the events already
///   in `state`.
/// - `servers`: the servers of the room's joined members other than the joiner, and us.
///
/// Everything is read by index: the state group's non-member entries by key range, a handful
/// of member entries by key, the auth chain by a recursive query over `event_auth`.
pub fn join_answer(
    c: &Connection,
    room_id: &str,
    join_id: &str,
    auth_events: &[String],
    us: &str,
) -> Result<(Vec<String>, Vec<String>, Vec<String>)> {
    let row = q::get_event(c, join_id)?.ok_or_else(|| Error::not_found("Unknown join event"))?;
    let group = row
        .state_group
        .ok_or_else(|| Error::internal("an accepted join without a state group"))?;
    let joiner = row
        .state_key
        .clone()
        .ok_or_else(|| Error::internal("a join without a state key"))?;
    let mut needed: HashSet<String> = q::get_events(c, auth_events)?
        .into_iter()
        .filter(|e| e.kind == "m.room.member")
        .filter_map(|e| e.state_key)
        .collect();
    needed.insert(joiner.clone());
    let heroes = p::list_heroes(c, room_id, &joiner, HEROES)?;
    let keys: Vec<&str> = needed
        .iter()
        .map(String::as_str)
        .chain(heroes.iter().map(String::as_str))
        .collect();
    let mut entries = p::list_state_group_without_members(c, group, &keys)?;
    // The group is the state *after* the join: undo the join's own change.
    entries.retain(|(_, _, e)| e != join_id);
    if let Some(prev) = &row.replaces_state {
        entries.push(("m.room.member".into(), joiner.clone(), prev.clone()));
    }
    let named = entries
        .iter()
        .any(|(t, k, _)| k.is_empty() && (t == "m.room.name" || t == "m.room.canonical_alias"));
    if named {
        entries.retain(|(t, k, _)| t != "m.room.member" || needed.contains(k));
    }
    let state: Vec<String> = entries.into_iter().map(|(_, _, e)| e).collect();
    let in_state: HashSet<&str> = state.iter().map(String::as_str).collect();
    let chain: Vec<String> =
        q::list_auth_chain(c, state.iter().map(String::as_str).chain([join_id]))?
            .into_iter()
            .filter(|e| !in_state.contains(e.as_str()))
            .collect();
    let mut servers = q::list_room_servers(c, room_id, "")?;
    if let Some((_, server)) = joiner.split_once(':') {
        if !q::server_has_joined_member(c, room_id, server, &joiner)? {
            servers.retain(|s| s != server);
        }
    }
    if !servers.iter().any(|s| s == us) {
        servers.push(us.to_owned());
    }
    Ok((state, chain, servers))
}

// ------------------------------------------------------------ joiner side

/// MSC3895: while we are only partially joined to a room we cannot answer a join (or knock)
/// through us correctly (we do not know the room's members), so we refuse it with Synapse's
/// answer to the same case, 404 `M_NOT_FOUND`, and the joining server tries another.
pub fn refuse_while_partial(c: &Connection, room_id: &str, what: &str) -> Result<()> {
    if p::is_partial_state_room(c, room_id)? {
        return Err(Error::not_found(format!(
            "Unable to handle {what} right now; this server is not fully joined"
        )));
    }
    Ok(())
}

/// Waits until the room is fully stated (its resync done), for the reads that need every
/// member (`/members`, `/joined_members`). Each waiter watches the room with its own
/// receiver and rechecks the database when woken (the resync's completion is a write on the
/// room's topic): dropping the caller (a client that hung up) drops only its own watch.
pub async fn wait_fully_stated(app: &crate::App, room_id: &str) -> Result<()> {
    use crate::notify::Topic;
    let watch = app
        .notifier
        .watch([Topic::room(room_id), Topic::PartialStateResync]);
    loop {
        // Listen first, then look: a completion between the two is in the marks.
        let seen = app.notifier.marks();
        let r = room_id.to_owned();
        if !app
            .store
            .read(move |c| p::is_partial_state_room(c, &r))
            .await?
        {
            return Ok(());
        }
        watch.changed_since(seen).await;
    }
}

/// Whether an EDU that `user` (of `origin`, the sending server) sent about a room is taken
/// (typing, read receipts): the user is joined; or the room is partial-state, the state we hold
/// has no membership of theirs, and `origin` is one of the room's servers (the join answer's
/// `servers_in_room` and those seen since). Synapse does the same for typing, with its
/// partial-state approximation of the room's hosts: without it, the members we do not know
/// yet could not be seen typing until the resync ends. The room's server ACL applies either
/// way.
pub fn edu_sender_in_room(
    c: &Connection,
    room_id: &str,
    user_id: &str,
    origin: &ruma::ServerName,
) -> Result<bool> {
    if !crate::store::acl::server_allowed(c, room_id, origin)? {
        return Ok(false);
    }
    Ok(match q::get_membership(c, room_id, user_id)?.as_deref() {
        Some("join") => true,
        Some(_) => false,
        None => {
            p::is_partial_state_room(c, room_id)?
                && q::list_room_servers(c, room_id, "")?
                    .iter()
                    .any(|s| s == origin.as_str())
        }
    })
}

/// How `/sync` shows a joined room that is or was partial-state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncView {
    /// As any room.
    Normal,
    /// Left out: still partial, and the client is not lazy-loading members (it would take
    /// the few members it is given for the whole list). Synapse does the same.
    Hidden,
    /// Whole, as newly joined: it became fully stated in this response's range, and a
    /// client not lazy-loading members has not been sent it before.
    Fresh,
}

/// The [`SyncView`] of `room` for a response covering `(since, upto]`.
pub fn sync_view(
    c: &Connection,
    room: &str,
    lazy_members: bool,
    since: Option<i64>,
    upto: i64,
) -> Result<SyncView> {
    if lazy_members {
        return Ok(SyncView::Normal);
    }
    if p::is_partial_state_room(c, room)? {
        return Ok(SyncView::Hidden);
    }
    Ok(match (since, p::get_partial_state_completed(c, room)?) {
        (Some(s), Some(done)) if s < done && done <= upto => SyncView::Fresh,
        _ => SyncView::Normal,
    })
}
