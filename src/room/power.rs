//! Reading power levels for the checks the auth rules leave to the server (who may redact
//! someone else's event). Lenient like the auth rules: numbers or numeric strings.

use serde_json::Value;

pub struct PowerLevels(Value);

fn int(v: Option<&Value>) -> Option<i64> {
    match v? {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

impl PowerLevels {
    pub fn new(content: Option<Value>) -> Self {
        Self(content.unwrap_or(Value::Null))
    }

    /// The user's level; with no power-levels event the creator has 100 (the caller passes it).
    pub fn user(&self, user_id: &str, creator: &str) -> i64 {
        if self.0.is_null() {
            return if user_id == creator { 100 } else { 0 };
        }
        int(self.0.get("users").and_then(|u| u.get(user_id)))
            .or_else(|| int(self.0.get("users_default")))
            .unwrap_or(0)
    }

    /// The level a named action (`redact`, `kick`, `ban`, `invite`) needs.
    pub fn action(&self, name: &str) -> i64 {
        let default = if name == "invite" { 0 } else { 50 };
        int(self.0.get(name)).unwrap_or(default)
    }
}
