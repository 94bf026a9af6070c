"""The concept space of the synthetic pool: shape x colour x background.

A concept is one (shape, colour, background) triple. Its id is
``(shape * len(COLOURS) + colour) * len(BACKGROUNDS) + background``.
"""

from __future__ import annotations

from dataclasses import dataclass

# Shape names, in id order. Captions use these (and synonyms from captions.py).
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "hexagon", "cross", "diamond", "ring")

# Colour names and their reference RGB values, chosen to be far apart in hue and lightness and to
# stand out from every background below.
COLOURS: tuple[str, ...] = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink")
COLOUR_RGB: tuple[tuple[int, int, int], ...] = (
    (214, 32, 38),
    (245, 135, 20),
    (240, 212, 28),
    (36, 160, 60),
    (28, 196, 214),
    (34, 72, 214),
    (128, 44, 178),
    (242, 118, 190),
)

# Background kinds, in id order; the short names appear in concept names ("red circle on stripes").
BACKGROUNDS: tuple[str, ...] = ("light", "dark", "stripes", "checker")
PLAIN_LIGHT, PLAIN_DARK, STRIPES, CHECKER = range(4)

# Reference tones of each background: (tone a, tone b). Plain backgrounds use tone a only.
BACKGROUND_TONES: tuple[tuple[tuple[int, int, int], tuple[int, int, int]], ...] = (
    ((236, 234, 228), (236, 234, 228)),
    ((38, 40, 46), (38, 40, 46)),
    ((214, 214, 208), (128, 130, 136)),
    ((222, 220, 214), (150, 150, 156)),
)

N_CONCEPTS = len(SHAPES) * len(COLOURS) * len(BACKGROUNDS)


@dataclass(frozen=True)
class Concept:
    id: int
    shape: int
    colour: int
    background: int

    @property
    def name(self) -> str:
        return f"{COLOURS[self.colour]} {SHAPES[self.shape]} on {BACKGROUNDS[self.background]}"

    @property
    def shape_name(self) -> str:
        return SHAPES[self.shape]

    @property
    def colour_name(self) -> str:
        return COLOURS[self.colour]

    @property
    def background_name(self) -> str:
        return BACKGROUNDS[self.background]


def concept_id(shape: int, colour: int, background: int) -> int:
    return (shape * len(COLOURS) + colour) * len(BACKGROUNDS) + background


def concept(cid: int) -> Concept:
    if not 0 <= cid < N_CONCEPTS:
        raise ValueError(f"concept id {cid} out of range 0..{N_CONCEPTS - 1}")
    background = cid % len(BACKGROUNDS)
    rest = cid // len(BACKGROUNDS)
    return Concept(cid, rest // len(COLOURS), rest % len(COLOURS), background)


CONCEPTS: tuple[Concept, ...] = tuple(concept(i) for i in range(N_CONCEPTS))
