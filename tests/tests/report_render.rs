//! Renders a real evaluation report (`pacha_engine::eval::evaluate` on a small synthetic population,
//! then the CLI's `render_html`, compiled in with `#[path]`) and checks it in headless Chromium: the
//! parsed DOM holds every plot's `<svg>` and the screenshot is clearly not a blank page.
//! Skips, saying so, when Chromium is not installed.

// Test helpers outside #[test] functions: a failed expectation is a failed test.
#![allow(clippy::expect_used)]

#[path = "../../cli/src/report.rs"]
mod report;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use pacha_engine::eval::{EvalInput, EvalReport, ScoredPair, evaluate};

const WINDOW: (u32, u32) = (1280, 2400);

/// `/usr/bin/chromium`, else `chromium` or `chromium-browser` on PATH.
fn chromium() -> Option<PathBuf> {
    let fixed = Path::new("/usr/bin/chromium");
    if fixed.is_file() {
        return Some(fixed.to_path_buf());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .flat_map(|dir| ["chromium", "chromium-browser"].map(|n| dir.join(n)))
        .find(|p| p.is_file())
}

/// Runs headless Chromium with `extra` arguments on `url`; returns stdout. Kills it after two minutes.
fn run_chromium(bin: &Path, profile: &Path, extra: &[String], url: &str) -> String {
    let mut child = Command::new(bin)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(extra)
        .arg(url)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start chromium");
    let mut stdout = child.stdout.take().expect("chromium stdout");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut stdout, &mut s).map(|_| s)
    });
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("wait for chromium") {
            assert!(status.success(), "chromium {extra:?} failed: {status}");
            break;
        }
        if start.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium {extra:?} did not finish within 120 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    reader
        .join()
        .expect("reader thread")
        .expect("read chromium stdout")
}

/// Screenshot of `html_path` at the test window size; returns the PNG bytes.
fn screenshot(bin: &Path, dir: &Path, html_path: &Path, name: &str) -> Vec<u8> {
    let png = dir.join(name);
    let profile = dir.join(format!("profile-{name}"));
    run_chromium(
        bin,
        &profile,
        &[
            format!("--screenshot={}", png.display()),
            format!("--window-size={},{}", WINDOW.0, WINDOW.1),
        ],
        &format!("file://{}", html_path.display()),
    );
    std::fs::read(&png).unwrap_or_else(|e| panic!("no screenshot {}: {e}", png.display()))
}

/// Width and height from a PNG's IHDR chunk, after checking the signature.
fn png_size(png: &[u8]) -> (u32, u32) {
    assert!(png.len() > 24, "PNG too short: {} bytes", png.len());
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "not a PNG");
    assert_eq!(&png[12..16], b"IHDR", "PNG without IHDR first");
    let be = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    (be(&png[16..20]), be(&png[20..24]))
}

/// A small population: 300 people, every 3rd with a second record, every 10th with a third; scores
/// from a fixed pseudo-random sequence so the run is reproducible.
fn synthetic_report() -> EvalReport {
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut rnd = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 11) as f64 / (1u64 << 53) as f64
    };
    let mut subjects = Vec::new();
    let mut truth = Vec::new();
    let mut pairs = Vec::new();
    for p in 0..300 {
        let k = if p % 10 == 0 {
            3
        } else if p % 3 == 0 {
            2
        } else {
            1
        };
        let ids: Vec<String> = (0..k).map(|j| format!("P{p:03}-{j}")).collect();
        for a in 0..k {
            for b in a + 1..k {
                truth.push((ids[a].clone(), ids[b].clone()));
                pairs.push(ScoredPair {
                    a: ids[a].clone(),
                    b: ids[b].clone(),
                    score: 20.0 + 50.0 * rnd(),
                });
            }
        }
        subjects.extend(ids);
    }
    let n = subjects.len();
    for _ in 0..3000 {
        let (a, b) = ((rnd() * n as f64) as usize, (rnd() * n as f64) as usize);
        pairs.push(ScoredPair {
            a: subjects[a].clone(),
            b: subjects[b].clone(),
            score: -10.0 * rnd().max(1e-9).log10(),
        });
    }
    let genuine = vec![
        (
            "face".to_string(),
            (0..2000).map(|_| 0.5 + 0.4 * rnd()).collect::<Vec<f64>>(),
        ),
        (
            "fused".to_string(),
            (0..2000).map(|_| 20.0 + 50.0 * rnd()).collect(),
        ),
    ];
    let impostor = vec![
        (
            "face".to_string(),
            (0..5000).map(|_| 0.4 * rnd() - 0.1).collect::<Vec<f64>>(),
        ),
        (
            "fused".to_string(),
            (0..5000).map(|_| -10.0 * rnd().max(1e-9).log10()).collect(),
        ),
    ];
    let impostor_fused: Vec<f64> = (0..20_000)
        .map(|_| -10.0 * rnd().max(1e-9).log10())
        .collect();
    let predicted: Vec<(f64, f64)> = (1..=6)
        .map(|i| (7.0 * i as f64, 10f64.powf(-0.7 * i as f64)))
        .collect();
    evaluate(&EvalInput {
        subjects: &subjects,
        pairs: &pairs,
        truth: &truth,
        threshold: 30.0,
        genuine: &genuine,
        impostor: &impostor,
        predicted_fmr: &predicted,
        impostor_fused: &impostor_fused,
    })
}

#[test]
fn report_renders_in_headless_chromium() {
    let Some(bin) = chromium() else {
        pacha_tests::cannot_run("chromium is not installed (run .ci/run to install it)");
        return;
    };
    let report = synthetic_report();
    assert!(report.true_hits > 0 && !report.det.is_empty() && !report.cluster_sizes.is_empty());
    let summary = vec![
        ("dedup time".to_string(), "1.0 s".to_string()),
        ("note".to_string(), "<not a tag> & co".to_string()),
    ];
    let html = report::render_html("pacha report render test", &summary, &report);

    let dir = tempfile::tempdir().expect("tempdir");
    let page = dir.path().join("report.html");
    std::fs::write(&page, &html).expect("write report");
    let blank = dir.path().join("blank.html");
    std::fs::write(&blank, "<!DOCTYPE html><html><body></body></html>").expect("write blank");

    // The DOM Chromium built: every plot is an <svg> element with its id and title.
    let dom = run_chromium(
        &bin,
        &dir.path().join("profile-dom"),
        &["--dump-dom".to_string()],
        &format!("file://{}", page.display()),
    );
    for id in ["det", "hist-face", "hist-fused", "calibration", "clusters"] {
        assert!(
            dom.contains(&format!("<svg id=\"{id}\"")),
            "DOM lacks svg#{id}"
        );
    }
    assert_eq!(dom.matches("<svg").count(), 5, "one svg per plot");
    assert_eq!(dom.matches("</svg>").count(), 5, "svg elements closed");
    assert!(dom.contains("<polyline"), "DET line missing from the DOM");
    assert!(
        dom.contains("&lt;not a tag&gt; &amp; co"),
        "summary text not escaped"
    );
    assert!(!dom.contains("<not a tag>"));

    // The screenshot: the right size, and far more detail than a blank page at the same size.
    let shot = screenshot(&bin, dir.path(), &page, "report.png");
    let empty = screenshot(&bin, dir.path(), &blank, "blank.png");
    assert_eq!(png_size(&shot), WINDOW);
    assert_eq!(png_size(&empty), WINDOW);
    assert!(
        shot.len() > 4 * empty.len(),
        "report screenshot ({} bytes) is not much larger than a blank page's ({} bytes)",
        shot.len(),
        empty.len()
    );
}
