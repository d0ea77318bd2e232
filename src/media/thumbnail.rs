//! Thumbnails: which standard size answers a request, and making one (sync code, run on the
//! blocking pool by the caller).
//!
//! Like Synapse, Hearth keeps a fixed set of sizes (Synapse's default `thumbnail_sizes`) and
//! answers any request with one of them, so a client asking for 97x97 and one asking for
//! 100x100 share one cached file. Synapse generates them all at upload; Hearth generates each
//! on first request and keeps it.

use std::{io::Cursor, path::Path};

use image::{DynamicImage, ImageFormat, ImageReader, Limits};

/// How a thumbnail fits its box.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Method {
    /// Fills the box exactly, cutting what overflows (centred).
    Crop,
    /// Fits inside the box, keeping the aspect ratio.
    Scale,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Crop => "crop",
            Method::Scale => "scale",
        }
    }
}

/// One of the standard sizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Size {
    pub width: u32,
    pub height: u32,
    pub method: Method,
}

/// Synapse's default `thumbnail_sizes`, smallest first within each method.
pub const SIZES: [Size; 5] = [
    size(32, 32, Method::Crop),
    size(96, 96, Method::Crop),
    size(320, 240, Method::Scale),
    size(640, 480, Method::Scale),
    size(800, 600, Method::Scale),
];

const fn size(width: u32, height: u32, method: Method) -> Size {
    Size {
        width,
        height,
        method,
    }
}

/// The standard size answering a request for `width`x`height` by `method`: the smallest of
/// that method whose box covers the request, else the largest of that method. (Synapse ranks
/// its pre-generated thumbnails by a more elaborate score; on the standard sizes both give
/// the same answer for the usual requests.)
pub fn select(width: u32, height: u32, method: Method) -> Size {
    let of_method = || SIZES.iter().filter(move |s| s.method == method);
    let largest = of_method()
        .next_back()
        .copied()
        .unwrap_or(SIZES[SIZES.len() - 1]);
    of_method()
        .find(|s| s.width >= width && s.height >= height)
        .copied()
        .unwrap_or(largest)
}

/// Why no thumbnail could be made.
#[derive(Debug)]
pub enum Refused {
    /// Not an image in a format Hearth decodes (PNG, JPEG, GIF, WebP), or a broken one.
    NotAnImage(String),
    /// More pixels than `max_image_pixels`.
    TooLarge { width: u32, height: u32 },
}

/// A made thumbnail.
pub struct Thumbnail {
    pub bytes: Vec<u8>,
    pub content_type: &'static str,
    pub width: u32,
    pub height: u32,
}

/// Decodes the image at `path` (never more than `max_pixels`; the decoder's allocations are
/// bounded too) and makes the thumbnail for `size`. Never scales up: an image smaller than
/// the box stays at its size (`scale`), or is cut to the box's aspect ratio at its own size
/// (`crop`). JPEG sources give JPEG thumbnails, the rest PNG (keeping transparency). Only the
/// first frame of an animation is used.
pub fn make(path: &Path, size: Size, max_pixels: u64) -> Result<Thumbnail, Refused> {
    let not_image = |e: &dyn std::fmt::Display| Refused::NotAnImage(e.to_string());
    let open = || -> Result<ImageReader<_>, Refused> {
        let reader = ImageReader::open(path)
            .map_err(|e| not_image(&e))?
            .with_guessed_format()
            .map_err(|e| not_image(&e))?;
        match reader.format() {
            Some(ImageFormat::Png | ImageFormat::Jpeg | ImageFormat::Gif | ImageFormat::WebP) => {
                Ok(reader)
            }
            _ => Err(Refused::NotAnImage(
                "not a PNG, JPEG, GIF or WebP image".into(),
            )),
        }
    };
    // The header first: a huge image is refused before any pixel is decoded.
    let (width, height) = open()?.into_dimensions().map_err(|e| not_image(&e))?;
    if u64::from(width) * u64::from(height) > max_pixels {
        return Err(Refused::TooLarge { width, height });
    }
    let mut reader = open()?;
    let jpeg = reader.format() == Some(ImageFormat::Jpeg);
    let mut limits = Limits::default();
    limits.max_image_width = Some(width);
    limits.max_image_height = Some(height);
    // The decoded image (at most 8 bytes a pixel, 16-bit RGBA) and the decoder's own buffers.
    limits.max_alloc = Some(max_pixels.saturating_mul(8).saturating_add(64 << 20));
    reader.limits(limits);
    let image = reader.decode().map_err(|e| not_image(&e))?;
    let thumb = resize(&image, size);
    drop(image);
    encode(thumb, jpeg).map_err(|e| not_image(&e))
}

/// The resized image (see [`make`]).
fn resize(image: &DynamicImage, size: Size) -> DynamicImage {
    let (w, h) = (image.width().max(1), image.height().max(1));
    match size.method {
        Method::Scale if w <= size.width && h <= size.height => image.clone(),
        // Fits inside the box, aspect ratio kept (a fast area-averaging downscale).
        Method::Scale => image.thumbnail(size.width, size.height),
        Method::Crop => {
            let (bw, bh) = (u64::from(size.width), u64::from(size.height));
            // Scale so the image covers the box, then cut the centre.
            let scale_w = bw as f64 / f64::from(w);
            let scale_h = bh as f64 / f64::from(h);
            let factor = scale_w.max(scale_h);
            if factor >= 1.0 {
                // The box is larger than the image on one side: no upscaling, cut the largest
                // centred region of the box's aspect ratio (at most the box) at full size.
                let (rw, rh) = if u64::from(w) * bh >= u64::from(h) * bw {
                    ((u64::from(h) * bw / bh) as u32, h)
                } else {
                    (w, (u64::from(w) * bh / bw) as u32)
                };
                let (rw, rh) = (rw.clamp(1, size.width), rh.clamp(1, size.height));
                image.crop_imm((w - rw.min(w)) / 2, (h - rh.min(h)) / 2, rw, rh)
            } else {
                let sw = ((f64::from(w) * factor).ceil() as u32).max(size.width);
                let sh = ((f64::from(h) * factor).ceil() as u32).max(size.height);
                let scaled = image.thumbnail_exact(sw, sh);
                scaled.crop_imm(
                    (sw - size.width) / 2,
                    (sh - size.height) / 2,
                    size.width,
                    size.height,
                )
            }
        }
    }
}

fn encode(image: DynamicImage, jpeg: bool) -> image::ImageResult<Thumbnail> {
    let (width, height) = (image.width(), image.height());
    let mut out = Cursor::new(Vec::new());
    let content_type = if jpeg {
        let rgb = DynamicImage::ImageRgb8(image.to_rgb8());
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 80).encode_image(&rgb)?;
        "image/jpeg"
    } else {
        image.write_to(&mut out, ImageFormat::Png)?;
        "image/png"
    };
    Ok(Thumbnail {
        bytes: out.into_inner(),
        content_type,
        width,
        height,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_snap_to_the_standard_sizes() {
        assert_eq!(select(10, 10, Method::Crop), SIZES[0]);
        assert_eq!(select(32, 32, Method::Crop), SIZES[0]);
        assert_eq!(select(33, 20, Method::Crop), SIZES[1]);
        assert_eq!(select(500, 500, Method::Crop), SIZES[1]);
        assert_eq!(select(100, 100, Method::Scale), SIZES[2]);
        assert_eq!(select(321, 10, Method::Scale), SIZES[3]);
        assert_eq!(select(5000, 5000, Method::Scale), SIZES[4]);
    }

    fn img(w: u32, h: u32) -> DynamicImage {
        DynamicImage::ImageRgb8(image::RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([(x % 256) as u8, (y % 256) as u8, 7])
        }))
    }

    #[test]
    fn scale_fits_and_never_upscales() {
        let t = resize(&img(1000, 500), SIZES[2]);
        assert_eq!((t.width(), t.height()), (320, 160));
        let t = resize(&img(100, 50), SIZES[4]);
        assert_eq!((t.width(), t.height()), (100, 50));
    }

    #[test]
    fn crop_fills_the_box_and_never_upscales() {
        let t = resize(&img(1000, 500), SIZES[1]);
        assert_eq!((t.width(), t.height()), (96, 96));
        let t = resize(&img(500, 1000), SIZES[0]);
        assert_eq!((t.width(), t.height()), (32, 32));
        let t = resize(&img(40, 20), SIZES[1]);
        assert_eq!((t.width(), t.height()), (20, 20));
        let t = resize(&img(96, 200), SIZES[1]);
        assert_eq!((t.width(), t.height()), (96, 96));
    }
}
