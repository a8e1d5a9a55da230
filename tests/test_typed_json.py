"""cli.py's typed JSON: every JSON file is read by its type, each problem named by its field and what was
expected, with the command line's own ranges and choices (one definition per setting)."""
import dataclasses
import json
import math
import re

import pytest
import typer

import cli
import eval as ev
import train
from data.manifest import DataError, read_json

SHARD = cli.Obj({"name": str, "samples": cli.WHOLE, "sha256": cli.Pattern(r"[0-9a-f]{4}", "4 hex digits")})
INDEX = cli.Obj({"complete": bool, "langs": cli.ListOf(str), "shards": cli.ListOf(SHARD, cli.WHOLE),
                 "scaler": cli.Maybe(dict), "peers": cli.MapOf(cli.MapOf(float))}, optional=("peers",))


def test_each_problem_names_its_field_the_value_and_what_was_expected():
    doc = {"complete": "true", "langs": None, "scaler": None, "extra": 1,
           "shards": [{"name": "a", "samples": 2, "sha256": "00ff"}, {"name": "b", "samples": "10"},
                      {"nope": 1}, {"name": 5, "samples": 10.5, "sha256": "xyz"}]}
    assert cli.json_problems(doc, INDEX) == [
        'complete: "true" is not true or false',
        "langs: null is not a list",
        'shards[1].samples: "10" is not a whole number >= 1',
        "shards[1].sha256: missing (4 hex digits)",
        "shards[2].name: missing (text)",
        "shards[2].samples: missing (a whole number >= 1)",
        "shards[2].sha256: missing (4 hex digits)",
        "shards[2].nope: not a field here",
        "shards[3].name: 5 is not text",
        "shards[3].samples: 10.5 is not a whole number >= 1",
        'shards[3].sha256: "xyz" is not 4 hex digits',
        "extra: not a field here"]
    good = {"complete": True, "langs": ["en"], "shards": [{"name": "a", "samples": 1, "sha256": "0a0b"}],
            "scaler": {"scale": 2.0}, "peers": {"PaperNet": {"en": 50, "pt": 49.5}}}
    assert cli.json_problems(good, INDEX) == [] and cli.check_json(good, INDEX, "x.json") is good
    bad = {k: v for k, v in good.items() if k != "scaler"} | {"shards": []}
    with pytest.raises(cli.JsonError, match=r"^x\.json: shards: \[\] is not a list of 1 or more items; "
                                            r"scaler: missing \(an object or null\)$"):
        cli.check_json(bad, INDEX, "x.json")


def test_numbers_are_not_booleans_nor_text_and_never_nan_or_inf():
    for spec in (float, cli.POSITIVE, cli.FRACTION):
        for bad in (True, "0.5", None, math.nan, math.inf, -math.inf, [0.5]):
            assert not cli.fits(bad, spec), (spec, bad)
    for spec in (int, cli.WHOLE, cli.COUNT):
        for bad in (True, "5", 5.0, 2.5, None):
            assert not cli.fits(bad, spec), (spec, bad)
    assert not cli.fits(1, bool) and not cli.fits("false", bool) and cli.fits(False, bool)
    assert cli.fits(3, float) and cli.fits(3, cli.POSITIVE) and not cli.fits(0, cli.POSITIVE)
    assert str(cli.POSITIVE) == "a number in (0, inf)" and str(cli.COUNT) == "a whole number >= 0"
    assert str(cli.Range(0.01, 0.99)) == "a number in [0.01, 0.99]"
    assert str(cli.Range(2, 2, whole=True)) == "a whole number in [2, 2]"
    assert cli.json_problems(5, cli.Maybe(cli.ListOf(float, cli.Range(2, 2, whole=True)))) == [
        "5 is not a list of 2 items or null"]
    assert cli.json_problems("dev", ("train", "val")) == ['"dev" is not one of "train", "val"']


def test_a_lone_surrogate_is_named_wherever_it_is(tmp_path):
    """JSON may write \\ud800 alone; no UTF-8 file can hold the text it makes (a write would raise)."""
    assert cli.json_problems({"a": [1, {"b\ud800": "x"}], "c": "d\udfff"}, dict) == [
        'a[1]: the key "b\\ud800" is not text (it holds a lone surrogate, which no UTF-8 file can)',
        'c: "d\\udfff" is not text (it holds a lone surrogate, which no UTF-8 file can)']
    assert cli.json_problems({"e": "\U0001f600 \u00e9"}, dict) == []  # a pair, \ud83d\ude00, is one character
    (tmp_path / "pair.json").write_text('{"e": "\\ud83d\\ude00"}')
    assert read_json(tmp_path / "pair.json") == {"e": "\U0001f600"}
    (tmp_path / "lone.json").write_text('{"images": [{"raw": "a \\ud800 b"}]}')
    with pytest.raises(DataError, match=r'lone\.json: images\[0\]\.raw: "a \\ud800 b" is not text'):
        read_json(tmp_path / "lone.json")


def test_a_long_value_is_cut_and_five_problems_are_said_of_many():
    assert cli.show("x" * 100) == '"' + "x" * 55 + " ..." and len(cli.show(list(range(50)))) == 60
    with pytest.raises(cli.JsonError) as error:
        cli.check_json(list(range(-8, 0)), cli.ListOf(cli.COUNT), "n.json")
    assert str(error.value).endswith("[4]: -4 is not a whole number >= 0; ... (8 problems in all)")


def test_a_typed_config_and_its_json_accept_the_same_values():
    """cli.config_spec: a saved config.json of train.TrainConfig, each setting with the Range or choices of
    its option() (what check_options says on the command line), any of them left out."""
    spec = cli.config_spec(train.TrainConfig)
    assert set(spec.fields) == {f.name for f in dataclasses.fields(train.TrainConfig)}
    assert set(spec.optional) == set(spec.fields)
    for f in dataclasses.fields(train.TrainConfig):
        check = f.metadata.get("check")
        if check is not None and not isinstance(getattr(train.TrainConfig(), f.name), bool):
            assert spec.fields[f.name] is check, f.name  # the very object check_options uses
    saved = json.loads(json.dumps(dataclasses.asdict(train.RECIPES["rs-m-clip"])))
    assert cli.json_problems(saved, spec) == []
    assert cli.json_problems({"head_bn": "false", "steps": 0, "global_scale": [0.4], "arch": "big",
                              "data": "a.jsonl", "stpes": 5}, spec) == [
        "data: \"a.jsonl\" is not a list", "arch: \"big\" is not one of \"xlmr-b32\", \"tiny\"",
        "steps: 0 is not a whole number >= 1", "global_scale: [0.4] is not a list of 2 items",
        'head_bn: "false" is not true or false', "stpes: not a field here (did you mean steps?)"]


def test_a_flag_and_a_suite_field_share_one_range():
    """eval.py's --k, --temperature, --test-fraction and --seeds check the Range its suites' fields use."""
    for name, value in (("k", 0), ("temperature", 0.0), ("test_fraction", 5.0), ("seeds", 0)):
        with pytest.raises(typer.BadParameter, match=re.escape(f"{value} is not {ev.SETTINGS[name]}")):
            cli.in_range(ev.SETTINGS[name])(value)
        fields = {"k": 1, "temperature": 0.1, "test_fraction": 0.5, "seeds": 1}
        spec = cli.Obj({n: ev.SETTINGS[n] for n in fields})
        expected = f"{name}: {value} is not {ev.SETTINGS[name]}"
        assert cli.json_problems(fields | {name: value}, spec) == [expected]
    assert cli.in_range(ev.SETTINGS["temperature"])(1e-300) == 1e-300
