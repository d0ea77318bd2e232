//! One error type for the whole server and the one place that maps it to a Matrix error
//! (`errcode`, `error`, HTTP status). Handlers return `Result<_, Error>`; nothing else
//! builds error bodies.

use std::fmt;

/// A failure that a client (or a remote server) sees as a Matrix error.
#[derive(Debug, Clone)]
pub struct Error {
    pub status: u16,
    pub errcode: &'static str,
    pub message: String,
    /// For `M_LIMIT_EXCEEDED`.
    pub retry_after_ms: Option<u64>,
    /// A complete body to send instead of `{errcode, error}` (the user-interactive-auth 401).
    pub body: Option<serde_json::Value>,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

macro_rules! ctor {
    ($($name:ident => $status:expr, $code:expr;)*) => {
        impl Error {
            $(
                #[doc = concat!("`", $code, "` (HTTP ", stringify!($status), ")")]
                pub fn $name(message: impl Into<String>) -> Self {
                    Self::new($status, $code, message)
                }
            )*
        }
    };
}

ctor! {
    forbidden => 403, "M_FORBIDDEN";
    not_found => 404, "M_NOT_FOUND";
    bad_json => 400, "M_BAD_JSON";
    not_json => 400, "M_NOT_JSON";
    missing_token => 401, "M_MISSING_TOKEN";
    unknown_token => 401, "M_UNKNOWN_TOKEN";
    unrecognized => 404, "M_UNRECOGNIZED";
    too_large => 413, "M_TOO_LARGE";
    user_in_use => 400, "M_USER_IN_USE";
    invalid_username => 400, "M_INVALID_USERNAME";
    room_in_use => 400, "M_ROOM_IN_USE";
    invalid_param => 400, "M_INVALID_PARAM";
    missing_param => 400, "M_MISSING_PARAM";
    unsupported_room_version => 400, "M_UNSUPPORTED_ROOM_VERSION";
    invalid_room_state => 400, "M_INVALID_ROOM_STATE";
    bad_state => 400, "M_BAD_STATE";
    user_deactivated => 403, "M_USER_DEACTIVATED";
    unknown => 500, "M_UNKNOWN";
    unavailable => 503, "M_UNKNOWN";
}

impl Error {
    pub fn new(status: u16, errcode: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            errcode,
            message: message.into(),
            retry_after_ms: None,
            body: None,
        }
    }

    /// `M_LIMIT_EXCEEDED` with the time after which a retry may succeed.
    pub fn limit_exceeded(retry_after_ms: u64) -> Self {
        Self {
            retry_after_ms: Some(retry_after_ms),
            ..Self::new(429, "M_LIMIT_EXCEEDED", "Too many requests")
        }
    }

    /// An unexpected internal failure: logged here with its cause, reported to the client
    /// without internals.
    pub fn internal(cause: impl fmt::Display) -> Self {
        log::error!("internal error: {cause}");
        Self::unknown("Internal server error")
    }

    /// The JSON body of this error.
    pub fn to_json(&self) -> serde_json::Value {
        if let Some(body) = &self.body {
            return body.clone();
        }
        let mut v = serde_json::json!({ "errcode": self.errcode, "error": self.message });
        if let Some(ms) = self.retry_after_ms {
            v["retry_after_ms"] = ms.into();
        }
        v
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.status, self.errcode, self.message)
    }
}

impl std::error::Error for Error {}

impl From<r2d2::Error> for Error {
    fn from(e: r2d2::Error) -> Self {
        Self::internal(format_args!("database pool: {e}"))
    }
}

impl From<serde_json::Error> for Error {
    fn from(e: serde_json::Error) -> Self {
        Self::internal(format_args!("json: {e}"))
    }
}

impl Error {
    /// The same error with another status and errcode.
    pub fn with_status(mut self, status: u16, errcode: &'static str) -> Self {
        self.status = status;
        self.errcode = errcode;
        self
    }
}
