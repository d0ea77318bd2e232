//! Outbound federation: the HTTPS client (X-Matrix signed by ruma), server discovery,
//! remote key fetching, alias lookups across servers and server ACL checks. Inbound federation handlers live in `http::federation`.

pub mod acl;
pub mod client;
pub mod directory;
pub mod discovery;
pub mod keys;

use std::{sync::Arc, time::Duration};

pub use client::Client;
pub use keys::{KeyContext, Keys};

/// Everything federation shares across requests.
pub struct Federation {
    pub client: Arc<Client>,
    pub keys: Keys,
}

impl Federation {
    pub fn new(
        local: Arc<crate::room::build::Local>,
        config: &crate::config::FederationConfig,
        spawner: &crate::cancel::Spawner,
    ) -> Self {
        Self {
            client: Arc::new(Client::new(
                local,
                config.verify_certificates,
                Duration::from_secs(30),
            )),
            keys: Keys::new(spawner, config.trusted_key_servers.clone()),
        }
    }
}
