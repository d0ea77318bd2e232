//! The media repository over real HTTP: uploads (plain and reserved), downloads with their
//! safe-serving headers, thumbnails, limits and quota, bad media IDs, what a dropped upload or
//! a kill leaves, the frozen legacy endpoints, and media across federation.

mod common;

use std::{
    io::{Cursor, Read, Write},
    net::TcpStream,
    path::Path,
    time::{Duration, Instant},
};

use common::{config_in, TestServer};
use image::{DynamicImage, ImageFormat, RgbImage, RgbaImage};
use serde_json::Value;

/// A response: status, headers we look at, body bytes.
struct Got {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Got {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
    fn errcode(&self) -> String {
        self.json()["errcode"].as_str().unwrap_or("").to_owned()
    }
}

fn call(
    base: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    content_type: Option<&str>,
    body: Option<&[u8]>,
) -> Got {
    let mut r = ureq::request(method, &format!("{base}{path}")).timeout(Duration::from_secs(60));
    if let Some(t) = token {
        r = r.set("Authorization", &format!("Bearer {t}"));
    }
    if let Some(ct) = content_type {
        r = r.set("Content-Type", ct);
    }
    let sent = match body {
        Some(b) => r.send_bytes(b),
        None => r.call(),
    };
    let resp = sent.unwrap_or_else(|e| match e {
        ureq::Error::Status(_, r) => r,
        e => panic!("{method} {path}: {e}"),
    });
    let status = resp.status();
    let headers = resp
        .headers_names()
        .into_iter()
        .map(|n| {
            let v = resp.header(&n).unwrap_or("").to_owned();
            (n, v)
        })
        .collect();
    let mut body = Vec::new();
    resp.into_reader().read_to_end(&mut body).unwrap();
    Got {
        status,
        headers,
        body,
    }
}

/// Uploads `bytes`; returns the media ID.
fn upload(s: &TestServer, token: &str, ct: &str, name: Option<&str>, bytes: &[u8]) -> String {
    let path = match name {
        Some(n) => format!("/_matrix/media/v3/upload?filename={}", common::enc(n)),
        None => "/_matrix/media/v3/upload".to_owned(),
    };
    let got = call(&s.base, "POST", &path, Some(token), Some(ct), Some(bytes));
    assert_eq!(got.status, 200, "upload: {}", got.json());
    let uri = got.json()["content_uri"].as_str().unwrap().to_owned();
    let prefix = "mxc://hearth.test/";
    assert!(uri.starts_with(prefix), "{uri}");
    uri[prefix.len()..].to_owned()
}

fn download(s: &TestServer, token: Option<&str>, id: &str) -> Got {
    let path = format!("/_matrix/client/v1/media/download/hearth.test/{id}");
    call(&s.base, "GET", &path, token, None, None)
}

fn thumbnail(s: &TestServer, token: &str, id: &str, w: u32, h: u32, method: &str) -> Got {
    let path = format!(
        "/_matrix/client/v1/media/thumbnail/hearth.test/{id}?width={w}&height={h}&method={method}"
    );
    call(&s.base, "GET", &path, Some(token), None, None)
}

fn encoded(image: DynamicImage, format: ImageFormat) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    image.write_to(&mut out, format).unwrap();
    out.into_inner()
}

fn gradient(w: u32, h: u32) -> DynamicImage {
    DynamicImage::ImageRgb8(RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([(x * 255 / w) as u8, (y * 255 / h) as u8, 90])
    }))
}

/// Files in the media directory and media rows (files named by a row).
fn stored(s: &TestServer) -> (Vec<String>, usize) {
    let files = media_files(&s.dir.path().join("media"));
    let rows = smol::block_on(
        s.hs()
            .app()
            .store
            .read(hearth::store::media::list_media_files),
    )
    .unwrap();
    (files, rows.len())
}

fn media_files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[test]
fn a_file_and_an_image_round_trip_with_safe_headers() {
    let s = TestServer::start();
    let (_, tok) = s.register("alice");
    let text = b"hello media\n".to_vec();
    let id = upload(&s, &tok, "text/plain", Some("note.txt"), &text);
    let got = download(&s, Some(&tok), &id);
    assert_eq!(got.status, 200);
    assert_eq!(got.body, text);
    assert_eq!(
        got.header("Content-Type"),
        Some("text/plain; charset=UTF-8")
    );
    assert_eq!(
        got.header("Content-Disposition"),
        Some("inline; filename=note.txt")
    );
    assert_eq!(got.header("X-Content-Type-Options"), Some("nosniff"));
    assert_eq!(
        got.header("Content-Security-Policy"),
        Some("sandbox; default-src 'none'; script-src 'none'; plugin-types application/pdf; style-src 'unsafe-inline'; media-src 'self'; object-src 'self';")
    );
    assert_eq!(
        got.header("Cross-Origin-Resource-Policy"),
        Some("cross-origin")
    );

    // The {fileName} variant names the download; a non-ASCII name is RFC 8187-encoded.
    let path = format!("/_matrix/client/v1/media/download/hearth.test/{id}/r%C3%A9sum%C3%A9.txt");
    let got = call(&s.base, "GET", &path, Some(&tok), None, None);
    assert_eq!(got.status, 200);
    assert_eq!(
        got.header("Content-Disposition"),
        Some("inline; filename*=utf-8''r%C3%A9sum%C3%A9.txt")
    );

    // Anything a browser could run is an attachment.
    let html = b"<script>alert(1)</script>";
    let id = upload(&s, &tok, "text/html", Some("x.html"), html);
    let got = download(&s, Some(&tok), &id);
    assert_eq!(got.body, html);
    assert_eq!(
        got.header("Content-Disposition"),
        Some("attachment; filename=x.html")
    );
    let id = upload(&s, &tok, "image/svg+xml", None, b"<svg/>");
    let got = download(&s, Some(&tok), &id);
    assert_eq!(got.header("Content-Disposition"), Some("attachment"));

    // An image, byte for byte.
    let png = encoded(gradient(64, 48), ImageFormat::Png);
    let id = upload(&s, &tok, "image/png", Some("g.png"), &png);
    let got = download(&s, Some(&tok), &id);
    assert_eq!(got.body, png);
    assert_eq!(got.header("Content-Type"), Some("image/png"));

    // The config, authenticated and legacy.
    for path in [
        "/_matrix/client/v1/media/config",
        "/_matrix/media/v3/config",
    ] {
        let got = call(&s.base, "GET", path, Some(&tok), None, None);
        assert_eq!(got.json()["m.upload.size"], 50 * 1024 * 1024, "{path}");
    }
}

#[test]
fn thumbnails_scale_and_crop_to_the_standard_sizes_once() {
    let s = TestServer::start();
    let (_, tok) = s.register("alice");
    let png = encoded(gradient(1000, 500), ImageFormat::Png);
    let png_id = upload(&s, &tok, "image/png", None, &png);
    let jpeg = encoded(gradient(1200, 900), ImageFormat::Jpeg);
    let jpeg_id = upload(&s, &tok, "image/jpeg", None, &jpeg);
    let rgba = DynamicImage::ImageRgba8(RgbaImage::from_pixel(50, 40, image::Rgba([1, 2, 3, 4])));
    let small_id = upload(
        &s,
        &tok,
        "image/webp",
        None,
        &encoded(rgba, ImageFormat::WebP),
    );

    // (media, requested w, h, method) → (content type, actual w, h)
    let cases = [
        (&png_id, 300, 200, "scale", "image/png", 320, 160),
        (&png_id, 640, 480, "scale", "image/png", 640, 320),
        (&png_id, 96, 96, "crop", "image/png", 96, 96),
        (&png_id, 20, 20, "crop", "image/png", 32, 32),
        (&jpeg_id, 800, 600, "scale", "image/jpeg", 800, 600),
        (&jpeg_id, 50, 50, "crop", "image/jpeg", 96, 96),
        // Never larger than the original.
        (&small_id, 800, 600, "scale", "image/png", 50, 40),
        (&small_id, 96, 96, "crop", "image/png", 40, 40),
    ];
    for (id, w, h, method, ct, ew, eh) in cases {
        let got = thumbnail(&s, &tok, id, w, h, method);
        assert_eq!(got.status, 200, "{w}x{h} {method}: {}", got.json());
        assert_eq!(got.header("Content-Type"), Some(ct));
        assert_eq!(got.header("X-Content-Type-Options"), Some("nosniff"));
        let img = image::load_from_memory(&got.body).unwrap();
        assert_eq!((img.width(), img.height()), (ew, eh), "{w}x{h} {method}");
    }

    // Requests snapping to the same size share one file; a repeat is served from it.
    let (files_before, rows_before) = stored(&s);
    let a = thumbnail(&s, &tok, &png_id, 310, 230, "scale");
    let b = thumbnail(&s, &tok, &png_id, 320, 240, "scale");
    assert_eq!(a.body, b.body);
    assert_eq!(stored(&s), (files_before, rows_before));

    // Concurrent first requests for one thumbnail: one generation, one file.
    let (files_before, _) = stored(&s);
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let base = s.base.clone();
            let (tok, id) = (tok.clone(), jpeg_id.clone());
            std::thread::spawn(move || {
                let path = format!(
                    "/_matrix/client/v1/media/thumbnail/hearth.test/{id}?width=320&height=240&animated=true"
                );
                call(&base, "GET", &path, Some(&tok), None, None)
            })
        })
        .collect();
    let bodies: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert!(bodies
        .iter()
        .all(|g| g.status == 200 && g.body == bodies[0].body));
    assert_eq!(stored(&s).0.len(), files_before.len() + 1);

    // Not an image: 400; bad sizes and methods: 400.
    let txt = upload(&s, &tok, "text/plain", None, b"not an image");
    let got = thumbnail(&s, &tok, &txt, 96, 96, "crop");
    assert_eq!(got.status, 400, "{}", got.json());
    assert_eq!(thumbnail(&s, &tok, &png_id, 0, 96, "crop").status, 400);
    assert_eq!(thumbnail(&s, &tok, &png_id, 96, 96, "stretch").status, 400);
}

#[test]
fn images_above_the_pixel_limit_are_not_decoded() {
    let s = TestServer::start_with(|c| c.media.max_image_pixels = 10_000);
    let (_, tok) = s.register("alice");
    let id = upload(
        &s,
        &tok,
        "image/png",
        None,
        &encoded(gradient(200, 100), ImageFormat::Png),
    );
    let got = thumbnail(&s, &tok, &id, 96, 96, "crop");
    assert_eq!((got.status, got.errcode().as_str()), (413, "M_TOO_LARGE"));
}

#[test]
fn authenticated_endpoints_need_a_token() {
    let s = TestServer::start();
    let (_, tok) = s.register("alice");
    let id = upload(&s, &tok, "text/plain", None, b"x");
    for path in [
        format!("/_matrix/client/v1/media/download/hearth.test/{id}"),
        format!("/_matrix/client/v1/media/download/hearth.test/{id}/x.txt"),
        format!("/_matrix/client/v1/media/thumbnail/hearth.test/{id}?width=32&height=32"),
        "/_matrix/client/v1/media/config".to_owned(),
    ] {
        let got = call(&s.base, "GET", &path, None, None, None);
        assert_eq!(
            (got.status, got.errcode().as_str()),
            (401, "M_MISSING_TOKEN"),
            "{path}"
        );
        let got = call(&s.base, "GET", &path, Some("nope"), None, None);
        assert_eq!(got.status, 401, "{path}");
    }
    let got = call(
        &s.base,
        "POST",
        "/_matrix/media/v3/upload",
        None,
        Some("text/plain"),
        Some(b"x"),
    );
    assert_eq!(got.status, 401);
}

#[test]
fn oversized_uploads_get_413_and_store_nothing() {
    let s = TestServer::start_with(|c| c.media.max_upload_bytes = 1000);
    let (_, tok) = s.register("alice");
    let (files, rows) = stored(&s);
    let big = vec![7u8; 5000];
    let got = call(
        &s.base,
        "POST",
        "/_matrix/media/v3/upload",
        Some(&tok),
        Some("application/octet-stream"),
        Some(&big),
    );
    assert_eq!((got.status, got.errcode().as_str()), (413, "M_TOO_LARGE"));
    // Without a Content-Length (chunked): refused while reading.
    let got = ureq::post(&format!("{}/_matrix/media/v3/upload", s.base))
        .set("Authorization", &format!("Bearer {tok}"))
        .send(Cursor::new(big.clone()));
    match got {
        Err(ureq::Error::Status(413, r)) => {
            let v: Value = r.into_json().unwrap();
            assert_eq!(v["errcode"], "M_TOO_LARGE");
        }
        // The server may answer and close before the body is all sent.
        Err(ureq::Error::Transport(_)) => {}
        other => panic!("expected 413, got {:?}", other.map(|r| r.status())),
    }
    wait_for(|| stored(&s) == (files.clone(), rows), "nothing stored");
    // At the limit exactly: accepted.
    upload(&s, &tok, "application/octet-stream", None, &big[..1000]);
}

#[test]
fn the_quota_counts_each_users_uploads() {
    let s = TestServer::start_with(|c| c.media.user_quota_bytes = 1500);
    let (_, alice) = s.register("alice");
    let (_, bob) = s.register("bob");
    upload(&s, &alice, "text/plain", None, &[b'a'; 1000]);
    let before = stored(&s);
    for body in [&[b'b'; 1000][..], &[b'c'; 501][..]] {
        let got = call(
            &s.base,
            "POST",
            "/_matrix/media/v3/upload",
            Some(&alice),
            Some("text/plain"),
            Some(body),
        );
        assert_eq!(
            (got.status, got.errcode().as_str()),
            (400, "M_RESOURCE_LIMIT_EXCEEDED")
        );
    }
    wait_for(|| stored(&s) == before, "nothing stored past the quota");
    upload(&s, &alice, "text/plain", None, &[b'd'; 500]);
    upload(&s, &bob, "text/plain", None, &[b'e'; 1500]);
}

#[test]
fn unknown_ids_and_path_tricks_are_404_and_read_nothing() {
    let s = TestServer::start();
    let (_, tok) = s.register("alice");
    let id = upload(&s, &tok, "text/plain", None, b"inside");
    assert_eq!(
        download(&s, Some(&tok), "AAAAAAAAAAAAAAAAAAAAAAAA").status,
        404
    );
    // A remote server we cannot reach does not make an unknown ID found.
    for tricky in [
        "..%2Fhearth.db",
        "..%2F..%2Fetc%2Fpasswd",
        "%2E%2E",
        "hearth.db",
        ".tmp-x",
        "a%00b",
        "a%5Cb",
        &format!("{id}%2F..%2F{id}"),
    ] {
        let got = download(&s, Some(&tok), tricky);
        assert!(
            matches!(got.status, 400 | 404),
            "{tricky}: {} {:?}",
            got.status,
            String::from_utf8_lossy(&got.body)
        );
        assert!(!got.body.starts_with(b"SQLite"), "{tricky}");
        let got = thumbnail(&s, &tok, tricky, 32, 32, "crop");
        assert!(matches!(got.status, 400 | 404), "{tricky}: {}", got.status);
    }
    // Raw paths with dot segments, not normalised by a client library.
    for raw in [
        "/_matrix/client/v1/media/download/hearth.test/../../hearth.db",
        "/_matrix/client/v1/media/download/..%2F..%2F/hearth.db",
        "/_matrix/client/v1/media/download/hearth.test/./hearth.db",
    ] {
        let (status, body) = raw_get(&s, raw, &tok);
        assert!(matches!(status, 400 | 404), "{raw}: {status}");
        assert!(!body.contains("SQLite"), "{raw}");
    }
    // Upload to a reserved ID that is not one.
    let got = call(
        &s.base,
        "PUT",
        "/_matrix/media/v3/upload/hearth.test/..%2Fx",
        Some(&tok),
        Some("text/plain"),
        Some(b"x"),
    );
    assert_eq!(got.status, 404);
}

fn raw_get(s: &TestServer, path: &str, tok: &str) -> (u16, String) {
    let addr = s.hs().addrs()[0];
    let mut c = TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        c,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {tok}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = Vec::new();
    let _ = c.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, text)
}

/// Waits (bounded) for `ok`.
fn wait_for(mut ok: impl FnMut() -> bool, what: &str) {
    let until = Instant::now() + Duration::from_secs(10);
    while !ok() {
        assert!(Instant::now() < until, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_dropped_upload_leaves_nothing() {
    let s = TestServer::start();
    let (_, tok) = s.register("alice");
    let before = stored(&s);
    let addr = s.hs().addrs()[0];
    let mut c = TcpStream::connect(addr).unwrap();
    write!(
        c,
        "POST /_matrix/media/v3/upload HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {tok}\r\nContent-Type: text/plain\r\nContent-Length: 1000000\r\n\r\n"
    )
    .unwrap();
    c.write_all(&[b'x'; 200_000]).unwrap();
    // The temporary file exists while the body arrives...
    wait_for(
        || {
            media_files(&s.dir.path().join("media"))
                .iter()
                .any(|f| f.starts_with(".tmp-"))
        },
        "the temporary file",
    );
    // ...and is gone, with no row, once the client leaves.
    drop(c);
    wait_for(|| stored(&s) == before, "the temporary file removed");
    // The server still answers.
    upload(&s, &tok, "text/plain", None, b"after");
}

#[test]
fn a_restart_removes_orphan_files_and_keeps_stored_ones() {
    let mut s = TestServer::start();
    let (_, tok) = s.register("alice");
    let id = upload(&s, &tok, "text/plain", None, b"kept");
    let dir = s.dir.path().join("media");
    s.hs.take().unwrap().stop().unwrap();
    // What a kill leaves: a renamed file whose row was never committed, a temporary file.
    std::fs::write(dir.join("Orphan0123456789abcdefghijklmnop"), b"orphan").unwrap();
    std::fs::write(dir.join(".tmp-abandoned"), b"partial").unwrap();
    std::thread::sleep(Duration::from_millis(20));
    let hs = hearth::Homeserver::start(config_in(s.dir.path())).unwrap();
    s.base = format!("http://{}", hs.addrs()[0]);
    s.hs = Some(hs);
    let files = media_files(&dir);
    assert_eq!(files.len(), 1, "{files:?}");
    assert_eq!(download(&s, Some(&tok), &id).body, b"kept");
}

#[test]
fn create_then_upload_by_id() {
    let s = TestServer::start();
    let (_, alice) = s.register("alice");
    let (_, bob) = s.register("bob");
    let got = call(
        &s.base,
        "POST",
        "/_matrix/media/v1/create",
        Some(&alice),
        None,
        None,
    );
    assert_eq!(got.status, 200, "{}", got.json());
    let uri = got.json()["content_uri"].as_str().unwrap().to_owned();
    assert!(got.json()["unused_expires_at"].as_u64().unwrap() > 0);
    let id = uri.rsplit('/').next().unwrap().to_owned();
    // Not uploaded yet: the download waits for `timeout_ms`, then 504.
    let path = format!("/_matrix/client/v1/media/download/hearth.test/{id}?timeout_ms=300");
    let got = call(&s.base, "GET", &path, Some(&alice), None, None);
    assert_eq!(
        (got.status, got.errcode().as_str()),
        (504, "M_NOT_YET_UPLOADED")
    );
    let put = |tok: &str, body: &[u8]| {
        let path = format!("/_matrix/media/v3/upload/hearth.test/{id}");
        let got = call(
            &s.base,
            "PUT",
            &path,
            Some(tok),
            Some("text/plain"),
            Some(body),
        );
        (got.status, got.errcode())
    };
    assert_eq!(put(&bob, b"b"), (403, "M_FORBIDDEN".into()));
    assert_eq!(put(&alice, b"late"), (200, String::new()));
    assert_eq!(
        put(&alice, b"again"),
        (409, "M_CANNOT_OVERWRITE_MEDIA".into())
    );
    assert_eq!(download(&s, Some(&bob), &id).body, b"late");
    // At most five unused reservations.
    let create = || {
        call(
            &s.base,
            "POST",
            "/_matrix/media/v1/create",
            Some(&bob),
            None,
            None,
        )
    };
    let statuses: Vec<u16> = (0..6).map(|_| create().status).collect();
    assert_eq!(statuses, [200, 200, 200, 200, 200, 429]);
    assert_eq!(create().errcode(), "M_LIMIT_EXCEEDED");
}

#[test]
fn legacy_downloads_serve_only_media_uploaded_while_allowed() {
    let mut s = TestServer::start();
    let (_, tok) = s.register("alice");
    let frozen = upload(&s, &tok, "text/plain", None, b"authenticated only");
    let legacy = |s: &TestServer, id: &str| {
        let path = format!("/_matrix/media/v3/download/hearth.test/{id}");
        call(&s.base, "GET", &path, None, None, None)
    };
    assert_eq!(legacy(&s, &frozen).status, 404);
    s.hs.take().unwrap().stop().unwrap();
    let mut c = config_in(s.dir.path());
    c.media.legacy_unauthenticated_downloads = true;
    let hs = hearth::Homeserver::start(c).unwrap();
    s.base = format!("http://{}", hs.addrs()[0]);
    s.hs = Some(hs);
    let open = upload(&s, &tok, "text/plain", None, b"public");
    let got = legacy(&s, &open);
    assert_eq!(got.status, 200);
    assert_eq!(got.body, b"public");
    assert_eq!(got.header("X-Content-Type-Options"), Some("nosniff"));
    assert_eq!(legacy(&s, &frozen).status, 404, "still frozen");
    let path = format!("/_matrix/media/v3/download/hearth.test/{open}/named.txt");
    let got = call(&s.base, "GET", &path, None, None, None);
    assert_eq!(
        (got.status, got.header("Content-Disposition")),
        (200, Some("inline; filename=named.txt"))
    );
    let path = format!("/_matrix/media/r0/thumbnail/hearth.test/{open}?width=32&height=32");
    assert_eq!(
        call(&s.base, "GET", &path, None, None, None).status,
        400,
        "not an image"
    );
}

#[test]
fn remote_media_is_fetched_over_federation_and_cached() {
    use common::fed::{curl_bytes, register, Hearth};
    let a = Hearth::start();
    let b = Hearth::start();
    let (_, alice) = register(&a.url(), "alice");
    let (_, bob) = register(&b.url(), "bob");
    let png = encoded(gradient(400, 300), ImageFormat::Png);
    let (status, body) = curl_bytes(
        "POST",
        &format!("{}/_matrix/media/v3/upload?filename=pic.png", a.url()),
        &alice,
        Some(&png),
    );
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let v: Value = serde_json::from_slice(&body).unwrap();
    let mxc = v["content_uri"].as_str().unwrap();
    let id = mxc.rsplit('/').next().unwrap();
    let remote = format!("{}/_matrix/client/v1/media", b.url());
    let a_name = a.server_name();

    // Bob's server fetches it from Alice's (federation download, multipart) and serves it.
    let (status, got) = curl_bytes(
        "GET",
        &format!("{remote}/download/{a_name}/{id}"),
        &bob,
        None,
    );
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&got));
    assert_eq!(got, png);
    let thumb = format!("{remote}/thumbnail/{a_name}/{id}?width=96&height=96&method=crop");
    let (status, got) = curl_bytes("GET", &thumb, &bob, None);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&got));
    let img = image::load_from_memory(&got).unwrap();
    assert_eq!((img.width(), img.height()), (96, 96));
    // Unknown remote media: the remote 404 passes through.
    let (status, _) = curl_bytes(
        "GET",
        &format!("{remote}/download/{a_name}/NoSuchMedia"),
        &bob,
        None,
    );
    assert_eq!(status, 404);

    // Cached: served with Alice's server gone.
    a.hs.stop().unwrap();
    let (status, got) = curl_bytes(
        "GET",
        &format!("{remote}/download/{a_name}/{id}/x.png"),
        &bob,
        None,
    );
    assert_eq!(status, 200);
    assert_eq!(got, png);
}

/// Remote media larger than the 32 MiB that bounds other federation answers, but within the
/// upload limit (50 MiB by default), is fetched whole. It used to be cut at 32 MiB and fail.
#[test]
fn remote_media_over_32_mib_is_fetched() {
    use common::fed::{curl_bytes, register, Hearth};
    let a = Hearth::start();
    let b = Hearth::start();
    let (_, alice) = register(&a.url(), "alice");
    let (_, bob) = register(&b.url(), "bob");
    let big: Vec<u8> = (0..40u32 * 1024 * 1024)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let (status, body) = curl_bytes(
        "POST",
        &format!("{}/_matrix/media/v3/upload?filename=big.bin", a.url()),
        &alice,
        Some(&big),
    );
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let v: Value = serde_json::from_slice(&body).unwrap();
    let id = v["content_uri"]
        .as_str()
        .unwrap()
        .rsplit('/')
        .next()
        .unwrap()
        .to_owned();
    let (status, got) = curl_bytes(
        "GET",
        &format!(
            "{}/_matrix/client/v1/media/download/{}/{id}",
            b.url(),
            a.server_name()
        ),
        &bob,
        None,
    );
    assert_eq!(
        status,
        200,
        "{}",
        String::from_utf8_lossy(&got[..got.len().min(300)])
    );
    assert!(
        got == big,
        "got {} bytes, not the {} uploaded",
        got.len(),
        big.len()
    );
}

/// A remote server may answer a federation download with a `Location` (its files live
/// elsewhere); Hearth follows it once and caches the file. A location that redirects again
/// is refused.
#[test]
fn a_remote_download_that_redirects_is_followed_once() {
    use common::fed::{curl_bytes, register, Hearth};
    let png = encoded(gradient(64, 48), ImageFormat::Png);
    let remote = RedirectingRemote::start(png.clone());
    let b = Hearth::start();
    let (_, bob) = register(&b.url(), "bob");
    let url = |id: &str| {
        format!(
            "{}/_matrix/client/v1/media/download/{}/{id}",
            b.url(),
            remote.name
        )
    };
    let (status, got) = curl_bytes("GET", &url("pic"), &bob, None);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&got));
    assert_eq!(got, png);
    let (status, got) = curl_bytes("GET", &url("loop"), &bob, None);
    assert_eq!(status, 502, "{}", String::from_utf8_lossy(&got));
    assert_eq!(
        *remote.hits.lock().unwrap(),
        vec![
            "/_matrix/federation/v1/media/download/pic".to_owned(),
            "/files/pic".to_owned(),
            "/_matrix/federation/v1/media/download/loop".to_owned(),
            "/files/loop".to_owned(),
        ],
        "each hop once, and no second redirect followed"
    );
    // Cached: asked again, the remote is not contacted.
    let (status, got) = curl_bytes("GET", &url("pic"), &bob, None);
    assert_eq!((status, got), (200, png));
    assert_eq!(remote.hits.lock().unwrap().len(), 4);
}

/// A TLS "server" that answers federation downloads with a `Location` to its own `/files/`
/// path, serves `/files/pic`, and answers `/files/loop` with yet another redirect.
struct RedirectingRemote {
    name: String,
    hits: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    _dir: tempfile::TempDir,
}

impl RedirectingRemote {
    fn start(file: Vec<u8>) -> Self {
        use futures_lite::{AsyncReadExt, AsyncWriteExt};
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = common::fed::self_signed_cert(dir.path());
        let mut c = config_in(dir.path());
        c.tls_cert = Some(cert);
        c.tls_key = Some(key);
        let tls = hearth::server::load_tls(&c).unwrap().unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let name = format!("127.0.0.1:{}", listener.local_addr().unwrap().port());
        let hits = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (h, me) = (hits.clone(), name.clone());
        std::thread::spawn(move || {
            // Bounded: the test makes four requests that reach this server.
            for conn in listener.incoming().take(16) {
                let Ok(conn) = conn else { continue };
                let (tls, h, me, file) = (tls.clone(), h.clone(), me.clone(), file.clone());
                std::thread::spawn(move || {
                    smol::block_on(async move {
                        let Ok(conn) = smol::Async::new(conn) else {
                            return;
                        };
                        let Ok(mut s) = tls.accept(conn).await else {
                            return;
                        };
                        let mut buf = Vec::new();
                        let mut chunk = [0u8; 4096];
                        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                            match s.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        }
                        let head = String::from_utf8_lossy(&buf).to_string();
                        let path = head.split(' ').nth(1).unwrap_or("").to_owned();
                        h.lock().unwrap().push(path.clone());
                        let fed = "/_matrix/federation/v1/media/download/";
                        let (status, headers, body): (&str, String, Vec<u8>) = if let Some(id) =
                            path.strip_prefix(fed)
                        {
                            let body = format!(
                                    "--b\r\nContent-Type: application/json\r\n\r\n{{}}\r\n--b\r\nLocation: https://{me}/files/{id}\r\n\r\n\r\n--b--\r\n"
                                );
                            (
                                "200 OK",
                                "Content-Type: multipart/mixed; boundary=b\r\n".into(),
                                body.into_bytes(),
                            )
                        } else if path == "/files/pic" {
                            ("200 OK", "Content-Type: image/png\r\n".into(), file)
                        } else if path == "/files/loop" {
                            (
                                "302 Found",
                                format!("Location: https://{me}/files/pic\r\n"),
                                Vec::new(),
                            )
                        } else {
                            ("404 Not Found", String::new(), Vec::new())
                        };
                        let head = format!(
                            "HTTP/1.1 {status}\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n",
                            body.len()
                        );
                        let _ = s.write_all(head.as_bytes()).await;
                        let _ = s.write_all(&body).await;
                        let _ = s.flush().await;
                        let _ = s.close().await;
                    });
                });
            }
        });
        Self {
            name,
            hits,
            _dir: dir,
        }
    }
}
