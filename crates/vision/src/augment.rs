//! Training-time augmentation of small images: a random shift of up to `shift` pixels, a
//! random rotation of up to `rotate_degrees` about the centre (inverse mapping with
//! nearest-neighbour sampling; pixels from outside the image are background, 0) and, with
//! `flip`, a left–right mirror with probability ½ (torchvision's `RandomHorizontalFlip`, Keras'
//! `RandomFlip("horizontal")` — right for clothing, wrong for digits and letters). The channels
//! of a colour image move together.

use rand::Rng;
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Augment {
    /// Largest shift in pixels along each axis (0 = none).
    pub shift: u32,
    /// Largest rotation in degrees, either way (0 = none).
    pub rotate_degrees: f32,
    /// Mirror left–right with probability ½.
    pub flip: bool,
}

impl Augment {
    pub fn enabled(&self) -> bool {
        self.shift > 0 || self.rotate_degrees > 0.0 || self.flip
    }

    /// A randomly shifted, rotated and (with `flip`) mirrored copy of `img` (`channels × h ×
    /// w`), every channel moved alike.
    pub fn apply(
        &self,
        img: &[u8],
        channels: usize,
        h: usize,
        w: usize,
        rng: &mut StdRng,
    ) -> Vec<u8> {
        let s = self.shift as i32;
        let (dx, dy) = if s > 0 {
            (rng.random_range(-s..=s), rng.random_range(-s..=s))
        } else {
            (0, 0)
        };
        let angle = if self.rotate_degrees > 0.0 {
            rng.random_range(-self.rotate_degrees..=self.rotate_degrees)
                .to_radians()
        } else {
            0.0
        };
        let mirror = self.flip && rng.random_bool(0.5);
        img.chunks(h * w)
            .take(channels)
            .flat_map(|plane| {
                let mut out = transform(plane, h, w, dx as f32, dy as f32, angle);
                if mirror {
                    out.chunks_mut(w).for_each(|row| row.reverse());
                }
                out
            })
            .collect()
    }
}

/// out(x, y) = img(R(−θ)·((x, y) − c − d) + c): rotate by θ about the centre c, then shift by d.
pub fn transform(img: &[u8], h: usize, w: usize, dx: f32, dy: f32, angle: f32) -> Vec<u8> {
    let (cx, cy) = ((w as f32 - 1.0) / 2.0, (h as f32 - 1.0) / 2.0);
    let (sin, cos) = angle.sin_cos();
    let mut out = vec![0u8; h * w];
    for y in 0..h {
        for x in 0..w {
            let (px, py) = (x as f32 - cx - dx, y as f32 - cy - dy);
            let sx = (cos * px + sin * py + cx).round();
            let sy = (-sin * px + cos * py + cy).round();
            if sx >= 0.0 && sy >= 0.0 && (sx as usize) < w && (sy as usize) < h {
                out[y * w + x] = img[sy as usize * w + sx as usize];
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_shift_and_quarter_turn() {
        let img: Vec<u8> = (1..=9).collect(); // 3×3: 1 2 3 / 4 5 6 / 7 8 9
        assert_eq!(transform(&img, 3, 3, 0.0, 0.0, 0.0), img);
        assert_eq!(
            transform(&img, 3, 3, 1.0, 0.0, 0.0),
            vec![0, 1, 2, 0, 4, 5, 0, 7, 8]
        );
        let quarter = transform(&img, 3, 3, 0.0, 0.0, std::f32::consts::FRAC_PI_2);
        assert_eq!(quarter[4], 5, "centre stays");
        assert_eq!(quarter, vec![7, 4, 1, 8, 5, 2, 9, 6, 3]);
    }

    #[test]
    fn flip_mirrors_about_half_the_images_and_nothing_else() {
        let img: Vec<u8> = (1..=6).collect(); // 2×3: 1 2 3 / 4 5 6
        let flip = Augment {
            flip: true,
            ..Augment::default()
        };
        assert!(flip.enabled());
        let mut rng = <StdRng as rand::SeedableRng>::seed_from_u64(7);
        let outs: Vec<Vec<u8>> = (0..200)
            .map(|_| flip.apply(&img, 1, 2, 3, &mut rng))
            .collect();
        let mirrored = outs.iter().filter(|o| **o == [3, 2, 1, 6, 5, 4]).count();
        let kept = outs.iter().filter(|o| **o == img).count();
        assert_eq!(mirrored + kept, 200, "only the identity or the mirror");
        assert!((70..=130).contains(&mirrored), "{mirrored} of 200 mirrored");
    }
}
