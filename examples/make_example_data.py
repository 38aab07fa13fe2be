#!/usr/bin/env python3
"""Regenerate the small MiniCPM-V example dataset in examples/data/.

    python examples/make_example_data.py

Draws 10 synthetic but realistic-looking JPEG images with Pillow (no other
dependencies, fully seeded, runs in a few seconds) and writes train.json /
eval.json in the MiniCPM-V fine-tuning format.  Every answer in the
conversations is derived from what the drawing code actually drew (receipt
total, clock time, book counts, chart values, ...).
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

from PIL import Image, ImageChops, ImageDraw, ImageFilter, ImageFont

ROOT = Path(__file__).resolve().parent / "data"
IMG_DIR = ROOT / "images"
JPEG_QUALITY = 85
SEED = 1234


def font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def lerp(a, b, t):
    return tuple(int(round(x + (y - x) * t)) for x, y in zip(a, b))


def vgradient(img: Image.Image, box, top, bottom):
    """Vertical colour gradient inside box=(x0, y0, x1, y1)."""
    d = ImageDraw.Draw(img)
    x0, y0, x1, y1 = box
    h = max(1, y1 - y0)
    for y in range(y0, y1):
        d.line([(x0, y), (x1 - 1, y)], fill=lerp(top, bottom, (y - y0) / h))


def text_center(d, xy, s, f, fill):
    d.text(xy, s, font=f, fill=fill, anchor="mm")


def cloud(d, cx, cy, scale, fill=(255, 255, 255)):
    for dx, dy, r in [(-1.0, 0.2, 0.7), (0, -0.2, 0.9), (1.0, 0.15, 0.7), (0.45, 0.35, 0.6), (-0.5, 0.35, 0.6)]:
        x, y, rr = cx + dx * scale, cy + dy * scale, r * scale
        d.ellipse([x - rr, y - rr * 0.75, x + rr, y + rr * 0.75], fill=fill)


def save(img: Image.Image, name: str, facts: dict) -> dict:
    path = IMG_DIR / f"{name}.jpg"
    img.convert("RGB").save(path, "JPEG", quality=JPEG_QUALITY, optimize=True)
    facts.update(path=f"images/{name}.jpg", size=img.size)
    return facts


# --------------------------------------------------------------------------
# images
# --------------------------------------------------------------------------


def mountain_range(rng, w, base, peak_min, peak_max, n):
    """Polygon of a mountain range: n peaks spread across the width, rugged slopes."""
    step = w / n
    key = [(0, base - rng.uniform(0.2, 0.5) * (base - peak_max))]
    peaks = []
    for i in range(n):
        x = (i + 0.5) * step + rng.uniform(-0.25, 0.25) * step
        y = rng.uniform(peak_min, peak_max)
        peaks.append((x, y))
        key.append((x, y))
        if i + 1 < n:
            key.append((x + step * rng.uniform(0.4, 0.6), y + rng.uniform(0.3, 0.55) * (base - y)))
    key.append((w, base - rng.uniform(0.2, 0.5) * (base - peak_max)))
    pts = [(0, base)]
    for (x0, y0), (x1, y1) in zip(key, key[1:]):
        pts.append((x0, y0))
        for k in range(1, 5):  # rugged slopes
            t = k / 5
            pts.append((x0 + (x1 - x0) * t, y0 + (y1 - y0) * t + rng.uniform(-9, 9)))
    pts += [key[-1], (w, base)]
    return pts, peaks


def draw_landscape():
    rng = random.Random(SEED + 1)
    w, h = 1344, 896
    horizon = 540
    img = Image.new("RGB", (w, h))
    vgradient(img, (0, 0, w, horizon), (38, 84, 160), (250, 196, 140))
    d = ImageDraw.Draw(img)
    sun = (1000, 250)
    glow = Image.new("L", (w, h), 0)
    ImageDraw.Draw(glow).ellipse([sun[0] - 150, sun[1] - 150, sun[0] + 150, sun[1] + 150], fill=140)
    glow = glow.filter(ImageFilter.GaussianBlur(60))
    img.paste((255, 230, 170), mask=glow)
    d.ellipse([sun[0] - 62, sun[1] - 62, sun[0] + 62, sun[1] + 62], fill=(255, 236, 150))
    for cx, cy, s in [(230, 130, 55), (560, 90, 40), (1180, 160, 45)]:
        cloud(d, cx, cy, s, fill=(250, 244, 238))

    scene = Image.new("RGBA", (w, horizon), (0, 0, 0, 0))
    sd = ImageDraw.Draw(scene)
    far, peaks = mountain_range(rng, w, horizon, 170, 270, 6)
    far_mask = Image.new("L", (w, horizon), 0)
    ImageDraw.Draw(far_mask).polygon(far, fill=255)
    scene.paste((104, 112, 150, 255), mask=far_mask)
    # snow caps: a jagged band below each high peak, clipped to the mountain outline
    snow_mask = Image.new("L", (w, horizon), 0)
    smd = ImageDraw.Draw(snow_mask)
    snow = 0
    for px, py in peaks:
        if py < 235:
            depth = 45 + (235 - py) * 0.5
            jag = [(px - 120 + k * 20, py + depth + (14 if k % 2 else -6)) for k in range(13)]
            smd.polygon([(px, py - 5)] + [(px - 120, py - 5)] + jag + [(px + 120, py - 5)], fill=255)
            snow += 1
    snow_mask = ImageChops.multiply(snow_mask, far_mask)
    scene.paste((236, 240, 248, 255), mask=snow_mask)
    near, _ = mountain_range(rng, w, horizon, 330, 410, 6)
    sd.polygon(near, fill=(60, 84, 78))
    sd.polygon(
        [(0, horizon - 18)] + [(x, horizon - 18 - 10 * math.sin(x / 70)) for x in range(0, w + 1, 32)] + [(w, horizon)], fill=(44, 92, 52)
    )
    for x in range(10, w, 22):  # tree line along the shore
        th = rng.randint(22, 46)
        sd.polygon([(x, horizon - 12 - th), (x - 9, horizon - 8), (x + 9, horizon - 8)], fill=(28, 62, 38))
    img.paste(scene, (0, 0), scene)

    vgradient(img, (0, horizon, w, h), (70, 110, 150), (24, 50, 82))
    refl = scene.transpose(Image.Transpose.FLIP_TOP_BOTTOM).filter(ImageFilter.GaussianBlur(3))
    alpha = refl.getchannel("A").point(lambda a: a * 45 // 100)
    refl.putalpha(alpha)
    img.paste(refl, (0, horizon), refl)
    d = ImageDraw.Draw(img)
    for i in range(40):  # sun glitter on the water
        y = horizon + 12 + i * 9
        half = 50 - i
        if half > 4:
            x = sun[0] + rng.randint(-20, 20)
            d.line([(x - half, y), (x + half, y)], fill=(250, 210, 150), width=2)
    for i in range(60):  # ripples
        x, y = rng.randint(0, w), rng.randint(horizon + 20, h)
        d.line([(x, y), (x + rng.randint(20, 70), y)], fill=(110, 150, 185), width=1)
    for bx, by in [(420, 230), (455, 250), (480, 222)]:  # birds
        d.arc([bx - 14, by - 6, bx, by + 6], 200, 340, fill=(40, 40, 50), width=2)
        d.arc([bx, by - 6, bx + 14, by + 6], 200, 340, fill=(40, 40, 50), width=2)
    return save(img, "landscape", dict(snow_peaks=snow, birds=3))


def draw_street():
    rng = random.Random(SEED + 2)
    w, h = 1000, 700
    img = Image.new("RGB", (w, h))
    vgradient(img, (0, 0, w, 430), (120, 175, 230), (205, 228, 245))
    d = ImageDraw.Draw(img)
    cloud(d, 650, 90, 45)
    cloud(d, 880, 150, 30)
    d.rectangle([0, 430, w, 470], fill=(120, 170, 90))  # lawn
    d.rectangle([0, 470, w, 505], fill=(200, 198, 190))  # sidewalk
    for x in range(0, w, 50):
        d.line([(x, 470), (x, 505)], fill=(170, 168, 160), width=2)
    d.rectangle([0, 505, w, 510], fill=(150, 150, 150))  # kerb
    d.rectangle([0, 510, w, h], fill=(72, 72, 76))  # road
    for x in range(20, w, 120):
        d.rectangle([x, 612, x + 60, 620], fill=(240, 240, 235))

    # house
    hx0, hx1, hy0, hy1 = 90, 470, 230, 445
    d.rectangle([hx0, hy0, hx1, hy1], fill=(240, 214, 120), outline=(150, 120, 60), width=3)
    for y in range(hy0 + 14, hy1, 16):
        d.line([(hx0 + 2, y), (hx1 - 2, y)], fill=(222, 194, 100), width=1)
    d.rectangle([380, 110, 415, 190], fill=(130, 70, 55))  # chimney
    d.polygon([(hx0 - 30, hy0), ((hx0 + hx1) / 2, 100), (hx1 + 30, hy0)], fill=(150, 52, 40), outline=(100, 30, 25))
    d.rectangle([250, 320, 310, 445], fill=(40, 80, 160), outline=(25, 50, 100), width=3)  # door
    d.ellipse([295, 380, 303, 388], fill=(230, 200, 80))
    for wx in (130, 360):
        d.rectangle([wx, 280, wx + 80, 350], fill=(180, 215, 240), outline=(255, 255, 255), width=6)
        d.line([(wx + 40, 280), (wx + 40, 350)], fill=(255, 255, 255), width=4)
        d.line([(wx, 315), (wx + 80, 315)], fill=(255, 255, 255), width=4)
    d.rectangle([255, 445, 305, 470], fill=(185, 180, 170))  # path to door

    # tree
    d.rectangle([640, 300, 665, 470], fill=(105, 70, 40))
    for cx, cy, r in [(652, 250, 75), (600, 290, 55), (705, 290, 55), (652, 320, 50)]:
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(58, 130, 60))
    for _ in range(60):
        x, y = rng.randint(585, 720), rng.randint(185, 350)
        if (x - 652) ** 2 + (y - 265) ** 2 < 80**2:
            d.ellipse([x - 4, y - 4, x + 4, y + 4], fill=(80, 155, 75))

    # red car, facing right, on the road in front of the house
    cx0, cy = 200, 590
    d.ellipse([cx0 + 20, cy + 18, cx0 + 420, cy + 42], fill=(45, 45, 48))  # shadow
    d.polygon([(cx0 + 110, cy - 55), (cx0 + 150, cy - 105), (cx0 + 290, cy - 105), (cx0 + 345, cy - 55)], fill=(200, 30, 35))
    d.rounded_rectangle([cx0 + 20, cy - 60, cx0 + 430, cy + 10], radius=22, fill=(210, 32, 38), outline=(130, 15, 20), width=3)
    d.polygon([(cx0 + 128, cy - 58), (cx0 + 158, cy - 96), (cx0 + 215, cy - 96), (cx0 + 215, cy - 58)], fill=(170, 205, 230))
    d.polygon([(cx0 + 228, cy - 58), (cx0 + 228, cy - 96), (cx0 + 284, cy - 96), (cx0 + 326, cy - 58)], fill=(170, 205, 230))
    d.line([(cx0 + 222, cy - 55), (cx0 + 222, cy + 5)], fill=(130, 15, 20), width=2)
    d.rectangle([cx0 + 250, cy - 40, cx0 + 270, cy - 35], fill=(90, 10, 15))  # door handle
    d.rectangle([cx0 + 410, cy - 45, cx0 + 430, cy - 30], fill=(255, 240, 180))  # headlight
    d.rectangle([cx0 + 20, cy - 45, cx0 + 34, cy - 30], fill=(255, 120, 60))  # tail light
    for wx in (cx0 + 110, cx0 + 340):
        d.ellipse([wx - 42, cy - 32, wx + 42, cy + 52], fill=(25, 25, 25))
        d.ellipse([wx - 20, cy - 10, wx + 20, cy + 30], fill=(170, 170, 175))
    return save(img, "street", dict(car="red", house="yellow", roof="dark red", door="blue", windows=2, tree=True))


def draw_chart():
    w, h = 800, 600
    months = ["Jan", "Feb", "Mar", "Apr", "May", "Jun"]
    values = [42, 35, 58, 71, 64, 88]
    title = "Fruit Stand Sales, January-June 2024"
    img = Image.new("RGB", (w, h), (255, 255, 255))
    d = ImageDraw.Draw(img)
    text_center(d, (w // 2, 38), title, font(26), (30, 30, 30))
    x0, y0, x1, y1 = 110, 80, 760, 510  # plot area
    ymax = 100
    f_tick = font(16)
    for v in range(0, ymax + 1, 20):
        y = y1 - (y1 - y0) * v / ymax
        d.line([(x0, y), (x1, y)], fill=(225, 225, 225) if v else (60, 60, 60), width=1 if v else 2)
        d.text((x0 - 10, y), str(v), font=f_tick, fill=(60, 60, 60), anchor="rm")
    d.line([(x0, y0), (x0, y1)], fill=(60, 60, 60), width=2)
    slot = (x1 - x0) / len(values)
    for i, (m, v) in enumerate(zip(months, values)):
        bx = x0 + slot * i + slot * 0.2
        top = y1 - (y1 - y0) * v / ymax
        color = (220, 110, 40) if v == max(values) else (66, 120, 190)
        d.rectangle([bx, top, bx + slot * 0.6, y1 - 1], fill=color)
        text_center(d, (bx + slot * 0.3, top - 14), str(v), f_tick, (30, 30, 30))
        text_center(d, (bx + slot * 0.3, y1 + 18), m, f_tick, (30, 30, 30))
    text_center(d, ((x0 + x1) // 2, 562), "Month", font(20), (30, 30, 30))
    lab = Image.new("RGBA", (200, 30), (255, 255, 255, 0))
    ImageDraw.Draw(lab).text((100, 15), "Units sold", font=font(20), fill=(30, 30, 30), anchor="mm")
    lab = lab.rotate(90, expand=True)
    img.paste(lab, (22, (y0 + y1) // 2 - 100), lab)
    return save(img, "bar_chart", dict(title=title, months=months, values=values))


def draw_receipt():
    rng = random.Random(SEED + 4)
    w, h = 300, 1200
    img = Image.new("RGB", (w, h), (92, 64, 44))  # wooden table
    d = ImageDraw.Draw(img)
    for y in range(0, h, 7):
        d.line([(0, y), (w, y + rng.randint(-3, 3))], fill=(100 + rng.randint(-8, 8), 70, 48), width=3)
    px0, px1, py0, py1 = 18, 282, 30, 1170
    teeth = [(px0, py0)] + [(x, py0 + (6 if (x // 8) % 2 else 0)) for x in range(px0, px1 + 1, 8)] + [(px1, py0)]
    body = teeth + [(px1, py1)] + [(x, py1 - (6 if (x // 8) % 2 else 0)) for x in range(px1, px0 - 1, -8)] + [(px0, py1)]
    shadow = Image.new("L", (w, h), 0)
    ImageDraw.Draw(shadow).polygon([(x + 5, y + 6) for x, y in body], fill=120)
    img.paste((40, 28, 20), mask=shadow.filter(ImageFilter.GaussianBlur(5)))
    d.polygon(body, fill=(250, 248, 240))

    ink = (45, 45, 50)
    f, fb, fs = font(17), font(26), font(14)
    L, R = px0 + 16, px1 - 16
    y = 95
    text_center(d, (w // 2, y), "GREEN LEAF MARKET", font(22), ink)
    y += 40
    text_center(d, (w // 2, y), "12 Elm Street, Springfield", fs, ink)
    y += 27
    text_center(d, (w // 2, y), "Tel 555-0142", fs, ink)
    y += 46
    d.text((L, y), "2024-03-14", font=f, fill=ink)
    d.text((R, y), "17:42", font=f, fill=ink, anchor="ra")
    y += 30
    d.text((L, y), "Receipt #004817", font=f, fill=ink)
    y += 38
    dash = lambda yy: d.text((w // 2, yy), "-" * 38, font=fs, fill=ink, anchor="mm")  # noqa: E731
    dash(y)
    y += 30
    items = [
        ("Bananas 1 kg", 129),
        ("Whole milk 2 L", 249),
        ("Sourdough bread", 375),
        ("Eggs x12", 310),
        ("Cheddar 200 g", 420),
        ("Apples 1 kg", 285),
        ("Coffee beans 500 g", 899),
        ("Tomatoes", 160),
    ]
    money = lambda c: f"{c // 100}.{c % 100:02d}"  # noqa: E731
    for name, cents in items:
        d.text((L, y), name, font=f, fill=ink)
        d.text((R, y), money(cents), font=f, fill=ink, anchor="ra")
        y += 40
    y += 5
    dash(y)
    y += 32
    total = sum(c for _, c in items)
    d.text((L, y), f"{len(items)} items", font=f, fill=ink)
    y += 40
    d.text((L, y), "TOTAL", font=fb, fill=ink)
    d.text((R, y), money(total), font=fb, fill=ink, anchor="ra")
    y += 54
    d.text((L, y), "CARD  **** 4821", font=f, fill=ink)
    d.text((R, y), money(total), font=f, fill=ink, anchor="ra")
    y += 32
    d.text((L, y), "Change", font=f, fill=ink)
    d.text((R, y), "0.00", font=f, fill=ink, anchor="ra")
    y += 40
    dash(y)
    y += 54
    text_center(d, (w // 2, y), "Thank you for shopping!", f, ink)
    y += 32
    text_center(d, (w // 2, y), "Please keep your receipt", fs, ink)
    y += 68
    x = 48
    while x < 252:  # barcode
        bw = rng.choice([1, 2, 2, 3, 4])
        d.rectangle([x, y, x + bw - 1, y + 70], fill=ink)
        x += bw + rng.choice([1, 2, 3])
    y += 116
    text_center(d, (w // 2, y), "0 04817 20240314 7", fs, ink)
    img = img.filter(ImageFilter.GaussianBlur(0.4))  # a touch of softness, like a phone photo
    return save(
        img,
        "receipt",
        dict(
            shop="Green Leaf Market",
            date="2024-03-14",
            time="17:42",
            items=[(n, money(c)) for n, c in items],
            total=money(total),
            priciest=max(items, key=lambda it: it[1]),
        ),
    )


def draw_stop_sign():
    w, h = 200, 150
    img = Image.new("RGB", (w, h))
    vgradient(img, (0, 0, w, h), (110, 165, 225), (200, 225, 240))
    d = ImageDraw.Draw(img)
    d.rectangle([0, 118, w, h], fill=(95, 140, 70))
    d.rectangle([125, 60, 131, h], fill=(140, 140, 145))
    cx, cy, r = 128, 58, 46
    octo = lambda rr: [(cx + rr * math.cos(math.radians(22.5 + 45 * k)), cy + rr * math.sin(math.radians(22.5 + 45 * k))) for k in range(8)]  # noqa: E731
    d.polygon(octo(r), fill=(255, 255, 255))
    d.polygon(octo(r - 4), fill=(200, 20, 30))
    text_center(d, (cx, cy + 1), "STOP", font(22), (255, 255, 255))
    d.ellipse([20, 70, 70, 120], fill=(60, 120, 55))  # bush
    return save(img, "stop_sign", dict(kind="stop", shape="octagon"))


def draw_bookshelf():
    rng = random.Random(SEED + 6)
    w, h = 1344, 1344
    img = Image.new("RGB", (w, h), (222, 214, 198))  # wall
    d = ImageDraw.Draw(img)
    for x in range(0, w, 96):
        d.line([(x, 0), (x, h)], fill=(214, 205, 188), width=2)
    d.rectangle([0, 1250, w, h], fill=(130, 95, 65))  # floor
    fx0, fx1, fy0, fy1 = 220, 1124, 140, 1250
    wood, dark = (140, 92, 52), (105, 66, 36)
    d.rectangle([fx0, fy0, fx1, fy1], fill=(96, 62, 34))  # back panel
    n_shelves = 4
    side, board = 34, 26
    inner_h = (fy1 - fy0 - board * (n_shelves + 1)) / n_shelves
    palette = [
        (170, 40, 45),
        (40, 85, 150),
        (45, 120, 70),
        (220, 180, 60),
        (120, 60, 130),
        (230, 120, 40),
        (30, 40, 60),
        (200, 200, 190),
        (90, 140, 160),
        (150, 100, 60),
    ]
    counts = []
    for s in range(n_shelves):
        top = fy0 + board + s * (inner_h + board)
        bottom = top + inner_h
        x = fx0 + side + 14
        limit = fx1 - side - 14
        if s == 0:
            limit -= 230  # room for the plant
        n = 0
        while True:
            bw = rng.randint(34, 64)
            if x + bw > limit:
                break
            bh = rng.uniform(0.62, 0.93) * inner_h
            col = palette[rng.randrange(len(palette))]
            d.rectangle([x, bottom - bh, x + bw, bottom], fill=col, outline=lerp(col, (0, 0, 0), 0.45), width=2)
            band = lerp(col, (255, 255, 255), 0.45)
            d.rectangle([x + 4, bottom - bh + 18, x + bw - 4, bottom - bh + 26], fill=band)
            d.rectangle([x + 4, bottom - 34, x + bw - 4, bottom - 28], fill=band)
            for _ in range(rng.randint(1, 3)):
                ly = rng.uniform(bottom - bh + 45, bottom - 60)
                d.line([(x + 10, ly), (x + bw - 10, ly)], fill=lerp(col, (255, 255, 255), 0.3), width=3)
            n += 1
            x += bw + rng.randint(2, 8)
        counts.append(n)
        if s == 0:  # potted plant on the right of the top shelf
            px = fx1 - side - 130
            d.polygon([(px - 55, bottom - 110), (px + 55, bottom - 110), (px + 40, bottom), (px - 40, bottom)], fill=(190, 95, 60))
            d.rectangle([px - 60, bottom - 122, px + 60, bottom - 106], fill=(170, 80, 50))
            for k in range(9):
                ang = math.radians(-160 + k * 17.5)
                ex, ey = px + 110 * math.cos(ang), bottom - 120 + 120 * math.sin(ang)
                d.line([(px, bottom - 118), (ex, ey)], fill=(50, 120, 55), width=6)
                d.ellipse([ex - 20, ey - 11, ex + 20, ey + 11], fill=(70, 150, 70))
    for s in range(n_shelves + 1):
        y = fy0 + s * (inner_h + board)
        d.rectangle([fx0, y, fx1, y + board], fill=wood)
        d.line([(fx0, y + board), (fx1, y + board)], fill=dark, width=3)
    d.rectangle([fx0, fy0, fx0 + side, fy1], fill=wood)
    d.rectangle([fx1 - side, fy0, fx1, fy1], fill=wood)
    d.rectangle([fx0 - 14, fy0 - 26, fx1 + 14, fy0], fill=dark)  # crown
    return save(img, "bookshelf", dict(shelves=n_shelves, books_per_shelf=counts, plant="top shelf, right"))


def banana(d, cx, cy, length, thick, angle_deg, color=(240, 205, 60)):
    pts_out, pts_in = [], []
    R = length * 0.9
    for k in range(21):
        t = -0.55 + 1.1 * k / 20
        a = math.radians(angle_deg) + t
        tw = thick * math.sin(math.pi * k / 20) + 3
        pts_out.append((cx + R * math.cos(a), cy + R * math.sin(a)))
        pts_in.append((cx + (R - tw) * math.cos(a), cy + (R - tw) * math.sin(a)))
    d.polygon(pts_out + pts_in[::-1], fill=color, outline=(170, 130, 30))
    d.ellipse([pts_out[0][0] - 5, pts_out[0][1] - 5, pts_out[0][0] + 5, pts_out[0][1] + 5], fill=(90, 70, 30))


def draw_fruit_bowl():
    w, h = 640, 480
    img = Image.new("RGB", (w, h))
    vgradient(img, (0, 0, w, 300), (235, 226, 206), (214, 200, 176))
    d = ImageDraw.Draw(img)
    vgradient(img, (0, 300, w, h), (150, 100, 62), (110, 70, 42))
    for y in range(310, h, 22):
        d.line([(0, y), (w, y + 6)], fill=(125, 82, 50), width=2)
    d.ellipse([150, 385, 500, 420], fill=(90, 58, 36))  # shadow
    d.ellipse([150, 280, 500, 310], fill=(40, 66, 110))  # inside of the bowl
    # back fruit: two bananas leaning over the rim, an orange on the right
    banana(d, 250, 380, 200, 40, -118)
    banana(d, 300, 360, 200, 38, -95, color=(236, 196, 52))
    d.ellipse([392, 212, 474, 294], fill=(240, 140, 30), outline=(200, 105, 20), width=2)  # orange
    d.ellipse([412, 228, 428, 240], fill=(250, 180, 90))
    d.ellipse([428, 212, 436, 218], fill=(90, 120, 40))
    apples = [(230, 262), (312, 248), (368, 275)]
    for ax, ay in apples:
        d.ellipse([ax - 40, ay - 36, ax + 40, ay + 38], fill=(195, 30, 35), outline=(140, 20, 25), width=2)
        d.ellipse([ax - 24, ay - 24, ax - 8, ay - 8], fill=(235, 110, 110))
        d.line([(ax, ay - 34), (ax + 5, ay - 52)], fill=(90, 60, 30), width=4)
        d.ellipse([ax + 5, ay - 54, ax + 25, ay - 44], fill=(80, 150, 60))
    # bowl in front
    d.chord([150, 190, 500, 400], 0, 180, fill=(70, 110, 170), outline=(45, 75, 125), width=3)
    d.arc([150, 280, 500, 310], 0, 180, fill=(200, 215, 235), width=4)  # front rim
    d.rectangle([285, 392, 365, 404], fill=(55, 90, 145))
    d.arc([190, 300, 460, 380], 20, 160, fill=(120, 160, 210), width=4)
    return save(img, "fruit_bowl", dict(apples=len(apples), bananas=2, oranges=1, bowl="blue"))


def draw_clock(hour=3, minute=40):
    w = h = 448
    img = Image.new("RGB", (w, h), (150, 175, 165))
    d = ImageDraw.Draw(img)
    c, r = (224, 224), 190
    d.ellipse([c[0] - r + 6, c[1] - r + 10, c[0] + r + 6, c[1] + r + 10], fill=(115, 138, 130))
    d.ellipse([c[0] - r, c[1] - r, c[0] + r, c[1] + r], fill=(40, 40, 44))
    d.ellipse([c[0] - r + 14, c[1] - r + 14, c[0] + r - 14, c[1] + r - 14], fill=(250, 248, 242))

    def at(angle_deg, rr):
        a = math.radians(angle_deg - 90)
        return c[0] + rr * math.cos(a), c[1] + rr * math.sin(a)

    for k in range(60):
        big = k % 5 == 0
        d.line([at(k * 6, 166 - (16 if big else 7)), at(k * 6, 166)], fill=(30, 30, 30), width=5 if big else 2)
    f = font(30)
    for n in range(1, 13):
        text_center(d, at(n * 30, 126), str(n), f, (30, 30, 30))
    text_center(d, (c[0], c[1] + 62), "QUARTZ", font(13), (120, 120, 120))
    ha = (hour % 12 + minute / 60) * 30
    ma = minute * 6

    def hand(angle, length, tail, width):
        tip, back = at(angle, length), at(angle + 180, tail)
        left, right = at(angle - 90, width / 2), at(angle + 90, width / 2)
        d.polygon([tip, left, back, right], fill=(20, 20, 20))

    hand(ha, 95, 20, 16)
    hand(ma, 150, 24, 11)
    sa = 15 * 6
    d.line([at(sa + 180, 30), at(sa, 150)], fill=(200, 30, 30), width=2)
    d.ellipse([c[0] - 9, c[1] - 9, c[0] + 9, c[1] + 9], fill=(200, 30, 30))
    return save(img, "clock", dict(hour=hour, minute=minute, time=f"{hour}:{minute:02d}"))


N_SIG = "Anna"


def draw_note():
    rng = random.Random(SEED + 9)
    w, h = 1200, 300
    img = Image.new("RGB", (w, h), (70, 72, 78))  # dark desk
    d = ImageDraw.Draw(img)
    paper = [(14, 16), (1184, 10), (1188, 286), (10, 290)]
    d.polygon([(x + 6, y + 6) for x, y in paper], fill=(40, 40, 44))
    d.polygon(paper, fill=(252, 240, 160))
    for y in range(78, 290, 62):
        d.line([(16, y), (1184, y - 4)], fill=(170, 200, 225), width=2)
    d.line([(90, 14), (88, 288)], fill=(230, 140, 140), width=2)
    lines = ["Gone to the post office - back at 4:30.", "Please feed the cat!     - " + N_SIG]
    layer = Image.new("RGBA", (w, h), (0, 0, 0, 0))
    ld = ImageDraw.Draw(layer)
    ink = (30, 50, 140, 255)
    for li, line in enumerate(lines):
        x, base = 120.0, 74 + li * 124
        for ch in line:
            size = rng.randint(44, 50)
            f = font(size)
            if ch != " ":
                glyph = Image.new("RGBA", (80, 90), (0, 0, 0, 0))
                ImageDraw.Draw(glyph).text((20, 70), ch, font=f, fill=ink, anchor="ls")
                glyph = glyph.rotate(rng.uniform(-7, 7), resample=Image.Resampling.BICUBIC)
                layer.alpha_composite(glyph, (int(x) - 20, int(base + rng.uniform(-3, 3)) - 70 + 10))
            x += f.getlength(ch) + rng.uniform(-1.5, 1.0)
        if li == len(lines) - 1:  # underline the signature
            sig_w = font(47).getlength(N_SIG)
            ld.line([(x - sig_w - 6, base + 14), (x - sig_w / 2, base + 9), (x + 8, base + 15)], fill=ink, width=3)
    # slant like handwriting
    layer = layer.transform(layer.size, Image.Transform.AFFINE, (1, 0.22, -30, 0, 1, 0), resample=Image.Resampling.BICUBIC)
    img.paste(layer, (0, 0), layer)
    return save(img, "handwritten_note", dict(lines=lines, author="Anna", back_at="4:30"))


def wrap(text, f, width):
    words, lines, cur = text.split(), [], ""
    for word in words:
        trial = f"{cur} {word}".strip()
        if f.getlength(trial) <= width:
            cur = trial
        else:
            lines.append(cur)
            cur = word
    lines.append(cur)
    return lines


def draw_document():
    w, h = 896, 1344
    img = Image.new("RGB", (w, h), (246, 246, 244))
    d = ImageDraw.Draw(img)
    title = "Community Garden Project"
    subtitle = "Quarterly Report, July-September 2024"
    volunteers, beds, kg = 24, 18, 312
    author = "Maria Lopez"
    sections = [
        (
            "1. Summary",
            f"During the third quarter, {volunteers} volunteers looked after {beds} raised beds in the "
            "Riverside community garden. Attendance at the Saturday work mornings stayed high through the "
            "summer holidays, and two new families joined the project.",
        ),
        (
            "2. Harvest",
            f"The beds produced a total of {kg} kg of vegetables. Tomatoes and courgettes made up more than "
            "half of the harvest. About a third of the produce was donated to the local food bank; the rest "
            "was shared among the members.",
        ),
        (
            "3. Next steps",
            "Before winter we plan to build a second compost bay, repair the tool shed roof and plant "
            "garlic and broad beans. The next members' meeting will be held on 12 October at 10:00 in "
            "the church hall.",
        ),
    ]
    L, R = 90, w - 90
    d.text((L, 80), title, font=font(40), fill=(20, 40, 80))
    d.text((L, 134), subtitle, font=font(22), fill=(90, 90, 90))
    d.line([(L, 176), (R, 176)], fill=(20, 40, 80), width=3)
    y = 210
    fb, fh = font(20), font(28)
    for head, body in sections:
        d.text((L, y), head, font=fh, fill=(20, 40, 80))
        y += 48
        for line in wrap(body, fb, R - L):
            d.text((L, y), line, font=fb, fill=(35, 35, 35))
            y += 31
        y += 34
    # small table
    rows = [("Crop", "Harvest (kg)"), ("Tomatoes", "104"), ("Courgettes", "61"), ("Potatoes", "58"), ("Beans", "47"), ("Other", "42")]
    assert sum(int(r[1]) for r in rows[1:]) == kg
    tx0, tx1, rh = L, L + 420, 36
    for i, (a, b) in enumerate(rows):
        yy = y + i * rh
        if i == 0:
            d.rectangle([tx0, yy, tx1, yy + rh], fill=(220, 228, 240))
        d.rectangle([tx0, yy, tx1, yy + rh], outline=(150, 150, 160))
        d.text((tx0 + 12, yy + rh / 2), a, font=fb, fill=(35, 35, 35), anchor="lm")
        d.text((tx1 - 12, yy + rh / 2), b, font=fb, fill=(35, 35, 35), anchor="rm")
    d.text((tx1 + 30, y + rh / 2), "Table 1: harvest by crop", font=font(16), fill=(110, 110, 110), anchor="lm")
    y += len(rows) * rh + 50
    d.text((L, y), "4. Thanks", font=fh, fill=(20, 40, 80))
    y += 48
    thanks = (
        "We thank the Riverside Residents' Association for the two new water butts, and everyone who "
        "brought seedlings to the spring plant swap."
    )
    for line in wrap(thanks, fb, R - L):
        d.text((L, y), line, font=fb, fill=(35, 35, 35))
        y += 31
    d.text((L, y + 30), f"Prepared by {author}, garden coordinator", font=font(18), fill=(90, 90, 90))
    d.line([(L, h - 90), (R, h - 90)], fill=(200, 200, 200), width=1)
    text_center(d, (w // 2, h - 60), "Page 1 of 3", font(16), (110, 110, 110))
    return save(
        img,
        "document",
        dict(
            title=title,
            subtitle=subtitle,
            volunteers=volunteers,
            beds=beds,
            kg=kg,
            meeting="12 October at 10:00",
            author=author,
            top_crop=("Tomatoes", 104),
        ),
    )


# --------------------------------------------------------------------------
# conversations
# --------------------------------------------------------------------------


NUM_WORDS = "zero one two three four five six seven eight nine ten eleven twelve".split()


def num(n: int, cap: bool = False) -> str:
    word = NUM_WORDS[n] if 0 <= n < len(NUM_WORDS) else str(n)
    return word.capitalize() if cap else word


def conv(*turns):
    out = []
    for i, t in enumerate(turns):
        out.append({"role": "user" if i % 2 == 0 else "assistant", "content": t})
    assert len(out) % 2 == 0
    return out


def build_samples(im):
    L, S, C, R, G = im["landscape"], im["street"], im["chart"], im["receipt"], im["sign"]
    B, F, K, N, D = im["bookshelf"], im["fruit"], im["clock"], im["note"], im["document"]
    months_full = dict(Jan="January", Feb="February", Mar="March", Apr="April", May="May", Jun="June")
    vals = dict(zip(C["months"], C["values"]))
    best = max(vals, key=vals.get)
    worst = min(vals, key=vals.get)
    first, last = C["values"][0], C["values"][-1]
    zh_months = dict(Jan="一月", Feb="二月", Mar="三月", Apr="四月", May="五月", Jun="六月")
    books = B["books_per_shelf"]
    h, m = K["hour"], K["minute"]

    train = [
        dict(
            image=L["path"],
            conversations=conv(
                "<image>\nDescribe this picture.",
                "A mountain landscape at sunset: the sky fades from deep blue to warm orange, a low sun glows on the "
                f"right, and a range of mountains with {num(L['snow_peaks'])} snow-capped peaks stands behind a calm lake.",
                "What can you see on the water?",
                "The lake reflects the mountains and the shoreline trees, and there is a golden strip of glitter "
                "from the sun along with a few small ripples.",
            ),
        ),
        dict(
            image=S["path"],
            conversations=conv(
                "Look at this: <image>\nWhat colour is the car?",
                f"The car is {S['car']}.",
                "Where is it?",
                f"It is on the road in front of a {S['house']} house with a {S['roof']} roof, facing to the right.",
            ),
        ),
        dict(
            image=C["path"],
            conversations=conv(
                "Which month had the highest sales in this chart?",
                f"{months_full[best]}, with {vals[best]} units sold.",
                "What is the total over all six months?",
                f"Adding the bars up ({' + '.join(map(str, C['values']))}) gives {sum(C['values'])} units.",
                "How much did sales grow from January to June?",
                f"They rose from {first} to {last} units, an increase of {last - first} units, or about "
                f"{round(100 * (last - first) / first)}%.",
            ),
        ),
        dict(
            image=R["path"],
            conversations=conv(
                "<image>\nWhat is the total on this receipt?",
                f"The total is {R['total']}, paid by card.",
                "How many items were bought, and which was the most expensive?",
                f"{num(len(R['items']), cap=True)} items were bought; the most expensive was {R['priciest'][0].lower()} at "
                f"{R['priciest'][1] // 100}.{R['priciest'][1] % 100:02d}.",
                "Where and when was it printed?",
                f"At {R['shop']} on {R['date']} at {R['time']}.",
            ),
        ),
        dict(
            image=G["path"],
            conversations=conv(
                "What does the sign in <image> tell drivers to do?",
                "It is a red octagonal STOP sign, so drivers must come to a complete stop before going on.",
            ),
        ),
        dict(
            image=B["path"],
            conversations=conv(
                "<image>\n这个书架有几层？",
                f"这个书架有{B['shelves']}层，每层都摆着颜色各异的书。",
                "最上面一层除了书还有什么？",
                "最上面一层的右边放着一盆绿色的小盆栽，花盆是橙红色的。",
                "最下面一层有几本书？",
                f"最下面一层有{books[-1]}本书。",
            ),
        ),
        dict(
            image=F["path"],
            conversations=conv(
                "How many apples are in the bowl?",
                f"There are {num(F['apples'])} red apples.",
                "What other fruit is there?",
                f"Behind the apples there are {num(F['bananas'])} yellow bananas and {num(F['oranges'])} orange, "
                f"all in a {F['bowl']} bowl on a wooden table.",
            ),
        ),
        dict(
            image=K["path"],
            conversations=conv(
                "<image>What time does the clock show?",
                f"It shows {K['time']}: the minute hand points at the {m // 5} and the hour hand is two thirds of the "
                f"way from {h} to {h + 1}.",
            ),
        ),
        dict(
            image=N["path"],
            conversations=conv(
                "Can you read this note? <image>",
                f'It says: "{N["lines"][0]} {N["lines"][1].split("  ")[0]}" and it is signed by {N["author"]}.',
                "When will the writer be back?",
                f"At {N['back_at']}.",
            ),
        ),
        dict(
            image=D["path"],
            conversations=conv(
                "<image>\nWhat is this document about?",
                f'It is page 1 of the "{D["title"]}" quarterly report for July-September 2024, summarising the '
                "garden's work, harvest and next steps.",
                "How many volunteers took part, and how much was harvested?",
                f"{D['volunteers']} volunteers looked after {D['beds']} raised beds, and they harvested {D['kg']} kg "
                "of vegetables in total.",
            ),
        ),
        dict(
            conversations=conv(
                "Explain in one sentence what a vision-language model is.",
                "A vision-language model is a neural network that takes both images and text as input and produces "
                "text, so it can describe pictures, answer questions about them or read the text they contain.",
                "Give one practical use.",
                "Reading receipts or forms from phone photos and turning them into structured data.",
            )
        ),
        dict(
            image=[L["path"], S["path"]],
            conversations=conv(
                "<image>\nWhat is in this picture?",
                "A lake at the foot of snow-capped mountains under an orange evening sky, with the sun low on the right.",
                "And this one? <image>\nWhich of the two pictures shows a car?",
                "The second one: it shows a red car on a road in front of a yellow house. The first picture has no "
                "car, only mountains, a lake and the sky.",
            ),
        ),
        dict(
            image=[R["path"], K["path"]],
            conversations=conv(
                "<image>\n这张收据的总金额是多少？",
                f"这张收据的总金额是{R['total']}，共{len(R['items'])}件商品，用银行卡支付。",
                "<image>\n这个钟显示的是几点？",
                f"这个钟显示的是{h}点{m}分。",
            ),
        ),
        dict(
            image=C["path"],
            conversations=conv(
                "图表中哪个月的销量最低？<image>",
                f"{zh_months[worst]}的销量最低，只有{vals[worst]}件。",
            ),
        ),
        dict(
            image=S["path"],
            conversations=conv(
                "<image>\nDescribe the scene briefly.",
                f"A quiet street on a sunny day: a {S['car']} car on the road in front of a {S['house']} house with a "
                f"{S['roof']} roof, and a leafy tree beside the house.",
                "What colour is the front door?",
                f"The front door is {S['door']}.",
                "How many windows can you see on the house?",
                f"{num(S['windows'], cap=True)}, one on each side of the door.",
            ),
        ),
        dict(
            conversations=conv(
                "用一句话解释什么是光合作用。",
                "光合作用是绿色植物利用阳光，把二氧化碳和水转化为葡萄糖并释放氧气的过程。",
            )
        ),
    ]
    evals = [
        dict(
            image=F["path"],
            conversations=conv(
                "<image>\nList the fruit you can see.",
                f"{num(F['apples'], cap=True)} red apples, {num(F['bananas'])} bananas and {num(F['oranges'])} orange, in a {F['bowl']} bowl.",
            ),
        ),
        dict(
            image=[K["path"], B["path"]],
            conversations=conv(
                "Here is a clock: <image>\nWhat time is it?",
                f"It is {K['time']}.",
                "Now look at this shelf: <image>\nHow many shelves does it have, and what is on the top one?",
                f"It has {num(B['shelves'])} shelves. The top one holds {books[0]} books and a small potted plant on the right.",
            ),
        ),
        dict(
            conversations=conv(
                "What is 17 times 3?",
                "17 times 3 is 51.",
            )
        ),
        dict(
            image=D["path"],
            conversations=conv(
                "<image>\n这份文件的标题是什么？",
                f"标题是“{D['title']}”，副标题是“{D['subtitle']}”。",
                "收成最多的是哪种作物？",
                f"是西红柿（Tomatoes），共{D['top_crop'][1]}公斤。",
            ),
        ),
    ]
    return train, evals


def check(samples):
    for s in samples:
        imgs = s.get("image")
        n_img = 0 if imgs is None else (len(imgs) if isinstance(imgs, list) else 1)
        turns = s["conversations"]
        assert all(t["role"] == ("user" if i % 2 == 0 else "assistant") for i, t in enumerate(turns)), s["id"]
        tags = sum(t["content"].count("<image>") for t in turns)
        assert tags in (0, n_img) if n_img == 1 else tags == n_img, s["id"]
        assert all("<image>" not in t["content"] for t in turns if t["role"] == "assistant"), s["id"]
        if n_img > 1:  # at least one image is introduced in a later user turn
            assert any("<image>" in t["content"] for t in turns[2::2]), s["id"]
        for p in [imgs] if isinstance(imgs, str) else imgs or []:
            assert (ROOT / p).is_file(), p


def main():
    IMG_DIR.mkdir(parents=True, exist_ok=True)
    images = dict(
        landscape=draw_landscape(),
        street=draw_street(),
        chart=draw_chart(),
        receipt=draw_receipt(),
        sign=draw_stop_sign(),
        bookshelf=draw_bookshelf(),
        fruit=draw_fruit_bowl(),
        clock=draw_clock(),
        note=draw_note(),
        document=draw_document(),
    )
    train, evals = build_samples(images)
    for i, s in enumerate(train + evals, start=1):
        s_id = f"sample-{i:04d}"
        s.pop("id", None)
        items = list(s.items())
        s.clear()
        s.update({"id": s_id, **dict(items)})
    check(train + evals)
    for name, data in [("train.json", train), ("eval.json", evals)]:
        (ROOT / name).write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    total = sum(p.stat().st_size for p in IMG_DIR.glob("*.jpg"))
    print(f"wrote {len(images)} images ({total / 1024:.0f} KiB), {len(train)} train and {len(evals)} eval samples to {ROOT}")


if __name__ == "__main__":
    main()
