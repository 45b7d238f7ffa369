//! The bar chart of cold-start latencies per function and mode (SVG, drawn by plotters).

use std::path::Path;

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::report::{spread_of, Sample};

/// Grouped bars: per function, the median latency of each of `kinds` (e.g. warm, File, Uffd,
/// REAP, REAP+), on a logarithmic axis (latencies span three orders of magnitude).
pub fn latency_chart(
    path: &Path,
    samples: &[Sample],
    functions: &[String],
    kinds: &[&str],
    title: &str,
) -> Result<(), String> {
    let err = |e: &dyn std::fmt::Display| format!("chart {}: {e}", path.display());
    let medians: Vec<Vec<Option<f64>>> = functions
        .iter()
        .map(|f| {
            kinds
                .iter()
                .map(|k| spread_of(samples, f, k, |s| s.latency_ms).map(|s| s.median))
                .collect()
        })
        .collect();
    let values: Vec<f64> = medians
        .iter()
        .flatten()
        .flatten()
        .copied()
        .filter(|v| *v > 0.0)
        .collect();
    if values.is_empty() {
        return Err(err(&"nothing to plot"));
    }
    let lo = values.iter().copied().fold(f64::INFINITY, f64::min) / 2.0;
    let hi = values.iter().copied().fold(0.0, f64::max) * 2.0;
    let n = functions.len();
    let root = SVGBackend::new(path, (160 * n.max(3) as u32 + 160, 620)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(80)
        .build_cartesian_2d(0f64..n as f64, (lo..hi).log_scale())
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_label_formatter(&|x| {
            functions
                .get(x.floor() as usize)
                .cloned()
                .unwrap_or_default()
        })
        .y_desc("latency (ms, log scale)")
        .draw()
        .map_err(|e| err(&e))?;
    // The function names under their groups of bars (the axis itself has no labels).
    let name_font =
        TextStyle::from(("sans-serif", 14).into_font()).pos(Pos::new(HPos::Center, VPos::Top));
    for (i, name) in functions.iter().enumerate() {
        let (px, py) = chart.backend_coord(&(i as f64 + 0.5, lo));
        root.draw(&Text::new(name.clone(), (px, py + 8), name_font.clone()))
            .map_err(|e| err(&e))?;
    }
    let width = 0.8 / kinds.len() as f64;
    for (k, kind) in kinds.iter().enumerate() {
        let colour = Palette99::pick(k).to_rgba();
        let bars = medians.iter().enumerate().filter_map(|(i, m)| {
            let v = m[k]?;
            let x0 = i as f64 + 0.1 + k as f64 * width;
            Some(Rectangle::new(
                [(x0, lo), (x0 + width * 0.9, v)],
                colour.filled(),
            ))
        });
        chart
            .draw_series(bars)
            .map_err(|e| err(&e))?
            .label(*kind)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], colour.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_one_bar_per_function_and_kind() {
        let s = |function: &str, kind: &str, latency_ms: f64| Sample {
            function: function.into(),
            kind: kind.into(),
            page_cache: "cold",
            run: 1,
            load_ms: 0.0,
            invoke_ms: latency_ms,
            latency_ms,
            faults_on_demand: 0,
            bytes_read: 0,
            ws_bytes: 0,
            vmm_rss_overhead_kib: 0,
        };
        let samples = vec![
            s("a", "File", 300.0),
            s("a", "REAP", 50.0),
            s("b", "File", 900.0),
        ];
        let path = std::env::temp_dir().join(format!("reapvm-chart-{}.svg", std::process::id()));
        latency_chart(
            &path,
            &samples,
            &["a".into(), "b".into()],
            &["File", "REAP"],
            "test chart",
        )
        .unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        // plotters puts a text element's content on a line of its own.
        let flat = svg.replace('\n', "");
        assert!(
            flat.contains(">test chart<") && flat.contains(">REAP<") && flat.contains(">b<"),
            "{svg}"
        );
        // Three bars, two legend swatches, plus the background and the legend box.
        assert!(svg.matches("<rect").count() >= 5, "{svg}");
    }
}
