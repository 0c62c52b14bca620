"""The scenario file: which factories speak what, under which acoustics, stage by stage.

A scenario is a YAML file, validated and fully resolved into frozen dataclasses. A bare name
("default", "tiny") loads the packaged `cl_fed/data/scenarios/<name>.yaml`; anything else is a path.

Schema::

    name: default            # required; letters, digits, '.', '_', '-'
    seed: 0                  # int, default 0
    max_seconds: 10.0        # utterances longer than this are redrawn (default 10.0)
    sites: [factory-a, factory-b]        # required, unique names, >= 1
    foundation:              # optional: centralised pre-training data for the base model
      seed: 0                # int, default: the scenario's seed (seeds the foundation data and base;
                             # a validation copy of a scenario changes `seed` but keeps this one)
      train_utterances: 2000 # int >= 0, default 0
      test_utterances: 100   # int >= 0, default 0
      conditions: {languages: [en], domain: [assembly, packaging]}
    stages:                  # required, ordered, >= 1
      - name: en-noisy       # required, unique, not "foundation"
        test_utterances: 60  # required: one shared test set per stage,
                             # drawn in turn from each site's conditions
        conditions: {...}    # defaults for every site in this stage
        sites:               # optional per-site overrides, merged key by key over `conditions`
          factory-b: {noise: hum, snr_db: [5, 10]}

Condition keys (all optional; a scalar where a range is expected means [x, x]):

    languages         list of en, de, es, fr, de-en, es-en, fr-en (default [en]); one is drawn per utterance
    voices            mapping language -> list of espeak voices; merged per language over the default
                      {en: [en-us, en-gb], de: [de], es: [es, es-419], fr: [fr-fr, fr-be]}
                      (code-switched speech uses the matrix language's voice and the English one)
    variants          list of espeak voice variants (default [m1, m3, f1, f3])
    rate              [min, max] words per minute, within 80..450 (default [150, 190])
    pitch             [min, max] within 0..99 (default [35, 65])
    domain            name or list of assembly, welding, packaging, logistics, painting, food
                      (default assembly)
    noise             none | hum | broadband | mixed (default none)
    snr_db            [min, max] within -20..80 dB (default [20, 30])
    reverb            probability 0..1 of adding reverberation (default 0)
    rt60              [min, max] seconds within 0.05..3.0 (default [0.2, 0.6])
    gain_db           [min, max] within -40..20 dB (default [-6, 0])
    train_utterances  int >= 0 per site and stage (default 100; not allowed under foundation.conditions)

Every problem raises ScenarioError naming the file, the key path (e.g.
`stages[1].sites.factory-b.noise`), the value and what is allowed.
"""

import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cl_fed.data import espeak
from cl_fed.data.acoustics import NOISE_TYPES
from cl_fed.data.text import ALL_LANGUAGE_CODES, DOMAINS, LANGUAGES

# Bump whenever espeak.py, text.py, acoustics.py or synth.py change what gets generated:
# it is part of every fingerprint, so old cached datasets are not reused.
GENERATOR_VERSION = 1

SCENARIO_DIR = Path(__file__).resolve().parent / "scenarios"
FOUNDATION = "foundation"  # stage name of the foundation data
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class ScenarioError(ValueError):
    """A scenario file that cannot be used; the message names the file, key path and value."""


@dataclass(frozen=True)
class Conditions:
    languages: tuple[str, ...]
    voices: dict[str, tuple[str, ...]]
    variants: tuple[str, ...]
    rate: tuple[int, int]
    pitch: tuple[int, int]
    domain: tuple[str, ...]
    noise: str
    snr_db: tuple[float, float]
    reverb: float
    rt60: tuple[float, float]
    gain_db: tuple[float, float]
    train_utterances: int


@dataclass(frozen=True)
class Foundation:
    train_utterances: int
    test_utterances: int
    conditions: Conditions
    seed: int | None = None  # None: the scenario's seed

    def data_seed(self, scenario_seed: int) -> int:
        return scenario_seed if self.seed is None else self.seed


@dataclass(frozen=True)
class Stage:
    name: str
    test_utterances: int
    sites: dict[str, Conditions]  # every scenario site, with stage defaults and its overrides applied


@dataclass(frozen=True)
class Scenario:
    name: str
    seed: int
    max_seconds: float
    sites: tuple[str, ...]
    foundation: Foundation
    stages: tuple[Stage, ...]
    source: str = field(
        default="<memory>", compare=False
    )  # where it was loaded from (not in the fingerprint)

    def to_dict(self) -> dict:
        """The resolved content (everything that decides the generated data)."""
        data = asdict(self)
        del data["source"]
        if data["foundation"]["seed"] is None:  # absent: fingerprints from before the key stay valid
            del data["foundation"]["seed"]
        return data

    def fingerprint(self) -> str:
        """sha256 over the resolved content, GENERATOR_VERSION and the espeak-ng version."""
        payload = {
            "generator_version": GENERATOR_VERSION,
            "espeak": espeak.engine_version(),
            "scenario": self.to_dict(),
        }
        canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    def stage(self, name: str) -> Stage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(
            f"scenario {self.name!r} has no stage {name!r}; stages: {[s.name for s in self.stages]}"
        )


# ---- validation helpers ------------------------------------------------------------------------


class _Checker:
    """Raises ScenarioError with the file name and key path."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, path: str, problem: str, value: Any = ..., allowed: str = "") -> None:
        got = "" if value is ... else f" (got {value!r})"
        hint = f"; allowed: {allowed}" if allowed else ""
        raise ScenarioError(f"{self.source}: {path}: {problem}{got}{hint}")

    def mapping(self, value: Any, path: str, allowed_keys: tuple[str, ...]) -> dict:
        if not isinstance(value, dict):
            self.fail(path or "(top level)", "must be a mapping", value)
        for key in value:
            if key not in allowed_keys:
                self.fail(
                    f"{path}.{key}" if path else str(key), "unknown key", allowed=", ".join(allowed_keys)
                )
        return value

    def integer(self, value: Any, path: str, low: int | None = None, high: int | None = None) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(path, "must be an integer", value)
        if (low is not None and value < low) or (high is not None and value > high):
            self.fail(path, "out of range", value, _span(low, high))
        return value

    def number(self, value: Any, path: str, low: float | None = None, high: float | None = None) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            self.fail(path, "must be a number", value)
        if (low is not None and value < low) or (high is not None and value > high):
            self.fail(path, "out of range", value, _span(low, high))
        return float(value)

    def name(self, value: Any, path: str) -> str:
        if not isinstance(value, str) or not _NAME.match(value):
            self.fail(
                path,
                "must be a name of letters, digits, '.', '_', '-' (starting with a letter or digit)",
                value,
            )
        return value

    def span(self, value: Any, path: str, low: float, high: float, integer: bool = False) -> tuple:
        items = value if isinstance(value, list) else [value, value]
        if len(items) != 2:
            self.fail(path, "must be [min, max] or a single value", value)
        check = self.integer if integer else self.number
        lo, hi = (check(item, f"{path}[{i}]", low, high) for i, item in enumerate(items))
        if lo > hi:
            self.fail(path, "min is greater than max", value)
        return lo, hi

    def choices(
        self, value: Any, path: str, allowed: tuple[str, ...] | set[str], shown: str = "", lower: bool = False
    ) -> tuple:
        items = value if isinstance(value, list) else [value]
        if not items:
            self.fail(path, "must not be empty", value)
        for i, item in enumerate(items):
            key = item.lower() if lower and isinstance(item, str) else item
            if not isinstance(item, str) or key not in allowed:
                at = f"{path}[{i}]" if isinstance(value, list) else path
                self.fail(at, "not allowed", item, shown or ", ".join(sorted(allowed)))
        if len(set(items)) != len(items):
            self.fail(path, "has duplicates", value)
        return tuple(items)


def _span(low, high) -> str:
    if low is None:
        return f"<= {high}"
    return f">= {low}" if high is None else f"{low}..{high}"


_CONDITION_KEYS = (
    "languages",
    "voices",
    "variants",
    "rate",
    "pitch",
    "domain",
    "noise",
    "snr_db",
    "reverb",
    "rt60",
    "gain_db",
    "train_utterances",
)

DEFAULT_CONDITIONS = Conditions(
    languages=("en",),
    voices={"en": ("en-us", "en-gb"), "de": ("de",), "es": ("es", "es-419"), "fr": ("fr-fr", "fr-be")},
    variants=("m1", "m3", "f1", "f3"),
    rate=(150, 190),
    pitch=(35, 65),
    domain=("assembly",),
    noise="none",
    snr_db=(20.0, 30.0),
    reverb=0.0,
    rt60=(0.2, 0.6),
    gain_db=(-6.0, 0.0),
    train_utterances=100,
)


def _parse_conditions(raw: Any, path: str, check: _Checker, allow_train: bool = True) -> dict:
    """Validate a (partial) conditions mapping; returns only the keys given, normalised."""
    if raw is None:
        return {}
    raw = check.mapping(raw, path, _CONDITION_KEYS)
    out: dict[str, Any] = {}
    for key, value in raw.items():
        at = f"{path}.{key}"
        if key == "languages":
            out[key] = check.choices(value, at, ALL_LANGUAGE_CODES)
        elif key == "voices":
            check.mapping(value, at, LANGUAGES)
            voices = espeak.available_voices()
            out[key] = {
                lang: check.choices(
                    names,
                    f"{at}.{lang}",
                    voices,
                    lower=True,
                    shown=", ".join(sorted(v for v in voices if v.split("-")[0] == lang))
                    + " (espeak.available_voices() has all)",
                )
                for lang, names in value.items()
            }
        elif key == "variants":
            out[key] = check.choices(
                value,
                at,
                espeak.available_variants(),
                shown="e.g. m1..m8, f1..f5, klatt (espeak.available_variants() has all)",
            )
        elif key == "rate":
            out[key] = check.span(value, at, 80, 450, integer=True)
        elif key == "pitch":
            out[key] = check.span(value, at, 0, 99, integer=True)
        elif key == "domain":
            out[key] = check.choices(value, at, DOMAINS)
        elif key == "noise":
            if value not in NOISE_TYPES:
                check.fail(at, "unknown noise type", value, ", ".join(NOISE_TYPES))
            out[key] = value
        elif key == "snr_db":
            out[key] = check.span(value, at, -20, 80)
        elif key == "reverb":
            out[key] = check.number(value, at, 0, 1)
        elif key == "rt60":
            out[key] = check.span(value, at, 0.05, 3.0)
        elif key == "gain_db":
            out[key] = check.span(value, at, -40, 20)
        elif key == "train_utterances":
            if not allow_train:
                check.fail(at, "not allowed here; set foundation.train_utterances instead", value)
            out[key] = check.integer(value, at, 0)
    return out


def _merge(base: Conditions, override: dict) -> Conditions:
    values = asdict(base)
    values = {k: (tuple(v) if isinstance(v, list) else v) for k, v in values.items()}
    for key, value in override.items():
        values[key] = {**values["voices"], **value} if key == "voices" else value
    return Conditions(**values)


# ---- loading -----------------------------------------------------------------------------------


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects a key written twice in one mapping (PyYAML keeps the last silently)."""


def _construct_unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def packaged_scenarios() -> list[str]:
    return sorted(p.stem for p in SCENARIO_DIR.glob("*.yaml"))


def scenario_path(path_or_name: str | Path) -> Path:
    """A bare name ("default") -> the packaged file; anything with a '/' or a .yaml/.yml suffix -> a path."""
    text = str(path_or_name)
    if isinstance(path_or_name, Path) or "/" in text or text.endswith((".yaml", ".yml")):
        return Path(path_or_name).expanduser()
    path = SCENARIO_DIR / f"{text}.yaml"
    if not path.is_file():
        raise ScenarioError(
            f"no packaged scenario {text!r}; packaged: {', '.join(packaged_scenarios())}; "
            "or pass a path to a .yaml file"
        )
    return path


def load_scenario(path_or_name: str | Path) -> Scenario:
    """Read, validate and resolve a scenario file (or a packaged scenario by name)."""
    path = scenario_path(path_or_name)
    if not path.is_file():
        raise ScenarioError(f"{path}: scenario file not found")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except yaml.YAMLError as error:
        raise ScenarioError(f"{path}: not valid YAML: {error}") from None
    return parse_scenario(data, source=str(path))


def parse_scenario(data: Any, source: str = "<memory>") -> Scenario:
    """Validate and resolve an already-parsed scenario mapping; `source` names it in errors."""
    check = _Checker(source)
    if data is None:
        check.fail("(top level)", "the scenario is empty")
    check.mapping(data, "", ("name", "seed", "max_seconds", "sites", "foundation", "stages"))
    for key in ("name", "sites", "stages"):
        if key not in data:
            check.fail(key, "required key is missing")
    name = check.name(data["name"], "name")
    seed = check.integer(data.get("seed", 0), "seed")
    max_seconds = check.number(data.get("max_seconds", 10.0), "max_seconds", 0.5, 120)

    sites = data["sites"]
    if not isinstance(sites, list) or not sites:
        check.fail("sites", "must be a non-empty list of site names", sites)
    for i, site in enumerate(sites):
        check.name(site, f"sites[{i}]")
        if site in sites[:i]:
            check.fail(f"sites[{i}]", "duplicate site name", site)

    raw_foundation = check.mapping(
        data.get("foundation") or {},
        "foundation",
        ("seed", "train_utterances", "test_utterances", "conditions"),
    )
    foundation = Foundation(
        train_utterances=check.integer(
            raw_foundation.get("train_utterances", 0), "foundation.train_utterances", 0
        ),
        test_utterances=check.integer(
            raw_foundation.get("test_utterances", 0), "foundation.test_utterances", 0
        ),
        conditions=_merge(
            DEFAULT_CONDITIONS,
            _parse_conditions(
                raw_foundation.get("conditions"), "foundation.conditions", check, allow_train=False
            ),
        ),
        seed=None
        if raw_foundation.get("seed") is None
        else check.integer(raw_foundation["seed"], "foundation.seed"),
    )

    raw_stages = data["stages"]
    if not isinstance(raw_stages, list) or not raw_stages:
        check.fail("stages", "must be a non-empty list of stages", raw_stages)
    stages = []
    for i, raw in enumerate(raw_stages):
        at = f"stages[{i}]"
        check.mapping(raw, at, ("name", "test_utterances", "conditions", "sites"))
        for key in ("name", "test_utterances"):
            if key not in raw:
                check.fail(f"{at}.{key}", "required key is missing")
        stage_name = check.name(raw["name"], f"{at}.name")
        if stage_name == FOUNDATION:
            check.fail(f"{at}.name", f"{FOUNDATION!r} is reserved for the foundation data", stage_name)
        if stage_name in (s.name for s in stages):
            check.fail(f"{at}.name", "duplicate stage name", stage_name)
        test_utterances = check.integer(raw["test_utterances"], f"{at}.test_utterances", 0)
        stage_conditions = _merge(
            DEFAULT_CONDITIONS, _parse_conditions(raw.get("conditions"), f"{at}.conditions", check)
        )
        overrides = raw.get("sites") or {}
        if not isinstance(overrides, dict):
            check.fail(f"{at}.sites", "must be a mapping of site name -> conditions", overrides)
        for site in overrides:
            if site not in sites:
                check.fail(f"{at}.sites.{site}", "unknown site", site, ", ".join(sites))
        resolved = {
            site: _merge(
                stage_conditions, _parse_conditions(overrides.get(site), f"{at}.sites.{site}", check)
            )
            for site in sites
        }
        stages.append(Stage(name=stage_name, test_utterances=test_utterances, sites=resolved))

    return Scenario(
        name=name,
        seed=seed,
        max_seconds=max_seconds,
        sites=tuple(sites),
        foundation=foundation,
        stages=tuple(stages),
        source=source,
    )
