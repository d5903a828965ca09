//! One string column of a .parquet file, row by row (the `parquet` crate's record reader,
//! without arrow: only the named column is decoded).

use anyhow::{bail, Context, Result};
use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::Field;
use parquet::schema::types::Type;
use std::path::Path;
use std::sync::Arc;

/// The values of column `column` (null rows skipped), in file order.
pub fn read_column(path: &Path, column: &str) -> Result<Vec<String>> {
    let file = std::fs::File::open(path)
        .with_context(|| format!("reading corpus file {}", path.display()))?;
    let reader = SerializedFileReader::new(file).map_err(|e| {
        anyhow::anyhow!(
            "corpus file {} is not a readable parquet file ({e})",
            path.display()
        )
    })?;
    let schema = reader.metadata().file_metadata().schema();
    let Some(field) = schema.get_fields().iter().find(|f| f.name() == column) else {
        let names: Vec<&str> = schema.get_fields().iter().map(|f| f.name()).collect();
        bail!(
            "{}: no column '{column}' (columns: {}); name the text column with CORPUS#COLUMN",
            path.display(),
            names.join(", ")
        );
    };
    let projection = Type::group_type_builder(schema.name())
        .with_fields(vec![Arc::clone(field)])
        .build()?;
    let rows = reader
        .get_row_iter(Some(projection))
        .with_context(|| format!("{}: reading column '{column}'", path.display()))?;
    let mut docs = Vec::new();
    for (i, row) in rows.enumerate() {
        // Codec not compiled in, truncated file, ...: name the file.
        let row = row.map_err(|e| {
            let hint = if e.to_string().contains("Disabled feature") {
                "; only snappy-compressed or uncompressed files are read: re-save it with \
                 snappy (pyarrow's default)"
            } else {
                ""
            };
            anyhow::anyhow!("{}: row {i}: {e}{hint}", path.display())
        })?;
        match row.get_column_iter().next().map(|(_, v)| v) {
            Some(Field::Str(s)) => docs.push(s.clone()),
            Some(Field::Bytes(b)) => match std::str::from_utf8(b.data()) {
                Ok(s) => docs.push(s.to_string()),
                Err(_) => bail!(
                    "{}: row {i} of column '{column}' is not UTF-8 text",
                    path.display()
                ),
            },
            Some(Field::Null) | None => {}
            Some(other) => bail!(
                "{}: column '{column}' holds {other:?}, not text; name the text column with \
                 CORPUS#COLUMN",
                path.display()
            ),
        }
    }
    Ok(docs)
}
