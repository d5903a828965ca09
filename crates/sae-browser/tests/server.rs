//! The HTTP API over loopback: a server on an ephemeral port, a bounded number of requests,
//! then the server stops itself.

mod common;

use common::{get, post, raw, toy_analysis, toy_server, Reply};
use sae_browser::server::{start_with, RunningServer, ServeOptions};
use sae_browser::toy::{ToyModel, PAIRS};
use sae_browser::{Browser, SaeTextEncoder, TextEncoder};
use serde_json::Value;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

#[test]
fn api_serves_the_analysis_and_refuses_bad_requests() {
    let tmp = tempfile::tempdir().unwrap();
    let server = toy_server(&tmp.path().join("analysis"), true);
    let addr = server.addr();
    assert!(addr.ip().is_loopback());
    let model = ToyModel::default();
    let cat = model.word_latent(" cat");
    let red_ball = model.pair_latent(0);
    assert_eq!(PAIRS[0], (" red", " ball"));
    let dead = model.dead_latent();

    // The page and its assets, from the binary.
    let page = get(addr, "/");
    assert_eq!(page.status, 200);
    assert!(page.body.contains("<script src=\"/app.js\">"));
    assert!(
        !page.body.contains("http://") && !page.body.contains("https://"),
        "no external assets"
    );
    assert_eq!(get(addr, "/app.js").status, 200);
    assert!(get(addr, "/style.css").headers.contains("text/css"));

    let meta = get(addr, "/api/meta").json();
    let d_sae = meta["meta"]["d_sae"].as_u64().unwrap() as usize;
    assert_eq!(d_sae, dead + 1);
    assert_eq!(meta["live"], true);
    assert!(meta["density"]["dead"].as_u64().unwrap() >= 1);

    // List: sorted by frequency, by id, searchable by token, dead ones hidden on request.
    let list = get(addr, "/api/latents?sort=freq&order=desc&limit=500").json();
    assert_eq!(list["total"].as_u64().unwrap() as usize, d_sae);
    let fired: Vec<u64> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["n_fired"].as_u64().unwrap())
        .collect();
    assert!(fired.windows(2).all(|w| w[0] >= w[1]), "{fired:?}");
    let by_id = get(addr, "/api/latents?sort=id&order=asc&limit=3").json();
    let ids: Vec<u64> = by_id["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, vec![0, 1, 2]);
    let found = get(addr, "/api/latents?q=%20CAT").json();
    let found_ids: Vec<usize> = found["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_u64().unwrap() as usize)
        .collect();
    assert!(found_ids.contains(&cat), "{found_ids:?}");
    assert!(found_ids.len() < d_sae);
    let alive = get(addr, "/api/latents?dead=hide&limit=500").json();
    assert!(alive["items"]
        .as_array()
        .unwrap()
        .iter()
        .all(|i| i["n_fired"].as_u64().unwrap() > 0));
    assert_eq!(get(addr, "/api/latents?sort=bogus").status, 400);
    assert_eq!(get(addr, "/api/latents?offset=x").status, 400);

    // A latent page: its top contexts are centred on its word, strongest first.
    let l = get(addr, &format!("/api/latent/{cat}")).json();
    let top = l["top"].as_array().unwrap();
    assert!(!top.is_empty());
    for e in top {
        let c = e["center"].as_u64().unwrap() as usize;
        assert_eq!(e["tokens"][c], " cat");
        assert_eq!(e["acts"][c], e["act"]);
    }
    assert_eq!(l["logits"]["top"][0]["token"], " cat");
    assert!(
        l["hist"]["bins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b.as_u64().unwrap())
            .sum::<u64>()
            == l["n_fired"].as_u64().unwrap()
    );

    // Unknown latents: 404 with a JSON error.
    for bad in [
        format!("{d_sae}"),
        "999999999999999999999".into(),
        "abc".into(),
        "-1".into(),
        "".into(),
    ] {
        let r = get(addr, &format!("/api/latent/{bad}"));
        assert_eq!(r.status, 404, "latent '{bad}'");
        assert!(
            r.json()["error"]
                .as_str()
                .unwrap()
                .contains("unknown latent"),
            "{}",
            r.body
        );
    }

    // Nothing outside the fixed routes, however the path is spelled.
    for p in [
        "/meta.json",
        "/latents.bin",
        "/../meta.json",
        "/%2e%2e/meta.json",
        "/api/latent/..%2F..%2Fmeta.json",
        "//etc/passwd",
        "/static/../../etc/passwd",
        "/api/../meta.json",
        "/vocab.json",
    ] {
        let r = get(addr, p);
        assert_eq!(r.status, 404, "{p}");
        assert!(
            !r.body.contains("format_version") && !r.body.contains("root:"),
            "{p} leaked: {}",
            r.body
        );
    }

    // The text box: tokens and which latents fire on which token.
    let r = post(addr, "/api/encode", br#"{"text": "the red ball"}"#);
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!(
        v["tokens"],
        serde_json::json!(["<bos>", " the", " red", " ball"])
    );
    let pair = v["latents"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["id"] == red_ball)
        .expect("red-ball latent fires");
    assert_eq!(pair["count"], 1);
    assert!(
        (pair["acts"][3].as_f64().unwrap() - 0.5).abs() < 1e-5,
        "{pair}"
    );
    let at_ball: Vec<u64> = v["per_token"][3]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p[0].as_u64().unwrap())
        .collect();
    assert!(
        at_ball.contains(&(red_ball as u64))
            && at_ball.contains(&(model.word_latent(" ball") as u64))
    );

    // Too much text: clear 413s, never a crash.
    let long = serde_json::json!({ "text": "cat ".repeat(3000) }).to_string();
    let r = post(addr, "/api/encode", long.as_bytes());
    assert_eq!(r.status, 413, "{}", r.body);
    assert!(r.json()["error"].as_str().unwrap().contains("too long"));
    let many_tokens = serde_json::json!({ "text": "cat ".repeat(100) }).to_string();
    let r = post(addr, "/api/encode", many_tokens.as_bytes());
    assert_eq!(r.status, 413, "{}", r.body);
    assert!(
        r.json()["error"].as_str().unwrap().contains("at most 64"),
        "{}",
        r.body
    );
    let r = post(addr, "/api/encode", &vec![b'x'; 200 * 1024]);
    assert_eq!(r.status, 413);
    let r = post(addr, "/api/encode", b"not json");
    assert_eq!(r.status, 400);
    assert!(r.json()["error"].as_str().is_some());
    assert_eq!(post(addr, "/api/encode", br#"{"text": "   "}"#).status, 400);
    assert_eq!(get(addr, "/api/encode").status, 405);
    assert_eq!(post(addr, "/api/meta", b"{}").status, 405);

    // Garbage on the socket does not take the server down.
    raw(addr, b"NONSENSE\r\n\r\n");
    raw(addr, b"GET /\xff\xfe HTTP/1.0\r\n\r\n");
    let ok: Value = get(addr, "/api/meta").json();
    assert_eq!(ok["meta"]["d_sae"].as_u64().unwrap() as usize, d_sae);

    // The server stops itself: the port no longer answers.
    server.stop();
    let closed = (0..100).any(|_| {
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::net::TcpStream::connect(addr).is_err()
    });
    assert!(closed, "server still listening 2 s after stop");
}

#[test]
fn without_a_model_the_text_box_says_so() {
    let tmp = tempfile::tempdir().unwrap();
    let server = toy_server(&tmp.path().join("a"), false);
    let addr = server.addr();
    assert_eq!(get(addr, "/api/meta").json()["live"], false);
    let r = post(addr, "/api/encode", br#"{"text": "the cat"}"#);
    assert_eq!(r.status, 503);
    assert!(r.json()["error"].as_str().unwrap().contains("no model"));
    server.stop();
}

/// A toy server on loopback with the given options, the toy model live or not.
fn server_with(dir: &Path, live: bool, opts: &ServeOptions) -> RunningServer {
    let analysis = toy_analysis(dir);
    let encoder = live.then(|| {
        let model = ToyModel::default();
        let sae = model.sae();
        Box::new(SaeTextEncoder::new(model, sae, 64).unwrap()) as Box<dyn TextEncoder>
    });
    start_with(Browser::new(analysis, encoder), "127.0.0.1", 0, opts).expect("start server")
}

fn status_of(answer: &[u8]) -> u16 {
    String::from_utf8_lossy(answer)
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// A client that sends `head` at once, then `tail` one byte a second, reading meanwhile, until
/// the server answers and closes or `limit` passes. Returns the status (0: no answer) and when
/// the answer was complete.
fn trickle(addr: SocketAddr, head: &[u8], tail: &[u8], limit: Duration) -> (u16, Duration) {
    let t0 = Instant::now();
    let mut s = TcpStream::connect(addr).expect("connect");
    // The read timeout paces the bytes: one a second.
    s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    s.write_all(head).ok();
    let mut answer = Vec::new();
    let mut rest = tail.iter();
    while t0.elapsed() < limit {
        if let Some(&b) = rest.next() {
            // The server may have answered and closed already; read what it sent.
            s.write_all(&[b]).ok();
        }
        let mut buf = [0u8; 4096];
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => break,
        }
    }
    (status_of(&answer), t0.elapsed())
}

fn timed_get(addr: SocketAddr, path: &str) -> (Reply, Duration) {
    let t0 = Instant::now();
    let r = get(addr, path);
    (r, t0.elapsed())
}

#[test]
fn slow_clients_do_not_starve_the_workers() {
    let tmp = tempfile::tempdir().unwrap();
    let timeout = Duration::from_secs(4);
    let opts = ServeOptions {
        threads: 2,
        request_timeout: timeout,
        ..ServeOptions::default()
    };
    let server = server_with(&tmp.path().join("a"), true, &opts);
    let addr = server.addr();
    let limit = Duration::from_secs(15);

    // Three clients announce a body of 2000 bytes and send it a byte a second; three more send
    // their headers that way. Six clients, two workers.
    let body_head = "POST /api/encode HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 2000\r\n\r\n";
    let body_tail = format!("{{\"text\": \"{}\"}}", "a".repeat(2000 - 12));
    assert_eq!(body_tail.len(), 2000);
    let mut slow = Vec::new();
    for k in 0..6 {
        let (head, tail) = if k % 2 == 0 {
            (body_head.to_string(), body_tail.clone())
        } else {
            (
                "GET /api/meta HTTP/1.1\r\n".to_string(),
                format!("Host: localhost\r\nX-Pad: {}\r\n\r\n", "b".repeat(200)),
            )
        };
        slow.push(std::thread::spawn(move || {
            trickle(addr, head.as_bytes(), tail.as_bytes(), limit)
        }));
    }
    std::thread::sleep(Duration::from_millis(1500));

    // Meanwhile other clients are answered at once.
    for _ in 0..3 {
        let (r, took) = timed_get(addr, "/api/meta");
        assert_eq!(r.status, 200, "{}", r.body);
        assert!(
            took < Duration::from_secs(2),
            "GET took {took:?} beside slow clients"
        );
    }
    let r = post(addr, "/api/encode", br#"{"text": "the red ball"}"#);
    assert_eq!(r.status, 200, "{}", r.body);

    // The slow ones are cut off at the deadline with 408 and the connection closed.
    for t in slow {
        let (status, took) = t.join().unwrap();
        assert_eq!(status, 408, "slow client answered {status} after {took:?}");
        assert!(
            took >= timeout - Duration::from_millis(500) && took < timeout + Duration::from_secs(3),
            "slow client cut off after {took:?}"
        );
    }
    assert_eq!(get(addr, "/api/meta").status, 200);
    server.stop();
}

#[test]
fn stalled_oversized_and_malformed_requests_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let timeout = Duration::from_secs(2);
    let opts = ServeOptions {
        threads: 1,
        request_timeout: timeout,
        ..ServeOptions::default()
    };
    let server = server_with(&tmp.path().join("a"), false, &opts);
    let addr = server.addr();
    let limit = Duration::from_secs(10);

    // A body announced and never sent: 408 at the deadline, the one worker free meanwhile.
    let stalled = std::thread::spawn(move || {
        trickle(
            addr,
            b"POST /api/encode HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\n\r\n{\"te",
            b"",
            limit,
        )
    });
    std::thread::sleep(Duration::from_millis(300));
    let (r, took) = timed_get(addr, "/api/meta");
    assert_eq!(r.status, 200);
    assert!(took < Duration::from_secs(1), "{took:?}");
    let (status, took) = stalled.join().unwrap();
    assert_eq!(status, 408);
    assert!(took < timeout + Duration::from_secs(2), "{took:?}");

    // Too large by its Content-Length: 413 at once, before any of it is sent.
    let t0 = Instant::now();
    let r = raw(
        addr,
        b"POST /api/encode HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1000000000000\r\n\r\n",
    );
    assert_eq!(r.status, 413, "{}", r.body);
    assert!(r.json()["error"].as_str().unwrap().contains("too large"));
    assert!(t0.elapsed() < Duration::from_secs(1));

    let cases: Vec<(Vec<u8>, u16)> = vec![
        (
            b"POST /api/encode HTTP/1.1\r\nHost: localhost\r\nContent-Length: 99999999999999999999999\r\n\r\n".to_vec(),
            400,
        ),
        (
            b"POST /api/encode HTTP/1.1\r\nHost: localhost\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}".to_vec(),
            400,
        ),
        (
            b"POST /api/encode HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n".to_vec(),
            411,
        ),
        (
            format!("GET / HTTP/1.1\r\nHost: localhost\r\nX-Pad: {}\r\n\r\n", "p".repeat(20_000)).into_bytes(),
            431,
        ),
        (b"GET / HTTP/2.0\r\nHost: localhost\r\n\r\n".to_vec(), 505),
        (b"GET / HTTP/1.1\r\nHost: localhost\r\nbad header line\r\n\r\n".to_vec(), 400),
        (b"POST /api/encode HTTP/1.1\r\nHost: localhost\r\nContent-Length: 8\r\n\r\nnot json".to_vec(), 400),
    ];
    for (req, want) in cases {
        let r = raw(addr, &req);
        let shown = String::from_utf8_lossy(&req[..req.len().min(80)]).into_owned();
        assert_eq!(r.status, want, "{shown}: {}", r.body);
        assert!(r.json()["error"].as_str().is_some(), "{shown}");
    }

    // A body announced with Expect: 100-continue is asked for, then read.
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"POST /api/encode HTTP/1.1\r\nHost: localhost\r\nExpect: 100-continue\r\nContent-Length: 9\r\n\r\n")
        .unwrap();
    let mut buf = [0u8; 25];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"HTTP/1.1 100 Continue\r\n\r\n");
    s.write_all(br#"{"text":}"#).unwrap();
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).ok();
    assert_eq!(
        status_of(&answer),
        400,
        "{}",
        String::from_utf8_lossy(&answer)
    );

    assert_eq!(get(addr, "/api/meta").status, 200);
    server.stop();
}

#[test]
fn only_this_host_and_same_origin_posts_are_answered() {
    let tmp = tempfile::tempdir().unwrap();
    let server = server_with(&tmp.path().join("a"), true, &ServeOptions::default());
    let addr = server.addr();
    let port = addr.port();
    let get11 = |host: &str| {
        raw(
            addr,
            format!("GET /api/meta HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes(),
        )
    };
    for host in [
        format!("127.0.0.1:{port}"),
        "127.0.0.1".into(),
        format!("localhost:{port}"),
        "LocalHost".into(),
        format!("[::1]:{port}"),
        "[0:0:0:0:0:0:0:1]".into(),
    ] {
        let r = get11(&host);
        assert_eq!(r.status, 200, "Host: {host}: {}", r.body);
    }
    for host in [
        "evil.example".to_string(),
        format!("evil.example:{port}"),
        "localhost.evil.example".into(),
        "127.0.0.1.evil.example".into(),
        "localhost:http".into(),
        "localhost:99999".into(),
        "".into(),
    ] {
        let r = get11(&host);
        assert_eq!(r.status, 421, "Host: {host}: {}", r.body);
        let msg = r.json()["error"].as_str().unwrap().to_string();
        assert!(
            msg.contains(&format!("'{host}'")) && msg.contains("127.0.0.1"),
            "{msg}"
        );
    }
    // HTTP/1.1 must name the host, once; HTTP/1.0 clients (no browser) may leave it out.
    let r = raw(addr, b"GET /api/meta HTTP/1.1\r\n\r\n");
    assert_eq!(r.status, 400);
    assert!(r.json()["error"].as_str().unwrap().contains("Host"));
    assert_eq!(raw(addr, b"GET /api/meta HTTP/1.0\r\n\r\n").status, 200);
    let r = raw(
        addr,
        b"GET /api/meta HTTP/1.1\r\nHost: localhost\r\nHost: evil.example\r\n\r\n",
    );
    assert_eq!(r.status, 400);
    // A full URL in the request line would name another host than Host does.
    let r = raw(
        addr,
        b"GET http://evil.example/api/meta HTTP/1.1\r\nHost: localhost\r\n\r\n",
    );
    assert_eq!(r.status, 400);

    let body = br#"{"text": "the cat"}"#;
    let post_from = |host: &str, origin: Option<&str>| {
        let origin = origin
            .map(|o| format!("Origin: {o}\r\n"))
            .unwrap_or_default();
        let mut req = format!(
            "POST /api/encode HTTP/1.1\r\nHost: {host}\r\n{origin}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        req.extend_from_slice(body);
        raw(addr, &req)
    };
    let here = format!("127.0.0.1:{port}");
    // The page itself, and tools that send no Origin (curl).
    let r = post_from(&here, Some(&format!("http://{here}")));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(post_from(&here, None).status, 200);
    let r = post_from(
        &format!("localhost:{port}"),
        Some(&format!("http://LOCALHOST:{port}")),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    for origin in [
        "http://evil.example".to_string(),
        format!("http://evil.example:{port}"),
        "null".into(),
        format!("https://{here}"),
        // Another page on this machine, on another port.
        "http://127.0.0.1:1".into(),
        format!("http://localhost:{port}"),
    ] {
        let r = post_from(&here, Some(&origin));
        assert_eq!(r.status, 403, "Origin: {origin}: {}", r.body);
        assert!(r.json()["error"].as_str().unwrap().contains(&origin));
    }
    // A rebound name is refused whatever the Origin says.
    let r = post_from("evil.example", Some("http://evil.example"));
    assert_eq!(r.status, 421);
    server.stop();
}
