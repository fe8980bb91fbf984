//! Pillow's bicubic resize of 8-bit RGB images, integer for integer (Pillow's
//! src/libImaging/Resample.c: `precompute_coeffs`, `normalize_coeffs_8bpc`,
//! `ImagingResampleHorizontal_8bpc` / `Vertical_8bpc`), because CLIPImageProcessor resizes with
//! `PIL.Image.resize(..., BICUBIC)` and a CLIP score should see the same pixels.
//!
//! Pillow's filter is antialiased: when shrinking, the kernel widens by the scale. The horizontal pass
//! runs first and rounds to 8 bits before the vertical one; the weights are fixed-point with 22
//! fraction bits.

use image::RgbImage;

const PRECISION_BITS: u32 = 32 - 8 - 2;
/// Pillow's bicubic support (a = -0.5).
const BICUBIC_SUPPORT: f64 = 2.0;

fn bicubic_filter(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// For each output pixel: the first input pixel and the fixed-point weights of the inputs it reads.
fn coefficients(size_in: usize, size_out: usize) -> Vec<(usize, Vec<i32>)> {
    let scale = size_in as f64 / size_out as f64;
    let filterscale = scale.max(1.0);
    let support = BICUBIC_SUPPORT * filterscale;
    (0..size_out)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            let ss = 1.0 / filterscale;
            // C's (int) casts truncate toward zero.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(size_in as i64) as usize;
            let weights: Vec<f64> = (xmin..xmax).map(|x| bicubic_filter((x as f64 - center + 0.5) * ss)).collect();
            let total: f64 = weights.iter().sum();
            let fixed = weights
                .iter()
                .map(|&w| {
                    let w = if total != 0.0 { w / total } else { w };
                    let scaled = w * (1u32 << PRECISION_BITS) as f64;
                    (if w < 0.0 { -0.5 + scaled } else { 0.5 + scaled }) as i32
                })
                .collect();
            (xmin, fixed)
        })
        .collect()
}

fn clip8(sum: i32) -> u8 {
    (sum >> PRECISION_BITS).clamp(0, 255) as u8
}

/// `image.resize((width, height), Image.BICUBIC)` for an RGB image.
pub fn resize_bicubic(image: &RgbImage, width: u32, height: u32) -> RgbImage {
    let (w_in, h_in) = image.dimensions();
    if (w_in, h_in) == (width, height) {
        return image.clone(); // Pillow returns a copy without resampling
    }
    let horizontal = if width != w_in {
        let coeffs = coefficients(w_in as usize, width as usize);
        RgbImage::from_fn(width, h_in, |x, y| {
            let (xmin, weights) = &coeffs[x as usize];
            let mut sums = [1i32 << (PRECISION_BITS - 1); 3];
            for (i, &k) in weights.iter().enumerate() {
                let pixel = image.get_pixel((xmin + i) as u32, y);
                for c in 0..3 {
                    sums[c] += pixel[c] as i32 * k;
                }
            }
            image::Rgb(sums.map(clip8))
        })
    } else {
        image.clone()
    };
    if height == h_in {
        return horizontal;
    }
    let coeffs = coefficients(h_in as usize, height as usize);
    RgbImage::from_fn(width, height, |x, y| {
        let (ymin, weights) = &coeffs[y as usize];
        let mut sums = [1i32 << (PRECISION_BITS - 1); 3];
        for (i, &k) in weights.iter().enumerate() {
            let pixel = horizontal.get_pixel(x, (ymin + i) as u32);
            for c in 0..3 {
                sums[c] += pixel[c] as i32 * k;
            }
        }
        image::Rgb(sums.map(clip8))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_sum_to_one_in_fixed_point() {
        for (size_in, size_out) in [(40, 224), (512, 224), (300, 224), (7, 3)] {
            for (_, weights) in coefficients(size_in, size_out) {
                let total: i32 = weights.iter().sum();
                assert!(
                    (total - (1 << PRECISION_BITS)).abs() <= weights.len() as i32,
                    "{size_in}->{size_out}: {total}"
                );
            }
        }
    }

    #[test]
    fn a_flat_image_stays_flat_and_the_same_size_is_a_copy() {
        let flat = RgbImage::from_pixel(37, 50, image::Rgb([200, 17, 90]));
        let resized = resize_bicubic(&flat, 224, 302);
        assert!(resized.pixels().all(|p| p.0 == [200, 17, 90]));
        assert_eq!(resize_bicubic(&flat, 37, 50), flat);
    }
}
