//! The local web server: a fixed set of routes (the embedded page and the JSON API), never
//! a file path taken from the request, so nothing outside the analysis can be served.

use crate::api::{ApiError, Browser};
use anyhow::{Context, Result};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::io::Read;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use tiny_http::{Header, Method, Request, Response, Server};

const INDEX_HTML: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const STYLE_CSS: &str = include_str!("assets/style.css");

/// Largest request body read (the text box's JSON); larger ones get 413 unread.
const MAX_BODY: usize = 64 * 1024;

/// A running server; `stop` ends it (it also stops when dropped).
pub struct RunningServer {
    addr: SocketAddr,
    server: Arc<Server>,
    stop: Arc<AtomicBool>,
    workers: Vec<JoinHandle<()>>,
}

impl RunningServer {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Serves until the process ends.
    pub fn wait(mut self) {
        for w in self.workers.drain(..) {
            w.join().ok();
        }
    }

    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for _ in 0..self.workers.len() {
            self.server.unblock();
        }
        for w in self.workers.drain(..) {
            w.join().ok();
        }
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Binds `host:port` (port 0: any free port) and serves `browser` on `threads` workers.
pub fn start(browser: Browser, host: &str, port: u16, threads: usize) -> Result<RunningServer> {
    let server = Server::http((host, port))
        .map_err(|e| anyhow::anyhow!("{e}"))
        .with_context(|| format!("cannot listen on {host}:{port} (port in use? try --port)"))?;
    let addr = server
        .server_addr()
        .to_ip()
        .context("the server has no IP address")?;
    let server = Arc::new(server);
    let browser = Arc::new(browser);
    let stop = Arc::new(AtomicBool::new(false));
    let workers = (0..threads.max(1))
        .map(|_| {
            let (server, browser, stop) = (server.clone(), browser.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    match server.recv() {
                        Ok(req) => handle(&browser, req),
                        Err(_) => break,
                    }
                }
            })
        })
        .collect();
    Ok(RunningServer {
        addr,
        server,
        stop,
        workers,
    })
}

fn header(name: &str, value: &str) -> Header {
    Header::from_bytes(name.as_bytes(), value.as_bytes()).expect("valid header")
}

struct Reply {
    status: u16,
    content_type: &'static str,
    body: Vec<u8>,
}

impl Reply {
    fn json(status: u16, v: &Value) -> Self {
        Self {
            status,
            content_type: "application/json; charset=utf-8",
            body: serde_json::to_vec(v).unwrap_or_default(),
        }
    }
    fn error(e: ApiError) -> Self {
        Self::json(e.status, &json!({ "error": e.message }))
    }
    fn asset(content_type: &'static str, text: &str) -> Self {
        Self {
            status: 200,
            content_type,
            body: text.as_bytes().to_vec(),
        }
    }
}

fn handle(browser: &Browser, mut req: Request) {
    let reply = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| route(browser, &mut req)))
        .unwrap_or_else(|_| {
            Reply::error(ApiError::new(
                500,
                "internal error while answering this request",
            ))
        });
    // tiny_http leaves the body out itself for HEAD requests.
    let resp = Response::from_data(reply.body)
        .with_status_code(reply.status)
        .with_header(header("Content-Type", reply.content_type))
        .with_header(header("Cache-Control", "no-store"))
        .with_header(header("X-Content-Type-Options", "nosniff"))
        .with_header(header(
            "Content-Security-Policy",
            "default-src 'self'; img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'",
        ));
    // The client may have gone away; nothing to do then.
    req.respond(resp).ok();
}

fn route(browser: &Browser, req: &mut Request) -> Reply {
    let url = req.url().to_string();
    let (path, query) = url.split_once('?').unwrap_or((&url, ""));
    let method = req.method().clone();
    let is_get = matches!(method, Method::Get | Method::Head);
    let not_allowed = || {
        Reply::error(ApiError::new(
            405,
            format!("{method} is not allowed on {path}"),
        ))
    };
    match path {
        "/" | "/index.html" => {
            if !is_get {
                return not_allowed();
            }
            Reply::asset("text/html; charset=utf-8", INDEX_HTML)
        }
        "/app.js" if is_get => Reply::asset("text/javascript; charset=utf-8", APP_JS),
        "/style.css" if is_get => Reply::asset("text/css; charset=utf-8", STYLE_CSS),
        "/api/meta" if is_get => Reply::json(200, &browser.meta()),
        "/api/latents" if is_get => match browser.list(&parse_query(query)) {
            Ok(v) => Reply::json(200, &v),
            Err(e) => Reply::error(e),
        },
        "/api/encode" => {
            if method != Method::Post {
                return not_allowed();
            }
            match read_body(req) {
                Ok(body) => match browser.encode(&body) {
                    Ok(v) => Reply::json(200, &v),
                    Err(e) => Reply::error(e),
                },
                Err(e) => Reply::error(e),
            }
        }
        p if p.starts_with("/api/latent/") && is_get => {
            match browser.latent(&percent_decode(&p["/api/latent/".len()..])) {
                Ok(v) => Reply::json(200, &v),
                Err(e) => Reply::error(e),
            }
        }
        "/app.js" | "/style.css" | "/api/meta" | "/api/latents" => not_allowed(),
        p if p.starts_with("/api/") => {
            Reply::error(ApiError::new(404, format!("no API endpoint {p}")))
        }
        _ => Reply::error(ApiError::new(
            404,
            "not found: this server only serves the browser page (/) and its API (/api/...)",
        )),
    }
}

/// The request body, at most `MAX_BODY` bytes.
fn read_body(req: &mut Request) -> Result<Vec<u8>, ApiError> {
    let too_big = |n: usize| {
        ApiError::new(
            413,
            format!("request body of {n} bytes is too large (at most {MAX_BODY})"),
        )
    };
    if let Some(n) = req.body_length() {
        if n > MAX_BODY {
            return Err(too_big(n));
        }
    }
    let mut body = Vec::new();
    req.as_reader()
        .take(MAX_BODY as u64 + 1)
        .read_to_end(&mut body)
        .map_err(|e| ApiError::new(400, format!("reading the request body: {e}")))?;
    if body.len() > MAX_BODY {
        return Err(too_big(body.len()));
    }
    Ok(body)
}

fn parse_query(q: &str) -> HashMap<String, String> {
    q.split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

/// `%XX` and `+` decoding; invalid escapes are kept as typed.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => match (hex(b[i + 1]), hex(b[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h * 16 + l);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex(c: u8) -> Option<u8> {
    (c as char).to_digit(16).map(|d| d as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decoding() {
        assert_eq!(percent_decode("a%20b+c"), "a b c");
        assert_eq!(percent_decode("%2e%2E%2f"), "../");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
        assert_eq!(percent_decode("%e2%96%81x"), "\u{2581}x");
        assert_eq!(percent_decode("é%"), "é%");
        let q = parse_query("sort=max&q=%20cat&&x");
        assert_eq!(q["sort"], "max");
        assert_eq!(q["q"], " cat");
        assert_eq!(q["x"], "");
    }
}
