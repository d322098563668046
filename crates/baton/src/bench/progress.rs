//! A progress bar on stderr while a benchmark runs (indicatif); it draws
//! nothing when stderr is not a terminal.

use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

pub struct Progress {
    bar: ProgressBar,
}

impl Progress {
    /// A bar of `runs` runs of about `each` apiece.
    pub fn new(runs: u64, each: Duration) -> Progress {
        let bar = ProgressBar::with_draw_target(Some(runs), ProgressDrawTarget::stderr());
        if let Ok(style) = ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} runs (~{per_run}s each) {msg}",
        ) {
            let per_run = each.as_secs();
            bar.set_style(style.with_key(
                "per_run",
                move |_: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                    let _ = write!(w, "{per_run}");
                },
            ));
        }
        bar.enable_steady_tick(Duration::from_millis(200));
        Progress { bar }
    }

    /// A run begins.
    pub fn start(&self, what: String) {
        self.bar.set_message(what);
    }

    /// A run is over.
    pub fn done(&self) {
        self.bar.inc(1);
    }

    pub fn finish(self) {
        self.bar.finish_and_clear();
    }
}
