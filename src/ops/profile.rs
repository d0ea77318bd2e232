//! Profile changes: the profile row and a fresh member event in every joined room, in one
//! write (so every room shows the new name, and other servers get the member events through
//! the same commit's outbox rows).

use ruma::{OwnedRoomId, UserId};

use crate::{
    error::{Error, Result},
    room::build::{self, NewEvent},
    store::queries as q,
    App,
};

/// Sets a user's display name and/or avatar URL: `Some(None)` clears a field, `None` leaves
/// it as it is.
pub async fn set_profile(
    app: &App,
    user: &UserId,
    displayname: Option<Option<String>>,
    avatar_url: Option<Option<String>>,
) -> Result<()> {
    let local = app.local.clone();
    let uid = user.to_owned();
    app.store
        .write(move |tx| {
            let row = q::get_user(tx, uid.as_str())?
                .ok_or_else(|| Error::not_found("Profile not found"))?;
            let d = displayname.unwrap_or(row.displayname);
            let a = avatar_url.unwrap_or(row.avatar_url);
            q::update_profile(tx, uid.as_str(), d.as_deref(), a.as_deref())?;
            for (room, membership, _) in q::list_user_rooms(tx, uid.as_str())? {
                if membership != "join" {
                    continue;
                }
                // The profile row was just updated: the member content reads it back.
                let content = super::rooms::join_content(tx, &uid)?;
                let rid = OwnedRoomId::try_from(room).map_err(Error::internal)?;
                build::send(
                    tx,
                    &local,
                    &rid,
                    &uid,
                    NewEvent::state("m.room.member", uid.as_str(), content),
                    None,
                )?;
            }
            Ok(())
        })
        .await?;
    Ok(())
}
