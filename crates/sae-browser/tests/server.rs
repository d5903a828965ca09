//! The HTTP API over loopback: a server on an ephemeral port, a bounded number of requests,
//! then the server stops itself.

mod common;

use common::{get, post, raw, toy_server};
use sae_browser::toy::{ToyModel, PAIRS};
use serde_json::Value;

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
    // (tiny_http's accept thread closes the socket a moment after the server is dropped.)
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
