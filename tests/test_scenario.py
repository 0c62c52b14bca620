"""Scenario files: packaged scenarios, resolution of defaults and overrides, fingerprints, and errors."""

import copy

import pytest
import yaml

from cl_fed.data import scenario as scenario_module
from cl_fed.data.scenario import ScenarioError, load_scenario, parse_scenario

BASE = {
    "name": "unit",
    "seed": 3,
    "sites": ["factory-a", "factory-b"],
    "foundation": {"train_utterances": 10, "test_utterances": 2, "conditions": {"languages": ["en"]}},
    "stages": [
        {"name": "s1", "test_utterances": 4, "conditions": {"noise": "broadband", "train_utterances": 5}},
        {
            "name": "s2",
            "test_utterances": 4,
            "conditions": {"languages": ["de", "de-en"], "snr_db": 12},
            "sites": {"factory-b": {"noise": "hum", "snr_db": [5, 10], "voices": {"en": ["en-gb"]}}},
        },
    ],
}


def write(tmp_path, data, name="bad.yaml"):
    path = tmp_path / name
    path.write_text(
        data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False), encoding="utf-8"
    )
    return path


def test_packaged_default_matches_its_plan():
    s = load_scenario("default")
    assert s.name == "default" and len(s.sites) == 4 and len(s.stages) == 3
    assert (s.foundation.train_utterances, s.foundation.test_utterances) == (4800, 200)
    # the base knows every language the stages use (like a pretrained multilingual model)
    known = set(s.foundation.conditions.languages)
    for stage in s.stages:
        assert stage.test_utterances >= 150
        assert all(c.train_utterances == 250 for c in stage.sites.values())
        for c in stage.sites.values():
            assert {part for code in c.languages for part in code.split("-")} <= known
            assert set(c.domain) != set(s.foundation.conditions.domain)  # every stage brings new talk
    assert s.stages[0].sites["factory-a"].noise == "hum" and s.stages[0].sites["factory-a"].snr_db[1] <= 12
    assert all(c.reverb > 0 for c in s.stages[1].sites.values())
    assert set(s.stages[2].sites["factory-c"].languages) == {"es-en", "de-en"}
    # sites differ within every stage
    for stage in s.stages:
        described = {
            (
                c.languages,
                c.noise,
                c.snr_db,
                c.voices["en"],
                c.voices["es"],
                c.reverb,
                c.rt60,
                c.rate,
                c.variants,
                c.gain_db,
            )
            for c in stage.sites.values()
        }
        assert len(described) == 4


def test_the_validation_copy_is_default_with_fresh_stage_speech():
    default, validation = load_scenario("default"), load_scenario("default-validation")
    assert validation.seed != default.seed and validation.foundation.seed == default.seed
    assert validation.stages == default.stages and validation.sites == default.sites
    assert validation.foundation.conditions == default.foundation.conditions
    assert validation.fingerprint() != default.fingerprint()


def test_foundation_seed_is_optional_and_absent_from_old_fingerprints(tmp_path):
    s = load_scenario("tiny")
    assert s.foundation.seed is None and "seed" not in s.to_dict()["foundation"]
    text = (
        (scenario_module.SCENARIO_DIR / "tiny.yaml")
        .read_text()
        .replace("foundation:\n", "foundation:\n  seed: 5\n")
    )
    seeded = load_scenario(write(tmp_path, text, "seeded.yaml"))
    assert seeded.foundation.seed == 5 and seeded.fingerprint() != s.fingerprint()
    with pytest.raises(ScenarioError, match=r"foundation\.seed: must be an integer"):
        load_scenario(write(tmp_path, text.replace("seed: 5", "seed: five"), "bad.yaml"))


def test_packaged_new_languages_keeps_the_english_only_base():
    s = load_scenario("new-languages")
    assert s.name == "new-languages" and len(s.sites) == 4
    assert s.foundation.conditions.languages == ("en",)
    assert [st.name for st in s.stages] == ["en-welding", "de-hum", "es-codeswitch"]
    assert s.stages[1].sites["factory-a"].languages == ("de",)


def test_packaged_tiny_is_small():
    s = load_scenario("tiny")
    assert len(s.sites) == 2 and len(s.stages) == 2
    assert (s.foundation.train_utterances, s.foundation.test_utterances) == (40, 8)
    assert all(st.test_utterances == 6 for st in s.stages)
    assert all(c.train_utterances == 8 for st in s.stages for c in st.sites.values())


def test_defaults_and_site_overrides_are_resolved(tmp_path):
    s = load_scenario(write(tmp_path, BASE, "unit.yaml"))
    a, b = s.stage("s2").sites["factory-a"], s.stage("s2").sites["factory-b"]
    assert a.snr_db == (12.0, 12.0)  # scalar -> [x, x]
    assert (b.noise, b.snr_db) == ("hum", (5.0, 10.0))
    assert b.languages == ("de", "de-en")  # inherited from the stage
    assert b.voices["en"] == ("en-gb",) and b.voices["de"] == ("de",)  # merged per language
    assert a.voices["en"] == ("en-us", "en-gb")
    assert s.stage("s1").sites["factory-a"].train_utterances == 5
    assert s.stage("s2").sites["factory-a"].train_utterances == 100  # schema default
    assert s.foundation.conditions.noise == "none"
    assert s.source.endswith("unit.yaml")


def test_name_versus_path(tmp_path):
    assert load_scenario("tiny") == load_scenario(scenario_module.SCENARIO_DIR / "tiny.yaml")
    with pytest.raises(ScenarioError, match="no packaged scenario 'nope'"):
        load_scenario("nope")
    with pytest.raises(ScenarioError, match="not found"):
        load_scenario(tmp_path / "missing.yaml")


def mutated(path: str, value):
    data = copy.deepcopy(BASE)
    node = data
    keys = path.split("/")
    for key in keys[:-1]:
        node = node[int(key)] if isinstance(node, list) else node[key]
    node[keys[-1]] = value
    return data


def test_fingerprint_is_stable_and_follows_every_value(tmp_path, monkeypatch):
    base = parse_scenario(BASE)
    assert base.fingerprint() == parse_scenario(copy.deepcopy(BASE)).fingerprint()
    assert (
        base.fingerprint() == load_scenario(write(tmp_path, BASE, "same.yaml")).fingerprint()
    )  # source ignored
    changes = [
        ("seed", 4),
        ("name", "unit2"),
        ("max_seconds", 9.5),
        ("sites", ["factory-a", "factory-b", "factory-c"]),
        ("foundation/train_utterances", 11),
        ("stages/0/name", "s0"),
        ("stages/0/test_utterances", 5),
        ("stages/0/conditions/noise", "mixed"),
        ("stages/1/sites/factory-b/snr_db", [5, 11]),
        ("stages/1/sites/factory-b/voices", {"en": ["en-us"]}),
    ]
    prints = {base.fingerprint()}
    for path, value in changes:
        prints.add(parse_scenario(mutated(path, value)).fingerprint())
    assert len(prints) == len(changes) + 1
    monkeypatch.setattr(scenario_module, "GENERATOR_VERSION", scenario_module.GENERATOR_VERSION + 1)
    assert base.fingerprint() not in prints


ERRORS = [
    # (change, expected key path, expected value text)
    (lambda d: d.update(sitez=1), "sitez", "unknown key"),
    (lambda d: d.pop("name"), "name", "missing"),
    (lambda d: d.update(seed="abc"), "seed", "'abc'"),
    (lambda d: d.update(seed=True), "seed", "True"),
    (lambda d: d.update(sites=["factory-a", "factory-a"]), "sites[1]", "'factory-a'"),
    (lambda d: d.update(sites=[]), "sites", "[]"),
    (lambda d: d.update(sites=["bad name"]), "sites[0]", "'bad name'"),
    (lambda d: d["stages"][1].update(name="s1"), "stages[1].name", "'s1'"),
    (lambda d: d["stages"][0].update(name="foundation"), "stages[0].name", "'foundation'"),
    (lambda d: d["stages"][1].pop("test_utterances"), "stages[1].test_utterances", "missing"),
    (lambda d: d["stages"][1]["sites"].update({"factory-x": {}}), "stages[1].sites.factory-x", "'factory-x'"),
    (
        lambda d: d["stages"][1]["sites"]["factory-b"].update(noise="loud"),
        "stages[1].sites.factory-b.noise",
        "'loud'",
    ),
    (lambda d: d["stages"][0]["conditions"].update(noize="hum"), "stages[0].conditions.noize", "unknown key"),
    (
        lambda d: d["stages"][0]["conditions"].update(rate=[200, 100]),
        "stages[0].conditions.rate",
        "[200, 100]",
    ),
    (lambda d: d["stages"][0]["conditions"].update(rate=[50, 100]), "stages[0].conditions.rate[0]", "50"),
    (
        lambda d: d["stages"][0]["conditions"].update(rate=[150.5, 160]),
        "stages[0].conditions.rate[0]",
        "150.5",
    ),
    (lambda d: d["stages"][0]["conditions"].update(pitch=[0, 120]), "stages[0].conditions.pitch[1]", "120"),
    (
        lambda d: d["stages"][0]["conditions"].update(snr_db="high"),
        "stages[0].conditions.snr_db[0]",
        "'high'",
    ),
    (
        lambda d: d["stages"][0]["conditions"].update(snr_db=[1, 2, 3]),
        "stages[0].conditions.snr_db",
        "[1, 2, 3]",
    ),
    (lambda d: d["stages"][0]["conditions"].update(rt60=[0, 1]), "stages[0].conditions.rt60[0]", "0"),
    (lambda d: d["stages"][0]["conditions"].update(reverb=1.5), "stages[0].conditions.reverb", "1.5"),
    (
        lambda d: d["stages"][0]["conditions"].update(gain_db=[-6, 30]),
        "stages[0].conditions.gain_db[1]",
        "30",
    ),
    (
        lambda d: d["stages"][0]["conditions"].update(languages=["en", "xx"]),
        "stages[0].conditions.languages[1]",
        "'xx'",
    ),
    (lambda d: d["stages"][0]["conditions"].update(languages=[]), "stages[0].conditions.languages", "[]"),
    (
        lambda d: d["stages"][0]["conditions"].update(voices={"de": ["nope"]}),
        "stages[0].conditions.voices.de[0]",
        "'nope'",
    ),
    (
        lambda d: d["stages"][0]["conditions"].update(voices={"it": ["it"]}),
        "stages[0].conditions.voices.it",
        "unknown key",
    ),
    (
        lambda d: d["stages"][0]["conditions"].update(variants=["zz9"]),
        "stages[0].conditions.variants[0]",
        "'zz9'",
    ),
    (
        lambda d: d["stages"][0]["conditions"].update(domain="baking"),
        "stages[0].conditions.domain",
        "'baking'",
    ),
    (
        lambda d: d["stages"][0]["conditions"].update(train_utterances=-1),
        "stages[0].conditions.train_utterances",
        "-1",
    ),
    (
        lambda d: d["foundation"]["conditions"].update(train_utterances=5),
        "foundation.conditions.train_utterances",
        "5",
    ),
    (lambda d: d["foundation"].update(test_utterances="2"), "foundation.test_utterances", "'2'"),
    (lambda d: d.update(max_seconds=0), "max_seconds", "0"),
    (lambda d: d.update(stages=[]), "stages", "[]"),
    (lambda d: d["stages"].append("s3"), "stages[2]", "must be a mapping"),
]


@pytest.mark.parametrize("change, key_path, value_text", ERRORS, ids=[e[1] + ":" + e[2] for e in ERRORS])
def test_invalid_values_name_file_key_path_and_value(tmp_path, change, key_path, value_text):
    data = copy.deepcopy(BASE)
    change(data)
    path = write(tmp_path, data)
    with pytest.raises(ScenarioError) as caught:
        load_scenario(path)
    message = str(caught.value)
    assert str(path) in message
    assert f": {key_path}:" in message
    assert value_text in message


def test_allowed_values_are_listed_in_errors(tmp_path):
    with pytest.raises(ScenarioError, match="none, hum, broadband, mixed"):
        load_scenario(write(tmp_path, mutated("stages/0/conditions/noise", "loud")))
    with pytest.raises(ScenarioError, match="factory-a, factory-b"):
        load_scenario(write(tmp_path, mutated("stages/1/sites", {"factory-z": {}})))
    with pytest.raises(ScenarioError, match="80..450"):
        load_scenario(write(tmp_path, mutated("stages/0/conditions/rate", 500)))


@pytest.mark.parametrize(
    "text, needle",
    [
        ("", "empty"),
        ("name: [unclosed\n", "not valid YAML"),
        ("name: a\nname: b\nsites: [x]\nstages: []\n", "duplicate key 'name'"),
        ("- just\n- a list\n", "must be a mapping"),
    ],
)
def test_unreadable_files(tmp_path, text, needle):
    path = write(tmp_path, text)
    with pytest.raises(ScenarioError, match=needle) as caught:
        load_scenario(path)
    assert str(path) in str(caught.value)
