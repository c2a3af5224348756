"""Draws the example data set: three 512x512 pictures of a big-eared brown character, in the
three scenes of the reference captions. Procedural (PIL only), so the images are ours to ship.

    python3 data/make_example.py        # rewrites data/cheburashka/*.png and *.txt
"""
import math
import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

OUT = Path(__file__).parent / "cheburashka"
S = 1024  # drawn at 2x, downsampled to 512 for smooth edges
CAPTIONS = {
    "playroom": "<cheburashka>, close-up portrait, huge round furry ears, soft brown and beige fur, standing in a cozy kids playroom, blue walls with glowing stars, colorful space-themed drawings on the easel and walls",
    "stage": "<cheburashka>, full body, waving hand, friendly smile, big expressive eyes, standing on light stone pavement, wooden stage behind, several folded wooden director-style chairs with dark fabric seats and backs",
    "winter": "<cheburashka>, full body, holding a bright orange with both paws, standing in snowy winter city square, wide staircase with railings behind, decorative street lamps and monumental sculptures in the distance, frosty trees and icy patterns in the cold blue background",
}
BROWN, DARK, BEIGE = (122, 78, 44), (84, 52, 28), (222, 190, 150)


def ellipse(d, cx, cy, rx, ry, fill, outline=None, width=0):
    d.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=fill, outline=outline, width=width)


def furry(d, cx, cy, r, color, rng, tufts=90):
    """A disc with short strokes around its rim, so it reads as fur."""
    ellipse(d, cx, cy, r, r, color)
    for _ in range(tufts):
        a = rng.uniform(0, 2 * math.pi)
        r0, r1 = r * 0.9, r * rng.uniform(1.02, 1.09)
        d.line([cx + r0 * math.cos(a), cy + r0 * math.sin(a), cx + r1 * math.cos(a), cy + r1 * math.sin(a)], fill=color, width=6)


def character(d, cx, cy, scale, rng, pose="stand", full_body=True):
    """Head centred at (cx, cy) with radius 140·scale; body below when full_body."""
    r = 140 * scale
    if full_body:
        # body, legs, feet
        ellipse(d, cx, cy + 1.75 * r, 0.8 * r, 0.95 * r, BROWN)
        ellipse(d, cx, cy + 1.85 * r, 0.5 * r, 0.62 * r, BEIGE)
        for sx in (-1, 1):
            ellipse(d, cx + sx * 0.38 * r, cy + 2.75 * r, 0.28 * r, 0.16 * r, DARK)
        # arms
        if pose == "wave":
            d.line([cx + 0.7 * r, cy + 1.4 * r, cx + 1.35 * r, cy + 0.55 * r], fill=BROWN, width=int(0.28 * r))
            ellipse(d, cx + 1.38 * r, cy + 0.5 * r, 0.2 * r, 0.2 * r, BROWN)
            d.line([cx - 0.7 * r, cy + 1.4 * r, cx - 1.0 * r, cy + 2.1 * r], fill=BROWN, width=int(0.28 * r))
        elif pose == "orange":
            ellipse(d, cx, cy + 1.45 * r, 0.36 * r, 0.36 * r, (255, 140, 20))
            ellipse(d, cx - 0.1 * r, cy + 1.33 * r, 0.08 * r, 0.06 * r, (255, 200, 120))
            d.line([cx, cy + 1.09 * r, cx + 0.05 * r, cy + 1.0 * r], fill=(60, 120, 40), width=8)
            for sx in (-1, 1):
                d.line([cx + sx * 0.7 * r, cy + 1.3 * r, cx + sx * 0.33 * r, cy + 1.5 * r], fill=BROWN, width=int(0.26 * r))
                ellipse(d, cx + sx * 0.33 * r, cy + 1.5 * r, 0.14 * r, 0.14 * r, BROWN)
    # ears: huge, round, beige inside
    for sx in (-1, 1):
        ex, ey = cx + sx * 1.2 * r, cy - 0.35 * r
        furry(d, ex, ey, 0.95 * r, BROWN, rng)
        ellipse(d, ex, ey, 0.68 * r, 0.68 * r, BEIGE)
    furry(d, cx, cy, r, BROWN, rng)
    ellipse(d, cx, cy + 0.2 * r, 0.72 * r, 0.66 * r, BEIGE)  # face
    for sx in (-1, 1):  # big eyes
        ellipse(d, cx + sx * 0.3 * r, cy - 0.02 * r, 0.2 * r, 0.24 * r, (255, 255, 255), outline=DARK, width=4)
        ellipse(d, cx + sx * 0.27 * r, cy + 0.02 * r, 0.1 * r, 0.13 * r, (30, 20, 15))
        ellipse(d, cx + sx * 0.24 * r, cy - 0.04 * r, 0.035 * r, 0.035 * r, (255, 255, 255))
    ellipse(d, cx, cy + 0.28 * r, 0.1 * r, 0.07 * r, (45, 28, 20))  # nose
    d.arc([cx - 0.3 * r, cy + 0.15 * r, cx + 0.3 * r, cy + 0.58 * r], 20, 160, fill=(90, 40, 30), width=6)  # smile


def star(d, cx, cy, r, fill):
    pts = []
    for i in range(10):
        a = -math.pi / 2 + i * math.pi / 5
        rr = r if i % 2 == 0 else r * 0.45
        pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
    d.polygon(pts, fill=fill)


def playroom(rng):
    img = Image.new("RGB", (S, S), (52, 86, 170))
    d = ImageDraw.Draw(img)
    for _ in range(40):
        star(d, rng.uniform(0, S), rng.uniform(0, 0.7 * S), rng.uniform(10, 28), (255, 240, 150))
    d.rectangle([0, 0.78 * S, S, S], fill=(196, 150, 100))  # floor
    # easel with a space drawing: rocket and planet
    d.polygon([(0.72 * S, 0.8 * S), (0.8 * S, 0.3 * S), (0.88 * S, 0.8 * S)], outline=(110, 70, 40), width=10)
    d.rectangle([0.66 * S, 0.32 * S, 0.95 * S, 0.58 * S], fill=(250, 250, 245), outline=(110, 70, 40), width=6)
    ellipse(d, 0.74 * S, 0.42 * S, 40, 40, (230, 90, 60))
    d.polygon([(0.84 * S, 0.36 * S), (0.87 * S, 0.5 * S), (0.81 * S, 0.5 * S)], fill=(120, 120, 220))
    # drawings pinned on the wall
    for x, col in ((0.06, (240, 200, 60)), (0.2, (120, 220, 140))):
        d.rectangle([x * S, 0.12 * S, (x + 0.11) * S, 0.27 * S], fill=(250, 250, 240))
        ellipse(d, (x + 0.055) * S, 0.195 * S, 30, 30, col)
    character(d, 0.45 * S, 0.52 * S, 2.0, rng, full_body=False)  # close-up portrait
    return img


def stage(rng):
    img = Image.new("RGB", (S, S), (170, 200, 230))
    d = ImageDraw.Draw(img)
    d.rectangle([0, 0.25 * S, S, 0.62 * S], fill=(150, 100, 60))  # wooden stage
    for x in range(0, S, 64):
        d.line([x, 0.25 * S, x, 0.62 * S], fill=(120, 80, 45), width=4)
    for i in range(4):  # folded director chairs
        x = 0.08 * S + i * 0.12 * S
        d.line([x, 0.4 * S, x + 40, 0.6 * S], fill=(190, 140, 80), width=8)
        d.line([x + 40, 0.4 * S, x, 0.6 * S], fill=(190, 140, 80), width=8)
        d.rectangle([x - 6, 0.36 * S, x + 46, 0.42 * S], fill=(40, 35, 40))
    d.rectangle([0, 0.62 * S, S, S], fill=(215, 210, 195))  # light stone pavement
    for y in range(int(0.62 * S), S, 56):
        d.line([0, y, S, y], fill=(185, 180, 165), width=3)
        off = rng.randint(0, 80)
        for x in range(off, S, 120):
            d.line([x, y, x, y + 56], fill=(185, 180, 165), width=3)
    character(d, 0.62 * S, 0.3 * S, 0.95, rng, pose="wave")
    return img


def winter(rng):
    img = Image.new("RGB", (S, S), (120, 160, 210))
    d = ImageDraw.Draw(img)
    d.rectangle([0.2 * S, 0.3 * S, 0.8 * S, 0.55 * S], fill=(200, 205, 215))  # wide staircase
    for i in range(8):
        y = 0.3 * S + i * 0.03 * S
        d.line([0.2 * S, y, 0.8 * S, y], fill=(150, 160, 175), width=5)
    for x in (0.2, 0.8):  # railings
        d.line([x * S, 0.28 * S, x * S, 0.56 * S], fill=(60, 60, 70), width=8)
    for x in (0.08, 0.92):  # street lamps
        d.line([x * S, 0.2 * S, x * S, 0.62 * S], fill=(40, 40, 50), width=10)
        ellipse(d, x * S, 0.19 * S, 26, 26, (255, 230, 160))
    for x in (0.32, 0.68):  # monumental sculptures in the distance
        d.rectangle([x * S - 30, 0.14 * S, x * S + 30, 0.3 * S], fill=(110, 115, 130))
        ellipse(d, x * S, 0.12 * S, 26, 30, (110, 115, 130))
    for x in (0.03, 0.97):  # frosty trees
        d.polygon([(x * S, 0.05 * S), (x * S - 70, 0.4 * S), (x * S + 70, 0.4 * S)], fill=(210, 230, 240))
    d.rectangle([0, 0.62 * S, S, S], fill=(240, 245, 250))  # snow
    for _ in range(260):  # falling snow
        x, y = rng.uniform(0, S), rng.uniform(0, S)
        ellipse(d, x, y, 4, 4, (255, 255, 255))
    character(d, 0.5 * S, 0.33 * S, 0.95, rng, pose="orange")
    return img


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    for i, (name, draw) in enumerate((("playroom", playroom), ("stage", stage), ("winter", winter))):
        img = draw(random.Random(i)).filter(ImageFilter.GaussianBlur(1.2)).resize((512, 512), Image.LANCZOS)
        img.save(OUT / f"{name}.png", optimize=True)
        (OUT / f"{name}.txt").write_text(CAPTIONS[name] + "\n")


if __name__ == "__main__":
    main()
