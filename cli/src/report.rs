//! The evaluation report as one self-contained HTML page: summary and metrics tables and inline SVG
//! plots drawn with `plotters` (DET curve, genuine/impostor histograms per label, calibration check,
//! duplicate-cluster sizes). No external resources and no JavaScript.
//!
//! `plotters` is built without a font feature: its SVG backend then writes text as plain `<text>`
//! elements with a crude width estimate, which is all an SVG needs (the browser lays the text out).

use std::error::Error;
use std::fmt::Write as _;

use pacha_engine::eval::{EvalReport, Histogram as ScoreHistogram};
use plotters::coord::Shift;
use plotters::prelude::*;

/// Plot size in pixels.
const PLOT_SIZE: (u32, u32) = (760, 460);
/// Missed pairs listed in the page (the JSON report holds more).
const MISSED_SHOWN: usize = 100;
/// Genuine series colour.
const GENUINE: RGBColor = RGBColor(31, 119, 180);
/// Impostor series colour.
const IMPOSTOR: RGBColor = RGBColor(255, 127, 14);
/// Threshold / measured colour.
const MARK: RGBColor = RGBColor(214, 39, 40);

type DrawResult = Result<(), Box<dyn Error>>;
type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;

/// Renders the evaluation report as a single self-contained HTML page.
pub fn render_html(title: &str, summary: &[(String, String)], report: &EvalReport) -> String {
    let mut h = String::with_capacity(64 * 1024);
    let t = esc(title);
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>{t}</title>\n\
         <style>{CSS}</style>\n</head>\n<body>\n<h1>{t}</h1>\n"
    );

    h.push_str("<h2>Summary</h2>\n<table class=\"kv\">\n");
    for (k, v) in summary {
        let _ = writeln!(h, "<tr><th>{}</th><td>{}</td></tr>", esc(k), esc(v));
    }
    h.push_str("</table>\n");

    metrics_section(&mut h, report);

    h.push_str("<h2>Plots</h2>\n");
    figure(&mut h, &det_svg(report));
    let mut used_ids: Vec<String> = Vec::new();
    for hist in &report.histograms {
        let mut id = format!("hist-{}", id_part(&hist.label));
        if used_ids.contains(&id) {
            id = format!("{id}-{}", used_ids.len());
        }
        used_ids.push(id.clone());
        figure(&mut h, &histogram_svg(&id, hist));
    }
    figure(&mut h, &calibration_svg(report));
    figure(&mut h, &clusters_svg(report));

    missed_section(&mut h, report);
    h.push_str("</body>\n</html>\n");
    h
}

const CSS: &str = "body{font-family:sans-serif;margin:2em;color:#222;max-width:1100px}\
table{border-collapse:collapse;margin:.5em 0 1.5em}\
th,td{border:1px solid #bbb;padding:.25em .6em;text-align:left;vertical-align:top}\
th{background:#f0f0f0}td.num{text-align:right;font-variant-numeric:tabular-nums}\
figure{margin:1em 0 2em}svg{border:1px solid #ddd;background:#fff}\
.note{color:#666;font-size:.9em}";

/// Measured ÷ predicted FMR as a table cell: the ratio, its 95 % interval and the events behind it, or
/// "not counted" where the count cannot resolve the level.
fn ratio_cell(level: f64, ratio: Option<f64>, ci: Option<(f64, f64)>, events: u64) -> String {
    match (ratio, ci) {
        (Some(q), Some((lo, hi))) => format!(
            "{q:.2} [{:.2}, {:.2}] · {events} events",
            lo / level,
            hi / level
        ),
        _ => format!("not counted ({events} events)"),
    }
}

/// ` (design effect d)` where a count's events cluster on shared rows enough to say so.
fn clustered(design_effect: Option<f64>) -> String {
    match design_effect {
        Some(d) if d >= 1.05 => format!(" (design effect {d:.1})"),
        _ => String::new(),
    }
}

/// A tail check's cell: measured ÷ predicted, its 95 % interval (widened by the calibration count's spread
/// out of sample), the events and, where they cluster on shared rows, the design effect.
fn tail_cell(r: &pacha_engine::tail::TailCheckRow) -> String {
    match (r.ratio, r.ratio_ci) {
        (Some(q), Some((lo, hi))) => format!(
            "{q:.2} [{lo:.2}, {hi:.2}] · {} events{}",
            r.events,
            clustered(r.design_effect)
        ),
        _ => format!("not counted ({} events)", r.events),
    }
}

/// The exhaustive checks of the score models: per modality against every pair of a pool, and fused.
fn tails_section(h: &mut String, r: &EvalReport) {
    if !r.tail_checks.is_empty() {
        h.push_str(
            "<h3>Impostor tails: measured ÷ predicted FMR over every pair of a pool</h3>\n\
             <table id=\"tail-checks\">\n<tr><th>modality</th><th>pairs counted</th><th>FMR</th>\
             <th>model in use (fitted tail)</th><th>Gaussian alone</th></tr>\n",
        );
        for c in &r.tail_checks {
            for (m, g) in c.model.iter().zip(&c.gaussian) {
                let _ = writeln!(
                    h,
                    "<tr><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{:.0e}</td><td class=\"num\">{}</td><td class=\"num\">{}</td></tr>",
                    esc(&c.modality),
                    c.pairs,
                    m.level,
                    esc(&tail_cell(m)),
                    esc(&tail_cell(g)),
                );
            }
        }
        h.push_str("</table>\n");
        for c in &r.tail_checks {
            if let Some(below) = c.sampled_below {
                let _ = writeln!(
                    h,
                    "<p>{}: every pair at or above cosine {below:.4} was kept; below it a hashed sample of the \
                     pairs, weighted back (the count's memory bound).</p>",
                    esc(&c.modality)
                );
            }
        }
        if r.tail_checks.iter().any(|c| !c.bands.is_empty()) {
            h.push_str(
                "<h3>Impostor tails per quality band (pairs by their lower template quality)</h3>\n\
                 <table id=\"band-checks\">\n<tr><th>modality</th><th>band</th><th>pairs counted</th><th>FMR</th>\
                 <th>band model</th><th>pooled model</th></tr>\n",
            );
            for c in &r.tail_checks {
                for b in &c.bands {
                    for (m, p) in b.model.iter().zip(&b.pooled) {
                        let _ = writeln!(
                            h,
                            "<tr><td>{}</td><td>[{:.3}, {:.3})</td><td class=\"num\">{}</td><td class=\"num\">{:.0e}</td><td class=\"num\">{}</td><td class=\"num\">{}</td></tr>",
                            esc(&c.modality),
                            b.lo,
                            b.hi,
                            b.pairs,
                            m.level,
                            esc(&tail_cell(m)),
                            esc(&tail_cell(p)),
                        );
                    }
                }
            }
            h.push_str("</table>\n");
        }
    }
    if let Some(f) = &r.fused_count {
        let _ = writeln!(
            h,
            "<h3>Fused score: measured ÷ predicted FMR over all pairs of pools of up to {} rows</h3>\n\
             <table id=\"fused-count\">\n<tr><th>score</th><th>rows</th><th>pairs counted</th><th>predicted FMR</th>\
             <th>measured ÷ predicted</th></tr>",
            f.pool_rows
        );
        for (k, p) in f.points.iter().enumerate() {
            let rows = f.point_rows.get(k).copied().unwrap_or(f.pool_rows);
            let ratio = p.measured_fmr.map(|m| m / p.predicted_fmr);
            let _ = writeln!(
                h,
                "<tr><td class=\"num\">{:.0}</td><td class=\"num\">{rows}</td><td class=\"num\">{}</td>\
                 <td class=\"num\">{:.2e}</td><td class=\"num\">{}</td></tr>",
                p.threshold,
                p.impostor_samples,
                p.predicted_fmr,
                esc(&format!(
                    "{}{}",
                    ratio_cell(
                        p.predicted_fmr,
                        ratio,
                        p.measured_ci,
                        p.false_matches as u64
                    ),
                    clustered(p.design_effect)
                )),
            );
        }
        h.push_str("</table>\n");
    }
    if !r.dependence.is_empty() {
        h.push_str(
            "<h3>Modalities of the same impostor pair exceeding their tails together, against independence</h3>\n\
             <table id=\"dependence\">\n<tr><th>modalities</th><th>tail level each</th><th>pairs counted</th>\
             <th>together</th><th>independence predicts</th><th>ratio [95 % CI]</th></tr>\n",
        );
        for d in &r.dependence {
            let ratio = match (d.ratio, d.ratio_ci) {
                (Some(q), Some((lo, hi))) => format!("{q:.2} [{lo:.2}, {hi:.2}]"),
                _ => "under one expected".to_string(),
            };
            let _ = writeln!(
                h,
                "<tr><td>{}</td><td class=\"num\">{:.0e}</td><td class=\"num\">{}</td><td class=\"num\">{}</td>\
                 <td class=\"num\">{:.1}</td><td class=\"num\">{}</td></tr>",
                esc(&d.modalities.join(" + ")),
                d.level,
                d.pairs,
                d.joint,
                d.expected,
                esc(&ratio),
            );
        }
        h.push_str("</table>\n");
    }
}

/// The metrics tables: counts, recall/precision, FNIR at FPIR, notes, cluster sizes.
fn metrics_section(h: &mut String, r: &EvalReport) {
    h.push_str("<h2>Metrics</h2>\n<table class=\"kv\" id=\"metrics\">\n");
    let rows: [(&str, String); 14] = [
        ("records", r.records.to_string()),
        ("mated records", r.mated_records.to_string()),
        ("non-mated records", r.non_mated_records.to_string()),
        (
            "truth pairs (transitive closure)",
            r.truth_pairs.to_string(),
        ),
        ("decision threshold", num(r.threshold, 3)),
        ("hits at threshold", r.hits.to_string()),
        ("true hits", r.true_hits.to_string()),
        ("false hits", r.false_hits.to_string()),
        ("pair recall", num(r.pair_recall, 6)),
        ("pair precision", num(r.pair_precision, 6)),
        ("missed truth pairs", r.missed_total.to_string()),
        (
            "mated records with no true pair reported",
            r.unreported_mates.to_string(),
        ),
        ("scored pairs ignored", r.ignored_pairs.to_string()),
        ("truth pairs ignored", r.ignored_truth.to_string()),
    ];
    for (k, v) in rows {
        let _ = writeln!(
            h,
            "<tr><th>{}</th><td class=\"num\">{}</td></tr>",
            esc(k),
            esc(&v)
        );
    }
    h.push_str("</table>\n");

    h.push_str(
        "<h3>FNIR at FPIR</h3>\n<table id=\"fnir-at-fpir\">\n<tr><th>target FPIR</th><th>FNIR</th>\
         <th>threshold</th><th>achieved FPIR</th><th>note</th></tr>\n",
    );
    for f in &r.fnir_at_fpir {
        let opt = |v: Option<f64>, d: usize| v.map_or_else(|| "n/a".to_string(), |x| num(x, d));
        let _ = writeln!(
            h,
            "<tr><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td>\
             <td class=\"num\">{}</td><td>{}</td></tr>",
            esc(&sci(f.target_fpir)),
            esc(&opt(f.fnir, 6)),
            esc(&opt(f.threshold, 3)),
            esc(&opt(f.achieved_fpir, 6)),
            esc(&match (f.incomplete, f.note.as_deref()) {
                (true, Some(n)) => format!("incomplete pairs (see notes); {n}"),
                (true, None) => "incomplete pairs (see notes)".to_string(),
                (false, n) => n.unwrap_or("").to_string(),
            })
        );
    }
    h.push_str("</table>\n");

    if let Some(a) = &r.run_audit {
        h.push_str("<h3>Completeness audit</h3>\n<table class=\"kv\" id=\"audit\">\n");
        let fig = |f: &pacha_engine::audit::RecallFigure| {
            format!(
                "{} of {} ({:.5}; 95 % CI {:.5}–{:.5})",
                f.found, f.pairs, f.recall, f.lower, f.upper
            )
        };
        let mut rows = vec![
            (
                "verdict",
                format!(
                    "{} — lower bound {:.5} vs min recall {}",
                    if a.passed { "PROVEN" } else { "NOT PROVEN" },
                    a.lower_bound,
                    a.min_recall
                ),
            ),
            ("evidence", a.evidence.clone()),
            (
                "sampled probes",
                format!("{} of {}", a.sampled_probes, a.probe_rows),
            ),
            ("pairs at or above the threshold", fig(&a.contract)),
            ("boundary pairs", fig(&a.boundary_pooled)),
        ];
        if let Some(b) = &a.below_threshold {
            rows.push(("pairs between floor and threshold", fig(b)));
        }
        for (k, v) in rows {
            let _ = writeln!(h, "<tr><th>{}</th><td>{}</td></tr>", esc(k), esc(&v));
        }
        h.push_str("</table>\n");
    }

    tails_section(h, r);

    if !r.notes.is_empty() {
        h.push_str("<h3>Notes</h3>\n<ul>\n");
        for n in &r.notes {
            let _ = writeln!(h, "<li>{}</li>", esc(n));
        }
        h.push_str("</ul>\n");
    }

    if !r.cluster_sizes.is_empty() {
        h.push_str(
            "<h3>Duplicate clusters at the threshold</h3>\n<table id=\"cluster-sizes\">\n\
             <tr><th>cluster size</th><th>clusters</th><th>records</th></tr>\n",
        );
        for &(size, count) in &r.cluster_sizes {
            let _ = writeln!(
                h,
                "<tr><td class=\"num\">{size}</td><td class=\"num\">{count}</td>\
                 <td class=\"num\">{}</td></tr>",
                size.saturating_mul(count)
            );
        }
        h.push_str("</table>\n");
    }
}

/// The first missed truth pairs.
fn missed_section(h: &mut String, r: &EvalReport) {
    let _ = writeln!(h, "<h2>Missed truth pairs ({})</h2>", r.missed_total);
    if r.missed_pairs.is_empty() {
        h.push_str("<p>None.</p>\n");
        return;
    }
    let shown = r.missed_pairs.len().min(MISSED_SHOWN);
    let _ = writeln!(
        h,
        "<p class=\"note\">First {shown} of {} (the JSON report lists up to {}).</p>",
        r.missed_total,
        r.missed_pairs.len()
    );
    h.push_str("<table id=\"missed\">\n<tr><th>subject A</th><th>subject B</th></tr>\n");
    for (a, b) in r.missed_pairs.iter().take(shown) {
        let _ = writeln!(h, "<tr><td>{}</td><td>{}</td></tr>", esc(a), esc(b));
    }
    h.push_str("</table>\n");
}

fn figure(h: &mut String, svg: &str) {
    h.push_str("<figure>\n");
    h.push_str(svg);
    h.push_str("\n</figure>\n");
}

/// HTML/XML escaping for text and attribute values.
fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            _ => o.push(c),
        }
    }
    o
}

/// A label reduced to characters safe in an element id.
fn id_part(label: &str) -> String {
    let s: String = label
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .collect();
    if s.is_empty() { "unnamed".into() } else { s }
}

/// Fixed-point number, "n/a" when not finite.
fn num(v: f64, decimals: usize) -> String {
    if v.is_finite() {
        format!("{v:.decimals$}")
    } else {
        "n/a".into()
    }
}

/// Short scientific notation for rates on log axes.
fn sci(v: f64) -> String {
    if !v.is_finite() || v <= 0.0 {
        return "n/a".into();
    }
    if (1e-2..=1.0).contains(&v) {
        let s = format!("{v:.3}");
        return s.trim_end_matches('0').trim_end_matches('.').to_string();
    }
    format!("{v:.0e}")
}

/// The power of ten at or below `v` (`v > 0`).
fn decade_floor(v: f64) -> f64 {
    10f64.powf(v.log10().floor())
}

/// Adds `id`, `role` and a `<title>` to the root element of a plotters SVG string.
fn finish_svg(id: &str, title: &str, svg: &str) -> String {
    let head = format!("<svg id=\"{}\" role=\"img\"", esc(id));
    let title = format!("<title>{}</title>", esc(title));
    match svg
        .strip_prefix("<svg")
        .and_then(|rest| rest.find('>').map(|p| (rest, p)))
    {
        Some((rest, p)) => format!("{head}{}>{title}{}", &rest[..p], &rest[p + 1..]),
        None => message_svg(id, &title, "plot output was not SVG"),
    }
}

/// A plain SVG box holding a message, for plots without data or whose drawing failed.
fn message_svg(id: &str, title: &str, message: &str) -> String {
    let (w, h) = PLOT_SIZE;
    format!(
        "<svg id=\"{id}\" role=\"img\" xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" \
         viewBox=\"0 0 {w} {h}\"><title>{title}</title>\
         <text x=\"{}\" y=\"30\" text-anchor=\"middle\" font-family=\"sans-serif\" font-size=\"16\">{title}</text>\
         <text x=\"{}\" y=\"{}\" text-anchor=\"middle\" font-family=\"sans-serif\" font-size=\"14\" fill=\"#666\">{}</text></svg>",
        w / 2,
        w / 2,
        h / 2,
        esc(message),
        id = esc(id),
        title = esc(title),
    )
}

/// Draws one plot into an SVG string; a failure becomes a message box, never a panic.
fn plot_svg(id: &str, title: &str, draw: impl FnOnce(&Area<'_>) -> DrawResult) -> String {
    let mut buf = String::new();
    let result = {
        let root = SVGBackend::with_string(&mut buf, PLOT_SIZE).into_drawing_area();
        root.fill(&WHITE)
            .map_err(Into::into)
            .and_then(|()| draw(&root))
            .and_then(|()| root.present().map_err(Into::into))
    };
    match result {
        Ok(()) => finish_svg(id, title, &buf),
        Err(e) => message_svg(id, title, &format!("plot failed: {e}")),
    }
}

/// DET curve: FNIR against FPIR on log-log axes, with the FNIR-at-FPIR operating points.
fn det_svg(r: &EvalReport) -> String {
    const TITLE: &str = "DET curve (FNIR vs FPIR, log-log)";
    let pts: Vec<(f64, f64)> = r
        .det
        .iter()
        .filter(|d| d.fpir > 0.0 && d.fnir > 0.0 && d.fpir.is_finite() && d.fnir.is_finite())
        .map(|d| (d.fpir, d.fnir))
        .collect();
    let ops: Vec<(f64, f64, f64)> = r
        .fnir_at_fpir
        .iter()
        .filter_map(|f| Some((f.target_fpir, f.achieved_fpir?, f.fnir?)))
        .filter(|&(_, a, f)| a > 0.0 && f > 0.0)
        .collect();
    if pts.is_empty() {
        let why = if r.det.is_empty() {
            "no DET data (needs both mated and non-mated probes)"
        } else {
            "FPIR or FNIR is zero at every threshold: nothing to show on log axes"
        };
        return message_svg("det", TITLE, why);
    }
    let min_x = pts
        .iter()
        .map(|p| p.0)
        .chain(ops.iter().map(|o| o.1))
        .fold(1.0, f64::min);
    let min_y = pts
        .iter()
        .map(|p| p.1)
        .chain(ops.iter().map(|o| o.2))
        .fold(1.0, f64::min);
    // A little below the decade so that its tick label is drawn.
    let x0 = decade_floor(min_x).min(0.1) * 0.8;
    let y0 = decade_floor(min_y).min(0.1) * 0.8;
    plot_svg("det", TITLE, |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(TITLE, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d((x0..1.0).log_scale(), (y0..1.0).log_scale())?;
        chart
            .configure_mesh()
            .x_desc("FPIR")
            .y_desc("FNIR")
            .x_label_formatter(&|v| sci(*v))
            .y_label_formatter(&|v| sci(*v))
            .draw()?;
        chart
            .draw_series(LineSeries::new(
                pts.iter().copied(),
                GENUINE.stroke_width(2),
            ))?
            .label("DET (points at FPIR or FNIR = 0 are off the axes)")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], GENUINE.stroke_width(2)));
        chart
            .draw_series(
                ops.iter()
                    .map(|&(_, a, f)| Circle::new((a, f), 5, MARK.filled())),
            )?
            .label("FNIR at FPIR 1e-2 / 1e-3 / 1e-4")
            .legend(|(x, y)| Circle::new((x + 8, y), 4, MARK.filled()));
        chart.draw_series(ops.iter().map(|&(t, a, f)| {
            Text::new(
                format!("FPIR {}: FNIR {}", sci(t), num(f, 4)),
                (a, f),
                ("sans-serif", 12).into_font(),
            )
        }))?;
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()?;
        Ok(())
    })
}

/// Genuine and impostor score distributions of one label (shares of each class per bin).
fn histogram_svg(id: &str, hist: &ScoreHistogram) -> String {
    let title = format!("Genuine / impostor scores: {}", hist.label);
    let bins = hist.edges.len().saturating_sub(1);
    if bins == 0 || hist.genuine.len() != bins || hist.impostor.len() != bins {
        return message_svg(id, &title, "no finite score samples for this label");
    }
    let gt: usize = hist.genuine.iter().sum();
    let it: usize = hist.impostor.iter().sum();
    let share = |c: usize, total: usize| {
        if total == 0 {
            0.0
        } else {
            c as f64 / total as f64
        }
    };
    let ymax = (0..bins)
        .map(|i| share(hist.genuine[i], gt).max(share(hist.impostor[i], it)))
        .fold(0.0, f64::max)
        .max(1e-9)
        * 1.1;
    let (lo, hi) = (hist.edges[0], hist.edges[bins]);
    if !(lo.is_finite() && hi.is_finite() && lo < hi) {
        return message_svg(id, &title, "bin edges are not a finite increasing range");
    }
    let scale = if hist.threshold.is_some() {
        "calibrated score"
    } else {
        "score"
    };
    plot_svg(id, &title, |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(&title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(lo..hi, 0.0..ymax)?;
        chart
            .configure_mesh()
            .x_desc(scale)
            .y_desc("share of pairs per bin")
            .draw()?;
        let side = |counts: &[usize], total: usize, colour: RGBColor| {
            (0..bins)
                .filter(|&i| counts[i] > 0)
                .map(|i| {
                    Rectangle::new(
                        [
                            (hist.edges[i], 0.0),
                            (hist.edges[i + 1], share(counts[i], total)),
                        ],
                        colour.mix(0.5).filled(),
                    )
                })
                .collect::<Vec<_>>()
        };
        chart
            .draw_series(side(&hist.impostor, it, IMPOSTOR))?
            .label(format!("impostor (n = {it})"))
            .legend(|(x, y)| {
                Rectangle::new([(x, y - 5), (x + 12, y + 5)], IMPOSTOR.mix(0.5).filled())
            });
        chart
            .draw_series(side(&hist.genuine, gt, GENUINE))?
            .label(format!("genuine (n = {gt})"))
            .legend(|(x, y)| {
                Rectangle::new([(x, y - 5), (x + 12, y + 5)], GENUINE.mix(0.5).filled())
            });
        if let Some(t) = hist.threshold.filter(|t| (lo..=hi).contains(t)) {
            chart
                .draw_series(LineSeries::new([(t, 0.0), (t, ymax)], MARK.stroke_width(2)))?
                .label(format!("threshold {}", num(t, 2)))
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], MARK.stroke_width(2)));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()?;
        Ok(())
    })
}

/// Predicted and measured false-match rate against the threshold (log FMR axis).
fn calibration_svg(r: &EvalReport) -> String {
    const TITLE: &str = "Calibration: predicted vs measured FMR";
    let usable: Vec<_> = r
        .calibration
        .iter()
        .filter(|c| c.threshold.is_finite())
        .collect();
    let predicted: Vec<(f64, f64)> = usable
        .iter()
        .filter(|c| c.predicted_fmr > 0.0 && c.predicted_fmr.is_finite())
        .map(|c| (c.threshold, c.predicted_fmr))
        .collect();
    let measured: Vec<(f64, f64)> = usable
        .iter()
        .filter_map(|c| Some((c.threshold, c.measured_fmr?)))
        .filter(|p| p.1 > 0.0)
        .collect();
    // Zero false matches among n samples: drawn hollow at 1/n (the measurement's resolution).
    let zeros: Vec<(f64, f64)> = usable
        .iter()
        .filter(|c| c.measured_fmr == Some(0.0) && c.impostor_samples > 0)
        .map(|c| (c.threshold, 1.0 / c.impostor_samples as f64))
        .collect();
    if predicted.is_empty() && measured.is_empty() && zeros.is_empty() {
        return message_svg(
            "calibration",
            TITLE,
            "no calibration points (or no impostor samples)",
        );
    }
    let all = || predicted.iter().chain(measured.iter()).chain(zeros.iter());
    let (mut tx0, mut tx1) = all().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| {
        (a.min(p.0), b.max(p.0))
    });
    if tx0 == tx1 {
        tx0 -= 1.0;
        tx1 += 1.0;
    }
    let pad = (tx1 - tx0) * 0.03;
    let y0 = decade_floor(all().map(|p| p.1).fold(1.0, f64::min)).min(0.1) * 0.8;
    let samples = usable.first().map_or(0, |c| c.impostor_samples);
    plot_svg("calibration", TITLE, |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(TITLE, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d((tx0 - pad)..(tx1 + pad), (y0..1.0).log_scale())?;
        chart
            .configure_mesh()
            .x_desc("threshold (calibrated score)")
            .y_desc("false-match rate")
            .y_label_formatter(&|v| sci(*v))
            .draw()?;
        if !predicted.is_empty() {
            chart
                .draw_series(LineSeries::new(
                    predicted.iter().copied(),
                    GENUINE.stroke_width(2),
                ))?
                .label("predicted by the score model")
                .legend(|(x, y)| {
                    PathElement::new(vec![(x, y), (x + 16, y)], GENUINE.stroke_width(2))
                });
        }
        // 95 % intervals of the measured FMRs (clipped to the plot), as vertical bars.
        let bars: Vec<(f64, f64, f64)> = usable
            .iter()
            .filter_map(|c| {
                let (lo, hi) = c.measured_ci?;
                Some((c.threshold, lo.max(y0), hi.clamp(y0, 1.0)))
            })
            .filter(|b| b.2 > b.1)
            .collect();
        if !bars.is_empty() {
            chart
                .draw_series(bars.iter().map(|&(x, lo, hi)| {
                    PathElement::new(vec![(x, lo), (x, hi)], MARK.stroke_width(1))
                }))?
                .label("95 % interval of the measurement")
                .legend(|(x, y)| PathElement::new(vec![(x + 8, y - 6), (x + 8, y + 6)], MARK));
        }
        if !measured.is_empty() {
            chart
                .draw_series(measured.iter().map(|&p| Circle::new(p, 4, MARK.filled())))?
                .label(format!("measured on {samples} impostor samples"))
                .legend(|(x, y)| Circle::new((x + 8, y), 4, MARK.filled()));
        }
        if !zeros.is_empty() {
            chart
                .draw_series(
                    zeros
                        .iter()
                        .map(|&p| Circle::new(p, 4, MARK.stroke_width(1))),
                )?
                .label("no false match: drawn at 1/n")
                .legend(|(x, y)| Circle::new((x + 8, y), 4, MARK.stroke_width(1)));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()?;
        Ok(())
    })
}

/// Number of duplicate clusters of each size at the threshold.
fn clusters_svg(r: &EvalReport) -> String {
    const TITLE: &str = "Duplicate clusters by size (hits at the threshold)";
    let data: Vec<(usize, usize)> = r
        .cluster_sizes
        .iter()
        .copied()
        .filter(|c| c.1 > 0)
        .collect();
    if data.is_empty() {
        return message_svg("clusters", TITLE, "no hits at the threshold");
    }
    let k = data.len();
    let ymax = data.iter().map(|c| c.1).max().unwrap_or(1) as f64 * 1.15;
    plot_svg("clusters", TITLE, |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(TITLE, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(-0.5..(k as f64 - 0.5), 0.0..ymax)?;
        let label = |v: &f64| {
            let i = v.round();
            if (v - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < k {
                data[i as usize].0.to_string()
            } else {
                String::new()
            }
        };
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(k.min(25) + 1)
            .x_label_formatter(&label)
            .x_desc("cluster size (records)")
            .y_desc("clusters")
            .draw()?;
        chart.draw_series(data.iter().enumerate().map(|(i, &(_, c))| {
            Rectangle::new(
                [(i as f64 - 0.35, 0.0), (i as f64 + 0.35, c as f64)],
                GENUINE.filled(),
            )
        }))?;
        if k <= 25 {
            chart.draw_series(data.iter().enumerate().map(|(i, &(_, c))| {
                Text::new(
                    c.to_string(),
                    (i as f64 - 0.2, c as f64 + ymax * 0.05),
                    ("sans-serif", 12).into_font(),
                )
            }))?;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use pacha_engine::eval::{CalibrationPoint, DetPoint, FnirAtFpir};

    fn sample() -> EvalReport {
        let det: Vec<DetPoint> = (0..200)
            .map(|i| {
                let t = i as f64 * 0.5;
                DetPoint {
                    threshold: t,
                    fpir: (-t / 10.0).exp().max(0.0),
                    fnir: (1.0 - (-t / 40.0).exp()).max(0.0),
                    incomplete: t < 40.0,
                }
            })
            .collect();
        let edges: Vec<f64> = (0..=50).map(|i| i as f64 * 2.0).collect();
        let hist = |label: &str, threshold| ScoreHistogram {
            label: label.into(),
            edges: edges.clone(),
            genuine: (0..50).map(|i| if i > 25 { 10 + i } else { 0 }).collect(),
            impostor: (0..50).map(|i| if i < 20 { 100 - i } else { 0 }).collect(),
            genuine_non_finite: 0,
            impostor_non_finite: 0,
            threshold,
        };
        EvalReport {
            records: 1000,
            mated_records: 200,
            non_mated_records: 800,
            truth_pairs: 100,
            threshold: 40.0,
            hits: 95,
            true_hits: 90,
            false_hits: 5,
            pair_recall: 0.9,
            pair_precision: 90.0 / 95.0,
            missed_pairs: vec![
                ("<script>alert(1)</script>".into(), "b&b".into()),
                ("c\"q".into(), "d'q".into()),
            ],
            missed_total: 10,
            unreported_mates: 3,
            fnir_at_fpir: vec![
                FnirAtFpir {
                    target_fpir: 1e-2,
                    fnir: Some(0.12),
                    threshold: Some(46.1),
                    achieved_fpir: Some(0.01),
                    note: None,
                    incomplete: true,
                },
                FnirAtFpir {
                    target_fpir: 1e-3,
                    fnir: None,
                    threshold: None,
                    achieved_fpir: None,
                    note: Some("needs at least 1000 non-mated probes to estimate, have 800".into()),
                    incomplete: false,
                },
            ],
            det,
            histograms: vec![
                hist("face", None),
                hist("fused", Some(40.0)),
                hist("<b>x</b>", None),
            ],
            calibration: (0..8)
                .map(|i| CalibrationPoint {
                    threshold: 10.0 * i as f64,
                    predicted_fmr: 10f64.powi(-i),
                    measured_fmr: Some(if i < 5 { 1.3 * 10f64.powi(-i) } else { 0.0 }),
                    false_matches: if i < 5 { 10 } else { 0 },
                    impostor_samples: 100_000,
                    measured_ci: Some(pacha_engine::audit::clopper_pearson(
                        if i < 5 { 10 } else { 0 },
                        100_000,
                        0.95,
                    )),
                    design_effect: None,
                })
                .collect(),
            cluster_sizes: vec![(2, 80), (3, 4), (7, 1)],
            ignored_pairs: 0,
            ignored_truth: 0,
            notes: vec!["1 scored pair(s) ignored <odd>".into()],
            run_audit: Some(pacha_engine::audit::Audit {
                sampled_probes: 1000,
                probe_rows: 100_000,
                seed: 7,
                threshold: 40.0,
                floor: 30.0,
                contract: pacha_engine::audit::RecallFigure::new(12, 12),
                below_threshold: Some(pacha_engine::audit::RecallFigure::new(40, 41)),
                boundary: Vec::new(),
                boundary_pooled: pacha_engine::audit::RecallFigure::new(5000, 5000),
                synthetic: Vec::new(),
                lower_bound: 0.99926,
                evidence: "boundary pairs <all found>".into(),
                min_recall: 0.999,
                passed: true,
                missed: Vec::new(),
                seconds: 0.5,
            }),
            tail_checks: Vec::new(),
            fused_count: None,
            dependence: vec![pacha_engine::eval::CoExceedance {
                modalities: vec!["face".into(), "finger2".into()],
                level: 1e-3,
                cosines: vec![0.41, 0.37],
                marginal: vec![200_000, 200_000],
                pairs: 200_000_000,
                joint: 230,
                expected: 200.0,
                ratio: Some(1.15),
                ratio_ci: Some((1.0, 1.31)),
            }],
        }
    }

    fn svg_ids(html: &str) -> Vec<String> {
        html.match_indices("<svg id=\"")
            .map(|(i, m)| {
                let rest = &html[i + m.len()..];
                rest[..rest.find('"').unwrap_or(0)].to_string()
            })
            .collect()
    }

    #[test]
    fn html_has_every_plot_with_id_and_title() {
        let summary = vec![("stage: dedup".to_string(), "12.5 s".to_string())];
        let html = render_html("Run <1>", &summary, &sample());
        let ids = svg_ids(&html);
        assert_eq!(
            ids,
            vec![
                "det",
                "hist-face",
                "hist-fused",
                "hist--b-x--b-",
                "calibration",
                "clusters"
            ]
        );
        assert_eq!(
            html.matches("<svg").count(),
            ids.len(),
            "one root <svg> per plot"
        );
        assert_eq!(
            html.matches("</svg>").count(),
            ids.len(),
            "balanced <svg>/</svg>"
        );
        // Each svg opens with its <title>.
        for (i, _) in html.match_indices("<svg id=") {
            let open_end = i + html[i..].find('>').unwrap_or(0);
            assert!(
                html[open_end + 1..].starts_with("<title>"),
                "svg at {i} lacks a title"
            );
        }
        assert!(html.contains("<table id=\"dependence\">"));
        assert!(html.contains("<td>face + finger2</td>") && html.contains("1.15 [1.00, 1.31]"));
        assert!(html.starts_with("<!DOCTYPE html>"));
        assert!(html.trim_end().ends_with("</html>"));
        assert!(
            !html.contains("http://") || !html.contains("src=\"http"),
            "no external resources"
        );
        assert!(
            !html.contains("<script"),
            "no script, not even from subject IDs"
        );
        // Plots actually drew something: the DET is a polyline and the histograms have rectangles.
        let det = &html[html.find("<svg id=\"det\"").unwrap_or(0)..];
        let det = &det[..det.find("</svg>").unwrap_or(0)];
        assert!(det.contains("<polyline"), "DET curve missing");
        assert!(
            det.contains("FPIR") && det.contains("FNIR"),
            "axis labels missing"
        );
        let fused = &html[html.find("<svg id=\"hist-fused\"").unwrap_or(0)..];
        let fused = &fused[..fused.find("</svg>").unwrap_or(0)];
        assert!(
            fused.matches("<rect").count() > 20,
            "histogram bars missing"
        );
        assert!(
            fused.contains("threshold 40.00"),
            "threshold line legend missing"
        );
    }

    #[test]
    fn html_escapes_subjects_labels_and_summary() {
        let summary = vec![("a<b".to_string(), "x & \"y\"".to_string())];
        let html = render_html("T & <T>", &summary, &sample());
        assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        assert!(html.contains("b&amp;b"));
        assert!(html.contains("c&quot;q") && html.contains("d&#39;q"));
        assert!(html.contains("<title>T &amp; &lt;T&gt;</title>"));
        assert!(html.contains("<th>a&lt;b</th><td>x &amp; &quot;y&quot;</td>"));
        assert!(html.contains("&lt;odd&gt;"));
        // The odd label is escaped in its title and not present raw anywhere.
        assert!(html.contains("<title>Genuine / impostor scores: &lt;b&gt;x&lt;/b&gt;</title>"));
        assert!(!html.contains("<b>x</b>"));
    }

    #[test]
    fn the_run_audit_and_incomplete_figures_are_shown() {
        let html = render_html("t", &[], &sample());
        let audit = &html[html.find("id=\"audit\"").expect("audit table")..];
        assert!(audit.contains("PROVEN — lower bound 0.99926"));
        assert!(audit.contains("boundary pairs &lt;all found&gt;"));
        assert!(audit.contains("40 of 41"));
        assert!(html.contains("incomplete pairs (see notes)"));
        assert!(html.contains("95 % interval of the measurement"));
        let mut r = sample();
        r.run_audit = None;
        assert!(!render_html("t", &[], &r).contains("id=\"audit\""));
    }

    #[test]
    fn metrics_table_shows_values_and_unreachable_reason() {
        let html = render_html("t", &[], &sample());
        assert!(html.contains("<th>pair recall</th><td class=\"num\">0.900000</td>"));
        assert!(html.contains("<th>false hits</th><td class=\"num\">5</td>"));
        assert!(html.contains("<td class=\"num\">0.120000</td>"));
        assert!(html.contains("needs at least 1000 non-mated probes"));
        assert!(
            html.contains(
                "<td class=\"num\">7</td><td class=\"num\">1</td><td class=\"num\">7</td>"
            )
        );
    }

    #[test]
    fn empty_report_still_renders_every_plot_as_a_message() {
        let mut r = sample();
        r.det.clear();
        r.calibration.clear();
        r.cluster_sizes.clear();
        r.histograms = vec![ScoreHistogram {
            label: "face".into(),
            edges: vec![],
            genuine: vec![],
            impostor: vec![],
            genuine_non_finite: 2,
            impostor_non_finite: 0,
            threshold: None,
        }];
        r.pair_precision = f64::NAN;
        let html = render_html("empty", &[], &r);
        assert_eq!(
            svg_ids(&html),
            vec!["det", "hist-face", "calibration", "clusters"]
        );
        assert_eq!(html.matches("<svg").count(), html.matches("</svg>").count());
        assert!(html.contains("no DET data"));
        assert!(html.contains("no hits at the threshold"));
        assert!(html.contains("<th>pair precision</th><td class=\"num\">n/a</td>"));
    }
}
