//! The training curve as a PNG: loss (left axis) and learning rate (right axis) against the step.

use std::path::Path;
use std::sync::Once;

use plotters::prelude::*;
use plotters::style::{FontStyle, register_font};

/// DejaVu Sans Mono (free license, `assets/DejaVu-LICENSE.txt`), embedded so that plots need no
/// system fonts.
const FONT: &[u8] = include_bytes!("../assets/DejaVuSansMono.ttf");

fn ensure_font() {
    static REGISTER: Once = Once::new();
    REGISTER.call_once(|| {
        // The bytes are a valid TTF compiled into the binary; failure would be a build defect.
        let _ = register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

/// One point of the curve.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CurvePoint {
    /// Optimizer step.
    pub step: usize,
    /// Training loss at that step.
    pub loss: f32,
    /// Learning rate used for that step.
    pub learning_rate: f64,
}

/// The curve of a run: each `(step, loss)` of `history` with the learning rate `config` gives that
/// step out of `total_steps`.
pub fn curve(
    history: &[(usize, f32)],
    config: &crate::TrainConfig,
    total_steps: usize,
) -> Vec<CurvePoint> {
    history
        .iter()
        .map(|&(step, loss)| CurvePoint {
            step,
            loss,
            learning_rate: config.lr_at(step.saturating_sub(1), total_steps),
        })
        .collect()
}

/// Writes `points` as a 800 × 480 PNG at `path` (atomically: a temporary file then a rename).
pub fn write_loss_png(path: &Path, points: &[CurvePoint]) -> Result<(), String> {
    ensure_font();
    let (width, height) = (800u32, 480u32);
    let mut pixels = vec![0u8; (width * height * 3) as usize];
    draw(&mut pixels, (width, height), points).map_err(|e| format!("drawing the plot: {e}"))?;
    let png = encode_png(&pixels, width, height).map_err(|e| format!("encoding PNG: {e}"))?;
    peft_tensors::write_atomic(path, &png).map_err(|e| e.to_string())
}

/// plotters' own encoder writes straight to a file; encoding the RGB buffer here keeps the write
/// atomic.
fn encode_png(pixels: &[u8], width: u32, height: u32) -> Result<Vec<u8>, png::EncodingError> {
    let mut out = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut out, width, height);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        let mut writer = encoder.write_header()?;
        writer.write_image_data(pixels)?;
    }
    Ok(out)
}

fn draw(
    pixels: &mut [u8],
    size: (u32, u32),
    points: &[CurvePoint],
) -> Result<(), Box<dyn std::error::Error>> {
    let root = BitMapBackend::with_buffer(pixels, size).into_drawing_area();
    root.fill(&WHITE)?;
    let max_step = points.iter().map(|p| p.step).max().unwrap_or(1).max(1) as f64;
    let finite = points.iter().map(|p| p.loss).filter(|l| l.is_finite());
    let (lo, hi) = finite.fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), l| {
        (lo.min(l), hi.max(l))
    });
    let (lo, hi) = if lo.is_finite() && hi > lo {
        (lo as f64, hi as f64)
    } else if lo.is_finite() {
        (lo as f64 - 0.5, lo as f64 + 0.5)
    } else {
        (0.0, 1.0)
    };
    let max_lr = points
        .iter()
        .map(|p| p.learning_rate)
        .fold(0.0f64, f64::max)
        .max(f64::MIN_POSITIVE);
    let mut chart = ChartBuilder::on(&root)
        .caption("training loss and learning rate", ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .right_y_label_area_size(70)
        .build_cartesian_2d(0.0..max_step, lo..hi)?
        .set_secondary_coord(0.0..max_step, 0.0..max_lr * 1.05);
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc("loss")
        .label_style(("sans-serif", 14))
        .draw()?;
    chart
        .configure_secondary_axes()
        .y_desc("learning rate")
        .label_style(("sans-serif", 14))
        .draw()?;
    chart
        .draw_series(LineSeries::new(
            points
                .iter()
                .filter(|p| p.loss.is_finite())
                .map(|p| (p.step as f64, p.loss as f64)),
            BLUE.stroke_width(2),
        ))?
        .label("loss")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE.stroke_width(2)));
    chart
        .draw_secondary_series(LineSeries::new(
            points.iter().map(|p| (p.step as f64, p.learning_rate)),
            RED.stroke_width(1),
        ))?
        .label("learning rate")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED.stroke_width(1)));
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_a_png_with_both_curves() {
        let dir = std::env::temp_dir().join(format!("peft-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("loss.png");
        let points: Vec<CurvePoint> = (1..=20)
            .map(|step| CurvePoint {
                step,
                loss: 5.0 / step as f32,
                learning_rate: 1e-3 * step as f64 / 20.0,
            })
            .collect();
        write_loss_png(&path, &points).unwrap();
        let decoder =
            png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&path).unwrap()));
        let mut reader = decoder.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!((info.width, info.height), (800, 480));
        let pixels: Vec<&[u8]> = buf[..info.buffer_size()].chunks(3).collect();
        let blue = pixels
            .iter()
            .filter(|p| p[2] > 200 && p[0] < 80 && p[1] < 80)
            .count();
        let red = pixels
            .iter()
            .filter(|p| p[0] > 200 && p[1] < 80 && p[2] < 80)
            .count();
        assert!(blue > 200, "loss line (blue) missing: {blue}");
        assert!(red > 200, "learning-rate line (red) missing: {red}");
        // Non-finite losses are skipped, not drawn or fatal.
        let mut with_nan = points.clone();
        with_nan[3].loss = f32::NAN;
        write_loss_png(&path, &with_nan).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
