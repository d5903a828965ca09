//! Reader, shuffled stream and synthetic sets: formats, bad input, determinism.

use sae_store::npy;
use sae_store::synth::{read_true_features, write_synthetic, SynthConfig};
use sae_store::{ActivationStore, BatchStream, Dtype, Order, Permutation, StreamPosition};
use std::path::{Path, PathBuf};

fn values(n: usize, d: usize, start: usize) -> Vec<f32> {
    // Exactly representable in f16 and bf16.
    (0..n * d)
        .map(|i| ((start * d + i) % 64) as f32 * 0.25 - 4.0)
        .collect()
}

fn encode(dtype: Dtype, v: &[f32]) -> Vec<u8> {
    match dtype {
        Dtype::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        Dtype::F16 => v
            .iter()
            .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
            .collect(),
        Dtype::Bf16 => v
            .iter()
            .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
            .collect(),
    }
}

fn st_dtype(dtype: Dtype) -> safetensors::Dtype {
    match dtype {
        Dtype::F32 => safetensors::Dtype::F32,
        Dtype::F16 => safetensors::Dtype::F16,
        Dtype::Bf16 => safetensors::Dtype::BF16,
    }
}

fn write_st(path: &Path, dtype: Dtype, n: usize, d: usize, v: &[f32], with_tokens: bool) {
    let bytes = encode(dtype, v);
    let toks: Vec<u8> = (0..n as u32).flat_map(|t| t.to_le_bytes()).collect();
    let mut views = vec![(
        "activations",
        safetensors::tensor::TensorView::new(st_dtype(dtype), vec![n, d], &bytes).unwrap(),
    )];
    if with_tokens {
        views.push((
            "tokens",
            safetensors::tensor::TensorView::new(safetensors::Dtype::U32, vec![n], &toks).unwrap(),
        ));
    }
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

fn read_all(store: &ActivationStore) -> Vec<f32> {
    let rows: Vec<u64> = (0..store.n_rows()).collect();
    let mut out = vec![0.0; rows.len() * store.d_in()];
    store.read_rows(&rows, &mut out).unwrap();
    out
}

#[test]
fn reads_every_dtype_from_safetensors_and_npy() {
    let dir = tempfile::tempdir().unwrap();
    let (n, d) = (7, 5);
    let v = values(n, d, 0);
    for dtype in [Dtype::F32, Dtype::F16, Dtype::Bf16] {
        let st = dir.path().join(format!("{dtype:?}.safetensors"));
        write_st(&st, dtype, n, d, &v, true);
        let np = dir.path().join(format!("{dtype:?}.npy"));
        std::fs::write(&np, npy::encode(dtype, n, d, &encode(dtype, &v))).unwrap();
        for p in [&st, &np] {
            let s = ActivationStore::open(p).unwrap();
            assert_eq!((s.n_rows(), s.d_in()), (n as u64, d), "{}", p.display());
            assert_eq!(s.files()[0].dtype, dtype);
            assert_eq!(read_all(&s), v, "{}", p.display());
        }
    }
}

#[test]
fn directory_of_files_is_one_sorted_row_space() {
    let dir = tempfile::tempdir().unwrap();
    let d = 3;
    write_st(
        &dir.path().join("b.safetensors"),
        Dtype::F32,
        4,
        d,
        &values(4, d, 2),
        false,
    );
    write_st(
        &dir.path().join("a.safetensors"),
        Dtype::Bf16,
        2,
        d,
        &values(2, d, 0),
        false,
    );
    std::fs::write(dir.path().join("notes.txt"), "ignored").unwrap();
    let s = ActivationStore::open(dir.path()).unwrap();
    assert_eq!(s.n_rows(), 6);
    assert_eq!(read_all(&s), values(6, d, 0));
}

fn err_of(path: &Path) -> String {
    match ActivationStore::open(path) {
        Ok(_) => panic!("{} opened but should not", path.display()),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn bad_inputs_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| -> PathBuf { dir.path().join(name) };

    // Empty directory.
    std::fs::create_dir(p("empty")).unwrap();
    let e = err_of(&p("empty"));
    assert!(
        e.contains("empty") && e.contains("no activation files"),
        "{e}"
    );

    // Mismatched d_in.
    std::fs::create_dir(p("mixed")).unwrap();
    write_st(
        &p("mixed/a.safetensors"),
        Dtype::F32,
        2,
        3,
        &values(2, 3, 0),
        false,
    );
    write_st(
        &p("mixed/b.safetensors"),
        Dtype::F32,
        2,
        4,
        &values(2, 4, 0),
        false,
    );
    let e = err_of(&p("mixed"));
    assert!(
        e.contains("b.safetensors") && e.contains("d_in is 4"),
        "{e}"
    );

    // Truncated safetensors and npy.
    write_st(
        &p("full.safetensors"),
        Dtype::F32,
        8,
        4,
        &values(8, 4, 0),
        false,
    );
    let bytes = std::fs::read(p("full.safetensors")).unwrap();
    std::fs::write(p("cut.safetensors"), &bytes[..bytes.len() - 10]).unwrap();
    let e = err_of(&p("cut.safetensors"));
    assert!(
        e.contains("cut.safetensors") && e.contains("not a valid safetensors"),
        "{e}"
    );
    let npy_bytes = npy::encode(Dtype::F32, 8, 4, &encode(Dtype::F32, &values(8, 4, 0)));
    std::fs::write(p("cut.npy"), &npy_bytes[..npy_bytes.len() - 4]).unwrap();
    let e = err_of(&p("cut.npy"));
    assert!(e.contains("cut.npy") && e.contains("truncated"), "{e}");

    // Not a safetensors file at all.
    std::fs::write(p("text.safetensors"), "hello, I am text").unwrap();
    let e = err_of(&p("text.safetensors"));
    assert!(e.contains("text.safetensors"), "{e}");
    std::fs::write(p("text.npy"), "hello, I am text").unwrap();
    let e = err_of(&p("text.npy"));
    assert!(e.contains("text.npy") && e.contains("not a .npy"), "{e}");

    // Wrong rank.
    let b = encode(Dtype::F32, &[1.0, 2.0, 3.0]);
    let v = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![3], &b).unwrap();
    std::fs::write(
        p("rank1.safetensors"),
        safetensors::serialize(vec![("activations", v)], None).unwrap(),
    )
    .unwrap();
    let e = err_of(&p("rank1.safetensors"));
    assert!(
        e.contains("rank1.safetensors") && e.contains("2 dimensions"),
        "{e}"
    );

    // Unsupported dtype.
    let b: Vec<u8> = (0..6i64).flat_map(|x| x.to_le_bytes()).collect();
    let v = safetensors::tensor::TensorView::new(safetensors::Dtype::I64, vec![2, 3], &b).unwrap();
    std::fs::write(
        p("ints.safetensors"),
        safetensors::serialize(vec![("activations", v)], None).unwrap(),
    )
    .unwrap();
    let e = err_of(&p("ints.safetensors"));
    assert!(
        e.contains("ints.safetensors") && e.contains("unsupported dtype"),
        "{e}"
    );

    // Missing path.
    let e = err_of(&p("nope"));
    assert!(e.contains("nope"), "{e}");

    // Unknown extension.
    std::fs::write(p("acts.bin"), [0u8; 16]).unwrap();
    let e = err_of(&p("acts.bin"));
    assert!(
        e.contains("acts.bin") && e.contains("expected .safetensors or .npy"),
        "{e}"
    );
}

#[test]
fn nan_is_reported_with_file_and_row_when_read() {
    let dir = tempfile::tempdir().unwrap();
    let mut v = values(6, 4, 0);
    v[3 * 4 + 2] = f32::NAN;
    let path = dir.path().join("nan.safetensors");
    write_st(&path, Dtype::Bf16, 6, 4, &v, false);
    let s = ActivationStore::open(&path).unwrap();
    let mut out = vec![0.0; 4];
    s.read_row(2, &mut out).unwrap();
    let e = s.read_row(3, &mut out).unwrap_err().to_string();
    assert!(
        e.contains("nan.safetensors") && e.contains("row 3") && e.contains("NaN"),
        "{e}"
    );
    let mut stream = BatchStream::new(s, Order::Sequential, 0);
    let mut batch = vec![0.0; 6 * 4];
    let e = stream.next_batch(&mut batch, 6).unwrap_err().to_string();
    assert!(e.contains("nan.safetensors") && e.contains("row 3"), "{e}");
}

#[test]
fn permutation_is_a_bijection() {
    for n in [1u64, 2, 3, 10, 17, 1000, 4097] {
        let p = Permutation::new(n, 42);
        let mut seen: Vec<u64> = (0..n).map(|i| p.get(i)).collect();
        seen.sort();
        assert_eq!(seen, (0..n).collect::<Vec<_>>(), "n = {n}");
    }
    let a: Vec<u64> = (0..100).map(|i| Permutation::new(100, 1).get(i)).collect();
    let b: Vec<u64> = (0..100).map(|i| Permutation::new(100, 2).get(i)).collect();
    assert_ne!(a, b);
    assert_ne!(a, (0..100).collect::<Vec<_>>());
}

#[test]
fn stream_covers_epochs_and_seeks_back_to_the_same_batches() {
    let dir = tempfile::tempdir().unwrap();
    let (n, d) = (10, 2);
    // Row r holds (r, -r) so we can tell rows apart.
    let v: Vec<f32> = (0..n).flat_map(|r| [r as f32, -(r as f32)]).collect();
    let path = dir.path().join("a.safetensors");
    write_st(&path, Dtype::F32, n, d, &v, false);
    let mut s = BatchStream::new(ActivationStore::open(&path).unwrap(), Order::Shuffled, 7);
    let mut batches = Vec::new();
    let mut positions = Vec::new();
    for _ in 0..5 {
        positions.push(s.position());
        let mut b = vec![0.0; 4 * d];
        s.next_batch(&mut b, 4).unwrap();
        batches.push(b);
    }
    // Epoch 0 = first 10 rows of the stream: every row exactly once.
    let mut first: Vec<i64> = batches
        .concat()
        .chunks(2)
        .take(10)
        .map(|r| r[0] as i64)
        .collect();
    first.sort();
    assert_eq!(first, (0..10).collect::<Vec<_>>());
    assert_eq!(s.position(), StreamPosition { epoch: 2, index: 0 });
    // Seek to the third batch and get the same batches again.
    let mut t = BatchStream::new(ActivationStore::open(&path).unwrap(), Order::Shuffled, 7);
    t.seek(positions[2]);
    for b in &batches[2..] {
        let mut got = vec![0.0; 4 * d];
        t.next_batch(&mut got, 4).unwrap();
        assert_eq!(&got, b);
    }
}

#[test]
fn synthetic_set_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("synth");
    let cfg = SynthConfig {
        d_in: 8,
        n_features: 16,
        n_tokens: 1000,
        l0: 3.0,
        rows_per_shard: 300,
        ..Default::default()
    };
    let m = write_synthetic(&out, &cfg).unwrap();
    assert_eq!(m.n_tokens, 1000);
    assert_eq!(m.shards.len(), 4);
    let s = ActivationStore::open(&out).unwrap();
    assert_eq!((s.n_rows(), s.d_in()), (1000, 8));
    let (f, nf, d) = read_true_features(&out).unwrap();
    assert_eq!((nf, d), (16, 8));
    for r in f.chunks(8) {
        let norm: f32 = r.iter().map(|v| v * v).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5);
    }
    // Mean squared norm ~ l0 * E[c^2] (c ~ U(0.5, 1.5): 13/12) + noise.
    let x = read_all(&s);
    let msq: f32 = x.iter().map(|v| v * v).sum::<f32>() / 1000.0;
    assert!(msq > 2.0 && msq < 5.0, "{msq}");
    // Same seed, same bytes; an existing directory is refused.
    let out2 = dir.path().join("synth2");
    write_synthetic(&out2, &cfg).unwrap();
    assert_eq!(
        std::fs::read(out.join("shard_00002.safetensors")).unwrap(),
        std::fs::read(out2.join("shard_00002.safetensors")).unwrap()
    );
    let e = write_synthetic(&out, &cfg).unwrap_err().to_string();
    assert!(e.contains("already exists"), "{e}");
}

fn small_store(dir: &Path, name: &str) -> PathBuf {
    let out = dir.join(name);
    let cfg = SynthConfig {
        d_in: 8,
        n_features: 16,
        n_tokens: 1000,
        l0: 3.0,
        rows_per_shard: 300,
        ..Default::default()
    };
    write_synthetic(&out, &cfg).unwrap();
    out
}

fn edit_manifest(store: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = store.join("manifest.json");
    let mut m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut m);
    std::fs::write(&path, serde_json::to_string(&m).unwrap()).unwrap();
}

#[test]
fn shapes_whose_size_overflows_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    // 2^62 * 2^62 * 4 wraps around to 0 in 64 bits: the size check must not wrap.
    let big = 1usize << 62;
    let path = dir.path().join("huge.npy");
    std::fs::write(&path, npy::encode(Dtype::F32, big, big, &[0u8; 64])).unwrap();
    let e = err_of(&path);
    assert!(
        e.contains("huge.npy") && e.contains("impossibly large"),
        "{e}"
    );
    // Large but not overflowing: refused by the file's real length.
    std::fs::write(&path, npy::encode(Dtype::F32, 1 << 40, 576, &[0u8; 64])).unwrap();
    let e = err_of(&path);
    assert!(e.contains("huge.npy") && e.contains("truncated"), "{e}");

    // A version 2 header whose length field claims 4 GiB.
    let mut bytes = b"\x93NUMPY\x02\x00".to_vec();
    bytes.extend_from_slice(&u32::MAX.to_le_bytes());
    bytes.extend_from_slice(b"{'descr': '<f4'}");
    std::fs::write(&path, &bytes).unwrap();
    let e = err_of(&path);
    assert!(e.contains("huge.npy") && e.contains("header claims"), "{e}");

    // A safetensors header length past the end of the file, and a header whose shape
    // overflows (the crate's own validation).
    let st = dir.path().join("huge.safetensors");
    let mut bytes = (u64::MAX - 3).to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{}");
    std::fs::write(&st, &bytes).unwrap();
    let e = err_of(&st);
    assert!(
        e.contains("huge.safetensors") && e.contains("not a valid safetensors"),
        "{e}"
    );
    let header = format!(
        r#"{{"activations":{{"dtype":"F32","shape":[{big},{big}],"data_offsets":[0,16]}}}}"#
    );
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(&[0u8; 16]);
    std::fs::write(&st, &bytes).unwrap();
    let e = err_of(&st);
    assert!(
        e.contains("huge.safetensors") && e.contains("not a valid safetensors"),
        "{e}"
    );
}

#[test]
fn a_shard_truncated_under_an_open_store_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let out = small_store(dir.path(), "s");
    let store = ActivationStore::open(&out).unwrap();
    let shard = out.join("shard_00001.safetensors");
    let len = std::fs::metadata(&shard).unwrap().len();
    // Cut the shard to its header and a few rows. With a memory-mapped reader, touching the
    // lost pages raises SIGBUS and kills this test process.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&shard)
        .unwrap()
        .set_len(200)
        .unwrap();
    let mut out_row = vec![0.0; 8];
    let e = format!("{:#}", store.read_row(599, &mut out_row).unwrap_err());
    assert!(
        e.contains("shard_00001.safetensors")
            && e.contains("changed while it was being read")
            && e.contains("now 200 bytes")
            && e.contains(&format!("expected {len}")),
        "{e}"
    );
    // Batches over all rows: the same error, whichever row comes first.
    let mut stream = BatchStream::new(store, Order::Shuffled, 3);
    let mut batch = vec![0.0; 1000 * 8];
    let e = format!("{:#}", stream.next_batch(&mut batch, 1000).unwrap_err());
    assert!(
        e.contains("shard_00001.safetensors") && e.contains("changed while it was being read"),
        "{e}"
    );
}

#[test]
fn a_shard_rewritten_in_place_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let out = small_store(dir.path(), "s");
    let store = ActivationStore::open(&out).unwrap();
    let shard = out.join("shard_00000.safetensors");
    // Same length, new contents, a later modification time.
    let mut bytes = std::fs::read(&shard).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    let f = std::fs::File::options().write(true).open(&shard).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &bytes[last..], last as u64).unwrap();
    // Coarse file-system clocks could leave the time as it was.
    f.set_modified(std::time::SystemTime::now() + std::time::Duration::from_secs(5))
        .unwrap();
    let rows: Vec<u64> = (0..10).collect();
    let mut batch = vec![0.0; 10 * 8];
    let e = format!("{:#}", store.read_rows(&rows, &mut batch).unwrap_err());
    assert!(
        e.contains("shard_00000.safetensors") && e.contains("modification time changed"),
        "{e}"
    );
    // Rows of the other shards still read.
    let rows: Vec<u64> = (300..310).collect();
    store.read_rows(&rows, &mut batch).unwrap();
}

#[test]
fn rows_past_the_end_are_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = small_store(dir.path(), "s");
    let store = ActivationStore::open(&out).unwrap();
    let mut row = vec![0.0; 8];
    let e = store.read_row(1000, &mut row).unwrap_err().to_string();
    assert!(e.contains("past the end"), "{e}");
    let e = store.files()[0]
        .read_row(300, &mut row)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("shard_00000") && e.contains("past the end"),
        "{e}"
    );
}

#[test]
fn stores_that_disagree_with_their_manifest_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let case = |name: &str, break_it: &dyn Fn(&Path), needles: &[&str]| {
        let out = small_store(dir.path(), name);
        break_it(&out);
        let e = err_of(&out);
        for n in needles {
            assert!(e.contains(n), "{name}: lacks '{n}': {e}");
        }
    };
    case(
        "not_json",
        &|s| std::fs::write(s.join("manifest.json"), "{ not json").unwrap(),
        &[
            "manifest.json",
            "not a valid activation manifest",
            "re-harvest",
        ],
    );
    case(
        "missing_shard",
        &|s| std::fs::remove_file(s.join("shard_00002.safetensors")).unwrap(),
        &["shard_00002.safetensors", "missing", "re-harvest"],
    );
    case(
        "rows",
        &|s| edit_manifest(s, |m| m["shards"][1]["n_rows"] = 299.into()),
        &[
            "shard_00001.safetensors",
            "holds 300 rows",
            "lists 299",
            "re-harvest",
        ],
    );
    case(
        "dtype",
        &|s| edit_manifest(s, |m| m["dtype"] = "bf16".into()),
        &["shard_00000.safetensors", "F32", "Bf16", "re-harvest"],
    );
    case(
        "d_in",
        &|s| edit_manifest(s, |m| m["d_in"] = (u64::MAX / 2).into()),
        &["manifest.json", "d_in", "re-harvest"],
    );
    case(
        "n_tokens",
        &|s| edit_manifest(s, |m| m["n_tokens"] = 5000.into()),
        &["manifest.json", "n_tokens is 5000", "1000 rows"],
    );
    case(
        "outside",
        &|s| {
            edit_manifest(s, |m| {
                m["shards"][0]["file"] = "../s/shard_00000.safetensors".into()
            })
        },
        &["manifest.json", "not a file name inside the store"],
    );
    case(
        "no_shards",
        &|s| edit_manifest(s, |m| m["shards"] = serde_json::json!([])),
        &["manifest.json", "lists no shards", "resume"],
    );
    case(
        "zero_rows",
        &|s| {
            let path = s.join("shard_00003.safetensors");
            write_st(&path, Dtype::F32, 0, 8, &[], false);
        },
        &["shard_00003.safetensors", "holds no rows"],
    );
}

#[test]
fn an_sae_directory_is_not_taken_for_activations() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("cfg.json"), "{}").unwrap();
    write_st(
        &dir.path().join("sae_weights.safetensors"),
        Dtype::F32,
        2,
        3,
        &values(2, 3, 0),
        false,
    );
    let e = err_of(dir.path());
    assert!(e.contains("trained SAE, not activations"), "{e}");
}

#[test]
fn synthetic_sizes_are_checked_before_anything_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("synth");
    let base = SynthConfig {
        d_in: 8,
        n_features: 16,
        n_tokens: 100,
        ..Default::default()
    };
    let cases: Vec<(SynthConfig, &[&str])> = vec![
        (
            SynthConfig {
                d_in: 0,
                ..base.clone()
            },
            &["--d-in", "at least 1"],
        ),
        (
            SynthConfig {
                n_features: 0,
                ..base.clone()
            },
            &["--n-features"],
        ),
        (
            SynthConfig {
                n_tokens: 0,
                ..base.clone()
            },
            &["--n-tokens"],
        ),
        (
            SynthConfig {
                rows_per_shard: 0,
                ..base.clone()
            },
            &["--rows-per-shard"],
        ),
        (
            SynthConfig {
                l0: f64::NAN,
                ..base.clone()
            },
            &["--l0 NaN", "at most --n-features (16)"],
        ),
        (
            SynthConfig {
                l0: 17.0,
                ..base.clone()
            },
            &["--l0 17"],
        ),
        (
            SynthConfig {
                l0: -1.0,
                ..base.clone()
            },
            &["--l0 -1"],
        ),
        (
            SynthConfig {
                noise: f32::NAN,
                ..base.clone()
            },
            &["--noise NaN"],
        ),
        (
            SynthConfig {
                noise: -0.5,
                ..base.clone()
            },
            &["--noise -0.5"],
        ),
        (
            SynthConfig {
                d_in: usize::MAX / 2,
                ..base.clone()
            },
            &["more than 2^64 bytes"],
        ),
        (
            SynthConfig {
                d_in: 1 << 20,
                n_features: 1 << 30,
                l0: 1.0,
                ..base.clone()
            },
            &[
                "of memory but only",
                "lower --d-in, --n-features or --rows-per-shard",
            ],
        ),
        (
            SynthConfig {
                n_tokens: 1 << 40,
                rows_per_shard: 1 << 40,
                d_in: 1 << 20,
                ..base.clone()
            },
            &["of memory but only", "--rows-per-shard 1099511627776"],
        ),
    ];
    let cases = cases.into_iter().chain([(
        // 2^40 rows of width 2^10: 4 PiB on disk, a shard of the default size in memory.
        SynthConfig {
            n_tokens: 1 << 40,
            d_in: 1 << 10,
            ..base.clone()
        },
        &["needs about 4.0 PiB of disk", "ask for fewer tokens"][..],
    )]);
    for (cfg, needles) in cases {
        let e = write_synthetic(&out, &cfg).unwrap_err().to_string();
        for n in needles {
            assert!(e.contains(n), "{cfg:?}: lacks '{n}': {e}");
        }
        assert!(!out.exists());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
