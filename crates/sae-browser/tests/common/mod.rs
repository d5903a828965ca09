//! Shared by the server and browser tests: a toy analysis and a tiny HTTP/1.0 client.
#![allow(dead_code)]

use sae_browser::format::Provenance;
use sae_browser::server::{start, RunningServer};
use sae_browser::toy::ToyModel;
use sae_browser::{analyze, Analysis, AnalyzeOptions, Browser, SaeTextEncoder, ScanConfig};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

/// Scans the toy corpus with the toy SAE into `dir`.
pub fn toy_analysis(dir: &Path) -> Analysis {
    let model = ToyModel::default();
    let sae = model.sae();
    let ctx = 16;
    let tokens = model.pack(&model.corpus(6000, 1), ctx);
    let opts = AnalyzeOptions {
        scan: ScanConfig {
            top_k: 8,
            left: 6,
            right: 3,
            ..ScanConfig::default()
        },
        batch: 16,
        n_logits: 5,
        progress: false,
    };
    let prov = Provenance {
        sae: "toy".into(),
        model: "toy".into(),
        corpus: "toy sentences".into(),
        ..Provenance::default()
    };
    analyze(&model, &sae, &tokens, ctx, &opts, &prov, dir).expect("toy analysis");
    Analysis::open(dir).expect("open toy analysis")
}

/// A server on an ephemeral loopback port over the toy analysis, with the toy model live.
pub fn toy_server(dir: &Path, live: bool) -> RunningServer {
    let analysis = toy_analysis(dir);
    let model = ToyModel::default();
    let sae = model.sae();
    let encoder = if live {
        Some(Box::new(SaeTextEncoder::new(model, sae, 64).unwrap())
            as Box<dyn sae_browser::TextEncoder>)
    } else {
        None
    };
    start(Browser::new(analysis, encoder), "127.0.0.1", 0, 2).expect("start server")
}

pub struct Reply {
    pub status: u16,
    pub headers: String,
    pub body: String,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

/// Sends raw bytes and reads the whole answer (the server closes HTTP/1.0 connections).
pub fn raw(addr: SocketAddr, request: &[u8]) -> Reply {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    // The server may answer (413) and close before a huge body is sent; read anyway.
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
    Reply {
        status,
        headers: head.to_string(),
        body: body.to_string(),
    }
}

pub fn get(addr: SocketAddr, path: &str) -> Reply {
    raw(
        addr,
        format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes(),
    )
}

pub fn post(addr: SocketAddr, path: &str, body: &[u8]) -> Reply {
    let mut req = format!(
        "POST {path} HTTP/1.0\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(body);
    raw(addr, &req)
}
