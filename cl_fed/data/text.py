"""Seeded factory-floor utterances in English, German, Spanish and French, plus code-switched speech.

Every utterance comes from a template (command, status report, part count, alarm, measurement)
filled with a machine or part name from one vocabulary domain and numbers spoken as words.
Code-switched codes ("de-en", "es-en", "fr-en") use the first language as the matrix language
and insert the English machine and part names, with the matrix language's article for the
noun's gender there ("der robot arm", "la conveyor belt", "du labeling machine").

`make_utterance` returns (language, text) segments whose texts are already normalised with
`cl_fed.textnorm.normalize_text`, so " ".join of them is the transcript.
"""

import random
import re

from cl_fed.textnorm import normalize_text

LANGUAGES = ("en", "de", "es", "fr")
CODE_SWITCHED = ("de-en", "es-en", "fr-en")
ALL_LANGUAGE_CODES = LANGUAGES + CODE_SWITCHED

# ---- numbers -----------------------------------------------------------------------------------

_EN_ONES = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen"
).split()
_EN_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()

_DE_ONES = (
    "null eins zwei drei vier fünf sechs sieben acht neun zehn elf zwölf dreizehn vierzehn fünfzehn "
    "sechzehn siebzehn achtzehn neunzehn"
).split()
_DE_TENS = "_ _ zwanzig dreißig vierzig fünfzig sechzig siebzig achtzig neunzig".split()

_ES_ONES = (
    "cero uno dos tres cuatro cinco seis siete ocho nueve diez once doce trece catorce quince dieciséis "
    "diecisiete dieciocho diecinueve veinte veintiuno veintidós veintitrés veinticuatro veinticinco "
    "veintiséis veintisiete veintiocho veintinueve"
).split()
_ES_TENS = "_ _ _ treinta cuarenta cincuenta sesenta setenta ochenta noventa".split()
_ES_HUNDREDS = (
    "_ ciento doscientos trescientos cuatrocientos quinientos seiscientos setecientos ochocientos novecientos"
).split()

_FR_ONES = (
    "zéro un deux trois quatre cinq six sept huit neuf dix onze douze treize quatorze quinze seize".split()
)
_FR_TENS = "_ _ vingt trente quarante cinquante soixante".split()


def _en(n: int) -> str:
    if n < 20:
        return _EN_ONES[n]
    if n < 100:
        return _EN_TENS[n // 10] + (f"-{_EN_ONES[n % 10]}" if n % 10 else "")
    if n < 1000:
        return f"{_EN_ONES[n // 100]} hundred" + (f" {_en(n % 100)}" if n % 100 else "")
    return f"{_EN_ONES[n // 1000]} thousand" + (f" {_en(n % 1000)}" if n % 1000 else "")


def _de_below_100(n: int) -> str:
    if n < 20:
        return _DE_ONES[n]
    unit = n % 10
    if unit == 0:
        return _DE_TENS[n // 10]
    return ("ein" if unit == 1 else _DE_ONES[unit]) + "und" + _DE_TENS[n // 10]


def _de(n: int) -> str:
    if n == 0:
        return "null"
    thousands, hundreds, rest = n // 1000, n // 100 % 10, n % 100
    words = ""
    if thousands:
        words += ("ein" if thousands == 1 else _DE_ONES[thousands]) + "tausend"
    if hundreds:
        words += ("ein" if hundreds == 1 else _DE_ONES[hundreds]) + "hundert"
    return words + (_de_below_100(rest) if rest else "")


def _es_below_1000(n: int) -> str:
    hundreds, rest = divmod(n, 100)
    if rest < 30:
        tail = _ES_ONES[rest]
    else:
        tail = _ES_TENS[rest // 10] + (f" y {_ES_ONES[rest % 10]}" if rest % 10 else "")
    if hundreds == 0:
        return tail
    if n == 100:
        return "cien"
    return _ES_HUNDREDS[hundreds] + (f" {tail}" if rest else "")


def _es(n: int) -> str:
    thousands, rest = divmod(n, 1000)
    if thousands == 0:
        return _es_below_1000(n)
    head = "mil" if thousands == 1 else f"{_ES_ONES[thousands]} mil"
    return head + (f" {_es_below_1000(rest)}" if rest else "")


def _fr_below_100(n: int) -> str:
    if n <= 16:
        return _FR_ONES[n]
    if n < 20:
        return f"dix-{_FR_ONES[n - 10]}"
    if n < 70:
        tens, unit = divmod(n, 10)
        if unit == 0:
            return _FR_TENS[tens]
        return f"{_FR_TENS[tens]} et un" if unit == 1 else f"{_FR_TENS[tens]}-{_FR_ONES[unit]}"
    if n < 80:
        return "soixante et onze" if n == 71 else f"soixante-{_fr_below_100(n - 60)}"
    if n == 80:
        return "quatre-vingts"
    return f"quatre-vingt-{_fr_below_100(n - 80)}"


def _fr_below_1000(n: int) -> str:
    hundreds, rest = divmod(n, 100)
    if hundreds == 0:
        return _fr_below_100(rest)
    head = "cent" if hundreds == 1 else f"{_FR_ONES[hundreds]} cent"
    if rest == 0:
        return head if hundreds == 1 else head + "s"  # "deux cents", but "deux cent un"
    return f"{head} {_fr_below_100(rest)}"


def _fr(n: int) -> str:
    thousands, rest = divmod(n, 1000)
    if thousands == 0:
        return _fr_below_1000(n)
    head = "mille" if thousands == 1 else f"{_FR_ONES[thousands]} mille"
    return head + (f" {_fr_below_1000(rest)}" if rest else "")


_NUMBER_WORDS = {"en": _en, "de": _de, "es": _es, "fr": _fr}


def number_to_words(n: int, lang: str) -> str:
    """Cardinal number 0..9999 in words, in standard spelling ("quatre-vingt-dix", "einundzwanzig").

    Hyphens are kept; normalize_text turns them into spaces.
    """
    if lang not in _NUMBER_WORDS:
        raise ValueError(f"number_to_words: language {lang!r} is not one of {', '.join(_NUMBER_WORDS)}")
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= 9999:
        raise ValueError(f"number_to_words: {n!r} is not an integer in 0..9999")
    return _NUMBER_WORDS[lang](n)


def count_words(n: int, lang: str, gender: str) -> str:
    """A count before a noun of the given gender ("m", "f", "n"): agreement for es and fr.

    Spanish: "veintiún tornillos", "veintiuna cajas", "doscientas cajas"; French: "vingt et une vis".
    """
    words = number_to_words(n, lang)
    if lang == "es":
        if gender == "f":
            words = re.sub(r"ientos\b", "ientas", words)
            words = re.sub(r"uno$", "una", words)
        else:
            words = re.sub(r"veintiuno$", "veintiún", words)
            words = re.sub(r"\buno$", "un", words)
    elif lang == "fr" and gender == "f":
        words = re.sub(r"\bun$", "une", words)
    return words


# ---- vocabulary --------------------------------------------------------------------------------
# One concept per row, aligned over languages: English (singular, plural), then for de/es/fr
# (singular, plural, gender). Code-switched speech uses the English name with the matrix gender.


def _concepts(rows: str) -> list[dict]:
    out = []
    for line in rows.strip().splitlines():
        en, de, es, fr = (cell.strip() for cell in line.split("|"))
        concept = {"en": tuple(en.split("/")) + ("n",)}
        for lang, cell in (("de", de), ("es", es), ("fr", fr)):
            forms, gender = cell.rsplit(" ", 1)
            sg, pl = forms.split("/")
            concept[lang] = (sg, pl, gender)
        out.append(concept)
    return out


VOCABULARY = {
    "assembly": {
        "machines": _concepts(
            "robot arm/robot arms | roboterarm/roboterarme m | brazo robótico/brazos robóticos m"
            " | bras robotisé/bras robotisés m\n"
            "conveyor belt/conveyor belts | förderband/förderbänder n"
            " | cinta transportadora/cintas transportadoras f | tapis roulant/tapis roulants m\n"
            "screwdriver station/screwdriver stations | schraubstation/schraubstationen f"
            " | estación de atornillado/estaciones de atornillado f"
            " | poste de vissage/postes de vissage m\n"
            "press/presses | presse/pressen f | prensa/prensas f | presse/presses f\n"
            "torque wrench/torque wrenches | drehmomentschlüssel/drehmomentschlüssel m"
            " | llave dinamométrica/llaves dinamométricas f | clé dynamométrique/clés dynamométriques f\n"
        ),
        "parts": _concepts(
            "screw/screws | schraube/schrauben f | tornillo/tornillos m | vis/vis f\n"
            "bolt/bolts | bolzen/bolzen m | perno/pernos m | boulon/boulons m\n"
            "bracket/brackets | halterung/halterungen f | soporte/soportes m | support/supports m\n"
            "housing/housings | gehäuse/gehäuse n | carcasa/carcasas f | boîtier/boîtiers m\n"
            "gear/gears | zahnrad/zahnräder n | engranaje/engranajes m | engrenage/engrenages m\n"
            "washer/washers | unterlegscheibe/unterlegscheiben f | arandela/arandelas f"
            " | rondelle/rondelles f\n"
        ),
    },
    "welding": {
        "machines": _concepts(
            "welding robot/welding robots | schweißroboter/schweißroboter m"
            " | robot de soldadura/robots de soldadura m | robot de soudage/robots de soudage m\n"
            "spot welder/spot welders | punktschweißgerät/punktschweißgeräte n"
            " | soldadora por puntos/soldadoras por puntos f | soudeuse par points/soudeuses par points f\n"
            "welding torch/welding torches | schweißbrenner/schweißbrenner m"
            " | antorcha de soldadura/antorchas de soldadura f | torche de soudage/torches de soudage f\n"
            "fume extractor/fume extractors | absauganlage/absauganlagen f"
            " | extractor de humos/extractores de humos m | aspirateur de fumées/aspirateurs de fumées m\n"
            "plasma cutter/plasma cutters | plasmaschneider/plasmaschneider m"
            " | cortadora de plasma/cortadoras de plasma f | découpeuse plasma/découpeuses plasma f\n"
        ),
        "parts": _concepts(
            "weld seam/weld seams | schweißnaht/schweißnähte f"
            " | cordón de soldadura/cordones de soldadura m | cordon de soudure/cordons de soudure m\n"
            "electrode/electrodes | elektrode/elektroden f | electrodo/electrodos m"
            " | électrode/électrodes f\n"
            "steel plate/steel plates | stahlplatte/stahlplatten f | placa de acero/placas de acero f"
            " | plaque d'acier/plaques d'acier f\n"
            "nozzle/nozzles | düse/düsen f | boquilla/boquillas f | buse/buses f\n"
            "wire spool/wire spools | drahtrolle/drahtrollen f | bobina de alambre/bobinas de alambre f"
            " | bobine de fil/bobines de fil f\n"
            "frame/frames | rahmen/rahmen m | bastidor/bastidores m | châssis/châssis m\n"
        ),
    },
    "packaging": {
        "machines": _concepts(
            "labeling machine/labeling machines | etikettiermaschine/etikettiermaschinen f"
            " | etiquetadora/etiquetadoras f | étiqueteuse/étiqueteuses f\n"
            "pallet wrapper/pallet wrappers | palettenwickler/palettenwickler m"
            " | envolvedora de palés/envolvedoras de palés f | banderoleuse/banderoleuses f\n"
            "carton sealer/carton sealers | kartonverschließer/kartonverschließer m"
            " | precintadora/precintadoras f | fermeuse de cartons/fermeuses de cartons f\n"
            "filling machine/filling machines | abfüllmaschine/abfüllmaschinen f | llenadora/llenadoras f"
            " | remplisseuse/remplisseuses f\n"
            "shrink tunnel/shrink tunnels | schrumpftunnel/schrumpftunnel m"
            " | túnel de retracción/túneles de retracción m"
            " | tunnel de rétraction/tunnels de rétraction m\n"
        ),
        "parts": _concepts(
            "carton/cartons | karton/kartons m | caja/cajas f | carton/cartons m\n"
            "label/labels | etikett/etiketten n | etiqueta/etiquetas f | étiquette/étiquettes f\n"
            "bottle/bottles | flasche/flaschen f | botella/botellas f | bouteille/bouteilles f\n"
            "lid/lids | deckel/deckel m | tapa/tapas f | couvercle/couvercles m\n"
            "pallet/pallets | palette/paletten f | palé/palés m | palette/palettes f\n"
            "film roll/film rolls | folienrolle/folienrollen f | rollo de film/rollos de film m"
            " | rouleau de film/rouleaux de film m\n"
        ),
    },
    "logistics": {
        "machines": _concepts(
            "forklift/forklifts | gabelstapler/gabelstapler m"
            " | carretilla elevadora/carretillas elevadoras f | chariot élévateur/chariots élévateurs m\n"
            "loading dock/loading docks | laderampe/laderampen f | muelle de carga/muelles de carga m"
            " | quai de chargement/quais de chargement m\n"
            "high bay rack/high bay racks | hochregal/hochregale n | estantería alta/estanterías altas f"
            " | rayonnage/rayonnages m\n"
            "sorting conveyor/sorting conveyors | sortierband/sortierbänder n"
            " | clasificadora/clasificadoras f | trieuse/trieuses f\n"
            "pallet truck/pallet trucks | hubwagen/hubwagen m | transpaleta/transpaletas f"
            " | transpalette/transpalettes m\n"
        ),
        "parts": _concepts(
            "crate/crates | kiste/kisten f | cajón/cajones m | caisse/caisses f\n"
            "container/containers | behälter/behälter m | contenedor/contenedores m"
            " | conteneur/conteneurs m\n"
            "parcel/parcels | paket/pakete n | paquete/paquetes m | colis/colis m\n"
            "order/orders | auftrag/aufträge m | pedido/pedidos m | commande/commandes f\n"
            "shipment/shipments | sendung/sendungen f | envío/envíos m | expédition/expéditions f\n"
            "spare part/spare parts | ersatzteil/ersatzteile n | repuesto/repuestos m"
            " | pièce de rechange/pièces de rechange f\n"
        ),
    },
    "painting": {
        "machines": _concepts(
            "spray booth/spray booths | lackierkabine/lackierkabinen f"
            " | cabina de pintura/cabinas de pintura f | cabine de peinture/cabines de peinture f\n"
            "paint robot/paint robots | lackierroboter/lackierroboter m"
            " | robot de pintura/robots de pintura m | robot de peinture/robots de peinture m\n"
            "drying oven/drying ovens | trockenofen/trockenöfen m | horno de secado/hornos de secado m"
            " | four de séchage/fours de séchage m\n"
            "spray gun/spray guns | spritzpistole/spritzpistolen f"
            " | pistola pulverizadora/pistolas pulverizadoras f"
            " | pistolet de peinture/pistolets de peinture m\n"
            "mixing tank/mixing tanks | mischbehälter/mischbehälter m | tanque de mezcla/tanques de mezcla m"
            " | cuve de mélange/cuves de mélange f\n"
        ),
        "parts": _concepts(
            "car body/car bodies | karosserie/karosserien f | carrocería/carrocerías f"
            " | carrosserie/carrosseries f\n"
            "filter mat/filter mats | filtermatte/filtermatten f | manta filtrante/mantas filtrantes f"
            " | tapis filtrant/tapis filtrants m\n"
            "paint can/paint cans | farbdose/farbdosen f | lata de pintura/latas de pintura f"
            " | pot de peinture/pots de peinture m\n"
            "masking tape/masking tapes | abdeckband/abdeckbänder n"
            " | cinta de enmascarar/cintas de enmascarar f"
            " | ruban de masquage/rubans de masquage m\n"
            "hose/hoses | schlauch/schläuche m | manguera/mangueras f | tuyau/tuyaux m\n"
            "bumper/bumpers | stoßfänger/stoßfänger m | parachoques/parachoques m | pare-chocs/pare-chocs m\n"
        ),
    },
    "food": {
        "machines": _concepts(
            "mixer/mixers | rührwerk/rührwerke n | mezcladora/mezcladoras f | mélangeur/mélangeurs m\n"
            "bottling line/bottling lines | abfüllanlage/abfüllanlagen f"
            " | línea de embotellado/líneas de embotellado f"
            " | ligne d'embouteillage/lignes d'embouteillage f\n"
            "cooling tunnel/cooling tunnels | kühltunnel/kühltunnel m"
            " | túnel de enfriamiento/túneles de enfriamiento m"
            " | tunnel de refroidissement/tunnels de refroidissement m\n"
            "pasteurizer/pasteurizers | pasteurisierer/pasteurisierer m"
            " | pasteurizadora/pasteurizadoras f | pasteurisateur/pasteurisateurs m\n"
            "slicer/slicers | schneidemaschine/schneidemaschinen f | cortadora/cortadoras f"
            " | trancheuse/trancheuses f\n"
        ),
        "parts": _concepts(
            "tray/trays | tablett/tabletts n | bandeja/bandejas f | plateau/plateaux m\n"
            "sack/sacks | sack/säcke m | saco/sacos m | sac/sacs m\n"
            "jar/jars | glas/gläser n | tarro/tarros m | bocal/bocaux m\n"
            "valve/valves | ventil/ventile n | válvula/válvulas f | vanne/vannes f\n"
            "seal/seals | dichtung/dichtungen f | junta/juntas f | joint/joints m\n"
            "batch/batches | charge/chargen f | lote/lotes m | lot/lots m\n"
        ),
    },
}
DOMAINS = tuple(VOCABULARY)

# ---- templates ---------------------------------------------------------------------------------
# Slots: {M} machine with definite article (German nominative), {M_acc} German accusative,
# {M_of} "of the machine", {M_at} "at the machine"; {P} part plural after a count {N};
# numbers {N} (count of {P}), {LINE}, {PCT}, {TEMP}, {BAR}, {MM}, {SEC}, {CODE}.

TEMPLATES = {
    "en": (
        "start {M}",
        "stop {M} on line {LINE}",
        "please restart {M}",
        "move {N} {P} to station {LINE}",
        "set {M} to {PCT} percent",
        "{M} is running at {PCT} percent",
        "{M} on line {LINE} is ready",
        "{M} has finished a batch of {N} {P}",
        "we need {N} more {P}",
        "{N} {P} are missing at station {LINE}",
        "counted {N} {P} in bin {LINE}",
        "warning {M} is overheating",
        "alarm error code {CODE} {M_at}",
        "emergency stop on line {LINE}",
        "{M} reports fault {CODE}",
        "the temperature {M_of} is {TEMP} degrees",
        "the pressure {M_at} is {BAR} bar",
        "the gap is {MM} millimetres",
        "the cycle time {M_of} is {SEC} seconds",
    ),
    "de": (
        "starte {M_acc}",
        "stopp {M_acc} an linie {LINE}",
        "bitte {M_acc} neu starten",
        "bring {N} {P} zu station {LINE}",
        "stell {M_acc} auf {PCT} prozent",
        "{M} läuft mit {PCT} prozent",
        "{M} an linie {LINE} ist bereit",
        "{M} hat {N} {P} fertig",
        "wir brauchen noch {N} {P}",
        "an station {LINE} fehlen {N} {P}",
        "in kiste {LINE} liegen {N} {P}",
        "achtung {M} ist überhitzt",
        "alarm fehlercode {CODE} {M_at}",
        "notaus an linie {LINE}",
        "störung {CODE} {M_at}",
        "die temperatur {M_at} liegt bei {TEMP} grad",
        "der druck {M_at} beträgt {BAR} bar",
        "der spalt ist {MM} millimeter",
        "die taktzeit {M_of} beträgt {SEC} sekunden",
    ),
    "es": (
        "arranca {M}",
        "para {M} en la línea {LINE}",
        "por favor reinicia {M}",
        "lleva {N} {P} a la estación {LINE}",
        "pon {M} al {PCT} por ciento",
        "{M} funciona al {PCT} por ciento",
        "{M} de la línea {LINE} ya está en marcha",
        "{M} terminó un lote de {N} {P}",
        "necesitamos {N} {P} más",
        "faltan {N} {P} en la estación {LINE}",
        "hay {N} {P} en el contenedor {LINE}",
        "atención {M} se está sobrecalentando",
        "alarma código de error {CODE} {M_at}",
        "parada de emergencia en la línea {LINE}",
        "fallo {CODE} {M_of}",
        "la temperatura {M_of} es de {TEMP} grados",
        "la presión {M_of} es de {BAR} bares",
        "la separación es de {MM} milímetros",
        "el tiempo de ciclo {M_of} es de {SEC} segundos",
    ),
    "fr": (
        "démarre {M}",
        "arrête {M} sur la ligne {LINE}",
        "redémarre {M} s'il te plaît",
        "amène {N} {P} au poste {LINE}",
        "règle {M} à {PCT} pour cent",
        "{M} tourne à {PCT} pour cent",
        "{M} de la ligne {LINE} est en marche",
        "{M} a terminé un lot de {N} {P}",
        "il nous faut encore {N} {P}",
        "il manque {N} {P} au poste {LINE}",
        "il y a {N} {P} dans le bac {LINE}",
        "attention {M} surchauffe",
        "alarme code d'erreur {CODE} {M_at}",
        "arrêt d'urgence sur la ligne {LINE}",
        "défaut {CODE} {M_of}",
        "la température {M_of} est de {TEMP} degrés",
        "la pression {M_at} est de {BAR} bars",
        "l'écart est de {MM} millimètres",
        "le temps de cycle {M_of} est de {SEC} secondes",
    ),
}

# (low, high, gender of the unit noun for agreement) of each number slot
_NUMBER_SLOTS = {
    "LINE": (1, 12, "f"),
    "PCT": (5, 100, "m"),
    "TEMP": (20, 400, "m"),
    "BAR": (2, 12, "m"),
    "MM": (2, 999, "m"),
    "SEC": (2, 90, "m"),
    "CODE": (100, 9999, "m"),
}
_COUNT_RANGE = (2, 500)  # counts start at 2 so part names are always plural
_SLOT = re.compile(r"\{(\w+)\}")

# Definite articles: (case) -> gender -> article; None = no article form (English uses "the").
_ARTICLES = {
    "en": {"M": "the", "M_acc": "the", "M_of": "of the", "M_at": "at the"},
    "de": {
        "M": {"m": "der", "f": "die", "n": "das"},
        "M_acc": {"m": "den", "f": "die", "n": "das"},
        "M_of": {"m": "vom", "f": "von der", "n": "vom"},
        "M_at": {"m": "am", "f": "an der", "n": "am"},
    },
    "es": {
        "M": {"m": "el", "f": "la"},
        "M_acc": {"m": "el", "f": "la"},
        "M_of": {"m": "del", "f": "de la"},
        "M_at": {"m": "en el", "f": "en la"},
    },
    "fr": {
        "M": {"m": "le", "f": "la"},
        "M_acc": {"m": "le", "f": "la"},
        "M_of": {"m": "du", "f": "de la"},
        "M_at": {"m": "sur le", "f": "sur la"},
    },
}
_NOUN_SLOTS = ("M", "M_acc", "M_of", "M_at", "P")
_FR_ELIDED = {"M": "l'", "M_acc": "l'", "M_of": "de l'", "M_at": "sur l'"}
_FR_VOWELS = tuple("aeiouéèêàâîôû")


def _machine(lang: str, slot: str, concept: dict, switched: bool) -> list[tuple[str, str]]:
    """Article plus machine name; in code-switched speech the name is English with the matrix gender."""
    sg, _, gender = concept[lang]
    name = concept["en"][0] if switched else sg
    article = _ARTICLES[lang][slot]
    if lang != "en":
        article = article[gender]
        if lang == "fr" and not switched and sg.startswith(_FR_VOWELS):
            return [(lang, _FR_ELIDED[slot] + sg)]  # "l'étiqueteuse": one word, one segment
    return [(lang, article), ("en" if switched else lang, name)]


def _merge(parts: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Join neighbouring pieces of the same language, normalise, drop empty ones."""
    segments: list[tuple[str, str]] = []
    for lang, text in parts:
        text = normalize_text(text)
        if not text:
            continue
        if segments and segments[-1][0] == lang:
            segments[-1] = (lang, f"{segments[-1][1]} {text}")
        else:
            segments.append((lang, text))
    return segments


def make_utterance(rng: random.Random, language: str, domain: str) -> list[tuple[str, str]]:
    """One utterance as (language, text) segments; a monolingual utterance is one segment."""
    if language not in ALL_LANGUAGE_CODES:
        raise ValueError(
            f"make_utterance: language {language!r} is not one of {', '.join(ALL_LANGUAGE_CODES)}"
        )
    if domain not in VOCABULARY:
        raise ValueError(f"make_utterance: domain {domain!r} is not one of {', '.join(DOMAINS)}")
    matrix = language.split("-")[0]
    switched = language in CODE_SWITCHED
    templates = TEMPLATES[matrix]
    if switched:  # only templates that name a machine or part can switch into English
        templates = tuple(t for t in templates if any(f"{{{s}}}" in t for s in _NOUN_SLOTS))
    template = rng.choice(templates)
    machine = rng.choice(VOCABULARY[domain]["machines"])
    part = rng.choice(VOCABULARY[domain]["parts"])
    part_gender = part[matrix][2]

    parts: list[tuple[str, str]] = []
    pos = 0
    for match in _SLOT.finditer(template):
        parts.append((matrix, template[pos : match.start()]))
        slot = match.group(1)
        if slot in _ARTICLES[matrix]:
            parts.extend(_machine(matrix, slot, machine, switched))
        elif slot == "P":
            parts.append(("en", part["en"][1]) if switched else (matrix, part[matrix][1]))
        elif slot == "N":
            parts.append((matrix, count_words(rng.randint(*_COUNT_RANGE), matrix, part_gender)))
        else:
            low, high, gender = _NUMBER_SLOTS[slot]
            value = rng.randint(low, high)
            parts.append(
                (
                    matrix,
                    number_to_words(value, matrix)
                    if slot in ("LINE", "CODE")
                    else count_words(value, matrix, gender),
                )
            )
        pos = match.end()
    parts.append((matrix, template[pos:]))
    return _merge(parts)
