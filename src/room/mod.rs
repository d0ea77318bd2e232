//! Pure Matrix room logic: the PDU type ruma's auth rules and state resolution work on, the
//! server's signing key, building local events (`build.rs`), and the client event format
//! (`format.rs`). No HTTP here; SQL only through `store::queries` inside a write closure.

pub mod build;
pub mod format;
pub mod history;
pub mod partial;
pub mod power;
pub mod reauth;
pub mod receive;
pub mod restricted;
pub mod search;
pub mod state;
pub mod sticky;

use ruma::{
    events::TimelineEventType, MilliSecondsSinceUnixEpoch, OwnedEventId, OwnedRoomId, OwnedUserId,
    RoomId, RoomVersionId, UserId,
};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::error::{Error, Result};

/// Room versions Hearth creates and accepts: those whose event IDs are reference hashes and
/// whose room IDs are still `!opaque:server` (3 to 11). Versions 1–2 need state resolution v1,
/// which ruma does not implement; 12 changes room IDs and is left for a later issue.
pub fn is_supported_version(v: &RoomVersionId) -> bool {
    use RoomVersionId::*;
    matches!(v, V3 | V4 | V5 | V6 | V7 | V8 | V9 | V10 | V11)
}

pub const SUPPORTED_VERSIONS: &[&str] = &["3", "4", "5", "6", "7", "8", "9", "10", "11"];

/// A PDU as the auth rules see it. Parsed from the stored canonical JSON.
#[derive(Debug, Clone)]
pub struct Pdu {
    pub event_id: OwnedEventId,
    pub room_id: OwnedRoomId,
    pub sender: OwnedUserId,
    pub origin_server_ts: MilliSecondsSinceUnixEpoch,
    pub kind: TimelineEventType,
    pub content: Box<RawValue>,
    pub state_key: Option<String>,
    pub prev_events: Vec<OwnedEventId>,
    pub auth_events: Vec<OwnedEventId>,
    pub redacts: Option<OwnedEventId>,
    pub depth: u64,
    pub rejected: bool,
}

#[derive(Deserialize)]
struct PduFields {
    room_id: OwnedRoomId,
    sender: OwnedUserId,
    origin_server_ts: MilliSecondsSinceUnixEpoch,
    #[serde(rename = "type")]
    kind: TimelineEventType,
    content: Box<RawValue>,
    state_key: Option<String>,
    #[serde(default)]
    prev_events: Vec<OwnedEventId>,
    #[serde(default)]
    auth_events: Vec<OwnedEventId>,
    redacts: Option<OwnedEventId>,
    #[serde(default)]
    depth: u64,
}

#[derive(Deserialize)]
struct RedactsInContent {
    redacts: Option<OwnedEventId>,
}

impl Pdu {
    pub fn from_json(event_id: OwnedEventId, json: &str) -> Result<Self> {
        let f: PduFields =
            serde_json::from_str(json).map_err(|e| Error::bad_json(format!("invalid PDU: {e}")))?;
        // Since room version 11 `redacts` lives in the content; accept either place.
        let redacts = f.redacts.or_else(|| {
            serde_json::from_str::<RedactsInContent>(f.content.get())
                .ok()
                .and_then(|c| c.redacts)
        });
        Ok(Self {
            event_id,
            room_id: f.room_id,
            sender: f.sender,
            origin_server_ts: f.origin_server_ts,
            kind: f.kind,
            content: f.content,
            state_key: f.state_key,
            prev_events: f.prev_events,
            auth_events: f.auth_events,
            redacts,
            depth: f.depth,
            rejected: false,
        })
    }
}

impl ruma::state_res::Event for Pdu {
    type Id = OwnedEventId;

    fn event_id(&self) -> &Self::Id {
        &self.event_id
    }
    fn room_id(&self) -> Option<&RoomId> {
        Some(&self.room_id)
    }
    fn sender(&self) -> &UserId {
        &self.sender
    }
    fn origin_server_ts(&self) -> MilliSecondsSinceUnixEpoch {
        self.origin_server_ts
    }
    fn event_type(&self) -> &TimelineEventType {
        &self.kind
    }
    fn content(&self) -> &RawValue {
        &self.content
    }
    fn state_key(&self) -> Option<&str> {
        self.state_key.as_deref()
    }
    fn prev_events(&self) -> Box<dyn DoubleEndedIterator<Item = &Self::Id> + '_> {
        Box::new(self.prev_events.iter())
    }
    fn auth_events(&self) -> Box<dyn DoubleEndedIterator<Item = &Self::Id> + '_> {
        Box::new(self.auth_events.iter())
    }
    fn redacts(&self) -> Option<&Self::Id> {
        self.redacts.as_ref()
    }
    fn rejected(&self) -> bool {
        self.rejected
    }
}

/// The server's ed25519 signing key, created on first start and kept in the database.
pub struct SigningKey {
    pub pair: ruma::signatures::Ed25519KeyPair,
}

impl SigningKey {
    /// A fresh key: (base64 of the PKCS#8 DER, key version). Stored by the caller.
    pub fn generate_encoded() -> (String, String) {
        use base64::Engine;
        let der = ruma::signatures::Ed25519KeyPair::generate().to_vec();
        let version = format!("a_{}", crate::util::random_string(4));
        (
            base64::engine::general_purpose::STANDARD_NO_PAD.encode(der),
            version,
        )
    }

    /// The key as stored (see `store::queries::load_identity`).
    pub fn from_encoded(b64: &str, version: String) -> Result<Self> {
        use base64::Engine;
        let der = base64::engine::general_purpose::STANDARD_NO_PAD
            .decode(b64)
            .map_err(Error::internal)?;
        let pair =
            ruma::signatures::Ed25519KeyPair::from_der(&der, version).map_err(Error::internal)?;
        Ok(Self { pair })
    }
}
