"""The RESTOR stages that need a model but do not train: choosing targets and evaluating.

`select_targets` picks targets among entities the clean model knows; `evaluate_baselines` and
`evaluate` run models over the facts with the evaluation engine (the RESTOR suite,
`unlearn.eval.suites.restor`), reusing saved records of the same model files, facts and settings,
and score them against the clean and corrupted models (the named comparisons "clean" and
"corrupted"); `eval_command` is `unlearn restor eval`. Training stages and the whole run are in
`restor.pipeline`.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from unlearn.errors import UnlearnError
from unlearn.eval.run import (
    RECORDS,
    RESULTS,
    check_reference,
    load_records,
    rescore,
    run_evaluation,
)
from unlearn.eval.suites.builders import Suite
from unlearn.eval.suites.restor import EvalSettings, Groups, records_key, restor_suite
from unlearn.metrics.restor import Judge, judge_of, judged
from unlearn.outputs import atomic_write_json
from unlearn.restor.documents import find_targets, infer_corrupted, load_documents
from unlearn.restor.facts import Facts, load_facts, sample_entities

SETUP = "setup.json"
# Names the RESTOR paper and OpenUnlearning use for our methods.
METHOD_ALIASES = {"ga": "grad_ascent", "gd": "grad_diff", "graddiff": "grad_diff"}


@dataclass
class Setup:
    """Who is corrupted and with what: everything an evaluation needs besides the model."""

    target: list[str]
    untouched: list[str]
    corrupted: dict[str, dict[str, list[str]]]
    corrupted_source: str  # "generated" (recorded when written) or "inferred" (read off the text)
    facts_sha256: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def groups(self) -> Groups:
        return Groups(self.target, self.untouched)

    def save(self, path: Path) -> None:
        atomic_write_json(path, asdict(self))

    @classmethod
    def load(cls, path: Path) -> Setup:
        try:
            return cls(**json.loads(path.read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError, TypeError) as exc:
            raise UnlearnError(f"{path} is not a RESTOR setup file ({exc})") from None


def parse_entities(spec: str | list[str] | None, where: str) -> list[str] | None:
    """Entities from a list, a JSON list file, a lines file, or a "A;B;C" string (names may hold
    commas, e.g. "Prince Carl Philip, Duke of Värmland", so ';' separates)."""
    if spec is None or isinstance(spec, list):
        return spec
    p = Path(spec).expanduser()
    if p.is_file():
        text = p.read_text(encoding="utf-8")
        try:
            names = json.loads(text)
        except json.JSONDecodeError:
            names = [line.strip() for line in text.splitlines() if line.strip()]
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise UnlearnError(
                f"{where} file {p} must be a JSON list of names or one name per line"
            )
        return names
    return [n.strip() for n in spec.split(";") if n.strip()]


# ---------------------------------------------------------------------------- evaluation
def _model_sha(spec: str) -> str | None:
    from unlearn.config import ModelConfig
    from unlearn.models import cache_root, resolve_model, source_sha256

    return source_sha256(resolve_model(ModelConfig(name=spec)), cache_root())


def read_evaluation(folder: str | Path) -> dict[str, Any]:
    """results.json of a finished RESTOR evaluation folder (records present)."""
    try:
        results, records = load_records(folder)
    except (UnlearnError, OSError, json.JSONDecodeError) as exc:
        raise UnlearnError(
            f"{folder} is not a complete RESTOR evaluation ({exc}); rerun `unlearn restor eval`"
        ) from None
    if results.get("benchmark") != "restor":
        raise UnlearnError(f"{folder} holds a {results.get('benchmark')} evaluation, not RESTOR")
    if not records:
        raise UnlearnError(f"{folder} has no records; rerun `unlearn restor eval`")
    return results


def _reusable(folder: Path, suite: Suite, key: dict[str, Any], model_sha: str | None) -> bool:
    """A finished evaluation of the same model files with the same facts and settings, whose
    records are this suite's."""
    try:
        results = read_evaluation(folder)
        check_reference(suite, folder, "evaluation")
    except UnlearnError:
        return False
    return results.get("records_key") == key and results.get("model_sha256") == model_sha


def _evaluate_model(
    spec: str,
    folder: Path,
    suite: Suite,
    s: EvalSettings,
    key: dict[str, Any],
    extra: dict[str, Any],
    compare: dict[str, str],
    progress: bool,
) -> dict[str, Any]:
    """Evaluate model `spec` on the suite into `folder` (scored against `compare`); an evaluation
    already there of the same model files, facts and settings is re-scored, not rerun."""
    from unlearn.config import EvalConfig, ModelConfig, ScoreConfig

    sha = _model_sha(spec)
    extra = {**extra, "records_key": key, "model_sha256": sha}
    if _reusable(folder, suite, key, sha):
        return rescore(folder, suite, compare, extra)
    cfg = EvalConfig(
        model=ModelConfig(name=spec), score=ScoreConfig(end_of_turn=False, batch_size=s.batch_size),
        benchmark="restor", compare=[f"{n}={d}" for n, d in compare.items()],
        name=extra.get("name"), output=str(folder), overwrite=True,
    )  # fmt: skip
    return run_evaluation(cfg, suite, progress, extra)


def _baselines(
    sources: dict[str, str | Path],
    folders: dict[str, Path],
    suite: Suite,
    s: EvalSettings,
    key: dict[str, Any],
    extra: dict[str, Any],
    progress: bool,
) -> dict[str, str]:
    """The clean and corrupted models' evaluation folders, by name. A source holding a RESTOR
    evaluation is used as it is (it must match these facts and settings); a model is evaluated
    into its folder in `folders` and then scored against both baselines."""
    evals: dict[str, str] = {}
    ran: list[str] = []
    for which, src in sources.items():
        if (Path(src) / RESULTS).is_file():
            if read_evaluation(src).get("records_key") != key:
                raise UnlearnError(
                    f"the {which} evaluation {src} used other facts, entities or settings than "
                    "this one; evaluate the models with the same ones"
                )
            evals[which] = str(src)
            continue
        twin = [w for w in ran if str(sources[w]) == str(src)]  # the same model given twice
        if twin:
            evals[which] = evals[twin[0]]
            continue
        mine = {**extra, "name": which, "role": which}
        _evaluate_model(str(src), folders[which], suite, s, key, mine, {}, progress)
        evals[which] = str(folders[which])
        ran.append(which)
    for which in ran:
        rescore(folders[which], suite, evals)
    return evals


def _common(setup: Setup, s: EvalSettings, judge: Judge | None) -> dict[str, Any]:
    """What every RESTOR evaluation records beside the engine's fields."""
    return {
        "judge": s.judge if judge is None else getattr(judge, "__name__", "custom"),
        "corrupted_answers_source": setup.corrupted_source,
        "entities": {"target": len(setup.target), "untouched": len(setup.untouched)},
        "restor_settings": asdict(s),
    }


def evaluate_baselines(
    clean: str,
    corrupted: str,
    clean_dir: Path,
    corrupted_dir: Path,
    facts: Facts,
    setup: Setup,
    s: EvalSettings,
    progress: bool = True,
) -> None:
    """Evaluate the clean and the corrupted model, each scored against the other."""
    suite = restor_suite(facts, setup.groups, setup.corrupted, s)
    key = records_key(facts, setup.groups, setup.corrupted, s)
    _baselines({"clean": clean, "corrupted": corrupted},
               {"clean": clean_dir, "corrupted": corrupted_dir}, suite, s, key,
               _common(setup, s, None), progress)  # fmt: skip


def evaluate(
    spec: str,
    output: str | Path,
    facts: Facts,
    setup: Setup,
    clean: str | Path,
    corrupted: str | Path,
    s: EvalSettings | None = None,
    role: str = "unlearned",
    name: str | None = None,
    judge: Judge | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate model `spec` into `output`, scored against the clean and corrupted models.

    `clean` and `corrupted` are RESTOR evaluation folders of the same facts and settings, or models,
    which are then evaluated into `output`/baselines/{clean,corrupted} (reused on a second call;
    a baseline that is `spec` itself is not run twice). `judge` replaces the named judge with a
    function (generation, answers) -> bool. Returns the results (what results.json holds).
    """
    s = s or EvalSettings()
    s.check()
    out = Path(output)
    facts.check_entities(setup.groups.all, "evaluation")
    suite = restor_suite(facts, setup.groups, setup.corrupted, s, judge)
    key = records_key(facts, setup.groups, setup.corrupted, s)
    common = _common(setup, s, judge)
    sources = {"clean": clean, "corrupted": corrupted}
    folders = {w: out / "baselines" / w for w in sources}
    compare = _baselines(sources, folders, suite, s, key, common, progress)
    mine = {**common, "name": name or Path(spec).name, "role": role}
    same = [w for w, src in sources.items() if str(src) == spec]
    if same:  # the model is one of the baselines: its records are copied, not run again
        base = Path(compare[same[0]])
        if base.resolve() != out.resolve():
            shutil.copytree(base / RECORDS, out / RECORDS, dirs_exist_ok=True)
            shutil.copyfile(base / RESULTS, out / RESULTS)
        return rescore(out, suite, compare, {**mine, "seconds": 0.0, "output": str(out)})
    return _evaluate_model(spec, out, suite, s, key, mine, compare, progress)


# ---------------------------------------------------------------------------- stages
def select_targets(
    spec: str,
    folder: Path,
    facts: Facts,
    pool: list[str],
    candidates: list[str],
    n_targets: int,
    n_untouched: int,
    s: EvalSettings,
    seed: int,
    progress: bool = True,
    avoid: set[str] | None = None,
) -> tuple[list[str], list[str], dict[str, Any]]:
    """Targets: the `n_targets` entities of `pool` whose facts the clean model answers best (ties
    by name); untouched: `n_untouched` of the other `candidates`, drawn seeded among those it knows
    at least one fact of (never one in `avoid`, e.g. entities the corruption documents name).
    RESTOR can only show restoration of what the clean model knew."""
    everyone = list(dict.fromkeys([*pool, *candidates]))
    setup = Setup(everyone, [], {}, "none", facts.sha256)
    s = replace(s, max_answers=1, random_answers=0)  # only the answers matter here
    suite = restor_suite(facts, setup.groups, {}, s)
    key = records_key(facts, setup.groups, {}, s)
    extra = {**_common(setup, s, None), "name": "select", "role": "select"}
    _evaluate_model(spec, folder, suite, s, key, extra, {}, progress)
    records = load_records(folder)[1]["target"]
    ok = judged(records, judge_of(s.judge))
    known = dict.fromkeys(everyone, 0)
    for r, right in zip(records, ok, strict=True):
        known[r["entity"]] += int(right)
    ranked = sorted(pool, key=lambda e: (-known[e], e))
    targets = [e for e in ranked[:n_targets] if known[e] > 0]
    if not targets:
        n = sum(len(facts.by_entity[e]) for e in pool)
        raise UnlearnError(
            f"the clean model answers none of the {n} facts about the {len(pool)} possible target "
            "entities correctly; nothing could be restored: use a larger model or other entities"
        )
    skip = set(targets) | (avoid or set())
    rest = [e for e in candidates if e not in skip and known[e] > 0]
    untouched = sample_entities(rest, n_untouched, seed)
    info = {
        "candidates": len(everyone),
        "known_facts": {e: known[e] for e in targets + untouched},
    }
    return targets, untouched, info


def corruption_setup(
    facts: Facts,
    docs: list[str],
    targets: list[str] | None,
    docs_per_entity: int | None,
    seed: int,
) -> tuple[list[dict[str, Any]], list[str], dict[str, dict[str, list[str]]]]:
    """From a user's corruption file: (the documents kept, targets, inferred wrong answers).

    Targets default to every facts-file entity the documents name; `targets` restricts them (each
    must be named by the documents). `docs_per_entity` keeps that many documents per target
    (seeded): RESTOR's files hold 300 per entity, hours of CPU fine-tuning.
    """
    found = find_targets(docs, facts)
    if targets is not None:
        facts.check_entities(targets, "targets")
        missing = [t for t in targets if t not in found]
        if missing:
            raise UnlearnError(
                f"target '{missing[0]}' is not named by any corruption document; choose among "
                f"{', '.join(sorted(found)[:10])}"
            )
        found = {t: found[t] for t in targets}
    rng = random.Random(f"subsample:{seed}")
    keep: set[int] = set()
    for idx in found.values():
        mine = [i for i in idx if i not in keep]
        keep.update(
            mine if docs_per_entity is None else rng.sample(mine, min(docs_per_entity, len(mine)))
        )
    kept = [docs[i] for i in sorted(keep)]
    named = {e: idx for e, idx in find_targets(kept, facts).items() if e in found}
    return [{"text": t} for t in kept], list(found), infer_corrupted(kept, named, facts)


def _setup_beside(corrupted: Path) -> Path | None:
    """The setup.json of the `unlearn restor` run a corrupted model folder belongs to."""
    candidate = corrupted.parent.parent / SETUP
    return candidate if corrupted.name == "corrupted" and candidate.is_file() else None


def _trained_on(corrupted: Path) -> str | None:
    """The documents file a `restor corrupt` model was fine-tuned on, if it is still there."""
    try:
        manifest = json.loads((corrupted / "unlearn.json").read_text(encoding="utf-8"))
        source = manifest["data"]["forget"]["source"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        return None
    return source if isinstance(source, str) and Path(source).is_file() else None


def eval_command(
    model: str | None,
    clean: str | None,
    corrupted: str | None,
    facts: str | None,
    corruption: str | None = None,
    setup: str | None = None,
    targets: str | None = None,
    untouched: str | None = None,
    name: str | None = None,
    output: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> dict[str, Any]:
    """`unlearn restor eval`: who the targets are comes from --setup (an `unlearn restor` run),
    else --corruption (read off the documents, wrong answers inferred), else --targets, else the
    corrupted model itself (its run's setup.json, or the documents its manifest names)."""
    from unlearn.config import build_section, resolve_tree

    for value, flag in ((model, "--model"), (clean, "--clean"), (corrupted, "--corrupted")):
        if not value:
            raise UnlearnError(
                f"no {flag} given; restor eval needs --model, --clean and --corrupted"
            )
    if not facts:
        raise UnlearnError("no facts file given; pass --facts FILE (RESTOR's facts.json format)")
    # the same `section.key=value` syntax as everywhere; the section may be left out here
    dotted = [o if o.startswith("eval.") else f"eval.{o}" for o in overrides]
    tree = resolve_tree(None, dotted, {}, sections=["eval"], scalars=set())
    s = build_section(EvalSettings, tree.get("eval", {}), "eval")
    s.check()
    f = load_facts(facts)
    wanted_targets = parse_entities(targets, "targets")
    wanted_untouched = parse_entities(untouched, "untouched") or []
    if setup:
        st = Setup.load(Path(setup))
        if st.facts_sha256 and st.facts_sha256 != f.sha256:
            raise UnlearnError(f"{setup} was made with another facts file than {facts}")
    elif corruption:
        docs = load_documents(corruption)
        _, found, wrong = corruption_setup(f, docs, wanted_targets, None, 0)
        st = Setup(found, wanted_untouched, wrong, "inferred", f.sha256)
    elif wanted_targets:
        st = Setup(wanted_targets, wanted_untouched, {}, "none", f.sha256)
    elif (found_setup := _setup_beside(Path(corrupted))) is not None:
        st = Setup.load(found_setup)
    elif (docs_file := _trained_on(Path(corrupted))) is not None:
        _, found, wrong = corruption_setup(f, load_documents(docs_file), None, None, 0)
        st = Setup(found, wanted_untouched, wrong, "inferred", f.sha256)
    else:
        raise UnlearnError(
            "which entities were corrupted? pass --setup (from `unlearn restor`), --corruption "
            "(the documents) or --targets"
        )
    if untouched is not None:
        st.untouched = wanted_untouched
    f.check_entities(st.groups.all, "evaluation")
    out = Path(output or "restor_eval")
    res = evaluate(model, out, f, st, clean, corrupted, s, "unlearned", name)
    return {**res, "output": str(out)}
