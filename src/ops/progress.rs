//! Progress of a long operator command (`verify`, `rebuild`): a bar per
//! item with its rate and ETA on a terminal (indicatif), plain log lines
//! every [`LOG_EVERY`] otherwise.

use std::io::IsTerminal as _;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How often a line is logged when standard error is not a terminal.
pub const LOG_EVERY: Duration = Duration::from_secs(5);

/// The bars of one command.
pub struct Bars {
    multi: Option<MultiProgress>,
}

impl Bars {
    /// Bars on standard error if it is a terminal, log lines otherwise.
    pub fn new() -> Bars {
        let multi = std::io::stderr()
            .is_terminal()
            .then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()));
        Bars { multi }
    }

    /// One item's progress: `total` units expected (if known), `unit` names
    /// them ("rows", "changes").
    pub fn add(&self, label: &str, total: Option<u64>, unit: &'static str) -> Progress {
        let bar = self.multi.as_ref().map(|m| {
            let bar = m.add(ProgressBar::new(total.unwrap_or(0)));
            let template = if total.is_some() {
                format!("{{prefix:30}} [{{bar:30}}] {{pos}}/{{len}} {unit} {{per_sec}} ETA {{eta}}")
            } else {
                format!("{{prefix:30}} {{pos}} {unit} {{per_sec}}")
            };
            bar.set_style(
                ProgressStyle::with_template(&template)
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
            );
            bar.set_prefix(label.to_owned());
            bar
        });
        Progress {
            bar,
            label: label.to_owned(),
            unit,
            total,
            started: Instant::now(),
            state: Mutex::new((0, Instant::now())),
        }
    }
}

impl Default for Bars {
    fn default() -> Self {
        Bars::new()
    }
}

/// One item's progress.
pub struct Progress {
    bar: Option<ProgressBar>,
    label: String,
    unit: &'static str,
    total: Option<u64>,
    started: Instant,
    /// Units done, and when the last line was logged.
    state: Mutex<(u64, Instant)>,
}

impl Progress {
    /// `n` more units done.
    pub fn inc(&self, n: u64) {
        if let Some(bar) = &self.bar {
            bar.inc(n);
        }
        let mut state = self.state.lock().expect("progress lock");
        state.0 += n;
        if self.bar.is_none() && state.1.elapsed() >= LOG_EVERY {
            state.1 = Instant::now();
            self.log(state.0);
        }
    }

    /// Sets the total, once known.
    pub fn set_total(&mut self, total: u64) {
        self.total = Some(total);
        if let Some(bar) = &self.bar {
            bar.set_length(total);
        }
    }

    pub fn done(&self) -> u64 {
        self.state.lock().expect("progress lock").0
    }

    fn log(&self, done: u64) {
        let secs = self.started.elapsed().as_secs_f64().max(0.001);
        let rate = done as f64 / secs;
        match self.total {
            Some(total) => {
                let eta = if rate > 0.0 {
                    format!("{:.0}s", total.saturating_sub(done) as f64 / rate)
                } else {
                    "-".into()
                };
                tracing::info!(
                    "{}: {done}/{total} {} ({rate:.0}/s, ETA {eta})",
                    self.label,
                    self.unit
                )
            }
            None => tracing::info!("{}: {done} {} ({rate:.0}/s)", self.label, self.unit),
        }
    }

    /// The item is finished: the bar stays, or a last line is logged.
    pub fn finish(&self) {
        match &self.bar {
            Some(bar) => bar.finish(),
            None => self.log(self.done()),
        }
    }
}
