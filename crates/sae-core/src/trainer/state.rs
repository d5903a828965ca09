//! Optimiser state files for `--resume`.

use super::SaeTrainer;
use anyhow::{bail, Context};
use std::collections::HashMap;

impl SaeTrainer {
    /// Optimiser state (Adam moments, step count, dead-latent counters) to a safetensors
    /// file, for `--resume`; the weights themselves are saved with `saelens::save`.
    /// Written to a temporary file and renamed.
    pub fn save_state(&self, path: &std::path::Path) -> anyhow::Result<()> {
        use safetensors::{tensor::TensorView, Dtype};
        let mut tensors: Vec<(String, Vec<u8>, Dtype, usize)> = Vec::new();
        let mut put_f32 = |name: String, v: &[f32]| {
            tensors.push((name, bytemuck::cast_slice(v).to_vec(), Dtype::F32, v.len()));
        };
        let mut moments = vec![
            ("W_enc", &self.mom_enc),
            ("W_dec", &self.mom_dec),
            ("b_dec", &self.mom_bdec),
        ];
        for (name, m) in self.arch.param_names().iter().zip(&self.mom_params) {
            moments.push((name, m));
        }
        for (name, m) in moments {
            put_f32(format!("{name}.adam_v"), &m.v);
            if !m.m.is_empty() {
                put_f32(format!("{name}.adam_m"), &m.m);
            }
        }
        let to_i64 =
            |v: &[u64]| -> Vec<u8> { v.iter().flat_map(|&x| (x as i64).to_le_bytes()).collect() };
        tensors.push((
            "last_update".into(),
            to_i64(&self.last_update),
            Dtype::I64,
            self.d_sae,
        ));
        tensors.push((
            "tokens_since_fired".into(),
            to_i64(&self.tokens_since_fired),
            Dtype::I64,
            self.d_sae,
        ));
        let views = tensors
            .iter()
            .map(|(name, bytes, dt, len)| {
                Ok((name.clone(), TensorView::new(*dt, vec![*len], bytes)?))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let meta: HashMap<String, String> = [
            ("arch", self.kind.to_string()),
            ("d_in", self.d_in.to_string()),
            ("d_sae", self.d_sae.to_string()),
            ("steps", self.steps.to_string()),
            ("threshold_ema", format!("{:e}", self.threshold_ema)),
            (
                "last_batch_threshold",
                format!("{:e}", self.last_batch_threshold),
            ),
            ("adam_beta1", self.hyper.adam_beta1.to_string()),
            ("precision", self.hyper.precision.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let bytes = safetensors::serialize(views, Some(meta))
            .with_context(|| format!("serialising optimiser state for {}", path.display()))?;
        crate::saelens::write_atomic(path, &bytes)
    }

    /// Restore what `save_state` wrote; the trainer must have been built from the SAE saved
    /// at the same step, with the same architecture, sizes and beta1.
    pub fn load_state(&mut self, path: &std::path::Path) -> anyhow::Result<()> {
        let _huge = crate::hugepage::scope();
        let bytes = std::fs::read(path)
            .with_context(|| format!("reading optimiser state {}", path.display()))?;
        let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| {
            anyhow::anyhow!(
                "{}: not a valid safetensors optimiser state ({e})",
                path.display()
            )
        })?;
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let meta = header.metadata().clone().unwrap_or_default();
        let get = |k: &str| -> anyhow::Result<&String> {
            meta.get(k)
                .ok_or_else(|| anyhow::anyhow!("{}: optimiser state lacks '{k}'", path.display()))
        };
        let expect = [
            ("arch", self.kind.to_string()),
            ("d_in", self.d_in.to_string()),
            ("d_sae", self.d_sae.to_string()),
            ("adam_beta1", self.hyper.adam_beta1.to_string()),
        ];
        // States saved before the precision was recorded were trained in f32.
        let precision = meta.get("precision").map_or("f32", |p| p.as_str());
        let expect_precision = [("precision", self.hyper.precision.to_string())];
        for (k, want) in expect.into_iter().chain(expect_precision) {
            let got = if k == "precision" { precision } else { get(k)? };
            if *got != want {
                bail!(
                    "{}: optimiser state has {k} = {got} but the SAE being trained has {want}; \
                     resume with the same settings or start a new run",
                    path.display()
                );
            }
        }
        let parse_f = |k: &str| -> anyhow::Result<f64> {
            get(k)?
                .parse::<f64>()
                .with_context(|| format!("{}: bad '{k}'", path.display()))
        };
        let steps: u64 = get("steps")?
            .parse()
            .with_context(|| format!("{}: bad 'steps'", path.display()))?;
        let read_f32 = |name: &str, dst: &mut Vec<f32>| -> anyhow::Result<()> {
            if dst.is_empty() {
                return Ok(());
            }
            let t = st
                .tensor(name)
                .map_err(|_| anyhow::anyhow!("{}: missing tensor '{name}'", path.display()))?;
            if t.dtype() != safetensors::Dtype::F32 || t.data().len() != dst.len() * 4 {
                bail!(
                    "{}: tensor '{name}' has the wrong type or size",
                    path.display()
                );
            }
            for (d, c) in dst.iter_mut().zip(t.data().chunks_exact(4)) {
                *d = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
            Ok(())
        };
        let read_u64 = |name: &str, dst: &mut Vec<u64>| -> anyhow::Result<()> {
            let t = st
                .tensor(name)
                .map_err(|_| anyhow::anyhow!("{}: missing tensor '{name}'", path.display()))?;
            if t.dtype() != safetensors::Dtype::I64 || t.data().len() != dst.len() * 8 {
                bail!(
                    "{}: tensor '{name}' has the wrong type or size",
                    path.display()
                );
            }
            for (d, c) in dst.iter_mut().zip(t.data().chunks_exact(8)) {
                *d = i64::from_le_bytes(c.try_into().unwrap()) as u64;
            }
            Ok(())
        };
        read_f32("W_enc.adam_v", &mut self.mom_enc.v)?;
        read_f32("W_enc.adam_m", &mut self.mom_enc.m)?;
        read_f32("W_dec.adam_v", &mut self.mom_dec.v)?;
        read_f32("W_dec.adam_m", &mut self.mom_dec.m)?;
        read_f32("b_dec.adam_v", &mut self.mom_bdec.v)?;
        read_f32("b_dec.adam_m", &mut self.mom_bdec.m)?;
        for (name, m) in self
            .arch
            .param_names()
            .iter()
            .zip(self.mom_params.iter_mut())
        {
            read_f32(&format!("{name}.adam_v"), &mut m.v)?;
            read_f32(&format!("{name}.adam_m"), &mut m.m)?;
        }
        read_u64("last_update", &mut self.last_update)?;
        read_u64("tokens_since_fired", &mut self.tokens_since_fired)?;
        self.steps = steps;
        self.threshold_ema = parse_f("threshold_ema")?;
        self.last_batch_threshold = parse_f("last_batch_threshold")? as f32;
        Ok(())
    }
}
