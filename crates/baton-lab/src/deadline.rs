//! Deadlines for lab tests. A test that waits for a connection the lab
//! broke would otherwise wait for ever, and a CI run sit at its limit with
//! no word of where it hung. A [`Deadline`] that passes reports what the
//! test was doing (its last [`Deadline::phase`]), removes every lab this
//! process made, and ends the process with a failure.

use std::collections::BTreeSet;
use std::io::Write;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Labs this process made and has not removed yet: what a passed deadline
/// removes before the process exits.
static LIVE_LABS: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());

pub(crate) fn lab_created(name: &str) {
    LIVE_LABS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(name.to_owned());
}

pub(crate) fn lab_gone(name: &str) {
    LIVE_LABS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(name);
}

struct State {
    phase: String,
    done: bool,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
}

/// A running deadline; dropping it (the test ended, passed or panicked)
/// disarms it.
pub struct Deadline {
    shared: Arc<Shared>,
}

impl Deadline {
    /// Arms a deadline of `limit` for `what` (the test's name).
    pub fn start(what: impl Into<String>, limit: Duration) -> Deadline {
        let what = what.into();
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                phase: "starting".into(),
                done: false,
            }),
            wake: Condvar::new(),
        });
        let watched = Arc::clone(&shared);
        std::thread::spawn(move || {
            let until = Instant::now() + limit;
            let mut state = watched.state.lock().unwrap_or_else(|e| e.into_inner());
            while !state.done {
                let left = until.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    // Straight to stderr: the test harness captures
                    // `eprintln!` of test threads, and would drop it on exit.
                    let mut err = std::io::stderr();
                    let _ = writeln!(
                        err,
                        "DEADLINE: {what} still running after {limit:?}, while {}; removing its labs and failing",
                        state.phase
                    );
                    let labs: Vec<String> = LIVE_LABS
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .iter()
                        .cloned()
                        .collect();
                    for lab in labs {
                        if let Err(e) = crate::down(&lab) {
                            let _ = writeln!(err, "DEADLINE: removing lab {lab}: {e}");
                        }
                    }
                    std::process::exit(101);
                }
                state = watched
                    .wake
                    .wait_timeout(state, left)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
        });
        Deadline { shared }
    }

    /// Records what the test does now, for the report if the deadline passes.
    pub fn phase(&self, phase: impl Into<String>) {
        self.shared
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .phase = phase.into();
    }
}

impl Drop for Deadline {
    fn drop(&mut self) {
        self.shared
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .done = true;
        self.shared.wake.notify_all();
    }
}
