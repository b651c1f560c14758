"""
Media files, in one place below every user (sample.py, data.py, publish.py, demo.py, bench/): H.264 mp4 through
PyAV (written whole or streamed block by block, and read back), and a tiny pure-Python PNG / animated GIF writer,
contact sheets and a line-plot rasteriser with a 3x5 pixel font (no PIL or matplotlib at run time).
Videos are (3,F,H,W) tensors in [-1,1] on the way in, uint8 (F,H,W,3) arrays everywhere else.
"""
import os
import re
import struct
import zlib

import numpy as np
import torch
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# video: mp4 in and out

def to_uint8(video):
    """(3,F,H,W) in [-1,1] -> uint8 (F,H,W,3) numpy, rounded (what the mp4 writer encodes)."""
    return ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).cpu().numpy()


class Mp4Writer:
    """An H.264 mp4 (yuv420p, crf 17) kept open: write(video) appends frames as they come (streaming),
    close() flushes the encoder. video (3,F,H,W) in [−1,1]."""

    def __init__(self, path, fps=16):
        import av
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path, self.container, self.stream = path, av.open(path, mode="w"), None
        self.fps = fps

    def write(self, video):
        import av
        frames = to_uint8(video)
        if self.stream is None:
            self.stream = self.container.add_stream("libx264", rate=self.fps)
            self.stream.height, self.stream.width = frames.shape[1:3]
            self.stream.pix_fmt = "yuv420p"
            self.stream.options = {"crf": "17"}
            self.stream.codec_context.thread_count = 1   # x264's threads and the encoder's own RGB->YUV pass made
            self.n = 0                                   # the bytes vary run to run (steadier now, not exact under load)
        for fr in frames:
            frame = av.VideoFrame.from_ndarray(fr, format="rgb24").reformat(format="yuv420p")
            frame.pts, self.n = self.n, self.n + 1
            self.container.mux(self.stream.encode(frame))

    def close(self):
        if self.stream is not None:
            self.container.mux(self.stream.encode())
        self.container.close()
        return self.path


def write_mp4(path, video, fps=16):
    """video (3,F,H,W) in [−1,1] -> H.264 mp4 (yuv420p) at fps, written with PyAV."""
    w = Mp4Writer(path, fps)
    w.write(video)
    return w.close()


def read_mp4(path):
    """-> (uint8 frames (F,H,W,3), fps)."""
    import av
    with av.open(path) as container:
        stream = container.streams.video[0]
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)])
        return frames, float(stream.average_rate)


def slug(text, n=40):
    return re.sub(r"[^a-zA-Z0-9]+", "_", text).strip("_")[:n] or "prompt"

# -----------------------------------------------------------------------------
# reading clips for datasets (PyAV for videos and images alike: images are 1-frame streams of the image2 demuxers)


class BadFile(Exception):
    pass


def probe(path, is_image):
    """Open a file and decode its first frame -> (h, w, n_frames). Raises BadFile(reason)."""
    import av
    if os.path.getsize(path) == 0:
        raise BadFile("zero-byte file")
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise BadFile("no video stream (unsupported)")
            stream = container.streams.video[0]
            first = next(container.decode(stream), None)
            if first is None:
                raise BadFile("no decodable frame (truncated or undecodable)")
            fmt = first.format
            if is_image and max(c.bits for c in fmt.components) > 8:
                # 16-bit stills are usually linear/HDR/scientific data: the tone curve to 8-bit sRGB is a guess
                raise BadFile(f"16-bit image ({fmt.name})")
            if any(c.is_alpha for c in fmt.components):
                # opaque alpha is harmless; real transparency would need a guessed background (black? white?)
                a = first.to_ndarray(format="rgba")[..., 3]
                if a.min() < 255:
                    raise BadFile(f"transparent alpha ({fmt.name})")
            n = 1 if is_image else stream.frames or count_packets(path)   # mkv/webm headers carry no count
            return first.height, first.width, n
    except BadFile:
        raise
    except (av.FFmpegError, OSError, ValueError, StopIteration, IndexError, RuntimeError) as e:
        raise BadFile(f"undecodable ({type(e).__name__}: {e})")


def count_packets(path):
    import av
    with av.open(path) as container:
        return sum(1 for p in container.demux(video=0) if p.size)


def load_frames(path, indices, size, crop, rng):
    """Decode source frames `indices` -> float32 (3, F, H, W) in [-1, 1], RGB, resized (and cropped) to size=(H, W)."""
    import av
    # decodes from the first frame (no seek: exact frame indices without trusting timestamps); fine for clips
    want, out = set(indices), []
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for i, frame in enumerate(container.decode(stream)):
            if i in want:
                # swscale converts any pixel format (yuv 8/10-bit, gray, pal8; opaque alpha dropped) with the
                # frame's own matrix and range tags (BT.601/709, limited/full)
                rgb = torch.from_numpy(frame.to_ndarray(format="rgb24"))          # (h, w, 3) uint8
                out.append(resize_crop(rgb.permute(2, 0, 1)[None].float(), size, crop, rng))  # (1, 3, H, W)
                if len(out) == len(indices):
                    break
    if len(out) < len(indices):
        raise BadFile(f"decoded {len(out)} of {len(indices)} frames (truncated)")
    video = torch.cat(out).permute(1, 0, 2, 3)                                      # (3, F, H, W) in [0, 255]
    return (video / 127.5 - 1).clamp_(-1, 1)


def resize_crop(x, size, crop, rng):
    """x (1, 3, h, w) float -> (1, 3, H, W): plain resize, or cover + center/random crop."""
    H, W = size
    h, w = x.shape[-2:]
    if not crop:
        return F.interpolate(x, size=(H, W), mode="bilinear", antialias=True, align_corners=False)
    s = max(H / h, W / w)
    rh, rw = max(H, round(h * s)), max(W, round(w * s))
    x = F.interpolate(x, size=(rh, rw), mode="bilinear", antialias=True, align_corners=False)  # (1, 3, rh, rw)
    if crop == "center":
        top, left = (rh - H) // 2, (rw - W) // 2
    else:   # drawn once per sample (rng is the sample's own), so every frame gets the same crop
        rng.offsets = rng.offsets or (rng.randint(0, rh - H), rng.randint(0, rw - W))
        top, left = rng.offsets
    return x[..., top:top + H, left:left + W]


def frame_indices(n_src, num_frames, interval, rng):
    """Which source frames to take: num_frames of them, interval apart, from a random start. None if too short."""
    span = (num_frames - 1) * interval + 1
    if n_src < span:
        return None
    start = rng.randint(0, n_src - span)
    return list(range(start, start + span, interval))

# -----------------------------------------------------------------------------
# images: PNG, animated GIF, contact sheets, a line plot with a 3x5 pixel font


def png_bytes(img):
    """uint8 (H,W,3) -> the bytes of an 8-bit RGB PNG (zlib + struct)."""
    img = np.ascontiguousarray(img, dtype=np.uint8)
    h, w, _ = img.shape
    raw = b"".join(b"\0" + img[i].tobytes() for i in range(h))   # filter type 0 per row
    chunk = lambda tag, data: struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


def write_png(path, img):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as f:
        f.write(png_bytes(img))
    return path


GIF_LEVELS = (6, 7, 6)   # a fixed 6x7x6 colour cube: 252 colours, no palette search


def gif_quantize(frames):
    """uint8 (...,3) -> palette indices (...) uint8 in the GIF_LEVELS cube."""
    q = [np.round(frames[..., i].astype(np.float32) * (n - 1) / 255).astype(np.int32) for i, n in enumerate(GIF_LEVELS)]
    return ((q[0] * GIF_LEVELS[1] + q[1]) * GIF_LEVELS[2] + q[2]).astype(np.uint8)


def lzw(indices):
    """GIF LZW of 8-bit indices (minimum code size 8, codes up to 12 bits, a clear code when the table is full)."""
    clear, eoi = 256, 257
    out, acc, nbits = bytearray(), 0, 0

    def emit(code, size):
        nonlocal acc, nbits
        acc |= code << nbits
        nbits += size
        while nbits >= 8:
            out.append(acc & 255)
            acc >>= 8
            nbits -= 8

    table, nxt, size = {}, 258, 9
    emit(clear, size)
    data = bytes(indices)
    prefix = data[0]
    for b in data[1:]:
        key = prefix << 8 | b
        code = table.get(key)
        if code is not None:
            prefix = code
            continue
        emit(prefix, size)
        if nxt < 4096:
            table[key] = nxt
            nxt += 1
            if nxt > 1 << size and size < 12:   # the decoder, one entry behind, widens at the next code
                size += 1
        else:
            emit(clear, size)
            table, nxt, size = {}, 258, 9
        prefix = b
    emit(prefix, size)
    emit(eoi, size)
    if nbits:
        out.append(acc & 255)
    return bytes(out)


def write_gif(path, frames, fps=8):
    """uint8 (F,H,W,3) -> a looping animated GIF89a at fps (colours quantised to the 6x7x6 cube)."""
    F_, H, W, _ = frames.shape
    pal = [(round(r * 255 / 5), round(g * 255 / 6), round(b * 255 / 5)) for r in range(6) for g in range(7) for b in range(6)]
    pal = bytes(v for rgb in pal + [(0, 0, 0)] * (256 - len(pal)) for v in rgb)
    out = [b"GIF89a", struct.pack("<HHBBB", W, H, 0xF7, 0, 0), pal, b"\x21\xff\x0bNETSCAPE2.0\x03\x01\x00\x00\x00"]
    for fr in gif_quantize(frames):
        data = lzw(fr.reshape(-1))
        out += [b"\x21\xf9\x04\x00" + struct.pack("<H", max(2, round(100 / fps))) + b"\x00\x00",
                b"\x2c" + struct.pack("<HHHHB", 0, 0, W, H, 0), b"\x08"]
        out += [bytes([len(data[i:i + 255])]) + data[i:i + 255] for i in range(0, len(data), 255)] + [b"\x00"]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"".join(out) + b"\x3b")
    return path


def shrink(video, max_side=160, max_frames=None):
    """uint8 (F,H,W,3) -> every k-th pixel (longest side <= max_side) and evenly spaced frames (<= max_frames)."""
    k = max(1, -(-max(video.shape[1:3]) // max_side))
    if max_frames and len(video) > max_frames:
        video = video[np.linspace(0, len(video) - 1, max_frames).round().astype(int)]
    return video[:, ::k, ::k]


def contact_sheet(rows, scale=2, labels=None):
    """rows: list of uint8 (F,H,W,3) videos -> one uint8 image (a row per video, its frames across, each frame
    scaled up `scale` x, 2 px white gaps); labels: one text per row (which sampler, which prompt), drawn in a strip
    above its row, cut to the sheet's width."""
    F_, H, W, _ = rows[0].shape
    gap = 2
    strip = 0 if labels is None else 5 * LABEL_SCALE + 4   # glyph height + 2 px above and below
    img = np.full((len(rows) * (H * scale + gap + strip) + gap, F_ * (W * scale + gap) + gap, 3), 255, np.uint8)
    for r, v in enumerate(rows):
        y = gap + r * (H * scale + gap + strip)
        if labels is not None:
            draw_text(img, gap, y + 2, fit(labels[r], (img.shape[1] - gap) // (4 * LABEL_SCALE)), (0, 0, 0), LABEL_SCALE)
        for f in range(min(F_, len(v))):
            x = gap + f * (W * scale + gap)
            img[y + strip:y + strip + H * scale, x:x + W * scale] = v[f].repeat(scale, 0).repeat(scale, 1)
    return img


LABEL_SCALE = 2   # 3x5 glyphs drawn 2x: 10 px tall text, readable at the sheet's own size


def fit(text, n):
    """text cut to n characters (ending in '..' when cut)."""
    return text if len(text) <= n else text[:max(0, n - 2)] + ".."


FONT = {   # 3x5 glyphs, rows top to bottom: digits, A-Z (lower case drawn upper), common punctuation; else blank
    "0": "### #.# #.# #.# ###", "1": ".#. ##. .#. .#. ###", "2": "### ..# ### #.. ###", "3": "### ..# ### ..# ###",
    "4": "#.# #.# ### ..# ..#", "5": "### #.. ### ..# ###", "6": "### #.. ### #.# ###", "7": "### ..# ..# ..# ..#",
    "8": "### #.# ### #.# ###", "9": "### #.# ### ..# ###", ".": "... ... ... ... .#.", "-": "... ... ### ... ...",
    "+": "... .#. ### .#. ...", "|": ".#. .#. .#. .#. .#.", "_": "... ... ... ... ###", "/": "..# ..# .#. #.. #..",
    "=": "... ### ... ### ...", ":": "... .#. ... .#. ...", "(": "..# .#. .#. .#. ..#", ")": "#.. .#. .#. .#. #..",
    "A": ".#. #.# ### #.# #.#", "C": "### #.. #.. #.. ###", "D": "##. #.# #.# #.# ##.", "E": "### #.. ### #.. ###",
    "F": "### #.. ### #.. #..", "G": "### #.. #.# #.# ###", "I": "### .#. .#. .#. ###", "K": "#.# #.# ##. #.# #.#",
    "L": "#.. #.. #.. #.. ###", "M": "#.# ### ### #.# #.#", "N": "##. #.# #.# #.# #.#", "O": "### #.# #.# #.# ###",
    "P": "### #.# ### #.. #..", "R": "##. #.# ##. #.# #.#", "S": "### #.. ### ..# ###", "T": "### .#. .#. .#. .#.",
    "U": "#.# #.# #.# #.# ###", "W": "#.# #.# ### ### #.#", "X": "#.# #.# .#. #.# #.#",
    "H": "#.# #.# ### #.# #.#", "V": "#.# #.# #.# #.# .#.", "Y": "#.# #.# .#. .#. .#.",
    "B": "##. #.# ##. #.# ##.", "J": "..# ..# ..# #.# ###", "Q": "### #.# #.# ### ..#", "Z": "### ..# .#. #.. ###",
    ",": "... ... ... .#. #..", "'": ".#. .#. ... ... ...", '"': "#.# #.# ... ... ...", "!": ".#. .#. .#. ... .#.",
    "?": "### ..# .## ... .#.", "%": "#.. ..# .#. #.. ..#", "*": "... #.# .#. #.# ...", "<": "..# .#. #.. .#. ..#",
    ">": "#.. .#. ..# .#. #..", "#": "#.# ### #.# ### #.#", ";": "... .#. ... .#. #..", "[": "##. #.. #.. #.. ##.",
    "]": ".## ..# ..# ..# .##", "&": ".#. #.# .#. #.# .##",
}


def draw_text(img, x, y, text, color, scale=2):
    """Stamp `text` (3x5 glyphs, 1 px spacing, times scale) with its top-left corner at (x, y)."""
    for ch in text.upper():
        rows = FONT.get(ch, "... ... ... ... ...").split()
        for r, row in enumerate(rows):
            for col, bit in enumerate(row):
                if bit == "#":
                    img[y + r * scale:y + (r + 1) * scale, x + col * scale:x + (col + 1) * scale] = color
        x += 4 * scale
    return img


def draw_line(img, x0, y0, x1, y1, color):
    n = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
    xs, ys = np.linspace(x0, x1, n).round().astype(int), np.linspace(y0, y1, n).round().astype(int)
    ok = (xs >= 0) & (xs < img.shape[1]) & (ys >= 0) & (ys < img.shape[0])
    img[ys[ok], xs[ok]] = color


COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189)]


def line_plot(title, series, size=(200, 360), markers=False):
    """One panel: title and legend (each series' colour and label), frame, y max/min at the top/bottom left, x range
    under the frame, one line per series (label, xs, ys) in COLORS order; non-finite points are skipped; a log10 y axis when every value is
    positive (losses and norms span decades); markers: a 5x5 square on every point (sparse series). -> uint8 (H,W,3)."""
    H, W = size
    img = np.full((H, W, 3), 255, np.uint8)
    draw_text(img, 4, 4, title, (0, 0, 0))
    x = 4 + 8 * len(title) + 12
    for i, (label, _, _) in enumerate(series):   # the legend after the title: a colour swatch and its label
        if x + 12 + 8 * len(label) > W:
            break
        img[5:13, x:x + 8] = COLORS[i % len(COLORS)]
        draw_text(img, x + 12, 4, label, (0, 0, 0))
        x += 12 + 8 * len(label) + 10
    x0, y0, x1, y1 = 72, 20, W - 8, H - 22   # plot area
    pts = [(np.asarray(xs, float), np.asarray(ys, float)) for _, xs, ys in series]
    fin = [(xs[np.isfinite(ys)], ys[np.isfinite(ys)]) for xs, ys in pts]
    for a, b, c_, d in ((x0, y0, x1, y0), (x0, y1, x1, y1), (x0, y0, x0, y1), (x1, y0, x1, y1)):
        draw_line(img, a, b, c_, d, (160, 160, 160))
    ally = np.concatenate([ys for _, ys in fin] + [np.zeros(0)])
    if len(ally) == 0:
        return img
    allx = np.concatenate([xs for xs, _ in fin])
    log = bool((ally > 0).all())
    f = np.log10 if log else (lambda v: v)
    lo, hi = float(f(ally).min()), float(f(ally).max())
    mid, half = (lo + hi) / 2, (0.01 if log else 0.025 * abs((lo + hi) / 2)) or 0.5
    if hi - lo < 2 * half:   # a (nearly) constant series: drawn flat at mid height, the axis +-2.5% around it
        lo, hi = mid - half, mid + half
    xa, xb = float(allx.min()), float(allx.max())
    xb = xb if xb > xa else xa + 1
    label = (lambda v: f"{10 ** v:.2e}") if log else (lambda v: f"{v:.2e}")
    draw_text(img, 2, y0, label(hi), (80, 80, 80))
    draw_text(img, 2, y1 - 10, label(lo), (80, 80, 80))
    draw_text(img, 2, (y0 + y1) // 2 - 5, "LOG" if log else "", (150, 150, 150))
    draw_text(img, x0, y1 + 6, f"{xa:g}", (80, 80, 80))
    draw_text(img, x1 - 8 * len(f"{xb:g}"), y1 + 6, f"{xb:g}", (80, 80, 80))
    for i, (xs, ys) in enumerate(fin):
        if len(xs) == 0:   # a series with no finite point (e.g. G's norm before its first step)
            continue
        px = x0 + (xs - xa) / (xb - xa) * (x1 - x0)
        py = y1 - (f(ys) - lo) / (hi - lo) * (y1 - y0)
        for j in range(max(1, len(px) - 1)):
            k = min(j + 1, len(px) - 1)
            draw_line(img, px[j], py[j], px[k], py[k], COLORS[i % len(COLORS)])
        for x, y in zip(px, py) if markers else ():
            img[max(0, int(y) - 2):int(y) + 3, max(0, int(x) - 2):int(x) + 3] = COLORS[i % len(COLORS)]
    return img
