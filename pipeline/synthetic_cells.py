"""How the synthetic images are drawn (pipeline/synthetic.py makes the data set): cell shapes and their
arrangements, the stroma, the H&E stain model, and render_image, which draws one field of view."""

from typing import Callable, NamedTuple

import numpy as np
from PIL import Image, ImageFilter

# Lengths below are in pixels of a 64 px image and scaled by size / 64: the field of view is fixed
# and a smaller image is the same scene at a lower resolution. Version 2 narrowed the field of view
# 1.5 times (version 1 drew the same lengths on a 96 px reference, so cells were 1-3 px at 32 px),
# and drew fewer distractor cells, less stroma, less blur and fewer contaminating cells: chosen by
# measurement (README, quick mode) so that small backbones from random init learn the task within
# a few CPU minutes, while nuisances still vary alike in every class.
REFERENCE_SIZE = 64
STROMA_STRENGTH = (0.05, 0.25)  # range of the stroma's eosin density
BLUR_SIGMA = (0.2, 0.6)  # range of the Gaussian blur, reference px

# Stain optical-density directions (R, G, B) of haematoxylin and eosin.
_HAEMATOXYLIN = np.array([0.65, 0.70, 0.29])
_EOSIN = np.array([0.07, 0.99, 0.11])


# ---------------------------------------------------------------------------------------------
# Shape primitives. A cell renderer gets the pixel offsets (u, v) from the cell centre, already
# rotated into the cell's frame, and returns (nucleus, cytoplasm, footprint) densities in [0, 1].

def _sigmoid(x):
    return 0.5 + 0.5 * np.tanh(0.5 * x)


def _ellipse(u, v, a, b, edge, power=2.0):
    """Soft ellipse with semi-axes a (along u) and b (along v); power < 2 gives pointed ends."""
    rho = np.sqrt(np.abs(u / a) ** power + (v / b) ** 2)
    return _sigmoid((1.0 - rho) * min(a, b) / edge)


def _wobbly_disc(rng, u, v, radius, edge, wobble):
    """Soft disc whose outline is bent by a few random low harmonics (irregular large cells)."""
    angle = np.arctan2(v, u)
    r = np.hypot(u, v)
    outline = radius * (1.0 + sum(rng.uniform(0, wobble) * np.cos(j * angle + rng.uniform(0, 2 * np.pi))
                                  for j in (2, 3, 5)))
    return _sigmoid((outline - r) / edge)


def _lymphocyte(rng, k, u, v, edge):
    rn = rng.uniform(2.6, 3.6) * k
    nucleus = _ellipse(u, v, rn, rn * rng.uniform(0.85, 1.0), edge) * rng.uniform(0.9, 1.0)
    cell = _ellipse(u, v, rn * 1.3, rn * 1.25, edge)
    return nucleus, 0.3 * cell, cell


def _neutrophil(rng, k, u, v, edge):
    rc = rng.uniform(6.0, 7.5) * k
    cell = _ellipse(u, v, rc, rc * rng.uniform(0.85, 1.0), edge)
    n_lobes = rng.integers(3, 6)
    arc = rng.uniform(0.45, 0.6) * rc
    step = rng.uniform(0.9, 1.15)  # radians between lobes along the arc
    angles = (np.arange(n_lobes) - (n_lobes - 1) / 2) * step
    nucleus = np.zeros(np.broadcast(u, v).shape)
    lobe = rng.uniform(1.6, 2.0) * k
    for i, t in enumerate(angles):
        cu, cv = u - arc * np.cos(t), v - arc * np.sin(t)
        nucleus = np.maximum(nucleus, _ellipse(cu, cv, lobe, lobe * 0.8, edge))
        if i:  # thin chromatin strand between neighbouring lobes
            m = 0.5 * (t + angles[i - 1])
            su, sv = u - arc * np.cos(m), v - arc * np.sin(m)
            c, s = np.cos(m + np.pi / 2), np.sin(m + np.pi / 2)
            strand = _ellipse(su * c + sv * s, -su * s + sv * c, lobe * 0.9, 0.45 * k, edge)
            nucleus = np.maximum(nucleus, 0.8 * strand)
    return 0.95 * nucleus, 0.22 * cell, cell


def _spindle(rng, k, u, v, edge):
    a, b = rng.uniform(10.0, 15.0) * k, rng.uniform(2.2, 3.0) * k
    cell = _ellipse(u, v, a, b, edge, power=1.3)
    shift = rng.uniform(-0.15, 0.15) * a
    nucleus = _ellipse(u - shift, v, rng.uniform(4.5, 6.5) * k, rng.uniform(1.2, 1.6) * k, edge)
    return 0.8 * nucleus, 0.55 * cell, cell


def _epithelial(rng, k, u, v, edge):
    rc = rng.uniform(5.3, 6.5) * k
    cell = _ellipse(u, v, rc, rc * rng.uniform(0.8, 1.0), edge)
    rn = rng.uniform(2.8, 3.4) * k
    du, dv = rng.uniform(-0.8, 0.8, 2) * k
    outer = _ellipse(u - du, v - dv, rn, rn * 0.9, edge)
    inner = _ellipse(u - du, v - dv, rn * 0.65, rn * 0.55, edge)
    nu, nv = rng.uniform(-0.35, 0.35, 2) * rn
    nucleolus = _ellipse(u - du - nu, v - dv - nv, 0.75 * k, 0.75 * k, edge)
    # Vesicular nucleus: dark membrane rim, pale inside, one dark nucleolus.
    nucleus = np.maximum(outer * (0.8 - 0.5 * inner), nucleolus)
    return nucleus, 0.5 * cell, cell


def _giant(rng, k, u, v, edge):
    rc = rng.uniform(15.0, 21.0) * k
    cell = _wobbly_disc(rng, u, v, rc, edge, 0.08)
    n_nuclei = rng.integers(6, 13)
    if rng.random() < 0.5:  # Langhans-like: nuclei in a horseshoe near the rim
        t = rng.uniform(0, 2 * np.pi) + np.linspace(0, rng.uniform(3.5, 5.5), n_nuclei)
        rad = rng.uniform(0.58, 0.72, n_nuclei) * rc
    else:  # foreign-body-like: nuclei spread over the cell
        t = rng.uniform(0, 2 * np.pi, n_nuclei)
        rad = np.sqrt(rng.uniform(0.0, 0.45, n_nuclei)) * rc
    nucleus = np.zeros(np.broadcast(u, v).shape)
    for ti, ri, oi in zip(t, rad, rng.uniform(0, np.pi, n_nuclei)):
        cu, cv = u - ri * np.cos(ti), v - ri * np.sin(ti)
        c, s = np.cos(oi), np.sin(oi)
        nucleus = np.maximum(nucleus, _ellipse(cu * c + cv * s, -cu * s + cv * c, 2.5 * k, 1.8 * k, edge))
    return 0.7 * nucleus, 0.4 * cell, cell


def _signet(rng, k, u, v, edge):
    rc = rng.uniform(7.0, 9.5) * k
    cell = _ellipse(u, v, rc, rc * rng.uniform(0.85, 1.0), edge)
    vacuole = _ellipse(u + 0.18 * rc, v, 0.72 * rc, 0.7 * rc, edge)
    crescent = _ellipse(u - 0.72 * rc, v, 0.25 * rc, 0.55 * rc, edge) * (1.0 - vacuole)
    return 0.95 * crescent, 0.5 * cell * (1.0 - 0.9 * vacuole), cell


def _plasma(rng, k, u, v, edge):
    a = rng.uniform(5.5, 7.0) * k
    cell = _ellipse(u, v, a, a * rng.uniform(0.65, 0.8), edge)
    rn = rng.uniform(2.4, 2.9) * k
    nu = u - 0.45 * a
    # Eccentric nucleus with "clock-face" chromatin and a pale perinuclear halo.
    spokes = 0.75 + 0.25 * np.cos(6 * np.arctan2(v, nu) + rng.uniform(0, 2 * np.pi))
    nucleus = _ellipse(nu, v, rn, rn, edge) * spokes
    halo = _ellipse(u - 0.1 * a, v, rn * 1.1, rn, edge)
    return nucleus, cell * (0.6 - 0.35 * halo), cell


def _macrophage(rng, k, u, v, edge):
    rc = rng.uniform(10.0, 13.0) * k
    cell = _wobbly_disc(rng, u, v, rc, edge, 0.12)
    # Foamy cytoplasm: many small clear vacuoles.
    bubbles = np.zeros(np.broadcast(u, v).shape)
    for bu, bv in rng.uniform(-0.8, 0.8, (14, 2)) * rc:
        bubbles = np.maximum(bubbles, _ellipse(u - bu, v - bv, 1.4 * k, 1.4 * k, edge))
    nu = u + 0.2 * rc
    notch = _ellipse(nu, v + 2.8 * k, 2.0 * k, 2.0 * k, edge)
    kidney = _ellipse(nu, v, 4.3 * k, 2.6 * k, edge) * (1.0 - notch)
    return 0.75 * kidney, cell * (0.5 - 0.35 * bubbles), cell


def _generic(rng, k, u, v, edge):
    rc = rng.uniform(4.8, 6.2) * k
    cell = _ellipse(u, v, rc, rc * rng.uniform(0.75, 1.0), edge)
    rn = rng.uniform(2.6, 3.3) * k
    nucleus = _ellipse(u, v, rn, rn * rng.uniform(0.75, 1.0), edge)
    return rng.uniform(0.55, 0.75) * nucleus, 0.45 * cell, cell


def _red_blood_cell(rng, k, u, v, edge):
    r = rng.uniform(3.0, 3.8) * k
    disc = _ellipse(u, v, r, r * rng.uniform(0.85, 1.0), edge)
    pallor = _ellipse(u, v, 0.5 * r, 0.5 * r, edge)
    return np.zeros_like(disc), disc * (0.9 - 0.4 * pallor), disc


class _CellType(NamedTuple):
    render: Callable
    spacing: float  # radius kept free around a cell, reference px
    half: float  # half-width of the patch a cell is drawn in, reference px
    count: tuple  # range of cells (of clusters, for "cluster") when the type is in the image
    arrangement: str  # "scatter", "aligned" (common direction) or "cluster"
    minor_count: tuple  # range of cells when the type only contaminates another class's image


_CELL_TYPES = {
    "lymphocyte_like": _CellType(_lymphocyte, 4.0, 6, (8, 18), "scatter", (2, 6)),
    "neutrophil_like": _CellType(_neutrophil, 6.5, 10, (3, 6), "scatter", (1, 2)),
    "spindle_like": _CellType(_spindle, 4.0, 17, (4, 9), "aligned", (1, 3)),
    "epithelial_cluster_like": _CellType(_epithelial, 5.5, 9, (1, 1), "cluster", (1, 3)),
    "giant_cell_like": _CellType(_giant, 19.0, 27, (1, 1), "scatter", (1, 1)),
    "signet_ring_like": _CellType(_signet, 8.5, 12, (3, 5), "scatter", (1, 2)),
    "plasma_cell_like": _CellType(_plasma, 6.0, 9, (3, 5), "scatter", (1, 2)),
    "macrophage_like": _CellType(_macrophage, 11.0, 17, (2, 2), "scatter", (1, 1)),
    "generic": _CellType(_generic, 5.5, 8, (0, 1), "scatter", (0, 0)),
    "red_blood_cell": _CellType(_red_blood_cell, 3.5, 5, (0, 1), "scatter", (0, 0)),
}
_ALIASES = {"t_cell_like": "lymphocyte_like", "fibroblast_like": "spindle_like"}


# ---------------------------------------------------------------------------------------------
# Layout: where cells go.

class _Canvas:
    """Nucleus, cytoplasm and cell-footprint density maps of one field of view, plus the centres
    and spacing radii of the cells drawn so far (to keep scattered cells from piling up)."""

    def __init__(self, size):
        self.size = size
        self.k = size / REFERENCE_SIZE
        self.edge = max(0.6 * self.k, 0.35)
        self.maps = np.zeros((3, size, size))
        self.centres = np.empty((0, 2))
        self.radii = np.empty(0)
        self.grid = np.arange(size, dtype=np.float64)

    def is_free(self, p, r, overlap=0.85):
        d = np.hypot(*(self.centres - p).T)
        return bool(np.all(d > (self.radii + r) * overlap))

    def stamp(self, rng, render, p, half, theta):
        """Draw one cell centred at p (pixels), rotated by theta, in a patch of half-width half."""
        x0, x1 = max(int(p[0] - half), 0), min(int(p[0] + half) + 2, self.size)
        y0, y1 = max(int(p[1] - half), 0), min(int(p[1] + half) + 2, self.size)
        if x0 >= x1 or y0 >= y1:
            return
        dx = self.grid[None, x0:x1] - p[0]
        dy = self.grid[y0:y1, None] - p[1]
        c, s = np.cos(theta), np.sin(theta)
        for layer, density in zip(self.maps, render(rng, self.k, dx * c + dy * s, -dx * s + dy * c, self.edge)):
            np.maximum(layer[y0:y1, x0:x1], density, out=layer[y0:y1, x0:x1])

    def add(self, p, r):
        self.centres = np.vstack([self.centres, p])
        self.radii = np.append(self.radii, r)


def _scatter_points(rng, canvas, n, r, tries=15):
    """Up to n uniformly scattered centres that keep their distance from the cells already placed."""
    points = []
    for p in rng.uniform(0, canvas.size, (n * tries, 2)):
        if len(points) == n:
            break
        if canvas.is_free(p, r):
            canvas.add(p, r)
            points.append(p)
    return points


def _cluster_points(rng, canvas, n_clusters, r, phi):
    """Centres of cells packed on a jittered hexagonal lattice inside a few blob-shaped clusters."""
    spacing = 1.75 * r
    rows = np.arange(-4, 5)
    gx, gy = np.meshgrid(rows, rows)
    lattice = np.stack([(gx + 0.5 * (gy % 2)) * spacing, gy * spacing * np.sqrt(3) / 2], -1).reshape(-1, 2)
    points = []
    for _ in range(n_clusters):
        for _attempt in range(10):
            centre = rng.uniform(0.15, 0.85, 2) * canvas.size
            radius = rng.uniform(1.2, 2.2) * spacing
            if canvas.is_free(centre, radius, overlap=0.7):
                break
        stretch, turn = rng.uniform(0.0, 0.35), phi + rng.uniform(0, np.pi)
        angle = np.arctan2(lattice[:, 1], lattice[:, 0])
        inside = np.hypot(*lattice.T) < radius * (1 + stretch * np.cos(2 * (angle - turn)))
        inside &= rng.random(len(lattice)) > 0.12
        c, s = np.cos(phi), np.sin(phi)
        rotated = lattice[inside] @ np.array([[c, s], [-s, c]])
        cluster = centre + rotated + rng.normal(0, 0.15 * spacing, rotated.shape)
        canvas.add(centre, radius)
        points.extend(cluster)
    return points


# ---------------------------------------------------------------------------------------------
# Nuisances: stroma, stain colours, illumination, blur, noise.

def _smooth_noise(rng, size, cells):
    """Smooth random field in [0, 1]: a cells x cells grid of uniform values, bicubically upsampled."""
    low = Image.fromarray(rng.random((cells, cells)).astype(np.float32))
    return np.clip(np.asarray(low.resize((size, size), Image.BICUBIC), dtype=np.float64), 0.0, 1.0)


def _stroma(rng, size, k):
    """Eosin density of a background of wavy collagen fibre bundles, present in patches.

    Fibres are random values on a grid that is long along the fibre direction and fine across it,
    bilinearly interpolated at bent, rotated pixel coordinates."""
    y, x = np.mgrid[0:size, 0:size] / k
    beta = rng.uniform(0, 2 * np.pi)
    u = x * np.cos(beta) + y * np.sin(beta)
    v = -x * np.sin(beta) + y * np.cos(beta)
    v = v + rng.uniform(1.0, 4.0) * np.sin(2 * np.pi * u / rng.uniform(25, 60) + rng.uniform(0, 2 * np.pi))
    v = v + _smooth_noise(rng, size, 4) * rng.uniform(2.0, 8.0)
    gu, gv = (u - u.min()) / rng.uniform(10.0, 20.0), (v - v.min()) / rng.uniform(2.0, 3.5)
    i, j = gv.astype(int), gu.astype(int)
    fv, fu = gv - i, gu - j
    grid = rng.random((i.max() + 2, j.max() + 2))
    value = ((grid[i, j] * (1 - fu) + grid[i, j + 1] * fu) * (1 - fv)
             + (grid[i + 1, j] * (1 - fu) + grid[i + 1, j + 1] * fu) * fv)
    fibres = np.clip(2.5 * (value - 0.4), 0.0, 1.0)
    patches = np.clip(2.0 * (_smooth_noise(rng, size, 5) - 0.25), 0.0, 1.0)
    return rng.uniform(*STROMA_STRENGTH) * (0.15 + 0.85 * fibres) * (0.3 + 0.7 * patches)


def _stain_vector(rng, base, spread):
    """Stain optical-density direction with a random hue/saturation shift."""
    v = np.abs(base + rng.normal(0, spread, 3))
    return v / np.linalg.norm(v)


def _to_rgb(rng, nucleus, eosin, size):
    """Beer-Lambert stain model with random stain colours and strengths and a tinted background."""
    h = _stain_vector(rng, _HAEMATOXYLIN, 0.12) * rng.uniform(1.1, 2.0)
    e = _stain_vector(rng, _EOSIN, 0.15) * rng.uniform(0.6, 1.3)
    background = rng.uniform(0.0, 0.08) + np.abs(rng.normal(0, 0.04, 3))
    od = nucleus[..., None] * h + eosin[..., None] * e + background
    rgb = np.exp(-od)
    yy, xx = (np.mgrid[0:size, 0:size] / size) - 0.5
    tilt = rng.uniform(0, 2 * np.pi)
    gradient = 1.0 + rng.uniform(0.0, 0.35) * (xx * np.cos(tilt) + yy * np.sin(tilt))
    vignette = 1.0 - rng.uniform(0.0, 0.5) * (xx ** 2 + yy ** 2)
    return rgb * (rng.uniform(0.85, 1.0) * gradient * vignette)[..., None]


def render_image(rng: np.random.Generator, size: int, cell_types, minor_types=()) -> np.ndarray:
    """One field of view (uint8, size x size x 3) holding the given cell types plus distractors.

    `cell_types` are names from SINGLE_LABEL_CLASSES or MULTI_LABEL_CLASSES; with several types
    each is drawn at a lower count so the field does not get crowded. `minor_types` add a few
    scattered cells of other types, as in real tissue where one cell type dominates a region."""
    canvas = _Canvas(size)
    k = canvas.k
    phi = rng.uniform(0, 2 * np.pi)  # global rotation of the whole pattern
    crowding = rng.uniform(0.7, 1.2) / np.sqrt(len(cell_types))
    plan = []  # (cell type, number of cells or clusters, arrangement)
    for name in cell_types:
        kind = _CELL_TYPES[_ALIASES.get(name, name)]
        n = round(rng.integers(kind.count[0], kind.count[1] + 1) * crowding)
        plan.append((kind, max(n, 1 if kind.arrangement == "cluster" else 2), kind.arrangement))
    for name in minor_types:
        kind = _CELL_TYPES[_ALIASES.get(name, name)]
        n = rng.integers(kind.minor_count[0], kind.minor_count[1] + 1)
        plan.append((kind, n, "scatter" if kind.arrangement == "cluster" else kind.arrangement))
    for kind in (_CELL_TYPES["generic"], _CELL_TYPES["red_blood_cell"]):
        plan.append((kind, rng.integers(kind.count[0], kind.count[1] + 1), kind.arrangement))

    # Large cells first, so smaller ones fill the space around them.
    for kind, n, arrangement in sorted(plan, key=lambda item: -item[0].spacing):
        if arrangement == "cluster":
            points = _cluster_points(rng, canvas, n, kind.spacing * k, phi)
        else:
            points = _scatter_points(rng, canvas, n, kind.spacing * k)
        for p in points:
            theta = phi + (rng.normal(0, 0.12) if arrangement == "aligned" else rng.uniform(0, 2 * np.pi))
            canvas.stamp(rng, kind.render, p, kind.half * k, theta)

    nucleus, cytoplasm, footprint = canvas.maps
    chromatin = 0.85 + 0.3 * rng.random((size, size))
    eosin = cytoplasm * (1.0 - 0.6 * nucleus) + _stroma(rng, size, k) * (1.0 - footprint)
    rgb = _to_rgb(rng, nucleus * chromatin, eosin, size)
    image = Image.fromarray(np.clip(rgb * 255.0, 0, 255).astype(np.uint8))
    image = image.filter(ImageFilter.GaussianBlur(rng.uniform(*BLUR_SIGMA) * k))
    noisy = np.asarray(image, dtype=np.float64) + rng.normal(0, rng.uniform(1.0, 6.0), (size, size, 3))
    return np.clip(np.round(noisy), 0, 255).astype(np.uint8)
