//! Terminal output: progress bars (only on a terminal, never with `--quiet` or `--json`), and printing.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::time::Duration;

/// How the command talks to its user.
#[derive(Clone, Copy, Debug)]
pub struct Ui {
    /// Machine-readable output on stdout.
    pub json: bool,
    /// No progress bars and no informational lines.
    pub quiet: bool,
    bars: bool,
}

impl Ui {
    /// Decides whether bars are drawn: only when stderr is a terminal and neither --quiet nor --json.
    pub fn new(json: bool, quiet: bool) -> Ui {
        Ui {
            json,
            quiet,
            bars: !quiet && !json && std::io::stderr().is_terminal(),
        }
    }

    /// A progress bar with rate and ETA, hidden when bars are off.
    pub fn bar(&self, len: u64, what: &str) -> ProgressBar {
        if !self.bars {
            return ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::hidden());
        }
        let pb = ProgressBar::new(len);
        let style = ProgressStyle::with_template(
            "{prefix:>12.cyan.bold} [{bar:32}] {human_pos}/{human_len} ({per_sec}, eta {eta})",
        )
        .map(|s| s.progress_chars("=> "))
        .unwrap_or_else(|_| ProgressStyle::default_bar());
        pb.set_style(style);
        pb.set_prefix(what.to_string());
        pb.enable_steady_tick(Duration::from_millis(200));
        pb
    }

    /// An informational line on stderr (suppressed by --quiet and --json, so stdout stays clean).
    pub fn info(&self, msg: impl AsRef<str>) {
        if !self.quiet && !self.json {
            #[allow(clippy::print_stderr)]
            {
                eprintln!("{}", msg.as_ref());
            }
        }
    }

    /// Prints a human result line on stdout (not in --json mode).
    pub fn out(&self, msg: impl AsRef<str>) {
        if !self.json {
            #[allow(clippy::print_stdout)]
            {
                println!("{}", msg.as_ref());
            }
        }
    }

    /// Prints a JSON value on stdout (in --json mode only).
    pub fn json_out(&self, v: &serde_json::Value) {
        if self.json {
            #[allow(clippy::print_stdout)]
            {
                println!("{v}");
            }
        }
    }
}
