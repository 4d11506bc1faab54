"""Procedurally generated captioned images for contrastive pretraining of the demo VLM.

Rendered digits, letters and short words (Pillow's built-in scalable font plus the
DejaVu TTFs when the system has them) and filled geometric shapes, in many sizes,
colours, rotations, stroke widths and positions, over solid, gradient, noisy,
striped, checkered and dotted backgrounds, with optional blur, pixelation, grain
and fading. Captions are drawn from many templates and only mention attributes
that are true of the image ("a blurry white seven on a black background", "the
outline of a red star", "a photo of a seven."), so the text tower learns class
names and attribute words in varied contexts rather than a handful of strings.

Everything is driven by an explicit ``np.random.Generator``; nothing touches the
global random state. Only numpy and Pillow are needed (no torch).

Example:
    >>> gen = SynthGenerator()
    >>> images, captions = gen.batch(4, seed=0, step=0)
    >>> images.shape
    (4, 32, 32, 3)
"""

from __future__ import annotations

import functools
import logging
import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

logger = logging.getLogger(__name__)

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SHAPE_NAMES = ("circle", "square", "triangle", "star", "pentagon", "hexagon", "diamond", "cross", "heart", "crescent")
WORDS = (
    "cat", "dog", "sun", "car", "hat", "map", "pen", "cup", "box", "key", "bus", "egg", "fox", "owl", "ice",
    "sky", "tree", "fish", "bird", "boat", "cake", "door", "moon", "rain", "book", "milk", "leaf", "rock",
)  # fmt: skip
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 30),
    "yellow": (240, 220, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "purple": (140, 60, 190),
    "pink": (240, 120, 180),
    "white": (245, 245, 245),
    "gray": (128, 128, 128),
    "brown": (130, 80, 40),
    "cyan": (40, 200, 220),
    "black": (15, 15, 15),
}
DEJAVU_DIR = Path("/usr/share/fonts/truetype/dejavu")

Array = np.ndarray


def make_rng(*keys: int) -> np.random.Generator:
    """A PCG64 generator seeded from a tuple of non-negative integers (seed, step, index...)."""
    return np.random.Generator(np.random.PCG64(list(keys)))


def pick(rng: np.random.Generator, items: Sequence[str]) -> str:
    """One element of ``items``, uniformly (a plain ``str``, unlike ``rng.choice``)."""
    return items[int(rng.integers(len(items)))]


def luminance(rgb: Array) -> float:
    """Mean relative luminance in [0, 1] of an RGB colour or image with values in [0, 1]."""
    return float(np.mean(np.asarray(rgb, np.float32)[..., :3] @ np.array([0.299, 0.587, 0.114], np.float32)))


def jitter_color(rng: np.random.Generator, name: str, amount: int = 20) -> Array:
    """The named palette colour with per-channel jitter, float32 [3] in [0, 1]."""
    base = np.array(COLORS[name], np.float32) + rng.integers(-amount, amount + 1, 3)
    return np.clip(base, 0, 255).astype(np.float32) / 255.0


# --------------------------------------------------------------------------- fonts


def system_font_paths() -> tuple[str, ...]:
    """DejaVu TTF paths found on this machine (empty when none are installed)."""
    if not DEJAVU_DIR.is_dir():
        return ()
    return tuple(sorted(str(p) for p in DEJAVU_DIR.glob("DejaVu*.ttf") if "MathTeX" not in p.name))


@functools.lru_cache(maxsize=1024)
def get_font(path: str | None, size: int) -> ImageFont.FreeTypeFont:
    """A scalable font; ``path=None`` is Pillow's built-in font (identical on every machine)."""
    font = ImageFont.load_default(size=size) if path is None else ImageFont.truetype(path, size)
    if not isinstance(font, ImageFont.FreeTypeFont):
        raise RuntimeError(
            "Pillow was built without FreeType; reinstall it with `pip install --force-reinstall pillow`"
        )
    return font


def text_mask(text: str, font: ImageFont.FreeTypeFont, stroke_width: int = 0, angle: float = 0.0) -> Image.Image:
    """A tight ``L`` mask of ``text`` (255 = ink), rotated counter-clockwise by ``angle`` degrees."""
    left, top, right, bottom = (int(v) for v in font.getbbox(text, stroke_width=stroke_width))
    pad = 2
    im = Image.new("L", (right - left + 2 * pad, bottom - top + 2 * pad), 0)
    draw = ImageDraw.Draw(im)
    draw.text((pad - left, pad - top), text, fill=255, font=font, stroke_width=stroke_width, stroke_fill=255)
    if angle:
        im = im.rotate(angle, resample=Image.Resampling.BILINEAR, expand=True)
    return im


def paste_mask(size: int, piece: Image.Image, center: tuple[float, float]) -> Array:
    """``piece`` pasted centred at ``center`` on an empty ``size``×``size`` canvas, float32 [size, size] in [0, 1]."""
    canvas = Image.new("L", (size, size), 0)
    w, h = piece.size
    canvas.paste(piece, (int(round(center[0] - w / 2)), int(round(center[1] - h / 2))))
    return np.asarray(canvas, np.float32) / 255.0


# --------------------------------------------------------------------------- shapes


def _regular(n: int, phase: float) -> Array:
    t = phase + 2 * np.pi * np.arange(n) / n
    return np.stack([np.sin(t), -np.cos(t)], 1)


def _star() -> Array:
    pts = _regular(10, 0.0)
    pts[1::2] *= 0.45
    return pts


def _cross() -> Array:
    a, b = 0.33, 1.0
    return np.array(
        [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a), (-b, a), (-b, -a), (-a, -a)]
    )


def _heart() -> Array:
    t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = 13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)
    return np.stack([x, -y - 2.5], 1) / 16.0


_OUTLINES: dict[str, Array] = {
    "circle": _regular(48, 0.0),
    "square": _regular(4, np.pi / 4) * np.sqrt(0.5) / 0.75,
    "triangle": _regular(3, 0.0) + np.array([0.0, 0.2]),
    "star": _star(),
    "pentagon": _regular(5, 0.0),
    "hexagon": _regular(6, np.pi / 6),
    "diamond": _regular(4, 0.0) * np.array([0.7, 1.0]),
    "cross": _cross(),
    "heart": _heart(),
    "crescent": _regular(48, 0.0),
}


def shape_mask(
    kind: str,
    size: int,
    center: tuple[float, float],
    radius: float,
    angle: float = 0.0,
    aspect: float = 1.0,
    outline: int = 0,
) -> Array:
    """A filled (or, with ``outline`` > 0 pixels, outlined) shape on a ``size``×``size`` canvas.

    Args:
        kind: one of :data:`SHAPE_NAMES`.
        size: canvas side in pixels.
        center: (x, y) of the shape centre in pixels.
        radius: half the shape's extent in pixels.
        angle: rotation in degrees (counter-clockwise).
        aspect: horizontal stretch factor (1 = undistorted).
        outline: stroke width of an outline-only drawing; 0 fills the shape.

    Returns:
        float32 [size, size] mask in [0, 1].
    """
    if kind not in _OUTLINES:
        raise ValueError(f"unknown shape {kind!r}; expected one of {SHAPE_NAMES}")
    rad = np.deg2rad(angle)
    rot = np.array([[np.cos(rad), np.sin(rad)], [-np.sin(rad), np.cos(rad)]], np.float64)
    im = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(im)
    draw.polygon(_to_xy(_OUTLINES[kind], rot, center, radius, aspect), fill=255)
    if kind == "crescent":
        bite = _regular(48, 0.0) * 0.85 + np.array([0.45, -0.2])
        draw.polygon(_to_xy(bite, rot, center, radius, aspect), fill=0)
    if outline > 0:
        im = Image.fromarray(np.asarray(im) - np.asarray(im.filter(ImageFilter.MinFilter(2 * outline + 1))))
    return np.asarray(im, np.float32) / 255.0


def _to_xy(
    pts: Array, rot: Array, center: tuple[float, float], radius: float, aspect: float
) -> list[tuple[float, float]]:
    p = (pts * np.array([aspect, 1.0])) @ rot.T * radius + np.asarray(center)
    return [(float(x), float(y)) for x, y in p]


# --------------------------------------------------------------------------- backgrounds


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[Array, Array]:
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) / size
    return xs, ys


def solid(size: int, color: Array) -> Array:
    """A constant RGB image, float32 [size, size, 3]."""
    return np.broadcast_to(np.asarray(color, np.float32), (size, size, 3)).copy()


def two_tone(mask: Array, c0: Array, c1: Array) -> Array:
    """Blend of two colours by a [H, W] mask in [0, 1], float32 [H, W, 3]."""
    return c0[None, None, :] * (1.0 - mask[..., None]) + c1[None, None, :] * mask[..., None]


def stripes(size: int, period: float, angle: float, soft: bool = False) -> Array:
    """A stripe pattern mask, float32 [size, size] in [0, 1]; ``period`` in canvas fractions."""
    xs, ys = _grid(size)
    phase = (xs * np.cos(angle) + ys * np.sin(angle)) / period
    wave = 0.5 + 0.5 * np.sin(2 * np.pi * phase)
    return wave.astype(np.float32) if soft else (wave > 0.5).astype(np.float32)


def checker(size: int, cell: float) -> Array:
    """A checkerboard mask, float32 [size, size]; ``cell`` in canvas fractions."""
    xs, ys = _grid(size)
    return ((np.floor(xs / cell) + np.floor(ys / cell)) % 2).astype(np.float32)


def dots(size: int, spacing: float, radius: float) -> Array:
    """A regular dot-grid mask, float32 [size, size]; lengths in canvas fractions."""
    xs, ys = _grid(size)
    dx = (xs % spacing) - spacing / 2
    dy = (ys % spacing) - spacing / 2
    return (dx**2 + dy**2 < radius**2).astype(np.float32)


def _dark(rng: np.random.Generator) -> Array:
    return rng.uniform(0.0, 0.1, 3).astype(np.float32) + rng.uniform(0.0, 0.15)


def _pretrain_background(rng: np.random.Generator, size: int) -> tuple[Array, str]:
    """A pretraining background and the word captions use for it."""
    kind = pick(rng, ("black",) * 4 + ("dark",) * 3 + ("white", "white", "gray", "color", "color") + (
        "gradient", "gradient", "noisy", "noisy", "striped", "checkered", "dotted"))  # fmt: skip
    if kind == "black":
        return solid(size, np.full(3, rng.uniform(0.0, 0.08), np.float32)), "black"
    if kind == "dark":
        return solid(size, _dark(rng)), "dark"
    if kind == "white":
        return solid(size, np.full(3, rng.uniform(0.88, 1.0), np.float32)), "white"
    if kind == "gray":
        return solid(size, np.full(3, rng.uniform(0.4, 0.6), np.float32)), "gray"
    if kind == "color":
        name = pick(rng, ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "cyan"))
        return solid(size, jitter_color(rng, name) * rng.uniform(0.6, 1.0)), name
    c0, c1 = _dark(rng), jitter_color(rng, pick(rng, tuple(COLORS))) * rng.uniform(0.3, 0.9)
    if kind == "gradient":
        xs, ys = _grid(size)
        t = rng.uniform(0, 2 * np.pi)
        ramp = np.clip(0.5 + (xs - 0.5) * np.cos(t) + (ys - 0.5) * np.sin(t), 0, 1)
        return two_tone(ramp, c0, c1), "gradient"
    if kind == "noisy":
        base = solid(size, c0 + 0.5 * c1)
        return np.clip(base + rng.normal(0, rng.uniform(0.08, 0.2), base.shape), 0, 1).astype(np.float32), "noisy"
    if kind == "striped":
        pattern = stripes(size, rng.uniform(0.1, 0.3), rng.uniform(0, np.pi))
    elif kind == "checkered":
        pattern = checker(size, rng.uniform(0.08, 0.25))
    else:
        pattern = dots(size, rng.uniform(0.12, 0.25), rng.uniform(0.03, 0.06))
    return two_tone(pattern, c0, c1), kind


# --------------------------------------------------------------------------- degradations


def pixelate(im: Image.Image, low: int, nearest: bool) -> Image.Image:
    """Down-sample to ``low``×``low`` and back up (blocky with ``nearest``, smooth otherwise)."""
    small = im.resize((low, low), Image.Resampling.BOX)
    return small.resize(im.size, Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR)


def add_noise(im: Image.Image, rng: np.random.Generator, sigma: float) -> Image.Image:
    """Additive Gaussian pixel noise with standard deviation ``sigma`` (fraction of full range)."""
    arr = np.asarray(im, np.float32) / 255.0 + rng.normal(0.0, sigma, (im.size[1], im.size[0], 3))
    return Image.fromarray((np.clip(arr, 0, 1) * 255 + 0.5).astype(np.uint8))


def fade(im: Image.Image, amount: float) -> Image.Image:
    """Contrast reduced towards mid-gray by ``amount`` in [0, 1]."""
    arr = np.asarray(im, np.float32)
    out = arr * (1 - amount) + 128.0 * amount
    return Image.fromarray((out + 0.5).astype(np.uint8))


def _degrade(im: Image.Image, rng: np.random.Generator, size: int) -> tuple[Image.Image, list[str]]:
    styles: list[str] = []
    u = rng.uniform()
    if u < 0.15:
        im = pixelate(im, int(rng.integers(6, 13)), nearest=True)
        styles.append("pixelated")
    elif u < 0.27:
        im = pixelate(im, int(rng.integers(6, 11)), nearest=False)
        styles += ["blurry", "low resolution"]
    elif u < 0.42:
        im = im.filter(ImageFilter.GaussianBlur(rng.uniform(0.6, 1.3) * size / 32))
        styles.append("blurry")
    if rng.uniform() < 0.15:
        im = add_noise(im, rng, rng.uniform(0.04, 0.12))
        styles.append("grainy")
    if rng.uniform() < 0.08:
        im = fade(im, rng.uniform(0.35, 0.6))
        styles.append("faded")
    return im, styles


# --------------------------------------------------------------------------- objects


@dataclass(frozen=True)
class Thing:
    """One rendered object: its mask on the canvas, the words that describe it, the rendered text."""

    mask: Array
    kind: str
    name: str
    styles: tuple[str, ...] = ()
    text: str = ""


def _place(rng: np.random.Generator, size: int, extent: float) -> tuple[float, float]:
    margin = min(extent / 2, size / 2)
    lo, hi = margin, size - margin
    return float(rng.uniform(lo, max(lo, hi))), float(rng.uniform(lo, max(lo, hi)))


def _size_word(frac: float) -> tuple[str, ...]:
    return ("small",) if frac < 0.42 else ("large", "big") if frac > 0.72 else ()


def _render_text(
    rng: np.random.Generator, size: int, text: str, fonts: Sequence[str | None], builtin_p: float, frac: float
) -> tuple[Array, list[str]]:
    path = None if rng.uniform() < builtin_p or len(fonts) == 1 else pick(rng, [f for f in fonts if f]) or None
    px = max(6, int(frac * size))
    font = get_font(path, px)
    stroke = int(rng.integers(0, max(1, px // 10) + 1)) if rng.uniform() < 0.4 else 0
    angle = float(rng.uniform(-20, 20)) if rng.uniform() < 0.7 else 0.0
    piece = text_mask(text, font, stroke, angle)
    if max(piece.size) > size:
        piece.thumbnail((size, size), Image.Resampling.BILINEAR)
    styles = list(_size_word(max(piece.size) / size))
    styles += ["bold"] if stroke >= 2 or (path and "Bold" in path) else []
    styles += ["thin"] if path and "ExtraLight" in path else []
    styles += ["tilted", "rotated"] if abs(angle) > 12 else []
    styles += ["italic"] if path and ("Oblique" in path or "Italic" in path) else []
    return paste_mask(size, piece, _place(rng, size, max(piece.size))), styles


def _digit(rng: np.random.Generator, size: int, fonts: Sequence[str | None], builtin_p: float, frac: float) -> Thing:
    d = int(rng.integers(10))
    mask, styles = _render_text(rng, size, str(d), fonts, builtin_p, frac)
    return Thing(mask, "digit", DIGIT_NAMES[d], tuple(styles), str(d))


def _letter(rng: np.random.Generator, size: int, fonts: Sequence[str | None], builtin_p: float, frac: float) -> Thing:
    ch = pick(rng, string.ascii_letters)
    mask, styles = _render_text(rng, size, ch, fonts, builtin_p, frac)
    return Thing(mask, "letter", ch.lower(), tuple(styles), text=ch)


def _word(rng: np.random.Generator, size: int, fonts: Sequence[str | None], builtin_p: float, frac: float) -> Thing:
    w = pick(rng, WORDS)
    mask, styles = _render_text(rng, size, w, fonts, builtin_p, frac * 0.6)
    return Thing(mask, "word", w, tuple(styles))


def _shape(rng: np.random.Generator, size: int, frac: float) -> Thing:
    kind = pick(rng, SHAPE_NAMES)
    radius = frac * size / 2
    outline = int(rng.integers(1, max(2, size // 16) + 1)) if rng.uniform() < 0.2 else 0
    angle = float(rng.uniform(-25, 25)) if rng.uniform() < 0.6 else 0.0
    aspect = float(rng.uniform(0.85, 1.15))
    mask = shape_mask(kind, size, _place(rng, size, 2 * radius), radius, angle, aspect, outline)
    styles = _size_word(frac) + (("outlined",) if outline else ()) + (("tilted", "rotated") if abs(angle) > 15 else ())
    return Thing(mask, "shape", kind, styles)


# --------------------------------------------------------------------------- captions

_TEMPLATES: dict[str, tuple[str, ...]] = {
    "digit": (
        "a photo of a {name}.", "a photo of the number {name}.", "a photo of the number {numeral}.",
        "the digit {name}", "the number {numeral}", "a {color} {name} on a {bg} background",
        "a {color} {numeral} on a {bg} background", "a drawing of a {numeral}", "a {photo} photo of a {name}.",
        "a {style} {color} {name}", "a {photo} image of the digit {name}", "a picture of a {color} number {name}",
        "the number {name} written in {color}", "{name}", "{numeral}", "a {name} on a {bg} background",
        "a close-up photo of a {name}.", "an image of the number {name}", "a rendering of a {name}.",
        "a {style} {name} on a {bg} background", "a {color} digit {name}", "a {style} {numeral}",
        "a photo of a {style} {name}.", "a {bg} photo of a {name}.",
    ),
    "shape": (
        "a photo of a {name}.", "a {color} {name}", "a {name} on a {bg} background", "a {style} {name}",
        "a photo of a {style} {name}.",
        "a {color} {name} on a {bg} background", "a drawing of a {name}", "a {photo} photo of a {name}.",
        "the shape of a {name}", "a {style} {color} {name}", "{name}", "a {color} {name} shape",
        "an image of a {name}", "a close-up photo of a {name}.", "a rendering of a {name}.",
    ),
    "letter": (
        "the letter {name}", "a {color} letter {name}", "a photo of the letter {name}.", "a {style} letter {name}",
        "a {case} letter {name}", "a {color} {case} {name}",
        "the letter {name} on a {bg} background", "a {photo} photo of the letter {name}.", "letter {name}",
    ),
    "word": (
        "the word {name}", "a sign that says {name}", "text reading {name}", "the word {name} in {color}",
        "{name}", "a {photo} photo of the word {name}.", "the word {name} on a {bg} background",
    ),
    "pair": (
        "a {color} {name} and a {color2} {name2}", "a {name} and a {name2}", "a {name} next to a {name2}",
        "a {name} to the {side} of a {name2}", "two things: a {name} and a {name2}",
    ),
}  # fmt: skip

_FIELDS = {
    t: tuple(tuple(f for _, f, _, _ in string.Formatter().parse(s) if f) for s in v) for t, v in _TEMPLATES.items()
}


def make_caption(rng: np.random.Generator, kind: str, fields: dict[str, str]) -> str:
    """A caption for ``kind`` from a random template whose every placeholder is in ``fields``."""
    usable = [s for s, need in zip(_TEMPLATES[kind], _FIELDS[kind], strict=True) if all(fields.get(f) for f in need)]
    return pick(rng, usable).format(**fields)


# --------------------------------------------------------------------------- generator


@dataclass(frozen=True)
class SynthConfig:
    """What the pretraining generator draws.

    Args:
        image_size: output side in pixels.
        supersample: render at ``image_size * supersample`` and box-filter down (anti-aliasing).
        mix: (kind, weight) pairs over ``digit``, ``shape``, ``letter``, ``word``, ``pair``.
        builtin_font_prob: probability of Pillow's built-in font for rendered text (else a DejaVu face).
        system_fonts: use DejaVu TTFs when installed; falls back to the built-in font alone.
    """

    image_size: int = 32
    supersample: int = 2
    mix: tuple[tuple[str, float], ...] = (
        ("digit", 0.45),
        ("shape", 0.3),
        ("letter", 0.1),
        ("word", 0.08),
        ("pair", 0.07),
    )
    builtin_font_prob: float = 0.3
    system_fonts: bool = True

    def __post_init__(self) -> None:
        if self.image_size < 8 or self.supersample < 1:
            raise ValueError(f"image_size must be >= 8 and supersample >= 1, got {self.image_size}, {self.supersample}")
        bad = [k for k, _ in self.mix if k not in _TEMPLATES]
        if bad:
            raise ValueError(f"unknown kinds in mix: {bad}; expected some of {sorted(_TEMPLATES)}")


@dataclass(frozen=True)
class SynthSample:
    """One captioned image: RGB ``image``, its ``caption``, the object ``kind`` and class ``label``."""

    image: Image.Image
    caption: str
    kind: str
    label: str


class SynthGenerator:
    """Seeded source of captioned images for contrastive pretraining.

    Args:
        config: what to draw; defaults to :class:`SynthConfig`.

    Example:
        >>> s = SynthGenerator().sample(make_rng(0, 1))
        >>> s.image.size, isinstance(s.caption, str)
        ((32, 32), True)
    """

    def __init__(self, config: SynthConfig | None = None) -> None:
        self.config = config or SynthConfig()
        paths = system_font_paths() if self.config.system_fonts else ()
        if self.config.system_fonts and not paths:
            logger.warning("no DejaVu fonts under %s; rendering with Pillow's built-in font only", DEJAVU_DIR)
        self.fonts: tuple[str | None, ...] = (None, *paths)
        self._kinds = tuple(kind for kind, _ in self.config.mix)
        weights = np.asarray([w for _, w in self.config.mix], np.float64)
        self._weights = weights / weights.sum()

    def batch(self, n: int, seed: int, step: int) -> tuple[Array, list[str]]:
        """``n`` samples for training ``step``: uint8 images [n, H, W, 3] and captions.

        Sample ``i`` depends only on ``(seed, step, i)``, so a batch is reproducible on its own.
        """
        images, captions = [], []
        for i in range(n):
            s = self.sample(make_rng(seed, step, i))
            images.append(np.asarray(s.image, np.uint8))
            captions.append(s.caption)
        return np.stack(images), captions

    def sample(self, rng: np.random.Generator) -> SynthSample:
        """One captioned image drawn with ``rng``."""
        kind = self._kinds[int(rng.choice(len(self._kinds), p=self._weights))]
        size = self.config.image_size * self.config.supersample
        bg, bg_word = _pretrain_background(rng, size)
        if kind == "pair":
            canvas, fields, label = self._pair(rng, size, bg)
        else:
            thing = self._thing(rng, kind, size, float(rng.uniform(0.35, 0.9)))
            color, fill = self._fill(rng, bg, thing.mask)
            canvas = two_tone_image(bg, thing.mask, fill)
            fields = {"name": thing.name, "color": color, "bg": bg_word}
            if kind == "digit":
                fields["numeral"] = thing.text
            if kind == "letter":
                fields["case"] = "capital" if thing.text.isupper() else "lowercase"
            label = thing.name
            styles = list(thing.styles)
        im = Image.fromarray((np.clip(canvas, 0, 1) * 255 + 0.5).astype(np.uint8))
        if self.config.supersample > 1:
            im = im.resize((self.config.image_size,) * 2, Image.Resampling.BOX)
        im, post = _degrade(im, rng, self.config.image_size)
        if kind != "pair":
            all_styles = styles + post
            fields["style"] = pick(rng, all_styles) if all_styles else ""
            fields["photo"] = pick(rng, post) if post else ""
        return SynthSample(im, make_caption(rng, kind, fields), kind, label)

    def _thing(self, rng: np.random.Generator, kind: str, size: int, frac: float) -> Thing:
        p = self.config.builtin_font_prob
        if kind == "digit":
            return _digit(rng, size, self.fonts, p, frac)
        if kind == "letter":
            return _letter(rng, size, self.fonts, p, frac)
        if kind == "word":
            return _word(rng, size, self.fonts, p, frac)
        return _shape(rng, size, frac * 0.9)

    def _fill(self, rng: np.random.Generator, bg: Array, mask: Array) -> tuple[str, Array]:
        under = luminance(bg[mask > 0.5]) if np.any(mask > 0.5) else luminance(bg)
        for _ in range(20):
            name = pick(rng, tuple(COLORS)) if rng.uniform() < 0.7 else ("black" if under > 0.5 else "white")
            fill = jitter_color(rng, name)
            if abs(luminance(fill) - under) > 0.25:
                return name, fill
        return ("black", jitter_color(rng, "black")) if under > 0.5 else ("white", jitter_color(rng, "white"))

    def _pair(self, rng: np.random.Generator, size: int, bg: Array) -> tuple[Array, dict[str, str], str]:
        half = size // 2
        kinds = [pick(rng, ("digit", "digit", "shape", "shape", "letter")) for _ in range(2)]
        things = [self._thing(rng, k, half, float(rng.uniform(0.6, 0.95))) for k in kinds]
        horizontal = rng.uniform() < 0.5
        canvas, names, colors = bg, [], []
        for j, thing in enumerate(things):
            mask = np.zeros((size, size), np.float32)
            off = int(rng.integers(0, half // 2 + 1))
            y0, x0 = (off, j * half) if horizontal else (j * half, off)
            mask[y0 : y0 + half, x0 : x0 + half] = thing.mask
            color, fill = self._fill(rng, bg, mask)
            canvas = two_tone_image(canvas, mask, fill)
            names.append(thing.name if thing.kind != "letter" else f"letter {thing.name}")
            colors.append(color)
        side = "left" if horizontal else "top"
        fields = {"name": names[0], "name2": names[1], "color": colors[0], "color2": colors[1], "side": side}
        return canvas, fields, f"{names[0]}+{names[1]}"


def two_tone_image(bg: Array, mask: Array, fill: Array) -> Array:
    """``fill`` (colour [3] or image [H, W, 3]) laid over ``bg`` [H, W, 3] through ``mask`` [H, W]."""
    m = mask[..., None]
    return bg * (1.0 - m) + np.asarray(fill, np.float32) * m
