//! Bad-input cases: `sae serve`. Bad flags and analysis directories go through `refused`; for
//! the running server, "refused" means an HTTP 4xx with a JSON error, and the server still
//! answering afterwards.

use crate::harness::*;

use sae_browser::format::Provenance;
use sae_browser::toy::ToyModel;
use sae_browser::{analyze, AnalyzeOptions, ScanConfig};
use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// A small analysis of the toy model, made once per test process; the servers only read it.
fn toy_analysis() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = scratch("serve-analysis").join("analysis");
        let model = ToyModel::default();
        let ctx = 16;
        let tokens = model.pack(&model.corpus(2000, 1), ctx);
        let opts = AnalyzeOptions {
            scan: ScanConfig {
                top_k: 4,
                left: 4,
                right: 2,
                ..ScanConfig::default()
            },
            batch: 16,
            n_logits: 3,
            progress: false,
        };
        let prov = Provenance {
            sae: "toy".into(),
            model: "toy".into(),
            corpus: "toy sentences".into(),
            ..Provenance::default()
        };
        analyze(&model, &model.sae(), &tokens, ctx, &opts, &prov, &dir).expect("toy analysis");
        dir
    })
}

/// A `sae serve` process on loopback; killed when dropped, also when a test fails.
struct Served {
    child: Child,
    port: u16,
}

impl Drop for Served {
    fn drop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }
}

impl Served {
    /// Starts `sae serve` over the toy analysis (no model) on a free port, with a 2 s request
    /// timeout, and waits until it answers.
    fn start() -> Self {
        let dir = toy_analysis();
        // Another process may take the free port before the server binds it; then try another.
        let mut last_err = String::new();
        for _ in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free port")
                .port();
            let child = Command::new(env!("CARGO_BIN_EXE_sae"))
                .args([
                    "serve",
                    "--analysis",
                    s(dir),
                    "--no-model",
                    "--host",
                    "127.0.0.1",
                ])
                .args(["--port", &port.to_string(), "--threads", "2"])
                .args(["--request-timeout", "2"])
                .env("NO_COLOR", "1")
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("running sae serve");
            let mut served = Served { child, port };
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_secs(30) {
                if let Ok(Some(_)) = served.child.try_wait() {
                    if let Some(mut e) = served.child.stderr.take() {
                        e.read_to_string(&mut last_err).ok();
                    }
                    break;
                }
                if served.get("/api/meta").0 == 200 {
                    return served;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            if !last_err.contains("cannot listen") {
                panic!("sae serve did not come up on port {port}: {last_err}");
            }
        }
        panic!("sae serve found no free port: {last_err}");
    }

    /// Sends raw bytes, returns the status (0: no answer) and the body.
    fn raw(&self, request: &[u8]) -> (u16, String) {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return (0, String::new());
        };
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        // The server may answer (413) and close before all is sent; read anyway.
        s.write_all(request).ok();
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).ok();
        let text = String::from_utf8_lossy(&buf).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        (status, body.to_string())
    }

    fn get(&self, path: &str) -> (u16, String) {
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\n\r\n",
            self.port
        );
        self.raw(req.as_bytes())
    }

    fn post(&self, extra_headers: &str, body: &[u8]) -> (u16, String) {
        let mut req = format!(
            "POST /api/encode HTTP/1.1\r\nHost: 127.0.0.1:{}\r\n{extra_headers}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            self.port,
            body.len()
        )
        .into_bytes();
        req.extend_from_slice(body);
        self.raw(&req)
    }

    /// The answer is `status` with a JSON error holding `needle`, and the server still answers.
    fn assert_refused(&self, answer: (u16, String), status: u16, needle: &str) {
        println!("bad-input case: HTTP request refused with {status}");
        let (got, body) = answer;
        assert_eq!(got, status, "{body}");
        let v: serde_json::Value =
            serde_json::from_str(&body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"));
        let msg = v["error"].as_str().unwrap_or_default();
        assert!(msg.contains(needle), "error lacks '{needle}': {msg}");
        let (after, body) = self.get("/api/meta");
        assert_eq!(after, 200, "the server stopped answering: {body}");
    }
}

// ---- bad flags and directories, through the harness ----

#[test]
fn serve_missing_analysis_dir() {
    let d = scratch("serve-missing");
    let missing = d.join("no-such-analysis");
    refused(
        &["serve", "--analysis", s(&missing), "--no-model"],
        &[s(&missing), "no such directory", "sae analyze"],
        &[&d],
    );
}

#[test]
fn serve_analysis_is_a_file() {
    let d = scratch("serve-file");
    let file = d.join("meta.json");
    std::fs::write(&file, "{}").unwrap();
    refused(
        &["serve", "--analysis", s(&file), "--no-model"],
        &[s(&file), "not a directory"],
        &[&d],
    );
}

#[test]
fn serve_analysis_is_an_sae_dir() {
    let d = scratch("serve-sae-dir");
    let sae_dir = d.join("sae");
    std::fs::create_dir_all(&sae_dir).unwrap();
    std::fs::write(sae_dir.join("cfg.json"), r#"{"d_in": 4, "d_sae": 8}"#).unwrap();
    refused(
        &["serve", "--analysis", s(&sae_dir), "--no-model"],
        &[s(&sae_dir), "SAE directory", "sae analyze --sae"],
        &[&d],
    );
}

#[test]
fn serve_damaged_analysis_meta() {
    let d = scratch("serve-damaged");
    let dir = d.join("analysis");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("meta.json"), "not json").unwrap();
    refused(
        &["serve", "--analysis", s(&dir), "--no-model"],
        &[s(&dir), "meta.json", "sae analyze"],
        &[&d],
    );
}

#[test]
fn serve_port_in_use() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let dir = toy_analysis();
    refused(
        &[
            "serve",
            "--analysis",
            s(dir),
            "--no-model",
            "--host",
            "127.0.0.1",
            "--port",
            &port,
        ],
        &[&port, "--port"],
        &[dir],
    );
}

#[test]
fn serve_zero_request_timeout() {
    let dir = toy_analysis();
    refused(
        &[
            "serve",
            "--analysis",
            s(dir),
            "--no-model",
            "--request-timeout",
            "0",
        ],
        &["--request-timeout"],
        &[dir],
    );
}

// ---- bad requests to a running server ----

#[test]
fn serve_wrong_host() {
    let srv = Served::start();
    let req = format!(
        "GET /api/meta HTTP/1.1\r\nHost: evil.example:{}\r\n\r\n",
        srv.port
    );
    srv.assert_refused(srv.raw(req.as_bytes()), 421, "evil.example");
    srv.assert_refused(srv.raw(b"GET /api/meta HTTP/1.1\r\n\r\n"), 400, "Host");
}

#[test]
fn serve_cross_origin_post() {
    let srv = Served::start();
    let body = br#"{"text": "the cat"}"#;
    srv.assert_refused(
        srv.post("Origin: http://evil.example\r\n", body),
        403,
        "http://evil.example",
    );
    // The same POST from the page itself gets past the check (to "no model loaded").
    let here = format!("Origin: http://127.0.0.1:{}\r\n", srv.port);
    assert_eq!(srv.post(&here, body).0, 503);
}

#[test]
fn serve_oversized_body() {
    let srv = Served::start();
    srv.assert_refused(srv.post("", &vec![b'x'; 200 * 1024]), 413, "too large");
    let huge = format!(
        "POST /api/encode HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: 1000000000000\r\n\r\n",
        srv.port
    );
    srv.assert_refused(srv.raw(huge.as_bytes()), 413, "too large");
}

#[test]
fn serve_slow_bodies() {
    let srv = Served::start();
    let port = srv.port;
    // Five clients (the server has two workers) send a 1000-byte body a byte a second.
    let slow: Vec<_> = (0..5)
        .map(|_| {
            std::thread::spawn(move || {
                let t0 = Instant::now();
                let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
                let head = format!(
                    "POST /api/encode HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 1000\r\n\r\n"
                );
                s.write_all(head.as_bytes()).ok();
                let mut answer = Vec::new();
                while t0.elapsed() < Duration::from_secs(10) {
                    s.write_all(b" ").ok();
                    let mut buf = [0u8; 1024];
                    match s.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => answer.extend_from_slice(&buf[..n]),
                        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                        Err(_) => break,
                    }
                }
                (String::from_utf8_lossy(&answer).into_owned(), t0.elapsed())
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(1000));
    let t0 = Instant::now();
    let (status, _) = srv.get("/api/meta");
    assert_eq!(status, 200);
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "GET took {:?}",
        t0.elapsed()
    );
    for t in slow {
        let (answer, took) = t.join().unwrap();
        assert!(
            answer.starts_with("HTTP/1.1 408"),
            "after {took:?}: {answer}"
        );
        assert!(took < Duration::from_secs(6), "cut off only after {took:?}");
    }
    assert_eq!(srv.get("/api/meta").0, 200);
}

#[test]
fn serve_bad_json_body() {
    let srv = Served::start();
    srv.assert_refused(srv.post("", b"{\"text\": "), 400, "JSON");
    srv.assert_refused(srv.post("", br#"{"txt": "the cat"}"#), 400, "JSON");
}

#[test]
fn serve_unknown_latent() {
    let srv = Served::start();
    for id in ["99999", "-1", "abc", "1e3"] {
        srv.assert_refused(srv.get(&format!("/api/latent/{id}")), 404, "unknown latent");
    }
}

#[test]
fn serve_path_traversal() {
    let srv = Served::start();
    for p in [
        "/../meta.json",
        "/%2e%2e/meta.json",
        "/api/latent/..%2F..%2Fmeta.json",
        "/latents.bin",
        "//etc/passwd",
    ] {
        let (status, body) = srv.get(p);
        assert!(
            !body.contains("format_version"),
            "{p} leaked the analysis: {body}"
        );
        srv.assert_refused((status, body), 404, "");
    }
}
