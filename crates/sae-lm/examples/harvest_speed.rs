//! Forward-pass harvest speed without writing: `cargo run --release -p sae-lm --example
//! harvest_speed [TOKENS] [BATCH] [HOOK] [f32|bf16|bf16x3]`. Prints tokens/s (rows at the
//! hook, BOS left out) with the weight products in that precision.

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let tokens: usize = args
        .get(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(20_000);
    let batch: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(16);
    let hook = args
        .get(3)
        .cloned()
        .unwrap_or_else(|| "blocks.15.hook_resid_post".into());
    let products: sae_lm::ProductPrecision = match args.get(4) {
        None => sae_lm::ProductPrecision::F32,
        Some(s) => s.parse().map_err(anyhow::Error::msg)?,
    };
    let mut model = sae_lm::LanguageModel::load("smollm2-135m")?;
    model.set_products(products)?;
    let contexts = sae_lm::corpus::pack_corpus("python-docs", model.tokenizer(), 128, tokens, 0)?;
    let opts = sae_lm::harvest::HarvestOptions {
        batch,
        include_bos: false,
        max_rows: tokens,
        first_context: 0,
        progress: false,
    };
    let mut checksum = 0f64;
    let stats = sae_lm::harvest::harvest(&model, &contexts, &hook, &opts, |rows| {
        checksum += rows.acts[0] as f64;
        Ok(())
    })?;
    println!(
        "{} tokens at {hook}, batch {batch}, {} products: {:.1}s, {:.0} tokens/s (checksum {checksum:.3})",
        stats.rows,
        products,
        stats.seconds,
        stats.tokens_per_second()
    );
    Ok(())
}
