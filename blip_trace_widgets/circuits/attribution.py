"""Edge attribution patching (EAP) and EAP with integrated gradients (EAP-IG) on the frozen-node graph.

    >>> from blip_trace_widgets import load_model, demo_samples
    >>> from blip_trace_widgets.circuits.graph import circuit_graph
    >>> from blip_trace_widgets.circuits.inputs import circuit_inputs
    >>> from blip_trace_widgets.circuits.network import Network
    >>> from blip_trace_widgets.circuits.patching import prepare
    >>> bundle = load_model("demo")
    >>> runs = prepare(Network(bundle), circuit_inputs(bundle, *demo_samples()[0][:2], samples=2), "noise")
    >>> attribution_draws(runs, circuit_graph(bundle)).shape   # [draws, edges]
    (2, 3417)

An edge u → r's exact score is the change in the metric m when r alone reads its input recomputed with u taken from
the source run (see :mod:`~.patching`). Its first-order estimate is

    score(u → r) = g_r · (J_{r,u} Δc_u),   g_r = ∂m/∂(input of r),   Δc_u = c_u(source) − c_u(base),

where c_u is u's contribution to the residual stream (a head's ``W_O^h z_h``, an MLP's output, an embedding) and
J_{r,u} = ∂(input of r)/∂(contribution of u) through the post-LayerNorm residual chain, LayerNorm statistics
included (not frozen). g_r comes from one backward pass of a forward whose every channel carries a zero tap: a
head's q, k and v at its projection's output (the tap's gradient, through the head's rows of the projection, is
g_r), an MLP's and ``out``'s input whole. g_r·J_{r,u} is then applied by hand, not by autograd:
:meth:`~.network.Network.chain_scores` runs the chain forward once and back once, through each LayerNorm's
vector-Jacobian product, every channel joining at its own depth and every sublayer's senders scored as the pass
crosses them (checked equal to autograd through the gated chain in the tests). The image's keys and values read the
image itself (J = 1): their scores are the projected change of the image dotted with the taps' gradients. EAP takes
both at the base run (the clean run when noising): one base forward, one source forward, one backward. EAP-IG (Hanna
et al. 2024) averages g_r·J_{r,u} over ``steps`` points whose inputs (image embeddings, question and decoder
embeddings) interpolate between the base and source inputs, at the midpoints (k + 0.5) / steps, and multiplies by
the endpoints' Δc_u.

BLIP-2 and InstructBLIP (:func:`query_attribution_draws`) take the same scores by autograd instead: a forward tapping
every channel's input whole gives g_r, and g_r·J_{r,u}Δc_u for every edge is the gradient of Σ_r g_r·x_r(gates) with
respect to the gates at zero, x_r the gated frozen-node chain (:meth:`~.network.QueryNetwork.chain`) with
contributions at the gradient run and Δc_u between the endpoints. Only the image differs between the endpoints, so
EAP-IG interpolates the image embeddings. With a T5 language model the same function takes them through
:class:`~.network.T5Network`'s chain (the decoder's keys and values through the encoder's final norm).
"""
from __future__ import annotations

import numpy as np
import torch

from .graph import CircuitGraph, Point
from .names import DEC, IMAGE, NOISING, QE
from .network import Record, state_index
from .patching import Runs, pick


class Taps:
    """A source that taps every channel with a zero that requires a gradient: a head's q, k and v at its projection's
    output (``projected``, [B, H, T, dh]), an MLP's and ``out``'s input whole ([B, 1, T, D])."""

    def __init__(self) -> None:
        self.taps: dict[Point, list[torch.Tensor]] = {}

    def at(self, point: Point, default: torch.Tensor) -> torch.Tensor | None:
        if point.where not in ("post", "out"):
            return None
        tap = torch.zeros(default.shape[0], 1, *default.shape[1:], dtype=default.dtype, requires_grad=True)
        self.taps[point] = [tap]
        return default[:, None] + tap

    def projected(self, point: Point, tensors: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        taps = [torch.zeros_like(t, requires_grad=True) for t in tensors]
        self.taps[point] = taps
        return tuple(t + tap for t, tap in zip(tensors, taps))


def _interpolated(runs: Runs, steps: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The base inputs moved towards the source inputs, [samples * steps] rows (sample-major)."""
    alphas = (torch.arange(steps, dtype=torch.float32) + 0.5) / steps
    source = (runs.pair.img, runs.net.embed(QE, runs.pair.question_ids), runs.net.embed("dec", runs.pair.decoder_ids))
    if NOISING[runs.direction]:
        source = (runs.pair.corrupted_img, runs.net.embed(QE, runs.pair.corrupted_question_ids), source[2])
    rows = []
    for base, other in zip(runs.base_inputs, source):
        base_s, other_s = (t.expand(runs.samples, *t.shape[1:]) for t in (base, other))
        mixed = base_s[:, None] + alphas.view(1, -1, *[1] * (base.dim() - 1)).to(base) * (other_s - base_s)[:, None]
        rows.append(mixed.reshape(runs.samples * steps, *base.shape[1:]))
    return rows[0], rows[1], rows[2]


def _gradients(runs: Runs, inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
               rows: int) -> tuple[Record, dict[Point, list[torch.Tensor]]]:
    """One forward with taps on every channel and one backward: the run's record and each tap's gradient (at a
    head's projection outputs, or at an MLP's or ``out``'s input)."""
    taps = Taps()
    with torch.enable_grad():
        record = runs.net.forward(inputs[0], inputs[1], inputs[2], runs.pair, taps, rows=rows)
        record.score.sum().backward()
    grads = {p: [t.grad if t.grad is not None else torch.zeros_like(t) for t in ts] for p, ts in taps.taps.items()}
    return record.detached(), grads


def _block_scores(runs: Runs, graph: CircuitGraph, block: str, record: Record, grads: dict[Point, list[torch.Tensor]],
                  rows: torch.Tensor, delta_rows: torch.Tensor) -> dict[Point, torch.Tensor]:
    """g_r · J_{r,u} Δc_u for every channel r fed by ``block``'s nodes and every slot u, in one chain pass and one
    backward: per point [rows, channels, slots]; row i reads the gradient run's row ``rows[i]`` and the endpoints'
    draw ``delta_rows[i]``."""
    points = [p for p in graph.index if graph.shape.source_block(p) == block]
    base = pick(record.img[:, None] if block == IMAGE else runs.net.contributions(record, block), rows)
    delta = pick(runs.contributions("source", block), delta_rows) - pick(runs.contributions("base", block), delta_rows)
    n = len(delta_rows)
    if block != IMAGE:
        final = runs.net.shape.qe_layers * 3
        wheres = [state_index(p) if p.block == block else final for p in points]
        at_inputs = [pick(runs.net.unproject(p, grads[p]) if runs.net.linears(p) else grads[p][0], rows)
                     for p in points]
        found = runs.net.chain_scores(block, base, delta, list(zip(wheres, at_inputs)))
        return dict(zip(points, found))
    change = delta.expand(n, -1, -1, -1)[:, 0]  # the image's input: its own value, J = 1; scored per projection
    out = {}
    for point in points:
        projected = runs.net.project_change(point, change)
        out[point] = torch.cat([(pick(g, rows) * c).sum((-1, -2)) for g, c in zip(grads[point], projected)],
                               1)[:, :, None]
    return out


def attribution_draws(runs: Runs, graph: CircuitGraph, steps: int | None = None) -> np.ndarray:
    """Per draw, every edge's EAP score (``steps=None``) or EAP-IG score over ``steps`` points: [samples, edges]."""
    samples = runs.samples
    if steps is None:
        inputs, rows = runs.base_inputs, max(t.shape[0] for t in runs.base_inputs)
        per_step = 1
    else:
        inputs, rows, per_step = _interpolated(runs, steps), samples * steps, steps
    record, grads = _gradients(runs, inputs, rows)
    chain_rows = torch.arange(samples * per_step)
    run_rows = chain_rows if rows > 1 else torch.zeros_like(chain_rows)
    out = torch.zeros(samples, len(graph), dtype=torch.float64)
    by_point: dict[Point, torch.Tensor] = {}
    for block in (IMAGE, QE, DEC):
        by_point.update(_block_scores(runs, graph, block, record, grads, run_rows, chain_rows // per_step))
    for point, table in graph.index.items():
        scores = by_point[point]
        scores = scores.reshape(samples, per_step, *scores.shape[1:]).mean(1)
        mask = torch.from_numpy(table >= 0)
        out[:, torch.from_numpy(table[table >= 0])] = scores[:, mask].double()
    return out.numpy()


class ChannelTaps:
    """A source that taps every channel's input whole with a zero that requires a gradient ([B, C, T, D]; BLIP-2's
    language-model channels at the residual, before their LayerNorm)."""

    def __init__(self, widths: dict[Point, int]) -> None:
        self.widths = widths
        self.taps: dict[Point, torch.Tensor] = {}

    def at(self, point: Point, default: torch.Tensor) -> torch.Tensor | None:
        tap = torch.zeros(default.shape[0], self.widths[point], *default.shape[1:], dtype=default.dtype,
                          requires_grad=True)
        self.taps[point] = tap
        return default[:, None] + tap


def query_attribution_draws(runs: Runs, graph: CircuitGraph, steps: int | None = None) -> np.ndarray:
    """BLIP-2's and InstructBLIP's EAP (``steps=None``) or EAP-IG scores per draw, [samples, edges]: g_r from one
    backward of a tapped forward, then g_r · J_{r,u} Δc_u for every edge at once as the gradient of
    Σ_r g_r · chain_r(gates) with respect to the gates at zero (autograd through the gated frozen-node chain)."""
    net, samples = runs.net, runs.samples
    if steps is None:
        inputs, rows, per_step = runs.base_inputs, max(t.shape[0] for t in runs.base_inputs), 1
    else:
        alphas = ((torch.arange(steps, dtype=torch.float32) + 0.5) / steps).to(runs.pair.img)
        source = runs.source_inputs()
        base_img, other = (t.expand(samples, -1, -1) for t in (runs.base_inputs[0], source[0]))
        img = (base_img[:, None] + alphas.view(1, -1, 1, 1) * (other - base_img)[:, None]).flatten(0, 1)
        inputs, rows, per_step = (img, runs.base_inputs[1], runs.base_inputs[2]), samples * steps, steps
    taps = ChannelTaps({p: table[0] for p, table in graph.point_edges.items()})
    with torch.enable_grad():
        record = net.forward(*inputs, runs.pair, taps, rows=rows)
        record.score.sum().backward()
    record = record.detached()
    n = samples * per_step
    run_rows = torch.arange(n) if rows > 1 else torch.zeros(n, dtype=torch.long)
    draw = torch.arange(n) // per_step
    base = {b: pick(net.contributions(record, b), run_rows) for b in net.blocks}
    delta = {b: pick(runs.contributions("source", b), draw) - pick(runs.contributions("base", b), draw)
             for b in net.blocks}
    image, image_delta = pick(record.img, run_rows), pick(runs.source.img, draw) - pick(runs.base.img, draw)
    out = torch.zeros(samples, len(graph), dtype=torch.float64)
    for point, (width, places, nodes, edges) in graph.point_edges.items():
        tap = taps.taps[point].grad
        if tap is None:
            continue
        with torch.enable_grad():  # one point at a time: only its chains' graph is held
            gates = torch.zeros(n, width, len(graph.nodes), dtype=image.dtype, requires_grad=True)
            if graph.shape.source_block(point) == IMAGE:
                x = image[:, None] + gates[:, :, :1, None] * image_delta[:, None]
            else:
                x = net.chain(base, delta, gates, point)
            (grad,) = torch.autograd.grad((x * pick(tap, run_rows)).sum(), gates)
        scores = grad[:, torch.from_numpy(places), torch.from_numpy(nodes)]
        out[:, torch.from_numpy(edges)] = scores.reshape(samples, per_step, -1).mean(1).double()
    return out.numpy()
