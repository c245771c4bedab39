"""The toy world behind registration (`merge_distill.extensions`): nothing outside `merge_distill/toyworld/` names
it; its `zoo:` section, `zoo:` paths, `zoo-*` suites, builder and `zoo` commands arrive through its entry point;
a name registered twice is refused."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from merge_distill import extensions
from merge_distill.errors import UserError
from merge_distill.evaluation.suites import load_suite, suite_grader
from merge_distill.extensions import PathScheme, Registry, Section, SuiteSource
from merge_distill.validate import load_recipe
from merge_distill.toyworld import extension as toyworld

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "merge_distill"


def test_nothing_outside_the_toy_world_names_it():
    """`grep -rn toyworld merge_distill --include=*.py | grep -v ^merge_distill/toyworld/` prints nothing: the
    core reaches the toy world only through the extension registry."""
    hits = [f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
            for path in sorted(PACKAGE.rglob("*.py")) if PACKAGE / "toyworld" not in path.parents
            for n, line in enumerate(path.read_text().splitlines(), 1) if "toyworld" in line]
    assert hits == []


def test_the_toy_world_registers_through_its_entry_point():
    reg = extensions.registry()
    assert list(reg.sections) == ["zoo"] and list(reg.path_schemes) == ["zoo"]
    assert list(reg.suite_sources) == ["zoo-"] and list(reg.builders) == ["zoo"] and list(reg.commands) == ["zoo"]
    assert extensions.registry() is reg  # loaded once


def test_a_name_registered_twice_is_refused():
    reg = Registry()
    section, scheme, source = Section(parse=dict), PathScheme(section="zoo", resolve=str), SuiteSource(load=str)
    reg.add_section("zoo", section)
    reg.add_path_scheme("zoo", scheme)
    reg.add_suite_source("zoo-", source)
    reg.add_commands("zoo", dict)
    for add, name, value in ((reg.add_section, "zoo", Section(parse=list)),
                             (reg.add_path_scheme, "zoo", PathScheme(section="other", resolve=repr)),
                             (reg.add_suite_source, "zoo-", SuiteSource(load=repr)),
                             (reg.add_suite_source, "zoo-m", SuiteSource(load=repr)),  # would shadow zoo-math
                             (reg.add_suite_source, "zo", SuiteSource(load=repr)),  # would swallow zoo-*
                             (reg.add_commands, "zoo", list)):
        with pytest.raises(ValueError, match="already registered|overlaps"):
            add(name, value)
    # the first registrations stand
    assert reg.sections["zoo"] is section and reg.path_schemes["zoo"] is scheme
    assert reg.suite_sources == {"zoo-": source}
    reg.add_suite_source("hub-", SuiteSource(load=repr))  # another prefix is fine
    # the toy world registering itself a second time, into the loaded registry
    with pytest.raises(ValueError, match="recipe section 'zoo' is already registered"):
        toyworld.register(extensions.registry())


def _smoke(tmp_path, *sets):
    return load_recipe(ROOT / "recipes" / "smoke.yaml", [f"zoo.dir={tmp_path / 'zoo'}", *sets])


def test_a_zoo_recipe_loads_with_plain_paths_and_its_default_suites(tmp_path):
    zoo = tmp_path / "zoo"
    recipe = _smoke(tmp_path, "experts.code.eval_suite=humaneval", "experts.math.reference=zoo:mid_base")
    assert recipe.student.path == str(zoo / "base")
    assert [(e.teacher, e.reference, e.prompts, e.eval_suite) for e in recipe.experts] == [
        (str(zoo / "math_expert"), str(zoo / "mid_base"), str(zoo / "data" / "math_train.jsonl"), "zoo-math"),
        (str(zoo / "code_expert"), "student", str(zoo / "data" / "code_train.jsonl"), "humaneval")]
    assert "zoo" not in type(recipe).model_fields  # the schema knows no zoo
    # the default folder: the cache's, by preset and seed
    assert load_recipe(ROOT / "recipes" / "smoke.yaml", ["zoo.seed=3"]).student.path.endswith("zoo/smoke-seed3/base")


@pytest.mark.parametrize("sets, message", [
    (["zoo=null"], r"^.*smoke.yaml: paths start with 'zoo:' but the recipe has no zoo: section$"),
    (["zoo.presett=smoke"], r"^.*smoke.yaml: zoo.presett: unknown key$"),
    (["zoo.seed=one"], r"^.*smoke.yaml: zoo.seed: Input should be a valid integer.*\(got 'one'\)$"),
    (["zoo.preset=nope"], r"^.*smoke.yaml: zoo.preset 'nope' is unknown \(known: default, hard, three, hack, smoke\)$"),
])
def test_a_bad_zoo_section_is_one_line_naming_its_key(tmp_path, sets, message):
    with pytest.raises(UserError, match=message) as e:
        load_recipe(ROOT / "recipes" / "smoke.yaml", sets)
    assert "\n" not in str(e.value)


def test_a_recipe_without_zoo_paths_needs_no_section(tiny_world, tmp_path, write_recipe):
    path = write_recipe(tmp_path / "r.yaml", tiny_world, tmp_path / "run")
    recipe = load_recipe(path)
    assert recipe.student.path == str(tiny_world / "base") and all(e.eval_suite is None for e in recipe.experts)
    assert extensions.unbuilt(recipe) is None and extensions.graders_to_build(recipe) == set()


def test_the_builder_names_builds_and_skips_what_the_paths_point_at(tmp_path, monkeypatch):
    recipe = _smoke(tmp_path, "experts.math.reference=zoo:mid_base", "isolation=rlimits")
    zoo = tmp_path / "zoo"
    assert extensions.unbuilt(recipe) == (
        f"zoo 'smoke' (seed 0) at {zoo}: not built yet (zoo:base, zoo:code_expert, zoo:data/code_train.jsonl, "
        "zoo:data/math_train.jsonl, zoo:math_expert, zoo:mid_base); `merge-distill run` or `merge-distill zoo build` "
        "builds it")
    assert extensions.graders_to_build(recipe) == {"math", "code"}  # each expert is GRPO on its domain's grader
    built = []

    def ensure(self, members):
        built.append((members, self.isolation, self.log))

    monkeypatch.setattr(toyworld.Zoo, "ensure", ensure)
    log = lambda *_: None  # noqa: E731
    assert extensions.build(recipe, log=log) is recipe
    # in recipe order (student, then each expert's teacher, reference, prompts), with the recipe's isolation
    assert built == [(["base"], "rlimits", log), (["math_expert"], "rlimits", log), (["mid_base"], "rlimits", log),
                     (["data/math_train.jsonl"], "rlimits", log), (["code_expert"], "rlimits", log),
                     (["data/code_train.jsonl"], "rlimits", log)]
    for member in ("base", "math_expert", "data"):
        (zoo / member).mkdir(parents=True)
    assert "not built yet (zoo:code_expert, zoo:mid_base); " in extensions.unbuilt(recipe)  # data/ holds the prompts
    assert extensions.graders_to_build(recipe) == {"code"}


def _zoo_data(root: Path, domain: str, records) -> Path:
    (root / "data").mkdir(parents=True, exist_ok=True)
    (root / "data" / f"{domain}_test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root


def test_zoo_suites_come_from_the_zoo_a_section_named(tmp_path, monkeypatch):
    monkeypatch.setattr(toyworld, "_suite_zoo", [])
    with pytest.raises(UserError, match="suite 'zoo-code' needs a zoo directory"):
        load_suite("zoo-code")
    assert suite_grader("zoo-code") == "code"  # not built yet: its domain's grader
    _zoo_data(tmp_path / "a", "math", [{"task_id": f"m{i}", "prompt": f"{i}+1=?", "domain": "math", "grader": "math",
                                        "answer": str(i + 1)} for i in range(3)])
    _zoo_data(tmp_path / "b", "math", [{"task_id": "other", "prompt": "1+1=?", "domain": "math", "grader": "math",
                                        "answer": "2"}])
    extensions.parse_section("zoo", {"preset": "smoke", "dir": str(tmp_path / "a")}, source="test")
    suite = load_suite("zoo-math")
    assert (suite.name, suite.domain, suite.grader, suite.metric) == ("zoo-math", "math", "math", "avg")
    assert suite.task_ids == ["m0", "m1", "m2"] and suite.source == str(tmp_path / "a" / "data" / "math_test.jsonl")
    assert toyworld.zoo_suite("math", tmp_path / "a").records == suite.records
    _smoke(tmp_path, f"zoo.dir={tmp_path / 'b'}")  # a recipe's section names the zoo of the suites after it
    assert load_suite("zoo-math").task_ids == ["other"]
    with pytest.raises(UserError, match="code_test.jsonl"):
        load_suite("zoo-code")
    _zoo_data(tmp_path / "b", "code", [{"task_id": "a", "prompt": "p", "grader": "code"},
                                       {"task_id": "b", "prompt": "p", "grader": "math"}])
    with pytest.raises(UserError, match="same 'grader'"):
        load_suite("zoo-code")
    (tmp_path / "zoo-math").write_text("")  # an existing file of that name is a file, not the zoo's suite
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="unknown suite 'zoo-math'"):
        load_suite("zoo-math")


def test_eval_on_a_zoo_suite_from_the_command_line(tiny_world, tmp_path):
    """`merge-distill eval --zoo-dir DIR --suite zoo-math`: the suite of that zoo, under its own name; two models
    are compared paired on it."""
    from merge_distill.cli import app

    root = tmp_path / "zoo"
    (root / "data").mkdir(parents=True)
    records = [json.loads(l) for l in (tiny_world / "math_test.jsonl").read_text().splitlines()[:3]]
    (root / "data" / "math_test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["eval", "--model", f"base={tiny_world / 'base'}", "--model",
                                      f"teacher={tiny_world / 'math_teacher'}", "--suite", "zoo-math", "--zoo-dir",
                                      str(root), "--max-new-tokens", "4", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "results.json").read_text())
    assert {(r["model"], r["suite"], r["n_problems"]) for r in report["rows"] if r["subset"] is None} == {
        ("base", "zoo-math", 3), ("teacher", "zoo-math", 3)}
    assert [(d["suite"], d["a"], d["b"], d["n_problems"]) for d in report["paired_differences"]] == [
        ("zoo-math", "base", "teacher", 3)]
    assert "zoo-math avg: base - teacher = " in result.stdout


def test_the_zoo_commands_are_mounted():
    from merge_distill.cli import app

    result = CliRunner().invoke(app, ["zoo", "build", "--help"])
    assert result.exit_code == 0 and "--preset" in result.stdout and "--member" in result.stdout
