"""Procedural street scenes in the 19-class Cityscapes label space, in two visual styles.

`sample_scene` draws a street layout under a pinhole camera (road, sidewalks, façades with a
skyline, walls / fences, trees, poles with signs and traffic lights, parked and driving cars, rare
trucks, buses, riders on bicycles / motorcycles, pedestrians), painted far to near. It returns the
train-id label and a per-pixel albedo (each instance gets its own colour: car paint, façade tone).
Two renderers turn the albedo into images:
- `render_source`: the flat "rendered" style of a game engine, albedo only (the source domain);
- `render_target`: a "photographic" style (the target domain): class textures, façade windows, lane
  markings, clouds, dim warm lighting with vignetting and shadows, colour cast, gamma, lens blur and
  sensor noise.
Both domains draw layouts from the same distribution, so the label spaces and class statistics
match and only appearance shifts. Class 16 (train) never occurs, like SYNTHIA's missing classes;
trucks, buses, motorcycles and riders are rare so rare-class sampling has something to do.
Everything is a deterministic function of the numpy generator passed in.
"""

from __future__ import annotations

import numpy as np

ROAD, SIDEWALK, BUILDING, WALL, FENCE, POLE, LIGHT, SIGN, VEGETATION, TERRAIN, SKY = range(11)
PERSON, RIDER, CAR, TRUCK, BUS, TRAIN, MOTORCYCLE, BICYCLE = range(11, 19)

# Per-class texture strength in the photographic style: (fine grain, coarse blotches).
_TEXTURE = {
    ROAD: (0.10, 0.10),
    SIDEWALK: (0.08, 0.08),
    BUILDING: (0.05, 0.12),
    WALL: (0.10, 0.10),
    FENCE: (0.12, 0.05),
    VEGETATION: (0.35, 0.25),
    TERRAIN: (0.25, 0.20),
    SKY: (0.01, 0.0),
}


def _jitter(rng: np.random.Generator, rgb, amount: float = 0.05) -> np.ndarray:
    return np.clip(np.asarray(rgb, np.float32) + rng.normal(0, amount, 3), 0.02, 0.98)


class _Canvas:
    """Label + albedo being painted, and the camera that maps metres to pixels."""

    def __init__(self, rng: np.random.Generator, height: int, width: int):
        self.rng, self.height, self.width = rng, height, width
        self.label = np.full((height, width), SKY, np.uint8)
        self.albedo = np.zeros((height, width, 3), np.float32)
        self.horizon = rng.uniform(0.36, 0.5) * height
        self.vanish_x = rng.uniform(0.35, 0.65) * width
        # Pixels per metre at depth t = 1 (the bottom row): camera height 1.6 m spans the ground.
        self.px_per_m = (height - self.horizon) / 1.6

    def to_screen(self, lateral_m: float, t: float, width_m: float, height_m: float):
        """(x centre, y base, width px, height px) of an upright box standing at depth t."""
        scale = self.px_per_m * t
        x = self.vanish_x + lateral_m * scale
        y = self.horizon + t * (self.height - self.horizon)
        return x, y, width_m * scale, height_m * scale

    def fill(self, mask_box, mask, cls: int, colour) -> None:
        """Paints `mask` (bool [h, w]) at `mask_box` = (y0, x0) with a class and colour."""
        y0, x0 = mask_box
        h, w = mask.shape
        ya, xa = max(y0, 0), max(x0, 0)
        yb, xb = min(y0 + h, self.height), min(x0 + w, self.width)
        if ya >= yb or xa >= xb:
            return
        sub = mask[ya - y0 : yb - y0, xa - x0 : xb - x0]
        self.label[ya:yb, xa:xb][sub] = cls
        self.albedo[ya:yb, xa:xb][sub] = colour

    def rect(self, x0: float, y0: float, x1: float, y1: float, cls: int, colour) -> None:
        xa, ya = int(np.floor(x0)), int(np.floor(y0))
        w, h = max(int(np.ceil(x1)) - xa, 1), max(int(np.ceil(y1)) - ya, 1)
        self.fill((ya, xa), np.ones((h, w), bool), cls, colour)

    def ellipse(self, cx: float, cy: float, rx: float, ry: float, cls: int, colour) -> None:
        rx, ry = max(rx, 0.7), max(ry, 0.7)
        xa, ya = int(np.floor(cx - rx)), int(np.floor(cy - ry))
        ys, xs = np.mgrid[ya : int(np.ceil(cy + ry)) + 1, xa : int(np.ceil(cx + rx)) + 1]
        mask = ((xs + 0.5 - cx) / rx) ** 2 + ((ys + 0.5 - cy) / ry) ** 2 <= 1.0
        self.fill((ya, xa), mask, cls, colour)

    def ring(self, cx: float, cy: float, r: float, thickness: float, cls: int, colour) -> None:
        r = max(r, 1.0)
        xa, ya = int(np.floor(cx - r)), int(np.floor(cy - r))
        ys, xs = np.mgrid[ya : int(np.ceil(cy + r)) + 1, xa : int(np.ceil(cx + r)) + 1]
        d = np.hypot(xs + 0.5 - cx, ys + 0.5 - cy)
        self.fill((ya, xa), (d <= r) & (d >= r - max(thickness, 1.0)), cls, colour)


def _paint_ground(c: _Canvas) -> dict:
    """Road, sidewalks and verges below the horizon; returns the street geometry in metres."""
    rng = c.rng
    geometry = {
        "road_left": -rng.uniform(3.0, 6.0),
        "road_right": rng.uniform(3.0, 6.0),
        "walk": rng.uniform(2.0, 4.0),
        "facade_left": -rng.uniform(9.0, 14.0),
        "facade_right": rng.uniform(9.0, 14.0),
    }
    ys = np.arange(c.height, dtype=np.float32)[:, None] + 0.5
    xs = np.arange(c.width, dtype=np.float32)[None, :] + 0.5
    t = np.maximum((ys - c.horizon) / (c.height - c.horizon), 1e-6)
    lateral = (xs - c.vanish_x) / (c.px_per_m * t)
    below = np.broadcast_to(ys > c.horizon, lateral.shape)
    verge_cls = [TERRAIN if rng.random() < 0.55 else SIDEWALK for _ in range(2)]
    road = (lateral >= geometry["road_left"]) & (lateral <= geometry["road_right"])
    walk_l = (lateral < geometry["road_left"]) & (
        lateral >= geometry["road_left"] - geometry["walk"]
    )
    walk_r = (lateral > geometry["road_right"]) & (
        lateral <= geometry["road_right"] + geometry["walk"]
    )
    verge_l = lateral < geometry["road_left"] - geometry["walk"]
    verge_r = lateral > geometry["road_right"] + geometry["walk"]
    colours = {
        ROAD: _jitter(rng, [0.36, 0.35, 0.37], 0.03),
        SIDEWALK: _jitter(rng, [0.62, 0.58, 0.55], 0.04),
        TERRAIN: _jitter(rng, [0.52, 0.55, 0.30], 0.05),
    }
    for mask, cls in (
        (road, ROAD),
        (walk_l | walk_r, SIDEWALK),
        (verge_l, verge_cls[0]),
        (verge_r, verge_cls[1]),
    ):
        mask = mask & below
        c.label[mask] = cls
        c.albedo[mask] = colours[cls]
    c.albedo[c.label == SKY] = _jitter(rng, [0.55, 0.72, 0.92], 0.04)
    return geometry


def _paint_facades(c: _Canvas, geometry: dict) -> None:
    """Building blocks along both façade lines, with gaps; low walls / fences / hedges in front."""
    rng = c.rng
    tones = ([0.72, 0.66, 0.56], [0.55, 0.52, 0.50], [0.62, 0.38, 0.30], [0.80, 0.78, 0.72])
    for side in ("facade_left", "facade_right"):
        facade = geometry[side]
        # Blocks along the distance z = 1/t (z = 1 at the bottom row), far to near.
        z = rng.uniform(40.0, 80.0)
        blocks = []
        while z > 0.4:
            length = rng.uniform(0.15, 0.6) * z
            blocks.append((z - length, z))
            z -= length
        for z_near, z_far in blocks:
            t_far, t_near = 1.0 / z_far, 1.0 / max(z_near, 0.05)
            kind = rng.random()
            if kind < 0.12:
                continue  # A gap: sky and ground stay visible.
            cls = BUILDING if kind < 0.82 else VEGETATION
            height_m = rng.uniform(8.0, 30.0) if cls == BUILDING else rng.uniform(4.0, 9.0)
            colour = (
                _jitter(rng, tones[rng.integers(len(tones))])
                if cls == BUILDING
                else (_jitter(rng, [0.22, 0.38, 0.16], 0.04))
            )
            _facade_strip(c, facade, t_far, t_near, 0.0, height_m, cls, colour)
        for _ in range(rng.integers(0, 3)):  # Low walls, fences, hedges in front of the façade.
            cls = (WALL, FENCE, VEGETATION)[rng.integers(3)]
            lateral = facade * rng.uniform(0.75, 0.95)
            z_far = rng.uniform(3.0, 40.0)
            z_near = max(z_far * rng.uniform(0.3, 0.8), 0.5)
            colour = {
                WALL: _jitter(rng, [0.58, 0.57, 0.54]),
                FENCE: _jitter(rng, [0.50, 0.42, 0.34]),
                VEGETATION: _jitter(rng, [0.20, 0.36, 0.14], 0.04),
            }[cls]
            _facade_strip(
                c, lateral, 1.0 / z_far, 1.0 / z_near, 0.0, rng.uniform(1.0, 2.2), cls, colour
            )


def _facade_strip(c, lateral_m, t_far, t_near, bottom_m, top_m, cls, colour) -> None:
    """Paints a vertical plane parallel to the street at `lateral_m`, between depths t_far..t_near."""
    t_near = min(t_near, 3.0)
    x_far = c.vanish_x + lateral_m * c.px_per_m * t_far
    x_near = c.vanish_x + lateral_m * c.px_per_m * t_near
    xa, xb = int(np.floor(min(x_far, x_near))), int(np.ceil(max(x_far, x_near)))
    xa, xb = max(xa, 0), min(xb, c.width)
    if xa >= xb:
        return
    xs = np.arange(xa, xb, dtype=np.float32) + 0.5
    t = np.clip((xs - c.vanish_x) / (lateral_m * c.px_per_m), t_far, t_near)
    base = c.horizon + t * (c.height - c.horizon)
    top = base - top_m * c.px_per_m * t
    bottom = base - bottom_m * c.px_per_m * t
    ys = np.arange(c.height, dtype=np.float32)[:, None] + 0.5
    mask = (ys >= top[None, :]) & (ys < bottom[None, :])
    c.fill((0, xa), mask, cls, colour)


def _objects(c: _Canvas, geometry: dict) -> list[tuple[float, callable]]:
    """Samples street furniture, vehicles and people as (depth t, painter) pairs."""
    rng = c.rng
    objects = []
    walk_l = geometry["road_left"] - geometry["walk"] / 2
    walk_r = geometry["road_right"] + geometry["walk"] / 2
    road_l, road_r = geometry["road_left"], geometry["road_right"]

    def depth() -> float:
        return 1.0 / rng.uniform(1.05, 30.0)

    for _ in range(rng.integers(2, 7)):  # Poles, some with a sign or a traffic light.
        lateral = (road_l - 0.4, road_r + 0.4)[rng.integers(2)]
        extra = rng.random()
        objects.append((depth(), _pole(lateral, extra)))
    for _ in range(rng.integers(0, 4)):  # Trees at the sidewalk's outer edge.
        lateral = (road_l - geometry["walk"] + 0.5, road_r + geometry["walk"] - 0.5)[
            rng.integers(2)
        ]
        objects.append((depth(), _tree(lateral)))
    for _ in range(rng.integers(1, 6)):  # Cars, parked at the kerb or in a lane.
        lateral = rng.uniform(road_l + 1.0, road_r - 1.0)
        objects.append((depth(), _vehicle(CAR, lateral)))
    if rng.random() < 0.12:
        objects.append((depth(), _vehicle(TRUCK, rng.uniform(road_l + 1.5, road_r - 1.5))))
    if rng.random() < 0.10:
        objects.append((depth(), _vehicle(BUS, rng.uniform(road_l + 1.5, road_r - 1.5))))
    for _ in range(rng.integers(0, 5)):  # Pedestrians on the sidewalks, a few crossing.
        lateral = (walk_l, walk_r, rng.uniform(road_l, road_r))[rng.choice(3, p=[0.4, 0.4, 0.2])]
        objects.append((depth(), _person(lateral + rng.uniform(-0.8, 0.8))))
    for cycle, p in ((BICYCLE, 0.15), (MOTORCYCLE, 0.10)):
        if rng.random() < p:
            objects.append(
                (1.0 / rng.uniform(1.1, 12.0), _cycle(cycle, rng.uniform(road_l, road_r)))
            )
    return objects


def _pole(lateral, extra):
    def paint(c: _Canvas, t: float) -> None:
        x, y, w, h = c.to_screen(lateral, t, 0.25, c.rng.uniform(4.0, 7.0))
        c.rect(x - w / 2, y - h, x + w / 2, y, POLE, _jitter(c.rng, [0.30, 0.30, 0.32], 0.03))
        if extra < 0.45:
            s = c.px_per_m * t * c.rng.uniform(0.6, 0.9)
            colour = [[0.15, 0.25, 0.75], [0.85, 0.15, 0.12], [0.95, 0.85, 0.15]][c.rng.integers(3)]
            c.rect(x - s / 2, y - h, x + s / 2, y - h + s, SIGN, _jitter(c.rng, colour, 0.03))
        elif extra < 0.75:
            bw, bh = c.px_per_m * t * 0.35, c.px_per_m * t * 0.9
            c.rect(
                x - bw / 2, y - h - bh * 0.2, x + bw / 2, y - h + bh * 0.8, LIGHT, [0.1, 0.1, 0.1]
            )
            lamp = [[0.9, 0.15, 0.1], [0.95, 0.7, 0.1], [0.1, 0.85, 0.3]][c.rng.integers(3)]
            c.ellipse(x, y - h + bh * 0.2, bw * 0.3, bw * 0.3, LIGHT, lamp)

    return paint


def _tree(lateral):
    def paint(c: _Canvas, t: float) -> None:
        x, y, w, h = c.to_screen(lateral, t, 0.35, c.rng.uniform(4.0, 8.0))
        green = _jitter(c.rng, [0.20, 0.40, 0.15], 0.05)
        c.rect(x - w / 2, y - h * 0.6, x + w / 2, y, VEGETATION, [0.30, 0.22, 0.15])
        r = c.px_per_m * t * c.rng.uniform(1.5, 3.0)
        c.ellipse(x, y - h * 0.65, r, r * 0.9, VEGETATION, green)

    return paint


def _vehicle(cls, lateral):
    size = {CAR: (1.8, 1.5), TRUCK: (2.5, 3.4), BUS: (2.6, 3.2)}[cls]

    def paint(c: _Canvas, t: float) -> None:
        x, y, w, h = c.to_screen(lateral, t, *size)
        if cls == CAR:
            paint_rgb = c.rng.uniform(0.05, 0.95, 3).astype(np.float32)
            c.rect(x - w / 2, y - h * 0.55, x + w / 2, y - h * 0.1, CAR, paint_rgb)
            c.rect(x - w * 0.38, y - h, x + w * 0.38, y - h * 0.5, CAR, paint_rgb * 0.9)
            c.rect(x - w * 0.3, y - h * 0.92, x + w * 0.3, y - h * 0.6, CAR, [0.15, 0.18, 0.22])
            c.rect(x - w * 0.45, y - h * 0.15, x + w * 0.45, y, CAR, [0.06, 0.06, 0.06])
        else:
            tone = [[0.9, 0.9, 0.88], [0.8, 0.15, 0.1], [0.95, 0.75, 0.1], [0.2, 0.35, 0.7]]
            body = _jitter(c.rng, tone[c.rng.integers(len(tone))], 0.03)
            c.rect(x - w / 2, y - h, x + w / 2, y - h * 0.05, cls, body)
            band = (0.2, 0.45) if cls == BUS else (0.12, 0.3)
            c.rect(
                x - w * 0.45,
                y - h * (1 - band[0]),
                x + w * 0.45,
                y - h * (1 - band[1]),
                cls,
                [0.12, 0.15, 0.2],
            )
            c.rect(x - w * 0.45, y - h * 0.08, x + w * 0.45, y, cls, [0.06, 0.06, 0.06])

    return paint


def _person(lateral, cls=PERSON):
    def paint(c: _Canvas, t: float) -> None:
        height = c.rng.uniform(1.55, 1.9)
        x, y, w, h = c.to_screen(lateral, t, 0.5, height)
        clothes = c.rng.uniform(0.05, 0.7, 3).astype(np.float32)
        c.rect(x - w * 0.3, y - h * 0.5, x + w * 0.3, y, cls, clothes * 0.7)
        c.rect(x - w / 2, y - h * 0.82, x + w / 2, y - h * 0.45, cls, clothes)
        c.ellipse(x, y - h * 0.9, w * 0.22, h * 0.09, cls, [0.85, 0.66, 0.52])

    return paint


def _cycle(cls, lateral):
    def paint(c: _Canvas, t: float) -> None:
        length = 1.8 if cls == BICYCLE else 2.1
        x, y, w, h = c.to_screen(lateral, t, length, 1.0)
        r = h * 0.35
        dark = [0.08, 0.08, 0.1]
        for wx in (x - w / 2 + r, x + w / 2 - r):
            if cls == BICYCLE:
                c.ring(wx, y - r, r, max(r * 0.2, 1.0), cls, dark)
            else:
                c.ellipse(wx, y - r, r, r, cls, dark)
        frame = c.rng.uniform(0.1, 0.9, 3).astype(np.float32)
        thick = max(h * 0.08, 1.0) if cls == BICYCLE else h * 0.35
        c.rect(x - w / 2 + r, y - r - thick, x + w / 2 - r, y - r, cls, frame)
        rider_x, rider_y, rw, rh = x, y - h * 0.55, w * 0.3, h * 1.3
        clothes = c.rng.uniform(0.05, 0.7, 3).astype(np.float32)
        c.rect(rider_x - rw / 2, rider_y - rh, rider_x + rw / 2, rider_y, RIDER, clothes)
        c.ellipse(rider_x, rider_y - rh * 1.1, rw * 0.4, rh * 0.14, RIDER, [0.85, 0.66, 0.52])

    return paint


def sample_scene(rng: np.random.Generator, height: int, width: int):
    """Draws one street layout.

    Args:
      rng: numpy generator (the scene is a deterministic function of its state).
      height: image height H.
      width: image width W.

    Returns:
      (label uint8 [H, W] train ids, albedo float32 [H, W, 3] in [0, 1], geometry dict).
    """
    canvas = _Canvas(rng, height, width)
    geometry = _paint_ground(canvas)
    _paint_facades(canvas, geometry)
    objects = _objects(canvas, geometry)
    for t, paint in sorted(objects, key=lambda o: o[0]):  # Far (small t) first.
        paint(canvas, t)
    geometry.update(horizon=canvas.horizon, vanish_x=canvas.vanish_x, px_per_m=canvas.px_per_m)
    return canvas.label, canvas.albedo, geometry


def render_source(label: np.ndarray, albedo: np.ndarray) -> np.ndarray:
    """The flat "rendered" style: albedo only, hard edges, no noise.

    Args:
      label: uint8 [H, W] (unused; kept for symmetry with `render_target`).
      albedo: float32 [H, W, 3] in [0, 1].

    Returns:
      uint8 [H, W, 3].
    """
    del label
    return np.clip(np.rint(albedo * 255.0), 0, 255).astype(np.uint8)


def _smooth_noise(rng, height: int, width: int, cell: int) -> np.ndarray:
    """Zero-mean noise, unit-ish std, correlated over about `cell` pixels (bilinear upsampled)."""
    gh, gw = height // cell + 2, width // cell + 2
    grid = rng.standard_normal((gh, gw)).astype(np.float32)
    ys = (np.arange(height, dtype=np.float32) + 0.5) / cell
    xs = (np.arange(width, dtype=np.float32) + 0.5) / cell
    y0, x0 = ys.astype(int), xs.astype(int)
    fy = (ys - y0).astype(np.float32)[:, None]  # float32: int64 offsets would promote to float64
    fx = (xs - x0).astype(np.float32)[None, :]
    rows = grid[:, x0] * (1 - fx) + grid[:, x0 + 1] * fx  # [gh, W]
    return rows[y0] * (1 - fy) + rows[y0 + 1] * fy


def _gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of [H, W, C] with edge replication."""
    radius = max(int(np.ceil(2.5 * sigma)), 1)
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2).astype(np.float32)
    taps /= taps.sum()
    height, width = image.shape[:2]
    padded = np.pad(image, ((radius, radius), (0, 0), (0, 0)), mode="edge")
    image = sum(w * padded[k : k + height] for k, w in enumerate(taps))
    padded = np.pad(image, ((0, 0), (radius, radius), (0, 0)), mode="edge")
    return sum(w * padded[:, k : k + width] for k, w in enumerate(taps))


def render_target(
    rng: np.random.Generator,
    label: np.ndarray,
    albedo: np.ndarray,
    geometry: dict,
    strength: float = 1.0,
) -> np.ndarray:
    """The "photographic" style: texture, lighting, colour cast, gamma, blur and noise.

    Args:
      rng: numpy generator for this image's appearance.
      label: uint8 [H, W] train ids (selects each class's texture).
      albedo: float32 [H, W, 3] in [0, 1].
      geometry: the street geometry from `sample_scene` (for lane markings and windows).
      strength: scales every effect (0 = the flat source style, 1 = the default shift); the
        random draws do not depend on it.

    Returns:
      uint8 [H, W, 3].
    """
    height, width = label.shape
    k = np.float32(strength)

    def toward(value):  # 1 + k * (value - 1): the effect of a multiplicative factor, scaled.
        return 1 + k * (np.float32(value) - 1)

    fine = rng.standard_normal((height, width), dtype=np.float32)
    coarse = _smooth_noise(rng, height, width, 12)
    strength_fine = np.zeros(256, np.float32)
    strength_coarse = np.zeros(256, np.float32)
    for cls, (a_fine, a_coarse) in _TEXTURE.items():
        strength_fine[cls], strength_coarse[cls] = k * a_fine, k * a_coarse
    texture = 1.0 + strength_fine[label] * fine + strength_coarse[label] * coarse
    image = albedo * np.clip(texture, 0.3, 1.8)[..., None]

    ys = np.arange(height, dtype=np.float32)[:, None] + 0.5
    xs = np.arange(width, dtype=np.float32)[None, :] + 0.5
    # Lit windows on façades, lane markings on the road, clouds in the sky.
    period_x, period_y = rng.uniform(6, 14), rng.uniform(8, 16)
    windows = ((xs % period_x) < period_x * 0.45) & ((ys % period_y) < period_y * 0.5)
    image[(label == BUILDING) & windows] *= toward(rng.uniform(0.25, 0.45))
    t = np.maximum((ys - geometry["horizon"]) / (height - geometry["horizon"]), 1e-6)
    lateral = (xs - geometry["vanish_x"]) / (geometry["px_per_m"] * t)
    lane = rng.uniform(geometry["road_left"] + 1.0, geometry["road_right"] - 1.0)
    dashes = ((1.0 / t) % 2.0) < 1.0
    marking = (label == ROAD) & (np.abs(lateral - lane) < 0.12) & dashes
    image[marking] = (1 - k) * image[marking] + k * np.float32(0.85)
    sky = label == SKY
    clouds = k * 0.4 * np.clip(_smooth_noise(rng, height, width, 24), 0, 1)[sky][:, None]
    image[sky] = image[sky] * (1 - clouds) + 0.9 * clouds

    # Dim, warm, uneven light: global level, vignette, a soft shadow field, sodium-like cast.
    level = toward(rng.uniform(0.45, 0.75))
    radius2 = ((xs / width - 0.5) ** 2 + (ys / height - 0.5) ** 2) / 0.5
    shadow = 1.0 - k * 0.35 * np.clip(_smooth_noise(rng, height, width, 40), 0, 1)
    light = level * (1.0 - k * 0.45 * radius2) * shadow
    cast = np.array([1.05, 0.86, 0.62], np.float32) * np.exp(rng.normal(0, 0.06, 3)).astype(
        np.float32
    )
    image = image * light[..., None] * toward(cast)
    gamma = toward(rng.uniform(0.75, 0.95))
    image = np.clip(image, 0, 1)
    if gamma != 1:  # float32 pow is not exact even for an exponent of 1.
        image = image**gamma
    sigma = k * rng.uniform(0.7, 1.3)
    if sigma > 0.2:
        image = _gaussian_blur(image, sigma)
    noise = rng.standard_normal(image.shape, dtype=np.float32)
    image = image + k * np.float32(rng.uniform(0.015, 0.035)) * noise
    return np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)
