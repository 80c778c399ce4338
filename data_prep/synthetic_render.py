"""Procedural pedestrians for the embedded synthetic person–text data set.

An identity is a bundle of attributes (gender, hair, hat, upper garment, lower garment,
shoes, bag) plus nuisance traits that captions never mention (skin tone, body build, exact
shades). Each identity is rendered in several views (background, scale, shift, flip,
lighting, blur, clutter) and every image gets captions that mention a random subset of its
attributes in varied wording, so a caption may match several identities (one-to-many).
Identities are sampled so that many are "siblings" of another identity that differ in one
or two attributes (hard negatives).

Everything is a pure function of a `numpy.random.Generator`, so a data set is reproducible
from its seed.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

GARMENT_COLOURS: dict[str, tuple[int, int, int]] = {
    "black": (28, 28, 32),
    "white": (236, 236, 232),
    "gray": (128, 128, 132),
    "red": (200, 32, 36),
    "blue": (36, 72, 196),
    "green": (40, 144, 64),
    "yellow": (232, 204, 44),
    "orange": (236, 124, 32),
    "pink": (236, 132, 172),
    "purple": (124, 52, 156),
    "brown": (122, 78, 42),
}
HAIR_COLOURS: dict[str, tuple[int, int, int]] = {
    "black": (22, 20, 20),
    "brown": (98, 62, 34),
    "blond": (222, 190, 110),
    "gray": (160, 160, 160),
    "red": (170, 64, 30),
}
SHOE_COLOURS = ("black", "white", "brown", "red", "gray")
SKIN_TONES = ((241, 200, 170), (224, 172, 130), (190, 136, 96), (140, 96, 64), (96, 64, 44))

GENDERS = ("man", "woman")
HAIR_LENGTHS = ("short", "long")
HATS = ("none", "cap", "hat")
UPPER_KINDS = ("t-shirt", "shirt", "jacket", "coat", "sweater")
SLEEVES = ("short", "long")
PATTERNS = ("plain", "striped", "checked", "printed")
LOWER_KINDS = ("trousers", "shorts", "skirt")
BAG_KINDS = ("none", "backpack", "handbag", "shoulder bag")

# Attribute name -> the values it can take (colours resolved per attribute).
ATTRIBUTE_VALUES: dict[str, tuple[str, ...]] = {
    "gender": GENDERS,
    "hair_colour": tuple(HAIR_COLOURS),
    "hair_length": HAIR_LENGTHS,
    "hat": HATS,
    "hat_colour": tuple(GARMENT_COLOURS),
    "upper_kind": UPPER_KINDS,
    "upper_colour": tuple(GARMENT_COLOURS),
    "sleeve": SLEEVES,
    "pattern": PATTERNS,
    "lower_kind": LOWER_KINDS,
    "lower_colour": tuple(GARMENT_COLOURS),
    "shoes": SHOE_COLOURS,
    "bag": BAG_KINDS,
    "bag_colour": tuple(GARMENT_COLOURS),
}
# Attributes that only matter when another one is present (they never define a sibling alone
# when their parent is absent).
_DEPENDS_ON = {"hat_colour": ("hat", "none"), "bag_colour": ("bag", "none")}


@dataclasses.dataclass(frozen=True)
class Identity:
  """One synthetic person: captioned attributes plus uncaptioned nuisance traits."""

  attributes: tuple[tuple[str, str], ...]  # sorted (name, value) pairs
  skin: tuple[int, int, int]
  build: float  # shoulder-width factor
  height: float  # relative body height
  shade_jitter: tuple[int, int, int]  # small per-identity offset of garment shades

  def get(self, name: str) -> str:
    return dict(self.attributes)[name]

  def key(self) -> tuple[tuple[str, str], ...]:
    """The visible identity: attributes with inactive dependants dropped."""
    attrs = dict(self.attributes)
    return tuple(
        (k, v) for k, v in self.attributes
        if not (k in _DEPENDS_ON and attrs[_DEPENDS_ON[k][0]] == _DEPENDS_ON[k][1]))


def _random_attributes(rng: np.random.Generator) -> dict[str, str]:
  attrs = {name: str(rng.choice(values)) for name, values in ATTRIBUTE_VALUES.items()}
  # Plausibility priors (not hard rules): fewer hats, skirts mostly on women.
  attrs["hat"] = str(rng.choice(HATS, p=(0.6, 0.25, 0.15)))
  attrs["hair_length"] = str(rng.choice(HAIR_LENGTHS, p=(0.3, 0.7) if attrs["gender"] == "woman" else (0.85, 0.15)))
  if attrs["lower_kind"] == "skirt" and attrs["gender"] == "man" and rng.random() < 0.9:
    attrs["lower_kind"] = str(rng.choice(("trousers", "shorts")))
  return attrs


def _make_identity(rng: np.random.Generator, attrs: dict[str, str]) -> Identity:
  return Identity(
      attributes=tuple(sorted(attrs.items())),
      skin=SKIN_TONES[int(rng.integers(len(SKIN_TONES)))],
      build=float(rng.uniform(0.9, 1.1)) * (1.0 if attrs["gender"] == "man" else 0.88),
      height=float(rng.uniform(0.92, 1.0)),
      shade_jitter=tuple(int(x) for x in rng.integers(-14, 15, size=3)),
  )


def _mutate(rng: np.random.Generator, base: Identity, num_changes: int) -> dict[str, str]:
  attrs = dict(base.attributes)
  active = [k for k in ATTRIBUTE_VALUES
            if not (k in _DEPENDS_ON and attrs[_DEPENDS_ON[k][0]] == _DEPENDS_ON[k][1])]
  for name in rng.choice(active, size=num_changes, replace=False):
    others = [v for v in ATTRIBUTE_VALUES[str(name)] if v != attrs[str(name)]]
    attrs[str(name)] = str(rng.choice(others))
  return attrs


def sample_identities(rng: np.random.Generator, count: int, taken: set, sibling_prob: float) -> list[Identity]:
  """Samples `count` identities whose visible attribute bundles are not in `taken`.

  With probability `sibling_prob` a new identity copies an already sampled one and changes
  one or two attributes (a hard negative); otherwise it is drawn at random. `taken` is
  updated, so splits sampled with the same set are disjoint.
  """
  identities: list[Identity] = []
  attempts = 0
  while len(identities) < count:
    attempts += 1
    if attempts > 1000 * max(count, 1):
      raise RuntimeError(f"could not sample {count} distinct identities; attribute space exhausted")
    if identities and rng.random() < sibling_prob:
      base = identities[int(rng.integers(len(identities)))]
      attrs = _mutate(rng, base, num_changes=int(rng.integers(1, 3)))
    else:
      attrs = _random_attributes(rng)
    identity = _make_identity(rng, attrs)
    if identity.key() in taken:
      continue
    taken.add(identity.key())
    identities.append(identity)
  return identities


# ----------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------

_SUPERSAMPLE = 3


def _shade(rgb: tuple[int, int, int], jitter: tuple[int, int, int]) -> tuple[int, int, int]:
  return tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(rgb, jitter))


def _contrast(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
  return (20, 20, 20) if sum(rgb) > 380 else (235, 235, 235)


def _background(rng: np.random.Generator, w: int, h: int) -> Image.Image:
  kind = int(rng.integers(3))
  base = rng.integers(60, 200, size=3)
  img = Image.new("RGB", (w, h), tuple(int(c) for c in base))
  draw = ImageDraw.Draw(img)
  if kind == 0:  # street: ground plane below a horizon
    horizon = int(h * rng.uniform(0.45, 0.75))
    ground = tuple(int(c) for c in rng.integers(70, 170, size=3))
    draw.rectangle([0, horizon, w, h], fill=ground)
  elif kind == 1:  # building facade: windows
    cols, rows = int(rng.integers(2, 5)), int(rng.integers(3, 8))
    win = tuple(int(c) for c in rng.integers(30, 230, size=3))
    for i in range(cols):
      for j in range(rows):
        x0 = (i + 0.2) * w / cols
        y0 = (j + 0.2) * h / rows
        draw.rectangle([x0, y0, x0 + 0.5 * w / cols, y0 + 0.5 * h / rows], fill=win)
  else:  # vertical gradient
    top = rng.integers(80, 230, size=3).astype(np.float32)
    bottom = rng.integers(40, 180, size=3).astype(np.float32)
    t = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None, None]
    arr = (top * (1 - t) + bottom * t) * np.ones((1, w, 1), np.float32)
    img = Image.fromarray(arr.astype(np.uint8))
  return img


def _draw_person(draw: ImageDraw.ImageDraw, ident: Identity, cx: float, top: float, ph: float) -> None:
  """Draws a frontal pedestrian of height `ph` whose head top is at `top`, centred at `cx`."""
  a = dict(ident.attributes)
  j = ident.shade_jitter
  upper = _shade(GARMENT_COLOURS[a["upper_colour"]], j)
  lower = _shade(GARMENT_COLOURS[a["lower_colour"]], j)
  hair = HAIR_COLOURS[a["hair_colour"]]
  skin = ident.skin
  shoes = GARMENT_COLOURS[a["shoes"]]
  bag = _shade(GARMENT_COLOURS[a["bag_colour"]], j)

  y = lambda f: top + f * ph  # noqa: E731 - fraction of body height to canvas y
  head_r = 0.062 * ph
  head_c = (cx, y(0.08))
  sw = 0.15 * ph * ident.build  # half shoulder width
  hw = 0.12 * ph * ident.build  # half hip width
  arm_w = 0.055 * ph
  hip_y = y(0.66) if a["upper_kind"] == "coat" else y(0.50)

  # Bag parts behind the body (backpack body).
  if a["bag"] == "backpack":
    draw.rounded_rectangle([cx - sw - 0.05 * ph, y(0.19), cx + sw + 0.05 * ph, y(0.46)],
                           radius=0.03 * ph, fill=bag)
  # Long hair falls behind the shoulders.
  if a["hair_length"] == "long":
    draw.rectangle([cx - 1.25 * head_r, y(0.08), cx + 1.25 * head_r, y(0.30)], fill=hair)

  # Legs and lower garment.
  leg_w = 0.085 * ph
  gap = 0.012 * ph
  for side in (-1, 1):
    x0 = cx + side * gap if side > 0 else cx - gap - leg_w
    draw.rectangle([x0, y(0.50), x0 + leg_w, y(0.94)], fill=skin)
  if a["lower_kind"] == "trousers":
    for side in (-1, 1):
      x0 = cx + gap if side > 0 else cx - gap - leg_w
      draw.rectangle([x0 - 0.01 * ph, y(0.49), x0 + leg_w + 0.01 * ph, y(0.93)], fill=lower)
    draw.rectangle([cx - hw, y(0.49), cx + hw, y(0.56)], fill=lower)
  elif a["lower_kind"] == "shorts":
    draw.rectangle([cx - hw - 0.01 * ph, y(0.49), cx + hw + 0.01 * ph, y(0.67)], fill=lower)
    draw.line([cx, y(0.58), cx, y(0.67)], fill=_shade(lower, (-30, -30, -30)), width=max(1, int(0.01 * ph)))
  else:  # skirt
    draw.polygon([(cx - hw, y(0.49)), (cx + hw, y(0.49)), (cx + 1.5 * hw, y(0.74)),
                  (cx - 1.5 * hw, y(0.74))], fill=lower)
  # Shoes.
  for side in (-1, 1):
    x0 = cx + gap if side > 0 else cx - gap - leg_w
    draw.ellipse([x0 - 0.02 * ph, y(0.925), x0 + leg_w + 0.02 * ph, y(0.99)], fill=shoes)

  # Arms: sleeves in the garment colour, forearms bare for short sleeves.
  sleeve_end = y(0.31) if a["sleeve"] == "short" else y(0.47)
  for side in (-1, 1):
    xa = cx + side * sw
    x0, x1 = (xa, xa + arm_w) if side > 0 else (xa - arm_w, xa)
    draw.rectangle([x0, y(0.17), x1, y(0.48)], fill=skin)
    draw.rectangle([x0, y(0.16), x1, sleeve_end], fill=upper)
    draw.ellipse([x0, y(0.465), x1, y(0.51)], fill=skin)

  # Torso.
  draw.polygon([(cx - sw, y(0.16)), (cx + sw, y(0.16)), (cx + hw, hip_y), (cx - hw, hip_y)], fill=upper)
  accent = _contrast(upper)
  line_w = max(1, int(0.014 * ph))
  if a["pattern"] == "striped":
    for f in np.arange(0.20, (hip_y - top) / ph - 0.02, 0.05):
      draw.line([cx - sw * 0.95, y(f), cx + sw * 0.95, y(f)], fill=accent, width=line_w)
  elif a["pattern"] == "checked":
    for f in np.arange(0.20, (hip_y - top) / ph - 0.02, 0.06):
      draw.line([cx - sw * 0.95, y(f), cx + sw * 0.95, y(f)], fill=accent, width=line_w)
    for dx in np.linspace(-0.7, 0.7, 4):
      draw.line([cx + dx * sw, y(0.17), cx + dx * hw, hip_y], fill=accent, width=line_w)
  elif a["pattern"] == "printed":
    draw.ellipse([cx - 0.06 * ph, y(0.24), cx + 0.06 * ph, y(0.36)], fill=accent)
  if a["upper_kind"] in ("jacket", "coat"):  # open front
    draw.line([cx, y(0.17), cx, hip_y], fill=_shade(upper, (-45, -45, -45)), width=line_w * 2)
  elif a["upper_kind"] == "shirt":  # collar
    draw.polygon([(cx - 0.05 * ph, y(0.16)), (cx + 0.05 * ph, y(0.16)), (cx, y(0.21))], fill=(240, 240, 240))
  elif a["upper_kind"] == "sweater":  # ribbed hem
    draw.rectangle([cx - hw, hip_y - 0.03 * ph, cx + hw, hip_y], fill=_shade(upper, (-35, -35, -35)))

  # Bag parts in front.
  strap = max(1, int(0.016 * ph))
  if a["bag"] == "backpack":
    for side in (-1, 1):
      draw.line([cx + side * 0.6 * sw, y(0.16), cx + side * 0.7 * sw, y(0.40)], fill=bag, width=strap)
  elif a["bag"] == "handbag":
    x0 = cx + sw + 0.01 * ph
    draw.rectangle([x0 - 0.02 * ph, y(0.50), x0 + 0.09 * ph, y(0.60)], fill=bag)
    draw.arc([x0, y(0.46), x0 + 0.07 * ph, y(0.54)], 180, 360, fill=bag, width=strap)
  elif a["bag"] == "shoulder bag":
    draw.line([cx - sw, y(0.16), cx + hw + 0.02 * ph, y(0.50)], fill=bag, width=strap)
    draw.rectangle([cx + hw - 0.02 * ph, y(0.46), cx + hw + 0.09 * ph, y(0.56)], fill=bag)

  # Neck, head, hair, hat.
  draw.rectangle([cx - 0.025 * ph, y(0.12), cx + 0.025 * ph, y(0.17)], fill=skin)
  draw.ellipse([head_c[0] - head_r, head_c[1] - head_r, head_c[0] + head_r, head_c[1] + head_r], fill=skin)
  draw.chord([head_c[0] - 1.08 * head_r, head_c[1] - 1.12 * head_r, head_c[0] + 1.08 * head_r,
              head_c[1] + 0.7 * head_r], 180, 360, fill=hair)
  if a["hat"] != "none":
    hat = _shade(GARMENT_COLOURS[a["hat_colour"]], j)
    crown_top = head_c[1] - 1.25 * head_r
    draw.chord([head_c[0] - 1.1 * head_r, crown_top, head_c[0] + 1.1 * head_r, head_c[1] + 0.3 * head_r],
               180, 360, fill=hat)
    if a["hat"] == "cap":
      draw.rectangle([head_c[0], head_c[1] - 0.5 * head_r, head_c[0] + 1.9 * head_r, head_c[1] - 0.3 * head_r], fill=hat)
    else:
      draw.rectangle([head_c[0] - 1.7 * head_r, head_c[1] - 0.55 * head_r, head_c[0] + 1.7 * head_r,
                      head_c[1] - 0.3 * head_r], fill=hat)


def render_view(rng: np.random.Generator, ident: Identity, height: int, width: int) -> np.ndarray:
  """Renders one view of `ident` as uint8 [height, width, 3].

  The view draws a random background, person scale and shift, horizontal flip, clutter
  (occluders), lighting and blur.
  """
  s = _SUPERSAMPLE
  w, h = width * s, height * s
  img = _background(rng, w, h)
  draw = ImageDraw.Draw(img)
  # Background clutter behind the person.
  for _ in range(int(rng.integers(0, 4))):
    x0, y0 = rng.uniform(0, w), rng.uniform(0, h)
    draw.ellipse([x0, y0, x0 + rng.uniform(0.1, 0.4) * w, y0 + rng.uniform(0.05, 0.2) * h],
                 fill=tuple(int(c) for c in rng.integers(0, 256, size=3)))
  ph = h * rng.uniform(0.78, 0.95) * ident.height
  cx = w / 2 + rng.uniform(-0.1, 0.1) * w
  top = rng.uniform(0.01, 0.99) * (h - ph)
  _draw_person(draw, ident, cx, top, ph)
  # Occluder in front (lamp post, passer-by's arm) with small probability.
  if rng.random() < 0.3:
    x0 = rng.choice([rng.uniform(-0.1, 0.1), rng.uniform(0.8, 1.0)]) * w
    draw.rectangle([x0, rng.uniform(0, 0.6) * h, x0 + rng.uniform(0.05, 0.15) * w, h],
                   fill=tuple(int(c) for c in rng.integers(0, 256, size=3)))
  img = img.resize((width, height), Image.Resampling.BOX)
  if rng.random() < 0.5:
    img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  radius = rng.uniform(0.0, 0.7)
  if radius > 0.2:
    img = img.filter(ImageFilter.GaussianBlur(radius))
  arr = np.asarray(img, np.float32)
  gain = rng.uniform(0.75, 1.25) * (1.0 + rng.uniform(-0.08, 0.08, size=3))
  arr = arr * gain + rng.normal(0.0, 3.0, size=arr.shape)
  return np.clip(arr, 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------
# Captions
# ----------------------------------------------------------------------------------------

_SUBJECTS = {
    "man": ("a man", "a young man", "a male", "a guy", "the man", "this man", "a gentleman", "a male pedestrian"),
    "woman": ("a woman", "a young woman", "a female", "a lady", "the woman", "this woman", "a girl",
              "a female pedestrian"),
}
_PRONOUN = {"man": "he", "woman": "she"}
_COLOUR_WORDS = {"gray": ("gray", "grey"), "blond": ("blond", "blonde"), "red": ("red",)}
_UPPER_WORDS = {"t-shirt": ("t-shirt", "tee", "t shirt"), "shirt": ("shirt", "button-up shirt"),
                "jacket": ("jacket",), "coat": ("coat", "long coat"), "sweater": ("sweater", "jumper")}
_LOWER_WORDS = {"trousers": ("trousers", "pants", "long pants"), "shorts": ("shorts",), "skirt": ("skirt",)}
_SHOE_WORDS = ("shoes", "sneakers", "footwear")
_BAG_WORDS = {"backpack": ("backpack", "rucksack"), "handbag": ("handbag", "purse"),
              "shoulder bag": ("shoulder bag", "bag over the shoulder", "crossbody bag")}


def _pick(rng: np.random.Generator, options) -> str:
  return str(options[int(rng.integers(len(options)))])


def _colour(rng: np.random.Generator, name: str) -> str:
  return _pick(rng, _COLOUR_WORDS.get(name, (name,)))


def _a(phrase: str) -> str:
  """Prefixes the indefinite article that fits `phrase`."""
  return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def caption(rng: np.random.Generator, ident: Identity, mention_prob: float = 0.6) -> str:
  """One caption mentioning a random subset (at least two) of the identity's attributes."""
  a = dict(ident.attributes)
  groups = ["hair", "upper", "lower", "shoes", "bag"] + (["hat"] if a["hat"] != "none" else [])
  chosen = [g for g in groups if rng.random() < mention_prob]
  while len(chosen) < 2:
    extra = _pick(rng, [g for g in groups if g not in chosen])
    chosen.append(extra)
  rng.shuffle(chosen)

  def phrase(group: str) -> str:
    if group == "hair":
      length, colour = a["hair_length"], _colour(rng, a["hair_colour"])
      return _pick(rng, (f"{length} {colour} hair", f"{colour} hair that is {length}", f"{length}, {colour} hair"))
    if group == "upper":
      kind = _pick(rng, _UPPER_WORDS[a["upper_kind"]])
      colour = _colour(rng, a["upper_colour"])
      sleeve = a["sleeve"]
      pattern = {"plain": "", "striped": _pick(rng, ("striped ", "stripy ")),
                 "checked": _pick(rng, ("checked ", "plaid ")), "printed": _pick(rng, ("printed ", "graphic "))}[a["pattern"]]
      forms = [f"{pattern}{colour} {kind}",
               f"{colour} {sleeve}-sleeved {pattern}{kind}",
               f"{pattern}{colour} {kind} with {sleeve} sleeves"]
      if a["pattern"] == "plain":
        forms.append(f"plain {colour} {kind}")
      return _a(_pick(rng, forms))
    if group == "lower":
      return f"{_colour(rng, a['lower_colour'])} {_pick(rng, _LOWER_WORDS[a['lower_kind']])}"
    if group == "shoes":
      return f"{_colour(rng, a['shoes'])} {_pick(rng, _SHOE_WORDS)}"
    if group == "hat":
      return _a(f"{_colour(rng, a['hat_colour'])} {a['hat']}")
    if a["bag"] == "none":
      return "no bag"
    return _a(f"{_colour(rng, a['bag_colour'])} {_pick(rng, _BAG_WORDS[a['bag']])}")

  subject = _pick(rng, _SUBJECTS[a["gender"]])
  pronoun = _PRONOUN[a["gender"]]
  wear = [phrase(g) for g in chosen if g in ("upper", "lower", "shoes", "hat")]
  has = [phrase(g) for g in chosen if g == "hair"]
  carry = [phrase(g) for g in chosen if g == "bag"]

  def join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]

  carry_verb = "is carrying" if a["bag"] != "none" else "has"
  sentences = []
  style = int(rng.integers(3))
  if style == 0 and wear:
    sentences.append(f"{subject}{' with ' + join(has) if has else ''} is wearing {join(wear)}")
    if carry:
      sentences.append(f"{pronoun} {carry_verb} {join(carry)}")
  elif style == 1 and wear:
    sentences.append(f"{subject} in {join(wear)}")
    if has:
      sentences.append(f"{pronoun} has {join(has)}")
    if carry:
      sentences.append(f"{pronoun} {carry_verb} {join(carry)}")
  else:
    clauses = []
    if has:
      clauses.append(f"has {join(has)}")
    if wear:
      clauses.append(f"wears {join(wear)}")
    if carry:
      clauses.append(("carries " if a["bag"] != "none" else "has ") + join(carry))
    sentences.append(f"{subject} who {join(clauses)}")
  text = ". ".join(s[0].upper() + s[1:] for s in sentences) + "."
  return text
