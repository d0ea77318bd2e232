//! The outbound federation client: one HTTPS request per call, signed with X-Matrix by ruma,
//! on our executor (smol sockets, rustls, async-h1's client codec). Dropping the future
//! cancels the request: nothing is shared between calls, so nothing is left half-done.
//!
//! Certificates are checked against the Web PKI roots unless `federation.verify_certificates`
//! is off (tests with self-signed peers only; Hearth warns at start).

use std::{sync::Arc, time::Duration};

use futures_lite::{future, AsyncReadExt};
use futures_rustls::{
    rustls::{
        self,
        client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
        pki_types::{CertificateDer, ServerName as TlsName, UnixTime},
        DigitallySignedStruct, SignatureScheme,
    },
    TlsConnector,
};
use ruma::api::federation::authentication::{ServerSignatures, XMatrixSigningInput};
use ruma::{
    api::{
        auth_scheme::NoAuthentication, path_builder::SinglePath, IncomingResponseExt,
        OutgoingRequest, OutgoingRequestExt,
    },
    ServerName,
};

use super::discovery::{self, Endpoint};
use crate::{
    error::{Error, Result},
    room::build::Local,
};

/// Largest response body accepted from a remote server.
const MAX_RESPONSE_BYTES: u64 = 32 * 1024 * 1024;

pub struct Client {
    local: Arc<Local>,
    tls: TlsConnector,
    timeout: Duration,
}

impl Client {
    pub fn new(local: Arc<Local>, verify_certificates: bool, timeout: Duration) -> Self {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions");
        let config = if verify_certificates {
            let roots =
                rustls::RootCertStore::from_iter(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
            builder.with_root_certificates(roots).with_no_client_auth()
        } else {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AcceptAnyCert(provider)))
                .with_no_client_auth()
        };
        Self {
            local,
            tls: TlsConnector::from(Arc::new(config)),
            timeout,
        }
    }

    /// Sends a request that federation authenticates with X-Matrix.
    pub async fn send<R>(&self, dest: &ServerName, req: R) -> Result<R::IncomingResponse>
    where
        R: OutgoingRequest<Authentication = ServerSignatures, PathBuilder = SinglePath>,
    {
        let ep = self.resolve(dest).await?;
        let input = XMatrixSigningInput::new(
            self.local.server_name.clone(),
            dest.to_owned(),
            &self.local.key.pair,
        );
        let http_req = req
            .try_into_http_request::<Vec<u8>>(&ep.base_url(), input, ())
            .map_err(|e| Error::internal(format_args!("building a federation request: {e}")))?;
        let res = self.execute(&ep, http_req).await?;
        parse::<R>(dest, res)
    }

    /// Sends a request without authentication (key queries, `/version`).
    pub async fn send_unauthenticated<R>(
        &self,
        dest: &ServerName,
        req: R,
    ) -> Result<R::IncomingResponse>
    where
        R: OutgoingRequest<Authentication = NoAuthentication, PathBuilder = SinglePath>,
    {
        let ep = self.resolve(dest).await?;
        let http_req = req
            .try_into_http_request::<Vec<u8>>(&ep.base_url(), (), ())
            .map_err(|e| Error::internal(format_args!("building a federation request: {e}")))?;
        let res = self.execute(&ep, http_req).await?;
        parse::<R>(dest, res)
    }

    /// Where `dest` listens (see `discovery`): static rules, then `.well-known`, then 8448.
    async fn resolve(&self, dest: &ServerName) -> Result<Endpoint> {
        if let Some(ep) = discovery::resolve_static(dest) {
            return Ok(ep);
        }
        let fallback = discovery::default_endpoint(dest)
            .ok_or_else(|| Error::invalid_param(format!("bad server name {dest}")))?;
        let well_known = Endpoint {
            host: fallback.host.clone(),
            port: 443,
        };
        let req = http::Request::get(format!(
            "{}/.well-known/matrix/server",
            well_known.base_url()
        ))
        .body(Vec::new())
        .map_err(Error::internal)?;
        let delegated = match self.execute(&well_known, req).await {
            Ok(res) if res.status().is_success() => {
                serde_json::from_slice::<serde_json::Value>(res.body())
                    .ok()
                    .and_then(|v| v.get("m.server")?.as_str().map(str::to_owned))
                    .and_then(|s| discovery::resolve_delegated(&s))
            }
            _ => None,
        };
        Ok(delegated.unwrap_or(fallback))
    }

    /// One request on a fresh TLS connection, bounded by the client's timeout.
    async fn execute(
        &self,
        ep: &Endpoint,
        req: http::Request<Vec<u8>>,
    ) -> Result<http::Response<Vec<u8>>> {
        let exchange = async {
            let tcp = smol::net::TcpStream::connect((ep.host.as_str(), ep.port))
                .await
                .map_err(|e| remote(format_args!("connecting to {}:{}: {e}", ep.host, ep.port)))?;
            let name = TlsName::try_from(ep.host.clone())
                .map_err(|e| remote(format_args!("TLS name {}: {e}", ep.host)))?;
            let tls = self
                .tls
                .connect(name, tcp)
                .await
                .map_err(|e| remote(format_args!("TLS with {}:{}: {e}", ep.host, ep.port)))?;
            let (parts, body) = req.into_parts();
            let url = http_types::Url::parse(&format!(
                "{}{}",
                ep.base_url(),
                parts
                    .uri
                    .path_and_query()
                    .map(|p| p.as_str())
                    .unwrap_or("/")
            ))
            .map_err(Error::internal)?;
            let method: http_types::Method = parts
                .method
                .as_str()
                .parse()
                .map_err(|_| Error::internal("HTTP method"))?;
            let mut out = http_types::Request::new(method, url);
            for (name, value) in parts.headers.iter() {
                if let Ok(v) = value.to_str() {
                    out.append_header(name.as_str(), v);
                }
            }
            out.set_body(body);
            let mut res = async_h1::connect(tls, out)
                .await
                .map_err(|e| remote(format_args!("{}:{}: {e}", ep.host, ep.port)))?;
            let mut bytes = Vec::new();
            res.take_body()
                .take(MAX_RESPONSE_BYTES)
                .read_to_end(&mut bytes)
                .await
                .map_err(|e| remote(format_args!("reading from {}: {e}", ep.host)))?;
            let mut builder = http::Response::builder().status(u16::from(res.status()));
            for (name, values) in res.iter() {
                for v in values.iter() {
                    // async-h1 fills in a missing `Date` as "date: ...\r\n" (not a valid
                    // value); a header we cannot represent is dropped, not the response.
                    if http::HeaderValue::from_str(v.as_str()).is_ok() {
                        builder = builder.header(name.as_str(), v.as_str());
                    }
                }
            }
            builder.body(bytes).map_err(Error::internal)
        };
        let timeout = async {
            smol::Timer::after(self.timeout).await;
            Err(remote(format_args!("{}:{} timed out", ep.host, ep.port)))
        };
        future::or(exchange, timeout).await
    }
}

/// A failure to reach a remote server, as a client of ours sees it.
fn remote(msg: impl std::fmt::Display) -> Error {
    Error::new(502, "M_UNKNOWN", format!("Remote server: {msg}"))
}

/// A remote answer: the typed response, or the remote Matrix error kept (404 stays 404).
fn parse<R: OutgoingRequest>(
    dest: &ServerName,
    res: http::Response<Vec<u8>>,
) -> Result<R::IncomingResponse> {
    let status = res.status().as_u16();
    if status >= 400 {
        let v: serde_json::Value = serde_json::from_slice(res.body()).unwrap_or_default();
        let msg = format!(
            "{dest} answered {status}: {}",
            v.get("error").and_then(|e| e.as_str()).unwrap_or("")
        );
        return Err(match (status, v.get("errcode").and_then(|e| e.as_str())) {
            (404, _) | (_, Some("M_NOT_FOUND")) => Error::not_found(msg),
            (403, _) | (_, Some("M_FORBIDDEN")) => Error::forbidden(msg),
            _ => remote(msg),
        });
    }
    let (parts, body) = res.into_parts();
    R::IncomingResponse::try_from_http_response(http::Response::from_parts(parts, &body[..]))
        .map_err(|e| remote(format_args!("{dest}: unexpected response: {e}")))
}

/// `verify_certificates = false`: any certificate is accepted (signatures are still checked,
/// so the TLS session itself is sound; only the peer's identity is not). Tests only.
#[derive(Debug)]
struct AcceptAnyCert(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &TlsName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
