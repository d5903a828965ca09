//! Several hooks per model pass: `sae harvest` and `sae train --model` at three hooks give
//! exactly what three single-hook runs give.

mod common;
use common::{fails_with, s, sae, scratch};
use std::path::Path;

const TINY: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../sae-lm/tests/fixtures/tiny-llama"
);
const HOOKS: [&str; 3] = [
    "blocks.2.hook_resid_post",
    "blocks.0.hook_resid_post",
    "blocks.1.attn.hook_z",
];

/// Words in a pseudo-random order, so that no two contexts are the same.
fn corpus(dir: &Path) -> String {
    let words = [
        "the", "quick", "brown", "fox", "def", "add", "return", "for", "in", "12", "sparse",
    ];
    let mut x = 11u64;
    let text: Vec<&str> = (0..4000)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            words[(x >> 33) as usize % words.len()]
        })
        .collect();
    let path = dir.join("corpus.txt");
    std::fs::write(&path, text.join(" ")).unwrap();
    s(&path).to_string()
}

fn run_ok(args: &[String]) -> String {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = sae(&args);
    assert!(
        o.status.success(),
        "sae {args:?}:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).to_string()
}

/// The files of `dir` (not recursive) with their bytes, by name.
fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().to_string();
            (name, std::fs::read(&p).unwrap())
        })
        .collect();
    v.sort();
    v
}

#[test]
fn harvest_at_three_hooks_writes_the_stores_of_three_single_hook_harvests() {
    let d = scratch("multihook-harvest");
    let c = corpus(&d);
    let common = |out: &Path| -> Vec<String> {
        [
            "harvest",
            "--model",
            TINY,
            "--corpus",
            &c,
            "--ctx",
            "16",
            "--tokens",
            "700",
            "--batch",
            "5",
            "--shard-rows",
            "200",
            "--store-tokens",
            "--compute",
            "f32",
            "--out",
            s(out),
        ]
        .map(String::from)
        .to_vec()
    };
    let multi = d.join("multi");
    let mut args = common(&multi);
    // A comma list and the flag repeated, mixed.
    args.extend(
        [
            "--hook",
            &format!("{},{}", HOOKS[0], HOOKS[1]),
            "--hook",
            HOOKS[2],
        ]
        .map(String::from),
    );
    let out = run_ok(&args);
    assert!(out.contains("at 3 hooks"), "{out}");
    for hook in HOOKS {
        let single = d.join(format!("single-{hook}"));
        let mut args = common(&single);
        args.extend(["--hook", hook].map(String::from));
        run_ok(&args);
        let (a, b) = (files(&multi.join(hook)), files(&single));
        assert!(
            a.len() >= 4,
            "{hook}: {:?}",
            a.iter().map(|f| &f.0).collect::<Vec<_>>()
        );
        assert_eq!(
            a.iter().map(|f| &f.0).collect::<Vec<_>>(),
            b.iter().map(|f| &f.0).collect::<Vec<_>>(),
            "{hook}: other files"
        );
        for ((name, x), (_, y)) in a.iter().zip(&b) {
            assert!(
                x == y,
                "{hook}: {name} differs from the single-hook harvest"
            );
        }
        let manifest =
            String::from_utf8_lossy(&a.iter().find(|f| f.0 == "manifest.json").unwrap().1)
                .to_string();
        assert!(manifest.contains("\"compute\": \"f32\""), "{manifest}");
    }
    // Each store is a normal store, and `sae info` describes them all with their precision.
    let info = run_ok(&["info".to_string(), s(&multi).to_string()]);
    for hook in HOOKS {
        assert!(info.contains(&format!("hook        {hook}")), "{info}");
    }
    assert_eq!(info.matches("compute     f32").count(), 3, "{info}");
    // Harvesting again finds every store complete.
    let mut args = common(&multi);
    args.extend(["--hook".to_string(), HOOKS.join(",")]);
    let again = sae(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(again.status.success());
    let err = String::from_utf8_lossy(&again.stderr);
    assert_eq!(err.matches("nothing to do").count(), 3, "{err}");
    let _ = std::fs::remove_dir_all(&d);
}

/// `sae train --model` at three hooks: each SAE is bit-for-bit the one a single-hook run at
/// that hook gives (same seed, same stream of rows, same batches).
#[test]
fn train_at_three_hooks_gives_the_weights_of_three_single_hook_runs() {
    let d = scratch("multihook-train");
    let c = corpus(&d);
    let common = |hooks: &str, out: &Path| -> Vec<String> {
        [
            "train",
            "--model",
            TINY,
            "--hook",
            hooks,
            "--corpus",
            &c,
            "--ctx",
            "16",
            "--arch",
            "topk",
            "--k",
            "4",
            "--d-sae",
            "64",
            "--batch-size",
            "32",
            "--buffer-rows",
            "128",
            "--init-sample",
            "64",
            "--eval-tokens",
            "64",
            "--steps",
            "12",
            "--seed",
            "3",
            "--quiet",
            "--out",
            s(out),
        ]
        .map(String::from)
        .to_vec()
    };
    let multi = d.join("multi");
    let out = run_ok(&common(&HOOKS.join(","), &multi));
    assert!(
        out.contains("trained 3 SAEs from one forward pass"),
        "{out}"
    );
    for hook in HOOKS {
        let single = d.join(format!("single-{hook}"));
        run_ok(&common(hook, &single));
        let w = |dir: &Path| std::fs::read(dir.join("sae_weights.safetensors")).unwrap();
        assert!(
            w(&multi.join(hook)) == w(&single),
            "{hook}: weights differ from the single-hook run"
        );
        let cfg = std::fs::read_to_string(multi.join(hook).join("cfg.json")).unwrap();
        assert!(cfg.contains(hook), "{cfg}");
    }
    // Several hooks need the model: a store holds one hook.
    let mut args = common(&HOOKS.join(","), &d.join("from-store"));
    args.extend(["--acts".to_string(), s(&multi.join(HOOKS[0])).to_string()]);
    args.retain(|a| a != "--model" && a != TINY);
    fails_with(
        &sae(&args.iter().map(String::as_str).collect::<Vec<_>>()),
        &["several hooks", "--model"],
    );
    let _ = std::fs::remove_dir_all(&d);
}
