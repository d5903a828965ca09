//! The analysis directory: what is written is what is read; damage is a clear error.

use crate::format::{logit_effect, Analysis, LATENTS_FILE, META_FILE};
use crate::toy::ToyModel;
use crate::{analyze, scan_contexts, AnalyzeOptions, Provenance};

#[test]
fn written_analysis_reads_back_and_damage_is_reported() {
    let model = ToyModel::default();
    let sae = model.sae();
    let ctx = 12;
    let tokens = model.pack(&model.corpus(2000, 4), ctx);
    let opts = AnalyzeOptions::default();
    let scan = scan_contexts(&model, &sae, &tokens, ctx, &opts).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("out");
    // Written twice: the second write replaces the first atomically.
    for _ in 0..2 {
        analyze(
            &model,
            &sae,
            &tokens,
            ctx,
            &opts,
            &Provenance::default(),
            &dir,
        )
        .unwrap();
    }
    let names: Vec<String> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec!["out".to_string()], "no temp dirs left behind");
    let a = Analysis::open(&dir).unwrap();
    assert_eq!(a.d_sae(), sae.d_sae);
    assert_eq!(a.meta.n_tokens, scan.n_tokens);
    assert_eq!(a.vocab[3], " cat");
    for (j, l) in scan.latents.iter().enumerate() {
        let rec = a.latent(j).unwrap();
        assert_eq!(
            (rec.n_fired, rec.sum_act, rec.max_act),
            (l.n_fired, l.sum_act, l.max_act)
        );
        assert_eq!((rec.hist_hi, &rec.hist), (l.hist.hi, &l.hist.bins));
        let (top, random) = a.examples(&rec);
        assert_eq!(top, l.top);
        assert_eq!(random, l.random);
        let d = sae.d_in;
        let want = logit_effect(&model_logits(&model, &sae.w_dec[j * d..(j + 1) * d]), 10);
        assert_eq!(rec.logits_top, want.top);
        assert_eq!(rec.logits_bottom, want.bottom);
    }
    assert!(a.latent(sae.d_sae).is_none());

    // A truncated table names the file and the fix.
    let lat = dir.join(LATENTS_FILE);
    let bytes = std::fs::read(&lat).unwrap();
    std::fs::write(&lat, &bytes[..bytes.len() - 7]).unwrap();
    let e = format!("{:#}", Analysis::open(&dir).err().unwrap());
    assert!(
        e.contains("latents.bin") && e.contains("re-run `sae analyze`"),
        "{e}"
    );
    std::fs::write(dir.join(META_FILE), b"{not json").unwrap();
    let e = format!("{:#}", Analysis::open(&dir).err().unwrap());
    assert!(e.contains("meta.json"), "{e}");
    let e = format!(
        "{:#}",
        Analysis::open(&tmp.path().join("missing")).err().unwrap()
    );
    assert!(e.contains("sae analyze"), "{e}");
}

fn model_logits(model: &ToyModel, dir: &[f32]) -> Vec<f32> {
    use crate::ActivationSource;
    model.direction_logits(dir).unwrap()
}

#[test]
fn logit_effect_picks_extremes_in_order() {
    let l = [0.5, -2.0, 3.0, 0.0, -1.0, 2.5];
    let e = logit_effect(&l, 2);
    assert_eq!(e.top, vec![(2, 3.0), (5, 2.5)]);
    assert_eq!(e.bottom, vec![(1, -2.0), (4, -1.0)]);
    assert_eq!(logit_effect(&l, 0).top, vec![]);
}
