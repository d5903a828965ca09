//! Several hooks in one `sae harvest` or `sae train --model`: a hook given twice, an unknown
//! hook among good ones, and an --out whose subfolder for one hook holds something else are
//! refused before anything is written.

use crate::harness::*;
use std::path::Path;

const TINY: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../sae-lm/tests/fixtures/tiny-llama"
);

fn corpus(dir: &Path) -> String {
    let text = dir.join("text.txt");
    std::fs::write(&text, "def add(a, b):\n    return a + b\n".repeat(50)).unwrap();
    s(&text).to_string()
}

fn harvest<'a>(hooks: &'a str, out: &'a str, corpus: &'a str) -> Vec<&'a str> {
    vec![
        "harvest", "--model", TINY, "--hook", hooks, "--corpus", corpus, "--ctx", "16", "--tokens",
        "60", "--out", out,
    ]
}

fn train<'a>(hooks: &'a str, out: &'a str, corpus: &'a str) -> Vec<&'a str> {
    vec![
        "train",
        "--model",
        TINY,
        "--hook",
        hooks,
        "--corpus",
        corpus,
        "--ctx",
        "16",
        "--arch",
        "topk",
        "--k",
        "2",
        "--d-sae",
        "32",
        "--batch-size",
        "16",
        "--buffer-rows",
        "32",
        "--init-sample",
        "16",
        "--eval-tokens",
        "16",
        "--steps",
        "2",
        "--quiet",
        "--out",
        out,
    ]
}

#[test]
fn a_hook_given_twice_is_refused() {
    let d = scratch("multihook-twice");
    let c = corpus(&d);
    let out = d.join("out");
    let twice = "blocks.0.hook_resid_post,blocks.2.hook_resid_post,blocks.0.hook_resid_post";
    for args in [harvest(twice, s(&out), &c), train(twice, s(&out), &c)] {
        refused(
            &args,
            &["--hook blocks.0.hook_resid_post is given twice", "once"],
            &[&d],
        );
    }
    // The same hook written two ways is still one hook (found once the model is loaded).
    let two_ways = "blocks.1.hook_resid_post,blocks.01.hook_resid_post";
    for args in [harvest(two_ways, s(&out), &c), train(two_ways, s(&out), &c)] {
        refused(&args, &["same hook", "once"], &[&d]);
    }
    // The flag repeated is the same list as commas.
    let mut args = harvest("blocks.0.hook_resid_post", s(&out), &c);
    args.extend(["--hook", "blocks.0.hook_resid_post"]);
    refused(&args, &["is given twice"], &[&d]);
    assert!(!out.exists());
}

#[test]
fn an_unknown_hook_among_several_names_the_valid_ones() {
    let d = scratch("multihook-unknown");
    let c = corpus(&d);
    let out = d.join("out");
    let hooks = "blocks.0.hook_resid_post,blocks.9.hook_resid_post";
    for args in [harvest(hooks, s(&out), &c), train(hooks, s(&out), &c)] {
        refused(
            &args,
            &[
                "unknown hook 'blocks.9.hook_resid_post'",
                "L in 0..3",
                "sae hooks",
            ],
            &[&d],
        );
        assert!(!out.exists(), "{args:?} left {}", out.display());
    }
    // Not a hook name at all, and not a folder name either.
    for args in [
        harvest("blocks.0.hook_resid_post,../x", s(&out), &c),
        train("blocks.0.hook_resid_post,../x", s(&out), &c),
    ] {
        refused(&args, &["'../x' is not a hook name", "sae hooks"], &[&d]);
    }
    refused(
        &harvest(
            "blocks.0.hook_resid_post,,blocks.1.hook_resid_post",
            s(&out),
            &c,
        ),
        &["--hook", "empty hook name"],
        &[&d],
    );
}

#[test]
fn a_subfolder_holding_something_else_is_refused_and_kept() {
    let d = scratch("multihook-subfolder");
    let c = corpus(&d);
    let out = d.join("out");
    let hooks = "blocks.0.hook_resid_post,blocks.2.hook_resid_post";
    // The second hook's folder holds the user's notes.
    let mine = out.join("blocks.2.hook_resid_post");
    std::fs::create_dir_all(&mine).unwrap();
    std::fs::write(mine.join("notes.txt"), "mine").unwrap();
    for args in [harvest(hooks, s(&out), &c), train(hooks, s(&out), &c)] {
        refused(
            &args,
            &["blocks.2.hook_resid_post", "notes.txt", "--out"],
            &[&d],
        );
        assert!(!out.join("blocks.0.hook_resid_post").exists());
    }
    // --out itself a store: the hooks' stores would be mixed into it.
    let store = d.join("store");
    ok(&harvest("blocks.1.hook_resid_post", s(&store), &c));
    for args in [harvest(hooks, s(&store), &c), train(hooks, s(&store), &c)] {
        refused(
            &args,
            &["is itself an activation store", "Choose another --out"],
            &[&d],
        );
    }
    // One hook's SAE already trained: replaced only with --overwrite.
    let runs = d.join("runs");
    ok(&train(
        "blocks.2.hook_resid_post",
        s(&runs.join("blocks.2.hook_resid_post")),
        &c,
    ));
    refused(
        &train(hooks, s(&runs), &c),
        &["blocks.2.hook_resid_post", "--overwrite"],
        &[&d],
    );
}
