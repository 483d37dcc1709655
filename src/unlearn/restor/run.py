"""The RESTOR stages that need a model but do not train: choosing targets and evaluating.

`select_targets` picks targets among entities the clean model knows; `evaluate_baselines` and
`evaluate` run models over the facts (reusing saved records of the same model files, facts and
settings) and score them against the clean and corrupted models; `eval_command` is
`unlearn restor eval`. Training stages and the whole run are in `restor.pipeline`.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from unlearn.errors import UnlearnError
from unlearn.outputs import atomic_write_json
from unlearn.restor.documents import find_targets, infer_corrupted, load_documents
from unlearn.restor.evaluate import (
    RESULTS,
    EvalSettings,
    Groups,
    fact_records,
    read_records,
    records_key,
    reusable,
    write_evaluation,
)
from unlearn.restor.facts import Facts, load_facts, sample_entities
from unlearn.restor.metrics import Judge, judged

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
    from unlearn.models import cache_root, file_sha256, hash_model_files, resolve_model

    resolved = resolve_model(ModelConfig(name=spec))
    if resolved.kind in ("alias", "gguf"):
        return file_sha256(resolved.path, cache_root())
    if resolved.kind == "local":
        return hash_model_files(resolved.path, cache_root())
    return None


def model_records(
    spec: str,
    folder: Path,
    facts: Facts,
    setup: Setup,
    s: EvalSettings,
    progress: bool = True,
) -> tuple[list[dict[str, Any]], float]:
    """The model's fact records: read from `folder` when it already holds them for the same model
    files, facts and settings; else the model runs once. Returns (records, seconds spent)."""
    key = records_key(facts, setup.groups, setup.corrupted, s)
    sha = _model_sha(spec)
    if reusable(folder, key, sha):
        results, records = read_records(folder)
        return records, float(results.get("seconds") or 0.0)
    from unlearn.config import ModelConfig
    from unlearn.models import load_model_and_tokenizer

    t = time.perf_counter()
    model, tok, _ = load_model_and_tokenizer(ModelConfig(name=spec))
    records = fact_records(model, tok, facts, setup.groups, setup.corrupted, s, progress)
    del model
    return records, time.perf_counter() - t


def _baselines(
    sources: dict[str, str | Path],
    folders: dict[str, Path],
    facts: Facts,
    setup: Setup,
    s: EvalSettings,
    progress: bool,
) -> dict[str, list[dict[str, Any]]]:
    """Records of the clean and corrupted models. A source holding a RESTOR evaluation is read
    (it must match these facts and settings); a model runs once into its folder in `folders`,
    whose evaluation is written scored against the other baseline."""
    key = records_key(facts, setup.groups, setup.corrupted, s)
    recs: dict[str, list[dict[str, Any]]] = {}
    ran: dict[str, float] = {}
    for which, src in sources.items():
        if (Path(src) / RESULTS).is_file():
            results, recs[which] = read_records(Path(src))
            if results.get("records_key") != key:
                raise UnlearnError(
                    f"the {which} evaluation {src} used other facts, entities or settings than "
                    "this one; evaluate the models with the same ones"
                )
        else:
            twin = [w for w in ran if str(sources[w]) == str(src)]  # the same model given twice
            recs[which], ran[which] = (
                (recs[twin[0]], ran[twin[0]]) if twin
                else model_records(str(src), folders[which], facts, setup, s, progress)
            )  # fmt: skip
    for which, secs in ran.items():
        spec = str(sources[which])
        write_evaluation(
            folders[which], which, spec, _model_sha(spec), which, key, recs[which], recs["clean"],
            recs["corrupted"], s, seconds=secs, corrupted_source=setup.corrupted_source,
        )  # fmt: skip
    return recs


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
    _baselines({"clean": clean, "corrupted": corrupted},
               {"clean": clean_dir, "corrupted": corrupted_dir}, facts, setup, s, progress)  # fmt: skip


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
    a baseline that is `spec` itself is not run twice).
    """
    s = s or EvalSettings()
    s.check()
    out = Path(output)
    facts.check_entities(setup.groups.all, "evaluation")
    sources = {"clean": clean, "corrupted": corrupted}
    folders = {w: out / "baselines" / w for w in sources}
    base = _baselines(sources, folders, facts, setup, s, progress)
    same = [w for w, src in sources.items() if str(src) == spec]
    if same:
        records, secs = base[same[0]], 0.0
    else:
        records, secs = model_records(spec, out, facts, setup, s, progress)
    key = records_key(facts, setup.groups, setup.corrupted, s)
    return write_evaluation(
        out, name or Path(spec).name, spec, _model_sha(spec), role, key, records,
        base["clean"], base["corrupted"], s, judge, secs, setup.corrupted_source,
    )  # fmt: skip


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
    records, secs = model_records(spec, folder, facts, setup, s, progress)
    key = records_key(facts, setup.groups, {}, s)
    write_evaluation(folder, "select", spec, _model_sha(spec), "select", key, records, records,
                     records, s, seconds=secs, corrupted_source="none")  # fmt: skip
    ok = judged(records, _judge(s))
    known = dict.fromkeys(everyone, 0)
    for r in records:
        known[r["entity"]] += ok[r["id"]]
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


def _judge(s: EvalSettings) -> Judge:
    from unlearn.restor.metrics import JUDGES

    return JUDGES[s.judge]


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
    from unlearn.restor.evaluate import EvalSettings

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
