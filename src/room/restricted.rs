//! Restricted joins (join rules `restricted`, room versions 8+, and `knock_restricted`, 10+):
//! a user who is joined to one of the rooms the join rule's `allow` lists may join without an
//! invite, when a server in the room vouches for it. The vouching server names one of its
//! users who may invite in the join's `join_authorised_via_users_server` and signs the join
//! (the auth rules check that user; signature checks require that server's signature). We
//! vouch only for what we can see: the allowed rooms we hold state for.

use serde_json::Value;

use crate::{
    error::{Error, Result},
    room::build,
    store::{queries as q, Connection},
};

/// The user of ours (`server`) to name in `user`'s join to `room_id` as
/// `join_authorised_via_users_server`, or `None` when the join needs none (the join rule is
/// not restricted, or the user is invited or joined already: the auth rules let them in).
/// Errors as the spec's `/make_join`: 403 when the user is in none of the allowed rooms we
/// hold, `M_UNABLE_TO_AUTHORISE_JOIN` when we hold none of them (another server may),
/// `M_UNABLE_TO_GRANT_JOIN` when none of our joined users may invite.
pub fn authorising_user(
    conn: &Connection,
    room_id: &str,
    user: &str,
    server: &str,
) -> Result<Option<String>> {
    let rid = <&ruma::RoomId>::try_from(room_id).map_err(Error::internal)?;
    let version = build::room_version(conn, rid)?;
    let Some(rules) = version.rules() else {
        return Ok(None);
    };
    let join_rules = build::current_content(conn, room_id, "m.room.join_rules", "")?;
    let rule = join_rules
        .as_ref()
        .and_then(|c| c["join_rule"].as_str())
        .unwrap_or_default();
    let restricted = (rule == "restricted" && rules.authorization.restricted_join_rule)
        || (rule == "knock_restricted" && rules.authorization.knock_restricted_join_rule);
    if !restricted
        || matches!(
            q::get_membership(conn, room_id, user)?.as_deref(),
            Some("join" | "invite")
        )
    {
        return Ok(None);
    }
    let allowed: Vec<&str> = join_rules
        .as_ref()
        .and_then(|c| c["allow"].as_array())
        .into_iter()
        .flatten()
        .filter(|a| a["type"] == "m.room_membership")
        .filter_map(|a| a["room_id"].as_str())
        .collect();
    let mut held_any = false;
    let mut member = false;
    for r in allowed {
        if q::get_room_version(conn, r)?.is_none() {
            continue;
        }
        let ours = q::server_has_joined_member(conn, r, server, "")?;
        held_any |= ours;
        member |= ours && q::get_membership(conn, r, user)?.as_deref() == Some("join");
    }
    if !member {
        return Err(if held_any {
            Error::forbidden("You are not joined to any room this room allows")
        } else {
            Error::new(
                400,
                "M_UNABLE_TO_AUTHORISE_JOIN",
                "This server is in none of the rooms the join rule allows",
            )
        });
    }
    let levels = build::power_levels(conn, room_id)?;
    let needed = levels.action("invite");
    let suffix = format!(":{server}");
    let inviter = q::list_members(conn, room_id)?
        .into_iter()
        .filter(|(u, m, _)| m == "join" && u.ends_with(&suffix))
        .map(|(u, _, _)| u)
        .filter(|u| levels.user(u) >= needed)
        .max_by_key(|u| levels.user(u));
    inviter.map(Some).ok_or_else(|| {
        Error::new(
            400,
            "M_UNABLE_TO_GRANT_JOIN",
            "None of this server's users in the room may invite",
        )
    })
}

/// The `join_authorised_via_users_server` a join's content names, if any.
pub fn named_authoriser(content: &Value) -> Option<&str> {
    content
        .get("join_authorised_via_users_server")
        .and_then(Value::as_str)
}
