//! `ember simulate --sweep --plot FILE.svg`: predicted samples/s and peak memory per rank
//! against the world size T, one line per replica count M (M = 1: full sharding), drawn with
//! `plotters`' SVG backend; a point out of memory is a cross, the machine's memory a dashed line.
use crate::simulate::SweepRow;
use plotters::prelude::*;
use std::collections::BTreeMap;
use std::path::Path;

const COLORS: [RGBColor; 8] = [BLACK, RED, BLUE, GREEN, MAGENTA, CYAN, RGBColor(200, 120, 0), RGBColor(120, 60, 160)];

fn label(m: usize) -> String {
    if m == 1 {
        "full sharding (M = 1)".into()
    } else {
        format!("2D, M = {m}")
    }
}

pub fn draw(path: &Path, rows: &[SweepRow], model: &str, machine: &str) -> Result<(), Box<dyn std::error::Error>> {
    let err = |e: &dyn std::fmt::Display| format!("--plot {}: {e}", path.display());
    let mut by_m: BTreeMap<usize, Vec<&SweepRow>> = BTreeMap::new();
    for r in rows {
        by_m.entry(r.m).or_default().push(r);
    }
    let tmin = rows.iter().map(|r| r.world).min().ok_or("--plot: nothing to draw")? as f64;
    let tmax = rows.iter().map(|r| r.world).max().unwrap_or(1) as f64;
    let (x0, x1) = (tmin / 1.3, tmax * 1.3);
    let rate = |r: &SweepRow| r.prediction.samples_per_s;
    let gib = |r: &SweepRow| r.prediction.peak_bytes_per_rank as f64 / (1u64 << 30) as f64;
    let budget = rows[0].prediction.memory_per_rank as f64 / (1u64 << 30) as f64;
    let (rmin, rmax) = rows.iter().map(rate).fold((f64::MAX, 0f64), |(a, b), x| (a.min(x), b.max(x)));
    let gmax = rows.iter().map(gib).fold(budget, f64::max);
    let root = SVGBackend::new(path, (1200, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let root = root.titled(&format!("ember simulate: {model} on {machine}"), ("sans-serif", 20)).map_err(|e| err(&e))?;
    let (left, right) = root.split_horizontally(600);
    let mut c = ChartBuilder::on(&left)
        .margin(12)
        .caption("predicted samples/s", ("sans-serif", 16))
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d((x0..x1).log_scale(), ((rmin / 1.5).max(1.0)..rmax * 1.5).log_scale())
        .map_err(|e| err(&e))?;
    c.configure_mesh().x_desc("ranks T").y_desc("samples/s").y_label_formatter(&|y| format!("{y:.1e}")).x_label_formatter(&|x| format!("{x:.0}")).draw().map_err(|e| err(&e))?;
    let mut m2 = ChartBuilder::on(&right)
        .margin(12)
        .caption("peak memory per rank", ("sans-serif", 16))
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d((x0..x1).log_scale(), 0.0..gmax * 1.1)
        .map_err(|e| err(&e))?;
    m2.configure_mesh().x_desc("ranks T").y_desc("GiB").x_label_formatter(&|x| format!("{x:.0}")).draw().map_err(|e| err(&e))?;
    m2.draw_series(DashedLineSeries::new(vec![(x0, budget), (x1, budget)], 6, 4, BLACK.into()))
        .map_err(|e| err(&e))?
        .label("memory per rank")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], BLACK));
    for (i, (m, pts)) in by_m.iter().enumerate() {
        let col = COLORS[i % COLORS.len()];
        let line = |f: &dyn Fn(&SweepRow) -> f64| pts.iter().map(|r| (r.world as f64, f(r))).collect::<Vec<_>>();
        let fits: Vec<&&SweepRow> = pts.iter().filter(|r| r.prediction.fits).collect();
        let oom: Vec<&&SweepRow> = pts.iter().filter(|r| !r.prediction.fits).collect();
        c.draw_series(LineSeries::new(line(&rate), col.stroke_width(2)))
            .map_err(|e| err(&e))?
            .label(label(*m))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], col.stroke_width(2)));
        c.draw_series(fits.iter().map(|r| Circle::new((r.world as f64, rate(r)), 3, col.filled()))).map_err(|e| err(&e))?;
        c.draw_series(oom.iter().map(|r| Cross::new((r.world as f64, rate(r)), 5, col.stroke_width(2)))).map_err(|e| err(&e))?;
        m2.draw_series(LineSeries::new(line(&gib), col.stroke_width(2))).map_err(|e| err(&e))?;
        m2.draw_series(fits.iter().map(|r| Circle::new((r.world as f64, gib(r)), 3, col.filled()))).map_err(|e| err(&e))?;
        m2.draw_series(oom.iter().map(|r| Cross::new((r.world as f64, gib(r)), 5, col.stroke_width(2)))).map_err(|e| err(&e))?;
    }
    c.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).position(SeriesLabelPosition::UpperLeft).draw().map_err(|e| err(&e))?;
    m2.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).position(SeriesLabelPosition::UpperLeft).draw().map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}
