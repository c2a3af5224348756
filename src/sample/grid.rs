//! `--grid`: several images in one labelled picture. Columns are guidance values (so "guidance 5.0 vs
//! 7.5" sits side by side), rows are (prompt, seed) pairs, prompt-major; a header band names each
//! column and a band above each row names its seed and prompt. Labels are drawn with a built-in 5×7
//! bitmap font (upper-case ASCII; lower case is drawn upper case), scaled with the image size.

use super::png::Rgb8;

const BLACK: [u8; 3] = [0, 0, 0];
const WHITE: [u8; 3] = [255, 255, 255];

/// 5×7 glyphs for ASCII 32..=95, one string per glyph: 7 rows of 5 pixels, `#` set.
const FONT: [&str; 64] = [
    "..... ..... ..... ..... ..... ..... .....", // space
    "..#.. ..#.. ..#.. ..#.. ..#.. ..... ..#..", // !
    ".#.#. .#.#. .#.#. ..... ..... ..... .....", // "
    ".#.#. .#.#. ##### .#.#. ##### .#.#. .#.#.", // #
    "..#.. .#### #.#.. .###. ..#.# ####. ..#..", // $
    "##... ##..# ...#. ..#.. .#... #..## ...##", // %
    ".##.. #..#. #.#.. .#... #.#.# #..#. .##.#", // &
    "..#.. ..#.. .#... ..... ..... ..... .....", // '
    "...#. ..#.. .#... .#... .#... ..#.. ...#.", // (
    ".#... ..#.. ...#. ...#. ...#. ..#.. .#...", // )
    "..... ..#.. #.#.# .###. #.#.# ..#.. .....", // *
    "..... ..#.. ..#.. ##### ..#.. ..#.. .....", // +
    "..... ..... ..... ..... .##.. ..#.. .#...", // ,
    "..... ..... ..... ##### ..... ..... .....", // -
    "..... ..... ..... ..... ..... .##.. .##..", // .
    "..... ....# ...#. ..#.. .#... #.... .....", // /
    ".###. #...# #..## #.#.# ##..# #...# .###.", // 0
    "..#.. .##.. ..#.. ..#.. ..#.. ..#.. .###.", // 1
    ".###. #...# ....# ...#. ..#.. .#... #####", // 2
    "##### ...#. ..#.. ...#. ....# #...# .###.", // 3
    "...#. ..##. .#.#. #..#. ##### ...#. ...#.", // 4
    "##### #.... ####. ....# ....# #...# .###.", // 5
    "..##. .#... #.... ####. #...# #...# .###.", // 6
    "##### ....# ...#. ..#.. .#... .#... .#...", // 7
    ".###. #...# #...# .###. #...# #...# .###.", // 8
    ".###. #...# #...# .#### ....# ...#. .##..", // 9
    "..... .##.. .##.. ..... .##.. .##.. .....", // :
    "..... .##.. .##.. ..... .##.. ..#.. .#...", // ;
    "...#. ..#.. .#... #.... .#... ..#.. ...#.", // <
    "..... ..... ##### ..... ##### ..... .....", // =
    ".#... ..#.. ...#. ....# ...#. ..#.. .#...", // >
    ".###. #...# ....# ...#. ..#.. ..... ..#..", // ?
    ".###. #...# ....# .##.# #.#.# #.#.# .###.", // @
    ".###. #...# #...# ##### #...# #...# #...#", // A
    "####. #...# #...# ####. #...# #...# ####.", // B
    ".###. #...# #.... #.... #.... #...# .###.", // C
    "###.. #..#. #...# #...# #...# #..#. ###..", // D
    "##### #.... #.... ####. #.... #.... #####", // E
    "##### #.... #.... ####. #.... #.... #....", // F
    ".###. #...# #.... #.### #...# #...# .####", // G
    "#...# #...# #...# ##### #...# #...# #...#", // H
    ".###. ..#.. ..#.. ..#.. ..#.. ..#.. .###.", // I
    "..### ...#. ...#. ...#. ...#. #..#. .##..", // J
    "#...# #..#. #.#.. ##... #.#.. #..#. #...#", // K
    "#.... #.... #.... #.... #.... #.... #####", // L
    "#...# ##.## #.#.# #.#.# #...# #...# #...#", // M
    "#...# #...# ##..# #.#.# #..## #...# #...#", // N
    ".###. #...# #...# #...# #...# #...# .###.", // O
    "####. #...# #...# ####. #.... #.... #....", // P
    ".###. #...# #...# #...# #.#.# #..#. .##.#", // Q
    "####. #...# #...# ####. #.#.. #..#. #...#", // R
    ".#### #.... #.... .###. ....# ....# ####.", // S
    "##### ..#.. ..#.. ..#.. ..#.. ..#.. ..#..", // T
    "#...# #...# #...# #...# #...# #...# .###.", // U
    "#...# #...# #...# #...# #...# .#.#. ..#..", // V
    "#...# #...# #...# #.#.# #.#.# #.#.# .#.#.", // W
    "#...# #...# .#.#. ..#.. .#.#. #...# #...#", // X
    "#...# #...# .#.#. ..#.. ..#.. ..#.. ..#..", // Y
    "##### ....# ...#. ..#.. .#... #.... #####", // Z
    ".###. .#... .#... .#... .#... .#... .###.", // [
    "..... #.... .#... ..#.. ...#. ....# .....", // backslash
    ".###. ...#. ...#. ...#. ...#. ...#. .###.", // ]
    "..#.. .#.#. #...# ..... ..... ..... .....", // ^
    "..... ..... ..... ..... ..... ..... #####", // _
];

/// Pixel rows of `c`'s glyph (5 bits each, bit 4 = leftmost column).
fn glyph(c: char) -> [u8; 7] {
    let c = c.to_ascii_uppercase();
    let code = c as u32;
    let index = if (32..96).contains(&code) { (code - 32) as usize } else { ('?' as u32 - 32) as usize };
    let mut rows = [0u8; 7];
    for (r, bits) in FONT[index].split(' ').enumerate() {
        rows[r] = bits.bytes().fold(0, |acc, b| (acc << 1) | u8::from(b == b'#'));
    }
    rows
}

/// Width in pixels of one character cell (glyph + 1 column of space) at `scale`.
pub fn char_width(scale: usize) -> usize {
    6 * scale
}

/// Draws `text` with its top-left corner at (x, y), each font pixel a `scale`×`scale` square,
/// cut to `max_width` pixels (an ellipsis "..." marks the cut).
pub fn draw_text(img: &mut Rgb8, text: &str, x: usize, y: usize, scale: usize, max_width: usize, color: [u8; 3]) {
    let fits = max_width / char_width(scale);
    let chars: Vec<char> = text.chars().collect();
    let shown: Vec<char> = if chars.len() <= fits {
        chars
    } else {
        let keep = fits.saturating_sub(3);
        chars[..keep].iter().copied().chain("...".chars().take(fits - keep)).collect()
    };
    for (k, c) in shown.into_iter().enumerate() {
        let x0 = x + k * char_width(scale);
        for (r, bits) in glyph(c).iter().enumerate() {
            for col in 0..5 {
                if bits >> (4 - col) & 1 == 1 {
                    for dy in 0..scale {
                        for dx in 0..scale {
                            img.put(x0 + col * scale + dx, y + r * scale + dy, color);
                        }
                    }
                }
            }
        }
    }
}

/// Lays out `cells` (row-major: `rows.len()` × `columns.len()`, all the same size) with a header of
/// column labels and a label band above each row.
pub fn compose(cells: &[Rgb8], columns: &[String], rows: &[String]) -> Rgb8 {
    assert_eq!(cells.len(), columns.len() * rows.len(), "grid: {} cells for {}x{}", cells.len(), rows.len(), columns.len());
    let (cw, ch) = (cells[0].width, cells[0].height);
    let scale = (cw / 128).max(1);
    let gap = 2 * scale;
    let band = 9 * scale + gap;
    let width = columns.len() * (cw + gap) + gap;
    let height = band + rows.len() * (band + ch) + gap;
    let mut img = Rgb8::new(width, height, WHITE);
    for (j, label) in columns.iter().enumerate() {
        draw_text(&mut img, label, gap + j * (cw + gap), gap, scale, cw, BLACK);
    }
    for (i, label) in rows.iter().enumerate() {
        let y = band + i * (band + ch);
        draw_text(&mut img, label, gap, y + gap, scale, width - 2 * gap, BLACK);
        for j in 0..columns.len() {
            img.blit(&cells[i * columns.len() + j], gap + j * (cw + gap), y + band);
        }
    }
    img
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_glyph_is_seven_rows_of_five() {
        for (i, g) in FONT.iter().enumerate() {
            let rows: Vec<&str> = g.split(' ').collect();
            assert!(rows.len() == 7 && rows.iter().all(|r| r.len() == 5 && r.bytes().all(|b| b == b'#' || b == b'.')), "glyph {i}: {g:?}");
        }
        assert_eq!(glyph('a'), glyph('A'));
        assert_eq!(glyph('~'), glyph('?'));
        assert_eq!(glyph('T')[0], 0b11111);
    }

    #[test]
    fn grid_places_cells_and_labels() {
        let cells: Vec<Rgb8> = (0..6).map(|k| Rgb8::new(20, 10, [k as u8 * 40, 7, 9])).collect();
        let cols = vec!["CFG 5".to_string(), "CFG 7.5".to_string()];
        let rows: Vec<String> = (0..3).map(|i| format!("seed {i}: a long prompt that will not fit")).collect();
        let g = compose(&cells, &cols, &rows);
        let (gap, band) = (2, 11);
        assert_eq!((g.width, g.height), (2 * 22 + 2, band + 3 * (band + 10) + gap));
        let px = |x: usize, y: usize| g.data[(y * g.width + x) * 3..][..3].to_vec();
        // Cell (row 2, column 1) is image 5.
        assert_eq!(px(gap + 22 + 3, band + 2 * (band + 10) + band + 4), vec![200, 7, 9]);
        // The header holds ink (the 'C' of "CFG"), and labels never run into the cells.
        assert!((0..band).any(|y| (0..g.width).any(|x| px(x, y) == vec![0, 0, 0])));
        assert_eq!(px(gap + 2, band + band + 1), vec![0, 7, 9]);
    }
}
