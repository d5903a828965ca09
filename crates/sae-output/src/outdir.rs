//! Is an output path safe to write? A command may replace its `--out` only when it holds an
//! output of the same kind, recognised by that kind's own files, and nothing else; a trained
//! SAE only when the user says so; never a file, the user's own files, or an input of the
//! command. The check runs before any work, and again just before the output is replaced.

use std::path::{Component, Path, PathBuf};

/// The kinds of output directory the commands write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputKind {
    /// A trained SAE (`sae train`): SAELens files, the run's log, summary and kept state.
    Sae,
    /// An evaluation report (`sae eval`).
    Eval,
    /// A feature-browser analysis (`sae analyze`).
    Analysis,
    /// An activation store (`sae harvest`, `sae synth`).
    Store,
    /// A sweep or the demo: runs, their evaluation, report and plots.
    Sweep,
}

/// Which kinds there are, for naming what a directory holds.
const ALL: [OutputKind; 5] = [
    OutputKind::Sae,
    OutputKind::Eval,
    OutputKind::Analysis,
    OutputKind::Store,
    OutputKind::Sweep,
];

impl OutputKind {
    /// What it is, for messages.
    pub fn describe(self) -> &'static str {
        match self {
            OutputKind::Sae => "a trained SAE",
            OutputKind::Eval => "an evaluation report",
            OutputKind::Analysis => "a feature-browser analysis",
            OutputKind::Store => "an activation store",
            OutputKind::Sweep => "a sweep",
        }
    }

    /// Files whose presence identifies this kind (all of them).
    fn markers(self) -> &'static [&'static str] {
        match self {
            OutputKind::Sae => &["cfg.json", "sae_weights.safetensors"],
            OutputKind::Eval => &["eval.json"],
            OutputKind::Analysis => &["meta.json", "latents.bin"],
            OutputKind::Store => &["manifest.json"],
            OutputKind::Sweep => &["sweep.json"],
        }
    }

    /// Every entry this kind may hold; `*` matches any run of characters. Anything else in
    /// the directory is the user's, so the directory is not replaced.
    fn entries(self) -> &'static [&'static str] {
        match self {
            OutputKind::Sae => &[
                "cfg.json",
                "sae_weights.safetensors",
                "train_log.jsonl",
                "train_summary.json",
                "train_config.json",
                "checkpoint",
                // `sae eval`'s default output sits inside the SAE it evaluates, with its lock.
                "eval",
                ".eval.lock",
            ],
            OutputKind::Eval => &["eval.json", "report.md", "firing_hist.png"],
            OutputKind::Analysis => &["meta.json", "vocab.json", "latents.bin", "examples.bin"],
            OutputKind::Store => &[
                "manifest.json",
                "shard_*.safetensors",
                "shard_*.npy",
                "shard_*.tmp",
                "true_features.safetensors",
            ],
            OutputKind::Sweep => &[
                "sweep.json",
                "sweep.csv",
                "report.md",
                "*.png",
                "runs",
                "acts",
                ".acts.lock",
                ".plots.tmp-*",
            ],
        }
    }

    /// Replacing this kind loses work that only the user can decide to throw away.
    fn needs_consent(self) -> bool {
        matches!(self, OutputKind::Sae)
    }

    /// The name written in [`MARK_FILE`].
    fn tag(self) -> &'static str {
        match self {
            OutputKind::Sae => "sae",
            OutputKind::Eval => "eval",
            OutputKind::Analysis => "analysis",
            OutputKind::Store => "store",
            OutputKind::Sweep => "sweep",
        }
    }

    fn holds(self, dir: &Path) -> bool {
        self.markers().iter().all(|m| dir.join(m).exists())
            || std::fs::read_to_string(dir.join(MARK_FILE)).is_ok_and(|t| t.trim() == self.tag())
    }

    fn owns(self, name: &str) -> bool {
        name == MARK_FILE || self.entries().iter().any(|p| glob_match(p, name))
    }
}

/// Written into an output that is built up in place (a store being harvested, a sweep), so
/// that it is recognised as that output before its own files exist.
pub const MARK_FILE: &str = ".sae-output";

/// Marks `dir` (created if needed) as an output of `kind` being built in place.
pub fn mark(dir: &Path, kind: OutputKind) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join(MARK_FILE);
    if std::fs::read_to_string(&path).is_ok_and(|t| t.trim() == kind.tag()) {
        return Ok(());
    }
    crate::atomic::write_atomic(&path, format!("{}\n", kind.tag()).as_bytes())
}

/// `*` in `pattern` matches any run of characters (at most one `*`).
fn glob_match(pattern: &str, name: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == name,
        Some((pre, post)) => {
            name.len() >= pre.len() + post.len() && name.starts_with(pre) && name.ends_with(post)
        }
    }
}

/// What the output path holds, when it may be written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Existing {
    /// Nothing there yet.
    Absent,
    /// An empty directory.
    Empty,
    /// An output of the same kind and nothing else.
    Same,
}

#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error("--out {path} is a file, not a directory; nothing was changed. Choose another --out")]
    NotADirectory { path: PathBuf },
    #[error(
        "--out {path} holds {found} (it has {marker}), not {want}; nothing was changed. Choose another --out"
    )]
    OtherKind {
        path: PathBuf,
        found: &'static str,
        marker: &'static str,
        want: &'static str,
    },
    #[error(
        "--out {path} holds files that are not part of {want}: {names}; nothing was changed. Choose another --out, or move those files out of it"
    )]
    Foreign {
        path: PathBuf,
        want: &'static str,
        names: String,
    },
    #[error("--out {path} already holds {want}; {hint}, or choose another --out")]
    NeedsConsent {
        path: PathBuf,
        want: &'static str,
        hint: &'static str,
    },
    #[error(
        "--out {out} is the input {flag} {input}; writing there would destroy it. Choose another --out"
    )]
    IsInput {
        out: PathBuf,
        flag: &'static str,
        input: PathBuf,
    },
    #[error(
        "--out {out} contains the input {flag} {input}; replacing it would delete that input. Choose another --out"
    )]
    HoldsInput {
        out: PathBuf,
        flag: &'static str,
        input: PathBuf,
    },
    #[error("--out {out} is inside the input {flag} {input}; choose an --out outside it")]
    InsideInput {
        out: PathBuf,
        flag: &'static str,
        input: PathBuf,
    },
    #[error(
        "--out {path} is itself {found} (it has {marker}), so it cannot be the folder of several outputs; nothing was changed. Choose another --out"
    )]
    FolderIsOutput {
        path: PathBuf,
        found: &'static str,
        marker: &'static str,
    },
    #[error("--out {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// An input of a command, which its output must neither be, hold nor sit inside.
#[derive(Clone, Copy, Debug)]
pub struct Input<'a> {
    /// The flag it came from, for messages (`--acts`).
    pub flag: &'static str,
    pub path: &'a Path,
    /// A child of the input the command may write into (`sae eval`'s `<sae>/eval`).
    pub allowed_child: Option<&'static str>,
}

impl<'a> Input<'a> {
    pub fn new(flag: &'static str, path: &'a Path) -> Self {
        Input {
            flag,
            path,
            allowed_child: None,
        }
    }
}

/// An absolute, `..`-free form of `path`, resolving symbolic links in the part that exists.
fn resolved(path: &Path) -> PathBuf {
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .unwrap_or_else(|_| PathBuf::from("/"))
            .join(path)
    };
    // Canonicalise the longest existing prefix, then add the rest lexically.
    let mut existing = abs.clone();
    let mut rest = Vec::new();
    while std::fs::symlink_metadata(&existing).is_err() {
        match (existing.file_name(), existing.parent()) {
            (Some(n), Some(p)) => {
                rest.push(n.to_os_string());
                existing = p.to_path_buf();
            }
            _ => break,
        }
    }
    let mut out = std::fs::canonicalize(&existing).unwrap_or(existing);
    for c in rest.iter().rev() {
        out.push(c);
    }
    let mut clean = PathBuf::new();
    for c in out.components() {
        match c {
            Component::ParentDir => {
                clean.pop();
            }
            Component::CurDir => {}
            c => clean.push(c),
        }
    }
    clean
}

/// Checks that `out` may be written as `kind`, before any work: see the module doc.
/// `consent`: the user asked to replace an output that needs it (`--overwrite`), or the
/// command continues that output (`--extend`).
pub fn check_output(
    out: &Path,
    kind: OutputKind,
    inputs: &[Input],
    consent: bool,
) -> Result<Existing, OutputError> {
    let out_abs = resolved(out);
    for i in inputs {
        let inp = resolved(i.path);
        if out_abs == inp {
            return Err(OutputError::IsInput {
                out: out.to_path_buf(),
                flag: i.flag,
                input: i.path.to_path_buf(),
            });
        }
        if inp.starts_with(&out_abs) {
            return Err(OutputError::HoldsInput {
                out: out.to_path_buf(),
                flag: i.flag,
                input: i.path.to_path_buf(),
            });
        }
        if out_abs.starts_with(&inp)
            && i.allowed_child.map(|c| inp.join(c)) != Some(out_abs.clone())
        {
            return Err(OutputError::InsideInput {
                out: out.to_path_buf(),
                flag: i.flag,
                input: i.path.to_path_buf(),
            });
        }
    }
    let meta = match std::fs::symlink_metadata(out) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Existing::Absent),
        Err(e) => {
            return Err(OutputError::Io {
                path: out.to_path_buf(),
                source: e,
            })
        }
    };
    if !meta.is_dir() {
        return Err(OutputError::NotADirectory {
            path: out.to_path_buf(),
        });
    }
    let io = |e| OutputError::Io {
        path: out.to_path_buf(),
        source: e,
    };
    let mut names = Vec::new();
    for e in std::fs::read_dir(out).map_err(io)? {
        names.push(e.map_err(io)?.file_name().to_string_lossy().to_string());
    }
    names.sort();
    if names.is_empty() {
        return Ok(Existing::Empty);
    }
    if !kind.holds(out) {
        if let Some(other) = ALL.iter().find(|k| **k != kind && k.holds(out)) {
            return Err(OutputError::OtherKind {
                path: out.to_path_buf(),
                found: other.describe(),
                marker: other.markers()[0],
                want: kind.describe(),
            });
        }
    }
    let foreign: Vec<&String> = names.iter().filter(|n| !kind.owns(n)).collect();
    if !foreign.is_empty() || !kind.holds(out) {
        let mut shown: Vec<String> = foreign.iter().take(5).map(|s| s.to_string()).collect();
        if foreign.len() > 5 {
            shown.push(format!("and {} more", foreign.len() - 5));
        }
        if shown.is_empty() {
            // Only our own names, but not the files that make the kind: a broken output
            // or the user's files of the same names; either way not ours to delete.
            shown = names.iter().take(5).cloned().collect();
        }
        return Err(OutputError::Foreign {
            path: out.to_path_buf(),
            want: kind.describe(),
            names: shown.join(", "),
        });
    }
    if kind.needs_consent() && !consent {
        return Err(OutputError::NeedsConsent {
            path: out.to_path_buf(),
            want: kind.describe(),
            hint: "pass --overwrite to replace it (or --extend to train it further)",
        });
    }
    Ok(Existing::Same)
}

/// Checks `dir` as the folder of several outputs, one per subfolder (`dir/<name>/`, e.g. one
/// store per hook). It may be absent, or a directory that is not itself an output (whose own
/// files would be mixed with the subfolders). What else it holds is left alone: only the
/// subfolders are written, each checked on its own with [`check_output`].
pub fn check_output_folder(dir: &Path) -> Result<(), OutputError> {
    match std::fs::symlink_metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => {
            return Err(OutputError::Io {
                path: dir.to_path_buf(),
                source: e,
            })
        }
        Ok(m) if !m.is_dir() => {
            return Err(OutputError::NotADirectory {
                path: dir.to_path_buf(),
            })
        }
        Ok(_) => {}
    }
    match ALL.iter().find(|k| k.holds(dir)) {
        Some(k) => Err(OutputError::FolderIsOutput {
            path: dir.to_path_buf(),
            found: k.describe(),
            marker: k.markers()[0],
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir_with(files: &[&str]) -> tempfile::TempDir {
        let t = tempfile::tempdir().unwrap();
        for f in files {
            let p = t.path().join(f);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, b"x").unwrap();
        }
        t
    }

    #[test]
    fn absent_and_empty_directories_may_be_written() {
        let t = tempfile::tempdir().unwrap();
        let out = t.path().join("new");
        assert_eq!(
            check_output(&out, OutputKind::Eval, &[], false).unwrap(),
            Existing::Absent
        );
        std::fs::create_dir(&out).unwrap();
        assert_eq!(
            check_output(&out, OutputKind::Eval, &[], false).unwrap(),
            Existing::Empty
        );
    }

    #[test]
    fn an_output_of_the_same_kind_may_be_replaced_and_a_trained_sae_only_with_consent() {
        let t = dir_with(&["eval.json", "report.md", "firing_hist.png"]);
        assert_eq!(
            check_output(t.path(), OutputKind::Eval, &[], false).unwrap(),
            Existing::Same
        );
        let t = dir_with(&["cfg.json", "sae_weights.safetensors", "train_summary.json"]);
        let e = check_output(t.path(), OutputKind::Sae, &[], false).unwrap_err();
        assert!(e.to_string().contains("--overwrite"), "{e}");
        assert_eq!(
            check_output(t.path(), OutputKind::Sae, &[], true).unwrap(),
            Existing::Same
        );
    }

    #[test]
    fn the_users_files_another_kind_and_a_file_are_refused() {
        let t = dir_with(&["notes.txt", "data/x.csv"]);
        let e = check_output(t.path(), OutputKind::Sae, &[], true).unwrap_err();
        assert!(matches!(e, OutputError::Foreign { .. }), "{e}");
        assert!(e.to_string().contains("notes.txt"), "{e}");
        // Our files plus one of the user's: still the user's directory.
        let t = dir_with(&["eval.json", "report.md", "mine.py"]);
        let e = check_output(t.path(), OutputKind::Eval, &[], true).unwrap_err();
        assert!(e.to_string().contains("mine.py"), "{e}");
        let t = dir_with(&["manifest.json", "shard_00000.safetensors"]);
        let e = check_output(t.path(), OutputKind::Analysis, &[], true).unwrap_err();
        assert!(e.to_string().contains("an activation store"), "{e}");
        let t = dir_with(&["f"]);
        let e = check_output(&t.path().join("f"), OutputKind::Eval, &[], true).unwrap_err();
        assert!(matches!(e, OutputError::NotADirectory { .. }), "{e}");
        // Names of ours without the files that make the kind are not recognised as ours.
        let t = dir_with(&["report.md"]);
        assert!(check_output(t.path(), OutputKind::Eval, &[], true).is_err());
    }

    #[test]
    fn an_output_that_is_holds_or_sits_inside_an_input_is_refused() {
        let t = dir_with(&["acts/manifest.json", "sae/cfg.json"]);
        let acts = t.path().join("acts");
        let sae = t.path().join("sae");
        let inp = [Input::new("--acts", &acts)];
        let e = check_output(&acts, OutputKind::Sae, &inp, true).unwrap_err();
        assert!(matches!(e, OutputError::IsInput { .. }), "{e}");
        let e = check_output(t.path(), OutputKind::Sae, &inp, true).unwrap_err();
        assert!(matches!(e, OutputError::HoldsInput { .. }), "{e}");
        let e = check_output(&acts.join("run"), OutputKind::Sae, &inp, true).unwrap_err();
        assert!(matches!(e, OutputError::InsideInput { .. }), "{e}");
        // The same input written with `..` and `.` is still the input.
        let odd = t.path().join("sae/../acts/.");
        let e = check_output(&odd, OutputKind::Sae, &inp, true).unwrap_err();
        assert!(matches!(e, OutputError::IsInput { .. }), "{e}");
        let eval_inp = [Input {
            flag: "--sae",
            path: &sae,
            allowed_child: Some("eval"),
        }];
        assert!(check_output(&sae.join("eval"), OutputKind::Eval, &eval_inp, false).is_ok());
        assert!(check_output(&sae.join("other"), OutputKind::Eval, &eval_inp, false).is_err());
    }

    #[test]
    fn an_output_built_in_place_is_recognised_by_its_mark() {
        let t = dir_with(&["runs/gated-l1_2/train_log.jsonl"]);
        assert!(check_output(t.path(), OutputKind::Sweep, &[], false).is_err());
        mark(t.path(), OutputKind::Sweep).unwrap();
        assert_eq!(
            check_output(t.path(), OutputKind::Sweep, &[], false).unwrap(),
            Existing::Same
        );
        let e = check_output(t.path(), OutputKind::Store, &[], false).unwrap_err();
        assert!(e.to_string().contains("a sweep"), "{e}");
    }

    #[test]
    fn a_folder_of_outputs_may_hold_anything_but_be_no_output_itself() {
        let t = dir_with(&["notes.txt", "blocks.1.hook_resid_post/manifest.json"]);
        assert!(check_output_folder(t.path()).is_ok());
        assert!(check_output_folder(&t.path().join("new")).is_ok());
        let t = dir_with(&["manifest.json", "shard_00000.safetensors"]);
        let e = check_output_folder(t.path()).unwrap_err();
        assert!(matches!(e, OutputError::FolderIsOutput { .. }), "{e}");
        assert!(e.to_string().contains("an activation store"), "{e}");
        let t = dir_with(&["f"]);
        let e = check_output_folder(&t.path().join("f")).unwrap_err();
        assert!(matches!(e, OutputError::NotADirectory { .. }), "{e}");
    }

    #[test]
    fn globs_match_whole_names() {
        assert!(glob_match("shard_*.npy", "shard_00001.npy"));
        assert!(!glob_match("shard_*.npy", "shard_1.npyx"));
        assert!(glob_match("*.png", "gamma.png"));
        assert!(!glob_match("*.png", "png"));
    }
}
