//! Long calls: the work runs on a worker thread without the GIL while the calling thread waits, wakes every
//! 100 ms to check for Ctrl-C (`Python::check_signals`) and to report progress to a Python callback, and
//! sets the cancel flag the engine polls when either raises.

use pyo3::prelude::*;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

/// Shared state between the worker and the waiting thread.
pub struct Watch {
    /// Set when the caller interrupted (Ctrl-C) or its progress callback raised: the work stops at its next
    /// check.
    pub cancel: AtomicBool,
    stage: Mutex<&'static str>,
    done: AtomicU64,
    total: AtomicU64,
    changed: AtomicBool,
    finished: Mutex<bool>,
    cv: Condvar,
}

impl Watch {
    fn new() -> Watch {
        Watch {
            cancel: AtomicBool::new(false),
            stage: Mutex::new(""),
            done: AtomicU64::new(0),
            total: AtomicU64::new(0),
            changed: AtomicBool::new(false),
            finished: Mutex::new(false),
            cv: Condvar::new(),
        }
    }

    /// Records progress (any thread).
    pub fn progress(&self, stage: &'static str, done: u64, total: u64) {
        if let Ok(mut s) = self.stage.lock() {
            *s = stage;
        }
        self.done.store(done, Ordering::Relaxed);
        self.total.store(total, Ordering::Relaxed);
        self.changed.store(true, Ordering::Release);
    }

    /// Whether the caller asked to stop.
    pub fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }

    fn finish(&self) {
        match self.finished.lock() {
            Ok(mut g) => *g = true,
            Err(p) => *p.into_inner() = true,
        }
        self.cv.notify_all();
    }

    /// Waits up to `d` for the worker to finish; true once it has.
    fn wait(&self, d: Duration) -> bool {
        let g = match self.finished.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        match self.cv.wait_timeout_while(g, d, |f| !*f) {
            Ok((g, _)) => *g,
            Err(p) => *p.into_inner().0,
        }
    }
}

/// Marks the watch finished when dropped, so a panicking worker still wakes the waiter.
struct FinishOnDrop<'a>(&'a Watch);

impl Drop for FinishOnDrop<'_> {
    fn drop(&mut self) {
        self.0.finish();
    }
}

/// Runs `work` on a worker thread with the GIL released. Every 100 ms (and at the end) the calling thread
/// checks signals and calls `progress(stage, done, total)` if progress moved. A KeyboardInterrupt (or an
/// exception from `progress`) sets [`Watch::cancel`], waits for the work to stop, and is raised.
pub fn run<T: Send>(
    py: Python<'_>,
    progress: Option<&Bound<'_, PyAny>>,
    work: impl FnOnce(&Watch) -> PyResult<T> + Send,
) -> PyResult<T> {
    let watch = Watch::new();
    let w = &watch;
    std::thread::scope(|s| {
        let handle = s.spawn(move || {
            let _done = FinishOnDrop(w);
            work(w)
        });
        let mut interrupted: Option<PyErr> = None;
        loop {
            let finished = py.detach(|| w.wait(Duration::from_millis(100)));
            if interrupted.is_none()
                && let Err(e) = py.check_signals()
            {
                w.cancel.store(true, Ordering::Relaxed);
                interrupted = Some(e);
            }
            if let Some(cb) = progress
                && interrupted.is_none()
                && w.changed.swap(false, Ordering::Acquire)
            {
                let stage = w.stage.lock().map(|s| *s).unwrap_or("");
                let args = (
                    stage,
                    w.done.load(Ordering::Relaxed),
                    w.total.load(Ordering::Relaxed),
                );
                if let Err(e) = cb.call1(args) {
                    w.cancel.store(true, Ordering::Relaxed);
                    interrupted = Some(e);
                }
            }
            if finished {
                break;
            }
        }
        let joined = py.detach(|| handle.join());
        let result = match joined {
            Ok(r) => r,
            Err(_) => Err(crate::errors::PachaError::new_err(
                "the engine panicked (a bug in pacha; please report it with the input that caused it)",
            )),
        };
        match interrupted {
            Some(e) => Err(e),
            None => result,
        }
    })
}
