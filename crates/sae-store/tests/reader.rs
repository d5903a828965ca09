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
