"""The synthetic data set: drawn people seen through cameras that differ in colour cast, background, blur and
viewpoint, with pose jitter and occlusion, written in the Market-1501 layout (python data.py synthesize DIR); and
synthetic embeddings of a Market-like evaluation problem (synthetic_problem: bench.py's stages, the tests)."""
import os

import numpy as np
import torch
from PIL import Image, ImageFilter

from support.utils import DataError, folder_listing

MARKET_FOLDERS = ("bounding_box_train", "query", "bounding_box_test")  # the layout data.read_market_style reads
CLOTHES = np.array([[0.85, 0.12, 0.12], [0.12, 0.35, 0.80], [0.15, 0.60, 0.20], [0.92, 0.85, 0.20],
                    [0.92, 0.92, 0.90], [0.10, 0.10, 0.12], [0.55, 0.55, 0.58], [0.90, 0.50, 0.10],
                    [0.50, 0.20, 0.60], [0.45, 0.30, 0.15], [0.10, 0.65, 0.70], [0.95, 0.60, 0.70]])
SKIN = np.array([[0.96, 0.80, 0.69], [0.87, 0.67, 0.52], [0.68, 0.47, 0.33], [0.40, 0.27, 0.18]])
HAIR = np.array([[0.08, 0.06, 0.05], [0.30, 0.18, 0.08], [0.75, 0.60, 0.30], [0.55, 0.55, 0.55]])
VIEWS = ("front", "back", "side")
BACKGROUND_JITTER = 0.15
BODY_WIDTH = 1.5
BG_CONTRAST = (0.3, 1.0)
JUNK_SHARE = 0.05         # junk images (pid -1) per image of train and gallery
DISTRACTOR_SHARE = 0.1    # distractors (pid 0) per gallery image
JPEG_QUALITY = 90
PROBLEM_DISTRACTOR_SHARE = 0.18  # synthetic_problem: distractors (pid 0) per gallery embedding, as in Market-1501


def _colour(rng, palette=CLOTHES):
    """A palette colour with a little jitter: identities share colours, as real clothes do."""
    return np.clip(palette[rng.integers(len(palette))] + rng.normal(0, 0.05, 3), 0, 1)


def draw_identity(rng):
    """The appearance of one synthetic person."""
    return dict(skin=_colour(rng, SKIN), hair=_colour(rng, HAIR), long_hair=rng.random() < 0.3,
                top=_colour(rng), top2=_colour(rng), pattern=int(rng.integers(4)),
                long_sleeves=rng.random() < 0.5, bottom=_colour(rng), shorts=rng.random() < 0.25,
                shoes=_colour(rng), bag=rng.random() < 0.4, bag_colour=_colour(rng),
                height=rng.uniform(0.78, 0.92), width=rng.uniform(0.85, 1.15))


def draw_camera(rng):
    """A camera: colour cast, gamma, background texture, blur, squeeze/shear and preferred views."""
    return dict(gain=rng.uniform(0.8, 1.2, 3), gamma=rng.uniform(0.85, 1.2), bg1=rng.uniform(0.15, 0.85, 3),
                bg2=rng.uniform(0.15, 0.85, 3), floor=rng.uniform(0.2, 0.7, 3), texture=int(rng.integers(3)),
                freq=rng.uniform(2, 7), floor_y=rng.uniform(0.72, 0.9), blur=rng.uniform(0.0, 1.3),
                squeeze=rng.uniform(0.8, 1.0), shear=rng.uniform(-0.12, 0.12),
                views=rng.dirichlet(np.full(3, 0.6)))


def _background(rng, camera, yy, xx):
    """The camera's scene, seen from a slightly different place each time: a textured wall, a
    floor and a clutter patch, in the camera's colours with per-image variation. [h, w, 3]"""
    phase, freq = rng.uniform(0, 2 * np.pi), camera["freq"] * rng.uniform(0.7, 1.4)
    if camera["texture"] == 0:
        wave = np.sin(2 * np.pi * freq * yy + phase)
    elif camera["texture"] == 1:
        wave = np.sin(4 * np.pi * freq * xx + phase)
    else:
        wave = np.sign(np.sin(2 * np.pi * freq * yy + phase) * np.sin(4 * np.pi * freq * xx))
    mix = (wave[..., None] * rng.uniform(*BG_CONTRAST) + 1) / 2
    bg1, bg2 = (np.clip(camera[k] + rng.normal(0, BACKGROUND_JITTER, 3), 0, 1) for k in ("bg1", "bg2"))
    image = mix * bg1 + (1 - mix) * bg2
    cx, cy = rng.uniform(-0.3, 0.3), rng.uniform(0, 0.7)
    clutter = (np.abs(xx - cx) < rng.uniform(0.05, 0.2)) & (np.abs(yy - cy) < rng.uniform(0.05, 0.3))
    image = np.where(clutter[..., None], rng.uniform(0, 1, 3), image)
    floor = yy[..., None] > camera["floor_y"] + rng.normal(0, 0.03)
    return np.where(floor, camera["floor"] * (0.8 + 0.4 * yy[..., None]), image)


def _person_masks(person, view, t, s, swing, spread):
    """(mask, colour) layers of a person, back to front; t: 0 (top of head) .. 1 (feet), s: across."""
    width = 0.65 if view == "side" else 1.0
    s = s / width
    torso = (t > 0.15) & (t < 0.52) & (np.abs(s) < 0.10)
    top = np.where(((person["pattern"] == 1) & (((t - 0.15) // 0.05) % 2 == 1))[..., None]
                   | ((person["pattern"] == 2) & (s > 0))[..., None]
                   | ((person["pattern"] == 3) & (view == "front") & (t > 0.22) & (t < 0.32)
                      & (np.abs(s) < 0.045))[..., None], person["top2"], person["top"])
    arm_s = np.abs(np.abs(s) - 0.125 - swing * (t - 0.15)) if view != "side" else np.abs(s - swing * (t - 0.15))
    arms = (t > 0.16) & (t < 0.5) & (arm_s < 0.028)
    leg_s = np.minimum(np.abs(s - 0.045 - spread * (t - 0.52)), np.abs(s + 0.045 + spread * (t - 0.52)))
    legs = (t > 0.5) & (t < 0.95) & (leg_s < 0.04)
    head = ((t - 0.075) / 0.07) ** 2 + (s / 0.055) ** 2 < 1
    hair_long = (person["long_hair"] & (t > 0.01) & (t < 0.24) & (np.abs(s) < 0.065)
                 & ((view != "front") | (np.abs(s) > 0.04)))  # seen from the front: only beside the face
    hair = (head & ((t < 0.045) | (view == "back"))) | hair_long
    layers = [
        (legs, np.where(((t > 0.7) & person["shorts"])[..., None], person["skin"], person["bottom"])),
        ((t >= 0.95) & (t < 1.0) & (leg_s < 0.05), person["shoes"]),
        (torso, top),
        (arms, np.where(((t < 0.27) | ((t < 0.46) & person["long_sleeves"]))[..., None], person["top"],
                        person["skin"])),
        ((t > 0.13) & (t < 0.16) & (np.abs(s) < 0.022), person["skin"]),
        (head, person["skin"]),
        (hair, person["hair"]),
    ]
    if person["bag"]:
        bag = {"back": (t > 0.18) & (t < 0.45) & (np.abs(s) < 0.085),
               "side": (t > 0.18) & (t < 0.45) & (s > -0.17) & (s < -0.09),
               "front": (t > 0.15) & (t < 0.36) & (np.abs(np.abs(s) - 0.06) < 0.013)}[view]
        layers.append((bag, person["bag_colour"]))
    return layers


def render_image(rng, person, camera, size, fragment=False):
    """One image of `person` through `camera` (None: background only): uint8 [h, w, 3]."""
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    yy, xx = (yy + 0.5) / h, (xx + 0.5 - w / 2) / h  # both in units of the image height
    image = _background(rng, camera, yy, xx)
    if person is not None:
        height = person["height"] * rng.uniform(0.93, 1.05) * (rng.uniform(1.3, 2.2) if fragment else 1)
        top = (1 - height) / 2 + rng.normal(0, 0.02) + (rng.uniform(-0.5, 0.3) if fragment else 0)
        t = (yy - top) / height
        flip = 1 if rng.random() < 0.5 else -1
        s = flip * (xx - rng.normal(0, 0.03)) / (height * person["width"] * camera["squeeze"] * BODY_WIDTH)
        s = s + camera["shear"] * (t - 0.5)
        view = VIEWS[rng.choice(3, p=camera["views"])]
        shade = 1 - 0.35 * np.clip(np.abs(s) / 0.13, 0, 1)[..., None] ** 2
        for mask, colour in _person_masks(person, view, t, s, rng.normal(0, 0.15), rng.uniform(0, 0.15)):
            image = np.where(mask[..., None], colour * shade, image)
    if rng.random() < 0.3:  # an occluder entering from the bottom or a side
        occluder = (yy > rng.uniform(0.6, 0.85)) if rng.random() < 0.5 else \
            (np.abs(xx - rng.choice([-0.25, 0.25])) < rng.uniform(0.05, 0.15) * w / h * 2)
        stripes = (np.sin(yy * rng.uniform(10, 40)) > 0)[..., None]
        image = np.where(occluder[..., None], np.where(stripes, _colour(rng), _colour(rng)), image)
    image = np.clip(image * rng.uniform(0.85, 1.15), 0, 1) ** camera["gamma"] * camera["gain"]
    image = image + rng.normal(0, 0.02, image.shape)
    pil = Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8))
    return pil.filter(ImageFilter.GaussianBlur(camera["blur"] * h / 128)) if camera["blur"] > 0.2 else pil


def _identity_images(rng, images_per_id, num_cameras):
    """Cameras of one identity's images: >= 2 cameras, each seen at least once. [n]"""
    n = int(rng.integers(max(2, images_per_id // 2), images_per_id * 3 // 2 + 1))
    cams = rng.choice(num_cameras, size=int(rng.integers(2, num_cameras + 1)), replace=False)
    return np.concatenate([cams, rng.choice(cams, size=max(0, n - len(cams)))])


def _split_query(rng, cams):
    """Query image positions of a test identity: one from each camera with >= 2 images (>= 1 query)."""
    queries = [int(rng.choice(np.flatnonzero(cams == c))) for c in np.unique(cams) if (cams == c).sum() >= 2]
    return queries or [0]


def synthesize(out, ids=120, images_per_id=16, cameras=6, size=(128, 64), seed=0, progress=True):
    """Write a synthetic data set in the Market-1501 layout; returns the image count per folder.

    Half of `ids` identities (pids 1..) train, the other half are query/gallery. Junk (pid -1,
    JUNK_SHARE x images in train and gallery) are fragments of unseen people; distractors (pid 0,
    DISTRACTOR_SHARE x gallery images) are empty scenes or fragments."""
    from tqdm import tqdm
    if ids < 4 or images_per_id < 2 or cameras < 2:
        raise DataError(f"synthesize needs --ids >= 4, --images-per-id >= 2, --cameras >= 2 "
                        f"(got {ids}, {images_per_id}, {cameras})")
    if os.path.isdir(out) and os.listdir(out):
        raise DataError(f"{out} already holds files ({folder_listing(out)}): give a new folder or delete it")
    cams = [draw_camera(np.random.default_rng([seed, 1, c])) for c in range(cameras)]
    plan = []  # (folder, pid, camera, person, fragment)
    num_train = ids // 2
    for pid in range(1, ids + 1):
        rng = np.random.default_rng([seed, 2, pid])
        person, image_cams = draw_identity(rng), _identity_images(rng, images_per_id, cameras)
        queries = set() if pid <= num_train else set(_split_query(rng, image_cams))
        for i, c in enumerate(image_cams):
            folder = "bounding_box_train" if pid <= num_train else "query" if i in queries else "bounding_box_test"
            plan.append((folder, pid, int(c), person, False))
    rng = np.random.default_rng([seed, 3])
    counts = {sub: sum(p[0] == sub for p in plan) for sub in MARKET_FOLDERS}
    for folder in ("bounding_box_train", "bounding_box_test"):
        plan += [(folder, -1, int(rng.integers(cameras)), draw_identity(rng), True)
                 for _ in range(round(JUNK_SHARE * counts[folder]))]
    plan += [("bounding_box_test", 0, int(rng.integers(cameras)),  # empty scenes or fragments
              draw_identity(rng) if rng.random() < 0.5 else None, True)
             for _ in range(round(DISTRACTOR_SHARE * counts["bounding_box_test"]))]
    for sub in MARKET_FOLDERS:
        os.makedirs(os.path.join(out, sub), exist_ok=True)
    for frame, (folder, pid, c, person, fragment) in enumerate(tqdm(plan, "synthesize", disable=not progress)):
        image = render_image(np.random.default_rng([seed, 4, frame]), person, cams[c], size, fragment)
        name = f"{pid:04d}_c{c + 1}s1_{frame:06d}_00.jpg" if pid >= 0 else f"-1_c{c + 1}s1_{frame:06d}_00.jpg"
        image.save(os.path.join(out, folder, name), quality=JPEG_QUALITY)
    return {sub: sum(p[0] == sub for p in plan) for sub in MARKET_FOLDERS}




def synthetic_problem(num_query, num_gallery, num_ids, num_cams, dim=64, noise=0.95, device="cpu", seed=0):
    """Random but Market-like embeddings: identity centre + camera bias + noise; 18% pid-0 distractors.

    Returns (q_feats, q_pids, q_camids, g_feats, g_pids, g_camids), feats L2-normalised on device,
    ids/camids int64 CPU tensors. The default noise gives R1 ~97% and mAP ~84%, like a trained model.
    """
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_ids + 1, dim, generator=gen)
    cam_bias = 0.3 * torch.randn(num_cams, dim, generator=gen)  # same-camera images look alike
    q_pids = torch.randint(1, num_ids + 1, (num_query,), generator=gen)
    g_pids = torch.randint(1, num_ids + 1, (num_gallery,), generator=gen)
    g_pids[torch.rand(num_gallery, generator=gen) < PROBLEM_DISTRACTOR_SHARE] = 0
    q_camids = torch.randint(0, num_cams, (num_query,), generator=gen)
    g_camids = torch.randint(0, num_cams, (num_gallery,), generator=gen)

    def embed(pids, camids):
        distractor = (pids == 0)[:, None]  # each distractor is a person of its own
        own = torch.where(distractor, torch.randn(len(pids), dim, generator=gen), centres[pids])
        feats = own + cam_bias[camids] + noise * torch.randn(len(pids), dim, generator=gen)
        return torch.nn.functional.normalize(feats, dim=1).to(device)
    return embed(q_pids, q_camids), q_pids, q_camids, embed(g_pids, g_camids), g_pids, g_camids
