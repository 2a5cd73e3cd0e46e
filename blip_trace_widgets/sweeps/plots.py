"""Figures of sweeps: averaged heatmaps and effect-by-layer lines over many questions.

    >>> from blip_trace_widgets.sweeps.plots import FORM_LABELS
    >>> sorted(FORM_LABELS)
    ['normalized', 'rome']

Plots of one result live in :mod:`~.plotting`; these read a sweep table (see
:mod:`~.sweep`) through :mod:`~.aggregate`.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..causal_trace.averages import ROLES, average_trace, sample_effects
from ..causal_trace.plots import new_figure, plot_trace
from ..core.errors import BlipTraceError
from ..core.names import BLOCK_LABELS, KIND_LABELS, facts, is_head_kind
from ..core.roles import role_label
from ..models import heads

FORM_LABELS = {"normalized": "normalised indirect effect", "rome": "indirect effect (score − low)"}


def estimate_note(table: Any) -> str:
    """"" for exact traces; a label saying the table holds attribution-patching estimates otherwise."""
    if "method" not in table or not (table["method"] == "estimate").any():
        return ""
    steps = sorted({int(s) for s in table.loc[table["method"] == "estimate", "steps"]})
    return f"ESTIMATE (attribution patching, {'/'.join(map(str, steps))} step{'s' if steps != [1] else ''})"


def plot_average_heatmaps(table: Any, *, form: str = "normalized", correct_only: bool = False, by: str = "role",
                          configs: Sequence[int] | None = None, figure: Any = None) -> Any:
    """The paper's averaged heatmaps, one per configuration of a sweep table; returns the figure."""
    configs = sorted(int(c) for c in table["config"].unique()) if configs is None else list(configs)
    results = [average_trace(table, config=c, form=form, correct_only=correct_only, by=by) for c in configs]
    if figure is None:
        width = sum(2.4 + 0.45 * r.num_layers for r in results)
        figure = new_figure((width, 1.9 + 0.32 * max(len(r.tokens) for r in results)))
    for i, result in enumerate(results):
        ax = figure.add_subplot(1, len(results), i + 1)
        window = f", window {result.window}" if result.window > 1 else ""
        note = estimate_note(table[table["config"] == configs[i]])
        word = f", caption word {result.config['word']}" if result.config.get("word") is not None else ""
        title = (f"{note + chr(10) if note else ''}{KIND_LABELS.get(result.kind, result.kind)}{window}{word}\n"
                 f"{BLOCK_LABELS.get(result.block, result.block)}, {result.config['questions']} "
                 f"{heads.of(result.head).unit}")
        plot_trace(result, ax=ax, normalized=False, title=title, top="range", tiny=None)
    return figure


Panel = tuple[Any, str, str]  # (long-form effects, the column that colours the lines, the panel's title)


def _draw_panels(panels: Sequence[Panel], *, form: str, figure: Any) -> Any:
    """Lines of effect against layer, one panel per (effects, hue, title), with 95% CI bands; panels that share a
    hue share one legend, on the last of them."""
    import seaborn as sns

    if figure is None:
        figure = new_figure((0.4 + 3.2 * len(panels), 2.8))
    axes = [figure.add_subplot(1, len(panels), i + 1) for i in range(len(panels))]
    for i, (ax, (data, hue, title)) in enumerate(zip(axes, panels)):
        last_of_its_hue = i == len(panels) - 1 or panels[i + 1][1] != hue
        sns.lineplot(data=data, x="layer", y="effect", hue=hue, errorbar=("ci", 95), seed=0, marker="o", ax=ax,
                     legend=last_of_its_hue)
        ax.set_title(title, fontsize=9)
        ax.set_ylabel(FORM_LABELS[form] if ax is axes[0] else "")
        ax.axhline(0, color="0.7", linewidth=0.8)
        if ax.get_legend() is not None:  # the last panel's legend goes outside it, an earlier one stays inside
            outside = {"loc": "upper left", "bbox_to_anchor": (1, 1)} if ax is axes[-1] else {"loc": "best"}
            sns.move_legend(ax, fontsize=8 if ax is axes[-1] else 7, title=None, **outside)
    return figure


def _role_lines(effects: Any, *, hue: str, form: str, roles: Sequence[str] | None, figure: Any,
                title: Any) -> Any:
    """Lines of ``effects`` (long form) against layer coloured by ``hue``, one panel per role, 95% CI bands."""
    roles = [r for r in (roles or ROLES) if r in set(effects["role"])]
    if not roles:
        raise BlipTraceError(_no_roles(effects))
    return _draw_panels([(effects[effects["role"] == role], hue, title(role)) for role in roles], form=form,
                        figure=figure)


def _no_roles(effects: Any) -> str:
    """Why there are no token roles to draw, and what to draw instead."""
    if effects["kind"].map(lambda kind: is_head_kind(str(kind))).all():
        return ("head maps have no token roles: plot_effect_by_layer(table) draws each head against layer, and "
                "aggregate.top_heads(table) ranks the heads")
    if effects["block"].map(lambda block: facts(str(block)).image_side).all():
        return ("no token roles to plot: for an image-side sweep, average with aggregate.average_trace(table, "
                "config=...) and draw it with .plot_on_image(image=...)")
    return (f"none of the roles asked for is in the table: it has {', '.join(sorted(set(effects['role'])))}; pass "
            f"roles= from {', '.join(ROLES)}")


def plot_effect_by_layer(table: Any, *, form: str = "normalized", correct_only: bool = False,
                         roles: Sequence[str] | None = None, figure: Any = None) -> Any:
    """Average indirect effect against layer, with 95% CI bands: one line per kind, one panel per token role; and
    for head kinds (``cross_attn_head`` ...) one panel per kind, one line per head."""
    effects = sample_effects(table, form=form, correct_only=correct_only)
    note = " [estimate]" if estimate_note(table) else ""
    words = effects["word"] if "word" in effects else [None] * len(effects)
    effects["configuration"] = [
        f"{KIND_LABELS.get(k, k)}" + (f" (w{w})" if w > 1 else "") + (f", word {int(t)}" if t == t and t is not None
                                                                       else "") + note
        for k, w, t in zip(effects["kind"], effects["window"], words)]
    block = str(table["block"].iloc[0])
    is_head = effects["kind"].map(lambda kind: is_head_kind(str(kind)))
    positional, head_rows = effects[~is_head], effects[is_head]
    panels: list[Panel] = []
    if not positional.empty:
        wanted = [r for r in (roles or ROLES) if r in set(positional["role"])]
        if not wanted:
            raise BlipTraceError(_no_roles(positional))
        panels += [(positional[positional["role"] == role], "configuration",
                    f"{role_label(role, block)} token" + ("s" if role == "question words" else "")) for role in wanted]
    for configuration in dict.fromkeys(head_rows["configuration"]):  # a head map: one line per head
        rows = head_rows[head_rows["configuration"] == configuration].rename(columns={"role": "head"})
        panels.append((rows, "head", f"{configuration}: each head"))
    return _draw_panels(panels, form=form, figure=figure)


def plot_subset_comparison(tables: dict[str, Any], *, kind: str = "hidden", form: str = "normalized",
                           correct_only: bool = False, roles: Sequence[str] | None = None, figure: Any = None) -> Any:
    """One line per subset (e.g. colour, count, location) for one kind, one panel per token role."""
    import pandas as pd

    parts = []
    block = str(next(iter(tables.values()))["block"].iloc[0]) if tables else ""
    for name, table in tables.items():
        rows = table[table["kind"] == kind]
        if rows.empty:
            raise BlipTraceError(f"the table for {name!r} has no {kind!r} traces")
        effects = sample_effects(rows, form=form, correct_only=correct_only)
        effects["subset"] = name + (" [estimate]" if estimate_note(rows) else "")
        parts.append(effects)
    return _role_lines(pd.concat(parts, ignore_index=True), hue="subset", form=form, roles=roles, figure=figure,
                       title=lambda role: f"{KIND_LABELS.get(kind, kind)}: {role_label(role, block)}")
