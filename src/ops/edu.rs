//! The ephemeral things a local user does in a room that the room's other servers are told
//! of: typing notifications and public read receipts (`m.typing`, `m.receipt` EDUs, in ruma's
//! federation types). Private receipts (`m.read.private`) and the fully-read marker stay home.
//!
//! A receipt's EDU rows go into the outbox in the receipt's own write (one commit per
//! operation). Typing is kept in memory only, so its EDU rows are written by a small write of
//! their own, and only when the room has other servers: a typing notification costs a local
//! room nothing on disk.

use std::collections::BTreeMap;

use ruma::{
    api::federation::transactions::edu::{
        Edu, ReceiptContent, ReceiptData, ReceiptMap, TypingContent,
    },
    events::receipt::{Receipt, ReceiptThread},
    MilliSecondsSinceUnixEpoch, OwnedEventId, OwnedRoomId, OwnedUserId, UInt,
};

use crate::{
    error::{Error, Result},
    store::{queries as q, Tx},
    App,
};

/// Tells the room's other servers that `user` started or stopped typing. Clients repeat the
/// request while the user types, and each repetition is sent on; when the client's timeout
/// runs out without one, the expiry worker (`workers::typing_expiry`) sends the stop.
pub async fn queue_typing(
    app: &App,
    room: &OwnedRoomId,
    user: &OwnedUserId,
    typing: bool,
) -> Result<()> {
    let (r, us) = (room.to_string(), app.server_name.to_string());
    let servers = app
        .store
        .read(move |c| q::list_room_servers(c, &r, &us))
        .await?;
    if servers.is_empty() {
        return Ok(());
    }
    let edu = Edu::Typing(TypingContent::new(room.clone(), user.clone(), typing));
    let edu = serde_json::to_string(&edu)?;
    app.store
        .write(move |tx| q::insert_outbox_edu(tx, &servers, &edu))
        .await
}

/// Queues the `m.receipt` EDU of a public read receipt for the room's other servers, in the
/// receipt's write. `thread` is the stored form: empty for an unthreaded receipt, else
/// `main` or the thread root's event ID.
pub fn queue_receipt(
    tx: &mut Tx<'_>,
    us: &str,
    room: &str,
    user: &str,
    event_id: &str,
    thread: &str,
    ts: u64,
) -> Result<()> {
    let servers = q::list_room_servers(tx, room, us)?;
    if servers.is_empty() {
        return Ok(());
    }
    let (room, user, event) = (
        OwnedRoomId::try_from(room).map_err(Error::internal)?,
        OwnedUserId::try_from(user).map_err(Error::internal)?,
        OwnedEventId::try_from(event_id).map_err(Error::internal)?,
    );
    let mut receipt = Receipt::new(MilliSecondsSinceUnixEpoch(UInt::new_saturating(ts)));
    receipt.thread = match thread {
        "" => ReceiptThread::Unthreaded,
        t => ReceiptThread::try_from(Some(t)).map_err(Error::internal)?,
    };
    let read = BTreeMap::from([(user, ReceiptData::new(receipt, vec![event]))]);
    let edu = Edu::Receipt(ReceiptContent::new(BTreeMap::from([(
        room,
        ReceiptMap::new(read),
    )])));
    q::insert_outbox_edu(tx, &servers, &serde_json::to_string(&edu)?)
}
