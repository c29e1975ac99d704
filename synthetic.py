"""Synthetic scenes in the DepthEstimationUnreal layout: numpy ray casting of rooms and streets.

    python synthetic.py OUT --train 200 --val 50 --test 0 --seed 0

writes OUT/rgb/<split>/<frame>.jpeg (256x144 RGB, JPEG quality 95) and OUT/depth/<split>/<frame>.npy
(float32 [144, 256], planar z-depth in metres along the camera's optical axis; sky, nothing hit or
beyond the far plane = 100.0, like the real data before the loader clips to [0, 20]). Frames are
numbered continuously across splits (train 0..N-1, val N..N+M-1, then test).

A frame is one random scene (render_frame): a room (floor, walls, maybe a ceiling, maybe one open
side) or a street (road, building blocks on both sides, open sky, maybe lamp posts), plus boxes
(rotated about the vertical), spheres and cylinders; textures (checker, stripes, bricks, noise) in
random colours; a sun (Lambert + ambient) with cast shadows; a pinhole camera at a random height,
yaw, slight pitch and horizontal FOV 60-90 deg. Frame k of seed s depends only on (s, k).

The lower level `render(primitives, camera, light, height, width)` takes an explicit scene of plain
dicts (world y is up, yaw 0 looks along +z, positive yaw turns toward +x, angles in radians):
  camera: {"position": (x, y, z), "yaw": 0.0, "pitch": 0.0, "fov_deg": 75.0}   (horizontal FOV)
  light:  {"direction": (x, y, z) toward the sun, "color": (r, g, b), "ambient": (r, g, b),
           "sky_zenith": (r, g, b), "sky_horizon": (r, g, b)}              (all keys optional)
  primitives, each with an optional "material" and "casts_shadow" (default True):
    {"kind": "plane", "point": (x, y, z), "normal": (x, y, z)}
    {"kind": "sphere", "center": (x, y, z), "radius": r}
    {"kind": "box", "center": (x, y, z), "half_size": (hx, hy, hz), "yaw": 0.0}
    {"kind": "cylinder", "base": (x, y, z), "radius": r, "height": h}          (vertical axis)
  material: {"color": (r, g, b), "color2": (r, g, b), "pattern": "flat" | "checker" | "stripes" |
             "bricks" | "noise", "scale": metres, "angle": radians, "seed": int}   (colours in [0, 1])
"""
import argparse
import colorsys
import os

import numpy as np
from PIL import Image
from tqdm import tqdm

from utils import atomic_write

FAR_M = 100.0            # depth of sky / misses / hits beyond the far plane (the real data's sky value)
HEIGHT, WIDTH = 144, 256
PATTERNS = ("flat", "checker", "stripes", "bricks", "noise")
SHADOW_OFFSET_M = 1e-3   # shadow rays start this far off the surface (no self-shadowing acne)


# ------------------------------------------------------------------------------------------------
# camera

def _vec(v):
    """A 3-vector as a (3, 1) float64 column, so it broadcasts against (3, N) ray bundles."""
    return np.asarray(v, dtype=np.float64).reshape(3, 1)


def _dot(a, b):
    return a[0] * b[0] + a[1] * b[1] + a[2] * b[2]


def camera_basis(camera):
    """(forward, right, up) unit (3, 1) columns of a camera dict (no roll)."""
    yaw, pitch = float(camera.get("yaw", 0.0)), float(camera.get("pitch", 0.0))
    forward = _vec([np.sin(yaw) * np.cos(pitch), np.sin(pitch), np.cos(yaw) * np.cos(pitch)])
    right = _vec([np.cos(yaw), 0.0, -np.sin(yaw)])
    up = _vec(np.cross(forward[:, 0], right[:, 0]))
    return forward, right, up


def _image_plane_scale(camera, height, width):
    """Half-width and half-height of the image plane at unit distance (square pixels)."""
    half_w = np.tan(np.radians(float(camera.get("fov_deg", 75.0))) / 2)
    return half_w, half_w * height / width


def camera_rays(camera, height, width):
    """Origin (3, 1) and ray directions (3, H*W), row-major, scaled so each has forward component 1.

    A hit at parameter t along such a ray lies at planar z-depth t, i.e. t is directly the depth map."""
    forward, right, up = camera_basis(camera)
    half_w, half_h = _image_plane_scale(camera, height, width)
    u = ((np.arange(width) + 0.5) / width * 2 - 1) * half_w        # rightward, per column
    v = (1 - (np.arange(height) + 0.5) / height * 2) * half_h      # upward, per row
    uu, vv = np.meshgrid(u, v)
    dirs = forward + right * uu.ravel() + up * vv.ravel()
    return _vec(camera["position"]), dirs


def project(camera, point, height, width):
    """(row, col, z-depth) of a world point: fractional pixel coordinates, pixel centres at integers."""
    origin = _vec(camera["position"])
    forward, right, up = camera_basis(camera)
    rel = _vec(point) - origin
    z = float(_dot(rel, forward)[0])
    half_w, half_h = _image_plane_scale(camera, height, width)
    u, v = float(_dot(rel, right)[0]) / z, float(_dot(rel, up)[0]) / z
    col = (u / half_w + 1) / 2 * width - 0.5
    row = (1 - v / half_h) / 2 * height - 0.5
    return row, col, z


# ------------------------------------------------------------------------------------------------
# geometry: intersections (t per ray, inf for a miss), normals and texture coordinates at hit points

def _prepare(prim):
    """A primitive dict with numpy columns, a normalised normal and a full material."""
    p = dict(prim)
    kind = p["kind"]
    if kind == "plane":
        p["point"] = _vec(p["point"])
        p["normal"] = _vec(p["normal"]) / np.linalg.norm(p["normal"])
    elif kind == "sphere":
        p["center"] = _vec(p["center"])
    elif kind == "box":
        p["center"] = _vec(p["center"])
        p["half_size"] = _vec(p["half_size"])
        p["cos"], p["sin"] = np.cos(p.get("yaw", 0.0)), np.sin(p.get("yaw", 0.0))
    elif kind == "cylinder":
        p["base"] = _vec(p["base"])
    else:
        raise ValueError(f"unknown primitive kind {kind!r}")
    material = {"color": (0.6, 0.6, 0.6), "color2": (0.3, 0.3, 0.3), "pattern": "flat", "scale": 1.0,
                "angle": 0.0, "seed": 0}
    material.update(p.get("material", {}))
    material["color"], material["color2"] = _vec(material["color"]), _vec(material["color2"])
    p["material"] = material
    p.setdefault("casts_shadow", True)
    return p


def _bounding_sphere(p):
    """(centre (3, 1), radius) of a finite primitive, None for a plane."""
    if p["kind"] == "sphere":
        return p["center"], float(p["radius"])
    if p["kind"] == "box":
        return p["center"], float(np.linalg.norm(p["half_size"]))
    if p["kind"] == "cylinder":
        h = float(p["height"])
        return p["base"] + _vec([0, h / 2, 0]), float(np.hypot(p["radius"], h / 2))
    return None


def _to_box(p, v):
    """World (3, ...) vector (already relative to the centre) into the box's unrotated frame."""
    c, s = p["cos"], p["sin"]
    return np.stack([c * v[0] - s * v[2], v[1], s * v[0] + c * v[2]])


def _from_box(p, v):
    c, s = p["cos"], p["sin"]
    return np.stack([c * v[0] + s * v[2], v[1], -s * v[0] + c * v[2]])


def intersect(p, origin, dirs, t_min=1e-6):
    """Ray parameter of the first hit beyond t_min, inf where a ray misses. origin/dirs (3, 1) or (3, N)."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if p["kind"] == "plane":
            denom = _dot(dirs, p["normal"])
            t = _dot(p["point"] - origin, p["normal"]) / denom
            return np.where((np.abs(denom) > 1e-12) & (t > t_min), t, np.inf)
        if p["kind"] == "sphere":
            oc = origin - p["center"]
            a, b = _dot(dirs, dirs), _dot(dirs, oc)
            disc = b * b - a * (_dot(oc, oc) - float(p["radius"]) ** 2)
            root = np.sqrt(np.maximum(disc, 0.0))
            t = (-b - root) / a
            t = np.where(t > t_min, t, (-b + root) / a)
            return np.where((disc >= 0) & (t > t_min), t, np.inf)
        if p["kind"] == "box":
            o_local, d_local = _to_box(p, origin - p["center"]), _to_box(p, dirs)
            inv = 1.0 / d_local
            t1, t2 = (-p["half_size"] - o_local) * inv, (p["half_size"] - o_local) * inv
            t_near = np.nanmax(np.minimum(t1, t2), axis=0)
            t_far = np.nanmin(np.maximum(t1, t2), axis=0)
            t = np.where(t_near > t_min, t_near, t_far)
            return np.where((t_near <= t_far) & (t > t_min), t, np.inf)
        # cylinder: vertical side plus top and bottom caps
        r, y0 = float(p["radius"]), float(p["base"][1, 0])
        y1 = y0 + float(p["height"])
        ox, oy, oz = origin[0] - p["base"][0], origin[1], origin[2] - p["base"][2]
        a = dirs[0] * dirs[0] + dirs[2] * dirs[2]
        b = dirs[0] * ox + dirs[2] * oz
        disc = b * b - a * (ox * ox + oz * oz - r * r)
        root = np.sqrt(np.maximum(disc, 0.0))
        best = np.full(np.broadcast(disc, dirs[1]).shape, np.inf)
        for t in ((-b - root) / a, (-b + root) / a):
            y = oy + t * dirs[1]
            ok = (disc >= 0) & (a > 1e-12) & (t > t_min) & (y >= y0) & (y <= y1)
            best = np.where(ok & (t < best), t, best)
        for y_cap in (y0, y1):
            t = (y_cap - oy) / dirs[1]
            x, z = ox + t * dirs[0], oz + t * dirs[2]
            ok = (t > t_min) & (x * x + z * z <= r * r)
            best = np.where(ok & (t < best), t, best)
        return best


def _plane_axes(normal):
    """Two unit tangent columns of a plane."""
    helper = np.array([0.0, 1.0, 0.0]) if abs(normal[1, 0]) < 0.9 else np.array([1.0, 0.0, 0.0])
    t1 = np.cross(normal[:, 0], helper)
    t1 /= np.linalg.norm(t1)
    return _vec(t1), _vec(np.cross(normal[:, 0], t1))


def surface(p, points):
    """Outward unit normals (3, M) and texture coordinates u, v in metres at hit points (3, M)."""
    if p["kind"] == "plane":
        t1, t2 = _plane_axes(p["normal"])
        return np.broadcast_to(p["normal"], points.shape), _dot(points, t1), _dot(points, t2)
    if p["kind"] == "sphere":
        rel = (points - p["center"]) / float(p["radius"])
        r = float(p["radius"])
        u = np.arctan2(rel[0], rel[2]) * r
        v = np.arcsin(np.clip(rel[1], -1, 1)) * r
        return rel, u, v
    if p["kind"] == "box":
        local = _to_box(p, points - p["center"])
        axis = np.argmax(np.abs(local) / p["half_size"], axis=0)
        normal_local = np.zeros_like(local)
        cols = np.arange(local.shape[1])
        normal_local[axis, cols] = np.sign(local[axis, cols])
        u = np.where(axis == 0, local[2], local[0])
        v = np.where(axis == 1, local[2], local[1])
        return _from_box(p, normal_local), u, v
    r, y0 = float(p["radius"]), float(p["base"][1, 0])
    y1 = y0 + float(p["height"])
    x, z = points[0] - p["base"][0, 0], points[2] - p["base"][2, 0]
    radial = np.hypot(x, z)
    on_side = np.abs(radial - r) < np.minimum(np.abs(points[1] - y0), np.abs(points[1] - y1))
    on_top = np.abs(points[1] - y1) <= np.abs(points[1] - y0)
    safe = np.maximum(radial, 1e-12)
    normal = np.where(on_side, np.stack([x / safe, np.zeros_like(x), z / safe]),
                      np.stack([np.zeros_like(x), np.where(on_top, 1.0, -1.0), np.zeros_like(x)]))
    u = np.where(on_side, np.arctan2(x, z) * r, x)
    v = np.where(on_side, points[1], z)
    return normal, u, v


# ------------------------------------------------------------------------------------------------
# textures and shading

def _hash01(ix, iy, seed):
    """Deterministic pseudo-random value in [0, 1] per integer lattice point."""
    h = (ix.astype(np.int64) * 374761393 + iy.astype(np.int64) * 668265263 + int(seed) * 2246822519) & 0xFFFFFFFF
    h = ((h ^ (h >> 13)) * 1274126177) & 0xFFFFFFFF
    return (h ^ (h >> 16)) / 4294967295.0


def _value_noise(u, v, seed):
    iu, iv = np.floor(u), np.floor(v)
    fu, fv = u - iu, v - iv
    fu, fv = fu * fu * (3 - 2 * fu), fv * fv * (3 - 2 * fv)
    n00, n10 = _hash01(iu, iv, seed), _hash01(iu + 1, iv, seed)
    n01, n11 = _hash01(iu, iv + 1, seed), _hash01(iu + 1, iv + 1, seed)
    return (n00 * (1 - fu) + n10 * fu) * (1 - fv) + (n01 * (1 - fu) + n11 * fu) * fv


def albedo(material, u, v, footprint_m=None):
    """Surface colour (3, M) of a material at texture coordinates u, v (metres).

    footprint_m (M,): the size of one pixel on the surface; pattern contrast fades to the pattern's
    mean where its features get smaller than a pixel (cheap texture filtering: no moire far away)."""
    c, s = np.cos(material["angle"]), np.sin(material["angle"])
    scale = material["scale"]
    u, v = (c * u - s * v) / scale, (s * u + c * v) / scale
    pattern, seed = material["pattern"], material["seed"]
    pixel = np.zeros_like(u) if footprint_m is None else footprint_m / scale  # pixel size in pattern units

    def fade(mix, feature, mean):
        keep = np.clip(1.5 - pixel / feature, 0.0, 1.0)
        return mean + (mix - mean) * keep

    if pattern == "checker":
        mix = fade((np.floor(u) + np.floor(v)) % 2, 1.0, 0.5)
    elif pattern == "stripes":
        mix = fade((np.floor(u * 2) % 2) * 0.85, 0.5, 0.425)
    elif pattern == "bricks":
        row = np.floor(v * 2)
        brick_u = u + 0.5 * (row % 2)
        mortar = (v * 2 - row < 0.12) | (brick_u - np.floor(brick_u) < 0.06)
        mix = fade(np.where(mortar, 1.0, 0.25 * _hash01(np.floor(brick_u), row, seed)), 0.2, 0.3)
    elif pattern == "noise":
        mix = (fade(0.65 * _value_noise(u * 2, v * 2, seed), 0.5, 0.325)
               + fade(0.35 * _value_noise(u * 7, v * 7, seed + 1), 0.14, 0.175))
    else:
        mix = np.zeros_like(u)
    return material["color"] * (1 - mix) + material["color2"] * mix


def sky_color(dirs, light):
    """Sky gradient (3, N): horizon colour at and below the horizon, to the zenith colour straight up."""
    elevation = dirs[1] / np.sqrt(_dot(dirs, dirs))
    w = np.sqrt(np.clip(elevation, 0.0, 1.0))
    return light["sky_horizon"] * (1 - w) + light["sky_zenith"] * w


def _prepare_light(light):
    full = {"direction": (0.4, 0.8, -0.3), "color": (1.0, 0.97, 0.9), "ambient": (0.3, 0.32, 0.36),
            "sky_zenith": (0.25, 0.45, 0.85), "sky_horizon": (0.75, 0.82, 0.9)}
    full.update(light or {})
    out = {k: _vec(v) for k, v in full.items()}
    out["direction"] = out["direction"] / np.linalg.norm(out["direction"])
    return out


# ------------------------------------------------------------------------------------------------
# the renderer

def render(primitives, camera, light, height=HEIGHT, width=WIDTH):
    """Ray-cast an explicit scene (see the module docstring) -> (rgb uint8 [H, W, 3], depth_m float32 [H, W]).

    depth_m is planar z-depth along the optical axis; rays that hit nothing within FAR_M get FAR_M."""
    prims = [_prepare(p) for p in primitives]
    light = _prepare_light(light)
    origin, dirs = camera_rays(camera, height, width)
    forward = camera_basis(camera)[0]

    # primary rays: nearest hit per pixel (t is z-depth); primitives wholly behind or beyond FAR_M skipped
    depth = np.full(dirs.shape[1], np.inf)
    owner = np.full(dirs.shape[1], -1)
    for k, p in enumerate(prims):
        bound = _bounding_sphere(p)
        if bound is not None:
            z = float(_dot(bound[0] - origin, forward)[0])
            if z + bound[1] < 0 or z - bound[1] > FAR_M:
                continue
        t = intersect(p, origin, dirs)
        closer = t < depth
        depth[closer] = t[closer]
        owner[closer] = k

    hit = np.flatnonzero(depth <= FAR_M)
    sky = sky_color(dirs, light)
    color = sky.copy()
    if hit.size:
        d_hit, z_hit = dirs[:, hit], depth[hit]
        points = origin + d_hit * z_hit
        normal = np.empty_like(points)
        base = np.empty_like(points)
        # one pixel's size on the surface: z * pixel angle, stretched at grazing angles (geometric mean)
        pixel_angle = 2 * _image_plane_scale(camera, height, width)[0] / width
        for k, p in enumerate(prims):
            sel = np.flatnonzero(owner[hit] == k)
            if sel.size:
                n_k, u, v = surface(p, points[:, sel])
                normal[:, sel] = n_k
                d_sel = d_hit[:, sel]
                cos_view = np.abs(_dot(n_k, d_sel)) / np.sqrt(_dot(d_sel, d_sel))
                footprint = z_hit[sel] * pixel_angle / np.sqrt(np.maximum(cos_view, 0.02))
                base[:, sel] = albedo(p["material"], u, v, footprint)
        normal = np.where(_dot(normal, d_hit) > 0, -normal, normal)  # face the camera (planes, insides)

        # sun: Lambert term times a shadow ray toward the sun against every shadow-casting primitive
        lambert = np.maximum(_dot(normal, light["direction"]), 0.0)
        facing = np.flatnonzero(lambert > 0)
        shadow_origins = points[:, facing] + normal[:, facing] * SHADOW_OFFSET_M
        blocked = np.zeros(facing.size, dtype=bool)
        for p in prims:
            if not p["casts_shadow"]:
                continue
            open_ = np.flatnonzero(~blocked)
            if open_.size == 0:
                break
            t = intersect(p, shadow_origins[:, open_], light["direction"], t_min=0.0)
            blocked[open_[np.isfinite(t)]] = True
        lambert[facing[blocked]] = 0.0

        shaded = base * (light["ambient"] + light["color"] * lambert)
        fog = (z_hit / FAR_M) ** 2          # aerial perspective: reaches the sky colour at the far plane
        color[:, hit] = shaded * (1 - fog) + sky[:, hit] * fog

    depth_m = np.full(dirs.shape[1], FAR_M)
    depth_m[hit] = depth[hit]
    rgb = np.round(np.clip(color, 0.0, 1.0) ** (1 / 2.2) * 255).astype(np.uint8)
    return rgb.T.reshape(height, width, 3), depth_m.astype(np.float32).reshape(height, width)


# ------------------------------------------------------------------------------------------------
# random scenes

def _random_color(rng, value=(0.15, 0.95)):
    r, g, b = colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0.0, 0.8) ** 1.5, rng.uniform(*value))
    return (r, g, b)


def random_material(rng, scale=(0.2, 2.0)):
    """Random colours (so colour alone says nothing about depth), pattern, scale and orientation."""
    return {"color": _random_color(rng), "color2": _random_color(rng), "pattern": str(rng.choice(PATTERNS)),
            "scale": float(np.exp(rng.uniform(np.log(scale[0]), np.log(scale[1])))),
            "angle": float(rng.choice([0.0, np.pi / 2, rng.uniform(0, np.pi)])), "seed": int(rng.integers(1 << 30))}


def _random_object(rng, x, z):
    """A box, sphere or cylinder standing on (or floating above) the floor at (x, z); (prim, footprint radius)."""
    kind = rng.choice(["box", "box", "sphere", "cylinder"])
    material = random_material(rng, scale=(0.1, 1.0))
    if kind == "box":
        half = rng.uniform([0.2, 0.15, 0.2], [1.5, 1.3, 1.5])
        prim = {"kind": "box", "center": (x, half[1], z), "half_size": tuple(half), "yaw": rng.uniform(0, np.pi)}
        return dict(prim, material=material), float(np.hypot(half[0], half[2]))
    if kind == "sphere":
        radius = rng.uniform(0.2, 1.3)
        y = radius if rng.uniform() < 0.75 else radius + rng.uniform(0.3, 2.0)
        return {"kind": "sphere", "center": (x, y, z), "radius": radius, "material": material}, radius
    radius = rng.uniform(0.08, 0.8)
    return {"kind": "cylinder", "base": (x, 0.0, z), "radius": radius, "height": rng.uniform(0.4, 4.0),
            "material": material}, radius


def _scatter_objects(rng, prims, camera, n, x_range, z_range):
    """Place n objects in front of the camera (log-uniform distance), inside the given floor area."""
    hfov = np.radians(camera["fov_deg"])
    cx, cz = camera["position"][0], camera["position"][2]
    for _ in range(n):
        dist = np.exp(rng.uniform(np.log(3.0), np.log(40.0)))
        angle = camera["yaw"] + rng.uniform(-0.6, 0.6) * hfov
        x, z = cx + dist * np.sin(angle), cz + dist * np.cos(angle)
        prim, footprint = _random_object(rng, x, z)
        inside = ((x_range[0] + footprint < x < x_range[1] - footprint)
                  and (z_range[0] + footprint < z < z_range[1] - footprint))
        if inside and np.hypot(x - cx, z - cz) > footprint + 0.8:
            prims.append(prim)


def _room(rng):
    """Floor, four walls (one maybe missing), maybe a ceiling; the camera inside, looking roughly lengthwise."""
    half_w, length = rng.uniform(3.0, 12.0), np.exp(rng.uniform(np.log(10.0), np.log(90.0)))
    z0 = -rng.uniform(1.0, 0.3 * length)
    ceiling = rng.uniform() < 0.55
    ceiling_h = rng.uniform(2.6, 8.0)
    cam_h = rng.uniform(1.0, min(2.6, ceiling_h - 0.5) if ceiling else 2.8)
    camera = {"position": (rng.uniform(-half_w + 1.0, half_w - 1.0), cam_h, z0 + rng.uniform(0.5, 1.0) * (-z0)),
              "yaw": float(rng.normal(0.0, 0.35)), "pitch": float(rng.uniform(-0.16, 0.12)),
              "fov_deg": float(rng.uniform(60.0, 90.0))}
    shadows = not ceiling   # a ceiling would put everything in the sun's shadow: then only objects cast them
    walls = [((-half_w, 0, 0), (1, 0, 0)), ((half_w, 0, 0), (-1, 0, 0)), ((0, 0, z0), (0, 0, 1)),
             ((0, 0, z0 + length), (0, 0, -1))]
    if rng.uniform() < 0.35:
        walls.pop(3)   # open far end: floor to the horizon and sky
    prims = [{"kind": "plane", "point": (0, 0, 0), "normal": (0, 1, 0), "material": random_material(rng, (0.3, 1.5))}]
    for point, normal in walls:
        prims.append({"kind": "plane", "point": point, "normal": normal, "casts_shadow": shadows,
                      "material": random_material(rng, (0.3, 2.0))})
    if ceiling:
        prims.append({"kind": "plane", "point": (0, ceiling_h, 0), "normal": (0, -1, 0), "casts_shadow": False,
                      "material": random_material(rng, (0.5, 3.0))})
    _scatter_objects(rng, prims, camera, int(rng.integers(2, 10)), (-half_w, half_w), (z0, z0 + length))
    return prims, camera


def _street(rng):
    """Road along +z, building blocks on both sides with gaps, open sky, maybe lamp posts."""
    half_w = rng.uniform(4.0, 12.0)
    camera = {"position": (rng.uniform(-half_w + 1.5, half_w - 1.5), rng.uniform(1.2, 3.5), 0.0),
              "yaw": float(rng.normal(0.0, 0.3)), "pitch": float(rng.uniform(-0.16, 0.12)),
              "fov_deg": float(rng.uniform(60.0, 90.0))}
    prims = [{"kind": "plane", "point": (0, 0, 0), "normal": (0, 1, 0), "material": random_material(rng, (0.3, 2.0))}]
    facade = random_material(rng, (0.3, 2.0))    # one look per side, varied per block by colour
    for side in (-1, 1):
        z = -rng.uniform(5.0, 25.0)
        while z < 115.0:
            width = rng.uniform(6.0, 30.0)
            if rng.uniform() < 0.2:
                z += rng.uniform(3.0, 15.0)   # gap: sky and whatever is behind
            height, depth = np.exp(rng.uniform(np.log(4.0), np.log(30.0))), rng.uniform(8.0, 20.0)
            setback = rng.uniform(0.0, 2.0)
            material = dict(facade, color=_random_color(rng), seed=int(rng.integers(1 << 30)))
            prims.append({"kind": "box", "center": (side * (half_w + setback + depth / 2), height / 2, z + width / 2),
                          "half_size": (depth / 2, height / 2, width / 2), "yaw": 0.0, "material": material})
            z += width
    if rng.uniform() < 0.6:
        post = random_material(rng, (0.2, 1.0))
        spacing, radius, height = rng.uniform(10.0, 25.0), rng.uniform(0.06, 0.2), rng.uniform(3.0, 7.0)
        for side in (-1, 1):
            for z in np.arange(rng.uniform(2.0, spacing), 90.0, spacing):
                prims.append({"kind": "cylinder", "base": (side * (half_w - 0.5), 0.0, z), "radius": radius,
                              "height": height, "material": post})
    _scatter_objects(rng, prims, camera, int(rng.integers(2, 9)), (-half_w, half_w), (-50.0, 200.0))
    return prims, camera


def random_light(rng):
    """A sun at a random azimuth and elevation, ambient light and a sky gradient (clear to overcast)."""
    elevation, azimuth = rng.uniform(np.radians(20), np.radians(75)), rng.uniform(0, 2 * np.pi)
    overcast = rng.uniform(0.0, 0.7)
    zenith = (1 - overcast) * np.array([0.2, 0.4, 0.85]) + overcast * np.array([0.6, 0.62, 0.66])
    warmth = rng.uniform(0.0, 0.15)
    return {"direction": (np.cos(elevation) * np.sin(azimuth), np.sin(elevation), np.cos(elevation) * np.cos(azimuth)),
            "color": tuple(rng.uniform(0.6, 1.0) * np.array([1.0, 1.0 - warmth / 2, 1.0 - warmth])),
            "ambient": tuple(rng.uniform(0.12, 0.4) * np.array([0.95, 1.0, 1.1])),
            "sky_zenith": tuple(zenith * rng.uniform(0.8, 1.1)),
            "sky_horizon": tuple(np.clip(zenith + rng.uniform(0.15, 0.35), 0, 1))}


def random_scene(rng):
    """(primitives, camera, light) of a random room (35%) or street (65%)."""
    prims, camera = _room(rng) if rng.uniform() < 0.35 else _street(rng)
    return prims, camera, random_light(rng)


def render_frame(seed, frame, height=HEIGHT, width=WIDTH):
    """One random scene -> (rgb uint8 [H, W, 3], depth_m float32 [H, W]); depends only on (seed, frame)."""
    rng = np.random.default_rng((int(seed), int(frame)))
    primitives, camera, light = random_scene(rng)
    return render(primitives, camera, light, height, width)


# ------------------------------------------------------------------------------------------------
# the dataset layout

def make_dataset(out_dir, n_train=200, n_val=50, n_test=0, seed=0, height=HEIGHT, width=WIDTH, progress=True):
    """Write OUT/rgb/<split>/<frame>.jpeg + OUT/depth/<split>/<frame>.npy, frames numbered across splits."""
    jobs, frame = [], 0
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        if n > 0:
            os.makedirs(os.path.join(out_dir, "rgb", split), exist_ok=True)
            os.makedirs(os.path.join(out_dir, "depth", split), exist_ok=True)
        for _ in range(n):
            jobs.append((split, frame))
            frame += 1
    if progress:
        jobs = tqdm(jobs, desc=f"synthetic scenes -> {out_dir}", unit="frame")
    for split, frame in jobs:
        rgb, depth_m = render_frame(seed, frame, height, width)
        atomic_write(os.path.join(out_dir, "rgb", split, f"{frame}.jpeg"),
                      lambda f: Image.fromarray(rgb).save(f, format="JPEG", quality=95))
        atomic_write(os.path.join(out_dir, "depth", split, f"{frame}.npy"), lambda f: np.save(f, depth_m))
    return out_dir


def main(argv=None):
    parser = argparse.ArgumentParser(description="Write synthetic scenes in the DepthEstimationUnreal layout.")
    parser.add_argument("out", help="output folder (gets rgb/<split>/ and depth/<split>/)")
    parser.add_argument("--train", type=int, default=200, help="train frames (default 200)")
    parser.add_argument("--val", type=int, default=50, help="val frames (default 50)")
    parser.add_argument("--test", type=int, default=0, help="test frames (default 0)")
    parser.add_argument("--seed", type=int, default=0, help="scene seed (default 0)")
    parser.add_argument("--height", type=int, default=HEIGHT)
    parser.add_argument("--width", type=int, default=WIDTH)
    args = parser.parse_args(argv)
    make_dataset(args.out, args.train, args.val, args.test, args.seed, args.height, args.width)
    print(f"wrote {args.train} train / {args.val} val / {args.test} test frames to {args.out}")


if __name__ == "__main__":
    main()
