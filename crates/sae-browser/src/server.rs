//! The local web server: a fixed set of routes (the embedded page and the JSON API), never
//! a file path taken from the request, so nothing outside the analysis can be served.
//!
//! HTTP/1.0 and 1.1 on std's sockets, one request per connection. Each connection is read on
//! its own short-lived thread, under a deadline and size limits, so a client that sends slowly
//! or not at all only ever holds its own thread, never a worker; the workers see complete
//! requests only. (tiny_http, used before, reads bodies on the worker with no timeout, and
//! offers no way to set one.)
//!
//! A request must name this server in `Host`, so a page elsewhere cannot reach the API through
//! DNS rebinding, and a POST that a browser marks with an `Origin` must come from the page itself.

use crate::api::{ApiError, Browser};
use anyhow::{Context, Result};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const INDEX_HTML: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const STYLE_CSS: &str = include_str!("assets/style.css");

/// Largest request body read (the text box's JSON); larger ones get 413 unread.
const MAX_BODY: usize = 64 * 1024;
/// Largest request line plus headers.
const MAX_HEAD: usize = 16 * 1024;
/// After answering, what a client still sends is read and dropped for at most this long (and
/// `MAX_DRAIN` bytes), so that closing does not reset the connection before it reads the answer.
const DRAIN_TIME: Duration = Duration::from_secs(2);
const MAX_DRAIN: usize = 1024 * 1024;

/// How the server treats its clients.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// Worker threads answering complete requests.
    pub threads: usize,
    /// Longest a client may take to send one request, headers and body; slower ones get 408.
    /// Also the longest a client may take to read the answer.
    pub request_timeout: Duration,
    /// Connections read at once; more get 503 straight away.
    pub max_connections: usize,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            threads: 4,
            request_timeout: Duration::from_secs(10),
            max_connections: 64,
        }
    }
}

/// A running server; `stop` ends it (it also stops when dropped).
pub struct RunningServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
    jobs: Sender<Option<Job>>,
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
        if let Some(a) = self.acceptor.take() {
            a.join().ok();
        }
    }

    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(a) = self.acceptor.take() {
            // `accept` blocks; a connection of our own wakes it to see the flag.
            let ip = match self.addr.ip() {
                IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
                ip => ip,
            };
            let wake = TcpStream::connect_timeout(
                &SocketAddr::new(ip, self.addr.port()),
                Duration::from_secs(1),
            );
            if wake.is_ok() {
                a.join().ok();
            }
        }
        // Requests still being read get 503 once the workers are gone.
        for _ in 0..self.workers.len() {
            self.jobs.send(None).ok();
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

/// Binds `host:port` (port 0: any free port) and serves `browser` on `threads` workers, with
/// the default limits.
pub fn start(browser: Browser, host: &str, port: u16, threads: usize) -> Result<RunningServer> {
    let opts = ServeOptions {
        threads,
        ..ServeOptions::default()
    };
    start_with(browser, host, port, &opts)
}

/// A complete request and where its answer goes.
type Job = (Request, Sender<Reply>);

/// Binds `host:port` (port 0: any free port) and serves `browser`.
pub fn start_with(
    browser: Browser,
    host: &str,
    port: u16,
    opts: &ServeOptions,
) -> Result<RunningServer> {
    let listener = TcpListener::bind((host, port))
        .with_context(|| format!("cannot listen on {host}:{port} (port in use? try --port)"))?;
    let addr = listener.local_addr().context("the server has no address")?;
    let hosts = Arc::new(Hosts::new(host, addr));
    let browser = Arc::new(browser);
    let stop = Arc::new(AtomicBool::new(false));
    let (jobs, queue) = channel::<Option<Job>>();
    let queue = Arc::new(Mutex::new(queue));
    let workers = (0..opts.threads.max(1))
        .map(|_| {
            let (queue, browser) = (queue.clone(), browser.clone());
            std::thread::spawn(move || work(&queue, &browser))
        })
        .collect();
    let acceptor = {
        let (stop, jobs, opts) = (stop.clone(), jobs.clone(), opts.clone());
        std::thread::spawn(move || accept(listener, &stop, &jobs, &hosts, &opts))
    };
    Ok(RunningServer {
        addr,
        stop,
        acceptor: Some(acceptor),
        jobs,
        workers,
    })
}

fn work(queue: &Mutex<Receiver<Option<Job>>>, browser: &Browser) {
    loop {
        let job = match queue.lock() {
            Ok(q) => q.recv(),
            Err(_) => return,
        };
        let Ok(Some((req, answer))) = job else { return };
        let reply = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| route(browser, &req)))
            .unwrap_or_else(|_| {
                Reply::error(ApiError::new(
                    500,
                    "internal error while answering this request",
                ))
            });
        // The connection may have been given up meanwhile; nothing to do then.
        answer.send(reply).ok();
    }
}

fn accept(
    listener: TcpListener,
    stop: &AtomicBool,
    jobs: &Sender<Option<Job>>,
    hosts: &Arc<Hosts>,
    opts: &ServeOptions,
) {
    let open = Arc::new(AtomicUsize::new(0));
    for conn in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        // A failed accept (the client already gone, too many open files) ends that
        // connection only; the pause keeps a lasting failure from spinning.
        let Ok(mut stream) = conn else {
            std::thread::sleep(Duration::from_millis(10));
            continue;
        };
        if open.load(Ordering::SeqCst) >= opts.max_connections {
            let reply = Reply::error(ApiError::new(503, "too many open connections; try again"));
            stream.set_write_timeout(Some(Duration::from_secs(1))).ok();
            write_reply(&mut stream, &reply, false).ok();
            continue;
        }
        let open_now = OpenConnection::new(&open);
        let (jobs, hosts, opts) = (jobs.clone(), hosts.clone(), opts.clone());
        // Failing to start a thread drops the connection, and with it the count.
        std::thread::Builder::new()
            .spawn(move || {
                let _open = open_now;
                serve_connection(stream, &jobs, &hosts, &opts);
            })
            .ok();
    }
}

/// Counts a connection as open until dropped.
struct OpenConnection(Arc<AtomicUsize>);

impl OpenConnection {
    fn new(open: &Arc<AtomicUsize>) -> Self {
        open.fetch_add(1, Ordering::SeqCst);
        Self(open.clone())
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Reads one request, has a worker answer it, writes the answer and closes.
fn serve_connection(
    mut stream: TcpStream,
    jobs: &Sender<Option<Job>>,
    hosts: &Hosts,
    opts: &ServeOptions,
) {
    let deadline = Instant::now() + opts.request_timeout;
    stream.set_write_timeout(Some(opts.request_timeout)).ok();
    stream.set_nodelay(true).ok();
    let (reply, head_only) = match read_request(&mut stream, deadline)
        .and_then(|req| check_request(&req, hosts).map(|()| req))
    {
        Ok(req) => {
            let head_only = req.method == "HEAD";
            let (answer, reply) = channel();
            let reply = match jobs.send(Some((req, answer))) {
                Ok(()) => reply.recv().ok(),
                Err(_) => None,
            };
            let reply =
                reply.unwrap_or_else(|| Reply::error(ApiError::new(503, "the server is stopping")));
            (reply, head_only)
        }
        Err(Refusal::Gone) => return,
        Err(Refusal::Answer(e)) => (Reply::error(e), false),
    };
    if write_reply(&mut stream, &reply, head_only).is_err() {
        return;
    }
    stream.shutdown(Shutdown::Write).ok();
    drain(
        &mut stream,
        Instant::now() + DRAIN_TIME.min(opts.request_timeout),
    );
}

/// Reads and drops what the client still sends, until it closes or the time or byte budget ends.
fn drain(stream: &mut TcpStream, until: Instant) {
    let mut buf = [0u8; 8192];
    let mut total = 0;
    while total < MAX_DRAIN {
        let Some(left) = until
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
        else {
            return;
        };
        if stream.set_read_timeout(Some(left)).is_err() {
            return;
        }
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => total += n,
        }
    }
}

/// A request read in full.
#[derive(Debug)]
struct Request {
    method: String,
    /// Path and query, as sent.
    target: String,
    http11: bool,
    /// Names lower-cased, in the order sent.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
    fn header_count(&self, name: &str) -> usize {
        self.headers.iter().filter(|(n, _)| n == name).count()
    }
}

/// Why no request was read: answer with an error, or the client is gone.
enum Refusal {
    Answer(ApiError),
    Gone,
}

impl From<ApiError> for Refusal {
    fn from(e: ApiError) -> Self {
        Refusal::Answer(e)
    }
}

fn refuse(status: u16, message: impl Into<String>) -> Refusal {
    Refusal::Answer(ApiError::new(status, message))
}

/// Appends what the client sends next to `buf`, waiting no later than `deadline`.
fn read_more(stream: &mut TcpStream, buf: &mut Vec<u8>, deadline: Instant) -> Result<(), Refusal> {
    let too_slow = || refuse(408, "the request took too long to arrive; send it at once");
    let left = deadline
        .checked_duration_since(Instant::now())
        .filter(|d| !d.is_zero())
        .ok_or_else(too_slow)?;
    stream
        .set_read_timeout(Some(left))
        .map_err(|_| Refusal::Gone)?;
    let mut chunk = [0u8; 8192];
    match stream.read(&mut chunk) {
        Ok(0) => Err(Refusal::Gone),
        Ok(n) => {
            buf.extend_from_slice(&chunk[..n]);
            Ok(())
        }
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
            Err(too_slow())
        }
        Err(e) if e.kind() == ErrorKind::Interrupted => Ok(()),
        Err(_) => Err(Refusal::Gone),
    }
}

/// Reads one request: the head (at most `MAX_HEAD` bytes), then a body of at most `MAX_BODY`
/// bytes announced by `Content-Length`, all before `deadline`.
fn read_request(stream: &mut TcpStream, deadline: Instant) -> Result<Request, Refusal> {
    let mut buf = Vec::with_capacity(2048);
    let too_big = || {
        refuse(
            431,
            format!("request line and headers exceed {MAX_HEAD} bytes"),
        )
    };
    let mut searched = 0;
    let head_len = loop {
        if let Some(i) = buf[searched..].windows(4).position(|w| w == b"\r\n\r\n") {
            break searched + i;
        }
        searched = buf.len().saturating_sub(3);
        if buf.len() > MAX_HEAD {
            return Err(too_big());
        }
        read_more(stream, &mut buf, deadline)?;
    };
    if head_len > MAX_HEAD {
        return Err(too_big());
    }
    let mut req = parse_head(&buf[..head_len])?;
    if req.header("transfer-encoding").is_some() {
        return Err(refuse(
            411,
            "send the body with a Content-Length (Transfer-Encoding is not accepted)",
        ));
    }
    let length = match req
        .headers
        .iter()
        .filter(|(n, _)| n == "content-length")
        .map(|(_, v)| v)
        .collect::<Vec<_>>()[..]
    {
        [] => 0,
        [v] => v
            .parse::<u64>()
            .map_err(|_| refuse(400, format!("Content-Length must be a number, not '{v}'")))?,
        _ => return Err(refuse(400, "more than one Content-Length header")),
    };
    if length > MAX_BODY as u64 {
        return Err(refuse(
            413,
            format!("request body of {length} bytes is too large (at most {MAX_BODY})"),
        ));
    }
    let length = length as usize;
    let expect = req.header("expect");
    if let Some(v) = expect.filter(|v| !v.eq_ignore_ascii_case("100-continue")) {
        return Err(refuse(417, format!("cannot meet 'Expect: {v}'")));
    }
    // With `Expect: 100-continue` the client waits for this before sending the body (curl does
    // for larger ones).
    if expect.is_some() && length > 0 && buf.len() == head_len + 4 {
        stream
            .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
            .map_err(|_| Refusal::Gone)?;
    }
    let mut body = buf.split_off(head_len + 4);
    while body.len() < length {
        read_more(stream, &mut body, deadline)?;
    }
    // Bytes past the body (a pipelined request) are ignored: the connection closes after one.
    body.truncate(length);
    req.body = body;
    Ok(req)
}

fn parse_head(head: &[u8]) -> Result<Request, Refusal> {
    let bad = |what: &str| refuse(400, format!("malformed request: {what}"));
    let head = std::str::from_utf8(head).map_err(|_| bad("not UTF-8 text"))?;
    let mut lines = head.split("\r\n");
    let line = lines.next().unwrap_or_default();
    let parts: Vec<&str> = line.split(' ').collect();
    let [method, target, version] = parts[..] else {
        return Err(bad("the first line must be METHOD /path HTTP/1.1"));
    };
    let http11 = match version {
        "HTTP/1.1" => true,
        "HTTP/1.0" => false,
        v if v.starts_with("HTTP/") => {
            return Err(refuse(
                505,
                format!("{v} is not supported; use HTTP/1.1 or HTTP/1.0"),
            ))
        }
        _ => return Err(bad("the first line must be METHOD /path HTTP/1.1")),
    };
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_alphabetic()) {
        return Err(bad("the method must be a word such as GET"));
    }
    // Only paths: a full URL in the request line would name a host other than `Host`.
    if !target.starts_with('/') {
        return Err(bad("the target must be a path starting with /"));
    }
    let mut headers = Vec::new();
    for l in lines {
        let (name, value) = l
            .split_once(':')
            .filter(|(n, _)| !n.is_empty() && !n.contains([' ', '\t']))
            .ok_or_else(|| bad("a header line is not 'Name: value'"))?;
        headers.push((name.to_ascii_lowercase(), value.trim().to_string()));
    }
    Ok(Request {
        method: method.to_string(),
        target: target.to_string(),
        http11,
        headers,
        body: Vec::new(),
    })
}

/// The host names that reach this server.
struct Hosts {
    /// Lower-cased, IPv6 addresses in brackets.
    names: Vec<String>,
    /// Bound to every address of this machine, which are not known here: any IP literal
    /// passes (DNS rebinding needs a name).
    any_ip: bool,
    /// Where the page is, for the refusal messages.
    page: String,
}

impl Hosts {
    fn new(host: &str, addr: SocketAddr) -> Self {
        let mut names: Vec<String> = ["localhost", "127.0.0.1", "[::1]"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        names.extend(host_name(host));
        names.extend(host_name(&ip_authority(addr.ip())));
        let any_ip = addr.ip().is_unspecified();
        let shown = if any_ip {
            "127.0.0.1".to_string()
        } else {
            ip_authority(addr.ip())
        };
        Self {
            names,
            any_ip,
            page: format!("http://{shown}:{}/", addr.port()),
        }
    }

    /// Whether `authority` (a `Host` value: name or IP, then maybe `:port`) names this server.
    /// Any port passes: behind a tunnel or a forwarded port the browser sees another.
    fn allows(&self, authority: &str) -> bool {
        let Some(name) = host_name(authority) else {
            return false;
        };
        self.names.contains(&name) || (self.any_ip && is_ip_literal(&name))
    }
}

fn ip_authority(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(ip) => ip.to_string(),
        IpAddr::V6(ip) => format!("[{ip}]"),
    }
}

fn is_ip_literal(name: &str) -> bool {
    name.parse::<Ipv4Addr>().is_ok() || name.starts_with('[')
}

/// The host part of `name[:port]` or `[v6][:port]`, lower-cased, IP addresses written the
/// standard way; None when malformed. A bare IPv6 address (the `--host` value) is accepted too.
fn host_name(authority: &str) -> Option<String> {
    let a = authority.trim().to_ascii_lowercase();
    if let Ok(ip) = a.parse::<IpAddr>() {
        return Some(ip_authority(ip));
    }
    let (name, port) = if a.starts_with('[') {
        let end = a.find(']')?;
        (&a[..=end], &a[end + 1..])
    } else {
        a.rsplit_once(':').unwrap_or((&a, ""))
    };
    let port = port.strip_prefix(':').unwrap_or(port);
    if !port.is_empty()
        && (!port.bytes().all(|b| b.is_ascii_digit()) || port.parse::<u16>().is_err())
    {
        return None;
    }
    if let Some(v6) = name.strip_prefix('[').and_then(|n| n.strip_suffix(']')) {
        return v6.parse::<Ipv6Addr>().ok().map(|ip| format!("[{ip}]"));
    }
    if let Ok(ip) = name.parse::<Ipv4Addr>() {
        return Some(ip.to_string());
    }
    let valid = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    valid.then(|| name.to_string())
}

/// Refuses requests for another host, and POSTs a browser sends from another origin.
fn check_request(req: &Request, hosts: &Hosts) -> Result<(), Refusal> {
    let open_at = format!("open the page at {}", hosts.page);
    let host = match (req.header_count("host"), req.header("host")) {
        (0, _) if req.http11 => return Err(refuse(400, "an HTTP/1.1 request needs a Host header")),
        (0, _) => None,
        (1, Some(h)) => Some(h),
        _ => return Err(refuse(400, "more than one Host header")),
    };
    if let Some(h) = host {
        if !hosts.allows(h) {
            return Err(refuse(
                421,
                format!("this server does not answer for host '{h}'; {open_at}"),
            ));
        }
    }
    if req.method == "POST" {
        if let Some(origin) = req.header("origin") {
            // Same origin: the page was loaded from the very host the request is sent to.
            let same = origin
                .strip_prefix("http://")
                .is_some_and(|o| hosts.allows(o) && host.is_none_or(|h| o.eq_ignore_ascii_case(h)));
            if !same {
                return Err(refuse(
                    403,
                    format!("POST from another site ({origin}) refused; {open_at}"),
                ));
            }
        }
    }
    Ok(())
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

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Content Too Large",
        417 => "Expectation Failed",
        421 => "Misdirected Request",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "",
    }
}

/// Writes the answer; HEAD gets the headers only.
fn write_reply(stream: &mut TcpStream, reply: &Reply, head_only: bool) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {} {}\r\n\
         Content-Type: {}\r\n\
         Content-Length: {}\r\n\
         Connection: close\r\n\
         Cache-Control: no-store\r\n\
         X-Content-Type-Options: nosniff\r\n\
         Content-Security-Policy: default-src 'self'; img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'\r\n\
         \r\n",
        reply.status,
        reason(reply.status),
        reply.content_type,
        reply.body.len()
    );
    let mut out = head.into_bytes();
    if !head_only {
        out.extend_from_slice(&reply.body);
    }
    stream.write_all(&out)?;
    stream.flush()
}

fn route(browser: &Browser, req: &Request) -> Reply {
    let (path, query) = req.target.split_once('?').unwrap_or((&req.target, ""));
    let method = req.method.as_str();
    let is_get = matches!(method, "GET" | "HEAD");
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
            if method != "POST" {
                return not_allowed();
            }
            match browser.encode(&req.body) {
                Ok(v) => Reply::json(200, &v),
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

    #[test]
    fn host_names() {
        let addr = |s: &str| s.parse::<SocketAddr>().unwrap();
        let local = Hosts::new("127.0.0.1", addr("127.0.0.1:8080"));
        for ok in [
            "localhost",
            "LOCALHOST:8080",
            "127.0.0.1:1",
            "[::1]:8080",
            "[0::1]",
        ] {
            assert!(local.allows(ok), "{ok}");
        }
        for bad in [
            "evil.example",
            "localhost.evil.example",
            "192.168.1.5:8080",
            "[fe80::1]",
            "localhost:65536",
            "local host",
            "",
        ] {
            assert!(!local.allows(bad), "{bad}");
        }
        // The --host value passes, a name as well as an IPv6 address.
        assert!(Hosts::new("MyBox.lan", addr("10.0.0.2:80")).allows("mybox.lan:80"));
        assert!(Hosts::new("::1", addr("[::1]:80")).allows("[::1]:80"));
        // Bound to every address: any IP literal, still no other name.
        let all = Hosts::new("0.0.0.0", addr("0.0.0.0:8080"));
        assert!(all.allows("192.168.1.5:8080") && all.allows("[fe80::1]:8080"));
        assert!(!all.allows("evil.example:8080"));
    }
}
