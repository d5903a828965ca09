//! Progress of long work: a bar when stderr is a terminal; otherwise (a log file, CI, nohup)
//! a plain line every few seconds, so a log shows that work goes on and how fast.

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Seconds between progress lines in a log; `SAE_PROGRESS_SECS` overrides the default of 5.
fn line_interval() -> Duration {
    let secs = std::env::var("SAE_PROGRESS_SECS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0)
        .unwrap_or(5.0);
    Duration::from_secs_f64(secs)
}

struct Lines {
    label: String,
    len: u64,
    pos: u64,
    msg: String,
    start: Instant,
    last: Option<Instant>,
    every: Duration,
}

impl Lines {
    fn line(&self) -> String {
        let el = self.start.elapsed().as_secs();
        let mut s = format!(
            "{}: {}/{}",
            self.label,
            self.pos,
            if self.len > 0 {
                self.len.to_string()
            } else {
                "?".into()
            }
        );
        if self.len > 0 {
            s += &format!(" ({:.1}%)", 100.0 * self.pos as f64 / self.len as f64);
        }
        s += &format!(", {}:{:02}:{:02} elapsed", el / 3600, el / 60 % 60, el % 60);
        if self.pos > 0 && self.len > self.pos {
            let eta = (el as f64 * (self.len - self.pos) as f64 / self.pos as f64) as u64;
            s += &format!(", eta {}:{:02}:{:02}", eta / 3600, eta / 60 % 60, eta % 60);
        }
        if !self.msg.is_empty() {
            s += " | ";
            s += &self.msg;
        }
        s
    }

    /// Prints a line when the interval has passed since the last one (or `now`).
    fn tick(&mut self, now: bool) {
        let due = match self.last {
            None => true,
            Some(t) => t.elapsed() >= self.every,
        };
        if now || due {
            eprintln!("{}", self.line());
            self.last = Some(Instant::now());
        }
    }
}

enum Inner {
    Bar(ProgressBar),
    Lines(Mutex<Lines>),
    Hidden,
}

/// A progress reporter; cheap to call on every step.
pub struct Progress(Inner);

/// Bars drawn together (one per run of a sweep); plain lines when stderr is not a terminal.
#[derive(Clone, Default)]
pub struct ProgressGroup(Option<MultiProgress>);

fn terminal() -> bool {
    std::io::stderr().is_terminal()
}

impl ProgressGroup {
    pub fn new() -> Self {
        ProgressGroup(terminal().then(MultiProgress::new))
    }

    /// A reporter drawn in this group.
    pub fn add(&self, len: u64, label: &str, template: &str) -> Progress {
        match &self.0 {
            Some(mp) => {
                let Progress(Inner::Bar(b)) = Progress::bar(len, template) else {
                    unreachable!("a bar was asked for")
                };
                Progress(Inner::Bar(mp.add(b)))
            }
            None => Progress::lines(len, label),
        }
    }
}

impl Progress {
    /// A bar with indicatif's `template` on a terminal, else lines labelled `label`.
    pub fn new(len: u64, label: &str, template: &str) -> Self {
        if terminal() {
            Self::bar(len, template)
        } else {
            Self::lines(len, label)
        }
    }

    pub fn hidden() -> Self {
        Progress(Inner::Hidden)
    }

    fn bar(len: u64, template: &str) -> Self {
        let b = ProgressBar::new(len);
        b.set_style(
            ProgressStyle::with_template(template)
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        Progress(Inner::Bar(b))
    }

    fn lines(len: u64, label: &str) -> Self {
        Progress(Inner::Lines(Mutex::new(Lines {
            label: label.to_string(),
            len,
            pos: 0,
            msg: String::new(),
            start: Instant::now(),
            last: None,
            every: line_interval(),
        })))
    }

    fn with_lines(&self, f: impl FnOnce(&mut Lines)) {
        if let Inner::Lines(l) = &self.0 {
            if let Ok(mut l) = l.lock() {
                f(&mut l)
            }
        }
    }

    pub fn set_position(&self, pos: u64) {
        match &self.0 {
            Inner::Bar(b) => b.set_position(pos),
            _ => self.with_lines(|l| {
                l.pos = pos;
                l.tick(false)
            }),
        }
    }

    pub fn inc(&self, n: u64) {
        match &self.0 {
            Inner::Bar(b) => b.inc(n),
            _ => self.with_lines(|l| {
                l.pos += n;
                l.tick(false)
            }),
        }
    }

    pub fn set_length(&self, len: u64) {
        match &self.0 {
            Inner::Bar(b) => b.set_length(len),
            _ => self.with_lines(|l| l.len = len),
        }
    }

    /// The message shown after the position (rates, loss terms); printed with the next line.
    pub fn set_message(&self, msg: impl Into<String>) {
        let msg = msg.into();
        match &self.0 {
            Inner::Bar(b) => b.set_message(msg),
            _ => self.with_lines(|l| l.msg = msg),
        }
    }

    pub fn finish(&self) {
        match &self.0 {
            Inner::Bar(b) => b.finish(),
            _ => self.with_lines(|l| l.tick(true)),
        }
    }

    pub fn finish_with_message(&self, msg: impl Into<String>) {
        let msg = msg.into();
        match &self.0 {
            Inner::Bar(b) => b.finish_with_message(msg),
            _ => self.with_lines(|l| {
                l.msg = msg;
                l.tick(true)
            }),
        }
    }

    pub fn abandon_with_message(&self, msg: impl Into<String>) {
        self.finish_with_message(msg)
    }

    pub fn abandon(&self) {
        match &self.0 {
            Inner::Bar(b) => b.abandon(),
            _ => self.with_lines(|l| l.tick(true)),
        }
    }

    pub fn finish_and_clear(&self) {
        if let Inner::Bar(b) = &self.0 {
            b.finish_and_clear()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_line_names_the_work_its_position_and_the_message() {
        let mut l = Lines {
            label: "train".into(),
            len: 200,
            pos: 50,
            msg: "9000 tok/s loss 0.5".into(),
            start: Instant::now(),
            last: None,
            every: Duration::from_secs(5),
        };
        let s = l.line();
        assert!(
            s.starts_with("train: 50/200 (25.0%), 0:00:00 elapsed"),
            "{s}"
        );
        assert!(s.ends_with("| 9000 tok/s loss 0.5"), "{s}");
        l.tick(false);
        let first = l.last.unwrap();
        l.tick(false);
        assert_eq!(l.last.unwrap(), first, "no second line within the interval");
    }
}
