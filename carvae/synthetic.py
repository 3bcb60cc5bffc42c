"""Procedural side-view cars facing left: the embedded default dataset (`--data synthetic`).

Every image is a pure function of (seed, index): `car_spec` draws all the parameters from an RNG seeded
with exactly that pair, and `render_car` draws only from the spec. So image i is the same whether it is
made alone, in a batch, or in any order, and a dataset of any size needs no download and no storage.

Geometry is written in "car units": x runs from the front bumper (0, on the LEFT of the image) to the rear
(1), y is the height above the ground, both measured in car lengths. `_Frame` maps them to pixels.
Drawing happens at `SUPERSAMPLE`× the target size and is box-filtered down, which anti-aliases every edge.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

BODY_TYPES: tuple[str, ...] = ("sedan", "hatchback", "suv", "pickup", "van")
SUPERSAMPLE = 4
MIN_SIZE, MAX_SIZE = 16, 1024

Color = tuple[int, int, int]
Pt = tuple[float, float]

# (name, RGB, weight): mostly the colours real cars come in, plus a few saturated ones for variety.
_PALETTE: tuple[tuple[str, Color, float], ...] = (
    ("white", (236, 236, 232), 0.15),
    ("black", (28, 28, 31), 0.13),
    ("silver", (186, 189, 193), 0.12),
    ("grey", (108, 112, 118), 0.11),
    ("dark blue", (32, 46, 96), 0.06),
    ("blue", (42, 86, 168), 0.06),
    ("red", (176, 26, 30), 0.08),
    ("maroon", (98, 22, 32), 0.03),
    ("dark green", (32, 72, 48), 0.03),
    ("beige", (201, 186, 150), 0.03),
    ("brown", (102, 72, 46), 0.02),
    ("yellow", (240, 198, 24), 0.03),
    ("orange", (238, 112, 22), 0.03),
    ("lime", (140, 198, 44), 0.015),
    ("bright blue", (22, 122, 228), 0.03),
    ("purple", (108, 42, 148), 0.015),
    ("teal", (22, 148, 148), 0.02),
)
# Relative car length in the frame: a hatchback is shorter than a sedan of the same image.
_LENGTH_FACTOR = {"sedan": 1.0, "hatchback": 0.88, "suv": 0.96, "pickup": 1.0, "van": 0.95}


class _Rng:
    """Small sampling helpers over one numpy Generator; values are plain Python numbers for the spec."""

    def __init__(self, seed: int, index: int) -> None:
        self.g = np.random.default_rng([seed, index])

    def u(self, lo: float, hi: float) -> float:
        return float(self.g.uniform(lo, hi))

    def chance(self, p: float) -> bool:
        return bool(self.g.random() < p)

    def pick(self, options: Sequence[Any], weights: Sequence[float] | None = None) -> Any:
        p = None if weights is None else np.asarray(weights, dtype=np.float64) / float(np.sum(weights))
        return options[int(self.g.choice(len(options), p=p))]

    def jitter(self, c: Sequence[float], amount: float) -> list[int]:
        return [
            min(255, max(0, round(v + float(d))))
            for v, d in zip(c, self.g.uniform(-amount, amount, len(c)), strict=True)
        ]


# ---------------------------------------------------------------------------------------------- profiles
# Each profile returns the car's shape in car units. `outline` is a list of [x, y, corner_radius];
# `greenhouse` is the glass area before insetting by the per-edge `pillars` widths (A-pillar, roof,
# rear pillar, beltline); `posts` are the B/C/D pillars as fractions along the glass.


def _front(r: _Rng, bumper: float, hood: float) -> list[list[float]]:
    """Outline of the front end shared by all types: bumper, nose and the start of the hood."""
    return [
        [0.035, bumper - 0.012, 0.01],
        [0.0, bumper + 0.03, 0.025],
        [0.004, hood - 0.03, 0.03],
        [r.u(0.06, 0.1), hood, 0.06],
    ]


def _bottom(bumper: float, rear_x: float = 0.965) -> list[list[float]]:
    """The rear bumper's lower corner; the polygon closes back to the front along the sill."""
    return [[rear_x, bumper - 0.012, 0.012]]


def _sedan(r: _Rng) -> dict[str, Any]:
    bumper, hood = r.u(0.055, 0.07), r.u(0.18, 0.205)
    belt = hood + r.u(0.012, 0.03)
    roof = r.u(0.28, 0.31)
    ws = r.u(0.29, 0.33)
    roof_f, roof_r = ws + r.u(0.12, 0.16), r.u(0.62, 0.67)
    deck_x, deck = roof_r + r.u(0.12, 0.16), belt + r.u(-0.004, 0.012)
    outline = [
        *_front(r, bumper, hood),
        [ws, belt, 0.02],
        [roof_f, roof, 0.055],
        [roof_r, roof - 0.004, 0.065],
        [deck_x, deck + 0.004, 0.03],
        [0.985, deck - 0.002, 0.02],
        [1.0, deck - 0.045, 0.02],
        [0.995, bumper + 0.012, 0.02],
        *_bottom(bumper),
    ]
    return {
        "outline": outline,
        "greenhouse": [[ws, belt], [roof_f, roof], [roof_r, roof - 0.004], [deck_x, deck]],
        "pillars": [0.018, 0.02, r.u(0.03, 0.045), 0.008],
        "posts": [[r.u(0.5, 0.56), 0.022]],
        "wheels": [r.u(0.17, 0.2), r.u(0.78, 0.81)],
        "wheel_r": r.u(0.068, 0.078),
        "bumper": bumper,
        "hood": hood,
        "belt": belt,
        "roof": roof,
        "tail_y": deck - 0.01,
        "tail_kind": "horizontal",
        "doors": [ws + 0.01, None, roof_r + 0.02],
    }


def _hatchback(r: _Rng) -> dict[str, Any]:
    bumper, hood = r.u(0.06, 0.075), r.u(0.2, 0.23)
    belt = hood + r.u(0.02, 0.035)
    roof = r.u(0.33, 0.37)
    ws = r.u(0.26, 0.31)
    roof_f, roof_r = ws + r.u(0.14, 0.18), r.u(0.8, 0.86)
    rear_top = belt + r.u(0.02, 0.05)
    outline = [
        *_front(r, bumper, hood),
        [ws, belt, 0.02],
        [roof_f, roof, 0.07],
        [roof_r, roof - 0.008, 0.05],
        [0.99, rear_top, 0.03],
        [1.0, bumper + 0.02, 0.03],
        *_bottom(bumper, 0.97),
    ]
    return {
        "outline": outline,
        "greenhouse": [[ws, belt], [roof_f, roof], [roof_r, roof - 0.008], [0.985, belt + 0.01]],
        "pillars": [0.018, 0.02, r.u(0.05, 0.08), 0.008],
        "posts": [[r.u(0.45, 0.52), 0.022]],
        "wheels": [r.u(0.15, 0.18), r.u(0.8, 0.84)],
        "wheel_r": r.u(0.076, 0.086),
        "bumper": bumper,
        "hood": hood,
        "belt": belt,
        "roof": roof,
        "tail_y": belt + 0.005,
        "tail_kind": "vertical",
        "doors": [ws + 0.01, None, roof_r - 0.1],
    }


def _suv(r: _Rng) -> dict[str, Any]:
    bumper, hood = r.u(0.08, 0.1), r.u(0.22, 0.255)
    belt = hood + r.u(0.025, 0.045)
    roof = r.u(0.38, 0.42)
    ws = r.u(0.25, 0.3)
    roof_f, roof_r = ws + r.u(0.11, 0.14), r.u(0.9, 0.94)
    outline = [
        *_front(r, bumper, hood),
        [ws, belt, 0.02],
        [roof_f, roof, 0.06],
        [roof_r, roof, 0.04],
        [0.995, roof - 0.04, 0.03],
        [1.0, bumper + 0.02, 0.03],
        *_bottom(bumper, 0.97),
    ]
    return {
        "outline": outline,
        "greenhouse": [[ws, belt], [roof_f, roof], [roof_r, roof], [0.99, belt + 0.005]],
        "pillars": [0.018, 0.022, r.u(0.035, 0.05), 0.008],
        "posts": [[r.u(0.4, 0.45), 0.022], [r.u(0.72, 0.77), 0.03]],
        "wheels": [r.u(0.16, 0.19), r.u(0.79, 0.82)],
        "wheel_r": r.u(0.08, 0.092),
        "bumper": bumper,
        "hood": hood,
        "belt": belt,
        "roof": roof,
        "tail_y": belt + 0.01,
        "tail_kind": "vertical",
        "doors": [ws + 0.01, None, r.u(0.74, 0.78)],
        "roof_rails": r.chance(0.6),
        "cladding": r.chance(0.5),
    }


def _pickup(r: _Rng) -> dict[str, Any]:
    bumper, hood = r.u(0.08, 0.1), r.u(0.225, 0.26)
    belt = hood + r.u(0.02, 0.04)
    roof = r.u(0.37, 0.41)
    ws = r.u(0.29, 0.33)
    roof_f = ws + r.u(0.07, 0.09)  # pickups have a more upright windshield than cars
    crew = r.chance(0.5)
    cab = roof_f + (r.u(0.22, 0.26) if crew else r.u(0.12, 0.15))
    bed = belt + r.u(-0.01, 0.01)
    outline = [
        *_front(r, bumper, hood),
        [ws, belt, 0.02],
        [roof_f, roof, 0.05],
        [cab - 0.01, roof, 0.03],
        [cab, roof - 0.03, 0.01],
        [cab, bed, 0.004],
        [0.995, bed, 0.008],
        [1.0, bumper + 0.02, 0.015],
        *_bottom(bumper, 0.975),
    ]
    return {
        "outline": outline,
        "greenhouse": [[ws, belt], [roof_f, roof], [cab - 0.01, roof], [cab, belt]],
        "pillars": [0.018, 0.02, 0.03, 0.008],
        "posts": [[r.u(0.5, 0.56), 0.025]] if crew else [],
        "wheels": [r.u(0.15, 0.18), r.u(0.78, 0.82)],
        "wheel_r": r.u(0.08, 0.09),
        "bumper": bumper,
        "hood": hood,
        "belt": belt,
        "roof": roof,
        "tail_y": bed - 0.005,
        "tail_kind": "vertical",
        "doors": [ws + 0.01, None, cab - 0.01],
        "bed": [cab + 0.012, bed],
    }


def _van(r: _Rng) -> dict[str, Any]:
    bumper, hood = r.u(0.06, 0.08), r.u(0.22, 0.26)
    belt = hood + r.u(0.03, 0.05)
    roof = r.u(0.44, 0.5)
    ws = r.u(0.13, 0.18)
    roof_f = ws + r.u(0.13, 0.17)
    panel = r.chance(0.4)  # a cargo van: glass only over the cab
    glass_end = roof_f + r.u(0.1, 0.14) if panel else 0.975
    outline = [
        *_front(r, bumper, hood),
        [ws, belt, 0.03],
        [roof_f, roof, 0.08],
        [0.975, roof - 0.004, 0.03],
        [1.0, roof - 0.04, 0.02],
        [1.0, bumper + 0.02, 0.02],
        *_bottom(bumper, 0.97),
    ]
    return {
        "outline": outline,
        "greenhouse": [[ws, belt], [roof_f, roof], [glass_end, roof], [glass_end + 0.005, belt]],
        "pillars": [0.018, 0.035, 0.03, 0.008],
        "posts": [] if panel else [[r.u(0.32, 0.38), 0.022], [r.u(0.62, 0.68), 0.025]],
        "wheels": [r.u(0.13, 0.16), r.u(0.8, 0.84)],
        "wheel_r": r.u(0.072, 0.082),
        "bumper": bumper,
        "hood": hood,
        "belt": belt,
        "roof": roof,
        "tail_y": belt + 0.02,
        "tail_kind": "vertical",
        "doors": [ws + 0.015, r.u(0.38, 0.45), r.u(0.68, 0.74)],
    }


_PROFILES: dict[str, Callable[[_Rng], dict[str, Any]]] = {
    "sedan": _sedan,
    "hatchback": _hatchback,
    "suv": _suv,
    "pickup": _pickup,
    "van": _van,
}


# -------------------------------------------------------------------------------------------------- spec


def _check_ids(seed: int, index: int) -> None:
    for name, v in (("seed", seed), ("index", index)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {v!r}")


def _check_size(size: int) -> None:
    if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or not MIN_SIZE <= size <= MAX_SIZE:
        raise ValueError(f"size must be an integer in [{MIN_SIZE}, {MAX_SIZE}], got {size!r}")


def _grey(v: float) -> list[int]:
    return [round(v), round(v), round(min(255.0, v + 4))]


def _lights(geo: dict[str, Any]) -> tuple[list[list[float]], list[list[float]]]:
    """Headlight at the nose (left), tail light at the rear (right), in car units."""
    h = geo["hood"]
    head = [[-0.01, h - 0.062], [-0.01, h - 0.014], [0.08, h - 0.01], [0.066, h - 0.046]]
    t = geo["tail_y"]
    if geo["tail_kind"] == "horizontal":
        tail = [[0.93, t - 0.004], [1.01, t - 0.004], [1.01, t - 0.05], [0.955, t - 0.046]]
    else:
        tail = [[0.962, t + 0.02], [1.01, t + 0.02], [1.01, t - 0.085], [0.968, t - 0.085]]
    return head, tail


def _background(r: _Rng, ground: float) -> dict[str, Any]:
    sky = r.pick(("clear", "overcast", "dusk"), (0.55, 0.3, 0.15))
    if sky == "clear":
        top = r.jitter((r.u(55, 110), r.u(118, 160), r.u(200, 240)), 6)
        bottom = r.jitter((r.u(180, 215), r.u(208, 232), r.u(236, 252)), 4)
    elif sky == "overcast":
        g = r.u(150, 195)
        top = r.jitter((g - 6, g, g + 10), 5)
        bottom = r.jitter((g + 30, g + 32, g + 36), 4)
    else:
        top = r.jitter((r.u(60, 90), r.u(80, 110), r.u(140, 180)), 6)
        bottom = r.jitter((r.u(225, 250), r.u(160, 195), r.u(120, 160)), 6)
    horizon = ground - r.u(0.14, 0.26)
    scenery = r.pick(("trees", "hills", "city", "none"), (0.35, 0.3, 0.15, 0.2))
    n = {"trees": 40, "hills": 7, "city": 14, "none": 0}[scenery]
    heights = [r.u(0.015, 0.07) if scenery != "trees" else r.u(0.02, 0.05) for _ in range(n)]
    floor = r.pick(("road", "lot"), (0.75, 0.25))
    if floor == "road":
        a = r.u(62, 112)
        surface = r.jitter((a, a + 1, a + 4), 3)
    else:
        a = r.u(120, 165)
        surface = r.jitter((a + 6, a + 3, a - 4), 4)
    verge_kind = r.pick(("grass", "pavement", "dry"), (0.5, 0.3, 0.2))
    verge = {
        "grass": r.jitter((70, 118, 52), 14),
        "pavement": r.jitter((168, 166, 160), 12),
        "dry": r.jitter((170, 150, 100), 14),
    }[verge_kind]
    return {
        "sky": sky,
        "sky_top": top,
        "sky_bottom": bottom,
        "horizon": horizon,
        "scenery": scenery,
        "scenery_heights": heights,
        "scenery_color": r.jitter((70, 90, 85) if scenery != "city" else (120, 125, 135), 15),
        "floor": floor,
        "surface": surface,
        "verge": verge,
        "verge_kind": verge_kind,
        "road_top": ground - r.u(0.05, 0.11),
        "lane": floor == "road" and r.chance(0.7),
        "lane_color": [235, 235, 228] if r.chance(0.75) else [232, 190, 40],
        "lane_y": r.u(0.35, 0.7),
        "lane_phase": r.u(0.0, 1.0),
        "front_line": r.chance(0.4),
    }


def car_spec(seed: int, index: int) -> dict[str, Any]:
    """All the parameters image `index` of dataset `seed` is drawn with (plain JSON-able values).

    Positions named `*_x`/`*_y` at the top level are fractions of the image width/height, so tests can
    check the picture against them at any size.
    """
    _check_ids(seed, index)
    r = _Rng(int(seed), int(index))
    body = r.pick(BODY_TYPES)
    geo = _PROFILES[body](r)
    name, rgb, _ = r.pick(_PALETTE, [w for _, _, w in _PALETTE])
    shade = r.u(0.92, 1.05)
    color = r.jitter([c * shade for c in rgb], 8)

    length = min(0.95, r.u(0.78, 0.94) * _LENGTH_FACTOR[body])
    center = 0.5 + r.u(-0.04, 0.04)
    x0 = float(np.clip(center - length / 2, 0.02, 0.98 - length))
    ground = r.u(0.72, 0.85)
    stretch = r.u(0.94, 1.06)  # small independent height jitter on top of the uniform scale
    head, tail = _lights(geo)

    def img_x(x: float) -> float:
        return x0 + x * length

    def img_y(y: float) -> float:
        return ground - y * length * stretch

    fx, rx = geo["wheels"]
    wr = geo["wheel_r"]
    spec: dict[str, Any] = {
        "seed": int(seed),
        "index": int(index),
        "body_type": body,
        "color_name": name,
        "color": color,
        "geometry": geo,
        "headlight": head,
        "taillight": tail,
        "head_color": r.jitter((242, 240, 218), 10),
        "tail_color": r.jitter((200, 24, 30), 18),
        "glass_color": r.jitter((38, 48, 60), 8),
        "trim_color": r.jitter((30, 31, 34), 5),
        "black_posts": r.chance(0.4),
        "rim_style": r.pick(("alloy", "steel", "hubcap"), (0.6, 0.15, 0.25)),
        "rim_color": _grey(r.u(165, 215) if r.chance(0.75) else r.u(50, 85)),
        "rim_ratio": r.u(0.56, 0.68),
        "spokes": int(r.pick((5, 6, 7, 10))),
        "wheel_angle": r.u(0.0, 2 * math.pi),
        "length": length,
        "x0": x0,
        "ground_y": ground,
        "stretch": stretch,
        "shadow_opacity": r.u(0.45, 0.7),
        "background": _background(r, ground),
        # Where things land in the image, as fractions: the left-facing contract in one place.
        # (centres of the visible part of each lamp, which the body outline clips at x ≈ 0 and ≈ 0.99)
        "headlight_x": img_x(0.04),
        "headlight_y": img_y(geo["hood"] - 0.033),
        "taillight_x": img_x((min(p[0] for p in tail) + 0.99) / 2),
        "taillight_y": img_y(float(np.mean([p[1] for p in tail]))),
        "front_wheel_x": img_x(fx),
        "rear_wheel_x": img_x(rx),
        "wheel_y": img_y(wr),
        "wheel_radius": wr * length,
    }
    return spec


# ------------------------------------------------------------------------------------------------ drawing


def _rounded(points: Sequence[Sequence[float]], steps: int = 5) -> list[Pt]:
    """Closed polygon with each corner replaced by a quadratic Bézier of the given radius."""
    n = len(points)
    out: list[Pt] = []
    for i in range(n):
        px, py, rad = points[i][0], points[i][1], points[i][2] if len(points[i]) > 2 else 0.0
        if rad <= 0:
            out.append((px, py))
            continue
        ax, ay = points[i - 1][0], points[i - 1][1]
        bx, by = points[(i + 1) % n][0], points[(i + 1) % n][1]
        la, lb = math.hypot(ax - px, ay - py) or 1e-9, math.hypot(bx - px, by - py) or 1e-9
        da, db = min(rad, la / 2), min(rad, lb / 2)
        p1 = (px + (ax - px) * da / la, py + (ay - py) * da / la)
        p2 = (px + (bx - px) * db / lb, py + (by - py) * db / lb)
        for k in range(steps + 1):
            t = k / steps
            a, b, c = (1 - t) ** 2, 2 * (1 - t) * t, t * t
            out.append((a * p1[0] + b * px + c * p2[0], a * p1[1] + b * py + c * p2[1]))
    return out


def _inset(poly: Sequence[Sequence[float]], widths: Sequence[float]) -> list[list[float]]:
    """Move edge i (poly[i] -> poly[i+1]) inwards by widths[i]; corners are the new edges' crossings."""
    p = np.asarray(poly, dtype=np.float64)
    n = len(p)
    area = 0.5 * float(np.sum(p[:, 0] * np.roll(p[:, 1], -1) - np.roll(p[:, 0], -1) * p[:, 1]))
    sign = 1.0 if area > 0 else -1.0
    lines = []
    for i in range(n):
        d = p[(i + 1) % n] - p[i]
        d /= np.linalg.norm(d) or 1.0
        normal = sign * np.array([-d[1], d[0]])  # left of the edge is inside for a CCW polygon
        lines.append((p[i] + normal * widths[i], d))
    out = []
    for i in range(n):
        (q1, d1), (q2, d2) = lines[i - 1], lines[i]
        det = d1[0] * (-d2[1]) - d1[1] * (-d2[0])
        if abs(det) < 1e-12:
            out.append(list(q2))
            continue
        t = ((q2[0] - q1[0]) * (-d2[1]) - (q2[1] - q1[1]) * (-d2[0])) / det
        out.append([float(q1[0] + t * d1[0]), float(q1[1] + t * d1[1])])
    return out


def _vertical_gradient(size: int, stops_y: Sequence[float], colors: Sequence[Sequence[float]]) -> Image.Image:
    """An RGB image whose rows interpolate `colors` at canvas rows `stops_y` (increasing)."""
    rows = np.arange(size, dtype=np.float64) + 0.5
    c = np.asarray(colors, dtype=np.float64)
    prof = np.stack([np.interp(rows, stops_y, c[:, k]) for k in range(3)], axis=1)
    prof = np.clip(np.rint(prof), 0, 255).astype(np.uint8)
    # one column, widened in C: several times faster than materialising the full array in numpy
    return Image.fromarray(np.ascontiguousarray(prof[:, None, :]), "RGB").resize(
        (size, size), Image.Resampling.NEAREST
    )


def _tone(c: Sequence[int], t: float) -> Color:
    """t > 0 mixes towards white (a highlight), t < 0 darkens (shade)."""
    return _mix(c, (255, 255, 255), t) if t >= 0 else _mix(c, (0, 0, 0), -t)


def _mix(a: Sequence[int], b: Sequence[int], t: float) -> Color:
    return (round(a[0] + (b[0] - a[0]) * t), round(a[1] + (b[1] - a[1]) * t), round(a[2] + (b[2] - a[2]) * t))


class _Frame:
    """Maps car units to canvas pixels for one spec at one canvas size."""

    def __init__(self, spec: dict[str, Any], canvas: int) -> None:
        self.c = canvas
        self.x0 = spec["x0"] * canvas
        self.ground = spec["ground_y"] * canvas
        self.sx = spec["length"] * canvas
        self.sy = self.sx * spec["stretch"]

    def pt(self, x: float, y: float) -> Pt:
        return (self.x0 + x * self.sx, self.ground - y * self.sy)

    def poly(self, pts: Sequence[Sequence[float]]) -> list[Pt]:
        return [self.pt(p[0], p[1]) for p in pts]

    def row(self, y: float) -> float:
        return self.ground - y * self.sy

    def px(self, w: float, minimum: int = 1) -> int:
        """A length in car units as a whole number of canvas pixels (lines must stay visible)."""
        return max(minimum, round(w * self.sx))


def _draw_background(spec: dict[str, Any], c: int) -> Image.Image:
    bg = spec["background"]
    hz, road_top = bg["horizon"] * c, bg["road_top"] * c
    surface = bg["surface"]
    stops = [0.0, hz, hz + 0.01, road_top, road_top + 1.0, float(c)]
    colors = [
        bg["sky_top"],
        bg["sky_bottom"],
        _tone(bg["verge"], 0.05),
        _tone(bg["verge"], -0.12),
        _tone(surface, -0.08),
        _tone(surface, 0.06),
    ]
    img = _vertical_gradient(c, stops, colors)
    draw = ImageDraw.Draw(img)
    heights = bg["scenery_heights"]
    if heights:
        col = _mix(bg["scenery_color"], bg["sky_bottom"], 0.35)  # distance washes colours towards the sky
        xs = np.linspace(-0.02 * c, 1.02 * c, len(heights))
        if bg["scenery"] == "city":
            w = (xs[1] - xs[0]) * 0.9
            for x, h in zip(xs, heights, strict=True):
                draw.rectangle([x - w / 2, hz - h * c * 1.6, x + w / 2, hz + 1], fill=col)
        else:
            fine = np.linspace(xs[0], xs[-1], 96 if bg["scenery"] == "trees" else 48)
            prof = np.interp(fine, xs, np.asarray(heights) * c)
            pts = [(float(x), float(hz - h)) for x, h in zip(fine, prof, strict=True)]
            draw.polygon([*pts, (float(fine[-1]), hz + 1), (float(fine[0]), hz + 1)], fill=col)
    if bg["floor"] == "road":
        curb = max(1, round(0.012 * c))
        draw.rectangle([0, road_top - curb, c, road_top], fill=_tone(bg["verge"], 0.25))
        if bg["lane"]:
            ground = spec["ground_y"] * c
            y = road_top + (ground - road_top) * bg["lane_y"]
            th = max(1, round(0.008 * c))
            dash, gap = 0.12 * c, 0.09 * c
            x = -bg["lane_phase"] * (dash + gap)
            while x < c:
                draw.rectangle([x, y - th / 2, x + dash, y + th / 2], fill=tuple(bg["lane_color"]))
                x += dash + gap
        if bg["front_line"]:
            y = spec["ground_y"] * c + (c - spec["ground_y"] * c) * 0.6
            th = max(1, round(0.01 * c))
            draw.rectangle([0, y - th / 2, c, y + th / 2], fill=(228, 228, 222))
    return img


def _draw_shadow(img: Image.Image, spec: dict[str, Any], size: int) -> None:
    """A soft ground shadow: drawn and blurred at the target size (cheap), then scaled up to the canvas."""
    f = _Frame(spec, size)
    mask = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(mask)
    o = spec["shadow_opacity"]
    left, _ = f.pt(-0.02, 0)
    right, _ = f.pt(1.03, 0)
    h = 0.035 * f.sx
    d.ellipse([left, f.ground - h, right, f.ground + h * 0.9], fill=round(255 * o))
    wr = spec["geometry"]["wheel_r"]
    for wx in spec["geometry"]["wheels"]:
        cx, _ = f.pt(wx, 0)
        d.ellipse(
            [cx - wr * f.sx * 1.1, f.ground - h * 0.6, cx + wr * f.sx * 1.1, f.ground + h * 0.5],
            fill=round(255 * min(0.9, o + 0.2)),
        )
    mask = mask.filter(ImageFilter.GaussianBlur(max(0.6, size / 90)))
    img.paste((0, 0, 0), (0, 0), mask.resize(img.size, Image.Resampling.BILINEAR))


def _body_texture(spec: dict[str, Any], f: _Frame) -> Image.Image:
    """Paint + everything that lies on the body panels; pasted through the body mask, so it is clipped."""
    g = spec["geometry"]
    col = spec["color"]
    belt, bottom = g["belt"], g["bumper"] - 0.012
    stops = [
        f.row(g["roof"] + 0.01),
        f.row(belt + 0.004),
        f.row(belt - 0.006),
        f.row(belt - 0.03),
        f.row(bottom),
    ]
    tones = [0.16, 0.06, 0.22, -0.04, -0.38]
    tex = _vertical_gradient(f.c, stops, [_tone(col, t) for t in tones])
    d = ImageDraw.Draw(tex)
    seam = _tone(col, -0.45) if sum(col) > 120 else _tone(col, 0.18)
    lw = f.px(0.004)

    # door seams, from the beltline down to the sill, and handles
    front_door, mid, rear_door = g["doors"]
    posts = g["posts"]
    glass = _inset(g["greenhouse"], g["pillars"])
    g_front, g_rear = glass[0][0], glass[3][0]
    b_post = g_front + (g_rear - g_front) * posts[0][0] if posts else None
    xs = [front_door, mid if mid is not None else b_post, rear_door]
    for x in xs:
        if x is None:
            continue
        d.line([f.pt(x, belt + 0.005), f.pt(x - 0.006, bottom + 0.025)], fill=seam, width=lw)
    for a, b in ((xs[0], xs[1]), (xs[1], xs[2])):
        if a is not None and b is not None and b - a > 0.08:
            hx = b - 0.07
            x1, y1 = f.pt(hx, belt - 0.02)
            x2, y2 = f.pt(hx + 0.035, belt - 0.031)
            d.rectangle([x1, y1, x2, y2], fill=seam)
    if "bed" in g:
        bx, by = g["bed"]
        d.line([f.pt(bx, by + 0.01), f.pt(bx, bottom + 0.02)], fill=seam, width=lw)

    # bumpers and sill in trim colour, lights
    trim = tuple(spec["trim_color"])
    fb = g["bumper"]
    d.polygon(
        f.poly([[-0.02, fb - 0.03], [0.1, fb - 0.03], [0.09, fb + 0.03], [-0.02, fb + 0.035]]), fill=trim
    )
    d.polygon(f.poly([[0.9, fb - 0.03], [1.02, fb - 0.03], [1.02, fb + 0.03], [0.91, fb + 0.028]]), fill=trim)
    if g.get("cladding"):
        d.rectangle([*f.pt(0.0, fb + 0.035), *f.pt(1.0, fb - 0.03)], fill=_mix(trim, col, 0.15))
    else:
        d.rectangle([*f.pt(0.0, fb + 0.004), *f.pt(1.0, fb - 0.03)], fill=_tone(col, -0.55))
    d.polygon(f.poly(spec["headlight"]), fill=tuple(spec["head_color"]), outline=trim)
    d.polygon(
        f.poly(spec["taillight"]), fill=tuple(spec["tail_color"]), outline=_tone(spec["tail_color"], -0.5)
    )
    return tex


def _glass_texture(spec: dict[str, Any], f: _Frame, glass: list[list[float]]) -> Image.Image:
    g = spec["geometry"]
    sky = spec["background"]["sky_bottom"]
    base = spec["glass_color"]
    tex = _vertical_gradient(
        f.c,
        [f.row(g["roof"]), f.row(g["belt"])],
        [_mix(base, sky, 0.45), _tone(base, -0.25)],
    )
    d = ImageDraw.Draw(tex)
    # one slanted sky reflection across the glass
    ys = [p[1] for p in glass]
    x_mid = 0.45 * glass[0][0] + 0.55 * glass[2][0]
    top, low = max(ys) + 0.01, min(ys) - 0.01
    w, lean = 0.05, 0.06
    refl = [[x_mid + lean, top], [x_mid + lean + w, top], [x_mid + w, low], [x_mid, low]]
    d.polygon(f.poly(refl), fill=_mix(base, sky, 0.3))
    post_col = tuple(spec["trim_color"]) if spec["black_posts"] else _tone(spec["color"], 0.05)
    g_front, g_rear = glass[0][0], glass[3][0]
    for frac, width in g["posts"]:
        x = g_front + (g_rear - g_front) * frac
        d.polygon(
            f.poly([[x, top], [x + width, top], [x + width - 0.006, low], [x - 0.006, low]]), fill=post_col
        )
    return tex


def _draw_wheel(d: ImageDraw.ImageDraw, spec: dict[str, Any], f: _Frame, wx: float) -> None:
    wr = spec["geometry"]["wheel_r"]
    cx, cy = f.pt(wx, wr)
    r = wr * f.sx
    arch = 1.13 * r
    d.pieslice([cx - arch, cy - arch, cx + arch, cy + arch], 165, 375, fill=(18, 18, 20))
    d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(32, 32, 35))
    d.ellipse([cx - r * 0.93, cy - r * 0.93, cx + r * 0.93, cy + r * 0.93], fill=(40, 40, 43))  # tread wall
    rr = r * spec["rim_ratio"]
    rim = tuple(spec["rim_color"])
    style = spec["rim_style"]
    if style == "alloy":
        d.ellipse([cx - rr, cy - rr, cx + rr, cy + rr], fill=(48, 48, 52))
        n = spec["spokes"]
        sw = max(1, round(rr * (0.5 if n <= 6 else 0.25)))
        for k in range(n):
            a = spec["wheel_angle"] + 2 * math.pi * k / n
            d.line(
                [(cx, cy), (cx + math.cos(a) * rr * 0.95, cy + math.sin(a) * rr * 0.95)], fill=rim, width=sw
            )
        d.ellipse([cx - rr, cy - rr, cx + rr, cy + rr], outline=rim, width=max(1, round(rr * 0.14)))
    else:
        d.ellipse([cx - rr, cy - rr, cx + rr, cy + rr], fill=rim)
        ring = rr * (0.72 if style == "steel" else 0.8)
        d.ellipse(
            [cx - ring, cy - ring, cx + ring, cy + ring],
            outline=_tone(rim, -0.3),
            width=max(1, round(rr * 0.08)),
        )
    hub = rr * 0.26
    d.ellipse([cx - hub, cy - hub, cx + hub, cy + hub], fill=_tone(rim, -0.15))
    cap = rr * 0.1
    d.ellipse([cx - cap, cy - cap, cx + cap, cy + cap], fill=(40, 40, 44))


def _draw_car(img: Image.Image, spec: dict[str, Any]) -> None:
    f = _Frame(spec, img.size[0])
    g = spec["geometry"]
    body = Image.new("L", img.size, 0)
    ImageDraw.Draw(body).polygon(f.poly(_rounded(g["outline"])), fill=255)
    img.paste(_body_texture(spec, f), (0, 0), body)

    glass = _inset(g["greenhouse"], g["pillars"])
    glass_mask = Image.new("L", img.size, 0)
    ImageDraw.Draw(glass_mask).polygon(f.poly(_rounded([[*p, 0.012] for p in glass])), fill=255)
    img.paste(_glass_texture(spec, f, glass), (0, 0), glass_mask)

    d = ImageDraw.Draw(img)
    trim = tuple(spec["trim_color"])
    if g.get("roof_rails"):
        x1, y1 = f.pt(g["greenhouse"][1][0] + 0.05, g["roof"] + 0.014)
        x2, y2 = f.pt(g["greenhouse"][2][0] - 0.04, g["roof"] - 0.002)
        d.rectangle([x1, y1, x2, y2], fill=trim)
    # side mirror just behind the A-pillar base
    mx, my = g["greenhouse"][0][0] + 0.02, g["belt"]
    mirror_col = trim if spec["black_posts"] else _tone(spec["color"], -0.05)
    d.polygon(
        f.poly([[mx, my], [mx + 0.035, my], [mx + 0.03, my + 0.03], [mx + 0.004, my + 0.028]]),
        fill=mirror_col,
    )
    for wx in g["wheels"]:
        _draw_wheel(d, spec, f, wx)


def render_car(seed: int, index: int, size: int = 64) -> Image.Image:
    """Image `index` of the synthetic dataset `seed`: an RGB size×size side view of a car facing left."""
    _check_size(size)
    spec = car_spec(seed, index)
    c = int(size) * SUPERSAMPLE
    img = _draw_background(spec, c)
    _draw_shadow(img, spec, int(size))
    _draw_car(img, spec)
    # Box-filtering the supersampled canvas = exact area coverage per output pixel: clean anti-aliasing.
    return img.reduce(SUPERSAMPLE)


def generate(n: int, size: int = 64, seed: int = 0, start: int = 0) -> np.ndarray:
    """Images start .. start+n-1 of dataset `seed` as an (n, size, size, 3) uint8 array."""
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    _check_size(size)
    _check_ids(seed, start)
    out = np.empty((int(n), int(size), int(size), 3), dtype=np.uint8)
    for i in range(int(n)):
        out[i] = np.asarray(render_car(seed, start + i, size))
    return out
