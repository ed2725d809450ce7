#!/usr/bin/env python3
"""Extra JPEG fixtures for the JPEG decoder (src/jpeg.rs, tests/image_preprocess.rs).

Pillow's encoder only writes 4:4:4, 4:2:2 and 4:2:0 sampling without restart intervals, so
besides a few Pillow-encoded files this script carries a small JPEG encoder of its own (float
DCT, optimal Huffman tables per scan, ITU T.81 Annex K.2 code lengths) that writes the
layouts a decoder must also handle: 4:4:0, 4:1:1 and mixed sampling factors, restart
intervals, one scan per component, progressive scans with end-of-band runs and DC successive
approximation, YCCK and RGB (Adobe APP14), 'R','G','B' component ids, no Huffman tables at all
(the standard ones are implied), 16-bit quantisation tables, stray bytes between markers.

The reference for each is what Pillow decodes: Image.open(f).convert('RGB').

Writes into tests/fixtures/images/ (next to make_image_goldens.py's files, which that script
deletes when it runs: run this one again afterwards):
  jpeg_<case>.jpg       the file
  jpeg_<case>.rgb.png   Pillow 13's Image.open(f).convert('RGB'), lossless

Run from anywhere: python3 tests/golden/make_jpeg_fixtures.py
Also: python3 tests/golden/make_jpeg_fixtures.py --corpus DIR N   writes N random files of
every kind to DIR as <name>.jpg + <name>.raw (Pillow's RGB bytes), for stress testing.
Needs Pillow, numpy and scikit-image (for the photo content).
"""

import io
import math
import os
import random
import struct
import sys

import numpy as np
import PIL
from PIL import Image
import skimage.data

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "tests", "fixtures", "images")


def zigzag():
    """Row-major positions of the coefficients in stream order."""
    order = []
    for d in range(15):
        rows = range(max(0, d - 7), min(d, 7) + 1)
        rows = reversed(rows) if d % 2 == 0 else rows
        order += [r * 8 + (d - r) for r in rows]
    return order


ZZ = zigzag()
_u = np.arange(8)
DCT = np.array([[(math.sqrt(0.5) if u == 0 else 1.0) / 2 * math.cos((2 * x + 1) * u * math.pi / 16)
                 for x in range(8)] for u in range(8)])


def qtable(quality, chroma=False):
    """A quantisation table (row-major), coarser towards high frequencies."""
    base = np.add.outer(_u, _u).astype(float) * (3.0 if chroma else 2.0) + (12 if chroma else 8)
    scale = (100 - quality) / 50 + 0.02
    return np.clip(np.round(base * scale), 1, 255).astype(int)


def category(v):
    v = abs(int(v))
    return v.bit_length()


def magnitude_bits(v, size):
    return v if v >= 0 else v + (1 << size) - 1


class Component:
    def __init__(self, cid, h, v, plane, tq, td=0, ta=0):
        self.id, self.h, self.v, self.plane, self.tq, self.td, self.ta = cid, h, v, plane, tq, td, ta


def code_lengths(freq):
    """JPEG Annex K.2: Huffman code lengths limited to 16 bits, the all-ones code unused.
    freq: {symbol: count}. Returns (counts per length 1..16, symbols in code order)."""
    syms = sorted(freq)
    if not syms:
        syms = [0]
        freq = {0: 1}
    f = {s: freq[s] for s in syms}
    f[256] = 1  # reserved pseudo-symbol: keeps the all-ones code free
    size = {s: 0 for s in f}
    groups = {s: [s] for s in f}
    live = dict(f)
    while len(live) > 1:
        a = min(live, key=lambda s: (live[s], -s))
        fa = live.pop(a)
        b = min(live, key=lambda s: (live[s], -s))
        live[b] += fa
        for s in groups[a] + groups[b]:
            size[s] += 1
        groups[b] += groups.pop(a)
    bits = [0] * 64
    for s in size:
        bits[max(size[s], 1)] += 1
    for i in range(63, 16, -1):
        while bits[i] > 0:
            j = i - 2
            while bits[j] == 0:
                j -= 1
            bits[i] -= 2
            bits[i - 1] += 1
            bits[j + 1] += 2
            bits[j] -= 1
    i = 16
    while bits[i] == 0:
        i -= 1
    bits[i] -= 1  # drop the reserved code
    order = sorted(syms, key=lambda s: (-f[s], s))
    return bits[1:17], order


def huff_codes(counts, symbols):
    codes, code, k = {}, 0, 0
    for length in range(1, 17):
        for _ in range(counts[length - 1]):
            codes[symbols[k]] = (code, length)
            code += 1
            k += 1
        code <<= 1
    return codes


class BitWriter:
    def __init__(self):
        self.out = bytearray()
        self.acc = 0
        self.n = 0

    def put(self, value, n):
        for i in range(n - 1, -1, -1):
            self.acc = (self.acc << 1) | ((value >> i) & 1)
            self.n += 1
            if self.n == 8:
                self.out.append(self.acc)
                if self.acc == 0xFF:
                    self.out.append(0)
                self.acc = self.n = 0

    def flush(self):
        while self.n:
            self.put(1, 1)


def segment(code, payload):
    return bytes([0xFF, code]) + struct.pack(">H", len(payload) + 2) + payload


def standard_tables():
    """The Annex K tables, as libjpeg writes them for an unoptimised file."""
    b = io.BytesIO()
    Image.new("RGB", (8, 8)).save(b, "JPEG")
    d = b.getvalue()
    tables, i = {}, 2
    while d[i + 1] != 0xDA:
        n = struct.unpack(">H", d[i + 2:i + 4])[0]
        if d[i + 1] == 0xC4:
            s, j = d[i + 4:i + 2 + n], 0
            while j < len(s):
                counts = list(s[j + 1:j + 17])
                m = sum(counts)
                tables[(s[j] >> 4, s[j] & 15)] = (counts, list(s[j + 17:j + 17 + m]))
                j += 17 + m
        i += 2 + n
    return tables


def encode(comps, *, progressive=False, scans=None, restart=0, app=(), quality=85,
           qbits16=False, huffman="optimal", junk=False):
    """A JPEG of the given components (full-resolution planes, downsampled here by box
    averaging). scans: None = one interleaved scan (sequential) or a default script
    (progressive); else a list of (component indices, Ss, Se, Ah, Al)."""
    H, W = comps[0].plane.shape
    hmax = max(c.h for c in comps)
    vmax = max(c.v for c in comps)
    mcux, mcuy = -(-W // (8 * hmax)), -(-H // (8 * vmax))
    qts = {}
    blocks = []  # per component: quantised coefficients [by, bx, 64] (row-major)
    for c in comps:
        big = np.pad(c.plane.astype(float), ((0, mcuy * 8 * vmax - H), (0, mcux * 8 * hmax - W)),
                     mode="edge")
        fy, fx = vmax // c.v, hmax // c.h
        small = big.reshape(big.shape[0] // fy, fy, big.shape[1] // fx, fx).mean(axis=(1, 3))
        q = qts.setdefault(c.tq, qtable(quality, c.tq > 0) * (3 if qbits16 else 1))
        bh, bw = small.shape[0] // 8, small.shape[1] // 8
        coef = np.zeros((bh, bw, 64), dtype=int)
        for by in range(bh):
            for bx in range(bw):
                f = small[by * 8:by * 8 + 8, bx * 8:bx * 8 + 8] - 128
                coef[by, bx] = np.round(DCT @ f @ DCT.T / q).astype(int).reshape(64)
        blocks.append(coef)
        c.dw, c.dh = -(-W * c.h // hmax), -(-H * c.v // vmax)

    if scans is None:
        if not progressive:
            scans = [(list(range(len(comps))), 0, 63, 0, 0)]
        else:
            n = list(range(len(comps)))
            scans = [(n, 0, 0, 0, 1)]
            for i in n:
                scans += [([i], 1, 5, 0, 0), ([i], 6, 63, 0, 0)]
            scans.append((n, 0, 0, 1, 0))

    def scan_symbols(members, ss, se, ah, al):
        """The scan as a list of ('dc'|'ac', table id, symbol, bits, nbits) and 'rst'."""
        out = []
        single = len(members) == 1
        if single:
            c = comps[members[0]]
            mx, my = -(-c.dw // 8), -(-c.dh // 8)
        else:
            mx, my = mcux, mcuy
        pred = {i: 0 for i in members}
        eobrun = [0]
        # The standard tables have no EOBn symbols for n > 0: runs of one block only.
        eob_limit = 1 if huffman == "standard" else 0x7FFF
        table_of = {i: comps[i].ta for i in members}

        def flush_eob(i):
            if eobrun[0]:
                r = eobrun[0].bit_length() - 1
                out.append(("ac", table_of[i], r << 4, eobrun[0] - (1 << r), r))
                eobrun[0] = 0

        for m in range(mx * my):
            if restart and m and m % restart == 0:
                for i in members:
                    flush_eob(i)
                out.append("rst")
                pred = {i: 0 for i in members}
            x0, y0 = m % mx, m // mx
            for i in members:
                c = comps[i]
                nh, nv = (1, 1) if single else (c.h, c.v)
                for by in range(nv):
                    for bx in range(nh):
                        blk = blocks[i][y0 * nv + by, x0 * nh + bx]
                        zz = [int(blk[k]) for k in ZZ]
                        if ss == 0 and ah == 0:
                            dc = zz[0] >> al
                            diff = dc - pred[i]
                            pred[i] = dc
                            s = category(diff)
                            out.append(("dc", c.td, s, magnitude_bits(diff, s), s))
                            if progressive:
                                continue
                        elif ss == 0:
                            out.append(("raw", 0, 0, (zz[0] >> al) & 1, 1))
                            continue
                        band = zz[max(ss, 1):se + 1]
                        if progressive:
                            band = [int(v / (1 << al)) for v in band]  # point transform
                        last = max((k for k, v in enumerate(band) if v), default=-1)
                        if progressive and last < 0:
                            eobrun[0] += 1
                            if eobrun[0] == eob_limit:
                                flush_eob(i)
                            continue
                        if progressive:
                            flush_eob(i)
                        run = 0
                        for k in range(last + 1):
                            v = band[k]
                            if v == 0:
                                run += 1
                                continue
                            while run > 15:
                                out.append(("ac", c.ta, 0xF0, 0, 0))
                                run -= 16
                            s = category(v)
                            out.append(("ac", c.ta, (run << 4) | s, magnitude_bits(v, s), s))
                            run = 0
                        if last < len(band) - 1:
                            if progressive:
                                eobrun[0] += 1
                                if eobrun[0] == eob_limit:
                                    flush_eob(i)
                            else:
                                out.append(("ac", c.ta, 0, 0, 0))
        for i in members[:1]:
            flush_eob(i)
        return out

    std = standard_tables()
    body = bytearray()
    dqt = b""
    for tq, q in sorted(qts.items()):
        vals = [int(q.reshape(64)[k]) for k in ZZ]
        if qbits16:
            dqt += bytes([0x10 | tq]) + b"".join(struct.pack(">H", v) for v in vals)
        else:
            dqt += bytes([tq]) + bytes(vals)
    sof = 0xC2 if progressive else 0xC0
    frame = struct.pack(">BHHB", 8, H, W, len(comps)) + b"".join(
        bytes([c.id, (c.h << 4) | c.v, c.tq]) for c in comps)
    out = bytearray(b"\xff\xd8")
    for code, payload in app:
        out += segment(code, payload)
    out += segment(0xDB, dqt)
    if junk:
        out += b"\x00\x13\xff\xff\xff"  # stray bytes and fill bytes before a marker
    out += segment(sof, frame)
    if restart:
        out += segment(0xDD, struct.pack(">H", restart))
    for members, ss, se, ah, al in scans:
        syms = scan_symbols(members, ss, se, ah, al)
        if huffman == "optimal":
            freq = {}
            for s in syms:
                if s != "rst" and s[0] != "raw":
                    freq.setdefault((s[0], s[1]), {}).setdefault(s[2], 0)
                    freq[(s[0], s[1])][s[2]] += 1
            tables = {key: code_lengths(f) for key, f in sorted(freq.items())}
            dht = b"".join(bytes([(0 if k[0] == "dc" else 0x10) | k[1]]) + bytes(t[0]) + bytes(t[1])
                           for k, t in tables.items())
            if dht:
                out += segment(0xC4, dht)
        else:
            tables = {("dc", i): std[(0, i)] for i in range(2)}
            tables.update({("ac", i): std[(1, i)] for i in range(2)})
        codes = {k: huff_codes(*t) for k, t in tables.items()}
        sos = bytes([len(members)]) + b"".join(
            bytes([comps[i].id, (comps[i].td << 4) | comps[i].ta]) for i in members)
        out += segment(0xDA, sos + bytes([ss, se, (ah << 4) | al]))
        bw = BitWriter()
        rst = 0
        for s in syms:
            if s == "rst":
                bw.flush()
                bw.out += bytes([0xFF, 0xD0 + rst])
                rst = (rst + 1) & 7
                continue
            kind, t, sym, val, n = s
            if kind != "raw":
                code, length = codes[(kind, t)][sym]
                bw.put(code, length)
            bw.put(val, n)
        bw.flush()
        out += bw.out
    out += b"\xff\xd9"
    return bytes(out)


JFIF = (0xE0, b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00")


def adobe(transform):
    return (0xEE, b"Adobe" + struct.pack(">HHHB", 100, 0, 0, transform))


def ycc(rgb):
    """JFIF RGB -> YCbCr planes (float, rounded, clipped)."""
    r, g, b = [rgb[..., i].astype(float) for i in range(3)]
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cb = -0.168736 * r - 0.331264 * g + 0.5 * b + 128
    cr = 0.5 * r - 0.418688 * g - 0.081312 * b + 128
    return [np.clip(np.round(p), 0, 255).astype(np.uint8) for p in (y, cb, cr)]


def photo(w, h, which="astronaut", x=0, y=0):
    arr = getattr(skimage.data, which)()
    im = Image.fromarray(arr).resize((arr.shape[1] // 3, arr.shape[0] // 3), Image.BOX)
    return np.asarray(im)[y:y + h, x:x + w]


def ycbcr_comps(rgb, factors, ids=(1, 2, 3)):
    planes = ycc(rgb)
    return [Component(ids[i], *factors[i], planes[i], min(i, 1), min(i, 1), min(i, 1))
            for i in range(3)]


def cases():
    """name -> JPEG bytes."""
    out = {}
    astro = photo(64, 48, x=40, y=20)
    coffee = photo(64, 48, "coffee", x=60, y=40)

    def pil(name, im, **kw):
        b = io.BytesIO()
        im.save(b, "JPEG", **kw)
        out[name] = b.getvalue()

    # Pillow-encoded: odd sizes, 4:2:2, chroma only 1-2 samples wide (plain upsampling),
    # progressive grey.
    pil("pil_422_37x23", Image.fromarray(astro[:23, :37]), quality=80, subsampling=1)
    pil("pil_420_17x9", Image.fromarray(coffee[:9, :17]), quality=80, subsampling=2)
    pil("pil_420_3x5", Image.fromarray(astro[10:15, 20:23]), quality=90, subsampling=2)
    pil("pil_422_4x7_prog", Image.fromarray(coffee[:7, 30:34]), quality=90, subsampling=1,
        progressive=True)
    pil("pil_gray_prog_45x31", Image.fromarray(astro[:31, :45]).convert("L"), quality=85,
        progressive=True)
    pil("pil_420_prog_opt_50x33", Image.fromarray(coffee[:33, :50]), quality=70,
        progressive=True, optimize=True)

    # Own encoder: sampling layouts.
    a = astro[:21, :33]
    out["440_33x21"] = encode(ycbcr_comps(a, [(1, 2), (1, 1), (1, 1)]), app=[JFIF])
    out["411_41x19"] = encode(ycbcr_comps(astro[:19, :41], [(4, 1), (1, 1), (1, 1)]), app=[JFIF])
    out["mixed_29x27"] = encode(ycbcr_comps(coffee[:27, :29], [(1, 2), (2, 1), (1, 1)]),
                                app=[JFIF])
    out["chroma_2x2_luma_1x1_26x18"] = encode(
        ycbcr_comps(astro[:18, :26], [(1, 1), (2, 2), (2, 2)]), app=[JFIF])
    out["311_30x10"] = encode(ycbcr_comps(coffee[:10, :30], [(3, 1), (1, 1), (1, 1)]))
    # Restart intervals, one scan per component, progressive with restarts and EOB runs.
    out["420_restart3_47x35"] = encode(ycbcr_comps(astro[:35, :47], [(2, 2), (1, 1), (1, 1)]),
                                       restart=3, app=[JFIF])
    out["420_scan_per_component_40x24"] = encode(
        ycbcr_comps(coffee[:24, :40], [(2, 2), (1, 1), (1, 1)]), app=[JFIF],
        scans=[([0], 0, 63, 0, 0), ([2], 0, 63, 0, 0), ([1], 0, 63, 0, 0)])
    out["prog_420_restart2_48x40"] = encode(
        ycbcr_comps(astro[:40, :48], [(2, 2), (1, 1), (1, 1)]), progressive=True, restart=2,
        app=[JFIF])
    out["prog_gray_restart5_61x13"] = encode(
        [Component(1, 1, 1, ycc(astro[:13, :61])[0], 0)], progressive=True, restart=5,
        scans=[([0], 0, 0, 0, 2), ([0], 1, 2, 0, 0), ([0], 3, 63, 0, 0), ([0], 0, 0, 2, 1),
               ([0], 0, 0, 1, 0)])
    # Colour spaces.
    # Stored samples (Adobe's inverted CMYK): 255 - C, 255 - M, 255 - Y, 255 - K.
    yy, xx = np.mgrid[0:20, 0:24]
    inv = np.dstack([coffee[:20, :24], (255 - xx * 6 - yy * 3).astype(np.uint8)])
    yk = ycc(inv[..., :3]) + [inv[..., 3]]
    out["ycck_24x20"] = encode([Component(i + 1, 1, 1, yk[i], min(i, 1)) for i in range(4)],
                               app=[adobe(2)])
    out["ycck_420_24x20"] = encode(
        [Component(i + 1, *([2, 2] if i in (0, 3) else [1, 1]), yk[i], min(i, 1))
         for i in range(4)], app=[adobe(2)])
    out["cmyk_no_adobe_24x20"] = encode(
        [Component(i + 1, 1, 1, inv[..., i], 0) for i in range(4)])
    rgbp = [astro[:15, :22, i] for i in range(3)]
    out["adobe_rgb_22x15"] = encode([Component(i + 1, 1, 1, rgbp[i], 0) for i in range(3)],
                                    app=[adobe(0)])
    out["rgb_ids_22x15"] = encode([Component(ord("RGB"[i]), 1, 1, rgbp[i], 0) for i in range(3)])
    out["jfif_and_adobe_rgb_22x15"] = encode(
        [Component(i + 1, 1, 1, rgbp[i], 0) for i in range(3)], app=[JFIF, adobe(0)])
    # Tables and stream details.
    out["std_tables_no_dht_30x20"] = encode(
        ycbcr_comps(coffee[:20, :30], [(2, 2), (1, 1), (1, 1)]), huffman="standard",
        app=[JFIF])
    out["dqt16_junk_27x14"] = encode(ycbcr_comps(astro[:14, :27], [(2, 1), (1, 1), (1, 1)]),
                                     qbits16=True, junk=True, app=[JFIF])
    return out


def random_case(rng, i):
    """One random file for the stress corpus."""
    w, h = rng.choice([1, 2, 3, 5, 8, 9, 16, 17, 31, 33, 50]), rng.choice([1, 2, 3, 7, 8, 15, 24, 41])
    src = photo(100, 80, rng.choice(["astronaut", "coffee", "chelsea"]))
    x, y = rng.randrange(100 - w + 1), rng.randrange(80 - h + 1)
    rgb = np.ascontiguousarray(src[y:y + h, x:x + w])
    if rng.random() < 0.2:
        rgb = np.random.default_rng(i).integers(0, 256, rgb.shape, dtype=np.uint8)
    kind = rng.choice(["ycc", "ycc", "ycc", "gray", "ycck", "rgb"])
    f = [1, 2]
    if kind in ("ycc", "ycck"):
        fac = [(rng.choice(f), rng.choice(f)) for _ in range(3 if kind == "ycc" else 4)]
        planes = ycc(rgb) + ([255 - rgb[..., 0]] if kind == "ycck" else [])
        comps = [Component(j + 1, *fac[j], planes[j], min(j, 1), min(j, 1), min(j, 1))
                 for j in range(len(planes))]
        app = [JFIF] if kind == "ycc" else [adobe(2)]
    elif kind == "gray":
        comps = [Component(1, rng.choice(f), rng.choice(f), ycc(rgb)[0], 0)]
        app = []
    else:
        comps = [Component(j + 1, 1, 1, rgb[..., j], 0) for j in range(3)]
        app = [adobe(0)]
    hmax = max(c.h for c in comps)
    vmax = max(c.v for c in comps)
    for c in comps:  # keep sampling ratios whole numbers
        c.h, c.v = (c.h if hmax % c.h == 0 else hmax), (c.v if vmax % c.v == 0 else vmax)
    return encode(comps, progressive=rng.random() < 0.4, restart=rng.choice([0, 0, 1, 2, 7]),
                  app=app, quality=rng.choice([20, 60, 90, 98]), qbits16=rng.random() < 0.1,
                  huffman=rng.choice(["optimal", "optimal", "standard"]))


def pil_rgb(data):
    return Image.open(io.BytesIO(data)).convert("RGB")


def main():
    if len(sys.argv) == 4 and sys.argv[1] == "--corpus":
        d, n = sys.argv[2], int(sys.argv[3])
        os.makedirs(d, exist_ok=True)
        rng = random.Random(7)
        for i in range(n):
            data = random_case(rng, i)
            name = os.path.join(d, f"own_{i:04d}")
            with open(name + ".jpg", "wb") as f:
                f.write(data)
            try:
                rgb = pil_rgb(data).tobytes()
            except OSError as e:  # libjpeg refuses it: so should the decoder under test
                with open(name + ".err", "w") as f:
                    f.write(str(e))
                continue
            with open(name + ".raw", "wb") as f:
                f.write(rgb)
        return
    for name, data in cases().items():
        base = os.path.join(OUT, f"jpeg_{name}")
        with open(base + ".jpg", "wb") as f:
            f.write(data)
        im = pil_rgb(data)
        im.save(base + ".rgb.png", "PNG")
        print(f"jpeg_{name}.jpg: {im.size[0]}x{im.size[1]}, {len(data)} bytes "
              f"(Pillow {PIL.__version__})")


if __name__ == "__main__":
    main()
