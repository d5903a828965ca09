//! Minimal `.npy` header parser: a C-ordered 2-D float array (f4, f2, or bf16 as written by
//! ml_dtypes) after the header.

use crate::reader::Dtype;
use anyhow::{bail, Result};

/// Parsed header: dtype, shape and the byte offset of the data.
pub struct NpyHeader {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data_offset: usize,
}

/// Bytes before the first that [`header_size`] needs to see.
pub const PREFIX_LEN: usize = 12;

/// Larger headers are refused: numpy writes a few hundred bytes, and the length field of a
/// version 2 header could otherwise ask for 4 GiB.
pub const MAX_HEADER_LEN: usize = 1 << 20;

/// The size of the whole header (magic, version, length field and text), from the first
/// [`PREFIX_LEN`] bytes of the file (or all of it when shorter), i.e. the offset of the data.
pub fn header_size(prefix: &[u8]) -> Result<usize> {
    if prefix.len() < 10 || &prefix[..6] != b"\x93NUMPY" {
        bail!("not a .npy file (bad magic bytes)");
    }
    let (header_len, start) = match prefix[6] {
        1 => (u16::from_le_bytes([prefix[8], prefix[9]]) as usize, 10),
        2 | 3 => {
            if prefix.len() < 12 {
                bail!("truncated .npy header");
            }
            (
                u32::from_le_bytes([prefix[8], prefix[9], prefix[10], prefix[11]]) as usize,
                12,
            )
        }
        v => bail!("unsupported .npy version {v}"),
    };
    if header_len > MAX_HEADER_LEN {
        bail!("the .npy header claims {header_len} bytes; a corrupt file or not an array header");
    }
    Ok(start + header_len)
}

pub fn parse_header(bytes: &[u8]) -> Result<NpyHeader> {
    let end = header_size(bytes)?;
    let start = if bytes[6] == 1 { 10 } else { 12 };
    if bytes.len() < end {
        bail!("truncated .npy header");
    }
    let header = std::str::from_utf8(&bytes[start..end])
        .map_err(|_| anyhow::anyhow!("the .npy header is not text"))?;
    let descr = dict_value(header, "descr")
        .ok_or_else(|| anyhow::anyhow!("the .npy header has no 'descr'"))?;
    let descr = descr.trim().trim_matches(|c| c == '\'' || c == '"');
    let dtype = match descr {
        "<f4" | "=f4" | "f4" => Dtype::F32,
        "<f2" | "=f2" | "f2" => Dtype::F16,
        // ml_dtypes' bfloat16 is saved as an opaque 2-byte void type.
        "<V2" | "|V2" | "V2" | "bfloat16" => Dtype::Bf16,
        other => {
            bail!("unsupported dtype '{other}' (expected float32 '<f4', float16 '<f2' or bfloat16)")
        }
    };
    let fortran = dict_value(header, "fortran_order")
        .map(|v| v.trim().starts_with("True"))
        .unwrap_or(false);
    if fortran {
        bail!("Fortran-ordered .npy arrays are not supported; save with np.ascontiguousarray");
    }
    let shape_text = dict_value(header, "shape")
        .ok_or_else(|| anyhow::anyhow!("the .npy header has no 'shape'"))?;
    let shape_text = shape_text.trim().trim_start_matches('(');
    let shape_text = shape_text.split(')').next().unwrap_or("");
    let shape = shape_text
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<usize>()
                .map_err(|_| anyhow::anyhow!("bad .npy shape entry '{s}'"))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(NpyHeader {
        dtype,
        shape,
        data_offset: end,
    })
}

/// The text after `'key':` up to the next top-level comma (or the closing parenthesis of a tuple).
fn dict_value<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let pat_single = format!("'{key}':");
    let pat_double = format!("\"{key}\":");
    let pos = header
        .find(&pat_single)
        .map(|p| p + pat_single.len())
        .or_else(|| header.find(&pat_double).map(|p| p + pat_double.len()))?;
    let rest = &header[pos..];
    let mut depth = 0;
    for (i, c) in rest.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' | '}' if depth == 0 => return Some(&rest[..i]),
            _ => {}
        }
    }
    Some(rest)
}

/// A `.npy` file image (header + data) of a C-ordered 2-D array, for tests and tools.
pub fn encode(dtype: Dtype, rows: usize, cols: usize, data: &[u8]) -> Vec<u8> {
    let descr = match dtype {
        Dtype::F32 => "<f4",
        Dtype::F16 => "<f2",
        Dtype::Bf16 => "<V2",
    };
    let mut header =
        format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': ({rows}, {cols}), }}");
    // Pad so that the data starts on a 64-byte boundary, ending with a newline.
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}
