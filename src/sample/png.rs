//! PNG output: 8-bit RGB with the generation settings in a text chunk named "parameters" (the
//! chunk A1111 writes and reads back, so its "PNG info" tab shows them). The text goes in a tEXt
//! chunk when it is Latin-1 (what the PNG spec allows there), else in an iTXt chunk (UTF-8), as
//! PIL does. Files are written to a temporary name and renamed, so a reader never sees half a file.

use crate::io::write_atomic;
use anyhow::{ensure, Context, Result};
use std::path::Path;

pub const PARAMETERS_KEY: &str = "parameters";

/// An 8-bit RGB image, rows top to bottom, `data` = [height, width, 3].
#[derive(Clone, Debug, PartialEq)]
pub struct Rgb8 {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

impl Rgb8 {
    pub fn new(width: usize, height: usize, fill: [u8; 3]) -> Rgb8 {
        Rgb8 { width, height, data: fill.repeat(width * height) }
    }

    /// From decoded pixels in [-1, 1] (one image of a VAE output, [h, w, 3]): diffusers'
    /// postprocess, clamp((x + 1) / 2, 0, 1), then round(· 255) as its numpy_to_pil.
    pub fn from_unit_range(width: usize, height: usize, pixels: &[f32]) -> Rgb8 {
        assert_eq!(pixels.len(), width * height * 3, "Rgb8: {} values for {width}x{height}x3", pixels.len());
        let data = pixels.iter().map(|&x| (((x / 2.0 + 0.5).clamp(0.0, 1.0)) * 255.0).round() as u8).collect();
        Rgb8 { width, height, data }
    }

    pub fn put(&mut self, x: usize, y: usize, rgb: [u8; 3]) {
        if x < self.width && y < self.height {
            let i = (y * self.width + x) * 3;
            self.data[i..i + 3].copy_from_slice(&rgb);
        }
    }

    /// Copies `src` with its top-left corner at (x, y) (clipped to this image).
    pub fn blit(&mut self, src: &Rgb8, x: usize, y: usize) {
        for row in 0..src.height.min(self.height.saturating_sub(y)) {
            let n = src.width.min(self.width.saturating_sub(x)) * 3;
            let d = ((y + row) * self.width + x) * 3;
            let s = row * src.width * 3;
            self.data[d..d + n].copy_from_slice(&src.data[s..s + n]);
        }
    }
}

/// The PNG file's bytes with `parameters` in a text chunk.
pub fn encode(image: &Rgb8, parameters: &str) -> Result<Vec<u8>> {
    ensure!(image.width > 0 && image.height > 0, "cannot write an empty {}x{} image", image.width, image.height);
    let mut bytes = Vec::new();
    let mut enc = ::png::Encoder::new(&mut bytes, image.width as u32, image.height as u32);
    enc.set_color(::png::ColorType::Rgb);
    enc.set_depth(::png::BitDepth::Eight);
    if parameters.chars().all(|c| (c as u32) < 256) {
        enc.add_text_chunk(PARAMETERS_KEY.into(), parameters.into())?;
    } else {
        enc.add_itxt_chunk(PARAMETERS_KEY.into(), parameters.into())?;
    }
    let mut writer = enc.write_header()?;
    writer.write_image_data(&image.data)?;
    writer.finish()?;
    Ok(bytes)
}

/// Writes `image` to `path` (temp file + rename).
pub fn write(path: &Path, image: &Rgb8, parameters: &str) -> Result<()> {
    let bytes = encode(image, parameters)?;
    write_atomic(path, &bytes).with_context(|| format!("writing {}", path.display()))
}

/// Reads a PNG written by [`write`]: the image and its "parameters" text (tEXt or iTXt).
pub fn read(path: &Path) -> Result<(Rgb8, Option<String>)> {
    let file = std::io::BufReader::new(std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?);
    let mut reader = ::png::Decoder::new(file).read_info()?;
    let mut data = vec![0; reader.output_buffer_size().context("PNG too large")?];
    let frame = reader.next_frame(&mut data)?;
    ensure!(frame.color_type == ::png::ColorType::Rgb && frame.bit_depth == ::png::BitDepth::Eight, "{}: not 8-bit RGB", path.display());
    data.truncate(frame.buffer_size());
    let info = reader.info();
    let text = info.uncompressed_latin1_text.iter().find(|c| c.keyword == PARAMETERS_KEY).map(|c| c.text.clone());
    let text = match text {
        Some(t) => Some(t),
        None => info.utf8_text.iter().find(|c| c.keyword == PARAMETERS_KEY).map(|c| c.get_text()).transpose()?,
    };
    Ok((Rgb8 { width: frame.width as usize, height: frame.height as usize, data }, text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pixels_and_parameters_round_trip() {
        let dir = std::env::temp_dir().join(format!("sdlora-png-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pixels: Vec<f32> = (0..5 * 3 * 3).map(|i| i as f32 / 22.0 - 1.0).collect();
        let img = Rgb8::from_unit_range(5, 3, &pixels);
        assert_eq!((img.data[0], img.data[44]), (0, 255));
        for text in ["a cat\nNegative prompt: dog\nSteps: 30, Seed: 42, café", "a cat 😀 東京"] {
            let path = dir.join("x.png");
            write(&path, &img, text).unwrap();
            let (back, got) = read(&path).unwrap();
            assert_eq!(back, img);
            assert_eq!(got.as_deref(), Some(text));
        }
    }
}
