//! Reading power levels for the checks the auth rules leave to the server (who may redact
//! someone else's event, change a room's directory visibility). Lenient like the auth rules:
//! numbers or numeric strings.

use serde_json::Value;

/// A room's `m.room.power_levels` content and its creator (the create event's sender, who has
/// 100 while the room has no power-levels event).
pub struct PowerLevels {
    content: Value,
    creator: String,
}

fn int(v: Option<&Value>) -> Option<i64> {
    match v? {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

impl PowerLevels {
    pub fn new(content: Option<Value>, creator: String) -> Self {
        Self {
            content: content.unwrap_or(Value::Null),
            creator,
        }
    }

    /// The user's level.
    pub fn user(&self, user_id: &str) -> i64 {
        if self.content.is_null() {
            return if user_id == self.creator { 100 } else { 0 };
        }
        int(self.content.get("users").and_then(|u| u.get(user_id)))
            .or_else(|| int(self.content.get("users_default")))
            .unwrap_or(0)
    }

    /// The level a named action (`redact`, `kick`, `ban`, `invite`) needs.
    pub fn action(&self, name: &str) -> i64 {
        let default = if name == "invite" { 0 } else { 50 };
        int(self.content.get(name)).unwrap_or(default)
    }

    /// The level needed to send a state event of this type.
    pub fn state_event(&self, kind: &str) -> i64 {
        int(self.content.get("events").and_then(|e| e.get(kind)))
            .or_else(|| int(self.content.get("state_default")))
            .unwrap_or(50)
    }
}
