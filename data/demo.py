"""The built-in demo dataset: synthetic overhead scenes with captions in ten languages.

    python data/demo.py [--out demo_data]        # or make_demo(Path("demo_data")) from Python

Each 64x64 PNG shows 1-4 buildings, storage tanks or airplanes of one colour, grouped in one corner or
the middle, on grassland, farmland or desert, with or without a road, plus unmentioned trees. Five
captions per image, written in each language from hand-made templates, describe different subsets of
those facts, so no single caption pins down its image and many scenes share most attributes:
retrieval is near chance for an untrained model and far from perfect after a short training.
600 train / 100 val / 200 test images, and `spm.model`, a SentencePiece unigram model trained on the
train captions (XLM-R id rule applies on top, see rsmclip.Tokenizer). Same seed, same bytes.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import sentencepiece
import typer
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: cli.py sits one level up
import cli  # noqa: E402  (its one exit-code rule: `python data/demo.py`)
import files  # noqa: E402

DEMO_DIR = Path(__file__).resolve().parents[1] / "demo_data"  # where train.py and eval.py put the demo
VERSION = "rsmclip-demo 3"  # bump when the output changes: an older demo folder is then rebuilt
SPLITS = {"train": 600, "val": 100, "test": 200}
SEED = 0
SIZE, DRAW = 64, 128  # images are drawn at 128 px and box-filtered down to 64 (anti-aliasing)

KINDS = ("building", "tank", "airplane")
COLOURS = {"red": (200, 52, 40), "white": (236, 236, 228), "blue": (48, 92, 200), "yellow": (232, 198, 40)}
POSITIONS = {"top left": (4, 4, 62, 62), "top right": (66, 4, 124, 62), "bottom left": (4, 66, 62, 124),
             "bottom right": (66, 66, 124, 124), "middle": (35, 35, 93, 93)}  # boxes in 128-px coordinates
# Kinds differ in size as well as shape: small tanks, mid-size buildings, large airplanes. With one size
# for all (6-10 px at 64), the demo recipe never learned kind next to colour: chance after 900 steps.
KIND_SCALE = {"building": 1.2, "tank": 0.75, "airplane": 1.5}
GROUNDS = ("grass", "farmland", "desert")
ROADS = ("none", "horizontal", "vertical")

# ----------------------------------------------------------------------------- captions, ten languages
# Per language: the noun phrase for a count of one kind in one colour ("np", "np0" without colour), five
# templates (singular, plural) aligned across languages, and the phrases they slot in. Noun phrases only
# ever appear as subjects (nominative), so German and Russian need no case tables; "cls" picks the
# numeral and adjective forms (gender, or the Chinese/Korean counter); [one, several] forms for 1 / 2-4.

TEXT = {
    "en": dict(
        np="{num} {col} {noun}", cls={"building": "-", "tank": "-", "airplane": "-"},
        nouns={"building": ["building", "buildings"], "tank": ["storage tank", "storage tanks"],
               "airplane": ["airplane", "airplanes"]},
        nums={"-": ["one", "two", "three", "four"]},
        cols={c: {"-": [c, c]} for c in COLOURS},
        pos={"top left": "in the top left corner", "top right": "in the top right corner",
             "bottom left": "in the bottom left corner", "bottom right": "in the bottom right corner",
             "middle": "in the middle of the image"},
        ground={"grass": "on grassland", "farmland": "on farmland", "desert": "in the desert"},
        road={"none": "No road is visible.", "horizontal": "A road crosses the image from left to right.",
              "vertical": "A road crosses the image from top to bottom."},
        templates=[("{np} {pos}, {ground}.",) * 2,
                   ("There is {np} {pos}. {road}", "There are {np} {pos}. {road}"),
                   ("Seen from above: {np0} {ground}. {road}",) * 2,
                   ("{np} is located {pos}.", "{np} are located {pos}."),
                   ("{np} {ground}.",) * 2]),
    "pt": dict(
        np="{num} {noun} {col}", cls={"building": "m", "tank": "m", "airplane": "m"},
        nouns={"building": ["edifício", "edifícios"], "airplane": ["avião", "aviões"],
               "tank": ["tanque de armazenamento", "tanques de armazenamento"]},
        nums={"m": ["um", "dois", "três", "quatro"]},
        cols={"red": {"m": ["vermelho", "vermelhos"]}, "white": {"m": ["branco", "brancos"]},
              "blue": {"m": ["azul", "azuis"]}, "yellow": {"m": ["amarelo", "amarelos"]}},
        pos={"top left": "no canto superior esquerdo", "top right": "no canto superior direito",
             "bottom left": "no canto inferior esquerdo", "bottom right": "no canto inferior direito",
             "middle": "no centro da imagem"},
        ground={"grass": "num prado", "farmland": "em terras agrícolas", "desert": "no deserto"},
        road={"none": "Não se vê nenhuma estrada.",
              "horizontal": "Uma estrada atravessa a imagem da esquerda para a direita.",
              "vertical": "Uma estrada atravessa a imagem de cima para baixo."},
        templates=[("{np} {pos}, {ground}.",) * 2,
                   ("Há {np} {pos}. {road}",) * 2,
                   ("Vista de cima: {np0} {ground}. {road}",) * 2,
                   ("{np} está localizado {pos}.", "{np} estão localizados {pos}."),
                   ("{np} {ground}.",) * 2]),
    "es": dict(
        np="{num} {noun} {col}", cls={"building": "m", "tank": "m", "airplane": "m"},
        nouns={"building": ["edificio", "edificios"], "airplane": ["avión", "aviones"],
               "tank": ["tanque de almacenamiento", "tanques de almacenamiento"]},
        nums={"m": ["un", "dos", "tres", "cuatro"]},
        cols={"red": {"m": ["rojo", "rojos"]}, "white": {"m": ["blanco", "blancos"]},
              "blue": {"m": ["azul", "azules"]}, "yellow": {"m": ["amarillo", "amarillos"]}},
        pos={"top left": "en la esquina superior izquierda", "top right": "en la esquina superior derecha",
             "bottom left": "en la esquina inferior izquierda",
             "bottom right": "en la esquina inferior derecha", "middle": "en el centro de la imagen"},
        ground={"grass": "sobre un prado", "farmland": "en tierras de cultivo", "desert": "en el desierto"},
        road={"none": "No se ve ninguna carretera.",
              "horizontal": "Una carretera cruza la imagen de izquierda a derecha.",
              "vertical": "Una carretera cruza la imagen de arriba abajo."},
        templates=[("{np} {pos}, {ground}.",) * 2,
                   ("Hay {np} {pos}. {road}",) * 2,
                   ("Vista desde arriba: {np0} {ground}. {road}",) * 2,
                   ("{np} está situado {pos}.", "{np} están situados {pos}."),
                   ("{np} {ground}.",) * 2]),
    "fr": dict(
        np="{num} {noun} {col}", cls={"building": "m", "tank": "m", "airplane": "m"},
        nouns={"building": ["bâtiment", "bâtiments"], "airplane": ["avion", "avions"],
               "tank": ["réservoir de stockage", "réservoirs de stockage"]},
        nums={"m": ["un", "deux", "trois", "quatre"]},
        cols={"red": {"m": ["rouge", "rouges"]}, "white": {"m": ["blanc", "blancs"]},
              "blue": {"m": ["bleu", "bleus"]}, "yellow": {"m": ["jaune", "jaunes"]}},
        pos={"top left": "dans le coin supérieur gauche", "top right": "dans le coin supérieur droit",
             "bottom left": "dans le coin inférieur gauche", "bottom right": "dans le coin inférieur droit",
             "middle": "au centre de l'image"},
        ground={"grass": "sur une prairie", "farmland": "sur des terres agricoles",
                "desert": "dans le désert"},
        road={"none": "Aucune route n'est visible.",
              "horizontal": "Une route traverse l'image de gauche à droite.",
              "vertical": "Une route traverse l'image de haut en bas."},
        templates=[("{np} {pos}, {ground}.",) * 2,
                   ("Il y a {np} {pos}. {road}",) * 2,
                   ("Vue du ciel : {np0} {ground}. {road}",) * 2,
                   ("{np} se trouve {pos}.", "{np} se trouvent {pos}."),
                   ("{np} {ground}.",) * 2]),
    "de": dict(
        np="{num} {col} {noun}", cls={"building": "n", "tank": "m", "airplane": "n"},
        nouns={"building": ["Gebäude", "Gebäude"], "tank": ["Speichertank", "Speichertanks"],
               "airplane": ["Flugzeug", "Flugzeuge"]},
        nums={"m": ["ein", "zwei", "drei", "vier"], "n": ["ein", "zwei", "drei", "vier"]},
        cols={"red": {"m": ["roter", "rote"], "n": ["rotes", "rote"]},
              "white": {"m": ["weißer", "weiße"], "n": ["weißes", "weiße"]},
              "blue": {"m": ["blauer", "blaue"], "n": ["blaues", "blaue"]},
              "yellow": {"m": ["gelber", "gelbe"], "n": ["gelbes", "gelbe"]}},
        pos={"top left": "in der oberen linken Ecke", "top right": "in der oberen rechten Ecke",
             "bottom left": "in der unteren linken Ecke", "bottom right": "in der unteren rechten Ecke",
             "middle": "in der Bildmitte"},
        ground={"grass": "auf einer Wiese", "farmland": "auf Ackerland", "desert": "in der Wüste"},
        road={"none": "Es ist keine Straße zu sehen.",
              "horizontal": "Eine Straße durchquert das Bild von links nach rechts.",
              "vertical": "Eine Straße durchquert das Bild von oben nach unten."},
        templates=[("{np} {pos}, {ground}.",) * 2,
                   ("Zu sehen ist {np} {pos}. {road}", "Zu sehen sind {np} {pos}. {road}"),
                   ("Von oben gesehen: {np0} {ground}. {road}",) * 2,
                   ("{np} befindet sich {pos}.", "{np} befinden sich {pos}."),
                   ("{np} {ground}.",) * 2]),
    "nl": dict(
        np="{num} {col} {noun}", cls={"building": "het", "tank": "de", "airplane": "het"},
        nouns={"building": ["gebouw", "gebouwen"], "tank": ["opslagtank", "opslagtanks"],
               "airplane": ["vliegtuig", "vliegtuigen"]},
        nums={"het": ["een", "twee", "drie", "vier"], "de": ["een", "twee", "drie", "vier"]},
        cols={"red": {"het": ["rood", "rode"], "de": ["rode", "rode"]},
              "white": {"het": ["wit", "witte"], "de": ["witte", "witte"]},
              "blue": {"het": ["blauw", "blauwe"], "de": ["blauwe", "blauwe"]},
              "yellow": {"het": ["geel", "gele"], "de": ["gele", "gele"]}},
        pos={"top left": "in de linkerbovenhoek", "top right": "in de rechterbovenhoek",
             "bottom left": "in de linkeronderhoek", "bottom right": "in de rechteronderhoek",
             "middle": "in het midden van het beeld"},
        ground={"grass": "op een grasveld", "farmland": "op landbouwgrond", "desert": "in de woestijn"},
        road={"none": "Er is geen weg te zien.",
              "horizontal": "Een weg doorkruist het beeld van links naar rechts.",
              "vertical": "Een weg doorkruist het beeld van boven naar beneden."},
        templates=[("{np} {pos}, {ground}.",) * 2,
                   ("Er staat {np} {pos}. {road}", "Er staan {np} {pos}. {road}"),
                   ("Van bovenaf gezien: {np0} {ground}. {road}",) * 2,
                   ("{np} bevindt zich {pos}.", "{np} bevinden zich {pos}."),
                   ("{np} {ground}.",) * 2]),
    "it": dict(
        np="{num} {noun} {col}", cls={"building": "m", "tank": "m", "airplane": "m"},
        nouns={"building": ["edificio", "edifici"], "tank": ["serbatoio", "serbatoi"],
               "airplane": ["aereo", "aerei"]},
        nums={"m": ["un", "due", "tre", "quattro"]},
        cols={"red": {"m": ["rosso", "rossi"]}, "white": {"m": ["bianco", "bianchi"]},
              "blue": {"m": ["blu", "blu"]}, "yellow": {"m": ["giallo", "gialli"]}},
        pos={"top left": "nell'angolo in alto a sinistra", "top right": "nell'angolo in alto a destra",
             "bottom left": "nell'angolo in basso a sinistra",
             "bottom right": "nell'angolo in basso a destra", "middle": "al centro dell'immagine"},
        ground={"grass": "su un prato", "farmland": "su terreni agricoli", "desert": "nel deserto"},
        road={"none": "Non si vede nessuna strada.",
              "horizontal": "Una strada attraversa l'immagine da sinistra a destra.",
              "vertical": "Una strada attraversa l'immagine dall'alto in basso."},
        templates=[("{np} {pos}, {ground}.",) * 2,
                   ("C'è {np} {pos}. {road}", "Ci sono {np} {pos}. {road}"),
                   ("Vista dall'alto: {np0} {ground}. {road}",) * 2,
                   ("{np} si trova {pos}.", "{np} si trovano {pos}."),
                   ("{np} {ground}.",) * 2]),
    "zh": dict(
        np="{num}{col}{noun}", cls={"building": "座", "tank": "个", "airplane": "架"},
        nouns={"building": ["建筑", "建筑"], "tank": ["储罐", "储罐"], "airplane": ["飞机", "飞机"]},
        nums={m: [f"{n}{m}" for n in ("一", "两", "三", "四")] for m in ("座", "个", "架")},
        cols={c: {m: [w, w] for m in ("座", "个", "架")}
              for c, w in {"red": "红色", "white": "白色", "blue": "蓝色", "yellow": "黄色"}.items()},
        pos={"top left": "左上角", "top right": "右上角", "bottom left": "左下角", "bottom right": "右下角",
             "middle": "图像中央"},
        ground={"grass": "草地上", "farmland": "农田里", "desert": "沙漠中"},
        road={"none": "图中没有道路。", "horizontal": "一条道路从左到右横穿图像。",
              "vertical": "一条道路从上到下纵贯图像。"},
        templates=[("{ground}，{pos}有{np}。",) * 2,
                   ("{pos}有{np}。{road}",) * 2,
                   ("俯瞰：{ground}有{np0}。{road}",) * 2,
                   ("{np}位于{pos}。",) * 2,
                   ("{ground}有{np}。",) * 2]),
    "ko": dict(
        np="{col} {noun} {num}", cls={"building": "채", "tank": "개", "airplane": "대"},
        nouns={"building": ["건물", "건물"], "tank": ["저장 탱크", "저장 탱크"],
               "airplane": ["비행기", "비행기"]},
        nums={m: [f"{n} {m}" for n in ("한", "두", "세", "네")] for m in ("채", "개", "대")},
        cols={c: {m: [w, w] for m in ("채", "개", "대")}
              for c, w in {"red": "빨간", "white": "흰", "blue": "파란", "yellow": "노란"}.items()},
        pos={"top left": "왼쪽 위", "top right": "오른쪽 위", "bottom left": "왼쪽 아래",
             "bottom right": "오른쪽 아래", "middle": "이미지 중앙"},
        ground={"grass": "초원", "farmland": "농경지", "desert": "사막"},
        road={"none": "도로는 보이지 않습니다.",
              "horizontal": "도로 하나가 이미지를 왼쪽에서 오른쪽으로 가로지릅니다.",
              "vertical": "도로 하나가 이미지를 위에서 아래로 가로지릅니다."},
        # every counter (채, 개, 대) ends in a vowel, so the particles are always 가 and 는
        templates=[("{ground}의 {pos}에 {np}가 있습니다.",) * 2,
                   ("{pos}에 {np}가 있습니다. {road}",) * 2,
                   ("위에서 본 모습: {ground}에 {np0}가 있습니다. {road}",) * 2,
                   ("{np}는 {pos}에 위치해 있습니다.",) * 2,
                   ("{ground}에 {np}가 있습니다.",) * 2]),
    "ru": dict(
        # after 2-4 a masculine/neuter noun takes the genitive singular and its adjective the genitive plural
        np="{num} {col} {noun}", cls={"building": "n", "tank": "m", "airplane": "m"},
        nouns={"building": ["здание", "здания"], "tank": ["резервуар", "резервуара"],
               "airplane": ["самолёт", "самолёта"]},
        nums={"m": ["один", "два", "три", "четыре"], "n": ["одно", "два", "три", "четыре"]},
        cols={"red": {"m": ["красный", "красных"], "n": ["красное", "красных"]},
              "white": {"m": ["белый", "белых"], "n": ["белое", "белых"]},
              "blue": {"m": ["синий", "синих"], "n": ["синее", "синих"]},
              "yellow": {"m": ["жёлтый", "жёлтых"], "n": ["жёлтое", "жёлтых"]}},
        pos={"top left": "в левом верхнем углу", "top right": "в правом верхнем углу",
             "bottom left": "в левом нижнем углу", "bottom right": "в правом нижнем углу",
             "middle": "в центре снимка"},
        ground={"grass": "на лугу", "farmland": "на сельскохозяйственных угодьях", "desert": "в пустыне"},
        road={"none": "Дорог не видно.", "horizontal": "Дорога пересекает снимок слева направо.",
              "vertical": "Дорога пересекает снимок сверху вниз."},
        templates=[("{np} {pos}, {ground}.",) * 2,
                   ("{pos} находится {np}. {road}", "{pos} находятся {np}. {road}"),
                   ("Вид сверху: {np0} {ground}. {road}",) * 2,
                   ("{np} находится {pos}.", "{np} находятся {pos}."),
                   ("{np} {ground}.",) * 2]),
}


def captions(scene: dict, lang: str) -> list[str]:
    t = TEXT[lang]
    kind, n = scene["kind"], scene["count"]
    form = 0 if n == 1 else 1
    cls = t["cls"][kind]
    parts = dict(num=t["nums"][cls][n - 1], noun=t["nouns"][kind][form])
    slots = dict(np=t["np"].format(col=t["cols"][scene["colour"]][cls][form], **parts),
                 np0=" ".join(t["np"].format(col="", **parts).split()),  # the same phrase without colour
                 pos=t["pos"][scene["position"]], ground=t["ground"][scene["ground"]],
                 road=t["road"][scene["road"]])
    out = []
    for pair in t["templates"]:
        text = pair[form].format(**slots)
        out.append(text[0].upper() + text[1:])
    return out


# ----------------------------------------------------------------------------- scenes and images


def random_scene(rng: np.random.Generator) -> dict:
    return dict(kind=str(rng.choice(KINDS)), colour=str(rng.choice(list(COLOURS))),
                count=int(rng.integers(1, 5)), position=str(rng.choice(list(POSITIONS))),
                ground=str(rng.choice(GROUNDS)), road=str(rng.choice(ROADS)))


def ground_texture(ground: str, rng: np.random.Generator) -> np.ndarray:
    """[DRAW, DRAW, 3] float: a base colour, blotchy low-frequency variation and, for farmland, fields."""
    blotch = np.asarray(Image.fromarray(rng.uniform(0, 255, (8, 8)).astype(np.uint8)).resize(
        (DRAW, DRAW), Image.Resampling.BICUBIC), dtype=np.float32)[..., None] / 255 - 0.5
    if ground == "farmland":  # strips of different crops, along x or y
        palette = np.array([(118, 150, 66), (176, 160, 92), (96, 128, 58), (196, 178, 112)], np.float32)
        edges = np.cumsum(rng.integers(10, 26, 16))
        strip = palette[rng.integers(0, 4, 17)][np.searchsorted(edges, np.arange(DRAW))]
        base = strip[:, None, :] if rng.random() < 0.5 else strip[None, :, :]
        base = np.broadcast_to(base, (DRAW, DRAW, 3))
    else:
        base = np.array({"grass": (84, 132, 60), "desert": (214, 190, 140)}[ground], np.float32)[None, None]
    return base + 40 * blotch + rng.normal(0, 6, (DRAW, DRAW, 1))


def draw_object(d: ImageDraw.ImageDraw, kind: str, colour: tuple, x: float, y: float,
                rng: np.random.Generator):
    dark = tuple(int(c * 0.55) for c in colour)
    shadow = (40, 40, 40)
    s = KIND_SCALE[kind]
    if kind == "building":
        w, h = rng.integers(16, 25) * s, rng.integers(12, 19) * s
        d.rectangle((x - w / 2 + 2, y - h / 2 + 2, x + w / 2 + 2, y + h / 2 + 2), fill=shadow)
        d.rectangle((x - w / 2, y - h / 2, x + w / 2, y + h / 2), fill=colour, outline=dark)
    elif kind == "tank":
        r = rng.integers(7, 11) * s
        d.ellipse((x - r + 2, y - r + 2, x + r + 2, y + r + 2), fill=shadow)
        d.ellipse((x - r, y - r, x + r, y + r), fill=colour, outline=dark)
        d.ellipse((x - r / 2, y - r / 2, x + r / 2, y + r / 2), outline=dark)
    else:  # an airplane: fuselage, wings and tail as rotated bars
        a = rng.uniform(0, 2 * np.pi)
        rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
        # body, wings and tail along x: (centre x, centre y, half width, half height)
        for cx, cy, hw, hh in ((0, 0, 13, 2.8), (-1, 0, 3, 12), (10, 0, 2.2, 5.5)):
            box = s * np.array([(cx - hw, cy - hh), (cx + hw, cy - hh), (cx + hw, cy + hh),
                                (cx - hw, cy + hh)])
            pts = box @ rot.T + (x, y)
            d.polygon([tuple(p + 1.5) for p in pts], fill=shadow)
            d.polygon([tuple(p) for p in pts], fill=colour)


def render(scene: dict, rng: np.random.Generator) -> Image.Image:
    image = Image.fromarray(np.clip(ground_texture(scene["ground"], rng), 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(image)
    if scene["ground"] != "desert":  # trees nobody mentions: clutter the model must learn to ignore
        for _ in range(rng.integers(0, 9)):
            x, y, r = rng.uniform(0, DRAW), rng.uniform(0, DRAW), rng.uniform(2, 4.5)
            d.ellipse((x - r, y - r, x + r, y + r), fill=(34, 70 + int(rng.integers(0, 25)), 30))
    if scene["road"] != "none":
        at, width = rng.uniform(14, DRAW - 22), rng.uniform(7, 11)
        road = (0, at, DRAW, at + width) if scene["road"] == "horizontal" else (at, 0, at + width, DRAW)
        d.rectangle(road, fill=(104, 104, 100))
        mid = at + width / 2
        for s in range(0, DRAW, 12):  # dashed centre line
            dash = (s, mid - 0.6, s + 6, mid + 0.6)
            d.rectangle(dash if scene["road"] == "horizontal" else (dash[1], dash[0], dash[3], dash[2]),
                        fill=(226, 226, 210))
    jitter = rng.integers(-14, 15, 3)
    colour = tuple(int(c) for c in np.clip(np.array(COLOURS[scene["colour"]]) + jitter, 0, 255))
    x0, y0, x1, y1 = POSITIONS[scene["position"]]
    cells = rng.permutation(4)[: scene["count"]]  # a 2x2 grid in the box: objects never pile up
    placed = [(x0 + 14 + (x1 - x0 - 28) * (c % 2) + rng.uniform(-2.5, 2.5),
               y0 + 14 + (y1 - y0 - 28) * (c // 2) + rng.uniform(-2.5, 2.5)) for c in cells]
    for x, y in placed:
        draw_object(d, scene["kind"], colour, x, y, rng)
    small = np.asarray(image.resize((SIZE, SIZE), Image.Resampling.BOX), dtype=np.float32)
    return Image.fromarray(np.clip(small + rng.normal(0, 3, small.shape), 0, 255).astype(np.uint8))


# ----------------------------------------------------------------------------- the dataset on disk


def train_tokenizer(sentences: list[str]) -> bytes:
    """A small SentencePiece unigram model, XLM-R style (NMT-NFKC, <unk>=0 <s>=1 </s>=2); one thread
    and a fixed seed, so the same captions give the same bytes."""
    sentencepiece.set_random_generator_seed(SEED)
    buf = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=buf, model_type="unigram", vocab_size=1000,
        hard_vocab_limit=False, character_coverage=1.0, num_threads=1, minloglevel=2)
    return buf.getvalue()


def build(folder: Path, seed: int = SEED):
    (folder / "images").mkdir(parents=True)
    records, index = [], 0
    for split, n in SPLITS.items():
        for _ in range(n):
            rng = np.random.default_rng([seed, index])  # one stream per image: order-independent
            scene = random_scene(rng)
            render(scene, rng).save(folder / "images" / f"{index:04d}.png", format="PNG")
            records.append({"id": f"demo/{index:04d}", "image": f"images/{index:04d}.png", "split": split,
                            "dataset": "demo", "scene": scene,
                            "captions": {lang: captions(scene, lang) for lang in TEXT}})
            index += 1
    train_text = [c for r in records if r["split"] == "train"
                  for caps in r["captions"].values() for c in caps]
    (folder / "spm.model").write_bytes(train_tokenizer(train_text))
    with open(folder / "captions.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    (folder / "VERSION").write_text(version(seed) + "\n")


def version(seed: int) -> str:
    return VERSION + ("" if seed == SEED else f", seed {seed}")


def make_demo(out_dir: Path, seed: int = SEED) -> Path:
    """Generate the demo into out_dir unless it is already there; -> the manifest path. Another `seed` draws
    other scenes with the same generator (bench.ablation's variant for pretraining a base).

    Built in a temporary sibling folder and renamed into place, so an interrupted or concurrent run never
    leaves a half-made demo; a demo made by an older version of this file (or another seed) is rebuilt."""
    out_dir, made = Path(out_dir), version(seed)
    manifest, stamp = out_dir / "captions.jsonl", out_dir / "VERSION"
    if stamp.is_file() and stamp.read_text().strip() == made and manifest.is_file():
        return manifest
    if out_dir.exists() and any(out_dir.iterdir()):
        if not stamp.is_file():
            raise FileExistsError(f"{out_dir} exists and is not a demo folder: choose another --out")
        print(f"{out_dir}: made by {stamp.read_text().strip()!r}, rebuilding for {made!r}", file=sys.stderr)
        shutil.rmtree(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    build(tmp, seed)
    try:
        os.replace(tmp, out_dir)  # fails only if another process finished first: keep theirs
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (stamp.is_file() and stamp.read_text().strip() == made):
            raise
    return manifest


# ----------------------------------------------------------------------------- a georeferenced scene

MOSAIC_ORIGIN = ("EPSG:32629", 487000.0, 4290000.0)  # UTM zone 29N, the top-left corner near Lisbon


def write_mosaic(pictures: list[Path], out: Path, columns: int, pixel_m: float = 1.0,
                 origin: tuple[str, float, float] = MOSAIC_ORIGIN) -> Path:
    """Pictures of one size laid edge to edge, row by row, `columns` to a row, as one georeferenced scene:
    a tiled, deflate-compressed GeoTIFF with overviews, north up, `pixel_m` metres per pixel, its top-left
    corner at `origin` (CRS, x, y). A tile of the scene's grid at the pictures' size is one picture, pixel
    for pixel. rasterio is imported here only: the demo itself needs none."""
    import rasterio
    from rasterio.enums import Resampling
    from rasterio.transform import from_origin

    arrays = [np.asarray(Image.open(p).convert("RGB")) for p in pictures]
    h, w, _ = arrays[0].shape
    rows = -(-len(arrays) // columns)
    scene = np.zeros((3, rows * h, columns * w), np.uint8)
    for i, a in enumerate(arrays):
        if a.shape != (h, w, 3):
            raise ValueError(f"{pictures[i]}: {a.shape[1]} x {a.shape[0]} pixels, the others {w} x {h}")
        top, left = i // columns * h, i % columns * w
        scene[:, top:top + h, left:left + w] = a.transpose(2, 0, 1)
    crs, x, y = origin

    def write(tmp: Path):
        with rasterio.open(tmp, "w", driver="GTiff", width=scene.shape[2], height=scene.shape[1], count=3,
                           dtype="uint8", crs=crs, transform=from_origin(x, y, pixel_m, pixel_m), tiled=True,
                           blockxsize=256, blockysize=256, compress="deflate", photometric="RGB") as dst:
            dst.write(scene)
            dst.build_overviews([2, 4, 8], Resampling.average)
    return files.atomic_write(out, write)


def main(out: Path = typer.Option(DEMO_DIR, help="folder to write"),
         mosaic: Optional[Path] = typer.Option(None, help="also write the 200 test images as one "
                                               "georeferenced scene, a GeoTIFF of 20 x 10 of them (1,280 x "
                                               "640 px, 1 m per pixel, UTM 29N), for `rsmclip search`")):
    """Generate the demo dataset (a few seconds; nothing happens if it is already there)."""
    manifest = make_demo(out)
    splits = ", ".join(f"{k} {v}" for k, v in SPLITS.items())
    print(f"demo dataset: {manifest} ({sum(SPLITS.values())} images: {splits}), "
          f"tokenizer {manifest.parent / 'spm.model'}")
    if mosaic:
        test = [manifest.parent / r["image"] for r in map(json.loads, manifest.read_text().splitlines())
                if r["split"] == "test"]
        cli.refuse_overwrite(mosaic, [manifest, *test], "--mosaic")
        write_mosaic(test, mosaic, 20)
        print(f"wrote {files.display(mosaic)}: the {len(test)} test images as one scene, 20 to a row")


if __name__ == "__main__":
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command()(main)
    cli.run_cli(app)
