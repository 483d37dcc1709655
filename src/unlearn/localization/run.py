"""One localisation: score (or load) a mask for a model and data, and write what it found.

Used by `unlearn localize` (a mask on its own, to inspect or reuse) and by `unlearn forget` with a
`localize` section (the mask is computed, saved in OUTPUT/localization/, noise is injected and the
training loop only moves the selected weights). The files it writes:

    mask.safetensors    one bool tensor per scored parameter + the model's fingerprint
    scores.safetensors  the float32 scores (only with localize.scores=true)
    localization.json   settings, counts, where the selected weights live, seconds, memory
    summary.md          the same for a person: per layer x module type table
    heatmap.png         layers x module types, share of weights selected

No example text is written: the data is named by its count and a hash.
"""

from __future__ import annotations

import dataclasses
import json
import random
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from unlearn.config import LocalizeConfig, validate_localize
from unlearn.errors import UnlearnError
from unlearn.localization import mask as masks
from unlearn.localization.plot import heatmap
from unlearn.localization.scores import gradient_scores, random_scores, scored_parameters
from unlearn.outputs import atomic_write_json, atomic_write_text
from unlearn.prompts import Tokenized

INFO_FILE = "localization.json"
SUMMARY_FILE = "summary.md"
HEATMAP_FILE = "heatmap.png"


@dataclass
class Localization:
    """A mask and what training needs from it.

    mask: {parameter name: bool tensor} of the scored parameters.
    train_mask: what the loop restricts training to (None with train_all: every weight trains).
    anchor: UOE's router anchor (None for every other method).
    """

    mask: dict[str, torch.Tensor]
    info: dict[str, Any]
    train_all: bool = False
    anchor: Any = None
    noise: dict[str, float] = field(default_factory=dict)

    @property
    def train_mask(self) -> dict[str, torch.Tensor] | None:
        return None if self.train_all else self.mask


def check_retain(cfg: LocalizeConfig, has_retain: bool) -> None:
    """GRIN's ratio needs retain gradients; say so before any model is loaded."""
    if cfg.method == "grin" and cfg.mask is None and not has_retain:
        raise UnlearnError(
            "localize.method=grin divides by the retain gradient, but no retain data was given; "
            "pass --retain FILE, or use localize.method=forget_grad"
        )


def retain_sample(items: list[Tokenized], n: int, seed: int) -> list[Tokenized]:
    """n retain sequences drawn without replacement by a seeded RNG, in their original order."""
    if n >= len(items):
        return list(items)
    picked = sorted(random.Random(seed).sample(range(len(items)), n))
    return [items[i] for i in picked]


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def compute_mask(
    model: torch.nn.Module,
    forget: list[Tokenized],
    retain: list[Tokenized] | None,
    pad_id: int,
    cfg: LocalizeConfig,
    seed: int,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None, dict[str, Any]]:
    """(mask, scores or None, info) for cfg.method on `model`; the weights are not changed."""
    t0 = time.perf_counter()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    info: dict[str, Any] = {"method": cfg.method}
    scores = None
    if cfg.method == "uoe":
        from unlearn.localization import uoe

        layers = uoe.find_moe_layers(model)
        affinity = uoe.attribute(
            model, forget, pad_id, batch_size=cfg.batch_size, tokens=cfg.uoe_tokens
        )
        choices = uoe.choose_experts(affinity, layers=cfg.uoe_layers)
        mask = uoe.expert_mask(model, layers, choices)
        info["experts"] = [dataclasses.asdict(c) for c in choices]
        info["affinity"] = {str(k): [round(float(x), 6) for x in v] for k, v in affinity.items()}
    else:
        params = scored_parameters(model, cfg.include, cfg.exclude)
        if cfg.method == "regex":
            mask = {
                n: torch.ones(p.shape, dtype=torch.bool, device=p.device) for n, p in params.items()
            }
        else:
            if cfg.method == "random":
                scores = random_scores(params, seed)
            else:
                use_retain = cfg.method == "grin"
                check_retain(cfg, bool(retain))
                n_retain = cfg.retain_size or len(forget)
                sample = retain_sample(retain or [], n_retain, seed) if use_retain else None
                info["retain_sequences"] = len(sample) if sample is not None else 0
                scores = gradient_scores(
                    model,
                    forget,
                    sample,
                    pad_id,
                    params,
                    accumulate=cfg.accumulate,
                    eps=cfg.eps,
                    batch_size=cfg.batch_size,
                )
            mask = masks.select_top(scores, cfg.top_fraction, per_tensor=cfg.select == "per_tensor")
    info["forget_sequences"] = len(forget)
    info["seconds"] = round(time.perf_counter() - t0, 2)
    info["peak_memory_mb"] = round(
        torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else _peak_rss_mb(),
        1,
    )
    info["peak_memory_kind"] = "cuda_allocated" if torch.cuda.is_available() else "process_rss"
    return mask, scores, info


def _settings(cfg: LocalizeConfig) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k != "mask"}


def localize(
    model: torch.nn.Module,
    forget: list[Tokenized],
    retain: list[Tokenized] | None,
    pad_id: int,
    cfg: LocalizeConfig,
    seed: int,
    output: Path,
    reuse: bool = False,
    extra: dict[str, Any] | None = None,
) -> Localization:
    """The run's mask: loaded (cfg.mask, or this output's own on resume) or computed, then written.

    The fingerprint of `model` is taken before anything changes it, so the saved mask can only be
    applied to these weights. `extra` is added to localization.json (data hashes, model name).
    """
    validate_localize(cfg)
    fingerprint = masks.model_fingerprint(model)
    own = output / masks.MASK_FILE
    source = cfg.mask or (str(own) if reuse and own.is_file() else None)
    scores = None
    if source is not None:
        mask, meta = masks.load_mask(source)
        masks.check_mask(mask, meta, model, str(source))
        info = json.loads(meta.get("info", "{}"))
        info["loaded_from"] = str(source)
    else:
        mask, scores, info = compute_mask(model, forget, retain, pad_id, cfg, seed)
        if not any(bool(m.any()) for m in mask.values()):
            raise UnlearnError("the localization selected no weight; raise localize.top_fraction")
    summary = masks.summarize(mask)
    info.update(
        {
            "settings": _settings(cfg),
            "seed": seed,
            "model_fingerprint": fingerprint,
            "selected": summary["selected"],
            "scored": summary["scored"],
            "fraction": summary["fraction"],
            "buffers_mb": round(2 * 4 * summary["scored"] / 2**20, 1),
            **(extra or {}),
        }
    )
    write_outputs(output, mask, scores if cfg.scores else None, info, summary, fingerprint)
    anchor = None
    if info.get("experts"):
        from unlearn.localization import uoe

        anchor = uoe.Anchor.from_info(info["experts"], cfg.anchor_weight, cfg.uoe_tokens)
    return Localization(mask=mask, info=info, train_all=cfg.train_all, anchor=anchor)


def write_outputs(
    output: Path,
    mask: dict[str, torch.Tensor],
    scores: dict[str, torch.Tensor] | None,
    info: dict[str, Any],
    summary: dict[str, Any],
    fingerprint: str,
) -> None:
    """mask (+ scores), localization.json, summary.md and the heatmap, each written atomically."""
    output.mkdir(parents=True, exist_ok=True)
    stored = {k: v for k, v in info.items() if k not in ("loaded_from",)}
    masks.save_mask(output / masks.MASK_FILE, mask, fingerprint, stored)
    if scores is not None:
        masks.save_scores(output / masks.SCORES_FILE, scores, fingerprint)
    atomic_write_json(output / INFO_FILE, {**info, "summary": summary})
    atomic_write_text(output / SUMMARY_FILE, summary_markdown(info, summary))
    title = f"{info.get('method')}: {summary['selected']:,} of {summary['scored']:,} weights"
    heatmap(summary, output / HEATMAP_FILE, title)


def summary_markdown(info: dict[str, Any], summary: dict[str, Any]) -> str:
    """Where the selected weights are, per layer (rows) and module type (columns), in percent."""
    grid = summary["grid"]
    layers = sorted(grid, key=lambda k: (0, int(k)) if k.isdigit() else (1, k))
    modules = sorted({m for k in layers for m in grid[k]})
    lines = [
        f"# Localization: {info.get('method')}",
        "",
        f"{summary['selected']:,} of {summary['scored']:,} scored weights selected "
        f"({100 * summary['fraction']:.3g}%), in {summary['tensors_with_selection']} of "
        f"{len(summary['tensors'])} tensors. Cells: % of that layer's module weights selected.",
        "",
        "| layer | " + " | ".join(modules) + " |",
        "|---|" + "---|" * len(modules),
    ]
    for layer in layers:
        cells = []
        for mod in modules:
            c = grid[layer].get(mod)
            cells.append(f"{100 * c['selected'] / c['weights']:.2f}" if c else "")
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    if info.get("experts"):
        lines += [
            "",
            "Experts unlearned (UOE): "
            + ", ".join(f"layer {e['layer']} expert {e['expert']}" for e in info["experts"]),
        ]
    if "seconds" in info:
        lines += [
            "",
            f"Scoring took {info['seconds']} s; peak memory {info.get('peak_memory_mb')} MB "
            f"({info.get('peak_memory_kind')}).",
        ]
    return "\n".join(lines) + "\n"


def _prepare_folder(output: str, overwrite: bool) -> Path:
    """An empty folder, or one this command wrote before (replaced only with overwrite)."""
    if not output:
        raise UnlearnError("no output folder given; pass --output DIR")
    out = Path(output).expanduser()
    if out.exists() and not out.is_dir():
        raise UnlearnError(f"output {out} exists and is a file; choose a folder path")
    if out.is_dir() and any(out.iterdir()):
        if not (out / INFO_FILE).is_file() and not (out / masks.MASK_FILE).is_file():
            raise UnlearnError(
                f"output folder {out} is not empty and holds no localization; choose another"
            )
        if not overwrite:
            raise UnlearnError(
                f"output folder {out} already holds a localization; pass --overwrite"
            )
        import shutil

        shutil.rmtree(out)
    return out


def run_localize(cfg: Any) -> Localization:
    """`unlearn localize`: load the model and data of a RunConfig, write a mask to cfg.output.

    The `localize` section says how (method "none" means GRIN here: scoring is the point); the
    `prompt` section must match the later `unlearn forget` run, since scores depend on the tokens.
    """
    from unlearn.data import dataset_hash, load_examples
    from unlearn.models import load_model_and_tokenizer, resolve_model
    from unlearn.prompts import PromptFormatter, tokenize_examples

    loc_cfg: LocalizeConfig = cfg.localize
    if loc_cfg.method == "none":
        loc_cfg = dataclasses.replace(loc_cfg, method="grin")
    if loc_cfg.mask is not None:
        raise UnlearnError("localize.mask loads a saved mask; `unlearn localize` computes one")
    validate_localize(loc_cfg)
    forget = load_examples(cfg.forget, "forget")
    retain = None
    if cfg.retain is not None and cfg.retain.path:
        retain = load_examples(cfg.retain, "retain")
    check_retain(loc_cfg, retain is not None)
    resolve_model(cfg.model)
    out = _prepare_folder(cfg.output, cfg.overwrite)
    model, tokenizer, _ = load_model_and_tokenizer(cfg.model)
    formatter = PromptFormatter(tokenizer, cfg.prompt)
    f_items = tokenize_examples(forget, formatter)
    r_items = tokenize_examples(retain, formatter) if retain else None
    seed = loc_cfg.seed if loc_cfg.seed is not None else cfg.train.seed
    extra = {
        "data": {
            "forget": {"n": len(forget), "sha256": dataset_hash(forget)},
            "retain": {"n": len(retain), "sha256": dataset_hash(retain)} if retain else None,
        },
        "model": cfg.model.name,
        "output": str(out),
    }
    return localize(
        model, f_items, r_items, tokenizer.pad_token_id, loc_cfg, seed, out, extra=extra
    )
