//! How far bf16 or bf16x3 products move the model: `cargo run --release -p sae-lm --example
//! bf16_error [TOKENS] [HOOK] [bf16|bf16x3]`. On python-docs contexts of 128 it prints the
//! relative error at the hook (||got - f32|| / ||f32|| over all rows) and the mean next-token
//! loss both ways.

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let tokens: usize = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(8_192);
    let hook = args
        .get(2)
        .cloned()
        .unwrap_or_else(|| "blocks.15.hook_resid_post".into());
    let (ctx, batch) = (128, 8);
    let products: sae_lm::ProductPrecision = match args.get(3) {
        None => sae_lm::ProductPrecision::Bf16,
        Some(s) => s.parse().map_err(anyhow::Error::msg)?,
    };
    let mut model = sae_lm::LanguageModel::load("smollm2-135m")?;
    let contexts = sae_lm::corpus::pack_corpus("python-docs", model.tokenizer(), ctx, tokens, 0)?;
    // Each way over all contexts: (activations at the hook, per-token losses).
    let mut run = |p: sae_lm::ProductPrecision| -> anyhow::Result<(Vec<f32>, Vec<f32>)> {
        model.set_products(p)?;
        let (mut acts, mut losses) = (Vec::new(), Vec::new());
        for chunk in contexts.tokens.chunks(batch * ctx) {
            let b = chunk.len() / ctx;
            acts.extend(model.activations(chunk, b, ctx, &hook)?);
            losses.extend(model.per_token_loss(chunk, b, ctx, None)?);
        }
        Ok((acts, losses))
    };
    let (want, loss) = run(sae_lm::ProductPrecision::F32)?;
    let (got, loss_got) = run(products)?;
    let width = want.len() / (contexts.n_contexts() * ctx);
    let (mut diff2, mut norm2) = (0f64, 0f64);
    // (relative error, position in context) of every row.
    let mut rows: Vec<(f64, usize)> = Vec::new();
    for (i, (w, g)) in want.chunks(width).zip(got.chunks(width)).enumerate() {
        let d2: f64 = w.iter().zip(g).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
        let n2: f64 = w.iter().map(|a| (*a as f64).powi(2)).sum();
        diff2 += d2;
        norm2 += n2;
        rows.push(((d2 / n2).sqrt(), i % ctx));
    }
    rows.sort_by(|a, b| a.0.total_cmp(&b.0));
    let quantile = |q: f64| rows[((rows.len() - 1) as f64 * q) as usize].0;
    let worst = rows[rows.len() - 1];
    println!(
        "per-row rel err: median {:.2e}, p99 {:.2e}, worst {:.2e} (position {}), rows over 1e-2: \
         {} ({} of them at position 1)",
        quantile(0.5),
        quantile(0.99),
        worst.0,
        worst.1,
        rows.iter().filter(|r| r.0 > 1e-2).count(),
        rows.iter().filter(|r| r.0 > 1e-2 && r.1 == 1).count()
    );
    let mean = |v: &[f32]| v.iter().map(|&l| l as f64).sum::<f64>() / v.len() as f64;
    let (ce_f32, ce_got) = (mean(&loss), mean(&loss_got));
    println!(
        "{} contexts of {ctx}, {hook}: rel err {:.2e}; CE f32 {ce_f32:.4}, {products} {ce_got:.4}, \
         delta {:+.4}",
        contexts.n_contexts(),
        (diff2 / norm2).sqrt(),
        ce_got - ce_f32
    );
    Ok(())
}
