#!/usr/bin/env python3
"""PIL reference fixtures for the image preprocessing tests (tests/image_preprocess.rs).

MiniGPT-4's eval transform (spec §1) on a file path is
    Image.open(path).convert('RGB') -> Image.resize((S, S), Image.BICUBIC)   (torchvision Resize
    on a PIL image delegates to this) -> ToTensor (/255) -> Normalize(CLIP mean, std)
and this script records what Pillow produces at each step.

Writes tests/fixtures/images/:
  <name>.<ext>            the source image (photos from scikit-image's bundled data, odd sizes,
                          every PNG colour type PIL distinguishes, CMYK JPEG, WebP, ...)
  <name>.rgb.png          Image.open(src).convert('RGB') pixels (lossless), omitted when the
                          source is itself an 8-bit RGB PNG without alpha (identical then);
                          a reference identical to one already written is not written again
                          (the manifest names the file that holds it)
  <name>.224.png          convert('RGB').resize((224, 224), BICUBIC)
  <name>.448.png          the same at 448 (only where listed)
  <name>.<S>.f32.bin      the normalised float32 CHW tensor (little endian), computed in float32
  <name>.<S>.f32.json     exactly as torchvision's ToTensor + Normalize do; sidecar with shape
  bomb_*.png / *.jpg      tiny files whose headers declare huge images
  manifest.json           one entry per source: file, PIL mode on open, size, reference files

Run from anywhere: python3 tests/golden/make_image_goldens.py
Needs Pillow (with WebP), numpy, scikit-image. Pillow's version is recorded in the manifest.
"""

import io
import json
import os
import struct
import zlib

import numpy as np
import PIL
from PIL import Image, features
import skimage.data

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "tests", "fixtures", "images")

MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


def small(arr, max_side):
    """A photo from skimage, downscaled (LANCZOS) so its longer side is at most max_side."""
    im = Image.fromarray(arr)
    w, h = im.size
    f = max_side / max(w, h)
    if f < 1:
        im = im.resize((max(1, round(w * f)), max(1, round(h * f))), Image.LANCZOS)
    return im


def png_chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def raw_png(width, height, bit_depth, color_type, rows, extra=b""):
    """A PNG written by hand (for 16-bit colour types PIL cannot write, and for bombs)."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    raw = b"".join(b"\x00" + r for r in rows)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + extra
        + png_chunk(b"IDAT", zlib.compress(raw, 9))
        + png_chunk(b"IEND", b"")
    )


def tensor(rgb):
    """torchvision ToTensor + Normalize, float32 throughout, CHW."""
    x = np.asarray(rgb, dtype=np.uint8).astype(np.float32) / np.float32(255)
    x = (x - MEAN) / STD
    return np.ascontiguousarray(x.transpose(2, 0, 1)).astype("<f4")


def main():
    os.makedirs(OUT, exist_ok=True)
    for f in os.listdir(OUT):
        os.remove(os.path.join(OUT, f))

    sources = {}  # name -> (filename, bytes)

    def add(name, ext, data):
        sources[name] = (f"{name}.{ext}", data)

    def save(name, ext, im, **kw):
        b = io.BytesIO()
        im.save(b, **kw)
        add(name, ext, b.getvalue())

    # Real photos.
    photos = {
        "chelsea": skimage.data.chelsea(),
        "coffee": skimage.data.coffee(),
        "astronaut": skimage.data.astronaut(),
        "rocket": skimage.data.rocket(),
    }
    for n, arr in photos.items():
        save(f"{n}_q90", "jpg", small(arr, 200), format="JPEG", quality=90)
    for n in ["chelsea", "astronaut"]:
        save(f"{n}", "png", small(photos[n], 160), format="PNG")
    astro = small(photos["astronaut"], 200)  # same pixels as astronaut_q90, other encodings
    save("astronaut_444", "jpg", astro, format="JPEG", quality=90, subsampling=0)
    save("astronaut_prog", "jpg", astro, format="JPEG", quality=90, progressive=True)
    save("chelsea_gray", "jpg", small(photos["chelsea"], 200).convert("L"), format="JPEG",
         quality=90)
    save("coffee_cmyk", "jpg", small(photos["coffee"], 200).convert("CMYK"), format="JPEG",
         quality=90)
    if features.check("webp"):
        save("rocket_lossy", "webp", small(photos["rocket"], 200), format="WEBP", quality=85)
        save("rocket_lossless", "webp", small(photos["rocket"], 160), format="WEBP",
             lossless=True)

    # Odd sizes (content: a photo, blurred to keep the files small, stretched to the size).
    coffee = Image.fromarray(photos["coffee"]).resize((48, 32), Image.BOX)
    for w, h in [(1, 1), (2, 2000), (3000, 17), (224, 224), (225, 223), (7, 5)]:
        save(f"size_{w}x{h}", "png", coffee.resize((w, h), Image.BILINEAR), format="PNG")

    # Every PNG mode PIL distinguishes.
    chel = small(photos["chelsea"], 160)
    save("gray", "png", chel.convert("L"), format="PNG")
    save("bilevel", "png", small(photos["chelsea"], 64).convert("1"), format="PNG")
    pal = chel.quantize(colors=64)
    save("palette", "png", pal, format="PNG")
    pal16 = chel.quantize(colors=16)
    save("palette_4bit", "png", pal16, format="PNG", bits=4)
    palt = pal.copy()
    palt.info["transparency"] = 3
    save("palette_trns", "png", palt, format="PNG", transparency=3)
    rgba = chel.convert("RGBA")
    a = np.asarray(rgba).copy()
    hh, ww = a.shape[:2]
    a[..., 3] = (np.add.outer(np.arange(hh) * 255 // max(hh - 1, 1),
                              np.arange(ww) * 0)).astype(np.uint8)
    a[: hh // 4, : ww // 4, 3] = 0  # fully transparent corner: colour must survive
    save("rgba", "png", Image.fromarray(a, "RGBA"), format="PNG")
    la = np.stack([np.asarray(chel.convert("L")), a[..., 3]], axis=-1)
    save("gray_alpha", "png", Image.fromarray(la, "LA"), format="PNG")

    # 16-bit PNGs (PIL: gray16 opens as I;16 and convert('RGB') clips at 255; RGB/RGBA/LA 16
    # open as 8-bit, keeping the high byte).
    def ramp16(h, w, c, seed):
        # smooth 16-bit ramps whose low bytes take every value (high byte vs rounding matters)
        y, x = np.mgrid[0:h, 0:w]
        ch = [(x * 1543 + y * 977 * (k + 1) + seed * 12345) % 65536 for k in range(c)]
        return np.stack(ch, axis=-1).astype(">u2")

    g16 = (np.add.outer(np.arange(24), np.arange(40)) * 70).astype(">u2")
    g16[0, :8] = [0, 1, 254, 255, 256, 300, 65280, 65535]
    add("gray16", "png", raw_png(40, 24, 16, 0, [r.tobytes() for r in g16]))
    c16 = ramp16(20, 30, 3, 1)
    add("rgb16", "png", raw_png(30, 20, 16, 2, [r.tobytes() for r in c16]))
    c16a = ramp16(20, 30, 4, 2)
    add("rgba16", "png", raw_png(30, 20, 16, 6, [r.tobytes() for r in c16a]))
    la16 = ramp16(20, 30, 2, 3)
    add("gray_alpha16", "png", raw_png(30, 20, 16, 4, [r.tobytes() for r in la16]))

    manifest = {
        "pillow": PIL.__version__,
        "libjpeg": features.version("jpg"),
        "webp": features.version("webp"),
        "images": [],
    }
    resize448 = {"chelsea"}
    tensors = {"astronaut": [224]}
    written = {}  # pixel bytes + size -> file name (identical references are stored once)

    def save_ref(im, fname):
        key = (im.size, im.tobytes())
        if key not in written:
            im.save(os.path.join(OUT, fname), format="PNG")
            written[key] = fname
        return written[key]

    for name, (fname, data) in sorted(sources.items()):
        with open(os.path.join(OUT, fname), "wb") as f:
            f.write(data)
        im = Image.open(io.BytesIO(data))
        mode = im.mode
        rgb = im.convert("RGB")
        entry = {"name": name, "file": fname, "mode": mode, "width": rgb.width,
                 "height": rgb.height, "format": im.format}
        plain = im.format == "PNG" and mode == "RGB" and "transparency" not in im.info
        if plain and not fname.startswith("rgb16"):
            entry["rgb"] = fname
        else:
            entry["rgb"] = save_ref(rgb, f"{name}.rgb.png")
        entry["resized"] = {}
        for s in [224] + ([448] if name in resize448 else []):
            r = rgb.resize((s, s), Image.BICUBIC)
            entry["resized"][str(s)] = save_ref(r, f"{name}.{s}.png")
        entry["tensor"] = {}
        for s in tensors.get(name, []):
            t = tensor(rgb.resize((s, s), Image.BICUBIC))
            tf = f"{name}.{s}.f32.bin"
            t.tofile(os.path.join(OUT, tf))
            with open(os.path.join(OUT, f"{name}.{s}.f32.json"), "w") as f:
                json.dump({"shape": list(t.shape), "dtype": "float32", "order": "CHW",
                           "byteorder": "little"}, f)
            entry["tensor"][str(s)] = tf
        manifest["images"].append(entry)

    # Decompression bombs: headers declaring huge images, a few hundred bytes each.
    bomb_rows = [b"\x00" * 8]  # IDAT content is irrelevant: the size check must come first
    with open(os.path.join(OUT, "bomb_60000x60000.png"), "wb") as f:
        f.write(raw_png(60000, 60000, 8, 2, bomb_rows))
    with open(os.path.join(OUT, "bomb_16385x1.png"), "wb") as f:
        f.write(raw_png(16385, 1, 8, 0, [b"\x00" * 16385]))
    # JPEG: take a real 8x8 JPEG and patch the SOF0 size fields to 65000x65000.
    b = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(b, format="JPEG")
    j = bytearray(b.getvalue())
    sof = j.index(b"\xff\xc0")
    struct.pack_into(">HH", j, sof + 5, 65000, 65000)
    with open(os.path.join(OUT, "bomb_65000x65000.jpg"), "wb") as f:
        f.write(j)

    with open(os.path.join(OUT, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    total = sum(os.path.getsize(os.path.join(OUT, f)) for f in os.listdir(OUT))
    print(f"{len(sources)} sources, {len(os.listdir(OUT))} files, {total / 1e6:.2f} MB in {OUT}")


if __name__ == "__main__":
    main()
