//! The training data set: images with captions, resized and center-cropped to a square
//! resolution and normalized to [−1, 1], as diffusers' training scripts prepare them
//! (Resize(shorter side, bilinear) → CenterCrop → ToTensor → Normalize([0.5], [0.5])).
//!
//! Two layouts are accepted:
//! - a folder of images, each with a same-name `.txt` caption (kohya's convention);
//! - a captions file (`.toml` or `.json`) mapping image paths (relative to the file) to captions.
//!
//! PNG, JPEG and WebP; RGBA, grayscale and 16-bit images are converted to 8-bit RGB.

use anyhow::{bail, ensure, Context, Result};
use image::imageops::FilterType;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const IMAGE_EXTENSIONS: [&str; 4] = ["png", "jpg", "jpeg", "webp"];

/// One training example: the caption and the image as NHWC [resolution, resolution, 3] in [−1, 1].
#[derive(Clone, Debug)]
pub struct Example {
    pub image_path: PathBuf,
    pub caption: String,
    pub pixels: Vec<f32>,
}

/// Loads every example under `source` (a folder or a captions file) at `resolution`×`resolution`.
/// Errors name the file and say what was expected.
pub fn load_dataset(source: &Path, resolution: u32) -> Result<Vec<Example>> {
    ensure!(resolution >= 8 && resolution.is_multiple_of(8), "--resolution {resolution}: must be a positive multiple of 8");
    let pairs = if source.is_dir() {
        pairs_from_folder(source)?
    } else if source.is_file() {
        pairs_from_captions_file(source)?
    } else {
        bail!("--data {}: no such folder or captions file", source.display());
    };
    pairs
        .into_iter()
        .map(|(image_path, caption)| {
            let pixels = load_image(&image_path, resolution)?;
            Ok(Example { image_path, caption, pixels })
        })
        .collect()
}

fn is_image(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

fn pairs_from_folder(dir: &Path) -> Result<Vec<(PathBuf, String)>> {
    let mut images: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read data folder {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && is_image(p))
        .collect();
    images.sort();
    ensure!(
        !images.is_empty(),
        "data folder {} has no images (expected .png, .jpg, .jpeg or .webp files, each with a same-name .txt caption)",
        dir.display()
    );
    images
        .into_iter()
        .map(|img| {
            let txt = img.with_extension("txt");
            let caption = std::fs::read_to_string(&txt)
                .with_context(|| format!("image {} has no caption: expected the file {}", img.display(), txt.display()))?;
            let caption = caption.trim().to_string();
            ensure!(!caption.is_empty(), "caption file {} is empty", txt.display());
            Ok((img, caption))
        })
        .collect()
}

fn pairs_from_captions_file(file: &Path) -> Result<Vec<(PathBuf, String)>> {
    let text = std::fs::read_to_string(file).with_context(|| format!("cannot read captions file {}", file.display()))?;
    let ext = file.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    let map: BTreeMap<String, String> = match ext.as_str() {
        "toml" => toml::from_str(&text).with_context(|| format!("{}: expected TOML lines `\"image.png\" = \"caption\"`", file.display()))?,
        "json" => serde_json::from_str(&text).with_context(|| format!("{}: expected a JSON object {{\"image.png\": \"caption\"}}", file.display()))?,
        _ => bail!("captions file {} must end in .toml or .json", file.display()),
    };
    ensure!(!map.is_empty(), "captions file {} lists no images", file.display());
    let base = file.parent().unwrap_or(Path::new("."));
    map.into_iter()
        .map(|(img, caption)| {
            let path = base.join(&img);
            ensure!(path.is_file(), "{}: image {img:?} not found (looked for {})", file.display(), path.display());
            ensure!(!caption.trim().is_empty(), "{}: empty caption for {img:?}", file.display());
            Ok((path, caption.trim().to_string()))
        })
        .collect()
}

/// Decodes `path`, resizes its shorter side to `resolution` (bilinear), center-crops a square and
/// returns NHWC [resolution, resolution, 3] values in [−1, 1].
pub fn load_image(path: &Path, resolution: u32) -> Result<Vec<f32>> {
    let img = image::ImageReader::open(path)
        .with_context(|| format!("cannot open image {}", path.display()))?
        .with_guessed_format()
        .with_context(|| format!("cannot read image {}", path.display()))?
        .decode()
        .with_context(|| format!("cannot decode image {} (expected PNG, JPEG or WebP)", path.display()))?;
    let (w, h) = (img.width(), img.height());
    ensure!(w > 0 && h > 0, "image {} is empty", path.display());
    let scale = resolution as f64 / w.min(h) as f64;
    let (nw, nh) = (((w as f64 * scale).round() as u32).max(resolution), ((h as f64 * scale).round() as u32).max(resolution));
    let rgb = img.to_rgb8();
    let resized = if (nw, nh) == (w, h) { rgb } else { image::imageops::resize(&rgb, nw, nh, FilterType::Triangle) };
    let (left, top) = ((nw - resolution) / 2, (nh - resolution) / 2);
    let crop = image::imageops::crop_imm(&resized, left, top, resolution, resolution).to_image();
    Ok(crop.into_raw().into_iter().map(|v| v as f32 / 127.5 - 1.0).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("sdlora-data-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn example_data_set_loads() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/cheburashka");
        let examples = load_dataset(&dir, 64).unwrap();
        assert_eq!(examples.len(), 3);
        for e in &examples {
            assert!(e.caption.starts_with("<cheburashka>"), "{}", e.caption);
            assert_eq!(e.pixels.len(), 64 * 64 * 3);
            assert!(e.pixels.iter().all(|v| (-1.0..=1.0).contains(v)));
        }
    }

    #[test]
    fn odd_images_are_converted_resized_and_cropped() {
        let dir = temp_dir("odd");
        // 16-bit grayscale, 40 wide × 20 high: left half black, right half white.
        let img = image::ImageBuffer::from_fn(40, 20, |x, _| image::Luma([if x < 20 { 0u16 } else { 65535 }]));
        img.save(dir.join("gray16.png")).unwrap();
        std::fs::write(dir.join("gray16.txt"), "  a caption \n").unwrap();
        // RGBA
        image::RgbaImage::from_pixel(8, 8, image::Rgba([255, 0, 0, 10])).save(dir.join("rgba.png")).unwrap();
        std::fs::write(dir.join("rgba.txt"), "red").unwrap();
        let ex = load_dataset(&dir, 8).unwrap();
        assert_eq!(ex.len(), 2);
        assert_eq!(ex[0].caption, "a caption");
        let px = &ex[0].pixels; // shorter side 20 → 8: 16×8, crop columns 4..12: black then white
        assert_eq!(px.len(), 8 * 8 * 3);
        assert_eq!(px[0], -1.0);
        assert_eq!(px[7 * 3], 1.0);
        assert_eq!(&ex[1].pixels[..3], &[1.0, -1.0, -1.0]);
    }

    #[test]
    fn captions_file_in_toml_and_json() {
        let dir = temp_dir("captions");
        image::RgbImage::from_pixel(8, 8, image::Rgb([0, 0, 0])).save(dir.join("a.png")).unwrap();
        std::fs::write(dir.join("caps.toml"), "\"a.png\" = \"from toml\"\n").unwrap();
        std::fs::write(dir.join("caps.json"), r#"{"a.png": "from json"}"#).unwrap();
        assert_eq!(load_dataset(&dir.join("caps.toml"), 8).unwrap()[0].caption, "from toml");
        assert_eq!(load_dataset(&dir.join("caps.json"), 8).unwrap()[0].caption, "from json");
    }

    #[test]
    fn bad_input_is_a_clear_error_naming_the_file() {
        let dir = temp_dir("bad");
        let err = format!("{:#}", load_dataset(&dir, 8).unwrap_err());
        assert!(err.contains("has no images"), "{err}");

        image::RgbImage::new(8, 8).save(dir.join("lonely.png")).unwrap();
        let err = format!("{:#}", load_dataset(&dir, 8).unwrap_err());
        assert!(err.contains("lonely.png has no caption") && err.contains("lonely.txt"), "{err}");

        std::fs::write(dir.join("lonely.txt"), "ok").unwrap();
        std::fs::write(dir.join("broken.png"), b"not a png").unwrap();
        std::fs::write(dir.join("broken.txt"), "broken").unwrap();
        let err = format!("{:#}", load_dataset(&dir, 8).unwrap_err());
        assert!(err.contains("broken.png"), "{err}");

        let err = format!("{:#}", load_dataset(&dir.join("missing"), 8).unwrap_err());
        assert!(err.contains("no such folder"), "{err}");
        std::fs::write(dir.join("caps.json"), r#"{"nope.png": "x"}"#).unwrap();
        let err = format!("{:#}", load_dataset(&dir.join("caps.json"), 8).unwrap_err());
        assert!(err.contains("nope.png") && err.contains("not found"), "{err}");
    }
}
