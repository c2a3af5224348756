//! 2-D convolutions on NHWC activations (kernels/conv.cu), weights as [out, kh, kw, in].

/// Geometry of one convolution: input [batch, height, width, in_ch] → output [batch, oh, ow, out_ch].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conv2dShape {
    pub batch: usize,
    pub height: usize,
    pub width: usize,
    pub in_ch: usize,
    pub out_ch: usize,
    /// Square kernel size (1 or 3 in SD1.5).
    pub kernel: usize,
    pub stride: usize,
    pub pad: usize,
}

impl Conv2dShape {
    /// (output height, output width).
    pub fn out_hw(&self) -> (usize, usize) {
        let o = |d: usize| (d + 2 * self.pad - self.kernel) / self.stride + 1;
        (o(self.height), o(self.width))
    }
}

/// Reorders PyTorch's OIHW conv weight to our [out, kh, kw, in].
pub fn conv_weight_oihw_to_ohwi(w: &[f32], o: usize, i: usize, kh: usize, kw: usize) -> Vec<f32> {
    assert_eq!(w.len(), o * i * kh * kw, "conv weight is not {o}×{i}×{kh}×{kw}");
    let mut out = vec![0f32; w.len()];
    for oc in 0..o {
        for ic in 0..i {
            for y in 0..kh {
                for x in 0..kw {
                    out[((oc * kh + y) * kw + x) * i + ic] = w[((oc * i + ic) * kh + y) * kw + x];
                }
            }
        }
    }
    out
}

/// CPU twin: cross-correlation with zero padding, NHWC in and out, w [out, k, k, in], optional bias.
pub fn conv2d_cpu(x: &[f32], s: &Conv2dShape, w: &[f32], bias: Option<&[f32]>) -> Vec<f32> {
    let (oh, ow) = s.out_hw();
    let k = s.kernel;
    assert_eq!(x.len(), s.batch * s.height * s.width * s.in_ch, "conv2d_cpu: input does not match {s:?}");
    assert_eq!(w.len(), s.out_ch * k * k * s.in_ch, "conv2d_cpu: weight does not match {s:?}");
    let mut y = vec![0f32; s.batch * oh * ow * s.out_ch];
    for b in 0..s.batch {
        for oy in 0..oh {
            for ox in 0..ow {
                let out = &mut y[((b * oh + oy) * ow + ox) * s.out_ch..][..s.out_ch];
                for (oc, o) in out.iter_mut().enumerate() {
                    let mut acc = bias.map_or(0.0, |bb| bb[oc]);
                    for ky in 0..k {
                        let iy = (oy * s.stride + ky) as isize - s.pad as isize;
                        if iy < 0 || iy >= s.height as isize {
                            continue;
                        }
                        for kx in 0..k {
                            let ix = (ox * s.stride + kx) as isize - s.pad as isize;
                            if ix < 0 || ix >= s.width as isize {
                                continue;
                            }
                            let xin = &x[((b * s.height + iy as usize) * s.width + ix as usize) * s.in_ch..][..s.in_ch];
                            let wk = &w[((oc * k + ky) * k + kx) * s.in_ch..][..s.in_ch];
                            acc += xin.iter().zip(wk).map(|(a, c)| a * c).sum::<f32>();
                        }
                    }
                    *o = acc;
                }
            }
        }
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conv2d_cpu_matches_hand_computed_example() {
        // 1×3×3×1 input 1..9, one 3×3 filter of ones, pad 1: each output is the sum of its neighbourhood.
        let x: Vec<f32> = (1..=9).map(|v| v as f32).collect();
        let s = Conv2dShape { batch: 1, height: 3, width: 3, in_ch: 1, out_ch: 1, kernel: 3, stride: 1, pad: 1 };
        let y = conv2d_cpu(&x, &s, &[1.0; 9], Some(&[0.5]));
        assert_eq!(y, vec![12.5, 21.5, 16.5, 27.5, 45.5, 33.5, 24.5, 39.5, 28.5]);
        let s2 = Conv2dShape { stride: 2, ..s };
        assert_eq!(s2.out_hw(), (2, 2));
        assert_eq!(conv2d_cpu(&x, &s2, &[1.0; 9], None), vec![12.0, 16.0, 24.0, 28.0]);
    }

    #[test]
    fn weight_reorder_moves_input_channel_last() {
        // o=1, i=2, 1×2 kernel: OIHW [[[[a, b]], [[c, d]]]] -> OHWI [a, c, b, d]
        assert_eq!(conv_weight_oihw_to_ohwi(&[1.0, 2.0, 3.0, 4.0], 1, 2, 1, 2), vec![1.0, 3.0, 2.0, 4.0]);
    }
}
