//! `/_matrix/federation/v1/query/*`: what other servers ask about our users and aliases.

use ruma::api::federation::query::get_profile_information::v1 as profile;
use serde_json::{Map, Value};
use tide::Response;

use super::origin;
use crate::{
    error::{Error, Result},
    http::{json, Req},
    store::queries as q,
};

/// # `GET /_matrix/federation/v1/query/profile`
pub async fn profile(mut req: Req) -> Result<Response> {
    let r = origin::<profile::Request>(&mut req, &[]).await?.req;
    let app = req.state().clone();
    if r.user_id.server_name() != app.server_name {
        return Err(Error::invalid_param("The user is not on this server"));
    }
    let uid = r.user_id.to_string();
    let user = app
        .store
        .read(move |c| q::get_user(c, &uid))
        .await?
        .filter(|u| !u.deactivated)
        .ok_or_else(|| Error::not_found("Profile not found"))?;
    let mut out = Map::new();
    let wanted = r.field.as_ref().map(|f| f.as_str().to_owned());
    let mut put = |k: &str, v: Option<String>| {
        if wanted.as_deref().is_none_or(|w| w == k) {
            if let Some(v) = v {
                out.insert(k.to_owned(), Value::String(v));
            }
        }
    };
    put("displayname", user.displayname);
    put("avatar_url", user.avatar_url);
    json(&out)
}
