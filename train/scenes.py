"""Procedural dashcam street scenes, with and without roadwork, with a box for every labelled object.

A pinhole camera looks down a straight or gently bending road. Every object is placed in metres
(lateral offset from the camera, height, distance ahead) and projected, so it shrinks with distance
and fades towards the fog colour. Scenes are drawn at SUPERSAMPLE x the output size and box-filtered
down (cheap antialiasing). An id map drawn alongside the colours records which labelled object owns
each pixel, so boxes are tight around what is actually visible and hidden objects lose their label.

Both labels share the same clutter, including orange and red cars, striped awnings, hydrants, balls,
autumn trees, red roofs and ordinary signs; positives add a work zone (a closed lane or site, usually
near) or a few scattered roadwork items, each at least MIN_ROADWORK_SIDE of the image, so colour alone does
not separate the classes.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageChops, ImageDraw

ROADWORK_CLASSES = ("cone", "barrier", "barrel", "roadwork_sign", "worker", "machinery")
OTHER_CLASSES = ("car", "person", "sign")
CLASSES = ROADWORK_CLASSES + OTHER_CLASSES

SUPERSAMPLE = 2
Z_FAR = 220.0           # metres; beyond this only the skyline
MIN_VISIBLE = 0.35      # share of an object's own pixels that must stay unoccluded to keep its label
MAX_FOG = 0.7           # labelled objects fogged more than this are too faint to call visible
MIN_BOX_SIDE = 2.0      # output pixels
MIN_ROADWORK_SIDE = 0.06   # of the image side: a positive needs one roadwork object at least this big
OCCLUDER = 255          # id-map value of unlabelled solid shapes
MAX_LAYOUTS = 20

Color = tuple[int, int, int]
Point = tuple[float, float]


@dataclass
class Scene:
    image: Image.Image   # RGB, size x size
    label: int           # 1 roadwork, 0 none
    boxes: np.ndarray    # (N, 4) float32 x0, y0, x1, y1 in pixels, tight around the visible part
    classes: list[str]   # N names from CLASSES


@dataclass
class Camera:
    focal: float     # canvas pixels per metre at 1 m
    horizon: float   # canvas row of the horizon
    center_x: float  # canvas column straight ahead
    height: float    # metres above the road
    curve: float     # lateral drift per metre^2 of distance: bends the road

    def x(self, lateral: float, z: float) -> float:
        return self.center_x + self.focal * (lateral + self.curve * z * z) / z

    def y(self, up: float, z: float) -> float:
        return self.horizon + self.focal * (self.height - up) / z

    def pt(self, lateral: float, up: float, z: float) -> Point:
        return self.x(lateral, z), self.y(up, z)

    def near(self, canvas: int) -> float:
        """Distance of the road seen at the bottom row."""
        return self.focal * self.height / (canvas - self.horizon)


@dataclass
class Road:
    kind: str            # "urban" | "suburban" | "highway"
    lanes: int
    lane_width: float
    oncoming: int        # lanes [0, oncoming) drive towards the camera
    ego: int             # lane the camera drives in
    left: float          # lateral of the left road edge; the camera is at 0
    walk_left: float     # sidewalk widths, 0 where there is none
    walk_right: float
    setback: float       # building line behind the sidewalk
    asphalt: Color
    pavement: Color
    verge: Color
    us_markings: bool    # yellow centre line

    @property
    def right(self) -> float:
        return self.left + self.lanes * self.lane_width

    def lane(self, k: int) -> tuple[float, float]:
        lo = self.left + k * self.lane_width
        return lo, lo + self.lane_width


@dataclass
class Look:
    time: str            # "day" | "overcast" | "dusk"
    sky_top: Color
    sky_horizon: Color
    fog: Color
    visibility: float    # metres for fog to reach 63 %
    gain: tuple[float, float, float]
    saturation: float
    wet: float           # 0 dry .. 1 soaked road
    rain: int            # streaks drawn over the image
    lights: bool         # headlights and street lamps on
    autumn: bool
    noise: float


# --- colours -------------------------------------------------------------------------------------

WHITE = (238, 238, 232)
BLACK = (22, 22, 24)
DARK = (45, 45, 48)
GLASS = (48, 58, 70)
SIGN_RED = (200, 28, 32)
SIGN_BLUE = (20, 70, 160)
SIGN_YELLOW = (250, 205, 20)
SIGN_ORANGE = (245, 120, 20)
POLE = (130, 132, 135)
REFLECTIVE = (205, 208, 210)
CONE_COLORS = ((246, 112, 22), (238, 84, 26), (250, 132, 30), (225, 60, 30))
VEST_COLORS = ((200, 240, 40), (226, 250, 60), (250, 122, 24), (252, 150, 30))
HELMET_COLORS = ((240, 240, 236), (250, 205, 20), (245, 125, 25), (40, 110, 200))
MACHINE_COLORS = ((238, 178, 22), (242, 130, 24), (225, 200, 40), (235, 235, 230))
SKIN = ((236, 196, 164), (214, 166, 126), (170, 118, 82), (110, 72, 48), (245, 210, 180))
HAIR = ((30, 24, 20), (80, 52, 30), (150, 110, 60), (200, 170, 110), (120, 120, 120))
CLOTHES = ((30, 30, 34), (50, 60, 90), (90, 95, 100), (200, 200, 196), (120, 30, 40), (40, 80, 60),
           (150, 120, 90), (70, 100, 150), (230, 120, 30), (220, 190, 40), (200, 40, 40), (240, 240, 240))
PANTS = ((30, 32, 40), (50, 60, 90), (70, 70, 72), (140, 120, 95), (20, 20, 22))
CAR_PAINT = ((236, 236, 234), (24, 24, 27), (176, 178, 182), (104, 106, 110), (30, 45, 95), (140, 18, 24),
             (196, 30, 28), (234, 108, 22), (242, 142, 32), (228, 186, 30), (30, 80, 52), (110, 75, 50),
             (200, 190, 160), (70, 110, 160))
# orange and red are over-represented on purpose: they are the hard negatives
CAR_WEIGHTS = (16, 13, 13, 9, 7, 6, 8, 8, 4, 5, 3, 3, 3, 2)
BUILDING_WALLS = ((205, 195, 175), (180, 170, 160), (150, 80, 60), (170, 100, 70), (215, 212, 205),
                  (120, 120, 125), (190, 160, 120), (230, 220, 190), (160, 60, 50), (95, 90, 85))
AWNINGS = (((200, 30, 30), WHITE), ((235, 110, 25), WHITE), ((30, 110, 60), WHITE), ((200, 30, 30), (200, 30, 30)),
           ((40, 60, 140), WHITE), ((235, 110, 25), (235, 110, 25)), ((90, 40, 30), (200, 170, 120)))
ROOFS = ((150, 50, 40), (110, 45, 35), (70, 70, 75), (120, 90, 70))


def _cumulative(weights: Sequence[float]) -> list[float]:
    out, total = [], 0.0
    for w in weights:
        total += w
        out.append(total)
    return out


CAR_CUMULATIVE = _cumulative(CAR_WEIGHTS)


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(rng.random())


def _pick(rng: np.random.Generator, seq: Sequence):
    return seq[int(rng.integers(len(seq)))]


def _weighted(rng: np.random.Generator, cumulative: list[float]) -> int:
    return bisect.bisect_right(cumulative, float(rng.random()) * cumulative[-1])


def _vary(rng: np.random.Generator, c: Color, amount: int = 12) -> Color:
    d = rng.random(3) * (2 * amount + 1) - amount    # one draw of 3 floats: much cheaper than rng.integers
    return (min(max(c[0] + int(d[0]), 0), 255), min(max(c[1] + int(d[1]), 0), 255), min(max(c[2] + int(d[2]), 0), 255))


def _scale(c: Color, k: float) -> Color:
    return (min(int(c[0] * k), 255), min(int(c[1] * k), 255), min(int(c[2] * k), 255))


def _mix(a: Color, b: Color, t: float) -> Color:
    return (int(a[0] + (b[0] - a[0]) * t), int(a[1] + (b[1] - a[1]) * t), int(a[2] + (b[2] - a[2]) * t))


# --- drawing -------------------------------------------------------------------------------------

class Painter:
    """Fogged drawing on the colour canvas; solid shapes also write the current object id to the id map."""

    def __init__(self, canvas: Image.Image, ids: Image.Image, look: Look):
        self.color = ImageDraw.Draw(canvas)
        self.blend = ImageDraw.Draw(canvas, "RGBA")
        self.ids = ids
        self.id_draw = ImageDraw.Draw(ids)
        self.fog = look.fog
        self.visibility = look.visibility
        self.size = canvas.size
        self.t = 0.0
        self.id = OCCLUDER
        self.cls: str | None = None
        self.bounds = [0.0, 0.0, 0.0, 0.0]
        # id, class, canvas bounds of its solid shapes, pixels it owned when drawn, fog amount
        self.labels: list[tuple[int, str, tuple[int, int, int, int], int, float]] = []

    def at(self, z: float) -> None:
        self.t = 1.0 - math.exp(-z / self.visibility)

    def begin(self, z: float, cls: str | None) -> None:
        self.at(z)
        self.cls = cls
        if cls is None:
            self.id = OCCLUDER
            return
        self.id = len(self.labels) + 1
        assert self.id < OCCLUDER, "more labelled objects than the 8-bit id map holds"
        self.bounds = [math.inf, math.inf, -math.inf, -math.inf]

    def end(self) -> None:
        if self.cls is not None:
            w, h = self.size
            b = self.bounds
            x0, y0 = max(int(b[0]) - 1, 0), max(int(b[1]) - 1, 0)
            x1, y1 = min(int(b[2]) + 2, w), min(int(b[3]) + 2, h)
            if x1 > x0 and y1 > y0:
                owned = self.ids.crop((x0, y0, x1, y1)).histogram()[self.id]
                if owned:
                    self.labels.append((self.id, self.cls, (x0, y0, x1, y1), owned, self.t))
        self.cls = None
        self.id = OCCLUDER

    def shade(self, c: Color) -> Color:
        t, f = self.t, self.fog
        return (int(c[0] + (f[0] - c[0]) * t), int(c[1] + (f[1] - c[1]) * t), int(c[2] + (f[2] - c[2]) * t))

    def _grow(self, x0: float, y0: float, x1: float, y1: float) -> None:
        b = self.bounds
        b[0], b[1], b[2], b[3] = min(b[0], x0), min(b[1], y0), max(b[2], x1), max(b[3], y1)

    def poly(self, pts: list[Point], c: Color, solid: bool = True) -> None:
        self.color.polygon(pts, fill=self.shade(c))
        if solid:
            self.id_draw.polygon(pts, fill=self.id)
            if self.cls is not None:
                xs = [q[0] for q in pts]
                ys = [q[1] for q in pts]
                self._grow(min(xs), min(ys), max(xs), max(ys))

    def rect(self, x0: float, y0: float, x1: float, y1: float, c: Color, solid: bool = True) -> None:
        box = (min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))
        self.color.rectangle(box, fill=self.shade(c))
        if solid:
            self.id_draw.rectangle(box, fill=self.id)
            if self.cls is not None:
                self._grow(*box)

    def ellipse(self, cx: float, cy: float, rx: float, ry: float, c: Color, solid: bool = True) -> None:
        box = (cx - abs(rx), cy - abs(ry), cx + abs(rx), cy + abs(ry))
        self.color.ellipse(box, fill=self.shade(c))
        if solid:
            self.id_draw.ellipse(box, fill=self.id)
            if self.cls is not None:
                self._grow(*box)

    def dome(self, cx: float, cy: float, rx: float, ry: float, c: Color, solid: bool = True) -> None:
        """Upper half ellipse (hair, helmets, mounds)."""
        box = (cx - abs(rx), cy - abs(ry), cx + abs(rx), cy + abs(ry))
        self.color.chord(box, 180, 360, fill=self.shade(c))
        if solid:
            self.id_draw.chord(box, 180, 360, fill=self.id)
            if self.cls is not None:
                self._grow(box[0], box[1], box[2], cy)

    def line(self, pts: list[Point], c: Color, width: float, solid: bool = True) -> None:
        w = max(int(round(width)), 1)
        self.color.line(pts, fill=self.shade(c), width=w, joint="curve")
        if solid:
            self.id_draw.line(pts, fill=self.id, width=w, joint="curve")
            if self.cls is not None:
                xs = [q[0] for q in pts]
                ys = [q[1] for q in pts]
                self._grow(min(xs) - w / 2, min(ys) - w / 2, max(xs) + w / 2, max(ys) + w / 2)

    def tint(self, pts: list[Point], c: Color, alpha: int) -> None:
        """Translucent, unlabelled: shadows, reflections, glows."""
        self.blend.polygon(pts, fill=(*self.shade(c), alpha))

    def glow(self, cx: float, cy: float, r: float, c: Color, alpha: int) -> None:
        self.blend.ellipse((cx - r, cy - r, cx + r, cy + r), fill=(*c, alpha))


def box3d(p: Painter, cam: Camera, l0: float, l1: float, z0: float, z1: float, y0: float, y1: float,
          c: Color, near: Color | None = None, solid: bool = True) -> None:
    """An axis-aligned box: the side facing the camera, the top when below eye level, then the near face."""
    if l1 < -0.05:
        p.poly([cam.pt(l1, y0, z0), cam.pt(l1, y0, z1), cam.pt(l1, y1, z1), cam.pt(l1, y1, z0)], _scale(c, 0.78), solid)
    elif l0 > 0.05:
        p.poly([cam.pt(l0, y0, z0), cam.pt(l0, y0, z1), cam.pt(l0, y1, z1), cam.pt(l0, y1, z0)], _scale(c, 0.78), solid)
    if y1 < cam.height - 0.05:
        p.poly([cam.pt(l0, y1, z0), cam.pt(l1, y1, z0), cam.pt(l1, y1, z1), cam.pt(l0, y1, z1)], _scale(c, 1.12), solid)
    p.rect(cam.x(l0, z0), cam.y(y1, z0), cam.x(l1, z0), cam.y(y0, z0), near or c, solid)


def _strip(cam: Camera, a: float, b: float, zs: Sequence[float], up: float = 0.0) -> list[Point]:
    """Ground band between laterals a and b, drawn through the depths zs."""
    return [cam.pt(a, up, z) for z in zs] + [cam.pt(b, up, z) for z in reversed(zs)]


def _ground_quad(cam: Camera, l0: float, l1: float, z0: float, z1: float) -> list[Point]:
    return [cam.pt(l0, 0.0, z0), cam.pt(l1, 0.0, z0), cam.pt(l1, 0.0, z1), cam.pt(l0, 0.0, z1)]


# --- objects: roadwork -----------------------------------------------------------------------------

def draw_cone(p: Painter, cam: Camera, l: float, z: float, h: float, c: Color, bands: int) -> None:
    s = cam.focal / z
    x, yb = cam.x(l, z), cam.y(0.0, z)
    hp = h * s
    p.tint([(x - 0.5 * hp, yb + 0.02 * hp), (x + 0.7 * hp, yb + 0.02 * hp), (x + 0.5 * hp, yb - 0.03 * hp),
            (x - 0.4 * hp, yb - 0.03 * hp)], BLACK, 70)
    base_h = 0.06 * hp
    p.rect(x - 0.4 * hp, yb - base_h, x + 0.4 * hp, yb, _scale(c, 0.55))
    yt, y0 = yb - hp, yb - base_h
    bw, tw = 0.27 * hp, 0.05 * hp
    p.poly([(x - bw, y0), (x + bw, y0), (x + tw, yt), (x - tw, yt)], c)
    for k in range(min(bands, 2)):
        a, b = ((0.52, 0.68), (0.26, 0.38))[k]
        wa, wb = bw + (tw - bw) * a, bw + (tw - bw) * b
        ya, yb2 = y0 - (y0 - yt) * a, y0 - (y0 - yt) * b
        p.poly([(x - wa, ya), (x + wa, ya), (x + wb, yb2), (x - wb, yb2)], WHITE, False)
    p.tint([(x + 0.3 * bw, y0), (x + bw, y0), (x + tw, yt), (x + 0.3 * tw, yt)], BLACK, 45)


def draw_barrel(p: Painter, cam: Camera, l: float, z: float, c: Color) -> None:
    s = cam.focal / z
    x, yb = cam.x(l, z), cam.y(0.0, z)
    w, h = 0.3 * s, 0.98 * s
    p.tint([(x - w, yb + 0.03 * s), (x + 1.6 * w, yb + 0.03 * s), (x + w, yb - 0.05 * s), (x - w, yb - 0.05 * s)], BLACK, 70)
    p.rect(x - 1.15 * w, yb - 0.07 * s, x + 1.15 * w, yb, BLACK)
    p.rect(x - w, yb - h, x + w, yb - 0.05 * s, c)
    for a, b in ((0.3, 0.42), (0.58, 0.7), (0.82, 0.9)):
        p.rect(x - w, yb - b * h, x + w, yb - a * h, WHITE, False)
    p.ellipse(x, yb - h, w, 0.12 * s, _scale(c, 0.8))
    p.rect(x + 0.45 * w, yb - h, x + w, yb - 0.05 * s, _scale(c, 0.82), False)


def draw_board_barrier(p: Painter, cam: Camera, l0: float, l1: float, z0: float, z1: float, lamp: bool) -> None:
    """Red/white striped board on two legs, across the road (z0 == z1) or along it (l0 == l1)."""
    y_lo, y_hi = 0.78, 1.05
    legs = ((l0, z0), (l1, z1))
    for l, z in legs:
        s = cam.focal / z
        x = cam.x(l, z)
        p.rect(x - 0.03 * s, cam.y(y_lo, z), x + 0.03 * s, cam.y(0.0, z), WHITE)
        p.rect(x - 0.2 * s, cam.y(0.1, z), x + 0.2 * s, cam.y(0.0, z), (230, 200, 30) if lamp else DARK)
    n = max(int(max(abs(l1 - l0), abs(z1 - z0)) / 0.3), 3)
    for k in range(n):
        a, b = k / n, (k + 1) / n
        la, lb = l0 + (l1 - l0) * a, l0 + (l1 - l0) * b
        za, zb = z0 + (z1 - z0) * a, z0 + (z1 - z0) * b
        p.poly([cam.pt(la, y_lo, za), cam.pt(lb, y_lo, zb), cam.pt(lb, y_hi, zb), cam.pt(la, y_hi, za)],
               SIGN_RED if k % 2 == 0 else WHITE)
    if lamp:
        s = cam.focal / z0
        x, y = cam.pt(l0, y_hi + 0.12, z0)
        p.rect(x - 0.02 * s, y, x + 0.02 * s, cam.y(y_hi, z0), DARK)
        p.ellipse(x, y, 0.09 * s, 0.09 * s, (250, 200, 40))


def draw_jersey(p: Painter, cam: Camera, l: float, z0: float, z1: float, c: Color, facing: int) -> None:
    """Plastic water-filled barrier block along the road; facing is the side the camera sees (-1 left)."""
    w = 0.25
    box3d(p, cam, l - w, l + w, z0, z1, 0.0, 0.82, c, solid=True)
    x0, x1 = cam.x(l + facing * w, z0), cam.x(l + facing * w, z1)
    p.poly([(x0, cam.y(0.62, z0)), (x1, cam.y(0.62, z1)), (x1, cam.y(0.7, z1)), (x0, cam.y(0.7, z0))], WHITE, False)


def draw_roadwork_sign(p: Painter, cam: Camera, l: float, z: float, kind: str, size: float, center: float,
                       stand: bool) -> None:
    s = cam.focal / z
    x, yb = cam.x(l, z), cam.y(0.0, z)
    yc = cam.y(center, z)
    k = size * s
    if stand:
        p.line([(x, yc), (x - 0.35 * k, yb)], DARK, 0.05 * s, False)
        p.line([(x, yc), (x + 0.35 * k, yb)], DARK, 0.05 * s, False)
        p.ellipse(x - 0.35 * k, yb, 0.15 * s, 0.06 * s, (40, 35, 30), False)
    else:
        p.rect(x - 0.03 * s, yc, x + 0.03 * s, yb, POLE, False)
    _sign_panel(p, x, yc, k, kind)


def _map(x: float, y: float, k: float, pts: Sequence[Point]) -> list[Point]:
    return [(x + k * u, y + k * v) for u, v in pts]


TRIANGLE = ((0.0, -0.5), (0.5, 0.37), (-0.5, 0.37))
TRIANGLE_IN = ((0.0, -0.3), (0.33, 0.27), (-0.33, 0.27))
YIELD = ((-0.5, -0.37), (0.5, -0.37), (0.0, 0.5))
YIELD_IN = ((-0.33, -0.27), (0.33, -0.27), (0.0, 0.3))
DIAMOND = ((0.0, -0.5), (0.5, 0.0), (0.0, 0.5), (-0.5, 0.0))
DIAMOND_IN = ((0.0, -0.44), (0.44, 0.0), (0.0, 0.44), (-0.44, 0.0))
DIAMOND_CORE = ((0.0, -0.4), (0.4, 0.0), (0.0, 0.4), (-0.4, 0.0))
OCTAGON = tuple((0.5 * math.cos(math.pi / 8 + i * math.pi / 4), 0.5 * math.sin(math.pi / 8 + i * math.pi / 4)) for i in range(8))
DIGGER_BODY = ((-0.05, -0.04), (0.06, -0.04), (0.1, 0.14), (0.0, 0.14))
DIGGER_PILE = ((0.06, 0.24), (0.26, 0.24), (0.16, 0.12))
ARROW = ((-0.3, -0.06), (0.05, -0.06), (0.05, -0.18), (0.3, 0.0), (0.05, 0.18), (0.05, 0.06), (-0.3, 0.06))


def _digger(p: Painter, x: float, y: float, k: float) -> None:
    """The black 'man digging' pictogram of roadwork signs."""
    p.ellipse(x + 0.02 * k, y - 0.12 * k, 0.055 * k, 0.055 * k, BLACK, False)
    p.poly(_map(x, y, k, DIGGER_BODY), BLACK, False)
    p.line(_map(x, y, k, ((-0.2, -0.02), (0.04, 0.22))), BLACK, 0.03 * k, False)
    p.poly(_map(x, y, k, DIGGER_PILE), BLACK, False)


def _sign_panel(p: Painter, x: float, y: float, k: float, kind: str) -> None:
    if kind == "triangle":
        p.poly(_map(x, y, k, TRIANGLE), SIGN_RED)
        p.poly(_map(x, y + 0.04 * k, k, TRIANGLE_IN), WHITE, False)
        _digger(p, x, y + 0.08 * k, 0.6 * k)
    elif kind == "triangle_yellow":
        p.poly(_map(x, y, k, TRIANGLE), SIGN_RED)
        p.poly(_map(x, y + 0.04 * k, k, TRIANGLE_IN), SIGN_YELLOW, False)
        _digger(p, x, y + 0.08 * k, 0.6 * k)
    elif kind == "diamond":
        p.poly(_map(x, y, k, DIAMOND), SIGN_ORANGE)
        p.poly(_map(x, y, k, DIAMOND_IN), BLACK, False)
        p.poly(_map(x, y, k, DIAMOND_CORE), SIGN_ORANGE, False)
        _digger(p, x, y, 0.8 * k)
    elif kind == "work_ahead":
        p.rect(x - 0.6 * k, y - 0.3 * k, x + 0.6 * k, y + 0.3 * k, SIGN_ORANGE)
        for row, width in ((-0.15, 0.8), (0.0, 0.6), (0.15, 0.9)):
            p.rect(x - 0.5 * width * k, y + (row - 0.04) * k, x + 0.5 * width * k, y + (row + 0.04) * k, BLACK, False)
    elif kind == "detour":
        p.rect(x - 0.55 * k, y - 0.32 * k, x + 0.55 * k, y + 0.32 * k, SIGN_YELLOW)
        p.poly(_map(x, y, k, ARROW), BLACK, False)
    elif kind == "stop":
        p.poly(_map(x, y, k, OCTAGON), WHITE)
        p.poly(_map(x, y, 0.9 * k, OCTAGON), SIGN_RED, False)
        for i in range(4):
            u = -0.27 + 0.15 * i
            p.rect(x + u * k, y - 0.09 * k, x + (u + 0.1) * k, y + 0.09 * k, WHITE, False)
    elif kind == "yield":
        p.poly(_map(x, y, k, YIELD), SIGN_RED)
        p.poly(_map(x, y - 0.03 * k, k, YIELD_IN), WHITE, False)
    elif kind == "speed":
        p.ellipse(x, y, 0.5 * k, 0.5 * k, SIGN_RED)
        p.ellipse(x, y, 0.4 * k, 0.4 * k, WHITE, False)
        for u in (-0.11, 0.11):
            p.ellipse(x + u * k, y, 0.09 * k, 0.15 * k, BLACK, False)
            p.ellipse(x + u * k, y, 0.045 * k, 0.1 * k, WHITE, False)
    elif kind == "no_entry":
        p.ellipse(x, y, 0.5 * k, 0.5 * k, SIGN_RED)
        p.rect(x - 0.35 * k, y - 0.08 * k, x + 0.35 * k, y + 0.08 * k, WHITE, False)
    elif kind == "mandatory":
        p.ellipse(x, y, 0.5 * k, 0.5 * k, SIGN_BLUE)
        p.poly(_map(x, y, 0.9 * k, ARROW), WHITE, False)
    elif kind == "parking":
        p.rect(x - 0.4 * k, y - 0.4 * k, x + 0.4 * k, y + 0.4 * k, SIGN_BLUE)
        p.rect(x - 0.16 * k, y - 0.26 * k, x - 0.06 * k, y + 0.28 * k, WHITE, False)
        p.ellipse(x + 0.02 * k, y - 0.1 * k, 0.16 * k, 0.14 * k, WHITE, False)
        p.ellipse(x + 0.0 * k, y - 0.1 * k, 0.07 * k, 0.06 * k, SIGN_BLUE, False)
    elif kind == "warning":
        p.poly(_map(x, y, k, DIAMOND), SIGN_YELLOW)
        p.poly(_map(x, y, k, DIAMOND_IN), BLACK, False)
        p.poly(_map(x, y, k, DIAMOND_CORE), SIGN_YELLOW, False)
        p.line(_map(x, y, k, ((-0.1, 0.22), (-0.1, 0.0), (0.1, -0.1), (0.1, -0.22))), BLACK, 0.06 * k, False)
    else:
        assert kind == "street", kind
        p.rect(x - 0.7 * k, y - 0.15 * k, x + 0.7 * k, y + 0.15 * k, (20, 110, 60))
        p.rect(x - 0.5 * k, y - 0.04 * k, x + 0.4 * k, y + 0.04 * k, WHITE, False)


ROADWORK_SIGNS = ("triangle", "triangle_yellow", "diamond", "work_ahead", "detour")
ORDINARY_SIGNS = ("stop", "yield", "speed", "no_entry", "mandatory", "parking", "warning", "street")


def draw_sign_post(p: Painter, cam: Camera, l: float, z: float, kind: str, size: float, center: float) -> None:
    s = cam.focal / z
    x = cam.x(l, z)
    yc = cam.y(center, z)
    p.rect(x - 0.035 * s, yc, x + 0.035 * s, cam.y(0.0, z), POLE, False)
    _sign_panel(p, x, yc, size * s, kind)


def draw_arrow_board(p: Painter, cam: Camera, l: float, z: float, direction: int, lit: Color) -> None:
    """Trailer with a black panel of lamps forming an arrow."""
    box3d(p, cam, l - 0.8, l + 0.8, z + 0.2, z + 2.2, 0.35, 0.9, (236, 236, 230))
    s = cam.focal / z
    x, yc = cam.x(l, z), cam.y(2.1, z)
    p.rect(x - 0.05 * s, yc, x + 0.05 * s, cam.y(0.9, z), DARK)
    p.rect(x - 0.85 * s, yc - 0.5 * s, x + 0.85 * s, yc + 0.5 * s, BLACK)
    r = 0.06 * s
    for u, v in ((-0.55, 0.0), (-0.35, 0.0), (-0.15, 0.0), (0.05, 0.0), (0.25, 0.0), (0.45, 0.0),
                 (0.3, -0.2), (0.3, 0.2), (0.15, -0.32), (0.15, 0.32)):
        p.ellipse(x + direction * u * s, yc + v * s, r, r, lit, False)


def draw_excavator(p: Painter, cam: Camera, l: float, z: float, c: Color, facing: int) -> None:
    box3d(p, cam, l - 1.3, l - 0.7, z, z + 3.6, 0.0, 0.85, DARK)
    box3d(p, cam, l + 0.7, l + 1.3, z, z + 3.6, 0.0, 0.85, DARK)
    box3d(p, cam, l - 1.2, l + 1.2, z + 0.3, z + 3.2, 0.85, 1.95, c)
    p.rect(cam.x(l - 1.2, z + 0.3), cam.y(1.25, z + 0.3), cam.x(l + 1.2, z + 0.3), cam.y(0.95, z + 0.3), (60, 60, 62), False)
    cab0, cab1 = (l - 1.15, l - 0.1) if facing > 0 else (l + 0.1, l + 1.15)
    box3d(p, cam, cab0, cab1, z + 1.4, z + 2.9, 1.95, 3.2, c, near=GLASS)
    zm = z + 1.8
    s = cam.focal / zm
    pivot, elbow, tip = cam.pt(l + facing * 0.4, 1.8, zm), cam.pt(l + facing * 2.6, 4.0, zm), cam.pt(l + facing * 4.0, 1.0, zm)
    p.line([pivot, elbow, tip], c, 0.42 * s)
    tx, ty = tip
    p.poly([(tx - 0.3 * s, ty), (tx + 0.3 * s, ty), (tx + 0.4 * s * facing, ty + 0.6 * s), (tx - 0.2 * s * facing, ty + 0.7 * s)], DARK)


def draw_roller(p: Painter, cam: Camera, l: float, z: float, c: Color) -> None:
    box3d(p, cam, l - 0.95, l + 0.95, z + 3.2, z + 4.4, 0.0, 1.2, DARK)
    box3d(p, cam, l - 0.9, l + 0.9, z + 1.0, z + 3.6, 0.45, 1.75, c)
    box3d(p, cam, l - 1.05, l + 1.05, z, z + 1.2, 0.0, 1.2, (70, 72, 74))
    p.rect(cam.x(l - 1.05, z), cam.y(1.35, z), cam.x(l + 1.05, z), cam.y(1.2, z), c)
    for side in (-0.8, 0.8):
        p.line([cam.pt(l + side, 1.75, z + 2.3), cam.pt(l + side, 2.9, z + 2.3)], DARK, 0.08 * cam.focal / z)
    box3d(p, cam, l - 1.0, l + 1.0, z + 1.7, z + 3.3, 2.85, 3.0, c)
    x, y = cam.pt(l, 3.1, z + 2.5)
    r = 0.1 * cam.focal / (z + 2.5)
    p.ellipse(x, y, r, r, (250, 150, 30))


def draw_dirt_pile(p: Painter, cam: Camera, l: float, z: float, width: float, c: Color) -> None:
    s = cam.focal / z
    x, yb = cam.x(l, z), cam.y(0.0, z)
    p.dome(x, yb, 0.5 * width * s, 0.35 * width * s, c)
    p.dome(x - 0.1 * width * s, yb, 0.25 * width * s, 0.22 * width * s, _scale(c, 1.15), False)


# --- objects: people and vehicles ----------------------------------------------------------------

@dataclass
class Person:
    height: float
    skin: Color
    hair: Color
    shirt: Color
    pants: Color
    stride: float          # -1 .. 1, leg spread while walking
    vest: Color | None = None
    helmet: Color | None = None
    shovel: bool = False


def draw_person(p: Painter, cam: Camera, l: float, z: float, who: Person) -> None:
    s = cam.focal / z
    x, yb = cam.x(l, z), cam.y(0.0, z)
    hp = who.height * s
    p.tint([(x - 0.12 * hp, yb + 0.01 * hp), (x + 0.25 * hp, yb + 0.01 * hp), (x + 0.15 * hp, yb - 0.02 * hp),
            (x - 0.12 * hp, yb - 0.02 * hp)], BLACK, 60)
    hip_y, sh_y = yb - 0.48 * hp, yb - 0.81 * hp
    spread = 0.06 * hp * who.stride
    lw = 0.055 * hp
    for side in (-1, 1):
        hx = x + side * 0.05 * hp
        fx = hx + side * spread
        p.poly([(hx - lw, hip_y), (hx + lw, hip_y), (fx + 0.8 * lw, yb), (fx - 0.8 * lw, yb)], who.pants)
        p.rect(fx - lw, yb - 0.025 * hp, fx + lw, yb, BLACK, False)
    torso = [(x - 0.13 * hp, sh_y), (x + 0.13 * hp, sh_y), (x + 0.11 * hp, hip_y + 0.02 * hp), (x - 0.11 * hp, hip_y + 0.02 * hp)]
    for side in (-1, 1):
        ax = x + side * 0.145 * hp
        hx = ax + side * 0.02 * hp - side * spread * 0.5
        p.poly([(ax - 0.035 * hp, sh_y + 0.01 * hp), (ax + 0.035 * hp, sh_y + 0.01 * hp),
                (hx + 0.03 * hp, yb - 0.46 * hp), (hx - 0.03 * hp, yb - 0.46 * hp)], who.shirt)
        p.ellipse(hx, yb - 0.445 * hp, 0.03 * hp, 0.03 * hp, who.skin, False)
    p.poly(torso, who.shirt)
    if who.vest is not None:
        p.poly([(x - 0.135 * hp, sh_y + 0.02 * hp), (x + 0.135 * hp, sh_y + 0.02 * hp),
                (x + 0.12 * hp, yb - 0.52 * hp), (x - 0.12 * hp, yb - 0.52 * hp)], who.vest, False)
        for v in (0.6, 0.69):
            p.rect(x - 0.128 * hp, yb - (v + 0.025) * hp, x + 0.128 * hp, yb - v * hp, REFLECTIVE, False)
        for side in (-1, 1):
            p.rect(x + side * 0.07 * hp - 0.02 * hp, sh_y + 0.02 * hp, x + side * 0.07 * hp + 0.02 * hp,
                   yb - 0.69 * hp, REFLECTIVE, False)
    p.rect(x - 0.03 * hp, yb - 0.86 * hp, x + 0.03 * hp, sh_y, who.skin, False)
    head_y = yb - 0.915 * hp
    p.ellipse(x, head_y, 0.055 * hp, 0.07 * hp, who.skin)
    if who.helmet is not None:
        p.dome(x, head_y - 0.01 * hp, 0.07 * hp, 0.07 * hp, who.helmet)
        p.rect(x - 0.08 * hp, head_y - 0.015 * hp, x + 0.08 * hp, head_y - 0.005 * hp, who.helmet)
    else:
        p.dome(x, head_y - 0.012 * hp, 0.058 * hp, 0.065 * hp, who.hair)
    if who.shovel:
        p.line([(x + 0.2 * hp, yb - 0.62 * hp), (x + 0.3 * hp, yb - 0.05 * hp)], (120, 80, 40), 0.02 * hp, False)
        p.poly([(x + 0.26 * hp, yb - 0.1 * hp), (x + 0.34 * hp, yb - 0.1 * hp), (x + 0.33 * hp, yb),
                (x + 0.27 * hp, yb)], (90, 92, 96), False)


@dataclass
class Vehicle:
    kind: str          # "sedan" | "suv" | "van" | "truck" | "bus"
    lateral: float     # centre
    z: float           # near end
    width: float
    length: float
    height: float
    paint: Color
    front: bool        # True when it faces the camera (oncoming)
    lights: bool
    wet: float


VEHICLE_DIMENSIONS = {  # width, length, height
    "sedan": (1.8, 4.5, 1.45), "suv": (1.9, 4.7, 1.7), "van": (2.0, 5.2, 2.1), "truck": (2.45, 8.0, 3.3),
    "bus": (2.55, 12.0, 3.1),
}
CABINS = {  # window-line height, rear overhang, bonnet length (metres)
    "sedan": (0.95, 0.9, 1.4), "suv": (0.95, 0.5, 1.1), "van": (1.05, 0.15, 0.7),
}


def draw_vehicle(p: Painter, cam: Camera, v: Vehicle) -> None:
    l0, l1 = v.lateral - v.width / 2, v.lateral + v.width / 2
    z0, z1 = v.z, v.z + v.length
    s = cam.focal / z0
    p.tint(_ground_quad(cam, l0 - 0.15, l1 + 0.15, z0 - 0.15, z1), BLACK, 95)
    if v.wet > 0:
        for k, length in enumerate((0.8, 1.6)):
            p.tint(_ground_quad(cam, l0 + 0.2 + 0.2 * k, l1 - 0.2 - 0.2 * k, max(z0 - length, 0.5 * z0), z0), v.paint,
                   int(28 * v.wet))
    side = l1 if l1 < -0.05 else (l0 if l0 > 0.05 else None)
    # tyres peeking out under the near bumper
    for a, b in ((l0 + 0.08, l0 + 0.34), (l1 - 0.34, l1 - 0.08)):
        p.rect(cam.x(a, z0 + 0.7), cam.y(0.5, z0 + 0.7), cam.x(b, z0 + 0.7), cam.y(0.0, z0 + 0.7), BLACK)
    if v.kind in ("truck", "bus"):
        _draw_big_vehicle(p, cam, v, l0, l1, z0, z1, side)
        return
    belt, near_off, far_off = CABINS[v.kind]
    if v.front:
        near_off, far_off = far_off, near_off
    zc0, zc1 = z0 + near_off, z1 - far_off
    if side is not None:
        p.poly([cam.pt(side, 0.25, z0), cam.pt(side, 0.25, z1), cam.pt(side, belt, z1), cam.pt(side, belt, z0)], _scale(v.paint, 0.8))
        for zw in (z0 + 0.85, z1 - 0.85):
            xa, xb = cam.x(side, zw - 0.33), cam.x(side, zw + 0.33)
            r = 0.33 * cam.focal / zw
            p.ellipse((xa + xb) / 2, cam.y(0.33, zw), max(abs(xa - xb) / 2, 0.2 * r), r, BLACK)
        inset = 0.12 if side < 0 else -0.12
        p.poly([cam.pt(side + inset, belt, zc0), cam.pt(side + inset, belt, zc1),
                cam.pt(side + inset, v.height, zc1 - 0.3), cam.pt(side + inset, v.height, zc0 + 0.3)], _scale(v.paint, 0.8))
        p.poly([cam.pt(side + inset, belt + 0.06, zc0 + 0.15), cam.pt(side + inset, belt + 0.06, zc1 - 0.15),
                cam.pt(side + inset, v.height - 0.08, zc1 - 0.35), cam.pt(side + inset, v.height - 0.08, zc0 + 0.35)], GLASS, False)
    if belt < cam.height:
        p.poly([cam.pt(l0, belt, z0), cam.pt(l1, belt, z0), cam.pt(l1, belt, zc0), cam.pt(l0, belt, zc0)], _scale(v.paint, 1.1))
    if v.height < cam.height:
        p.poly([cam.pt(l0 + 0.15, v.height, zc0 + 0.3), cam.pt(l1 - 0.15, v.height, zc0 + 0.3),
                cam.pt(l1 - 0.15, v.height, zc1 - 0.3), cam.pt(l0 + 0.15, v.height, zc1 - 0.3)], _scale(v.paint, 1.12))
    window = [cam.pt(l0 + 0.1, belt, zc0), cam.pt(l1 - 0.1, belt, zc0), cam.pt(l1 - 0.18, v.height, zc0 + 0.3),
              cam.pt(l0 + 0.18, v.height, zc0 + 0.3)]
    p.poly(window, v.paint)
    p.poly([cam.pt(l0 + 0.18, belt + 0.04, zc0 + 0.02), cam.pt(l1 - 0.18, belt + 0.04, zc0 + 0.02),
            cam.pt(l1 - 0.24, v.height - 0.07, zc0 + 0.28), cam.pt(l0 + 0.24, v.height - 0.07, zc0 + 0.28)], GLASS, False)
    xa, xb = cam.x(l0, z0), cam.x(l1, z0)
    p.rect(xa, cam.y(belt, z0), xb, cam.y(0.22, z0), v.paint)
    p.rect(xa, cam.y(0.42, z0), xb, cam.y(0.22, z0), (40, 40, 42), False)
    _lamps(p, cam, v, l0, l1, z0, s, 0.68, 0.84)
    pw = 0.26
    p.rect(cam.x(v.lateral - pw, z0), cam.y(0.55, z0), cam.x(v.lateral + pw, z0), cam.y(0.44, z0), WHITE, False)


def _lamps(p: Painter, cam: Camera, v: Vehicle, l0: float, l1: float, z0: float, s: float, lo: float, hi: float) -> None:
    lamp = (235, 232, 210) if v.front else (205, 22, 24)
    for a, b in ((l0 + 0.05, l0 + 0.35), (l1 - 0.35, l1 - 0.05)):
        xa, xb = cam.x(a, z0), cam.x(b, z0)
        ya, yb = cam.y(hi, z0), cam.y(lo, z0)
        p.rect(xa, ya, xb, yb, lamp, False)
        if v.lights:
            p.glow((xa + xb) / 2, (ya + yb) / 2, 0.35 * s, lamp, 80)


def _draw_big_vehicle(p: Painter, cam: Camera, v: Vehicle, l0: float, l1: float, z0: float, z1: float,
                      side: float | None) -> None:
    s = cam.focal / z0
    if side is not None:
        p.poly([cam.pt(side, 0.5, z0), cam.pt(side, 0.5, z1), cam.pt(side, v.height, z1), cam.pt(side, v.height, z0)], _scale(v.paint, 0.8))
        if v.kind == "bus":
            p.poly([cam.pt(side, 1.3, z0 + 0.5), cam.pt(side, 1.3, z1 - 1.0), cam.pt(side, 2.5, z1 - 1.0),
                    cam.pt(side, 2.5, z0 + 0.5)], GLASS, False)
        for zw in (z0 + 1.2, z1 - 1.6):
            xa, xb = cam.x(side, zw - 0.5), cam.x(side, zw + 0.5)
            r = 0.5 * cam.focal / zw
            p.ellipse((xa + xb) / 2, cam.y(0.5, zw), max(abs(xa - xb) / 2, 0.2 * r), r, BLACK)
    xa, xb = cam.x(l0, z0), cam.x(l1, z0)
    p.rect(xa, cam.y(v.height, z0), xb, cam.y(0.45, z0), v.paint)
    if v.kind == "bus" or v.front:
        p.rect(cam.x(l0 + 0.15, z0), cam.y(v.height - 0.2, z0), cam.x(l1 - 0.15, z0), cam.y(1.5, z0), GLASS, False)
    else:
        xm = cam.x(v.lateral, z0)
        p.line([(xm, cam.y(v.height - 0.1, z0)), (xm, cam.y(0.7, z0))], DARK, 0.04 * s, False)
    p.rect(xa, cam.y(0.6, z0), xb, cam.y(0.45, z0), DARK, False)
    _lamps(p, cam, v, l0, l1, z0, s, 0.7, 0.9)


# --- scene ingredients -----------------------------------------------------------------------------

def _camera(rng: np.random.Generator, canvas: int) -> Camera:
    curve = 0.0 if rng.random() < 0.5 else _u(rng, -1.0, 1.0) * 7e-4
    return Camera(focal=canvas * _u(rng, 0.55, 1.0), horizon=canvas * _u(rng, 0.36, 0.5),
                  center_x=canvas * _u(rng, 0.4, 0.6), height=_u(rng, 1.15, 1.65), curve=curve)


def _road(rng: np.random.Generator) -> Road:
    r = rng.random()
    kind = "urban" if r < 0.5 else "suburban" if r < 0.8 else "highway"
    if kind == "highway":
        lanes = int(rng.integers(2, 5))
        lane_width = _u(rng, 3.4, 3.8)
        oncoming = 0
        walks = (0.0, 0.0)
        setback = 0.0
    elif kind == "urban":
        lanes = _pick(rng, (1, 2, 2, 2, 3, 4))
        lane_width = _u(rng, 2.9, 3.5)
        oncoming = lanes // 2 if lanes >= 2 and rng.random() < 0.7 else 0
        walks = (_u(rng, 2.0, 5.0), _u(rng, 2.0, 5.0))
        setback = _u(rng, 0.0, 1.5)
    else:
        lanes = _pick(rng, (1, 2, 2))
        lane_width = _u(rng, 2.8, 3.4)
        oncoming = lanes // 2
        walks = (_u(rng, 1.5, 2.5), _u(rng, 1.5, 2.5)) if rng.random() < 0.7 else (0.0, 0.0)
        setback = _u(rng, 3.0, 9.0)
    ego = int(rng.integers(oncoming, lanes))
    left = -(ego + 0.5) * lane_width + _u(rng, -0.35, 0.35)
    g = int(rng.integers(70, 112))
    asphalt = (g, g, g + int(rng.integers(0, 6)))
    pavement = _vary(rng, _pick(rng, ((165, 165, 160), (180, 176, 168), (150, 150, 152), (170, 130, 115))), 8)
    verge = _vary(rng, _pick(rng, ((80, 120, 55), (95, 125, 60), (120, 110, 80), (110, 130, 70))), 10)
    if kind == "urban":
        verge = pavement
    return Road(kind, lanes, lane_width, oncoming, ego, left, walks[0], walks[1], setback, asphalt, pavement,
                verge, rng.random() < 0.35)


def _look(rng: np.random.Generator) -> Look:
    r = rng.random()
    time = "day" if r < 0.5 else "overcast" if r < 0.8 else "dusk"
    if time == "day":
        top, horizon = _vary(rng, (70, 128, 210), 20), _vary(rng, (178, 205, 232), 12)
        g = _u(rng, 0.92, 1.2)
        gain, saturation = (g, g, g), _u(rng, 0.95, 1.15)
    elif time == "overcast":
        v = int(rng.integers(145, 190))
        top, horizon = (v, v + 3, v + 8), (v + 25, v + 27, v + 30)
        g = _u(rng, 0.78, 1.05)
        gain, saturation = (g, g, g), _u(rng, 0.7, 0.92)
    else:
        top, horizon = _vary(rng, (55, 62, 118), 15), _vary(rng, (236, 142, 84), 15)
        g = _u(rng, 0.55, 0.85)
        gain, saturation = (g * 1.08, g * 0.95, g * 0.82), _u(rng, 0.85, 1.05)
    w = rng.random()
    weather = "clear" if w < 0.55 else "haze" if w < 0.8 else "fog" if w < 0.9 else "rain"
    visibility = {"clear": (400.0, 1200.0), "haze": (120.0, 300.0), "fog": (35.0, 80.0), "rain": (80.0, 200.0)}[weather]
    visibility = _u(rng, *visibility)
    fog = _mix(horizon, (200, 202, 205), 0.6 if weather in ("fog", "rain") else 0.2)
    if visibility < 120:
        k = 0.85 * (1 - visibility / 120)
        top, horizon = _mix(top, fog, k), _mix(horizon, fog, k)
    wet = _u(rng, 0.5, 1.0) if weather == "rain" else (_u(rng, 0.2, 0.6) if rng.random() < 0.12 else 0.0)
    rain = int(_u(rng, 60, 220)) if weather == "rain" else 0
    return Look(time, top, horizon, fog, visibility, gain, saturation, wet, rain,
                lights=time == "dusk" or (weather in ("fog", "rain") and rng.random() < 0.5), autumn=rng.random() < 0.15,
                noise=_u(rng, 0.5, 3.5))


def _background(cam: Camera, road: Road, look: Look, canvas: int) -> Image.Image:
    """Sky gradient above the horizon, fogged verge below: one colour per row, stretched sideways."""
    rows = np.arange(canvas, dtype=np.float32) + 0.5
    below = rows - cam.horizon
    z = cam.focal * cam.height / np.maximum(below, 1e-3)
    t = (1.0 - np.exp(-z / look.visibility))[:, None]
    u = np.clip(rows / max(cam.horizon, 1.0), 0, 1)[:, None] ** 1.3
    sky = np.array(look.sky_top, np.float32) * (1 - u) + np.array(look.sky_horizon, np.float32) * u
    verge = np.array(road.verge, np.float32) * (1 - t) + np.array(look.fog, np.float32) * t
    column = np.where((below > 0)[:, None], verge, sky)
    column = np.clip(column + 0.5, 0, 255).astype(np.uint8)[:, None, :]
    return Image.fromarray(column).resize((canvas, canvas), Image.NEAREST)


def _ground(p: Painter, cam: Camera, road: Road, look: Look, canvas: int, z_near: float) -> None:
    """Road and sidewalks as depth bands, each in its own fog colour; a wet road mirrors the sky near the horizon."""
    depths = [float(z) for z in np.geomspace(0.6 * z_near, Z_FAR, 30)]
    walks = []
    if road.walk_left > 0:
        walks.append((road.left - road.walk_left, road.left))
    if road.walk_right > 0:
        walks.append((road.right, road.right + road.walk_right))
    asphalt = _scale(road.asphalt, 1 - 0.35 * look.wet)
    for za, zb in zip(depths[:-1], depths[1:]):
        zm = math.sqrt(za * zb)
        p.at(zm)
        sheen = look.wet * 0.55 * math.exp(-(cam.y(0.0, zm) - cam.horizon) / (0.12 * canvas))
        p.poly(_ground_quad(cam, road.left, road.right, za, zb), _mix(asphalt, look.sky_horizon, sheen), False)
        for a, b in walks:
            p.poly(_ground_quad(cam, a, b, za, zb), road.pavement, False)


def _skyline(p: Painter, rng: np.random.Generator, cam: Camera, road: Road, look: Look, canvas: int) -> None:
    p.at(600.0)
    x = -float(rng.integers(0, canvas // 8))
    hz = cam.horizon
    if road.kind == "urban":
        while x < canvas:
            w = canvas * _u(rng, 0.03, 0.12)
            h = canvas * _u(rng, 0.02, 0.16)
            p.rect(x, hz - h, x + w, hz + 1, _vary(rng, (120, 122, 130), 15), False)
            x += w
    else:
        green = (40, 70, 40) if not look.autumn else (150, 100, 40)
        while x < canvas:
            r = canvas * _u(rng, 0.015, 0.05)
            p.ellipse(x, hz, r, r * _u(rng, 0.6, 1.2), _vary(rng, green, 12), False)
            x += r
    for _ in range(int(rng.integers(0, 4)) if look.time != "overcast" else 0):
        cx, cy = canvas * _u(rng, 0, 1), hz * _u(rng, 0.1, 0.7)
        r = canvas * _u(rng, 0.05, 0.15)
        p.blend.ellipse((cx - r, cy - 0.3 * r, cx + r, cy + 0.3 * r), fill=(250, 250, 250, int(rng.integers(40, 110))))


def _markings(p: Painter, rng: np.random.Generator, cam: Camera, road: Road, zs: list[float], z_near: float) -> None:
    white = (228, 228, 222)
    yellow = (222, 180, 40)
    dash, period = _u(rng, 2.0, 4.0), _u(rng, 8.0, 13.0)
    phase = _u(rng, 0, period)
    p.at(30.0)
    if road.kind != "urban" or rng.random() < 0.5:
        for a in (road.left + 0.15, road.right - 0.3):
            p.poly(_strip(cam, a, a + 0.15, zs), white, False)
    for k in range(1, road.lanes):
        b = road.left + k * road.lane_width
        if k == road.oncoming:
            color = yellow if road.us_markings else white
            p.poly(_strip(cam, b - 0.1, b + 0.02 if road.us_markings else b + 0.08, zs), color, False)
            if road.us_markings:
                p.poly(_strip(cam, b + 0.06, b + 0.18, zs), color, False)
            continue
        z = 0.6 * z_near + phase
        while z < 120.0:
            p.at(z)
            p.poly(_ground_quad(cam, b - 0.07, b + 0.07, z, z + dash), white, False)
            z += period
    if road.kind != "highway":
        p.at(30.0)
        for a in (road.left, road.right):
            p.poly(_strip(cam, a, a, zs, 0.0)[: len(zs)] + _strip(cam, a, a, zs, 0.13)[len(zs):], (175, 175, 170), False)
    if road.kind == "urban" and rng.random() < 0.2:
        zc = _u(rng, z_near + 2, 30)
        p.at(zc)
        l = road.left + 0.3
        while l < road.right - 0.3:
            p.poly(_ground_quad(cam, l, l + 0.5, zc, zc + 3.0), white, False)
            l += 1.0
    for _ in range(int(rng.integers(0, 3)) if road.kind == "urban" else 0):
        l, z = _u(rng, road.left + 1, road.right - 1), _u(rng, z_near + 1, 40)
        p.at(z)
        r = 0.35 * cam.focal / z
        p.ellipse(cam.x(l, z), cam.y(0.0, z), r, max(r * cam.height / z, 0.5), (60, 60, 62), False)
    if rng.random() < 0.3:
        l, z = _u(rng, road.left, road.right - 2), _u(rng, z_near + 1, 50)
        p.at(z)
        p.poly(_ground_quad(cam, l, l + _u(rng, 1.0, 3.0), z, z + _u(rng, 1.5, 6.0)), _scale(road.asphalt, 0.75), False)


def _facade(p: Painter, rng: np.random.Generator, cam: Camera, road: Road, look: Look, side: int, X: float,
            z1: float, z2: float) -> None:
    """A building front in the plane lateral == X from z1 to z2: wall, end wall, window grid, shop and awning."""
    f, hz, eye = cam.focal, cam.horizon, cam.height

    def quad(za: float, zb: float, lo: float, hi: float, lat: float = X) -> list[Point]:
        ka, kb = f / za, f / zb
        xa = cam.center_x + ka * (lat + cam.curve * za * za)
        xb = cam.center_x + kb * (lat + cam.curve * zb * zb)
        return [(xa, hz + (eye - lo) * ka), (xb, hz + (eye - lo) * kb), (xb, hz + (eye - hi) * kb), (xa, hz + (eye - hi) * ka)]

    suburban = road.kind == "suburban"
    height = _u(rng, 4.5, 8.0) if suburban else _u(rng, 6.0, 32.0)
    wall = _vary(rng, _pick(rng, BUILDING_WALLS), 10)
    p.at(0.5 * (z1 + z2))
    far_side = X + side * 8.0
    p.poly([cam.pt(X, 0, z1), cam.pt(far_side, 0, z1), cam.pt(far_side, height, z1), cam.pt(X, height, z1)],
           _scale(wall, 0.72), False)
    p.poly(quad(z1, z2, 0.0, height), wall, False)
    if suburban:
        roof = _vary(rng, _pick(rng, ROOFS), 10)
        p.poly([cam.pt(X, height, z1), cam.pt(X, height, z2), cam.pt(X + side * 3.5, height + 2.8, z2),
                cam.pt(X + side * 3.5, height + 2.8, z1)], roof, False)
    floor_h = _u(rng, 2.9, 3.6)
    floors = int(height / floor_h)
    if f * floor_h / z2 < 4.0 or floors == 0:
        return                                   # too far for windows to show
    shop = not suburban and rng.random() < 0.6
    glass = _vary(rng, GLASS if not look.lights else (160, 140, 90), 15)
    za, zb = z1 + 0.6, z2 - 0.6
    first = 1 if shop else 0
    for k in range(first, floors):
        p.poly(quad(za, zb, k * floor_h + 0.9, k * floor_h + 2.2), glass, False)
    column = _u(rng, 2.2, 3.6)
    pillar = column * _u(rng, 0.3, 0.55)
    lo, hi = first * floor_h + 0.9, (floors - 1) * floor_h + 2.2
    if hi > lo:
        z = za + column - pillar
        while z < zb - pillar:
            p.poly(quad(z, z + pillar, lo, hi), wall, False)
            z += column
    if shop:
        p.poly(quad(za, zb, 0.3, 2.5), _vary(rng, (70, 80, 90), 20), False)
        if rng.random() < 0.55:
            c1, c2 = _pick(rng, AWNINGS)
            out = X - side * 1.4
            stripe = _u(rng, 0.4, 0.8)
            z, k = za, 0
            while z < zb:
                ze = min(z + stripe, zb)
                p.poly([cam.pt(X, 3.0, z), cam.pt(X, 3.0, ze), cam.pt(out, 2.4, ze), cam.pt(out, 2.4, z)],
                       c1 if k % 2 == 0 else c2, False)
                z, k = ze, k + 1


def _buildings(p: Painter, rng: np.random.Generator, cam: Camera, road: Road, look: Look) -> None:
    if road.kind == "highway":
        return
    for side in (-1, 1):
        edge = road.left - road.walk_left if side < 0 else road.right + road.walk_right
        spans = []
        z = _u(rng, 0.5, 6.0)
        while z < 150.0 and len(spans) < 12:
            width = _u(rng, 7.0, 24.0) if road.kind == "urban" else _u(rng, 8.0, 14.0)
            gap = _u(rng, 0.0, 4.0) if road.kind == "urban" and rng.random() < 0.4 else (
                _u(rng, 6.0, 20.0) if road.kind == "suburban" else 0.0)
            X = edge + side * (road.setback + _u(rng, 0.0, 0.6 if road.kind == "urban" else 4.0))
            spans.append((X, z, z + width))
            z += width + gap
        for X, z1, z2 in reversed(spans):
            _facade(p, rng, cam, road, look, side, X, z1, z2)


def draw_tree(p: Painter, cam: Camera, l: float, z: float, trunk: float, crown: float, green: Color) -> None:
    s = cam.focal / z
    x, yb = cam.x(l, z), cam.y(0.0, z)
    p.rect(x - 0.14 * s, yb - (trunk + 0.5 * crown) * s, x + 0.14 * s, yb, (85, 65, 45))
    cy, r = yb - (trunk + 0.8 * crown) * s, crown * s
    p.ellipse(x, cy, r, 0.9 * r, green)
    p.ellipse(x - 0.45 * r, cy + 0.3 * r, 0.6 * r, 0.5 * r, _scale(green, 0.8))
    p.ellipse(x + 0.4 * r, cy - 0.25 * r, 0.55 * r, 0.5 * r, _scale(green, 1.2))


def draw_lamp(p: Painter, cam: Camera, l: float, z: float, height: float, side: int, lit: bool) -> None:
    s = cam.focal / z
    x = cam.x(l, z)
    top = cam.y(height, z)
    p.rect(x - 0.08 * s, top, x + 0.08 * s, cam.y(0.0, z), POLE)
    hx = cam.x(l - side * 1.6, z)
    p.line([(x, top), (hx, top + 0.2 * s)], POLE, 0.08 * s)
    p.rect(hx - 0.3 * s, top + 0.15 * s, hx + 0.3 * s, top + 0.3 * s, DARK)
    if lit:
        p.glow(hx, top + 0.3 * s, 0.45 * s, (255, 225, 160), 60)


def draw_traffic_light(p: Painter, cam: Camera, l: float, z: float, state: int) -> None:
    s = cam.focal / z
    x = cam.x(l, z)
    p.rect(x - 0.06 * s, cam.y(3.0, z), x + 0.06 * s, cam.y(0.0, z), POLE)
    y0 = cam.y(4.0, z)
    p.rect(x - 0.2 * s, y0, x + 0.2 * s, y0 + 1.0 * s, BLACK)
    for i, lit in enumerate(((230, 30, 30), (245, 160, 20), (40, 210, 90))):
        p.ellipse(x, y0 + (0.17 + 0.33 * i) * s, 0.12 * s, 0.12 * s, lit if i == state else (50, 50, 50), False)


def draw_hydrant(p: Painter, cam: Camera, l: float, z: float, c: Color) -> None:
    s = cam.focal / z
    x, yb = cam.x(l, z), cam.y(0.0, z)
    p.rect(x - 0.13 * s, yb - 0.6 * s, x + 0.13 * s, yb, c)
    p.dome(x, yb - 0.6 * s, 0.13 * s, 0.12 * s, c)
    p.rect(x - 0.22 * s, yb - 0.45 * s, x + 0.22 * s, yb - 0.35 * s, _scale(c, 0.85))


def draw_ball(p: Painter, cam: Camera, l: float, z: float, r: float, c: Color) -> None:
    s = cam.focal / z
    x, yb = cam.x(l, z), cam.y(0.0, z)
    p.ellipse(x, yb - r * s, r * s, r * s, c)
    p.ellipse(x - 0.3 * r * s, yb - 1.3 * r * s, 0.35 * r * s, 0.3 * r * s, _scale(c, 1.2), False)


def draw_bin(p: Painter, cam: Camera, l: float, z: float, c: Color) -> None:
    box3d(p, cam, l - 0.3, l + 0.3, z, z + 0.7, 0.0, 1.05, c)
    box3d(p, cam, l - 0.33, l + 0.33, z - 0.03, z + 0.73, 1.05, 1.12, _scale(c, 0.8))


def draw_bollard(p: Painter, cam: Camera, l: float, z: float, striped: bool) -> None:
    s = cam.focal / z
    x, yb = cam.x(l, z), cam.y(0.0, z)
    p.rect(x - 0.07 * s, yb - 0.95 * s, x + 0.07 * s, yb, WHITE if striped else (60, 62, 64))
    if striped:
        for a in (0.25, 0.6):
            p.rect(x - 0.07 * s, yb - (a + 0.15) * s, x + 0.07 * s, yb - a * s, SIGN_RED, False)


def draw_guardrail(p: Painter, cam: Camera, l: float, zs: list[float], z_near: float) -> None:
    p.at(40.0)
    p.poly(_strip(cam, l, l, zs, 0.55)[: len(zs)] + _strip(cam, l, l, zs, 0.8)[len(zs):], (175, 178, 180), False)
    z = max(z_near, 2.0)
    while z < 60.0:
        s = cam.focal / z
        x = cam.x(l, z)
        p.rect(x - 0.05 * s, cam.y(0.8, z), x + 0.05 * s, cam.y(0.0, z), (120, 122, 125), False)
        z += 4.0


# --- layout ---------------------------------------------------------------------------------------

@dataclass
class Layout:
    rng: np.random.Generator
    cam: Camera
    road: Road
    look: Look
    z_near: float
    canvas: int
    zs: list[float]      # depths the long ground strips are drawn through
    objects: list[tuple[float, int, str | None, Callable, tuple]] = field(default_factory=list)
    decals: list[tuple[Callable, tuple]] = field(default_factory=list)
    blocked: list[tuple[float, float, float, float]] = field(default_factory=list)

    def add(self, z: float, cls: str | None, fn: Callable, *args) -> None:
        self.objects.append((z, len(self.objects), cls, fn, args))

    def block(self, l0: float, l1: float, z0: float, z1: float) -> None:
        self.blocked.append((l0, l1, z0, z1))

    def free(self, l0: float, l1: float, z0: float, z1: float) -> bool:
        return all(l1 <= a or l0 >= b or z1 <= c or z0 >= d for a, b, c, d in self.blocked)

    def in_view(self, l: float, z: float, margin: float = 1.0) -> bool:
        pad = margin * self.cam.focal / z
        return -pad < self.cam.x(l, z) < self.canvas + pad

    def min_pixels(self) -> float:
        """Canvas pixels a deliberately small roadwork object still spans (7 % of the image)."""
        return 0.07 * self.canvas

    def person(self, worker: bool) -> Person:
        rng = self.rng
        skin = _pick(rng, SKIN)
        p = Person(height=_u(rng, 1.55, 1.92), skin=skin, hair=_pick(rng, HAIR), shirt=_vary(rng, _pick(rng, CLOTHES), 15),
                   pants=_vary(rng, _pick(rng, PANTS), 10), stride=_u(rng, -1.0, 1.0) if rng.random() < 0.6 else 0.0)
        if worker:
            p.vest = _vary(rng, _pick(rng, VEST_COLORS), 8)
            p.helmet = _pick(rng, HELMET_COLORS) if rng.random() < 0.85 else None
            p.shovel = rng.random() < 0.3
            if rng.random() < 0.3:
                p.pants = p.vest
        return p


def _max_distance(cam: Camera, size_m: float, min_px: float) -> float:
    """Farthest distance at which something size_m tall still spans min_px canvas pixels."""
    return cam.focal * size_m / min_px


def _place_cone_line(L: Layout, lats: list[float], zs: list[float], device: str, cone: Color, bands: int) -> None:
    for l, z in zip(lats, zs):
        if z < L.z_near + 0.5 or not L.in_view(l, z):
            continue
        if device == "barrel":
            L.add(z, "barrel", draw_barrel, l, z, _vary(L.rng, cone, 8))
        else:
            L.add(z, "cone", draw_cone, l, z, _u(L.rng, 0.5, 0.9), _vary(L.rng, cone, 8), bands)


def _work_extras(L: Layout, l0: float, l1: float, z0: float, z1: float, on_road: bool) -> None:
    """Things inside a closed area: dug asphalt, a dirt pile, workers, machinery."""
    rng = L.rng
    if rng.random() < 0.6:
        pts, zc, lc = [], 0.5 * (z0 + z1), 0.5 * (l0 + l1)
        hl, hz = 0.45 * (l1 - l0), 0.4 * (z1 - z0)
        for a in range(8):
            ang = a * math.pi / 4
            pts.append((lc + hl * math.cos(ang) * _u(rng, 0.7, 1.0), zc + hz * math.sin(ang) * _u(rng, 0.7, 1.0)))
        L.decals.append((_dug_patch, (pts, _vary(rng, (105, 82, 60), 12), zc)))
        if rng.random() < 0.5:
            L.add(zc + 0.5 * hz, None, draw_dirt_pile, lc + _u(rng, -0.3, 0.3) * hl, zc + 0.5 * hz,
                  _u(rng, 1.0, 2.5), _vary(rng, (120, 95, 70), 10))
    for _ in range(int(rng.integers(0, 3)) if rng.random() < 0.7 else 0):
        z = _u(rng, z0, z1)
        L.add(z, "worker", draw_person, _u(rng, l0 + 0.3, l1 - 0.3), z, L.person(worker=True))
    if on_road and rng.random() < 0.45 and z1 - z0 > 6 and l1 - l0 > 2.2:
        z = _u(rng, z0 + 1, max(z1 - 5, z0 + 1.5))
        l = 0.5 * (l0 + l1)
        c = _pick(rng, MACHINE_COLORS)
        if rng.random() < 0.6:
            L.add(z, "machinery", draw_excavator, l, z, c, -1 if l > 0 else 1)
        else:
            L.add(z, "machinery", draw_roller, l, z, c)


def _dug_patch(p: Painter, cam: Camera, pts: list[tuple[float, float]], c: Color, z: float) -> None:
    p.at(z)
    p.poly([cam.pt(l, 0.0, zz) for l, zz in pts], _scale(c, 0.8), False)
    p.poly([cam.pt(l, 0.0, zz + 0.15) for l, zz in pts], c, False)


def _lane_closure(L: Layout) -> None:
    rng, road = L.rng, L.road
    k = road.lanes - 1 if rng.random() < 0.75 else 0
    if k == road.ego:
        k = 0 if k == road.lanes - 1 else road.lanes - 1
    lo, hi = road.lane(k)
    side = 1 if k > road.ego else -1          # the open traffic is on the camera's side of the closed lane
    inner, outer = (lo + 0.3, hi - 0.4) if side > 0 else (hi - 0.3, lo + 0.4)
    z0 = L.z_near + 1.5 + 25.0 * float(rng.random()) ** 2      # mostly near: the sparse layouts cover far
    z1 = min(z0 + _u(rng, 15.0, 70.0), 150.0)
    device = _pick(rng, ("cone", "cone", "cone", "barrel", "jersey", "board"))
    cone, bands = _pick(rng, CONE_COLORS), int(rng.integers(1, 3))
    if device in ("cone", "barrel"):
        spacing = _u(rng, 2.5, 6.0) if device == "cone" else _u(rng, 4.0, 8.0)
        taper = int(rng.integers(2, 6))
        zs = [float(z) for z in np.arange(z0, z1, spacing)[:30]]
        lats = [outer + (inner - outer) * min(1.0, i / taper) for i in range(len(zs))]
        _place_cone_line(L, lats, zs, device, cone, bands)
    elif device == "jersey":
        c1, c2 = _pick(rng, ((SIGN_RED, WHITE), (SIGN_ORANGE, WHITE), (SIGN_ORANGE, SIGN_ORANGE)))
        z = z0
        for i in range(12):
            if z > z1:
                break
            if L.in_view(inner, z):
                L.add(z, "barrier", draw_jersey, inner, z, z + 1.9, c1 if i % 2 == 0 else c2, -side)
            z += 2.0
    else:
        L.add(z0, "barrier", draw_board_barrier, min(inner, outer), max(inner, outer), z0, z0, rng.random() < 0.4)
        z = z0 + 2.0
        while z < min(z1, z0 + 30):
            L.add(z, "barrier", draw_board_barrier, inner, inner, z, z + 2.5, False)
            z += 3.0
    L.block(lo, hi, z0 - 12.0, z1 + 5.0)
    zs_sign = z0 - _u(rng, 4.0, 25.0)
    if zs_sign > L.z_near + 1.0 and rng.random() < 0.7:
        l_sign = (hi + 0.6 if side > 0 else lo - 0.6) if k in (0, road.lanes - 1) else outer
        L.add(zs_sign, "roadwork_sign", draw_roadwork_sign, l_sign, zs_sign, _pick(rng, ROADWORK_SIGNS),
              _u(rng, 0.6, 1.1), _u(rng, 0.9, 2.2), rng.random() < 0.5)
    if rng.random() < 0.25:
        L.add(z0 + 1.0, "roadwork_sign", draw_arrow_board, 0.5 * (lo + hi), z0 + 1.0, -side,
              _pick(rng, ((255, 200, 60), (255, 150, 40))))
    _work_extras(L, min(inner, outer), max(inner, outer), z0 + 3.0, z1, on_road=True)


def _work_site(L: Layout) -> None:
    rng, road = L.rng, L.road
    walk = road.walk_right if road.walk_right > 1.5 else 0.0
    on_walk = walk > 0 and rng.random() < 0.45
    if on_walk:
        l0, l1 = road.right + 0.3, road.right + walk - 0.2
    else:
        k = road.lanes - 1 if road.lanes - 1 != road.ego or road.lanes == 1 else 0
        lo, hi = road.lane(k)
        width = _u(rng, 1.6, road.lane_width - 0.3)
        l0, l1 = (hi - width, hi - 0.15) if k >= road.ego else (lo + 0.15, lo + width)
        if road.lanes == 1:
            l0, l1 = road.right - width, road.right - 0.15
    z0 = L.z_near + 2.0 + 20.0 * float(rng.random()) ** 2
    z1 = z0 + _u(rng, 3.0, 14.0)
    fence = _pick(rng, ("board", "board", "jersey", "cones"))
    facing = 1 if l0 > 0 else -1      # the long side the camera sees
    side_l = l0 if facing > 0 else l1
    if fence == "board":
        L.add(z0, "barrier", draw_board_barrier, l0, l1, z0, z0, rng.random() < 0.4)
        z = z0 + 0.3
        while z < z1 - 0.5:
            L.add(z, "barrier", draw_board_barrier, side_l, side_l, z, min(z + 2.5, z1), False)
            z += 2.8
    elif fence == "jersey":
        c = _pick(rng, (SIGN_RED, SIGN_ORANGE, WHITE))
        z, i = z0, 0
        while z < z1 and i < 8:
            L.add(z, "barrier", draw_jersey, side_l, z, z + 1.9, c if i % 2 == 0 else WHITE, -facing)
            z, i = z + 2.0, i + 1
    else:
        cone, bands = _pick(rng, CONE_COLORS), int(rng.integers(1, 3))
        zs = [float(z) for z in np.arange(z0, z1, _u(rng, 1.5, 3.0))]
        _place_cone_line(L, [side_l] * len(zs), zs, "cone", cone, bands)
        _place_cone_line(L, [l0 + (l1 - l0) * a for a in (0.33, 0.66)], [z0, z0], "cone", cone, bands)
    L.block(min(l0, l1) - 0.5, max(l0, l1) + 0.5, z0 - 6.0, z1 + 4.0)
    if rng.random() < 0.5:
        zs = z0 - _u(rng, 2.0, 10.0)
        if zs > L.z_near + 1.0:
            L.add(zs, "roadwork_sign", draw_roadwork_sign, side_l, zs, _pick(rng, ROADWORK_SIGNS),
                  _u(rng, 0.6, 1.0), _u(rng, 0.8, 1.6), True)
    _work_extras(L, l0, l1, z0 + 0.5, z1, on_road=not on_walk)


def _sparse_roadwork(L: Layout) -> None:
    """One to three roadwork items, smaller and farther than a work zone: the hard positives."""
    rng, road, cam = L.rng, L.road, L.cam
    for _ in range(_pick(rng, (1, 2, 2, 3))):
        kind = _pick(rng, ("cone", "cone", "cone", "barrel", "sign", "sign", "barrier", "worker", "machinery"))
        spot = rng.random()
        if spot < 0.4:
            l = road.right - _u(rng, 0.3, 1.2)
        elif spot < 0.6 and road.walk_right > 0:
            l = road.right + _u(rng, 0.3, road.walk_right)
        elif spot < 0.8:
            l = road.left + _u(rng, 0.3, 1.2)
        else:
            l = _u(rng, road.left + 0.5, road.right - 0.5)
        height = {"cone": 0.7, "barrel": 1.0, "sign": 1.0, "barrier": 1.0, "worker": 1.7, "machinery": 3.0}[kind]
        z_max = min(max(_max_distance(cam, height, L.min_pixels()), L.z_near + 3.0), 80.0)
        z = L.z_near + 1.5 + (z_max - L.z_near - 1.5) * float(rng.random()) ** 0.7
        if not L.in_view(l, z):
            l = road.right - 0.8
        if kind == "cone":
            L.add(z, "cone", draw_cone, l, z, _u(rng, 0.5, 0.9), _vary(rng, _pick(rng, CONE_COLORS), 8), int(rng.integers(1, 3)))
        elif kind == "barrel":
            L.add(z, "barrel", draw_barrel, l, z, _vary(rng, _pick(rng, CONE_COLORS), 8))
        elif kind == "sign":
            L.add(z, "roadwork_sign", draw_roadwork_sign, l, z, _pick(rng, ROADWORK_SIGNS), _u(rng, 0.6, 1.1),
                  _u(rng, 0.9, 2.2), rng.random() < 0.6)
        elif kind == "barrier":
            w = _u(rng, 1.2, 2.8)
            L.add(z, "barrier", draw_board_barrier, l - w / 2, l + w / 2, z, z, rng.random() < 0.3)
        elif kind == "worker":
            L.add(z, "worker", draw_person, l, z, L.person(worker=True))
            L.add(z - 0.8, "cone", draw_cone, l + 0.6, z - 0.8, _u(rng, 0.5, 0.8), _pick(rng, CONE_COLORS), 2)
        else:
            lm = road.right - 1.6
            if rng.random() < 0.6:
                L.add(z, "machinery", draw_excavator, lm, z, _pick(rng, MACHINE_COLORS), -1 if lm > 0 else 1)
            else:
                L.add(z, "machinery", draw_roller, lm, z, _pick(rng, MACHINE_COLORS))
        L.block(l - 1.0, l + 1.0, z - 6.0, z + 3.0)


def _place_roadwork(L: Layout) -> None:
    r = L.rng.random()
    if r < 0.45 and L.road.lanes >= 2:
        _lane_closure(L)
    elif r < 0.85:
        _work_site(L)
    else:
        _sparse_roadwork(L)


def _place_street(L: Layout) -> None:
    """Street furniture, greenery, ordinary signs and the hard negatives, identical for both labels."""
    rng, road, look = L.rng, L.road, L.look
    trees = {"urban": 0.45, "suburban": 0.9, "highway": 0.35}[road.kind]
    green_base = _pick(rng, ((55, 105, 45), (75, 120, 50), (40, 85, 45))) if not look.autumn else _pick(
        rng, ((200, 110, 30), (210, 160, 40), (170, 70, 30)))
    for side in (-1, 1):
        edge = road.left if side < 0 else road.right
        walk = road.walk_left if side < 0 else road.walk_right
        if rng.random() < trees:
            z = _u(rng, 2.0, 10.0)
            while z < 90.0:
                l = edge + side * (_u(rng, 0.6, 1.0) if walk > 0 else _u(rng, 2.0, 6.0))
                if L.in_view(l, z, 6.0):
                    L.add(z, None, draw_tree, l, z, _u(rng, 1.8, 3.2), _u(rng, 1.3, 3.0), _vary(rng, green_base, 18))
                z += _u(rng, 6.0, 18.0)
        if road.kind == "highway" and rng.random() < 0.6:
            L.decals.append((draw_guardrail, (edge + side * 0.8, L.zs, L.z_near)))
        if rng.random() < 0.7:
            z = _u(rng, 3.0, 25.0)
            while z < 120.0:
                l = edge + side * (0.4 if walk > 0 else 1.2)
                L.add(z, None, draw_lamp, l, z, _u(rng, 6.0, 8.5), side, look.lights)
                z += _u(rng, 22.0, 38.0)
    for _ in range(int(rng.integers(0, 4))):
        side = 1 if rng.random() < 0.75 else -1
        l = (road.right + _u(rng, 0.3, 0.8)) if side > 0 else (road.left - _u(rng, 0.3, 0.8))
        z = _u(rng, L.z_near + 2.0, 60.0)
        if L.in_view(l, z):
            L.add(z, "sign", draw_sign_post, l, z, _pick(rng, ORDINARY_SIGNS), _u(rng, 0.55, 0.9), _u(rng, 1.9, 2.7))
    if road.kind == "urban" and rng.random() < 0.2:
        z = _u(rng, L.z_near + 4.0, 50.0)
        L.add(z, None, draw_traffic_light, road.right + 0.4, z, int(rng.integers(0, 3)))
    if road.kind != "highway":
        if rng.random() < 0.25:
            z = _u(rng, L.z_near + 1.5, 35.0)
            L.add(z, None, draw_hydrant, road.right + _u(rng, 0.3, 0.7), z, _pick(rng, ((200, 30, 30), (230, 190, 30), (235, 110, 25))))
        if rng.random() < 0.08:
            z = _u(rng, L.z_near + 1.0, 20.0)
            L.add(z, None, draw_ball, road.right + _u(rng, 0.3, 2.0), z, _u(rng, 0.11, 0.16), _pick(rng, ((240, 110, 20), (220, 40, 30), (250, 200, 40))))
        if rng.random() < 0.15:
            z = _u(rng, L.z_near + 1.5, 30.0)
            L.add(z, None, draw_bin, road.right + _u(rng, 0.5, 1.2), z, _pick(rng, ((235, 110, 25), (40, 90, 50), (70, 70, 75), (200, 40, 30))))
        if rng.random() < 0.1:
            z, striped = _u(rng, L.z_near + 1.5, 25.0), rng.random() < 0.6
            for i in range(int(rng.integers(3, 7))):
                L.add(z + 1.5 * i, None, draw_bollard, road.right + 0.3, z + 1.5 * i, striped)
    elif rng.random() < 0.3:
        z = _u(rng, 5.0, 20.0)
        while z < 100.0:
            L.add(z, None, draw_bollard, road.right + 1.0, z, True)
            z += 25.0


def _place_traffic(L: Layout) -> None:
    rng, road, look = L.rng, L.road, L.look
    for k in range(road.lanes):
        density = _u(rng, 0.15, 0.7)
        lo, hi = road.lane(k)
        z = L.z_near + (_u(rng, 4.0, 10.0) if k == road.ego else _u(rng, 0.0, 12.0))
        while z < 130.0:
            kind = _pick(rng, ("sedan", "sedan", "sedan", "suv", "suv", "van", "truck", "bus"))
            width, length, height = VEHICLE_DIMENSIONS[kind]
            lateral = 0.5 * (lo + hi) + _u(rng, -0.3, 0.3)
            if rng.random() < density and L.free(lateral - width / 2, lateral + width / 2, z, z + length):
                paint = CAR_PAINT[_weighted(rng, CAR_CUMULATIVE)]
                v = Vehicle(kind, lateral, z, width * _u(rng, 0.95, 1.05), length, height * _u(rng, 0.95, 1.05),
                            _vary(rng, paint, 10), front=k < road.oncoming, lights=look.lights, wet=look.wet)
                L.add(z, "car", draw_vehicle, v)
                L.block(lateral - width / 2, lateral + width / 2, z - 1.0, z + length)
            z += length + _u(rng, 3.0, 25.0)
    if road.kind == "urban" and rng.random() < 0.4:
        z = L.z_near + _u(rng, 0.0, 5.0)
        while z < 80.0:
            lateral = road.right - 1.1
            if rng.random() < 0.6 and L.free(lateral - 0.9, lateral + 0.9, z, z + 4.5):
                paint = CAR_PAINT[_weighted(rng, CAR_CUMULATIVE)]
                L.add(z, "car", draw_vehicle, Vehicle("sedan", lateral, z, 1.8, 4.5, 1.45, _vary(rng, paint, 10), False, False, look.wet))
                L.block(lateral - 0.9, lateral + 0.9, z - 1.0, z + 4.5)
            z += _u(rng, 5.0, 9.0)
    people = {"urban": 6, "suburban": 2, "highway": 0}[road.kind]
    for _ in range(int(rng.integers(0, people + 1))):
        side = 1 if rng.random() < 0.6 else -1
        walk = road.walk_right if side > 0 else road.walk_left
        if walk <= 0:
            continue
        l = road.right + _u(rng, 0.4, walk - 0.2) if side > 0 else road.left - _u(rng, 0.4, walk - 0.2)
        z = _u(rng, L.z_near + 1.0, 45.0)
        if L.in_view(l, z) and L.free(l - 0.3, l + 0.3, z - 0.3, z + 0.3):
            L.add(z, "person", draw_person, l, z, L.person(worker=False))


def _rain(p: Painter, rng: np.random.Generator, look: Look, canvas: int) -> None:
    if not look.rain:
        return
    n = int(look.rain * canvas / (224 * SUPERSAMPLE))
    pts = rng.random((n, 3))
    slant = _u(rng, -0.15, 0.15)
    for x, y, k in pts:
        x, y = float(x) * canvas, float(y) * canvas
        length = canvas * (0.02 + 0.05 * float(k))
        p.blend.line([(x, y), (x + slant * length, y + length)], fill=(210, 214, 222, int(50 + 70 * float(k))), width=1)


def _finish(image: Image.Image, rng: np.random.Generator, look: Look) -> Image.Image:
    """Exposure, white balance, saturation, uneven light and sensor noise, all in PIL's C paths."""
    w, h = image.size
    grid = np.linspace(-1.0, 1.0, 8, dtype=np.float32)
    r2 = 0.5 * (grid[:, None] ** 2 + grid[None, :] ** 2)
    light = (1.0 - _u(rng, 0.0, 0.3) * r2) * (1.0 + 0.05 * rng.standard_normal((8, 8)).astype(np.float32))
    peak = float(light.max())
    light_map = Image.fromarray((light / peak * 255).astype(np.uint8)).resize((w, h), Image.BILINEAR)
    s = look.saturation
    luma = (0.299, 0.587, 0.114)
    matrix = []
    for ch, g in enumerate(look.gain):
        row = [(1 - s) * luma[k] + (s if k == ch else 0.0) for k in range(3)]
        matrix += [v * g * peak for v in row] + [0.0]
    out = image.convert("RGB", tuple(matrix))
    out = ImageChops.multiply(out, Image.merge("RGB", (light_map,) * 3))
    amp = max(int(round(look.noise * 1.7)), 1)        # uniform noise of std look.noise
    noise = Image.fromarray(rng.integers(0, 2 * amp + 1, (h, w), dtype=np.uint8))
    return ImageChops.add(out, Image.merge("RGB", (noise,) * 3), 1.0, -amp)


def _visible_boxes(p: Painter, ids: Image.Image, size: int) -> tuple[np.ndarray, list[str]]:
    id_map = np.asarray(ids)
    boxes, classes = [], []
    for obj_id, cls, (x0, y0, x1, y1), owned, fog in p.labels:
        if fog > MAX_FOG:
            continue
        mine = id_map[y0:y1, x0:x1] == obj_id
        if np.count_nonzero(mine) < MIN_VISIBLE * owned:
            continue
        rows = np.flatnonzero(mine.any(axis=1))
        cols = np.flatnonzero(mine.any(axis=0))
        box = ((x0 + cols[0]) / SUPERSAMPLE, (y0 + rows[0]) / SUPERSAMPLE,
               (x0 + cols[-1] + 1) / SUPERSAMPLE, (y0 + rows[-1] + 1) / SUPERSAMPLE)
        if box[2] - box[0] < MIN_BOX_SIDE or box[3] - box[1] < MIN_BOX_SIDE:
            continue
        boxes.append(box)
        classes.append(cls)
    return np.array(boxes, np.float32).reshape(-1, 4), classes


def _has_visible_roadwork(scene: Scene, size: int) -> bool:
    side = MIN_ROADWORK_SIDE * size
    return any(c in ROADWORK_CLASSES and max(b[2] - b[0], b[3] - b[1]) >= side for b, c in zip(scene.boxes, scene.classes))


def _render_once(rng: np.random.Generator, roadwork: bool, size: int) -> Scene:
    canvas = size * SUPERSAMPLE
    cam = _camera(rng, canvas)
    road = _road(rng)
    look = _look(rng)
    z_near = cam.near(canvas)
    zs = [float(z) for z in np.geomspace(0.6 * z_near, Z_FAR, 18)]
    image = _background(cam, road, look, canvas)
    ids = Image.new("L", (canvas, canvas), 0)
    p = Painter(image, ids, look)
    _ground(p, cam, road, look, canvas, z_near)
    _skyline(p, rng, cam, road, look, canvas)
    _buildings(p, rng, cam, road, look)
    _markings(p, rng, cam, road, zs, z_near)
    L = Layout(rng, cam, road, look, z_near, canvas, zs)
    if roadwork:
        _place_roadwork(L)
    _place_street(L)
    _place_traffic(L)
    for fn, args in L.decals:
        fn(p, cam, *args)
    for z, _, cls, fn, args in sorted(L.objects, key=lambda o: (-o[0], o[1])):
        p.begin(z, cls)
        fn(p, cam, *args)
        p.end()
    _rain(p, rng, look, canvas)
    out = _finish(image.reduce(SUPERSAMPLE), rng, look)
    boxes, classes = _visible_boxes(p, ids, size)
    return Scene(out, int(roadwork), boxes, classes)


def render_scene(rng: np.random.Generator, roadwork: bool, size: int = 224) -> Scene:
    """One street scene drawn with rng only (same generator state, same pixels).

    A roadwork scene is redrawn with a fresh layout until at least one roadwork object is visible and
    at least MIN_ROADWORK_SIDE of the image tall or wide, so its label is never a lie."""
    if size < 32:
        raise ValueError(f"size must be at least 32 pixels, got {size}")
    for _ in range(MAX_LAYOUTS):
        scene = _render_once(rng, roadwork, size)
        if not roadwork or _has_visible_roadwork(scene, size):
            return scene
    raise RuntimeError(f"no visible roadwork object in {MAX_LAYOUTS} layouts at size {size}")
