"""Caption text for the synthetic pool: English templates, other languages, short captions.

Every function takes its choices as integers (taken modulo the number of options) so that the
caller's random draws fully decide the text.
"""

from __future__ import annotations

from .concepts import Concept

# ---------------------------------------------------------------------------------------- English

EN_SHAPES: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "disc", "round dot"),
    "square": ("square", "square tile"),
    "triangle": ("triangle", "triangular shape"),
    "star": ("star", "five-pointed star"),
    "hexagon": ("hexagon", "six-sided shape"),
    "cross": ("cross", "plus sign"),
    "diamond": ("diamond", "rhombus"),
    "ring": ("ring", "hoop"),
}
EN_COLOURS: dict[str, tuple[str, ...]] = {
    "red": ("red", "bright red"),
    "orange": ("orange",),
    "yellow": ("yellow",),
    "green": ("green",),
    "cyan": ("cyan", "teal"),
    "blue": ("blue",),
    "purple": ("purple", "violet"),
    "pink": ("pink",),
}
EN_BACKGROUNDS: dict[str, tuple[str, ...]] = {
    "light": ("white", "light", "pale"),
    "dark": ("dark", "black", "dark grey"),
    "stripes": ("striped", "stripy"),
    "checker": ("checkered", "checkerboard", "chequered"),
}
# {obj}: article + colour + shape ("a red circle"); {bg}: background adjective.
EN_TEMPLATES: tuple[str, ...] = (
    "a photo of {obj} that sits on a {bg} background",
    "{Obj} placed on top of a {bg} background",
    "an image of {obj} in front of a {bg} background",
    "a simple picture showing {obj} against a {bg} backdrop",
    "a close-up shot of {obj} resting on a {bg} background",
    "there is {obj} on a {bg} surface in this picture",
    "an illustration of {obj} shown over a {bg} background",
    "a flat graphic of {obj} with a {bg} background",
    "{Obj} drawn on a {bg} background",
)


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def english_caption(c: Concept, template: int, shape_syn: int, colour_syn: int, bg_syn: int) -> str:
    shapes = EN_SHAPES[c.shape_name]
    colours = EN_COLOURS[c.colour_name]
    bgs = EN_BACKGROUNDS[c.background_name]
    obj = _article(f"{colours[colour_syn % len(colours)]} {shapes[shape_syn % len(shapes)]}")
    text = EN_TEMPLATES[template % len(EN_TEMPLATES)]
    return text.format(obj=obj, Obj=obj[0].upper() + obj[1:], bg=bgs[bg_syn % len(bgs)])


def short_caption(c: Concept, choice: int) -> str:
    """At most two words or at most five characters."""
    options = (c.shape_name, f"{c.colour_name} {c.shape_name}", c.colour_name, "image", "photo", "IMG")
    return options[choice % len(options)]


# ------------------------------------------------------------------------------- other languages
# Nouns carry their grammatical gender ("m", "f" or "n"); colour adjectives give (masculine, feminine)
# forms, or for German the stem that takes the case ending.

FR_SHAPES = {
    "circle": ("cercle", "m"), "square": ("carré", "m"), "triangle": ("triangle", "m"), "star": ("étoile", "f"),
    "hexagon": ("hexagone", "m"), "cross": ("croix", "f"), "diamond": ("losange", "m"), "ring": ("anneau", "m"),
}
FR_COLOURS = {
    "red": ("rouge", "rouge"), "orange": ("orange", "orange"), "yellow": ("jaune", "jaune"),
    "green": ("vert", "verte"), "cyan": ("turquoise", "turquoise"), "blue": ("bleu", "bleue"),
    "purple": ("violet", "violette"), "pink": ("rose", "rose"),
}
FR_BACKGROUNDS = {"light": "fond blanc", "dark": "fond sombre", "stripes": "fond rayé", "checker": "fond à carreaux"}
FR_TEMPLATES = (
    "Une photo d'{art} {shape} {colour} sur un {bg}.",
    "Sur cette image, on voit {art} {shape} {colour} devant un {bg}.",
    "Cette image montre {art} {shape} {colour} sur un {bg}.",
    "Voici {art} {shape} {colour} {drawn} sur un {bg}.",
)

DE_SHAPES = {
    "circle": ("Kreis", "m"), "square": ("Quadrat", "n"), "triangle": ("Dreieck", "n"), "star": ("Stern", "m"),
    "hexagon": ("Sechseck", "n"), "cross": ("Kreuz", "n"), "diamond": ("Raute", "f"), "ring": ("Ring", "m"),
}
DE_COLOURS = {
    "red": "rot", "orange": "orangefarben", "yellow": "gelb", "green": "grün", "cyan": "türkis",
    "blue": "blau", "purple": "violett", "pink": "rosafarben",
}
DE_BACKGROUNDS = {
    "light": "weißen Hintergrund", "dark": "dunklen Hintergrund", "stripes": "gestreiften Hintergrund",
    "checker": "karierten Hintergrund",
}
# indefinite article and adjective ending by case and gender
DE_ARTICLE = {
    "nom": {"m": ("ein", "er"), "n": ("ein", "es"), "f": ("eine", "e")},
    "acc": {"m": ("einen", "en"), "n": ("ein", "es"), "f": ("eine", "e")},
    "dat": {"m": ("einem", "en"), "n": ("einem", "en"), "f": ("einer", "en")},
}
DE_TEMPLATES = (
    ("Ein Foto von {obj} auf einem {bg}.", "dat"),
    ("Auf diesem Bild sieht man {obj} vor einem {bg}.", "acc"),
    ("Das Bild zeigt {obj} auf einem {bg}.", "acc"),
    ("Hier ist {obj} auf einem {bg} zu sehen.", "nom"),
)

ES_SHAPES = {
    "circle": ("círculo", "m"), "square": ("cuadrado", "m"), "triangle": ("triángulo", "m"), "star": ("estrella", "f"),
    "hexagon": ("hexágono", "m"), "cross": ("cruz", "f"), "diamond": ("rombo", "m"), "ring": ("anillo", "m"),
}
ES_COLOURS = {
    "red": ("rojo", "roja"), "orange": ("naranja", "naranja"), "yellow": ("amarillo", "amarilla"),
    "green": ("verde", "verde"), "cyan": ("turquesa", "turquesa"), "blue": ("azul", "azul"),
    "purple": ("morado", "morada"), "pink": ("rosa", "rosa"),
}
ES_BACKGROUNDS = {"light": "fondo blanco", "dark": "fondo oscuro", "stripes": "fondo de rayas", "checker": "fondo de cuadros"}
ES_TEMPLATES = (
    "Una foto de {art} {shape} {colour} sobre un {bg}.",
    "En esta imagen se ve {art} {shape} {colour} delante de un {bg}.",
    "La imagen muestra {art} {shape} {colour} sobre un {bg}.",
    "Hay {art} {shape} {colour} {drawn} sobre un {bg}.",
)

IT_SHAPES = {
    "circle": ("cerchio", "m"), "square": ("quadrato", "m"), "triangle": ("triangolo", "m"), "star": ("stella", "f"),
    "hexagon": ("esagono", "m"), "cross": ("croce", "f"), "diamond": ("rombo", "m"), "ring": ("anello", "m"),
}
IT_COLOURS = {
    "red": ("rosso", "rossa"), "orange": ("arancione", "arancione"), "yellow": ("giallo", "gialla"),
    "green": ("verde", "verde"), "cyan": ("turchese", "turchese"), "blue": ("blu", "blu"),
    "purple": ("viola", "viola"), "pink": ("rosa", "rosa"),
}
IT_BACKGROUNDS = {"light": "sfondo bianco", "dark": "sfondo scuro", "stripes": "sfondo a strisce", "checker": "sfondo a scacchi"}
IT_TEMPLATES = (
    "Una foto di {art} {shape} {colour} su uno {bg}.",
    "In questa immagine si vede {art} {shape} {colour} davanti a uno {bg}.",
    "L'immagine mostra {art} {shape} {colour} su uno {bg}.",
    "C'è {art} {shape} {colour} {drawn} su uno {bg}.",
)

PT_SHAPES = {
    "circle": ("círculo", "m"), "square": ("quadrado", "m"), "triangle": ("triângulo", "m"), "star": ("estrela", "f"),
    "hexagon": ("hexágono", "m"), "cross": ("cruz", "f"), "diamond": ("losango", "m"), "ring": ("anel", "m"),
}
PT_COLOURS = {
    "red": ("vermelho", "vermelha"), "orange": ("laranja", "laranja"), "yellow": ("amarelo", "amarela"),
    "green": ("verde", "verde"), "cyan": ("turquesa", "turquesa"), "blue": ("azul", "azul"),
    "purple": ("roxo", "roxa"), "pink": ("rosa", "rosa"),
}
PT_BACKGROUNDS = {"light": "fundo branco", "dark": "fundo escuro", "stripes": "fundo listrado", "checker": "fundo xadrez"}
PT_TEMPLATES = (
    "Uma foto de {art} {shape} {colour} sobre um {bg}.",
    "Nesta imagem vemos {art} {shape} {colour} na frente de um {bg}.",
    "A imagem mostra {art} {shape} {colour} em cima de um {bg}.",
    "Há {art} {shape} {colour} {drawn} sobre um {bg}.",
)

FOREIGN_LANGUAGES: tuple[str, ...] = ("fr", "de", "es", "it", "pt")


def _romance(c: Concept, template: str, shapes, colours, bgs, articles: tuple[str, str], drawn: tuple[str, str]) -> str:
    noun, gender = shapes[c.shape_name]
    g = 0 if gender == "m" else 1
    return template.format(
        art=articles[g], shape=noun, colour=colours[c.colour_name][g], bg=bgs[c.background_name], drawn=drawn[g]
    )


def foreign_caption(c: Concept, language: str, template: int) -> str:
    """A sentence of at least five words describing concept ``c`` in ``language``."""
    if language == "fr":
        return _romance(c, FR_TEMPLATES[template % len(FR_TEMPLATES)], FR_SHAPES, FR_COLOURS, FR_BACKGROUNDS,
                        ("un", "une"), ("dessiné", "dessinée"))
    if language == "es":
        return _romance(c, ES_TEMPLATES[template % len(ES_TEMPLATES)], ES_SHAPES, ES_COLOURS, ES_BACKGROUNDS,
                        ("un", "una"), ("dibujado", "dibujada"))
    if language == "it":
        return _romance(c, IT_TEMPLATES[template % len(IT_TEMPLATES)], IT_SHAPES, IT_COLOURS, IT_BACKGROUNDS,
                        ("un", "una"), ("disegnato", "disegnata"))
    if language == "pt":
        return _romance(c, PT_TEMPLATES[template % len(PT_TEMPLATES)], PT_SHAPES, PT_COLOURS, PT_BACKGROUNDS,
                        ("um", "uma"), ("desenhado", "desenhada"))
    if language == "de":
        text, case = DE_TEMPLATES[template % len(DE_TEMPLATES)]
        noun, gender = DE_SHAPES[c.shape_name]
        article, ending = DE_ARTICLE[case][gender]
        return text.format(obj=f"{article} {DE_COLOURS[c.colour_name]}{ending} {noun}", bg=DE_BACKGROUNDS[c.background_name])
    raise ValueError(f"no captions for language {language!r}")
