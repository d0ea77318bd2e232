//! Outbound federation: the HTTPS client (X-Matrix signed by ruma), server discovery and
//! remote key fetching. Inbound federation handlers live in `http::federation`.

pub mod client;
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
        verify_certificates: bool,
        spawner: &crate::cancel::Spawner,
    ) -> Self {
        Self {
            client: Arc::new(Client::new(
                local,
                verify_certificates,
                Duration::from_secs(30),
            )),
            keys: Keys::new(spawner),
        }
    }
}
